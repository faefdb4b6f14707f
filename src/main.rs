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
            Command::Serve => nen_relay::cli::serve().await.map(|()| ExitCode::SUCCESS),
            Command::Migrate => nen_relay::cli::migrate().await.map(|()| ExitCode::SUCCESS),
            Command::Sign(args) => nen_relay::cli::sign(args).map(|()| ExitCode::SUCCESS),
            Command::Healthcheck(args) => nen_relay::cli::healthcheck(args)
                .await
                .map(|()| ExitCode::SUCCESS),
            Command::CheckConfig => nen_relay::cli::check_config().map(|()| ExitCode::SUCCESS),
            // Its exit code says how the run ended, and it reports its own errors.
            Command::Wait(args) => Ok(nen_relay::cli::wait::run(args).await),
            Command::Forward(args) => Ok(nen_relay::cli::forward::run(args).await),
        }
    });
    match outcome {
        Ok(code) => code,
        Err(error) => {
            // One line: the reason, with its causes joined.
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
