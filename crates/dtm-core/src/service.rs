//! The service API shared by every adapter (HTTP, gRPC, JSON-RPC): prepare, submit, abort,
//! registerBranch, query and the admin calls. Mode logic lives in `process`.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Duration as ChronoDuration, Utc};
use dtm_proto::{
    Branch, RegisterBranchRequest, TransGlobal, TransRequest, op, protocol, status, trans_type,
};
use serde::Serialize;

use crate::caller::BranchCaller;
use crate::error::ApiError;
use crate::process::{self, PassEnd};
use crate::settings::Settings;
use crate::store::{GlobalUpdate, Kv, ScanQuery, Store, StoreError, WriteOp, WriteOutcome};

/// KV category of topics.
pub const TOPICS_CAT: &str = "topics";

/// `GET /query` answer.
#[derive(Debug, Serialize)]
pub struct QueryResult {
    pub transaction: Option<TransGlobal>,
    pub branches: Vec<Branch>,
}

pub struct Coordinator {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) caller: Arc<dyn BranchCaller>,
    pub(crate) settings: Settings,
    /// This node's lease owner id.
    pub(crate) node: String,
    /// Counters for the metrics endpoint.
    pub stats: crate::stats::Stats,
    inflight: Mutex<HashSet<String>>,
}

/// Removes a gid from the in-flight set when processing ends.
pub(crate) struct InflightGuard<'a> {
    co: &'a Coordinator,
    gid: String,
}

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut s) = self.co.inflight.lock() {
            s.remove(&self.gid);
        }
    }
}

pub(crate) fn now() -> DateTime<Utc> {
    Utc::now()
}

/// The longest span any schedule uses: 2^31−1 seconds (68 years), the widest interval
/// the `next_cron_interval` column of dtm's SQL schema holds. A request's options may
/// carry any int64 (dtm accepts them all); a transaction retried or timing out after 68
/// years never does in practice, and the cap keeps every date computed from the options
/// representable, and the same, in every store.
pub(crate) const MAX_SECS: i64 = i32::MAX as i64;

/// `n` seconds, capped at ±[`MAX_SECS`]: adding it to a date of this era cannot overflow.
pub(crate) fn secs(n: i64) -> ChronoDuration {
    ChronoDuration::seconds(n.clamp(-MAX_SECS, MAX_SECS))
}

/// A `branch_headers` entry every branch call can carry: an HTTP header by the rules the
/// branch-call clients apply (`http::HeaderName`, `http::HeaderValue::from_str`), and for
/// gRPC also text metadata (not a binary `-bin` key). Checked at the request, which would
/// otherwise be stored and then fail every branch call.
pub(crate) fn check_branch_header(k: &str, v: &str, grpc: bool) -> Result<(), String> {
    if http::HeaderName::from_bytes(k.as_bytes()).is_err() {
        return Err(format!(
            "branch_headers: {k:?} is not a valid header name: use letters, digits and -"
        ));
    }
    if http::HeaderValue::from_str(v).is_err() {
        return Err(format!(
            "branch_headers: the value of {k:?} must not contain line breaks or other control characters"
        ));
    }
    if grpc && k.to_ascii_lowercase().ends_with("-bin") {
        return Err(format!(
            "branch_headers: {k:?} names binary gRPC metadata, which takes base64 values: use a name not ending in -bin"
        ));
    }
    Ok(())
}

fn is_http_url(u: &str) -> bool {
    u.starts_with("http://") || u.starts_with("https://")
}

/// `host:port/package.Service/Method`, the form of gRPC branch URLs.
fn is_grpc_url(u: &str) -> bool {
    !u.contains("://") && u.contains('/')
}

impl Coordinator {
    pub fn new(store: Arc<dyn Store>, caller: Arc<dyn BranchCaller>, settings: Settings) -> Self {
        Coordinator {
            store,
            caller,
            settings,
            node: format!("node-{}", crate::new_gid()),
            stats: Default::default(),
            inflight: Mutex::new(HashSet::new()),
        }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn node_id(&self) -> &str {
        &self.node
    }

    /// Mark a gid as processed by this node; `None` when it already is.
    pub(crate) fn enter(&self, gid: &str) -> Option<InflightGuard<'_>> {
        let mut s = self.inflight.lock().ok()?;
        if !s.insert(gid.to_string()) {
            return None;
        }
        Some(InflightGuard {
            co: self,
            gid: gid.to_string(),
        })
    }

    /// How many transactions this node is processing right now.
    pub fn inflight_count(&self) -> usize {
        self.inflight.lock().map(|s| s.len()).unwrap_or(0)
    }

    pub(crate) fn is_inflight(&self, gid: &str) -> bool {
        self.inflight
            .lock()
            .map(|s| s.contains(gid))
            .unwrap_or(false)
    }

