//! The embedded store: one SQLite file in WAL mode with `synchronous=FULL`.
//!
//! Writes go to one writer thread that owns the only write connection. It takes every
//! write waiting in its queue (up to `MAX_BATCH`), applies them in one SQLite transaction
//! (so that one op's failure does not undo the others, a batch in which an op fails after
//! changing rows runs again with a savepoint per op), commits once (one fsync for the
//! whole batch), then answers each waiter. Under load hundreds of changes share a commit;
//! at low load a write costs one commit. The branches a transaction is saved with are a
//! column of its row (`branches.rs`); the ones added later are rows of `trans_branch`.
//! Reads use a small pool of read-only connections, which WAL lets run beside the writer.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use dtm_core::store::{
    BranchUpdate, GlobalUpdate, Kv, ScanQuery, Store, StoreError, WriteOp, WriteOutcome,
};
use dtm_proto::{Branch, TransGlobal};
use rusqlite::types::Value as Sql;
use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, params, params_from_iter};
use tokio::sync::{mpsc, oneshot};

use crate::branch_list as branches;

const MAX_BATCH: usize = 512;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS trans_global (
  id INTEGER PRIMARY KEY,
  gid TEXT NOT NULL UNIQUE,
  trans_type TEXT NOT NULL,
  status TEXT NOT NULL,
  query_prepared TEXT NOT NULL DEFAULT '',
  protocol TEXT NOT NULL DEFAULT '',
  create_time INTEGER,
  update_time INTEGER,
  finish_time INTEGER,
  rollback_time INTEGER,
  options TEXT NOT NULL DEFAULT '',
  custom_data TEXT NOT NULL DEFAULT '',
  next_cron_interval INTEGER,
  next_cron_time INTEGER,
  owner TEXT NOT NULL DEFAULT '',
  ext_data TEXT NOT NULL DEFAULT '',
  result TEXT NOT NULL DEFAULT '',
  rollback_reason TEXT NOT NULL DEFAULT '',
  branches BLOB
);
-- The due index's condition is written with OR, not IN: SQLite evaluates a partial
-- index's condition on every INSERT and UPDATE of the table, and an IN list makes it
-- build and drop a temporary b-tree (with its own page cache) each time; that was a
-- quarter of the writer thread's CPU (bench/README.md). trans_global_due is the old form.
DROP INDEX IF EXISTS trans_global_due;
CREATE INDEX IF NOT EXISTS trans_global_pending ON trans_global(next_cron_time)
  WHERE status = 'prepared' OR status = 'submitted' OR status = 'aborting';
CREATE INDEX IF NOT EXISTS trans_global_create_time ON trans_global(create_time);
-- Where a transaction's branches live (see `branches.rs`):
-- * the ones it is saved with (a saga's or msg's steps) are the `branches` column of its
--   row, so saving a saga is one row insert and finishing it one row update, not one per
--   branch row and index entry;
-- * the ones added later (tcc, xa and workflow registrations) are rows of trans_branch,
--   so adding one costs the same however many there are. Its rows are keyed by their
--   transaction's row id, not by gid: ids grow with time, so new rows and index entries
--   append at the right edge. trans_branch_op was the old, gid-keyed table;
--   `migrate_branches` moves its rows here.
-- A transaction's list is the column's branches, then its rows in insertion order.
CREATE TABLE IF NOT EXISTS trans_branch (
  id INTEGER PRIMARY KEY,
  global_id INTEGER NOT NULL,
  url TEXT NOT NULL,
  bin_data BLOB,
  branch_id TEXT NOT NULL,
  op TEXT NOT NULL,
  status TEXT NOT NULL,
  finish_time INTEGER,
  rollback_time INTEGER,
  create_time INTEGER,
  update_time INTEGER,
  UNIQUE (global_id, branch_id, op)
);
CREATE TABLE IF NOT EXISTS kv (
  id INTEGER PRIMARY KEY,
  cat TEXT NOT NULL,
  k TEXT NOT NULL,
  v TEXT,
  version INTEGER DEFAULT 1,
  create_time INTEGER,
  update_time INTEGER,
  UNIQUE (cat, k)
);
"#;

const GLOBAL_COLS: &str = "id, gid, trans_type, status, query_prepared, protocol, create_time, update_time, finish_time, rollback_time, options, custom_data, next_cron_interval, next_cron_time, owner, ext_data, result, rollback_reason";
const KV_COLS: &str = "id, cat, k, v, version, create_time, update_time";
/// Must stay the same expression as the condition of `trans_global_pending`, so that the
/// planner uses that index.
const UNFINISHED: &str = "(status = 'prepared' OR status = 'submitted' OR status = 'aborting')";

/// The row id and the branch column of one transaction.
const FIND_BRANCHES_SQL: &str = "SELECT id, branches FROM trans_global WHERE gid = ?1";
/// Columns of a branch row as `branch_from_row` reads them.
const BRANCH_COLS: &str = "id, url, bin_data, branch_id, op, status, finish_time, rollback_time, create_time, update_time";
/// The branch rows of the transaction with row id `?1`. Sorted by `id` in Rust, not with
/// `ORDER BY id`: with that clause SQLite (built with STAT4) re-prepares the statement
/// every time `?1` is bound to a new value.
fn branch_rows_sql() -> String {
    format!("SELECT {BRANCH_COLS} FROM trans_branch WHERE global_id = ?1")
}

fn ms(t: &Option<DateTime<Utc>>) -> Option<i64> {
    t.map(|t| t.timestamp_millis())
}

fn time(v: Option<i64>) -> Option<DateTime<Utc>> {
    v.and_then(DateTime::from_timestamp_millis)
}

fn global_from_row(r: &Row<'_>) -> rusqlite::Result<TransGlobal> {
    Ok(TransGlobal {
        id: r.get(0)?,
        gid: r.get(1)?,
        trans_type: r.get(2)?,
        status: r.get(3)?,
        query_prepared: r.get(4)?,
        protocol: r.get(5)?,
        create_time: time(r.get(6)?),
        update_time: time(r.get(7)?),
        finish_time: time(r.get(8)?),
        rollback_time: time(r.get(9)?),
        options: r.get(10)?,
        custom_data: r.get(11)?,
        next_cron_interval: r.get::<_, Option<i64>>(12)?.unwrap_or(0),
        next_cron_time: time(r.get(13)?),
        owner: r.get(14)?,
        ext_data: r.get(15)?,
        result: r.get(16)?,
        rollback_reason: r.get(17)?,
    })
}

fn branch_from_row(r: &Row<'_>) -> rusqlite::Result<Branch> {
    Ok(Branch {
        id: r.get(0)?,
        gid: String::new(),
        url: r.get(1)?,
        bin_data: r.get::<_, Option<Vec<u8>>>(2)?.unwrap_or_default(),
        branch_id: r.get(3)?,
        op: r.get(4)?,
        status: r.get(5)?,
        finish_time: time(r.get(6)?),
        rollback_time: time(r.get(7)?),
        create_time: time(r.get(8)?),
        update_time: time(r.get(9)?),
    })
}

/// The `branches` column of the row of `gid` could not be read.
fn damaged(gid: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!(
        "sqlite: the stored branches of gid {gid} cannot be read: {e}; the store file was changed by hand or is damaged"
    ))
}

/// The `branches` column at `idx` of `r`, the row of `gid`, as it is stored.
fn column_at<'r>(r: &'r Row<'_>, idx: usize, gid: &str) -> Result<&'r [u8], StoreError> {
    let col = r.get_ref(idx).map_err(db_err)?;
    let data = col
        .as_blob_or_null()
        .map_err(|e| damaged(gid, format!("the column is not a blob ({e})")))?;
    Ok(data.unwrap_or_default())
}

