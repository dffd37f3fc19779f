//! `Type=notify` readiness of `blkshim serve`, as systemd sees it: the test
//! binds the unix datagram socket systemd would (NOTIFY_SOCKET) and reads
//! what the server sends.

use std::io::Read;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_blkshim");

/// The next notification (one datagram: newline-separated assignments).
fn recv(sock: &UnixDatagram) -> Option<String> {
    let mut buf = [0u8; 4096];
    match sock.recv(&mut buf) {
        Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            None
        }
        Err(e) => panic!("recv: {e}"),
    }
}

fn has(msg: &str, assignment: &str) -> bool {
    msg.lines().any(|l| l == assignment)
}

/// The server, killed if the test fails before it exits (an orphan would
/// hold the test's output open).
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(dir: &Path, notify: &Path, disk: &str) -> Server {
    Server(
        Command::new(BIN)
            .arg("serve")
            .arg("--socket")
            .arg(dir.join("nbd.sock"))
            .arg("--control")
            .arg(dir.join("ctl.sock"))
            .arg("--state-dir")
            .arg(dir.join("epochs"))
            .args(["--size", "1M", disk])
            .env("NOTIFY_SOCKET", notify)
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn blkshim serve"),
    )
}

/// READY=1 comes only once the NBD socket accepts connections: the moment
/// it arrives, a connect succeeds and the server's NBD greeting is there
/// (were READY sent before the bind, this connect would race it and fail).
/// SIGTERM then gives STOPPING=1 before the drain, and exit 0.
#[test]
fn ready_after_the_socket_accepts_and_stopping_at_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let disk = format!("vm1={}", dir.path().join("vm1.img").display());
    let mut server = serve(dir.path(), &notify_path, &disk);

    let mut before = Vec::new();
    let ready = loop {
        let msg = recv(&notify).expect("no READY=1 within 60 s");
        if has(&msg, "READY=1") {
            break msg;
        }
        before.push(msg);
    };
    // At once, before anything else: the listener must already be there.
    let mut nbd = UnixStream::connect(dir.path().join("nbd.sock"))
        .expect("READY=1 was sent before the NBD socket accepted connections");
    nbd.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut magic = [0u8; 8];
    nbd.read_exact(&mut magic).unwrap();
    assert_eq!(&magic, b"NBDMAGIC");
    assert!(
        UnixStream::connect(dir.path().join("ctl.sock")).is_ok(),
        "READY=1 before the control socket was bound"
    );
    assert!(before.iter().all(|m| !has(m, "STOPPING=1")), "{before:?}");
    assert!(
        ready
            .lines()
            .any(|l| l.starts_with("STATUS=serving 1 disk")),
        "{ready:?}"
    );
    drop(nbd);

    // SAFETY: kill(2) on our own child's pid.
    let killed = unsafe { libc::kill(server.0.id() as i32, libc::SIGTERM) };
    assert_eq!(killed, 0);
    let stopping = recv(&notify).expect("no STOPPING=1 within 60 s of SIGTERM");
    assert!(has(&stopping, "STOPPING=1"), "{stopping:?}");
    let end = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = server.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < end, "serve did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
}

/// A server that cannot start (its disk cannot be created) never says
/// READY=1: systemd sees the start fail instead of a unit that is "active"
/// with nothing behind it.
#[test]
fn no_ready_when_the_start_fails() {
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    let disk = format!("vm1={}", dir.path().join("missing/dir/vm1.img").display());
    let status = serve(dir.path(), &notify_path, &disk)
        .0
        .wait()
        .expect("wait");
    assert!(
        !status.success(),
        "serve started on a disk it cannot create"
    );
    notify.set_nonblocking(true).unwrap();
    while let Some(msg) = recv(&notify) {
        assert!(
            !has(&msg, "READY=1"),
            "READY=1 from a failed start: {msg:?}"
        );
    }
}
