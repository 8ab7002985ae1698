//! The Redis store: one Redis node, or a Redis Cluster.
//!
//! # Key layout
//!
//! Transactions are spread over `S` shards (`Store.RedisShards`, default 16), shard =
//! FNV-1a(gid) mod S. Every key of shard `k` carries the hash tag `{s<k>}`, so all keys of
//! one transaction and the index entries that point at it live in one cluster slot, and
//! each Lua script touches one slot only. Different shards land on different slots, which a
//! Redis Cluster spreads over its masters. With prefix `P` (`Store.RedisPrefix`, default
//! `dtm:`):
//!
//! | key | type | content |
//! |---|---|---|
//! | `P{s<k>}t:<gid>` | hash | the global, one field per column (times in unix ms), and per branch `s:["<branch_id>","<op>"]` -> `status\|update_ms\|finish_ms` |
//! | `P{s<k>}b:<gid>` | list | immutable branch records (JSON), insertion order |
//! | `P{s<k>}due` | zset | unfinished gids, score = `next_cron_time` ms (recovery) |
//! | `P{s<k>}all` | zset | every gid, score = `create_time` ms (`GET /all`) |
//! | `P{s<k>}sweep` | string | where the next retention sweep of the shard starts (a score) |
//! | `P{s<k>}seq` | string | id counter of the shard (global id = counter * 1024 + k) |
//! | `P{kv:<cat>}h` | hash | key -> `id\|version\|create_ms\|update_ms\|value` |
//! | `P{kv:<cat>}ids` | zset | key, score = id (paging) |
//! | `P{kv:<cat>}seq` | string | last KV id of the category |
//! | `Pshards` | string | the shard count the data was written with |
//! | `Playout` | string | the layout version of the data (`2`) |
//!
//! The shard count is fixed when the first server writes `Pshards`; a server configured
//! with another count uses the stored one (and says so), because changing it would move
//! transactions to other keys. A prefix that itself contains a hash tag (dtm's `{a}`)
//! works but pins every key to one slot, as dtm does.
//!
//! The branch states live in the transaction hash (layout 2), so a saga's writes touch
//! two keys, not three. The records stay in a list of their own: they are longer than
//! Redis's `hash-max-listpack-value` (64 bytes), and one of them in the hash would turn
//! its compact listpack encoding into a hash table (more memory and slower writes).
//! Versions before layout 2 kept the states in a third key (`s:<gid>`) beside the global
//! hash `g:<gid>`. The first server of this version to start on such data converts it,
//! shard by shard, before it serves anything (`lua/migrate.lua`; a restart picks up where
//! it stopped), then writes `Playout`. Older servers do not know the new layout: stop
//! them all before starting this version.
//!
//! # Writes
//!
//! Every change is one Lua script, atomic on its own (status / owner guards, branch
//! changes and index upkeep together). Writes of many requests are gathered by writer
//! tasks into batches: a batch is sent as one pipeline of EVALSHA calls (on a cluster,
//! one per slot, run concurrently), then each waiter gets its own result (group
//! commit). There are [`LANES`] writer tasks, each on a connection of its own with one
//! batch in flight; a shard's writes always go to the same one, so one transaction's
//! writes keep their order. Several connections matter to Redis itself: it reads a
//! bounded amount (16 KiB) from each client per event-loop pass, and with `appendfsync
//! always` it syncs the AOF once per pass, so one connection gets about one fsync per 16
//! KiB of writes, and four share each fsync. `ClaimDue` and `ResetCronTime` span shards
//! and run directly, shard by shard.
//!
//! # Retention
//!
//! Unfinished transactions never expire. When a transaction finishes, it leaves the due
//! index and its two keys expire `Store.FinishedDataExpire` seconds after its finishing
//! update (`update_time`; 0 keeps them forever), by Redis's own key expiry. Their `all`
//! entries are dropped by the retention sweep ([`Store::purge_finished`], which the
//! server's retention task calls now and then): shard by shard, from where the last sweep
//! stopped, it examines entries created before the retention bound and drops those whose
//! hash is gone, with any branch list left. Until then `GET /all` skips them. The
//! writes of a transaction do no index upkeep of their own, so a saga costs two scripts of
//! a few commands each. (Earlier versions kept an `exp` zset for this; the sweep deletes
//! it.)

mod admin;
mod codec;
mod conn;

pub use admin::{drop_prefix, list_prefixes};

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use dtm_core::store::{Kv, ScanQuery, Store, StoreError, WriteOp, WriteOutcome};
use dtm_proto::{Branch, TransGlobal};
use redis::Value;
use tokio::sync::{OnceCell, mpsc, oneshot};
use tokio::task::JoinHandle;

