//! Partial shape and value inference: what discovery needs to know about
//! tensor sizes without running the model.
//!
//! Exporters compute reshape targets in the graph (`Concat(Shape(x)[0],
//! Shape(x)[1], -1, 8)`), bake head counts into arithmetic (`Div(E, 4)`,
//! `Mul(N, 4)`), and compute attention scales from shapes
//! (`1/√(Shape(q)[-1])`). Matching such graphs needs the values of these
//! small integer tensors and the sizes of activations, symbolically: a
//! batch or sequence size is unknown, but the same unknown on both sides of
//! a reshape.
//!
//! Every dimension and small integer is an [`Expr`]: a known factor times a
//! product of unknowns (`4·N`, `N·L`, `32`). Graph inputs contribute their
//! declared sizes (named symbolic dimensions become one unknown each);
//! every other unknown is fresh. Inference runs once over the graph in
//! topological order and only ever under-approximates: an operator it does
//! not know, or arithmetic it cannot express, gives unknowns, never a wrong
//! number.

use std::collections::HashMap;

use crate::ir::{Dim, Graph, NodeId, Producer, Tensor};
use crate::onnx::dtype;

/// A size or small integer: `factor` times the product of `symbols`
/// (unknowns, sorted, with repetition). No symbols: a known number.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Expr {
    /// The known factor.
    pub factor: i64,
    /// The unknowns multiplied in.
    pub symbols: Vec<u32>,
}

impl Expr {
    /// A known number.
    pub fn known(value: i64) -> Self {
        Self {
            factor: value,
            symbols: Vec::new(),
        }
    }

    /// The number, when it is known.
    pub fn value(&self) -> Option<i64> {
        self.symbols.is_empty().then_some(self.factor)
    }

    fn mul(&self, other: &Expr) -> Expr {
        let mut symbols = self.symbols.clone();
        symbols.extend(&other.symbols);
        symbols.sort_unstable();
        Expr {
            factor: self.factor.saturating_mul(other.factor),
            symbols,
        }
    }

    /// Exact division, when it is one.
    fn div(&self, other: &Expr) -> Option<Expr> {
        if other.factor == 0 || self.factor % other.factor != 0 {
            return None;
        }
        let mut symbols = self.symbols.clone();
        for s in &other.symbols {
            let at = symbols.iter().position(|x| x == s)?;
            symbols.remove(at);
        }
        Some(Expr {
            factor: self.factor / other.factor,
            symbols,
        })
    }

    fn add(&self, other: &Expr, sign: i64) -> Option<Expr> {
        if self.symbols == other.symbols {
            return Some(Expr {
                factor: self.factor.checked_add(sign.checked_mul(other.factor)?)?,
                symbols: self.symbols.clone(),
            });
        }
        None
    }
}

/// What is known of one value.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Info {
    /// The shape, when the rank is known.
    pub shape: Option<Vec<Expr>>,
    /// The elements of a small integer tensor (at most [`MAX_INTS`]), in
    /// row-major order.
    pub ints: Option<Vec<Expr>>,
    /// The value of a floating-point scalar.
    pub float: Option<f64>,
}

/// Largest integer tensor whose elements are tracked.
pub const MAX_INTS: usize = 64;

/// The inference result for a whole graph.
#[derive(Debug, Clone, Default)]
pub struct Shapes {
    info: HashMap<String, Info>,
    /// Values that carry data from a graph input (not only its shape).
    data: std::collections::HashSet<String>,
    /// Operators whose known sizes do not fit together (a MatMul's inner
    /// sizes, a Reshape's element count, a broadcast): each a model ONNX
    /// Runtime would refuse.
    conflicts: Vec<String>,
}

/// State of one inference run.
struct Run<'g> {
    graph: &'g Graph,
    shapes: Shapes,
    next_symbol: u32,
    named: HashMap<String, u32>,
}

impl Shapes {
    /// Infers what can be inferred of every value of `graph`.
    pub fn infer(graph: &Graph) -> Shapes {
        let mut run = Run {
            graph,
            shapes: Shapes::default(),
            next_symbol: 0,
            named: HashMap::new(),
        };
        run.sources();
        for id in graph.nodes() {
            run.node(id);
        }
        run.shapes
    }

    /// What is known of `value`.
    pub fn info(&self, value: &str) -> Option<&Info> {
        self.info.get(value)
    }

    /// The shape of `value`, when its rank is known.
    pub fn shape(&self, value: &str) -> Option<&[Expr]> {
        self.info.get(value)?.shape.as_deref()
    }

    /// The elements of a small integer tensor.
    pub fn ints(&self, value: &str) -> Option<&[Expr]> {
        self.info.get(value)?.ints.as_deref()
    }

    /// The value of a floating-point scalar (a constant, or one computed
    /// from constants and known sizes).
    pub fn float(&self, value: &str) -> Option<f64> {
        self.info.get(value)?.float
    }

    /// The last dimension of `value`, when known.
    pub fn last_dim(&self, value: &str) -> Option<i64> {
        self.shape(value)?.last()?.value()
    }

    /// Whether `value` carries data from a graph input (rather than being a
    /// constant, or computed only from constants and tensor sizes).
    pub fn is_data(&self, value: &str) -> bool {
        self.data.contains(value)
    }

    /// Operators whose known sizes contradict each other.
    pub fn conflicts(&self) -> &[String] {
        &self.conflicts
    }
}

