//! The seam through which the engine calls branches.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use dtm_proto::BranchOutcome;

/// One call to a branch (or a back-check / resume callback).
#[derive(Debug, Clone)]
pub struct BranchCall {
    pub url: String,
    pub body: Vec<u8>,
    pub gid: String,
    pub trans_type: String,
    pub branch_id: String,
    pub op: String,
    /// `http`, `grpc` or `json-rpc`: decides the transport together with the URL.
    pub protocol: String,
    pub headers: BTreeMap<String, String>,
    pub timeout: Duration,
}

#[async_trait]
pub trait BranchCaller: Send + Sync + 'static {
    /// Call the branch and classify its answer. Never panics; transport problems are
    /// `BranchOutcome::Error`.
    async fn call(&self, call: &BranchCall) -> BranchOutcome;

    /// POST a JSON document (the alert webhook). Failures are only logged by the caller.
    async fn post_json(
        &self,
        url: &str,
        body: &serde_json::Value,
        timeout: Duration,
    ) -> Result<(), String>;
}
