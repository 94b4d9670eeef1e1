//! The graph: nodes, values, initializers, and the queries and edits that the
//! later stages need.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};

use indexmap::{IndexMap, IndexSet};
use petgraph::Direction;
use petgraph::stable_graph::{EdgeIndex, NodeIndex, StableDiGraph};
use petgraph::visit::EdgeRef;

use super::tensor::Tensor;
use crate::onnx::proto::{
    AttributeProto, GraphProto, NodeProto, SparseTensorProto, StringStringEntryProto,
    TensorAnnotation, ValueInfoProto, tensor_shape_proto::dimension, type_proto,
};

/// Identifies a node of a [`Graph`]; stays valid while the node exists.
pub type NodeId = NodeIndex;

/// Which input of a node a value feeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Slot {
    /// Position in `NodeProto.input`.
    Input(usize),
    /// Read by name inside one of the node's subgraphs.
    Implicit,
}

/// One read of a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Use {
    /// The reading node.
    pub node: NodeId,
    /// Where it reads it.
    pub slot: Slot,
}

/// Where a value comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Producer {
    /// A graph input (without initializer).
    Input,
    /// An initializer (possibly also listed as a graph input, IR < 4 style).
    Initializer,
    /// A sparse initializer.
    SparseInitializer,
    /// Output `1` of node `0`.
    Node(NodeId, usize),
}

/// An operator node.
#[derive(Debug, Clone)]
pub struct Node {
    /// The node as in the file; `input`/`output` are kept current by the
    /// graph's edit methods.
    pub proto: NodeProto,
    /// Outer values read by subgraphs, in first-use order.
    pub implicit_inputs: Vec<String>,
    /// Position used to keep the original order when sorting.
    seq: u64,
}

impl Node {
    /// The operator type.
    pub fn op(&self) -> &str {
        self.proto.op_type()
    }
    /// The operator domain ("" for the default ONNX domain).
    pub fn domain(&self) -> &str {
        self.proto.domain()
    }
    /// The node name (may be empty).
    pub fn name(&self) -> &str {
        self.proto.name()
    }
    /// Input value names ("" marks an omitted optional input).
    pub fn inputs(&self) -> &[String] {
        &self.proto.input
    }
    /// Output value names.
    pub fn outputs(&self) -> &[String] {
        &self.proto.output
    }
    /// The attribute called `name`.
    pub fn attribute(&self, name: &str) -> Option<&AttributeProto> {
        self.proto.attribute.iter().find(|a| a.name() == name)
    }
    /// An integer attribute.
    pub fn attr_int(&self, name: &str) -> Option<i64> {
        self.attribute(name).and_then(|a| a.i)
    }
    /// An integer-list attribute.
    pub fn attr_ints(&self, name: &str) -> Option<&[i64]> {
        self.attribute(name).map(|a| a.ints.as_slice())
    }
    /// A float attribute.
    pub fn attr_float(&self, name: &str) -> Option<f32> {
        self.attribute(name).and_then(|a| a.f)
    }
    /// A human-readable label: "name (Op)" or "(Op) -> first output".
    pub fn label(&self) -> String {
        if self.name().is_empty() {
            format!(
                "({}) -> {}",
                self.op(),
                self.outputs().first().map_or("?", |s| s.as_str())
            )
        } else {
            format!("{} ({})", self.name(), self.op())
        }
    }
    /// The node's metadata entry `key`.
    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.proto
            .metadata_props
            .iter()
            .find(|e| e.key() == key)
            .map(|e| e.value())
    }
}

/// A tensor dimension.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Dim {
    /// A fixed size.
    Fixed(i64),
    /// A named symbolic size such as `batch`.
    Symbolic(String),
    /// Unknown.
    Unknown,
}

/// Element type and shape of a tensor value, as far as the file declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValueType {
    /// `TensorProto.DataType` code (0 when unknown).
    pub elem_type: i32,
    /// The shape, when declared.
    pub shape: Option<Vec<Dim>>,
}

/// Structural problems of a graph.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IrError {
    /// The model has no main graph.
    #[error("the model has no graph")]
    NoGraph,
    /// The graph breaks one or more invariants; every problem is listed.
    #[error("invalid graph: {}", summarize(.0))]
    Invalid(Vec<String>),
    /// The graph has a cycle through the named node.
    #[error("invalid graph: cycle through node {0}")]
    Cycle(String),
    /// An edit referred to something that does not exist.
    #[error("graph edit failed: {0}")]
    Edit(String),
}

fn summarize(problems: &[String]) -> String {
    const SHOWN: usize = 5;
    let mut text = problems
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join("; ");
    if problems.len() > SHOWN {
        text.push_str(&format!("; and {} more", problems.len() - SHOWN));
    }
    text
}

/// A computation graph (the main graph of a model).
#[derive(Debug, Clone, Default)]
pub struct Graph {
    /// `GraphProto.name`.
    pub name: Option<String>,
    /// `GraphProto.doc_string`.
    pub doc_string: Option<String>,
    /// Graph inputs, in order (may include initializer names, IR < 4 style).
    pub inputs: Vec<ValueInfoProto>,
    /// Graph outputs, in order.
    pub outputs: Vec<ValueInfoProto>,
    /// Declared types of intermediate values, in file order.
    pub value_info: IndexMap<String, ValueInfoProto>,
    /// Sparse initializers (kept verbatim).
    pub sparse_initializers: Vec<SparseTensorProto>,
    /// Quantization annotations (kept verbatim, pruned with their tensors).
    pub quantization_annotation: Vec<TensorAnnotation>,
    /// Graph-level metadata.
    pub metadata_props: Vec<StringStringEntryProto>,
    dag: StableDiGraph<Node, String>,
    initializers: IndexMap<String, Tensor>,
    producers: HashMap<String, Producer>,
    uses: HashMap<String, Vec<Use>>,
    next_seq: u64,
}

