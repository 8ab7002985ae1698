//! Whole-prefix housekeeping (tests, operators): list the key prefixes in use and delete
//! everything under one. Works key by key on every master, so it is for small data sets
//! and maintenance, not for the request path.

use redis::aio::MultiplexedConnection;
use redis::{ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo};

use super::RedisOptions;
use super::conn::store_err;
use dtm_core::store::StoreError;

fn target(o: &RedisOptions) -> String {
    o.nodes
        .iter()
        .map(|(h, p)| format!("{h}:{p}"))
        .collect::<Vec<_>>()
        .join(",")
}

async fn plain(
    o: &RedisOptions,
    host: &str,
    port: u16,
) -> Result<MultiplexedConnection, StoreError> {
    let mut settings = RedisConnectionInfo::default();
    if !o.user.is_empty() {
        settings = settings.set_username(&o.user);
    }
    if !o.password.is_empty() {
        settings = settings.set_password(&o.password);
    }
    let t = format!("{host}:{port}");
    let info = ConnectionAddr::Tcp(host.to_string(), port)
        .into_connection_info()
        .map_err(|e| store_err(&t, e))?
        .set_redis_settings(settings);
    let client = redis::Client::open(info).map_err(|e| store_err(&t, e))?;
    client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| store_err(&t, e))
}

/// A connection to every master: the node itself, or the masters a cluster lists.
async fn masters(o: &RedisOptions) -> Result<Vec<MultiplexedConnection>, StoreError> {
    let mut last = None;
    for (h, p) in &o.nodes {
        let mut c = match plain(o, h, *p).await {
            Ok(c) => c,
            Err(e) => {
                last = Some(e);
                continue;
            }
        };
        if !o.cluster {
            return Ok(vec![c]);
        }
        let nodes: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async(&mut c)
            .await
            .map_err(|e| store_err(&format!("{h}:{p}"), e))?;
        let mut out = Vec::new();
        for line in nodes.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(addr), Some(flags)) = (f.get(1), f.get(2)) else {
                continue;
            };
            if !flags.split(',').any(|x| x == "master") || flags.contains("fail") {
                continue;
            }
            let addr = addr.split(['@', ',']).next().unwrap_or("");
            let Some((host, port)) = addr.rsplit_once(':') else {
                continue;
            };
            let host = if host.is_empty() { h.as_str() } else { host };
            if let Ok(port) = port.parse::<u16>() {
                out.push(plain(o, host, port).await?);
            }
        }
        return Ok(out);
    }
    Err(last.unwrap_or_else(|| {
        StoreError::Unavailable(format!("no Redis node to reach in '{}'", target(o)))
    }))
}

/// `s` as a literal in a SCAN MATCH pattern.
fn glob_literal(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        if matches!(ch, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(ch);
    }
    out
}

async fn scan(c: &mut MultiplexedConnection, pattern: &str) -> redis::RedisResult<Vec<String>> {
    let mut keys = Vec::new();
    let mut cursor = 0u64;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(c)
            .await?;
        keys.extend(batch);
        if next == 0 {
            return Ok(keys);
        }
        cursor = next;
    }
}

/// The dtm-rs key prefixes in use that start with `starts_with` (each has its
/// `<prefix>shards` key).
pub async fn list_prefixes(o: &RedisOptions, starts_with: &str) -> Result<Vec<String>, StoreError> {
    let pattern = format!("{}*shards", glob_literal(starts_with));
    let mut out = Vec::new();
    for mut c in masters(o).await? {
        let keys = scan(&mut c, &pattern)
            .await
            .map_err(|e| store_err(&target(o), e))?;
        out.extend(
            keys.into_iter()
                .filter_map(|k| k.strip_suffix("shards").map(str::to_string)),
        );
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// Delete every key under `o.prefix`; returns how many. Unfinished transactions go too:
/// only for data that is no longer wanted (test runs, a retired deployment).
pub async fn drop_prefix(o: &RedisOptions) -> Result<usize, StoreError> {
    if o.prefix.is_empty() {
        return Err(StoreError::Unavailable(
            "refusing to delete every key: the Redis prefix is empty".into(),
        ));
    }
    let pattern = format!("{}*", glob_literal(&o.prefix));
    let mut n = 0;
    for mut c in masters(o).await? {
        let keys = scan(&mut c, &pattern)
            .await
            .map_err(|e| store_err(&target(o), e))?;
        // one key per command: keys of different slots cannot share one in a cluster
        for chunk in keys.chunks(500) {
            let mut p = redis::pipe();
            for k in chunk {
                p.cmd("UNLINK").arg(k).ignore();
            }
            p.query_async::<()>(&mut c)
                .await
                .map_err(|e| store_err(&target(o), e))?;
            n += chunk.len();
        }
    }
    Ok(n)
}
