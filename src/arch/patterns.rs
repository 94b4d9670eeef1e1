//! Small structural matchers shared by the attention, MLP and residual
//! matchers: constants, linear layers and layer norms.
//!
//! Each matcher answers `None` for "not this pattern"; none of them relies on
//! node or value names.

use crate::ir::{Graph, NodeId, Producer};
use crate::onnx::proto::TensorProto;

/// A linear layer `y = x·W (+ b)`.
///
/// ```text
/// x ──► MatMul(x, W) ──► [Add(·, b)] ──► y      W: 2-D initializer [in, out]
/// x ──► Gemm(x, W, b; transB) ──► y             W: [out, in] when transB = 1
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Linear {
    /// The MatMul or Gemm node.
    pub matmul: NodeId,
    /// The input activation.
    pub input: String,
    /// The weight initializer.
    pub weight: String,
    /// Whether the weight is stored `[out, in]` (Gemm with transB = 1).
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

/// Where a bias vector is added.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bias {
    /// The node that adds it (Add, Gemm, SkipLayerNormalization, BiasGelu…).
    pub node: NodeId,
    /// Which input of that node it is.
    pub slot: usize,
    /// The bias initializer.
    pub name: String,
}

/// Integer values of a constant value (initializer or `Constant` node).
pub fn const_ints(graph: &Graph, value: &str) -> Option<Vec<i64>> {
    const_tensor(graph, value, |t| {
        crate::ir::Tensor::new(t.clone()).to_i64().ok()
    })
    .or_else(|| {
        constant_attr(graph, value, |node| {
            node.attr_ints("value_ints").map(|v| v.to_vec())
        })
    })
    .or_else(|| {
        constant_attr(graph, value, |node| {
            node.attr_int("value_int").map(|v| vec![v])
        })
    })
}

/// The value of a scalar (or one-element) floating constant.
pub fn const_scalar(graph: &Graph, value: &str) -> Option<f32> {
    const_tensor(graph, value, |t| {
        let values = crate::ir::Tensor::new(t.clone()).to_f32().ok()?;
        (values.len() == 1).then(|| values[0])
    })
    .or_else(|| constant_attr(graph, value, |node| node.attr_float("value_float")))
}

/// Whether `value` is a constant (initializer or `Constant` output).
pub fn is_const(graph: &Graph, value: &str) -> bool {
    match graph.producer(value) {
        Some(Producer::Initializer) => true,
        Some(Producer::Node(id, _)) => graph.node(id).op() == "Constant",
        _ => false,
    }
}

fn const_tensor<T>(
    graph: &Graph,
    value: &str,
    read: impl Fn(&TensorProto) -> Option<T>,
) -> Option<T> {
    if let Some(t) = graph.initializer(value) {
        return read(t.proto());
    }
    let id = graph.producer_node(value)?;
    let node = graph.node(id);
    if node.op() != "Constant" {
        return None;
    }
    read(node.attribute("value")?.t.as_ref()?)
}

fn constant_attr<T>(
    graph: &Graph,
    value: &str,
    read: impl Fn(&crate::ir::Node) -> Option<T>,
) -> Option<T> {
    let id = graph.producer_node(value)?;
    let node = graph.node(id);
    (node.op() == "Constant").then(|| read(node)).flatten()
}

/// The dims of a 2-D weight initializer (possibly behind a Transpose).
fn weight_dims(graph: &Graph, value: &str) -> Option<(String, [usize; 2], bool)> {
    if let Some(t) = graph.initializer(value) {
        let d = t.dims();
        return (d.len() == 2).then(|| (value.to_string(), [d[0] as usize, d[1] as usize], false));
    }
    let id = graph.producer_node(value)?;
    let node = graph.node(id);
    if node.op() == "Transpose" && node.attr_ints("perm").is_none_or(|p| p == [1, 0]) {
        let (name, [a, b], _) = weight_dims(graph, &node.inputs()[0])?;
        return Some((name, [a, b], true));
    }
    None
}

