//! Test fakes for other crates' tests (feature `testing`): a fixed clock and a
//! throwaway CA that issues leaves in one line.
//!
//! ```
//! use mesh_proto::testing::{TestCa, NOW};
//! let ca = TestCa::new("t");
//! let (cert, key) = ca.leaf("spiffe://t/a", &["100.64.0.1/32", "fd00:6d65:7368::1/128"]);
//! assert!(ca.ca().verify(&cert, NOW).is_ok());
//! assert_eq!(cert.public_key(), key.public_key().as_bytes());
//! ```
//! Everything here panics on bad input: it is for tests only.

use crate::cert::{Ca, CaConstraints, CaParams, CaSigner, Certificate, LeafParams};
use crate::files;
use crate::identity::{SpiffeId, TrustDomain};
use crate::key::PrivateKey;
use crate::time::UnixTime;
use ipnet::IpNet;
use std::path::{Path, PathBuf};

/// A fixed "now" for tests: 2026-11-26T06:17:57Z.
pub const NOW: UnixTime = UnixTime(1_795_673_877);

const DAY: u64 = 86_400;

/// A CA valid from a year before its `now` ([`NOW`] unless made with
/// [`TestCa::new_at`]) to nine years after. Its leaves are issued relative to that
/// `now`.
pub struct TestCa {
    signer: CaSigner,
    now: UnixTime,
}

/// Parses `"100.64.0.1"` (a host) or `"100.64.0.0/24"` (a prefix).
pub fn net(s: &str) -> IpNet {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
        .unwrap_or_else(|e| panic!("bad test address {s:?}: {e}"))
}

impl TestCa {
    /// A fresh CA for trust domain `td`, around [`NOW`].
    pub fn new(td: &str) -> TestCa {
        TestCa::with_constraints(td, &[], &[])
    }

    /// A fresh CA around `now`: for tests that run real processes, which verify
    /// against the wall clock.
    pub fn new_at(td: &str, now: UnixTime) -> TestCa {
        TestCa::build(td, &[], &[], now)
    }

    /// A fresh CA whose leaves must lie in `addresses` and use only `groups`
    /// (empty: any).
    pub fn with_constraints(td: &str, addresses: &[&str], groups: &[&str]) -> TestCa {
        TestCa::build(td, addresses, groups, NOW)
    }

    fn build(td: &str, addresses: &[&str], groups: &[&str], now: UnixTime) -> TestCa {
        let params = CaParams {
            trust_domain: TrustDomain::parse(td).expect("test trust domain"),
            validity_secs: 10 * 365 * DAY,
            constraints: CaConstraints {
                addresses: addresses.iter().map(|a| net(a)).collect(),
                groups: groups.iter().map(|g| g.to_string()).collect(),
            },
        };
        let signer = CaSigner::init(params, now.saturating_sub(365 * DAY)).expect("test CA");
        TestCa { signer, now }
    }

    /// The time this CA's leaves are issued around.
    pub fn now(&self) -> UnixTime {
        self.now
    }

    pub fn signer(&self) -> &CaSigner {
        &self.signer
    }

    pub fn cert(&self) -> &Certificate {
        self.signer.cert()
    }

    /// The verifier for this CA.
    pub fn ca(&self) -> Ca {
        self.signer.ca()
    }

    /// A leaf valid from a day before `now` for a year, with a fresh key pair.
    pub fn leaf(&self, identity: &str, addresses: &[&str]) -> (Certificate, PrivateKey) {
        self.leaf_with_groups(identity, addresses, &[])
    }

    /// As [`TestCa::leaf`], with groups.
    pub fn leaf_with_groups(
        &self,
        identity: &str,
        addresses: &[&str],
        groups: &[&str],
    ) -> (Certificate, PrivateKey) {
        self.leaf_at(
            identity,
            addresses,
            groups,
            self.now.saturating_sub(DAY),
            365 * DAY,
        )
    }

