//! Postgres and MySQL/MariaDB store ([`SqlStore`]), on dtm's tables.
//!
//! - **Tables**: dtm's `trans_global`, `trans_branch_op` and `kv`, same columns and keys,
//!   so a database written by dtm can be taken over. Created when missing, with the
//!   database (and the Postgres schema) when the user may create them. Existing tables are
//!   migrated in place at every start, idempotently: times widened to millisecond
//!   precision, one index for the retention cleanup, and on Postgres the branch columns
//!   (`dtm migrate` runs only this).
//! - **Branches on Postgres**: once `trans_global` has `branches` and `branch_states`, a
//!   new transaction's branches are one value in its row (`crate::branch_list`) and an
//!   update appends their changes to `branch_states`, so a saga costs one row insert and
//!   one row update; branches added later (tcc, xa, workflow registrations) are rows of
//!   `trans_branch_op`, and so is everything dtm wrote. A transaction's branches are its
//!   row's list, then its rows in insertion order. If the columns cannot be added (a user
//!   who may not ALTER the tables), every branch is a row, as on MySQL; reads still find
//!   a saved list (a query that works with or without the columns), and the first one
//!   found means another server added them: from then on this one writes them too.
//! - **Group commit**: a writer task takes every write waiting in its queue (up to
//!   [`MAX_BATCH`]) and applies them in one database transaction, committed once; then
//!   each waiter gets its own result. Two writers run side by side on their own
//!   connections (one executes while the other commits); writes are routed to them by
//!   gid (kv writes by key), so the writes of one transaction keep their order and two
//!   writers never wait for each other's rows of one transaction. Recovery's claims and
//!   cron resets run beside the writers, each in its own transaction
//!   (`SqlStore::run_alone`), so their scans never hold up a batch.
//! - **Grouped statements**: the inserts and guarded updates of a batch (`SaveNew`,
//!   `UpdateGlobal`) run as a few multi-row statements per batch, not two or three per op
//!   (`batch.rs`); a gid that comes again in the batch starts the next group, and other
//!   ops run op by op before or after a group as their rows require, so the batch keeps
//!   its order per transaction. A logical failure of one op (a guard that does
//!   not match, a key that exists) changes nothing and does not disturb the others. A
//!   database error inside an op (say a value too long for its column) rolls the
//!   transaction back; the batch is run again op by op, then again without that op,
//!   which gets the error. This needs no SAVEPOINT per op: no Postgres subtransactions
//!   (more than 64 in one transaction slow down every reader).
//!   Deadlocks and serialization failures rerun the batch, a few times.
//! - **No row locks held across calls**: changes are conditional updates
//!   (`WHERE gid = ? AND status = ? [AND owner = ?]`). Recovery claims due rows with
//!   `FOR UPDATE SKIP LOCKED`, so several servers share one database.
//! - **Unreachable database**: every call fails with `StoreError::Unavailable` saying
//!   what is wrong (HTTP 503); the pool reconnects by itself. A write is answered only
//!   after its commit.

mod batch;
mod exec;
mod mysql;
mod ops;
mod pg;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, FixedOffset, Utc};
use dtm_core::store::{Kv, ScanQuery, Store, StoreError, WriteOp, WriteOutcome};
use dtm_proto::{Branch, TransGlobal};
use rand::Rng;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use batch::Place;
pub use exec::Dialect;
use exec::{DbError, Engine, ErrClass, Exec};
use ops::OpError;

/// Most writes one commit takes.
pub const MAX_BATCH: usize = 256;
/// Most writer tasks (each uses one connection while it commits). A batch costs a few
/// statements whatever its size (see `batch`), so fewer writers with bigger batches use
/// less CPU per write than many with small ones; two let one batch execute while the
/// other commits.
const MAX_WRITERS: usize = 2;
/// How often a batch is run again after a deadlock or serialization failure.
const RETRIES: usize = 3;

