//! Turns a tract failure into one a model author can act on: the ONNX node
//! tract names, its operator, the graph inputs it depends on, and what to do.
//!
//! tract names the node it failed on in its error chain as `#INDEX "NAME"
//! OP` (for example `Failed analyse for node #7 "Reshape_2" Reshape`); the
//! name is the ONNX node's name, sometimes with a `.suffix` tract added
//! while decluttering.

use std::collections::{BTreeSet, HashMap, HashSet};

use crate::onnx::{self, pb};
use crate::Error;

/// A tract failure located in the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFailure {
    /// Which model and step.
    pub context: String,
    /// The ONNX node's name.
    pub node: String,
    /// Its operator.
    pub op: String,
    /// The real graph inputs it depends on, sorted.
    pub inputs: Vec<String>,
    /// What to do.
    pub hint: String,
    /// tract's error chain, on one line.
    pub reason: String,
}

impl std::fmt::Display for NodeFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: node `{}` ({}) fails in tract; it depends on graph input(s) {}; {} (tract: {})",
            self.context,
            self.node,
            self.op,
            self.inputs
                .iter()
                .map(|i| format!("`{i}`"))
                .collect::<Vec<_>>()
                .join(", "),
            self.hint,
            self.reason
        )
    }
}

/// The node a tract error chain names, as `(name, op)`: the last `#N "NAME"
/// OP` in the chain (the innermost cause).
pub(crate) fn node_in(reason: &str) -> Option<(String, String)> {
    let mut found = None;
    let mut rest = reason;
    while let Some(i) = rest.find('#') {
        rest = &rest[i + 1..];
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let after = &rest[digits..];
        if digits == 0 || !after.starts_with(" \"") {
            continue;
        }
        let Some(end) = after[2..].find('"') else {
            continue;
        };
        let name = after[2..2 + end].to_string();
        let op = after[2 + end + 1..]
            .trim_start()
            .split(|c: char| !c.is_alphanumeric() && c != '_')
            .next()
            .unwrap_or_default()
            .to_string();
        found = Some((name, op));
    }
    found
}

/// The ONNX node tract's `name` refers to: the exact name, else the longest
/// node name that `name` extends with `.` (tract's suffixes).
fn find<'a>(g: &'a pb::GraphProto, name: &str) -> Option<&'a pb::NodeProto> {
    g.node
        .iter()
        .filter(|n| {
            let own = onnx::node_name(n);
            name == own
                || name
                    .strip_prefix(own.as_str())
                    .is_some_and(|s| s.starts_with('.'))
        })
        .max_by_key(|n| onnx::node_name(n).len())
}

/// The operands of `op` that tract needs as constants when it loads the
/// model (shapes, repeats, sizes, indices), by position (ONNX operator
/// specifications, opset 13+).
fn shape_operands(op: &str) -> &'static [usize] {
    match op {
        "Reshape" | "Expand" | "Tile" | "Pad" | "TopK" => &[1],
        "Resize" => &[1, 2, 3],
        "Slice" => &[1, 2, 3, 4],
        "ConstantOfShape" => &[0],
        "Range" => &[0, 1, 2],
        _ => &[],
    }
}

/// The real graph inputs (not initializers) the values `start` depend on,
/// through the nodes that produce them, sorted.
fn inputs_feeding(g: &pb::GraphProto, start: &[&str]) -> Vec<String> {
    let producers = onnx::producers(g);
    let real: HashSet<&str> = onnx::real_inputs(g)
        .into_iter()
        .map(|v| v.name.as_str())
        .collect();
    let mut out = BTreeSet::new();
    let mut seen = HashSet::new();
    let mut todo: Vec<&str> = start.to_vec();
    while let Some(v) = todo.pop() {
        if v.is_empty() || !seen.insert(v) {
            continue;
        }
        if real.contains(v) {
            out.insert(v.to_string());
        } else if let Some(&p) = producers.get(v) {
            todo.extend(g.node[p].input.iter().map(String::as_str));
        }
    }
    out.into_iter().collect()
}

