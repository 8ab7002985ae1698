//! Several stateless nodes on one shared store: three `dtm` processes share a few
//! thousand sagas and msgs; one is killed with SIGKILL mid-run and never comes back; the
//! others finish everything. Runs on the shared backends (postgres, mysql, redis); the
//! embedded store is one process's file, so it is skipped there.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dtm_testkit::load::{plan, submit_all, verify};
use dtm_testkit::{Busi, ProcServer, test_config, test_store};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_share_the_work_and_survive_a_kill() -> anyhow::Result<()> {
    if test_store() == "sqlite" {
        eprintln!(
            "multi-node test skipped on the embedded store (set DTM_TEST_STORE to a shared backend)"
        );
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let cfg = test_config(dir.path())?;
    let b = Busi::start().await?;
    b.set_delay(Duration::from_millis(5));
    let extra = [
        ("RETRY_INTERVAL", "1"),
        ("TIMEOUT_TO_FAIL", "2"),
        ("TRANS_CRON_INTERVAL", "1"),
        ("LOG_LEVEL", "warn"),
    ];
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_dtm"));
    let mut nodes = vec![];
    for i in 0..3 {
        let log = dir.path().join(format!("dtm-{i}.log"));
        nodes.push(ProcServer::spawn(bin, &cfg, &extra, &log).await?);
    }
    let apis: Vec<String> = nodes.iter().map(|n| n.api.clone()).collect();
    let n = 2000;
    let (kinds, items) = plan(n, "multi", &b);
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let sub = tokio::spawn(submit_all(apis, items, acked.clone(), 32));
    let t0 = Instant::now();
    while acked.lock().map(|a| a.len()).unwrap_or(0) < n / 3
        && t0.elapsed() < Duration::from_secs(60)
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    nodes[0].kill9().await?;
    let _ = sub.await;
    let acked: BTreeSet<String> = acked.lock().map(|a| a.clone()).unwrap_or_default();
    eprintln!("{} of {n} submissions acknowledged", acked.len());
    assert!(
        acked.len() >= n / 2,
        "too few acknowledged: {}",
        acked.len()
    );
    let finished = verify(&nodes[1].api, &kinds, &acked, &b, 120).await?;
    assert!(finished >= acked.len());
    // the survivors stop cleanly
    for node in &mut nodes[1..] {
        let st = node.terminate().await?;
        assert!(st.success());
    }
    Ok(())
}
