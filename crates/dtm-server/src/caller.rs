//! Branch calls over HTTP and JSON-RPC (pooled keep-alive connections).

use std::time::Duration;

use async_trait::async_trait;
use dtm_core::{BranchCall, BranchCaller};
use dtm_proto::{BranchOutcome, classify_http, protocol, trans_type};
use hyper::header::{HeaderName, HeaderValue};

use crate::grpc_caller::GrpcCaller;
use crate::h1;

/// Calls branches over HTTP and JSON-RPC, and hands gRPC branches to [`GrpcCaller`]
/// (transport selection of dtm §5.1).
///
/// Plain `http://` branch calls, the hot path of every transaction, go to the small
/// keep-alive client of [`h1`], which does the exchange in the calling task; reqwest's
/// per-request layers (URL re-parsing, redirect and timeout services) were about a third
/// of the server's CPU per saga, and hyper's pooled client a fifth (bench/README.md).
/// `https://` URLs, URLs with user info, redirects and the webhook use reqwest.
pub struct HttpCaller {
    client: reqwest::Client,
    plain: h1::Client,
    grpc: GrpcCaller,
}

/// What the plain path could not finish: the reqwest path takes over.
enum Plain {
    Done(BranchOutcome),
    /// The branch answered with a redirect to this URL (or the URL is one only reqwest
    /// parses); reqwest goes on from there.
    /// `keep_method`: 307/308 repeat the request as it was; 301/302/303 turn a POST
    /// into a GET without a body, as browsers, Go and reqwest do.
    Reqwest {
        url: String,
        keep_method: bool,
    },
}

impl HttpCaller {
    pub fn new() -> anyhow::Result<HttpCaller> {
        crate::install_crypto();
        let client = reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(256)
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            .build()?;
        Ok(HttpCaller {
            client,
            plain: h1::Client::new(),
            grpc: GrpcCaller::new(),
        })
    }
}

fn is_http(url: &str) -> bool {
    url.starts_with("http://") || url.starts_with("https://")
}

/// Percent-encode `s` as a query value (RFC 3986 unreserved characters kept) onto `out`.
fn encode_into(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => {
                out.push('%');
                out.push(HEX[usize::from(b >> 4)] as char);
                out.push(HEX[usize::from(b & 15)] as char);
            }
        }
    }
}

/// Add query parameters to a URL, keeping any it has (and its fragment last).
pub fn with_query(url: &str, params: &[(&str, &String)]) -> String {
    let (base, frag) = match url.split_once('#') {
        Some((b, f)) => (b, Some(f)),
        None => (url, None),
    };
    let extra: usize = params.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
    let mut out = String::with_capacity(url.len() + extra + 8);
    out.push_str(base);
    let mut sep = if base.contains('?') {
        if base.ends_with('?') || base.ends_with('&') {
            ""
        } else {
            "&"
        }
    } else {
        "?"
    };
    for (k, v) in params {
        out.push_str(sep);
        out.push_str(k);
        out.push('=');
        encode_into(&mut out, v);
        sep = "&";
    }
    if let Some(f) = frag {
        out.push('#');
        out.push_str(f);
    }
    out
}

/// The `method` query parameter of a JSON-RPC branch URL.
fn jrpc_method(url: &str) -> Option<String> {
    let q = url.split_once('?')?.1;
    q.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == "method").then(|| v.to_string())
    })
}

