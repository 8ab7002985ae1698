//! The `Store` contract, as the engine relies on it, written once and run against every
//! backend (each backend's test file calls `contract_tests!(open_fn)`, where `open_fn`
//! gives a fresh, empty store or `None` to skip).

#![allow(dead_code)]

use std::collections::HashSet;
use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use dtm_core::store::{
    BranchUpdate, GlobalUpdate, ScanQuery, Store, StoreError, WriteOp, WriteOutcome,
};
use dtm_proto::{Branch, TransGlobal};

/// Generate one `#[tokio::test]` per contract check for a backend.
#[macro_export]
macro_rules! contract_tests {
    ($open:path) => {
        $crate::contract_tests!($open;
            save_new_and_read_back,
            save_new_with_many_branches,
            save_new_conflicts_on_gid_and_duplicate_branches,
            add_branches_guards_status_and_uniqueness,
            update_global_guards_status_and_owner,
            update_global_finishing_leaves_recovery,
            claim_due_leases_and_respects_limit,
            reset_next_cron_time_makes_due,
            reset_cron_time_pulls_back_in_batches,
            kv_versions_and_paging,
            scan_globals_pages_and_filters,
            concurrent_writes_are_batched_and_guarded,
        );
    };
    ($open:path; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let Some(b) = $open().await else { return };
                contract::$name(b.store.as_ref()).await;
                b.store.close().await;
                b.cleanup.await;
            }
        )*
    };
}

type S<'a> = &'a dyn Store;

/// Now, at millisecond precision (what every backend stores).
pub fn now() -> DateTime<Utc> {
    DateTime::from_timestamp_millis(Utc::now().timestamp_millis()).unwrap_or_default()
}

pub fn global(gid: &str, status: &str, next: Option<DateTime<Utc>>) -> TransGlobal {
    let t = now();
    TransGlobal {
        gid: gid.into(),
        trans_type: "saga".into(),
        status: status.into(),
        protocol: "http".into(),
        create_time: Some(t),
        update_time: Some(t),
        options: r#"{"concurrent":false}"#.into(),
        next_cron_interval: 10,
        next_cron_time: next,
        owner: "node-a".into(),
        ..Default::default()
    }
}

pub fn branch(gid: &str, id: &str, op: &str) -> Branch {
    let t = now();
    Branch {
        gid: gid.into(),
        url: format!("http://busi/{id}/{op}"),
        bin_data: format!("payload {id}").into_bytes(),
        branch_id: id.into(),
        op: op.into(),
        status: "prepared".into(),
        create_time: Some(t),
        update_time: Some(t),
        ..Default::default()
    }
}

async fn ok(s: S<'_>, op: WriteOp) -> WriteOutcome {
    let what = format!("{op:?}");
    s.write(op)
        .await
        .unwrap_or_else(|e| panic!("{what} failed: {e}"))
}

async fn err(s: S<'_>, op: WriteOp) -> StoreError {
    let what = format!("{op:?}");
    match s.write(op).await {
        Ok(o) => panic!("{what} should fail, got {o:?}"),
        Err(e) => e,
    }
}

async fn save(s: S<'_>, g: TransGlobal, branches: Vec<Branch>) {
    ok(
        s,
        WriteOp::SaveNew {
            global: g,
            branches,
        },
    )
    .await;
}

async fn find(s: S<'_>, gid: &str) -> TransGlobal {
    s.find_global(gid)
        .await
        .unwrap_or_else(|e| panic!("find_global {gid}: {e}"))
        .unwrap_or_else(|| panic!("gid {gid} not found"))
}

async fn branches(s: S<'_>, gid: &str) -> Vec<(String, String, String)> {
    s.find_branches(gid)
        .await
        .unwrap_or_else(|e| panic!("find_branches {gid}: {e}"))
        .into_iter()
        .map(|b| (b.branch_id, b.op, b.status))
        .collect()
}

fn trio(id: &str, op: &str, st: &str) -> (String, String, String) {
    (id.into(), op.into(), st.into())
}

fn update(status: Option<&str>) -> GlobalUpdate {
    GlobalUpdate {
        status: status.map(str::to_string),
        update_time: now(),
        ..Default::default()
    }
}

async fn claim(s: S<'_>, at: DateTime<Utc>, limit: usize, owner: &str) -> Vec<TransGlobal> {
    match ok(
        s,
        WriteOp::ClaimDue {
            now: at,
            limit,
            lease_until: at + Duration::seconds(30),
            owner: owner.into(),
        },
    )
    .await
    {
        WriteOutcome::Claimed(v) => v,
        o => panic!("ClaimDue answered {o:?}"),
    }
}

