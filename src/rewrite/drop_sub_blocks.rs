//! Pass `drop_sub_blocks`: removes attention or MLP sub-blocks
//! (`drop_attention`, `drop_mlp`): the branch contributes nothing and the
//! stream goes on from the sub-block's input. A post-norm block keeps the
//! norm after the removed branch.

use super::residual::bypass_join;
use super::{Edit, RewriteError, Target};

/// Runs the pass over every target that drops a sub-block.
pub(super) fn run(edit: &mut Edit<'_>, targets: &[Target<'_>]) -> Result<(), RewriteError> {
    for target in targets {
        let (action, block) = (target.action, target.block);
        let subs = [
            (
                action.drop_attention,
                "drop_attention",
                &block.attention.join,
            ),
            (action.drop_mlp, "drop_mlp", &block.mlp.join),
        ];
        for (wanted, name, join) in subs {
            if wanted {
                let label = format!("{name} {}", action.label());
                let shift = edit.compensation.get(&join.node).cloned();
                bypass_join(
                    edit,
                    join,
                    &join.stream_in,
                    block,
                    true,
                    shift.as_deref(),
                    &label,
                )?;
                edit.rewrites.push(label);
            }
        }
    }
    Ok(())
}
