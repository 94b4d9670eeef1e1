//! Merged decoders: optimum's `decoder_model_merged.onnx`, the form
//! transformers.js and optimum ship decoder language models in. Its main
//! graph is one `If` on a boolean `use_cache_branch` input: the decoder
//! with a past cache in `then_branch`, the one without in `else_branch`,
//! both reading the graph's inputs and its (shared) weights by name.
//!
//! Each branch is *lifted* into a model of its own (its nodes, the outer
//! inputs and initializers it reads, its outputs), so discovery,
//! calibration, decision, rewriting, repair and verification run on the
//! with-past branch as on any decoder with a cache. The same plan is
//! applied to the no-past branch, every block weight it reads is then the
//! with-past branch's (refits included, so both branches compute the same
//! model), and the two are put back under the `If`: weights and other new
//! tensors in the outer graph once, the branches' own small constants in
//! the branches, the interface as the with-past branch left it (cache
//! entries of dropped layers removed, narrowed ones declared narrower).

use std::collections::{HashMap, HashSet};

use prost::Message;

use crate::arch::{self, Architecture, Block, TowerKind};
use crate::ir::{Graph, IrError, Model, NodeId};
use crate::onnx::proto::{GraphProto, ModelProto, NodeProto, TensorProto, ValueInfoProto};
use crate::plan::Plan;
use crate::rewrite::{self, Compensation, RewriteError, Validation};

/// Why a merged decoder cannot be read or put back together.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MergedError {
    /// A branch is not a graph this tool can read.
    #[error("the {branch} branch of the merged decoder: {source}")]
    Graph {
        /// `then_branch` or `else_branch`.
        branch: &'static str,
        /// What is wrong.
        source: IrError,
    },
    /// The branches are not the same decoder.
    #[error("the branches of the merged decoder differ: {0}")]
    Branches(String),
    /// Discovery failed in the no-past branch.
    #[error("the no-past branch of the merged decoder: {0}")]
    Discover(#[from] arch::DiscoverError),
    /// The plan could not be applied to the no-past branch.
    #[error("the no-past branch of the merged decoder: {0}")]
    Rewrite(#[from] RewriteError),
}

/// A merged decoder, split into its branches.
#[derive(Debug, Clone)]
pub struct Merged {
    /// The model as read, without its weights and with empty branches:
    /// its header, interface and `If` node.
    shell: ModelProto,
    /// Initializers each branch held itself (`then`, `else`).
    own: [HashSet<String>; 2],
    /// The outer graph's initializers, in file order (an unedited model is
    /// written back as it was read).
    order: Vec<String>,
    /// The no-past branch as a model of its own.
    pub no_past: Model,
}

const THEN: &str = "then_branch";
const ELSE: &str = "else_branch";

/// The `If` node of a merged decoder: the main graph's only node, on a
/// boolean graph input, with both branches present.
fn merged_if(proto: &ModelProto) -> Option<&NodeProto> {
    let graph = proto.graph.as_ref()?;
    let [node] = graph.node.as_slice() else {
        return None;
    };
    let condition = node.input.first()?;
    let is_input = graph.input.iter().any(|i| i.name() == condition);
    let has = |name: &str| {
        node.attribute
            .iter()
            .any(|a| a.name() == name && a.g.is_some())
    };
    (node.op_type() == "If" && node.domain().is_empty() && is_input && has(THEN) && has(ELSE))
        .then_some(node)
}

fn branch<'a>(node: &'a NodeProto, name: &str) -> &'a GraphProto {
    node.attribute
        .iter()
        .find(|a| a.name() == name)
        .and_then(|a| a.g.as_ref())
        .expect("checked by merged_if")
}

/// Whether `proto` is a merged decoder.
pub fn is_merged(proto: &ModelProto) -> bool {
    merged_if(proto).is_some()
}

/// Names a graph reads without defining them (its nodes' inputs, its
/// outputs, and what its nodes' subgraphs read from it).
fn free_names(graph: &GraphProto) -> Vec<String> {
    let mut defined: HashSet<&str> = graph.initializer.iter().map(|t| t.name()).collect();
    defined.extend(graph.input.iter().map(|i| i.name()));
    let mut out: Vec<String> = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    for node in &graph.node {
        let reads = node
            .input
            .iter()
            .cloned()
            .chain(crate::ir::implicit_inputs(node));
        for name in reads {
            if !name.is_empty() && !defined.contains(name.as_str()) && seen.insert(name.clone()) {
                out.push(name);
            }
        }
        defined.extend(node.output.iter().map(String::as_str));
    }
    for o in &graph.output {
        if !defined.contains(o.name()) && seen.insert(o.name().to_string()) {
            out.push(o.name().to_string());
        }
    }
    out
}

