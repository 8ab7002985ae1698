//! Crash safety: the `dtm` process is killed with SIGKILL while hundreds of sagas and
//! msgs are in flight against a slow branch service, and restarted on the same data.
//! Every acknowledged transaction must reach its expected final status, and no saga may
//! both compensate and succeed.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dtm_testkit::load::{plan, submit_all, verify};
use dtm_testkit::{Busi, ProcServer, test_config};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_mid_flight_loses_nothing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cfg = test_config(dir.path())?;
    let b = Busi::start().await?;
    b.set_delay(Duration::from_millis(20));
    let log = dir.path().join("dtm.log");
    let extra = [
        ("RETRY_INTERVAL", "1"),
        ("TIMEOUT_TO_FAIL", "2"),
        ("TRANS_CRON_INTERVAL", "1"),
        ("LOG_LEVEL", "warn"),
    ];
    let mut srv = ProcServer::spawn(
        std::path::Path::new(env!("CARGO_BIN_EXE_dtm")),
        &cfg,
        &extra,
        &log,
    )
    .await?;

    let n = 300;
    let (kinds, items) = plan(n, "crash", &b);
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let (first, second) = items.split_at(n / 2);

    // 1st crash: while submissions and processing are under way
    let sub = tokio::spawn(submit_all(
        vec![srv.api.clone()],
        first.to_vec(),
        acked.clone(),
        16,
    ));
    let t0 = Instant::now();
    while acked.lock().map(|a| a.len()).unwrap_or(0) < n / 4
        && t0.elapsed() < Duration::from_secs(30)
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    srv.kill9().await?;
    let _ = sub.await;
    srv.restart().await?;
    // the crash must have left work for recovery, or this test proves nothing
    let client = reqwest::Client::builder().no_proxy().build()?;
    let text = client
        .get(format!("{}/all?status=submitted&limit=1000", srv.api))
        .send()
        .await?
        .text()
        .await?;
    let pending = serde_json::from_str::<Value>(&text)?["transactions"]
        .as_array()
        .map(Vec::len)
        .unwrap_or(0);
    eprintln!(
        "first crash: {} acknowledged, {pending} left submitted",
        acked.lock().map(|a| a.len()).unwrap_or(0)
    );
    assert!(pending > 0, "the kill came after all work was done");

    // 2nd crash: recovery and new submissions running together
    let sub = tokio::spawn(submit_all(
        vec![srv.api.clone()],
        second.to_vec(),
        acked.clone(),
        16,
    ));
    tokio::time::sleep(Duration::from_millis(400)).await;
    srv.kill9().await?;
    let _ = sub.await;
    srv.restart().await?;

    let acked: BTreeSet<String> = acked.lock().map(|a| a.clone()).unwrap_or_default();
    assert!(
        acked.len() >= n / 4,
        "only {} submissions acknowledged",
        acked.len()
    );
    let finished = verify(&srv.api, &kinds, &acked, &b, 90).await?;
    assert!(finished >= acked.len());

    // a clean stop works too
    let st = srv.terminate().await?;
    assert!(st.success(), "SIGTERM exit: {st}");
    Ok(())
}
