//! The compiler's error type: every variant names what it is about (file, node, tensor, metric).

use std::path::PathBuf;

/// Everything that can stop a compile. Nothing is written when one is returned.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The bytes are not an ONNX model (garbage, truncated, empty graph).
    #[error("{path}: not a valid ONNX model (garbage or truncated file?): {reason}")]
    Decode {
        /// The model file.
        path: PathBuf,
        /// What the decoder said.
        reason: String,
    },
    /// A node uses an operator the device runtime (tract) does not run.
    #[error("{path}: node `{node}` uses operator `{domain}::{op}`, which the device runtime (tract 0.23) does not support; re-export the model with standard ONNX operators")]
    UnsupportedOp {
        /// The model file.
        path: PathBuf,
        /// Node name (or its first output when unnamed).
        node: String,
        /// Operator type.
        op: String,
        /// Operator domain (`ai.onnx` for the default domain).
        domain: String,
    },
    /// A node reads a tensor nothing defines.
    #[error("{path}: node `{node}` reads tensor `{tensor}`, which is neither an input, an initializer nor a node output (missing initializer?)")]
    MissingTensor {
        /// The model file.
        path: PathBuf,
        /// Node name.
        node: String,
        /// Missing tensor name.
        tensor: String,
    },
    /// A weight that a node reads holds NaN values (infinities are valid).
    #[error("{path}: initializer `{tensor}` holds {count} NaN value(s), read by the graph; NaN weights make NaN outputs")]
    NonFinite {
        /// The model file.
        path: PathBuf,
        /// Initializer name.
        tensor: String,
        /// Number of bad values.
        count: usize,
    },
    /// A tensor's encoding is not something the compiler handles.
    #[error("{path}: tensor `{tensor}`: {reason}")]
    Tensor {
        /// The model file.
        path: PathBuf,
        /// Tensor name.
        tensor: String,
        /// Why.
        reason: String,
    },
    /// An input shape could not be fixed, or a flag names an input the model lacks.
    #[error("{path}: input `{input}`: {reason}")]
    Shape {
        /// The model file.
        path: PathBuf,
        /// Input name.
        input: String,
        /// Why.
        reason: String,
    },
    /// Calibration data is unreadable or does not fit the model.
    #[error("calibration file {file}: {reason}")]
    Calibration {
        /// The calibration file (or directory).
        file: PathBuf,
        /// Why.
        reason: String,
    },
    /// The compiled model is less accurate than the target allows.
    #[error("accuracy gate of target `{target}` failed: {metric} = {value:.6} violates threshold {threshold} ({detail}); nothing was written")]
    Gate {
        /// Target id.
        target: String,
        /// Failing metric: `max_abs_error`, `mean_cosine` or `top1_agreement`.
        metric: &'static str,
        /// Measured value.
        value: f64,
        /// The target's threshold.
        threshold: f64,
        /// Which candidate and where (output tensor).
        detail: String,
    },
    /// tract could not load or run a model.
    #[error("{context}: tract: {reason}")]
    Runtime {
        /// Which model and step.
        context: String,
        /// tract's error chain.
        reason: String,
    },
    /// tract failed on one node of the model: which, what it depends on, and
    /// what to do (from [`Error::Runtime`] where tract's chain names a node).
    #[error("{0}")]
    Node(Box<crate::explain::NodeFailure>),
    /// A requested option cannot be honoured for this model or target.
    #[error("{what}: {reason}")]
    Unsupported {
        /// The option.
        what: String,
        /// Why.
        reason: String,
    },
    /// Packing or writing the bundle failed.
    #[error("bundle: {0}")]
    Bundle(#[from] edgefleet_bundle::Error),
    /// Building the drift reference failed.
    #[error("drift reference: {0}")]
    Drift(String),
    /// The model does not fit a budget of the target profile.
    #[error("target `{target}`: {what} needs {need} bytes, over `{budget}` = {limit}; nothing was written")]
    Budget {
        /// Target id.
        target: String,
        /// The profile key (`ram_budget_bytes`, `storage_budget_bytes`).
        budget: &'static str,
        /// What needs the bytes (an input, the weights, the bundle).
        what: String,
        /// Bytes needed.
        need: u64,
        /// The profile's budget, bytes.
        limit: u64,
    },
}

impl Error {
    /// tract's error chain on one line (`{:#}`: causes, never a backtrace, whatever
    /// `RUST_BACKTRACE` says).
    pub(crate) fn runtime(context: impl Into<String>, e: impl std::fmt::Display) -> Self {
        Error::Runtime {
            context: context.into(),
            reason: format!("{e:#}").replace('\n', " | "),
        }
    }
}