/// Where and how to connect (dtm's `Store.*` keys).
#[derive(Debug, Clone)]
pub struct SqlOptions {
    pub dialect: Dialect,
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    /// Database; created when missing.
    pub db: String,
    /// Postgres schema (search_path); created when missing. Unused by MySQL.
    pub schema: String,
    /// Pool size (`Store.MaxOpenConns`).
    pub max_open_conns: u32,
    /// Connections are replaced after this long (`Store.ConnMaxLifeTime`).
    pub conn_max_lifetime: Option<Duration>,
    /// How long a call waits for a connection before it fails as unavailable.
    pub acquire_timeout: Duration,
    /// MySQL `datetime` zone, hours east of UTC (`TimeZoneOffset`); `None`: the process's
    /// local zone, as dtm.
    pub utc_offset_hours: Option<i32>,
}

impl SqlOptions {
    pub fn new(dialect: Dialect) -> SqlOptions {
        let (port, user) = match dialect {
            Dialect::Postgres => (5432, "postgres"),
            Dialect::MySql => (3306, "root"),
        };
        SqlOptions {
            dialect,
            host: "127.0.0.1".into(),
            port,
            user: user.into(),
            password: String::new(),
            db: "dtm".into(),
            schema: "public".into(),
            max_open_conns: 100,
            conn_max_lifetime: Some(Duration::from_secs(300)),
            acquire_timeout: Duration::from_secs(3),
            utc_offset_hours: None,
        }
    }

    /// `postgres://user@host:port/db?schema=s` (no password), for logs and messages.
    pub fn describe(&self) -> String {
        match self.dialect {
            Dialect::Postgres => format!(
                "postgres://{}@{}:{}/{}?schema={}",
                self.user, self.host, self.port, self.db, self.schema
            ),
            Dialect::MySql => format!(
                "mysql://{}@{}:{}/{}",
                self.user, self.host, self.port, self.db
            ),
        }
    }

    /// Reject values that cannot work, saying which key to fix.
    pub fn check(&self) -> Result<(), String> {
        if self.host.is_empty() {
            return Err("Store.Host (STORE_HOST) is empty: set the database host".into());
        }
        if self.port == 0 {
            return Err("Store.Port (STORE_PORT) is 0: set the database port".into());
        }
        if self.user.is_empty() {
            return Err("Store.User (STORE_USER) is empty: set the database user".into());
        }
        if self.db.is_empty() || self.db.contains('\0') || self.db.len() > 64 {
            return Err(format!(
                "Store.Db (STORE_DB) '{}' is not a usable database name (1 to 64 characters)",
                self.db
            ));
        }
        if self.dialect == Dialect::Postgres && !plain_identifier(&self.schema) {
            return Err(format!(
                "Store.Schema (STORE_SCHEMA) '{}' must be a plain identifier: letters, digits and _ (not starting with a digit), at most 63 characters",
                self.schema
            ));
        }
        if let Some(h) = self.utc_offset_hours
            && !(-23..=23).contains(&h)
        {
            return Err(format!(
                "TimeZoneOffset (TIME_ZONE_OFFSET) must be whole hours between -23 and 23, got {h}"
            ));
        }
        Ok(())
    }
}

fn plain_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && s.len() <= 63
}

/// A quoted identifier (database names).
pub(crate) fn quote_ident(d: Dialect, name: &str) -> String {
    match d {
        Dialect::Postgres => format!("\"{}\"", name.replace('"', "\"\"")),
        Dialect::MySql => format!("`{}`", name.replace('`', "``")),
    }
}

struct Job {
    op: WriteOp,
    reply: oneshot::Sender<Result<WriteOutcome, StoreError>>,
}