/// Decode the `branches` column at `idx` of `r`, the row of `gid`.
fn branches_at(r: &Row<'_>, idx: usize, gid: &str) -> Result<Vec<Branch>, StoreError> {
    branches::decode(Some(column_at(r, idx, gid)?)).map_err(|e| damaged(gid, e))
}

fn kv_from_row(r: &Row<'_>) -> rusqlite::Result<Kv> {
    Ok(Kv {
        id: r.get(0)?,
        cat: r.get(1)?,
        k: r.get(2)?,
        v: r.get::<_, Option<String>>(3)?.unwrap_or_default(),
        version: r.get::<_, Option<i64>>(4)?.unwrap_or(1),
        create_time: time(r.get(5)?),
        update_time: time(r.get(6)?),
    })
}

fn db_err(e: rusqlite::Error) -> StoreError {
    if let rusqlite::Error::SqliteFailure(f, _) = &e
        && f.code == rusqlite::ErrorCode::ConstraintViolation
    {
        return StoreError::UniqueConflict;
    }
    StoreError::Unavailable(format!("sqlite: {e}"))
}

struct Job {
    op: Work,
    reply: oneshot::Sender<Reply>,
}

/// A job's result, and its op handed back so that it is freed by the thread that built
/// it: freeing another thread's memory is mimalloc's slow path, and on the writer thread,
/// which every write queues behind, it was a tenth of the thread's time.
type Reply = (Result<WriteOutcome, StoreError>, Work);

/// What the writer thread does for a job.
enum Work {
    Op(Box<WriteOp>),
    /// Retention: delete finished transactions last updated before `before` (ms).
    /// Answered with `Reset { count }`.
    Purge {
        before: i64,
        limit: usize,
    },
}

/// Durability of commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sync {
    /// fsync at every commit (default): nothing acknowledged is lost on power loss.
    Full,
    /// fsync at checkpoints only: faster; survives a process crash, may lose the last
    /// commits on power loss.
    Normal,
}

pub struct SqliteStore {
    path: PathBuf,
    writer: Mutex<Option<mpsc::UnboundedSender<Job>>>,
    writer_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    checkpointer: Mutex<Option<(Arc<AtomicBool>, std::thread::JoinHandle<()>)>>,
    /// The queue of the reader threads (`reader_loop`); None once closed.
    readers: Mutex<Option<std::sync::mpsc::Sender<ReadJob>>>,
}

/// Reader threads, each with its own read-only connection. A fixed set: a burst of
/// queries queues for them rather than holding hundreds of blocking threads, each with
/// a connection of its own (schema parsed, page cache filled) to open and drop.
const READERS: usize = 4;

/// A read, run on a reader thread with its connection (or the error opening it).
type ReadJob = Box<dyn FnOnce(Result<&Connection, StoreError>) + Send>;

fn reader_loop(path: PathBuf, jobs: Arc<Mutex<std::sync::mpsc::Receiver<ReadJob>>>) {
    let mut conn: Option<Connection> = None;
    loop {
        // one thread waits in recv while holding the lock; the rest wait for the lock
        let job = match jobs.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok(job) = job else {
            return; // the store was closed
        };
        let c = match conn {
            Some(ref c) => c,
            None => match Connection::open_with_flags(
                &path,
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .and_then(|c| c.execute_batch("PRAGMA busy_timeout=5000;").map(|_| c))
            {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    job(Err(db_err(e)));
                    continue;
                }
            },
        };
        job(Ok(c));
    }
}

/// WAL size (pages) at which the writer checkpoints itself after a commit. The
/// checkpointer thread has copied almost all of it by then, so this pass copies little,
/// and it is what lets the WAL file start over from its beginning (64 MiB at most). It
/// still ends with an fsync of the database file, 5-7 ms under load, during which every
/// write waits: at 4,096 pages that came 2-3 times a second at half load, often enough to
/// show in the p99.
const WRITER_CHECKPOINT_PAGES: u32 = 16384;

/// The checkpointer thread: copies committed WAL frames into the database file beside
/// the writer, so that the writer thread (which every waiting write queues behind) does
/// not stop for SQLite's auto-checkpoint every 1,000 pages.
fn checkpointer_loop(conn: Connection, stop: Arc<AtomicBool>) {
    let pause = std::time::Duration::from_millis(20);
    let mut last_done = 0;
    while !stop.load(Ordering::Relaxed) {
        let r = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
            Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
        });
        match r {
            // it made progress and more frames are there: go on at once
            Ok((log, done)) if log > done && done > last_done => {
                last_done = done;
                continue;
            }
            Ok((_, done)) => last_done = done,
            Err(e) => tracing::debug!("sqlite checkpoint: {e}"),
        }
        std::thread::sleep(pause);
    }
}

impl SqliteStore {
    /// Open (and create) the store file.
    pub fn open(path: &Path, sync: Sync) -> Result<SqliteStore, StoreError> {
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Unavailable(format!("cannot create directory {}: {e}", dir.display()))
            })?;
        }
        let conn = Connection::open(path)
            .map_err(|e| StoreError::Unavailable(format!("cannot open {}: {e}", path.display())))?;
        let sync_sql = match sync {
            Sync::Full => "FULL",
            Sync::Normal => "NORMAL",
        };
        conn.execute_batch(&format!(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous={sync_sql}; PRAGMA busy_timeout=5000; PRAGMA foreign_keys=OFF; PRAGMA wal_autocheckpoint={WRITER_CHECKPOINT_PAGES};"
        ))
        .map_err(db_err)?;
        let ckpt_conn = Connection::open(path)
            .and_then(|c| {
                c.execute_batch(&format!(
                    "PRAGMA synchronous={sync_sql}; PRAGMA busy_timeout=5000;"
                ))?;
                Ok(c)
            })
            .map_err(db_err)?;
        conn.execute_batch(SCHEMA).map_err(db_err)?;
        migrate_branches(&conn)?;
        conn.set_prepared_statement_cache_capacity(64);
        let (tx, rx) = mpsc::unbounded_channel();
        let handle = std::thread::Builder::new()
            .name("dtm-sqlite-writer".into())
            .spawn(move || writer_loop(conn, rx, matches!(sync, Sync::Full)))
            .map_err(|e| StoreError::Unavailable(format!("cannot start the writer thread: {e}")))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let ckpt = std::thread::Builder::new()
            .name("dtm-sqlite-ckpt".into())
            .spawn(move || checkpointer_loop(ckpt_conn, stop2))
            .map_err(|e| {
                StoreError::Unavailable(format!("cannot start the checkpointer thread: {e}"))
            })?;
        let (read_tx, read_rx) = std::sync::mpsc::channel::<ReadJob>();
        let read_rx = Arc::new(Mutex::new(read_rx));
        for i in 0..READERS {
            let (p, rx) = (path.to_path_buf(), Arc::clone(&read_rx));
            std::thread::Builder::new()
                .name(format!("dtm-sqlite-read{i}"))
                .spawn(move || reader_loop(p, rx))
                .map_err(|e| {
                    StoreError::Unavailable(format!("cannot start a reader thread: {e}"))
                })?;
        }
        Ok(SqliteStore {
            path: path.to_path_buf(),
            writer: Mutex::new(Some(tx)),
            writer_thread: Mutex::new(Some(handle)),
            checkpointer: Mutex::new(Some((stop, ckpt))),
            readers: Mutex::new(Some(read_tx)),
        })
    }

    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let (reply, rx) = oneshot::channel();
        let job: ReadJob = Box::new(move |c| {
            let _ = reply.send(c.and_then(|c| f(c).map_err(db_err)));
        });
        let sent = self
            .readers
            .lock()
            .ok()
            .and_then(|r| r.as_ref().map(|tx| tx.send(job).is_ok()));
        if sent != Some(true) {
            return Err(StoreError::Unavailable("the store is shutting down".into()));
        }
        rx.await
            .map_err(|_| StoreError::Unavailable("a store reader has stopped".into()))?
    }
}

