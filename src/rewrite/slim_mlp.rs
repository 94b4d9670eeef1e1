//! Pass `slim_mlp`: keeps the listed neurons of a block's MLP: fc1's
//! columns and bias, fc2's rows, and any per-neuron constant inside the
//! activation.

use super::slicing::{slice_input, slice_inputs, slice_outputs};
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
    slice_inputs(graph, &mlp.fc2, keep, label)?;
    // Per-neuron constants inside the activation (rare) shrink too.
    for &id in &mlp.activation {
        let inputs = graph.node(id).inputs().to_vec();
        for (slot, input) in inputs.iter().enumerate() {
            let per_neuron = graph
                .initializer(input)
                .is_some_and(|t| t.dims().last() == Some(&(width as i64)) && t.len() == width);
            let is_fc1_bias = mlp
                .fc1
                .bias
                .as_ref()
                .is_some_and(|b| b.node == id && b.slot == slot);
            if per_neuron && !is_fc1_bias {
                let axis = graph.initializer(input).map_or(0, |t| t.dims().len() - 1);
                slice_input(graph, id, slot, axis, keep, label)?;
            }
        }
    }
    Ok(())
}
