//! The mesh CA: issuing leaves ([`CaSigner`]) and verifying them ([`Ca`]).

use super::text::{self, Body};
use super::{
    signed_message, validate_address, validate_group, CaConstraints, CertError, CertKind,
    Certificate, ConstraintError, Fingerprint, Serial, BEGIN, END, MAX_ADDRESSES, MAX_GROUPS,
};
use crate::identity::{SpiffeId, TrustDomain};
use crate::key::PublicKey;
use crate::time::UnixTime;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use ipnet::IpNet;
use rand_core::{OsRng, RngCore as _};
use std::fmt;

const KEY_BEGIN: &str = "-----BEGIN MESH CA KEY-----";
const KEY_END: &str = "-----END MESH CA KEY-----";

/// What `CaSigner::init` needs to create a CA.
#[derive(Clone, Debug)]
pub struct CaParams {
    pub trust_domain: TrustDomain,
    /// The CA is valid from `now` for this many seconds.
    pub validity_secs: u64,
    /// Limits on the leaves it may issue (empty lists: any).
    pub constraints: CaConstraints,
}

/// What `CaSigner::issue` needs to create a leaf.
#[derive(Clone, Debug)]
pub struct LeafParams {
    pub identity: SpiffeId,
    /// Overlay addresses or prefixes, canonical (host bits clear); at least one.
    pub addresses: Vec<IpNet>,
    pub groups: Vec<String>,
    /// The workload's x25519 (WireGuard) public key.
    pub public_key: PublicKey,
    /// The leaf is valid from `now` for this many seconds, and never past its CA.
    pub validity_secs: u64,
}

/// A CA's ed25519 signing key. Debug never prints it; it is zeroed on drop.
#[derive(Clone)]
pub struct CaSigningKey(SigningKey);

impl CaSigningKey {
    pub fn generate() -> CaSigningKey {
        CaSigningKey(SigningKey::generate(&mut OsRng))
    }

    /// The matching ed25519 verifying key, as a CA certificate's `public_key`.
    pub fn public_key(&self) -> [u8; 32] {
        self.0.verifying_key().to_bytes()
    }

    /// Armored text: `-----BEGIN MESH CA KEY-----`, the 32-byte seed in base64, END.
    pub fn to_pem(&self) -> String {
        format!(
            "{KEY_BEGIN}\n{}\n{KEY_END}\n",
            text::b64(&self.0.to_bytes())
        )
    }

    pub fn from_pem(s: &str) -> Result<CaSigningKey, CertError> {
        let s = s.trim_matches(|c: char| c.is_ascii_whitespace());
        let inner = s
            .strip_prefix(KEY_BEGIN)
            .and_then(|r| r.strip_suffix(KEY_END))
            .ok_or_else(|| {
                CertError::CaKey(format!(
                    "expected a \"{KEY_BEGIN}\" ... \"{KEY_END}\" block"
                ))
            })?;
        let seed = text::parse_b64::<32>(inner.trim_matches(|c: char| c.is_ascii_whitespace()))
            .ok_or_else(|| CertError::CaKey("expected 32 bytes in base64".into()))?;
        Ok(CaSigningKey(SigningKey::from_bytes(&seed)))
    }
}

#[cfg(test)]
impl CaSigningKey {
    pub(super) fn inner(&self) -> &SigningKey {
        &self.0
    }
}

impl fmt::Debug for CaSigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CaSigningKey(public {})", text::b64(&self.public_key()))
    }
}

/// A CA certificate with its signing key: the only thing that issues certificates.
#[derive(Clone, Debug)]
pub struct CaSigner {
    cert: Certificate,
    key: CaSigningKey,
}

fn random_serial() -> Serial {
    let mut s = [0u8; 16];
    OsRng.fill_bytes(&mut s);
    Serial(s)
}

/// Signs `body` and wraps it in armor, then parses the result so that what we return
/// is exactly what a reader will see.
fn sign(key: &SigningKey, body: &str) -> Result<Certificate, CertError> {
    let sig: Signature = key.sign(&signed_message(body.as_bytes()));
    let pem = format!(
        "{BEGIN}\n{body}signature: {}\n{END}\n",
        text::b64(&sig.to_bytes())
    );
    Certificate::from_pem(&pem)
}

fn check_addresses(addresses: &[IpNet]) -> Result<(), CertError> {
    if addresses.len() > MAX_ADDRESSES {
        return Err(CertError::Invalid(format!(
            "more than {MAX_ADDRESSES} addresses"
        )));
    }
    for (i, a) in addresses.iter().enumerate() {
        validate_address(a).map_err(CertError::Invalid)?;
        if addresses[..i].contains(a) {
            return Err(CertError::Invalid(format!("address {a} is listed twice")));
        }
    }
    Ok(())
}

