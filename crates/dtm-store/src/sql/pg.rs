//! The Postgres driver: connection setup (database and schema created when missing),
//! binding and row decoding.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, NaiveDateTime, Utc};
use dtm_core::store::Kv;
use dtm_proto::{Branch, TransGlobal};
use sqlx_core::connection::Connection;
use sqlx_core::pool::{PoolConnection, PoolOptions};
use sqlx_core::query::{Query, query};
use sqlx_core::row::Row;
use sqlx_core::sql_str::AssertSqlSafe;
use sqlx_core::transaction::Transaction;
use sqlx_postgres::{
    PgArguments, PgConnectOptions, PgConnection, PgPool, PgRow, PgSslMode, Postgres,
};

use super::exec::{
    DbError, Dialect, Engine, ErrClass, Exec, Val, classify_common, number_placeholders,
};
use super::{SqlOptions, quote_ident};

pub(crate) struct PgEngine {
    /// Reads and the other callers.
    pool: PgPool,
    /// The batch writers' connections (see [`PgEngine::begin_batch`]).
    writers: PgPool,
    /// The tables have `trans_global.branches` and `branch_states`.
    column: AtomicBool,
}

fn connect_options(o: &SqlOptions, db: &str) -> PgConnectOptions {
    let mut c = PgConnectOptions::new()
        // no "already exists, skipping" notices from the idempotent DDL in the log
        .options([("client_min_messages", "warning")])
        .host(&o.host)
        .port(o.port)
        .username(&o.user)
        .database(db)
        .ssl_mode(PgSslMode::Disable)
        .application_name("dtm-rs");
    if !o.password.is_empty() {
        c = c.password(&o.password);
    }
    c
}

fn code(e: &DbError) -> Option<String> {
    match e {
        DbError::Database(d) => d.code().map(|c| c.into_owned()),
        _ => None,
    }
}

/// Connect, creating the database and the schema when they are missing.
pub(crate) async fn open(o: &SqlOptions) -> Result<PgEngine, DbError> {
    let target = connect_options(o, &o.db);
    match PgConnection::connect_with(&target).await {
        Ok(c) => {
            let _ = c.close().await;
        }
        // 3D000: invalid_catalog_name, the database does not exist
        Err(e) if code(&e).as_deref() == Some("3D000") => {
            let mut admin = PgConnection::connect_with(&connect_options(o, "postgres")).await?;
            let sql = format!("CREATE DATABASE {}", quote_ident(Dialect::Postgres, &o.db));
            let r = query(AssertSqlSafe(sql)).execute(&mut admin).await;
            let _ = admin.close().await;
            match r {
                Ok(_) => tracing::info!("created postgres database {}", o.db),
                // 42P04 duplicate_database, 23505: another process created it just now
                Err(e) if matches!(code(&e).as_deref(), Some("42P04" | "23505")) => {}
                Err(e) => return Err(e),
            }
        }
        Err(e) => return Err(e),
    }
    {
        let mut c = PgConnection::connect_with(&target).await?;
        // Look first: CREATE SCHEMA IF NOT EXISTS needs the right to create even when the
        // schema exists. Unquoted, the name folds to lower case, as in search_path.
        let exists = query("SELECT 1 FROM pg_namespace WHERE nspname = lower($1)")
            .bind(o.schema.as_str())
            .fetch_optional(&mut c)
            .await;
        let r = match exists {
            Ok(Some(_)) => Ok(Default::default()),
            // The schema name was checked to be a plain identifier (see SqlOptions::check).
            Ok(None) => {
                let sql = format!("CREATE SCHEMA IF NOT EXISTS {}", o.schema);
                query(AssertSqlSafe(sql)).execute(&mut c).await
            }
            Err(e) => Err(e),
        };
        let _ = c.close().await;
        match r {
            Ok(_) => {}
            // 42P06 duplicate_schema / 23505: created concurrently
            Err(e) if matches!(code(&e).as_deref(), Some("42P06" | "23505")) => {}
            Err(e) => return Err(e),
        }
    }
    let opts = target.options([("search_path", o.schema.as_str())]);
    let writer_opts = opts.clone().options([
        ("enable_seqscan", "off"),
        ("enable_hashjoin", "off"),
        ("enable_mergejoin", "off"),
    ]);
    let writers = super::writer_count(o);
    let pool_of = |n: usize, opts: PgConnectOptions| {
        PoolOptions::<Postgres>::new()
            .max_connections(u32::try_from(n).unwrap_or(u32::MAX).max(1))
            .min_connections(0)
            .acquire_timeout(o.acquire_timeout)
            .max_lifetime(o.conn_max_lifetime)
            .idle_timeout(Some(Duration::from_secs(600)))
            .connect_lazy_with(opts)
    };
    Ok(PgEngine {
        pool: pool_of((o.max_open_conns as usize).saturating_sub(writers), opts),
        writers: pool_of(writers, writer_opts),
        column: AtomicBool::new(false),
    })
}

