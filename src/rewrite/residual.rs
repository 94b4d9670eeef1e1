//! Taking a residual branch out of the stream, shared by the two drop
//! passes.
//!
//! ```text
//! pre-norm   Add(x, branch)          ─► x
//! post-norm  LN(Add(x, branch))      ─► LN(x)      (sub-block: the norm stays)
//!                                     ─► x          (block: its norms go too)
//! fused      SkipLN(branch, x)[3]    ─► x,  SkipLN(…)[0] ─► LayerNormalization(x)
//! ```
//!
//! The stream a branch is bypassed to is looked up through the earlier
//! edits ([`Edit::current`]): when the block before was removed, its output
//! no longer carries the stream, its input does. Rerouting to the old name
//! would bring the removed block back to life.

use super::{Edit, RewriteError};
use crate::arch::{Block, Join};
use crate::onnx::proto::{AttributeProto, NodeProto};

/// The element type of the residual stream `value`: declared, or read
/// through the residual `Add`s that made it (an earlier compensation's
/// `Add` has no declared output but a typed constant input), so that a
/// float16 stream gets a float16 constant however many removals precede.
fn stream_type(graph: &crate::ir::Graph, value: &str) -> Option<i32> {
    let mut value = value.to_string();
    for _ in 0..256 {
        if let Some(t) = graph.value_type(&value) {
            return Some(t.elem_type);
        }
        let node = graph.node(graph.producer_node(&value)?);
        if node.op() != "Add" || !node.domain().is_empty() {
            return None;
        }
        if let Some(t) = node.inputs().iter().find_map(|i| graph.value_type(i)) {
            return Some(t.elem_type);
        }
        value = node.inputs().first()?.clone();
    }
    None
}

/// `Add(stream, shift)`: the mean a removed branch used to add (bias
/// compensation), in the stream's element type.
fn add_constant(
    edit: &mut Edit<'_>,
    stream: &str,
    shift: &[f32],
    label: &str,
) -> Result<String, RewriteError> {
    let data_type = stream_type(edit.graph, stream)
        .filter(|t| matches!(t, 1 | 10 | 16))
        .unwrap_or(1);
    let name = edit.graph.fresh_name(&format!("{stream}.mean_branch"));
    let tensor = crate::ir::Tensor::from_f32(&name, data_type, vec![shift.len() as i64], shift)
        .map_err(RewriteError::tensor(label))?;
    edit.graph
        .set_initializer(tensor)
        .map_err(RewriteError::graph(label))?;
    let output = edit.graph.fresh_name(&format!("{stream}.compensated"));
    let node_name = edit.graph.fresh_node_name(&format!("{stream}/mean_branch"));
    edit.graph
        .add_node(NodeProto {
            op_type: Some("Add".into()),
            name: Some(node_name),
            input: vec![stream.to_string(), name],
            output: vec![output.clone()],
            ..Default::default()
        })
        .map_err(RewriteError::graph(label))?;
    Ok(output)
}

/// Whether the join's node is `op`.
fn node_op_is(edit: &Edit<'_>, join: &Join, op: &str) -> bool {
    edit.graph.node(join.node).op() == op
}

/// Makes the residual branch joined at `join` contribute nothing (or, with
/// `shift`, only its mean), the stream continuing from `stream` (a name
/// from the discovered architecture, resolved through earlier edits).
/// `keep_norm`: a post-norm join keeps its norm (sub-block removal) or
/// loses it with the block (block removal).
pub(super) fn bypass_join(
    edit: &mut Edit<'_>,
    join: &Join,
    stream: &str,
    block: &Block,
    keep_norm: bool,
    shift: Option<&[f32]>,
    label: &str,
) -> Result<(), RewriteError> {
    let mut stream = edit.current(stream);
    if let Some(shift) = shift {
        stream = add_constant(edit, &stream, shift, label)?;
    }
    let node = edit.graph.node(join.node);
    if node.op() == "Add" {
        let sum = join.sum.clone().expect("Add joins have a sum");
        return match (&join.norm, keep_norm) {
            (Some(norm), false) if block.norm_after_join => {
                edit.reroute(&norm.output, &stream, label)
            }
            _ => edit.reroute(&sum, &stream, label),
        };
    }
    // SkipLayerNormalization: output 3 is the sum, output 0 its norm.
    let outputs = node.outputs().to_vec();
    let inputs = node.inputs().to_vec();
    let epsilon = node.attr_float("epsilon");
    let node_name = node.name().to_string();
    if let Some(sum) = outputs.get(3).filter(|s| !s.is_empty()) {
        edit.reroute(sum, &stream, label)?;
    }
    let normed = &outputs[0];
    if edit.graph.uses(normed).is_empty() && !edit.graph.is_output(normed) {
        return Ok(());
    }
    if block.norm_after_join && !keep_norm {
        return edit.reroute(normed, &stream, label);
    }
    // The RMS form becomes ONNX Runtime's SimplifiedLayerNormalization,
    // the operator such models already use for their first norm (ONNX has
    // RMSNormalization only from opset 23).
    let rms = node_op_is(edit, join, "SkipSimplifiedLayerNormalization");
    if edit.opset < 17 && !rms {
        return Err(RewriteError::Unsupported {
            label: label.into(),
            reason: format!(
                "the fused norm must be rebuilt as LayerNormalization, which needs opset 17 (the model imports {})",
                edit.opset
            ),
        });
    }
    let output = edit.graph.fresh_name(&format!("{normed}.bypass"));
    let mut attribute = vec![AttributeProto {
        name: Some("axis".into()),
        r#type: Some(2),
        i: Some(-1),
        ..Default::default()
    }];
    if let Some(eps) = epsilon {
        attribute.push(AttributeProto {
            name: Some("epsilon".into()),
            r#type: Some(1),
            f: Some(eps),
            ..Default::default()
        });
    }
    let mut norm_inputs = vec![stream.clone(), inputs[2].clone()];
    if let Some(beta) = inputs.get(3).filter(|b| !b.is_empty() && !rms) {
        norm_inputs.push(beta.clone());
    }
    let op = if rms {
        "SimplifiedLayerNormalization"
    } else {
        "LayerNormalization"
    };
    edit.graph
        .add_node(NodeProto {
            op_type: Some(op.into()),
            name: Some(edit.graph.fresh_node_name(&format!("{node_name}/bypass"))),
            input: norm_inputs,
            output: vec![output.clone()],
            attribute,
            ..Default::default()
        })
        .map_err(RewriteError::graph(label))?;
    edit.reroute(normed, &output, label)
}
