//! Plans: the contract between deciding what to prune and rewriting.
//!
//! A plan lists per-block actions; blocks it does not mention stay as they
//! are. It is plain JSON (see DESIGN.md §3) so that a decision made once in a
//! build can be re-applied elsewhere without calibration. Parsing is strict:
//! unknown keys, a wrong `format` or `version`, and contradictory actions on
//! one block are errors that name the offending entry.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::arch::TowerKind;

/// The `format` value every plan carries.
pub const FORMAT: &str = "onnx-idprune-plan";
/// The plan schema version this build reads and writes.
pub const VERSION: u32 = 1;

/// A pruning plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// Always [`FORMAT`].
    pub format: String,
    /// Always [`VERSION`].
    pub version: u32,
    /// Per-block actions.
    #[serde(default)]
    pub blocks: Vec<BlockAction>,
    /// Refit the projections after slimmed sub-blocks on calibration data
    /// (applying the plan then needs the same calibration file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repair: Option<Repair>,
}

/// The repair methods a plan may record: `lsq` refits the projections
/// after slimmed sub-blocks; `bias` replaces each removed sub-block's
/// branch by its mean output; `lsq+bias` does both.
pub const REPAIR_METHODS: &[&str] = &["lsq", "bias", "lsq+bias"];

/// Least-squares repair: after `keep_heads` the attention output
/// projection, after `keep_mlp` the MLP's second linear layer, is refit so
/// that the sub-block's output on the first `samples` calibration samples
/// stays as close as possible to the original's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Repair {
    /// One of [`REPAIR_METHODS`].
    pub method: String,
    /// Calibration samples (the first N of the file) the fit reads.
    pub samples: usize,
}

impl Repair {
    /// Whether the projections after slimmed sub-blocks are refit.
    pub fn refits(&self) -> bool {
        self.method.contains("lsq")
    }

    /// Whether removed sub-blocks are replaced by their mean output.
    pub fn compensates(&self) -> bool {
        self.method.contains("bias")
    }
}

/// What to do with one block. Exactly one action per entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockAction {
    /// The tower (`vision` or `text` in JSON).
    pub tower: TowerKind,
    /// Block index within the tower (execution order, from 0).
    pub index: usize,
    /// Remove the whole block.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub drop: bool,
    /// Remove the attention sub-block.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub drop_attention: bool,
    /// Remove the MLP sub-block.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub drop_mlp: bool,
    /// Attention heads to keep (source indices, ascending).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_heads: Option<Vec<usize>>,
    /// MLP neurons to keep (source indices, ascending).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_mlp: Option<Vec<usize>>,
    /// Unstructured masking: per linear layer of the block ([`LINEAR_ROLES`]),
    /// weights with |w| below the value become 0 (in a copy of the weight;
    /// biases are untouched).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zero_below: Option<std::collections::BTreeMap<String, f64>>,
}

/// Names of a block's linear layers in `zero_below`: separate `q`, `k`, `v`
/// projections or one packed/fused `qkv`, the attention output `out`, and
/// the MLP's `fc1`, `up` (a gated MLP's up projection) and `fc2`.
pub const LINEAR_ROLES: &[&str] = &["q", "k", "v", "qkv", "out", "fc1", "up", "fc2"];

impl BlockAction {
    /// An entry for block `index` of `tower` with no action yet.
    pub fn new(tower: TowerKind, index: usize) -> Self {
        Self {
            tower,
            index,
            drop: false,
            drop_attention: false,
            drop_mlp: false,
            keep_heads: None,
            keep_mlp: None,
            zero_below: None,
        }
    }

    /// "vision/3" style label for messages and logs.
    pub fn label(&self) -> String {
        format!("{}/{}", self.tower.name(), self.index)
    }
}

/// Why a plan cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    /// The plan file could not be read.
    #[error("cannot read plan {}: {error}", path.display())]
    Io {
        /// The plan file.
        path: PathBuf,
        /// The operating system's error.
        error: std::io::Error,
    },
    /// Not valid plan JSON.
    #[error("plan {}: {reason}", path.display())]
    Syntax {
        /// The plan file.
        path: PathBuf,
        /// The parser's message.
        reason: String,
    },
    /// An entry is invalid on its own.
    #[error("plan entry {entry} ({label}): {reason}")]
    Entry {
        /// Position in `blocks`.
        entry: usize,
        /// "tower/index".
        label: String,
        /// What is wrong.
        reason: String,
    },
}

impl Default for Plan {
    fn default() -> Self {
        Self::empty()
    }
}