/// Drop the schema (tests).
pub(crate) async fn drop_schema(o: &SqlOptions) -> Result<(), DbError> {
    let mut c = PgConnection::connect_with(&connect_options(o, &o.db)).await?;
    // do not wait long for a server that still holds locks in it
    query("SET lock_timeout = '3s'").execute(&mut c).await?;
    let sql = format!("DROP SCHEMA IF EXISTS {} CASCADE", o.schema);
    let r = query(AssertSqlSafe(sql)).execute(&mut c).await;
    let _ = c.close().await;
    r.map(|_| ())
}

/// Schemas whose name starts with `prefix` (tests).
pub(crate) async fn list_schemas(o: &SqlOptions, prefix: &str) -> Result<Vec<String>, DbError> {
    let mut c = PgConnection::connect_with(&connect_options(o, &o.db)).await?;
    let rows = query("SELECT nspname::text FROM pg_namespace WHERE starts_with(nspname, $1)")
        .bind(prefix)
        .fetch_all(&mut c)
        .await;
    let _ = c.close().await;
    rows?.iter().map(|r| r.try_get::<String, _>(0)).collect()
}

impl PgEngine {
    fn wrap(&self, c: PgConn) -> Box<dyn Exec> {
        Box::new(PgExec {
            c,
            column: self.column.load(Ordering::Relaxed),
        })
    }
}

#[async_trait]
impl Engine for PgEngine {
    fn dialect(&self) -> Dialect {
        Dialect::Postgres
    }

    async fn conn(&self) -> Result<Box<dyn Exec>, DbError> {
        Ok(self.wrap(PgConn::Conn(self.pool.acquire().await?)))
    }

    async fn begin(&self) -> Result<Box<dyn Exec>, DbError> {
        Ok(self.wrap(PgConn::Tx(self.pool.begin().await?)))
    }

    /// The batched statements join an `UNNEST`ed array with the table. Their plan is
    /// prepared once per connection and kept (a generic plan); made while the table is
    /// new and empty (a fresh database, before autovacuum has analyzed it) it would be a
    /// hash join over a sequential scan, and stay so while the table grows. A nested loop
    /// over the unique index is right at every size, so the writers' connections rule
    /// out the others (`enable_seqscan`, `enable_hashjoin`, `enable_mergejoin` off, set
    /// at connection start), on a pool of their own.
    async fn begin_batch(&self) -> Result<Box<dyn Exec>, DbError> {
        Ok(self.wrap(PgConn::Tx(self.writers.begin().await?)))
    }

    /// A batch that is one group is one statement ([`super::batch`]), atomic and
    /// committed on its own: no `BEGIN`/`COMMIT` round trips.
    async fn autocommit_batch(&self) -> Result<Option<Box<dyn Exec>>, DbError> {
        Ok(Some(self.wrap(PgConn::Conn(self.writers.acquire().await?))))
    }

