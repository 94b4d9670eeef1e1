//! The pipeline: the stages put together, once.
//!
//! ```text
//! open (onnx ─► ir) ─► discover (arch) ─► calibrate + measure ─► decide ─► apply_and_verify ─► save + report
//!                                                                   │              ▲
//!                                                                   └── judge ─────┘  (candidate plans)
//! ```
//!
//! - [`PruneJob`]: the main job, from a given plan or from calibration data;
//! - [`apply_and_verify`]: the one step that turns a plan into a model
//!   (rewrite passes, least-squares repair: [`apply_plan`]) and measures
//!   how closely it follows the original. The main job uses it for its plan, and every
//!   search that judges candidate plans uses it through [`decide::Judge`];
//! - [`ProfileJob`], [`CalibJob`], [`inspect`], [`id_of_data`]: the other
//!   subcommands.
//!
//! Every stage below this module knows nothing of files it was not given;
//! the jobs check all the files a run reads and writes before any work
//! ([`crate::onnx::FileGuard`]).

mod jobs;
mod prune;

use std::path::{Path, PathBuf};
use std::time::Instant;

pub use jobs::{
    CalibJob, CalibSummary, FolderFile, FolderInspection, ProfileJob, explain, id_of_data, inspect,
    inspect_folder,
};
pub use prune::{DecideSettings, Decided, Outcome, PlanSource, PruneJob};

use crate::arch::{self, Architecture};
use crate::calib::collect::static_batch;
use crate::calib::{CalibSource, Inputs, RuntimeOptions};
use crate::decide;
use crate::error::Error;
use crate::folder;
use crate::ir::Model;
use crate::onnx::{self, LoadedModel};
use crate::plan::Plan;
use crate::rewrite::{self, repair};
use crate::verify::{self, Fidelity};

/// A model read from disk: its file facts and the IR built from it.
#[derive(Debug, Clone)]
pub struct Source {
    /// File facts (path, size, external data files). For a folder: the
    /// folder, with every file of the pruned parts (models and their
    /// external data) as its external files.
    pub file: LoadedModel,
    /// The IR (for a folder: its parts joined into one graph).
    pub model: Model,
    /// For a folder: its files and how they were joined.
    pub folder: Option<FolderSource>,
    /// For a merged decoder (`If` on `use_cache_branch`): `model` is its
    /// with-past branch, and this the rest, to put it back together.
    pub merged: Option<crate::merged::Merged>,
}

/// A folder read as one model.
#[derive(Debug, Clone)]
pub struct FolderSource {
    /// Its files (the parts' decoded models dropped once joined).
    pub layout: folder::Layout,
    /// How the parts were joined (and are split again).
    pub joined: folder::Joined,
}

impl Source {
    /// Files that an output must never replace: the model and its external
    /// data, canonicalised.
    pub fn protected_files(&self) -> Vec<PathBuf> {
        onnx::model_files(&self.file)
    }

    /// The towers and blocks of the model.
    pub fn discover(&self) -> Result<Architecture, Error> {
        arch::discover(&self.model.graph).map_err(|error| Error::Discover {
            path: self.file.path.clone(),
            error,
        })
    }

    /// Bytes of the model file and its external data.
    pub fn bytes(&self) -> u64 {
        self.file.file_len
            + self
                .file
                .external_files
                .iter()
                .filter_map(|f| std::fs::metadata(f).ok())
                .map(|m| m.len())
                .sum::<u64>()
    }
}

/// Loads a model file and builds its IR; a folder's parts are joined into
/// one model ([`open_folder`] with the files found in it).
pub fn open(path: &Path) -> Result<Source, Error> {
    if path.is_dir() {
        return open_folder(path, None);
    }
    let mut file = onnx::load(path)?;
    let proto = std::mem::take(&mut file.proto);
    if crate::merged::is_merged(&proto) {
        let merged_error = |error| Error::Merged {
            path: path.to_path_buf(),
            error,
        };
        let (model, merged) = crate::merged::split(proto).map_err(merged_error)?;
        return Ok(Source {
            file,
            model,
            folder: None,
            merged: Some(merged),
        });
    }
    let model = Model::from_proto(proto).map_err(|error| Error::Graph {
        path: path.to_path_buf(),
        error,
    })?;
    Ok(Source {
        file,
        model,
        folder: None,
        merged: None,
    })
}

