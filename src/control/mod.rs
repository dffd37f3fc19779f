//! The control plane: the command line and the control socket.

pub mod cli;
pub mod ctl;
pub mod systemd;
