//! Instrumentation and batching: the tapped tensors become extra graph
//! outputs of an in-memory copy of the model, which ONNX Runtime runs over
//! the calibration samples batch by batch; each batch's taps go to the
//! statistics of [`super::stats`].
//!
//! Why graph optimisations are off: ONNX Runtime fuses at session load (a
//! LayerNorm+Add into SkipLayerNormalization, say) and a tensor inside a
//! fused pattern stops existing; a tapped output would then silently be a
//! different tensor or disappear. With optimisations disabled every tapped
//! value is computed exactly as the graph states it.
//!
//! Each tap goes through a `Cast` to float32, so float16 and bfloat16
//! models are measured in f32 like any other.

use ndarray::{Array2, ArrayD};

use super::data::{Array, Inputs};
use super::runtime::{Runtime, RuntimeError, RuntimeOptions};
use super::stats::{self, Energy, Pooling, SecondMoment, Tap};
use crate::ir::{Dim, Model};
use crate::onnx::proto::{AttributeProto, NodeProto, TypeProto, ValueInfoProto, type_proto};

/// Output name used for a tap.
fn tap_output(value: &str) -> String {
    format!("{value}::idprune_tap")
}

/// A copy of `model` whose outputs also include every tap (cast to f32).
pub fn instrument(model: &Model, taps: &[Tap]) -> Result<Model, RuntimeError> {
    let mut copy = model.clone();
    for tap in taps {
        let output = tap_output(&tap.value);
        let cast = NodeProto {
            op_type: Some("Cast".into()),
            name: Some(format!("{}/idprune_tap", tap.value)),
            input: vec![tap.value.clone()],
            output: vec![output.clone()],
            attribute: vec![AttributeProto {
                name: Some("to".into()),
                r#type: Some(2),
                i: Some(1),
                ..Default::default()
            }],
            ..Default::default()
        };
        copy.graph
            .add_node(cast)
            .map_err(|e| RuntimeError::Session(format!("cannot tap '{}': {e}", tap.value)))?;
        copy.graph.outputs.push(ValueInfoProto {
            name: Some(output),
            r#type: Some(TypeProto {
                value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                    elem_type: Some(1),
                    shape: None,
                })),
                denotation: None,
            }),
            ..Default::default()
        });
    }
    Ok(copy)
}

/// Largest fixed batch size calibration pads its batches to.
pub const MAX_STATIC_BATCH: usize = 4096;

/// Batch size used when the model does not fix one.
pub const DEFAULT_BATCH: usize = 16;

/// The batch size the model requires (a fixed first dimension on every
/// input), if any.
pub fn static_batch(model: &Model) -> Option<usize> {
    let graph = &model.graph;
    graph
        .inputs
        .iter()
        .filter(|i| graph.initializer(i.name()).is_none())
        .find_map(|i| match graph.value_type(i.name())?.shape?.first()? {
            Dim::Fixed(b) if *b > 0 => Some(*b as usize),
            _ => None,
        })
}

/// How samples are cut into the batches ONNX Runtime is fed: the model's
/// static batch size (batches padded to it by repeating the last sample),
/// else [`DEFAULT_BATCH`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batching {
    samples: usize,
    size: usize,
    padded: bool,
}

/// One batch: samples `start..end`, fed as `take` rows (rows past
/// `end - start` are padding for a static batch size and are ignored).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchRange {
    /// First sample.
    pub start: usize,
    /// One past the last sample.
    pub end: usize,
    /// Rows fed.
    pub take: usize,
}

impl Batching {
    /// Batches of `samples` samples for `model`.
    pub fn for_model(model: &Model, samples: usize) -> Result<Self, RuntimeError> {
        Self::new(samples, static_batch(model))
    }

