//! Human-readable renderings of what the pipeline found and did.

use std::fmt::Write;

use crate::arch::Architecture;

/// A Markdown table of towers and blocks (what `inspect` prints).
pub fn architecture_table(arch: &Architecture) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| tower | block | hidden | heads × dim | MLP | norm | cross-attn | params |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---|---|---:|");
    for tower in &arch.towers {
        for b in &tower.blocks {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} × {} | {} | {} | {} | {} |",
                tower.kind.name(),
                b.index,
                b.hidden,
                b.attention.body.heads,
                b.attention.body.head_dim,
                b.mlp.body.width(),
                serde_json::to_value(b.norm)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default(),
                if b.cross_attention.is_some() {
                    "yes"
                } else {
                    "no"
                },
                b.params
            );
        }
    }
    let blocks = arch.params_blocks();
    let _ = writeln!(
        out,
        "\n{} parameters in total, {} ({:.1}%) in transformer blocks",
        arch.params_total,
        blocks,
        100.0 * blocks as f64 / arch.params_total.max(1) as f64
    );
    for note in &arch.unmatched {
        let _ = writeln!(out, "note: {note} is not part of a recognised block");
    }
    out
}
