//! Seeds `0..n` of a simulation sweep spread over every core, merged into
//! one summary (shared by the 20,000-seed tests).

use blkshim::sim::{Scenario, Summary};

/// Runs `run(first, count, scenarios)` on disjoint seed ranges covering
/// `0..n`, one per core, and merges the summaries.
pub fn run_parallel(
    n: u64,
    scenarios: &[Scenario],
    run: impl Fn(u64, u64, &[Scenario]) -> Summary + Sync,
) -> Summary {
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get()) as u64;
    let chunk = n.div_ceil(threads);
    let parts: Vec<Summary> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                let run = &run;
                s.spawn(move || {
                    let first = i * chunk;
                    let count = chunk.min(n.saturating_sub(first));
                    run(first, count, scenarios)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut total = Summary::default();
    for part in parts {
        for (sc, r) in part.rows {
            total.rows.entry(sc).or_default().merge(&r);
        }
        total.failures.extend(part.failures);
    }
    total
}
