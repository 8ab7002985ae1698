//! One contract, every backend: the same checks of the `Store` semantics the engine relies
//! on, run against SQLite always, and against Postgres / MySQL / Redis when
//! `DTM_TEST_STORE` names them (each run in a fresh schema / database / key prefix that is
//! dropped afterwards). Connection values come from `STORE_HOST`, `STORE_PORT`,
//! `STORE_USER`, `STORE_PASSWORD`, else the local defaults (Postgres 127.0.0.1:5432
//! postgres, MariaDB 127.0.0.1:3306 root, Redis 127.0.0.1:6379). With `DTM_TEST_STORE=redis`
//! and `DTM_TEST_REDIS_CLUSTER` (the nodes of a Redis Cluster, e.g. from
//! `scripts/redis-cluster.sh start`) the contract also runs on the cluster.

use std::sync::Arc;

use chrono::{DateTime, Duration, SubsecRound, Utc};
use dtm_core::store::{
    BranchUpdate, GlobalUpdate, ScanQuery, Store, StoreError, WriteOp, WriteOutcome,
};
use dtm_proto::{Branch, TransGlobal};
use dtm_store::RedisOptions;
use dtm_store::redis_store::drop_prefix;
use dtm_store::sql::{Dialect, SqlOptions, drop_namespace};

type R = Result<(), Box<dyn std::error::Error>>;

fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(3)
}

fn global(gid: &str, status: &str, t: DateTime<Utc>) -> TransGlobal {
    TransGlobal {
        gid: gid.into(),
        trans_type: "saga".into(),
        status: status.into(),
        protocol: "http".into(),
        create_time: Some(t),
        update_time: Some(t),
        options: r#"{"concurrent":false}"#.into(),
        custom_data: r#"{"orders":{}}"#.into(),
        next_cron_interval: 10,
        next_cron_time: Some(t + Duration::seconds(10)),
        ..Default::default()
    }
}

fn branch(gid: &str, id: &str, op: &str, t: DateTime<Utc>) -> Branch {
    Branch {
        gid: gid.into(),
        url: format!("http://127.0.0.1:1/{op}"),
        bin_data: vec![0, 1, 2, 255],
        branch_id: id.into(),
        op: op.into(),
        status: "prepared".into(),
        create_time: Some(t),
        update_time: Some(t),
        ..Default::default()
    }
}

fn gid(tag: &str) -> String {
    format!("{tag}-{}", dtm_core::new_gid())
}

async fn save(s: &dyn Store, g: TransGlobal, b: Vec<Branch>) -> Result<WriteOutcome, StoreError> {
    s.write(WriteOp::SaveNew {
        global: g,
        branches: b,
    })
    .await
}

fn set_status(status: &str, t: DateTime<Utc>) -> GlobalUpdate {
    GlobalUpdate {
        status: Some(status.into()),
        update_time: t,
        ..Default::default()
    }
}

async fn save_new_roundtrip_and_conflict(s: &dyn Store) -> R {
    let t = now();
    let g = gid("save");
    let mut gl = global(&g, "prepared", t);
    gl.query_prepared = "http://127.0.0.1:1/query".into();
    gl.ext_data = "{}".into();
    let bs = vec![
        branch(&g, "01", "compensate", t),
        branch(&g, "01", "action", t),
    ];
    assert_eq!(save(s, gl.clone(), bs.clone()).await?, WriteOutcome::Done);
    let got = s.find_global(&g).await?.ok_or("saved global not found")?;
    assert!(got.id > 0);
    assert_eq!(
        TransGlobal {
            id: got.id,
            ..gl.clone()
        },
        got
    );
    let gb = s.find_branches(&g).await?;
    assert_eq!(gb.len(), 2);
    for (want, got) in bs.iter().zip(&gb) {
        assert_eq!(
            Branch {
                id: got.id,
                ..want.clone()
            },
            *got
        );
    }
    assert!(gb[0].id < gb[1].id, "insertion order");
    // same gid again: conflict, and the stored one is untouched
    let mut other = global(&g, "submitted", t);
    other.trans_type = "msg".into();
    assert_eq!(
        save(s, other, vec![branch(&g, "09", "action", t)]).await,
        Err(StoreError::UniqueConflict)
    );
    assert_eq!(s.find_global(&g).await?.ok_or("gone")?.status, "prepared");
    assert_eq!(s.find_branches(&g).await?.len(), 2);
    assert_eq!(s.find_global("no-such-gid").await?, None);
    assert!(s.find_branches("no-such-gid").await?.is_empty());
    Ok(())
}

async fn update_global_guards(s: &dyn Store) -> R {
    let t = now();
    let g = gid("upd");
    save(
        s,
        global(&g, "submitted", t),
        vec![branch(&g, "01", "action", t)],
    )
    .await?;
    let upd = |status: &str, owner: Option<&str>, set: GlobalUpdate, b: Vec<BranchUpdate>| {
        WriteOp::UpdateGlobal {
            gid: g.clone(),
            expect_status: status.into(),
            expect_owner: owner.map(str::to_string),
            set,
            branches: b,
        }
    };
    // wrong status: nothing changes, not even the branch
    let bu = vec![BranchUpdate {
        branch_id: "01".into(),
        op: "action".into(),
        status: "succeed".into(),
        time: t,
    }];
    assert_eq!(
        s.write(upd("prepared", None, set_status("aborting", t), bu.clone()))
            .await,
        Err(StoreError::NotFound)
    );
    assert_eq!(s.find_branches(&g).await?[0].status, "prepared");
    // claim it, then a wrong owner is refused
    let claimed = claim(
        s,
        t + Duration::seconds(11),
        "node-a",
        Duration::seconds(30),
    )
    .await?;
    assert!(claimed.iter().any(|c| c.gid == g));
    assert_eq!(
        s.write(upd(
            "submitted",
            Some("node-b"),
            set_status("succeed", t),
            vec![]
        ))
        .await,
        Err(StoreError::NotFound)
    );
    // right status and owner: applied with the branch update, in one step
    let t2 = t + Duration::milliseconds(1500);
    let set = GlobalUpdate {
        status: Some("succeed".into()),
        finish_time: Some(t2),
        result: Some("b2s=".into()),
        next_cron_interval: Some(20),
        next_cron_time: Some(t2 + Duration::seconds(20)),
        update_time: t2,
        ..Default::default()
    };
    // with an update of a branch that does not exist: like an SQL UPDATE, not created
    let mut bu = bu;
    bu.push(BranchUpdate {
        branch_id: "09".into(),
        op: "action".into(),
        status: "succeed".into(),
        time: t,
    });
    assert_eq!(
        s.write(upd("submitted", Some("node-a"), set, bu)).await?,
        WriteOutcome::Done
    );
    assert_eq!(s.find_branches(&g).await?.len(), 1, "no branch created");
    let got = s.find_global(&g).await?.ok_or("gone")?;
    assert_eq!(got.status, "succeed");
    assert_eq!(got.finish_time, Some(t2));
    assert_eq!(got.update_time, Some(t2));
    assert_eq!(got.result, "b2s=");
    assert_eq!(got.next_cron_interval, 20);
    assert_eq!(got.next_cron_time, Some(t2 + Duration::seconds(20)));
    assert_eq!(got.owner, "node-a");
    let b = &s.find_branches(&g).await?[0];
    assert_eq!((b.status.as_str(), b.finish_time), ("succeed", Some(t)));
    // ... and nothing of it is left to clash with a later registration of that branch
    assert_eq!(
        s.write(WriteOp::AddBranches {
            gid: g.clone(),
            expect_status: "succeed".into(),
            branches: vec![branch(&g, "09", "action", t)],
        })
        .await?,
        WriteOutcome::Done
    );
    let ids: Vec<String> = s
        .find_branches(&g)
        .await?
        .into_iter()
        .map(|b| format!("{}:{}", b.branch_id, b.status))
        .collect();
    assert_eq!(ids, ["01:succeed", "09:prepared"]);
    // unknown gid
    assert_eq!(
        s.write(WriteOp::UpdateGlobal {
            gid: "no-such-gid".into(),
            expect_status: "submitted".into(),
            expect_owner: None,
            set: set_status("succeed", t),
            branches: vec![],
        })
        .await,
        Err(StoreError::NotFound)
    );
    Ok(())
}

async fn add_branches_guard(s: &dyn Store) -> R {
    let t = now();
    let g = gid("add");
    save(s, global(&g, "prepared", t), vec![]).await?;
    let add = |status: &str, b: Vec<Branch>| WriteOp::AddBranches {
        gid: g.clone(),
        expect_status: status.into(),
        branches: b,
    };
    assert_eq!(
        s.write(add("submitted", vec![branch(&g, "01", "confirm", t)]))
            .await,
        Err(StoreError::NotFound)
    );
    assert!(s.find_branches(&g).await?.is_empty());
    s.write(add(
        "prepared",
        vec![
            branch(&g, "01", "cancel", t),
            branch(&g, "01", "confirm", t),
        ],
    ))
    .await?;
    // a duplicate (branch_id, op) fails the whole op: the new "02" is not added either
    assert_eq!(
        s.write(add(
            "prepared",
            vec![
                branch(&g, "02", "cancel", t),
                branch(&g, "01", "confirm", t)
            ]
        ))
        .await,
        Err(StoreError::UniqueConflict)
    );
    let ops: Vec<String> = s
        .find_branches(&g)
        .await?
        .iter()
        .map(|b| format!("{}/{}", b.branch_id, b.op))
        .collect();
    assert_eq!(ops, ["01/cancel", "01/confirm"]);
    assert_eq!(
        s.write(WriteOp::AddBranches {
            gid: "no-such-gid".into(),
            expect_status: "prepared".into(),
            branches: vec![],
        })
        .await,
        Err(StoreError::NotFound)
    );
    Ok(())
}

