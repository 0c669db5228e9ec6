//! Signed policy documents: how policy travels through a store that is not trusted.
//!
//! Whoever can write to the fleet store (etcd) must not be able to widen a policy
//! (DESIGN.md, "The mesh around the host"). So the store never holds a bare policy
//! file: it holds a document that an operator's **policy signing key** (ed25519,
//! `meshctl policy key gen`) signed, and each meshd accepts only documents signed by a
//! key its `meshd.toml` names (`[store] policy_keys`), for its own trust domain, with a
//! version number above the one in force. Rolling back is publishing a *new* version
//! whose content is an old one, so a replayed old document is always refused.
//!
//! # Format (version 1)
//! Armored text like the certificates ([`crate::cert`]), so a document can be read with
//! `etcdctl get`, reviewed and diffed; the policy itself is carried verbatim:
//! ```text
//! -----BEGIN MESH POLICY DOCUMENT-----
//! version: 1
//! trust_domain: example.org
//! policy_version: 7
//! issued_at: 2026-12-08T10:00:00Z
//! signer: <key id: SHA-256 of the signer's ed25519 public key, hex>
//! name: policy.toml
//! policy_length: 1234
//! <exactly policy_length bytes of policy TOML, ending in a newline>
//! signature: <ed25519 signature, base64>
//! -----END MESH POLICY DOCUMENT-----
//! ```
//! The policy is delimited by its length, not by a marker, so no text inside it (not
//! even an armor line) can end it early. The signature is over
//! [`POLICY_SIGNATURE_CONTEXT`] followed by the exact stored body bytes (from
//! `version:` through the newline ending the policy); the parser accepts only the
//! canonical spelling of each header value, so a document has exactly one text.
//!
//! # Keys
//! A signing key is `-----BEGIN MESH POLICY KEY-----`, the 32-byte ed25519 seed in
//! base64, `-----END MESH POLICY KEY-----` (mode 0600, like the CA key); its public
//! half is the same shape with `MESH POLICY PUBLIC KEY`. The armor names the purpose,
//! so neither can be mistaken for a WireGuard key or a CA key.
//!
//! Pure: `now` is an argument; nothing here reads a clock or a file.

use crate::cert::text::{b64, parse_b64, parse_time};
use crate::cert::{Fingerprint, CLOCK_SKEW_SECS};
use crate::identity::TrustDomain;
use crate::policy::{self, DefaultAction, PolicyError};
use crate::time::UnixTime;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use rand_core::OsRng;
use std::fmt::{self, Write as _};

/// The one document encoding this code writes and reads.
pub const POLICY_DOC_VERSION: u32 = 1;
/// Domain separation: prefixed to the body before signing, so a policy signature can
/// never be replayed as a signature over a certificate or anything else.
pub const POLICY_SIGNATURE_CONTEXT: &[u8] = b"meshd policy document v1\0";
/// Documents larger than this are refused before parsing. `meshctl policy publish`
/// writes a document twice in one etcd transaction (the current one and its history
/// entry), and etcd refuses requests above 1.5 MiB by default (`--max-request-bytes`):
/// 512 KiB leaves room for both. Roughly 3,000 rules.
pub const MAX_POLICY_DOC_LEN: usize = 512 * 1024;
/// Longest `name:` value (the policy's file name, used in error messages).
pub const MAX_NAME_LEN: usize = 255;

const BEGIN: &str = "-----BEGIN MESH POLICY DOCUMENT-----";
const END: &str = "-----END MESH POLICY DOCUMENT-----";
const KEY_BEGIN: &str = "-----BEGIN MESH POLICY KEY-----";
const KEY_END: &str = "-----END MESH POLICY KEY-----";
const PUB_BEGIN: &str = "-----BEGIN MESH POLICY PUBLIC KEY-----";
const PUB_END: &str = "-----END MESH POLICY PUBLIC KEY-----";

