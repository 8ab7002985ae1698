//! The HTTP listener: the API's hot calls answered by a small HTTP/1.1 loop, everything
//! else by hyper and the axum router, on the same connection.
//!
//! Every saga makes one call to the API (`submit`), every msg two, every tcc branch one.
//! hyper's connection dispatcher and axum's router, middleware and response types cost
//! more CPU per call than the rest of the answer's way out (bench/README.md). This loop
//! reads a request head with `httparse`. A POST to one of the hot paths (`api::Hot`),
//! HTTP/1.1, with one `Content-Length` body within the body limit, is answered here,
//! through the same handler the router calls, and counted in the same request metrics.
//!
//! Anything else hands the connection, with the bytes read so far, to hyper and the
//! router for the rest of its life: another route or method, HTTP/1.0, a chunked body,
//! `Expect` or `Upgrade`, a head `httparse` rejects or one over 64 KiB, a body over the
//! limit. So every error answer, and every rule of HTTP this loop does not apply itself,
//! stays hyper's and the router's.
//!
//! Keep-alive and pipelining: requests on a connection are answered in order; a request
//! with `Connection: close` gets its answer with `connection: close`, then the
//! connection closes. At shutdown no connection is accepted any more, an idle one (or one
//! whose request head is not complete) closes, one in a request closes after its answer,
//! and `serve` returns when all are gone (`Server::shutdown` waits for that a bounded
//! time).

use std::cell::RefCell;
use std::io::{self, Write as _};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::http::StatusCode;
use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::api::{self, AppState, Hot};

/// A request head longer than this goes to hyper (which answers it as too large).
const MAX_HEAD: usize = 64 * 1024;
/// A head with more header fields than this goes to hyper.
const MAX_HEADERS: usize = 64;
const READ_CHUNK: usize = 8 * 1024;

struct Shared {
    app: Router,
    state: AppState,
    max_body: usize,
}

/// Serve HTTP on `listener` until `stop` turns true (or its sender is gone), then wait
/// for the open connections to finish their requests.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    state: AppState,
    max_body: usize,
    mut stop: watch::Receiver<bool>,
) {
    // every connection task holds a receiver; `closed()` resolves once all are gone
    let (all_closed, conn_token) = watch::channel(());
    let shared = Arc::new(Shared {
        app,
        state,
        max_body,
    });
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|s| *s) => break,
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                // out of file descriptors and the like: wait, as axum and Go's server do
                tracing::error!("accepting an HTTP connection failed: {e}; retrying in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        // answers go out at once, as from dtm (Go sets TCP_NODELAY on every socket)
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!("TCP_NODELAY on an HTTP connection: {e}");
        }
        let shared = Arc::clone(&shared);
        let stop = stop.clone();
        let token = conn_token.clone();
        tokio::spawn(async move {
            connection(stream, shared, stop).await;
            drop(token);
        });
    }
    drop(conn_token);
    drop(listener);
    all_closed.closed().await;
}

/// Errors that concern one connection only: accept the next.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// A request this loop answers itself.
#[derive(Debug, PartialEq, Eq)]
struct HotRequest {
    hot: Hot,
    head_len: usize,
    body_len: usize,
    close: bool,
}

#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    Hot(HotRequest),
    /// the head is not complete yet
    Partial,
    /// hyper's: see the module comment
    Other,
}

fn parse(buf: &[u8], max_body: usize) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return Parsed::Partial,
        Ok(httparse::Status::Partial) | Err(_) => return Parsed::Other,
    };
    if req.method != Some("POST") || req.version != Some(1) {
        return Parsed::Other;
    }
    let target = req.path.unwrap_or("");
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    let Some(hot) = Hot::from_path(path) else {
        return Parsed::Other;
    };
    let mut body_len = None;
    let mut close = false;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            let v = h.value;
            if body_len.is_some()
                || v.is_empty()
                || v.len() > 19
                || !v.iter().all(u8::is_ascii_digit)
            {
                return Parsed::Other;
            }
            body_len = Some(v.iter().fold(0usize, |n, d| n * 10 + usize::from(d - b'0')));
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("expect")
            || name.eq_ignore_ascii_case("upgrade")
        {
            return Parsed::Other;
        } else if name.eq_ignore_ascii_case("connection") {
            for token in h.value.split(|b| *b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"upgrade") {
                    return Parsed::Other;
                }
            }
        }
    }
    match body_len {
        Some(body_len) if body_len <= max_body => Parsed::Hot(HotRequest {
            hot,
            head_len,
            body_len,
            close,
        }),
        _ => Parsed::Other,
    }
}

