//! ONNX protobuf handling: decode/encode with tract's prost types, tensor
//! helpers, structural checks, and specialisation ([`specialise`]).

pub mod specialise;

use std::collections::HashSet;
use std::path::Path;

use prost::Message as _;
pub use tract_onnx::pb;
use tract_onnx::pb::tensor_proto::DataType;

use crate::Error;

/// Decodes an ONNX model and checks it is structurally usable.
///
/// # Errors
/// [`Error::Decode`] for garbage or truncated bytes or a model without a graph.
pub fn decode(bytes: &[u8], path: &Path) -> Result<pb::ModelProto, Error> {
    let dec = |reason: String| Error::Decode {
        path: path.to_owned(),
        reason,
    };
    if bytes.is_empty() {
        return Err(dec("file is empty".into()));
    }
    let m = pb::ModelProto::decode(bytes).map_err(|e| dec(e.to_string()))?;
    let Some(g) = m.graph.as_ref() else {
        return Err(dec("no graph".into()));
    };
    if g.node.is_empty() || g.output.is_empty() {
        return Err(dec(format!(
            "graph has {} node(s) and {} output(s)",
            g.node.len(),
            g.output.len()
        )));
    }
    if m.ir_version <= 0 || m.opset_import.is_empty() {
        return Err(dec(format!(
            "ir_version {} with {} opset import(s)",
            m.ir_version,
            m.opset_import.len()
        )));
    }
    Ok(m)
}

/// Encodes a model to protobuf bytes.
pub fn encode(m: &pb::ModelProto) -> Vec<u8> {
    m.encode_to_vec()
}

/// The graph of a decoded model (checked present by [`decode`]).
pub fn graph(m: &pb::ModelProto) -> &pb::GraphProto {
    static EMPTY: std::sync::OnceLock<pb::GraphProto> = std::sync::OnceLock::new();
    m.graph
        .as_ref()
        .unwrap_or_else(|| EMPTY.get_or_init(pb::GraphProto::default))
}

/// Mutable graph of a decoded model.
pub fn graph_mut(m: &mut pb::ModelProto) -> &mut pb::GraphProto {
    m.graph.get_or_insert_with(pb::GraphProto::default)
}

/// Display name of a node: its name, else its first output.
pub fn node_name(n: &pb::NodeProto) -> String {
    if !n.name.is_empty() {
        n.name.clone()
    } else {
        n.output
            .first()
            .cloned()
            .unwrap_or_else(|| n.op_type.clone())
    }
}

/// Index of the node producing each value name in `g` (top level only).
pub fn producers(g: &pb::GraphProto) -> std::collections::HashMap<&str, usize> {
    g.node
        .iter()
        .enumerate()
        .flat_map(|(i, n)| n.output.iter().map(move |o| (o.as_str(), i)))
        .collect()
}

/// Element count of a tensor's dims.
pub fn numel(t: &pb::TensorProto) -> usize {
    t.dims.iter().map(|&d| d.max(0) as usize).product()
}

/// f32 contents of a float tensor (`float_data` or `raw_data`); `None` for other types.
///
/// # Errors
/// [`Error::Tensor`] when the stored data does not match the dims or is external.
pub fn tensor_f32(t: &pb::TensorProto, path: &Path) -> Result<Option<Vec<f32>>, Error> {
    if t.data_type != DataType::Float as i32 {
        return Ok(None);
    }
    let bad = |reason: String| Error::Tensor {
        path: path.to_owned(),
        tensor: t.name.clone(),
        reason,
    };
    if !t.external_data.is_empty() {
        return Err(bad(
            "external data is not supported; embed the weights in the .onnx file".into(),
        ));
    }
    let n = numel(t);
    let v: Vec<f32> = if !t.raw_data.is_empty() {
        if t.raw_data.len() != n * 4 {
            return Err(bad(format!(
                "raw_data has {} bytes, dims {:?} need {}",
                t.raw_data.len(),
                t.dims,
                n * 4
            )));
        }
        t.raw_data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    } else {
        if t.float_data.len() != n {
            return Err(bad(format!(
                "float_data has {} values, dims {:?} need {n}",
                t.float_data.len(),
                t.dims
            )));
        }
        t.float_data.clone()
    };
    Ok(Some(v))
}

/// A float tensor stored as raw little-endian bytes.
pub fn f32_tensor(name: &str, dims: &[i64], data: &[f32]) -> pb::TensorProto {
    pb::TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: DataType::Float as i32,
        raw_data: data.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ..Default::default()
    }
}

/// An int8 tensor stored as raw bytes.
pub fn i8_tensor(name: &str, dims: &[i64], data: &[i8]) -> pb::TensorProto {
    pb::TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: DataType::Int8 as i32,
        raw_data: data.iter().map(|&x| x as u8).collect(),
        ..Default::default()
    }
}

