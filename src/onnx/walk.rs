//! Visiting every `TensorProto` of a model: initializers, sparse initializers,
//! tensor-valued attributes, and those inside subgraphs, functions and
//! training graphs. External data and size checks must see all of them.

use super::proto::{
    AttributeProto, GraphProto, ModelProto, NodeProto, SparseTensorProto, TensorProto,
};

/// Calls `f` on every tensor of `model`, depth first, in file order.
pub fn tensors_mut<E>(
    model: &mut ModelProto,
    f: &mut dyn FnMut(&mut TensorProto) -> Result<(), E>,
) -> Result<(), E> {
    if let Some(graph) = model.graph.as_mut() {
        graph_tensors_mut(graph, f)?;
    }
    for info in &mut model.training_info {
        for graph in [info.initialization.as_mut(), info.algorithm.as_mut()]
            .into_iter()
            .flatten()
        {
            graph_tensors_mut(graph, f)?;
        }
    }
    for function in &mut model.functions {
        for node in &mut function.node {
            node_tensors_mut(node, f)?;
        }
        for attribute in &mut function.attribute_proto {
            attribute_tensors_mut(attribute, f)?;
        }
    }
    Ok(())
}

/// Calls `f` on every tensor of `graph` and of its subgraphs.
pub fn graph_tensors_mut<E>(
    graph: &mut GraphProto,
    f: &mut dyn FnMut(&mut TensorProto) -> Result<(), E>,
) -> Result<(), E> {
    for node in &mut graph.node {
        node_tensors_mut(node, f)?;
    }
    for tensor in &mut graph.initializer {
        f(tensor)?;
    }
    for sparse in &mut graph.sparse_initializer {
        sparse_tensors_mut(sparse, f)?;
    }
    Ok(())
}

fn node_tensors_mut<E>(
    node: &mut NodeProto,
    f: &mut dyn FnMut(&mut TensorProto) -> Result<(), E>,
) -> Result<(), E> {
    for attribute in &mut node.attribute {
        attribute_tensors_mut(attribute, f)?;
    }
    Ok(())
}

fn attribute_tensors_mut<E>(
    attribute: &mut AttributeProto,
    f: &mut dyn FnMut(&mut TensorProto) -> Result<(), E>,
) -> Result<(), E> {
    if let Some(tensor) = attribute.t.as_mut() {
        f(tensor)?;
    }
    for tensor in &mut attribute.tensors {
        f(tensor)?;
    }
    if let Some(sparse) = attribute.sparse_tensor.as_mut() {
        sparse_tensors_mut(sparse, f)?;
    }
    for sparse in &mut attribute.sparse_tensors {
        sparse_tensors_mut(sparse, f)?;
    }
    if let Some(graph) = attribute.g.as_mut() {
        graph_tensors_mut(graph, f)?;
    }
    for graph in &mut attribute.graphs {
        graph_tensors_mut(graph, f)?;
    }
    Ok(())
}

fn sparse_tensors_mut<E>(
    sparse: &mut SparseTensorProto,
    f: &mut dyn FnMut(&mut TensorProto) -> Result<(), E>,
) -> Result<(), E> {
    for tensor in [sparse.values.as_mut(), sparse.indices.as_mut()]
        .into_iter()
        .flatten()
    {
        f(tensor)?;
    }
    Ok(())
}
