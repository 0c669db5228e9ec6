//! The fleet store as one more input of the daemon, beside the files and the control
//! socket: what the store client ([`crate::control::store`]) reads is verified and applied
//! through the same paths as `meshctl peer add`, `peer remove` and `policy apply`.
//!
//! # Trust
//! The store is not trusted for identity or policy. A certificate goes through
//! `peer add`'s checks (the node's CA, its window, the addresses no other peer or
//! workload claims); a policy document through [`mesh_proto::signed::verify`] (the
//! trust domain, a key `[store] policy_keys` names, a version above the one in force,
//! a valid policy whose tests pass). Anything refused is logged once, counted by
//! reason in `meshctl status`, and changes nothing: the state in force stays.
//!
//! # What is applied
//! - `certs/<id>` → a peer (with the endpoint in `nodes/<id>/endpoint`, else none:
//!   WireGuard roaming learns it from the peer's first packet). The node's own
//!   identity and its local workloads' are skipped.
//! - a certificate gone from the store → the peer it added is removed (only peers this
//!   module added: an operator's `peer add` and the config's peers are theirs);
//! - `policy/current` → applied, established flows decided again under it;
//! - a node's endpoint gone (its lease ended) → nothing: the peer keeps the endpoint it
//!   has, and its handshakes fail until the host comes back.
//!
//! # No store at start
//! What was applied persists in `state_dir` (the peers and policy through their usual
//! state files, and here which of them came from the store and the policy version),
//! so a meshd restarted while etcd is down starts with the last state it applied, and
//! refuses a document older than the one it enforced.
//!
//! [`Applier`] is sans-IO over a [`Target`] (the daemon, or a fake in the tests) but
//! for writing its state file.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use mesh_proto::cert::{Certificate, Fingerprint};
use mesh_proto::identity::SpiffeId;
use mesh_proto::policy::DefaultAction;
use mesh_proto::signed::{PolicyPublicKey, PolicyTrust, SignedError};
use mesh_proto::store::{StoreApplied, StoreEntry, StoreKey, StoreStatus, StoreValue};
use mesh_proto::time::UnixTime;
use serde::{Deserialize, Serialize};

use crate::control::daemon::Daemon;
use crate::control::state::{StateError, StateFile};
use crate::control::store::{NodeReport, StatusPublisher, StoreEvent, StoreHandle};

/// The daemon operations the store drives (implemented by `Daemon`).
pub trait Target {
    /// `meshctl peer add` of each, in one commit: verified, persisted, then in force;
    /// the results in order, each `Err` one line.
    fn add_peers(&self, list: &[(Certificate, Option<SocketAddr>)]) -> Vec<Result<(), String>>;
    /// `meshctl peer remove`.
    fn remove_peer(&self, identity: &SpiffeId) -> Result<(), String>;
    /// `meshctl policy apply` of a verified document's policy; established flows the
    /// new policy forbids are cut.
    fn apply_policy(&self, name: &str, policy: &str) -> Result<(), String>;
    /// Identities this node holds itself (its own, its workloads'): never peers.
    fn is_local(&self, identity: &SpiffeId) -> bool;
    /// The node's default action (documents are compiled under it).
    fn default_action(&self) -> DefaultAction;
    fn now(&self) -> UnixTime;
}

/// What this module applied, persisted in `state_dir` (`store.json`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetState {
    pub version: u32,
    /// The store policy document in force (0: none from the store).
    pub policy_version: u64,
    pub policy_digest: Option<Fingerprint>,
    /// The peers added from the store: identity → what was applied.
    pub peers: BTreeMap<String, AppliedPeer>,
}

/// A peer as this module applied it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppliedPeer {
    pub fingerprint: Fingerprint,
    pub endpoint: Option<SocketAddr>,
}

impl StateFile for FleetState {
    const FILE: &'static str = "store.json";
    const HOLDS: (&'static str, &'static str) = (
        "which peers and which policy version came from the fleet store",
        "nothing: meshd rebuilds it from the store when it connects",
    );
    fn version(&self) -> u32 {
        self.version
    }
}

