//! Fidelity of a pruned model against the original on held-out samples
//! (never used for decisions), both run by ONNX Runtime as deployed (graph
//! optimisations on).

use serde::Serialize;

use crate::calib::collect::Batching;
use ndarray::ArrayD;

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
    /// Captioners and other token predictors (a 3-D `logits` output, one
    /// row of scores per position): how often the most likely next token
    /// is the same for both models under teacher forcing, over the positions
    /// `attention_mask` marks as text (every position without one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_token_agreement: Option<f64>,
    /// Captioners: greedy captions of both models compared (see
    /// [`compare_captions`]); measured by the final verification only, not
    /// by the judge.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub captions: Option<CaptionAgreement>,
    /// Why greedy captions were not compared for a captioner (a static
    /// batch size, a failed generation step).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub captions_note: Option<String>,
    /// Decoders with a key/value cache: greedy generations of both models,
    /// step by step with their caches (see [`compare_generations`]);
    /// measured by the final verification only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generations: Option<GenerationAgreement>,
}

/// Greedy generations of a pruned decoder against the original's, each
/// model fed its own cache step by step as deployed: from the first
/// [`PROMPT_TOKENS`] tokens of each held-out sequence, [`GENERATED_TOKENS`]
/// tokens.
#[derive(Debug, Clone, Serialize)]
pub struct GenerationAgreement {
    /// Prompts generated from.
    pub prompts: usize,
    /// Tokens of each prompt.
    pub prompt_tokens: usize,
    /// Tokens generated per prompt.
    pub tokens: usize,
    /// Share of prompts the pruned model continues exactly as the original.
    pub exact_match: f64,
    /// Share of generated positions holding the original's token.
    pub token_agreement: f64,
}

/// Tokens of each held-out sequence a generation starts from.
pub const PROMPT_TOKENS: usize = 4;
/// Tokens generated from each prompt.
pub const GENERATED_TOKENS: usize = 8;

/// A decoder's cache: (past input, present output) pairs, the present
/// being `Concat(past, new)`.
pub fn cache_pairs(graph: &crate::ir::Graph) -> Vec<(String, String)> {
    graph
        .outputs
        .iter()
        .filter_map(|o| {
            let present = o.name();
            let node = graph.node(graph.producer_node(present)?);
            // GroupQueryAttention writes the presents at outputs 1 and 2
            // from the pasts at inputs 3 and 4.
            if node.op() == "GroupQueryAttention" {
                let slot = node.outputs().iter().position(|v| v == present)?;
                let past = node
                    .inputs()
                    .get(slot + 2)
                    .filter(|_| slot == 1 || slot == 2)?;
                return Some((copied_input(graph, past)?, present.to_string()));
            }
            if node.op() != "Concat" || node.inputs().len() != 2 {
                return None;
            }
            Some((copied_input(graph, &node.inputs()[0])?, present.to_string()))
        })
        .collect()
}

