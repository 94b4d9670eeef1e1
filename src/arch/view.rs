//! The normalised view discovery matches on: the graph as the exporter
//! meant it, with the noise of a particular export seen through.
//!
//! - **Transparent operators** between two meaningful ones: `Identity`,
//!   inference-time `Dropout`, float-to-float `Cast` (mixed precision,
//!   open_clip's `.to(dtype)`), and the fake-quantisation pair
//!   `QuantizeLinear → DequantizeLinear` on activations. Matchers step over
//!   them in either direction.
//! - **Constants**, wherever they live: initializers, `Constant` nodes,
//!   values computed only from constants and tensor sizes (a head-dimension
//!   scale `1/√(Shape(q)[-1])`), all through the shape inference of
//!   [`super::shapes`].
//! - **Constant operands** (weights, biases, norm parameters) behind a
//!   chain of `Identity` (exporters deduplicate identical tensors this
//!   way), `Cast`, `Transpose`, `DequantizeLinear` or a `Cast` + per-channel
//!   `Mul` (weight-only quantisation): [`Operand`] records the stored tensor
//!   and the chain, so a rewrite can slice the stored tensor (and its
//!   scales) and rebuild the chain for the one reader it edits.
//!
//! What a matcher finds is always named in the original graph: the node
//! that reads an operand and the input slot it reads it at.

use super::shapes::Shapes;
use crate::ir::{Graph, NodeId, Producer, Tensor};
use crate::onnx::dtype;

/// The graph with its shape inference, as discovery sees it.
pub struct View<'g> {
    /// The graph.
    pub graph: &'g Graph,
    /// What is known of every value's size.
    pub shapes: Shapes,
}

/// One step between a stored constant and where it is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// `Identity` or `Cast`: same values, same layout.
    Pass(NodeId),
    /// A 2-D `Transpose`.
    Transpose(NodeId),
    /// `DequantizeLinear(q, scale[, zero_point])`, per tensor or per
    /// channel along `axis` of its input.
    Dequantize {
        /// The node.
        node: NodeId,
        /// Its `axis` (normalised; 0 for per-tensor).
        axis: usize,
    },
    /// `Mul(w, scale)` by a constant (weight-only quantisation's
    /// per-channel scale); `slot` is the scale's input slot.
    Scale {
        /// The node.
        node: NodeId,
        /// Which input is the scale.
        slot: usize,
    },
}

impl Step {
    /// The node of the step.
    pub fn node(&self) -> NodeId {
        match self {
            Step::Pass(n) | Step::Transpose(n) => *n,
            Step::Dequantize { node, .. } | Step::Scale { node, .. } => *node,
        }
    }
}

/// A constant input of a node: where it is read, where it is stored, and
/// the steps in between (from the stored tensor to the reader).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operand {
    /// The node that reads it.
    pub reader: NodeId,
    /// The input slot it is read at.
    pub slot: usize,
    /// The stored tensor: an initializer, or the output of a `Constant`.
    pub storage: String,
    /// The steps from the stored tensor to the reader, in order.
    pub chain: Vec<Step>,
}

impl Operand {
    /// The stored tensor.
    pub fn tensor(&self, graph: &Graph) -> Option<Tensor> {
        stored_tensor(graph, &self.storage)
    }

    /// Elements of the stored tensor: the parameters this use counts.
    pub fn numel(&self, graph: &Graph) -> u64 {
        self.tensor(graph).map_or(0, |t| t.len() as u64)
    }

    /// The dims of the tensor as the reader sees it.
    pub fn read_dims(&self, graph: &Graph) -> Option<Vec<usize>> {
        let mut dims: Vec<usize> = self
            .tensor(graph)?
            .dims()
            .iter()
            .map(|&d| usize::try_from(d).ok())
            .collect::<Option<_>>()?;
        for step in &self.chain {
            if matches!(step, Step::Transpose(_)) {
                dims.reverse();
            }
        }
        Some(dims)
    }

    /// Whether an odd number of transposes sits in the chain (the reader
    /// sees the stored matrix transposed).
    pub fn transposed(&self) -> bool {
        self.chain
            .iter()
            .filter(|s| matches!(s, Step::Transpose(_)))
            .count()
            % 2
            == 1
    }

    /// The element type the reader sees.
    pub fn read_type(&self, graph: &Graph) -> i32 {
        let mut data_type = self.tensor(graph).map_or(0, |t| t.data_type());
        for step in &self.chain {
            let node = graph.node(step.node());
            match step {
                Step::Pass(_) if node.op() == "Cast" => {
                    data_type = node.attr_int("to").unwrap_or(0) as i32;
                }
                Step::Dequantize { .. } => {
                    data_type = node
                        .inputs()
                        .get(1)
                        .and_then(|s| stored_tensor(graph, s))
                        .map_or(dtype::code::FLOAT, |t| t.data_type());
                }
                Step::Scale { .. } => {
                    data_type = node
                        .inputs()
                        .iter()
                        .filter_map(|s| stored_tensor(graph, s))
                        .map(|t| t.data_type())
                        .find(|d| dtype::is_float(*d))
                        .unwrap_or(data_type);
                }
                _ => {}
            }
        }
        data_type
    }