fn check_groups(groups: &[String]) -> Result<(), CertError> {
    if groups.len() > MAX_GROUPS {
        return Err(CertError::Invalid(format!("more than {MAX_GROUPS} groups")));
    }
    for (i, g) in groups.iter().enumerate() {
        validate_group(g).map_err(CertError::Invalid)?;
        if groups[..i].contains(g) {
            return Err(CertError::Invalid(format!("group {g:?} is listed twice")));
        }
    }
    Ok(())
}

impl CaSigner {
    /// Creates a new CA: a fresh ed25519 key and a self-signed CA certificate valid
    /// from `now` for `params.validity_secs`.
    pub fn init(params: CaParams, now: UnixTime) -> Result<CaSigner, CertError> {
        Self::init_with_key(params, CaSigningKey::generate(), now)
    }

    /// As [`CaSigner::init`], with a given key.
    pub fn init_with_key(
        params: CaParams,
        key: CaSigningKey,
        now: UnixTime,
    ) -> Result<CaSigner, CertError> {
        if params.validity_secs == 0 {
            return Err(CertError::Invalid("validity must be positive".into()));
        }
        check_addresses(&params.constraints.addresses)?;
        check_groups(&params.constraints.groups)?;
        let body = text::emit_body(&Body {
            kind: CertKind::Ca,
            identity: SpiffeId::for_trust_domain(&params.trust_domain),
            addresses: Vec::new(),
            groups: Vec::new(),
            constraints: Some(params.constraints),
            public_key: key.public_key(),
            not_before: now,
            not_after: now.saturating_add(params.validity_secs),
            serial: random_serial(),
            issuer: None,
        });
        let cert = sign(&key.0, &body)?;
        Ok(CaSigner { cert, key })
    }

    /// Pairs a CA certificate with its signing key (as loaded from `ca.crt`/`ca.key`).
    /// Refuses a leaf certificate and a key that does not match.
    pub fn from_parts(cert: Certificate, key: CaSigningKey) -> Result<CaSigner, CertError> {
        if cert.kind() != CertKind::Ca {
            return Err(CertError::NotCa(cert.identity().to_string()));
        }
        if cert.public_key() != &key.public_key() {
            return Err(CertError::KeyMismatch);
        }
        Ok(CaSigner { cert, key })
    }

    pub fn cert(&self) -> &Certificate {
        &self.cert
    }

    pub fn signing_key(&self) -> &CaSigningKey {
        &self.key
    }

    /// The verifier for this CA's certificates.
    pub fn ca(&self) -> Ca {
        Ca {
            cert: self.cert.clone(),
            key: self.key.0.verifying_key(),
        }
    }

    /// Issues a leaf valid from `now`. Refuses what verification would refuse: an
    /// identity outside the trust domain, addresses or groups outside the constraints,
    /// a validity window reaching past the CA's, a CA not valid at `now`.
    pub fn issue(&self, params: LeafParams, now: UnixTime) -> Result<Certificate, CertError> {
        let ca = &self.cert;
        if params.identity.is_trust_domain_id() {
            return Err(CertError::Invalid(format!(
                "identity {} has no path; a workload identity is spiffe://{}/<path>",
                params.identity,
                params.identity.trust_domain()
            )));
        }
        if params.addresses.is_empty() {
            return Err(CertError::Invalid(
                "a leaf needs at least one address".into(),
            ));
        }
        check_addresses(&params.addresses)?;
        check_groups(&params.groups)?;
        if params.validity_secs == 0 {
            return Err(CertError::Invalid("validity must be positive".into()));
        }
        if let Some(c) = ca.ca_constraints() {
            c.check(
                ca.identity(),
                &params.identity,
                &params.addresses,
                &params.groups,
            )?;
        }
        if now < ca.not_before() || now >= ca.not_after() {
            return Err(CertError::Invalid(format!(
                "the CA is valid from {} to {}, not at {now}",
                ca.not_before(),
                ca.not_after()
            )));
        }
        let not_after = now.saturating_add(params.validity_secs);
        if not_after > ca.not_after() {
            return Err(CertError::Invalid(format!(
                "the leaf would be valid until {not_after}, past the CA's expiry at {}; shorten the validity",
                ca.not_after()
            )));
        }
        let body = text::emit_body(&Body {
            kind: CertKind::Leaf,
            identity: params.identity,
            addresses: params.addresses,
            groups: params.groups,
            constraints: None,
            public_key: *params.public_key.as_bytes(),
            not_before: now,
            not_after,
            serial: random_serial(),
            issuer: Some(ca.fingerprint()),
        });
        sign(&self.key.0, &body)
    }
}

