//! Human-readable renderings of what the pipeline found and did.

use std::fmt::Write;
use std::path::{Path, PathBuf};

use crate::arch::Architecture;

/// The files `--report FILE` writes: FILE (JSON), and next to it FILE with
/// its extension replaced by `md` (the summary) and `svg` (the ID plot):
/// `report.json` gives `report.md` and `report.svg`.
pub fn files(report: &Path) -> [PathBuf; 3] {
    [
        report.to_path_buf(),
        report.with_extension("md"),
        report.with_extension("svg"),
    ]
}

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
            let a = &b.attention.body;
            // Decoder traits only where present: encoder tables stay as they were.
            let kv = if a.kv_heads != a.heads {
                format!(", {} kv", a.kv_heads)
            } else {
                String::new()
            };
            let gated = if b.mlp.body.up.is_some() {
                " gated"
            } else {
                ""
            };
            let rms = if b.norm_kind() == "rms" { ", rms" } else { "" };
            let cache = if a.cache.is_some() { ", cache" } else { "" };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} × {}{kv}{cache} | {}{gated} | {}{rms} | {} | {} |",
                tower.kind.name(),
                b.index,
                b.hidden,
                a.heads,
                a.head_dim,
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
    for note in &arch.outside {
        let _ = writeln!(out, "outside the block chain (left as it is): {note}");
    }
    out
}

/// A Markdown table of per-layer IDs, one column per tower.
pub fn profile_table(profile: &crate::measure::Profile) -> String {
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
pub fn profile_svg(profile: &crate::measure::Profile) -> String {
    profile_svg_marked(profile, &[])
}

/// [`profile_svg`] with removed sub-blocks marked: `(tower, block, label)`
/// draws a red ring and the label (`A` attention, `M` MLP) at that point.
pub fn profile_svg_marked(
    profile: &crate::measure::Profile,
    marks: &[(&str, usize, &str)],
) -> String {
    svg_document(&[id_panel(profile, marks, &[])])
}

/// Width and height of one plot panel.
const PANEL: (f64, f64) = (720.0, 360.0);

/// The plot area every SVG panel shares: size, margins and frame.
mod panel {
    pub const W: f64 = super::PANEL.0;
    pub const H: f64 = super::PANEL.1;
    pub const L: f64 = 60.0;
    pub const R: f64 = 20.0;
    pub const T: f64 = 30.0;
    pub const B: f64 = 50.0;

    /// Title, the two axes and their labels.
    pub fn frame(title: &str, x_label: &str, y_label: &str) -> String {
        format!(
            r#"<text x="{}" y="18" text-anchor="middle" font-size="14">{title}</text>
<line x1="{L}" y1="{}" x2="{}" y2="{}" stroke="black"/>
<line x1="{L}" y1="{T}" x2="{L}" y2="{}" stroke="black"/>
<text x="{}" y="{}" text-anchor="middle">{x_label}</text>
<text x="15" y="{}" transform="rotate(-90 15 {})" text-anchor="middle">{y_label}</text>
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
        )
    }
}

/// Panels stacked top to bottom in one SVG document.
fn svg_document(panels: &[String]) -> String {
    let (w, h) = PANEL;
    let total = h * panels.len().max(1) as f64;
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{total}" viewBox="0 0 {w} {total}" font-family="sans-serif" font-size="12">
<rect width="{w}" height="{total}" fill="white"/>
"#
    );
    for (i, panel) in panels.iter().enumerate() {
        let _ = writeln!(svg, r#"<g transform="translate(0 {})">"#, h * i as f64);
        svg.push_str(panel);
        svg.push_str("</g>\n");
    }
    svg.push_str("</svg>\n");
    svg
}

/// The ID-per-block plot; `notes` are extra legend lines (the towers'
/// kept shares in a run report).
fn id_panel(
    profile: &crate::measure::Profile,
    marks: &[(&str, usize, &str)],
    notes: &[String],
) -> String {
    use panel::{B, H, L, R, T, W};
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
    let mut svg = panel::frame("Intrinsic dimension per block", "block", "ID");
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
    for (t, (tower, block, label)) in marks.iter().enumerate() {
        let Some(layer) = profile
            .towers
            .iter()
            .find(|p| p.name == *tower)
            .and_then(|p| p.layers.iter().find(|l| l.block == *block))
        else {
            continue;
        };
        let (cx, cy) = (x(layer.block), y(layer.estimate.id));
        let _ = writeln!(
            svg,
            r##"<circle cx="{cx:.1}" cy="{cy:.1}" r="7" fill="none" stroke="#d62728" stroke-width="2"/>"##
        );
        let dy = if t % 2 == 0 { -10.0 } else { 18.0 };
        let _ = writeln!(
            svg,
            r##"<text x="{:.1}" y="{:.1}" fill="#d62728" text-anchor="middle">{label}</text>"##,
            cx,
            cy + dy
        );
    }
    if !marks.is_empty() {
        let _ = writeln!(
            svg,
            r##"<text x="{}" y="{}" fill="#d62728">removed: A attention, M MLP</text>"##,
            L + 10.0,
            T + 16.0
        );
    }
    for (i, note) in notes.iter().enumerate() {
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}">{}</text>"#,
            L + 10.0,
            T + 16.0 * (i as f64 + 2.0),
            xml_text(note)
        );
    }
    svg
}

