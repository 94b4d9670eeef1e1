//! The parts of a folder as one graph, and the pruned graph cut back into
//! the parts.
//!
//! Joining renames every value and node of a file `dir/name.onnx` to
//! `dir/name/<original>`, except the values the file reads from outside:
//! its graph inputs keep their names and are shared by every file reading
//! one of that name (token ids feed a text encoder and a decoder alike), and
//! a decoder's `encoder_hidden_states` is made from the vision encoder's
//! output by an `Identity` (which belongs to neither file). The joined
//! graph is then what a single-file export of the same model would be, up
//! to names: the towers' outputs are its outputs, the interface is an edge.
//!
//! Splitting takes, for each file, every node its outputs need back to the
//! values it reads from outside, and renames them back. What no rewrite may
//! change is checked there: the type (width) of a value one file gives
//! another.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use prost::Message;

use super::FolderError;
use super::layout::{Part, Role, tensor_kind};
use crate::ir::Model;
use crate::onnx::proto::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, ValueInfoProto,
};

/// The name of a decoder input that the vision encoder's output feeds.
const ENCODER_STATES: &str = "encoder_hidden_states";

/// Name suffix of the `Identity` node that carries a wire.
const WIRE_NODE: &str = "/wire";

/// One file of a joined folder.
#[derive(Debug, Clone)]
pub struct Member {
    /// Relative to the folder.
    pub path: PathBuf,
    /// What it is.
    pub role: Role,
    /// Whether its weights were in external data files.
    pub external_data: bool,
    /// Prefix of its values and nodes in the joined graph.
    prefix: String,
    /// Its header (opsets, metadata), without the graph.
    header: ModelProto,
    /// Its graph's name, doc string, metadata, inputs and outputs; nodes,
    /// initializers and value infos come from the pruned graph.
    shell: GraphProto,
    /// Joined names of the values it reads from outside, with their names
    /// in the file.
    boundary: HashMap<String, String>,
    /// Joined names of its outputs, in order.
    outputs: Vec<String>,
}

impl Member {
    /// Name in the joined graph of this file's value `name`.
    pub fn joined_name(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }
}

/// A value one file gives another.
#[derive(Debug, Clone)]
pub struct Wire {
    /// Joined name of the producing file's output.
    pub value: String,
    /// Index of the producing member.
    pub from: usize,
    /// Index of the reading member.
    pub to: usize,
    /// The input it feeds, by its name in the reading file.
    pub input: String,
    /// That input's joined name: an `Identity` of `value` makes it. The
    /// reading file's nodes read it, not `value`, so a rewrite that
    /// reroutes the producing file's output (a dropped last block) cannot
    /// lead them into the producing file's graph.
    pub joined_input: String,
    /// The output's type when joined (what the reader was made for).
    ty: Option<crate::onnx::proto::TypeProto>,
}

/// How the parts of a folder were joined into one model.
#[derive(Debug, Clone)]
pub struct Joined {
    /// The files, in the order their nodes appear.
    pub members: Vec<Member>,
    /// Values one file gives another.
    pub wires: Vec<Wire>,
}

