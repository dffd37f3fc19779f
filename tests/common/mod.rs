//! Shared helpers of the NBD integration tests: a `blkshim serve` child on
//! temporary sockets, real peer tools (that must be installed: a missing
//! tool fails the test loudly), and a minimal raw NBD client.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_blkshim");

/// A running `blkshim serve` on a temp dir; SIGTERMed when dropped.
pub struct Server {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub control: PathBuf,
    pub child: Option<Child>,
}

impl Server {
    /// Serve `disks` (each NAME becomes `NAME=DIR/NAME.img`) created with
    /// `size` bytes, plus `extra` args (`{dir}` is replaced by the temp dir).
    pub fn start(disks: &[&str], size: &str, extra: &[&str]) -> Server {
        Self::start_in(tempfile::tempdir().expect("tempdir"), disks, size, extra)
    }

    /// As [`Server::start`], in a temp dir the caller prepared (config files).
    pub fn start_in(dir: tempfile::TempDir, disks: &[&str], size: &str, extra: &[&str]) -> Server {
        let socket = dir.path().join("nbd.sock");
        let control = dir.path().join("ctl.sock");
        let mut cmd = Command::new(BIN);
        cmd.arg("serve")
            .arg("--socket")
            .arg(&socket)
            .arg("--control")
            .arg(&control)
            .arg("--state-dir")
            .arg(dir.path().join("epochs"))
            .arg("--size")
            .arg(size)
            .args(
                extra
                    .iter()
                    .map(|a| a.replace("{dir}", &dir.path().display().to_string())),
            );
        for d in disks {
            cmd.arg(format!(
                "{d}={}",
                dir.path().join(format!("{d}.img")).display()
            ));
        }
        let child = cmd
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.path().join("server.log")).expect("log file"),
            ))
            .spawn()
            .expect("spawn blkshim serve");
        let s = Server {
            dir,
            socket,
            control,
            child: Some(child),
        };
        s.wait_ready();
        s
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("server did not come up; log:\n{}", self.log());
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    pub fn image(&self, disk: &str) -> PathBuf {
        self.dir.path().join(format!("{disk}.img"))
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// `blkshim ctl --json ARGS` against this server.
    pub fn ctl(&self, args: &[&str]) -> serde_json::Value {
        let out = Command::new(BIN)
            .arg("ctl")
            .arg("--control")
            .arg(&self.control)
            .arg("--json")
            .args(args)
            .output()
            .expect("run blkshim ctl");
        assert!(
            out.status.success(),
            "ctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("ctl json")
    }

    /// The `ctl status` entry of `disk`.
    pub fn disk_status(&self, disk: &str) -> serde_json::Value {
        let v = self.ctl(&["status"]);
        v["disks"]
            .as_array()
            .expect("disks")
            .iter()
            .find(|d| d["name"] == disk)
            .cloned()
            .expect("disk in status")
    }

    /// SIGTERM and wait; returns the exit status code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return st.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("server ignored SIGTERM; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL and reap, as a host that dies would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// True while the server process runs.
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Fail loudly when a peer tool is missing (the README's test command
/// installs them).
pub fn require(tool: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "required tool {tool:?} is not installed (apt-get install qemu-utils libnbd-bin nbdkit fio python3-libnbd)"
    );
}

/// Run a tool, assert success, return its output.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Deterministic pseudo-random bytes.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// One request's bytes: header, then payload.
pub fn request_bytes(
    kind: u16,
    flags: u16,
    handle: u64,
    offset: u64,
    len: u32,
    data: &[u8],
) -> Vec<u8> {
    let mut b = Vec::with_capacity(28 + data.len());
    b.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&handle.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// A bare-bones NBD client over a unix socket, for protocol tests.
pub struct RawClient {
    pub s: UnixStream,
}

pub const NBD_CMD_READ: u16 = 0;
pub const NBD_CMD_WRITE: u16 = 1;
pub const NBD_CMD_DISC: u16 = 2;
pub const NBD_CMD_FLUSH: u16 = 3;

impl RawClient {
    /// Connect and read the greeting (18 bytes), checking the magics.
    pub fn connect(socket: &Path) -> RawClient {
        let mut s = UnixStream::connect(socket).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut g = [0u8; 18];
        s.read_exact(&mut g).expect("greeting");
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        RawClient { s }
    }

    /// Complete a handshake with GO on `export`; returns the export size.
    pub fn go(socket: &Path, export: &str) -> (RawClient, u64) {
        let mut c = RawClient::connect(socket);
        c.s.write_all(&3u32.to_be_bytes()).unwrap();
        let mut data = (export.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        c.send_option(7, &data);
        let mut size = None;
        loop {
            let (_opt, rep, payload) = c.read_option_reply();
            match rep {
                1 => break,
                3 => {
                    if payload[..2] == [0, 0] {
                        size = Some(u64::from_be_bytes(payload[2..10].try_into().unwrap()));
                    }
                }
                r => panic!(
                    "GO {export:?} failed: reply {r:#x} {:?}",
                    String::from_utf8_lossy(&payload)
                ),
            }
        }
        (c, size.expect("size info"))
    }

    pub fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut b = b"IHAVEOPT".to_vec();
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).unwrap();
    }

    /// (option, reply type, payload)
    pub fn read_option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).expect("option reply");
        assert_eq!(
            u64::from_be_bytes(h[..8].try_into().unwrap()),
            0x0003_e889_0455_65a9
        );
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let rep = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let mut p = vec![0u8; len];
        self.s.read_exact(&mut p).expect("option reply payload");
        (opt, rep, p)
    }

    pub fn send_request(
        &mut self,
        kind: u16,
        flags: u16,
        handle: u64,
        offset: u64,
        len: u32,
        data: &[u8],
    ) {
        let b = request_bytes(kind, flags, handle, offset, len, data);
        self.s.write_all(&b).unwrap();
    }

    /// Read a simple reply: (handle, error).
    pub fn read_reply(&mut self) -> (u64, u32) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).expect("simple reply");
        assert_eq!(u32::from_be_bytes(h[..4].try_into().unwrap()), 0x6744_6698);
        (
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
        )
    }

    pub fn write(&mut self, handle: u64, offset: u64, data: &[u8]) -> u32 {
        self.send_request(NBD_CMD_WRITE, 0, handle, offset, data.len() as u32, data);
        let (h, e) = self.read_reply();
        assert_eq!(h, handle);
        e
    }

    pub fn read(&mut self, handle: u64, offset: u64, len: usize) -> Result<Vec<u8>, u32> {
        self.send_request(NBD_CMD_READ, 0, handle, offset, len as u32, &[]);
        let (h, e) = self.read_reply();
        assert_eq!(h, handle);
        if e != 0 {
            return Err(e);
        }
        let mut d = vec![0u8; len];
        self.s.read_exact(&mut d).expect("read data");
        Ok(d)
    }

    /// True when the server closed the connection (EOF or reset).
    pub fn closed_by_server(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}
