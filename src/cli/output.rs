//! What the commands print: results on stdout (tables, JSON), one summary
//! line on stderr.

use std::path::Path;

use crate::arch::Architecture;
use crate::id::IdEstimate;
use crate::measure::Profile;
use crate::pipeline::{CalibSummary, Outcome};
use crate::report;

/// The main job's summary line.
pub fn pruned(output: &Path, outcome: &Outcome) -> String {
    let mut line = format!(
        "wrote {} ({} bytes",
        output.display(),
        outcome.saved.model_bytes
    );
    if let Some(data) = &outcome.saved.external_file {
        line.push_str(&format!(
            " + {} bytes in {}",
            outcome.saved.external_bytes,
            data.display()
        ));
    }
    let blocks = outcome.plan.blocks.len();
    line.push_str(&format!(
        "; plan: {blocks} block action{}",
        if blocks == 1 { "" } else { "s" }
    ));
    if let Some(f) = &outcome.fidelity {
        line.push_str(&format!("; held-out cosine {:.4}", f.min_cosine));
        if let Some(t) = f.top1_agreement {
            line.push_str(&format!(", top-1 agreement {:.1}%", 100.0 * t));
        }
        if let Some(t) = f.next_token_agreement {
            line.push_str(&format!(", next-token agreement {:.1}%", 100.0 * t));
        }
        if let Some(c) = &f.captions {
            line.push_str(&format!(
                ", greedy captions {:.1}% identical ({:.1}% of tokens)",
                100.0 * c.exact_match,
                100.0 * c.token_agreement
            ));
        }
        if let Some(g) = &f.generations {
            line.push_str(&format!(
                ", cached greedy generations {:.1}% identical ({:.1}% of tokens)",
                100.0 * g.exact_match,
                100.0 * g.token_agreement
            ));
        }
    }
    line.push(')');
    line
}

/// `inspect`: JSON or a table.
pub fn architecture(arch: &Architecture, json: bool) -> String {
    if json {
        pretty(&arch.to_json())
    } else {
        report::architecture_table(arch)
    }
}

/// `inspect DIR`: each pruned file's towers (JSON or tables), and the model
/// files that would be copied unchanged.
pub fn folder(folder: &crate::pipeline::FolderInspection, json: bool) -> String {
    if json {
        let files: Vec<serde_json::Value> = folder
            .files
            .iter()
            .map(|f| {
                let mut entry = f
                    .architecture
                    .as_ref()
                    .map_or_else(|| serde_json::json!({"towers": []}), Architecture::to_json);
                entry["path"] = serde_json::json!(f.path);
                entry["role"] = serde_json::json!(f.role.name());
                entry
            })
            .collect();
        let unpruned: Vec<serde_json::Value> = folder
            .unpruned
            .iter()
            .map(|u| serde_json::json!({"path": u.path, "reason": u.reason}))
            .collect();
        return pretty(&serde_json::json!({"files": files, "unpruned": unpruned}));
    }
    let mut out = String::new();
    for f in &folder.files {
        out.push_str(&format!(
            "## {} ({})\n\n{}\n",
            f.path.display(),
            f.role.describe(),
            f.architecture.as_ref().map_or_else(
                || "no transformer blocks (an embedding table, joined to the model that reads it)\n".to_string(),
                report::architecture_table
            )
        ));
    }
    for u in &folder.unpruned {
        out.push_str(&format!(
            "not pruned, copied unchanged: {}: {}\n",
            u.path.display(),
            u.reason
        ));
    }
    out
}

/// `id IN`: JSON or a table.
pub fn profile(profile: &Profile, json: bool) -> String {
    if json {
        pretty(profile)
    } else {
        report::profile_table(profile)
    }
}

/// `id --data`: JSON or a sentence.
pub fn estimate(path: &Path, estimate: &IdEstimate, json: bool) -> String {
    if json {
        let mut text = serde_json::to_string(estimate).expect("estimates serialize");
        text.push('\n');
        text
    } else {
        format!(
            "{}: intrinsic dimension {:.3} ({:?}/{:?}; {} samples of dimension {}, {} duplicates removed)\n",
            path.display(),
            estimate.id,
            estimate.estimator,
            estimate.variant,
            estimate.n,
            estimate.dim,
            estimate.duplicates_removed
        )
    }
}

/// `calib`'s summary line.
pub fn calibration(output: &Path, summary: &CalibSummary) -> String {
    format!(
        "wrote {} ({} samples: {})",
        output.display(),
        summary.samples,
        summary
            .arrays
            .iter()
            .map(|(k, shape)| format!("{k} {shape:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

fn pretty(value: &impl serde::Serialize) -> String {
    let mut text = serde_json::to_string_pretty(value).expect("results serialize");
    text.push('\n');
    text
}