impl FleetState {
    pub fn load(state_dir: &Path) -> Result<FleetState, StateError> {
        Ok(
            crate::control::state::read(state_dir)?.unwrap_or(FleetState {
                version: crate::control::state::STATE_VERSION,
                ..FleetState::default()
            }),
        )
    }
}

/// Applies store events to a [`Target`]. Sans-IO but for `save` (the state file).
pub struct Applier<T> {
    target: T,
    trust: Option<PolicyTrust>,
    state_dir: std::path::PathBuf,
    state: FleetState,
    /// The store's view: valid-looking certificates and endpoints by identity.
    certs: BTreeMap<SpiffeId, Certificate>,
    endpoints: BTreeMap<SpiffeId, SocketAddr>,
    /// Refused now, by key: (the refused value's digest, the reason). A value is
    /// logged once, not at every event that reconsiders it.
    refused: BTreeMap<String, (Fingerprint, String)>,
    refusals: BTreeMap<String, u64>,
    /// Set when what the node applied changed: the status entry to publish.
    report_due: bool,
    /// Set when `state` changed: written once at the end of the event (a listing of
    /// 1,000 certificates writes it once, not 1,000 times).
    dirty: bool,
}

impl<T: Target> Applier<T> {
    /// `trust`: `None` when `[store] policy_keys` is empty (no policy from the store).
    pub fn new(target: T, trust: Option<PolicyTrust>, state_dir: &Path, state: FleetState) -> Self {
        Applier {
            target,
            trust,
            state_dir: state_dir.to_path_buf(),
            state,
            certs: BTreeMap::new(),
            endpoints: BTreeMap::new(),
            refused: BTreeMap::new(),
            refusals: BTreeMap::new(),
            report_due: true,
            dirty: false,
        }
    }

    pub fn target(&self) -> &T {
        &self.target
    }

    /// Applies one event; returns the report to publish when what the node applied
    /// changed (and once at the first connection).
    pub fn apply(&mut self, event: StoreEvent) -> Option<NodeReport> {
        match event {
            StoreEvent::Connected { .. } | StoreEvent::Disconnected { .. } => {}
            StoreEvent::Ignored { .. } => {} // logged and counted by the client
            StoreEvent::Snapshot(s) => {
                // An entry whose value does not decode keeps its last good value:
                // garbage written over a good certificate or endpoint changes nothing.
                let keep: BTreeSet<StoreKey> =
                    s.ignored.iter().filter_map(|e| e.key.clone()).collect();
                self.certs
                    .retain(|id, _| keep.contains(&StoreKey::Cert(id.clone())));
                self.endpoints
                    .retain(|id, _| keep.contains(&StoreKey::NodeEndpoint(id.clone())));
                let mut policy = None;
                for e in s.entries {
                    match self.remember(e) {
                        Some(doc) => policy = Some(doc),
                        None => continue,
                    }
                }
                // Refusals of entries gone from the store are over.
                let keys: BTreeSet<String> = self
                    .certs
                    .keys()
                    .map(cert_key)
                    .chain(policy.iter().map(|_| "policy/current".to_string()))
                    .collect();
                self.refused.retain(|k, _| keys.contains(k));
                self.reconcile_all();
                if let Some(doc) = policy {
                    self.policy(&doc);
                }
            }
            StoreEvent::Put { entry, .. } => {
                let id = match &entry.key {
                    StoreKey::Cert(id) | StoreKey::NodeEndpoint(id) => Some(id.clone()),
                    _ => None,
                };
                if let Some(doc) = self.remember(*entry) {
                    self.policy(&doc);
                }
                if let Some(id) = id {
                    self.reconcile(&id);
                }
            }
            StoreEvent::Deleted { key, .. } => match key {
                StoreKey::Cert(id) => {
                    self.certs.remove(&id);
                    self.refused.remove(&cert_key(&id));
                    self.reconcile(&id);
                }
                // The peer keeps the endpoint it has (see the module docs).
                StoreKey::NodeEndpoint(id) => {
                    self.endpoints.remove(&id);
                }
                StoreKey::Policy => {
                    tracing::warn!("store: policy/current deleted; the policy in force stays (publish a new version to change it)");
                }
                _ => {}
            },
        }
        if std::mem::take(&mut self.dirty) {
            self.save();
        }
        if std::mem::take(&mut self.report_due) {
            Some(NodeReport {
                applied_policy_version: self.state.policy_version,
                policy_digest: self.state.policy_digest,
            })
        } else {
            None
        }
    }

