//! tract helpers: load a model (ONNX or NNEF) with fixed input facts, run it on
//! data of any [`DType`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use edgefleet_bundle::payload::{DType, TensorData, TensorSpec};
use edgefleet_bundle::tract as conv;
use tract_onnx::prelude::*;

use crate::Error;

/// A loaded, optimised model ready to run.
pub struct Runner {
    plan: Arc<TypedRunnableModel>,
    /// Inputs in call order.
    pub inputs: Vec<TensorSpec>,
    /// Outputs in model order.
    pub outputs: Vec<TensorSpec>,
}

/// Output of one call: one f32 buffer per output (other types are converted).
pub type Outputs = Vec<Vec<f32>>;

/// Input or output of a model, for [`spec_of`].
#[derive(Clone, Copy, PartialEq)]
enum Side {
    Input,
    Output,
}

/// The spec of one model input or output. An input must have a [`DType`];
/// an output of another type (u16, string) is read as f32.
fn spec_of(name: String, fact: &TypedFact, side: Side) -> Result<TensorSpec, String> {
    let shape = fact
        .shape
        .as_concrete()
        .ok_or_else(|| format!("`{name}` has a symbolic shape {:?}", fact.shape))?
        .to_vec();
    let dtype = match (conv::dtype_of(fact.datum_type), side) {
        (Some(d), _) => d,
        (None, Side::Output) => DType::F32,
        (None, Side::Input) => {
            return Err(format!(
                "`{name}` has element type {:?}; inputs must be one of {}",
                fact.datum_type,
                DType::ALL.map(|d| d.to_string()).join(", ")
            ))
        }
    };
    Ok(TensorSpec { name, dtype, shape })
}

impl Runner {
    /// Loads ONNX bytes under tract (the device runtime's ONNX path).
    ///
    /// # Errors
    /// [`Error::Runtime`] with `context` when tract refuses the model.
    pub fn onnx(bytes: &[u8], context: &str) -> Result<Self, Error> {
        let typed = onnx_typed(bytes, context)?;
        Self::from_typed(typed, context)
    }

    /// Loads an ONNX model as shipped (e.g. the original), giving inputs named
    /// like `specs` their fixed shape and type first (other inputs keep the model's facts).
    ///
    /// # Errors
    /// [`Error::Runtime`] with `context` when tract refuses the model.
    pub fn onnx_with_inputs(
        bytes: &[u8],
        specs: &[TensorSpec],
        context: &str,
    ) -> Result<Self, Error> {
        let mut m = tract_onnx::onnx()
            .model_for_read(&mut &bytes[..])
            .map_err(|e| Error::runtime(format!("{context}: parsing ONNX"), e))?;
        let outlets = m
            .input_outlets()
            .map_err(|e| Error::runtime(context, e))?
            .to_vec();
        for (ix, o) in outlets.iter().enumerate() {
            let name = m.node(o.node).name.clone();
            if let Some(s) = specs.iter().find(|s| s.name == name) {
                let fact = InferenceFact::dt_shape(conv::datum_type(s.dtype), s.shape.clone());
                m.set_input_fact(ix, fact)
                    .map_err(|e| Error::runtime(context, e))?;
            }
        }
        let typed = m
            .into_typed()
            .and_then(|t| t.into_decluttered())
            .map_err(|e| Error::runtime(format!("{context}: typing"), e))?;
        Self::from_typed(typed, context)
    }

    /// Loads a tract NNEF tar archive.
    ///
    /// # Errors
    /// [`Error::Runtime`] with `context`.
    pub fn nnef(bytes: &[u8], context: &str) -> Result<Self, Error> {
        let typed = nnef_framework()
            .model_for_read(&mut &bytes[..])
            .map_err(|e| Error::runtime(format!("{context}: loading NNEF"), e))?;
        Self::from_typed(typed, context)
    }

    fn from_typed(typed: TypedModel, context: &str) -> Result<Self, Error> {
        let mut inputs = Vec::new();
        for (i, o) in typed
            .input_outlets()
            .map_err(|e| Error::runtime(context, e))?
            .iter()
            .enumerate()
        {
            let fact = typed
                .outlet_fact(*o)
                .map_err(|e| Error::runtime(context, e))?;
            let name = typed.node(o.node).name.clone();
            inputs.push(
                spec_of(name, fact, Side::Input)
                    .map_err(|r| Error::runtime(format!("{context}: input {i}"), r))?,
            );
        }
        let mut outputs = Vec::new();
        for o in typed
            .output_outlets()
            .map_err(|e| Error::runtime(context, e))?
        {
            let fact = typed
                .outlet_fact(*o)
                .map_err(|e| Error::runtime(context, e))?;
            let name = typed
                .outlet_label(*o)
                .map(str::to_string)
                .unwrap_or_else(|| typed.node(o.node).name.clone());
            outputs.push(
                spec_of(name, fact, Side::Output)
                    .map_err(|r| Error::runtime(format!("{context}: output"), r))?,
            );
        }
        let plan = typed
            .into_optimized()
            .and_then(|m| m.into_runnable())
            .map_err(|e| Error::runtime(format!("{context}: optimising"), e))?;
        Ok(Runner {
            plan,
            inputs,
            outputs,
        })
    }

    /// Runs one call.
    ///
    /// # Errors
    /// [`Error::Runtime`] when tract fails or the data does not fit the inputs.
    pub fn run(&self, inputs: &[TensorData]) -> Result<Outputs, Error> {
        let out = self
            .plan
            .run(self.feed(inputs)?)
            .map_err(|e| Error::runtime("run", e))?;
        out.iter()
            .map(|t| {
                let t = t
                    .cast_to::<f32>()
                    .map_err(|e| Error::runtime("output", e))?;
                Ok(t.to_plain_array_view::<f32>()
                    .map_err(|e| Error::runtime("output", e))?
                    .iter()
                    .copied()
                    .collect())
            })
            .collect()
    }

