use std::process::ExitCode;

use clap::Parser;
use tributary::{
    cli::Cli,
    config::{ConfigErrors, EX_CONFIG},
    daemon::{self, Unavailable},
};

/// sysexits' EX_UNAVAILABLE.
const EX_UNAVAILABLE: u8 = 69;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(daemon::execute(cli.command, &cli.config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            if let Some(problems) = error.downcast_ref::<ConfigErrors>() {
                eprint!("{problems}");
                return ExitCode::from(EX_CONFIG as u8);
            }
            eprintln!("error: {error:#}");
            if error.downcast_ref::<Unavailable>().is_some() {
                return ExitCode::from(EX_UNAVAILABLE);
            }
            ExitCode::FAILURE
        }
    }
}
