//! The control socket: JSON lines over a unix socket (default
//! `./blkshim.ctl`). One request per line, one response per line.
//!
//! Requests: `{"cmd":"status"}`, `{"cmd":"fence","disk":"vm1"}`,
//! `{"cmd":"handoff","disk":"vm1","to":7}` (`to` optional),
//! `{"cmd":"suspend","disk":"vm1"}` (host-side mode).
//! Responses: `{"ok":true,...}` or `{"ok":false,"error":"..."}`.

use serde::{Deserialize, Serialize};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;

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
}

/// Something that answers control requests (the NBD server).
pub type CtlHandler = Arc<dyn Fn(CtlRequest) -> Result<serde_json::Value, String> + Send + Sync>;

/// Bind the control socket (replacing a stale socket file) and answer
/// requests on a background thread.
pub fn serve(path: &Path, handler: CtlHandler) -> io::Result<()> {
    remove_stale_socket(path)?;
    let listener = UnixListener::bind(path)?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let h = Arc::clone(&handler);
                let _ = std::thread::Builder::new()
                    .name("control-conn".into())
                    .spawn(move || {
                        if let Err(e) = answer(conn, &h) {
                            log::debug!("control connection: {e}");
                        }
                    });
            }
        })?;
    Ok(())
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

fn answer(conn: UnixStream, h: &CtlHandler) -> io::Result<()> {
    let mut out = conn.try_clone()?;
    for line in BufReader::new(conn).lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let resp = match serde_json::from_str::<CtlRequest>(&line) {
            Err(e) => serde_json::json!({"ok": false, "error": format!("bad request: {e}")}),
            Ok(req) => match h(req) {
                Ok(mut v) => {
                    if let Some(o) = v.as_object_mut() {
                        o.insert("ok".into(), true.into());
                    }
                    v
                }
                Err(e) => serde_json::json!({"ok": false, "error": e}),
            },
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
