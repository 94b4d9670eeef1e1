//! ONNX Runtime: finding the library, execution providers, sessions.
//!
//! The library is loaded at run time (`ort`'s `load-dynamic`), so the binary
//! builds and runs without it until a stage needs inference. It is looked for
//! in this order: an explicit path (`--ort-lib`), `ORT_DYLIB_PATH`, the
//! library the host environment names ([`set_host_library`]: the Python
//! package names the `onnxruntime` wheel's), then the project-local copy
//! that `scripts/install-ort.sh` puts in `.ort/lib`.
//!
//! Providers are strict: asking for CUDA or TensorRT on a build of ONNX
//! Runtime without them is an error unless fallback to CPU was allowed, and
//! the provider that actually runs is reported.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::ep::{self, ExecutionProvider};
use ort::session::builder::GraphOptimizationLevel;
use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, Tensor, TensorElementType, ValueType};

use super::data::{Array, Inputs};

/// File name of the shared library on this platform.
pub const LIBRARY_NAME: &str = "libonnxruntime.so";

/// An execution provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// The default CPU provider.
    Cpu,
    /// NVIDIA CUDA.
    Cuda,
    /// NVIDIA TensorRT.
    Tensorrt,
}

impl std::fmt::Display for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Provider::Cpu => "cpu",
            Provider::Cuda => "cuda",
            Provider::Tensorrt => "tensorrt",
        })
    }
}

impl std::str::FromStr for Provider {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(Provider::Cpu),
            "cuda" => Ok(Provider::Cuda),
            "tensorrt" => Ok(Provider::Tensorrt),
            other => Err(format!(
                "unknown execution provider '{other}' (expected cpu, cuda or tensorrt)"
            )),
        }
    }
}

/// How to create sessions.
#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    /// The ONNX Runtime library, when given explicitly.
    pub library: Option<PathBuf>,
    /// The requested provider.
    pub provider: Provider,
    /// Fall back to CPU when the provider cannot be registered.
    pub allow_fallback: bool,
    /// Intra-op threads (0: ONNX Runtime's default).
    pub threads: usize,
    /// Run ONNX Runtime's graph optimizations. Off for calibration, where
    /// fusion would remove the tensors being tapped.
    pub optimize: bool,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        Self {
            library: None,
            provider: Provider::Cpu,
            allow_fallback: false,
            threads: 0,
            optimize: true,
        }
    }
}

/// Problems loading ONNX Runtime or running a model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    /// No library was found.
    #[error(
        "ONNX Runtime library not found (looked at: {}); {hint}",
        tried.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    NotFound {
        /// Places looked at.
        tried: Vec<PathBuf>,
        /// What to do about it.
        hint: &'static str,
    },
    /// The library exists but cannot be used.
    #[error("cannot load ONNX Runtime from {}: {reason}", path.display())]
    Load {
        /// The library.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The requested provider is not available.
    #[error(
        "execution provider '{provider}' is not available in the loaded ONNX Runtime ({reason}); use an ONNX Runtime build with {provider} support or pass --allow-fallback to run on CPU"
    )]
    ProviderUnavailable {
        /// The provider.
        provider: Provider,
        /// What ONNX Runtime said.
        reason: String,
    },
    /// Creating or running a session failed.
    #[error("ONNX Runtime: {0}")]
    Session(String),
    /// The model asks for something calibration does not do.
    #[error("{0}")]
    Unsupported(String),
}

/// The host environment's library, once a host has spoken
/// ([`set_host_library`]); `None` inside: the host has none to offer.
static HOST_LIBRARY: std::sync::RwLock<Option<Option<PathBuf>>> = std::sync::RwLock::new(None);

/// Names the ONNX Runtime library the host environment provides (the
/// Python package passes the `onnxruntime` wheel's, or `None` when that
/// wheel is missing). It is looked at after `--ort-lib` and
/// `ORT_DYLIB_PATH`; and once a host has spoken, the project-local copy
/// of the source tree this was built in is not looked at: a wheel must not
/// pick up the build machine's files.
pub fn set_host_library(path: Option<PathBuf>) {
    *HOST_LIBRARY.write().unwrap_or_else(|e| e.into_inner()) = Some(path);
}

