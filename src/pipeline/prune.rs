//! The main job: read IN, make or take a plan, apply and verify it, write
//! OUT with its plan and report.

use std::path::PathBuf;
use std::time::Instant;

use super::{
    CandidateJudge, Samples, Source, Verifier, apply_and_verify, apply_plan, open, open_folder,
};
use crate::arch::Architecture;
use crate::calib::data::{Inputs, Split};
use crate::calib::{CalibSource, DataError, Provider, RuntimeOptions};
use crate::decide::{self, DecideOptions, Decision, Mode};
use crate::error::Error;
use crate::measure::{self, MeasureOptions};
use crate::onnx::{self, ExternalData, FileGuard, SaveOptions, SaveSummary};
use crate::plan::Plan;
use crate::report::{self, Report, RunFacts};
use crate::rewrite::repair;
use crate::verify::Fidelity;

/// Where the plan of a [`PruneJob`] comes from.
#[derive(Debug, Clone)]
pub enum PlanSource {
    /// Apply this plan exactly: no calibration (unless the plan records a
    /// least-squares repair, which re-reads `repair_data`).
    Given {
        /// The plan.
        plan: Plan,
        /// The file it was read from, if any: no output may replace it.
        file: Option<PathBuf>,
        /// Calibration data for a plan that records a repair.
        repair_data: Option<CalibSource>,
    },
    /// Measure the model on calibration data and decide.
    Decide {
        /// The calibration samples (decision samples first, held-out last).
        calib: CalibSource,
        /// How to measure and decide.
        settings: DecideSettings,
    },
}

/// How a plan is made from calibration data.
#[derive(Debug, Clone)]
pub struct DecideSettings {
    /// Measurement (`samples` is the most used for decisions).
    pub measure: MeasureOptions,
    /// Samples held out for verification (taken from the end, at most a
    /// quarter of the file).
    pub holdout: usize,
    /// The decision.
    pub decide: DecideOptions,
}

/// The main job: read IN, apply or make a plan, write OUT.
#[derive(Debug, Clone)]
pub struct PruneJob {
    /// Model to read.
    pub input: PathBuf,
    /// Model to write.
    pub output: PathBuf,
    /// Where the plan comes from.
    pub plan: PlanSource,
    /// ONNX Runtime settings for calibration, repair and verification.
    pub runtime: RuntimeOptions,
    /// Where to write the applied (normalised) plan.
    pub plan_out: Option<PathBuf>,
    /// External data placement. `None`: like the input (external if the
    /// input used external data), and external anyway above 2 GiB.
    pub external_data: Option<ExternalData>,
    /// Refuse to write OUT when the held-out output cosine is below this.
    pub min_fidelity: Option<f64>,
    /// Write a JSON report here, and a Markdown summary and an SVG plot
    /// next to it ([`report::files`]: the extension replaced by `md`, `svg`).
    pub report: Option<PathBuf>,
    /// How the report names the input, when not by its path (the Python
    /// package's in-memory models).
    pub input_name: Option<String>,
    /// When IN is a folder: the files to prune (relative to it), instead of
    /// the ones found in it.
    pub files: Option<Vec<PathBuf>>,
}

