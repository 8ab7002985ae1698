//! The gRPC side of the branch simulator: dtm's test service `busi.Busi` plus the workflow
//! resume callback `workflow.Workflow/Execute`, sharing the result switches and the call
//! record of an HTTP [`Busi`].
//!
//! Results as dtm's `handleGrpcBusiness`: SUCCESS -> OK, FAILURE -> `Aborted` with
//! `reason:<FailureReason>`, ONGOING -> `FailedPrecondition` `ONGOING`, anything else ->
//! `Internal` `unknow result <v>`. A call is recorded with the route set to the method
//! name and the `dtm-*` metadata as the `gid`, `trans_type`, `branch_id`, `op` and `dtm`
//! query values, so [`Busi::trace`] covers HTTP and gRPC calls alike.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use dtm_proto::pb::busi::busi_server::{Busi as BusiRpc, BusiServer};
use dtm_proto::pb::busi::{BusiReply, ReqGrpc};
use dtm_proto::pb::workflow::WorkflowData;
use dtm_proto::pb::workflow::workflow_server::{Workflow, WorkflowServer};
use serde_json::json;
use tonic::{Request, Response, Status};

use crate::busi::{Busi, Call, Inner, slot, take};

/// A running gRPC simulator.
#[derive(Clone)]
pub struct BusiGrpc {
    /// `127.0.0.1:PORT`, the host part of branch URLs.
    pub host: String,
    pub addr: SocketAddr,
    /// The HTTP simulator whose switches and call record are shared.
    pub busi: Busi,
}

impl BusiGrpc {
    /// Serve `busi.Busi` and `workflow.Workflow` on a free loopback port.
    pub async fn start(busi: &Busi) -> anyhow::Result<BusiGrpc> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let svc = Svc {
            inner: Arc::clone(&busi.inner),
        };
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        let router = tonic::transport::Server::builder()
            .add_service(BusiServer::new(svc.clone()))
            .add_service(WorkflowServer::new(svc));
        tokio::spawn(async move {
            let _ = router.serve_with_incoming(incoming).await;
        });
        Ok(BusiGrpc {
            host: addr.to_string(),
            addr,
            busi: busi.clone(),
        })
    }

    /// Branch URL of a `busi.Busi` method, e.g. `127.0.0.1:PORT/busi.Busi/TransIn`.
    pub fn route(&self, method: &str) -> String {
        format!("{}/busi.Busi/{method}", self.host)
    }

    /// The workflow resume callback URL, `127.0.0.1:PORT/workflow.Workflow/Execute`.
    pub fn workflow_url(&self) -> String {
        format!("{}/workflow.Workflow/Execute", self.host)
    }
}

/// The serialized request message of a branch, for `BinPayloads` / `BusiPayload`.
pub fn req_grpc(amount: i64, trans_out_result: &str, trans_in_result: &str) -> Vec<u8> {
    prost::Message::encode_to_vec(&ReqGrpc {
        amount,
        trans_out_result: trans_out_result.to_string(),
        trans_in_result: trans_in_result.to_string(),
    })
}

#[derive(Clone)]
struct Svc {
    inner: Arc<Inner>,
}

impl Svc {
    /// Record the call, apply the configured delay, and return the sticky result if any.
    async fn record<T>(&self, route: &str, req: &Request<T>, body: String) -> Option<String> {
        let headers: BTreeMap<String, String> = req
            .metadata()
            .clone()
            .into_headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        let mut query = BTreeMap::new();
        for k in ["gid", "trans_type", "branch_id", "op", "dtm"] {
            if let Some(v) = headers.get(&format!("dtm-{k}")) {
                query.insert(k.to_string(), v.clone());
            }
        }
        if let Ok(mut c) = self.inner.calls.lock() {
            c.push(Call {
                route: route.to_string(),
                method: "GRPC".to_string(),
                query,
                headers,
                body,
            });
        }
        let delay = self.inner.delay.lock().map(|d| *d).unwrap_or_default();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        self.inner
            .sticky
            .lock()
            .ok()
            .and_then(|s| s.get(route).cloned())
    }

    fn pick(&self, slot_name: &str, field: &str) -> String {
        take(&self.inner, slot_name)
            .filter(|s| !s.is_empty())
            .or_else(|| Some(field.to_string()).filter(|s| !s.is_empty()))
            .unwrap_or_else(|| "SUCCESS".into())
    }

    fn result(&self, r: &str) -> Result<(), Status> {
        match r {
            "" | "SUCCESS" => Ok(()),
            "FAILURE" => Err(Status::aborted(format!(
                "reason:{}",
                take(&self.inner, slot::FAILURE_REASON).unwrap_or_default()
            ))),
            "ONGOING" => Err(Status::failed_precondition("ONGOING")),
            other => Err(Status::internal(format!("unknow result {other}"))),
        }
    }