/// A `Cast(to = float)` node from `input` to `output` (how stored int8/f16
/// weights and integer inputs are read as f32).
pub fn cast_to_float(input: &str, output: &str, name: String) -> pb::NodeProto {
    pb::NodeProto {
        input: vec![input.to_string()],
        output: vec![output.to_string()],
        name,
        op_type: "Cast".into(),
        attribute: vec![pb::AttributeProto {
            name: "to".into(),
            r#type: pb::attribute_proto::AttributeType::Int as i32,
            i: DataType::Float as i64,
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// A scalar (or given-dims) constant of `data_type` holding `value` (converted).
pub fn scalar_tensor(
    name: &str,
    data_type: i32,
    dims: &[i64],
    value: f64,
) -> Option<pb::TensorProto> {
    const_tensor(name, data_type, dims, &[value])
}

/// A constant tensor of `values` (row-major) with the given ONNX element
/// type and dims; `None` for an element type it cannot encode (float,
/// double, int64, int32, bool are supported).
pub fn const_tensor(
    name: &str,
    data_type: i32,
    dims: &[i64],
    values: &[f64],
) -> Option<pb::TensorProto> {
    let enc: fn(f64) -> Vec<u8> = match DataType::try_from(data_type).ok()? {
        DataType::Float => |v| (v as f32).to_le_bytes().to_vec(),
        DataType::Double => |v| v.to_le_bytes().to_vec(),
        DataType::Int64 => |v| (v as i64).to_le_bytes().to_vec(),
        DataType::Int32 => |v| (v as i32).to_le_bytes().to_vec(),
        DataType::Bool => |v| vec![u8::from(v != 0.0)],
        _ => return None,
    };
    let raw: Vec<u8> = values.iter().flat_map(|&v| enc(v)).collect();
    Some(pb::TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type,
        raw_data: raw,
        ..Default::default()
    })
}

/// A node attribute by name.
pub fn attr<'a>(n: &'a pb::NodeProto, name: &str) -> Option<&'a pb::AttributeProto> {
    n.attribute.iter().find(|a| a.name == name)
}

/// Integer attribute with a default.
pub fn attr_i(n: &pb::NodeProto, name: &str, default: i64) -> i64 {
    attr(n, name).map_or(default, |a| a.i)
}

/// Calls `f` on every node of the graph and of all nested subgraphs.
pub fn visit_nodes<'a>(g: &'a pb::GraphProto, f: &mut dyn FnMut(&'a pb::NodeProto)) {
    for n in &g.node {
        f(n);
        for a in &n.attribute {
            if let Some(sg) = &a.g {
                visit_nodes(sg, f);
            }
            for sg in &a.graphs {
                visit_nodes(sg, f);
            }
        }
    }
}

/// Refuses operators tract cannot run: any non-default domain (com.microsoft
/// contrib ops such as QLinearAdd) and any op tract's ONNX front-end does not register.
///
/// # Errors
/// [`Error::UnsupportedOp`] naming the first offending node.
pub fn check_ops(m: &pb::ModelProto, path: &Path) -> Result<(), Error> {
    let reg = tract_onnx::onnx().op_register;
    let mut bad: Option<Error> = None;
    visit_nodes(graph(m), &mut |n| {
        if bad.is_some() {
            return;
        }
        let std_domain = n.domain.is_empty() || n.domain == "ai.onnx";
        if !std_domain || !reg.0.contains_key(&n.op_type) {
            bad = Some(Error::UnsupportedOp {
                path: path.to_owned(),
                node: node_name(n),
                op: n.op_type.clone(),
                domain: if n.domain.is_empty() {
                    "ai.onnx".into()
                } else {
                    n.domain.clone()
                },
            });
        }
    });
    bad.map_or(Ok(()), Err)
}

/// Refuses nodes that read undefined tensors (missing initializers), checking
/// subgraphs against their enclosing scopes.
///
/// # Errors
/// [`Error::MissingTensor`] naming the node and tensor.
pub fn check_references(m: &pb::ModelProto, path: &Path) -> Result<(), Error> {
    fn walk(g: &pb::GraphProto, outer: &HashSet<String>, path: &Path) -> Result<(), Error> {
        let mut known: HashSet<String> = outer.clone();
        known.extend(g.input.iter().map(|i| i.name.clone()));
        known.extend(g.initializer.iter().map(|i| i.name.clone()));
        for n in &g.node {
            known.extend(n.output.iter().cloned());
        }
        for n in &g.node {
            for i in n.input.iter().filter(|s| !s.is_empty()) {
                if !known.contains(i) {
                    return Err(Error::MissingTensor {
                        path: path.to_owned(),
                        node: node_name(n),
                        tensor: i.clone(),
                    });
                }
            }
            for a in &n.attribute {
                for sg in a.g.iter().chain(a.graphs.iter()) {
                    walk(sg, &known, path)?;
                }
            }
        }
        for o in &g.output {
            if !known.contains(&o.name) {
                return Err(Error::MissingTensor {
                    path: path.to_owned(),
                    node: "<graph output>".into(),
                    tensor: o.name.clone(),
                });
            }
        }
        Ok(())
    }
    walk(graph(m), &HashSet::new(), path)
}

/// Refuses float initializers holding NaN that a node reads.
///
/// Infinities are valid ONNX (the `-inf` start value of a running Max, a mask
/// of `-inf` before a Softmax) and pass; a NaN read by a node would reach the
/// outputs, while one in an initializer no node reads (dead) is harmless and
/// is dropped by specialisation.
///
/// # Errors
/// [`Error::NonFinite`] naming the initializer and its NaN count.
pub fn check_finite(m: &pb::ModelProto, path: &Path) -> Result<(), Error> {
    fn read_names<'a>(g: &'a pb::GraphProto, out: &mut HashSet<&'a str>) {
        for n in &g.node {
            out.extend(n.input.iter().map(String::as_str));
            for a in &n.attribute {
                if let Some(sg) = a.g.as_ref() {
                    read_names(sg, out);
                }
                for sg in &a.graphs {
                    read_names(sg, out);
                }
            }
        }
    }
    let mut read = HashSet::new();
    read_names(graph(m), &mut read);
    for t in graph(m)
        .initializer
        .iter()
        .filter(|t| read.contains(t.name.as_str()))
    {
        if let Some(v) = tensor_f32(t, path)? {
            let count = v.iter().filter(|x| x.is_nan()).count();
            if count > 0 {
                return Err(Error::NonFinite {
                    path: path.to_owned(),
                    tensor: t.name.clone(),
                    count,
                });
            }
        }
    }
    Ok(())
}

