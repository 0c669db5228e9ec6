//! `peer_add`, `peer_remove`, `peer_list`: the daemon's peers.

use std::net::SocketAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::time::UnixTime;

/// `{"op":"peer_add","cert":"<pem>","endpoint":"198.18.0.2:51820"}`: adds (or
/// replaces) a peer by its certificate, which the daemon verifies against its CA.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerAddRequest {
    /// The peer's certificate, PEM.
    pub cert: String,
    /// Where to reach it; without one, learned when the peer first reaches us.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<SocketAddr>,
}

/// `{"op":"peer_remove","identity":"spiffe://t/b"}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerRemoveRequest {
    pub identity: String,
}

/// `{"op":"peer_list"}`: no arguments.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerListRequest {}

/// Where a peer comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerSource {
    /// A `[[peer]]` of meshd.toml.
    Config,
    /// `peer add` (persisted in the state directory).
    Runtime,
}

impl PeerSource {
    pub fn as_str(self) -> &'static str {
        match self {
            PeerSource::Config => "config",
            PeerSource::Runtime => "runtime",
        }
    }
}

/// One entry of `peer_list`, and the result of `peer_add`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    pub identity: String,
    pub public_key: String,
    pub endpoint: Option<SocketAddr>,
    pub addresses: Vec<IpNet>,
    #[serde(default)]
    pub groups: Vec<String>,
    pub not_after: UnixTime,
    pub source: PeerSource,
}

/// Result of `peer_list`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerList {
    pub peers: Vec<PeerInfo>,
}

/// Result of `peer_remove`: the identity removed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRemoved {
    pub removed: String,
}
