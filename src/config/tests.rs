use super::*;

fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A webhook secret and an API token long enough for production.
const SECRET: &str = "whsec-test-0123456789";
const TOKEN: &str = "token-test-0123456789";

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
        &vars(&[("NEN_RELAY_API_TOKENS", TOKEN)]),
    )
    .unwrap_err();
    assert!(error.to_string().contains("NEN_WEBHOOK_SECRETS"), "{error}");
    let error = Settings::from_sources(
        Environment::Production,
        &no_files(),
        &vars(&[("NEN_WEBHOOK_SECRETS", SECRET)]),
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
            (
                "NEN_WEBHOOK_SECRETS",
                "1234567890123456, abcdefghijklmnop ,",
            ),
            ("NEN_RELAY_API_TOKENS", "4242424242424242"),
        ]),
    )
    .unwrap();
    let secrets: Vec<&str> = secrets_as_strs(&settings.webhook_secrets).collect();
    assert_eq!(secrets, ["1234567890123456", "abcdefghijklmnop"]);
    let tokens: Vec<&str> = secrets_as_strs(&settings.api_tokens).collect();
    assert_eq!(tokens, ["4242424242424242"]);
    assert_eq!(settings.bind.to_string(), "0.0.0.0:8080");
    assert_eq!(settings.log_format, LogFormat::Json);
}

#[test]
fn secrets_can_come_from_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("secret");
    std::fs::write(&path, "from-file-16-bytes\n").unwrap();
    let path = path.to_str().unwrap();
    let settings = Settings::from_sources(
        Environment::Production,
        &no_files(),
        &vars(&[
            ("NEN_WEBHOOK_SECRETS_FILE", path),
            ("NEN_RELAY_API_TOKENS", TOKEN),
            ("NEN_API_KEY_FILE", path),
        ]),
    )
    .unwrap();
    assert_eq!(
        settings.webhook_secrets[0].expose_secret(),
        "from-file-16-bytes"
    );
    assert_eq!(
        settings.nen.api_key.unwrap().expose_secret(),
        "from-file-16-bytes"
    );
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
    // The token made up for this local start is not shown either.
    let (name, token) = &settings.generated[0];
    assert_eq!(*name, "NEN_RELAY_API_TOKENS");
    assert!(!debug.contains(token.expose_secret()));
}

/// Settings that production accepts, plus `extra`.
fn production_with(extra: &[(&str, &str)]) -> Result<Settings, ConfigError> {
    let mut variables = vars(&[
        ("NEN_WEBHOOK_SECRETS", SECRET),
        ("NEN_RELAY_API_TOKENS", TOKEN),
    ]);
    variables.extend(vars(extra));
    Settings::from_sources(Environment::Production, &no_files(), &variables)
}

fn local_with(extra: &[(&str, &str)]) -> Result<Settings, ConfigError> {
    Settings::from_sources(Environment::Local, &no_files(), &vars(extra))
}

/// A config folder holding `files` (name, text).
fn config_dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

fn error_text(result: Result<Settings, ConfigError>) -> String {
    result.expect_err("the settings are refused").to_string()
}

#[test]
fn the_shipped_files_parse_in_both_environments_with_the_documented_defaults() {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let secrets = vars(&[
        ("NEN_WEBHOOK_SECRETS", SECRET),
        ("NEN_RELAY_API_TOKENS", TOKEN),
    ]);
    for (environment, bind, database_url, log_format) in [
        (
            Environment::Local,
            "127.0.0.1:8080",
            "sqlite://data/nen-relay.db",
            LogFormat::Pretty,
        ),
        (
            Environment::Production,
            "0.0.0.0:8080",
            "sqlite:///var/lib/nen-relay/nen-relay.db",
            LogFormat::Json,
        ),
    ] {
        // From the folder as shipped, and from the built-in copy alone (a folder-less image).
        for dir in [shipped.as_path(), no_files().as_path()] {
            let settings = Settings::from_sources(environment, dir, &secrets).unwrap();
            assert_eq!(settings.environment, environment);
            assert_eq!(settings.bind.to_string(), bind);
            assert_eq!(settings.database_url.expose_secret(), database_url);
            assert_eq!(settings.log_format, log_format);
            assert_eq!(settings.public_url, None);
            assert_eq!(settings.webhook.max_body_bytes, 1024 * 1024);
            assert_eq!(settings.webhook.body_timeout, Duration::from_secs(3));
            assert_eq!(settings.webhook.ack_timeout, Duration::from_secs(2));
            let ingest = &settings.ingest;
            assert_eq!(
                (ingest.writers, ingest.max_batch, ingest.queue_capacity),
                (1, 256, 4096)
            );
            assert_eq!(settings.store.max_connections, 16);
            assert_eq!(settings.store.acquire_timeout, Duration::from_millis(1000));
            assert_eq!(
                settings.store.statement_timeout,
                Duration::from_millis(1500)
            );
            assert!(settings.store.migrate_on_start);
            assert_eq!(settings.http.header_read_timeout, Duration::from_secs(10));
            assert_eq!(settings.http.shutdown_timeout, Duration::from_secs(20));
            assert_eq!(settings.http.max_in_flight, 4096);
            assert_eq!(settings.nen.base_url.as_str(), "https://api.getnen.ai/");
            assert!(settings.nen.api_key.is_none() && settings.nen.signing_key.is_none());
            assert_eq!(settings.nen.connect_timeout, Duration::from_secs(5));
            assert_eq!(settings.nen.timeout, Duration::from_secs(30));
            assert!(!settings.trigger.store_workflow_params);
            assert_eq!(
                settings.trigger.idempotency_ttl,
                Duration::from_secs(24 * 3600)
            );
            assert!(settings.generated.is_empty());
            assert_eq!(settings.ops_bind, None);
            assert_eq!(settings.webhook.max_inflight_body_bytes, 64 * 1024 * 1024);
            assert_eq!(settings.store.migrate_lock_timeout, Duration::from_secs(60));
            assert_eq!(settings.http.idle_timeout, Duration::from_secs(60));
            assert_eq!(settings.http.max_connections, 4096);
            let delay = match environment {
                Environment::Local => Duration::ZERO,
                Environment::Production => Duration::from_secs(5),
            };
            assert_eq!(settings.http.shutdown_delay, delay);
            assert_eq!(settings.query.max_waiters, 1024);
            assert_eq!(settings.query.wait_recheck, Duration::from_secs(5));
            assert_eq!(settings.runs.stuck_after, Duration::from_secs(3600));
            let retention = &settings.retention;
            assert_eq!(retention.payloads, Some(Duration::from_secs(90 * 86_400)));
            assert_eq!(retention.runs, None);
            assert_eq!(retention.rejected, Some(Duration::from_secs(30 * 86_400)));
            assert_eq!(retention.sweep_interval, Duration::from_secs(60));
        }
    }
}

