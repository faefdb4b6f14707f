//! The callbacks a bench run sends, built and signed before the clock starts.
//!
//! Each run gets `processing`, then `success` (80 %) or `failed`, a little later in the sequence,
//! so that connections interleave many runs. A fifth of the requests re-deliver one of the
//! recently sent callbacks byte for byte (as a retrying sender would), some of them after the
//! run's terminal callback.

use std::collections::VecDeque;

use bytes::Bytes;
use http::HeaderValue;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::signature::sign;

/// Share of requests that repeat an earlier callback.
const REPEAT_SHARE: f64 = 0.2;
/// Share of runs that end in `success` (the others end in `failed`).
const SUCCESS_SHARE: f64 = 0.8;
/// Runs between a run's `processing` and its terminal callback: enough that concurrent
/// connections usually carry different runs, few enough that a run finishes soon.
const RUNS_IN_PROGRESS: usize = 256;
/// Repeats are drawn from this many most recent distinct callbacks.
const REPEAT_WINDOW: usize = 512;

/// One distinct callback: its signed body.
pub struct Callback {
    /// Index into [`Mix::runs`].
    pub run: u32,
    pub status: &'static str,
    pub body: Bytes,
    pub signature: HeaderValue,
}

/// Everything a bench run sends, in order.
pub struct Mix {
    /// Each run's `message_id`.
    pub runs: Vec<String>,
    pub callbacks: Vec<Callback>,
    /// Request `i` sends `callbacks[sequence[i]]`.
    pub sequence: Vec<u32>,
}

impl Mix {
    /// Builds `requests` requests signed with `secret`. Message ids are random UUIDs, so that
    /// runs never collide with an earlier bench run on the same database; `seed` fixes the mix.
    pub fn build(requests: usize, secret: &[u8], seed: u64) -> Mix {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut mix = Mix {
            runs: Vec::with_capacity(requests / 2 + 1),
            callbacks: Vec::with_capacity(requests),
            sequence: Vec::with_capacity(requests),
        };
        let mut in_progress: VecDeque<u32> = VecDeque::with_capacity(RUNS_IN_PROGRESS + 1);
        let expires_at = unix_now() + 7 * 24 * 3600;
        while mix.sequence.len() < requests {
            if !mix.callbacks.is_empty() && rng.random_bool(REPEAT_SHARE) {
                let recent = mix.callbacks.len().min(REPEAT_WINDOW);
                let pick = mix.callbacks.len() - 1 - rng.random_range(0..recent);
                mix.sequence.push(pick as u32);
                continue;
            }
            let (run, status) = if in_progress.len() >= RUNS_IN_PROGRESS {
                let run = in_progress.pop_front().expect("not empty");
                let status = if rng.random_bool(SUCCESS_SHARE) {
                    "success"
                } else {
                    "failed"
                };
                (run, status)
            } else {
                let run = mix.runs.len() as u32;
                mix.runs.push(uuid::Uuid::new_v4().to_string());
                in_progress.push_back(run);
                (run, "processing")
            };
            let body = body(&mix.runs[run as usize], status, expires_at, &mut rng);
            let signature = HeaderValue::from_str(&sign(secret, body.as_bytes()))
                .expect("a signature is a valid header value");
            mix.sequence.push(mix.callbacks.len() as u32);
            mix.callbacks.push(Callback {
                run,
                status,
                body: Bytes::from(body),
                signature,
            });
        }
        mix
    }

    /// The callback that request `index` sends.
    pub fn request(&self, index: usize) -> &Callback {
        &self.callbacks[self.sequence[index] as usize]
    }
}

/// Seconds since the Unix epoch, as Nen writes `expires_at`.
fn unix_now() -> i64 {
    let elapsed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the clock is past 1970");
    i64::try_from(elapsed.as_secs()).expect("seconds since 1970 fit in i64")
}

/// A callback body shaped like Nen's.
fn body(message_id: &str, status: &str, expires_at: i64, rng: &mut StdRng) -> String {
    let workflow_id = "6f1c2d3e-4b5a-4c7d-8e9f-0a1b2c3d4e5f";
    match status {
        "processing" => format!(
            r#"{{"workflow_id":"{workflow_id}","message_id":"{message_id}","status":"processing","expires_at":{expires_at}}}"#
        ),
        "success" => format!(
            r#"{{"workflow_id":"{workflow_id}","message_id":"{message_id}","status":"success","expires_at":{expires_at},"success":true,"result":{{"patient":"Jane Doe","claims":{},"approved":true,"total":{}.{:02}}},"assets":"https://assets.example.invalid/{message_id}/assets.zip?X-Amz-Expires=604800"}}"#,
            rng.random_range(1..20),
            rng.random_range(10..5000),
            rng.random_range(0..100)
        ),
        _ => format!(
            r#"{{"workflow_id":"{workflow_id}","message_id":"{message_id}","status":"failed","expires_at":{expires_at},"success":false,"error":"TimeoutError: the portal did not answer within 30 s"}}"#
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_run_starts_with_processing_and_repeats_are_earlier_callbacks() {
        let mix = Mix::build(5000, b"secret", 7);
        assert_eq!(mix.sequence.len(), 5000);
        let mut seen = vec![false; mix.callbacks.len()];
        let mut started = vec![false; mix.runs.len()];
        let mut repeats = 0;
        for &index in &mix.sequence {
            let callback = &mix.callbacks[index as usize];
            if seen[index as usize] {
                repeats += 1;
                continue;
            }
            seen[index as usize] = true;
            if callback.status == "processing" {
                started[callback.run as usize] = true;
            } else {
                assert!(started[callback.run as usize], "terminal before processing");
            }
            // What the service requires of a callback: a JSON object whose `message_id` and
            // `status` are strings; and a signature over exactly these bytes.
            let parsed: serde_json::Value = serde_json::from_slice(&callback.body).unwrap();
            assert_eq!(parsed["status"].as_str(), Some(callback.status));
            assert_eq!(
                parsed["message_id"].as_str(),
                Some(mix.runs[callback.run as usize].as_str())
            );
            assert!(parsed["workflow_id"].is_string() && parsed["expires_at"].is_i64());
            assert_eq!(
                callback.signature.to_str().unwrap(),
                sign(b"secret", &callback.body)
            );
        }
        assert!((800..1200).contains(&repeats), "{repeats} repeats");
        assert!(mix.callbacks.iter().any(|c| c.status == "failed"));
    }
}