/// Joins `parts` (vision first, as [`super::scan`] orders them) into one
/// model; `root` names the folder in messages.
pub fn join(root: &Path, parts: &[Part]) -> Result<(Model, Joined), FolderError> {
    let misfit = |reason: String| FolderError::Misfit {
        root: root.to_path_buf(),
        reason,
    };
    let graphs: Vec<&GraphProto> = parts
        .iter()
        .map(|p| {
            p.file
                .proto
                .graph
                .as_ref()
                .ok_or_else(|| misfit(format!("{} has no graph", p.path.display())))
        })
        .collect::<Result<_, _>>()?;

    // Each file's inputs that are not constants.
    let real_inputs: Vec<Vec<&ValueInfoProto>> = graphs
        .iter()
        .map(|g| {
            let constants: HashSet<&str> = g.initializer.iter().map(|t| t.name()).collect();
            g.input
                .iter()
                .filter(|i| !constants.contains(i.name()))
                .collect()
        })
        .collect();

    let prefixes: Vec<String> = parts.iter().map(|p| prefix_of(&p.path)).collect();

    // A decoder's encoder states come from the vision encoder's output.
    let mut wires = Vec::new();
    for (to, part) in parts.iter().enumerate() {
        if part.role != Role::Decoder {
            continue;
        }
        let Some(input) = real_inputs[to].iter().find(|i| i.name() == ENCODER_STATES) else {
            continue;
        };
        let from = parts
            .iter()
            .position(|p| p.role == Role::Vision)
            .ok_or_else(|| {
                misfit(format!(
                    "{} reads {ENCODER_STATES}, and no vision encoder gives them",
                    part.path.display()
                ))
            })?;
        let output = encoder_output(graphs[from]).ok_or_else(|| {
            misfit(format!(
                "which output of {} is {}'s {ENCODER_STATES}? It has no last_hidden_state and not exactly one 3-D float output",
                parts[from].path.display(),
                part.path.display()
            ))
        })?;
        check_fits(output, input).map_err(|reason| {
            misfit(format!(
                "towers do not fit together: {}'s {ENCODER_STATES} {reason} {}'s {}",
                part.path.display(),
                parts[from].path.display(),
                output.name()
            ))
        })?;
        wires.push(Wire {
            value: format!("{}{}", prefixes[from], output.name()),
            from,
            to,
            input: ENCODER_STATES.to_string(),
            joined_input: format!("{}{ENCODER_STATES}", prefixes[to]),
            ty: output.r#type.clone(),
        });
    }

    // Shared inputs: one per name, the same element type in every file.
    let mut shared: Vec<ValueInfoProto> = Vec::new();
    let mut shared_from: HashMap<String, usize> = HashMap::new();
    for (i, inputs) in real_inputs.iter().enumerate() {
        for input in inputs {
            if wires.iter().any(|w| w.to == i && w.input == input.name()) {
                continue;
            }
            match shared_from.get(input.name()) {
                Some(&first) => {
                    let (a, b) = (tensor_kind(&shared[first]).0, tensor_kind(input).0);
                    if a != b {
                        return Err(misfit(format!(
                            "input '{}' has element type {a} in one file and {b} in {}",
                            input.name(),
                            parts[i].path.display()
                        )));
                    }
                }
                None => {
                    shared_from.insert(input.name().to_string(), shared.len());
                    shared.push((*input).clone());
                }
            }
        }
    }

    let mut joined = GraphProto {
        name: Some("joined".into()),
        input: shared.clone(),
        ..Default::default()
    };
    let mut members = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        let prefix = &prefixes[i];
        let mut boundary: HashMap<String, String> = HashMap::new();
        // Inputs shared by name keep it; a wired input gets the file's
        // prefix like its other values (an Identity of the wire makes it).
        let mut outside: HashMap<String, String> = HashMap::new();
        for input in &real_inputs[i] {
            let joined_name = match wires.iter().find(|w| w.to == i && w.input == input.name()) {
                Some(wire) => wire.joined_input.clone(),
                None => {
                    outside.insert(input.name().to_string(), input.name().to_string());
                    input.name().to_string()
                }
            };
            boundary.insert(joined_name, input.name().to_string());
        }
        let wired: HashSet<&str> = wires
            .iter()
            .filter(|w| w.to == i)
            .map(|w| w.input.as_str())
            .collect();
        let rename = |name: &str| -> String {
            if name.is_empty() {
                String::new()
            } else if let Some(joined_name) = outside.get(name) {
                joined_name.clone()
            } else {
                format!("{prefix}{name}")
            }
        };
        let mut graph = graphs[i].clone();
        // Inputs backed by initializers stay inputs (overridable constants).
        let constant_inputs: Vec<ValueInfoProto> = graph
            .input
            .iter()
            .filter(|v| !outside.contains_key(v.name()) && !wired.contains(v.name()))
            .cloned()
            .collect();
        rename_graph(&mut graph, &rename, prefix);
        let mut shell = graphs[i].clone();
        shell.node.clear();
        shell.initializer.clear();
        shell.sparse_initializer.clear();
        shell.value_info.clear();
        shell.quantization_annotation.clear();
        let outputs: Vec<String> = graph.output.iter().map(|o| o.name().to_string()).collect();
        for mut input in constant_inputs {
            input.name = Some(rename(input.name()));
            joined.input.push(input);
        }
        for wire in wires.iter().filter(|w| w.to == i) {
            joined.node.push(NodeProto {
                op_type: Some("Identity".into()),
                name: Some(format!("{}{WIRE_NODE}", wire.joined_input)),
                input: vec![wire.value.clone()],
                output: vec![wire.joined_input.clone()],
                ..Default::default()
            });
        }
        joined.node.append(&mut graph.node);
        joined.initializer.append(&mut graph.initializer);
        joined
            .sparse_initializer
            .append(&mut graph.sparse_initializer);
        joined.value_info.append(&mut graph.value_info);
        joined
            .quantization_annotation
            .append(&mut graph.quantization_annotation);
        joined.output.append(&mut graph.output);
        let mut header = part.file.proto.clone();
        header.graph = None;
        members.push(Member {
            path: part.path.clone(),
            role: part.role,
            external_data: !part.file.external_files.is_empty(),
            prefix: prefix.clone(),
            header,
            shell,
            boundary,
            outputs,
        });
    }

    let mut header = members[0].header.clone();
    header.opset_import = merged_opsets(&members).map_err(misfit)?;
    header.ir_version = members.iter().filter_map(|m| m.header.ir_version).max();
    header.functions = merged_functions(&members).map_err(misfit)?;
    if members.iter().any(|m| !m.header.training_info.is_empty()) {
        return Err(misfit(
            "a file holds training graphs; folders with training graphs are not pruned".into(),
        ));
    }
    header.graph = Some(joined);
    let model = Model::from_proto(header).map_err(|e| misfit(format!("joined graph: {e}")))?;
    Ok((model, Joined { members, wires }))
}