/// Why a document or a key is refused. Display is one line an operator can act on.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SignedError {
    #[error("policy document is {len} bytes, larger than the limit of {MAX_POLICY_DOC_LEN}")]
    TooLarge { len: usize },
    #[error("not a signed policy document (expected \"{BEGIN}\" ... \"signature: ...\"); publish policy with `meshctl policy publish FILE --key KEY`")]
    Unsigned,
    #[error("policy document is not UTF-8 text")]
    NotText,
    #[error("policy document is truncated: no line \"{END}\"")]
    NoEnd,
    #[error(
        "unsupported policy document version {0} (this build reads version {POLICY_DOC_VERSION})"
    )]
    UnsupportedVersion(String),
    #[error("policy document line {line}: {problem}")]
    Line { line: usize, problem: String },
    #[error("policy document line {line}, field {field}: {problem}")]
    Field {
        line: usize,
        field: &'static str,
        problem: String,
    },
    #[error("policy document is for trust domain {doc}, not {ours}")]
    WrongTrustDomain { doc: String, ours: String },
    #[error("policy document is signed by key {0}, which is not among the accepted policy keys ([store] policy_keys)")]
    UnknownSigner(Fingerprint),
    #[error("policy document signature does not verify under key {0}")]
    BadSignature(Fingerprint),
    #[error("policy document version {version} is not newer than version {current} in force (a rollback is published as a new version)")]
    NotNewer { version: u64, current: u64 },
    #[error("policy document was issued at {issued_at}, after now ({now}) plus {CLOCK_SKEW_SECS} s of clock skew; check the publisher's clock")]
    FromTheFuture { issued_at: UnixTime, now: UnixTime },
    #[error("policy document version {version}: {source}")]
    InvalidPolicy { version: u64, source: PolicyError },
    #[error("policy document version {version}: {summary}")]
    TestsFailed { version: u64, summary: String },
    #[error("{0}")]
    Invalid(String),
    #[error("invalid policy key: {0}")]
    Key(String),
}

fn field_err(line: usize, field: &'static str, problem: impl Into<String>) -> SignedError {
    SignedError::Field {
        line,
        field,
        problem: problem.into(),
    }
}

/// The key id of an ed25519 public key: the SHA-256 of its 32 bytes.
fn key_id(public: &[u8; 32]) -> Fingerprint {
    Fingerprint::of(public)
}

/// Reads the 32 bytes between two armor lines.
fn unarmor(s: &str, begin: &str, end: &str) -> Result<[u8; 32], SignedError> {
    let s = s.trim_matches(|c: char| c.is_ascii_whitespace());
    let inner = s
        .strip_prefix(begin)
        .and_then(|r| r.strip_suffix(end))
        .ok_or_else(|| SignedError::Key(format!("expected a \"{begin}\" ... \"{end}\" block")))?;
    parse_b64::<32>(inner.trim_matches(|c: char| c.is_ascii_whitespace()))
        .ok_or_else(|| SignedError::Key("expected 32 bytes in base64".into()))
}

/// An operator's ed25519 policy signing key. Debug never prints it; zeroed on drop.
#[derive(Clone)]
pub struct PolicySigningKey(SigningKey);

impl PolicySigningKey {
    pub fn generate() -> PolicySigningKey {
        PolicySigningKey(SigningKey::generate(&mut OsRng))
    }

    pub fn public_key(&self) -> PolicyPublicKey {
        PolicyPublicKey(self.0.verifying_key())
    }

    /// Armored text: `-----BEGIN MESH POLICY KEY-----`, the seed in base64, END.
    pub fn to_pem(&self) -> String {
        format!("{KEY_BEGIN}\n{}\n{KEY_END}\n", b64(&self.0.to_bytes()))
    }

    pub fn from_pem(s: &str) -> Result<PolicySigningKey, SignedError> {
        unarmor(s, KEY_BEGIN, KEY_END).map(|seed| PolicySigningKey(SigningKey::from_bytes(&seed)))
    }
}

impl fmt::Debug for PolicySigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PolicySigningKey(id {})", self.public_key().id())
    }
}

/// A policy public key: what `[store] policy_keys` names. Holds no secret.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PolicyPublicKey(VerifyingKey);

impl PolicyPublicKey {
    /// The key id written in each document's `signer:` line.
    pub fn id(&self) -> Fingerprint {
        key_id(self.0.as_bytes())
    }

    pub fn to_pem(&self) -> String {
        format!("{PUB_BEGIN}\n{}\n{PUB_END}\n", b64(self.0.as_bytes()))
    }

    pub fn from_pem(s: &str) -> Result<PolicyPublicKey, SignedError> {
        let bytes = unarmor(s, PUB_BEGIN, PUB_END)?;
        VerifyingKey::from_bytes(&bytes)
            .map(PolicyPublicKey)
            .map_err(|_| SignedError::Key("not a valid ed25519 public key".into()))
    }
}

impl fmt::Debug for PolicyPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PolicyPublicKey(id {})", self.id())
    }
}

/// What a node accepts: documents for its trust domain, signed by one of its keys.
#[derive(Clone, Debug)]
pub struct PolicyTrust {
    pub trust_domain: TrustDomain,
    pub keys: Vec<PolicyPublicKey>,
}

