//! `dtm-bench`: measure dtm-rs against the limit set by its own branches.
//!
//! See `dtm-bench --help` and bench/README.md.

mod args;
mod load;
mod procfs;
mod report;
mod server;
mod sim;
mod stats;
mod verify;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use args::{Args, Rate, Scenario};
use load::{Kind, Limit, Target};
use report::Row;
use server::{Launch, ServerUnderTest};
use sim::{Answer, Sim};

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let args = match args::parse(&argv) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("dtm-bench: {e}");
            std::process::exit(2);
        }
    };
    if args.help {
        println!("{}", args::USAGE);
        return;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("dtm-bench: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = match rt.block_on(run(args)) {
        Ok(true) => 0,
        Ok(false) => 1,
        Err(e) => {
            eprintln!("dtm-bench: {e:#}");
            1
        }
    };
    rt.shutdown_timeout(Duration::from_secs(1));
    std::process::exit(code);
}

fn run_id() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!("r{}p{}", secs % 1_000_000, std::process::id())
}

/// Run everything; Ok(false) when the run does not pass its own checks.
async fn run(args: Args) -> anyhow::Result<bool> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(args.concurrency + 64)
        .pool_idle_timeout(Duration::from_secs(90))
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(60))
        .build()
        .context("building the HTTP client")?;
    let sim = Sim::start()
        .await
        .context("starting the branch simulator")?;
    let id = run_id();
    let server = match &args.server {
        Some(url) => ServerUnderTest::existing(url, args.server_pid.clone(), &http).await?,
        None => {
            let mut env = Vec::new();
            if args.scenario == Scenario::Recovery {
                env.extend([
                    ("RETRY_INTERVAL".to_string(), "1".to_string()),
                    (
                        "RETRY_MAX_INTERVAL".to_string(),
                        args.max_backoff.to_string(),
                    ),
                    ("TRANS_CRON_INTERVAL".to_string(), "1".to_string()),
                ]);
            }
            env.extend(args.env.iter().cloned());
            let launch = Launch {
                bin: server::find_dtm(args.dtm.as_deref())?,
                store: args.store.clone(),
                sync: args.sync.clone(),
                log_level: args.log_level.clone(),
                env,
                fresh_db: args.fresh_db,
                keep: args.keep_data,
                run_id: id.clone(),
            };
            ServerUnderTest::start(&launch, &http).await?
        }
    };
    let target = Arc::new(Target {
        http: http.clone(),
        api: server.api.clone(),
        busi: sim.base.clone(),
        run_id: id,
    });
    eprintln!(
        "dtm-bench: server {} (pid {}), store {}{}, branches {}, concurrency {}",
        server.api,
        server.pid.as_deref().unwrap_or("?"),
        args.store,
        if args.store == "sqlite" {
            format!(" synchronous={}", args.sync)
        } else {
            String::new()
        },
        sim.base,
        args.concurrency
    );
    let result = match args.scenario {
        Scenario::Throughput => throughput(&args, &target, &server).await,
        Scenario::Recovery => recovery(&args, &target, &server, &sim).await,
    };
    if result.is_err()
        && let Some(l) = &server.log
    {
        eprintln!(
            "dtm-bench: server log ({}):\n{}",
            l.display(),
            server::log_tail(l)
        );
    }
    server.stop();
    result
}

fn limit_of(args: &Args, secs: f64) -> Limit {
    match args.count {
        Some(n) => Limit::Count(n),
        None => Limit::Time(Duration::from_secs_f64(secs)),
    }
}

/// What the slices of one measured phase add up to.
#[derive(Default)]
struct Acc {
    out: load::PhaseOut,
    /// None before the first slice
    delta: Option<procfs::Delta>,
    /// each slice's transactions per second
    slice_tps: Vec<f64>,
}

/// One stretch of load: what runs, how long, how many workers, at what pace.
struct Phase<'a> {
    kind: Kind,
    /// makes the gids of this stretch distinct from every other's
    tag: &'a str,
    limit: Limit,
    concurrency: usize,
    rate: Option<f64>,
}

impl Acc {
    /// Run one slice and add it.
    async fn slice(
        &mut self,
        target: &Arc<Target>,
        server: &ServerUnderTest,
        p: &Phase<'_>,
    ) -> anyhow::Result<()> {
        let pid = server.pid.as_deref();
        let a = procfs::Snap::take(pid);
        let out = load::run_phase(
            Arc::clone(target),
            p.kind,
            p.tag,
            p.limit,
            p.concurrency,
            p.rate,
        )
        .await?;
        let b = procfs::Snap::take(pid);
        let d = procfs::Delta::between(&a, &b);
        self.delta = Some(match self.delta {
            Some(sum) => sum.add(&d),
            None => d,
        });
        self.slice_tps.push(stats::ratio(out.ok as f64, out.wall));
        let o = &mut self.out;
        o.lat_us.extend(out.lat_us);
        o.ok += out.ok;
        o.errors += out.errors;
        o.wall += out.wall;
        o.gids.extend(out.gids);
        for e in out.error_samples {
            if o.error_samples.len() < 5 {
                o.error_samples.push(e);
            }
        }
        Ok(())
    }

