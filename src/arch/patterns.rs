//! Small structural matchers shared by the attention, MLP and residual
//! matchers: linear layers and layer norms, on the normalised view.
//!
//! Each matcher answers `None` for "not this pattern"; none of them relies on
//! node or value names.

use super::view::{Operand, View};
use crate::ir::{Graph, NodeId};

/// A linear layer `y = x·W (+ b)`.
///
/// ```text
/// x ──► MatMul(x, W) ──► [Add(·, b)] ──► y      W: [in, out], or [out, in] behind a Transpose
/// x ──► Gemm(x, W, b; transB) ──► y             W: [out, in] when transB = 1
/// W, b: stored, or behind Identity / Cast / DequantizeLinear / Cast+Mul(scale)
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Linear {
    /// The MatMul or Gemm node.
    pub matmul: NodeId,
    /// The input activation (as the node reads it).
    pub input: String,
    /// The weight, read at input 1 of `matmul`.
    pub weight: Operand,
    /// Whether the node sees the weight as `[out, in]` (Gemm with
    /// `transB = 1`, or a transpose in the chain).
    pub transposed: bool,
    /// The bias, when there is one.
    pub bias: Option<Bias>,
    /// The output (after the bias).
    pub output: String,
    /// Input width.
    pub in_features: usize,
    /// Output width.
    pub out_features: usize,
}

/// A bias vector: the operand of the node that adds it (Add, Gemm,
/// SkipLayerNormalization, BiasGelu, a fused attention operator).
pub type Bias = Operand;

impl Linear {
    /// Which axis of the weight, as the node reads it, holds the input
    /// (`false`) or output (`true`) features.
    pub fn read_axis(&self, graph: &Graph, output: bool) -> usize {
        let reads_out_in = graph.node(self.matmul).op() == "Gemm"
            && graph.node(self.matmul).attr_int("transB").unwrap_or(0) != 0;
        usize::from(output != reads_out_in)
    }

    /// The weight as an `[in, out]` matrix in f32 (dequantised), row-major.
    pub fn matrix(&self, graph: &Graph) -> Option<Vec<f32>> {
        let (values, dims) = self.weight.values(graph)?;
        let [a, b] = dims[..] else { return None };
        let gemm_trans = graph.node(self.matmul).op() == "Gemm"
            && graph.node(self.matmul).attr_int("transB").unwrap_or(0) != 0;
        if !gemm_trans {
            // The node reads [in, out] as is.
            return (a == self.in_features && b == self.out_features).then_some(values);
        }
        // Read [out, in]: transpose.
        if a != self.out_features || b != self.in_features {
            return None;
        }
        Some(
            (0..a * b)
                .map(|k| {
                    let (i, o) = (k / a, k % a);
                    values[o * b + i]
                })
                .collect(),
        )
    }
}

/// The linear layer whose MatMul/Gemm is `id`, if it is one.
pub fn linear_at(view: &View<'_>, id: NodeId) -> Option<Linear> {
    let graph = view.graph;
    let node = graph.node(id);
    let inputs = node.inputs();
    if !node.domain().is_empty() || inputs.len() < 2 || !view.is_data(&inputs[0]) {
        return None;
    }
    let weight = view.operand(id, 1)?;
    let dims = weight.read_dims(graph)?;
    let [rows, cols] = dims[..] else { return None };
    match node.op() {
        "MatMul" => {
            let matmul_out = node.outputs()[0].clone();
            let mut linear = Linear {
                matmul: id,
                input: inputs[0].clone(),
                transposed: weight.transposed(),
                weight,
                bias: None,
                output: matmul_out.clone(),
                in_features: rows,
                out_features: cols,
            };
            // A bias Add right after, adding a constant of the output width.
            if let Some((add, read)) = view.single_reader(&matmul_out) {
                let add_node = graph.node(add);
                if add_node.op() == "Add" && add_node.inputs().len() == 2 {
                    let other = usize::from(add_node.inputs()[0] == read);
                    if let Some(bias) = view.operand(add, other)
                        && bias_fits(graph, &bias, cols)
                    {
                        linear.bias = Some(bias);
                        linear.output = add_node.outputs()[0].clone();
                    }
                }
            }
            Some(linear)
        }
        "Gemm" => {
            if node.attr_int("transA").unwrap_or(0) != 0 {
                return None;
            }
            let trans_b = node.attr_int("transB").unwrap_or(0) != 0;
            // `values` gives the matrix as the node reads input 1.
            let (in_features, out_features) = if trans_b { (cols, rows) } else { (rows, cols) };
            let bias = (inputs.len() > 2 && !inputs[2].is_empty())
                .then(|| view.operand(id, 2))
                .flatten()
                .filter(|b| bias_fits(graph, b, out_features));
            Some(Linear {
                matmul: id,
                input: inputs[0].clone(),
                transposed: trans_b != weight.transposed(),
                weight,
                bias,
                output: node.outputs()[0].clone(),
                in_features,
                out_features,
            })
        }
        _ => None,
    }
}