impl Run<'_> {
    fn fresh(&mut self) -> Expr {
        self.next_symbol += 1;
        Expr {
            factor: 1,
            symbols: vec![self.next_symbol],
        }
    }

    /// The length of the 1-D shape tensor `value` (the rank of the shape
    /// it gives Reshape or Expand), when its one dimension is known and a
    /// rank a model can have: a claimed length that is negative or beyond
    /// [`MAX_INTS`] says nothing (and would allocate that many symbols).
    fn claimed_rank(&self, value: &str) -> Option<usize> {
        self.shape_of(value)
            .and_then(|s| s.first().and_then(Expr::value))
            .and_then(|r| usize::try_from(r).ok())
            .filter(|&r| r <= MAX_INTS)
    }

    fn fresh_shape(&mut self, rank: usize) -> Vec<Expr> {
        (0..rank).map(|_| self.fresh()).collect()
    }

    fn set(&mut self, value: &str, info: Info) {
        if !value.is_empty() {
            self.shapes.info.insert(value.to_string(), info);
        }
    }

    fn get(&self, value: &str) -> Info {
        self.shapes.info.get(value).cloned().unwrap_or_default()
    }

    fn shape_of(&self, value: &str) -> Option<Vec<Expr>> {
        self.shapes.info.get(value)?.shape.clone()
    }

    fn ints_of(&self, value: &str) -> Option<Vec<Expr>> {
        self.shapes.info.get(value)?.ints.clone()
    }

    fn known_ints(&self, value: &str) -> Option<Vec<i64>> {
        self.ints_of(value)?.iter().map(Expr::value).collect()
    }

    fn float_of(&self, value: &str) -> Option<f64> {
        let info = self.shapes.info.get(value)?;
        info.float.or_else(|| match info.ints.as_deref() {
            Some([one]) => one.value().map(|v| v as f64),
            _ => None,
        })
    }

    /// Graph inputs and initializers.
    fn sources(&mut self) {
        let graph = self.graph;
        for (name, tensor) in graph.initializers() {
            let info = tensor_info(tensor);
            self.set(name, info);
        }
        for input in &graph.inputs {
            let name = input.name();
            if !matches!(graph.producer(name), Some(Producer::Input)) {
                continue;
            }
            let shape = graph.value_type(name).and_then(|t| t.shape).map(|dims| {
                dims.iter()
                    .map(|d| match d {
                        Dim::Fixed(v) => Expr::known(*v),
                        Dim::Symbolic(s) => {
                            let next = self.next_symbol + 1;
                            let id = *self.named.entry(s.clone()).or_insert(next);
                            self.next_symbol = self.next_symbol.max(id);
                            Expr {
                                factor: 1,
                                symbols: vec![id],
                            }
                        }
                        Dim::Unknown => self.fresh(),
                    })
                    .collect()
            });
            self.set(
                name,
                Info {
                    shape,
                    ..Default::default()
                },
            );
            self.shapes.data.insert(name.to_string());
        }
    }

    fn node(&mut self, id: NodeId) {
        let node = self.graph.node(id);
        let op = node.op().to_string();
        let inputs: Vec<String> = node.inputs().to_vec();
        let outputs: Vec<String> = node.outputs().to_vec();
        // Data flows through every operator but the ones that read only
        // shapes, and the ones that make constants from sizes.
        let reads_data = !matches!(op.as_str(), "Shape" | "Size" | "ConstantOfShape")
            && inputs
                .iter()
                .chain(&node.implicit_inputs)
                .any(|i| self.shapes.data.contains(i));
        if reads_data {
            for o in outputs.iter().filter(|o| !o.is_empty()) {
                self.shapes.data.insert(o.clone());
            }
        }
        self.check(id, &op, &inputs);
        let infos = self.infer(id, &op, &inputs, outputs.len());
        for (o, info) in outputs.iter().zip(infos) {
            self.set(o, info);
        }
    }

    /// Records sizes of `id`'s inputs that cannot fit together.
    fn check(&mut self, id: NodeId, op: &str, inputs: &[String]) {
        let node = self.graph.node(id);
        if !node.domain().is_empty() {
            return;
        }
        let shape = |i: usize| inputs.get(i).and_then(|v| self.shape_of(v));
        let problem = match op {
            "MatMul" => match (shape(0), shape(1)) {
                (Some(a), Some(b)) if a.len() >= 2 && !b.is_empty() => {
                    let k = &a[a.len() - 1];
                    let kb = &b[if b.len() >= 2 { b.len() - 2 } else { 0 }];
                    match (k.value(), kb.value()) {
                        (Some(x), Some(y)) if x != y => {
                            Some(format!("multiplies {x} columns with {y} rows"))
                        }
                        _ => None,
                    }
                }
                _ => None,
            },
            "Reshape" => {
                let input = shape(0);
                let target = inputs.get(1).and_then(|v| self.known_ints(v));
                match (input, target) {
                    (Some(input), Some(target)) if !target.contains(&-1) => {
                        let allow_zero = node.attr_int("allowzero").unwrap_or(0) != 0;
                        let resolved: Option<Vec<i64>> = target
                            .iter()
                            .enumerate()
                            .map(|(i, &t)| match t {
                                0 if !allow_zero => input.get(i).and_then(Expr::value),
                                t => Some(t),
                            })
                            .collect();
                        // Claimed sizes can be anything: a product that
                        // overflows is no evidence either way.
                        let total = checked_product(input.iter().map(Expr::value));
                        let count = resolved
                            .as_ref()
                            .and_then(|r| checked_product(r.iter().map(|&d| Some(d))));
                        match (resolved, total, count) {
                            (Some(r), Some(total), Some(count)) if count != total => {
                                Some(format!("reshapes {total} elements into {r:?}"))
                            }
                            _ => None,
                        }
                    }
                    _ => None,
                }
            }
            "Add" | "Sub" | "Mul" | "Div" => match (shape(0), shape(1)) {
                (Some(a), Some(b)) => {
                    let n = a.len().min(b.len());
                    (1..=n).find_map(|k| {
                        let (x, y) = (a[a.len() - k].value()?, b[b.len() - k].value()?);
                        (x != y && x != 1 && y != 1)
                            .then(|| format!("broadcasts sizes {x} and {y}"))
                    })
                }
                _ => None,
            },
            _ => None,
        };
        if let Some(p) = problem {
            self.shapes
                .conflicts
                .push(format!("node {} {p}", node.label()));
        }
    }

    fn input(&self, inputs: &[String], i: usize) -> Info {
        inputs.get(i).map(|v| self.get(v)).unwrap_or_default()
    }

    /// The outputs' infos of node `id`.
    fn infer(&mut self, id: NodeId, op: &str, inputs: &[String], outputs: usize) -> Vec<Info> {
        let node = self.graph.node(id);
        let domain = node.domain().to_string();
        let attr_int = |name: &str| node.attr_int(name);
        let attr_ints = |name: &str| node.attr_ints(name).map(|v| v.to_vec());
        let first = self.input(inputs, 0);
        let same_shape = |info: &Info| Info {
            shape: info.shape.clone(),
            ..Default::default()
        };
        let one = |info: Info| vec![info];
        match (domain.as_str(), op) {
            ("", "Constant") => one(constant_info(node)),
            ("", "Identity" | "Dropout") => {
                let mut out = vec![first.clone()];
                // Dropout's mask output.
                out.extend((1..outputs).map(|_| same_shape(&first)));
                out
            }
            ("", "Cast") => {
                let to = attr_int("to").unwrap_or(0) as i32;
                let mut info = first.clone();
                if matches!(to, 1 | 10 | 11 | 16) {
                    info.float = self.float_of(arg(inputs, 0));
                    info.ints = None;
                } else if first.ints.is_none() {
                    info.ints = first
                        .float
                        .filter(|f| f.fract() == 0.0)
                        .map(|f| vec![Expr::known(f as i64)]);
                    info.float = None;
                }
                one(info)
            }
            ("", "Sqrt" | "Neg" | "Reciprocal" | "Exp" | "Abs" | "Floor" | "Ceil") => {
                let f = self.float_of(arg(inputs, 0)).map(|x| match op {
                    "Sqrt" => x.sqrt(),
                    "Neg" => -x,
                    "Reciprocal" => 1.0 / x,
                    "Exp" => x.exp(),
                    "Abs" => x.abs(),
                    "Floor" => x.floor(),
                    _ => x.ceil(),
                });
                let ints = match op {
                    "Neg" => first.ints.as_ref().map(|v| {
                        v.iter()
                            .map(|e| Expr {
                                factor: -e.factor,
                                symbols: e.symbols.clone(),
                            })
                            .collect()
                    }),
                    "Abs" | "Floor" | "Ceil" => first.ints.clone(),
                    _ => None,
                };
                one(Info {
                    shape: first.shape.clone(),
                    ints,
                    float: if first.ints.is_some() && op != "Sqrt" && op != "Reciprocal" {
                        None
                    } else {
                        f
                    },
                })
            }
            (
                "",
                "Relu"
                | "Sigmoid"
                | "Tanh"
                | "Erf"
                | "Log"
                | "Softmax"
                | "LogSoftmax"
                | "Gelu"
                | "IsNaN"
                | "IsInf"
                | "Not"
                | "Sign"
                | "Round"
                | "HardSigmoid"
                | "HardSwish"
                | "Softplus"
                | "Mish"
                | "Elu"
                | "LeakyRelu"
                | "Selu"
                | "CumSum"
                | "Trilu"
                | "LayerNormalization"
                | "RMSNormalization"
                | "DequantizeLinear"
                | "QuantizeLinear"
                | "DynamicQuantizeLinear"
                | "InstanceNormalization"
                | "BatchNormalization"
                | "Clip"
                | "ScatterND"
                | "ScatterElements"
                | "GroupNormalization"
                | "Sin"
                | "Cos"
                | "Celu"
                | "ThresholdedRelu",
            ) => {
                let mut out = vec![same_shape(&first)];
                out.extend((1..outputs).map(|_| Info::default()));
                out
            }
            (
                "com.microsoft",
                "QuickGelu"
                | "FastGelu"
                | "BiasGelu"
                | "Gelu"
                | "SkipLayerNormalization"
                | "SimplifiedLayerNormalization"
                | "SkipSimplifiedLayerNormalization"
                | "LayerNormalization",
            ) => (0..outputs)
                .map(|i| {
                    if i == 0 || i == 3 {
                        same_shape(&first)
                    } else {
                        Info::default()
                    }
                })
                .collect(),
            ("", "SimplifiedLayerNormalization") => one(same_shape(&first)),
            (
                "",
                "Add" | "Sub" | "Mul" | "Div" | "Pow" | "Equal" | "Less" | "Greater"
                | "LessOrEqual" | "GreaterOrEqual" | "And" | "Or" | "Xor" | "Max" | "Min" | "Mod"
                | "PRelu" | "BitShift",
            ) => one(self.binary(op, inputs)),
            ("", "Where") => {
                let (c, a, b) = (
                    self.input(inputs, 0),
                    self.input(inputs, 1),
                    self.input(inputs, 2),
                );
                let shape = broadcast(&[c.shape.clone(), a.shape.clone(), b.shape.clone()]);
                let ints = match (&c.ints, &a.ints, &b.ints) {
                    (Some(c), Some(a), Some(b)) => elementwise3(c, a, b, |c, a, b| {
                        c.value()
                            .map(|c| if c != 0 { a.clone() } else { b.clone() })
                    }),
                    _ => None,
                };
                let float = match c.ints.as_deref() {
                    Some([c]) => match c.value() {
                        Some(0) => self.float_of(arg(inputs, 2)),
                        Some(_) => self.float_of(arg(inputs, 1)),
                        None => None,
                    },
                    _ => None,
                };
                one(Info { shape, ints, float })
            }
            ("", "MatMul" | "MatMulInteger") => {
                let b = self.input(inputs, 1);
                one(Info {
                    shape: matmul_shape(first.shape.as_deref(), b.shape.as_deref()),
                    ..Default::default()
                })
            }
            ("", "Gemm") => {
                let b = self.input(inputs, 1);
                let shape = match (&first.shape, &b.shape) {
                    (Some(a), Some(b)) if a.len() == 2 && b.len() == 2 => {
                        let m = if attr_int("transA").unwrap_or(0) != 0 {
                            &a[1]
                        } else {
                            &a[0]
                        };
                        let n = if attr_int("transB").unwrap_or(0) != 0 {
                            &b[0]
                        } else {
                            &b[1]
                        };
                        Some(vec![m.clone(), n.clone()])
                    }
                    _ => None,
                };
                one(Info {
                    shape,
                    ..Default::default()
                })
            }
            ("", "Transpose") => {
                let shape = first.shape.as_ref().map(|s| {
                    let perm = attr_ints("perm")
                        .unwrap_or_else(|| (0..s.len() as i64).rev().collect::<Vec<_>>());
                    perm.iter()
                        .map(|&p| s.get(p as usize).cloned())
                        .collect::<Option<Vec<_>>>()
                });
                let shape = match shape.flatten() {
                    Some(s) => Some(s),
                    None => first.shape.as_ref().map(|s| self.fresh_shape(s.len())),
                };
                one(Info {
                    shape,
                    ints: first.ints.clone(),
                    ..Default::default()
                })
            }
            ("", "Reshape") => {
                let allow_zero = attr_int("allowzero").unwrap_or(0) != 0;
                let target = self.ints_of(arg(inputs, 1));
                let target_len = self.claimed_rank(arg(inputs, 1));
                let shape = match target {
                    Some(t) => Some(self.reshape(first.shape.as_deref(), &t, allow_zero)),
                    None => target_len.map(|r| self.fresh_shape(r)),
                };
                one(Info {
                    shape,
                    ints: first.ints.clone(),
                    ..Default::default()
                })
            }
            ("", "Shape") => {
                let ints = first.shape.as_ref().map(|s| {
                    let rank = s.len() as i64;
                    let clamp = |v: i64| if v < 0 { v + rank } else { v }.clamp(0, rank) as usize;
                    let start = clamp(attr_int("start").unwrap_or(0));
                    let end = clamp(attr_int("end").unwrap_or(rank));
                    s.get(start..end.max(start)).unwrap_or_default().to_vec()
                });
                let len = ints.as_ref().map(|v| v.len() as i64);
                one(Info {
                    shape: Some(vec![match len {
                        Some(l) => Expr::known(l),
                        None => self.fresh(),
                    }]),
                    ints,
                    ..Default::default()
                })
            }
            ("", "Size") => {
                let ints = first
                    .shape
                    .as_ref()
                    .map(|s| vec![s.iter().fold(Expr::known(1), |a, d| a.mul(d))]);
                one(Info {
                    shape: Some(Vec::new()),
                    ints,
                    ..Default::default()
                })
            }
            ("", "Gather") => {
                let indices = self.input(inputs, 1);
                let axis = attr_int("axis").unwrap_or(0);
                let shape = match (&first.shape, &indices.shape) {
                    (Some(d), Some(i)) => {
                        let a = normalize_axis(axis, d.len());
                        a.map(|a| {
                            let mut s = d[..a].to_vec();
                            s.extend(i.iter().cloned());
                            s.extend(d[a + 1..].iter().cloned());
                            s
                        })
                    }
                    _ => None,
                };
                let ints = match (&first.ints, &indices.ints, &first.shape) {
                    (Some(data), Some(idx), Some(ds)) if ds.len() == 1 => idx
                        .iter()
                        .map(|i| {
                            let i = i.value()?;
                            let n = data.len() as i64;
                            let i = if i < 0 { i + n } else { i };
                            data.get(usize::try_from(i).ok()?).cloned()
                        })
                        .collect(),
                    _ => None,
                };
                one(Info {
                    shape,
                    ints,
                    ..Default::default()
                })
            }
            ("", "Unsqueeze" | "Squeeze") => {
                let axes = attr_ints("axes").or_else(|| {
                    inputs
                        .get(1)
                        .filter(|v| !v.is_empty())
                        .and_then(|v| self.known_ints(v))
                });
                let shape = first.shape.as_ref().and_then(|s| {
                    if op == "Unsqueeze" {
                        let axes = axes.clone()?;
                        let rank = s.len() + axes.len();
                        let mut axes: Vec<usize> = axes
                            .iter()
                            .map(|&a| normalize_axis(a, rank))
                            .collect::<Option<_>>()?;
                        axes.sort_unstable();
                        let mut out = s.clone();
                        for a in axes {
                            if a > out.len() {
                                return None;
                            }
                            out.insert(a, Expr::known(1));
                        }
                        Some(out)
                    } else {
                        match &axes {
                            Some(axes) => {
                                let axes: Vec<usize> = axes
                                    .iter()
                                    .map(|&a| normalize_axis(a, s.len()))
                                    .collect::<Option<_>>()?;
                                Some(
                                    s.iter()
                                        .enumerate()
                                        .filter(|(i, _)| !axes.contains(i))
                                        .map(|(_, d)| d.clone())
                                        .collect(),
                                )
                            }
                            None => {
                                Some(s.iter().filter(|d| d.value() != Some(1)).cloned().collect())
                            }
                        }
                    }
                });
                one(Info {
                    shape,
                    ints: first.ints.clone(),
                    float: first.float,
                })
            }
            ("", "Concat") => {
                let axis = attr_int("axis").unwrap_or(0);
                let parts: Vec<Info> = inputs
                    .iter()
                    .filter(|v| !v.is_empty())
                    .map(|v| self.get(v))
                    .collect();
                // A piece whose values are unknown but whose length is (a
                // sum of sizes: a cache's past plus new length) stands as
                // fresh unknowns, so the other entries stay known.
                let fill = axis == 0 || axis == -1;
                let ints = parts
                    .iter()
                    .map(|p| {
                        p.ints.clone().or_else(|| match p.shape.as_deref() {
                            Some([n]) if fill => n
                                .value()
                                .and_then(|n| usize::try_from(n).ok())
                                .filter(|&n| n <= MAX_INTS)
                                .map(|n| self.fresh_shape(n)),
                            _ => None,
                        })
                    })
                    .collect::<Option<Vec<_>>>()
                    .map(|v| v.concat())
                    .filter(|v| v.len() <= MAX_INTS);
                let shape = self.concat_shape(&parts, axis);
                one(Info {
                    shape,
                    ints,
                    ..Default::default()
                })
            }
            ("", "Slice") => one(self.slice(node, inputs, &first)),
            ("", "Split") => self.split(node, inputs, &first, outputs),
            ("", "Flatten") => {
                let axis = attr_int("axis").unwrap_or(1);
                let shape = first.shape.as_ref().and_then(|s| {
                    let a = normalize_axis(axis, s.len() + 1)?;
                    let prod = |d: &[Expr]| d.iter().fold(Expr::known(1), |x, y| x.mul(y));
                    Some(vec![prod(&s[..a]), prod(&s[a..])])
                });
                one(Info {
                    shape,
                    ..Default::default()
                })
            }
            ("", "Expand") => {
                let shape = match self.ints_of(arg(inputs, 1)) {
                    Some(t) => broadcast(&[first.shape.clone(), Some(t)]),
                    None => self.claimed_rank(arg(inputs, 1)).map(|r| {
                        let rank = r.max(first.shape.as_ref().map_or(0, |s| s.len()));
                        self.fresh_shape(rank)
                    }),
                };
                one(Info {
                    shape,
                    ..Default::default()
                })
            }
            ("", "Tile") => {
                let repeats = self.ints_of(arg(inputs, 1));
                let shape = match (&first.shape, repeats) {
                    (Some(s), Some(r)) if s.len() == r.len() => {
                        Some(s.iter().zip(&r).map(|(a, b)| a.mul(b)).collect())
                    }
                    (Some(s), _) => Some(self.fresh_shape(s.len())),
                    _ => None,
                };
                one(Info {
                    shape,
                    ..Default::default()
                })
            }
            ("", "ConstantOfShape") => {
                let shape = first.ints.clone();
                let fill = node
                    .attribute("value")
                    .and_then(|a| a.t.as_ref())
                    .map(|t| tensor_info(&Tensor::new(t.clone())));
                let count = shape
                    .as_ref()
                    .and_then(|s| checked_product(s.iter().map(Expr::value)));
                let ints = match (fill.as_ref().and_then(|f| f.ints.clone()), count) {
                    (Some(v), Some(n)) if v.len() == 1 && (n as usize) <= MAX_INTS => {
                        Some(vec![v[0].clone(); n as usize])
                    }
                    _ => None,
                };
                one(Info {
                    shape,
                    ints,
                    ..Default::default()
                })
            }
            ("", "Range") => {
                let (start, limit, delta) = (
                    self.ints_of(arg(inputs, 0)),
                    self.ints_of(arg(inputs, 1)),
                    self.ints_of(arg(inputs, 2)),
                );
                let len = match (start.as_deref(), limit.as_deref(), delta.as_deref()) {
                    (Some([s]), Some([l]), Some([d])) => match (s.value(), l.value(), d.value()) {
                        (Some(s), Some(l), Some(d)) if d != 0 => Some(Expr::known(
                            ((l - s) as f64 / d as f64).ceil().max(0.0) as i64,
                        )),
                        (Some(0), None, Some(1)) => Some(l.clone()),
                        _ => None,
                    },
                    _ => None,
                };
                let len = len.unwrap_or_else(|| self.fresh());
                let ints = match (start.as_deref(), delta.as_deref(), len.value()) {
                    (Some([s]), Some([d]), Some(n)) if (n as usize) <= MAX_INTS => {
                        match (s.value(), d.value()) {
                            (Some(s), Some(d)) => {
                                Some((0..n).map(|i| Expr::known(s + i * d)).collect())
                            }
                            _ => None,
                        }
                    }
                    _ => None,
                };
                one(Info {
                    shape: Some(vec![len]),
                    ints,
                    ..Default::default()
                })
            }
            ("", "Conv") => one(self.conv(node, inputs, &first)),
            ("", "GatherElements") => one(same_shape(&self.input(inputs, 1))),
            ("", "Pad" | "Resize" | "Upsample" | "AveragePool" | "MaxPool") => {
                let shape = first.shape.as_ref().map(|s| {
                    let mut fresh = self.fresh_shape(s.len());
                    // Batch and channels pass through.
                    for (i, d) in s.iter().take(2).enumerate() {
                        if op != "Pad" {
                            fresh[i] = d.clone();
                        }
                    }
                    fresh
                });
                one(Info {
                    shape,
                    ..Default::default()
                })
            }
            (
                "",
                "ReduceMean" | "ReduceSum" | "ReduceMax" | "ReduceMin" | "ReduceL2" | "ReduceL1"
                | "ReduceProd" | "ReduceLogSumExp" | "ReduceSumSquare",
            ) => {
                let keep = attr_int("keepdims").unwrap_or(1) != 0;
                let axes = attr_ints("axes").or_else(|| {
                    inputs
                        .get(1)
                        .filter(|v| !v.is_empty())
                        .and_then(|v| self.known_ints(v))
                });
                let shape = first.shape.as_ref().and_then(|s| {
                    let axes: Vec<usize> = match &axes {
                        Some(a) => a
                            .iter()
                            .map(|&x| normalize_axis(x, s.len()))
                            .collect::<Option<_>>()?,
                        None => (0..s.len()).collect(),
                    };
                    Some(
                        s.iter()
                            .enumerate()
                            .filter_map(|(i, d)| match (axes.contains(&i), keep) {
                                (true, true) => Some(Expr::known(1)),
                                (true, false) => None,
                                _ => Some(d.clone()),
                            })
                            .collect(),
                    )
                });
                one(Info {
                    shape,
                    ..Default::default()
                })
            }
            ("", "ArgMax" | "ArgMin") => {
                let keep = attr_int("keepdims").unwrap_or(1) != 0;
                let axis = attr_int("axis").unwrap_or(0);
                let shape = first.shape.as_ref().and_then(|s| {
                    let a = normalize_axis(axis, s.len())?;
                    let mut out = s.clone();
                    if keep {
                        out[a] = Expr::known(1);
                    } else {
                        out.remove(a);
                    }
                    Some(out)
                });
                one(Info {
                    shape,
                    ..Default::default()
                })
            }
            ("com.microsoft", "Attention") => {
                let w = self.input(inputs, 1);
                let width = attr_ints("qkv_hidden_sizes")
                    .and_then(|v| v.get(2).map(|x| Expr::known(*x)))
                    .or_else(|| {
                        w.shape
                            .as_ref()
                            .and_then(|s| s.get(1))
                            .and_then(|d| d.div(&Expr::known(3)))
                    });
                let shape = first.shape.as_ref().and_then(|s| {
                    let mut out = s.clone();
                    *out.last_mut()? = width.clone()?;
                    Some(out)
                });
                let mut out = vec![Info {
                    shape,
                    ..Default::default()
                }];
                out.extend((1..outputs).map(|_| Info::default()));
                out
            }
            ("com.microsoft", "MultiHeadAttention") | ("", "Attention") => {
                // Output 0 has the query's layout with the value's width.
                let v = self.input(inputs, 2);
                let shape = match (&first.shape, &v.shape) {
                    (Some(q), Some(v)) if q.len() == 3 && v.len() == 3 => {
                        let heads = attr_int("q_num_heads")
                            .or_else(|| attr_int("num_heads"))
                            .map(Expr::known);
                        let kv_heads = attr_int("kv_num_heads").map(Expr::known);
                        let width = match (op, heads, kv_heads) {
                            ("Attention", Some(h), Some(kv)) => v[2].div(&kv).map(|d| d.mul(&h)),
                            _ => Some(v[2].clone()),
                        };
                        width.map(|w| vec![q[0].clone(), q[1].clone(), w])
                    }
                    (Some(q), Some(v)) if q.len() == 4 && v.len() == 4 => {
                        Some(vec![q[0].clone(), q[1].clone(), q[2].clone(), v[3].clone()])
                    }
                    _ => None,
                };
                let mut out = vec![Info {
                    shape,
                    ..Default::default()
                }];
                out.extend((1..outputs).map(|_| Info::default()));
                out
            }
            _ => (0..outputs).map(|_| Info::default()).collect(),
        }
    }

    fn binary(&mut self, op: &str, inputs: &[String]) -> Info {
        let (a, b) = (self.input(inputs, 0), self.input(inputs, 1));
        let shape = broadcast(&[a.shape.clone(), b.shape.clone()]);
        let ints = match (&a.ints, &b.ints) {
            (Some(x), Some(y)) => elementwise(x, y, |p, q| match op {
                "Add" => p.add(q, 1),
                "Sub" => p.add(q, -1),
                "Mul" => Some(p.mul(q)),
                "Div" => p.div(q),
                "Mod" => Some(Expr::known(p.value()?.checked_rem(q.value()?)?)),
                "Max" => Some(Expr::known(p.value()?.max(q.value()?))),
                "Min" => Some(Expr::known(p.value()?.min(q.value()?))),
                "Equal" => match (p.value(), q.value()) {
                    (Some(x), Some(y)) => Some(Expr::known(i64::from(x == y))),
                    // A size never equals a negative number (exporters test
                    // reshape targets against -1 this way).
                    (None, Some(y)) if y < 0 && p.factor > 0 => Some(Expr::known(0)),
                    (Some(y), None) if y < 0 && q.factor > 0 => Some(Expr::known(0)),
                    _ => None,
                },
                "Less" | "Greater" | "LessOrEqual" | "GreaterOrEqual" => {
                    let (x, y) = (p.value()?, q.value()?);
                    Some(Expr::known(i64::from(match op {
                        "Less" => x < y,
                        "Greater" => x > y,
                        "LessOrEqual" => x <= y,
                        _ => x >= y,
                    })))
                }
                _ => None,
            }),
            _ => None,
        };
        let operand = |i: usize| inputs.get(i).and_then(|v| self.float_of(v));
        let float = match (operand(0), operand(1)) {
            (Some(x), Some(y)) if ints.is_none() => match op {
                "Add" => Some(x + y),
                "Sub" => Some(x - y),
                "Mul" => Some(x * y),
                "Div" => Some(x / y),
                "Pow" => Some(x.powf(y)),
                _ => None,
            },
            _ => None,
        };
        Info { shape, ints, float }
    }

    fn reshape(&mut self, input: Option<&[Expr]>, target: &[Expr], allow_zero: bool) -> Vec<Expr> {
        let mut out: Vec<Option<Expr>> = target
            .iter()
            .enumerate()
            .map(|(i, t)| match t.value() {
                Some(0) if !allow_zero => input.and_then(|s| s.get(i).cloned()),
                Some(-1) => None,
                _ => Some(t.clone()),
            })
            .collect();
        let wildcard = target.iter().position(|t| t.value() == Some(-1));
        if let (Some(w), Some(input)) = (wildcard, input) {
            let total = input.iter().fold(Expr::known(1), |a, d| a.mul(d));
            let rest = out
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != w)
                .map(|(_, d)| d.clone())
                .collect::<Option<Vec<Expr>>>()
                .map(|v| v.iter().fold(Expr::known(1), |a, d| a.mul(d)));
            out[w] = rest.and_then(|r| total.div(&r));
        }
        out.into_iter()
            .map(|d| d.unwrap_or_else(|| self.fresh()))
            .collect()
    }

    fn concat_shape(&mut self, parts: &[Info], axis: i64) -> Option<Vec<Expr>> {
        let first = parts.iter().find_map(|p| p.shape.clone())?;
        let a = normalize_axis(axis, first.len())?;
        let mut out = first.clone();
        let mut sum: Option<Expr> = Some(Expr::known(0));
        for p in parts {
            let d = p.shape.as_ref().and_then(|s| s.get(a).cloned());
            sum = match (sum, d) {
                (Some(s), Some(d)) if s.value() == Some(0) => Some(d),
                (Some(s), Some(d)) => s.add(&d, 1),
                _ => None,
            };
        }
        out[a] = sum.unwrap_or_else(|| self.fresh());
        Some(out)
    }

    fn slice(&mut self, node: &crate::ir::Node, inputs: &[String], data: &Info) -> Info {
        // Optional axes or steps given by a value that is not constant: the
        // sliced axes are unknown (taking the defaults would be wrong).
        let mut unknown_optional = false;
        let (starts, ends, axes, steps) = if inputs.len() >= 3 {
            let get = |i: usize| {
                inputs
                    .get(i)
                    .filter(|v| !v.is_empty())
                    .and_then(|v| self.known_ints(v))
            };
            let named = |i: usize| inputs.get(i).is_some_and(|v| !v.is_empty());
            let (axes, steps) = (get(3), get(4));
            unknown_optional = (named(3) && axes.is_none()) || (named(4) && steps.is_none());
            (get(1), get(2), axes, steps)
        } else {
            (
                node.attr_ints("starts").map(|v| v.to_vec()),
                node.attr_ints("ends").map(|v| v.to_vec()),
                node.attr_ints("axes").map(|v| v.to_vec()),
                None,
            )
        };
        let Some(shape) = data.shape.clone() else {
            return Info::default();
        };
        let (Some(starts), Some(ends), false) = (starts, ends, unknown_optional) else {
            let fresh = self.fresh_shape(shape.len());
            return Info {
                shape: Some(fresh),
                ..Default::default()
            };
        };
        let axes = axes.unwrap_or_else(|| (0..starts.len() as i64).collect());
        let steps = steps.unwrap_or_else(|| vec![1; starts.len()]);
        // The spec gives one start, end, axis and step per sliced axis; a
        // model whose lists differ in length says nothing about the shape.
        if ends.len() != starts.len() || axes.len() != starts.len() || steps.len() != starts.len() {
            return Info::default();
        }
        let mut out = shape.clone();
        let mut ints = data.ints.clone();
        for (k, &axis) in axes.iter().enumerate() {
            let Some(a) = normalize_axis(axis, shape.len()) else {
                return Info::default();
            };
            let (start, end, step) = (starts[k], ends[k], steps[k]);
            match shape[a].value() {
                Some(n) if step != 0 => {
                    let range = slice_range(n, start, end, step);
                    out[a] = Expr::known(range.len() as i64);
                    if shape.len() == 1 {
                        ints =
                            ints.map(|v| range.iter().filter_map(|&i| v.get(i).cloned()).collect());
                    }
                }
                _ => {
                    out[a] = self.fresh();
                    ints = None;
                }
            }
        }
        Info {
            shape: Some(out),
            ints,
            ..Default::default()
        }
    }

    fn split(
        &mut self,
        node: &crate::ir::Node,
        inputs: &[String],
        data: &Info,
        outputs: usize,
    ) -> Vec<Info> {
        let axis = node.attr_int("axis").unwrap_or(0);
        let sizes = node.attr_ints("split").map(|v| v.to_vec()).or_else(|| {
            inputs
                .get(1)
                .filter(|v| !v.is_empty())
                .and_then(|v| self.known_ints(v))
        });
        let Some(shape) = data.shape.clone() else {
            return vec![Info::default(); outputs];
        };
        let Some(a) = normalize_axis(axis, shape.len()) else {
            return vec![Info::default(); outputs];
        };
        let sizes: Vec<Option<Expr>> = match sizes {
            Some(s) if s.len() == outputs => s.into_iter().map(|v| Some(Expr::known(v))).collect(),
            _ => {
                let each = shape[a].div(&Expr::known(outputs.max(1) as i64));
                vec![each; outputs]
            }
        };
        sizes
            .into_iter()
            .map(|d| {
                let mut s = shape.clone();
                s[a] = d.unwrap_or_else(|| self.fresh());
                Info {
                    shape: Some(s),
                    ..Default::default()
                }
            })
            .collect()
    }

    fn conv(&mut self, node: &crate::ir::Node, inputs: &[String], x: &Info) -> Info {
        let w = self.input(inputs, 1);
        let (Some(xs), Some(ws)) = (&x.shape, &w.shape) else {
            return Info::default();
        };
        if xs.len() < 3 || ws.len() != xs.len() {
            return Info::default();
        }
        let spatial = xs.len() - 2;
        let strides = node
            .attr_ints("strides")
            .map(|v| v.to_vec())
            .unwrap_or_else(|| vec![1; spatial]);
        let dilations = node
            .attr_ints("dilations")
            .map(|v| v.to_vec())
            .unwrap_or_else(|| vec![1; spatial]);
        let pads = node
            .attr_ints("pads")
            .map(|v| v.to_vec())
            .unwrap_or_else(|| vec![0; 2 * spatial]);
        let auto_pad = node
            .attribute("auto_pad")
            .and_then(|a| a.s.as_ref())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .unwrap_or_default();
        let mut out = vec![xs[0].clone(), ws[0].clone()];
        for i in 0..spatial {
            let dim = match (xs[2 + i].value(), ws[2 + i].value()) {
                (Some(n), Some(k)) if strides.len() == spatial && pads.len() == 2 * spatial => {
                    let s = strides[i].max(1);
                    Some(match auto_pad.as_str() {
                        "SAME_UPPER" | "SAME_LOWER" => (n + s - 1) / s,
                        "VALID" => (n - dilations[i] * (k - 1) - 1) / s + 1,
                        _ => (n + pads[i] + pads[i + spatial] - dilations[i] * (k - 1) - 1) / s + 1,
                    })
                }
                _ => None,
            };
            out.push(match dim {
                Some(d) => Expr::known(d),
                None => self.fresh(),
            });
        }
        Info {
            shape: Some(out),
            ..Default::default()
        }
    }
}

