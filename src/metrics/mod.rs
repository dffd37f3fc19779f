//! Prometheus metrics (`blkshim serve --metrics ADDR`).
//!
//! The request path only touches atomics: [`DiskMetrics`] counts requests
//! and bytes and fills latency histograms with `fetch_add`s, never a lock,
//! so a scrape can never slow I/O. What [`Disk`] already counts (epoch,
//! writers, in flight, stale refusals, fenced, cancelled, storage errors)
//! is read from [`Disk::status`] at scrape time rather than counted twice.
//! A scrape encodes everything with `prometheus-client` in the OpenMetrics
//! text format; [`http`] serves it.

pub mod http;

use crate::handoff::{Disk, HandoffObserver};
use parking_lot::Mutex;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::info::Info;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

/// An NBD command as the metrics label it (`op`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Flush,
    Trim,
    WriteZeroes,
    BlockStatus,
}

impl Op {
    const ALL: [Op; 6] = [
        Op::Read,
        Op::Write,
        Op::Flush,
        Op::Trim,
        Op::WriteZeroes,
        Op::BlockStatus,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Trim => "trim",
            Op::WriteZeroes => "write_zeroes",
            Op::BlockStatus => "block_status",
        }
    }

    /// The latency histogram it goes to: reads, writes, and everything
    /// else (flush, trim, write-zeroes, block status).
    fn class(self) -> usize {
        match self {
            Op::Read => 0,
            Op::Write => 1,
            _ => 2,
        }
    }
}

const CLASSES: [&str; 3] = ["read", "write", "other"];

/// Request latency bucket bounds, seconds: 50 µs (a page-cache hit) to
/// 10 s (a storage path that hangs, a fence timeout).
pub const LATENCY_BUCKETS: [f64; 17] = [
    50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3,
    1.0, 2.5, 5.0, 10.0,
];

/// Hand-off duration bucket bounds, seconds: an epoch advance is a few
/// fsyncs (milliseconds); a drain may run to its deadline (tens of seconds).
pub const HANDOFF_BUCKETS: [f64; 12] = [
    1e-3, 5e-3, 10e-3, 50e-3, 100e-3, 500e-3, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// A histogram of durations in atomics: observing is three `fetch_add`s,
/// no lock (prometheus-client's own histogram takes a write lock). The
/// count is the sum of the buckets, read at scrape, so `_count` always
/// equals the `+Inf` bucket.
pub struct AtomicHistogram {
    bounds: &'static [f64],
    /// Per bucket, not cumulative; the last one is `+Inf`.
    buckets: Vec<AtomicU64>,
    sum_ns: AtomicU64,
}

impl AtomicHistogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        AtomicHistogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = self.bounds.partition_point(|&b| b < s);
        if let Some(b) = self.buckets.get(i) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    fn encode(&self, e: &mut MetricEncoder) -> fmt::Result {
        let buckets: Vec<(f64, u64)> = self
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::MAX))
            .zip(self.buckets.iter().map(|b| b.load(Ordering::Relaxed)))
            .collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        e.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }
}

/// What a front end (NBD connection, Xen ring) counts for one disk on its
/// request path.
pub struct DiskMetrics {
    /// Weak: a Xen back end's disk goes when its last vbd does, and its
    /// metrics with it.
    disk: Weak<Disk>,
    name: String,
    requests: [AtomicU64; 6],
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    latency: [AtomicHistogram; 3],
    /// Hand-offs by (method, outcome); rare, so a lock is fine here.
    handoffs: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    handoff_seconds: AtomicHistogram,
}

impl fmt::Debug for DiskMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DiskMetrics({:?})", self.name)
    }
}

impl DiskMetrics {
    fn new(disk: &Arc<Disk>) -> Self {
        DiskMetrics {
            disk: Arc::downgrade(disk),
            name: disk.name().to_string(),
            requests: Default::default(),
            bytes_read: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            latency: [(); 3].map(|()| AtomicHistogram::new(&LATENCY_BUCKETS)),
            handoffs: Mutex::new(BTreeMap::new()),
            handoff_seconds: AtomicHistogram::new(&HANDOFF_BUCKETS),
        }
    }