use codec::{ms, update_fields};
use conn::{Call, Conn};

/// Most writes in one batch.
const MAX_BATCH: usize = 512;
/// Writer lanes, each with its own connection (per node, on a cluster) and one batch in
/// flight. A shard's writes always take the same lane, so one transaction's writes keep
/// their order. Redis reads a bounded amount from each client per event-loop pass and,
/// with `appendfsync always`, syncs once per pass: batches arriving on several
/// connections share one sync.
const LANES: usize = 4;
/// Entries one shard examines at most for one page of `GET /all`.
const SCAN_BUDGET: usize = 1000;
/// The key layout this version reads and writes (see the module doc).
const LAYOUT: &str = "2";
/// Index entries one migration script examines.
const MIGRATE_CHUNK: usize = 200;

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// `host:port` of the node, or of some cluster nodes.
    pub nodes: Vec<(String, u16)>,
    pub cluster: bool,
    pub user: String,
    pub password: String,
    pub prefix: String,
    /// Shard count for a fresh prefix (see the module doc).
    pub shards: u32,
    /// TTL of finished transactions, seconds; 0 keeps them.
    pub finished_ttl_secs: i64,
}

impl RedisOptions {
    /// From dtm's `Store.Host` (a comma-separated list means a cluster) and `Store.Port`
    /// (used for entries without their own port).
    pub fn from_host_port(host: &str, port: i64) -> Result<RedisOptions, String> {
        let (nodes, cluster) = parse_nodes(host, port)?;
        Ok(RedisOptions {
            nodes,
            cluster,
            user: String::new(),
            password: String::new(),
            prefix: "dtm:".into(),
            shards: 16,
            finished_ttl_secs: 86400,
        })
    }
}

/// Parse `Store.Host` / `Store.Port` into nodes, and whether it names a cluster (a comma
/// in the host list, as in dtm). Errors say what is wrong.
pub fn parse_nodes(host: &str, port: i64) -> Result<(Vec<(String, u16)>, bool), String> {
    let cluster = host.contains(',');
    let mut nodes = Vec::new();
    for entry in host.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (h, p) = match entry.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') || (h.starts_with('[') && h.ends_with(']')) => {
                let p = p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| {
                    format!("Store.Host entry '{entry}' has a bad port: use host:port with a port 1-65535")
                })?;
                (h.trim_start_matches('[').trim_end_matches(']'), p)
            }
            _ => {
                let p = u16::try_from(port).ok().filter(|p| *p > 0).ok_or_else(|| {
                    format!(
                        "Store.Port (STORE_PORT) must be a port 1-65535 for Redis host '{entry}', got {port}: set STORE_PORT=6379 or write host:port in Store.Host"
                    )
                })?;
                (entry, p)
            }
        };
        if h.is_empty() {
            return Err(format!("Store.Host entry '{entry}' has no host name"));
        }
        nodes.push((h.to_string(), p));
    }
    if nodes.is_empty() {
        return Err(
            "Store.Host (STORE_HOST) is required for the redis driver: give host (with Store.Port) or host:port, or a comma-separated list of cluster nodes".into(),
        );
    }
    Ok((nodes, cluster))
}

/// FNV-1a, 64 bit: a hash that never changes between builds (the shard of a gid is part
/// of the stored layout).
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Key names, once the shard count is known.
struct Layout {
    prefix: String,
    shards: u32,
}

impl Layout {
    fn shard(&self, gid: &str) -> u32 {
        (fnv1a(gid) % u64::from(self.shards.max(1))) as u32
    }

    fn tag(&self, shard: u32) -> String {
        format!("{}{{s{shard}}}", self.prefix)
    }

    fn txn_prefix(&self, shard: u32) -> String {
        format!("{}t:", self.tag(shard))
    }

    fn txn(&self, gid: &str) -> String {
        format!("{}{gid}", self.txn_prefix(self.shard(gid)))
    }

    /// Transaction hash, branch list, due, all; and the tag.
    fn txn_keys(&self, gid: &str) -> (Vec<String>, String) {
        let tag = self.tag(self.shard(gid));
        let keys = vec![
            format!("{tag}t:{gid}"),
            format!("{tag}b:{gid}"),
            format!("{tag}due"),
            format!("{tag}all"),
        ];
        (keys, tag)
    }

    fn kv_tag(&self, cat: &str) -> String {
        format!("{}{{kv:{cat}}}", self.prefix)
    }
}

struct Job {
    call: Call,
    reply: oneshot::Sender<Result<Value, StoreError>>,
}

