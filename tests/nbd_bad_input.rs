//! Bad input over a raw socket: garbage and truncated handshakes, unknown
//! options and commands, requests past the end, oversize or misaligned,
//! clients vanishing mid-request, thousands of idle connections. Each gets
//! a protocol error or a clean close; the server keeps serving everyone
//! else and nothing acknowledged is lost.

mod common;

use common::*;
use std::io::Write;
use std::os::unix::net::UnixStream;

const SIZE: u64 = 8 << 20;

const NBD_EPERM: u32 = 1;
const NBD_EINVAL: u32 = 22;
const NBD_ENOSPC: u32 = 28;
const NBD_EOVERFLOW: u32 = 75;
const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
const REP_ERR_POLICY: u32 = (1 << 31) + 2;
const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;

/// A fresh client can still write and read back.
fn still_serving(srv: &Server, seed: u8) {
    let (mut c, size) = RawClient::go(&srv.socket, "vm1");
    assert_eq!(size, SIZE);
    let data = vec![seed; 4096];
    let at = 4096 * (1000 + seed as u64);
    assert_eq!(c.write(1, at, &data), 0);
    assert_eq!(c.read(2, at, 4096).unwrap(), data);
}

#[test]
fn nbd_bad_handshakes_close_cleanly() {
    let mut srv = Server::start(&["vm1"], "8M", &[]);
    // Unknown client flags.
    let mut c = RawClient::connect(&srv.socket);
    c.s.write_all(&0xffff_ffffu32.to_be_bytes()).unwrap();
    assert!(c.closed_by_server());
    // Garbage instead of an option.
    let mut c = RawClient::connect(&srv.socket);
    c.s.write_all(&3u32.to_be_bytes()).unwrap();
    c.s.write_all(&random_bytes(64, 5)).unwrap();
    assert!(c.closed_by_server());
    // Truncated: half the client flags, then gone.
    let mut c = RawClient::connect(&srv.socket);
    c.s.write_all(&[0, 0]).unwrap();
    drop(c);
    // Truncated option payload, then gone.
    let mut c = RawClient::connect(&srv.socket);
    c.s.write_all(&3u32.to_be_bytes()).unwrap();
    c.s.write_all(b"IHAVEOPT\0\0\0\x07\0\0\0\x40abc").unwrap();
    drop(c);
    // An absurd option length is refused, not buffered.
    let mut c = RawClient::connect(&srv.socket);
    c.s.write_all(&3u32.to_be_bytes()).unwrap();
    c.s.write_all(b"IHAVEOPT\0\0\0\x07\xff\xff\xff\xff")
        .unwrap();
    let (_, rep, _) = c.read_option_reply();
    assert_eq!(rep, (1 << 31) + 9);
    assert!(c.closed_by_server());
    // Pure noise before anything.
    let mut s = UnixStream::connect(&srv.socket).unwrap();
    let _ = s.write_all(&random_bytes(4096, 11));
    drop(s);
    still_serving(&srv, 1);
    assert!(srv.alive());
    assert_eq!(srv.stop(), Some(0));
}

