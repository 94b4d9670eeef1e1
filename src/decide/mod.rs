//! Deciding what to remove: a function of the architecture, the
//! measurements and the budget that returns a plan.
//!
//! - [`score`]: importance of sub-blocks (block influence × ID, the
//!   paper's rule, or influence or magnitude alone) and of heads and
//!   neurons (activation-aware × ID);
//! - [`budget`]: what may go, overall and per tower, and what a plan
//!   removes;
//! - [`allocate`]: one global threshold across both towers, with the
//!   floors that keep every tower and layer working;
//! - [`search`]: `all` mode, the budget split between sub-blocks and units
//!   chosen by judging candidate plans (the judge is the pipeline's);
//! - [`masking`]: `unstructured` mode, the paper's |w| · ID masking;
//! - [`sensitivity`]: each sub-block removed alone, its cost ranked
//!   against its ID (the seed's claim, checked per model).
//!
//! Deciding never runs a model itself: measurements come in, and plans that
//! must be tried go out to a [`Judge`].

pub mod allocate;
pub mod budget;
pub mod masking;
pub mod score;
pub mod search;
pub mod sensitivity;

use serde::Serialize;

pub use budget::Budget;
pub use masking::Mask;
pub use score::{Candidate, Part, Score, Unit, UnitOrder};
pub use search::{Judge, Trial, Verdict};
pub use sensitivity::Sensitivity;

use crate::arch::Architecture;
use crate::ir::Graph;
use crate::measure::{BlockMeasurements, LinearId};
use crate::plan::{Plan, Repair};

/// What may be removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Whole blocks and attention/MLP sub-blocks.
    Blocks,
    /// Attention heads and MLP neurons.
    Units,
    /// Sub-blocks, then heads and neurons of what remains: the split of
    /// the budget between them is chosen on the calibration samples.
    All,
    /// The paper's one-shot masking: weights with the smallest |w| · ID
    /// (ID of the linear layer's output) are zeroed, at one global
    /// quantile over both towers. Nothing is removed.
    Unstructured,
}

impl Mode {
    /// Whether deciding in this mode scores heads and neurons (and so needs
    /// their activation energies measured).
    pub fn scores_units(self) -> bool {
        matches!(self, Mode::Units | Mode::All)
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "blocks" => Ok(Mode::Blocks),
            "units" => Ok(Mode::Units),
            "all" => Ok(Mode::All),
            "unstructured" => Ok(Mode::Unstructured),
            other => Err(format!(
                "unknown mode '{other}' (expected blocks, units, all or unstructured)"
            )),
        }
    }
}

/// Settings of the decision stage.
#[derive(Debug, Clone)]
pub struct DecideOptions {
    /// What may be removed.
    pub mode: Mode,
    /// Block parameters to keep, overall and per tower (structural modes).
    pub budget: Budget,
    /// `unstructured` mode: the fraction of block weight-matrix elements to
    /// zero (else 1 − the overall kept fraction).
    pub sparsity: Option<f64>,
    /// How removals are repaired on the decision samples (recorded in the
    /// plan).
    pub repair: RepairMethod,
    /// Importance score of sub-blocks.
    pub score: Score,
    /// Also remove each sub-block alone and correlate the cost with its ID
    /// (structural modes; one judged plan per sub-block).
    pub sensitivity: bool,
}

impl DecideOptions {
    /// The fraction of weights `unstructured` mode zeroes.
    pub fn sparsity(&self) -> f64 {
        self.sparsity
            .or(self.budget.keep.map(|k| 1.0 - k))
            .unwrap_or(0.0)
    }
}

/// What the decision stage found and chose.
#[derive(Debug, Clone, Default)]
pub struct Decision {
    /// The plan.
    pub plan: Plan,
    /// Every sub-block with its measurements.
    pub candidates: Vec<Candidate>,
    /// `unstructured` mode: the masking of every linear layer.
    pub masks: Vec<Mask>,
    /// Every allocation tried (tower splits; in `all` mode also shares of
    /// the budget taken as sub-blocks) and how closely its model followed
    /// the original on decision samples.
    pub trials: Vec<Trial>,
    /// Each sub-block removed alone (`sensitivity`).
    pub sensitivity: Option<Sensitivity>,
}

