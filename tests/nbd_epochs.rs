//! Epochs over NBD with real clients: `NAME@EPOCH` export names, the
//! first write of a newer writer fencing older ones, stale writes refused
//! with EPERM without touching the disk, stale epochs refused at handshake,
//! and `blkshim ctl handoff / fence / status`.

mod common;

use common::*;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Run a Python script under nbdsh (libnbd's shell) with `URI(export)`,
/// `CTL(*args)` (runs `blkshim ctl --json`) and `EPERM` in scope.
fn nbdsh(srv: &Server, body: &str) -> String {
    require("nbdsh");
    let prelude = format!(
        r#"
import nbd, errno, json, subprocess
EPERM = "EPERM"   # libnbd names the errno
def URI(export):
    return "nbd+unix:///%s?socket={sock}" % export
def CTL(*args):
    out = subprocess.run(["{bin}", "ctl", "--control", "{ctl}", "--json"] + list(args),
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)
def DISK(name):
    return [d for d in CTL("status")["disks"] if d["name"] == name][0]
def CONNECT(export):
    h = nbd.NBD()
    h.connect_uri(URI(export))
    return h
def REFUSED(f):
    try:
        f()
    except nbd.Error as e:
        return e.errno if isinstance(e.errno, str) else errno.errorcode[e.errno]
    return None
"#,
        sock = srv.socket.display(),
        bin = BIN,
        ctl = srv.control.display()
    );
    let script = format!("{prelude}\n{body}\nprint('SCRIPT OK')\n");
    // nbdsh runs `python3` from PATH; the system one has the nbd module.
    let path = format!(
        "/usr/bin:/bin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    let out = run_ok(
        Command::new("nbdsh")
            .env("PATH", path)
            .args(["-c", &script]),
    );
    let text = stdout(&out);
    assert!(text.contains("SCRIPT OK"), "{text}");
    text
}

#[test]
fn nbd_epoch_stale_write_refused_with_eperm_block_keeps_new_data() {
    let srv = Server::start(&["vm1"], "16M", &[]);
    nbdsh(
        &srv,
        r#"
old = CONNECT("vm1@1")
old.pwrite(b"\x11" * 4096, 0)
assert DISK("vm1")["current_epoch"] == 1
new = CONNECT("vm1@2")
# Registered only: the epoch moves with its first write, not at connect.
assert DISK("vm1")["current_epoch"] == 1
old.pwrite(b"\x12" * 4096, 8192)          # the old writer still owns the disk
new.pwrite(b"\x22" * 4096, 0)
assert DISK("vm1")["current_epoch"] == 2
# The old writer's write, trim and write-zeroes are refused with EPERM.
assert REFUSED(lambda: old.pwrite(b"\x33" * 4096, 0)) == EPERM
assert REFUSED(lambda: old.trim(4096, 0)) == EPERM
assert REFUSED(lambda: old.zero(4096, 0)) == EPERM
# Reads stay allowed, and the block holds the new writer's data.
assert old.pread(4096, 0) == b"\x22" * 4096
assert new.pread(4096, 0) == b"\x22" * 4096
assert new.pread(4096, 8192) == b"\x12" * 4096
st = DISK("vm1")
assert st["refused_stale"] >= 3, st
conns = {c["epoch"]: c for c in st["connections"]}
assert conns[1]["fenced"] and conns[1]["refused_stale"] == 3, conns
assert not conns[2]["fenced"]
"#,
    );
    let img = std::fs::read(srv.image("vm1")).unwrap();
    assert!(img[..4096].iter().all(|&b| b == 0x22));
    assert!(srv.log().contains("refused"), "a log line for each refusal");
}

#[test]
fn nbd_epoch_below_current_refused_at_handshake() {
    require("qemu-io");
    let srv = Server::start(&["vm1"], "8M", &[]);
    run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x44 0 4k",
        &srv.uri("vm1@3"),
    ]));
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x55 0 4k", &srv.uri("vm1@2")])
        .output()
        .unwrap();
    assert!(!out.status.success(), "stale epoch connected: {out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("stale"),
        "{out:?}"
    );
    // A bare name joins at the current epoch and may write.
    run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x66 4k 4k",
        &srv.uri("vm1"),
    ]));
    let img = std::fs::read(srv.image("vm1")).unwrap();
    assert!(img[..4096].iter().all(|&b| b == 0x44));
    assert!(img[4096..8192].iter().all(|&b| b == 0x66));
    // The epoch is persisted: a restarted server keeps refusing epoch 2.
    assert_eq!(srv.disk_status("vm1")["current_epoch"], 3);
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(srv.path("epochs/epochs.json")).unwrap())
            .unwrap();
    assert_eq!(v["disks"]["vm1"], 3);
}

