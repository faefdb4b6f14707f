//! The real `nen-relay` binary as a child process, for what must be measured on one process
//! alone: its memory, its metrics and its logs. An in-process `TestApp` shares all three with
//! every other test in this binary.

use std::collections::BTreeMap;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nen_relay::callbacks::signature::sign;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;

use super::backends::TestDatabase;

/// Bounds a start that hangs; a normal start takes well under a second.
const START_GUARD: Duration = Duration::from_secs(60);

/// A running `nen-relay serve` with one unique secret and token. Dropping it kills the process
/// (first: fields drop in order), then removes its database unless a replica still uses it.
pub struct RelayProcess {
    child: Child,
    pid: Pid,
    /// Every line the process wrote, stdout (its JSON log) and stderr alike.
    output: Arc<Mutex<Vec<String>>>,
    pub address: String,
    pub client: reqwest::Client,
    pub secret: String,
    pub token: String,
    /// Shared with the replicas started beside it (`start_replica_of`).
    pub db: Arc<TestDatabase>,
}

impl RelayProcess {
    /// Starts the binary on 127.0.0.1:0 with `db`, logging every level as JSON. `variables`
    /// add to or override its environment, which holds nothing else.
    pub async fn start(db: TestDatabase, variables: &[(&str, String)]) -> RelayProcess {
        let unique = uuid::Uuid::new_v4().simple().to_string();
        let secret = format!("whsec-process-{unique}");
        let token = format!("token-process-{unique}");
        Self::launch(Arc::new(db), secret, token, variables).await
    }

    /// Another replica of `first`: the same database, secret and token, a process of its own.
    pub async fn start_replica_of(
        first: &RelayProcess,
        variables: &[(&str, String)],
    ) -> RelayProcess {
        let (secret, token) = (first.secret.clone(), first.token.clone());
        Self::launch(first.db.clone(), secret, token, variables).await
    }

    async fn launch(
        db: Arc<TestDatabase>,
        secret: String,
        token: String,
        variables: &[(&str, String)],
    ) -> RelayProcess {
        let mut environment: BTreeMap<String, String> = BTreeMap::from([
            ("NEN_RELAY_BIND".into(), "127.0.0.1:0".into()),
            ("DATABASE_URL".into(), db.url.clone()),
            ("NEN_WEBHOOK_SECRETS".into(), secret.clone()),
            ("NEN_RELAY_API_TOKENS".into(), token.clone()),
            (
                "NEN_RELAY_CONFIG_DIR".into(),
                "/nonexistent-nen-relay-config".into(),
            ),
            ("NEN_RELAY_LOG_FORMAT".into(), "json".into()),
            (
                "RUST_LOG".into(),
                "trace,sqlx=info,hyper=info,h2=info,reqwest=info,rustls=info".into(),
            ),
        ]);
        for (name, value) in variables {
            environment.insert((*name).to_owned(), value.clone());
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_nen-relay"))
            .arg("serve")
            .env_clear()
            .envs(&environment)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("nen-relay starts");
        let pid = Pid::from_raw(
            child
                .id()
                .and_then(|id| i32::try_from(id).ok())
                .expect("a running child has a pid"),
        );
        let output = Arc::new(Mutex::new(Vec::new()));
        let (listening, address) = oneshot::channel();
        tokio::spawn(collect(
            child.stdout.take().expect("piped stdout"),
            output.clone(),
            Some(listening),
        ));
        tokio::spawn(collect(
            child.stderr.take().expect("piped stderr"),
            output.clone(),
            None,
        ));
        let address = match tokio::time::timeout(START_GUARD, address).await {
            Ok(Ok(address)) => address,
            _ => panic!(
                "nen-relay did not start listening; it wrote:\n{}",
                output.lock().unwrap().join("\n")
            ),
        };
        RelayProcess {
            child,
            pid,
            output,
            address: format!("http://{address}"),
            client: reqwest::Client::new(),
            secret,
            token,
            db,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.address, path)
    }

    /// `sha256=<hex>` with the process's secret.
    pub fn signature(&self, body: &[u8]) -> String {
        sign(self.secret.as_bytes(), body)
    }

    /// POSTs a signed callback.
    pub async fn deliver(&self, body: &str) -> reqwest::Response {
        self.client
            .post(self.url("/webhooks/nen"))
            .header("content-type", "application/json")
            .header("X-Hmac-Signature", self.signature(body.as_bytes()))
            .body(body.to_owned())
            .send()
            .await
            .expect("nen-relay answers")
    }

    /// GET with the token, insisting on 200 and JSON.
    pub async fn get_json(&self, path: &str) -> Value {
        let response = self
            .client
            .get(self.url(path))
            .bearer_auth(&self.token)
            .send()
            .await
            .expect("nen-relay answers");
        assert_eq!(response.status(), reqwest::StatusCode::OK, "GET {path}");
        response.json().await.expect("a JSON body")
    }

    /// The `/metrics` page: this process's figures alone.
    pub async fn metrics(&self) -> String {
        let response = self.client.get(self.url("/metrics")).send().await;
        let response = response.expect("nen-relay answers");
        assert_eq!(response.status(), reqwest::StatusCode::OK);
        response.text().await.expect("a text body")
    }

    /// Sets the peak of resident memory back to what is resident now, and returns that, in KiB.
    pub fn reset_peak_memory(&self) -> u64 {
        std::fs::write(format!("/proc/{}/clear_refs", self.pid), "5")
            .expect("the peak resident memory of a child can be reset");
        self.memory_kib("VmHWM")
    }

    /// The peak of resident memory since the last reset (or the start), in KiB.
    pub fn peak_memory_kib(&self) -> u64 {
        self.memory_kib("VmHWM")
    }

    fn memory_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .expect("the child's /proc status");
        status
            .lines()
            .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc/{}/status", self.pid))
    }

    /// Everything the process has written so far.
    pub fn output(&self) -> String {
        self.output.lock().unwrap().join("\n")
    }

    /// Sends SIGTERM, as a container runtime does, and waits for the process to exit.
    pub async fn stop(self) -> ExitStatus {
        self.terminate();
        self.wait().await.0
    }

    /// Sends SIGTERM without waiting.
    pub fn terminate(&self) {
        kill(self.pid, Signal::SIGTERM).expect("the child is still running");
    }

    /// Waits for the process to exit; returns how, and everything it wrote.
    pub async fn wait(mut self) -> (ExitStatus, String) {
        let status = self.child.wait().await.expect("the child exits");
        (status, self.output())
    }

    /// `http://<address>` of the ops listener (`NEN_RELAY_OPS_BIND`), from its start line.
    pub async fn ops_address(&self) -> String {
        let deadline = tokio::time::Instant::now() + START_GUARD;
        loop {
            let found = self.output.lock().unwrap().iter().find_map(|line| {
                let event: Value = serde_json::from_str(line).ok()?;
                (event["message"] == "operations endpoints listening")
                    .then(|| event["address"].as_str().map(str::to_owned))
                    .flatten()
            });
            if let Some(address) = found {
                return format!("http://{address}");
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no ops listener in:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Keeps every line of `stream`; reports the address of the "nen-relay listening" line.
async fn collect(
    stream: impl AsyncRead + Unpin,
    output: Arc<Mutex<Vec<String>>>,
    mut listening: Option<oneshot::Sender<String>>,
) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if listening.is_some() {
            let event: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
            if event["message"] == "nen-relay listening" {
                if let (Some(sender), Some(address)) = (listening.take(), event["address"].as_str())
                {
                    let _ = sender.send(address.to_owned());
                }
            }
        }
        output.lock().unwrap().push(line);
    }
}