    /// The table row, and the gids started.
    fn into_row(
        mut self,
        server: &ServerUnderTest,
        kind: Kind,
        tag: &str,
        rate: Option<f64>,
    ) -> (Row, Vec<String>) {
        let out = &mut self.out;
        let cpu = self.delta.unwrap_or_default().cpu(out.wall);
        let lat = stats::summarize(&mut out.lat_us);
        let rss = server.pid.as_deref().and_then(procfs::rss);
        let name = match (tag, rate) {
            ("half", _) => format!("{}@half", kind.name()),
            (_, Some(r)) => format!("{}@{r:.0}/s", kind.name()),
            _ => kind.name().to_string(),
        };
        for e in &out.error_samples {
            eprintln!("dtm-bench: {name}: error: {e}");
        }
        (
            Row {
                name,
                kind,
                ok: out.ok,
                errors: out.errors,
                wall: out.wall,
                lat,
                cpu,
                rss,
                settle: None,
                verify: None,
                slice_tps: std::mem::take(&mut self.slice_tps),
            },
            std::mem::take(&mut out.gids),
        )
    }
}

/// One measured phase with CPU and memory around it.
async fn measured(
    target: &Arc<Target>,
    server: &ServerUnderTest,
    p: Phase<'_>,
) -> anyhow::Result<(Row, Vec<String>)> {
    let mut acc = Acc::default();
    acc.slice(target, server, &p).await?;
    Ok(acc.into_row(server, p.kind, p.tag, p.rate))
}

/// Measure `kind` and the baseline in alternating slices, so that a change in the
/// machine's speed during the run (this VM's CPU can change by half between minutes)
/// moves both and leaves R alone. Returns (mode row, baseline row, mode gids).
async fn interleaved(
    args: &Args,
    target: &Arc<Target>,
    server: &ServerUnderTest,
    kind: Kind,
) -> anyhow::Result<(Row, Row, Vec<String>)> {
    let n = args.slices.max(1);
    let c = args.concurrency;
    let mode_slice = Duration::from_secs_f64(args.seconds / f64::from(n));
    let base_slice =
        Duration::from_secs_f64(args.baseline_seconds.unwrap_or(args.seconds) / f64::from(n));
    eprintln!(
        "dtm-bench: {} and baseline: measuring in {n} alternating slices of {:.1}s and {:.1}s",
        kind.name(),
        mode_slice.as_secs_f64(),
        base_slice.as_secs_f64()
    );
    let mut mode = Acc::default();
    let mut base = Acc::default();
    for i in 0..n {
        // each slice's gids are distinct from every other phase's
        let tag = format!("m{i}");
        let phase = |kind, limit| Phase {
            kind,
            tag: &tag,
            limit,
            concurrency: c,
            rate: None,
        };
        mode.slice(target, server, &phase(kind, Limit::Time(mode_slice)))
            .await?;
        base.slice(
            target,
            server,
            &phase(Kind::Baseline, Limit::Time(base_slice)),
        )
        .await?;
        let (m, b) = (
            mode.slice_tps.last().copied().unwrap_or(0.0),
            base.slice_tps.last().copied().unwrap_or(0.0),
        );
        eprintln!(
            "dtm-bench: slice {}: {} {m:.0}/s, baseline {b:.0} pairs/s, R {:.3}",
            i + 1,
            kind.name(),
            stats::ratio(m, b)
        );
    }
    let (mrow, gids) = mode.into_row(server, kind, "m", None);
    let (brow, _) = base.into_row(server, Kind::Baseline, "m", None);
    Ok((mrow, brow, gids))
}

async fn warm_up_baseline(args: &Args, target: &Arc<Target>) -> anyhow::Result<()> {
    if args.warmup > 0.0 {
        load::run_phase(
            Arc::clone(target),
            Kind::Baseline,
            "w",
            Limit::Time(Duration::from_secs_f64(args.warmup.min(2.0))),
            args.concurrency,
            None,
        )
        .await?;
    }
    Ok(())
}

