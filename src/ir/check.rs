//! Validation of an edited graph against the graph before the edit: what
//! a rewrite pass must never break.
//!
//! - the graph's own invariants ([`Graph::check`]);
//! - the interface: graph inputs and outputs keep their names, order and
//!   declared types (a pruned model is a drop-in replacement), except the
//!   key/value cache entries of pruned layers, which may go or narrow;
//! - rerouted values: when every reader of one value was moved to another,
//!   the two have the same element type and compatible shapes where both
//!   are declared (a residual bypass must not connect a stream of another
//!   width);
//! - no orphans, once cleanup has run: every initializer is read (or is
//!   part of the interface), every `value_info` names a value that exists.

use super::graph::{Dim, Graph, IrError, Producer, ValueType};

/// What an edit is checked against.
#[derive(Debug, Clone, Copy)]
pub struct EditCheck<'a> {
    /// The graph before the edit.
    pub before: &'a Graph,
    /// Values whose readers were moved: (old, new).
    pub reroutes: &'a [(String, String)],
    /// Whether unread initializers and stale `value_info` may remain (dead
    /// code is removed by a later step).
    pub orphans_allowed: bool,
    /// Graph inputs and outputs the edit may remove or re-type (the caches
    /// of dropped or head-pruned decoder layers).
    pub interface_changes: &'a [String],
}

impl Graph {
    /// Checks this graph, the result of an edit, against `check`. Every
    /// problem found is listed.
    pub fn check_edit(&self, check: &EditCheck<'_>) -> Result<(), IrError> {
        self.check()?;
        let mut problems = Vec::new();
        let before = check.before;
        for (what, now, was) in [
            ("input", &self.inputs, &before.inputs),
            ("output", &self.outputs, &before.outputs),
        ] {
            let fixed = |list: &'_ [crate::onnx::proto::ValueInfoProto]| {
                list.iter()
                    .filter(|v| !check.interface_changes.iter().any(|c| c == v.name()))
                    .cloned()
                    .collect::<Vec<_>>()
            };
            let (now, was) = (fixed(now), fixed(was));
            let names = |list: &[crate::onnx::proto::ValueInfoProto]| -> Vec<String> {
                list.iter().map(|v| v.name().to_string()).collect()
            };
            if names(&now) != names(&was) {
                problems.push(format!(
                    "graph {what}s changed from {:?} to {:?}",
                    names(&was),
                    names(&now)
                ));
            } else if now != was {
                problems.push(format!("the declared types of the graph {what}s changed"));
            }
        }
        for (old, new) in check.reroutes {
            let (Some(a), Some(b)) = (before.value_type(old), self.value_type(new)) else {
                continue;
            };
            if let Some(problem) = mismatch(&a, &b) {
                problems.push(format!("'{old}' was replaced by '{new}', but {problem}"));
            }
        }
        if !check.orphans_allowed {
            problems.extend(self.orphans());
        }
        let before_duplicates = duplicate_node_names(before);
        for name in duplicate_node_names(self) {
            if !before_duplicates.contains(&name) {
                problems.push(format!("two nodes are named '{name}'"));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(IrError::Invalid(problems))
        }
    }

    /// Nodes no graph output needs, initializers nothing reads (and that
    /// are not graph inputs or outputs), and `value_info` entries naming no
    /// value.
    pub fn orphans(&self) -> Vec<String> {
        let mut live = std::collections::HashSet::new();
        let mut stack: Vec<_> = self
            .outputs
            .iter()
            .filter_map(|o| self.producer_node(o.name()))
            .collect();
        while let Some(id) = stack.pop() {
            if !live.insert(id) {
                continue;
            }
            let node = self.node(id);
            for value in node.inputs().iter().chain(&node.implicit_inputs) {
                stack.extend(self.producer_node(value));
            }
        }
        let dead = self
            .nodes()
            .into_iter()
            .filter(|id| !live.contains(id))
            .map(|id| {
                format!(
                    "node {} computes nothing an output needs",
                    self.node(id).label()
                )
            });
        let interface: std::collections::HashSet<&str> = self
            .inputs
            .iter()
            .chain(&self.outputs)
            .map(|v| v.name())
            .collect();
        let mut problems: Vec<String> = dead.collect();
        problems.extend(
            self.initializers()
                .filter(|(name, _)| !interface.contains(name) && self.uses(name).is_empty())
                .map(|(name, _)| format!("initializer '{name}' is read by nothing")),
        );
        problems.extend(
            self.value_info
                .keys()
                .filter(|name| {
                    !matches!(
                        self.producer(name),
                        Some(Producer::Node(..) | Producer::Input | Producer::Initializer)
                    )
                })
                .map(|name| format!("value_info '{name}' names no value")),
        );
        problems
    }
}

/// Node names used by more than one node (runtimes refuse such models).
fn duplicate_node_names(graph: &Graph) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    let mut duplicates = std::collections::BTreeSet::new();
    for id in graph.nodes() {
        let name = graph.node(id).name();
        if !name.is_empty() && !seen.insert(name.to_string()) {
            duplicates.insert(name.to_string());
        }
    }
    duplicates.into_iter().collect()
}

