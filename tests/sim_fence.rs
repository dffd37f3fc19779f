//! Host-side fence modes, modelled as the product runs them
//! (`blkshim sim --fence pr|sanlock|none`): every mode keeps the promise
//! over the host-side scenarios; sanlock waits out host_dead when the holder
//! cannot release; none refuses (and counts) what it cannot make safe. The
//! negative control (`--no-storage-fencing`) is in `sim_unprotected.rs`.
//!
//! The big runs are 20,000 host-side seeds per mode (override with
//! BLKSHIM_SIM_SEEDS), spread over the machine's cores. The same runs in
//! release: `blkshim sim --seeds 20000 --scenario host --fence MODE`.

mod sim_parallel;

use blkshim::sim::{
    replay_command, run_one_with, run_seeds_with, run_traced_with, Deployment, Fencing, Kind,
    Protection, Scenario, Summary,
};
use blkshim::storage::fencing::FenceMode;

fn seeds() -> u64 {
    std::env::var("BLKSHIM_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000)
}

fn host(kind: Kind) -> Scenario {
    Scenario {
        kind,
        deployment: Deployment::HostSide,
    }
}

/// Run seeds `0..n` over the host-side scenarios on every core.
fn run_parallel(n: u64, fence: Fencing) -> Summary {
    sim_parallel::run_parallel(n, &Scenario::select("host"), |first, count, sc| {
        run_seeds_with(first, count, sc, Protection::On, fence)
    })
}

/// The big run of one mode: no violation, no stale landing, and the
/// dangerous situations really happened.
fn no_violation(mode: FenceMode) -> Summary {
    let n = seeds();
    let fence = Fencing::new(mode);
    let s = run_parallel(n, fence);
    let t = s.total();
    assert_eq!(t.seeds, n);
    for f in s.failures.iter().take(5) {
        eprintln!(
            "seed {} {}: {:?}\n  replay: {}",
            f.seed,
            f.scenario,
            f.violations.first(),
            replay_command(f.seed, f.scenario, Protection::On, fence)
        );
    }
    assert_eq!(t.violations, 0, "{} failing seeds", s.failures.len());
    assert_eq!(t.stale_landings, 0);
    for (sc, r) in &s.rows {
        assert!(r.seeds > 0 && r.requests > 0, "{sc}: {r:?}");
        // With none, every takeover without a suspend is refused: the VM
        // never moves in migrate-takeover.
        if !(mode == FenceMode::None && sc.kind == Kind::MigrateTakeover) {
            assert!(r.migrations > 0, "{sc}: nothing moved");
        }
        assert_eq!(r.storage_ignored, 0, "{sc}: overlapping writes met");
        if sc.kind == Kind::StalePromote {
            assert!(r.takeovers_refused >= 4 * r.seeds, "{sc}: {r:?}");
        }
    }
    s
}

#[test]
fn pr_no_violation_in_twenty_thousand_host_side_seeds() {
    let t = no_violation(FenceMode::Pr).total();
    assert_eq!(t.fence_refused, 0);
    // Register and preempt take no time on the simulation's clock.
    assert!(t.failover_times.iter().all(|&f| f == 0));
}

#[test]
fn sanlock_no_violation_in_twenty_thousand_host_side_seeds() {
    let t = no_violation(FenceMode::Sanlock).total();
    let hd = Fencing::new(FenceMode::Sanlock).host_dead();
    assert_eq!(t.fence_refused, 0);
    // Not vacuous: leases were waited out, writers killed, hosts reset.
    assert!(t.host_dead_waits > 0 && t.writers_killed > 0 && t.hosts_reset > 0);
    assert!(
        t.failover_times.iter().any(|&f| f >= hd),
        "no failover took host_dead"
    );
}

#[test]
fn none_no_violation_in_twenty_thousand_host_side_seeds() {
    let s = no_violation(FenceMode::None);
    let t = s.total();
    assert!(t.fence_refused > 0);
    // Crashed sources are confirmed dead by the operator: failovers happen.
    for kind in [Kind::Failover, Kind::Failback] {
        let r = &s.rows[&host(kind)];
        assert!(r.migrations > 0 && r.fence_refused == 0, "{kind:?}: {r:?}");
    }
}

/// `--fence none`: a takeover from a source that is cut off (alive, its
/// I/O hung at the storage) is refused and counted, not scored as a
/// violation, and the guest goes on correctly on the source.
#[test]
fn none_refuses_a_cut_off_sources_takeover() {
    let fence = Fencing::new(FenceMode::None);
    let sc = host(Kind::MigrateTakeover);
    let seed = (0..200)
        .find(|&seed| {
            let (r, trace) = run_traced_with(seed, sc, Protection::On, fence);
            r.fence_refused == 1
                && trace.iter().any(|l| l.contains("cut_off: Some("))
                && trace
                    .iter()
                    .any(|l| l.contains("takeover by host 1 REFUSED"))
        })
        .expect("a seed whose cut-off source's takeover is refused");
    let r = run_one_with(seed, sc, Protection::On, fence);
    assert!(r.violations.is_empty(), "seed {seed}: {:?}", r.violations);
    assert_eq!(
        r.migrations, 0,
        "seed {seed}: the VM must stay on the source"
    );
    assert!(r.requests > 0);
    // Nothing was taken over, so nothing failed over.
    assert!(r.failover_times.is_empty());
}

/// `--fence none`: a crashed source is confirmed dead, and the confirmation
/// takes effect only once none of its I/O is left at the storage.
#[test]
fn none_takes_over_from_a_crashed_source_after_its_io_finished() {
    let fence = Fencing::new(FenceMode::None);
    let sc = host(Kind::Failover);
    let seed = (0..200)
        .find(|&seed| {
            let (r, trace) = run_traced_with(seed, sc, Protection::On, fence);
            r.failover_times.iter().any(|&f| f > 0)
                && trace
                    .iter()
                    .any(|l| l.contains("CONFIRMATION that host 0 is dead"))
        })
        .expect("a failover that waited for the dead host's I/O");
    let r = run_one_with(seed, sc, Protection::On, fence);
    assert!(r.violations.is_empty(), "seed {seed}: {:?}", r.violations);
    assert_eq!(r.fence_refused, 0);
    assert_eq!(r.migrations, 1);
}

/// sanlock: a cut-off or crashed holder that cannot release makes the
/// taker wait host_dead after its last renewal; some failovers take
/// host_dead or longer from the decision.
#[test]
fn sanlock_waits_out_host_dead() {
    let fence = Fencing::new(FenceMode::Sanlock);
    let hd = fence.host_dead();
    let mut found = None;
    'outer: for kind in [Kind::CutOffSource, Kind::Failover] {
        for seed in 0..300 {
            let r = run_one_with(seed, host(kind), Protection::On, fence);
            if r.failover_times.iter().any(|&f| f >= hd) {
                found = Some((seed, host(kind)));
                break 'outer;
            }
        }
    }
    let (seed, sc) = found.expect("a failover of host_dead or more");
    let (r, trace) = run_traced_with(seed, sc, Protection::On, fence);
    assert!(
        r.violations.is_empty(),
        "seed {seed} {sc}: {:?}",
        r.violations
    );
    assert!(r.host_dead_waits > 0);
    assert!(
        trace
            .iter()
            .any(|l| l.contains("ACQUIRES the lease after host_dead")),
        "{trace:#?}"
    );
}

