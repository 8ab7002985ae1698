//! Counters the engine keeps for the metrics endpoint.

use std::sync::atomic::{AtomicU64, Ordering};

use dtm_proto::{BranchOutcome, status};

#[derive(Debug, Default)]
pub struct Stats {
    pub branch_success: AtomicU64,
    pub branch_failure: AtomicU64,
    pub branch_ongoing: AtomicU64,
    pub branch_error: AtomicU64,
    /// FAILURE answers from branches that only SUCCESS can end (compensate, confirm,
    /// cancel, commit, rollback, msg action).
    pub unexpected_failure: AtomicU64,
    pub finished_succeed: AtomicU64,
    pub finished_failed: AtomicU64,
    pub aborting: AtomicU64,
}

impl Stats {
    pub(crate) fn branch(&self, out: &BranchOutcome) {
        let c = match out {
            BranchOutcome::Success => &self.branch_success,
            BranchOutcome::Failure(_) => &self.branch_failure,
            BranchOutcome::Ongoing(_) => &self.branch_ongoing,
            BranchOutcome::Error(_) => &self.branch_error,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn status(&self, s: &str) {
        let c = match s {
            status::SUCCEED => &self.finished_succeed,
            status::FAILED => &self.finished_failed,
            status::ABORTING => &self.aborting,
            _ => return,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// (metric line suffix, value) pairs in Prometheus text form.
    pub fn lines(&self) -> Vec<(String, u64)> {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            (
                "dtm_branch_process_total{status=\"success\"}".into(),
                g(&self.branch_success),
            ),
            (
                "dtm_branch_process_total{status=\"failure\"}".into(),
                g(&self.branch_failure),
            ),
            (
                "dtm_branch_process_total{status=\"ongoing\"}".into(),
                g(&self.branch_ongoing),
            ),
            (
                "dtm_branch_process_total{status=\"error\"}".into(),
                g(&self.branch_error),
            ),
            (
                "dtm_branch_unexpected_failure_total".into(),
                g(&self.unexpected_failure),
            ),
            (
                "dtm_transaction_status_total{status=\"succeed\"}".into(),
                g(&self.finished_succeed),
            ),
            (
                "dtm_transaction_status_total{status=\"failed\"}".into(),
                g(&self.finished_failed),
            ),
            (
                "dtm_transaction_status_total{status=\"aborting\"}".into(),
                g(&self.aborting),
            ),
        ]
    }
}
