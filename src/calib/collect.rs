//! Instrumentation and feature collection: the tapped tensors become extra
//! graph outputs of an in-memory copy of the model, which ONNX Runtime runs
//! over the calibration samples batch by batch.
//!
//! Why graph optimisations are off: ONNX Runtime fuses at session load (a
//! LayerNorm+Add into SkipLayerNormalization, say) and a tensor inside a
//! fused pattern stops existing; a tapped output would then silently be a
//! different tensor or disappear. With optimisations disabled every tapped
//! value is computed exactly as the graph states it.
//!
//! Each tap goes through a `Cast` to float32, so float16 and bfloat16
//! models are measured in f32 like any other.

use indicatif::{ProgressBar, ProgressStyle};
use ndarray::{Array2, ArrayD, Ix3};

use super::data::{Array, Inputs};
use super::runtime::{Runtime, RuntimeError, RuntimeOptions};
use crate::ir::{Dim, Model};
use crate::onnx::proto::{AttributeProto, NodeProto, TypeProto, ValueInfoProto, type_proto};

/// How a layer's `[batch, tokens, channels]` output becomes one vector per
/// sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// All tokens × channels in one vector (the paper's choice); padded
    /// text positions are zeroed.
    Flatten,
    /// The first token.
    Cls,
    /// Mean over the tokens that are not padding.
    Mean,
}

/// A value to record, and the graph input holding its padding mask (text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tap {
    /// The value.
    pub value: String,
    /// A `[batch, tokens]` 0/1 input marking real tokens, if any.
    pub mask: Option<String>,
}

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

/// One batch of tapped outputs, handed to a [`run_batches`] consumer.
pub struct Batch<'a> {
    /// Sample range `start..end` of this batch (rows past `end - start` are
    /// padding for a static batch size and must be ignored).
    pub start: usize,
    /// End of the range.
    pub end: usize,
    /// The tapped outputs, one per tap, `[batch, …]`.
    pub taps: Vec<&'a ArrayD<f32>>,
    /// The inputs fed (for padding masks).
    pub feed: &'a Inputs,
}

