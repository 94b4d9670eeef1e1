//! Editing helpers the passes share: constant operands sliced along an axis
//! or replaced by new values, and entries of shape constants rewritten.
//!
//! Every edit is copy-on-write: a new initializer with a fresh name (and,
//! for an operand behind a chain of `Identity`, `Cast`, `Transpose`,
//! `DequantizeLinear` or scale `Mul` nodes, a fresh copy of the chain)
//! feeds the one reader being edited; the old tensors stay for whoever
//! else reads them (exporters share identical constants between layers,
//! even between towers).

use super::RewriteError;
use crate::arch::view::{Operand, Step, operand_at, stored_tensor};
use crate::arch::{ShapeRole, ShapeSite};
use crate::ir::{Graph, NodeId, Tensor};
use crate::onnx::proto::{AttributeProto, NodeProto};

/// Replaces `operand` (at its reader) by a copy holding only `keep` along
/// `read_axis` of the tensor as the reader sees it. Scales and zero points
/// of a dequantising chain are sliced with the weight when they run along
/// the same axis.
pub(super) fn slice_operand(
    graph: &mut Graph,
    operand: &Operand,
    read_axis: usize,
    keep: &[usize],
    label: &str,
) -> Result<(), RewriteError> {
    let unsupported = |reason: String| RewriteError::Unsupported {
        label: label.into(),
        reason,
    };
    let tensor = operand
        .tensor(graph)
        .ok_or_else(|| unsupported(format!("'{}' is not a constant", operand.storage)))?;
    // The stored axis: every transpose on the way swaps the two axes.
    let mut axis = read_axis;
    for step in &operand.chain {
        if matches!(step, Step::Transpose(_)) {
            axis = 1 - axis.min(1);
        }
    }
    if axis >= tensor.dims().len() {
        return Err(unsupported(format!(
            "'{}' has {} axes, axis {axis} cannot be sliced",
            operand.storage,
            tensor.dims().len()
        )));
    }
    let mut value = new_initializer(graph, &tensor, &operand.storage, axis, keep, label)?;
    let rank = tensor.dims().len();
    for step in &operand.chain {
        let node = graph.node(step.node()).clone();
        let mut inputs = node.inputs().to_vec();
        match step {
            Step::Pass(_) => inputs[0] = value.clone(),
            Step::Transpose(_) => {
                inputs[0] = value.clone();
                axis = 1 - axis.min(1);
            }
            Step::Dequantize { axis: channel, .. } => {
                inputs[0] = value.clone();
                let per_channel = inputs
                    .get(1)
                    .and_then(|s| stored_tensor(graph, s))
                    .is_some_and(|t| t.len() > 1);
                if per_channel && *channel == axis {
                    for slot in [1, 2] {
                        let Some(name) = inputs.get(slot).filter(|n| !n.is_empty()).cloned() else {
                            continue;
                        };
                        let t = stored_tensor(graph, &name)
                            .ok_or_else(|| unsupported(format!("'{name}' is not a constant")))?;
                        inputs[slot] = new_initializer(graph, &t, &name, 0, keep, label)?;
                    }
                }
            }
            Step::Scale { slot, .. } => {
                let other = 1 - slot;
                inputs[other] = value.clone();
                let name = inputs[*slot].clone();
                let t = stored_tensor(graph, &name)
                    .ok_or_else(|| unsupported(format!("'{name}' is not a constant")))?;
                // The scale broadcasts from the right against the weight.
                let dims = t.dims().to_vec();
                if let Some(scale_axis) = (axis + dims.len()).checked_sub(rank)
                    && dims.get(scale_axis).is_some_and(|&d| d > 1)
                {
                    inputs[*slot] = new_initializer(graph, &t, &name, scale_axis, keep, label)?;
                }
            }
        }
        value = copy_node(graph, &node.proto, inputs, label)?;
    }
    graph
        .set_input(operand.reader, operand.slot, &value)
        .map_err(RewriteError::graph(label))
}

/// A new initializer holding `keep` of `tensor` along `axis`, named after
/// `base`.
fn new_initializer(
    graph: &mut Graph,
    tensor: &Tensor,
    base: &str,
    axis: usize,
    keep: &[usize],
    label: &str,
) -> Result<String, RewriteError> {
    let name = graph.fresh_name(&format!("{base}.pruned"));
    let sliced = tensor
        .select(&name, axis, keep)
        .map_err(RewriteError::tensor(label))?;
    graph
        .set_initializer(sliced)
        .map_err(RewriteError::graph(label))?;
    Ok(name)
}