/// `text` safe inside an SVG text element.
fn xml_text(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Output change of removing each sub-block alone against its ID, one
/// colour per tower, with the rank correlations in the legend.
fn sensitivity_panel(s: &crate::decide::Sensitivity) -> String {
    use panel::{B, H, L, R, T, W};
    let id_top = s.sub_blocks.iter().map(|c| c.id).fold(1.0f64, f64::max) * 1.1;
    // Output changes span decades: a log axis from the smallest non-zero.
    let floor = s
        .sub_blocks
        .iter()
        .map(|c| c.output_change)
        .filter(|&v| v > 0.0)
        .fold(1.0f64, f64::min)
        .max(1e-9);
    let ceil = s
        .sub_blocks
        .iter()
        .map(|c| c.output_change)
        .fold(floor * 10.0, f64::max);
    let (lo, hi) = (
        floor.log10().floor(),
        ceil.log10().ceil().max(floor.log10().floor() + 1.0),
    );
    let x = |v: f64| L + (W - L - R) * v / id_top;
    let y = |v: f64| {
        let l = v.max(floor).log10();
        H - B - (H - T - B) * (l - lo) / (hi - lo)
    };
    let mut svg = panel::frame(
        "Cost of removing one sub-block alone against its ID",
        "ID of the sub-block's output",
        "1 − output cosine (log)",
    );
    for k in 0..=4 {
        let v = id_top * k as f64 / 4.0;
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{v:.1}</text>"#,
            x(v),
            H - B + 16.0
        );
    }
    for e in lo as i32..=hi as i32 {
        let v = 10f64.powi(e);
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{:.1}" text-anchor="end">1e{e}</text>"#,
            L - 6.0,
            y(v) + 4.0
        );
    }
    let rho = |r: Option<f64>| r.map_or("n/a".to_string(), |r| format!("{r:+.2}"));
    for (t, tower) in s.towers.iter().enumerate() {
        let colour = if tower.tower == crate::arch::TowerKind::Vision {
            "#1f77b4"
        } else {
            "#ff7f0e"
        };
        // A removal that could not be applied has no cost to plot.
        for c in s
            .sub_blocks
            .iter()
            .filter(|c| c.tower == tower.tower && c.output_change.is_finite() && c.id.is_finite())
        {
            let (cx, cy) = (x(c.id), y(c.output_change));
            if c.part == crate::decide::Part::Attention {
                let _ = writeln!(
                    svg,
                    r#"<circle cx="{cx:.1}" cy="{cy:.1}" r="4" fill="{colour}"/>"#
                );
            } else {
                let _ = writeln!(
                    svg,
                    r#"<rect x="{:.1}" y="{:.1}" width="8" height="8" fill="{colour}"/>"#,
                    cx - 4.0,
                    cy - 4.0
                );
            }
        }
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" fill="{colour}">{}: mean ID {:.2}, Spearman ID {} · influence {} · score {}</text>"#,
            L + 10.0,
            T + 16.0 * (t as f64 + 1.0),
            tower.tower.name(),
            tower.mean_id,
            rho(tower.spearman_id),
            rho(tower.spearman_influence),
            rho(tower.spearman_score)
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}">● attention  ■ MLP</text>"#,
        L + 10.0,
        T + 16.0 * (s.towers.len() as f64 + 1.0)
    );
    svg
}

