//! What `blkshim serve` serves: from the command line, or a TOML file.
//!
//! ```toml
//! socket = "/run/blkshim.sock"     # optional, default ./blkshim.sock
//! listen = "127.0.0.1:10809"       # optional TCP listener
//! control = "/run/blkshim.ctl"     # optional, default ./blkshim.ctl
//! control_group = "blkshim"        # optional: this group may use the control socket too
//! state_dir = "/var/lib/blkshim"   # optional epoch store (file:DIR) and hand-off ledger
//! epoch_store = "etcd://10.0.0.1:2379,10.0.0.2:2379,10.0.0.3:2379/blkshim"  # optional
//! fence_timeout = "5s"
//! cache = "writeback"              # or "none" (O_DIRECT)
//! metrics = "127.0.0.1:9187"       # optional Prometheus /metrics (a bare port: loopback)
//! vhost_queues = 2                 # queues each vhost-user-blk device offers
//! tls = "require"                  # off, on or require (TCP default: require)
//! tls_certificates = "/etc/blkshim/pki"  # ca-cert.pem, server-cert.pem, server-key.pem
//! tls_verify_peer = true           # clients need a certificate from ca-cert.pem
//! # tls_psk = "/etc/blkshim/keys.psk"  # or: pre-shared keys, USERNAME:HEXKEY lines
//!
//! [[disk]]
//! name = "vm1"
//! path = "/images/vm1.raw"
//! size = "10G"                     # created sparse when missing
//!
//! [[vhost_user_blk]]               # see crate::vhost
//! disk = "vm1"
//! epoch = 7                        # optional: the disk's current epoch
//! socket = "/run/blkshim/vm1.vhost"
//!
//! [[client]]                       # see nbd::authz
//! identity = "CN=host-a,O=example"
//! disks = ["vm1"]
//! access = "rw"
//! advance = true
//! ```

use super::authz::ClientRule;
use super::tls::TlsMode;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// One disk to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    pub name: String,
    pub path: PathBuf,
    /// Size of the sparse image created when the file does not exist.
    pub size: Option<u64>,
}

/// Everything the server needs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub socket: Option<PathBuf>,
    pub listen: Option<String>,
    pub control: PathBuf,
    /// `--control-group`: a group that may use the control socket besides
    /// root and the server's user (the socket is then 0660, this group's).
    pub control_group: Option<String>,
    /// Where epochs persist (unless `epoch_store` says otherwise) and, in
    /// host-side mode, the hand-off ledger; `None`: `.blkshim-epochs` next
    /// to the first disk.
    pub state_dir: Option<PathBuf>,
    /// `--epoch-store URL`: `file:DIR` or `etcd://...`; `None`:
    /// `file:` the state directory.
    pub epoch_store: Option<crate::epoch::StoreUrl>,
    pub fence_timeout: Duration,
    pub cache: CacheMode,
    /// Storage engine (auto: io_uring when the kernel allows it).
    pub engine: crate::storage::EngineKind,
    /// `--storage-delay` (testing only): hold I/Os before the engine.
    pub storage_delay: Option<crate::storage::StorageDelay>,
    /// `--metrics ADDR`: serve Prometheus metrics on HTTP there; off when `None`.
    pub metrics: Option<String>,
    pub disks: Vec<DiskSpec>,
    /// Host-side mode (`--fence`): this server is one host's writer of
    /// shared disks, admitted at the first write. `None`: a gateway.
    pub host_side: Option<HostSideConfig>,
    /// `--tls`; `None`: the default (see [`ServeConfig::tls_modes`]).
    pub tls: Option<TlsMode>,
    /// `--tls-certificates DIR` (qemu's layout).
    pub tls_certificates: Option<PathBuf>,
    /// `--tls-verify-peer`: a client certificate is required.
    pub tls_verify_peer: bool,
    /// `--tls-psk FILE`: TLS with pre-shared keys (`USERNAME:HEXKEY`
    /// lines) instead of certificates.
    pub tls_psk: Option<PathBuf>,
    /// `[[client]]` entries: who may open which disk.
    pub clients: Vec<ClientRule>,
    /// `--vhost-user-blk DISK[@EPOCH]=SOCKET`, `[[vhost_user_blk]]`.
    pub vhost_user_blk: Vec<crate::vhost::VhostSpec>,
    /// `--vhost-queues`: queues each vhost-user-blk device offers.
    pub vhost_queues: u16,
}