/// What the decision stage measured and chose.
#[derive(Debug, Clone)]
pub struct Decided {
    /// The decision.
    pub decision: Decision,
    /// Samples used for decisions.
    pub samples: usize,
    /// Held-out inputs for verification.
    pub holdout: Inputs,
    /// Number of held-out samples.
    pub holdout_samples: usize,
    /// The provider that ran calibration.
    pub provider: Provider,
    /// Repair statistics gathered while candidate plans were judged (over
    /// the decision samples); the chosen plan's repair takes them over (the
    /// [`Outcome`]'s copy is then empty).
    pub statistics: repair::Statistics,
    /// Seconds of the deciding stage's parts, in order: `calibrate` (the
    /// samples read and the measuring pass: taps, ID, scores) and, where
    /// candidate plans were judged, `judge: statistics` (repair statistics
    /// the measuring pass did not gather, normally none), `judge:
    /// rewrite+repair` (waiting for the next candidate: the next one is
    /// made while the last one runs, so this is what the runs did not
    /// hide) and `judge: run` (the candidates run on the decision
    /// samples). The rest of the stage is the report's `decide`.
    pub stages: Vec<(&'static str, f64)>,
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// What was written.
    pub saved: SaveSummary,
    /// The plan that was applied.
    pub plan: Plan,
    /// The rewrites made, in order (`drop_block vision/3`, …).
    pub rewrites: Vec<String>,
    /// Seconds spent in each stage, in order.
    pub timings: Vec<(&'static str, f64)>,
    /// The decision stage's measurements, when the plan was made here.
    pub decided: Option<Decided>,
    /// Fidelity on held-out samples, when measured.
    pub fidelity: Option<Fidelity>,
    /// Least-squares refits made, when the plan asks for repair.
    pub refits: Vec<repair::Refit>,
    /// Parameters stored in the written model.
    pub stored_params: u64,
    /// The run's report (what `--report` writes as JSON, Markdown and
    /// SVG), made whether or not it is written.
    pub report: Report,
}

impl PruneJob {
    /// A job reading `input`, writing `output`, with the plan from `plan`.
    pub fn new(input: impl Into<PathBuf>, output: impl Into<PathBuf>, plan: PlanSource) -> Self {
        Self {
            input: input.into(),
            output: output.into(),
            plan,
            runtime: RuntimeOptions::default(),
            plan_out: None,
            external_data: None,
            min_fidelity: None,
            report: None,
            input_name: None,
            files: None,
        }
    }

    /// A job applying `plan` (no calibration).
    pub fn apply(input: impl Into<PathBuf>, output: impl Into<PathBuf>, plan: Plan) -> Self {
        Self::new(
            input,
            output,
            PlanSource::Given {
                plan,
                file: None,
                repair_data: None,
            },
        )
    }

    /// Runs the job. On error nothing is written. Before any work the
    /// job's files are checked ([`PruneJob::files`]): no output may replace
    /// an input, and no two outputs may be the same file.
    pub fn run(&self) -> Result<Outcome, Error> {
        let mut timings: Vec<(&'static str, f64)> = Vec::new();
        let mut clock = Instant::now();
        let mut lap = |name: &'static str, timings: &mut Vec<(&'static str, f64)>| {
            timings.push((name, clock.elapsed().as_secs_f64()));
            clock = Instant::now();
        };
        let source = match &self.files {
            Some(files) if self.input.is_dir() => open_folder(&self.input, Some(files))?,
            Some(_) => {
                return Err(Error::Unsupported(format!(
                    "--files chooses the files of a folder, and {} is a file",
                    self.input.display()
                )));
            }
            None => open(&self.input)?,
        };
        self.files(&source).check()?;
        if source.folder.is_some() {
            crate::folder::check_destination(&self.output)?;
        }
        lap("load", &mut timings);

        let (arch, plan, mut decided) = match &self.plan {
            PlanSource::Given { plan, .. } => {
                let arch = if plan.is_empty() {
                    None
                } else {
                    Some(source.discover()?)
                };
                lap("discover", &mut timings);
                (arch, plan.clone(), None)
            }
            PlanSource::Decide { calib, settings } => {
                let arch = source.discover()?;
                lap("discover", &mut timings);
                let decided = self.decide(&source, &arch, calib, settings)?;
                (Some(arch), decided.decision.plan.clone(), Some(decided))
            }
        };
        // The deciding stage as its parts, then the rest of it (allocating,
        // searching) as `decide`.
        if let Some(decided) = &decided {
            let parts: f64 = decided.stages.iter().map(|(_, s)| s).sum();
            timings.extend(decided.stages.iter().copied());
            let total = clock.elapsed().as_secs_f64();
            timings.push(("decide", (total - parts).max(0.0)));
        }
        clock = Instant::now();

        // Moved out, not copied (the Grams can be large), and dropped here
        // when the plan repairs nothing.
        let gathered = decided.as_mut().map(|d| std::mem::take(&mut d.statistics));
        let statistics = match (&plan.repair, &arch) {
            (Some(spec), Some(arch)) => {
                Some(self.repair_statistics(&source, arch, &plan, spec, gathered)?)
            }
            _ => None,
        };
        let statistics_time = clock.elapsed().as_secs_f64();
        let verifier = decided
            .as_ref()
            .filter(|d| d.holdout_samples > 0)
            .map(|d| Verifier::new(&source, d.holdout.clone(), d.holdout_samples, &self.runtime));
        let mut captions_time = 0.0;
        let (candidate, fidelity) = match &verifier {
            Some(verifier) => {
                let (candidate, mut fidelity) =
                    apply_and_verify(&source, arch.as_ref(), &plan, statistics.as_ref(), verifier)?;
                // Generation is the final check only: a judge ranking
                // candidates runs the teacher-forced pass alone.
                let clock = Instant::now();
                (fidelity.captions, fidelity.captions_note) = verifier.captions(&candidate.model);
                fidelity.generations = verifier.generations(&source, &candidate.model)?;
                captions_time = clock.elapsed().as_secs_f64();
                if let Some(required) = self.min_fidelity
                    && fidelity.min_cosine < required
                {
                    return Err(Error::Fidelity {
                        got: fidelity.min_cosine,
                        required,
                    });
                }
                (candidate, Some(fidelity))
            }
            None if self.min_fidelity.is_some() => {
                return Err(Error::Unsupported(
                    "a fidelity gate needs held-out samples, and this run holds none out".into(),
                ));
            }
            None => (
                apply_plan(&source, arch.as_ref(), &plan, statistics.as_ref())?,
                None,
            ),
        };
        for (name, seconds) in &candidate.timings {
            let extra = match *name {
                "repair" => statistics_time,
                "verify" => captions_time,
                _ => 0.0,
            };
            timings.push((name, seconds + extra));
        }
        if fidelity.is_none() {
            timings.push(("verify", 0.0));
        }
        clock = Instant::now();
        let stored_params = crate::arch::stored_params(&candidate.model.graph);

        let external_data =
            self.external_data
                .unwrap_or(if source.file.external_files.is_empty() {
                    ExternalData::Auto
                } else {
                    ExternalData::Always
                });
        let options = SaveOptions {
            external_data,
            ..Default::default()
        };
        let (saved, written) = match &source.folder {
            None => {
                let pruned = match &source.merged {
                    // Both branches pruned alike, under the `If` again.
                    Some(merged) => merged
                        .reassemble(
                            &source.model,
                            arch.as_ref(),
                            &candidate.model,
                            &plan,
                            &candidate.compensation,
                        )
                        .map_err(|error| Error::Merged {
                            path: self.input.clone(),
                            error,
                        })?,
                    None => candidate.model.to_proto(),
                };
                (onnx::save(&pruned, &self.output, &options)?, Vec::new())
            }
            Some(folder) => {
                let mut files = folder.joined.split(&candidate.model)?;
                for ((path, proto), member) in files.iter_mut().zip(&folder.joined.members) {
                    // A merged decoder's pruned branch goes back under its `If`.
                    let Some(part) = &member.merged else {
                        continue;
                    };
                    *proto = part
                        .merged
                        .reassemble_part(
                            &part.with_past,
                            std::mem::take(proto),
                            &source.model.graph,
                            arch.as_ref(),
                            &member.joined_name(""),
                            &plan,
                            &candidate.compensation,
                        )
                        .map_err(|error| Error::Merged {
                            path: self.input.join(&*path),
                            error,
                        })?;
                }
                crate::folder::write(
                    &folder.layout,
                    &folder.joined,
                    &files,
                    &self.output,
                    self.external_data,
                )?
            }
        };
        timings.push(("save", clock.elapsed().as_secs_f64()));
        let plan = plan.normalized();
        let report = self.report(
            &source,
            arch.as_ref(),
            &Facts {
                saved: &saved,
                plan: &plan,
                rewrites: &candidate.rewrites,
                interface: &candidate.interface,
                timings: &timings,
                decided: decided.as_ref(),
                fidelity: fidelity.as_ref(),
                refits: &candidate.refits,
                stored_params,
                written: &written,
            },
        );
        let outcome = Outcome {
            saved,
            plan,
            rewrites: candidate.rewrites,
            timings,
            decided,
            fidelity,
            refits: candidate.refits,
            stored_params,
            report,
        };
        if let Err(e) = self.write_companions(&outcome) {
            // OUT and its plan/report go together: without them, no OUT.
            if source.folder.is_some() {
                let _ = std::fs::remove_dir_all(&self.output);
            }
            let _ = std::fs::remove_file(&self.output);
            if let Some(data) = &outcome.saved.external_file {
                let _ = std::fs::remove_file(data);
            }
            return Err(e);
        }
        Ok(outcome)
    }

    /// Every file the job reads (`source` and its external data, the plan
    /// file, the calibration data, the ONNX Runtime library) and writes
    /// (OUT, `OUT.data`, `--plan-out`, the report's three files).
    pub fn files(&self, source: &Source) -> FileGuard {
        let mut guard = FileGuard::new();
        guard.inputs(source.protected_files());
        if source.folder.is_some() {
            guard.input_folder(&self.input);
        }
        let calib = match &self.plan {
            PlanSource::Given {
                file, repair_data, ..
            } => {
                guard.inputs(file.clone());
                repair_data.as_ref()
            }
            PlanSource::Decide { calib, .. } => Some(calib),
        };
        if let Some(calib) = calib {
            guard.inputs(calib.files());
            guard.inputs(runtime_files(&self.runtime));
        }
        if source.folder.is_some() {
            guard.output_folder(&self.output, "OUT");
        } else {
            guard.output(&self.output, "OUT");
        }
        if self.external_data != Some(ExternalData::Never) && source.folder.is_none() {
            guard.derived_output(
                onnx::external_path(&self.output),
                "OUT's external data file",
            );
        }
        if let Some(plan_out) = &self.plan_out {
            guard.output(plan_out, "the --plan-out file");
        }
        if let Some(report) = &self.report {
            let [json, markdown, svg] = report::files(report);
            guard
                .output(json, "the --report file")
                .derived_output(markdown, "the --report Markdown summary")
                .derived_output(svg, "the --report SVG plot");
        }
        guard
    }

    /// Calibrates on the decision samples of `calib` and decides.
    fn decide(
        &self,
        source: &Source,
        arch: &Architecture,
        calib: &CalibSource,
        settings: &DecideSettings,
    ) -> Result<Decided, Error> {
        let clock = Instant::now();
        let graph = &source.model.graph;
        let Samples {
            inputs,
            total,
            mask,
        } = Samples::load(source, calib, settings.measure.samples + settings.holdout)?;
        let split = Split::of(
            &inputs,
            total,
            settings.measure.samples,
            settings.holdout,
            calib.label(),
        )?;
        let options = MeasureOptions {
            samples: split.samples,
            ..settings.measure.clone()
        };
        let measuring = Error::measuring(&source.file.path);
        let (decision, provider, statistics, stages) = if settings.decide.mode == Mode::Unstructured
        {
            let (layers, provider) = measure::blocks::measure_linears(
                &source.model,
                arch,
                &split.decision,
                mask.as_deref(),
                &options,
                &self.runtime,
            )
            .map_err(&measuring)?;
            let stages = vec![("calibrate", clock.elapsed().as_secs_f64())];
            let decision = decide::unstructured(graph, &layers, &settings.decide)?;
            (decision, provider, repair::Statistics::default(), stages)
        } else {
            // The repair statistics of every plan the search could make
            // come out of the measuring pass: the same activations of the
            // same samples, so the judge runs no pass of its own. Second
            // moments only where plans slim projections (units).
            let mode = settings.decide.mode;
            let method = settings.decide.repair;
            let (grams, means) = repair::every_tap(
                graph,
                arch,
                mode.scores_units() && method.refits(),
                method.compensates(),
            );
            let mut measured = measure::blocks::measure_blocks(
                &source.model,
                arch,
                &split.decision,
                mask.as_deref(),
                mode.scores_units(),
                &measure::blocks::RepairTaps { grams, means },
                &options,
                &self.runtime,
            )
            .map_err(&measuring)?;
            let mut stages = vec![("calibrate", clock.elapsed().as_secs_f64())];
            let mut judge = CandidateJudge::new(
                source,
                arch,
                &split.decision,
                split.samples,
                mask.as_deref(),
                &self.runtime,
            );
            judge.statistics.absorb(
                split.samples,
                std::mem::take(&mut measured.grams),
                std::mem::take(&mut measured.means),
            );
            let decision = decide::structural(
                arch,
                graph,
                &measured,
                split.samples,
                &settings.decide,
                &mut judge,
            )?;
            stages.extend(judge.timings());
            (decision, measured.provider, judge.into_statistics(), stages)
        };
        Ok(Decided {
            decision,
            samples: split.samples,
            holdout: split.holdout,
            holdout_samples: split.holdout_samples,
            provider,
            statistics,
            stages,
        })
    }

    /// The activation statistics a plan's least-squares repair refits from:
    /// the first `spec.samples` samples of the calibration data (the
    /// decision samples of a decided run; the same `--calib` file when a
    /// saved plan is re-applied). What `gathered` (statistics over the same
    /// data's first samples) already holds is not measured again.
    fn repair_statistics(
        &self,
        source: &Source,
        arch: &Architecture,
        plan: &Plan,
        spec: &crate::plan::Repair,
        gathered: Option<repair::Statistics>,
    ) -> Result<repair::Statistics, Error> {
        let calib = match &self.plan {
            PlanSource::Decide { calib, .. } => calib,
            PlanSource::Given {
                repair_data: Some(calib),
                ..
            } => calib,
            PlanSource::Given {
                repair_data: None, ..
            } => {
                return Err(Error::Unsupported(super::REPAIR_NEEDS_CALIB.into()));
            }
        };
        // The judge's statistics are over the first decision samples of the
        // load it made (decision + held-out samples). An npz is read from
        // its start whatever the count, so those are the samples a fresh
        // load of `spec.samples` gives; images and captions are picked
        // evenly over the folder by count, so there they are not, and a
        // re-applied plan must refit from what this load reads.
        let reusable = matches!(calib, CalibSource::Npz(_));
        let mut statistics = gathered.filter(|_| reusable).unwrap_or_default();
        if !statistics.lacks(&source.model, arch, &[plan], spec.samples) {
            return Ok(statistics);
        }
        let Samples {
            inputs,
            total,
            mask,
        } = Samples::load(source, calib, spec.samples)?;
        if total < spec.samples {
            return Err(Error::Data(DataError::Mismatch {
                path: calib.label(),
                reason: format!(
                    "the plan's repair read {} samples, the file has {total}",
                    spec.samples
                ),
            }));
        }
        statistics.gather(
            &source.model,
            arch,
            &[plan],
            &inputs,
            spec.samples,
            mask.as_deref(),
            &self.runtime,
        )?;
        Ok(statistics)
    }

    fn report(&self, source: &Source, arch: Option<&Architecture>, facts: &Facts<'_>) -> Report {
        let settings = match &self.plan {
            PlanSource::Decide { settings, .. } => Some(&settings.decide),
            PlanSource::Given { .. } => None,
        };
        let files = source.folder.as_ref().map(|folder| {
            serde_json::json!({
                "pruned": facts.written,
                "unpruned": folder.layout.unpruned.iter().map(|u| serde_json::json!({
                    "path": u.path, "reason": u.reason,
                })).collect::<Vec<_>>(),
                "copied": folder.layout.copied,
            })
        });
        Report::new(&RunFacts {
            input: &self.input,
            input_name: self.input_name.as_deref(),
            output: &self.output,
            settings,
            graph: &source.model.graph,
            arch,
            input_bytes: source.bytes(),
            stored_after: facts.stored_params,
            saved: facts.saved,
            plan: facts.plan,
            rewrites: facts.rewrites,
            interface: facts.interface,
            decision: facts.decided.map(|d| &d.decision),
            samples: facts.decided.map(|d| (d.samples, d.holdout_samples)),
            provider: facts.decided.map(|d| d.provider),
            refits: facts.refits,
            fidelity: facts.fidelity,
            timings: facts.timings,
            files: files.as_ref(),
        })
    }

    fn write_companions(&self, outcome: &Outcome) -> Result<(), Error> {
        if let Some(plan_out) = &self.plan_out {
            onnx::write_atomic(plan_out, outcome.plan.to_json().as_bytes())?;
        }
        let Some(path) = &self.report else {
            return Ok(());
        };
        let report = &outcome.report;
        let [json, markdown, svg] = report::files(path);
        onnx::write_atomic(&json, report.to_json().as_bytes())?;
        onnx::write_atomic(&markdown, report.to_markdown().as_bytes())?;
        onnx::write_atomic(&svg, report.to_svg().as_bytes())?;
        Ok(())
    }
}

/// What the run did, as the report reads it (the parts of [`Outcome`]
/// made before the report).
struct Facts<'a> {
    saved: &'a SaveSummary,
    plan: &'a Plan,
    rewrites: &'a [String],
    interface: &'a [String],
    timings: &'a [(&'static str, f64)],
    decided: Option<&'a Decided>,
    fidelity: Option<&'a Fidelity>,
    refits: &'a [repair::Refit],
    stored_params: u64,
    /// A folder's pruned files as written.
    written: &'a [crate::folder::WrittenFile],
}

/// The ONNX Runtime library a run with `options` would load, when found.
pub(super) fn runtime_files(options: &RuntimeOptions) -> Vec<PathBuf> {
    crate::calib::locate_library(options.library.as_deref())
        .ok()
        .into_iter()
        .collect()
}
