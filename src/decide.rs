//! From calibration to a plan: block influence and intrinsic dimension of
//! every sub-block, then the global-threshold allocation
//! ([`crate::plan::importance`]).
//!
//! The calibration file is split: the first samples (up to `--samples`)
//! drive the decisions; the last ones (`--holdout`) are kept aside for
//! verification and never seen here.

use std::collections::HashMap;
use std::path::Path;

use crate::arch::{Architecture, TowerKind};
use crate::calib::Provider;
use crate::calib::collect::{self, Tap};
use crate::calib::data::{self, Inputs};
use crate::plan::Plan;
use crate::plan::importance::{self, Candidate, Part, Score};
use crate::profile::{
    ProfileOptions, estimate_matrices, estimate_taps, feature_bytes, residual_value,
};
use crate::{Error, Source};

/// What may be removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Whole blocks and attention/MLP sub-blocks.
    Blocks,
    /// Attention heads and MLP neurons.
    Units,
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

/// Settings of the decision stage.
#[derive(Debug, Clone)]
pub struct DecideOptions {
    /// What may be removed.
    pub mode: Mode,
    /// Fraction of block parameters to keep.
    pub keep: f64,
    /// Importance score.
    pub score: Score,
    /// Held-out samples reserved for verification (taken from the end).
    pub holdout: usize,
    /// Calibration, pooling, ID and memory settings (`samples` is the most
    /// used for decisions).
    pub profile: ProfileOptions,
}

/// What the decision stage found and chose.
#[derive(Debug, Clone)]
pub struct Decision {
    /// The plan.
    pub plan: Plan,
    /// Every sub-block with its measurements.
    pub candidates: Vec<Candidate>,
    /// Samples used for decisions.
    pub samples: usize,
    /// Held-out inputs for verification.
    pub holdout: Inputs,
    /// Number of held-out samples.
    pub holdout_samples: usize,
    /// The provider that ran calibration.
    pub provider: Provider,
}

