//! The real application on 127.0.0.1:0 with a fresh database, and request helpers.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use nen_relay::app::Application;
use nen_relay::callbacks::signature::sign;
use nen_relay::config::{Environment, Settings};
use nen_relay::store::{self, Store};
use reqwest::{Response, StatusCode};
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::backends::TestDatabase;
use super::logs;

/// A running nen-relay with unique secrets and tokens.
pub struct TestApp {
    pub address: String,
    /// `http://127.0.0.1:<port>` of the ops listener, when `NEN_RELAY_OPS_BIND` was given.
    pub ops_address: Option<String>,
    pub client: reqwest::Client,
    /// The configured webhook secrets; the first signs by default.
    pub secrets: Vec<String>,
    pub tokens: Vec<String>,
    pub store: Arc<dyn Store>,
    pub db: TestDatabase,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<anyhow::Result<()>>>,
}

/// Variables every test app gets; tests add or override through `spawn_with`.
fn base_variables(
    db: &TestDatabase,
    secrets: &[String],
    tokens: &[String],
) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("NEN_RELAY_BIND".into(), "127.0.0.1:0".into()),
        ("DATABASE_URL".into(), db.url.clone()),
        ("NEN_WEBHOOK_SECRETS".into(), secrets.join(",")),
        ("NEN_RELAY_API_TOKENS".into(), tokens.join(",")),
    ])
}

impl TestApp {
    pub async fn spawn(db: TestDatabase) -> TestApp {
        Self::spawn_with(db, |_| {}).await
    }

    /// `adjust` may change the variables the settings are read from.
    pub async fn spawn_with(
        db: TestDatabase,
        adjust: impl FnOnce(&mut BTreeMap<String, String>),
    ) -> TestApp {
        Self::spawn_inner(db, adjust, None).await
    }

    /// Serves with `store` (e.g. a wrapper that fails or holds writes) instead of opening one.
    pub async fn spawn_with_store(db: TestDatabase, store: Arc<dyn Store>) -> TestApp {
        Self::spawn_inner(db, |_| {}, Some(store)).await
    }

    /// Serves with `store` and the variables `adjust` sets.
    pub async fn spawn_with_store_and(
        db: TestDatabase,
        store: Arc<dyn Store>,
        adjust: impl FnOnce(&mut BTreeMap<String, String>),
    ) -> TestApp {
        Self::spawn_inner(db, adjust, Some(store)).await
    }

    async fn spawn_inner(
        db: TestDatabase,
        adjust: impl FnOnce(&mut BTreeMap<String, String>),
        store: Option<Arc<dyn Store>>,
    ) -> TestApp {
        logs::capture();
        let unique = uuid::Uuid::new_v4().simple().to_string();
        let secrets = vec![format!("whsec-a-{unique}"), format!("whsec-b-{unique}")];
        let tokens = vec![format!("token-a-{unique}"), format!("token-b-{unique}")];
        let mut variables = base_variables(&db, &secrets, &tokens);
        adjust(&mut variables);
        let settings = Settings::from_sources(
            Environment::Local,
            Path::new("/nonexistent-nen-relay-config"),
            &variables,
        )
        .expect("valid test settings");
        let store = match store {
            Some(store) => store,
            None => store::connect(&settings.database_url, &settings.store_options(), true)
                .await
                .expect("the test database opens and migrates"),
        };
        let application = Application::build_with_store(settings, store.clone())
            .await
            .expect("the app builds");
        let address = format!("http://127.0.0.1:{}", application.port());
        let ops_address = application
            .ops_local_addr()
            .map(|ops| format!("http://{ops}"));
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(application.run_until_stopped(async move {
            let _ = stopped.await;
        }));
        TestApp {
            address,
            ops_address,
            client: reqwest::Client::new(),
            secrets,
            tokens,
            store,
            db,
            stop: Some(stop),
            server: Some(server),
        }
    }

    /// Sends SIGTERM's equivalent and waits for the server to finish in-flight work.
    pub async fn shutdown(&mut self) {
        self.begin_shutdown();
        self.wait_stopped().await;
    }

    /// Sends SIGTERM's equivalent without waiting.
    pub fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Waits for the server to finish, insisting on a clean stop.
    pub async fn wait_stopped(&mut self) {
        if let Some(server) = self.server.take() {
            server.await.expect("server task").expect("clean shutdown");
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.address, path)
    }

    /// `sha256=<hex>` with the first configured secret.
    pub fn signature(&self, body: &[u8]) -> String {
        sign(self.secrets[0].as_bytes(), body)
    }

    /// POSTs a callback signed with the first secret.
    pub async fn deliver(&self, body: &str) -> Response {
        self.deliver_with(body.as_bytes(), Some(&self.signature(body.as_bytes())))
            .await
    }

    /// POSTs raw bytes with the given signature header (or none).
    pub async fn deliver_with(&self, body: &[u8], signature: Option<&str>) -> Response {
        let mut request = self
            .client
            .post(self.url("/webhooks/nen"))
            .header("content-type", "application/json")
            .body(body.to_vec());
        if let Some(signature) = signature {
            request = request.header("X-Hmac-Signature", signature);
        }
        request.send().await.expect("the app answers")
    }

    /// Delivers and insists on 200; returns the acknowledgement.
    pub async fn deliver_ok(&self, body: &str) -> Value {
        let response = self.deliver(body).await;
        assert_eq!(response.status(), StatusCode::OK, "delivering {body}");
        response.json().await.expect("a JSON acknowledgement")
    }

    /// GET with the first bearer token.
    pub async fn get(&self, path: &str) -> Response {
        self.client
            .get(self.url(path))
            .bearer_auth(&self.tokens[0])
            .send()
            .await
            .expect("the app answers")
    }

    /// GET with the first token, insisting on 200 and JSON.
    pub async fn get_json(&self, path: &str) -> Value {
        let response = self.get(path).await;
        assert_eq!(response.status(), StatusCode::OK, "GET {path}");
        response.json().await.expect("a JSON body")
    }

    pub async fn run(&self, message_id: &str) -> Value {
        self.get_json(&format!("/v1/runs/{message_id}")).await
    }

    pub async fn events(&self, message_id: &str) -> Vec<Value> {
        let body = self
            .get_json(&format!("/v1/runs/{message_id}/events"))
            .await;
        body["events"].as_array().expect("an events list").clone()
    }

    /// Every secret this app was given, for leak checks.
    pub fn all_secrets(&self) -> Vec<String> {
        self.secrets.iter().chain(&self.tokens).cloned().collect()
    }
}

/// A callback body as Nen sends it.
pub fn callback(message_id: &str, status: &str, extra: Value) -> String {
    let mut body = serde_json::json!({
        "workflow_id": "12345678-1234-1234-1234-123456789abc",
        "message_id": message_id,
        "status": status,
    });
    if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
        body.extend(extra.clone());
    }
    body.to_string()
}

/// An error answer's `error` code, after checking the shape every error answer has.
pub async fn error_code(response: Response) -> String {
    let body: Value = response.json().await.expect("an error body in JSON");
    assert!(body["message"].is_string(), "error without message: {body}");
    body["error"].as_str().expect("an error code").to_owned()
}
