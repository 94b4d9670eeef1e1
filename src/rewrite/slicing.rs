//! Slicing helpers the passes share: weights and biases cut along an axis,
//! float32 weights replaced, head counts and merged widths rewritten in
//! shape constants. Every edit makes a new initializer with a fresh name and
//! points the one reader at it; the old tensor stays for whoever else
//! reads it (exporters share identical constants between layers).

use super::RewriteError;
use crate::arch::Linear;
use crate::arch::patterns::const_ints;
use crate::ir::{Graph, NodeId, Tensor};

/// Where the weight read by `node` (a MatMul/Gemm or fused attention
/// operator, weight at input 1) is stored now — after any earlier edit
/// renamed it: (node, slot, whether it sits behind a Transpose, i.e. is
/// stored [out, in]).
pub(crate) fn weight_read_site(
    graph: &Graph,
    node: NodeId,
    label: &str,
) -> Result<(NodeId, usize, bool), RewriteError> {
    let read = graph
        .node(node)
        .inputs()
        .get(1)
        .cloned()
        .unwrap_or_default();
    if graph.initializer(&read).is_some() {
        return Ok((node, 1, false));
    }
    match graph.producer_node(&read) {
        Some(t)
            if graph.node(t).op() == "Transpose"
                && graph.initializer(&graph.node(t).inputs()[0]).is_some() =>
        {
            Ok((t, 0, true))
        }
        _ => Err(RewriteError::Unsupported {
            label: label.into(),
            reason: format!("weight '{read}' is not a constant"),
        }),
    }
}

/// Replaces input `slot` of `node` by a new float32 initializer holding
/// `values` (named after the old input plus `suffix`); the old tensor is
/// left for others that read it.
pub(crate) fn replace_f32_input(
    graph: &mut Graph,
    node: NodeId,
    slot: usize,
    suffix: &str,
    dims: Vec<i64>,
    values: &[f32],
    label: &str,
) -> Result<(), RewriteError> {
    let name = graph.node(node).inputs()[slot].clone();
    let new_name = graph.fresh_name(&format!("{name}.{suffix}"));
    let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let tensor = Tensor::from_raw(&new_name, 1, dims, bytes::Bytes::from(raw));
    let graph_err = RewriteError::graph(label);
    graph.set_initializer(tensor).map_err(&graph_err)?;
    graph.set_input(node, slot, &new_name).map_err(&graph_err)
}

/// Replaces input `slot` of `node` (an initializer) by its rows/columns
/// `keep` along `axis`, as a new initializer.
pub(super) fn slice_input(
    graph: &mut Graph,
    node: NodeId,
    slot: usize,
    axis: usize,
    keep: &[usize],
    label: &str,
) -> Result<(), RewriteError> {
    let name = graph.node(node).inputs()[slot].clone();
    let tensor = graph
        .initializer(&name)
        .ok_or_else(|| RewriteError::Unsupported {
            label: label.into(),
            reason: format!("'{name}' is not an initializer"),
        })?;
    let new_name = graph.fresh_name(&format!("{name}.pruned"));
    let sliced = tensor
        .select(&new_name, axis, keep)
        .map_err(RewriteError::tensor(label))?;
    let graph_err = RewriteError::graph(label);
    graph.set_initializer(sliced).map_err(&graph_err)?;
    graph.set_input(node, slot, &new_name).map_err(&graph_err)
}

/// Where a linear layer's weight is read: (node, input slot, stored [out, in]).
fn weight_site(graph: &Graph, linear: &Linear) -> (NodeId, usize, bool) {
    let node = graph.node(linear.matmul);
    if node.inputs()[1] == linear.weight {
        return (linear.matmul, 1, linear.transposed);
    }
    // Behind a Transpose: the stored tensor is [out, in].
    let transpose = graph
        .producer_node(&node.inputs()[1])
        .expect("linear weights are constants");
    (transpose, 0, true)
}

/// Keeps only output features `keep` of a linear layer (weight columns and bias).
pub(super) fn slice_outputs(
    graph: &mut Graph,
    linear: &Linear,
    keep: &[usize],
    label: &str,
) -> Result<(), RewriteError> {
    let (node, slot, stored_out_in) = weight_site(graph, linear);
    slice_input(
        graph,
        node,
        slot,
        if stored_out_in { 0 } else { 1 },
        keep,
        label,
    )?;
    if let Some(bias) = &linear.bias {
        slice_input(graph, bias.node, bias.slot, 0, keep, label)?;
    }
    Ok(())
}

/// Keeps only input features `keep` of a linear layer (weight rows).
pub(super) fn slice_inputs(
    graph: &mut Graph,
    linear: &Linear,
    keep: &[usize],
    label: &str,
) -> Result<(), RewriteError> {
    let (node, slot, stored_out_in) = weight_site(graph, linear);
    slice_input(
        graph,
        node,
        slot,
        if stored_out_in { 1 } else { 0 },
        keep,
        label,
    )
}

/// In the target shape of Reshape `site`, replaces the entry `from_end`
/// positions from the end when it equals `old` (entries of -1, 0 or computed
/// pieces adapt by themselves). The constant is replaced by a new one.
pub(super) fn rewrite_shape(
    graph: &mut Graph,
    site: NodeId,
    from_end: usize,
    old: i64,
    new: i64,
    label: &str,
) -> Result<(), RewriteError> {
    let shape = graph.node(site).inputs()[1].clone();
    let graph_err = RewriteError::graph(label);
    if let Some(values) = const_ints(graph, &shape) {
        let Some(pos) = values.len().checked_sub(from_end) else {
            return Ok(());
        };
        if values[pos] != old {
            return Ok(());
        }
        let mut values = values;
        values[pos] = new;
        let name = graph.fresh_name(&format!("{shape}.pruned"));
        graph
            .set_initializer(int_tensor(&name, &values))
            .map_err(&graph_err)?;
        return graph.set_input(site, 1, &name).map_err(&graph_err);
    }
    let Some(concat) = graph
        .producer_node(&shape)
        .filter(|c| graph.node(*c).op() == "Concat")
    else {
        return Ok(());
    };
    // Concat pieces: constants contribute their length, computed pieces one
    // element (Unsqueeze of a scalar).
    let pieces: Vec<(String, Option<Vec<i64>>)> = graph
        .node(concat)
        .inputs()
        .iter()
        .map(|p| (p.clone(), const_ints(graph, p)))
        .collect();
    let total: usize = pieces
        .iter()
        .map(|(_, v)| v.as_ref().map_or(1, |v| v.len()))
        .sum();
    let Some(target) = total.checked_sub(from_end) else {
        return Ok(());
    };
    let mut position = 0;
    for (slot, (name, values)) in pieces.iter().enumerate() {
        let len = values.as_ref().map_or(1, |v| v.len());
        if (position..position + len).contains(&target) {
            if let Some(values) = values
                && values[target - position] == old
            {
                let mut values = values.clone();
                values[target - position] = new;
                let new_name = graph.fresh_name(&format!("{name}.pruned"));
                graph
                    .set_initializer(int_tensor(&new_name, &values))
                    .map_err(&graph_err)?;
                graph
                    .set_input(concat, slot, &new_name)
                    .map_err(&graph_err)?;
            }
            break;
        }
        position += len;
    }
    Ok(())
}

fn int_tensor(name: &str, values: &[i64]) -> Tensor {
    let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    Tensor::from_raw(name, 7, vec![values.len() as i64], bytes::Bytes::from(raw))
}
