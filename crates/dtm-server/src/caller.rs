//! Branch calls over HTTP and JSON-RPC (pooled keep-alive connections).

use std::time::Duration;

use async_trait::async_trait;
use dtm_core::{BranchCall, BranchCaller};
use dtm_proto::{BranchOutcome, classify_http, protocol, trans_type};

use crate::grpc_caller::GrpcCaller;

/// Calls branches over HTTP and JSON-RPC, and hands gRPC branches to [`GrpcCaller`]
/// (transport selection of dtm §5.1).
pub struct HttpCaller {
    client: reqwest::Client,
    grpc: GrpcCaller,
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
            grpc: GrpcCaller::new(),
        })
    }
}

fn is_http(url: &str) -> bool {
    url.starts_with("http://") || url.starts_with("https://")
}

fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Add query parameters to a URL, keeping any it has (and its fragment last).
pub fn with_query(url: &str, params: &[(&str, &String)]) -> String {
    let (base, frag) = match url.split_once('#') {
        Some((b, f)) => (b, Some(f)),
        None => (url, None),
    };
    let mut out = base.to_string();
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
        out.push_str(&encode(v));
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
        let post = !c.body.is_empty() || c.trans_type == trans_type::XA;
        let url = with_query(
            &c.url,
            &[
                ("gid", &c.gid),
                ("trans_type", &c.trans_type),
                ("branch_id", &c.branch_id),
                ("op", &c.op),
            ],
        );
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

fn describe(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    if e.is_timeout() {
        s.push_str(" (timed out; raise request_timeout or REQUEST_TIMEOUT if the branch is slow)");
    }
    s
}

#[cfg(test)]
mod tests {
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