/// The run report: JSON for machines, Markdown and SVG for people.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// Input model.
    pub input: String,
    /// Output model.
    pub output: String,
    /// Requested fraction of block parameters to keep (plan-driven runs: none).
    pub keep_params: Option<f64>,
    /// Per-tower kept fractions requested (`--vision-keep`, `--text-keep`).
    pub tower_keep: serde_json::Value,
    /// What could be removed (`--mode`).
    pub mode: Option<crate::decide::Mode>,
    /// Importance score used.
    pub score: Option<crate::decide::Score>,
    /// Parameters before and after: in total as stored in the files, and
    /// in blocks and per tower as the network uses them (a tensor the
    /// exporter shares between layers counts once per layer there).
    pub params: serde_json::Value,
    /// Approximate linear-layer FLOPs per token inside blocks
    /// (2 × block parameters), before and after.
    pub block_flops_per_token: [u64; 2],
    /// File sizes (model + external data) before and after.
    pub bytes: [u64; 2],
    /// The plan applied.
    pub plan: crate::plan::Plan,
    /// The rewrites made.
    pub rewrites: Vec<String>,
    /// How the model's inputs and outputs changed: a decoder's cache
    /// entries removed or narrowed (absent when the interface is unchanged).
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub interface: Vec<String>,
    /// Per sub-block measurements and decisions.
    pub candidates: Vec<crate::decide::Candidate>,
    /// `unstructured` mode: per linear layer, its ID, threshold and the
    /// weights zeroed.
    pub masks: Vec<crate::decide::Mask>,
    /// The allocations tried on decision samples (tower splits; in `all`
    /// mode also shares of the budget taken as sub-blocks).
    pub trials: Vec<crate::decide::Trial>,
    /// `--sensitivity`: each sub-block removed alone, and how its ID ranks
    /// that cost.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sensitivity: Option<crate::decide::Sensitivity>,
    /// Least-squares refits (`--repair lsq`): per projection, the relative
    /// output error with rows dropped and after the refit.
    pub refits: Vec<crate::rewrite::repair::Refit>,
    /// Fidelity on held-out samples.
    pub fidelity: Option<crate::verify::Fidelity>,
    /// Samples used for decisions and held out.
    pub samples: serde_json::Value,
    /// The execution provider that ran.
    pub provider: Option<crate::calib::Provider>,
    /// Seconds per stage.
    pub timings: Vec<(String, f64)>,
    /// A folder's files: `pruned` (path, role, bytes before and after),
    /// `unpruned` model files copied unchanged (and why), `copied` (every
    /// file copied unchanged).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub files: Option<serde_json::Value>,
}

/// What a run did, as the pipeline hands it to the report.
#[derive(Debug, Clone, Copy)]
pub struct RunFacts<'a> {
    /// The model read.
    pub input: &'a Path,
    /// How the report names it, when not by its path.
    pub input_name: Option<&'a str>,
    /// The model written.
    pub output: &'a Path,
    /// The decision settings, when the plan was made from calibration data.
    pub settings: Option<&'a crate::decide::DecideOptions>,
    /// The original graph.
    pub graph: &'a crate::ir::Graph,
    /// Its architecture (none for an empty plan).
    pub arch: Option<&'a Architecture>,
    /// Bytes of the model read (and its external data).
    pub input_bytes: u64,
    /// Parameters stored in the written model ([`crate::arch::stored_params`]).
    pub stored_after: u64,
    /// What was written.
    pub saved: &'a crate::onnx::SaveSummary,
    /// The plan applied.
    pub plan: &'a crate::plan::Plan,
    /// The rewrites made.
    pub rewrites: &'a [String],
    /// How the interface changed.
    pub interface: &'a [String],
    /// The decision, when made here.
    pub decision: Option<&'a crate::decide::Decision>,
    /// Decision and held-out samples, when calibrated.
    pub samples: Option<(usize, usize)>,
    /// The provider that ran calibration.
    pub provider: Option<crate::calib::Provider>,
    /// Least-squares refits.
    pub refits: &'a [crate::rewrite::repair::Refit],
    /// Fidelity on held-out samples.
    pub fidelity: Option<&'a crate::verify::Fidelity>,
    /// Seconds per stage.
    pub timings: &'a [(&'static str, f64)],
    /// A folder's files (see [`Report::files`]).
    pub files: Option<&'a serde_json::Value>,
}

