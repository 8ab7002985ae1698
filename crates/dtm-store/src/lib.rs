//! Storage backends behind [`dtm_core::Store`].
//!
//! - [`sqlite`]: the embedded default, one file, group commit through one writer thread.
//! - [`sql`]: Postgres and MySQL/MariaDB on dtm's tables, group commit through writer
//!   tasks.
//! - [`redis_store`]: Redis or Redis Cluster, Lua scripts, group commit as one pipeline per
//!   batch (per slot on a cluster).

mod branch_list;
pub mod redis_store;
pub mod sql;
pub mod sqlite;

pub use redis_store::{RedisOptions, RedisStore};
pub use sql::{SqlOptions, SqlStore};
pub use sqlite::{SqliteStore, Sync as SqliteSync};

/// Wait for the writer tasks a store started (their channels already closed), once: a
/// second call finds none.
pub(crate) async fn join_writer_tasks(tasks: &std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>) {
    let tasks = tasks
        .lock()
        .map(|mut t| std::mem::take(&mut *t))
        .unwrap_or_default();
    for t in tasks {
        let _ = t.await;
    }
}
