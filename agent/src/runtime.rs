//! Loads a compiled model from a slot per its `model.json` and runs it.
//!
//! NNEF archives load with tract-nnef (plus tract's ONNX operator extensions,
//! the same framework the compiler writes with): no ONNX parser is needed on
//! the device for them. ONNX files load with tract-onnx and the fixed shapes
//! from the spec.

use edgefleet_bundle::tract as conv;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use edgefleet_bundle::payload::{
    GoldenVectors, ModelFormat, ModelSpec, Tensor, TensorData, TensorSpec, GOLDEN, MODEL_SPEC,
};
use edgefleet_protocol::messages::ReleaseRef;
use tract_nnef::internal as tp;
use tract_nnef::internal::{Framework as _, TractResult};

/// Runtime errors.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The slot could not be loaded.
    #[error("load {release}: {reason}")]
    Load {
        /// Release being loaded.
        release: String,
        /// What failed.
        reason: String,
    },
    /// The request does not fit the model.
    #[error("bad input: {0}")]
    BadInput(String),
    /// tract failed at run time.
    #[error("inference failed: {0}")]
    Inference(String),
}

/// Why a self-test failed (maps onto rollback reason codes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SelfTestError {
    /// An output differs from golden beyond tolerance (`golden_mismatch`).
    Mismatch(String),
    /// An output is NaN or infinite (`nan_output`).
    NonFinite(String),
    /// The model failed to run (`error_rate`).
    Run(String),
}

impl SelfTestError {
    /// The rollback reason code.
    pub fn code(&self) -> &'static str {
        match self {
            SelfTestError::Mismatch(_) => "golden_mismatch",
            SelfTestError::NonFinite(_) => "nan_output",
            SelfTestError::Run(_) => "error_rate",
        }
    }
    /// Detail text.
    pub fn detail(&self) -> &str {
        match self {
            SelfTestError::Mismatch(s) | SelfTestError::NonFinite(s) | SelfTestError::Run(s) => s,
        }
    }
}

/// How a model's matrix products run: on the calling inference thread, or on
/// a pool of `threads` threads shared by every loaded model (tract-linalg's
/// `multithread-mm` executor, a rayon pool). A target with several cores
/// (profile `cores`) answers one request faster on several; the pool is made
/// once at start so that loads and trials do not each spawn threads.
#[derive(Clone, Default)]
pub struct Compute {
    executor: Option<tract_linalg::multithread::Executor>,
    threads: usize,
}

impl Compute {
    /// `threads` threads per inference; 0 or 1 = the calling thread only.
    pub fn threads(threads: usize) -> Self {
        if threads <= 1 {
            return Self::default();
        }
        Compute {
            executor: Some(tract_linalg::multithread::Executor::multithread_with_name(
                threads, "infer-mm",
            )),
            threads,
        }
    }

    /// Threads one inference uses (1 without a pool).
    pub fn thread_count(&self) -> usize {
        self.threads.max(1)
    }
}

impl std::fmt::Debug for Compute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Compute({} threads)", self.thread_count())
    }
}

/// A loaded, optimised model of one release.
pub struct Model {
    /// The release.
    pub release: ReleaseRef,
    /// `model.json`.
    pub spec: ModelSpec,
    /// The directory the payload files were loaded from (a slot's `files/`):
    /// where the drift monitor finds `drift_reference.json`.
    pub dir: std::path::PathBuf,
    plan: Arc<tp::TypedRunnableModel>,
    golden: Option<GoldenVectors>,
    streams: Mutex<HashMap<String, Vec<TensorData>>>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("release", &self.release)
            .field("spec", &self.spec.name)
            .finish()
    }
}

/// Streams kept per model before the oldest is forgotten.
const MAX_STREAMS: usize = 1024;

/// The NNEF framework: tract core ops plus tract's ONNX extensions.
pub fn nnef_framework() -> tract_nnef::internal::Nnef {
    use tract_onnx::WithOnnx as _;
    tract_nnef::nnef().with_onnx()
}

impl Model {
    /// Loads the payload files in `dir` (a slot's `files/`), to run on the
    /// calling thread.
    ///
    /// # Errors
    /// [`RunError::Load`] naming the release and file.
    pub fn load(dir: &Path, release: ReleaseRef) -> Result<Self, RunError> {
        Self::load_on(dir, release, &Compute::default())
    }

