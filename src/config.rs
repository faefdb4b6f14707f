//! Settings: one tree, read from layers and then checked.
//!
//! Layers, later ones winning: built-in defaults (`config/default.toml` and
//! `config/<NEN_RELAY_ENV>.toml`, compiled in) < `config/default.toml` <
//! `config/<NEN_RELAY_ENV>.toml` (from `NEN_RELAY_CONFIG_DIR`) < environment variables. The
//! defaults live in those files only; `layers` reads them, `variables` maps the environment.
//!
//! Secrets are `SecretString`s from the moment they are read: their `Debug` is redacted, and
//! code must call `expose_secret()` to use one.

mod forward;
mod layers;
mod legacy_units;
mod retention_period;
mod secret_values;
mod variables;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use url::Url;

use crate::store::StoreOptions;

pub use forward::{ForwardSettings, TargetSettings};

/// Which defaults apply: a developer's machine, or a deployment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Environment {
    #[default]
    Local,
    Production,
}

impl Environment {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_value(std::env::var("NEN_RELAY_ENV").ok().as_deref())
    }

    fn from_value(value: Option<&str>) -> Result<Self, ConfigError> {
        match value {
            None | Some("") | Some("local") => Ok(Environment::Local),
            Some("production") => Ok(Environment::Production),
            Some(other) => Err(ConfigError::Invalid(format!(
                "NEN_RELAY_ENV must be 'local' or 'production', not {other:?}"
            ))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Environment::Local => "local",
            Environment::Production => "production",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Pretty,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Invalid(String),
    #[error("{name} is required when NEN_RELAY_ENV=production (or set {name}_FILE to a file holding it)")]
    MissingSecret { name: &'static str },
    #[error("cannot read {variable}={path}: {source}")]
    SecretFile {
        variable: String,
        path: String,
        source: std::io::Error,
    },
}

/// Every setting. `config/default.toml` says what each one means and holds its default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Which layer of defaults applied (`NEN_RELAY_ENV`); not a key of the files.
    #[serde(skip)]
    pub environment: Environment,
    pub bind: SocketAddr,
    /// A second listener for `/metrics`, `/healthz` and `/readyz` (`NEN_RELAY_OPS_BIND`); when
    /// set, `/metrics` leaves the public listener.
    #[serde(default)]
    pub ops_bind: Option<SocketAddr>,
    /// May carry a password, so it is a secret too.
    #[serde(deserialize_with = "secret_values::one")]
    pub database_url: SecretString,
    #[serde(default, deserialize_with = "secret_values::list")]
    pub webhook_secrets: Vec<SecretString>,
    #[serde(default, deserialize_with = "secret_values::list")]
    pub api_tokens: Vec<SecretString>,
    #[serde(default)]
    pub public_url: Option<Url>,
    pub log_format: LogFormat,
    pub webhook: WebhookSettings,
    pub ingest: IngestSettings,
    pub store: StoreSettings,
    pub http: HttpSettings,
    pub nen: NenSettings,
    pub trigger: TriggerSettings,
    pub query: QuerySettings,
    pub runs: RunsSettings,
    pub retention: RetentionSettings,
    pub forward: ForwardSettings,
    /// Secrets made up for a local start, to be shown once on the terminal.
    #[serde(skip)]
    pub generated: Vec<(&'static str, SecretString)>,
}

/// Callback endpoint limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSettings {
    /// Larger bodies are refused with 413 before they are read.
    pub max_body_bytes: usize,
    /// A body that takes longer than this to arrive is refused with 408.
    #[serde(with = "humantime_serde")]
    pub body_timeout: Duration,
    /// How long a callback may wait for its commit before it is answered 503 (Nen then retries).
    #[serde(with = "humantime_serde")]
    pub ack_timeout: Duration,
    /// Unverified callback bodies held in memory at once, across all requests; past it, 503.
    pub max_inflight_body_bytes: usize,
}

/// Group commit tuning.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestSettings {
    /// Writer tasks, each committing one batch at a time.
    pub writers: usize,
    /// Most deliveries in one transaction.
    pub max_batch: usize,
    /// Deliveries that may wait for a writer; beyond it callbacks get 503 at once.
    pub queue_capacity: usize,
}

/// The database pool, and migrations at start.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSettings {
    pub max_connections: u32,
    /// How long a request may wait for a pooled connection before the store counts as unavailable.
    #[serde(with = "humantime_serde")]
    pub acquire_timeout: Duration,
    /// Server-side cap on one statement (PostgreSQL) or on waiting for the write lock (SQLite).
    #[serde(with = "humantime_serde")]
    pub statement_timeout: Duration,
    pub migrate_on_start: bool,
    /// How long migrations wait for a lock (their own connection, no statement timeout).
    #[serde(with = "humantime_serde")]
    pub migrate_lock_timeout: Duration,
}

