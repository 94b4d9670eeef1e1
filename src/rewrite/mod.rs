//! Applying a plan: an ordered list of named passes, each validated after
//! it runs.
//!
//! | pass | what it does |
//! |---|---|
//! | `prune_heads` | keeps the listed heads: q/k/v columns, output rows, head counts in shapes |
//! | `slim_mlp` | keeps the listed neurons: fc1 columns, fc2 rows |
//! | `zero_below` | zeroes small weights (unstructured masking), on the sliced weights |
//! | `drop_sub_blocks` | removes attention or MLP sub-blocks from the residual stream |
//! | `drop_blocks` | removes whole blocks |
//! | `drop_cache` | removes the key/value cache inputs and outputs of layers whose attention went |
//! | `unread_norms` | turns fused norms left computing for nobody into the plain sums they also give |
//! | `cleanup` | removes what became dead, and declared shapes the slicing made stale |
//!
//! Slicing comes first, then the drops, because slicing edits a sub-block
//! in place while a drop only rewires the stream around it: each pass only
//! uses names the earlier ones left in place. Every edit reads the
//! architecture found before any edit and never changes a tensor in place:
//! sliced weights and edited shape constants are new initializers, so a
//! tensor that other blocks share (exporters deduplicate identical biases
//! and shape constants) stays as it was for them.
//!
//! After every pass the graph is validated ([`crate::ir::Graph::check_edit`]):
//! its invariants hold, its inputs and outputs are unchanged (but for the
//! cache entries of pruned decoder layers, listed in [`Applied`]), every
//! rerouted value has the element type and shape of the one it replaced,
//! and after `cleanup` no initializer or `value_info` is orphaned.
//! Validation is always on in debug builds (every test) and on request in
//! release builds ([`Validation`]).

mod cleanup;
mod drop_blocks;
mod drop_cache;
mod drop_sub_blocks;
mod prune_heads;
pub mod repair;
mod residual;
mod slicing;
mod slim_mlp;
mod unread_norms;
mod zero_weights;

use std::collections::{HashMap, HashSet};

use crate::arch::{Architecture, Block, Cache};
use crate::ir::{DeadCode, EditCheck, Graph, IrError, Model, NodeId, TensorError};
use crate::plan::{BlockAction, Plan};

pub(crate) use slicing::{NewValues, Scales, replace_values};

/// Metadata key under which the applied plan is recorded.
pub const PLAN_METADATA_KEY: &str = "onnx_idprune.plan";

/// Why a plan cannot be applied to this model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RewriteError {
    /// The entry does not fit the model (tower, index, head or neuron out
    /// of range): the plan was made for another model.
    #[error("plan entry {entry} ({label}): {reason}")]
    Plan {
        /// Position in the plan.
        entry: usize,
        /// "tower/index".
        label: String,
        /// What does not fit.
        reason: String,
    },
    /// The model's form does not allow this edit.
    #[error("{label}: {reason}")]
    Unsupported {
        /// The rewrite.
        label: String,
        /// Why not.
        reason: String,
    },
    /// A graph edit failed.
    #[error("{label}: {source}")]
    Graph {
        /// The rewrite.
        label: String,
        /// The failure.
        source: IrError,
    },
    /// A weight could not be sliced.
    #[error("{label}: {source}")]
    Tensor {
        /// The rewrite.
        label: String,
        /// The failure.
        source: TensorError,
    },
    /// A pass left the graph invalid (a bug in the pass, caught by the
    /// validation after it).
    #[error("after pass {pass}: {source}")]
    Invalid {
        /// The pass.
        pass: &'static str,
        /// What is wrong.
        source: IrError,
    },
}

impl RewriteError {
    /// Wraps a graph error of the rewrite `label`.
    pub(crate) fn graph(label: &str) -> impl Fn(IrError) -> Self + '_ {
        move |source| RewriteError::Graph {
            label: label.to_string(),
            source,
        }
    }

    /// Wraps a tensor error of the rewrite `label`.
    pub(crate) fn tensor(label: &str) -> impl Fn(TensorError) -> Self + '_ {
        move |source| RewriteError::Tensor {
            label: label.to_string(),
            source,
        }
    }
}

/// Whether the graph is validated after every pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validation {
    /// After every pass (rebuilds the graph's indexes: costs about one
    /// load of the model per pass).
    EveryPass,
    /// Not at all.
    Off,
}

