//! Test support: the branch simulator ([`busi::Busi`]), a server started in-process on the
//! backend named by `DTM_TEST_STORE` (default `sqlite`), and small HTTP helpers.

pub mod busi;
pub mod busi_grpc;
pub mod busi_jrpc;
pub mod grpc;
pub mod load;
pub mod proxy;

use std::time::{Duration, Instant};

use anyhow::Context;
use dtm_server::{Config, Options, Server};
use serde_json::{Value, json};

pub use busi::{Busi, slot};
pub use busi_grpc::BusiGrpc;

/// The backend the scenario tests run on: `DTM_TEST_STORE`, default `sqlite`.
pub fn test_store() -> String {
    std::env::var("DTM_TEST_STORE").unwrap_or_else(|_| "sqlite".to_string())
}

/// Configuration for a test server on the backend of `DTM_TEST_STORE`. Connection values
/// come from the usual `STORE_*` environment variables when set, else from the local
/// defaults (Postgres 5432 user postgres, MariaDB 3306 root, Redis 6379).
///
/// Every call gives a store of its own, so that tests running at once do not see (and
/// their recovery loops do not claim) each other's transactions: a file in `dir` for
/// sqlite, a fresh schema `dtm_t_<time>_<random>` in database `dtm_test` for postgres, a
/// fresh database `dtm_t_<time>_<random>` for mysql, a fresh key prefix
/// `dtm_t_<time>_<random>` for redis. [`TestServer`] drops the schema, database or keys
/// when it is dropped; ones left by killed runs are dropped after 20 minutes.
pub fn test_config(dir: &std::path::Path) -> anyhow::Result<Config> {
    let store = test_store();
    let ns = namespace_name();
    let (defaults, ns_key): (&[(&str, &str)], Option<&str>) = match store.as_str() {
        "postgres" => (
            &[
                ("STORE_HOST", "127.0.0.1"),
                ("STORE_PORT", "5432"),
                ("STORE_USER", "postgres"),
                ("STORE_DB", "dtm_test"),
            ],
            Some("STORE_SCHEMA"),
        ),
        "mysql" => (
            &[
                ("STORE_HOST", "127.0.0.1"),
                ("STORE_PORT", "3306"),
                ("STORE_USER", "root"),
            ],
            Some("STORE_DB"),
        ),
        "redis" => (
            &[("STORE_HOST", "127.0.0.1"), ("STORE_PORT", "6379")],
            Some("STORE_REDIS_PREFIX"),
        ),
        _ => (&[], None),
    };
    let mut c = Config::load(None, |k| {
        if k == "STORE_DRIVER" {
            return Some(store.clone());
        }
        if Some(k) == ns_key {
            return Some(ns.clone());
        }
        if k == "STORE_MAX_OPEN_CONNS" {
            return Some("8".into());
        }
        if !k.starts_with("STORE_") {
            return None;
        }
        std::env::var(k).ok().filter(|v| !v.is_empty()).or_else(|| {
            defaults
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        })
    })
    .map_err(|e| anyhow::anyhow!(e))?;
    c.set(
        "Store.File",
        dir.join("dtm.sqlite").to_string_lossy().to_string(),
    )
    .map_err(anyhow::Error::msg)?;
    Ok(c)
}

const NS_PREFIX: &str = "dtm_t_";
/// Test namespaces older than this are left from killed runs.
const NS_STALE_SECS: u64 = 20 * 60;

fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `dtm_t_<unix seconds>_<random>`: a plain lowercase identifier for both servers.
fn namespace_name() -> String {
    let r: String = dtm_core::new_gid()
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(10)
        .collect::<String>()
        .to_ascii_lowercase();
    format!("{NS_PREFIX}{}_{r}", unix_secs())
}

/// A test namespace left by a killed run?
fn is_stale(name: &str) -> bool {
    let born = name
        .strip_prefix(NS_PREFIX)
        .and_then(|r| r.split('_').next())
        .and_then(|t| t.parse::<u64>().ok());
    born.is_some_and(|b| unix_secs().saturating_sub(b) > NS_STALE_SECS)
}

