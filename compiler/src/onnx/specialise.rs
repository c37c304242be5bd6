//! Specialisation for one target: after it the graph has fixed input shapes,
//! no constant inputs, no constant-condition `If`, no `Constant` nodes and no
//! metadata, so tract loads it and later passes see every weight as an initializer.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use tract_onnx::pb;
use tract_onnx::prelude::*;

use super::{
    attr, check_ops, const_tensor, fixed_value_info, graph, graph_mut, node_name, real_inputs,
    value_type,
};
use crate::Error;

/// What specialisation did, for the compile report.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SpecialiseReport {
    /// Input name -> fixed shape.
    pub inputs: BTreeMap<String, Vec<usize>>,
    /// Inputs whose symbolic leading (batch) dimension was fixed to 1 because neither
    /// `--input` nor the profile gave a shape.
    pub batch_defaulted: Vec<String>,
    /// Inputs folded into constants.
    pub folded_consts: BTreeMap<String, ConstValue>,
    /// `If` nodes resolved (node name -> branch taken).
    pub resolved_ifs: Vec<(String, String)>,
    /// Constant nodes turned into initializers.
    pub constants_to_initializers: usize,
    /// Nodes removed because no output depends on them.
    pub dead_nodes_removed: usize,
    /// Metadata entries and doc strings dropped.
    pub metadata_dropped: usize,
    /// Initializers that were also listed as graph inputs (IR version < 4
    /// lists every weight there) and are now constants only.
    pub initializer_inputs_removed: usize,
}

/// Specialises `m` in place.
///
/// `shapes` and `consts` are the resolved user flags merged over the profile
/// (flags win); every symbolic input dimension must be fixed by them, except a symbolic
/// leading (batch) dimension, which defaults to 1 (recorded in
/// [`SpecialiseReport::batch_defaulted`]).
///
/// # Errors
/// [`Error::Shape`] for an unresolved dimension or a flag naming no input,
/// [`Error::UnsupportedOp`] when an op the runtime lacks remains.
pub fn specialise(
    m: &mut pb::ModelProto,
    path: &Path,
    shapes: &BTreeMap<String, Vec<usize>>,
    consts: &BTreeMap<String, ConstValue>,
    strict_names: &HashSet<String>,
) -> Result<SpecialiseReport, Error> {
    let mut rep = SpecialiseReport {
        metadata_dropped: strip_metadata(m),
        initializer_inputs_removed: initializers_not_inputs(graph_mut(m)),
        ..Default::default()
    };
    fold_consts(m, path, consts, strict_names, &mut rep)?;
    fix_shapes(m, path, shapes, strict_names, &mut rep)?;
    rep.constants_to_initializers += constants_to_initializers(graph_mut(m));
    // Design: resolve one `If` at a time in graph order; inlining a branch can
    // expose nested `If`s whose conditions become constant in turn.
    let mut unresolvable: HashSet<String> = HashSet::new();
    loop {
        let g = graph(m);
        let Some(idx) = g
            .node
            .iter()
            .position(|n| n.op_type == "If" && !unresolvable.contains(&node_name(n)))
        else {
            break;
        };
        let node = g.node[idx].clone();
        match probe_const_bool(m, &node.input[0]) {
            Some(cond) => {
                inline_if(graph_mut(m), idx, cond, path)?;
                rep.resolved_ifs.push((
                    node_name(&node),
                    if cond { "then_branch" } else { "else_branch" }.into(),
                ));
                rep.constants_to_initializers += constants_to_initializers(graph_mut(m));
            }
            None => {
                unresolvable.insert(node_name(&node));
            }
        }
    }
    rep.dead_nodes_removed = remove_dead(graph_mut(m));
    check_ops(m, path)?;
    Ok(rep)
}

/// Removes graph inputs that name an initializer; returns how many.
///
/// Design: models of IR version < 4 must list every initializer as a graph
/// input too (ONNX IR spec, "Graphs": since IR 4 an initializer need not be an
/// input). For the runtime such an input is a weight with a default, and once
/// the weight is stored int8 (renamed behind a `DequantizeLinear`) tract would
/// expect it at run time. On a device the weights are fixed: they become
/// constants only.
fn initializers_not_inputs(g: &mut pb::GraphProto) -> usize {
    let inits: HashSet<String> = g.initializer.iter().map(|t| t.name.clone()).collect();
    let before = g.input.len();
    g.input.retain(|i| !inits.contains(&i.name));
    before - g.input.len()
}