/// Measures every sub-block of `source` on `calib` and allocates.
pub fn decide(
    source: &Source,
    arch: &Architecture,
    calib: &Path,
    options: &DecideOptions,
) -> Result<Decision, Error> {
    let graph = &source.model.graph;
    let (inputs, total) = data::read_npz(calib, graph)?;
    let holdout_samples = if total >= 8 {
        options.holdout.min(total / 4)
    } else {
        0
    };
    let samples = options.profile.samples.min(total - holdout_samples);
    if samples < 8 {
        return Err(Error::Data(data::DataError::Mismatch {
            path: calib.to_path_buf(),
            reason: format!(
                "{total} samples leave {samples} for decisions after {holdout_samples} held out; at least 8 are needed"
            ),
        }));
    }
    let decision_inputs: Inputs = inputs
        .iter()
        .map(|(k, v)| (k.clone(), v.rows(0, samples)))
        .collect();
    let holdout: Inputs = inputs
        .iter()
        .map(|(k, v)| (k.clone(), v.rows(total - holdout_samples, total)))
        .collect();
    let mask = data::mask_input(graph, &inputs);

    // Taps: every block's input, its stream after attention, its output.
    let mut model = source.model.clone();
    let mut taps: Vec<Tap> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut tap = |value: String, tower: TowerKind, taps: &mut Vec<Tap>| -> usize {
        *index.entry(value.clone()).or_insert_with(|| {
            let mask = (tower == TowerKind::Text).then(|| mask.clone()).flatten();
            taps.push(Tap { value, mask });
            taps.len() - 1
        })
    };
    let graph_err = |error| Error::Graph {
        path: source.file.path.clone(),
        error,
    };
    // Per block: stream in (x), after attention (h), out (y); for unit
    // scores also the merged attention context and the MLP activation.
    let mut streams: Vec<Streams> = Vec::new();
    for tower in &arch.towers {
        for block in &tower.blocks {
            let x = tap(block.input().to_string(), tower.kind, &mut taps);
            let h_value =
                residual_value(&mut model, block, &block.attention.join).map_err(graph_err)?;
            let h = tap(h_value, tower.kind, &mut taps);
            let y_value = residual_value(&mut model, block, &block.mlp.join).map_err(graph_err)?;
            let y = tap(y_value, tower.kind, &mut taps);
            let (context, activation) = if options.mode == Mode::Units {
                (
                    Some(tap(
                        block.attention.body.out.input.clone(),
                        tower.kind,
                        &mut taps,
                    )),
                    Some(tap(block.mlp.body.fc2.input.clone(), tower.kind, &mut taps)),
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
    let pairs: Vec<(usize, usize)> = streams
        .iter()
        .flat_map(|s| [(s.x, s.h), (s.h, s.y)])
        .collect();
    let energy_taps: Vec<usize> = streams
        .iter()
        .flat_map(|s| s.context.into_iter().chain(s.activation))
        .collect();
    let measured: Vec<usize> = {
        let mut m: Vec<usize> = streams.iter().flat_map(|s| [s.h, s.y]).collect();
        m.sort_unstable();
        m.dedup();
        m
    };
    let id_taps: Vec<Tap> = measured.iter().map(|&i| taps[i].clone()).collect();
    let labels: Vec<String> = measured.iter().map(|&i| taps[i].value.clone()).collect();
    let profile_options = ProfileOptions {
        samples,
        ..options.profile.clone()
    };
    // One pass measures influence and unit energies and gathers the ID
    // features when they fit in memory; otherwise the features follow in
    // further passes.
    let bytes: u64 = feature_bytes(
        &model,
        &decision_inputs,
        &id_taps,
        samples,
        &profile_options,
    )?
    .iter()
    .sum();
    let fits = bytes <= options.profile.max_memory;
    let request = collect::Request {
        features: if fits { &measured } else { &[] },
        pairs: &pairs,
        energies: &energy_taps,
        pooling: options.profile.pooling,
    };
    let pass = collect::collect_all(
        &model,
        &decision_inputs,
        samples,
        &taps,
        request,
        &options.profile.runtime,
    )?;
    let estimates = if fits {
        estimate_matrices(&pass.features, &labels, &options.profile.id)?
    } else {
        estimate_taps(
            &model,
            &decision_inputs,
            &id_taps,
            &labels,
            &profile_options,
        )?
        .0
    };
    let (cosines, provider) = (pass.cosines, pass.provider);
    let id_of = |tap: usize| estimates[measured.binary_search(&tap).expect("measured")].id;
    let energy_of = |tap: Option<usize>| -> &[f64] {
        tap.and_then(|t| energy_taps.iter().position(|e| *e == t))
            .map_or(&[], |i| pass.energies[i].as_slice())
    };

    let mut candidates = Vec::new();
    let mut units = Vec::new();
    for (s, st) in streams.iter().enumerate() {
        let block = &arch.tower(st.tower).expect("tower exists").blocks[st.block];
        for (part, cos, id) in [
            (Part::Attention, cosines[2 * s], id_of(st.h)),
            (Part::Mlp, cosines[2 * s + 1], id_of(st.y)),
        ] {
            candidates.push(Candidate {
                tower: st.tower,
                block: st.block,
                part,
                params: importance::sub_block_params(graph, block, part),
                id,
                influence: 1.0 - cos,
                magnitude: importance::sub_block_magnitude(graph, block, part),
                score: 0.0,
                removed: false,
                units: None,
            });
        }
        if options.mode == Mode::Units {
            units.extend(importance::unit_candidates(
                graph,
                st.tower,
                block,
                energy_of(st.context),
                energy_of(st.activation),
                id_of(st.h),
                id_of(st.y),
            ));
        }
    }
    if options.mode == Mode::Units {
        let plan = importance::allocate_units(arch, &mut units, &mut candidates, options.keep);
        return Ok(Decision {
            plan,
            candidates,
            samples,
            holdout,
            holdout_samples,
            provider,
        });
    }
    let plan = importance::allocate(arch, &mut candidates, options.score, options.keep);
    Ok(Decision {
        plan,
        candidates,
        samples,
        holdout,
        holdout_samples,
        provider,
    })
}
