//! Pass `prune_heads`: keeps the listed attention heads of a block.
//!
//! The q/k/v columns of the removed heads go (three separate projections,
//! one packed `qkv`, or a fused operator's packed weight and bias), with the
//! output projection's rows; every shape entry that encodes the head count
//! or the merged width is rewritten, and so is every head-count attribute
//! of a fused operator.

use super::slicing::{set_shape_entry, shape_value, slice_operand};
use super::{Edit, RewriteError, Target};
use crate::arch::{Attention, Linear, Projections};
use crate::ir::Graph;
use crate::onnx::proto::AttributeProto;

/// Runs the pass over every target that keeps a subset of its heads.
pub(super) fn run(edit: &mut Edit<'_>, targets: &[Target<'_>]) -> Result<(), RewriteError> {
    for target in targets {
        let Some(keep) = &target.action.keep_heads else {
            continue;
        };
        let label = format!(
            "prune_heads {} ({} of {})",
            target.action.label(),
            keep.len(),
            target.block.attention.body.heads
        );
        let attention = &target.block.attention.body;
        prune_heads(edit.graph, attention, keep, edit.opset, &label)?;
        if let (Some(cache), Some(groups)) = (&attention.cache, attention.kept_groups(keep))
            && groups.len() < attention.kv_heads
        {
            for name in cache.names() {
                edit.interface.push(format!(
                    "'{name}' holds {} of {} key/value heads",
                    groups.len(),
                    attention.kv_heads
                ));
            }
        }
        edit.rewrites.push(label);
    }
    Ok(())
}

fn head_columns(
    keep: &[usize],
    head_dim: usize,
    offset: usize,
) -> impl Iterator<Item = usize> + '_ {
    keep.iter()
        .flat_map(move |h| (0..head_dim).map(move |d| offset + h * head_dim + d))
}

/// Keeps output features `keep` of a linear layer (weight columns and bias).
pub(super) fn slice_outputs(
    graph: &mut Graph,
    linear: &Linear,
    keep: &[usize],
    label: &str,
) -> Result<(), RewriteError> {
    let axis = linear.read_axis(graph, true);
    slice_operand(graph, &linear.weight, axis, keep, label)?;
    if let Some(bias) = &linear.bias {
        slice_bias(graph, bias, keep, label)?;
    }
    Ok(())
}

/// Keeps input features `keep` of a linear layer (weight rows).
pub(super) fn slice_inputs(
    graph: &mut Graph,
    linear: &Linear,
    keep: &[usize],
    label: &str,
) -> Result<(), RewriteError> {
    let axis = linear.read_axis(graph, false);
    slice_operand(graph, &linear.weight, axis, keep, label)
}

/// Keeps entries `keep` of a bias vector (its last axis).
pub(super) fn slice_bias(
    graph: &mut Graph,
    bias: &crate::arch::Bias,
    keep: &[usize],
    label: &str,
) -> Result<(), RewriteError> {
    let rank = bias.read_dims(graph).map_or(1, |d| d.len());
    slice_operand(graph, bias, rank.saturating_sub(1), keep, label)
}

/// Keeps heads `keep` of an attention sub-block.
fn prune_heads(
    graph: &mut Graph,
    attention: &Attention,
    keep: &[usize],
    opset: i64,
    label: &str,
) -> Result<(), RewriteError> {
    let (heads, dim) = (attention.heads, attention.head_dim);
    if keep.len() == heads {
        return Ok(());
    }
    if let Some(&site) = attention.opaque_sites.first() {
        return Err(RewriteError::Unsupported {
            label: label.into(),
            reason: format!(
                "the target of the reshape at {} is computed in a way discovery cannot evaluate, so the head count in it cannot be rewritten",
                graph.node(site).label()
            ),
        });
    }
    // Grouped-query attention keeps whole groups: the key/value heads of
    // the kept query heads, every query head of each.
    let groups = attention.kept_groups(keep).ok_or_else(|| RewriteError::Unsupported {
        label: label.into(),
        reason: format!(
            "the block's {} query heads share {} key/value heads in groups of {}: keep_heads must keep whole groups",
            heads,
            attention.kv_heads,
            attention.group()
        ),
    })?;
    let columns: Vec<usize> = head_columns(keep, dim, 0).collect();
    let kv_columns: Vec<usize> = head_columns(&groups, dim, 0).collect();
    // Packed [q (heads) | k (kv heads) | v (kv heads)] columns.
    let kv = attention.kv_heads;
    let packed: Vec<usize> = head_columns(keep, dim, 0)
        .chain(head_columns(&groups, dim, heads * dim))
        .chain(head_columns(&groups, dim, (heads + kv) * dim))
        .collect();
    match &attention.projections {
        Projections::Separate { q, k, v } => {
            slice_outputs(graph, q, &columns, label)?;
            for linear in [k, v] {
                slice_outputs(graph, linear, &kv_columns, label)?;
            }
        }
        Projections::Packed { qkv } => slice_outputs(graph, qkv, &packed, label)?,
        Projections::Fused { weight, bias, .. } => {
            slice_operand(graph, weight, 1, &packed, label)?;
            if let Some(bias) = bias {
                slice_bias(graph, bias, &packed, label)?;
            }
        }
    }
    if let Some(bias) = &attention.packed_bias {
        slice_bias(graph, bias, &packed, label)?;
    }
    slice_inputs(graph, &attention.out, &columns, label)?;
    for &(node, name) in &attention.head_attributes {
        if graph.node(node).attribute(name).is_none() && name != "num_heads" {
            continue;
        }
        let attribute = if name == "qkv_hidden_sizes" {
            AttributeProto {
                name: Some(name.into()),
                r#type: Some(7),
                ints: vec![(keep.len() * dim) as i64; 3],
                ..Default::default()
            }
        } else {
            let count = if name == "kv_num_heads" {
                groups.len()
            } else {
                keep.len()
            };
            AttributeProto {
                name: Some(name.into()),
                r#type: Some(2),
                i: Some(count as i64),
                ..Default::default()
            }
        };
        graph
            .set_attribute(node, attribute)
            .map_err(RewriteError::graph(label))?;
    }
    for site in &attention.shape_sites {
        let value = shape_value(site, keep.len(), groups.len(), dim, label)?;
        set_shape_entry(graph, site, value, opset, label)?;
    }
    // The cache's declared shapes: [batch, kv_heads, sequence, head_dim].
    if let Some(cache) = &attention.cache {
        for name in cache.names() {
            graph
                .set_interface_dim(name, 1, groups.len() as i64)
                .map_err(RewriteError::graph(label))?;
        }
    }
    Ok(())
}