/// Greedy generation with the cache from both models on the prompts of
/// `inputs` (none when `graph`, the original, has no cache, no
/// `input_ids` or sequences shorter than a prompt).
pub fn compare_generations(
    original: &[u8],
    pruned: &[u8],
    graph: &crate::ir::Graph,
    inputs: &Inputs,
    samples: usize,
    logits: &str,
    options: &RuntimeOptions,
) -> Result<Option<GenerationAgreement>, RuntimeError> {
    let Some(Array::I64(ids)) = inputs.get("input_ids") else {
        return Ok(None);
    };
    if cache_pairs(graph).is_empty() || ids.ndim() != 2 || ids.shape()[1] < PROMPT_TOKENS {
        return Ok(None);
    }
    // Prompts of real tokens only (a padded sequence's prompt would be
    // padding).
    let real = text_mask(inputs, ids.shape()[0], ids.shape()[1]);
    let rows: Vec<usize> = (0..samples.min(ids.shape()[0]))
        .filter(|&r| {
            real.as_ref().is_none_or(|m| {
                let width = ids.shape()[1];
                m[r * width..r * width + PROMPT_TOKENS]
                    .iter()
                    .all(|&v| v != 0)
            })
        })
        .collect();
    if rows.is_empty() {
        return Ok(None);
    }
    let prompts =
        ndarray::Array2::from_shape_fn((rows.len(), PROMPT_TOKENS), |(r, p)| ids[[rows[r], p]]);
    let mut a = Runtime::from_bytes(original, &deployed(options))?;
    let mut b = Runtime::from_bytes(pruned, &deployed(options))?;
    // The rewrite keeps every name: the original's pairs name the pruned
    // model's (those it still has).
    let pairs = cache_pairs(graph);
    // An original this loop cannot drive (another cache interface) is not
    // compared; a pruned model that cannot generate with its cache is
    // broken, and that is an error.
    // The head width of each past (a model may declare it symbolically).
    let widths: Vec<Option<usize>> = pairs
        .iter()
        .map(|(past, _)| crate::calib::npz::cache_input(graph, past).map(|[_, w]| w))
        .collect();
    let Ok(ga) = generate_cached(&mut a, &prompts, logits, &pairs, &widths) else {
        return Ok(None);
    };
    let gb = generate_cached(&mut b, &prompts, logits, &pairs, &widths)?;
    let exact = ga.iter().zip(&gb).filter(|(x, y)| x == y).count();
    let same: usize = ga
        .iter()
        .zip(&gb)
        .map(|(x, y)| x.iter().zip(y).filter(|(p, q)| p == q).count())
        .sum();
    Ok(Some(GenerationAgreement {
        prompts: rows.len(),
        prompt_tokens: PROMPT_TOKENS,
        tokens: GENERATED_TOKENS,
        exact_match: exact as f64 / rows.len() as f64,
        token_agreement: same as f64 / (rows.len() * GENERATED_TOKENS) as f64,
    }))
}

/// [`GENERATED_TOKENS`] greedy tokens after each prompt row, the cache fed
/// back step by step (it starts empty); `CAPTION_BATCH` prompts at a time.
fn generate_cached(
    model: &mut Runtime,
    prompts: &ndarray::Array2<i64>,
    logits: &str,
    pairs: &[(String, String)],
    widths: &[Option<usize>],
) -> Result<Vec<Vec<i64>>, RuntimeError> {
    let inputs = model.input_dims();
    let takes = |name: &str| inputs.iter().any(|(n, _)| n == name);
    // The past inputs this model takes, with their declared dims (a head
    // width declared symbolically taken from `widths`).
    let pasts: Vec<(String, Vec<i64>, String)> = pairs
        .iter()
        .zip(widths)
        .filter_map(|((past, present), width)| {
            let (_, dims) = inputs.iter().find(|(n, _)| n == past)?;
            let mut dims = dims.clone();
            if let (4, Some(w)) = (dims.len(), width)
                && dims[3] < 0
            {
                dims[3] = *w as i64;
            }
            (dims.len() == 4).then(|| (past.clone(), dims, present.clone()))
        })
        .collect();
    let mut out = Vec::with_capacity(prompts.nrows());
    for start in (0..prompts.nrows()).step_by(CAPTION_BATCH) {
        let end = (start + CAPTION_BATCH).min(prompts.nrows());
        let rows = end - start;
        let mut step_ids = prompts.slice(ndarray::s![start..end, ..]).to_owned();
        let mut cache: Vec<(String, Array, String)> = pasts
            .iter()
            .map(|(name, dims, present)| {
                let d = |i: usize| usize::try_from(dims[i]).unwrap_or(0);
                let empty = ndarray::ArrayD::<f32>::zeros(ndarray::IxDyn(&[rows, d(1), 0, d(3)]));
                (name.clone(), Array::F32(empty), present.clone())
            })
            .collect();
        let mut done = 0usize;
        let mut tokens: Vec<Vec<i64>> = vec![Vec::new(); rows];
        for _ in 0..GENERATED_TOKENS {
            let new = step_ids.ncols();
            let mut feed = Inputs::new();
            feed.insert("input_ids".into(), Array::I64(step_ids.clone().into_dyn()));
            if takes("attention_mask") {
                let ones = ndarray::Array2::<i64>::ones((rows, done + new));
                feed.insert("attention_mask".into(), Array::I64(ones.into_dyn()));
            }
            if takes("position_ids") {
                let positions =
                    ndarray::Array2::from_shape_fn((rows, new), |(_, p)| (done + p) as i64);
                feed.insert("position_ids".into(), Array::I64(positions.into_dyn()));
            }
            for (name, value, _) in &cache {
                feed.insert(name.clone(), value.clone());
            }
            let outputs = model.run(&feed)?;
            let Some((_, Array::F32(scores))) = outputs.iter().find(|(n, _)| n == logits) else {
                return Err(RuntimeError::Session(format!(
                    "generation: output '{logits}' is missing or not float"
                )));
            };
            if scores.ndim() != 3 || scores.shape()[0] != rows || scores.shape()[1] != new {
                return Err(RuntimeError::Session(format!(
                    "generation: '{logits}' has shape {:?} for {rows} sequences of {new} tokens",
                    scores.shape()
                )));
            }
            let vocab = scores.shape()[2];
            let scores = scores.as_standard_layout();
            let flat = scores.as_slice().expect("standard layout");
            let next: Vec<i64> = (0..rows)
                .map(|r| {
                    let at = (r * new + new - 1) * vocab;
                    argmax(&flat[at..at + vocab]) as i64
                })
                .collect();
            for (t, n) in tokens.iter_mut().zip(&next) {
                t.push(*n);
            }
            // Each past input takes the present the model wrote for it.
            for (past, value, present) in cache.iter_mut() {
                let Some((_, written)) = outputs.iter().find(|(n, _)| n == present) else {
                    return Err(RuntimeError::Session(format!(
                        "generation: no output '{present}' to feed '{past}' with"
                    )));
                };
                *value = written.clone();
            }
            done += new;
            step_ids = ndarray::Array2::from_shape_vec((rows, 1), next).expect("one per row");
        }
        out.extend(tokens);
    }
    Ok(out)
}