/// sanlock: a cut-off holder's writer is killed at recovery, and when the
/// kill fails (or the writer is stuck on I/O) the watchdog resets the host,
/// dropping its I/O that has not landed.
#[test]
fn sanlock_kills_and_resets_a_cut_off_holder() {
    let fence = Fencing::new(FenceMode::Sanlock);
    let sc = host(Kind::CutOffSource);
    let found = (0..300).find(|&seed| {
        let (r, trace) = run_traced_with(seed, sc, Protection::On, fence);
        assert!(r.violations.is_empty(), "seed {seed}: {:?}", r.violations);
        trace.iter().any(|l| l.contains("writer KILLED"))
            && trace.iter().any(|l| l.contains("watchdog RESETS host 0"))
    });
    assert!(found.is_some(), "no seed killed and reset a cut-off holder");
}

#[test]
fn fence_modes_replay_exactly() {
    for mode in [FenceMode::Sanlock, FenceMode::None] {
        let fence = Fencing::new(mode);
        for seed in [0u64, 17, 99] {
            for sc in Scenario::select("host") {
                let a = run_one_with(seed, sc, Protection::On, fence);
                let b = run_one_with(seed, sc, Protection::On, fence);
                assert_eq!(a, b, "seed {seed} {sc} {mode:?} is not reproducible");
            }
        }
    }
}

/// The gateway has one process owning all I/O: the host-side fence mode
/// changes nothing there.
#[test]
fn gateway_runs_ignore_the_fence_mode() {
    for sc in Scenario::select("gateway") {
        for seed in [3u64, 42] {
            let pr = run_one_with(seed, sc, Protection::On, Fencing::new(FenceMode::Pr));
            for mode in [FenceMode::Sanlock, FenceMode::None] {
                let other = run_one_with(seed, sc, Protection::On, Fencing::new(mode));
                assert_eq!(pr, other, "seed {seed} {sc} {mode:?}");
            }
        }
    }
}