/// The info of a constant tensor.
fn tensor_info(tensor: &Tensor) -> Info {
    let shape = Some(tensor.dims().iter().map(|&d| Expr::known(d)).collect());
    let n = tensor.len();
    let mut info = Info {
        shape,
        ..Default::default()
    };
    let data_type = tensor.data_type();
    if dtype::is_integer(data_type) && n <= MAX_INTS {
        info.ints = tensor
            .to_i64()
            .ok()
            .map(|v| v.into_iter().map(Expr::known).collect());
    } else if matches!(data_type, 1 | 10 | 11 | 16) && n == 1 {
        info.float = tensor.to_f32().ok().map(|v| v[0] as f64);
    }
    info
}

/// The info of a `Constant` node's output.
fn constant_info(node: &crate::ir::Node) -> Info {
    if let Some(t) = node.attribute("value").and_then(|a| a.t.as_ref()) {
        return tensor_info(&Tensor::new(t.clone()));
    }
    if let Some(v) = node.attr_int("value_int") {
        return Info {
            shape: Some(Vec::new()),
            ints: Some(vec![Expr::known(v)]),
            ..Default::default()
        };
    }
    if let Some(v) = node.attr_ints("value_ints") {
        return Info {
            shape: Some(vec![Expr::known(v.len() as i64)]),
            ints: (v.len() <= MAX_INTS).then(|| v.iter().map(|&x| Expr::known(x)).collect()),
            ..Default::default()
        };
    }
    if let Some(v) = node.attr_float("value_float") {
        return Info {
            shape: Some(Vec::new()),
            float: Some(v as f64),
            ..Default::default()
        };
    }
    Info::default()
}

