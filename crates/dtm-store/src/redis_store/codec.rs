//! How globals, branches and KV rows are stored in Redis values.
//!
//! - A global is a hash with the SQL column names as fields ([`GLOBAL_FIELDS`]); times are
//!   unix milliseconds, empty columns are left out.
//! - A branch is split in two: an immutable JSON record in the branch list (insertion
//!   order), and its changing part `status|update_ms|finish_ms` in a field of the global's
//!   hash, `s:` and the JSON array `["<branch_id>","<op>"]`. A status update rewrites only
//!   the short state.
//! - A KV row is `id|version|create_ms|update_ms|v` in one hash field per key.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use dtm_core::store::{GlobalUpdate, Kv, StoreError};
use dtm_proto::{Branch, TransGlobal};
use serde::{Deserialize, Serialize};

pub(crate) fn ms(t: &DateTime<Utc>) -> String {
    t.timestamp_millis().to_string()
}

fn time(v: Option<&String>) -> Option<DateTime<Utc>> {
    v.and_then(|s| s.parse::<i64>().ok())
        .and_then(DateTime::from_timestamp_millis)
}

/// The hash fields of a global (reads ask for these, not for the branch fields).
pub(crate) const GLOBAL_FIELDS: [&str; 18] = [
    "id",
    "gid",
    "trans_type",
    "status",
    "query_prepared",
    "protocol",
    "options",
    "custom_data",
    "owner",
    "ext_data",
    "result",
    "rollback_reason",
    "create_time",
    "update_time",
    "finish_time",
    "rollback_time",
    "next_cron_time",
    "next_cron_interval",
];

/// A global from the values of [`GLOBAL_FIELDS`] (`None` when the hash does not exist).
pub(crate) fn decode_global_values(values: Vec<Option<String>>) -> Option<TransGlobal> {
    let m: HashMap<String, String> = GLOBAL_FIELDS
        .iter()
        .zip(values)
        .filter_map(|(k, v)| v.map(|v| (k.to_string(), v)))
        .collect();
    decode_global(m)
}

/// Hash fields of a new global (every non-empty column).
pub(crate) fn global_fields(g: &TransGlobal) -> Vec<(&'static str, String)> {
    let mut f = Vec::with_capacity(18);
    let texts = [
        ("gid", &g.gid),
        ("trans_type", &g.trans_type),
        ("status", &g.status),
        ("query_prepared", &g.query_prepared),
        ("protocol", &g.protocol),
        ("options", &g.options),
        ("custom_data", &g.custom_data),
        ("owner", &g.owner),
        ("ext_data", &g.ext_data),
        ("result", &g.result),
        ("rollback_reason", &g.rollback_reason),
    ];
    for (k, v) in texts {
        if !v.is_empty() {
            f.push((k, v.clone()));
        }
    }
    let times = [
        ("create_time", &g.create_time),
        ("update_time", &g.update_time),
        ("finish_time", &g.finish_time),
        ("rollback_time", &g.rollback_time),
        ("next_cron_time", &g.next_cron_time),
    ];
    for (k, v) in times {
        if let Some(t) = v {
            f.push((k, ms(t)));
        }
    }
    if g.next_cron_interval != 0 {
        f.push(("next_cron_interval", g.next_cron_interval.to_string()));
    }
    f
}

/// Hash fields an update sets (the `Some` columns and `update_time`).
pub(crate) fn update_fields(u: &GlobalUpdate) -> Vec<(&'static str, String)> {
    let mut f = vec![("update_time", ms(&u.update_time))];
    let texts = [
        ("status", &u.status),
        ("rollback_reason", &u.rollback_reason),
        ("result", &u.result),
        ("custom_data", &u.custom_data),
        ("owner", &u.owner),
    ];
    for (k, v) in texts {
        if let Some(v) = v {
            f.push((k, v.clone()));
        }
    }
    let times = [
        ("finish_time", &u.finish_time),
        ("rollback_time", &u.rollback_time),
        ("next_cron_time", &u.next_cron_time),
    ];
    for (k, v) in times {
        if let Some(t) = v {
            f.push((k, ms(t)));
        }
    }
    if let Some(i) = u.next_cron_interval {
        f.push(("next_cron_interval", i.to_string()));
    }
    f
}

/// A global from its hash (`None` for an empty hash: no such key).
pub(crate) fn decode_global(mut m: HashMap<String, String>) -> Option<TransGlobal> {
    if m.is_empty() {
        return None;
    }
    let id = m.get("id").and_then(|s| s.parse().ok()).unwrap_or(0);
    let mut text = |k: &str| m.remove(k).unwrap_or_default();
    let mut g = TransGlobal {
        id,
        gid: text("gid"),
        trans_type: text("trans_type"),
        status: text("status"),
        query_prepared: text("query_prepared"),
        protocol: text("protocol"),
        options: text("options"),
        custom_data: text("custom_data"),
        owner: text("owner"),
        ext_data: text("ext_data"),
        result: text("result"),
        rollback_reason: text("rollback_reason"),
        ..Default::default()
    };
    g.create_time = time(m.get("create_time"));
    g.update_time = time(m.get("update_time"));
    g.finish_time = time(m.get("finish_time"));
    g.rollback_time = time(m.get("rollback_time"));
    g.next_cron_time = time(m.get("next_cron_time"));
    g.next_cron_interval = m
        .get("next_cron_interval")
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Some(g)
}