#[test]
fn nbd_options_unknown_list_info_abort_export_name() {
    let srv = Server::start(&["vm1", "vm2"], "8M", &[]);
    let mut c = RawClient::connect(&srv.socket);
    c.s.write_all(&3u32.to_be_bytes()).unwrap();
    // Unknown option: ERR_UNSUP, and the haggling goes on.
    c.send_option(0x1234, b"whatever");
    let (opt, rep, _) = c.read_option_reply();
    assert_eq!((opt, rep), (0x1234, REP_ERR_UNSUP));
    // LIST names both disks.
    c.send_option(3, &[]);
    let mut names = Vec::new();
    loop {
        let (_, rep, p) = c.read_option_reply();
        if rep == REP_ACK {
            break;
        }
        assert_eq!(rep, REP_SERVER);
        names.push(String::from_utf8(p[4..].to_vec()).unwrap());
    }
    assert_eq!(names, ["vm1", "vm2"]);
    // INFO on an unknown export and on a malformed epoch.
    for (name, want) in [("nope", REP_ERR_UNKNOWN), ("vm1@x", (1 << 31) + 3)] {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        c.send_option(6, &d);
        let (_, rep, msg) = c.read_option_reply();
        assert_eq!(rep, want, "{}", String::from_utf8_lossy(&msg));
    }
    // A malformed INFO body.
    c.send_option(6, &[0, 0, 0, 9, b'v']);
    assert_eq!(c.read_option_reply().1, (1 << 31) + 3);
    // ABORT is acknowledged and the connection closes.
    c.send_option(2, &[]);
    assert_eq!(c.read_option_reply().1, REP_ACK);
    assert!(c.closed_by_server());

    // Old-style EXPORT_NAME with NO_ZEROES: size and flags, then transmission.
    let mut c = RawClient::connect(&srv.socket);
    c.s.write_all(&3u32.to_be_bytes()).unwrap();
    c.send_option(1, b"vm2");
    let mut b = [0u8; 10];
    std::io::Read::read_exact(&mut c.s, &mut b).unwrap();
    assert_eq!(u64::from_be_bytes(b[..8].try_into().unwrap()), SIZE);
    assert_eq!(c.write(5, 0, &[9u8; 512]), 0);
    assert_eq!(c.read(6, 0, 512).unwrap(), vec![9u8; 512]);

    // A stale epoch is refused at GO with ERR_POLICY and a reason.
    let (mut w, _) = RawClient::go(&srv.socket, "vm1@3");
    assert_eq!(w.write(1, 0, &[1u8; 512]), 0);
    let mut c = RawClient::connect(&srv.socket);
    c.s.write_all(&3u32.to_be_bytes()).unwrap();
    let mut d = 5u32.to_be_bytes().to_vec();
    d.extend_from_slice(b"vm1@2\0\0");
    c.send_option(7, &d);
    let (_, rep, msg) = c.read_option_reply();
    assert_eq!(rep, REP_ERR_POLICY);
    assert!(String::from_utf8_lossy(&msg).contains("stale"));
}

#[test]
fn nbd_bad_requests_get_errors_and_the_connection_goes_on() {
    let mut srv = Server::start(&["vm1"], "8M", &[]);
    let (mut c, _) = RawClient::go(&srv.socket, "vm1");
    assert_eq!(c.write(1, 0, &[0x5a; 4096]), 0); // acknowledged: must survive
                                                 // Unknown command.
    c.send_request(99, 0, 2, 0, 0, &[]);
    assert_eq!(c.read_reply(), (2, NBD_EINVAL));
    // Unknown flag on a read.
    c.send_request(NBD_CMD_READ, 0x8000, 3, 0, 512, &[]);
    assert_eq!(c.read_reply(), (3, NBD_EINVAL));
    // Past the end: read EINVAL; write ENOSPC (payload consumed).
    assert_eq!(c.read(4, SIZE, 512), Err(NBD_EINVAL));
    assert_eq!(c.read(5, SIZE - 512, 1024), Err(NBD_EINVAL));
    assert_eq!(c.write(6, SIZE - 512, &[1u8; 1024]), NBD_ENOSPC);
    assert_eq!(c.read(7, u64::MAX - 511, 512), Err(NBD_EINVAL));
    // Misaligned offset and length.
    assert_eq!(c.read(8, 100, 512), Err(NBD_EINVAL));
    assert_eq!(c.write(9, 0, &[2u8; 100]), NBD_EINVAL);
    // Zero length.
    assert_eq!(c.read(10, 0, 0), Err(NBD_EINVAL));
    // Oversize read: EOVERFLOW, the connection goes on.
    c.send_request(NBD_CMD_READ, 0, 11, 0, (32 << 20) + 512, &[]);
    assert_eq!(
        c.read_reply(),
        (11, NBD_EINVAL.min(NBD_EOVERFLOW)).max((11, NBD_EOVERFLOW))
    );
    // Pipelined: several requests in one go, answered (in any order).
    for h in 20..30u64 {
        c.send_request(
            NBD_CMD_WRITE,
            0,
            h,
            8192 + (h - 20) * 4096,
            4096,
            &[h as u8; 4096],
        );
    }
    let mut seen: Vec<u64> = (0..10)
        .map(|_| {
            let (h, e) = c.read_reply();
            assert_eq!(e, 0);
            h
        })
        .collect();
    seen.sort();
    assert_eq!(seen, (20..30).collect::<Vec<_>>());
    assert_eq!(c.read(12, 0, 4096).unwrap(), vec![0x5a; 4096]);
    // Oversize write: refused and the connection closes (its payload
    // cannot reasonably be skipped).
    c.send_request(NBD_CMD_WRITE, 0, 13, 0, 64 << 20, &[]);
    assert_eq!(c.read_reply(), (13, NBD_EINVAL));
    assert!(c.closed_by_server());
    // Bad request magic: closed.
    let (mut c, _) = RawClient::go(&srv.socket, "vm1");
    c.s.write_all(&[0xde; 28]).unwrap();
    assert!(c.closed_by_server());
    still_serving(&srv, 2);
    assert_eq!(srv.stop(), Some(0));
    let img = std::fs::read(srv.image("vm1")).unwrap();
    assert!(img[..4096].iter().all(|&b| b == 0x5a));
    for h in 20..30u64 {
        let at = (8192 + (h - 20) * 4096) as usize;
        assert!(img[at..at + 4096].iter().all(|&b| b == h as u8));
    }
}