/// Adds a copy of `proto` reading `inputs`, with a fresh output; returns
/// the output.
fn copy_node(
    graph: &mut Graph,
    proto: &NodeProto,
    inputs: Vec<String>,
    label: &str,
) -> Result<String, RewriteError> {
    let base = proto.output.first().cloned().unwrap_or_default();
    let output = graph.fresh_name(&format!("{base}.pruned"));
    let mut copy = proto.clone();
    copy.input = inputs;
    copy.output = vec![output.clone()];
    copy.name = Some(graph.fresh_node_name(&format!("{}/pruned", proto.name())));
    graph.add_node(copy).map_err(RewriteError::graph(label))?;
    Ok(output)
}

/// Values to put in place of an operand: `values` with `dims` as the reader
/// sees them, and how a quantised weight keeps its scales.
#[derive(Debug, Clone)]
pub(crate) struct NewValues<'a> {
    /// Dims as read.
    pub dims: Vec<i64>,
    /// Values, row-major.
    pub values: &'a [f32],
    /// Scales of a quantised weight.
    pub scales: Scales,
}

/// How new values are stored in place of a quantised weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scales {
    /// Keep the weight's scales (values that only lost entries: masking).
    Keep,
    /// New symmetric per-channel scales from the values' ranges (refits).
    Fit,
}

/// Replaces the operand read at input `slot` of `reader` (as the graph is
/// now) by a new tensor of `values` with `dims` as the reader sees it. A
/// symmetric int8 weight (behind `DequantizeLinear` or `Cast` + `Mul`) stays
/// int8 with its chain, with `scales` kept or fitted anew; anything else
/// becomes a plain tensor of the element type the reader reads (float32,
/// float16, bfloat16).
pub(crate) fn replace_values(
    graph: &mut Graph,
    reader: NodeId,
    slot: usize,
    suffix: &str,
    new: NewValues<'_>,
    label: &str,
) -> Result<(), RewriteError> {
    let NewValues {
        dims,
        values,
        scales,
    } = new;
    let current = operand_at(graph, reader, slot).ok_or_else(|| RewriteError::Unsupported {
        label: label.into(),
        reason: format!(
            "'{}' is not a constant",
            graph
                .node(reader)
                .inputs()
                .get(slot)
                .cloned()
                .unwrap_or_default()
        ),
    })?;
    if let Some(value) = requantize(graph, &current, &dims, values, scales, suffix, label)? {
        return graph
            .set_input(reader, slot, &value)
            .map_err(RewriteError::graph(label));
    }
    let data_type = current.read_type(graph);
    let name = graph.fresh_name(&format!("{}.{suffix}", current.storage));
    let tensor =
        Tensor::from_f32(&name, data_type, dims, values).map_err(RewriteError::tensor(label))?;
    graph
        .set_initializer(tensor)
        .map_err(RewriteError::graph(label))?;
    graph
        .set_input(reader, slot, &name)
        .map_err(RewriteError::graph(label))
}