/// The immutable part of a branch, stored as JSON in the branch list (as read).
#[derive(Deserialize)]
struct BranchRecord {
    branch_id: String,
    op: String,
    url: String,
    /// base64
    #[serde(default)]
    bin: String,
    #[serde(default)]
    create: Option<i64>,
    #[serde(default)]
    rollback: Option<i64>,
}

/// [`BranchRecord`] as written, borrowing from the branch.
#[derive(Serialize)]
struct BranchRecordRef<'a> {
    branch_id: &'a str,
    op: &'a str,
    url: &'a str,
    #[serde(skip_serializing_if = "String::is_empty")]
    bin: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    create: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rollback: Option<i64>,
}

/// The state-hash field of a (branch_id, op).
pub(crate) fn branch_key(branch_id: &str, op: &str) -> String {
    let mut k = Vec::with_capacity(branch_id.len() + op.len() + 7);
    k.push(b'[');
    // writing a str into a Vec cannot fail
    let _ = serde_json::to_writer(&mut k, branch_id);
    k.push(b',');
    let _ = serde_json::to_writer(&mut k, op);
    k.push(b']');
    String::from_utf8(k).unwrap_or_default()
}

/// The state-hash value: `status|update_ms|finish_ms` (empty when unset).
pub(crate) fn branch_state(
    status: &str,
    update: Option<&DateTime<Utc>>,
    finish: Option<&DateTime<Utc>>,
) -> String {
    let t = |t: Option<&DateTime<Utc>>| t.map(ms).unwrap_or_default();
    format!("{status}|{}|{}", t(update), t(finish))
}

/// (key, record, state) of a new branch.
pub(crate) fn encode_branch(b: &Branch) -> Result<[String; 3], StoreError> {
    let rec = BranchRecordRef {
        branch_id: &b.branch_id,
        op: &b.op,
        url: &b.url,
        bin: if b.bin_data.is_empty() {
            String::new()
        } else {
            dtm_proto::base64_encode(&b.bin_data)
        },
        create: b.create_time.map(|t| t.timestamp_millis()),
        rollback: b.rollback_time.map(|t| t.timestamp_millis()),
    };
    let json = serde_json::to_string(&rec).map_err(|e| {
        StoreError::Unavailable(format!("cannot encode branch {}: {e}", b.branch_id))
    })?;
    Ok([
        branch_key(&b.branch_id, &b.op),
        json,
        branch_state(&b.status, b.update_time.as_ref(), b.finish_time.as_ref()),
    ])
}

/// Branches of `gid` from its branch list and the `s:` fields of its transaction hash, in
/// insertion order.
pub(crate) fn decode_txn_branches(
    gid: &str,
    records: Vec<String>,
    hash: HashMap<String, String>,
) -> Result<Vec<Branch>, StoreError> {
    let states = hash
        .into_iter()
        .filter_map(|(k, v)| k.strip_prefix("s:").map(|k| (k.to_string(), v)))
        .collect();
    decode_branches(gid, records, states)
}

/// Branches of `gid` from their records (insertion order) and their states by branch key.
pub(crate) fn decode_branches(
    gid: &str,
    records: Vec<String>,
    states: HashMap<String, String>,
) -> Result<Vec<Branch>, StoreError> {
    let ts = |s: &str| {
        s.parse::<i64>()
            .ok()
            .and_then(DateTime::from_timestamp_millis)
    };
    records
        .into_iter()
        .enumerate()
        .map(|(i, json)| {
            let r: BranchRecord = serde_json::from_str(&json).map_err(|e| {
                StoreError::Unavailable(format!(
                    "unreadable branch record #{i} of gid {gid} in Redis: {e}"
                ))
            })?;
            let state = states
                .get(&branch_key(&r.branch_id, &r.op))
                .map(String::as_str)
                .unwrap_or("");
            let mut parts = state.splitn(3, '|');
            let status = parts.next().unwrap_or("").to_string();
            let update_time = parts.next().and_then(ts);
            let finish_time = parts.next().and_then(ts);
            Ok(Branch {
                id: i as i64 + 1,
                gid: gid.to_string(),
                url: r.url,
                bin_data: dtm_proto::base64_decode(&r.bin).unwrap_or_default(),
                branch_id: r.branch_id,
                op: r.op,
                status,
                create_time: r.create.and_then(DateTime::from_timestamp_millis),
                update_time,
                finish_time,
                rollback_time: r.rollback.and_then(DateTime::from_timestamp_millis),
            })
        })
        .collect()
}

