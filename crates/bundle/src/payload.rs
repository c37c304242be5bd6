//! The payload files a bundle carries and their schemas: the contract between
//! the compiler (which writes them) and the agent (which reads them).
//!
//! Every bundle built by `edgefleet compile` holds exactly these files at the
//! archive root (see docs/specs/bundle.md, section "Payload files"):
//!
//! | file | schema | who reads it |
//! |---|---|---|
//! | [`MODEL_SPEC`] `model.json` | [`ModelSpec`] | agent runtime: which model file, its tensors, stateful bindings |
//! | `model.nnef.tar` or `model.onnx` | tract NNEF archive or ONNX protobuf | agent runtime |
//! | [`GOLDEN`] `golden.json` | [`GoldenVectors`] | agent trial: self-test before a model may serve |
//! | [`DRIFT_REFERENCE`] `drift_reference.json` | `edgefleet_drift::ReferenceProfile` | agent drift monitor |
//! | [`REPORT_JSON`] `compile_report.json` | free-form JSON | operators |
//! | [`REPORT_TXT`] `compile_report.txt` | readable table | operators |

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::Error;

/// File name of the [`ModelSpec`] inside a bundle.
pub const MODEL_SPEC: &str = "model.json";
/// File name of the [`GoldenVectors`] inside a bundle.
pub const GOLDEN: &str = "golden.json";
/// File name of the drift reference profile (`edgefleet_drift::ReferenceProfile`).
pub const DRIFT_REFERENCE: &str = "drift_reference.json";
/// File name of the machine-readable compile report.
pub const REPORT_JSON: &str = "compile_report.json";
/// File name of the human-readable compile report.
pub const REPORT_TXT: &str = "compile_report.txt";

/// How the compiled model file is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelFormat {
    /// A tract NNEF tar archive (`model.nnef.tar`): loads without an ONNX parser.
    Nnef,
    /// A specialised ONNX protobuf (`model.onnx`), used where NNEF does not round-trip.
    Onnx,
}

/// Element type of a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// IEEE-754 binary32.
    F32,
    /// Signed 64-bit integer.
    I64,
}

/// Name, element type and fixed shape of one model input or output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpec {
    /// Tensor name as in the ONNX graph.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Fixed shape after specialisation (no symbolic dimensions on a device).
    pub shape: Vec<usize>,
}

impl TensorSpec {
    /// Number of elements (product of the shape; 1 for a scalar).
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    /// True when the shape has a zero dimension.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A recurrent state carried between calls: output `output` of call *n* feeds
/// input `input` of call *n+1* within one stream (Silero VAD's `state` -> `stateN`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateBinding {
    /// Model input that receives the state (zeros at the start of a stream).
    pub input: String,
    /// Model output that produces the next state.
    pub output: String,
}

/// What the model's first output means, for drift statistics and trial checks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Task {
    /// Output 0 holds one score per class along its last axis; argmax is the class.
    Classifier {
        /// Class labels, index = class id.
        labels: Vec<String>,
    },
    /// Any other output (probabilities, maps, sequences).
    Other,
}

/// Everything the agent runtime needs to load and call the compiled model
/// (`model.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// Model name, equal to the manifest's `model`.
    pub name: String,
    /// Encoding of the model file.
    pub format: ModelFormat,
    /// Model file name inside the bundle (`model.nnef.tar` or `model.onnx`).
    pub file: String,
    /// Inputs the caller supplies, in call order (state inputs included).
    pub inputs: Vec<TensorSpec>,
    /// Outputs, in model order.
    pub outputs: Vec<TensorSpec>,
    /// Recurrent state bindings kept per stream by the agent.
    #[serde(default)]
    pub state: Vec<StateBinding>,
    /// Meaning of output 0.
    pub task: Task,
    /// Index of the batch axis in every input and output, when the compiled
    /// model has a batch dimension greater than one; `None` disables micro-batching.
    #[serde(default)]
    pub batch_axis: Option<usize>,
}

impl ModelSpec {
    /// Parses `model.json`.
    ///
    /// # Errors
    /// [`Error::Payload`] naming the file when the JSON does not match the schema.
    pub fn from_json(bytes: &[u8]) -> Result<Self, Error> {
        serde_json::from_slice(bytes).map_err(|e| Error::Payload {
            file: MODEL_SPEC.into(),
            reason: e.to_string(),
        })
    }
}

