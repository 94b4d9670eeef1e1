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
//! A decoder language model reading `inputs_embeds` (transformers.js's
//! LLaVA-style layout) gets them from the token embedding file, after the
//! vision encoder's image features when the folder has one: the image
//! tokens first, then the text's (the layout of a prompt whose image comes
//! first). Its attention mask is then the text's with the image tokens
//! marked real in front, and its positions count the real tokens from 0,
//! as the generation loops of transformers and transformers.js make them.
//! These few nodes belong to no file.
//!
//! A merged decoder (`If` on `use_cache_branch`) is joined as its with-past
//! branch ([`crate::merged`]); its member keeps the rest, and the pipeline
//! puts the pruned branch back under the `If`.
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
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
    ValueInfoProto, type_proto,
};

/// The name of a decoder input that the vision encoder's output feeds.
const ENCODER_STATES: &str = "encoder_hidden_states";

/// The input of a decoder language model the token embeddings feed.
const INPUT_EMBEDS: &str = "inputs_embeds";

/// Name suffix of the `Identity` node that carries a wire.
const WIRE_NODE: &str = "/wire";

/// Prefix of the values and nodes that put image features before the
/// text's embeddings (no file's prefix can be it: file prefixes end in
/// `/` after a path, this one holds a `:`).
const PREFIX_GLUE: &str = "join:image_prefix/";

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
    /// For a merged decoder: the with-past branch that was joined (before
    /// any rewrite) and the rest of the file.
    pub merged: Option<Box<MergedMember>>,
}

/// A merged decoder of the folder, of which the with-past branch is joined.
#[derive(Debug, Clone)]
pub struct MergedMember {
    /// The with-past branch as read.
    pub with_past: Model,
    /// The rest of the file.
    pub merged: crate::merged::Merged,
}