async fn connection(mut io: TcpStream, sh: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut out: Vec<u8> = Vec::with_capacity(256);
    loop {
        let req = match parse(&buf, sh.max_body) {
            Parsed::Hot(req) => req,
            Parsed::Other => return handoff(io, buf, &sh, stop).await,
            // no complete head yet, or no bytes at all (idle between requests): no request
            // is in progress, so this is where a shutdown closes the connection
            Parsed::Partial => {
                if *stop.borrow() {
                    return;
                }
                buf.reserve(READ_CHUNK);
                let read = tokio::select! {
                    r = io.read_buf(&mut buf) => r,
                    _ = stop.wait_for(|s| *s) => return,
                };
                if !matches!(read, Ok(n) if n > 0) {
                    return;
                }
                continue;
            }
        };
        let total = req.head_len + req.body_len;
        while buf.len() < total {
            // room for what has come, not for what the head announced: a client that
            // announces a large body and sends nothing holds no memory for it
            buf.reserve((total - buf.len()).min(READ_CHUNK));
            if !matches!(io.read_buf(&mut buf).await, Ok(n) if n > 0) {
                return;
            }
        }
        let body = buf.split_to(total).split_off(req.head_len).freeze();
        let answer = api::hot_call(&sh.state, req.hot, body).await;
        let close = req.close || *stop.borrow();
        out.clear();
        write_head(&mut out, answer.status, answer.body.len(), close);
        out.extend_from_slice(&answer.body);
        if io.write_all(&out).await.is_err() {
            return;
        }
        if close {
            let _ = io.shutdown().await;
            return;
        }
    }
}

fn write_head(out: &mut Vec<u8>, status: StatusCode, len: usize, close: bool) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    // writing to a Vec cannot fail
    let _ = write!(
        out,
        "\r\ncontent-type: {}\r\ncontent-length: {len}\r\ndate: ",
        api::JSON_CONTENT_TYPE
    );
    push_date(out);
    if close {
        out.extend_from_slice(b"\r\nconnection: close");
    }
    out.extend_from_slice(b"\r\n\r\n");
}

/// The `Date` header value (IMF-fixdate), formatted once a second per thread.
fn push_date(out: &mut Vec<u8>) {
    thread_local! {
        static DATE: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE.with(|d| {
        let mut d = d.borrow_mut();
        if d.0 != secs {
            *d = (secs, httpdate::fmt_http_date(now));
        }
        out.extend_from_slice(d.1.as_bytes());
    });
}

/// Serve the rest of the connection with hyper and the router, starting with the bytes
/// already read.
async fn handoff(io: TcpStream, read: BytesMut, sh: &Shared, mut stop: watch::Receiver<bool>) {
    let io = hyper_util::rt::TokioIo::new(Rewind {
        pre: read.freeze(),
        io,
    });
    let svc = hyper_util::service::TowerToHyperService::new(sh.app.clone());
    let conn = hyper::server::conn::http1::Builder::new().serve_connection(io, svc);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::trace!("HTTP connection: {e}");
            }
            return;
        }
        _ = stop.wait_for(|s| *s) => {}
    }
    conn.as_mut().graceful_shutdown();
    if let Err(e) = conn.await {
        tracing::trace!("HTTP connection: {e}");
    }
}

/// A connection whose first bytes were read already: they are read again first.
struct Rewind {
    pre: Bytes,
    io: TcpStream,
}

impl AsyncRead for Rewind {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if !me.pre.is_empty() {
            let n = me.pre.len().min(buf.remaining());
            buf.put_slice(&me.pre[..n]);
            me.pre.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut me.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hot(head_len: usize, body_len: usize, close: bool) -> Parsed {
        Parsed::Hot(HotRequest {
            hot: Hot::Submit,
            head_len,
            body_len,
            close,
        })
    }