/// Names of graph inputs that are real inputs (not initializers).
pub fn real_inputs(g: &pb::GraphProto) -> Vec<&pb::ValueInfoProto> {
    let inits: HashSet<&str> = g.initializer.iter().map(|t| t.name.as_str()).collect();
    g.input
        .iter()
        .filter(|i| !inits.contains(i.name.as_str()))
        .collect()
}

/// Element type and dims (`None` for symbolic/unknown) of a value info.
pub fn value_type(v: &pb::ValueInfoProto) -> (i32, Vec<Option<i64>>) {
    use pb::tensor_shape_proto::dimension::Value as D;
    match v.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(pb::type_proto::Value::TensorType(t)) => {
            let dims = t
                .shape
                .as_ref()
                .map(|s| {
                    s.dim
                        .iter()
                        .map(|d| match &d.value {
                            Some(D::DimValue(v)) if *v > 0 => Some(*v),
                            _ => None,
                        })
                        .collect()
                })
                .unwrap_or_default();
            (t.elem_type, dims)
        }
        None => (0, vec![]),
    }
}

/// A value info of a tensor with fixed dims.
pub fn fixed_value_info(name: &str, elem_type: i32, dims: &[usize]) -> pb::ValueInfoProto {
    let dims: Vec<Option<usize>> = dims.iter().map(|&d| Some(d)).collect();
    value_info(name, elem_type, &dims)
}

/// A tensor value info of ONNX element type `elem_type`; `None` dimensions are symbolic,
/// named `N` (`dim_param`, ONNX IR spec "Static tensor shapes").
pub fn value_info(name: &str, elem_type: i32, dims: &[Option<usize>]) -> pb::ValueInfoProto {
    use pb::tensor_shape_proto::{dimension::Value as D, Dimension};
    let dim = dims
        .iter()
        .map(|d| Dimension {
            denotation: String::new(),
            value: Some(match d {
                Some(v) => D::DimValue(*v as i64),
                None => D::DimParam("N".into()),
            }),
        })
        .collect();
    pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            denotation: String::new(),
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type,
                shape: Some(pb::TensorShapeProto { dim }),
            })),
        }),
        doc_string: String::new(),
    }
}

/// Calls `f` on every node of the subgraphs held by `n`'s attributes (recursively).
pub fn visit_nodes_in_attrs<'a>(n: &'a pb::NodeProto, f: &mut dyn FnMut(&'a pb::NodeProto)) {
    for a in &n.attribute {
        for sg in a.g.iter().chain(a.graphs.iter()) {
            visit_nodes(sg, f);
        }
    }
}