    /// The values as the reader sees them (dequantised, transposed) in f32,
    /// with their dims.
    pub fn values(&self, graph: &Graph) -> Option<(Vec<f32>, Vec<usize>)> {
        let tensor = self.tensor(graph)?;
        let mut dims: Vec<usize> = tensor
            .dims()
            .iter()
            .map(|&d| usize::try_from(d).ok())
            .collect::<Option<_>>()?;
        let mut values = tensor.to_f32().ok()?;
        for step in &self.chain {
            let node = graph.node(step.node());
            match step {
                Step::Pass(_) => {}
                Step::Transpose(_) => {
                    let [r, c] = dims[..] else { return None };
                    values = (0..c * r).map(|i| values[(i % r) * c + i / r]).collect();
                    dims = vec![c, r];
                }
                Step::Dequantize { axis, .. } => {
                    let scale = node.inputs().get(1).and_then(|s| stored_tensor(graph, s))?;
                    let scale = scale.to_f32().ok()?;
                    let zero = match node.inputs().get(2).filter(|z| !z.is_empty()) {
                        Some(z) => stored_tensor(graph, z)?.to_f32().ok()?,
                        None => vec![0.0],
                    };
                    let (per, inner) = channel_layout(&dims, *axis);
                    for (i, v) in values.iter_mut().enumerate() {
                        let c = if scale.len() == 1 {
                            0
                        } else {
                            (i / inner) % per
                        };
                        let z = zero.get(c).or(zero.first()).copied().unwrap_or(0.0);
                        *v = (*v - z) * scale.get(c).copied()?;
                    }
                }
                Step::Scale { slot, .. } => {
                    let s = node
                        .inputs()
                        .get(*slot)
                        .and_then(|s| stored_tensor(graph, s))?;
                    let sdims: Vec<usize> = s.dims().iter().map(|&d| d as usize).collect();
                    let scale = s.to_f32().ok()?;
                    broadcast_apply(&mut values, &dims, &scale, &sdims)?;
                }
            }
        }
        Some((values, dims))
    }
}

/// For per-channel parameters along `axis` of `dims`: the number of
/// channels and the elements after the axis.
pub fn channel_layout(dims: &[usize], axis: usize) -> (usize, usize) {
    let per = dims.get(axis).copied().unwrap_or(1).max(1);
    let inner = dims
        .get(axis + 1..)
        .map_or(1, |d| d.iter().product::<usize>().max(1));
    (per, inner)
}

/// Multiplies `values` (`dims`) by `scale` (`sdims`, broadcast from the
/// right).
fn broadcast_apply(
    values: &mut [f32],
    dims: &[usize],
    scale: &[f32],
    sdims: &[usize],
) -> Option<()> {
    if sdims.len() > dims.len() {
        return None;
    }
    let offset = dims.len() - sdims.len();
    for (axis, (&s, &d)) in sdims.iter().zip(&dims[offset..]).enumerate() {
        if s != 1 && s != d {
            return None;
        }
        let _ = axis;
    }
    let strides: Vec<usize> = (0..dims.len())
        .map(|i| dims[i + 1..].iter().product())
        .collect();
    let sstrides: Vec<usize> = (0..sdims.len())
        .map(|i| sdims[i + 1..].iter().product())
        .collect();
    for (i, v) in values.iter_mut().enumerate() {
        let mut at = 0;
        for (k, &sd) in sdims.iter().enumerate() {
            let coordinate = (i / strides[offset + k]) % dims[offset + k];
            if sd != 1 {
                at += coordinate * sstrides[k];
            }
        }
        *v *= scale.get(at).copied()?;
    }
    Some(())
}

/// The tensor stored under `value`: an initializer, or a `Constant` node's
/// `value` tensor.
pub fn stored_tensor(graph: &Graph, value: &str) -> Option<Tensor> {
    if let Some(t) = graph.initializer(value) {
        return Some(t.clone());
    }
    let id = graph.producer_node(value)?;
    let node = graph.node(id);
    if node.op() != "Constant" || !node.domain().is_empty() {
        return None;
    }
    node.attribute("value")
        .and_then(|a| a.t.as_ref())
        .map(|t| Tensor::new(t.clone()))
}

impl<'g> View<'g> {
    /// The view of `graph`.
    pub fn new(graph: &'g Graph) -> Self {
        Self {
            graph,
            shapes: Shapes::infer(graph),
        }
    }

