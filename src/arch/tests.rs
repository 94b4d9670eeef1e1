//! Matcher tests on small graphs built in Rust, including the shapes that
//! must *not* match.

use super::*;
use crate::ir::Graph;
use crate::onnx::proto::{
    GraphProto, NodeProto, TensorProto, TypeProto, ValueInfoProto, tensor_shape_proto, type_proto,
};

/// Builds graphs node by node.
#[derive(Default)]
struct Builder {
    graph: GraphProto,
    count: usize,
}

impl Builder {
    fn input(&mut self, name: &str, elem_type: i32, dims: &[i64]) {
        self.graph.input.push(info(name, elem_type, dims));
    }
    fn output(&mut self, name: &str) {
        self.graph.output.push(info(name, 1, &[]));
    }
    fn weight(&mut self, dims: &[i64]) -> String {
        self.count += 1;
        let name = format!("w{}", self.count);
        let n: i64 = dims.iter().product();
        self.graph.initializer.push(TensorProto {
            name: Some(name.clone()),
            data_type: Some(1),
            dims: dims.to_vec(),
            float_data: (0..n).map(|i| (i % 7) as f32 * 0.1).collect(),
            ..Default::default()
        });
        name
    }
    fn ints(&mut self, values: &[i64]) -> String {
        self.count += 1;
        let name = format!("c{}", self.count);
        self.graph.initializer.push(TensorProto {
            name: Some(name.clone()),
            data_type: Some(7),
            dims: vec![values.len() as i64],
            int64_data: values.to_vec(),
            ..Default::default()
        });
        name
    }
    fn op(&mut self, op: &str, inputs: &[&str]) -> String {
        self.count += 1;
        let output = format!("v{}", self.count);
        self.graph.node.push(NodeProto {
            op_type: Some(op.into()),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.clone()],
            ..Default::default()
        });
        output
    }
    fn linear(&mut self, x: &str, i: i64, o: i64) -> String {
        let w = self.weight(&[i, o]);
        let b = self.weight(&[o]);
        let m = self.op("MatMul", &[x, &w]);
        self.op("Add", &[&b, &m])
    }
    fn layer_norm(&mut self, x: &str, d: i64) -> String {
        let g = self.weight(&[d]);
        let b = self.weight(&[d]);
        self.op("LayerNormalization", &[x, &g, &b])
    }
    fn heads(&mut self, x: &str, heads: i64, dim: i64, perm: &[i64]) -> String {
        let shape = self.ints(&[0, 0, heads, dim]);
        let r = self.op("Reshape", &[x, &shape]);
        let t = self.op("Transpose", &[&r]);
        self.graph
            .node
            .last_mut()
            .unwrap()
            .attribute
            .push(ints_attr("perm", perm));
        t
    }
    /// A pre-norm block: hidden 8, 2 heads of 4, MLP 16.
    fn pre_norm_block(&mut self, x: &str) -> String {
        let n = self.layer_norm(x, 8);
        let q = self.linear(&n, 8, 8);
        let k = self.linear(&n, 8, 8);
        let v = self.linear(&n, 8, 8);
        let q = self.heads(&q, 2, 4, &[0, 2, 1, 3]);
        let k = self.heads(&k, 2, 4, &[0, 2, 3, 1]);
        let v = self.heads(&v, 2, 4, &[0, 2, 1, 3]);
        let s = self.op("MatMul", &[&q, &k]);
        let scale = self.weight(&[]);
        let s = self.op("Mul", &[&s, &scale]);
        let p = self.op("Softmax", &[&s]);
        let c = self.op("MatMul", &[&p, &v]);
        let c = self.op("Transpose", &[&c]);
        self.graph
            .node
            .last_mut()
            .unwrap()
            .attribute
            .push(ints_attr("perm", &[0, 2, 1, 3]));
        let merged = self.ints(&[0, 0, 8]);
        let c = self.op("Reshape", &[&c, &merged]);
        let o = self.linear(&c, 8, 8);
        let h = self.op("Add", &[x, &o]);
        let n = self.layer_norm(&h, 8);
        let f = self.linear(&n, 8, 16);
        let a = self.op("Relu", &[&f]);
        let f = self.linear(&a, 16, 8);
        self.op("Add", &[&h, &f])
    }
    /// Token input ─► embedding ─► x.
    fn text_stem(&mut self) -> String {
        self.input("ids", 7, &[1, 5]);
        let table = self.weight(&[10, 8]);
        self.op("Gather", &[&table, "ids"])
    }
    fn build(mut self, output: &str) -> Graph {
        self.output(output);
        Graph::from_proto(self.graph).unwrap()
    }
}

fn info(name: &str, elem_type: i32, dims: &[i64]) -> ValueInfoProto {
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(elem_type),
                shape: Some(crate::onnx::proto::TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|d| tensor_shape_proto::Dimension {
                            value: Some(tensor_shape_proto::dimension::Value::DimValue(*d)),
                            denotation: None,
                        })
                        .collect(),
                }),
            })),
            denotation: None,
        }),
        ..Default::default()
    }
}

fn ints_attr(name: &str, values: &[i64]) -> crate::onnx::proto::AttributeProto {
    crate::onnx::proto::AttributeProto {
        name: Some(name.into()),
        r#type: Some(7),
        ints: values.to_vec(),
        ..Default::default()
    }
}

