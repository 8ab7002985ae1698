//! Engine settings, derived from the server configuration.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Settings {
    /// Base retry interval in seconds (dtm `RetryInterval`); also the lease length.
    pub retry_interval: i64,
    /// Cap of the exponential backoff, in seconds.
    pub retry_max_interval: i64,
    /// Default timeout of msg/tcc/xa in seconds (dtm `TimeoutToFail`).
    pub timeout_to_fail: i64,
    /// Default branch call timeout in seconds (dtm `RequestTimeout`).
    pub request_timeout: i64,
    /// Idle sleep of the recovery loop (dtm `TransCronInterval`).
    pub cron_interval: Duration,
    /// How many due transactions one claim takes.
    pub recovery_batch: usize,
    /// How many transactions the recovery processes at once.
    pub recovery_concurrency: usize,
    /// POSTed when a branch keeps failing (dtm `AlertWebHook`); empty: off.
    pub alert_webhook: String,
    /// Retry count from which the webhook fires (dtm `AlertRetryLimit`).
    pub alert_retry_limit: i64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            retry_interval: 10,
            retry_max_interval: 3600,
            timeout_to_fail: 35,
            request_timeout: 3,
            cron_interval: Duration::from_secs(3),
            recovery_batch: 100,
            recovery_concurrency: 64,
            alert_webhook: String::new(),
            alert_retry_limit: 3,
        }
    }
}