fn normalize_axis(axis: i64, rank: usize) -> Option<usize> {
    let a = if axis < 0 { axis + rank as i64 } else { axis };
    (0..rank as i64).contains(&a).then_some(a as usize)
}

/// NumPy broadcasting of shapes, as far as it can be told.
fn broadcast(shapes: &[Option<Vec<Expr>>]) -> Option<Vec<Expr>> {
    let shapes: Vec<&Vec<Expr>> = shapes.iter().map(|s| s.as_ref()).collect::<Option<_>>()?;
    let rank = shapes.iter().map(|s| s.len()).max()?;
    let mut out = Vec::with_capacity(rank);
    for i in 0..rank {
        let dims: Vec<&Expr> = shapes
            .iter()
            .filter_map(|s| (i + s.len()).checked_sub(rank).map(|j| &s[j]))
            .collect();
        let pick = dims
            .iter()
            .find(|d| d.value().is_some_and(|v| v != 1))
            .or_else(|| dims.iter().find(|d| d.value().is_none()))
            .or_else(|| dims.first())
            .map(|d| (*d).clone())?;
        out.push(pick);
    }
    Some(out)
}

fn matmul_shape(a: Option<&[Expr]>, b: Option<&[Expr]>) -> Option<Vec<Expr>> {
    let (a, b) = (a?, b?);
    match (a.len(), b.len()) {
        (0, _) | (_, 0) => None,
        (1, 1) => Some(Vec::new()),
        (1, _) => {
            let mut out = b[..b.len() - 2].to_vec();
            out.push(b[b.len() - 1].clone());
            Some(out)
        }
        (_, 1) => Some(a[..a.len() - 1].to_vec()),
        _ => {
            let batch = broadcast(&[
                Some(a[..a.len() - 2].to_vec()),
                Some(b[..b.len() - 2].to_vec()),
            ])?;
            let mut out = batch;
            out.push(a[a.len() - 2].clone());
            out.push(b[b.len() - 1].clone());
            Some(out)
        }
    }
}

