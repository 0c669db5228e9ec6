//! The fleet store's layout: which key holds what under the prefix, and the typed
//! values. Shared by meshd (which watches the store) and meshctl (which writes it).
//!
//! # Layout
//! Under a prefix (default `/meshd/<trust domain>/`, `[store] prefix`):
//! ```text
//! <prefix>certs/<SPIFFE ID>               a leaf certificate, armored text     (meshctl peer publish)
//! <prefix>nodes/<SPIFFE ID>/endpoint      {"endpoints":["198.18.0.1:51820"]}   (the node, under its lease)
//! <prefix>nodes/<SPIFFE ID>/status        NodeStatus as JSON                   (the node, under its lease)
//! <prefix>policy/current                  the signed policy document in force  (meshctl policy publish)
//! <prefix>policy/history/<20 digits>      every document published, by version (same transaction)
//! <prefix>revocations                     reserved: the CA-signed revocation list (issue 21)
//! ```
//! e.g. `/meshd/example.org/certs/spiffe://example.org/web`. History keys are the
//! version zero-padded to 20 digits, so that etcd's byte order is version order.
//!
//! # Trust
//! The store is not trusted for identity or policy: a certificate read here is
//! verified against the node's CA bundle like a file, a policy document against the
//! policy keys `meshd.toml` names ([`crate::signed`]), and the revocation list (issue
//! 21) will be CA-signed and only move forward. Endpoints and status are not secret:
//! a false endpoint costs a failed handshake. This module checks only form: every key
//! and value under the prefix decodes to a typed entry or a typed error
//! ([`DecodeError`], with a short [`IgnoreReason`] for counting), never a panic,
//! whatever was written there.
//!
//! Values have size limits ([`StoreKey::max_value_len`]); JSON values ignore fields
//! they do not know, so that a newer meshd can add some.

use crate::cert::{CertKind, Certificate, Fingerprint, MAX_CERT_LEN};
use crate::identity::{IdError, SpiffeId, TrustDomain};
use crate::signed::{PolicyDoc, SignedError, MAX_POLICY_DOC_LEN};
use crate::time::UnixTime;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;

/// Longest prefix accepted.
pub const MAX_PREFIX_LEN: usize = 256;
/// Limit of an endpoint or status value (JSON).
pub const MAX_NODE_VALUE_LEN: usize = 4096;
/// Limit of the revocation list slot (issue 21 sets its format).
pub const MAX_REVOCATIONS_LEN: usize = 1024 * 1024;
/// Most endpoints one node may announce.
pub const MAX_ENDPOINTS: usize = 8;
/// Longest `meshd_version` in a status.
pub const MAX_VERSION_LEN: usize = 64;

const CERTS: &str = "certs/";
const NODES: &str = "nodes/";
const ENDPOINT: &str = "endpoint";
const STATUS: &str = "status";
const POLICY_CURRENT: &str = "policy/current";
const POLICY_HISTORY: &str = "policy/history/";
const REVOCATIONS: &str = "revocations";

/// A validated key prefix: starts and ends with `/`, printable ASCII, no spaces.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Prefix(String);

impl Prefix {
    /// `/meshd/<trust domain>/`, the default.
    pub fn for_trust_domain(td: &TrustDomain) -> Prefix {
        Prefix(format!("/meshd/{td}/"))
    }

