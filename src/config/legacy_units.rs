//! Older spellings of duration settings: `<key>_ms` (milliseconds) and `<key>_hours`.
//!
//! Before durations carried their unit, `http.header_read_timeout` was written
//! `http.header_read_timeout_ms = 10000`. Such keys, in files and in variables, still work:
//! the number is rewritten as `"10000ms"` under `<key>`. This applies to any key, so a duration
//! added later accepts its `_ms` form without further code.

/// An older key's suffix: the unit its number counts, as a duration text writes it and in words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Unit {
    pub symbol: &'static str,
    pub name: &'static str,
}

const SUFFIXES: &[(&str, Unit)] = &[
    (
        "_ms",
        Unit {
            symbol: "ms",
            name: "milliseconds",
        },
    ),
    (
        "_hours",
        Unit {
            symbol: "h",
            name: "hours",
        },
    ),
];

/// The duration key that `key` is an older spelling of, and the unit of its number.
pub(super) fn modern_key(key: &str) -> Option<(&str, Unit)> {
    SUFFIXES.iter().find_map(|(suffix, unit)| {
        key.strip_suffix(suffix)
            .filter(|base| !base.is_empty())
            .map(|base| (base, *unit))
    })
}

/// `10000` counted in `unit` as a duration text, e.g. `"10000ms"`; `None` unless a whole number.
pub(super) fn duration_text(number: &str, unit: Unit) -> Option<String> {
    number
        .trim()
        .parse::<u64>()
        .ok()
        .map(|count| format!("{count}{}", unit.symbol))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_ms_or_hours_key_names_its_duration() {
        let key = |key| modern_key(key).map(|(base, unit)| (base, unit.symbol));
        assert_eq!(
            key("header_read_timeout_ms"),
            Some(("header_read_timeout", "ms"))
        );
        assert_eq!(key("idle_timeout_ms"), Some(("idle_timeout", "ms")));
        assert_eq!(key("idempotency_ttl_hours"), Some(("idempotency_ttl", "h")));
        assert_eq!(modern_key("max_batch"), None);
        assert_eq!(modern_key("_ms"), None);
    }

    #[test]
    fn only_whole_numbers_convert() {
        let ms = modern_key("x_ms").unwrap().1;
        let hours = modern_key("x_hours").unwrap().1;
        assert_eq!(duration_text("1500", ms).as_deref(), Some("1500ms"));
        assert_eq!(duration_text("24", hours).as_deref(), Some("24h"));
        assert_eq!(duration_text("10s", ms), None);
        assert_eq!(duration_text("-1", ms), None);
        assert_eq!(duration_text("1.5", ms), None);
    }
}