/// Stores `values` (`dims`, as read) like the symmetric int8 weight
/// `current` is stored: a new int8 tensor, scales kept or fitted per
/// channel, and a copy of the dequantising chain. Returns the value the
/// reader should read, or `None` when `current` is not such a weight (a
/// transposed or asymmetric one, say).
fn requantize(
    graph: &mut Graph,
    current: &Operand,
    dims: &[i64],
    values: &[f32],
    scales: Scales,
    suffix: &str,
    label: &str,
) -> Result<Option<String>, RewriteError> {
    let Some(storage) = current.tensor(graph) else {
        return Ok(None);
    };
    if storage.data_type() != crate::onnx::dtype::code::INT8 || dims.len() != 2 {
        return Ok(None);
    }
    // The chain: DequantizeLinear, or Cast then Mul(scale).
    let (dequantize, scale_slot, channel_axis) = match current.chain.as_slice() {
        [Step::Dequantize { node, axis }] => (*node, 1, *axis),
        [Step::Pass(cast), Step::Scale { node, slot }] if graph.node(*cast).op() == "Cast" => {
            let scale = graph.node(*node).inputs()[*slot].clone();
            let Some(t) = stored_tensor(graph, &scale) else {
                return Ok(None);
            };
            // Broadcast from the right against the 2-D weight.
            let sd = t.dims();
            let axis = (0..sd.len())
                .find(|&i| sd[i] > 1)
                .map(|i| i + 2 - sd.len().min(2));
            (*node, *slot, axis.unwrap_or(usize::MAX))
        }
        _ => return Ok(None),
    };
    let node = graph.node(dequantize).clone();
    let scale_name = node.inputs()[scale_slot].clone();
    let Some(scale) = stored_tensor(graph, &scale_name) else {
        return Ok(None);
    };
    if node.op() == "DequantizeLinear"
        && let Some(z) = node.inputs().get(2).filter(|z| !z.is_empty())
        && stored_tensor(graph, z)
            .is_none_or(|t| t.to_i64().map_or(true, |v| v.iter().any(|&x| x != 0)))
    {
        return Ok(None);
    }
    let dims_usize: Vec<usize> = dims.iter().map(|&d| d as usize).collect();
    let per_channel = scale.len() > 1 && channel_axis < 2;
    let channels = if per_channel {
        dims_usize[channel_axis]
    } else {
        1
    };
    let (per, inner) = crate::arch::view::channel_layout(&dims_usize, channel_axis.min(1));
    let channel_of = |i: usize| if per_channel { (i / inner) % per } else { 0 };
    let scale_values: Vec<f32> = match scales {
        Scales::Keep => {
            let old = scale.to_f32().map_err(RewriteError::tensor(label))?;
            if old.len() != channels && !(old.len() == 1 && channels == 1) {
                return Ok(None);
            }
            old
        }
        Scales::Fit => {
            let mut max = vec![0f32; channels];
            for (i, v) in values.iter().enumerate() {
                let c = channel_of(i);
                max[c] = max[c].max(v.abs());
            }
            max.into_iter()
                .map(|m| if m > 0.0 { m / 127.0 } else { 1.0 })
                .collect()
        }
    };
    let quantized: Vec<u8> = values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            (v / scale_values[channel_of(i)])
                .round()
                .clamp(-127.0, 127.0) as i8 as u8
        })
        .collect();
    let q_name = graph.fresh_name(&format!("{}.{suffix}", current.storage));
    graph
        .set_initializer(Tensor::from_raw(
            &q_name,
            crate::onnx::dtype::code::INT8,
            dims.to_vec(),
            bytes::Bytes::from(quantized),
        ))
        .map_err(RewriteError::graph(label))?;
    let mut scale_dims = scale.dims().to_vec();
    if per_channel && let Some(d) = scale_dims.iter_mut().find(|d| **d > 1) {
        *d = channels as i64;
    }
    let s_name = graph.fresh_name(&format!("{scale_name}.{suffix}"));
    let s_tensor = Tensor::from_f32(&s_name, scale.data_type(), scale_dims, &scale_values)
        .map_err(RewriteError::tensor(label))?;
    graph
        .set_initializer(s_tensor)
        .map_err(RewriteError::graph(label))?;
    let value = match current.chain.as_slice() {
        [Step::Dequantize { .. }] => {
            let mut inputs = vec![q_name, s_name];
            if let Some(z) = node.inputs().get(2).filter(|z| !z.is_empty()) {
                let zeros = graph.fresh_name(&format!("{z}.{suffix}"));
                let count = if per_channel { channels } else { 1 };
                let shape = if per_channel {
                    vec![count as i64]
                } else {
                    Vec::new()
                };
                graph
                    .set_initializer(Tensor::from_raw(
                        &zeros,
                        crate::onnx::dtype::code::INT8,
                        shape,
                        bytes::Bytes::from(vec![0u8; count]),
                    ))
                    .map_err(RewriteError::graph(label))?;
                inputs.push(zeros);
            }
            copy_node(graph, &node.proto, inputs, label)?
        }
        [Step::Pass(cast), Step::Scale { .. }] => {
            let cast = graph.node(*cast).clone();
            let cast_out = copy_node(graph, &cast.proto, vec![q_name], label)?;
            let mut inputs = node.inputs().to_vec();
            inputs[scale_slot] = s_name;
            inputs[1 - scale_slot] = cast_out;
            copy_node(graph, &node.proto, inputs, label)?
        }
        _ => return Ok(None),
    };
    Ok(Some(value))
}

