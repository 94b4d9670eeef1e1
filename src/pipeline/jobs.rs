//! The other subcommands as library calls: `inspect`, `id` (a model's ID
//! profile, or the ID of a data matrix) and `calib` (the model inputs that
//! images and captions make, as an npz).

use std::path::{Path, PathBuf};

use super::prune::runtime_files;
use super::{Samples, open};
use crate::arch::Architecture;
use crate::calib::{CalibSource, DataError, RuntimeOptions, npz};
use crate::error::Error;
use crate::id::{self, IdEstimate, IdOptions};
use crate::measure::{self, MeasureOptions, Profile};
use crate::onnx::{self, FileGuard, SaveError};
use crate::report;

/// The towers and blocks of the model at `path`.
pub fn inspect(path: &Path) -> Result<Architecture, Error> {
    open(path)?.discover()
}

/// One model file of a folder, as `inspect DIR` shows it.
#[derive(Debug, Clone)]
pub struct FolderFile {
    /// Relative to the folder.
    pub path: PathBuf,
    /// What it is.
    pub role: crate::folder::Role,
    /// Its towers and blocks, discovered in the file alone (a merged
    /// decoder's in its with-past branch); none for token embeddings.
    pub architecture: Option<Architecture>,
}

/// The model files of a folder: the ones pruned together (in the order
/// they are joined) and the ones that would be copied unchanged.
#[derive(Debug, Clone)]
pub struct FolderInspection {
    /// The files pruned together.
    pub files: Vec<FolderFile>,
    /// Model files copied unchanged, and why.
    pub unpruned: Vec<crate::folder::Unpruned>,
}

/// Every pruned file's towers in the folder `root` (the files found, or
/// `files`), after checking that they fit together.
pub fn inspect_folder(root: &Path, files: Option<&[PathBuf]>) -> Result<FolderInspection, Error> {
    let layout = crate::folder::scan(root, files)?;
    let (joined_model, joined) = crate::folder::join(root, &layout.parts)?;
    super::check_wire_widths(root, &joined_model, &joined)?;
    drop(joined_model);
    let files = layout
        .parts
        .iter()
        .map(|part| {
            let path = root.join(&part.path);
            let proto = part.file.proto.clone();
            let model = if crate::merged::is_merged(&proto) {
                crate::merged::split(proto)
                    .map_err(|error| Error::Merged {
                        path: path.clone(),
                        error,
                    })?
                    .0
            } else {
                crate::ir::Model::from_proto(proto).map_err(|error| Error::Graph {
                    path: path.clone(),
                    error,
                })?
            };
            let architecture = if part.role == crate::folder::Role::Embeddings {
                None
            } else {
                Some(
                    crate::arch::discover(&model.graph)
                        .map_err(|error| Error::Discover { path, error })?,
                )
            };
            Ok(FolderFile {
                path: part.path.clone(),
                role: part.role,
                architecture,
            })
        })
        .collect::<Result<_, Error>>()?;
    Ok(FolderInspection {
        files,
        unpruned: layout.unpruned,
    })
}

/// For every attention anchor and MLP candidate of the model at `path`:
/// what matched, or where the pattern stopped; then discovery's verdict.
pub fn explain(path: &Path) -> Result<Vec<String>, Error> {
    Ok(crate::arch::explain(&open(path)?.model.graph))
}

/// The intrinsic dimension of the matrix in the `.npy` file at `path`
/// (rows = samples).
pub fn id_of_data(path: &Path, options: &IdOptions) -> Result<IdEstimate, Error> {
    let data = npz::read_matrix(path)?;
    id::estimate(data.view(), options).map_err(|error| Error::Estimate {
        path: path.to_path_buf(),
        error,
    })
}

/// The ID profile of a model's blocks on calibration data (`id IN`).
#[derive(Debug, Clone)]
pub struct ProfileJob {
    /// The model.
    pub input: PathBuf,
    /// Calibration samples (the first `measure.samples` are used).
    pub calib: CalibSource,
    /// Measurement settings.
    pub measure: MeasureOptions,
    /// ONNX Runtime settings.
    pub runtime: RuntimeOptions,
    /// Also write an SVG plot of ID per block here.
    pub svg: Option<PathBuf>,
}

impl ProfileJob {
    /// Measures the profile (and writes the plot). Before any work, no
    /// output may replace an input.
    pub fn run(&self) -> Result<Profile, Error> {
        let source = open(&self.input)?;
        if let Some(svg) = &self.svg {
            let mut files = FileGuard::new();
            files
                .inputs(source.protected_files())
                .inputs(self.calib.files())
                .inputs(runtime_files(&self.runtime))
                .output(svg, "the --svg file");
            files.check()?;
        }
        let arch = source.discover()?;
        let samples = self.measure.samples;
        let Samples {
            inputs,
            total: available,
            mask,
        } = Samples::load(&source, &self.calib, samples)?;
        if available < samples {
            return Err(Error::Data(DataError::Mismatch {
                path: self.calib.label(),
                reason: format!("it has {available} samples, {samples} were asked for (--samples)"),
            }));
        }
        let profile = measure::profile::profile(
            &source.model,
            &arch,
            &inputs,
            mask.as_deref(),
            &self.measure,
            &self.runtime,
        )
        .map_err(Error::measuring(&self.input))?;
        if let Some(svg) = &self.svg {
            onnx::write_atomic(svg, report::profile_svg(&profile).as_bytes())?;
        }
        Ok(profile)
    }
}

/// The model inputs that images and captions make, written as an npz
/// (`calib IN -o OUT.npz`).
#[derive(Debug, Clone)]
pub struct CalibJob {
    /// The model the inputs are for.
    pub input: PathBuf,
    /// The images and captions.
    pub source: CalibSource,
    /// Samples to take (evenly spaced when there are more).
    pub samples: usize,
    /// The npz to write.
    pub output: PathBuf,
}

/// What a [`CalibJob`] wrote.
#[derive(Debug, Clone)]
pub struct CalibSummary {
    /// Samples written.
    pub samples: usize,
    /// Each array's name and shape, in input order.
    pub arrays: Vec<(String, Vec<usize>)>,
}

impl CalibJob {
    /// Makes and writes the inputs. Before any work, no output may replace
    /// an input.
    pub fn run(&self) -> Result<CalibSummary, Error> {
        let source = open(&self.input)?;
        let mut files = FileGuard::new();
        files
            .inputs(source.protected_files())
            .inputs(self.source.files())
            .output(&self.output, "the -o file");
        files.check()?;
        let (inputs, samples) = self.source.load(&source.model.graph, self.samples)?;
        let bytes = npz::npz_bytes(&inputs).map_err(|e| SaveError::Io {
            path: self.output.clone(),
            error: std::io::Error::other(e),
        })?;
        onnx::write_atomic(&self.output, &bytes)?;
        Ok(CalibSummary {
            samples,
            arrays: inputs
                .iter()
                .map(|(k, v)| (k.clone(), v.shape().to_vec()))
                .collect(),
        })
    }
}