impl StoreSettings {
    /// What the store needs to open its pool.
    pub fn options(&self) -> StoreOptions {
        StoreOptions {
            max_connections: self.max_connections,
            acquire_timeout: self.acquire_timeout,
            statement_timeout: self.statement_timeout,
            migrate_lock_timeout: self.migrate_lock_timeout,
            forward_targets: Vec::new(),
        }
    }
}

/// Outbound calls to Nen.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NenSettings {
    #[serde(default, deserialize_with = "secret_values::optional")]
    pub api_key: Option<SecretString>,
    pub base_url: Url,
    #[serde(default, deserialize_with = "secret_values::optional")]
    pub signing_key: Option<SecretString>,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

/// Server-side HTTP limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    /// A client that has not sent its request headers by then is disconnected.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A keep-alive connection with no request in progress for this long is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Connections open at once; past it, new ones are refused at once.
    pub max_connections: usize,
    /// After SIGTERM, how long `/readyz` answers 503 while serving goes on, so that load
    /// balancers stop sending before the listener closes.
    #[serde(with = "humantime_serde")]
    pub shutdown_delay: Duration,
    /// How long a shutdown waits for in-flight requests.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Requests handled at once; beyond it the service answers 503 instead of queueing.
    pub max_in_flight: usize,
}

/// The trigger endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TriggerSettings {
    /// `workflow_params` are personal data: stored only when this is on.
    pub store_workflow_params: bool,
    #[serde(with = "humantime_serde")]
    pub idempotency_ttl: Duration,
    /// The key of the idempotency fingerprint HMAC (`NEN_RELAY_TRIGGER__FINGERPRINT_KEY`).
    /// Unset: derived from `NEN_API_KEY` (see `runs::idempotency::FingerprintKey`).
    #[serde(default, deserialize_with = "secret_values::optional")]
    pub fingerprint_key: Option<SecretString>,
}

/// The read API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuerySettings {
    /// Requests holding `?wait=` at once; past it, 503.
    pub max_waiters: usize,
    /// How long a waiting request goes without a wake before it reads its run again anyway:
    /// the safety net for a wake that was lost. Each waiter adds up to as much again.
    #[serde(with = "humantime_serde")]
    pub wait_recheck: Duration,
}

/// What the service says about runs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunsSettings {
    /// A run that is not terminal and has not changed for longer than this is stuck.
    #[serde(with = "humantime_serde")]
    pub stuck_after: Duration,
}

/// How long stored data is kept; `None` (written `off`) keeps it forever.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionSettings {
    /// Raw payloads of events of runs terminal for longer than this are removed.
    #[serde(deserialize_with = "retention_period::deserialize")]
    pub payloads: Option<Duration>,
    /// Runs terminal for longer than this are deleted with their events.
    #[serde(deserialize_with = "retention_period::deserialize")]
    pub runs: Option<Duration>,
    /// Rejected payloads older than this are deleted.
    #[serde(deserialize_with = "retention_period::deserialize")]
    pub rejected: Option<Duration>,
    /// How often a sweep runs.
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
}

impl Settings {
    /// What the store needs to open its pool, and the names of the forwarding targets, whose
    /// messages it writes with every change of a run.
    pub fn store_options(&self) -> StoreOptions {
        StoreOptions {
            forward_targets: self
                .forward
                .targets
                .iter()
                .map(|t| t.name.clone())
                .collect(),
            ..self.store.options()
        }
    }

