//! The hot ops of a batch written together: the `SaveNew`s of a group as one insert of
//! their globals and one of their branches, the `UpdateGlobal`s as one guarded update of
//! their globals and one of their branch rows. A batch then costs a few statements (round
//! trips) whatever the number of its ops, instead of two or three per op (one on Postgres).
//!
//! A group holds ops on distinct gids only (the batch runner starts a new group when a
//! gid comes again, and runs other op kinds on their own: those of one gid before the
//! group unless it holds that gid, kv ops at once; claims and resets, which the store
//! runs outside the writers, would come after it), so its ops are independent and the
//! order inside a group does not matter; each op keeps its own result.
//!
//! - **Postgres**: arrays bound as one parameter each, `UNNEST`ed, so the statement has
//!   one text (one prepared statement) whatever the number of rows, and a whole group is
//!   one statement ([`PG_GROUP`]): `ON CONFLICT (gid) DO NOTHING RETURNING gid` tells
//!   which globals were inserted, `UPDATE ... FROM UNNEST(..) ... RETURNING gid` which
//!   guards held, and the branch rows follow those only. A batch that is one group is
//!   then one round trip in autocommit mode.
//! - **MySQL/MariaDB**: no arrays and no `RETURNING` on UPDATE: one `SELECT gid ... IN`
//!   finds the gids that exist, multi-row INSERTs add the rest; one `UNION ALL` of guarded
//!   `SELECT ... FOR UPDATE` lookups finds (and locks) the rows to change, one UPDATE
//!   with a `CASE id` per column changes them, one with a `CASE` per (gid, branch_id, op)
//!   their branches. Lists are padded (IN, CASE) or split (INSERT) to powers of two, so a
//!   connection prepares few distinct statements. A gid is compared by the server's
//!   collation (case-insensitive by default); only gids of printable ASCII are grouped
//!   (their collation match is the ASCII case fold), others run op by op, and a row whose
//!   gid matches no op exactly under that fold sends its group op by op too.
//!
//! A database error in a grouped statement cannot be pinned on one op: the batch runner
//! rolls back and runs the batch again op by op ([`super::ops::apply`]), which finds it.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, SubsecRound, Utc};
use dtm_core::StoreError;
use dtm_core::store::{BranchUpdate, GlobalUpdate, WriteOp, WriteOutcome};
use dtm_proto::{Branch, TransGlobal};

use super::exec::{DbError, Dialect, Exec, Val, opt_time, time};
use super::ops::{self, OpError, global_cols};
use crate::branch_list;

/// Most ops per MySQL statement (the `CASE` lists are scanned for every row changed).
const MYSQL_OPS: usize = 64;
/// Most rows per MySQL multi-row INSERT (17 values each: well under 65,535 parameters).
const MYSQL_ROWS: usize = 256;
/// Most branch updates per MySQL statement (15 parameters each).
const MYSQL_BRANCH_UPDATES: usize = 256;
/// Bytes of values per MySQL statement, well under the default `max_allowed_packet`.
const MYSQL_BYTES: usize = 4 << 20;

pub(crate) type OpResult = Result<WriteOutcome, StoreError>;

/// Where the batch runner puts an op, in grouped mode.
pub(crate) enum Place {
    /// Into the group, under this key (a group holds distinct keys).
    Group(String),
    /// On its own, touching only the rows of this key: at once, unless the group holds
    /// the key (then after the group).
    Before(String),
    /// On its own at once: touches nothing a group does (kv).
    Free,
    /// On its own after the group (it may touch any transaction), or a gid that cannot
    /// be keyed.
    After,
}

