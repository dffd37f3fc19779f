//! The named scenarios: what happens to the VM during a run.

use super::rng::SimRng;
use super::sched::Time;
use std::fmt;

/// Where blkshim runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Deployment {
    /// One process owns all I/O (the NBD gateway): source and destination
    /// are two writers of one `Disk`.
    Gateway,
    /// One backend per host over shared storage and a shared epoch store;
    /// the storage fences with persistent reservations.
    HostSide,
}

impl Deployment {
    pub fn name(self) -> &'static str {
        match self {
            Deployment::Gateway => "gateway",
            Deployment::HostSide => "host",
        }
    }
}

/// What happens to the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// Live migration X->Y; the source drains (fenced if the deadline passes).
    MigrateDrain,
    /// Live migration X->Y; the source fences at once.
    MigrateFence,
    /// X->Y without a suspend: the destination takes the next epoch
    /// (gateway: with its first write; host-side: `advance_to` plus a
    /// storage preempt) while the source's requests are still in flight;
    /// they drain and are fenced later, on the clock.
    MigrateTakeover,
    /// X->Y->X->... live migrations.
    PingPong,
    /// Live migration while the source's storage path hangs: its writes
    /// land long after the hand-off (seeds/003).
    CutOffSource,
    /// The source dies; the VM restarts on Y at the next epoch while the
    /// dead source's writes land late (seeds/000).
    Failover,
    /// Failover X->Y, later back to X (seeds/000, scenario 3).
    Failback,
    /// A node with an older epoch but a newer wall clock tries to take the
    /// disk over and write (seeds/004): must be refused.
    StalePromote,
    /// Split brain: after the VM moved to Y, its old copy on X keeps
    /// running and writing through X's backend (seeds/000: both servers
    /// edit the disk). Every such write must be refused.
    SplitBrain,
}

impl Kind {
    pub const ALL: [Kind; 9] = [
        Kind::MigrateDrain,
        Kind::MigrateFence,
        Kind::MigrateTakeover,
        Kind::PingPong,
        Kind::CutOffSource,
        Kind::Failover,
        Kind::Failback,
        Kind::StalePromote,
        Kind::SplitBrain,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::MigrateDrain => "migrate-drain",
            Kind::MigrateFence => "migrate-fence",
            Kind::MigrateTakeover => "migrate-takeover",
            Kind::PingPong => "ping-pong",
            Kind::CutOffSource => "cut-off-source",
            Kind::Failover => "failover",
            Kind::Failback => "failback",
            Kind::StalePromote => "stale-promote",
            Kind::SplitBrain => "split-brain",
        }
    }
}

/// A scenario in one deployment, e.g. `cut-off-source/host`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Scenario {
    pub kind: Kind,
    pub deployment: Deployment,
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind.name(), self.deployment.name())
    }
}

impl Scenario {
    /// Every scenario in every deployment, in table order.
    pub fn all() -> Vec<Scenario> {
        let mut v = Vec::new();
        for kind in Kind::ALL {
            for deployment in [Deployment::Gateway, Deployment::HostSide] {
                v.push(Scenario { kind, deployment });
            }
        }
        v
    }

    /// Scenarios matching `pattern`: a full name (`failover/host`), a kind
    /// (`failover`: both deployments), a deployment (`host`), or `all`.
    pub fn select(pattern: &str) -> Vec<Scenario> {
        Scenario::all()
            .into_iter()
            .filter(|s| {
                pattern == "all"
                    || pattern == s.kind.name()
                    || pattern == s.deployment.name()
                    || pattern == s.to_string()
            })
            .collect()
    }
}

/// How a source gives up the disk in a live migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationMode {
    /// Drain, and fence what is left `deadline` ticks after suspend.
    Drain {
        deadline: Time,
    },
    Fence,
}

/// One step of a scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActionKind {
    /// Live-migrate the VM to host `to`. With `cut_off`, the source's
    /// storage path hangs for that long from the start of the migration.
    Migrate {
        to: usize,
        mode: MigrationMode,
        cut_off: Option<Time>,
        /// The source host dies this long into the drain (if it is still
        /// draining then): no record; the destination takes the next
        /// epoch and the VM goes on there.
        source_dies: Option<Time>,
    },
    /// The VM's host dies; after `downtime` the VM restarts on `restart_on`.
    /// With `hang`, the dead host's writes in flight land that much later.
    Crash {
        restart_on: usize,
        downtime: Time,
        hang: Option<Time>,
    },
    /// Move the VM to `to` without suspending the source; the source's
    /// requests still in flight are fenced `fence_after` ticks later.
    Takeover {
        to: usize,
        fence_after: Time,
        cut_off: Option<Time>,
    },
    /// The stale node `host` tries to take over and write `writes` times.
    StalePromote { host: usize, writes: u32 },
    /// The VM's previous host keeps writing `writes` times through its
    /// old connection.
    Zombie { writes: u32 },
}

