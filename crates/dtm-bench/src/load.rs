//! The load generator: N concurrent workers over one pooled keep-alive client, each
//! running one kind of transaction back to back (closed loop), or at a fixed total rate
//! (open loop, latency counted from the scheduled start).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;

/// What one unit of load is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// 2-step saga, `wait_result: true`: the answer comes after both branches ran
    SagaWait,
    /// 2-step saga without wait_result: the answer comes once it is stored
    Saga,
    /// 2-step msg: prepare, then submit (what DoAndSubmit sends)
    Msg,
    /// TCC with 2 branches: prepare, (registerBranch + Try) x2, submit
    Tcc,
    /// no coordinator: the same two branch handlers called directly, one after the other
    Baseline,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::SagaWait => "saga-wait",
            Kind::Saga => "saga",
            Kind::Msg => "msg",
            Kind::Tcc => "tcc",
            Kind::Baseline => "baseline",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Some(match s {
            "saga-wait" | "saga_wait" | "sagawait" => Kind::SagaWait,
            "saga" | "saga-nowait" => Kind::Saga,
            "msg" => Kind::Msg,
            "tcc" => Kind::Tcc,
            _ => return None,
        })
    }

    /// The server finishes the transaction after answering: wait for it when verifying.
    pub fn is_async(self) -> bool {
        !matches!(self, Kind::SagaWait | Kind::Baseline)
    }
}

/// When a phase ends.
#[derive(Debug, Clone, Copy)]
pub enum Limit {
    Time(Duration),
    Count(u64),
}

/// Shared, read-only description of the run the workers need.
pub struct Target {
    pub http: reqwest::Client,
    /// `http://127.0.0.1:PORT/api/dtmsvr`
    pub api: String,
    /// `http://127.0.0.1:PORT/api/busi_bench`
    pub busi: String,
    /// gid prefix unique to this run
    pub run_id: String,
}

/// What a phase produced.
#[derive(Debug, Default)]
pub struct PhaseOut {
    /// latencies of the successful units, microseconds
    pub lat_us: Vec<u32>,
    pub ok: u64,
    pub errors: u64,
    /// first few error descriptions
    pub error_samples: Vec<String>,
    /// every gid started (also those whose call failed)
    pub gids: Vec<String>,
    /// wall time from the first start to the last answer, seconds
    pub wall: f64,
}

struct Pacer {
    start: Instant,
    interval: Duration,
    next: AtomicU64,
}

const PAYLOAD: &str = r#""{\"amount\":30}""#;