/// Why a certificate is not trusted. Each variant says exactly what failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("certificate for {0} is a leaf, not a CA: a leaf cannot sign")]
    NotCa(String),
    #[error("certificate for {0} is a CA certificate, not a leaf")]
    NotLeaf(String),
    #[error("CA certificate is not self-signed")]
    NotSelfSigned,
    #[error("CA certificate has an invalid ed25519 public key")]
    BadCaKey,
    #[error("signature does not verify under CA {ca}")]
    BadSignature { ca: Fingerprint },
    #[error("certificate was issued by {issuer}, not by this CA ({ca})")]
    WrongIssuer {
        issuer: Fingerprint,
        ca: Fingerprint,
    },
    #[error("certificate expired at {0}")]
    Expired(UnixTime),
    #[error("certificate is not valid before {0}")]
    NotYetValid(UnixTime),
    #[error("CA certificate expired at {0}")]
    CaExpired(UnixTime),
    #[error("CA certificate is not valid before {0}")]
    CaNotYetValid(UnixTime),
    #[error("certificate is valid until {leaf}, past its CA's expiry at {ca}")]
    OutlivesCa { leaf: UnixTime, ca: UnixTime },
    #[error("{0}")]
    Constraint(#[from] ConstraintError),
}

/// A trusted CA certificate: verifies leaves. Holds no secret.
#[derive(Clone, Debug)]
pub struct Ca {
    cert: Certificate,
    key: VerifyingKey,
}

/// A leaf that [`Ca::verify`] accepted at some `now`. Derefs to the certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedCert(Certificate);

impl VerifiedCert {
    pub fn into_inner(self) -> Certificate {
        self.0
    }

    /// The leaf's x25519 key as a WireGuard public key.
    pub fn wg_public_key(&self) -> PublicKey {
        PublicKey::from_bytes(*self.0.public_key())
    }
}

impl std::ops::Deref for VerifiedCert {
    type Target = Certificate;
    fn deref(&self) -> &Certificate {
        &self.0
    }
}

fn check_window(
    cert: &Certificate,
    now: UnixTime,
    expired: fn(UnixTime) -> VerifyError,
    early: fn(UnixTime) -> VerifyError,
) -> Result<(), VerifyError> {
    if now.saturating_add(super::CLOCK_SKEW_SECS) < cert.not_before() {
        return Err(early(cert.not_before()));
    }
    if now.saturating_sub(super::CLOCK_SKEW_SECS) > cert.not_after() {
        return Err(expired(cert.not_after()));
    }
    Ok(())
}

impl Ca {
    /// Accepts a self-signed CA certificate (its signature checks under its own key).
    /// Validity is checked per verification, against that call's `now`.
    pub fn new(cert: Certificate) -> Result<Ca, VerifyError> {
        if cert.kind() != CertKind::Ca {
            return Err(VerifyError::NotCa(cert.identity().to_string()));
        }
        if cert.issuer() != &cert.fingerprint() {
            return Err(VerifyError::NotSelfSigned);
        }
        let key = VerifyingKey::from_bytes(cert.public_key()).map_err(|_| VerifyError::BadCaKey)?;
        let sig = Signature::from_bytes(cert.signature());
        key.verify_strict(&cert.signed_message(), &sig)
            .map_err(|_| VerifyError::BadSignature {
                ca: cert.fingerprint(),
            })?;
        Ok(Ca { cert, key })
    }

    pub fn cert(&self) -> &Certificate {
        &self.cert
    }

    pub fn fingerprint(&self) -> Fingerprint {
        self.cert.fingerprint()
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        self.cert.identity().trust_domain()
    }

    /// Verifies a leaf at `now`: kind, issuer, signature, the CA's and the leaf's
    /// validity windows (each widened by `CLOCK_SKEW_SECS`), and the CA's constraints.
    pub fn verify(&self, leaf: &Certificate, now: UnixTime) -> Result<VerifiedCert, VerifyError> {
        if leaf.kind() != CertKind::Leaf {
            return Err(VerifyError::NotLeaf(leaf.identity().to_string()));
        }
        if leaf.issuer() != &self.cert.fingerprint() {
            return Err(VerifyError::WrongIssuer {
                issuer: *leaf.issuer(),
                ca: self.cert.fingerprint(),
            });
        }
        let sig = Signature::from_bytes(leaf.signature());
        self.key
            .verify_strict(&leaf.signed_message(), &sig)
            .map_err(|_| VerifyError::BadSignature {
                ca: self.cert.fingerprint(),
            })?;
        check_window(
            &self.cert,
            now,
            VerifyError::CaExpired,
            VerifyError::CaNotYetValid,
        )?;
        check_window(leaf, now, VerifyError::Expired, VerifyError::NotYetValid)?;
        if leaf.not_after() > self.cert.not_after() {
            return Err(VerifyError::OutlivesCa {
                leaf: leaf.not_after(),
                ca: self.cert.not_after(),
            });
        }
        if let Some(c) = self.cert.ca_constraints() {
            c.check(
                self.cert.identity(),
                leaf.identity(),
                leaf.addresses(),
                leaf.groups(),
            )?;
        }
        Ok(VerifiedCert(leaf.clone()))
    }
}
