//! Table-driven tests of the mode processors over branch outcomes, with an in-memory store
//! and a scripted branch caller: which branches are called in which order, what statuses
//! and schedule each pass leaves.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use dtm_proto::{Branch, BranchOutcome, TransGlobal, TransOptions, status};

use super::PassEnd;
use crate::caller::{BranchCall, BranchCaller};
use crate::service::Coordinator;
use crate::settings::Settings;
use crate::store::{Kv, ScanQuery, Store, StoreError, WriteOp, WriteOutcome};

#[derive(Default)]
struct Mem {
    globals: HashMap<String, TransGlobal>,
    branches: HashMap<String, Vec<Branch>>,
}

#[derive(Default)]
struct MemStore(Mutex<Mem>);

#[async_trait]
impl Store for MemStore {
    fn describe(&self) -> String {
        "memory".into()
    }
    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
    async fn find_global(&self, gid: &str) -> Result<Option<TransGlobal>, StoreError> {
        Ok(self
            .0
            .lock()
            .map_err(|_| StoreError::NotFound)?
            .globals
            .get(gid)
            .cloned())
    }
    async fn find_branches(&self, gid: &str) -> Result<Vec<Branch>, StoreError> {
        Ok(self
            .0
            .lock()
            .map_err(|_| StoreError::NotFound)?
            .branches
            .get(gid)
            .cloned()
            .unwrap_or_default())
    }
    async fn scan_globals(&self, _q: &ScanQuery) -> Result<(Vec<TransGlobal>, String), StoreError> {
        Ok((vec![], String::new()))
    }
    async fn scan_kv(
        &self,
        _c: &str,
        _p: &str,
        _l: usize,
    ) -> Result<(Vec<Kv>, String), StoreError> {
        Ok((vec![], String::new()))
    }
    async fn find_kv(&self, _c: &str, _k: Option<&str>) -> Result<Vec<Kv>, StoreError> {
        Ok(vec![])
    }
    async fn write(&self, op: WriteOp) -> Result<WriteOutcome, StoreError> {
        let mut m = self.0.lock().map_err(|_| StoreError::NotFound)?;
        match op {
            WriteOp::SaveNew { global, branches } => {
                if m.globals.contains_key(&global.gid) {
                    return Err(StoreError::UniqueConflict);
                }
                m.branches.insert(global.gid.clone(), branches);
                m.globals.insert(global.gid.clone(), global);
            }
            WriteOp::UpdateGlobal {
                gid,
                expect_status,
                expect_owner,
                set,
                branches,
            } => {
                let g = m.globals.get_mut(&gid).ok_or(StoreError::NotFound)?;
                if g.status != expect_status || expect_owner.is_some_and(|o| o != g.owner) {
                    return Err(StoreError::NotFound);
                }
                set.apply_to(g);
                let bs = m.branches.entry(gid).or_default();
                for u in branches {
                    if let Some(b) = bs
                        .iter_mut()
                        .find(|b| b.branch_id == u.branch_id && b.op == u.op)
                    {
                        b.status = u.status;
                    }
                }
            }
            _ => {}
        }
        Ok(WriteOutcome::Done)
    }
}

/// Answers per (route, op) in order; afterwards success. Records `route/op` of each call.
#[derive(Default)]
struct Script {
    answers: Mutex<HashMap<String, VecDeque<BranchOutcome>>>,
    calls: Mutex<Vec<String>>,
}

#[async_trait]
impl BranchCaller for Script {
    async fn call(&self, c: &BranchCall) -> BranchOutcome {
        let key = format!("{}/{}", c.url, c.op);
        if let Ok(mut calls) = self.calls.lock() {
            calls.push(key.clone());
        }
        self.answers
            .lock()
            .ok()
            .and_then(|mut a| a.get_mut(&key).and_then(VecDeque::pop_front))
            .unwrap_or(BranchOutcome::Success)
    }
    async fn post_json(
        &self,
        _u: &str,
        _b: &serde_json::Value,
        _t: Duration,
    ) -> Result<(), String> {
        Ok(())
    }
}

fn fail() -> BranchOutcome {
    BranchOutcome::Failure("FAILURE".into())
}
fn ongoing() -> BranchOutcome {
    BranchOutcome::Ongoing("ONGOING".into())
}
fn error() -> BranchOutcome {
    BranchOutcome::Error("boom".into())
}

