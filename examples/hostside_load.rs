//! `hostside_load`: the workload of the host-side fencing test
//! (qemu-harness/hostside-guest.sh). Test-only code, not part of the
//! library: a minimal NBD client (fixed newstyle, NBD_OPT_GO with an
//! NBD_OPT_EXPORT_NAME fallback, simple replies only, several requests in
//! flight) that writes stamped 4 KiB blocks and verifies them afterwards.
//!
//! Every block written carries a stamp: magic, writer name, a sequence
//! number (global across the writers of one journal: each `write` takes
//! the numbers after the journal's highest unless `--seq-base` is given),
//! the block number, a fill derived from both and a CRC-32 of it all. The
//! journal (a text file every writer appends to) records each stamp as
//! `S` (sent, before it goes on the wire), then `A` (acknowledged) or `E`
//! (the server answered an error). `verify` reads every journalled block
//! back and classifies it against the journal:
//!
//! - ok: the block holds its last acknowledged stamp (the acknowledged one
//!   with the highest sequence number), or nothing was acknowledged and it
//!   holds zeros;
//! - ok-unacked: a stamp that was sent but never acknowledged, newer than
//!   every acknowledged one (an unacknowledged write may land: not a fault);
//! - stale: a stamp OLDER than the last acknowledged one: a write of an
//!   older writer landed over a newer acknowledged write (the corruption
//!   fencing exists to prevent);
//! - other: torn, lost (zeros or an unknown stamp where an acknowledged
//!   one should be) or misplaced.
//!
//! Exit status. write: 0 every write acknowledged; 4 some failed or went
//! unacknowledged (the summary line says which); 2 setup error (connect,
//! handshake, journal). verify: 0 every block ok; 1 stale blocks (whatever
//! else); 3 other faults but no stale block; 2 setup error (connect,
//! handshake, a read that failed, an empty journal): a setup error is never
//! reported as stale.
//!
//! ```text
//! hostside_load write  --socket /run/a.sock --writer A --blocks 0..128 --journal /tmp/j [--ready F]
//! hostside_load verify --socket /run/b.sock --journal /tmp/j
//! hostside_load verify --file /dev/sdb --journal /tmp/j      (O_DIRECT, no server)
//! ```

use clap::{Parser, Subcommand};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const BLOCK: usize = 4096;
const MAGIC: &[u8; 8] = b"HSLOADv1";
const WRITER_LEN: usize = 16;

// The NBD wire format (see the NBD protocol document; src/nbd/proto.rs is
// the server's side of the same constants).
const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const OPT_EXPORT_NAME: u32 = 1;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
const INFO_EXPORT: u16 = 0;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;

#[derive(Parser)]
#[command(about = "Stamped-block NBD workload for the host-side fencing test")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Write one stamp to each block of a range, all in flight at once (up to --depth).
    Write(WriteArgs),
    /// Read every journalled block back and classify it against the journal.
    Verify(VerifyArgs),
}

#[derive(clap::Args)]
struct WriteArgs {
    /// The server's NBD unix socket.
    #[arg(long)]
    socket: PathBuf,
    #[arg(long, default_value = "shared")]
    export: String,
    /// Writer name in the stamps (at most 16 bytes).
    #[arg(long)]
    writer: String,
    /// Block range FIRST..END (4 KiB blocks, END exclusive).
    #[arg(long, value_parser = parse_range)]
    blocks: (u64, u64),
    /// Sequence number of the first block [default: the journal's highest + 1].
    #[arg(long)]
    seq_base: Option<u64>,
    /// Journal file (appended to).
    #[arg(long)]
    journal: PathBuf,
    /// Requests in flight at most.
    #[arg(long, default_value_t = 128)]
    depth: usize,
    /// Created once every request is on the wire.
    #[arg(long)]
    ready: Option<PathBuf>,
    /// Stop waiting for replies after this many seconds (the rest count as unacknowledged).
    #[arg(long, default_value_t = 120)]
    timeout: u64,
}

