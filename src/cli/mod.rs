//! The command line: argument types ([`args`]), and the one place where
//! parsed arguments become a library request — every check of how flags
//! combine is in one function, behind [`parse`] and [`main`]. Output formatting for people is in
//! [`output`]; [`main`] is the whole command, shared by the
//! `onnx-idprune` binary and the Python package's command and functions,
//! so both parse, check and fail alike.
//!
//! Exit codes: 0 success, 1 error, 2 usage error (from the parser), 3
//! fidelity gate not met, 128 + N interrupted by signal N.

// The clap types: their doc comments are the --help text.
mod args;
pub mod output;

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Parser;

use crate::calib::{CalibSource, PairSource, RuntimeOptions};
use crate::decide::{Budget, DecideOptions, Mode, RepairMethod};
use crate::id::IdOptions;
use crate::measure::{MeasureOptions, default_max_memory};
use crate::pipeline::{CalibJob, DecideSettings, PlanSource, ProfileJob, PruneJob};
use crate::plan::Plan;

use args::{Cli, Command, PairArgs, PruneArgs, RepairArg, RuntimeArgs};

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
        /// A folder's files to look at.
        files: Option<Vec<PathBuf>>,
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

/// A command that did not run: the one line to show and the exit code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The message, on one line.
    pub message: String,
    /// The process exit code.
    pub code: u8,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl Failure {
    /// The failure of a library call: the whole context chain on one line;
    /// exit code 3 for the fidelity gate, 1 for every other library, input
    /// and flag-combination error.
    pub fn of(e: &anyhow::Error) -> Self {
        let code = match e.downcast_ref::<crate::Error>() {
            Some(crate::Error::Fidelity { .. }) => 3,
            _ => 1,
        };
        Self {
            message: format!("{e:#}").replace('\n', " "),
            code,
        }
    }
}

/// The command line: runs `args` (the first is the program name) as the
/// `onnx-idprune` binary does — results on stdout, one line on stderr on
/// error — and returns the exit code.
pub fn main<I, T>(args: I) -> u8
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    handle_interruptions();
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version print to stdout and succeed; usage errors exit 2.
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    match request_with_plan(cli, None)
        .map_err(anyhow::Error::from)
        .and_then(dispatch)
    {
        Ok(()) => 0,
        Err(e) => {
            let failure = Failure::of(&e);
            eprintln!("onnx-idprune: {failure}");
            failure.code
        }
    }
}

/// Parses `args` (the first is the program name) into a checked request,
/// without printing: a parse error is exit code 2 with clap's reason on one
/// line (0 for `--help` and `--version`, whose text is the message), a bad
/// flag combination 1.
/// `plan` stands for a `--plan FILE` given in memory.
pub fn parse<I, T>(args: I, plan: Option<Plan>) -> Result<Request, Failure>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = Cli::try_parse_from(args).map_err(|e| {
        let text = e.render().to_string();
        if !e.use_stderr() {
            // --help, --version: the text is the result.
            return Failure {
                message: text,
                code: 0,
            };
        }
        // clap's reason and tips on one line, without the usage and
        // "--help" hints, which name flags where the caller wrote arguments.
        let reason: Vec<&str> = text
            .split("\n\n")
            .filter(|part| !part.starts_with("Usage:") && !part.starts_with("For more information"))
            .flat_map(str::split_whitespace)
            .collect();
        let reason = reason.join(" ");
        Failure {
            message: reason
                .strip_prefix("error: ")
                .unwrap_or(&reason)
                .to_string(),
            code: 2,
        }
    })?;
    request_with_plan(cli, plan).map_err(|e| Failure {
        message: e.0,
        code: 1,
    })
}

/// On SIGINT, SIGTERM or SIGHUP: remove the temporary outputs being written
/// (so no partial OUT or stray file remains) and exit with 128 + signal.
fn handle_interruptions() {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) else {
        return; // without a handler the default action still stops the run
    };
    std::thread::spawn(move || {
        if let Some(signal) = signals.forever().next() {
            crate::onnx::remove_staged_files();
            eprintln!("onnx-idprune: interrupted (signal {signal}); unfinished outputs removed");
            std::process::exit(128 + signal);
        }
    });
}

/// Runs the request and prints what it returns.
fn dispatch(request: Request) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match request {
        Request::Prune(job) => {
            let outcome = job.run()?;
            eprintln!("onnx-idprune: {}", output::pruned(&job.output, &outcome));
        }
        Request::Inspect { input, json, files } if files.is_some() || input.is_dir() => {
            if !input.is_dir() {
                anyhow::bail!(
                    "--files chooses the files of a folder, and {} is a file",
                    input.display()
                );
            }
            let folder = crate::pipeline::inspect_folder(&input, files.as_deref())?;
            stdout.write_all(output::folder(&folder, json).as_bytes())?;
        }
        Request::Inspect { input, json, .. } => {
            let arch = crate::pipeline::inspect(&input)?;
            stdout.write_all(output::architecture(&arch, json).as_bytes())?;
        }
        Request::Explain { input } => {
            for line in crate::pipeline::explain(&input)? {
                writeln!(stdout, "{line}")?;
            }
        }
        Request::Calib(job) => {
            let summary = job.run()?;
            eprintln!(
                "onnx-idprune: {}",
                output::calibration(&job.output, &summary)
            );
        }
        Request::Profile { job, json } => {
            let profile = job.run()?;
            stdout.write_all(output::profile(&profile, json).as_bytes())?;
        }
        Request::IdOfData {
            path,
            options,
            json,
        } => {
            let estimate = crate::pipeline::id_of_data(&path, &options)?;
            stdout.write_all(output::estimate(&path, &estimate, json).as_bytes())?;
        }
    }
    Ok(())
}

