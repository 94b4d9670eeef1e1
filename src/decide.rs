//! From calibration to a plan: block influence and intrinsic dimension of
//! every sub-block, then the global-threshold allocation
//! ([`crate::plan::importance`]).
//!
//! The calibration file is split: the first samples (up to `--samples`)
//! drive the decisions; the last ones (`--holdout`) are kept aside for
//! verification and never seen here.

use std::collections::HashMap;

use crate::arch::{Architecture, TowerKind};
use crate::calib::collect::{self, Tap};
use crate::calib::data::{self, Inputs};
use crate::calib::{CalibSource, Provider};
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
    /// Sub-blocks, then heads and neurons of what remains: the split of
    /// the budget between them is chosen on the calibration samples.
    All,
    /// The paper's one-shot masking: weights with the smallest |w| · ID
    /// (ID of the linear layer's output) are zeroed, at one global
    /// quantile over both towers (`--sparsity`). Nothing is removed.
    Unstructured,
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
    /// Block parameters to keep, overall and per tower.
    pub budget: importance::Budget,
    /// `unstructured` mode: the fraction of block weight-matrix elements to
    /// zero (else 1 − the overall kept fraction).
    pub sparsity: Option<f64>,
    /// Refit the projections after slimmed sub-blocks by least squares on
    /// the decision samples (recorded in the plan).
    pub repair: bool,
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
    /// `unstructured` mode: the masking of every linear layer.
    pub masks: Vec<Mask>,
    /// `all` mode: each share of the budget tried on sub-blocks (the rest
    /// going to heads and neurons) and how closely the result followed the
    /// original on decision samples.
    pub split_trials: Vec<SplitTrial>,
}

/// One split of the budget tried in `all` mode.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SplitTrial {
    /// Share of the removed parameters taken as whole sub-blocks.
    pub sub_block_share: f64,
    /// Smallest per-output cosine to the original on the judged samples.
    pub min_cosine: f64,
    /// Top-1 agreement on the judged samples (CLIP-style outputs).
    pub top1_agreement: Option<f64>,
    /// Whether this split was chosen.
    pub chosen: bool,
}

/// Decision samples the `all` search judges each split on.
const JUDGE_SAMPLES: usize = 64;

