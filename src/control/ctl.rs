//! The control socket: JSON lines over a unix socket (default
//! `./blkshim.ctl`). One request per line, one response per line.
//!
//! Requests: `{"cmd":"status"}`, `{"cmd":"fence","disk":"vm1"}`,
//! `{"cmd":"handoff","disk":"vm1","to":7}` (`to` optional),
//! `{"cmd":"suspend","disk":"vm1"}` (host-side mode),
//! `{"cmd":"vhost_add","disk":"vm1","epoch":8,"socket":"/run/vm1-dst.vhost"}`
//! (`epoch` optional), `{"cmd":"vhost_remove","socket":"/run/vm1-dst.vhost"}`.
//! Responses: `{"ok":true,...}` or `{"ok":false,"error":"..."}`.
//!
//! Access: the socket file is mode 0600 (0660 and the `--control-group`
//! group's with one), and every connection's peer is checked again with
//! SO_PEERCRED, so a socket whose mode someone widened still admits only
//! root, the server's own user and the group's members.

use serde::{Deserialize, Serialize};
use std::ffi::{CString, OsString};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// A control request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum CtlRequest {
    /// Per disk: epoch, connections and their epochs, in flight, refusals.
    Status,
    /// Fence now, without waiting for the drain timeout, every writer of
    /// `disk` below its current epoch.
    Fence { disk: String },
    /// Advance `disk` to epoch `to` (default: the highest registered
    /// writer's epoch if above the current one, else current + 1).
    Handoff { disk: String, to: Option<u64> },
    /// Host-side: hand `disk` over (drain, settle, publish the record).
    Suspend { disk: String },
    /// Serve `disk` over vhost-user-blk on `socket`, its frontends writing
    /// at `epoch` (default: the disk's current one).
    VhostAdd {
        disk: String,
        epoch: Option<u64>,
        socket: PathBuf,
    },
    /// Stop serving the vhost-user-blk socket `socket`.
    VhostRemove { socket: PathBuf },
}

impl CtlRequest {
    /// Whether the request can fence a writer or move a disk: these are
    /// logged at info with the peer, read-only ones at debug.
    pub fn changes_state(&self) -> bool {
        !matches!(self, CtlRequest::Status)
    }
}

/// Something that answers control requests (the NBD server).
pub type CtlHandler = Arc<dyn Fn(CtlRequest) -> Result<serde_json::Value, String> + Send + Sync>;

/// The group that `--control-group` lets use the control socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlGroup {
    pub name: String,
    pub gid: u32,
}

impl ControlGroup {
    /// Look a group up by name (or take a numeric gid as it is).
    pub fn resolve(name: &str) -> Result<ControlGroup, String> {
        if let Ok(gid) = name.parse::<u32>() {
            return Ok(ControlGroup {
                name: name.to_string(),
                gid,
            });
        }
        let cname =
            CString::new(name).map_err(|_| format!("control group {name:?}: contains NUL"))?;
        let mut buf = vec![0u8; 4096];
        loop {
            // SAFETY: a zeroed group is a valid out-parameter.
            let mut grp: libc::group = unsafe { std::mem::zeroed() };
            let mut found: *mut libc::group = std::ptr::null_mut();
            // SAFETY: every pointer is valid for the call; buf's length is
            // passed with it; getgrnam_r is the reentrant lookup.
            let rc = unsafe {
                libc::getgrnam_r(
                    cname.as_ptr(),
                    &mut grp,
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    &mut found,
                )
            };
            if rc == libc::ERANGE && buf.len() < 1 << 20 {
                buf.resize(buf.len() * 4, 0);
                continue;
            }
            if rc != 0 {
                return Err(format!(
                    "control group {name:?}: {}",
                    io::Error::from_raw_os_error(rc)
                ));
            }
            if found.is_null() {
                return Err(format!("control group {name:?}: no such group"));
            }
            return Ok(ControlGroup {
                name: name.to_string(),
                gid: grp.gr_gid,
            });
        }
    }
}