#[test]
fn the_hardening_and_operations_settings_have_their_documented_variables() {
    let settings = local_with(&[
        ("NEN_RELAY_OPS_BIND", "127.0.0.1:9090"),
        ("NEN_RELAY_HTTP__IDLE_TIMEOUT_MS", "1500"),
        ("NEN_RELAY_HTTP__MAX_CONNECTIONS", "512"),
        ("NEN_RELAY_HTTP__SHUTDOWN_DELAY_MS", "250"),
        ("NEN_RELAY_WEBHOOK__MAX_INFLIGHT_BODY_BYTES", "8388608"),
        ("NEN_RELAY_STORE__MIGRATE_LOCK_TIMEOUT_MS", "3000"),
        ("NEN_RELAY_QUERY__MAX_WAITERS", "64"),
        ("NEN_RELAY_QUERY__WAIT_RECHECK", "1h"),
        ("NEN_RELAY_RUNS__STUCK_AFTER", "2h"),
        ("NEN_RELAY_RETENTION__PAYLOADS", "30d"),
        ("NEN_RELAY_RETENTION__RUNS", "365d"),
        ("NEN_RELAY_RETENTION__REJECTED", "off"),
        ("NEN_RELAY_RETENTION__SWEEP_INTERVAL", "30s"),
    ])
    .unwrap();
    assert_eq!(settings.ops_bind.unwrap().to_string(), "127.0.0.1:9090");
    assert_eq!(settings.http.idle_timeout, Duration::from_millis(1500));
    assert_eq!(settings.http.max_connections, 512);
    assert_eq!(settings.http.shutdown_delay, Duration::from_millis(250));
    assert_eq!(settings.webhook.max_inflight_body_bytes, 8 * 1024 * 1024);
    assert_eq!(settings.store.migrate_lock_timeout, Duration::from_secs(3));
    assert_eq!(settings.query.max_waiters, 64);
    assert_eq!(settings.query.wait_recheck, Duration::from_secs(3600));
    assert_eq!(settings.runs.stuck_after, Duration::from_secs(7200));
    assert_eq!(
        settings.retention.payloads,
        Some(Duration::from_secs(30 * 86_400))
    );
    assert_eq!(
        settings.retention.runs,
        Some(Duration::from_secs(365 * 86_400))
    );
    assert_eq!(settings.retention.rejected, None);
    assert_eq!(settings.retention.sweep_interval, Duration::from_secs(30));
}

#[test]
fn limits_that_could_never_work_are_refused_and_named() {
    for (pairs, named) in [
        (
            &[("NEN_RELAY_WEBHOOK__MAX_INFLIGHT_BODY_BYTES", "1000")][..],
            "webhook.max_inflight_body_bytes",
        ),
        (
            &[("NEN_RELAY_HTTP__MAX_CONNECTIONS", "0")][..],
            "http.max_connections",
        ),
        (
            &[("NEN_RELAY_QUERY__MAX_WAITERS", "0")][..],
            "query.max_waiters",
        ),
        (
            &[("NEN_RELAY_QUERY__WAIT_RECHECK", "0s")][..],
            "query.wait_recheck",
        ),
        (
            &[("NEN_RELAY_RETENTION__SWEEP_INTERVAL", "0s")][..],
            "retention.sweep_interval",
        ),
        (
            &[("NEN_RELAY_OPS_BIND", "127.0.0.1:8080")][..],
            "NEN_RELAY_OPS_BIND",
        ),
        (&[("NEN_RELAY_RETENTION__RUNS", "never")][..], "never"),
    ] {
        let message = error_text(local_with(pairs));
        assert!(message.contains(named), "{pairs:?}: {message}");
    }
}

