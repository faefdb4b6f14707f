//! The subcommands that are not the server, run as the built binary.

use std::process::{Command, Output};

fn nen_relay(args: &[&str], variables: &[(&str, &str)]) -> Output {
    let config_dir = tempfile::tempdir().unwrap();
    Command::new(env!("CARGO_BIN_EXE_nen-relay"))
        .args(args)
        .env_clear()
        .env("NEN_RELAY_CONFIG_DIR", config_dir.path())
        .envs(variables.iter().copied())
        .output()
        .expect("nen-relay runs")
}

const PRODUCTION: &[(&str, &str)] = &[
    ("NEN_RELAY_ENV", "production"),
    ("DATABASE_URL", "postgres://relay@127.0.0.1:1/relay"),
    ("NEN_WEBHOOK_SECRETS", "a-webhook-secret-of-32-characters"),
    ("NEN_RELAY_API_TOKENS", "an-api-token-of-at-least-16-bytes"),
];

#[test]
fn check_config_accepts_a_valid_environment_and_shows_no_secret() {
    let output = nen_relay(&["check-config"], PRODUCTION);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    assert!(stdout.contains("NEN_RELAY_ENV=production"), "{stdout}");
    assert!(stdout.contains("PostgreSQL"), "{stdout}");
    for (_, secret) in &PRODUCTION[1..] {
        assert!(!stdout.contains(secret), "{stdout}");
    }
}

#[test]
fn check_config_names_a_misspelt_variable() {
    let mut variables = PRODUCTION.to_vec();
    variables.push(("NEN_WEBHOOK_SECRET", "a-typo-for-the-plural"));
    let output = nen_relay(&["check-config"], &variables);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{output:?}");
    assert!(stderr.contains("NEN_WEBHOOK_SECRET "), "{stderr}");
    assert!(!stderr.contains("a-typo-for-the-plural"), "{stderr}");
}

#[test]
fn check_config_names_a_missing_production_secret() {
    let output = nen_relay(&["check-config"], &PRODUCTION[..2]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{output:?}");
    assert!(stderr.contains("NEN_WEBHOOK_SECRETS"), "{stderr}");
}

#[test]
fn version_is_the_package_version() {
    let output = nen_relay(&["--version"], &[]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        stdout.trim(),
        format!("nen-relay {}", env!("CARGO_PKG_VERSION"))
    );
}
