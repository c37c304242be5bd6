//! Stage 4: how the gate judges the outputs. Output 0 is judged by the task the target
//! profile declares for the model, else as a classifier when it is one (detected),
//! else element-wise; recurrent state outputs are not gated directly.

use edgefleet_bundle::payload::TensorSpec;
use edgefleet_targets::Task;

use super::reference::Reference;
use super::Specialised;
use crate::onnx::{self, pb};
use crate::{gate, Error};

/// Stage 4's hand-off.
pub(crate) struct Judging {
    /// Classes `C` of output 0 when it is a detected classifier (`[N, C]`, from a
    /// Softmax), else `None`.
    pub classes: Option<usize>,
    /// How the gate judges output 0.
    pub judged: gate::Judged,
    /// Class labels (`C` of them) from the model's `character` metadata when it has
    /// exactly `C` lines, else `"0".."C-1"`; empty for a non-classifier.
    pub labels: Vec<String>,
    /// Per output: whether the gate compares it. Design: recurrent state outputs are
    /// not gated directly: their effect is measured on the next case's outputs (state
    /// is threaded), which is what a caller sees.
    pub gated: Vec<bool>,
}

/// Runs stage 4.
///
/// # Errors
/// [`Error::Unsupported`] when the profile declares a task whose output shape
/// output 0 does not have (a probability map needs `[.., H, W]`, CTC `[N, T, C]`
/// with `C > blank`).
pub(super) fn judge(spec: &Specialised, reference: &Reference) -> Result<Judging, Error> {
    let out0 = &reference.runner.outputs[0];
    let from_softmax = ends_in_softmax(onnx::graph(&spec.model));
    let classes = (out0.shape.len() == 2 && (2..=1000).contains(&out0.shape[1]) && from_softmax)
        .then(|| out0.shape[1]);
    let judged = match spec.source.overrides.task {
        Some(task) => judged_by_task(task, out0)?,
        None => classes.map_or(gate::Judged::Values, |classes| gate::Judged::Classifier {
            classes,
        }),
    };
    let labels = classes
        .map(|k| class_labels(k, spec.source.metadata.get("character")))
        .unwrap_or_default();
    let gated = reference
        .runner
        .outputs
        .iter()
        .map(|o| !reference.state.iter().any(|b| b.output == o.name))
        .collect();
    Ok(Judging {
        classes,
        judged,
        labels,
        gated,
    })
}

/// Whether graph output 0 comes from a Softmax, directly or through pass-through ops
/// (Paddle exports end in `Softmax -> Identity`, ppocr cls among them). The walk up
/// the producers is bounded (a malformed graph cannot loop it).
fn ends_in_softmax(g: &pb::GraphProto) -> bool {
    let Some(out) = g.output.first() else {
        return false;
    };
    let mut name = out.name.as_str();
    for _ in 0..8 {
        let Some(n) = g
            .node
            .iter()
            .find(|n| n.output.first().map(String::as_str) == Some(name))
        else {
            return false;
        };
        match n.op_type.as_str() {
            "Softmax" => return true,
            "Identity" | "Reshape" | "Flatten" | "Squeeze" | "Unsqueeze" => {
                let Some(input) = n.input.first() else {
                    return false;
                };
                name = input;
            }
            _ => return false,
        }
    }
    false
}

/// The gate's reading of output 0 for a task the profile declares.
///
/// # Errors
/// [`Error::Unsupported`] naming the task and the output when its shape does not fit.
fn judged_by_task(task: Task, out0: &TensorSpec) -> Result<gate::Judged, Error> {
    match task {
        Task::ProbabilityMap { threshold } => match out0.shape.as_slice() {
            &[.., height, width] => Ok(gate::Judged::ProbabilityMap {
                threshold,
                height,
                width,
            }),
            shape => Err(Error::Unsupported {
                what: format!("task probability-map on output `{}`", out0.name),
                reason: format!("needs an [.., H, W] output; `{}` is {shape:?}", out0.name),
            }),
        },
        Task::Ctc { blank } => match out0.shape.as_slice() {
            &[_, steps, classes] if blank < classes => Ok(gate::Judged::Ctc {
                steps,
                classes,
                blank,
            }),
            shape => Err(Error::Unsupported {
                what: format!("task ctc (blank {blank}) on output `{}`", out0.name),
                reason: format!(
                    "needs an [N, T, C] output with C > blank; `{}` is {shape:?}",
                    out0.name
                ),
            }),
        },
    }
}

/// `k` class labels: the non-empty lines of the `character` metadata when there are
/// exactly `k`, else `"0".."k-1"`.
fn class_labels(k: usize, character: Option<&String>) -> Vec<String> {
    let from_meta: Option<Vec<String>> = character.map(|s| {
        s.lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect()
    });
    match from_meta {
        Some(v) if v.len() == k => v,
        _ => (0..k).map(|i| i.to_string()).collect(),
    }
}
