//! Branch calls over gRPC (dtm §5.4): the URL `host:port/package.Service/Method` is split
//! at the first `/` into the dial target and the method path; the stored branch bytes are
//! sent as the request message unchanged (a raw-bytes codec, like dtm's `dtm_raw`) and the
//! response message is ignored. The transaction's identity travels as `dtm-*` metadata.
//!
//! One lazily connected [`Channel`] is kept per target; a channel is a cheap clone over one
//! multiplexed HTTP/2 connection that reconnects by itself.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use dtm_core::BranchCall;
use dtm_proto::BranchOutcome;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::metadata::{MetadataKey, MetadataValue};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

/// Sends and receives messages as opaque bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

#[derive(Debug, Clone, Copy, Default)]
pub struct RawEncoder;

#[derive(Debug, Clone, Copy, Default)]
pub struct RawDecoder;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// Split a gRPC branch URL into the dial target and the method path.
pub fn parse_grpc_url(url: &str) -> Result<(String, PathAndQuery), String> {
    if url.contains("://") {
        return Err(format!(
            "gRPC branch URL '{url}' has a scheme; service discovery drivers are not supported: \
             use host:port/package.Service/Method"
        ));
    }
    let Some(slash) = url.find('/') else {
        return Err(format!(
            "gRPC branch URL '{url}' has no method: use host:port/package.Service/Method"
        ));
    };
    let (target, method) = url.split_at(slash);
    if target.is_empty() {
        return Err(format!(
            "gRPC branch URL '{url}' has no host:port: use host:port/package.Service/Method"
        ));
    }
    let path = PathAndQuery::try_from(method.to_string()).map_err(|e| {
        format!("gRPC branch URL '{url}': method '{method}' is not a valid path ({e})")
    })?;
    Ok((target.to_string(), path))
}

/// Classify a gRPC status as dtm does (`GrpcError2DtmError`).
pub fn classify_status(st: &Status) -> BranchOutcome {
    match st.code() {
        Code::Ok => BranchOutcome::Success,
        // before dtm v1.10 ONGOING travelled as Aborted with the message ONGOING
        Code::Aborted if st.message() == dtm_proto::RESULT_ONGOING => {
            BranchOutcome::Ongoing(st.message().to_string())
        }
        Code::Aborted => BranchOutcome::Failure(st.message().to_string()),
        Code::FailedPrecondition => BranchOutcome::Ongoing(st.message().to_string()),
        code => BranchOutcome::Error(format!(
            "rpc error: code = {code:?} desc = {}",
            st.message()
        )),
    }
}

#[derive(Default)]
pub struct GrpcCaller {
    channels: Mutex<HashMap<String, Channel>>,
}

impl GrpcCaller {
    pub fn new() -> GrpcCaller {
        GrpcCaller::default()
    }

    fn channel(&self, target: &str) -> Result<Channel, String> {
        let mut map = self
            .channels
            .lock()
            .map_err(|_| "gRPC channel cache is unusable after a panic".to_string())?;
        if let Some(c) = map.get(target) {
            return Ok(c.clone());
        }
        let ep = Endpoint::from_shared(format!("http://{target}"))
            .map_err(|e| {
                format!("gRPC target '{target}' is not a valid host:port ({e}); fix the branch URL")
            })?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(3))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10));
        let c = ep.connect_lazy();
        map.insert(target.to_string(), c.clone());
        Ok(c)
    }

    fn request(c: &BranchCall) -> Result<tonic::Request<Bytes>, String> {
        let mut req = tonic::Request::new(Bytes::from(c.body.clone()));
        let md = req.metadata_mut();
        let pairs = [
            ("dtm-gid", c.gid.as_str()),
            ("dtm-trans_type", c.trans_type.as_str()),
            ("dtm-branch_id", c.branch_id.as_str()),
            ("dtm-op", c.op.as_str()),
            ("dtm-dtm", ""),
        ]
        .into_iter()
        .chain(c.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        for (k, v) in pairs {
            let key = MetadataKey::from_bytes(k.as_bytes()).map_err(|_| {
                format!(
                    "branch header '{k}' cannot be sent as gRPC metadata: use a name of \
                     lowercase letters, digits, '-', '_' or '.' not ending in -bin"
                )
            })?;
            let val = MetadataValue::try_from(v).map_err(|_| {
                format!(
                    "the value of '{k}' cannot be sent as gRPC metadata: use printable ASCII \
                     (got '{v}')"
                )
            })?;
            md.insert(key, val);
        }
        req.set_timeout(c.timeout);
        Ok(req)
    }

    pub async fn call(&self, c: &BranchCall) -> BranchOutcome {
        let (target, path) = match parse_grpc_url(&c.url) {
            Ok(x) => x,
            Err(e) => return BranchOutcome::Error(e),
        };
        let channel = match self.channel(&target) {
            Ok(ch) => ch,
            Err(e) => return BranchOutcome::Error(e),
        };
        let req = match Self::request(c) {
            Ok(r) => r,
            Err(e) => return BranchOutcome::Error(e),
        };
        // the answer is discarded; a large one must not turn a success into an error
        let mut grpc = tonic::client::Grpc::new(channel).max_decoding_message_size(usize::MAX);
        let fut = async {
            grpc.ready().await.map_err(|e| {
                Status::unavailable(format!("cannot connect to gRPC branch {target}: {e}"))
            })?;
            grpc.unary::<Bytes, Bytes, _>(req, path, RawCodec).await
        };
        match tokio::time::timeout(c.timeout, fut).await {
            Ok(Ok(_)) => BranchOutcome::Success,
            Ok(Err(st)) => {
                let out = classify_status(&st);
                if st.code() == Code::DeadlineExceeded {
                    BranchOutcome::Error(format!(
                        "{} (timed out; raise request_timeout or REQUEST_TIMEOUT if the branch is slow)",
                        out.message()
                    ))
                } else {
                    out
                }
            }
            Err(_) => BranchOutcome::Error(format!(
                "gRPC call {} timed out after {}s; raise request_timeout or REQUEST_TIMEOUT if the branch is slow",
                c.url,
                c.timeout.as_secs_f64()
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_at_the_first_slash() {
        let (t, p) =
            parse_grpc_url("localhost:58081/busi.Busi/TransIn").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t, "localhost:58081");
        assert_eq!(p.as_str(), "/busi.Busi/TransIn");
        assert!(parse_grpc_url("etcd://h:2379/svc/busi.Busi/TransIn").is_err());
        assert!(parse_grpc_url("localhost:58081").is_err());
        assert!(parse_grpc_url("/busi.Busi/TransIn").is_err());
    }

    #[test]
    fn statuses_are_classified_like_dtm() {
        assert!(matches!(
            classify_status(&Status::aborted("reason:x")),
            BranchOutcome::Failure(m) if m == "reason:x"
        ));
        assert!(matches!(
            classify_status(&Status::aborted("ONGOING")),
            BranchOutcome::Ongoing(_)
        ));
        assert!(matches!(
            classify_status(&Status::failed_precondition("later")),
            BranchOutcome::Ongoing(_)
        ));
        for st in [
            Status::internal("x"),
            Status::unavailable("x"),
            Status::unknown("x"),
            Status::deadline_exceeded("x"),
        ] {
            assert!(matches!(classify_status(&st), BranchOutcome::Error(_)));
        }
    }
}
