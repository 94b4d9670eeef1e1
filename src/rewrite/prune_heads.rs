//! Pass `prune_heads`: keeps the listed attention heads of a block.
//!
//! The q/k/v columns of the removed heads go (three separate projections,
//! one packed `qkv`, or the fused `Attention` weight with its `num_heads`
//! and `qkv_hidden_sizes`), with the output projection's rows, and every
//! Reshape/Concat constant that encodes the head count or the merged width
//! is rewritten.

use super::slicing::{rewrite_shape, slice_input, slice_inputs, slice_outputs};
use super::{Edit, RewriteError, Target};
use crate::arch::{Attention, Projections};
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
        prune_heads(edit.graph, &target.block.attention.body, keep, &label)?;
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

/// Keeps heads `keep` of an attention sub-block.
fn prune_heads(
    graph: &mut Graph,
    attention: &Attention,
    keep: &[usize],
    label: &str,
) -> Result<(), RewriteError> {
    let (heads, dim) = (attention.heads, attention.head_dim);
    if keep.len() == heads {
        return Ok(());
    }
    let columns: Vec<usize> = head_columns(keep, dim, 0).collect();
    let packed: Vec<usize> = (0..3)
        .flat_map(|s| head_columns(keep, dim, s * heads * dim))
        .collect();
    match &attention.projections {
        Projections::Separate { q, k, v } => {
            for linear in [q, k, v] {
                slice_outputs(graph, linear, &columns, label)?;
            }
        }
        Projections::Packed { qkv } => slice_outputs(graph, qkv, &packed, label)?,
        Projections::Fused { node, bias, .. } => {
            slice_input(graph, *node, 1, 1, &packed, label)?;
            if bias.is_some() {
                slice_input(graph, *node, 2, 0, &packed, label)?;
            }
            let attribute = AttributeProto {
                name: Some("num_heads".into()),
                r#type: Some(2),
                i: Some(keep.len() as i64),
                ..Default::default()
            };
            graph
                .set_attribute(*node, attribute)
                .map_err(RewriteError::graph(label))?;
            if graph.node(*node).attribute("qkv_hidden_sizes").is_some() {
                let width = (keep.len() * dim) as i64;
                let attribute = AttributeProto {
                    name: Some("qkv_hidden_sizes".into()),
                    r#type: Some(7),
                    ints: vec![width; 3],
                    ..Default::default()
                };
                graph
                    .set_attribute(*node, attribute)
                    .map_err(RewriteError::graph(label))?;
            }
        }
    }
    slice_inputs(graph, &attention.out, &columns, label)?;
    // Head counts in split reshapes sit second to last; merged widths last.
    for &site in &attention.split_sites {
        rewrite_shape(graph, site, 2, heads as i64, keep.len() as i64, label)?;
    }
    for &site in &attention.merge_sites {
        rewrite_shape(
            graph,
            site,
            1,
            (heads * dim) as i64,
            (keep.len() * dim) as i64,
            label,
        )?;
    }
    Ok(())
}
