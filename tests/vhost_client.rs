//! tests/support/vhost_client.rs, our vhost-user-blk frontend, against
//! qemu-storage-daemon's vhost-user-blk export (skipped when
//! /usr/bin/qemu-storage-daemon is missing): patterns written and read back
//! over two queues, flush, discard, write-zeroes, get-id, pipelined
//! requests, and a malformed chain.

#[path = "support/vhost_client.rs"]
mod vhost_client;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use vhost_client::{ClientOptions, Completion, RawDesc, ReqType, VhostBlkClient};

const QSD: &str = "/usr/bin/qemu-storage-daemon";
const DISK: u64 = 64 << 20;

struct Qsd {
    child: Child,
    sock: PathBuf,
    img: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// qemu-storage-daemon exporting a fresh DISK-byte file with `queues`
/// queues; None (test skipped) when it is not installed.
fn qsd(queues: usize, direct: bool) -> Option<Qsd> {
    if !Path::new(QSD).exists() {
        eprintln!("skipped: no {QSD}");
        return None;
    }
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let img = dir.path().join("disk.img");
    let sock = dir.path().join("vhost.sock");
    std::fs::File::create(&img).unwrap().set_len(DISK).unwrap();
    let child = Command::new(QSD)
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=f,filename={},cache.direct={},aio=io_uring",
            img.display(),
            if direct { "on" } else { "off" }
        ))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable=on,num-queues={queues}",
            sock.display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut q = Qsd {
        child,
        sock,
        img,
        _dir: dir,
    };
    let t = Instant::now();
    while !q.sock.exists() {
        assert!(
            q.child.try_wait().unwrap().is_none(),
            "qemu-storage-daemon exited"
        );
        assert!(t.elapsed() < Duration::from_secs(10), "no socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(q)
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn qsd_patterns_over_two_queues_read_back_and_flush() {
    let Some(s) = qsd(2, true) else { return };
    let mut c = VhostBlkClient::connect(&s.sock, 2, 128, 16 << 20).unwrap();
    let cfg = c.config();
    assert_eq!(cfg.capacity * 512, DISK, "{cfg:?}");
    assert_eq!(cfg.num_queues, 2, "{cfg:?}");
    assert!(cfg.blk_size >= 512, "{cfg:?}");
    assert_eq!(c.num_queues(), 2);

    // Each queue writes its own areas; the other queue reads them back.
    let areas = [
        (0u64, 4096usize),
        (1 << 20, 65536),
        (5 << 20, 1 << 20),
        (DISK - 8192, 8192),
    ];
    for (i, &(off, len)) in areas.iter().enumerate() {
        c.write(i % 2, off, &pattern(i as u64, len)).unwrap();
    }
    c.flush(0).unwrap();
    c.flush(1).unwrap();
    for (i, &(off, len)) in areas.iter().enumerate() {
        let mut b = vec![0; len];
        c.read((i + 1) % 2, off, &mut b).unwrap();
        assert!(b == pattern(i as u64, len), "area {i} at {off} differs");
    }
    // Writes larger than a slot's buffer are split; the file has them.
    let big = pattern(99, 3 << 20);
    c.write(1, 8 << 20, &big).unwrap();
    c.flush(1).unwrap();
    let on_file = std::fs::read(&s.img).unwrap();
    assert!(on_file[8 << 20..11 << 20] == big[..]);
    assert!(on_file[..4096] == pattern(0, 4096)[..]);
    // Past the end: an error status, not a hang.
    let mut b = vec![0; 4096];
    assert!(c.read(0, DISK, &mut b).is_err());
}

#[test]
fn qsd_discard_write_zeroes_and_get_id() {
    let Some(s) = qsd(1, false) else { return };
    let mut c = VhostBlkClient::connect(&s.sock, 1, 64, 4 << 20).unwrap();
    assert!(c.has_feature(virtio_bindings::virtio_blk::VIRTIO_BLK_F_DISCARD));
    assert!(c.has_feature(virtio_bindings::virtio_blk::VIRTIO_BLK_F_WRITE_ZEROES));
    let p = pattern(7, 1 << 20);
    c.write(0, 0, &p).unwrap();
    c.write_zeroes(0, 4096, 8192, false).unwrap();
    c.write_zeroes(0, 65536, 65536, true).unwrap();
    let mut b = vec![0xaa; 1 << 20];
    c.read(0, 0, &mut b).unwrap();
    let mut want = p.clone();
    want[4096..12288].fill(0);
    want[65536..131072].fill(0);
    assert!(b == want, "write-zeroes did not zero exactly its ranges");
    c.discard(0, 512 << 10, 256 << 10).unwrap();
    c.flush(0).unwrap();
    // Discarded blocks read back as anything; the rest is untouched.
    c.read(0, 0, &mut b).unwrap();
    assert!(b[..512 << 10] == want[..512 << 10]);
    assert!(b[768 << 10..] == want[768 << 10..]);
    let id = c.get_id(0).unwrap();
    assert!(!id.is_empty() && id.len() <= 20, "{id:?}");
}

#[test]
fn qsd_pipelined_requests_on_two_queues() {
    pipelined(true);
}

#[test]
fn qsd_pipelined_requests_without_event_idx() {
    pipelined(false);
}

/// 2 queues, 32 requests in flight on each from its own thread, slots
/// reused as they complete; then every block read back.
fn pipelined(event_idx: bool) {
    let Some(s) = qsd(2, true) else { return };
    let opts = ClientOptions {
        queues: 2,
        queue_size: 128,
        slots: 32,
        slot_bytes: 4096,
        event_idx,
    };
    let mut c = VhostBlkClient::connect_with(&s.sock, &opts).unwrap();
    assert_eq!(c.event_idx(), event_idx, "qsd offers EVENT_IDX");
    let qs = c.queues_mut();
    // 2 queues x 32 in flight x 4 rounds of 4 KiB writes, each block once.
    std::thread::scope(|sc| {
        for q in qs.iter_mut() {
            sc.spawn(move || {
                let qi = q.index() as u64;
                let mut next = 0u64;
                let mut out: Vec<Completion> = Vec::new();
                let mut done = 0;
                while let Some(slot) = q.alloc() {
                    let blk = qi * 1000 + next;
                    q.buf_mut(slot).copy_from_slice(&pattern(blk, 4096));
                    q.submit(slot, ReqType::Out, blk * 4096, 4096);
                    next += 1;
                }
                q.kick();
                while done < 128 {
                    out.clear();
                    q.wait(&mut out, Some(Duration::from_secs(10))).unwrap();
                    assert!(!out.is_empty(), "queue {qi}: no completion");
                    for c in &out {
                        assert_eq!(c.status, 0, "queue {qi}: {c:?}");
                        done += 1;
                        if next < 128 {
                            let blk = qi * 1000 + next;
                            q.buf_mut(c.slot).copy_from_slice(&pattern(blk, 4096));
                            q.submit(c.slot, ReqType::Out, blk * 4096, 4096);
                            next += 1;
                        } else {
                            q.release(c.slot);
                        }
                    }
                    q.kick();
                }
                assert_eq!(q.in_flight(), 0);
            });
        }
    });
    for qi in 0..2u64 {
        for n in 0..128u64 {
            let blk = qi * 1000 + n;
            let mut b = vec![0; 4096];
            c.read(1 - qi as usize, blk * 4096, &mut b).unwrap();
            assert!(b == pattern(blk, 4096), "block {blk}");
        }
    }
}

#[test]
fn qsd_malformed_chain_gets_no_ok_and_a_new_connection_works() {
    let Some(s) = qsd(1, true) else { return };
    {
        let mut c = VhostBlkClient::connect(&s.sock, 1, 64, 1 << 20).unwrap();
        let q = c.queue(0);
        let slot = q.alloc().unwrap();
        q.write_header(slot, virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN, 0);
        // A read whose only descriptors are device-readable: nowhere to put
        // data or status.
        q.submit_raw(
            slot,
            &[RawDesc {
                addr: q.header_gpa(slot),
                len: 16,
                flags: 0,
                next: 0,
            }],
        );
        q.kick();
        let mut out = Vec::new();
        q.wait(&mut out, Some(Duration::from_millis(500))).unwrap();
        assert!(out.iter().all(|c| c.status != 0), "{out:?}");
    }
    let mut c = VhostBlkClient::connect(&s.sock, 1, 64, 1 << 20).unwrap();
    c.write(0, 0, &pattern(1, 4096)).unwrap();
    let mut b = vec![0; 4096];
    c.read(0, 0, &mut b).unwrap();
    assert!(b == pattern(1, 4096));
}
