//! The `fake-nen` binary refuses production, with one line, before it listens or signs anything;
//! and the same command line does start when the environment is local.

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const SECRET: &str = "whsec-production-looking-secret";

fn fake_nen(environment: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_fake-nen"));
    command
        .args(["--bind", "127.0.0.1:0"])
        .env("NEN_RELAY_ENV", environment)
        .env("NEN_WEBHOOK_SECRETS", SECRET)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

#[test]
fn refuses_to_run_in_production_with_a_one_line_reason() {
    let mut child = fake_nen("production").spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("fake-nen kept running with NEN_RELAY_ENV=production");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!status.success(), "exit status {status}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr:?}");
    assert!(
        stderr.starts_with("error: ") && stderr.contains("NEN_RELAY_ENV=production"),
        "{stderr:?}"
    );
    assert!(!stderr.contains(SECRET) && !stdout.contains(SECRET));
    assert!(!stdout.contains("listening"), "{stdout:?}");
}

#[test]
fn starts_when_local() {
    let mut child = fake_nen("local").spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (lines, received) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    let listening = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match received.recv_timeout(left) {
            Ok(line) if line.contains("fake Nen listening") => break true,
            Ok(line) => seen.push(line),
            Err(_) => break false,
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(listening, "fake-nen did not start: {seen:?}");
}
