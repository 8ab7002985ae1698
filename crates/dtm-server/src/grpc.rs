//! The gRPC API: dtm's `dtmgimp.Dtm` service (dtm §4.1) on the gRPC port, mapped onto the
//! same [`Coordinator`] calls as the HTTP API, plus server reflection.
//!
//! Errors map as dtm's `DtmError2GrpcError` does, with the kinds dtm leaves as `Unknown`
//! given their proper codes: FAILURE -> `Aborted`, ONGOING -> `FailedPrecondition`, bad
//! input -> `InvalidArgument`, not found -> `NotFound`, too large -> `ResourceExhausted`,
//! store unavailable -> `Unavailable`, anything else -> `Unknown`.

use std::collections::BTreeMap;
use std::sync::Arc;

use dtm_core::{ApiError, Coordinator};
use dtm_proto::pb::dtmgimp::dtm_server::{Dtm, DtmServer};
use dtm_proto::pb::dtmgimp::{
    DtmBranchRequest, DtmGidReply, DtmProgress, DtmProgressesReply, DtmRequest, DtmTopicRequest,
    DtmTransaction,
};
use dtm_proto::{RegisterBranchRequest, TransOptions, TransRequest, protocol};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

use crate::metrics::Metrics;

/// The `dtmgimp.Dtm` implementation.
pub struct DtmService {
    co: Arc<Coordinator>,
    metrics: Option<Arc<Metrics>>,
}

impl DtmService {
    pub fn new(co: Arc<Coordinator>) -> DtmService {
        DtmService { co, metrics: None }
    }

    /// Count every call in `dtm_server_process_total{type="grpc"}`.
    pub fn with_metrics(mut self, m: Arc<Metrics>) -> DtmService {
        self.metrics = Some(m);
        self
    }

    fn count(&self, rpc: &str, ok: bool) {
        if let Some(m) = &self.metrics {
            m.count_grpc(rpc, ok);
        }
    }

    fn done(&self, r: Result<(), ApiError>, rpc: &str) -> Result<Response<()>, Status> {
        self.count(rpc, r.is_ok());
        match r {
            Ok(()) => Ok(Response::new(())),
            Err(e) => {
                tracing::debug!("gRPC {rpc}: {e}");
                Err(status_of(e))
            }
        }
    }
}

/// The gRPC status of a service error.
pub fn status_of(e: ApiError) -> Status {
    match e {
        ApiError::Failure(m) => Status::aborted(m),
        ApiError::Ongoing(m) => Status::failed_precondition(m),
        ApiError::BadRequest(m) => Status::invalid_argument(m),
        ApiError::NotFound(m) => Status::not_found(m),
        ApiError::TooLarge(m) => Status::resource_exhausted(m),
        ApiError::Unavailable(m) => Status::unavailable(m),
        ApiError::Internal(m) => Status::unknown(m),
    }
}

/// A `DtmRequest` as the service's transaction request (dtm `TransFromDtmRequest`): the
/// protocol is always `grpc`, `Steps` is JSON text, `BinPayloads` are the branch bodies.
pub fn trans_request(r: DtmRequest) -> Result<TransRequest, ApiError> {
    let o = r.trans_options.unwrap_or_default();
    let steps: Value = if r.steps.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&r.steps).map_err(|e| {
            ApiError::BadRequest(format!(
                "Steps must be the steps as JSON text, e.g. \
                 [{{\"action\":\"host:port/pkg.Service/Method\",\"compensate\":\"...\"}}]: {e}"
            ))
        })?
    };
    // reuse the HTTP decoder for the steps (and legacy steps[i].data payloads)
    let parsed = TransRequest::from_json(&json!({ "steps": steps }))
        .map_err(|e| ApiError::BadRequest(format!("Steps: {e}")))?;
    for (k, v) in [
        ("TimeoutToFail", o.timeout_to_fail),
        ("RequestTimeout", o.request_timeout),
        ("RetryInterval", o.retry_interval),
        ("RetryLimit", o.retry_limit),
    ] {
        if v < 0 {
            return Err(ApiError::BadRequest(format!(
                "TransOptions.{k} must not be negative, got {v}"
            )));
        }
    }
    let mut payloads = r.bin_payloads;
    payloads.extend(parsed.payloads);
    Ok(TransRequest {
        gid: dtm_proto::escape(&r.gid),
        trans_type: r.trans_type,
        steps: parsed.steps,
        payloads,
        query_prepared: r.query_prepared,
        protocol: protocol::GRPC.to_string(),
        custom_data: r.customed_data,
        rollback_reason: r.rollback_reason,
        options: TransOptions {
            wait_result: o.wait_result,
            timeout_to_fail: o.timeout_to_fail,
            request_timeout: o.request_timeout,
            retry_interval: o.retry_interval,
            branch_headers: o.branch_headers.into_iter().collect(),
            // dtm carries no `concurrent` over gRPC; saga concurrency is in CustomedData
            concurrent: false,
            retry_limit: o.retry_limit,
            retry_count: 0,
        },
        req_extra: r.req_extra.into_iter().collect(),
    })
}

