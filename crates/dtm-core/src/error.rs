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
    pub fn failure(msg: impl std::fmt::Display) -> ApiError {
        ApiError::Failure(format!("{msg} FAILURE"))
    }
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
