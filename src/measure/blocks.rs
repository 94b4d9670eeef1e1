//! What the decisions read off a calibration pass.
//!
//! Per block: the residual stream entering it (x), after its attention (h)
//! and leaving it (y). Block influence of a sub-block is 1 − the mean token
//! cosine between the stream entering and leaving it (ShortGPT); its ID is
//! that of the stream it writes. For unit scores, the per-channel energies
//! of the merged attention context and of the MLP activation (the inputs of
//! the output projection and of fc2). Per linear layer (unstructured
//! masking): the ID of its output.

use std::collections::HashMap;

use super::{MeasureError, MeasureOptions, estimate_matrices, estimate_taps, residual_value, tap};
use crate::arch::{Architecture, TowerKind};
use crate::calib::collect;
use crate::calib::{Inputs, Provider, RuntimeOptions, Tap};
use crate::ir::Model;

/// Influence and ID of one sub-block.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SubBlockStats {
    /// Block influence, 1 − cos(stream in, stream out).
    pub influence: f64,
    /// Intrinsic dimension of the stream the sub-block writes.
    pub id: f64,
}

/// The measurements of one block.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockStats {
    /// Tower.
    pub tower: TowerKind,
    /// Block index.
    pub block: usize,
    /// The attention sub-block.
    pub attention: SubBlockStats,
    /// The MLP sub-block.
    pub mlp: SubBlockStats,
    /// Mean square of each channel of the merged attention context (empty
    /// unless units were measured).
    pub context_energy: Vec<f64>,
    /// Mean square of each MLP neuron's activation (empty unless units
    /// were measured).
    pub activation_energy: Vec<f64>,
    /// Mean squared norm per token of the residual stream entering the
    /// attention and the MLP (0 unless units were measured): what a unit's
    /// contribution is compared with.
    pub stream_energy: [f64; 2],
}

/// The measurements of every block, in tower and block order.
#[derive(Debug, Clone)]
pub struct BlockMeasurements {
    /// One entry per block.
    pub blocks: Vec<BlockStats>,
    /// The provider that ran.
    pub provider: Provider,
    /// The second moments asked for by [`RepairTaps::grams`], keyed by
    /// value (`(width + 1)²`, as [`collect::Collected::grams`]).
    pub grams: Vec<(String, ndarray::Array2<f64>)>,
    /// The per-channel means asked for by [`RepairTaps::means`].
    pub means: Vec<(String, Vec<f64>)>,
}

/// Values whose repair statistics the measuring pass gathers too: the
/// repair of candidate plans reads the same activations of the same
/// samples, so one pass serves both instead of a second run of the model.
#[derive(Debug, Clone, Default)]
pub struct RepairTaps {
    /// Values (with their tower) whose token second moments `[a; 1][a; 1]ᵀ`
    /// are accumulated: the inputs of the projections a refit solves for.
    pub grams: Vec<(String, TowerKind)>,
    /// Values whose per-channel means are accumulated: the branches a
    /// removed sub-block's compensation replaces by their mean.
    pub means: Vec<(String, TowerKind)>,
}

/// The tapped values of one block (indices into the pass's taps).
struct Streams {
    tower: TowerKind,
    block: usize,
    x: usize,
    h: usize,
    y: usize,
    context: Option<usize>,
    activation: Option<usize>,
}

