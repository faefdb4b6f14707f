//! Starting and stopping everything that forwards: one worker per target, the queue gauges,
//! the stuck-run task and the prune task. Nothing is started without targets.

use std::sync::Arc;

use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::worker::{Worker, WorkerSettings};
use super::{gauges, prune, send, stuck, ForwardWake, OutboxSource, StoreOutbox};
use crate::config::ForwardSettings;
use crate::runs::stuck::StuckRule;
use crate::store::Store;

/// The running forwarding tasks.
pub struct Forwarding {
    stop: CancellationToken,
    tasks: JoinSet<()>,
}

impl Forwarding {
    /// Starts forwarding to every configured target; `None` when there is none.
    pub fn start(
        store: Arc<dyn Store>,
        settings: &ForwardSettings,
        stuck_rule: StuckRule,
        wake: &ForwardWake,
    ) -> anyhow::Result<Option<Forwarding>> {
        if settings.targets.is_empty() {
            return Ok(None);
        }
        // Messages written leased to the workers go to them at commit, without a claim.
        if store.outbox().hand_off_to(Arc::new(wake.clone())) {
            wake.store_reports_commits();
        }
        let outbox: Arc<dyn OutboxSource> = Arc::new(StoreOutbox(store));
        let client = send::client(settings.timeout)?;
        let stop = CancellationToken::new();
        let mut tasks = JoinSet::new();
        for target in &settings.targets {
            let Some(link) = wake.worker_link(&target.name) else {
                anyhow::bail!("no forwarding link for target {:?}", target.name);
            };
            let worker = Worker {
                target: target.clone(),
                outbox: outbox.clone(),
                client: client.clone(),
                settings: WorkerSettings::from(settings),
                link,
            };
            tasks.spawn(worker.run(stop.clone()));
        }
        let names = settings.targets.iter().map(|t| t.name.clone()).collect();
        tasks.spawn(gauges::run(outbox.clone(), names, stop.clone()));
        tasks.spawn(stuck::run(
            outbox.clone(),
            stuck_rule,
            wake.clone(),
            stop.clone(),
        ));
        if let Some(keep) = settings.keep_delivered {
            tasks.spawn(prune::run(outbox, keep, stop.clone()));
        }
        tracing::info!(
            targets = ?settings.targets.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
            "forwarding every run change"
        );
        Ok(Some(Forwarding { stop, tasks }))
    }

    /// Stops claiming, lets the sends in flight finish and record until `deadline`, then
    /// abandons the rest: their leases end and they are sent again, here or by another replica.
    pub async fn stop(mut self, deadline: Instant) {
        self.stop.cancel();
        let all_done = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout_at(deadline, all_done).await.is_err() {
            tracing::warn!("forwarding sends still in flight at the end of shutdown; they go again after their lease");
            self.tasks.abort_all();
        }
    }
}