/// Branch `name` of the merged decoder as a model: its nodes, the outer
/// inputs and initializers it reads (in the outer graph's order), its own
/// initializers, and its outputs.
fn lift(proto: &ModelProto, node: &NodeProto, name: &'static str) -> Result<Model, MergedError> {
    let outer = proto.graph.as_ref().expect("checked by merged_if");
    let body = branch(node, name);
    let free: HashSet<String> = free_names(body).into_iter().collect();
    let mut graph = body.clone();
    graph.input = outer
        .input
        .iter()
        .filter(|i| free.contains(i.name()))
        .cloned()
        .collect();
    let own: HashSet<&str> = body.initializer.iter().map(|t| t.name()).collect();
    graph.initializer = outer
        .initializer
        .iter()
        .filter(|t| free.contains(t.name()) && !own.contains(t.name()))
        .cloned()
        .chain(body.initializer.iter().cloned())
        .collect();
    let model = ModelProto {
        graph: Some(graph),
        ..proto.clone()
    };
    Model::from_proto(model).map_err(|source| MergedError::Graph {
        branch: name,
        source,
    })
}

/// Splits a merged decoder: the with-past branch as the model to work on,
/// and the rest.
pub fn split(proto: ModelProto) -> Result<(Model, Merged), MergedError> {
    let node = merged_if(&proto).expect("callers check is_merged").clone();
    let with_past = lift(&proto, &node, THEN)?;
    let no_past = lift(&proto, &node, ELSE)?;
    let own = [THEN, ELSE].map(|name| {
        branch(&node, name)
            .initializer
            .iter()
            .map(|t| t.name().to_string())
            .collect()
    });
    // The weights live on in the lifted models: keep the header, the
    // interface and the `If` node with empty branches.
    let order = proto
        .graph
        .as_ref()
        .map(|g| g.initializer.iter().map(|t| t.name().to_string()).collect())
        .unwrap_or_default();
    let mut shell = proto;
    if let Some(graph) = shell.graph.as_mut() {
        graph.initializer.clear();
        for node in &mut graph.node {
            for a in &mut node.attribute {
                if let Some(g) = a.g.as_mut() {
                    *g = GraphProto {
                        name: g.name.clone(),
                        ..Default::default()
                    };
                }
            }
        }
    }
    Ok((
        with_past,
        Merged {
            shell,
            own,
            order,
            no_past,
        },
    ))
}

/// The with-past branch's architecture matches the no-past branch's:
/// same towers, block counts, widths, heads.
fn check_branches(with_past: &Architecture, no_past: &Architecture) -> Result<(), MergedError> {
    let shape = |a: &Architecture| -> Vec<(usize, usize, usize, usize, usize)> {
        a.towers
            .iter()
            .flat_map(|t| &t.blocks)
            .map(|b| {
                (
                    b.hidden,
                    b.attention.body.heads,
                    b.attention.body.kv_heads,
                    b.attention.body.head_dim,
                    b.mlp.body.width(),
                )
            })
            .collect()
    };
    if shape(with_past) != shape(no_past) {
        return Err(MergedError::Branches(format!(
            "with past {:?}, without {:?} (hidden, heads, kv heads, head width, MLP width per block)",
            shape(with_past),
            shape(no_past)
        )));
    }
    Ok(())
}

/// The compensation keyed by the first block's join nodes of each pair,
/// keyed by the second's.
fn map_compensation<'a>(
    pairs: impl IntoIterator<Item = (&'a Block, &'a Block)>,
    compensation: &Compensation,
) -> Compensation {
    let mut mapped = Compensation::new();
    for (a, b) in pairs {
        for (ja, jb) in [
            (&a.attention.join, &b.attention.join),
            (&a.mlp.join, &b.mlp.join),
        ] {
            if let Some(v) = compensation.get(&ja.node) {
                mapped.insert(jb.node, v.clone());
            }
        }
    }
    mapped
}

/// A plan with actions reached reassembly without the architecture it was
/// decided on.
fn undiscovered() -> MergedError {
    MergedError::Branches(
        "the plan has actions, and the with-past branch was not discovered".into(),
    )
}

