//! The Redis store's own behaviour (the shared contract is in conformance.rs): retention by
//! key expiry, outages, the stored shard count, spreading over a cluster. Runs when
//! `DTM_TEST_STORE=redis`, on the Redis at `STORE_HOST`/`STORE_PORT` (default
//! 127.0.0.1:6379) and, when `DTM_TEST_REDIS_CLUSTER` lists the nodes of a Redis Cluster
//! (e.g. from `scripts/redis-cluster.sh start`), on the cluster too. Each test uses a key
//! prefix of its own and deletes its keys at the end.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::Utc;
use dtm_core::store::{GlobalUpdate, ScanQuery, Store, StoreError, WriteOp, WriteOutcome};
use dtm_proto::{Branch, TransGlobal};
use dtm_store::redis_store::drop_prefix;
use dtm_store::{RedisOptions, RedisStore};

fn env(k: &str) -> Option<String> {
    std::env::var(k).ok().filter(|v| !v.is_empty())
}

fn redis_selected() -> bool {
    let on = env("DTM_TEST_STORE").as_deref() == Some("redis");
    if !on {
        eprintln!("skipped: DTM_TEST_STORE is not redis");
    }
    on
}

fn single_addr() -> Option<String> {
    if !redis_selected() {
        return None;
    }
    let host = env("STORE_HOST").unwrap_or_else(|| "127.0.0.1".into());
    let port = env("STORE_PORT").unwrap_or_else(|| "6379".into());
    Some(if host.contains(':') {
        host
    } else {
        format!("{host}:{port}")
    })
}