/// A `DtmBranchRequest` as a registerBranch request: `Data` holds the string keys
/// (confirm/cancel, url, op/status/sync), `BusiPayload` is the body, `Op` is unused.
pub fn register_request(r: DtmBranchRequest) -> RegisterBranchRequest {
    let mut fields: BTreeMap<String, String> = r.data.into_iter().collect();
    fields.insert("gid".into(), dtm_proto::escape(&r.gid));
    fields.insert("trans_type".into(), r.trans_type);
    fields.insert("branch_id".into(), r.branch_id);
    RegisterBranchRequest {
        fields,
        bin_data: Some(r.busi_payload),
    }
}

#[tonic::async_trait]
impl Dtm for DtmService {
    async fn new_gid(&self, _: Request<()>) -> Result<Response<DtmGidReply>, Status> {
        self.count("NewGid", true);
        Ok(Response::new(DtmGidReply {
            gid: self.co.new_gid(),
        }))
    }

    async fn submit(&self, req: Request<DtmRequest>) -> Result<Response<()>, Status> {
        let r = match trans_request(req.into_inner()) {
            Ok(t) => self.co.submit(t).await,
            Err(e) => Err(e),
        };
        self.done(r, "Submit")
    }

    async fn prepare(&self, req: Request<DtmRequest>) -> Result<Response<()>, Status> {
        let r = match trans_request(req.into_inner()) {
            Ok(t) => self.co.prepare(t).await,
            Err(e) => Err(e),
        };
        self.done(r, "Prepare")
    }

    async fn abort(&self, req: Request<DtmRequest>) -> Result<Response<()>, Status> {
        let r = match trans_request(req.into_inner()) {
            Ok(t) => self.co.abort(t).await,
            Err(e) => Err(e),
        };
        self.done(r, "Abort")
    }

    async fn register_branch(
        &self,
        req: Request<DtmBranchRequest>,
    ) -> Result<Response<()>, Status> {
        let r = self
            .co
            .register_branch(register_request(req.into_inner()))
            .await;
        self.done(r, "RegisterBranch")
    }

    async fn prepare_workflow(
        &self,
        req: Request<DtmRequest>,
    ) -> Result<Response<DtmProgressesReply>, Status> {
        let r = match trans_request(req.into_inner()) {
            Ok(t) => self.co.prepare_workflow(t).await,
            Err(e) => Err(e),
        };
        self.count("PrepareWorkflow", r.is_ok());
        let q = r.map_err(|e| {
            tracing::debug!("gRPC PrepareWorkflow: {e}");
            status_of(e)
        })?;
        // dtm leaves Result empty here (its quirk Q8); it is filled so that re-running a
        // finished workflow over gRPC gets its result back, as over HTTP.
        let transaction = q.transaction.map(|t| DtmTransaction {
            gid: t.gid,
            status: t.status,
            rollback_reason: t.rollback_reason,
            result: t.result,
        });
        let progresses = q
            .branches
            .into_iter()
            .map(|b| DtmProgress {
                status: b.status,
                bin_data: b.bin_data,
                branch_id: b.branch_id,
                op: b.op,
            })
            .collect();
        Ok(Response::new(DtmProgressesReply {
            transaction,
            progresses,
        }))
    }

    async fn subscribe(&self, req: Request<DtmTopicRequest>) -> Result<Response<()>, Status> {
        let r = req.into_inner();
        self.done(
            self.co.subscribe(&r.topic, &r.url, &r.remark).await,
            "Subscribe",
        )
    }