/// Bring a store file written by an earlier version to the current layout, in one
/// transaction (a crash leaves the file as it was): add the `branches` column, and move
/// the rows of `trans_branch_op` (keyed by gid) into `trans_branch`, keeping their ids
/// and so their order. Branch rows whose transaction is gone (none are written so) are
/// dropped with the old table.
fn migrate_branches(conn: &Connection) -> Result<(), StoreError> {
    let count = |sql: &str| -> Result<i64, StoreError> {
        conn.query_row(sql, [], |r| r.get(0)).map_err(db_err)
    };
    let has_column =
        count("SELECT count(*) FROM pragma_table_info('trans_global') WHERE name = 'branches'")?
            > 0;
    let old_table = count(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'trans_branch_op'",
    )? > 0;
    if has_column && !old_table {
        return Ok(());
    }
    let mut sql = String::from("BEGIN IMMEDIATE;");
    if !has_column {
        sql.push_str("ALTER TABLE trans_global ADD COLUMN branches BLOB;");
    }
    if old_table {
        sql.push_str(
            "INSERT INTO trans_branch (id, global_id, url, bin_data, branch_id, op, status, finish_time, rollback_time, create_time, update_time)
               SELECT b.id, g.id, b.url, b.bin_data, b.branch_id, b.op, b.status, b.finish_time, b.rollback_time, b.create_time, b.update_time
               FROM trans_branch_op b JOIN trans_global g ON g.gid = b.gid ORDER BY b.id;
             DROP TABLE trans_branch_op;",
        );
    }
    sql.push_str("COMMIT;");
    conn.execute_batch(&sql).map_err(|e| {
        let _ = conn.execute_batch("ROLLBACK");
        StoreError::Unavailable(format!(
            "cannot bring this store file to the current layout (the branches column of trans_global{}): {e}; the file is unchanged",
            if old_table { ", trans_branch_op to trans_branch" } else { "" }
        ))
    })
}

/// How long the writer waits for more writes before committing a small batch, when each
/// commit is fsync'd and writes come in concurrently (see [`writer_loop`]).
const COMMIT_DELAY: std::time::Duration = std::time::Duration::from_micros(150);
/// A batch with at least this many writes is committed at once.
const COMMIT_DELAY_BELOW: usize = 8;
/// The wait applies only when this batch or the one before had at least this many
/// writes: evidence that many writers are about, not one client or a handful waiting on
/// each commit in turn.
const COMMIT_DELAY_AFTER: usize = 6;

/// Take queued writes and commit them in batches (group commit).
///
/// With `synchronous=FULL` every commit costs an fsync. Under a moderate load (half of
/// what the machine can do) the batches are small, and the many fsyncs queue behind one
/// another and behind the checkpointer's: the tail latency grows. A batch of fewer than
/// [`COMMIT_DELAY_BELOW`] writes therefore waits [`COMMIT_DELAY`] for more before it is
/// committed, as Postgres's `commit_delay` does, but only when this batch or the one
/// before had [`COMMIT_DELAY_AFTER`] writes or more, so that a lone client, or a few
/// waiting on each commit in turn, are not slowed. At full load the batches are bigger
/// and nothing waits. (bench/README.md, seventh round, has the measurements.)
fn writer_loop(mut conn: Connection, mut rx: mpsc::UnboundedReceiver<Job>, fsync_each: bool) {
    let take_queued = |rx: &mut mpsc::UnboundedReceiver<Job>, batch: &mut Vec<Job>| {
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
    };
    let mut last_len = 0;
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        take_queued(&mut rx, &mut batch);
        if fsync_each
            && batch.len() < COMMIT_DELAY_BELOW
            && (last_len >= COMMIT_DELAY_AFTER || batch.len() >= COMMIT_DELAY_AFTER)
        {
            std::thread::sleep(COMMIT_DELAY);
            take_queued(&mut rx, &mut batch);
        }
        last_len = batch.len();
        let results = apply_batch(&mut conn, &batch);
        for (job, r) in batch.into_iter().zip(results) {
            let _ = job.reply.send((r, job.op));
        }
    }
    let _ = conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);");
}

/// Run a parameterless statement through the statement cache (the savepoint statements
/// run for every op; `execute_batch` would parse them again each time).
fn exec_cached(c: &Connection, sql: &str) -> rusqlite::Result<()> {
    c.prepare_cached(sql)?.execute([]).map(|_| ())
}

fn apply_batch(conn: &mut Connection, batch: &[Job]) -> Vec<Result<WriteOutcome, StoreError>> {
    match apply_batch_plain(conn, batch) {
        Some(results) => results,
        None => apply_batch_savepoints(conn, batch),
    }
}

/// The fast path: the batch's ops run one after the other in one transaction with no
/// savepoints. A savepoint makes SQLite copy every page an op touches into its statement
/// journal first, which cost the writer more than the ops' own statements. An op that
/// fails before changing a row (a status or owner guard that matched nothing, a gid that
/// exists) leaves nothing to undo; only an op that fails after changing rows needs one.
/// Then, or on any database error, the transaction is rolled back and `None` returned so
/// that the batch runs again with a savepoint per op.
fn apply_batch_plain(
    conn: &mut Connection,
    batch: &[Job],
) -> Option<Vec<Result<WriteOutcome, StoreError>>> {
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .ok()?;
    let mut results = Vec::with_capacity(batch.len());
    let mut hot = Hot::new(&tx);
    for job in batch {
        let before = tx.total_changes();
        let r = run_work(&mut hot, &job.op);
        match &r {
            Ok(_) => {}
            Err(StoreError::NotFound | StoreError::UniqueConflict)
                if tx.total_changes() == before => {}
            // rows changed before the failure, or a database error: undo needs savepoints
            Err(_) => return None,
        }
        results.push(r);
    }
    drop(hot);
    tx.commit().ok()?;
    Some(results)
}

fn run_work(h: &mut Hot<'_>, w: &Work) -> Result<WriteOutcome, StoreError> {
    match w {
        Work::Op(op) => apply_one(h, op),
        Work::Purge { before, limit } => purge(h.c, *before, *limit),
    }
}

/// The careful path: each op inside its own savepoint, so that one op's failure undoes
/// only that op.
fn apply_batch_savepoints(
    conn: &mut Connection,
    batch: &[Job],
) -> Vec<Result<WriteOutcome, StoreError>> {
    let fail_all = |e: StoreError| batch.iter().map(|_| Err(e.clone())).collect();
    let tx = match conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => return fail_all(db_err(e)),
    };
    let mut results = Vec::with_capacity(batch.len());
    let mut hot = Hot::new(&tx);
    for job in batch {
        let r = match exec_cached(&tx, "SAVEPOINT op") {
            Err(e) => Err(db_err(e)),
            Ok(()) => {
                let r = run_work(&mut hot, &job.op);
                let undo = if r.is_err() {
                    exec_cached(&tx, "ROLLBACK TO op")
                } else {
                    Ok(())
                };
                match undo.and_then(|()| exec_cached(&tx, "RELEASE op")) {
                    Ok(()) => r,
                    Err(e) => Err(db_err(e)),
                }
            }
        };
        results.push(r);
    }
    drop(hot);
    match tx.commit() {
        Ok(()) => results,
        Err(e) => fail_all(db_err(e)),
    }
}

