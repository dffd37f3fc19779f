//! A fio-like load generator for vhost-user-blk backends (blkshim's,
//! qemu-storage-daemon's), on our own frontend tests/support/vhost_client.rs:
//! one connection, `--jobs N` queues each driven by its own thread with
//! `--iodepth` requests in flight, each with its own 4096-aligned buffer.
//!
//!   cargo run --release --example vhost_blk_load -- --socket PATH
//!       [--rw randwrite|randread|write|read] [--bs 4k] [--iodepth 32]
//!       [--jobs 1] [--runtime 10] [--size BYTES (default: the device's)]
//!       [--no-event-idx]
//!
//! Prints one machine-readable line:
//!   vhost_blk_load rw=randwrite bs=4096 iodepth=32 jobs=1 runtime=10.00 ios=N iops=N mbps=X errors=0
//! (mbps in 10^6 bytes per second, as fio's bw_bytes / 1e6).

#[path = "../tests/support/vhost_client.rs"]
mod vhost_client;

use std::process::ExitCode;
use std::sync::Barrier;
use std::time::{Duration, Instant};
use vhost_client::{ClientOptions, Completion, ReqType, VhostBlkClient};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Rw {
    RandWrite,
    RandRead,
    Write,
    Read,
}

struct Args {
    socket: String,
    rw: Rw,
    bs: usize,
    iodepth: usize,
    jobs: usize,
    runtime: f64,
    size: Option<u64>,
    event_idx: bool,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mul) = match s.chars().last().map(|c| c.to_ascii_lowercase()) {
        Some('k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('m') => (&s[..s.len() - 1], 1 << 20),
        Some('g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .map(|n| n * mul)
        .map_err(|e| format!("bad size {s}: {e}"))
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        socket: String::new(),
        rw: Rw::RandWrite,
        bs: 4096,
        iodepth: 32,
        jobs: 1,
        runtime: 10.0,
        size: None,
        event_idx: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let (k, inline) = match k.split_once('=') {
            Some((k, v)) => (k.to_string(), Some(v.to_string())),
            None => (k, None),
        };
        if k == "--no-event-idx" {
            a.event_idx = false;
            continue;
        }
        let v = match inline {
            Some(v) => v,
            None => it.next().ok_or(format!("{k} needs a value"))?,
        };
        match k.as_str() {
            "--socket" => a.socket = v,
            "--rw" => {
                a.rw = match v.as_str() {
                    "randwrite" => Rw::RandWrite,
                    "randread" => Rw::RandRead,
                    "write" => Rw::Write,
                    "read" => Rw::Read,
                    _ => return Err(format!("unknown --rw {v}")),
                }
            }
            "--bs" => a.bs = parse_size(&v)? as usize,
            "--iodepth" => a.iodepth = v.parse().map_err(|e| format!("--iodepth: {e}"))?,
            "--jobs" => a.jobs = v.parse().map_err(|e| format!("--jobs: {e}"))?,
            "--runtime" => a.runtime = v.parse().map_err(|e| format!("--runtime: {e}"))?,
            "--size" => a.size = Some(parse_size(&v)?),
            _ => return Err(format!("unknown argument {k}")),
        }
    }
    if a.socket.is_empty() {
        return Err("--socket is required".into());
    }
    if a.bs == 0 || a.bs % 512 != 0 || a.iodepth == 0 || a.iodepth > 341 || a.jobs == 0 {
        return Err("--bs must be a multiple of 512, 1 <= --iodepth <= 341, --jobs >= 1".into());
    }
    Ok(a)
}

/// xorshift64*: cheap offsets, one generator per job.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

#[derive(Default)]
struct JobResult {
    ios: u64,
    errors: u64,
    elapsed: Duration,
}

fn main() -> ExitCode {
    // A job that panics must not leave the others waiting (barrier) or
    // the bench script waiting for this process.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        std::process::exit(1);
    }));
    let a = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("vhost_blk_load: {e}");
            return ExitCode::from(2);
        }
    };
    let opts = ClientOptions {
        queues: a.jobs,
        queue_size: (3 * a.iodepth).next_power_of_two().max(4) as u16,
        slots: a.iodepth,
        slot_bytes: a.bs,
        event_idx: a.event_idx,
    };
    let mut client = match VhostBlkClient::connect_with(&a.socket, &opts) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vhost_blk_load: connect {}: {e}", a.socket);
            return ExitCode::FAILURE;
        }
    };
    let dev = client.config().size_bytes();
    let size = a.size.map_or(dev, |s| s.min(dev));
    let blocks = size / a.bs as u64;
    if blocks == 0 {
        eprintln!("vhost_blk_load: device of {dev} bytes is smaller than --bs");
        return ExitCode::FAILURE;
    }
    let (write, random) = match a.rw {
        Rw::RandWrite => (true, true),
        Rw::RandRead => (false, true),
        Rw::Write => (true, false),
        Rw::Read => (false, false),
    };
    let req = if write { ReqType::Out } else { ReqType::In };
    let runtime = Duration::from_secs_f64(a.runtime);
    let barrier = Barrier::new(a.jobs);
    let bs = a.bs;
    let iodepth = a.iodepth;

    let results: Vec<JobResult> = std::thread::scope(|sc| {
        let handles: Vec<_> = client
            .queues_mut()
            .iter_mut()
            .map(|q| {
                let barrier = &barrier;
                sc.spawn(move || {
                    let seed = (q.index() as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03);
                    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ seed);
                    let mut seq = 0u64;
                    let mut next_off = || {
                        let b = if random {
                            rng.next() % blocks
                        } else {
                            let b = seq % blocks;
                            seq += 1;
                            b
                        };
                        b * bs as u64
                    };
                    let mut slots = Vec::with_capacity(iodepth);
                    while let Some(s) = q.alloc() {
                        for (i, b) in q.buf_mut(s).iter_mut().enumerate() {
                            *b = (i as u8) ^ 0x5a ^ (s as u8);
                        }
                        slots.push(s);
                    }
                    barrier.wait();
                    let start = Instant::now();
                    let deadline = start + runtime;
                    for &s in &slots {
                        q.submit(s, req, next_off(), bs);
                    }
                    q.kick();
                    let mut r = JobResult::default();
                    let mut out: Vec<Completion> = Vec::with_capacity(iodepth);
                    let mut stopping = false;
                    while q.in_flight() > 0 {
                        out.clear();
                        q.wait(&mut out, Some(Duration::from_secs(30)))
                            .expect("wait on the call eventfd");
                        if out.is_empty() {
                            eprintln!("queue {}: no completion in 30 s", q.index());
                            r.errors += q.in_flight() as u64;
                            break;
                        }
                        if !stopping && Instant::now() >= deadline {
                            stopping = true;
                            r.elapsed = start.elapsed();
                        }
                        for c in &out {
                            if stopping {
                                continue; // drained, not counted
                            }
                            if c.status == 0 {
                                r.ios += 1;
                            } else {
                                r.errors += 1;
                            }
                            q.submit(c.slot, req, next_off(), bs);
                        }
                        q.kick();
                    }
                    if !stopping {
                        r.elapsed = start.elapsed();
                    }
                    r
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });

    let ios: u64 = results.iter().map(|r| r.ios).sum();
    let errors: u64 = results.iter().map(|r| r.errors).sum();
    let secs = results
        .iter()
        .map(|r| r.elapsed.as_secs_f64())
        .fold(0.0, f64::max)
        .max(1e-9);
    let iops = ios as f64 / secs;
    let rw = match a.rw {
        Rw::RandWrite => "randwrite",
        Rw::RandRead => "randread",
        Rw::Write => "write",
        Rw::Read => "read",
    };
    println!(
        "vhost_blk_load rw={rw} bs={bs} iodepth={iodepth} jobs={} runtime={secs:.2} ios={ios} iops={iops:.0} mbps={:.1} errors={errors}",
        a.jobs,
        iops * bs as f64 / 1e6
    );
    if errors > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