fn gids(v: &[TransGlobal]) -> HashSet<String> {
    v.iter().map(|g| g.gid.clone()).collect()
}

pub async fn save_new_and_read_back(s: S<'_>) {
    let past = now() - Duration::seconds(5);
    let mut g = global("read-1", "prepared", Some(past));
    g.query_prepared = "http://busi/query".into();
    g.custom_data = "cd".into();
    g.rollback_reason = "why".into();
    g.ext_data = "ext".into();
    let bs: Vec<Branch> = (1..=12)
        .map(|i| {
            branch(
                "read-1",
                &format!("{i:02}"),
                if i % 2 == 0 { "compensate" } else { "action" },
            )
        })
        .collect();
    save(s, g.clone(), bs.clone()).await;
    let got = find(s, "read-1").await;
    assert_eq!(
        TransGlobal {
            id: 0,
            ..got.clone()
        },
        TransGlobal { id: 0, ..g },
        "the global reads back as written"
    );
    let got_b = s
        .find_branches("read-1")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(got_b.len(), 12);
    for (want, got) in bs.iter().zip(&got_b) {
        assert_eq!(
            Branch {
                id: 0,
                ..got.clone()
            },
            Branch {
                id: 0,
                ..want.clone()
            },
            "branches read back in insertion order with payloads"
        );
    }
    assert!(
        s.find_global("nope")
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .is_none()
    );
    assert!(
        s.find_branches("nope")
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .is_empty()
    );
}

pub async fn save_new_with_many_branches(s: S<'_>) {
    let bs: Vec<Branch> = (0..1500)
        .map(|i| branch("many", &format!("{i:04}"), "action"))
        .collect();
    save(s, global("many", "prepared", None), bs).await;
    let got = branches(s, "many").await;
    assert_eq!(got.len(), 1500);
    assert!(
        got.iter()
            .enumerate()
            .all(|(i, b)| b.0 == format!("{i:04}")),
        "insertion order"
    );
    let more: Vec<Branch> = (1500..2600)
        .map(|i| branch("many", &format!("{i:04}"), "action"))
        .collect();
    ok(
        s,
        WriteOp::AddBranches {
            gid: "many".into(),
            expect_status: "prepared".into(),
            branches: more,
        },
    )
    .await;
    assert_eq!(branches(s, "many").await.len(), 2600);
}

pub async fn save_new_conflicts_on_gid_and_duplicate_branches(s: S<'_>) {
    save(
        s,
        global("dup-1", "prepared", None),
        vec![branch("dup-1", "01", "action")],
    )
    .await;
    let e = err(
        s,
        WriteOp::SaveNew {
            global: global("dup-1", "submitted", None),
            branches: vec![],
        },
    )
    .await;
    assert_eq!(e, StoreError::UniqueConflict);
    assert_eq!(
        find(s, "dup-1").await.status,
        "prepared",
        "the first one stays"
    );
    let e = err(
        s,
        WriteOp::SaveNew {
            global: global("dup-2", "prepared", None),
            branches: vec![
                branch("dup-2", "01", "action"),
                branch("dup-2", "01", "action"),
            ],
        },
    )
    .await;
    assert_eq!(e, StoreError::UniqueConflict);
    assert!(
        s.find_global("dup-2")
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .is_none(),
        "a failed SaveNew leaves nothing"
    );
}

pub async fn add_branches_guards_status_and_uniqueness(s: S<'_>) {
    save(
        s,
        global("add-1", "prepared", None),
        vec![branch("add-1", "01", "try")],
    )
    .await;
    let add = |status: &str, bs: Vec<Branch>| WriteOp::AddBranches {
        gid: "add-1".into(),
        expect_status: status.into(),
        branches: bs,
    };
    let e = err(s, add("submitted", vec![branch("add-1", "02", "try")])).await;
    assert_eq!(e, StoreError::NotFound, "wrong status");
    let e = err(
        s,
        WriteOp::AddBranches {
            gid: "add-missing".into(),
            expect_status: "prepared".into(),
            branches: vec![branch("add-missing", "01", "try")],
        },
    )
    .await;
    assert_eq!(e, StoreError::NotFound, "unknown gid");
    let e = err(
        s,
        add(
            "prepared",
            vec![branch("add-1", "02", "try"), branch("add-1", "01", "try")],
        ),
    )
    .await;
    assert_eq!(e, StoreError::UniqueConflict, "existing (branch_id, op)");
    assert_eq!(
        branches(s, "add-1").await.len(),
        1,
        "nothing of a failed add is kept"
    );
    ok(
        s,
        add(
            "prepared",
            vec![
                branch("add-1", "01", "confirm"),
                branch("add-1", "01", "cancel"),
            ],
        ),
    )
    .await;
    ok(s, add("prepared", vec![branch("add-1", "02", "try")])).await;
    assert_eq!(
        branches(s, "add-1").await,
        vec![
            trio("01", "try", "prepared"),
            trio("01", "confirm", "prepared"),
            trio("01", "cancel", "prepared"),
            trio("02", "try", "prepared"),
        ]
    );
}

