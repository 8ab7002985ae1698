//! The HTTP API on the wire, over raw TCP: the hot calls the server's own HTTP/1.1 loop
//! answers (keep-alive, pipelining, a request in pieces, `Connection: close`) and the
//! requests it hands to hyper and the router on the same connection (other routes,
//! chunked bodies, `Expect: 100-continue`, HTTP/1.0, bodies over the limit), and a
//! shutdown with idle connections open. Against the backend of `DTM_TEST_STORE`.

use std::time::Duration;

use dtm_testkit::TestServer;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

type R = anyhow::Result<()>;

/// One response as read off the connection.
#[derive(Debug)]
struct Answer {
    code: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// The `message` of an error answer, or "".
    fn message(&self) -> String {
        self.json()["message"].as_str().unwrap_or("").to_string()
    }
}

/// A raw client connection that keeps what it read past the last response.
struct Conn {
    io: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn open(s: &TestServer) -> anyhow::Result<Conn> {
        Ok(Conn {
            io: TcpStream::connect(s.server.http_addr).await?,
            buf: Vec::new(),
        })
    }

    async fn send(&mut self, bytes: &[u8]) -> R {
        self.io.write_all(bytes).await?;
        Ok(())
    }

    async fn fill(&mut self) -> anyhow::Result<usize> {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(20), self.io.read(&mut chunk)).await??;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    /// The next response (content-length bodies only, as the API sends them).
    async fn answer(&mut self) -> anyhow::Result<Answer> {
        loop {
            let mut hs = [httparse::EMPTY_HEADER; 32];
            let mut resp = httparse::Response::new(&mut hs);
            if let httparse::Status::Complete(head) = resp.parse(&self.buf)? {
                let code = resp.code.unwrap_or(0);
                let headers: Vec<(String, String)> = resp
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_string(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect();
                let len: usize = headers
                    .iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
                    .and_then(|(_, v)| v.parse().ok())
                    .unwrap_or(0);
                while self.buf.len() < head + len {
                    anyhow::ensure!(self.fill().await? > 0, "connection closed in a body");
                }
                let body = self.buf[head..head + len].to_vec();
                self.buf.drain(..head + len);
                return Ok(Answer {
                    code,
                    headers,
                    body,
                });
            }
            anyhow::ensure!(
                self.fill().await? > 0,
                "connection closed before a response"
            );
        }
    }

    /// True when the server closed the connection (and sent nothing more).
    async fn closed(&mut self) -> anyhow::Result<bool> {
        Ok(self.buf.is_empty() && self.fill().await? == 0)
    }
}

fn post(path: &str, body: &str, extra: &str) -> Vec<u8> {
    format!(
        "POST /api/dtmsvr/{path} HTTP/1.1\r\nhost: dtm\r\ncontent-type: application/json\r\n{extra}content-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn get(path_and_query: &str) -> Vec<u8> {
    format!("GET /api/dtmsvr/{path_and_query} HTTP/1.1\r\nhost: dtm\r\n\r\n").into_bytes()
}

/// A msg that stays prepared: nothing is called until it is submitted.
fn prepared_msg(gid: &str) -> String {
    json!({
        "gid": gid,
        "trans_type": "msg",
        "steps": [{"action": "http://127.0.0.1:9/api/busi/TransIn"}],
        "payloads": ["{}"],
        "query_prepared": "http://127.0.0.1:9/api/busi/QueryPrepared",
    })
    .to_string()
}

#[tokio::test]
async fn hot_calls_keep_alive_pipeline_and_hand_over_on_one_connection() -> R {
    let s = TestServer::start().await?;
    let gid = |i: usize| format!("wire-{}-{i}", std::process::id());
    let mut c = Conn::open(&s).await?;

    // two prepares pipelined in one write: answered in order on the same connection
    let mut two = post("prepare", &prepared_msg(&gid(1)), "");
    two.extend(post("prepare", &prepared_msg(&gid(2)), ""));
    c.send(&two).await?;
    for _ in 0..2 {
        let a = c.answer().await?;
        assert_eq!(a.code, 200, "{a:?}");
        assert_eq!(a.body, br#"{"dtm_result":"SUCCESS"}"#);
        assert_eq!(
            a.header("content-type"),
            Some("application/json; charset=utf-8")
        );
        assert!(
            a.header("date").is_some_and(|d| d.ends_with(" GMT")),
            "{a:?}"
        );
        assert_eq!(a.header("connection"), None);
    }
    assert_eq!(s.status(&gid(1)).await?, "prepared");
    assert_eq!(s.status(&gid(2)).await?, "prepared");

    // a request that arrives in pieces: the head in two, then the body
    let whole = post("prepare", &prepared_msg(&gid(3)), "");
    let (a, rest) = whole.split_at(20);
    let (b, body) = rest.split_at(rest.len() - 10);
    for piece in [a, b, body] {
        c.send(piece).await?;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert_eq!(c.answer().await?.code, 200);
    assert_eq!(s.status(&gid(3)).await?, "prepared");

    // errors of a hot call: the handler's answers
    for (path, body, needle) in [
        ("prepare", "{not json", "not valid JSON"),
        ("submit", "", "empty"),
    ] {
        c.send(&post(path, body, "")).await?;
        let a = c.answer().await?;
        assert_eq!(a.code, 400, "{a:?}");
        assert!(a.message().contains(needle), "{a:?}");
    }
    // a query string on a hot path changes nothing
    c.send(&post("abort?from=wire", &prepared_msg(&gid(3)), ""))
        .await?;
    assert_eq!(c.answer().await?.code, 200);
    assert_eq!(s.status(&gid(3)).await?, "failed");

    // another route on the same connection: hyper and the router take it over, and go on
    // answering hot calls after it
    c.send(&get(&format!("query?gid={}", gid(1)))).await?;
    let a = c.answer().await?;
    assert_eq!(a.code, 200);
    assert_eq!(a.json()["transaction"]["status"], "prepared");
    let mut two = post("abort", &prepared_msg(&gid(1)), "");
    two.extend(get("nosuchroute"));
    c.send(&two).await?;
    assert_eq!(c.answer().await?.code, 200);
    assert_eq!(c.answer().await?.code, 404);
    assert_eq!(s.status(&gid(1)).await?, "failed");

    // every hot call was counted, as the router's middleware counts
    let m = s.metrics().await?;
    for line in [
        r#"dtm_server_process_total{type="http",api="prepare",status="ok"} 3"#,
        r#"dtm_server_process_total{type="http",api="prepare",status="fail"} 1"#,
        r#"dtm_server_process_total{type="http",api="submit",status="fail"} 1"#,
        r#"dtm_server_process_total{type="http",api="abort",status="ok"} 2"#,
    ] {
        assert!(m.lines().any(|l| l == line), "{line} not in\n{m}");
    }
    Ok(())
}

#[tokio::test]
async fn connection_close_is_honoured() -> R {
    let s = TestServer::start().await?;
    let gid = format!("wire-close-{}", std::process::id());
    let mut c = Conn::open(&s).await?;
    c.send(&post(
        "prepare",
        &prepared_msg(&gid),
        "connection: close\r\n",
    ))
    .await?;
    let a = c.answer().await?;
    assert_eq!(a.code, 200);
    assert_eq!(a.header("connection"), Some("close"));
    assert!(c.closed().await?, "the server kept the connection open");
    assert_eq!(s.status(&gid).await?, "prepared");
    Ok(())
}

#[tokio::test]
async fn framing_the_loop_leaves_to_hyper() -> R {
    let s = TestServer::start().await?;
    let gid = |i: usize| format!("wire-framing-{}-{i}", std::process::id());

    // a chunked body
    let mut c = Conn::open(&s).await?;
    let body = prepared_msg(&gid(1));
    let (a, b) = body.split_at(body.len() / 2);
    let chunked = format!(
        "POST /api/dtmsvr/prepare HTTP/1.1\r\nhost: dtm\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
        a.len(),
        b.len()
    );
    c.send(chunked.as_bytes()).await?;
    assert_eq!(c.answer().await?.code, 200);
    assert_eq!(s.status(&gid(1)).await?, "prepared");

    // Expect: 100-continue: the body is sent once the server asks for it
    let body = prepared_msg(&gid(2));
    let with_body = post("prepare", &body, "expect: 100-continue\r\n");
    c.send(&with_body[..with_body.len() - body.len()]).await?;
    let a = c.answer().await?;
    assert_eq!(a.code, 100, "{a:?}");
    c.send(body.as_bytes()).await?;
    assert_eq!(c.answer().await?.code, 200);
    assert_eq!(s.status(&gid(2)).await?, "prepared");

    // HTTP/1.0: answered, then closed (no keep-alive asked for)
    let mut c = Conn::open(&s).await?;
    let body = prepared_msg(&gid(3));
    let req = format!(
        "POST /api/dtmsvr/prepare HTTP/1.0\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    c.send(req.as_bytes()).await?;
    assert_eq!(c.answer().await?.code, 200);
    assert!(c.closed().await?, "an HTTP/1.0 connection stayed open");
    assert_eq!(s.status(&gid(3)).await?, "prepared");

    // a body over the limit (1 MiB in tests): 413 from the router once it has read past
    // the limit
    let (mut rd, mut wr) = TcpStream::connect(s.server.http_addr).await?.into_split();
    let writer = tokio::spawn(async move {
        let head =
            b"POST /api/dtmsvr/submit HTTP/1.1\r\nhost: dtm\r\ncontent-length: 2000000\r\n\r\n";
        let _ = wr.write_all(head).await;
        let _ = wr.write_all(&vec![b' '; 1_200_000]).await;
        wr
    });
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(20), rd.read(&mut chunk)).await??;
        anyhow::ensure!(n > 0, "closed before the 413");
        got.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&got).into_owned();
    assert!(text.starts_with("HTTP/1.1 413 "), "{text}");
    // the body follows the head; read on until it is there
    while !String::from_utf8_lossy(&got).contains("HttpMaxBodyBytes") {
        let n = tokio::time::timeout(Duration::from_secs(20), rd.read(&mut chunk)).await??;
        anyhow::ensure!(n > 0, "closed before the 413's message");
        got.extend_from_slice(&chunk[..n]);
    }
    writer.abort();

    // not HTTP at all: hyper's 400, and the connection is closed
    let mut c = Conn::open(&s).await?;
    c.send(b"hello there\r\n\r\n").await?;
    let a = c.answer().await?;
    assert_eq!(a.code, 400, "{a:?}");
    assert!(c.closed().await?);
    Ok(())
}

#[tokio::test]
async fn shutdown_closes_idle_connections_and_returns_in_its_grace() -> R {
    let s = TestServer::start().await?;
    let gid = format!("wire-stop-{}", std::process::id());
    // one idle connection after a hot call, one after a call hyper answered
    let mut hot = Conn::open(&s).await?;
    hot.send(&post("prepare", &prepared_msg(&gid), "")).await?;
    assert_eq!(hot.answer().await?.code, 200);
    let mut other = Conn::open(&s).await?;
    other.send(&get("version")).await?;
    assert_eq!(other.answer().await?.code, 200);
    // one stalled in a request head, one stalled in a body: neither holds the shutdown
    // longer than its grace
    let mut half_head = Conn::open(&s).await?;
    half_head
        .send(b"POST /api/dtmsvr/prepare HTTP/1.1\r\nhost: dtm\r\ncontent-le")
        .await?;
    let mut half_body = Conn::open(&s).await?;
    half_body
        .send(b"POST /api/dtmsvr/prepare HTTP/1.1\r\ncontent-length: 100\r\n\r\n{\"gid\":")
        .await?;
    tokio::time::sleep(Duration::from_millis(100)).await;

    s.shutdown_within(Duration::from_secs(1)).await?;
    assert!(
        hot.closed().await?,
        "the idle hot-path connection stayed open"
    );
    assert!(
        half_head.closed().await?,
        "the connection in a request head stayed open"
    );
    assert!(
        other.closed().await?,
        "the idle hyper connection stayed open"
    );
    Ok(())
}