    /// Base retry interval B of a transaction (dtm `getNextCronInterval`, reset mode).
    pub(crate) fn base_interval(&self, o: &dtm_proto::TransOptions) -> i64 {
        let b = if o.retry_interval > 0 {
            o.retry_interval
        } else if o.timeout_to_fail > 0 && o.timeout_to_fail < self.settings.retry_interval {
            o.timeout_to_fail
        } else {
            self.settings.retry_interval
        };
        b.min(MAX_SECS)
    }

    // ---------------------------------------------------------------- validation

    fn validate(&self, req: &TransRequest, for_prepare: bool) -> Result<(), ApiError> {
        if req.gid.trim().is_empty() {
            return Err(ApiError::BadRequest(
                "gid is required: get one from GET /api/dtmsvr/newGid".into(),
            ));
        }
        if req.gid.len() > 128 {
            return Err(ApiError::BadRequest(format!(
                "gid is {} characters long; at most 128 are allowed",
                req.gid.len()
            )));
        }
        if req.trans_type.is_empty() {
            return Err(ApiError::BadRequest(
                "trans_type is required: one of saga, msg, tcc, xa, workflow".into(),
            ));
        }
        if !trans_type::is_known(&req.trans_type) {
            return Err(ApiError::BadRequest(format!(
                "unknown trans_type '{}': use one of saga, msg, tcc, xa, workflow",
                req.trans_type
            )));
        }
        if ![protocol::HTTP, protocol::GRPC, protocol::JSON_RPC].contains(&req.protocol.as_str()) {
            return Err(ApiError::BadRequest(format!(
                "unknown protocol '{}': use http, grpc or json-rpc",
                req.protocol
            )));
        }
        let is_saga = req.trans_type == trans_type::SAGA;
        let is_msg = req.trans_type == trans_type::MSG;
        if (is_saga || is_msg) && req.steps.is_empty() && !(for_prepare && is_saga) {
            return Err(ApiError::BadRequest(format!(
                "a {} needs at least one step in 'steps'",
                req.trans_type
            )));
        }
        if (is_saga || is_msg) && req.payloads.len() > req.steps.len() {
            return Err(ApiError::BadRequest(format!(
                "{} payloads for {} steps: give one payload per step",
                req.payloads.len(),
                req.steps.len()
            )));
        }
        // `what` names the field for the error; it is only formatted when one is returned.
        let check_url = |what: &dyn Fn() -> String, u: &str| -> Result<(), ApiError> {
            if u.is_empty() || is_http_url(u) {
                return Ok(());
            }
            if is_msg && what().ends_with("action") && u.starts_with("topic://") {
                return Ok(());
            }
            if req.protocol == protocol::GRPC && is_grpc_url(u) {
                return Ok(());
            }
            Err(ApiError::BadRequest(format!(
                "{} URL '{u}' is not usable with protocol '{}': use http(s)://host/path{}",
                what(),
                req.protocol,
                if req.protocol == protocol::GRPC {
                    " or host:port/package.Service/Method"
                } else {
                    ""
                }
            )))
        };
        for (i, s) in req.steps.iter().enumerate() {
            if is_saga || is_msg {
                let action = s.get(op::ACTION).map(String::as_str).unwrap_or("");
                check_url(&|| format!("steps[{i}].action"), action)?;
            }
            if is_saga {
                let c = s.get(op::COMPENSATE).map(String::as_str).unwrap_or("");
                check_url(&|| format!("steps[{i}].compensate"), c)?;
            }
        }
        if is_msg && !req.query_prepared.is_empty() {
            check_url(&|| "query_prepared".to_string(), &req.query_prepared)?;
        }
        if is_saga {
            process::saga::parse_custom(&req.custom_data, req.steps.len())
                .map_err(ApiError::BadRequest)?;
        }
        for (k, v) in &req.options.branch_headers {
            check_branch_header(k, v, req.protocol == protocol::GRPC)
                .map_err(ApiError::BadRequest)?;
        }
        Ok(())
    }

    /// Branch rows generated from the steps of a saga or msg.
    async fn gen_branches(
        &self,
        req: &TransRequest,
        t: DateTime<Utc>,
    ) -> Result<Vec<Branch>, ApiError> {
        let mut out = Vec::new();
        let mk = |branch_id: String, op: &str, url: &str, data: &[u8]| Branch {
            gid: req.gid.clone(),
            url: url.to_string(),
            bin_data: data.to_vec(),
            branch_id,
            op: op.to_string(),
            status: status::PREPARED.to_string(),
            create_time: Some(t),
            update_time: Some(t),
            ..Default::default()
        };
        for (i, step) in req.steps.iter().enumerate() {
            let data = req.payloads.get(i).map(Vec::as_slice).unwrap_or(&[]);
            let get = |k: &str| step.get(k).map(String::as_str).unwrap_or("");
            let id = format!("{:02}", i + 1);
            match req.trans_type.as_str() {
                trans_type::SAGA => {
                    out.push(mk(id.clone(), op::COMPENSATE, get(op::COMPENSATE), data));
                    out.push(mk(id, op::ACTION, get(op::ACTION), data));
                }
                trans_type::MSG => {
                    let action = get(op::ACTION);
                    if let Some(topic) = action.strip_prefix("topic://") {
                        let urls = self.topic_urls(topic).await?;
                        if urls.len() == 1 {
                            out.push(mk(id, op::ACTION, &urls[0], data));
                        } else {
                            for (j, u) in urls.iter().enumerate() {
                                out.push(mk(
                                    format!("{:02}-{:02}", i + 1, j + 1),
                                    op::ACTION,
                                    u,
                                    data,
                                ));
                            }
                        }
                    } else {
                        out.push(mk(id, op::ACTION, action, data));
                    }
                }
                _ => {}
            }
        }
        Ok(out)
    }

