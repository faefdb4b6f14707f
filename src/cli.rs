//! Command-line definitions, and the subcommands that are not the server itself.

pub mod forward;
pub mod server;
pub mod wait;

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use secrecy::ExposeSecret;

use crate::app::Application;
use crate::config::Settings;

#[derive(Debug, Parser)]
#[command(
    name = "nen-relay",
    version,
    about = "Verified, deduplicated, durable receiver for Nen workflow callbacks",
    long_about = "Verified, deduplicated, durable receiver for Nen workflow callbacks, with a run \
                  query API and a safe way to start runs.\n\nConfiguration comes from config/*.toml \
                  and the environment (see README.md). Without a subcommand, `serve` runs."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server (migrations are applied at start unless store.migrate_on_start = false).
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Print the X-Hmac-Signature value for a body (stdin or FILE).
    Sign(SignArgs),
    /// Exit 0 when the local server answers GET /healthz (for container health checks).
    Healthcheck(HealthcheckArgs),
    /// Read the settings as `serve` would, without starting anything; exit non-zero naming the
    /// first problem, or a NEN_* variable that sets nothing (most likely misspelt).
    CheckConfig,
    /// Wait until a run is terminal and print it. Exit 0: success; 1: failed or any other
    /// terminal status; 2: --timeout passed first; 3: no answer (bad token, bad request).
    Wait(wait::WaitArgs),
    /// Forwarding, asked of a running server (NEN_RELAY_URL, NEN_RELAY_TOKEN): each target's
    /// queue, its failed messages, sending them again, replaying a window. Exit 0: done; 1: the
    /// server refused (unknown target, bad time or token; the message says which); 2: a bad
    /// command line; 3: no answer (not reachable, or a 5xx), worth retrying.
    #[command(subcommand_required = true)]
    Forward(forward::ForwardArgs),
}

#[derive(Debug, Args)]
pub struct SignArgs {
    /// The webhook secret. Defaults to the first of NEN_WEBHOOK_SECRETS.
    #[arg(long)]
    pub secret: Option<String>,
    /// File whose exact bytes are signed; stdin when absent.
    pub file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct HealthcheckArgs {
    /// URL to probe. Defaults to /healthz on the port of NEN_RELAY_BIND.
    #[arg(long)]
    pub url: Option<String>,
    /// Seconds to wait for an answer.
    #[arg(long, default_value_t = 3)]
    pub timeout: u64,
}

/// `nen-relay serve`: load settings, open the store, serve until SIGTERM or Ctrl-C.
pub async fn serve() -> anyhow::Result<()> {
    let settings = Settings::load()?;
    crate::telemetry::init_tracing(settings.log_format);
    for (name, value) in &settings.generated {
        // Local only (production refuses to start without them): show the made-up value once
        // on the terminal, not through the log pipeline, so it can be used with curl.
        eprintln!(
            "{name} is not set; for this run it is: {}",
            value.expose_secret()
        );
    }
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        environment = settings.environment.as_str(),
        "starting nen-relay"
    );
    for name in crate::config::unrecognised_variables() {
        tracing::warn!(variable = %name, "this variable sets nothing; is it misspelt?");
    }
    let application = Application::build(settings).await?;
    application.run_until_stopped(shutdown_signal()).await
}

/// `nen-relay check-config`: the settings `serve` would run with are valid, and every `NEN_*`
/// variable in the environment is one that nen-relay reads. Prints a summary without secrets.
pub fn check_config() -> anyhow::Result<()> {
    let settings = Settings::load()?;
    let unrecognised = crate::config::unrecognised_variables();
    anyhow::ensure!(
        unrecognised.is_empty(),
        "{} set nothing (misspelt?); see config/default.toml for every setting",
        unrecognised.join(", ")
    );
    // Validated by `load`: the URL names one of the two backends.
    let store = match crate::store::Backend::from_url(settings.database_url.expose_secret()) {
        Ok(crate::store::Backend::Postgres) => "PostgreSQL",
        Ok(crate::store::Backend::Sqlite) => "SQLite",
        Err(_) => "unknown",
    };
    println!(
        "configuration is valid: NEN_RELAY_ENV={}, listening on {}, store {store}",
        settings.environment.as_str(),
        settings.bind
    );
    Ok(())
}

/// `nen-relay migrate`.
pub async fn migrate() -> anyhow::Result<()> {
    let settings = Settings::load()?;
    crate::telemetry::init_tracing(settings.log_format);
    crate::store::connect(&settings.database_url, &settings.store_options(), true)
        .await
        .context("migration failed")?;
    tracing::info!("migrations applied");
    Ok(())
}

/// `nen-relay sign`: prints `sha256=<hex>` for the exact bytes of FILE or stdin.
pub fn sign(args: SignArgs) -> anyhow::Result<()> {
    let secret = match args.secret {
        Some(secret) => secret,
        None => {
            let settings = Settings::load()?;
            if settings
                .generated
                .iter()
                .any(|(name, _)| *name == "NEN_WEBHOOK_SECRETS")
            {
                anyhow::bail!("give --secret, or set NEN_WEBHOOK_SECRETS");
            }
            settings.webhook_secrets[0].expose_secret().to_owned()
        }
    };
    let mut body = Vec::new();
    match args.file {
        Some(path) => {
            body =
                std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?
        }
        None => {
            std::io::stdin()
                .read_to_end(&mut body)
                .context("cannot read stdin")?;
        }
    }
    println!(
        "{}",
        crate::callbacks::signature::sign(secret.as_bytes(), &body)
    );
    Ok(())
}

/// `nen-relay healthcheck`: a tiny HTTP probe, so the container image needs no curl.
pub async fn healthcheck(args: HealthcheckArgs) -> anyhow::Result<()> {
    let url = match args.url {
        Some(url) => url,
        None => {
            let address = crate::config::bind_address()?;
            let host = if address.ip().is_unspecified() {
                "127.0.0.1".to_owned()
            } else if address.is_ipv6() {
                format!("[{}]", address.ip())
            } else {
                address.ip().to_string()
            };
            format!("http://{host}:{}/healthz", address.port())
        }
    };
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(args.timeout))
        .build()?;
    let response = client
        .get(&url)
        .send()
        .await
        .with_context(|| format!("no answer from {url}"))?;
    anyhow::ensure!(
        response.status().is_success(),
        "{url} answered {}",
        response.status()
    );
    Ok(())
}

/// Completes on Ctrl-C or SIGTERM (what container runtimes send).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutdown signal received");
}