    pub fn parse(s: &str) -> Result<Prefix, String> {
        if s.len() < 2 || s.len() > MAX_PREFIX_LEN {
            return Err(format!("{s:?} must be 2 to {MAX_PREFIX_LEN} bytes"));
        }
        if !s.starts_with('/') || !s.ends_with('/') {
            return Err(format!(
                "{s:?} must start and end with \"/\" (e.g. \"/meshd/example.org/\")"
            ));
        }
        if let Some(c) = s.chars().find(|c| !c.is_ascii_graphic()) {
            return Err(format!(
                "{s:?} may contain only printable ASCII without spaces (found {c:?})"
            ));
        }
        if s.contains("//") {
            return Err(format!("{s:?} has an empty segment (\"//\")"));
        }
        Ok(Prefix(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The full key of `k`.
    pub fn key(&self, k: &StoreKey) -> String {
        let p = &self.0;
        match k {
            StoreKey::Cert(id) => format!("{p}{CERTS}{id}"),
            StoreKey::NodeEndpoint(id) => format!("{p}{NODES}{id}/{ENDPOINT}"),
            StoreKey::NodeStatus(id) => format!("{p}{NODES}{id}/{STATUS}"),
            StoreKey::Policy => format!("{p}{POLICY_CURRENT}"),
            StoreKey::PolicyHistory(v) => format!("{p}{POLICY_HISTORY}{v:020}"),
            StoreKey::Revocations => format!("{p}{REVOCATIONS}"),
        }
    }

    /// The prefix every certificate key starts with (to list them).
    pub fn certs(&self) -> String {
        format!("{}{CERTS}", self.0)
    }

    /// The prefix every node key starts with.
    pub fn nodes(&self) -> String {
        format!("{}{NODES}", self.0)
    }

    /// The prefix every policy history key starts with.
    pub fn policy_history(&self) -> String {
        format!("{}{POLICY_HISTORY}", self.0)
    }

    /// Which entry a full key names. Keys outside the prefix, and keys under it that
    /// this layout does not define, are errors.
    pub fn parse_key(&self, raw: &[u8]) -> Result<StoreKey, KeyError> {
        let s = std::str::from_utf8(raw).map_err(|_| KeyError::NotText)?;
        let rest = s.strip_prefix(&self.0).ok_or(KeyError::OutsidePrefix)?;
        let id = |s: &str| SpiffeId::parse(s).map_err(KeyError::Identity);
        if let Some(ident) = rest.strip_prefix(CERTS) {
            return Ok(StoreKey::Cert(id(ident)?));
        }
        if let Some(node) = rest.strip_prefix(NODES) {
            return match node.rsplit_once('/') {
                Some((ident, ENDPOINT)) => Ok(StoreKey::NodeEndpoint(id(ident)?)),
                Some((ident, STATUS)) => Ok(StoreKey::NodeStatus(id(ident)?)),
                _ => Err(KeyError::Unknown),
            };
        }
        if rest == POLICY_CURRENT {
            return Ok(StoreKey::Policy);
        }
        if let Some(v) = rest.strip_prefix(POLICY_HISTORY) {
            return match v.parse::<u64>() {
                Ok(n) if v.len() == 20 && v.bytes().all(|b| b.is_ascii_digit()) && n > 0 => {
                    Ok(StoreKey::PolicyHistory(n))
                }
                _ => Err(KeyError::HistoryVersion),
            };
        }
        if rest == REVOCATIONS {
            return Ok(StoreKey::Revocations);
        }
        Err(KeyError::Unknown)
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One entry of the layout.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StoreKey {
    /// A workload's or node's leaf certificate.
    Cert(SpiffeId),
    /// Where a node's meshd listens; written by that node under its lease.
    NodeEndpoint(SpiffeId),
    /// What a node has applied; written by that node under its lease.
    NodeStatus(SpiffeId),
    /// The signed policy document in force.
    Policy,
    /// A published policy document, by version.
    PolicyHistory(u64),
    /// Reserved for the CA-signed revocation list (issue 21).
    Revocations,
}

impl StoreKey {
    /// The largest value this entry may hold; larger ones are ignored unread.
    pub fn max_value_len(&self) -> usize {
        match self {
            StoreKey::Cert(_) => MAX_CERT_LEN,
            StoreKey::NodeEndpoint(_) | StoreKey::NodeStatus(_) => MAX_NODE_VALUE_LEN,
            StoreKey::Policy | StoreKey::PolicyHistory(_) => MAX_POLICY_DOC_LEN,
            StoreKey::Revocations => MAX_REVOCATIONS_LEN,
        }
    }
}

/// Why a key under the prefix names no entry.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("key is not UTF-8")]
    NotText,
    #[error("key is outside the prefix")]
    OutsidePrefix,
    #[error("key is not part of the store layout")]
    Unknown,
    #[error("key names an invalid SPIFFE ID: {0}")]
    Identity(IdError),
    #[error("policy history keys end in a version of 20 digits, from 1")]
    HistoryVersion,
}

/// Where a node's meshd can be reached (its WireGuard UDP socket).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeEndpoint {
    /// 1 to [`MAX_ENDPOINTS`] addresses; no port 0, no unspecified address.
    pub endpoints: Vec<SocketAddr>,
}

impl NodeEndpoint {
    pub fn check(&self) -> Result<(), String> {
        if self.endpoints.is_empty() || self.endpoints.len() > MAX_ENDPOINTS {
            return Err(format!("endpoints: 1 to {MAX_ENDPOINTS} addresses"));
        }
        if let Some(a) = self
            .endpoints
            .iter()
            .find(|a| a.port() == 0 || a.ip().is_unspecified())
        {
            return Err(format!("endpoints: {a} is not an address peers can reach"));
        }
        Ok(())
    }
}

/// What a node reports about itself, for `meshctl fleet status` and `fleet diff`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Version of the store's policy document the node enforces; 0 when it enforces
    /// none from the store (a local policy file or `meshctl policy apply`, or none).
    pub applied_policy_version: u64,
    /// SHA-256 of the policy text it enforces, from wherever it came (`None`: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_digest: Option<Fingerprint>,
    /// The last store revision the node had seen when it wrote this.
    pub store_revision: i64,
    /// `meshd --version`.
    pub meshd_version: String,
    /// When the node wrote this.
    pub updated_at: UnixTime,
}

impl NodeStatus {
    pub fn check(&self) -> Result<(), String> {
        if self.store_revision < 0 {
            return Err("store_revision: negative".into());
        }
        if self.meshd_version.is_empty()
            || self.meshd_version.len() > MAX_VERSION_LEN
            || self.meshd_version.chars().any(|c| !c.is_ascii_graphic())
        {
            return Err(format!(
                "meshd_version: 1 to {MAX_VERSION_LEN} printable ASCII characters"
            ));
        }
        Ok(())
    }
}

/// A decoded value. Form only: certificates and policy documents are not verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreValue {
    Cert(Certificate),
    Endpoint(NodeEndpoint),
    Status(NodeStatus),
    /// `policy/current` or a history entry.
    Policy(PolicyDoc),
    /// The revocation list slot, undecoded (issue 21).
    Revocations(Vec<u8>),
}

/// A key and its decoded value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreEntry {
    pub key: StoreKey,
    pub value: StoreValue,
}

