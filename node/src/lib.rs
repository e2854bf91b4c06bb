//! The fieldsync node as a library. [`run`] runs a device or a relay (libp2p sync, the HTTP
//! API, the mirror) until a shutdown future completes; the `fieldsync` binary parses its
//! command line with [`cli`], sets up logging and calls it, and tests or programs that
//! embed a node call it the same way.
//!
//! The CLI's data commands are written once, in [`cli`]: they speak the HTTP API, to a
//! running daemon's listener or, with no daemon, to the same routes served in process on
//! the data directory (`client`).

pub mod cli;
mod client;
pub mod config;
pub mod daemon;
mod data;

pub use cli::CliError as Error;
pub use daemon::{run, shutdown_signal, NodeConfig, Options};