/// Every block of both architectures, paired in order.
fn paired<'a>(a: &'a Architecture, b: &'a Architecture) -> Vec<(&'a Block, &'a Block)> {
    a.towers
        .iter()
        .flat_map(|t| &t.blocks)
        .zip(b.towers.iter().flat_map(|t| &t.blocks))
        .collect()
}

impl Merged {
    /// Puts the merged decoder back together from the pruned with-past
    /// branch (`with_past`, discovered as `arch` before the edit, pruned by
    /// `plan` with `compensation` and refits): the same plan is applied to
    /// the no-past branch and its block weights are taken from `with_past`.
    /// An empty plan gives the original back (and needs no `arch`, which
    /// a run with an empty plan does not discover).
    pub fn reassemble(
        &self,
        original_with_past: &Model,
        arch: Option<&Architecture>,
        with_past: &Model,
        plan: &Plan,
        compensation: &Compensation,
    ) -> Result<ModelProto, MergedError> {
        let mut no_past = self.no_past.clone();
        if !plan.is_empty() {
            let arch = arch.ok_or_else(undiscovered)?;
            let no_past_arch = arch::discover(&no_past.graph)?;
            check_branches(arch, &no_past_arch)?;
            // Bias compensation is keyed by the join nodes of the with-past
            // branch: the no-past branch's joins of the same blocks.
            let mapped = map_compensation(paired(arch, &no_past_arch), compensation);
            rewrite::apply_with(
                &mut no_past,
                &no_past_arch,
                plan,
                &mapped,
                Validation::default(),
            )?;
            // The rewrite keeps node ids: a node of `arch` is the same
            // node of `with_past`, if it is still there.
            let same = |id: NodeId| with_past.graph.get_node(id).map(|_| id);
            share_weights(arch, with_past, &same, &no_past_arch, &mut no_past)?;
        }
        self.assemble(original_with_past, with_past, &no_past)
    }

