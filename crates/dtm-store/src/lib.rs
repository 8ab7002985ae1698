//! Storage backends behind [`dtm_core::Store`].
//!
//! - [`sqlite`]: the embedded default, one file, group commit through one writer thread.
//! - [`sql`]: Postgres and MySQL/MariaDB on dtm's tables, group commit through one writer
//!   task.

pub mod sql;
pub mod sqlite;

pub use sql::{SqlOptions, SqlStore};
pub use sqlite::{SqliteStore, Sync as SqliteSync};