#[test]
fn the_store_options_carry_the_store_settings() {
    let settings = local_with(&[
        ("NEN_RELAY_STORE__MAX_CONNECTIONS", "3"),
        ("NEN_RELAY_STORE__ACQUIRE_TIMEOUT", "250ms"),
        ("NEN_RELAY_STORE__STATEMENT_TIMEOUT", "4s"),
    ])
    .unwrap();
    let options = settings.store.options();
    assert_eq!(options.max_connections, 3);
    assert_eq!(options.acquire_timeout, Duration::from_millis(250));
    assert_eq!(options.statement_timeout, Duration::from_secs(4));
}

#[test]
fn durations_are_written_with_their_unit() {
    let dir = config_dir_with(&[(
        "default.toml",
        "[http]\nheader_read_timeout = \"1500ms\"\nshutdown_timeout = \"2m\"\n",
    )]);
    let settings = Settings::from_sources(
        Environment::Local,
        dir.path(),
        &vars(&[
            ("NEN_RELAY_WEBHOOK__ACK_TIMEOUT", "3s"),
            ("NEN_RELAY_TRIGGER__IDEMPOTENCY_TTL", "90d"),
            ("NEN_RELAY_NEN__TIMEOUT", "1m 30s"),
        ]),
    )
    .unwrap();
    assert_eq!(
        settings.http.header_read_timeout,
        Duration::from_millis(1500)
    );
    assert_eq!(settings.http.shutdown_timeout, Duration::from_secs(120));
    assert_eq!(settings.webhook.ack_timeout, Duration::from_secs(3));
    assert_eq!(
        settings.trigger.idempotency_ttl,
        Duration::from_secs(90 * 86_400)
    );
    assert_eq!(settings.nen.timeout, Duration::from_secs(90));

    // A bare number has no unit: refused, naming where it was written.
    let error = error_text(local_with(&[("NEN_RELAY_HTTP__HEADER_READ_TIMEOUT", "10")]));
    assert!(
        error.contains("NEN_RELAY_HTTP__HEADER_READ_TIMEOUT"),
        "{error}"
    );
    let dir = config_dir_with(&[("local.toml", "[webhook]\nbody_timeout = 10\n")]);
    let error = error_text(Settings::from_sources(
        Environment::Local,
        dir.path(),
        &vars(&[]),
    ));
    assert!(error.contains("webhook.body_timeout"), "{error}");
    assert!(error.contains("local.toml"), "{error}");
}

#[test]
fn every_millisecond_variable_still_works() {
    let settings = local_with(&[
        ("NEN_RELAY_WEBHOOK__BODY_TIMEOUT_MS", "11"),
        ("NEN_RELAY_WEBHOOK__ACK_TIMEOUT_MS", "12"),
        ("NEN_RELAY_STORE__ACQUIRE_TIMEOUT_MS", "13"),
        ("NEN_RELAY_STORE__STATEMENT_TIMEOUT_MS", "14"),
        ("NEN_RELAY_HTTP__HEADER_READ_TIMEOUT_MS", "10000"),
        ("NEN_RELAY_HTTP__SHUTDOWN_TIMEOUT_MS", "16"),
        ("NEN_RELAY_NEN__CONNECT_TIMEOUT_MS", "17"),
        ("NEN_RELAY_NEN__TIMEOUT_MS", "18"),
        ("NEN_RELAY_TRIGGER__IDEMPOTENCY_TTL_HOURS", "48"),
    ])
    .unwrap();
    let ms = Duration::from_millis;
    assert_eq!(settings.webhook.body_timeout, ms(11));
    assert_eq!(settings.webhook.ack_timeout, ms(12));
    assert_eq!(settings.store.acquire_timeout, ms(13));
    assert_eq!(settings.store.statement_timeout, ms(14));
    assert_eq!(settings.http.header_read_timeout, ms(10_000));
    assert_eq!(settings.http.shutdown_timeout, ms(16));
    assert_eq!(settings.nen.connect_timeout, ms(17));
    assert_eq!(settings.nen.timeout, ms(18));
    assert_eq!(
        settings.trigger.idempotency_ttl,
        Duration::from_secs(48 * 3600)
    );

    let error = error_text(local_with(&[(
        "NEN_RELAY_HTTP__HEADER_READ_TIMEOUT_MS",
        "10s",
    )]));
    assert!(
        error.contains("NEN_RELAY_HTTP__HEADER_READ_TIMEOUT_MS"),
        "{error}"
    );
    assert!(error.contains("milliseconds"), "{error}");
}