    /// Takes an entry into the view; returns a policy document to consider.
    fn remember(&mut self, entry: StoreEntry) -> Option<Box<mesh_proto::signed::PolicyDoc>> {
        match (entry.key, entry.value) {
            (StoreKey::Cert(id), StoreValue::Cert(c)) => {
                self.certs.insert(id, c);
            }
            (StoreKey::NodeEndpoint(id), StoreValue::Endpoint(e)) => {
                if let Some(first) = e.endpoints.first() {
                    self.endpoints.insert(id, *first);
                }
            }
            (StoreKey::Policy, StoreValue::Policy(doc)) => return Some(Box::new(doc)),
            _ => {}
        }
        None
    }

    fn reconcile_all(&mut self) {
        let ids: BTreeSet<SpiffeId> = self
            .certs
            .keys()
            .cloned()
            .chain(
                self.state
                    .peers
                    .keys()
                    .filter_map(|s| SpiffeId::parse(s).ok()),
            )
            .collect();
        // Removals at once, additions in one batch (one commit for a whole listing).
        let adds: Vec<(Certificate, Option<SocketAddr>)> =
            ids.iter().filter_map(|id| self.plan(id)).collect();
        self.add(adds);
    }

    /// Brings one identity's peer in line with the store's view.
    fn reconcile(&mut self, id: &SpiffeId) {
        if let Some(add) = self.plan(id) {
            self.add(vec![add]);
        }
    }

    /// Adds these peers (one commit) and records what took and what was refused.
    fn add(&mut self, adds: Vec<(Certificate, Option<SocketAddr>)>) {
        if adds.is_empty() {
            return;
        }
        let results = self.target.add_peers(&adds);
        for ((cert, endpoint), result) in adds.into_iter().zip(results) {
            let id = cert.identity();
            match result {
                Ok(()) => {
                    tracing::info!(peer = %id, endpoint = ?endpoint, "store: peer in force");
                    self.refused.remove(&cert_key(id));
                    let want = AppliedPeer {
                        fingerprint: cert.fingerprint(),
                        endpoint,
                    };
                    self.state.peers.insert(id.to_string(), want);
                    self.dirty = true;
                }
                Err(e) => self.refuse(cert_key(id), "certificate", cert.fingerprint(), e),
            }
        }
    }

    /// For one identity: removes its peer if its certificate left the store, or
    /// returns the peer to add when the store's certificate or endpoint differs from
    /// what is in force.
    fn plan(&mut self, id: &SpiffeId) -> Option<(Certificate, Option<SocketAddr>)> {
        let key = id.to_string();
        let applied = self.state.peers.get(&key).cloned();
        let Some(cert) = self.certs.get(id).cloned() else {
            if applied.is_some() {
                match self.target.remove_peer(id) {
                    Ok(()) => {
                        tracing::info!(peer = %id, "store: peer removed (its certificate left the store)")
                    }
                    // Removed meanwhile by the operator: nothing to undo.
                    Err(e) => tracing::info!(peer = %id, "store: peer not removed: {e}"),
                }
                self.state.peers.remove(&key);
                self.dirty = true;
            }
            return None;
        };
        if self.target.is_local(id) {
            return None;
        }
        let endpoint = self.endpoints.get(id).copied();
        let want = AppliedPeer {
            fingerprint: cert.fingerprint(),
            endpoint,
        };
        if applied.as_ref() == Some(&want) {
            return None;
        }
        // An endpoint gone from the store keeps the one in force.
        if let (Some(a), None) = (&applied, endpoint) {
            if a.fingerprint == want.fingerprint {
                return None;
            }
        }
        Some((cert, endpoint))
    }