/// A KV row from its stored value `id|version|create_ms|update_ms|v`.
pub(crate) fn decode_kv(cat: &str, k: &str, stored: &str) -> Kv {
    let mut p = stored.splitn(5, '|');
    let mut num = || p.next().and_then(|s| s.parse::<i64>().ok());
    let id = num().unwrap_or(0);
    let version = num().unwrap_or(1);
    let create_time = num().and_then(DateTime::from_timestamp_millis);
    let update_time = num().and_then(DateTime::from_timestamp_millis);
    Kv {
        id,
        create_time,
        update_time,
        cat: cat.to_string(),
        k: k.to_string(),
        v: p.next().unwrap_or("").to_string(),
        version,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn branch_round_trip() {
        let t = DateTime::from_timestamp_millis(1_700_000_000_123);
        let b = Branch {
            gid: "g".into(),
            url: "http://x/a".into(),
            bin_data: vec![0, 1, 255],
            branch_id: "0|1".into(),
            op: "action".into(),
            status: "prepared".into(),
            create_time: t,
            update_time: t,
            ..Default::default()
        };
        let [key, rec, state] = encode_branch(&b).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(key, r#"["0|1","action"]"#);
        let states = HashMap::from([(key, state)]);
        let got = decode_branches("g", vec![rec], states).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(got, vec![Branch { id: 1, ..b }]);
    }

    /// Reads ask Redis for [`GLOBAL_FIELDS`]: every field a new global is written with must
    /// be among them, or a read would lose it.
    #[test]
    fn global_fields_are_all_read_back() {
        let t = DateTime::from_timestamp_millis(1_700_000_000_123);
        let text = |s: &str| s.to_string();
        let g = TransGlobal {
            id: 7,
            gid: text("g"),
            trans_type: text("saga"),
            status: text("aborting"),
            query_prepared: text("http://q"),
            protocol: text("http"),
            options: text("{}"),
            custom_data: text("{\"a\":1}"),
            owner: text("n1"),
            ext_data: text("{}"),
            result: text("r"),
            rollback_reason: text("why"),
            create_time: t,
            update_time: t,
            finish_time: t,
            rollback_time: t,
            next_cron_time: t,
            next_cron_interval: 10,
        };
        let mut written: HashMap<&str, String> = global_fields(&g).into_iter().collect();
        written.insert("id", "7".into());
        assert_eq!(written.len(), GLOBAL_FIELDS.len(), "{written:?}");
        let values = GLOBAL_FIELDS
            .iter()
            .map(|f| written.get(f).cloned())
            .collect();
        assert_eq!(decode_global_values(values), Some(g));
        assert_eq!(decode_global_values(vec![None; GLOBAL_FIELDS.len()]), None);
    }

    #[test]
    fn branch_states_come_from_the_s_fields() {
        let mk = |id: &str| Branch {
            gid: "g".into(),
            url: format!("http://x/{id}"),
            branch_id: id.into(),
            op: "action".into(),
            status: "prepared".into(),
            ..Default::default()
        };
        let mut hash = HashMap::from([
            ("status".to_string(), "succeed".to_string()),
            // a global field that looks like a branch key is not a state
            (r#"["02","action"]"#.to_string(), "failed||".to_string()),
        ]);
        let mut records = Vec::new();
        for (id, status) in [("01", "succeed"), ("02", "prepared")] {
            let mut b = mk(id);
            b.status = status.into();
            let [key, rec, state] = encode_branch(&b).unwrap_or_else(|e| panic!("{e}"));
            records.push(rec);
            hash.insert(format!("s:{key}"), state);
        }
        let got = decode_txn_branches("g", records, hash).unwrap_or_else(|e| panic!("{e}"));
        let ids: Vec<(&str, &str)> = got
            .iter()
            .map(|b| (b.branch_id.as_str(), b.status.as_str()))
            .collect();
        assert_eq!(ids, [("01", "succeed"), ("02", "prepared")]);
    }

    #[test]
    fn branch_key_is_a_json_array() {
        assert_eq!(branch_key("0|1", "action"), r#"["0|1","action"]"#);
        let odd = "a\"b\\c\u{1}é";
        let want = serde_json::json!([odd, "op"]).to_string();
        assert_eq!(branch_key(odd, "op"), want);
    }

    #[test]
    fn kv_value_keeps_pipes_in_v() {
        let kv = decode_kv("topics", "t", "3|2|1000|2000|a|b");
        assert_eq!((kv.id, kv.version, kv.v.as_str()), (3, 2, "a|b"));
        assert_eq!(kv.update_time.map(|t| t.timestamp_millis()), Some(2000));
    }
}