/// Where `op` goes. Keys are gids as the server compares them.
pub(crate) fn place(d: Dialect, op: &WriteOp) -> Place {
    let (gid, grouped) = match op {
        WriteOp::SaveNew { global, .. } => (&global.gid, true),
        WriteOp::UpdateGlobal { gid, .. } => (gid, true),
        WriteOp::AddBranches { gid, .. } | WriteOp::ResetNextCronTime { gid, .. } => (gid, false),
        WriteOp::CreateKv { .. } | WriteOp::UpdateKv { .. } | WriteOp::DeleteKv { .. } => {
            return Place::Free;
        }
        WriteOp::ClaimDue { .. } | WriteOp::ResetCronTime { .. } => return Place::After,
    };
    let key = match d {
        // text equality is byte equality
        Dialect::Postgres => gid.clone(),
        // the server's collation decides; for printable ASCII that is (at most) a case fold
        Dialect::MySql if gid.bytes().all(|b| b.is_ascii_graphic()) => gid.to_ascii_lowercase(),
        Dialect::MySql => return Place::After,
    };
    if grouped {
        Place::Group(key)
    } else {
        Place::Before(key)
    }
}

/// Whether this dialect writes a whole group with one statement ([`PG_GROUP`]), so that
/// a batch that is one group needs no transaction around it.
pub(crate) fn group_is_one_statement(d: Dialect) -> bool {
    d == Dialect::Postgres
}

fn key_of(d: Dialect, gid: &str) -> String {
    match d {
        Dialect::Postgres => gid.to_string(),
        Dialect::MySql => gid.to_ascii_lowercase(),
    }
}

struct Save<'a> {
    at: usize,
    g: &'a TransGlobal,
    branches: &'a [Branch],
}

struct Upd<'a> {
    at: usize,
    gid: &'a str,
    expect_status: &'a str,
    expect_owner: Option<&'a str>,
    set: &'a GlobalUpdate,
    branches: &'a [BranchUpdate],
}

/// Apply a group (ops of [`Place::Group`] with distinct keys); one result per op, in order. A
/// database error is returned as is: the caller rolls back and goes op by op.
pub(crate) async fn apply_group(
    c: &mut dyn Exec,
    ops: &[&WriteOp],
) -> Result<Vec<OpResult>, DbError> {
    let mut out: Vec<Option<OpResult>> = vec![None; ops.len()];
    let mut saves = Vec::new();
    let mut upds = Vec::new();
    for (at, op) in ops.iter().enumerate() {
        match op {
            WriteOp::SaveNew { global, branches } => saves.push(Save {
                at,
                g: global,
                branches,
            }),
            WriteOp::UpdateGlobal {
                gid,
                expect_status,
                expect_owner,
                set,
                branches,
            } => upds.push(Upd {
                at,
                gid,
                expect_status,
                expect_owner: expect_owner.as_deref(),
                set,
                branches,
            }),
            // not grouped: run here, on its own (the group has distinct gids)
            other => {
                out[at] = Some(single(c, other).await?);
            }
        }
    }
    match c.dialect() {
        Dialect::Postgres if !saves.is_empty() || !upds.is_empty() => {
            pg_group(c, &saves, &upds, &mut out).await?
        }
        Dialect::Postgres => {}
        Dialect::MySql => {
            for chunk in saves.chunks(MYSQL_OPS) {
                my_save(c, chunk, ops, &mut out).await?;
            }
            for chunk in upds.chunks(MYSQL_OPS) {
                my_update(c, chunk, ops, &mut out).await?;
            }
        }
    }
    Ok(out
        .into_iter()
        .map(|r| r.unwrap_or(Err(StoreError::NotFound)))
        .collect())
}

/// One op the statement-per-op way.
async fn single(c: &mut dyn Exec, op: &WriteOp) -> Result<OpResult, DbError> {
    match ops::apply(c, op).await {
        Ok(o) => Ok(Ok(o)),
        Err(OpError::Logical(e)) => Ok(Err(e)),
        Err(OpError::Db(e)) => Err(e),
    }
}

fn trunc(t: Option<DateTime<Utc>>) -> Option<DateTime<Utc>> {
    t.map(|t| t.trunc_subsecs(3))
}

fn interval(i: i64) -> i64 {
    i.clamp(i32::MIN as i64, i32::MAX as i64)
}

