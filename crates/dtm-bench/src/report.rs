//! The table and the JSON line.

use crate::args::Args;
use crate::load::Kind;
use crate::procfs::CpuUse;
use crate::stats::{JsonLine, Latency, ratio, round};
use crate::verify::Verdict;
use serde_json::Value;

/// One measured phase.
#[derive(Debug)]
pub struct Row {
    pub name: String,
    pub kind: Kind,
    pub ok: u64,
    pub errors: u64,
    pub wall: f64,
    pub lat: Latency,
    pub cpu: CpuUse,
    /// server (RSS, peak RSS) in bytes at the end of the phase
    pub rss: Option<(u64, u64)>,
    /// asynchronous modes: seconds after the phase until every transaction was final
    pub settle: Option<f64>,
    pub verify: Option<Verdict>,
    /// each separately timed slice's transactions per second, in the order they ran
    /// (one entry: one stretch)
    pub slice_tps: Vec<f64>,
}

impl Row {
    pub fn tps(&self) -> f64 {
        ratio(self.ok as f64, self.wall)
    }

    /// How many slices the row adds up.
    pub fn slices(&self) -> usize {
        self.slice_tps.len()
    }

    /// server CPU microseconds per transaction
    pub fn cpu_us_per_tx(&self) -> Option<f64> {
        self.cpu
            .server_secs
            .filter(|_| self.ok > 0)
            .map(|s| s * 1e6 / self.ok as f64)
    }
}

