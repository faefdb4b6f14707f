//! Layered settings: built-in defaults < `config/default.toml` < `config/<NEN_RELAY_ENV>.toml` <
//! environment variables. Every secret may instead come from a file named by `<NAME>_FILE`.
//!
//! Secrets are `SecretString`s from the moment they are read: their `Debug` is redacted, and
//! code must call `expose_secret()` to use one.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Format, Serialized, Toml};
use figment::value::{Dict, Value};
use figment::Figment;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use url::Url;

use crate::store::StoreOptions;

/// Which defaults apply: a developer's machine, or a deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    Local,
    Production,
}

impl Environment {
    pub fn from_env() -> Result<Self, ConfigError> {
        match std::env::var("NEN_RELAY_ENV").as_deref() {
            Err(_) | Ok("") | Ok("local") => Ok(Environment::Local),
            Ok("production") => Ok(Environment::Production),
            Ok(other) => Err(ConfigError::Invalid(format!(
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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

/// The environment variables that SPEC.md names, and the setting each one fills.
const NAMED_VARIABLES: &[(&str, &str)] = &[
    ("NEN_RELAY_BIND", "bind"),
    ("DATABASE_URL", "database_url"),
    ("NEN_WEBHOOK_SECRETS", "webhook_secrets"),
    ("NEN_RELAY_API_TOKENS", "api_tokens"),
    ("NEN_API_KEY", "nen.api_key"),
    ("NEN_API_BASE_URL", "nen.base_url"),
    ("NEN_SIGNING_KEY", "nen.signing_key"),
    ("NEN_RELAY_PUBLIC_URL", "public_url"),
    ("NEN_RELAY_LOG_FORMAT", "log_format"),
];

/// Variables that hold secrets, and so may be given as `<NAME>_FILE` instead.
const SECRET_VARIABLES: &[&str] = &[
    "DATABASE_URL",
    "NEN_WEBHOOK_SECRETS",
    "NEN_RELAY_API_TOKENS",
    "NEN_API_KEY",
    "NEN_SIGNING_KEY",
];

/// Settings as read from files and the environment, before validation.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawSettings {
    bind: Option<String>,
    database_url: Option<String>,
    webhook_secrets: Option<StringList>,
    api_tokens: Option<StringList>,
    public_url: Option<String>,
    log_format: Option<LogFormat>,
    nen: RawNen,
    webhook: WebhookSettings,
    store: RawStore,
    ingest: IngestSettings,
    http: RawHttp,
    trigger: RawTrigger,
}

/// A list given either as a TOML array or as one comma-separated string.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
enum StringList {
    List(Vec<String>),
    Joined(String),
}

impl StringList {
    fn into_secrets(self) -> Vec<SecretString> {
        let items = match self {
            StringList::List(items) => items,
            StringList::Joined(joined) => joined.split(',').map(str::to_owned).collect(),
        };
        items
            .into_iter()
            .map(|item| item.trim().to_owned())
            .filter(|item| !item.is_empty())
            .map(SecretString::from)
            .collect()
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawNen {
    api_key: Option<String>,
    base_url: Option<String>,
    signing_key: Option<String>,
    connect_timeout_ms: Option<u64>,
    timeout_ms: Option<u64>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawStore {
    max_connections: Option<u32>,
    acquire_timeout_ms: Option<u64>,
    statement_timeout_ms: Option<u64>,
    migrate_on_start: Option<bool>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawHttp {
    header_read_timeout_ms: Option<u64>,
    shutdown_timeout_ms: Option<u64>,
    max_in_flight: Option<usize>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawTrigger {
    store_workflow_params: Option<bool>,
    idempotency_ttl_hours: Option<u64>,
}

/// Callback endpoint limits.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookSettings {
    /// Larger bodies are refused with 413 before they are read.
    pub max_body_bytes: usize,
    /// A body that takes longer than this to arrive is refused with 408.
    pub body_timeout_ms: u64,
    /// How long a callback may wait for its commit before it is answered 503 (Nen then retries).
    pub ack_timeout_ms: u64,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        Self {
            max_body_bytes: 1024 * 1024,
            body_timeout_ms: 10_000,
            ack_timeout_ms: 2_000,
        }
    }
}

/// Group commit tuning.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngestSettings {
    /// Writer tasks, each committing one batch at a time.
    pub writers: usize,
    /// Most deliveries in one transaction.
    pub max_batch: usize,
    /// Deliveries that may wait for a writer; beyond it callbacks get 503 at once.
    pub queue_capacity: usize,
}

impl Default for IngestSettings {
    fn default() -> Self {
        // One writer: while its batch is written, the next one gathers, so batches grow with
        // load and each statement and commit is shared by as many callbacks as possible. A
        // second writer takes the few callbacks that arrive meanwhile, halving batches.
        // Measured on 2 cores (docs/performance.md): 1 writer 1.3-1.4x the callbacks/s of 2.
        Self {
            writers: 1,
            max_batch: 256,
            queue_capacity: 4096,
        }
    }
}

/// Outbound calls to Nen.
#[derive(Debug, Clone)]
pub struct NenSettings {
    pub api_key: Option<SecretString>,
    pub base_url: Url,
    pub signing_key: Option<SecretString>,
    pub connect_timeout: Duration,
    pub timeout: Duration,
}

/// Server-side HTTP limits.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// A client that has not sent its request headers by then is disconnected.
    pub header_read_timeout: Duration,
    /// How long a shutdown waits for in-flight requests.
    pub shutdown_timeout: Duration,
    /// Requests handled at once; beyond it the service answers 503 instead of queueing.
    pub max_in_flight: usize,
}

/// The trigger endpoint.
#[derive(Debug, Clone)]
pub struct TriggerSettings {
    /// `workflow_params` are personal data: stored only when this is on.
    pub store_workflow_params: bool,
    pub idempotency_ttl: Duration,
}

/// Validated settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub environment: Environment,
    pub bind: SocketAddr,
    /// May carry a password, so it is a secret too.
    pub database_url: SecretString,
    pub webhook_secrets: Vec<SecretString>,
    pub api_tokens: Vec<SecretString>,
    pub public_url: Option<Url>,
    pub log_format: LogFormat,
    pub nen: NenSettings,
    pub webhook: WebhookSettings,
    pub store: StoreOptions,
    pub migrate_on_start: bool,
    pub ingest: IngestSettings,
    pub http: HttpSettings,
    pub trigger: TriggerSettings,
    /// Secrets made up for a local start, to be shown once on the terminal.
    pub generated: Vec<(&'static str, SecretString)>,
}

impl Settings {
    /// Reads the settings from `config/` (or `NEN_RELAY_CONFIG_DIR`) and the process environment.
    pub fn load() -> Result<Self, ConfigError> {
        let environment = Environment::from_env()?;
        let config_dir = std::env::var_os("NEN_RELAY_CONFIG_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("config"));
        let variables: BTreeMap<String, String> = std::env::vars().collect();
        Self::from_sources(environment, &config_dir, &variables)
    }

    /// Reads the settings from a config folder and a given set of variables (tests use this).
    pub fn from_sources(
        environment: Environment,
        config_dir: &Path,
        variables: &BTreeMap<String, String>,
    ) -> Result<Self, ConfigError> {
        let figment = Figment::new()
            .merge(Serialized::defaults(RawSettings::default()))
            .merge(Toml::file(config_dir.join("default.toml")))
            .merge(Toml::file(
                config_dir.join(format!("{}.toml", environment.as_str())),
            ))
            .merge(Serialized::globals(named_variables(variables)?))
            .merge(Serialized::globals(tuning_variables(variables)));
        let raw: RawSettings = figment
            .extract()
            .map_err(|error| ConfigError::Invalid(format!("invalid configuration: {error}")))?;
        raw.validate(environment)
    }

    pub fn ack_timeout(&self) -> Duration {
        Duration::from_millis(self.webhook.ack_timeout_ms)
    }
}

/// SPEC's variables, read as plain strings (a numeric-looking secret stays a string), with
/// `<NAME>_FILE` resolved for secrets.
fn named_variables(variables: &BTreeMap<String, String>) -> Result<Dict, ConfigError> {
    let mut root = Dict::new();
    for (variable, key) in NAMED_VARIABLES {
        let mut value = variables.get(*variable).cloned();
        if SECRET_VARIABLES.contains(variable) {
            let file_variable = format!("{variable}_FILE");
            if let Some(path) = variables.get(&file_variable).filter(|p| !p.is_empty()) {
                if value.as_deref().is_some_and(|v| !v.is_empty()) {
                    return Err(ConfigError::Invalid(format!(
                        "set either {variable} or {file_variable}, not both"
                    )));
                }
                let text =
                    std::fs::read_to_string(path).map_err(|source| ConfigError::SecretFile {
                        variable: file_variable.clone(),
                        path: path.clone(),
                        source,
                    })?;
                // Files written by editors and `echo` end with a newline that is not the secret.
                value = Some(text.trim_end_matches(['\r', '\n']).to_owned());
            }
        }
        let Some(value) = value.filter(|v| !v.is_empty()) else {
            continue;
        };
        insert_path(&mut root, key, Value::from(value));
    }
    Ok(root)
}

/// Every other setting: `NEN_RELAY_<SECTION>__<KEY>`, e.g. `NEN_RELAY_INGEST__MAX_BATCH=128`.
fn tuning_variables(variables: &BTreeMap<String, String>) -> Dict {
    let mut root = Dict::new();
    for (name, text) in variables {
        let Some(rest) = name
            .strip_prefix("NEN_RELAY_")
            .filter(|rest| rest.contains("__"))
        else {
            continue;
        };
        let key = rest.to_ascii_lowercase().replace("__", ".");
        let value = if let Ok(number) = text.parse::<u64>() {
            Value::from(number)
        } else if let Ok(flag) = text.parse::<bool>() {
            Value::from(flag)
        } else {
            Value::from(text.clone())
        };
        insert_path(&mut root, &key, value);
    }
    root
}

fn insert_path(root: &mut Dict, dotted: &str, value: Value) {
    match dotted.split_once('.') {
        None => {
            root.insert(dotted.to_owned(), value);
        }
        Some((section, rest)) => {
            let entry = root
                .entry(section.to_owned())
                .or_insert_with(|| Value::from(Dict::new()));
            if let Value::Dict(_, dict) = entry {
                insert_path(dict, rest, value);
            }
        }
    }
}

impl RawSettings {
    fn validate(self, environment: Environment) -> Result<Settings, ConfigError> {
        let production = environment == Environment::Production;
        let mut generated = Vec::new();

        let bind_text = self.bind.unwrap_or_else(|| {
            if production {
                "0.0.0.0:8080"
            } else {
                "127.0.0.1:8080"
            }
            .to_owned()
        });
        let bind: SocketAddr = bind_text.parse().map_err(|_| {
            ConfigError::Invalid(format!(
                "NEN_RELAY_BIND must be an address like 127.0.0.1:8080, not {bind_text:?}"
            ))
        })?;

        let database_url = match self.database_url {
            Some(url) => url,
            None if production => "sqlite:///var/lib/nen-relay/nen-relay.db".to_owned(),
            None => "sqlite://data/nen-relay.db".to_owned(),
        };
        crate::store::Backend::from_url(&database_url).map_err(|_| {
            ConfigError::Invalid(
                "DATABASE_URL must start with postgres://, postgresql:// or sqlite://".into(),
            )
        })?;

        let webhook_secrets = required_list(
            self.webhook_secrets,
            "NEN_WEBHOOK_SECRETS",
            production,
            "whsec-dev",
            &mut generated,
        )?;
        let api_tokens = required_list(
            self.api_tokens,
            "NEN_RELAY_API_TOKENS",
            production,
            "dev-token",
            &mut generated,
        )?;

        let public_url = self
            .public_url
            .map(|text| parse_url("NEN_RELAY_PUBLIC_URL", &text))
            .transpose()?;
        let base_url = parse_url(
            "NEN_API_BASE_URL",
            self.nen
                .base_url
                .as_deref()
                .unwrap_or("https://api.getnen.ai"),
        )?;

        let log_format = self.log_format.unwrap_or(if production {
            LogFormat::Json
        } else {
            LogFormat::Pretty
        });

        if self.webhook.max_body_bytes == 0 {
            return Err(ConfigError::Invalid(
                "webhook.max_body_bytes must be positive".into(),
            ));
        }
        if self.ingest.writers == 0 || self.ingest.max_batch == 0 || self.ingest.queue_capacity == 0
        {
            return Err(ConfigError::Invalid(
                "ingest.writers, ingest.max_batch and ingest.queue_capacity must be positive"
                    .into(),
            ));
        }

        let defaults = StoreOptions::default();
        let store = StoreOptions {
            max_connections: self
                .store
                .max_connections
                .unwrap_or(defaults.max_connections)
                .max(1),
            acquire_timeout: millis(self.store.acquire_timeout_ms, defaults.acquire_timeout),
            statement_timeout: millis(self.store.statement_timeout_ms, defaults.statement_timeout),
        };

        Ok(Settings {
            environment,
            bind,
            database_url: SecretString::from(database_url),
            webhook_secrets,
            api_tokens,
            public_url,
            log_format,
            nen: NenSettings {
                api_key: non_empty_secret(self.nen.api_key),
                base_url,
                signing_key: non_empty_secret(self.nen.signing_key),
                connect_timeout: millis(self.nen.connect_timeout_ms, Duration::from_secs(5)),
                timeout: millis(self.nen.timeout_ms, Duration::from_secs(30)),
            },
            webhook: self.webhook,
            store,
            migrate_on_start: self.store.migrate_on_start.unwrap_or(true),
            ingest: self.ingest,
            http: HttpSettings {
                header_read_timeout: millis(
                    self.http.header_read_timeout_ms,
                    Duration::from_secs(10),
                ),
                shutdown_timeout: millis(self.http.shutdown_timeout_ms, Duration::from_secs(20)),
                max_in_flight: self.http.max_in_flight.unwrap_or(4096).max(1),
            },
            trigger: TriggerSettings {
                store_workflow_params: self.trigger.store_workflow_params.unwrap_or(false),
                idempotency_ttl: Duration::from_secs(
                    self.trigger.idempotency_ttl_hours.unwrap_or(24).max(1) * 3600,
                ),
            },
            generated,
        })
    }
}

fn required_list(
    value: Option<StringList>,
    name: &'static str,
    production: bool,
    dev_prefix: &str,
    generated: &mut Vec<(&'static str, SecretString)>,
) -> Result<Vec<SecretString>, ConfigError> {
    let list = value.map(StringList::into_secrets).unwrap_or_default();
    if !list.is_empty() {
        return Ok(list);
    }
    if production {
        return Err(ConfigError::MissingSecret { name });
    }
    let secret = SecretString::from(format!("{dev_prefix}-{}", uuid::Uuid::new_v4().simple()));
    generated.push((name, secret.clone()));
    Ok(vec![secret])
}

fn non_empty_secret(value: Option<String>) -> Option<SecretString> {
    value.filter(|v| !v.is_empty()).map(SecretString::from)
}

fn parse_url(name: &str, text: &str) -> Result<Url, ConfigError> {
    let url = Url::parse(text)
        .map_err(|error| ConfigError::Invalid(format!("{name} is not a URL ({error})")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(ConfigError::Invalid(format!(
            "{name} must be an http:// or https:// URL"
        )));
    }
    Ok(url)
}

fn millis(value: Option<u64>, default: Duration) -> Duration {
    value.map(Duration::from_millis).unwrap_or(default)
}

/// Whether a secret is among the configured ones, without exposing either.
pub fn secrets_as_strs(secrets: &[SecretString]) -> impl Iterator<Item = &str> {
    secrets.iter().map(|secret| secret.expose_secret())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn no_files() -> PathBuf {
        PathBuf::from("/nonexistent-nen-relay-config")
    }

    #[test]
    fn debug_output_of_settings_shows_no_secret() {
        let secrets = [
            ("NEN_WEBHOOK_SECRETS", "whsec-debug-1,whsec-debug-2"),
            ("NEN_RELAY_API_TOKENS", "token-debug-1"),
            ("NEN_API_KEY", "nen-key-debug"),
            ("NEN_SIGNING_KEY", "signing-key-debug"),
            (
                "DATABASE_URL",
                "postgres://relay:db-password-debug@127.0.0.1/relay",
            ),
        ];
        let settings =
            Settings::from_sources(Environment::Local, &no_files(), &vars(&secrets)).unwrap();
        let shown = format!("{settings:?} {settings:#?}");
        for leaked in [
            "whsec-debug",
            "token-debug",
            "nen-key-debug",
            "signing-key-debug",
            "db-password-debug",
        ] {
            assert!(!shown.contains(leaked), "{leaked} appears in {shown}");
        }
    }

    #[test]
    fn local_defaults_work_without_any_variable() {
        let settings = Settings::from_sources(Environment::Local, &no_files(), &vars(&[])).unwrap();
        assert_eq!(settings.bind.to_string(), "127.0.0.1:8080");
        assert!(settings
            .database_url
            .expose_secret()
            .starts_with("sqlite://"));
        assert_eq!(settings.webhook_secrets.len(), 1);
        assert_eq!(settings.generated.len(), 2);
        assert_eq!(settings.log_format, LogFormat::Pretty);
    }

    #[test]
    fn production_refuses_to_start_without_secrets_and_names_them() {
        let error = Settings::from_sources(
            Environment::Production,
            &no_files(),
            &vars(&[("NEN_RELAY_API_TOKENS", "t")]),
        )
        .unwrap_err();
        assert!(error.to_string().contains("NEN_WEBHOOK_SECRETS"), "{error}");
        let error = Settings::from_sources(
            Environment::Production,
            &no_files(),
            &vars(&[("NEN_WEBHOOK_SECRETS", "s")]),
        )
        .unwrap_err();
        assert!(
            error.to_string().contains("NEN_RELAY_API_TOKENS"),
            "{error}"
        );
    }

    #[test]
    fn lists_are_comma_separated_and_numeric_secrets_stay_strings() {
        let settings = Settings::from_sources(
            Environment::Production,
            &no_files(),
            &vars(&[
                ("NEN_WEBHOOK_SECRETS", "12345, abc ,"),
                ("NEN_RELAY_API_TOKENS", "42"),
            ]),
        )
        .unwrap();
        let secrets: Vec<&str> = secrets_as_strs(&settings.webhook_secrets).collect();
        assert_eq!(secrets, ["12345", "abc"]);
        assert_eq!(settings.bind.to_string(), "0.0.0.0:8080");
        assert_eq!(settings.log_format, LogFormat::Json);
    }

    #[test]
    fn secrets_can_come_from_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "from-file\n").unwrap();
        let path = path.to_str().unwrap();
        let settings = Settings::from_sources(
            Environment::Production,
            &no_files(),
            &vars(&[
                ("NEN_WEBHOOK_SECRETS_FILE", path),
                ("NEN_RELAY_API_TOKENS", "t"),
                ("NEN_API_KEY_FILE", path),
            ]),
        )
        .unwrap();
        assert_eq!(settings.webhook_secrets[0].expose_secret(), "from-file");
        assert_eq!(settings.nen.api_key.unwrap().expose_secret(), "from-file");
        let missing = Settings::from_sources(
            Environment::Local,
            &no_files(),
            &vars(&[("NEN_API_KEY_FILE", "/nonexistent/key")]),
        )
        .unwrap_err();
        assert!(
            missing.to_string().contains("NEN_API_KEY_FILE"),
            "{missing}"
        );
    }

    #[test]
    fn files_layer_under_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("default.toml"),
            "bind = \"127.0.0.1:9000\"\n[ingest]\nmax_batch = 7\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("local.toml"), "[ingest]\nwriters = 3\n").unwrap();
        let settings = Settings::from_sources(Environment::Local, dir.path(), &vars(&[])).unwrap();
        assert_eq!(settings.bind.port(), 9000);
        assert_eq!((settings.ingest.max_batch, settings.ingest.writers), (7, 3));
        let settings = Settings::from_sources(
            Environment::Local,
            dir.path(),
            &vars(&[("NEN_RELAY_BIND", "127.0.0.1:9001")]),
        )
        .unwrap();
        assert_eq!(settings.bind.port(), 9001);
    }

    #[test]
    fn the_shipped_config_files_parse_and_match_the_built_in_defaults() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        for environment in [Environment::Local, Environment::Production] {
            let shipped = Settings::from_sources(
                environment,
                &dir,
                &vars(&[("NEN_WEBHOOK_SECRETS", "s"), ("NEN_RELAY_API_TOKENS", "t")]),
            )
            .unwrap();
            let built_in = Settings::from_sources(
                environment,
                &no_files(),
                &vars(&[("NEN_WEBHOOK_SECRETS", "s"), ("NEN_RELAY_API_TOKENS", "t")]),
            )
            .unwrap();
            assert_eq!(format!("{shipped:?}"), format!("{built_in:?}"));
        }
    }

    #[test]
    fn bad_values_are_named() {
        let error = Settings::from_sources(
            Environment::Local,
            &no_files(),
            &vars(&[("NEN_RELAY_BIND", "nowhere")]),
        )
        .unwrap_err();
        assert!(error.to_string().contains("NEN_RELAY_BIND"));
        let error = Settings::from_sources(
            Environment::Local,
            &no_files(),
            &vars(&[("DATABASE_URL", "mysql://x")]),
        )
        .unwrap_err();
        assert!(error.to_string().contains("DATABASE_URL"));
    }

    #[test]
    fn debug_output_hides_secrets() {
        let settings = Settings::from_sources(
            Environment::Local,
            &no_files(),
            &vars(&[
                ("NEN_WEBHOOK_SECRETS", "whsec-visible"),
                ("NEN_API_KEY", "key-visible"),
            ]),
        )
        .unwrap();
        let debug = format!("{settings:?}");
        assert!(!debug.contains("whsec-visible") && !debug.contains("key-visible"));
    }
}