#[derive(clap::Args)]
struct VerifyArgs {
    /// Read through this NBD unix socket (READ only: never a write or a flush).
    #[arg(long, conflicts_with = "file")]
    socket: Option<PathBuf>,
    /// Or read this file or block device directly (O_DIRECT).
    #[arg(long)]
    file: Option<PathBuf>,
    #[arg(long, default_value = "shared")]
    export: String,
    #[arg(long)]
    journal: PathBuf,
    /// Requests in flight at most.
    #[arg(long, default_value_t = 64)]
    depth: usize,
    #[arg(long, default_value_t = 60)]
    timeout: u64,
}

fn parse_range(s: &str) -> Result<(u64, u64), String> {
    let (a, b) = s
        .split_once("..")
        .ok_or_else(|| format!("{s:?}: want FIRST..END"))?;
    let a: u64 = a.parse().map_err(|e| format!("{a:?}: {e}"))?;
    let b: u64 = b.parse().map_err(|e| format!("{b:?}: {e}"))?;
    if b <= a {
        return Err(format!("{s:?}: empty range"));
    }
    Ok((a, b))
}

/// A setup error: exit 2 with a message, never a verdict.
fn setup_fail(msg: impl std::fmt::Display) -> ! {
    eprintln!("hostside_load: SETUP ERROR: {msg}");
    std::process::exit(2);
}

// --- stamps -------------------------------------------------------------------

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    writer: String,
    seq: u64,
}

fn stamp_block(writer: &str, seq: u64, block: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    b[..8].copy_from_slice(MAGIC);
    b[8..8 + writer.len()].copy_from_slice(writer.as_bytes());
    b[24..32].copy_from_slice(&seq.to_le_bytes());
    b[32..40].copy_from_slice(&block.to_le_bytes());
    // A fill that differs per stamp, so a torn write fails the CRC.
    let mut x = seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ block ^ 0x5555_5555;
    for chunk in b[40..BLOCK - 4].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let n = chunk.len();
        chunk.copy_from_slice(&x.to_le_bytes()[..n]);
    }
    let crc = crc32(&b[..BLOCK - 4]);
    b[BLOCK - 4..].copy_from_slice(&crc.to_le_bytes());
    b
}

/// What a block read back holds.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Content {
    Zero,
    Stamp(Stamp),
    Torn,
    Misplaced(u64),
    Garbage,
}

fn parse_block(b: &[u8], block: u64) -> Content {
    if b.iter().all(|&x| x == 0) {
        return Content::Zero;
    }
    if &b[..8] != MAGIC {
        return Content::Garbage;
    }
    let crc = u32::from_le_bytes([b[BLOCK - 4], b[BLOCK - 3], b[BLOCK - 2], b[BLOCK - 1]]);
    if crc32(&b[..BLOCK - 4]) != crc {
        return Content::Torn;
    }
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[32..40]);
    let at = u64::from_le_bytes(w);
    if at != block {
        return Content::Misplaced(at);
    }
    w.copy_from_slice(&b[24..32]);
    let seq = u64::from_le_bytes(w);
    let name = &b[8..24];
    let end = name.iter().position(|&c| c == 0).unwrap_or(WRITER_LEN);
    Content::Stamp(Stamp {
        writer: String::from_utf8_lossy(&name[..end]).into_owned(),
        seq,
    })
}

// --- the journal -----------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Sent,
    Acked,
    Failed(u32),
}

#[derive(Debug, Clone)]
struct Entry {
    writer: String,
    seq: u64,
    block: u64,
    state: State,
}

/// Entries by sequence number (each stamp once, in its final state).
fn read_journal(path: &Path) -> io::Result<BTreeMap<u64, Entry>> {
    let f = File::open(path)?;
    let mut out: BTreeMap<u64, Entry> = BTreeMap::new();
    for (n, line) in BufReader::new(f).lines().enumerate() {
        let line = line?;
        let bad = || {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}:{}: bad line {line:?}", path.display(), n + 1),
            )
        };
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 4 {
            return Err(bad());
        }
        let seq: u64 = f[2].parse().map_err(|_| bad())?;
        let block: u64 = f[3].parse().map_err(|_| bad())?;
        let state = match f[0] {
            "S" => State::Sent,
            "A" => State::Acked,
            "E" => State::Failed(f.get(4).and_then(|e| e.parse().ok()).unwrap_or(0)),
            _ => return Err(bad()),
        };
        let e = out.entry(seq).or_insert_with(|| Entry {
            writer: f[1].to_string(),
            seq,
            block,
            state: State::Sent,
        });
        if e.block != block || e.writer != f[1] {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: sequence number {seq} used twice", path.display()),
            ));
        }
        if state != State::Sent {
            e.state = state;
        }
    }
    Ok(out)
}