/// Whether `bias` is a vector of `width` values (possibly with leading
/// 1-sized axes).
fn bias_fits(graph: &Graph, bias: &Operand, width: usize) -> bool {
    bias.tensor(graph).is_some_and(|t| {
        let dims = t.dims();
        dims.last() == Some(&(width as i64)) && t.len() == width
    })
}

/// The linear layer producing `value` (after its bias), seen through
/// transparent nodes.
pub fn linear_producing(view: &View<'_>, value: &str) -> Option<Linear> {
    let origin = view.origin(value);
    let id = view.graph.producer_node(&origin)?;
    let node = view.graph.node(id);
    let candidate = match node.op() {
        "MatMul" | "Gemm" => id,
        "Add" => node.inputs().iter().find_map(|i| {
            let p = view.producer(i)?;
            matches!(view.graph.node(p).op(), "MatMul").then_some(p)
        })?,
        _ => return None,
    };
    linear_at(view, candidate).filter(|l| view.origin(&l.output) == origin)
}

/// How a layer norm appears in the graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormKind {
    /// `LayerNormalization` (opset ≥ 17).
    Op,
    /// ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div/Mul/Add (opset ≤ 16).
    Decomposed,
    /// com.microsoft `SkipLayerNormalization` (residual add fused in).
    Skip,
}

/// A layer norm `y = (x - mean) / std · scale + bias`, or a root-mean-square
/// norm `y = x / rms(x) · scale` (Llama, Qwen2, Gemma, T5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerNorm {
    /// Form in the graph.
    pub kind: NormKind,
    /// Whether it is an RMS norm (no mean subtracted, no bias).
    pub rms: bool,
    /// The normalised value (for `Skip`, the fused node's first input).
    pub input: String,
    /// The normalised output.
    pub output: String,
    /// Scale (gamma).
    pub scale: Option<Operand>,
    /// Bias (beta).
    pub bias: Option<Operand>,
    /// Nodes that make up the norm.
    pub nodes: Vec<NodeId>,
}

impl LayerNorm {
    /// Parameters of the norm.
    pub fn params(&self, graph: &Graph) -> u64 {
        self.scale
            .iter()
            .chain(&self.bias)
            .map(|o| o.numel(graph))
            .sum()
    }
}

/// The layer norm whose output is `value` (seen through transparent
/// nodes), if it is one.
///
/// ```text
/// LayerNormalization(x, scale, bias)
/// SkipLayerNormalization(a, b, scale, bias, [bias2]) output 0
/// x ─► ReduceMean ─► Sub(x, ·) ─► Pow(·, 2) ─► ReduceMean ─► Add(eps) ─► Sqrt
///                     └──────────────────────► Div(sub, sqrt) ─► Mul(scale) ─► Add(bias)
/// ```
pub fn norm_producing(view: &View<'_>, value: &str) -> Option<LayerNorm> {
    let graph = view.graph;
    let origin = view.origin(value);
    let id = graph.producer_node(&origin)?;
    let node = graph.node(id);
    let inputs = node.inputs();
    let optional = |slot: usize| {
        inputs
            .get(slot)
            .filter(|b| !b.is_empty())
            .and_then(|_| view.operand(id, slot))
    };
    match (node.op(), node.domain()) {
        ("LayerNormalization", "" | "ai.onnx" | "com.microsoft") if node.outputs()[0] == origin => {
            Some(LayerNorm {
                kind: NormKind::Op,
                rms: false,
                input: inputs[0].clone(),
                output: origin.clone(),
                scale: optional(1),
                bias: optional(2),
                nodes: vec![id],
            })
        }
        // ONNX Runtime's fused RMS norm and opset 23's.
        ("SimplifiedLayerNormalization", "" | "ai.onnx" | "com.microsoft")
        | ("RMSNormalization", "" | "ai.onnx")
            if node.outputs()[0] == origin =>
        {
            Some(LayerNorm {
                kind: NormKind::Op,
                rms: true,
                input: inputs[0].clone(),
                output: origin.clone(),
                scale: optional(1),
                bias: None,
                nodes: vec![id],
            })
        }
        ("SkipLayerNormalization", "com.microsoft") if node.outputs()[0] == origin => {
            Some(LayerNorm {
                kind: NormKind::Skip,
                rms: false,
                input: inputs[0].clone(),
                output: origin.clone(),
                scale: optional(2),
                bias: optional(3),
                nodes: vec![id],
            })
        }
        ("SkipSimplifiedLayerNormalization", "com.microsoft") if node.outputs()[0] == origin => {
            Some(LayerNorm {
                kind: NormKind::Skip,
                rms: true,
                input: inputs[0].clone(),
                output: origin.clone(),
                scale: optional(2),
                bias: None,
                nodes: vec![id],
            })
        }
        ("Add", "") => decomposed_norm(view, id, &origin),
        ("Mul", "") => decomposed_rms_norm(view, id, &origin),
        _ => None,
    }
}