impl Graph {
    /// Builds and validates the graph. Every problem found is reported at once.
    pub fn from_proto(proto: GraphProto) -> Result<Self, IrError> {
        let mut problems = Vec::new();
        let mut graph = Graph {
            name: proto.name,
            doc_string: proto.doc_string,
            sparse_initializers: proto.sparse_initializer,
            quantization_annotation: proto.quantization_annotation,
            metadata_props: proto.metadata_props,
            ..Default::default()
        };
        for tensor in proto.initializer {
            let name = tensor.name().to_string();
            if name.is_empty() {
                problems.push("an initializer has no name".to_string());
                continue;
            }
            if graph
                .initializers
                .insert(name.clone(), Tensor::new(tensor))
                .is_some()
            {
                problems.push(format!("initializer '{name}' is defined twice"));
            }
            graph.producers.insert(name, Producer::Initializer);
        }
        for sparse in &graph.sparse_initializers {
            let name = sparse
                .values
                .as_ref()
                .map(|v| v.name().to_string())
                .unwrap_or_default();
            if graph
                .producers
                .insert(name.clone(), Producer::SparseInitializer)
                .is_some()
            {
                problems.push(format!(
                    "sparse initializer '{name}' clashes with another definition"
                ));
            }
        }
        let mut seen_inputs = HashSet::new();
        for input in &proto.input {
            let name = input.name();
            if !seen_inputs.insert(name.to_string()) {
                problems.push(format!("graph input '{name}' is listed twice"));
            }
            graph
                .producers
                .entry(name.to_string())
                .or_insert(Producer::Input);
        }
        graph.inputs = proto.input;
        graph.outputs = proto.output;
        for info in proto.value_info {
            graph.value_info.insert(info.name().to_string(), info);
        }

        // Nodes: producers first, so that inputs can be resolved in any order.
        let mut ids = Vec::with_capacity(proto.node.len());
        for node in proto.node {
            let implicit_inputs = implicit_inputs(&node);
            let id = graph.dag.add_node(Node {
                proto: node,
                implicit_inputs,
                seq: graph.next_seq,
            });
            graph.next_seq += 1;
            ids.push(id);
        }
        for &id in &ids {
            if let Some(problem) = arity_problem(&graph.dag[id]) {
                problems.push(problem);
            }
        }
        for &id in &ids {
            let node = &graph.dag[id];
            for (slot, output) in node.proto.output.iter().enumerate() {
                if output.is_empty() {
                    continue;
                }
                if graph
                    .producers
                    .insert(output.clone(), Producer::Node(id, slot))
                    .is_some()
                {
                    problems.push(format!(
                        "value '{output}' has more than one producer (node {})",
                        node.label()
                    ));
                }
            }
        }
        for &id in &ids {
            let reads: Vec<(Slot, String)> = {
                let node = &graph.dag[id];
                let explicit = node
                    .proto
                    .input
                    .iter()
                    .enumerate()
                    .map(|(i, v)| (Slot::Input(i), v.clone()));
                let implicit = node
                    .implicit_inputs
                    .iter()
                    .map(|v| (Slot::Implicit, v.clone()));
                explicit
                    .chain(implicit)
                    .filter(|(_, v)| !v.is_empty())
                    .collect()
            };
            for (slot, value) in reads {
                if !graph.producers.contains_key(&value) {
                    let how = if slot == Slot::Implicit {
                        "a subgraph of node"
                    } else {
                        "node"
                    };
                    problems.push(format!(
                        "{how} {} reads '{value}', which nothing defines",
                        graph.dag[id].label()
                    ));
                    continue;
                }
                graph.connect(&value, Use { node: id, slot });
            }
        }
        for output in &graph.outputs {
            if !graph.producers.contains_key(output.name()) {
                problems.push(format!("graph output '{}' is not defined", output.name()));
            }
        }
        if !problems.is_empty() {
            return Err(IrError::Invalid(problems));
        }
        graph.topological_order()?;
        Ok(graph)
    }

    /// Converts back to protobuf, nodes in a stable topological order (the
    /// original order when it already was one).
    pub fn to_proto(&self) -> GraphProto {
        let order = self.topological_order().expect("the graph is kept acyclic");
        GraphProto {
            node: order
                .into_iter()
                .map(|id| self.dag[id].proto.clone())
                .collect(),
            name: self.name.clone(),
            initializer: self
                .initializers
                .values()
                .map(|t| t.proto().clone())
                .collect(),
            sparse_initializer: self.sparse_initializers.clone(),
            doc_string: self.doc_string.clone(),
            input: self.inputs.clone(),
            output: self.outputs.clone(),
            value_info: self.value_info.values().cloned().collect(),
            quantization_annotation: self.quantization_annotation.clone(),
            metadata_props: self.metadata_props.clone(),
        }
    }

    // ---- queries -------------------------------------------------------

    /// Number of operator nodes.
    pub fn node_count(&self) -> usize {
        self.dag.node_count()
    }

