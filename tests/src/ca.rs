//! A throwaway mesh CA per test, and the certificates the harness issues from it.
//! (Implemented on `proto::cert` once the certs branch lands.)

use std::net::IpAddr;

use anyhow::{bail, Result};

/// How long a leaf certificate is valid, relative to now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Validity {
    /// Valid from an hour ago for a day.
    Current,
    /// Expired: valid from two days ago until a day ago.
    Expired,
}

/// A mesh CA for one test (or an attacker's CA in an identity test).
pub struct TestCa {
    pub trust_domain: String,
}

/// A leaf certificate and its private key, both as file contents.
pub struct Issued {
    pub cert_pem: String,
    pub key_b64: String,
    pub public_key_b64: String,
}

impl TestCa {
    pub fn new(trust_domain: &str) -> Result<TestCa> {
        Ok(TestCa {
            trust_domain: trust_domain.to_string(),
        })
    }

    pub fn cert_pem(&self) -> String {
        String::new()
    }

    /// Issues a leaf for `identity` with host addresses `addresses` (/32, /128); with a
    /// fresh key pair, or for an existing public key (base64) when `public_key` is set.
    pub fn issue(
        &self,
        identity: &str,
        addresses: &[IpAddr],
        public_key: Option<&str>,
        validity: Validity,
    ) -> Result<Issued> {
        let _ = (identity, addresses, public_key, validity);
        bail!("proto::cert is not merged into this branch yet")
    }
}
