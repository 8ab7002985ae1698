//! The HTTP API under `/api/dtmsvr`, byte-compatible with dtm's envelope: 200 with
//! `{"dtm_result":"SUCCESS"}`, 409 FAILURE, 425 ONGOING, other errors `{"message":...}`.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, delete, get, post};
use chrono::DateTime;
use dtm_core::store::ScanQuery;
use dtm_core::{ApiError, Coordinator};
use dtm_proto::{RegisterBranchRequest, TransRequest};
use serde_json::{Value, json};

use crate::metrics::Metrics;

#[derive(Clone)]
pub struct AppState {
    pub co: Arc<Coordinator>,
    pub metrics: Arc<Metrics>,
    pub timeout_to_fail: i64,
}

type Q = Query<HashMap<String, String>>;

pub(crate) const JSON_CONTENT_TYPE: &str = "application/json; charset=utf-8";

/// What an API call answers: a status and a JSON body. The axum routes turn it into a
/// response (`IntoResponse`); the hot-path loop (`h1_server.rs`) writes it straight to the
/// connection.
pub struct Answer {
    pub status: StatusCode,
    pub body: Bytes,
}

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        (
            self.status,
            [(axum::http::header::CONTENT_TYPE, JSON_CONTENT_TYPE)],
            self.body,
        )
            .into_response()
    }
}

/// A JSON answer. The value is written with `serde_json::to_vec`, not `to_string`: the
/// `Display` route goes through `fmt::Write` a token at a time, which made a `query`
/// answer cost several times its encoding.
fn json_response(status: StatusCode, v: Value) -> Answer {
    json_answer(status, &v)
}

/// A JSON answer written straight from a serializable value, with no `Value` in between.
pub(crate) fn json_answer<T: serde::Serialize + ?Sized>(status: StatusCode, v: &T) -> Answer {
    match serde_json::to_vec(v) {
        Ok(b) => Answer {
            status,
            body: Bytes::from(b),
        },
        // The answers are plain data (strings, numbers, string-keyed maps) and always
        // encode; should one not, the client still gets valid JSON and a clear status.
        Err(e) => {
            tracing::error!("encoding a JSON answer failed: {e}");
            Answer {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                body: Bytes::from_static(
                    br#"{"dtm_result":"FAILURE","message":"the server could not encode its answer"}"#,
                ),
            }
        }
    }
}

fn success() -> Answer {
    Answer {
        status: StatusCode::OK,
        body: Bytes::from_static(br#"{"dtm_result":"SUCCESS"}"#),
    }
}

fn error_response(e: &ApiError) -> Answer {
    match e {
        ApiError::Failure(m) => json_response(
            StatusCode::CONFLICT,
            json!({"dtm_result": "FAILURE", "message": m}),
        ),
        ApiError::Ongoing(m) => json_response(
            StatusCode::TOO_EARLY,
            json!({"dtm_result": "ONGOING", "message": m}),
        ),
        ApiError::BadRequest(m) => json_response(StatusCode::BAD_REQUEST, json!({"message": m})),
        ApiError::NotFound(m) => json_response(StatusCode::NOT_FOUND, json!({"message": m})),
        ApiError::TooLarge(m) => {
            json_response(StatusCode::PAYLOAD_TOO_LARGE, json!({"message": m}))
        }
        ApiError::Unavailable(m) => {
            json_response(StatusCode::SERVICE_UNAVAILABLE, json!({"message": m}))
        }
        ApiError::Internal(m) => {
            json_response(StatusCode::INTERNAL_SERVER_ERROR, json!({"message": m}))
        }
    }
}

fn reply(r: Result<Answer, ApiError>) -> Answer {
    r.unwrap_or_else(|e| error_response(&e))
}

/// The request body, or why it cannot be used: too large, unreadable, or empty.
fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    let bytes = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge(format!(
                "request body too large: {e}; raise HttpMaxBodyBytes (HTTP_MAX_BODY_BYTES) if this is intended"
            ))
        } else {
            ApiError::BadRequest(format!("cannot read request body: {e}"))
        }
    })?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::BadRequest(
            "request body is empty: send a JSON object".into(),
        ));
    }
    Ok(bytes)
}

fn parse_json(bytes: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::BadRequest(format!("request body is not valid JSON: {e}")))
}