/// What to do, from the words of tract's reason, the node's operator and
/// the graph inputs behind it (`shape_inputs`: those behind its shape-like
/// operands).
fn hint(
    reason: &str,
    op: &str,
    inputs: &[String],
    shape_inputs: &[String],
    shapes: &HashMap<&str, String>,
) -> String {
    let r = reason.to_ascii_lowercase();
    let first = inputs.first().map_or("NAME", String::as_str);
    let list = |names: &[String]| {
        names
            .iter()
            .map(|i| {
                format!(
                    "`{i}` {}",
                    shapes.get(i.as_str()).map_or("", String::as_str)
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    if r.contains("unimplemented") || r.contains("not supported") || r.contains("unsupported") {
        return format!(
            "tract 0.23 does not run this form of `{op}`: re-export the model with another \
             opset or rewrite the node with standard operators"
        );
    }
    if let Some(s) = shape_inputs.first() {
        return format!(
            "`{op}` reads a shape-like operand from {}, known only at run time, and tract \
             needs it when it loads the model: fold it with `--const {s}=V1,V2,...`",
            list(shape_inputs)
        );
    }
    if r.contains("inconsistent") || r.contains("unify") {
        return format!(
            "the shapes reaching it disagree: the shapes given for {} do not fit the model's \
             weights, or the model itself is inconsistent; check them against the model's \
             declared inputs (`--input {first}=D0,D1,...` overrides one)",
            list(inputs)
        );
    }
    if r.contains("datum") || r.contains("dtype") || r.contains(" type") {
        return format!(
            "a type disagrees: check the element type of {} against the model and the \
             calibration files given for it (their dtype must be the input's)",
            list(inputs)
        );
    }
    format!(
        "fix the shapes of the inputs it depends on ({}) with `--input {first}=D0,D1,...` \
         and fold shape-like inputs with `--const`; if it still fails, the node's attributes are \
         outside what tract runs",
        list(inputs)
    )
}

/// `e` made specific when it is a tract failure whose chain names a node of
/// `model`: [`Error::Node`] with the node, its operator, the graph inputs it
/// depends on and what to do. Any other error comes back as it was.
pub(crate) fn locate(e: Error, model: &pb::ModelProto) -> Error {
    let Error::Runtime { context, reason } = e else {
        return e;
    };
    let g = onnx::graph(model);
    let Some(node) = node_in(&reason).and_then(|(name, _)| find(g, &name)) else {
        return Error::Runtime { context, reason };
    };
    let all: Vec<&str> = node.input.iter().map(String::as_str).collect();
    let inputs = inputs_feeding(g, &all);
    let operands: Vec<&str> = shape_operands(&node.op_type)
        .iter()
        .filter_map(|&i| node.input.get(i).map(String::as_str))
        .collect();
    let shape_inputs = inputs_feeding(g, &operands);
    let shapes: HashMap<&str, String> = g
        .input
        .iter()
        .map(|v| {
            let (_, dims) = onnx::value_type(v);
            let dims: Vec<String> = dims
                .iter()
                .map(|d| d.map_or("?".into(), |d| d.to_string()))
                .collect();
            (v.name.as_str(), format!("[{}]", dims.join(",")))
        })
        .collect();
    Error::Node(Box::new(NodeFailure {
        context,
        node: onnx::node_name(node),
        op: node.op_type.clone(),
        hint: hint(&reason, &node.op_type, &inputs, &shape_inputs, &shapes),
        inputs,
        reason,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_innermost_node_of_a_chain_is_found() {
        let r = "Failed analyse for node #7 \"Reshape_2\" Reshape | Infering facts | \
                 Applying rule outputs[0].shape == 2 | in node #9 \"mm.inner\" MatMul";
        assert_eq!(node_in(r), Some(("mm.inner".into(), "MatMul".into())));
        assert_eq!(node_in("no node here # \"x\" y"), None);
        assert_eq!(node_in("#12"), None);
        assert_eq!(node_in("#3 \"unterminated"), None);
    }
}