/// Drops doc strings, metadata_props and value_info (tract re-infers shapes;
/// stale value_info on symbolic dims and huge metadata strings broke loading).
fn strip_metadata(m: &mut pb::ModelProto) -> usize {
    fn strip_graph(g: &mut pb::GraphProto) -> usize {
        let mut n = g.value_info.len() + usize::from(!g.doc_string.is_empty());
        g.value_info.clear();
        g.doc_string.clear();
        for node in &mut g.node {
            n += usize::from(!node.doc_string.is_empty());
            node.doc_string.clear();
            for a in &mut node.attribute {
                if let Some(sg) = a.g.as_mut() {
                    n += strip_graph(sg);
                }
                for sg in &mut a.graphs {
                    n += strip_graph(sg);
                }
            }
        }
        n
    }
    let mut n =
        m.metadata_props.len() + usize::from(!m.doc_string.is_empty()) + m.training_info.len();
    m.metadata_props.clear();
    m.doc_string.clear();
    m.training_info.clear();
    if let Some(g) = m.graph.as_mut() {
        n += strip_graph(g);
    }
    n
}

fn fold_consts(
    m: &mut pb::ModelProto,
    path: &Path,
    consts: &BTreeMap<String, ConstValue>,
    strict: &HashSet<String>,
    rep: &mut SpecialiseReport,
) -> Result<(), Error> {
    let g = graph_mut(m);
    for (name, value) in consts {
        let bad = |reason: String| Error::Shape {
            path: path.into(),
            input: name.clone(),
            reason,
        };
        let Some(pos) = g.input.iter().position(|i| &i.name == name) else {
            if strict.contains(name) {
                return Err(bad("--const names no model input".into()));
            }
            continue;
        };
        let (elem, dims) = value_type(&g.input[pos]);
        let (values, dims) = const_dims(value, &dims).map_err(bad)?;
        check_const_fits(elem, &values).map_err(bad)?;
        let t = const_tensor(name, elem, &dims, &values).ok_or_else(|| {
            bad(format!(
                "cannot fold a constant of ONNX element type {elem}"
            ))
        })?;
        g.input.remove(pos);
        g.initializer.retain(|i| &i.name != name);
        g.initializer.push(t);
        rep.folded_consts.insert(name.clone(), value.clone());
    }
    Ok(())
}

/// A `--const` value: a scalar (`sr=16000`) or a tensor's elements in
/// row-major order (`shape=1,3,224,224`, for shape tensors and other small
/// constant inputs).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum ConstValue {
    /// One value, for an input whose every dimension is 1 (or a scalar).
    Scalar(f64),
    /// The elements, for an input with as many elements (a rank-1 input
    /// with an unknown length takes the list's).
    Tensor(Vec<f64>),
}

/// The values of a constant and the dims of its initializer, from the
/// input's declared dims.
///
/// # Errors
/// A message when the count does not match the input's shape.
fn const_dims(value: &ConstValue, dims: &[Option<i64>]) -> Result<(Vec<f64>, Vec<i64>), String> {
    match value {
        ConstValue::Scalar(v) => {
            if dims.iter().any(|d| d.is_some_and(|d| d != 1)) {
                return Err(format!(
                    "a scalar folds only into an input of one element, this one has dims {dims:?}: give its {} values as a list",
                    dims.iter().flatten().product::<i64>()
                ));
            }
            Ok((vec![*v], dims.iter().map(|_| 1).collect()))
        }
        ConstValue::Tensor(vs) => {
            let n = vs.len() as i64;
            let dims: Vec<i64> = match dims {
                [None] => vec![n],
                d if d.iter().all(Option::is_some) => d.iter().flatten().copied().collect(),
                d => return Err(format!("a list folds only into an input of fixed shape (or rank 1), this one has dims {d:?}")),
            };
            let want: i64 = dims.iter().product();
            if want != n {
                return Err(format!(
                    "--const has {n} values, the input's shape {dims:?} holds {want}"
                ));
            }
            Ok((vs.clone(), dims))
        }
    }
}

