//! `onnx_idprune._native`: the library behind the Python package.
//!
//! Every function takes the command line's own arguments (built from
//! keyword arguments by `onnx_idprune/__init__.py`) and goes through the
//! library's `cli::parse`, so a call checks its values and flag
//! combinations exactly as the `onnx-idprune` command does and fails with
//! the same one line and exit code. Failures raise `Failure(message,
//! code)`, which the Python side turns into `onnx_idprune.Error`. The GIL
//! is released while a job runs.

use std::ffi::OsString;
use std::path::PathBuf;

use numpy::{PyReadonlyArray2, PyUntypedArrayMethods};
use onnx_idprune::cli::{self, Failure, Request};
use onnx_idprune::plan::{Plan, PlanError};
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;

create_exception!(
    _native,
    NativeFailure,
    PyException,
    "A call that failed: args are (message, exit code)."
);

fn raise(failure: Failure) -> PyErr {
    NativeFailure::new_err((failure.message, failure.code))
}

fn library_failure(e: impl Into<anyhow::Error>) -> PyErr {
    raise(Failure::of(&e.into()))
}

/// Parses `args` (without the program name) as the command line would.
fn parse(args: Vec<OsString>, plan: Option<Plan>) -> PyResult<Request> {
    let argv = std::iter::once(OsString::from("onnx-idprune")).chain(args);
    cli::parse(argv, plan).map_err(raise)
}

/// Runs the command line with `argv` (program name first) and returns its
/// exit code: the wheel's `onnx-idprune` command.
#[pyfunction]
fn main(py: Python<'_>, argv: Vec<OsString>) -> u8 {
    onnx_idprune::progress::set_enabled(true);
    py.detach(|| cli::main(argv))
}

/// Names the ONNX Runtime library to use when neither `--ort-lib` nor
/// `ORT_DYLIB_PATH` is given (the `onnxruntime` wheel's).
#[pyfunction]
#[pyo3(signature = (path))]
fn set_host_library(path: Option<PathBuf>) {
    onnx_idprune::calib::set_host_library(path);
}

/// The main job (`onnx-idprune IN OUT …`): returns the report as JSON.
/// `plan_json` is a plan given in memory instead of `--plan FILE`;
/// `input_name` how the report names the input, when not by its path.
#[pyfunction]
#[pyo3(signature = (args, plan_json=None, progress=false, input_name=None))]
fn prune(
    py: Python<'_>,
    args: Vec<OsString>,
    plan_json: Option<String>,
    progress: bool,
    input_name: Option<String>,
) -> PyResult<String> {
    let plan = plan_json
        .map(|text| Plan::parse(&text))
        .transpose()
        .map_err(|e| match e {
            PlanError::Syntax { reason, .. } => PlanError::Syntax {
                path: PathBuf::from("(given in memory)"),
                reason,
            },
            other => other,
        })
        .map_err(library_failure)?;
    let Request::Prune(mut job) = parse(args, plan)? else {
        return Err(raise(Failure {
            message: "prune takes the main job's arguments, not a subcommand".into(),
            code: 2,
        }));
    };
    job.input_name = input_name;
    onnx_idprune::progress::set_enabled(progress);
    let outcome = py.detach(|| job.run()).map_err(library_failure)?;
    Ok(outcome.report.to_json())
}

/// `onnx-idprune inspect IN --json`: the towers and blocks as JSON (for a
/// folder, every model file's).
#[pyfunction]
fn inspect(py: Python<'_>, args: Vec<OsString>) -> PyResult<String> {
    let Request::Inspect {
        input,
        json: true,
        files,
    } = parse(args, None)?
    else {
        return Err(raise(Failure {
            message: "inspect takes `inspect IN --json`".into(),
            code: 2,
        }));
    };
    if files.is_some() || input.is_dir() {
        let folder = py
            .detach(|| onnx_idprune::pipeline::inspect_folder(&input, files.as_deref()))
            .map_err(library_failure)?;
        return Ok(cli::output::folder(&folder, true));
    }
    let arch = py
        .detach(|| onnx_idprune::pipeline::inspect(&input))
        .map_err(library_failure)?;
    Ok(cli::output::architecture(&arch, true))
}

/// `onnx-idprune id --data X.npy --json …` on an array in memory: `args`
/// carry the estimator settings (their `--data` path is not read).
#[pyfunction]
fn intrinsic_dimension<'py>(
    py: Python<'py>,
    data: &Bound<'py, PyAny>,
    args: Vec<OsString>,
) -> PyResult<String> {
    let Request::IdOfData { options, .. } = parse(args, None)? else {
        return Err(raise(Failure {
            message: "intrinsic_dimension takes `id --data …` settings".into(),
            code: 2,
        }));
    };
    // The file reader's rule: float32 as is, float64 rounded to float32.
    let matrix: ndarray::Array2<f32> = if let Ok(a) = data.extract::<PyReadonlyArray2<'py, f32>>() {
        a.as_array().as_standard_layout().into_owned()
    } else if let Ok(a) = data.extract::<PyReadonlyArray2<'py, f64>>() {
        a.as_array().mapv(|v| v as f32)
    } else {
        let described = match data.cast::<numpy::PyUntypedArray>() {
            Ok(a) => format!("a {}-D {} array", a.ndim(), a.dtype()),
            Err(_) => format!(
                "a {}",
                data.get_type()
                    .name()
                    .map(|n| n.to_string())
                    .unwrap_or_else(|_| "Python object".into())
            ),
        };
        return Err(raise(Failure {
            message: format!(
                "intrinsic_dimension: expected a 2-D float32 or float64 numpy array (rows = samples), got {described}"
            ),
            code: 1,
        }));
    };
    let estimate = py
        .detach(|| onnx_idprune::id::estimate(matrix.view(), &options))
        .map_err(|e| {
            raise(Failure {
                message: format!("the array: {e}"),
                code: 1,
            })
        })?;
    Ok(serde_json::to_string(&estimate).expect("estimates serialize"))
}

/// The native module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("NativeFailure", m.py().get_type::<NativeFailure>())?;
    m.add_function(wrap_pyfunction!(main, m)?)?;
    m.add_function(wrap_pyfunction!(set_host_library, m)?)?;
    m.add_function(wrap_pyfunction!(prune, m)?)?;
    m.add_function(wrap_pyfunction!(inspect, m)?)?;
    m.add_function(wrap_pyfunction!(intrinsic_dimension, m)?)?;
    Ok(())
}
