//! Wire types of the dtm protocol: transaction and branch records as dtm serialises them,
//! the tolerant request decoder, statuses, ops, trans types and the classification of a
//! branch's answer. No I/O lives here.

mod b64;
pub mod model;
pub mod pb;
pub mod request;

pub use b64::{decode as base64_decode, encode as base64_encode};
pub use model::{Branch, TransGlobal, TransOptions};
pub use request::{RegisterBranchRequest, TransRequest};

/// Global statuses (dtm `client/dtmcli/consts.go`).
pub mod status {
    pub const PREPARED: &str = "prepared";
    pub const SUBMITTED: &str = "submitted";
    pub const ABORTING: &str = "aborting";
    pub const SUCCEED: &str = "succeed";
    pub const FAILED: &str = "failed";

    /// `succeed` and `failed` are final.
    pub fn is_final(s: &str) -> bool {
        s == SUCCEED || s == FAILED
    }

    /// Every status a global may have, for validating filters.
    pub const ALL: [&str; 5] = [PREPARED, SUBMITTED, ABORTING, SUCCEED, FAILED];
}

/// Branch ops.
pub mod op {
    pub const ACTION: &str = "action";
    pub const COMPENSATE: &str = "compensate";
    pub const TRY: &str = "try";
    pub const CONFIRM: &str = "confirm";
    pub const CANCEL: &str = "cancel";
    pub const COMMIT: &str = "commit";
    pub const ROLLBACK: &str = "rollback";
    pub const MSG: &str = "msg";
}

/// Transaction types.
pub mod trans_type {
    pub const SAGA: &str = "saga";
    pub const MSG: &str = "msg";
    pub const TCC: &str = "tcc";
    pub const XA: &str = "xa";
    pub const WORKFLOW: &str = "workflow";

    pub const ALL: [&str; 5] = [SAGA, MSG, TCC, XA, WORKFLOW];

    pub fn is_known(t: &str) -> bool {
        ALL.contains(&t)
    }
}

/// Protocols a transaction may declare.
pub mod protocol {
    pub const HTTP: &str = "http";
    pub const GRPC: &str = "grpc";
    pub const JSON_RPC: &str = "json-rpc";
}

/// Result strings of the dtm envelope.
pub const RESULT_SUCCESS: &str = "SUCCESS";
pub const RESULT_FAILURE: &str = "FAILURE";
pub const RESULT_ONGOING: &str = "ONGOING";

/// What a branch answered, once classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BranchOutcome {
    /// The branch did its work.
    Success,
    /// The branch refused for good (HTTP 409, gRPC Aborted, or a body saying FAILURE).
    Failure(String),
    /// The branch asks to be called again later (HTTP 425, gRPC FailedPrecondition, or a
    /// body saying ONGOING).
    Ongoing(String),
    /// Anything else: network error, timeout, unexpected status. Retried with backoff.
    Error(String),
}

impl BranchOutcome {
    pub fn is_success(&self) -> bool {
        matches!(self, BranchOutcome::Success)
    }

    /// Short label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            BranchOutcome::Success => "success",
            BranchOutcome::Failure(_) => "failure",
            BranchOutcome::Ongoing(_) => "ongoing",
            BranchOutcome::Error(_) => "error",
        }
    }

    pub fn message(&self) -> &str {
        match self {
            BranchOutcome::Success => "",
            BranchOutcome::Failure(m) | BranchOutcome::Ongoing(m) | BranchOutcome::Error(m) => m,
        }
    }
}

/// Classify an HTTP branch answer exactly as dtm's clients do: 425 or a body containing
/// `ONGOING` is ongoing; then 409 or a body containing `FAILURE` is a failure; then any
/// status other than 200 is an error; otherwise success. The substring rule keeps legacy
/// answers such as `200 {"dtm_result":"FAILURE"}` working.
pub fn classify_http(status: u16, body: &str) -> BranchOutcome {
    if status == 425 || body.contains(RESULT_ONGOING) {
        BranchOutcome::Ongoing(body.to_string())
    } else if status == 409 || body.contains(RESULT_FAILURE) {
        BranchOutcome::Failure(body.to_string())
    } else if status != 200 {
        BranchOutcome::Error(format!("branch answered HTTP {status}: {body}"))
    } else {
        BranchOutcome::Success
    }
}

/// Remove the characters dtm strips from gids and statuses (`\n`, `\r`, `;`).
pub fn escape(s: &str) -> String {
    s.chars()
        .filter(|c| !matches!(c, '\n' | '\r' | ';'))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_follows_dtm_order() {
        assert_eq!(classify_http(200, "null"), BranchOutcome::Success);
        assert!(matches!(classify_http(409, "x"), BranchOutcome::Failure(_)));
        assert!(matches!(classify_http(425, "x"), BranchOutcome::Ongoing(_)));
        // a 409 that mentions ONGOING is ongoing
        assert!(matches!(
            classify_http(409, "ONGOING"),
            BranchOutcome::Ongoing(_)
        ));
        assert!(matches!(
            classify_http(200, r#"{"dtm_result":"FAILURE"}"#),
            BranchOutcome::Failure(_)
        ));
        assert!(matches!(classify_http(201, ""), BranchOutcome::Error(_)));
        assert!(matches!(
            classify_http(500, "boom"),
            BranchOutcome::Error(_)
        ));
    }

    #[test]
    fn escape_strips_separators() {
        assert_eq!(escape("a;b\nc\rd"), "abcd");
    }
}
