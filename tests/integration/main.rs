//! One integration test binary: shared helpers in `support`, one file per area.

mod support;

mod callbacks;
mod hostile;