/// The Postgres / MySQL store. See the module documentation.
pub struct SqlStore {
    engine: Arc<dyn Engine>,
    desc: Arc<str>,
    errs: Errs,
    writers: Mutex<Vec<mpsc::UnboundedSender<Job>>>,
    writer_tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// Turns a driver error into what a caller is told.
#[derive(Clone)]
struct Errs {
    desc: Arc<str>,
    acquire_timeout: Duration,
}

impl Errs {
    fn store(&self, class: ErrClass, what: &str, e: &DbError) -> StoreError {
        let desc = &self.desc;
        StoreError::Unavailable(match (class, e) {
            (_, DbError::PoolTimedOut) => format!(
                "{desc}: no database connection within {}s while trying to {what}: the database is down or unreachable, or all Store.MaxOpenConns connections are busy; dtm-rs reconnects by itself",
                self.acquire_timeout.as_secs()
            ),
            (ErrClass::Connection, _) => format!(
                "{desc}: cannot {what}: {e}. Check that the database server runs and that Store.Host, Store.Port, Store.User and Store.Password are right; dtm-rs reconnects by itself"
            ),
            _ => format!("{desc} refused to {what}: {e}"),
        })
    }
}

impl SqlStore {
    /// Connect, create or migrate the tables, and start the writer. Fails with
    /// `Unavailable` when the database cannot be reached or set up.
    pub async fn open(o: &SqlOptions) -> Result<SqlStore, StoreError> {
        o.check().map_err(StoreError::Unavailable)?;
        let desc: Arc<str> = o.describe().into();
        let errs = Errs {
            desc: Arc::clone(&desc),
            acquire_timeout: o.acquire_timeout,
        };
        let engine: Arc<dyn Engine> = match o.dialect {
            Dialect::Postgres => pg::open(o).await.map(|e| Arc::new(e) as Arc<dyn Engine>),
            Dialect::MySql => {
                let zone = match o.utc_offset_hours {
                    Some(h) => FixedOffset::east_opt(h * 3600)
                        .map(mysql::Zone::Fixed)
                        .unwrap_or(mysql::Zone::Local),
                    None => mysql::Zone::Local,
                };
                mysql::open(o, zone)
                    .await
                    .map(|e| Arc::new(e) as Arc<dyn Engine>)
            }
        }
        .map_err(|e| open_error(&errs, o, &e))?;
        let m = migrate(&*engine)
            .await
            .map_err(|e| errs.store(engine.classify(&e), "create or migrate the tables", &e))?;
        engine.set_branch_column(m.branch_column);
        for d in m.done {
            tracing::info!("{desc}: schema: {d}");
        }
        for w in m.warnings {
            tracing::warn!("{desc}: {w}");
        }
        let n = writer_count(o);
        let mut writers = Vec::with_capacity(n);
        let mut tasks = Vec::with_capacity(n);
        for _ in 0..n {
            let (tx, rx) = mpsc::unbounded_channel();
            writers.push(tx);
            tasks.push(tokio::spawn(writer_loop(
                Arc::clone(&engine),
                errs.clone(),
                rx,
            )));
        }
        Ok(SqlStore {
            engine,
            desc,
            errs,
            writers: Mutex::new(writers),
            writer_tasks: Mutex::new(tasks),
        })
    }

    /// Recovery's claims and cron resets, each in its own transaction on a pooled
    /// connection, not in a writer's batch. They read many rows and can take tens of
    /// milliseconds (on Postgres a claim also walks the index entries that updates since
    /// the last vacuum left behind); in a batch they held up every change queued behind
    /// them. They need no order with the writers' changes: another server claims at any
    /// moment too, and rows a writer holds are skipped (`SKIP LOCKED`).
    async fn run_alone(&self, op: &WriteOp) -> Result<WriteOutcome, StoreError> {
        let what = match op {
            WriteOp::ClaimDue { .. } => "claim due transactions",
            _ => "reset the next retry times",
        };
        if self.writers.lock().map(|w| w.is_empty()).unwrap_or(true) {
            return Err(StoreError::Unavailable(format!(
                "{}: the store is shutting down",
                self.desc
            )));
        }
        let mut retries = 0;
        loop {
            let mut tx = self.engine.begin().await.map_err(|e| self.fail(what, e))?;
            let err = match self.apply_alone(&mut *tx, op).await {
                Ok(out) => match tx.commit().await {
                    Ok(()) => return Ok(out),
                    Err(e) => e,
                },
                Err(OpError::Logical(e)) => {
                    let _ = tx.rollback().await;
                    return Err(e);
                }
                Err(OpError::Db(e)) => {
                    let _ = tx.rollback().await;
                    e
                }
            };
            if self.engine.classify(&err) == ErrClass::Retry && retries < RETRIES {
                retries += 1;
                let ms = rand::rng().random_range(5..50u64);
                tracing::debug!("{}: {err}; trying again", self.desc);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                continue;
            }
            return Err(self.fail(what, err));
        }
    }

    async fn apply_alone(&self, tx: &mut dyn Exec, op: &WriteOp) -> Result<WriteOutcome, OpError> {
        if self.engine.dialect() == Dialect::Postgres {
            // an index scan is right at every table size; a plan made while the table is
            // small must not keep a sequential scan (as on the writers' connections)
            tx.exec("SET LOCAL enable_seqscan = off", &[]).await?;
        }
        ops::apply(tx, op).await
    }

