//! The `onnx-idprune` command line: parses arguments, calls the library,
//! prints one line on error and picks the exit code.
//!
//! Exit codes: 0 success, 1 error, 2 usage error, 3 fidelity gate not met.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};

use onnx_idprune::PruneJob;
use onnx_idprune::calib::Provider;
use onnx_idprune::onnx::ExternalData;
use onnx_idprune::plan::Plan;

#[derive(Parser, Debug)]
#[command(
    name = "onnx-idprune",
    version,
    about = "Prune CLIP/BLIP ONNX models guided by the intrinsic dimension of each layer",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    arg_required_else_help = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    prune: PruneArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show the towers and transformer blocks of a model.
    Inspect {
        /// The model.
        input: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Turn images and captions into a calibration .npz for a model (what
    /// --images/--texts feed it, for inspection or reuse with --calib).
    Calib {
        /// The model the inputs are for.
        input: PathBuf,
        /// Where to write the .npz.
        #[arg(short, long, value_name = "OUT.npz")]
        output: PathBuf,
        #[command(flatten)]
        pairs: PairArgs,
        /// Samples to take (evenly spaced when there are more).
        #[arg(long, default_value_t = 512, value_parser = parse_count)]
        samples: usize,
        #[arg(long, hide = true)]
        calib: Option<PathBuf>,
    },
    /// Estimate the intrinsic dimension of each layer, or of a data matrix.
    Id {
        /// The model (omit with --data).
        input: Option<PathBuf>,
        /// Calibration data (.npz, arrays named after the model inputs).
        #[arg(long)]
        calib: Option<PathBuf>,
        /// A data matrix (.npy, rows = samples) instead of a model.
        #[arg(long)]
        data: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Estimator.
        #[arg(long, value_enum, default_value = "twonn")]
        estimator: onnx_idprune::id::Estimator,
        /// TwoNN variant: facco (smallest 90% of μ) or paper (block analysis).
        #[arg(long, value_enum, default_value = "facco")]
        variant: onnx_idprune::id::Variant,
        /// Calibration samples to use (the first N of the file).
        #[arg(long, default_value_t = 512, value_parser = parse_count)]
        samples: usize,
        /// How token outputs become one vector per sample.
        #[arg(long, value_enum, default_value = "flatten")]
        pooling: onnx_idprune::calib::collect::Pooling,
        /// Also write an SVG plot of ID per block.
        #[arg(long, value_name = "FILE")]
        svg: Option<PathBuf>,
        #[command(flatten)]
        runtime: RuntimeArgs,
        #[command(flatten)]
        pairs: PairArgs,
        /// Neighbours for --estimator mle.
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(2..=1000))]
        k: u32,
    },
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("calib_source").args(["calib", "images", "texts"]).multiple(true)))]
struct PruneArgs {
    /// The model to prune.
    #[arg(required = true)]
    input: Option<PathBuf>,
    /// Where to write the pruned model (never the input).
    #[arg(required = true)]
    output: Option<PathBuf>,
    /// Apply this plan exactly: no calibration, no ONNX Runtime needed.
    #[arg(long, value_name = "FILE")]
    plan: Option<PathBuf>,
    /// Write the plan that was applied (normalised JSON).
    #[arg(long, value_name = "FILE")]
    plan_out: Option<PathBuf>,
    /// Calibration data (.npz, arrays named after graph inputs, axis 0 = sample).
    #[arg(long, value_name = "FILE.npz")]
    calib: Option<PathBuf>,
    #[command(flatten)]
    pairs: PairArgs,
    /// Fraction of transformer-block parameters to keep, 0 < F <= 1.
    #[arg(long, value_name = "F", value_parser = parse_fraction, conflicts_with = "plan", requires = "calib_source")]
    keep_params: Option<f64>,
    /// Fraction of the vision tower's block parameters to keep (overrides
    /// the global threshold for that tower).
    #[arg(long, value_name = "F", value_parser = parse_fraction, conflicts_with = "plan", requires = "calib_source")]
    vision_keep: Option<f64>,
    /// Fraction of the text tower's block parameters to keep.
    #[arg(long, value_name = "F", value_parser = parse_fraction, conflicts_with = "plan", requires = "calib_source")]
    text_keep: Option<f64>,
    /// What may be removed: blocks (whole blocks and attention/MLP
    /// sub-blocks), units (attention heads and MLP neurons), all (both), or
    /// unstructured (zero single weights by |w| · ID; nothing is removed).
    #[arg(long, value_enum, default_value = "blocks")]
    mode: onnx_idprune::decide::Mode,
    /// After removing heads or neurons, refit the projection that reads
    /// them by least squares on the decision samples (lsq, the default:
    /// on the trained fixture at half the block parameters in units mode it
    /// keeps zero-shot top-1 at 98.7% against 78.2% without), or not (none).
    #[arg(long, value_enum, default_value = "lsq")]
    repair: RepairArg,
    /// --mode unstructured: fraction of block weights to zero, 0 < S < 1
    /// (default: 1 − --keep-params).
    #[arg(long, value_name = "S", value_parser = parse_open_fraction, conflicts_with = "plan", requires = "calib_source")]
    sparsity: Option<f64>,
    /// Importance: id (block influence × intrinsic dimension, the paper's rule), bi, magnitude.
    #[arg(long, value_enum, default_value = "id")]
    score: onnx_idprune::plan::importance::Score,
    /// Calibration samples used for decisions (the first N of the file).
    #[arg(long, default_value_t = 512, value_parser = parse_count)]
    samples: usize,
    /// Samples held out for verification (the last N of the file, at most a quarter).
    #[arg(long, default_value_t = 64)]
    holdout: usize,
    /// How token outputs become one vector per sample for ID estimation.
    #[arg(long, value_enum, default_value = "flatten")]
    pooling: onnx_idprune::calib::collect::Pooling,
    /// TwoNN variant for the layer IDs.
    #[arg(long, value_enum, default_value = "facco")]
    variant: onnx_idprune::id::Variant,
    /// Refuse to write OUT (exit 3) if the held-out output cosine is below F.
    #[arg(long, value_name = "F", value_parser = parse_cosine)]
    min_fidelity: Option<f64>,
    /// Write a JSON report, plus a Markdown summary and an SVG plot named
    /// after it with the extension replaced (r.json: r.md, r.svg).
    /// No output may be an input file or another output.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
    #[command(flatten)]
    runtime: RuntimeArgs,
    /// Where tensor data goes: auto (like the input; external above 2 GiB), always (OUT.data next to OUT), never.
    #[arg(long, value_name = "WHEN", value_enum)]
    external_data: Option<ExternalDataArg>,
}