/// Greedy captions of the pruned model against the original's, on the
/// held-out images, from each caption's first token (`[BOS]`) for as many
/// tokens as the held-out captions hold.
#[derive(Debug, Clone, Serialize)]
pub struct CaptionAgreement {
    /// Captions compared.
    pub captions: usize,
    /// Tokens generated per caption (each is compared as far as its
    /// held-out reference caption runs, by its attention mask).
    pub tokens: usize,
    /// Share of captions the pruned model generates exactly as the original.
    pub exact_match: f64,
    /// Share of compared positions holding the original's token (position
    /// by position, so one early difference counts every later one it
    /// changes).
    pub token_agreement: f64,
}

/// The original model's outputs on the compared samples, batch by batch:
/// computed once, and every candidate judged against them (the closed-loop
/// search compares a dozen plans with the same original).
#[derive(Debug)]
pub struct Reference {
    samples: usize,
    fixed_batch: Option<usize>,
    batches: Vec<Vec<(String, Array)>>,
    /// Outputs not compared: a decoder's present keys and values, state
    /// for the next step rather than a result (a pruned model may narrow or
    /// drop them; its logits carry what they change).
    ignored: Vec<String>,
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
            .map(|range| a.run(&batching.feed(inputs, range)).map(with_similarities))
            .collect::<Result<_, _>>()?;
        Ok(Reference {
            samples,
            fixed_batch,
            batches,
            ignored: Vec::new(),
        })
    }

    /// The same reference, not comparing `outputs`.
    pub fn ignoring(self, outputs: Vec<String>) -> Self {
        Self {
            ignored: outputs,
            ..self
        }
    }
}

/// A decoder's present key/value outputs: graph outputs made by
/// concatenating a graph input (the past) with this step's keys or values.
pub fn cache_outputs(graph: &crate::ir::Graph) -> Vec<String> {
    cache_pairs(graph).into_iter().map(|(_, p)| p).collect()
}