impl Default for Validation {
    /// On in debug builds and with the `paranoid` feature, and in release
    /// builds when `ONNX_IDPRUNE_VALIDATE` is set to anything but `0`.
    fn default() -> Self {
        let asked = std::env::var_os("ONNX_IDPRUNE_VALIDATE").is_some_and(|v| v != "0");
        if cfg!(debug_assertions) || cfg!(feature = "paranoid") || asked {
            Validation::EveryPass
        } else {
            Validation::Off
        }
    }
}

/// What bias compensation adds in place of removed residual branches: a
/// per-channel vector per join node (the branch's mean output).
pub type Compensation = HashMap<NodeId, Vec<f32>>;

/// One plan entry with the block it edits.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Target<'a> {
    /// The entry.
    pub action: &'a BlockAction,
    /// The block, as discovered before any edit.
    pub block: &'a Block,
}

/// The graph being rewritten and what the passes did so far.
pub(crate) struct Edit<'g> {
    /// The graph.
    pub graph: &'g mut Graph,
    /// The default-domain opset the model imports.
    pub opset: i64,
    /// Labels of the rewrites made, in order.
    pub rewrites: Vec<String>,
    /// Declared shapes the slicing makes stale (removed by `cleanup`).
    pub stale: HashSet<String>,
    /// What `cleanup` removed.
    pub dead: DeadCode,
    /// Means added in place of removed branches, by join node.
    pub compensation: Compensation,
    /// Values whose readers were all moved to another value: old → new.
    reroutes: HashMap<String, String>,
    /// The reroutes of the running pass, for its validation.
    pass_reroutes: Vec<(String, String)>,
    /// Every layer's key/value cache, as discovered (the `drop_cache` pass
    /// reads a kept layer's in place of a removed one).
    pub caches: Vec<Cache>,
    /// How the interface changed so far.
    pub interface: Vec<String>,
}

impl Edit<'_> {
    /// What carries `value` now: the value its readers were moved to (and
    /// so on), or `value` itself.
    pub fn current(&self, value: &str) -> String {
        let mut value = value;
        // Each reroute points to a value that existed before it, so the
        // chain ends; the bound only guards against a bug looping.
        for _ in 0..=self.reroutes.len() {
            match self.reroutes.get(value) {
                Some(next) => value = next,
                None => break,
            }
        }
        value.to_string()
    }

    /// Makes every reader of `old` read `new` instead, and records it.
    pub fn reroute(&mut self, old: &str, new: &str, label: &str) -> Result<(), RewriteError> {
        self.graph
            .reroute(old, new)
            .map_err(RewriteError::graph(label))?;
        self.reroutes.insert(old.to_string(), new.to_string());
        self.pass_reroutes.push((old.to_string(), new.to_string()));
        Ok(())
    }
}

/// A named rewrite pass.
pub(crate) struct Pass {
    /// Its name in logs and errors.
    pub name: &'static str,
    run: fn(&mut Edit<'_>, &[Target<'_>]) -> Result<(), RewriteError>,
    /// Whether the graph may hold orphans after it (only `cleanup` removes
    /// them).
    leaves_orphans: bool,
}

/// The passes, in the order they run (see the module documentation).
const PASSES: &[Pass] = &[
    Pass {
        name: "prune_heads",
        run: prune_heads::run,
        leaves_orphans: true,
    },
    Pass {
        name: "slim_mlp",
        run: slim_mlp::run,
        leaves_orphans: true,
    },
    Pass {
        name: "zero_below",
        run: zero_weights::run,
        leaves_orphans: true,
    },
    Pass {
        name: "drop_sub_blocks",
        run: drop_sub_blocks::run,
        leaves_orphans: true,
    },
    Pass {
        name: "drop_blocks",
        run: drop_blocks::run,
        leaves_orphans: true,
    },
    Pass {
        name: "drop_cache",
        run: drop_cache::run,
        leaves_orphans: true,
    },
    Pass {
        name: "unread_norms",
        run: unread_norms::run,
        leaves_orphans: true,
    },
    Pass {
        name: "cleanup",
        run: cleanup::run,
        leaves_orphans: false,
    },
];

/// The names of the passes, in order.
pub fn pass_names() -> Vec<&'static str> {
    PASSES.iter().map(|p| p.name).collect()
}

/// What [`apply`] did.
#[derive(Debug, Clone, Default)]
pub struct Applied {
    /// One label per rewrite, in the order applied (`drop_block vision/3`).
    pub rewrites: Vec<String>,
    /// What dead-code elimination removed afterwards.
    pub dead: DeadCode,
    /// How the model's inputs and outputs changed: the key/value caches of
    /// dropped layers removed, those of head-pruned layers narrowed (one
    /// line each; empty for encoders, whose interface never changes).
    pub interface: Vec<String>,
}

