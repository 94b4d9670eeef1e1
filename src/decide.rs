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

/// Settings of the decision stage.
#[derive(Debug, Clone)]
pub struct DecideOptions {
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
    let mask = graph
        .inputs
        .iter()
        .map(|i| i.name().to_string())
        .find(|n| n.contains("mask") && inputs.contains_key(n));

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
    let mut streams: Vec<(TowerKind, usize, usize, usize, usize)> = Vec::new();
    for tower in &arch.towers {
        for block in &tower.blocks {
            let x = tap(block.input().to_string(), tower.kind, &mut taps);
            let h_value =
                residual_value(&mut model, block, &block.attention.join).map_err(graph_err)?;
            let h = tap(h_value, tower.kind, &mut taps);
            let y_value = residual_value(&mut model, block, &block.mlp.join).map_err(graph_err)?;
            let y = tap(y_value, tower.kind, &mut taps);
            streams.push((tower.kind, block.index, x, h, y));
        }
    }
    let pairs: Vec<(usize, usize)> = streams
        .iter()
        .flat_map(|&(_, _, x, h, y)| [(x, h), (h, y)])
        .collect();
    let measured: Vec<usize> = {
        let mut m: Vec<usize> = streams.iter().flat_map(|&(_, _, _, h, y)| [h, y]).collect();
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
    // One pass measures influence and gathers the ID features when they fit
    // in memory; otherwise influence first, then features in several passes.
    let bytes: u64 = feature_bytes(
        &model,
        &decision_inputs,
        &id_taps,
        samples,
        &profile_options,
    )?
    .iter()
    .sum();
    let (cosines, estimates, provider) = if bytes <= options.profile.max_memory {
        let pass = collect::collect_all(
            &model,
            &decision_inputs,
            samples,
            &taps,
            &measured,
            &pairs,
            options.profile.pooling,
            &options.profile.runtime,
        )?;
        let estimates = estimate_matrices(&pass.features, &labels, &options.profile.id)?;
        (pass.cosines, estimates, pass.provider)
    } else {
        let (cosines, provider) = collect::mean_cosines(
            &model,
            &decision_inputs,
            samples,
            &taps,
            &pairs,
            &options.profile.runtime,
        )?;
        let (estimates, _) = estimate_taps(
            &model,
            &decision_inputs,
            &id_taps,
            &labels,
            &profile_options,
        )?;
        (cosines, estimates, provider)
    };
    let id_of = |tap: usize| estimates[measured.binary_search(&tap).expect("measured")].id;

    let mut candidates = Vec::new();
    for (s, &(tower, block_index, _, h, y)) in streams.iter().enumerate() {
        let block = &arch.tower(tower).expect("tower exists").blocks[block_index];
        for (part, cos, id) in [
            (Part::Attention, cosines[2 * s], id_of(h)),
            (Part::Mlp, cosines[2 * s + 1], id_of(y)),
        ] {
            candidates.push(Candidate {
                tower,
                block: block_index,
                part,
                params: importance::sub_block_params(graph, block, part),
                id,
                influence: 1.0 - cos,
                magnitude: importance::sub_block_magnitude(graph, block, part),
                score: 0.0,
                removed: false,
            });
        }
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
