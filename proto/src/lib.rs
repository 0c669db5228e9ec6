//! `mesh-proto`: the shared language of `meshd` and `meshctl`.
//!
//! This crate's public API is the contract between the daemon and the operator's
//! tool. It is pure: no sockets, no clock reads (time is always an argument, see
//! [`time::UnixTime`]), no threads. The one exception is [`files`], which holds the
//! on-disk rules (private keys readable only by their owner, atomic replacement) so
//! that both binaries apply them identically.
#![forbid(unsafe_code)]

pub mod cert;
pub mod config;
pub mod control;
pub mod files;
pub mod http_path;
pub mod identity;
pub mod key;
pub mod policy;
pub mod signed;
pub mod store;
pub mod time;

#[cfg(any(test, feature = "testing"))]
pub mod testing;