/// Applies `plan` to `model`, whose architecture is `arch` (discovered on
/// the unedited model), validating as [`Validation::default`] says. On
/// error the model may be partly edited; callers discard it.
pub fn apply(model: &mut Model, arch: &Architecture, plan: &Plan) -> Result<Applied, RewriteError> {
    apply_with(
        model,
        arch,
        plan,
        &Compensation::new(),
        Validation::default(),
    )
}

/// [`apply`] with bias compensation for removed branches
/// ([`repair::compensation`]) and an explicit validation setting.
pub fn apply_with(
    model: &mut Model,
    arch: &Architecture,
    plan: &Plan,
    compensation: &Compensation,
    validation: Validation,
) -> Result<Applied, RewriteError> {
    // Check every entry (numbered as the user wrote them) before editing.
    for (entry, action) in plan.blocks.iter().enumerate() {
        locate(arch, entry, action)?;
    }
    let plan = plan.normalized();
    let mut targets: Vec<Target<'_>> = Vec::new();
    for (entry, action) in plan.blocks.iter().enumerate() {
        targets.push(Target {
            action,
            block: locate(arch, entry, action)?,
        });
    }
    let opset = model.opset("").unwrap_or(0);
    let original_graph_for_sizes = if validation == Validation::EveryPass {
        model.graph.clone()
    } else {
        Graph::default()
    };
    // Declared shapes inside sub-blocks about to be sliced go stale: collect
    // them before any edit moves the stream.
    let stale = stale_shapes(&model.graph, &targets);
    let mut edit = Edit {
        graph: &mut model.graph,
        opset,
        rewrites: Vec::new(),
        stale,
        dead: DeadCode::default(),
        compensation: compensation.clone(),
        reroutes: HashMap::new(),
        pass_reroutes: Vec::new(),
        caches: arch
            .towers
            .iter()
            .flat_map(|t| &t.blocks)
            .filter_map(|b| b.attention.body.cache.clone())
            .collect(),
        interface: Vec::new(),
    };
    let interface_changes = cache_interface(&targets);
    for pass in PASSES {
        let before = (validation == Validation::EveryPass).then(|| edit.graph.clone());
        edit.pass_reroutes.clear();
        (pass.run)(&mut edit, &targets)?;
        if let Some(before) = &before {
            let check = EditCheck {
                before,
                reroutes: &edit.pass_reroutes,
                orphans_allowed: pass.leaves_orphans,
                interface_changes: &interface_changes,
            };
            edit.graph
                .check_edit(&check)
                .map_err(|source| RewriteError::Invalid {
                    pass: pass.name,
                    source,
                })?;
        }
    }
    if validation == Validation::EveryPass {
        // Sizes the rewrite got wrong where a runtime would see them: a
        // head count left in a shape, a width sliced on one side only.
        let shapes = crate::arch::shapes::Shapes::infer(edit.graph);
        let before = crate::arch::shapes::Shapes::infer(&original_graph_for_sizes);
        let new: Vec<String> = shapes
            .conflicts()
            .iter()
            .filter(|c| !before.conflicts().contains(c))
            .cloned()
            .collect();
        if !new.is_empty() {
            return Err(RewriteError::Invalid {
                pass: "sizes",
                source: IrError::Invalid(new),
            });
        }
    }
    let applied = Applied {
        rewrites: edit.rewrites,
        dead: edit.dead,
        interface: edit.interface,
    };
    if !plan.is_empty() {
        let compact = serde_json::to_string(&plan).expect("plans serialize");
        model.set_metadata(PLAN_METADATA_KEY, &compact);
    }
    Ok(applied)
}

