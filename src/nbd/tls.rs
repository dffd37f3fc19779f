//! NBD over TLS (STARTTLS) with X.509 certificates, on rustls.
//!
//! Certificates come from a directory laid out as qemu's `tls-creds-x509`
//! and nbdkit's `--tls-certificates` expect: `ca-cert.pem` (the CA client
//! certificates are checked against), `server-cert.pem`, `server-key.pem`.
//!
//! A connection's identity is its client certificate's subject, rendered
//! as RFC 4514 does: the RDNs last-first, joined by `,` (multi-valued RDNs
//! by `+`), the attribute types CN, C, L, ST, O, OU, STREET, DC and UID by
//! name and others by dotted OID, the special characters escaped with `\`,
//! a value that is not a string as `#` and its hex bytes. A certificate
//! made with `-subj /O=blkshim-test/CN=host-a` is `CN=host-a,O=blkshim-test`.
//!
//! With `--tls-psk FILE` the engine is OpenSSL with pre-shared keys
//! instead (qemu's `tls-creds-psk`, nbdkit's `--tls-psk`): rustls has no
//! external PSK support (rustls issue #174). The identity is then the
//! PSK username.
//!
//! [`TlsSock`] is one TLS session over a socket, shared by the request
//! reader and the reply writer of a connection (see its docs for how they
//! avoid blocking each other).

use parking_lot::Mutex;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::connection::Sock;

/// `--tls`: whether a listener offers TLS, and whether it insists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// No TLS: STARTTLS is refused.
    Off,
    /// TLS offered; plain clients are served too.
    On,
    /// Every option but STARTTLS and ABORT is refused before TLS.
    Require,
}

impl std::str::FromStr for TlsMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(TlsMode::Off),
            "on" => Ok(TlsMode::On),
            "require" => Ok(TlsMode::Require),
            _ => Err(format!("{s:?}: off, on or require")),
        }
    }
}

/// The TLS engine and credentials a listener uses: X.509 on rustls, or
/// pre-shared keys on OpenSSL (rustls has no external PSK support).
#[derive(Clone)]
pub enum TlsEngine {
    X509(Arc<ServerConfig>),
    Psk(Arc<PskServer>),
}

/// A listener's TLS policy for the handshake.
#[derive(Clone)]
pub struct TlsPolicy {
    pub mode: TlsMode,
    /// `None` exactly when `mode` is `Off`.
    pub config: Option<TlsEngine>,
}

impl TlsPolicy {
    pub fn off() -> Self {
        TlsPolicy {
            mode: TlsMode::Off,
            config: None,
        }
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server's TLS configuration from a qemu-style certificate directory.
/// `verify_peer`: a client must present a certificate signed by
/// `ca-cert.pem` (else one is asked for but not required).
pub fn server_config(dir: &Path, verify_peer: bool) -> Result<Arc<ServerConfig>, String> {
    let file = |n: &str| -> PathBuf { dir.join(n) };
    let certs = |p: PathBuf| -> Result<Vec<CertificateDer<'static>>, String> {
        let v = CertificateDer::pem_file_iter(&p)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("{}: {e}", p.display()))?;
        if v.is_empty() {
            return Err(format!("{}: no certificate in it", p.display()));
        }
        Ok(v)
    };
    let mut roots = RootCertStore::empty();
    for c in certs(file("ca-cert.pem"))? {
        roots
            .add(c)
            .map_err(|e| format!("{}: {e}", file("ca-cert.pem").display()))?;
    }
    let chain = certs(file("server-cert.pem"))?;
    let key_path = file("server-key.pem");
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .map_err(|e| format!("{}: {e}", key_path.display()))?;
    let mut verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
    if !verify_peer {
        verifier = verifier.allow_unauthenticated();
    }
    let verifier = verifier
        .build()
        .map_err(|e| format!("{}: {e}", file("ca-cert.pem").display()))?;
    let cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(Arc::new(cfg))
}

