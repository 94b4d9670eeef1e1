//! Pass `zero_below`: unstructured masking. Weights of a block's linear
//! layers with |w| below the plan's threshold become 0, in a copy of the
//! weight (biases are untouched). It runs after slicing, on the weights as
//! they are then, so it composes with head and neuron pruning.

use super::slicing::{replace_f32_input, weight_read_site};
use super::{Edit, RewriteError, Target};
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
/// `node` (input 1, or behind a Transpose), as a new initializer. Works on
/// the weight as it is now, so it composes with head and neuron slicing.
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
    let (site, slot, _) = weight_read_site(graph, node, label)?;
    let name = graph.node(site).inputs()[slot].clone();
    let tensor = graph.initializer(&name).expect("checked above");
    if tensor.data_type() != 1 {
        return Err(unsupported(format!(
            "weight '{name}' is not float32; unstructured masking edits float32 weights"
        )));
    }
    let mut values = tensor.to_f32().map_err(RewriteError::tensor(label))?;
    let dims = tensor.dims().to_vec();
    let mut zeroed = 0;
    for v in values.iter_mut() {
        if (v.abs() as f64) < threshold && *v != 0.0 {
            *v = 0.0;
            zeroed += 1;
        }
    }
    let total = values.len();
    replace_f32_input(graph, site, slot, "masked", dims, &values, label)?;
    Ok((zeroed, total))
}
