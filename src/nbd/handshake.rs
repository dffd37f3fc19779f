//! The fixed-newstyle handshake: greeting, option haggling, and the
//! export (and epoch) the connection will serve.

use super::allocation::AllocationMap;
use super::authz::{Authz, Grant, ANONYMOUS};
use super::proto::*;
use super::tls::{TlsEngine, TlsMode, TlsPolicy};
use crate::handoff::{Disk, DiskError, Writer};
use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::sync::Arc;

/// The disks a server exports, by name.
#[derive(Default, Clone)]
pub struct Exports {
    pub disks: BTreeMap<String, Arc<Disk>>,
    /// Hole maps of the disks that are image files (for `base:allocation`).
    pub allocation: BTreeMap<String, Arc<AllocationMap>>,
}

impl Exports {
    /// The disk an export name means. An empty name picks the only disk.
    fn lookup(&self, disk: &str) -> Option<&Arc<Disk>> {
        if disk.is_empty() && self.disks.len() == 1 {
            return self.disks.values().next();
        }
        self.disks.get(disk)
    }
}

/// A stream the handshake can turn into TLS (STARTTLS).
pub trait Transport: Read + Write {
    /// Run the TLS handshake and go on over TLS; returns the client
    /// certificate's subject, if it sent one.
    fn start_tls(&mut self, cfg: &TlsEngine) -> io::Result<Option<String>>;
}

/// Who may connect how: the listener's TLS policy and the authorization
/// rules.
pub struct Access<'a> {
    pub tls: &'a TlsPolicy,
    pub authz: &'a Authz,
}

/// What the handshake settled.
pub struct Negotiated {
    pub disk: Arc<Disk>,
    pub writer: Writer,
    pub structured: bool,
    pub flags: u16,
    pub limits: ExportLimits,
    /// Set when `base:allocation` was negotiated for this export.
    pub allocation: Option<Arc<AllocationMap>>,
    /// The client certificate's subject (TLS with a client certificate).
    pub identity: Option<String>,
    pub tls: bool,
    pub read_only: bool,
}

/// Preferred block size advertised to clients.
const PREFERRED_BLOCK: u32 = 4096;

/// Transmission flags for `disk`: only what is really supported.
/// CAN_MULTI_CONN holds because every connection to a disk shares one
/// storage whose flush (fdatasync) covers all completed writes.
pub fn transmission_flags(disk: &Disk, structured: bool, read_only: bool) -> u16 {
    let caps = disk.capabilities();
    if read_only {
        let mut f = TF_HAS_FLAGS | TF_READ_ONLY | TF_SEND_FLUSH | TF_CAN_MULTI_CONN;
        if structured {
            f |= TF_SEND_DF;
        }
        return f;
    }
    let mut f = TF_HAS_FLAGS
        | TF_SEND_FLUSH
        | TF_SEND_FUA
        | TF_SEND_WRITE_ZEROES
        | TF_SEND_FAST_ZERO
        | TF_CAN_MULTI_CONN;
    if caps.discard {
        f |= TF_SEND_TRIM;
    }
    if structured {
        // Reads are always sent as one chunk, so "don't fragment" holds.
        f |= TF_SEND_DF;
    }
    f
}

fn min_block(disk: &Disk) -> u32 {
    (disk.capabilities().alignment.clamp(512, 65536)) as u32
}

/// A failed handshake (the connection is closed afterwards).
#[derive(Debug)]
pub enum HandshakeError {
    Io(io::Error),
    Proto(ProtoError),
    /// The client broke a rule; closed with this reason.
    Refused(String),
}

impl std::fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandshakeError::Io(e) => write!(f, "i/o: {e}"),
            HandshakeError::Proto(e) => write!(f, "protocol: {e}"),
            HandshakeError::Refused(s) => write!(f, "{s}"),
        }
    }
}

impl From<io::Error> for HandshakeError {
    fn from(e: io::Error) -> Self {
        HandshakeError::Io(e)
    }
}

impl From<ProtoError> for HandshakeError {
    fn from(e: ProtoError) -> Self {
        HandshakeError::Proto(e)
    }
}

/// How an export name resolved.
enum Resolved<'a> {
    Ok(&'a Arc<Disk>, Option<u64>, Grant),
    Err(u32, String),
}

/// The connection's identity as the rules see it.
struct Who<'a> {
    identity: Option<&'a str>,
    authz: &'a Authz,
}