/// Loads the parts of a folder (found by [`folder::scan`], or `files`,
/// relative to it) and joins them into one model.
pub fn open_folder(root: &Path, files: Option<&[PathBuf]>) -> Result<Source, Error> {
    let mut layout = folder::scan(root, files)?;
    let (model, joined) = folder::join(root, &layout.parts)?;
    check_wire_widths(root, &model, &joined)?;
    let mut external_files = Vec::new();
    for part in &mut layout.parts {
        part.file.proto = Default::default();
        external_files.extend(onnx::model_files(&part.file));
    }
    let file = LoadedModel {
        proto: Default::default(),
        path: root.to_path_buf(),
        external_files,
        file_len: 0,
    };
    Ok(Source {
        file,
        model,
        folder: Some(FolderSource { layout, joined }),
        merged: None,
    })
}

/// Refuses a folder whose decoder reads the vision encoder's output with
/// projections of another width. Exporters declare the output's width
/// symbolically, so [`folder::join`] cannot see it; inferred through the
/// joined graph it is known, and so are the widths the decoder's
/// cross-attention projections take.
pub(super) fn check_wire_widths(
    root: &Path,
    model: &Model,
    joined: &folder::Joined,
) -> Result<(), Error> {
    let graph = &model.graph;
    let shapes = arch::shapes::Shapes::infer(graph);
    for wire in &joined.wires {
        let Some(width) = shapes.last_dim(&wire.value) else {
            continue;
        };
        let read = &wire.joined_input;
        for consumer in graph.consumers(read) {
            let node = graph.node(consumer);
            let weight = match node.op() {
                "MatMul" if node.inputs().first() == Some(read) => node
                    .inputs()
                    .get(1)
                    .and_then(|w| graph.initializer(w))
                    .filter(|w| w.dims().len() == 2)
                    .map(|w| w.dims()[0]),
                "Gemm" if node.inputs().first() == Some(read) => {
                    let transposed = node.attr_int("transB") == Some(1);
                    node.inputs()
                        .get(1)
                        .and_then(|w| graph.initializer(w))
                        .filter(|w| w.dims().len() == 2)
                        .map(|w| w.dims()[usize::from(transposed)])
                }
                _ => None,
            };
            if let Some(expected) = weight
                && expected != width
            {
                let (from, to) = (&joined.members[wire.from], &joined.members[wire.to]);
                return Err(folder::FolderError::Misfit {
                    root: root.to_path_buf(),
                    reason: format!(
                        "towers do not fit together: {}'s {} are projected from width {expected}, and {}'s output is {width} wide",
                        to.path.display(),
                        wire.input,
                        from.path.display()
                    ),
                }
                .into());
            }
        }
    }
    Ok(())
}

/// Calibration samples read for a model.
struct Samples {
    /// The model inputs, axis 0 = sample.
    inputs: Inputs,
    /// How many samples there are.
    total: usize,
    /// The input marking real text tokens, when the data provides it.
    mask: Option<String>,
}

impl Samples {
    /// Reads (at most `wanted`, for sources decoded on demand) samples of
    /// `calib` for `source`.
    fn load(source: &Source, calib: &CalibSource, wanted: usize) -> Result<Self, Error> {
        let graph = &source.model.graph;
        let (inputs, total) = calib.load(graph, wanted)?;
        let mask = crate::calib::data::mask_input(graph, &inputs);
        Ok(Self {
            inputs,
            total,
            mask,
        })
    }
}

/// Why a plan with a repair record cannot be applied without data.
pub(crate) const REPAIR_NEEDS_CALIB: &str = "the plan's repair (refits, mean-output compensation) \
     is computed from calibration data; give the same --calib file";

/// Runs models against the original on a fixed set of samples. The
/// original runs once, on the first check; every later check runs only the
/// candidate.
#[derive(Debug)]
pub struct Verifier {
    original: Vec<u8>,
    inputs: Inputs,
    samples: usize,
    fixed_batch: Option<usize>,
    runtime: RuntimeOptions,
    reference: std::cell::OnceCell<verify::Reference>,
    /// A decoder's present keys and values, not compared.
    cache_outputs: Vec<String>,
}