/// Measures every block of `model` on the first `options.samples` samples
/// of `inputs` (`mask`: the text padding input); with `units`, also the
/// energies unit scores need. One pass gathers influence and energies,
/// and the ID features when they fit in `options.max_memory`; otherwise the
/// features follow in further passes. The statistics of `repair` are
/// gathered in the same pass.
#[allow(clippy::too_many_arguments)]
pub fn measure_blocks(
    model: &Model,
    arch: &Architecture,
    inputs: &Inputs,
    mask: Option<&str>,
    units: bool,
    repair: &RepairTaps,
    options: &MeasureOptions,
    runtime: &RuntimeOptions,
) -> Result<BlockMeasurements, MeasureError> {
    let samples = options.samples;
    let view = crate::arch::View::new(&model.graph);
    let mut model = model.clone();
    let mut taps: Vec<Tap> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut add = |value: String, tower: TowerKind, taps: &mut Vec<Tap>| -> usize {
        *index.entry(value.clone()).or_insert_with(|| {
            taps.push(tap(&view, value, tower, mask));
            taps.len() - 1
        })
    };
    let mut streams: Vec<Streams> = Vec::new();
    for tower in &arch.towers {
        for block in &tower.blocks {
            let x = add(block.input().to_string(), tower.kind, &mut taps);
            let h_value = residual_value(&mut model, block, &block.attention.join)?;
            let h = add(h_value, tower.kind, &mut taps);
            let y_value = residual_value(&mut model, block, &block.mlp.join)?;
            let y = add(y_value, tower.kind, &mut taps);
            let (context, activation) = if units {
                (
                    Some(add(
                        block.attention.body.out.input.clone(),
                        tower.kind,
                        &mut taps,
                    )),
                    Some(add(block.mlp.body.fc2.input.clone(), tower.kind, &mut taps)),
                )
            } else {
                (None, None)
            };
            streams.push(Streams {
                tower: tower.kind,
                block: block.index,
                x,
                h,
                y,
                context,
                activation,
            });
        }
    }
    let gram_taps: Vec<usize> = repair
        .grams
        .iter()
        .map(|(v, t)| add(v.clone(), *t, &mut taps))
        .collect();
    let mean_taps: Vec<usize> = repair
        .means
        .iter()
        .map(|(v, t)| add(v.clone(), *t, &mut taps))
        .collect();
    let pairs: Vec<(usize, usize)> = streams
        .iter()
        .flat_map(|s| [(s.x, s.h), (s.h, s.y)])
        .collect();
    let mut energy_taps: Vec<usize> = streams
        .iter()
        .flat_map(|s| s.context.into_iter().chain(s.activation))
        .collect();
    if units {
        for s in &streams {
            for t in [s.x, s.h] {
                if !energy_taps.contains(&t) {
                    energy_taps.push(t);
                }
            }
        }
    }
    let measured: Vec<usize> = {
        let mut m: Vec<usize> = streams.iter().flat_map(|s| [s.h, s.y]).collect();
        m.sort_unstable();
        m.dedup();
        m
    };
    let id_taps: Vec<Tap> = measured.iter().map(|&i| taps[i].clone()).collect();
    let labels: Vec<String> = measured.iter().map(|&i| taps[i].value.clone()).collect();
    // The features come with the pass when they fit in memory (the first
    // batch tells); else they are measured in passes of their own.
    let request = collect::Request {
        features: &measured,
        pairs: &pairs,
        energies: &energy_taps,
        grams: &gram_taps,
        means: &mean_taps,
        pooling: options.pooling,
        feature_budget: Some(options.max_memory),
    };
    let mut pass = collect::collect_all(&model, inputs, samples, &taps, request, runtime)?;
    let fits = pass.features.len() == measured.len();
    let estimates = if fits {
        estimate_matrices(&pass.features, &labels, &options.id)?
    } else {
        estimate_taps(&model, inputs, &id_taps, &labels, options, runtime)?.0
    };
    let id_of = |tap: usize| estimates[measured.binary_search(&tap).expect("measured")].id;
    let energy_of = |tap: Option<usize>| -> Vec<f64> {
        tap.and_then(|t| energy_taps.iter().position(|e| *e == t))
            .map_or_else(Vec::new, |i| pass.energies[i].clone())
    };
    let blocks = streams
        .iter()
        .enumerate()
        .map(|(s, st)| BlockStats {
            tower: st.tower,
            block: st.block,
            attention: SubBlockStats {
                influence: 1.0 - pass.cosines[2 * s],
                id: id_of(st.h),
            },
            mlp: SubBlockStats {
                influence: 1.0 - pass.cosines[2 * s + 1],
                id: id_of(st.y),
            },
            context_energy: energy_of(st.context),
            activation_energy: energy_of(st.activation),
            stream_energy: if units {
                [
                    energy_of(Some(st.x)).iter().sum(),
                    energy_of(Some(st.h)).iter().sum(),
                ]
            } else {
                [0.0; 2]
            },
        })
        .collect();
    let value = |(v, _): &(String, TowerKind)| v.clone();
    Ok(BlockMeasurements {
        blocks,
        provider: pass.provider,
        grams: repair
            .grams
            .iter()
            .map(value)
            .zip(std::mem::take(&mut pass.grams))
            .collect(),
        means: repair
            .means
            .iter()
            .map(value)
            .zip(std::mem::take(&mut pass.means))
            .collect(),
    })
}

/// `value`, or when its rows mix the samples (a projection of
/// `nn.MultiheadAttention` on `[tokens · batch, width]`), the reshape of it
/// back to a layout with a batch axis: features for ID are per sample.
fn per_sample(view: &crate::arch::View<'_>, value: &str) -> String {
    if super::layout(view, value) == crate::calib::Layout::Rows
        && let Some((reader, _)) = view.single_reader(value)
        && view.graph.node(reader).op() == "Reshape"
    {
        let out = view.graph.node(reader).outputs()[0].clone();
        if super::layout(view, &out) != crate::calib::Layout::Rows {
            return out;
        }
    }
    value.to_string()
}

/// One linear layer of a block with the ID of its output.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearId {
    /// Tower.
    pub tower: TowerKind,
    /// Block index.
    pub block: usize,
    /// `q`, `k`, `v`, `qkv`, `out`, `fc1` or `fc2`.
    pub role: &'static str,
    /// The weight.
    pub weight: crate::arch::Operand,
    /// Intrinsic dimension of the layer's output.
    pub id: f64,
}

/// The ID of every block linear layer's output of `model`, on the first
/// `options.samples` samples of `inputs`.
pub fn measure_linears(
    model: &Model,
    arch: &Architecture,
    inputs: &Inputs,
    mask: Option<&str>,
    options: &MeasureOptions,
    runtime: &RuntimeOptions,
) -> Result<(Vec<LinearId>, Provider), MeasureError> {
    let view = crate::arch::View::new(&model.graph);
    // (tower, block, role, output value, weight)
    let mut layers = Vec::new();
    for tower in &arch.towers {
        for block in &tower.blocks {
            for l in block.linears() {
                layers.push((
                    tower.kind,
                    block.index,
                    l.role,
                    per_sample(&view, l.output),
                    l.weight.clone(),
                ));
            }
        }
    }
    let taps: Vec<Tap> = layers
        .iter()
        .map(|(tower, _, _, output, _)| tap(&view, output.clone(), *tower, mask))
        .collect();
    let labels: Vec<String> = layers
        .iter()
        .map(|(t, b, r, _, _)| format!("{}/{b} {r}", t.name()))
        .collect();
    let (estimates, provider) = estimate_taps(model, inputs, &taps, &labels, options, runtime)?;
    let ids = layers
        .into_iter()
        .zip(estimates)
        .map(|((tower, block, role, _, weight), e)| LinearId {
            tower,
            block,
            role,
            weight,
            id: e.id,
        })
        .collect();
    Ok((ids, provider))
}