impl Plan {
    /// The plan that changes nothing.
    pub fn empty() -> Self {
        Plan {
            format: FORMAT.into(),
            version: VERSION,
            blocks: Vec::new(),
            repair: None,
        }
    }

    /// Reads and validates a plan file.
    pub fn read(path: &Path) -> Result<Self, PlanError> {
        // Real plans are kilobytes; 64 MiB leaves room for unstructured
        // plans of very large models without reading a device forever.
        let text = crate::onnx::read_text(path, 64 << 20).map_err(|error| PlanError::Io {
            path: path.into(),
            error,
        })?;
        Self::parse(&text).map_err(|e| match e {
            PlanError::Syntax { reason, .. } => PlanError::Syntax {
                path: path.into(),
                reason,
            },
            other => other,
        })
    }

    /// Parses and validates plan JSON (model-independent checks only).
    pub fn parse(text: &str) -> Result<Self, PlanError> {
        let syntax = |reason: String| PlanError::Syntax {
            path: PathBuf::new(),
            reason,
        };
        let plan: Plan = serde_json::from_str(text).map_err(|e| syntax(e.to_string()))?;
        if plan.format != FORMAT {
            return Err(syntax(format!(
                "format is '{}', expected '{FORMAT}'",
                plan.format
            )));
        }
        if plan.version != VERSION {
            return Err(syntax(format!(
                "version {} is not supported (this build reads version {VERSION})",
                plan.version
            )));
        }
        plan.validate()?;
        Ok(plan)
    }