    /// [`Merged::reassemble`] for a merged decoder that is a file of a
    /// folder: `original_with_past` is its with-past branch as joined,
    /// `pruned` the file's part of the pruned folder, `joined` and
    /// `joined_arch` the folder's joined graph and its architecture before
    /// the edit, in which the file's values carry `prefix`, and `plan` and
    /// `compensation` the folder's. The file's blocks are its blocks of the
    /// joined graph in order; nodes of the pruned branch are found by name.
    #[allow(clippy::too_many_arguments)]
    pub fn reassemble_part(
        &self,
        original_with_past: &Model,
        pruned: ModelProto,
        joined: &Graph,
        joined_arch: Option<&Architecture>,
        prefix: &str,
        plan: &Plan,
        compensation: &Compensation,
    ) -> Result<ModelProto, MergedError> {
        let with_past = Model::from_proto(pruned).map_err(|source| MergedError::Graph {
            branch: THEN,
            source,
        })?;
        if plan.is_empty() {
            return self.assemble(original_with_past, &with_past, &self.no_past);
        }
        let joined_arch = joined_arch.ok_or_else(undiscovered)?;
        let arch = arch::discover(&original_with_past.graph)?;
        let blocks = |a: &'_ Architecture| -> Vec<(TowerKind, Block)> {
            a.towers
                .iter()
                .flat_map(|t| t.blocks.iter().map(move |b| (t.kind, b.clone())))
                .collect()
        };
        let mine: Vec<(TowerKind, Block)> = blocks(joined_arch)
            .into_iter()
            .filter(|(_, b)| {
                joined
                    .node(b.attention.join.node)
                    .outputs()
                    .iter()
                    .any(|o| o.starts_with(prefix))
            })
            .collect();
        let alone = blocks(&arch);
        if mine.len() != alone.len() {
            return Err(MergedError::Branches(format!(
                "the folder's graph holds {} blocks of the merged decoder, and the file alone {}",
                mine.len(),
                alone.len()
            )));
        }
        let mut file_plan = Plan {
            blocks: Vec::new(),
            ..plan.clone()
        };
        for ((kind, a), (own_kind, b)) in mine.iter().zip(&alone) {
            for action in plan
                .blocks
                .iter()
                .filter(|x| x.tower == *kind && x.index == a.index)
            {
                let mut action = action.clone();
                action.tower = *own_kind;
                action.index = b.index;
                file_plan.blocks.push(action);
            }
        }
        if file_plan.is_empty() {
            return self.assemble(original_with_past, &with_past, &self.no_past);
        }
        let mapped = map_compensation(
            mine.iter().zip(&alone).map(|((_, a), (_, b))| (a, b)),
            compensation,
        );
        let mut no_past = self.no_past.clone();
        let no_past_arch = arch::discover(&no_past.graph)?;
        check_branches(&arch, &no_past_arch)?;
        let remapped = map_compensation(paired(&arch, &no_past_arch), &mapped);
        rewrite::apply_with(
            &mut no_past,
            &no_past_arch,
            &file_plan,
            &remapped,
            Validation::default(),
        )?;
        // Split and rebuilt, the pruned branch has node ids of its own:
        // the nodes are paired by name (an exporter names every node).
        let by_name: HashMap<&str, NodeId> = with_past
            .graph
            .nodes()
            .into_iter()
            .map(|id| (with_past.graph.node(id).name(), id))
            .filter(|(name, _)| !name.is_empty())
            .collect();
        let unnamed = arch
            .towers
            .iter()
            .flat_map(|t| &t.blocks)
            .flat_map(|b| b.linears())
            .find(|l| {
                original_with_past
                    .graph
                    .node(l.weight.reader)
                    .name()
                    .is_empty()
            });
        if let Some(linear) = unnamed {
            return Err(MergedError::Branches(format!(
                "the with-past branch's {} projection has no node name, and a folder's branches are paired by name",
                linear.role
            )));
        }
        let find = |id: NodeId| {
            by_name
                .get(original_with_past.graph.node(id).name())
                .copied()
        };
        share_weights(&arch, &with_past, &find, &no_past_arch, &mut no_past)?;
        self.assemble(original_with_past, &with_past, &no_past)
    }

    /// The merged model with `with_past` and `no_past` as its branches.
    fn assemble(
        &self,
        original_with_past: &Model,
        with_past: &Model,
        no_past: &Model,
    ) -> Result<ModelProto, MergedError> {
        let mut out = self.shell.clone();
        let then_graph = with_past.to_proto().graph.expect("a model has a graph");
        let mut else_graph = no_past.to_proto().graph.expect("a model has a graph");
        let before = original_with_past
            .to_proto()
            .graph
            .expect("a model has a graph");
        // Tensors the branches owned stay in them; all else (shared weights,
        // what the rewrite made) goes to the outer graph, once per content.
        let [own_then, own_else] = &self.own;
        let mut outer: Vec<TensorProto> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        let mut then_body = then_graph.clone();
        then_body.initializer.clear();
        for t in then_graph.initializer {
            if own_then.contains(t.name()) {
                then_body.initializer.push(t);
            } else {
                index.insert(t.name().to_string(), outer.len());
                outer.push(t);
            }
        }
        let mut else_body = else_graph.clone();
        else_body.initializer.clear();
        let mut renames: HashMap<String, String> = HashMap::new();
        for mut t in std::mem::take(&mut else_graph.initializer) {
            if own_else.contains(t.name()) {
                else_body.initializer.push(t);
                continue;
            }
            match index.get(t.name()) {
                Some(&i) if same_content(&outer[i], &t) => {}
                Some(_) => {
                    // The same name for other values in the two branches (a
                    // shape constant each edited its own way): rename.
                    let mut k = 1;
                    let fresh = loop {
                        let candidate = format!("{}.no_past{k}", t.name());
                        if !index.contains_key(&candidate) {
                            break candidate;
                        }
                        k += 1;
                    };
                    renames.insert(t.name().to_string(), fresh.clone());
                    t.name = Some(fresh.clone());
                    index.insert(fresh, outer.len());
                    outer.push(t);
                }
                None => {
                    index.insert(t.name().to_string(), outer.len());
                    outer.push(t);
                }
            }
        }
        for node in &mut else_body.node {
            for input in &mut node.input {
                if let Some(new) = renames.get(input) {
                    *input = new.clone();
                }
            }
        }
        // Both branches give the same outputs, in order.
        let names = |g: &GraphProto| -> Vec<String> {
            g.output.iter().map(|o| o.name().to_string()).collect()
        };
        if names(&then_body) != names(&else_body) {
            return Err(MergedError::Branches(format!(
                "after pruning, the with-past branch gives {:?} and the no-past branch {:?}",
                names(&then_body),
                names(&else_body)
            )));
        }
        // The outer graph declares its outputs as the no-past branch does
        // (optimum's merge writes them so).
        let outputs = else_body.output.clone();
        let graph = out.graph.as_mut().expect("a model has a graph");
        // The interface as the with-past branch left it: its inputs (cache
        // entries of dropped layers gone, narrowed ones re-declared), the
        // no-past branch's others, and the condition.
        let node = self.shell.graph.as_ref().expect("a model has a graph").node[0].clone();
        let removed: HashSet<String> = before
            .input
            .iter()
            .map(|i| i.name().to_string())
            .filter(|n| !then_body.input.iter().any(|i| i.name() == n))
            .collect();
        let declared: HashMap<String, ValueInfoProto> = then_body
            .input
            .iter()
            .chain(&else_body.input)
            .map(|i| (i.name().to_string(), i.clone()))
            .collect();
        graph.input = graph
            .input
            .iter()
            .filter(|i| !removed.contains(i.name()))
            .map(|i| declared.get(i.name()).cloned().unwrap_or_else(|| i.clone()))
            .collect();
        graph.output = outputs;
        then_body.input.clear();
        else_body.input.clear();
        let mut node = node;
        node.output = names(&then_body);
        for a in &mut node.attribute {
            match a.name() {
                THEN => a.g = Some(then_body.clone()),
                ELSE => a.g = Some(else_body.clone()),
                _ => {}
            }
        }
        // Only what a branch reads stays in the outer graph: the original's
        // in their order, then what the rewrites made.
        let read: HashSet<String> = crate::ir::implicit_inputs(&node).into_iter().collect();
        let rank = |t: &TensorProto| {
            self.order
                .iter()
                .position(|n| n == t.name())
                .unwrap_or(usize::MAX)
        };
        let mut kept: Vec<(usize, usize, TensorProto)> = outer
            .into_iter()
            .enumerate()
            .filter(|(_, t)| read.contains(t.name()))
            .map(|(i, t)| (rank(&t), i, t))
            .collect();
        kept.sort_by_key(|(r, i, _)| (*r, *i));
        graph.initializer = kept.into_iter().map(|(_, _, t)| t).collect();
        graph.node = vec![node];
        // The model-level metadata the rewrite added (the applied plan).
        out.metadata_props = with_past.header.metadata_props.clone();
        Ok(out)
    }
}

