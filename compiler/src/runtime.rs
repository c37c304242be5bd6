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
        let out = self.plan.run(tv).map_err(|e| Error::runtime("run", e))?;
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

    /// Median wall time of `runs` calls (after one warm-up).
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