    /// Batches of `samples` samples for a model whose batch size is fixed
    /// to `fixed`, if it is.
    pub fn new(samples: usize, fixed: Option<usize>) -> Result<Self, RuntimeError> {
        if let Some(b) = fixed.filter(|&b| b > MAX_STATIC_BATCH) {
            // Every batch is padded to the fixed size: a claimed size in the
            // billions would allocate by it.
            return Err(RuntimeError::Unsupported(format!(
                "the model's inputs have a fixed batch size of {b}; at most {MAX_STATIC_BATCH} is supported"
            )));
        }
        Ok(Self {
            samples,
            size: fixed.unwrap_or(DEFAULT_BATCH).max(1),
            padded: fixed.is_some(),
        })
    }

    /// The batches, in order.
    pub fn ranges(&self) -> impl Iterator<Item = BatchRange> + '_ {
        (0..self.samples).step_by(self.size).map(|start| {
            let end = (start + self.size).min(self.samples);
            BatchRange {
                start,
                end,
                take: if self.padded { self.size } else { end - start },
            }
        })
    }

    /// The rows of `inputs` that `range` feeds (the last sample repeated as
    /// padding).
    pub fn feed(&self, inputs: &Inputs, range: BatchRange) -> Inputs {
        let last = self.samples.saturating_sub(1);
        let index: Vec<usize> = (range.start..range.start + range.take)
            .map(|i| i.min(last))
            .collect();
        inputs
            .iter()
            .map(|(k, v)| (k.clone(), v.select_rows(&index)))
            .collect()
    }
}

/// One batch of tapped outputs, handed to a [`run_batches`] consumer.
pub struct Batch<'a> {
    /// Sample range `start..end` of this batch (rows past `end - start` are
    /// padding for a static batch size and must be ignored).
    pub start: usize,
    /// End of the range.
    pub end: usize,
    /// The tapped outputs, one per tap, `[batch, …]` (samples on axis 0,
    /// whatever the tap's layout).
    pub taps: Vec<std::borrow::Cow<'a, ArrayD<f32>>>,
    /// The inputs fed (for padding masks).
    pub feed: &'a Inputs,
}

