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

/// Element type of a tensor: the ONNX `TensorProto.DataType`s the device
/// runtime takes as model inputs and outputs (ONNX IR spec, "Tensor Element
/// Types").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// IEEE-754 binary32 (`FLOAT`).
    F32,
    /// IEEE-754 binary16 (`FLOAT16`).
    F16,
    /// IEEE-754 binary64 (`DOUBLE`).
    F64,
    /// Signed 8-bit integer (`INT8`).
    I8,
    /// Signed 16-bit integer (`INT16`).
    I16,
    /// Signed 32-bit integer (`INT32`).
    I32,
    /// Signed 64-bit integer (`INT64`).
    I64,
    /// Unsigned 8-bit integer (`UINT8`).
    U8,
    /// Boolean, one byte per element, 0 or 1 (`BOOL`).
    Bool,
}

impl DType {
    /// Every element type, in declaration order.
    pub const ALL: [DType; 9] = [
        DType::F32,
        DType::F16,
        DType::F64,
        DType::I8,
        DType::I16,
        DType::I32,
        DType::I64,
        DType::U8,
        DType::Bool,
    ];

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::I8 | DType::U8 | DType::Bool => 1,
            DType::F16 | DType::I16 => 2,
            DType::F32 | DType::I32 => 4,
            DType::F64 | DType::I64 => 8,
        }
    }

    /// Whether the type is an integer or bool (values are whole numbers).
    pub fn is_integer(self) -> bool {
        !matches!(self, DType::F32 | DType::F16 | DType::F64)
    }

    /// The smallest and largest value the type holds, as f64.
    pub fn limits(self) -> (f64, f64) {
        match self {
            DType::F32 => (f64::from(f32::MIN), f64::from(f32::MAX)),
            DType::F16 => (-65504.0, 65504.0),
            DType::F64 => (f64::MIN, f64::MAX),
            DType::I8 => (f64::from(i8::MIN), f64::from(i8::MAX)),
            DType::I16 => (f64::from(i16::MIN), f64::from(i16::MAX)),
            DType::I32 => (f64::from(i32::MIN), f64::from(i32::MAX)),
            DType::I64 => (i64::MIN as f64, i64::MAX as f64),
            DType::U8 => (0.0, 255.0),
            DType::Bool => (0.0, 1.0),
        }
    }

    /// The NumPy `descr` of the type in a `.npy` header (`<f4`, `|u1`, ...).
    pub fn npy_descr(self) -> &'static str {
        match self {
            DType::F32 => "<f4",
            DType::F16 => "<f2",
            DType::F64 => "<f8",
            DType::I8 => "|i1",
            DType::I16 => "<i2",
            DType::I32 => "<i4",
            DType::I64 => "<i8",
            DType::U8 => "|u1",
            DType::Bool => "|b1",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::F64 => "f64",
            DType::I8 => "i8",
            DType::I16 => "i16",
            DType::I32 => "i32",
            DType::I64 => "i64",
            DType::U8 => "u8",
            DType::Bool => "bool",
        };
        f.write_str(s)
    }
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
    /// f16 elements.
    F16(Vec<half::f16>),
    /// f64 elements.
    F64(Vec<f64>),
    /// i8 elements.
    I8(Vec<i8>),
    /// i16 elements.
    I16(Vec<i16>),
    /// i32 elements.
    I32(Vec<i32>),
    /// i64 elements.
    I64(Vec<i64>),
    /// u8 elements.
    U8(Vec<u8>),
    /// bool elements.
    Bool(Vec<bool>),
}

impl TensorData {
    /// The element type.
    pub fn dtype(&self) -> DType {
        match self {
            TensorData::F32(_) => DType::F32,
            TensorData::F16(_) => DType::F16,
            TensorData::F64(_) => DType::F64,
            TensorData::I8(_) => DType::I8,
            TensorData::I16(_) => DType::I16,
            TensorData::I32(_) => DType::I32,
            TensorData::I64(_) => DType::I64,
            TensorData::U8(_) => DType::U8,
            TensorData::Bool(_) => DType::Bool,
        }
    }