impl Who<'_> {
    fn name(&self) -> &str {
        self.identity.unwrap_or(ANONYMOUS)
    }
}

fn resolve<'a>(exports: &'a Exports, name: &str, who: &Who) -> Resolved<'a> {
    let parsed = match parse_export_name(name) {
        Ok(p) => p,
        Err(msg) => return Resolved::Err(REP_ERR_INVALID, msg),
    };
    let disk = exports.lookup(&parsed.disk);
    let grant = disk.and_then(|d| who.authz.grant(who.identity, d.name()));
    let (disk, grant) = match (disk, grant) {
        (Some(d), Some(g)) => (d, g),
        // A client held to the rules learns nothing of disks it may not
        // open, not even whether they exist.
        _ if who.authz.restricted(who.identity) => {
            return Resolved::Err(
                REP_ERR_POLICY,
                format!("export {:?} not authorized for {}", parsed.disk, who.name()),
            )
        }
        _ => {
            return Resolved::Err(
                REP_ERR_UNKNOWN,
                format!("no export named {:?}", parsed.disk),
            )
        }
    };
    if let Some(e) = parsed.epoch {
        let current = disk.current_epoch();
        if e < current {
            disk.note_refused_stale_writer();
            return Resolved::Err(
                REP_ERR_POLICY,
                format!(
                    "epoch {e} is stale: disk {:?} is at epoch {current}",
                    disk.name()
                ),
            );
        }
        if e > current && !grant.advance {
            return Resolved::Err(
                REP_ERR_POLICY,
                format!(
                    "{} may not advance disk {:?} (at epoch {current}) to epoch {e}",
                    who.name(),
                    disk.name()
                ),
            );
        }
    }
    Resolved::Ok(disk, parsed.epoch, grant)
}

fn register(disk: &Arc<Disk>, epoch: Option<u64>, label: &str) -> Result<Writer, (u32, String)> {
    disk.register(epoch, label).map_err(|e| match e {
        DiskError::StaleEpoch { .. } | DiskError::HostSideEpoch { .. } => {
            (REP_ERR_POLICY, e.to_string())
        }
        other => (REP_ERR_UNKNOWN, other.to_string()),
    })
}

fn send_error<W: Write>(s: &mut W, option: u32, code: u32, msg: &str) -> io::Result<()> {
    s.write_all(&encode_option_reply(option, code, msg.as_bytes()))
}

