//! The `onnx-idprune` command line: parses arguments, hands the request to
//! the library, prints the result, or one line on error, and picks the exit
//! code.
//!
//! Exit codes: 0 success, 1 error, 2 usage error (from the parser), 3
//! fidelity gate not met, 128 + N interrupted by signal N.

mod cli;

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

use cli::{Cli, Request, output};

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

/// Exit code for an error: 3 for the fidelity gate, 1 for every other
/// library, input and flag-combination error (parse errors exit 2 from
/// clap before this point).
fn exit_code(e: &anyhow::Error) -> u8 {
    match e.downcast_ref::<onnx_idprune::Error>() {
        Some(onnx_idprune::Error::Fidelity { .. }) => 3,
        _ => 1,
    }
}

/// Dispatches the request to the library and prints what it returns.
fn run(cli: Cli) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match cli::request(cli)? {
        Request::Prune(job) => {
            let outcome = job.run()?;
            eprintln!("onnx-idprune: {}", output::pruned(&job.output, &outcome));
        }
        Request::Inspect { input, json } => {
            let arch = onnx_idprune::pipeline::inspect(&input)?;
            stdout.write_all(output::architecture(&arch, json).as_bytes())?;
        }
        Request::Explain { input } => {
            for line in onnx_idprune::pipeline::explain(&input)? {
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
            let estimate = onnx_idprune::pipeline::id_of_data(&path, &options)?;
            stdout.write_all(output::estimate(&path, &estimate, json).as_bytes())?;
        }
    }
    Ok(())
}