/// The process at the other end of a control connection, as the kernel
/// recorded it at connect (SO_PEERCRED: pid, effective uid and gid).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
    /// `/proc/PID/comm`, for the log ("?" when the process is gone).
    pub comm: String,
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pid {} uid {} gid {} ({})",
            self.pid, self.uid, self.gid, self.comm
        )
    }
}

/// SO_PEERCRED of a connected unix socket.
pub fn peer_of(s: &UnixStream) -> io::Result<Peer> {
    // SAFETY: a zeroed ucred is a valid out-parameter.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: the fd is open for the call; cred and len describe a buffer
    // of the size SO_PEERCRED writes.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let comm = std::fs::read_to_string(format!("/proc/{}/comm", cred.pid))
        .map(|c| c.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    Ok(Peer {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
        comm,
    })
}

/// Who may use the control socket: root, the server's own (effective)
/// user, and the members of the control group if there is one.
#[derive(Debug, Clone)]
pub struct Access {
    pub own_uid: u32,
    pub group: Option<ControlGroup>,
}

impl Access {
    /// Root, this process's effective user, and `group`.
    pub fn new(group: Option<ControlGroup>) -> Access {
        // SAFETY: geteuid cannot fail.
        let own_uid = unsafe { libc::geteuid() };
        Access { own_uid, group }
    }

    /// `Err(why)` when `peer` may not use the socket. Supplementary groups
    /// come from `/proc/PID/status`, so they are read only when needed and
    /// trusted only while that process still has the peer's uid (a pid
    /// reused by another user's process grants nothing).
    pub fn check(&self, peer: &Peer) -> Result<(), String> {
        if peer.uid == 0 || peer.uid == self.own_uid {
            return Ok(());
        }
        let Some(g) = &self.group else {
            return Err(format!(
                "uid {} is neither root nor the server's user (uid {}); start the server with --control-group to let a group in",
                peer.uid, self.own_uid
            ));
        };
        if peer.gid == g.gid {
            return Ok(());
        }
        let groups = std::fs::read_to_string(format!("/proc/{}/status", peer.pid))
            .ok()
            .and_then(|s| supplementary_groups(&s, peer.uid))
            .unwrap_or_default();
        if groups.contains(&g.gid) {
            return Ok(());
        }
        Err(format!(
            "uid {} is neither root, the server's user (uid {}), nor in the control group {} (gid {})",
            peer.uid, self.own_uid, g.name, g.gid
        ))
    }
}

/// The `Groups:` of a `/proc/PID/status`, if its effective uid is `uid`.
fn supplementary_groups(status: &str, uid: u32) -> Option<Vec<u32>> {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|rest| rest.split_whitespace().filter_map(|t| t.parse().ok()))
    };
    // Uid: real effective saved filesystem.
    let euid: u32 = field("Uid:")?.nth(1)?;
    if euid != uid {
        return None;
    }
    Some(field("Groups:")?.collect())
}

/// Bind the control socket (replacing a stale socket file) and answer
/// requests on a background thread; `group` (`--control-group`) may use
/// it besides root and this process's user.
pub fn serve(path: &Path, group: Option<ControlGroup>, handler: CtlHandler) -> io::Result<()> {
    remove_stale_socket(path)?;
    let listener = bind_private(path, group.as_ref())?;
    let access = Arc::new(Access::new(group));
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let h = Arc::clone(&handler);
                let access = Arc::clone(&access);
                let _ = std::thread::Builder::new()
                    .name("control-conn".into())
                    .spawn(move || {
                        if let Err(e) = answer(conn, &access, &h) {
                            log::debug!("control connection: {e}");
                        }
                    });
            }
        })?;
    Ok(())
}

