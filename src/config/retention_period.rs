//! A retention period: a duration such as `"90d"`, or `"off"` to keep forever.

use std::time::Duration;

use serde::{Deserialize, Deserializer};

pub(super) fn deserialize<'de, D>(deserializer: D) -> Result<Option<Duration>, D::Error>
where
    D: Deserializer<'de>,
{
    let text = String::deserialize(deserializer)?;
    parse(&text).map_err(serde::de::Error::custom)
}

fn parse(text: &str) -> Result<Option<Duration>, String> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    match humantime::parse_duration(text) {
        Ok(period) if !period.is_zero() => Ok(Some(period)),
        Ok(_) => Err(
            "a retention period of zero would delete at once; write \"off\" to keep forever".into(),
        ),
        Err(error) => Err(format!(
            "{text:?} is not a retention period (write e.g. \"90d\", \"12h\", or \"off\"): {error}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_keeps_forever_and_durations_carry_units() {
        assert_eq!(parse("off"), Ok(None));
        assert_eq!(parse("OFF"), Ok(None));
        assert_eq!(parse("90d"), Ok(Some(Duration::from_secs(90 * 86_400))));
        assert_eq!(parse("30m"), Ok(Some(Duration::from_secs(1800))));
        assert!(parse("0s").unwrap_err().contains("off"));
        assert!(parse("soon").unwrap_err().contains("soon"));
    }
}