struct Inner {
    conn: Conn,
    target: String,
    opts: RedisOptions,
    layout: OnceCell<Layout>,
    /// Where the next ClaimDue starts its second pass, so that shards take turns.
    claim_turn: AtomicUsize,
}

pub struct RedisStore {
    inner: Arc<Inner>,
    writer: Mutex<Option<Vec<mpsc::UnboundedSender<Job>>>>,
    writer_tasks: Mutex<Vec<JoinHandle<()>>>,
}

fn status_of(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

/// The answer of a guarded write script.
fn outcome(v: Value) -> Result<WriteOutcome, StoreError> {
    match status_of(&v) {
        Some(b"OK") => Ok(WriteOutcome::Done),
        Some(b"NOT_FOUND") => Err(StoreError::NotFound),
        Some(b"UNIQUE_CONFLICT") => Err(StoreError::UniqueConflict),
        _ => Err(StoreError::Unavailable(format!(
            "unexpected answer from a dtm-rs Redis script: {v:?}"
        ))),
    }
}

fn decode<T: redis::FromRedisValue>(v: Value, what: &str) -> Result<T, StoreError> {
    redis::from_redis_value(v)
        .map_err(|e| StoreError::Unavailable(format!("unexpected Redis answer to {what}: {e}")))
}

/// Score bound for Redis.
fn bound(t: Option<&DateTime<Utc>>, inf: &str) -> String {
    t.map(ms).unwrap_or_else(|| inf.to_string())
}

/// Position in `GET /all` order: newest create time first, then gid descending (bytes).
type Pos = (i64, String);

impl RedisStore {
    /// Set up the store. Nothing is contacted yet: the first command connects, and a lost
    /// connection comes back by itself. Must be called inside a tokio runtime.
    pub fn open(opts: RedisOptions) -> Result<RedisStore, StoreError> {
        let target = opts
            .nodes
            .iter()
            .map(|(h, p)| format!("{h}:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let open_conn = || {
            conn::connect(&opts.nodes, opts.cluster, &opts.user, &opts.password).map_err(|e| {
                StoreError::Unavailable(format!(
                    "bad Redis connection settings for {target}: {e}; check Store.Host/Store.Port/Store.User"
                ))
            })
        };
        let conn = open_conn()?;
        let lanes = (0..LANES)
            .map(|_| open_conn())
            .collect::<Result<Vec<_>, _>>()?;
        let rt = tokio::runtime::Handle::try_current().map_err(|_| {
            StoreError::Unavailable("the Redis store must be opened inside a tokio runtime".into())
        })?;
        let inner = Arc::new(Inner {
            conn,
            target,
            opts,
            layout: OnceCell::new(),
            claim_turn: AtomicUsize::new(0),
        });
        let mut senders = Vec::with_capacity(LANES);
        let mut tasks = Vec::with_capacity(LANES);
        for lane in lanes {
            let (tx, rx) = mpsc::unbounded_channel();
            senders.push(tx);
            tasks.push(rt.spawn(writer_loop(Arc::clone(&inner), lane, rx)));
        }
        Ok(RedisStore {
            inner,
            writer: Mutex::new(Some(senders)),
            writer_tasks: Mutex::new(tasks),
        })
    }

    /// The key layout; the first call reads (or fixes) the shard count in Redis.
    async fn layout(&self) -> Result<&Layout, StoreError> {
        let inner = &self.inner;
        inner
            .layout
            .get_or_try_init(|| async {
                let key = format!("{}shards", inner.opts.prefix);
                let mut c = inner.conn.clone();
                let err = |e| conn::store_err(&inner.target, e);
                let fresh = redis::cmd("SET")
                    .arg(&key)
                    .arg(inner.opts.shards)
                    .arg("NX")
                    .query_async::<Value>(&mut c)
                    .await
                    .map_err(err)?
                    == Value::Okay;
                let stored: Option<String> =
                    redis::cmd("GET").arg(&key).query_async(&mut c).await.map_err(err)?;
                let shards = match stored {
                    None => {
                        return Err(StoreError::Unavailable(format!(
                            "Redis lost key {key} right after writing it; check the Redis eviction policy (maxmemory-policy must not evict dtm-rs keys)"
                        )));
                    }
                    Some(s) => s.parse::<u32>().ok().filter(|n| *n > 0).ok_or_else(|| {
                        StoreError::Unavailable(format!(
                            "Redis key {key} holds '{s}', not a shard count; it belongs to something else: set Store.RedisPrefix to a prefix of dtm-rs's own"
                        ))
                    })?,
                };
                warn_if_evicting(&mut c, &inner.target).await;
                if shards != inner.opts.shards {
                    tracing::warn!(
                        "Store.RedisShards is {} but the data under prefix '{}' was written with {shards} shards; using {shards}",
                        inner.opts.shards,
                        inner.opts.prefix
                    );
                }
                let l = Layout {
                    prefix: inner.opts.prefix.clone(),
                    shards,
                };
                let layout_key = format!("{}layout", inner.opts.prefix);
                if !fresh {
                    let stored: Option<String> = redis::cmd("GET")
                        .arg(&layout_key)
                        .query_async(&mut c)
                        .await
                        .map_err(err)?;
                    match stored.as_deref() {
                        Some(LAYOUT) => return Ok(l),
                        None => migrate(inner, &l).await?,
                        Some(other) => {
                            return Err(StoreError::Unavailable(format!(
                                "the data under Redis prefix '{}' has key layout {other}, written by a newer dtm-rs; this version reads layout {LAYOUT}: run the newer version, or give this one its own Store.RedisPrefix",
                                inner.opts.prefix
                            )));
                        }
                    }
                }
                redis::cmd("SET")
                    .arg(&layout_key)
                    .arg(LAYOUT)
                    .query_async::<Value>(&mut c)
                    .await
                    .map_err(err)?;
                Ok(l)
            })
            .await
    }

    async fn run(&self, call: &Call) -> Result<Value, StoreError> {
        conn::run(&self.inner.conn, &self.inner.target, call).await
    }

    /// Queue a single-slot script for the writer and wait for its answer.
    async fn submit(&self, call: Call) -> Result<Value, StoreError> {
        let (reply, rx) = oneshot::channel();
        // the lane of the call's hash tag: one shard (or kv category), one lane
        let lane = (fnv1a(&call.tag) % LANES as u64) as usize;
        let sender = self
            .writer
            .lock()
            .ok()
            .and_then(|w| w.as_ref().and_then(|s| s.get(lane).cloned()));
        let Some(sender) = sender else {
            return Err(StoreError::Unavailable("the store is shutting down".into()));
        };
        sender
            .send(Job { call, reply })
            .map_err(|_| StoreError::Unavailable("the Redis store writer has stopped".into()))?;
        rx.await
            .map_err(|_| StoreError::Unavailable("the Redis store writer has stopped".into()))?
    }

    /// When the keys of a transaction finished at `finished` expire (unix ms), or "" to
    /// keep them (`finished_ttl_secs` 0).
    fn expire_at(&self, finished: &DateTime<Utc>) -> String {
        let ttl = self.inner.opts.finished_ttl_secs;
        if ttl <= 0 {
            return String::new();
        }
        (finished.timestamp_millis() + ttl.saturating_mul(1000)).to_string()
    }

    /// Build the script call of a single-slot write.
    fn call(&self, l: &Layout, op: WriteOp) -> Result<Call, StoreError> {
        let pairs = |fields: Vec<(&'static str, String)>, args: &mut Vec<String>| {
            for (k, v) in fields {
                args.push(k.to_string());
                args.push(v);
            }
        };
        let branches = |bs: &[Branch], args: &mut Vec<String>| -> Result<(), StoreError> {
            args.push(bs.len().to_string());
            for b in bs {
                args.extend(codec::encode_branch(b)?);
            }
            Ok(())
        };
        Ok(match op {
            WriteOp::SaveNew {
                global,
                branches: bs,
            } => {
                let (mut keys, tag) = l.txn_keys(&global.gid);
                keys.push(format!("{tag}seq"));
                let now = global.update_time.unwrap_or_else(Utc::now);
                let mut args = vec![
                    global.gid.clone(),
                    l.shard(&global.gid).to_string(),
                    ms(&global.create_time.unwrap_or(now)),
                    global.status.clone(),
                    global.next_cron_time.as_ref().map(ms).unwrap_or_default(),
                    self.expire_at(&now),
                ];
                // the records, then the hash's fields: one run of arguments each, which the
                // script hands to RPUSH and HSET as they are
                let encoded = bs
                    .iter()
                    .map(codec::encode_branch)
                    .collect::<Result<Vec<_>, _>>()?;
                // as SQL's unique key on (gid, branch_id, op) would
                let mut seen = std::collections::HashSet::with_capacity(encoded.len());
                if !encoded.iter().all(|[key, _, _]| seen.insert(key.as_str())) {
                    return Err(StoreError::UniqueConflict);
                }
                args.push(encoded.len().to_string());
                let mut states = Vec::with_capacity(encoded.len());
                for [key, record, state] in encoded {
                    args.push(record);
                    states.push((key, state));
                }
                pairs(codec::global_fields(&global), &mut args);
                for (key, state) in states {
                    args.push(format!("s:{key}"));
                    args.push(state);
                }
                Call {
                    lua: &conn::SAVE_NEW,
                    tag,
                    keys,
                    args,
                }
            }
            WriteOp::AddBranches {
                gid,
                expect_status,
                branches: bs,
            } => {
                let (mut keys, tag) = l.txn_keys(&gid);
                keys.truncate(2);
                let mut args = vec![expect_status];
                branches(&bs, &mut args)?;
                Call {
                    lua: &conn::ADD_BRANCHES,
                    tag,
                    keys,
                    args,
                }
            }
            WriteOp::UpdateGlobal {
                gid,
                expect_status,
                expect_owner,
                set,
                branches: ups,
            } => {
                let (keys, tag) = l.txn_keys(&gid);
                let mut args = vec![
                    gid,
                    expect_status,
                    if expect_owner.is_some() { "1" } else { "0" }.to_string(),
                    expect_owner.unwrap_or_default(),
                    set.status.clone().unwrap_or_default(),
                    set.next_cron_time.as_ref().map(ms).unwrap_or_default(),
                    self.expire_at(&set.update_time),
                    ups.len().to_string(),
                ];
                // the hash's fields as one run: the branch states, then the columns
                for u in ups {
                    args.push(format!("s:{}", codec::branch_key(&u.branch_id, &u.op)));
                    args.push(codec::branch_state(&u.status, Some(&u.time), Some(&u.time)));
                }
                pairs(update_fields(&set), &mut args);
                Call {
                    lua: &conn::UPDATE_GLOBAL,
                    tag,
                    keys,
                    args,
                }
            }
            WriteOp::ResetNextCronTime { gid, now } => {
                let (keys, tag) = l.txn_keys(&gid);
                Call {
                    lua: &conn::RESET_NEXT,
                    tag,
                    keys: vec![keys[0].clone(), keys[2].clone()],
                    args: vec![gid, ms(&now)],
                }
            }
            WriteOp::CreateKv { cat, k, v, now } => {
                kv_call(l, &cat, vec!["create".into(), k, v, ms(&now)])
            }
            WriteOp::UpdateKv {
                cat,
                k,
                v,
                version,
                now,
            } => kv_call(
                l,
                &cat,
                vec!["update".into(), k, v, version.to_string(), ms(&now)],
            ),
            WriteOp::DeleteKv { cat, k } => kv_call(l, &cat, vec!["delete".into(), k]),
            WriteOp::ClaimDue { .. } | WriteOp::ResetCronTime { .. } => {
                return Err(StoreError::Unavailable(
                    "internal: a multi-shard write reached the single-slot path".into(),
                ));
            }
        })
    }

    async fn claim_due(
        &self,
        l: &Layout,
        now: DateTime<Utc>,
        limit: usize,
        lease_until: DateTime<Utc>,
        owner: &str,
    ) -> Result<WriteOutcome, StoreError> {
        let n = l.shards as usize;
        let call = |shard: u32, limit: usize| {
            let mut args = vec![
                l.txn_prefix(shard),
                ms(&now),
                limit.to_string(),
                ms(&lease_until),
                owner.to_string(),
            ];
            args.extend(codec::GLOBAL_FIELDS.iter().map(|f| f.to_string()));
            Call {
                lua: &conn::CLAIM_DUE,
                tag: l.tag(shard),
                keys: vec![format!("{}due", l.tag(shard))],
                args,
            }
        };
        let claim = |shard: u32, limit: usize| async move {
            let v = self.run(&call(shard, limit)).await?;
            let rows: Vec<std::collections::HashMap<String, String>> = decode(v, "ClaimDue")?;
            Ok::<_, StoreError>(
                rows.into_iter()
                    .filter_map(codec::decode_global)
                    .collect::<Vec<_>>(),
            )
        };
        // First pass: the shards at once, the limit split exactly among them (never more
        // in total: a claimed but unreturned transaction would wait for its lease). The
        // shards that get the larger shares take turns across calls.
        let turn = self.inner.claim_turn.fetch_add(1, Ordering::Relaxed);
        let quotas: Vec<(u32, usize)> = (0..n)
            .map(|i| {
                let shard = (turn + i) % n;
                (shard as u32, limit / n + usize::from(i < limit % n))
            })
            .filter(|(_, q)| *q > 0)
            .collect();
        let firsts = futures::future::join_all(quotas.iter().map(|&(s, q)| claim(s, q))).await;
        let mut claimed = Vec::new();
        let mut full = Vec::new();
        let mut first_err = None;
        for (&(s, q), r) in quotas.iter().zip(firsts) {
            match r {
                Ok(rows) => {
                    if rows.len() >= q {
                        full.push(s);
                    }
                    claimed.extend(rows);
                }
                Err(e) => first_err = first_err.or(Some(e)),
            }
        }
        if claimed.is_empty()
            && let Some(e) = first_err
        {
            return Err(e);
        }
        // Second pass: shards that had more than their share fill up the rest, one after
        // the other; with a limit below the shard count, the shards not asked yet come too.
        let asked: Vec<u32> = quotas.iter().map(|(s, _)| *s).collect();
        let rest = full
            .into_iter()
            .chain((0..n as u32).filter(|s| !asked.contains(s)));
        for shard in rest {
            let left = limit.saturating_sub(claimed.len());
            if left == 0 {
                break;
            }
            if let Ok(rows) = claim(shard, left).await {
                claimed.extend(rows);
            }
        }
        Ok(WriteOutcome::Claimed(claimed))
    }

    async fn reset_cron_time(
        &self,
        l: &Layout,
        after: DateTime<Utc>,
        now: DateTime<Utc>,
        limit: usize,
    ) -> Result<WriteOutcome, StoreError> {
        let mut count = 0i64;
        let mut has_remaining = false;
        for shard in 0..l.shards {
            let left = limit.saturating_sub(count as usize);
            if left == 0 && has_remaining {
                break;
            }
            let v = self
                .run(&Call {
                    lua: &conn::RESET_CRON,
                    tag: l.tag(shard),
                    keys: vec![format!("{}due", l.tag(shard))],
                    args: vec![l.txn_prefix(shard), ms(&after), ms(&now), left.to_string()],
                })
                .await?;
            let (n, more): (i64, i64) = decode(v, "ResetCronTime")?;
            count += n;
            has_remaining |= more != 0;
        }
        Ok(WriteOutcome::Reset {
            count,
            has_remaining,
        })
    }

    /// One shard's candidates for a page of `GET /all`: matches (newest first) and, when
    /// the shard was not read to its end, the last position it examined.
    async fn scan_shard(
        &self,
        l: &Layout,
        shard: u32,
        from: &Option<Pos>,
        q: &ScanQuery,
    ) -> Result<(Vec<Pos>, Option<Pos>), StoreError> {
        let (mut max, mut after) = (bound(q.create_time_end.as_ref(), "+inf"), String::new());
        if let Some((score, gid)) = from {
            let end = q.create_time_end.map(|t| t.timestamp_millis());
            if end.is_none_or(|e| *score <= e) {
                max = score.to_string();
                after = gid.clone();
            }
        }
        let v = self
            .run(&Call {
                lua: &conn::SCAN,
                tag: l.tag(shard),
                keys: vec![format!("{}all", l.tag(shard))],
                args: vec![
                    l.txn_prefix(shard),
                    max,
                    after,
                    bound(q.create_time_start.as_ref(), "-inf"),
                    q.status.clone(),
                    q.trans_type.clone(),
                    q.limit.to_string(),
                    SCAN_BUDGET.to_string(),
                ],
            })
            .await?;
        let (done, last_score, last_gid, flat): (i64, String, String, Vec<String>) =
            decode(v, "scan")?;
        let matches = flat
            .chunks_exact(2)
            .map(|p| (p[0].parse::<i64>().unwrap_or(0), p[1].clone()))
            .collect();
        let frontier = (done == 0).then(|| (last_score.parse::<i64>().unwrap_or(0), last_gid));
        Ok((matches, frontier))
    }
}

/// Convert the data of versions before layout 2 (see the module doc), shard by shard.
async fn migrate(inner: &Inner, l: &Layout) -> Result<(), StoreError> {
    tracing::info!(
        "Redis prefix '{}' has no key layout recorded: converting transactions of the earlier layout to layout {LAYOUT} before serving",
        l.prefix
    );
    let mut converted = 0usize;
    for shard in 0..l.shards {
        let tag = l.tag(shard);
        let mut first = 0usize;
        loop {
            let v = conn::run(
                &inner.conn,
                &inner.target,
                &Call {
                    lua: &conn::MIGRATE,
                    keys: vec![format!("{tag}all")],
                    args: vec![tag.clone(), first.to_string(), MIGRATE_CHUNK.to_string()],
                    tag: tag.clone(),
                },
            )
            .await?;
            let (examined, moved): (usize, usize) = decode(v, "the layout migration")?;
            first += examined;
            converted += moved;
            if examined < MIGRATE_CHUNK {
                break;
            }
        }
    }
    tracing::info!(
        "Redis prefix '{}': {converted} transaction(s) converted to key layout {LAYOUT}",
        l.prefix
    );
    Ok(())
}

/// An allkeys-* eviction policy may drop unfinished transactions under memory pressure:
/// say so. CONFIG may be refused (managed Redis); then nothing is said.
async fn warn_if_evicting(c: &mut Conn, target: &str) {
    let policy: redis::RedisResult<Vec<String>> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory-policy")
        .query_async(c)
        .await;
    if let Some(p) = policy.ok().and_then(|v| v.get(1).cloned())
        && p.starts_with("allkeys")
    {
        tracing::warn!(
            "Redis at {target} has maxmemory-policy {p}: under memory pressure it may evict unfinished transactions; use noeviction (or a volatile-* policy, which only evicts finished ones)"
        );
    }
}

fn kv_call(l: &Layout, cat: &str, args: Vec<String>) -> Call {
    let tag = l.kv_tag(cat);
    Call {
        lua: &conn::KV,
        keys: vec![format!("{tag}h"), format!("{tag}ids"), format!("{tag}seq")],
        tag,
        args,
    }
}

/// Parse a `GET /all` position: `<create ms>:<gid>`. Anything else starts at the newest.
fn parse_pos(p: &str) -> Option<Pos> {
    let (score, gid) = p.split_once(':')?;
    Some((score.parse().ok()?, gid.to_string()))
}

/// One writer lane: batches of the jobs queued for it, on its own connection `conn`.
async fn writer_loop(inner: Arc<Inner>, conn: Conn, mut rx: mpsc::UnboundedReceiver<Job>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        let calls: Vec<&Call> = batch.iter().map(|j| &j.call).collect();
        let results = conn::run_batch(&conn, &inner.target, &calls).await;
        for (job, r) in batch.into_iter().zip(results) {
            let _ = job.reply.send(r);
        }
    }
}

#[async_trait]
impl Store for RedisStore {
    fn describe(&self) -> String {
        let o = &self.inner.opts;
        let kind = if o.cluster { "redis-cluster" } else { "redis" };
        format!("{kind}://{} prefix '{}'", self.inner.target, o.prefix)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.layout().await?;
        let mut c = self.inner.conn.clone();
        redis::cmd("PING")
            .query_async::<Value>(&mut c)
            .await
            .map_err(|e| conn::store_err(&self.inner.target, e))?;
        Ok(())
    }

    async fn find_global(&self, gid: &str) -> Result<Option<TransGlobal>, StoreError> {
        let key = self.layout().await?.txn(gid);
        let mut c = self.inner.conn.clone();
        let values = redis::cmd("HMGET")
            .arg(key)
            .arg(&codec::GLOBAL_FIELDS[..])
            .query_async(&mut c)
            .await
            .map_err(|e| conn::store_err(&self.inner.target, e))?;
        Ok(codec::decode_global_values(values))
    }

    async fn find_branches(&self, gid: &str) -> Result<Vec<Branch>, StoreError> {
        let (keys, _) = self.layout().await?.txn_keys(gid);
        let mut c = self.inner.conn.clone();
        let (records, hash) = redis::pipe()
            .atomic()
            .cmd("LRANGE")
            .arg(&keys[1])
            .arg(0)
            .arg(-1)
            .cmd("HGETALL")
            .arg(&keys[0])
            .query_async(&mut c)
            .await
            .map_err(|e| conn::store_err(&self.inner.target, e))?;
        codec::decode_txn_branches(gid, records, hash)
    }

    /// Newest first across all shards: each shard offers its newest matches after the
    /// position (examining a bounded number of entries), and the page takes the newest
    /// `limit` of those that no shard can still precede. A page may be short (a shard hit
    /// its budget); the position then moves past what was examined. "" at the end.
    async fn scan_globals(&self, q: &ScanQuery) -> Result<(Vec<TransGlobal>, String), StoreError> {
        if q.limit == 0 {
            return Ok((vec![], String::new()));
        }
        let l = self.layout().await?;
        let from = parse_pos(&q.position);
        let parts =
            futures::future::join_all((0..l.shards).map(|s| self.scan_shard(l, s, &from, q))).await;
        let mut matches: Vec<Pos> = Vec::new();
        // The newest position some shard stopped at: anything older may be preceded by
        // entries that shard has not examined yet.
        let mut boundary: Option<Pos> = None;
        for part in parts {
            let (m, frontier) = part?;
            matches.extend(m);
            if let Some(f) = frontier
                && boundary.as_ref().is_none_or(|b| f > *b)
            {
                boundary = Some(f);
            }
        }
        matches.sort_by(|a, b| b.cmp(a));
        matches.retain(|m| boundary.as_ref().is_none_or(|b| m >= b));
        matches.truncate(q.limit);
        let next = if matches.len() == q.limit {
            matches.last().cloned()
        } else {
            boundary
        };
        let rows = futures::future::join_all(matches.iter().map(|(_, gid)| self.find_global(gid)))
            .await
            .into_iter()
            .filter_map(Result::transpose)
            .collect::<Result<Vec<_>, _>>()?;
        Ok((
            rows,
            next.map(|(s, g)| format!("{s}:{g}")).unwrap_or_default(),
        ))
    }

    async fn scan_kv(
        &self,
        cat: &str,
        position: &str,
        limit: usize,
    ) -> Result<(Vec<Kv>, String), StoreError> {
        if limit == 0 {
            return Ok((vec![], String::new()));
        }
        let tag = self.layout().await?.kv_tag(cat);
        let max = position
            .parse::<i64>()
            .map(|p| format!("({p}"))
            .unwrap_or_else(|_| "+inf".into());
        let mut c = self.inner.conn.clone();
        let err = |e| conn::store_err(&self.inner.target, e);
        let ks: Vec<String> = redis::cmd("ZREVRANGEBYSCORE")
            .arg(format!("{tag}ids"))
            .arg(max)
            .arg("-inf")
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut c)
            .await
            .map_err(err)?;
        if ks.is_empty() {
            return Ok((vec![], String::new()));
        }
        let vals: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(format!("{tag}h"))
            .arg(&ks)
            .query_async(&mut c)
            .await
            .map_err(err)?;
        let rows: Vec<Kv> = ks
            .iter()
            .zip(vals)
            .filter_map(|(k, v)| v.map(|v| codec::decode_kv(cat, k, &v)))
            .collect();
        let next = if ks.len() == limit {
            rows.last().map(|r| r.id.to_string()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok((rows, next))
    }

    /// Drop index entries of expired transactions (see the module doc, "Retention"): up
    /// to `limit` entries examined per shard; returns how many were dropped.
    async fn purge_finished(
        &self,
        before: DateTime<Utc>,
        limit: usize,
    ) -> Result<usize, StoreError> {
        let l = self.layout().await?;
        let mut dropped = 0usize;
        for shard in 0..l.shards {
            let tag = l.tag(shard);
            let v = self
                .run(&Call {
                    lua: &conn::SWEEP,
                    keys: vec![format!("{tag}all"), format!("{tag}sweep")],
                    args: vec![tag.clone(), ms(&before), limit.max(1).to_string()],
                    tag,
                })
                .await?;
            let n: i64 = decode(v, "the retention sweep")?;
            dropped += usize::try_from(n).unwrap_or(0);
        }
        Ok(dropped)
    }

    async fn find_kv(&self, cat: &str, k: Option<&str>) -> Result<Vec<Kv>, StoreError> {
        let tag = self.layout().await?.kv_tag(cat);
        let mut c = self.inner.conn.clone();
        let err = |e| conn::store_err(&self.inner.target, e);
        match k {
            Some(k) => {
                let v: Option<String> = redis::cmd("HGET")
                    .arg(format!("{tag}h"))
                    .arg(k)
                    .query_async(&mut c)
                    .await
                    .map_err(err)?;
                Ok(v.map(|v| codec::decode_kv(cat, k, &v))
                    .into_iter()
                    .collect())
            }
            None => {
                let all: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
                    .arg(format!("{tag}h"))
                    .query_async(&mut c)
                    .await
                    .map_err(err)?;
                let mut rows: Vec<Kv> = all
                    .iter()
                    .map(|(k, v)| codec::decode_kv(cat, k, v))
                    .collect();
                rows.sort_by_key(|r| r.id);
                Ok(rows)
            }
        }
    }

    async fn write(&self, op: WriteOp) -> Result<WriteOutcome, StoreError> {
        if self.writer.lock().map(|w| w.is_none()).unwrap_or(true) {
            return Err(StoreError::Unavailable("the store is shutting down".into()));
        }
        let l = self.layout().await?;
        match op {
            WriteOp::ClaimDue {
                now,
                limit,
                lease_until,
                owner,
            } => self.claim_due(l, now, limit, lease_until, &owner).await,
            WriteOp::ResetCronTime { after, now, limit } => {
                self.reset_cron_time(l, after, now, limit).await
            }
            op => {
                let call = self.call(l, op)?;
                outcome(self.submit(call).await?)
            }
        }
    }

    async fn close(&self) {
        if let Ok(mut w) = self.writer.lock() {
            w.take();
        }
        crate::join_writer_tasks(&self.writer_tasks).await;
    }
}
