//! Statistics of tapped activations, computed batch by batch: pooled
//! feature vectors (for intrinsic dimension), token cosines between two
//! streams (block influence), per-channel energies (activation-aware unit
//! scores) and second moments (least-squares repair), plus the cosines
//! that verification compares outputs with.
//!
//! Everything skips padding: a `[batch, tokens]` 0/1 mask input marks the
//! real tokens of text samples. Sums are accumulated in f64.

use ndarray::{Array2, ArrayD, Ix3};

use super::data::{Array, Inputs};
use super::runtime::RuntimeError;

/// How a layer's `[batch, tokens, channels]` output becomes one vector per
/// sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
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

impl std::str::FromStr for Pooling {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "flatten" => Ok(Pooling::Flatten),
            "cls" => Ok(Pooling::Cls),
            "mean" => Ok(Pooling::Mean),
            other => Err(format!(
                "unknown pooling '{other}' (expected flatten, cls or mean)"
            )),
        }
    }
}

/// A value to record, and the graph input holding its padding mask (text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tap {
    /// The value.
    pub value: String,
    /// A `[batch, tokens]` 0/1 input marking real tokens, if any.
    pub mask: Option<String>,
    /// Where the samples sit in the tapped tensor.
    pub layout: Layout,
}

/// Where the samples sit in a tapped tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Along this axis (0 for batch-first; 1 for the sequence-first
    /// streams of `nn.MultiheadAttention` models). Other axes are tokens
    /// and channels.
    Batch(usize),
    /// Merged with the tokens on axis 0 (`[tokens · batch, channels]`):
    /// every row is a token of some sample. Good for sums over tokens
    /// (energies, second moments), not for per-sample features.
    Rows,
}

impl Default for Layout {
    fn default() -> Self {
        Layout::Batch(0)
    }
}

impl Layout {
    /// `values` with the samples on axis 0 (`[batch, …]`): borrowed when
    /// they already are; `Rows` become `[batch, tokens, channels]` groups of
    /// `batch` (which sample a row belongs to is not kept, only that every
    /// row is a token).
    pub fn batch_first<'a>(
        self,
        values: &'a ArrayD<f32>,
        batch: usize,
    ) -> Result<std::borrow::Cow<'a, ArrayD<f32>>, RuntimeError> {
        use std::borrow::Cow;
        match self {
            Layout::Batch(0) => Ok(Cow::Borrowed(values)),
            Layout::Batch(axis) => {
                if axis >= values.ndim() {
                    return Err(RuntimeError::Session(format!(
                        "a tap has {} axes, its samples were expected on axis {axis}",
                        values.ndim()
                    )));
                }
                let mut perm: Vec<usize> = (0..values.ndim()).collect();
                perm.remove(axis);
                perm.insert(0, axis);
                Ok(Cow::Owned(
                    values
                        .view()
                        .permuted_axes(perm)
                        .as_standard_layout()
                        .into_owned(),
                ))
            }
            Layout::Rows => {
                let width = *values.shape().last().unwrap_or(&1);
                let rows = values.len() / width.max(1);
                if batch == 0 || !rows.is_multiple_of(batch) {
                    return Err(RuntimeError::Session(format!(
                        "a tap of {rows} rows does not divide into {batch} samples"
                    )));
                }
                let shape = ndarray::IxDyn(&[batch, rows / batch, width]);
                Ok(Cow::Owned(
                    values
                        .as_standard_layout()
                        .into_owned()
                        .into_shape_with_order(shape)
                        .map_err(|e| RuntimeError::Session(e.to_string()))?,
                ))
            }
        }
    }
}

/// Whether `token` of `sample` is a real token (not padding) per `mask`.
pub fn real_token(mask: Option<&Array>, sample: usize, token: usize, tokens: usize) -> bool {
    match mask {
        Some(Array::I64(m)) if m.ndim() == 2 && m.shape()[1] == tokens => m[[sample, token]] != 0,
        Some(Array::I32(m)) if m.ndim() == 2 && m.shape()[1] == tokens => m[[sample, token]] != 0,
        _ => true,
    }
}

