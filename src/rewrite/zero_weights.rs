//! Pass `zero_below`: unstructured masking. Weights of a block's linear
//! layers with |w| below the plan's threshold become 0, in a copy of the
//! weight (biases are untouched). It runs after slicing, on the weights as
//! they are then, so it composes with head and neuron pruning.

use super::slicing::{NewValues, Scales, replace_values};
use super::{Edit, RewriteError, Target};
use crate::arch::view::operand_at;
use crate::ir::{Graph, NodeId};

/// Runs the pass over every target with a `zero_below` action.
pub(super) fn run(edit: &mut Edit<'_>, targets: &[Target<'_>]) -> Result<(), RewriteError> {
    for target in targets {
        let Some(zero) = &target.action.zero_below else {
            continue;
        };
        for site in target.block.linears() {
            let Some(&threshold) = zero.get(site.role) else {
                continue;
            };
            let label = format!("zero_below {} {}", target.action.label(), site.role);
            let (zeroed, total) = zero_small_weights(edit.graph, site.node, threshold, &label)?;
            edit.rewrites.push(format!(
                "{label} (|w| < {threshold:e}: {zeroed} of {total})"
            ));
        }
    }
    Ok(())
}

/// Zeroes the weights with |w| < `threshold` of the linear layer read by
/// `node` (at input 1), as a new tensor of the type the node reads (a
/// dequantised weight is replaced by its float values). Works on the
/// weight as it is now, so it composes with head and neuron slicing.
/// Returns (zeroed, total) element counts.
fn zero_small_weights(
    graph: &mut Graph,
    node: NodeId,
    threshold: f64,
    label: &str,
) -> Result<(usize, usize), RewriteError> {
    let unsupported = |reason: String| RewriteError::Unsupported {
        label: label.into(),
        reason,
    };
    let operand = operand_at(graph, node, 1)
        .ok_or_else(|| unsupported("the weight is not a constant".into()))?;
    let (mut values, dims) = operand.values(graph).ok_or_else(|| {
        unsupported(format!(
            "weight '{}' cannot be read as numbers",
            operand.storage
        ))
    })?;
    let mut zeroed = 0;
    for v in values.iter_mut() {
        if (v.abs() as f64) < threshold && *v != 0.0 {
            *v = 0.0;
            zeroed += 1;
        }
    }
    let total = values.len();
    let dims: Vec<i64> = dims.iter().map(|&d| d as i64).collect();
    let new = NewValues {
        dims,
        values: &values,
        scales: Scales::Keep,
    };
    replace_values(graph, node, 1, "masked", new, label)?;
    Ok((zeroed, total))
}
