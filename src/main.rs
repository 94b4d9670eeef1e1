//! The `onnx-idprune` command line. Parsing, the checks of how flags
//! combine, dispatch and exit codes live in the library's [`cli`] module,
//! which the Python package's `onnx-idprune` command runs too.
//!
//! [`cli`]: onnx_idprune::cli

use std::process::ExitCode;

fn main() -> ExitCode {
    ExitCode::from(onnx_idprune::cli::main(std::env::args_os()))
}