/// Tensor contents, little-endian, base64-encoded in JSON.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    /// f32 elements.
    F32(Vec<f32>),
    /// i64 elements.
    I64(Vec<i64>),
}

/// A named tensor with data, as stored in golden vectors and sent to the local API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tensor {
    /// Tensor name.
    pub name: String,
    /// Shape (row-major).
    pub shape: Vec<usize>,
    /// Elements; their count must equal the product of `shape`.
    #[serde(flatten, with = "tensor_data_serde")]
    pub data: TensorData,
}

impl Tensor {
    /// An f32 tensor.
    pub fn f32(name: impl Into<String>, shape: Vec<usize>, data: Vec<f32>) -> Self {
        Self {
            name: name.into(),
            shape,
            data: TensorData::F32(data),
        }
    }
    /// Element count of the data (not of the shape).
    pub fn data_len(&self) -> usize {
        match &self.data {
            TensorData::F32(v) => v.len(),
            TensorData::I64(v) => v.len(),
        }
    }
    /// Checks that the data length equals the product of the shape.
    ///
    /// # Errors
    /// [`Error::Payload`] naming the tensor.
    pub fn check(&self) -> Result<(), Error> {
        let want: usize = self.shape.iter().product();
        if want != self.data_len() {
            return Err(Error::Payload {
                file: format!("tensor {}", self.name),
                reason: format!(
                    "shape {:?} needs {want} elements, data has {}",
                    self.shape,
                    self.data_len()
                ),
            });
        }
        Ok(())
    }
}

mod tensor_data_serde {
    use super::*;
    use serde::{Deserializer, Serializer};

    #[derive(Serialize, Deserialize)]
    struct Repr {
        dtype: DType,
        /// Little-endian element bytes, standard base64.
        data_b64: String,
    }

    pub fn serialize<S: Serializer>(d: &TensorData, s: S) -> Result<S::Ok, S::Error> {
        let (dtype, bytes) = match d {
            TensorData::F32(v) => (
                DType::F32,
                v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>(),
            ),
            TensorData::I64(v) => (
                DType::I64,
                v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>(),
            ),
        };
        Repr {
            dtype,
            data_b64: base64::engine::general_purpose::STANDARD.encode(bytes),
        }
        .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<TensorData, D::Error> {
        use serde::de::Error as _;
        let r = Repr::deserialize(d)?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(r.data_b64.as_bytes())
            .map_err(D::Error::custom)?;
        match r.dtype {
            DType::F32 => {
                if bytes.len() % 4 != 0 {
                    return Err(D::Error::custom(
                        "f32 data length is not a multiple of 4 bytes",
                    ));
                }
                Ok(TensorData::F32(
                    bytes
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect(),
                ))
            }
            DType::I64 => {
                if bytes.len() % 8 != 0 {
                    return Err(D::Error::custom(
                        "i64 data length is not a multiple of 8 bytes",
                    ));
                }
                Ok(TensorData::I64(
                    bytes
                        .chunks_exact(8)
                        .map(|c| {
                            i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])
                        })
                        .collect(),
                ))
            }
        }
    }
}

/// One self-test case: inputs and the outputs the compiled model produced for
/// them on the build machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GoldenCase {
    /// Inputs, one per [`ModelSpec::inputs`] entry, same order.
    pub inputs: Vec<Tensor>,
    /// Expected outputs, one per [`ModelSpec::outputs`] entry, same order.
    pub outputs: Vec<Tensor>,
}

/// Golden vectors for the on-device self-test (`golden.json`).
///
/// The device runs every case and compares each output element with
/// `|got - want| <= max_abs_error + rel_error * |want|`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GoldenVectors {
    /// Absolute tolerance per element.
    pub max_abs_error: f32,
    /// Relative tolerance per element.
    pub rel_error: f32,
    /// The cases (at least one).
    pub cases: Vec<GoldenCase>,
}

impl GoldenVectors {
    /// Parses `golden.json`.
    ///
    /// # Errors
    /// [`Error::Payload`] naming the file when the JSON does not match the schema
    /// or a tensor's data does not fit its shape.
    pub fn from_json(bytes: &[u8]) -> Result<Self, Error> {
        let g: Self = serde_json::from_slice(bytes).map_err(|e| Error::Payload {
            file: GOLDEN.into(),
            reason: e.to_string(),
        })?;
        for c in &g.cases {
            for t in c.inputs.iter().chain(&c.outputs) {
                t.check()?;
            }
        }
        Ok(g)
    }
}