/// `blkshim serve --fence ...`: one host of a host-side deployment.
#[derive(Debug, Clone)]
pub struct HostSideConfig {
    pub fence: crate::storage::fencing::FenceMode,
    /// This host's name in the shared ledger (default: the machine's own
    /// identity). Two servers on one machine with different ids are two
    /// hosts to each other.
    pub host_id: Option<String>,
    /// How long a first write waits for the holder's hand-off record.
    pub resume_wait: Duration,
    /// With an etcd epoch store: the TTL in seconds of this host's
    /// liveness lease (a holder whose lease ended is fenced without the
    /// wait).
    pub host_lease_ttl: u64,
    /// The device `--fence pr` registers through, per disk name (default:
    /// the disk's own path; e.g. the SCSI device under a device-mapper
    /// stack that has no PR support of its own).
    pub pr_devices: Vec<(String, PathBuf)>,
    pub pr_preempt: crate::storage::fencing::PreemptMode,
    /// `--fence sanlock`: the lockspace, this host's id and lease device.
    pub sanlock: crate::storage::fencing::sanlock::SanlockArgs,
}

impl HostSideConfig {
    /// The device `--fence pr` uses for `disk`.
    pub fn pr_device<'a>(&'a self, disk: &'a DiskSpec) -> &'a Path {
        self.pr_devices
            .iter()
            .find(|(n, _)| n == &disk.name || n.is_empty())
            .map_or(disk.path.as_path(), |(_, p)| p.as_path())
    }
}

/// `--pr-device NAME=DEV` or `--pr-device DEV` (every disk: meant for one).
pub fn parse_pr_device(arg: &str) -> (String, PathBuf) {
    match arg.split_once('=') {
        Some((n, p)) if !n.contains('/') => (n.to_string(), PathBuf::from(p)),
        _ => (String::new(), PathBuf::from(arg)),
    }
}

/// `preempt` or `preempt-and-abort`.
pub fn parse_preempt(s: &str) -> Result<crate::storage::fencing::PreemptMode, String> {
    use crate::storage::fencing::PreemptMode;
    match s {
        "preempt" => Ok(PreemptMode::Preempt),
        "preempt-and-abort" => Ok(PreemptMode::PreemptAndAbort),
        _ => Err(format!("{s:?}: preempt or preempt-and-abort")),
    }
}

impl ServeConfig {
    /// The state directory actually used: the epoch store's when it is a
    /// file store, and the hand-off ledger's (host-side mode) always: even
    /// with an etcd epoch store, the ledger needs a directory every host
    /// shares.
    pub fn epoch_dir(&self) -> PathBuf {
        if let Some(d) = &self.state_dir {
            return d.clone();
        }
        if let Some(crate::epoch::StoreUrl::File(d)) = &self.epoch_store {
            return d.clone();
        }
        let parent = self
            .disks
            .first()
            .and_then(|d| d.path.parent())
            .filter(|p| !p.as_os_str().is_empty() && !p.starts_with("/dev"))
            .unwrap_or(Path::new("."));
        parent.join(".blkshim-epochs")
    }

    /// The epoch store actually used.
    pub fn store_url(&self) -> crate::epoch::StoreUrl {
        self.epoch_store
            .clone()
            .unwrap_or_else(|| crate::epoch::StoreUrl::File(self.epoch_dir()))
    }