/// The cache inputs and outputs of the layers a plan prunes heads of or
/// removes attention from: the only interface entries an edit may change.
fn cache_interface(targets: &[Target<'_>]) -> Vec<String> {
    let mut out = Vec::new();
    for Target { action, block } in targets {
        let touched = action.drop || action.drop_attention || action.keep_heads.is_some();
        if let (true, Some(cache)) = (touched, &block.attention.body.cache) {
            out.extend(cache.names().into_iter().map(String::from));
        }
    }
    out
}

/// Declared value types between the inputs and the end of every sub-block
/// that will be sliced.
fn stale_shapes(graph: &Graph, targets: &[Target<'_>]) -> HashSet<String> {
    let mut stale: HashSet<String> = HashSet::new();
    for Target { action, block } in targets {
        let mut regions: Vec<(Vec<&str>, &str)> = Vec::new();
        if action.keep_heads.is_some() {
            let a = &block.attention.body;
            regions.push((vec![&a.query_input, &a.key_input], &a.out.input));
        }
        if action.keep_mlp.is_some() {
            let m = &block.mlp.body;
            regions.push((vec![&m.fc1.input], &m.fc2.input));
        }
        for (starts, end) in regions {
            let ends = graph.ancestors(end);
            for start in starts {
                for id in graph.descendants(start).intersection(&ends) {
                    stale.extend(graph.node(*id).outputs().iter().cloned());
                }
            }
        }
    }
    stale
}

fn locate<'a>(
    arch: &'a Architecture,
    entry: usize,
    action: &BlockAction,
) -> Result<&'a Block, RewriteError> {
    let err = |reason: String| RewriteError::Plan {
        entry,
        label: action.label(),
        reason,
    };
    let tower = arch
        .tower(action.tower)
        .ok_or_else(|| err(format!("the model has no {} tower", action.tower.name())))?;
    let block = tower.blocks.get(action.index).ok_or_else(|| {
        err(format!(
            "the {} tower has {} blocks (indices 0..={})",
            action.tower.name(),
            tower.blocks.len(),
            tower.blocks.len().saturating_sub(1)
        ))
    })?;
    if let Some(keep) = &action.keep_heads {
        let heads = block.attention.body.heads;
        if let Some(bad) = keep.iter().find(|h| **h >= heads) {
            return Err(err(format!(
                "head {bad} does not exist: the block has {heads} heads"
            )));
        }
        let a = &block.attention.body;
        if a.kept_groups(keep).is_none() {
            return Err(err(format!(
                "the block's {heads} query heads share {} key/value heads in groups of {}: keep_heads must keep whole groups",
                a.kv_heads,
                a.group()
            )));
        }
    }
    if let Some(keep) = &action.keep_mlp {
        let width = block.mlp.body.width();
        if let Some(bad) = keep.iter().find(|n| **n >= width) {
            return Err(err(format!(
                "neuron {bad} does not exist: the MLP has {width} neurons"
            )));
        }
    }
    if let Some(zero) = &action.zero_below {
        let roles: Vec<&str> = block.linears().iter().map(|l| l.role).collect();
        if let Some(bad) = zero.keys().find(|r| !roles.contains(&r.as_str())) {
            return Err(err(format!(
                "'zero_below' names '{bad}', but the block's linear layers are {}",
                roles.join(", ")
            )));
        }
    }
    Ok(block)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::Model;

    fn clip() -> Model {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/clip_tiny_torchscript_op17.onnx");
        Model::from_proto(crate::onnx::load(&path).unwrap().proto).unwrap()
    }

    #[test]
    fn tests_validate_after_every_pass() {
        // `cargo test` builds with debug assertions: every plan applied by
        // a test is validated pass by pass.
        assert_eq!(Validation::default(), Validation::EveryPass);
        assert_eq!(
            pass_names(),
            [
                "prune_heads",
                "slim_mlp",
                "zero_below",
                "drop_sub_blocks",
                "drop_blocks",
                "drop_cache",
                "unread_norms",
                "cleanup"
            ]
        );
    }

    #[test]
    fn later_edits_see_the_stream_where_earlier_ones_moved_it() {
        let mut model = clip();
        let arch = crate::arch::discover(&model.graph).unwrap();
        let vision = &arch.towers[0].blocks;
        let mut edit = Edit {
            graph: &mut model.graph,
            opset: 17,
            rewrites: Vec::new(),
            stale: HashSet::new(),
            dead: DeadCode::default(),
            compensation: Compensation::new(),
            reroutes: HashMap::new(),
            pass_reroutes: Vec::new(),
            caches: Vec::new(),
            interface: Vec::new(),
        };
        // Block 0 removed: its output is carried by its input; block 1
        // removed after it: by block 0's input too.
        edit.reroute(vision[0].output(), vision[0].input(), "0")
            .unwrap();
        assert_eq!(edit.current(vision[1].input()), vision[0].input());
        edit.reroute(vision[1].output(), &edit.current(vision[1].input()), "1")
            .unwrap();
        assert_eq!(edit.current(vision[2].input()), vision[0].input());
        assert_eq!(edit.current("not rerouted"), "not rerouted");
    }
}
