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
//! - [`config`]: command line and TOML config;
//! - [`allocation`]: `base:allocation` block status from the image's holes;
//! - [`file_storage`]: the interim file engine and [`file_storage::open_disk_storage`].

pub mod allocation;
pub mod config;
pub mod connection;
pub mod file_storage;
pub mod handshake;
pub mod proto;
pub mod server;