/// ```text
/// x ─► Pow(·, 2) | Mul(x, x) ─► ReduceMean ─► Add(eps) ─► Sqrt ─► Reciprocal | Div(1, ·) ─► Mul(x, ·) ─► Mul(scale)
///                                                         └─────────────────► Div(x, ·) ─┘
/// scale: stored, or Add(stored, 1) (Gemma's `1 + weight`)
/// ```
fn decomposed_rms_norm(view: &View<'_>, scale_mul: NodeId, value: &str) -> Option<LayerNorm> {
    let graph = view.graph;
    let inputs = graph.node(scale_mul).inputs();
    if inputs.len() != 2 {
        return None;
    }
    let data = (0..2).find(|&i| view.is_data(&inputs[i]))?;
    let other = 1 - data;
    if view.is_data(&inputs[other]) {
        return None;
    }
    let scale = view.operand(scale_mul, other).or_else(|| {
        // Gemma: the stored weight plus one, computed in the graph.
        let add = view.producer(&inputs[other])?;
        let add_node = graph.node(add);
        if add_node.op() != "Add" || add_node.inputs().len() != 2 {
            return None;
        }
        (0..2).find_map(|slot| {
            let one = view.scalar(&add_node.inputs()[1 - slot])?;
            (one == 1.0).then(|| view.operand(add, slot)).flatten()
        })
    })?;
    let normed = view.producer(&inputs[data])?;
    let normed_node = graph.node(normed);
    let [a, b] = normed_node.inputs() else {
        return None;
    };
    // Mul(x, Reciprocal(Sqrt(v))) in either order, or Div(x, Sqrt(v)).
    let (x, inverse) = match normed_node.op() {
        "Mul" => {
            // Reciprocal(s), or Div(1, s) as TorchScript writes rsqrt.
            let reciprocal = |v: &str| {
                view.producer(v).filter(|r| {
                    let n = graph.node(*r);
                    n.op() == "Reciprocal"
                        || (n.op() == "Div"
                            && n.inputs().len() == 2
                            && view.scalar(&n.inputs()[0]) == Some(1.0))
                })
            };
            match (reciprocal(a), reciprocal(b)) {
                (_, Some(r)) => (a.clone(), Some(r)),
                (Some(r), None) => (b.clone(), Some(r)),
                _ => return None,
            }
        }
        "Div" => (a.clone(), None),
        _ => return None,
    };
    let sqrt_in = match inverse {
        Some(r) => graph.node(r).inputs().last().cloned()?,
        None => b.clone(),
    };
    let sqrt = view
        .producer(&sqrt_in)
        .filter(|s| graph.node(*s).op() == "Sqrt")?;
    let eps_add = view
        .producer(&graph.node(sqrt).inputs()[0])
        .filter(|e| graph.node(*e).op() == "Add")?;
    let mean = graph.node(eps_add).inputs().iter().find_map(|i| {
        let p = view.producer(i)?;
        (graph.node(p).op() == "ReduceMean").then_some(p)
    })?;
    let square = view
        .producer(&graph.node(mean).inputs()[0])
        .filter(|p| matches!(graph.node(*p).op(), "Pow" | "Mul"))?;
    let square_node = graph.node(square);
    let squared = &square_node.inputs()[0];
    let x_origin = view.origin(&x);
    if view.origin(squared) != x_origin
        || (square_node.op() == "Mul"
            && square_node.inputs().get(1).map(|i| view.origin(i)) != Some(x_origin.clone()))
        || (square_node.op() == "Pow"
            && square_node.inputs().get(1).and_then(|e| view.scalar(e)) != Some(2.0))
    {
        return None;
    }
    let mut nodes = vec![square, mean, eps_add, sqrt];
    nodes.extend(inverse);
    nodes.extend([normed, scale_mul]);
    Some(LayerNorm {
        kind: NormKind::Decomposed,
        rms: true,
        input: x,
        output: value.to_string(),
        scale: Some(scale),
        bias: None,
        nodes,
    })
}

