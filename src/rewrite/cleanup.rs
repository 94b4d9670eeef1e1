//! Pass `cleanup`: what the edits left dead goes — nodes no output needs,
//! initializers nothing reads, `value_info` of removed values — and so do
//! the declared shapes inside slimmed sub-blocks, which the slicing made
//! stale (they are optional; runtimes infer them again). This is what makes
//! the file shrink with the parameters removed.

use super::{Edit, RewriteError, Target};

/// Runs the pass (once, over the whole graph).
pub(super) fn run(edit: &mut Edit<'_>, _targets: &[Target<'_>]) -> Result<(), RewriteError> {
    let stale = std::mem::take(&mut edit.stale);
    edit.graph
        .value_info
        .retain(|name, _| !stale.contains(name));
    let dead = edit.graph.eliminate_dead_code();
    edit.dead.add(dead);
    Ok(())
}
