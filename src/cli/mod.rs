//! The command line: argument types ([`args`]), and the one place where
//! parsed arguments become a library request — every check of how flags
//! combine is in [`request`]. Output formatting for people is in
//! [`output`].

pub mod args;
pub mod output;

use std::path::{Path, PathBuf};

use onnx_idprune::calib::{CalibSource, PairSource, RuntimeOptions};
use onnx_idprune::decide::{Budget, DecideOptions, Mode, RepairMethod};
use onnx_idprune::id::IdOptions;
use onnx_idprune::measure::{MeasureOptions, default_max_memory};
use onnx_idprune::pipeline::{CalibJob, DecideSettings, PlanSource, ProfileJob, PruneJob};
use onnx_idprune::plan::Plan;

pub use args::Cli;
use args::{Command, PairArgs, PruneArgs, RepairArg, RuntimeArgs};

/// What the user asked for, checked and resolved.
#[derive(Debug)]
pub enum Request {
    /// The main job.
    Prune(Box<PruneJob>),
    /// Towers and blocks of a model.
    Inspect {
        /// The model.
        input: PathBuf,
        /// JSON instead of a table.
        json: bool,
    },
    /// Where discovery's patterns matched or stopped.
    Explain {
        /// The model.
        input: PathBuf,
    },
    /// Images and captions as an npz.
    Calib(CalibJob),
    /// A model's ID profile.
    Profile {
        /// The job.
        job: ProfileJob,
        /// JSON instead of a table.
        json: bool,
    },
    /// The ID of a data matrix.
    IdOfData {
        /// The `.npy` file.
        path: PathBuf,
        /// Estimator settings.
        options: IdOptions,
        /// JSON instead of a line.
        json: bool,
    },
}

/// Flags that do not go together (exit code 1, like other bad input).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

fn usage<T>(message: &str) -> Result<T, UsageError> {
    Err(UsageError(message.into()))
}

/// Checks how the parsed flags combine and resolves them into a request.
pub fn request(cli: Cli) -> Result<Request, UsageError> {
    match cli.command {
        Some(Command::Inspect {
            input,
            json: _,
            explain: true,
        }) => Ok(Request::Explain { input }),
        Some(Command::Inspect { input, json, .. }) => Ok(Request::Inspect { input, json }),
        Some(Command::Calib {
            input,
            output,
            pairs,
            samples,
            calib: _,
        }) => {
            let Some(source) = calib_source(&pairs, None, &input) else {
                return usage("calib: give --images DIR and/or --texts FILE");
            };
            Ok(Request::Calib(CalibJob {
                input,
                source,
                samples,
                output,
            }))
        }
        Some(Command::Id {
            input,
            calib,
            data,
            json,
            estimator,
            variant,
            samples,
            pooling,
            svg,
            runtime,
            pairs,
            k,
        }) => {
            let options = IdOptions {
                estimator: estimator.into(),
                variant: variant.into(),
                k: k as usize,
                ..Default::default()
            };
            let calib = match &input {
                Some(model) => calib_source(&pairs, calib.as_deref(), model),
                None => calib.map(CalibSource::Npz),
            };
            match (input, calib, data) {
                (None, None, Some(_)) if svg.is_some() => usage(
                    "id: --svg plots the ID of each layer of a model; a --data matrix has one ID",
                ),
                (None, None, Some(path)) => Ok(Request::IdOfData {
                    path,
                    options,
                    json,
                }),
                (Some(_), _, Some(_)) => {
                    usage("id: give either a model (with --calib) or --data, not both")
                }
                (Some(input), Some(calib), None) => Ok(Request::Profile {
                    job: ProfileJob {
                        input,
                        calib,
                        measure: measure_options(samples, pooling.into(), options, &runtime),
                        runtime: runtime_options(&runtime),
                        svg,
                    },
                    json,
                }),
                (Some(_), None, None) => usage(
                    "id: a model needs calibration data (--calib FILE.npz, or --images DIR --texts FILE)",
                ),
                (None, _, None) => usage("id: give a model with --calib, or --data X.npy"),
                (None, Some(_), Some(_)) => usage("id: --calib needs a model"),
            }
        }
        None => prune_job(cli.prune).map(|job| Request::Prune(Box::new(job))),
    }
}

