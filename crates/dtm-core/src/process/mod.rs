//! One processing pass over a transaction: the shared machinery (branch calls, durable
//! status changes, scheduling) and the dispatch to the mode processors.
//!
//! Ordering rules (the design's invariants):
//! - a global status change is written (and durable) before any branch call that depends
//!   on it, so `aborting` is durable before the first compensation / cancel / rollback;
//! - branch successes are kept in `pending` and written together with the next global
//!   write (status change or schedule touch). After a crash such a branch is simply
//!   called again, which the barrier makes harmless;
//! - every write is guarded by the status read at the start of the pass and by this node's
//!   ownership, so a node that lost its lease or a transaction changed by forceStop/abort
//!   stops writing.

pub(crate) mod msg;
pub(crate) mod saga;
pub(crate) mod tcc;
pub(crate) mod workflow;

use chrono::{DateTime, Utc};
use dtm_proto::{Branch, BranchOutcome, TransGlobal, TransOptions, status, trans_type};
use rand::Rng;
use std::time::Duration;

use crate::caller::BranchCall;
use crate::service::{Coordinator, MAX_SECS, now, secs};
use crate::store::{BranchUpdate, GlobalUpdate, StoreError, WriteOp};

/// How a pass ended, for `wait_result` answers.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum PassEnd {
    /// Nothing to report: finished, or left for a later pass without an error.
    Done,
    /// Another task of this node is processing the transaction.
    Busy,
    /// The transaction changed under the pass (another node took the lease, or an API
    /// call such as forceStop changed its status); the pass stopped writing.
    Superseded,
    /// The store failed; the pass stopped. Nothing is lost: recovery picks it up again.
    StoreDown(String),
    Ongoing(String),
    Failure(String),
    Error(String),
}

/// How to move the schedule after a pass that did not finish the transaction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Sched {
    /// interval := base
    Reset,
    /// interval unchanged
    Keep,
    /// interval doubles (capped), with jitter
    Backoff,
    /// next check at a given time, interval unchanged
    At(DateTime<Utc>),
}

/// The pass stops: someone else changed the transaction, or the store failed.
#[derive(Debug)]
pub(crate) struct Stop(pub StoreError);

impl From<StoreError> for Stop {
    fn from(e: StoreError) -> Self {
        Stop(e)
    }
}

pub(crate) struct Ctx<'a> {
    pub co: &'a Coordinator,
    pub g: TransGlobal,
    pub branches: Vec<Branch>,
    pub opts: TransOptions,
    pending: Vec<BranchUpdate>,
    last_url: String,
    last_error: String,
    /// Length of the lease this pass holds (as granted when it started).
    lease_len: chrono::Duration,
}

impl<'a> Ctx<'a> {
    pub fn new(co: &'a Coordinator, g: TransGlobal, branches: Vec<Branch>) -> Self {
        let mut opts = g.trans_options();
        // headers an old dtm kept in ext_data go to the branches too; branch_headers win
        for (k, v) in g.passthrough_headers() {
            opts.branch_headers.entry(k).or_insert(v);
        }
        let granted = g.next_cron_time.map(|u| u - now()).unwrap_or_default();
        let fallback = secs(co.base_interval(&opts).max(1));
        let lease_len = if granted > chrono::Duration::seconds(1) {
            granted
        } else {
            fallback
        };
        Ctx {
            co,
            g,
            branches,
            opts,
            pending: Vec::new(),
            last_url: String::new(),
            last_error: String::new(),
            lease_len,
        }
    }

    pub fn base(&self) -> i64 {
        self.co.base_interval(&self.opts)
    }

    /// Effective timeout in seconds: the transaction's, else the global default for
    /// everything but saga (a saga without timeout_to_fail never times out).
    pub fn timeout(&self) -> Option<i64> {
        if self.opts.timeout_to_fail > 0 {
            Some(self.opts.timeout_to_fail)
        } else if self.g.trans_type == trans_type::SAGA || self.g.trans_type == trans_type::WORKFLOW
        {
            None
        } else {
            Some(self.co.settings.timeout_to_fail)
        }
    }

