//! Store outage: the server reaches its store through a proxy that the test cuts for a
//! few seconds under load. Calls during the outage answer 503; nothing acknowledged is
//! lost; the server recovers by itself. Runs on the networked backends (postgres, mysql,
//! redis); skipped on the embedded store.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dtm_testkit::load::{plan, submit_all, verify};
use dtm_testkit::proxy::CutProxy;
use dtm_testkit::{Busi, ProcServer, test_config, test_store};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn store_outage_answers_503_and_loses_nothing() -> anyhow::Result<()> {
    if test_store() == "sqlite" {
        eprintln!(
            "store-outage test skipped on the embedded store (set DTM_TEST_STORE to a networked backend)"
        );
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let mut cfg = test_config(dir.path())?;
    let target = format!("{}:{}", cfg.str("Store.Host"), cfg.int("Store.Port"));
    let proxy = CutProxy::start(target).await?;
    cfg.set("Store.Host", "127.0.0.1")
        .map_err(anyhow::Error::msg)?;
    cfg.set("Store.Port", proxy.addr.port().to_string())
        .map_err(anyhow::Error::msg)?;
    let b = Busi::start().await?;
    b.set_delay(Duration::from_millis(5));
    let extra = [
        ("RETRY_INTERVAL", "1"),
        ("TIMEOUT_TO_FAIL", "2"),
        ("TRANS_CRON_INTERVAL", "1"),
        ("LOG_LEVEL", "warn"),
    ];
    let log = dir.path().join("dtm.log");
    let mut srv = ProcServer::spawn(
        std::path::Path::new(env!("CARGO_BIN_EXE_dtm")),
        &cfg,
        &extra,
        &log,
    )
    .await?;

    let n = 600;
    let (kinds, items) = plan(n, "outage", &b);
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let sub = tokio::spawn(submit_all(vec![srv.api.clone()], items, acked.clone(), 8));
    let t0 = Instant::now();
    while acked.lock().map(|a| a.len()).unwrap_or(0) < n / 4
        && t0.elapsed() < Duration::from_secs(60)
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    proxy.cut().await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    // during the outage the API says so
    let client = reqwest::Client::builder().no_proxy().build()?;
    let r = client
        .get(format!("{}/query?gid=x", srv.api))
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 503, "query during the outage");
    let body = r.text().await?;
    assert!(body.contains("unavailable"), "{body}");
    proxy.restore();
    let unavailable = sub.await?;
    eprintln!(
        "{} acknowledged, {unavailable} answered 503",
        acked.lock().map(|a| a.len()).unwrap_or(0)
    );
    let acked: BTreeSet<String> = acked.lock().map(|a| a.clone()).unwrap_or_default();
    let finished = verify(&srv.api, &kinds, &acked, &b, 120).await?;
    assert!(finished >= acked.len());
    let st = srv.terminate().await?;
    assert!(st.success());
    Ok(())
}