fn elementwise(
    a: &[Expr],
    b: &[Expr],
    f: impl Fn(&Expr, &Expr) -> Option<Expr>,
) -> Option<Vec<Expr>> {
    let n = a.len().max(b.len());
    if (a.len() != n && a.len() != 1) || (b.len() != n && b.len() != 1) {
        return None;
    }
    (0..n)
        .map(|i| f(&a[i.min(a.len() - 1)], &b[i.min(b.len() - 1)]))
        .collect()
}

fn elementwise3(
    a: &[Expr],
    b: &[Expr],
    c: &[Expr],
    f: impl Fn(&Expr, &Expr, &Expr) -> Option<Expr>,
) -> Option<Vec<Expr>> {
    let n = a.len().max(b.len()).max(c.len());
    for v in [a, b, c] {
        if v.len() != n && v.len() != 1 {
            return None;
        }
    }
    (0..n)
        .map(|i| {
            f(
                &a[i.min(a.len() - 1)],
                &b[i.min(b.len() - 1)],
                &c[i.min(c.len() - 1)],
            )
        })
        .collect()
}

/// The indices a Slice of `start..end` by `step` takes from `n` elements.
fn slice_range(n: i64, start: i64, end: i64, step: i64) -> Vec<usize> {
    let clamp = |v: i64, lo: i64, hi: i64| {
        let v = if v < 0 { v.saturating_add(n) } else { v };
        v.clamp(lo, hi)
    };
    let mut out = Vec::new();
    if step > 0 {
        let (s, e) = (clamp(start, 0, n), clamp(end, 0, n));
        let mut i = s;
        while i < e {
            out.push(i as usize);
            i += step;
        }
    } else {
        let (s, e) = (clamp(start, -1, n - 1), clamp(end, -1, n - 1));
        let mut i = s;
        while i > e {
            out.push(i as usize);
            i += step;
        }
    }
    out
}