/// Sets `entry` of the target shape of the Reshape in `site` to `value`,
/// in a copy: a constant target becomes a new constant; a computed one is
/// spliced (`Concat(Slice(t, 0, p), [value], Slice(t, p + 1, end))`).
pub(super) fn set_shape_entry(
    graph: &mut Graph,
    site: &ShapeSite,
    value: i64,
    opset: i64,
    label: &str,
) -> Result<(), RewriteError> {
    let target = graph.node(site.node).inputs()[1].clone();
    let graph_err = RewriteError::graph(label);
    if let Some(t) = stored_tensor(graph, &target)
        && let Ok(mut values) = t.to_i64()
        && site.position < values.len()
    {
        values[site.position] = value;
        let name = graph.fresh_name(&format!("{target}.pruned"));
        graph
            .set_initializer(int_tensor(&name, &values))
            .map_err(&graph_err)?;
        return graph.set_input(site.node, 1, &name).map_err(&graph_err);
    }
    if opset < 10 {
        return Err(RewriteError::Unsupported {
            label: label.into(),
            reason: format!(
                "the computed shape '{target}' would be edited with Slice inputs, which need opset 10 (the model imports {opset})"
            ),
        });
    }
    let p = site.position as i64;
    let mut pieces = Vec::new();
    let constant =
        |graph: &mut Graph, base: &str, values: &[i64]| -> Result<String, RewriteError> {
            let name = graph.fresh_name(&format!("{target}.{base}"));
            graph
                .set_initializer(int_tensor(&name, values))
                .map_err(RewriteError::graph(label))?;
            Ok(name)
        };
    let slice = |graph: &mut Graph, start: i64, end: i64| -> Result<String, RewriteError> {
        let starts = constant(graph, "start", &[start])?;
        let ends = constant(graph, "end", &[end])?;
        let output = graph.fresh_name(&format!("{target}.part"));
        graph
            .add_node(NodeProto {
                op_type: Some("Slice".into()),
                name: Some(
                    graph
                        .fresh_node_name(&format!("{}/pruned_slice", graph.node(site.node).name())),
                ),
                input: vec![target.clone(), starts, ends],
                output: vec![output.clone()],
                ..Default::default()
            })
            .map_err(RewriteError::graph(label))?;
        Ok(output)
    };
    if p > 0 {
        pieces.push(slice(graph, 0, p)?);
    }
    pieces.push(constant(graph, "entry", &[value])?);
    if site.position + 1 < site.len {
        pieces.push(slice(graph, p + 1, i64::MAX)?);
    }
    let output = graph.fresh_name(&format!("{target}.pruned"));
    graph
        .add_node(NodeProto {
            op_type: Some("Concat".into()),
            name: Some(
                graph.fresh_node_name(&format!("{}/pruned_shape", graph.node(site.node).name())),
            ),
            input: pieces,
            output: vec![output.clone()],
            attribute: vec![AttributeProto {
                name: Some("axis".into()),
                r#type: Some(2),
                i: Some(0),
                ..Default::default()
            }],
            ..Default::default()
        })
        .map_err(&graph_err)?;
    graph.set_input(site.node, 1, &output).map_err(&graph_err)
}

/// The new value of a shape entry when `kept` of its heads remain.
pub(super) fn shape_value(
    site: &ShapeSite,
    kept: usize,
    kept_kv: usize,
    head_dim: usize,
    label: &str,
) -> Result<i64, RewriteError> {
    Ok(match site.role {
        ShapeRole::Heads => kept as i64,
        ShapeRole::KvHeads => kept_kv as i64,
        ShapeRole::Width => (kept * head_dim) as i64,
        ShapeRole::HeadMultiple if !site.wildcard_elsewhere => -1,
        ShapeRole::HeadMultiple => {
            return Err(RewriteError::Unsupported {
                label: label.into(),
                reason: "a reshape target multiplies the head count into an unknown size and already infers another entry (-1)".into(),
            });
        }
    })
}

fn int_tensor(name: &str, values: &[i64]) -> Tensor {
    let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    Tensor::from_raw(name, 7, vec![values.len() as i64], bytes::Bytes::from(raw))
}
