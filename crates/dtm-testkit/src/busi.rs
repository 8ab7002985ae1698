//! The branch simulator: dtm's test "busi" service over HTTP, with one-shot result
//! switches and a record of every call it received.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use serde_json::{Value, json};

/// One request the simulator received.
#[derive(Debug, Clone)]
pub struct Call {
    /// Route name, e.g. `TransIn`, `TransOutRevert`, `QueryPrepared`.
    pub route: String,
    pub method: String,
    pub query: BTreeMap<String, String>,
    pub headers: BTreeMap<String, String>,
    pub body: String,
}

impl Call {
    pub fn q(&self, k: &str) -> &str {
        self.query.get(k).map(String::as_str).unwrap_or("")
    }
}

/// Result slots, armed with [`Busi::set_once`]; the next matching call takes and clears it.
pub mod slot {
    pub const TRANS_IN: &str = "TransInResult";
    pub const TRANS_OUT: &str = "TransOutResult";
    pub const TRANS_IN_CONFIRM: &str = "TransInConfirmResult";
    pub const TRANS_OUT_CONFIRM: &str = "TransOutConfirmResult";
    pub const TRANS_IN_REVERT: &str = "TransInRevertResult";
    pub const TRANS_OUT_REVERT: &str = "TransOutRevertResult";
    pub const QUERY_PREPARED: &str = "QueryPreparedResult";
    pub const NEXT: &str = "NextResult";
    pub const FAILURE_REASON: &str = "FailureReason";
    /// JSON-RPC busi (`/api/json-rpc`): the next call answers with an error.
    pub const JRPC: &str = "JrpcResult";
    /// gRPC `workflow.Workflow/Execute`: the next resume call's result.
    pub const WORKFLOW: &str = "WorkflowResult";
}

#[derive(Default)]
pub(crate) struct Inner {
    slots: Mutex<HashMap<String, String>>,
    pub(crate) calls: Mutex<Vec<Call>>,
    pub(crate) delay: Mutex<Duration>,
    retry_counter: Mutex<u32>,
    /// per-route sticky results (not one-shot), e.g. to make a branch fail until cleared
    pub(crate) sticky: Mutex<HashMap<String, String>>,
}

/// A running simulator.
#[derive(Clone)]
pub struct Busi {
    /// Base URL of the routes, e.g. `http://127.0.0.1:PORT/api/busi`.
    pub url: String,
    pub addr: SocketAddr,
    pub(crate) inner: Arc<Inner>,
}

impl Busi {
    /// Start on a free loopback port.
    pub async fn start() -> anyhow::Result<Busi> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Inner::default());
        let app = Router::new()
            .route("/api/busi/{route}", any(handle))
            .route(
                "/api/json-rpc",
                axum::routing::post(crate::busi_jrpc::handle),
            )
            .with_state(Arc::clone(&inner));
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Busi {
            url: format!("http://{addr}/api/busi"),
            addr,
            inner,
        })
    }

    /// URL of a route.
    pub fn route(&self, name: &str) -> String {
        format!("{}/{name}", self.url)
    }

    /// Arm a one-shot result: `SUCCESS`, `FAILURE`, `ONGOING` or `ERROR`.
    pub fn set_once(&self, slot: &str, v: &str) {
        if let Ok(mut s) = self.inner.slots.lock() {
            s.insert(slot.to_string(), v.to_string());
        }
    }

    /// Make every call of `route` answer `v` until [`Busi::clear_sticky`].
    pub fn set_sticky(&self, route: &str, v: &str) {
        if let Ok(mut s) = self.inner.sticky.lock() {
            s.insert(route.to_string(), v.to_string());
        }
    }

    pub fn clear_sticky(&self, route: &str) {
        if let Ok(mut s) = self.inner.sticky.lock() {
            s.remove(route);
        }
    }

    /// Every handler sleeps this long before answering (a slow service).
    pub fn set_delay(&self, d: Duration) {
        if let Ok(mut x) = self.inner.delay.lock() {
            *x = d;
        }
    }

    pub fn calls(&self) -> Vec<Call> {
        self.inner
            .calls
            .lock()
            .map(|c| c.clone())
            .unwrap_or_default()
    }

    /// Calls whose `gid` query parameter (or webhook body gid) is `gid`, in arrival order.
    pub fn calls_for(&self, gid: &str) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| c.q("gid") == gid)
            .collect()
    }

    /// `route/op` of each call for `gid`, e.g. `["TransOut/action", "TransIn/action"]`.
    pub fn trace(&self, gid: &str) -> Vec<String> {
        self.calls_for(gid)
            .iter()
            .map(|c| format!("{}/{}", c.route, c.q("op")))
            .collect()
    }
}

pub(crate) fn take(inner: &Inner, slot: &str) -> Option<String> {
    inner.slots.lock().ok()?.remove(slot)
}

