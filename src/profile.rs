//! The per-layer intrinsic-dimension profile of a model: calibrate, tap
//! every block's output, estimate the ID of each.

use std::path::Path;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::arch::{self, TowerKind};
use crate::calib::collect::{self, Pooling, Tap};
use crate::calib::{CalibSource, Provider, RuntimeOptions, data};
use crate::id::{self, IdEstimate, IdOptions};
use crate::{Error, open};

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

/// How to build a profile.
#[derive(Debug, Clone)]
pub struct ProfileOptions {
    /// Samples to use (the first N of the file).
    pub samples: usize,
    /// Pooling.
    pub pooling: Pooling,
    /// ID estimation.
    pub id: IdOptions,
    /// ONNX Runtime.
    pub runtime: RuntimeOptions,
    /// Bytes of features held at once; more taps run in several passes.
    pub max_memory: u64,
}

/// The ID of each tap's pooled values over the first `options.samples`
/// samples. Taps are measured in passes holding at most
/// `options.max_memory` bytes of features (a one-sample probe learns each
/// tap's width first). `labels` name the taps in errors.
pub fn estimate_taps(
    model: &crate::ir::Model,
    inputs: &data::Inputs,
    taps: &[Tap],
    labels: &[String],
    options: &ProfileOptions,
) -> Result<(Vec<IdEstimate>, Provider), Error> {
    let widths = feature_bytes(model, inputs, taps, options.samples, options)?;
    let mut groups: Vec<Vec<usize>> = vec![Vec::new()];
    let mut held = 0u64;
    for (i, &bytes) in widths.iter().enumerate() {
        if held + bytes > options.max_memory && !groups.last().expect("non-empty").is_empty() {
            groups.push(Vec::new());
            held = 0;
        }
        groups.last_mut().expect("non-empty").push(i);
        held += bytes;
    }
    let mut results: Vec<Option<IdEstimate>> = vec![None; taps.len()];
    let mut provider = options.runtime.provider;
    for group in groups {
        let group_taps: Vec<Tap> = group.iter().map(|&i| taps[i].clone()).collect();
        let group_labels: Vec<String> = group.iter().map(|&i| labels[i].clone()).collect();
        let (features, used) = collect::collect(
            model,
            inputs,
            options.samples,
            &group_taps,
            options.pooling,
            &options.runtime,
        )?;
        provider = used;
        for (&i, estimate) in
            group
                .iter()
                .zip(estimate_matrices(&features, &group_labels, &options.id)?)
        {
            results[i] = Some(estimate);
        }
    }
    Ok((
        results
            .into_iter()
            .map(|r| r.expect("every tap measured"))
            .collect(),
        provider,
    ))
}

/// The ID of each matrix (rows = samples), with a progress bar; `labels`
/// name them in errors.
pub fn estimate_matrices(
    matrices: &[ndarray::Array2<f32>],
    labels: &[String],
    options: &IdOptions,
) -> Result<Vec<IdEstimate>, Error> {
    let progress = ProgressBar::new(matrices.len() as u64).with_message("intrinsic dimension");
    progress.set_style(
        ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} layers").expect("valid template"),
    );
    let mut out = Vec::with_capacity(matrices.len());
    for (matrix, label) in matrices.iter().zip(labels) {
        let estimate = id::estimate(matrix.view(), options)
            .map_err(|e| Error::Unsupported(format!("{label}: intrinsic dimension: {e}")))?;
        out.push(estimate);
        progress.inc(1);
    }
    progress.finish_and_clear();
    Ok(out)
}