/// The product of known dimensions: `None` when one is unknown or the
/// product overflows.
fn checked_product(dims: impl Iterator<Item = Option<i64>>) -> Option<i64> {
    let mut product = 1i64;
    for dim in dims {
        product = product.checked_mul(dim?)?;
    }
    Some(product)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `SHAPES_DEBUG=model.onnx cargo test --lib shapes_debug -- --nocapture`
    /// lists the first nodes whose outputs lose their rank.
    #[test]
    fn shapes_debug() {
        let Some(path) = std::env::var_os("SHAPES_DEBUG") else {
            return;
        };
        let loaded = crate::onnx::load(std::path::Path::new(&path)).unwrap();
        let model = crate::ir::Model::from_proto(loaded.proto).unwrap();
        let graph = &model.graph;
        let shapes = Shapes::infer(graph);
        let mut shown = 0;
        for id in graph.nodes() {
            let n = graph.node(id);
            let inputs_known = n
                .inputs()
                .iter()
                .filter(|i| !i.is_empty())
                .all(|i| shapes.shape(i).is_some());
            let lost = n
                .outputs()
                .iter()
                .any(|o| !o.is_empty() && shapes.shape(o).is_none());
            if inputs_known && lost && shown < 30 {
                println!("{} -> {:?}", n.label(), n.inputs());
                shown += 1;
            }
        }
    }
}