    pub fn timeout_at(&self) -> Option<DateTime<Utc>> {
        let created = self.g.create_time?;
        Some(created + secs(self.timeout()?))
    }

    pub fn timed_out(&self) -> bool {
        self.timeout_at().is_some_and(|t| now() >= t)
    }

    pub fn timeout_reason(&self) -> String {
        format!("Timeout after {} seconds", self.timeout().unwrap_or(0))
    }

    pub fn call_for(&self, b: &Branch) -> BranchCall {
        self.call(&b.url, b.bin_data.clone(), &b.branch_id, &b.op)
    }

    pub fn call(&self, url: &str, body: Vec<u8>, branch_id: &str, op: &str) -> BranchCall {
        let t = if self.opts.request_timeout > 0 {
            self.opts.request_timeout
        } else {
            self.co.settings.request_timeout
        };
        BranchCall {
            url: url.to_string(),
            body,
            gid: self.g.gid.clone(),
            trans_type: self.g.trans_type.clone(),
            branch_id: branch_id.to_string(),
            op: op.to_string(),
            protocol: self.g.protocol.clone(),
            headers: self.opts.branch_headers.clone(),
            // capped like every other span: a gRPC client refuses a timeout beyond
            // 11,000 years
            timeout: Duration::from_secs(t.clamp(1, MAX_SECS) as u64),
        }
    }

    /// Call a branch; an empty URL is an immediate success.
    pub async fn exec(&self, call: BranchCall) -> BranchOutcome {
        exec(self.co, call).await
    }

    /// Record a branch status in memory; it is written with the next global write.
    pub fn set_branch(&mut self, idx: usize, st: &str) {
        let t = now();
        if let Some(b) = self.branches.get_mut(idx) {
            b.status = st.to_string();
            b.finish_time = Some(t);
            b.update_time = Some(t);
            self.pending.push(BranchUpdate {
                branch_id: b.branch_id.clone(),
                op: b.op.clone(),
                status: st.to_string(),
                time: t,
            });
        }
    }

    /// Durably change the global status (with the pending branch updates).
    pub async fn change_status(&mut self, new: &str, reason: Option<String>) -> Result<(), Stop> {
        let t = now();
        let b = self.base();
        let set = GlobalUpdate {
            status: Some(new.to_string()),
            rollback_reason: reason.clone().filter(|r| !r.is_empty()),
            finish_time: (new == status::SUCCEED).then_some(t),
            rollback_time: (new == status::FAILED).then_some(t),
            // a fresh lease for the work that follows in this pass
            next_cron_time: (!status::is_final(new)).then(|| t + secs(b)),
            next_cron_interval: (!status::is_final(new)).then_some(b),
            update_time: t,
            ..Default::default()
        };
        self.write(set).await?;
        self.co.stats.status(new);
        self.g.status = new.to_string();
        if let Some(r) = reason.filter(|r| !r.is_empty()) {
            self.g.rollback_reason = r;
        }
        tracing::debug!(gid = %self.g.gid, trans_type = %self.g.trans_type, status = new, "status changed");
        Ok(())
    }

    async fn write(&mut self, set: GlobalUpdate) -> Result<(), Stop> {
        let branches = std::mem::take(&mut self.pending);
        self.co
            .store
            .write(WriteOp::UpdateGlobal {
                gid: self.g.gid.clone(),
                expect_status: self.g.status.clone(),
                expect_owner: Some(self.co.node.clone()),
                set,
                branches,
            })
            .await?;
        Ok(())
    }