async fn claim(
    s: &dyn Store,
    at: DateTime<Utc>,
    owner: &str,
    lease: Duration,
) -> Result<Vec<TransGlobal>, StoreError> {
    claim_n(s, at, owner, lease, 1000).await
}

/// ClaimDue of at most `limit` transactions.
async fn claim_n(
    s: &dyn Store,
    at: DateTime<Utc>,
    owner: &str,
    lease: Duration,
    limit: usize,
) -> Result<Vec<TransGlobal>, StoreError> {
    match s
        .write(WriteOp::ClaimDue {
            now: at,
            limit,
            lease_until: at + lease,
            owner: owner.into(),
        })
        .await?
    {
        WriteOutcome::Claimed(v) => Ok(v),
        other => panic!("ClaimDue answered {other:?}"),
    }
}

async fn claim_due_leases(s: &dyn Store) -> R {
    // far in the future, so that the other checks' rows (due within minutes) are due too
    // but these are told apart by gid
    let t = now() + Duration::days(3650);
    let mk = |tag: &str, status: &str, due: DateTime<Utc>| {
        let g = gid(tag);
        let mut gl = global(&g, status, t);
        gl.next_cron_time = Some(due);
        (g, gl)
    };
    let (due1, g1) = mk("due1", "submitted", t - Duration::seconds(5));
    let (due2, g2) = mk("due2", "aborting", t - Duration::seconds(1));
    let (due3, g3) = mk("due3", "prepared", t);
    let (later, g4) = mk("later", "submitted", t + Duration::seconds(60));
    let (done1, g5) = mk("done1", "succeed", t - Duration::seconds(5));
    let (done2, g6) = mk("done2", "failed", t - Duration::seconds(5));
    for g in [g1, g2, g3, g4, g5, g6] {
        save(s, g, vec![]).await?;
    }
    let mine = |v: &[TransGlobal]| {
        let mut gids: Vec<String> = v
            .iter()
            .filter(|g| [&due1, &due2, &due3, &later, &done1, &done2].contains(&&g.gid))
            .map(|g| g.gid.clone())
            .collect();
        gids.sort();
        gids
    };
    let mut want = vec![due1.clone(), due2.clone(), due3.clone()];
    want.sort();
    let lease = Duration::seconds(30);
    let first = claim(s, t, "node-a", lease).await?;
    assert_eq!(mine(&first), want, "due and unfinished, <= now");
    for g in first.iter().filter(|g| want.contains(&g.gid)) {
        assert_eq!(g.owner, "node-a");
        assert_eq!(g.next_cron_time, Some(t + lease));
        let stored = s.find_global(&g.gid).await?.ok_or("gone")?;
        assert_eq!(stored.owner, "node-a");
        assert_eq!(stored.next_cron_time, Some(t + lease));
    }
    // leased: nobody gets them again before the lease ends
    assert!(mine(&claim(s, t + Duration::seconds(29), "node-b", lease).await?).is_empty());
    // lease over: claimable again (with `later`, now due too), finished ones never
    let again = claim(s, t + Duration::seconds(61), "node-b", lease).await?;
    let mut want2 = vec![due1.clone(), due2.clone(), due3.clone(), later.clone()];
    want2.sort();
    assert_eq!(mine(&again), want2);
    assert!(mine(&claim(s, t + Duration::days(1000), "node-c", lease).await?).len() == 4);
    // limit
    let many = claim_n(s, t + Duration::days(2000), "node-d", Duration::days(1), 2).await?;
    assert_eq!(many.len(), 2);
    Ok(())
}

/// Due transactions of every unfinished status are claimed oldest first, `limit` at a
/// time, each once while leased. MySQL promises no order, Redis only within each of its
/// shards (a claim takes from every shard).
async fn claims_oldest_first(s: &dyn Store, backend: Backend) -> R {
    // a day back, so that rows a test saved before (due from now on) are not due yet,
    // and the leases given here are over before any later check claims
    let c = now() - Duration::days(1);
    let rows = [
        ("p1", "prepared", 60),
        ("s1", "submitted", 50),
        ("p2", "prepared", 40),
        ("a1", "aborting", 30),
        ("s2", "submitted", 20),
        ("p3", "prepared", 10),
        ("f1", "succeed", 70),
        ("f2", "failed", 70),
    ];
    let mut gids = std::collections::HashMap::new();
    for (tag, status, ago) in rows {
        let g = gid(&format!("oldest-{tag}"));
        let mut gl = global(&g, status, c - Duration::seconds(ago));
        gl.next_cron_time = Some(c - Duration::seconds(ago));
        save(s, gl, vec![]).await?;
        gids.insert(g, tag);
    }
    let mut batches = vec![];
    for limit in [3, 2, 10, 10] {
        batches.push(claim_tags(s, c, limit, &gids).await?);
    }
    for b in &mut batches {
        b.sort();
    }
    if matches!(backend, Backend::MySql | Backend::Redis) {
        let sizes: Vec<usize> = batches.iter().map(Vec::len).collect();
        assert_eq!(sizes, [3, 2, 1, 0]);
        let mut all: Vec<&str> = batches.concat();
        all.sort();
        assert_eq!(all, ["a1", "p1", "p2", "p3", "s1", "s2"]);
    } else {
        assert_eq!(
            batches,
            [vec!["p1", "p2", "s1"], vec!["a1", "s2"], vec!["p3"], vec![]]
        );
    }
    Ok(())
}

/// ClaimDue at `c`; the tags of the rows claimed, each of which must be in `gids`.
async fn claim_tags(
    s: &dyn Store,
    c: DateTime<Utc>,
    limit: usize,
    gids: &std::collections::HashMap<String, &'static str>,
) -> Result<Vec<&'static str>, StoreError> {
    let got = claim_n(s, c, "node-o", Duration::seconds(30), limit).await?;
    let tags: Vec<&'static str> = got
        .iter()
        .filter_map(|g| gids.get(&g.gid).copied())
        .collect();
    assert_eq!(tags.len(), got.len(), "claimed only this check's rows");
    Ok(tags)
}

async fn reset_cron_time_counts(s: &dyn Store) -> R {
    let t = now();
    // far beyond every other check's rows
    let far = t + Duration::days(100_000);
    let mut gids = vec![];
    for i in 0..3 {
        let g = gid(&format!("far{i}"));
        let mut gl = global(&g, "submitted", t);
        gl.next_cron_time = Some(far);
        save(s, gl, vec![]).await?;
        gids.push(g);
    }
    let g = gid("far-done");
    let mut gl = global(&g, "succeed", t);
    gl.next_cron_time = Some(far);
    save(s, gl, vec![]).await?;
    let after = far - Duration::days(1);
    let reset = |limit| WriteOp::ResetCronTime {
        after,
        now: t,
        limit,
    };
    assert_eq!(
        s.write(reset(2)).await?,
        WriteOutcome::Reset {
            count: 2,
            has_remaining: true
        }
    );
    assert_eq!(
        s.write(reset(2)).await?,
        WriteOutcome::Reset {
            count: 1,
            has_remaining: false
        }
    );
    for g in &gids {
        assert_eq!(
            s.find_global(g).await?.ok_or("gone")?.next_cron_time,
            Some(t)
        );
    }
    assert_eq!(
        s.find_global(&g).await?.ok_or("gone")?.next_cron_time,
        Some(far),
        "finished ones stay"
    );
    // one gid
    let t2 = t + Duration::milliseconds(7);
    s.write(WriteOp::ResetNextCronTime {
        gid: g.clone(),
        now: t2,
    })
    .await?;
    assert_eq!(
        s.find_global(&g).await?.ok_or("gone")?.next_cron_time,
        Some(t2)
    );
    assert_eq!(
        s.write(WriteOp::ResetNextCronTime {
            gid: "no-such-gid".into(),
            now: t2
        })
        .await,
        Err(StoreError::NotFound)
    );
    Ok(())
}