/// The linear layer whose MatMul/Gemm is `id`, if it is one.
pub fn linear_at(graph: &Graph, id: NodeId) -> Option<Linear> {
    let node = graph.node(id);
    let inputs = node.inputs();
    match node.op() {
        "MatMul" if inputs.len() == 2 && node.domain().is_empty() => {
            let (weight, [rows, cols], transposed) = weight_dims(graph, &inputs[1])?;
            let (in_features, out_features) = if transposed {
                (cols, rows)
            } else {
                (rows, cols)
            };
            let matmul_out = node.outputs()[0].clone();
            let mut linear = Linear {
                matmul: id,
                input: inputs[0].clone(),
                weight,
                transposed,
                bias: None,
                output: matmul_out.clone(),
                in_features,
                out_features,
            };
            // A bias Add directly after, reading a 1-D initializer of the output width.
            if let [add] = graph.consumers(&matmul_out).as_slice() {
                let add_node = graph.node(*add);
                if add_node.op() == "Add" && add_node.inputs().len() == 2 {
                    let other = usize::from(add_node.inputs()[0] == matmul_out);
                    let name = &add_node.inputs()[other];
                    if graph
                        .initializer(name)
                        .is_some_and(|t| t.dims() == [out_features as i64])
                    {
                        linear.bias = Some(Bias {
                            node: *add,
                            slot: other,
                            name: name.clone(),
                        });
                        linear.output = add_node.outputs()[0].clone();
                    }
                }
            }
            Some(linear)
        }
        "Gemm" if node.domain().is_empty() => {
            if node.attr_int("transA").unwrap_or(0) != 0 {
                return None;
            }
            let t = graph.initializer(inputs.get(1)?)?;
            let d = t.dims();
            if d.len() != 2 {
                return None;
            }
            let transposed = node.attr_int("transB").unwrap_or(0) != 0;
            let (in_features, out_features) = if transposed {
                (d[1] as usize, d[0] as usize)
            } else {
                (d[0] as usize, d[1] as usize)
            };
            let bias = inputs
                .get(2)
                .filter(|b| {
                    graph
                        .initializer(b)
                        .is_some_and(|t| t.dims() == [out_features as i64])
                })
                .map(|b| Bias {
                    node: id,
                    slot: 2,
                    name: b.clone(),
                });
            Some(Linear {
                matmul: id,
                input: inputs[0].clone(),
                weight: inputs[1].clone(),
                transposed,
                bias,
                output: node.outputs()[0].clone(),
                in_features,
                out_features,
            })
        }
        _ => None,
    }
}

/// The linear layer producing `value` (after its bias), if any.
pub fn linear_producing(graph: &Graph, value: &str) -> Option<Linear> {
    let id = graph.producer_node(value)?;
    let node = graph.node(id);
    let candidate = match node.op() {
        "MatMul" | "Gemm" => id,
        "Add" => node.inputs().iter().find_map(|i| {
            let p = graph.producer_node(i)?;
            (graph.node(p).op() == "MatMul").then_some(p)
        })?,
        _ => return None,
    };
    linear_at(graph, candidate).filter(|l| l.output == value)
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

/// A layer norm `y = (x - mean) / std · scale + bias`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerNorm {
    /// Form in the graph.
    pub kind: NormKind,
    /// The normalised value (for `Skip`, the fused node's first input).
    pub input: String,
    /// The normalised output.
    pub output: String,
    /// Scale (gamma) initializer.
    pub scale: String,
    /// Bias (beta) initializer.
    pub bias: Option<String>,
    /// Nodes that make up the norm.
    pub nodes: Vec<NodeId>,
}

/// The layer norm whose output is `value`, if it is one.
///
/// ```text
/// LayerNormalization(x, scale, bias)
/// SkipLayerNormalization(a, b, scale, bias, [bias2]) output 0
/// x ─► ReduceMean ─► Sub(x, ·) ─► Pow(·, 2) ─► ReduceMean ─► Add(eps) ─► Sqrt
///                     └──────────────────────► Div(sub, sqrt) ─► Mul(scale) ─► Add(bias)
/// ```
pub fn norm_producing(graph: &Graph, value: &str) -> Option<LayerNorm> {
    let id = graph.producer_node(value)?;
    let node = graph.node(id);
    let inputs = node.inputs();
    match (node.op(), node.domain()) {
        ("LayerNormalization", "" | "ai.onnx") if node.outputs()[0] == value => Some(LayerNorm {
            kind: NormKind::Op,
            input: inputs[0].clone(),
            output: value.to_string(),
            scale: inputs.get(1)?.clone(),
            bias: inputs.get(2).filter(|b| !b.is_empty()).cloned(),
            nodes: vec![id],
        }),
        ("SkipLayerNormalization", "com.microsoft") if node.outputs()[0] == value => {
            Some(LayerNorm {
                kind: NormKind::Skip,
                input: inputs[0].clone(),
                output: value.to_string(),
                scale: inputs.get(2)?.clone(),
                bias: inputs.get(3).filter(|b| !b.is_empty()).cloned(),
                nodes: vec![id],
            })
        }
        ("Add", "") => decomposed_norm(graph, id, value),
        _ => None,
    }
}

