//! `blkshim serve --storage-delay` (testing only) end to end, with qemu-io
//! as the writers: a write held at the storage across a hand-off is fenced
//! at the drain deadline, and the newer writer's overlapping write lands
//! after it.

mod common;

use common::{require, Server};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn wait_until(what: &str, srv: &Server, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; log:\n{}",
            srv.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn qemu_io(srv: &Server, export: &str, byte: u8) -> Command {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", "-c", &format!("write -P {byte:#x} 0 4096")])
        .arg(srv.uri(export))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

#[test]
fn a_write_held_at_the_storage_is_fenced_at_the_deadline_and_the_newer_write_lands_after_it() {
    require("qemu-io");
    let srv = Server::start(
        &["vm1"],
        "1M",
        &[
            "--storage-delay",
            "write=2s,armed-file={dir}/armed",
            "--fence-timeout",
            "300ms",
        ],
    );
    assert!(srv.log().contains("testing option"), "{}", srv.log());
    std::fs::write(srv.path("armed"), b"").unwrap();
    wait_until("the delay to arm", &srv, || {
        srv.log().contains("storage delay armed")
    });
    let old = qemu_io(&srv, "vm1@1", 0xaa).spawn().expect("qemu-io");
    wait_until("the old write held at the storage", &srv, || {
        srv.disk_status("vm1")["in_flight"] == 1
    });
    std::fs::remove_file(srv.path("armed")).unwrap();
    wait_until("the delay to disarm", &srv, || {
        srv.log().contains("storage delay disarmed")
    });
    // The newer writer's write is not held by the storage, yet it waits
    // for the held one: it lands only after it.
    let t = Instant::now();
    let new = qemu_io(&srv, "vm1@2", 0xbb).output().expect("qemu-io");
    assert!(
        new.status.success(),
        "{}",
        String::from_utf8_lossy(&new.stderr)
    );
    assert!(
        t.elapsed() >= Duration::from_millis(500),
        "the newer write did not wait for the held one ({:?})",
        t.elapsed()
    );
    let old = old.wait_with_output().expect("qemu-io");
    assert!(
        !old.status.success(),
        "the held write of epoch 1 was acknowledged after its fence"
    );
    let st = srv.disk_status("vm1");
    assert_eq!(
        (st["current_epoch"].as_u64(), st["fenced"].as_u64()),
        (Some(2), Some(1))
    );
    let log = srv.log();
    assert!(log.contains("1 fenced at storage"), "{log}");
    assert_eq!(std::fs::read(srv.image("vm1")).unwrap()[0], 0xbb);
}
