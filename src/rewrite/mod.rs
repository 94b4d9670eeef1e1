//! Applying a plan: dropping blocks and sub-blocks, pruning heads and MLP
//! neurons, then removing everything that became dead.
//!
//! Every edit reads the architecture found before any edit and never changes
//! a tensor in place: sliced weights and edited shape constants are new
//! initializers, so a tensor that other blocks share (exporters deduplicate
//! identical biases and shape constants) stays as it was for them.
//!
//! Removing a sub-block means its residual branch contributes nothing:
//!
//! ```text
//! pre-norm   Add(x, branch)          ─► x
//! post-norm  LN(Add(x, branch))      ─► LN(x)      (the block's norm stays)
//! fused      SkipLN(branch, x)[3]    ─► x,  SkipLN(…)[0] ─► LayerNormalization(x)
//! ```
//!
//! Removing a whole block rewires its output to its input; in post-norm
//! blocks that removes the block's norms too, and in fused pre-norm models
//! the norm that the last join computed for the *next* block is recreated as
//! a `LayerNormalization` of the block input.

pub mod repair;

use std::collections::HashSet;

use crate::arch::patterns::const_ints;
use crate::arch::{Architecture, Attention, Block, Join, Linear, Mlp, Projections, TowerKind};
use crate::ir::{DeadCode, Graph, IrError, Model, NodeId, Tensor, TensorError};
use crate::onnx::proto::{AttributeProto, NodeProto};
use crate::plan::{BlockAction, Plan};

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
}

/// What [`apply`] did.
#[derive(Debug, Clone, Default)]
pub struct Applied {
    /// One label per rewrite, in the order applied (`drop_block vision/3`).
    pub rewrites: Vec<String>,
    /// What dead-code elimination removed afterwards.
    pub dead: DeadCode,
}