/// Appends whole lines with one write(2) each (O_APPEND): the writers of
/// one journal may run at the same time.
#[derive(Clone)]
struct Journal(Arc<Mutex<File>>);

impl Journal {
    fn open(path: &Path) -> io::Result<Journal> {
        let f = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Journal(Arc::new(Mutex::new(f))))
    }

    fn append(&self, text: &str) -> io::Result<()> {
        let mut f = self
            .0
            .lock()
            .map_err(|_| io::Error::other("journal lock poisoned"))?;
        f.write_all(text.as_bytes())
    }
}

// --- the NBD client ------------------------------------------------------------------

struct Conn {
    stream: UnixStream,
    size: u64,
    flags: u16,
}

fn read_u16(s: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    s.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}
fn read_u32(s: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}
fn read_u64(s: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn option_header(option: u32, len: usize) -> Vec<u8> {
    let mut b = Vec::with_capacity(16 + len);
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&(len as u32).to_be_bytes());
    b
}

/// Connect and negotiate `export`. Every failure here is a setup error.
fn connect(socket: &Path, export: &str) -> Result<Conn, String> {
    let mut s =
        UnixStream::connect(socket).map_err(|e| format!("connect {}: {e}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let hs = |e: io::Error| format!("handshake with {}: {e}", socket.display());
    let magic = read_u64(&mut s).map_err(hs)?;
    let opt = read_u64(&mut s).map_err(hs)?;
    if magic != NBDMAGIC || opt != IHAVEOPT {
        return Err(format!("not a newstyle NBD server ({magic:#x} {opt:#x})"));
    }
    let sflags = read_u16(&mut s).map_err(hs)?;
    if sflags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err("server is not fixed-newstyle".into());
    }
    let cflags = (sflags & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)) as u32;
    s.write_all(&cflags.to_be_bytes()).map_err(hs)?;

    // NBD_OPT_GO: name, no information requests.
    let mut go = option_header(OPT_GO, 4 + export.len() + 2);
    go.extend_from_slice(&(export.len() as u32).to_be_bytes());
    go.extend_from_slice(export.as_bytes());
    go.extend_from_slice(&0u16.to_be_bytes());
    s.write_all(&go).map_err(hs)?;
    let mut export_info: Option<(u64, u16)> = None;
    loop {
        let m = read_u64(&mut s).map_err(hs)?;
        if m != OPT_REPLY_MAGIC {
            return Err(format!("bad option reply magic {m:#x}"));
        }
        let option = read_u32(&mut s).map_err(hs)?;
        let kind = read_u32(&mut s).map_err(hs)?;
        let len = read_u32(&mut s).map_err(hs)? as usize;
        if len > 1 << 16 {
            return Err(format!("option reply of {len} bytes"));
        }
        let mut data = vec![0u8; len];
        s.read_exact(&mut data).map_err(hs)?;
        if option != OPT_GO {
            return Err(format!("reply to option {option}, not GO"));
        }
        match kind {
            REP_ACK => break,
            REP_INFO
                if data.len() >= 12 && u16::from_be_bytes([data[0], data[1]]) == INFO_EXPORT =>
            {
                let mut w = [0u8; 8];
                w.copy_from_slice(&data[2..10]);
                export_info = Some((
                    u64::from_be_bytes(w),
                    u16::from_be_bytes([data[10], data[11]]),
                ));
            }
            REP_INFO => {}
            REP_ERR_UNSUP => {
                // An old server: NBD_OPT_EXPORT_NAME (no error reply possible).
                let mut en = option_header(OPT_EXPORT_NAME, export.len());
                en.extend_from_slice(export.as_bytes());
                s.write_all(&en).map_err(hs)?;
                let size = read_u64(&mut s).map_err(hs)?;
                let flags = read_u16(&mut s).map_err(hs)?;
                if cflags & FLAG_NO_ZEROES as u32 == 0 {
                    let mut z = [0u8; 124];
                    s.read_exact(&mut z).map_err(hs)?;
                }
                export_info = Some((size, flags));
                break;
            }
            k if k & (1 << 31) != 0 => {
                return Err(format!(
                    "export {export:?} refused (reply {k:#x}): {}",
                    String::from_utf8_lossy(&data)
                ))
            }
            k => return Err(format!("unexpected option reply {k:#x}")),
        }
    }
    let (size, flags) = export_info.ok_or("GO acknowledged without NBD_INFO_EXPORT")?;
    s.set_read_timeout(None).map_err(|e| e.to_string())?;
    Ok(Conn {
        stream: s,
        size,
        flags,
    })
}

