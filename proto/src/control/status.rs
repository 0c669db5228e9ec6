//! `status`: the node, its sessions, its drops, its workloads and what enforcement did.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::{PolicyInfo, WorkloadInfo};
use crate::time::UnixTime;

/// `{"op":"status"}`: no arguments.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusRequest {}

/// Result of `status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// True once the TUN is up and the UDP socket bound.
    pub ready: bool,
    pub identity: String,
    pub public_key: String,
    pub listen: SocketAddr,
    pub tun: String,
    pub addresses: Vec<IpNet>,
    pub peers: Vec<PeerStatus>,
    pub drops: NodeDrops,
    /// The local workloads (the node's own identity first, named `node`).
    #[serde(default)]
    pub workloads: Vec<WorkloadInfo>,
    /// The policy in force and what enforcement did; `None` from a daemon that
    /// predates it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enforcement: Option<Enforcement>,
    /// The CPU wake-up latency request (`node.cpu_latency_us`); `None` without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_latency: Option<CpuLatencyStatus>,
    /// The host filter (nftables) that keeps the mesh addresses to meshd; `None` from
    /// a daemon that predates it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_filter: Option<HostFilterStatus>,
    /// The fleet store: connection, revision, what was applied and refused; `None`
    /// without a `[store]` table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<crate::store::StoreStatus>,
}

/// meshd's host filter: nothing reaches a mesh address except through meshd (the
/// TUN) or loopback, and pods send only into the TUN, from their own addresses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostFilterStatus {
    pub state: HostFilterState,
    /// The nftables table (`inet meshd-mesh0`); empty when disabled.
    #[serde(default)]
    pub table: String,
    /// The mesh addresses it keeps to meshd.
    #[serde(default)]
    pub protects: Vec<IpNet>,
    /// The pods' veths it holds to meshd.
    #[serde(default)]
    pub pods: Vec<String>,
    /// Packets it dropped that were addressed to a mesh address around meshd (from
    /// the underlay, or forwarded toward the TUN or a pod).
    #[serde(default)]
    pub underlay_drops: u64,
    /// Packets it dropped from pods: to the host itself, or anywhere but the TUN, or
    /// from an address not theirs.
    #[serde(default)]
    pub pod_drops: u64,
}

impl HostFilterStatus {
    /// The status of a daemon running without its filter (`host_filter = false`).
    pub fn disabled() -> HostFilterStatus {
        HostFilterStatus {
            state: HostFilterState::Disabled,
            table: String::new(),
            protects: Vec::new(),
            pods: Vec::new(),
            underlay_drops: 0,
            pod_drops: 0,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HostFilterState {
    /// In force (read back from the kernel).
    Installed,
    /// Switched off in the configuration (`[node] host_filter = false`).
    Disabled,
    /// meshd installed it but the kernel no longer has it (deleted by hand?): the
    /// mesh addresses are unprotected until meshd restarts.
    Missing,
}

/// meshd's CPU wake-up latency request: held while traffic flows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuLatencyStatus {
    pub requested_us: u32,
    pub state: CpuLatencyState,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuLatencyState {
    /// Held now (traffic in the last timer tick).
    Held,
    /// Not held: no recent traffic.
    Released,
    /// The kernel refused it (logged); not tried again until restart.
    Failed,
}

/// One session: a remote workload (`identity`) and the local workload it talks to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub identity: String,
    /// The local workload's identity (the node's own one on a host without workloads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<String>,
    pub public_key: String,
    pub endpoint: Option<SocketAddr>,
    pub addresses: Vec<IpNet>,
    /// Seconds since the epoch of the last completed handshake; `null` before one.
    pub latest_handshake: Option<UnixTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub drops: PeerDrops,
    /// The peer's certificate validity window (0 from a daemon that predates them).
    #[serde(default)]
    pub not_before: UnixTime,
    #[serde(default)]
    pub not_after: UnixTime,
}

/// Drops attributed to a peer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PeerDrops {
    /// Decrypted packets whose source address is not in the sender's certificate.
    pub spoofed_source: u64,
}

/// Drops that no peer can be blamed for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NodeDrops {
    /// Datagrams or TUN packets that do not parse, or fail authentication.
    pub malformed: u64,
    /// Datagrams for no known peer (unknown static key or receiver index), and
    /// handshakes from peers whose certificate is no longer valid.
    pub unknown_peer: u64,
    /// TUN packets to an address no peer holds (or whose peer has no endpoint).
    pub no_route: u64,
    /// Packets from a local workload with a source address its certificate does not
    /// hold (a pod sending as its neighbour, or as no workload at all).
    pub forged_source: u64,
    /// Decrypted packets addressed to a local address other than the session's
    /// workload's.
    pub misdirected: u64,
    /// Writes to the TUN the kernel refused (one packet, or one merged run of a
    /// flow's segments, each).
    pub tun_write: u64,
    /// Datagrams to peers not sent: refused by the kernel, or the socket's send
    /// buffer stayed full past the backpressure wait.
    pub udp_send: u64,
}

/// `status.enforcement`: the policy in force, the enforcer's counters and the
/// decision log's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enforcement {
    pub policy: PolicyInfo,
    pub counters: EnforcementCounters,
    pub decision_log: LogCounters,
}

/// What the enforcer did since meshd started (per-rule counts: since the policy was
/// applied). Fields a daemon does not report read as 0.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct EnforcementCounters {
    /// Packets delivered (to the TUN or a pod) after enforcement.
    pub delivered: u64,
    /// Flows tracked, tombstones of cut flows excluded.
    pub flows: u64,
    /// Tombstones of flows cut by a policy or identity change.
    pub flows_cut: u64,
    /// Flows evicted from a full table.
    pub flows_evicted: u64,
    /// Drops by reason name (`default_deny`, `no_allow_matched`, `untracked`, ...).
    pub drops: BTreeMap<String, u64>,
    /// Hits of each rule of the policy in force.
    pub rules: Vec<RuleCount>,
    /// Layer-7 flows being inspected, and bytes they hold.
    pub l7_flows: u64,
    pub l7_held_bytes: u64,
    /// HTTP requests decided, and of those refused.
    pub http_requests: u64,
    pub http_refused: u64,
}

/// Hits of one rule (`policy/rule`) since the policy was applied.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleCount {
    pub policy: String,
    /// The rule's name, or its index when it has none.
    pub rule: String,
    pub allow: u64,
    pub deny: u64,
    pub audit: u64,
}

/// The decision log's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LogCounters {
    /// Records written.
    pub written: u64,
    /// Records over the per-second budget, counted instead of written.
    pub suppressed: u64,
    /// Lines `log -f` followers lost because they did not keep up.
    pub follower_lost: u64,
}
