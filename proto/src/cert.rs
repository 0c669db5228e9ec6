//! Mesh certificates: a CA's signed statement that an x25519 key speaks for a SPIFFE
//! identity, with its overlay addresses and groups, for a window of time.
//!
//! # Format (version 1)
//! Armored text, one `key: value` line per field, so a certificate can be pasted into a
//! terminal, reviewed and diffed:
//! ```text
//! -----BEGIN MESH CERTIFICATE-----
//! version: 1
//! kind: leaf
//! identity: spiffe://t/a
//! addresses: 100.64.0.1/32 fd00:6d65:7368::1/128
//! groups: web
//! public_key: <x25519 key, base64>
//! not_before: 2026-11-26T06:17:57Z
//! not_after: 2027-11-26T06:17:57Z
//! serial: <32 hex digits>
//! issuer: <SHA-256 fingerprint of the CA certificate, hex>
//! signature: <ed25519 signature, base64>
//! -----END MESH CERTIFICATE-----
//! ```
//! A CA certificate has `kind: ca`, the identity `spiffe://<trust-domain>`,
//! `allowed_addresses:` and `allowed_groups:` (each `any` or a list) in place of
//! `addresses:` and `groups:`, an ed25519 public key and `issuer: self`.
//!
//! The signature is over [`SIGNATURE_CONTEXT`] followed by the exact stored body bytes
//! (from `version:` through the newline ending the `issuer:` line). Those bytes are
//! kept as read and never re-encoded; the parser accepts only the canonical spelling of
//! each value, so a certificate has exactly one text. Its [`Fingerprint`] is the SHA-256
//! of that text as [`Certificate::to_pem`] returns it (`sha256sum` of a file written by
//! `meshctl`).

mod ca;
pub(crate) mod text;

#[cfg(test)]
mod tests;

pub use ca::{Ca, CaParams, CaSigner, CaSigningKey, LeafParams, VerifiedCert, VerifyError};
pub use text::parse_time;

use crate::identity::SpiffeId;
use crate::time::UnixTime;
use ipnet::IpNet;
use sha2::{Digest, Sha256};
use std::fmt;

/// Allowed difference between our clock and the issuer's, in either direction.
pub const CLOCK_SKEW_SECS: u64 = 300;
/// The one encoding version this code writes and reads.
pub const CERT_VERSION: u32 = 1;
/// Domain separation: prefixed to the body before signing, so a mesh CA signature can
/// never be replayed as a signature over anything else.
pub const SIGNATURE_CONTEXT: &[u8] = b"meshd certificate v1\0";
/// Certificates larger than this are refused before parsing.
pub const MAX_CERT_LEN: usize = 64 * 1024;
/// Limits on list lengths and group names.
pub const MAX_ADDRESSES: usize = 256;
pub const MAX_GROUPS: usize = 256;
pub const MAX_GROUP_LEN: usize = 128;

const BEGIN: &str = "-----BEGIN MESH CERTIFICATE-----";
const END: &str = "-----END MESH CERTIFICATE-----";

/// What a certificate may be used for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CertKind {
    /// A mesh CA: signs leaves, never identifies a peer.
    Ca,
    /// A workload's certificate: identifies a peer, never signs.
    Leaf,
}

impl fmt::Display for CertKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CertKind::Ca => "ca",
            CertKind::Leaf => "leaf",
        })
    }
}

/// SHA-256 of a certificate's stored text. Display: lowercase hex.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    pub fn of(bytes: &[u8]) -> Fingerprint {
        Fingerprint(Sha256::digest(bytes).into())
    }

    /// Parses 64 lowercase hex digits.
    pub fn parse(s: &str) -> Option<Fingerprint> {
        text::parse_hex::<32>(s).map(Fingerprint)
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        text::write_hex(f, &self.0)
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

impl std::str::FromStr for Fingerprint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Fingerprint::parse(s)
            .ok_or_else(|| format!("{s:?} is not a SHA-256 fingerprint (64 lowercase hex digits)"))
    }
}

