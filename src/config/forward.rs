//! `[forward]`: the delivery settings, and the targets named beside them (`[forward.<name>]`).
//!
//! Targets share the table with the settings (SPEC: `NEN_RELAY_FORWARD__MAX_AGE` beside
//! `NEN_RELAY_FORWARD__<NAME>__URL`), so every key that is not a setting is a target, and a
//! setting's name cannot be a target's. Each target is checked here and becomes a
//! [`Target`](crate::forward::Target); a bad one refuses the start, naming it.

use std::collections::BTreeMap;
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;

use super::{retention_period, secret_values, ConfigError, Environment};
use crate::forward::Target;

/// `[forward]`.
#[derive(Debug, Clone, Deserialize)]
pub struct ForwardSettings {
    /// A message not delivered this long after it was queued is kept as failed.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// No answer within this is a failed attempt.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Messages in flight at once, per target.
    pub concurrency: usize,
    /// How long a claimed message stays in one replica's hands at most.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// The safety-net poll of an idle target.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// How long delivered and failed messages are kept; `None` keeps them forever.
    #[serde(deserialize_with = "retention_period::deserialize")]
    pub keep_delivered: Option<Duration>,
    /// Every other key: a target, as written. Checked into [`ForwardSettings::targets`].
    #[serde(flatten)]
    pub target_settings: BTreeMap<String, TargetSettings>,
    /// The checked targets, in name order.
    #[serde(skip)]
    pub targets: Vec<Target>,
}

/// `[forward.<name>]`, as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetSettings {
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default, deserialize_with = "secret_values::optional")]
    pub secret: Option<SecretString>,
    /// Allows `http://` to a host that is not loopback in production.
    #[serde(default)]
    pub allow_http: bool,
}

impl ForwardSettings {
    pub(super) fn validate(&mut self, environment: Environment) -> Result<(), ConfigError> {
        if self.concurrency == 0 {
            return Err(ConfigError::Invalid(
                "forward.concurrency must be positive".into(),
            ));
        }
        if self.timeout.is_zero() || self.poll_interval.is_zero() || self.max_age.is_zero() {
            return Err(ConfigError::Invalid(
                "forward.timeout, forward.poll_interval and forward.max_age must be positive"
                    .into(),
            ));
        }
        if self.lease <= self.timeout {
            return Err(ConfigError::Invalid(format!(
                "forward.lease ({}) must be longer than forward.timeout ({}): a message still being \
                 sent would be handed to another replica",
                humantime::format_duration(self.lease),
                humantime::format_duration(self.timeout)
            )));
        }
        let production = environment == Environment::Production;
        self.targets = self
            .target_settings
            .iter()
            .map(|(name, settings)| {
                Target::from_settings(name, settings, production).map_err(ConfigError::Invalid)
            })
            .collect::<Result<_, _>>()?;
        Ok(())
    }
}

/// `forward.<name>.secret`: each target's secret may be given as a file too.
pub(super) fn is_target_secret(key: &str) -> bool {
    let mut parts = key.split('.');
    matches!(
        (parts.next(), parts.next(), parts.next(), parts.next()),
        (Some("forward"), Some(name), Some("secret"), None) if !name.is_empty()
    )
}