impl Verifier {
    /// Compares against `source` on the first `samples` rows of `inputs`.
    pub fn new(source: &Source, inputs: Inputs, samples: usize, runtime: &RuntimeOptions) -> Self {
        Self {
            original: onnx::encode_to_vec(&source.model.to_proto()),
            inputs,
            samples,
            fixed_batch: static_batch(&source.model),
            runtime: runtime.clone(),
            reference: std::cell::OnceCell::new(),
            cache_outputs: verify::cache_outputs(&source.model.graph),
        }
    }

    /// A captioner's greedy captions from `model` against the original's
    /// (none when the model is no captioner, [`verify::captioner_logits`]),
    /// or why they were not compared: generation is an extra check, and a
    /// model it cannot drive (a static batch size, inputs it cannot grow)
    /// is still verified by the rest.
    pub fn captions(&self, model: &Model) -> (Option<verify::CaptionAgreement>, Option<String>) {
        let Some(logits) = verify::captioner_logits(&model.graph) else {
            return (None, None);
        };
        if let Some(batch) = self.fixed_batch {
            return (
                None,
                Some(format!(
                    "the model has a static batch size ({batch}); greedy captions were not compared"
                )),
            );
        }
        let candidate = onnx::encode_to_vec(&model.to_proto());
        match verify::compare_captions(
            &self.original,
            &candidate,
            &self.inputs,
            self.samples,
            &logits,
            &self.runtime,
        ) {
            Ok(agreement) => (agreement, None),
            Err(e) => (
                None,
                Some(format!("greedy captions were not compared: {e}")),
            ),
        }
    }

    /// A decoder's greedy generations with its cache from `model` against
    /// the original's (none for a model without a cache or logits).
    pub fn generations(
        &self,
        source: &Source,
        model: &Model,
    ) -> Result<Option<verify::GenerationAgreement>, Error> {
        let Some(logits) = verify::token_logits(&source.model.graph) else {
            return Ok(None);
        };
        // A language model reading image features before the text is
        // driven through its files' own loop (image features once, then one
        // token's embedding a step), which the joined graph cannot run: its
        // greedy output is compared without a cache, as a captioner's.
        let image_prefix = source.folder.as_ref().is_some_and(|f| {
            f.joined
                .members
                .iter()
                .any(|m| m.role == crate::folder::Role::Language)
                && f.joined
                    .members
                    .iter()
                    .any(|m| m.role == crate::folder::Role::Vision)
        });
        if self.fixed_batch.is_some() || image_prefix {
            return Ok(None);
        }
        let candidate = onnx::encode_to_vec(&model.to_proto());
        Ok(verify::compare_generations(
            &self.original,
            &candidate,
            &source.model.graph,
            &self.inputs,
            self.samples,
            &logits,
            &self.runtime,
        )?)
    }

    /// How closely `model` follows the original.
    pub fn check(&self, model: &Model) -> Result<Fidelity, Error> {
        if self.reference.get().is_none() {
            let reference = verify::Reference::run(
                &self.original,
                &self.inputs,
                self.samples,
                self.fixed_batch,
                &self.runtime,
            )?
            .ignoring(self.cache_outputs.clone());
            let _ = self.reference.set(reference);
        }
        let reference = self.reference.get().expect("set just above");
        let candidate = onnx::encode_to_vec(&model.to_proto());
        Ok(verify::compare_to(
            reference,
            &candidate,
            &self.inputs,
            &self.runtime,
        )?)
    }
}

/// A plan made into a model.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// The rewritten (and repaired) model.
    pub model: Model,
    /// The rewrites made, in order.
    pub rewrites: Vec<String>,
    /// How the model's inputs and outputs changed (decoder caches).
    pub interface: Vec<String>,
    /// The means added in place of removed branches (a merged decoder's
    /// other branch gets the same).
    pub compensation: rewrite::Compensation,
    /// The least-squares refits made.
    pub refits: Vec<repair::Refit>,
    /// Seconds spent in each step.
    pub timings: Vec<(&'static str, f64)>,
}