/// Run the handshake on `s`. `Ok(None)`: the client aborted or left cleanly.
pub fn handshake<S: Transport>(
    s: &mut S,
    exports: &Exports,
    access: &Access,
    label: &str,
) -> Result<Option<Negotiated>, HandshakeError> {
    s.write_all(&encode_greeting())?;
    s.flush()?;
    let mut cf = [0u8; 4];
    s.read_exact(&mut cf)?;
    let client_flags = u32::from_be_bytes(cf);
    if client_flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
        return Err(HandshakeError::Refused(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    let fixed = client_flags & CLIENT_FIXED_NEWSTYLE != 0;
    let no_zeroes = client_flags & CLIENT_NO_ZEROES != 0;
    let mut structured = false;
    // The export `base:allocation` was set for (SET_META_CONTEXT).
    let mut meta_export: Option<String> = None;
    let mut tls = false;
    let mut identity: Option<String> = None;
    loop {
        let mut hdr = [0u8; OPTION_HEADER_LEN];
        match s.read_exact(&mut hdr) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let h = match parse_option_header(&hdr) {
            Ok(h) => h,
            Err(ProtoError::OptionTooLong(n)) => {
                let option = u32::from_be_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]);
                let _ = send_error(s, option, REP_ERR_TOO_BIG, "option too long");
                return Err(ProtoError::OptionTooLong(n).into());
            }
            Err(e) => return Err(e.into()),
        };
        let mut data = vec![0u8; h.len as usize];
        s.read_exact(&mut data)?;
        if access.tls.mode == TlsMode::Require && !tls {
            match h.option {
                OPT_STARTTLS | OPT_ABORT => {}
                // No reply is possible to EXPORT_NAME but the export.
                OPT_EXPORT_NAME => {
                    return Err(HandshakeError::Refused(
                        "TLS required: EXPORT_NAME before STARTTLS".into(),
                    ))
                }
                other => {
                    send_error(
                        s,
                        other,
                        REP_ERR_TLS_REQD,
                        "TLS required: send NBD_OPT_STARTTLS first",
                    )?;
                    s.flush()?;
                    continue;
                }
            }
        }
        let who = Who {
            identity: identity.as_deref(),
            authz: access.authz,
        };
        match h.option {
            OPT_STARTTLS if fixed => {
                let cfg = match &access.tls.config {
                    _ if tls => {
                        send_error(s, h.option, REP_ERR_INVALID, "TLS already started")?;
                        s.flush()?;
                        continue;
                    }
                    Some(cfg) if data.is_empty() => cfg,
                    Some(_) => {
                        send_error(s, h.option, REP_ERR_INVALID, "STARTTLS takes no data")?;
                        s.flush()?;
                        continue;
                    }
                    None => {
                        send_error(s, h.option, REP_ERR_POLICY, "TLS is not configured")?;
                        s.flush()?;
                        continue;
                    }
                };
                s.write_all(&encode_option_reply(h.option, REP_ACK, &[]))?;
                s.flush()?;
                identity = s
                    .start_tls(cfg)
                    .map_err(|e| HandshakeError::Refused(format!("TLS handshake failed: {e}")))?;
                tls = true;
                log::info!(
                    "{label}: TLS started, client {}",
                    identity.as_deref().unwrap_or("without a certificate")
                );
                // The haggling starts over inside TLS.
                structured = false;
                meta_export = None;
            }
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                let (disk, epoch, grant) = match resolve(exports, &name, &who) {
                    Resolved::Ok(d, e, g) => (d, e, g),
                    Resolved::Err(_, msg) => return Err(HandshakeError::Refused(msg)),
                };
                let writer = register(disk, epoch, label)
                    .map_err(|(_, msg)| HandshakeError::Refused(msg))?;
                let flags = transmission_flags(disk, false, !grant.write);
                let mut b = disk.size().to_be_bytes().to_vec();
                b.extend_from_slice(&flags.to_be_bytes());
                if !no_zeroes {
                    b.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&b)?;
                s.flush()?;
                let mut n = negotiated(disk, writer, false, None, !grant.write);
                n.identity = identity;
                n.tls = tls;
                return Ok(Some(n));
            }
            OPT_ABORT => {
                let _ = s.write_all(&encode_option_reply(h.option, REP_ACK, &[]));
                let _ = s.flush();
                return Ok(None);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    send_error(s, h.option, REP_ERR_INVALID, "LIST takes no data")?;
                } else {
                    // Only what this client may open.
                    for name in exports.disks.keys() {
                        if access.authz.grant(who.identity, name).is_none() {
                            continue;
                        }
                        s.write_all(&encode_option_reply(
                            h.option,
                            REP_SERVER,
                            &encode_server_entry(name),
                        ))?;
                    }
                    s.write_all(&encode_option_reply(h.option, REP_ACK, &[]))?;
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    send_error(s, h.option, REP_ERR_INVALID, "no data expected")?;
                } else {
                    structured = true;
                    s.write_all(&encode_option_reply(h.option, REP_ACK, &[]))?;
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                // Only `base:allocation`, and only for image files.
                if !structured {
                    send_error(
                        s,
                        h.option,
                        REP_ERR_INVALID,
                        "structured replies not negotiated",
                    )?;
                } else {
                    match parse_meta_context_request(&data) {
                        Ok((name, queries)) => meta_context(
                            s,
                            exports,
                            &who,
                            h.option,
                            &name,
                            &queries,
                            &mut meta_export,
                        )?,
                        Err(e) => send_error(s, h.option, REP_ERR_INVALID, &e.to_string())?,
                    }
                }
            }
            OPT_INFO | OPT_GO => {
                let req = match parse_info_request(&data) {
                    Ok(r) => r,
                    Err(e) => {
                        send_error(s, h.option, REP_ERR_INVALID, &e.to_string())?;
                        s.flush()?;
                        continue;
                    }
                };
                let (disk, epoch, grant) = match resolve(exports, &req.name, &who) {
                    Resolved::Ok(d, e, g) => (d, e, g),
                    Resolved::Err(code, msg) => {
                        log::warn!("{label}: export {:?} refused: {msg}", req.name);
                        send_error(s, h.option, code, &msg)?;
                        s.flush()?;
                        continue;
                    }
                };
                let writer = if h.option == OPT_GO {
                    match register(disk, epoch, label) {
                        Ok(w) => Some(w),
                        Err((code, msg)) => {
                            log::warn!("{label}: export {:?} refused: {msg}", req.name);
                            send_error(s, h.option, code, &msg)?;
                            s.flush()?;
                            continue;
                        }
                    }
                } else {
                    None
                };
                let read_only = !grant.write;
                let flags = transmission_flags(disk, structured, read_only);
                let mut out = encode_option_reply(
                    h.option,
                    REP_INFO,
                    &encode_info_export(disk.size(), flags),
                );
                out.extend(encode_option_reply(
                    h.option,
                    REP_INFO,
                    &encode_info_block_size(min_block(disk), PREFERRED_BLOCK, MAX_PAYLOAD),
                ));
                if req.requests.contains(&INFO_NAME) {
                    out.extend(encode_option_reply(
                        h.option,
                        REP_INFO,
                        &encode_info_name(&req.name),
                    ));
                }
                out.extend(encode_option_reply(h.option, REP_ACK, &[]));
                s.write_all(&out)?;
                if let Some(writer) = writer {
                    s.flush()?;
                    let allocation = match &meta_export {
                        Some(m) if structured && *m == req.name => {
                            exports.allocation.get(disk.name()).cloned()
                        }
                        _ => None,
                    };
                    let mut n = negotiated(disk, writer, structured, allocation, read_only);
                    n.identity = identity;
                    n.tls = tls;
                    return Ok(Some(n));
                }
            }
            other => {
                if !fixed {
                    return Err(HandshakeError::Refused(format!(
                        "unknown option {other} from a non-fixed-newstyle client"
                    )));
                }
                send_error(s, other, REP_ERR_UNSUP, "option not supported")?;
            }
        }
        s.flush()?;
    }
}