/// Images and captions as calibration data (instead of --calib FILE.npz).
#[derive(Args, Debug, Clone, Default)]
struct PairArgs {
    /// Folder of calibration images (PNG/JPEG, sorted by name; pairs with --texts line by line).
    #[arg(long, value_name = "DIR", conflicts_with = "calib")]
    images: Option<PathBuf>,
    /// Calibration captions, one per line.
    #[arg(long, value_name = "FILE", conflicts_with = "calib")]
    texts: Option<PathBuf>,
    /// Hugging Face tokenizer.json for --texts (default: the one next to the model).
    #[arg(long, value_name = "FILE", requires = "texts")]
    tokenizer: Option<PathBuf>,
    /// Hugging Face preprocessor_config.json for --images (default: the one next to the model, else CLIP's settings).
    #[arg(long, value_name = "FILE", requires = "images")]
    preprocessor: Option<PathBuf>,
}

impl PairArgs {
    /// The calibration source: `calib`, or these images and captions.
    fn source(
        &self,
        calib: &Option<PathBuf>,
        model: &std::path::Path,
    ) -> Option<onnx_idprune::calib::CalibSource> {
        use onnx_idprune::calib::{CalibSource, PairSource};
        if let Some(c) = calib {
            return Some(CalibSource::Npz(c.clone()));
        }
        if self.images.is_none() && self.texts.is_none() {
            return None;
        }
        Some(CalibSource::Pairs(PairSource {
            images: self.images.clone(),
            texts: self.texts.clone(),
            tokenizer: self.tokenizer.clone(),
            preprocessor: self.preprocessor.clone(),
            model_dir: model.parent().map(|p| {
                if p.as_os_str().is_empty() {
                    PathBuf::from(".")
                } else {
                    p.to_path_buf()
                }
            }),
        }))
    }
}