/// The subject DN of a DER certificate, rendered as the module docs say.
pub fn subject_of(der: &[u8]) -> Result<String, String> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| format!("client certificate: {e}"))?;
    Ok(render_dn(cert.subject()))
}

fn render_dn(name: &x509_parser::x509::X509Name<'_>) -> String {
    let rdns: Vec<String> = name
        .iter()
        .map(|rdn| {
            rdn.iter()
                .map(|atv| {
                    let ty = attr_name(&atv.attr_type().to_id_string());
                    let value = match atv.as_str() {
                        Ok(s) => escape_value(s),
                        Err(_) => {
                            let hex: String =
                                atv.as_slice().iter().map(|b| format!("{b:02x}")).collect();
                            format!("#{hex}")
                        }
                    };
                    format!("{ty}={value}")
                })
                .collect::<Vec<_>>()
                .join("+")
        })
        .collect();
    rdns.into_iter().rev().collect::<Vec<_>>().join(",")
}

/// RFC 4514's attribute type names, else the dotted OID.
fn attr_name(oid: &str) -> String {
    match oid {
        "2.5.4.3" => "CN",
        "2.5.4.6" => "C",
        "2.5.4.7" => "L",
        "2.5.4.8" => "ST",
        "2.5.4.9" => "STREET",
        "2.5.4.10" => "O",
        "2.5.4.11" => "OU",
        "0.9.2342.19200300.100.1.25" => "DC",
        "0.9.2342.19200300.100.1.1" => "UID",
        other => other,
    }
    .to_string()
}

/// RFC 4514 escaping: `"+,;<>\` anywhere, `#` or a space first, a space
/// last, and NUL.
fn escape_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let n = s.chars().count();
    for (i, c) in s.chars().enumerate() {
        match c {
            '"' | '+' | ',' | ';' | '<' | '>' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            '#' | ' ' if i == 0 => {
                out.push('\\');
                out.push(c);
            }
            ' ' if i + 1 == n => out.push_str("\\ "),
            '\0' => out.push_str("\\00"),
            c => out.push(c),
        }
    }
    out
}

/// One TLS session over a client socket, shared (clones are handles to
/// the same session) by the request reader and the reply writer.
///
/// They must not block each other: a writer stuck on a full socket (the
/// client is not reading) must not hold what the reader needs to take the
/// client's next request, nor the reverse. So the reader does its
/// blocking `read` of the raw socket holding no lock, and locks the
/// session only to decrypt what it read; a writer holds `send` (writers
/// queue on it, in order), locks the session only to encrypt into a
/// buffer, and writes that to the raw socket after releasing it. TLS
/// output the reader's decrypting produces (alerts, key updates) goes out
/// with the next write.
#[derive(Clone)]
pub struct TlsSock(Arc<Shared>);

struct Shared {
    /// The plain socket under the session (never `Sock::Tls`).
    raw: Sock,
    conn: Mutex<Session>,
    /// Held by a writer from encrypting to the end of its raw write, so
    /// records leave in the order they were made.
    send: Mutex<()>,
    /// The reader's ciphertext, read from the socket but not yet taken
    /// by the session.
    rbuf: Mutex<ReadBuf>,
}

struct ReadBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl std::fmt::Debug for TlsSock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TlsSock({:?})", self.0.raw)
    }
}

/// Plain reads and writes of a raw socket through a shared reference.
struct RawIo<'a>(&'a Sock);

impl Read for RawIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.raw_read(buf)
    }
}