impl serde::Serialize for Fingerprint {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Fingerprint {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A certificate's serial number: 128 random bits. Display: lowercase hex.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Serial(pub [u8; 16]);

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        text::write_hex(f, &self.0)
    }
}

impl fmt::Debug for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Serial({self})")
    }
}

impl Serial {
    /// Parses 32 lowercase hex digits.
    pub fn parse(s: &str) -> Option<Serial> {
        text::parse_hex::<16>(s).map(Serial)
    }
}

impl std::str::FromStr for Serial {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Serial::parse(s).ok_or_else(|| format!("{s:?} is not a serial (32 lowercase hex digits)"))
    }
}

impl serde::Serialize for Serial {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Serial {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What a CA allows its leaves to claim. The trust domain is always constrained: a
/// leaf's identity must be in the CA's trust domain. An empty list means "any".
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CaConstraints {
    /// Every leaf address must lie inside one of these prefixes.
    pub addresses: Vec<IpNet>,
    /// Every leaf group must be one of these.
    pub groups: Vec<String>,
}

/// Why a leaf is outside its CA's constraints (at issue and at verification).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConstraintError {
    #[error("identity {identity} is outside the CA's trust domain {trust_domain}")]
    TrustDomain {
        identity: String,
        trust_domain: String,
    },
    #[error("address {address} is outside the CA's allowed addresses ({allowed})")]
    Address { address: IpNet, allowed: String },
    #[error("group {group:?} is not among the CA's allowed groups ({allowed})")]
    Group { group: String, allowed: String },
}

impl CaConstraints {
    /// Checks a leaf's claims against these constraints and the CA's trust domain.
    pub fn check(
        &self,
        ca_identity: &SpiffeId,
        identity: &SpiffeId,
        addresses: &[IpNet],
        groups: &[String],
    ) -> Result<(), ConstraintError> {
        if identity.trust_domain() != ca_identity.trust_domain() {
            return Err(ConstraintError::TrustDomain {
                identity: identity.to_string(),
                trust_domain: ca_identity.trust_domain().to_string(),
            });
        }
        if !self.addresses.is_empty() {
            for a in addresses {
                if !self.addresses.iter().any(|c| c.contains(a)) {
                    return Err(ConstraintError::Address {
                        address: *a,
                        allowed: text::join(&self.addresses),
                    });
                }
            }
        }
        if !self.groups.is_empty() {
            for g in groups {
                if !self.groups.contains(g) {
                    return Err(ConstraintError::Group {
                        group: g.clone(),
                        allowed: self.groups.join(" "),
                    });
                }
            }
        }
        Ok(())
    }
}

/// Why text is not a well-formed certificate, or a certificate cannot be issued.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("certificate is larger than {MAX_CERT_LEN} bytes")]
    TooLarge,
    #[error("not a mesh certificate: expected a line \"{BEGIN}\"")]
    NoBegin,
    #[error("certificate is truncated: no line \"{END}\"")]
    NoEnd,
    #[error("unexpected text after \"{END}\" (one certificate per file)")]
    TrailingData,
    #[error("certificate has CRLF line endings; convert them to LF (the signature covers the exact bytes)")]
    CarriageReturn,
    #[error("unsupported certificate version {0} (this build reads version {CERT_VERSION})")]
    UnsupportedVersion(String),
    #[error("certificate line {line}: {problem}")]
    Line { line: usize, problem: String },
    #[error("certificate line {line}, field {field}: {problem}")]
    Field {
        line: usize,
        field: &'static str,
        problem: String,
    },
    #[error("{0}")]
    Constraint(#[from] ConstraintError),
    #[error("{0}")]
    Invalid(String),
    #[error("the CA signing key does not match the CA certificate")]
    KeyMismatch,
    #[error("certificate for {0} is a leaf, not a CA: a leaf cannot sign")]
    NotCa(String),
    #[error("invalid CA key: {0}")]
    CaKey(String),
}

/// A parsed mesh certificate. Parsing checks form, not trust: use [`Ca::verify`] (or
/// [`Ca::new`] for a CA certificate) before believing it.
#[derive(Clone)]
pub struct Certificate {
    /// The stored text, exactly as read (plus one final newline).
    text: String,
    /// Byte range of the signed body within `text`.
    body: std::ops::Range<usize>,
    signature: [u8; 64],
    fingerprint: Fingerprint,
    kind: CertKind,
    identity: SpiffeId,
    addresses: Vec<IpNet>,
    groups: Vec<String>,
    constraints: Option<CaConstraints>,
    public_key: [u8; 32],
    not_before: UnixTime,
    not_after: UnixTime,
    serial: Serial,
    /// For a CA: its own fingerprint.
    issuer: Fingerprint,
}

impl Certificate {
    /// Parses one armored certificate. Whitespace around the block is ignored; inside
    /// it, every byte counts.
    pub fn from_pem(s: &str) -> Result<Certificate, CertError> {
        if s.len() > MAX_CERT_LEN {
            return Err(CertError::TooLarge);
        }
        let s = s.trim_matches(|c: char| c.is_ascii_whitespace());
        let rest = s
            .strip_prefix(BEGIN)
            .and_then(|r| r.strip_prefix('\n'))
            .ok_or(if s.contains(BEGIN) && s.contains('\r') {
                CertError::CarriageReturn
            } else {
                CertError::NoBegin
            })?;
        if s.contains('\r') {
            return Err(CertError::CarriageReturn);
        }
        let end = rest.find(END).ok_or(CertError::NoEnd)?;
        if end + END.len() != rest.len() {
            return Err(CertError::TrailingData);
        }
        let inner = &rest[..end];
        let text = format!("{s}\n");
        let inner_start = BEGIN.len() + 1;
        let parsed = text::parse_inner(inner)?;
        let body = inner_start..inner_start + parsed.body_len;
        let fingerprint = Fingerprint::of(text.as_bytes());
        let issuer = parsed.issuer.unwrap_or(fingerprint);
        Ok(Certificate {
            text,
            body,
            signature: parsed.signature,
            fingerprint,
            kind: parsed.kind,
            identity: parsed.identity,
            addresses: parsed.addresses,
            groups: parsed.groups,
            constraints: parsed.constraints,
            public_key: parsed.public_key,
            not_before: parsed.not_before,
            not_after: parsed.not_after,
            serial: parsed.serial,
            issuer,
        })
    }

