//! The control plane: the command line and (later) the control socket.

pub mod cli;