    fn classify(&self, e: &DbError) -> ErrClass {
        if let Some(c) = classify_common(e) {
            return c;
        }
        match code(e).as_deref() {
            Some("23505") => ErrClass::Unique,
            // serialization_failure, deadlock_detected, lock_not_available
            Some("40001" | "40P01" | "55P03") => ErrClass::Retry,
            // connection exceptions, insufficient resources, operator intervention
            // (admin shutdown, cannot connect now), system errors
            Some(c) if c.starts_with("08") || c.starts_with("53") || c.starts_with("57") => {
                ErrClass::Connection
            }
            Some(c) if c.starts_with("58") || c.starts_with("XX") => ErrClass::Connection,
            _ => ErrClass::Statement,
        }
    }

    fn set_branch_column(&self, on: bool) {
        self.column.store(on, Ordering::Relaxed);
    }

    async fn close(&self) {
        self.pool.close().await;
        self.writers.close().await;
    }
}

enum PgConn {
    Conn(PoolConnection<Postgres>),
    Tx(Transaction<'static, Postgres>),
}

struct PgExec {
    c: PgConn,
    /// See [`Exec::branch_column`].
    column: bool,
}

impl PgExec {
    fn raw(&mut self) -> &mut PgConnection {
        match &mut self.c {
            PgConn::Conn(c) => c,
            PgConn::Tx(t) => t,
        }
    }
}

fn build<'q>(sql: &str, args: &[Val<'_>]) -> Query<'q, Postgres, PgArguments> {
    let mut q = query(AssertSqlSafe(number_placeholders(sql)));
    for a in args {
        q = match *a {
            Val::Str(s) => q.bind(s),
            Val::Int(i) => q.bind(i),
            Val::Time(t) => q.bind(t),
            Val::Bytes(b) => q.bind(b),
            Val::OptStr(s) => q.bind(s),
            Val::OptInt(i) => q.bind(i),
            Val::Strs(v) => q.bind(v),
            Val::OptStrs(v) => q.bind(v),
            Val::OptInts(v) => q.bind(v),
            Val::Times(v) => q.bind(v),
            Val::Blobs(v) => q.bind(v),
        };
    }
    q
}

fn text(r: &PgRow, i: usize) -> Result<String, DbError> {
    Ok(r.try_get::<Option<String>, _>(i)?.unwrap_or_default())
}

fn int(r: &PgRow, i: usize) -> Result<Option<i64>, DbError> {
    match r.try_get::<Option<i64>, _>(i) {
        Ok(v) => Ok(v),
        Err(_) => Ok(r.try_get::<Option<i32>, _>(i)?.map(i64::from)),
    }
}

/// `timestamp with time zone`; a `timestamp without time zone` column is read as UTC.
fn tm(r: &PgRow, i: usize) -> Result<Option<DateTime<Utc>>, DbError> {
    match r.try_get::<Option<DateTime<Utc>>, _>(i) {
        Ok(v) => Ok(v),
        Err(_) => Ok(r
            .try_get::<Option<NaiveDateTime>, _>(i)?
            .map(|n| n.and_utc())),
    }
}

fn global(r: &PgRow) -> Result<TransGlobal, DbError> {
    Ok(TransGlobal {
        id: r.try_get(0)?,
        gid: text(r, 1)?,
        trans_type: text(r, 2)?,
        status: text(r, 3)?,
        query_prepared: text(r, 4)?,
        protocol: text(r, 5)?,
        create_time: tm(r, 6)?,
        update_time: tm(r, 7)?,
        finish_time: tm(r, 8)?,
        rollback_time: tm(r, 9)?,
        options: text(r, 10)?,
        custom_data: text(r, 11)?,
        next_cron_interval: int(r, 12)?.unwrap_or(0),
        next_cron_time: tm(r, 13)?,
        owner: text(r, 14)?,
        ext_data: text(r, 15)?,
        result: text(r, 16)?,
        rollback_reason: text(r, 17)?,
    })
}

