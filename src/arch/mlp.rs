//! MLP sub-blocks: a linear layer, an element-wise activation, a linear
//! layer back to the input width.
//!
//! ```text
//! x ─► Linear fc1 [d → m] ─► activation ─► Linear fc2 [m → d]
//! activation: QuickGELU  Mul(1.702) ─► Sigmoid ─► Mul
//!             GELU (erf) Div(√2) ─► Erf ─► Add(1) ─► Mul(0.5) ─► Mul
//!             GELU (tanh), Gelu, QuickGelu, FastGelu, BiasGelu (bias folded in), Relu
//! ```

use std::collections::{HashMap, HashSet};

use super::patterns::{Bias, Linear, is_const, linear_at};
use crate::ir::{Graph, NodeId};

/// A recognised MLP sub-block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mlp {
    /// The widening projection.
    pub fc1: Linear,
    /// The narrowing projection.
    pub fc2: Linear,
    /// The activation's nodes, in graph order.
    pub activation: Vec<NodeId>,
}

impl Mlp {
    /// Hidden width of the MLP (number of neurons).
    pub fn width(&self) -> usize {
        self.fc1.out_features
    }

    /// The parameter tensors (weights and biases).
    pub fn parameters(&self) -> Vec<String> {
        let mut names = vec![self.fc1.weight.clone()];
        names.extend(self.fc1.bias.as_ref().map(|b| b.name.clone()));
        names.push(self.fc2.weight.clone());
        names.extend(self.fc2.bias.as_ref().map(|b| b.name.clone()));
        names
    }
}

const ACTIVATION_OPS: &[&str] = &[
    "Mul",
    "Sigmoid",
    "Add",
    "Div",
    "Erf",
    "Tanh",
    "Pow",
    "Sqrt",
    "Relu",
    "Cast",
    "Gelu",
    "QuickGelu",
    "FastGelu",
    "BiasGelu",
];

/// Matches an MLP starting at `fc1`. `None`: the linear layer does not open
/// an MLP.
pub fn match_mlp(graph: &Graph, fc1: &Linear, order: &HashMap<NodeId, usize>) -> Option<Mlp> {
    let mut region: Vec<NodeId> = Vec::new();
    let mut seen: HashSet<NodeId> = HashSet::new();
    let mut values = vec![fc1.output.clone()];
    let mut inside: HashSet<String> = HashSet::from([fc1.output.clone()]);
    let mut fc2 = None;
    while let Some(value) = values.pop() {
        for reader in graph.consumers(&value) {
            if !seen.insert(reader) {
                continue;
            }
            let n = graph.node(reader);
            if matches!(n.op(), "MatMul" | "Gemm") {
                let linear = linear_at(graph, reader)?;
                if linear.input != value || fc2.replace(linear).is_some() {
                    return None;
                }
                continue;
            }
            if !ACTIVATION_OPS.contains(&n.op()) || n.outputs().len() != 1 {
                return None;
            }
            region.push(reader);
            inside.insert(n.outputs()[0].clone());
            values.push(n.outputs()[0].clone());
        }
    }
    let fc2 = fc2?;
    if region.is_empty()
        || fc2.in_features != fc1.out_features
        || fc2.out_features != fc1.in_features
    {
        return None;
    }
    // Every operand of the activation is the fc1 output, an activation
    // value or a constant (besides a fused bias).
    let mut fc1 = fc1.clone();
    for id in &region {
        let n = graph.node(*id);
        for (slot, input) in n.inputs().iter().enumerate() {
            if input.is_empty() || inside.contains(input) {
                continue;
            }
            if !is_const(graph, input) {
                return None;
            }
            let is_bias = matches!(n.op(), "BiasGelu" | "FastGelu") && slot == 1;
            if is_bias && fc1.bias.is_none() {
                fc1.bias = Some(Bias {
                    node: *id,
                    slot,
                    name: input.clone(),
                });
            }
        }
    }
    region.sort_by_key(|id| order.get(id).copied());
    Some(Mlp {
        fc1,
        fc2,
        activation: region,
    })
}