#[async_trait]
impl BranchCaller for HttpCaller {
    async fn call(&self, c: &BranchCall) -> BranchOutcome {
        if c.protocol != protocol::HTTP && !is_http(&c.url) {
            return self.grpc.call(c).await;
        }
        if c.protocol == protocol::JSON_RPC && c.url.contains("method") {
            return self.call_jrpc(c).await;
        }
        let mut post = !c.body.is_empty() || c.trans_type == trans_type::XA;
        let mut url = with_query(
            &c.url,
            &[
                ("gid", &c.gid),
                ("trans_type", &c.trans_type),
                ("branch_id", &c.branch_id),
                ("op", &c.op),
            ],
        );
        if url.starts_with("http://") {
            match self.call_plain(c, &url, post).await {
                Plain::Done(out) => return out,
                Plain::Reqwest {
                    url: to,
                    keep_method,
                } => {
                    url = to;
                    post &= keep_method;
                }
            }
        }
        let mut req = if post {
            self.client.post(&url).body(c.body.clone())
        } else {
            self.client.get(&url)
        };
        req = req
            .header("Content-Type", "application/json")
            .timeout(c.timeout);
        for (k, v) in &c.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        match req.send().await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let body = resp.text().await.unwrap_or_default();
                classify_http(status, &body)
            }
            Err(e) => BranchOutcome::Error(describe(&e)),
        }
    }

    async fn post_json(
        &self,
        url: &str,
        body: &serde_json::Value,
        timeout: Duration,
    ) -> Result<(), String> {
        let resp = self
            .client
            .post(url)
            .header("Content-Type", "application/json")
            .body(body.to_string())
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| describe(&e))?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(format!("HTTP {}", resp.status().as_u16()))
        }
    }
}

impl HttpCaller {
    async fn call_plain(&self, c: &BranchCall, url: &str, post: bool) -> Plain {
        // A URL hyper's strict parser refuses (a space, a non-ASCII host) goes to
        // reqwest, which encodes it as browsers and Go do.
        let Ok(uri) = url.parse::<hyper::Uri>() else {
            return Plain::Reqwest {
                url: url.to_string(),
                keep_method: true,
            };
        };
        // user info (`http://u:p@h/`) becomes basic auth in reqwest
        let Some(authority) = uri
            .authority()
            .map(|a| a.as_str())
            .filter(|a| !a.contains('@'))
        else {
            return Plain::Reqwest {
                url: url.to_string(),
                keep_method: true,
            };
        };
        let mut headers = Vec::with_capacity(c.headers.len());
        for (k, v) in &c.headers {
            if HeaderName::from_bytes(k.as_bytes()).is_err() || HeaderValue::from_str(v).is_err() {
                return Plain::Done(BranchOutcome::Error(format!(
                    "branch header {k:?} is not a valid HTTP header: fix branch_headers"
                )));
            }
            headers.push((k.as_str(), v.as_str()));
        }
        // origin form as parsed; only a URL without a path (`http://h?x`) needs the `/`
        let target: std::borrow::Cow<'_, str> = match uri.path_and_query() {
            Some(pq) if pq.as_str().starts_with('/') => pq.as_str().into(),
            _ => match uri.query() {
                Some(q) => format!("{}?{q}", uri.path()).into(),
                None => uri.path().to_string().into(),
            },
        };
        let req = h1::Request {
            authority,
            target: &target,
            post,
            body: &c.body,
            headers: &headers,
        };
        let exchange = async {
            let resp = self.plain.send(&req).await?;
            if (300..400).contains(&resp.status)
                && let Some(to) = resp
                    .location
                    .as_deref()
                    .and_then(|l| reqwest::Url::parse(url).ok()?.join(l).ok())
            {
                let keep_method = matches!(resp.status, 307 | 308);
                return Ok(Err((to.to_string(), keep_method)));
            }
            Ok::<_, String>(Ok((resp.status, resp.body)))
        };
        match tokio::time::timeout(c.timeout, exchange).await {
            Ok(Ok(Ok((status, body)))) => {
                Plain::Done(classify_http(status, &String::from_utf8_lossy(&body)))
            }
            Ok(Ok(Err((url, keep_method)))) => Plain::Reqwest { url, keep_method },
            Ok(Err(e)) => Plain::Done(BranchOutcome::Error(format!(
                "error sending request for url ({url}): {e}"
            ))),
            Err(_) => Plain::Done(BranchOutcome::Error(format!(
                "request to {url} timed out after {:?} (raise request_timeout or \
                 REQUEST_TIMEOUT if the branch is slow)",
                c.timeout
            ))),
        }
    }

    async fn call_jrpc(&self, c: &BranchCall) -> BranchOutcome {
        let Some(method) = jrpc_method(&c.url) else {
            return BranchOutcome::Error(format!("JSON-RPC URL {} has no method parameter", c.url));
        };
        // an empty body (msg back-check) or null payload gives params with the ids only
        let mut params = match serde_json::from_slice::<serde_json::Value>(&c.body) {
            Ok(serde_json::Value::Object(m)) => m,
            Ok(serde_json::Value::Null) => serde_json::Map::new(),
            _ if c.body.is_empty() => serde_json::Map::new(),
            _ => {
                return BranchOutcome::Error(format!(
                    "the payload of branch {} ({}) is not a JSON object, which a JSON-RPC call \
                     needs as params: give this step an object payload",
                    c.branch_id, c.op
                ));
            }
        };
        for (k, v) in [
            ("gid", &c.gid),
            ("trans_type", &c.trans_type),
            ("branch_id", &c.branch_id),
            ("op", &c.op),
        ] {
            params.insert(k.to_string(), serde_json::Value::String(v.clone()));
        }
        let body = serde_json::json!({
            "jsonrpc": "2.0",
            "method": method,
            "id": dtm_core::new_gid(),
            "params": params,
        });
        let mut req = self
            .client
            .post(&c.url)
            .header("Content-Type", "application/json")
            .body(body.to_string())
            .timeout(c.timeout);
        for (k, v) in &c.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let (status, text) = match req.send().await {
            Ok(resp) => {
                let s = resp.status().as_u16();
                (s, resp.text().await.unwrap_or_default())
            }
            Err(e) => return BranchOutcome::Error(describe(&e)),
        };
        let out = classify_http(status, &text);
        if !out.is_success() {
            return out;
        }
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        match v.get("error") {
            None | Some(serde_json::Value::Null) => BranchOutcome::Success,
            Some(e) => match e.get("code").and_then(|c| c.as_i64()) {
                Some(-32901) => BranchOutcome::Failure(e.to_string()),
                Some(-32902) => BranchOutcome::Ongoing(e.to_string()),
                _ => BranchOutcome::Error(format!("JSON-RPC error: {e}")),
            },
        }
    }
}