pub async fn update_global_guards_status_and_owner(s: S<'_>) {
    save(
        s,
        global("upd-1", "prepared", Some(now())),
        vec![
            branch("upd-1", "01", "action"),
            branch("upd-1", "02", "action"),
        ],
    )
    .await;
    let upd = |status: &str, owner: Option<&str>, set: GlobalUpdate, ups: Vec<BranchUpdate>| {
        WriteOp::UpdateGlobal {
            gid: "upd-1".into(),
            expect_status: status.into(),
            expect_owner: owner.map(str::to_string),
            set,
            branches: ups,
        }
    };
    let bu = |id: &str, st: &str| BranchUpdate {
        branch_id: id.into(),
        op: "action".into(),
        status: st.into(),
        time: now(),
    };
    assert_eq!(
        err(s, upd("submitted", None, update(Some("aborting")), vec![])).await,
        StoreError::NotFound,
        "status guard"
    );
    assert_eq!(
        err(
            s,
            upd(
                "prepared",
                Some("node-b"),
                update(Some("submitted")),
                vec![bu("01", "succeed")]
            )
        )
        .await,
        StoreError::NotFound,
        "owner guard"
    );
    assert_eq!(
        branches(s, "upd-1").await[0].2,
        "prepared",
        "a failed update changes no branch"
    );
    let e = err(
        s,
        WriteOp::UpdateGlobal {
            gid: "upd-missing".into(),
            expect_status: "prepared".into(),
            expect_owner: None,
            set: update(Some("submitted")),
            branches: vec![],
        },
    )
    .await;
    assert_eq!(e, StoreError::NotFound, "unknown gid");
    let t = now() + Duration::seconds(7);
    let set = GlobalUpdate {
        status: Some("submitted".into()),
        custom_data: Some("cd2".into()),
        result: Some("res".into()),
        next_cron_time: Some(t),
        next_cron_interval: Some(20),
        owner: Some("node-b".into()),
        update_time: now(),
        ..Default::default()
    };
    // an update for a branch that does not exist is ignored, like an SQL UPDATE
    ok(
        s,
        upd(
            "prepared",
            Some("node-a"),
            set,
            vec![bu("01", "succeed"), bu("09", "succeed")],
        ),
    )
    .await;
    let g = find(s, "upd-1").await;
    assert_eq!(
        (
            g.status.as_str(),
            g.custom_data.as_str(),
            g.result.as_str(),
            g.owner.as_str()
        ),
        ("submitted", "cd2", "res", "node-b")
    );
    assert_eq!((g.next_cron_time, g.next_cron_interval), (Some(t), 20));
    assert_eq!(g.rollback_reason, "", "columns not set stay");
    assert_eq!(
        branches(s, "upd-1").await,
        vec![
            trio("01", "action", "succeed"),
            trio("02", "action", "prepared")
        ]
    );
    let b = s
        .find_branches("upd-1")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(b[0].finish_time.is_some() && b[1].finish_time.is_none());
    // no owner given: only the status guard applies
    ok(s, upd("submitted", None, update(None), vec![])).await;
}

