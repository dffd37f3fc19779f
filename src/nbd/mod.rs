//! The NBD gateway (`blkshim serve`): a drop-in disk backend for qemu, fio
//! and libnbd tools, with writer epochs carried in the export name
//! (`vm1@6`). Every request goes through [`crate::handoff::Disk`], so
//! overlapping writes never meet at the storage and fenced writers' writes
//! never land.
//!
//! - [`proto`]: the wire format, pure parsing and encoding (fuzzed);
//! - [`handshake`]: fixed-newstyle option negotiation;
//! - [`connection`]: pipelined transmission, replies out of order;
//! - [`server`]: listeners, export table, control socket, SIGTERM;
//! - [`config`]: command line and TOML config, and the storage opener;
//! - [`allocation`]: `base:allocation` block status from the image's holes;
//! - [`tls`]: STARTTLS with X.509 certificates (rustls) or PSK (OpenSSL),
//!   client identities;
//! - [`authz`]: which identity may open which disk, and advance its epoch;

pub mod allocation;
pub mod authz;
pub mod config;
pub mod connection;
pub mod handshake;
pub mod proto;
pub mod server;
pub mod tls;
