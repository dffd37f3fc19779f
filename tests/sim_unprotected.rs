//! With protection off the simulation must find the corruption: this is
//! what shows the checker can fail. Also: a host-side deployment without
//! the storage's reservations is not safe either.

use blkshim::sim::payload::{Content, ROGUE_BASE};
use blkshim::sim::{run_one, Deployment, Kind, Protection, Scenario, Violation};

/// First failing seed of `sc` in `0..bound`.
fn first_failure(sc: Scenario, p: Protection, bound: u64) -> Option<u64> {
    (0..bound).find(|&seed| !run_one(seed, sc, p).violations.is_empty())
}

#[test]
fn every_scenario_finds_corruption_without_protection() {
    for sc in Scenario::all() {
        let found = first_failure(sc, Protection::Off, 60);
        assert!(found.is_some(), "{sc}: no corruption found in 60 seeds");
    }
}

/// What is found is the corruption itself, in every scenario: older data
/// landing after newer, or a read of stale data. Not only a failed step.
#[test]
fn every_scenario_lands_or_reads_stale_data_without_protection() {
    for sc in Scenario::all() {
        let stale = (0..60).any(|seed| {
            let r = run_one(seed, sc, Protection::Off);
            r.stale_landings > 0
                || r.violations
                    .iter()
                    .any(|v| matches!(v, Violation::StaleRead { .. }))
        });
        assert!(stale, "{sc}: no stale landing or read in 60 seeds");
        // The unprotected paths themselves work: no step of the scenario
        // fails for want of a connection.
        for seed in 0..20 {
            let r = run_one(seed, sc, Protection::Off);
            assert!(
                !r.violations
                    .iter()
                    .any(|v| matches!(v, Violation::HandoffFailed { .. })),
                "{sc} seed {seed}: {:?}",
                r.violations
            );
        }
    }
}

#[test]
fn detection_rate_without_protection_is_high() {
    let mut failing = 0;
    let mut total = 0;
    for sc in Scenario::all() {
        for seed in 0..40 {
            total += 1;
            failing += u32::from(!run_one(seed, sc, Protection::Off).violations.is_empty());
        }
    }
    // Measured at about 65% over all scenarios; a drop means the
    // simulation lost its teeth.
    assert!(
        failing * 100 >= total * 40,
        "{failing}/{total} seeds failing"
    );
}

/// seeds/003 exactly: the block holds the older write A, the guest was told
/// the newer A' completed.
#[test]
fn seeds_003_stale_write_overwrites_newer_one() {
    let sc = Scenario {
        kind: Kind::CutOffSource,
        deployment: Deployment::HostSide,
    };
    let found = (0..100).any(|seed| {
        run_one(seed, sc, Protection::Off)
            .violations
            .iter()
            .any(|v| match v {
                Violation::FinalMismatch {
                    got: Content::Write(a),
                    allowed,
                    ..
                } => allowed
                    .iter()
                    .any(|c| matches!(c, Content::Write(newer) if newer > a)),
                _ => false,
            })
    });
    assert!(found, "no seed reproduced A landing over A'");
    // And the landing itself is caught as it happens.
    let landed = (0..100).any(|seed| {
        run_one(seed, sc, Protection::Off)
            .violations
            .iter()
            .any(|v| matches!(v, Violation::StaleLanding { .. }))
    });
    assert!(landed);
}

#[test]
fn unprotected_stale_promote_lands_stale_writes() {
    let sc = Scenario {
        kind: Kind::StalePromote,
        deployment: Deployment::Gateway,
    };
    let r = run_one(3, sc, Protection::Off);
    assert!(r.rogue_landed > 0);
    let rogue_seen = (0..30).any(|seed| {
        run_one(seed, sc, Protection::Off).violations.iter().any(|v| {
            matches!(v, Violation::FinalMismatch { got: Content::Write(id), .. } if *id >= ROGUE_BASE)
        })
    });
    assert!(rogue_seen);
}

#[test]
fn host_side_needs_storage_fencing() {
    for kind in [Kind::CutOffSource, Kind::Failover, Kind::StalePromote] {
        let sc = Scenario {
            kind,
            deployment: Deployment::HostSide,
        };
        assert!(
            first_failure(sc, Protection::NoStorageFencing, 60).is_some(),
            "{sc}: no corruption without the storage's reservations"
        );
        assert!(first_failure(sc, Protection::On, 60).is_none());
    }
}