/// `onnx/vision_model.onnx` → `onnx/vision_model/`.
fn prefix_of(path: &Path) -> String {
    let mut prefix = path.with_extension("").to_string_lossy().into_owned();
    prefix.push('/');
    prefix
}

/// The vision encoder's output a decoder reads: `last_hidden_state`, or
/// the only 3-D float output.
fn encoder_output(graph: &GraphProto) -> Option<&ValueInfoProto> {
    if let Some(o) = graph
        .output
        .iter()
        .find(|o| o.name() == "last_hidden_state")
    {
        return Some(o);
    }
    let mut three_d = graph.output.iter().filter(|o| {
        let (elem, rank) = tensor_kind(o);
        matches!(elem, 1 | 10 | 11 | 16) && rank == Some(3)
    });
    match (three_d.next(), three_d.next()) {
        (Some(o), None) => Some(o),
        _ => None,
    }
}

/// Static sizes of a value's axes (`None` where symbolic or unknown).
fn static_dims(info: &ValueInfoProto) -> Option<Vec<Option<i64>>> {
    use crate::onnx::proto::{tensor_shape_proto::dimension, type_proto};
    match info.r#type.as_ref()?.value.as_ref()? {
        type_proto::Value::TensorType(t) => Some(
            t.shape
                .as_ref()?
                .dim
                .iter()
                .map(|d| match d.value {
                    Some(dimension::Value::DimValue(v)) if v > 0 => Some(v),
                    _ => None,
                })
                .collect(),
        ),
        _ => None,
    }
}