/// Runs the first `samples` calibration samples through `model` with
/// `taps`, batch by batch, and hands every batch to `consume`. Returns the
/// provider that ran.
pub fn run_batches(
    model: &Model,
    inputs: &Inputs,
    samples: usize,
    taps: &[Tap],
    options: &RuntimeOptions,
    mut consume: impl FnMut(Batch<'_>) -> Result<(), RuntimeError>,
) -> Result<crate::calib::Provider, RuntimeError> {
    let instrumented = instrument(model, taps)?;
    let bytes = crate::onnx::encode_to_vec(&instrumented.to_proto());
    if bytes.len() as u64 > crate::onnx::PROTOBUF_LIMIT {
        return Err(RuntimeError::Session(
            "models over 2 GiB cannot be calibrated in this build yet".into(),
        ));
    }
    let options = RuntimeOptions {
        optimize: false,
        ..options.clone()
    };
    let mut runtime = Runtime::from_bytes(&bytes, &options)?;
    drop(bytes);
    let batching = Batching::for_model(model, samples)?;
    let progress = crate::progress::bar(
        samples as u64,
        "calibration",
        "{msg} {bar:30} {pos}/{len} samples ({eta})",
    );
    let names: Vec<String> = taps.iter().map(|t| tap_output(&t.value)).collect();
    // ONNX Runtime runs the next batch while this thread consumes the last
    // one (second moments, features): the two overlap instead of taking
    // turns. The batches are consumed in order, so what is gathered does not
    // change; at most one finished batch waits.
    let ranges: Vec<BatchRange> = batching.ranges().collect();
    std::thread::scope(|scope| {
        let (sender, receiver) = std::sync::mpsc::sync_channel(0);
        let runner = scope.spawn(move || {
            for range in ranges {
                let feed = batching.feed(inputs, range);
                let outputs = runtime.run(&feed);
                let failed = outputs.is_err();
                // A consumer that stopped (an error) hangs up: stop too.
                if sender.send((range, feed, outputs)).is_err() || failed {
                    break;
                }
            }
            runtime.provider
        });
        for (range, feed, outputs) in receiver {
            let outputs = outputs?;
            let mut tapped = Vec::with_capacity(taps.len());
            for (tap, name) in taps.iter().zip(&names) {
                let Some((_, Array::F32(values))) = outputs.iter().find(|(n, _)| n == name) else {
                    return Err(RuntimeError::Session(format!(
                        "tap '{}' produced no float output",
                        tap.value
                    )));
                };
                tapped.push(tap.layout.batch_first(values, range.take)?);
            }
            consume(Batch {
                start: range.start,
                end: range.end,
                taps: tapped,
                feed: &feed,
            })?;
            progress.inc((range.end - range.start) as u64);
        }
        progress.finish_and_clear();
        runner
            .join()
            .map_err(|_| RuntimeError::Session("the calibration runner panicked".into()))
    })
}

/// What one calibration pass gathered.
#[derive(Debug, Clone)]
pub struct Collected {
    /// One `samples × features` matrix per requested feature tap, in order.
    pub features: Vec<Array2<f32>>,
    /// Per requested pair of taps: the mean over samples and real tokens of
    /// the cosine similarity between their token vectors (the
    /// block-influence statistic: influence = 1 − this).
    pub cosines: Vec<f64>,
    /// Per requested energy tap: the mean over samples and real tokens of
    /// each channel's square (activation-aware unit scores).
    pub energies: Vec<Vec<f64>>,
    /// Per requested mean tap: the mean over samples and real tokens of
    /// each channel (bias compensation of removed branches).
    pub means: Vec<Vec<f64>>,
    /// Per requested Gram tap: the mean over real tokens of `[a; 1][a; 1]ᵀ`
    /// (`(width + 1)²`, the last row and column carry the mean of `a`),
    /// for least-squares repair.
    pub grams: Vec<Array2<f64>>,
    /// The provider that ran.
    pub provider: crate::calib::Provider,
}

/// What one pass gathers; indices refer to the pass's taps.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// Taps whose pooled features are kept.
    pub features: &'a [usize],
    /// Tap pairs whose token cosines are averaged.
    pub pairs: &'a [(usize, usize)],
    /// Taps whose per-channel mean squares are accumulated.
    pub energies: &'a [usize],
    /// Taps whose token second moments are accumulated.
    pub grams: &'a [usize],
    /// Taps whose per-channel means are accumulated.
    pub means: &'a [usize],
    /// Pooling of the features.
    pub pooling: Pooling,
    /// Bytes the features may take: learnt from the first batch's widths,
    /// features over it are not kept at all ([`Collected::features`] is
    /// empty then) and the caller measures them in smaller passes.
    pub feature_budget: Option<u64>,
}