impl Report {
    /// Gathers what a run did.
    pub fn new(facts: &RunFacts<'_>) -> Self {
        let before = facts.arch;
        // After-counts come from what the plan removes, not from
        // re-discovering the pruned graph (a block without attention is no
        // longer a transformer block to the matchers, but its MLP remains).
        let removed = before
            .map(|a| crate::decide::budget::removed_params(a, facts.graph, facts.plan))
            .unwrap_or_default();
        let mut towers_before = serde_json::Map::new();
        let mut towers_after = serde_json::Map::new();
        for t in before.map(|a| a.towers.as_slice()).unwrap_or_default() {
            let params: u64 = t.blocks.iter().map(|b| b.params).sum();
            let gone = removed
                .iter()
                .find(|(k, _)| *k == t.kind)
                .map_or(0, |r| r.1);
            towers_before.insert(t.kind.name().into(), params.into());
            towers_after.insert(t.kind.name().into(), (params - gone.min(params)).into());
        }
        let blocks_before = before.map_or(0, |a| a.params_blocks());
        let blocks_after =
            blocks_before - removed.iter().map(|r| r.1).sum::<u64>().min(blocks_before);
        let total_before = before.map(|a| a.params_total);
        let decision = facts.decision;
        let settings = facts.settings;
        Report {
            input: facts
                .input_name
                .map_or_else(|| facts.input.display().to_string(), str::to_string),
            output: facts.output.display().to_string(),
            keep_params: settings.and_then(|o| o.budget.keep),
            tower_keep: serde_json::json!({
                "vision": settings.and_then(|o| o.budget.vision),
                "text": settings.and_then(|o| o.budget.text),
            }),
            mode: settings.map(|o| o.mode),
            score: settings.map(|o| o.score),
            params: serde_json::json!({
                "blocks_before": blocks_before,
                "blocks_after": blocks_after,
                "blocks_kept": blocks_after as f64 / blocks_before.max(1) as f64,
                "total_before": total_before,
                "total_after": facts.stored_after,
                "towers_before": towers_before,
                "towers_after": towers_after,
            }),
            block_flops_per_token: [2 * blocks_before, 2 * blocks_after],
            bytes: [
                facts.input_bytes,
                facts.saved.model_bytes + facts.saved.external_bytes,
            ],
            plan: facts.plan.clone(),
            rewrites: facts.rewrites.to_vec(),
            interface: facts.interface.to_vec(),
            candidates: decision.map(|d| d.candidates.clone()).unwrap_or_default(),
            masks: decision.map(|d| d.masks.clone()).unwrap_or_default(),
            trials: decision.map(|d| d.trials.clone()).unwrap_or_default(),
            sensitivity: decision.and_then(|d| d.sensitivity.clone()),
            refits: facts.refits.to_vec(),
            fidelity: facts.fidelity.cloned(),
            samples: serde_json::json!({
                "decision": facts.samples.map(|s| s.0),
                "holdout": facts.samples.map(|s| s.1),
            }),
            provider: facts.provider,
            timings: facts
                .timings
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            files: facts.files.cloned(),
        }
    }

    /// Pretty JSON with a trailing newline.
    pub fn to_json(&self) -> String {
        let mut text = serde_json::to_string_pretty(self).expect("reports serialize");
        text.push('\n');
        text
    }

