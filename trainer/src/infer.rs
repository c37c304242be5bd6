//! Inference on exported and external ONNX models with tract (the engine the device agent
//! uses): the export check of a run and the pretrained baselines (PP-OCR cls, Silero VAD).

use tract_onnx::prelude::*;

use crate::dataset::{Examples, Task};
use crate::Error;

fn tract_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Invalid {
        what: what.into(),
        reason: e.to_string(),
    }
}

type Runnable = std::sync::Arc<TypedRunnableModel>;

/// Loads ONNX `bytes` with the first input fixed to f32 `shape` (other inputs keep the
/// model's own facts), optimised and runnable.
fn load(bytes: &[u8], shape: &[usize], what: &str) -> Result<Runnable, Error> {
    tract_onnx::onnx()
        .model_for_read(&mut &bytes[..])
        .and_then(|m| m.with_input_fact(0, f32::fact(shape).into()))
        .and_then(|m| m.into_optimized())
        .and_then(|m| m.into_runnable())
        .map_err(|e| tract_err(what, format!("{e:#}")))
}

fn to_vec(t: &Tensor, what: &str) -> Result<Vec<f32>, Error> {
    t.to_plain_array_view::<f32>()
        .map(|v| v.iter().copied().collect())
        .map_err(|e| tract_err(what, e))
}

/// Median wall time, in milliseconds, of `runs` batch-1 runs of a single-input model on
/// `sample` (shape `sample_shape`), after 3 warm-up runs; the model is loaded once.
pub fn latency_ms_p50(
    bytes: &[u8],
    sample: &[f32],
    sample_shape: &[usize],
    runs: usize,
) -> Result<f64, Error> {
    let what = "latency";
    let shape: Vec<usize> = std::iter::once(1)
        .chain(sample_shape.iter().copied())
        .collect();
    let model = load(bytes, &shape, what)?;
    let x = Tensor::from_shape(&shape, sample).map_err(|e| tract_err(what, e))?;
    let mut t = Vec::with_capacity(runs);
    for k in 0..runs.max(1) + 3 {
        let s = std::time::Instant::now();
        model
            .run(tvec!(x.clone().into()))
            .map_err(|e| tract_err(what, e))?;
        if k >= 3 {
            t.push(s.elapsed().as_secs_f64() * 1e3);
        }
    }
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}

/// The first output, flattened, of a single-input model run on `ex` in batches of `batch`:
/// the input is f32 [batch, ...sample shape].
pub fn run_batched(
    bytes: &[u8],
    ex: &Examples,
    batch: usize,
    what: &str,
) -> Result<Vec<f32>, Error> {
    let per = ex.sample_len();
    let mut out = Vec::new();
    let mut cache: Option<(usize, Runnable)> = None;
    for start in (0..ex.len()).step_by(batch.max(1)) {
        let n = batch.max(1).min(ex.len() - start);
        if cache.as_ref().is_none_or(|(m, _)| *m != n) {
            let shape: Vec<usize> = std::iter::once(n)
                .chain(ex.sample_shape.iter().copied())
                .collect();
            cache = Some((n, load(bytes, &shape, what)?));
        }
        let Some((_, model)) = &cache else {
            unreachable!("just set")
        };
        let shape: Vec<usize> = std::iter::once(n)
            .chain(ex.sample_shape.iter().copied())
            .collect();
        let x = Tensor::from_shape(&shape, &ex.x[start * per..(start + n) * per])
            .map_err(|e| tract_err(what, e))?;
        let y = model.run(tvec!(x.into())).map_err(|e| tract_err(what, e))?;
        out.extend(to_vec(&y[0], what)?);
    }
    Ok(out)
}

/// Speech probabilities f32 [n] of Silero VAD (v5 ONNX: inputs `input` f32 [1, 576] = 64
/// context + 512 new samples, `state` f32 [2, 1, 128], `sr` i64 scalar; outputs `output`
/// f32 [1, 1], `stateN`) on consecutive windows of ONE recording, the state carried from
/// window to window as the model expects.
pub fn silero_stream(bytes: &[u8], windows: &Examples) -> Result<Vec<f32>, Error> {
    let what = "silero_vad.onnx";
    let specialised = silero_16k(bytes, what)?;
    let model = tract_onnx::onnx()
        .model_for_read(&mut &specialised[..])
        .and_then(|m| m.into_optimized())
        .and_then(|m| m.into_runnable())
        .map_err(|e| tract_err(what, format!("{e:#}")))?;
    let mut state = Tensor::zero::<f32>(&[2, 1, 128]).map_err(|e| tract_err(what, e))?;
    let mut out = Vec::with_capacity(windows.len());
    for i in 0..windows.len() {
        let x = Tensor::from_shape(&[1, 576], windows.sample(i)).map_err(|e| tract_err(what, e))?;
        let y = model
            .run(tvec!(x.into(), state.clone().into()))
            .map_err(|e| tract_err(what, e))?;
        out.push(to_vec(&y[0], what)?[0]);
        state = y[1].clone().into_tensor();
    }
    Ok(out)
}

/// Silero VAD specialised as the compiler does for the demo's VAD group: `sr` folded to
/// 16000 (which resolves its sample-rate `If`s, which tract cannot analyse with `sr` as
/// an input), `input` fixed to f32[1,576] and `state` to f32[2,1,128]; re-encoded.
fn silero_16k(bytes: &[u8], what: &str) -> Result<Vec<u8>, Error> {
    use edgefleet_compiler::onnx::{pb, specialise::specialise};
    use prost::Message as _;
    let mut m = pb::ModelProto::decode(bytes).map_err(|e| tract_err(what, e))?;
    let shapes = [("input", vec![1, 576]), ("state", vec![2, 1, 128])]
        .map(|(k, v)| (k.to_string(), v))
        .into();
    let consts = [(
        "sr".to_string(),
        edgefleet_compiler::onnx::specialise::ConstValue::Scalar(16_000.0),
    )]
    .into();
    specialise(
        &mut m,
        std::path::Path::new(what),
        &shapes,
        &consts,
        &Default::default(),
    )
    .map_err(|e| tract_err(what, e))?;
    Ok(m.encode_to_vec())
}

/// Predicted classes from a task's ONNX output: text direction `probs` f32 [n, 2] -> argmax;
/// VAD `speech` f32 [n] or [n, 1] -> `p >= 0.5`.
pub fn classes_from_output(task: Task, out: &[f32]) -> Vec<i64> {
    match task {
        Task::TextDirection => crate::train::argmax_rows(out, 2),
        Task::Vad => out.iter().map(|&p| i64::from(p >= 0.5)).collect(),
    }
}