#[test]
fn nbd_client_vanishing_mid_write_loses_nothing_acknowledged() {
    let mut srv = Server::start(&["vm1"], "8M", &[]);
    let (mut c, _) = RawClient::go(&srv.socket, "vm1");
    assert_eq!(c.write(1, 0, &[0x77; 65536]), 0);
    // Header of a 1 MiB write over the same range, half the payload, gone.
    c.send_request(NBD_CMD_WRITE, 0, 2, 0, 1 << 20, &[0x88; 512 << 10]);
    drop(c);
    // Header cut short.
    let (mut c, _) = RawClient::go(&srv.socket, "vm1");
    c.s.write_all(&[0x25, 0x60, 0x95, 0x13, 0, 0]).unwrap();
    drop(c);
    // Requests sent, replies never read: the server must not hang on them.
    let (mut c, _) = RawClient::go(&srv.socket, "vm1");
    for h in 0..64u64 {
        c.send_request(NBD_CMD_READ, 0, h, 0, 1 << 20, &[]);
    }
    drop(c);
    still_serving(&srv, 3);
    let (mut c, _) = RawClient::go(&srv.socket, "vm1");
    assert_eq!(c.read(1, 0, 65536).unwrap(), vec![0x77; 65536]);
    assert_eq!(srv.stop(), Some(0));
    let img = std::fs::read(srv.image("vm1")).unwrap();
    assert!(
        img[..65536].iter().all(|&b| b == 0x77),
        "a torn write landed"
    );
}

/// A client that stops reading its replies while its writes overlap
/// another client's: its connection stalls, the other client's write (which
/// waits behind those writes in the tracker) still completes.
#[test]
fn nbd_client_not_reading_replies_does_not_stall_overlapping_writers() {
    not_reading_replies(&[]); // writes done inline
    not_reading_replies(&["--cache", "none"]); // writes on the rings
}

fn not_reading_replies(serve_args: &[&str]) {
    let mut srv = Server::start(&["vm1"], "8M", serve_args);
    let (mut a, _) = RawClient::go(&srv.socket, "vm1");
    let a_sock = a.s.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        // 64 MiB of read replies fill the socket; then writes to block 0.
        for h in 0..64u64 {
            a.send_request(NBD_CMD_READ, 0, h, 0, 1 << 20, &[]);
        }
        for h in 64..400u64 {
            let r =
                a.s.write_all(&request_bytes(NBD_CMD_WRITE, 0, h, 0, 4096, &[0xaa; 4096]));
            if r.is_err() {
                break; // shut down by the test
            }
        }
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    let (mut b, _) = RawClient::go(&srv.socket, "vm1");
    let t0 = std::time::Instant::now();
    assert_eq!(b.write(1, 0, &[0xbb; 4096]), 0);
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(10),
        "the write waited {:?}",
        t0.elapsed()
    );
    let got = b.read(2, 0, 4096).unwrap();
    assert!(
        got == [0xaa; 4096] || got == [0xbb; 4096],
        "block 0 is torn"
    );
    still_serving(&srv, 5);
    a_sock.shutdown(std::net::Shutdown::Both).unwrap();
    sender.join().unwrap();
    assert_eq!(srv.stop(), Some(0));
}

