//! A small HTTP/1.1 client for plain `http://` branch calls.
//!
//! Every saga makes two branch calls, so their client is on the hot path. hyper's pooled
//! client runs each connection in a task of its own and hands every request to it and
//! the response back over channels (two task wake-ups per call), and builds a header map
//! and a `Request` per call. This client does the exchange in the calling task: it takes
//! an idle keep-alive connection (or opens one), writes the request in one `write`,
//! reads and parses the response with `httparse`, and puts the connection back.
//!
//! What it handles, as HTTP/1.1 asks of a client: `Content-Length`, chunked and
//! read-until-close bodies; interim `1xx` responses; `Connection: close` and HTTP/1.0
//! peers (the connection is then not reused); idle connections the peer closed (checked
//! before reuse; a reused connection that closes before the first byte of a response is
//! retried once on a new one, as Go's transport and hyper do for a connection the
//! server closed while idle). URLs with user info, and everything that is not plain
//! `http://`, stay with reqwest (see `caller.rs`).

use std::collections::HashMap;
use std::io::{ErrorKind, Write as _};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Idle connections kept per `host:port`.
const MAX_IDLE_PER_HOST: usize = 256;
/// An idle connection older than this is closed instead of reused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How often idle connections of every host are swept for age.
const SWEEP_EVERY: Duration = Duration::from_secs(30);
/// The status line and headers of a response may not be longer than this.
const MAX_HEAD: usize = 64 * 1024;
/// A branch's response body may not be longer than this.
const MAX_BODY: usize = 16 << 20;
const MAX_HEADERS: usize = 64;
/// Headers that frame the message or manage the connection: this client writes them
/// itself, so a branch's own headers may not set them.
const RESERVED: &[&str] = &[
    "connection",
    "content-length",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// One request: `authority` is `host[:port]` as the URL gives it, `target` the path and
/// query (origin form).
pub struct Request<'a> {
    pub authority: &'a str,
    pub target: &'a str,
    pub post: bool,
    pub body: &'a [u8],
    pub headers: &'a [(&'a str, &'a str)],
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    /// The `Location` header of a `3xx` response.
    pub location: Option<String>,
    pub body: Vec<u8>,
}

struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    idle_since: Instant,
}

struct Idle {
    hosts: HashMap<String, Vec<Conn>>,
    last_sweep: Instant,
}

/// Keep-alive connections by `host:port`.
pub struct Client {
    idle: Mutex<Idle>,
}

/// How an exchange failed.
enum Fail {
    /// The connection was closed (or reset) before any byte of a response arrived: on a
    /// reused connection, the peer had closed it while it was idle.
    Closed(String),
    Other(String),
}

impl Default for Client {
    fn default() -> Self {
        Client::new()
    }
}

impl Client {
    pub fn new() -> Client {
        Client {
            idle: Mutex::new(Idle {
                hosts: HashMap::new(),
                last_sweep: Instant::now(),
            }),
        }
    }

    /// Send `req` and read the whole response. The error says what failed.
    pub async fn send(&self, req: &Request<'_>) -> Result<Response, String> {
        let wire = encode(req);
        if let Some(conn) = self.checkout(req.authority) {
            match self.exchange_on(conn, req.authority, &wire).await {
                // most likely the branch closed the connection while it was idle: the
                // request goes out once more on a new one (branches are idempotent
                // anyway; the coordinator calls them again after any error)
                Err(Fail::Closed(_)) => {}
                Err(Fail::Other(e)) => return Err(e),
                Ok(resp) => return Ok(resp),
            }
        }
        let addr = if has_port(req.authority) {
            req.authority.to_string()
        } else {
            format!("{}:80", req.authority)
        };
        let stream = TcpStream::connect(addr.as_str())
            .await
            .map_err(|e| format!("tcp connect to {addr}: {e}"))?;
        // a failure here only costs latency (Nagle): the exchange still works
        let _ = stream.set_nodelay(true);
        let conn = Conn {
            stream,
            buf: Vec::with_capacity(4096),
            idle_since: Instant::now(),
        };
        self.exchange_on(conn, req.authority, &wire)
            .await
            .map_err(|(Fail::Closed(e) | Fail::Other(e))| e)
    }