    /// [`Model::load`] with its matrix products on `compute`.
    ///
    /// # Errors
    /// [`RunError::Load`] naming the release and file.
    pub fn load_on(dir: &Path, release: ReleaseRef, compute: &Compute) -> Result<Self, RunError> {
        let rel = format!("{}@{}", release.model, release.release);
        let fail = |reason: String| RunError::Load {
            release: rel.clone(),
            reason,
        };
        let read = |name: &str| {
            std::fs::read(dir.join(name))
                .map_err(|e| fail(format!("{}: {e}", dir.join(name).display())))
        };
        let spec = ModelSpec::from_json(&read(MODEL_SPEC)?).map_err(|e| fail(e.to_string()))?;
        let golden = match std::fs::read(dir.join(GOLDEN)) {
            Ok(b) => Some(GoldenVectors::from_json(&b).map_err(|e| fail(e.to_string()))?),
            Err(_) => None,
        };
        let model_path = dir.join(&spec.file);
        let typed: TractResult<tp::TypedModel> = match spec.format {
            ModelFormat::Nnef => nnef_framework().model_for_path(&model_path),
            ModelFormat::Onnx => (|| {
                let mut m = tract_onnx::onnx().model_for_path(&model_path)?;
                for (i, t) in spec.inputs.iter().enumerate() {
                    let fact =
                        tp::TypedFact::dt_shape(conv::datum_type(t.dtype), t.shape.as_slice());
                    m.set_input_fact(i, fact.into())?;
                }
                use tract_onnx::prelude::{Framework as _, InferenceModelExt as _};
                m.into_typed()
            })(),
        };
        let plan = typed
            .and_then(|m| m.into_optimized())
            .and_then(|m| {
                m.into_runnable_with_options(&tp::RunOptions {
                    executor: compute.executor.clone(),
                    ..Default::default()
                })
            })
            .map_err(|e| fail(format!("{}: {e:#}", model_path.display())))?;
        Ok(Model {
            release,
            spec,
            dir: dir.to_path_buf(),
            plan,
            golden,
            streams: Mutex::new(HashMap::new()),
        })
    }

    /// Runs one call. Inputs are matched to the spec by name (state inputs
    /// may be omitted when `stream` is set: the agent feeds the stream's
    /// state, zeros at its start, and keeps the new state).
    ///
    /// # Errors
    /// [`RunError::BadInput`] or [`RunError::Inference`].
    pub fn run(&self, inputs: &[Tensor], stream: Option<&str>) -> Result<Vec<Tensor>, RunError> {
        let state = stream.and_then(|s| self.streams.lock().ok().and_then(|m| m.get(s).cloned()));
        let mut tv: tp::TVec<tp::TValue> = tp::tvec![];
        for (i, spec) in self.spec.inputs.iter().enumerate() {
            let binding = self.spec.state.iter().position(|b| b.input == spec.name);
            let given = inputs.iter().find(|t| t.name == spec.name).or_else(|| {
                // Positional when names are not given.
                inputs.get(i).filter(|t| t.name.is_empty())
            });
            let t = match (given, binding, stream) {
                (Some(t), None, _) | (Some(t), Some(_), None) => to_tract(t, spec)?,
                (_, Some(b), Some(_)) => match state.as_ref().and_then(|s| s.get(b)) {
                    Some(d) => to_tract(
                        &Tensor {
                            name: spec.name.clone(),
                            shape: spec.shape.clone(),
                            data: d.clone(),
                        },
                        spec,
                    )?,
                    None => zeros(spec),
                },
                (None, _, _) => {
                    return Err(RunError::BadInput(format!("missing input `{}`", spec.name)))
                }
            };
            tv.push(t.into());
        }
        let out = self
            .plan
            .run(tv)
            .map_err(|e| RunError::Inference(format!("{e:#}")))?;
        let mut res = Vec::with_capacity(out.len());
        for (o, spec) in out.iter().zip(&self.spec.outputs) {
            res.push(from_tract(o, &spec.name)?);
        }
        if let Some(s) = stream {
            if !self.spec.state.is_empty() {
                let next: Vec<TensorData> = self
                    .spec
                    .state
                    .iter()
                    .filter_map(|b| {
                        res.iter()
                            .find(|t| t.name == b.output)
                            .map(|t| t.data.clone())
                    })
                    .collect();
                if let Ok(mut m) = self.streams.lock() {
                    if m.len() >= MAX_STREAMS && !m.contains_key(s) {
                        m.clear();
                    }
                    m.insert(s.to_string(), next);
                }
            }
        }
        Ok(res)
    }

    /// Runs up to the model's batch size of single requests as one call
    /// (micro-batching along `spec.batch_axis`), padding with zeros.
    /// Falls back to one call per request when the model has no batch axis.
    ///
    /// # Errors
    /// As [`Model::run`], for the whole batch.
    pub fn run_batch(&self, reqs: &[Vec<Tensor>]) -> Vec<Result<Vec<Tensor>, RunError>> {
        let Some(axis) = self.spec.batch_axis else {
            return reqs.iter().map(|r| self.run(r, None)).collect();
        };
        if reqs.len() <= 1 {
            return reqs.iter().map(|r| self.run(r, None)).collect();
        }
        match self.run_stacked(reqs, axis) {
            Ok(v) => v.into_iter().map(Ok).collect(),
            Err(e) => reqs
                .iter()
                .map(|_| Err(RunError::Inference(e.to_string())))
                .collect(),
        }
    }

