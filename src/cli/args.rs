//! The command line's argument types, parsed by clap. Each flag's help
//! sits with it; values are checked as they are parsed (a fraction in
//! (0, 1], a size like `512M`), combinations of flags in [`super::request`].

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::calib::{Pooling, Provider};
use crate::decide::{Mode, Score};
use crate::id::{Estimator, Variant};
use crate::onnx::ExternalData;

#[derive(Parser, Debug)]
#[command(
    name = "onnx-idprune",
    version,
    about = "Prune CLIP/BLIP ONNX models guided by the intrinsic dimension of each layer",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    arg_required_else_help = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub prune: PruneArgs,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Show the towers and transformer blocks of a model.
    Inspect {
        /// The model (a file, or a folder of model files).
        input: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// When IN is a folder: the model files to look at, relative to it,
        /// comma-separated (default: the ones found, one per tower).
        #[arg(
            long,
            value_name = "FILES",
            value_delimiter = ',',
            conflicts_with = "explain"
        )]
        files: Option<Vec<PathBuf>>,
        /// Say, for every attention anchor and MLP candidate, what matched
        /// or at which node and operator the pattern stopped.
        #[arg(long, conflicts_with = "json")]
        explain: bool,
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
        estimator: EstimatorArg,
        /// TwoNN variant: facco (smallest 90% of μ) or paper (block analysis).
        #[arg(long, value_enum, default_value = "facco")]
        variant: VariantArg,
        /// Calibration samples to use (the first N of the file).
        #[arg(long, default_value_t = 512, value_parser = parse_count)]
        samples: usize,
        /// How token outputs become one vector per sample.
        #[arg(long, value_enum, default_value = "flatten")]
        pooling: PoolingArg,
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
pub struct PruneArgs {
    /// The model to prune: a file, or a folder of model files (optimum,
    /// transformers.js, a captioner's vision encoder + text decoder) pruned
    /// together.
    #[arg(required = true)]
    pub input: Option<PathBuf>,
    /// Where to write the pruned model (never the input); for a folder, a
    /// new folder, written whole or not at all.
    #[arg(required = true)]
    pub output: Option<PathBuf>,
    /// When IN is a folder: the model files to prune, relative to it,
    /// comma-separated, one per tower (default: the ones found; variants
    /// such as *_fp16.onnx are copied unchanged).
    #[arg(long, value_name = "FILES", value_delimiter = ',')]
    pub files: Option<Vec<PathBuf>>,
    /// Apply this plan exactly: no calibration, no ONNX Runtime needed.
    #[arg(long, value_name = "FILE")]
    pub plan: Option<PathBuf>,
    /// Write the plan that was applied (normalised JSON).
    #[arg(long, value_name = "FILE")]
    pub plan_out: Option<PathBuf>,
    /// Calibration data (.npz, arrays named after graph inputs, axis 0 = sample).
    #[arg(long, value_name = "FILE.npz")]
    pub calib: Option<PathBuf>,
    #[command(flatten)]
    pub pairs: PairArgs,
    /// Fraction of transformer-block parameters to keep, 0 < F <= 1.
    #[arg(long, value_name = "F", value_parser = parse_fraction, conflicts_with = "plan", requires = "calib_source")]
    pub keep_params: Option<f64>,
    /// Fraction of the vision tower's block parameters to keep (overrides
    /// the global threshold for that tower), at least 0.1.
    #[arg(long, value_name = "F", value_parser = parse_tower_fraction, conflicts_with = "plan", requires = "calib_source")]
    pub vision_keep: Option<f64>,
    /// Fraction of the text tower's block parameters to keep, at least 0.1.
    #[arg(long, value_name = "F", value_parser = parse_tower_fraction, conflicts_with = "plan", requires = "calib_source")]
    pub text_keep: Option<f64>,
    /// What may be removed: all (the default: sub-blocks and heads/neurons,
    /// the split of the budget between them and between the towers chosen
    /// on decision samples), blocks (whole blocks and attention/MLP
    /// sub-blocks), units (attention heads and MLP neurons), or
    /// unstructured (zero single weights by |w| · ID; nothing is removed).
    #[arg(long, value_enum, default_value = "all")]
    pub mode: ModeArg,
    /// How removals are repaired on the decision samples: lsq+bias (the
    /// default: least-squares refit of every projection that reads a
    /// slimmed width, and a removed sub-block's branch replaced by its mean
    /// output), lsq, bias, or none. BENCHMARKS.md has the measurements.
    // No clap default: asking for it with --mode unstructured, which
    // removes nothing to repair, is refused; unset means lsq+bias.
    #[arg(long, value_enum, value_name = "REPAIR", conflicts_with = "plan")]
    pub repair: Option<RepairArg>,
    /// --mode unstructured: fraction of block weights to zero, 0 < S < 1
    /// (default: 1 − --keep-params).
    #[arg(long, value_name = "S", value_parser = parse_open_fraction, conflicts_with = "plan", requires = "calib_source")]
    pub sparsity: Option<f64>,
    /// Importance: id (block influence × intrinsic dimension, the paper's rule), bi, magnitude.
    #[arg(long, value_enum, default_value = "id")]
    pub score: ScoreArg,
    /// Also remove each sub-block alone on the decision samples and put the
    /// cost, and its rank correlation with the sub-block's ID, in the
    /// report (one judged model per sub-block).
    #[arg(long, conflicts_with = "plan", requires = "calib_source")]
    pub sensitivity: bool,
    /// Calibration samples used for decisions (the first N of the file).
    #[arg(long, default_value_t = 512, value_parser = parse_count)]
    pub samples: usize,
    /// Samples held out for verification (the last N of the file, at most a quarter).
    #[arg(long, default_value_t = 64)]
    pub holdout: usize,
    /// How token outputs become one vector per sample for ID estimation.
    #[arg(long, value_enum, default_value = "flatten")]
    pub pooling: PoolingArg,
    /// TwoNN variant for the layer IDs.
    #[arg(long, value_enum, default_value = "facco")]
    pub variant: VariantArg,
    /// Refuse to write OUT (exit 3) if the held-out output cosine is below F.
    #[arg(long, value_name = "F", value_parser = parse_cosine)]
    pub min_fidelity: Option<f64>,
    /// Write a JSON report, plus a Markdown summary and an SVG plot named
    /// after it with the extension replaced (r.json: r.md, r.svg).
    /// No output may be an input file or another output.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    /// Where tensor data goes: auto (like the input; external above 2 GiB), always (OUT.data next to OUT), never.
    #[arg(long, value_name = "WHEN", value_enum)]
    pub external_data: Option<ExternalDataArg>,
}

