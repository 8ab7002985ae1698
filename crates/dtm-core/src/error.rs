//! Errors the service API returns, mapped by the adapters to dtm's status codes.

use crate::store::StoreError;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// Malformed or invalid input: HTTP 400.
    #[error("{0}")]
    BadRequest(String),
    /// The request body is larger than the configured limit: HTTP 413.
    #[error("{0}")]
    TooLarge(String),
    /// The named transaction or topic does not exist: HTTP 404.
    #[error("{0}")]
    NotFound(String),
    /// dtm's FAILURE: HTTP 409, gRPC Aborted. The text ends with `FAILURE` as dtm's does.
    #[error("{0}")]
    Failure(String),
    /// dtm's ONGOING: HTTP 425, gRPC FailedPrecondition.
    #[error("{0}")]
    Ongoing(String),
    /// The store cannot be reached: HTTP 503. Nothing was changed.
    #[error("{0}")]
    Unavailable(String),
    /// Anything else: HTTP 500.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// A FAILURE error whose text ends in exactly one ` FAILURE`, as dtm's
    /// `ErrorMessage2Error` makes it.
    pub fn failure(msg: impl std::fmt::Display) -> ApiError {
        ApiError::Failure(failure_text(&msg.to_string()))
    }
}

/// `msg` ending in exactly one ` FAILURE` (dtm's `ErrorMessage2Error(msg, ErrFailure)`):
/// a branch's FAILURE text and the rollback reason made from it read as dtm's do, and
/// passing one through again does not repeat the word.
pub fn failure_text(msg: &str) -> String {
    format!("{} FAILURE", msg.strip_suffix(" FAILURE").unwrap_or(msg))
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(m) => ApiError::Unavailable(format!(
                "the store is unavailable ({m}); nothing was changed, retry later"
            )),
            StoreError::NotFound => ApiError::NotFound("storage: NotFound".into()),
            StoreError::UniqueConflict => ApiError::Failure("storage: UniqueKeyConflict".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn failure_text_ends_in_one_failure() {
        assert_eq!(super::failure_text("no money"), "no money FAILURE");
        assert_eq!(super::failure_text("no money FAILURE"), "no money FAILURE");
        assert_eq!(super::failure_text("FAILURE"), "FAILURE FAILURE");
        assert_eq!(
            super::ApiError::failure("x FAILURE").to_string(),
            "x FAILURE"
        );
    }
}