    /// One exchange on `conn`, which goes back to the idle list when it can be reused.
    async fn exchange_on(
        &self,
        mut conn: Conn,
        authority: &str,
        wire: &[u8],
    ) -> Result<Response, Fail> {
        let (resp, reuse) = exchange(&mut conn, wire).await?;
        if reuse {
            self.checkin(authority, conn);
        }
        Ok(resp)
    }

    /// An idle connection to `authority` that is still open, if there is one.
    fn checkout(&self, authority: &str) -> Option<Conn> {
        loop {
            let conn = {
                let mut idle = self.idle.lock().ok()?;
                idle.hosts.get_mut(authority)?.pop()?
            };
            if conn.idle_since.elapsed() > IDLE_TIMEOUT {
                continue;
            }
            // An idle connection has nothing to read: readable means the peer closed it
            // (or sent bytes nobody asked for), so it is dropped.
            let mut probe = [0u8; 1];
            match conn.stream.try_read(&mut probe) {
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Some(conn),
                _ => continue,
            }
        }
    }

    fn checkin(&self, authority: &str, mut conn: Conn) {
        let now = Instant::now();
        conn.idle_since = now;
        conn.buf.clear();
        // a large answer's buffer is not kept for the connection's next small ones
        if conn.buf.capacity() > 64 * 1024 {
            conn.buf = Vec::with_capacity(4096);
        }
        let Ok(mut idle) = self.idle.lock() else {
            return;
        };
        if now.duration_since(idle.last_sweep) > SWEEP_EVERY {
            idle.last_sweep = now;
            idle.hosts.retain(|_, conns| {
                conns.retain(|c| now.duration_since(c.idle_since) <= IDLE_TIMEOUT);
                !conns.is_empty()
            });
        }
        match idle.hosts.get_mut(authority) {
            Some(conns) if conns.len() < MAX_IDLE_PER_HOST => conns.push(conn),
            Some(_) => {}
            None => {
                idle.hosts.insert(authority.to_string(), vec![conn]);
            }
        }
    }
}

fn has_port(authority: &str) -> bool {
    match authority.rfind(':') {
        // `[::1]` has colons but no port; `[::1]:8080` has one after the bracket
        Some(i) => !authority[i..].contains(']'),
        None => false,
    }
}

fn encode(req: &Request<'_>) -> Vec<u8> {
    let extra: usize = req.headers.iter().map(|(k, v)| k.len() + v.len() + 4).sum();
    let mut w = Vec::with_capacity(112 + req.target.len() + extra + req.body.len());
    w.extend_from_slice(if req.post { b"POST " } else { b"GET " });
    w.extend_from_slice(req.target.as_bytes());
    w.extend_from_slice(b" HTTP/1.1\r\n");
    let has = |name: &str| {
        req.headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case(name))
    };
    if !has("host") {
        w.extend_from_slice(b"Host: ");
        w.extend_from_slice(req.authority.as_bytes());
        w.extend_from_slice(b"\r\n");
    }
    if !has("content-type") {
        w.extend_from_slice(b"Content-Type: application/json\r\n");
    }
    for (k, v) in req.headers {
        if RESERVED.iter().any(|r| k.eq_ignore_ascii_case(r)) {
            continue;
        }
        w.extend_from_slice(k.as_bytes());
        w.extend_from_slice(b": ");
        w.extend_from_slice(v.as_bytes());
        w.extend_from_slice(b"\r\n");
    }
    if req.post {
        w.extend_from_slice(b"Content-Length: ");
        // writing to a Vec cannot fail
        let _ = write!(w, "{}", req.body.len());
        w.extend_from_slice(b"\r\n");
    }
    w.extend_from_slice(b"\r\n");
    if req.post {
        w.extend_from_slice(req.body);
    }
    w
}

/// What the head of a response says about its body and the connection.
struct Head {
    len: usize,
    status: u16,
    location: Option<String>,
    framing: Framing,
    reuse: bool,
}

enum Framing {
    Empty,
    Length(usize),
    Chunked,
    UntilClose,
}