/// ONNX Runtime and calibration settings shared by the commands that run models.
#[derive(Args, Debug, Clone)]
struct RuntimeArgs {
    /// Most bytes of calibration features held at once (e.g. 2G, 512M); more
    /// layers are measured in several passes. Default: a quarter of RAM.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    max_memory: Option<u64>,
    /// Execution provider (strict unless --allow-fallback).
    #[arg(long, value_name = "EP", default_value = "cpu", value_parser = parse_provider)]
    ep: Provider,
    /// Run on CPU when the requested provider cannot be registered.
    #[arg(long)]
    allow_fallback: bool,
    /// The ONNX Runtime shared library (else ORT_DYLIB_PATH, else the project-local copy).
    #[arg(long, value_name = "PATH")]
    ort_lib: Option<PathBuf>,
}

impl RuntimeArgs {
    fn options(&self) -> onnx_idprune::calib::RuntimeOptions {
        onnx_idprune::calib::RuntimeOptions {
            library: self.ort_lib.clone(),
            provider: self.ep,
            allow_fallback: self.allow_fallback,
            ..Default::default()
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum RepairArg {
    /// Rows of the downstream projection are simply removed.
    None,
    /// Least-squares refit of the downstream projection and its bias.
    Lsq,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ExternalDataArg {
    Auto,
    Always,
    Never,
}

fn parse_fraction(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("'{s}' is not a number"))?;
    if v > 0.0 && v <= 1.0 {
        Ok(v)
    } else {
        Err(format!("{v} is not in (0, 1]"))
    }
}

fn parse_count(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("'{s}' is not a whole number")),
    }
}

/// A cosine similarity threshold: a number in [-1, 1] (NaN would switch
/// the gate off without saying so).
fn parse_cosine(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("'{s}' is not a number"))?;
    if (-1.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{s} is not a cosine in [-1, 1]"))
    }
}

fn parse_open_fraction(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("'{s}' is not a number"))?;
    if v > 0.0 && v < 1.0 {
        Ok(v)
    } else {
        Err(format!("{v} is not in (0, 1)"))
    }
}

fn parse_size(s: &str) -> Result<u64, String> {
    let (digits, unit) = s.trim().split_at(
        s.trim()
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(s.trim().len()),
    );
    let value: u64 = digits
        .parse()
        .map_err(|_| format!("'{s}' is not a size like 512M or 4G"))?;
    let scale = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        _ => return Err(format!("unknown size unit in '{s}' (use K, M or G)")),
    };
    value
        .checked_mul(scale)
        .filter(|v| *v > 0)
        .ok_or_else(|| format!("'{s}' is not a usable size"))
}

fn parse_provider(s: &str) -> Result<Provider, String> {
    s.parse()
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
            onnx_idprune::onnx::remove_staged_files();
            eprintln!("onnx-idprune: interrupted (signal {signal}); unfinished outputs removed");
            std::process::exit(128 + signal);
        }
    });
}

fn main() -> ExitCode {
    handle_interruptions();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version print to stdout and succeed; usage errors exit 2.
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("onnx-idprune: {}", one_line(&e));
            ExitCode::from(exit_code(&e))
        }
    }
}

/// The whole context chain on one line.
fn one_line(e: &anyhow::Error) -> String {
    format!("{e:#}").replace('\n', " ")
}