fn request(kind: u16, handle: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut b = [0u8; 28];
    b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&0u16.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b[16..24].copy_from_slice(&offset.to_be_bytes());
    b[24..28].copy_from_slice(&len.to_be_bytes());
    b
}

/// One simple reply; `read_len` bytes of data follow a successful READ.
struct Reply {
    handle: u64,
    error: u32,
    data: Vec<u8>,
}

fn read_reply(s: &mut UnixStream, is_read: impl Fn(u64) -> bool) -> io::Result<Reply> {
    let magic = read_u32(s)?;
    if magic != SIMPLE_REPLY_MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad reply magic {magic:#x}"),
        ));
    }
    let error = read_u32(s)?;
    let handle = read_u64(s)?;
    let mut data = Vec::new();
    if error == 0 && is_read(handle) {
        data = vec![0u8; BLOCK];
        s.read_exact(&mut data)?;
    }
    Ok(Reply {
        handle,
        error,
        data,
    })
}

fn errno_name(e: u32) -> &'static str {
    match e {
        1 => "EPERM",
        5 => "EIO",
        12 => "ENOMEM",
        22 => "EINVAL",
        28 => "ENOSPC",
        75 => "EOVERFLOW",
        95 => "ENOTSUP",
        108 => "ESHUTDOWN",
        _ => "E?",
    }
}

// --- write -------------------------------------------------------------------------

fn journal_max_seq(path: &Path) -> u64 {
    if !path.exists() {
        return 0;
    }
    match read_journal(path) {
        Ok(j) => j.keys().next_back().copied().unwrap_or(0),
        Err(e) => setup_fail(format!("journal {}: {e}", path.display())),
    }
}