/// Checks that every value fits the ONNX element type: integers (exact up
/// to 2^53 in an f64) in their type's range, bool 0 or 1, floats finite in f32.
///
/// # Errors
/// A message naming the first value that does not fit.
fn check_const_fits(elem: i32, values: &[f64]) -> Result<(), String> {
    use pb::tensor_proto::DataType;
    for &value in values {
        let int_in = |lo: f64, hi: f64| value.fract() == 0.0 && (lo..=hi).contains(&value);
        let fits = value.is_finite()
            && match DataType::try_from(elem) {
                Ok(DataType::Int64) => int_in(-9.007e15, 9.007e15),
                Ok(DataType::Int32) => int_in(f64::from(i32::MIN), f64::from(i32::MAX)),
                Ok(DataType::Bool) => value == 0.0 || value == 1.0,
                Ok(DataType::Float) => value.abs() <= f64::from(f32::MAX),
                _ => true,
            };
        if !fits {
            return Err(format!(
                "--const value {value} does not fit the input's ONNX element type {elem} ({})",
                DataType::try_from(elem).map_or("unknown".into(), |t| format!("{t:?}"))
            ));
        }
    }
    Ok(())
}

fn fix_shapes(
    m: &mut pb::ModelProto,
    path: &Path,
    shapes: &BTreeMap<String, Vec<usize>>,
    strict: &HashSet<String>,
    rep: &mut SpecialiseReport,
) -> Result<(), Error> {
    let g = graph_mut(m);
    let names: HashSet<String> = real_inputs(g).iter().map(|i| i.name.clone()).collect();
    for n in shapes.keys() {
        if strict.contains(n) && !names.contains(n) {
            return Err(Error::Shape {
                path: path.into(),
                input: n.clone(),
                reason: format!(
                    "--input names no model input (inputs: {})",
                    names.iter().cloned().collect::<Vec<_>>().join(", ")
                ),
            });
        }
    }
    for vi in g.input.iter_mut().filter(|i| names.contains(&i.name)) {
        let (elem, dims) = value_type(vi);
        let fixed: Vec<usize> = match shapes.get(&vi.name) {
            Some(s) => {
                if !dims.is_empty() && s.len() != dims.len() {
                    return Err(Error::Shape {
                        path: path.into(),
                        input: vi.name.clone(),
                        reason: format!(
                            "shape {s:?} has rank {}, the model declares rank {}",
                            s.len(),
                            dims.len()
                        ),
                    });
                }
                for (i, (want, have)) in s.iter().zip(&dims).enumerate() {
                    if let Some(h) = have {
                        if *h as usize != *want {
                            return Err(Error::Shape {
                                path: path.into(),
                                input: vi.name.clone(),
                                reason: format!(
                                    "dimension {i} is fixed to {h} by the model, {want} was asked"
                                ),
                            });
                        }
                    }
                }
                s.clone()
            }
            None => {
                // A symbolic leading (batch) dimension means batch 1: a device infers one
                // input at a time. Any other symbolic dimension must be fixed explicitly.
                let batch_symbolic = dims.first().is_some_and(Option::is_none);
                if let Some(i) = dims.iter().skip(1).position(Option::is_none) {
                    let i = i + 1;
                    return Err(Error::Shape {
                        path: path.into(),
                        input: vi.name.clone(),
                        reason: format!(
                            "dimension {i} is symbolic and neither --input nor the target profile fixes it (pass --input {}=D0,D1,...)",
                            vi.name
                        ),
                    });
                }
                if batch_symbolic {
                    rep.batch_defaulted.push(vi.name.clone());
                }
                dims.iter().map(|d| d.unwrap_or(1) as usize).collect()
            }
        };
        *vi = fixed_value_info(&vi.name, elem, &fixed);
        rep.inputs.insert(vi.name.clone(), fixed);
    }
    Ok(())
}

