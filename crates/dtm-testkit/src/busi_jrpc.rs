//! The JSON-RPC side of the branch simulator: `POST /api/json-rpc` on the HTTP simulator,
//! branch URLs `http://HOST/api/json-rpc?method=<Name>` (dtm's `test/busi/base_jrpc.go`).
//!
//! Normally `200 {"jsonrpc":"2.0","error":null,"id":<id>}`. With the `JrpcResult` switch
//! armed, the next call answers as dtm's busi does: `error` is the map
//! `{"code":{"FAILURE":-32901,"ONGOING":-32902,"OTHER":-23977}}`, whose text contains
//! `ONGOING`, so dtm classifies every armed result as ONGOING. Arming it with a number
//! instead (e.g. `-32901`) answers a regular `{"code":N,"message":..}` error.
//!
//! Each call is recorded with the route set to the method and `gid`, `trans_type`,
//! `branch_id`, `op` taken from the params, so [`Busi::trace`] covers it.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::busi::{Busi, Call, Inner, slot, take};

impl Busi {
    /// JSON-RPC branch URL of a method, e.g. `http://HOST/api/json-rpc?method=TransIn`.
    pub fn jrpc_route(&self, method: &str) -> String {
        format!("http://{}/api/json-rpc?method={method}", self.addr)
    }
}

pub(crate) async fn handle(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let text = String::from_utf8_lossy(&body).to_string();
    let req: Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(e) => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"error": format!("busi json-rpc: body is not JSON: {e}")}).to_string(),
            )
                .into_response();
        }
    };
    let method = req["method"].as_str().unwrap_or("").to_string();
    let mut query = BTreeMap::new();
    for k in ["gid", "trans_type", "branch_id", "op"] {
        if let Some(v) = req["params"][k].as_str() {
            query.insert(k.to_string(), v.to_string());
        }
    }
    query.insert("method".to_string(), method.clone());
    if let Ok(mut c) = inner.calls.lock() {
        c.push(Call {
            route: method,
            method: "POST".to_string(),
            query,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
                .collect(),
            body: text,
        });
    }
    let delay = inner.delay.lock().map(|d| *d).unwrap_or_default();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let error = match take(&inner, slot::JRPC).filter(|r| !r.is_empty()) {
        None => Value::Null,
        Some(r) => match r.parse::<i64>() {
            Ok(code) => json!({"code": code, "message": format!("busi answered code {code}")}),
            Err(_) => json!({"code": {"FAILURE": -32901, "ONGOING": -32902, "OTHER": -23977}}),
        },
    };
    (
        StatusCode::OK,
        json!({"jsonrpc": "2.0", "error": error, "id": req["id"]}).to_string(),
    )
        .into_response()
}
