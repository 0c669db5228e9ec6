//! Who a decision is about, as the data path holds it: the two ends of a flow, with
//! their identities and groups behind reference counts so that a flow can keep them
//! for its life without copying (one per flow, none per packet).
//!
//! Shared by the sessions (each knows its two ends) and the enforcer (which decides
//! with them), so that neither depends on the other.

use std::sync::Arc;

/// The authenticated sender of inbound packets: the identity its key proved and its
/// certificate's groups. Cloned into each flow it opens (reference counts only).
#[derive(Clone, Debug)]
pub struct Sender {
    pub identity: Arc<str>,
    pub groups: Arc<[String]>,
}

/// The local workload that policies select (its certificate): the receiver of inbound
/// packets, `dst` in the decision log. Cloned into each flow (reference counts only).
#[derive(Clone, Debug)]
pub struct LocalWorkload {
    pub identity: Option<Arc<str>>,
    pub groups: Arc<[String]>,
}

impl Default for LocalWorkload {
    fn default() -> Self {
        LocalWorkload {
            identity: None,
            groups: Arc::from(Vec::new()),
        }
    }
}