async fn throughput(
    args: &Args,
    target: &Arc<Target>,
    server: &ServerUnderTest,
) -> anyhow::Result<bool> {
    let mut rows: Vec<Row> = Vec::new();
    let mut all_ok = true;
    let c = args.concurrency;
    let mut baseline_row: Option<Row> = None;
    let headline_kind = report::headline_kind(&args.modes);
    for &kind in &args.modes {
        let mut gids = Vec::new();
        if args.warmup > 0.0 {
            eprintln!("dtm-bench: {}: warm-up {}s", kind.name(), args.warmup);
            let w = load::run_phase(
                Arc::clone(target),
                kind,
                "w",
                Limit::Time(Duration::from_secs_f64(args.warmup)),
                c,
                None,
            )
            .await?;
            if w.errors > 0 {
                eprintln!(
                    "dtm-bench: {}: {} errors during warm-up, e.g. {}",
                    kind.name(),
                    w.errors,
                    w.error_samples.first().map(String::as_str).unwrap_or("")
                );
            }
            gids.extend(w.gids);
        }
        let fixed = match args.rate {
            Some(Rate::Fixed(r)) => Some(r),
            _ => None,
        };
        // R compares the headline mode with the baseline: take both in alternating
        // slices, where a slice ends with nothing of the mode left running in the server
        let slice_it = Some(kind) == headline_kind
            && args.baseline
            && args.slices > 1
            && args.count.is_none()
            && args.rate.is_none()
            && !kind.is_async();
        let row = if slice_it {
            warm_up_baseline(args, target).await?;
            let (row, brow, g) = interleaved(args, target, server, kind).await?;
            gids.extend(g);
            baseline_row = Some(brow);
            row
        } else {
            eprintln!(
                "dtm-bench: {}: measuring{}",
                kind.name(),
                match args.count {
                    Some(n) => format!(" {n} transactions"),
                    None => format!(" {}s", args.seconds),
                }
            );
            let (row, g) = measured(
                target,
                server,
                Phase {
                    kind,
                    tag: "m",
                    limit: limit_of(args, args.seconds),
                    concurrency: c,
                    rate: fixed,
                },
            )
            .await?;
            gids.extend(g);
            row
        };
        let full_tps = row.tps();
        let mut mode_rows = vec![row];
        if args.rate == Some(Rate::Half) && full_tps > 0.0 {
            let r = full_tps / 2.0;
            // the pacer needs enough workers to keep up when latency spikes
            eprintln!(
                "dtm-bench: {}: measuring at half load, {r:.0}/s",
                kind.name()
            );
            let (row, g) = measured(
                target,
                server,
                Phase {
                    kind,
                    tag: "half",
                    limit: limit_of(args, args.seconds),
                    concurrency: c.max(16),
                    rate: Some(r),
                },
            )
            .await?;
            gids.extend(g);
            mode_rows.push(row);
        }
        let total = gids.len();
        eprintln!("dtm-bench: {}: checking {total} transactions", kind.name());
        let v = verify::verify(
            &target.http,
            &target.api,
            gids,
            c,
            Duration::from_secs_f64(args.verify_timeout),
        )
        .await;
        if !v.ok() {
            all_ok = false;
            eprintln!(
                "dtm-bench: {}: CHECK FAILED: {} succeed, {} in another status, {} unfinished after {:.0}s, {} query errors; e.g. {}",
                kind.name(),
                v.succeeded,
                v.wrong,
                v.unfinished,
                args.verify_timeout,
                v.query_errors,
                v.samples.join("; ")
            );
        }
        for r in &mut mode_rows {
            if kind.is_async() {
                r.settle = Some(v.settle_secs);
            }
        }
        mode_rows[0].verify = Some(v);
        rows.extend(mode_rows);
    }
    if args.baseline && baseline_row.is_none() {
        let secs = args.baseline_seconds.unwrap_or(args.seconds);
        eprintln!("dtm-bench: baseline: the two branch handlers called directly");
        warm_up_baseline(args, target).await?;
        let (row, _) = measured(
            target,
            server,
            Phase {
                kind: Kind::Baseline,
                tag: "m",
                limit: limit_of(args, secs),
                concurrency: c,
                rate: None,
            },
        )
        .await?;
        baseline_row = Some(row);
    }
    rows.extend(baseline_row);
    let errors: u64 = rows.iter().map(|r| r.errors).sum();
    if errors > 0 && !args.allow_errors {
        all_ok = false;
    }
    println!("{}", report::table(&rows, args));
    if args.json {
        println!("{}", report::throughput_json(&rows, args, all_ok));
    }
    Ok(all_ok)
}

