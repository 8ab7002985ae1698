//! The connection (single node or cluster), the Lua scripts, and running them: one at a
//! time, or many in one pipeline per hash slot.

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::Duration;

use dtm_core::store::StoreError;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{
    Cmd, ConnectionAddr, ErrorKind, IntoConnectionInfo, Pipeline, RedisError, RedisFuture,
    RedisResult, ServerErrorKind, Value,
};

/// How long to wait for a TCP connection, and for an answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

/// A Lua script and its SHA1 (for EVALSHA).
pub(crate) struct Lua {
    code: String,
    sha: String,
}

impl Lua {
    fn new(parts: &[&str]) -> Lua {
        let code = parts.concat();
        let sha = redis::Script::new(&code).get_hash().to_string();
        Lua { code, sha }
    }
}

const COMMON: &str = include_str!("lua/common.lua");
const TXN: &str = include_str!("lua/txn.lua");

pub(crate) static SAVE_NEW: LazyLock<Lua> =
    LazyLock::new(|| Lua::new(&[COMMON, TXN, include_str!("lua/save_new.lua")]));
pub(crate) static ADD_BRANCHES: LazyLock<Lua> =
    LazyLock::new(|| Lua::new(&[COMMON, TXN, include_str!("lua/add_branches.lua")]));
pub(crate) static UPDATE_GLOBAL: LazyLock<Lua> =
    LazyLock::new(|| Lua::new(&[COMMON, TXN, include_str!("lua/update_global.lua")]));
pub(crate) static RESET_NEXT: LazyLock<Lua> =
    LazyLock::new(|| Lua::new(&[COMMON, include_str!("lua/reset_next.lua")]));
pub(crate) static CLAIM_DUE: LazyLock<Lua> =
    LazyLock::new(|| Lua::new(&[COMMON, include_str!("lua/claim_due.lua")]));
pub(crate) static RESET_CRON: LazyLock<Lua> =
    LazyLock::new(|| Lua::new(&[COMMON, include_str!("lua/reset_cron.lua")]));
pub(crate) static SWEEP: LazyLock<Lua> =
    LazyLock::new(|| Lua::new(&[COMMON, include_str!("lua/sweep.lua")]));
pub(crate) static SCAN: LazyLock<Lua> =
    LazyLock::new(|| Lua::new(&[COMMON, include_str!("lua/scan.lua")]));
pub(crate) static MIGRATE: LazyLock<Lua> =
    LazyLock::new(|| Lua::new(&[COMMON, include_str!("lua/migrate.lua")]));
pub(crate) static KV: LazyLock<Lua> =
    LazyLock::new(|| Lua::new(&[COMMON, include_str!("lua/kv.lua")]));

/// One script call. All keys share the hash tag `tag`, so the call goes to one slot.
pub(crate) struct Call {
    pub lua: &'static Lua,
    pub tag: String,
    pub keys: Vec<String>,
    pub args: Vec<String>,
}

impl Call {
    fn cmd(&self, verb: &str, body: &str) -> Cmd {
        let mut c = redis::cmd(verb);
        c.arg(body)
            .arg(self.keys.len())
            .arg(&self.keys)
            .arg(&self.args);
        c
    }
}

/// A connection to one Redis node (reconnects by itself) or to a Redis Cluster (routes
/// each command to the node owning its slot).
#[derive(Clone)]
pub(crate) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Open a connection without contacting Redis yet: the first command connects, and a
/// lost connection is re-established on a later command.
pub(crate) fn connect(
    nodes: &[(String, u16)],
    cluster: bool,
    user: &str,
    password: &str,
) -> RedisResult<Conn> {
    if cluster {
        let infos = nodes
            .iter()
            .map(|(h, p)| ConnectionAddr::Tcp(h.clone(), *p).into_connection_info())
            .collect::<RedisResult<Vec<_>>>()?;
        let mut b = ClusterClientBuilder::new(infos)
            .connection_timeout(CONNECT_TIMEOUT)
            .response_timeout(RESPONSE_TIMEOUT)
            .retries(2);
        if !user.is_empty() {
            b = b.username(user);
        }
        if !password.is_empty() {
            b = b.password(password);
        }
        let client = b.build()?;
        let cfg = redis::cluster::ClusterConfig::new()
            .set_connection_timeout(CONNECT_TIMEOUT)
            .set_response_timeout(RESPONSE_TIMEOUT);
        Ok(Conn::Cluster(
            client.get_pending_async_connection_with_config(cfg),
        ))
    } else {
        let (h, p) = nodes.first().cloned().ok_or_else(|| {
            RedisError::from((ErrorKind::InvalidClientConfig, "no Redis host given"))
        })?;
        let mut settings = redis::RedisConnectionInfo::default();
        if !user.is_empty() {
            settings = settings.set_username(user);
        }
        if !password.is_empty() {
            settings = settings.set_password(password);
        }
        let info = ConnectionAddr::Tcp(h, p)
            .into_connection_info()?
            .set_redis_settings(settings);
        let client = redis::Client::open(info)?;
        let cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            // fail a request fast while Redis is down; the next request reconnects
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        Ok(Conn::Single(ConnectionManager::new_lazy_with_config(
            client, cfg,
        )?))
    }
}

fn is_noscript(e: &RedisError) -> bool {
    e.kind() == ErrorKind::Server(ServerErrorKind::NoScript)
}