    /// The node `id`. Panics if it was removed.
    pub fn node(&self, id: NodeId) -> &Node {
        &self.dag[id]
    }

    /// The node `id`, if it exists.
    pub fn get_node(&self, id: NodeId) -> Option<&Node> {
        self.dag.node_weight(id)
    }

    /// All node ids in topological order.
    pub fn nodes(&self) -> Vec<NodeId> {
        self.topological_order().expect("the graph is kept acyclic")
    }

    /// Where `value` comes from.
    pub fn producer(&self, value: &str) -> Option<Producer> {
        self.producers.get(value).copied()
    }

    /// The node producing `value`, if a node does.
    pub fn producer_node(&self, value: &str) -> Option<NodeId> {
        match self.producers.get(value) {
            Some(Producer::Node(id, _)) => Some(*id),
            _ => None,
        }
    }

    /// Every read of `value`, in a deterministic order (by node position,
    /// then slot).
    pub fn uses(&self, value: &str) -> Vec<Use> {
        let mut uses = self.uses.get(value).cloned().unwrap_or_default();
        uses.sort_by_key(|u| (self.dag[u.node].seq, u.slot));
        uses
    }

    /// Nodes reading `value` (each once), in node order.
    pub fn consumers(&self, value: &str) -> Vec<NodeId> {
        let mut nodes: Vec<NodeId> = self.uses(value).into_iter().map(|u| u.node).collect();
        nodes.dedup();
        nodes
    }

    /// Whether `value` is a graph output.
    pub fn is_output(&self, value: &str) -> bool {
        self.outputs.iter().any(|o| o.name() == value)
    }

    /// Sets axis `axis` of the declared shape of graph input or output
    /// `name` to `size` (a cache input whose head count was pruned).
    /// Nothing changes where the interface declares no such axis.
    pub fn set_interface_dim(&mut self, name: &str, axis: usize, size: i64) -> Result<(), IrError> {
        let info = self
            .inputs
            .iter_mut()
            .chain(self.outputs.iter_mut())
            .find(|v| v.name() == name)
            .ok_or_else(|| IrError::Edit(format!("'{name}' is not a graph input or output")))?;
        if let Some(type_proto::Value::TensorType(tensor)) =
            info.r#type.as_mut().and_then(|t| t.value.as_mut())
            && let Some(dim) = tensor.shape.as_mut().and_then(|s| s.dim.get_mut(axis))
        {
            dim.value = Some(dimension::Value::DimValue(size));
        }
        Ok(())
    }

    /// Removes graph output `name` (the values stay until dead-code
    /// elimination finds them unread).
    pub fn remove_output(&mut self, name: &str) -> Result<(), IrError> {
        let before = self.outputs.len();
        self.outputs.retain(|o| o.name() != name);
        if self.outputs.len() == before {
            return Err(IrError::Edit(format!("'{name}' is not a graph output")));
        }
        Ok(())
    }

    /// Removes graph input `name`, which nothing may read any more.
    pub fn remove_input(&mut self, name: &str) -> Result<(), IrError> {
        if self.uses.get(name).is_some_and(|u| !u.is_empty()) {
            return Err(IrError::Edit(format!("graph input '{name}' is still read")));
        }
        let before = self.inputs.len();
        self.inputs.retain(|i| i.name() != name);
        if self.inputs.len() == before {
            return Err(IrError::Edit(format!("'{name}' is not a graph input")));
        }
        if matches!(self.producers.get(name), Some(Producer::Input)) {
            self.producers.remove(name);
        }
        Ok(())
    }

    /// The initializer `name`.
    pub fn initializer(&self, name: &str) -> Option<&Tensor> {
        self.initializers.get(name)
    }

