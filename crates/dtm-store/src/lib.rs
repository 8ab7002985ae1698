//! Storage backends behind [`dtm_core::Store`].
//!
//! - [`sqlite`]: the embedded default, one file, group commit through one writer thread.

pub mod sqlite;

pub use sqlite::{SqliteStore, Sync as SqliteSync};