fn decomposed_norm(view: &View<'_>, add: NodeId, value: &str) -> Option<LayerNorm> {
    let graph = view.graph;
    // Add(Mul(div, scale), bias), operands in either order.
    let (mul_out, bias) = split_const(view, add)?;
    let mul = view
        .producer(&mul_out)
        .filter(|m| graph.node(*m).op() == "Mul")?;
    let (div_out, scale) = split_const(view, mul)?;
    let div = view
        .producer(&div_out)
        .filter(|d| graph.node(*d).op() == "Div")?;
    let div_inputs = graph.node(div).inputs();
    let sub = view
        .producer(&div_inputs[0])
        .filter(|s| graph.node(*s).op() == "Sub")?;
    let sqrt = view
        .producer(&div_inputs[1])
        .filter(|s| graph.node(*s).op() == "Sqrt")?;
    let sub_inputs = graph.node(sub).inputs();
    let mean = view
        .producer(&sub_inputs[1])
        .filter(|m| graph.node(*m).op() == "ReduceMean")?;
    let x = &sub_inputs[0];
    if view.origin(graph.node(mean).inputs().first()?) != view.origin(x) {
        return None;
    }
    // Sqrt(Add(ReduceMean(Pow(sub, 2)), eps)): check it reads the same Sub.
    let eps_add = view.producer(&graph.node(sqrt).inputs()[0])?;
    let variance = graph.node(eps_add).inputs().iter().find_map(|i| {
        let p = view.producer(i)?;
        (graph.node(p).op() == "ReduceMean").then_some(p)
    })?;
    let pow = view
        .producer(&graph.node(variance).inputs()[0])
        .filter(|p| matches!(graph.node(*p).op(), "Pow" | "Mul"))?;
    if view.producer(&graph.node(pow).inputs()[0]) != Some(sub) {
        return None;
    }
    Some(LayerNorm {
        kind: NormKind::Decomposed,
        rms: false,
        input: x.clone(),
        output: value.to_string(),
        scale: Some(scale),
        bias: Some(bias),
        nodes: vec![mean, sub, pow, variance, eps_add, sqrt, div, mul, add],
    })
}

/// For a binary node with one constant operand: (other operand, the
/// constant as an operand).
fn split_const(view: &View<'_>, id: NodeId) -> Option<(String, Operand)> {
    let inputs = view.graph.node(id).inputs();
    if inputs.len() != 2 {
        return None;
    }
    match (view.operand(id, 0), view.operand(id, 1)) {
        (None, Some(c)) if view.is_data(&inputs[0]) => Some((inputs[0].clone(), c)),
        (Some(c), None) if view.is_data(&inputs[1]) => Some((inputs[1].clone(), c)),
        _ => None,
    }
}

/// The layer norm that reads `value` as its (only) input, if all of
/// `value`'s data readers belong to one layer norm.
pub fn norm_reading(view: &View<'_>, value: &str) -> Option<LayerNorm> {
    let graph = view.graph;
    let readers = view.readers(value);
    // LayerNormalization: a single reader. Decomposed: ReduceMean and Sub.
    for &(reader, _) in &readers {
        let node = graph.node(reader);
        let candidate = match node.op() {
            "LayerNormalization" | "SimplifiedLayerNormalization" | "RMSNormalization" => {
                node.outputs()[0].clone()
            }
            // RMS: Mul(x, Reciprocal(…)) ─► Mul(scale), or Div(x, Sqrt(…)) ─► Mul(scale)
            "Mul" | "Div" => match view.single_reader(&node.outputs()[0]) {
                Some((scale, _)) if graph.node(scale).op() == "Mul" => {
                    graph.node(scale).outputs()[0].clone()
                }
                _ => continue,
            },
            "Sub" => {
                // Sub ─► Div ─► Mul ─► Add
                let div = view
                    .readers(&node.outputs()[0])
                    .into_iter()
                    .find(|(d, _)| graph.node(*d).op() == "Div")?
                    .0;
                let mul = view.single_reader(&graph.node(div).outputs()[0])?.0;
                let add = view.single_reader(&graph.node(mul).outputs()[0])?.0;
                graph.node(add).outputs()[0].clone()
            }
            _ => continue,
        };
        if let Some(norm) = norm_producing(view, &candidate)
            && view.origin(&norm.input) == view.origin(value)
            && readers.iter().all(|(r, _)| norm.nodes.contains(r))
        {
            return Some(norm);
        }
    }
    None
}
