//! 4 KiB random writes and reads at queue depth 32 on a 256 MiB image, for
//! both engines, with O_DIRECT (the image lives under the target directory,
//! on a real file system). Criterion reports elements/s = IOPS; a summary
//! line per case is printed too.
//!
//! Run: `cargo bench --bench storage_engines`

use blkshim::storage::{
    open_storage, AlignedBuf, BlockStorage, EngineKind, IoOutcome, OpenOptions, StorageIo,
    UringStorage,
};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

const IMAGE_SIZE: u64 = 256 << 20;
const BLOCK: usize = 4096;
const QUEUE_DEPTH: usize = 32;
/// Requests per timed iteration.
const BATCH: u64 = 4096;

/// A 256 MiB image full of data (reads of holes would never reach the disk).
fn prepare_image() -> PathBuf {
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("storage-bench.img");
    let full =
        std::fs::metadata(&path).is_ok_and(|m| m.len() == IMAGE_SIZE && m.blocks_allocated());
    if !full {
        let chunk: Vec<u8> = (0..1 << 20).map(|i| (i * 7 + 1) as u8).collect();
        let mut data = Vec::with_capacity(IMAGE_SIZE as usize);
        while (data.len() as u64) < IMAGE_SIZE {
            data.extend_from_slice(&chunk);
        }
        std::fs::write(&path, &data).expect("write bench image");
    }
    path
}

trait Allocated {
    fn blocks_allocated(&self) -> bool;
}

impl Allocated for std::fs::Metadata {
    fn blocks_allocated(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        self.blocks() * 512 >= self.len()
    }
}

/// Run `ops` random 4 KiB requests keeping `QUEUE_DEPTH` in flight.
fn run_qd(storage: &dyn BlockStorage, ops: u64, write: bool, seed: &mut u64) -> Duration {
    let (tx, rx) = crossbeam_channel::unbounded::<IoOutcome>();
    let blocks = IMAGE_SIZE / BLOCK as u64;
    let mut next_io = |buf: AlignedBuf| {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        let offset = (*seed % blocks) * BLOCK as u64;
        if write {
            StorageIo::Write {
                offset,
                buf,
                fua: false,
            }
        } else {
            StorageIo::Read { offset, buf }
        }
    };
    let submit = |io: StorageIo| {
        let tx = tx.clone();
        storage.submit(
            io,
            Box::new(move |out| {
                let _ = tx.send(out);
            }),
        );
    };
    let start = Instant::now();
    let mut submitted = 0;
    while submitted < ops.min(QUEUE_DEPTH as u64) {
        submit(next_io(AlignedBuf::from_slice(&[0x5a; BLOCK])));
        submitted += 1;
    }
    for _ in 0..ops {
        let out = rx.recv().expect("completion");
        out.result.expect("bench I/O failed");
        let buf = out.buf.expect("buffer handed back");
        if submitted < ops {
            submit(next_io(buf));
            submitted += 1;
        }
    }
    start.elapsed()
}

fn bench_engines(c: &mut Criterion) {
    let path = prepare_image();
    let mut summary = Vec::new();
    for (name, engine) in [
        ("io_uring", EngineKind::IoUring),
        ("thread_pool", EngineKind::ThreadPool),
    ] {
        let opts = OpenOptions {
            engine,
            direct: true,
            create_size: None,
            read_only: false,
        };
        // The io_uring engine is opened directly to read its syscall counters.
        let uring = (engine == EngineKind::IoUring)
            .then(|| Arc::new(UringStorage::open(&path, &opts).expect("open bench image")));
        let storage: Arc<dyn BlockStorage> = match &uring {
            Some(uring) => uring.clone(),
            None => open_storage(&path, &opts).expect("open bench image"),
        };
        let direct = storage.capabilities().direct;
        let mut group = c.benchmark_group(format!("{name}/qd{QUEUE_DEPTH}"));
        group.throughput(Throughput::Elements(BATCH));
        group.sample_size(10);
        group.measurement_time(Duration::from_secs(5));
        for (op, write) in [("randwrite_4k", true), ("randread_4k", false)] {
            let mut seed = 0x9e37_79b9_7f4a_7c15u64;
            let (mut total_ops, mut total_time) = (0u64, Duration::ZERO);
            let before = uring.as_ref().map(|u| u.stats());
            group.bench_function(op, |b| {
                b.iter_custom(|iters| {
                    let t = run_qd(&*storage, iters * BATCH, write, &mut seed);
                    total_ops += iters * BATCH;
                    total_time += t;
                    t
                })
            });
            if total_ops == 0 {
                continue; // filtered out on the command line
            }
            let syscalls = match (before, uring.as_ref().map(|u| u.stats())) {
                (Some(b), Some(a)) => {
                    let n = (a.requests - b.requests).max(1) as f64;
                    format!(
                        "  (io_uring_enter/request {:.3}, eventfd wakeups/request {:.3})",
                        (a.enters - b.enters) as f64 / n,
                        (a.wakeups - b.wakeups) as f64 / n
                    )
                }
                _ => String::new(),
            };
            summary.push(format!(
                "{name:<12} {op:<13} direct={direct} QD{QUEUE_DEPTH}: {:>9.0} IOPS{syscalls}",
                total_ops as f64 / total_time.as_secs_f64()
            ));
        }
        group.finish();
    }
    println!("\nSummary (all timed iterations, warm-up included):");
    for line in summary {
        println!("  {line}");
    }
}

criterion_group!(benches, bench_engines);
criterion_main!(benches);