pub async fn update_global_finishing_leaves_recovery(s: S<'_>) {
    let past = now() - Duration::seconds(5);
    save(s, global("fin-1", "submitted", Some(past)), vec![]).await;
    save(s, global("fin-2", "submitted", Some(past)), vec![]).await;
    let mut set = update(Some("succeed"));
    set.finish_time = Some(now());
    ok(
        s,
        WriteOp::UpdateGlobal {
            gid: "fin-1".into(),
            expect_status: "submitted".into(),
            expect_owner: None,
            set,
            branches: vec![],
        },
    )
    .await;
    let mut set = update(Some("failed"));
    set.rollback_time = Some(now());
    // a final status with a next_cron_time (as a caller might send) is still never due
    set.next_cron_time = Some(past);
    ok(
        s,
        WriteOp::UpdateGlobal {
            gid: "fin-2".into(),
            expect_status: "submitted".into(),
            expect_owner: None,
            set,
            branches: vec![],
        },
    )
    .await;
    assert!(
        claim(s, now() + Duration::hours(1), 10, "x")
            .await
            .is_empty(),
        "finished transactions are never claimed"
    );
    ok(
        s,
        WriteOp::ResetNextCronTime {
            gid: "fin-1".into(),
            now: now(),
        },
    )
    .await;
    assert!(
        claim(s, now() + Duration::hours(1), 10, "x")
            .await
            .is_empty(),
        "not even after resetNextCronTime"
    );
    let g = find(s, "fin-1").await;
    assert_eq!(g.status, "succeed");
    assert!(g.finish_time.is_some());
}

pub async fn claim_due_leases_and_respects_limit(s: S<'_>) {
    let t = now();
    for i in 0..5 {
        save(
            s,
            global(
                &format!("due-{i}"),
                "submitted",
                Some(t - Duration::seconds(1)),
            ),
            vec![],
        )
        .await;
    }
    save(
        s,
        global("later", "prepared", Some(t + Duration::seconds(60))),
        vec![],
    )
    .await;
    save(s, global("never", "prepared", None), vec![]).await;
    let first = claim(s, t, 2, "node-x").await;
    assert_eq!(first.len(), 2, "limit");
    for g in &first {
        assert_eq!(g.owner, "node-x");
        assert_eq!(
            g.next_cron_time,
            Some(t + Duration::seconds(30)),
            "lease set"
        );
        let stored = find(s, &g.gid).await;
        assert_eq!(
            (stored.owner.as_str(), stored.next_cron_time),
            ("node-x", Some(t + Duration::seconds(30)))
        );
    }
    let rest = claim(s, t, 10, "node-y").await;
    assert_eq!(rest.len(), 3);
    let all: HashSet<String> = gids(&first).union(&gids(&rest)).cloned().collect();
    assert_eq!(
        all,
        (0..5).map(|i| format!("due-{i}")).collect(),
        "each due one once"
    );
    assert!(
        claim(s, t, 10, "node-z").await.is_empty(),
        "leased ones wait for the lease"
    );
    let again = claim(s, t + Duration::seconds(31), 10, "node-z").await;
    assert_eq!(
        gids(&again),
        all,
        "a lapsed lease is claimed again; 'later' is not due yet"
    );
    assert!(again.iter().all(|g| g.owner == "node-z"));
    let late = claim(s, t + Duration::seconds(120), 10, "node-w").await;
    assert!(gids(&late).contains("later"));
    assert!(
        !gids(&late).contains("never"),
        "no next_cron_time: never due"
    );
    // the old owner lost its lease: its guarded writes fail
    let e = err(
        s,
        WriteOp::UpdateGlobal {
            gid: "later".into(),
            expect_status: "prepared".into(),
            expect_owner: Some("node-a".into()),
            set: update(Some("aborting")),
            branches: vec![],
        },
    )
    .await;
    assert_eq!(e, StoreError::NotFound);
}

pub async fn reset_next_cron_time_makes_due(s: S<'_>) {
    let t = now();
    save(
        s,
        global("rn-1", "prepared", Some(t + Duration::hours(1))),
        vec![],
    )
    .await;
    assert!(claim(s, t, 10, "n").await.is_empty());
    ok(
        s,
        WriteOp::ResetNextCronTime {
            gid: "rn-1".into(),
            now: t,
        },
    )
    .await;
    assert_eq!(find(s, "rn-1").await.next_cron_time, Some(t));
    assert_eq!(
        gids(&claim(s, t, 10, "n").await),
        HashSet::from(["rn-1".to_string()])
    );
    assert_eq!(
        err(
            s,
            WriteOp::ResetNextCronTime {
                gid: "rn-missing".into(),
                now: t
            }
        )
        .await,
        StoreError::NotFound
    );
}