/// Exit code for an error: 1 for every library and input error (usage
/// errors exit 2 from clap before this point).
fn exit_code(e: &anyhow::Error) -> u8 {
    match e.downcast_ref::<onnx_idprune::Error>() {
        Some(onnx_idprune::Error::Fidelity { .. }) => 3,
        _ => 1,
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Some(Command::Inspect { input, json }) => inspect(&input, json),
        Some(Command::Calib {
            input,
            output,
            pairs,
            samples,
            calib: _,
        }) => {
            let Some(source) = pairs.source(&None, &input) else {
                bail!("calib: give --images DIR and/or --texts FILE")
            };
            let model = onnx_idprune::open(&input)?;
            let mut files = onnx_idprune::FileGuard::new();
            files
                .inputs(model.protected_files())
                .inputs(onnx_idprune::calib_files(&source))
                .output(&output, "the -o file");
            files.check()?;
            let (inputs, n) = source.load(&model.model.graph, samples)?;
            let bytes = onnx_idprune::calib::sources::npz_bytes(&inputs)
                .map_err(|e| anyhow::anyhow!("{}: {e}", output.display()))?;
            onnx_idprune::write_atomic(&output, &bytes)?;
            eprintln!(
                "onnx-idprune: wrote {} ({n} samples: {})",
                output.display(),
                inputs
                    .iter()
                    .map(|(k, v)| format!("{k} {:?}", v.shape()))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            Ok(())
        }
        Some(Command::Id {
            input,
            calib,
            data,
            json,
            estimator,
            variant,
            k,
            samples,
            pooling,
            svg,
            runtime,
            pairs,
        }) => {
            let options = onnx_idprune::id::IdOptions {
                estimator,
                variant,
                k: k as usize,
                ..Default::default()
            };
            let calib = input
                .as_ref()
                .and_then(|i| pairs.source(&calib, i))
                .or(calib.map(Into::into));
            match (input, calib, data) {
                (None, None, Some(_)) if svg.is_some() => {
                    bail!(
                        "id: --svg plots the ID of each layer of a model; a --data matrix has one ID"
                    )
                }
                (None, None, Some(data)) => id_of_data(&data, &options, json),
                (Some(_), _, Some(_)) => {
                    bail!("id: give either a model (with --calib) or --data, not both")
                }
                (Some(input), Some(calib), None) => {
                    let profile_options = onnx_idprune::profile::ProfileOptions {
                        samples,
                        pooling,
                        id: options,
                        runtime: runtime.options(),
                        max_memory: runtime
                            .max_memory
                            .unwrap_or_else(onnx_idprune::profile::default_max_memory),
                    };
                    if let Some(path) = &svg {
                        let mut files = onnx_idprune::FileGuard::new();
                        files
                            .inputs(onnx_idprune::model_files(&input)?)
                            .inputs(onnx_idprune::calib_files(&calib))
                            .inputs(onnx_idprune::runtime_files(&profile_options.runtime))
                            .output(path, "the --svg file");
                        files.check()?;
                    }
                    let profile = onnx_idprune::profile::profile(&input, &calib, &profile_options)?;
                    if let Some(path) = &svg {
                        onnx_idprune::write_atomic(
                            path,
                            onnx_idprune::report::profile_svg(&profile).as_bytes(),
                        )?;
                    }
                    if json {
                        println!("{}", serde_json::to_string_pretty(&profile)?);
                    } else {
                        print!("{}", onnx_idprune::report::profile_table(&profile));
                    }
                    Ok(())
                }
                (Some(_), None, None) => {
                    bail!(
                        "id: a model needs calibration data (--calib FILE.npz, or --images DIR --texts FILE)"
                    )
                }
                (None, _, None) => bail!("id: give a model with --calib, or --data X.npy"),
                (None, Some(_), Some(_)) => bail!("id: --calib needs a model"),
            }
        }
        None => prune(cli.prune),
    }
}

fn inspect(input: &std::path::Path, json: bool) -> Result<()> {
    let source = onnx_idprune::open(input)?;
    let arch = onnx_idprune::arch::discover(&source.model.graph)
        .map_err(|e| anyhow::anyhow!("{}: {e}", input.display()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&arch.to_json())?);
    } else {
        print!("{}", onnx_idprune::report::architecture_table(&arch));
    }
    Ok(())
}

fn id_of_data(
    path: &std::path::Path,
    options: &onnx_idprune::id::IdOptions,
    json: bool,
) -> Result<()> {
    let data = onnx_idprune::calib::data::read_matrix(path)?;
    let estimate = onnx_idprune::id::estimate(data.view(), options)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    if json {
        println!("{}", serde_json::to_string(&estimate)?);
    } else {
        println!(
            "{}: intrinsic dimension {:.3} ({:?}/{:?}; {} samples of dimension {}, {} duplicates removed)",
            path.display(),
            estimate.id,
            estimate.estimator,
            estimate.variant,
            estimate.n,
            estimate.dim,
            estimate.duplicates_removed
        );
    }
    Ok(())
}