    #[test]
    fn which_requests_the_loop_answers_itself() {
        let submit = "POST /api/dtmsvr/submit HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}";
        let head = submit.len() - 2;
        assert_eq!(parse(submit.as_bytes(), 100), hot(head, 2, false));
        // a query string does not change the route
        let q = "POST /api/dtmsvr/submit?x=1 HTTP/1.1\r\ncontent-length: 2\r\n\r\n";
        assert_eq!(parse(q.as_bytes(), 100), hot(q.len(), 2, false));
        let close = "POST /api/dtmsvr/submit HTTP/1.1\r\nConnection: keep-alive, Close\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(parse(close.as_bytes(), 100), hot(close.len(), 0, true));
        // the head is not all there yet
        assert_eq!(
            parse(b"POST /api/dtmsvr/submit HTTP/1.1\r\ncontent-le", 100),
            Parsed::Partial
        );
        assert_eq!(parse(b"", 100), Parsed::Partial);
        for other in [
            // another route, method or version
            "POST /api/dtmsvr/query HTTP/1.1\r\ncontent-length: 2\r\n\r\n",
            "POST /api/dtmsvr/submit/ HTTP/1.1\r\ncontent-length: 2\r\n\r\n",
            "GET /api/dtmsvr/submit HTTP/1.1\r\n\r\n",
            "HEAD /api/dtmsvr/submit HTTP/1.1\r\n\r\n",
            "POST /api/dtmsvr/submit HTTP/1.0\r\ncontent-length: 2\r\n\r\n",
            "POST http://h/api/dtmsvr/submit HTTP/1.1\r\ncontent-length: 2\r\n\r\n",
            // framing this loop leaves to hyper
            "POST /api/dtmsvr/submit HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n",
            "POST /api/dtmsvr/submit HTTP/1.1\r\ncontent-length: 2\r\nexpect: 100-continue\r\n\r\n",
            "POST /api/dtmsvr/submit HTTP/1.1\r\nconnection: upgrade\r\nupgrade: h2c\r\ncontent-length: 2\r\n\r\n",
            "POST /api/dtmsvr/submit HTTP/1.1\r\n\r\n",
            "POST /api/dtmsvr/submit HTTP/1.1\r\ncontent-length: 2\r\ncontent-length: 2\r\n\r\n",
            "POST /api/dtmsvr/submit HTTP/1.1\r\ncontent-length: +2\r\n\r\n",
            "POST /api/dtmsvr/submit HTTP/1.1\r\ncontent-length: 99999999999999999999\r\n\r\n",
            // over the body limit: hyper and the router answer 413
            "POST /api/dtmsvr/submit HTTP/1.1\r\ncontent-length: 101\r\n\r\n",
            // not HTTP
            "POST /api/dtmsvr/submit HTTP/1.1\r\nbad header\r\n\r\n",
            "\x16\x03\x01\x02\x00\x01\x00\x01\x7c\x03\x03\r\n\r\n",
        ] {
            assert_eq!(parse(other.as_bytes(), 100), Parsed::Other, "{other:?}");
        }
        // a head that never ends goes to hyper once it passes 64 KiB
        let mut long = b"POST /api/dtmsvr/submit HTTP/1.1\r\nx: ".to_vec();
        long.resize(MAX_HEAD, b'a');
        assert_eq!(parse(&long, 100), Parsed::Other);
    }

    #[test]
    fn the_answer_head() {
        let mut out = Vec::new();
        write_head(&mut out, StatusCode::CONFLICT, 42, true);
        let text = String::from_utf8(out).unwrap_or_default();
        assert!(text.starts_with("HTTP/1.1 409 Conflict\r\n"), "{text}");
        assert!(text.contains("\r\ncontent-length: 42\r\n"), "{text}");
        assert!(
            text.contains("\r\ncontent-type: application/json; charset=utf-8\r\n"),
            "{text}"
        );
        assert!(text.contains("\r\nconnection: close\r\n"), "{text}");
        assert!(
            text.ends_with(" GMT\r\nconnection: close\r\n\r\n"),
            "{text}"
        );
    }
}
