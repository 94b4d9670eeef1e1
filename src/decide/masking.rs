//! `unstructured` mode, the paper's one-shot masking: weights with the
//! smallest |w| · ID (ID of the linear layer's output) are zeroed, at one
//! global quantile over all block weight matrices of both towers. Layers
//! with a high ID keep more of their weights. Nothing is removed.

use std::collections::BTreeMap;

use serde::Serialize;

use super::DecideError;
use crate::arch::TowerKind;
use crate::ir::Graph;
use crate::measure::LinearId;
use crate::plan::{BlockAction, Plan};

/// The unstructured masking of one linear layer.
#[derive(Debug, Clone, Serialize)]
pub struct Mask {
    /// Tower.
    pub tower: TowerKind,
    /// Block index.
    pub block: usize,
    /// `q`, `k`, `v`, `qkv`, `out`, `fc1` or `fc2`.
    pub role: &'static str,
    /// Intrinsic dimension of the layer's output.
    pub id: f64,
    /// Weights with |w| below this are zeroed (the global |w|·ID quantile
    /// divided by `id`).
    pub threshold: f64,
    /// Weights zeroed.
    pub zeroed: u64,
    /// Weights in the layer.
    pub total: u64,
}

/// The plan zeroing `sparsity` of all the weights of `layers` (each with
/// the ID of its output) by one quantile of |w| · ID, and the masking of
/// every layer.
pub fn mask(
    graph: &Graph,
    layers: &[LinearId],
    sparsity: f64,
) -> Result<(Plan, Vec<Mask>), DecideError> {
    let label = |l: &LinearId| format!("{}/{} {}", l.tower.name(), l.block, l.role);
    let mut weights: Vec<Vec<f32>> = Vec::with_capacity(layers.len());
    for layer in layers {
        let values = layer.weight.values(graph).map(|(v, _)| v).ok_or_else(|| {
            DecideError::Unsupported(format!(
                "{}: weight '{}' cannot be read as numbers",
                label(layer),
                layer.weight.storage
            ))
        })?;
        weights.push(values);
    }
    for layer in layers {
        if !(layer.id.is_finite() && layer.id > 0.0) {
            return Err(DecideError::Unsupported(format!(
                "{}: intrinsic dimension {} cannot weight the magnitudes",
                label(layer),
                layer.id
            )));
        }
    }
    // The global quantile of |w| · ID (f32 keeps the buffer at 4 bytes a
    // weight; the thresholds themselves are f64).
    let mut scores: Vec<f32> = weights
        .iter()
        .zip(layers)
        .flat_map(|(w, l)| w.iter().map(move |v| (v.abs() as f64 * l.id) as f32))
        .collect();
    let cut = ((sparsity * scores.len() as f64).round() as usize).min(scores.len());
    let tau = if cut == 0 {
        0.0
    } else if cut == scores.len() {
        f64::INFINITY
    } else {
        let (_, nth, _) = scores.select_nth_unstable_by(cut, f32::total_cmp);
        *nth as f64
    };
    drop(scores);
    let mut masks = Vec::with_capacity(layers.len());
    let mut actions: BTreeMap<(TowerKind, usize), BlockAction> = BTreeMap::new();
    for (layer, w) in layers.iter().zip(&weights) {
        let threshold = tau / layer.id;
        let zeroed = w.iter().filter(|v| (v.abs() as f64) < threshold).count() as u64;
        masks.push(Mask {
            tower: layer.tower,
            block: layer.block,
            role: layer.role,
            id: layer.id,
            threshold,
            zeroed,
            total: w.len() as u64,
        });
        if zeroed == 0 || !threshold.is_finite() {
            continue;
        }
        actions
            .entry((layer.tower, layer.block))
            .or_insert_with(|| BlockAction {
                zero_below: Some(Default::default()),
                ..BlockAction::new(layer.tower, layer.block)
            })
            .zero_below
            .as_mut()
            .expect("set above")
            .insert(layer.role.to_string(), threshold);
    }
    let plan = Plan {
        blocks: actions.into_values().collect(),
        ..Plan::empty()
    }
    .normalized();
    Ok((plan, masks))
}
