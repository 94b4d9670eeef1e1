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

/// A Markdown table of per-layer IDs, one column per tower.
pub fn profile_table(profile: &crate::profile::Profile) -> String {
    let mut out = String::new();
    let names: Vec<&str> = profile.towers.iter().map(|t| t.name).collect();
    let _ = writeln!(out, "| block | {} |", names.join(" ID | ") + " ID");
    let _ = writeln!(out, "|---:|{}", "---:|".repeat(names.len()));
    let rows = profile
        .towers
        .iter()
        .map(|t| t.layers.len())
        .max()
        .unwrap_or(0);
    for i in 0..rows {
        let cells: Vec<String> = profile
            .towers
            .iter()
            .map(|t| {
                t.layers
                    .get(i)
                    .map_or(String::new(), |l| format!("{:.2}", l.estimate.id))
            })
            .collect();
        let _ = writeln!(out, "| {i} | {} |", cells.join(" | "));
    }
    for t in &profile.towers {
        let mean =
            t.layers.iter().map(|l| l.estimate.id).sum::<f64>() / t.layers.len().max(1) as f64;
        let _ = writeln!(
            out,
            "\n{}: mean ID {:.2} over {} blocks",
            t.name,
            mean,
            t.layers.len()
        );
    }
    let _ = writeln!(
        out,
        "{} samples, {:?} pooling, provider {}",
        profile.samples, profile.pooling, profile.provider
    );
    out
}

/// An SVG line plot of ID per block, one line per tower.
pub fn profile_svg(profile: &crate::profile::Profile) -> String {
    const W: f64 = 720.0;
    const H: f64 = 360.0;
    const L: f64 = 60.0;
    const R: f64 = 20.0;
    const T: f64 = 30.0;
    const B: f64 = 50.0;
    let blocks = profile
        .towers
        .iter()
        .map(|t| t.layers.len())
        .max()
        .unwrap_or(1)
        .max(2);
    let top = profile
        .towers
        .iter()
        .flat_map(|t| &t.layers)
        .map(|l| l.estimate.id)
        .fold(1.0f64, f64::max)
        * 1.1;
    let x = |i: usize| L + (W - L - R) * i as f64 / (blocks - 1) as f64;
    let y = |v: f64| H - B - (H - T - B) * v / top;
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">
<rect width="{W}" height="{H}" fill="white"/>
<text x="{}" y="18" text-anchor="middle" font-size="14">Intrinsic dimension per block</text>
<line x1="{L}" y1="{}" x2="{}" y2="{}" stroke="black"/>
<line x1="{L}" y1="{T}" x2="{L}" y2="{}" stroke="black"/>
<text x="{}" y="{}" text-anchor="middle">block</text>
<text x="15" y="{}" transform="rotate(-90 15 {})" text-anchor="middle">ID</text>
"#,
        W / 2.0,
        H - B,
        W - R,
        H - B,
        H - B,
        (L + W - R) / 2.0,
        H - 12.0,
        (T + H - B) / 2.0,
        (T + H - B) / 2.0
    );
    for i in 0..blocks {
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{i}</text>"#,
            x(i),
            H - B + 16.0
        );
    }
    for k in 0..=4 {
        let v = top * k as f64 / 4.0;
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{:.1}" text-anchor="end">{v:.0}</text>"#,
            L - 6.0,
            y(v) + 4.0
        );
    }
    for (t, tower) in profile.towers.iter().enumerate() {
        let colour = if tower.name == "vision" {
            "#1f77b4"
        } else {
            "#ff7f0e"
        };
        let points: Vec<String> = tower
            .layers
            .iter()
            .map(|l| format!("{:.1},{:.1}", x(l.block), y(l.estimate.id)))
            .collect();
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
            points.join(" ")
        );
        for l in &tower.layers {
            let _ = writeln!(
                svg,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{colour}"/>"#,
                x(l.block),
                y(l.estimate.id)
            );
        }
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" fill="{colour}">{}</text>"#,
            W - R - 80.0,
            T + 16.0 * (t as f64 + 1.0),
            tower.name
        );
    }
    svg.push_str("</svg>\n");
    svg
}
