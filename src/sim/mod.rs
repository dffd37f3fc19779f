//! The deterministic simulation that shows blkshim's promise holds: **no
//! stale write ever lands.**
//!
//! A seeded run puts a guest (writes, reads, flushes, discards with
//! verifiable contents), Linux blkfront's re-send-on-resume, source and
//! destination backends built on the real library ([`crate::handoff::Disk`]
//! over the adversarial [`storage_model`]), and a scenario (migration,
//! failover, failback, a stale takeover) on one logical clock. The
//! [`checker`] then compares every block with the last write the guest was
//! told had completed. With protection off the same runs find seeds/003's
//! corruption, which shows the checker can fail.
//!
//! Replay any run with `blkshim sim --seed N --scenario NAME [--fence MODE]
//! [--unprotected | --no-storage-fencing]` (add `--trace` to see its steps).
//!
//! ## How a run is built
//!
//! - **Determinism.** One [`rng::SimRng`] (splitmix64) per seed, forked per
//!   actor; one logical clock and one event queue ordered by (time,
//!   sequence) ([`sched`]); only ordered maps (`BTreeMap`) where iteration
//!   order decides anything. The library's own `HashMap`s never decide an
//!   order the simulation depends on (the hand-off record is sorted).
//! - **Flat call stack.** The storage model never completes inside
//!   `submit`: every I/O becomes an event and is delivered by the loop;
//!   backend completions go to an inbox the loop drains after each event.
//! - **Real core.** Protected backends are [`crate::handoff::Disk`]s
//!   (tracker, epoch store, drain/fence hand-off) over the storage model.
//!   Gateway: one `Disk`, source and destination are two writers
//!   (`auto_advance: true`, fence timer on the simulation's clock).
//!   Host-side: one `Disk` per host over its own path to the shared storage,
//!   one shared [`crate::epoch::MemEpochStore`], `auto_advance: false`,
//!   `fence_timeout: None`, drains driven by `begin_suspend` +
//!   `try_finish(deadline_passed)`, and older writers kept off the storage
//!   by the fence mode the run selects (below).
//! - **Guest and blkfront.** Each written sector encodes (sector, write id)
//!   ([`payload`]). The guest never overlaps its own conflicting requests
//!   (like a page cache), so "the last completed write" is well defined.
//!   On resume blkfront re-sends every unfinished request under new ids,
//!   reads and writes possibly split or merged, flush/discard/write-zeroes
//!   whole; answers for the old ring are lost.
//!
//! ## Fence modes (host-side)
//!
//! `--fence pr|sanlock|none` (the product's
//! [`crate::storage::fencing::FenceMode`], default pr) selects what a
//! host-side destination does before its first write; gateway runs ignore
//! it. Each models what the product can actually rely on, not something
//! better:
//!
//! - **pr**: the destination registers its epoch's key and preempts (and
//!   aborts) every older key through
//!   [`crate::storage::fencing::StorageFencing`] on the storage model; the
//!   preempted source's later writes fail at the storage. Takes no time.
//! - **sanlock**: a paxos lease per disk; the destination writes once it
//!   holds it. A holder that handed its epoch over releases it once none of
//!   its I/O is left at the storage (the taker acquires at once); otherwise
//!   the taker waits host_dead after the holder's last renewal (as its
//!   lockspace monitor saw it). A cut-off holder cannot renew: its writer is
//!   killed at recovery (requests not yet submitted never are), and if the
//!   kill fails (drawn per holder) or the writer is stuck on I/O the
//!   watchdog resets the host by host_dead. A crashed host stops renewing
//!   at its crash. The timeouts keep sanlock's ratios on a compressed clock
//!   ([`Fencing`]: io_timeout 50 ticks stands for 10 s). **Its safety rests
//!   on one assumption, modelled exactly and nothing more:** a host reset
//!   (or dead) at host_dead has no I/O landing afterwards; the storage
//!   model drops all it still holds of that host then. Storage that lands a
//!   dead initiator's accepted write later would break sanlock (PR aborts
//!   it at the target instead). The summary reports the failover time
//!   (decision to first write allowed) it costs.
//! - **none**: nothing fences. A destination writes only after a holder
//!   that handed over a record that is current (none of the holder's I/O
//!   can still reach the storage; the ledger publishes the record only
//!   then), or after the operator confirmed the holder's host dead (`blkshim
//!   ctl takeover DISK --source-dead`). The confirmation is a true
//!   statement: given only for a host that crashed or lost power (its
//!   requests not yet at the storage die with it), and effective only once
//!   the storage holds none of its I/O (what it had accepted landed or
//!   failed). A takeover from a live holder without a record (a cut-off
//!   source, a takeover without a suspend) is refused and counted
//!   (`refused takeovers`), never allowed and never a violation: the VM
//!   stays where it was.
//!
//! `--no-storage-fencing` is the negative control: blkshim on, nothing
//! fences and every takeover is allowed. It finds violations, which shows
//! the fence is what makes host-side deployments safe.
//!
//! ## Cost and CI
//!
//! A seed costs about 0.3 ms of CPU in release and 2-3 ms in debug.
//! `tests/sim_protected.rs` runs the full 20,000 seeds in the normal
//! (debug) test build, spread over all cores (about 50 s of CPU; override
//! with `BLKSHIM_SIM_SEEDS`): debug keeps overflow checks on, and no
//! `[profile.test]` change is needed in the shared `Cargo.toml`.
//! `tests/sim_fence.rs` runs 20,000 host-side seeds per fence mode (three
//! runs, about 90 s of CPU in debug; the same override). For bigger sweeps
//! use the release binary: `blkshim sim --seeds 1000000`.

