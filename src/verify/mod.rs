//! Fidelity of a pruned model against the original on held-out samples
//! (never used for decisions), both run by ONNX Runtime as deployed (graph
//! optimisations on).

use serde::Serialize;

use crate::calib::collect::Batching;
use crate::calib::data::{Array, Inputs};
use crate::calib::stats::{argmax, cosine};
use crate::calib::{Runtime, RuntimeError, RuntimeOptions};

/// Agreement of one output.
#[derive(Debug, Clone, Serialize)]
pub struct OutputFidelity {
    /// Output name.
    pub name: String,
    /// Mean over samples of the cosine similarity between the original's
    /// and the pruned model's output for that sample.
    pub cosine: f64,
}

/// How closely the pruned model follows the original.
#[derive(Debug, Clone, Serialize)]
pub struct Fidelity {
    /// Held-out samples compared.
    pub samples: usize,
    /// Per output.
    pub outputs: Vec<OutputFidelity>,
    /// The smallest per-output cosine (what `--min-fidelity` gates on).
    pub min_cosine: f64,
    /// CLIP-style models (`logits_per_image`): how often each image's
    /// top-1 text within its batch is the same for both models.
    pub top1_agreement: Option<f64>,
    /// How many different texts the original's top-1 picks are, per image
    /// compared (1: every image its own text). Where it is low the
    /// original ranks one text first for most images (an untrained or
    /// degenerate model), one flip changes the top-1 of a whole batch, and
    /// the agreement says little.
    pub top1_spread: Option<f64>,
}

/// The original model's outputs on the compared samples, batch by batch:
/// computed once, and every candidate judged against them (the closed-loop
/// search compares a dozen plans with the same original).
#[derive(Debug)]
pub struct Reference {
    samples: usize,
    fixed_batch: Option<usize>,
    batches: Vec<Vec<(String, Array)>>,
}

impl Reference {
    /// Runs `samples` rows of `inputs` through `original` (`batch` rows at a
    /// time, padded to `fixed_batch` when the model has a static batch
    /// size), ONNX Runtime optimisations on.
    pub fn run(
        original: &[u8],
        inputs: &Inputs,
        samples: usize,
        fixed_batch: Option<usize>,
        options: &RuntimeOptions,
    ) -> Result<Reference, RuntimeError> {
        let mut a = Runtime::from_bytes(original, &deployed(options))?;
        let batching = Batching::new(samples, fixed_batch)?;
        let batches = batching
            .ranges()
            .map(|range| a.run(&batching.feed(inputs, range)))
            .collect::<Result<_, _>>()?;
        Ok(Reference {
            samples,
            fixed_batch,
            batches,
        })
    }
}

/// As deployed: graph optimisations on.
fn deployed(options: &RuntimeOptions) -> RuntimeOptions {
    RuntimeOptions {
        optimize: true,
        ..options.clone()
    }
}

/// Runs `samples` rows of `inputs` through both models (`batch` rows at a
/// time, padded to `fixed` when the model has a static batch size) and
/// compares their outputs.
pub fn compare(
    original: &[u8],
    pruned: &[u8],
    inputs: &Inputs,
    samples: usize,
    fixed_batch: Option<usize>,
    options: &RuntimeOptions,
) -> Result<Fidelity, RuntimeError> {
    let reference = Reference::run(original, inputs, samples, fixed_batch, options)?;
    compare_to(&reference, pruned, inputs, options)
}

/// Runs the samples `reference` was made from through `pruned` and compares
/// its outputs with the original's.
pub fn compare_to(
    reference: &Reference,
    pruned: &[u8],
    inputs: &Inputs,
    options: &RuntimeOptions,
) -> Result<Fidelity, RuntimeError> {
    let samples = reference.samples;
    let mut b = Runtime::from_bytes(pruned, &deployed(options))?;
    let batching = Batching::new(samples, reference.fixed_batch)?;
    let mut sums: Vec<(String, f64)> = Vec::new();
    let (mut agree, mut compared, mut distinct) = (0usize, 0usize, 0usize);
    for (range, ra) in batching.ranges().zip(&reference.batches) {
        let (start, end, take) = (range.start, range.end, range.take);
        let feed = batching.feed(inputs, range);
        let rb = b.run(&feed)?;
        for ((name, x), (_, y)) in ra.iter().zip(&rb) {
            let (Array::F32(x), Array::F32(y)) = (x, y) else {
                continue;
            };
            if x.shape() != y.shape() {
                return Err(RuntimeError::Session(format!(
                    "output '{name}' changed shape: {:?} vs {:?}",
                    x.shape(),
                    y.shape()
                )));
            }
            // Row-major copies only if ONNX Runtime handed out another layout.
            let (x, y) = (x.as_standard_layout(), y.as_standard_layout());
            let (Some(xs), Some(ys)) = (x.as_slice(), y.as_slice()) else {
                return Err(RuntimeError::Session(format!(
                    "output '{name}' is not contiguous"
                )));
            };
            let batched = x.ndim() >= 1 && x.shape()[0] == take;
            let width = x.len() / take.max(1);
            let sum = if batched {
                (0..end - start)
                    .map(|r| cosine(row(xs, width, r), row(ys, width, r)))
                    .sum()
            } else {
                // An output without a batch axis (a scalar such as
                // exp(logit_scale), a pooled statistic): compared as one
                // vector, weighted like the rows of this batch so the mean
                // over samples stays a mean.
                cosine(xs, ys) * (end - start) as f64
            };
            match sums.iter_mut().find(|(n, _)| n == name) {
                Some(entry) => entry.1 += sum,
                None => sums.push((name.clone(), sum)),
            }
            if batched && name == "logits_per_image" && x.ndim() == 2 {
                let mut picks = std::collections::BTreeSet::new();
                for r in 0..end - start {
                    let (u, v) = (row(xs, width, r), row(ys, width, r));
                    agree += usize::from(argmax(u) == argmax(v));
                    picks.insert(argmax(u));
                    compared += 1;
                }
                distinct += picks.len();
            }
        }
    }
    let outputs: Vec<OutputFidelity> = sums
        .into_iter()
        .map(|(name, s)| OutputFidelity {
            name,
            cosine: s / samples.max(1) as f64,
        })
        .collect();
    // A NaN output (an overflowed float16 stream, say) follows nothing:
    // it counts as the worst cosine, not as missing (f64::min would skip it).
    let min_cosine = outputs
        .iter()
        .map(|o| if o.cosine.is_nan() { -1.0 } else { o.cosine })
        .fold(f64::INFINITY, f64::min);
    Ok(Fidelity {
        samples,
        outputs,
        min_cosine: if min_cosine.is_finite() {
            min_cosine
        } else {
            0.0
        },
        top1_agreement: (compared > 0).then(|| agree as f64 / compared as f64),
        top1_spread: (compared > 0).then(|| distinct as f64 / compared as f64),
    })
}

/// Row `r` of a row-major matrix `width` wide.
fn row(a: &[f32], width: usize, r: usize) -> &[f32] {
    &a[r * width..(r + 1) * width]
}
