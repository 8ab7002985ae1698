//! Storage backends behind [`dtm_core::Store`].
//!
//! - [`sqlite`]: the embedded default, one file, group commit through one writer thread.
//! - [`redis_store`]: Redis or Redis Cluster, Lua scripts, group commit as pipelines per slot.

pub mod redis_store;
pub mod sqlite;

pub use redis_store::{RedisOptions, RedisStore};

pub use sqlite::{SqliteStore, Sync as SqliteSync};