    /// Start timing a request; `None` (nothing measured, not even the
    /// clock read) when metrics are off.
    pub fn start(m: &Option<Arc<DiskMetrics>>, op: Op) -> Option<RequestTimer> {
        m.as_ref().map(|m| RequestTimer {
            m: Arc::clone(m),
            op,
            t0: Instant::now(),
        })
    }

    /// A request answered: counted once, its latency observed, and its
    /// payload counted when it succeeded (`ok_bytes`).
    pub fn done(&self, op: Op, took: Duration, ok_bytes: u64) {
        if let Some(c) = Op::ALL.iter().position(|&o| o == op) {
            self.requests[c].fetch_add(1, Ordering::Relaxed);
        }
        match op {
            Op::Read => self.bytes_read.fetch_add(ok_bytes, Ordering::Relaxed),
            Op::Write => self.bytes_written.fetch_add(ok_bytes, Ordering::Relaxed),
            _ => 0,
        };
        self.latency[op.class()].observe(took);
    }

    /// Requests of `op` answered so far.
    pub fn requests(&self, op: Op) -> u64 {
        Op::ALL
            .iter()
            .position(|&o| o == op)
            .map_or(0, |c| self.requests[c].load(Ordering::Relaxed))
    }
}

/// One request being timed; [`RequestTimer::done`] records it.
pub struct RequestTimer {
    m: Arc<DiskMetrics>,
    op: Op,
    t0: Instant,
}

impl RequestTimer {
    /// Record the request as answered; `ok_bytes`: its payload when it
    /// succeeded, else 0. Call before the reply is sent, so a client that
    /// has its reply sees it counted.
    pub fn done(self, ok_bytes: u64) {
        self.m.done(self.op, self.t0.elapsed(), ok_bytes);
    }
}

impl HandoffObserver for DiskMetrics {
    fn handoff(&self, _disk: &str, method: &'static str, outcome: &'static str, took: Duration) {
        *self.handoffs.lock().entry((method, outcome)).or_insert(0) += 1;
        self.handoff_seconds.observe(took);
    }
}

/// The process's metrics: every disk served, and the registry a scrape
/// encodes.
pub struct Metrics {
    registry: Registry,
    inner: Arc<Inner>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.fmt(f)
    }
}

struct Inner {
    disks: Mutex<Vec<Arc<DiskMetrics>>>,
    started: Instant,
}

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Metrics({} disks)", self.disks.lock().len())
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let inner = Arc::new(Inner {
            disks: Mutex::new(Vec::new()),
            started: Instant::now(),
        });
        let mut registry = Registry::with_prefix("blkshim");
        registry.register(
            "build",
            "The blkshim version running",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        registry.register_collector(Box::new(Scrape(Arc::clone(&inner))));
        Metrics { registry, inner }
    }

    /// Start counting for `disk`; its hand-offs are reported here too.
    /// Returns what the request path records into: the same for every
    /// caller of one disk (the vbds of a Xen back end share their disk).
    pub fn add_disk(&self, disk: &Arc<Disk>) -> Arc<DiskMetrics> {
        let mut disks = self.inner.disks.lock();
        disks.retain(|m| m.disk.strong_count() > 0);
        if let Some(m) = disks
            .iter()
            .find(|m| m.disk.upgrade().is_some_and(|d| Arc::ptr_eq(&d, disk)))
        {
            return Arc::clone(m);
        }
        let m = Arc::new(DiskMetrics::new(disk));
        if disk
            .set_handoff_observer(Arc::clone(&m) as Arc<dyn HandoffObserver>)
            .is_err()
        {
            log::warn!(
                "disk {:?}: hand-offs already observed elsewhere; not in these metrics",
                disk.name()
            );
        }
        disks.push(Arc::clone(&m));
        m
    }

    /// The OpenMetrics text of every metric now.
    pub fn encode(&self) -> Result<String, fmt::Error> {
        let mut out = String::with_capacity(16 << 10);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// Reads every disk at scrape time.
#[derive(Debug)]
struct Scrape(Arc<Inner>);

type Labels<'a> = Vec<(&'static str, &'a str)>;

/// One metric family: a descriptor, then one sample per label set.
fn family<'a>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    ty: MetricType,
    samples: impl IntoIterator<Item = (Labels<'a>, Sample<'a>)>,
) -> fmt::Result {
    let mut d = enc.encode_descriptor(name, help, None, ty)?;
    for (labels, v) in samples {
        if labels.is_empty() {
            // No labels: no `{}` after the name.
            put(&mut d, v)?;
        } else {
            put(&mut d.encode_family(&labels)?, v)?;
        }
    }
    Ok(())
}

