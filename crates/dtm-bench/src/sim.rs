//! The branch simulator: trivial handlers that answer SUCCESS at once, unless an outage
//! is switched on (every route then answers 500, or 200 with ONGOING).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;

/// How the simulator answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Success = 0,
    /// HTTP 500: an error, retried with backoff by the server
    Error = 1,
    /// HTTP 200 with `ONGOING` in the body: retried at the same interval
    Ongoing = 2,
}

#[derive(Default)]
struct Inner {
    answer: AtomicU8,
    calls: AtomicU64,
    /// successful calls of the last step's action (`TransIn`): one per finished saga/msg
    last_step_ok: AtomicU64,
    /// distinct gids that reached the simulator while it was failing
    failed_gids: Mutex<HashSet<String>>,
}

#[derive(Clone)]
pub struct Sim {
    /// e.g. `http://127.0.0.1:PORT/api/busi_bench`
    pub base: String,
    inner: Arc<Inner>,
}

const OK_BODY: &str = r#"{"dtm_result":"SUCCESS"}"#;

impl Sim {
    /// Start on a free loopback port, inside the current runtime.
    pub async fn start() -> anyhow::Result<Sim> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr: SocketAddr = listener.local_addr()?;
        let inner = Arc::new(Inner::default());
        let app = Router::new()
            .route("/api/busi_bench/{route}", any(handle))
            .with_state(Arc::clone(&inner));
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                eprintln!("dtm-bench: branch simulator stopped: {e}");
            }
        });
        Ok(Sim {
            base: format!("http://{addr}/api/busi_bench"),
            inner,
        })
    }

    pub fn set_answer(&self, a: Answer) {
        self.inner.answer.store(a as u8, Ordering::SeqCst);
    }

    pub fn calls(&self) -> u64 {
        self.inner.calls.load(Ordering::Relaxed)
    }

    pub fn last_step_ok(&self) -> u64 {
        self.inner.last_step_ok.load(Ordering::Relaxed)
    }

    pub fn failed_gids(&self) -> usize {
        self.inner.failed_gids.lock().map(|s| s.len()).unwrap_or(0)
    }

    pub fn clear_failed_gids(&self) {
        if let Ok(mut s) = self.inner.failed_gids.lock() {
            s.clear();
            s.shrink_to_fit();
        }
    }
}

fn gid_of(q: &str) -> Option<&str> {
    q.split('&').find_map(|kv| kv.strip_prefix("gid="))
}

async fn handle(
    State(inner): State<Arc<Inner>>,
    Path(route): Path<String>,
    RawQuery(q): RawQuery,
    _body: Bytes,
) -> Response {
    inner.calls.fetch_add(1, Ordering::Relaxed);
    let answer = inner.answer.load(Ordering::Relaxed);
    if answer == Answer::Success as u8 {
        if route == "TransIn" {
            inner.last_step_ok.fetch_add(1, Ordering::Relaxed);
        }
        return ([(header::CONTENT_TYPE, "application/json")], OK_BODY).into_response();
    }
    if let Some(g) = q.as_deref().and_then(gid_of)
        && let Ok(mut s) = inner.failed_gids.lock()
    {
        s.insert(g.to_string());
    }
    if answer == Answer::Ongoing as u8 {
        (
            [(header::CONTENT_TYPE, "application/json")],
            r#"{"dtm_result":"ONGOING"}"#,
        )
            .into_response()
    } else {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "application/json")],
            r#"{"error":"simulated outage"}"#,
        )
            .into_response()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn gid_from_query() {
        assert_eq!(
            super::gid_of("gid=abc&trans_type=saga&op=action"),
            Some("abc")
        );
        assert_eq!(super::gid_of("op=action&gid=x1"), Some("x1"));
        assert_eq!(super::gid_of("op=action"), None);
    }
}