    /// A Markdown summary.
    pub fn to_markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# onnx-idprune report\n\n`{}` → `{}`\n",
            self.input, self.output
        );
        let p = &self.params;
        let _ = writeln!(out, "| | before | after | kept |\n|---|---:|---:|---:|");
        let kept = |a: &serde_json::Value, b: &serde_json::Value| match (a.as_f64(), b.as_f64()) {
            (Some(x), Some(y)) if x > 0.0 => format!("{:.1}%", 100.0 * y / x),
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "| block parameters | {} | {} | {} |",
            p["blocks_before"],
            p["blocks_after"],
            kept(&p["blocks_before"], &p["blocks_after"])
        );
        if let Some(towers) = p["towers_before"].as_object() {
            for (name, before) in towers {
                let after = &p["towers_after"][name];
                let _ = writeln!(
                    out,
                    "| {name} tower | {before} | {after} | {} |",
                    kept(before, after)
                );
            }
        }
        let _ = writeln!(
            out,
            "| file bytes | {} | {} | {:.1}% |",
            self.bytes[0],
            self.bytes[1],
            100.0 * self.bytes[1] as f64 / self.bytes[0].max(1) as f64
        );
        if let Some(f) = &self.fidelity {
            let _ = writeln!(out, "\n## Fidelity on {} held-out samples\n", f.samples);
            for o in &f.outputs {
                let _ = writeln!(out, "- `{}`: mean cosine {:.6}", o.name, o.cosine);
            }
            if let Some(t) = f.top1_agreement {
                let _ = writeln!(out, "- image→text top-1 agreement: {:.1}%", 100.0 * t);
            }
            if let Some(t) = f.next_token_agreement {
                let _ = writeln!(
                    out,
                    "- next-token top-1 agreement (teacher forcing): {:.1}%",
                    100.0 * t
                );
            }
            if let Some(c) = &f.captions {
                let _ = writeln!(
                    out,
                    "- greedy captions ({} of {} tokens): {:.1}% identical, {:.1}% of tokens the same",
                    c.captions,
                    c.tokens,
                    100.0 * c.exact_match,
                    100.0 * c.token_agreement
                );
            }
            if let Some(g) = &f.generations {
                let _ = writeln!(
                    out,
                    "- greedy generations with the cache ({} prompts of {} tokens, {} tokens each): {:.1}% identical, {:.1}% of tokens the same",
                    g.prompts,
                    g.prompt_tokens,
                    g.tokens,
                    100.0 * g.exact_match,
                    100.0 * g.token_agreement
                );
            }
        }
        if !self.candidates.is_empty() {
            let _ = writeln!(
                out,
                "\n## Sub-blocks\n\n| tower | block | part | params | ID | influence | score | removed | units kept |\n|---|---:|---|---:|---:|---:|---:|---|---:|"
            );
            for c in &self.candidates {
                let _ = writeln!(
                    out,
                    "| {} | {} | {:?} | {} | {:.2} | {:.4} | {:.4} | {} | {} |",
                    c.tower.name(),
                    c.block,
                    c.part,
                    c.params,
                    c.id,
                    c.influence,
                    c.score,
                    if c.removed { "yes" } else { "" },
                    c.units
                        .map_or(String::new(), |[kept, total]| format!("{kept}/{total}"))
                );
            }
        }
        if !self.trials.is_empty() {
            let _ = writeln!(
                out,
                "\n## Allocations tried on decision samples\n\n| allocation | min cosine | top-1 agreement | chosen |\n|---|---:|---:|---|"
            );
            for t in &self.trials {
                let label = match &t.same_plan_as {
                    Some(first) => format!("{} (same plan as {first})", t.label),
                    None => t.label.clone(),
                };
                let _ = writeln!(
                    out,
                    "| {label} | {:.4} | {} | {} |",
                    t.min_cosine,
                    t.top1_agreement
                        .map_or(String::new(), |a| format!("{:.1}%", 100.0 * a)),
                    if t.chosen { "yes" } else { "" }
                );
            }
            if let Some(spread) = self
                .trials
                .iter()
                .filter_map(|t| t.top1_spread)
                .find(|&s| s < crate::decide::search::MIN_TOP1_SPREAD)
            {
                let _ = writeln!(
                    out,
                    "\nThe original's top-1 picks were spread over {:.0}% as many texts as \
                     images, too few for the agreement to mean much: the cosine ranked.",
                    100.0 * spread
                );
            }
        }
        if let Some(s) = &self.sensitivity {
            out.push_str(&sensitivity_markdown(s));
        }
        if let Some(files) = &self.files {
            out.push_str(&files_markdown(files));
        }
        let _ = writeln!(out, "\n## Rewrites\n");
        for r in &self.rewrites {
            let _ = writeln!(out, "- {r}");
        }
        if !self.interface.is_empty() {
            let _ = writeln!(
                out,
                "\n## Interface changes\n\nA runtime feeding this model must follow these (every other input and output is as it was):\n"
            );
            for line in &self.interface {
                let _ = writeln!(out, "- {line}");
            }
        }
        out
    }

    /// ID per block (the stream each MLP writes), vision vs text, removed
    /// sub-blocks marked.
    pub fn to_svg(&self) -> String {
        use crate::decide::Part;
        let mut towers: Vec<crate::measure::TowerProfile> = Vec::new();
        for c in self.candidates.iter().filter(|c| c.part == Part::Mlp) {
            let estimate = crate::id::IdEstimate {
                estimator: crate::id::Estimator::Twonn,
                variant: crate::id::Variant::Facco,
                n: 0,
                dim: 0,
                duplicates_removed: 0,
                id: c.id,
            };
            let layer = crate::measure::LayerId {
                block: c.block,
                estimate,
            };
            match towers.iter_mut().find(|t| t.name == c.tower.name()) {
                Some(t) => t.layers.push(layer),
                None => towers.push(crate::measure::TowerProfile {
                    name: c.tower.name(),
                    layers: vec![layer],
                }),
            }
        }
        let marks: Vec<(&'static str, usize, &'static str)> = self
            .candidates
            .iter()
            .filter(|c| c.removed)
            .map(|c| {
                (
                    c.tower.name(),
                    c.block,
                    if c.part == Part::Attention { "A" } else { "M" },
                )
            })
            .collect();
        let profile = crate::measure::Profile {
            towers,
            samples: 0,
            pooling: crate::calib::Pooling::Flatten,
            provider: self.provider.unwrap_or(crate::calib::Provider::Cpu),
        };
        let mut notes = Vec::new();
        if let (Some(before), Some(after)) = (
            self.params["towers_before"].as_object(),
            self.params["towers_after"].as_object(),
        ) {
            for (name, b) in before {
                if let (Some(b), Some(a)) = (b.as_f64(), after.get(name).and_then(|a| a.as_f64())) {
                    notes.push(format!(
                        "{name} keeps {:.1}% of its block parameters",
                        100.0 * a / b.max(1.0)
                    ));
                }
            }
        }
        let mut panels = vec![id_panel(&profile, &marks, &notes)];
        if let Some(s) = &self.sensitivity {
            panels.push(sensitivity_panel(s));
        }
        svg_document(&panels)
    }
}