pub async fn reset_cron_time_pulls_back_in_batches(s: S<'_>) {
    let t = now();
    for i in 0..3 {
        save(
            s,
            global(
                &format!("far-{i}"),
                "prepared",
                Some(t + Duration::hours(2)),
            ),
            vec![],
        )
        .await;
    }
    save(
        s,
        global("near", "prepared", Some(t + Duration::seconds(30))),
        vec![],
    )
    .await;
    let reset = |limit| WriteOp::ResetCronTime {
        after: t + Duration::minutes(10),
        now: t,
        limit,
    };
    assert_eq!(
        ok(s, reset(2)).await,
        WriteOutcome::Reset {
            count: 2,
            has_remaining: true
        }
    );
    assert_eq!(
        ok(s, reset(2)).await,
        WriteOutcome::Reset {
            count: 1,
            has_remaining: false
        }
    );
    assert_eq!(
        ok(s, reset(2)).await,
        WriteOutcome::Reset {
            count: 0,
            has_remaining: false
        }
    );
    let due = claim(s, t, 10, "n").await;
    assert_eq!(
        gids(&due),
        (0..3).map(|i| format!("far-{i}")).collect(),
        "'near' is not pulled back"
    );
    assert_eq!(
        find(s, "far-0").await.next_cron_time,
        Some(t + Duration::seconds(30)),
        "leased"
    );
}