#[test]
fn a_config_file_written_for_milliseconds_still_works() {
    // The keys of config/default.toml before durations carried their unit.
    let old = "[webhook]\nbody_timeout_ms = 21\nack_timeout_ms = 22\n\
               [store]\nacquire_timeout_ms = 23\nstatement_timeout_ms = 24\n\
               [http]\nheader_read_timeout_ms = 25\nshutdown_timeout_ms = 26\n\
               [nen]\nconnect_timeout_ms = 27\ntimeout_ms = 28\n\
               [trigger]\nidempotency_ttl_hours = 29\n";
    let dir = config_dir_with(&[("default.toml", old)]);
    let settings = Settings::from_sources(Environment::Local, dir.path(), &vars(&[])).unwrap();
    let ms = Duration::from_millis;
    assert_eq!(settings.webhook.body_timeout, ms(21));
    assert_eq!(settings.webhook.ack_timeout, ms(22));
    assert_eq!(settings.store.acquire_timeout, ms(23));
    assert_eq!(settings.store.statement_timeout, ms(24));
    assert_eq!(settings.http.header_read_timeout, ms(25));
    assert_eq!(settings.http.shutdown_timeout, ms(26));
    assert_eq!(settings.nen.connect_timeout, ms(27));
    assert_eq!(settings.nen.timeout, ms(28));
    assert_eq!(
        settings.trigger.idempotency_ttl,
        Duration::from_secs(29 * 3600)
    );

    // A later layer may use the other spelling: it wins like any later layer.
    let settings = Settings::from_sources(
        Environment::Local,
        dir.path(),
        &vars(&[("NEN_RELAY_HTTP__HEADER_READ_TIMEOUT", "7s")]),
    )
    .unwrap();
    assert_eq!(settings.http.header_read_timeout, Duration::from_secs(7));
}

#[test]
fn both_spellings_of_a_duration_are_an_error_naming_both() {
    let error = error_text(local_with(&[
        ("NEN_RELAY_HTTP__HEADER_READ_TIMEOUT_MS", "10000"),
        ("NEN_RELAY_HTTP__HEADER_READ_TIMEOUT", "10s"),
    ]));
    assert!(
        error.contains("NEN_RELAY_HTTP__HEADER_READ_TIMEOUT_MS"),
        "{error}"
    );
    assert!(
        error.contains("NEN_RELAY_HTTP__HEADER_READ_TIMEOUT and"),
        "{error}"
    );

    let dir = config_dir_with(&[(
        "default.toml",
        "[store]\nstatement_timeout_ms = 1500\nstatement_timeout = \"2s\"\n",
    )]);
    let error = error_text(Settings::from_sources(
        Environment::Local,
        dir.path(),
        &vars(&[]),
    ));
    assert!(error.contains("`store.statement_timeout_ms`"), "{error}");
    assert!(error.contains("`store.statement_timeout`"), "{error}");
}

#[test]
fn any_millisecond_key_maps_to_its_duration_key() {
    // No setting named `http.linger_timeout` exists: the error shows that the variable was
    // read as that duration, and names the variable as it was written.
    let error = error_text(local_with(&[(
        "NEN_RELAY_HTTP__LINGER_TIMEOUT_MS",
        "60000",
    )]));
    assert!(
        error.contains("NEN_RELAY_HTTP__LINGER_TIMEOUT_MS"),
        "{error}"
    );
    assert!(error.contains("`linger_timeout`"), "{error}");
}

#[test]
fn every_documented_variable_sets_its_setting() {
    let settings = production_with(&[
        ("NEN_RELAY_BIND", "127.0.0.1:9100"),
        ("DATABASE_URL", "postgres://relay@db.internal/relay"),
        ("NEN_API_KEY", "nen-key"),
        ("NEN_API_BASE_URL", "http://127.0.0.1:9200/api"),
        ("NEN_SIGNING_KEY", "signing-key"),
        ("NEN_RELAY_PUBLIC_URL", "https://relay.example.com"),
        ("NEN_RELAY_LOG_FORMAT", "pretty"),
    ])
    .unwrap();
    assert_eq!(settings.bind.to_string(), "127.0.0.1:9100");
    assert_eq!(
        settings.database_url.expose_secret(),
        "postgres://relay@db.internal/relay"
    );
    assert_eq!(
        secrets_as_strs(&settings.webhook_secrets).collect::<Vec<_>>(),
        [SECRET]
    );
    assert_eq!(
        secrets_as_strs(&settings.api_tokens).collect::<Vec<_>>(),
        [TOKEN]
    );
    assert_eq!(settings.nen.api_key.unwrap().expose_secret(), "nen-key");
    assert_eq!(settings.nen.base_url.as_str(), "http://127.0.0.1:9200/api");
    assert_eq!(
        settings.nen.signing_key.unwrap().expose_secret(),
        "signing-key"
    );
    assert_eq!(
        settings.public_url.unwrap().as_str(),
        "https://relay.example.com/"
    );
    assert_eq!(settings.log_format, LogFormat::Pretty);
}

#[test]
fn every_tunable_has_a_variable() {
    let settings = local_with(&[
        ("NEN_RELAY_WEBHOOK__MAX_BODY_BYTES", "2048"),
        ("NEN_RELAY_INGEST__WRITERS", "3"),
        ("NEN_RELAY_INGEST__MAX_BATCH", "128"),
        ("NEN_RELAY_INGEST__QUEUE_CAPACITY", "99"),
        ("NEN_RELAY_STORE__MIGRATE_ON_START", "false"),
        ("NEN_RELAY_HTTP__MAX_IN_FLIGHT", "7"),
        ("NEN_RELAY_TRIGGER__STORE_WORKFLOW_PARAMS", "true"),
        ("NEN_RELAY_NEN__BASE_URL", "https://nen.example.com"),
    ])
    .unwrap();
    assert_eq!(settings.webhook.max_body_bytes, 2048);
    let ingest = &settings.ingest;
    assert_eq!(
        (ingest.writers, ingest.max_batch, ingest.queue_capacity),
        (3, 128, 99)
    );
    assert!(!settings.store.migrate_on_start);
    assert_eq!(settings.http.max_in_flight, 7);
    assert!(settings.trigger.store_workflow_params);
    assert_eq!(settings.nen.base_url.as_str(), "https://nen.example.com/");
}