fn put(m: &mut MetricEncoder, v: Sample) -> fmt::Result {
    match v {
        Sample::Counter(n) => m.encode_counter::<NoLabelSet, u64, u64>(&n, None),
        Sample::Gauge(n) => m.encode_gauge(&n),
        Sample::GaugeF(x) => m.encode_gauge(&x),
        Sample::Histogram(h) => h.encode(m),
    }
}

enum Sample<'a> {
    Counter(u64),
    Gauge(i64),
    GaugeF(f64),
    Histogram(&'a AtomicHistogram),
}

fn gauge(n: impl TryInto<i64>) -> Sample<'static> {
    Sample::Gauge(n.try_into().unwrap_or(i64::MAX))
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        use MetricType::{Counter, Gauge, Histogram};
        use Sample::Counter as C;
        let uptime = self.0.started.elapsed().as_secs_f64();
        family(
            &mut enc,
            "uptime_seconds",
            "Seconds since this process started serving",
            Gauge,
            [(vec![], Sample::GaugeF(uptime))],
        )?;
        // Disks still open (a Xen disk whose vbds are all gone is not).
        let live: Vec<(Arc<DiskMetrics>, Arc<Disk>)> = self
            .0
            .disks
            .lock()
            .iter()
            .filter_map(|m| Some((Arc::clone(m), m.disk.upgrade()?)))
            .collect();
        let disks: Vec<Arc<DiskMetrics>> = live.iter().map(|(m, _)| Arc::clone(m)).collect();
        let st: Vec<_> = live.iter().map(|(_, d)| d.status()).collect();
        drop(live);
        let per_disk = |f: &dyn Fn(&crate::handoff::DiskStatus) -> Sample<'static>| {
            st.iter()
                .map(|s| (vec![("disk", s.name.as_str())], f(s)))
                .collect::<Vec<_>>()
        };
        family(
            &mut enc,
            "epoch",
            "The disk's current epoch: writers below it are fenced",
            Gauge,
            per_disk(&|s| gauge(s.current_epoch)),
        )?;
        let mut writers = Vec::new();
        let epochs: Vec<Vec<(String, usize)>> = st
            .iter()
            .map(|s| {
                let mut by: BTreeMap<u64, usize> = BTreeMap::new();
                for w in &s.writers {
                    *by.entry(w.epoch).or_insert(0) += 1;
                }
                by.into_iter().map(|(e, n)| (e.to_string(), n)).collect()
            })
            .collect();
        for (s, by) in st.iter().zip(&epochs) {
            for (e, n) in by {
                writers.push((
                    vec![("disk", s.name.as_str()), ("epoch", e.as_str())],
                    gauge(*n),
                ));
            }
        }
        family(
            &mut enc,
            "writers",
            "Writers (NBD connections, Xen vbds) registered, by the epoch they write at",
            Gauge,
            writers,
        )?;
        family(
            &mut enc,
            "in_flight",
            "Requests in flight: waiting in the tracker or at the storage",
            Gauge,
            per_disk(&|s| gauge(s.in_flight)),
        )?;
        let refused = st.iter().flat_map(|s| {
            [
                (
                    vec![("disk", s.name.as_str()), ("stage", "request")],
                    C(s.refused_stale),
                ),
                (
                    vec![("disk", s.name.as_str()), ("stage", "connect")],
                    C(s.refused_stale_writers),
                ),
            ]
        });
        family(
            &mut enc,
            "refused_stale",
            "Refused as stale: a fenced writer's write, trim or write-zeroes (stage=request, EPERM), or a writer asking for an epoch below the disk's (stage=connect: at the NBD handshake or registration)",
            Counter,
            refused,
        )?;
        family(
            &mut enc,
            "fenced",
            "Requests at the storage when their writer was fenced: completed there, never acknowledged",
            Counter,
            per_disk(&|s| C(s.fenced)),
        )?;
        family(
            &mut enc,
            "cancelled",
            "Requests of a fenced writer cancelled before they reached the storage",
            Counter,
            per_disk(&|s| C(s.cancelled)),
        )?;
        family(
            &mut enc,
            "storage_errors",
            "Requests the storage completed with an error",
            Counter,
            per_disk(&|s| C(s.storage_errors)),
        )?;
        let names: Vec<&str> = disks.iter().map(|m| m.name.as_str()).collect();
        family(
            &mut enc,
            "requests",
            "NBD requests answered, by command",
            Counter,
            disks.iter().zip(&names).flat_map(|(m, n)| {
                Op::ALL
                    .iter()
                    .map(move |&op| (vec![("disk", *n), ("op", op.name())], C(m.requests(op))))
            }),
        )?;
        family(
            &mut enc,
            "bytes",
            "Payload bytes of successful reads (op=read) and writes (op=write)",
            Counter,
            disks.iter().zip(&names).flat_map(|(m, n)| {
                [
                    (
                        vec![("disk", *n), ("op", "read")],
                        C(m.bytes_read.load(Ordering::Relaxed)),
                    ),
                    (
                        vec![("disk", *n), ("op", "write")],
                        C(m.bytes_written.load(Ordering::Relaxed)),
                    ),
                ]
            }),
        )?;
        family(
            &mut enc,
            "request_duration_seconds",
            "From a request's submission to the disk (a write's payload received) until its reply is handed to the socket, by class (other: flush, trim, write-zeroes, block status)",
            Histogram,
            disks.iter().zip(&names).flat_map(|(m, n)| {
                m.latency
                    .iter()
                    .zip(CLASSES)
                    .map(move |(h, c)| (vec![("disk", *n), ("class", c)], Sample::Histogram(h)))
            }),
        )?;
        let handoffs: Vec<Vec<((&str, &str), u64)>> = disks
            .iter()
            .map(|m| m.handoffs.lock().iter().map(|(&k, &v)| (k, v)).collect())
            .collect();
        family(
            &mut enc,
            "handoffs",
            "Hand-offs, by method (advance, suspend, resume, take_over) and outcome",
            Counter,
            names.iter().zip(&handoffs).flat_map(|(n, hs)| {
                hs.iter().map(move |&((method, outcome), v)| {
                    (
                        vec![("disk", *n), ("method", method), ("outcome", outcome)],
                        C(v),
                    )
                })
            }),
        )?;
        family(
            &mut enc,
            "handoff_duration_seconds",
            "How long hand-offs took (a suspend: from its start to its record)",
            Histogram,
            disks
                .iter()
                .zip(&names)
                .map(|(m, n)| (vec![("disk", *n)], Sample::Histogram(&m.handoff_seconds))),
        )?;
        Ok(())
    }
}

