//! The storage seam. Reads are plain calls; every change goes through [`Store::write`] so
//! that a backend can gather the changes of many transactions into one commit (group
//! commit). A write returns only once it is durable.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use dtm_proto::{Branch, TransGlobal};
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// A conditional write found the row missing or in another state.
    #[error("storage: NotFound")]
    NotFound,
    /// An insert hit an existing key.
    #[error("storage: UniqueKeyConflict")]
    UniqueConflict,
    /// The store could not be reached or failed; nothing of the write is applied.
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

/// A change of one branch row, keyed by (gid, branch_id, op).
#[derive(Debug, Clone, PartialEq)]
pub struct BranchUpdate {
    pub branch_id: String,
    pub op: String,
    pub status: String,
    pub time: DateTime<Utc>,
}

/// Columns of a global to change; `None` leaves a column as it is.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GlobalUpdate {
    pub status: Option<String>,
    pub rollback_reason: Option<String>,
    pub result: Option<String>,
    pub custom_data: Option<String>,
    pub finish_time: Option<DateTime<Utc>>,
    pub rollback_time: Option<DateTime<Utc>>,
    pub next_cron_time: Option<DateTime<Utc>>,
    pub next_cron_interval: Option<i64>,
    pub owner: Option<String>,
    pub update_time: DateTime<Utc>,
}

impl GlobalUpdate {
    /// What the stored row becomes when this update applies to it.
    pub fn apply_to(&self, g: &mut TransGlobal) {
        let set = |to: &mut String, v: &Option<String>| {
            if let Some(v) = v {
                to.clone_from(v);
            }
        };
        set(&mut g.status, &self.status);
        set(&mut g.rollback_reason, &self.rollback_reason);
        set(&mut g.result, &self.result);
        set(&mut g.custom_data, &self.custom_data);
        set(&mut g.owner, &self.owner);
        if self.finish_time.is_some() {
            g.finish_time = self.finish_time;
        }
        if self.rollback_time.is_some() {
            g.rollback_time = self.rollback_time;
        }
        if self.next_cron_time.is_some() {
            g.next_cron_time = self.next_cron_time;
        }
        if let Some(i) = self.next_cron_interval {
            g.next_cron_interval = i;
        }
        g.update_time = Some(self.update_time);
    }
}

/// One durable change. Each op is atomic on its own; a batch of ops may share a commit.
#[derive(Debug, Clone)]
pub enum WriteOp {
    /// Insert a global and its branches. `UniqueConflict` when the gid exists.
    SaveNew {
        global: TransGlobal,
        branches: Vec<Branch>,
    },
    /// Append branches while the global has `expect_status`. `NotFound` when it does not;
    /// `UniqueConflict` when a (branch_id, op) exists already.
    AddBranches {
        gid: String,
        expect_status: String,
        branches: Vec<Branch>,
    },
    /// Change a global, guarded by its current status (and owner, when given), and apply
    /// the branch updates in the same atomic step. `NotFound` when the guard fails.
    UpdateGlobal {
        gid: String,
        expect_status: String,
        expect_owner: Option<String>,
        set: GlobalUpdate,
        branches: Vec<BranchUpdate>,
    },
    /// Make one transaction due now, whatever its status. `NotFound` for an unknown gid.
    ResetNextCronTime {
        gid: String,
        now: DateTime<Utc>,
    },
    /// Lease up to `limit` unfinished transactions whose `next_cron_time <= now`: set
    /// `owner` and `next_cron_time = lease_until`, and return them.
    ClaimDue {
        now: DateTime<Utc>,
        limit: usize,
        lease_until: DateTime<Utc>,
        owner: String,
    },
    /// Pull unfinished transactions scheduled after `after` back to `now`, at most `limit`.
    ResetCronTime {
        after: DateTime<Utc>,
        now: DateTime<Utc>,
        limit: usize,
    },
    CreateKv {
        cat: String,
        k: String,
        v: String,
        now: DateTime<Utc>,
    },
    /// Optimistic on `version`; `NotFound` when the version moved.
    UpdateKv {
        cat: String,
        k: String,
        v: String,
        version: i64,
        now: DateTime<Utc>,
    },
    DeleteKv {
        cat: String,
        k: String,
    },
}

/// What a successful write returns.
#[derive(Debug, Clone, PartialEq)]
pub enum WriteOutcome {
    Done,
    Claimed(Vec<TransGlobal>),
    Reset { count: i64, has_remaining: bool },
}

/// A KV row (topics live under `cat = "topics"`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Kv {
    pub id: i64,
    #[serde(serialize_with = "ser_time")]
    pub create_time: Option<DateTime<Utc>>,
    #[serde(serialize_with = "ser_time")]
    pub update_time: Option<DateTime<Utc>>,
    pub cat: String,
    pub k: String,
    pub v: String,
    pub version: i64,
}

fn ser_time<S: serde::Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_str(&dtm_proto::model::format_time(t)),
        None => s.serialize_none(),
    }
}

/// Filters of `GET /all`.
#[derive(Debug, Clone, Default)]
pub struct ScanQuery {
    pub position: String,
    pub limit: usize,
    pub status: String,
    pub trans_type: String,
    pub create_time_start: Option<DateTime<Utc>>,
    pub create_time_end: Option<DateTime<Utc>>,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// A name for logs: `sqlite:<path>`, `postgres://host/db`, ...
    fn describe(&self) -> String;
    async fn ping(&self) -> Result<(), StoreError>;
    async fn find_global(&self, gid: &str) -> Result<Option<TransGlobal>, StoreError>;
    /// Branches in insertion order.
    async fn find_branches(&self, gid: &str) -> Result<Vec<Branch>, StoreError>;
    /// Newest first; returns the page and the next position ("" at the end).
    async fn scan_globals(&self, q: &ScanQuery) -> Result<(Vec<TransGlobal>, String), StoreError>;
    async fn scan_kv(
        &self,
        cat: &str,
        position: &str,
        limit: usize,
    ) -> Result<(Vec<Kv>, String), StoreError>;
    async fn find_kv(&self, cat: &str, k: Option<&str>) -> Result<Vec<Kv>, StoreError>;
    /// Apply one change durably. Backends batch concurrent writes into shared commits.
    async fn write(&self, op: WriteOp) -> Result<WriteOutcome, StoreError>;
    /// Flush and stop accepting writes (graceful shutdown).
    async fn close(&self) {}
    /// Retention: delete up to `limit` finished (`succeed`/`failed`) transactions, with
    /// their branches, whose last update is older than `before`; return how many. Never
    /// touches unfinished transactions. The default deletes nothing. A backend that expires
    /// data by itself (Redis) uses the call to drop what the expiry left behind (index
    /// entries), with `limit` as its budget per step, and returns how many it dropped.
    async fn purge_finished(
        &self,
        _before: DateTime<Utc>,
        _limit: usize,
    ) -> Result<usize, StoreError> {
        Ok(0)
    }
}
