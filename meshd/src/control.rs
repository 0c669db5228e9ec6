//! The control plane: the daemon's state and its operations (`daemon`, with the
//! workload operations), the control socket (`socket`) and its client (`client`), the
//! local workloads and their attachment (`workloads`, `attach`), the host filter
//! (`hostfilter`), the state files (`state`), certificate expiry warnings (`expiry`),
//! and the fleet store (`store`, the etcd client; `fleet`, the store as an input). It
//! holds the data path's `Plane` and swaps what it reads; nothing below calls it.

pub mod attach;
pub mod client;
pub mod daemon;
pub mod expiry;
pub mod fleet;
pub mod hostfilter;
pub mod socket;
pub mod state;
pub mod store;
pub mod workloads;