/// Why no plan could be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecideError {
    /// The model's weights or measurements do not allow this mode.
    #[error("{0}")]
    Unsupported(String),
}

/// A structural plan (`blocks`, `units` or `all` mode) for `arch` from the
/// measurements of its blocks on `samples` decision samples; `all` mode
/// asks `judge` to rate its candidate plans.
pub fn structural<J: Judge>(
    arch: &Architecture,
    graph: &Graph,
    measured: &BlockMeasurements,
    samples: usize,
    options: &DecideOptions,
    judge: &mut J,
) -> Result<Decision, J::Error> {
    let (mut candidates, units) =
        score::candidates(arch, graph, measured, options.mode.scores_units());
    let sensitivity = if options.sensitivity {
        Some(sensitivity::measure(&candidates, options.score, judge)?)
    } else {
        None
    };
    let finish = |plan: Plan| with_repair(plan, options, samples);
    let ground = search::Ground {
        arch,
        graph,
        candidates: &candidates,
        units: &units,
    };
    let orders = [UnitOrder::Score, UnitOrder::PerParameter];
    let allocations: Vec<(Option<f64>, search::Allocation)> = match options.mode {
        Mode::Units => orders
            .iter()
            .map(|&o| (None, search::Allocation::Units(o)))
            .collect(),
        Mode::All => search::SUB_BLOCK_SHARES
            .iter()
            .rev()
            .flat_map(|&s| {
                orders
                    .iter()
                    .map(move |&o| (Some(s), search::Allocation::Both(options.score, s, o)))
            })
            .collect(),
        Mode::Blocks | Mode::Unstructured => {
            vec![(None, search::Allocation::SubBlocks(options.score))]
        }
    };
    let (plan, chosen, trials) =
        search::search(&ground, &allocations, &options.budget, finish, judge)?;
    candidates = chosen;
    Ok(Decision {
        plan,
        candidates,
        masks: Vec::new(),
        trials,
        sensitivity,
    })
}

/// An `unstructured` plan from the ID of every block linear layer's output.
pub fn unstructured(
    graph: &Graph,
    layers: &[LinearId],
    options: &DecideOptions,
) -> Result<Decision, DecideError> {
    let (plan, masks) = masking::mask(graph, layers, options.sparsity())?;
    Ok(Decision {
        plan,
        masks,
        ..Decision::default()
    })
}

/// How removals are repaired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RepairMethod {
    /// Removed rows and branches are simply gone.
    None,
    /// Least-squares refit of the projection after a slimmed sub-block.
    Lsq,
    /// A removed sub-block's branch is replaced by its mean output.
    Bias,
    /// Both.
    #[serde(rename = "lsq+bias")]
    LsqBias,
}

impl RepairMethod {
    /// Whether the method refits slimmed projections.
    pub fn refits(self) -> bool {
        matches!(self, RepairMethod::Lsq | RepairMethod::LsqBias)
    }

    /// Whether the method replaces removed branches by their means.
    pub fn compensates(self) -> bool {
        matches!(self, RepairMethod::Bias | RepairMethod::LsqBias)
    }
}

/// Records the repair in `plan` when asked for and there is something it
/// applies to.
fn with_repair(mut plan: Plan, options: &DecideOptions, samples: usize) -> Plan {
    let refits = options.repair.refits() && plan.slims();
    let compensates = options.repair.compensates() && plan.drops();
    let method = match (refits, compensates) {
        (true, true) => "lsq+bias",
        (true, false) => "lsq",
        (false, true) => "bias",
        (false, false) => return plan,
    };
    plan.repair = Some(Repair {
        method: method.into(),
        samples,
    });
    plan
}