    /// Reads the settings from `config/` (or `NEN_RELAY_CONFIG_DIR`) and the process environment.
    pub fn load() -> Result<Self, ConfigError> {
        let environment = Environment::from_env()?;
        let variables: BTreeMap<String, String> = std::env::vars().collect();
        Self::from_sources(environment, &config_dir(), &variables)
    }

    /// Reads the settings from a config folder and a given set of variables (tests use this).
    pub fn from_sources(
        environment: Environment,
        config_dir: &Path,
        variables: &BTreeMap<String, String>,
    ) -> Result<Self, ConfigError> {
        let mut settings: Settings = layers::figment(environment, config_dir, variables)?
            // Variables are text; numbers and flags are read out of them here.
            .extract_lossy()
            .map_err(layers::describe)?;
        settings.environment = environment;
        settings.validate()
    }

    /// Checks what types cannot say, and makes up the local secrets that were not given.
    fn validate(mut self) -> Result<Self, ConfigError> {
        let production = self.environment == Environment::Production;

        crate::store::Backend::from_url(self.database_url.expose_secret()).map_err(|_| {
            ConfigError::Invalid(
                "DATABASE_URL must start with postgres://, postgresql:// or sqlite://".into(),
            )
        })?;
        if let Some(url) = &self.public_url {
            require_http("NEN_RELAY_PUBLIC_URL", url)?;
        }
        require_http("NEN_API_BASE_URL", &self.nen.base_url)?;

        if self.webhook.max_body_bytes == 0 {
            return Err(ConfigError::Invalid(
                "webhook.max_body_bytes must be positive".into(),
            ));
        }
        if self.webhook.max_inflight_body_bytes < self.webhook.max_body_bytes {
            return Err(ConfigError::Invalid(format!(
                "webhook.max_inflight_body_bytes ({}) must be at least webhook.max_body_bytes ({}), \
                 or a callback of the largest allowed size could never be read",
                self.webhook.max_inflight_body_bytes, self.webhook.max_body_bytes
            )));
        }
        for (value, name) in [
            (self.http.max_connections, "http.max_connections"),
            (self.query.max_waiters, "query.max_waiters"),
        ] {
            if value == 0 {
                return Err(ConfigError::Invalid(format!("{name} must be positive")));
            }
        }
        if self.query.wait_recheck.is_zero() {
            return Err(ConfigError::Invalid(
                "query.wait_recheck must be positive".into(),
            ));
        }
        if self.retention.sweep_interval.is_zero() {
            return Err(ConfigError::Invalid(
                "retention.sweep_interval must be positive".into(),
            ));
        }
        if let Some(key) = &self.nen.api_key {
            // Sent as the x-api-key header, which cannot carry control characters.
            if key
                .expose_secret()
                .chars()
                .any(|c| c.is_control() && c != '\t')
            {
                return Err(ConfigError::Invalid(
                    "NEN_API_KEY holds a control character (a stray line break?); it is sent as a header"
                        .into(),
                ));
            }
        }
        if let Some(ops) = self.ops_bind {
            // Port 0 asks the system for a free port, a different one for each listener.
            if ops == self.bind && ops.port() != 0 {
                return Err(ConfigError::Invalid(format!(
                    "NEN_RELAY_OPS_BIND ({ops}) must differ from NEN_RELAY_BIND"
                )));
            }
        }
        self.forward.validate(self.environment)?;
        let ingest = &self.ingest;
        if ingest.writers == 0 || ingest.max_batch == 0 || ingest.queue_capacity == 0 {
            return Err(ConfigError::Invalid(
                "ingest.writers, ingest.max_batch and ingest.queue_capacity must be positive"
                    .into(),
            ));
        }
        // Zero has always been read as the smallest useful value here.
        self.store.max_connections = self.store.max_connections.max(1);
        self.http.max_in_flight = self.http.max_in_flight.max(1);
        if self.trigger.idempotency_ttl.is_zero() {
            self.trigger.idempotency_ttl = Duration::from_secs(3600);
        }

        let mut generated = Vec::new();
        for (list, name, dev_prefix) in [
            (
                &mut self.webhook_secrets,
                "NEN_WEBHOOK_SECRETS",
                "whsec-dev",
            ),
            (&mut self.api_tokens, "NEN_RELAY_API_TOKENS", "dev-token"),
        ] {
            if !list.is_empty() {
                continue;
            }
            if production {
                return Err(ConfigError::MissingSecret { name });
            }
            let secret =
                SecretString::from(format!("{dev_prefix}-{}", uuid::Uuid::new_v4().simple()));
            generated.push((name, secret.clone()));
            list.push(secret);
        }
        self.generated = generated;

        if production {
            require_private_transport("NEN_API_BASE_URL", &self.nen.base_url)?;
            for (list, name) in [
                (&self.webhook_secrets, "NEN_WEBHOOK_SECRETS"),
                (&self.api_tokens, "NEN_RELAY_API_TOKENS"),
            ] {
                if list
                    .iter()
                    .any(|secret| secret.expose_secret().len() < MIN_SECRET_BYTES)
                {
                    return Err(too_short(name));
                }
            }
            if self
                .trigger
                .fingerprint_key
                .as_ref()
                .is_some_and(|key| key.expose_secret().len() < MIN_SECRET_BYTES)
            {
                return Err(too_short("NEN_RELAY_TRIGGER__FINGERPRINT_KEY"));
            }
        }
        Ok(self)
    }
}