    fn fail(&self, what: &str, e: DbError) -> StoreError {
        self.errs.store(self.engine.classify(&e), what, &e)
    }

    async fn conn(&self, what: &str) -> Result<Box<dyn Exec>, StoreError> {
        self.engine.conn().await.map_err(|e| self.fail(what, e))
    }
}

fn open_error(errs: &Errs, o: &SqlOptions, e: &DbError) -> StoreError {
    let hint = match e {
        DbError::Database(d) => {
            let code = d.code().map(|c| c.into_owned()).unwrap_or_default();
            let msg = d.message().to_ascii_lowercase();
            if code.starts_with("28") || msg.contains("access denied") {
                " Check Store.User and Store.Password."
            } else if code == "42501" || msg.contains("permission") {
                " The user may not create the database or schema: create it, or grant the right, then start again."
            } else {
                ""
            }
        }
        DbError::Configuration(c) if c.to_string().contains("RSA") => {
            " The MySQL user signs in with caching_sha2_password, which needs TLS or RSA that this build leaves out: give the user mysql_native_password (ALTER USER ... IDENTIFIED WITH mysql_native_password BY '...')."
        }
        _ => "",
    };
    let base = errs.store(
        ErrClass::Connection,
        &format!("connect to database {}", o.db),
        e,
    );
    match base {
        StoreError::Unavailable(m) => StoreError::Unavailable(format!("{m}{hint}")),
        other => other,
    }
}

/// Create or migrate the tables (what `dtm migrate` does).
async fn migrate(engine: &dyn Engine) -> Result<ops::Migration, DbError> {
    // Postgres runs the DDL in one transaction; MySQL commits each DDL statement anyway.
    let mut c = match engine.dialect() {
        Dialect::Postgres => engine.begin().await?,
        Dialect::MySql => engine.conn().await?,
    };
    match ops::migrate(&mut *c).await {
        Ok(done) => {
            c.commit().await?;
            Ok(done)
        }
        Err(e) => {
            let _ = c.rollback().await;
            Err(e)
        }
    }
}

/// Writer tasks for these options: at most [`MAX_WRITERS`], leaving at least half of
/// `MaxOpenConns` to reads.
pub(crate) fn writer_count(o: &SqlOptions) -> usize {
    (o.max_open_conns as usize / 2).clamp(1, MAX_WRITERS)
}

/// The writer an op goes to, of `n` (None when there are none: closed).
fn shard(op: &WriteOp, n: usize) -> Option<usize> {
    use std::hash::{Hash, Hasher};
    if n == 0 {
        return None;
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    match op {
        WriteOp::SaveNew { global, .. } => global.gid.hash(&mut h),
        WriteOp::AddBranches { gid, .. }
        | WriteOp::UpdateGlobal { gid, .. }
        | WriteOp::ResetNextCronTime { gid, .. } => gid.hash(&mut h),
        WriteOp::CreateKv { cat, k, .. }
        | WriteOp::UpdateKv { cat, k, .. }
        | WriteOp::DeleteKv { cat, k } => (cat, k).hash(&mut h),
        // not sent to a writer (`SqlStore::run_alone`)
        WriteOp::ClaimDue { .. } | WriteOp::ResetCronTime { .. } => return Some(0),
    }
    Some((h.finish() % n as u64) as usize)
}

async fn writer_loop(engine: Arc<dyn Engine>, errs: Errs, mut rx: mpsc::UnboundedReceiver<Job>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        let ops: Vec<&WriteOp> = batch.iter().map(|j| &j.op).collect();
        let results = run_batch(&*engine, &errs, &ops).await;
        for (job, r) in batch.into_iter().zip(results) {
            let _ = job.reply.send(r);
        }
    }
}

/// Apply `ops` in one transaction; one result per op.
async fn run_batch(
    engine: &dyn Engine,
    errs: &Errs,
    ops: &[&WriteOp],
) -> Vec<Result<WriteOutcome, StoreError>> {
    // Ops that failed with a database error in an earlier run, and their errors.
    let mut failed: Vec<Option<StoreError>> = vec![None; ops.len()];
    let mut retries = 0;
    // grouped statements first; op by op once one of them failed (to find the op)
    let mut grouped = true;
    loop {
        match try_batch(engine, errs, ops, &mut failed, grouped).await {
            Attempt::Done(results) => return results,
            Attempt::Rerun => continue,
            Attempt::OneByOne => {
                grouped = false;
                continue;
            }
            Attempt::Fail(class, what, e) => {
                if class == ErrClass::Retry && retries < RETRIES {
                    retries += 1;
                    let ms = rand::rng().random_range(5..50u64);
                    tracing::debug!("{}: {e}; running the batch again", errs.desc);
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    continue;
                }
                let err = errs.store(class, what, &e);
                return ops.iter().map(|_| Err(err.clone())).collect();
            }
        }
    }
}

enum Attempt {
    Done(Vec<Result<WriteOutcome, StoreError>>),
    /// An op failed with a database error and is now marked in `failed`.
    Rerun,
    /// A grouped statement failed with a database error: run the batch op by op, which
    /// tells the op.
    OneByOne,
    Fail(ErrClass, &'static str, DbError),
}

/// Ops of the batch waiting to run as one group (distinct group keys).
#[derive(Default)]
struct Group {
    at: Vec<usize>,
    keys: HashSet<String>,
}

/// Whether every op of the batch goes into one group (grouped kinds, distinct keys).
fn one_group(d: Dialect, ops: &[&WriteOp]) -> bool {
    let mut keys = HashSet::with_capacity(ops.len());
    ops.iter().all(|op| match batch::place(d, op) {
        Place::Group(k) => keys.insert(k),
        _ => false,
    })
}

/// A batch that is one group, written by one statement in autocommit mode: it commits
/// whole or not at all.
async fn one_statement(
    engine: &dyn Engine,
    errs: &Errs,
    c: &mut dyn Exec,
    ops: &[&WriteOp],
) -> Attempt {
    match batch::apply_group(c, ops).await {
        Ok(rs) => Attempt::Done(rs),
        // in autocommit mode a failed statement is like a failed COMMIT
        Err(e) => group_failed(engine, errs, e),
    }
}

/// What to do after a grouped statement failed (its changes are rolled back): a database
/// error cannot be pinned on one op, so the batch runs again op by op, which finds it;
/// deadlocks and lost connections fail (or rerun) the batch.
fn group_failed(engine: &dyn Engine, errs: &Errs, e: DbError) -> Attempt {
    match engine.classify(&e) {
        ErrClass::Unique | ErrClass::Statement => {
            tracing::debug!(
                "{}: {e}; running the batch op by op to find the op",
                errs.desc
            );
            Attempt::OneByOne
        }
        class @ (ErrClass::Retry | ErrClass::Connection) => {
            Attempt::Fail(class, "apply the change", e)
        }
    }
}

async fn try_batch(
    engine: &dyn Engine,
    errs: &Errs,
    ops: &[&WriteOp],
    failed: &mut [Option<StoreError>],
    grouped: bool,
) -> Attempt {
    let live = failed.iter().filter(|f| f.is_none()).count();
    if live == 0 {
        return Attempt::Done(
            failed
                .iter()
                .map(|f| Err(f.clone().unwrap_or(StoreError::NotFound)))
                .collect(),
        );
    }
    let d = engine.dialect();
    if grouped && live == ops.len() && batch::group_is_one_statement(d) && one_group(d, ops) {
        match engine.autocommit_batch().await {
            Ok(Some(mut c)) => return one_statement(engine, errs, &mut *c, ops).await,
            Ok(None) => {}
            Err(e) => return Attempt::Fail(engine.classify(&e), "connect", e),
        }
    }
    let mut tx = match engine.begin_batch().await {
        Ok(tx) => tx,
        Err(e) => return Attempt::Fail(engine.classify(&e), "start a transaction", e),
    };
    let mut results: Vec<Option<Result<WriteOutcome, StoreError>>> = vec![None; ops.len()];
    let mut group = Group::default();
    // i == ops.len(): the end, where the last group runs
    for i in 0..=ops.len() {
        let place = match ops.get(i) {
            Some(_) if failed[i].is_some() => continue,
            Some(op) if grouped => batch::place(d, op),
            _ => Place::After,
        };
        // run the group first when this op must follow it, to keep the order
        let after_group = match &place {
            Place::Group(k) | Place::Before(k) => group.keys.contains(k),
            Place::Free => false,
            Place::After => true,
        };
        if after_group && !group.at.is_empty() {
            let g = std::mem::take(&mut group);
            let gops: Vec<&WriteOp> = g.at.iter().map(|&j| ops[j]).collect();
            match batch::apply_group(&mut *tx, &gops).await {
                Ok(rs) => {
                    for (j, r) in g.at.into_iter().zip(rs) {
                        results[j] = Some(r);
                    }
                }
                Err(e) => {
                    let _ = tx.rollback().await;
                    return group_failed(engine, errs, e);
                }
            }
        }
        let Some(op) = ops.get(i) else { break };
        if let Place::Group(k) = place {
            group.keys.insert(k);
            group.at.push(i);
            continue;
        }
        match ops::apply(&mut *tx, op).await {
            Ok(out) => results[i] = Some(Ok(out)),
            Err(OpError::Logical(e)) => results[i] = Some(Err(e)),
            Err(OpError::Db(e)) => {
                let class = engine.classify(&e);
                let _ = tx.rollback().await;
                match class {
                    ErrClass::Unique => {
                        failed[i] = Some(StoreError::UniqueConflict);
                        return Attempt::Rerun;
                    }
                    ErrClass::Statement => {
                        failed[i] = Some(errs.store(class, "apply the change", &e));
                        return Attempt::Rerun;
                    }
                    ErrClass::Retry | ErrClass::Connection => {
                        return Attempt::Fail(class, "apply the change", e);
                    }
                }
            }
        }
    }
    let results: Vec<Result<WriteOutcome, StoreError>> = results
        .into_iter()
        .zip(failed.iter())
        .map(|(r, f)| match (r, f) {
            (Some(r), _) => r,
            (None, Some(e)) => Err(e.clone()),
            (None, None) => Err(StoreError::NotFound),
        })
        .collect();
    if results.iter().all(|r| r.is_err()) {
        // nothing changed: no commit needed
        let _ = tx.rollback().await;
        return Attempt::Done(results);
    }
    match tx.commit().await {
        Ok(()) => Attempt::Done(results),
        Err(e) => Attempt::Fail(
            engine.classify(&e),
            "commit (the change may or may not be applied)",
            e,
        ),
    }
}

#[async_trait]
impl Store for SqlStore {
    fn describe(&self) -> String {
        self.desc.to_string()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut c = self.conn("ping the database").await?;
        c.texts("SELECT 1", &[])
            .await
            .map_err(|e| self.fail("ping the database", e))?;
        Ok(())
    }