/// Drop test namespaces that killed runs left behind.
async fn sweep_stale_namespaces(o: &dtm_store::SqlOptions) {
    let Ok(names) = dtm_store::sql::list_namespaces(o, NS_PREFIX).await else {
        return;
    };
    for name in names {
        if is_stale(&name) {
            let mut old = o.clone();
            match o.dialect {
                dtm_store::sql::Dialect::Postgres => old.schema = name,
                dtm_store::sql::Dialect::MySql => old.db = name,
            }
            let _ = dtm_store::sql::drop_namespace(&old).await;
        }
    }
}

/// Drop Redis key prefixes of tests that killed runs left behind.
async fn sweep_stale_redis_prefixes(o: &dtm_store::RedisOptions) {
    let Ok(prefixes) = dtm_store::redis_store::list_prefixes(o, NS_PREFIX).await else {
        return;
    };
    for prefix in prefixes {
        if is_stale(&prefix) {
            let old = dtm_store::RedisOptions {
                prefix,
                ..o.clone()
            };
            let _ = dtm_store::redis_store::drop_prefix(&old).await;
        }
    }
}

/// A dtm-rs server running inside the test process.
pub struct TestServer {
    pub server: Server,
    /// e.g. `http://127.0.0.1:PORT/api/dtmsvr`
    pub api: String,
    /// `127.0.0.1:PORT` of the gRPC API (`dtmgimp.Dtm`).
    pub grpc: String,
    pub http: reqwest::Client,
    /// The configuration the server was started with (its store is its own).
    pub config: Config,
    _dir: tempfile::TempDir,
    _ns: NamespaceGuard,
}

/// Drops a test server's schema / database (postgres, mysql) or keys (redis) when the
/// server is dropped. A field rather than `Drop` on [`TestServer`], so tests may still move
/// fields out of it.
struct NamespaceGuard(Option<Namespace>);

enum Namespace {
    Sql(dtm_store::SqlOptions),
    Redis(dtm_store::RedisOptions),
}

impl NamespaceGuard {
    fn of(cfg: &Config) -> NamespaceGuard {
        let sql = cfg.sql_options().ok().map(Namespace::Sql);
        let redis = || {
            dtm_server::redis_config::options(cfg)
                .ok()
                .map(Namespace::Redis)
        };
        NamespaceGuard(sql.or_else(redis))
    }
}

impl Drop for NamespaceGuard {
    /// Runs on a thread of its own, since the test's runtime may be the single thread that
    /// is dropping this.
    fn drop(&mut self) {
        let Some(o) = self.0.take() else {
            return;
        };
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(async {
                    let _ = match o {
                        Namespace::Sql(o) => dtm_store::sql::drop_namespace(&o).await,
                        Namespace::Redis(o) => {
                            dtm_store::redis_store::drop_prefix(&o).await.map(|_| ())
                        }
                    };
                });
            }
        })
        .join();
    }
}

/// Engine settings for tests: short intervals so that retries and recovery happen within
/// a few seconds.
pub fn fast_settings() -> dtm_core::Settings {
    dtm_core::Settings {
        retry_interval: 1,
        timeout_to_fail: 3,
        request_timeout: 3,
        cron_interval: Duration::from_millis(100),
        ..Default::default()
    }
}

impl TestServer {
    /// Stop the server as SIGTERM does, with `grace` for requests in progress; an error
    /// when the shutdown has not returned after 10 s.
    pub async fn shutdown_within(self, grace: Duration) -> anyhow::Result<()> {
        tokio::time::timeout(Duration::from_secs(10), self.server.shutdown(grace))
            .await
            .map_err(|_| anyhow::anyhow!("the server's shutdown (grace {grace:?}) hung"))
    }

    pub async fn start() -> anyhow::Result<TestServer> {
        Self::start_with(fast_settings()).await
    }