fn same_content(a: &TensorProto, b: &TensorProto) -> bool {
    let strip = |t: &TensorProto| {
        let mut t = t.clone();
        t.name = None;
        t.encode_to_vec()
    };
    strip(a) == strip(b)
}

/// Points every block linear of `no_past` (discovered as `no_past_arch`
/// before the edit) at the weight and bias its counterpart in `with_past`
/// reads now: the refits and slicing of the with-past branch are then the
/// no-past branch's too, and the outer graph stores each once.
fn share_weights(
    arch: &Architecture,
    with_past: &Model,
    in_with_past: &dyn Fn(NodeId) -> Option<NodeId>,
    no_past_arch: &Architecture,
    no_past: &mut Model,
) -> Result<(), MergedError> {
    let edit = |source| MergedError::Graph {
        branch: ELSE,
        source,
    };
    for (a, b) in paired(arch, no_past_arch) {
        let (la, lb) = (a.linears(), b.linears());
        if la.len() != lb.len() {
            return Err(MergedError::Branches(format!(
                "block {} has {} linear layers in one branch and {} in the other",
                a.index,
                la.len(),
                lb.len()
            )));
        }
        for (x, y) in la.iter().zip(&lb) {
            if x.role != y.role {
                return Err(MergedError::Branches(format!(
                    "block {} has {} where the other branch has {}",
                    a.index, x.role, y.role
                )));
            }
            let mut reads = vec![(x.weight.reader, y.weight.reader, x.weight.slot)];
            if let (Some(bx), Some(by)) = (x.bias, y.bias)
                && bx.slot == by.slot
            {
                reads.push((bx.reader, by.reader, bx.slot));
            }
            for (rx, ry, slot) in reads {
                // Removed sub-blocks' layers are gone from both.
                let (Some(nx), Some(_)) = (
                    in_with_past(rx).map(|id| with_past.graph.node(id)),
                    no_past.graph.get_node(ry),
                ) else {
                    continue;
                };
                let Some(value) = nx.inputs().get(slot).cloned() else {
                    continue;
                };
                // Stored tensors only: a weight behind a dequantising chain
                // keeps the branch's own (same) chain.
                let Some(tensor) = with_past.graph.initializer(&value).cloned() else {
                    continue;
                };
                if no_past.graph.initializer(&value).is_none() {
                    no_past.graph.set_initializer(tensor).map_err(edit)?;
                }
                no_past.graph.set_input(ry, slot, &value).map_err(edit)?;
            }
        }
    }
    no_past.graph.eliminate_dead_code();
    Ok(())
}
