//! The bench end to end against the debug `dtm` binary: a short sliced run must verify
//! every transaction it started and report R from both halves of the slices.

use std::path::PathBuf;
use std::process::Command;

/// The `dtm` binary next to the bench's (the workspace's `cargo test` and
/// `scripts/test.sh` build it; `cargo test -p dtm-bench` alone does not).
fn dtm_bin() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_BIN_EXE_dtm-bench")).with_file_name("dtm");
    assert!(
        p.is_file(),
        "{} not found: build the server first (cargo build -p dtm-server)",
        p.display()
    );
    p
}

/// Run the bench (which starts its own server on the embedded store, whatever
/// DTM_TEST_STORE says) with `args` plus `--json --dtm <debug dtm>`: (stdout, stderr,
/// the JSON line), after checking that it exited 0.
fn bench(args: &[&str]) -> (String, String, serde_json::Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_dtm-bench"))
        .args(args)
        .args(["--json", "--dtm"])
        .arg(dtm_bin())
        .output()
        .unwrap_or_else(|e| panic!("running dtm-bench: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let last = stdout.lines().last().unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("no JSON on the last line ({e}):\n{stdout}"));
    (stdout, stderr, v)
}

#[test]
fn sliced_run_verifies_and_reports_both_sides() {
    let args = [
        "--seconds",
        "1.2",
        "--warmup",
        "0.2",
        "--slices",
        "3",
        "-c",
        "4",
    ];
    let (stdout, stderr, v) = bench(&args);
    assert!(
        stderr.contains("measuring in 3 alternating slices of 0.4s and 0.4s"),
        "{stderr}"
    );
    assert!(
        stdout.contains("(both measured in 3 alternating slices"),
        "{stdout}"
    );
    let last = v.to_string();
    assert_eq!(v["slices"], 3, "{last}");
    let per_slice = v["slice_ratios"].as_array().cloned().unwrap_or_default();
    assert_eq!(per_slice.len(), 3, "{last}");
    assert!(
        per_slice.iter().all(|r| r.as_f64().unwrap_or(0.0) > 0.0),
        "{last}"
    );
    assert_eq!(v["ok"], true, "{last}");
    assert_eq!(v["errors"], 0, "{last}");
    let sagas = v["sagas_per_sec"].as_f64().unwrap_or(0.0);
    let base = v["baseline_pairs_per_sec"].as_f64().unwrap_or(0.0);
    assert!(sagas > 0.0 && base > 0.0, "{last}");
    let r = v["ratio"].as_f64().unwrap_or(0.0);
    assert!((r - sagas / base).abs() < 0.01, "{last}");
    // every transaction of the three slices (and the warm-up) was checked final
    let verified = v["verified"].as_u64().unwrap_or(0);
    assert_eq!(Some(verified), v["verify_checked"].as_u64(), "{last}");
    assert!(verified as f64 >= sagas * 1.2 * 0.9, "{last}");
}

#[test]
fn one_slice_keeps_the_old_order() {
    let args = [
        "--seconds",
        "0.5",
        "--warmup",
        "0",
        "--slices",
        "1",
        "-c",
        "2",
    ];
    let (stdout, stderr, v) = bench(&args);
    assert!(stderr.contains("saga-wait: measuring 0.5s"), "{stderr}");
    assert!(!stdout.contains("alternating"), "{stdout}");
    let last = v.to_string();
    assert_eq!(v["slices"], 1, "{last}");
    assert!(v.get("slice_ratios").is_none(), "{last}");
    assert_eq!(v["ok"], true, "{last}");
}

/// A store that cannot be reached ends the run after the server's third try to open it,
/// with a message that says so, instead of three starts of a server that keeps retrying
/// (a minute each, then only "did not answer /api/ping").
#[test]
fn unreachable_store_fails_fast_and_says_why() {
    // nothing listens on port 1
    let run = |store: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_dtm-bench"))
            .args(["--store", store, "--seconds", "1", "--no-baseline", "--dtm"])
            .arg(dtm_bin())
            .env("STORE_HOST", "127.0.0.1")
            .env("STORE_PORT", "1")
            .output()
            .unwrap_or_else(|e| panic!("running dtm-bench: {e}"));
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "{stderr}");
        assert!(
            stderr.contains("the server cannot reach its store"),
            "{stderr}"
        );
        stderr
    };
    let pg = run("postgres");
    assert!(pg.contains("cannot connect to database"), "{pg}");
    // Redis is opened without a connection; the server then waits for its first ping
    let redis = run("redis");
    assert!(
        redis.contains("cannot reach Redis at 127.0.0.1:1"),
        "{redis}"
    );
}