/// `all` mode: removes sub-blocks with a share of the budget and heads and
/// neurons of the remaining sub-blocks with the rest, for several shares,
/// and keeps the plan whose outputs follow the original most closely on
/// (the first [`JUDGE_SAMPLES`] of) the decision samples — never on the
/// held-out ones. Ties go to the larger sub-block share (whole sub-blocks
/// save more time than slimmed ones).
fn search_split(
    source: &Source,
    arch: &Architecture,
    candidates: &[Candidate],
    units: &[importance::Unit],
    inputs: &Inputs,
    samples: usize,
    options: &DecideOptions,
) -> Result<(Plan, Vec<Candidate>, Vec<SplitTrial>), Error> {
    let graph = &source.model.graph;
    let judged = samples.min(JUDGE_SAMPLES);
    let judge_inputs: Inputs = inputs
        .iter()
        .map(|(k, v)| (k.clone(), v.rows(0, judged)))
        .collect();
    let original = crate::onnx::encode_to_vec(&source.model.to_proto());
    let fixed = crate::calib::collect::static_batch(&source.model);
    let mut options_tried = Vec::new();
    for share in [0.0, 0.25, 0.5, 0.75, 1.0] {
        let mut chosen = candidates.to_vec();
        let blocks_plan = importance::allocate(
            arch,
            &mut chosen,
            options.score,
            &options.budget.scaled(share),
        );
        let spent = importance::removed_params(arch, graph, &blocks_plan);
        let gone = |t: TowerKind, b: usize, p: Part| {
            chosen
                .iter()
                .any(|c| c.removed && c.tower == t && c.block == b && c.part == p)
        };
        let mut rest: Vec<importance::Unit> = units
            .iter()
            .filter(|u| !gone(u.tower, u.block, u.part))
            .cloned()
            .collect();
        let units_plan =
            importance::allocate_units(arch, &mut rest, &mut chosen, &options.budget, &spent);
        let plan = with_repair(merge_plans(&blocks_plan, &units_plan), options, samples);
        options_tried.push((share, plan, chosen));
    }
    // Repair statistics once for every layer any split refits.
    let statistics = if options.repair {
        let plans: Vec<&Plan> = options_tried.iter().map(|o| &o.1).collect();
        let mask = data::mask_input(graph, inputs);
        crate::rewrite::repair::statistics(
            &source.model,
            arch,
            &plans,
            inputs,
            samples,
            mask.as_deref(),
            &options.profile.runtime,
        )?
    } else {
        Default::default()
    };
    let mut trials = Vec::new();
    let mut best: Option<(f64, Plan, Vec<Candidate>, usize)> = None;
    for (share, plan, chosen) in options_tried {
        let mut model = source.model.clone();
        crate::rewrite::apply(&mut model, arch, &plan)?;
        if plan.repair.is_some() {
            crate::rewrite::repair::apply(&source.model, &mut model, arch, &plan, &statistics)?;
        }
        let candidate = crate::onnx::encode_to_vec(&model.to_proto());
        let fidelity = crate::verify::compare(
            &original,
            &candidate,
            &judge_inputs,
            judged,
            fixed,
            &options.profile.runtime,
        )?;
        let score = fidelity.min_cosine;
        trials.push(SplitTrial {
            sub_block_share: share,
            min_cosine: score,
            top1_agreement: fidelity.top1_agreement,
            chosen: false,
        });
        if best.as_ref().is_none_or(|b| score >= b.0) {
            best = Some((score, plan, chosen, trials.len() - 1));
        }
    }
    let (_, plan, chosen, index) = best.expect("five trials ran");
    trials[index].chosen = true;
    Ok((plan, chosen, trials))
}

/// Records the least-squares repair in `plan` when asked for and there is
/// something to refit.
fn with_repair(mut plan: Plan, options: &DecideOptions, samples: usize) -> Plan {
    if options.repair && plan.slims() {
        plan.repair = Some(crate::plan::Repair {
            method: "lsq".into(),
            samples,
        });
    }
    plan
}

/// One plan with the actions of both (they touch different sub-blocks).
fn merge_plans(a: &Plan, b: &Plan) -> Plan {
    let mut blocks = a.blocks.clone();
    for action in &b.blocks {
        match blocks
            .iter_mut()
            .find(|x| x.tower == action.tower && x.index == action.index)
        {
            Some(x) if x.drop => {}
            Some(x) => {
                if !x.drop_attention {
                    x.keep_heads = action.keep_heads.clone();
                }
                if !x.drop_mlp {
                    x.keep_mlp = action.keep_mlp.clone();
                }
            }
            None => blocks.push(action.clone()),
        }
    }
    Plan {
        blocks,
        ..Plan::empty()
    }
    .normalized()
}

/// The unstructured masking of one linear layer.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Mask {
    /// Tower.
    pub tower: TowerKind,
    /// Block index.
    pub block: usize,
    /// `q`, `k`, `v`, `qkv`, `out`, `fc1` or `fc2`.
    pub role: &'static str,
    /// Intrinsic dimension of the layer's output.
    pub id: f64,
    /// Weights with |w| below this are zeroed (the global |w|·ID quantile
    /// divided by `id`).
    pub threshold: f64,
    /// Weights zeroed.
    pub zeroed: u64,
    /// Weights in the layer.
    pub total: u64,
}

/// The calibration file split into decision and held-out samples.
struct Split {
    decision: Inputs,
    samples: usize,
    holdout: Inputs,
    holdout_samples: usize,
    mask: Option<String>,
}