/// `/all?status=submitted&limit=1` is empty: nothing left to drain (None: cannot tell).
async fn none_submitted(http: &reqwest::Client, api: &str) -> Option<bool> {
    let r = http
        .get(format!("{api}/all?status=submitted&limit=1"))
        .send()
        .await
        .ok()?;
    if !r.status().is_success() {
        return None;
    }
    let text = r.text().await.ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    Some(
        v.get("transactions")
            .and_then(|t| t.as_array())
            .is_none_or(|a| a.is_empty()),
    )
}

async fn recovery(
    args: &Args,
    target: &Arc<Target>,
    server: &ServerUnderTest,
    sim: &Sim,
) -> anyhow::Result<bool> {
    let n = args.recovery_count;
    let c = args.concurrency;
    let outage = if args.outage_ongoing {
        Answer::Ongoing
    } else {
        Answer::Error
    };
    sim.set_answer(outage);
    eprintln!(
        "dtm-bench: recovery: branch outage ({}); submitting {n} sagas without wait_result",
        if args.outage_ongoing {
            "200 ONGOING"
        } else {
            "500"
        }
    );
    let sub = load::run_phase(
        Arc::clone(target),
        Kind::Saga,
        "rec",
        Limit::Count(n),
        c,
        None,
    )
    .await?;
    for e in &sub.error_samples {
        eprintln!("dtm-bench: recovery: submit error: {e}");
    }
    let submit_rate = sub.ok as f64 / sub.wall.max(1e-9);
    eprintln!(
        "dtm-bench: recovery: {} submitted in {:.1}s ({submit_rate:.0}/s), {} errors",
        sub.ok, sub.wall, sub.errors
    );
    // every transaction must have failed at least once, so that all are left due
    let wait_start = Instant::now();
    let bound = Duration::from_secs_f64(args.drain_timeout);
    let mut last_print = Instant::now();
    while (sim.failed_gids() as u64) < sub.ok {
        if wait_start.elapsed() > bound {
            anyhow::bail!(
                "only {} of {} transactions reached the failing branch within {:.0}s",
                sim.failed_gids(),
                sub.ok,
                args.drain_timeout
            );
        }
        if last_print.elapsed() > Duration::from_secs(5) {
            eprintln!(
                "dtm-bench: recovery: {} of {} transactions have hit the outage",
                sim.failed_gids(),
                sub.ok
            );
            last_print = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "dtm-bench: recovery: all {} have failed at least once; outage goes on {}s",
        sub.ok, args.outage_seconds
    );
    tokio::time::sleep(Duration::from_secs_f64(args.outage_seconds)).await;
    let outage_calls = sim.calls();
    let pid = server.pid.as_deref();
    let done_before = sim.last_step_ok();
    sim.clear_failed_gids();
    let snap_a = procfs::Snap::take(pid);
    sim.set_answer(Answer::Success);
    let t0 = Instant::now();
    eprintln!("dtm-bench: recovery: branch is back; waiting for the drain");
    let mut last_print = Instant::now();
    let drained = loop {
        let finished = sim.last_step_ok().saturating_sub(done_before);
        if finished >= sub.ok {
            // the branches are done; the final status write follows
            match none_submitted(&target.http, &target.api).await {
                Some(true) | None => break true,
                Some(false) => {}
            }
        }
        if t0.elapsed() > bound {
            break false;
        }
        if last_print.elapsed() > Duration::from_secs(5) {
            eprintln!(
                "dtm-bench: recovery: {finished} of {} done after {:.0}s",
                sub.ok,
                t0.elapsed().as_secs_f64()
            );
            last_print = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let drain = t0.elapsed().as_secs_f64();
    let snap_b = procfs::Snap::take(pid);
    let cpu = procfs::cpu_between(&snap_a, &snap_b, drain);
    let rss = pid.and_then(procfs::rss);
    eprintln!(
        "dtm-bench: recovery: checking {} transactions",
        sub.gids.len()
    );
    let v = verify::verify(
        &target.http,
        &target.api,
        sub.gids,
        c,
        Duration::from_secs_f64(args.verify_timeout),
    )
    .await;
    let mut ok = drained && v.ok();
    if sub.errors > 0 && !args.allow_errors {
        ok = false;
    }
    if !v.ok() {
        eprintln!(
            "dtm-bench: recovery: CHECK FAILED: {} succeed, {} wrong, {} unfinished, {} query errors; e.g. {}",
            v.succeeded,
            v.wrong,
            v.unfinished,
            v.query_errors,
            v.samples.join("; ")
        );
    }
    let r = report::Recovery {
        count: sub.ok,
        submit_errors: sub.errors,
        submit_rate,
        outage_calls,
        drained,
        drain_secs: drain,
        cpu,
        rss,
        verify: v,
    };
    println!("{}", report::recovery_table(&r, args));
    if args.json {
        println!("{}", report::recovery_json(&r, args, ok));
    }
    Ok(ok)
}