/// An error and its sources, joined with `: `.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

fn describe(e: &reqwest::Error) -> String {
    let mut s = chain(e);
    if e.is_timeout() {
        s.push_str(" (timed out; raise request_timeout or REQUEST_TIMEOUT if the branch is slow)");
    }
    s
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use axum::Router;
    use axum::extract::State;
    use axum::http::{HeaderMap, Method, StatusCode, Uri};
    use axum::response::IntoResponse;
    use axum::routing::any;
    use dtm_core::{BranchCall, BranchCaller};
    use dtm_proto::BranchOutcome;

    type Seen = Arc<Mutex<Vec<String>>>;

    /// Records `METHOD path?query|x-tenant|body` of every request.
    async fn busi(
        State(seen): State<Seen>,
        method: Method,
        uri: Uri,
        headers: HeaderMap,
        body: String,
    ) -> axum::response::Response {
        let q = uri.query().unwrap_or_default().to_string();
        let tenant = headers
            .get("x-tenant")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if let Ok(mut s) = seen.lock() {
            s.push(format!("{method} {}?{q}|{tenant}|{body}", uri.path()));
        }
        match uri.path() {
            "/moved" => (
                StatusCode::TEMPORARY_REDIRECT,
                [("location", format!("/ok?{q}"))],
            )
                .into_response(),
            "/ok" | "/a%20b" => (StatusCode::OK, r#"{"dtm_result":"SUCCESS"}"#).into_response(),
            "/fail" => (StatusCode::CONFLICT, "FAILURE").into_response(),
            "/slow" => {
                tokio::time::sleep(Duration::from_secs(5)).await;
                StatusCode::OK.into_response()
            }
            _ => StatusCode::NOT_FOUND.into_response(),
        }
    }

    fn call(url: String, body: &str) -> BranchCall {
        BranchCall {
            url,
            body: body.as_bytes().to_vec(),
            gid: "g 1".into(),
            trans_type: "saga".into(),
            branch_id: "01".into(),
            op: "action".into(),
            protocol: "http".into(),
            headers: BTreeMap::from([("x-tenant".to_string(), "t1".to_string())]),
            timeout: Duration::from_secs(3),
        }
    }

    /// Plain http:// branch calls: query parameters, headers and body arrive; 409 is
    /// FAILURE; a redirect is followed; a slow branch times out; a closed port is an
    /// error naming the URL.
    #[tokio::test]
    async fn plain_http_calls() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let seen: Seen = Arc::default();
        let app = Router::new().fallback(any(busi)).with_state(seen.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let caller = super::HttpCaller::new().unwrap_or_else(|e| panic!("{e}"));
        let base = format!("http://{addr}");
        let q = "gid=g%201&trans_type=saga&branch_id=01&op=action";
        let take = || std::mem::take(&mut *seen.lock().unwrap_or_else(|e| panic!("{e}")));

        let out = caller.call(&call(format!("{base}/ok"), r#"{"a":1}"#)).await;
        assert_eq!(out, BranchOutcome::Success);
        assert_eq!(take(), vec![format!(r#"POST /ok?{q}|t1|{{"a":1}}"#)]);

        // no body: a GET, as for a msg back-check
        let out = caller.call(&call(format!("{base}/ok?uid=7"), "")).await;
        assert_eq!(out, BranchOutcome::Success);
        assert_eq!(take(), vec![format!("GET /ok?uid=7&{q}|t1|")]);

        let out = caller.call(&call(format!("{base}/fail"), "{}")).await;
        assert!(matches!(out, BranchOutcome::Failure(_)), "{out:?}");
        take();

        let out = caller
            .call(&call(format!("{base}/moved"), r#"{"a":1}"#))
            .await;
        assert_eq!(out, BranchOutcome::Success);
        assert_eq!(
            take(),
            vec![
                format!(r#"POST /moved?{q}|t1|{{"a":1}}"#),
                format!(r#"POST /ok?{q}|t1|{{"a":1}}"#)
            ]
        );

        // no path: sent as `/`
        let out = caller.call(&call(format!("{base}?uid=7"), "")).await;
        assert!(matches!(out, BranchOutcome::Error(_)), "{out:?}");
        assert_eq!(take(), vec![format!("GET /?uid=7&{q}|t1|")]);

        // a space in the path: sent percent-encoded
        let out = caller.call(&call(format!("{base}/a b"), "")).await;
        assert_eq!(out, BranchOutcome::Success);
        assert_eq!(take(), vec![format!("GET /a%20b?{q}|t1|")]);

        let mut slow = call(format!("{base}/slow"), "{}");
        slow.timeout = Duration::from_millis(200);
        match caller.call(&slow).await {
            BranchOutcome::Error(e) => assert!(e.contains("timed out"), "{e}"),
            other => panic!("{other:?}"),
        }

        let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let gone = closed.local_addr().unwrap_or_else(|e| panic!("{e}"));
        drop(closed);
        match caller.call(&call(format!("http://{gone}/x"), "{}")).await {
            BranchOutcome::Error(e) => assert!(e.contains(&gone.to_string()), "{e}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn query_is_appended() {
        let g = "g 1".to_string();
        assert_eq!(
            super::with_query("http://h/a", &[("gid", &g)]),
            "http://h/a?gid=g%201"
        );
        assert_eq!(
            super::with_query("http://h/a?uid=1", &[("gid", &g)]),
            "http://h/a?uid=1&gid=g%201"
        );
        let odd = "a&b=c/é~".to_string();
        let op = "action".to_string();
        assert_eq!(
            super::with_query("http://h/a?#frag", &[("gid", &odd), ("op", &op)]),
            "http://h/a?gid=a%26b%3Dc%2F%C3%A9~&op=action#frag"
        );
    }

    #[test]
    fn jrpc_method_is_read_from_the_query() {
        assert_eq!(
            super::jrpc_method("http://h/api/json-rpc?method=TransIn").as_deref(),
            Some("TransIn")
        );
        assert_eq!(super::jrpc_method("http://h/x"), None);
    }
}