/// Bind a unix socket at `path` that is never reachable with a wider mode
/// than 0600 (0660 owned by `group`'s gid with a group).
///
/// bind(2) creates the file with the process umask, so it is bound in a
/// fresh mkdtemp directory (0700: nobody else can reach what is inside),
/// given its mode and group there, and only then renamed into place. A
/// temporarily strict umask would do the same, but the umask is
/// process-wide and would also apply to files other threads create.
fn bind_private(path: &Path, group: Option<&ControlGroup>) -> io::Result<UnixListener> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let template = parent.join(".blkshim-ctl.XXXXXX");
    let mut buf = CString::new(template.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?
        .into_bytes_with_nul();
    // SAFETY: buf is a writable NUL-terminated template ending in XXXXXX,
    // which mkdtemp overwrites in place.
    if unsafe { libc::mkdtemp(buf.as_mut_ptr().cast()) }.is_null() {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("creating a private directory in {}: {e}", parent.display()),
        ));
    }
    buf.pop();
    let dir = PathBuf::from(OsString::from_vec(buf));
    let tmp = dir.join("s");
    let bound = (|| {
        let l = UnixListener::bind(&tmp)?;
        let mode = match group {
            Some(g) => {
                std::os::unix::fs::chown(&tmp, None, Some(g.gid))?;
                0o660
            }
            None => 0o600,
        };
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
        std::fs::rename(&tmp, path)?;
        Ok(l)
    })();
    if bound.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    let _ = std::fs::remove_dir(&dir);
    bound
}

/// Remove `path` if it is a socket nobody listens on any more.
pub fn remove_stale_socket(path: &Path) -> io::Result<()> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{} is in use by a running server", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    Ok(())
}

/// How long a refused peer may take to send its request line.
const REFUSED_READ_TIMEOUT: Duration = Duration::from_secs(5);

fn answer(conn: UnixStream, access: &Access, h: &CtlHandler) -> io::Result<()> {
    let peer = match peer_of(&conn) {
        Ok(p) => p,
        Err(e) => {
            log::warn!("control: refused a connection: no peer credentials: {e}");
            return Ok(());
        }
    };
    if let Err(why) = access.check(&peer) {
        // Read the request line (bounded) before replying: a reply sent
        // before the client wrote would turn into EPIPE on its side, and
        // the log can name what was asked.
        conn.set_read_timeout(Some(REFUSED_READ_TIMEOUT))?;
        let mut line = String::new();
        let _ = BufReader::new((&conn).take(4096)).read_line(&mut line);
        let asked = serde_json::from_str::<CtlRequest>(&line)
            .map(|r| format!("{r:?}"))
            .unwrap_or_else(|_| "an unreadable request".into());
        log::warn!("control: refused {asked} from {peer}: {why}");
        let resp = serde_json::json!({"ok": false, "error": format!("refused: {why}")});
        writeln!(&conn, "{resp}")?;
        return Ok(());
    }
    let mut out = conn.try_clone()?;
    for line in BufReader::new(conn).lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let resp = match serde_json::from_str::<CtlRequest>(&line) {
            Err(e) => serde_json::json!({"ok": false, "error": format!("bad request: {e}")}),
            Ok(req) => {
                if req.changes_state() {
                    log::info!("control: {req:?} from {peer}");
                } else {
                    log::debug!("control: {req:?} from {peer}");
                }
                match h(req) {
                    Ok(mut v) => {
                        if let Some(o) = v.as_object_mut() {
                            o.insert("ok".into(), true.into());
                        }
                        v
                    }
                    Err(e) => serde_json::json!({"ok": false, "error": e}),
                }
            }
        };
        writeln!(out, "{resp}")?;
    }
    Ok(())
}