fn result_response(inner: &Inner, r: &str) -> Response {
    match r {
        "" | "SUCCESS" => (StatusCode::OK, "null").into_response(),
        "FAILURE" => (
            StatusCode::CONFLICT,
            json!({"error": format!(
                "reason:{}. FAILURE",
                take(inner, slot::FAILURE_REASON).unwrap_or_default()
            )})
            .to_string(),
        )
            .into_response(),
        "ONGOING" => (
            StatusCode::TOO_EARLY,
            json!({"error": "ONGOING"}).to_string(),
        )
            .into_response(),
        other => (
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"error": format!("{other} from user")}).to_string(),
        )
            .into_response(),
    }
}

async fn handle(
    State(inner): State<Arc<Inner>>,
    axum::extract::Path(route): axum::extract::Path<String>,
    method: Method,
    Query(query): Query<BTreeMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body_s = String::from_utf8_lossy(&body).to_string();
    let call = Call {
        route: route.clone(),
        method: method.to_string(),
        query: query.clone(),
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
            .collect(),
        body: body_s.clone(),
    };
    let mut call = call;
    if route == "AlertWebHook" {
        // record the webhook under the gid it reports
        if let Ok(v) = serde_json::from_str::<Value>(&body_s)
            && let Some(g) = v.get("gid").and_then(|g| g.as_str())
        {
            call.query.insert("gid".into(), g.to_string());
        }
    }
    if let Ok(mut c) = inner.calls.lock() {
        c.push(call);
    }
    let delay = inner.delay.lock().map(|d| *d).unwrap_or_default();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if let Some(v) = take(&inner, slot::NEXT) {
        return (StatusCode::OK, json!({"dtm_result": v}).to_string()).into_response();
    }
    if let Some(v) = inner
        .sticky
        .lock()
        .ok()
        .and_then(|s| s.get(&route).cloned())
    {
        return result_response(&inner, &v);
    }
    let req: Value = serde_json::from_str(&body_s).unwrap_or(Value::Null);
    let field = |k: &str| {
        req.get(k)
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string()
    };
    let pick = |slot_name: &str, body_field: Option<&str>| -> String {
        take(&inner, slot_name)
            .filter(|s| !s.is_empty())
            .or_else(|| body_field.map(field).filter(|s| !s.is_empty()))
            .unwrap_or_else(|| "SUCCESS".into())
    };
    let old = |r: &str| -> Response {
        if r == "ERROR" {
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"error": "ERROR from user"}).to_string(),
            )
                .into_response()
        } else {
            (StatusCode::OK, json!({"dtm_result": r}).to_string()).into_response()
        }
    };
    match route.as_str() {
        "TransIn" | "TransInTcc" => {
            result_response(&inner, &pick(slot::TRANS_IN, Some("trans_in_result")))
        }
        "TransOut" | "TransOutTcc" | "TransOutTimeout" => {
            result_response(&inner, &pick(slot::TRANS_OUT, Some("trans_out_Result")))
        }
        "TransInConfirm" => result_response(&inner, &pick(slot::TRANS_IN_CONFIRM, None)),
        "TransOutConfirm" => result_response(&inner, &pick(slot::TRANS_OUT_CONFIRM, None)),
        "TransInRevert" => result_response(&inner, &pick(slot::TRANS_IN_REVERT, None)),
        "TransOutRevert" => result_response(&inner, &pick(slot::TRANS_OUT_REVERT, None)),
        "TransInOld" => old(&pick(slot::TRANS_IN, Some("trans_in_result"))),
        "TransOutOld" => old(&pick(slot::TRANS_OUT, Some("trans_out_Result"))),
        "TransInConfirmOld" => old(&pick(slot::TRANS_IN_CONFIRM, None)),
        "TransOutConfirmOld" => old(&pick(slot::TRANS_OUT_CONFIRM, None)),
        "TransInRevertOld" => old(&pick(slot::TRANS_IN_REVERT, None)),
        "TransOutRevertOld" => old(&pick(slot::TRANS_OUT_REVERT, None)),
        "QueryPrepared" => result_response(&inner, &pick(slot::QUERY_PREPARED, None)),
        "TransOutHeaderYes" => {
            if headers.contains_key("test_header") {
                result_response(&inner, &pick(slot::TRANS_OUT, None))
            } else {
                result_response(&inner, "ERROR")
            }
        }
        "TransOutHeaderNo" => {
            if headers.contains_key("test_header") {
                result_response(&inner, "ERROR")
            } else {
                result_response(&inner, "SUCCESS")
            }
        }
        "TransInRetry" => {
            let n = {
                let mut c = match inner.retry_counter.lock() {
                    Ok(c) => c,
                    Err(_) => return result_response(&inner, "ERROR"),
                };
                *c += 1;
                let n = *c;
                if n >= 4 {
                    *c = 0;
                }
                n
            };
            if n < 4 {
                result_response(&inner, "ERROR")
            } else {
                result_response(&inner, "SUCCESS")
            }
        }
        "AlertWebHook" => {
            if field("gid").contains("Error") {
                result_response(&inner, "ERROR")
            } else {
                result_response(&inner, "SUCCESS")
            }
        }
        "WorkflowResume" => result_response(&inner, &pick(slot::NEXT, None)),
        _ => (StatusCode::NOT_FOUND, format!("no busi route {route}")).into_response(),
    }
}