/// Why an entry under the prefix is ignored: a short name for counters and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IgnoreReason {
    /// A key this layout does not define (or not UTF-8).
    UnknownKey,
    /// A key naming an invalid SPIFFE ID or history version.
    BadKey,
    /// A value over its entry's limit.
    TooLarge,
    /// A certificate that does not parse, or is a CA certificate.
    BadCertificate,
    /// A certificate stored under another identity's key.
    IdentityMismatch,
    /// An endpoint or status that is not the JSON it should be.
    BadValue,
    /// A policy document that does not parse (signature and policy are checked by
    /// the consumer).
    BadPolicyDocument,
    /// A history entry whose document has another version than its key.
    VersionMismatch,
}

impl IgnoreReason {
    pub fn name(self) -> &'static str {
        match self {
            IgnoreReason::UnknownKey => "unknown_key",
            IgnoreReason::BadKey => "bad_key",
            IgnoreReason::TooLarge => "too_large",
            IgnoreReason::BadCertificate => "bad_certificate",
            IgnoreReason::IdentityMismatch => "identity_mismatch",
            IgnoreReason::BadValue => "bad_value",
            IgnoreReason::BadPolicyDocument => "bad_policy_document",
            IgnoreReason::VersionMismatch => "version_mismatch",
        }
    }
}

impl fmt::Display for IgnoreReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a key/value pair under the prefix was not decoded. `key` is set when the key
/// itself parsed (so a consumer can keep its last good value for it).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}: {reason}: {detail}", key_text)]
pub struct DecodeError {
    /// The raw key, lossily as text, for logs.
    pub key_text: String,
    pub key: Option<StoreKey>,
    pub reason: IgnoreReason,
    /// One line saying what is wrong.
    pub detail: String,
}