fn split(source: &Source, calib: &CalibSource, options: &DecideOptions) -> Result<Split, Error> {
    let graph = &source.model.graph;
    let (inputs, total) = calib.load(graph, options.profile.samples + options.holdout)?;
    let holdout_samples = if total >= 8 {
        options.holdout.min(total / 4)
    } else {
        0
    };
    let samples = options.profile.samples.min(total - holdout_samples);
    if samples < 8 {
        return Err(Error::Data(data::DataError::Mismatch {
            path: calib.label(),
            reason: format!(
                "{total} samples leave {samples} for decisions after {holdout_samples} held out; at least 8 are needed"
            ),
        }));
    }
    let decision: Inputs = inputs
        .iter()
        .map(|(k, v)| (k.clone(), v.rows(0, samples)))
        .collect();
    let holdout: Inputs = inputs
        .iter()
        .map(|(k, v)| (k.clone(), v.rows(total - holdout_samples, total)))
        .collect();
    let mask = data::mask_input(graph, &inputs);
    Ok(Split {
        decision,
        samples,
        holdout,
        holdout_samples,
        mask,
    })
}

/// Measures every sub-block of `source` on `calib` and allocates.
pub fn decide(
    source: &Source,
    arch: &Architecture,
    calib: &CalibSource,
    options: &DecideOptions,
) -> Result<Decision, Error> {
    let graph = &source.model.graph;
    let Split {
        decision: decision_inputs,
        samples,
        holdout,
        holdout_samples,
        mask,
    } = split(source, calib, options)?;
    if options.mode == Mode::Unstructured {
        let (plan, masks, provider) =
            decide_unstructured(source, arch, &decision_inputs, samples, &mask, options)?;
        return Ok(Decision {
            plan,
            candidates: Vec::new(),
            samples,
            holdout,
            holdout_samples,
            provider,
            masks,
            split_trials: Vec::new(),
        });
    }

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
            let (context, activation) = if matches!(options.mode, Mode::Units | Mode::All) {
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
        grams: &[],
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
    let mut split_trials = Vec::new();
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
        if matches!(options.mode, Mode::Units | Mode::All) {
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
        let plan =
            importance::allocate_units(arch, &mut units, &mut candidates, &options.budget, &[]);
        let plan = with_repair(plan, options, samples);
        return Ok(Decision {
            plan,
            candidates,
            split_trials: Vec::new(),
            samples,
            holdout,
            holdout_samples,
            provider,
            masks: Vec::new(),
        });
    }
    let plan = if options.mode == Mode::All {
        let (plan, chosen, trials) = search_split(
            source,
            arch,
            &candidates,
            &units,
            &decision_inputs,
            samples,
            options,
        )?;
        candidates = chosen;
        split_trials = trials;
        plan
    } else {
        importance::allocate(arch, &mut candidates, options.score, &options.budget)
    };
    let plan = with_repair(plan, options, samples);
    Ok(Decision {
        plan,
        candidates,
        split_trials,
        samples,
        holdout,
        holdout_samples,
        provider,
        masks: Vec::new(),
    })
}

/// `unstructured` mode: the ID of every linear layer's output, then one
/// global quantile of |w| · ID over all block weight matrices of both
/// towers. Layers with a high ID keep more of their weights.
fn decide_unstructured(
    source: &Source,
    arch: &Architecture,
    inputs: &Inputs,
    samples: usize,
    mask: &Option<String>,
    options: &DecideOptions,
) -> Result<(Plan, Vec<Mask>, Provider), Error> {
    let graph = &source.model.graph;
    let sparsity = match (options.sparsity, options.budget.keep) {
        (Some(s), _) => s,
        (None, Some(keep)) => 1.0 - keep,
        (None, None) => {
            return Err(Error::Unsupported(
                "--mode unstructured needs --sparsity S or --keep-params F".into(),
            ));
        }
    };
    // (tower, block, role, output value, weight initializer)
    let mut layers = Vec::new();
    for tower in &arch.towers {
        for block in &tower.blocks {
            for l in block.linears() {
                let (output, weight) = match l.linear {
                    Some(linear) => (linear.output.clone(), linear.weight.clone()),
                    None => match &block.attention.body.projections {
                        crate::arch::Projections::Fused { node, weight, .. } => {
                            (graph.node(*node).outputs()[0].clone(), weight.clone())
                        }
                        _ => unreachable!("only fused projections lack a Linear"),
                    },
                };
                layers.push((tower.kind, block.index, l.role, output, weight));
            }
        }
    }
    let taps: Vec<Tap> = layers
        .iter()
        .map(|(tower, _, _, output, _)| Tap {
            value: output.clone(),
            mask: (*tower == TowerKind::Text).then(|| mask.clone()).flatten(),
        })
        .collect();
    let labels: Vec<String> = layers
        .iter()
        .map(|(t, b, r, _, _)| format!("{}/{b} {r}", t.name()))
        .collect();
    let profile_options = ProfileOptions {
        samples,
        ..options.profile.clone()
    };
    let (estimates, provider) =
        estimate_taps(&source.model, inputs, &taps, &labels, &profile_options)?;
    let mut weights: Vec<Vec<f32>> = Vec::with_capacity(layers.len());
    for ((_, _, _, _, name), label) in layers.iter().zip(&labels) {
        let values = graph
            .initializer(name)
            .filter(|t| t.data_type() == 1)
            .and_then(|t| t.to_f32().ok())
            .ok_or_else(|| {
                Error::Unsupported(format!(
                    "{label}: weight '{name}' is not a float32 constant; unstructured masking edits float32 weights"
                ))
            })?;
        weights.push(values);
    }
    for (e, label) in estimates.iter().zip(&labels) {
        if !(e.id.is_finite() && e.id > 0.0) {
            return Err(Error::Unsupported(format!(
                "{label}: intrinsic dimension {} cannot weight the magnitudes",
                e.id
            )));
        }
    }
    // The global quantile of |w| · ID (f32 keeps the buffer at 4 bytes a
    // weight; the thresholds themselves are f64).
    let mut scores: Vec<f32> = weights
        .iter()
        .zip(&estimates)
        .flat_map(|(w, e)| w.iter().map(move |v| (v.abs() as f64 * e.id) as f32))
        .collect();
    let cut = ((sparsity * scores.len() as f64).round() as usize).min(scores.len());
    let tau = if cut == 0 {
        0.0
    } else if cut == scores.len() {
        f64::INFINITY
    } else {
        let (_, nth, _) = scores.select_nth_unstable_by(cut, f32::total_cmp);
        *nth as f64
    };
    drop(scores);
    let mut masks = Vec::with_capacity(layers.len());
    let mut actions: std::collections::BTreeMap<(bool, usize), crate::plan::BlockAction> =
        Default::default();
    for (((tower, block, role, _, _), w), e) in layers.iter().zip(&weights).zip(&estimates) {
        let threshold = tau / e.id;
        let zeroed = w.iter().filter(|v| (v.abs() as f64) < threshold).count() as u64;
        masks.push(Mask {
            tower: *tower,
            block: *block,
            role,
            id: e.id,
            threshold,
            zeroed,
            total: w.len() as u64,
        });
        if zeroed == 0 || !threshold.is_finite() {
            continue;
        }
        let action = actions
            .entry((*tower == TowerKind::Text, *block))
            .or_insert_with(|| crate::plan::BlockAction {
                tower: tower.name().to_string(),
                index: *block,
                drop: false,
                drop_attention: false,
                drop_mlp: false,
                keep_heads: None,
                keep_mlp: None,
                zero_below: Some(Default::default()),
            });
        action
            .zero_below
            .as_mut()
            .expect("set above")
            .insert(role.to_string(), threshold);
    }
    let plan = Plan {
        blocks: actions.into_values().collect(),
        ..Plan::empty()
    }
    .normalized();
    Ok((plan, masks, provider))
}