    /// The stored text, byte for byte, ending in one newline.
    pub fn to_pem(&self) -> String {
        self.text.clone()
    }

    /// The stored text, borrowed.
    pub fn as_pem(&self) -> &str {
        &self.text
    }

    pub fn version(&self) -> u32 {
        CERT_VERSION
    }

    pub fn kind(&self) -> CertKind {
        self.kind
    }

    /// A leaf's workload identity; a CA's is `spiffe://<trust-domain>`.
    pub fn identity(&self) -> &SpiffeId {
        &self.identity
    }

    /// A leaf's overlay addresses (canonical prefixes); empty for a CA.
    pub fn addresses(&self) -> &[IpNet] {
        &self.addresses
    }

    /// A leaf's groups; empty for a CA.
    pub fn groups(&self) -> &[String] {
        &self.groups
    }

    /// A CA's constraints on its leaves; `None` for a leaf.
    pub fn ca_constraints(&self) -> Option<&CaConstraints> {
        self.constraints.as_ref()
    }

    /// Leaf: the x25519 key (WireGuard static key). CA: the ed25519 verifying key.
    pub fn public_key(&self) -> &[u8; 32] {
        &self.public_key
    }

    pub fn not_before(&self) -> UnixTime {
        self.not_before
    }

    pub fn not_after(&self) -> UnixTime {
        self.not_after
    }

    pub fn serial(&self) -> &Serial {
        &self.serial
    }

    /// The fingerprint of the CA certificate that signed this one (for a CA: its own).
    pub fn issuer(&self) -> &Fingerprint {
        &self.issuer
    }

    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// True when `now` is inside the validity window widened by [`CLOCK_SKEW_SECS`].
    pub fn is_valid_at(&self, now: UnixTime) -> bool {
        now.saturating_add(CLOCK_SKEW_SECS) >= self.not_before
            && now.saturating_sub(CLOCK_SKEW_SECS) <= self.not_after
    }

