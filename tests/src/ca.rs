//! A throwaway mesh CA per test, and the certificates the harness issues from it, made
//! with `proto::cert` in-process (the same code `meshctl ca`/`cert` runs).

use std::net::IpAddr;

use anyhow::{Context, Result};
use ipnet::IpNet;
use mesh_proto::cert::{CaConstraints, CaParams, CaSigner, Certificate, LeafParams};
use mesh_proto::identity::{SpiffeId, TrustDomain};
use mesh_proto::key::{PrivateKey, PublicKey};
use mesh_proto::time::UnixTime;

const HOUR: u64 = 3600;
const DAY: u64 = 24 * HOUR;

/// How long a leaf certificate is valid, relative to now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Validity {
    /// Valid from an hour ago for a day.
    Current,
    /// Expired: valid from two days ago until a day ago.
    Expired,
    /// Valid from an hour ago until this many seconds from now (inside its renewal
    /// notice from the start, for less than about 12 minutes).
    EndsIn(u64),
}

/// A mesh CA for one test (or an outsider's CA in an identity test). The CA is valid
/// from a week ago for a year, so expired leaves can still be issued under it.
pub struct TestCa {
    signer: CaSigner,
}

/// A leaf certificate and its private key, as file contents.
pub struct Issued {
    pub cert: Certificate,
    pub cert_pem: String,
    pub key_b64: String,
    pub public_key_b64: String,
}

impl TestCa {
    pub fn new(trust_domain: &str) -> Result<TestCa> {
        let params = CaParams {
            trust_domain: TrustDomain::parse(trust_domain)
                .with_context(|| format!("trust domain {trust_domain:?}"))?,
            validity_secs: 365 * DAY,
            constraints: CaConstraints::default(),
        };
        let signer = CaSigner::init(params, now().saturating_sub(7 * DAY))?;
        Ok(TestCa { signer })
    }

    pub fn cert_pem(&self) -> String {
        self.signer.cert().to_pem()
    }

    /// Issues a leaf for `identity` with host addresses `addresses` (/32, /128) and
    /// `groups`; with a fresh key pair, or for an existing public key (base64) when
    /// `public_key` is set (then `key_b64` is empty).
    pub fn issue(
        &self,
        identity: &str,
        addresses: &[IpAddr],
        groups: &[String],
        public_key: Option<&str>,
        validity: Validity,
    ) -> Result<Issued> {
        let nets: Vec<IpNet> = addresses.iter().map(|a| IpNet::from(*a)).collect();
        self.issue_nets(identity, &nets, groups, public_key, validity)
    }

    /// [`TestCa::issue`] for any prefixes (`100.64.0.0/24`), not only host addresses.
    pub fn issue_nets(
        &self,
        identity: &str,
        addresses: &[IpNet],
        groups: &[String],
        public_key: Option<&str>,
        validity: Validity,
    ) -> Result<Issued> {
        let (private, public) = match public_key {
            Some(b64) => (None, PublicKey::from_base64(b64).context("public key")?),
            None => {
                let k = PrivateKey::generate();
                let p = k.public_key();
                (Some(k), p)
            }
        };
        let (issued_at, validity_secs) = match validity {
            Validity::Current => (now().saturating_sub(HOUR), DAY),
            Validity::Expired => (now().saturating_sub(2 * DAY), DAY),
            Validity::EndsIn(secs) => (now().saturating_sub(HOUR), HOUR + secs),
        };
        let params = LeafParams {
            identity: SpiffeId::parse(identity)
                .with_context(|| format!("identity {identity:?}"))?,
            addresses: addresses.to_vec(),
            groups: groups.to_vec(),
            public_key: public,
            validity_secs,
        };
        let cert = self
            .signer
            .issue(params, issued_at)
            .with_context(|| format!("issuing a certificate for {identity}"))?;
        Ok(Issued {
            cert_pem: cert.to_pem(),
            cert,
            key_b64: private.map(|k| k.to_base64()).unwrap_or_default(),
            public_key_b64: public.to_base64(),
        })
    }
}

#[allow(clippy::disallowed_methods)] // certificates for real daemons use the real clock.
fn now() -> UnixTime {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    UnixTime(secs)
}
