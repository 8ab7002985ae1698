//! The JSON-RPC 2.0 API, `POST /api/json-rpc` on the HTTP port (dtm §3).
//!
//! Methods `newGid`, `prepare`, `submit`, `abort`, `registerBranch`; the params are the
//! same objects the HTTP API takes. The answer is always HTTP 200 with
//! `{"jsonrpc":"2.0","id":<echo>,"error":<null|{code,message}>,"result":<value|null>}`.
//!
//! Error codes as dtm: -32700 unreadable JSON, -32600 not a JSON-RPC 2.0 request (no id,
//! `jsonrpc` not "2.0"), -32601 unknown method, -32901 FAILURE, -32603 anything else
//! (including ONGOING, which dtm does not give a code of its own).
//!
//! Where dtm is stricter or odder, this adapter is lenient: a numeric `id` is accepted and
//! echoed (dtm answers -32700), malformed JSON is answered with HTTP 200 like every other
//! error (dtm: 400), and `result` is `null` on errors (dtm: `{}`).

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use dtm_core::ApiError;
use dtm_proto::{RegisterBranchRequest, TransRequest};
use serde_json::{Value, json};

use crate::api::AppState;

pub const CODE_PARSE: i64 = -32700;
pub const CODE_INVALID_REQUEST: i64 = -32600;
pub const CODE_METHOD_NOT_FOUND: i64 = -32601;
pub const CODE_INTERNAL: i64 = -32603;
/// dtm's `JrpcCodeFailure`.
pub const CODE_FAILURE: i64 = -32901;

const METHODS: &str = "newGid, prepare, submit, abort or registerBranch";

fn answer(id: Value, error: Option<(i64, String)>, result: Value) -> Response {
    let error = match error {
        Some((code, message)) => json!({"code": code, "message": message}),
        None => Value::Null,
    };
    let body = json!({"jsonrpc": "2.0", "id": id, "error": error, "result": result});
    crate::api::json_answer(StatusCode::OK, &body).into_response()
}

fn code_of(e: &ApiError) -> i64 {
    match e {
        ApiError::Failure(_) => CODE_FAILURE,
        _ => CODE_INTERNAL,
    }
}

async fn dispatch(s: &AppState, method: &str, params: &Value) -> Result<Value, ApiError> {
    let trans = || {
        TransRequest::from_json(params).map_err(|e| ApiError::BadRequest(format!("params: {e}")))
    };
    match method {
        "newGid" => Ok(json!({"gid": s.co.new_gid()})),
        "prepare" => s.co.prepare(trans()?).await.map(|_| Value::Null),
        "submit" => s.co.submit(trans()?).await.map(|_| Value::Null),
        "abort" => s.co.abort(trans()?).await.map(|_| Value::Null),
        "registerBranch" => {
            let req = RegisterBranchRequest::from_json(params)
                .map_err(|e| ApiError::BadRequest(format!("params: {e}")))?;
            s.co.register_branch(req).await.map(|_| Value::Null)
        }
        other => Err(ApiError::BadRequest(format!(
            "Method not found: '{other}'; use {METHODS}"
        ))),
    }
}

/// `POST /api/json-rpc`.
pub async fn handle(State(s): State<AppState>, body: Result<Bytes, BytesRejection>) -> Response {
    let bytes = match body {
        Ok(b) => b,
        Err(e) => {
            return answer(
                Value::Null,
                Some((
                    CODE_PARSE,
                    format!(
                        "Parse json error: cannot read the request body ({e}); \
                         raise HttpMaxBodyBytes if a large body is intended"
                    ),
                )),
                Value::Null,
            );
        }
    };
    let req: Value = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(e) => {
            return answer(
                Value::Null,
                Some((
                    CODE_PARSE,
                    format!(
                        "Parse json error: {e}; send {{\"jsonrpc\":\"2.0\",\"id\":\"1\",\"method\":\"newGid\",\"params\":{{}}}}"
                    ),
                )),
                Value::Null,
            );
        }
    };
    let Some(obj) = req.as_object() else {
        return answer(
            Value::Null,
            Some((
                CODE_INVALID_REQUEST,
                "Bad json request: send one JSON-RPC request object (batches are not supported)"
                    .into(),
            )),
            Value::Null,
        );
    };
    let id = obj.get("id").cloned().unwrap_or(Value::Null);
    let id_ok = match &id {
        Value::String(s) => !s.is_empty(),
        Value::Number(_) => true,
        _ => false,
    };
    if !id_ok {
        return answer(
            id,
            Some((
                CODE_INVALID_REQUEST,
                format!("Bad json request: {req}; 'id' must be a non-empty string (or a number)"),
            )),
            Value::Null,
        );
    }
    if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return answer(
            id,
            Some((
                CODE_INVALID_REQUEST,
                format!("Bad json request: {req}; 'jsonrpc' must be \"2.0\""),
            )),
            Value::Null,
        );
    }
    let method = obj.get("method").and_then(Value::as_str).unwrap_or("");
    if !matches!(
        method,
        "newGid" | "prepare" | "submit" | "abort" | "registerBranch"
    ) {
        return answer(
            id,
            Some((
                CODE_METHOD_NOT_FOUND,
                format!("Method not found: '{method}'; use {METHODS}"),
            )),
            Value::Null,
        );
    }
    let params = obj.get("params").cloned().unwrap_or(Value::Null);
    match dispatch(&s, method, &params).await {
        Ok(result) => answer(id, None, result),
        Err(e) => {
            tracing::debug!("json-rpc {method}: {e}");
            answer(id, Some((code_of(&e), e.to_string())), Value::Null)
        }
    }
}