fn cmd_write(a: WriteArgs) -> i32 {
    if a.writer.is_empty() || a.writer.len() > WRITER_LEN || a.writer.contains(char::is_whitespace)
    {
        setup_fail(format!(
            "writer name {:?}: 1..16 bytes, no spaces",
            a.writer
        ));
    }
    let seq_base = a
        .seq_base
        .unwrap_or_else(|| journal_max_seq(&a.journal) + 1);
    let journal = Journal::open(&a.journal)
        .unwrap_or_else(|e| setup_fail(format!("journal {}: {e}", a.journal.display())));
    let conn = connect(&a.socket, &a.export).unwrap_or_else(|e| setup_fail(e));
    let (first, end) = a.blocks;
    if end * BLOCK as u64 > conn.size {
        setup_fail(format!(
            "blocks {first}..{end} beyond the export's {} bytes",
            conn.size
        ));
    }
    let n = (end - first) as usize;
    let depth = a.depth.max(1);
    eprintln!(
        "hostside_load: writer {} blocks {first}..{end} seq {seq_base}..{} via {} (size {}, flags {:#x}, depth {depth})",
        a.writer,
        seq_base + n as u64 - 1,
        a.socket.display(),
        conn.size,
        conn.flags
    );

    // Slots: the sender takes one per request, the receiver gives it back per reply.
    let (slot_tx, slot_rx) = mpsc::sync_channel::<()>(depth);
    for _ in 0..depth {
        let _ = slot_tx.send(());
    }
    let mut rx_stream = match conn.stream.try_clone() {
        Ok(s) => s,
        Err(e) => setup_fail(format!("socket clone: {e}")),
    };
    let results: Arc<Mutex<Vec<Option<State>>>> = Arc::new(Mutex::new(vec![None; n]));
    let (done_tx, done_rx) = mpsc::channel::<Result<(), String>>();
    let rj = journal.clone();
    let rres = results.clone();
    let writer = a.writer.clone();
    std::thread::spawn(move || {
        let want = n;
        let mut got = 0;
        let outcome = loop {
            if got == want {
                break Ok(());
            }
            let r = match read_reply(&mut rx_stream, |_| false) {
                Ok(r) => r,
                Err(e) => {
                    break Err(format!(
                        "connection lost after {got} of {want} replies: {e}"
                    ))
                }
            };
            got += 1;
            let idx = r.handle as usize;
            if idx >= n {
                break Err(format!("reply for unknown handle {}", r.handle));
            }
            let (seq, block) = (seq_base + idx as u64, first + idx as u64);
            let (line, st) = if r.error == 0 {
                (format!("A {writer} {seq} {block}\n"), State::Acked)
            } else {
                (
                    format!("E {writer} {seq} {block} {}\n", r.error),
                    State::Failed(r.error),
                )
            };
            if let Err(e) = rj.append(&line) {
                break Err(format!("journal: {e}"));
            }
            if let Ok(mut v) = rres.lock() {
                v[idx] = Some(st);
            }
            let _ = slot_tx.try_send(());
        };
        let _ = done_tx.send(outcome);
    });

    let mut s = conn.stream;
    let mut send_err = None;
    for idx in 0..n {
        // A lost slot means the receiver is gone (connection lost): stop sending.
        if slot_rx.recv().is_err() {
            send_err = Some("receiver stopped".to_string());
            break;
        }
        let (seq, block) = (seq_base + idx as u64, first + idx as u64);
        if let Err(e) = journal.append(&format!("S {} {seq} {block}\n", a.writer)) {
            setup_fail(format!("journal: {e}"));
        }
        let mut msg = request(CMD_WRITE, idx as u64, block * BLOCK as u64, BLOCK as u32).to_vec();
        msg.extend_from_slice(&stamp_block(&a.writer, seq, block));
        if let Err(e) = s.write_all(&msg) {
            send_err = Some(format!("send of block {block}: {e}"));
            break;
        }
    }
    if let Some(ready) = &a.ready {
        let _ = File::create(ready);
    }
    let outcome = match done_rx.recv_timeout(Duration::from_secs(a.timeout)) {
        Ok(r) => r,
        Err(_) => Err(format!("no reply to every request within {} s", a.timeout)),
    };
    let states = results.lock().map(|v| v.clone()).unwrap_or_default();
    let acked = states.iter().filter(|s| **s == Some(State::Acked)).count();
    let mut failed: BTreeMap<&str, usize> = BTreeMap::new();
    for st in states.iter().flatten() {
        if let State::Failed(e) = st {
            *failed.entry(errno_name(*e)).or_default() += 1;
        }
    }
    let nfailed: usize = failed.values().sum();
    let unacked = n - acked - nfailed;
    let failed_s = failed
        .iter()
        .map(|(k, v)| format!("{k}:{v}"))
        .collect::<Vec<_>>()
        .join(",");
    println!(
        "WRITE writer={} blocks={first}..{end} seq={seq_base}..{} acked={acked} failed={nfailed}{} unacked={unacked}{}",
        a.writer,
        seq_base + n as u64 - 1,
        if failed_s.is_empty() { String::new() } else { format!("({failed_s})") },
        match (&send_err, &outcome) {
            (Some(e), _) => format!(" ({e})"),
            (None, Err(e)) => format!(" ({e})"),
            _ => String::new(),
        }
    );
    let _ = s.write_all(&request(CMD_DISC, u64::MAX, 0, 0));
    if acked == n {
        0
    } else {
        4
    }
}

// --- verify ------------------------------------------------------------------------