/// Applies `plan` to `source` (architecture `arch`, needed unless the plan
/// is empty) and refits what the plan's repair asks for from `statistics`.
pub fn apply_plan(
    source: &Source,
    arch: Option<&Architecture>,
    plan: &Plan,
    statistics: Option<&repair::Statistics>,
) -> Result<Candidate, Error> {
    let mut timings = Vec::new();
    let mut clock = Instant::now();
    let mut model = source.model.clone();
    let mut rewrites = Vec::new();
    let mut interface = Vec::new();
    let mut compensation = rewrite::Compensation::new();
    if let (false, Some(arch)) = (plan.is_empty(), arch) {
        if let Some(s) = statistics {
            compensation = repair::compensation(&source.model.graph, arch, plan, s);
        }
        let applied = rewrite::apply_with(
            &mut model,
            arch,
            plan,
            &compensation,
            rewrite::Validation::default(),
        )?;
        rewrites = applied.rewrites;
        interface = applied.interface;
    }
    timings.push(("rewrite", clock.elapsed().as_secs_f64()));
    clock = Instant::now();
    let mut refits = Vec::new();
    if let (Some(_), Some(arch)) = (&plan.repair, arch) {
        let statistics = statistics.ok_or_else(|| Error::Unsupported(REPAIR_NEEDS_CALIB.into()))?;
        refits = repair::apply(&source.model, &mut model, arch, plan, statistics)?;
        timings.push(("repair", clock.elapsed().as_secs_f64()));
    }
    Ok(Candidate {
        model,
        rewrites,
        interface,
        compensation,
        refits,
        timings,
    })
}

/// [`apply_plan`], then how closely the result follows the original on the
/// verifier's samples: the one apply-and-verify step of the main job and
/// of every search over candidate plans.
pub fn apply_and_verify(
    source: &Source,
    arch: Option<&Architecture>,
    plan: &Plan,
    statistics: Option<&repair::Statistics>,
    verifier: &Verifier,
) -> Result<(Candidate, Fidelity), Error> {
    let mut candidate = apply_plan(source, arch, plan, statistics)?;
    let clock = Instant::now();
    let fidelity = verifier.check(&candidate.model)?;
    candidate
        .timings
        .push(("verify", clock.elapsed().as_secs_f64()));
    Ok((candidate, fidelity))
}

/// Stack of the thread that makes the judge's candidates: the main
/// thread's usual 8 MiB, not a spawned thread's 2 MiB.
const MAKER_STACK: usize = 8 << 20;

/// Decision samples the `all` search judges each candidate plan on.
pub const JUDGE_SAMPLES: usize = 64;

/// The judge of candidate plans: [`apply_and_verify`] on (the first
/// [`JUDGE_SAMPLES`] of) the decision samples, never the held-out ones.
struct CandidateJudge<'a> {
    source: &'a Source,
    arch: &'a Architecture,
    inputs: &'a Inputs,
    samples: usize,
    mask: Option<&'a str>,
    runtime: &'a RuntimeOptions,
    verifier: Verifier,
    /// Repair statistics of every plan judged so far (each tap read once
    /// per job, however many calls ask for it).
    statistics: repair::Statistics,
    /// Seconds spent gathering statistics, rewriting and repairing
    /// candidates, and running them.
    seconds: JudgeSeconds,
}

/// Where the judge's wall time went; the parts add up to it.
#[derive(Debug, Default, Clone, Copy)]
struct JudgeSeconds {
    /// A statistics pass of its own (none when the measuring pass gathered
    /// them).
    statistics: f64,
    /// Waiting for the next candidate: rewriting and refitting that the
    /// previous candidate's run did not hide.
    apply: f64,
    /// Running the candidates (the original's reference run with the
    /// first).
    run: f64,
}

impl<'a> CandidateJudge<'a> {
    fn new(
        source: &'a Source,
        arch: &'a Architecture,
        inputs: &'a Inputs,
        samples: usize,
        mask: Option<&'a str>,
        runtime: &'a RuntimeOptions,
    ) -> Self {
        let judged = samples.min(JUDGE_SAMPLES);
        let judge_inputs = crate::calib::data::rows(inputs, 0, judged);
        Self {
            source,
            arch,
            inputs,
            samples,
            mask,
            runtime,
            verifier: Verifier::new(source, judge_inputs, judged, runtime),
            statistics: repair::Statistics::default(),
            seconds: JudgeSeconds::default(),
        }
    }