/// The first library loaded successfully, and its environment (a failed
/// load is not kept: the next call may name a working library).
static LOADED: OnceLock<(PathBuf, ort::environment::Environment)> = OnceLock::new();
/// One load attempt at a time.
static LOADING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The library path to use: explicit, then `ORT_DYLIB_PATH`, then the
/// host environment's, or else the project-local install.
pub fn locate_library(explicit: Option<&Path>) -> Result<PathBuf, RuntimeError> {
    let mut tried = Vec::new();
    let mut candidates: Vec<PathBuf> = Vec::new();
    let host = HOST_LIBRARY
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    if let Some(path) = explicit {
        candidates.push(path.to_path_buf());
    } else {
        if let Some(env) = std::env::var_os("ORT_DYLIB_PATH").filter(|v| !v.is_empty()) {
            candidates.push(PathBuf::from(env));
        }
        match &host {
            Some(offered) => candidates.extend(offered.iter().cloned()),
            None => candidates.extend(project_local_candidates()),
        }
    }
    for candidate in candidates {
        if candidate.is_file() {
            return Ok(candidate);
        }
        tried.push(candidate);
    }
    Err(RuntimeError::NotFound {
        tried,
        hint: if host.is_some() {
            "install the onnxruntime wheel (pip install onnxruntime), pass ort_lib=PATH (--ort-lib), or set ORT_DYLIB_PATH"
        } else {
            "install it with `scripts/install-ort.sh`, or pass --ort-lib PATH or set ORT_DYLIB_PATH"
        },
    })
}

/// `.ort/lib/libonnxruntime.so` next to the project: found from the
/// executable (`target/<profile>/onnx-idprune`) and from the source tree the
/// binary was built from.
fn project_local_candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        for root in exe.ancestors().skip(1).take(4) {
            out.push(root.join(".ort/lib").join(LIBRARY_NAME));
        }
    }
    out.push(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(".ort/lib")
            .join(LIBRARY_NAME),
    );
    out.dedup();
    out
}

/// Loads the library once per process and returns its path and the
/// environment. ONNX Runtime cannot be swapped within a process: once one
/// library is loaded, asking for another is an error (the same file under
/// another name is fine). A failed load is not remembered.
pub fn load_library(
    explicit: Option<&Path>,
) -> Result<(PathBuf, &'static ort::environment::Environment), RuntimeError> {
    let path = locate_library(explicit)?;
    let _one_at_a_time = LOADING.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((first, environment)) = LOADED.get() {
        let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => a == b,
        };
        if !same(first, &path) {
            return Err(RuntimeError::Load {
                path,
                reason: format!(
                    "ONNX Runtime is already loaded from {} in this process, and a process cannot switch to another",
                    first.display()
                ),
            });
        }
        return Ok((first.clone(), environment));
    }
    let environment = (|| {
        let builder = ort::init_from(&path).map_err(|e| e.to_string())?;
        let environment = builder
            .with_name("onnx-idprune")
            .build()
            .map_err(|e| e.to_string())?;
        // ONNX Runtime logs errors to stderr itself, in colour, before
        // returning them; the error comes back to us and is reported in
        // its one line. `ORT_LOG=warning` (or info, verbose) brings its log
        // back for debugging.
        if std::env::var_os("ORT_LOG").is_none() {
            environment.set_log_level(ort::logging::LogLevel::Fatal);
        }
        Ok::<_, String>(environment)
    })()
    .map_err(|reason| RuntimeError::Load {
        path: path.clone(),
        reason,
    })?;
    let (first, environment) = LOADED.get_or_init(|| (path, environment));
    Ok((first.clone(), environment))
}

/// A session with the provider that actually runs it.
pub struct Runtime {
    session: Session,
    /// The provider in use.
    pub provider: Provider,
    /// The library in use.
    pub library: PathBuf,
    /// Why the requested provider was replaced by CPU, when it was.
    pub fallback: Option<String>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("provider", &self.provider)
            .field("library", &self.library)
            .finish()
    }
}