/// The graph input `value` copies (through `Identity` and one-input
/// `Concat`, as TorchScript exports read a past), if any.
fn copied_input(graph: &crate::ir::Graph, value: &str) -> Option<String> {
    let mut value = value.to_string();
    for _ in 0..8 {
        match graph.producer(&value) {
            Some(crate::ir::Producer::Input) => return Some(value),
            Some(crate::ir::Producer::Node(..)) => {
                let node = graph.node(graph.producer_node(&value)?);
                let copy =
                    node.op() == "Identity" || (node.op() == "Concat" && node.inputs().len() == 1);
                if !copy {
                    return None;
                }
                value = node.inputs()[0].clone();
            }
            _ => return None,
        }
    }
    None
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
    let (mut tokens_agree, mut tokens_compared) = (0usize, 0usize);
    for (range, ra) in batching.ranges().zip(&reference.batches) {
        let (start, end, take) = (range.start, range.end, range.take);
        let feed = batching.feed(inputs, range);
        let rb = with_similarities(b.run(&feed)?);
        for (name, x) in ra {
            if reference.ignored.contains(name) {
                continue;
            }
            let Some((_, y)) = rb.iter().find(|(n, _)| n == name) else {
                return Err(RuntimeError::Session(format!(
                    "output '{name}' is missing from the pruned model"
                )));
            };
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
            if batched && is_named(name, "logits_per_image") && x.ndim() == 2 {
                let mut picks = std::collections::BTreeSet::new();
                for r in 0..end - start {
                    let (u, v) = (row(xs, width, r), row(ys, width, r));
                    agree += usize::from(argmax(u) == argmax(v));
                    picks.insert(argmax(u));
                    compared += 1;
                }
                distinct += picks.len();
            }
            if batched && x.ndim() == 3 && is_named(name, "logits") {
                let (positions, vocab) = (x.shape()[1], x.shape()[2]);
                let mask = text_mask(&feed, take, positions);
                for r in 0..end - start {
                    for p in 0..positions {
                        if mask.as_ref().is_some_and(|m| m[r * positions + p] == 0) {
                            continue;
                        }
                        let at = (r * positions + p) * vocab;
                        let (u, v) = (&xs[at..at + vocab], &ys[at..at + vocab]);
                        tokens_agree += usize::from(argmax(u) == argmax(v));
                        tokens_compared += 1;
                    }
                }
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
        next_token_agreement: (tokens_compared > 0)
            .then(|| tokens_agree as f64 / tokens_compared as f64),
        captions: None,
        captions_note: None,
        generations: None,
    })
}

/// Whether output `output` is `name` or a folder's `…/name`.
fn is_named(output: &str, name: &str) -> bool {
    output == name
        || output
            .strip_suffix(name)
            .is_some_and(|rest| rest.ends_with('/'))
}

/// The fed `attention_mask` as `take × positions` flags, when there is one
/// of that shape.
fn text_mask(feed: &Inputs, take: usize, positions: usize) -> Option<Vec<i64>> {
    let mask = feed.get("attention_mask")?;
    if mask.shape() != [take, positions] {
        return None;
    }
    match mask {
        Array::I64(a) => Some(a.iter().copied().collect()),
        Array::I32(a) => Some(a.iter().map(|&v| i64::from(v)).collect()),
        Array::Bool(a) => Some(a.iter().map(|&v| i64::from(v)).collect()),
        Array::F32(a) => Some(a.iter().map(|&v| i64::from(v != 0.0)).collect()),
    }
}

/// A captioner: a model reading images and `input_ids` (with a sequence
/// axis it may grow) and giving 3-D `logits`. The name of its logits
/// output, when `graph` is one.
pub fn captioner_logits(graph: &crate::ir::Graph) -> Option<String> {
    let reads = |name: &str| graph.inputs.iter().any(|i| i.name() == name);
    if !reads("pixel_values") {
        return None;
    }
    token_logits(graph)
}

/// A token predictor: a model reading `input_ids` with a sequence axis it
/// may grow and giving 3-D `logits` (a captioner, a decoder language
/// model). The name of its logits output.
pub fn token_logits(graph: &crate::ir::Graph) -> Option<String> {
    let reads = |name: &str| graph.inputs.iter().any(|i| i.name() == name);
    if !reads("input_ids") {
        return None;
    }
    let shape = graph.value_type("input_ids")?.shape?;
    if shape.len() != 2 || matches!(shape[1], crate::ir::Dim::Fixed(_)) {
        return None;
    }
    graph
        .outputs
        .iter()
        .map(|o| o.name())
        .find(|o| {
            is_named(o, "logits")
                && graph
                    .value_type(o)
                    .and_then(|t| t.shape)
                    .is_some_and(|s| s.len() == 3)
        })
        .map(str::to_string)
}

/// Greedy captions of `pruned` against `original`'s for the first
/// `samples` rows of `inputs`: each starts from the row's first token of
/// `input_ids` and takes the most likely next token, `input_ids` minus one
/// times (the model is run whole each step: no cache).
pub fn compare_captions(
    original: &[u8],
    pruned: &[u8],
    inputs: &Inputs,
    samples: usize,
    logits: &str,
    options: &RuntimeOptions,
) -> Result<Option<CaptionAgreement>, RuntimeError> {
    let Some(Array::I64(ids)) = inputs.get("input_ids") else {
        return Ok(None);
    };
    if ids.ndim() != 2 || ids.shape()[1] < 2 || samples == 0 {
        return Ok(None);
    }
    let length = ids.shape()[1];
    let mut a = Runtime::from_bytes(original, &deployed(options))?;
    let mut b = Runtime::from_bytes(pruned, &deployed(options))?;
    let first: Vec<i64> = (0..samples).map(|r| ids[[r, 0]]).collect();
    let ca = greedy(&mut a, inputs, samples, &first, length, logits)?;
    let cb = greedy(&mut b, inputs, samples, &first, length, logits)?;
    // Each caption is compared as far as its reference runs (the held-out
    // caption's real tokens, by its attention mask): past its end a model
    // emits whatever follows an end token, which says nothing.
    let real = text_mask(
        inputs,
        inputs.get("attention_mask").map_or(0, |m| m.shape()[0]),
        length,
    );
    let mut exact = 0usize;
    let (mut same, mut compared) = (0usize, 0usize);
    for (r, (x, y)) in ca.iter().zip(&cb).enumerate() {
        let tokens = match &real {
            Some(m) => m[r * length..(r + 1) * length]
                .iter()
                .filter(|&&v| v != 0)
                .count(),
            None => length,
        }
        .saturating_sub(1)
        .max(1);
        let (x, y) = (&x[..tokens], &y[..tokens]);
        exact += usize::from(x == y);
        same += x.iter().zip(y).filter(|(p, q)| p == q).count();
        compared += tokens;
    }
    Ok(Some(CaptionAgreement {
        captions: samples,
        tokens: length - 1,
        exact_match: exact as f64 / samples as f64,
        token_agreement: same as f64 / compared.max(1) as f64,
    }))
}

/// Greedy decoding of `length - 1` tokens after `first`, one batch of
/// [`CAPTION_BATCH`] rows at a time; the generated tokens per row.
fn greedy(
    model: &mut Runtime,
    inputs: &Inputs,
    samples: usize,
    first: &[i64],
    length: usize,
    logits: &str,
) -> Result<Vec<Vec<i64>>, RuntimeError> {
    let mut captions = Vec::with_capacity(samples);
    for start in (0..samples).step_by(CAPTION_BATCH) {
        let end = (start + CAPTION_BATCH).min(samples);
        let rows = end - start;
        let mut tokens: Vec<Vec<i64>> = first[start..end].iter().map(|&t| vec![t]).collect();
        let index: Vec<usize> = (start..end).collect();
        let batch: Inputs = inputs
            .iter()
            .map(|(k, v)| (k.clone(), v.select_rows(&index)))
            .collect();
        for step in 1..length {
            // Every other per-token input (position or token type ids) is
            // cut to the tokens so far; the rest is fed whole.
            let mut feed: Inputs = batch
                .iter()
                .filter(|(k, _)| *k != "input_ids" && *k != "attention_mask")
                .map(|(k, v)| {
                    let per_token = v.shape() == [rows, length];
                    let value = match v {
                        Array::I64(a) if per_token => {
                            Array::I64(a.slice_axis(ndarray::Axis(1), (0..step).into()).to_owned())
                        }
                        Array::I32(a) if per_token => {
                            Array::I32(a.slice_axis(ndarray::Axis(1), (0..step).into()).to_owned())
                        }
                        other => other.clone(),
                    };
                    (k.clone(), value)
                })
                .collect();
            let ids = ndarray::Array2::from_shape_fn((rows, step), |(r, p)| tokens[r][p]);
            feed.insert("input_ids".into(), Array::I64(ids.into_dyn()));
            if inputs.contains_key("attention_mask") {
                let ones = ndarray::Array2::<i64>::ones((rows, step));
                feed.insert("attention_mask".into(), Array::I64(ones.into_dyn()));
            }
            let outputs = model.run(&feed)?;
            let Some((_, Array::F32(scores))) = outputs.iter().find(|(n, _)| n == logits) else {
                return Err(RuntimeError::Session(format!(
                    "captioning: output '{logits}' is missing or not float"
                )));
            };
            // A language model reading image features before the text
            // gives logits for those positions too: the text's come last.
            if scores.ndim() != 3 || scores.shape()[0] != rows || scores.shape()[1] < step {
                return Err(RuntimeError::Session(format!(
                    "captioning: '{logits}' has shape {:?} for {rows} captions of {step} tokens",
                    scores.shape()
                )));
            }
            let (positions, vocab) = (scores.shape()[1], scores.shape()[2]);
            let scores = scores.as_standard_layout();
            let flat = scores.as_slice().expect("standard layout");
            for (r, caption) in tokens.iter_mut().enumerate() {
                let at = (r * positions + positions - 1) * vocab;
                caption.push(argmax(&flat[at..at + vocab]) as i64);
            }
        }
        captions.extend(tokens.into_iter().map(|mut t| t.split_off(1)));
    }
    Ok(captions)
}

/// Captions decoded together.
const CAPTION_BATCH: usize = 16;

/// The output named `name`, or `…/name` (a folder's joined outputs are
/// prefixed by their file), when exactly one matches.
fn find_output<'a>(outputs: &'a [(String, Array)], name: &str) -> Option<&'a ArrayD<f32>> {
    let mut found = outputs.iter().filter(|(n, _)| is_named(n, name));
    match (found.next(), found.next()) {
        (Some((_, Array::F32(a))), None) => Some(a),
        _ => None,
    }
}

