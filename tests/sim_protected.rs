//! With blkshim's protection on, no seed of any scenario breaks the promise.
//!
//! The big run is 20,000 seeds (override with BLKSHIM_SIM_SEEDS), spread
//! over the machine's cores; a seed costs a few milliseconds even in a
//! debug build. The same run in release: `blkshim sim --seeds 20000`.

mod sim_parallel;

use blkshim::sim::{
    replay_command, run_one, run_seeds, Deployment, Kind, Protection, Scenario, Summary,
};

fn seeds() -> u64 {
    std::env::var("BLKSHIM_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000)
}

/// Run seeds `0..n` over all scenarios on every core.
fn run_parallel(n: u64, p: Protection) -> Summary {
    sim_parallel::run_parallel(n, &Scenario::all(), |first, count, sc| {
        run_seeds(first, count, sc, p)
    })
}

#[test]
fn no_violation_in_twenty_thousand_seeds() {
    let n = seeds();
    let s = run_parallel(n, Protection::On);
    let t = s.total();
    assert_eq!(t.seeds, n);
    for f in s.failures.iter().take(5) {
        eprintln!(
            "seed {} {}: {:?}\n  replay: {}",
            f.seed,
            f.scenario,
            f.violations.first(),
            replay_command(f.seed, f.scenario, Protection::On, Default::default())
        );
    }
    assert_eq!(t.violations, 0, "{} failing seeds", s.failures.len());
    // No older writer's data (guest, stale node or zombie; write, trim or
    // write-zeroes) landed after newer data, anywhere.
    assert_eq!(t.stale_landings, 0);
    // Not vacuous: the dangerous situations really happened.
    for (sc, r) in &s.rows {
        assert!(
            r.seeds > 0 && r.requests > 0 && r.migrations > 0,
            "{sc}: {r:?}"
        );
        assert!(r.stale_refused > 0, "{sc}: no stale write was ever stopped");
        assert_eq!(
            r.storage_ignored, 0,
            "{sc}: overlapping writes met at the storage"
        );
        match sc.kind {
            Kind::Failover => {}
            _ => assert!(r.replays > 0, "{sc}: nothing was re-sent"),
        }
        if sc.kind == Kind::CutOffSource {
            assert!(r.drains_timed_out > 0, "{sc}: no drain ever timed out");
        }
        if sc.kind == Kind::StalePromote {
            assert!(r.takeovers_refused >= 3 * r.seeds, "{sc}: {r:?}");
        }
    }
}

#[test]
fn a_seed_replays_exactly() {
    for seed in [0u64, 17, 99, 1234] {
        for sc in Scenario::all() {
            for p in [Protection::On, Protection::Off] {
                let a = run_one(seed, sc, p);
                let b = run_one(seed, sc, p);
                assert_eq!(a, b, "seed {seed} {sc} {p:?} is not reproducible");
            }
        }
    }
}

#[test]
fn stale_promote_is_refused_everywhere() {
    for d in [Deployment::Gateway, Deployment::HostSide] {
        let sc = Scenario {
            kind: Kind::StalePromote,
            deployment: d,
        };
        for seed in 0..50 {
            let r = run_one(seed, sc, Protection::On);
            assert!(
                r.violations.is_empty(),
                "seed {seed} {sc}: {:?}",
                r.violations
            );
            assert_eq!(r.rogue_landed, 0, "seed {seed} {sc}: a stale write landed");
            // Record, epoch store, writer registration (+ storage reservation).
            let expect = if d == Deployment::HostSide { 4 } else { 3 };
            assert_eq!(r.takeovers_refused, expect, "seed {seed} {sc}");
        }
    }
}
