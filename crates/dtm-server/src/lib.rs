//! The `dtm` server: configuration, the HTTP API, branch callers, recovery, and the
//! wiring that starts and stops them.

pub mod api;
pub mod caller;
pub mod config;
pub mod grpc;
pub mod grpc_caller;
pub mod h1;
pub mod h1_server;
pub mod jrpc;
pub mod metrics;
pub mod redis_config;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use dtm_core::{Coordinator, Settings, Store};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use config::Config;

/// Reported by `/api/dtmsvr/version`.
pub const VERSION: &str = concat!("v", env!("CARGO_PKG_VERSION"));

/// A running server.
pub struct Server {
    pub http_addr: SocketAddr,
    /// Where `dtmgimp.Dtm` is served, when started with [`Server::start_with_grpc`].
    pub grpc_addr: Option<SocketAddr>,
    pub coordinator: Arc<Coordinator>,
    stop: watch::Sender<bool>,
    http: JoinHandle<()>,
    grpc: Option<JoinHandle<()>>,
    recovery: JoinHandle<()>,
}

/// Everything needed to start a server, independent of where the values came from.
pub struct Options {
    pub settings: Settings,
    pub max_body: usize,
}

/// Install the TLS crypto provider HTTP clients use (idempotent). Call before building any
/// `reqwest::Client`.
pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Open the store a configuration names, and start its retention cleanup
/// (`Store.FinishedDataExpire`). SQL stores are created or migrated on the way.
pub async fn open_store(cfg: &Config) -> anyhow::Result<Arc<dyn Store>> {
    let store: Arc<dyn Store> = match cfg.driver() {
        "sqlite" => {
            let sync = if cfg.str("Store.Synchronous").eq_ignore_ascii_case("normal") {
                dtm_store::SqliteSync::Normal
            } else {
                dtm_store::SqliteSync::Full
            };
            let s = dtm_store::SqliteStore::open(&cfg.store_file(), sync)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            Arc::new(s)
        }
        "postgres" | "mysql" => {
            let o = cfg.sql_options().map_err(anyhow::Error::msg)?;
            let s = dtm_store::SqlStore::open(&o)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            Arc::new(s)
        }
        "redis" => {
            let o = redis_config::options(cfg).map_err(anyhow::Error::msg)?;
            Arc::new(dtm_store::RedisStore::open(o).map_err(|e| anyhow::anyhow!("{e}"))?)
        }
        other => anyhow::bail!("store driver {other} is not available in this build"),
    };
    spawn_retention(&store, cfg.int("Store.FinishedDataExpire"));
    Ok(store)
}

/// `dtm migrate`: create or migrate the store's tables, then close it.
pub async fn migrate(cfg: &Config) -> anyhow::Result<String> {
    match cfg.driver() {
        "postgres" | "mysql" => {
            let o = cfg.sql_options().map_err(anyhow::Error::msg)?;
            let done = dtm_store::sql::migrate_only(&o)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            for d in done {
                tracing::info!("{}: {d}", o.describe());
            }
            Ok(o.describe())
        }
        "sqlite" => {
            let s = dtm_store::SqliteStore::open(&cfg.store_file(), dtm_store::SqliteSync::Full)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let d = s.describe();
            s.close().await;
            Ok(d)
        }
        other => anyhow::bail!("store driver {other} has no tables to migrate"),
    }
}

/// Rows deleted per retention call.
const PURGE_BATCH: usize = 500;