/// The main job from its flags.
fn prune_job(args: PruneArgs) -> Result<PruneJob, UsageError> {
    let (Some(input), Some(output)) = (args.input, args.output) else {
        // clap requires IN and OUT when no subcommand is given.
        return usage("give IN and OUT");
    };
    let calib = calib_source(&args.pairs, args.calib.as_deref(), &input);
    let budget = Budget {
        keep: args.keep_params,
        vision: args.vision_keep,
        text: args.text_keep,
    };
    let mode = Mode::from(args.mode);
    let unstructured = mode == Mode::Unstructured;
    if args.sparsity.is_some() && !unstructured {
        return usage("--sparsity is for --mode unstructured (structural modes use --keep-params)");
    }
    if unstructured && (budget.vision.is_some() || budget.text.is_some()) {
        return usage(
            "--mode unstructured uses one global quantile over both towers; --vision-keep/--text-keep do not apply",
        );
    }
    if unstructured && args.repair.is_some() {
        return usage(
            "--repair refits and compensates what structured modes remove; --mode unstructured removes nothing",
        );
    }
    if unstructured && args.sensitivity {
        return usage(
            "--sensitivity removes sub-blocks one at a time; --mode unstructured removes none",
        );
    }
    if unstructured && args.sparsity.is_some() && budget.keep.is_some() {
        return usage("give --sparsity or --keep-params, not both");
    }
    if budget.keep.is_some() && budget.vision.is_some() && budget.text.is_some() {
        return usage("give --keep-params, or both --vision-keep and --text-keep, not all three");
    }
    if args.min_fidelity.is_some() && args.plan.is_some() {
        return usage(
            "--min-fidelity needs held-out calibration samples (--calib with at least 8 samples); a --plan run has none",
        );
    }
    if args.min_fidelity.is_some() && args.holdout == 0 {
        return usage("--min-fidelity needs held-out samples; --holdout 0 holds none out");
    }
    let sized = budget.keep.is_some()
        || (budget.vision.is_some() && budget.text.is_some())
        || (unstructured && args.sparsity.is_some());
    let runtime = runtime_options(&args.runtime);
    let plan = match (&args.plan, calib, sized) {
        (Some(path), calib, _) => PlanSource::Given {
            plan: Plan::read(path).map_err(|e| UsageError(e.to_string()))?,
            file: Some(path.clone()),
            repair_data: calib,
        },
        (None, Some(calib), true) => {
            let id = IdOptions {
                variant: args.variant.into(),
                ..Default::default()
            };
            PlanSource::Decide {
                calib,
                settings: DecideSettings {
                    measure: measure_options(args.samples, args.pooling.into(), id, &args.runtime),
                    holdout: args.holdout,
                    decide: DecideOptions {
                        mode,
                        budget,
                        sparsity: args.sparsity,
                        repair: match args.repair.unwrap_or(RepairArg::LsqBias) {
                            RepairArg::None => RepairMethod::None,
                            RepairArg::Lsq => RepairMethod::Lsq,
                            RepairArg::Bias => RepairMethod::Bias,
                            RepairArg::LsqBias => RepairMethod::LsqBias,
                        },
                        score: args.score.into(),
                        sensitivity: args.sensitivity,
                    },
                },
            }
        }
        (None, Some(_), false) => {
            return usage(
                "--calib needs --keep-params F (the fraction of block parameters to keep), or both --vision-keep and --text-keep",
            );
        }
        (None, None, _) => {
            return usage("give --plan FILE, or --calib FILE.npz with --keep-params F");
        }
    };
    Ok(PruneJob {
        input,
        output,
        plan,
        runtime,
        plan_out: args.plan_out,
        external_data: args.external_data.map(Into::into),
        min_fidelity: args.min_fidelity,
        report: args.report,
    })
}

/// The calibration source: `--calib FILE`, or the images and captions of
/// `pairs` (their tokenizer and preprocessor files default to the ones in
/// the model's folder).
fn calib_source(pairs: &PairArgs, calib: Option<&Path>, model: &Path) -> Option<CalibSource> {
    if let Some(c) = calib {
        return Some(CalibSource::Npz(c.to_path_buf()));
    }
    if pairs.images.is_none() && pairs.texts.is_none() {
        return None;
    }
    Some(CalibSource::Pairs(PairSource {
        images: pairs.images.clone(),
        texts: pairs.texts.clone(),
        tokenizer: pairs.tokenizer.clone(),
        preprocessor: pairs.preprocessor.clone(),
        model_dir: model.parent().map(|p| {
            if p.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                p.to_path_buf()
            }
        }),
    }))
}

fn runtime_options(args: &RuntimeArgs) -> RuntimeOptions {
    RuntimeOptions {
        library: args.ort_lib.clone(),
        provider: args.ep,
        allow_fallback: args.allow_fallback,
        ..Default::default()
    }
}

/// Measurement settings, the same for `id` and the main job.
fn measure_options(
    samples: usize,
    pooling: onnx_idprune::calib::Pooling,
    id: IdOptions,
    runtime: &RuntimeArgs,
) -> MeasureOptions {
    MeasureOptions {
        samples,
        pooling,
        id,
        max_memory: runtime.max_memory.unwrap_or_else(default_max_memory),
    }
}