/// Runs the first `samples` calibration samples through `model` with
/// `taps`, batch by batch (the model's static batch size, else 16), and
/// hands every batch to `consume`. Returns the provider that ran.
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
    let fixed = static_batch(model);
    if let Some(b) = fixed.filter(|&b| b > MAX_STATIC_BATCH) {
        // Every batch is padded to the fixed size: a claimed size in the
        // billions would allocate by it.
        return Err(RuntimeError::Unsupported(format!(
            "the model's inputs have a fixed batch size of {b}; at most {MAX_STATIC_BATCH} is supported"
        )));
    }
    let batch = fixed.unwrap_or(16).max(1);
    let progress = ProgressBar::new(samples as u64).with_message("calibration");
    progress.set_style(
        ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} samples ({eta})")
            .expect("valid template"),
    );
    let names: Vec<String> = taps.iter().map(|t| tap_output(&t.value)).collect();
    let mut start = 0;
    while start < samples {
        let end = (start + batch).min(samples);
        // A model with a fixed batch size gets full batches: pad by repeating
        // the last sample and drop the extra rows afterwards.
        let take = if fixed.is_some() { batch } else { end - start };
        let index: Vec<usize> = (start..start + take).map(|i| i.min(samples - 1)).collect();
        let feed: Inputs = inputs
            .iter()
            .map(|(k, v)| (k.clone(), v.select_rows(&index)))
            .collect();
        let outputs = runtime.run(&feed)?;
        let mut tapped = Vec::with_capacity(taps.len());
        for (tap, name) in taps.iter().zip(&names) {
            let Some((_, Array::F32(values))) = outputs.iter().find(|(n, _)| n == name) else {
                return Err(RuntimeError::Session(format!(
                    "tap '{}' produced no float output",
                    tap.value
                )));
            };
            tapped.push(values);
        }
        consume(Batch {
            start,
            end,
            taps: tapped,
            feed: &feed,
        })?;
        progress.inc((end - start) as u64);
        start = end;
    }
    progress.finish_and_clear();
    Ok(runtime.provider)
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
    /// Pooling of the features.
    pub pooling: Pooling,
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
        pooling,
    } = request;
    let mut grams: Vec<(Array2<f64>, f64)> = vec![(Array2::zeros((0, 0)), 0.0); gram_taps.len()];
    let mut stride = 0usize;
    let mut energy: Vec<(Vec<f64>, f64)> = vec![(Vec::new(), 0.0); energy_taps.len()];
    // Feature matrices are allocated once their width is known (first
    // batch) and filled in place: no second copy.
    let mut features: Vec<Option<Array2<f32>>> = vec![None; feature_taps.len()];
    let mut sums = vec![(0f64, 0f64); pairs.len()];
    let provider = run_batches(model, inputs, samples, taps, options, |batch| {
        let rows = batch.end - batch.start;
        for (slot, &t) in feature_taps.iter().enumerate() {
            let tap = &taps[t];
            let mask = tap.mask.as_ref().and_then(|m| batch.feed.get(m));
            let pooled = pool(batch.taps[t], mask, pooling)?;
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
            let (sum, count) = token_cosines(
                &taps[a],
                batch.taps[a],
                &taps[b],
                batch.taps[b],
                rows,
                batch.feed,
            )?;
            sums[p].0 += sum;
            sums[p].1 += count;
        }
        for (slot, &t) in energy_taps.iter().enumerate() {
            let values = batch.taps[t];
            let width = *values.shape().last().unwrap_or(&1);
            let tokens = values.len() / values.shape()[0].max(1) / width.max(1);
            let mask = taps[t].mask.as_ref().and_then(|m| batch.feed.get(m));
            let Some(flat) = values.as_slice_memory_order() else {
                return Err(RuntimeError::Session(
                    "tapped tensors are not contiguous".into(),
                ));
            };
            let (acc, count) = &mut energy[slot];
            acc.resize(width, 0.0);
            for sample in 0..rows {
                for token in 0..tokens {
                    if !real_token(mask, sample, token, tokens) {
                        continue;
                    }
                    let offset = (sample * tokens + token) * width;
                    for (a, &v) in acc.iter_mut().zip(&flat[offset..offset + width]) {
                        *a += v as f64 * v as f64;
                    }
                    *count += 1.0;
                }
            }
        }
        for (slot, &t) in gram_taps.iter().enumerate() {
            let values = batch.taps[t];
            let width = *values.shape().last().unwrap_or(&1);
            let tokens = values.len() / values.shape()[0].max(1) / width.max(1);
            if stride == 0 {
                // Every stride-th token: the cost is tokens × width², so
                // long sequences are subsampled to at most GRAM_TOKENS.
                stride = (samples * tokens).div_ceil(GRAM_TOKENS).max(1);
            }
            let mask = taps[t].mask.as_ref().and_then(|m| batch.feed.get(m));
            let Some(flat) = values.as_slice_memory_order() else {
                return Err(RuntimeError::Session(
                    "tapped tensors are not contiguous".into(),
                ));
            };
            let picked: Vec<usize> = (0..rows * tokens)
                .filter(|i| {
                    let global = batch.start * tokens + i;
                    global.is_multiple_of(stride)
                        && real_token(mask, i / tokens, i % tokens, tokens)
                })
                .collect();
            let mut m = Array2::<f32>::zeros((picked.len(), width + 1));
            for (r, &i) in picked.iter().enumerate() {
                let row = &flat[i * width..(i + 1) * width];
                for (c, &v) in row.iter().enumerate() {
                    m[[r, c]] = v;
                }
                m[[r, width]] = 1.0;
            }
            let (acc, count) = &mut grams[slot];
            if acc.nrows() != width + 1 {
                *acc = Array2::zeros((width + 1, width + 1));
            }
            let g = m.t().dot(&m);
            acc.zip_mut_with(&g, |a, &v| *a += v as f64);
            *count += picked.len() as f64;
        }
        Ok(())
    })?;
    Ok(Collected {
        features: features
            .into_iter()
            .map(|f| f.unwrap_or_else(|| Array2::zeros((0, 0))))
            .collect(),
        cosines: sums.iter().map(|(s, n)| s / n.max(1.0)).collect(),
        energies: energy
            .into_iter()
            .map(|(acc, n)| acc.into_iter().map(|a| a / n.max(1.0)).collect())
            .collect(),
        grams: grams.into_iter().map(|(g, n)| g / n.max(1.0)).collect(),
        provider,
    })
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
        pooling,
    };
    let c = collect_all(model, inputs, samples, taps, request, options)?;
    Ok((c.features, c.provider))
}