    /// Median wall time of `runs` calls (after one warm-up) with `threads`
    /// threads for tract's matrix products (tract-linalg's `multithread-mm`
    /// executor, a rayon pool; 1 = the calling thread only), the way the agent
    /// runs on a target with that many cores.
    ///
    /// # Errors
    /// As [`Runner::run`].
    pub fn median_latency_on(
        &self,
        inputs: &[TensorData],
        runs: usize,
        threads: Threads,
    ) -> Result<Duration, Error> {
        if threads.0 <= 1 {
            return self.median_latency(inputs, runs);
        }
        tract_linalg::multithread::multithread_tract_scope(
            tract_linalg::multithread::Executor::multithread(threads.0),
            || self.median_latency(inputs, runs),
        )
    }

    /// Median wall time of `runs` calls (after one warm-up), on the calling thread.
    ///
    /// # Errors
    /// As [`Runner::run`].
    pub fn median_latency(&self, inputs: &[TensorData], runs: usize) -> Result<Duration, Error> {
        self.run(inputs)?;
        let mut ts = Vec::with_capacity(runs);
        for _ in 0..runs.max(1) {
            let t = Instant::now();
            self.run(inputs)?;
            ts.push(t.elapsed());
        }
        ts.sort();
        Ok(ts[ts.len() / 2])
    }
}

/// Threads the compiler times a model with: the target profile's `cores`, capped
/// at this machine's available parallelism (a 4-core profile timed on a 2-core
/// build machine runs on 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Threads(pub usize);

impl Threads {
    /// `cores` capped at [`std::thread::available_parallelism`] (1 when unknown).
    pub fn for_cores(cores: u32) -> Self {
        let machine = std::thread::available_parallelism().map_or(1, |n| n.get());
        Threads((cores as usize).clamp(1, machine))
    }
}

/// Time spent in one node of the optimised plan, summed over the profiled calls.
#[derive(Debug, Clone)]
pub struct NodeTime {
    /// The node's name in the optimised graph: the ONNX node it came from, with a
    /// `.suffix` when tract's optimiser split or rewrote it.
    pub name: String,
    /// tract's operator (kernel) name, for example `OptMatMul`, `Conv`, `Add`.
    pub op: String,
    /// Wall time in this node, summed over the profiled calls.
    pub total: Duration,
}

impl Runner {
    /// Checks the data against the inputs and converts it for tract.
    fn feed(&self, inputs: &[TensorData]) -> Result<TVec<TValue>, Error> {
        let mut tv: TVec<TValue> = tvec![];
        for (spec, d) in self.inputs.iter().zip(inputs) {
            if d.dtype() != spec.dtype {
                return Err(Error::runtime(
                    format!("input `{}`", spec.name),
                    format!("{} data for a {} input", d.dtype(), spec.dtype),
                ));
            }
            let t = conv::to_tract(d, &spec.shape)
                .map_err(|e| Error::runtime(format!("input `{}`", spec.name), e))?;
            tv.push(t.into());
        }
        Ok(tv)
    }

    /// Per-node wall time over `runs` calls (after one unprofiled warm-up), in
    /// plan order, for the per-op account of docs/performance.md (issue #19
    /// point 2). Each node is timed around its own evaluation, the way tract's
    /// own `--profile` does, so the sum is slightly below a call's wall time
    /// (the plan's bookkeeping between nodes is not in any node).
    ///
    /// # Errors
    /// As [`Runner::run`].
    pub fn profile(&self, inputs: &[TensorData], runs: usize) -> Result<Vec<NodeTime>, Error> {
        self.run(inputs)?;
        let model = self.plan.model();
        let mut totals = vec![Duration::ZERO; model.nodes().len()];
        let mut state = self
            .plan
            .spawn()
            .map_err(|e| Error::runtime("profile", e))?;
        for _ in 0..runs.max(1) {
            state
                .run_plan_with_eval(self.feed(inputs)?, |ctx, op_state, node, input| {
                    let t = Instant::now();
                    let r = tract_onnx::tract_core::plan::eval(ctx, op_state, node, input);
                    totals[node.id] += t.elapsed();
                    r
                })
                .map_err(|e| Error::runtime("profile", e))?;
        }
        Ok(self
            .plan
            .order_without_consts()
            .iter()
            .map(|&id| {
                let n = model.node(id);
                NodeTime {
                    name: n.name.clone(),
                    op: n.op().name().to_string(),
                    total: totals[id],
                }
            })
            .collect())
    }
}

/// ONNX bytes -> typed (not yet optimised) tract model.
///
/// # Errors
/// [`Error::Runtime`].
pub fn onnx_typed(bytes: &[u8], context: &str) -> Result<TypedModel, Error> {
    tract_onnx::onnx()
        .model_for_read(&mut &bytes[..])
        .map_err(|e| Error::runtime(format!("{context}: parsing ONNX"), e))?
        .into_typed()
        .map_err(|e| Error::runtime(format!("{context}: typing"), e))?
        .into_decluttered()
        .map_err(|e| Error::runtime(format!("{context}: decluttering"), e))
}

/// The NNEF framework the agent uses: tract core ops plus tract's ONNX extensions.
pub fn nnef_framework() -> tract_nnef::internal::Nnef {
    use tract_onnx::WithOnnx as _;
    tract_nnef::nnef().with_onnx()
}
