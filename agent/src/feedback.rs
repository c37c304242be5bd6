//! Ground-truth feedback (issue #11): request ids for every local-API
//! inference, and labels posted back for them (`POST /v1/feedback`,
//! docs/agent.md "Local API").
//!
//! A **request id** is `"<boot>-<n>"`: `<boot>` is 16 lowercase hex digits
//! drawn at random when the agent starts, `<n>` the decimal count of requests
//! served since then (from 1). It is unique per device across restarts (with
//! probability `1 - 2^-64` per restart) and carries no content of the
//! request. The agent remembers the last [`DEFAULT_CAPACITY`] ids (in memory:
//! ids do not survive a restart) with the release that answered and the
//! model's answer; a label for an older, unknown or pre-restart id is counted
//! as `unknown_request` and refused with 404.
//!
//! The model's answer, compared with the label:
//! * classifier (`Task::Classifier`): the argmax of output 0 (the first row);
//!   labels are class ids `0..classes`;
//! * any other model whose output 0 holds a single value (a probability):
//!   the decision `value >= 0.5` as 1, else 0; labels are 0 or 1;
//! * otherwise there is no answer to compare, and labels are refused (400).
//!
//! Agreement is counted per release in the telemetry [`crate::telemetry::Stats`]
//! (`TelemetryRecord.feedback`, `FEEDBACK_LABELS_TOTAL`, `ONLINE_ACCURACY`).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use edgefleet_bundle::payload::{ModelSpec, Task, Tensor};
use edgefleet_protocol::messages::ReleaseRef;

/// Request ids remembered by default.
pub const DEFAULT_CAPACITY: usize = 10_000;

/// Threshold of a single probability output: `p >= 0.5` is decision 1.
pub const DECISION_THRESHOLD: f32 = 0.5;

/// What the model answered, in the units of a label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// A classifier's predicted class among `classes`.
    Class {
        /// Predicted class id.
        class: u64,
        /// Number of classes (labels must be below it).
        classes: u64,
    },
    /// A probability output thresholded at [`DECISION_THRESHOLD`] (0 or 1).
    Decision(u64),
}

impl Answer {
    /// The answer of `spec`'s model given its `outputs`; `None` when the
    /// model's output has no label-comparable answer (see the module docs).
    pub fn of(spec: &ModelSpec, outputs: &[Tensor]) -> Option<Self> {
        let out = outputs.first()?;
        let values: Vec<f32> = out.data.to_f32();
        match &spec.task {
            Task::Classifier { labels } => {
                let k = *out.shape.last()?;
                let class = crate::drift::argmax_rows(&out.shape, &values)
                    .first()
                    .copied()?;
                let classes = labels.len().max(k) as u64;
                Some(Answer::Class {
                    class: class as u64,
                    classes,
                })
            }
            _ if values.len() == 1 => {
                Some(Answer::Decision(u64::from(values[0] >= DECISION_THRESHOLD)))
            }
            _ => None,
        }
    }

    /// The answer as a label value.
    pub fn value(&self) -> u64 {
        match *self {
            Answer::Class { class, .. } => class,
            Answer::Decision(d) => d,
        }
    }

    /// Checks that `label` is a possible value; `Err` says why not.
    ///
    /// # Errors
    /// A message naming the accepted range.
    pub fn check_label(&self, label: u64) -> Result<(), String> {
        match *self {
            Answer::Class { classes, .. } if label >= classes => Err(format!(
                "label {label} is not a class id of this model (0..{classes})"
            )),
            Answer::Decision(_) if label > 1 => Err(format!(
                "label {label} is not a decision (0 or 1) for this model's probability output"
            )),
            _ => Ok(()),
        }
    }
}

/// A served request the agent remembers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    /// Release that answered.
    pub release: ReleaseRef,
    /// The model's answer (`None`: not comparable with a label).
    pub answer: Option<Answer>,
    /// The label, once received.
    pub label: Option<u64>,
}

/// Why a label was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FeedbackError {
    /// The id is not one of the last remembered requests (404).
    #[error("request_id `{0}` is unknown or expired (the agent remembers the last {1} requests since its start)")]
    Unknown(String, usize),
    /// The label does not fit the model's answer (400).
    #[error("label: {0}")]
    BadLabel(String),
    /// The request already has a label (409).
    #[error("request_id `{0}` already has a label")]
    AlreadyLabelled(String),
}

/// A label accepted for a remembered request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// Release that answered the request.
    pub release: ReleaseRef,
    /// The model's answer (label units).
    pub answer: u64,
    /// Whether the label equals the answer.
    pub agreed: bool,
}

#[derive(Debug)]
struct Inner {
    next: u64,
    served: HashMap<String, Served>,
    order: VecDeque<String>,
}

/// The bounded memory of served requests (shared as `Arc<Feedback>`).
#[derive(Debug)]
pub struct Feedback {
    boot: String,
    capacity: usize,
    inner: Mutex<Inner>,
}

impl Default for Feedback {
    fn default() -> Self {
        Self::new(DEFAULT_CAPACITY)
    }
}

impl Feedback {
    /// Remembers up to `capacity` (at least 1) requests; a fresh boot prefix.
    pub fn new(capacity: usize) -> Self {
        Feedback {
            boot: format!("{:016x}", rand::random::<u64>()),
            capacity: capacity.max(1),
            inner: Mutex::new(Inner {
                next: 0,
                served: HashMap::new(),
                order: VecDeque::new(),
            }),
        }
    }