#[cfg(test)]
mod value_debug {
    use super::*;

    /// `INTS_DEBUG=model.onnx INTS_VALUE=name cargo test --lib ints_debug -- --nocapture`
    /// walks back from a value printing what is known of each.
    #[test]
    fn ints_debug() {
        let (Some(path), Some(value)) = (
            std::env::var_os("INTS_DEBUG"),
            std::env::var("INTS_VALUE").ok(),
        ) else {
            return;
        };
        let loaded = crate::onnx::load(std::path::Path::new(&path)).unwrap();
        let model = crate::ir::Model::from_proto(loaded.proto).unwrap();
        let graph = &model.graph;
        let shapes = Shapes::infer(graph);
        let mut stack = vec![(value, 0)];
        while let Some((v, depth)) = stack.pop() {
            let info = shapes.info(&v);
            let op = graph
                .producer_node(&v)
                .map(|p| graph.node(p).label())
                .unwrap_or_default();
            println!(
                "{}{v} [{op}] shape={:?} ints={:?}",
                "  ".repeat(depth),
                info.and_then(|i| i.shape.clone()).map(|s| s.len()),
                info.and_then(|i| i.ints.clone())
            );
            if depth < 6
                && let Some(p) = graph.producer_node(&v)
            {
                for i in graph.node(p).inputs() {
                    if !i.is_empty() {
                        stack.push((i.clone(), depth + 1));
                    }
                }
            }
        }
    }
}

/// The name of input `i`, or "" (ONNX's absent optional input) when a
/// malformed node has fewer inputs than its operator takes.
fn arg(inputs: &[String], i: usize) -> &str {
    inputs.get(i).map_or("", String::as_str)
}