/// The statements every saga runs, taken from the statement cache once per batch instead
/// of once per op: a cache lookup hashes the SQL text twice and copies it, which cost the
/// writer more than binding the parameters (bench/README.md, fifth round).
#[derive(Clone, Copy)]
enum HotSql {
    InsertGlobal = 0,
    InsertBranch = 1,
    IdOfGid = 2,
    IdStatusBranchesOfGid = 3,
    IdBranchesOfGid = 4,
    UpdateBranch = 5,
}

impl HotSql {
    /// How many there are (the last variant's index + 1).
    const COUNT: usize = HotSql::UpdateBranch as usize + 1;

    fn text(self) -> &'static str {
        match self {
            HotSql::InsertGlobal => {
                "INSERT INTO trans_global (gid, trans_type, status, query_prepared, protocol, create_time, update_time, finish_time, rollback_time, options, custom_data, next_cron_interval, next_cron_time, owner, ext_data, result, rollback_reason, branches) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18) ON CONFLICT (gid) DO NOTHING"
            }
            HotSql::InsertBranch => {
                "INSERT INTO trans_branch (global_id, url, bin_data, branch_id, op, status, finish_time, rollback_time, create_time, update_time) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"
            }
            HotSql::IdOfGid => "SELECT id FROM trans_global WHERE gid = ?1",
            HotSql::IdStatusBranchesOfGid => {
                "SELECT id, status, branches FROM trans_global WHERE gid = ?1"
            }
            HotSql::IdBranchesOfGid => "SELECT id, branches FROM trans_global WHERE gid = ?1",
            HotSql::UpdateBranch => {
                "UPDATE trans_branch SET status = ?1, finish_time = ?2, update_time = ?2 WHERE global_id = ?3 AND branch_id = ?4 AND op = ?5"
            }
        }
    }
}

/// A batch's connection and its hot statements, each prepared (from the cache) on first
/// use and returned to the cache when the batch ends.
struct Hot<'c> {
    c: &'c Connection,
    slots: [Option<rusqlite::CachedStatement<'c>>; HotSql::COUNT],
}

impl<'c> Hot<'c> {
    fn new(c: &'c Connection) -> Self {
        Hot {
            c,
            slots: Default::default(),
        }
    }

    fn stmt(&mut self, which: HotSql) -> Result<&mut rusqlite::CachedStatement<'c>, StoreError> {
        let slot = &mut self.slots[which as usize];
        match slot {
            Some(stmt) => Ok(stmt),
            None => Ok(slot.insert(self.c.prepare_cached(which.text()).map_err(db_err)?)),
        }
    }
}

/// The branch column of a new transaction (NULL when it has none).
fn new_branches(branches: &[Branch]) -> Option<Vec<u8>> {
    (!branches.is_empty()).then(|| branches::encode(branches))
}

/// Insert `more` as branch rows of the transaction whose row id is `global_id`.
/// `UniqueConflict` when a (branch_id, op) is in the column list `saved` already (the
/// unique index catches one among the rows).
fn insert_branches(
    h: &mut Hot<'_>,
    global_id: i64,
    saved: &[Branch],
    more: &[Branch],
) -> Result<(), StoreError> {
    if more.iter().any(|b| {
        saved
            .iter()
            .any(|x| x.branch_id == b.branch_id && x.op == b.op)
    }) {
        return Err(StoreError::UniqueConflict);
    }
    let stmt = h.stmt(HotSql::InsertBranch)?;
    for b in more {
        stmt.execute(params![
            global_id,
            b.url,
            b.bin_data,
            b.branch_id,
            b.op,
            b.status,
            ms(&b.finish_time),
            ms(&b.rollback_time),
            ms(&b.create_time),
            ms(&b.update_time)
        ])
        .map_err(db_err)?;
    }
    Ok(())
}

/// Apply `ups` to the branch rows of the transaction with row id `global_id`; an update
/// that matches no row changes nothing.
fn update_rows(h: &mut Hot<'_>, global_id: i64, ups: &[&BranchUpdate]) -> Result<(), StoreError> {
    if ups.is_empty() {
        return Ok(());
    }
    let stmt = h.stmt(HotSql::UpdateBranch)?;
    for u in ups {
        stmt.execute(params![
            u.status,
            u.time.timestamp_millis(),
            global_id,
            u.branch_id,
            u.op
        ])
        .map_err(db_err)?;
    }
    Ok(())
}

/// The guarded update of the global with row id `id`. Its id is looked up first, not
/// taken from `UPDATE .. RETURNING id`: SQLite collects RETURNING rows in a temporary
/// table whose page cache it allocates and frees per statement (glibc then returned the
/// memory with madvise and a TLB flush on every core: 15% of the writer).
fn update_global_sql(
    set: &GlobalUpdate,
    branches: Option<Vec<u8>>,
    id: i64,
    expect_status: &str,
    expect_owner: Option<&str>,
) -> (String, Vec<Sql>) {
    let (cols, mut vals) = update_sql(set);
    let mut sql = String::with_capacity(cols.len() + 96);
    sql.push_str("UPDATE trans_global SET ");
    sql.push_str(&cols);
    if let Some(b) = branches {
        sql.push_str(", branches = ?");
        vals.push(Sql::Blob(b));
    }
    sql.push_str(" WHERE id = ? AND status = ?");
    vals.push(Sql::Integer(id));
    vals.push(Sql::Text(expect_status.to_string()));
    if let Some(o) = expect_owner {
        sql.push_str(" AND owner = ?");
        vals.push(Sql::Text(o.to_string()));
    }
    (sql, vals)
}