/// Applies `plan` to `model`, whose architecture is `arch` (discovered on
/// the unedited model). On error the model may be partly edited; callers
/// discard it.
pub fn apply(model: &mut Model, arch: &Architecture, plan: &Plan) -> Result<Applied, RewriteError> {
    // Check every entry (numbered as the user wrote them) before editing.
    for (entry, action) in plan.blocks.iter().enumerate() {
        locate(arch, entry, action)?;
    }
    let plan = plan.normalized();
    let mut targets: Vec<(&BlockAction, &Block)> = Vec::new();
    for (entry, action) in plan.blocks.iter().enumerate() {
        targets.push((action, locate(arch, entry, action)?));
    }
    let opset = model.opset("").unwrap_or(0);
    let graph = &mut model.graph;
    let mut applied = Applied::default();
    // Declared shapes inside sub-blocks about to be sliced go stale: collect
    // them before any edit moves the stream (they are optional; runtimes
    // infer them again).
    let mut stale: HashSet<String> = HashSet::new();
    for (action, block) in &targets {
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
    // Slicing first, then sub-block drops, then block drops: each step only
    // uses names the earlier steps left in place.
    for (action, block) in &targets {
        if let Some(keep) = &action.keep_heads {
            let label = format!(
                "prune_heads {} ({} of {})",
                action.label(),
                keep.len(),
                block.attention.body.heads
            );
            prune_heads(graph, &block.attention.body, keep, &label)?;
            applied.rewrites.push(label);
        }
        if let Some(keep) = &action.keep_mlp {
            let label = format!(
                "slim_mlp {} ({} of {})",
                action.label(),
                keep.len(),
                block.mlp.body.width()
            );
            slim_mlp(graph, &block.mlp.body, keep, &label)?;
            applied.rewrites.push(label);
        }
    }
    for (action, block) in &targets {
        let Some(zero) = &action.zero_below else {
            continue;
        };
        for site in block.linears() {
            let Some(&threshold) = zero.get(site.role) else {
                continue;
            };
            let label = format!("zero_below {} {}", action.label(), site.role);
            let (zeroed, total) = zero_small_weights(graph, site.node, threshold, &label)?;
            applied.rewrites.push(format!(
                "{label} (|w| < {threshold:e}: {zeroed} of {total})"
            ));
        }
    }
    for (action, block) in &targets {
        let subs = [
            (
                action.drop_attention,
                "drop_attention",
                &block.attention.join,
            ),
            (action.drop_mlp, "drop_mlp", &block.mlp.join),
        ];
        for (wanted, name, join) in subs {
            if wanted {
                let label = format!("{name} {}", action.label());
                bypass_join(graph, join, &join.stream_in, block, true, opset, &label)?;
                applied.rewrites.push(label);
            }
        }
    }
    for (action, block) in &targets {
        if action.drop {
            let label = format!("drop_block {}", action.label());
            bypass_join(
                graph,
                &block.mlp.join,
                block.input(),
                block,
                false,
                opset,
                &label,
            )?;
            applied.rewrites.push(label);
        }
    }
    graph.value_info.retain(|name, _| !stale.contains(name));
    applied.dead = graph.eliminate_dead_code();
    #[cfg(any(test, feature = "paranoid"))]
    graph.check().map_err(|source| RewriteError::Graph {
        label: "after rewriting".into(),
        source,
    })?;
    if !plan.is_empty() {
        let compact = serde_json::to_string(&plan).expect("plans serialize");
        model.set_metadata(PLAN_METADATA_KEY, &compact);
    }
    Ok(applied)
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
    let kind = if action.tower == "vision" {
        TowerKind::Vision
    } else {
        TowerKind::Text
    };
    let tower = arch
        .tower(kind)
        .ok_or_else(|| err(format!("the model has no {} tower", action.tower)))?;
    let block = tower.blocks.get(action.index).ok_or_else(|| {
        err(format!(
            "the {} tower has {} blocks (indices 0..={})",
            action.tower,
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

/// Where the weight read by `node` (a MatMul/Gemm or fused attention
/// operator, weight at input 1) is stored now — after any earlier edit
/// renamed it: (node, slot, whether it sits behind a Transpose, i.e. is
/// stored [out, in]).
pub(crate) fn weight_read_site(
    graph: &Graph,
    node: NodeId,
    label: &str,
) -> Result<(NodeId, usize, bool), RewriteError> {
    let read = graph
        .node(node)
        .inputs()
        .get(1)
        .cloned()
        .unwrap_or_default();
    if graph.initializer(&read).is_some() {
        return Ok((node, 1, false));
    }
    match graph.producer_node(&read) {
        Some(t)
            if graph.node(t).op() == "Transpose"
                && graph.initializer(&graph.node(t).inputs()[0]).is_some() =>
        {
            Ok((t, 0, true))
        }
        _ => Err(RewriteError::Unsupported {
            label: label.into(),
            reason: format!("weight '{read}' is not a constant"),
        }),
    }
}

/// Replaces input `slot` of `node` by a new float32 initializer holding
/// `values` (named after the old input plus `suffix`); the old tensor is
/// left for others that read it.
pub(crate) fn replace_f32_input(
    graph: &mut Graph,
    node: NodeId,
    slot: usize,
    suffix: &str,
    dims: Vec<i64>,
    values: &[f32],
    label: &str,
) -> Result<(), RewriteError> {
    let name = graph.node(node).inputs()[slot].clone();
    let new_name = graph.fresh_name(&format!("{name}.{suffix}"));
    let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let tensor = Tensor::from_raw(&new_name, 1, dims, bytes::Bytes::from(raw));
    let graph_err = |source| RewriteError::Graph {
        label: label.into(),
        source,
    };
    graph.set_initializer(tensor).map_err(graph_err)?;
    graph.set_input(node, slot, &new_name).map_err(graph_err)
}

/// Zeroes the weights with |w| < `threshold` of the linear layer read by
/// `node` (input 1, or behind a Transpose), as a new initializer. Works on
/// the weight as it is now, so it composes with head and neuron slicing.
/// Returns (zeroed, total) element counts.
fn zero_small_weights(
    graph: &mut Graph,
    node: NodeId,
    threshold: f64,
    label: &str,
) -> Result<(usize, usize), RewriteError> {
    let unsupported = |reason: String| RewriteError::Unsupported {
        label: label.into(),
        reason,
    };
    let (site, slot, _) = weight_read_site(graph, node, label)?;
    let name = graph.node(site).inputs()[slot].clone();
    let tensor = graph.initializer(&name).expect("checked above");
    if tensor.data_type() != 1 {
        return Err(unsupported(format!(
            "weight '{name}' is not float32; unstructured masking edits float32 weights"
        )));
    }
    let mut values = tensor.to_f32().map_err(|source| RewriteError::Tensor {
        label: label.into(),
        source,
    })?;
    let dims = tensor.dims().to_vec();
    let mut zeroed = 0;
    for v in values.iter_mut() {
        if (v.abs() as f64) < threshold && *v != 0.0 {
            *v = 0.0;
            zeroed += 1;
        }
    }
    let total = values.len();
    replace_f32_input(graph, site, slot, "masked", dims, &values, label)?;
    Ok((zeroed, total))
}

/// Replaces input `slot` of `node` (an initializer) by its rows/columns
/// `keep` along `axis`, as a new initializer.
fn slice_input(
    graph: &mut Graph,
    node: NodeId,
    slot: usize,
    axis: usize,
    keep: &[usize],
    label: &str,
) -> Result<(), RewriteError> {
    let name = graph.node(node).inputs()[slot].clone();
    let tensor = graph
        .initializer(&name)
        .ok_or_else(|| RewriteError::Unsupported {
            label: label.into(),
            reason: format!("'{name}' is not an initializer"),
        })?;
    let new_name = graph.fresh_name(&format!("{name}.pruned"));
    let sliced = tensor
        .select(&new_name, axis, keep)
        .map_err(|source| RewriteError::Tensor {
            label: label.into(),
            source,
        })?;
    let graph_err = |source| RewriteError::Graph {
        label: label.into(),
        source,
    };
    graph.set_initializer(sliced).map_err(graph_err)?;
    graph.set_input(node, slot, &new_name).map_err(graph_err)
}

/// Where a linear layer's weight is read: (node, input slot, stored [out, in]).
fn weight_site(graph: &Graph, linear: &Linear) -> (NodeId, usize, bool) {
    let node = graph.node(linear.matmul);
    if node.inputs()[1] == linear.weight {
        return (linear.matmul, 1, linear.transposed);
    }
    // Behind a Transpose: the stored tensor is [out, in].
    let transpose = graph
        .producer_node(&node.inputs()[1])
        .expect("linear weights are constants");
    (transpose, 0, true)
}

/// Keeps only output features `keep` of a linear layer (weight columns and bias).
fn slice_outputs(
    graph: &mut Graph,
    linear: &Linear,
    keep: &[usize],
    label: &str,
) -> Result<(), RewriteError> {
    let (node, slot, stored_out_in) = weight_site(graph, linear);
    slice_input(
        graph,
        node,
        slot,
        if stored_out_in { 0 } else { 1 },
        keep,
        label,
    )?;
    if let Some(bias) = &linear.bias {
        slice_input(graph, bias.node, bias.slot, 0, keep, label)?;
    }
    Ok(())
}

/// Keeps only input features `keep` of a linear layer (weight rows).
fn slice_inputs(
    graph: &mut Graph,
    linear: &Linear,
    keep: &[usize],
    label: &str,
) -> Result<(), RewriteError> {
    let (node, slot, stored_out_in) = weight_site(graph, linear);
    slice_input(
        graph,
        node,
        slot,
        if stored_out_in { 1 } else { 0 },
        keep,
        label,
    )
}

fn head_columns(
    keep: &[usize],
    head_dim: usize,
    offset: usize,
) -> impl Iterator<Item = usize> + '_ {
    keep.iter()
        .flat_map(move |h| (0..head_dim).map(move |d| offset + h * head_dim + d))
}

/// Keeps heads `keep` of an attention sub-block.
fn prune_heads(
    graph: &mut Graph,
    attention: &Attention,
    keep: &[usize],
    label: &str,
) -> Result<(), RewriteError> {
    let (heads, dim) = (attention.heads, attention.head_dim);
    if keep.len() == heads {
        return Ok(());
    }
    let columns: Vec<usize> = head_columns(keep, dim, 0).collect();
    let packed: Vec<usize> = (0..3)
        .flat_map(|s| head_columns(keep, dim, s * heads * dim))
        .collect();
    match &attention.projections {
        Projections::Separate { q, k, v } => {
            for linear in [q, k, v] {
                slice_outputs(graph, linear, &columns, label)?;
            }
        }
        Projections::Packed { qkv } => slice_outputs(graph, qkv, &packed, label)?,
        Projections::Fused { node, bias, .. } => {
            slice_input(graph, *node, 1, 1, &packed, label)?;
            if bias.is_some() {
                slice_input(graph, *node, 2, 0, &packed, label)?;
            }
            let attribute = AttributeProto {
                name: Some("num_heads".into()),
                r#type: Some(2),
                i: Some(keep.len() as i64),
                ..Default::default()
            };
            graph
                .set_attribute(*node, attribute)
                .map_err(|source| RewriteError::Graph {
                    label: label.into(),
                    source,
                })?;
            if graph.node(*node).attribute("qkv_hidden_sizes").is_some() {
                let width = (keep.len() * dim) as i64;
                let attribute = AttributeProto {
                    name: Some("qkv_hidden_sizes".into()),
                    r#type: Some(7),
                    ints: vec![width; 3],
                    ..Default::default()
                };
                graph
                    .set_attribute(*node, attribute)
                    .map_err(|source| RewriteError::Graph {
                        label: label.into(),
                        source,
                    })?;
            }
        }
    }
    slice_inputs(graph, &attention.out, &columns, label)?;
    // Head counts in split reshapes sit second to last; merged widths last.
    for &site in &attention.split_sites {
        rewrite_shape(graph, site, 2, heads as i64, keep.len() as i64, label)?;
    }
    for &site in &attention.merge_sites {
        rewrite_shape(
            graph,
            site,
            1,
            (heads * dim) as i64,
            (keep.len() * dim) as i64,
            label,
        )?;
    }
    Ok(())
}

/// In the target shape of Reshape `site`, replaces the entry `from_end`
/// positions from the end when it equals `old` (entries of -1, 0 or computed
/// pieces adapt by themselves). The constant is replaced by a new one.
fn rewrite_shape(
    graph: &mut Graph,
    site: NodeId,
    from_end: usize,
    old: i64,
    new: i64,
    label: &str,
) -> Result<(), RewriteError> {
    let shape = graph.node(site).inputs()[1].clone();
    let graph_err = |source| RewriteError::Graph {
        label: label.into(),
        source,
    };
    if let Some(values) = const_ints(graph, &shape) {
        let Some(pos) = values.len().checked_sub(from_end) else {
            return Ok(());
        };
        if values[pos] != old {
            return Ok(());
        }
        let mut values = values;
        values[pos] = new;
        let name = graph.fresh_name(&format!("{shape}.pruned"));
        graph
            .set_initializer(int_tensor(&name, &values))
            .map_err(graph_err)?;
        return graph.set_input(site, 1, &name).map_err(graph_err);
    }
    let Some(concat) = graph
        .producer_node(&shape)
        .filter(|c| graph.node(*c).op() == "Concat")
    else {
        return Ok(());
    };
    // Concat pieces: constants contribute their length, computed pieces one
    // element (Unsqueeze of a scalar).
    let pieces: Vec<(String, Option<Vec<i64>>)> = graph
        .node(concat)
        .inputs()
        .iter()
        .map(|p| (p.clone(), const_ints(graph, p)))
        .collect();
    let total: usize = pieces
        .iter()
        .map(|(_, v)| v.as_ref().map_or(1, |v| v.len()))
        .sum();
    let Some(target) = total.checked_sub(from_end) else {
        return Ok(());
    };
    let mut position = 0;
    for (slot, (name, values)) in pieces.iter().enumerate() {
        let len = values.as_ref().map_or(1, |v| v.len());
        if (position..position + len).contains(&target) {
            if let Some(values) = values
                && values[target - position] == old
            {
                let mut values = values.clone();
                values[target - position] = new;
                let new_name = graph.fresh_name(&format!("{name}.pruned"));
                graph
                    .set_initializer(int_tensor(&new_name, &values))
                    .map_err(graph_err)?;
                graph
                    .set_input(concat, slot, &new_name)
                    .map_err(graph_err)?;
            }
            break;
        }
        position += len;
    }
    Ok(())
}

fn int_tensor(name: &str, values: &[i64]) -> Tensor {
    let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    Tensor::from_raw(name, 7, vec![values.len() as i64], bytes::Bytes::from(raw))
}

/// Keeps neurons `keep` of an MLP.
fn slim_mlp(graph: &mut Graph, mlp: &Mlp, keep: &[usize], label: &str) -> Result<(), RewriteError> {
    let width = mlp.width();
    if keep.len() == width {
        return Ok(());
    }
    slice_outputs(graph, &mlp.fc1, keep, label)?;
    slice_inputs(graph, &mlp.fc2, keep, label)?;
    // Per-neuron constants inside the activation (rare) shrink too.
    for &id in &mlp.activation {
        let inputs = graph.node(id).inputs().to_vec();
        for (slot, input) in inputs.iter().enumerate() {
            let per_neuron = graph
                .initializer(input)
                .is_some_and(|t| t.dims().last() == Some(&(width as i64)) && t.len() == width);
            let is_fc1_bias = mlp
                .fc1
                .bias
                .as_ref()
                .is_some_and(|b| b.node == id && b.slot == slot);
            if per_neuron && !is_fc1_bias {
                let axis = graph.initializer(input).map_or(0, |t| t.dims().len() - 1);
                slice_input(graph, id, slot, axis, keep, label)?;
            }
        }
    }
    Ok(())
}

/// Makes the residual branch joined at `join` contribute nothing, the
/// stream continuing from `stream`. `keep_norm`: a post-norm join keeps its
/// norm (sub-block removal) or loses it with the block (block removal).
fn bypass_join(
    graph: &mut Graph,
    join: &Join,
    stream: &str,
    block: &Block,
    keep_norm: bool,
    opset: i64,
    label: &str,
) -> Result<(), RewriteError> {
    let graph_err = |source| RewriteError::Graph {
        label: label.into(),
        source,
    };
    let node = graph.node(join.node);
    if node.op() == "Add" {
        let sum = join.sum.clone().expect("Add joins have a sum");
        return match (&join.norm, keep_norm) {
            (Some(norm), false) if block.norm_after_join => graph
                .replace_all_uses(&norm.output, stream)
                .map_err(graph_err),
            _ => graph.replace_all_uses(&sum, stream).map_err(graph_err),
        };
    }
    // SkipLayerNormalization: output 3 is the sum, output 0 its norm.
    let outputs = node.outputs().to_vec();
    let inputs = node.inputs().to_vec();
    let epsilon = node.attr_float("epsilon");
    if let Some(sum) = outputs.get(3).filter(|s| !s.is_empty()) {
        graph.replace_all_uses(sum, stream).map_err(graph_err)?;
    }
    let normed = &outputs[0];
    if graph.uses(normed).is_empty() && !graph.is_output(normed) {
        return Ok(());
    }
    if block.norm_after_join && !keep_norm {
        return graph.replace_all_uses(normed, stream).map_err(graph_err);
    }
    if opset < 17 {
        return Err(RewriteError::Unsupported {
            label: label.into(),
            reason: format!(
                "the fused norm must be rebuilt as LayerNormalization, which needs opset 17 (the model imports {opset})"
            ),
        });
    }
    let output = graph.fresh_name(&format!("{normed}.bypass"));
    let mut attribute = vec![AttributeProto {
        name: Some("axis".into()),
        r#type: Some(2),
        i: Some(-1),
        ..Default::default()
    }];
    if let Some(eps) = epsilon {
        attribute.push(AttributeProto {
            name: Some("epsilon".into()),
            r#type: Some(1),
            f: Some(eps),
            ..Default::default()
        });
    }
    let mut norm_inputs = vec![stream.to_string(), inputs[2].clone()];
    if let Some(beta) = inputs.get(3).filter(|b| !b.is_empty()) {
        norm_inputs.push(beta.clone());
    }
    let name = format!("{}/bypass", graph.node(join.node).name());
    graph
        .add_node(NodeProto {
            op_type: Some("LayerNormalization".into()),
            name: Some(name),
            input: norm_inputs,
            output: vec![output.clone()],
            attribute,
            ..Default::default()
        })
        .map_err(graph_err)?;
    graph.replace_all_uses(normed, &output).map_err(graph_err)
}