fn mb(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

fn opt(v: Option<f64>, decimals: usize) -> String {
    match v {
        Some(v) => format!("{v:.decimals$}"),
        None => "-".into(),
    }
}

pub fn durability(args: &Args) -> String {
    match args.store.as_str() {
        "sqlite" => format!("WAL, synchronous={}", args.sync.to_ascii_uppercase()),
        "redis" if crate::server::private_redis(args.fresh_db) => {
            "own redis-server, appendonly yes, appendfsync always".to_string()
        }
        other => format!("{other} server defaults"),
    }
}

/// The mode the headline numbers (and R) come from: saga-wait, else saga, else the
/// first mode.
pub fn headline_kind(modes: &[Kind]) -> Option<Kind> {
    [Kind::SagaWait, Kind::Saga]
        .into_iter()
        .find(|k| modes.contains(k))
        .or_else(|| modes.first().copied())
}

/// The row the headline numbers come from: that of [`headline_kind`] at full load (a
/// `--rate` run has only paced rows: then its first).
pub fn headline(rows: &[Row]) -> Option<&Row> {
    let kinds: Vec<Kind> = rows
        .iter()
        .map(|r| r.kind)
        .filter(|k| *k != Kind::Baseline)
        .collect();
    let k = headline_kind(&kinds)?;
    let of_kind = || rows.iter().filter(move |r| r.kind == k);
    of_kind()
        .find(|r| !r.name.contains('@'))
        .or_else(|| of_kind().next())
}

pub fn baseline(rows: &[Row]) -> Option<&Row> {
    rows.iter().find(|r| r.kind == Kind::Baseline)
}

pub fn table(rows: &[Row], args: &Args) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "\nstore {} ({}), concurrency {}, {} core(s)\n",
        args.store,
        durability(args),
        args.concurrency,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    ));
    s.push_str(&format!(
        "{:<16} {:>8} {:>6} {:>9} {:>7} {:>7} {:>7} {:>8} {:>6} {:>8} {:>8} {:>7} {:>7} {:>6} {:>7}\n",
        "phase",
        "count",
        "secs",
        "tx/s",
        "p50ms",
        "p90ms",
        "p99ms",
        "maxms",
        "errors",
        "srvCPU%",
        "srvus/tx",
        "srvMB",
        "bench%",
        "mach%",
        "other%"
    ));
    for r in rows {
        s.push_str(&format!(
            "{:<16} {:>8} {:>6.1} {:>9.0} {:>7.2} {:>7.2} {:>7.2} {:>8.1} {:>6} {:>8} {:>8} {:>7} {:>7} {:>6} {:>7}\n",
            r.name,
            r.ok,
            r.wall,
            r.tps(),
            r.lat.p50,
            r.lat.p90,
            r.lat.p99,
            r.lat.max,
            r.errors,
            opt(r.cpu.server_pct, 0),
            opt(r.cpu_us_per_tx(), 0),
            opt(r.rss.map(|x| mb(x.0)), 0),
            opt(r.cpu.bench_pct, 0),
            opt(r.cpu.machine_pct, 0),
            opt(r.cpu.others_pct, 0),
        ));
    }
    for r in rows {
        if let (Some((rd, wr, bytes)), true) =
            (r.cpu.server_io, r.ok > 0 && r.kind != Kind::Baseline)
        {
            let n = r.ok as f64;
            s.push_str(&format!(
                "{}: server syscalls per transaction: {:.1} reads, {:.1} writes; {:.1} KiB written to storage\n",
                r.name,
                rd as f64 / n,
                wr as f64 / n,
                bytes as f64 / n / 1024.0
            ));
        }
    }
    for r in rows {
        if let Some(t) = r.settle {
            s.push_str(&format!(
                "{}: every transaction final {t:.1}s after the phase ended\n",
                r.name
            ));
        }
    }
    if let (Some(h), Some(b)) = (headline(rows), baseline(rows)) {
        s.push_str(&format!(
            "R = {} {:.0}/s / baseline {:.0} pairs/s = {:.3}\n",
            h.name,
            h.tps(),
            b.tps(),
            ratio(h.tps(), b.tps())
        ));
        if h.slices() > 1 && b.slices() == h.slices() {
            let rs = slice_ratios(h, b);
            let n = h.slices() as f64;
            s.push_str(&format!(
                "(both measured in {} alternating slices, {:.1}s and {:.1}s each; R per slice pair: {})\n",
                h.slices(),
                h.wall / n,
                b.wall / n,
                rs.iter()
                    .map(|r| format!("{r:.3}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            ));
        }
    }
    s.push_str(
        "(srvCPU%, bench%, other%: % of one core used by the server, by this bench (load + branches), by everything else; mach%: % of all cores; srvus/tx: server CPU per transaction)\n",
    );
    let (checked, good) = verified(rows);
    s.push_str(&format!(
        "verified: {good} of {checked} transactions succeed\n"
    ));
    if let Some(peak) = rows.iter().filter_map(|r| r.rss.map(|x| x.1)).max() {
        s.push_str(&format!("server peak RSS: {:.0} MB\n", mb(peak)));
    }
    s
}

/// R of each (mode slice, baseline slice) pair, in the order they ran.
pub fn slice_ratios(h: &Row, b: &Row) -> Vec<f64> {
    h.slice_tps
        .iter()
        .zip(&b.slice_tps)
        .map(|(m, b)| ratio(*m, *b))
        .collect()
}

/// (checked, succeed) over every verdict.
fn verified(rows: &[Row]) -> (u64, u64) {
    rows.iter()
        .filter_map(|r| r.verify.as_ref())
        .fold((0, 0), |(c, g), v| (c + v.checked(), g + v.succeeded))
}

fn row_json(r: &Row) -> serde_json::Value {
    let mut j = JsonLine::new();
    j.num("tps", r.tps(), 1)
        .int("count", r.ok)
        .num("seconds", r.wall, 2)
        .num("p50_ms", r.lat.p50, 3)
        .num("p90_ms", r.lat.p90, 3)
        .num("p99_ms", r.lat.p99, 3)
        .num("max_ms", r.lat.max, 3)
        .int("errors", r.errors);
    if let Some(v) = r.cpu.server_pct {
        j.num("server_cpu_pct", v, 1);
    }
    if let Some(v) = r.cpu_us_per_tx() {
        j.num("server_cpu_us_per_tx", v, 1);
    }
    if let Some(v) = r.settle {
        j.num("settle_seconds", v, 2);
    }
    serde_json::from_str(&j.render()).unwrap_or(serde_json::Value::Null)
}

pub fn throughput_json(rows: &[Row], args: &Args, ok: bool) -> String {
    let mut j = JsonLine::new();
    let h = headline(rows);
    let b = baseline(rows);
    let tps = h.map(Row::tps).unwrap_or(0.0);
    let btps = b.map(Row::tps).unwrap_or(0.0);
    let (checked, good) = verified(rows);
    j.text("scenario", "throughput")
        .text("mode", h.map(|r| r.name.as_str()).unwrap_or(""))
        .num("sagas_per_sec", tps, 1)
        .num("baseline_pairs_per_sec", btps, 1)
        .num("ratio", ratio(tps, btps), 4)
        .num("p50_ms", h.map(|r| r.lat.p50).unwrap_or(0.0), 3)
        .num("p90_ms", h.map(|r| r.lat.p90).unwrap_or(0.0), 3)
        .num("p99_ms", h.map(|r| r.lat.p99).unwrap_or(0.0), 3)
        .num("max_ms", h.map(|r| r.lat.max).unwrap_or(0.0), 3)
        .int("errors", rows.iter().map(|r| r.errors).sum())
        .int("verified", good)
        .int("verify_checked", checked)
        .text("store", &args.store)
        .text("durability", &durability(args))
        .int("concurrency", args.concurrency as u64)
        .num("seconds", h.map(|r| r.wall).unwrap_or(0.0), 2)
        .int("slices", h.map(|r| r.slices() as u64).unwrap_or(0))
        .bool("ok", ok);
    if let (Some(h), Some(b)) = (h, b)
        && h.slices() > 1
    {
        let rs: Vec<Value> = slice_ratios(h, b)
            .into_iter()
            .map(|r| Value::from(round(r, 4)))
            .collect();
        j.value("slice_ratios", Value::Array(rs));
    }
    if let Some(h) = h {
        if let Some(v) = h.cpu.server_pct {
            j.num("server_cpu_pct", v, 1);
        }
        if let Some(v) = h.cpu_us_per_tx() {
            j.num("server_cpu_us_per_saga", v, 1);
        }
        if let Some(v) = h.cpu.bench_pct {
            j.num("bench_cpu_pct", v, 1);
        }
        if let Some(v) = h.cpu.machine_pct {
            j.num("machine_cpu_pct", v, 1);
        }
        if let Some(v) = h.cpu.others_pct {
            j.num("other_processes_cpu_pct", v, 1);
        }
        if let (Some((rd, wr, _)), true) = (h.cpu.server_io, h.ok > 0) {
            j.num("server_read_syscalls_per_saga", rd as f64 / h.ok as f64, 2)
                .num("server_write_syscalls_per_saga", wr as f64 / h.ok as f64, 2);
        }
    }
    if let Some((rss, _)) = h.and_then(|r| r.rss) {
        j.num("server_rss_mb", mb(rss), 1);
    }
    if let Some(peak) = rows.iter().filter_map(|r| r.rss.map(|x| x.1)).max() {
        j.num("server_peak_rss_mb", mb(peak), 1);
    }
    if let Some(half) = rows.iter().find(|r| r.name.ends_with("@half")) {
        j.num("half_load_tps", half.tps(), 1)
            .num("half_load_p50_ms", half.lat.p50, 3)
            .num("half_load_p99_ms", half.lat.p99, 3);
    }
    let modes: serde_json::Map<String, serde_json::Value> =
        rows.iter().map(|r| (r.name.clone(), row_json(r))).collect();
    j.value("phases", serde_json::Value::Object(modes));
    j.render()
}

/// Result of the recovery scenario.
#[derive(Debug)]
pub struct Recovery {
    pub count: u64,
    pub submit_errors: u64,
    pub submit_rate: f64,
    pub outage_calls: u64,
    pub drained: bool,
    pub drain_secs: f64,
    pub cpu: CpuUse,
    pub rss: Option<(u64, u64)>,
    pub verify: Verdict,
}

pub fn recovery_table(r: &Recovery, args: &Args) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "\nrecovery: store {} ({}), outage {} for {}s after the last first attempt, RETRY_INTERVAL 1s, RETRY_MAX_INTERVAL {}s\n",
        args.store,
        durability(args),
        if args.outage_ongoing { "ONGOING" } else { "500" },
        args.outage_seconds,
        args.max_backoff
    ));
    s.push_str(&format!(
        "submitted:     {} ({:.0}/s, {} errors)\n",
        r.count, r.submit_rate, r.submit_errors
    ));
    s.push_str(&format!(
        "branch calls during the outage: {}\n",
        r.outage_calls
    ));
    s.push_str(&format!(
        "drain:         {} in {:.1}s = {:.0}/s{}\n",
        r.count,
        r.drain_secs,
        ratio(r.count as f64, r.drain_secs),
        if r.drained { "" } else { " (NOT DRAINED)" }
    ));
    s.push_str(&format!(
        "server CPU during the drain: {}% of one core; RSS {} MB (peak {} MB)\n",
        opt(r.cpu.server_pct, 0),
        opt(r.rss.map(|x| mb(x.0)), 0),
        opt(r.rss.map(|x| mb(x.1)), 0)
    ));
    s.push_str(&format!(
        "verified: {} of {} transactions succeed\n",
        r.verify.succeeded,
        r.verify.checked()
    ));
    s
}

