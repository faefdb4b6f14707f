//! The PostgreSQL server the suite's PostgreSQL half uses, found once per test binary: the
//! server at `NEN_RELAY_TEST_POSTGRES_URL` (default below) when it answers, or else a throwaway
//! cluster started from the installed server binaries. When neither can be had, every
//! PostgreSQL test fails with instructions: none passes without having run.

use std::io::Write;
use std::sync::OnceLock;
use std::time::Duration;

use sqlx::Connection;

use super::throwaway_cluster;

const URL_VARIABLE: &str = "NEN_RELAY_TEST_POSTGRES_URL";
const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A superuser URL of the server, for creating and dropping each test's database. Panics with
/// instructions when no server can be had.
pub async fn admin_url() -> &'static str {
    static SERVER: OnceLock<Result<String, String>> = OnceLock::new();
    // Finding the server blocks (it may run initdb): keep it off the test's async workers, and
    // on a thread of its own, where it may run a runtime of its own.
    let server = tokio::task::spawn_blocking(|| {
        SERVER.get_or_init(|| {
            std::thread::spawn(find)
                .join()
                .expect("finding a PostgreSQL server does not panic")
        })
    })
    .await
    .expect("finding a PostgreSQL server does not panic");
    match server {
        Ok(url) => url,
        Err(instructions) => panic!("{instructions}"),
    }
}

fn find() -> Result<String, String> {
    let configured = std::env::var(URL_VARIABLE).unwrap_or_else(|_| DEFAULT_URL.to_owned());
    let unanswered = match answers(&configured) {
        Ok(()) => {
            say(&format!(
                "The PostgreSQL half of the suite uses the server at {}.",
                without_password(&configured)
            ));
            return Ok(configured);
        }
        Err(error) => error,
    };
    let started = throwaway_cluster::start()
        .and_then(|cluster| answers(&cluster.admin_url).map(|()| cluster.admin_url));
    match started {
        Ok(url) => {
            say(&format!(
                "{} did not answer ({unanswered}); the PostgreSQL half of the suite uses a \
                 throwaway cluster at {url}, removed when the tests end.",
                without_password(&configured)
            ));
            Ok(url)
        }
        Err(why) => Err(instructions(&configured, &unanswered, &why)),
    }
}

fn answers(url: &str) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| format!("cannot start a runtime: {error}"))?;
    runtime.block_on(async {
        let connecting = sqlx::PgConnection::connect(url);
        match tokio::time::timeout(Duration::from_secs(5), connecting).await {
            Ok(Ok(connection)) => {
                let _ = connection.close().await;
                Ok(())
            }
            Ok(Err(error)) => Err(error.to_string()),
            Err(_) => Err("no answer within 5 s".to_owned()),
        }
    })
}

fn instructions(configured: &str, unanswered: &str, why: &str) -> String {
    format!(
        "The PostgreSQL half of the suite needs a PostgreSQL server, and none could be had.\n\
         \x20 {URL_VARIABLE} ({}): {unanswered}\n\
         \x20 a throwaway cluster: {why}\n\
         Do one of these:\n\
         \x20 - start PostgreSQL (on Debian: `pg_ctlcluster <version> main start`), and set \
         {URL_VARIABLE} to a superuser URL of it unless that is {DEFAULT_URL};\n\
         \x20 - install PostgreSQL's server binaries (on Debian: `apt-get install postgresql`): \
         the suite then starts a throwaway cluster of its own;\n\
         \x20 - leave the PostgreSQL half out on purpose: `cargo test -- --skip postgres`.",
        without_password(configured)
    )
}

/// The URL as it may be shown: without its password.
fn without_password(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        _ => url.to_owned(),
    }
}

/// Writes to the real stderr, which the test harness does not capture, so it is seen once.
fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "\n{line}\n");
}
