//! Self-check: every transaction the bench started must end `succeed`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// What the check found.
#[derive(Debug, Default)]
pub struct Verdict {
    /// transactions queried and found `succeed`
    pub succeeded: u64,
    /// found in another final status, or missing
    pub wrong: u64,
    /// still unfinished when the time ran out
    pub unfinished: u64,
    /// query errors on the last attempt
    pub query_errors: u64,
    /// first few mismatches, `gid: status`
    pub samples: Vec<String>,
    /// seconds until the last transaction was seen final (from the start of the check)
    pub settle_secs: f64,
}

impl Verdict {
    pub fn ok(&self) -> bool {
        self.wrong == 0 && self.unfinished == 0 && self.query_errors == 0
    }

    pub fn checked(&self) -> u64 {
        self.succeeded + self.wrong + self.unfinished + self.query_errors
    }
}

enum One {
    Succeed,
    Pending(String),
    Wrong(String),
    QueryError(String),
}

/// The global status in a `/query` answer.
pub fn status_of(v: &Value) -> Option<&str> {
    v.get("transaction")?.get("status")?.as_str()
}

async fn query_one(http: &reqwest::Client, api: &str, gid: &str) -> One {
    let r = match http.get(format!("{api}/query?gid={gid}")).send().await {
        Ok(r) => r,
        Err(e) => return One::QueryError(format!("{gid}: query failed: {e}")),
    };
    let code = r.status().as_u16();
    let text = match r.text().await {
        Ok(t) => t,
        Err(e) => return One::QueryError(format!("{gid}: query answer unreadable: {e}")),
    };
    if code != 200 {
        return One::QueryError(format!("{gid}: query answered {code}: {text}"));
    }
    let v: Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(e) => return One::QueryError(format!("{gid}: query answer is not JSON: {e}")),
    };
    match status_of(&v) {
        Some("succeed") => One::Succeed,
        Some(s @ ("prepared" | "submitted" | "aborting")) => One::Pending(format!("{gid}: {s}")),
        Some(s) => One::Wrong(format!("{gid}: {s}")),
        None => One::Wrong(format!("{gid}: not found")),
    }
}

/// Query every gid with `concurrency` parallel requests; unfinished ones are asked again
/// until `patience` has passed.
pub async fn verify(
    http: &reqwest::Client,
    api: &str,
    gids: Vec<String>,
    concurrency: usize,
    patience: Duration,
) -> Verdict {
    let start = Instant::now();
    let mut verdict = Verdict::default();
    let mut todo = gids;
    let mut round = 0u32;
    loop {
        round += 1;
        let queue = Arc::new(Mutex::new(std::mem::take(&mut todo)));
        let mut workers = Vec::new();
        for _ in 0..concurrency.clamp(1, 64) {
            let queue = Arc::clone(&queue);
            let http = http.clone();
            let api = api.to_string();
            workers.push(tokio::spawn(async move {
                let mut found = Vec::new();
                loop {
                    let next = queue.lock().ok().and_then(|mut q| q.pop());
                    let Some(gid) = next else { break };
                    let r = query_one(&http, &api, &gid).await;
                    found.push((gid, r));
                }
                found
            }));
        }
        let mut pending_samples = Vec::new();
        let mut qerr = Vec::new();
        for w in workers {
            let Ok(found) = w.await else {
                verdict.query_errors += 1;
                continue;
            };
            for (gid, r) in found {
                match r {
                    One::Succeed => verdict.succeeded += 1,
                    One::Wrong(m) => {
                        verdict.wrong += 1;
                        if verdict.samples.len() < 5 {
                            verdict.samples.push(m);
                        }
                    }
                    One::Pending(m) => {
                        pending_samples.push(m);
                        todo.push(gid);
                    }
                    One::QueryError(m) => {
                        qerr.push(m);
                        todo.push(gid);
                    }
                }
            }
        }
        if todo.is_empty() {
            verdict.settle_secs = start.elapsed().as_secs_f64();
            return verdict;
        }
        if start.elapsed() >= patience {
            verdict.unfinished = pending_samples.len() as u64;
            verdict.query_errors += qerr.len() as u64;
            for m in pending_samples.into_iter().chain(qerr) {
                if verdict.samples.len() < 10 {
                    verdict.samples.push(m);
                }
            }
            verdict.settle_secs = start.elapsed().as_secs_f64();
            return verdict;
        }
        // unfinished ones get a moment before the next round; back off a little
        let pause = Duration::from_millis(100 * u64::from(round.min(10)));
        tokio::time::sleep(pause).await;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn status_from_query_answer() {
        let v = serde_json::json!({"transaction": {"status": "succeed"}, "branches": []});
        assert_eq!(super::status_of(&v), Some("succeed"));
        let v = serde_json::json!({"transaction": null, "branches": []});
        assert_eq!(super::status_of(&v), None);
    }
}
