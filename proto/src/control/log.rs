//! `log`: the decision log — every deny and every audit match, one [`DecisionRecord`]
//! each.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::policy::{Action, Protocol};

/// How many lines `log` returns when the request does not say.
pub const DEFAULT_LOG_LINES: u32 = 50;

/// `{"op":"log","follow":false,"lines":50}`: the last `lines` decisions; with
/// `follow`, then every new decision as a line of its own (a [`DecisionRecord`]) until
/// the client goes away.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogRequest {
    #[serde(default)]
    pub follow: bool,
    /// [`DEFAULT_LOG_LINES`] when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lines: Option<u32>,
}

/// Result of `log`: the last decisions, oldest first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogTail {
    pub lines: Vec<DecisionRecord>,
}

/// One decision of the data path, as meshd's decision log writes it (one JSON object
/// per line, in the ring `log` reads, to followers, and to the daemon's log).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecisionRecord {
    /// When, RFC 3339 UTC (`2026-11-26T06:17:57Z`).
    pub time: String,
    /// The sender's identity, proven by its key; `null` for local traffic with none.
    pub src: Option<String>,
    pub src_addr: IpAddr,
    /// The receiving workload's identity; `null` for the node itself.
    #[serde(default)]
    pub dst: Option<String>,
    pub dst_addr: IpAddr,
    /// 0 for ICMP.
    pub dst_port: u16,
    pub proto: Protocol,
    /// `deny`, or `audit` for an audit rule's match (allows are not logged).
    pub decision: Action,
    /// Stable snake_case reason: a deny reason's name (`default_deny`,
    /// `no_allow_matched`, ...), or `audit_matched`.
    pub reason: String,
    /// The rule that decided (`policy/rule`), if one did.
    #[serde(default)]
    pub policy: Option<String>,
    #[serde(default)]
    pub rule: Option<String>,
    /// The HTTP request, for a decision at layer 7.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSummary>,
}

/// The HTTP request a layer-7 decision was about.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpSummary {
    /// Empty when the request was refused before its method was read; `path` then
    /// says why.
    pub method: String,
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The HTTP status the client was answered with, if refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
}