    /// Whether `value` carries data from a graph input.
    pub fn is_data(&self, value: &str) -> bool {
        self.shapes.is_data(value)
    }

    /// Whether `value` is a constant: stored, or computed only from
    /// constants and sizes.
    pub fn is_const(&self, value: &str) -> bool {
        !value.is_empty() && !self.is_data(value) && self.graph.producer(value).is_some()
    }

    /// The value of a scalar (or one-element) constant.
    pub fn scalar(&self, value: &str) -> Option<f64> {
        if self.is_data(value) {
            return None;
        }
        self.shapes
            .float(value)
            .or_else(|| match self.shapes.ints(value) {
                Some([one]) => one.value().map(|v| v as f64),
                _ => None,
            })
    }

    /// The elements of a small constant integer tensor, when all are known.
    pub fn ints(&self, value: &str) -> Option<Vec<i64>> {
        self.shapes.ints(value)?.iter().map(|e| e.value()).collect()
    }

    /// Whether `id` passes its (first) input through unchanged, as far as
    /// matching is concerned.
    pub fn is_transparent(&self, id: NodeId) -> bool {
        let node = self.graph.node(id);
        if !node.domain().is_empty() || node.inputs().is_empty() {
            return false;
        }
        match node.op() {
            // A Concat of one tensor is that tensor (TorchScript's export of
            // a cache's past).
            "Identity" => true,
            "Concat" => node.inputs().len() == 1,
            // At inference Dropout is the identity; its mask output must be
            // unused.
            "Dropout" => node
                .outputs()
                .get(1)
                .is_none_or(|m| m.is_empty() || self.graph.uses(m).is_empty()),
            "Cast" => {
                let to = node.attr_int("to").unwrap_or(0) as i32;
                let from = self
                    .graph
                    .value_type(&node.inputs()[0])
                    .map_or(0, |t| t.elem_type);
                matches!(to, 1 | 10 | 11 | 16) && (from == 0 || matches!(from, 1 | 10 | 11 | 16))
            }
            // Fake quantisation of an activation: Q then DQ with the same
            // parameters reads as the value itself.
            "DequantizeLinear" => self
                .graph
                .producer_node(&node.inputs()[0])
                .is_some_and(|q| {
                    let q = self.graph.node(q);
                    q.op() == "QuantizeLinear" && self.is_data(&q.inputs()[0])
                }),
            _ => false,
        }
    }

    /// The input a transparent node passes on (for a DQ of a Q, the Q's
    /// input).
    fn passed(&self, id: NodeId) -> String {
        let node = self.graph.node(id);
        if node.op() == "DequantizeLinear"
            && let Some(q) = self.graph.producer_node(&node.inputs()[0])
        {
            return self.graph.node(q).inputs()[0].clone();
        }
        node.inputs()[0].clone()
    }

    /// `value` traced back through transparent nodes to where it is made.
    pub fn origin(&self, value: &str) -> String {
        let mut value = value.to_string();
        for _ in 0..64 {
            match self.graph.producer_node(&value) {
                Some(id) if self.is_transparent(id) => value = self.passed(id),
                _ => break,
            }
        }
        value
    }

    /// The node producing `value`, seen through transparent nodes.
    pub fn producer(&self, value: &str) -> Option<NodeId> {
        self.graph.producer_node(&self.origin(value))
    }

    /// The data readers of `value` seen through transparent nodes: each
    /// real reader with the value it reads. Shape and size reads do not
    /// count.
    pub fn readers(&self, value: &str) -> Vec<(NodeId, String)> {
        let mut out = Vec::new();
        let mut stack = vec![value.to_string()];
        let mut steps = 0;
        while let Some(v) = stack.pop() {
            steps += 1;
            if steps > 256 {
                break;
            }
            for reader in self.graph.consumers(&v) {
                let node = self.graph.node(reader);
                if matches!(node.op(), "Shape" | "Size") {
                    continue;
                }
                if self.is_transparent(reader) && node.inputs()[0] == v {
                    stack.push(node.outputs()[0].clone());
                } else if node.op() == "QuantizeLinear"
                    && let [dq] = self.graph.consumers(&node.outputs()[0])[..]
                    && self.is_transparent(dq)
                {
                    stack.push(self.graph.node(dq).outputs()[0].clone());
                } else {
                    out.push((reader, v.clone()));
                }
            }
        }
        out
    }

    /// The one data reader of `value` (through transparent nodes), when
    /// there is exactly one and no graph output carries the value.
    pub fn single_reader(&self, value: &str) -> Option<(NodeId, String)> {
        let readers = self.readers(value);
        match readers.as_slice() {
            [one] if !self.is_output_along(value, &one.1) => Some(one.clone()),
            _ => None,
        }
    }

