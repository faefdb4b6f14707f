//! What `/metrics` reads at the moment of a scrape, besides what requests recorded: the ingest
//! queue, the database pools and the process itself. Read on demand, so nothing polls when
//! nobody scrapes.

use std::sync::Arc;

use metrics_process::Collector;

use crate::callbacks::ingest::Ingest;
use crate::store::Store;

pub struct Scrape {
    store: Arc<dyn Store>,
    ingest: Ingest,
    process: Collector,
}

impl Scrape {
    pub fn new(store: Arc<dyn Store>, ingest: Ingest) -> Self {
        // Installs the recorder first: the process families' help must reach it.
        crate::telemetry::prometheus();
        let process = Collector::default();
        process.describe();
        Self {
            store,
            ingest,
            process,
        }
    }

    /// The Prometheus text of every family, with the gauges above brought up to date.
    pub fn render(&self) -> String {
        crate::metrics::record_load(self.ingest.queue_depth(), &self.store.pool_usage());
        self.process.collect();
        crate::telemetry::prometheus().render()
    }
}