    /// A business method: record, then sticky result, else slot, else request field.
    async fn business(
        &self,
        route: &str,
        req: Request<ReqGrpc>,
        slot_name: &str,
        field: fn(&ReqGrpc) -> &str,
    ) -> Result<Response<()>, Status> {
        let body = describe(req.get_ref());
        if let Some(v) = self.record(route, &req, body).await {
            return self.result(&v).map(Response::new);
        }
        let r = self.pick(slot_name, field(req.get_ref()));
        self.result(&r).map(Response::new)
    }
}

fn describe(r: &ReqGrpc) -> String {
    json!({
        "Amount": r.amount,
        "TransOutResult": r.trans_out_result,
        "TransInResult": r.trans_in_result,
    })
    .to_string()
}

fn none(_: &ReqGrpc) -> &str {
    ""
}

fn trans_in(r: &ReqGrpc) -> &str {
    &r.trans_in_result
}

fn trans_out(r: &ReqGrpc) -> &str {
    &r.trans_out_result
}

#[tonic::async_trait]
impl BusiRpc for Svc {
    async fn trans_in(&self, req: Request<ReqGrpc>) -> Result<Response<()>, Status> {
        self.business("TransIn", req, slot::TRANS_IN, trans_in)
            .await
    }

    async fn trans_out(&self, req: Request<ReqGrpc>) -> Result<Response<()>, Status> {
        self.business("TransOut", req, slot::TRANS_OUT, trans_out)
            .await
    }

    async fn trans_in_revert(&self, req: Request<ReqGrpc>) -> Result<Response<()>, Status> {
        self.business("TransInRevert", req, slot::TRANS_IN_REVERT, none)
            .await
    }

    async fn trans_out_revert(&self, req: Request<ReqGrpc>) -> Result<Response<()>, Status> {
        self.business("TransOutRevert", req, slot::TRANS_OUT_REVERT, none)
            .await
    }

    async fn trans_in_confirm(&self, req: Request<ReqGrpc>) -> Result<Response<()>, Status> {
        self.business("TransInConfirm", req, slot::TRANS_IN_CONFIRM, none)
            .await
    }

    async fn trans_out_confirm(&self, req: Request<ReqGrpc>) -> Result<Response<()>, Status> {
        self.business("TransOutConfirm", req, slot::TRANS_OUT_CONFIRM, none)
            .await
    }

    async fn trans_in_tcc(&self, req: Request<ReqGrpc>) -> Result<Response<()>, Status> {
        self.business("TransInTcc", req, slot::TRANS_IN, trans_in)
            .await
    }

    async fn trans_out_tcc(&self, req: Request<ReqGrpc>) -> Result<Response<()>, Status> {
        self.business("TransOutTcc", req, slot::TRANS_OUT, trans_out)
            .await
    }

    async fn trans_out_header_yes(&self, req: Request<ReqGrpc>) -> Result<Response<()>, Status> {
        if req.metadata().get("test_header").is_none() {
            self.record("TransOutHeaderYes", &req, describe(req.get_ref()))
                .await;
            return Err(Status::unknown("no header found in HeaderYes"));
        }
        self.business("TransOutHeaderYes", req, slot::TRANS_OUT, trans_out)
            .await
    }

    async fn trans_out_header_no(&self, req: Request<ReqGrpc>) -> Result<Response<()>, Status> {
        let sticky = self
            .record("TransOutHeaderNo", &req, describe(req.get_ref()))
            .await;
        if req.metadata().get("test_header").is_some() {
            return Err(Status::unknown("header found in HeaderNo"));
        }
        match sticky {
            Some(v) => self.result(&v).map(Response::new),
            None => Ok(Response::new(())),
        }
    }

    async fn query_prepared(&self, req: Request<ReqGrpc>) -> Result<Response<BusiReply>, Status> {
        let sticky = self
            .record("QueryPrepared", &req, describe(req.get_ref()))
            .await;
        let r = sticky.unwrap_or_else(|| self.pick(slot::QUERY_PREPARED, ""));
        self.result(&r).map(|_| {
            Response::new(BusiReply {
                message: "a sample data".into(),
            })
        })
    }
}

#[tonic::async_trait]
impl Workflow for Svc {
    /// Records the resume call (body = the workflow input) and answers the
    /// `WorkflowResult` switch, default SUCCESS.
    async fn execute(&self, req: Request<WorkflowData>) -> Result<Response<()>, Status> {
        let body = String::from_utf8_lossy(&req.get_ref().data).to_string();
        let sticky = self.record("Execute", &req, body).await;
        let r = sticky.unwrap_or_else(|| self.pick(slot::WORKFLOW, ""));
        self.result(&r).map(Response::new)
    }
}