/// [`request`], with `plan` standing for a `--plan FILE` (given in memory;
/// no plan file is read then).
fn request_with_plan(cli: Cli, plan: Option<Plan>) -> Result<Request, UsageError> {
    match cli.command {
        Some(Command::Inspect {
            input,
            json: _,
            explain: true,
            ..
        }) => Ok(Request::Explain { input }),
        Some(Command::Inspect {
            input, json, files, ..
        }) => Ok(Request::Inspect { input, json, files }),
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
        None => prune_job(cli.prune, plan).map(|job| Request::Prune(Box::new(job))),
    }
}

/// The main job from its flags.
fn prune_job(args: PruneArgs, given_plan: Option<Plan>) -> Result<PruneJob, UsageError> {
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
    if given_plan.is_some() && args.plan.is_some() {
        return usage("give the plan in memory or as --plan FILE, not both");
    }
    if given_plan.is_some()
        && (budget.keep.is_some()
            || budget.vision.is_some()
            || budget.text.is_some()
            || args.repair.is_some()
            || args.sparsity.is_some()
            || args.sensitivity)
    {
        return usage(
            "a given plan is applied exactly: --keep-params, --vision-keep, --text-keep, --repair, --sparsity and --sensitivity do not apply",
        );
    }
    let has_plan = given_plan.is_some() || args.plan.is_some();
    if args.min_fidelity.is_some() && has_plan {
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
        (None, calib, _) if given_plan.is_some() => PlanSource::Given {
            plan: given_plan.expect("checked above"),
            file: None,
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
        input_name: None,
        files: args.files,
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
        // A folder keeps its tokenizer and preprocessor files in itself.
        model_dir: (if model.is_dir() {
            Some(model)
        } else {
            model.parent()
        })
        .map(|p| {
            if p.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                p.to_path_buf()
            }
        }),
        folder_export: model.is_dir(),
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
    pooling: crate::calib::Pooling,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_args(args: &[&str], plan: Option<Plan>) -> Result<Request, Failure> {
        parse(
            std::iter::once("onnx-idprune").chain(args.iter().copied()),
            plan,
        )
    }

    #[test]
    fn a_refused_value_is_exit_code_2_on_one_line_without_the_usage_hints() {
        let failure = parse_args(
            &[
                "in.onnx",
                "out.onnx",
                "--calib",
                "c.npz",
                "--keep-params",
                "1.5",
            ],
            None,
        )
        .unwrap_err();
        assert_eq!(failure.code, 2);
        assert_eq!(
            failure.message,
            "invalid value '1.5' for '--keep-params <F>': 1.5 is not in (0, 1]"
        );
        let failure =
            parse_args(&["in.onnx", "out.onnx", "--keep-parms", "0.5"], None).unwrap_err();
        assert_eq!(failure.code, 2);
        assert!(!failure.message.contains('\n'), "{}", failure.message);
        assert!(
            failure.message.contains("--keep-params"),
            "the tip stays: {}",
            failure.message
        );
        assert!(!failure.message.contains("Usage:"), "{}", failure.message);
    }

    #[test]
    fn help_is_exit_code_0_with_its_text() {
        let failure = parse_args(&["--help"], None).unwrap_err();
        assert_eq!(failure.code, 0);
        assert!(failure.message.contains("--keep-params"));
    }

    #[test]
    fn a_plan_given_in_memory_is_applied_and_takes_no_decision_flags() {
        let Ok(Request::Prune(job)) = parse_args(&["in.onnx", "out.onnx"], Some(Plan::empty()))
        else {
            panic!("a plan in memory is a plan run");
        };
        assert!(matches!(
            job.plan,
            PlanSource::Given {
                file: None,
                repair_data: None,
                ..
            }
        ));
        for flags in [
            &["--calib", "c.npz", "--keep-params", "0.5"][..],
            &["--calib", "c.npz", "--repair", "lsq"][..],
            &["--calib", "c.npz", "--sensitivity"][..],
        ] {
            let args: Vec<&str> = ["in.onnx", "out.onnx"]
                .into_iter()
                .chain(flags.iter().copied())
                .collect();
            let failure = parse_args(&args, Some(Plan::empty())).unwrap_err();
            assert_eq!(failure.code, 1, "{flags:?}");
            assert!(
                failure
                    .message
                    .starts_with("a given plan is applied exactly"),
                "{failure}"
            );
        }
        let failure = parse_args(
            &["in.onnx", "out.onnx", "--plan", "p.json"],
            Some(Plan::empty()),
        )
        .unwrap_err();
        assert_eq!(failure.code, 1);
        assert!(failure.message.contains("not both"), "{failure}");
    }

    #[test]
    fn the_fidelity_gate_is_exit_code_3_and_other_errors_1() {
        let gate = anyhow::Error::from(crate::Error::Fidelity {
            got: 0.5,
            required: 0.9,
        });
        assert_eq!(Failure::of(&gate).code, 3);
        let other = anyhow::Error::from(crate::Error::Unsupported("x\ny".into()));
        let failure = Failure::of(&other);
        assert_eq!((failure.code, failure.message.as_str()), (1, "x y"));
    }
}
