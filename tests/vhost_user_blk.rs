//! `blkshim serve --vhost-user-blk` driven by a userspace vhost-user-blk
//! frontend (tests/support/vhost_client.rs, on the rust-vmm `vhost`
//! crate's Frontend API, a split virtqueue in shared memfd memory): data
//! over several queues, flush, discard, write-zeroes, get-id, the config
//! space; reconnect; the migration epoch hand-off (a late source write is
//! refused and never lands); malformed chains answered while the daemon
//! keeps serving; `ctl vhost-add` / `vhost-remove`.

mod common;
#[path = "support/vhost_client.rs"]
mod vhost_client;

use common::*;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::time::{Duration, Instant};
use vhost::VhostBackend;
use vhost_client::{ClientOptions, RawDesc, VhostBlkClient};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

const MEM: usize = 8 << 20;

fn connect(sock: &Path, queues: usize) -> VhostBlkClient {
    // The socket is bound before the NBD socket the server waits on, but
    // a reconnect races the previous connection's teardown: retry a while.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match VhostBlkClient::connect(sock, queues, 64, MEM) {
            Ok(c) => return c,
            Err(e) if Instant::now() < deadline => {
                eprintln!("connect {}: {e}; retrying", sock.display());
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("connect {}: {e}", sock.display()),
        }
    }
}

fn image_at(srv: &Server, disk: &str, offset: u64, len: usize) -> Vec<u8> {
    let mut f = std::fs::File::open(srv.image(disk)).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut b = vec![0u8; len];
    f.read_exact(&mut b).unwrap();
    b
}

