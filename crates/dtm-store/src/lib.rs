//! Storage backends behind [`dtm_core::Store`].
//!
//! - [`sqlite`]: the embedded default, one file, group commit through one writer thread.
//! - [`sql`]: Postgres and MySQL/MariaDB on dtm's tables, group commit through one writer
//!   task.
//! - [`redis_store`]: Redis or Redis Cluster, Lua scripts, group commit as pipelines per slot.

mod branch_list;
pub mod redis_store;
pub mod sql;
pub mod sqlite;

pub use redis_store::{RedisOptions, RedisStore};
pub use sql::{SqlOptions, SqlStore};
pub use sqlite::{SqliteStore, Sync as SqliteSync};