impl Write for RawIo<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.raw_write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn tls_err(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// The largest plaintext encrypted at once (rustls queues at most 64 KiB
/// of output by default; the buffer is drained after each chunk).
const WRITE_CHUNK: usize = 32 << 10;

impl TlsSock {
    /// Run the server side of the TLS handshake on `raw` (the NBD
    /// handshake's STARTTLS has just been acknowledged). Returns the
    /// session and the client's identity: its certificate's subject, if
    /// it sent one, or its PSK username.
    pub fn accept(raw: Sock, engine: &TlsEngine) -> io::Result<(TlsSock, Option<String>)> {
        let (session, identity) = match engine {
            TlsEngine::X509(cfg) => Self::accept_x509(&raw, cfg)?,
            TlsEngine::Psk(psk) => psk.accept(&raw)?,
        };
        let shared = Shared {
            raw,
            conn: Mutex::new(session),
            send: Mutex::new(()),
            rbuf: Mutex::new(ReadBuf {
                buf: vec![0u8; 18 << 10],
                start: 0,
                end: 0,
            }),
        };
        Ok((TlsSock(Arc::new(shared)), identity))
    }

    fn accept_x509(raw: &Sock, cfg: &Arc<ServerConfig>) -> io::Result<(Session, Option<String>)> {
        let mut conn = ServerConnection::new(Arc::clone(cfg)).map_err(tls_err)?;
        let mut io = RawIo(raw);
        while conn.is_handshaking() {
            // Sends the alert itself when the client's certificate fails.
            conn.complete_io(&mut io)?;
        }
        // Session tickets and anything else queued after the handshake.
        while conn.wants_write() {
            conn.write_tls(&mut io)?;
        }
        let identity = match conn.peer_certificates().and_then(|c| c.first()) {
            Some(der) => Some(
                subject_of(der.as_ref())
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?,
            ),
            None => None,
        };
        Ok((Session::Rustls(Box::new(conn)), identity))
    }

    pub fn raw(&self) -> &Sock {
        &self.0.raw
    }

    /// Encrypt what the session has queued and send it; with `send` held.
    fn write_out(&self, plain: &[u8]) -> io::Result<usize> {
        let (n, out) = {
            let mut c = self.0.conn.lock();
            let n = if plain.is_empty() {
                0
            } else {
                c.write_plain(plain)?
            };
            let mut out = Vec::with_capacity(n + 64);
            c.take_output(&mut out)?;
            (n, out)
        };
        RawIo(&self.0.raw).write_all(&out)?;
        Ok(n)
    }

    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut guard = self.0.rbuf.lock();
        let rb = &mut *guard;
        loop {
            let failed = {
                let mut c = self.0.conn.lock();
                // rustls takes more ciphertext only once its plaintext has
                // been read ("received plaintext buffer full" otherwise),
                // so the rest waits in `rb` for the next call.
                loop {
                    match c.read_plain(buf) {
                        Ok(n) => return Ok(n), // 0: the client's close_notify
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(e),
                    }
                    if rb.start == rb.end {
                        break None;
                    }
                    let k = match c.feed(&rb.buf[rb.start..rb.end]) {
                        Ok(k) => k,
                        Err(e) => break Some(e),
                    };
                    rb.start += k;
                    if k == 0 {
                        // Nothing taken and (below) nothing to read: stuck.
                        return match c.read_plain(buf) {
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                                Err(io::Error::other("TLS session took no input"))
                            }
                            r => r,
                        };
                    }
                }
            };
            if let Some(e) = failed {
                // Send the alert unless a writer is busy (it would then).
                if let Some(_g) = self.0.send.try_lock() {
                    let _ = self.write_out(&[]);
                }
                return Err(e);
            }
            // Blocking, and holding no lock a writer needs.
            let n = self.0.raw.raw_read(&mut rb.buf)?;
            if n == 0 {
                // Closed without close_notify: an end like any other to
                // NBD, whose framing shows a cut request for what it is.
                return Ok(0);
            }
            (rb.start, rb.end) = (0, n);
        }
    }

    pub fn write(&self, buf: &[u8]) -> io::Result<usize> {
        let _g = self.0.send.lock();
        let chunk = &buf[..buf.len().min(WRITE_CHUNK)];
        self.write_out(chunk)
    }

    /// Send any TLS output still queued.
    pub fn flush(&self) -> io::Result<()> {
        let _g = self.0.send.lock();
        self.write_out(&[]).map(|_| ())
    }

    /// Shut the raw socket down; before the write side closes, tell the
    /// client with a close_notify unless a writer is in the middle of a
    /// send (then the socket just closes).
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        if how != Shutdown::Read {
            if let Some(_g) = self.0.send.try_lock() {
                self.0.conn.lock().close_notify();
                let _ = self.write_out(&[]);
            }
        }
        self.0.raw.shutdown(how)
    }
}

