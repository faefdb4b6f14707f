//! Every log line any test's app writes, kept in memory, so tests can look for leaked secrets.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Write for Buffer {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Buffer {
    type Writer = Buffer;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

fn buffer() -> &'static Buffer {
    static BUFFER: OnceLock<Buffer> = OnceLock::new();
    BUFFER.get_or_init(|| {
        let buffer = Buffer::default();
        // Everything down to TRACE, in the production (JSON) format, so that no level or field
        // escapes the secret checks.
        let _ = tracing_subscriber::registry()
            .with(EnvFilter::new(
                "trace,sqlx=info,hyper=info,h2=info,reqwest=info,rustls=info",
            ))
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_span_list(true)
                    .with_writer(buffer.clone()),
            )
            .try_init();
        buffer
    })
}

/// Starts capturing (idempotent). Called by every `TestApp`.
pub fn capture() {
    buffer();
}

/// Everything logged so far by every test in this binary.
pub fn captured() -> String {
    String::from_utf8_lossy(&buffer().0.lock().unwrap()).into_owned()
}