/// What [`PolicyDoc::sign`] needs.
#[derive(Clone, Debug)]
pub struct DocParams<'a> {
    pub trust_domain: &'a TrustDomain,
    /// Must be above the version in force (1 for the first document).
    pub version: u64,
    pub issued_at: UnixTime,
    /// The policy's file name (error messages point into it).
    pub name: &'a str,
    /// The policy TOML. A final newline is added if it has none.
    pub policy: &'a str,
}

/// A parsed policy document. Parsing checks form, not trust: use [`PolicyDoc::verify`]
/// (or [`verify`]) before believing it.
#[derive(Clone, PartialEq, Eq)]
pub struct PolicyDoc {
    /// The stored text, exactly as read (plus one final newline).
    text: String,
    /// Byte range of the signed body within `text`.
    body: std::ops::Range<usize>,
    /// Byte range of the policy within `text`.
    policy: std::ops::Range<usize>,
    trust_domain: TrustDomain,
    version: u64,
    issued_at: UnixTime,
    signer: Fingerprint,
    name: String,
    signature: [u8; 64],
}

impl fmt::Debug for PolicyDoc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PolicyDoc")
            .field("version", &self.version)
            .field("trust_domain", &self.trust_domain.as_str())
            .field("signer", &self.signer)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!("must be 1 to {MAX_NAME_LEN} bytes"));
    }
    if name.trim() != name || name.chars().any(char::is_control) {
        return Err("may not start or end with spaces or contain control characters".into());
    }
    Ok(())
}

impl PolicyDoc {
    /// Signs a policy as document `params.version`. Refuses what [`verify`] would
    /// refuse for its form (an empty or odd name, a version 0, a document over
    /// [`MAX_POLICY_DOC_LEN`]); checking the policy itself is the caller's job
    /// (`meshctl policy publish` parses it and runs its tests first).
    pub fn sign(key: &PolicySigningKey, params: &DocParams<'_>) -> Result<PolicyDoc, SignedError> {
        check_name(params.name).map_err(|e| SignedError::Invalid(format!("name {e}")))?;
        if params.version == 0 {
            return Err(SignedError::Invalid(
                "policy versions start at 1".to_string(),
            ));
        }
        let mut policy = params.policy.to_string();
        if !policy.is_empty() && !policy.ends_with('\n') {
            policy.push('\n');
        }
        let mut body = String::new();
        let _ = writeln!(body, "version: {POLICY_DOC_VERSION}");
        let _ = writeln!(body, "trust_domain: {}", params.trust_domain);
        let _ = writeln!(body, "policy_version: {}", params.version);
        let _ = writeln!(body, "issued_at: {}", params.issued_at);
        let _ = writeln!(body, "signer: {}", key.public_key().id());
        let _ = writeln!(body, "name: {}", params.name);
        let _ = writeln!(body, "policy_length: {}", policy.len());
        body.push_str(&policy);
        let sig: Signature = key.0.sign(&signed_message(body.as_bytes()));
        let text = format!(
            "{BEGIN}\n{body}signature: {}\n{END}\n",
            b64(&sig.to_bytes())
        );
        if text.len() > MAX_POLICY_DOC_LEN {
            return Err(SignedError::TooLarge { len: text.len() });
        }
        // What we return is exactly what a reader will see.
        PolicyDoc::parse(text.as_bytes())
    }

