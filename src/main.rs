//! The command line: parses arguments and hands over to the library.

use std::process::ExitCode;

use clap::Parser;
use nen_relay::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async move {
        match cli.command.unwrap_or(Command::Serve) {
            Command::Serve => nen_relay::cli::serve().await,
            Command::Migrate => nen_relay::cli::migrate().await,
            Command::Sign(args) => nen_relay::cli::sign(args),
            Command::Healthcheck(args) => nen_relay::cli::healthcheck(args).await,
            Command::CheckConfig => nen_relay::cli::check_config(),
        }
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // One line: the reason, with its causes joined.
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