/// Whether `output` can feed `input`: same element type, same rank, and
/// no axis whose static sizes differ.
fn check_fits(output: &ValueInfoProto, input: &ValueInfoProto) -> Result<(), String> {
    let (a, b) = (tensor_kind(output).0, tensor_kind(input).0);
    if a != b && a != 0 && b != 0 {
        return Err(format!("have element type {b}, not the type {a} of"));
    }
    let (Some(out), Some(inp)) = (static_dims(output), static_dims(input)) else {
        return Ok(());
    };
    if out.len() != inp.len() {
        return Err(format!(
            "have rank {}, not the rank {} of",
            inp.len(),
            out.len()
        ));
    }
    let axes = ["batch", "tokens", "width"];
    for (axis, (x, y)) in out.iter().zip(&inp).enumerate() {
        if let (Some(x), Some(y)) = (x, y)
            && x != y
        {
            let what = axes.get(axis).copied().unwrap_or("size");
            return Err(format!("are {y} in {what} (axis {axis}), not the {x} of"));
        }
    }
    Ok(())
}

/// One opset version per domain across the files.
fn merged_opsets(members: &[Member]) -> Result<Vec<OperatorSetIdProto>, String> {
    let mut versions: BTreeMap<String, (i64, &Path)> = BTreeMap::new();
    for member in members {
        for opset in &member.header.opset_import {
            let domain = opset.domain().to_string();
            let version = opset.version();
            match versions.get(&domain) {
                Some(&(v, other)) if v != version => {
                    let shown = if domain.is_empty() {
                        "ai.onnx"
                    } else {
                        &domain
                    };
                    return Err(format!(
                        "{} uses opset {v} of {shown} and {} opset {version}; files pruned together need the same",
                        other.display(),
                        member.path.display()
                    ));
                }
                Some(_) => {}
                None => {
                    versions.insert(domain, (version, &member.path));
                }
            }
        }
    }
    // The first file's order, then what the others add.
    let mut merged: Vec<OperatorSetIdProto> = Vec::new();
    for member in members {
        for opset in &member.header.opset_import {
            if !merged.iter().any(|o| o.domain() == opset.domain()) {
                merged.push(opset.clone());
            }
        }
    }
    Ok(merged)
}

/// Model-local functions of all files; one definition per name.
fn merged_functions(members: &[Member]) -> Result<Vec<crate::onnx::proto::FunctionProto>, String> {
    let mut merged: Vec<crate::onnx::proto::FunctionProto> = Vec::new();
    for member in members {
        for function in &member.header.functions {
            let key = |f: &crate::onnx::proto::FunctionProto| {
                (
                    f.domain().to_string(),
                    f.name().to_string(),
                    f.overload().to_string(),
                )
            };
            match merged.iter().find(|f| key(f) == key(function)) {
                Some(other) if other.encode_to_vec() != function.encode_to_vec() => {
                    return Err(format!(
                        "function {}.{} is defined differently in two files",
                        function.domain(),
                        function.name()
                    ));
                }
                Some(_) => {}
                None => merged.push(function.clone()),
            }
        }
    }
    Ok(merged)
}

/// Renames every value of `graph` (and of its subgraphs) with `rename`,
/// and its nodes with `prefix`.
fn rename_graph(graph: &mut GraphProto, rename: &dyn Fn(&str) -> String, prefix: &str) {
    for node in &mut graph.node {
        rename_node(node, rename, prefix);
    }
    for tensor in &mut graph.initializer {
        tensor.name = Some(rename(tensor.name()));
    }
    for sparse in &mut graph.sparse_initializer {
        if let Some(values) = sparse.values.as_mut() {
            values.name = Some(rename(values.name()));
        }
    }
    for info in graph
        .input
        .iter_mut()
        .chain(&mut graph.output)
        .chain(&mut graph.value_info)
    {
        info.name = Some(rename(info.name()));
    }
    for annotation in &mut graph.quantization_annotation {
        annotation.tensor_name = Some(rename(annotation.tensor_name()));
        for entry in &mut annotation.quant_parameter_tensor_names {
            entry.value = Some(rename(entry.value()));
        }
    }
}

