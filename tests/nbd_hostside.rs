//! `blkshim serve --fence none` as two hosts over one disk, with real
//! processes: a host that did not hand over is never taken over without an
//! operator's confirmation, `ctl suspend` hands over by record, a
//! host-side export refuses `NAME@EPOCH`, and `ctl takeover` refuses without
//! `--source-dead`. (The storage fence itself, `--fence pr`, runs against a
//! real SCSI target in `qemu-harness/hostside.sh`.)

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One host: a `blkshim serve --fence none --host-id ID` over the shared
/// disk and state directory.
struct HostServer {
    child: Child,
    socket: PathBuf,
    control: PathBuf,
    log: PathBuf,
}

impl HostServer {
    fn start(dir: &Path, id: &str) -> HostServer {
        let socket = dir.join(format!("{id}.sock"));
        let control = dir.join(format!("{id}.ctl"));
        let log = dir.join(format!("{id}.log"));
        let child = Command::new(BIN)
            .args([
                "serve",
                "--fence",
                "none",
                "--host-id",
                id,
                "--resume-wait",
                "300ms",
            ])
            .arg("--socket")
            .arg(&socket)
            .arg("--control")
            .arg(&control)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--size")
            .arg("16M")
            .arg(format!("shared={}", dir.join("shared.img").display()))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
            .spawn()
            .expect("spawn blkshim serve");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "server {id} did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
        HostServer {
            child,
            socket,
            control,
            log,
        }
    }

    /// Write 4 KiB of `byte` at 0 on a new connection; the NBD error code.
    fn write(&self, byte: u8) -> u32 {
        let (mut c, _) = RawClient::go(&self.socket, "shared");
        c.write(1, 0, &[byte; 4096])
    }

    fn read0(&self) -> u8 {
        let (mut c, _) = RawClient::go(&self.socket, "shared");
        c.read(1, 0, 4096).expect("read")[0]
    }

    fn ctl(&self, args: &[&str]) -> (bool, serde_json::Value, String) {
        let out = Command::new(BIN)
            .arg("ctl")
            .arg("--control")
            .arg(&self.control)
            .arg("--json")
            .args(args)
            .output()
            .unwrap();
        let v = serde_json::from_slice(&out.stdout).unwrap_or_default();
        (
            out.status.success(),
            v,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn tenure(&self) -> serde_json::Value {
        let (ok, v, err) = self.ctl(&["status"]);
        assert!(ok, "{err}");
        v["disks"][0]["host_side"]["tenure"].clone()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for HostServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn takeover(dir: &Path, confirm: bool) -> std::process::Output {
    let mut cmd = Command::new(BIN);
    cmd.args(["ctl", "takeover", "shared", "--state-dir"])
        .arg(dir.join("state"));
    if confirm {
        cmd.arg("--source-dead");
    }
    cmd.output().unwrap()
}

const EIO: u32 = 5;
const EPERM_OR_POLICY: u32 = 0x8000_0002;

#[test]
fn fence_none_refuses_a_live_host_until_confirmed_dead() {
    let dir = tempfile::tempdir().unwrap();
    let a = HostServer::start(dir.path(), "A");
    let b = HostServer::start(dir.path(), "B");
    assert_eq!(a.write(0xa1), 0);
    assert_eq!(a.tenure()["state"], "admitted");
    assert_eq!(a.tenure()["epoch"], 1);
    // A has not handed over and nothing can stop its writes: refused.
    assert_eq!(b.write(0xb1), EIO);
    let t = b.tenure();
    assert_eq!(t["state"], "refused", "{t}");
    let why = t["why"].as_str().unwrap();
    assert!(
        why.contains("--source-dead") && why.contains("--fence pr"),
        "{why}"
    );
    assert_eq!(a.read0(), 0xa1, "nothing of B's landed");
    // The confirmation needs its flag.
    let out = takeover(dir.path(), false);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--source-dead"));
    // The operator confirms A's host dead (here falsely: A still writes,
    // which is exactly what the confirmation takes responsibility for).
    let out = takeover(dir.path(), true);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let conf: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(conf["epoch"], 1);
    assert_eq!(conf["holder"]["host"], "A");
    assert_eq!(b.write(0xb2), 0);
    assert_eq!(b.tenure()["by"], "confirmed-dead");
    assert_eq!(b.tenure()["epoch"], 2);
    assert!(b.log().contains("confirmed host \"A\" dead"), "{}", b.log());
}

#[test]
fn suspend_hands_over_by_record_and_the_host_can_take_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let a = HostServer::start(dir.path(), "A");
    let b = HostServer::start(dir.path(), "B");
    // Nothing to hand over before the first write.
    let (ok, _, err) = a.ctl(&["suspend", "shared"]);
    assert!(!ok && err.contains("nothing to hand over"), "{err}");
    assert_eq!(a.write(1), 0);
    let (ok, rec, err) = a.ctl(&["suspend", "shared"]);
    assert!(ok, "{err}");
    assert_eq!(rec["source_epoch"], 1);
    assert_eq!(rec["destination_epoch"], 2);
    assert!(dir.path().join("state/shared.handoff.json").exists());
    assert_eq!(b.write(2), 0);
    assert_eq!(b.tenure()["by"], "record");
    assert_eq!(b.tenure()["epoch"], 2);
    // And back (a migration home): B hands over, A is admitted anew.
    let (ok, _, err) = b.ctl(&["suspend", "shared"]);
    assert!(ok, "{err}");
    assert_eq!(a.write(3), 0);
    assert_eq!(a.tenure()["epoch"], 3);
    assert_eq!(b.read0(), 3);
    // Writers of a host-side disk take their host's epoch, never their own.
    let mut c = RawClient::connect(&a.socket);
    use std::io::Write;
    c.s.write_all(&3u32.to_be_bytes()).unwrap();
    let export = b"shared@9";
    let mut data = (export.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(export);
    data.extend_from_slice(&0u16.to_be_bytes());
    c.send_option(7, &data);
    let (_, rep, msg) = c.read_option_reply();
    assert_eq!(rep, EPERM_OR_POLICY, "{}", String::from_utf8_lossy(&msg));
    assert!(String::from_utf8_lossy(&msg).contains("host-side"));
}
