//! Pass `unread_norms`: a fused `SkipLayerNormalization` whose normalised
//! output nothing reads any more becomes the plain sum it also computes.
//!
//! In ONNX Runtime's fused graphs the norm in front of a sub-block lives in
//! the join before it: `SkipLN(branch, x)` gives the sum (output 3, the
//! stream) and its norm (output 0, the next sub-block's input). Removing
//! that next sub-block leaves the norm computed for nobody; the node stays
//! alive for its sum, and so would its scale and bias. Replacing it by
//! `Add(branch, x)` (plus its bias input, when it has one) computes the same
//! stream, drops the norm's parameters and saves the work:
//!
//! ```text
//! SkipLN(a, b, γ, β, bias)[3] ─► s       (outputs 0–2 unread)
//!          becomes  Add(Add(a, b), bias) ─► s
//! ```

use super::{Edit, RewriteError, Target};
use crate::onnx::proto::NodeProto;

/// Runs the pass over the whole graph.
pub(super) fn run(edit: &mut Edit<'_>, _targets: &[Target<'_>]) -> Result<(), RewriteError> {
    // What the drops left dead still reads the norms: remove it first.
    let dead = edit.graph.eliminate_dead_code();
    edit.dead.add(dead);
    let candidates: Vec<_> = edit
        .graph
        .nodes()
        .into_iter()
        .filter(|&id| {
            let node = edit.graph.node(id);
            matches!(
                node.op(),
                "SkipLayerNormalization" | "SkipSimplifiedLayerNormalization"
            ) && node.domain() == "com.microsoft"
        })
        .collect();
    for id in candidates {
        let node = edit.graph.node(id);
        let outputs = node.outputs().to_vec();
        let inputs = node.inputs().to_vec();
        let name = node.name().to_string();
        // SkipLayerNormalization's bias is input 4, the simplified form's 3.
        let bias_slot = if node.op() == "SkipLayerNormalization" {
            4
        } else {
            3
        };
        let Some(sum) = outputs.get(3).filter(|s| !s.is_empty()).cloned() else {
            continue;
        };
        let unread = |v: &String| {
            v.is_empty() || (edit.graph.uses(v).is_empty() && !edit.graph.is_output(v))
        };
        if !outputs.iter().take(3).all(unread) || edit.graph.is_output(&sum) {
            continue;
        }
        let label = format!("unread_norms {}", edit.graph.node(id).label());
        let mut add = |a: &str, b: &str, suffix: &str| -> Result<String, RewriteError> {
            let output = edit.graph.fresh_name(&format!("{sum}.{suffix}"));
            edit.graph
                .add_node(NodeProto {
                    op_type: Some("Add".into()),
                    name: Some(edit.graph.fresh_node_name(&format!("{name}/{suffix}"))),
                    input: vec![a.to_string(), b.to_string()],
                    output: vec![output.clone()],
                    ..Default::default()
                })
                .map_err(RewriteError::graph(&label))?;
            Ok(output)
        };
        let mut value = add(&inputs[0], &inputs[1], "sum")?;
        if let Some(bias) = inputs.get(bias_slot).filter(|b| !b.is_empty()) {
            value = add(&value, bias, "bias")?;
        }
        edit.reroute(&sum, &value, &label)?;
        edit.rewrites.push(label);
    }
    Ok(())
}