/// An action and how long after the previous one it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Action {
    pub gap: Time,
    pub kind: ActionKind,
}

pub const HOST_X: usize = 0;
pub const HOST_Y: usize = 1;
pub const HOST_Z: usize = 2;

fn mode(rng: &mut SimRng) -> MigrationMode {
    if rng.chance(50) {
        MigrationMode::Drain {
            deadline: rng.range(20, 500),
        }
    } else {
        MigrationMode::Fence
    }
}

fn takeover(rng: &mut SimRng, to: usize) -> ActionKind {
    ActionKind::Takeover {
        to,
        fence_after: if rng.chance(30) { 0 } else { rng.range(1, 600) },
        cut_off: rng.chance(40).then(|| rng.range(200, 2000)),
    }
}

fn crash(rng: &mut SimRng, restart_on: usize) -> ActionKind {
    ActionKind::Crash {
        restart_on,
        downtime: rng.range(2, 300),
        hang: rng.chance(70).then(|| rng.range(100, 3000)),
    }
}

/// The seeded plan of a scenario.
pub fn plan(kind: Kind, rng: &mut SimRng) -> Vec<Action> {
    let gap = |rng: &mut SimRng| rng.range(20, 250);
    match kind {
        Kind::MigrateDrain => vec![Action {
            gap: gap(rng),
            kind: ActionKind::Migrate {
                source_dies: None,
                to: HOST_Y,
                mode: MigrationMode::Drain {
                    deadline: rng.range(20, 600),
                },
                cut_off: None,
            },
        }],
        Kind::MigrateFence => vec![Action {
            gap: gap(rng),
            kind: ActionKind::Migrate {
                source_dies: None,
                to: HOST_Y,
                mode: MigrationMode::Fence,
                cut_off: None,
            },
        }],
        Kind::MigrateTakeover => vec![Action {
            gap: gap(rng),
            kind: takeover(rng, HOST_Y),
        }],
        Kind::PingPong => (0..rng.range(2, 5))
            .map(|i| {
                let to = if i % 2 == 0 { HOST_Y } else { HOST_X };
                let kind = if rng.chance(20) {
                    takeover(rng, to)
                } else {
                    ActionKind::Migrate {
                        source_dies: rng.chance(10).then(|| rng.range(0, 200)),
                        to,
                        mode: mode(rng),
                        cut_off: rng.chance(25).then(|| rng.range(200, 2000)),
                    }
                };
                Action {
                    gap: gap(rng),
                    kind,
                }
            })
            .collect(),
        Kind::CutOffSource => vec![Action {
            gap: gap(rng),
            kind: ActionKind::Migrate {
                source_dies: rng.chance(40).then(|| rng.range(0, 300)),
                to: HOST_Y,
                mode: if rng.chance(75) {
                    MigrationMode::Drain {
                        deadline: rng.range(20, 300),
                    }
                } else {
                    MigrationMode::Fence
                },
                cut_off: Some(rng.range(400, 3000)),
            },
        }],
        Kind::Failover => vec![Action {
            gap: gap(rng),
            kind: crash(rng, HOST_Y),
        }],
        Kind::Failback => {
            let first = Action {
                gap: gap(rng),
                kind: crash(rng, HOST_Y),
            };
            let back = if rng.chance(50) {
                crash(rng, HOST_X)
            } else {
                ActionKind::Migrate {
                    source_dies: None,
                    to: HOST_X,
                    mode: mode(rng),
                    cut_off: rng.chance(30).then(|| rng.range(200, 2000)),
                }
            };
            vec![
                first,
                Action {
                    gap: gap(rng),
                    kind: back,
                },
            ]
        }
        Kind::SplitBrain => vec![
            Action {
                gap: gap(rng),
                kind: if rng.chance(50) {
                    takeover(rng, HOST_Y)
                } else {
                    ActionKind::Migrate {
                        source_dies: None,
                        to: HOST_Y,
                        mode: mode(rng),
                        cut_off: None,
                    }
                },
            },
            Action {
                gap: rng.range(0, 60),
                kind: ActionKind::Zombie {
                    writes: rng.range(3, 10) as u32,
                },
            },
        ],
        Kind::StalePromote => vec![
            Action {
                gap: gap(rng),
                kind: ActionKind::Migrate {
                    source_dies: None,
                    to: HOST_Y,
                    mode: mode(rng),
                    cut_off: rng.chance(30).then(|| rng.range(200, 2000)),
                },
            },
            Action {
                gap: gap(rng),
                kind: ActionKind::StalePromote {
                    host: HOST_Z,
                    writes: rng.range(3, 10) as u32,
                },
            },
        ],
    }
}