pub mod checker;
pub mod payload;
pub mod rng;
pub mod scenario;
pub mod sched;
pub mod storage_model;
mod world;

pub use checker::Violation;
pub use scenario::{Deployment, Kind, Scenario};
pub use world::{
    run_one, run_one_with, run_traced, run_traced_with, Fencing, Protection, RunReport,
};

use crate::storage::fencing::FenceMode;
use sched::Time;

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Instant;

/// `blkshim sim` options.
#[derive(clap::Args, Debug, Clone)]
pub struct SimArgs {
    /// Run only this seed (with --scenario, exactly that run).
    #[arg(long)]
    pub seed: Option<u64>,
    /// How many seeds to run (seed i runs scenario i mod the number selected).
    #[arg(long, default_value_t = 1000)]
    pub seeds: u64,
    /// The first seed of a multi-seed run.
    #[arg(long, default_value_t = 0)]
    pub first_seed: u64,
    /// Scenario: a full name (failover/host), a kind (failover), a
    /// deployment (gateway, host) or all.
    #[arg(long, default_value = "all")]
    pub scenario: String,
    /// Switch blkshim off: backends pass requests straight to the storage.
    #[arg(long)]
    pub unprotected: bool,
    /// Keep blkshim on but do not use the storage's reservations, and allow
    /// every takeover (the negative control: it finds violations).
    #[arg(long, conflicts_with = "unprotected")]
    pub no_storage_fencing: bool,
    /// What host-side deployments keep older writers off the storage with,
    /// as the product's `FenceMode`: pr (persistent reservations), sanlock
    /// (a lease per disk), none (takeovers only after a current record or a
    /// confirmed dead source; other takeovers refused).
    #[arg(long, value_enum, default_value = "pr", conflicts_with_all = ["unprotected", "no_storage_fencing"])]
    pub fence: FenceMode,
    /// --fence sanlock: sanlock's io_timeout in ticks of the simulation's
    /// clock (stands for 10 s; renewal 2x, kill 8x, host_dead 14x).
    #[arg(long, default_value_t = Fencing::DEFAULT_IO_TIMEOUT, value_parser = clap::value_parser!(u64).range(1..))]
    pub sanlock_io_timeout: u64,
    /// Print every violation of every failing seed.
    #[arg(long, short)]
    pub verbose: bool,
    /// With --seed: print the run's steps (actions, hand-off records, re-sends).
    #[arg(long, requires = "seed")]
    pub trace: bool,
}

