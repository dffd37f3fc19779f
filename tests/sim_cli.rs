//! `blkshim sim` prints a table whose last line is exactly `violations: N`,
//! exits non-zero when N > 0, and prints a replay command that replays.

use std::process::Command;

fn sim(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_blkshim"))
        .arg("sim")
        .args(args)
        .output()
        .expect("run blkshim");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn last_line(s: &str) -> &str {
    s.lines().last().unwrap_or("")
}

#[test]
fn protected_run_reports_zero_violations() {
    let (ok, out) = sim(&["--seeds", "64"]);
    assert!(ok, "{out}");
    assert_eq!(last_line(&out), "violations: 0");
    assert!(out.contains("cut-off-source/host"));
    assert!(out.contains("stale-promote/gateway"));
}

#[test]
fn unprotected_run_fails_and_its_replay_reproduces() {
    let (ok, out) = sim(&[
        "--seeds",
        "32",
        "--unprotected",
        "--scenario",
        "cut-off-source",
    ]);
    assert!(!ok);
    let n: u64 = last_line(&out)
        .strip_prefix("violations: ")
        .and_then(|n| n.parse().ok())
        .expect("last line is `violations: N`");
    assert!(n > 0);
    let replay = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("replay: blkshim sim "))
        .expect("a replay command");
    let args: Vec<&str> = replay.split_whitespace().collect();
    let (ok, again) = sim(&args);
    assert!(!ok);
    assert_ne!(last_line(&again), "violations: 0");
    // The protected run of the same seed and scenario is clean.
    let protected: Vec<&str> = args
        .iter()
        .copied()
        .filter(|a| *a != "--unprotected")
        .collect();
    let (ok, clean) = sim(&protected);
    assert!(ok, "{clean}");
    assert_eq!(last_line(&clean), "violations: 0");
}

#[test]
fn unknown_scenario_is_an_error() {
    let (ok, _) = sim(&["--scenario", "nope"]);
    assert!(!ok);
}

#[test]
fn trace_shows_the_hand_off() {
    let (ok, out) = sim(&["--seed", "7", "--scenario", "stale-promote/host", "--trace"]);
    assert!(ok, "{out}");
    assert!(out.contains("suspended:"), "{out}");
    assert!(out.contains("blkfront reconnects"), "{out}");
    assert!(
        out.contains("stale node: epoch store advanced from 1: refused"),
        "{out}"
    );
    assert_eq!(last_line(&out), "violations: 0");
}

/// `--fence` selects what host-side deployments fence with; the summary
/// names the mode and counts refused takeovers.
#[test]
fn fence_modes_report_zero_violations_and_their_counts() {
    for mode in ["pr", "sanlock", "none"] {
        let (ok, out) = sim(&["--seeds", "90", "--scenario", "host", "--fence", mode]);
        assert!(ok, "{out}");
        assert_eq!(last_line(&out), "violations: 0", "{mode}");
        assert!(
            out.contains(&format!("fence mode (host-side): {mode}")),
            "{out}"
        );
        let refused: u64 = out
            .lines()
            .find_map(|l| l.strip_prefix("refused takeovers: "))
            .and_then(|n| n.parse().ok())
            .expect("a `refused takeovers: N` line");
        assert_eq!(refused > 0, mode == "none", "{mode}: {refused}");
        assert!(out.contains("failover (host-side takeovers"), "{out}");
    }
}

#[test]
fn trace_shows_the_fence_steps() {
    let (ok, out) = sim(&[
        "--seed",
        "0",
        "--scenario",
        "cut-off-source/host",
        "--fence",
        "sanlock",
        "--trace",
    ]);
    assert!(ok, "{out}");
    for step in ["writer KILLED", "watchdog RESETS", "ACQUIRES the lease"] {
        assert!(out.contains(step), "{step}: {out}");
    }
    let (ok, out) = sim(&[
        "--seed",
        "0",
        "--scenario",
        "migrate-takeover/host",
        "--fence",
        "none",
        "--trace",
    ]);
    assert!(ok, "{out}");
    assert!(out.contains("REFUSED"), "{out}");
    assert!(out.contains("refused takeovers: 1"), "{out}");
}

#[test]
fn the_negative_control_still_fails() {
    let (ok, out) = sim(&[
        "--seeds",
        "90",
        "--scenario",
        "host",
        "--no-storage-fencing",
    ]);
    assert!(!ok, "{out}");
    assert_ne!(last_line(&out), "violations: 0");
}
