//! The MySQL / MariaDB driver: connection setup (database created when missing), binding
//! and row decoding.
//!
//! Times: dtm stores `datetime` columns in the process's local time (its DSN has
//! `loc=Local`), so this driver does the same: a UTC instant is written as the local
//! wall-clock time of `Store`'s zone (the process zone, or `TimeZoneOffset` hours) and read
//! back the same way. A database shared with dtm then agrees on every time.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, FixedOffset, Local, NaiveDateTime, TimeZone, Utc};
use dtm_core::store::Kv;
use dtm_proto::{Branch, TransGlobal};
use sqlx_core::connection::Connection;
use sqlx_core::executor::Executor;
use sqlx_core::pool::{PoolConnection, PoolOptions};
use sqlx_core::query::{Query, query};
use sqlx_core::row::Row;
use sqlx_core::sql_str::AssertSqlSafe;
use sqlx_core::transaction::Transaction;
use sqlx_mysql::{
    MySql, MySqlArguments, MySqlConnectOptions, MySqlConnection, MySqlDatabaseError, MySqlPool,
    MySqlRow, MySqlSslMode,
};

use super::exec::{DbError, Dialect, Engine, ErrClass, Exec, Val, array_on_mysql, classify_common};
use super::{SqlOptions, quote_ident};

/// The zone `datetime` values are written in.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Zone {
    Local,
    Fixed(FixedOffset),
}

impl Zone {
    fn write_db(self, t: DateTime<Utc>) -> NaiveDateTime {
        match self {
            Zone::Local => t.with_timezone(&Local).naive_local(),
            Zone::Fixed(z) => t.with_timezone(&z).naive_local(),
        }
    }

    fn read_db(self, n: NaiveDateTime) -> DateTime<Utc> {
        let t = match self {
            Zone::Local => Local
                .from_local_datetime(&n)
                .earliest()
                .map(|t| t.with_timezone(&Utc)),
            Zone::Fixed(z) => z
                .from_local_datetime(&n)
                .earliest()
                .map(|t| t.with_timezone(&Utc)),
        };
        // a wall-clock time inside a DST gap: read it as UTC rather than fail
        t.unwrap_or_else(|| n.and_utc())
    }
}

pub(crate) struct MySqlEngine {
    pool: MySqlPool,
    zone: Zone,
}

fn connect_options(o: &SqlOptions) -> MySqlConnectOptions {
    let mut c = MySqlConnectOptions::new()
        .host(&o.host)
        .port(o.port)
        .username(&o.user)
        .charset("utf8mb4")
        .ssl_mode(MySqlSslMode::Disabled);
    if !o.password.is_empty() {
        c = c.password(&o.password);
    }
    c
}

fn number(e: &DbError) -> Option<u16> {
    match e {
        DbError::Database(d) => d
            .try_downcast_ref::<MySqlDatabaseError>()
            .map(|m| m.number()),
        _ => None,
    }
}

const ER_BAD_DB_ERROR: u16 = 1049;

/// Connect, creating the database when it is missing.
pub(crate) async fn open(o: &SqlOptions, zone: Zone) -> Result<MySqlEngine, DbError> {
    let target = connect_options(o).database(&o.db);
    match MySqlConnection::connect_with(&target).await {
        Ok(c) => {
            let _ = c.close().await;
        }
        Err(e) if number(&e) == Some(ER_BAD_DB_ERROR) => {
            let mut admin = MySqlConnection::connect_with(&connect_options(o)).await?;
            let sql = format!(
                "CREATE DATABASE IF NOT EXISTS {} CHARACTER SET utf8mb4",
                quote_ident(Dialect::MySql, &o.db)
            );
            let r = query(AssertSqlSafe(sql)).execute(&mut admin).await;
            let _ = admin.close().await;
            r?;
            tracing::info!("created mysql database {}", o.db);
        }
        Err(e) => return Err(e),
    }
    let pool = PoolOptions::<MySql>::new()
        .max_connections(o.max_open_conns.max(1))
        .min_connections(0)
        .acquire_timeout(o.acquire_timeout)
        .max_lifetime(o.conn_max_lifetime)
        .idle_timeout(Some(Duration::from_secs(600)))
        .after_connect(|c, _| {
            Box::pin(async move {
                // Row locks only on rows that match, and no gap locks: the claim query
                // (FOR UPDATE SKIP LOCKED) then locks just the rows it returns.
                c.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
                    .await?;
                Ok(())
            })
        })
        .connect_lazy_with(target);
    Ok(MySqlEngine { pool, zone })
}