/// One pass over the first `samples` samples gathering what `request` asks.
pub fn collect_all(
    model: &Model,
    inputs: &Inputs,
    samples: usize,
    taps: &[Tap],
    request: Request<'_>,
    options: &RuntimeOptions,
) -> Result<Collected, RuntimeError> {
    let Request {
        features: feature_taps,
        pairs,
        energies: energy_taps,
        grams: gram_taps,
        means: mean_taps,
        pooling,
        feature_budget,
    } = request;
    let mut means: Vec<stats::Mean> = vec![stats::Mean::default(); mean_taps.len()];
    let mut grams: Vec<SecondMoment> = vec![SecondMoment::default(); gram_taps.len()];
    // Each Gram tap's token stride, set from its own token count on the
    // first batch: a tap's statistic depends on that tap and the samples
    // only, never on which other taps share the pass (so statistics
    // gathered in different passes can be pooled).
    let mut strides = vec![0usize; gram_taps.len()];
    let mut energy: Vec<Energy> = vec![Energy::default(); energy_taps.len()];
    // Feature matrices are allocated once their width is known (first
    // batch) and filled in place: no second copy.
    let mut features: Vec<Option<Array2<f32>>> = vec![None; feature_taps.len()];
    let mut sums = vec![(0f64, 0f64); pairs.len()];
    let mut keep_features = true;
    let provider = run_batches(model, inputs, samples, taps, options, |batch| {
        let rows = batch.end - batch.start;
        // The first batch tells the features' widths, so whether they fit.
        let mut first: Vec<Option<Array2<f32>>> = Vec::new();
        if keep_features && batch.start == 0 {
            first = feature_taps
                .iter()
                .map(|&t| {
                    stats::pool(&batch.taps[t], mask_in(&taps[t], batch.feed), pooling).map(Some)
                })
                .collect::<Result<_, _>>()?;
            let bytes: u64 = first
                .iter()
                .flatten()
                .map(|p| (p.ncols() * samples * 4) as u64)
                .sum();
            keep_features = feature_budget.is_none_or(|budget| bytes <= budget);
        }
        for (slot, &t) in feature_taps.iter().enumerate() {
            if !keep_features {
                break;
            }
            let tap = &taps[t];
            let pooled = match first.get_mut(slot).and_then(Option::take) {
                Some(pooled) => pooled,
                None => stats::pool(&batch.taps[t], mask_in(tap, batch.feed), pooling)?,
            };
            let matrix =
                features[slot].get_or_insert_with(|| Array2::zeros((samples, pooled.ncols())));
            if matrix.ncols() != pooled.ncols() {
                return Err(RuntimeError::Session(format!(
                    "tap '{}' changed width between batches ({} vs {}); calibrate with equal sequence lengths",
                    tap.value,
                    matrix.ncols(),
                    pooled.ncols()
                )));
            }
            matrix
                .slice_mut(ndarray::s![batch.start..batch.end, ..])
                .assign(&pooled.slice(ndarray::s![..rows, ..]));
        }
        for (p, &(a, b)) in pairs.iter().enumerate() {
            let (sum, count) = stats::token_cosines(
                &taps[a],
                &batch.taps[a],
                &taps[b],
                &batch.taps[b],
                rows,
                batch.feed,
            )?;
            sums[p].0 += sum;
            sums[p].1 += count;
        }
        for (slot, &t) in energy_taps.iter().enumerate() {
            energy[slot].add(&batch.taps[t], mask_in(&taps[t], batch.feed), rows)?;
        }
        for (slot, &t) in mean_taps.iter().enumerate() {
            means[slot].add(&batch.taps[t], mask_in(&taps[t], batch.feed), rows)?;
        }
        for (slot, &t) in gram_taps.iter().enumerate() {
            if strides[slot] == 0 {
                strides[slot] =
                    stats::gram_stride(samples, stats::tokens_per_sample(&batch.taps[t]));
            }
            let mask = mask_in(&taps[t], batch.feed);
            grams[slot].add(&batch.taps[t], mask, batch.start, rows, strides[slot])?;
        }
        Ok(())
    })?;
    Ok(Collected {
        features: if keep_features {
            features
                .into_iter()
                .map(|f| f.unwrap_or_else(|| Array2::zeros((0, 0))))
                .collect()
        } else {
            Vec::new()
        },
        cosines: sums.iter().map(|(s, n)| s / n.max(1.0)).collect(),
        energies: energy.into_iter().map(Energy::means).collect(),
        means: means.into_iter().map(stats::Mean::means).collect(),
        grams: grams.into_iter().map(SecondMoment::mean).collect(),
        provider,
    })
}

/// The padding mask of `tap` among the inputs fed (none for a tap whose
/// rows mix samples).
fn mask_in<'a>(tap: &Tap, feed: &'a Inputs) -> Option<&'a Array> {
    if tap.layout == stats::Layout::Rows {
        return None;
    }
    tap.mask.as_ref().and_then(|m| feed.get(m))
}

/// Runs `samples` calibration samples through `model` with `taps` and
/// returns one `samples × features` matrix per tap.
pub fn collect(
    model: &Model,
    inputs: &Inputs,
    samples: usize,
    taps: &[Tap],
    pooling: Pooling,
    options: &RuntimeOptions,
) -> Result<(Vec<Array2<f32>>, crate::calib::Provider), RuntimeError> {
    let all: Vec<usize> = (0..taps.len()).collect();
    let request = Request {
        features: &all,
        pairs: &[],
        energies: &[],
        grams: &[],
        means: &[],
        pooling,
        feature_budget: None,
    };
    let c = collect_all(model, inputs, samples, taps, request, options)?;
    Ok((c.features, c.provider))
}