fn prune(args: PruneArgs) -> Result<()> {
    let (Some(input), Some(output)) = (args.input, args.output) else {
        unreachable!("clap requires IN and OUT");
    };
    let mut job = PruneJob::new(&input, &output);
    let calib = args.pairs.source(&args.calib, &input);
    let budget = onnx_idprune::plan::importance::Budget {
        keep: args.keep_params,
        vision: args.vision_keep,
        text: args.text_keep,
    };
    let unstructured = args.mode == onnx_idprune::decide::Mode::Unstructured;
    if args.sparsity.is_some() && !unstructured {
        bail!("--sparsity is for --mode unstructured (structural modes use --keep-params)")
    }
    if unstructured && (budget.vision.is_some() || budget.text.is_some()) {
        bail!(
            "--mode unstructured uses one global quantile over both towers; --vision-keep/--text-keep do not apply"
        )
    }
    if unstructured && args.sparsity.is_some() && budget.keep.is_some() {
        bail!("give --sparsity or --keep-params, not both")
    }
    let sized = budget.keep.is_some()
        || (budget.vision.is_some() && budget.text.is_some())
        || (unstructured && args.sparsity.is_some());
    if budget.keep.is_some() && budget.vision.is_some() && budget.text.is_some() {
        bail!("give --keep-params, or both --vision-keep and --text-keep, not all three")
    }
    match (&args.plan, &calib, sized) {
        (Some(plan), calib, _) => {
            job = job.with_plan(Plan::read(plan)?);
            job.plan_file = Some(plan.clone());
            job.repair_data = calib.clone().map(|c| (c, args.runtime.options()));
        }
        (None, Some(calib), true) => {
            let id = onnx_idprune::id::IdOptions {
                variant: args.variant,
                ..Default::default()
            };
            let profile = onnx_idprune::profile::ProfileOptions {
                samples: args.samples,
                pooling: args.pooling,
                id,
                runtime: args.runtime.options(),
                max_memory: args
                    .runtime
                    .max_memory
                    .unwrap_or_else(onnx_idprune::profile::default_max_memory),
            };
            let options = onnx_idprune::decide::DecideOptions {
                mode: args.mode,
                budget,
                sparsity: args.sparsity,
                repair: args.repair == RepairArg::Lsq,
                score: args.score,
                holdout: args.holdout,
                profile,
            };
            job.decide = Some((calib.clone(), options));
        }
        (None, Some(_), false) => {
            bail!(
                "--calib needs --keep-params F (the fraction of block parameters to keep), or both --vision-keep and --text-keep"
            )
        }
        (None, None, _) => bail!("give --plan FILE, or --calib FILE.npz with --keep-params F"),
    }
    job.min_fidelity = args.min_fidelity;
    job.report = args.report;
    job.plan_out = args.plan_out;
    job.external_data = args.external_data.map(|e| match e {
        ExternalDataArg::Auto => ExternalData::Auto,
        ExternalDataArg::Always => ExternalData::Always,
        ExternalDataArg::Never => ExternalData::Never,
    });
    let outcome = job.run()?;
    let mut line = format!(
        "wrote {} ({} bytes",
        output.display(),
        outcome.saved.model_bytes
    );
    if let Some(data) = &outcome.saved.external_file {
        line.push_str(&format!(
            " + {} bytes in {}",
            outcome.saved.external_bytes,
            data.display()
        ));
    }
    let blocks = outcome.plan.blocks.len();
    line.push_str(&format!(
        "; plan: {blocks} block action{}",
        if blocks == 1 { "" } else { "s" }
    ));
    if let Some(f) = &outcome.fidelity {
        line.push_str(&format!("; held-out cosine {:.4}", f.min_cosine));
        if let Some(t) = f.top1_agreement {
            line.push_str(&format!(", top-1 agreement {:.1}%", 100.0 * t));
        }
    }
    line.push(')');
    eprintln!("onnx-idprune: {line}");
    Ok(())
}