    async fn topic_urls(&self, topic: &str) -> Result<Vec<String>, ApiError> {
        let kvs = self.store.find_kv(TOPICS_CAT, Some(topic)).await?;
        let subs: Vec<Subscriber> = kvs
            .first()
            .and_then(|kv| serde_json::from_str(&kv.v).ok())
            .unwrap_or_default();
        if subs.is_empty() {
            return Err(ApiError::BadRequest(format!(
                "topic not found: '{topic}' has no subscribers; subscribe a URL with GET /api/dtmsvr/subscribe first"
            )));
        }
        Ok(subs.into_iter().map(|s| s.url).collect())
    }

    fn new_global(&self, req: &TransRequest, st: &str, t: DateTime<Utc>) -> TransGlobal {
        let b = self.base_interval(&req.options);
        TransGlobal {
            gid: req.gid.clone(),
            trans_type: req.trans_type.clone(),
            status: st.to_string(),
            query_prepared: req.query_prepared.clone(),
            protocol: req.protocol.clone(),
            create_time: Some(t),
            update_time: Some(t),
            options: req.options.to_json(),
            custom_data: req.custom_data.clone(),
            next_cron_interval: b,
            next_cron_time: Some(t + secs(b)),
            owner: self.node.clone(),
            rollback_reason: req.rollback_reason.clone(),
            ..Default::default()
        }
    }

    /// Same transaction content? Used to tell a retried request from a gid reused for
    /// something else.
    fn same_content(
        stored: &TransGlobal,
        stored_branches: &[Branch],
        req: &TransRequest,
        generated: &[Branch],
    ) -> Result<(), ApiError> {
        if stored.trans_type != req.trans_type {
            return Err(ApiError::failure(format!(
                "gid '{}' is already used by a {} transaction, not a {}: use a new gid",
                req.gid, stored.trans_type, req.trans_type
            )));
        }
        let key = |b: &Branch| (b.branch_id.clone(), b.op.clone(), b.url.clone());
        if matches!(req.trans_type.as_str(), trans_type::SAGA | trans_type::MSG)
            && !generated.is_empty()
            && stored_branches.iter().map(key).collect::<Vec<_>>()
                != generated.iter().map(key).collect::<Vec<_>>()
        {
            return Err(ApiError::failure(format!(
                "gid '{}' already exists with different steps: use a new gid for a different transaction",
                req.gid
            )));
        }
        Ok(())
    }

    // ---------------------------------------------------------------- API

    pub fn new_gid(&self) -> String {
        crate::new_gid()
    }

