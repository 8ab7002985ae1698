//! A mixed load of sagas (some rolling back) and msgs, submitted concurrently to one or
//! more servers, and the check that every transaction reached its expected final state.
//! Used by the crash, multi-node and store-outage tests.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::{Busi, msg, transfer_saga};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    /// Two-step saga expected to succeed.
    SagaOk,
    /// Two-step saga whose second action answers FAILURE: expected to roll back.
    SagaRollback,
    /// Two-branch msg expected to succeed.
    Msg,
}

/// The i-th transaction of the mix: one msg, one rolling-back saga, two succeeding sagas
/// in every four.
pub fn mixed(i: usize, gid: &str, b: &Busi) -> (Kind, Value) {
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

/// `n` transactions of the mix with unique gids.
pub fn plan(n: usize, prefix: &str, b: &Busi) -> (BTreeMap<String, Kind>, Vec<(String, Value)>) {
    let mut kinds = BTreeMap::new();
    let mut items = vec![];
    for i in 0..n {
        let gid = format!("{prefix}-{i:05}-{}", dtm_core::new_gid());
        let (k, v) = mixed(i, &gid, b);
        kinds.insert(gid.clone(), k);
        items.push((gid, v));
    }
    (kinds, items)
}

/// Submit every item, round-robin over `apis`, `concurrency` at a time; the gids answered
/// 200 go into `acked`. Returns how many submissions got a 503.
pub async fn submit_all(
    apis: Vec<String>,
    items: Vec<(String, Value)>,
    acked: Arc<Mutex<BTreeSet<String>>>,
    concurrency: usize,
) -> usize {
    let Ok(client) = reqwest::Client::builder().no_proxy().build() else {
        return 0;
    };
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let unavailable = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = vec![];
    for (i, (gid, v)) in items.into_iter().enumerate() {
        let Ok(permit) = Arc::clone(&sem).acquire_owned().await else {
            break;
        };
        let api = apis[i % apis.len().max(1)].clone();
        let (client, acked, unavailable) = (client.clone(), acked.clone(), unavailable.clone());
        tasks.push(tokio::spawn(async move {
            let r = client
                .post(format!("{api}/submit"))
                .body(v.to_string())
                .timeout(Duration::from_secs(30))
                .send()
                .await;
            if let Ok(r) = r {
                match r.status().as_u16() {
                    200 => {
                        if let Ok(mut a) = acked.lock() {
                            a.insert(gid);
                        }
                    }
                    503 => {
                        unavailable.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    _ => {}
                }
            }
            drop(permit);
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    unavailable.load(std::sync::atomic::Ordering::Relaxed)
}

/// Wait (up to `secs`) until every transaction of `kinds` that exists is final, then check:
/// every acknowledged one exists; each finished as its kind expects, with the expected
/// branch statuses; no saga both succeeded and was compensated.
pub async fn verify(
    api: &str,
    kinds: &BTreeMap<String, Kind>,
    acked: &BTreeSet<String>,
    b: &Busi,
    secs: u64,
) -> anyhow::Result<usize> {
    let client = reqwest::Client::builder().no_proxy().build()?;
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut finished = 0;
    for (gid, kind) in kinds {
        let (st, br) = loop {
            let text = client
                .get(format!("{api}/query?gid={gid}"))
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
                anyhow::ensure!(!acked.contains(gid), "acknowledged {gid} is missing");
                break (st, String::new());
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
                break (st, br);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{gid} still '{st}' after {secs}s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        if st.is_empty() {
            continue;
        }
        finished += 1;
        let compensated = b.calls_for(gid).iter().any(|c| c.q("op") == "compensate");
        match kind {
            Kind::SagaOk => {
                anyhow::ensure!(
                    (st.as_str(), br.as_str()) == ("succeed", "psps"),
                    "{gid}: {st} {br}"
                );
                anyhow::ensure!(
                    !compensated,
                    "{gid} succeeded but was compensated: {:?}",
                    b.trace(gid)
                );
            }
            Kind::SagaRollback => {
                anyhow::ensure!(
                    (st.as_str(), br.as_str()) == ("failed", "sssf"),
                    "{gid}: {st} {br}"
                );
                anyhow::ensure!(compensated, "{gid} failed without compensation");
            }
            Kind::Msg => anyhow::ensure!(
                (st.as_str(), br.as_str()) == ("succeed", "ss"),
                "{gid}: {st} {br}"
            ),
        }
    }
    Ok(finished)
}