/// One TLS session's state, whichever engine runs it.
enum Session {
    Rustls(Box<ServerConnection>),
    Openssl(Box<openssl::ssl::SslStream<MemIo>>),
}

fn openssl_err(e: openssl::ssl::Error) -> io::Error {
    match e.into_io_error() {
        Ok(e) => e,
        Err(e) => io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
    }
}

impl Session {
    /// Decrypted bytes; `WouldBlock` when there are none yet, 0 after the
    /// client's close_notify.
    fn read_plain(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Session::Rustls(c) => c.reader().read(buf),
            Session::Openssl(s) => match s.ssl_read(buf) {
                Ok(n) => Ok(n),
                Err(e) if e.code() == openssl::ssl::ErrorCode::ZERO_RETURN => Ok(0),
                Err(e) if e.code() == openssl::ssl::ErrorCode::WANT_READ => {
                    Err(io::ErrorKind::WouldBlock.into())
                }
                Err(e) => Err(openssl_err(e)),
            },
        }
    }

    /// Take ciphertext (as much as the engine takes now) and decrypt it.
    fn feed(&mut self, mut ct: &[u8]) -> io::Result<usize> {
        match self {
            Session::Rustls(c) => {
                let k = c.read_tls(&mut ct)?;
                c.process_new_packets().map_err(tls_err)?;
                Ok(k)
            }
            Session::Openssl(s) => {
                s.get_mut().push(ct);
                Ok(ct.len())
            }
        }
    }

    fn write_plain(&mut self, plain: &[u8]) -> io::Result<usize> {
        match self {
            Session::Rustls(c) => c.writer().write(plain),
            Session::Openssl(s) => s.ssl_write(plain).map_err(openssl_err),
        }
    }

    /// Append the ciphertext the session has queued to `out`.
    fn take_output(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        match self {
            Session::Rustls(c) => {
                while c.wants_write() {
                    c.write_tls(out)?;
                }
            }
            Session::Openssl(s) => out.append(&mut s.get_mut().out),
        }
        Ok(())
    }

    fn close_notify(&mut self) {
        match self {
            Session::Rustls(c) => c.send_close_notify(),
            Session::Openssl(s) => {
                let _ = s.shutdown();
            }
        }
    }
}

/// OpenSSL's transport: ciphertext in memory, moved to and from the
/// socket by [`TlsSock`] (so OpenSSL never blocks on the socket holding
/// the session).
#[derive(Default)]
struct MemIo {
    input: Vec<u8>,
    pos: usize,
    out: Vec<u8>,
}

impl MemIo {
    fn push(&mut self, ct: &[u8]) {
        if self.pos == self.input.len() {
            self.input.clear();
            self.pos = 0;
        }
        self.input.extend_from_slice(ct);
    }
}

impl Read for MemIo {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let rest = &self.input[self.pos..];
        if rest.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = rest.len().min(buf.len());
        buf[..n].copy_from_slice(&rest[..n]);
        self.pos += n;
        Ok(n)
    }
}

impl Write for MemIo {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// TLS-PSK (`--tls-psk FILE`), on OpenSSL: the keys file is qemu's and
/// nbdkit's, one `USERNAME:HEXKEY` a line. The client's identity is its
/// username.
pub struct PskServer {
    ctx: openssl::ssl::SslContext,
    user: openssl::ex_data::Index<openssl::ssl::Ssl, String>,
}

/// Parse a PSK keys file: `USERNAME:HEXKEY` lines (blank lines and `#`
/// comments skipped).
pub fn parse_psk_file(text: &str) -> Result<std::collections::BTreeMap<String, Vec<u8>>, String> {
    let mut keys = std::collections::BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |why: &str| format!("line {}: {why}", i + 1);
        let (user, hex) = line
            .split_once(':')
            .ok_or_else(|| bad("expected USERNAME:HEXKEY"))?;
        if user.is_empty() || user == super::authz::ANONYMOUS {
            return Err(bad("empty or reserved username"));
        }
        if hex.is_empty() || hex.len() % 2 != 0 || hex.len() > 512 {
            return Err(bad(
                "the key must be an even number of hex digits (at most 256 bytes)",
            ));
        }
        let key = (0..hex.len())
            .step_by(2)
            .map(|j| u8::from_str_radix(&hex[j..j + 2], 16))
            .collect::<Result<Vec<u8>, _>>()
            .map_err(|_| bad("the key is not hex"))?;
        if keys.insert(user.to_string(), key).is_some() {
            return Err(bad("username given twice"));
        }
    }
    if keys.is_empty() {
        return Err("no USERNAME:HEXKEY line".into());
    }
    Ok(keys)
}