    async fn find_global(&self, gid: &str) -> Result<Option<TransGlobal>, StoreError> {
        let what = "read a transaction";
        let mut c = self.conn(what).await?;
        ops::find_global(&mut *c, gid)
            .await
            .map_err(|e| self.fail(what, e))
    }

    async fn find_branches(&self, gid: &str) -> Result<Vec<Branch>, StoreError> {
        let what = "read branches";
        let mut c = self.conn(what).await?;
        let (branches, found_unknown) = ops::find_branches(&mut *c, gid)
            .await
            .map_err(|e| self.fail(what, e))?;
        if found_unknown {
            tracing::info!(
                "{}: another server added trans_global.branches after this one started; saving new transactions' branches there from now on",
                self.desc
            );
            self.engine.set_branch_column(true);
        }
        Ok(branches)
    }

    async fn scan_globals(&self, q: &ScanQuery) -> Result<(Vec<TransGlobal>, String), StoreError> {
        let what = "list transactions";
        let mut c = self.conn(what).await?;
        ops::scan_globals(&mut *c, q)
            .await
            .map_err(|e| self.fail(what, e))
    }

    async fn scan_kv(
        &self,
        cat: &str,
        position: &str,
        limit: usize,
    ) -> Result<(Vec<Kv>, String), StoreError> {
        let what = "list kv entries";
        let mut c = self.conn(what).await?;
        ops::scan_kv(&mut *c, cat, position, limit)
            .await
            .map_err(|e| self.fail(what, e))
    }