    /// Parses one armored document. Whitespace around the block is ignored; inside
    /// it, every byte counts.
    pub fn parse(bytes: &[u8]) -> Result<PolicyDoc, SignedError> {
        if bytes.len() > MAX_POLICY_DOC_LEN {
            return Err(SignedError::TooLarge { len: bytes.len() });
        }
        let s = std::str::from_utf8(bytes).map_err(|_| {
            // Plain policy TOML is UTF-8 too; binary garbage is neither.
            SignedError::NotText
        })?;
        let s = s.trim_matches(|c: char| c.is_ascii_whitespace());
        let Some(rest) = s.strip_prefix(BEGIN).and_then(|r| r.strip_prefix('\n')) else {
            return Err(SignedError::Unsigned);
        };
        let text = format!("{s}\n");
        let body_start = BEGIN.len() + 1;
        let mut l = Lines {
            rest,
            consumed: 0,
            line: 1,
        };
        let (_, version) = l.field("version")?;
        if version != POLICY_DOC_VERSION.to_string() {
            return Err(SignedError::UnsupportedVersion(version.to_owned()));
        }
        let (n, td) = l.field("trust_domain")?;
        let trust_domain =
            TrustDomain::parse(td).map_err(|e| field_err(n, "trust_domain", e.to_string()))?;
        let (n, v) = l.field("policy_version")?;
        let version = parse_u64(v).filter(|v| *v > 0).ok_or_else(|| {
            field_err(
                n,
                "policy_version",
                "expected a number from 1, no leading zeros",
            )
        })?;
        let (n, t) = l.field("issued_at")?;
        let issued_at = parse_time(t).ok_or_else(|| {
            field_err(
                n,
                "issued_at",
                "expected a UTC time like 2026-11-26T06:17:57Z",
            )
        })?;
        let (n, signer) = l.field("signer")?;
        let signer = Fingerprint::parse(signer)
            .ok_or_else(|| field_err(n, "signer", "expected a key id (64 lowercase hex digits)"))?;
        let (n, name) = l.field("name")?;
        check_name(name).map_err(|e| field_err(n, "name", e))?;
        let name = name.to_owned();
        let (n, len) = l.field("policy_length")?;
        let len = parse_u64(len)
            .and_then(|v| usize::try_from(v).ok())
            .ok_or_else(|| field_err(n, "policy_length", "expected a number of bytes"))?;
        let policy_start = body_start + l.consumed;
        let Some(policy) = l.rest.get(..len) else {
            return Err(field_err(
                n,
                "policy_length",
                format!("{len} bytes announced; the policy that follows is shorter"),
            ));
        };
        if !policy.is_empty() && !policy.ends_with('\n') {
            return Err(field_err(
                n,
                "policy_length",
                format!("the {len} bytes announced do not end a line"),
            ));
        }
        l.line += policy.bytes().filter(|&b| b == b'\n').count();
        l.rest = &l.rest[len..];
        l.consumed += len;
        let body = body_start..body_start + l.consumed;
        // The trimmed text ends with END: what is left is the signature line and END.
        if l.rest == END {
            return Err(SignedError::Unsigned);
        }
        if !l.rest.ends_with(END) {
            return Err(SignedError::NoEnd);
        }
        if !l.rest.starts_with("signature:") {
            return Err(SignedError::Line {
                line: l.line + 1,
                problem:
                    "expected \"signature: ...\" right after the policy (is policy_length right?)"
                        .into(),
            });
        }
        let (n, sig) = l.field("signature")?;
        let signature = parse_b64::<64>(sig)
            .ok_or_else(|| field_err(n, "signature", "expected 64 bytes in base64"))?;
        if l.rest != END {
            return Err(SignedError::Line {
                line: n + 1,
                problem: format!("expected \"{END}\" and nothing after it"),
            });
        }
        Ok(PolicyDoc {
            text,
            body,
            policy: policy_start..policy_start + len,
            trust_domain,
            version,
            issued_at,
            signer,
            name,
            signature,
        })
    }

    /// Checks that this document may replace the policy in force: for `trust`'s trust
    /// domain, signed by one of its keys, newer than `current_version` (0: none yet),
    /// not issued after `now` (plus clock skew), and a valid policy whose `[[test]]`
    /// cases pass under the node's `default`, as `meshctl policy apply` requires.
    /// Returns the compiled policy, ready to swap in.
    pub fn verify(
        self,
        trust: &PolicyTrust,
        current_version: u64,
        default: DefaultAction,
        now: UnixTime,
    ) -> Result<VerifiedPolicyDoc, SignedError> {
        self.check_signature(trust)?;
        if self.version <= current_version {
            return Err(SignedError::NotNewer {
                version: self.version,
                current: current_version,
            });
        }
        if self.issued_at > now.saturating_add(CLOCK_SKEW_SECS) {
            return Err(SignedError::FromTheFuture {
                issued_at: self.issued_at,
                now,
            });
        }
        let loaded = policy::load(&self.name, self.policy(), default).map_err(|source| {
            SignedError::InvalidPolicy {
                version: self.version,
                source,
            }
        })?;
        if let Some(summary) = loaded.failure_summary() {
            return Err(SignedError::TestsFailed {
                version: self.version,
                summary,
            });
        }
        Ok(VerifiedPolicyDoc { doc: self, loaded })
    }