/// Parse a response head at the start of `buf`: `None` when it is not complete yet.
fn parse_head(buf: &[u8]) -> Result<Option<Head>, String> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Err(format!(
                "the branch's response head is longer than {MAX_HEAD} bytes"
            ));
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("the branch sent an invalid HTTP response: {e}")),
    };
    let status = resp.code.unwrap_or(0);
    let http11 = resp.version == Some(1);
    let (mut length, mut chunked, mut coded) = (None::<usize>, false, false);
    let (mut close, mut keep_alive, mut location) = (false, false, None);
    for h in resp.headers.iter() {
        let v = || String::from_utf8_lossy(h.value);
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = v().trim().parse::<usize>().map_err(|_| {
                format!(
                    "the branch sent an invalid Content-Length: {:?}",
                    v().as_ref()
                )
            })?;
            if length.is_some_and(|l| l != n) {
                return Err("the branch sent two different Content-Length headers".into());
            }
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            coded = true;
            chunked = v()
                .rsplit(',')
                .next()
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
        } else if h.name.eq_ignore_ascii_case("connection") {
            for t in v().split(',') {
                let t = t.trim();
                close |= t.eq_ignore_ascii_case("close");
                keep_alive |= t.eq_ignore_ascii_case("keep-alive");
            }
        } else if h.name.eq_ignore_ascii_case("location") && (300..400).contains(&status) {
            location = Some(v().into_owned());
        }
    }
    let framing = if (100..200).contains(&status) || status == 204 || status == 304 {
        Framing::Empty
    } else if coded {
        // Transfer-Encoding overrides Content-Length (RFC 9112 §6.3)
        if chunked {
            Framing::Chunked
        } else {
            Framing::UntilClose
        }
    } else if let Some(n) = length {
        if n > MAX_BODY {
            return Err(format!(
                "the branch's response body is {n} bytes, more than the {MAX_BODY} accepted"
            ));
        }
        Framing::Length(n)
    } else {
        Framing::UntilClose
    };
    let reuse = !close
        && (http11 || keep_alive)
        && !(coded && length.is_some())
        && !matches!(framing, Framing::UntilClose);
    Ok(Some(Head {
        len,
        status,
        location,
        framing,
        reuse,
    }))
}

/// Decode the complete chunks of a chunked body from `buf[*pos..]` into `body`: `Some(end)`
/// once the last chunk and the trailers are in, `None` when more bytes are needed.
fn decode_chunks(buf: &[u8], pos: &mut usize, body: &mut Vec<u8>) -> Result<Option<usize>, String> {
    loop {
        let rest = &buf[*pos..];
        let Some(eol) = find_crlf(rest) else {
            if rest.len() > 1024 {
                return Err("the branch sent a chunk size line longer than 1024 bytes".into());
            }
            return Ok(None);
        };
        let line = String::from_utf8_lossy(&rest[..eol]);
        let digits = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(digits, 16)
            .map_err(|_| format!("the branch sent an invalid chunk size: {digits:?}"))?;
        let start = *pos + eol + 2;
        if size == 0 {
            // trailer fields up to an empty line; they are not used
            let mut t = start;
            loop {
                let Some(e) = find_crlf(&buf[t..]) else {
                    if buf.len() - t > MAX_HEAD {
                        return Err("the branch sent trailers longer than 64 KiB".into());
                    }
                    return Ok(None);
                };
                t += e + 2;
                if e == 0 {
                    return Ok(Some(t));
                }
            }
        }
        if size > MAX_BODY || body.len() + size > MAX_BODY {
            return Err(format!(
                "the branch's response body is more than the {MAX_BODY} bytes accepted"
            ));
        }
        if buf.len() < start + size + 2 {
            return Ok(None);
        }
        if &buf[start + size..start + size + 2] != b"\r\n" {
            return Err("the branch sent a chunk that does not end with CRLF".into());
        }
        body.extend_from_slice(&buf[start..start + size]);
        *pos = start + size + 2;
    }
}

fn find_crlf(b: &[u8]) -> Option<usize> {
    b.windows(2).position(|w| w == b"\r\n")
}

/// Read more bytes into `conn.buf`: `false` at end of stream.
async fn fill(conn: &mut Conn) -> Result<bool, std::io::Error> {
    if conn.buf.capacity() - conn.buf.len() < 1024 {
        conn.buf.reserve(4096);
    }
    Ok(conn.stream.read_buf(&mut conn.buf).await? > 0)
}

