//! The SQL of the store, shared by Postgres and MySQL: schema, migrations, every write
//! op and every read. Where the dialects differ, the statement is picked by
//! [`Exec::dialect`].

use chrono::{DateTime, Utc};
use dtm_core::store::{BranchUpdate, GlobalUpdate, Kv, ScanQuery, WriteOp, WriteOutcome};
use dtm_proto::{Branch, TransGlobal};

use super::exec::{DbError, Dialect, Exec, Val, opt_time, time};
use crate::branch_list;

pub(crate) const GLOBAL_COLS: &str = "id, gid, trans_type, status, query_prepared, protocol, create_time, update_time, finish_time, rollback_time, options, custom_data, next_cron_interval, next_cron_time, owner, ext_data, result, rollback_reason";
const BRANCH_COLS: &str = "id, gid, url, bin_data, branch_id, op, status, finish_time, rollback_time, create_time, update_time";
const KV_COLS: &str = "id, cat, k, v, version, create_time, update_time";
// The Postgres claim (ClaimDue) lists the same three statuses as rows of a VALUES list.
const UNFINISHED: &str = "status IN ('prepared', 'submitted', 'aborting')";
const FINISHED: &str = "status IN ('succeed', 'failed')";

/// Tables as dtm defines them (same names, columns and keys, so that a database written by
/// dtm can be taken over), with times at millisecond precision. Postgres adds two columns
/// to trans_global in place (see [`upgrade`]).
const PG_SCHEMA: &[(&str, &[&str])] = &[
    (
        "trans_global",
        &[
            "CREATE TABLE IF NOT EXISTS trans_global (
  id bigserial PRIMARY KEY,
  gid varchar(128) NOT NULL,
  trans_type varchar(45) NOT NULL,
  status varchar(45) NOT NULL,
  query_prepared varchar(1024) NOT NULL,
  protocol varchar(45) NOT NULL,
  create_time timestamp(3) with time zone DEFAULT NULL,
  update_time timestamp(3) with time zone DEFAULT NULL,
  finish_time timestamp(3) with time zone DEFAULT NULL,
  rollback_time timestamp(3) with time zone DEFAULT NULL,
  options varchar(1024) DEFAULT '',
  custom_data varchar(1024) DEFAULT '',
  next_cron_interval int DEFAULT NULL,
  next_cron_time timestamp(3) with time zone DEFAULT NULL,
  owner varchar(128) NOT NULL DEFAULT '',
  ext_data text,
  result varchar(1024) DEFAULT '',
  rollback_reason varchar(1024) DEFAULT '',
  CONSTRAINT gid UNIQUE (gid)
)",
            "CREATE INDEX IF NOT EXISTS owner ON trans_global (owner)",
            "CREATE INDEX IF NOT EXISTS status_next_cron_time ON trans_global (status, next_cron_time)",
        ],
    ),
    (
        "trans_branch_op",
        &["CREATE TABLE IF NOT EXISTS trans_branch_op (
  id bigserial PRIMARY KEY,
  gid varchar(128) NOT NULL,
  url varchar(1024) NOT NULL,
  data text,
  bin_data bytea,
  branch_id varchar(128) NOT NULL,
  op varchar(45) NOT NULL,
  status varchar(45) NOT NULL,
  finish_time timestamp(3) with time zone DEFAULT NULL,
  rollback_time timestamp(3) with time zone DEFAULT NULL,
  create_time timestamp(3) with time zone DEFAULT NULL,
  update_time timestamp(3) with time zone DEFAULT NULL,
  CONSTRAINT gid_branch_uniq UNIQUE (gid, branch_id, op)
)"],
    ),
    (
        "kv",
        &["CREATE TABLE IF NOT EXISTS kv (
  id bigserial PRIMARY KEY,
  cat varchar(45) NOT NULL,
  k varchar(128) NOT NULL,
  v text,
  version bigint DEFAULT 1,
  create_time timestamp(3) with time zone DEFAULT NULL,
  update_time timestamp(3) with time zone DEFAULT NULL,
  CONSTRAINT uniq_k UNIQUE (cat, k)
)"],
    ),
];