async fn kv_versions(s: &dyn Store) -> R {
    let t = now();
    let cat = format!("cat{}", &dtm_core::new_gid()[..8]);
    let create = |k: &str, v: &str| WriteOp::CreateKv {
        cat: cat.clone(),
        k: k.into(),
        v: v.into(),
        now: t,
    };
    s.write(create("a", "[1]")).await?;
    assert_eq!(
        s.write(create("a", "[2]")).await,
        Err(StoreError::UniqueConflict)
    );
    let a = s.find_kv(&cat, Some("a")).await?;
    assert_eq!(a.len(), 1);
    assert_eq!((a[0].v.as_str(), a[0].version), ("[1]", 1));
    assert_eq!(a[0].create_time, Some(t));
    let update = |version| WriteOp::UpdateKv {
        cat: cat.clone(),
        k: "a".into(),
        v: format!("[v{version}]"),
        version,
        now: t,
    };
    assert_eq!(s.write(update(7)).await, Err(StoreError::NotFound));
    s.write(update(1)).await?;
    assert_eq!(s.write(update(1)).await, Err(StoreError::NotFound));
    let a = s.find_kv(&cat, Some("a")).await?;
    assert_eq!((a[0].v.as_str(), a[0].version), ("[v1]", 2));
    s.write(create("b", "[]")).await?;
    s.write(create("c", "[]")).await?;
    assert_eq!(s.find_kv(&cat, None).await?.len(), 3);
    let (page, next) = s.scan_kv(&cat, "", 2).await?;
    assert_eq!(
        page.iter().map(|k| k.k.as_str()).collect::<Vec<_>>(),
        ["c", "b"]
    );
    assert!(!next.is_empty());
    let (page, next) = s.scan_kv(&cat, &next, 2).await?;
    assert_eq!(page.iter().map(|k| k.k.as_str()).collect::<Vec<_>>(), ["a"]);
    assert_eq!(next, "");
    let del = |k: &str| WriteOp::DeleteKv {
        cat: cat.clone(),
        k: k.into(),
    };
    s.write(del("b")).await?;
    assert_eq!(s.write(del("b")).await, Err(StoreError::NotFound));
    assert_eq!(s.find_kv(&cat, None).await?.len(), 2);
    Ok(())
}

async fn scan_pages_and_filters(s: &dyn Store) -> R {
    let t = now() - Duration::days(20_000);
    let tt = format!("tt{}", &dtm_core::new_gid()[..6]);
    let mut gids = vec![];
    for i in 0..5 {
        let g = gid(&format!("scan{i}"));
        let mut gl = global(&g, if i % 2 == 0 { "succeed" } else { "failed" }, t);
        gl.trans_type = tt.clone();
        gl.create_time = Some(t + Duration::seconds(i));
        save(s, gl, vec![]).await?;
        gids.push(g);
    }
    let q = |position: &str, limit, status: &str| ScanQuery {
        position: position.into(),
        limit,
        status: status.into(),
        trans_type: tt.clone(),
        create_time_start: None,
        create_time_end: None,
    };
    let (p1, n1) = s.scan_globals(&q("", 2, "")).await?;
    assert_eq!(
        p1.iter().map(|g| g.gid.clone()).collect::<Vec<_>>(),
        [gids[4].clone(), gids[3].clone()]
    );
    let (p2, n2) = s.scan_globals(&q(&n1, 2, "")).await?;
    assert_eq!(p2.len(), 2);
    assert_ne!(n1, n2);
    let (p3, n3) = s.scan_globals(&q(&n2, 2, "")).await?;
    assert_eq!((p3.len(), n3.as_str()), (1, ""));
    let (f, _) = s.scan_globals(&q("", 10, "failed")).await?;
    assert_eq!(f.len(), 2);
    let mut q2 = q("", 10, "");
    q2.create_time_start = Some(t + Duration::seconds(1));
    q2.create_time_end = Some(t + Duration::seconds(3));
    assert_eq!(s.scan_globals(&q2).await?.0.len(), 3);
    Ok(())
}

/// Many writers at once share commits; each gets its own result.
async fn concurrent_writes_get_their_own_results(s: Arc<dyn Store>) -> R {
    let t = now();
    let dup = gid("dup");
    save(&*s, global(&dup, "prepared", t), vec![]).await?;
    let mut tasks = vec![];
    for i in 0..120 {
        let s = Arc::clone(&s);
        let dup = dup.clone();
        tasks.push(tokio::spawn(async move {
            match i % 4 {
                0 => {
                    let r = save(&*s, global(&dup, "submitted", t), vec![]).await;
                    (i, r, StoreErrorOr::Err(StoreError::UniqueConflict))
                }
                1 => {
                    let r = s
                        .write(WriteOp::UpdateGlobal {
                            gid: dup.clone(),
                            expect_status: "aborting".into(),
                            expect_owner: None,
                            set: set_status("failed", t),
                            branches: vec![],
                        })
                        .await;
                    (i, r, StoreErrorOr::Err(StoreError::NotFound))
                }
                _ => {
                    let g = gid(&format!("conc{i}"));
                    let r = save(
                        &*s,
                        global(&g, "submitted", t),
                        vec![branch(&g, "01", "action", t)],
                    )
                    .await;
                    (i, r, StoreErrorOr::Ok)
                }
            }
        }));
    }
    for task in tasks {
        let (i, r, want) = task.await?;
        match want {
            StoreErrorOr::Ok => assert_eq!(r, Ok(WriteOutcome::Done), "op {i}"),
            StoreErrorOr::Err(e) => assert_eq!(r, Err(e), "op {i}"),
        }
    }
    assert_eq!(s.find_global(&dup).await?.ok_or("gone")?.status, "prepared");
    Ok(())
}