    /// A leaf issued at `issued` for `validity_secs`.
    pub fn leaf_at(
        &self,
        identity: &str,
        addresses: &[&str],
        groups: &[&str],
        issued: UnixTime,
        validity_secs: u64,
    ) -> (Certificate, PrivateKey) {
        let key = PrivateKey::generate();
        let params = LeafParams {
            identity: SpiffeId::parse(identity).expect("test identity"),
            addresses: addresses.iter().map(|a| net(a)).collect(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            public_key: key.public_key(),
            validity_secs,
        };
        let cert = self.signer.issue(params, issued).expect("test leaf");
        (cert, key)
    }

    /// A leaf that expired a day before `now` (valid for one day, two days before).
    pub fn expired_leaf(&self, identity: &str, addresses: &[&str]) -> (Certificate, PrivateKey) {
        self.leaf_at(
            identity,
            addresses,
            &[],
            self.now.saturating_sub(2 * DAY),
            DAY,
        )
    }

    /// A leaf that becomes valid a day after `now`.
    pub fn future_leaf(&self, identity: &str, addresses: &[&str]) -> (Certificate, PrivateKey) {
        self.leaf_at(identity, addresses, &[], self.now.saturating_add(DAY), DAY)
    }

    /// A leaf for the same trust domain signed by a different, unrelated CA.
    pub fn foreign_leaf(&self, identity: &str, addresses: &[&str]) -> (Certificate, PrivateKey) {
        let other = TestCa::new_at(self.cert().identity().trust_domain().as_str(), self.now);
        other.leaf(identity, addresses)
    }

    /// Writes `ca.crt` and `ca.key` (0600) into `dir`; returns their paths.
    pub fn write_ca(&self, dir: &Path) -> (PathBuf, PathBuf) {
        let (crt, key) = (dir.join("ca.crt"), dir.join("ca.key"));
        files::write_certificate(&crt, self.cert()).expect("write test CA cert");
        files::write_ca_key(&key, self.signer.signing_key()).expect("write test CA key");
        (crt, key)
    }

    /// Issues a leaf and writes `<name>.crt` and `<name>.key` (0600) into `dir`;
    /// returns the paths and the certificate.
    pub fn write_leaf(
        &self,
        dir: &Path,
        name: &str,
        identity: &str,
        addresses: &[&str],
        groups: &[&str],
    ) -> (PathBuf, PathBuf, Certificate) {
        let (cert, key) = self.leaf_with_groups(identity, addresses, groups);
        let (crt_path, key_path) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        files::write_certificate(&crt_path, &cert).expect("write test leaf cert");
        files::write_private_key(&key_path, &key).expect("write test leaf key");
        (crt_path, key_path, cert)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fakes_behave_as_documented() {
        let ca = TestCa::new("t");
        let v = ca.ca();
        let (leaf, key) = ca.leaf("spiffe://t/a", &["100.64.0.1", "fd00:6d65:7368::1/128"]);
        assert_eq!(leaf.public_key(), key.public_key().as_bytes());
        assert_eq!(leaf.addresses()[0].to_string(), "100.64.0.1/32");
        assert!(v.verify(&leaf, NOW).is_ok());
        assert!(v
            .verify(&ca.expired_leaf("spiffe://t/a", &["100.64.0.1"]).0, NOW)
            .is_err());
        assert!(v
            .verify(&ca.future_leaf("spiffe://t/a", &["100.64.0.1"]).0, NOW)
            .is_err());
        assert!(v
            .verify(&ca.foreign_leaf("spiffe://t/a", &["100.64.0.1"]).0, NOW)
            .is_err());
        let later = UnixTime(NOW.secs() + 3 * 365 * DAY);
        let ca2 = TestCa::new_at("t", later);
        assert!(ca2
            .ca()
            .verify(&ca2.leaf("spiffe://t/a", &["100.64.0.1"]).0, later)
            .is_ok());
    }
}