/// Where `--metrics` binds: a bare port or `:PORT` binds the loopback
/// address only, as `--listen` does (metrics name the disks served).
pub fn bind_addr(addr: &str) -> String {
    match addr.strip_prefix(':') {
        Some(port) => format!("127.0.0.1:{port}"),
        None if !addr.contains(':') => format!("127.0.0.1:{addr}"),
        None => addr.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_port_binds_loopback() {
        assert_eq!(bind_addr("9100"), "127.0.0.1:9100");
        assert_eq!(bind_addr(":9100"), "127.0.0.1:9100");
        assert_eq!(bind_addr("0.0.0.0:9100"), "0.0.0.0:9100");
        assert_eq!(bind_addr("[::1]:9100"), "[::1]:9100");
    }

    /// Hand-offs of every kind are counted by method and outcome, and
    /// timed; requests recorded show in their op's counters and class.
    #[test]
    fn a_scrape_shows_hand_offs_and_requests() {
        use crate::epoch::MemEpochStore;
        use crate::handoff::{DiskOptions, SuspendMode};
        use crate::storage::MemStorage;
        let disk = Disk::open(
            "vm1",
            Arc::new(MemStorage::new(1 << 20)),
            Arc::new(MemEpochStore::default()),
            DiskOptions {
                auto_advance: false,
                fence_timeout: None,
            },
        )
        .unwrap();
        let m = Metrics::new();
        let dm = m.add_disk(&disk);
        let record = disk
            .suspend(
                0,
                SuspendMode::Drain {
                    timeout: Duration::from_secs(1),
                },
            )
            .unwrap();
        disk.resume(&record).unwrap();
        assert!(disk.resume(&record).is_err(), "a replayed record");
        disk.take_over(1).unwrap();
        assert!(disk.register(Some(0), "stale").is_err());
        dm.done(Op::Write, Duration::from_millis(3), 4096);
        dm.done(Op::Trim, Duration::from_micros(70), 0);
        let text = m.encode().unwrap();
        for line in [
            "blkshim_build_info{version=\"",
            "blkshim_epoch{disk=\"vm1\"} 2\n",
            "blkshim_handoffs_total{disk=\"vm1\",method=\"suspend\",outcome=\"drained\"} 1\n",
            "blkshim_handoffs_total{disk=\"vm1\",method=\"resume\",outcome=\"ok\"} 1\n",
            "blkshim_handoffs_total{disk=\"vm1\",method=\"resume\",outcome=\"stale\"} 1\n",
            "blkshim_handoffs_total{disk=\"vm1\",method=\"take_over\",outcome=\"ok\"} 1\n",
            "blkshim_handoff_duration_seconds_count{disk=\"vm1\"} 4\n",
            "blkshim_refused_stale_total{disk=\"vm1\",stage=\"connect\"} 1\n",
            "blkshim_requests_total{disk=\"vm1\",op=\"write\"} 1\n",
            "blkshim_requests_total{disk=\"vm1\",op=\"trim\"} 1\n",
            "blkshim_bytes_total{disk=\"vm1\",op=\"write\"} 4096\n",
            "blkshim_request_duration_seconds_count{disk=\"vm1\",class=\"write\"} 1\n",
            "blkshim_request_duration_seconds_bucket{le=\"0.0025\",disk=\"vm1\",class=\"write\"} 0\n",
            "blkshim_request_duration_seconds_bucket{le=\"0.005\",disk=\"vm1\",class=\"write\"} 1\n",
            "blkshim_request_duration_seconds_count{disk=\"vm1\",class=\"other\"} 1\n",
            "# EOF\n",
        ] {
            assert!(text.contains(line), "{line:?} not in:\n{text}");
        }
    }

    #[test]
    fn the_histogram_puts_each_duration_in_its_bucket() {
        let h = AtomicHistogram::new(&LATENCY_BUCKETS);
        h.observe(Duration::from_micros(10)); // first bucket
        h.observe(Duration::from_micros(50)); // on the bound: le=0.00005
        h.observe(Duration::from_millis(3)); // le=0.005
        h.observe(Duration::from_secs(60)); // +Inf
        let got: Vec<u64> = h
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        assert_eq!(got[0], 2);
        assert_eq!(got[6], 1);
        assert_eq!(got[LATENCY_BUCKETS.len()], 1);
        assert_eq!(h.count(), 4);
    }
}
