//! gRPC and JSON-RPC helpers for [`TestServer`]: a `dtmgimp.Dtm` client generated from our
//! proto, request builders, and a JSON-RPC call.

use dtm_proto::pb::dtmgimp::dtm_client::DtmClient;
use dtm_proto::pb::dtmgimp::{DtmRequest, DtmTransOptions};
use serde_json::{Value, json};
use tonic::transport::Channel;

use crate::TestServer;

impl TestServer {
    /// A tonic client of the server's `dtmgimp.Dtm` service.
    pub async fn dtm_client(&self) -> anyhow::Result<DtmClient<Channel>> {
        Ok(DtmClient::connect(format!("http://{}", self.grpc)).await?)
    }

    /// `POST /api/json-rpc` with `{"jsonrpc":"2.0","id":"no-use","method":..,"params":..}`
    /// (what dtm's Go client sends); the whole answer.
    pub async fn jrpc(&self, method: &str, params: &Value) -> anyhow::Result<Value> {
        let body = json!({"jsonrpc": "2.0", "id": "no-use", "method": method, "params": params});
        self.jrpc_raw(&body.to_string()).await
    }

    /// `POST /api/json-rpc` with any body; the answer parsed as JSON (or a JSON string).
    pub async fn jrpc_raw(&self, body: &str) -> anyhow::Result<Value> {
        let url = self.api.replace("/api/dtmsvr", "/api/json-rpc");
        let r = self
            .http
            .post(url)
            .header("Content-Type", "application/json")
            .body(body.to_string())
            .send()
            .await?;
        anyhow::ensure!(
            r.status().as_u16() == 200,
            "json-rpc answered HTTP {}",
            r.status()
        );
        let text = r.text().await?;
        Ok(serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }
}

/// A `DtmRequest` with the given steps (JSON text built from `(action, compensate)` URL
/// pairs; an empty compensate is left out for msg) and payloads.
pub fn dtm_request(
    gid: &str,
    trans_type: &str,
    steps: &[(String, String)],
    payloads: Vec<Vec<u8>>,
) -> DtmRequest {
    let steps: Vec<Value> = steps
        .iter()
        .map(|(a, c)| {
            if trans_type == "msg" {
                json!({"action": a})
            } else {
                json!({"action": a, "compensate": c})
            }
        })
        .collect();
    DtmRequest {
        gid: gid.to_string(),
        trans_type: trans_type.to_string(),
        trans_options: Some(DtmTransOptions::default()),
        steps: Value::Array(steps).to_string(),
        bin_payloads: payloads,
        ..Default::default()
    }
}
