//! The fixed-newstyle handshake: greeting, option haggling, and the
//! export (and epoch) the connection will serve.

use super::allocation::AllocationMap;
use super::proto::*;
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

/// What the handshake settled.
pub struct Negotiated {
    pub disk: Arc<Disk>,
    pub writer: Writer,
    pub structured: bool,
    pub flags: u16,
    pub limits: ExportLimits,
    /// Set when `base:allocation` was negotiated for this export.
    pub allocation: Option<Arc<AllocationMap>>,
}

/// Preferred block size advertised to clients.
const PREFERRED_BLOCK: u32 = 4096;

/// Transmission flags for `disk`: only what is really supported.
/// CAN_MULTI_CONN holds because every connection to a disk shares one
/// storage whose flush (fdatasync) covers all completed writes.
pub fn transmission_flags(disk: &Disk, structured: bool) -> u16 {
    let caps = disk.capabilities();
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
    Ok(&'a Arc<Disk>, Option<u64>),
    Err(u32, String),
}

fn resolve<'a>(exports: &'a Exports, name: &str) -> Resolved<'a> {
    let parsed = match parse_export_name(name) {
        Ok(p) => p,
        Err(msg) => return Resolved::Err(REP_ERR_INVALID, msg),
    };
    let Some(disk) = exports.lookup(&parsed.disk) else {
        return Resolved::Err(
            REP_ERR_UNKNOWN,
            format!("no export named {:?}", parsed.disk),
        );
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
    }
    Resolved::Ok(disk, parsed.epoch)
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
pub fn handshake<S: Read + Write>(
    s: &mut S,
    exports: &Exports,
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
        match h.option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                let (disk, epoch) = match resolve(exports, &name) {
                    Resolved::Ok(d, e) => (d, e),
                    Resolved::Err(_, msg) => return Err(HandshakeError::Refused(msg)),
                };
                let writer = register(disk, epoch, label)
                    .map_err(|(_, msg)| HandshakeError::Refused(msg))?;
                let flags = transmission_flags(disk, false);
                let mut b = disk.size().to_be_bytes().to_vec();
                b.extend_from_slice(&flags.to_be_bytes());
                if !no_zeroes {
                    b.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&b)?;
                s.flush()?;
                return Ok(Some(negotiated(disk, writer, false, None)));
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
                    for name in exports.disks.keys() {
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
                        Ok((name, queries)) => {
                            meta_context(s, exports, h.option, &name, &queries, &mut meta_export)?
                        }
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
                let (disk, epoch) = match resolve(exports, &req.name) {
                    Resolved::Ok(d, e) => (d, e),
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
                let flags = transmission_flags(disk, structured);
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
                    return Ok(Some(negotiated(disk, writer, structured, allocation)));
                }
            }
            other => {
                if !fixed {
                    return Err(HandshakeError::Refused(format!(
                        "unknown option {other} from a non-fixed-newstyle client"
                    )));
                }
                let code = if other == OPT_STARTTLS {
                    REP_ERR_POLICY
                } else {
                    REP_ERR_UNSUP
                };
                send_error(s, other, code, "option not supported")?;
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
) -> Negotiated {
    let caps = disk.capabilities();
    Negotiated {
        disk: Arc::clone(disk),
        writer,
        structured,
        flags: transmission_flags(disk, structured),
        limits: ExportLimits {
            size: disk.size(),
            min_block: min_block(disk),
            trim: caps.discard,
            structured,
            block_status: allocation.is_some(),
        },
        allocation,
    }
}

/// Answer LIST/SET_META_CONTEXT: `base:allocation` is the one context.
fn meta_context<S: Write>(
    s: &mut S,
    exports: &Exports,
    option: u32,
    name: &str,
    queries: &[String],
    meta_export: &mut Option<String>,
) -> io::Result<()> {
    let disk = match parse_export_name(name) {
        Ok(p) => exports.lookup(&p.disk).map(|d| d.name().to_string()),
        Err(_) => None,
    };
    let Some(disk) = disk else {
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