    fn policy(&mut self, doc: &mesh_proto::signed::PolicyDoc) {
        let key = "policy/current".to_string();
        let digest = Fingerprint::of(doc.as_text().as_bytes());
        let Some(trust) = &self.trust else {
            self.refuse(
                key,
                "policy",
                digest,
                "[store] policy_keys names no key: policy from the store is not applied".into(),
            );
            return;
        };
        if doc.version() == self.state.policy_version
            && Some(doc.policy_digest()) == self.state.policy_digest
        {
            return; // the one in force, seen again (a resync)
        }
        let verified = doc.clone().verify(
            trust,
            self.state.policy_version,
            self.target.default_action(),
            self.target.now(),
        );
        let result = verified.map_err(|e| match e {
            SignedError::NotNewer { .. } => format!("{e}: the policy in force stays"),
            e => e.to_string(),
        });
        let result = result.and_then(|v| {
            self.target
                .apply_policy(v.name(), v.policy())
                .map(|()| (v.version(), v.policy_digest()))
        });
        match result {
            Ok((version, policy_digest)) => {
                tracing::info!(version, name = %doc.name(), "store: policy document applied");
                self.refused.remove(&key);
                self.state.policy_version = version;
                self.state.policy_digest = Some(policy_digest);
                self.report_due = true;
                self.dirty = true;
            }
            Err(e) => self.refuse(key, "policy", digest, e),
        }
    }

    fn refuse(&mut self, key: String, kind: &str, digest: Fingerprint, reason: String) {
        if self.refused.get(&key).map(|(d, _)| *d) != Some(digest) {
            tracing::warn!("store: {key} refused: {reason}");
            *self.refusals.entry(kind.to_string()).or_default() += 1;
        }
        self.refused.insert(key, (digest, reason));
    }

    fn save(&self) {
        if let Err(e) = crate::control::state::write(&self.state_dir, &self.state) {
            tracing::error!("store: {e}");
        }
    }

    pub fn applied(&self) -> StoreApplied {
        StoreApplied {
            policy_version: self.state.policy_version,
            peers: self.state.peers.len(),
            refused: self
                .refused
                .iter()
                .map(|(k, (_, r))| (k.clone(), r.clone()))
                .collect(),
            refusals: self.refusals.clone(),
        }
    }
}

fn cert_key(id: &SpiffeId) -> String {
    format!("certs/{id}")
}

/// Reads the policy public keys `[store] policy_keys` names.
pub fn read_policy_keys(paths: &[std::path::PathBuf]) -> Result<Vec<PolicyPublicKey>, String> {
    paths
        .iter()
        .map(|p| {
            let text = std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
            PolicyPublicKey::from_pem(&text).map_err(|e| format!("{}: {e}", p.display()))
        })
        .collect()
}

/// The daemon as the store's [`Target`]. Weak: the daemon holds the status reader,
/// which holds the applier.
pub struct DaemonTarget(pub Weak<Daemon>);

impl DaemonTarget {
    fn daemon(&self) -> Result<Arc<Daemon>, String> {
        self.0
            .upgrade()
            .ok_or_else(|| "meshd is stopping".to_string())
    }
}

impl Target for DaemonTarget {
    fn add_peers(&self, list: &[(Certificate, Option<SocketAddr>)]) -> Vec<Result<(), String>> {
        match self.daemon() {
            Ok(d) => d
                .peer_add_many(list, crate::sys::clock::unix_now())
                .into_iter()
                .map(|r| r.map_err(|e| e.to_string()))
                .collect(),
            Err(e) => list.iter().map(|_| Err(e.clone())).collect(),
        }
    }