/// Most tokens a Gram accumulation reads (longer runs take every k-th).
pub const GRAM_TOKENS: usize = 16384;

/// Whether `token` of `sample` is a real token (not padding) per `mask`.
fn real_token(mask: Option<&Array>, sample: usize, token: usize, tokens: usize) -> bool {
    match mask {
        Some(Array::I64(m)) if m.ndim() == 2 && m.shape()[1] == tokens => m[[sample, token]] != 0,
        Some(Array::I32(m)) if m.ndim() == 2 && m.shape()[1] == tokens => m[[sample, token]] != 0,
        _ => true,
    }
}

/// Sum over the first `rows` samples and their real tokens of the cosine
/// between `x` and `y`'s token vectors, and the number of tokens summed.
fn token_cosines(
    tap_x: &Tap,
    x: &ArrayD<f32>,
    tap_y: &Tap,
    y: &ArrayD<f32>,
    rows: usize,
    feed: &Inputs,
) -> Result<(f64, f64), RuntimeError> {
    if x.shape() != y.shape() || x.ndim() < 2 {
        return Err(RuntimeError::Session(format!(
            "cannot compare '{}' {:?} with '{}' {:?}",
            tap_x.value,
            x.shape(),
            tap_y.value,
            y.shape()
        )));
    }
    let width = *x.shape().last().expect("rank ≥ 2");
    let tokens = x.len() / x.shape()[0] / width;
    let mask = tap_x.mask.as_ref().and_then(|m| feed.get(m));
    let (Some(xs), Some(ys)) = (x.as_slice_memory_order(), y.as_slice_memory_order()) else {
        return Err(RuntimeError::Session(
            "tapped tensors are not contiguous".into(),
        ));
    };
    let (mut sum, mut count) = (0f64, 0f64);
    for sample in 0..rows {
        for t in 0..tokens {
            if !real_token(mask, sample, t, tokens) {
                continue;
            }
            let offset = (sample * tokens + t) * width;
            let (u, v) = (&xs[offset..offset + width], &ys[offset..offset + width]);
            let (dot, nu, nv) = crate::verify::dot_and_norms(u, v);
            sum += dot / (nu.sqrt() * nv.sqrt()).max(1e-30);
            count += 1.0;
        }
    }
    Ok((sum, count))
}

/// One row per sample from a `[batch, tokens, channels]` (or `[batch, d]`)
/// output.
fn pool(
    values: &ArrayD<f32>,
    mask: Option<&Array>,
    pooling: Pooling,
) -> Result<Array2<f32>, RuntimeError> {
    let batch = values.shape()[0];
    if values.ndim() == 2 {
        return Ok(values.clone().into_dimensionality().expect("rank 2"));
    }
    let v = values.view().into_dimensionality::<Ix3>().map_err(|_| {
        RuntimeError::Session(format!(
            "tapped tensor has shape {:?}, expected [batch, tokens, channels]",
            values.shape()
        ))
    })?;
    let (_, tokens, channels) = v.dim();
    let keep = |b: usize, t: usize| -> f32 { real_token(mask, b, t, tokens) as u8 as f32 };
    Ok(match pooling {
        Pooling::Flatten => Array2::from_shape_fn((batch, tokens * channels), |(b, i)| {
            v[[b, i / channels, i % channels]] * keep(b, i / channels)
        }),
        Pooling::Cls => Array2::from_shape_fn((batch, channels), |(b, c)| v[[b, 0, c]]),
        Pooling::Mean => Array2::from_shape_fn((batch, channels), |(b, c)| {
            let (mut sum, mut count) = (0f32, 0f32);
            for t in 0..tokens {
                let w = keep(b, t);
                sum += v[[b, t, c]] * w;
                count += w;
            }
            sum / count.max(1.0)
        }),
    })
}