/// Variables of the process environment named like nen-relay's (`NEN_...`) that set nothing:
/// most likely misspelt. `serve` warns about them; `check-config` refuses them.
pub fn unrecognised_variables() -> Vec<String> {
    let variables: BTreeMap<String, String> = std::env::vars().collect();
    variables::unrecognised(&variables)
}

/// `NEN_RELAY_CONFIG_DIR`, or `config`.
fn config_dir() -> PathBuf {
    std::env::var_os("NEN_RELAY_CONFIG_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("config"))
}

/// The listen address the settings give, read without the rest: the health check needs only
/// it, and must not depend on secrets being readable.
pub fn bind_address() -> Result<SocketAddr, ConfigError> {
    let variables: BTreeMap<String, String> = std::env::vars().collect();
    bind_from_sources(Environment::from_env()?, &config_dir(), &variables)
}

fn bind_from_sources(
    environment: Environment,
    config_dir: &Path,
    variables: &BTreeMap<String, String>,
) -> Result<SocketAddr, ConfigError> {
    let bind_only: BTreeMap<String, String> = variables
        .iter()
        .filter(|(name, _)| *name == "NEN_RELAY_BIND")
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect();
    layers::figment(environment, config_dir, &bind_only)?
        .extract_inner_lossy("bind")
        .map_err(layers::describe)
}

/// The shortest webhook secret, API token or fingerprint key production accepts.
pub const MIN_SECRET_BYTES: usize = 16;

/// Names the variable and the minimum only: never the value, nor which item of a list it was.
fn too_short(name: &str) -> ConfigError {
    ConfigError::Invalid(format!(
        "every value of {name} must be at least {MIN_SECRET_BYTES} bytes when NEN_RELAY_ENV=production"
    ))
}

/// `https://`, or `http://` to this machine only: anything else would carry the API key in
/// clear text across a network.
fn require_private_transport(name: &str, url: &Url) -> Result<(), ConfigError> {
    if url.scheme() == "https" || is_loopback(url) {
        return Ok(());
    }
    Err(ConfigError::Invalid(format!(
        "{name} must be an https:// URL when NEN_RELAY_ENV=production (http:// is allowed only to \
         127.0.0.0/8, ::1 or localhost): it would carry NEN_API_KEY in clear text"
    )))
}

/// Whether a URL's host is this machine: 127.0.0.0/8, ::1 or localhost.
pub(crate) fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(domain)) => domain.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

fn require_http(name: &str, url: &Url) -> Result<(), ConfigError> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(ConfigError::Invalid(format!(
            "{name} must be an http:// or https:// URL"
        )));
    }
    Ok(())
}

/// Whether a secret is among the configured ones, without exposing either.
pub fn secrets_as_strs(secrets: &[SecretString]) -> impl Iterator<Item = &str> {
    secrets.iter().map(|secret| secret.expose_secret())
}

#[cfg(test)]
mod tests;