#[test]
fn two_pre_norm_blocks_form_a_text_tower() {
    let mut b = Builder::default();
    let x = b.text_stem();
    let y = b.pre_norm_block(&x);
    let z = b.pre_norm_block(&y);
    let graph = b.build(&z);
    let arch = discover(&graph).unwrap();
    assert_eq!(arch.towers.len(), 1);
    let tower = &arch.towers[0];
    assert_eq!(tower.kind, TowerKind::Text);
    assert_eq!(tower.blocks.len(), 2);
    let block = &tower.blocks[1];
    assert_eq!(
        (
            block.hidden,
            block.attention.body.heads,
            block.attention.body.head_dim
        ),
        (8, 2, 4)
    );
    assert_eq!(block.mlp.body.width(), 16);
    assert_eq!(block.norm, NormPlacement::Pre);
    assert_eq!(block.input(), tower.blocks[0].output());
    assert_eq!(block.output(), z);
    assert_eq!(block.params, 4 * (64 + 8) + (128 + 16) + (128 + 8) + 4 * 8);
    // Reshapes of q, k, v split into heads; one merges them.
    let roles = |role| {
        block
            .attention
            .body
            .shape_sites
            .iter()
            .filter(|s| s.role == role)
            .count()
    };
    assert_eq!(roles(ShapeRole::Heads), 3);
    assert_eq!(roles(ShapeRole::Width), 1);
    assert!(arch.outside.is_empty());
}

#[test]
fn a_softmax_classifier_is_not_attention() {
    // x ─► Linear ─► Softmax: no score MatMul of two activations.
    let mut b = Builder::default();
    b.input("x", 1, &[1, 8]);
    let l = b.linear("x", 8, 3);
    let p = b.op("Softmax", &[&l]);
    let graph = b.build(&p);
    let softmax = graph.producer_node(&p).unwrap();
    let miss = attention::match_attention(&View::new(&graph), softmax).unwrap_err();
    assert!(
        miss.expected.contains("MatMul of two activations"),
        "{miss}"
    );
    assert!(matches!(discover(&graph), Err(DiscoverError::NoBlocks(_))));
}

#[test]
fn an_activation_mixing_in_another_activation_is_not_an_mlp() {
    // fc1 ─► Mul(·, other) ─► fc2: the "activation" reads a non-constant
    // value from outside, so slicing neurons would be wrong.
    let mut b = Builder::default();
    b.input("x", 1, &[1, 8]);
    b.input("gate", 1, &[1, 16]);
    let f = b.linear("x", 8, 16);
    let g = b.op("Mul", &[&f, "gate"]);
    let y = b.linear(&g, 16, 8);
    let graph = b.build(&y);
    let order = graph
        .nodes()
        .into_iter()
        .enumerate()
        .map(|(i, id)| (id, i))
        .collect();
    let view = View::new(&graph);
    let fc1 = patterns::linear_producing(&view, &f).unwrap();
    let miss = mlp::match_mlp(&view, &fc1, &order).unwrap_err();
    assert!(
        miss.expected.contains("only fc1's output and constants"),
        "{miss}"
    );
    // …while the plain form matches.
    let mut b = Builder::default();
    b.input("x", 1, &[1, 8]);
    let f = b.linear("x", 8, 16);
    let g = b.op("Sigmoid", &[&f]);
    let g = b.op("Mul", &[&f, &g]);
    let y = b.linear(&g, 16, 8);
    let graph = b.build(&y);
    let order = graph
        .nodes()
        .into_iter()
        .enumerate()
        .map(|(i, id)| (id, i))
        .collect();
    let view = View::new(&graph);
    let fc1 = patterns::linear_producing(&view, &f).unwrap();
    let mlp = mlp::match_mlp(&view, &fc1, &order).unwrap();
    assert_eq!(mlp.activation.len(), 2);
}

#[test]
fn a_block_without_residual_is_not_a_block() {
    // Same sub-blocks, but the attention output is not added back to x.
    let mut b = Builder::default();
    let x = b.text_stem();
    let y = b.pre_norm_block(&x);
    let mut proto = b.graph.clone();
    // Re-point the attention residual Add to read the attention output twice.
    let add = proto
        .node
        .iter_mut()
        .find(|n| n.op_type() == "Add" && n.input.contains(&x))
        .unwrap();
    let other = add.input.iter().find(|i| **i != x).unwrap().clone();
    add.input = vec![other.clone(), other];
    proto.output.push(info(&y, 1, &[]));
    let graph = Graph::from_proto(proto).unwrap();
    let err = discover(&graph).unwrap_err().to_string();
    assert!(err.contains("no transformer block"), "{err}");
}

#[test]
fn decomposed_layer_norm_is_recognised() {
    let mut b = Builder::default();
    b.input("x", 1, &[1, 8]);
    let mean = b.op("ReduceMean", &["x"]);
    let sub = b.op("Sub", &["x", &mean]);
    let two = b.weight(&[]);
    let pow = b.op("Pow", &[&sub, &two]);
    let var = b.op("ReduceMean", &[&pow]);
    let eps = b.weight(&[]);
    let var = b.op("Add", &[&var, &eps]);
    let std = b.op("Sqrt", &[&var]);
    let div = b.op("Div", &[&sub, &std]);
    let gamma = b.weight(&[8]);
    let mul = b.op("Mul", &[&div, &gamma]);
    let beta = b.weight(&[8]);
    let y = b.op("Add", &[&mul, &beta]);
    let graph = b.build(&y);
    let view = View::new(&graph);
    let norm = patterns::norm_producing(&view, &y).unwrap();
    assert_eq!(
        (norm.kind, norm.input.as_str(), norm.nodes.len()),
        (NormKind::Decomposed, "x", 9)
    );
    assert_eq!(patterns::norm_reading(&view, "x").unwrap().output, y);
    // Not a norm: the Sub output has no Div reader feeding Mul/Add.
    assert!(patterns::norm_producing(&view, &var).is_none());
}
