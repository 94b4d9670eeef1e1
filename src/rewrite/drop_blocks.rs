//! Pass `drop_blocks`: removes whole blocks. The block's output is
//! rewired to its input; in post-norm blocks the block's norms go too, and
//! in fused pre-norm models the norm that the block's last join computed
//! for the *next* block is recreated as a `LayerNormalization` of the
//! block input.

use super::residual::bypass_join;
use super::{Edit, RewriteError, Target};

/// Runs the pass over every target that is dropped.
pub(super) fn run(edit: &mut Edit<'_>, targets: &[Target<'_>]) -> Result<(), RewriteError> {
    for target in targets.iter().filter(|t| t.action.drop) {
        let block = target.block;
        let label = format!("drop_block {}", target.action.label());
        // A pre-norm block's branches are replaced by their means; a
        // post-norm block takes its norms with it.
        let parts: Vec<&Vec<f32>> = [&block.attention.join, &block.mlp.join]
            .iter()
            .filter_map(|j| edit.compensation.get(&j.node))
            .collect();
        let shift: Option<Vec<f32>> = (!block.norm_after_join && !parts.is_empty()).then(|| {
            let width = parts[0].len();
            let mut sum = vec![0f32; width];
            for p in parts.iter().filter(|p| p.len() == width) {
                for (s, v) in sum.iter_mut().zip(p.iter()) {
                    *s += v;
                }
            }
            sum
        });
        bypass_join(
            edit,
            &block.mlp.join,
            block.input(),
            block,
            false,
            shift.as_deref(),
            &label,
        )?;
        edit.rewrites.push(label);
    }
    Ok(())
}