fn cluster_addrs() -> Option<String> {
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

/// A test on the single Redis and one on the Redis Cluster, each run when its address is
/// configured.
macro_rules! on_single_and_cluster {
    ($body:ident, $single:ident, $cluster:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $single() {
            if let Some(h) = single_addr() {
                $body(h).await;
            }
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $cluster() {
            if let Some(h) = cluster_addrs() {
                $body(h).await;
            }
        }
    };
}

fn unique_prefix(tag: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "dtm_t_{}_{}{}{tag}:",
        Utc::now().timestamp(),
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn options(hosts: &str, prefix: &str) -> RedisOptions {
    let mut o = RedisOptions::from_host_port(hosts, 6379).unwrap_or_else(|e| panic!("{e}"));
    o.prefix = prefix.to_string();
    o
}

fn global(gid: &str, status: &str, next: Option<chrono::DateTime<Utc>>) -> TransGlobal {
    let t = Utc::now();
    TransGlobal {
        gid: gid.into(),
        trans_type: "saga".into(),
        status: status.into(),
        protocol: "http".into(),
        create_time: Some(t),
        update_time: Some(t),
        options: r#"{"concurrent":false}"#.into(),
        next_cron_time: next,
        ..Default::default()
    }
}

fn branch(gid: &str) -> Branch {
    Branch {
        gid: gid.into(),
        url: "http://127.0.0.1:1/x".into(),
        branch_id: "01".into(),
        op: "action".into(),
        status: "prepared".into(),
        ..Default::default()
    }
}

async fn purge(hosts: String, prefix: String) {
    let _ = drop_prefix(&options(&hosts, &prefix)).await;
}

/// Plain connections to every node (for inspection; cluster keys are read on the node
/// that owns them).
async fn node_conns(hosts: &str) -> Vec<redis::aio::MultiplexedConnection> {
    let mut out = Vec::new();
    for h in hosts.split(',').filter(|h| !h.is_empty()) {
        let client = redis::Client::open(format!("redis://{h}/")).unwrap_or_else(|e| panic!("{e}"));
        out.push(
            client
                .get_multiplexed_async_connection()
                .await
                .unwrap_or_else(|e| panic!("cannot reach Redis at {h}: {e}")),
        );
    }
    out
}

async fn keys_like(hosts: &str, pattern: &str) -> Vec<(redis::aio::MultiplexedConnection, String)> {
    let mut out = Vec::new();
    for mut c in node_conns(hosts).await {
        let mut cursor = 0u64;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut c)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            out.extend(keys.into_iter().map(|k| (c.clone(), k)));
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    out
}

/// A connection that sends each command where its key lives: the node itself, or the
/// cluster (comma-separated hosts).
enum AnyConn {
    Node(redis::aio::MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for AnyConn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            AnyConn::Node(c) => c.req_packed_command(cmd),
            AnyConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            AnyConn::Node(c) => c.req_packed_commands(pipeline, offset, count),
            AnyConn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        0
    }
}

async fn any_conn(hosts: &str) -> AnyConn {
    if !hosts.contains(',') {
        return AnyConn::Node(node_conns(hosts).await.remove(0));
    }
    let nodes: Vec<String> = hosts.split(',').map(|h| format!("redis://{h}/")).collect();
    let client = redis::cluster::ClusterClient::new(nodes).unwrap_or_else(|e| panic!("{e}"));
    AnyConn::Cluster(
        client
            .get_async_connection()
            .await
            .unwrap_or_else(|e| panic!("cannot reach the cluster at {hosts}: {e}")),
    )
}

/// The stored branches of `gid` (the test fails when they cannot be read).
async fn branches_of(s: &RedisStore, gid: &str) -> Vec<Branch> {
    s.find_branches(gid)
        .await
        .unwrap_or_else(|e| panic!("branches of {gid}: {e}"))
}

fn finish(gid: &str) -> WriteOp {
    WriteOp::UpdateGlobal {
        gid: gid.into(),
        expect_status: "submitted".into(),
        expect_owner: None,
        set: GlobalUpdate {
            status: Some("succeed".into()),
            finish_time: Some(Utc::now()),
            update_time: Utc::now(),
            ..Default::default()
        },
        branches: vec![],
    }
}

async fn ttl_of(hosts: &str, pattern: &str) -> Vec<i64> {
    let mut out = Vec::new();
    for (mut c, k) in keys_like(hosts, pattern).await {
        out.push(
            redis::cmd("TTL")
                .arg(k)
                .query_async(&mut c)
                .await
                .unwrap_or_else(|e| panic!("{e}")),
        );
    }
    out
}

/// How many `all` index entries of the prefix name `gid`.
async fn index_entries(hosts: &str, prefix: &str, gid: &str) -> usize {
    let mut n = 0;
    for (mut c, k) in keys_like(hosts, &format!("{prefix}*all")).await {
        let found: Vec<String> = redis::cmd("ZRANGE")
            .arg(k)
            .arg(0)
            .arg(-1)
            .query_async(&mut c)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        n += found.iter().filter(|m| *m == gid).count();
    }
    n
}

/// Unfinished transactions never expire; finished ones expire after FinishedDataExpire,
/// and then leave `GET /all` as well.
async fn retention(hosts: String) {
    let prefix = unique_prefix("ttl");
    let mut o = options(&hosts, &prefix);
    o.finished_ttl_secs = 2;
    let s = RedisStore::open(o).unwrap_or_else(|e| panic!("{e}"));
    for gid in ["keep", "done"] {
        let b = branch(gid);
        s.write(WriteOp::SaveNew {
            global: global(gid, "submitted", Some(Utc::now())),
            branches: vec![b],
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }
    s.write(finish("done"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let keep = ttl_of(&hosts, &format!("{prefix}*:keep")).await;
    assert_eq!(
        keep,
        vec![-1; 2],
        "unfinished: 2 keys (global, branches), no TTL"
    );
    // a branch added after the finish expires with the transaction
    let mut late = branch("done");
    late.branch_id = "02".into();
    s.write(WriteOp::AddBranches {
        gid: "done".into(),
        expect_status: "succeed".into(),
        branches: vec![late],
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let done = ttl_of(&hosts, &format!("{prefix}*:done")).await;
    assert_eq!(done.len(), 2, "2 keys per transaction");
    assert!(
        done.iter().all(|t| (1..=2).contains(t)),
        "finished: TTL set, got {done:?}"
    );
    let ids: Vec<String> = branches_of(&s, "done")
        .await
        .into_iter()
        .map(|b| b.branch_id)
        .collect();
    assert_eq!(ids, ["01", "02"]);
    tokio::time::sleep(Duration::from_millis(2600)).await;
    assert!(
        s.find_global("done")
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .is_none()
    );
    assert!(
        s.find_global("keep")
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .is_some()
    );
    // more transactions in the shards; until the sweep, the expired one is skipped
    for i in 0..64 {
        let gid = format!("later-{i}");
        s.write(WriteOp::SaveNew {
            global: global(&gid, "prepared", None),
            branches: vec![],
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }
    assert_eq!(index_entries(&hosts, &prefix, "done").await, 1);
    let mut pos = String::new();
    let mut seen = Vec::new();
    loop {
        let q = ScanQuery {
            position: pos,
            limit: 10,
            ..Default::default()
        };
        let (rows, next) = s.scan_globals(&q).await.unwrap_or_else(|e| panic!("{e}"));
        seen.extend(rows.into_iter().map(|g| g.gid));
        if next.is_empty() {
            break;
        }
        pos = next;
    }
    assert_eq!(seen.len(), 65, "expired transactions are not listed");
    assert!(!seen.contains(&"done".to_string()));
    // an expiry index as earlier versions kept it, beside a shard's index
    let (mut c, all) = keys_like(&hosts, &format!("{prefix}*all"))
        .await
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("no index key under {prefix}"));
    let old_exp = format!("{}exp", all.trim_end_matches("all"));
    let _: i64 = redis::cmd("ZADD")
        .arg(&old_exp)
        .arg(1)
        .arg("gone")
        .query_async(&mut c)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // the retention sweep drops the index entry of the expired transaction only; with a
    // budget of one entry per shard it still gets past the live ones, sweep by sweep
    let bound = Utc::now();
    let mut dropped = 0;
    for _ in 0..200 {
        dropped += s
            .purge_finished(bound, 1)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        if dropped > 0 {
            break;
        }
    }
    assert_eq!(dropped, 1);
    assert_eq!(
        s.purge_finished(bound, 500)
            .await
            .unwrap_or_else(|e| panic!("{e}")),
        0,
        "a second sweep finds nothing more"
    );
    assert_eq!(
        index_entries(&hosts, &prefix, "done").await,
        0,
        "the index entry of the expired transaction was dropped"
    );
    assert_eq!(index_entries(&hosts, &prefix, "keep").await, 1);
    assert!(
        keys_like(&hosts, &old_exp).await.is_empty(),
        "the sweep removed the expiry index of earlier versions"
    );
    assert_eq!(
        keys_like(&hosts, &format!("{prefix}*:done")).await.len(),
        0,
        "no key of the expired transaction is left"
    );
    s.close().await;
    purge(hosts, prefix).await;
}

/// A new transaction that names one branch twice is refused whole, as SQL's unique key on
/// (gid, branch_id, op) refuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_branch_is_a_conflict() {
    let Some(hosts) = single_addr() else {
        return;
    };
    let prefix = unique_prefix("rep");
    let s = RedisStore::open(options(&hosts, &prefix)).unwrap_or_else(|e| panic!("{e}"));
    let r = s
        .write(WriteOp::SaveNew {
            global: global("g1", "submitted", Some(Utc::now())),
            branches: vec![branch("g1"), branch("g1")],
        })
        .await;
    assert_eq!(r, Err(StoreError::UniqueConflict));
    assert!(
        s.find_global("g1")
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .is_none(),
        "nothing stored"
    );
    s.close().await;
    purge(hosts, prefix).await;
}

/// Data of the layout before version 2 (branch states in a key of their own) is converted
/// when a server of this version first opens the prefix: transactions, branches, due
/// times and expiry all stay, and the old keys go.
async fn earlier_layout_is_converted(hosts: String) {
    let prefix = unique_prefix("v1");
    let mut c = any_conn(&hosts).await;
    let tag = format!("{prefix}{{s0}}");
    let now = Utc::now().timestamp_millis();
    let _: () = redis::cmd("SET")
        .arg(format!("{prefix}shards"))
        .arg(1)
        .query_async(&mut c)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // every key of shard 0: one slot, one pipeline
    let mut p = redis::pipe();
    for (gid, status) in [("old1", "submitted"), ("old2", "succeed")] {
        p.cmd("HSET")
            .arg(format!("{tag}g:{gid}"))
            .arg(&[
                ("gid", gid.to_string()),
                ("trans_type", "saga".into()),
                ("status", status.into()),
                ("protocol", "http".into()),
                ("create_time", now.to_string()),
                ("update_time", now.to_string()),
                ("next_cron_time", (now - 1000).to_string()),
                ("id", "1024".into()),
            ])
            .ignore();
        p.cmd("RPUSH")
            .arg(format!("{tag}b:{gid}"))
            .arg(r#"{"branch_id":"01","op":"compensate","url":"http://b/c"}"#)
            .arg(r#"{"branch_id":"01","op":"action","url":"http://b/a","bin":"AAH/"}"#)
            .ignore();
        p.cmd("HSET")
            .arg(format!("{tag}s:{gid}"))
            .arg(r#"["01","compensate"]"#)
            .arg("prepared||")
            .arg(r#"["01","action"]"#)
            .arg(format!("succeed|{now}|{now}"))
            .ignore();
        p.cmd("ZADD")
            .arg(format!("{tag}all"))
            .arg(now)
            .arg(gid)
            .ignore();
    }
    p.cmd("ZADD")
        .arg(format!("{tag}due"))
        .arg(now - 1000)
        .arg("old1")
        .ignore();
    for k in ["g", "b", "s"] {
        p.cmd("PEXPIRE")
            .arg(format!("{tag}{k}:old2"))
            .arg(100_000)
            .ignore();
    }
    p.query_async::<()>(&mut c)
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    let s = RedisStore::open(options(&hosts, &prefix)).unwrap_or_else(|e| panic!("{e}"));
    let g = s
        .find_global("old1")
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("old1 lost by the conversion"));
    assert_eq!(
        (g.status.as_str(), g.id, g.protocol.as_str()),
        ("submitted", 1024, "http")
    );
    let bs = branches_of(&s, "old1").await;
    let got: Vec<(&str, &str, &str)> = bs
        .iter()
        .map(|b| (b.op.as_str(), b.url.as_str(), b.status.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("compensate", "http://b/c", "prepared"),
            ("action", "http://b/a", "succeed")
        ]
    );
    assert_eq!(bs[1].bin_data, vec![0, 1, 255]);
    assert!(
        s.find_global("old2")
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .is_some()
    );
    let ttl = ttl_of(&hosts, &format!("{prefix}*:old2")).await;
    assert!(
        ttl.len() == 2 && ttl.iter().all(|t| (1..=100).contains(t)),
        "the finished one keeps its expiry: {ttl:?}"
    );
    assert_eq!(
        ttl_of(&hosts, &format!("{prefix}*:old1")).await,
        vec![-1; 2]
    );
    for old in ["g", "s"] {
        assert!(
            keys_like(&hosts, &format!("{prefix}*{old}:old*"))
                .await
                .is_empty(),
            "old {old}: keys are gone"
        );
    }
    let layout: Option<String> = redis::cmd("GET")
        .arg(format!("{prefix}layout"))
        .query_async(&mut c)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(layout.as_deref(), Some("2"));
    // recovery finds the due one and its branch updates land
    let claimed = s
        .write(WriteOp::ClaimDue {
            now: Utc::now(),
            limit: 10,
            lease_until: Utc::now() + chrono::Duration::seconds(30),
            owner: "n1".into(),
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let WriteOutcome::Claimed(rows) = claimed else {
        panic!("expected claimed rows, got {claimed:?}");
    };
    let gids: Vec<&str> = rows.iter().map(|g| g.gid.as_str()).collect();
    assert_eq!(gids, ["old1"]);
    assert_eq!(rows[0].owner, "n1");
    s.write(WriteOp::UpdateGlobal {
        gid: "old1".into(),
        expect_status: "submitted".into(),
        expect_owner: Some("n1".into()),
        set: GlobalUpdate {
            update_time: Utc::now(),
            ..Default::default()
        },
        branches: vec![dtm_core::store::BranchUpdate {
            branch_id: "01".into(),
            op: "compensate".into(),
            status: "succeed".into(),
            time: Utc::now(),
        }],
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let statuses: Vec<String> = branches_of(&s, "old1")
        .await
        .into_iter()
        .map(|b| b.status)
        .collect();
    assert_eq!(statuses, ["succeed", "succeed"]);
    s.close().await;

    // a layout this version does not know: a clear error, nothing touched
    let _: () = redis::cmd("SET")
        .arg(format!("{prefix}layout"))
        .arg("3")
        .query_async(&mut c)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let s = RedisStore::open(options(&hosts, &prefix)).unwrap_or_else(|e| panic!("{e}"));
    match s.find_global("old1").await {
        Err(StoreError::Unavailable(m)) => assert!(m.contains("layout 3"), "{m}"),
        other => panic!("expected a layout error, got {other:?}"),
    }
    s.close().await;
    assert_eq!(
        keys_like(&hosts, &format!("{prefix}*:old1")).await.len(),
        2,
        "the data stays as it was"
    );
    purge(hosts, prefix).await;
}

on_single_and_cluster!(
    earlier_layout_is_converted,
    single_earlier_layout_is_converted,
    cluster_earlier_layout_is_converted
);

/// A transaction whose hash vanished (evicted, deleted by hand) while its branch list
/// stayed: saving the gid again starts from no branches, not from the leftovers.
async fn gid_saved_again_over_leftovers(hosts: String) {
    let prefix = unique_prefix("left");
    let s = RedisStore::open(options(&hosts, &prefix)).unwrap_or_else(|e| panic!("{e}"));
    s.write(WriteOp::SaveNew {
        global: global("g1", "submitted", Some(Utc::now())),
        branches: vec![branch("g1")],
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let globals = keys_like(&hosts, &format!("{prefix}*t:g1")).await;
    assert_eq!(globals.len(), 1);
    for (mut c, k) in globals {
        let _: i64 = redis::cmd("DEL")
            .arg(k)
            .query_async(&mut c)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    assert_eq!(
        keys_like(&hosts, &format!("{prefix}*:g1")).await.len(),
        1,
        "the branch list stays"
    );
    let mut again = branch("g1");
    again.branch_id = "02".into();
    s.write(WriteOp::SaveNew {
        global: global("g1", "submitted", Some(Utc::now())),
        branches: vec![again],
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let ids: Vec<String> = branches_of(&s, "g1")
        .await
        .into_iter()
        .map(|b| b.branch_id)
        .collect();
    assert_eq!(ids, vec!["02".to_string()]);
    s.close().await;
    purge(hosts, prefix).await;
}

on_single_and_cluster!(
    gid_saved_again_over_leftovers,
    single_gid_saved_again_over_leftovers,
    cluster_gid_saved_again_over_leftovers
);

on_single_and_cluster!(retention, single_retention, cluster_retention);

/// A server configured with another shard count keeps using the count the data was
/// written with, so it finds every transaction.
async fn shard_count_is_fixed_by_the_data(hosts: String) {
    let prefix = unique_prefix("shards");
    let mut o = options(&hosts, &prefix);
    o.shards = 4;
    let a = RedisStore::open(o.clone()).unwrap_or_else(|e| panic!("{e}"));
    for i in 0..20 {
        a.write(WriteOp::SaveNew {
            global: global(&format!("g{i}"), "prepared", Some(Utc::now())),
            branches: vec![],
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }
    a.close().await;
    o.shards = 32;
    let b = RedisStore::open(o).unwrap_or_else(|e| panic!("{e}"));
    for i in 0..20 {
        assert!(
            b.find_global(&format!("g{i}"))
                .await
                .unwrap_or_else(|e| panic!("{e}"))
                .is_some(),
            "g{i} found with the stored shard count"
        );
    }
    let shard_tags: std::collections::HashSet<String> = keys_like(&hosts, &format!("{prefix}*t:*"))
        .await
        .into_iter()
        .filter_map(|(_, k)| {
            let tag = k.split('{').nth(1)?;
            tag.split('}').next().map(str::to_string)
        })
        .collect();
    assert!(
        shard_tags.len() <= 4 && shard_tags.len() > 1,
        "spread over the 4 shards: {shard_tags:?}"
    );
    b.close().await;
    purge(hosts, prefix).await;
}

on_single_and_cluster!(
    shard_count_is_fixed_by_the_data,
    single_shard_count_is_fixed_by_the_data,
    cluster_shard_count_is_fixed_by_the_data
);

/// Transactions of different shards live on different cluster nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_spreads_transactions_over_the_masters() {
    let Some(hosts) = cluster_addrs() else { return };
    let prefix = unique_prefix("spread");
    let s = RedisStore::open(options(&hosts, &prefix)).unwrap_or_else(|e| panic!("{e}"));
    for i in 0..64 {
        s.write(WriteOp::SaveNew {
            global: global(&format!("g{i}"), "prepared", Some(Utc::now())),
            branches: vec![],
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }
    let mut per_node = Vec::new();
    for mut c in node_conns(&hosts).await {
        let (_, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(0)
            .arg("MATCH")
            .arg(format!("{prefix}*t:*"))
            .arg("COUNT")
            .arg(100_000)
            .query_async(&mut c)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        per_node.push(keys.len());
    }
    assert_eq!(per_node.iter().sum::<usize>(), 64);
    assert!(
        per_node.iter().filter(|n| **n > 0).count() >= 2,
        "globals on several masters: {per_node:?}"
    );
    s.close().await;
    purge(hosts, prefix).await;
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("{e}"))
}

fn start_redis(port: u16, dir: &std::path::Path) -> std::process::Child {
    std::process::Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .arg("--dir")
        .arg(dir)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start redis-server: {e}"))
}

/// With Redis down, reads and writes fail fast with Unavailable and a message saying
/// what to check; when it is back, the same store works again without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_is_unavailable_and_recovers() {
    if !redis_selected() {
        return;
    }
    if std::process::Command::new("redis-server")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("note: redis-server not installed: outage test skipped");
        return;
    }
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let port = free_port();
    let mut server = start_redis(port, dir.path());
    let s = RedisStore::open(options(&format!("127.0.0.1:{port}"), "dtm:"))
        .unwrap_or_else(|e| panic!("{e}"));
    let mut up = false;
    for _ in 0..50 {
        if s.ping().await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(up, "private redis-server on port {port} did not come up");
    let save = |gid: &str| WriteOp::SaveNew {
        global: global(gid, "prepared", Some(Utc::now())),
        branches: vec![],
    };
    s.write(save("before"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let _ = server.kill();
    let _ = server.wait();
    let t = std::time::Instant::now();
    match s.write(save("during")).await {
        Err(StoreError::Unavailable(m)) => {
            assert!(
                m.contains("cannot reach Redis") && m.contains("STORE_HOST"),
                "{m}"
            );
        }
        other => panic!("a write with Redis down answered {other:?}"),
    }
    match s.find_global("before").await {
        Err(StoreError::Unavailable(_)) => {}
        other => panic!("a read with Redis down answered {other:?}"),
    }
    match s
        .write(WriteOp::ClaimDue {
            now: Utc::now(),
            limit: 10,
            lease_until: Utc::now(),
            owner: "n".into(),
        })
        .await
    {
        Err(StoreError::Unavailable(_)) => {}
        other => panic!("ClaimDue with Redis down answered {other:?}"),
    }
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "fails fast: {:?}",
        t.elapsed()
    );
    let mut server = start_redis(port, dir.path());
    let mut back = false;
    for _ in 0..100 {
        if s.write(save("after")).await.is_ok() {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(back, "the store works again once Redis is back");
    assert!(matches!(
        s.write(WriteOp::ClaimDue {
            now: Utc::now(),
            limit: 10,
            lease_until: Utc::now(),
            owner: "n".into(),
        })
        .await,
        Ok(WriteOutcome::Claimed(_))
    ));
    s.close().await;
    let _ = server.kill();
    let _ = server.wait();
}

/// Nothing listening: a clear error, no hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_redis_says_what_to_check() {
    if !redis_selected() {
        return;
    }
    let port = free_port();
    let s = RedisStore::open(options(&format!("127.0.0.1:{port}"), "dtm:"))
        .unwrap_or_else(|e| panic!("{e}"));
    match s.ping().await {
        Err(StoreError::Unavailable(m)) => {
            assert!(
                m.contains(&format!("127.0.0.1:{port}")) && m.contains("Store.Host"),
                "{m}"
            )
        }
        other => panic!("ping answered {other:?}"),
    }
    s.close().await;
}