fn vhost_status(srv: &Server, disk: &str) -> Vec<serde_json::Value> {
    srv.disk_status(disk)["vhost_user_blk"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn vhost_write_read_flush_discard_zeroes_getid_two_queues() {
    let srv = Server::start(
        &["vm1"],
        "64M",
        &[
            "--vhost-user-blk",
            "vm1={dir}/vm1.vhost",
            "--vhost-queues",
            "2",
        ],
    );
    let sock = srv.path("vm1.vhost");
    let mut c = connect(&sock, 2);
    let cfg = c.config();
    assert_eq!(cfg.size_bytes(), 64 << 20);
    assert_eq!(cfg.num_queues, 2);
    assert_eq!(cfg.blk_size, 512);
    assert!(cfg.seg_max >= 1);
    assert!(cfg.max_write_zeroes_sectors > 0 && cfg.max_write_zeroes_seg == 1);
    assert!(c.has_feature(VIRTIO_BLK_F_FLUSH));
    assert!(c.has_feature(VIRTIO_BLK_F_WRITE_ZEROES));
    assert!(c.has_feature(VIRTIO_BLK_F_MQ));
    assert!(c.event_idx(), "EVENT_IDX negotiated");
    assert_eq!(c.num_queues(), 2);

    // Write on queue 0, read back on queue 1 and from the image.
    let a = random_bytes(64 << 10, 1);
    let b = random_bytes(8 << 10, 2);
    c.write(0, 1 << 20, &a).unwrap();
    c.write(1, 3 << 20, &b).unwrap();
    let mut back = vec![0u8; a.len()];
    c.read(1, 1 << 20, &mut back).unwrap();
    assert!(back == a, "queue 1 reads queue 0's write");
    let mut back = vec![0u8; b.len()];
    c.read(0, 3 << 20, &mut back).unwrap();
    assert!(back == b);
    c.flush(0).unwrap();
    c.flush(1).unwrap();
    assert!(image_at(&srv, "vm1", 1 << 20, a.len()) == a);

    // Write-zeroes (with and without unmap) and discard.
    c.write_zeroes(0, 1 << 20, 8192, false).unwrap();
    c.write_zeroes(1, (1 << 20) + 8192, 8192, true).unwrap();
    let mut back = vec![0xffu8; 16384];
    c.read(0, 1 << 20, &mut back).unwrap();
    assert!(back.iter().all(|&x| x == 0), "zeroed");
    assert!(back.len() == 16384);
    if c.has_feature(VIRTIO_BLK_F_DISCARD) {
        c.discard(1, 3 << 20, 8192).unwrap();
        let mut back = vec![0xffu8; 8192];
        c.read(1, 3 << 20, &mut back).unwrap();
        assert!(back.iter().all(|&x| x == 0), "discarded reads as zeroes");
    }
    assert_eq!(c.get_id(0).unwrap(), b"vm1");

    // Past the end: IOERR, and the device goes on.
    let e = c.read(0, 64 << 20, &mut [0u8; 4096]).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    c.write(0, 0, &a[..4096]).unwrap();

    let st = vhost_status(&srv, "vm1");
    assert_eq!(st.len(), 1, "{st:?}");
    assert_eq!(st[0]["connected"], true);
    assert!(st[0]["requests"].as_u64().unwrap() >= 12, "{st:?}");
}

#[test]
fn vhost_reconnect_after_the_frontend_goes_away() {
    let srv = Server::start(
        &["vm1"],
        "16M",
        &["--vhost-user-blk", "vm1@3={dir}/vm1.vhost"],
    );
    let sock = srv.path("vm1.vhost");
    let a = random_bytes(16 << 10, 7);
    {
        let mut c = connect(&sock, 1);
        c.write(0, 0, &a).unwrap();
        assert_eq!(
            srv.disk_status("vm1")["current_epoch"],
            3,
            "first write advanced"
        );
    } // the frontend goes away (socket closed, no GET_VRING_BASE)
    for round in 0..3 {
        let mut c = connect(&sock, 2);
        let mut back = vec![0u8; a.len()];
        c.read(round % 2, 0, &mut back).unwrap();
        assert!(back == a, "round {round}: data survives the reconnect");
        c.write(0, 65536, &a).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let st = vhost_status(&srv, "vm1");
        if st[0]["connections"] == 4 {
            break;
        }
        assert!(Instant::now() < deadline, "{st:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(srv.disk_status("vm1")["current_epoch"], 3);
    // SIGTERM with a frontend connected: cut, drained, flushed, exit 0.
    let mut srv = srv;
    let mut c = connect(&sock, 1);
    c.write(0, 0, &a).unwrap();
    let t = Instant::now();
    assert_eq!(srv.stop(), Some(0), "{}", srv.log());
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert!(!sock.exists(), "socket removed at exit");
}

#[test]
fn vhost_migration_epoch_late_source_write_refused_storage_keeps_destination_data() {
    let srv = Server::start(
        &["vm1"],
        "16M",
        &[
            "--vhost-user-blk",
            "vm1@1={dir}/src.vhost",
            "--vhost-user-blk",
            "vm1@2={dir}/dst.vhost",
        ],
    );
    let src_data = vec![0x11u8; 4096];
    let dst_data = vec![0x22u8; 4096];
    let late = vec![0x33u8; 4096];
    let mut src = connect(&srv.path("src.vhost"), 1);
    src.write(0, 0, &src_data).unwrap();
    assert_eq!(srv.disk_status("vm1")["current_epoch"], 1);
    // The destination connects (qemu -incoming): registered, nothing fenced.
    let mut dst = connect(&srv.path("dst.vhost"), 1);
    src.write(0, 8192, &src_data).unwrap();
    assert_eq!(srv.disk_status("vm1")["current_epoch"], 1);
    let mut back = vec![0u8; 4096];
    dst.read(0, 0, &mut back).unwrap();
    assert!(back == src_data, "the destination reads the source's data");
    assert_eq!(
        srv.disk_status("vm1")["current_epoch"],
        1,
        "a read does not advance"
    );
    // The destination's first write advances to 2 and fences 1.
    dst.write(0, 0, &dst_data).unwrap();
    assert_eq!(srv.disk_status("vm1")["current_epoch"], 2);
    // The late source write, zeroes and discard: IOERR, never on the storage.
    let e = src.write(0, 0, &late).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    let e = src.write(0, 1 << 20, &late).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    let e = src.write_zeroes(0, 0, 4096, false).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert!(
        image_at(&srv, "vm1", 0, 4096) == dst_data,
        "the storage holds the destination's data"
    );
    assert!(image_at(&srv, "vm1", 1 << 20, 4096).iter().all(|&x| x == 0));
    dst.read(0, 0, &mut back).unwrap();
    assert!(back == dst_data);
    // Reads of the fenced source still work (as over NBD).
    src.read(0, 0, &mut back).unwrap();
    assert!(back == dst_data);
    let st = srv.disk_status("vm1");
    assert!(st["refused_stale"].as_u64().unwrap() >= 3, "{st}");
    let vs = vhost_status(&srv, "vm1");
    let s = vs.iter().find(|v| v["epoch"] == 1).unwrap();
    assert!(s["refused_stale"].as_u64().unwrap() >= 3, "{vs:?}");
    // A reconnect on the source socket is fenced too: IOERR, nothing lands.
    drop(src);
    let mut src = connect(&srv.path("src.vhost"), 1);
    let e = src.write(0, 0, &late).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert!(image_at(&srv, "vm1", 0, 4096) == dst_data);
    assert!(srv.log().contains("fenced"), "logged");
}

#[test]
fn vhost_malformed_chains_answered_and_daemon_keeps_serving() {
    let srv = Server::start(
        &["vm1"],
        "16M",
        &["--vhost-user-blk", "vm1={dir}/vm1.vhost"],
    );
    let sock = srv.path("vm1.vhost");
    let mut c = connect(&sock, 1);
    let q = c.queue(0);
    let next = VRING_DESC_F_NEXT as u16;
    let wr = VRING_DESC_F_WRITE as u16;
    let mut answered = Vec::new();
    // 1. Unknown request type: UNSUPP.
    let s = q.alloc().unwrap();
    q.write_header(s, 99, 0);
    let d0 = q.desc_index(s);
    q.submit_raw(
        s,
        &[
            RawDesc {
                addr: q.header_gpa(s),
                len: 16,
                flags: next,
                next: d0 + 1,
            },
            RawDesc {
                addr: q.status_gpa(s),
                len: 1,
                flags: wr,
                next: 0,
            },
        ],
    );
    q.kick();
    // 2. No status byte (the last descriptor is device-readable).
    let s2 = q.alloc().unwrap();
    q.write_header(s2, VIRTIO_BLK_T_IN, 0);
    q.submit_raw(
        s2,
        &[RawDesc {
            addr: q.header_gpa(s2),
            len: 16,
            flags: 0,
            next: 0,
        }],
    );
    q.kick();
    // 3. Data outside guest memory.
    let s3 = q.alloc().unwrap();
    q.write_header(s3, VIRTIO_BLK_T_OUT, 0);
    let d3 = q.desc_index(s3);
    let far = q.mem_size() + (1 << 30);
    q.submit_raw(
        s3,
        &[
            RawDesc {
                addr: q.header_gpa(s3),
                len: 16,
                flags: next,
                next: d3 + 1,
            },
            RawDesc {
                addr: far,
                len: 4096,
                flags: next,
                next: d3 + 2,
            },
            RawDesc {
                addr: q.status_gpa(s3),
                len: 1,
                flags: wr,
                next: 0,
            },
        ],
    );
    q.kick();
    // 4. A misaligned read (100 bytes).
    let s4 = q.alloc().unwrap();
    q.write_header(s4, VIRTIO_BLK_T_IN, 0);
    let d4 = q.desc_index(s4);
    q.submit_raw(
        s4,
        &[
            RawDesc {
                addr: q.header_gpa(s4),
                len: 16,
                flags: next,
                next: d4 + 1,
            },
            RawDesc {
                addr: q.data_gpa(s4),
                len: 100,
                flags: next | wr,
                next: d4 + 2,
            },
            RawDesc {
                addr: q.status_gpa(s4),
                len: 1,
                flags: wr,
                next: 0,
            },
        ],
    );
    q.kick();
    // 5. A descriptor loop (next points back at the head).
    let s5 = q.alloc().unwrap();
    q.write_header(s5, VIRTIO_BLK_T_IN, 0);
    let d5 = q.desc_index(s5);
    q.submit_raw(
        s5,
        &[
            RawDesc {
                addr: q.header_gpa(s5),
                len: 16,
                flags: next,
                next: d5 + 1,
            },
            RawDesc {
                addr: q.data_gpa(s5),
                len: 512,
                flags: next | wr,
                next: d5,
            },
        ],
    );
    q.kick();
    let deadline = Instant::now() + Duration::from_secs(20);
    while answered.len() < 5 && Instant::now() < deadline {
        q.wait(&mut answered, Some(Duration::from_millis(500)))
            .unwrap();
    }
    assert_eq!(answered.len(), 5, "every chain answered: {answered:?}");
    let status_of = |slot: usize| answered.iter().find(|c| c.slot == slot).unwrap().status;
    assert_eq!(u32::from(status_of(s)), VIRTIO_BLK_S_UNSUPP);
    assert_eq!(
        answered.iter().find(|c| c.slot == s2).unwrap().len,
        0,
        "no status: length 0"
    );
    assert_eq!(u32::from(status_of(s3)), VIRTIO_BLK_S_IOERR);
    assert_eq!(u32::from(status_of(s4)), VIRTIO_BLK_S_IOERR);
    for slot in [s, s2, s3, s4, s5] {
        q.release(slot);
    }
    // The device keeps serving, this connection and the next.
    let a = random_bytes(8192, 3);
    c.write(0, 4096, &a).unwrap();
    let mut back = vec![0u8; a.len()];
    c.read(0, 4096, &mut back).unwrap();
    assert!(back == a);
    drop(c);
    let mut c = connect(&sock, 1);
    c.read(0, 4096, &mut back).unwrap();
    assert!(back == a);
    let vs = vhost_status(&srv, "vm1");
    assert!(
        vs[0]["malformed"].as_u64().unwrap() == 0,
        "counters are per connection: {vs:?}"
    );
    assert!(srv.log().contains("refused"), "malformed chains are logged");
}

#[test]
fn vhost_ctl_add_and_remove_a_socket_at_runtime() {
    let srv = Server::start(
        &["vm1"],
        "16M",
        &["--vhost-user-blk", "vm1@1={dir}/src.vhost"],
    );
    let dst = srv.path("dst.vhost");
    let v = srv.ctl(&["vhost-add", "vm1@2", dst.to_str().unwrap()]);
    assert_eq!(v["epoch"], 2, "{v}");
    let mut c = connect(&dst, 1);
    c.write(0, 0, &[0x44u8; 4096]).unwrap();
    assert_eq!(srv.disk_status("vm1")["current_epoch"], 2);
    assert_eq!(vhost_status(&srv, "vm1").len(), 2);
    // A socket at a fenced epoch is refused.
    let out = std::process::Command::new(BIN)
        .args(["ctl", "--control"])
        .arg(&srv.control)
        .args(["vhost-add", "vm1@1"])
        .arg(srv.path("old.vhost"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "epoch 1 is fenced");
    srv.ctl(&["vhost-remove", dst.to_str().unwrap()]);
    assert!(!dst.exists(), "socket file removed");
    assert!(c.frontend().get_features().is_err(), "the frontend was cut");
    assert_eq!(vhost_status(&srv, "vm1").len(), 1);
    assert!(image_at(&srv, "vm1", 0, 4096) == vec![0x44u8; 4096]);
}

/// `--metrics`: vhost-user-blk requests are counted as NBD's are.
#[test]
fn vhost_requests_counted_in_metrics() {
    use std::io::Write;
    let srv = Server::start(
        &["vm1"],
        "16M",
        &[
            "--vhost-user-blk",
            "vm1={dir}/vm1.vhost",
            "--metrics",
            "127.0.0.1:0",
        ],
    );
    let addr = {
        let log = srv.log();
        let i = log
            .find("metrics on http://")
            .expect("metrics address logged");
        let rest = &log[i + "metrics on http://".len()..];
        rest[..rest.find('/').unwrap()].to_string()
    };
    let mut c = connect(&srv.path("vm1.vhost"), 1);
    let a = random_bytes(8192, 9);
    c.write(0, 0, &a).unwrap();
    c.write(0, 8192, &a).unwrap();
    let mut back = vec![0u8; 8192];
    c.read(0, 0, &mut back).unwrap();
    c.flush(0).unwrap();
    c.write_zeroes(0, 0, 4096, false).unwrap();
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let sample = |name: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
    };
    assert_eq!(
        sample("blkshim_requests_total{disk=\"vm1\",op=\"write\"}"),
        2.0
    );
    assert_eq!(
        sample("blkshim_requests_total{disk=\"vm1\",op=\"read\"}"),
        1.0
    );
    assert_eq!(
        sample("blkshim_requests_total{disk=\"vm1\",op=\"flush\"}"),
        1.0
    );
    assert_eq!(
        sample("blkshim_requests_total{disk=\"vm1\",op=\"write_zeroes\"}"),
        1.0
    );
    assert_eq!(
        sample("blkshim_bytes_total{disk=\"vm1\",op=\"write\"}"),
        16384.0
    );
    assert_eq!(
        sample("blkshim_bytes_total{disk=\"vm1\",op=\"read\"}"),
        8192.0
    );
}

#[test]
fn vhost_get_vring_base_waits_for_requests_in_flight() {
    // The queue workers complete requests themselves (their own io_uring):
    // GET_VRING_BASE, waiting on the handler thread for what is in flight,
    // must find every popped request in the used ring, and not deadlock.
    let srv = Server::start(
        &["vm1"],
        "16M",
        &["--vhost-user-blk", "vm1={dir}/vm1.vhost"],
    );
    let sock = srv.path("vm1.vhost");
    let mut c = connect(&sock, 2);
    let q = c.queue(0);
    let len = q.slot_bytes().min(64 << 10);
    let mut n = 0u64;
    while let Some(slot) = q.alloc() {
        let ty = if n % 2 == 0 {
            vhost_client::ReqType::Out
        } else {
            vhost_client::ReqType::In
        };
        q.submit(slot, ty, n * len as u64, len);
        n += 1;
    }
    assert!(n >= 8, "{n} slots");
    q.kick();
    // The first completion: the worker popped every chain (one batch).
    let mut done = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while done.is_empty() {
        assert!(Instant::now() < deadline, "no completion");
        c.queue(0)
            .wait(&mut done, Some(Duration::from_millis(100)))
            .unwrap();
    }
    let t = Instant::now();
    let base = c.frontend().get_vring_base(0).unwrap();
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert_eq!(base as u64, n, "every request popped");
    c.queue(0).poll(&mut done);
    assert_eq!(
        done.len() as u64,
        n,
        "every popped request is in the used ring"
    );
    assert!(done.iter().all(|d| d.status == 0), "{done:?}");
    // The other queue still serves.
    let a = random_bytes(8 << 10, 3);
    c.write(1, 1 << 20, &a).unwrap();
    let mut back = vec![0u8; a.len()];
    c.read(1, 1 << 20, &mut back).unwrap();
    assert!(back == a);
}

/// A socket whose file was removed behind the server's back (a cleanup
/// script, a tmpfs wiped) is still removed at once by `ctl vhost-remove`,
/// and SIGTERM still stops the server: waking its accept() must not depend
/// on connecting to the path.
#[test]
fn vhost_remove_and_stop_with_the_socket_file_gone() {
    let srv = Server::start(
        &["vm1"],
        "16M",
        &[
            "--vhost-user-blk",
            "vm1={dir}/a.vhost",
            "--vhost-user-blk",
            "vm1={dir}/b.vhost",
        ],
    );
    let (a, b) = (srv.path("a.vhost"), srv.path("b.vhost"));
    std::fs::remove_file(&a).unwrap();
    std::fs::remove_file(&b).unwrap();
    let t = Instant::now();
    srv.ctl(&["vhost-remove", a.to_str().unwrap()]);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(vhost_status(&srv, "vm1").len(), 1);
    let mut srv = srv;
    let t = Instant::now();
    assert_eq!(srv.stop(), Some(0), "{}", srv.log());
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
}

/// `ctl vhost-remove` (and SIGTERM, which removes every socket) cuts the
/// frontend only once every request the server popped is in the used ring.
/// A frontend that loses its backend resumes at the used index (qemu with
/// `reconnect=`, having no inflight region, sets the next backend's avail
/// index to it): a request still in flight at the cut would be completed
/// late into the ring and then served again by the next connection (the
/// duplicate completions that left a real guest's ring corrupt), and one
/// completed out of order would be skipped.
#[test]
fn vhost_remove_puts_every_popped_request_in_the_used_ring_before_the_cut() {
    let srv = Server::start(
        &["vm1"],
        "16M",
        &[
            "--vhost-user-blk",
            "vm1={dir}/vm1.vhost",
            "--storage-delay",
            "write=1500ms",
        ],
    );
    let sock = srv.path("vm1.vhost");
    let mut c = connect(&sock, 1);
    let q = c.queue(0);
    let len = 4096;
    let mut n = 0u64;
    while let Some(slot) = q.alloc() {
        q.submit(slot, vhost_client::ReqType::Out, n * len as u64, len);
        n += 1;
    }
    q.kick();
    // Every write popped and held at the storage.
    let deadline = Instant::now() + Duration::from_secs(10);
    while srv.disk_status("vm1")["in_flight"].as_u64() != Some(n) {
        assert!(Instant::now() < deadline, "{}", srv.disk_status("vm1"));
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::scope(|scope| {
        let t = Instant::now();
        let remove = scope.spawn(|| srv.ctl(&["vhost-remove", sock.to_str().unwrap()]));
        // Poll the connection until it is cut; what the used ring holds
        // then is what a reconnecting frontend would resume after.
        let mut done = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while c.frontend().get_features().is_ok() {
            assert!(Instant::now() < deadline, "the frontend was never cut");
            std::thread::sleep(Duration::from_millis(5));
        }
        let cut = t.elapsed();
        c.queue(0).poll(&mut done);
        assert_eq!(
            done.len() as u64,
            n,
            "{} of {n} popped requests in the used ring when the frontend was cut ({cut:?} after the remove)",
            done.len()
        );
        assert!(done.iter().all(|d| d.status == 0), "{done:?}");
        assert!(cut >= Duration::from_millis(1000), "cut after {cut:?}");
        remove.join().unwrap();
    });
    assert!(srv.log().contains("stopped serving"), "{}", srv.log());
}

/// A driver that publishes an available index further ahead than the
/// queue is long (a broken or hostile guest) gets that queue stopped, with
/// one log line: not a worker spinning on the error (with EVENT_IDX the
/// ring stays "available" forever) and flooding the log. The other queue
/// keeps serving.
#[test]
fn vhost_invalid_available_index_stops_that_queue_only() {
    let srv = Server::start(
        &["vm1"],
        "16M",
        &["--vhost-user-blk", "vm1={dir}/vm1.vhost"],
    );
    let sock = srv.path("vm1.vhost");
    let mut c = connect(&sock, 2);
    let q = c.queue(0);
    let size = q.queue_size();
    q.set_avail_idx(size + 5);
    q.kick();
    std::thread::sleep(Duration::from_millis(500));
    q.kick();
    std::thread::sleep(Duration::from_millis(500));
    let a = random_bytes(8 << 10, 9);
    c.write(1, 1 << 20, &a).unwrap();
    let mut back = vec![0u8; a.len()];
    c.read(1, 1 << 20, &mut back).unwrap();
    assert!(back == a);
    let log = srv.log();
    let lines = log
        .lines()
        .filter(|l| l.contains("further ahead than the queue is long"))
        .count();
    assert_eq!(lines, 1, "{log}");
}

/// A 16 MiB disk `vm1` served with `--cache CACHE` over vhost-user-blk,
/// and a client with one queue connected to it.
fn one_queue_device(cache: &str) -> (Server, VhostBlkClient) {
    let srv = Server::start(
        &["vm1"],
        "16M",
        &["--cache", cache, "--vhost-user-blk", "vm1={dir}/vm1.vhost"],
    );
    let c = connect(&srv.path("vm1.vhost"), 1);
    (srv, c)
}

/// Reads go from the storage straight into guest memory (no bounce
/// buffer); the pages they fill must still be in a migration's dirty log,
/// or qemu would send the destination those pages' old contents. A write
/// only reads its data pages, so they stay clean.
/// Without EVENT_IDX the device writes the used ring's page only for
/// the used elements and index (with it, also `avail_event`), so that
/// run shows those writes are logged too.
#[test]
fn vhost_read_data_pages_are_in_the_dirty_log() {
    for cache in ["none", "writeback"] {
        for event_idx in [true, false] {
            read_data_pages_are_in_the_dirty_log(cache, event_idx);
        }
    }
}

fn read_data_pages_are_in_the_dirty_log(cache: &str, event_idx: bool) {
    let srv = Server::start(
        &["vm1"],
        "16M",
        &["--cache", cache, "--vhost-user-blk", "vm1={dir}/vm1.vhost"],
    );
    let o = ClientOptions {
        queues: 1,
        queue_size: 64,
        slots: 8,
        slot_bytes: 64 << 10,
        event_idx,
    };
    let mut c = VhostBlkClient::connect_with(srv.path("vm1.vhost"), &o).unwrap();
    assert_eq!(c.event_idx(), event_idx);
    let a = random_bytes(8192, 11);
    c.write(0, 1 << 20, &a).unwrap();
    let log = c.start_dirty_log().unwrap();
    log.clear().unwrap();
    // `read` and `write` use slot 0 (the first free one) every time.
    let data = c.queue(0).data_gpa(0);
    let status = c.queue(0).status_gpa(0);
    let untouched = c.queue(0).data_gpa(3);
    c.write(0, 2 << 20, &a).unwrap();
    assert!(
        !log.is_dirty(data).unwrap(),
        "a write's data page is only read"
    );
    assert!(log.is_dirty(status).unwrap(), "{cache}: status byte logged");
    let used = c.queue(0).used_gpa();
    assert!(
        log.is_dirty(used).unwrap(),
        "{cache} event_idx {event_idx}: used ring logged"
    );
    let mut back = vec![0u8; a.len()];
    c.read(0, 1 << 20, &mut back).unwrap();
    assert!(back == a);
    for page in [data, data + 4096] {
        assert!(
            log.is_dirty(page).unwrap(),
            "read data page {page:#x} logged"
        );
    }
    assert!(
        !log.is_dirty(untouched).unwrap(),
        "an unused slot stays clean"
    );
}

/// A data buffer at an address O_DIRECT cannot use in place (odd) goes
/// through a bounce buffer and still round-trips; through the page cache
/// it is used in place.
#[test]
fn vhost_unaligned_guest_buffers_read_and_write() {
    for cache in ["none", "writeback"] {
        unaligned_guest_buffers_read_and_write(cache);
    }
}

fn unaligned_guest_buffers_read_and_write(cache: &str) {
    let (srv, mut c) = one_queue_device(cache);
    let a = random_bytes(4096, 12);
    let q = c.queue(0);
    let next = VRING_DESC_F_NEXT as u16;
    let wr = VRING_DESC_F_WRITE as u16;
    for (kind, skew) in [(VIRTIO_BLK_T_OUT, 1u64), (VIRTIO_BLK_T_IN, 3)] {
        let s = q.alloc().unwrap();
        if kind == VIRTIO_BLK_T_OUT {
            q.buf_mut(s)[1..1 + a.len()].copy_from_slice(&a);
        }
        q.write_header(s, kind, 8);
        let d = q.desc_index(s);
        let data_flags = if kind == VIRTIO_BLK_T_IN {
            next | wr
        } else {
            next
        };
        q.submit_raw(
            s,
            &[
                RawDesc {
                    addr: q.header_gpa(s),
                    len: 16,
                    flags: next,
                    next: d + 1,
                },
                RawDesc {
                    addr: q.data_gpa(s) + skew,
                    len: 4096,
                    flags: data_flags,
                    next: d + 2,
                },
                RawDesc {
                    addr: q.status_gpa(s),
                    len: 1,
                    flags: wr,
                    next: 0,
                },
            ],
        );
        q.kick();
        let done = q.wait_slot(s, Duration::from_secs(30)).unwrap();
        assert_eq!(done.status, VIRTIO_BLK_S_OK as u8, "{cache}: {kind}");
        if kind == VIRTIO_BLK_T_IN {
            assert!(q.buf_mut(s)[3..3 + a.len()] == a[..], "read back");
        }
        q.release(s);
    }
    assert!(image_at(&srv, "vm1", 8 * 512, a.len()) == a);
}

/// The device's own descriptor walk (`vhost::ring`, host pointers) yields
/// exactly virtio-queue's `DescriptorChain` on 20,000 generated tables:
/// chains with loops, indirect tables (nested, misaligned, empty), next
/// indices past the table, lengths that overflow. The fuzz target
/// `vhost_chain` runs the same check on arbitrary bytes.
#[test]
fn vhost_chain_walk_matches_virtio_queue() {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut lengths = [0u32; 8];
    for _ in 0..20_000 {
        let exp = (next() % 9) as u8;
        let size = 1u64 << exp;
        let mut input = vec![exp];
        input.extend_from_slice(&((next() % (size + 2)) as u16).to_le_bytes());
        // The queue's table, then indirect tables and other memory: every
        // 16 bytes a descriptor-like entry.
        for _ in 0..(size + 64) {
            // Mostly into these entries (indirect tables among them).
            let addr = (next() % ((size + 64) * 16)) & !0xf;
            let len: u32 = match next() % 4 {
                0 => (next() % 8) as u32 * 16,
                1 => u32::MAX - (next() % 4096) as u32,
                _ => (next() % 8192) as u32,
            };
            let flags = match next() % 16 {
                0..=10 => 1 | (next() % 2 * 2) as u16, // NEXT, maybe WRITE
                11..=12 => 4,                          // INDIRECT
                _ => (next() % 8) as u16,
            };
            let nxt = (next() % (size + 2)) as u16;
            input.extend_from_slice(&addr.to_le_bytes());
            input.extend_from_slice(&len.to_le_bytes());
            input.extend_from_slice(&flags.to_le_bytes());
            input.extend_from_slice(&nxt.to_le_bytes());
        }
        let n = blkshim::vhost::ring::fuzz_walk(&input).expect("a queue");
        lengths[n.min(lengths.len() - 1)] += 1;
    }
    // The inputs reach long chains as well as refused ones.
    assert!(lengths[0] > 1000 && lengths[1] > 1000, "{lengths:?}");
    assert!(lengths[3..].iter().sum::<u32>() > 1000, "{lengths:?}");
}