/// Send one request and return the response (an error when `ok` is false).
pub fn request(path: &Path, req: &CtlRequest) -> Result<serde_json::Value, String> {
    let mut s =
        UnixStream::connect(path).map_err(|e| format!("control socket {}: {e}", path.display()))?;
    let line = serde_json::to_string(req).map_err(|e| e.to_string())?;
    writeln!(s, "{line}").map_err(|e| e.to_string())?;
    let mut resp = String::new();
    BufReader::new(s)
        .read_line(&mut resp)
        .map_err(|e| e.to_string())?;
    let v: serde_json::Value =
        serde_json::from_str(&resp).map_err(|e| format!("bad response {resp:?}: {e}"))?;
    if v["ok"] == true {
        Ok(v)
    } else {
        Err(v["error"].as_str().unwrap_or("unknown error").to_string())
    }
}

/// Human-readable `ctl status`.
pub fn format_status(v: &serde_json::Value) -> String {
    let mut s = String::new();
    for d in v["disks"].as_array().into_iter().flatten() {
        s += &format!(
            "disk {}  epoch {}  size {}  in flight {}  refused stale {}  fenced {}  cancelled {}\n",
            d["name"].as_str().unwrap_or("?"),
            d["current_epoch"],
            d["size"],
            d["in_flight"],
            d["refused_stale"],
            d["fenced"],
            d["cancelled"]
        );
        for c in d["vhost_user_blk"].as_array().into_iter().flatten() {
            s += &format!(
                "  vhost {}  epoch {}  {}  connections {}  requests {}  refused stale {}  malformed {}\n",
                c["socket"].as_str().unwrap_or("?"),
                c["epoch"],
                if c["connected"] == true { "connected" } else { "listening" },
                c["connections"],
                c["requests"],
                c["refused_stale"],
                c["malformed"]
            );
        }
        for c in d["connections"].as_array().into_iter().flatten() {
            s += &format!(
                "  conn {:<5} epoch {:<4} {:<8} in flight {:<4} requests {:<10} refused stale {}  {}\n",
                c["id"],
                c["epoch"],
                if c["fenced"] == true { "FENCED" } else { "" },
                c["in_flight"],
                c["requests"],
                c["refused_stale"],
                c["peer"].as_str().unwrap_or("")
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tcat\nUid:\t1000\t1000\t1000\t1000\nGid:\t100\t100\t100\t100\nGroups:\t24 27 1001 \n";

    fn peer(uid: u32, gid: u32) -> Peer {
        Peer {
            // No such process: /proc says nothing about supplementary groups.
            pid: -1,
            uid,
            gid,
            comm: "?".into(),
        }
    }

    #[test]
    fn supplementary_groups_only_for_the_peer_uid() {
        assert_eq!(supplementary_groups(STATUS, 1000), Some(vec![24, 27, 1001]));
        // A pid reused by another user's process grants nothing.
        assert_eq!(supplementary_groups(STATUS, 1001), None);
        assert_eq!(
            supplementary_groups("Uid:\t5\t5\t5\t5\nGroups:\n", 5),
            Some(vec![])
        );
        assert_eq!(supplementary_groups("Groups:\t1\n", 5), None);
    }

    #[test]
    fn root_own_user_and_group_only() {
        let own = Access {
            own_uid: 1000,
            group: None,
        };
        assert!(own.check(&peer(0, 0)).is_ok());
        assert!(own.check(&peer(1000, 1000)).is_ok());
        let e = own.check(&peer(1001, 1000)).unwrap_err();
        assert!(
            e.contains("uid 1001") && e.contains("--control-group"),
            "{e}"
        );
        let grp = Access {
            own_uid: 1000,
            group: Some(ControlGroup {
                name: "blk".into(),
                gid: 50,
            }),
        };
        assert!(grp.check(&peer(1001, 50)).is_ok());
        let e = grp.check(&peer(1001, 51)).unwrap_err();
        assert!(e.contains("control group blk (gid 50)"), "{e}");
    }

    #[test]
    fn group_names_resolve() {
        assert_eq!(ControlGroup::resolve("root").unwrap().gid, 0);
        assert_eq!(ControlGroup::resolve("4242").unwrap().gid, 4242);
        assert!(ControlGroup::resolve("no-such-group-blkshim")
            .unwrap_err()
            .contains("no such group"));
    }
}