/// Why a value of type `b` cannot stand in for one of type `a`, if it
/// cannot: element types differ, ranks differ, or a fixed size differs.
fn mismatch(a: &ValueType, b: &ValueType) -> Option<String> {
    if a.elem_type != 0 && b.elem_type != 0 && a.elem_type != b.elem_type {
        return Some(format!(
            "their element types differ ({} vs {})",
            crate::onnx::dtype::name(a.elem_type),
            crate::onnx::dtype::name(b.elem_type)
        ));
    }
    let (Some(sa), Some(sb)) = (&a.shape, &b.shape) else {
        return None;
    };
    if sa.len() != sb.len() {
        return Some(format!("their ranks differ ({} vs {})", sa.len(), sb.len()));
    }
    for (axis, (x, y)) in sa.iter().zip(sb).enumerate() {
        if let (Dim::Fixed(x), Dim::Fixed(y)) = (x, y)
            && x != y
        {
            return Some(format!("axis {axis} differs ({x} vs {y})"));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::proto::{
        GraphProto, NodeProto, TensorProto, TypeProto, ValueInfoProto, tensor_shape_proto,
        type_proto,
    };

    fn info(name: &str, dims: &[i64]) -> ValueInfoProto {
        ValueInfoProto {
            name: Some(name.into()),
            r#type: Some(TypeProto {
                value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                    elem_type: Some(1),
                    shape: Some(crate::onnx::proto::TensorShapeProto {
                        dim: dims
                            .iter()
                            .map(|&d| tensor_shape_proto::Dimension {
                                value: Some(tensor_shape_proto::dimension::Value::DimValue(d)),
                                ..Default::default()
                            })
                            .collect(),
                    }),
                })),
                denotation: None,
            }),
            ..Default::default()
        }
    }

    fn add(name: &str, a: &str, b: &str, out: &str) -> NodeProto {
        NodeProto {
            op_type: Some("Add".into()),
            name: Some(name.into()),
            input: vec![a.into(), b.into()],
            output: vec![out.into()],
            ..Default::default()
        }
    }

    fn weight(name: &str, n: i64) -> TensorProto {
        TensorProto {
            name: Some(name.into()),
            data_type: Some(1),
            dims: vec![n],
            float_data: vec![0.5; n as usize],
            ..Default::default()
        }
    }

    /// x [2, 4] ─► Add(w) = h [2, 4] ─► Add(v) = y [2, 4]; a side value
    /// z [2, 8] from input u.
    fn graph() -> Graph {
        Graph::from_proto(GraphProto {
            node: vec![
                add("a", "x", "w", "h"),
                add("b", "h", "v", "y"),
                add("c", "u", "u", "z"),
            ],
            initializer: vec![weight("w", 4), weight("v", 4)],
            input: vec![info("x", &[2, 4]), info("u", &[2, 8])],
            output: vec![info("y", &[2, 4]), info("z", &[2, 8])],
            value_info: vec![info("h", &[2, 4])],
            ..Default::default()
        })
        .unwrap()
    }

    fn check<'a>(
        before: &'a Graph,
        reroutes: &'a [(String, String)],
        orphans: bool,
    ) -> EditCheck<'a> {
        EditCheck {
            before,
            reroutes,
            orphans_allowed: orphans,
            interface_changes: &[],
        }
    }

    #[test]
    fn a_bypass_to_a_value_of_the_same_shape_passes() {
        let before = graph();
        let mut after = before.clone();
        after.replace_all_uses("h", "x").unwrap();
        let reroutes = [("h".to_string(), "x".to_string())];
        after.check_edit(&check(&before, &reroutes, true)).unwrap();
        // Until dead code goes, the bypassed Add and its weight are orphans.
        let err = after
            .check_edit(&check(&before, &reroutes, false))
            .unwrap_err()
            .to_string();
        assert!(err.contains("node a (Add) computes nothing"), "{err}");
        after.eliminate_dead_code();
        after.check_edit(&check(&before, &reroutes, false)).unwrap();
    }

    #[test]
    fn a_bypass_to_a_stream_of_another_width_is_caught() {
        let before = graph();
        let mut after = before.clone();
        after.replace_all_uses("h", "u").unwrap();
        let reroutes = [("h".to_string(), "u".to_string())];
        let err = after
            .check_edit(&check(&before, &reroutes, true))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("'h' was replaced by 'u', but axis 1 differs (4 vs 8)"),
            "{err}"
        );
    }

    #[test]
    fn the_interface_may_not_change() {
        let before = graph();
        let mut after = before.clone();
        after.outputs.pop();
        let err = after
            .check_edit(&check(&before, &[], true))
            .unwrap_err()
            .to_string();
        assert!(err.contains("graph outputs changed"), "{err}");
        let mut after = before.clone();
        after.inputs[0] = info("x", &[2, 5]);
        let err = after
            .check_edit(&check(&before, &[], true))
            .unwrap_err()
            .to_string();
        assert!(err.contains("declared types of the graph inputs"), "{err}");
    }

    #[test]
    fn stale_value_info_is_an_orphan() {
        let before = graph();
        let mut after = before.clone();
        after.value_info.insert("gone".into(), info("gone", &[1]));
        let err = after
            .check_edit(&check(&before, &[], false))
            .unwrap_err()
            .to_string();
        assert!(err.contains("value_info 'gone' names no value"), "{err}");
    }
}