    /// Element count.
    pub fn len(&self) -> usize {
        match self {
            TensorData::F32(v) => v.len(),
            TensorData::F16(v) => v.len(),
            TensorData::F64(v) => v.len(),
            TensorData::I8(v) => v.len(),
            TensorData::I16(v) => v.len(),
            TensorData::I32(v) => v.len(),
            TensorData::I64(v) => v.len(),
            TensorData::U8(v) => v.len(),
            TensorData::Bool(v) => v.len(),
        }
    }

    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The elements as f32 (integers exactly up to 2^24, f64 rounded; bool as 0/1):
    /// for statistics and tolerance checks, never to feed a model.
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            TensorData::F32(v) => v.clone(),
            TensorData::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            TensorData::F64(v) => v.iter().map(|&x| x as f32).collect(),
            TensorData::I8(v) => v.iter().map(|&x| f32::from(x)).collect(),
            TensorData::I16(v) => v.iter().map(|&x| f32::from(x)).collect(),
            TensorData::I32(v) => v.iter().map(|&x| x as f32).collect(),
            TensorData::I64(v) => v.iter().map(|&x| x as f32).collect(),
            TensorData::U8(v) => v.iter().map(|&x| f32::from(x)).collect(),
            TensorData::Bool(v) => v.iter().map(|&x| f32::from(u8::from(x))).collect(),
        }
    }

    /// `values` in type `dtype`: integers rounded to nearest and saturated at
    /// the type's limits (NaN becomes 0), bool is `value != 0`.
    pub fn from_f32(dtype: DType, values: &[f32]) -> Self {
        fn int<T>(values: &[f32], lo: f64, hi: f64, cast: impl Fn(f64) -> T) -> Vec<T> {
            values
                .iter()
                .map(|&x| {
                    let x = f64::from(x);
                    cast(if x.is_nan() {
                        0.0
                    } else {
                        x.round().clamp(lo, hi)
                    })
                })
                .collect()
        }
        let (lo, hi) = dtype.limits();
        match dtype {
            DType::F32 => TensorData::F32(values.to_vec()),
            DType::F16 => TensorData::F16(values.iter().map(|&x| half::f16::from_f32(x)).collect()),
            DType::F64 => TensorData::F64(values.iter().map(|&x| f64::from(x)).collect()),
            DType::I8 => TensorData::I8(int(values, lo, hi, |x| x as i8)),
            DType::I16 => TensorData::I16(int(values, lo, hi, |x| x as i16)),
            DType::I32 => TensorData::I32(int(values, lo, hi, |x| x as i32)),
            DType::I64 => TensorData::I64(int(values, lo, hi, |x| x as i64)),
            DType::U8 => TensorData::U8(int(values, lo, hi, |x| x as u8)),
            DType::Bool => TensorData::Bool(values.iter().map(|&x| x != 0.0).collect()),
        }
    }

    /// Little-endian element bytes (bool: one byte, 0 or 1).
    pub fn to_le_bytes(&self) -> Vec<u8> {
        match self {
            TensorData::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TensorData::F16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TensorData::F64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TensorData::I8(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TensorData::I16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TensorData::I32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TensorData::I64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TensorData::U8(v) => v.clone(),
            TensorData::Bool(v) => v.iter().map(|&x| u8::from(x)).collect(),
        }
    }

    /// Elements of type `dtype` from little-endian bytes.
    ///
    /// # Errors
    /// A message when the length is not a multiple of the element size, or a
    /// bool byte is neither 0 nor 1.
    pub fn from_le_bytes(dtype: DType, b: &[u8]) -> Result<Self, String> {
        let n = dtype.size();
        if b.len() % n != 0 {
            return Err(format!(
                "{dtype} data length {} is not a multiple of {n} bytes",
                b.len()
            ));
        }
        fn arr<const N: usize>(c: &[u8]) -> [u8; N] {
            let mut a = [0u8; N];
            a.copy_from_slice(c);
            a
        }
        Ok(match dtype {
            DType::F32 => TensorData::F32(
                b.chunks_exact(4)
                    .map(|c| f32::from_le_bytes(arr(c)))
                    .collect(),
            ),
            DType::F16 => TensorData::F16(
                b.chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes(arr(c)))
                    .collect(),
            ),
            DType::F64 => TensorData::F64(
                b.chunks_exact(8)
                    .map(|c| f64::from_le_bytes(arr(c)))
                    .collect(),
            ),
            DType::I8 => TensorData::I8(b.iter().map(|&x| x as i8).collect()),
            DType::I16 => TensorData::I16(
                b.chunks_exact(2)
                    .map(|c| i16::from_le_bytes(arr(c)))
                    .collect(),
            ),
            DType::I32 => TensorData::I32(
                b.chunks_exact(4)
                    .map(|c| i32::from_le_bytes(arr(c)))
                    .collect(),
            ),
            DType::I64 => TensorData::I64(
                b.chunks_exact(8)
                    .map(|c| i64::from_le_bytes(arr(c)))
                    .collect(),
            ),
            DType::U8 => TensorData::U8(b.to_vec()),
            DType::Bool => TensorData::Bool(
                b.iter()
                    .enumerate()
                    .map(|(i, &x)| match x {
                        0 => Ok(false),
                        1 => Ok(true),
                        _ => Err(format!("bool element {i} is {x}, not 0 or 1")),
                    })
                    .collect::<Result<_, _>>()?,
            ),
        })
    }
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
        self.data.len()
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
        Repr {
            dtype: d.dtype(),
            data_b64: base64::engine::general_purpose::STANDARD.encode(d.to_le_bytes()),
        }
        .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<TensorData, D::Error> {
        use serde::de::Error as _;
        let r = Repr::deserialize(d)?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(r.data_b64.as_bytes())
            .map_err(D::Error::custom)?;
        TensorData::from_le_bytes(r.dtype, &bytes).map_err(D::Error::custom)
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
