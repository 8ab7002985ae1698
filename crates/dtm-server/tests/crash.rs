//! Crash safety: the `dtm` process is killed with SIGKILL while hundreds of sagas and
//! msgs are in flight against a slow branch service, and restarted on the same data.
//! Every acknowledged transaction must reach its expected final status, and no saga may
//! both compensate and succeed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dtm_testkit::{Busi, ProcServer, msg, test_config, transfer_saga};
use serde_json::{Value, json};

#[derive(Clone, Copy, PartialEq, Debug)]
enum Kind {
    SagaOk,
    SagaRollback,
    Msg,
}

fn body(i: usize, gid: &str, b: &Busi) -> (Kind, Value) {
    match i % 4 {
        0 => (Kind::Msg, msg(gid, b, &["TransOut", "TransIn"])),
        1 => {
            let mut v = transfer_saga(gid, b);
            let p = json!({"amount": 30, "trans_in_result": "FAILURE"}).to_string();
            v["payloads"] = json!([p, p]);
            (Kind::SagaRollback, v)
        }
        _ => (Kind::SagaOk, transfer_saga(gid, b)),
    }
}

async fn submit_all(api: String, items: Vec<(String, Value)>, acked: Arc<Mutex<BTreeSet<String>>>) {
    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap_or_default();
    let sem = Arc::new(tokio::sync::Semaphore::new(16));
    let mut tasks = vec![];
    for (gid, v) in items {
        let Ok(permit) = Arc::clone(&sem).acquire_owned().await else {
            break;
        };
        let (client, api, acked) = (client.clone(), api.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            let r = client
                .post(format!("{api}/submit"))
                .body(v.to_string())
                .send()
                .await;
            if let Ok(r) = r
                && r.status().as_u16() == 200
                && let Ok(mut a) = acked.lock()
            {
                a.insert(gid);
            }
            drop(permit);
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

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
    let mut kinds = BTreeMap::new();
    let mut items = vec![];
    for i in 0..n {
        let gid = format!("crash-{i:04}-{}", dtm_core::new_gid());
        let (k, v) = body(i, &gid, &b);
        kinds.insert(gid.clone(), k);
        items.push((gid, v));
    }
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let (first, second) = items.split_at(n / 2);

    // 1st crash: while submissions and processing are under way
    let sub = tokio::spawn(submit_all(srv.api.clone(), first.to_vec(), acked.clone()));
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
    let sub = tokio::spawn(submit_all(srv.api.clone(), second.to_vec(), acked.clone()));
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

    // every transaction that exists (acknowledged or not) must finish
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut final_status: BTreeMap<String, (String, String)> = BTreeMap::new();
    for gid in kinds.keys() {
        loop {
            let text = client
                .get(format!("{}/query?gid={gid}", srv.api))
                .send()
                .await?
                .text()
                .await?;
            let v: Value = serde_json::from_str(&text)?;
            let st = v["transaction"]["status"]
                .as_str()
                .unwrap_or("")
                .to_string();
            if st.is_empty() {
                assert!(
                    !acked.contains(gid),
                    "acknowledged {gid} is missing after the crash"
                );
                break;
            }
            if st == "succeed" || st == "failed" {
                let br: String = v["branches"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|b| b["status"].as_str()?.chars().next())
                            .collect()
                    })
                    .unwrap_or_default();
                final_status.insert(gid.clone(), (st, br));
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{gid} still '{st}' after the restart; log: {}",
                log.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    for gid in &acked {
        assert!(
            final_status.contains_key(gid),
            "acknowledged {gid} did not finish"
        );
    }
    for (gid, (st, br)) in &final_status {
        let kind = kinds[gid];
        let calls = b.calls_for(gid);
        let compensated = calls.iter().any(|c| c.q("op") == "compensate");
        match kind {
            Kind::SagaOk => {
                assert_eq!((st.as_str(), br.as_str()), ("succeed", "psps"), "{gid}");
                assert!(
                    !compensated,
                    "{gid} succeeded but was compensated: {:?}",
                    b.trace(gid)
                );
            }
            Kind::SagaRollback => {
                assert_eq!((st.as_str(), br.as_str()), ("failed", "sssf"), "{gid}");
                assert!(compensated);
            }
            Kind::Msg => assert_eq!((st.as_str(), br.as_str()), ("succeed", "ss"), "{gid}"),
        }
    }
    // a clean stop works too
    let st = srv.terminate().await?;
    assert!(st.success(), "SIGTERM exit: {st}");
    Ok(())
}