fn body_json(body: Result<Bytes, BytesRejection>) -> Result<Value, ApiError> {
    parse_json(&body_bytes(body)?)
}

/// A transaction request: decoded straight from the bytes when the body has the usual
/// shape, else through `serde_json::Value`, which also explains what is wrong.
fn trans_req(body: Result<Bytes, BytesRejection>) -> Result<TransRequest, ApiError> {
    let bytes = body_bytes(body)?;
    if let Some(req) = TransRequest::from_slice(&bytes) {
        return Ok(req);
    }
    TransRequest::from_json(&parse_json(&bytes)?).map_err(ApiError::BadRequest)
}

fn gid_of(body: Result<Bytes, BytesRejection>) -> Result<String, ApiError> {
    let v = body_json(body)?;
    let o = v
        .as_object()
        .ok_or_else(|| ApiError::BadRequest("request body must be a JSON object".into()))?;
    Ok(dtm_proto::escape(
        &dtm_proto::request::str_field(o, "gid").map_err(ApiError::BadRequest)?,
    ))
}

fn limit_of(q: &HashMap<String, String>) -> Result<usize, ApiError> {
    match q.get("limit").map(String::as_str) {
        None | Some("") => Ok(100),
        Some(s) => s
            .parse::<usize>()
            .ok()
            .filter(|n| *n > 0 && *n <= 10_000)
            .ok_or_else(|| {
                ApiError::BadRequest(format!("limit must be a number from 1 to 10000, got '{s}'"))
            }),
    }
}

fn ms_time(
    q: &HashMap<String, String>,
    k: &str,
) -> Result<Option<DateTime<chrono::Utc>>, ApiError> {
    match q.get(k).map(String::as_str) {
        None | Some("") => Ok(None),
        Some(s) => {
            let ms: i64 = s.parse().map_err(|_| {
                ApiError::BadRequest(format!("{k} must be epoch milliseconds, got '{s}'"))
            })?;
            // dtm truncates to seconds
            Ok(DateTime::from_timestamp(ms / 1000, 0))
        }
    }
}

async fn new_gid(State(s): State<AppState>) -> Answer {
    json_response(
        StatusCode::OK,
        json!({"gid": s.co.new_gid(), "dtm_result": "SUCCESS"}),
    )
}

async fn version() -> Answer {
    json_response(StatusCode::OK, json!({"version": crate::VERSION}))
}

async fn prepare(State(s): State<AppState>, body: Result<Bytes, BytesRejection>) -> Answer {
    reply(async { s.co.prepare(trans_req(body)?).await.map(|_| success()) }.await)
}

async fn submit(State(s): State<AppState>, body: Result<Bytes, BytesRejection>) -> Answer {
    reply(async { s.co.submit(trans_req(body)?).await.map(|_| success()) }.await)
}

async fn abort(State(s): State<AppState>, body: Result<Bytes, BytesRejection>) -> Answer {
    reply(async { s.co.abort(trans_req(body)?).await.map(|_| success()) }.await)
}

async fn register_branch(State(s): State<AppState>, body: Result<Bytes, BytesRejection>) -> Answer {
    reply(
        async {
            let req = RegisterBranchRequest::from_json(&body_json(body)?)
                .map_err(ApiError::BadRequest)?;
            s.co.register_branch(req).await.map(|_| success())
        }
        .await,
    )
}

async fn prepare_workflow(
    State(s): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Answer {
    reply(
        async {
            let r = s.co.prepare_workflow(trans_req(body)?).await?;
            Ok(json_response(
                StatusCode::OK,
                json!({"transaction": r.transaction, "progresses": r.branches}),
            ))
        }
        .await,
    )
}

/// The calls the hot-path loop (`h1_server.rs`) answers itself: POSTs whose answer depends
/// on the body alone, the ones every saga, msg and tcc transaction makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hot {
    Prepare,
    Submit,
    Abort,
    RegisterBranch,
    RegisterTccBranch,
    RegisterXaBranch,
}

impl Hot {
    const ALL: [Hot; 6] = [
        Hot::Prepare,
        Hot::Submit,
        Hot::Abort,
        Hot::RegisterBranch,
        Hot::RegisterTccBranch,
        Hot::RegisterXaBranch,
    ];

