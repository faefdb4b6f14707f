//! The stand-in signs callbacks with whatever NEN_WEBHOOK_SECRETS holds. Where the service runs
//! in production that is the real webhook secret, and a process holding it can forge callbacks
//! the service accepts: so the stand-in runs only where the service would run as `local`.

use std::ffi::OsStr;

/// Why fake-nen must not run with this `NEN_RELAY_ENV`, or `None` when it may.
pub fn refusal(nen_relay_env: Option<&OsStr>) -> Option<String> {
    match nen_relay_env.map(OsStr::to_str) {
        None | Some(Some("" | "local")) => None,
        Some(Some("production")) => Some(
            "fake-nen refuses to run with NEN_RELAY_ENV=production: it is a test stand-in and \
             must not sign callbacks with a production webhook secret"
                .to_owned(),
        ),
        Some(other) => Some(format!(
            "fake-nen runs only where NEN_RELAY_ENV is unset or \"local\", not {:?}",
            other.unwrap_or("<not UTF-8>")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_only_where_the_service_would_be_local() {
        for allowed in [None, Some(""), Some("local")] {
            assert_eq!(refusal(allowed.map(OsStr::new)), None, "{allowed:?}");
        }
        let production = refusal(Some(OsStr::new("production"))).expect("refused");
        assert!(
            production.contains("NEN_RELAY_ENV=production"),
            "{production}"
        );
        assert!(!production.contains('\n'), "one line: {production}");
        for refused in ["Production", "staging", " local"] {
            let reason = refusal(Some(OsStr::new(refused))).expect("refused");
            assert!(reason.contains(&format!("{refused:?}")), "{reason}");
        }
    }
}