    /// Model-independent checks: one action per entry, one entry per
    /// block, index lists ascending, unique and non-empty (towers are
    /// checked when the JSON is read).
    pub fn validate(&self) -> Result<(), PlanError> {
        if let Some(repair) = &self.repair {
            let syntax = |reason: String| PlanError::Syntax {
                path: PathBuf::new(),
                reason,
            };
            if !REPAIR_METHODS.contains(&repair.method.as_str()) {
                return Err(syntax(format!(
                    "repair method '{}' is unknown (expected {})",
                    repair.method,
                    REPAIR_METHODS.join(", ")
                )));
            }
            if repair.samples == 0 {
                return Err(syntax("repair needs at least one sample".into()));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for (entry, action) in self.blocks.iter().enumerate() {
            let err = |reason: String| PlanError::Entry {
                entry,
                label: action.label(),
                reason,
            };
            if !seen.insert((action.tower, action.index)) {
                return Err(err("the block is listed more than once".into()));
            }
            let count = [action.drop, action.drop_attention, action.drop_mlp]
                .iter()
                .filter(|b| **b)
                .count()
                + usize::from(action.keep_heads.is_some())
                + usize::from(action.keep_mlp.is_some())
                + usize::from(action.zero_below.is_some());
            if count == 0 {
                return Err(err("no action given".into()));
            }
            if action.drop && count > 1 {
                return Err(err(
                    "'drop' removes the whole block and cannot be combined with other actions"
                        .into(),
                ));
            }
            if action.drop_attention && action.keep_heads.is_some() {
                return Err(err(
                    "'drop_attention' and 'keep_heads' contradict each other".into(),
                ));
            }
            if action.drop_mlp && action.keep_mlp.is_some() {
                return Err(err("'drop_mlp' and 'keep_mlp' contradict each other".into()));
            }
            if let Some(zero) = &action.zero_below {
                if zero.is_empty() {
                    return Err(err("'zero_below' names no layer".into()));
                }
                for (role, threshold) in zero {
                    if !LINEAR_ROLES.contains(&role.as_str()) {
                        return Err(err(format!(
                            "'zero_below' names unknown layer '{role}' (expected one of {})",
                            LINEAR_ROLES.join(", ")
                        )));
                    }
                    if !(threshold.is_finite() && *threshold >= 0.0) {
                        return Err(err(format!(
                            "'zero_below' threshold of '{role}' must be a finite number >= 0"
                        )));
                    }
                    let attention = !matches!(role.as_str(), "fc1" | "fc2");
                    if (attention && action.drop_attention) || (!attention && action.drop_mlp) {
                        return Err(err(format!(
                            "'zero_below' masks '{role}' of a sub-block the entry drops"
                        )));
                    }
                }
            }
            for (what, list) in [
                ("keep_heads", &action.keep_heads),
                ("keep_mlp", &action.keep_mlp),
            ] {
                let Some(list) = list else { continue };
                if list.is_empty() {
                    return Err(err(format!(
                        "'{what}' keeps nothing; use a drop action to remove the sub-block"
                    )));
                }
                if let Some(w) = list.windows(2).find(|w| w[0] >= w[1]) {
                    let kind = if w[0] == w[1] {
                        "duplicated"
                    } else {
                        "not ascending"
                    };
                    return Err(err(format!("'{what}' is {kind} at {}", w[1])));
                }
            }
        }
        Ok(())
    }

    /// Whether the plan changes nothing.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Whether any entry removes a sub-block or a block (what bias
    /// compensation replaces by a mean).
    pub fn drops(&self) -> bool {
        self.blocks
            .iter()
            .any(|b| b.drop || b.drop_attention || b.drop_mlp)
    }

    /// Whether any entry slims a sub-block (what repair refits).
    pub fn slims(&self) -> bool {
        self.blocks
            .iter()
            .any(|b| b.keep_heads.is_some() || b.keep_mlp.is_some())
    }

    /// The canonical form: entries sorted by tower (vision first) and index.
    pub fn normalized(&self) -> Plan {
        let mut plan = self.clone();
        plan.blocks.sort_by_key(|b| (b.tower, b.index));
        plan
    }

    /// Canonical JSON (pretty, stable key order, trailing newline).
    pub fn to_json(&self) -> String {
        let mut text =
            serde_json::to_string_pretty(&self.normalized()).expect("plans always serialize");
        text.push('\n');
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_err(text: &str) -> String {
        Plan::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn reads_the_documented_example() {
        let plan = Plan::parse(
            r#"{"format": "onnx-idprune-plan", "version": 1, "blocks": [
                {"tower": "vision", "index": 3, "drop": true},
                {"tower": "text", "index": 5, "drop_attention": true},
                {"tower": "text", "index": 6, "drop_mlp": true},
                {"tower": "vision", "index": 0, "keep_heads": [0, 1, 2, 4]},
                {"tower": "text", "index": 2, "keep_mlp": [0, 5, 9]}]}"#,
        )
        .unwrap();
        assert_eq!(plan.blocks.len(), 5);
        let again = Plan::parse(&plan.to_json()).unwrap();
        assert_eq!(again, plan.normalized());
        assert_eq!(again.blocks[0].label(), "vision/0");
    }

    #[test]
    fn rejects_bad_plans_naming_the_entry() {
        assert!(parse_err(r#"{"format":"x","version":1}"#).contains("format"));
        assert!(parse_err(r#"{"format":"onnx-idprune-plan","version":2}"#).contains("version 2"));
        assert!(
            parse_err(r#"{"format":"onnx-idprune-plan","version":1,"extra":1}"#).contains("extra")
        );
        let entry = |body: &str| {
            parse_err(&format!(
                r#"{{"format":"onnx-idprune-plan","version":1,"blocks":[{body}]}}"#
            ))
        };
        assert!(
            entry(r#"{"tower":"audio","index":0,"drop":true}"#).contains("unknown tower 'audio'")
        );
        assert!(entry(r#"{"tower":"text","index":0}"#).contains("no action"));
        assert!(entry(r#"{"tower":"text","index":0,"keep_heads":[]}"#).contains("keeps nothing"));
        assert!(entry(r#"{"tower":"text","index":0,"keep_heads":[1,1]}"#).contains("duplicated"));
        assert!(entry(r#"{"tower":"text","index":0,"keep_mlp":[3,1]}"#).contains("not ascending"));
        assert!(
            entry(r#"{"tower":"text","index":0,"drop":true,"drop_mlp":true}"#)
                .contains("cannot be combined")
        );
        assert!(
            entry(r#"{"tower":"text","index":0,"zero_below":{"fc3":0.1}}"#)
                .contains("unknown layer 'fc3'")
        );
        assert!(entry(r#"{"tower":"text","index":0,"zero_below":{}}"#).contains("names no layer"));
        assert!(entry(r#"{"tower":"text","index":0,"zero_below":{"fc1":-1}}"#).contains("finite"));
        assert!(
            entry(r#"{"tower":"text","index":0,"drop_mlp":true,"zero_below":{"fc1":0.5}}"#)
                .contains("drops")
        );
        assert!(
            entry(r#"{"tower":"text","index":0,"drop":true,"zero_below":{"q":0.5}}"#)
                .contains("cannot be combined")
        );
        assert!(entry(r#"{"tower":"text","index":1,"drop":true},{"tower":"text","index":1,"drop_mlp":true}"#)
            .contains("entry 1 (text/1)"));
        assert!(entry(r#"{"tower":"text","index":-1,"drop":true}"#).contains("invalid value"));
    }
}