impl PskServer {
    pub fn from_file(path: &Path) -> Result<Arc<PskServer>, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let keys = parse_psk_file(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::new(keys).map_err(|e| format!("{}: {e}", path.display()))
    }

    fn new(keys: std::collections::BTreeMap<String, Vec<u8>>) -> Result<Arc<PskServer>, String> {
        use openssl::ssl::{Ssl, SslContext, SslMethod};
        let user = Ssl::new_ex_index::<String>().map_err(|e| e.to_string())?;
        let mut b = SslContext::builder(SslMethod::tls_server()).map_err(|e| e.to_string())?;
        // PSK suites only (TLS 1.2); TLS 1.3 uses its own with the key.
        b.set_cipher_list("ECDHE-PSK:DHE-PSK:PSK:!NULL")
            .map_err(|e| e.to_string())?;
        b.set_psk_server_callback(move |ssl, identity, psk| {
            let name = identity.and_then(|i| std::str::from_utf8(i).ok());
            match name.and_then(|n| keys.get(n).map(|k| (n, k))) {
                Some((n, k)) if k.len() <= psk.len() => {
                    psk[..k.len()].copy_from_slice(k);
                    ssl.set_ex_data(user, n.to_string());
                    Ok(k.len())
                }
                // An unknown user: the handshake fails.
                _ => Ok(0),
            }
        });
        Ok(Arc::new(PskServer {
            ctx: b.build(),
            user,
        }))
    }