/// Write the request, read the response; `true` with it when the connection can be
/// reused.
async fn exchange(conn: &mut Conn, wire: &[u8]) -> Result<(Response, bool), Fail> {
    conn.buf.clear();
    if let Err(e) = conn.stream.write_all(wire).await {
        return Err(Fail::Closed(format!("sending the request: {e}")));
    }
    let closed = |e: Option<std::io::Error>| {
        let why = e.map_or_else(|| "it closed".to_string(), |e| e.to_string());
        Fail::Closed(format!(
            "the connection closed before a response arrived ({why})"
        ))
    };
    // the head, after any interim 1xx responses
    let head = loop {
        match parse_head(&conn.buf).map_err(Fail::Other)? {
            Some(h) if (100..200).contains(&h.status) && h.status != 101 => {
                conn.buf.drain(..h.len);
                continue;
            }
            Some(h) if h.status == 101 => {
                return Err(Fail::Other(
                    "the branch answered 101 Switching Protocols to a plain request".into(),
                ));
            }
            Some(h) => break h,
            None => {}
        }
        let empty = conn.buf.is_empty();
        match fill(conn).await {
            Ok(true) => {}
            Ok(false) if empty => return Err(closed(None)),
            Err(e) if empty && is_reset(&e) => return Err(closed(Some(e))),
            Ok(false) => {
                return Err(Fail::Other(
                    "the connection closed in the middle of the response head".into(),
                ));
            }
            Err(e) => return Err(Fail::Other(format!("reading the response: {e}"))),
        }
    };
    let cut = |e: Result<bool, std::io::Error>| match e {
        Ok(true) => Ok(()),
        Ok(false) => Err(Fail::Other(
            "the connection closed in the middle of the response body".into(),
        )),
        Err(e) => Err(Fail::Other(format!("reading the response body: {e}"))),
    };
    let (body, end) = match head.framing {
        Framing::Empty => (Vec::new(), head.len),
        Framing::Length(n) => {
            let end = head.len + n;
            while conn.buf.len() < end {
                cut(fill(conn).await)?;
            }
            (conn.buf[head.len..end].to_vec(), end)
        }
        Framing::Chunked => {
            let mut pos = head.len;
            let mut body = Vec::new();
            loop {
                if let Some(end) =
                    decode_chunks(&conn.buf, &mut pos, &mut body).map_err(Fail::Other)?
                {
                    break (body, end);
                }
                cut(fill(conn).await)?;
            }
        }
        Framing::UntilClose => {
            loop {
                if conn.buf.len() - head.len > MAX_BODY {
                    return Err(Fail::Other(format!(
                        "the branch's response body is more than the {MAX_BODY} bytes accepted"
                    )));
                }
                match fill(conn).await {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(e) => return Err(Fail::Other(format!("reading the response body: {e}"))),
                }
            }
            (conn.buf[head.len..].to_vec(), conn.buf.len())
        }
    };
    // bytes after the response that nobody asked for: the connection is not trusted
    let reuse = head.reuse && end == conn.buf.len();
    Ok((
        Response {
            status: head.status,
            location: head.location,
            body,
        },
        reuse,
    ))
}

