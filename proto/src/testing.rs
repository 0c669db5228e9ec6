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
use crate::identity::{SpiffeId, TrustDomain};
use crate::key::PrivateKey;
use crate::time::UnixTime;
use ipnet::IpNet;

/// A fixed "now" for tests: 2026-11-26T06:17:57Z.
pub const NOW: UnixTime = UnixTime(1_795_673_877);

const DAY: u64 = 86_400;

/// A CA valid from a year before [`NOW`] to nine years after, with no constraints.
pub struct TestCa {
    signer: CaSigner,
}

/// Parses `"100.64.0.1"` (a host) or `"100.64.0.0/24"` (a prefix).
pub fn net(s: &str) -> IpNet {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
        .unwrap_or_else(|e| panic!("bad test address {s:?}: {e}"))
}

impl TestCa {
    /// A fresh CA for trust domain `td`.
    pub fn new(td: &str) -> TestCa {
        TestCa::with_constraints(td, &[], &[])
    }

    /// A fresh CA whose leaves must lie in `addresses` and use only `groups`
    /// (empty: any).
    pub fn with_constraints(td: &str, addresses: &[&str], groups: &[&str]) -> TestCa {
        let params = CaParams {
            trust_domain: TrustDomain::parse(td).expect("test trust domain"),
            validity_secs: 10 * 365 * DAY,
            constraints: CaConstraints {
                addresses: addresses.iter().map(|a| net(a)).collect(),
                groups: groups.iter().map(|g| g.to_string()).collect(),
            },
        };
        let signer = CaSigner::init(params, NOW.saturating_sub(365 * DAY)).expect("test CA");
        TestCa { signer }
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

    /// A leaf valid from a day before [`NOW`] for a year, with a fresh key pair.
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
            NOW.saturating_sub(DAY),
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

    /// A leaf that expired a day before [`NOW`] (valid for one day, two days before).
    pub fn expired_leaf(&self, identity: &str, addresses: &[&str]) -> (Certificate, PrivateKey) {
        self.leaf_at(identity, addresses, &[], NOW.saturating_sub(2 * DAY), DAY)
    }

    /// A leaf that becomes valid a day after [`NOW`].
    pub fn future_leaf(&self, identity: &str, addresses: &[&str]) -> (Certificate, PrivateKey) {
        self.leaf_at(identity, addresses, &[], NOW.saturating_add(DAY), DAY)
    }

    /// A leaf for the same trust domain signed by a different, unrelated CA.
    pub fn foreign_leaf(&self, identity: &str, addresses: &[&str]) -> (Certificate, PrivateKey) {
        let other = TestCa::new(self.cert().identity().trust_domain().as_str());
        other.leaf(identity, addresses)
    }
}