/// The tensor as one contiguous slice (ONNX Runtime hands out row-major
/// outputs).
fn contiguous(values: &ArrayD<f32>) -> Result<&[f32], RuntimeError> {
    values
        .as_slice_memory_order()
        .ok_or_else(|| RuntimeError::Session("tapped tensors are not contiguous".into()))
}

/// `(tokens per sample, channels)` of a `[batch, …, channels]` tensor.
fn token_layout(values: &ArrayD<f32>) -> (usize, usize) {
    let width = *values.shape().last().unwrap_or(&1);
    let tokens = values.len() / values.shape()[0].max(1) / width.max(1);
    (tokens, width)
}

/// Sum over the first `rows` samples and their real tokens of the cosine
/// between `x` and `y`'s token vectors, and the number of tokens summed.
pub fn token_cosines(
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
    let (xs, ys) = (contiguous(x)?, contiguous(y)?);
    let (mut sum, mut count) = (0f64, 0f64);
    for sample in 0..rows {
        for t in 0..tokens {
            if !real_token(mask, sample, t, tokens) {
                continue;
            }
            let offset = (sample * tokens + t) * width;
            let (u, v) = (&xs[offset..offset + width], &ys[offset..offset + width]);
            let (dot, nu, nv) = dot_and_norms(u, v);
            sum += dot / (nu.sqrt() * nv.sqrt()).max(1e-30);
            count += 1.0;
        }
    }
    Ok((sum, count))
}

/// Per-channel sums of `term(value)` over the real tokens of batches: what
/// [`Energy`] (squares) and [`Mean`] (values) share.
#[derive(Debug, Clone, Default)]
struct ChannelSums {
    sums: Vec<f64>,
    tokens: f64,
}

impl ChannelSums {
    fn add(
        &mut self,
        values: &ArrayD<f32>,
        mask: Option<&Array>,
        rows: usize,
        term: fn(f64) -> f64,
    ) -> Result<(), RuntimeError> {
        let (tokens, width) = token_layout(values);
        let flat = contiguous(values)?;
        self.sums.resize(width, 0.0);
        for sample in 0..rows {
            for token in 0..tokens {
                if !real_token(mask, sample, token, tokens) {
                    continue;
                }
                let offset = (sample * tokens + token) * width;
                for (a, &v) in self.sums.iter_mut().zip(&flat[offset..offset + width]) {
                    *a += term(v as f64);
                }
                self.tokens += 1.0;
            }
        }
        Ok(())
    }

    fn means(self) -> Vec<f64> {
        let n = self.tokens.max(1.0);
        self.sums.into_iter().map(|a| a / n).collect()
    }
}

/// Per-channel sums of squares over the real tokens of a batch.
#[derive(Debug, Clone, Default)]
pub struct Energy(ChannelSums);

impl Energy {
    /// Adds the real tokens of the first `rows` samples of `values`.
    pub fn add(
        &mut self,
        values: &ArrayD<f32>,
        mask: Option<&Array>,
        rows: usize,
    ) -> Result<(), RuntimeError> {
        self.0.add(values, mask, rows, |v| v * v)
    }

    /// The mean square of each channel.
    pub fn means(self) -> Vec<f64> {
        self.0.means()
    }
}

/// Per-channel sums over the real tokens of a batch (for means).
#[derive(Debug, Clone, Default)]
pub struct Mean(ChannelSums);

impl Mean {
    /// Adds the real tokens of the first `rows` samples of `values`.
    pub fn add(
        &mut self,
        values: &ArrayD<f32>,
        mask: Option<&Array>,
        rows: usize,
    ) -> Result<(), RuntimeError> {
        self.0.add(values, mask, rows, |v| v)
    }

    /// The mean of each channel.
    pub fn means(self) -> Vec<f64> {
        self.0.means()
    }
}

/// Most tokens a second-moment accumulation reads (longer runs take every
/// k-th).
pub const GRAM_TOKENS: usize = 16384;