    /// Only the trust domain, signer and signature: for reading history, where older
    /// versions are expected. [`PolicyDoc::verify`] is the check before applying.
    pub fn check_signature(&self, trust: &PolicyTrust) -> Result<(), SignedError> {
        if self.trust_domain != trust.trust_domain {
            return Err(SignedError::WrongTrustDomain {
                doc: self.trust_domain.to_string(),
                ours: trust.trust_domain.to_string(),
            });
        }
        let key = trust
            .keys
            .iter()
            .find(|k| k.id() == self.signer)
            .ok_or(SignedError::UnknownSigner(self.signer))?;
        let sig = Signature::from_bytes(&self.signature);
        key.0
            .verify_strict(
                &signed_message(&self.text.as_bytes()[self.body.clone()]),
                &sig,
            )
            .map_err(|_| SignedError::BadSignature(self.signer))
    }

    /// The stored text, byte for byte, ending in one newline.
    pub fn as_text(&self) -> &str {
        &self.text
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The document's number: each published document's is one above the last.
    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn issued_at(&self) -> UnixTime {
        self.issued_at
    }

    /// The id of the key that signed it.
    pub fn signer(&self) -> Fingerprint {
        self.signer
    }

    /// The policy's file name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The policy TOML, exactly as signed.
    pub fn policy(&self) -> &str {
        &self.text[self.policy.clone()]
    }

    /// SHA-256 of the policy TOML: equal for a rollback and the version it restores.
    pub fn policy_digest(&self) -> Fingerprint {
        Fingerprint::of(self.policy().as_bytes())
    }
}

/// Parses and verifies a document read from the store: [`PolicyDoc::parse`] then
/// [`PolicyDoc::verify`]. This is the whole of the daemon's check.
pub fn verify(
    bytes: &[u8],
    trust: &PolicyTrust,
    current_version: u64,
    default: DefaultAction,
    now: UnixTime,
) -> Result<VerifiedPolicyDoc, SignedError> {
    PolicyDoc::parse(bytes)?.verify(trust, current_version, default, now)
}

/// A document [`verify`] accepted, with its policy compiled under the node's default.
#[derive(Debug)]
pub struct VerifiedPolicyDoc {
    doc: PolicyDoc,
    loaded: policy::Loaded,
}

impl VerifiedPolicyDoc {
    pub fn doc(&self) -> &PolicyDoc {
        &self.doc
    }

    /// The compiled policy, its warnings and its test results.
    pub fn loaded(&self) -> &policy::Loaded {
        &self.loaded
    }

    pub fn into_parts(self) -> (PolicyDoc, policy::Loaded) {
        (self.doc, self.loaded)
    }
}

impl std::ops::Deref for VerifiedPolicyDoc {
    type Target = PolicyDoc;
    fn deref(&self) -> &PolicyDoc {
        &self.doc
    }
}

fn signed_message(body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(POLICY_SIGNATURE_CONTEXT.len() + body.len());
    m.extend_from_slice(POLICY_SIGNATURE_CONTEXT);
    m.extend_from_slice(body);
    m
}

/// A decimal number in its one spelling (no sign, no leading zeros).
fn parse_u64(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || (s.len() > 1 && s.starts_with('0'))
    {
        return None;
    }
    s.parse().ok()
}

/// Reads the header lines in their fixed order. Line numbers count from the `BEGIN`
/// line as line 1.
struct Lines<'a> {
    rest: &'a str,
    consumed: usize,
    line: usize,
}

impl<'a> Lines<'a> {
    /// The value of the next line, which must be `name: value`.
    fn field(&mut self, name: &'static str) -> Result<(usize, &'a str), SignedError> {
        self.line += 1;
        let n = self.line;
        let Some(nl) = self.rest.find('\n') else {
            // The trimmed text ends with END, so the last line is END or a cut one.
            return Err(if self.rest == END {
                SignedError::Line {
                    line: n,
                    problem: format!("expected field {name:?}, found the end of the document"),
                }
            } else {
                SignedError::NoEnd
            });
        };
        let text = &self.rest[..nl];
        let Some((key, value)) = text.split_once(':') else {
            return Err(SignedError::Line {
                line: n,
                problem: format!("expected \"{name}: ...\", found {text:?}"),
            });
        };
        if key != name {
            return Err(SignedError::Line {
                line: n,
                problem: format!("expected field {name:?}, found {key:?}"),
            });
        }
        self.rest = &self.rest[nl + 1..];
        self.consumed += nl + 1;
        match value.strip_prefix(' ') {
            Some(v) if !v.is_empty() && v.trim() == v => Ok((n, v)),
            _ => Err(field_err(
                n,
                name,
                "write \"name: value\" with exactly one space and no trailing space",
            )),
        }
    }
}

#[cfg(test)]
mod tests;