/// Images and captions as calibration data (instead of --calib FILE.npz).
#[derive(Args, Debug, Clone, Default)]
pub struct PairArgs {
    /// Folder of calibration images (PNG/JPEG, sorted by name; pairs with --texts line by line).
    #[arg(long, value_name = "DIR", conflicts_with = "calib")]
    pub images: Option<PathBuf>,
    /// Calibration captions, one per line.
    #[arg(long, value_name = "FILE", conflicts_with = "calib")]
    pub texts: Option<PathBuf>,
    /// Hugging Face tokenizer.json for --texts (default: the one next to the model).
    #[arg(long, value_name = "FILE", requires = "texts")]
    pub tokenizer: Option<PathBuf>,
    /// Hugging Face preprocessor_config.json for --images (default: the one next to the model, else CLIP's settings).
    #[arg(long, value_name = "FILE", requires = "images")]
    pub preprocessor: Option<PathBuf>,
}

/// ONNX Runtime and calibration settings shared by the commands that run models.
#[derive(Args, Debug, Clone)]
pub struct RuntimeArgs {
    /// Most bytes of calibration features held at once (e.g. 2G, 512M); more
    /// layers are measured in several passes. Default: a quarter of RAM.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub max_memory: Option<u64>,
    /// Execution provider (strict unless --allow-fallback).
    #[arg(long, value_name = "EP", default_value = "cpu", value_parser = parse_provider)]
    pub ep: Provider,
    /// Run on CPU when the requested provider cannot be registered.
    #[arg(long)]
    pub allow_fallback: bool,
    /// The ONNX Runtime shared library (else ORT_DYLIB_PATH, else the onnxruntime
    /// wheel's when run from the Python package, else the project-local copy).
    #[arg(long, value_name = "PATH")]
    pub ort_lib: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RepairArg {
    /// Rows of the downstream projection and removed branches are simply gone.
    None,
    /// Least-squares refit of the downstream projection and its bias.
    Lsq,
    /// A removed sub-block's branch is replaced by its mean output.
    Bias,
    /// Both.
    #[value(name = "lsq+bias")]
    LsqBias,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ExternalDataArg {
    Auto,
    Always,
    Never,
}

/// `--mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// Whole blocks and attention/MLP sub-blocks.
    Blocks,
    /// Attention heads and MLP neurons.
    Units,
    /// Both; the split of the budget is chosen on calibration samples.
    All,
    /// Zero single weights by |w| · ID (nothing is removed).
    Unstructured,
}

impl From<ModeArg> for Mode {
    fn from(m: ModeArg) -> Self {
        match m {
            ModeArg::Blocks => Mode::Blocks,
            ModeArg::Units => Mode::Units,
            ModeArg::All => Mode::All,
            ModeArg::Unstructured => Mode::Unstructured,
        }
    }
}

/// `--score`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ScoreArg {
    /// Block influence × intrinsic dimension (the paper's rule).
    Id,
    /// Block influence alone.
    Bi,
    /// Mean absolute weight alone.
    Magnitude,
}