#[test]
fn nbd_thousands_of_idle_connections_while_another_client_works() {
    // Enough descriptors for 2000 clients in this process too.
    // SAFETY: getrlimit/setrlimit on a local struct.
    unsafe {
        let mut rl: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl);
        rl.rlim_cur = rl.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &rl);
    }
    let mut srv = Server::start(&["vm1"], "8M", &[]);
    let mut idle = Vec::new();
    for i in 0..2000 {
        if i % 2 == 0 {
            idle.push(RawClient::go(&srv.socket, "vm1").0); // in transmission
        } else {
            idle.push(RawClient::connect(&srv.socket)); // mid-handshake
        }
    }
    let (mut c, _) = RawClient::go(&srv.socket, "vm1");
    for i in 0..200u64 {
        let data = random_bytes(4096, i + 1);
        assert_eq!(c.write(i, i * 4096, &data), 0);
        assert_eq!(c.read(i + 1000, i * 4096, 4096).unwrap(), data);
    }
    let st = srv.disk_status("vm1");
    assert!(
        st["connections"].as_array().unwrap().len() >= 1001,
        "{}",
        st["connections"].as_array().unwrap().len()
    );
    drop(idle);
    still_serving(&srv, 4);
    assert_eq!(srv.stop(), Some(0));
    let img = std::fs::read(srv.image("vm1")).unwrap();
    for i in 0..200u64 {
        let at = (i * 4096) as usize;
        assert!(
            img[at..at + 4096] == random_bytes(4096, i + 1)[..],
            "block {i} lost"
        );
    }
}

#[test]
fn nbd_fenced_raw_writer_gets_eperm() {
    let srv = Server::start(&["vm1"], "8M", &[]);
    let (mut old, _) = RawClient::go(&srv.socket, "vm1@1");
    assert_eq!(old.write(1, 0, &[1u8; 4096]), 0);
    let (mut new, _) = RawClient::go(&srv.socket, "vm1@2");
    assert_eq!(new.write(1, 0, &[2u8; 4096]), 0);
    assert_eq!(old.write(2, 0, &[3u8; 4096]), NBD_EPERM);
    old.send_request(4, 0, 3, 0, 4096, &[]); // trim
    assert_eq!(old.read_reply(), (3, NBD_EPERM));
    old.send_request(6, 0, 4, 0, 4096, &[]); // write zeroes
    assert_eq!(old.read_reply(), (4, NBD_EPERM));
    old.send_request(NBD_CMD_FLUSH, 0, 5, 0, 0, &[]); // flush stays allowed
    assert_eq!(old.read_reply(), (5, 0));
    assert_eq!(old.read(6, 0, 4096).unwrap(), vec![2u8; 4096]);
    old.send_request(NBD_CMD_DISC, 0, 7, 0, 0, &[]);
    assert!(old.closed_by_server());
}

#[test]
fn nbd_sigterm_answers_pipelined_requests_then_exits_zero() {
    let mut srv = Server::start(&["vm1"], "8M", &[]);
    let (mut c, _) = RawClient::go(&srv.socket, "vm1");
    for h in 0..64u64 {
        c.send_request(NBD_CMD_WRITE, 0, h, h * 65536, 65536, &[h as u8 + 1; 65536]);
    }
    // SIGTERM while those are in flight: no new connections, every request
    // already read is answered, the disk is flushed, exit 0.
    // SAFETY: signalling our own child by pid.
    unsafe { libc::kill(srv.child.as_ref().unwrap().id() as i32, libc::SIGTERM) };
    let mut answered = 0;
    while answered < 64 {
        let mut h = [0u8; 16];
        if std::io::Read::read_exact(&mut c.s, &mut h).is_err() {
            break;
        }
        assert_eq!(
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            0,
            "request failed"
        );
        answered += 1;
    }
    assert_eq!(srv.stop(), Some(0));
    assert!(UnixStream::connect(&srv.socket).is_err(), "still accepting");
    // Whatever was acknowledged is on disk.
    let img = std::fs::read(srv.image("vm1")).unwrap();
    for h in 0..answered as usize {
        let at = h * 65536;
        assert!(
            img[at..at + 65536].iter().all(|&b| b == h as u8 + 1),
            "acknowledged write {h} lost"
        );
    }
    eprintln!("{answered} of 64 pipelined writes answered before the server stopped");
    assert!(answered > 0, "nothing answered");
}