    /// The TLS modes of the TCP listener (`None`: none) and the unix
    /// socket. Over TCP anyone who reaches the port is a client, so TLS is
    /// required unless `--tls off` says otherwise; with neither
    /// certificates nor `--tls off` the server refuses to start rather
    /// than serve in the clear. The unix socket (guarded by file
    /// permissions) offers TLS when there are certificates and requires
    /// it only when `--tls require` is given.
    pub fn tls_modes(&self) -> Result<(Option<TlsMode>, TlsMode), String> {
        if self.tls_certificates.is_some() && self.tls_psk.is_some() {
            return Err("--tls-certificates and --tls-psk: give one".into());
        }
        let certs = self.tls_certificates.is_some() || self.tls_psk.is_some();
        if matches!(self.tls, Some(TlsMode::On | TlsMode::Require)) && !certs {
            return Err("--tls on/require needs --tls-certificates DIR (ca-cert.pem, server-cert.pem, server-key.pem) or --tls-psk FILE".into());
        }
        let tcp = match (&self.listen, self.tls) {
            (None, _) => None,
            (Some(_), Some(m)) => Some(m),
            (Some(_), None) if certs => Some(TlsMode::Require),
            (Some(addr), None) => {
                return Err(format!(
                    "--listen {addr}: NBD over TCP requires TLS by default, so that not everyone who can reach the port may open (and take over) the disks: give --tls-certificates DIR, or --tls off to serve in the clear anyway"
                ))
            }
        };
        let unix = match self.tls {
            Some(TlsMode::Off) => TlsMode::Off,
            Some(TlsMode::Require) => TlsMode::Require,
            _ if certs => TlsMode::On,
            _ => TlsMode::Off,
        };
        Ok((tcp, unix))
    }
}

/// `NAME=PATH` or a bare path (name = the file's stem).
pub fn parse_disk_arg(arg: &str, size: Option<u64>) -> Result<DiskSpec, String> {
    let (name, path) = match arg.split_once('=') {
        Some((n, p)) if !n.contains('/') => (n.to_string(), PathBuf::from(p)),
        _ => {
            let p = PathBuf::from(arg);
            let stem = p
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .ok_or_else(|| format!("cannot name disk {arg:?}: give NAME=PATH"))?;
            (stem, p)
        }
    };
    crate::epoch::validate_disk_name(&name).map_err(|e| e.to_string())?;
    if name.contains('@') {
        return Err(format!("disk name {name:?} must not contain '@'"));
    }
    Ok(DiskSpec { name, path, size })
}

/// `4096`, `512K`, `10M`, `1G`, `2T` (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("bad size suffix in {s:?}")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("bad size {s:?}"))
}

/// `--storage-delay`: `KIND=DURATION[,KIND=DURATION...][,armed-file=PATH]`
/// with KIND one of read, write, flush, trim, zeroes (unnamed kinds: 0),
/// e.g. `write=2s` or `write=6s,flush=0,armed-file=/tmp/arm`.
pub fn parse_storage_delay(s: &str) -> Result<crate::storage::StorageDelay, String> {
    let mut d = crate::storage::StorageDelay::default();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?}: expected KIND=DURATION or armed-file=PATH"))?;
        let slot = match k {
            "read" => &mut d.read,
            "write" => &mut d.write,
            "flush" => &mut d.flush,
            "trim" => &mut d.trim,
            "zeroes" => &mut d.zeroes,
            "armed-file" => {
                d.armed_file = Some(PathBuf::from(v));
                continue;
            }
            _ => {
                return Err(format!(
                    "{k:?}: read, write, flush, trim, zeroes or armed-file"
                ))
            }
        };
        *slot = parse_duration(v)?;
    }
    if d.is_zero() {
        return Err(format!("{s:?} delays nothing"));
    }
    Ok(d)
}

