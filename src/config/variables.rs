//! The environment layer: which variable sets which key.
//!
//! - The names the service has always documented ([`ALIASES`]), e.g. `DATABASE_URL`.
//! - Every other setting as `NEN_RELAY_<SECTION>__<KEY>`, mapped the way figment's
//!   `Env::prefixed("NEN_RELAY_").split("__")` maps it (`NEN_RELAY_INGEST__MAX_BATCH` is
//!   `ingest.max_batch`). figment's `Env` reads the process environment only, while
//!   `Settings::from_sources` is given its variables (tests run side by side in one process), so
//!   the same mapping is applied here to the given set.
//! - A secret's `<NAME>_FILE`, naming a file that holds it.
//! - An older `<KEY>_MS` / `<KEY>_HOURS` spelling of a duration.
//!
//! Values stay text, so a secret that looks like a number stays the text it was; numbers and
//! flags are converted when the settings are extracted. When two variables set one key (`X` and
//! `X_FILE`, `X` and `X_MS`, an alias and its `NEN_RELAY_` form), both are named in an error.
//! An empty variable counts as unset.

use std::collections::BTreeMap;

use figment::util::nest;
use figment::value::{Dict, Value};

use super::layers::{Layer, Naming};
use super::legacy_units::{self, Unit};
use super::ConfigError;

/// Variable names that the service documents, and the key each one sets.
const ALIASES: &[(&str, &str)] = &[
    ("NEN_RELAY_BIND", "bind"),
    ("NEN_RELAY_OPS_BIND", "ops_bind"),
    ("DATABASE_URL", "database_url"),
    ("NEN_WEBHOOK_SECRETS", "webhook_secrets"),
    ("NEN_RELAY_API_TOKENS", "api_tokens"),
    ("NEN_API_KEY", "nen.api_key"),
    ("NEN_API_BASE_URL", "nen.base_url"),
    ("NEN_SIGNING_KEY", "nen.signing_key"),
    ("NEN_RELAY_PUBLIC_URL", "public_url"),
    ("NEN_RELAY_LOG_FORMAT", "log_format"),
];

/// Keys that hold secrets: each may be given as a file, by the variable's name + `_FILE`.
pub(super) const SECRET_KEYS: &[&str] = &[
    "database_url",
    "webhook_secrets",
    "api_tokens",
    "nen.api_key",
    "nen.signing_key",
    "trigger.fingerprint_key",
];

const PREFIX: &str = "NEN_RELAY_";
const SEPARATOR: &str = "__";
const FILE_SUFFIX: &str = "_FILE";

/// How a variable's text becomes the value of its key.
enum Reading {
    Text,
    /// The text names a file that holds the value.
    File,
    /// A whole number counted in this unit.
    LegacyUnit(Unit),
}

/// The key a variable sets and how to read it; `None` for variables that are not settings.
fn target(name: &str) -> Result<Option<(String, Reading)>, ConfigError> {
    if let Some((_, key)) = ALIASES.iter().find(|(alias, _)| *alias == name) {
        return Ok(Some(((*key).to_owned(), Reading::Text)));
    }
    if let Some(secret) = name.strip_suffix(FILE_SUFFIX) {
        if let Some((_, key)) = ALIASES.iter().find(|(alias, _)| *alias == secret) {
            if SECRET_KEYS.contains(key) {
                return Ok(Some(((*key).to_owned(), Reading::File)));
            }
        }
    }
    let Some(rest) = name
        .strip_prefix(PREFIX)
        .filter(|rest| rest.contains(SEPARATOR))
    else {
        return Ok(None);
    };
    let mut segments: Vec<String> = rest.split(SEPARATOR).map(str::to_ascii_lowercase).collect();
    if segments.iter().any(String::is_empty) {
        return Err(ConfigError::Invalid(format!(
            "{name} is not a setting: expected NEN_RELAY_<SECTION>__<KEY>"
        )));
    }
    let last = segments.pop().expect("split yields at least one segment");
    let file_key = last
        .strip_suffix("_file")
        .map(|base| [segments.join("."), base.to_owned()].join("."))
        .filter(|key| SECRET_KEYS.contains(&key.as_str()) || super::forward::is_target_secret(key));
    if let Some(key) = file_key {
        return Ok(Some((key, Reading::File)));
    }
    if let Some((base, unit)) = legacy_units::modern_key(&last) {
        segments.push(base.to_owned());
        return Ok(Some((segments.join("."), Reading::LegacyUnit(unit))));
    }
    segments.push(last);
    Ok(Some((segments.join("."), Reading::Text)))
}

/// Variables read outside the settings tree: which layers apply, and where `nen-relay wait`
/// finds the server and its token.
const READ_ELSEWHERE: &[&str] = &[
    "NEN_RELAY_ENV",
    "NEN_RELAY_CONFIG_DIR",
    "NEN_RELAY_URL",
    "NEN_RELAY_TOKEN",
];

/// Variables named like nen-relay's (`NEN_...`) that set nothing: most likely a misspelling,
/// e.g. `NEN_WEBHOOK_SECRET` for `NEN_WEBHOOK_SECRETS`.
pub(super) fn unrecognised(variables: &BTreeMap<String, String>) -> Vec<String> {
    variables
        .keys()
        .filter(|name| name.starts_with("NEN_"))
        .filter(|name| !READ_ELSEWHERE.contains(&name.as_str()))
        .filter(|name| matches!(target(name), Ok(None)))
        .cloned()
        .collect()
}

/// The environment layer built from `variables`.
pub(super) fn layer(variables: &BTreeMap<String, String>) -> Result<Layer, ConfigError> {
    let mut values = Dict::new();
    let mut set_by: BTreeMap<String, String> = BTreeMap::new();
    for (name, text) in variables {
        if text.is_empty() {
            continue;
        }
        let Some((key, reading)) = target(name)? else {
            continue;
        };
        if let Some(earlier) = set_by.get(&key) {
            return Err(ConfigError::Invalid(format!(
                "{earlier} and {name} both set `{key}`; set only one"
            )));
        }
        let value = match reading {
            Reading::Text => text.clone(),
            Reading::File => read_secret_file(name, text)?,
            Reading::LegacyUnit(unit) => {
                legacy_units::duration_text(text, unit).ok_or_else(|| {
                    ConfigError::Invalid(format!(
                        "{name} must be a whole number of {}, not {text:?}",
                        unit.name
                    ))
                })?
            }
        };
        set_by.insert(key.clone(), name.clone());
        let nested = nest(&key, Value::from(value))
            .into_dict()
            .expect("a non-empty key nests into a dict");
        values = merge(values, nested);
    }
    Ok(Layer::new(
        "environment".to_owned(),
        values,
        set_by,
        Naming::Variable,
    ))
}

/// The secret in the file `<NAME>_FILE` names. Editors and `echo` end a file with a newline
/// that is not part of the secret, so trailing line ends are dropped.
fn read_secret_file(variable: &str, path: &str) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::SecretFile {
        variable: variable.to_owned(),
        path: path.to_owned(),
        source,
    })?;
    Ok(text.trim_end_matches(['\r', '\n']).to_owned())
}

/// `right`'s keys added to `left`, tables merged key by key.
fn merge(mut left: Dict, right: Dict) -> Dict {
    for (key, value) in right {
        let merged = match (left.remove(&key), value) {
            (Some(Value::Dict(_, old)), Value::Dict(_, new)) => Value::from(merge(old, new)),
            (_, value) => value,
        };
        left.insert(key, merged);
    }
    left
}