    /// A new request id (see the module docs for the format).
    pub fn new_id(&self) -> String {
        let n = self
            .inner
            .lock()
            .map(|mut g| {
                g.next += 1;
                g.next
            })
            .unwrap_or(0);
        format!("{}-{n}", self.boot)
    }

    /// Remembers that `id` was answered by `release` with `answer`,
    /// forgetting the oldest request beyond the capacity.
    pub fn record(&self, id: &str, release: ReleaseRef, answer: Option<Answer>) {
        let Ok(mut g) = self.inner.lock() else { return };
        g.served.insert(
            id.to_string(),
            Served {
                release,
                answer,
                label: None,
            },
        );
        g.order.push_back(id.to_string());
        while g.order.len() > self.capacity {
            if let Some(old) = g.order.pop_front() {
                g.served.remove(&old);
            }
        }
    }

    /// The remembered request `id`.
    pub fn get(&self, id: &str) -> Option<Served> {
        self.inner.lock().ok()?.served.get(id).cloned()
    }

    /// Records `label` for request `id`.
    ///
    /// # Errors
    /// [`FeedbackError::Unknown`] (forgotten or never served),
    /// [`FeedbackError::BadLabel`] (out of range, or a model without a
    /// comparable answer), [`FeedbackError::AlreadyLabelled`].
    pub fn label(&self, id: &str, label: u64) -> Result<Accepted, FeedbackError> {
        let mut g = self
            .inner
            .lock()
            .map_err(|_| FeedbackError::Unknown(id.to_string(), self.capacity))?;
        let s = g
            .served
            .get_mut(id)
            .ok_or_else(|| FeedbackError::Unknown(id.to_string(), self.capacity))?;
        let answer = s.answer.ok_or_else(|| {
            FeedbackError::BadLabel(
                "this model's output has no class or probability to compare a label with".into(),
            )
        })?;
        answer.check_label(label).map_err(FeedbackError::BadLabel)?;
        if s.label.is_some() {
            return Err(FeedbackError::AlreadyLabelled(id.to_string()));
        }
        s.label = Some(label);
        Ok(Accepted {
            release: s.release.clone(),
            answer: answer.value(),
            agreed: answer.value() == label,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use edgefleet_bundle::payload::{DType, ModelFormat, TensorSpec};

    fn spec(task: Task, out: Vec<usize>) -> ModelSpec {
        ModelSpec {
            name: "m".into(),
            format: ModelFormat::Nnef,
            file: "m.nnef.tar".into(),
            inputs: vec![],
            outputs: vec![TensorSpec {
                name: "y".into(),
                dtype: DType::F32,
                shape: out,
            }],
            state: vec![],
            task,
            batch_axis: None,
        }
    }

    fn rel() -> ReleaseRef {
        ReleaseRef {
            model: "m".into(),
            release: 1,
            version: "1.0.1".into(),
        }
    }

    #[test]
    fn answers_by_task() {
        let cls = spec(
            Task::Classifier {
                labels: vec!["a".into(), "b".into(), "c".into()],
            },
            vec![1, 3],
        );
        let y = Tensor::f32("y", vec![1, 3], vec![0.1, 0.7, 0.2]);
        let a = Answer::of(&cls, &[y]).unwrap();
        assert_eq!(
            a,
            Answer::Class {
                class: 1,
                classes: 3
            }
        );
        assert!(a.check_label(2).is_ok() && a.check_label(3).is_err());
        let p = spec(Task::Other, vec![1, 1]);
        for (v, d) in [(0.49, 0), (0.5, 1), (0.9, 1)] {
            let y = Tensor::f32("y", vec![1, 1], vec![v]);
            assert_eq!(Answer::of(&p, &[y]), Some(Answer::Decision(d)), "{v}");
        }
        assert!(Answer::Decision(0).check_label(2).is_err());
        let y = Tensor::f32("y", vec![1, 4], vec![0.0; 4]);
        assert_eq!(Answer::of(&spec(Task::Other, vec![1, 4]), &[y]), None);
    }

    #[test]
    fn bounded_memory_and_exact_outcomes() {
        let f = Feedback::new(3);
        let ids: Vec<String> = (0..5).map(|_| f.new_id()).collect();
        assert!(ids[0].ends_with("-1") && ids[4].ends_with("-5"), "{ids:?}");
        assert_eq!(ids[0].split('-').next().unwrap().len(), 16);
        for (i, id) in ids.iter().enumerate() {
            f.record(id, rel(), Some(Answer::Decision(i as u64 % 2)));
        }
        // The two oldest are forgotten.
        assert!(matches!(
            f.label(&ids[0], 0),
            Err(FeedbackError::Unknown(..))
        ));
        assert!(matches!(
            f.label(&ids[1], 0),
            Err(FeedbackError::Unknown(..))
        ));
        assert!(f.label(&ids[2], 0).unwrap().agreed);
        assert!(!f.label(&ids[3], 0).unwrap().agreed);
        assert!(matches!(
            f.label(&ids[3], 1),
            Err(FeedbackError::AlreadyLabelled(_))
        ));
        assert!(matches!(
            f.label(&ids[4], 7),
            Err(FeedbackError::BadLabel(_))
        ));
        assert_eq!(f.get(&ids[4]).unwrap().label, None);
    }
}