    /// Where the judging time went ([`prune::Decided::stages`]).
    fn timings(&self) -> [(&'static str, f64); 3] {
        let s = self.seconds;
        [
            ("judge: statistics", s.statistics),
            ("judge: rewrite+repair", s.apply),
            ("judge: run", s.run),
        ]
    }

    /// The repair statistics gathered while judging.
    fn into_statistics(self) -> repair::Statistics {
        self.statistics
    }
}

impl decide::Judge for CandidateJudge<'_> {
    type Error = Error;

    fn judge(&mut self, plans: &[Plan]) -> Result<Vec<decide::Verdict>, Error> {
        // Repair statistics once for every layer any plan refits and every
        // branch any plan compensates that no earlier call needed.
        let refitting: Vec<&Plan> = plans.iter().filter(|p| p.repair.is_some()).collect();
        let clock = Instant::now();
        self.statistics.gather(
            &self.source.model,
            self.arch,
            &refitting,
            self.inputs,
            self.samples,
            self.mask,
            self.runtime,
        )?;
        self.seconds.statistics += clock.elapsed().as_secs_f64();
        let (source, arch, statistics) = (self.source, self.arch, &self.statistics);
        let (verifier, seconds) = (&self.verifier, &mut self.seconds);
        // The next plan is rewritten and refitted on a thread of its own
        // while this one's model runs: building a session and rewriting
        // are mostly single-threaded, so each fills the core the other
        // leaves. Candidates are made and judged in order, at most one
        // waiting (a rendezvous channel), so the verdicts are those of the
        // plans one after the other.
        std::thread::scope(|scope| {
            let (sender, receiver) = std::sync::mpsc::sync_channel(0);
            // The rewrite ran on the main thread before; its stack is as
            // deep here (graph walks of large models).
            let maker = std::thread::Builder::new().stack_size(MAKER_STACK);
            let maker = maker
                .spawn_scoped(scope, move || {
                    for plan in plans {
                        let made = apply_plan(source, Some(arch), plan, Some(statistics));
                        // The judge stopped (an error): nothing more to make.
                        if sender.send(made).is_err() {
                            break;
                        }
                    }
                })
                .map_err(|e| {
                    Error::Runtime(crate::calib::RuntimeError::Session(format!(
                        "cannot start the thread that makes candidates: {e}"
                    )))
                })?;
            let mut judge_all = || -> Result<Vec<decide::Verdict>, Error> {
                let mut verdicts = Vec::with_capacity(plans.len());
                for _ in plans {
                    let clock = Instant::now();
                    let Ok(made) = receiver.recv() else {
                        // The maker panicked; joining it below re-raises.
                        break;
                    };
                    // What the runs did not hide of the rewriting.
                    seconds.apply += clock.elapsed().as_secs_f64();
                    let candidate = match made {
                        Ok(candidate) => candidate,
                        // This model's form does not support one of the
                        // plan's rewrites (a fused norm below opset 17,
                        // say): the candidate loses; if every one does,
                        // applying the chosen plan reports the reason.
                        Err(Error::Rewrite(crate::rewrite::RewriteError::Unsupported {
                            ..
                        })) => {
                            verdicts.push(decide::Verdict {
                                min_cosine: f64::NAN,
                                top1_agreement: None,
                                top1_spread: None,
                                applied: false,
                            });
                            continue;
                        }
                        Err(e) => return Err(e),
                    };
                    let clock = Instant::now();
                    let fidelity = verifier.check(&candidate.model)?;
                    seconds.run += clock.elapsed().as_secs_f64();
                    verdicts.push(decide::Verdict {
                        min_cosine: fidelity.min_cosine,
                        top1_agreement: fidelity.top1_agreement,
                        top1_spread: fidelity.top1_spread,
                        applied: true,
                    });
                }
                Ok(verdicts)
            };
            let judged = judge_all();
            drop(receiver);
            if let Err(panic) = maker.join() {
                std::panic::resume_unwind(panic);
            }
            judged
        })
    }
}