/// Issue `ops` at once, in this order, and wait for all: every write is queued (each
/// write future is polled in turn, so the first poll of each queues it in this order, in
/// any runtime), then answered, so a batching backend takes them into one batch. Their
/// results in the same order.
async fn together(
    s: &Arc<dyn Store>,
    ops: Vec<WriteOp>,
) -> Result<Vec<Result<WriteOutcome, StoreError>>, &'static str> {
    use std::task::Poll;
    let mut futs: Vec<_> = ops.into_iter().map(|op| Some(s.write(op))).collect();
    let mut out: Vec<Option<Result<WriteOutcome, StoreError>>> = vec![None; futs.len()];
    std::future::poll_fn(|cx| {
        for (f, o) in futs.iter_mut().zip(out.iter_mut()) {
            if let Some(fut) = f
                && let Poll::Ready(r) = fut.as_mut().poll(cx)
            {
                *o = Some(r);
                *f = None;
            }
        }
        if futs.iter().all(Option::is_none) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    out.into_iter()
        .map(|r| r.ok_or("a write got no result"))
        .collect()
}

fn saga_branches(g: &str, t: DateTime<Utc>) -> Vec<Branch> {
    let mut bs = vec![];
    for id in ["01", "02"] {
        for op in ["compensate", "action"] {
            let mut b = branch(g, id, op, t);
            b.bin_data = format!("{g}/{id}/{op}").into_bytes();
            bs.push(b);
        }
    }
    bs
}

/// Each global is stored as given (but its id) with exactly these branches, in order.
async fn assert_stored(s: &dyn Store, stored: Vec<(TransGlobal, Vec<Branch>)>) -> R {
    for (gl, bs) in stored {
        let got = s
            .find_global(&gl.gid)
            .await?
            .ok_or("saved global not found")?;
        assert_eq!(TransGlobal { id: got.id, ..gl }, got);
        let gb = s.find_branches(&got.gid).await?;
        let gb: Vec<Branch> = gb.into_iter().map(|b| Branch { id: 0, ..b }).collect();
        assert_eq!(gb, bs, "branches of {}", got.gid);
    }
    Ok(())
}

/// Writes to issue together, the result each should get, and what the inserts among
/// them should leave stored.
#[derive(Default)]
struct Group {
    ops: Vec<WriteOp>,
    want: Vec<Result<WriteOutcome, StoreError>>,
    stored: Vec<(TransGlobal, Vec<Branch>)>,
}

impl Group {
    /// A SaveNew of `gl` with `bs`: a unique conflict when `conflict`, else stored whole.
    fn save(&mut self, gl: TransGlobal, bs: Vec<Branch>, conflict: bool) {
        self.ops.push(WriteOp::SaveNew {
            global: gl.clone(),
            branches: bs.clone(),
        });
        if conflict {
            self.want.push(Err(StoreError::UniqueConflict));
        } else {
            self.want.push(Ok(WriteOutcome::Done));
            self.stored.push((gl, bs));
        }
    }

    /// Issue the writes together and check their results and what they stored.
    async fn check(self, s: &Arc<dyn Store>) -> R {
        assert_eq!(together(s, self.ops).await?, self.want);
        assert_stored(&**s, self.stored).await
    }
}

/// Many inserts in one batch: one gid exists already and one comes twice; those two fail
/// alone (the first of the twice-written gid wins), every other insert is stored whole,
/// branches in order.
async fn saves_in_one_batch(s: Arc<dyn Store>) -> R {
    let t = now();
    let old = gid("bold");
    save(
        &*s,
        global(&old, "prepared", t),
        vec![branch(&old, "01", "action", t)],
    )
    .await?;
    let twice = gid("btwice");
    let mut grp = Group::default();
    for i in 0..40 {
        let g = match i {
            13 => old.clone(),
            7 | 29 => twice.clone(),
            _ => gid(&format!("bs{i}")),
        };
        let mut gl = global(&g, "submitted", t);
        gl.custom_data = format!(r#"{{"i":{i}}}"#);
        gl.next_cron_time = Some(t + Duration::milliseconds(i));
        grp.save(gl, saga_branches(&g, t), i == 13 || i == 29);
    }
    grp.check(&s).await?;
    let o = s.find_global(&old).await?.ok_or("gone")?;
    assert_eq!(o.status, "prepared");
    assert_eq!(s.find_branches(&old).await?.len(), 1);
    Ok(())
}

/// Inserts and guarded updates of distinct transactions issued together and nothing else
/// (on Postgres one statement in autocommit mode): an insert of an existing gid and the
/// updates whose guard fails change nothing, not their branches either; every other
/// insert is stored whole with its branches in order, every other update with its
/// branch changes.
async fn saves_and_updates_in_one_group(s: Arc<dyn Store>) -> R {
    let t = now();
    let t2 = t + Duration::milliseconds(500);
    let old = gid("gold");
    save(&*s, global(&old, "prepared", t), saga_branches(&old, t)).await?;
    let upd: Vec<String> = (0..6).map(|i| gid(&format!("gu{i}"))).collect();
    for g in &upd {
        save(&*s, global(g, "submitted", t), saga_branches(g, t)).await?;
    }
    let mut grp = Group::default();
    for i in 0..12 {
        if i % 2 == 1 {
            // an update; every third one expects a status it does not have
            let g = &upd[i / 2];
            let ok = (i / 2) % 3 != 0;
            grp.ops.push(WriteOp::UpdateGlobal {
                gid: g.clone(),
                expect_status: if ok { "submitted" } else { "prepared" }.into(),
                expect_owner: None,
                set: set_status("succeed", t2),
                branches: vec![BranchUpdate {
                    branch_id: "02".into(),
                    op: "action".into(),
                    status: "succeed".into(),
                    time: t2,
                }],
            });
            grp.want.push(if ok {
                Ok(WriteOutcome::Done)
            } else {
                Err(StoreError::NotFound)
            });
            continue;
        }
        let g = if i == 4 {
            old.clone()
        } else {
            gid(&format!("gs{i}"))
        };
        grp.save(global(&g, "submitted", t), saga_branches(&g, t), i == 4);
    }
    grp.check(&s).await?;
    let o = s.find_global(&old).await?.ok_or("gone")?;
    assert_eq!(o.status, "prepared");
    let ob: Vec<Branch> = s.find_branches(&old).await?;
    let ob: Vec<Branch> = ob.into_iter().map(|b| Branch { id: 0, ..b }).collect();
    assert_eq!(ob, saga_branches(&old, t), "branches of the existing gid");
    for (k, g) in upd.iter().enumerate() {
        let ok = k % 3 != 0;
        let got = s.find_global(g).await?.ok_or("gone")?;
        assert_eq!(got.status, if ok { "succeed" } else { "submitted" }, "{g}");
        let st: Vec<String> = s
            .find_branches(g)
            .await?
            .into_iter()
            .map(|b| b.status)
            .collect();
        let want = if ok {
            ["prepared", "prepared", "prepared", "succeed"]
        } else {
            ["prepared", "prepared", "prepared", "prepared"]
        };
        assert_eq!(st, want, "branches of {g}");
    }
    Ok(())
}

/// An insert and the updates of the same transaction issued together apply in order, each
/// with its own guard; updates of other transactions and other kinds of writes in between
/// do not disturb them.
async fn save_and_updates_of_one_gid_in_one_batch(s: Arc<dyn Store>) -> R {
    let t = now();
    let (t1, t2, t3) = (
        t + Duration::milliseconds(100),
        t + Duration::milliseconds(200),
        t + Duration::milliseconds(300),
    );
    let g = gid("sup");
    let h = gid("suh");
    let upd = |g: &str,
               status: &str,
               owner: Option<&str>,
               set: GlobalUpdate,
               b: &[(&str, &str, DateTime<Utc>)]| {
        WriteOp::UpdateGlobal {
            gid: g.into(),
            expect_status: status.into(),
            expect_owner: owner.map(str::to_string),
            set,
            branches: b
                .iter()
                .map(|(id, st, at)| BranchUpdate {
                    branch_id: (*id).into(),
                    op: "action".into(),
                    status: (*st).into(),
                    time: *at,
                })
                .collect(),
        }
    };
    let mut submit = set_status("submitted", t1);
    submit.owner = Some("n1".into());
    submit.next_cron_time = Some(t1 + Duration::seconds(5));
    let mut finish = set_status("succeed", t3);
    finish.finish_time = Some(t3);
    finish.result = Some("done".into());
    let kv = gid("kv");
    let ops = vec![
        WriteOp::SaveNew {
            global: global(&g, "prepared", t),
            branches: saga_branches(&g, t),
        },
        WriteOp::SaveNew {
            global: global(&h, "prepared", t),
            branches: vec![],
        },
        upd(&g, "prepared", None, submit, &[("01", "succeed", t1)]),
        WriteOp::CreateKv {
            cat: "batch".into(),
            k: kv.clone(),
            v: "1".into(),
            now: t,
        },
        upd(&h, "prepared", None, set_status("aborting", t1), &[]),
        // wrong owner
        upd(
            &g,
            "submitted",
            Some("n2"),
            set_status("failed", t2),
            &[("02", "failed", t2)],
        ),
        WriteOp::ResetNextCronTime {
            gid: h.clone(),
            now: t2,
        },
        // two updates of one branch in one write: the last one stands
        upd(
            &g,
            "submitted",
            Some("n1"),
            finish,
            &[("02", "failed", t2), ("02", "succeed", t3)],
        ),
        // the status has moved on
        upd(&g, "prepared", None, set_status("failed", t3), &[]),
        upd(&h, "aborting", None, set_status("failed", t3), &[]),
        upd(&h, "aborting", None, set_status("succeed", t3), &[]),
    ];
    let got = together(&s, ops).await?;
    use StoreError::NotFound;
    let done = Ok(WriteOutcome::Done);
    assert_eq!(
        got,
        vec![
            done.clone(),
            done.clone(),
            done.clone(),
            done.clone(),
            done.clone(),
            Err(NotFound),
            done.clone(),
            done.clone(),
            Err(NotFound),
            done.clone(),
            Err(NotFound),
        ]
    );
    let gg = s.find_global(&g).await?.ok_or("gone")?;
    assert_eq!(
        (gg.status.as_str(), gg.owner.as_str(), gg.result.as_str()),
        ("succeed", "n1", "done")
    );
    assert_eq!(
        (gg.finish_time, gg.update_time, gg.next_cron_time),
        (Some(t3), Some(t3), Some(t1 + Duration::seconds(5)))
    );
    let st: Vec<(String, String, Option<DateTime<Utc>>)> = s
        .find_branches(&g)
        .await?
        .into_iter()
        .map(|b| (format!("{}/{}", b.branch_id, b.op), b.status, b.finish_time))
        .collect();
    let row = |k: &str, s: &str, f: Option<DateTime<Utc>>| (k.to_string(), s.to_string(), f);
    assert_eq!(
        st,
        vec![
            row("01/compensate", "prepared", None),
            row("01/action", "succeed", Some(t1)),
            row("02/compensate", "prepared", None),
            row("02/action", "succeed", Some(t3)),
        ]
    );
    let hh = s.find_global(&h).await?.ok_or("gone")?;
    assert_eq!((hh.status.as_str(), hh.update_time), ("failed", Some(t3)));
    assert_eq!(hh.next_cron_time, Some(t2));
    assert_eq!(s.find_kv("batch", Some(&kv)).await?.len(), 1);
    Ok(())
}

/// Branches registered in the same batch as the insert and the status change of their
/// transaction (as tcc's registerBranch calls arrive) see them in order.
async fn add_branches_in_one_batch(s: Arc<dyn Store>) -> R {
    let t = now();
    let (a, b) = (gid("aba"), gid("abb"));
    let add = |g: &str, status: &str, id: &str| WriteOp::AddBranches {
        gid: g.into(),
        expect_status: status.into(),
        branches: vec![branch(g, id, "cancel", t), branch(g, id, "confirm", t)],
    };
    let ops = vec![
        WriteOp::SaveNew {
            global: global(&a, "prepared", t),
            branches: vec![],
        },
        add(&a, "prepared", "01"),
        WriteOp::SaveNew {
            global: global(&b, "prepared", t),
            branches: vec![],
        },
        add(&b, "submitted", "01"),
        add(&a, "prepared", "02"),
        WriteOp::UpdateGlobal {
            gid: a.clone(),
            expect_status: "prepared".into(),
            expect_owner: None,
            set: set_status("submitted", t),
            branches: vec![BranchUpdate {
                branch_id: "02".into(),
                op: "confirm".into(),
                status: "succeed".into(),
                time: t,
            }],
        },
        add(&a, "prepared", "03"),
        add(&b, "prepared", "01"),
    ];
    use StoreError::NotFound;
    let done = Ok(WriteOutcome::Done);
    assert_eq!(
        together(&s, ops).await?,
        vec![
            done.clone(),
            done.clone(),
            done.clone(),
            Err(NotFound),
            done.clone(),
            done.clone(),
            Err(NotFound),
            done.clone(),
        ]
    );
    let rows = |v: Vec<Branch>| -> Vec<String> {
        v.iter()
            .map(|b| format!("{}/{}/{}", b.branch_id, b.op, b.status))
            .collect()
    };
    assert_eq!(
        rows(s.find_branches(&a).await?),
        [
            "01/cancel/prepared",
            "01/confirm/prepared",
            "02/cancel/prepared",
            "02/confirm/succeed"
        ]
    );
    assert_eq!(
        rows(s.find_branches(&b).await?),
        ["01/cancel/prepared", "01/confirm/prepared"]
    );
    assert_eq!(s.find_global(&a).await?.ok_or("gone")?.status, "submitted");
    Ok(())
}

/// Updates of many transactions in one batch, each changing other columns, each checked by
/// its own guard: those whose guard fails change nothing (not their branches either).
async fn updates_in_one_batch(s: Arc<dyn Store>) -> R {
    let t = now();
    let t2 = t + Duration::milliseconds(1234);
    let gids: Vec<String> = (0..30).map(|i| gid(&format!("bu{i}"))).collect();
    let mut before = vec![];
    for g in &gids {
        save(&*s, global(g, "submitted", t), saga_branches(g, t)).await?;
        before.push(s.find_global(g).await?.ok_or("gone")?);
    }
    let bu = |id: &str, st: &str| BranchUpdate {
        branch_id: id.into(),
        op: "action".into(),
        status: st.into(),
        time: t2,
    };
    let (mut ops, mut want, mut after) = (vec![], vec![], vec![]);
    for (i, g) in gids.iter().enumerate() {
        let mut set = GlobalUpdate {
            update_time: t2,
            ..Default::default()
        };
        let mut a = before[i].clone();
        a.update_time = Some(t2);
        let (status, owner, ok) = match i % 5 {
            0 => {
                set.status = Some("aborting".into());
                set.rollback_reason = Some(format!("reason {i}"));
                set.rollback_time = Some(t2);
                set.next_cron_interval = Some(7);
                a.status = "aborting".into();
                a.rollback_reason = format!("reason {i}");
                a.rollback_time = Some(t2);
                a.next_cron_interval = 7;
                ("submitted", None, true)
            }
            1 => ("prepared", None, false),
            2 => ("submitted", Some("somebody"), false),
            3 => {
                set.custom_data = Some(format!(r#"{{"n":{i}}}"#));
                set.owner = Some(format!("node{i}"));
                set.next_cron_time = Some(t2 + Duration::seconds(i as i64));
                a.custom_data = format!(r#"{{"n":{i}}}"#);
                a.owner = format!("node{i}");
                a.next_cron_time = Some(t2 + Duration::seconds(i as i64));
                ("submitted", None, true)
            }
            _ => {
                set.result = Some(format!("r{i}"));
                set.status = Some("succeed".into());
                set.finish_time = Some(t2);
                a.result = format!("r{i}");
                a.status = "succeed".into();
                a.finish_time = Some(t2);
                // the owner is "" until one is set
                ("submitted", Some(""), true)
            }
        };
        ops.push(WriteOp::UpdateGlobal {
            gid: g.clone(),
            expect_status: status.into(),
            expect_owner: owner.map(str::to_string),
            set,
            branches: vec![bu("01", "succeed"), bu("02", "failed")],
        });
        want.push(if ok {
            Ok(WriteOutcome::Done)
        } else {
            Err(StoreError::NotFound)
        });
        after.push(if ok { a } else { before[i].clone() });
    }
    ops.push(WriteOp::UpdateGlobal {
        gid: "no-such-gid".into(),
        expect_status: "submitted".into(),
        expect_owner: None,
        set: set_status("failed", t2),
        branches: vec![bu("01", "failed")],
    });
    want.push(Err(StoreError::NotFound));
    assert_eq!(together(&s, ops).await?, want);
    for (i, a) in after.into_iter().enumerate() {
        let got = s.find_global(&a.gid).await?.ok_or("gone")?;
        assert_eq!(got, a, "global {i}");
        let st: Vec<String> = s
            .find_branches(&a.gid)
            .await?
            .into_iter()
            .map(|b| b.status)
            .collect();
        let want = if i % 5 == 1 || i % 5 == 2 {
            ["prepared", "prepared", "prepared", "prepared"]
        } else {
            ["prepared", "succeed", "prepared", "failed"]
        };
        assert_eq!(st, want, "branches of global {i}");
    }
    Ok(())
}

enum StoreErrorOr {
    Ok,
    Err(StoreError),
}

/// A value the database refuses (a gid longer than dtm's varchar(128)) fails its own
/// write only; the writes committed with it stand.
async fn refused_value_fails_only_its_op(s: Arc<dyn Store>) -> R {
    let t = now();
    let long = "x".repeat(300);
    let mut tasks = vec![];
    for i in 0..40 {
        let s = Arc::clone(&s);
        let g = if i == 20 {
            long.clone()
        } else {
            gid(&format!("ref{i}"))
        };
        tasks.push(tokio::spawn(async move {
            let r = save(&*s, global(&g, "submitted", t), vec![]).await;
            (g, r)
        }));
    }
    for task in tasks {
        let (g, r) = task.await?;
        if g.len() == 300 {
            match r {
                Err(StoreError::Unavailable(m)) => assert!(m.contains("refused"), "{m}"),
                other => panic!("a 300-character gid was {other:?}"),
            }
        } else {
            assert_eq!(r, Ok(WriteOutcome::Done), "{g}");
            assert!(s.find_global(&g).await?.is_some());
        }
    }
    Ok(())
}

/// A value the database refuses in one update of a batch of updates fails that update
/// only.
async fn refused_update_fails_only_its_op(s: Arc<dyn Store>) -> R {
    let t = now();
    let gids: Vec<String> = (0..12).map(|i| gid(&format!("refu{i}"))).collect();
    for g in &gids {
        save(
            &*s,
            global(g, "submitted", t),
            vec![branch(g, "01", "action", t)],
        )
        .await?;
    }
    let ops = gids
        .iter()
        .enumerate()
        .map(|(i, g)| {
            let mut set = set_status("succeed", t);
            // result is varchar(1024)
            set.result = Some(if i == 5 {
                "r".repeat(5000)
            } else {
                "ok".into()
            });
            WriteOp::UpdateGlobal {
                gid: g.clone(),
                expect_status: "submitted".into(),
                expect_owner: None,
                set,
                branches: vec![BranchUpdate {
                    branch_id: "01".into(),
                    op: "action".into(),
                    status: "succeed".into(),
                    time: t,
                }],
            }
        })
        .collect();
    let got = together(&s, ops).await?;
    for (i, (g, r)) in gids.iter().zip(got).enumerate() {
        let gl = s.find_global(g).await?.ok_or("gone")?;
        let b = &s.find_branches(g).await?[0];
        if i == 5 {
            match r {
                Err(StoreError::Unavailable(m)) => assert!(m.contains("refused"), "{m}"),
                other => panic!("a 5000-character result was {other:?}"),
            }
            assert_eq!(
                (gl.status.as_str(), b.status.as_str()),
                ("submitted", "prepared")
            );
        } else {
            assert_eq!(r, Ok(WriteOutcome::Done), "{g}");
            assert_eq!(
                (gl.status.as_str(), b.status.as_str()),
                ("succeed", "succeed")
            );
        }
    }
    Ok(())
}

/// Thousands of branches in one write, in insertion order (Redis scripts work through
/// them in chunks).
async fn many_branches(s: &dyn Store) -> R {
    let t = now();
    let g = gid("many");
    let bs = |r: std::ops::Range<usize>| -> Vec<Branch> {
        r.map(|i| branch(&g, &format!("{i:04}"), "action", t))
            .collect()
    };
    save(s, global(&g, "prepared", t), bs(0..1500)).await?;
    s.write(WriteOp::AddBranches {
        gid: g.clone(),
        expect_status: "prepared".into(),
        branches: bs(1500..2600),
    })
    .await?;
    let got = s.find_branches(&g).await?;
    assert_eq!(got.len(), 2600);
    assert!(
        got.iter()
            .enumerate()
            .all(|(i, b)| b.branch_id == format!("{i:04}")),
        "insertion order"
    );
    // one update of every branch, and of one that does not exist (not created)
    let ups = |r: std::ops::Range<usize>| -> Vec<BranchUpdate> {
        r.map(|i| BranchUpdate {
            branch_id: format!("{i:04}"),
            op: "action".into(),
            status: "succeed".into(),
            time: t,
        })
        .collect()
    };
    for branches in [ups(0..1300), ups(1300..2601)] {
        s.write(WriteOp::UpdateGlobal {
            gid: g.clone(),
            expect_status: "prepared".into(),
            expect_owner: None,
            set: GlobalUpdate {
                update_time: t,
                ..Default::default()
            },
            branches,
        })
        .await?;
    }
    let got = s.find_branches(&g).await?;
    assert_eq!(got.len(), 2600, "an update creates no branch");
    assert!(
        got.iter().all(|b| b.status == "succeed"),
        "every branch updated"
    );
    Ok(())
}

/// resetNextCronTime really makes a transaction due (also where an index holds the
/// schedule, as on Redis); a finished one never is, whatever its next_cron_time.
async fn reset_next_makes_due_finished_never(s: &dyn Store) -> R {
    let t = now();
    let lease = Duration::seconds(30);
    let g = gid("rn");
    let mut gl = global(&g, "submitted", t);
    gl.next_cron_time = Some(t + Duration::days(300));
    save(s, gl, vec![]).await?;
    let claimed = |v: Vec<TransGlobal>| v.iter().any(|c| c.gid == g);
    assert!(!claimed(
        claim(s, t + Duration::days(10), "n", lease).await?
    ));
    s.write(WriteOp::ResetNextCronTime {
        gid: g.clone(),
        now: t,
    })
    .await?;
    assert!(claimed(claim(s, t + Duration::days(10), "n", lease).await?));
    let mut set = set_status("succeed", t);
    set.finish_time = Some(t);
    set.next_cron_time = Some(t);
    s.write(WriteOp::UpdateGlobal {
        gid: g.clone(),
        expect_status: "submitted".into(),
        expect_owner: Some("n".into()),
        set,
        branches: vec![],
    })
    .await?;
    s.write(WriteOp::ResetNextCronTime {
        gid: g.clone(),
        now: t,
    })
    .await?;
    assert!(!claimed(
        claim(s, t + Duration::days(20), "n", lease).await?
    ));
    Ok(())
}

/// Writers racing on the status of the same transactions: one wins each race.
async fn racing_updates_one_winner(s: Arc<dyn Store>) -> R {
    let t = now();
    let gids: Vec<String> = (0..50).map(|i| gid(&format!("race{i}"))).collect();
    for g in &gids {
        save(&*s, global(g, "prepared", t), vec![]).await?;
    }
    let mut tasks = vec![];
    for g in &gids {
        for r in 0..3 {
            let (s, g) = (Arc::clone(&s), g.clone());
            tasks.push(tokio::spawn(async move {
                let mut set = set_status("submitted", t);
                set.owner = Some(format!("racer{r}"));
                s.write(WriteOp::UpdateGlobal {
                    gid: g,
                    expect_status: "prepared".into(),
                    expect_owner: None,
                    set,
                    branches: vec![],
                })
                .await
            }));
        }
    }
    let (mut won, mut lost) = (0, 0);
    for task in tasks {
        match task.await? {
            Ok(_) => won += 1,
            Err(StoreError::NotFound) => lost += 1,
            Err(e) => return Err(e.into()),
        }
    }
    assert_eq!((won, lost), (50, 100));
    for g in &gids {
        let got = s.find_global(g).await?.ok_or("gone")?;
        assert_eq!(got.status, "submitted");
        assert!(got.owner.starts_with("racer"));
    }
    Ok(())
}

/// Paging through rows that share create times lists each row once, newest first, with
/// every page size.
async fn scan_pages_through_ties(s: &dyn Store) -> R {
    let base = now() - Duration::days(30_000);
    let tt = format!("tt{}", &dtm_core::new_gid()[..6]);
    for i in 0..23 {
        let g = gid(&format!("tie{i:02}"));
        let mut gl = global(&g, "succeed", base);
        gl.trans_type = tt.clone();
        gl.create_time = Some(base + Duration::seconds(i / 2));
        save(s, gl, vec![]).await?;
    }
    for limit in [1, 4, 23, 100] {
        let mut q = ScanQuery {
            limit,
            trans_type: tt.clone(),
            ..Default::default()
        };
        let mut times = vec![];
        let mut seen = std::collections::HashSet::new();
        for _ in 0..100 {
            let (rows, next) = s.scan_globals(&q).await?;
            assert!(rows.len() <= limit, "at most limit rows");
            for r in rows {
                assert!(
                    seen.insert(r.gid.clone()),
                    "{} twice (limit {limit})",
                    r.gid
                );
                times.push(r.create_time);
            }
            if next.is_empty() {
                break;
            }
            assert_ne!(next, q.position, "the position moves");
            q.position = next;
        }
        assert_eq!(seen.len(), 23, "every row once (limit {limit})");
        assert!(times.windows(2).all(|w| w[0] >= w[1]), "newest first");
    }
    Ok(())
}

async fn purge_keeps_unfinished(s: &dyn Store) -> R {
    let t = now();
    let old = t - Duration::days(30);
    let mk = |tag: &str, status: &str, at: DateTime<Utc>| {
        let g = gid(tag);
        let mut gl = global(&g, status, at);
        gl.next_cron_time = Some(t + Duration::days(365));
        (g.clone(), gl, vec![branch(&g, "01", "action", at)])
    };
    let rows = [
        mk("old-succeed", "succeed", old),
        mk("old-failed", "failed", old),
        mk("old-prepared", "prepared", old),
        mk("old-submitted", "submitted", old),
        mk("new-succeed", "succeed", t),
    ];
    for (_, g, b) in &rows {
        save(s, g.clone(), b.clone()).await?;
    }
    let mut total = 0;
    loop {
        let n = s.purge_finished(t - Duration::days(1), 1).await?;
        total += n;
        if n == 0 {
            break;
        }
    }
    assert!(total >= 2, "deleted {total}");
    for (g, gl, _) in &rows {
        let gone = gl.update_time == Some(old) && (gl.status == "succeed" || gl.status == "failed");
        assert_eq!(s.find_global(g).await?.is_none(), gone, "{g}");
        assert_eq!(s.find_branches(g).await?.is_empty(), gone, "{g}");
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq)]
enum Backend {
    Sqlite,
    Postgres,
    MySql,
    Redis,
}

impl Backend {
    fn is_sql(self) -> bool {
        matches!(self, Backend::Postgres | Backend::MySql)
    }
}

/// Empty the script cache of every node named, as a fresh, restarted or failed-over
/// Redis has it: the next EVALSHA of each script answers NOSCRIPT.
async fn flush_scripts(o: &RedisOptions) -> R {
    for (h, p) in &o.nodes {
        let auth = if o.password.is_empty() {
            String::new()
        } else {
            format!("{}:{}@", o.user, o.password)
        };
        let client = redis::Client::open(format!("redis://{auth}{h}:{p}/"))?;
        let mut c = client.get_multiplexed_async_connection().await?;
        redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async::<()>(&mut c)
            .await?;
    }
    Ok(())
}

async fn conformance(s: Arc<dyn Store>, backend: Backend) -> R {
    conformance_with(s, backend, None).await
}

/// `redis`: the options of the Redis under test, whose script cache is emptied before
/// the same-gid ordering checks.
async fn conformance_with(s: Arc<dyn Store>, backend: Backend, redis: Option<&RedisOptions>) -> R {
    s.ping().await?;
    // first, while the store holds only the rows a test put there before
    claims_oldest_first(&*s, backend).await?;
    save_new_roundtrip_and_conflict(&*s).await?;
    update_global_guards(&*s).await?;
    add_branches_guard(&*s).await?;
    claim_due_leases(&*s).await?;
    reset_cron_time_counts(&*s).await?;
    kv_versions(&*s).await?;
    scan_pages_and_filters(&*s).await?;
    concurrent_writes_get_their_own_results(Arc::clone(&s)).await?;
    updates_in_one_batch(Arc::clone(&s)).await?;
    // Writes of one gid issued together, applied in order (on Redis also when the
    // scripts are not cached yet: a fresh server answers NOSCRIPT first).
    let flush = || async {
        match redis {
            Some(o) => flush_scripts(o).await,
            None => Ok(()),
        }
    };
    flush().await?;
    saves_in_one_batch(Arc::clone(&s)).await?;
    flush().await?;
    saves_and_updates_in_one_group(Arc::clone(&s)).await?;
    flush().await?;
    save_and_updates_of_one_gid_in_one_batch(Arc::clone(&s)).await?;
    flush().await?;
    add_branches_in_one_batch(Arc::clone(&s)).await?;
    if backend.is_sql() {
        refused_value_fails_only_its_op(Arc::clone(&s)).await?;
        refused_update_fails_only_its_op(Arc::clone(&s)).await?;
    }
    many_branches(&*s).await?;
    reset_next_makes_due_finished_never(&*s).await?;
    racing_updates_one_winner(Arc::clone(&s)).await?;
    scan_pages_through_ties(&*s).await?;
    // Redis expires finished transactions by itself (key expiry, tested in redis.rs and
    // the retention scenario); its contract run keeps them (FinishedDataExpire 0)
    if backend != Backend::Redis {
        purge_keeps_unfinished(&*s).await?;
    }
    s.close().await;
    Ok(())
}

#[tokio::test]
async fn sqlite_conformance() -> R {
    let dir = tempfile::tempdir()?;
    let s =
        dtm_store::SqliteStore::open(&dir.path().join("c.sqlite"), dtm_store::SqliteSync::Full)?;
    conformance(Arc::new(s), Backend::Sqlite).await
}

fn env(k: &str) -> Option<String> {
    std::env::var(k).ok().filter(|v| !v.is_empty())
}

/// Options for a fresh namespace on the local server, or None when `DTM_TEST_STORE` does
/// not name this backend.
fn sql_options(d: Dialect, name: &str) -> Option<SqlOptions> {
    if env("DTM_TEST_STORE").as_deref() != Some(name) {
        eprintln!("skipped: DTM_TEST_STORE is not {name}");
        return None;
    }
    let mut o = SqlOptions::new(d);
    if let Some(h) = env("STORE_HOST") {
        o.host = h;
    }
    if let Some(p) = env("STORE_PORT").and_then(|p| p.parse().ok()) {
        o.port = p;
    }
    if let Some(u) = env("STORE_USER") {
        o.user = u;
    }
    if let Some(p) = env("STORE_PASSWORD") {
        o.password = p;
    }
    o.max_open_conns = 8;
    let ns = namespace();
    match d {
        Dialect::Postgres => {
            o.db = "dtm_test".into();
            o.schema = ns;
        }
        Dialect::MySql => o.db = ns,
    }
    Some(o)
}

/// A fresh namespace (schema, database, key prefix), named like dtm-testkit's, whose sweep
/// drops the ones a failed run left.
fn namespace() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!(
        "dtm_t_{secs}_{}",
        dtm_core::new_gid()
            .to_ascii_lowercase()
            .replace(|c: char| !c.is_ascii_alphanumeric(), "")
    )
}

async fn sql_conformance(o: SqlOptions) -> R {
    let s = dtm_store::SqlStore::open(&o).await?;
    let backend = match o.dialect {
        Dialect::Postgres => Backend::Postgres,
        Dialect::MySql => Backend::MySql,
    };
    let r = conformance(Arc::new(s), backend).await;
    drop_namespace(&o).await?;
    r
}

#[tokio::test]
async fn postgres_conformance() -> R {
    match sql_options(Dialect::Postgres, "postgres") {
        Some(o) => sql_conformance(o).await,
        None => Ok(()),
    }
}

#[tokio::test]
async fn mysql_conformance() -> R {
    match sql_options(Dialect::MySql, "mysql") {
        Some(o) => sql_conformance(o).await,
        None => Ok(()),
    }
}

fn redis_selected() -> bool {
    let on = env("DTM_TEST_STORE").as_deref() == Some("redis");
    if !on {
        eprintln!("skipped: DTM_TEST_STORE is not redis");
    }
    on
}

/// Redis options for a fresh key prefix on `hosts` (a list with a comma is a cluster).
fn redis_options(hosts: &str) -> Result<RedisOptions, String> {
    let port = env("STORE_PORT")
        .and_then(|p| p.parse().ok())
        .unwrap_or(6379);
    let mut o = RedisOptions::from_host_port(hosts, port)?;
    o.user = env("STORE_USER").unwrap_or_default();
    o.password = env("STORE_PASSWORD").unwrap_or_default();
    o.prefix = namespace();
    // keep finished transactions: some checks write them with old update times
    o.finished_ttl_secs = 0;
    Ok(o)
}

async fn redis_conformance_on(o: RedisOptions) -> R {
    let s = dtm_store::RedisStore::open(o.clone())?;
    let r = conformance_with(Arc::new(s), Backend::Redis, Some(&o)).await;
    drop_prefix(&o).await?;
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_conformance() -> R {
    if !redis_selected() {
        return Ok(());
    }
    let host = env("STORE_HOST").unwrap_or_else(|| "127.0.0.1".into());
    redis_conformance_on(redis_options(&host)?).await
}

/// The nodes of the test Redis Cluster, when the cluster runs are selected.
fn cluster_nodes() -> Option<String> {
    if !redis_selected() {
        return None;
    }
    let nodes = env("DTM_TEST_REDIS_CLUSTER");
    if nodes.is_none() {
        eprintln!(
            "skipped: DTM_TEST_REDIS_CLUSTER is unset (start a cluster with scripts/redis-cluster.sh start)"
        );
    }
    nodes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_conformance() -> R {
    match cluster_nodes() {
        Some(nodes) => redis_conformance_on(redis_options(&nodes)?).await,
        None => Ok(()),
    }
}

/// dtm's kind of prefix, a hash tag (`{a}`), pins every key to one slot; it must still
/// work on a cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_braced_prefix_conformance() -> R {
    let Some(nodes) = cluster_nodes() else {
        return Ok(());
    };
    let mut o = redis_options(&nodes)?;
    o.prefix = format!("{{{}}}", o.prefix);
    redis_conformance_on(o).await
}

/// A plain connection to the test database, as the tests' user.
async fn pg_admin(o: &SqlOptions) -> Result<sqlx_postgres::PgConnection, sqlx_core::Error> {
    use sqlx_core::connection::Connection;
    let mut opts = sqlx_postgres::PgConnectOptions::new()
        .host(&o.host)
        .port(o.port)
        .username(&o.user)
        .database(&o.db);
    if !o.password.is_empty() {
        opts = opts.password(&o.password);
    }
    sqlx_postgres::PgConnection::connect_with(&opts).await
}

/// How many trans_branch_op rows `gid` has in `schema`.
async fn branch_rows(
    db: &mut sqlx_postgres::PgConnection,
    schema: &str,
    gid: &str,
) -> Result<i64, sqlx_core::Error> {
    sqlx_core::query_scalar::query_scalar(sqlx_core::sql_str::AssertSqlSafe(format!(
        "SELECT count(*) FROM {schema}.trans_branch_op WHERE gid = '{gid}'"
    )))
    .fetch_one(db)
    .await
}

/// A change of the branch (id, op) to `status` at `t`.
fn branch_update(id: &str, op: &str, status: &str, t: DateTime<Utc>) -> BranchUpdate {
    BranchUpdate {
        branch_id: id.into(),
        op: op.into(),
        status: status.into(),
        time: t,
    }
}

/// Postgres keeps a new transaction's branches in `trans_global.branches`, their changes
/// in `branch_states` (columns its migration adds); a database written by dtm, with its
/// branches as rows of trans_branch_op, is upgraded in place and read as it was.
#[tokio::test]
async fn postgres_takes_over_dtm_rows_and_saves_new_branches_in_the_row() -> R {
    use sqlx_core::executor::Executor;
    use sqlx_core::query_scalar::query_scalar;
    use sqlx_core::sql_str::AssertSqlSafe;
    let Some(o) = sql_options(Dialect::Postgres, "postgres") else {
        return Ok(());
    };
    let mut db = pg_admin(&o).await?;
    // dtm's own tables (sqls/dtmsvr.storage.postgres.sql: times to the second, no
    // branch columns) holding one saga as dtm writes it
    let ddl = format!(
        "CREATE SCHEMA {s};
         CREATE TABLE {s}.trans_global (id bigserial PRIMARY KEY, gid varchar(128) NOT NULL, trans_type varchar(45) NOT NULL, status varchar(45) NOT NULL, query_prepared varchar(1024) NOT NULL, protocol varchar(45) NOT NULL, create_time timestamp(0) with time zone DEFAULT NULL, update_time timestamp(0) with time zone DEFAULT NULL, finish_time timestamp(0) with time zone DEFAULT NULL, rollback_time timestamp(0) with time zone DEFAULT NULL, options varchar(1024) DEFAULT '', custom_data varchar(1024) DEFAULT '', next_cron_interval int DEFAULT NULL, next_cron_time timestamp(0) with time zone DEFAULT NULL, owner varchar(128) NOT NULL DEFAULT '', ext_data text, result varchar(1024) DEFAULT '', rollback_reason varchar(1024) DEFAULT '', CONSTRAINT gid UNIQUE (gid));
         CREATE TABLE {s}.trans_branch_op (id bigserial PRIMARY KEY, gid varchar(128) NOT NULL, url varchar(1024) NOT NULL, data text, bin_data bytea, branch_id varchar(128) NOT NULL, op varchar(45) NOT NULL, status varchar(45) NOT NULL, finish_time timestamp(0) with time zone DEFAULT NULL, rollback_time timestamp(0) with time zone DEFAULT NULL, create_time timestamp(0) with time zone DEFAULT NULL, update_time timestamp(0) with time zone DEFAULT NULL, CONSTRAINT gid_branch_uniq UNIQUE (gid, branch_id, op));
         CREATE TABLE {s}.kv (id bigserial PRIMARY KEY, cat varchar(45) NOT NULL, k varchar(128) NOT NULL, v text, version bigint DEFAULT 1, create_time timestamp(0) with time zone DEFAULT NULL, update_time timestamp(0) with time zone DEFAULT NULL, CONSTRAINT uniq_k UNIQUE (cat, k));
         INSERT INTO {s}.trans_global (gid, trans_type, status, query_prepared, protocol, create_time, update_time, next_cron_interval, next_cron_time) VALUES ('old-saga', 'saga', 'submitted', '', 'http', now(), now(), 10, now() + interval '1 hour');
         INSERT INTO {s}.trans_branch_op (gid, url, bin_data, branch_id, op, status, create_time, update_time) VALUES
           ('old-saga', 'http://b/TransOutRevert', 'c1', '01', 'compensate', 'prepared', now(), now()),
           ('old-saga', 'http://b/TransOut', 'a1', '01', 'action', 'prepared', now(), now());",
        s = o.schema
    );
    db.execute(AssertSqlSafe(ddl)).await?;
    let r = async {
        let s = dtm_store::SqlStore::open(&o).await?;
        let t = now();
        // dtm's rows, read as they are, and changed where they are
        let old = s.find_branches("old-saga").await?;
        let got: Vec<(&str, &str, &str)> = old
            .iter()
            .map(|b| (b.branch_id.as_str(), b.op.as_str(), b.status.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("01", "compensate", "prepared"),
                ("01", "action", "prepared")
            ]
        );
        s.write(WriteOp::UpdateGlobal {
            gid: "old-saga".into(),
            expect_status: "submitted".into(),
            expect_owner: None,
            set: set_status("succeed", t),
            branches: vec![branch_update("01", "action", "succeed", t)],
        })
        .await?;
        let old = s.find_branches("old-saga").await?;
        assert_eq!(
            (old[1].status.as_str(), old[1].finish_time),
            ("succeed", Some(t))
        );
        assert_eq!(old[0].status, "prepared");
        // a new saga: its branches are in its row, none in trans_branch_op
        let g = gid("col");
        let bs = saga_branches(&g, t);
        save(&s, global(&g, "submitted", t), bs.clone()).await?;
        let n = branch_rows(&mut db, &o.schema, &g).await?;
        assert_eq!(n, 0, "no branch rows for a new transaction");
        let stored = s.find_branches(&g).await?;
        let strip = |v: &[Branch]| -> Vec<Branch> {
            v.iter().map(|b| Branch { id: 0, ..b.clone() }).collect()
        };
        assert_eq!(strip(&stored), strip(&bs));
        // two updates, each appended to the log; the last one of a branch wins
        for (status, at) in [
            ("failed", t + Duration::seconds(1)),
            ("succeed", t + Duration::seconds(2)),
        ] {
            s.write(WriteOp::UpdateGlobal {
                gid: g.clone(),
                expect_status: "submitted".into(),
                expect_owner: None,
                set: GlobalUpdate {
                    update_time: at,
                    ..Default::default()
                },
                branches: vec![
                    branch_update(&bs[1].branch_id, &bs[1].op, status, at),
                    // no such branch: changes nothing, as an UPDATE that matches no row
                    branch_update("99", "action", status, at),
                ],
            })
            .await?;
        }
        let mut want = strip(&bs);
        want[1].status = "succeed".into();
        want[1].update_time = Some(t + Duration::seconds(2));
        want[1].finish_time = Some(t + Duration::seconds(2));
        assert_eq!(strip(&s.find_branches(&g).await?), want);
        // branches added later are rows, after the saved ones; a saved one cannot be
        // added again
        let dup = s
            .write(WriteOp::AddBranches {
                gid: g.clone(),
                expect_status: "submitted".into(),
                branches: vec![branch(&g, &bs[0].branch_id, &bs[0].op, t)],
            })
            .await;
        assert_eq!(dup, Err(StoreError::UniqueConflict));
        s.write(WriteOp::AddBranches {
            gid: g.clone(),
            expect_status: "submitted".into(),
            branches: vec![branch(&g, "09", "action", t)],
        })
        .await?;
        let n = branch_rows(&mut db, &o.schema, &g).await?;
        assert_eq!(n, 1);
        let all = s.find_branches(&g).await?;
        assert_eq!(all.len(), bs.len() + 1);
        assert_eq!(
            (all[bs.len()].branch_id.as_str(), all[bs.len()].op.as_str()),
            ("09", "action")
        );
        // a transaction saved without branches (tcc): its branches are rows, and their
        // changes go to the rows only, not to a log that could change nothing
        let tcc = gid("tcc");
        let mut tg = global(&tcc, "prepared", t);
        tg.trans_type = "tcc".into();
        save(&s, tg, vec![]).await?;
        s.write(WriteOp::AddBranches {
            gid: tcc.clone(),
            expect_status: "prepared".into(),
            branches: vec![
                branch(&tcc, "01", "confirm", t),
                branch(&tcc, "01", "cancel", t),
            ],
        })
        .await?;
        s.write(WriteOp::UpdateGlobal {
            gid: tcc.clone(),
            expect_status: "prepared".into(),
            expect_owner: None,
            set: set_status("succeed", t),
            branches: vec![branch_update("01", "confirm", "succeed", t)],
        })
        .await?;
        let got: Vec<(String, String)> = s
            .find_branches(&tcc)
            .await?
            .into_iter()
            .map(|b| (b.op, b.status))
            .collect();
        let want = [("confirm", "succeed"), ("cancel", "prepared")];
        assert_eq!(got, want.map(|(a, b)| (a.to_string(), b.to_string())));
        let log: Option<String> = query_scalar(AssertSqlSafe(format!(
            "SELECT branch_states FROM {}.trans_global WHERE gid = '{tcc}'",
            o.schema
        )))
        .fetch_one(&mut db)
        .await?;
        assert_eq!(log, None);
        s.close().await;
        Ok::<(), Box<dyn std::error::Error>>(())
    }
    .await;
    drop_namespace(&o).await?;
    r
}

/// A user who may change rows but not ALTER the tables: the branch columns cannot be
/// added, and the store keeps every branch as a row of trans_branch_op, under the same
/// contract.
#[tokio::test]
async fn postgres_conformance_without_the_branch_columns() -> R {
    use sqlx_core::executor::Executor;
    use sqlx_core::sql_str::AssertSqlSafe;
    let Some(o) = sql_options(Dialect::Postgres, "postgres") else {
        return Ok(());
    };
    // the tables as the server creates them, then without the two columns
    dtm_store::SqlStore::open(&o).await?.close().await;
    let mut db = pg_admin(&o).await?;
    let role = "dtm_t_rows_only";
    // roles are shared by every test database; an earlier run may have made it
    let _ = db
        .execute(AssertSqlSafe(format!("CREATE ROLE {role} LOGIN")))
        .await;
    db.execute(AssertSqlSafe(format!(
        "ALTER TABLE {s}.trans_global DROP COLUMN branches, DROP COLUMN branch_states;
         GRANT USAGE ON SCHEMA {s} TO {role};
         GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {s} TO {role};
         GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {s} TO {role};",
        s = o.schema
    )))
    .await?;
    let mut limited = o.clone();
    limited.user = role.into();
    limited.password = String::new();
    let r = async {
        let s = Arc::new(dtm_store::SqlStore::open(&limited).await?);
        let g = gid("rows");
        let t = now();
        save(&*s, global(&g, "submitted", t), saga_branches(&g, t)).await?;
        let n = branch_rows(&mut db, &o.schema, &g).await?;
        assert_eq!(n, 4, "every branch is a row");
        conformance(s, Backend::Postgres).await?;
        // Another server that may ALTER adds the columns while this one runs: this one
        // reads the branches that server keeps in them, and from then on writes there too.
        let rows_only = dtm_store::SqlStore::open(&limited).await?;
        let full = dtm_store::SqlStore::open(&o).await?;
        let g = gid("mixed");
        let bs = saga_branches(&g, t);
        save(&full, global(&g, "submitted", t), bs.clone()).await?;
        let got = rows_only.find_branches(&g).await?;
        assert_eq!(got.len(), bs.len());
        assert!(
            got.iter()
                .zip(&bs)
                .all(|(a, b)| a.op == b.op && a.bin_data == b.bin_data)
        );
        rows_only
            .write(WriteOp::UpdateGlobal {
                gid: g.clone(),
                expect_status: "submitted".into(),
                expect_owner: None,
                set: set_status("succeed", t),
                branches: vec![branch_update(&bs[1].branch_id, &bs[1].op, "succeed", t)],
            })
            .await?;
        let got = full.find_branches(&g).await?;
        assert_eq!(got[1].status, "succeed");
        let g2 = gid("mixed");
        save(
            &rows_only,
            global(&g2, "submitted", t),
            saga_branches(&g2, t),
        )
        .await?;
        let n = branch_rows(&mut db, &o.schema, &g2).await?;
        assert_eq!(n, 0, "the branches of a later transaction are in its row");
        rows_only.close().await;
        full.close().await;
        Ok(())
    }
    .await;
    drop_namespace(&o).await?;
    r
}

/// Recovery keeps claiming while every writer waits: here on rows another session has
/// locked. A claim queued behind a writer's batch would wait with it.
#[tokio::test]
async fn postgres_claims_while_the_writers_wait() -> R {
    use sqlx_core::executor::Executor;
    use sqlx_core::sql_str::AssertSqlSafe;
    let Some(o) = sql_options(Dialect::Postgres, "postgres") else {
        return Ok(());
    };
    let s = Arc::new(dtm_store::SqlStore::open(&o).await?);
    let r = async {
        let t = now();
        // rows the writers will wait on: 16 fixed gids (a fresh schema), which the
        // store's hash spreads over both writers
        let mut held = vec![];
        for i in 0..16 {
            let g = format!("held{i}");
            save(&*s, global(&g, "submitted", t), vec![]).await?;
            held.push(g);
        }
        let due = gid("due");
        let mut gl = global(&due, "submitted", t);
        gl.next_cron_time = Some(t - Duration::minutes(1));
        save(&*s, gl, vec![]).await?;

        let mut db = pg_admin(&o).await?;
        db.execute(AssertSqlSafe(format!(
            "BEGIN; SELECT id FROM {}.trans_global WHERE gid LIKE 'held%' FOR UPDATE",
            o.schema
        )))
        .await?;
        let writes: Vec<_> = held
            .iter()
            .map(|g| {
                let s = Arc::clone(&s);
                let op = WriteOp::UpdateGlobal {
                    gid: g.clone(),
                    expect_status: "submitted".into(),
                    expect_owner: None,
                    set: set_status("succeed", t),
                    branches: vec![],
                };
                tokio::spawn(async move { s.write(op).await })
            })
            .collect();
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let claimed = tokio::time::timeout(
            std::time::Duration::from_secs(20),
            claim(&*s, t, "node-r", Duration::seconds(30)),
        )
        .await
        .map_err(|_| "the claim waited for the writers")??;
        assert_eq!(
            claimed.iter().map(|g| g.gid.as_str()).collect::<Vec<_>>(),
            [due.as_str()]
        );
        assert!(
            writes.iter().all(|w| !w.is_finished()),
            "the writes did not wait on the locked rows; the check proves nothing"
        );
        db.execute("ROLLBACK").await?;
        for w in writes {
            assert_eq!(w.await??, WriteOutcome::Done);
        }
        for g in &held {
            let stored = s.find_global(g).await?.ok_or("gone")?;
            assert_eq!(stored.status, "succeed");
        }
        Ok::<_, Box<dyn std::error::Error>>(())
    }
    .await;
    s.close().await;
    drop_namespace(&o).await?;
    r
}