    /// All initializers, in file order.
    pub fn initializers(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.initializers.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The declared type of `value` (graph input/output, value_info or
    /// initializer).
    pub fn value_type(&self, value: &str) -> Option<ValueType> {
        if let Some(t) = self.initializers.get(value) {
            return Some(ValueType {
                elem_type: t.data_type(),
                shape: Some(t.dims().iter().map(|&d| Dim::Fixed(d)).collect()),
            });
        }
        let info = self
            .inputs
            .iter()
            .chain(&self.outputs)
            .find(|v| v.name() == value)
            .or_else(|| self.value_info.get(value))?;
        let Some(type_proto::Value::TensorType(tensor)) = info.r#type.as_ref()?.value.as_ref()
        else {
            return None;
        };
        let shape = tensor.shape.as_ref().map(|s| {
            s.dim
                .iter()
                .map(|d| match &d.value {
                    Some(dimension::Value::DimValue(v)) => Dim::Fixed(*v),
                    Some(dimension::Value::DimParam(p)) => Dim::Symbolic(p.clone()),
                    None => Dim::Unknown,
                })
                .collect()
        });
        Some(ValueType {
            elem_type: tensor.elem_type(),
            shape,
        })
    }

    /// Nodes in a topological order that keeps the original order where the
    /// dependencies allow (ties broken by original position).
    pub fn topological_order(&self) -> Result<Vec<NodeId>, IrError> {
        let mut pending: HashMap<NodeId, usize> = HashMap::with_capacity(self.dag.node_count());
        let mut ready = BinaryHeap::new();
        for id in self.dag.node_indices() {
            let deps = self.dag.edges_directed(id, Direction::Incoming).count();
            if deps == 0 {
                ready.push(Reverse((self.dag[id].seq, id)));
            } else {
                pending.insert(id, deps);
            }
        }
        let mut order = Vec::with_capacity(self.dag.node_count());
        while let Some(Reverse((_, id))) = ready.pop() {
            order.push(id);
            for edge in self.dag.edges_directed(id, Direction::Outgoing) {
                let target = edge.target();
                let left = pending.get_mut(&target).expect("counted above");
                *left -= 1;
                if *left == 0 {
                    pending.remove(&target);
                    ready.push(Reverse((self.dag[target].seq, target)));
                }
            }
        }
        if let Some((&stuck, _)) = pending.iter().min_by_key(|(id, _)| self.dag[**id].seq) {
            return Err(IrError::Cycle(self.dag[stuck].label()));
        }
        Ok(order)
    }

    /// Nodes that `value` depends on (transitively), including its producer.
    pub fn ancestors(&self, value: &str) -> HashSet<NodeId> {
        let mut seen = HashSet::new();
        let mut stack: Vec<NodeId> = self.producer_node(value).into_iter().collect();
        while let Some(id) = stack.pop() {
            if seen.insert(id) {
                stack.extend(self.dag.neighbors_directed(id, Direction::Incoming));
            }
        }
        seen
    }

    /// Nodes that read `value` directly or transitively.
    pub fn descendants(&self, value: &str) -> HashSet<NodeId> {
        let mut seen = HashSet::new();
        let mut stack: Vec<NodeId> = self.consumers(value);
        while let Some(id) = stack.pop() {
            if seen.insert(id) {
                stack.extend(self.dag.neighbors_directed(id, Direction::Outgoing));
            }
        }
        seen
    }

    // ---- edits ---------------------------------------------------------

    /// Adds a node; its inputs must exist and its outputs must be new names.
    pub fn add_node(&mut self, proto: NodeProto) -> Result<NodeId, IrError> {
        for output in proto.output.iter().filter(|o| !o.is_empty()) {
            if self.producers.contains_key(output) {
                return Err(IrError::Edit(format!("value '{output}' already exists")));
            }
        }
        let implicit = implicit_inputs(&proto);
        for value in proto
            .input
            .iter()
            .chain(&implicit)
            .filter(|v| !v.is_empty())
        {
            if !self.producers.contains_key(value) {
                return Err(IrError::Edit(format!(
                    "new node reads unknown value '{value}'"
                )));
            }
        }
        let id = self.dag.add_node(Node {
            proto,
            implicit_inputs: implicit,
            seq: self.next_seq,
        });
        self.next_seq += 1;
        let node = &self.dag[id];
        let outputs: Vec<(usize, String)> = node
            .proto
            .output
            .iter()
            .cloned()
            .enumerate()
            .filter(|(_, o)| !o.is_empty())
            .collect();
        let reads: Vec<(Slot, String)> = node
            .proto
            .input
            .iter()
            .enumerate()
            .map(|(i, v)| (Slot::Input(i), v.clone()))
            .chain(
                node.implicit_inputs
                    .iter()
                    .map(|v| (Slot::Implicit, v.clone())),
            )
            .filter(|(_, v)| !v.is_empty())
            .collect();
        for (slot, output) in outputs {
            self.producers.insert(output, Producer::Node(id, slot));
        }
        for (slot, value) in reads {
            self.connect(&value, Use { node: id, slot });
        }
        Ok(id)
    }

    /// Points input `slot` of `node` at `value`.
    pub fn set_input(&mut self, node: NodeId, slot: usize, value: &str) -> Result<(), IrError> {
        if !value.is_empty() && !self.producers.contains_key(value) {
            return Err(IrError::Edit(format!("unknown value '{value}'")));
        }
        let old = self
            .dag
            .node_weight(node)
            .and_then(|n| n.proto.input.get(slot))
            .cloned()
            .ok_or_else(|| IrError::Edit(format!("node has no input {slot}")))?;
        let this = Use {
            node,
            slot: Slot::Input(slot),
        };
        if !old.is_empty() {
            self.disconnect(&old, this);
        }
        self.dag[node].proto.input[slot] = value.to_string();
        if !value.is_empty() {
            self.connect(value, this);
        }
        Ok(())
    }

    /// Makes every reader of `old` (nodes and graph outputs) read `new`
    /// instead. Subgraph reads cannot be renamed and are refused.
    pub fn replace_all_uses(&mut self, old: &str, new: &str) -> Result<(), IrError> {
        if !self.producers.contains_key(new) {
            return Err(IrError::Edit(format!("unknown value '{new}'")));
        }
        for u in self.uses(old) {
            match u.slot {
                Slot::Input(i) => self.set_input(u.node, i, new)?,
                Slot::Implicit => {
                    return Err(IrError::Edit(format!(
                        "'{old}' is read inside a subgraph of node {}",
                        self.dag[u.node].label()
                    )));
                }
            }
        }
        if self.is_output(old) {
            return Err(IrError::Edit(format!(
                "'{old}' is a graph output; outputs keep their names"
            )));
        }
        Ok(())
    }

    /// Makes every reader of `old` read `new`, like
    /// [`Graph::replace_all_uses`]; when `old` is a graph output (a hidden
    /// state, `last_hidden_state`) the output keeps its name: the node that
    /// made it writes a fresh name instead, and `Identity(new)` makes `old`.
    pub fn reroute(&mut self, old: &str, new: &str) -> Result<(), IrError> {
        if !self.is_output(old) {
            return self.replace_all_uses(old, new);
        }
        if !self.producers.contains_key(new) {
            return Err(IrError::Edit(format!("unknown value '{new}'")));
        }
        for u in self.uses(old) {
            match u.slot {
                Slot::Input(i) => self.set_input(u.node, i, new)?,
                Slot::Implicit => {
                    return Err(IrError::Edit(format!(
                        "'{old}' is read inside a subgraph of node {}",
                        self.dag[u.node].label()
                    )));
                }
            }
        }
        let Some(Producer::Node(id, slot)) = self.producers.get(old).copied() else {
            return Err(IrError::Edit(format!(
                "graph output '{old}' is not computed by a node"
            )));
        };
        let fresh = self.fresh_name(&format!("{old}.replaced"));
        self.dag[id].proto.output[slot] = fresh.clone();
        self.producers.remove(old);
        self.producers.insert(fresh, Producer::Node(id, slot));
        let name = self.fresh_node_name(&format!("{old}/keep_output_name"));
        self.add_node(NodeProto {
            op_type: Some("Identity".into()),
            name: Some(name),
            input: vec![new.to_string()],
            output: vec![old.to_string()],
            ..Default::default()
        })?;
        Ok(())
    }

    /// Removes a node. Its outputs must no longer be read.
    pub fn remove_node(&mut self, id: NodeId) -> Result<Node, IrError> {
        let node = self
            .dag
            .node_weight(id)
            .ok_or_else(|| IrError::Edit("node does not exist".into()))?;
        for output in node.proto.output.iter().filter(|o| !o.is_empty()) {
            if self.uses.get(output).is_some_and(|u| !u.is_empty()) || self.is_output(output) {
                return Err(IrError::Edit(format!(
                    "'{output}' of node {} is still read",
                    node.label()
                )));
            }
        }
        let node = self.dag.remove_node(id).expect("checked above");
        for output in node.proto.output.iter().filter(|o| !o.is_empty()) {
            self.producers.remove(output);
            self.uses.remove(output);
        }
        let reads = node
            .proto
            .input
            .iter()
            .enumerate()
            .map(|(i, v)| (Slot::Input(i), v));
        let implicit = node.implicit_inputs.iter().map(|v| (Slot::Implicit, v));
        for (slot, value) in reads.chain(implicit).filter(|(_, v)| !v.is_empty()) {
            if let Some(list) = self.uses.get_mut(value) {
                list.retain(|u| !(u.node == id && u.slot == slot));
            }
        }
        Ok(node)
    }

    /// Gives node `id` an output at `slot` (which must be unused) named
    /// `name` (which must be new); for optional outputs such as
    /// SkipLayerNormalization's residual sum.
    pub fn add_output(&mut self, id: NodeId, slot: usize, name: &str) -> Result<(), IrError> {
        if self.producers.contains_key(name) {
            return Err(IrError::Edit(format!("value '{name}' already exists")));
        }
        let node = self
            .dag
            .node_weight_mut(id)
            .ok_or_else(|| IrError::Edit("node does not exist".into()))?;
        if node.proto.output.get(slot).is_some_and(|o| !o.is_empty()) {
            return Err(IrError::Edit(format!(
                "output {slot} of node {} is in use",
                node.label()
            )));
        }
        if node.proto.output.len() <= slot {
            node.proto.output.resize(slot + 1, String::new());
        }
        node.proto.output[slot] = name.to_string();
        self.producers
            .insert(name.to_string(), Producer::Node(id, slot));
        Ok(())
    }

    /// Sets (or adds) an attribute of node `id`. Attributes never name
    /// values of this graph, so edges are unaffected.
    pub fn set_attribute(&mut self, id: NodeId, attribute: AttributeProto) -> Result<(), IrError> {
        let node = self
            .dag
            .node_weight_mut(id)
            .ok_or_else(|| IrError::Edit("node does not exist".into()))?;
        if attribute.g.is_some() || !attribute.graphs.is_empty() {
            return Err(IrError::Edit(
                "subgraph attributes cannot be set this way".into(),
            ));
        }
        match node
            .proto
            .attribute
            .iter_mut()
            .find(|a| a.name == attribute.name)
        {
            Some(existing) => *existing = attribute,
            None => node.proto.attribute.push(attribute),
        }
        Ok(())
    }

    /// Adds (or replaces) an initializer.
    pub fn set_initializer(&mut self, tensor: Tensor) -> Result<(), IrError> {
        let name = tensor.name().to_string();
        match self.producers.get(&name) {
            None | Some(Producer::Initializer) | Some(Producer::Input) => {}
            Some(_) => return Err(IrError::Edit(format!("'{name}' is produced by a node"))),
        }
        self.producers.insert(name.clone(), Producer::Initializer);
        self.initializers.insert(name, tensor);
        Ok(())
    }

    /// A node name no node has yet, derived from `base` (runtimes refuse
    /// models with two nodes of one name).
    pub fn fresh_node_name(&self, base: &str) -> String {
        let taken: HashSet<&str> = self.dag.node_weights().map(|n| n.name()).collect();
        if !taken.contains(base) {
            return base.to_string();
        }
        (1u64..)
            .map(|i| format!("{base}_{i}"))
            .find(|n| !taken.contains(n.as_str()))
            .expect("an unused name exists")
    }

    /// A value name not used anywhere yet, derived from `base`.
    pub fn fresh_name(&self, base: &str) -> String {
        if !self.producers.contains_key(base) {
            return base.to_string();
        }
        (1u64..)
            .map(|i| format!("{base}_{i}"))
            .find(|n| !self.producers.contains_key(n))
            .expect("an unused name exists")
    }

    /// Removes nodes, initializers, value_info entries and quantization
    /// annotations that no graph output needs. Graph inputs stay (they are
    /// the model's interface). Returns how many of each were removed.
    pub fn eliminate_dead_code(&mut self) -> DeadCode {
        let mut live: HashSet<NodeId> = HashSet::new();
        let mut stack: Vec<NodeId> = self
            .outputs
            .iter()
            .filter_map(|o| self.producer_node(o.name()))
            .collect();
        while let Some(id) = stack.pop() {
            if live.insert(id) {
                stack.extend(self.dag.neighbors_directed(id, Direction::Incoming));
            }
        }
        let dead: Vec<NodeId> = self
            .dag
            .node_indices()
            .filter(|id| !live.contains(id))
            .collect();
        let mut removed = DeadCode {
            nodes: dead.len(),
            ..Default::default()
        };
        for id in dead {
            let node = self.dag.remove_node(id).expect("listed above");
            for output in node.proto.output.iter().filter(|o| !o.is_empty()) {
                self.producers.remove(output);
                self.uses.remove(output);
            }
        }
        // Drop uses whose reader is gone.
        for list in self.uses.values_mut() {
            list.retain(|u| self.dag.contains_node(u.node));
        }
        let interface: HashSet<&str> = self
            .inputs
            .iter()
            .chain(&self.outputs)
            .map(|v| v.name())
            .collect();
        let dead_initializers: Vec<String> = self
            .initializers
            .keys()
            .filter(|n| {
                !interface.contains(n.as_str()) && self.uses.get(*n).is_none_or(|u| u.is_empty())
            })
            .cloned()
            .collect();
        removed.initializers = dead_initializers.len();
        for name in dead_initializers {
            self.initializers.shift_remove(&name);
            self.producers.remove(&name);
            self.uses.remove(&name);
        }
        let before = self.sparse_initializers.len();
        let uses = &self.uses;
        let producers = &mut self.producers;
        self.sparse_initializers.retain(|s| {
            let name = s.values.as_ref().map(|v| v.name()).unwrap_or_default();
            let keep = interface.contains(name) || uses.get(name).is_some_and(|u| !u.is_empty());
            if !keep {
                producers.remove(name);
            }
            keep
        });
        removed.initializers += before - self.sparse_initializers.len();
        let before = self.value_info.len();
        self.value_info
            .retain(|name, _| producers.contains_key(name));
        removed.value_info = before - self.value_info.len();
        self.quantization_annotation
            .retain(|a| producers.contains_key(a.tensor_name()));
        removed
    }

    /// Re-checks every invariant from scratch (edges, producers, acyclicity).
    /// Costly (it rebuilds the graph): the rewrite passes run it after each
    /// pass in debug builds and when validation is asked for.
    pub fn check(&self) -> Result<(), IrError> {
        let rebuilt = Graph::from_proto(self.to_proto())?;
        let mut problems = Vec::new();
        for id in self.dag.node_indices() {
            let node = &self.dag[id];
            let expected = node
                .proto
                .input
                .iter()
                .chain(&node.implicit_inputs)
                .filter(|v| !v.is_empty())
                .count();
            let edges = self.dag.edges_directed(id, Direction::Incoming).count();
            let from_sources = node
                .proto
                .input
                .iter()
                .chain(&node.implicit_inputs)
                .filter(|v| {
                    !v.is_empty() && !matches!(self.producers.get(*v), Some(Producer::Node(..)))
                })
                .count();
            if edges + from_sources != expected {
                problems.push(format!(
                    "node {} has {edges} edges for {expected} reads",
                    node.label()
                ));
            }
        }
        if rebuilt.node_count() != self.node_count() {
            problems.push("node count changed on rebuild".into());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(IrError::Invalid(problems))
        }
    }

    fn connect(&mut self, value: &str, u: Use) {
        self.uses.entry(value.to_string()).or_default().push(u);
        if let Some(Producer::Node(from, _)) = self.producers.get(value) {
            self.dag.add_edge(*from, u.node, value.to_string());
        }
    }

    fn disconnect(&mut self, value: &str, u: Use) {
        if let Some(list) = self.uses.get_mut(value)
            && let Some(pos) = list.iter().position(|x| *x == u)
        {
            list.remove(pos);
        }
        if let Some(Producer::Node(from, _)) = self.producers.get(value) {
            let edge: Option<EdgeIndex> = self
                .dag
                .edges_connecting(*from, u.node)
                .find(|e| e.weight() == value)
                .map(|e| e.id());
            if let Some(edge) = edge {
                self.dag.remove_edge(edge);
            }
        }
    }
}

/// What [`Graph::eliminate_dead_code`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeadCode {
    /// Operator nodes.
    pub nodes: usize,
    /// Initializers (dense and sparse).
    pub initializers: usize,
    /// `value_info` entries.
    pub value_info: usize,
}

impl DeadCode {
    /// Adds what another elimination removed.
    pub fn add(&mut self, other: DeadCode) {
        self.nodes += other.nodes;
        self.initializers += other.initializers;
        self.value_info += other.value_info;
    }
}

/// Inputs (present, non-empty names) and outputs an operator needs at the
/// least, for the operators the passes look into: a node with fewer is not
/// valid ONNX (the checker refuses it too), and refusing it here keeps every
/// later stage free to read the slots the operator defines.
fn arity_problem(node: &Node) -> Option<String> {
    let op = node.proto.op_type();
    let domain = node.proto.domain();
    let inputs = match (domain, op) {
        (
            "" | "ai.onnx",
            "MatMul" | "Add" | "Sub" | "Mul" | "Div" | "Pow" | "Gather" | "Reshape"
            | "LayerNormalization" | "Expand" | "Equal" | "Less" | "Greater" | "LessOrEqual"
            | "GreaterOrEqual" | "And" | "Or" | "Xor" | "Mod" | "PRelu" | "BitShift" | "Tile"
            | "QuantizeLinear" | "DequantizeLinear",
        ) => 2,
        ("" | "ai.onnx", "Range") => 3,
        ("" | "ai.onnx", "Gemm") => 2,
        ("" | "ai.onnx", "Where") => 3,
        (
            "" | "ai.onnx",
            "Softmax" | "Transpose" | "Cast" | "Identity" | "Squeeze" | "Unsqueeze" | "Erf"
            | "Sigmoid" | "Tanh" | "Sqrt" | "Relu" | "Gelu" | "Concat" | "Split" | "Slice"
            | "Dropout" | "Shape" | "Size" | "Neg" | "Exp" | "ReduceMean" | "Abs" | "Reciprocal"
            | "Floor" | "Ceil" | "Not" | "ConstantOfShape" | "Max" | "Min" | "Sum" | "Mean",
        ) => 1,
        ("com.microsoft", "SkipLayerNormalization" | "SkipSimplifiedLayerNormalization") => 3,
        ("com.microsoft", "Attention" | "BiasGelu") => 2,
        ("com.microsoft", "GroupQueryAttention") => 1,
        ("com.microsoft", "FastGelu") => 1,
        _ => 0,
    };
    let present = node
        .proto
        .input
        .iter()
        .take(inputs)
        .filter(|v| !v.is_empty())
        .count();
    if present < inputs {
        return Some(format!(
            "node {} has {present} of the {inputs} inputs {op} requires",
            node.label()
        ));
    }
    if !node.proto.output.iter().any(|o| !o.is_empty()) {
        return Some(format!("node {} has no output", node.label()));
    }
    if inputs > 0 && node.proto.output.first().is_none_or(|o| o.is_empty()) {
        return Some(format!("node {} has no first output", node.label()));
    }
    None
}

/// Outer-scope names read by the subgraphs of `node`, in first-use order.
pub fn implicit_inputs(node: &NodeProto) -> Vec<String> {
    let mut free = IndexSet::new();
    for attribute in &node.attribute {
        for graph in attribute.g.iter().chain(&attribute.graphs) {
            free_names(graph, &mut free);
        }
    }
    free.into_iter().collect()
}

/// Adds to `free` the names `graph` reads without defining them.
fn free_names(graph: &GraphProto, free: &mut IndexSet<String>) {
    let mut defined: HashSet<&str> = HashSet::new();
    defined.extend(graph.input.iter().map(|v| v.name()));
    defined.extend(graph.initializer.iter().map(|t| t.name()));
    defined.extend(
        graph
            .sparse_initializer
            .iter()
            .filter_map(|s| s.values.as_ref().map(|v| v.name())),
    );
    for node in &graph.node {
        defined.extend(node.output.iter().map(String::as_str));
    }
    let mut reads: IndexSet<String> = IndexSet::new();
    for node in &graph.node {
        reads.extend(node.input.iter().filter(|v| !v.is_empty()).cloned());
        reads.extend(implicit_inputs(node));
    }
    reads.extend(graph.output.iter().map(|o| o.name().to_string()));
    for name in reads {
        if !defined.contains(name.as_str()) {
            free.insert(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::proto::{
        AttributeProto, TensorProto, TypeProto, type_proto::Tensor as TensorType,
    };

    fn node(op: &str, name: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
        NodeProto {
            op_type: Some(op.into()),
            name: Some(name.into()),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn info(name: &str) -> ValueInfoProto {
        ValueInfoProto {
            name: Some(name.into()),
            r#type: Some(TypeProto {
                value: Some(type_proto::Value::TensorType(TensorType {
                    elem_type: Some(1),
                    shape: None,
                })),
                denotation: None,
            }),
            ..Default::default()
        }
    }

    fn weight(name: &str) -> TensorProto {
        TensorProto {
            name: Some(name.into()),
            data_type: Some(1),
            dims: vec![1],
            float_data: vec![2.0],
            ..Default::default()
        }
    }

    /// x -> Mul(w) -> a -> Relu -> y ; plus a dead branch a -> Neg -> dead.
    fn sample() -> GraphProto {
        GraphProto {
            node: vec![
                node("Mul", "mul", &["x", "w"], &["a"]),
                node("Neg", "neg", &["a"], &["dead"]),
                node("Relu", "relu", &["a"], &["y"]),
            ],
            initializer: vec![weight("w"), weight("unused")],
            input: vec![info("x")],
            output: vec![info("y")],
            value_info: vec![info("a"), info("dead")],
            ..Default::default()
        }
    }

    #[test]
    fn round_trip_is_identity() {
        let proto = sample();
        assert_eq!(Graph::from_proto(proto.clone()).unwrap().to_proto(), proto);
    }

    #[test]
    fn dead_code_goes() {
        let mut g = Graph::from_proto(sample()).unwrap();
        let removed = g.eliminate_dead_code();
        assert_eq!(
            removed,
            DeadCode {
                nodes: 1,
                initializers: 1,
                value_info: 1
            }
        );
        let proto = g.to_proto();
        assert_eq!(proto.node.len(), 2);
        assert_eq!(proto.initializer.len(), 1);
        assert_eq!(proto.value_info.len(), 1);
        g.check().unwrap();
    }

    #[test]
    fn bypassing_a_node_then_dce() {
        let mut g = Graph::from_proto(sample()).unwrap();
        g.replace_all_uses("a", "x").unwrap();
        g.eliminate_dead_code();
        let proto = g.to_proto();
        assert_eq!(proto.node.len(), 1);
        assert_eq!(proto.node[0].input, vec!["x"]);
        assert!(proto.initializer.is_empty());
        g.check().unwrap();
    }

    #[test]
    fn operators_with_too_few_inputs_are_refused() {
        // Variadic Max needs one, Mod and DequantizeLinear two, Range three.
        for (op, inputs) in [
            ("Max", &[][..]),
            ("Mod", &["a"][..]),
            ("DequantizeLinear", &["a"][..]),
            ("Range", &["a", "a"][..]),
        ] {
            let mut proto = sample();
            proto.node.push(node(op, "short", inputs, &["extra"]));
            let msg = Graph::from_proto(proto).unwrap_err().to_string();
            assert!(
                msg.contains(&format!("inputs {op} requires")),
                "{op}: {msg}"
            );
        }
        // One input is a whole Max.
        let mut proto = sample();
        proto.node.push(node("Max", "max", &["a"], &["extra"]));
        assert!(Graph::from_proto(proto).is_ok());
    }

    #[test]
    fn problems_are_listed_together() {
        let mut proto = sample();
        proto.node.push(node("Add", "add", &["ghost", "a"], &["y"]));
        proto.output.push(info("nowhere"));
        let msg = Graph::from_proto(proto).unwrap_err().to_string();
        assert!(msg.contains("'ghost'"), "{msg}");
        assert!(msg.contains("more than one producer"), "{msg}");
        assert!(msg.contains("'nowhere'"), "{msg}");
    }

    #[test]
    fn cycles_are_refused() {
        let proto = GraphProto {
            node: vec![
                node("Add", "a", &["x", "q"], &["p"]),
                node("Relu", "b", &["p"], &["q"]),
            ],
            input: vec![info("x")],
            output: vec![info("q")],
            ..Default::default()
        };
        assert!(matches!(Graph::from_proto(proto), Err(IrError::Cycle(_))));
    }

    #[test]
    fn unsorted_nodes_are_sorted_stably() {
        let mut proto = sample();
        proto.node.swap(0, 2);
        let g = Graph::from_proto(proto).unwrap();
        let names: Vec<String> = g
            .to_proto()
            .node
            .iter()
            .map(|n| n.name().to_string())
            .collect();
        assert_eq!(names, ["mul", "relu", "neg"]);
    }

    #[test]
    fn subgraph_reads_keep_outer_values_alive() {
        let body = GraphProto {
            node: vec![node("Identity", "inner", &["w"], &["out"])],
            output: vec![info("out")],
            ..Default::default()
        };
        let mut if_node = node("If", "if", &["cond"], &["y"]);
        if_node.attribute.push(AttributeProto {
            name: Some("then_branch".into()),
            r#type: Some(5),
            g: Some(body.clone()),
            ..Default::default()
        });
        if_node.attribute.push(AttributeProto {
            name: Some("else_branch".into()),
            r#type: Some(5),
            g: Some(body),
            ..Default::default()
        });
        let proto = GraphProto {
            node: vec![if_node],
            initializer: vec![weight("w")],
            input: vec![info("cond")],
            output: vec![info("y")],
            ..Default::default()
        };
        let mut g = Graph::from_proto(proto).unwrap();
        let if_id = g.producer_node("y").unwrap();
        assert_eq!(g.node(if_id).implicit_inputs, vec!["w"]);
        assert_eq!(
            g.uses("w"),
            vec![Use {
                node: if_id,
                slot: Slot::Implicit
            }]
        );
        assert_eq!(g.eliminate_dead_code(), DeadCode::default());
        assert!(g.replace_all_uses("w", "cond").is_err());
    }

    #[test]
    fn edits_keep_invariants() {
        let mut g = Graph::from_proto(sample()).unwrap();
        let id = g.add_node(node("Sigmoid", "sig", &["a"], &["s"])).unwrap();
        assert!(
            g.add_node(node("Sigmoid", "again", &["a"], &["s"]))
                .is_err()
        );
        assert!(
            g.add_node(node("Sigmoid", "bad", &["missing"], &["t"]))
                .is_err()
        );
        let relu = g.producer_node("y").unwrap();
        g.set_input(relu, 0, "s").unwrap();
        assert_eq!(g.consumers("s"), vec![relu]);
        assert!(g.remove_node(id).is_err(), "s is still read");
        g.check().unwrap();
        assert_eq!(g.fresh_name("a"), "a_1");
    }
}
