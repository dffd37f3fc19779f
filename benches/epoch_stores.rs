//! Compare-and-advance latency of the epoch stores: the file store (fsync,
//! rename, directory fsync under an OFD lock) and the etcd store on a
//! 1-member and a 3-member loopback cluster (a linearizable read, then a
//! txn; etcd fsyncs its WAL on every member of the quorum). Needs
//! `/usr/bin/etcd` (Debian etcd-server).
//!
//! Run: `cargo bench --bench epoch_stores`

#[path = "../tests/etcd_cluster/mod.rs"]
mod etcd_cluster;

use blkshim::epoch::{EpochStore, FileEpochStore};
use criterion::{criterion_group, criterion_main, Criterion};
use std::time::Duration;

fn advance_loop<'a>(s: &'a dyn EpochStore, disk: &str) -> impl FnMut() + 'a {
    let mut e = s.current(disk).expect("current");
    let disk = disk.to_string();
    move || {
        e = s.compare_and_advance(&disk, e).expect("advance");
    }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("compare_and_advance");
    g.sample_size(30).measurement_time(Duration::from_secs(10));

    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let file = FileEpochStore::open(dir.path()).expect("file store");
    let mut f = advance_loop(&file, "vm1");
    g.bench_function("file", |b| b.iter(&mut f));

    for n in [1, 3] {
        let cluster = etcd_cluster::Cluster::start(n);
        let store = cluster.store("/bench");
        let mut f = advance_loop(&store, "vm1");
        g.bench_function(
            format!("etcd_{n}_member{}", if n > 1 { "s" } else { "" }),
            |b| b.iter(&mut f),
        );
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