/// Bytes that the pooled features of `taps` over `samples` samples take,
/// learnt from a one-sample probe run.
pub fn feature_bytes(
    model: &crate::ir::Model,
    inputs: &data::Inputs,
    taps: &[Tap],
    samples: usize,
    options: &ProfileOptions,
) -> Result<Vec<u64>, Error> {
    let probe_inputs: data::Inputs = inputs
        .iter()
        .map(|(k, v)| (k.clone(), v.rows(0, 1)))
        .collect();
    let (probe, _) = collect::collect(
        model,
        &probe_inputs,
        1,
        taps,
        options.pooling,
        &options.runtime,
    )?;
    Ok(probe
        .iter()
        .map(|p| (p.ncols() * samples * 4) as u64)
        .collect())
}

/// The residual stream after `join` as a value to tap: the sum, before any
/// norm that follows. A fused join that folded the sum into the next norm
/// (the last block before a final norm) gets its optional sum output.
pub fn residual_value(
    model: &mut crate::ir::Model,
    block: &arch::Block,
    join: &arch::Join,
) -> Result<String, crate::ir::IrError> {
    match &join.sum {
        None if !block.norm_after_join
            && model.graph.node(join.node).op() == "SkipLayerNormalization" =>
        {
            let name = model
                .graph
                .fresh_name(&format!("{}::residual_sum", join.stream_out));
            model.graph.add_output(join.node, 3, &name)?;
            Ok(name)
        }
        Some(sum) if !block.norm_after_join => Ok(sum.clone()),
        _ => Ok(join.stream_out.clone()),
    }
}

/// A quarter of physical memory (or 4 GiB when unknown).
pub fn default_max_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let line = m.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kb * 1024 / 4)
        })
        .unwrap_or(4 << 30)
}

/// Measures the ID of every block output of the model at `model_path` on
/// the samples of `calib`.
pub fn profile(
    model_path: &Path,
    calib: &CalibSource,
    options: &ProfileOptions,
) -> Result<Profile, Error> {
    let source = open(model_path)?;
    let architecture = arch::discover(&source.model.graph).map_err(|error| Error::Discover {
        path: model_path.to_path_buf(),
        error,
    })?;
    let (inputs, available) = calib.load(&source.model.graph, options.samples)?;
    if available < options.samples {
        return Err(Error::Data(data::DataError::Mismatch {
            path: calib.label(),
            reason: format!(
                "it has {available} samples, {} were asked for (--samples)",
                options.samples
            ),
        }));
    }
    let mask = data::mask_input(&source.model.graph, &inputs);
    // Tap each block's residual stream. A fused join that folded the sum
    // into the next norm (the last block before a final norm) is given its
    // optional sum output, so every block is measured before normalisation.
    let mut model = source.model.clone();
    let mut taps: Vec<(TowerKind, usize, Tap)> = Vec::new();
    for tower in &architecture.towers {
        for block in &tower.blocks {
            let mask = (tower.kind == TowerKind::Text)
                .then(|| mask.clone())
                .flatten();
            let value = residual_value(&mut model, block, &block.mlp.join).map_err(|error| {
                Error::Graph {
                    path: model_path.to_path_buf(),
                    error,
                }
            })?;
            taps.push((tower.kind, block.index, Tap { value, mask }));
        }
    }
    let source = crate::Source {
        file: source.file,
        model,
    };
    let all: Vec<Tap> = taps.iter().map(|t| t.2.clone()).collect();
    let labels: Vec<String> = taps
        .iter()
        .map(|(k, b, _)| format!("{}/{}", k.name(), b))
        .collect();
    let (estimates, provider) = estimate_taps(&source.model, &inputs, &all, &labels, options)?;
    let results: Vec<Option<IdEstimate>> = estimates.into_iter().map(Some).collect();
    let mut towers: Vec<TowerProfile> = Vec::new();
    for ((kind, block, _), estimate) in taps.iter().zip(results) {
        let estimate = estimate.expect("every tap was measured");
        match towers.iter_mut().find(|t| t.name == kind.name()) {
            Some(t) => t.layers.push(LayerId {
                block: *block,
                estimate,
            }),
            None => towers.push(TowerProfile {
                name: kind.name(),
                layers: vec![LayerId {
                    block: *block,
                    estimate,
                }],
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