    fn remove_peer(&self, identity: &SpiffeId) -> Result<(), String> {
        self.daemon()?
            .peer_remove(&identity.to_string())
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn apply_policy(&self, name: &str, policy: &str) -> Result<(), String> {
        let d = self.daemon()?;
        let (_, cuts) = d
            .policy_apply(policy, name, crate::sys::clock::unix_now())
            .map_err(|e| e.to_string())?;
        d.cut_flows(&cuts);
        Ok(())
    }

    fn is_local(&self, identity: &SpiffeId) -> bool {
        self.0.upgrade().is_some_and(|d| {
            d.lock_registry()
                .workloads
                .iter()
                .any(|w| w.cert.identity() == identity)
        })
    }

    fn default_action(&self) -> DefaultAction {
        self.0
            .upgrade()
            .map(|d| crate::control::daemon::default_action(d.config()))
            .unwrap_or(DefaultAction::Deny)
    }

    fn now(&self) -> UnixTime {
        crate::sys::clock::unix_now()
    }
}

/// Why the store input could not start: one line.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("[store] policy_keys: {0}")]
    PolicyKeys(String),
    #[error("{0}")]
    State(#[from] StateError),
    #[error(transparent)]
    Store(#[from] crate::control::store::StoreError),
}

/// The running store input of a daemon: its client, applying events on the client's
/// thread as they come. [`Fleet::stop`] before the daemon goes.
pub struct Fleet {
    handle: StoreHandle,
}

impl Fleet {
    /// Starts the store client for `d` when its config has a `[store]` table.
    pub fn start(d: &Arc<Daemon>) -> Result<Option<Fleet>, FleetError> {
        let config = d.config();
        let Some(store) = &config.store else {
            return Ok(None);
        };
        let own = d.lock_registry().node_cert().clone();
        let trust_domain = own.identity().trust_domain();
        let keys = read_policy_keys(&store.policy_keys).map_err(FleetError::PolicyKeys)?;
        let trust = (!keys.is_empty()).then(|| PolicyTrust {
            trust_domain: trust_domain.clone(),
            keys,
        });
        let state = FleetState::load(&config.node.state_dir)?;
        let settings = crate::control::store::StoreSettings::load(store, trust_domain)?;
        let node = crate::control::store::NodeInfo {
            identity: own.identity().clone(),
            endpoints: store.advertise.clone(),
            meshd_version: env!("CARGO_PKG_VERSION").to_string(),
            cert: Some(crate::control::store::OwnCert({
                let d = Arc::downgrade(d);
                Arc::new(move || d.upgrade().map(|d| d.lock_registry().node_cert().clone()))
            })),
        };
        let first = NodeReport {
            applied_policy_version: state.policy_version,
            policy_digest: state.policy_digest,
        };
        let applier = Arc::new(Mutex::new(Applier::new(
            DaemonTarget(Arc::downgrade(d)),
            trust,
            &config.node.state_dir,
            state,
        )));
        let publisher: Arc<OnceLock<StatusPublisher>> = Arc::new(OnceLock::new());
        let (a, p) = (applier.clone(), publisher.clone());
        let handle = crate::control::store::StoreClient::start(settings, node, move |event| {
            let report = lock(&a).apply(event);
            if let (Some(r), Some(p)) = (report, p.get()) {
                p.publish(r);
            }
        })?;
        let _ = publisher.set(handle.publisher());
        handle.publish_status(first);
        let client = handle.status_reader();
        d.set_store_status(Box::new(move || StoreStatus {
            client: client(),
            applied: lock(&applier).applied(),
        }));
        Ok(Some(Fleet { handle }))
    }

    /// Stops the client (its lease is revoked: this node's entries go at once).
    pub fn stop(self) {
        self.handle.stop();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests;