pub fn recovery_json(r: &Recovery, args: &Args, ok: bool) -> String {
    let mut j = JsonLine::new();
    j.text("scenario", "recovery")
        .int("recovery_count", r.count)
        .num("drain_seconds", r.drain_secs, 2)
        .num("drain_per_sec", ratio(r.count as f64, r.drain_secs), 1)
        .bool("drained", r.drained)
        .num("submit_per_sec", r.submit_rate, 1)
        .int("outage_branch_calls", r.outage_calls)
        .int("errors", r.submit_errors)
        .int("verified", r.verify.succeeded)
        .int("verify_checked", r.verify.checked())
        .text("store", &args.store)
        .text("durability", &durability(args))
        .text(
            "outage",
            if args.outage_ongoing {
                "ongoing"
            } else {
                "error"
            },
        )
        .num("outage_seconds", args.outage_seconds, 1)
        .int("max_backoff", args.max_backoff)
        .int("concurrency", args.concurrency as u64)
        .bool("ok", ok);
    if let Some(v) = r.cpu.server_pct {
        j.num("server_cpu_pct", v, 1);
    }
    if let Some((rss, peak)) = r.rss {
        j.num("server_rss_mb", mb(rss), 1)
            .num("server_peak_rss_mb", mb(peak), 1);
    }
    j.render()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row(name: &str, kind: Kind, ok: u64, wall: f64) -> Row {
        Row {
            name: name.into(),
            kind,
            ok,
            errors: 0,
            wall,
            lat: Latency {
                p50: 1.0,
                p90: 2.0,
                p99: 3.0,
                max: 4.0,
                mean: 1.5,
            },
            cpu: CpuUse::default(),
            rss: None,
            settle: None,
            slice_tps: vec![ok as f64 / wall],
            verify: (kind != Kind::Baseline).then(|| Verdict {
                succeeded: ok,
                ..Default::default()
            }),
        }
    }

    #[test]
    fn json_has_the_required_keys_and_ratio() {
        let rows = vec![
            row("saga-wait", Kind::SagaWait, 1000, 2.0),
            row("baseline", Kind::Baseline, 2000, 2.0),
        ];
        let args = Args::default();
        let line = throughput_json(&rows, &args, true);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        for k in [
            "sagas_per_sec",
            "baseline_pairs_per_sec",
            "ratio",
            "p50_ms",
            "p99_ms",
            "errors",
            "verified",
            "store",
            "concurrency",
            "seconds",
        ] {
            assert!(v.get(k).is_some(), "missing {k} in {line}");
        }
        assert_eq!(v["sagas_per_sec"], json!(500.0));
        assert_eq!(v["baseline_pairs_per_sec"], json!(1000.0));
        assert_eq!(v["ratio"], json!(0.5));
        assert_eq!(v["verified"], json!(1000));
        assert_eq!(v["store"], "sqlite");
        let t = table(&rows, &args);
        assert!(
            t.contains("R = saga-wait 500/s / baseline 1000 pairs/s = 0.500"),
            "{t}"
        );
    }

    #[test]
    fn r_per_slice_pair() {
        let mut h = row("saga-wait", Kind::SagaWait, 3000, 3.0);
        let mut b = row("baseline", Kind::Baseline, 6000, 3.0);
        h.slice_tps = vec![1000.0, 900.0, 1100.0];
        b.slice_tps = vec![2000.0, 3000.0, 1000.0];
        assert_eq!(slice_ratios(&h, &b), vec![0.5, 0.3, 1.1]);
        let rows = vec![h, b];
        let t = table(&rows, &Args::default());
        assert!(
            t.contains(
                "3 alternating slices, 1.0s and 1.0s each; R per slice pair: 0.500 0.300 1.100"
            ),
            "{t}"
        );
        let j: serde_json::Value =
            serde_json::from_str(&throughput_json(&rows, &Args::default(), true))
                .unwrap_or_default();
        assert_eq!(j["slice_ratios"], serde_json::json!([0.5, 0.3, 1.1]));
        assert_eq!(j["slices"], 3);
    }

    #[test]
    fn headline_row_is_the_headline_kind_at_full_load() {
        let name_of = |rows: &[Row]| headline(rows).map(|r| r.name.clone());
        let rows = vec![
            row("msg", Kind::Msg, 10, 1.0),
            row("saga-wait@half", Kind::SagaWait, 10, 1.0),
            row("saga-wait", Kind::SagaWait, 10, 1.0),
            row("baseline", Kind::Baseline, 10, 1.0),
        ];
        assert_eq!(name_of(&rows).as_deref(), Some("saga-wait"));
        // a paced run has only paced rows
        let rows = vec![
            row("saga-wait@900/s", Kind::SagaWait, 10, 1.0),
            row("baseline", Kind::Baseline, 10, 1.0),
        ];
        assert_eq!(name_of(&rows).as_deref(), Some("saga-wait@900/s"));
        let rows = vec![
            row("tcc", Kind::Tcc, 10, 1.0),
            row("msg", Kind::Msg, 10, 1.0),
        ];
        assert_eq!(name_of(&rows).as_deref(), Some("tcc"));
        assert!(headline(&[row("baseline", Kind::Baseline, 10, 1.0)]).is_none());
    }
}
