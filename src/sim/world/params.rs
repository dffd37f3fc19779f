//! What a seed decides before a run starts: the storage model's timing,
//! the guest's workload, the scenario's plan and the fence model's monitor
//! phases, drawn in one place ([`SeedParams::draw`]) and printed at the
//! start of a `--trace`.

use super::Fencing;
use crate::sim::rng::SimRng;
use crate::sim::scenario::{plan, Action, Kind};
use crate::sim::sched::Time;
use crate::sim::storage_model::StorageParams;

/// The guest's workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct GuestParams {
    /// Sectors most requests go to.
    pub(super) hot: Vec<u64>,
    /// Requests in flight at most.
    pub(super) depth: usize,
    /// Percent of requests that are writes.
    pub(super) write_percent: u64,
    /// Requests to issue.
    pub(super) budget: u64,
}

/// Everything a seed decides up front.
#[derive(Debug, Clone)]
pub(super) struct SeedParams {
    pub(super) storage: StorageParams,
    pub(super) guest: GuestParams,
    /// The scenario's actions, in order.
    pub(super) actions: Vec<Action>,
    /// sanlock: when each host's lockspace monitor reads the other hosts'
    /// renewals (offset within a renewal period).
    pub(super) monitor_phase: Vec<Time>,
}

/// The generators the run's actors go on drawing from once the
/// parameters are drawn.
pub(super) struct SeedRngs {
    /// The storage model's.
    pub(super) storage: SimRng,
    /// The guest's (also the rogue writers').
    pub(super) guest: SimRng,
    /// blkfront's.
    pub(super) front: SimRng,
    /// The world's own (delays of the actions and rogue writers).
    pub(super) world: SimRng,
    /// The fence model's (kill failures): its own generator, so PR runs
    /// draw exactly what they did before it existed.
    pub(super) fence: SimRng,
}

impl SeedParams {
    /// Draw a seed's parameters, and the generators that go on from there.
    /// The order of the draws is part of every seed's meaning: changing
    /// it changes every run.
    pub(super) fn draw(seed: u64, kind: Kind, fence: &Fencing) -> (SeedParams, SeedRngs) {
        let mut frng = SimRng::new(seed ^ 0x5A4E_4C4F_434B_F00D);
        let monitor_phase = (0..3).map(|_| frng.below(fence.renewal())).collect();
        let mut rng = SimRng::new(seed);
        let mut prng = rng.fork();
        let storage = StorageParams {
            sectors: prng.range(24, 96),
            min_delay: 1,
            max_delay: prng.range(5, 60),
            tail_percent: prng.range(0, 20),
            tail: prng.range(50, 500),
            ignore_overlapping: true,
        };
        let sectors = storage.sectors;
        let storage_rng = rng.fork();
        let mut grng = rng.fork();
        let hot = (0..grng.range(1, 6)).map(|_| grng.below(sectors)).collect();
        let guest = GuestParams {
            hot,
            depth: grng.range(1, 8) as usize,
            write_percent: grng.range(5, 70),
            budget: grng.range(60, 200),
        };
        let front = rng.fork();
        let actions = plan(kind, &mut rng.fork());
        let params = SeedParams {
            storage,
            guest,
            actions,
            monitor_phase,
        };
        let rngs = SeedRngs {
            storage: storage_rng,
            guest: grng,
            front,
            world: rng,
            fence: frng,
        };
        (params, rngs)
    }

    /// The parameters as trace lines.
    pub(super) fn describe(&self) -> Vec<String> {
        let s = &self.storage;
        let g = &self.guest;
        let mut lines = vec![
            format!(
                "seed parameters: storage {} sectors, I/O {}..={} ticks, {}% of it up to {} more{}",
                s.sectors,
                s.min_delay,
                s.max_delay,
                s.tail_percent,
                s.tail,
                if s.ignore_overlapping {
                    ", overlapping writes ignored"
                } else {
                    ""
                }
            ),
            format!(
                "seed parameters: guest {} requests, depth {}, {}% writes, hot sectors {:?}",
                g.budget, g.depth, g.write_percent, g.hot
            ),
            format!(
                "seed parameters: sanlock monitor phases {:?}",
                self.monitor_phase
            ),
        ];
        for (i, a) in self.actions.iter().enumerate() {
            lines.push(format!(
                "seed parameters: action {i} after {} ticks: {:?}",
                a.gap, a.kind
            ));
        }
        lines
    }
}