fn is_reset(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A server that answers each connection's requests with the scripted raw
    /// responses (one per request read), then closes; it records the requests.
    async fn raw_server(
        script: Vec<Vec<&'static [u8]>>,
    ) -> (String, tokio::task::JoinHandle<Vec<String>>) {
        let l = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = l.local_addr().unwrap_or_else(|e| panic!("{e}")).to_string();
        let h = tokio::spawn(async move {
            let mut seen = Vec::new();
            for answers in script {
                let (mut s, _) = l.accept().await.unwrap_or_else(|e| panic!("{e}"));
                for a in answers {
                    let mut got = Vec::new();
                    // read one request: head, then Content-Length bytes
                    loop {
                        let mut b = [0u8; 4096];
                        let n = s.read(&mut b).await.unwrap_or(0);
                        if n == 0 {
                            break;
                        }
                        got.extend_from_slice(&b[..n]);
                        let text = String::from_utf8_lossy(&got).to_string();
                        if let Some(i) = text.find("\r\n\r\n") {
                            let len = text
                                .lines()
                                .find_map(|l| l.strip_prefix("Content-Length: "))
                                .and_then(|n| n.trim().parse::<usize>().ok())
                                .unwrap_or(0);
                            if got.len() >= i + 4 + len {
                                break;
                            }
                        }
                    }
                    seen.push(String::from_utf8_lossy(&got).to_string());
                    // an empty answer: close without answering
                    if a.is_empty() || s.write_all(a).await.is_err() {
                        break;
                    }
                }
            }
            seen
        });
        (addr, h)
    }

    fn req<'a>(
        authority: &'a str,
        body: &'a [u8],
        headers: &'a [(&'a str, &'a str)],
    ) -> Request<'a> {
        Request {
            authority,
            target: "/b?gid=g1&op=action",
            post: true,
            body,
            headers,
        }
    }

    #[tokio::test]
    async fn frames_requests_and_reads_every_body_kind() {
        let (addr, srv) = raw_server(vec![vec![
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=1\r\nabc\r\n2\r\nde\r\n0\r\nX-T: 1\r\n\r\n",
            b"HTTP/1.1 409 Conflict\r\ncontent-length: 7\r\n\r\nFAILURE",
            b"HTTP/1.1 307 Temporary Redirect\r\nLocation: /c\r\nContent-Length: 0\r\n\r\n",
        ]])
        .await;
        let c = Client::new();
        let hs = [
            ("X-Tenant", "t1"),
            ("Content-Length", "99"),
            ("connection", "close"),
        ];
        let r = c.send(&req(&addr, b"{\"a\":1}", &hs)).await;
        let r = r.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((r.status, r.body.as_slice()), (200, &b"hello"[..]));
        let r = c
            .send(&req(&addr, b"{}", &[]))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((r.status, r.body.as_slice()), (200, &b"abcde"[..]));
        let r = c
            .send(&req(&addr, b"{}", &[]))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((r.status, r.body.as_slice()), (409, &b"FAILURE"[..]));
        let get = Request {
            post: false,
            body: b"",
            ..req(&addr, b"", &[])
        };
        let r = c.send(&get).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((r.status, r.location.as_deref()), (307, Some("/c")));
        let seen = srv.await.unwrap_or_else(|e| panic!("{e}"));
        // all four on one connection (the script has one), framed by this client
        assert_eq!(seen.len(), 4);
        assert_eq!(
            seen[0],
            format!(
                "POST /b?gid=g1&op=action HTTP/1.1\r\nHost: {addr}\r\nContent-Type: \
                 application/json\r\nX-Tenant: t1\r\nContent-Length: 7\r\n\r\n{{\"a\":1}}"
            )
        );
        assert_eq!(
            seen[3],
            format!(
                "GET /b?gid=g1&op=action HTTP/1.1\r\nHost: {addr}\r\nContent-Type: \
                 application/json\r\n\r\n"
            )
        );
    }

    #[tokio::test]
    async fn connection_close_http10_and_stale_connections_open_new_ones() {
        let (addr, srv) = raw_server(vec![
            // answers, then closes: the next call must not reuse it
            vec![b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"],
            // HTTP/1.0 without keep-alive, body until close
            vec![b"HTTP/1.0 200 OK\r\n\r\nuntil-close"],
            // keep-alive; the server then closes the idle connection
            vec![b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n1"],
            vec![b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n2"],
        ])
        .await;
        let c = Client::new();
        for want in [&b"ok"[..], b"until-close", b"1", b"2"] {
            let r = c.send(&req(&addr, b"{}", &[])).await;
            assert_eq!(r.unwrap_or_else(|e| panic!("{e}")).body, want);
            // let the server's close reach this side before the next checkout
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(srv.await.unwrap_or_else(|e| panic!("{e}")).len(), 4);
    }

    /// A reused connection the peer closes after reading the request, before any byte
    /// of a response: the request is sent again on a new connection.
    #[tokio::test]
    async fn a_reused_connection_closed_before_answering_is_retried_once() {
        let (addr, srv) = raw_server(vec![
            vec![b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n1", b""],
            vec![b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n2"],
        ])
        .await;
        let c = Client::new();
        for want in [&b"1"[..], b"2"] {
            let r = c.send(&req(&addr, b"{}", &[])).await;
            assert_eq!(r.unwrap_or_else(|e| panic!("{e}")).body, want);
        }
        let seen = srv.await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert_eq!(seen[1], seen[2]);
    }

    #[tokio::test]
    async fn bad_responses_are_errors_that_say_what_was_wrong() {
        let cases: [(&'static [u8], &str); 5] = [
            (b"NOT HTTP\r\n\r\n", "invalid HTTP response"),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
                "invalid Content-Length",
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
                "middle of the response body",
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                "invalid chunk size",
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n",
                "more than the",
            ),
        ];
        for (answer, want) in cases {
            let (addr, srv) = raw_server(vec![vec![answer]]).await;
            let c = Client::new();
            match c.send(&req(&addr, b"{}", &[])).await {
                Err(e) => assert!(e.contains(want), "{want}: {e}"),
                Ok(r) => panic!("{want}: {r:?}"),
            }
            drop(srv);
        }
        // a server that closes without answering, on a new connection: an error
        let (addr, srv) = raw_server(vec![vec![]]).await;
        match Client::new().send(&req(&addr, b"{}", &[])).await {
            Err(e) => assert!(e.contains("closed before a response"), "{e}"),
            Ok(r) => panic!("{r:?}"),
        }
        drop(srv);
    }

    /// Random answers, from well-formed to garbage, cut at random points: every one
    /// ends in a response or an error (no panic, no hang), and a response is the one
    /// the answer framed.
    #[tokio::test]
    async fn random_answers_end_in_a_response_or_an_error() {
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let heads: [&[u8]; 4] = [
            b"HTTP/1.1 200 OK\r\n",
            b"HTTP/1.0 409 Conflict\r\n",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n",
            b"HTTP/1.1 2x0 OK\r\n",
        ];
        let headers: [&[u8]; 7] = [
            b"Content-Length: 4\r\n",
            b"Content-Length: 99999999999999999999\r\n",
            b"Transfer-Encoding: chunked\r\n",
            b"Connection: close\r\n",
            b"X: y\r\n",
            b":::\r\n",
            b"\x00\xff\r\n",
        ];
        let bodies: [&[u8]; 5] = [
            b"body",
            b"4\r\nbody\r\n0\r\n\r\n",
            b"ffffffffffffffffff\r\n",
            b"\x00\xff\r\n\n",
            b"",
        ];
        let l = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = l.local_addr().unwrap_or_else(|e| panic!("{e}")).to_string();
        let mut answers = Vec::new();
        for _ in 0..300 {
            let mut a = heads[(next() % 4) as usize].to_vec();
            for _ in 0..(next() % 4) {
                a.extend_from_slice(headers[(next() % 7) as usize]);
            }
            a.extend_from_slice(b"\r\n");
            a.extend_from_slice(bodies[(next() % 5) as usize]);
            if next() % 3 == 0 {
                a.truncate((next() % (a.len() as u64 + 1)) as usize);
            }
            answers.push(a);
        }
        let script = answers.clone();
        let srv = tokio::spawn(async move {
            for a in script {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                let mut b = [0u8; 4096];
                let _ = s.read(&mut b).await;
                let _ = s.write_all(&a).await;
                // then close: an answer that is not framed ends at the close
            }
        });
        let mut oks = 0;
        for a in &answers {
            // a new client each time, so that every request takes a new connection
            let c = Client::new();
            let r = tokio::time::timeout(Duration::from_secs(5), c.send(&req(&addr, b"{}", &[])))
                .await
                .unwrap_or_else(|_| panic!("hung on {:?}", String::from_utf8_lossy(a)));
            if let Ok(resp) = r {
                oks += 1;
                assert!(
                    a.windows(resp.body.len().max(1))
                        .any(|w| w == resp.body.as_slice())
                        || resp.body.is_empty(),
                    "{:?} gave {resp:?}",
                    String::from_utf8_lossy(a)
                );
            }
        }
        // the mix stays a mix: framed answers read, broken ones refused
        assert!(oks > 20 && oks < answers.len() - 20, "{oks} responses");
        srv.await.unwrap_or_else(|e| panic!("{e}"));
    }

    #[test]
    fn ports_are_told_apart_from_ipv6_colons() {
        assert!(has_port("h:80"));
        assert!(!has_port("h"));
        assert!(has_port("[::1]:8080"));
        assert!(!has_port("[::1]"));
    }
}
