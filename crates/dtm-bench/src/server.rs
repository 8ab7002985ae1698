//! The dtm-rs server under test: a child process started from the `dtm` binary with a
//! fresh store, or an already running server given by URL.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Where the server runs and how to watch it.
pub struct ServerUnderTest {
    /// e.g. `http://127.0.0.1:PORT/api/dtmsvr`
    pub api: String,
    /// pid to read CPU and RSS from (None: not watched)
    pub pid: Option<String>,
    child: Option<Child>,
    /// fresh data directory (sqlite file, server log)
    pub dir: Option<PathBuf>,
    pub log: Option<PathBuf>,
    cleanup: Vec<Cleanup>,
    keep: bool,
}

/// Something to undo after the run (a database created for it).
enum Cleanup {
    Sql {
        store: String,
        db: String,
    },
    /// A redis-server started for this run.
    Process(std::process::Child),
}

impl Cleanup {
    fn run(&mut self) {
        match self {
            Cleanup::Sql { store, db } => drop_sql_db(store, db),
            Cleanup::Process(c) => {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// Whether `--store redis` runs on a redis-server of its own with AOF and
/// `appendfsync always` (fsync before every reply, as the durable settings of the other
/// stores): when the environment names no Redis (STORE_HOST / STORE_PORT) and
/// `redis-server` is on the PATH.
pub fn private_redis(fresh_db: bool) -> bool {
    // asked by the run and by every report line: look for redis-server once
    static HAVE_REDIS_SERVER: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    fresh_db
        && std::env::var_os("STORE_HOST").is_none()
        && std::env::var_os("STORE_PORT").is_none()
        && *HAVE_REDIS_SERVER.get_or_init(|| {
            Command::new("redis-server")
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
}

/// Start a durable redis-server in `dir` on a free port; answers when it takes commands.
fn start_private_redis(dir: &Path) -> anyhow::Result<(std::process::Child, u16)> {
    let port = free_port()?;
    let mut child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .args(["--appendonly", "yes", "--appendfsync", "always"])
        .arg("--dir")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting redis-server")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline || matches!(child.try_wait(), Ok(Some(_))) {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the redis-server started for this run did not listen on port {port}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((child, port))
}

/// How to start the server.
pub struct Launch {
    pub bin: PathBuf,
    pub store: String,
    /// sqlite durability: full | normal
    pub sync: String,
    pub log_level: String,
    /// extra KEY=VALUE environment for the server (after the bench's own)
    pub env: Vec<(String, String)>,
    /// create a fresh database / key prefix for non-embedded stores
    pub fresh_db: bool,
    pub keep: bool,
    pub run_id: String,
}

/// The `dtm` binary: `explicit`, else `$DTM_BIN`, else next to this executable.
pub fn find_dtm(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    let cand = match explicit {
        Some(p) => p.to_path_buf(),
        None => match std::env::var_os("DTM_BIN") {
            Some(p) => PathBuf::from(p),
            None => std::env::current_exe()
                .context("cannot find this executable's path")?
                .with_file_name("dtm"),
        },
    };
    if !cand.is_file() {
        bail!(
            "server binary {} not found: build it with `cargo build --release -p dtm-server` or pass --dtm PATH",
            cand.display()
        );
    }
    Ok(cand)
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

fn env_or(k: &str, d: &str) -> String {
    std::env::var(k)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| d.to_string())
}

/// The local servers' connection values, unless the environment gives them: postgres
/// 127.0.0.1:5432 user postgres, mysql/MariaDB 127.0.0.1:3306 user root.
fn push_sql_defaults(env: &mut Vec<(String, String)>, store: &str) {
    let (port, user) = if store == "postgres" {
        ("5432", "postgres")
    } else {
        ("3306", "root")
    };
    for (k, d) in [
        ("STORE_HOST", "127.0.0.1"),
        ("STORE_PORT", port),
        ("STORE_USER", user),
    ] {
        env.push((k.to_string(), env_or(k, d)));
    }
}

/// The local Redis (127.0.0.1:6379) unless the environment names another.
fn push_redis_defaults(env: &mut Vec<(String, String)>) {
    for (k, d) in [("STORE_HOST", "127.0.0.1"), ("STORE_PORT", "6379")] {
        env.push((k.to_string(), env_or(k, d)));
    }
}

/// The store's command-line client (psql or mysql) set up to run one statement on the
/// server the environment names.
fn sql_client(store: &str, sql: &str) -> Command {
    let mut cmd;
    if store == "postgres" {
        cmd = Command::new("psql");
        cmd.args([
            "-h",
            &env_or("STORE_HOST", "127.0.0.1"),
            "-p",
            &env_or("STORE_PORT", "5432"),
            "-U",
            &env_or("STORE_USER", "postgres"),
            "-d",
            "postgres",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ])
        .env("PGPASSWORD", env_or("STORE_PASSWORD", ""));
    } else {
        cmd = Command::new("mysql");
        cmd.args([
            "-h",
            &env_or("STORE_HOST", "127.0.0.1"),
            "-P",
            &env_or("STORE_PORT", "3306"),
            "-u",
            &env_or("STORE_USER", "root"),
            "-e",
            sql,
        ])
        .env("MYSQL_PWD", env_or("STORE_PASSWORD", ""));
    }
    cmd
}

/// Create a database for this run with the store's command-line client.
fn create_sql_db(store: &str, db: &str) -> anyhow::Result<()> {
    let out = sql_client(store, &format!("CREATE DATABASE {db}"))
        .output()
        .with_context(|| format!("running the {store} client to create database {db}"))?;
    if !out.status.success() {
        bail!(
            "creating database {db} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn drop_sql_db(store: &str, db: &str) {
    let r = sql_client(store, &format!("DROP DATABASE IF EXISTS {db}")).output();
    match r {
        Ok(o) if o.status.success() => {}
        Ok(o) => eprintln!(
            "dtm-bench: could not drop database {db}: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => eprintln!("dtm-bench: could not drop database {db}: {e}"),
    }
}

/// What the server logs each time it fails to open its store, or to reach it once
/// open, and tries again.
const STORE_RETRY: [&str; 2] = ["cannot open the store", " not ready: "];

/// Wait until `GET {base}/api/ping` answers 200.
async fn wait_ping(
    http: &reqwest::Client,
    base: &str,
    child: Option<&mut Child>,
    log: Option<&Path>,
    limit: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    let mut child = child;
    loop {
        if let Ok(r) = http.get(format!("{base}/api/ping")).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        if let Some(c) = child.as_deref_mut()
            && let Ok(Some(st)) = c.try_wait()
        {
            bail!(
                "the server exited during start ({st}); its log:\n{}",
                log.map(log_tail).unwrap_or_default()
            );
        }
        // it keeps retrying a store it cannot open (a database that starts after it);
        // for a benchmark three failed tries say the store is not there
        if let Some(l) = log
            && std::fs::read_to_string(l)
                .map(|s| {
                    STORE_RETRY
                        .iter()
                        .map(|m| s.matches(m).count())
                        .sum::<usize>()
                        >= 3
                })
                .unwrap_or(false)
        {
            bail!(
                "the server cannot reach its store (is the database running, and are STORE_HOST, STORE_PORT, STORE_USER and STORE_PASSWORD right?); its log:\n{}",
                log_tail(l)
            );
        }
        if Instant::now() > deadline {
            bail!(
                "the server at {base} did not answer /api/ping within {}s; its log:\n{}",
                limit.as_secs(),
                log.map(log_tail).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The last lines of a log file.
pub fn log_tail(p: &Path) -> String {
    let s = std::fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

impl ServerUnderTest {
    /// Start `dtm` on a free loopback port with a fresh store.
    pub async fn start(l: &Launch, http: &reqwest::Client) -> anyhow::Result<ServerUnderTest> {
        let dir = std::env::temp_dir().join(format!("dtm-bench-{}", l.run_id));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating data directory {}", dir.display()))?;
        let log = dir.join("server.log");
        let mut cleanup = Vec::new();
        let mut env: Vec<(String, String)> = vec![
            ("STORE_DRIVER".into(), l.store.clone()),
            ("LISTEN_HOST".into(), "127.0.0.1".into()),
            ("LOG_LEVEL".into(), l.log_level.clone()),
        ];
        match l.store.as_str() {
            "sqlite" | "boltdb" => {
                env.push((
                    "STORE_FILE".into(),
                    dir.join("dtm.sqlite").to_string_lossy().to_string(),
                ));
                env.push(("STORE_SYNCHRONOUS".into(), l.sync.clone()));
            }
            "postgres" | "mysql" if l.fresh_db => {
                push_sql_defaults(&mut env, &l.store);
                let db = format!("dtm_bench_{}", l.run_id.replace('-', "_"));
                match create_sql_db(&l.store, &db) {
                    Ok(()) => {
                        env.push(("STORE_DB".into(), db.clone()));
                        cleanup.push(Cleanup::Sql {
                            store: l.store.clone(),
                            db,
                        });
                    }
                    Err(e) => eprintln!(
                        "dtm-bench: {e}; using the database STORE_DB names (it should be empty)"
                    ),
                }
            }
            "postgres" | "mysql" => push_sql_defaults(&mut env, &l.store),
            "redis" if l.fresh_db && private_redis(true) => {
                let (child, port) = start_private_redis(&dir)?;
                cleanup.push(Cleanup::Process(child));
                env.push(("STORE_HOST".into(), "127.0.0.1".into()));
                env.push(("STORE_PORT".into(), port.to_string()));
            }
            "redis" if l.fresh_db => {
                push_redis_defaults(&mut env);
                env.push((
                    "STORE_REDIS_PREFIX".into(),
                    format!("{{dtmbench-{}}}", l.run_id),
                ));
            }
            "redis" => push_redis_defaults(&mut env),
            _ => {}
        }
        env.extend(l.env.iter().cloned());
        let mut last_err = None;
        // a port found free can be taken before the server binds it: try a few
        for _ in 0..3 {
            let port = free_port()?;
            let logf = std::fs::File::create(&log)
                .with_context(|| format!("creating {}", log.display()))?;
            let errf = logf.try_clone()?;
            let mut cmd = Command::new(&l.bin);
            // gRPC on a free port too: the default 36790 lies in Linux's ephemeral range
            // and can be held by any outgoing connection on a busy box
            let grpc_port = free_port()?;
            cmd.env("HTTP_PORT", port.to_string())
                .env("GRPC_PORT", grpc_port.to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::from(logf))
                .stderr(Stdio::from(errf));
            for (k, v) in &env {
                cmd.env(k, v);
            }
            let mut child = cmd
                .spawn()
                .with_context(|| format!("starting {}", l.bin.display()))?;
            let base = format!("http://127.0.0.1:{port}");
            match wait_ping(
                http,
                &base,
                Some(&mut child),
                Some(&log),
                Duration::from_secs(60),
            )
            .await
            {
                Ok(()) => {
                    return Ok(ServerUnderTest {
                        api: format!("{base}/api/dtmsvr"),
                        pid: Some(child.id().to_string()),
                        child: Some(child),
                        dir: Some(dir),
                        log: Some(log),
                        cleanup,
                        keep: l.keep,
                    });
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    // only a port taken meanwhile is worth another try
                    let port_taken = e.to_string().contains("cannot listen on");
                    last_err = Some(e);
                    if !port_taken {
                        break;
                    }
                }
            }
        }
        for c in &mut cleanup {
            c.run();
        }
        let err = last_err.unwrap_or_else(|| anyhow::anyhow!("the server did not start"));
        if !l.keep {
            // the log tail is already in the error
            let _ = std::fs::remove_dir_all(&dir);
        }
        Err(err)
    }

    /// A server that is already running at `url` (e.g. `http://127.0.0.1:36789`).
    pub async fn existing(
        url: &str,
        pid: Option<String>,
        http: &reqwest::Client,
    ) -> anyhow::Result<ServerUnderTest> {
        let base = url.trim_end_matches('/');
        let base = base.strip_suffix("/api/dtmsvr").unwrap_or(base).to_string();
        wait_ping(http, &base, None, None, Duration::from_secs(10)).await?;
        Ok(ServerUnderTest {
            api: format!("{base}/api/dtmsvr"),
            pid,
            child: None,
            dir: None,
            log: None,
            cleanup: vec![],
            keep: true,
        })
    }

    /// Stop the child (SIGTERM, then SIGKILL after 15 s), drop what was created for the
    /// run, and remove the data directory unless asked to keep it.
    pub fn stop(mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = c.id().to_string();
            let _ = Command::new("kill").args(["-TERM", &pid]).status();
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                match c.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    _ => {
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                }
            }
        }
        if self.keep {
            for c in &mut self.cleanup {
                if let Cleanup::Process(_) = c {
                    c.run();
                }
            }
            if let Some(d) = &self.dir {
                eprintln!("dtm-bench: data kept in {}", d.display());
            }
            return;
        }
        for c in &mut self.cleanup {
            c.run();
        }
        if let Some(d) = &self.dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}
