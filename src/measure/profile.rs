//! The per-layer intrinsic-dimension profile of a model: the ID of every
//! block's output (the residual stream it writes), per tower.

use serde::Serialize;

use super::{MeasureError, MeasureOptions, estimate_taps, residual_value, tap};
use crate::arch::{Architecture, TowerKind};
use crate::calib::{Inputs, Pooling, Provider, RuntimeOptions, Tap};
use crate::id::IdEstimate;
use crate::ir::Model;

/// ID of one block's output.
#[derive(Debug, Clone, Serialize)]
pub struct LayerId {
    /// Block index in its tower.
    pub block: usize,
    /// The estimate (with sample count, dimension, duplicates).
    #[serde(flatten)]
    pub estimate: IdEstimate,
}

/// The profile of one tower.
#[derive(Debug, Clone, Serialize)]
pub struct TowerProfile {
    /// `vision` or `text`.
    pub name: &'static str,
    /// One entry per block, in order.
    pub layers: Vec<LayerId>,
}

/// The profile of a model.
#[derive(Debug, Clone, Serialize)]
pub struct Profile {
    /// Towers, vision first.
    pub towers: Vec<TowerProfile>,
    /// Calibration samples used.
    pub samples: usize,
    /// How token outputs became vectors.
    pub pooling: Pooling,
    /// The execution provider that ran.
    pub provider: Provider,
}

/// Measures the ID of every block output of `model` (whose architecture is
/// `arch`) on the first `options.samples` of `inputs`; `mask` names the
/// text padding input.
pub fn profile(
    model: &Model,
    arch: &Architecture,
    inputs: &Inputs,
    mask: Option<&str>,
    options: &MeasureOptions,
    runtime: &RuntimeOptions,
) -> Result<Profile, MeasureError> {
    // Tap each block's residual stream. A fused join that folded the sum
    // into the next norm (the last block before a final norm) is given its
    // optional sum output, so every block is measured before normalisation.
    let view = crate::arch::View::new(&model.graph);
    let mut model = model.clone();
    let mut taps: Vec<(TowerKind, usize, Tap)> = Vec::new();
    for tower in &arch.towers {
        for block in &tower.blocks {
            let value = residual_value(&mut model, block, &block.mlp.join)?;
            taps.push((tower.kind, block.index, tap(&view, value, tower.kind, mask)));
        }
    }
    let all: Vec<Tap> = taps.iter().map(|t| t.2.clone()).collect();
    let labels: Vec<String> = taps
        .iter()
        .map(|(k, b, _)| format!("{}/{}", k.name(), b))
        .collect();
    let (estimates, provider) = estimate_taps(&model, inputs, &all, &labels, options, runtime)?;
    let mut towers: Vec<TowerProfile> = Vec::new();
    for ((kind, block, _), estimate) in taps.iter().zip(estimates) {
        let layer = LayerId {
            block: *block,
            estimate,
        };
        match towers.iter_mut().find(|t| t.name == kind.name()) {
            Some(t) => t.layers.push(layer),
            None => towers.push(TowerProfile {
                name: kind.name(),
                layers: vec![layer],
            }),
        }
    }
    Ok(Profile {
        towers,
        samples: options.samples,
        pooling: options.pooling,
        provider,
    })
}