/// The sum of `[a; 1][a; 1]ᵀ` over (a subsample of) real tokens.
#[derive(Debug, Clone)]
pub struct SecondMoment {
    sum: Array2<f64>,
    tokens: f64,
}

impl Default for SecondMoment {
    fn default() -> Self {
        Self {
            sum: Array2::zeros((0, 0)),
            tokens: 0.0,
        }
    }
}

impl SecondMoment {
    /// Every token of the run whose position (counted over all samples from
    /// `start`, `tokens` per sample) is a multiple of `stride` is added, if
    /// it is real. The cost is tokens × width², so long runs are subsampled.
    pub fn add(
        &mut self,
        values: &ArrayD<f32>,
        mask: Option<&Array>,
        start: usize,
        rows: usize,
        stride: usize,
    ) -> Result<(), RuntimeError> {
        let (tokens, width) = token_layout(values);
        let flat = contiguous(values)?;
        let picked: Vec<usize> = (0..rows * tokens)
            .filter(|i| {
                let global = start * tokens + i;
                global.is_multiple_of(stride) && real_token(mask, i / tokens, i % tokens, tokens)
            })
            .collect();
        // [a; 1] per picked token.
        let mut m = Array2::<f32>::zeros((picked.len(), width + 1));
        for (mut row, &i) in m.outer_iter_mut().zip(&picked) {
            let row = row
                .as_slice_mut()
                .expect("a new array's rows are contiguous");
            row[..width].copy_from_slice(&flat[i * width..(i + 1) * width]);
            row[width] = 1.0;
        }
        if self.sum.nrows() != width + 1 {
            self.sum = Array2::zeros((width + 1, width + 1));
        }
        // mᵀm by symmetric tiles on every thread (f32 products, summed in
        // f64 across batches; the lower tiles mirrored once, in `mean`):
        // tokens × width² is most of a statistics pass.
        crate::linalg::add_gram(m.t(), &mut self.sum);
        self.tokens += picked.len() as f64;
        Ok(())
    }

    /// The mean of `[a; 1][a; 1]ᵀ` (`(width + 1)²`; the last row and column
    /// carry the mean of `a`).
    pub fn mean(mut self) -> Array2<f64> {
        crate::linalg::mirror_tiles(&mut self.sum);
        self.sum / self.tokens.max(1.0)
    }
}

/// The token stride that keeps a second-moment accumulation over `samples`
/// samples of `tokens` tokens at about [`GRAM_TOKENS`] tokens.
pub fn gram_stride(samples: usize, tokens: usize) -> usize {
    (samples * tokens).div_ceil(GRAM_TOKENS).max(1)
}

/// Tokens per sample of a tapped `[batch, …, channels]` tensor.
pub fn tokens_per_sample(values: &ArrayD<f32>) -> usize {
    token_layout(values).0
}

/// One row per sample from a `[batch, tokens, channels]` (or `[batch, d]`)
/// output.
pub fn pool(
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

/// `(u·v, |u|², |v|²)` accumulated in f64.
pub fn dot_and_norms(u: &[f32], v: &[f32]) -> (f64, f64, f64) {
    let (mut dot, mut nu, mut nv) = (0f64, 0f64, 0f64);
    for (&p, &q) in u.iter().zip(v) {
        dot += p as f64 * q as f64;
        nu += p as f64 * p as f64;
        nv += q as f64 * q as f64;
    }
    (dot, nu, nv)
}

/// The cosine similarity of two vectors; two zero vectors are identical (1).
pub fn cosine(u: &[f32], v: &[f32]) -> f64 {
    let (dot, nu, nv) = dot_and_norms(u, v);
    if nu == 0.0 && nv == 0.0 {
        1.0
    } else {
        dot / (nu.sqrt() * nv.sqrt()).max(1e-30)
    }
}

/// Index of the largest value (the first of equal ones).
pub fn argmax(values: &[f32]) -> usize {
    values
        .iter()
        .enumerate()
        .fold(0, |best, (i, v)| if *v > values[best] { i } else { best })
}
