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
