//! Command line.

use std::path::PathBuf;

use crate::load::Kind;

pub const USAGE: &str = "\
Usage: dtm-bench [options]

Starts a branch simulator (trivial SUCCESS handlers) and a dtm-rs server (the `dtm`
binary, in its own process, with a fresh store), runs the load, measures the baseline
(the same load generator calling the two branch handlers directly, no coordinator),
checks that every transaction it started ended `succeed`, and prints a table.
With no options: embedded store (sqlite, synchronous=full), 2-step sagas with
wait_result, 20 s, concurrency 64.

Load:
  --mode M[,M..]      saga-wait | saga | msg | tcc | all          (default saga-wait)
  --seconds S         measured time per mode                       (default 20)
  --count N           run N transactions per mode instead of a time
  --concurrency N     concurrent workers                           (default 64)
  --rate R|half       pace to R transactions/s in total (open loop; latency counted
                      from the scheduled start). `half`: first run at full load, then
                      again at half the throughput measured, and report both
  --warmup S          unmeasured warm-up per mode                  (default 2)
  --no-baseline       skip the baseline
  --baseline-seconds S  length of the baseline                     (default: --seconds)
  --slices N          measure the first mode and the baseline in N alternating slices
                      (mode, baseline, mode, ...), so that R compares the two under the
                      same machine state; 1 = the whole mode, then the whole baseline.
                      Used for saga-wait and tcc with a time limit and no --rate; other
                      cases measure the baseline after the modes    (default 5)