/// Turn a driver error into a message that says what failed and what to do.
pub(crate) fn store_err(target: &str, e: RedisError) -> StoreError {
    if e.kind() == ErrorKind::AuthenticationFailed
        || matches!(e.code(), Some("NOAUTH" | "WRONGPASS" | "NOPERM"))
    {
        return StoreError::Unavailable(format!(
            "Redis at {target} refused the credentials: {e}; set Store.User/Store.Password (STORE_USER/STORE_PASSWORD)"
        ));
    }
    if e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
    {
        return StoreError::Unavailable(format!(
            "cannot reach Redis at {target}: {e}; check that Redis is running and that Store.Host/Store.Port (STORE_HOST/STORE_PORT) point to it"
        ));
    }
    if e.kind() == ErrorKind::Server(ServerErrorKind::CrossSlot) {
        return StoreError::Unavailable(format!(
            "Redis Cluster at {target} rejected keys in different slots: {e}; Store.RedisPrefix must not contain braces that split dtm-rs's hash tags"
        ));
    }
    StoreError::Unavailable(format!(
        "Redis at {target} answered an error: {e}; if another application uses the same keys, give dtm-rs its own Store.RedisPrefix (STORE_REDIS_PREFIX)"
    ))
}

/// Run one script: EVALSHA, and EVAL when the server does not have it cached (after a
/// restart or failover); EVAL caches it again.
pub(crate) async fn run(conn: &Conn, target: &str, call: &Call) -> Result<Value, StoreError> {
    let mut c = conn.clone();
    match call
        .cmd("EVALSHA", &call.lua.sha)
        .query_async::<Value>(&mut c)
        .await
    {
        Err(e) if is_noscript(&e) => call
            .cmd("EVAL", &call.lua.code)
            .query_async::<Value>(&mut c)
            .await
            .map_err(|e| store_err(target, e)),
        r => r.map_err(|e| store_err(target, e)),
    }
}

/// Run many script calls in one round trip: on a single node as one pipeline; on a
/// cluster as one pipeline per hash slot (the calls grouped by tag; a cluster routes a
/// pipeline to one slot), the groups run concurrently. Each script is atomic on its own;
/// results come back in call order.
///
/// Calls on the same first key (one transaction's global, one kv entry) keep their order:
/// such a call starts a new pipeline that is sent only after the one before it has
/// finished. Inside one pipeline a call that meets NOSCRIPT (a script not cached on a
/// fresh, restarted or failed-over node) is run again after the rest of the pipeline, so
/// two writes of one transaction in one pipeline could otherwise be applied out of order.
/// Split `idx` (in order) into runs in which no first key appears twice.
fn distinct_first_keys(calls: &[&Call], idx: &[usize]) -> Vec<Vec<usize>> {
    let mut parts: Vec<Vec<usize>> = vec![Vec::new()];
    let mut seen: std::collections::HashSet<&str> = std::collections::HashSet::new();
    for &i in idx {
        let key = calls[i]
            .keys
            .first()
            .map(String::as_str)
            .unwrap_or_default();
        if !seen.insert(key) {
            parts.push(Vec::new());
            seen.clear();
            seen.insert(key);
        }
        if let Some(p) = parts.last_mut() {
            p.push(i);
        }
    }
    parts
}

/// One pipeline of EVALSHA calls; a call that meets NOSCRIPT runs again with EVAL.
async fn run_pipeline(
    conn: &Conn,
    target: &str,
    calls: &[&Call],
    idx: &[usize],
    out: &mut Vec<(usize, Result<Value, StoreError>)>,
) {
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for &i in idx {
        pipe.add_command(calls[i].cmd("EVALSHA", &calls[i].lua.sha));
    }
    let mut c = conn.clone();
    match pipe.query_async::<Vec<RedisResult<Value>>>(&mut c).await {
        Err(e) => {
            let e = store_err(target, e);
            out.extend(idx.iter().map(|&i| (i, Err(e.clone()))));
        }
        Ok(answers) => {
            let mut answers = answers.into_iter();
            for &i in idx {
                let r = match answers.next() {
                    Some(Ok(v)) => Ok(v),
                    Some(Err(e)) if is_noscript(&e) => run(conn, target, calls[i]).await,
                    Some(Err(e)) => Err(store_err(target, e)),
                    None => Err(StoreError::Unavailable(format!(
                        "Redis at {target} answered fewer replies than commands sent; retry"
                    ))),
                };
                out.push((i, r));
            }
        }
    }
}

pub(crate) async fn run_batch(
    conn: &Conn,
    target: &str,
    calls: &[&Call],
) -> Vec<Result<Value, StoreError>> {
    // A cluster takes a pipeline to one slot; a single node takes the batch as one.
    let cluster = matches!(conn, Conn::Cluster(_));
    let mut groups: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, c) in calls.iter().enumerate() {
        let group = if cluster { c.tag.as_str() } else { "" };
        groups.entry(group).or_default().push(i);
    }
    let runs = groups.into_values().map(|idx| async move {
        let mut out = Vec::with_capacity(idx.len());
        for part in distinct_first_keys(calls, &idx) {
            run_pipeline(conn, target, calls, &part, &mut out).await;
        }
        out
    });
    let mut results: Vec<Option<Result<Value, StoreError>>> = calls.iter().map(|_| None).collect();
    for (i, r) in futures::future::join_all(runs).await.into_iter().flatten() {
        results[i] = Some(r);
    }
    results
        .into_iter()
        .map(|r| {
            r.unwrap_or_else(|| {
                Err(StoreError::Unavailable(
                    "a batched write got no reply".into(),
                ))
            })
        })
        .collect()
}