    /// Whether `from` or a transparent copy of it up to `to` is a graph
    /// output.
    fn is_output_along(&self, from: &str, to: &str) -> bool {
        let mut value = to.to_string();
        for _ in 0..64 {
            if self.graph.is_output(&value) {
                return true;
            }
            if value == from {
                return false;
            }
            match self.graph.producer_node(&value) {
                Some(id) if self.is_transparent(id) => value = self.passed(id),
                _ => return false,
            }
        }
        false
    }

    /// The constant operand read at input `slot` of `reader`, when it is
    /// one: the chain back to the stored tensor.
    pub fn operand(&self, reader: NodeId, slot: usize) -> Option<Operand> {
        operand_at(self.graph, reader, slot)
    }

    /// Whether `value` is produced by a graph input or an initializer
    /// (no node).
    pub fn is_source(&self, value: &str) -> bool {
        !matches!(self.graph.producer(value), Some(Producer::Node(..)))
    }
}

/// The constant operand read at input `slot` of `reader` in `graph`, when
/// it is one: the chain back to the stored tensor. (The rewrites call it
/// on the graph as edited so far.)
pub fn operand_at(graph: &Graph, reader: NodeId, slot: usize) -> Option<Operand> {
    let mut value = graph.node(reader).inputs().get(slot)?.clone();
    let mut chain = Vec::new();
    for _ in 0..8 {
        if stored_tensor(graph, &value).is_some() {
            chain.reverse();
            return Some(Operand {
                reader,
                slot,
                storage: value,
                chain,
            });
        }
        let id = graph.producer_node(&value)?;
        let node = graph.node(id);
        if !node.domain().is_empty() {
            return None;
        }
        let inputs = node.inputs();
        let (step, next) = match node.op() {
            "Identity" | "Cast" => (Step::Pass(id), inputs.first()?.clone()),
            "Transpose" if node.attr_ints("perm").is_none_or(|p| p == [1, 0]) => {
                (Step::Transpose(id), inputs.first()?.clone())
            }
            "DequantizeLinear" => {
                if node.attr_int("block_size").is_some_and(|b| b > 0) {
                    return None;
                }
                stored_tensor(graph, inputs.get(1)?)?;
                if let Some(z) = inputs.get(2).filter(|z| !z.is_empty())
                    && stored_tensor(graph, z).is_none()
                {
                    return None;
                }
                let rank = stored_tensor(graph, &inputs[0]).map_or(2, |t| t.dims().len());
                let axis = node.attr_int("axis").unwrap_or(1);
                let axis = if axis < 0 { axis + rank as i64 } else { axis };
                (
                    Step::Dequantize {
                        node: id,
                        axis: usize::try_from(axis).ok()?,
                    },
                    inputs[0].clone(),
                )
            }
            "Mul" if inputs.len() == 2 => {
                // One side a stored scale, the other the weight chain.
                let stored = |i: usize| stored_tensor(graph, &inputs[i]);
                let (slot, other) = match (stored(0), stored(1)) {
                    (_, Some(s)) if is_scale(graph, &s, &inputs[0]) => (1, 0),
                    (Some(s), _) if is_scale(graph, &s, &inputs[1]) => (0, 1),
                    _ => return None,
                };
                (Step::Scale { node: id, slot }, inputs[other].clone())
            }
            _ => return None,
        };
        chain.push(step);
        value = next;
    }
    None
}

/// Whether `scale` can be a per-tensor or per-channel scale of the
/// weight chain `other` (it has fewer elements on every axis).
fn is_scale(graph: &Graph, scale: &Tensor, other: &str) -> bool {
    let dims = scale.dims();
    let weight = graph
        .producer_node(other)
        .map(|p| graph.node(p).op() == "Cast")
        .unwrap_or(false)
        || stored_tensor(graph, other).is_some();
    weight
        && dtype::is_float(scale.data_type())
        && (scale.len() == 1 || dims.iter().filter(|&&d| d > 1).count() == 1)
}

/// The nodes that read `value`'s data, through `Identity`, `Cast`,
/// `Dropout` and fake-quantisation pairs; shape reads do not count. (A
/// light form of [`View::readers`] for callers without a view.)
pub fn data_readers(graph: &Graph, value: &str) -> Vec<NodeId> {
    let mut out = Vec::new();
    let mut stack = vec![value.to_string()];
    let mut steps = 0;
    while let Some(v) = stack.pop() {
        steps += 1;
        if steps > 256 {
            break;
        }
        for reader in graph.consumers(&v) {
            let node = graph.node(reader);
            let first = node.inputs().first().is_some_and(|i| *i == v);
            match node.op() {
                "Shape" | "Size" => {}
                "Identity" | "Cast" | "Dropout" | "QuantizeLinear" | "DequantizeLinear"
                    if first && node.domain().is_empty() =>
                {
                    stack.push(node.outputs()[0].clone())
                }
                _ => out.push(reader),
            }
        }
    }
    out
}
