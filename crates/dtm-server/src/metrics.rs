//! A small Prometheus registry: request counters by API and outcome, served at
//! `/api/metrics` in the text exposition format.

use std::collections::BTreeMap;
use std::sync::Mutex;

#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, &'static str), u64>>,
    /// gRPC requests by lowercased method name and outcome.
    grpc_requests: Mutex<BTreeMap<(String, &'static str), u64>>,
}

impl Metrics {
    /// Count a `dtmgimp.Dtm` call (`api` = the lowercased method name, as dtm labels it).
    pub fn count_grpc(&self, api: &str, ok: bool) {
        if let Ok(mut m) = self.grpc_requests.lock() {
            *m.entry((api.to_ascii_lowercase(), if ok { "ok" } else { "fail" }))
                .or_default() += 1;
        }
    }

    pub fn count_request(&self, api: &str, ok: bool) {
        if let Ok(mut m) = self.requests.lock() {
            // `api` is a route name (see `api::count`), so the label set is bounded
            *m.entry((api.to_string(), if ok { "ok" } else { "fail" }))
                .or_default() += 1;
        }
    }

    pub fn render(&self, stats: &dtm_core::stats::Stats) -> String {
        let mut out = String::new();
        out.push_str("# HELP dtm_server_info The information of this dtm server.\n# TYPE dtm_server_info gauge\n");
        out.push_str(&format!(
            "dtm_server_info{{version=\"{}\"}} 1\n",
            crate::VERSION
        ));
        out.push_str("# HELP dtm_server_process_total All requests received by dtm\n# TYPE dtm_server_process_total counter\n");
        if let Ok(m) = self.requests.lock() {
            for ((api, status), n) in m.iter() {
                out.push_str(&format!(
                    "dtm_server_process_total{{type=\"http\",api=\"{api}\",status=\"{status}\"}} {n}\n"
                ));
            }
        }
        if let Ok(m) = self.grpc_requests.lock() {
            for ((api, status), n) in m.iter() {
                out.push_str(&format!(
                    "dtm_server_process_total{{type=\"grpc\",api=\"{api}\",status=\"{status}\"}} {n}\n"
                ));
            }
        }
        out.push_str("# HELP dtm_branch_process_total Branch calls by classified answer\n# TYPE dtm_branch_process_total counter\n");
        out.push_str("# HELP dtm_branch_unexpected_failure_total FAILURE answers from branches only SUCCESS can end (retried, alerted)\n# TYPE dtm_branch_unexpected_failure_total counter\n");
        out.push_str("# HELP dtm_transaction_status_total Status changes written by this node\n# TYPE dtm_transaction_status_total counter\n");
        for (name, v) in stats.lines() {
            out.push_str(&format!("{name} {v}\n"));
        }
        out
    }
}