fn apply_one(h: &mut Hot<'_>, op: &WriteOp) -> Result<WriteOutcome, StoreError> {
    let c = h.c;
    match op {
        WriteOp::SaveNew {
            global: g,
            branches,
        } => {
            let n = h
                .stmt(HotSql::InsertGlobal)?
                .execute(params![
                    g.gid,
                    g.trans_type,
                    g.status,
                    g.query_prepared,
                    g.protocol,
                    ms(&g.create_time),
                    ms(&g.update_time),
                    ms(&g.finish_time),
                    ms(&g.rollback_time),
                    g.options,
                    g.custom_data,
                    g.next_cron_interval,
                    ms(&g.next_cron_time),
                    g.owner,
                    g.ext_data,
                    g.result,
                    g.rollback_reason,
                    new_branches(branches)
                ])
                .map_err(db_err)?;
            if n == 0 {
                return Err(StoreError::UniqueConflict);
            }
            Ok(WriteOutcome::Done)
        }
        WriteOp::AddBranches {
            gid,
            expect_status,
            branches,
        } => {
            let row = h
                .stmt(HotSql::IdStatusBranchesOfGid)?
                .query_row(params![gid], |r| {
                    let status = r.get_ref(1)?.as_str()?;
                    if status != *expect_status {
                        return Ok(None);
                    }
                    Ok(Some((r.get::<_, i64>(0)?, branches_at(r, 2, gid))))
                })
                .optional()
                .map_err(db_err)?
                .flatten();
            let Some((id, saved)) = row else {
                return Err(StoreError::NotFound);
            };
            insert_branches(h, id, &saved?, branches)?;
            Ok(WriteOutcome::Done)
        }
        WriteOp::UpdateGlobal {
            gid,
            expect_status,
            expect_owner,
            set,
            branches,
        } => {
            // the gid is looked up once, with the branch column when branches change;
            // the row is then updated by id, and the updates of branch rows follow
            let (id, column, rows) = if branches.is_empty() {
                let id: Option<i64> = h
                    .stmt(HotSql::IdOfGid)?
                    .query_row(params![gid], |r| r.get(0))
                    .optional()
                    .map_err(db_err)?;
                (id.ok_or(StoreError::NotFound)?, None, Vec::new())
            } else {
                // the column's branches are changed in their encoded form, not decoded
                let row = h
                    .stmt(HotSql::IdBranchesOfGid)?
                    .query_row(params![gid], |r| {
                        let updated = column_at(r, 1, gid).and_then(|data| {
                            branches::update(data, branches).map_err(|e| damaged(gid, e))
                        });
                        Ok((r.get::<_, i64>(0)?, updated))
                    })
                    .optional()
                    .map_err(db_err)?;
                let (id, updated) = row.ok_or(StoreError::NotFound)?;
                let (column, rows) = updated?;
                (id, column, rows)
            };
            let (sql, vals) =
                update_global_sql(set, column, id, expect_status, expect_owner.as_deref());
            let n = c
                .prepare_cached(&sql)
                .map_err(db_err)?
                .execute(params_from_iter(vals))
                .map_err(db_err)?;
            if n == 0 {
                return Err(StoreError::NotFound);
            }
            update_rows(h, id, &rows)?;
            Ok(WriteOutcome::Done)
        }
        WriteOp::ResetNextCronTime { gid, now } => {
            let n = c
                .prepare_cached(
                    "UPDATE trans_global SET next_cron_time = ?1, update_time = ?1 WHERE gid = ?2",
                )
                .map_err(db_err)?
                .execute(params![now.timestamp_millis(), gid])
                .map_err(db_err)?;
            if n == 0 {
                return Err(StoreError::NotFound);
            }
            Ok(WriteOutcome::Done)
        }
        WriteOp::ClaimDue {
            now,
            limit,
            lease_until,
            owner,
        } => {
            let sql = format!(
                "UPDATE trans_global SET owner = ?1, next_cron_time = ?2, update_time = ?3 WHERE id IN (SELECT id FROM trans_global WHERE {UNFINISHED} AND next_cron_time <= ?3 ORDER BY next_cron_time LIMIT ?4) RETURNING {GLOBAL_COLS}"
            );
            let mut stmt = c.prepare_cached(&sql).map_err(db_err)?;
            let rows = stmt
                .query_map(
                    params![
                        owner,
                        lease_until.timestamp_millis(),
                        now.timestamp_millis(),
                        *limit as i64
                    ],
                    global_from_row,
                )
                .map_err(db_err)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(db_err)?;
            Ok(WriteOutcome::Claimed(rows))
        }
        WriteOp::ResetCronTime { after, now, limit } => {
            let sql = format!(
                "UPDATE trans_global SET next_cron_time = ?1, update_time = ?1 WHERE id IN (SELECT id FROM trans_global WHERE {UNFINISHED} AND next_cron_time > ?2 LIMIT ?3)"
            );
            let count = c
                .prepare_cached(&sql)
                .map_err(db_err)?
                .execute(params![
                    now.timestamp_millis(),
                    after.timestamp_millis(),
                    *limit as i64
                ])
                .map_err(db_err)? as i64;
            let more: i64 = c
                .prepare_cached(&format!(
                    "SELECT EXISTS (SELECT 1 FROM trans_global WHERE {UNFINISHED} AND next_cron_time > ?1)"
                ))
                .map_err(db_err)?
                .query_row(params![after.timestamp_millis()], |r| r.get(0))
                .map_err(db_err)?;
            Ok(WriteOutcome::Reset {
                count,
                has_remaining: more != 0,
            })
        }
        WriteOp::CreateKv { cat, k, v, now } => {
            let n = c
                .prepare_cached("INSERT INTO kv (cat, k, v, version, create_time, update_time) VALUES (?1, ?2, ?3, 1, ?4, ?4) ON CONFLICT (cat, k) DO NOTHING")
                .map_err(db_err)?
                .execute(params![cat, k, v, now.timestamp_millis()])
                .map_err(db_err)?;
            if n == 0 {
                return Err(StoreError::UniqueConflict);
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
                .prepare_cached("UPDATE kv SET v = ?1, version = version + 1, update_time = ?2 WHERE cat = ?3 AND k = ?4 AND version = ?5")
                .map_err(db_err)?
                .execute(params![v, now.timestamp_millis(), cat, k, version])
                .map_err(db_err)?;
            if n == 0 {
                return Err(StoreError::NotFound);
            }
            Ok(WriteOutcome::Done)
        }
        WriteOp::DeleteKv { cat, k } => {
            let n = c
                .prepare_cached("DELETE FROM kv WHERE cat = ?1 AND k = ?2")
                .map_err(db_err)?
                .execute(params![cat, k])
                .map_err(db_err)?;
            if n == 0 {
                return Err(StoreError::NotFound);
            }
            Ok(WriteOutcome::Done)
        }
    }
}

fn purge(c: &Connection, before: i64, limit: usize) -> Result<WriteOutcome, StoreError> {
    let ids: Vec<i64> = c
        .prepare_cached(
            "SELECT id FROM trans_global WHERE status IN ('succeed', 'failed') AND update_time < ?1 LIMIT ?2",
        )
        .map_err(db_err)?
        .query_map(params![before, limit as i64], |r| r.get(0))
        .map_err(db_err)?
        .collect::<Result<_, _>>()
        .map_err(db_err)?;
    for id in &ids {
        c.prepare_cached("DELETE FROM trans_branch WHERE global_id = ?1")
            .map_err(db_err)?
            .execute(params![id])
            .map_err(db_err)?;
        c.prepare_cached("DELETE FROM trans_global WHERE id = ?1")
            .map_err(db_err)?
            .execute(params![id])
            .map_err(db_err)?;
    }
    Ok(WriteOutcome::Reset {
        count: ids.len() as i64,
        has_remaining: false,
    })
}

fn update_sql(u: &GlobalUpdate) -> (String, Vec<Sql>) {
    let mut cols = String::with_capacity(128);
    cols.push_str("update_time = ?");
    let mut vals = vec![Sql::Integer(u.update_time.timestamp_millis())];
    let mut text = |set: &str, v: &Option<String>| {
        if let Some(v) = v {
            cols.push_str(set);
            vals.push(Sql::Text(v.clone()));
        }
    };
    text(", status = ?", &u.status);
    text(", rollback_reason = ?", &u.rollback_reason);
    text(", result = ?", &u.result);
    text(", custom_data = ?", &u.custom_data);
    text(", owner = ?", &u.owner);
    for (set, t) in [
        (", finish_time = ?", &u.finish_time),
        (", rollback_time = ?", &u.rollback_time),
        (", next_cron_time = ?", &u.next_cron_time),
    ] {
        if let Some(t) = t {
            cols.push_str(set);
            vals.push(Sql::Integer(t.timestamp_millis()));
        }
    }
    if let Some(i) = u.next_cron_interval {
        cols.push_str(", next_cron_interval = ?");
        vals.push(Sql::Integer(i));
    }
    (cols, vals)
}

#[async_trait]
impl Store for SqliteStore {
    fn describe(&self) -> String {
        format!("sqlite:{}", self.path.display())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.read(|c| c.query_row("SELECT 1", [], |_| Ok(()))).await
    }

    async fn find_global(&self, gid: &str) -> Result<Option<TransGlobal>, StoreError> {
        let gid = gid.to_string();
        self.read(move |c| {
            c.prepare_cached(&format!(
                "SELECT {GLOBAL_COLS} FROM trans_global WHERE gid = ?1"
            ))?
            .query_row(params![gid], global_from_row)
            .optional()
        })
        .await
    }

    async fn find_branches(&self, gid: &str) -> Result<Vec<Branch>, StoreError> {
        let gid = gid.to_string();
        self.read(move |c| {
            let found = c
                .prepare_cached(FIND_BRANCHES_SQL)?
                .query_row(params![gid], |r| {
                    Ok((r.get::<_, i64>(0)?, branches_at(r, 1, &gid)))
                })
                .optional()?;
            let Some((id, saved)) = found else {
                return Ok(Ok(Vec::new()));
            };
            let mut list = match saved {
                Ok(list) => list,
                Err(e) => return Ok(Err(e)),
            };
            let mut rows: Vec<Branch> = c
                .prepare_cached(&branch_rows_sql())?
                .query_map(params![id], branch_from_row)?
                .collect::<Result<_, _>>()?;
            rows.sort_by_key(|b| b.id);
            list.extend(rows);
            // ids are positions: the column's come first, then the rows in their order
            for (pos, b) in (1..).zip(list.iter_mut()) {
                b.id = pos;
                b.gid.clone_from(&gid);
            }
            Ok(Ok(list))
        })
        .await?
    }

    async fn scan_globals(&self, q: &ScanQuery) -> Result<(Vec<TransGlobal>, String), StoreError> {
        let q = q.clone();
        self.read(move |c| {
            let mut sql = format!("SELECT {GLOBAL_COLS} FROM trans_global WHERE id < ?");
            let pos = q.position.parse::<i64>().unwrap_or(i64::MAX);
            let mut vals = vec![Sql::Integer(pos)];
            if !q.status.is_empty() {
                sql.push_str(" AND status = ?");
                vals.push(Sql::Text(q.status.clone()));
            }
            if !q.trans_type.is_empty() {
                sql.push_str(" AND trans_type = ?");
                vals.push(Sql::Text(q.trans_type.clone()));
            }
            if let Some(t) = q.create_time_start {
                sql.push_str(" AND create_time >= ?");
                vals.push(Sql::Integer(t.timestamp_millis()));
            }
            if let Some(t) = q.create_time_end {
                sql.push_str(" AND create_time <= ?");
                vals.push(Sql::Integer(t.timestamp_millis()));
            }
            sql.push_str(" ORDER BY id DESC LIMIT ?");
            vals.push(Sql::Integer(q.limit as i64));
            let rows: Vec<TransGlobal> = c
                .prepare(&sql)?
                .query_map(params_from_iter(vals), global_from_row)?
                .collect::<Result<_, _>>()?;
            let next = if rows.len() == q.limit {
                rows.last().map(|r| r.id.to_string()).unwrap_or_default()
            } else {
                String::new()
            };
            Ok((rows, next))
        })
        .await
    }

    async fn scan_kv(
        &self,
        cat: &str,
        position: &str,
        limit: usize,
    ) -> Result<(Vec<Kv>, String), StoreError> {
        let cat = cat.to_string();
        let pos = position.parse::<i64>().unwrap_or(i64::MAX);
        self.read(move |c| {
            let rows: Vec<Kv> = c
                .prepare_cached(&format!(
                    "SELECT {KV_COLS} FROM kv WHERE cat = ?1 AND id < ?2 ORDER BY id DESC LIMIT ?3"
                ))?
                .query_map(params![cat, pos, limit as i64], kv_from_row)?
                .collect::<Result<_, _>>()?;
            let next = if rows.len() == limit {
                rows.last().map(|r| r.id.to_string()).unwrap_or_default()
            } else {
                String::new()
            };
            Ok((rows, next))
        })
        .await
    }

    async fn find_kv(&self, cat: &str, k: Option<&str>) -> Result<Vec<Kv>, StoreError> {
        let cat = cat.to_string();
        let k = k.map(str::to_string);
        self.read(move |c| match k {
            Some(k) => c
                .prepare_cached(&format!(
                    "SELECT {KV_COLS} FROM kv WHERE cat = ?1 AND k = ?2"
                ))?
                .query_map(params![cat, k], kv_from_row)?
                .collect(),
            None => c
                .prepare_cached(&format!(
                    "SELECT {KV_COLS} FROM kv WHERE cat = ?1 ORDER BY id"
                ))?
                .query_map(params![cat], kv_from_row)?
                .collect(),
        })
        .await
    }

    async fn write(&self, op: WriteOp) -> Result<WriteOutcome, StoreError> {
        self.submit(Work::Op(Box::new(op))).await
    }

    async fn purge_finished(
        &self,
        before: DateTime<Utc>,
        limit: usize,
    ) -> Result<usize, StoreError> {
        match self
            .submit(Work::Purge {
                before: before.timestamp_millis(),
                limit,
            })
            .await?
        {
            WriteOutcome::Reset { count, .. } => Ok(count.max(0) as usize),
            _ => Ok(0),
        }
    }

    async fn close(&self) {
        if let Ok(mut w) = self.writer.lock() {
            w.take();
        }
        if let Ok(mut r) = self.readers.lock() {
            r.take();
        }
        let ckpt = self.checkpointer.lock().ok().and_then(|mut h| h.take());
        if let Some((stop, h)) = ckpt {
            stop.store(true, Ordering::Relaxed);
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
        let handle = self.writer_thread.lock().ok().and_then(|mut h| h.take());
        if let Some(h) = handle {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        // the reader threads end when the queue's sender is gone
        if let Ok(mut r) = self.readers.lock() {
            r.take();
        }
        if let Ok(c) = self.checkpointer.lock()
            && let Some((stop, _)) = c.as_ref()
        {
            stop.store(true, Ordering::Relaxed);
        }
    }
}

impl SqliteStore {
    async fn submit(&self, op: Work) -> Result<WriteOutcome, StoreError> {
        let (reply, rx) = oneshot::channel();
        let sender = self.writer.lock().ok().and_then(|w| w.clone());
        let Some(sender) = sender else {
            return Err(StoreError::Unavailable("the store is shutting down".into()));
        };
        sender
            .send(Job { op, reply })
            .map_err(|_| StoreError::Unavailable("the store writer has stopped".into()))?;
        let (r, _op) = rx
            .await
            .map_err(|_| StoreError::Unavailable("the store writer has stopped".into()))?;
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opcodes(c: &Connection, sql: &str, n: usize) -> Vec<String> {
        let mut st = c
            .prepare(&format!("EXPLAIN {sql}"))
            .unwrap_or_else(|e| panic!("{e}"));
        st.query_map(params_from_iter(vec![Sql::Null; n]), |r| {
            r.get::<_, String>(1)
        })
        .unwrap_or_else(|e| panic!("{e}"))
        .collect::<Result<Vec<_>, _>>()
        .unwrap_or_else(|e| panic!("{e}"))
    }

    /// The read statements of `query` are prepared once per connection, not again for
    /// every gid bound to them.
    #[test]
    fn reads_are_not_reprepared_per_gid() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("t.sqlite");
        drop(SqliteStore::open(&path, Sync::Normal).unwrap_or_else(|e| panic!("{e}")));
        let w = Connection::open(&path).unwrap_or_else(|e| panic!("{e}"));
        w.execute_batch(
            "INSERT INTO trans_global (id, gid, trans_type, status, branches) VALUES (1, 'a', 'saga', 'submitted', X'01'), (2, 'b', 'saga', 'submitted', X'01');
             INSERT INTO trans_branch (global_id, url, branch_id, op, status) SELECT id, 'u', '01', 'action', 'prepared' FROM trans_global;",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let c = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap_or_else(|e| panic!("{e}"));
        let global = format!("SELECT {GLOBAL_COLS} FROM trans_global WHERE gid = ?1");
        let by_gid = ["a", "b", "a", "b"].map(|g| Sql::Text(g.into()));
        let by_id = [1, 2, 1, 2].map(Sql::Integer);
        for (sql, keys) in [
            (FIND_BRANCHES_SQL.to_string(), &by_gid),
            (global, &by_gid),
            (branch_rows_sql(), &by_id),
        ] {
            let mut st = c.prepare(&sql).unwrap_or_else(|e| panic!("{e}"));
            for k in keys {
                let n = st
                    .query_map(params![k], |_| Ok(()))
                    .unwrap_or_else(|e| panic!("{e}"))
                    .count();
                assert_eq!(n, 1, "{sql} {k:?}");
            }
            let re = st.get_status(rusqlite::StatementStatus::RePrepare);
            assert_eq!(re, 0, "{sql} was prepared again {re} times");
        }
    }

    /// Hot writes must not build temporary b-trees (an IN list in a partial index
    /// condition does, and so does RETURNING), and the due scan must still use the
    /// partial index.
    #[test]
    fn hot_writes_build_no_temporary_btree_and_claims_use_the_due_index() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("t.sqlite");
        let store = SqliteStore::open(&path, Sync::Normal).unwrap_or_else(|e| panic!("{e}"));
        let c = Connection::open(&path).unwrap_or_else(|e| panic!("{e}"));
        let set = GlobalUpdate {
            status: Some("succeed".into()),
            next_cron_time: Some(Utc::now()),
            ..GlobalUpdate::default()
        };
        let (update, vals) = update_global_sql(&set, Some(vec![1]), 1, "submitted", Some("node"));
        assert!(update.contains("branches = ?"), "{update}");
        for (sql, n) in [
            (HotSql::InsertGlobal.text(), 18),
            (update.as_str(), vals.len()),
            (HotSql::UpdateBranch.text(), 5),
            (HotSql::InsertBranch.text(), 10),
        ] {
            let ops = opcodes(&c, sql, n);
            assert!(!ops.iter().any(|o| o == "OpenEphemeral"), "{sql}: {ops:?}");
        }
        let claim = format!(
            "SELECT id FROM trans_global WHERE {UNFINISHED} AND next_cron_time <= ?1 ORDER BY next_cron_time LIMIT ?2"
        );
        let plan: Vec<String> = c
            .prepare(&format!("EXPLAIN QUERY PLAN {claim}"))
            .and_then(|mut st| {
                st.query_map(params![0, 1], |r| r.get::<_, String>(3))?
                    .collect::<Result<Vec<_>, _>>()
            })
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            plan.iter().any(|p| p.contains("trans_global_pending")),
            "{plan:?}"
        );
        drop(c);
        drop(store);
    }

    /// The globals table as versions before the `branches` column created it.
    fn old_globals_schema() -> String {
        let cut = SCHEMA
            .find("-- Where a transaction's branches live")
            .unwrap_or_else(|| panic!("schema"));
        let old = SCHEMA[..cut].replace(",\n  branches BLOB", "");
        assert!(!old.contains("branches"), "{old}");
        old
    }

    /// A store file of an earlier layout opens with every branch still there, in its
    /// order, with its state; orphan rows are dropped; the old table is gone; new
    /// branches come after the kept ones; opening it again changes nothing.
    async fn earlier_layout_is_moved_on_open(old_table: &str) {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("old.sqlite");
        let c = Connection::open(&path).unwrap_or_else(|e| panic!("{e}"));
        c.execute_batch(&old_globals_schema())
            .unwrap_or_else(|e| panic!("{e}"));
        c.execute_batch(
            "INSERT INTO trans_global (id, gid, trans_type, status) VALUES (1, 'g1', 'saga', 'submitted'), (2, 'g2', 'tcc', 'succeed');",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        // (id, gid / global id, url, bin_data, branch_id, op, status, finish_time)
        let rows = if old_table == "trans_branch_op" {
            "CREATE TABLE trans_branch_op (id INTEGER PRIMARY KEY, gid TEXT NOT NULL, url TEXT NOT NULL, bin_data BLOB, branch_id TEXT NOT NULL, op TEXT NOT NULL, status TEXT NOT NULL, finish_time INTEGER, rollback_time INTEGER, create_time INTEGER, update_time INTEGER, UNIQUE (gid, branch_id, op));
             INSERT INTO trans_branch_op (id, gid, url, bin_data, branch_id, op, status, finish_time) VALUES
               (7, 'g2', 'http://x/confirm', NULL, '01', 'confirm', 'succeed', 5000),
               (3, 'g1', 'http://x/out', X'7b7d', '01', 'action', 'succeed', 4000),
               (2, 'g1', 'http://x/out-r', X'7b7d', '01', 'compensate', 'prepared', NULL),
               (9, 'gone', 'http://x/y', NULL, '01', 'action', 'prepared', NULL);"
        } else {
            "CREATE TABLE trans_branch (id INTEGER PRIMARY KEY, global_id INTEGER NOT NULL, url TEXT NOT NULL, bin_data BLOB, branch_id TEXT NOT NULL, op TEXT NOT NULL, status TEXT NOT NULL, finish_time INTEGER, rollback_time INTEGER, create_time INTEGER, update_time INTEGER, UNIQUE (global_id, branch_id, op));
             INSERT INTO trans_branch (id, global_id, url, bin_data, branch_id, op, status, finish_time) VALUES
               (7, 2, 'http://x/confirm', NULL, '01', 'confirm', 'succeed', 5000),
               (3, 1, 'http://x/out', X'7b7d', '01', 'action', 'succeed', 4000),
               (2, 1, 'http://x/out-r', X'7b7d', '01', 'compensate', 'prepared', NULL);"
        };
        c.execute_batch(rows).unwrap_or_else(|e| panic!("{e}"));
        drop(c);
        let store = SqliteStore::open(&path, Sync::Normal).unwrap_or_else(|e| panic!("{e}"));
        let b1 = store
            .find_branches("g1")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let got: Vec<_> = b1
            .iter()
            .map(|b| {
                (
                    b.id,
                    b.gid.as_str(),
                    b.op.as_str(),
                    b.status.as_str(),
                    b.bin_data.clone(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (1, "g1", "compensate", "prepared", b"{}".to_vec()),
                (2, "g1", "action", "succeed", b"{}".to_vec()),
            ],
            "{old_table}"
        );
        assert_eq!(b1[1].finish_time.map(|t| t.timestamp_millis()), Some(4000));
        let b2 = store
            .find_branches("g2")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(b2.len(), 1);
        assert_eq!(
            (b2[0].url.as_str(), b2[0].status.as_str()),
            ("http://x/confirm", "succeed")
        );
        assert!(
            store
                .find_branches("gone")
                .await
                .unwrap_or_else(|e| panic!("{e}"))
                .is_empty()
        );
        let more = Branch {
            gid: "g1".into(),
            url: "http://x/in".into(),
            branch_id: "02".into(),
            op: "action".into(),
            status: "prepared".into(),
            ..Branch::default()
        };
        store
            .write(WriteOp::AddBranches {
                gid: "g1".into(),
                expect_status: "submitted".into(),
                branches: vec![more],
            })
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let got: Vec<(i64, String)> = store
            .find_branches("g1")
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .into_iter()
            .map(|b| (b.id, b.url))
            .collect();
        assert_eq!(
            got,
            vec![
                (1, "http://x/out-r".to_string()),
                (2, "http://x/out".to_string()),
                (3, "http://x/in".to_string())
            ],
            "{old_table}"
        );
        store.close().await;
        let c = Connection::open(&path).unwrap_or_else(|e| panic!("{e}"));
        let old: i64 = c
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name = 'trans_branch_op'",
                [],
                |r| r.get(0),
            )
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(old, 0, "{old_table}");
        drop(c);
        let again = SqliteStore::open(&path, Sync::Normal).unwrap_or_else(|e| panic!("{e}"));
        let n = again
            .find_branches("g1")
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .len();
        assert_eq!(n, 3, "{old_table}");
        again.close().await;
    }

    #[tokio::test]
    async fn branches_keyed_by_gid_are_moved_on_open() {
        earlier_layout_is_moved_on_open("trans_branch_op").await;
    }

    #[tokio::test]
    async fn a_store_without_the_branch_column_gets_it_on_open() {
        earlier_layout_is_moved_on_open("trans_branch").await;
    }

    /// The branches a transaction is saved with are its row's column; the ones added later
    /// are rows. Reads give them in that order with positions as ids; updates reach both;
    /// a (branch_id, op) of either place cannot be added again.
    #[tokio::test]
    async fn saved_branches_are_a_column_added_ones_rows() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("m.sqlite");
        let store = SqliteStore::open(&path, Sync::Normal).unwrap_or_else(|e| panic!("{e}"));
        let br = |id: &str, op: &str| Branch {
            url: format!("http://x/{id}/{op}"),
            branch_id: id.into(),
            op: op.into(),
            status: "prepared".into(),
            bin_data: b"{}".to_vec(),
            ..Branch::default()
        };
        let g = TransGlobal {
            gid: "m".into(),
            trans_type: "tcc".into(),
            status: "prepared".into(),
            ..TransGlobal::default()
        };
        let w = |op: WriteOp| store.write(op);
        w(WriteOp::SaveNew {
            global: g,
            branches: vec![br("01", "cancel"), br("01", "confirm")],
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        let add = |bs: Vec<Branch>| WriteOp::AddBranches {
            gid: "m".into(),
            expect_status: "prepared".into(),
            branches: bs,
        };
        w(add(vec![br("02", "cancel"), br("02", "confirm")]))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        for dup in [br("01", "confirm"), br("02", "cancel")] {
            let got = w(add(vec![br("03", "cancel"), dup.clone()])).await;
            assert_eq!(got, Err(StoreError::UniqueConflict), "{dup:?}");
        }
        let t = Utc::now();
        let up = |id: &str, op: &str| BranchUpdate {
            branch_id: id.into(),
            op: op.into(),
            status: "succeed".into(),
            time: t,
        };
        w(WriteOp::UpdateGlobal {
            gid: "m".into(),
            expect_status: "prepared".into(),
            expect_owner: None,
            set: GlobalUpdate {
                status: Some("submitted".into()),
                update_time: t,
                ..GlobalUpdate::default()
            },
            branches: vec![up("02", "confirm"), up("01", "confirm")],
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        let got: Vec<(i64, String, String, String)> = store
            .find_branches("m")
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .into_iter()
            .map(|b| (b.id, b.gid, b.url, b.status))
            .collect();
        let want =
            |id: i64, u: &str, st: &str| (id, "m".to_string(), u.to_string(), st.to_string());
        assert_eq!(
            got,
            vec![
                want(1, "http://x/01/cancel", "prepared"),
                want(2, "http://x/01/confirm", "succeed"),
                want(3, "http://x/02/cancel", "prepared"),
                want(4, "http://x/02/confirm", "succeed"),
            ]
        );
        store.close().await;
        let c = Connection::open(&path).unwrap_or_else(|e| panic!("{e}"));
        let rows: Vec<(String, String)> = c
            .prepare("SELECT op, status FROM trans_branch ORDER BY id")
            .and_then(|mut st| {
                st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<Result<Vec<_>, _>>()
            })
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            rows,
            vec![
                ("cancel".to_string(), "prepared".to_string()),
                ("confirm".to_string(), "succeed".to_string())
            ],
            "the two added branches, and only those, are rows"
        );
        let column: Vec<u8> = c
            .query_row(
                "SELECT branches FROM trans_global WHERE gid = 'm'",
                [],
                |r| r.get(0),
            )
            .unwrap_or_else(|e| panic!("{e}"));
        let saved = branches::decode(Some(&column)).unwrap_or_else(|e| panic!("{e}"));
        let st: Vec<&str> = saved.iter().map(|b| b.status.as_str()).collect();
        assert_eq!(st, vec!["prepared", "succeed"]);
    }

    /// A list that cannot be decoded fails the reads and writes of its transaction with
    /// a message naming the gid, and leaves the rest of the store working.
    #[tokio::test]
    async fn a_damaged_branch_list_is_a_clear_error_for_its_transaction_only() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("d.sqlite");
        let store = SqliteStore::open(&path, Sync::Normal).unwrap_or_else(|e| panic!("{e}"));
        for gid in ["bad", "good"] {
            let g = TransGlobal {
                gid: gid.into(),
                trans_type: "saga".into(),
                status: "submitted".into(),
                ..TransGlobal::default()
            };
            let b = Branch {
                url: "http://x/a".into(),
                branch_id: "01".into(),
                op: "action".into(),
                status: "prepared".into(),
                ..Branch::default()
            };
            store
                .write(WriteOp::SaveNew {
                    global: g,
                    branches: vec![b],
                })
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let c = Connection::open(&path).unwrap_or_else(|e| panic!("{e}"));
        c.execute(
            "UPDATE trans_global SET branches = X'0100' WHERE gid = 'bad'",
            [],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        drop(c);
        let read = store.find_branches("bad").await;
        assert!(
            matches!(&read, Err(StoreError::Unavailable(m)) if m.contains("gid bad") && m.contains("damaged")),
            "{read:?}"
        );
        let up = |gid: &str| WriteOp::UpdateGlobal {
            gid: gid.into(),
            expect_status: "submitted".into(),
            expect_owner: None,
            set: GlobalUpdate {
                status: Some("succeed".into()),
                update_time: Utc::now(),
                ..GlobalUpdate::default()
            },
            branches: vec![BranchUpdate {
                branch_id: "01".into(),
                op: "action".into(),
                status: "succeed".into(),
                time: Utc::now(),
            }],
        };
        let (bad, good) = tokio::join!(store.write(up("bad")), store.write(up("good")));
        assert!(
            matches!(&bad, Err(StoreError::Unavailable(m)) if m.contains("gid bad")),
            "{bad:?}"
        );
        assert_eq!(good, Ok(WriteOutcome::Done));
        let st = store
            .find_branches("good")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(st[0].status, "succeed");
        let g = store
            .find_global("bad")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(g.map(|g| g.status), Some("submitted".to_string()));
        store.close().await;
    }

    /// A burst of reads runs at most READERS at once, on the READERS reader threads.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_burst_of_reads_is_bounded() {
        use std::collections::HashSet;
        use std::sync::atomic::AtomicUsize;
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = Arc::new(
            SqliteStore::open(&dir.path().join("r.sqlite"), Sync::Normal)
                .unwrap_or_else(|e| panic!("{e}")),
        );
        let now = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let threads = Arc::new(Mutex::new(HashSet::new()));
        let mut tasks = Vec::new();
        for _ in 0..(READERS * 12) {
            let (store, now, most, threads) = (
                Arc::clone(&store),
                Arc::clone(&now),
                Arc::clone(&most),
                Arc::clone(&threads),
            );
            tasks.push(tokio::spawn(async move {
                store
                    .read(move |c| {
                        let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(n, Ordering::SeqCst);
                        if let Ok(mut t) = threads.lock() {
                            t.insert(std::thread::current().id());
                        }
                        std::thread::sleep(std::time::Duration::from_millis(5));
                        now.fetch_sub(1, Ordering::SeqCst);
                        c.query_row("SELECT count(*) FROM trans_global", [], |r| {
                            r.get::<_, i64>(0)
                        })
                    })
                    .await
            }));
        }
        for t in tasks {
            let n = t
                .await
                .unwrap_or_else(|e| panic!("{e}"))
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(n, 0);
        }
        let most = most.load(Ordering::SeqCst);
        assert!((1..=READERS).contains(&most), "{most} reads ran at once");
        let used = threads.lock().map(|t| t.len()).unwrap_or(usize::MAX);
        assert!((1..=READERS).contains(&used), "reads ran on {used} threads");
        store.close().await;
        let after = store.find_global("x").await;
        assert!(
            matches!(&after, Err(StoreError::Unavailable(m)) if m.contains("shutting down")),
            "{after:?}"
        );
    }
}
