//! One integration test binary: shared helpers in `support`, one file per area.

// Shared by every area: not every helper is used by the areas present at any one time.
#[allow(dead_code)]
mod support;

mod callbacks;
mod store_behaviour;
