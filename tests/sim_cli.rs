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