/// Turns top-level `Constant` nodes into initializers. Returns how many.
pub fn constants_to_initializers(g: &mut pb::GraphProto) -> usize {
    let mut n = 0;
    let mut keep = Vec::with_capacity(g.node.len());
    for node in std::mem::take(&mut g.node) {
        if node.op_type == "Constant" && node.output.len() == 1 {
            if let Some(t) = constant_value(&node) {
                let mut t = t;
                t.name = node.output[0].clone();
                g.initializer.push(t);
                n += 1;
                continue;
            }
        }
        keep.push(node);
    }
    g.node = keep;
    n
}

fn constant_value(node: &pb::NodeProto) -> Option<pb::TensorProto> {
    use pb::tensor_proto::DataType;
    let a = node.attribute.first()?;
    if node.attribute.len() != 1 {
        return None;
    }
    let t = |dt: DataType, dims: Vec<i64>, raw: Vec<u8>| pb::TensorProto {
        dims,
        data_type: dt as i32,
        raw_data: raw,
        ..Default::default()
    };
    match a.name.as_str() {
        "value" => a.t.clone(),
        "value_float" => Some(t(DataType::Float, vec![], a.f.to_le_bytes().to_vec())),
        "value_int" => Some(t(DataType::Int64, vec![], a.i.to_le_bytes().to_vec())),
        "value_floats" => Some(t(
            DataType::Float,
            vec![a.floats.len() as i64],
            a.floats.iter().flat_map(|x| x.to_le_bytes()).collect(),
        )),
        "value_ints" => Some(t(
            DataType::Int64,
            vec![a.ints.len() as i64],
            a.ints.iter().flat_map(|x| x.to_le_bytes()).collect(),
        )),
        _ => None,
    }
}

/// Evaluates `name` at compile time if it depends only on initializers and
/// on the (now fixed) shapes of inputs: tract types and declutters the
/// sub-graph producing it and reports it constant or not.
fn probe_const_bool(m: &pb::ModelProto, name: &str) -> Option<bool> {
    let g = graph(m);
    let producer = super::producers(g);
    let mut needed: HashSet<usize> = HashSet::new();
    let mut stack = vec![name.to_string()];
    let mut seen: HashSet<String> = HashSet::new();
    while let Some(t) = stack.pop() {
        if !seen.insert(t.clone()) {
            continue;
        }
        if let Some(&i) = producer.get(t.as_str()) {
            let n = &g.node[i];
            if n.op_type == "If" || n.op_type == "Loop" || n.op_type == "Scan" {
                return None;
            }
            needed.insert(i);
            stack.extend(n.input.iter().filter(|s| !s.is_empty()).cloned());
        }
    }
    let nodes: Vec<pb::NodeProto> = g
        .node
        .iter()
        .enumerate()
        .filter(|(i, _)| needed.contains(i))
        .map(|(_, n)| n.clone())
        .collect();
    let inits = g
        .initializer
        .iter()
        .filter(|t| seen.contains(&t.name))
        .cloned()
        .collect();
    let inputs = g
        .input
        .iter()
        .filter(|t| seen.contains(&t.name))
        .cloned()
        .collect();
    let probe = pb::ModelProto {
        graph: Some(pb::GraphProto {
            node: nodes,
            initializer: inits,
            input: inputs,
            output: vec![pb::ValueInfoProto {
                name: name.into(),
                ..Default::default()
            }],
            name: "probe".into(),
            ..Default::default()
        }),
        ..m.clone_without_graph()
    };
    let parsed = tract_onnx::onnx().parse(&probe, None).ok()?;
    let typed = parsed.model.into_typed().ok()?.into_decluttered().ok()?;
    let fact = typed.output_fact(0).ok()?;
    let k = fact.konst.as_ref()?;
    let k = k.cast_to::<bool>().ok()?;
    k.to_plain_array_view::<bool>().ok()?.iter().next().copied()
}

trait CloneWithoutGraph {
    fn clone_without_graph(&self) -> pb::ModelProto;
}
impl CloneWithoutGraph for pb::ModelProto {
    fn clone_without_graph(&self) -> pb::ModelProto {
        pb::ModelProto {
            ir_version: self.ir_version,
            opset_import: self.opset_import.clone(),
            producer_name: self.producer_name.clone(),
            ..Default::default()
        }
    }
}

