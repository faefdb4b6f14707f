//! `fake-nen`: runs the stand-in for Nen's API on its own, for demos and manual tests.

mod guard;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use fake_nen::{FakeNen, FakeNenOptions};
use tracing_subscriber::EnvFilter;

/// A stand-in for Nen's API that calls back like Nen does. Never for production: it refuses to
/// run when NEN_RELAY_ENV=production.
#[derive(Debug, Parser)]
#[command(name = "fake-nen", version)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "FAKE_NEN_BIND", default_value = "127.0.0.1:8090")]
    bind: SocketAddr,
    /// The only `x-api-key` accepted. Without it, any non-empty key is accepted.
    #[arg(long, env = "NEN_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Key that signed requests (secure params) must be signed with. Without it, only the
    /// presence of `x-timestamp` and `x-signature` is checked.
    #[arg(long, env = "NEN_SIGNING_KEY", hide_env_values = true)]
    signing_key: Option<String>,
    /// Secret that signs the callbacks (`X-Hmac-Signature`). From NEN_WEBHOOK_SECRETS, the
    /// first of the list is used. Without it, callbacks go out unsigned.
    #[arg(long, env = "NEN_WEBHOOK_SECRETS", hide_env_values = true)]
    webhook_secret: Option<String>,
    /// Wait between the 202 and the `processing` callback.
    #[arg(long, default_value_t = 200)]
    processing_delay_ms: u64,
    /// Wait between `processing` and the final callback.
    #[arg(long, default_value_t = 1000)]
    result_delay_ms: u64,
    /// Share of runs that end `failed` (0.0 to 1.0). A run whose workflow_params hold
    /// `"FAKE_NEN_OUTCOME": "failed"` (or `"success"`) ends that way regardless.
    #[arg(long, default_value_t = 0.0)]
    fail_ratio: f64,
    /// Send every callback twice (delivery is at-least-once).
    #[arg(long)]
    duplicate: bool,
    /// Send the final callback before `processing`.
    #[arg(long)]
    reorder: bool,
    /// Send all callbacks before answering 202 (the trigger/callback race).
    #[arg(long)]
    callback_first: bool,
}

impl Args {
    fn options(&self) -> FakeNenOptions {
        FakeNenOptions {
            api_key: self.api_key.clone().filter(|key| !key.is_empty()),
            signing_key: self.signing_key.clone().filter(|key| !key.is_empty()),
            webhook_secret: self
                .webhook_secret
                .as_deref()
                .and_then(|list| list.split(',').map(str::trim).find(|s| !s.is_empty()))
                .map(str::to_owned),
            processing_delay: Duration::from_millis(self.processing_delay_ms),
            result_delay: Duration::from_millis(self.result_delay_ms),
            fail_ratio: self.fail_ratio.clamp(0.0, 1.0),
            duplicate: self.duplicate,
            reorder: self.reorder,
            callback_first: self.callback_first,
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(reason) = guard::refusal(std::env::var_os("NEN_RELAY_ENV").as_deref()) {
        eprintln!("error: {reason}");
        return ExitCode::FAILURE;
    }
    match serve(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Serves until Ctrl-C.
async fn serve(args: Args) -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .compact()
        .with_env_filter(filter)
        .init();
    let options = args.options();
    if options.webhook_secret.is_none() {
        tracing::warn!("no --webhook-secret (or NEN_WEBHOOK_SECRETS): callbacks go out unsigned");
    }
    let fake = FakeNen::start(args.bind, options).await?;
    tracing::info!(address = %fake.address(), "fake Nen listening: POST {}/runs", fake.url());
    tokio::signal::ctrl_c().await?;
    Ok(())
}