/// One line of the table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Row {
    pub seeds: u64,
    pub failing_seeds: u64,
    pub migrations: u64,
    pub requests: u64,
    pub replays: u64,
    pub stale_refused: u64,
    pub takeovers_refused: u64,
    pub drains_timed_out: u64,
    pub storage_ignored: u64,
    pub violations: u64,
    /// Data of an older writer that landed after newer data, or a stale
    /// write landing late (each also a violation).
    pub stale_landings: u64,
    /// Seeds with a stale landing or a stale read: the corruption itself,
    /// as opposed to other broken promises (a stuck request, a failed step).
    pub stale_seeds: u64,
    /// Host-side takeovers refused by `--fence none`.
    pub fence_refused: u64,
    /// Host-side takeovers: ticks from the decision to the first write
    /// allowed, one entry per takeover.
    pub failover_times: Vec<Time>,
    /// sanlock: acquires that waited out host_dead.
    pub host_dead_waits: u64,
    /// sanlock: writers killed, hosts reset by the watchdog.
    pub writers_killed: u64,
    pub hosts_reset: u64,
}

impl Row {
    /// Add another row's counts to this one (summing tables or threads).
    pub fn merge(&mut self, r: &Row) {
        self.seeds += r.seeds;
        self.failing_seeds += r.failing_seeds;
        self.migrations += r.migrations;
        self.requests += r.requests;
        self.replays += r.replays;
        self.stale_refused += r.stale_refused;
        self.takeovers_refused += r.takeovers_refused;
        self.drains_timed_out += r.drains_timed_out;
        self.storage_ignored += r.storage_ignored;
        self.violations += r.violations;
        self.stale_landings += r.stale_landings;
        self.stale_seeds += r.stale_seeds;
        self.fence_refused += r.fence_refused;
        self.failover_times.extend_from_slice(&r.failover_times);
        self.host_dead_waits += r.host_dead_waits;
        self.writers_killed += r.writers_killed;
        self.hosts_reset += r.hosts_reset;
    }

    fn add(&mut self, r: &RunReport) {
        self.seeds += 1;
        self.failing_seeds += u64::from(!r.violations.is_empty());
        self.migrations += r.migrations;
        self.requests += r.requests;
        self.replays += r.replays;
        self.stale_refused += r.stale_refused;
        self.takeovers_refused += r.takeovers_refused;
        self.drains_timed_out += r.drains_timed_out;
        self.storage_ignored += r.storage_ignored;
        self.violations += r.violations.len() as u64;
        self.stale_landings += r.stale_landings;
        self.fence_refused += r.fence_refused;
        self.failover_times.extend_from_slice(&r.failover_times);
        self.host_dead_waits += r.host_dead_waits;
        self.writers_killed += r.writers_killed;
        self.hosts_reset += r.hosts_reset;
        self.stale_seeds += u64::from(r.violations.iter().any(|v| {
            matches!(
                v,
                Violation::StaleLanding { .. }
                    | Violation::OlderWriterLanded { .. }
                    | Violation::StaleRead { .. }
            )
        }));
    }
}

/// A failing run.
#[derive(Debug, Clone)]
pub struct Failure {
    pub seed: u64,
    pub scenario: Scenario,
    pub violations: Vec<Violation>,
}

/// The result of many runs.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub rows: BTreeMap<Scenario, Row>,
    pub failures: Vec<Failure>,
}

impl Summary {
    pub fn total(&self) -> Row {
        let mut t = Row::default();
        for r in self.rows.values() {
            t.merge(r);
        }
        t
    }
}

/// The scenario seed `seed` runs when `scenarios` are selected.
pub fn scenario_for(seed: u64, scenarios: &[Scenario]) -> Option<Scenario> {
    if scenarios.is_empty() {
        return None;
    }
    Some(scenarios[(seed % scenarios.len() as u64) as usize])
}

/// Run seeds `first..first + count`, seed i on scenario i mod len.
pub fn run_seeds(first: u64, count: u64, scenarios: &[Scenario], p: Protection) -> Summary {
    run_seeds_with(first, count, scenarios, p, Fencing::default())
}

/// [`run_seeds`] with host-side deployments fenced by `fence`.
pub fn run_seeds_with(
    first: u64,
    count: u64,
    scenarios: &[Scenario],
    p: Protection,
    fence: Fencing,
) -> Summary {
    let mut s = Summary::default();
    for sc in scenarios {
        s.rows.insert(*sc, Row::default());
    }
    for seed in first..first.saturating_add(count) {
        let Some(sc) = scenario_for(seed, scenarios) else {
            break;
        };
        let r = run_one_with(seed, sc, p, fence);
        s.rows.entry(sc).or_default().add(&r);
        if !r.violations.is_empty() {
            s.failures.push(Failure {
                seed,
                scenario: sc,
                violations: r.violations,
            });
        }
    }
    s
}

