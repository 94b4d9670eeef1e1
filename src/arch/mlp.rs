//! MLP sub-blocks: a linear layer, an element-wise activation, a linear
//! layer back to the input width.
//!
//! ```text
//! x ─► Linear fc1 [d → m] ─► activation ─► Linear fc2 [m → d]
//! activation: QuickGELU  Mul(1.702) ─► Sigmoid ─► Mul
//!             GELU (erf) Div(√2) ─► Erf ─► Add(1) ─► Mul(0.5) ─► Mul
//!             GELU (tanh) Mul ─► Mul ─► Mul(0.0447) ─► Add ─► Mul(0.798) ─► Tanh ─► Add(1) ─► Mul ─► Mul(0.5)
//!             SiLU  Sigmoid ─► Mul;  ReLU;  Gelu (opset 20);  QuickGelu, FastGelu, BiasGelu (bias folded in)
//! ```
//! Gated MLPs (SwiGLU, GeGLU: Llama, Qwen2, Gemma) multiply the activated
//! gate projection (fc1) by a second projection of the same input (`up`)
//! before fc2:
//!
//! ```text
//! x ─► Linear gate [d → m] ─► activation ─► Mul ─► Linear down [m → d]
//! x ─► Linear up   [d → m] ───────────────────┘
//! ```
//! A neuron is then a gate column, an up column and a down row. Besides
//! that one `up` value, every operand inside the activation is the fc1
//! output, a value computed from it, or a constant.

use std::collections::{HashMap, HashSet};

use super::Miss;
use super::patterns::{Bias, Linear, linear_at, linear_producing};
use super::view::View;
use crate::ir::NodeId;

/// A recognised MLP sub-block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mlp {
    /// The widening projection.
    pub fc1: Linear,
    /// The narrowing projection.
    pub fc2: Linear,
    /// The up projection of a gated MLP, multiplied with the activated
    /// fc1 (the gate).
    pub up: Option<Linear>,
    /// The activation's nodes, in graph order.
    pub activation: Vec<NodeId>,
}

impl Mlp {
    /// Hidden width of the MLP (number of neurons).
    pub fn width(&self) -> usize {
        self.fc1.out_features
    }

    /// The parameter operands (weights and biases).
    pub fn parameters(&self) -> Vec<Bias> {
        let mut out = vec![self.fc1.weight.clone()];
        out.extend(self.fc1.bias.clone());
        if let Some(up) = &self.up {
            out.push(up.weight.clone());
            out.extend(up.bias.clone());
        }
        out.push(self.fc2.weight.clone());
        out.extend(self.fc2.bias.clone());
        out
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
    "Gelu",
    "QuickGelu",
    "FastGelu",
    "BiasGelu",
    "Softplus",
    "HardSigmoid",
    "HardSwish",
    "LeakyRelu",
];

/// Matches an MLP starting at `fc1`.
pub fn match_mlp(
    view: &View<'_>,
    fc1: &Linear,
    order: &HashMap<NodeId, usize>,
) -> Result<Mlp, Miss> {
    let graph = view.graph;
    let mut region: Vec<NodeId> = Vec::new();
    let mut seen: HashSet<NodeId> = HashSet::new();
    let mut values = vec![fc1.output.clone()];
    let mut inside: HashSet<String> = HashSet::from([view.origin(&fc1.output)]);
    let mut fc2: Option<Linear> = None;
    let mut up: Option<Linear> = None;
    while let Some(value) = values.pop() {
        for (reader, read) in view.readers(&value) {
            if !seen.insert(reader) {
                continue;
            }
            let n = graph.node(reader);
            if matches!(n.op(), "MatMul" | "Gemm") && n.domain().is_empty() {
                let Some(linear) = linear_at(view, reader) else {
                    return Err(Miss::new(
                        view,
                        reader,
                        "the second linear layer (a constant weight)",
                    ));
                };
                if linear.input != read {
                    return Err(Miss::new(view, reader, "the activation as the data input"));
                }
                if fc2.replace(linear).is_some() {
                    return Err(Miss::new(view, reader, "one second linear layer"));
                }
                continue;
            }
            if !ACTIVATION_OPS.contains(&n.op()) || n.outputs().len() != 1 {
                return Err(Miss::new(
                    view,
                    reader,
                    "an element-wise activation or the second linear layer after fc1",
                ));
            }
            // The gate's product with the up projection of the same input.
            if n.op() == "Mul" && n.inputs().len() == 2 {
                let other = &n.inputs()[usize::from(n.inputs()[0] == read)];
                if !inside.contains(&view.origin(other))
                    && let Some(linear) = linear_producing(view, other)
                    && linear.matmul != fc1.matmul
                    && view.origin(&linear.input) == view.origin(&fc1.input)
                    && linear.out_features == fc1.out_features
                    && linear.in_features == fc1.in_features
                {
                    if up.as_ref().is_some_and(|u| u.matmul != linear.matmul) {
                        return Err(Miss::new(view, reader, "one up projection"));
                    }
                    inside.insert(view.origin(&linear.output));
                    up = Some(linear);
                }
            }
            region.push(reader);
            inside.insert(n.outputs()[0].clone());
            values.push(n.outputs()[0].clone());
        }
    }
    let fc2 = fc2.ok_or_else(|| {
        Miss::new(
            view,
            fc1.matmul,
            "a second linear layer after the activation",
        )
    })?;
    if region.is_empty() {
        return Err(Miss::new(
            view,
            fc2.matmul,
            "an activation between the two linear layers",
        ));
    }
    if fc2.in_features != fc1.out_features || fc2.out_features != fc1.in_features {
        return Err(Miss::new(
            view,
            fc2.matmul,
            &format!(
                "a second linear layer from {} back to {} features (found {} → {})",
                fc1.out_features, fc1.in_features, fc2.in_features, fc2.out_features
            ),
        ));
    }
    // Every operand of the activation is the fc1 output, an activation
    // value or a constant (besides a fused bias).
    let mut fc1 = fc1.clone();
    for id in &region {
        let n = graph.node(*id);
        for (slot, input) in n.inputs().iter().enumerate() {
            if input.is_empty() || inside.contains(&view.origin(input)) {
                continue;
            }
            if !view.is_const(input) {
                return Err(Miss::new(
                    view,
                    *id,
                    "an activation reading only fc1's output and constants",
                ));
            }
            let is_bias = matches!(n.op(), "BiasGelu" | "FastGelu") && slot == 1;
            if is_bias && fc1.bias.is_none() {
                fc1.bias = view.operand(*id, slot);
            }
        }
    }
    region.sort_by_key(|id| order.get(id).copied());
    Ok(Mlp {
        fc1,
        fc2,
        up,
        activation: region,
    })
}