/// Branch updates as they end when applied one after the other: the last update of a
/// (branch_id, op) wins, in the order of their first appearance.
fn last_wins(ups: &[BranchUpdate]) -> Vec<&BranchUpdate> {
    let mut at: HashMap<(&str, &str), usize> = HashMap::with_capacity(ups.len());
    let mut out: Vec<&BranchUpdate> = Vec::with_capacity(ups.len());
    for u in ups {
        match at.get(&(u.branch_id.as_str(), u.op.as_str())) {
            Some(&i) => out[i] = u,
            None => {
                at.insert((&u.branch_id, &u.op), out.len());
                out.push(u);
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------- Postgres

/// `ng`: the new globals, from one array per column ([`ops::global_cols`]), plus the
/// columns `$cols` from the arrays `$arrays`.
macro_rules! pg_new_globals {
    ($cols:literal, $arrays:literal) => {
        concat!(
            "WITH ng AS (INSERT INTO trans_global (",
            global_cols!(),
            $cols,
            ") SELECT * FROM UNNEST(?::text[], ?::text[], ?::text[], ?::text[], ?::text[], ?::timestamptz[], ?::timestamptz[], ?::timestamptz[], ?::timestamptz[], ?::text[], ?::text[], ?::int8[], ?::timestamptz[], ?::text[], ?::text[], ?::text[], ?::text[]",
            $arrays,
            ") ON CONFLICT (gid) DO NOTHING RETURNING gid), "
        )
    };
}

/// `ug`: the guarded updates, setting `$set` too, from `$arrays` more arrays named
/// `$names`.
macro_rules! pg_update_globals {
    ($set:literal, $arrays:literal, $names:literal) => {
        concat!(
            "ug AS (UPDATE trans_global g SET update_time = u.update_time, status = COALESCE(u.status, g.status), rollback_reason = COALESCE(u.rollback_reason, g.rollback_reason), result = COALESCE(u.result, g.result), custom_data = COALESCE(u.custom_data, g.custom_data), owner = COALESCE(u.owner, g.owner), finish_time = COALESCE(u.finish_time, g.finish_time), rollback_time = COALESCE(u.rollback_time, g.rollback_time), next_cron_time = COALESCE(u.next_cron_time, g.next_cron_time), next_cron_interval = COALESCE(u.next_cron_interval, g.next_cron_interval)",
            $set,
            " FROM UNNEST(?::text[], ?::text[], ?::text[], ?::timestamptz[], ?::text[], ?::text[], ?::text[], ?::text[], ?::text[], ?::timestamptz[], ?::timestamptz[], ?::timestamptz[], ?::int8[]",
            $arrays,
            ") AS u(gid, expect_status, expect_owner, update_time, status, rollback_reason, result, custom_data, owner, finish_time, rollback_time, next_cron_time, next_cron_interval",
            $names,
            ") WHERE g.gid = u.gid AND g.status COLLATE \"C\" = u.expect_status AND (u.expect_owner IS NULL OR g.owner = u.expect_owner) RETURNING g.gid), "
        )
    };
}

/// `ub`: the branch rows of the updated globals; then which globals were inserted or
/// updated.
macro_rules! pg_branch_rows_and_result {
    () => {
        "ub AS (UPDATE trans_branch_op b SET status = u.status, finish_time = u.t, update_time = u.t \
FROM UNNEST(?::text[], ?::text[], ?::text[], ?::text[], ?::timestamptz[]) AS u(gid, branch_id, op, status, t) \
WHERE b.gid = u.gid AND b.branch_id = u.branch_id AND b.op = u.op AND u.gid IN (SELECT gid FROM ug)) \
SELECT 'i' || gid FROM ng UNION ALL SELECT 'u' || gid FROM ug"
    };
}

/// The whole group in one statement (one round trip): data-modifying CTEs insert the new
/// globals (`ng`, `ON CONFLICT (gid) DO NOTHING` tells which were new), the branches of
/// those only (`nb`, in the order given), apply the guarded global updates (`ug`, the
/// `RETURNING` tells whose guard held) and the branch updates of those only (`ub`). All
/// four see one snapshot; that is sound because a group holds distinct gids, so no row is
/// written twice. Rows come back as `i<gid>` (inserted) and `u<gid>` (updated).
///
/// `COLLATE "C"` (the same equality: collations here are deterministic) keeps the
/// planner off the (status, next_cron_time) index, which a plan made on an empty table
/// may otherwise pick over the unique gid index.
const PG_GROUP: &str = concat!(
    pg_new_globals!("", ""),
    "nb AS (\
INSERT INTO trans_branch_op (gid, url, bin_data, branch_id, op, status, finish_time, rollback_time, create_time, update_time) \
SELECT b.gid, b.url, b.bin_data, b.branch_id, b.op, b.status, b.finish_time, b.rollback_time, b.create_time, b.update_time \
FROM UNNEST(?::text[], ?::text[], ?::bytea[], ?::text[], ?::text[], ?::text[], ?::timestamptz[], ?::timestamptz[], ?::timestamptz[], ?::timestamptz[]) WITH ORDINALITY \
AS b(gid, url, bin_data, branch_id, op, status, finish_time, rollback_time, create_time, update_time, n) \
WHERE b.gid IN (SELECT gid FROM ng) ORDER BY b.n), ",
    pg_update_globals!("", "", ""),
    pg_branch_rows_and_result!(),
);

/// [`PG_GROUP`] when the tables have the branch columns ([`Exec::branch_column`]): a new
/// global's branches are its `branches` value, not rows, and an update appends its branch
/// changes to `branch_states` when that list holds any branch (is longer than its version
/// byte); rows (of branches added later) are updated as before.
const PG_GROUP_COLUMN: &str = concat!(
    pg_new_globals!(", branches", ", ?::bytea[]"),
    pg_update_globals!(
        ", branch_states = CASE WHEN u.log IS NULL OR octet_length(COALESCE(g.branches, ''::bytea)) <= 1 THEN g.branch_states ELSE COALESCE(g.branch_states, '') || u.log END",
        ", ?::text[]",
        ", log"
    ),
    pg_branch_rows_and_result!(),
);

/// The `SaveNew`s and `UpdateGlobal`s of a group with [`PG_GROUP`] (or
/// [`PG_GROUP_COLUMN`]).
async fn pg_group(
    c: &mut dyn Exec,
    saves: &[Save<'_>],
    upds: &[Upd<'_>],
    out: &mut [Option<OpResult>],
) -> Result<(), DbError> {
    // new globals
    let gs: Vec<&TransGlobal> = saves.iter().map(|s| s.g).collect();
    let gstrs = |f: fn(&TransGlobal) -> &str| -> Vec<&str> { gs.iter().map(|g| f(g)).collect() };
    let gtimes = |f: fn(&TransGlobal) -> Option<DateTime<Utc>>| -> Vec<Option<DateTime<Utc>>> {
        gs.iter().map(|g| trunc(f(g))).collect()
    };
    let g_gid = gstrs(|g| &g.gid);
    let g_type = gstrs(|g| &g.trans_type);
    let g_status = gstrs(|g| &g.status);
    let g_qp = gstrs(|g| &g.query_prepared);
    let g_protocol = gstrs(|g| &g.protocol);
    let g_create = gtimes(|g| g.create_time);
    let g_update = gtimes(|g| g.update_time);
    let g_finish = gtimes(|g| g.finish_time);
    let g_rollback = gtimes(|g| g.rollback_time);
    let g_options = gstrs(|g| &g.options);
    let g_custom = gstrs(|g| &g.custom_data);
    let g_interval: Vec<Option<i64>> = gs
        .iter()
        .map(|g| Some(interval(g.next_cron_interval)))
        .collect();
    let g_next = gtimes(|g| g.next_cron_time);
    let g_owner = gstrs(|g| &g.owner);
    let g_ext = gstrs(|g| &g.ext_data);
    let g_result = gstrs(|g| &g.result);
    let g_reason = gstrs(|g| &g.rollback_reason);
    // guarded updates
    let ustrs = |f: for<'x> fn(&'x Upd<'x>) -> &'x str| -> Vec<&str> {
        upds.iter().map(|u| f(u)).collect()
    };
    let uopt = |f: for<'x> fn(&'x Upd<'x>) -> Option<&'x str>| -> Vec<Option<&str>> {
        upds.iter().map(|u| f(u)).collect()
    };
    let utimes = |f: fn(&GlobalUpdate) -> Option<DateTime<Utc>>| -> Vec<Option<DateTime<Utc>>> {
        upds.iter().map(|u| trunc(f(u.set))).collect()
    };
    let u_gid = ustrs(|u| u.gid);
    let u_expect = ustrs(|u| u.expect_status);
    let u_owner_was = uopt(|u| u.expect_owner);
    let u_update = utimes(|s| Some(s.update_time));
    let u_status = uopt(|u| u.set.status.as_deref());
    let u_reason = uopt(|u| u.set.rollback_reason.as_deref());
    let u_result = uopt(|u| u.set.result.as_deref());
    let u_custom = uopt(|u| u.set.custom_data.as_deref());
    let u_owner = uopt(|u| u.set.owner.as_deref());
    let u_finish = utimes(|s| s.finish_time);
    let u_rollback = utimes(|s| s.rollback_time);
    let u_next = utimes(|s| s.next_cron_time);
    let u_interval: Vec<Option<i64>> = upds
        .iter()
        .map(|u| u.set.next_cron_interval.map(interval))
        .collect();
    // their branch rows (changed only where the guard held)
    let ubs: Vec<(&str, &BranchUpdate)> = upds
        .iter()
        .flat_map(|u| last_wins(u.branches).into_iter().map(move |b| (u.gid, b)))
        .collect();
    let ub_gid: Vec<&str> = ubs.iter().map(|(g, _)| *g).collect();
    let ub_branch: Vec<&str> = ubs.iter().map(|(_, b)| b.branch_id.as_str()).collect();
    let ub_op: Vec<&str> = ubs.iter().map(|(_, b)| b.op.as_str()).collect();
    let ub_status: Vec<&str> = ubs.iter().map(|(_, b)| b.status.as_str()).collect();
    let ub_t: Vec<Option<DateTime<Utc>>> = ubs.iter().map(|(_, b)| trunc(Some(b.time))).collect();

    let column = c.branch_column();
    // the new globals' branches: one list value each, or rows (inserted only where the
    // global was)
    let g_lists: Vec<Vec<u8>> = saves
        .iter()
        .filter(|_| column)
        .map(|s| branch_list::encode(s.branches))
        .collect();
    let g_branches: Vec<&[u8]> = g_lists.iter().map(Vec::as_slice).collect();
    let bs: Vec<&Branch> = saves
        .iter()
        .filter(|_| !column)
        .flat_map(|s| s.branches.iter())
        .collect();
    let bstrs = |f: fn(&Branch) -> &str| -> Vec<&str> { bs.iter().map(|b| f(b)).collect() };
    let btimes = |f: fn(&Branch) -> Option<DateTime<Utc>>| -> Vec<Option<DateTime<Utc>>> {
        bs.iter().map(|b| trunc(f(b))).collect()
    };
    let b_gid = bstrs(|b| &b.gid);
    let b_url = bstrs(|b| &b.url);
    let b_bin: Vec<&[u8]> = bs.iter().map(|b| b.bin_data.as_slice()).collect();
    let b_branch = bstrs(|b| &b.branch_id);
    let b_op = bstrs(|b| &b.op);
    let b_status = bstrs(|b| &b.status);
    let b_finish = btimes(|b| b.finish_time);
    let b_rollback = btimes(|b| b.rollback_time);
    let b_create = btimes(|b| b.create_time);
    let b_update = btimes(|b| b.update_time);
    // the updates' branch changes, as log lines appended to branch_states
    let u_logs: Vec<Option<String>> = upds
        .iter()
        .map(|u| (column && !u.branches.is_empty()).then(|| branch_list::state_log(u.branches)))
        .collect();
    let u_log: Vec<Option<&str>> = u_logs.iter().map(Option::as_deref).collect();

    let mut args = vec![
        Val::Strs(&g_gid),
        Val::Strs(&g_type),
        Val::Strs(&g_status),
        Val::Strs(&g_qp),
        Val::Strs(&g_protocol),
        Val::Times(&g_create),
        Val::Times(&g_update),
        Val::Times(&g_finish),
        Val::Times(&g_rollback),
        Val::Strs(&g_options),
        Val::Strs(&g_custom),
        Val::OptInts(&g_interval),
        Val::Times(&g_next),
        Val::Strs(&g_owner),
        Val::Strs(&g_ext),
        Val::Strs(&g_result),
        Val::Strs(&g_reason),
    ];
    if column {
        args.push(Val::Blobs(&g_branches));
    } else {
        args.extend([
            Val::Strs(&b_gid),
            Val::Strs(&b_url),
            Val::Blobs(&b_bin),
            Val::Strs(&b_branch),
            Val::Strs(&b_op),
            Val::Strs(&b_status),
            Val::Times(&b_finish),
            Val::Times(&b_rollback),
            Val::Times(&b_create),
            Val::Times(&b_update),
        ]);
    }
    args.extend([
        Val::Strs(&u_gid),
        Val::Strs(&u_expect),
        Val::OptStrs(&u_owner_was),
        Val::Times(&u_update),
        Val::OptStrs(&u_status),
        Val::OptStrs(&u_reason),
        Val::OptStrs(&u_result),
        Val::OptStrs(&u_custom),
        Val::OptStrs(&u_owner),
        Val::Times(&u_finish),
        Val::Times(&u_rollback),
        Val::Times(&u_next),
        Val::OptInts(&u_interval),
    ]);
    if column {
        args.push(Val::OptStrs(&u_log));
    }
    args.extend([
        Val::Strs(&ub_gid),
        Val::Strs(&ub_branch),
        Val::Strs(&ub_op),
        Val::Strs(&ub_status),
        Val::Times(&ub_t),
    ]);
    let sql = if column { PG_GROUP_COLUMN } else { PG_GROUP };
    let rows = c.texts(sql, &args).await?;
    let mut inserted: HashSet<&str> = HashSet::new();
    let mut changed: HashSet<&str> = HashSet::new();
    for r in &rows {
        if let Some(g) = r.strip_prefix('i') {
            inserted.insert(g);
        } else if let Some(g) = r.strip_prefix('u') {
            changed.insert(g);
        }
    }
    for s in saves {
        out[s.at] = Some(if inserted.contains(s.g.gid.as_str()) {
            Ok(WriteOutcome::Done)
        } else {
            Err(StoreError::UniqueConflict)
        });
    }
    for u in upds {
        out[u.at] = Some(if changed.contains(u.gid) {
            Ok(WriteOutcome::Done)
        } else {
            Err(StoreError::NotFound)
        });
    }
    Ok(())
}

// ------------------------------------------------------------------------------- MySQL

/// `n` rounded up to a power of two: IN and CASE lists are padded to it (repeating an
/// entry changes nothing), so few statement texts are prepared.
fn padded(n: usize) -> usize {
    n.max(1).next_power_of_two()
}

/// Sizes for multi-row INSERTs of `rows`: powers of two, at most `MYSQL_ROWS` rows and
/// about `MYSQL_BYTES` of values each (one row always fits).
fn insert_chunks<T>(rows: &[T], bytes: impl Fn(&T) -> usize) -> Vec<usize> {
    let mut sizes = Vec::new();
    let mut i = 0;
    while i < rows.len() {
        let rest = rows.len() - i;
        let mut k = MYSQL_ROWS.min(rest);
        k = 1 << (usize::BITS - 1 - k.leading_zeros()); // largest power of two <= k
        while k > 1 && rows[i..i + k].iter().map(&bytes).sum::<usize>() > MYSQL_BYTES {
            k /= 2;
        }
        sizes.push(k);
        i += k;
    }
    sizes
}

fn global_bytes(g: &TransGlobal) -> usize {
    64 + g.gid.len()
        + g.trans_type.len()
        + g.status.len()
        + g.query_prepared.len()
        + g.protocol.len()
        + g.options.len()
        + g.custom_data.len()
        + g.owner.len()
        + g.ext_data.len()
        + g.result.len()
        + g.rollback_reason.len()
}

fn branch_bytes(b: &Branch) -> usize {
    48 + b.gid.len() + b.url.len() + b.bin_data.len() + b.branch_id.len() + b.op.len()
}

/// Run the ops of `ats` (indices into `ops`) one by one: a row matched no op exactly.
async fn one_by_one(
    c: &mut dyn Exec,
    ats: impl Iterator<Item = usize>,
    ops: &[&WriteOp],
    out: &mut [Option<OpResult>],
) -> Result<(), DbError> {
    for at in ats {
        out[at] = Some(single(c, ops[at]).await?);
    }
    Ok(())
}

async fn my_save(
    c: &mut dyn Exec,
    saves: &[Save<'_>],
    ops: &[&WriteOp],
    out: &mut [Option<OpResult>],
) -> Result<(), DbError> {
    let d = Dialect::MySql;
    // which gids exist already (a duplicate-key error would cost the batch a rerun)
    let n = padded(saves.len());
    let sql = format!(
        "SELECT gid FROM trans_global WHERE gid IN ({})",
        ops::placeholders(n)
    );
    let args: Vec<Val> = (0..n)
        .map(|i| Val::Str(&saves[i.min(saves.len() - 1)].g.gid))
        .collect();
    let keys: HashSet<String> = saves.iter().map(|s| key_of(d, &s.g.gid)).collect();
    let mut exist = HashSet::new();
    for g in c.texts(&sql, &args).await? {
        let k = key_of(d, &g);
        if !keys.contains(&k) {
            return one_by_one(c, saves.iter().map(|s| s.at), ops, out).await;
        }
        exist.insert(k);
    }
    let mut new: Vec<&Save> = Vec::with_capacity(saves.len());
    for s in saves {
        if exist.contains(&key_of(d, &s.g.gid)) {
            out[s.at] = Some(Err(StoreError::UniqueConflict));
        } else {
            new.push(s);
        }
    }
    let mut i = 0;
    for k in insert_chunks(&new, |s| global_bytes(s.g)) {
        let mut sql = String::from(ops::GLOBAL_INSERT);
        let mut args = Vec::with_capacity(k * 17);
        for (j, s) in new[i..i + k].iter().enumerate() {
            sql.push_str(if j > 0 { ", " } else { " " });
            sql.push_str(ops::GLOBAL_ROW);
            args.extend(ops::global_values(s.g));
        }
        c.exec(&sql, &args).await?;
        i += k;
    }
    let bs: Vec<&Branch> = new.iter().flat_map(|s| s.branches).collect();
    let mut i = 0;
    for k in insert_chunks(&bs, |b| branch_bytes(b)) {
        let (sql, args) = ops::branch_insert(bs[i..i + k].iter().copied());
        c.exec(&sql, &args).await?;
        i += k;
    }
    for s in new {
        out[s.at] = Some(Ok(WriteOutcome::Done));
    }
    Ok(())
}

async fn my_update(
    c: &mut dyn Exec,
    upds: &[Upd<'_>],
    ops: &[&WriteOp],
    out: &mut [Option<OpResult>],
) -> Result<(), DbError> {
    let d = Dialect::MySql;
    // 1. find and lock the rows whose guards hold (the server compares, as op by op):
    //    one lookup by gid per op, so each is a unique-key lookup that locks that row
    //    only. (One `WHERE gid IN (..) AND (guards)` may be planned as a scan of the
    //    status index or of the table, locking rows of the other writer: deadlocks.)
    let n = padded(upds.len());
    let pick = |i: usize| &upds[i.min(upds.len() - 1)];
    let sql = vec![
        "(SELECT id, gid FROM trans_global WHERE gid = ? AND status = ? AND owner = COALESCE(?, owner) FOR UPDATE)";
        n
    ]
    .join(" UNION ALL ");
    let mut args: Vec<Val> = Vec::with_capacity(n * 3);
    for i in 0..n {
        let u = pick(i);
        args.extend([
            Val::Str(u.gid),
            Val::Str(u.expect_status),
            Val::OptStr(u.expect_owner),
        ]);
    }
    let rows = c.id_texts(&sql, &args).await?;
    let by_key: HashMap<String, usize> = upds
        .iter()
        .enumerate()
        .map(|(i, u)| (key_of(d, u.gid), i))
        .collect();
    let mut hit: Vec<(i64, &Upd)> = Vec::with_capacity(rows.len());
    let mut seen = HashSet::with_capacity(rows.len());
    for (id, g) in rows {
        match by_key.get(&key_of(d, &g)) {
            // the padding repeats a lookup
            Some(_) if !seen.insert(id) => {}
            Some(&i) => hit.push((id, &upds[i])),
            None => return one_by_one(c, upds.iter().map(|u| u.at), ops, out).await,
        }
    }
    for u in upds {
        out[u.at] = Some(Err(StoreError::NotFound));
    }
    if hit.is_empty() {
        return Ok(());
    }
    // 2. change them: one CASE on id per column, every row listed in each
    let n = padded(hit.len());
    let pick = |i: usize| hit[i.min(hit.len() - 1)];
    type Col = for<'x> fn(&'x GlobalUpdate) -> Val<'x>;
    let cols: [(&str, Col); 10] = [
        ("update_time", |s| time(s.update_time)),
        ("status", |s| opt_str(&s.status)),
        ("rollback_reason", |s| opt_str(&s.rollback_reason)),
        ("result", |s| opt_str(&s.result)),
        ("custom_data", |s| opt_str(&s.custom_data)),
        ("owner", |s| opt_str(&s.owner)),
        ("finish_time", |s| opt_time(s.finish_time)),
        ("rollback_time", |s| opt_time(s.rollback_time)),
        ("next_cron_time", |s| opt_time(s.next_cron_time)),
        ("next_cron_interval", |s| {
            Val::OptInt(s.next_cron_interval.map(interval))
        }),
    ];
    let arms = vec!["WHEN ? THEN COALESCE(?, {c})"; n].join(" ");
    let sets: Vec<String> = cols
        .iter()
        .map(|(name, _)| {
            format!(
                "{name} = CASE id {} ELSE {name} END",
                arms.replace("{c}", name)
            )
        })
        .collect();
    let sql = format!(
        "UPDATE trans_global SET {} WHERE id IN ({})",
        sets.join(", "),
        ops::placeholders(n)
    );
    let mut args: Vec<Val> = Vec::with_capacity(n * 21);
    for (_, col) in &cols {
        for i in 0..n {
            let (id, u) = pick(i);
            args.push(Val::Int(id));
            args.push(col(u.set));
        }
    }
    args.extend((0..n).map(|i| Val::Int(pick(i).0)));
    c.exec(&sql, &args).await?;
    for (_, u) in &hit {
        out[u.at] = Some(Ok(WriteOutcome::Done));
    }
    // 3. their branches: one CASE per column over (gid, branch_id, op), the last update
    //    of a row first (CASE takes the first match; as op by op, the last one wins)
    let mut bs: Vec<(&str, &BranchUpdate)> = Vec::new();
    for (_, u) in &hit {
        bs.extend(u.branches.iter().map(|b| (u.gid, b)));
    }
    for chunk in bs.chunks(MYSQL_BRANCH_UPDATES) {
        let n = padded(chunk.len());
        // reversed, then padded with copies of the (now last) first update
        let pick = |i: usize| chunk[chunk.len() - 1 - i.min(chunk.len() - 1)];
        const KEY: &str = "gid = ? AND branch_id = ? AND op = ?";
        let arms = vec![format!("WHEN {KEY} THEN ?"); n].join(" ");
        let sql = format!(
            "UPDATE trans_branch_op SET status = CASE {arms} ELSE status END, finish_time = CASE {arms} ELSE finish_time END, update_time = CASE {arms} ELSE update_time END WHERE {}",
            vec![format!("({KEY})"); n].join(" OR ")
        );
        let mut args: Vec<Val> = Vec::with_capacity(n * 15);
        for col in 0..3 {
            for i in 0..n {
                let (gid, b) = pick(i);
                args.extend([Val::Str(gid), Val::Str(&b.branch_id), Val::Str(&b.op)]);
                args.push(if col == 0 {
                    Val::Str(&b.status)
                } else {
                    time(b.time)
                });
            }
        }
        for i in 0..n {
            let (gid, b) = pick(i);
            args.extend([Val::Str(gid), Val::Str(&b.branch_id), Val::Str(&b.op)]);
        }
        c.exec(&sql, &args).await?;
    }
    Ok(())
}

fn opt_str(s: &Option<String>) -> Val<'_> {
    Val::OptStr(s.as_deref())
}