/// The command that replays one run.
pub fn replay_command(seed: u64, scenario: Scenario, p: Protection, fence: Fencing) -> String {
    let flag = match p {
        Protection::On => {
            let mut f = String::new();
            if fence.mode != FenceMode::Pr {
                f = format!(" --fence {}", fence.mode.name());
            }
            if fence.mode == FenceMode::Sanlock && fence.io_timeout != Fencing::DEFAULT_IO_TIMEOUT {
                f.push_str(&format!(" --sanlock-io-timeout {}", fence.io_timeout));
            }
            f
        }
        Protection::Off => " --unprotected".to_string(),
        Protection::NoStorageFencing => " --no-storage-fencing".to_string(),
    };
    format!("blkshim sim --seed {seed} --scenario {scenario}{flag}")
}

/// The `q`-quantile (0..=1) of sorted `v`.
fn quantile(v: &[Time], q: f64) -> Time {
    if v.is_empty() {
        return 0;
    }
    let i = ((v.len() - 1) as f64 * q).round() as usize;
    v[i.min(v.len() - 1)]
}

/// Print the table; the last line is exactly `violations: N`.
pub fn print_summary(
    out: &mut impl Write,
    s: &Summary,
    p: Protection,
    fence: Fencing,
    verbose: bool,
    elapsed: f64,
) -> std::io::Result<()> {
    const SHOWN: usize = 10;
    for f in s
        .failures
        .iter()
        .take(if verbose { usize::MAX } else { SHOWN })
    {
        writeln!(
            out,
            "FAIL seed {} {}: {} violation(s); first: {}",
            f.seed,
            f.scenario,
            f.violations.len(),
            f.violations
                .first()
                .map(|v| v.to_string())
                .unwrap_or_default()
        )?;
        if verbose {
            for v in f.violations.iter().skip(1) {
                writeln!(out, "     {v}")?;
            }
        }
        writeln!(
            out,
            "  replay: {}",
            replay_command(f.seed, f.scenario, p, fence)
        )?;
    }
    if !verbose && s.failures.len() > SHOWN {
        writeln!(
            out,
            "... and {} more failing seeds",
            s.failures.len() - SHOWN
        )?;
    }
    let mode = match p {
        Protection::On => "protection on",
        Protection::Off => "protection OFF",
        Protection::NoStorageFencing => "protection on, storage fencing off",
    };
    writeln!(out, "blkshim simulation ({mode})")?;
    writeln!(
        out,
        "(replays: requests blkfront re-sent; stale-ref: older writers' writes refused, cancelled, \
         fenced or aborted, plus stale takeovers refused; drain-t/o: drains fenced at the deadline; \
         ignored: writes the storage ignored because one overlapped in flight; stale-land: older \
         data landing after newer; stale%: seeds with a stale landing or a stale read)"
    )?;
    writeln!(
        out,
        "{:<22} {:>7} {:>7} {:>10} {:>9} {:>8} {:>9} {:>9} {:>8} {:>10} {:>10} {:>6}",
        "scenario",
        "seeds",
        "failing",
        "migrations",
        "requests",
        "replays",
        "stale-ref",
        "drain-t/o",
        "ignored",
        "violations",
        "stale-land",
        "stale%"
    )?;
    let line = |out: &mut dyn Write, name: &str, r: &Row| {
        writeln!(
            out,
            "{:<22} {:>7} {:>7} {:>10} {:>9} {:>8} {:>9} {:>9} {:>8} {:>10} {:>10} {:>5.0}%",
            name,
            r.seeds,
            r.failing_seeds,
            r.migrations,
            r.requests,
            r.replays,
            r.stale_refused + r.takeovers_refused,
            r.drains_timed_out,
            r.storage_ignored,
            r.violations,
            r.stale_landings,
            100.0 * r.stale_seeds as f64 / r.seeds.max(1) as f64
        )
    };
    for (sc, r) in &s.rows {
        line(out, &sc.to_string(), r)?;
    }
    let t = s.total();
    line(out, "total", &t)?;
    let rate = if elapsed > 0.0 {
        t.seeds as f64 / elapsed
    } else {
        0.0
    };
    writeln!(
        out,
        "{} seeds in {elapsed:.2}s ({rate:.0} seeds/s)",
        t.seeds
    )?;
    if p == Protection::On {
        let host_side = s
            .rows
            .keys()
            .any(|sc| sc.deployment == Deployment::HostSide);
        let timing = if fence.mode == FenceMode::Sanlock {
            format!(
                " (io_timeout {} ticks = 10 s: renewal {}, kill {}, host_dead {} ticks after the last renewal)",
                fence.io_timeout,
                fence.renewal(),
                fence.recovery(),
                fence.host_dead()
            )
        } else {
            String::new()
        };
        writeln!(
            out,
            "fence mode (host-side): {}{timing}{}",
            fence.mode.name(),
            if host_side {
                ""
            } else {
                "; no host-side scenario ran"
            }
        )?;
        let mut f = t.failover_times.clone();
        f.sort_unstable();
        let max = f.last().copied().unwrap_or(0);
        let secs = |x: Time| {
            if fence.mode == FenceMode::Sanlock {
                format!(" ({:.0} s)", fence.seconds(x))
            } else {
                String::new()
            }
        };
        writeln!(
            out,
            "failover (host-side takeovers, decision to first write allowed, ticks): n {} p50 {}{} p90 {}{} p99 {}{} max {}{}",
            f.len(),
            quantile(&f, 0.5),
            secs(quantile(&f, 0.5)),
            quantile(&f, 0.9),
            secs(quantile(&f, 0.9)),
            quantile(&f, 0.99),
            secs(quantile(&f, 0.99)),
            max,
            secs(max)
        )?;
        if fence.mode == FenceMode::Sanlock {
            writeln!(
                out,
                "sanlock: acquires after host_dead {}, writers killed {}, hosts reset by the watchdog or dead {}",
                t.host_dead_waits, t.writers_killed, t.hosts_reset
            )?;
        }
        writeln!(out, "refused takeovers: {}", t.fence_refused)?;
    }
    writeln!(
        out,
        "stale landings (older writers' data after newer): {}",
        t.stale_landings
    )?;
    writeln!(out, "violations: {}", t.violations)
}