/// Read `blocks` through the NBD socket; a failed read is a setup error.
fn read_via_socket(a: &VerifyArgs, socket: &Path, blocks: &[u64]) -> Vec<Vec<u8>> {
    let conn = connect(socket, &a.export).unwrap_or_else(|e| setup_fail(e));
    if let Some(&max) = blocks.iter().max() {
        if (max + 1) * BLOCK as u64 > conn.size {
            setup_fail(format!(
                "block {max} beyond the export's {} bytes",
                conn.size
            ));
        }
    }
    let n = blocks.len();
    let depth = a.depth.max(1);
    let (slot_tx, slot_rx) = mpsc::sync_channel::<()>(depth);
    for _ in 0..depth {
        let _ = slot_tx.send(());
    }
    let mut rx_stream = conn
        .stream
        .try_clone()
        .unwrap_or_else(|e| setup_fail(format!("socket clone: {e}")));
    let (done_tx, done_rx) = mpsc::channel::<Result<Vec<Vec<u8>>, String>>();
    let nb = n;
    std::thread::spawn(move || {
        let mut out: Vec<Vec<u8>> = vec![Vec::new(); nb];
        let mut got = 0;
        let r = loop {
            if got == nb {
                break Ok(std::mem::take(&mut out));
            }
            let r = match read_reply(&mut rx_stream, |h| (h as usize) < nb) {
                Ok(r) => r,
                Err(e) => break Err(format!("connection lost after {got} of {nb} reads: {e}")),
            };
            let idx = r.handle as usize;
            if idx >= nb {
                break Err(format!("reply for unknown handle {}", r.handle));
            }
            if r.error != 0 {
                break Err(format!(
                    "READ of the block at index {idx} failed: {}",
                    errno_name(r.error)
                ));
            }
            out[idx] = r.data;
            got += 1;
            let _ = slot_tx.try_send(());
        };
        let _ = done_tx.send(r);
    });
    let mut s = conn.stream;
    for (idx, &b) in blocks.iter().enumerate() {
        if slot_rx.recv().is_err() {
            break;
        }
        if let Err(e) = s.write_all(&request(
            CMD_READ,
            idx as u64,
            b * BLOCK as u64,
            BLOCK as u32,
        )) {
            setup_fail(format!("send READ: {e}"));
        }
    }
    let out = match done_rx.recv_timeout(Duration::from_secs(a.timeout)) {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => setup_fail(e),
        Err(_) => setup_fail(format!("reads not answered within {} s", a.timeout)),
    };
    let _ = s.write_all(&request(CMD_DISC, u64::MAX, 0, 0));
    out
}

/// Read `blocks` from a file or device with O_DIRECT (no page cache).
fn read_via_file(path: &Path, blocks: &[u64]) -> Vec<Vec<u8>> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap_or_else(|e| setup_fail(format!("open {}: {e}", path.display())));
    // An aligned window into a larger buffer (O_DIRECT wants 4 KiB alignment).
    let mut raw = vec![0u8; 2 * BLOCK];
    let off = raw.as_ptr().align_offset(BLOCK);
    let mut out = Vec::with_capacity(blocks.len());
    for &b in blocks {
        let buf = &mut raw[off..off + BLOCK];
        use std::os::unix::fs::FileExt;
        if let Err(e) = f.read_exact_at(buf, b * BLOCK as u64) {
            setup_fail(format!("read block {b} of {}: {e}", path.display()));
        }
        out.push(buf.to_vec());
    }
    out
}

#[derive(Default)]
struct Tally {
    ok: usize,
    ok_unacked: usize,
    stale: usize,
    other: usize,
    unwritten: usize,
    final_by: BTreeMap<String, usize>,
    stale_by: BTreeMap<String, usize>,
    examples: Vec<(String, String)>,
}