/// `500ms`, `5s`, `2m`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let bad = || format!("bad duration {s:?} (e.g. 500ms, 5s, 2m)");
    let (num, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: f64 = num.trim().parse().map_err(|_| bad())?;
    if !n.is_finite() || n < 0.0 {
        return Err(bad());
    }
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" | "min" => n * 60.0,
        _ => return Err(bad()),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| bad())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDisk {
    name: Option<String>,
    path: PathBuf,
    size: Option<SizeValue>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum SizeValue {
    Bytes(u64),
    Text(String),
}

impl SizeValue {
    fn bytes(&self) -> Result<u64, String> {
        match self {
            SizeValue::Bytes(n) => Ok(*n),
            SizeValue::Text(s) => parse_size(s),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    socket: Option<PathBuf>,
    listen: Option<String>,
    control: Option<PathBuf>,
    control_group: Option<String>,
    state_dir: Option<PathBuf>,
    epoch_store: Option<String>,
    fence_timeout: Option<String>,
    cache: Option<CacheMode>,
    size: Option<SizeValue>,
    metrics: Option<String>,
    #[serde(default)]
    disk: Vec<FileDisk>,
    tls: Option<TlsMode>,
    tls_certificates: Option<PathBuf>,
    tls_verify_peer: Option<bool>,
    tls_psk: Option<PathBuf>,
    #[serde(default)]
    client: Vec<ClientRule>,
    vhost_queues: Option<u16>,
    #[serde(default)]
    vhost_user_blk: Vec<FileVhost>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileVhost {
    disk: String,
    epoch: Option<u64>,
    socket: PathBuf,
}

/// Read a TOML config file into `base` (command-line values already set
/// there win over the file's).
pub fn load_file(path: &Path, base: &mut ServeConfig, cli_set: &CliSet) -> Result<(), String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let f: FileConfig =
        toml::from_str(&text).map_err(|e| format!("config {}: {e}", path.display()))?;
    if !cli_set.socket {
        if let Some(s) = f.socket {
            base.socket = Some(s);
        }
    }
    if base.listen.is_none() {
        base.listen = f.listen;
    }
    if !cli_set.control {
        if let Some(c) = f.control {
            base.control = c;
        }
    }
    if base.control_group.is_none() {
        base.control_group = f.control_group;
    }
    if base.state_dir.is_none() {
        base.state_dir = f.state_dir;
    }
    if base.epoch_store.is_none() {
        base.epoch_store = f
            .epoch_store
            .as_deref()
            .map(crate::epoch::StoreUrl::parse)
            .transpose()?;
    }
    if !cli_set.fence_timeout {
        if let Some(t) = f.fence_timeout {
            base.fence_timeout = parse_duration(&t)?;
        }
    }
    if !cli_set.cache {
        if let Some(c) = f.cache {
            base.cache = c;
        }
    }
    if base.metrics.is_none() {
        base.metrics = f.metrics;
    }
    if base.tls.is_none() {
        base.tls = f.tls;
    }
    if base.tls_certificates.is_none() {
        base.tls_certificates = f.tls_certificates;
    }
    if base.tls_psk.is_none() {
        base.tls_psk = f.tls_psk;
    }
    if !cli_set.tls_verify_peer {
        if let Some(v) = f.tls_verify_peer {
            base.tls_verify_peer = v;
        }
    }
    base.clients.extend(f.client);
    if !cli_set.vhost_queues {
        if let Some(q) = f.vhost_queues {
            base.vhost_queues = q;
        }
    }
    base.vhost_user_blk.extend(
        f.vhost_user_blk
            .into_iter()
            .map(|v| crate::vhost::VhostSpec {
                disk: v.disk,
                epoch: v.epoch,
                socket: v.socket,
            }),
    );
    let default_size = f.size.as_ref().map(SizeValue::bytes).transpose()?;
    for d in f.disk {
        let size = d
            .size
            .as_ref()
            .map(SizeValue::bytes)
            .transpose()?
            .or(default_size);
        let spec = match d.name {
            Some(n) => parse_disk_arg(&format!("{n}={}", d.path.display()), size)?,
            None => parse_disk_arg(&d.path.to_string_lossy(), size)?,
        };
        base.disks.push(spec);
    }
    Ok(())
}

/// Which options the command line set explicitly.
#[derive(Debug, Default, Clone, Copy)]
pub struct CliSet {
    pub socket: bool,
    pub control: bool,
    pub fence_timeout: bool,
    pub cache: bool,
    pub tls_verify_peer: bool,
    pub vhost_queues: bool,
}

/// Page cache or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// O_DIRECT: data bypasses the page cache (like qemu's cache=none).
    None,
    /// Buffered I/O through the page cache.
    Writeback,
}

impl std::str::FromStr for CacheMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" | "direct" => Ok(CacheMode::None),
            "writeback" | "buffered" => Ok(CacheMode::Writeback),
            _ => Err(format!("unknown cache mode {s:?} (none or writeback)")),
        }
    }
}