fn rename_node(node: &mut NodeProto, rename: &dyn Fn(&str) -> String, prefix: &str) {
    for name in node.input.iter_mut().chain(&mut node.output) {
        *name = rename(name);
    }
    if !node.name().is_empty() {
        node.name = Some(format!("{prefix}{}", node.name()));
    }
    for attribute in &mut node.attribute {
        rename_attribute(attribute, rename, prefix);
    }
}

fn rename_attribute(attribute: &mut AttributeProto, rename: &dyn Fn(&str) -> String, prefix: &str) {
    if let Some(g) = attribute.g.as_mut() {
        rename_graph(g, rename, prefix);
    }
    for g in &mut attribute.graphs {
        rename_graph(g, rename, prefix);
    }
}

/// Values a node reads: its inputs, and what its subgraphs read from
/// outside themselves.
fn reads(node: &NodeProto) -> Vec<String> {
    let mut read: Vec<String> = node
        .input
        .iter()
        .filter(|n| !n.is_empty())
        .cloned()
        .collect();
    read.extend(crate::ir::implicit_inputs(node));
    read
}

impl Joined {
    /// Cuts `model` (the joined model, rewritten) back into the files, in
    /// member order: each file's path and model.
    pub fn split(&self, model: &Model) -> Result<Vec<(PathBuf, ModelProto)>, FolderError> {
        let proto = model.to_proto();
        let graph = proto.graph.as_ref().expect("a model always has a graph");
        for wire in &self.wires {
            let now = graph.output.iter().find(|o| o.name() == wire.value);
            let changed = now.is_none_or(|o| o.r#type != wire.ty);
            if changed {
                return Err(FolderError::Split {
                    file: self.members[wire.from].path.clone(),
                    reason: format!(
                        "the rewrite changed output '{}', which {} reads as {}",
                        wire.value
                            .trim_start_matches(&self.members[wire.from].prefix),
                        self.members[wire.to].path.display(),
                        wire.input
                    ),
                });
            }
        }
        let mut producer: HashMap<&str, usize> = HashMap::new();
        for (i, node) in graph.node.iter().enumerate() {
            for output in node.output.iter().filter(|o| !o.is_empty()) {
                producer.insert(output, i);
            }
        }
        let initializer: HashMap<&str, usize> = graph
            .initializer
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name(), i))
            .collect();
        let sparse: HashMap<&str, usize> = graph
            .sparse_initializer
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.values.as_ref().map(|t| (t.name(), i)))
            .collect();
        let inputs: HashSet<&str> = graph.input.iter().map(|v| v.name()).collect();
        self.members
            .iter()
            .map(|member| {
                let fail = |reason: String| FolderError::Split {
                    file: member.path.clone(),
                    reason,
                };
                let mut nodes: Vec<usize> = Vec::new();
                let mut tensors: Vec<usize> = Vec::new();
                let mut sparse_tensors: Vec<usize> = Vec::new();
                let mut seen: HashSet<String> = HashSet::new();
                let mut pending: Vec<String> = member.outputs.clone();
                while let Some(value) = pending.pop() {
                    if member.boundary.contains_key(&value) || !seen.insert(value.clone()) {
                        continue;
                    }
                    if let Some(&n) = producer.get(value.as_str()) {
                        if !nodes.contains(&n) {
                            nodes.push(n);
                            pending.extend(reads(&graph.node[n]));
                        }
                    } else if let Some(&t) = initializer.get(value.as_str()) {
                        tensors.push(t);
                    } else if let Some(&s) = sparse.get(value.as_str()) {
                        sparse_tensors.push(s);
                    } else if inputs.contains(value.as_str()) {
                        return Err(fail(format!(
                            "it would read '{value}', an input of another file"
                        )));
                    } else {
                        return Err(fail(format!("'{value}' has no producer")));
                    }
                }
                nodes.sort_unstable();
                tensors.sort_unstable();
                sparse_tensors.sort_unstable();
                let back = |name: &str| -> String {
                    if let Some(original) = member.boundary.get(name) {
                        original.clone()
                    } else if let Some(original) = name.strip_prefix(member.prefix.as_str()) {
                        original.to_string()
                    } else {
                        name.to_string()
                    }
                };
                let mut part = member.shell.clone();
                part.node = nodes.iter().map(|&n| graph.node[n].clone()).collect();
                for node in &mut part.node {
                    rename_node(node, &back, "");
                    if let Some(name) = node.name.as_mut()
                        && let Some(original) = name.strip_prefix(member.prefix.as_str())
                    {
                        *name = original.to_string();
                    }
                }
                part.initializer = tensors
                    .iter()
                    .map(|&t| graph.initializer[t].clone())
                    .collect();
                part.sparse_initializer = sparse_tensors
                    .iter()
                    .map(|&s| graph.sparse_initializer[s].clone())
                    .collect();
                part.value_info = graph
                    .value_info
                    .iter()
                    .filter(|v| seen.contains(v.name()) && !member.boundary.contains_key(v.name()))
                    .cloned()
                    .collect();
                part.quantization_annotation = graph
                    .quantization_annotation
                    .iter()
                    .filter(|a| seen.contains(a.tensor_name()))
                    .cloned()
                    .collect();
                // Inputs: the ones read from outside, and constant inputs
                // the rewrite kept.
                part.input.retain(|i| {
                    member.boundary.values().any(|o| o == i.name())
                        || inputs.contains(member.joined_name(i.name()).as_str())
                });
                part.output = member
                    .outputs
                    .iter()
                    .map(|name| {
                        graph
                            .output
                            .iter()
                            .find(|o| o.name() == name)
                            .cloned()
                            .ok_or_else(|| fail(format!("output '{}' is gone", back(name))))
                    })
                    .collect::<Result<_, _>>()?;
                for tensor in &mut part.initializer {
                    tensor.name = Some(back(tensor.name()));
                }
                for s in &mut part.sparse_initializer {
                    if let Some(values) = s.values.as_mut() {
                        values.name = Some(back(values.name()));
                    }
                }
                for info in part.value_info.iter_mut().chain(&mut part.output) {
                    info.name = Some(back(info.name()));
                }
                for annotation in &mut part.quantization_annotation {
                    annotation.tensor_name = Some(back(annotation.tensor_name()));
                    for entry in &mut annotation.quant_parameter_tensor_names {
                        entry.value = Some(back(entry.value()));
                    }
                }
                check_unique(&part).map_err(&fail)?;
                let mut header = member.header.clone();
                add_used_opsets(&mut header, &part, &proto.opset_import);
                header.graph = Some(part);
                Ok((member.path.clone(), header))
            })
            .collect()
    }
}