struct Case {
    name: &'static str,
    trans_type: &'static str,
    status: &'static str,
    /// (branch_id, op, url) in storage order
    rows: Vec<(&'static str, &'static str, &'static str)>,
    opts: TransOptions,
    custom: &'static str,
    age_secs: i64,
    answers: Vec<(&'static str, Vec<BranchOutcome>)>,
    want_status: &'static str,
    want_branches: &'static str,
    want_calls: Vec<&'static str>,
    /// Lease owner stored with the global; `None`: this node.
    owner: Option<&'static str>,
}

fn saga_rows() -> Vec<(&'static str, &'static str, &'static str)> {
    vec![
        ("01", "compensate", "c1"),
        ("01", "action", "a1"),
        ("02", "compensate", "c2"),
        ("02", "action", "a2"),
    ]
}

fn case(name: &'static str) -> Case {
    Case {
        name,
        trans_type: "saga",
        status: status::SUBMITTED,
        rows: saga_rows(),
        opts: TransOptions::default(),
        custom: "",
        age_secs: 0,
        answers: vec![],
        want_status: "",
        want_branches: "",
        want_calls: vec![],
        owner: None,
    }
}

async fn run_case(c: Case) -> (String, String, Vec<String>, TransGlobal, PassEnd) {
    let store = Arc::new(MemStore::default());
    let script = Arc::new(Script::default());
    if let Ok(mut a) = script.answers.lock() {
        for (k, v) in c.answers {
            a.insert(k.to_string(), v.into_iter().collect());
        }
    }
    let co = Coordinator::new(store.clone(), script.clone(), Settings::default());
    let now = Utc::now();
    let g = TransGlobal {
        gid: "g".into(),
        trans_type: c.trans_type.into(),
        status: c.status.into(),
        protocol: "http".into(),
        query_prepared: "qp".into(),
        create_time: Some(now - chrono::Duration::seconds(c.age_secs)),
        options: c.opts.to_json(),
        custom_data: c.custom.into(),
        next_cron_interval: 10,
        owner: c
            .owner
            .map(str::to_string)
            .unwrap_or_else(|| co.node.clone()),
        ..Default::default()
    };
    let branches: Vec<Branch> = c
        .rows
        .iter()
        .map(|(id, op, url)| Branch {
            gid: "g".into(),
            branch_id: id.to_string(),
            op: op.to_string(),
            url: url.to_string(),
            status: status::PREPARED.into(),
            ..Default::default()
        })
        .collect();
    let _ = store
        .write(WriteOp::SaveNew {
            global: g.clone(),
            branches: branches.clone(),
        })
        .await;
    let end = super::run(&co, g, branches).await;
    let stored = store
        .find_global("g")
        .await
        .ok()
        .flatten()
        .unwrap_or_default();
    let bs: String = store
        .find_branches("g")
        .await
        .unwrap_or_default()
        .iter()
        .map(|b| b.status.chars().next().unwrap_or('?'))
        .collect();
    let calls = script.calls.lock().map(|c| c.clone()).unwrap_or_default();
    (stored.status.clone(), bs, calls, stored, end)
}

#[tokio::test]
async fn processors_follow_the_protocol() {
    let cases = vec![
        Case {
            want_status: "succeed",
            want_branches: "psps",
            want_calls: vec!["a1/action", "a2/action"],
            ..case("saga normal")
        },
        Case {
            answers: vec![("a2/action", vec![fail()])],
            want_status: "failed",
            want_branches: "sssf",
            want_calls: vec!["a1/action", "a2/action", "c2/compensate", "c1/compensate"],
            ..case("saga rollback compensates the failed step too, in reverse")
        },
        Case {
            answers: vec![("a1/action", vec![fail()])],
            want_status: "failed",
            want_branches: "sfpp",
            want_calls: vec!["a1/action", "c1/compensate"],
            ..case("saga first step fails: later steps untouched")
        },
        Case {
            answers: vec![("a1/action", vec![ongoing()])],
            want_status: "submitted",
            want_branches: "pppp",
            want_calls: vec!["a1/action"],
            ..case("saga ongoing stays submitted")
        },
        Case {
            answers: vec![
                ("a2/action", vec![fail()]),
                ("c1/compensate", vec![error()]),
            ],
            want_status: "aborting",
            want_branches: "pssf",
            want_calls: vec!["a1/action", "a2/action", "c2/compensate", "c1/compensate"],
            ..case("saga compensation error leaves it aborting")
        },
        Case {
            opts: TransOptions {
                timeout_to_fail: 5,
                ..Default::default()
            },
            age_secs: 10,
            want_status: "failed",
            want_branches: "sppp",
            want_calls: vec!["c1/compensate"],
            ..case("saga timed out before the pass: the runnable step is compensated")
        },
        Case {
            status: status::ABORTING,
            want_status: "failed",
            want_branches: "sppp",
            want_calls: vec!["c1/compensate"],
            ..case("saga recovered in aborting after a crash")
        },
        Case {
            custom: r#"{"concurrent":true,"orders":{"1":[0]}}"#,
            answers: vec![("a1/action", vec![fail()])],
            want_status: "failed",
            want_branches: "sfpp",
            want_calls: vec!["a1/action", "c1/compensate"],
            ..case("saga concurrent with orders: a dependent step never starts")
        },
        Case {
            opts: TransOptions {
                retry_limit: 2,
                ..Default::default()
            },
            answers: vec![("a2/action", vec![error(), error(), error()])],
            want_status: "failed",
            want_branches: "sssp",
            want_calls: vec![
                "a1/action",
                "a2/action",
                "a2/action",
                "a2/action",
                "c2/compensate",
                "c1/compensate",
            ],
            ..case("saga retry limit exhausted aborts")
        },
        Case {
            trans_type: "msg",
            status: status::PREPARED,
            rows: vec![("01", "action", "m1"), ("02", "action", "m2")],
            age_secs: 100,
            want_status: "succeed",
            want_branches: "ss",
            want_calls: vec!["qp/msg", "m1/action", "m2/action"],
            ..case("msg timed out, back-check SUCCESS")
        },
        Case {
            trans_type: "msg",
            status: status::PREPARED,
            rows: vec![("01", "action", "m1")],
            age_secs: 100,
            answers: vec![("qp/msg", vec![fail()])],
            want_status: "failed",
            want_branches: "p",
            want_calls: vec!["qp/msg"],
            ..case("msg back-check FAILURE")
        },
        Case {
            trans_type: "msg",
            status: status::PREPARED,
            rows: vec![("01", "action", "m1")],
            age_secs: 1,
            want_status: "prepared",
            want_branches: "p",
            want_calls: vec![],
            ..case("msg not timed out is left alone")
        },
        Case {
            trans_type: "msg",
            rows: vec![("01", "action", "m1"), ("02", "action", "m2")],
            answers: vec![("m1/action", vec![fail()])],
            want_status: "submitted",
            want_branches: "pp",
            want_calls: vec!["m1/action"],
            ..case("msg branch FAILURE is retried, not final")
        },
        Case {
            trans_type: "tcc",
            rows: vec![
                ("01", "cancel", "x1"),
                ("01", "confirm", "y1"),
                ("02", "cancel", "x2"),
                ("02", "confirm", "y2"),
            ],
            want_status: "succeed",
            want_branches: "psps",
            want_calls: vec!["y2/confirm", "y1/confirm"],
            ..case("tcc confirms last to first")
        },
        Case {
            trans_type: "tcc",
            status: status::PREPARED,
            age_secs: 100,
            rows: vec![
                ("01", "cancel", "x1"),
                ("01", "confirm", "y1"),
                ("02", "cancel", "x2"),
                ("02", "confirm", "y2"),
            ],
            want_status: "failed",
            want_branches: "spsp",
            want_calls: vec!["x2/cancel", "x1/cancel"],
            ..case("tcc prepared timed out cancels")
        },
        Case {
            trans_type: "xa",
            status: status::ABORTING,
            rows: vec![
                ("01", "rollback", "r1"),
                ("01", "commit", "k1"),
                ("02", "rollback", "r2"),
                ("02", "commit", "k2"),
            ],
            answers: vec![("r2/rollback", vec![ongoing()])],
            want_status: "aborting",
            want_branches: "sppp",
            want_calls: vec!["r1/rollback", "r2/rollback"],
            ..case("xa rolls back first to last, stops at ongoing")
        },
    ];
    for c in cases {
        let name = c.name;
        let want = (c.want_status, c.want_branches, c.want_calls.clone());
        let (st, bs, calls, _, _) = run_case(c).await;
        assert_eq!(
            (
                st.as_str(),
                bs.as_str(),
                calls.iter().map(String::as_str).collect::<Vec<_>>()
            ),
            (want.0, want.1, want.2),
            "case: {name}"
        );
    }
}

#[tokio::test]
async fn schedule_after_a_pass() {
    // an error doubles the interval; ongoing keeps it
    let (_, _, _, g, end) = run_case(Case {
        answers: vec![("a1/action", vec![error()])],
        ..case("error")
    })
    .await;
    assert_eq!(g.next_cron_interval, 20);
    assert_eq!(end, PassEnd::Done);
    let secs = (g.next_cron_time.unwrap_or_default() - Utc::now()).num_milliseconds();
    assert!((19_000..=22_100).contains(&secs), "next check in {secs} ms");
    let (_, _, _, g, _) = run_case(Case {
        answers: vec![("a1/action", vec![ongoing()])],
        ..case("ongoing")
    })
    .await;
    assert_eq!(g.next_cron_interval, 10);
    // a tcc confirm error is reported to wait_result callers
    let (_, _, _, _, end) = run_case(Case {
        trans_type: "tcc",
        rows: vec![("01", "cancel", "x1"), ("01", "confirm", "y1")],
        answers: vec![("y1/confirm", vec![error()])],
        ..case("tcc error")
    })
    .await;
    assert!(matches!(end, PassEnd::Error(_)), "{end:?}");
}

#[tokio::test]
async fn a_pass_stops_when_another_node_took_the_lease() {
    let (st, _, calls, _, end) = run_case(Case {
        owner: Some("another-node"),
        ..case("lease held by another node")
    })
    .await;
    assert_eq!(end, PassEnd::Superseded);
    assert_eq!(
        st, "submitted",
        "the write of a node without the lease must fail"
    );
    assert!(
        calls.is_empty(),
        "no branch is called without the lease: {calls:?}"
    );
}

/// dtm TestSetNextCron: the base retry interval is the transaction's `retry_interval`
/// when given, else its `timeout_to_fail` when that is shorter than the server's
/// RetryInterval, else the server's RetryInterval.
#[test]
fn base_retry_interval() {
    let co = Coordinator::new(
        Arc::new(MemStore::default()),
        Arc::new(Script::default()),
        Settings {
            retry_interval: 10,
            ..Settings::default()
        },
    );
    let o = |retry_interval: i64, timeout_to_fail: i64| TransOptions {
        retry_interval,
        timeout_to_fail,
        ..TransOptions::default()
    };
    assert_eq!(co.base_interval(&o(15, 0)), 15);
    assert_eq!(co.base_interval(&o(0, 0)), 10);
    assert_eq!(co.base_interval(&o(0, 3)), 3);
    assert_eq!(co.base_interval(&o(0, 30)), 10);
    assert_eq!(co.base_interval(&o(15, 3)), 15);
}

/// Headers an old dtm server kept in `ext_data` (`passthrough_headers`) are sent to the
/// branches, as dtm does for such rows; `branch_headers` win over them.
#[test]
fn passthrough_headers_of_old_rows_reach_branch_calls() {
    let co = Coordinator::new(
        Arc::new(MemStore::default()),
        Arc::new(Script::default()),
        Settings::default(),
    );
    let g = TransGlobal {
        gid: "g".into(),
        trans_type: "saga".into(),
        options: r#"{"branch_headers":{"x-both":"branch"}}"#.into(),
        ext_data: r#"{"headers":{"x-old":"1","x-both":"ext"}}"#.into(),
        ..TransGlobal::default()
    };
    let ctx = super::Ctx::new(&co, g, vec![]);
    let call = ctx.call("http://b/x", vec![], "01", "action");
    let h: Vec<(&str, &str)> = call
        .headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(h, [("x-both", "branch"), ("x-old", "1")]);

    // no ext_data, or another shape: nothing added
    for ext in ["", "{}", "not json", r#"{"headers":[1]}"#] {
        let g = TransGlobal {
            ext_data: ext.into(),
            ..TransGlobal::default()
        };
        let ctx = super::Ctx::new(&co, g, vec![]);
        assert!(
            ctx.call("u", vec![], "01", "action").headers.is_empty(),
            "{ext}"
        );
    }
}
