//! Host liveness through etcd leases: a host puts `PREFIX/hosts/HOST` under
//! a lease it keeps alive (one POST per renewal); when the host dies or is
//! cut off from etcd's quorum, the lease expires after its TTL and the key
//! goes. Liveness only: an expired lease cannot stop a hung writer (the
//! epochs and the fences do that), but it tells the others which hosts
//! still renew.

use super::gateway::{b64, int64_field, Gateway};
use serde_json::json;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// The TTL of a keepalive answer; 0 (missing, proto3's default) when the
/// lease has expired or does not exist.
pub fn keepalive_ttl(v: &serde_json::Value) -> Result<i64, super::gateway::DecodeError> {
    match v.get("result") {
        Some(r) => int64_field(r, "TTL"),
        None => int64_field(v, "TTL"),
    }
}

/// A host's liveness key, kept alive by a thread until dropped (then the
/// lease is revoked, and the key goes at once).
pub struct HostLease {
    gw: Arc<Gateway>,
    id: i64,
    stop: Arc<AtomicBool>,
    /// Set when a renewal found the lease expired.
    lost: Arc<AtomicBool>,
    renewer: Option<JoinHandle<()>>,
}

fn other(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// The key of `host` under `prefix`.
pub fn host_key(prefix: &str, host: &str) -> Vec<u8> {
    format!("{}/hosts/{host}", prefix.trim_end_matches('/')).into_bytes()
}

impl HostLease {
    /// Grants a lease of `ttl` seconds, puts the host key under it, and
    /// renews it every `ttl / 3`.
    pub fn start(gw: Arc<Gateway>, prefix: &str, host: &str, ttl: i64) -> io::Result<HostLease> {
        let v = gw
            .call("/v3/lease/grant", &json!({"TTL": ttl.to_string()}))
            .map_err(other)?;
        let id = int64_field(&v, "ID").map_err(other)?;
        if id == 0 {
            return Err(other(format!("lease grant gave no ID: {v}")));
        }
        gw.call(
            "/v3/kv/put",
            &json!({"key": b64(&host_key(prefix, host)), "value": b64(host.as_bytes()),
                    "lease": id.to_string()}),
        )
        .map_err(other)?;
        let stop = Arc::new(AtomicBool::new(false));
        let lost = Arc::new(AtomicBool::new(false));
        let renewer = {
            let (gw, stop, lost) = (gw.clone(), stop.clone(), lost.clone());
            let every = Duration::from_millis((ttl.max(1) as u64) * 1000 / 3);
            std::thread::Builder::new()
                .name("etcd-lease".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(every);
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        match gw.call("/v3/lease/keepalive", &json!({"ID": id.to_string()})) {
                            Ok(v) if keepalive_ttl(&v).unwrap_or(0) > 0 => {}
                            Ok(_) => {
                                log::error!("etcd lease {id:x} expired: this host counts as dead");
                                lost.store(true, Ordering::Relaxed);
                                return;
                            }
                            Err(e) => log::warn!("etcd lease {id:x}: renewal failed: {e}"),
                        }
                    }
                })?
        };
        Ok(HostLease {
            gw,
            id,
            stop,
            lost,
            renewer: Some(renewer),
        })
    }

    /// The lease id.
    pub fn id(&self) -> i64 {
        self.id
    }

    /// False once a renewal found the lease expired.
    pub fn alive(&self) -> bool {
        !self.lost.load(Ordering::Relaxed)
    }

    /// Stops renewing without revoking (as a host that died would).
    pub fn abandon(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.renewer.take();
        self.id = 0;
    }
}

impl Drop for HostLease {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if self.id != 0 {
            let _ = self
                .gw
                .call("/v3/lease/revoke", &json!({"ID": self.id.to_string()}));
        }
    }
}

/// Whether `host`'s liveness key exists (its lease is alive).
pub fn host_alive(gw: &Gateway, prefix: &str, host: &str) -> io::Result<bool> {
    Ok(gw.get(&host_key(prefix, host)).map_err(other)?.is_some())
}

/// [`HostLiveness`](crate::handoff::hostside::HostLiveness) from the etcd
/// host leases under a prefix.
pub struct EtcdHostLiveness {
    gw: Arc<Gateway>,
    prefix: String,
}

impl EtcdHostLiveness {
    pub fn new(gw: Arc<Gateway>, prefix: &str) -> EtcdHostLiveness {
        EtcdHostLiveness {
            gw,
            prefix: prefix.to_string(),
        }
    }
}

impl crate::handoff::hostside::HostLiveness for EtcdHostLiveness {
    fn alive(&self, host: &str) -> io::Result<bool> {
        host_alive(&self.gw, &self.prefix, host)
    }

    fn describe(&self) -> String {
        format!(
            "etcd host leases at {}{}/hosts",
            self.gw.endpoints().join(","),
            self.prefix.trim_end_matches('/')
        )
    }
}

/// A host's own liveness lease and the view of everyone's, from
/// [`StoreUrl::register_host`](crate::epoch::StoreUrl::register_host).
pub struct HostRegistration {
    /// Renewed until dropped (then revoked).
    pub lease: HostLease,
    pub liveness: Arc<dyn crate::handoff::hostside::HostLiveness>,
}

/// Registers `host` under `prefix` with a lease of `ttl` seconds.
pub fn register_host(
    endpoints: &[String],
    prefix: &str,
    host: &str,
    ttl: u64,
) -> io::Result<HostRegistration> {
    let gw = Arc::new(Gateway::new(
        endpoints,
        Duration::from_secs(3),
        Duration::from_secs(8),
    ));
    let lease = HostLease::start(
        gw.clone(),
        prefix,
        host,
        ttl.clamp(1, i64::MAX as u64) as i64,
    )?;
    log::info!(
        "host {host:?} registered in etcd under {}/hosts (lease {:x}, ttl {ttl}s)",
        prefix.trim_end_matches('/'),
        lease.id()
    );
    Ok(HostRegistration {
        lease,
        liveness: Arc::new(EtcdHostLiveness::new(gw, prefix)),
    })
}
