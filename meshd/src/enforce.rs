//! Policy enforcement in the packet path (sans-IO): every decrypted inbound packet,
//! after the secure-naming check, passes through [`Enforce::inbound`] before it is
//! written to the TUN (invariant 3: policy decides before delivery).
//!
//! This module holds the hook and the interim enforcer used until the policy engine
//! lands (policy issue): it applies only the mesh default. The policy issue replaces
//! [`DefaultOnly`] with the compiled-policy enforcer (flow tracking, L7) behind the
//! same trait.

use mesh_proto::config::{PolicyConfig, PolicyDefault};
use mesh_proto::time::UnixTime;

use crate::peers::PeerSpec;

/// What to do with a decrypted inbound packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Deliver,
    Drop(DenyReason),
}

/// Why the enforcer refused a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenyReason {
    /// The mesh default is deny and no policy allows the packet.
    DefaultDeny,
    /// A policy file is configured but no policy engine is in this build: fail closed.
    PolicyUnavailable,
}

/// The enforcement hook. `packet` has passed [`crate::wire::IpPacket::new_checked`]
/// and its source address belongs to `src`.
pub trait Enforce: Send + Sync {
    fn inbound(&self, src: &PeerSpec, packet: &[u8], now: UnixTime) -> Verdict;
}

/// Applies the mesh default only: no `[policy]` table → deliver (a data plane without
/// policy); `default = "allow"` → deliver; `default = "deny"`, or a policy file this
/// build cannot evaluate → drop (fail closed).
#[derive(Clone, Copy, Debug)]
pub struct DefaultOnly {
    verdict: Verdict,
}

impl DefaultOnly {
    pub fn new(policy: Option<&PolicyConfig>) -> DefaultOnly {
        let verdict = match policy {
            None => Verdict::Deliver,
            Some(p) if p.file.is_some() => Verdict::Drop(DenyReason::PolicyUnavailable),
            Some(p) => match p.default {
                PolicyDefault::Allow => Verdict::Deliver,
                PolicyDefault::Deny => Verdict::Drop(DenyReason::DefaultDeny),
            },
        };
        DefaultOnly { verdict }
    }

    pub fn allow_all() -> DefaultOnly {
        DefaultOnly {
            verdict: Verdict::Deliver,
        }
    }
}

impl Enforce for DefaultOnly {
    fn inbound(&self, _src: &PeerSpec, _packet: &[u8], _now: UnixTime) -> Verdict {
        self.verdict
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_only_fails_closed() {
        let none = DefaultOnly::new(None);
        let allow = DefaultOnly::new(Some(&PolicyConfig {
            default: PolicyDefault::Allow,
            file: None,
        }));
        let deny = DefaultOnly::new(Some(&PolicyConfig {
            default: PolicyDefault::Deny,
            file: None,
        }));
        let file = DefaultOnly::new(Some(&PolicyConfig {
            default: PolicyDefault::Allow,
            file: Some("p.toml".into()),
        }));
        assert_eq!(none.verdict, Verdict::Deliver);
        assert_eq!(allow.verdict, Verdict::Deliver);
        assert_eq!(deny.verdict, Verdict::Drop(DenyReason::DefaultDeny));
        assert_eq!(file.verdict, Verdict::Drop(DenyReason::PolicyUnavailable));
    }
}
