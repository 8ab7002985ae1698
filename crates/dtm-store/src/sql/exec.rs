//! The small seam between the SQL shared by both servers ([`super::ops`]) and each
//! driver: bind values, run a statement, decode rows into the stored records.

use async_trait::async_trait;
use chrono::{DateTime, SubsecRound, Utc};
use dtm_core::store::Kv;
use dtm_proto::{Branch, TransGlobal};

pub(crate) type DbError = sqlx_core::Error;

/// Which SQL dialect a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Postgres,
    MySql,
}

/// A bound value. Statements are written with `?` placeholders; the Postgres driver
/// numbers them (`$1`, `$2`, ...).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Val<'a> {
    Str(&'a str),
    Int(i64),
    Time(Option<DateTime<Utc>>),
    Bytes(&'a [u8]),
    /// A text or NULL.
    OptStr(Option<&'a str>),
    /// An integer or NULL.
    OptInt(Option<i64>),
    /// Arrays, one parameter each (Postgres only: `UNNEST(?::text[], ...)` keeps the text
    /// of a batched statement the same whatever the number of rows).
    Strs(&'a [&'a str]),
    OptStrs(&'a [Option<&'a str>]),
    OptInts(&'a [Option<i64>]),
    Times(&'a [Option<DateTime<Utc>>]),
    Blobs(&'a [&'a [u8]]),
}

/// The error for an array bound on MySQL (a bug: the batched MySQL statements bind
/// scalars).
pub(crate) fn array_on_mysql() -> DbError {
    DbError::Encode("array parameters are only bound on Postgres".into())
}

/// A time as stored: millisecond precision, truncated (the columns are `(3)`, and
/// truncating here keeps what is read back equal to what was written).
pub(crate) fn time(t: DateTime<Utc>) -> Val<'static> {
    Val::Time(Some(t.trunc_subsecs(3)))
}

pub(crate) fn opt_time(t: Option<DateTime<Utc>>) -> Val<'static> {
    Val::Time(t.map(|t| t.trunc_subsecs(3)))
}

/// How the batch runner treats a database error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrClass {
    /// A unique key was hit: the op fails with `UniqueConflict`, the batch goes on.
    Unique,
    /// Deadlock, serialization failure, lock wait timeout: run the whole batch again.
    Retry,
    /// The database refused this statement (bad data, ...): the op fails, the batch goes on.
    Statement,
    /// The connection or server failed: the whole batch fails.
    Connection,
}

/// One connection, or one open transaction on it.
#[async_trait]
pub(crate) trait Exec: Send {
    fn dialect(&self) -> Dialect;
    /// Rows affected (MySQL counts matched rows: sqlx sets CLIENT_FOUND_ROWS).
    async fn exec(&mut self, sql: &str, args: &[Val<'_>]) -> Result<u64, DbError>;
    /// Rows of `GLOBAL_COLS`.
    async fn globals(&mut self, sql: &str, args: &[Val<'_>]) -> Result<Vec<TransGlobal>, DbError>;
    /// Rows of `BRANCH_COLS`.
    async fn branches(&mut self, sql: &str, args: &[Val<'_>]) -> Result<Vec<Branch>, DbError>;
    /// Rows of `KV_COLS`.
    async fn kvs(&mut self, sql: &str, args: &[Val<'_>]) -> Result<Vec<Kv>, DbError>;
    /// The first column of each row, as text.
    async fn texts(&mut self, sql: &str, args: &[Val<'_>]) -> Result<Vec<String>, DbError>;
    /// Rows of (an integer, a text), e.g. `SELECT id, gid`.
    async fn id_texts(
        &mut self,
        sql: &str,
        args: &[Val<'_>],
    ) -> Result<Vec<(i64, String)>, DbError>;
    /// Whether a new transaction's branches go to `trans_global.branches` (with their
    /// changes logged in `branch_states`) instead of rows of `trans_branch_op`: on
    /// Postgres once the columns exist (see `ops::upgrade`).
    fn branch_column(&self) -> bool {
        false
    }
    /// The first row's `branches` (bytea) and `branch_states` (text), when there is a
    /// row (Postgres only).
    async fn branch_list(
        &mut self,
        sql: &str,
        args: &[Val<'_>],
    ) -> Result<Option<(Option<Vec<u8>>, Option<String>)>, DbError> {
        let _ = (sql, args);
        Err(DbError::Protocol(
            "the branch column is only read on Postgres".into(),
        ))
    }
    /// Commit when this is a transaction; nothing otherwise.
    async fn commit(self: Box<Self>) -> Result<(), DbError>;
    /// Roll back when this is a transaction; nothing otherwise.
    async fn rollback(self: Box<Self>) -> Result<(), DbError>;
}

/// A driver: hands out connections and transactions, and classifies its errors.
#[async_trait]
pub(crate) trait Engine: Send + Sync + 'static {
    fn dialect(&self) -> Dialect;
    /// A pooled connection in autocommit mode.
    async fn conn(&self) -> Result<Box<dyn Exec>, DbError>;
    /// A pooled connection inside `BEGIN`.
    async fn begin(&self) -> Result<Box<dyn Exec>, DbError>;
    /// A transaction for the batch writer (see `PgEngine`: plan settings for the batched
    /// statements).
    async fn begin_batch(&self) -> Result<Box<dyn Exec>, DbError> {
        self.begin().await
    }
    /// A connection in autocommit mode for a batch that is one group, when the driver
    /// writes a group with one statement (Postgres); None: use [`Engine::begin_batch`].
    async fn autocommit_batch(&self) -> Result<Option<Box<dyn Exec>>, DbError> {
        Ok(None)
    }
    fn classify(&self, e: &DbError) -> ErrClass;
    /// Say whether the tables have the branch columns (after the migration); connections
    /// handed out later report it in [`Exec::branch_column`].
    fn set_branch_column(&self, on: bool) {
        let _ = on;
    }
    async fn close(&self);
}

/// Classification shared by both drivers for errors that are not from the server.
pub(crate) fn classify_common(e: &DbError) -> Option<ErrClass> {
    match e {
        DbError::Database(_) => None,
        DbError::Io(_)
        | DbError::Tls(_)
        | DbError::Protocol(_)
        | DbError::PoolTimedOut
        | DbError::PoolClosed
        | DbError::WorkerCrashed
        | DbError::Configuration(_) => Some(ErrClass::Connection),
        _ => Some(ErrClass::Statement),
    }
}

/// `?` placeholders to Postgres' `$n`. The statements of this module never have a `?`
/// inside a literal.
pub(crate) fn number_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 16);
    let mut n = 0;
    for c in sql.chars() {
        if c == '?' {
            n += 1;
            out.push('$');
            out.push_str(&n.to_string());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn placeholders_are_numbered() {
        assert_eq!(
            super::number_placeholders("a = ? AND b IN (?, ?)"),
            "a = $1 AND b IN ($2, $3)"
        );
    }
}