enum ModelSource<'a> {
    Bytes(&'a [u8]),
    File(&'a Path),
}

fn session_err(e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Session(e.to_string())
}

impl Runtime {
    /// Creates a session for an encoded model.
    pub fn from_bytes(model: &[u8], options: &RuntimeOptions) -> Result<Self, RuntimeError> {
        Self::create(ModelSource::Bytes(model), options)
    }

    /// Creates a session for a model file; ONNX Runtime reads it (and its
    /// external data) itself.
    pub fn from_file(model: &Path, options: &RuntimeOptions) -> Result<Self, RuntimeError> {
        Self::create(ModelSource::File(model), options)
    }

    fn create(model: ModelSource<'_>, options: &RuntimeOptions) -> Result<Self, RuntimeError> {
        let (library, environment) = load_library(options.library.as_deref())?;
        let mut builder = Session::builder(environment).map_err(session_err)?;
        let level = if options.optimize {
            GraphOptimizationLevel::All
        } else {
            GraphOptimizationLevel::Disable
        };
        builder = builder
            .with_optimization_level(level)
            .map_err(session_err)?;
        if options.threads > 0 {
            builder = builder
                .with_intra_threads(options.threads)
                .map_err(session_err)?;
        }
        let mut provider = Provider::Cpu;
        let mut fallback = None;
        let registered = match options.provider {
            Provider::Cpu => Ok(()),
            Provider::Cuda => ep::CUDA::default().register(&mut builder),
            Provider::Tensorrt => ep::TensorRT::default().register(&mut builder),
        };
        match registered {
            Ok(()) => provider = options.provider,
            Err(e) if options.allow_fallback => {
                fallback = Some(format!(
                    "{} unavailable ({e}); running on CPU",
                    options.provider
                ));
            }
            Err(e) => {
                return Err(RuntimeError::ProviderUnavailable {
                    provider: options.provider,
                    reason: e.to_string(),
                });
            }
        }
        let session = match model {
            ModelSource::Bytes(bytes) => builder.commit_from_memory(bytes),
            ModelSource::File(path) => builder.commit_from_file(path),
        }
        .map_err(session_err)?;
        Ok(Self {
            session,
            provider,
            library,
            fallback,
        })
    }

    /// Names of the model's inputs, in order.
    pub fn input_names(&self) -> Vec<String> {
        self.session
            .inputs()
            .iter()
            .map(|i| i.name().to_string())
            .collect()
    }

    /// The model's inputs with their declared dims (-1 where dynamic), in
    /// order.
    pub fn input_dims(&self) -> Vec<(String, Vec<i64>)> {
        self.session
            .inputs()
            .iter()
            .map(|i| {
                let dims = match i.dtype() {
                    ValueType::Tensor { shape, .. } => shape.iter().copied().collect(),
                    _ => Vec::new(),
                };
                (i.name().to_string(), dims)
            })
            .collect()
    }

    /// Names of the model's outputs, in order.
    pub fn output_names(&self) -> Vec<String> {
        self.session
            .outputs()
            .iter()
            .map(|o| o.name().to_string())
            .collect()
    }

    /// Runs the model on named inputs and returns every output, in output
    /// order, converted to owned arrays.
    ///
    /// Inputs are those of the model they were read for: a pruned decoder
    /// takes fewer and narrower cache inputs than the original, so inputs
    /// the model does not take are left out, and an empty (zero-length)
    /// past is given the model's declared head count.
    pub fn run(&mut self, inputs: &Inputs) -> Result<Vec<(String, Array)>, RuntimeError> {
        let declared = self.input_dims();
        let mut values: Vec<(Cow<'_, str>, SessionInputValue<'_>)> =
            Vec::with_capacity(inputs.len());
        for (name, array) in inputs {
            let Some((_, dims)) = declared.iter().find(|(n, _)| n == name) else {
                continue;
            };
            let resized;
            let array = match array {
                Array::F32(a) if a.is_empty() && a.ndim() == dims.len() => {
                    let shape: Vec<usize> = a
                        .shape()
                        .iter()
                        .zip(dims)
                        .map(|(&got, &want)| usize::try_from(want).unwrap_or(got))
                        .collect();
                    resized = Array::F32(ndarray::ArrayD::zeros(ndarray::IxDyn(&shape)));
                    if shape.iter().product::<usize>() == 0 {
                        &resized
                    } else {
                        array
                    }
                }
                _ => array,
            };
            let value: DynValue = match array {
                Array::F32(a) => Tensor::from_array(a.clone())
                    .map_err(session_err)?
                    .into_dyn(),
                Array::I64(a) => Tensor::from_array(a.clone())
                    .map_err(session_err)?
                    .into_dyn(),
                Array::I32(a) => Tensor::from_array(a.clone())
                    .map_err(session_err)?
                    .into_dyn(),
                Array::Bool(a) => Tensor::from_array(a.clone())
                    .map_err(session_err)?
                    .into_dyn(),
            };
            values.push((Cow::Owned(name.clone()), value.into()));
        }
        let outputs = self.session.run(values).map_err(session_err)?;
        let mut result = Vec::with_capacity(outputs.len());
        for (name, value) in outputs.iter() {
            result.push((name.to_string(), to_array(name, &value)?));
        }
        Ok(result)
    }
}

fn to_array(name: &str, value: &ort::value::DynValueRef<'_>) -> Result<Array, RuntimeError> {
    let ty = match value.dtype() {
        ValueType::Tensor { ty, .. } => *ty,
        other => {
            return Err(RuntimeError::Session(format!(
                "output '{name}' is not a tensor ({other:?})"
            )));
        }
    };
    Ok(match ty {
        TensorElementType::Float32 => Array::F32(
            value
                .try_extract_array::<f32>()
                .map_err(session_err)?
                .to_owned(),
        ),
        TensorElementType::Int64 => Array::I64(
            value
                .try_extract_array::<i64>()
                .map_err(session_err)?
                .to_owned(),
        ),
        TensorElementType::Int32 => Array::I32(
            value
                .try_extract_array::<i32>()
                .map_err(session_err)?
                .to_owned(),
        ),
        TensorElementType::Bool => Array::Bool(
            value
                .try_extract_array::<bool>()
                .map_err(session_err)?
                .to_owned(),
        ),
        other => {
            return Err(RuntimeError::Session(format!(
                "output '{name}' has element type {other:?}, not supported yet"
            )));
        }
    })
}