/// A dual encoder exported as two files gives its towers' embeddings but no
/// image–text similarities. Where outputs hold `image_embeds` and
/// `text_embeds` (2-D, one row per sample, the same width) and no
/// `logits_per_image`, the similarities a single-file CLIP export gives are
/// added from them: `logits_per_image` (cosines of each image with each
/// text of the batch) and `logits_per_text`. They equal the single file's
/// up to its logit scale, which neither a cosine nor a top-1 depends on, so
/// a folder is judged and verified as the single file would be.
fn with_similarities(mut outputs: Vec<(String, Array)>) -> Vec<(String, Array)> {
    if outputs.iter().any(|(n, _)| is_named(n, "logits_per_image")) {
        return outputs;
    }
    let (Some(images), Some(texts)) = (
        find_output(&outputs, "image_embeds"),
        find_output(&outputs, "text_embeds"),
    ) else {
        return outputs;
    };
    if images.ndim() != 2 || texts.ndim() != 2 || images.shape() != texts.shape() {
        return outputs;
    }
    let unit = |a: &ArrayD<f32>| {
        let mut a = a
            .clone()
            .into_dimensionality::<ndarray::Ix2>()
            .expect("2-D checked above");
        for mut row in a.rows_mut() {
            let norm = row
                .iter()
                .map(|&x| f64::from(x) * f64::from(x))
                .sum::<f64>()
                .sqrt();
            if norm > 0.0 {
                row.mapv_inplace(|x| (f64::from(x) / norm) as f32);
            }
        }
        a
    };
    let (images, texts) = (unit(images), unit(texts));
    let per_image = images.dot(&texts.t());
    let per_text = per_image.t().to_owned();
    outputs.push(("logits_per_image".into(), Array::F32(per_image.into_dyn())));
    outputs.push(("logits_per_text".into(), Array::F32(per_text.into_dyn())));
    outputs
}

/// Row `r` of a row-major matrix `width` wide.
fn row(a: &[f32], width: usize, r: usize) -> &[f32] {
    &a[r * width..(r + 1) * width]
}
