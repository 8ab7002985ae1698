//! The store contract on the embedded SQLite store (the reference backend).

#[macro_use]
mod contract;

use std::sync::Arc;

use contract::Backend;
use dtm_store::{SqliteStore, SqliteSync};
use futures::FutureExt;

async fn open() -> Option<Backend> {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let s = SqliteStore::open(&dir.path().join("dtm.sqlite"), SqliteSync::Normal)
        .unwrap_or_else(|e| panic!("{e}"));
    Some(Backend {
        store: Arc::new(s),
        cleanup: async move { drop(dir) }.boxed(),
    })
}

contract_tests!(open);
