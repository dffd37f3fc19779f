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

/// A listener's TLS policy for the handshake.
#[derive(Clone)]
pub struct TlsPolicy {
    pub mode: TlsMode,
    /// `None` exactly when `mode` is `Off`.
    pub config: Option<Arc<ServerConfig>>,
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
    conn: Mutex<ServerConnection>,
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
    /// session and the client certificate's subject, if it sent one.
    pub fn accept(raw: Sock, cfg: &Arc<ServerConfig>) -> io::Result<(TlsSock, Option<String>)> {
        let mut conn = ServerConnection::new(Arc::clone(cfg)).map_err(tls_err)?;
        let mut io = RawIo(&raw);
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
        let shared = Shared {
            raw,
            conn: Mutex::new(conn),
            send: Mutex::new(()),
            rbuf: Mutex::new(ReadBuf {
                buf: vec![0u8; 18 << 10],
                start: 0,
                end: 0,
            }),
        };
        Ok((TlsSock(Arc::new(shared)), identity))
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
                c.writer().write(plain)?
            };
            let mut out = Vec::with_capacity(n + 64);
            while c.wants_write() {
                c.write_tls(&mut out)?;
            }
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
                    match c.reader().read(buf) {
                        Ok(n) => return Ok(n), // 0: the client's close_notify
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(e),
                    }
                    if rb.start == rb.end {
                        break None;
                    }
                    let mut ct = &rb.buf[rb.start..rb.end];
                    let k = c.read_tls(&mut ct)?;
                    rb.start += k;
                    if let Err(e) = c.process_new_packets() {
                        break Some(e);
                    }
                    if k == 0 {
                        // Nothing taken and (below) nothing to read: stuck.
                        return match c.reader().read(buf) {
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
                return Err(tls_err(e));
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
                self.0.conn.lock().send_close_notify();
                let _ = self.write_out(&[]);
            }
        }
        self.0.raw.shutdown(how)
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
            let (tls, who) = TlsSock::accept(Sock::Unix(a), &cfg).unwrap();
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
    fn modes_parse() {
        assert_eq!("require".parse::<TlsMode>().unwrap(), TlsMode::Require);
        assert_eq!("off".parse::<TlsMode>().unwrap(), TlsMode::Off);
        assert!("yes".parse::<TlsMode>().is_err());
    }
}