    fn run_stacked(&self, reqs: &[Vec<Tensor>], axis: usize) -> Result<Vec<Vec<Tensor>>, RunError> {
        let mut tv: tp::TVec<tp::TValue> = tp::tvec![];
        let mut batch = 0;
        for spec in &self.spec.inputs {
            batch = spec.shape.get(axis).copied().unwrap_or(1);
            if reqs.len() > batch {
                return Err(RunError::BadInput(format!(
                    "{} requests exceed batch {batch}",
                    reqs.len()
                )));
            }
            let mut one_spec = spec.clone();
            one_spec.shape[axis] = 1;
            let mut parts = Vec::with_capacity(batch);
            for r in reqs {
                let t = r
                    .iter()
                    .find(|t| t.name == spec.name)
                    .ok_or_else(|| RunError::BadInput(format!("missing input `{}`", spec.name)))?;
                parts.push(to_tract(t, &one_spec)?);
            }
            while parts.len() < batch {
                parts.push(zeros(&one_spec));
            }
            tv.push(
                tp::Tensor::stack_tensors(axis, &parts)
                    .map_err(|e| RunError::Inference(e.to_string()))?
                    .into(),
            );
        }
        let out = self
            .plan
            .run(tv)
            .map_err(|e| RunError::Inference(format!("{e:#}")))?;
        let mut res: Vec<Vec<Tensor>> = vec![Vec::new(); reqs.len()];
        for (o, spec) in out.iter().zip(&self.spec.outputs) {
            for (i, r) in res.iter_mut().enumerate() {
                let s = o
                    .slice(axis, i, i + 1)
                    .map_err(|e| RunError::Inference(e.to_string()))?;
                r.push(from_tract(&s, &spec.name)?);
            }
        }
        let _ = batch;
        Ok(res)
    }

    /// Runs the golden vectors; also rejects NaN/Inf outputs.
    ///
    /// # Errors
    /// [`SelfTestError`].
    pub fn self_test(&self) -> Result<(), SelfTestError> {
        let Some(g) = &self.golden else { return Ok(()) };
        for (ci, case) in g.cases.iter().enumerate() {
            let out = self
                .run(&case.inputs, None)
                .map_err(|e| SelfTestError::Run(format!("case {ci}: {e}")))?;
            check_finite(&out).map_err(|e| SelfTestError::NonFinite(format!("case {ci}: {e}")))?;
            for (got, want) in out.iter().zip(&case.outputs) {
                // Compared as f32 whatever the output type (the compiler
                // writes golden outputs as f32; integers are exact there).
                let (a, b) = (got.data.to_f32(), want.data.to_f32());
                if a.len() != b.len() {
                    return Err(SelfTestError::Mismatch(format!(
                        "case {ci} output `{}`: {} elements, golden has {}",
                        want.name,
                        a.len(),
                        b.len()
                    )));
                }
                for (j, (x, y)) in a.iter().zip(b).enumerate() {
                    if (x - y).abs() > g.max_abs_error + g.rel_error * y.abs() {
                        return Err(SelfTestError::Mismatch(format!(
                            "case {ci} output `{}`[{j}]: got {x}, golden {y}",
                            want.name
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    /// Inputs of the first golden case (for warm-up and synthetic probes).
    pub fn golden_inputs(&self) -> Option<Vec<Tensor>> {
        self.golden
            .as_ref()
            .and_then(|g| g.cases.first())
            .map(|c| c.inputs.clone())
    }
}

/// Checks every f32 output element is finite.
///
/// # Errors
/// A message naming the output and index.
pub fn check_finite(out: &[Tensor]) -> Result<(), String> {
    for t in out {
        if let TensorData::F32(v) = &t.data {
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                return Err(format!("output `{}`[{i}] is {}", t.name, v[i]));
            }
        }
    }
    Ok(())
}

fn zeros(spec: &TensorSpec) -> tp::Tensor {
    conv::zeros(spec.dtype, &spec.shape)
}

fn to_tract(t: &Tensor, spec: &TensorSpec) -> Result<tp::Tensor, RunError> {
    if t.shape != spec.shape {
        return Err(RunError::BadInput(format!(
            "input `{}`: shape {:?}, the model wants {:?}",
            spec.name, t.shape, spec.shape
        )));
    }
    if t.data.dtype() != spec.dtype {
        return Err(RunError::BadInput(format!(
            "input `{}`: {} data, the model wants {}",
            spec.name,
            t.data.dtype(),
            spec.dtype
        )));
    }
    conv::to_tract(&t.data, &spec.shape)
        .map_err(|e| RunError::BadInput(format!("input `{}`: {e}", spec.name)))
}

fn from_tract(t: &tp::Tensor, name: &str) -> Result<Tensor, RunError> {
    let shape = t.shape().to_vec();
    let err =
        |e: tract_nnef::internal::TractError| RunError::Inference(format!("output `{name}`: {e}"));
    // In the output's own type (as `model.json` declares it); types no
    // payload carries are cast to f32.
    let data = conv::from_tract(t).map_err(err)?;
    Ok(Tensor {
        name: name.to_string(),
        shape,
        data,
    })
}