fn rename_in_graph(g: &mut pb::GraphProto, from: &str, to: &str) {
    for n in &mut g.node {
        for s in n.input.iter_mut().chain(n.output.iter_mut()) {
            if s == from {
                *s = to.into();
            }
        }
        for a in &mut n.attribute {
            for sg in a.g.iter_mut().chain(a.graphs.iter_mut()) {
                rename_in_graph(sg, from, to);
            }
        }
    }
    for o in &mut g.output {
        if o.name == from {
            o.name = to.into();
        }
    }
}

/// Replaces the `If` at `idx` by the nodes of the branch taken; the branch's
/// outputs are renamed to the `If`'s outputs (an Identity is added where the
/// branch output is not produced inside the branch).
fn inline_if(g: &mut pb::GraphProto, idx: usize, cond: bool, path: &Path) -> Result<(), Error> {
    let node = g.node[idx].clone();
    let branch_name = if cond { "then_branch" } else { "else_branch" };
    let mut branch = attr(&node, branch_name)
        .and_then(|a| a.g.clone())
        .ok_or_else(|| Error::Decode {
            path: path.into(),
            reason: format!("If node `{}` has no {branch_name}", node_name(&node)),
        })?;
    let existing: HashSet<String> = g
        .node
        .iter()
        .flat_map(|n| n.output.iter().cloned())
        .chain(g.initializer.iter().map(|t| t.name.clone()))
        .chain(g.input.iter().map(|t| t.name.clone()))
        .collect();
    // Design: names produced inside the branch must not shadow outer names once
    // inlined; exporters keep them unique (SSA), but make sure.
    let inner: Vec<String> = branch
        .node
        .iter()
        .flat_map(|n| n.output.iter().cloned())
        .chain(branch.initializer.iter().map(|t| t.name.clone()))
        .filter(|s| !s.is_empty())
        .collect();
    let prefix = format!("{}/{branch_name}/", node_name(&node));
    for s in inner.iter().filter(|s| existing.contains(*s)) {
        let new = format!("{prefix}{s}");
        rename_in_graph(&mut branch, s, &new);
        for t in branch.initializer.iter_mut().filter(|t| &t.name == s) {
            t.name = new.clone();
        }
    }
    let produced: HashSet<String> = branch
        .node
        .iter()
        .flat_map(|n| n.output.iter().cloned())
        .collect();
    let mut extra = Vec::new();
    let outs: Vec<String> = branch.output.iter().map(|o| o.name.clone()).collect();
    for (b_out, if_out) in outs.iter().zip(&node.output) {
        if if_out.is_empty() {
            continue;
        }
        if produced.contains(b_out) && outs.iter().filter(|o| *o == b_out).nth(1).is_none() {
            rename_in_graph(&mut branch, b_out, if_out);
        } else {
            extra.push(pb::NodeProto {
                input: vec![b_out.clone()],
                output: vec![if_out.clone()],
                name: format!("{prefix}identity/{if_out}"),
                op_type: "Identity".into(),
                ..Default::default()
            });
        }
    }
    g.initializer.extend(branch.initializer);
    let mut nodes = branch.node;
    nodes.extend(extra);
    g.node.splice(idx..=idx, nodes);
    Ok(())
}

/// Removes nodes and initializers no graph output depends on.
fn remove_dead(g: &mut pb::GraphProto) -> usize {
    let mut live: HashSet<String> = g.output.iter().map(|o| o.name.clone()).collect();
    let mut keep = vec![false; g.node.len()];
    for (i, n) in g.node.iter().enumerate().rev() {
        if n.output.iter().any(|o| live.contains(o)) {
            keep[i] = true;
            live.extend(n.input.iter().cloned());
            let mut closure = Vec::new();
            super::visit_nodes_in_attrs(n, &mut |sub| closure.extend(sub.input.iter().cloned()));
            live.extend(closure);
        }
    }
    let before = g.node.len();
    let mut it = keep.iter();
    g.node.retain(|_| *it.next().unwrap_or(&true));
    g.initializer.retain(|t| live.contains(&t.name));
    before - g.node.len()
}
