//! `workload_add`, `workload_remove`, `workload_list`: the daemon's local workloads.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::time::UnixTime;

/// `{"op":"workload_add","name":"web","cert":"/abs/web.crt","key":"/abs/web.key",
/// "veth":"p-web"}`: adds (or replaces) a local workload. `cert` and `key` are absolute
/// paths on the daemon's host (the key never travels over the socket); `veth` is the
/// host end of the pod's veth, absent for a workload whose addresses the operator
/// routes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadAddRequest {
    pub name: String,
    pub cert: String,
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub veth: Option<String>,
}

/// `{"op":"workload_remove","name":"web"}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadRemoveRequest {
    pub name: String,
}

/// `{"op":"workload_list"}`: no arguments.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadListRequest {}

/// Where a local workload comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkloadSource {
    /// The node's own identity (`[node]`), named `node`.
    Node,
    /// A `[[workload]]` of meshd.toml.
    Config,
    /// `workload add` (persisted in the state directory).
    Runtime,
}

impl WorkloadSource {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkloadSource::Node => "node",
            WorkloadSource::Config => "config",
            WorkloadSource::Runtime => "runtime",
        }
    }
}

/// How a workload's traffic reaches meshd. On the wire: `veth:<interface>` or `tun`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Attach {
    /// Behind the host end of a veth pair into its network namespace.
    Veth(String),
    /// Addresses on, or routed by the operator to, meshd's TUN.
    Tun,
}

impl std::fmt::Display for Attach {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Attach::Veth(v) => write!(f, "veth:{v}"),
            Attach::Tun => f.write_str("tun"),
        }
    }
}

impl From<Attach> for String {
    fn from(a: Attach) -> String {
        a.to_string()
    }
}

/// An attachment that is neither `tun` nor `veth:<interface>`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("attach {0:?}: expected \"tun\" or \"veth:<interface>\"")]
pub struct BadAttach(pub String);

impl TryFrom<String> for Attach {
    type Error = BadAttach;

    fn try_from(s: String) -> Result<Attach, BadAttach> {
        match s.strip_prefix("veth:") {
            Some(v) if !v.is_empty() => Ok(Attach::Veth(v.to_string())),
            _ if s == "tun" => Ok(Attach::Tun),
            _ => Err(BadAttach(s)),
        }
    }
}

/// One local workload, in `status`, `workload_list` and the result of `workload_add`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadInfo {
    /// The operator's label; `node` is the node's own identity.
    pub name: String,
    pub identity: String,
    pub public_key: String,
    pub addresses: Vec<IpNet>,
    #[serde(default)]
    pub groups: Vec<String>,
    /// Start of its certificate's validity window (0 from a daemon that predates it).
    #[serde(default)]
    pub not_before: UnixTime,
    pub not_after: UnixTime,
    pub attach: Attach,
    pub source: WorkloadSource,
}

/// Result of `workload_list`: the node's own identity first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadList {
    pub workloads: Vec<WorkloadInfo>,
}

/// Result of `workload_remove`: the name removed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadRemoved {
    pub removed: String,
}