    /// `prepare`: store the transaction as `prepared`. Idempotent while it is prepared.
    pub async fn prepare(&self, req: TransRequest) -> Result<(), ApiError> {
        self.validate(&req, true)?;
        let t = now();
        let branches = self.gen_branches(&req, t).await?;
        let global = self.new_global(&req, status::PREPARED, t);
        match self
            .store
            .write(WriteOp::SaveNew {
                global,
                branches: branches.clone(),
            })
            .await
        {
            Ok(_) => Ok(()),
            Err(StoreError::UniqueConflict) => {
                let stored = self.must_find(&req.gid).await?;
                let sb = self.store.find_branches(&req.gid).await?;
                Self::same_content(&stored, &sb, &req, &branches)?;
                if stored.status == status::PREPARED {
                    Ok(())
                } else {
                    Err(ApiError::failure(format!(
                        "current status '{}', cannot prepare.",
                        stored.status
                    )))
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn must_find(&self, gid: &str) -> Result<TransGlobal, ApiError> {
        self.store
            .find_global(gid)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("no TransGlobal with gid: {gid} found")))
    }

    /// `submit`: create (or promote a prepared) transaction as `submitted` and process it,
    /// in the background, or before answering when `wait_result` is set.
    pub async fn submit(self: &Arc<Self>, req: TransRequest) -> Result<(), ApiError> {
        if req.trans_type == trans_type::WORKFLOW {
            return self.submit_workflow(req).await;
        }
        self.validate(&req, false)?;
        let wait = req.options.wait_result;
        let t = now();
        let branches = self.gen_branches(&req, t).await?;
        let global = self.new_global(&req, status::SUBMITTED, t);
        // A msg or tcc submit normally follows its prepare: look first, which is a read,
        // instead of an insert that fails on the gid (a write that waits for a commit).
        let prepared_first = matches!(
            req.trans_type.as_str(),
            trans_type::MSG | trans_type::TCC | trans_type::XA
        );
        let stored = if prepared_first {
            self.store.find_global(&req.gid).await?
        } else {
            None
        };
        let (global, branches) = match stored {
            Some(stored) => self.submit_stored(stored, &req, &branches, t).await?,
            None => match self
                .store
                .write(WriteOp::SaveNew {
                    global: global.clone(),
                    branches: branches.clone(),
                })
                .await
            {
                Ok(_) => (global, branches),
                Err(StoreError::UniqueConflict) => {
                    let stored = self.must_find(&req.gid).await?;
                    self.submit_stored(stored, &req, &branches, t).await?
                }
                Err(e) => return Err(e.into()),
            },
        };
        let gid = global.gid.clone();
        if wait {
            let (end, after) = match self.enter(&gid) {
                Some(_guard) => process::run_keep(self, global, branches).await,
                None => (PassEnd::Busy, None),
            };
            self.wait_result_answer(&gid, end, after).await
        } else {
            let me = Arc::clone(self);
            tokio::spawn(async move {
                me.process_loaded(global, branches).await;
            });
            Ok(())
        }
    }

    /// Submit of a transaction that is stored already (after its prepare, or a repeated
    /// submit): the content must match, then it turns `submitted` under this node's lease.
    /// Answers the global as the update left it, and its stored branches.
    async fn submit_stored(
        &self,
        mut stored: TransGlobal,
        req: &TransRequest,
        branches: &[Branch],
        t: DateTime<Utc>,
    ) -> Result<(TransGlobal, Vec<Branch>), ApiError> {
        let sb = self.store.find_branches(&req.gid).await?;
        Self::same_content(&stored, &sb, req, branches)?;
        if stored.status != status::PREPARED && stored.status != status::SUBMITTED {
            return Err(ApiError::failure(format!(
                "current status '{}', cannot submit.",
                stored.status
            )));
        }
        // Take the lease; a prepared msg also gets the submit's custom_data (delay).
        let b = self.base_interval(&stored.trans_options());
        let mut set = GlobalUpdate {
            status: Some(status::SUBMITTED.to_string()),
            owner: Some(self.node.clone()),
            next_cron_time: Some(t + secs(b)),
            next_cron_interval: Some(b),
            update_time: t,
            ..Default::default()
        };
        if stored.custom_data.is_empty() && !req.custom_data.is_empty() {
            set.custom_data = Some(req.custom_data.clone());
        }
        self.store
            .write(WriteOp::UpdateGlobal {
                gid: req.gid.clone(),
                expect_status: stored.status.clone(),
                expect_owner: None,
                set: set.clone(),
                branches: vec![],
            })
            .await
            .map_err(|e| match e {
                StoreError::NotFound => ApiError::failure(
                    "the transaction changed status while submitting; query it and retry.",
                ),
                e => e.into(),
            })?;
        set.apply_to(&mut stored);
        Ok((stored, sb))
    }

    /// dtm's wait_result rule: report the mode's error, else FAILURE unless `succeed`.
    /// `after` is the global as the pass left it; without it the store is asked.
    async fn wait_result_answer(
        &self,
        gid: &str,
        end: PassEnd,
        after: Option<TransGlobal>,
    ) -> Result<(), ApiError> {
        match end {
            PassEnd::Ongoing(m) => return Err(ApiError::Ongoing(format!("ONGOING: {m}"))),
            PassEnd::Failure(m) => return Err(ApiError::failure(m)),
            PassEnd::Error(m) => return Err(ApiError::Internal(m)),
            PassEnd::StoreDown(m) => return Err(StoreError::Unavailable(m).into()),
            PassEnd::Done | PassEnd::Busy | PassEnd::Superseded => {}
        }
        // a pass that ended Done wrote every status it holds; re-reading costs a store
        // round trip per saga (bench/README.md)
        let g = match (end, after) {
            (PassEnd::Done, Some(g)) => g,
            _ => self.must_find(gid).await?,
        };
        if g.status == status::SUCCEED {
            Ok(())
        } else if !g.rollback_reason.is_empty() {
            Err(ApiError::failure(&g.rollback_reason))
        } else {
            Err(ApiError::failure("wait result not return success:"))
        }
    }

    /// `abort`: a prepared msg becomes `failed`; a prepared (or aborting) tcc/xa becomes
    /// `aborting` and its cancels/rollbacks run.
    pub async fn abort(self: &Arc<Self>, req: TransRequest) -> Result<(), ApiError> {
        if req.gid.is_empty() {
            return Err(ApiError::BadRequest("gid is required".into()));
        }
        let g = self.must_find(&req.gid).await?;
        let t = now();
        if g.trans_type == trans_type::MSG && g.status == status::PREPARED {
            self.store
                .write(WriteOp::UpdateGlobal {
                    gid: g.gid.clone(),
                    expect_status: status::PREPARED.into(),
                    expect_owner: None,
                    set: GlobalUpdate {
                        status: Some(status::FAILED.into()),
                        rollback_time: Some(t),
                        update_time: t,
                        ..Default::default()
                    },
                    branches: vec![],
                })
                .await
                .map_err(|e| match e {
                    StoreError::NotFound => {
                        ApiError::failure("the message changed status while aborting;")
                    }
                    e => e.into(),
                })?;
            return Ok(());
        }
        let abortable = matches!(g.trans_type.as_str(), trans_type::TCC | trans_type::XA)
            && (g.status == status::PREPARED || g.status == status::ABORTING);
        if !abortable {
            return Err(ApiError::failure(format!(
                "trans type: '{}' current status '{}', cannot abort.",
                g.trans_type, g.status
            )));
        }
        let b = self.base_interval(&g.trans_options());
        self.store
            .write(WriteOp::UpdateGlobal {
                gid: g.gid.clone(),
                expect_status: g.status.clone(),
                expect_owner: None,
                set: GlobalUpdate {
                    status: Some(status::ABORTING.into()),
                    rollback_reason: (!req.rollback_reason.is_empty())
                        .then(|| req.rollback_reason.clone()),
                    owner: Some(self.node.clone()),
                    next_cron_time: Some(t + secs(b)),
                    update_time: t,
                    ..Default::default()
                },
                branches: vec![],
            })
            .await
            .map_err(|e| match e {
                StoreError::NotFound => {
                    ApiError::failure("the transaction changed status while aborting;")
                }
                e => e.into(),
            })?;
        let g = self.must_find(&req.gid).await?;
        let wait = g.trans_options().wait_result;
        let branches = self.store.find_branches(&g.gid).await?;
        if wait {
            match self.process_loaded(g, branches).await {
                PassEnd::Ongoing(m) => Err(ApiError::Ongoing(format!("ONGOING: {m}"))),
                PassEnd::Failure(m) => Err(ApiError::failure(m)),
                PassEnd::Error(m) => Err(ApiError::Internal(m)),
                PassEnd::StoreDown(m) => Err(StoreError::Unavailable(m).into()),
                _ => Ok(()),
            }
        } else {
            let me = Arc::clone(self);
            tokio::spawn(async move {
                me.process_loaded(g, branches).await;
            });
            Ok(())
        }
    }

    /// `registerBranch` (also `registerTccBranch` / `registerXaBranch`).
    pub async fn register_branch(&self, req: RegisterBranchRequest) -> Result<(), ApiError> {
        let gid = req.get("gid").to_string();
        let branch_id = req.get("branch_id").to_string();
        let tt = req.get("trans_type").to_string();
        if gid.is_empty() {
            return Err(ApiError::BadRequest("registerBranch needs 'gid'".into()));
        }
        if branch_id.is_empty() {
            return Err(ApiError::BadRequest(
                "registerBranch needs 'branch_id'".into(),
            ));
        }
        let t = now();
        let mk = |op: &str, url: &str, st: &str, data: Vec<u8>| Branch {
            gid: gid.clone(),
            url: url.to_string(),
            bin_data: data,
            branch_id: branch_id.clone(),
            op: op.to_string(),
            status: st.to_string(),
            create_time: Some(t),
            update_time: Some(t),
            finish_time: (st != status::PREPARED).then_some(t),
            ..Default::default()
        };
        let data = req.body();
        let rows = match tt.as_str() {
            trans_type::TCC => vec![
                mk(
                    op::CANCEL,
                    req.get("cancel"),
                    status::PREPARED,
                    data.clone(),
                ),
                mk(op::CONFIRM, req.get("confirm"), status::PREPARED, data),
            ],
            trans_type::XA => vec![
                mk(op::ROLLBACK, req.get("url"), status::PREPARED, data.clone()),
                mk(op::COMMIT, req.get("url"), status::PREPARED, data),
            ],
            trans_type::WORKFLOW => {
                let st = req.get("status");
                if st != status::SUCCEED && st != status::FAILED {
                    return Err(ApiError::BadRequest(format!(
                        "a workflow branch needs 'status' succeed or failed, got '{st}'"
                    )));
                }
                if req.get("op").is_empty() {
                    return Err(ApiError::BadRequest("a workflow branch needs 'op'".into()));
                }
                vec![mk(req.get("op"), "", st, data)]
            }
            "" => {
                return Err(ApiError::BadRequest(
                    "registerBranch needs 'trans_type': tcc, xa or workflow".into(),
                ));
            }
            other => {
                return Err(ApiError::BadRequest(format!(
                    "unknow trans type: {other}; registerBranch takes tcc, xa or workflow"
                )));
            }
        };
        for r in &rows {
            if r.url.is_empty() || is_http_url(&r.url) || is_grpc_url(&r.url) {
                continue;
            }
            return Err(ApiError::BadRequest(format!(
                "branch {} {} URL '{}' is not http(s)://host/path or host:port/package.Service/Method",
                r.branch_id, r.op, r.url
            )));
        }
        match self
            .store
            .write(WriteOp::AddBranches {
                gid: gid.clone(),
                expect_status: status::PREPARED.into(),
                branches: rows.clone(),
            })
            .await
        {
            Ok(_) => Ok(()),
            Err(StoreError::NotFound) => Err(ApiError::failure(format!(
                "no trans with gid: {gid} status: prepared found"
            ))),
            Err(StoreError::UniqueConflict) => {
                // A retried registration with the same content is fine.
                let existing = self.store.find_branches(&gid).await?;
                let same = rows.iter().all(|r| {
                    existing.iter().any(|e| {
                        e.branch_id == r.branch_id
                            && e.op == r.op
                            && e.url == r.url
                            && e.bin_data == r.bin_data
                    })
                });
                if same && tt != trans_type::WORKFLOW {
                    Ok(())
                } else {
                    Err(ApiError::failure(format!(
                        "branch '{branch_id}' of gid '{gid}' is already registered with other content: use a new branch_id"
                    )))
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// `query`: the transaction and its branches; unknown gid gives `transaction: null`.
    pub async fn query(&self, gid: &str) -> Result<QueryResult, ApiError> {
        if gid.is_empty() {
            return Err(ApiError::BadRequest(
                "no gid specified: use /query?gid=<gid>".into(),
            ));
        }
        let transaction = self.store.find_global(gid).await?;
        let branches = if transaction.is_some() {
            self.store.find_branches(gid).await?
        } else {
            vec![]
        };
        Ok(QueryResult {
            transaction,
            branches,
        })
    }

    /// `all`: page through transactions, newest first.
    pub async fn all(
        &self,
        gid: &str,
        q: ScanQuery,
    ) -> Result<(Option<Vec<TransGlobal>>, String), ApiError> {
        if !gid.is_empty() {
            let t = self.store.find_global(gid).await?;
            return Ok((t.map(|t| vec![t]), q.position));
        }
        if !q.status.is_empty() && !status::ALL.contains(&q.status.as_str()) {
            return Err(ApiError::BadRequest(format!(
                "unknown status '{}': use one of prepared, submitted, aborting, succeed, failed",
                q.status
            )));
        }
        let (rows, next) = self.store.scan_globals(&q).await?;
        Ok(((!rows.is_empty()).then_some(rows), next))
    }

    /// `forceStop`: mark an unfinished transaction `failed` without calling any branch.
    pub async fn force_stop(&self, gid: &str) -> Result<(), ApiError> {
        if gid.is_empty() {
            return Err(ApiError::BadRequest("forceStop needs 'gid'".into()));
        }
        for _ in 0..5 {
            let g = self.must_find(gid).await?;
            if g.is_finished() {
                return Err(ApiError::Failure(format!(
                    "global transaction force stop error. status: {}. error: FAILURE",
                    g.status
                )));
            }
            let t = now();
            match self
                .store
                .write(WriteOp::UpdateGlobal {
                    gid: gid.to_string(),
                    expect_status: g.status.clone(),
                    expect_owner: None,
                    set: GlobalUpdate {
                        status: Some(status::FAILED.into()),
                        rollback_time: Some(t),
                        rollback_reason: g
                            .rollback_reason
                            .is_empty()
                            .then(|| "force stopped".to_string()),
                        update_time: t,
                        ..Default::default()
                    },
                    branches: vec![],
                })
                .await
            {
                Ok(_) => return Ok(()),
                Err(StoreError::NotFound) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ApiError::Internal(format!(
            "gid {gid} kept changing status; retry forceStop"
        )))
    }

    /// `resetNextCronTime`: make the transaction due now.
    pub async fn reset_next_cron_time(&self, gid: &str) -> Result<(), ApiError> {
        if gid.is_empty() {
            return Err(ApiError::BadRequest("resetNextCronTime needs 'gid'".into()));
        }
        match self
            .store
            .write(WriteOp::ResetNextCronTime {
                gid: gid.to_string(),
                now: now(),
            })
            .await
        {
            Ok(_) => Ok(()),
            Err(StoreError::NotFound) => Err(ApiError::NotFound(format!(
                "no TransGlobal with gid: {gid} found"
            ))),
            Err(e) => Err(e.into()),
        }
    }

    /// `resetCronTime`: pull transactions scheduled later than now+timeout back to now.
    pub async fn reset_cron_time(
        &self,
        timeout_secs: i64,
        limit: usize,
    ) -> Result<(i64, bool), ApiError> {
        let t = now();
        match self
            .store
            .write(WriteOp::ResetCronTime {
                after: t + secs(timeout_secs),
                now: t,
                limit,
            })
            .await?
        {
            WriteOutcome::Reset {
                count,
                has_remaining,
            } => Ok((count, has_remaining)),
            _ => Ok((0, false)),
        }
    }

    // ---------------------------------------------------------------- topics / KV

    pub async fn subscribe(&self, topic: &str, url: &str, remark: &str) -> Result<(), ApiError> {
        if topic.is_empty() {
            return Err(ApiError::BadRequest(
                "empty topic: give ?topic=<name>".into(),
            ));
        }
        if url.is_empty() {
            return Err(ApiError::BadRequest(
                "empty url: give ?url=<subscriber url>".into(),
            ));
        }
        if !is_http_url(url) && !is_grpc_url(url) {
            return Err(ApiError::BadRequest(format!(
                "url '{url}' is not http(s)://host/path or host:port/package.Service/Method"
            )));
        }
        let t = now();
        let existing = self.store.find_kv(TOPICS_CAT, Some(topic)).await?;
        let sub = Subscriber {
            url: url.into(),
            remark: remark.into(),
        };
        match existing.first() {
            None => {
                let v = serde_json::to_string(&vec![sub]).unwrap_or_default();
                self.store
                    .write(WriteOp::CreateKv {
                        cat: TOPICS_CAT.into(),
                        k: topic.into(),
                        v,
                        now: t,
                    })
                    .await?;
            }
            Some(kv) => {
                let mut subs: Vec<Subscriber> = serde_json::from_str(&kv.v).unwrap_or_default();
                if subs.iter().any(|s| s.url == url) {
                    return Err(ApiError::Failure("this url exists FAILURE".into()));
                }
                subs.push(sub);
                let v = serde_json::to_string(&subs).unwrap_or_default();
                self.store
                    .write(WriteOp::UpdateKv {
                        cat: TOPICS_CAT.into(),
                        k: topic.into(),
                        v,
                        version: kv.version,
                        now: t,
                    })
                    .await
                    .map_err(|e| match e {
                        StoreError::NotFound => ApiError::Failure(
                            "the topic changed concurrently (storage: NotFound); retry FAILURE"
                                .into(),
                        ),
                        e => e.into(),
                    })?;
            }
        }
        Ok(())
    }

    pub async fn unsubscribe(&self, topic: &str, url: &str) -> Result<(), ApiError> {
        if topic.is_empty() {
            return Err(ApiError::BadRequest(
                "empty topic: give ?topic=<name>".into(),
            ));
        }
        if url.is_empty() {
            return Err(ApiError::BadRequest(
                "empty url: give ?url=<subscriber url>".into(),
            ));
        }
        let existing = self.store.find_kv(TOPICS_CAT, Some(topic)).await?;
        let Some(kv) = existing.first() else {
            return Err(ApiError::NotFound(format!("no such a topic: {topic}")));
        };
        let mut subs: Vec<Subscriber> = serde_json::from_str(&kv.v).unwrap_or_default();
        if subs.is_empty() {
            return Err(ApiError::NotFound(format!("this topic is empty: {topic}")));
        }
        let before = subs.len();
        subs.retain(|s| s.url != url);
        if subs.len() == before {
            return Err(ApiError::NotFound(format!("no such an url: {url}")));
        }
        let v = serde_json::to_string(&subs).unwrap_or_default();
        self.store
            .write(WriteOp::UpdateKv {
                cat: TOPICS_CAT.into(),
                k: topic.into(),
                v,
                version: kv.version,
                now: now(),
            })
            .await
            .map_err(|e| match e {
                StoreError::NotFound => ApiError::Failure(
                    "the topic changed concurrently (storage: NotFound); retry FAILURE".into(),
                ),
                e => e.into(),
            })?;
        Ok(())
    }

    pub async fn delete_topic(&self, topic: &str) -> Result<(), ApiError> {
        match self
            .store
            .write(WriteOp::DeleteKv {
                cat: TOPICS_CAT.into(),
                k: topic.into(),
            })
            .await
        {
            Ok(_) => Ok(()),
            Err(StoreError::NotFound) => {
                Err(ApiError::NotFound(format!("no such a topic: {topic}")))
            }
            Err(e) => Err(e.into()),
        }
    }

    pub async fn scan_kv(
        &self,
        cat: &str,
        position: &str,
        limit: usize,
    ) -> Result<(Vec<Kv>, String), ApiError> {
        Ok(self.store.scan_kv(cat, position, limit).await?)
    }

    pub async fn query_kv(&self, cat: &str, key: &str) -> Result<Vec<Kv>, ApiError> {
        Ok(self
            .store
            .find_kv(cat, (!key.is_empty()).then_some(key))
            .await?)
    }

    // ---------------------------------------------------------------- workflow

    /// `prepareWorkflow`: create the workflow as `prepared` (or return the stored one) with
    /// its recorded progress.
    pub async fn prepare_workflow(&self, req: TransRequest) -> Result<QueryResult, ApiError> {
        if req.trans_type != trans_type::WORKFLOW {
            return Err(ApiError::BadRequest(
                "prepareWorkflow needs trans_type 'workflow'".into(),
            ));
        }
        self.validate(&req, true)?;
        let t = now();
        let global = self.new_global(&req, status::PREPARED, t);
        match self
            .store
            .write(WriteOp::SaveNew {
                global: global.clone(),
                branches: vec![],
            })
            .await
        {
            Ok(_) => Ok(QueryResult {
                transaction: Some(global),
                branches: vec![],
            }),
            Err(StoreError::UniqueConflict) => {
                let g = self.must_find(&req.gid).await?;
                if g.trans_type != trans_type::WORKFLOW {
                    return Err(ApiError::failure(format!(
                        "gid '{}' is already used by a {} transaction: use a new gid",
                        g.gid, g.trans_type
                    )));
                }
                let branches = self.store.find_branches(&req.gid).await?;
                Ok(QueryResult {
                    transaction: Some(g),
                    branches,
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn submit_workflow(&self, req: TransRequest) -> Result<(), ApiError> {
        let st = req.req_extra.get("status").cloned().unwrap_or_default();
        if st != status::SUCCEED && st != status::FAILED {
            return Err(ApiError::BadRequest(format!(
                "a workflow submit needs req_extra.status succeed or failed, got '{st}'"
            )));
        }
        let t = now();
        let reason = req
            .req_extra
            .get("rollback_reason")
            .cloned()
            .unwrap_or_default();
        let result = req.req_extra.get("result").cloned().unwrap_or_default();
        self.store
            .write(WriteOp::UpdateGlobal {
                gid: req.gid.clone(),
                expect_status: status::PREPARED.into(),
                expect_owner: None,
                set: GlobalUpdate {
                    status: Some(st.clone()),
                    rollback_reason: (!reason.is_empty()).then_some(reason),
                    result: (!result.is_empty()).then_some(result),
                    finish_time: (st == status::SUCCEED).then_some(t),
                    rollback_time: (st == status::FAILED).then_some(t),
                    update_time: t,
                    ..Default::default()
                },
                branches: vec![],
            })
            .await
            .map_err(|e| match e {
                StoreError::NotFound => ApiError::failure(format!(
                    "workflow {} is not prepared (unknown or finished);",
                    req.gid
                )),
                e => e.into(),
            })?;
        Ok(())
    }

    // ---------------------------------------------------------------- processing

    /// Process a transaction already loaded (fresh from submit, or claimed by recovery).
    pub(crate) async fn process_loaded(&self, g: TransGlobal, branches: Vec<Branch>) -> PassEnd {
        let Some(_guard) = self.enter(&g.gid) else {
            return PassEnd::Busy;
        };
        process::run(self, g, branches).await
    }

    /// Load and process one transaction (used by recovery).
    pub async fn process_gid(&self, gid: &str) -> Result<(), ApiError> {
        let Some(_guard) = self.enter(gid) else {
            return Ok(());
        };
        let Some(g) = self.store.find_global(gid).await? else {
            return Ok(());
        };
        if g.is_finished() {
            return Ok(());
        }
        let branches = self.store.find_branches(gid).await?;
        process::run(self, g, branches).await;
        Ok(())
    }
}

/// One subscriber of a topic, as stored in the KV value.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Subscriber {
    #[serde(default)]
    pub url: String,
    #[serde(default)]
    pub remark: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn branch_headers_that_every_call_could_carry() {
        for (k, v, grpc) in [
            ("Authorization", "Bearer a.b-c", false),
            ("x-request-id", "7\tb", true),
            ("X-Token", "t", true),
            // bytes above ASCII go out as they are (HTTP's obs-text), on both callers
            ("x", "é", false),
            ("x!#$%&'*+-.^_`|~", "", false),
        ] {
            assert_eq!(check_branch_header(k, v, grpc), Ok(()), "{k}: {v}");
        }
        for (k, v, grpc, want) in [
            ("", "v", false, "not a valid header name"),
            ("a b", "v", false, "not a valid header name"),
            ("a:b", "v", false, "not a valid header name"),
            ("é", "v", false, "not a valid header name"),
            ("x", "a\r\nb: c", false, "control characters"),
            ("x", "\u{0}", false, "control characters"),
            ("x", "a\u{7f}", false, "control characters"),
            ("trace-bin", "AAEC", true, "-bin"),
            ("Trace-BIN", "AAEC", true, "-bin"),
        ] {
            let e = check_branch_header(k, v, grpc).err().unwrap_or_default();
            assert!(e.contains(want), "{k:?}={v:?}: {e}");
        }
        // over HTTP a -bin name is just a name
        assert_eq!(check_branch_header("trace-bin", "AAEC", false), Ok(()));
    }
}
