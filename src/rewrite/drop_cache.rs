//! Pass `drop_cache`: a decoder layer whose attention went (the layer
//! dropped, or its attention) no longer reads or writes its key/value
//! cache, so its `past_key_values.N.*` inputs and `present.N.*` outputs
//! go (a decoder without past: its presents); every other name stays.
//! Exporters read the past length (and the
//! batch size) off the first layer's past inputs with `Shape` (TorchScript
//! through a one-input `Concat`); such reads move to the same input of a
//! layer that keeps its cache, whose batch and sequence axes are the same.

use super::{Edit, RewriteError, Target};
use crate::arch::Cache;
use crate::ir::{Graph, NodeId};

/// Runs the pass over every target whose attention is removed.
pub(super) fn run(edit: &mut Edit<'_>, targets: &[Target<'_>]) -> Result<(), RewriteError> {
    let removed: Vec<&Cache> = targets
        .iter()
        .filter(|t| t.action.drop || t.action.drop_attention)
        .filter_map(|t| t.block.attention.body.cache.as_ref())
        .collect();
    if removed.is_empty() {
        return Ok(());
    }
    let label = "drop_cache";
    let gone = |c: &Cache| removed.contains(&c);
    // Kept layers' caches whose head axis is unchanged (a Shape read of the
    // whole past shape must see the same head count).
    let narrowed: Vec<&str> = targets
        .iter()
        .filter(|t| t.action.keep_heads.is_some())
        .filter_map(|t| t.block.attention.body.cache.as_ref())
        .filter_map(|c| c.past_key.as_deref())
        .collect();
    // Layers that keep a past to read sizes from.
    let kept: Vec<(&str, &str)> = edit
        .caches
        .iter()
        .filter(|c| !gone(c))
        .filter_map(|c| Some((c.past_key.as_deref()?, c.past_value.as_deref()?)))
        .collect();
    for cache in &removed {
        for present in [&cache.present_key, &cache.present_value]
            .into_iter()
            .flatten()
        {
            edit.graph
                .remove_output(present)
                .map_err(RewriteError::graph(label))?;
            edit.interface.push(format!("output '{present}' removed"));
        }
    }
    // The concatenations with the past are unread now: remove them, so
    // that what still reads a past input is what must move.
    edit.graph.eliminate_dead_code();
    for cache in &removed {
        let pasts = [(&cache.past_key, true), (&cache.past_value, false)];
        for (past, key) in pasts
            .into_iter()
            .filter_map(|(p, k)| Some((p.as_ref()?, k)))
        {
            let readers = edit.graph.consumers(past);
            for reader in readers {
                let node = edit.graph.node(reader);
                if !only_shapes_read(edit.graph, reader) {
                    return Err(RewriteError::Unsupported {
                        label: label.into(),
                        reason: format!(
                            "'{past}' is read by {} outside its layer's attention, so the input cannot be removed",
                            node.label()
                        ),
                    });
                }
                let reads_heads = shape_reads(edit.graph, reader, 1);
                let replacement = kept
                    .iter()
                    .filter(|(k, _)| !reads_heads || !narrowed.contains(k))
                    .map(|&(k, v)| if key { k } else { v })
                    .next()
                    .ok_or_else(|| RewriteError::Unsupported {
                        label: label.into(),
                        reason: format!(
                            "the model reads the shape of '{past}', and no layer keeps a cache it could be read from instead"
                        ),
                    })?
                    .to_string();
                let slot = edit
                    .graph
                    .node(reader)
                    .inputs()
                    .iter()
                    .position(|i| i == past)
                    .expect("a consumer reads the value");
                edit.graph
                    .set_input(reader, slot, &replacement)
                    .map_err(RewriteError::graph(label))?;
            }
            edit.graph
                .remove_input(past)
                .map_err(RewriteError::graph(label))?;
            edit.interface.push(format!("input '{past}' removed"));
        }
    }
    edit.rewrites.push(format!(
        "drop_cache ({} layer{})",
        removed.len(),
        if removed.len() == 1 { "" } else { "s" }
    ));
    Ok(())
}

/// Whether `id` is a `Shape`, or a copy of its input (`Identity`, a
/// one-input `Concat`) read only by such nodes: whether what reads a past
/// input reads only its size.
fn only_shapes_read(graph: &Graph, id: NodeId) -> bool {
    let node = graph.node(id);
    if !node.domain().is_empty() {
        return false;
    }
    match node.op() {
        "Shape" => true,
        "Identity" => copies_read_only_shapes(graph, id),
        "Concat" if node.inputs().len() == 1 => copies_read_only_shapes(graph, id),
        _ => false,
    }
}

fn copies_read_only_shapes(graph: &Graph, id: NodeId) -> bool {
    let output = &graph.node(id).outputs()[0];
    !graph.is_output(output)
        && graph
            .consumers(output)
            .into_iter()
            .all(|c| only_shapes_read(graph, c))
}

/// Whether the size reads behind `id` include axis `axis` (a `Shape`'s
/// `start`/`end` attributes, negative ones counted from a rank-4 end).
fn shape_reads(graph: &Graph, id: NodeId, axis: i64) -> bool {
    let node = graph.node(id);
    if node.op() != "Shape" {
        let output = &node.outputs()[0];
        return graph
            .consumers(output)
            .into_iter()
            .any(|c| shape_reads(graph, c, axis));
    }
    let rank = 4;
    let norm = |v: i64| if v < 0 { v + rank } else { v };
    let start = norm(node.attr_int("start").unwrap_or(0));
    let end = norm(node.attr_int("end").unwrap_or(rank));
    start <= axis && axis < end
}