    /// The bytes the signature covers: [`SIGNATURE_CONTEXT`] then the stored body.
    pub(crate) fn signed_message(&self) -> Vec<u8> {
        signed_message(&self.text.as_bytes()[self.body.clone()])
    }

    pub(crate) fn signature(&self) -> &[u8; 64] {
        &self.signature
    }

    /// A plain summary for `meshctl cert show --json` and status output.
    pub fn summary(&self) -> CertSummary {
        CertSummary {
            version: CERT_VERSION,
            kind: self.kind,
            identity: self.identity.to_string(),
            addresses: self.addresses.iter().map(|a| a.to_string()).collect(),
            groups: self.groups.clone(),
            constraints: self.constraints.clone().map(|c| ConstraintsSummary {
                trust_domain: self.identity.trust_domain().to_string(),
                addresses: c.addresses.iter().map(|a| a.to_string()).collect(),
                groups: c.groups,
            }),
            public_key: text::b64(&self.public_key),
            not_before: self.not_before.to_string(),
            not_after: self.not_after.to_string(),
            not_before_unix: self.not_before.secs(),
            not_after_unix: self.not_after.secs(),
            serial: self.serial.to_string(),
            issuer: self.issuer.to_string(),
            fingerprint: self.fingerprint.to_string(),
        }
    }
}

pub(crate) fn signed_message(body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(SIGNATURE_CONTEXT.len() + body.len());
    m.extend_from_slice(SIGNATURE_CONTEXT);
    m.extend_from_slice(body);
    m
}

impl PartialEq for Certificate {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl Eq for Certificate {}

impl fmt::Debug for Certificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Certificate")
            .field("kind", &self.kind)
            .field("identity", &self.identity.to_string())
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl std::str::FromStr for Certificate {
    type Err = CertError;
    fn from_str(s: &str) -> Result<Self, CertError> {
        Certificate::from_pem(s)
    }
}

/// Serde: the armored text (as in the control API's `"cert":"<pem>"`).
impl serde::Serialize for Certificate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> serde::Deserialize<'de> for Certificate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Certificate::from_pem(&s).map_err(serde::de::Error::custom)
    }
}

/// A certificate's fields as plain values, for JSON output.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CertSummary {
    pub version: u32,
    pub kind: CertKind,
    pub identity: String,
    pub addresses: Vec<String>,
    pub groups: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub constraints: Option<ConstraintsSummary>,
    pub public_key: String,
    pub not_before: String,
    pub not_after: String,
    pub not_before_unix: u64,
    pub not_after_unix: u64,
    pub serial: String,
    pub issuer: String,
    pub fingerprint: String,
}

/// A CA's constraints for JSON output; empty lists mean "any".
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConstraintsSummary {
    pub trust_domain: String,
    pub addresses: Vec<String>,
    pub groups: Vec<String>,
}

/// Group names: 1..=128 bytes of ASCII letters, digits, `.`, `-`, `_`, `:`, `/`, `@`.
pub fn validate_group(g: &str) -> Result<(), String> {
    if g.is_empty() {
        return Err("group name is empty".into());
    }
    if g.len() > MAX_GROUP_LEN {
        return Err(format!("group name is longer than {MAX_GROUP_LEN} bytes"));
    }
    if let Some(c) = g
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '/' | '@')))
    {
        return Err(format!(
            "group {g:?}: only letters, digits and . - _ : / @ are allowed (found {c:?})"
        ));
    }
    Ok(())
}

/// An address or prefix as a certificate states it: canonical, host bits clear.
pub fn validate_address(a: &IpNet) -> Result<(), String> {
    if a.trunc() != *a {
        return Err(format!(
            "{a} has host bits set: write {} for the network or {}/{} for the address",
            a.trunc(),
            a.addr(),
            a.max_prefix_len()
        ));
    }
    Ok(())
}
