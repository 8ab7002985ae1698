//! The recovery loop: claim due unfinished transactions in batches with a lease, process
//! them concurrently (bounded), sleep when nothing is due.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::{Semaphore, watch};

use crate::service::{Coordinator, now, secs};
use crate::store::{WriteOp, WriteOutcome};

/// Run until `stop` turns true.
pub async fn run(co: Arc<Coordinator>, mut stop: watch::Receiver<bool>) {
    let sem = Arc::new(Semaphore::new(
        co.settings
            .recovery_concurrency
            .clamp(1, Semaphore::MAX_PERMITS),
    ));
    let mut store_down = false;
    loop {
        if *stop.borrow() {
            break;
        }
        let batch = co.settings.recovery_batch.max(1);
        let t = now();
        let claimed = co
            .store
            .write(WriteOp::ClaimDue {
                now: t,
                limit: batch,
                lease_until: t + secs(co.settings.retry_interval),
                owner: co.node.clone(),
            })
            .await;
        let n = match claimed {
            Ok(WriteOutcome::Claimed(list)) => {
                if store_down {
                    tracing::info!("store reachable again; recovery resumes");
                    store_down = false;
                }
                let n = list.len();
                for g in list {
                    if co.is_inflight(&g.gid) {
                        continue;
                    }
                    let permit = tokio::select! {
                        p = Arc::clone(&sem).acquire_owned() => match p { Ok(p) => p, Err(_) => return },
                        _ = stop.changed() => return,
                    };
                    let co2 = Arc::clone(&co);
                    tokio::spawn(async move {
                        let gid = g.gid.clone();
                        let branches = match co2.store.find_branches(&gid).await {
                            Ok(b) => b,
                            Err(e) => {
                                tracing::warn!(gid = %gid, "recovery could not load branches: {e}");
                                drop(permit);
                                return;
                            }
                        };
                        co2.process_loaded(g, branches).await;
                        drop(permit);
                    });
                }
                n
            }
            Ok(_) => 0,
            Err(e) => {
                if !store_down {
                    tracing::warn!("recovery cannot claim due transactions: {e}; retrying");
                    store_down = true;
                }
                0
            }
        };
        if n >= batch {
            continue;
        }
        let base = co.settings.cron_interval;
        let jitter = if base > Duration::from_millis(10) {
            rand::rng().random_range(Duration::ZERO..base / 3)
        } else {
            Duration::ZERO
        };
        tokio::select! {
            _ = tokio::time::sleep(base - jitter) => {}
            _ = stop.changed() => {}
        }
    }
}