/// Every value defined once after renaming back (a name a rewrite made
/// could meet a file's own name once its prefix is gone).
fn check_unique(graph: &GraphProto) -> Result<(), String> {
    let mut defined: HashSet<&str> = HashSet::new();
    let names = graph
        .input
        .iter()
        .map(|v| v.name())
        .filter(|n| !graph.initializer.iter().any(|t| t.name() == *n))
        .chain(graph.initializer.iter().map(|t| t.name()))
        .chain(
            graph
                .node
                .iter()
                .flat_map(|n| n.output.iter().map(String::as_str)),
        )
        .filter(|n| !n.is_empty());
    for name in names {
        if !defined.insert(name) {
            return Err(format!("two values would be named '{name}'"));
        }
    }
    Ok(())
}

/// Adds to `header` the opsets of domains `graph`'s nodes use that it does
/// not import (a rewrite may use a domain another file brought).
fn add_used_opsets(header: &mut ModelProto, graph: &GraphProto, joined: &[OperatorSetIdProto]) {
    for node in &graph.node {
        let domain = node.domain();
        if !header.opset_import.iter().any(|o| o.domain() == domain)
            && let Some(opset) = joined.iter().find(|o| o.domain() == domain)
        {
            header.opset_import.push(opset.clone());
        }
    }
}