fn branch(r: &PgRow) -> Result<Branch, DbError> {
    Ok(Branch {
        id: r.try_get(0)?,
        gid: text(r, 1)?,
        url: text(r, 2)?,
        bin_data: r.try_get::<Option<Vec<u8>>, _>(3)?.unwrap_or_default(),
        branch_id: text(r, 4)?,
        op: text(r, 5)?,
        status: text(r, 6)?,
        finish_time: tm(r, 7)?,
        rollback_time: tm(r, 8)?,
        create_time: tm(r, 9)?,
        update_time: tm(r, 10)?,
    })
}

fn kv(r: &PgRow) -> Result<Kv, DbError> {
    Ok(Kv {
        id: r.try_get(0)?,
        cat: text(r, 1)?,
        k: text(r, 2)?,
        v: text(r, 3)?,
        version: int(r, 4)?.unwrap_or(1),
        create_time: tm(r, 5)?,
        update_time: tm(r, 6)?,
    })
}

#[async_trait]
impl Exec for PgExec {
    fn dialect(&self) -> Dialect {
        Dialect::Postgres
    }

    async fn exec(&mut self, sql: &str, args: &[Val<'_>]) -> Result<u64, DbError> {
        Ok(build(sql, args).execute(self.raw()).await?.rows_affected())
    }

    async fn globals(&mut self, sql: &str, args: &[Val<'_>]) -> Result<Vec<TransGlobal>, DbError> {
        let rows = build(sql, args).fetch_all(self.raw()).await?;
        rows.iter().map(global).collect()
    }

    async fn branches(&mut self, sql: &str, args: &[Val<'_>]) -> Result<Vec<Branch>, DbError> {
        let rows = build(sql, args).fetch_all(self.raw()).await?;
        rows.iter().map(branch).collect()
    }

    async fn kvs(&mut self, sql: &str, args: &[Val<'_>]) -> Result<Vec<Kv>, DbError> {
        let rows = build(sql, args).fetch_all(self.raw()).await?;
        rows.iter().map(kv).collect()
    }

    async fn texts(&mut self, sql: &str, args: &[Val<'_>]) -> Result<Vec<String>, DbError> {
        let rows = build(sql, args).fetch_all(self.raw()).await?;
        rows.iter()
            .map(|r| match r.try_get::<Option<String>, _>(0) {
                Ok(s) => Ok(s.unwrap_or_default()),
                Err(_) => Ok(int(r, 0)?.map(|i| i.to_string()).unwrap_or_default()),
            })
            .collect()
    }

    async fn id_texts(
        &mut self,
        sql: &str,
        args: &[Val<'_>],
    ) -> Result<Vec<(i64, String)>, DbError> {
        let rows = build(sql, args).fetch_all(self.raw()).await?;
        rows.iter()
            .map(|r| Ok((int(r, 0)?.unwrap_or_default(), text(r, 1)?)))
            .collect()
    }

    fn branch_column(&self) -> bool {
        self.column
    }

    async fn branch_list(
        &mut self,
        sql: &str,
        args: &[Val<'_>],
    ) -> Result<Option<(Option<Vec<u8>>, Option<String>)>, DbError> {
        let row = build(sql, args).fetch_optional(self.raw()).await?;
        row.map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).transpose()
    }

    async fn commit(self: Box<Self>) -> Result<(), DbError> {
        match self.c {
            PgConn::Conn(_) => Ok(()),
            PgConn::Tx(t) => t.commit().await,
        }
    }

    async fn rollback(self: Box<Self>) -> Result<(), DbError> {
        match self.c {
            PgConn::Conn(_) => Ok(()),
            PgConn::Tx(t) => t.rollback().await,
        }
    }
}