Server:
  --store NAME        sqlite | postgres | mysql | redis           (default sqlite)
                      connection values come from STORE_HOST, STORE_PORT, STORE_USER,
                      STORE_PASSWORD, ... in the environment, passed through to the server.
                      redis with neither STORE_HOST nor STORE_PORT set: a redis-server of
                      its own for the run, appendonly yes, appendfsync always (durable)
  --sync full|normal  sqlite durability (STORE_SYNCHRONOUS)        (default full)
  --env K=V           extra environment for the server (repeatable)
  --no-fresh-db       postgres/mysql/redis: use STORE_DB / STORE_REDIS_PREFIX as given
                      instead of a database (or key prefix) made for this run
  --dtm PATH          server binary (default: $DTM_BIN, else `dtm` next to dtm-bench)
  --server URL        use a running server instead (e.g. http://127.0.0.1:36789); its
                      branch calls must reach this machine's loopback
  --server-pid PID    with --server: the pid to read CPU and RSS from
  --log-level L       server LOG_LEVEL                             (default warn)
  --keep-data         keep the data directory / database after the run

Scenarios:
  --scenario throughput   the load above (default)
  --scenario recovery     branch outage: N sagas (no wait_result) are submitted while
                          every branch answers 500 (or ONGOING), the outage goes on for
                          --outage-seconds after all have failed once, then the branch
                          recovers and the time until all are `succeed` is measured
  --recovery-count N      transactions left due by the outage      (default 20000)
  --outage ongoing|error  how the branch fails                     (default error)
  --outage-seconds S      outage length after the last first attempt (default 10)
  --max-backoff S         server RETRY_MAX_INTERVAL in the recovery scenario (default 5)
  --drain-timeout S       give up waiting for the drain after S    (default 600)

Checks and output:
  --verify-timeout S  how long asynchronous transactions may take to finish (default 120)
  --allow-errors      do not fail the run because some requests failed
  --json              also print one JSON object on the last line
  -h, --help          this help

Exit status: 0 when every transaction checked is `succeed` and no request failed;
1 otherwise; 2 for bad options.";

#[derive(Debug, Clone, PartialEq)]
pub enum Rate {
    Fixed(f64),
    Half,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    Throughput,
    Recovery,
}

#[derive(Debug, Clone)]
pub struct Args {
    pub modes: Vec<Kind>,
    pub seconds: f64,
    pub count: Option<u64>,
    pub concurrency: usize,
    pub rate: Option<Rate>,
    pub warmup: f64,
    pub baseline: bool,
    pub baseline_seconds: Option<f64>,
    pub slices: u32,
    pub store: String,
    pub sync: String,
    pub env: Vec<(String, String)>,
    pub fresh_db: bool,
    pub dtm: Option<PathBuf>,
    pub server: Option<String>,
    pub server_pid: Option<String>,
    pub log_level: String,
    pub keep_data: bool,
    pub scenario: Scenario,
    pub recovery_count: u64,
    pub outage_ongoing: bool,
    pub outage_seconds: f64,
    pub max_backoff: u64,
    pub drain_timeout: f64,
    pub verify_timeout: f64,
    pub allow_errors: bool,
    pub json: bool,
    pub help: bool,
}

impl Default for Args {
    fn default() -> Self {
        Args {
            modes: vec![Kind::SagaWait],
            seconds: 20.0,
            count: None,
            concurrency: 64,
            rate: None,
            warmup: 2.0,
            baseline: true,
            baseline_seconds: None,
            slices: 5,
            store: "sqlite".into(),
            sync: "full".into(),
            env: vec![],
            fresh_db: true,
            dtm: None,
            server: None,
            server_pid: None,
            log_level: "warn".into(),
            keep_data: false,
            scenario: Scenario::Throughput,
            recovery_count: 20_000,
            outage_ongoing: false,
            outage_seconds: 10.0,
            max_backoff: 5,
            drain_timeout: 600.0,
            verify_timeout: 120.0,
            allow_errors: false,
            json: false,
            help: false,
        }
    }
}

fn num<T: std::str::FromStr>(k: &str, v: &str) -> Result<T, String> {
    v.parse::<T>()
        .map_err(|_| format!("{k} needs a number, got '{v}'"))
}

fn pos_f(k: &str, v: &str) -> Result<f64, String> {
    let x: f64 = num(k, v)?;
    if !x.is_finite() || x < 0.0 {
        return Err(format!("{k} needs a non-negative number, got '{v}'"));
    }
    Ok(x)
}

pub fn parse(argv: &[String]) -> Result<Args, String> {
    let mut a = Args::default();
    let mut i = 0;
    while i < argv.len() {
        let raw = argv[i].as_str();
        i += 1;
        let (key, inline) = match raw.split_once('=') {
            Some((k, v)) if k.starts_with("--") => (k, Some(v.to_string())),
            _ => (raw, None),
        };
        let flag = |a: &mut Args| -> Result<bool, String> {
            match key {
                "--json" => a.json = true,
                "--no-baseline" => a.baseline = false,
                "--no-fresh-db" => a.fresh_db = false,
                "--keep-data" => a.keep_data = true,
                "--allow-errors" => a.allow_errors = true,
                "-h" | "--help" => a.help = true,
                _ => return Ok(false),
            }
            if inline.is_some() {
                return Err(format!("{key} takes no value"));
            }
            Ok(true)
        };
        if flag(&mut a)? {
            continue;
        }
        let val = match inline {
            Some(v) => v,
            None => {
                let v = argv
                    .get(i)
                    .ok_or_else(|| format!("{key} needs a value (see --help)"))?;
                i += 1;
                v.clone()
            }
        };
        match key {
            "--mode" | "--modes" => {
                let mut modes = Vec::new();
                for m in val.split(',').map(str::trim).filter(|m| !m.is_empty()) {
                    if m == "all" {
                        modes.extend([Kind::SagaWait, Kind::Saga, Kind::Msg, Kind::Tcc]);
                    } else {
                        modes.push(Kind::parse(m).ok_or_else(|| {
                            format!("unknown mode '{m}': use saga-wait, saga, msg, tcc or all")
                        })?);
                    }
                }
                if modes.is_empty() {
                    return Err("--mode needs at least one mode".into());
                }
                modes.dedup();
                a.modes = modes;
            }
            "--seconds" | "-t" => a.seconds = pos_f(key, &val)?,
            "--count" | "-n" => a.count = Some(num(key, &val)?),
            "--concurrency" | "-c" => {
                a.concurrency = num(key, &val)?;
                if a.concurrency == 0 || a.concurrency > 10_000 {
                    return Err(format!("--concurrency must be 1..10000, got {val}"));
                }
            }
            "--rate" => {
                a.rate = Some(if val == "half" {
                    Rate::Half
                } else {
                    let r = pos_f(key, &val)?;
                    if r == 0.0 {
                        return Err("--rate must be above 0".into());
                    }
                    Rate::Fixed(r)
                })
            }
            "--warmup" => a.warmup = pos_f(key, &val)?,
            "--baseline-seconds" => a.baseline_seconds = Some(pos_f(key, &val)?),
            "--slices" => {
                a.slices = num(key, &val)?;
                if a.slices == 0 || a.slices > 1000 {
                    return Err(format!("--slices must be 1..1000, got {val}"));
                }
            }
            "--store" => {
                let s = val.to_ascii_lowercase();
                if !["sqlite", "boltdb", "postgres", "mysql", "redis"].contains(&s.as_str()) {
                    return Err(format!(
                        "unknown store '{val}': use sqlite, postgres, mysql or redis"
                    ));
                }
                a.store = if s == "boltdb" { "sqlite".into() } else { s };
            }
            "--sync" => {
                let s = val.to_ascii_lowercase();
                if s != "full" && s != "normal" {
                    return Err(format!("--sync must be full or normal, got '{val}'"));
                }
                a.sync = s;
            }
            "--env" => {
                let (k, v) = val
                    .split_once('=')
                    .ok_or_else(|| format!("--env needs KEY=VALUE, got '{val}'"))?;
                a.env.push((k.to_string(), v.to_string()));
            }
            "--dtm" => a.dtm = Some(PathBuf::from(val)),
            "--server" => a.server = Some(val),
            "--server-pid" => {
                let _: u32 = num(key, &val)?;
                a.server_pid = Some(val);
            }
            "--log-level" => a.log_level = val,
            "--scenario" => {
                a.scenario = match val.as_str() {
                    "throughput" => Scenario::Throughput,
                    "recovery" => Scenario::Recovery,
                    _ => {
                        return Err(format!(
                            "unknown scenario '{val}': use throughput or recovery"
                        ));
                    }
                }
            }
            "--recovery-count" => a.recovery_count = num(key, &val)?,
            "--outage" => {
                a.outage_ongoing = match val.as_str() {
                    "ongoing" => true,
                    "error" | "500" => false,
                    _ => return Err(format!("--outage must be error or ongoing, got '{val}'")),
                }
            }
            "--outage-seconds" => a.outage_seconds = pos_f(key, &val)?,
            "--max-backoff" => {
                a.max_backoff = num(key, &val)?;
                if a.max_backoff == 0 {
                    return Err("--max-backoff must be at least 1".into());
                }
            }
            "--drain-timeout" => a.drain_timeout = pos_f(key, &val)?,
            "--verify-timeout" => a.verify_timeout = pos_f(key, &val)?,
            other => return Err(format!("unknown option '{other}' (see --help)")),
        }
    }
    if a.count.is_none() && a.seconds <= 0.0 {
        return Err("--seconds must be above 0 (or give --count)".into());
    }
    if a.count == Some(0) {
        return Err("--count must be above 0".into());
    }
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<Args, String> {
        let v: Vec<String> = s.split_whitespace().map(str::to_string).collect();
        parse(&v)
    }

    #[test]
    fn defaults_are_the_headline_case() {
        let a = p("").unwrap_or_default();
        assert_eq!(a.modes, vec![Kind::SagaWait]);
        assert_eq!(a.store, "sqlite");
        assert_eq!(a.sync, "full");
        assert_eq!(a.seconds, 20.0);
        assert!(a.baseline && !a.json);
        assert_eq!(a.scenario, Scenario::Throughput);
        assert_eq!(a.slices, 5);
        assert_eq!(p("--slices 1").unwrap_or_default().slices, 1);
    }

    #[test]
    fn options() {
        let a = p("--mode all --store=redis -c 8 --json --rate half --env A=b=c --count 10")
            .unwrap_or_default();
        assert_eq!(a.modes.len(), 4);
        assert_eq!(a.store, "redis");
        assert_eq!(a.concurrency, 8);
        assert!(a.json);
        assert_eq!(a.rate, Some(Rate::Half));
        assert_eq!(a.env, vec![("A".to_string(), "b=c".to_string())]);
        assert_eq!(a.count, Some(10));
        let a = p("--scenario recovery --outage ongoing --recovery-count 100").unwrap_or_default();
        assert_eq!(a.scenario, Scenario::Recovery);
        assert!(a.outage_ongoing);
        assert_eq!(a.recovery_count, 100);
    }

    #[test]
    fn bad_options_are_named() {
        for (s, want) in [
            ("--mode xa", "xa"),
            ("--store oracle", "oracle"),
            ("--concurrency 0", "concurrency"),
            ("--seconds", "needs a value"),
            ("--json=1", "takes no value"),
            ("--frobnicate", "frobnicate"),
            ("--rate 0", "rate"),
            ("--sync off", "sync"),
            ("--slices 0", "slices"),
        ] {
            let e = p(s).err().unwrap_or_default();
            assert!(e.contains(want), "{s}: {e}");
        }
    }
}