/// The Markdown section of a sensitivity measurement.
pub fn sensitivity_markdown(s: &crate::decide::Sensitivity) -> String {
    let rho = |r: Option<f64>| r.map_or("n/a".to_string(), |r| format!("{r:+.3}"));
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n## Sensitivity: each sub-block removed alone\n\n| tower | mean ID | sub-blocks | mean output change | Spearman ID | Spearman influence | Spearman {} |\n|---|---:|---:|---:|---:|---:|---:|",
        serde_json::to_value(s.score)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default()
    );
    for t in &s.towers {
        let _ = writeln!(
            out,
            "| {} | {:.2} | {} | {:.5} | {} | {} | {} |",
            t.tower.name(),
            t.mean_id,
            t.sub_blocks,
            t.mean_output_change,
            rho(t.spearman_id),
            rho(t.spearman_influence),
            rho(t.spearman_score)
        );
    }
    let _ = writeln!(
        out,
        "\nBoth towers: Spearman ID {} · score {}. Output change = 1 − the smallest per-output mean cosine to the original; a positive correlation means a higher ID marks a costlier removal (the paper's premise).\n\n| tower | block | part | ID | influence | output change | top-1 agreement |\n|---|---:|---|---:|---:|---:|---:|",
        rho(s.spearman_id),
        rho(s.spearman_score)
    );
    for c in &s.sub_blocks {
        let _ = writeln!(
            out,
            "| {} | {} | {:?} | {:.2} | {:.4} | {:.5} | {} |",
            c.tower.name(),
            c.block,
            c.part,
            c.id,
            c.influence,
            c.output_change,
            c.top1_agreement
                .map_or(String::new(), |a| format!("{:.1}%", 100.0 * a))
        );
    }
    out
}

/// A folder's files: the pruned ones with their sizes, the model files left
/// unpruned and why, and how many files were copied.
fn files_markdown(files: &serde_json::Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n## Files\n\n| file | role | bytes before | bytes after |\n|---|---|---:|---:|"
    );
    for f in files["pruned"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "| `{}` | {} | {} | {} |",
            f["path"].as_str().unwrap_or(""),
            f["role"].as_str().unwrap_or(""),
            f["bytes_before"],
            f["bytes_after"]
        );
    }
    for u in files["unpruned"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "\nNot pruned, copied unchanged: `{}`: {}.",
            u["path"].as_str().unwrap_or(""),
            u["reason"].as_str().unwrap_or("")
        );
    }
    let copied = files["copied"].as_array().map_or(0, Vec::len);
    let _ = writeln!(out, "\n{copied} other files copied unchanged.");
    out
}