/// Decodes one key/value pair read under `prefix`.
pub fn decode(prefix: &Prefix, key: &[u8], value: &[u8]) -> Result<StoreEntry, DecodeError> {
    let key_text = String::from_utf8_lossy(&key[..key.len().min(512)]).into_owned();
    let k = prefix.parse_key(key).map_err(|e| DecodeError {
        key_text: key_text.clone(),
        key: None,
        reason: match e {
            KeyError::Identity(_) | KeyError::HistoryVersion => IgnoreReason::BadKey,
            KeyError::NotText | KeyError::OutsidePrefix | KeyError::Unknown => {
                IgnoreReason::UnknownKey
            }
        },
        detail: e.to_string(),
    })?;
    let fail = |reason, detail: String| DecodeError {
        key_text: key_text.clone(),
        key: Some(k.clone()),
        reason,
        detail,
    };
    if value.len() > k.max_value_len() {
        return Err(fail(
            IgnoreReason::TooLarge,
            format!(
                "{} bytes, over the limit of {}",
                value.len(),
                k.max_value_len()
            ),
        ));
    }
    let value = match &k {
        StoreKey::Cert(id) => {
            let text = std::str::from_utf8(value)
                .map_err(|_| fail(IgnoreReason::BadCertificate, "not UTF-8 text".into()))?;
            let cert = Certificate::from_pem(text)
                .map_err(|e| fail(IgnoreReason::BadCertificate, e.to_string()))?;
            if cert.kind() != CertKind::Leaf {
                return Err(fail(
                    IgnoreReason::BadCertificate,
                    "a CA certificate, not a leaf".into(),
                ));
            }
            if cert.identity() != id {
                return Err(fail(
                    IgnoreReason::IdentityMismatch,
                    format!("the certificate is for {}", cert.identity()),
                ));
            }
            StoreValue::Cert(cert)
        }
        StoreKey::NodeEndpoint(_) => {
            let e: NodeEndpoint = serde_json::from_slice(value)
                .map_err(|e| fail(IgnoreReason::BadValue, json_error(&e)))?;
            e.check().map_err(|m| fail(IgnoreReason::BadValue, m))?;
            StoreValue::Endpoint(e)
        }
        StoreKey::NodeStatus(_) => {
            let s: NodeStatus = serde_json::from_slice(value)
                .map_err(|e| fail(IgnoreReason::BadValue, json_error(&e)))?;
            s.check().map_err(|m| fail(IgnoreReason::BadValue, m))?;
            StoreValue::Status(s)
        }
        StoreKey::Policy | StoreKey::PolicyHistory(_) => {
            let doc = PolicyDoc::parse(value).map_err(|e| {
                let reason = match e {
                    SignedError::TooLarge { .. } => IgnoreReason::TooLarge,
                    _ => IgnoreReason::BadPolicyDocument,
                };
                fail(reason, e.to_string())
            })?;
            if let StoreKey::PolicyHistory(v) = k {
                if doc.version() != v {
                    return Err(fail(
                        IgnoreReason::VersionMismatch,
                        format!("the document is version {}", doc.version()),
                    ));
                }
            }
            StoreValue::Policy(doc)
        }
        StoreKey::Revocations => StoreValue::Revocations(value.to_vec()),
    };
    Ok(StoreEntry { key: k, value })
}

/// serde_json's message without its position (values are one line anyway).
fn json_error(e: &serde_json::Error) -> String {
    let m = e.to_string();
    match m.find(" at line ") {
        Some(i) => format!("not the expected JSON: {}", &m[..i]),
        None => format!("not the expected JSON: {m}"),
    }
}

/// A node's view of its store client, for `meshctl status` (`store` in its JSON).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreClientStatus {
    pub endpoints: Vec<String>,
    pub prefix: String,
    /// Whether the client holds a working connection (listed and watching).
    pub connected: bool,
    /// Since when `connected` has been what it is.
    pub since: UnixTime,
    /// Why the store was last unreachable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The last store revision seen (0: none yet).
    pub revision: i64,
    /// Full listings of the prefix: 1 at start, one more per resync.
    pub snapshots: u64,
    /// Entries ignored so far (each time one was read), by [`IgnoreReason`] name.
    pub ignored: BTreeMap<String, u64>,
}

/// What a node applied from the store and what it refused (the store is not trusted:
/// certificates and policy documents are verified first).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreApplied {
    /// The store policy document in force (0: none from the store).
    pub policy_version: u64,
    /// Peers in force that came from the store.
    pub peers: usize,
    /// Entries refused now, by key (`certs/<id>`, `policy/current`): the reason.
    pub refused: BTreeMap<String, String>,
    /// Refusals so far, by kind (`certificate`, `policy`); a value is counted once.
    pub refusals: BTreeMap<String, u64>,
}

/// `store` in `meshctl status`: the client's connection and what was applied.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreStatus {
    pub client: StoreClientStatus,
    pub applied: StoreApplied,
}

/// Encodes a value as it is stored (the inverse of [`decode`] for each kind).
pub fn encode(value: &StoreValue) -> Vec<u8> {
    match value {
        StoreValue::Cert(c) => c.as_pem().as_bytes().to_vec(),
        // Serializing these plain structs cannot fail.
        StoreValue::Endpoint(e) => serde_json::to_vec(e).unwrap_or_default(),
        StoreValue::Status(s) => serde_json::to_vec(s).unwrap_or_default(),
        StoreValue::Policy(d) => d.as_text().as_bytes().to_vec(),
        StoreValue::Revocations(b) => b.clone(),
    }
}

#[cfg(test)]
mod tests;