/// Drop the database (tests).
pub(crate) async fn drop_database(o: &SqlOptions) -> Result<(), DbError> {
    let mut c = MySqlConnection::connect_with(&connect_options(o)).await?;
    // do not wait long for a server that still holds locks in it
    query("SET SESSION lock_wait_timeout = 3")
        .execute(&mut c)
        .await?;
    let sql = format!(
        "DROP DATABASE IF EXISTS {}",
        quote_ident(Dialect::MySql, &o.db)
    );
    let r = query(AssertSqlSafe(sql)).execute(&mut c).await;
    let _ = c.close().await;
    r.map(|_| ())
}

/// Databases whose name starts with `prefix` (tests).
pub(crate) async fn list_databases(o: &SqlOptions, prefix: &str) -> Result<Vec<String>, DbError> {
    let mut c = MySqlConnection::connect_with(&connect_options(o)).await?;
    let rows = query(
        "SELECT CAST(SCHEMA_NAME AS CHAR) FROM information_schema.SCHEMATA WHERE LEFT(SCHEMA_NAME, CHAR_LENGTH(?)) = ?",
    )
    .bind(prefix)
    .bind(prefix)
    .fetch_all(&mut c)
    .await;
    let _ = c.close().await;
    rows?.iter().map(|r| r.try_get::<String, _>(0)).collect()
}

#[async_trait]
impl Engine for MySqlEngine {
    fn dialect(&self) -> Dialect {
        Dialect::MySql
    }

    async fn conn(&self) -> Result<Box<dyn Exec>, DbError> {
        Ok(Box::new(MyExec {
            c: MyConn::Conn(self.pool.acquire().await?),
            zone: self.zone,
        }))
    }

    async fn begin(&self) -> Result<Box<dyn Exec>, DbError> {
        Ok(Box::new(MyExec {
            c: MyConn::Tx(self.pool.begin().await?),
            zone: self.zone,
        }))
    }

    fn classify(&self, e: &DbError) -> ErrClass {
        if let Some(c) = classify_common(e) {
            return c;
        }
        if let DbError::Database(d) = e
            && d.kind() == sqlx_core::error::ErrorKind::UniqueViolation
        {
            return ErrClass::Unique;
        }
        match number(e) {
            // ER_LOCK_DEADLOCK, ER_LOCK_WAIT_TIMEOUT
            Some(1213 | 1205) => ErrClass::Retry,
            // server shutdown, lost connection, too many connections, read-only
            Some(1053 | 1077 | 1040 | 1290 | 2006 | 2013) => ErrClass::Connection,
            _ => ErrClass::Statement,
        }
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}

enum MyConn {
    Conn(PoolConnection<MySql>),
    Tx(Transaction<'static, MySql>),
}

struct MyExec {
    c: MyConn,
    zone: Zone,
}

impl MyExec {
    fn raw(&mut self) -> &mut MySqlConnection {
        match &mut self.c {
            MyConn::Conn(c) => c,
            MyConn::Tx(t) => t,
        }
    }
}

fn build<'q>(
    sql: &str,
    args: &[Val<'_>],
    zone: Zone,
) -> Result<Query<'q, MySql, MySqlArguments>, DbError> {
    let mut q = query(AssertSqlSafe(sql.to_string()));
    for a in args {
        q = match *a {
            Val::Str(s) => q.bind(s),
            Val::Int(i) => q.bind(i),
            Val::Time(t) => q.bind(t.map(|t| zone.write_db(t))),
            Val::Bytes(b) => q.bind(b),
            Val::OptStr(s) => q.bind(s),
            Val::OptInt(i) => q.bind(i),
            Val::Strs(_) | Val::OptStrs(_) | Val::OptInts(_) | Val::Times(_) | Val::Blobs(_) => {
                return Err(array_on_mysql());
            }
        };
    }
    Ok(q)
}

fn text(r: &MySqlRow, i: usize) -> Result<String, DbError> {
    Ok(r.try_get::<Option<String>, _>(i)?.unwrap_or_default())
}

fn int(r: &MySqlRow, i: usize) -> Result<Option<i64>, DbError> {
    r.try_get::<Option<i64>, _>(i)
}

struct Rd<'a> {
    r: &'a MySqlRow,
    zone: Zone,
}