impl From<ScoreArg> for Score {
    fn from(s: ScoreArg) -> Self {
        match s {
            ScoreArg::Id => Score::Id,
            ScoreArg::Bi => Score::Bi,
            ScoreArg::Magnitude => Score::Magnitude,
        }
    }
}

/// `--pooling`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PoolingArg {
    /// All tokens × channels in one vector (the paper's choice).
    Flatten,
    /// The first token.
    Cls,
    /// Mean over the tokens that are not padding.
    Mean,
}

impl From<PoolingArg> for Pooling {
    fn from(p: PoolingArg) -> Self {
        match p {
            PoolingArg::Flatten => Pooling::Flatten,
            PoolingArg::Cls => Pooling::Cls,
            PoolingArg::Mean => Pooling::Mean,
        }
    }
}

/// `--estimator`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum EstimatorArg {
    /// Two nearest neighbours.
    Twonn,
    /// Levina–Bickel maximum likelihood with k neighbours.
    Mle,
}

impl From<EstimatorArg> for Estimator {
    fn from(e: EstimatorArg) -> Self {
        match e {
            EstimatorArg::Twonn => Estimator::Twonn,
            EstimatorArg::Mle => Estimator::Mle,
        }
    }
}

/// `--variant`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum VariantArg {
    /// Fit the smallest 90% of μ.
    Facco,
    /// All μ but the last two, averaged over a 20-level block analysis.
    Paper,
}

impl From<VariantArg> for Variant {
    fn from(v: VariantArg) -> Self {
        match v {
            VariantArg::Facco => Variant::Facco,
            VariantArg::Paper => Variant::Paper,
        }
    }
}

impl From<ExternalDataArg> for ExternalData {
    fn from(e: ExternalDataArg) -> Self {
        match e {
            ExternalDataArg::Auto => ExternalData::Auto,
            ExternalDataArg::Always => ExternalData::Always,
            ExternalDataArg::Never => ExternalData::Never,
        }
    }
}

fn parse_fraction(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("'{s}' is not a number"))?;
    if v > 0.0 && v <= 1.0 {
        Ok(v)
    } else {
        Err(format!("{v} is not in (0, 1]"))
    }
}

/// A per-tower kept fraction: no tower goes below the floor every
/// allocation keeps.
fn parse_tower_fraction(s: &str) -> Result<f64, String> {
    let v = parse_fraction(s)?;
    let floor = crate::decide::budget::MIN_TOWER_KEEP;
    if v >= floor {
        Ok(v)
    } else {
        Err(format!(
            "{v} is below {floor}, the least of its block parameters a tower keeps"
        ))
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