    /// Renew this node's lease when less than half of it is left, so that a pass slower
    /// than the lease is not taken over by another node while it is still working. A
    /// dead node's lease still lapses after one retry interval.
    pub async fn keep_lease(&mut self) -> Result<(), Stop> {
        let t = now();
        if self
            .g
            .next_cron_time
            .is_some_and(|until| until - t > self.lease_len / 2)
        {
            return Ok(());
        }
        let next = t + self.lease_len;
        self.write(GlobalUpdate {
            next_cron_time: Some(next),
            update_time: t,
            ..Default::default()
        })
        .await?;
        self.g.next_cron_time = Some(next);
        Ok(())
    }

    /// Durably move the schedule (with the pending branch updates).
    pub async fn touch(&mut self, s: Sched) -> Result<(), Stop> {
        let t = now();
        let base = self.base();
        // a stored interval or a configured cap beyond MAX_SECS is held to it, so that the
        // doubling and the jitter below cannot overflow
        let cur = self.g.next_cron_interval.max(base).min(MAX_SECS);
        let (interval, next) = match s {
            Sched::Reset => (base, t + secs(base)),
            Sched::Keep => (cur, t + secs(cur)),
            Sched::Backoff => {
                let i = (cur.saturating_mul(2))
                    .min(self.co.settings.retry_max_interval.max(base))
                    .min(MAX_SECS);
                let jitter_ms = rand::rng().random_range(0..=(i * 100).max(1));
                (i, t + secs(i) + chrono::Duration::milliseconds(jitter_ms))
            }
            Sched::At(at) => (cur, at),
        };
        self.write(GlobalUpdate {
            next_cron_time: Some(next),
            next_cron_interval: Some(interval),
            update_time: t,
            ..Default::default()
        })
        .await?;
        self.g.next_cron_interval = interval;
        self.g.next_cron_time = Some(next);
        if s == Sched::Backoff {
            self.maybe_alert(base, interval, false).await;
        }
        Ok(())
    }

    /// Schedule according to how a branch answered and report it.
    pub async fn retry_later(&mut self, out: &BranchOutcome, url: &str) -> Result<PassEnd, Stop> {
        self.last_url = url.to_string();
        self.last_error = out.message().to_string();
        match out {
            BranchOutcome::Ongoing(m) => {
                self.touch(Sched::Keep).await?;
                Ok(PassEnd::Ongoing(m.clone()))
            }
            BranchOutcome::Failure(m) => {
                self.touch(Sched::Backoff).await?;
                // FAILURE where only SUCCESS can end the branch: report it at once
                let base = self.base();
                let interval = self.g.next_cron_interval;
                self.maybe_alert(base, interval, true).await;
                Ok(PassEnd::Failure(failed_reason(url, m)))
            }
            BranchOutcome::Error(m) => {
                self.touch(Sched::Backoff).await?;
                Ok(PassEnd::Error(format!("url:{url} error: {m}")))
            }
            BranchOutcome::Success => {
                self.touch(Sched::Reset).await?;
                Ok(PassEnd::Done)
            }
        }
    }

    /// POST the alert webhook when the retry count reached `AlertRetryLimit` (or always,
    /// with `force`, for a FAILURE that cannot end the branch).
    async fn maybe_alert(&self, base: i64, interval: i64, force: bool) {
        let hook = &self.co.settings.alert_webhook;
        if hook.is_empty() || base <= 0 {
            return;
        }
        let ratio = (interval / base).max(1);
        let retry_count = 63 - i64::from(ratio.leading_zeros());
        let limit = self.co.settings.alert_retry_limit;
        // the backoff itself already alerted at or above the limit
        if (force && retry_count >= limit) || (!force && retry_count < limit) {
            return;
        }
        let body = serde_json::json!({
            "gid": self.g.gid,
            "status": self.g.status,
            "branch": self.last_url,
            "error": self.last_error,
            "retry_count": retry_count,
        });
        if let Err(e) = self
            .co
            .caller
            .post_json(hook, &body, Duration::from_secs(3))
            .await
        {
            tracing::warn!(gid = %self.g.gid, "alert webhook {hook} failed: {e}");
        }
    }
}