#[test]
fn a_documented_variable_and_its_tunable_form_are_not_both_allowed() {
    let error = error_text(local_with(&[
        ("NEN_API_BASE_URL", "https://a.example.com"),
        ("NEN_RELAY_NEN__BASE_URL", "https://b.example.com"),
    ]));
    assert!(error.contains("NEN_API_BASE_URL"), "{error}");
    assert!(error.contains("NEN_RELAY_NEN__BASE_URL"), "{error}");
}

#[test]
fn every_secret_can_come_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let database = file("database", "postgres://relay:pw@db/relay\n");
    let secrets = file("secrets", "whsec-1-long-enough,whsec-2-long-enough\r\n");
    let tokens = file("tokens", "token-1-long-enough\n\n");
    let api_key = file("api-key", "key-from-file");
    let signing_key = file("signing-key", "signing-from-file\n");
    let settings = Settings::from_sources(
        Environment::Production,
        &no_files(),
        &vars(&[
            ("DATABASE_URL_FILE", &database),
            ("NEN_WEBHOOK_SECRETS_FILE", &secrets),
            ("NEN_RELAY_API_TOKENS_FILE", &tokens),
            ("NEN_API_KEY_FILE", &api_key),
            ("NEN_SIGNING_KEY_FILE", &signing_key),
        ]),
    )
    .unwrap();
    assert_eq!(
        settings.database_url.expose_secret(),
        "postgres://relay:pw@db/relay"
    );
    assert_eq!(
        secrets_as_strs(&settings.webhook_secrets).collect::<Vec<_>>(),
        ["whsec-1-long-enough", "whsec-2-long-enough"]
    );
    assert_eq!(
        secrets_as_strs(&settings.api_tokens).collect::<Vec<_>>(),
        ["token-1-long-enough"]
    );
    assert_eq!(
        settings.nen.api_key.unwrap().expose_secret(),
        "key-from-file"
    );
    assert_eq!(
        settings.nen.signing_key.unwrap().expose_secret(),
        "signing-from-file"
    );

    // The tunable form of a secret has a file form too.
    let settings = local_with(&[("NEN_RELAY_NEN__SIGNING_KEY_FILE", &signing_key)]).unwrap();
    assert_eq!(
        settings.nen.signing_key.unwrap().expose_secret(),
        "signing-from-file"
    );

    // Both forms: refused, naming both.
    let error = error_text(production_with(&[
        ("NEN_RELAY_API_TOKENS_FILE", &tokens),
        ("NEN_RELAY_API_TOKENS", "t"),
    ]));
    assert!(
        error.contains("NEN_RELAY_API_TOKENS and NEN_RELAY_API_TOKENS_FILE"),
        "{error}"
    );
    let error = error_text(local_with(&[
        ("NEN_RELAY_NEN__SIGNING_KEY_FILE", &signing_key),
        ("NEN_SIGNING_KEY", "k"),
    ]));
    assert!(error.contains("NEN_SIGNING_KEY "), "{error}");
    assert!(error.contains("NEN_RELAY_NEN__SIGNING_KEY_FILE"), "{error}");

    // An unreadable file names the variable.
    let error = error_text(local_with(&[("DATABASE_URL_FILE", "/nonexistent/url")]));
    assert!(error.contains("DATABASE_URL_FILE"), "{error}");

    // Only secrets are read from files.
    let error = error_text(local_with(&[("NEN_RELAY_NEN__BASE_URL_FILE", &api_key)]));
    assert!(error.contains("NEN_RELAY_NEN__BASE_URL_FILE"), "{error}");
}

#[test]
fn unknown_keys_are_refused_and_named() {
    for (variable, key) in [
        ("NEN_RELAY_INGEST__MAX_BACH", "max_bach"),
        ("NEN_RELAY_INGST__MAX_BATCH", "ingst"),
        ("NEN_RELAY_NEN__API_KEY_FILE_PATH", "api_key_file_path"),
    ] {
        let error = error_text(local_with(&[(variable, "1")]));
        assert!(error.contains(variable), "{error}");
        assert!(error.contains(key), "{error}");
    }
    for (file, text, key) in [
        ("default.toml", "colour = \"blue\"\n", "colour"),
        (
            "local.toml",
            "[http]\nmax_inflight = 3\n",
            "http.max_inflight",
        ),
        ("default.toml", "[archive]\nafter = \"90d\"\n", "archive"),
    ] {
        let dir = config_dir_with(&[(file, text)]);
        let error = error_text(Settings::from_sources(
            Environment::Local,
            dir.path(),
            &vars(&[]),
        ));
        assert!(error.contains(key), "{error}");
        assert!(error.contains(file), "{error}");
    }
}