    async fn unsubscribe(&self, req: Request<DtmTopicRequest>) -> Result<Response<()>, Status> {
        let r = req.into_inner();
        self.done(self.co.unsubscribe(&r.topic, &r.url).await, "Unsubscribe")
    }

    async fn delete_topic(&self, req: Request<DtmTopicRequest>) -> Result<Response<()>, Status> {
        let r = req.into_inner();
        let res = if r.topic.is_empty() {
            Err(ApiError::BadRequest(
                "empty topic: give Topic the name to delete".into(),
            ))
        } else {
            self.co.delete_topic(&r.topic).await
        };
        self.done(res, "DeleteTopic")
    }
}

/// Serve `dtmgimp.Dtm` and reflection on `listener` until `shutdown` resolves, then let
/// the requests in progress finish.
pub async fn serve(
    svc: DtmService,
    listener: TcpListener,
    max_message: usize,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(dtm_proto::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(dtm_proto::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let dtm = DtmServer::new(svc)
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(dtm)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtm_request_maps_to_a_grpc_transaction() {
        let mut headers = std::collections::HashMap::new();
        headers.insert("h".to_string(), "v".to_string());
        let r = DtmRequest {
            gid: "g;1".into(),
            trans_type: "saga".into(),
            trans_options: Some(dtm_proto::pb::dtmgimp::DtmTransOptions {
                wait_result: true,
                timeout_to_fail: 5,
                branch_headers: headers,
                ..Default::default()
            }),
            customed_data: r#"{"concurrent":true}"#.into(),
            bin_payloads: vec![vec![8, 30], vec![8, 30]],
            steps: r#"[{"action":"h:1/a.B/C","compensate":"h:1/a.B/D"},{"action":"h:1/a.B/E"}]"#
                .into(),
            ..Default::default()
        };
        let t = trans_request(r).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.gid, "g1");
        assert_eq!(t.protocol, "grpc");
        assert_eq!(t.steps.len(), 2);
        assert_eq!(t.steps[0]["compensate"], "h:1/a.B/D");
        assert_eq!(t.payloads, vec![vec![8, 30], vec![8, 30]]);
        assert!(t.options.wait_result);
        assert_eq!(t.options.timeout_to_fail, 5);
        assert_eq!(t.options.branch_headers["h"], "v");
        assert_eq!(t.custom_data, r#"{"concurrent":true}"#);
    }

    #[test]
    fn go_clients_send_null_steps() {
        let r = DtmRequest {
            gid: "g".into(),
            trans_type: "tcc".into(),
            steps: "null".into(),
            ..Default::default()
        };
        let t = trans_request(r).unwrap_or_else(|e| panic!("{e}"));
        assert!(t.steps.is_empty());
        let bad = DtmRequest {
            steps: "[1".into(),
            ..Default::default()
        };
        let e = trans_request(bad).unwrap_err();
        assert!(e.to_string().contains("Steps"), "{e}");
    }

    #[test]
    fn branch_request_uses_the_payload_bytes() {
        let mut data = std::collections::HashMap::new();
        data.insert("confirm".to_string(), "h:1/a.B/Confirm".to_string());
        let r = register_request(DtmBranchRequest {
            gid: "g".into(),
            trans_type: "tcc".into(),
            branch_id: "01".into(),
            op: "ignored".into(),
            data,
            busi_payload: vec![0xff, 0],
        });
        assert_eq!(r.get("confirm"), "h:1/a.B/Confirm");
        assert_eq!(r.get("branch_id"), "01");
        assert_eq!(r.body(), vec![0xff, 0]);
    }

    #[test]
    fn errors_map_to_grpc_codes() {
        use tonic::Code;
        assert_eq!(status_of(ApiError::failure("x")).code(), Code::Aborted);
        assert_eq!(
            status_of(ApiError::Ongoing("x".into())).code(),
            Code::FailedPrecondition
        );
        assert_eq!(
            status_of(ApiError::BadRequest("x".into())).code(),
            Code::InvalidArgument
        );
        assert_eq!(
            status_of(ApiError::NotFound("x".into())).code(),
            Code::NotFound
        );
        assert_eq!(
            status_of(ApiError::Unavailable("x".into())).code(),
            Code::Unavailable
        );
        assert_eq!(
            status_of(ApiError::Internal("x".into())).code(),
            Code::Unknown
        );
    }
}
