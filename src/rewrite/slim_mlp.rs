//! Pass `slim_mlp`: keeps the listed neurons of a block's MLP: fc1's
//! columns and bias (and a gated MLP's up projection's), fc2's rows, and
//! any per-neuron constant inside the activation.

use super::prune_heads::{slice_inputs, slice_outputs};
use super::slicing::slice_operand;
use super::{Edit, RewriteError, Target};
use crate::arch::Mlp;
use crate::ir::Graph;

/// Runs the pass over every target that keeps a subset of its neurons.
pub(super) fn run(edit: &mut Edit<'_>, targets: &[Target<'_>]) -> Result<(), RewriteError> {
    for target in targets {
        let Some(keep) = &target.action.keep_mlp else {
            continue;
        };
        let label = format!(
            "slim_mlp {} ({} of {})",
            target.action.label(),
            keep.len(),
            target.block.mlp.body.width()
        );
        slim_mlp(edit.graph, &target.block.mlp.body, keep, &label)?;
        edit.rewrites.push(label);
    }
    Ok(())
}

/// Keeps neurons `keep` of an MLP.
fn slim_mlp(graph: &mut Graph, mlp: &Mlp, keep: &[usize], label: &str) -> Result<(), RewriteError> {
    let width = mlp.width();
    if keep.len() == width {
        return Ok(());
    }
    slice_outputs(graph, &mlp.fc1, keep, label)?;
    if let Some(up) = &mlp.up {
        slice_outputs(graph, up, keep, label)?;
    }
    slice_inputs(graph, &mlp.fc2, keep, label)?;
    // Per-neuron constants inside the activation (rare) shrink too.
    for &id in &mlp.activation {
        for slot in 0..graph.node(id).inputs().len() {
            let Some(operand) = crate::arch::view::operand_at(graph, id, slot) else {
                continue;
            };
            let Some(dims) = operand.read_dims(graph) else {
                continue;
            };
            let per_neuron = dims.last() == Some(&width) && dims.iter().product::<usize>() == width;
            if per_neuron {
                slice_operand(graph, &operand, dims.len() - 1, keep, label)?;
            }
        }
    }
    Ok(())
}