const MYSQL_SCHEMA: &[(&str, &[&str])] = &[
    (
        "trans_global",
        &["CREATE TABLE IF NOT EXISTS trans_global (
  id bigint NOT NULL AUTO_INCREMENT,
  gid varchar(128) NOT NULL,
  trans_type varchar(45) NOT NULL,
  status varchar(12) NOT NULL,
  query_prepared varchar(1024) NOT NULL,
  protocol varchar(45) NOT NULL,
  create_time datetime(3) DEFAULT NULL,
  update_time datetime(3) DEFAULT NULL,
  finish_time datetime(3) DEFAULT NULL,
  rollback_time datetime(3) DEFAULT NULL,
  options varchar(1024) DEFAULT '',
  custom_data varchar(1024) DEFAULT '',
  next_cron_interval int DEFAULT NULL,
  next_cron_time datetime(3) DEFAULT NULL,
  owner varchar(128) NOT NULL DEFAULT '',
  ext_data text,
  result varchar(1024) DEFAULT '',
  rollback_reason varchar(1024) DEFAULT '',
  PRIMARY KEY (id),
  UNIQUE KEY gid (gid),
  KEY owner (owner),
  KEY status_next_cron_time (status, next_cron_time)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"],
    ),
    (
        "trans_branch_op",
        &["CREATE TABLE IF NOT EXISTS trans_branch_op (
  id bigint NOT NULL AUTO_INCREMENT,
  gid varchar(128) NOT NULL,
  url varchar(1024) NOT NULL,
  data text,
  bin_data blob,
  branch_id varchar(128) NOT NULL,
  op varchar(45) NOT NULL,
  status varchar(45) NOT NULL,
  finish_time datetime(3) DEFAULT NULL,
  rollback_time datetime(3) DEFAULT NULL,
  create_time datetime(3) DEFAULT NULL,
  update_time datetime(3) DEFAULT NULL,
  PRIMARY KEY (id),
  UNIQUE KEY gid_uniq (gid, branch_id, op)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"],
    ),
    (
        "kv",
        &["CREATE TABLE IF NOT EXISTS kv (
  id bigint NOT NULL AUTO_INCREMENT,
  cat varchar(45) NOT NULL,
  k varchar(128) NOT NULL,
  v text,
  version bigint DEFAULT 1,
  create_time datetime(3) DEFAULT NULL,
  update_time datetime(3) DEFAULT NULL,
  PRIMARY KEY (id),
  UNIQUE KEY uniq_k (cat, k)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"],
    ),
];

const TABLES: &[&str] = &["trans_global", "trans_branch_op", "kv"];

/// What a migration did, for the log.
#[derive(Debug, Default)]
pub(crate) struct Migration {
    pub done: Vec<String>,
    /// Upgrades that could not be made (say the user may not ALTER dtm's tables); the
    /// store works without them.
    pub warnings: Vec<String>,
    /// The tables have `trans_global.branches` and `branch_states` (Postgres, see
    /// [`upgrade`]): new transactions keep their branches there.
    pub branch_column: bool,
}

/// Create the tables when missing and bring existing ones (dtm's, or an older dtm-rs's)
/// up to date. Idempotent; serialised between processes by a lock, so that several
/// servers may start at once. Existing tables get no DDL beyond the upgrades, so a user
/// with data rights only can run on tables someone else created.
pub(crate) async fn migrate(c: &mut dyn Exec) -> Result<Migration, DbError> {
    let d = c.dialect();
    let mut done = Migration::default();
    // Postgres: DDL is transactional and `c` is a transaction; the lock ends with it.
    // MySQL: DDL commits by itself; a named lock guards the section.
    match d {
        Dialect::Postgres => {
            c.exec(
                "SELECT pg_advisory_xact_lock(hashtext('dtm-rs migrate ' || current_schema()))",
                &[],
            )
            .await?;
        }
        Dialect::MySql => {
            c.exec("SELECT GET_LOCK(CONCAT('dtm-rs-', DATABASE()), 60)", &[])
                .await?;
        }
    }
    let r = migrate_locked(c, d, &mut done).await;
    if r.is_ok() && d == Dialect::Postgres {
        done.branch_column = has_branch_column(c).await?;
    }
    if d == Dialect::MySql {
        let _ = c
            .exec("SELECT RELEASE_LOCK(CONCAT('dtm-rs-', DATABASE()))", &[])
            .await;
    }
    r.map(|()| done)
}

async fn migrate_locked(c: &mut dyn Exec, d: Dialect, m: &mut Migration) -> Result<(), DbError> {
    let schema = match d {
        Dialect::Postgres => PG_SCHEMA,
        Dialect::MySql => MYSQL_SCHEMA,
    };
    for (table, stmts) in schema {
        if table_exists(c, d, table).await? {
            continue;
        }
        for stmt in *stmts {
            c.exec(stmt, &[]).await?;
        }
        m.done.push(format!("created table {table}"));
    }
    // Postgres: a failed statement would abort the whole transaction; a savepoint keeps
    // the tables created above when an upgrade is refused.
    if d == Dialect::Postgres {
        c.exec("SAVEPOINT dtm_upgrade", &[]).await?;
    }
    let before = m.done.len();
    match upgrade(c, d, &mut m.done).await {
        Ok(()) => {
            if d == Dialect::Postgres {
                c.exec("RELEASE SAVEPOINT dtm_upgrade", &[]).await?;
            }
        }
        Err(e) => {
            if d == Dialect::Postgres {
                c.exec("ROLLBACK TO SAVEPOINT dtm_upgrade", &[]).await?;
            }
            m.done.truncate(before);
            m.warnings.push(format!(
                "could not upgrade the tables ({e}); running on them as they are (which may mean times to the second, no index for the retention cleanup, and every branch as a row of trans_branch_op). Run `dtm migrate` as a user who may ALTER them"
            ));
        }
    }
    Ok(())
}

/// In-place upgrades of existing tables. Each step checks first, so a second run does
/// nothing.
async fn upgrade(c: &mut dyn Exec, d: Dialect, done: &mut Vec<String>) -> Result<(), DbError> {
    // Migration 1: dtm creates its time columns with second precision; the engine
    // compares next_cron_time and create_time, so keep milliseconds. Widening the
    // precision keeps every stored value and dtm reads the columns as before.
    for table in TABLES {
        let cols = match d {
            Dialect::Postgres => {
                c.texts(
                    "SELECT column_name::text FROM information_schema.columns WHERE table_schema = current_schema() AND table_name = ? AND data_type = 'timestamp with time zone' AND datetime_precision < 3",
                    &[Val::Str(table)],
                )
                .await?
            }
            Dialect::MySql => {
                c.texts(
                    "SELECT CAST(COLUMN_NAME AS CHAR) FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? AND DATA_TYPE = 'datetime' AND DATETIME_PRECISION < 3",
                    &[Val::Str(table)],
                )
                .await?
            }
        };
        if cols.is_empty() {
            continue;
        }
        let alters: Vec<String> = cols
            .iter()
            .map(|col| match d {
                Dialect::Postgres => {
                    format!("ALTER COLUMN {col} TYPE timestamp(3) with time zone")
                }
                Dialect::MySql => format!("MODIFY {col} datetime(3) NULL DEFAULT NULL"),
            })
            .collect();
        c.exec(&format!("ALTER TABLE {table} {}", alters.join(", ")), &[])
            .await?;
        done.push(format!(
            "{table}: {} to millisecond precision",
            cols.join(", ")
        ));
    }
    // Migration 2: an index for the retention cleanup (finished transactions by age).
    match d {
        Dialect::Postgres => {
            let have = c
                .texts(
                    "SELECT indexname::text FROM pg_indexes WHERE schemaname = current_schema() AND indexname = 'finished_update_time'",
                    &[],
                )
                .await?;
            if have.is_empty() {
                c.exec(
                    &format!("CREATE INDEX IF NOT EXISTS finished_update_time ON trans_global (update_time) WHERE {FINISHED}"),
                    &[],
                )
                .await?;
                done.push("trans_global: index finished_update_time".into());
            }
        }
        Dialect::MySql => {
            let have = c
                .texts(
                    "SELECT CAST(INDEX_NAME AS CHAR) FROM information_schema.STATISTICS WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'trans_global' AND INDEX_NAME = 'status_update_time'",
                    &[],
                )
                .await?;
            if have.is_empty() {
                c.exec(
                    "ALTER TABLE trans_global ADD INDEX status_update_time (status, update_time)",
                    &[],
                )
                .await?;
                done.push("trans_global: index status_update_time".into());
            }
        }
    }
    // Migration 3 (Postgres): a new transaction's branches in one column of its row, and
    // their changes appended to a log beside it (`crate::branch_list`), instead of a row
    // per branch in trans_branch_op. Rows written before, by dtm or by an older dtm-rs,
    // stay where they are and are read as before.
    if d == Dialect::Postgres && !has_branch_column(c).await? {
        c.exec(
            "ALTER TABLE trans_global ADD COLUMN IF NOT EXISTS branches bytea, ADD COLUMN IF NOT EXISTS branch_states text",
            &[],
        )
        .await?;
        done.push("trans_global: columns branches, branch_states".into());
    }
    Ok(())
}

/// Whether trans_global has the branch columns of migration 3 (Postgres).
async fn has_branch_column(c: &mut dyn Exec) -> Result<bool, DbError> {
    let n = c
        .texts(
            "SELECT count(*) FROM information_schema.columns WHERE table_schema = current_schema() AND table_name = 'trans_global' AND column_name IN ('branches', 'branch_states')",
            &[],
        )
        .await?;
    Ok(n.first().map(String::as_str) == Some("2"))
}

async fn table_exists(c: &mut dyn Exec, d: Dialect, table: &str) -> Result<bool, DbError> {
    let sql = match d {
        Dialect::Postgres => {
            "SELECT table_name::text FROM information_schema.tables WHERE table_schema = current_schema() AND table_name = ?"
        }
        Dialect::MySql => {
            "SELECT CAST(TABLE_NAME AS CHAR) FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ?"
        }
    };
    Ok(!c.texts(sql, &[Val::Str(table)]).await?.is_empty())
}

/// Why one op did not apply.
pub(crate) enum OpError {
    /// A guard or key check failed (NotFound / UniqueConflict); nothing was changed.
    Logical(dtm_core::StoreError),
    Db(DbError),
}

impl From<DbError> for OpError {
    fn from(e: DbError) -> Self {
        OpError::Db(e)
    }
}

/// Rows per multi-row INSERT (10 values each, well under both servers' limits).
const INSERT_CHUNK: usize = 500;

/// The head of an INSERT of trans_global rows, and one row's placeholders.
/// The columns of a new trans_global row, in [`global_values`] order (a macro, so that
/// statement texts can be `concat!`ed from it).
macro_rules! global_cols {
    () => {
        "gid, trans_type, status, query_prepared, protocol, create_time, update_time, finish_time, rollback_time, options, custom_data, next_cron_interval, next_cron_time, owner, ext_data, result, rollback_reason"
    };
}
pub(crate) use global_cols;

pub(crate) const GLOBAL_INSERT: &str =
    concat!("INSERT INTO trans_global (", global_cols!(), ") VALUES");
pub(crate) const GLOBAL_ROW: &str = "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)";
/// A trans_global row with its branch list (Postgres, [`Exec::branch_column`]).
const GLOBAL_INSERT_WITH_BRANCHES: &str = concat!(
    "INSERT INTO trans_global (",
    global_cols!(),
    ", branches) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (gid) DO NOTHING"
);

/// The arguments of one trans_global row, in `GLOBAL_INSERT`'s column order.
pub(crate) fn global_values(g: &TransGlobal) -> [Val<'_>; 17] {
    [
        Val::Str(&g.gid),
        Val::Str(&g.trans_type),
        Val::Str(&g.status),
        Val::Str(&g.query_prepared),
        Val::Str(&g.protocol),
        opt_time(g.create_time),
        opt_time(g.update_time),
        opt_time(g.finish_time),
        opt_time(g.rollback_time),
        Val::Str(&g.options),
        Val::Str(&g.custom_data),
        Val::Int(g.next_cron_interval.clamp(i32::MIN as i64, i32::MAX as i64)),
        opt_time(g.next_cron_time),
        Val::Str(&g.owner),
        Val::Str(&g.ext_data),
        Val::Str(&g.result),
        Val::Str(&g.rollback_reason),
    ]
}

/// One multi-row INSERT of `rows` into trans_branch_op, and its arguments.
pub(crate) fn branch_insert<'a>(
    rows: impl ExactSizeIterator<Item = &'a Branch>,
) -> (String, Vec<Val<'a>>) {
    let mut sql = String::from(
        "INSERT INTO trans_branch_op (gid, url, bin_data, branch_id, op, status, finish_time, rollback_time, create_time, update_time) VALUES ",
    );
    let mut args = Vec::with_capacity(rows.len() * 10);
    for (i, b) in rows.enumerate() {
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push_str("(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)");
        args.extend([
            Val::Str(&b.gid),
            Val::Str(&b.url),
            Val::Bytes(&b.bin_data),
            Val::Str(&b.branch_id),
            Val::Str(&b.op),
            Val::Str(&b.status),
            opt_time(b.finish_time),
            opt_time(b.rollback_time),
            opt_time(b.create_time),
            opt_time(b.update_time),
        ]);
    }
    (sql, args)
}

async fn insert_branches(c: &mut dyn Exec, branches: &[Branch]) -> Result<(), DbError> {
    for chunk in branches.chunks(INSERT_CHUNK) {
        let (sql, args) = branch_insert(chunk.iter());
        c.exec(&sql, &args).await?;
    }
    Ok(())
}

async fn update_branches(c: &mut dyn Exec, gid: &str, ups: &[BranchUpdate]) -> Result<(), DbError> {
    for u in ups {
        c.exec(
            "UPDATE trans_branch_op SET status = ?, finish_time = ?, update_time = ? WHERE gid = ? AND branch_id = ? AND op = ?",
            &[
                Val::Str(&u.status),
                time(u.time),
                time(u.time),
                Val::Str(gid),
                Val::Str(&u.branch_id),
                Val::Str(&u.op),
            ],
        )
        .await?;
    }
    Ok(())
}

fn update_sql<'a>(u: &'a GlobalUpdate, args: &mut Vec<Val<'a>>) -> String {
    let mut cols = vec!["update_time = ?"];
    args.push(time(u.update_time));
    for (name, v) in [
        ("status = ?", &u.status),
        ("rollback_reason = ?", &u.rollback_reason),
        ("result = ?", &u.result),
        ("custom_data = ?", &u.custom_data),
        ("owner = ?", &u.owner),
    ] {
        if let Some(v) = v {
            cols.push(name);
            args.push(Val::Str(v));
        }
    }
    for (name, t) in [
        ("finish_time = ?", &u.finish_time),
        ("rollback_time = ?", &u.rollback_time),
        ("next_cron_time = ?", &u.next_cron_time),
    ] {
        if let Some(t) = t {
            cols.push(name);
            args.push(time(*t));
        }
    }
    if let Some(i) = u.next_cron_interval {
        cols.push("next_cron_interval = ?");
        args.push(Val::Int(i.clamp(i32::MIN as i64, i32::MAX as i64)));
    }
    cols.join(", ")
}

pub(crate) fn placeholders(n: usize) -> String {
    vec!["?"; n].join(", ")
}

async fn exists(c: &mut dyn Exec, sql: &str, args: &[Val<'_>]) -> Result<bool, DbError> {
    Ok(!c.texts(sql, args).await?.is_empty())
}

/// Apply one op inside the batch transaction. A logical failure (`OpError::Logical`)
/// always happens at the op's first change and changes nothing, so the transaction goes
/// on without a savepoint; a database error may leave part of the op applied, and the
/// batch runner then reruns the batch without it.
pub(crate) async fn apply(c: &mut dyn Exec, op: &WriteOp) -> Result<WriteOutcome, OpError> {
    use dtm_core::StoreError::{NotFound, UniqueConflict};
    let d = c.dialect();
    match op {
        WriteOp::SaveNew {
            global: g,
            branches,
        } => {
            if c.branch_column() {
                let list = branch_list::encode(branches);
                let mut args = global_values(g).to_vec();
                args.push(Val::Bytes(&list));
                let n = c.exec(GLOBAL_INSERT_WITH_BRANCHES, &args).await?;
                if n == 0 {
                    return Err(OpError::Logical(UniqueConflict));
                }
                return Ok(WriteOutcome::Done);
            }
            let mut sql = format!("{GLOBAL_INSERT} {GLOBAL_ROW}");
            match d {
                Dialect::Postgres => sql.push_str(" ON CONFLICT (gid) DO NOTHING"),
                // No ON CONFLICT DO NOTHING in MySQL (INSERT IGNORE would also hide bad
                // data), and a duplicate-key error would cost the batch a rerun: look first.
                // Two servers inserting one gid at once still end in a duplicate-key error,
                // which the batch runner turns into UniqueConflict.
                Dialect::MySql => {
                    if exists(
                        c,
                        "SELECT id FROM trans_global WHERE gid = ?",
                        &[Val::Str(&g.gid)],
                    )
                    .await?
                    {
                        return Err(OpError::Logical(UniqueConflict));
                    }
                }
            }
            let n = c.exec(&sql, &global_values(g)).await?;
            if n == 0 {
                return Err(OpError::Logical(UniqueConflict));
            }
            insert_branches(c, branches).await?;
            Ok(WriteOutcome::Done)
        }
        WriteOp::AddBranches {
            gid,
            expect_status,
            branches,
        } => {
            // A conditional update instead of SELECT ... FOR UPDATE: it checks the status
            // and holds the row until commit, so the status cannot change in between.
            let now = branches
                .first()
                .and_then(|b| b.update_time.or(b.create_time))
                .unwrap_or_else(Utc::now);
            let touch = |unlisted: bool| {
                let mut sql = String::from(
                    "UPDATE trans_global SET update_time = ? WHERE gid = ? AND status = ?",
                );
                if unlisted {
                    sql.push_str(" AND octet_length(COALESCE(branches, ''::bytea)) <= 1");
                }
                sql
            };
            let args = [time(now), Val::Str(gid), Val::Str(expect_status)];
            // Saved without branches (tcc, xa, workflow: the usual case), it has no list a
            // new branch could repeat, and the guarded update alone decides.
            let touched = c.branch_column() && c.exec(&touch(true), &args).await? == 1;
            if !touched && c.branch_column() {
                // the branches it was saved with are not rows: no unique key sees them
                let saved = c
                    .branch_list(
                        "SELECT branches, branch_states FROM trans_global WHERE gid = ? AND status = ? FOR UPDATE",
                        &args[1..],
                    )
                    .await?;
                let Some((list, _)) = saved else {
                    return Err(OpError::Logical(NotFound));
                };
                let saved = branch_list::decode(list.as_deref())
                    .map_err(|e| OpError::Db(damaged(gid, e)))?;
                if branches.iter().any(|b| {
                    saved
                        .iter()
                        .any(|x| x.branch_id == b.branch_id && x.op == b.op)
                }) {
                    return Err(OpError::Logical(UniqueConflict));
                }
            }
            if !touched && c.exec(&touch(false), &args).await? == 0 {
                return Err(OpError::Logical(NotFound));
            }
            insert_branches(c, branches).await?;
            Ok(WriteOutcome::Done)
        }
        WriteOp::UpdateGlobal {
            gid,
            expect_status,
            expect_owner,
            set,
            branches,
        } => {
            let mut args = Vec::with_capacity(17);
            let mut cols = update_sql(set, &mut args);
            let log = (c.branch_column() && !branches.is_empty())
                .then(|| branch_list::state_log(branches));
            if let Some(log) = &log {
                // only a transaction saved with branches has any the log could change
                cols.push_str(", branch_states = CASE WHEN octet_length(COALESCE(branches, ''::bytea)) <= 1 THEN branch_states ELSE COALESCE(branch_states, '') || ? END");
                args.push(Val::Str(log));
            }
            let mut sql = format!("UPDATE trans_global SET {cols} WHERE gid = ? AND status = ?");
            args.push(Val::Str(gid));
            args.push(Val::Str(expect_status));
            if let Some(o) = expect_owner {
                sql.push_str(" AND owner = ?");
                args.push(Val::Str(o));
            }
            if c.exec(&sql, &args).await? == 0 {
                return Err(OpError::Logical(NotFound));
            }
            update_branches(c, gid, branches).await?;
            Ok(WriteOutcome::Done)
        }
        WriteOp::ResetNextCronTime { gid, now } => {
            let n = c
                .exec(
                    "UPDATE trans_global SET next_cron_time = ?, update_time = ? WHERE gid = ?",
                    &[time(*now), time(*now), Val::Str(gid)],
                )
                .await?;
            if n == 0 {
                return Err(OpError::Logical(NotFound));
            }
            Ok(WriteOutcome::Done)
        }
        WriteOp::ClaimDue {
            now,
            limit,
            lease_until,
            owner,
        } => {
            let limit = (*limit).min(10_000) as i64;
            match d {
                Dialect::Postgres => {
                    // The oldest due rows of each unfinished status, read in index order
                    // (status, next_cron_time), then the oldest of those. One ORDER BY over
                    // `status IN (...)` instead cannot stop early: under FOR UPDATE it
                    // sorts every due row, which with 100,000 due spilled to disk and took
                    // 50 ms a claim.
                    let sql = format!(
                        "UPDATE trans_global SET owner = ?, next_cron_time = ?, update_time = ? WHERE id IN (SELECT d.id FROM (VALUES ('prepared'), ('submitted'), ('aborting')) AS s (st), LATERAL (SELECT id, next_cron_time FROM trans_global WHERE status = s.st AND next_cron_time <= ? ORDER BY next_cron_time LIMIT ? FOR UPDATE SKIP LOCKED) d ORDER BY d.next_cron_time LIMIT ?) RETURNING {GLOBAL_COLS}"
                    );
                    let rows = c
                        .globals(
                            &sql,
                            &[
                                Val::Str(owner),
                                time(*lease_until),
                                time(*now),
                                time(*now),
                                Val::Int(limit),
                                Val::Int(limit),
                            ],
                        )
                        .await?;
                    Ok(WriteOutcome::Claimed(rows))
                }
                Dialect::MySql => {
                    // No UPDATE ... RETURNING: lock the due rows, then lease them. No ORDER
                    // BY: sorting the due rows of three status ranges would read and lock
                    // every due row; the index gives them in (status, time) order instead.
                    let sql = format!(
                        "SELECT {GLOBAL_COLS} FROM trans_global WHERE {UNFINISHED} AND next_cron_time <= ? LIMIT ? FOR UPDATE SKIP LOCKED"
                    );
                    let mut rows = c.globals(&sql, &[time(*now), Val::Int(limit)]).await?;
                    if rows.is_empty() {
                        return Ok(WriteOutcome::Claimed(rows));
                    }
                    let sql = format!(
                        "UPDATE trans_global SET owner = ?, next_cron_time = ?, update_time = ? WHERE id IN ({})",
                        placeholders(rows.len())
                    );
                    let mut args = vec![Val::Str(owner), time(*lease_until), time(*now)];
                    args.extend(rows.iter().map(|r| Val::Int(r.id)));
                    c.exec(&sql, &args).await?;
                    let lease = Some(lease_until.trunc_ms());
                    let at = Some(now.trunc_ms());
                    for r in &mut rows {
                        r.owner = owner.clone();
                        r.next_cron_time = lease;
                        r.update_time = at;
                    }
                    Ok(WriteOutcome::Claimed(rows))
                }
            }
        }
        WriteOp::ResetCronTime { after, now, limit } => {
            let limit = (*limit).min(1_000_000) as i64;
            let sql = match d {
                Dialect::Postgres => format!(
                    "UPDATE trans_global SET next_cron_time = ?, update_time = ? WHERE id IN (SELECT id FROM trans_global WHERE {UNFINISHED} AND next_cron_time > ? LIMIT ?)"
                ),
                Dialect::MySql => format!(
                    "UPDATE trans_global SET next_cron_time = ?, update_time = ? WHERE {UNFINISHED} AND next_cron_time > ? LIMIT ?"
                ),
            };
            let count = c
                .exec(
                    &sql,
                    &[time(*now), time(*now), time(*after), Val::Int(limit)],
                )
                .await? as i64;
            let more = c
                .texts(
                    &format!(
                        "SELECT id FROM trans_global WHERE {UNFINISHED} AND next_cron_time > ? LIMIT 1"
                    ),
                    &[time(*after)],
                )
                .await?;
            Ok(WriteOutcome::Reset {
                count,
                has_remaining: !more.is_empty(),
            })
        }
        WriteOp::CreateKv { cat, k, v, now } => {
            let mut sql = String::from(
                "INSERT INTO kv (cat, k, v, version, create_time, update_time) VALUES (?, ?, ?, 1, ?, ?)",
            );
            match d {
                Dialect::Postgres => sql.push_str(" ON CONFLICT (cat, k) DO NOTHING"),
                Dialect::MySql => {
                    if exists(
                        c,
                        "SELECT id FROM kv WHERE cat = ? AND k = ?",
                        &[Val::Str(cat), Val::Str(k)],
                    )
                    .await?
                    {
                        return Err(OpError::Logical(UniqueConflict));
                    }
                }
            }
            let n = c
                .exec(
                    &sql,
                    &[
                        Val::Str(cat),
                        Val::Str(k),
                        Val::Str(v),
                        time(*now),
                        time(*now),
                    ],
                )
                .await?;
            if n == 0 {
                return Err(OpError::Logical(UniqueConflict));
            }
            Ok(WriteOutcome::Done)
        }
        WriteOp::UpdateKv {
            cat,
            k,
            v,
            version,
            now,
        } => {
            let n = c
                .exec(
                    "UPDATE kv SET v = ?, version = version + 1, update_time = ? WHERE cat = ? AND k = ? AND version = ?",
                    &[
                        Val::Str(v),
                        time(*now),
                        Val::Str(cat),
                        Val::Str(k),
                        Val::Int(*version),
                    ],
                )
                .await?;
            if n == 0 {
                return Err(OpError::Logical(NotFound));
            }
            Ok(WriteOutcome::Done)
        }
        WriteOp::DeleteKv { cat, k } => {
            let n = c
                .exec(
                    "DELETE FROM kv WHERE cat = ? AND k = ?",
                    &[Val::Str(cat), Val::Str(k)],
                )
                .await?;
            if n == 0 {
                return Err(OpError::Logical(NotFound));
            }
            Ok(WriteOutcome::Done)
        }
    }
}

trait TruncMs {
    fn trunc_ms(&self) -> DateTime<Utc>;
}

impl TruncMs for DateTime<Utc> {
    fn trunc_ms(&self) -> DateTime<Utc> {
        chrono::SubsecRound::trunc_subsecs(*self, 3)
    }
}

pub(crate) async fn find_global(
    c: &mut dyn Exec,
    gid: &str,
) -> Result<Option<TransGlobal>, DbError> {
    let sql = format!("SELECT {GLOBAL_COLS} FROM trans_global WHERE gid = ?");
    Ok(c.globals(&sql, &[Val::Str(gid)]).await?.into_iter().next())
}

/// A transaction's branches: those it was saved with (in `trans_global.branches`, with
/// the changes of `branch_states` applied), then its rows of trans_branch_op in insertion
/// order. The flag is true when a saved list was found by a connection that did not know
/// the columns were there (another server added them after this one started): from then
/// on this server must write them too.
pub(crate) async fn find_branches(
    c: &mut dyn Exec,
    gid: &str,
) -> Result<(Vec<Branch>, bool), DbError> {
    let mut out = Vec::new();
    let mut found_unknown = false;
    // Without the columns known, a query that works whether or not they exist: a row as
    // JSON has them when the table does (bytea as `\x` and hex).
    let sql = if c.branch_column() {
        "SELECT branches, branch_states FROM trans_global WHERE gid = ?"
    } else {
        "SELECT decode(substr(to_jsonb(g) ->> 'branches', 3), 'hex'), to_jsonb(g) ->> 'branch_states' FROM trans_global g WHERE gid = ?"
    };
    if c.dialect() == Dialect::Postgres
        && let Some((list, log)) = c.branch_list(sql, &[Val::Str(gid)]).await?
    {
        found_unknown = !c.branch_column() && list.as_ref().is_some_and(|l| l.len() > 1);
        out = branch_list::decode(list.as_deref()).map_err(|e| damaged(gid, e))?;
        if let Some(log) = log {
            branch_list::apply_state_log(&mut out, &log).map_err(|e| damaged(gid, e))?;
        }
        for b in &mut out {
            b.gid = gid.to_string();
        }
    }
    let sql = format!("SELECT {BRANCH_COLS} FROM trans_branch_op WHERE gid = ? ORDER BY id");
    out.extend(c.branches(&sql, &[Val::Str(gid)]).await?);
    Ok((out, found_unknown))
}

/// The error for a branch list that cannot be read.
fn damaged(gid: &str, e: String) -> DbError {
    DbError::Decode(format!("the stored branches of transaction {gid} cannot be read: {e}").into())
}

pub(crate) async fn scan_globals(
    c: &mut dyn Exec,
    q: &ScanQuery,
) -> Result<(Vec<TransGlobal>, String), DbError> {
    let mut sql = format!("SELECT {GLOBAL_COLS} FROM trans_global WHERE id < ?");
    let pos = q.position.parse::<i64>().unwrap_or(i64::MAX);
    let mut args = vec![Val::Int(pos)];
    if !q.status.is_empty() {
        sql.push_str(" AND status = ?");
        args.push(Val::Str(&q.status));
    }
    if !q.trans_type.is_empty() {
        sql.push_str(" AND trans_type = ?");
        args.push(Val::Str(&q.trans_type));
    }
    if let Some(t) = q.create_time_start {
        sql.push_str(" AND create_time >= ?");
        args.push(time(t));
    }
    if let Some(t) = q.create_time_end {
        sql.push_str(" AND create_time <= ?");
        args.push(time(t));
    }
    sql.push_str(" ORDER BY id DESC LIMIT ?");
    args.push(Val::Int(q.limit as i64));
    let rows = c.globals(&sql, &args).await?;
    let next = if rows.len() == q.limit {
        rows.last().map(|r| r.id.to_string()).unwrap_or_default()
    } else {
        String::new()
    };
    Ok((rows, next))
}

pub(crate) async fn scan_kv(
    c: &mut dyn Exec,
    cat: &str,
    position: &str,
    limit: usize,
) -> Result<(Vec<Kv>, String), DbError> {
    let pos = position.parse::<i64>().unwrap_or(i64::MAX);
    let sql = format!("SELECT {KV_COLS} FROM kv WHERE cat = ? AND id < ? ORDER BY id DESC LIMIT ?");
    let rows = c
        .kvs(
            &sql,
            &[Val::Str(cat), Val::Int(pos), Val::Int(limit as i64)],
        )
        .await?;
    let next = if rows.len() == limit {
        rows.last().map(|r| r.id.to_string()).unwrap_or_default()
    } else {
        String::new()
    };
    Ok((rows, next))
}

pub(crate) async fn find_kv(
    c: &mut dyn Exec,
    cat: &str,
    k: Option<&str>,
) -> Result<Vec<Kv>, DbError> {
    match k {
        Some(k) => {
            let sql = format!("SELECT {KV_COLS} FROM kv WHERE cat = ? AND k = ?");
            c.kvs(&sql, &[Val::Str(cat), Val::Str(k)]).await
        }
        None => {
            let sql = format!("SELECT {KV_COLS} FROM kv WHERE cat = ? ORDER BY id");
            c.kvs(&sql, &[Val::Str(cat)]).await
        }
    }
}

/// Delete up to `limit` finished transactions last updated before `before`, with their
/// branches, inside the caller's transaction.
pub(crate) async fn purge_finished(
    c: &mut dyn Exec,
    before: DateTime<Utc>,
    limit: usize,
) -> Result<usize, DbError> {
    let old = c
        .texts(
            &format!(
                "SELECT gid FROM trans_global WHERE {FINISHED} AND update_time < ? LIMIT ? FOR UPDATE SKIP LOCKED"
            ),
            &[time(before), Val::Int(limit.min(10_000) as i64)],
        )
        .await?;
    if old.is_empty() {
        return Ok(0);
    }
    let args: Vec<Val<'_>> = old.iter().map(|g| Val::Str(g)).collect();
    let list = placeholders(old.len());
    c.exec(
        &format!("DELETE FROM trans_branch_op WHERE gid IN ({list})"),
        &args,
    )
    .await?;
    // the rows are locked since the SELECT, so they are still finished and old
    let n = c
        .exec(
            &format!("DELETE FROM trans_global WHERE gid IN ({list})"),
            &args,
        )
        .await?;
    Ok(n as usize)
}
