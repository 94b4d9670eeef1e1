//! The in-memory graph that discovery reads and rewrites edit.
//!
//! A [`Model`] is the model's header (everything but the main graph, kept as
//! protobuf so nothing is lost) plus a [`Graph`]. The graph holds operator
//! nodes in a petgraph `StableDiGraph` whose edges are the tensors flowing
//! from producer to consumer; graph inputs and initializers are sources
//! without a node. Node protos are kept whole (attributes, subgraphs,
//! metadata, unknown domains), so an unedited graph converts back to the
//! protobuf it came from.
//!
//! Invariants (checked by [`Graph::check`]; [`Graph::check_edit`] also
//! checks an edited graph against the graph before the edit):
//! - every value name has at most one producer;
//! - every non-empty node input names a known value (a graph input, an
//!   initializer or a node output) and has a matching edge;
//! - the graph is acyclic.
//!
//! Subgraphs (If/Loop/Scan bodies) may read outer values by name without
//! listing them as inputs; those reads are recorded as *implicit inputs* with
//! edges of their own, so topological order and dead-code elimination see
//! them.

mod check;
mod graph;
mod tensor;

pub use check::EditCheck;
pub use graph::{
    DeadCode, Dim, Graph, IrError, Node, NodeId, Producer, Slot, Use, ValueType, implicit_inputs,
};
pub use tensor::{Tensor, TensorError};

use crate::onnx::proto::ModelProto;

/// A model: header fields plus the main graph.
#[derive(Debug, Clone)]
pub struct Model {
    /// All `ModelProto` fields except `graph` (opsets, metadata, functions,
    /// training info, doc strings), kept verbatim.
    pub header: ModelProto,
    /// The main graph.
    pub graph: Graph,
}

impl Model {
    /// Builds the IR from a decoded model, validating the main graph.
    pub fn from_proto(mut proto: ModelProto) -> Result<Self, IrError> {
        let graph = proto.graph.take().ok_or(IrError::NoGraph)?;
        Ok(Self {
            header: proto,
            graph: Graph::from_proto(graph)?,
        })
    }

    /// Converts back to protobuf. An unedited model gives back the proto it
    /// was built from.
    pub fn to_proto(&self) -> ModelProto {
        let mut proto = self.header.clone();
        proto.graph = Some(self.graph.to_proto());
        proto
    }

    /// The opset version imported for `domain` ("" or "ai.onnx" for the
    /// default domain).
    pub fn opset(&self, domain: &str) -> Option<i64> {
        let wanted = if domain == "ai.onnx" { "" } else { domain };
        self.header.opset_import.iter().find_map(|o| {
            let d = o.domain();
            let d = if d == "ai.onnx" { "" } else { d };
            (d == wanted).then(|| o.version())
        })
    }

    /// Sets (or adds) a `metadata_props` entry.
    pub fn set_metadata(&mut self, key: &str, value: &str) {
        use crate::onnx::proto::StringStringEntryProto;
        match self
            .header
            .metadata_props
            .iter_mut()
            .find(|e| e.key() == key)
        {
            Some(entry) => entry.value = Some(value.to_string()),
            None => self.header.metadata_props.push(StringStringEntryProto {
                key: Some(key.to_string()),
                value: Some(value.to_string()),
            }),
        }
    }
}
