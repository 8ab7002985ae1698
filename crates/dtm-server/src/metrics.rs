//! A small Prometheus registry: request counters by API and outcome, served at
//! `/api/metrics` in the text exposition format.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// Counts by API name: `[ok, fail]`. Names are kept as given (a route's or a gRPC
/// method's own, a fixed set) so that counting a known API allocates nothing; `render`
/// lowercases them, as dtm labels them.
type Counts = Mutex<BTreeMap<String, [u64; 2]>>;

fn bump(counts: &Counts, api: &str, ok: bool) {
    if let Ok(mut m) = counts.lock() {
        let i = usize::from(!ok);
        match m.get_mut(api) {
            Some(c) => c[i] += 1,
            None => {
                let mut c = [0; 2];
                c[i] = 1;
                m.insert(api.to_string(), c);
            }
        }
    }
}

/// `dtm_server_process_total` lines of one request type, labels lowercased.
fn render_counts(out: &mut String, kind: &str, counts: &Counts) {
    let Ok(m) = counts.lock() else { return };
    let mut by_label: BTreeMap<(String, &str), u64> = BTreeMap::new();
    for (api, c) in m.iter() {
        for (status, n) in [("ok", c[0]), ("fail", c[1])] {
            if n > 0 {
                *by_label
                    .entry((api.to_ascii_lowercase(), status))
                    .or_default() += n;
            }
        }
    }
    for ((api, status), n) in by_label {
        out.push_str(&format!(
            "dtm_server_process_total{{type=\"{kind}\",api=\"{api}\",status=\"{status}\"}} {n}\n"
        ));
    }
}

#[derive(Default)]
pub struct Metrics {
    /// HTTP requests by route name (see `api::count`).
    requests: Counts,
    /// gRPC requests by method name.
    grpc_requests: Counts,
}

impl Metrics {
    /// Count a `dtmgimp.Dtm` call by its method name.
    pub fn count_grpc(&self, api: &str, ok: bool) {
        bump(&self.grpc_requests, api, ok);
    }

    /// Count an HTTP request by the name of the route it matched (a bounded set).
    pub fn count_request(&self, api: &str, ok: bool) {
        bump(&self.requests, api, ok);
    }

    pub fn render(&self, stats: &dtm_core::stats::Stats) -> String {
        let mut out = String::new();
        out.push_str("# HELP dtm_server_info The information of this dtm server.\n# TYPE dtm_server_info gauge\n");
        out.push_str(&format!(
            "dtm_server_info{{version=\"{}\"}} 1\n",
            crate::VERSION
        ));
        out.push_str("# HELP dtm_server_process_total All requests received by dtm\n# TYPE dtm_server_process_total counter\n");
        render_counts(&mut out, "http", &self.requests);
        render_counts(&mut out, "grpc", &self.grpc_requests);
        out.push_str("# HELP dtm_branch_process_total Branch calls by classified answer\n# TYPE dtm_branch_process_total counter\n");
        out.push_str("# HELP dtm_branch_unexpected_failure_total FAILURE answers from branches only SUCCESS can end (retried, alerted)\n# TYPE dtm_branch_unexpected_failure_total counter\n");
        out.push_str("# HELP dtm_transaction_status_total Status changes written by this node\n# TYPE dtm_transaction_status_total counter\n");
        for (name, v) in stats.lines() {
            out.push_str(&format!("{name} {v}\n"));
        }
        out
    }
}