    async fn find_kv(&self, cat: &str, k: Option<&str>) -> Result<Vec<Kv>, StoreError> {
        let what = "read kv entries";
        let mut c = self.conn(what).await?;
        ops::find_kv(&mut *c, cat, k)
            .await
            .map_err(|e| self.fail(what, e))
    }

    async fn write(&self, op: WriteOp) -> Result<WriteOutcome, StoreError> {
        if matches!(op, WriteOp::ClaimDue { .. } | WriteOp::ResetCronTime { .. }) {
            return self.run_alone(&op).await;
        }
        let (reply, rx) = oneshot::channel();
        let sender = self.writers.lock().ok().and_then(|w| {
            let i = shard(&op, w.len())?;
            w.get(i).cloned()
        });
        let Some(sender) = sender else {
            return Err(StoreError::Unavailable(format!(
                "{}: the store is shutting down",
                self.desc
            )));
        };
        let stopped =
            || StoreError::Unavailable(format!("{}: the store writer has stopped", self.desc));
        sender.send(Job { op, reply }).map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    async fn close(&self) {
        if let Ok(mut w) = self.writers.lock() {
            w.clear();
        }
        crate::join_writer_tasks(&self.writer_tasks).await;
        self.engine.close().await;
    }

    async fn purge_finished(
        &self,
        before: DateTime<Utc>,
        limit: usize,
    ) -> Result<usize, StoreError> {
        let what = "delete old finished transactions";
        let mut tx = self.engine.begin().await.map_err(|e| self.fail(what, e))?;
        match ops::purge_finished(&mut *tx, before, limit).await {
            Ok(n) => {
                tx.commit().await.map_err(|e| self.fail(what, e))?;
                Ok(n)
            }
            Err(e) => {
                let _ = tx.rollback().await;
                Err(self.fail(what, e))
            }
        }
    }
}

/// `dtm migrate`: create or upgrade the tables and return what was done. Unlike
/// [`SqlStore::open`], an upgrade that cannot be made is an error.
pub async fn migrate_only(o: &SqlOptions) -> Result<Vec<String>, StoreError> {
    o.check().map_err(StoreError::Unavailable)?;
    let errs = Errs {
        desc: o.describe().into(),
        acquire_timeout: o.acquire_timeout,
    };
    let engine: Box<dyn Engine> = match o.dialect {
        Dialect::Postgres => pg::open(o).await.map(|e| Box::new(e) as Box<dyn Engine>),
        Dialect::MySql => mysql::open(o, mysql::Zone::Local)
            .await
            .map(|e| Box::new(e) as Box<dyn Engine>),
    }
    .map_err(|e| open_error(&errs, o, &e))?;
    let r = migrate(&*engine)
        .await
        .map_err(|e| errs.store(engine.classify(&e), "create or migrate the tables", &e));
    engine.close().await;
    let m = r?;
    if !m.warnings.is_empty() {
        return Err(StoreError::Unavailable(format!(
            "{}: {}",
            errs.desc,
            m.warnings.join("; ")
        )));
    }
    Ok(m.done)
}

/// Drop the store's namespace: the Postgres schema or the MySQL database, with all data.
/// For tests, which give each server a namespace of its own.
pub async fn drop_namespace(o: &SqlOptions) -> Result<(), StoreError> {
    let r = match o.dialect {
        Dialect::Postgres => {
            if !plain_identifier(&o.schema) {
                return Err(StoreError::Unavailable(format!(
                    "not a plain schema name: {}",
                    o.schema
                )));
            }
            pg::drop_schema(o).await
        }
        Dialect::MySql => mysql::drop_database(o).await,
    };
    r.map_err(|e| StoreError::Unavailable(format!("{}: cannot drop: {e}", o.describe())))
}

/// Names of the namespaces (Postgres schemas in `o.db`, or MySQL databases) that start with
/// `prefix`. For tests, to remove what crashed runs left behind.
pub async fn list_namespaces(o: &SqlOptions, prefix: &str) -> Result<Vec<String>, StoreError> {
    let r = match o.dialect {
        Dialect::Postgres => pg::list_schemas(o, prefix).await,
        Dialect::MySql => mysql::list_databases(o, prefix).await,
    };
    r.map_err(|e| StoreError::Unavailable(format!("{}: cannot list: {e}", o.describe())))
}
