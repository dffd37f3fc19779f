//! The client socket (unix or TCP, plain or TLS) and reading request
//! headers from it.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use crate::nbd::tls::{TlsEngine, TlsSock};

/// A client socket, unix or TCP, or a TLS session over one (after
/// STARTTLS). A TLS socket's clones share the one session; `shutdown`,
/// `set_read_timeout` and the descriptor are the raw socket's.
#[derive(Debug)]
pub enum Sock {
    Unix(UnixStream),
    Tcp(TcpStream),
    Tls(TlsSock),
}

impl Sock {
    pub fn try_clone(&self) -> io::Result<Sock> {
        Ok(match self {
            Sock::Unix(s) => Sock::Unix(s.try_clone()?),
            Sock::Tcp(s) => Sock::Tcp(s.try_clone()?),
            Sock::Tls(t) => Sock::Tls(t.clone()),
        })
    }

    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Sock::Unix(s) => s.shutdown(how),
            Sock::Tcp(s) => s.shutdown(how),
            Sock::Tls(t) => t.shutdown(how),
        }
    }

    pub fn set_read_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        match self {
            Sock::Unix(s) => s.set_read_timeout(d),
            Sock::Tcp(s) => s.set_read_timeout(d),
            Sock::Tls(t) => t.raw().set_read_timeout(d),
        }
    }

    /// Encrypted: the bytes on the descriptor are not the NBD stream, so
    /// nothing may `recv`/`send` on it directly (the per-connection I/O
    /// queue and the direct reply path stay off).
    pub fn is_tls(&self) -> bool {
        matches!(self, Sock::Tls(_))
    }

    /// Read the plain socket through a shared reference (the TLS reader
    /// and writer use one socket at once).
    pub(crate) fn raw_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Sock::Unix(s) => (&*s).read(buf),
            Sock::Tcp(s) => (&*s).read(buf),
            Sock::Tls(_) => Err(io::Error::other("TLS over TLS")),
        }
    }

    pub(crate) fn raw_write(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sock::Unix(s) => (&*s).write(buf),
            Sock::Tcp(s) => (&*s).write(buf),
            Sock::Tls(_) => Err(io::Error::other("TLS over TLS")),
        }
    }
}

impl crate::nbd::handshake::Transport for Sock {
    /// Replace this plain socket with a TLS session over it.
    fn start_tls(&mut self, cfg: &TlsEngine) -> io::Result<Option<String>> {
        if self.is_tls() {
            return Err(io::Error::other("TLS already started"));
        }
        let (tls, identity) = TlsSock::accept(self.try_clone()?, cfg)?;
        *self = Sock::Tls(tls);
        Ok(identity)
    }
}

impl AsFd for Sock {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Sock::Unix(s) => s.as_fd(),
            Sock::Tcp(s) => s.as_fd(),
            Sock::Tls(t) => t.raw().as_fd(),
        }
    }
}

impl AsRawFd for Sock {
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Sock::Unix(s) => s.read(buf),
            Sock::Tcp(s) => s.read(buf),
            Sock::Tls(t) => t.read(buf),
        }
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sock::Unix(s) => s.write(buf),
            Sock::Tcp(s) => s.write(buf),
            Sock::Tls(t) => t.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sock::Unix(s) => s.flush(),
            Sock::Tcp(s) => s.flush(),
            Sock::Tls(t) => t.flush(),
        }
    }
}

/// Read a request header. `Err(None)`: clean end of stream before a header.
pub(super) fn read_header(r: &mut impl Read, hdr: &mut [u8]) -> Result<(), Option<io::Error>> {
    let mut got = 0;
    while got < hdr.len() {
        match r.read(&mut hdr[got..]) {
            Ok(0) if got == 0 => return Err(None),
            Ok(0) => {
                return Err(Some(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "truncated request header",
                )))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Some(e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hands out its bytes a few at a time, after one interruption.
    struct Trickle {
        data: Vec<u8>,
        interrupted: bool,
    }

    impl Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if !self.interrupted {
                self.interrupted = true;
                return Err(io::ErrorKind::Interrupted.into());
            }
            let n = buf.len().min(self.data.len()).min(5);
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data.drain(..n);
            Ok(n)
        }
    }

    #[test]
    fn a_header_is_read_whole_across_short_and_interrupted_reads() {
        let mut r = Trickle {
            data: (0..28).collect(),
            interrupted: false,
        };
        let mut hdr = [0u8; 28];
        read_header(&mut r, &mut hdr).unwrap();
        assert_eq!(hdr.to_vec(), (0..28).collect::<Vec<u8>>());
    }

    #[test]
    fn end_of_stream_before_a_header_is_clean_and_inside_one_is_not() {
        let mut hdr = [0u8; 28];
        assert!(matches!(read_header(&mut &[][..], &mut hdr), Err(None)));
        let e = read_header(&mut &[1u8; 10][..], &mut hdr).unwrap_err();
        assert_eq!(e.unwrap().kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn a_unix_sock_reads_writes_and_shuts_down() {
        let (a, b) = UnixStream::pair().unwrap();
        let raw = a.as_raw_fd();
        let (mut a, mut b) = (Sock::Unix(a), Sock::Unix(b));
        assert_eq!(a.as_raw_fd(), raw);
        assert_eq!(a.as_fd().as_raw_fd(), raw);
        let c = a.try_clone().unwrap();
        assert_ne!(c.as_raw_fd(), raw);
        a.write_all(b"ping").unwrap();
        a.flush().unwrap();
        let mut got = [0u8; 4];
        b.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
        c.shutdown(Shutdown::Write).unwrap();
        b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(b.read(&mut got).unwrap(), 0, "shut down through the clone");
    }
}
