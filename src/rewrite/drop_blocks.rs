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
        bypass_join(edit, &block.mlp.join, block.input(), block, false, &label)?;
        edit.rewrites.push(label);
    }
    Ok(())
}
