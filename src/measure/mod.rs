//! Measuring a model on calibration samples: which values to tap, one
//! calibration pass that gathers what the decisions need, and the intrinsic
//! dimension of the tapped features.
//!
//! - [`blocks`]: per block, the residual stream before and after each
//!   sub-block (block influence, ID) and, for unit scores, the energies of
//!   the attention context and the MLP activation; per linear layer, the ID
//!   of its output (unstructured masking).
//! - [`profile`]: the ID of every block's output, per tower (`id`).
//!
//! Features are held in memory up to [`MeasureOptions::max_memory`]; more
//! taps are measured in several passes (the measuring pass's first batch
//! tells whether they fit; the passes are then grouped by the widths a
//! one-sample probe learns).

pub mod blocks;
pub mod profile;

use crate::arch;
use crate::calib::collect;
use crate::calib::{Inputs, Layout, Pooling, Provider, RuntimeError, RuntimeOptions, Tap};
use crate::id::{self, IdError, IdEstimate, IdOptions};
use crate::ir::{IrError, Model};

pub use blocks::{BlockMeasurements, BlockStats, LinearId, SubBlockStats};
pub use profile::{LayerId, Profile, TowerProfile};

/// How to measure.
#[derive(Debug, Clone)]
pub struct MeasureOptions {
    /// Samples to use (the first N of the decision samples).
    pub samples: usize,
    /// How token outputs become one vector per sample.
    pub pooling: Pooling,
    /// ID estimation.
    pub id: IdOptions,
    /// Bytes of features held at once; more taps run in several passes.
    pub max_memory: u64,
}

impl Default for MeasureOptions {
    fn default() -> Self {
        Self {
            samples: 512,
            pooling: Pooling::Flatten,
            id: IdOptions::default(),
            max_memory: default_max_memory(),
        }
    }
}

/// Why a measurement failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MeasureError {
    /// Running the model failed.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// A value could not be tapped (the graph edit that exposes it failed).
    #[error(transparent)]
    Graph(#[from] IrError),
    /// The intrinsic dimension of a tap could not be estimated.
    #[error("{label}: intrinsic dimension: {error}")]
    Estimate {
        /// The tap (`vision/3`, `text/1 fc2`).
        label: String,
        /// What the estimator said.
        error: IdError,
    },
}

/// The ID of each tap's pooled values over the first `options.samples`
/// samples. Taps are measured in passes holding at most
/// `options.max_memory` bytes of features (a one-sample probe learns each
/// tap's width first). `labels` name the taps in errors.
pub fn estimate_taps(
    model: &Model,
    inputs: &Inputs,
    taps: &[Tap],
    labels: &[String],
    options: &MeasureOptions,
    runtime: &RuntimeOptions,
) -> Result<(Vec<IdEstimate>, Provider), MeasureError> {
    let widths = feature_bytes(model, inputs, taps, options.samples, options, runtime)?;
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
    let mut provider = runtime.provider;
    for group in groups {
        let group_taps: Vec<Tap> = group.iter().map(|&i| taps[i].clone()).collect();
        let group_labels: Vec<String> = group.iter().map(|&i| labels[i].clone()).collect();
        let (features, used) = collect::collect(
            model,
            inputs,
            options.samples,
            &group_taps,
            options.pooling,
            runtime,
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
) -> Result<Vec<IdEstimate>, MeasureError> {
    let progress = crate::progress::bar(
        matrices.len() as u64,
        "intrinsic dimension",
        "{msg} {bar:30} {pos}/{len} layers",
    );
    let mut out = Vec::with_capacity(matrices.len());
    for (matrix, label) in matrices.iter().zip(labels) {
        let estimate =
            id::estimate(matrix.view(), options).map_err(|error| MeasureError::Estimate {
                label: label.clone(),
                error,
            })?;
        out.push(estimate);
        progress.inc(1);
    }
    progress.finish_and_clear();
    Ok(out)
}

/// Bytes that the pooled features of `taps` over `samples` samples take,
/// learnt from a one-sample probe run.
pub fn feature_bytes(
    model: &Model,
    inputs: &Inputs,
    taps: &[Tap],
    samples: usize,
    options: &MeasureOptions,
    runtime: &RuntimeOptions,
) -> Result<Vec<u64>, MeasureError> {
    let probe_inputs = crate::calib::data::rows(inputs, 0, 1);
    let (probe, _) = collect::collect(model, &probe_inputs, 1, taps, options.pooling, runtime)?;
    Ok(probe
        .iter()
        .map(|p| (p.ncols() * samples * 4) as u64)
        .collect())
}

/// The residual stream after `join` as a value to tap: the sum, before any
/// norm that follows. A fused join that folded the sum into the next norm
/// (the last block before a final norm) gets its optional sum output.
pub fn residual_value(
    model: &mut Model,
    block: &arch::Block,
    join: &arch::Join,
) -> Result<String, IrError> {
    match &join.sum {
        None if !block.norm_after_join
            && matches!(
                model.graph.node(join.node).op(),
                "SkipLayerNormalization" | "SkipSimplifiedLayerNormalization"
            ) =>
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

/// The tap of `value` in `tower`: text taps skip padding through `mask`;
/// the samples sit where the inferred shapes put them.
fn tap(view: &arch::View<'_>, value: String, tower: arch::TowerKind, mask: Option<&str>) -> Tap {
    let layout = layout(view, &value);
    Tap {
        value,
        mask: (tower == arch::TowerKind::Text)
            .then(|| mask.map(str::to_string))
            .flatten(),
        layout,
    }
}

/// Where the samples of `value` sit: the axis whose size is the batch size
/// of the model's inputs (sequence-first models keep it on axis 1), or
/// mixed into the rows of a `[tokens · batch, channels]` view.
pub fn layout(view: &arch::View<'_>, value: &str) -> Layout {
    let graph = view.graph;
    let batch: Vec<arch::shapes::Expr> = graph
        .inputs
        .iter()
        .filter(|i| graph.initializer(i.name()).is_none())
        .filter_map(|i| view.shapes.shape(i.name())?.first().cloned())
        .collect();
    let Some(shape) = view.shapes.shape(value) else {
        return Layout::default();
    };
    if shape.first().is_some_and(|d| batch.contains(d)) {
        return Layout::Batch(0);
    }
    if let Some(axis) = shape
        .iter()
        .position(|d| batch.contains(d) && d.value().is_none())
    {
        return Layout::Batch(axis);
    }
    let merged = shape.iter().any(|d| {
        batch
            .iter()
            .any(|b| !b.symbols.is_empty() && b.symbols.iter().all(|s| d.symbols.contains(s)))
            && !batch.contains(d)
    });
    if merged {
        Layout::Rows
    } else {
        Layout::default()
    }
}
