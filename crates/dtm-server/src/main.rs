//! `dtm`: the dtm-rs coordinator server.

use std::path::PathBuf;
use std::time::Duration;

use dtm_server::{Config, Options, Server};
use tokio::net::TcpListener;

/// glibc's allocator costs about a fifth of the server's CPU per saga under load
/// (bench/README.md); mimalloc's thread-local free lists avoid most of it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const USAGE: &str = "Usage: dtm [migrate] [-c conf.yml] [-d] [-v]
  migrate  create or upgrade the store's tables (postgres, mysql, sqlite), then exit
  -c FILE  read the configuration from a YAML file (dtm's keys); environment variables
           such as STORE_DRIVER, HTTP_PORT, RETRY_INTERVAL apply under it
  -d       debug logging
  -v       print the version and exit
  -h       this help";

fn fail(msg: &str) -> ! {
    eprintln!("dtm: {msg}");
    std::process::exit(2)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut conf: Option<PathBuf> = None;
    let mut debug = false;
    let mut migrate = false;
    while let Some(a) = args.next() {
        match a.as_str() {
            "migrate" => migrate = true,
            "-c" => match args.next() {
                Some(p) => conf = Some(PathBuf::from(p)),
                None => fail("-c needs a file name\n".to_string().as_str()),
            },
            "-d" => debug = true,
            "-v" => {
                println!("dtm version: {}", dtm_server::VERSION);
                return;
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return;
            }
            other => fail(&format!("unknown argument '{other}'\n{USAGE}")),
        }
    }
    let cfg = match Config::load(conf.as_deref(), |k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(e) => fail(&format!("invalid configuration: {e}")),
    };
    let level = if debug {
        "debug".to_string()
    } else {
        match cfg.str("LogLevel").to_ascii_lowercase().as_str() {
            "fatal" | "panic" => "error".to_string(),
            l => l.to_string(),
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_new(format!("{level},hyper=warn,reqwest=warn"))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi);
    if cfg.str("Log.Outputs") == "stdout" {
        builder.with_writer(std::io::stdout).init();
    } else {
        builder.with_writer(std::io::stderr).init();
    }
    for w in &cfg.warnings {
        tracing::warn!("{w}");
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => fail(&format!("cannot start the runtime: {e}")),
    };
    if migrate {
        match rt.block_on(dtm_server::migrate(&cfg)) {
            Ok(store) => {
                tracing::info!("store {store}: tables are up to date");
                return;
            }
            Err(e) => {
                tracing::error!("migration failed: {e:#}");
                std::process::exit(1);
            }
        }
    }
    let result = rt.block_on(run(cfg));
    // the store is closed and flushed by now; idle pooled connections need not linger
    rt.shutdown_timeout(Duration::from_millis(200));
    if let Err(e) = result {
        tracing::error!("{e:#}");
        std::process::exit(1);
    }
}

async fn run(cfg: Config) -> anyhow::Result<()> {
    // Wait for the database rather than exit: it may start after dtm.
    let store = loop {
        match dtm_server::open_store(&cfg).await {
            Ok(s) => break s,
            Err(e) if cfg.driver() == "sqlite" => return Err(e),
            Err(e) => {
                tracing::warn!("cannot open the store: {e:#}; retrying in 3s");
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
        }
    };
    loop {
        match store.ping().await {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!("store {} not ready: {e}; retrying in 3s", store.describe());
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
        }
    }
    let addr = format!("{}:{}", cfg.str("ListenHost"), cfg.int("HttpPort"));
    let listener = TcpListener::bind(&addr).await.map_err(|e| {
        anyhow::anyhow!("cannot listen on {addr}: {e}; set HTTP_PORT to a free port")
    })?;
    let opts = Options {
        settings: cfg.settings(),
        max_body: cfg.int("HttpMaxBodyBytes") as usize,
    };
    let grpc_addr = format!("{}:{}", cfg.str("ListenHost"), cfg.int("GrpcPort"));
    let grpc_listener = TcpListener::bind(&grpc_addr).await.map_err(|e| {
        anyhow::anyhow!("cannot listen on {grpc_addr} for gRPC: {e}; set GRPC_PORT to a free port")
    })?;
    let server =
        Server::start_with_grpc(opts, store.clone(), listener, Some(grpc_listener)).await?;
    tracing::info!(
        "dtm-rs {} listening on http://{} and gRPC {} ; store {}",
        dtm_server::VERSION,
        server.http_addr,
        grpc_addr,
        store.describe()
    );
    wait_for_signal().await;
    tracing::info!("shutting down: finishing requests in progress");
    server.shutdown(Duration::from_secs(5)).await;
    tracing::info!("stopped");
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