fn cmd_verify(a: VerifyArgs) -> i32 {
    let journal = read_journal(&a.journal)
        .unwrap_or_else(|e| setup_fail(format!("journal {}: {e}", a.journal.display())));
    if journal.is_empty() {
        setup_fail(format!("journal {} is empty", a.journal.display()));
    }
    // Per block: its stamps by sequence number.
    let mut by_block: BTreeMap<u64, Vec<&Entry>> = BTreeMap::new();
    for e in journal.values() {
        by_block.entry(e.block).or_default().push(e);
    }
    let blocks: Vec<u64> = by_block.keys().copied().collect();
    let data = match (&a.socket, &a.file) {
        (Some(s), None) => read_via_socket(&a, s, &blocks),
        (None, Some(f)) => read_via_file(f, &blocks),
        _ => setup_fail("verify wants --socket or --file"),
    };

    // Journal counts by writer: acknowledged / failed / unacknowledged.
    let mut jw: BTreeMap<&str, [usize; 3]> = BTreeMap::new();
    for e in journal.values() {
        let c = jw.entry(&e.writer).or_default();
        match e.state {
            State::Acked => c[0] += 1,
            State::Failed(_) => c[1] += 1,
            State::Sent => c[2] += 1,
        }
    }

    let mut t = Tally::default();
    for (i, &b) in blocks.iter().enumerate() {
        let entries = &by_block[&b];
        let last_acked = entries
            .iter()
            .filter(|e| e.state == State::Acked)
            .map(|e| e.seq)
            .max();
        let content = parse_block(&data[i], b);
        // Up to 4 examples of each fault kind for the log.
        let note = |t: &mut Tally, what: String| {
            let kind = what.split_whitespace().next().unwrap_or("").to_string();
            if t.examples.iter().filter(|(k, _)| *k == kind).count() < 4 {
                t.examples.push((kind, format!("block {b}: {what}")));
            }
        };
        match content {
            Content::Zero if last_acked.is_none() => t.unwritten += 1,
            Content::Stamp(s) => {
                *t.final_by.entry(s.writer.clone()).or_default() += 1;
                let known = entries
                    .iter()
                    .find(|e| e.seq == s.seq && e.writer == s.writer);
                match (known, last_acked) {
                    (None, _) => {
                        t.other += 1;
                        note(&mut t, format!("unknown stamp {}#{}", s.writer, s.seq));
                    }
                    (Some(_), Some(la)) if s.seq == la => t.ok += 1,
                    (Some(_), Some(la)) if s.seq < la => {
                        t.stale += 1;
                        *t.stale_by.entry(s.writer.clone()).or_default() += 1;
                        let newer = entries
                            .iter()
                            .find(|e| e.seq == la)
                            .map(|e| e.writer.as_str());
                        note(
                            &mut t,
                            format!(
                                "STALE {}#{} over acknowledged {}#{la}",
                                s.writer,
                                s.seq,
                                newer.unwrap_or("?")
                            ),
                        );
                    }
                    (Some(_), _) => t.ok_unacked += 1,
                }
            }
            other => {
                t.other += 1;
                note(
                    &mut t,
                    format!("{other:?} (last acknowledged {last_acked:?})"),
                );
            }
        }
    }
    let fmt = |m: &BTreeMap<String, usize>| {
        if m.is_empty() {
            "-".to_string()
        } else {
            m.iter()
                .map(|(k, v)| format!("{k}:{v}"))
                .collect::<Vec<_>>()
                .join(",")
        }
    };
    for (_, x) in &t.examples {
        eprintln!("hostside_load: {x}");
    }
    let jw_s = jw
        .iter()
        .map(|(k, c)| format!("{k}:{}/{}/{}", c[0], c[1], c[2]))
        .collect::<Vec<_>>()
        .join(",");
    println!(
        "VERIFY blocks={} ok={} ok_unacked={} stale={} other={} unwritten={} final={} stale_by={} journal(acked/failed/unacked)={jw_s}",
        blocks.len(),
        t.ok,
        t.ok_unacked,
        t.stale,
        t.other,
        t.unwritten,
        fmt(&t.final_by),
        fmt(&t.stale_by),
    );
    if t.stale > 0 {
        1
    } else if t.other > 0 {
        3
    } else {
        0
    }
}

fn main() {
    let cli = Cli::parse();
    let rc = match cli.cmd {
        Cmd::Write(a) => cmd_write(a),
        Cmd::Verify(a) => cmd_verify(a),
    };
    std::process::exit(rc);
}