    fn accept(&self, raw: &Sock) -> io::Result<(Session, Option<String>)> {
        use openssl::ssl::{ErrorCode, Ssl, SslStream};
        let mut ssl = Ssl::new(&self.ctx).map_err(io::Error::other)?;
        ssl.set_accept_state();
        let mut s = SslStream::new(ssl, MemIo::default()).map_err(io::Error::other)?;
        let mut buf = vec![0u8; 16 << 10];
        loop {
            let r = s.do_handshake();
            let out = std::mem::take(&mut s.get_mut().out);
            RawIo(raw).write_all(&out)?;
            match r {
                Ok(()) => break,
                Err(e) if e.code() == ErrorCode::WANT_READ => {
                    let n = raw.raw_read(&mut buf)?;
                    if n == 0 {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                    s.get_mut().push(&buf[..n]);
                }
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
            }
        }
        let identity = s.ssl().ex_data(self.user).cloned();
        Ok((Session::Openssl(Box::new(s)), identity))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_escaped_as_rfc_4514_says() {
        assert_eq!(escape_value("host-a"), "host-a");
        assert_eq!(escape_value("a,b+c"), "a\\,b\\+c");
        assert_eq!(escape_value("#x "), "\\#x\\ ");
        assert_eq!(escape_value(" y"), "\\ y");
        assert_eq!(escape_value("q\"<>;\\"), "q\\\"\\<\\>\\;\\\\");
    }

    #[test]
    fn attribute_types_by_name_or_oid() {
        assert_eq!(attr_name("2.5.4.3"), "CN");
        assert_eq!(attr_name("2.5.4.10"), "O");
        assert_eq!(attr_name("1.2.840.113549.1.9.1"), "1.2.840.113549.1.9.1");
    }

    /// A CA and a server certificate for localhost, made by the openssl CLI
    /// (as tests/nbd_tls.rs does) in `dir`.
    fn make_pki(dir: &Path) {
        let script = r#"set -e
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca-key.pem \
  -out ca-cert.pem -days 2 -subj "/CN=unit CA" \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout server-key.pem \
  -out server.csr -subj "/O=unit/CN=localhost"
printf 'subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n' > server.ext
openssl x509 -req -in server.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial \
  -out server-cert.pem -days 2 -extfile server.ext
"#;
        let out = std::process::Command::new("bash")
            .args(["-c", script])
            .current_dir(dir)
            .output()
            .expect("openssl (apt-get install openssl)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A writer stuck on a full socket (the client sends everything before
    /// it reads anything) must not stop the reader from taking the
    /// client's data: with the session lock held across the raw write,
    /// both sides would wait for each other forever. And the server's
    /// close_notify ends the client's reading cleanly.
    #[test]
    fn a_blocked_writer_does_not_stall_the_reader_and_shutdown_says_close_notify() {
        use std::os::unix::net::UnixStream;
        let dir = tempfile::tempdir().unwrap();
        make_pki(dir.path());
        let cfg = server_config(dir.path(), false).unwrap();
        let server_cert =
            CertificateDer::from_pem_file(dir.path().join("server-cert.pem")).unwrap();
        // RFC 4514 order: the last RDN (CN) first.
        assert_eq!(subject_of(&server_cert).unwrap(), "CN=localhost,O=unit");
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(dir.path().join("ca-cert.pem")).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let client_cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let (a, b) = UnixStream::pair().unwrap();
        const LEN: usize = 8 << 20;
        let pattern = |i: usize| (i % 251) as u8;
        let server = std::thread::spawn(move || {
            let (tls, who) = TlsSock::accept(Sock::Unix(a), &TlsEngine::X509(cfg)).unwrap();
            assert_eq!(who, None, "no client certificate");
            let w = tls.clone();
            let writer = std::thread::spawn(move || {
                let data: Vec<u8> = (0..LEN).map(pattern).collect();
                let mut s = Sock::Tls(w);
                s.write_all(&data).unwrap();
                s.shutdown(Shutdown::Write).unwrap();
            });
            let mut got = vec![0u8; LEN];
            Sock::Tls(tls).read_exact(&mut got).unwrap();
            assert!(got.iter().enumerate().all(|(i, &b)| b == pattern(i)));
            writer.join().unwrap();
        });
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let conn = rustls::ClientConnection::new(Arc::new(client_cfg), name).unwrap();
        let mut c = rustls::StreamOwned::new(conn, b);
        let data: Vec<u8> = (0..LEN).map(pattern).collect();
        c.write_all(&data).unwrap();
        c.flush().unwrap();
        let mut back = Vec::new();
        // read_to_end fails on an end without close_notify.
        c.read_to_end(&mut back).unwrap();
        assert_eq!(back.len(), LEN);
        assert!(back == data);
        server.join().unwrap();
    }

    #[test]
    fn psk_files_are_username_colon_hex_lines() {
        let k = parse_psk_file("# keys\nalice:00ff10\n\nbob:abcd\n").unwrap();
        assert_eq!(k["alice"], [0x00, 0xff, 0x10]);
        assert_eq!(k["bob"], [0xab, 0xcd]);
        for bad in [
            "",
            "alice",
            "alice:",
            "alice:abc",
            "alice:zz",
            ":00",
            "anonymous:00",
            "a:00\na:11",
        ] {
            assert!(parse_psk_file(bad).is_err(), "{bad:?}");
        }
        let e = parse_psk_file("a:00\nb:xyz1").unwrap_err();
        assert!(e.starts_with("line 2:"), "{e}");
    }

    #[test]
    fn modes_parse() {
        assert_eq!("require".parse::<TlsMode>().unwrap(), TlsMode::Require);
        assert_eq!("off".parse::<TlsMode>().unwrap(), TlsMode::Off);
        assert!("yes".parse::<TlsMode>().is_err());
    }
}