#[test]
fn variables_that_are_not_settings_are_left_alone() {
    let settings = local_with(&[
        ("NEN_RELAY_ENV", "local"),
        ("NEN_RELAY_CONFIG_DIR", "/somewhere"),
        (
            "NEN_RELAY_TEST_POSTGRES_URL",
            "postgres://postgres@127.0.0.1/postgres",
        ),
        ("PATH", "/usr/bin"),
    ]);
    assert!(settings.is_ok(), "{:?}", settings.err());
}

#[test]
fn secrets_that_look_like_numbers_stay_text() {
    // Local: production would refuse a token this short.
    let settings = local_with(&[
        ("NEN_API_KEY", "0012"),
        ("NEN_RELAY_NEN__SIGNING_KEY", "1e3"),
        ("NEN_RELAY_API_TOKENS", "true"),
    ])
    .unwrap();
    assert_eq!(settings.nen.api_key.unwrap().expose_secret(), "0012");
    assert_eq!(settings.nen.signing_key.unwrap().expose_secret(), "1e3");
    assert_eq!(
        secrets_as_strs(&settings.api_tokens).collect::<Vec<_>>(),
        ["true"]
    );
}

#[test]
fn lists_may_be_toml_arrays_or_comma_separated_text() {
    for text in [
        "webhook_secrets = [\"a\", \" b \"]\n",
        "webhook_secrets = \"a, b\"\n",
    ] {
        let dir = config_dir_with(&[("local.toml", text)]);
        let settings = Settings::from_sources(Environment::Local, dir.path(), &vars(&[])).unwrap();
        assert_eq!(
            secrets_as_strs(&settings.webhook_secrets).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert!(settings
            .generated
            .iter()
            .all(|(name, _)| *name != "NEN_WEBHOOK_SECRETS"));
    }
}

#[test]
fn a_secret_that_does_not_fit_is_not_echoed() {
    let dir = config_dir_with(&[(
        "local.toml",
        "api_tokens = [424242]\n[nen]\nsigning_key = 777777\n",
    )]);
    let error = error_text(Settings::from_sources(
        Environment::Local,
        dir.path(),
        &vars(&[]),
    ));
    assert!(error.contains("api_tokens"), "{error}");
    assert!(!error.contains("424242"), "{error}");
    let dir = config_dir_with(&[("local.toml", "[nen]\nsigning_key = 777777\n")]);
    let error = error_text(Settings::from_sources(
        Environment::Local,
        dir.path(),
        &vars(&[]),
    ));
    assert!(error.contains("nen.signing_key"), "{error}");
    assert!(!error.contains("777777"), "{error}");
}

#[test]
fn bad_tunable_values_name_the_variable() {
    for (variable, value) in [
        ("NEN_RELAY_INGEST__MAX_BATCH", "lots"),
        ("NEN_RELAY_STORE__MIGRATE_ON_START", "maybe"),
        ("NEN_RELAY_LOG_FORMAT", "xml"),
        ("NEN_RELAY_PUBLIC_URL", "relay.example.com"),
        ("NEN_API_BASE_URL", "ftp://nen.example.com"),
        ("NEN_RELAY_WEBHOOK__MAX_BODY_BYTES", "0"),
    ] {
        let error = error_text(local_with(&[(variable, value)]));
        let key = variable
            .trim_start_matches("NEN_RELAY_")
            .to_ascii_lowercase()
            .replace("__", ".");
        assert!(
            error.contains(variable) || error.contains(&key),
            "{variable}: {error}"
        );
    }
}

#[test]
fn zero_counts_and_ttl_read_as_the_smallest_useful_value() {
    let settings = local_with(&[
        ("NEN_RELAY_STORE__MAX_CONNECTIONS", "0"),
        ("NEN_RELAY_HTTP__MAX_IN_FLIGHT", "0"),
        ("NEN_RELAY_TRIGGER__IDEMPOTENCY_TTL_HOURS", "0"),
    ])
    .unwrap();
    assert_eq!(settings.store.max_connections, 1);
    assert_eq!(settings.http.max_in_flight, 1);
    assert_eq!(settings.trigger.idempotency_ttl, Duration::from_secs(3600));
}

#[test]
fn the_environment_file_of_the_folder_overrides_the_built_in_one() {
    let dir = config_dir_with(&[
        ("default.toml", "log_format = \"pretty\"\n"),
        (
            "production.toml",
            "log_format = \"pretty\"\nbind = \"0.0.0.0:9000\"\n",
        ),
    ]);
    let settings = Settings::from_sources(
        Environment::Production,
        dir.path(),
        &vars(&[
            ("NEN_WEBHOOK_SECRETS", SECRET),
            ("NEN_RELAY_API_TOKENS", TOKEN),
        ]),
    )
    .unwrap();
    assert_eq!(settings.log_format, LogFormat::Pretty);
    assert_eq!(settings.bind.port(), 9000);
    // The folder's default.toml sits above every built-in file, production's included.
    let dir = config_dir_with(&[("default.toml", "log_format = \"pretty\"\n")]);
    let settings = Settings::from_sources(
        Environment::Production,
        dir.path(),
        &vars(&[
            ("NEN_WEBHOOK_SECRETS", SECRET),
            ("NEN_RELAY_API_TOKENS", TOKEN),
        ]),
    )
    .unwrap();
    assert_eq!(settings.log_format, LogFormat::Pretty);
}

#[test]
fn the_health_check_finds_the_bind_address_without_secrets() {
    let production = bind_from_sources(Environment::Production, &no_files(), &vars(&[]));
    assert_eq!(production.unwrap().to_string(), "0.0.0.0:8080");
    let local = bind_from_sources(Environment::Local, &no_files(), &vars(&[]));
    assert_eq!(local.unwrap().to_string(), "127.0.0.1:8080");
    let dir = config_dir_with(&[("production.toml", "bind = \"0.0.0.0:9443\"\n")]);
    let from_file = bind_from_sources(
        Environment::Production,
        dir.path(),
        &vars(&[("NEN_RELAY_INGEST__NONSENSE", "x")]),
    );
    assert_eq!(from_file.unwrap().port(), 9443);
    let from_variable = bind_from_sources(
        Environment::Production,
        dir.path(),
        &vars(&[("NEN_RELAY_BIND", "127.0.0.1:7000")]),
    );
    assert_eq!(from_variable.unwrap().port(), 7000);
}

#[test]
fn production_refuses_a_clear_text_nen_api_base_url_unless_it_is_loopback() {
    for remote in [
        "http://api.getnen.ai",
        "http://10.0.0.7:8080/api",
        "http://[2001:db8::1]/",
        "http://localhost.example.com/",
        "http://128.0.0.1/",
    ] {
        let error = error_text(production_with(&[("NEN_API_BASE_URL", remote)]));
        assert!(error.contains("NEN_API_BASE_URL"), "{remote}: {error}");
        assert!(!error.contains('\n'), "{remote}: {error}");
        // Allowed locally.
        assert!(
            local_with(&[("NEN_API_BASE_URL", remote)]).is_ok(),
            "{remote}"
        );
    }
    for allowed in [
        "https://api.getnen.ai",
        "https://10.0.0.7/",
        "http://127.0.0.1:9200/api",
        "http://127.255.0.9/",
        "http://[::1]:9200/",
        "http://localhost:9200/",
        "http://LOCALHOST/",
    ] {
        let settings = production_with(&[("NEN_API_BASE_URL", allowed)]);
        assert!(settings.is_ok(), "{allowed}: {:?}", settings.err());
    }
}

#[test]
fn production_refuses_short_secrets_naming_the_variable_and_never_the_value() {
    let short = "short-secret-15";
    assert_eq!(short.len(), MIN_SECRET_BYTES - 1);
    let exactly = "sixteen-bytes-ok";
    assert_eq!(exactly.len(), MIN_SECRET_BYTES);
    for name in ["NEN_WEBHOOK_SECRETS", "NEN_RELAY_API_TOKENS"] {
        for list in [short.to_owned(), format!("{exactly},{short}")] {
            let error = error_text(production_with(&[(name, &list)]));
            assert!(error.contains(name), "{error}");
            assert!(error.contains("16 bytes"), "{error}");
            assert!(!error.contains(short), "{error}");
            assert!(!error.contains(exactly), "{error}");
            assert!(!error.contains("second") && !error.contains('2'), "{error}");
            assert!(!error.contains('\n'), "{error}");
            // Allowed locally.
            assert!(local_with(&[(name, &list)]).is_ok(), "{name}");
        }
        assert!(production_with(&[(name, exactly)]).is_ok(), "{name}");
    }
    // From a file too.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokens");
    std::fs::write(&path, format!("{exactly},{short}\n")).unwrap();
    let error = error_text(production_with(&[
        ("NEN_RELAY_API_TOKENS", ""),
        ("NEN_RELAY_API_TOKENS_FILE", path.to_str().unwrap()),
    ]));
    assert!(error.contains("NEN_RELAY_API_TOKENS"), "{error}");
    assert!(!error.contains(short), "{error}");
}

#[test]
fn the_fingerprint_key_is_an_optional_secret_with_a_file_form() {
    assert!(local_with(&[]).unwrap().trigger.fingerprint_key.is_none());
    let settings =
        production_with(&[("NEN_RELAY_TRIGGER__FINGERPRINT_KEY", "fingerprint-key-0123")]).unwrap();
    assert_eq!(
        settings.trigger.fingerprint_key.unwrap().expose_secret(),
        "fingerprint-key-0123"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fingerprint");
    std::fs::write(&path, "fingerprint-from-file\n").unwrap();
    let settings = production_with(&[(
        "NEN_RELAY_TRIGGER__FINGERPRINT_KEY_FILE",
        path.to_str().unwrap(),
    )])
    .unwrap();
    assert_eq!(
        settings.trigger.fingerprint_key.unwrap().expose_secret(),
        "fingerprint-from-file"
    );
    let error = error_text(production_with(&[(
        "NEN_RELAY_TRIGGER__FINGERPRINT_KEY",
        "too-short",
    )]));
    assert!(
        error.contains("NEN_RELAY_TRIGGER__FINGERPRINT_KEY"),
        "{error}"
    );
    assert!(!error.contains("too-short"), "{error}");
    assert!(local_with(&[("NEN_RELAY_TRIGGER__FINGERPRINT_KEY", "short")]).is_ok());
    let shown = format!(
        "{:?}",
        local_with(&[("NEN_RELAY_TRIGGER__FINGERPRINT_KEY", "fingerprint-debug")]).unwrap()
    );
    assert!(!shown.contains("fingerprint-debug"), "{shown}");
}

#[test]
fn variables_that_look_like_ours_but_set_nothing_are_found() {
    let found = variables::unrecognised(&vars(&[
        ("NEN_WEBHOOK_SECRET", "typo"),
        ("NEN_WEBHOOK_SECRETS", "right"),
        ("NEN_API_KEY_FILE", "/run/secrets/nen"),
        ("NEN_RELAY_ENV", "production"),
        ("NEN_RELAY_CONFIG_DIR", "/etc/nen-relay"),
        ("NEN_RELAY_TOKEN", "for nen-relay wait"),
        ("NEN_RELAY_HTTP__MAX_CONNECTIONS", "10"),
        ("NEN_RELAY_BINDD", "0.0.0.0:1"),
        ("PATH", "/usr/bin"),
    ]));
    assert_eq!(found, ["NEN_RELAY_BINDD", "NEN_WEBHOOK_SECRET"]);
}

#[test]
fn an_api_key_that_cannot_be_a_header_is_refused_without_echoing_it() {
    let message = error_text(local_with(&[("NEN_API_KEY", "key-with\u{7}-bell")]));
    assert!(message.contains("NEN_API_KEY"), "{message}");
    assert!(!message.contains("key-with"), "{message}");
    assert!(local_with(&[("NEN_API_KEY", "an ordinary key")]).is_ok());
}

const FORWARD_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

#[test]
fn forward_targets_come_from_the_environment_with_their_secret_in_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("orders-secret");
    std::fs::write(&secret_file, format!("{FORWARD_SECRET}\n")).unwrap();
    let settings = Settings::from_sources(
        Environment::Local,
        &no_files(),
        &vars(&[
            (
                "NEN_RELAY_FORWARD__ORDERS__URL",
                "https://orders.test/hooks",
            ),
            (
                "NEN_RELAY_FORWARD__ORDERS__SECRET_FILE",
                secret_file.to_str().unwrap(),
            ),
            ("NEN_RELAY_FORWARD__PAGER__URL", "http://127.0.0.1:9/p"),
            ("NEN_RELAY_FORWARD__PAGER__SECRET", FORWARD_SECRET),
            ("NEN_RELAY_FORWARD__MAX_AGE", "1h"),
        ]),
    )
    .unwrap();
    let names: Vec<&str> = settings
        .forward
        .targets
        .iter()
        .map(|t| t.name.as_str())
        .collect();
    assert_eq!(names, ["orders", "pager"]);
    assert_eq!(settings.forward.targets[0].key().len(), 24);
    assert_eq!(settings.forward.max_age, Duration::from_secs(3600));
    assert_eq!(
        settings.store_options().forward_targets,
        ["orders", "pager"]
    );
    assert!(!format!("{settings:?}").contains("MfKQ"));
    let none = Settings::from_sources(Environment::Local, &no_files(), &vars(&[])).unwrap();
    assert!(none.forward.targets.is_empty());
    assert!(none.store_options().forward_targets.is_empty());
}

#[test]
fn a_bad_forward_target_refuses_the_start_naming_it() {
    for (variables, named) in [
        (
            vec![("NEN_RELAY_FORWARD__ORDERS__URL", "https://o.test/h")],
            "\"orders\" has no secret",
        ),
        (
            vec![
                ("NEN_RELAY_FORWARD__ORDERS__URL", "https://o.test/h"),
                ("NEN_RELAY_FORWARD__ORDERS__SECRET", "not-whsec-0123456789"),
            ],
            "whsec_",
        ),
        (
            vec![("NEN_RELAY_FORWARD__ORDERS__SECRET", FORWARD_SECRET)],
            "\"orders\" has no url",
        ),
        (
            vec![
                ("NEN_RELAY_FORWARD__ORDERS__URL", "https://o.test/h"),
                ("NEN_RELAY_FORWARD__ORDERS__SECRET", FORWARD_SECRET),
                ("NEN_RELAY_FORWARD__ORDERS__COLOUR", "blue"),
            ],
            "colour",
        ),
    ] {
        let error = Settings::from_sources(Environment::Local, &no_files(), &vars(&variables))
            .unwrap_err()
            .to_string();
        assert!(error.contains(named), "{error}");
        assert!(
            !error.contains("not-whsec") && !error.contains("MfKQ"),
            "{error}"
        );
    }
    let cleartext = Settings::from_sources(
        Environment::Production,
        &no_files(),
        &vars(&[
            ("NEN_WEBHOOK_SECRETS", SECRET),
            ("NEN_RELAY_API_TOKENS", TOKEN),
            ("NEN_RELAY_FORWARD__ORDERS__URL", "http://orders.internal/h"),
            ("NEN_RELAY_FORWARD__ORDERS__SECRET", FORWARD_SECRET),
        ]),
    )
    .unwrap_err()
    .to_string();
    assert!(
        cleartext.contains("\"orders\"") && cleartext.contains("https://"),
        "{cleartext}"
    );
}