impl Rd<'_> {
    fn tm(&self, i: usize) -> Result<Option<DateTime<Utc>>, DbError> {
        Ok(self
            .r
            .try_get::<Option<NaiveDateTime>, _>(i)?
            .map(|n| self.zone.read_db(n)))
    }

    fn global(&self) -> Result<TransGlobal, DbError> {
        let r = self.r;
        Ok(TransGlobal {
            id: r.try_get(0)?,
            gid: text(r, 1)?,
            trans_type: text(r, 2)?,
            status: text(r, 3)?,
            query_prepared: text(r, 4)?,
            protocol: text(r, 5)?,
            create_time: self.tm(6)?,
            update_time: self.tm(7)?,
            finish_time: self.tm(8)?,
            rollback_time: self.tm(9)?,
            options: text(r, 10)?,
            custom_data: text(r, 11)?,
            next_cron_interval: int(r, 12)?.unwrap_or(0),
            next_cron_time: self.tm(13)?,
            owner: text(r, 14)?,
            ext_data: text(r, 15)?,
            result: text(r, 16)?,
            rollback_reason: text(r, 17)?,
        })
    }

    fn branch(&self) -> Result<Branch, DbError> {
        let r = self.r;
        Ok(Branch {
            id: r.try_get(0)?,
            gid: text(r, 1)?,
            url: text(r, 2)?,
            bin_data: r.try_get::<Option<Vec<u8>>, _>(3)?.unwrap_or_default(),
            branch_id: text(r, 4)?,
            op: text(r, 5)?,
            status: text(r, 6)?,
            finish_time: self.tm(7)?,
            rollback_time: self.tm(8)?,
            create_time: self.tm(9)?,
            update_time: self.tm(10)?,
        })
    }

    fn kv(&self) -> Result<Kv, DbError> {
        let r = self.r;
        Ok(Kv {
            id: r.try_get(0)?,
            cat: text(r, 1)?,
            k: text(r, 2)?,
            v: text(r, 3)?,
            version: int(r, 4)?.unwrap_or(1),
            create_time: self.tm(5)?,
            update_time: self.tm(6)?,
        })
    }
}

#[async_trait]
impl Exec for MyExec {
    fn dialect(&self) -> Dialect {
        Dialect::MySql
    }

    async fn exec(&mut self, sql: &str, args: &[Val<'_>]) -> Result<u64, DbError> {
        let zone = self.zone;
        Ok(build(sql, args, zone)?
            .execute(self.raw())
            .await?
            .rows_affected())
    }

    async fn globals(&mut self, sql: &str, args: &[Val<'_>]) -> Result<Vec<TransGlobal>, DbError> {
        let zone = self.zone;
        let rows = build(sql, args, zone)?.fetch_all(self.raw()).await?;
        rows.iter().map(|r| Rd { r, zone }.global()).collect()
    }

    async fn branches(&mut self, sql: &str, args: &[Val<'_>]) -> Result<Vec<Branch>, DbError> {
        let zone = self.zone;
        let rows = build(sql, args, zone)?.fetch_all(self.raw()).await?;
        rows.iter().map(|r| Rd { r, zone }.branch()).collect()
    }

    async fn kvs(&mut self, sql: &str, args: &[Val<'_>]) -> Result<Vec<Kv>, DbError> {
        let zone = self.zone;
        let rows = build(sql, args, zone)?.fetch_all(self.raw()).await?;
        rows.iter().map(|r| Rd { r, zone }.kv()).collect()
    }

    async fn texts(&mut self, sql: &str, args: &[Val<'_>]) -> Result<Vec<String>, DbError> {
        let zone = self.zone;
        let rows = build(sql, args, zone)?.fetch_all(self.raw()).await?;
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
        let zone = self.zone;
        let rows = build(sql, args, zone)?.fetch_all(self.raw()).await?;
        rows.iter()
            .map(|r| Ok((int(r, 0)?.unwrap_or_default(), text(r, 1)?)))
            .collect()
    }

    async fn commit(self: Box<Self>) -> Result<(), DbError> {
        match self.c {
            MyConn::Conn(_) => Ok(()),
            MyConn::Tx(t) => t.commit().await,
        }
    }

    async fn rollback(self: Box<Self>) -> Result<(), DbError> {
        match self.c {
            MyConn::Conn(_) => Ok(()),
            MyConn::Tx(t) => t.rollback().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Zone;
    use chrono::{FixedOffset, NaiveDate, TimeZone, Utc};

    #[test]
    fn datetimes_are_wall_clock_times_of_the_zone() {
        let Some(plus8) = FixedOffset::east_opt(8 * 3600) else {
            panic!("offset")
        };
        let z = Zone::Fixed(plus8);
        let t = Utc.with_ymd_and_hms(2026, 1, 2, 20, 30, 0).single();
        let Some(t) = t else { panic!("time") };
        let wall = z.write_db(t);
        let want = NaiveDate::from_ymd_opt(2026, 1, 3).and_then(|d| d.and_hms_opt(4, 30, 0));
        assert_eq!(Some(wall), want);
        assert_eq!(z.read_db(wall), t);
        // the process zone round-trips too
        assert_eq!(Zone::Local.read_db(Zone::Local.write_db(t)), t);
    }
}