fn saga_body(busi: &str, gid: &str, wait: bool) -> String {
    format!(
        concat!(
            r#"{{"gid":"{g}","trans_type":"saga","steps":["#,
            r#"{{"action":"{b}/TransOut","compensate":"{b}/TransOutRevert"}},"#,
            r#"{{"action":"{b}/TransIn","compensate":"{b}/TransInRevert"}}],"#,
            r#""payloads":[{p},{p}]{w}}}"#
        ),
        g = gid,
        b = busi,
        p = PAYLOAD,
        w = if wait { r#","wait_result":true"# } else { "" }
    )
}

fn msg_body(busi: &str, gid: &str) -> String {
    format!(
        concat!(
            r#"{{"gid":"{g}","trans_type":"msg","steps":["#,
            r#"{{"action":"{b}/TransOut"}},{{"action":"{b}/TransIn"}}],"#,
            r#""payloads":[{p},{p}],"query_prepared":"{b}/QueryPrepared"}}"#
        ),
        g = gid,
        b = busi,
        p = PAYLOAD
    )
}

fn tcc_register(busi: &str, gid: &str, branch: &str, name: &str) -> String {
    format!(
        concat!(
            r#"{{"gid":"{g}","branch_id":"{id}","trans_type":"tcc","data":{p},"#,
            r#""confirm":"{b}/{n}Confirm","cancel":"{b}/{n}Cancel"}}"#
        ),
        g = gid,
        id = branch,
        p = PAYLOAD,
        b = busi,
        n = name
    )
}

/// Describe a failed HTTP exchange briefly.
fn short(s: &str) -> String {
    let s = s.trim();
    if s.len() > 200 {
        let mut end = 200;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...", &s[..end])
    } else {
        s.to_string()
    }
}

/// POST a JSON body; Ok when the answer is 200.
async fn post(http: &reqwest::Client, url: &str, body: String) -> Result<(), String> {
    let r = http
        .post(url)
        .header("Content-Type", "application/json")
        .body(body)
        .send()
        .await
        .map_err(|e| format!("POST {url}: {e}"))?;
    let st = r.status().as_u16();
    let text = r
        .text()
        .await
        .map_err(|e| format!("POST {url}: reading the answer: {e}"))?;
    if st == 200 && !text.contains("FAILURE") && !text.contains("ONGOING") {
        Ok(())
    } else {
        Err(format!("POST {url}: {st} {}", short(&text)))
    }
}

/// One unit of load.
async fn unit(t: &Target, kind: Kind, gid: &str) -> Result<(), String> {
    let api = &t.api;
    let busi = &t.busi;
    match kind {
        Kind::SagaWait => {
            post(
                &t.http,
                &format!("{api}/submit"),
                saga_body(busi, gid, true),
            )
            .await
        }
        Kind::Saga => {
            post(
                &t.http,
                &format!("{api}/submit"),
                saga_body(busi, gid, false),
            )
            .await
        }
        Kind::Msg => {
            post(&t.http, &format!("{api}/prepare"), msg_body(busi, gid)).await?;
            post(&t.http, &format!("{api}/submit"), msg_body(busi, gid)).await
        }
        Kind::Tcc => {
            let head = format!(r#"{{"gid":"{gid}","trans_type":"tcc"}}"#);
            post(&t.http, &format!("{api}/prepare"), head.clone()).await?;
            for (id, name) in [("01", "TransOut"), ("02", "TransIn")] {
                post(
                    &t.http,
                    &format!("{api}/registerBranch"),
                    tcc_register(busi, gid, id, name),
                )
                .await?;
                post(
                    &t.http,
                    &format!("{busi}/{name}Try?gid={gid}&trans_type=tcc&branch_id={id}&op=try"),
                    r#"{"amount":30}"#.to_string(),
                )
                .await?;
            }
            post(&t.http, &format!("{api}/submit"), head).await
        }
        Kind::Baseline => {
            for name in ["TransOut", "TransIn"] {
                post(
                    &t.http,
                    &format!("{busi}/{name}?gid={gid}&trans_type=saga&branch_id=01&op=action"),
                    r#"{"amount":30}"#.to_string(),
                )
                .await?;
            }
            Ok(())
        }
    }
}

/// Run one phase: `concurrency` workers until `limit`, optionally paced to `rate` units/s
/// in total. `tag` makes the gids of this phase distinct from other phases.
pub async fn run_phase(
    t: Arc<Target>,
    kind: Kind,
    tag: &str,
    limit: Limit,
    concurrency: usize,
    rate: Option<f64>,
) -> anyhow::Result<PhaseOut> {
    let concurrency = concurrency.max(1);
    let start = Instant::now();
    let deadline = match limit {
        Limit::Time(d) => Some(start + d),
        Limit::Count(_) => None,
    };
    let max_count = match limit {
        Limit::Count(n) => n,
        Limit::Time(_) => u64::MAX,
    };
    let issued = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let pacer = rate.filter(|r| *r > 0.0).map(|r| {
        Arc::new(Pacer {
            start,
            interval: Duration::from_secs_f64(1.0 / r),
            next: AtomicU64::new(0),
        })
    });
    let mut handles = Vec::with_capacity(concurrency);
    for w in 0..concurrency {
        let t = Arc::clone(&t);
        let issued = Arc::clone(&issued);
        let stop = Arc::clone(&stop);
        let pacer = pacer.clone();
        let prefix = format!("{}-{}-{}-{w}", t.run_id, kind.name(), tag);
        handles.push(tokio::spawn(async move {
            let mut out = PhaseOut::default();
            let mut seq: u64 = 0;
            loop {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                if issued.fetch_add(1, Ordering::Relaxed) >= max_count {
                    break;
                }
                let t0 = match &pacer {
                    Some(p) => {
                        let i = p.next.fetch_add(1, Ordering::Relaxed);
                        let at = p.start + p.interval.mul_f64(i as f64);
                        if deadline.is_some_and(|d| at >= d) {
                            break;
                        }
                        tokio::time::sleep_until(at.into()).await;
                        at
                    }
                    None => Instant::now(),
                };
                if deadline.is_some_and(|d| t0 >= d) {
                    break;
                }
                seq += 1;
                let gid = format!("{prefix}-{seq}");
                let r = unit(&t, kind, &gid).await;
                let us = t0.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
                match r {
                    Ok(()) => {
                        out.ok += 1;
                        out.lat_us.push(us);
                    }
                    Err(e) => {
                        out.errors += 1;
                        if out.error_samples.len() < 3 {
                            out.error_samples.push(e);
                        }
                    }
                }
                if kind != Kind::Baseline {
                    out.gids.push(gid);
                }
            }
            out
        }));
    }
    let mut total = PhaseOut::default();
    for h in handles {
        let o = h.await.context("a load worker panicked")?;
        total.ok += o.ok;
        total.errors += o.errors;
        total.lat_us.extend(o.lat_us);
        total.gids.extend(o.gids);
        for e in o.error_samples {
            if total.error_samples.len() < 5 {
                total.error_samples.push(e);
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    total.wall = start.elapsed().as_secs_f64();
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_valid_json() {
        let b = "http://127.0.0.1:1/api/busi_bench";
        for s in [
            saga_body(b, "g-1", true),
            saga_body(b, "g-1", false),
            msg_body(b, "g-2"),
            tcc_register(b, "g-3", "01", "TransOut"),
        ] {
            let v: serde_json::Value =
                serde_json::from_str(&s).unwrap_or_else(|e| panic!("{e}: {s}"));
            assert!(v["gid"].as_str().is_some_and(|g| g.starts_with("g-")));
        }
        let v: serde_json::Value =
            serde_json::from_str(&saga_body(b, "g", true)).unwrap_or_default();
        assert_eq!(v["wait_result"], true);
        assert_eq!(v["payloads"][1], r#"{"amount":30}"#);
        assert_eq!(v["steps"][1]["compensate"], format!("{b}/TransInRevert"));
        let v: serde_json::Value =
            serde_json::from_str(&tcc_register(b, "g", "02", "TransIn")).unwrap_or_default();
        assert_eq!(v["confirm"], format!("{b}/TransInConfirm"));
        assert_eq!(v["data"], r#"{"amount":30}"#);
    }

    #[test]
    fn kinds_round_trip() {
        for k in [Kind::SagaWait, Kind::Saga, Kind::Msg, Kind::Tcc] {
            assert_eq!(Kind::parse(k.name()), Some(k));
        }
        assert_eq!(Kind::parse("xa"), None);
        assert!(Kind::Saga.is_async() && !Kind::SagaWait.is_async());
    }
}
