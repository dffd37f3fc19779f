//! Xen blkif front end: the foundation a blkback-style backend is built on.
pub mod sys;