    /// Its route under `API`, as `router` registers it.
    fn route(self) -> &'static str {
        match self {
            Hot::Prepare => "/prepare",
            Hot::Submit => "/submit",
            Hot::Abort => "/abort",
            Hot::RegisterBranch => "/registerBranch",
            Hot::RegisterTccBranch => "/registerTccBranch",
            Hot::RegisterXaBranch => "/registerXaBranch",
        }
    }

    /// The call a request path (without its query) names, if it is one of these.
    pub fn from_path(path: &str) -> Option<Hot> {
        let route = path.strip_prefix(API)?;
        Hot::ALL.into_iter().find(|h| h.route() == route)
    }
}

/// Answer a hot call from its body (at most the configured body limit), through the same
/// handler the router uses, and count it as the router's middleware does.
pub async fn hot_call(s: &AppState, hot: Hot, body: Bytes) -> Answer {
    let st = State(s.clone());
    let a = match hot {
        Hot::Prepare => prepare(st, Ok(body)).await,
        Hot::Submit => submit(st, Ok(body)).await,
        Hot::Abort => abort(st, Ok(body)).await,
        Hot::RegisterBranch | Hot::RegisterTccBranch | Hot::RegisterXaBranch => {
            register_branch(st, Ok(body)).await
        }
    };
    // the label `count` gives a route: its last segment
    s.metrics
        .count_request(&hot.route()[1..], a.status.as_u16() < 400);
    a
}

async fn query(State(s): State<AppState>, Query(q): Q) -> Answer {
    reply(
        async {
            let gid = q.get("gid").cloned().unwrap_or_default();
            let r = s.co.query(&gid).await?;
            #[derive(serde::Serialize)]
            struct Answer<'a> {
                transaction: &'a Option<dtm_proto::TransGlobal>,
                branches: &'a [dtm_proto::Branch],
            }
            Ok(json_answer(
                StatusCode::OK,
                &Answer {
                    transaction: &r.transaction,
                    branches: &r.branches,
                },
            ))
        }
        .await,
    )
}

async fn all(State(s): State<AppState>, Query(q): Q) -> Answer {
    reply(
        async {
            let get = |k: &str| q.get(k).cloned().unwrap_or_default();
            let scan = ScanQuery {
                position: get("position"),
                limit: limit_of(&q)?,
                status: get("status"),
                trans_type: get("transType"),
                create_time_start: ms_time(&q, "createTimeStart")?,
                create_time_end: ms_time(&q, "createTimeEnd")?,
            };
            let (rows, next) = s.co.all(&get("gid"), scan).await?;
            Ok(json_response(
                StatusCode::OK,
                json!({"transactions": rows, "next_position": next}),
            ))
        }
        .await,
    )
}

async fn force_stop(State(s): State<AppState>, body: Result<Bytes, BytesRejection>) -> Answer {
    reply(async { s.co.force_stop(&gid_of(body)?).await.map(|_| success()) }.await)
}