    pub async fn start_with(settings: dtm_core::Settings) -> anyhow::Result<TestServer> {
        dtm_server::install_crypto();
        let dir = tempfile::tempdir()?;
        let cfg = test_config(dir.path())?;
        if let Ok(o) = cfg.sql_options() {
            sweep_stale_namespaces(&o).await;
        }
        if let Ok(o) = dtm_server::redis_config::options(&cfg) {
            sweep_stale_redis_prefixes(&o).await;
        }
        let store = dtm_server::open_store(&cfg)
            .await
            .context("opening the test store")?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let grpc_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let grpc = grpc_listener.local_addr()?.to_string();
        let server = Server::start_with_grpc(
            Options {
                settings,
                max_body: 1 << 20,
            },
            store,
            listener,
            Some(grpc_listener),
        )
        .await?;
        let api = format!("http://{}/api/dtmsvr", server.http_addr);
        Ok(TestServer {
            server,
            api,
            grpc,
            http: reqwest::Client::builder().no_proxy().build()?,
            _ns: NamespaceGuard::of(&cfg),
            config: cfg,
            _dir: dir,
        })
    }

    pub async fn post(&self, path: &str, body: &Value) -> anyhow::Result<(u16, Value)> {
        let r = self
            .http
            .post(format!("{}/{path}", self.api))
            .header("Content-Type", "application/json")
            .body(body.to_string())
            .send()
            .await?;
        let status = r.status().as_u16();
        let text = r.text().await?;
        Ok((
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    }

    pub async fn post_raw(&self, path: &str, body: &str) -> anyhow::Result<(u16, Value)> {
        let r = self
            .http
            .post(format!("{}/{path}", self.api))
            .body(body.to_string())
            .send()
            .await?;
        let status = r.status().as_u16();
        let text = r.text().await?;
        Ok((
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    }

    pub async fn get(&self, path_and_query: &str) -> anyhow::Result<(u16, Value)> {
        let r = self
            .http
            .get(format!("{}/{path_and_query}", self.api))
            .send()
            .await?;
        let status = r.status().as_u16();
        let text = r.text().await?;
        Ok((
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    }

    /// `GET /api/metrics`: the exposition text (an error unless 200).
    pub async fn metrics(&self) -> anyhow::Result<String> {
        let r = self
            .http
            .get(self.api.replace("/dtmsvr", "/metrics"))
            .send()
            .await?;
        anyhow::ensure!(r.status() == 200, "GET /api/metrics: {}", r.status());
        Ok(r.text().await?)
    }

    /// `GET /query`: the transaction JSON (or null) and branch statuses in storage order.
    pub async fn query(&self, gid: &str) -> anyhow::Result<(Value, Vec<String>)> {
        let (_, v) = self.get(&format!("query?gid={gid}")).await?;
        let statuses = v["branches"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|b| b["status"].as_str().unwrap_or("").to_string())
                    .collect()
            })
            .unwrap_or_default();
        Ok((v["transaction"].clone(), statuses))
    }

    pub async fn status(&self, gid: &str) -> anyhow::Result<String> {
        let (t, _) = self.query(gid).await?;
        Ok(t["status"].as_str().unwrap_or("").to_string())
    }

    /// Branch statuses abbreviated as dtm's tests write them: `p`, `s`, `f`.
    pub async fn branches(&self, gid: &str) -> anyhow::Result<String> {
        let (_, b) = self.query(gid).await?;
        Ok(b.iter()
            .map(|s| s.chars().next().unwrap_or('?'))
            .collect::<String>())
    }

    /// Poll until the global status is `want`; fails with the last status after `secs`.
    pub async fn wait_status(&self, gid: &str, want: &str, secs: u64) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let s = self.status(gid).await?;
            if s == want {
                return Ok(());
            }
            if Instant::now() > deadline {
                anyhow::bail!("gid {gid}: status '{s}', expected '{want}' within {secs}s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Make a transaction due now (`resetNextCronTime`).
    pub async fn kick(&self, gid: &str) -> anyhow::Result<()> {
        let (code, v) = self
            .post("resetNextCronTime", &json!({ "gid": gid }))
            .await?;
        anyhow::ensure!(code == 200, "resetNextCronTime: {code} {v}");
        Ok(())
    }

    pub async fn new_gid(&self) -> anyhow::Result<String> {
        let (_, v) = self.get("newGid").await?;
        v["gid"]
            .as_str()
            .map(str::to_string)
            .context("newGid answered without gid")
    }
}

/// A saga body with steps (action route, compensate route) on the simulator.
pub fn saga(gid: &str, busi: &Busi, steps: &[(&str, &str)], payload: &Value) -> Value {
    json!({
        "gid": gid,
        "trans_type": "saga",
        "steps": steps.iter().map(|(a, c)| json!({
            "action": if a.is_empty() { String::new() } else { busi.route(a) },
            "compensate": if c.is_empty() { String::new() } else { busi.route(c) },
        })).collect::<Vec<_>>(),
        "payloads": steps.iter().map(|_| payload.to_string()).collect::<Vec<_>>(),
    })
}

/// The usual two-step transfer saga: TransOut/TransOutRevert then TransIn/TransInRevert.
pub fn transfer_saga(gid: &str, busi: &Busi) -> Value {
    saga(
        gid,
        busi,
        &[("TransOut", "TransOutRevert"), ("TransIn", "TransInRevert")],
        &json!({"amount": 30}),
    )
}

/// A msg body with action routes on the simulator.
pub fn msg(gid: &str, busi: &Busi, actions: &[&str]) -> Value {
    json!({
        "gid": gid,
        "trans_type": "msg",
        "steps": actions.iter().map(|a| json!({"action": busi.route(a)})).collect::<Vec<_>>(),
        "payloads": actions.iter().map(|_| json!({"amount": 30}).to_string()).collect::<Vec<_>>(),
        "query_prepared": busi.route("QueryPrepared"),
    })
}

/// Merge extra keys into a JSON object.
pub fn with(mut v: Value, extra: Value) -> Value {
    if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
        for (k, x) in e {
            o.insert(k.clone(), x.clone());
        }
    }
    v
}

/// A `dtm` server running as a child process (for crash tests).
pub struct ProcServer {
    child: tokio::process::Child,
    pub api: String,
    bin: std::path::PathBuf,
    env: Vec<(String, String)>,
    log: std::path::PathBuf,
}

/// A free loopback port (bound, then released).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl ProcServer {
    /// Start `bin` with the store of `cfg` and these extra environment variables, and wait
    /// until it answers `/api/ping`. Its log goes to `log`.
    pub async fn spawn(
        bin: &std::path::Path,
        cfg: &Config,
        extra: &[(&str, &str)],
        log: &std::path::Path,
    ) -> anyhow::Result<ProcServer> {
        dtm_server::install_crypto();
        let port = free_port()?;
        let mut env = cfg.store_env();
        env.push(("HTTP_PORT".into(), port.to_string()));
        env.push(("GRPC_PORT".into(), free_port()?.to_string()));
        env.push(("LISTEN_HOST".into(), "127.0.0.1".into()));
        for (k, v) in extra {
            env.push((k.to_string(), v.to_string()));
        }
        let mut p = ProcServer {
            child: Self::start_child(bin, &env, log)?,
            api: format!("http://127.0.0.1:{port}/api/dtmsvr"),
            bin: bin.to_path_buf(),
            env,
            log: log.to_path_buf(),
        };
        p.wait_ready().await?;
        Ok(p)
    }

    fn start_child(
        bin: &std::path::Path,
        env: &[(String, String)],
        log: &std::path::Path,
    ) -> anyhow::Result<tokio::process::Child> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let err = out.try_clone()?;
        let mut cmd = tokio::process::Command::new(bin);
        cmd.env_clear()
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true);
        cmd.spawn()
            .with_context(|| format!("starting {}", bin.display()))
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let client = reqwest::Client::builder().no_proxy().build()?;
        let ping = self.api.replace("/dtmsvr", "/ping");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = client.get(&ping).send().await
                && r.status().is_success()
            {
                return Ok(());
            }
            if let Some(st) = self.child.try_wait()? {
                anyhow::bail!("dtm exited with {st}; see {}", self.log.display());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "dtm did not start; see {}",
                self.log.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL: the process dies at whatever instruction it is at.
    pub async fn kill9(&mut self) -> anyhow::Result<()> {
        self.child.start_kill()?;
        self.child.wait().await?;
        Ok(())
    }

    /// Start again with the same store and port.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.child = Self::start_child(&self.bin, &self.env, &self.log)?;
        self.wait_ready().await
    }

    /// SIGTERM, then wait for a clean exit.
    pub async fn terminate(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        if let Some(pid) = self.child.id() {
            std::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status()?;
        }
        Ok(tokio::time::timeout(Duration::from_secs(20), self.child.wait()).await??)
    }
}