/// `blkshim sim`: run, print the table, exit 1 when anything was violated.
pub fn cli_main(args: SimArgs) -> Result<(), Box<dyn std::error::Error>> {
    if !args.verbose {
        // The library logs every refused write; thousands of runs would drown the table.
        log::set_max_level(log::LevelFilter::Off);
    }
    let p = if args.unprotected {
        Protection::Off
    } else if args.no_storage_fencing {
        Protection::NoStorageFencing
    } else {
        Protection::On
    };
    let fence = Fencing {
        mode: args.fence,
        io_timeout: args.sanlock_io_timeout,
    };
    let selected = Scenario::select(&args.scenario);
    if selected.is_empty() {
        let names: Vec<String> = Scenario::all().iter().map(|s| s.to_string()).collect();
        return Err(format!(
            "unknown scenario {:?}; use all, gateway, host, a kind, or one of: {}",
            args.scenario,
            names.join(", ")
        )
        .into());
    }
    if let (Some(seed), true) = (args.seed, args.trace) {
        if let Some(sc) = scenario_for(seed, &selected) {
            let (_, lines) = run_traced_with(seed, sc, p, fence);
            println!("trace of seed {seed} {sc}:");
            for l in lines {
                println!("  {l}");
            }
        }
    }
    let started = Instant::now();
    let summary = match args.seed {
        Some(seed) => run_seeds_with(seed, 1, &selected, p, fence),
        None => run_seeds_with(args.first_seed, args.seeds, &selected, p, fence),
    };
    let elapsed = started.elapsed().as_secs_f64();
    let verbose = args.verbose || args.seed.is_some();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let printed =
        print_summary(&mut out, &summary, p, fence, verbose, elapsed).and_then(|_| out.flush());
    match printed {
        // `blkshim sim ... | head` is not an error.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        other => other?,
    }
    if summary.total().violations > 0 {
        std::process::exit(1);
    }
    Ok(())
}