fn decomposed_norm(graph: &Graph, add: NodeId, value: &str) -> Option<LayerNorm> {
    // Add(Mul(div, scale), bias), operands in either order.
    let (mul_out, bias) = split_const(graph, add)?;
    let mul = graph
        .producer_node(&mul_out)
        .filter(|m| graph.node(*m).op() == "Mul")?;
    let (div_out, scale) = split_const(graph, mul)?;
    let div = graph
        .producer_node(&div_out)
        .filter(|d| graph.node(*d).op() == "Div")?;
    let div_inputs = graph.node(div).inputs();
    let sub = graph
        .producer_node(&div_inputs[0])
        .filter(|s| graph.node(*s).op() == "Sub")?;
    let sqrt = graph
        .producer_node(&div_inputs[1])
        .filter(|s| graph.node(*s).op() == "Sqrt")?;
    let sub_inputs = graph.node(sub).inputs();
    let mean = graph
        .producer_node(&sub_inputs[1])
        .filter(|m| graph.node(*m).op() == "ReduceMean")?;
    let x = &sub_inputs[0];
    if graph.node(mean).inputs().first() != Some(x) {
        return None;
    }
    // Sqrt(Add(ReduceMean(Pow(sub, 2)), eps)): check it reads the same Sub.
    let eps_add = graph.producer_node(&graph.node(sqrt).inputs()[0])?;
    let variance = graph.node(eps_add).inputs().iter().find_map(|i| {
        let p = graph.producer_node(i)?;
        (graph.node(p).op() == "ReduceMean").then_some(p)
    })?;
    let pow = graph
        .producer_node(&graph.node(variance).inputs()[0])
        .filter(|p| graph.node(*p).op() == "Pow")?;
    if graph.node(pow).inputs()[0] != sub_inputs[0]
        && graph.producer_node(&graph.node(pow).inputs()[0]) != Some(sub)
    {
        return None;
    }
    Some(LayerNorm {
        kind: NormKind::Decomposed,
        input: x.clone(),
        output: value.to_string(),
        scale,
        bias: Some(bias),
        nodes: vec![mean, sub, pow, variance, eps_add, sqrt, div, mul, add],
    })
}

/// For a binary node with one constant operand: (other operand, constant).
fn split_const(graph: &Graph, id: NodeId) -> Option<(String, String)> {
    let inputs = graph.node(id).inputs();
    if inputs.len() != 2 {
        return None;
    }
    match (is_const(graph, &inputs[0]), is_const(graph, &inputs[1])) {
        (false, true) => Some((inputs[0].clone(), inputs[1].clone())),
        (true, false) => Some((inputs[1].clone(), inputs[0].clone())),
        _ => None,
    }
}

/// The layer norm that reads `value` as its (only) input, if all of
/// `value`'s readers belong to one layer norm.
pub fn norm_reading(graph: &Graph, value: &str) -> Option<LayerNorm> {
    let readers = graph.consumers(value);
    // LayerNormalization: a single reader. Decomposed: ReduceMean and Sub.
    for &reader in &readers {
        let node = graph.node(reader);
        let candidate = match node.op() {
            "LayerNormalization" => node.outputs()[0].clone(),
            "Sub" => {
                // Sub ─► Div ─► Mul ─► Add
                let div = graph
                    .consumers(&node.outputs()[0])
                    .into_iter()
                    .find(|d| graph.node(*d).op() == "Div")?;
                let mul = single_consumer(graph, &graph.node(div).outputs()[0])?;
                let add = single_consumer(graph, &graph.node(mul).outputs()[0])?;
                graph.node(add).outputs()[0].clone()
            }
            _ => continue,
        };
        if let Some(norm) = norm_producing(graph, &candidate)
            && norm.input == value
            && readers.iter().all(|r| norm.nodes.contains(r))
        {
            return Some(norm);
        }
    }
    None
}

/// The only node reading `value`'s data. Nodes that read only its shape
/// (`Shape`, `Size`: exporters compute reshape targets that way) do not count.
pub fn single_consumer(graph: &Graph, value: &str) -> Option<NodeId> {
    let readers: Vec<NodeId> = graph
        .consumers(value)
        .into_iter()
        .filter(|r| !matches!(graph.node(*r).op(), "Shape" | "Size"))
        .collect();
    match readers.as_slice() {
        [one] if !graph.is_output(value) => Some(*one),
        _ => None,
    }
}

/// Number of elements of an initializer.
pub fn numel(graph: &Graph, name: &str) -> u64 {
    graph.initializer(name).map_or(0, |t| t.len() as u64)
}