fn negotiated(
    disk: &Arc<Disk>,
    writer: Writer,
    structured: bool,
    allocation: Option<Arc<AllocationMap>>,
    read_only: bool,
) -> Negotiated {
    let caps = disk.capabilities();
    Negotiated {
        disk: Arc::clone(disk),
        writer,
        structured,
        flags: transmission_flags(disk, structured, read_only),
        limits: ExportLimits {
            size: disk.size(),
            min_block: min_block(disk),
            trim: caps.discard,
            structured,
            block_status: allocation.is_some(),
            read_only,
        },
        allocation,
        identity: None,
        tls: false,
        read_only,
    }
}

/// Answer LIST/SET_META_CONTEXT: `base:allocation` is the one context.
fn meta_context<S: Write>(
    s: &mut S,
    exports: &Exports,
    who: &Who,
    option: u32,
    name: &str,
    queries: &[String],
    meta_export: &mut Option<String>,
) -> io::Result<()> {
    let disk = match parse_export_name(name) {
        Ok(p) => exports.lookup(&p.disk).map(|d| d.name().to_string()),
        Err(_) => None,
    };
    let disk = disk.filter(|d| who.authz.grant(who.identity, d).is_some());
    let Some(disk) = disk else {
        if who.authz.restricted(who.identity) {
            return send_error(s, option, REP_ERR_POLICY, "export not authorized");
        }
        return send_error(s, option, REP_ERR_UNKNOWN, "no such export");
    };
    let offered = exports.allocation.contains_key(&disk);
    let wanted = if option == OPT_LIST_META_CONTEXT {
        queries.is_empty() || queries.iter().any(|q| q == "base:" || q == BASE_ALLOCATION)
    } else {
        queries.iter().any(|q| q == BASE_ALLOCATION)
    };
    if option == OPT_SET_META_CONTEXT {
        *meta_export = None;
    }
    if offered && wanted {
        s.write_all(&encode_option_reply(
            option,
            REP_META_CONTEXT,
            &encode_meta_context(BASE_ALLOCATION_ID, BASE_ALLOCATION),
        ))?;
        if option == OPT_SET_META_CONTEXT {
            *meta_export = Some(name.to_string());
        }
    }
    s.write_all(&encode_option_reply(option, REP_ACK, &[]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::epoch::MemEpochStore;
    use crate::handoff::DiskOptions;
    use crate::nbd::authz::{Access as Rights, ClientRule};
    use crate::storage::MemStorage;

    const A: &str = "CN=host-a,O=t";

    /// A client whose bytes are all written beforehand; STARTTLS "succeeds"
    /// with `identity` and the same byte stream goes on (as inside TLS).
    struct Fake {
        input: io::Cursor<Vec<u8>>,
        out: Vec<u8>,
        identity: Option<String>,
        started: usize,
    }

    impl Read for Fake {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for Fake {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.out.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Transport for Fake {
        fn start_tls(&mut self, _: &TlsEngine) -> io::Result<Option<String>> {
            self.started += 1;
            Ok(self.identity.clone())
        }
    }

    fn exports() -> Exports {
        let mut e = Exports::default();
        for name in ["vm1", "vm2"] {
            let disk = Disk::open(
                name,
                Arc::new(MemStorage::new(1 << 20)),
                Arc::new(MemEpochStore::default()),
                DiskOptions {
                    auto_advance: true,
                    fence_timeout: None,
                },
            )
            .unwrap();
            e.disks.insert(name.into(), disk);
        }
        e
    }

    /// Any server config: the fake never uses it.
    fn tls_config() -> TlsEngine {
        TlsEngine::X509(Arc::new(
            rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(rustls::server::ResolvesServerCertUsingSni::new())),
        ))
    }

    fn policy(mode: TlsMode) -> TlsPolicy {
        TlsPolicy {
            mode,
            config: (mode != TlsMode::Off).then(tls_config),
        }
    }

    fn go(name: &str) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        encode_option(OPT_GO, &d)
    }

    struct Run {
        result: Result<Option<Negotiated>, HandshakeError>,
        /// (option, reply type, data) of every option reply.
        replies: Vec<(u32, u32, Vec<u8>)>,
        started: usize,
    }

    fn run(mode: TlsMode, rules: Vec<ClientRule>, identity: Option<&str>, opts: &[Vec<u8>]) -> Run {
        let mut input = (CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES)
            .to_be_bytes()
            .to_vec();
        for o in opts {
            input.extend_from_slice(o);
        }
        let mut s = Fake {
            input: io::Cursor::new(input),
            out: Vec::new(),
            identity: identity.map(str::to_string),
            started: 0,
        };
        let (tls, authz) = (policy(mode), Authz::new(rules).unwrap());
        let access = Access {
            tls: &tls,
            authz: &authz,
        };
        let result = handshake(&mut s, &exports(), &access, "test");
        let mut replies = Vec::new();
        let mut b = &s.out[18..];
        while b.len() >= 20 && b[..8] == OPT_REPLY_MAGIC.to_be_bytes() {
            let be = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
            let (option, kind, len) = (be(8), be(12), be(16) as usize);
            replies.push((option, kind, b[20..20 + len].to_vec()));
            b = &b[20 + len..];
        }
        Run {
            result,
            replies,
            started: s.started,
        }
    }

    fn rule(disks: &[&str], access: Rights, advance: bool) -> ClientRule {
        ClientRule {
            identity: A.into(),
            disks: disks.iter().map(|s| s.to_string()).collect(),
            access,
            advance,
        }
    }

    fn text(r: &(u32, u32, Vec<u8>)) -> String {
        String::from_utf8_lossy(&r.2).into_owned()
    }

    #[test]
    fn with_tls_required_only_starttls_and_abort_pass_before_tls() {
        let r = run(
            TlsMode::Require,
            vec![rule(&["vm1"], Rights::Rw, false)],
            Some(A),
            &[
                encode_option(OPT_LIST, &[]),
                encode_option(OPT_STRUCTURED_REPLY, &[]),
                go("vm1"),
                encode_option(OPT_STARTTLS, &[]),
                encode_option(OPT_LIST, &[]),
                go("vm1"),
            ],
        );
        let kinds: Vec<(u32, u32)> = r.replies.iter().map(|r| (r.0, r.1)).collect();
        assert_eq!(
            kinds[..5],
            [
                (OPT_LIST, REP_ERR_TLS_REQD),
                (OPT_STRUCTURED_REPLY, REP_ERR_TLS_REQD),
                (OPT_GO, REP_ERR_TLS_REQD),
                (OPT_STARTTLS, REP_ACK),
                // Inside TLS: only the disk host-a may open is listed.
                (OPT_LIST, REP_SERVER),
            ]
        );
        assert!(text(&r.replies[0]).contains("TLS required"));
        assert_eq!(kinds[5], (OPT_LIST, REP_ACK));
        let n = r.result.unwrap().unwrap();
        assert_eq!((n.tls, n.identity.as_deref()), (true, Some(A)));
        assert_eq!(r.started, 1);
    }

    #[test]
    fn export_name_before_required_tls_closes_the_connection() {
        let r = run(
            TlsMode::Require,
            vec![],
            None,
            &[encode_option(OPT_EXPORT_NAME, b"vm1")],
        );
        match r.result {
            Err(HandshakeError::Refused(m)) => assert!(m.contains("TLS required"), "{m}"),
            _ => panic!("EXPORT_NAME before TLS was not refused"),
        }
        // The same client without TLS required: served.
        let r = run(
            TlsMode::On,
            vec![],
            None,
            &[encode_option(OPT_EXPORT_NAME, b"vm1")],
        );
        assert!(r.result.unwrap().is_some());
    }

    #[test]
    fn starttls_twice_is_invalid_and_without_tls_is_policy() {
        let r = run(
            TlsMode::Require,
            vec![rule(&["*"], Rights::Rw, false)],
            Some(A),
            &[
                encode_option(OPT_STARTTLS, &[]),
                encode_option(OPT_STARTTLS, &[]),
                go("vm1"),
            ],
        );
        assert_eq!(r.replies[1].1, REP_ERR_INVALID);
        assert_eq!(r.started, 1);
        assert!(r.result.unwrap().is_some());
        let r = run(
            TlsMode::Off,
            vec![],
            None,
            &[encode_option(OPT_STARTTLS, &[]), go("vm1")],
        );
        assert_eq!(r.replies[0].1, REP_ERR_POLICY);
        assert_eq!(r.started, 0);
        assert!(r.result.unwrap().is_some(), "a plain client goes on");
    }

    #[test]
    fn an_identity_opens_only_its_disks_and_advances_only_if_allowed() {
        let tls = encode_option(OPT_STARTTLS, &[]);
        let rw = vec![rule(&["vm1"], Rights::Rw, false)];
        // vm2 exists but is not granted; vm9 does not exist: one answer.
        let r = run(
            TlsMode::Require,
            rw.clone(),
            Some(A),
            &[tls.clone(), go("vm2"), go("vm9"), go("vm1@1"), go("vm1@0")],
        );
        let (g2, g9, adv) = (&r.replies[1], &r.replies[2], &r.replies[3]);
        assert_eq!(
            (g2.1, g9.1, adv.1),
            (REP_ERR_POLICY, REP_ERR_POLICY, REP_ERR_POLICY)
        );
        assert!(text(g2).contains("not authorized"), "{}", text(g2));
        assert_eq!(text(g9), text(g2).replace("vm2", "vm9"));
        assert!(text(adv).contains("may not advance"), "{}", text(adv));
        let n = r.result.unwrap().unwrap();
        assert!(!n.read_only && n.flags & TF_READ_ONLY == 0);
        // With advance: vm1@1 is accepted.
        let r = run(
            TlsMode::Require,
            vec![rule(&["vm1"], Rights::Rw, true)],
            Some(A),
            &[tls.clone(), go("vm1@1")],
        );
        assert_eq!(r.result.unwrap().unwrap().writer.epoch(), 1);
        // A read-only grant exports read-only.
        let r = run(
            TlsMode::Require,
            vec![rule(&["vm1"], Rights::Ro, false)],
            Some(A),
            &[tls.clone(), go("vm1")],
        );
        let n = r.result.unwrap().unwrap();
        assert!(n.read_only && n.limits.read_only && n.flags & TF_READ_ONLY != 0);
        // No [[client]] entries: an authenticated identity gets nothing.
        let r = run(TlsMode::Require, vec![], Some(A), &[tls, go("vm1")]);
        assert_eq!(r.replies[1].1, REP_ERR_POLICY);
        assert!(r.result.unwrap().is_none(), "the client left");
    }

    #[test]
    fn without_tls_and_rules_everything_stays_as_before() {
        let r = run(
            TlsMode::Off,
            vec![],
            None,
            &[encode_option(OPT_LIST, &[]), go("vm9"), go("vm2@3")],
        );
        let listed = r.replies.iter().filter(|r| r.1 == REP_SERVER).count();
        assert_eq!(listed, 2);
        assert_eq!(r.replies[3].1, REP_ERR_UNKNOWN, "unknown, as before");
        assert_eq!(r.result.unwrap().unwrap().writer.epoch(), 3);
    }
}