/// Delete finished transactions older than `expire_secs` (`Store.FinishedDataExpire`)
/// now and then, until the store is dropped. Unfinished ones are never deleted. A value of
/// 0 or less keeps everything.
pub fn spawn_retention(store: &Arc<dyn Store>, expire_secs: i64) -> Option<JoinHandle<()>> {
    if expire_secs <= 0 {
        return None;
    }
    let weak = Arc::downgrade(store);
    let every = Duration::from_secs((expire_secs as u64 / 10).clamp(1, 60));
    Some(tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let Some(store) = weak.upgrade() else { break };
            // a retention longer than chrono's dates reach keeps everything
            let Some(before) = chrono::TimeDelta::try_seconds(expire_secs)
                .and_then(|d| chrono::Utc::now().checked_sub_signed(d))
            else {
                continue;
            };
            let mut total = 0;
            loop {
                match store.purge_finished(before, PURGE_BATCH).await {
                    Ok(n) => {
                        total += n;
                        if n < PURGE_BATCH {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!("retention cleanup failed, trying again later: {e}");
                        break;
                    }
                }
            }
            if total > 0 {
                tracing::info!(
                    "retention: deleted {total} transactions finished more than {expire_secs}s ago"
                );
            }
        }
    }))
}

impl Server {
    /// Start the HTTP API and the recovery loop on an already bound listener.
    pub async fn start(
        opts: Options,
        store: Arc<dyn Store>,
        listener: TcpListener,
    ) -> anyhow::Result<Server> {
        Self::start_with_grpc(opts, store, listener, None).await
    }

    /// Start the HTTP API, the gRPC API (when a listener is given) and the recovery loop.
    pub async fn start_with_grpc(
        opts: Options,
        store: Arc<dyn Store>,
        listener: TcpListener,
        grpc_listener: Option<TcpListener>,
    ) -> anyhow::Result<Server> {
        let caller = Arc::new(caller::HttpCaller::new()?);
        let timeout_to_fail = opts.settings.timeout_to_fail;
        let co = Arc::new(Coordinator::new(store, caller, opts.settings));
        let (stop, stop_rx) = watch::channel(false);
        let metrics = Arc::new(metrics::Metrics::default());
        let state = api::AppState {
            co: Arc::clone(&co),
            metrics: Arc::clone(&metrics),
            timeout_to_fail,
        };
        let app = api::router(state.clone(), opts.max_body);
        let http_addr = listener.local_addr()?;
        let http = tokio::spawn(h1_server::serve(
            listener,
            app,
            state,
            opts.max_body,
            stop_rx.clone(),
        ));
        let (grpc_addr, grpc) = match grpc_listener {
            Some(l) => {
                let addr = l.local_addr()?;
                let mut grpc_stop = stop_rx.clone();
                let shutdown = async move {
                    let _ = grpc_stop.wait_for(|s| *s).await;
                };
                let svc = grpc::DtmService::new(Arc::clone(&co)).with_metrics(metrics);
                let max = opts.max_body;
                let h = tokio::spawn(async move {
                    if let Err(e) = grpc::serve(svc, l, max, shutdown).await {
                        tracing::error!("gRPC server failed: {e:#}");
                    }
                });
                (Some(addr), Some(h))
            }
            None => (None, None),
        };
        let recovery = tokio::spawn(dtm_core::recovery::run(Arc::clone(&co), stop_rx));
        Ok(Server {
            http_addr,
            grpc_addr,
            coordinator: co,
            stop,
            http,
            grpc,
            recovery,
        })
    }

    /// Stop taking requests, let HTTP requests in progress and running passes finish (up
    /// to `grace` each), flush the store.
    pub async fn shutdown(self, grace: Duration) {
        let _ = self.stop.send(true);
        // HTTP requests in progress get `grace` to be answered; a client that stalls in
        // the middle of sending one does not hold the shutdown. Connections still open
        // then end with the runtime; what their requests wrote is durable, and recovery
        // finishes their transactions.
        let mut http = self.http;
        if tokio::time::timeout(grace, &mut http).await.is_err() {
            tracing::warn!(
                "HTTP requests still in progress after {grace:?}; stopping without them"
            );
            http.abort();
        }
        if let Some(g) = self.grpc {
            let _ = g.await;
        }
        let _ = self.recovery.await;
        let deadline = tokio::time::Instant::now() + grace;
        while self.coordinator.inflight_count() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.coordinator.store().close().await;
    }
}
