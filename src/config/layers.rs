//! The layers settings are read from, lowest first:
//! built-in (`config/default.toml`, then `config/<env>.toml`, compiled in) <
//! `<config dir>/default.toml` < `<config dir>/<env>.toml` < environment variables.
//!
//! Every layer is read up front into a [`Layer`]: its values, and the name the user wrote for
//! each of them, so that an error names the variable or the file key that was actually set.

use std::collections::BTreeMap;
use std::path::Path;

use figment::providers::{Format, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};

use super::legacy_units;
use super::{ConfigError, Environment};

const BUILT_IN_DEFAULT: &str = include_str!("../../config/default.toml");
const BUILT_IN_LOCAL: &str = include_str!("../../config/local.toml");
const BUILT_IN_PRODUCTION: &str = include_str!("../../config/production.toml");

/// Every layer, merged in order.
pub(super) fn figment(
    environment: Environment,
    config_dir: &Path,
    variables: &BTreeMap<String, String>,
) -> Result<Figment, ConfigError> {
    let built_in_for_environment = match environment {
        Environment::Local => BUILT_IN_LOCAL,
        Environment::Production => BUILT_IN_PRODUCTION,
    };
    let environment_file = format!("{}.toml", environment.as_str());
    let mut figment = Figment::new()
        .merge(Layer::toml(
            "built-in config/default.toml",
            BUILT_IN_DEFAULT,
        )?)
        .merge(Layer::toml(
            &format!("built-in config/{environment_file}"),
            built_in_for_environment,
        )?);
    for path in [
        config_dir.join("default.toml"),
        config_dir.join(environment_file),
    ] {
        if let Some(layer) = Layer::toml_file(&path)? {
            figment = figment.merge(layer);
        }
    }
    Ok(figment.merge(super::variables::layer(variables)?))
}

/// One source of settings, already read.
pub(super) struct Layer {
    /// Where the values come from, as an error shows it.
    label: String,
    values: Dict,
    /// For a key set under another name (a variable, an older `_ms` key), that name.
    written_as: BTreeMap<String, String>,
    naming: Naming,
}

/// How a key of a layer is named in errors.
#[derive(Clone, Copy)]
pub(super) enum Naming {
    /// `` `ingest.max_batch` in config/default.toml ``.
    FileKey,
    /// `NEN_RELAY_INGEST__MAX_BATCH`.
    Variable,
}

impl Layer {
    pub(super) fn new(
        label: String,
        values: Dict,
        written_as: BTreeMap<String, String>,
        naming: Naming,
    ) -> Self {
        Self {
            label,
            values,
            written_as,
            naming,
        }
    }

    /// A TOML file, if it exists.
    fn toml_file(path: &Path) -> Result<Option<Self>, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::toml(&path.display().to_string(), &text).map(Some),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(ConfigError::Invalid(format!(
                "cannot read {}: {error}",
                path.display()
            ))),
        }
    }

    fn toml(label: &str, text: &str) -> Result<Self, ConfigError> {
        let mut values: Dict = Toml::from_str(text)
            .map_err(|error| ConfigError::Invalid(format!("{label} is not valid TOML: {error}")))?;
        let mut written_as = BTreeMap::new();
        modernise(&mut values, label, &mut Vec::new(), &mut written_as)?;
        Ok(Self::new(
            label.to_owned(),
            values,
            written_as,
            Naming::FileKey,
        ))
    }
}

/// Rewrites every older `<key>_ms`/`<key>_hours` of the file `label` as `<key>` with a
/// duration text.
fn modernise(
    dict: &mut Dict,
    label: &str,
    path: &mut Vec<String>,
    written_as: &mut BTreeMap<String, String>,
) -> Result<(), ConfigError> {
    let keys: Vec<String> = dict.keys().cloned().collect();
    for key in keys {
        if let Some(Value::Dict(_, inner)) = dict.get_mut(&key) {
            path.push(key.clone());
            modernise(inner, label, path, written_as)?;
            path.pop();
            continue;
        }
        let Some((modern, unit)) = legacy_units::modern_key(&key) else {
            continue;
        };
        let dotted = |key: &str| dotted(path, key);
        if dict.contains_key(modern) {
            return Err(ConfigError::Invalid(format!(
                "`{}` and `{}` are both set in {label}; set only one",
                dotted(modern),
                dotted(&key)
            )));
        }
        let value = dict.remove(&key).expect("the key was listed");
        let number = match &value {
            Value::Num(_, number) => number.to_u128_lossy().map(|number| number.to_string()),
            Value::String(_, text) => Some(text.clone()),
            _ => None,
        };
        let text = number
            .and_then(|number| legacy_units::duration_text(&number, unit))
            .ok_or_else(|| {
                ConfigError::Invalid(format!(
                    "`{}` in {label} must be a whole number of {}",
                    dotted(&key),
                    unit.name
                ))
            })?;
        written_as.insert(dotted(modern), dotted(&key));
        dict.insert(modern.to_owned(), Value::from(text));
    }
    Ok(())
}

/// `key` inside the tables `path`, as `section.key`.
fn dotted(path: &[String], key: &str) -> String {
    let mut parts: Vec<&str> = path.iter().map(String::as_str).collect();
    parts.push(key);
    parts.join(".")
}

impl Provider for Layer {
    fn metadata(&self) -> Metadata {
        let label = self.label.clone();
        let written_as = self.written_as.clone();
        let naming = self.naming;
        Metadata::named(self.label.clone()).interpolater(move |_: &Profile, keys: &[&str]| {
            let dotted = keys.join(".");
            // A table's key names the first setting written inside it.
            let inside = format!("{dotted}.");
            let written = written_as.get(&dotted).cloned().or_else(|| {
                written_as
                    .iter()
                    .find(|(key, _)| key.starts_with(&inside))
                    .map(|(_, written)| written.clone())
            });
            match naming {
                Naming::FileKey => format!("`{}` in {label}", written.unwrap_or(dotted)),
                Naming::Variable => written.unwrap_or_else(|| {
                    format!("NEN_RELAY_{}", keys.join("__").to_ascii_uppercase())
                }),
            }
        })
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.values.clone()))
    }
}

/// One line per problem, each naming the variable or file key it is about.
pub(super) fn describe(error: figment::Error) -> ConfigError {
    let lines: Vec<String> = error
        .into_iter()
        .map(|error| {
            let place = match (&error.metadata, &error.profile) {
                (Some(metadata), Some(profile)) if !error.path.is_empty() => {
                    Some(metadata.interpolate(profile, &error.path))
                }
                (Some(metadata), _) => Some(metadata.name.to_string()),
                (None, _) => None,
            };
            match place {
                Some(place) => format!("{place}: {}", error.kind),
                None => error.kind.to_string(),
            }
        })
        .collect();
    ConfigError::Invalid(lines.join("; "))
}