/// Open (creating a sparse file of `create_size` bytes when missing) the
/// storage a served disk uses: the one place that picks the engine.
pub fn open_disk_storage(
    path: &std::path::Path,
    create_size: Option<u64>,
    cache: CacheMode,
    engine: crate::storage::EngineKind,
) -> std::io::Result<std::sync::Arc<dyn crate::storage::BlockStorage>> {
    if !path.exists() && create_size.is_none() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{} does not exist and no --size was given", path.display()),
        ));
    }
    crate::storage::open_storage(
        path,
        &crate::storage::OpenOptions {
            engine,
            direct: cache == CacheMode::None,
            create_size,
            read_only: false,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_args() {
        let d = parse_disk_arg("vm1=/tmp/x.img", None).unwrap();
        assert_eq!(
            (d.name.as_str(), d.path.to_str()),
            ("vm1", Some("/tmp/x.img"))
        );
        let d = parse_disk_arg("/tmp/images/vm2.raw", Some(5)).unwrap();
        assert_eq!((d.name.as_str(), d.size), ("vm2", Some(5)));
        assert!(parse_disk_arg("bad@name=/x", None).is_err());
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("12Q").is_err());
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn storage_delays() {
        let d = parse_storage_delay("write=2s,read=0,flush=10ms,armed-file=/tmp/a").unwrap();
        assert_eq!(d.write, Duration::from_secs(2));
        assert_eq!(d.flush, Duration::from_millis(10));
        assert!(d.read.is_zero() && d.trim.is_zero());
        assert_eq!(d.armed_file, Some(PathBuf::from("/tmp/a")));
        assert!(parse_storage_delay("write=0").is_err(), "delays nothing");
        assert!(parse_storage_delay("writes=1s").is_err());
        assert!(parse_storage_delay("write").is_err());
        assert!(parse_storage_delay("write=-1s").is_err());
    }

    /// A configuration with the defaults and `disks`.
    fn config(disks: Vec<DiskSpec>) -> ServeConfig {
        ServeConfig {
            socket: None,
            listen: None,
            control: "x.ctl".into(),
            control_group: None,
            state_dir: None,
            epoch_store: None,
            fence_timeout: Duration::from_secs(5),
            cache: CacheMode::Writeback,
            engine: crate::storage::EngineKind::Auto,
            storage_delay: None,
            metrics: None,
            disks,
            host_side: None,
            tls: None,
            tls_certificates: None,
            tls_verify_peer: true,
            tls_psk: None,
            clients: Vec::new(),
            vhost_user_blk: Vec::new(),
            vhost_queues: 2,
        }
    }

    #[test]
    fn tcp_requires_tls_unless_turned_off_and_unix_offers_it() {
        let mut c = config(vec![]);
        assert_eq!(c.tls_modes().unwrap(), (None, TlsMode::Off), "as before");
        c.listen = Some("10809".into());
        let e = c.tls_modes().unwrap_err();
        assert!(
            e.contains("--tls-certificates") && e.contains("--tls off"),
            "names both ways out: {e}"
        );
        c.tls = Some(TlsMode::Off);
        assert_eq!(c.tls_modes().unwrap(), (Some(TlsMode::Off), TlsMode::Off));
        c.tls = Some(TlsMode::Require);
        assert!(c.tls_modes().is_err(), "require without certificates");
        c.tls_certificates = Some("/pki".into());
        assert_eq!(
            c.tls_modes().unwrap(),
            (Some(TlsMode::Require), TlsMode::Require)
        );
        c.tls = None;
        assert_eq!(
            c.tls_modes().unwrap(),
            (Some(TlsMode::Require), TlsMode::On)
        );
        c.tls = Some(TlsMode::On);
        assert_eq!(c.tls_modes().unwrap(), (Some(TlsMode::On), TlsMode::On));
        c.listen = None;
        c.tls = None;
        assert_eq!(c.tls_modes().unwrap(), (None, TlsMode::On));
        c.tls_psk = Some("/keys.psk".into());
        assert!(c.tls_modes().is_err(), "certificates and PSK");
        c.tls_certificates = None;
        c.listen = Some("10809".into());
        assert_eq!(
            c.tls_modes().unwrap(),
            (Some(TlsMode::Require), TlsMode::On)
        );
    }

    #[test]
    fn toml_tls_and_clients() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "tls = \"require\"\ntls_certificates = \"/pki\"\ntls_verify_peer = false\n[[client]]\nidentity = \"CN=a\"\ndisks = [\"vm1\"]\naccess = \"rw\"\nadvance = true\n[[client]]\nidentity = \"CN=b\"\ndisks = [\"*\"]\n",
        )
        .unwrap();
        let mut c = config(vec![]);
        load_file(&p, &mut c, &CliSet::default()).unwrap();
        assert_eq!(c.tls, Some(TlsMode::Require));
        assert_eq!(c.tls_certificates, Some(PathBuf::from("/pki")));
        assert!(!c.tls_verify_peer);
        assert_eq!(c.clients.len(), 2);
        assert!(c.clients[0].advance);
        assert_eq!(c.clients[1].access, crate::nbd::authz::Access::Ro);
        for bad in [
            "tls = \"maybe\"\n",
            "[[client]]\nidentity = \"CN=a\"\ndisks = [\"vm1\"]\naccess = \"write\"\n",
            "[[client]]\nidentity = \"CN=a\"\n",
            "[[client]]\nidentity = \"CN=a\"\ndisks = [\"vm1\"]\nadvanse = true\n",
        ] {
            std::fs::write(&p, bad).unwrap();
            let e = load_file(&p, &mut config(vec![]), &CliSet::default()).unwrap_err();
            assert!(e.contains("c.toml"), "{bad}: {e}");
        }
    }

    #[test]
    fn toml_vhost_user_blk_and_cli_spec() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "vhost_queues = 4\n[[vhost_user_blk]]\ndisk = \"vm1\"\nepoch = 7\nsocket = \"/run/a.vhost\"\n[[vhost_user_blk]]\ndisk = \"vm2\"\nsocket = \"/run/b.vhost\"\n",
        )
        .unwrap();
        let mut c = config(vec![]);
        load_file(&p, &mut c, &CliSet::default()).unwrap();
        assert_eq!(c.vhost_queues, 4);
        let spec = |disk: &str, epoch, socket: &str| crate::vhost::VhostSpec {
            disk: disk.into(),
            epoch,
            socket: socket.into(),
        };
        assert_eq!(
            c.vhost_user_blk,
            vec![
                spec("vm1", Some(7), "/run/a.vhost"),
                spec("vm2", None, "/run/b.vhost")
            ]
        );
        // The command line's --vhost-queues wins over the file's.
        let mut c = config(vec![]);
        let set = CliSet {
            vhost_queues: true,
            ..Default::default()
        };
        load_file(&p, &mut c, &set).unwrap();
        assert_eq!(c.vhost_queues, 2);
        use crate::vhost::VhostSpec;
        assert_eq!(
            VhostSpec::parse("vm1@8=/run/x.vhost").unwrap(),
            spec("vm1", Some(8), "/run/x.vhost")
        );
        assert_eq!(VhostSpec::parse("vm1=x").unwrap(), spec("vm1", None, "x"));
        for bad in ["vm1", "vm1@x=/s", "@3=/s", "vm1="] {
            assert!(VhostSpec::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn toml_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "fence_timeout = \"1s\"\ncache = \"none\"\n[[disk]]\nname = \"a\"\npath = \"/tmp/a.img\"\nsize = \"1M\"\n[[disk]]\npath = \"/tmp/b.img\"\nsize = 4096\n",
        )
        .unwrap();
        let mut c = config(vec![]);
        load_file(&p, &mut c, &CliSet::default()).unwrap();
        assert_eq!(c.fence_timeout, Duration::from_secs(1));
        assert_eq!(c.cache, CacheMode::None);
        assert_eq!(c.disks.len(), 2);
        assert_eq!(c.disks[0].size, Some(1 << 20));
        assert_eq!(c.disks[1].name, "b");
        std::fs::write(&p, "bogus = 1\n").unwrap();
        assert!(load_file(&p, &mut c, &CliSet::default()).is_err());
    }

    /// `metrics` in the file turns the endpoint on; `--metrics` wins.
    #[test]
    fn metrics_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "metrics = \":9187\"\n").unwrap();
        let mut c = config(vec![]);
        load_file(&p, &mut c, &CliSet::default()).unwrap();
        assert_eq!(c.metrics.as_deref(), Some(":9187"));
        let mut c = config(vec![]);
        c.metrics = Some("127.0.0.1:1".into());
        load_file(&p, &mut c, &CliSet::default()).unwrap();
        assert_eq!(c.metrics.as_deref(), Some("127.0.0.1:1"));
    }

    #[test]
    fn epoch_store_key_and_state_dir() {
        use crate::epoch::StoreUrl;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        let mut c = config(vec![parse_disk_arg("/img/vm1.raw", None).unwrap()]);
        // Default: a file store in the state directory next to the disk.
        assert_eq!(c.store_url(), StoreUrl::File("/img/.blkshim-epochs".into()));
        std::fs::write(&p, "epoch_store = \"etcd://a:1,b:2/x\"\n").unwrap();
        load_file(&p, &mut c, &CliSet::default()).unwrap();
        assert_eq!(
            c.store_url(),
            StoreUrl::Etcd {
                endpoints: vec!["a:1".into(), "b:2".into()],
                prefix: "/x".into()
            }
        );
        // The ledger keeps its directory.
        assert_eq!(c.epoch_dir(), PathBuf::from("/img/.blkshim-epochs"));
        // file:DIR is the state directory too, unless --state-dir says.
        c.epoch_store = Some(StoreUrl::parse("file:/s").unwrap());
        assert_eq!(c.epoch_dir(), PathBuf::from("/s"));
        c.state_dir = Some("/t".into());
        assert_eq!(c.epoch_dir(), PathBuf::from("/t"));
        std::fs::write(&p, "epoch_store = \"/no/scheme\"\n").unwrap();
        c.epoch_store = None;
        assert!(load_file(&p, &mut c, &CliSet::default()).is_err());
        for bad in [
            "etcd://",
            "etcd://host",
            "etcd://h:99999",
            "file:",
            "consul://x:1",
        ] {
            assert!(StoreUrl::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            StoreUrl::parse("etcd://h:1/").unwrap(),
            StoreUrl::Etcd {
                endpoints: vec!["h:1".into()],
                prefix: "/blkshim".into()
            }
        );
    }
}
