//! The Xen ring path: requests parsed and answered per second through the
//! emulated grant table and event channels, by the real xenbus back end and
//! dataplane (protected: tracker + epochs), against an in-memory disk.
//! Variants: 4 KiB writes/reads with grant copy or persistent grants, and
//! 256 KiB writes as indirect requests (64 segments). The emulated blkfront's
//! own work (granting pages, copying data in) is included in every number.

use blkshim::epoch::MemEpochStore;
use blkshim::storage::{BlockStorage, MemStorage};
use blkshim::xen::backend::{self, BackendConfig, OpenedDisk, VbdHandle};
use blkshim::xen::frontend_emu::{Bio, BioOp, EmulatedFrontend, FrontendOptions};
use blkshim::xen::grant::EmulatedGuest;
use blkshim::xen::platform::EmulatedPlatform;
use blkshim::xen::xenstore::{EmulatedXenStore, XenStore, XBT_NULL};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::sync::Arc;
use std::time::Duration;

const FE: &str = "/local/domain/7/device/vbd/51712";
const BE: &str = "/local/domain/0/backend/vbd/7/51712";
const BATCH: u64 = 64;

struct Rig {
    _xs: EmulatedXenStore,
    _vbd: VbdHandle,
    fe: EmulatedFrontend,
    next: u64,
}

fn rig(persistent: bool, indirect: u32) -> Rig {
    let xs = EmulatedXenStore::new();
    let platform = EmulatedPlatform::new();
    let storage: Arc<dyn BlockStorage> = Arc::new(MemStorage::new(64 << 20));
    let epochs = Arc::new(MemEpochStore::default());
    for (k, v) in [
        (format!("{BE}/params"), "aio:/bench.img".to_string()),
        (format!("{BE}/mode"), "w".into()),
        (format!("{BE}/frontend"), FE.into()),
        (format!("{BE}/frontend-id"), "7".into()),
        (format!("{BE}/state"), "1".into()),
        (format!("{FE}/state"), "1".into()),
    ] {
        xs.write_str(XBT_NULL, &k, &v).unwrap();
    }
    let vbd = backend::spawn(
        xs.connect(),
        platform.clone(),
        BE,
        Arc::new(move |_: &str| {
            Ok(OpenedDisk {
                name: "bench".into(),
                storage: Arc::clone(&storage),
                epochs: epochs.clone(),
            })
        }),
        BackendConfig::default(),
    )
    .unwrap();
    let mut fe = EmulatedFrontend::new(
        EmulatedGuest::new(7, 8192).unwrap(),
        FrontendOptions {
            ring_page_order: 2,
            persistent,
            max_indirect_segments: indirect,
            ..FrontendOptions::default()
        },
    )
    .unwrap();
    fe.connect(&xs, &platform, FE, BE).unwrap();
    Rig {
        _xs: xs,
        _vbd: vbd,
        fe,
        next: 1,
    }
}

/// Submits `BATCH` bios of `sectors` and waits for all of them.
fn batch(r: &mut Rig, op: BioOp, sectors: u64) {
    for i in 0..BATCH {
        let tag = r.next;
        r.next += 1;
        r.fe.submit(Bio {
            tag,
            op,
            sector: (i * sectors) % ((64 << 20) / 512 - sectors),
            nr_sectors: sectors,
            data: if op == BioOp::Write {
                vec![tag as u8; sectors as usize * 512]
            } else {
                Vec::new()
            },
        })
        .unwrap();
    }
    let mut done = 0;
    while done < BATCH as usize {
        let n = r.fe.poll().unwrap().len();
        if n == 0 {
            r.fe.wait(Duration::from_millis(1)).unwrap();
        }
        done += n;
    }
}

fn ring_path(c: &mut Criterion) {
    let mut g = c.benchmark_group("xen_ring");
    g.throughput(Throughput::Elements(BATCH));
    g.measurement_time(Duration::from_secs(4));
    g.sample_size(20);
    for (name, persistent, indirect, op, sectors) in [
        ("write_4k_grant_copy", false, 0, BioOp::Write, 8),
        ("write_4k_persistent", true, 0, BioOp::Write, 8),
        ("read_4k_grant_copy", false, 0, BioOp::Read, 8),
        ("read_4k_persistent", true, 0, BioOp::Read, 8),
        (
            "write_256k_indirect_grant_copy",
            false,
            64,
            BioOp::Write,
            512,
        ),
        (
            "write_256k_indirect_persistent",
            true,
            64,
            BioOp::Write,
            512,
        ),
        (
            "write_256k_direct_split_grant_copy",
            false,
            0,
            BioOp::Write,
            512,
        ),
    ] {
        let mut r = rig(persistent, indirect);
        g.bench_function(name, |b| b.iter(|| batch(&mut r, op, sectors)));
    }
    g.finish();
}

criterion_group!(benches, ring_path);
criterion_main!(benches);