async fn reset_next_cron_time(
    State(s): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Answer {
    reply(
        async {
            s.co.reset_next_cron_time(&gid_of(body)?)
                .await
                .map(|_| success())
        }
        .await,
    )
}

async fn reset_cron_time(State(s): State<AppState>, Query(q): Q) -> Answer {
    reply(
        async {
            let timeout = match q.get("timeout").map(String::as_str) {
                None | Some("") => 3 * s.timeout_to_fail,
                Some(t) => t.parse::<i64>().map_err(|_| {
                    ApiError::BadRequest(format!("timeout must be seconds, got '{t}'"))
                })?,
            };
            let (count, has_remaining) = s.co.reset_cron_time(timeout, limit_of(&q)?).await?;
            Ok(json_response(
                StatusCode::OK,
                json!({"has_remaining": has_remaining, "succeed_count": count}),
            ))
        }
        .await,
    )
}

async fn subscribe(State(s): State<AppState>, Query(q): Q) -> Answer {
    let get = |k: &str| q.get(k).cloned().unwrap_or_default();
    reply(
        s.co.subscribe(&get("topic"), &get("url"), &get("remark"))
            .await
            .map(|_| success()),
    )
}

async fn unsubscribe(State(s): State<AppState>, Query(q): Q) -> Answer {
    let get = |k: &str| q.get(k).cloned().unwrap_or_default();
    reply(
        s.co.unsubscribe(&get("topic"), &get("url"))
            .await
            .map(|_| success()),
    )
}

async fn delete_topic(State(s): State<AppState>, Path(name): Path<String>) -> Answer {
    reply(s.co.delete_topic(&name).await.map(|_| success()))
}

async fn scan_kv(State(s): State<AppState>, Query(q): Q) -> Answer {
    reply(
        async {
            let get = |k: &str| q.get(k).cloned().unwrap_or_default();
            let (kv, next) =
                s.co.scan_kv(&get("cat"), &get("position"), limit_of(&q)?)
                    .await?;
            Ok(json_response(
                StatusCode::OK,
                json!({"kv": kv, "next_position": next}),
            ))
        }
        .await,
    )
}

async fn query_kv(State(s): State<AppState>, Query(q): Q) -> Answer {
    reply(
        async {
            let get = |k: &str| q.get(k).cloned().unwrap_or_default();
            let kv = s.co.query_kv(&get("cat"), &get("key")).await?;
            Ok(json_response(StatusCode::OK, json!({"kv": kv})))
        }
        .await,
    )
}

async fn ping() -> Answer {
    json_response(StatusCode::OK, json!({"msg": "pong"}))
}

async fn metrics(State(s): State<AppState>) -> Response {
    (
        StatusCode::OK,
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(&s.co.stats),
    )
        .into_response()
}

async fn not_found(uri: axum::http::Uri) -> Answer {
    json_response(
        StatusCode::NOT_FOUND,
        json!({"message": format!("no route {}: the dtm API lives under /api/dtmsvr", uri.path())}),
    )
}

/// A method the route does not take (405; the `Allow` header, which axum adds, lists
/// the methods it takes).
async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> Answer {
    json_response(
        StatusCode::METHOD_NOT_ALLOWED,
        json!({"message": format!("{method} is not allowed on {}: send it with one of the methods in the Allow header", uri.path())}),
    )
}

async fn count(
    State(s): State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    // the route that matched, not the path sent, so that the label set stays bounded:
    // the last segment that is not a parameter (`/topic/{name}` -> `topic`); a request no
    // route matched counts as `other`. `MatchedPath` is an `Arc`: the clone copies nothing.
    let matched = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .cloned();
    let resp = next.run(req).await;
    let api = matched
        .as_ref()
        .and_then(|m| {
            m.as_str()
                .rsplit('/')
                .find(|seg| !seg.is_empty() && !seg.starts_with('{'))
        })
        .unwrap_or("other");
    s.metrics.count_request(api, resp.status().as_u16() < 400);
    resp
}

/// dtm's API lives under this prefix. Its routes are registered with the prefix written
/// out, not with `Router::nest`, which rebuilds every request's URI to strip it.
const API: &str = "/api/dtmsvr";

pub fn router(state: AppState, max_body: usize) -> Router {
    let api: [(&str, axum::routing::MethodRouter<AppState>); 19] = [
        ("/newGid", get(new_gid).post(new_gid)),
        ("/version", get(version)),
        (Hot::Prepare.route(), post(prepare)),
        (Hot::Submit.route(), post(submit)),
        (Hot::Abort.route(), post(abort)),
        (Hot::RegisterBranch.route(), post(register_branch)),
        (Hot::RegisterTccBranch.route(), post(register_branch)),
        (Hot::RegisterXaBranch.route(), post(register_branch)),
        ("/prepareWorkflow", post(prepare_workflow)),
        ("/query", get(query)),
        ("/all", get(all)),
        ("/forceStop", post(force_stop)),
        ("/resetNextCronTime", post(reset_next_cron_time)),
        ("/resetCronTime", get(reset_cron_time).post(reset_cron_time)),
        ("/subscribe", get(subscribe).post(subscribe)),
        ("/unsubscribe", get(unsubscribe).post(unsubscribe)),
        ("/topic/{name}", delete(delete_topic)),
        ("/scanKV", get(scan_kv)),
        ("/queryKV", get(query_kv)),
    ];
    let mut r = Router::new();
    for (path, method_router) in api {
        r = r.route(&format!("{API}{path}"), method_router);
    }
    r.route("/api/ping", any(ping))
        .route("/api/json-rpc", post(crate::jrpc::handle))
        .route("/api/metrics", get(metrics))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(state.clone(), count))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}