#[test]
fn nbd_epoch_qemu_io_interactive_source_fenced_by_destination() {
    require("qemu-io");
    let srv = Server::start(&["vm1"], "8M", &[]);
    // The migration source: one long-lived qemu-io at epoch 5.
    let mut src = Command::new("qemu-io")
        .args(["-f", "raw", &srv.uri("vm1@5")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = src.stdin.take().unwrap();
    writeln!(stdin, "write -P 0x55 0 64k").unwrap();
    let img = srv.image("vm1");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::fs::read(&img).unwrap()[0] != 0x55 {
        assert!(
            std::time::Instant::now() < deadline,
            "source write never landed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The destination at epoch 6 writes: the source is fenced.
    run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x66 0 4k",
        &srv.uri("vm1@6"),
    ]));
    writeln!(stdin, "write -P 0x77 0 64k").unwrap();
    writeln!(stdin, "read -P 0x66 0 4k").unwrap();
    writeln!(stdin, "read -P 0x55 4k 60k").unwrap();
    writeln!(stdin, "quit").unwrap();
    drop(stdin);
    let out = src.wait_with_output().unwrap();
    let text = format!("{}{}", stdout(&out), String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("Operation not permitted"), "{text}");
    assert!(!text.contains("Pattern verification failed"), "{text}");
    let data = std::fs::read(&img).unwrap();
    assert!(data[..4096].iter().all(|&b| b == 0x66));
    assert!(data[4096..65536].iter().all(|&b| b == 0x55));
    assert_eq!(srv.disk_status("vm1")["current_epoch"], 6);
}

#[test]
fn nbd_ctl_handoff_and_fence_by_hand() {
    let srv = Server::start(&["vm1"], "8M", &[]);
    nbdsh(
        &srv,
        r#"
src = CONNECT("vm1")                      # joins at the current epoch (0)
src.pwrite(b"\xaa" * 512, 0)
dst = CONNECT("vm1@4")
assert DISK("vm1")["current_epoch"] == 0
r = CTL("handoff", "vm1")                 # to the newest registered writer
assert (r["from"], r["to"]) == (0, 4), r
assert REFUSED(lambda: src.pwrite(b"\xbb" * 512, 0)) == EPERM
assert REFUSED(lambda: src.flush()) is None or True   # flush is not a write
dst.pwrite(b"\xcc" * 512, 0)              # admitted without a further advance
assert DISK("vm1")["current_epoch"] == 4
r = CTL("fence", "vm1")
assert r["epoch"] == 4 and r["cancelled"] == 0, r
r = CTL("handoff", "vm1", "--to", "9")
assert r["to"] == 9
assert REFUSED(lambda: dst.pwrite(b"\xdd" * 512, 0)) == EPERM
assert dst.pread(512, 0) == b"\xcc" * 512
"#,
    );
    // ctl status in human form names the fenced connections.
    let out = run_ok(Command::new(BIN).args([
        "ctl",
        "--control",
        srv.control.to_str().unwrap(),
        "status",
    ]));
    assert!(stdout(&out).contains("epoch 9"), "{}", stdout(&out));
}