/// dtm's text for a branch that answered FAILURE: `url:<url> return failed: <answer>
/// FAILURE`, the word once (a failed saga's rollback reason).
pub(crate) fn failed_reason(url: &str, answer: &str) -> String {
    format!(
        "url:{url} return failed: {}",
        crate::error::failure_text(answer)
    )
}

/// Call a branch; an empty URL is an immediate success. Borrows only the coordinator, so
/// concurrent calls can run while the pass updates its own state.
pub(crate) async fn exec(co: &Coordinator, call: BranchCall) -> BranchOutcome {
    if call.url.is_empty() {
        return BranchOutcome::Success;
    }
    let out = co.caller.call(&call).await;
    co.stats.branch(&out);
    tracing::debug!(gid = %call.gid, branch_id = %call.branch_id, op = %call.op, url = %call.url, outcome = out.label(), "branch called");
    if let BranchOutcome::Error(m) = &out {
        tracing::warn!(gid = %call.gid, branch_id = %call.branch_id, op = %call.op, url = %call.url,
            "branch call failed; it is retried with backoff: {m}");
    }
    if let BranchOutcome::Failure(m) = &out
        && !(call.trans_type == trans_type::SAGA && call.op == dtm_proto::op::ACTION)
        && call.op != dtm_proto::op::MSG
    {
        tracing::warn!(gid = %call.gid, branch_id = %call.branch_id, op = %call.op, url = %call.url,
            "branch answered FAILURE where only SUCCESS ends it; it is retried with backoff: {m}");
        co.stats
            .unexpected_failure
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    out
}

/// Run one pass for any mode.
pub(crate) async fn run(co: &Coordinator, g: TransGlobal, branches: Vec<Branch>) -> PassEnd {
    run_keep(co, g, branches).await.0
}

/// Run one pass; also give back the global as this pass left it in the store (every
/// status it holds was written before the pass ended), or None when the pass stopped
/// because the transaction changed under it or the store failed.
pub(crate) async fn run_keep(
    co: &Coordinator,
    g: TransGlobal,
    branches: Vec<Branch>,
) -> (PassEnd, Option<TransGlobal>) {
    let gid = g.gid.clone();
    let mut ctx = Ctx::new(co, g, branches);
    let res = match ctx.keep_lease().await {
        Err(e) => Err(e),
        Ok(()) => dispatch(&mut ctx).await,
    };
    let end = finish(&gid, res);
    let left = match end {
        PassEnd::Superseded | PassEnd::StoreDown(_) => None,
        _ => Some(ctx.g),
    };
    (end, left)
}

async fn dispatch(ctx: &mut Ctx<'_>) -> Result<PassEnd, Stop> {
    match ctx.g.trans_type.as_str() {
        trans_type::SAGA => saga::process(ctx).await,
        trans_type::MSG => msg::process(ctx).await,
        trans_type::TCC | trans_type::XA => tcc::process(ctx).await,
        trans_type::WORKFLOW => workflow::process(ctx).await,
        other => {
            tracing::error!(gid = %ctx.g.gid, "stored transaction has unknown trans_type '{other}'; it is left alone");
            Ok(PassEnd::Error(format!("unknown trans_type {other}")))
        }
    }
}

fn finish(gid: &str, res: Result<PassEnd, Stop>) -> PassEnd {
    match res {
        Ok(end) => end,
        Err(Stop(StoreError::NotFound)) => {
            tracing::info!(gid = %gid, "pass stopped: the transaction changed under it");
            PassEnd::Superseded
        }
        Err(Stop(e)) => {
            tracing::warn!(gid = %gid, "pass stopped: {e}");
            PassEnd::StoreDown(e.to_string())
        }
    }
}

#[cfg(test)]
mod tests;