pub async fn kv_versions_and_paging(s: S<'_>) {
    let create = |k: &str, v: &str| WriteOp::CreateKv {
        cat: "topics".into(),
        k: k.into(),
        v: v.into(),
        now: now(),
    };
    ok(s, create("t1", "[1]")).await;
    assert_eq!(
        err(s, create("t1", "[2]")).await,
        StoreError::UniqueConflict
    );
    let kv = s
        .find_kv("topics", Some("t1"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(kv.len(), 1);
    assert_eq!((kv[0].v.as_str(), kv[0].version), ("[1]", 1));
    let upd = |version: i64, v: &str| WriteOp::UpdateKv {
        cat: "topics".into(),
        k: "t1".into(),
        v: v.into(),
        version,
        now: now(),
    };
    ok(s, upd(1, "[1|x]")).await;
    assert_eq!(
        err(s, upd(1, "[stale]")).await,
        StoreError::NotFound,
        "version moved"
    );
    let kv = s
        .find_kv("topics", Some("t1"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((kv[0].v.as_str(), kv[0].version), ("[1|x]", 2));
    assert!(kv[0].create_time.is_some() && kv[0].update_time >= kv[0].create_time);
    let missing = WriteOp::UpdateKv {
        cat: "topics".into(),
        k: "none".into(),
        v: "".into(),
        version: 1,
        now: now(),
    };
    assert_eq!(err(s, missing).await, StoreError::NotFound);
    let del = |k: &str| WriteOp::DeleteKv {
        cat: "topics".into(),
        k: k.into(),
    };
    ok(s, del("t1")).await;
    assert_eq!(err(s, del("t1")).await, StoreError::NotFound);
    assert!(
        s.find_kv("topics", Some("t1"))
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .is_empty()
    );
    for i in 0..5 {
        ok(s, create(&format!("p{i}"), "v")).await;
    }
    ok(
        s,
        WriteOp::CreateKv {
            cat: "other".into(),
            k: "o".into(),
            v: "v".into(),
            now: now(),
        },
    )
    .await;
    let all = s
        .find_kv("topics", None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        all.iter().map(|k| k.k.as_str()).collect::<Vec<_>>(),
        ["p0", "p1", "p2", "p3", "p4"],
        "find_kv(cat) in creation order, only that category"
    );
    let mut pos = String::new();
    let mut pages = Vec::new();
    loop {
        let (rows, next) = s
            .scan_kv("topics", &pos, 2)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        pages.push(rows.iter().map(|k| k.k.clone()).collect::<Vec<_>>());
        if next.is_empty() {
            break;
        }
        assert_ne!(next, pos, "the position moves");
        pos = next;
        assert!(pages.len() < 10, "paging must end");
    }
    assert_eq!(
        pages,
        [vec!["p4", "p3"], vec!["p2", "p1"], vec!["p0"]],
        "newest first"
    );
}

pub async fn scan_globals_pages_and_filters(s: S<'_>) {
    let base = now() - Duration::minutes(10);
    let mut want = Vec::new();
    for i in 0..23 {
        let gid = format!("scan-{i:02}");
        let mut g = global(&gid, if i % 3 == 0 { "succeed" } else { "prepared" }, None);
        g.trans_type = if i % 2 == 0 {
            "saga".into()
        } else {
            "tcc".into()
        };
        // a few share a create time
        g.create_time = Some(base + Duration::seconds(i / 2));
        save(s, g.clone(), vec![]).await;
        want.push(g);
    }
    let scan = |q: ScanQuery| async move {
        let mut seen = Vec::new();
        let mut q = q;
        for _ in 0..200 {
            let (rows, next) = s.scan_globals(&q).await.unwrap_or_else(|e| panic!("{e}"));
            assert!(rows.len() <= q.limit, "a page holds at most limit rows");
            seen.extend(rows.into_iter().map(|g| g.gid));
            if next.is_empty() {
                return seen;
            }
            assert_ne!(next, q.position, "the position moves");
            q.position = next;
        }
        panic!("paging did not end");
    };
    let q = |limit: usize| ScanQuery {
        limit,
        ..Default::default()
    };
    for limit in [1, 4, 23, 100] {
        let got = scan(q(limit)).await;
        let set: HashSet<&String> = got.iter().collect();
        assert_eq!(set.len(), got.len(), "no row twice (limit {limit})");
        assert_eq!(got.len(), 23, "every row once (limit {limit})");
    }
    let newest_first = scan(q(5)).await;
    let times: Vec<_> = newest_first
        .iter()
        .map(|g| {
            want.iter()
                .find(|w| &w.gid == g)
                .and_then(|w| w.create_time)
        })
        .collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "newest first");
    let (first, next) = s
        .scan_globals(&q(1))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(first.len(), 1);
    assert!(!next.is_empty(), "a token when more rows exist");
    let mut by_status = scan(ScanQuery {
        status: "succeed".into(),
        ..q(3)
    })
    .await;
    by_status.sort();
    let mut expect: Vec<String> = want
        .iter()
        .filter(|g| g.status == "succeed")
        .map(|g| g.gid.clone())
        .collect();
    expect.sort();
    assert_eq!(by_status, expect, "status filter");
    let mut by_type = scan(ScanQuery {
        trans_type: "tcc".into(),
        status: "prepared".into(),
        ..q(2)
    })
    .await;
    by_type.sort();
    let mut expect: Vec<String> = want
        .iter()
        .filter(|g| g.trans_type == "tcc" && g.status == "prepared")
        .map(|g| g.gid.clone())
        .collect();
    expect.sort();
    assert_eq!(by_type, expect, "trans_type and status filters");
    let (lo, hi) = (base + Duration::seconds(3), base + Duration::seconds(6));
    let mut by_time = scan(ScanQuery {
        create_time_start: Some(lo),
        create_time_end: Some(hi),
        ..q(3)
    })
    .await;
    by_time.sort();
    let mut expect: Vec<String> = want
        .iter()
        .filter(|g| g.create_time.is_some_and(|t| t >= lo && t <= hi))
        .map(|g| g.gid.clone())
        .collect();
    expect.sort();
    assert_eq!(by_time, expect, "create time range, both ends included");
    assert!(
        scan(ScanQuery {
            status: "aborting".into(),
            ..q(3)
        })
        .await
        .is_empty()
    );
}

pub async fn concurrent_writes_are_batched_and_guarded(s: S<'_>) {
    let n = 200;
    let saves = (0..n).map(|i| {
        s.write(WriteOp::SaveNew {
            global: global(&format!("c-{i}"), "prepared", None),
            branches: vec![branch(&format!("c-{i}"), "01", "action")],
        })
    });
    for r in futures::future::join_all(saves).await {
        assert_eq!(r, Ok(WriteOutcome::Done));
    }
    // many racers, one winner per transaction: the status guard is atomic
    let racers = (0..n).flat_map(|i| {
        (0..3).map(move |r| {
            s.write(WriteOp::UpdateGlobal {
                gid: format!("c-{i}"),
                expect_status: "prepared".into(),
                expect_owner: None,
                set: GlobalUpdate {
                    status: Some("submitted".into()),
                    owner: Some(format!("racer-{r}")),
                    update_time: now(),
                    ..Default::default()
                },
                branches: vec![],
            })
        })
    });
    let results = futures::future::join_all(racers).await;
    let won = results.iter().filter(|r| r.is_ok()).count();
    let lost = results
        .iter()
        .filter(|r| **r == Err(StoreError::NotFound))
        .count();
    assert_eq!((won, lost), (n, 2 * n));
    for i in [0, n / 2, n - 1] {
        assert_eq!(find(s, &format!("c-{i}")).await.status, "submitted");
        assert_eq!(branches(s, &format!("c-{i}")).await.len(), 1);
    }
}

/// A fresh, empty store, and what removes its data after the test.
pub struct Backend {
    pub store: Arc<dyn Store>,
    pub cleanup: futures::future::BoxFuture<'static, ()>,
}