impl Member {
    /// Name in the joined graph of this file's value `name`.
    pub fn joined_name(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// Whether `value`, a name in the joined graph, is one of this file's
    /// own values.
    pub fn owns(&self, value: &str) -> bool {
        value.starts_with(&self.prefix)
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
    // A merged decoder is joined as its with-past branch.
    let mut merged: Vec<Option<Box<MergedMember>>> = Vec::new();
    let mut lifted: Vec<Option<ModelProto>> = Vec::new();
    for part in parts {
        if crate::merged::is_merged(&part.file.proto) {
            let (with_past, rest) = crate::merged::split(part.file.proto.clone())
                .map_err(|e| misfit(format!("{}: {e}", part.path.display())))?;
            lifted.push(Some(with_past.to_proto()));
            merged.push(Some(Box::new(MergedMember {
                with_past,
                merged: rest,
            })));
        } else {
            lifted.push(None);
            merged.push(None);
        }
    }
    let protos: Vec<&ModelProto> = parts
        .iter()
        .zip(&lifted)
        .map(|(p, l)| l.as_ref().unwrap_or(&p.file.proto))
        .collect();
    let graphs: Vec<&GraphProto> = parts
        .iter()
        .zip(&protos)
        .map(|(p, proto)| {
            proto
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

    // Nodes of no file that make a member's inputs from other files'
    // outputs (placed before its nodes), the constants they read, and the
    // inputs so made, per member.
    let mut glue: Vec<Vec<NodeProto>> = vec![Vec::new(); parts.len()];
    let mut glue_tensors: Vec<TensorProto> = Vec::new();
    let mut made: Vec<HashSet<String>> = vec![HashSet::new(); parts.len()];

    // A decoder's encoder states come from the vision encoder's output.
    let mut wires = Vec::new();
    for (to, part, input) in readers(parts, &real_inputs, Role::Decoder, ENCODER_STATES) {
        let from = giver(parts, Role::Vision, part, ENCODER_STATES).map_err(misfit)?;
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
        let wire = Wire {
            value: format!("{}{}", prefixes[from], output.name()),
            from,
            to,
            input: ENCODER_STATES.to_string(),
            joined_input: format!("{}{ENCODER_STATES}", prefixes[to]),
            ty: output.r#type.clone(),
        };
        glue[to].push(identity(&wire.value, &wire.joined_input));
        made[to].insert(ENCODER_STATES.to_string());
        wires.push(wire);
    }

    // A language model's input embeddings: the image features, if the
    // folder has a vision encoder, then the token embeddings.
    let mut text_mask: Option<ValueInfoProto> = None;
    for (to, part, input) in readers(parts, &real_inputs, Role::Language, INPUT_EMBEDS) {
        let table = giver(parts, Role::Embeddings, part, INPUT_EMBEDS).map_err(misfit)?;
        let embeds = graphs[table]
            .output
            .iter()
            .find(|o| o.name() == INPUT_EMBEDS)
            .ok_or_else(|| {
                misfit(format!(
                    "{} gives no {INPUT_EMBEDS}",
                    parts[table].path.display()
                ))
            })?;
        check_fits(embeds, input).map_err(|reason| {
            misfit(format!(
                "files do not fit together: {}'s {INPUT_EMBEDS} {reason} {}'s",
                part.path.display(),
                parts[table].path.display()
            ))
        })?;
        let joined_input = format!("{}{INPUT_EMBEDS}", prefixes[to]);
        let text = format!("{}{INPUT_EMBEDS}", prefixes[table]);
        made[to].insert(INPUT_EMBEDS.to_string());
        wires.push(Wire {
            value: text.clone(),
            from: table,
            to,
            input: INPUT_EMBEDS.to_string(),
            joined_input: joined_input.clone(),
            ty: embeds.r#type.clone(),
        });
        let Some(from) = parts.iter().position(|p| p.role == Role::Vision) else {
            glue[to].push(identity(&text, &joined_input));
            continue;
        };
        let image = image_output(graphs[from]).ok_or_else(|| {
            misfit(format!(
                "which output of {} are the image features {} reads before the text? It has no image_features and not exactly one 3-D float output",
                parts[from].path.display(),
                part.path.display()
            ))
        })?;
        check_widths(image, embeds).map_err(|reason| {
            misfit(format!(
                "files do not fit together: {}'s {} {reason} {}'s {INPUT_EMBEDS}",
                parts[from].path.display(),
                image.name(),
                parts[table].path.display()
            ))
        })?;
        let image_value = format!("{}{}", prefixes[from], image.name());
        wires.push(Wire {
            value: image_value.clone(),
            from,
            to,
            input: INPUT_EMBEDS.to_string(),
            joined_input: joined_input.clone(),
            ty: image.r#type.clone(),
        });
        // The token ids the embeddings read (classified by them).
        let ids = real_inputs[table]
            .iter()
            .find(|i| i.name() == "input_ids")
            .or(real_inputs[table].first())
            .copied();
        let mask = real_inputs[to]
            .iter()
            .find(|i| i.name() == "attention_mask")
            .copied();
        let positions = real_inputs[to]
            .iter()
            .find(|i| i.name() == "position_ids")
            .copied();
        // The glue writes ones of the mask's type and counts positions in
        // theirs: integer tensors, as exporters declare them.
        for (what, info) in [("attention_mask", mask), ("position_ids", positions)] {
            if let Some(info) = info
                && !matches!(tensor_kind(info).0, 6 | 7)
            {
                return Err(misfit(format!(
                    "{}'s {what} has element type {}; image features are put before the text for int32 or int64 {what} only",
                    part.path.display(),
                    tensor_kind(info).0
                )));
            }
        }
        let prefix = ImagePrefix {
            image: &image_value,
            text: &text,
            embeds: &joined_input,
            mask: mask.map(|m| (format!("{}attention_mask", prefixes[to]), tensor_kind(m).0)),
            positions: positions
                .map(|p| (format!("{}position_ids", prefixes[to]), tensor_kind(p).0)),
        };
        let (nodes, tensors) = prefix.nodes();
        glue[to].extend(nodes);
        glue_tensors.extend(tensors);
        if mask.is_some() {
            made[to].insert("attention_mask".into());
        }
        if positions.is_some() {
            made[to].insert("position_ids".into());
        }
        if mask.is_some() || positions.is_some() {
            // The text's mask, as long as its token ids.
            let mut declared = ids.cloned().unwrap_or_default();
            declared.name = Some(TEXT_MASK.into());
            set_elem_type(&mut declared, prefix.mask_type());
            text_mask = Some(declared);
        }
    }

    // Shared inputs: one per name, the same element type in every file.
    let mut shared: Vec<ValueInfoProto> = Vec::new();
    let mut shared_from: HashMap<String, usize> = HashMap::new();
    for (i, inputs) in real_inputs.iter().enumerate() {
        for input in inputs {
            if made[i].contains(input.name()) {
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

    if let Some(mask) = text_mask {
        match shared_from.get(TEXT_MASK) {
            Some(&i) if tensor_kind(&shared[i]).0 != tensor_kind(&mask).0 => {
                return Err(misfit(format!(
                    "the text's {TEXT_MASK} is read with element type {} by one file and {} by the language model",
                    tensor_kind(&shared[i]).0,
                    tensor_kind(&mask).0
                )));
            }
            Some(_) => {}
            None => shared.push(mask),
        }
    }
    let mut joined = GraphProto {
        name: Some("joined".into()),
        input: shared.clone(),
        initializer: glue_tensors,
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
            let joined_name = if made[i].contains(input.name()) {
                format!("{prefix}{}", input.name())
            } else {
                outside.insert(input.name().to_string(), input.name().to_string());
                input.name().to_string()
            };
            boundary.insert(joined_name, input.name().to_string());
        }
        let wired = &made[i];
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
        joined.node.append(&mut glue[i]);
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
        let mut header = protos[i].clone();
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
            merged: merged[i].take(),
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

/// Each part of `role` that reads `input`: its index, the part and the
/// input.
fn readers<'a>(
    parts: &'a [Part],
    real_inputs: &'a [Vec<&'a ValueInfoProto>],
    role: Role,
    input: &'a str,
) -> impl Iterator<Item = (usize, &'a Part, &'a ValueInfoProto)> {
    parts
        .iter()
        .enumerate()
        .filter(move |(_, p)| p.role == role)
        .filter_map(move |(i, p)| {
            let found = real_inputs[i].iter().find(|v| v.name() == input)?;
            Some((i, p, *found))
        })
}

/// The index of the part of `role` that gives `reader` its `input`.
fn giver(parts: &[Part], role: Role, reader: &Part, input: &str) -> Result<usize, String> {
    parts.iter().position(|p| p.role == role).ok_or_else(|| {
        format!(
            "{} reads {input}, and no {} gives them",
            reader.path.display(),
            role.describe()
        )
    })
}

/// The joined graph's input holding the text's attention mask.
const TEXT_MASK: &str = "attention_mask";

/// An `Identity` carrying `value` into a file as `joined_input`.
fn identity(value: &str, joined_input: &str) -> NodeProto {
    NodeProto {
        op_type: Some("Identity".into()),
        name: Some(format!("{joined_input}{WIRE_NODE}")),
        input: vec![value.to_string()],
        output: vec![joined_input.to_string()],
        ..Default::default()
    }
}

/// The values a language model reads when image features come before the
/// text (joined names), and the element types of its mask and positions.
struct ImagePrefix<'a> {
    /// The vision encoder's image features `[batch, image tokens, width]`.
    image: &'a str,
    /// The token embeddings `[batch, text tokens, width]`.
    text: &'a str,
    /// The language model's `inputs_embeds`.
    embeds: &'a str,
    /// Its `attention_mask`, if it reads one, and the mask's element type.
    mask: Option<(String, i32)>,
    /// Its `position_ids`, if it reads them, and their element type.
    positions: Option<(String, i32)>,
}

impl ImagePrefix<'_> {
    /// Element type of the text's mask: the language model's, else int64.
    fn mask_type(&self) -> i32 {
        self.mask.as_ref().map_or(7, |(_, t)| *t)
    }

    /// The nodes and constants: embeddings `Concat(image, text)` along the
    /// tokens; mask `Concat(ones[batch, image tokens], text mask)`;
    /// positions `CumSum(mask) - 1` (a padded token repeats the last real
    /// position; it is masked anyway).
    fn nodes(&self) -> (Vec<NodeProto>, Vec<TensorProto>) {
        let name = |n: &str| format!("{PREFIX_GLUE}{n}");
        let node =
            |op: &str, inputs: Vec<String>, output: String, attribute: Vec<AttributeProto>| {
                NodeProto {
                    op_type: Some(op.into()),
                    name: Some(format!("{output}/{op}")),
                    input: inputs,
                    output: vec![output],
                    attribute,
                    ..Default::default()
                }
            };
        let axis = |a: i64| AttributeProto {
            name: Some("axis".into()),
            r#type: Some(2),
            i: Some(a),
            ..Default::default()
        };
        let int64 = |n: &str, dims: Vec<i64>, values: Vec<i64>| TensorProto {
            name: Some(name(n)),
            dims,
            data_type: Some(7),
            int64_data: values,
            ..Default::default()
        };
        let one = |elem: i32, n: Option<String>| TensorProto {
            name: n,
            dims: vec![1],
            data_type: Some(elem),
            int64_data: if elem == 7 { vec![1] } else { Vec::new() },
            int32_data: if elem == 7 { Vec::new() } else { vec![1] },
            ..Default::default()
        };
        let mut nodes = vec![node(
            "Concat",
            vec![self.image.to_string(), self.text.to_string()],
            self.embeds.to_string(),
            vec![axis(1)],
        )];
        let mut tensors = Vec::new();
        if self.mask.is_none() && self.positions.is_none() {
            return (nodes, tensors);
        }
        let mask_type = self.mask_type();
        tensors.push(int64("starts", vec![1], vec![0]));
        tensors.push(int64("ends", vec![1], vec![2]));
        nodes.push(node(
            "Shape",
            vec![self.image.to_string()],
            name("image_shape"),
            vec![],
        ));
        nodes.push(node(
            "Slice",
            vec![name("image_shape"), name("starts"), name("ends")],
            name("image_tokens"),
            vec![],
        ));
        nodes.push(node(
            "ConstantOfShape",
            vec![name("image_tokens")],
            name("image_mask"),
            vec![AttributeProto {
                name: Some("value".into()),
                r#type: Some(4),
                t: Some(one(mask_type, None)),
                ..Default::default()
            }],
        ));
        let full_mask = self
            .mask
            .as_ref()
            .map_or_else(|| name("attention_mask"), |(m, _)| m.clone());
        nodes.push(node(
            "Concat",
            vec![name("image_mask"), TEXT_MASK.to_string()],
            full_mask.clone(),
            vec![axis(1)],
        ));
        if let Some((positions, elem)) = &self.positions {
            tensors.push(int64("axis", vec![], vec![1]));
            tensors.push(one(*elem, Some(name("one"))));
            nodes.push(node(
                "Cast",
                vec![full_mask],
                name("mask_counts"),
                vec![AttributeProto {
                    name: Some("to".into()),
                    r#type: Some(2),
                    i: Some(i64::from(*elem)),
                    ..Default::default()
                }],
            ));
            nodes.push(node(
                "CumSum",
                vec![name("mask_counts"), name("axis")],
                name("real_tokens"),
                vec![],
            ));
            nodes.push(node(
                "Sub",
                vec![name("real_tokens"), name("one")],
                positions.clone(),
                vec![],
            ));
        }
        (nodes, tensors)
    }
}

/// Sets the element type of a tensor-typed value.
fn set_elem_type(info: &mut ValueInfoProto, elem: i32) {
    if let Some(type_proto::Value::TensorType(t)) =
        info.r#type.as_mut().and_then(|t| t.value.as_mut())
    {
        t.elem_type = Some(elem);
    }
}

/// The vision encoder's output a language model reads before the text:
/// `image_features`, or the only 3-D float output.
fn image_output(graph: &GraphProto) -> Option<&ValueInfoProto> {
    named_or_only_sequence(graph, "image_features")
}

/// Whether image features can go before token embeddings: the same
/// element type and rank, and widths that do not differ where static.
fn check_widths(image: &ValueInfoProto, embeds: &ValueInfoProto) -> Result<(), String> {
    let (a, b) = (tensor_kind(image).0, tensor_kind(embeds).0);
    if a != b && a != 0 && b != 0 {
        return Err(format!("have element type {a}, not the type {b} of"));
    }
    let (Some(x), Some(y)) = (static_dims(image), static_dims(embeds)) else {
        return Ok(());
    };
    if x.len() != 3 || y.len() != 3 {
        return Err(format!(
            "have rank {}, not the rank {} of",
            x.len(),
            y.len()
        ));
    }
    if let (Some(w), Some(v)) = (x[2], y[2])
        && w != v
    {
        return Err(format!("are {w} wide, not the {v} of"));
    }
    Ok(())
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
    named_or_only_sequence(graph, "last_hidden_state")
}

/// The output called `name`, or else the only 3-D float output (a
/// sequence of token vectors) when there is exactly one.
fn named_or_only_sequence<'a>(graph: &'a GraphProto, name: &str) -> Option<&'a ValueInfoProto> {
    if let Some(o) = graph.output.iter().find(|o| o.name() == name) {
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
                // Cache presents a rewrite removed (a dropped layer's; the
                // report lists them) go from the file too; any other
                // output gone is an error below.
                let outputs: Vec<&String> = member
                    .outputs
                    .iter()
                    .filter(|o| {
                        graph.output.iter().any(|g| g.name() == o.as_str())
                            || !o
                                .strip_prefix(member.prefix.as_str())
                                .unwrap_or(o)
                                .starts_with("present")
                    })
                    .collect();
                let mut pending: Vec<String> = outputs.iter().map(|o| o.to_string()).collect();
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
                // Inputs: the ones other files' outputs make, those shared
                // that the rewrite kept (as it declares them now: a cache
                // narrowed to fewer heads), and constant inputs it kept.
                let made = |name: &str| member.boundary.contains_key(&member.joined_name(name));
                part.input = part
                    .input
                    .iter()
                    .filter_map(|i| {
                        if made(i.name()) || inputs.contains(member.joined_name(i.name()).as_str())
                        {
                            Some(i.clone())
                        } else {
                            graph.input.iter().find(|g| g.name() == i.name()).cloned()
                        }
                    })
                    .collect();
                part.output = outputs
                    .iter()
                    .map(|name| {
                        graph
                            .output
                            .iter()
                            .find(|o| o.name() == name.as_str())
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
