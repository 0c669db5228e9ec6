use super::*;
use mesh_proto::signed::{DocParams, PolicyDoc, PolicySigningKey};
use mesh_proto::store::{NodeEndpoint, StoreEntry};
use mesh_proto::testing::TestCa;
use std::cell::RefCell;

/// Records what the applier asked for; refuses what a test says to.
#[derive(Default)]
struct Fake {
    now: UnixTime,
    local: Vec<SpiffeId>,
    refuse_certs: RefCell<BTreeSet<SpiffeId>>,
    peers: RefCell<BTreeMap<SpiffeId, (Fingerprint, Option<SocketAddr>)>>,
    policies: RefCell<Vec<String>>,
    calls: RefCell<Vec<String>>,
    batches: RefCell<Vec<usize>>,
}

impl Fake {
    fn add_one(&self, cert: &Certificate, endpoint: Option<SocketAddr>) -> Result<(), String> {
        self.calls
            .borrow_mut()
            .push(format!("add {}", cert.identity()));
        if self.refuse_certs.borrow().contains(cert.identity()) {
            return Err("signed by another CA".into());
        }
        self.peers
            .borrow_mut()
            .insert(cert.identity().clone(), (cert.fingerprint(), endpoint));
        Ok(())
    }
}

impl Target for &Fake {
    fn add_peers(&self, list: &[(Certificate, Option<SocketAddr>)]) -> Vec<Result<(), String>> {
        self.batches.borrow_mut().push(list.len());
        list.iter().map(|(c, e)| self.add_one(c, *e)).collect()
    }
    fn remove_peer(&self, identity: &SpiffeId) -> Result<(), String> {
        self.calls.borrow_mut().push(format!("remove {identity}"));
        self.peers
            .borrow_mut()
            .remove(identity)
            .map(|_| ())
            .ok_or_else(|| "no such peer".into())
    }
    fn apply_policy(&self, _name: &str, policy: &str) -> Result<(), String> {
        self.policies.borrow_mut().push(policy.to_string());
        Ok(())
    }
    fn is_local(&self, identity: &SpiffeId) -> bool {
        self.local.contains(identity)
    }
    fn default_action(&self) -> DefaultAction {
        DefaultAction::Deny
    }
    fn now(&self) -> UnixTime {
        self.now
    }
}

/// A directory of its own per test, removed at the end.
struct Dir(std::path::PathBuf);

impl Dir {
    fn new() -> Dir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("meshd-fleet-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct World {
    ca: TestCa,
    key: PolicySigningKey,
    dir: Dir,
}

impl World {
    fn new() -> World {
        World {
            ca: TestCa::new("t"),
            key: PolicySigningKey::generate(),
            dir: Dir::new(),
        }
    }
    fn fake(&self) -> Fake {
        Fake {
            now: self.ca.now(),
            local: vec![SpiffeId::parse("spiffe://t/self").unwrap()],
            ..Fake::default()
        }
    }
    fn trust(&self) -> PolicyTrust {
        PolicyTrust {
            trust_domain: mesh_proto::identity::TrustDomain::parse("t").unwrap(),
            keys: vec![self.key.public_key()],
        }
    }
    fn applier<'a>(&self, fake: &'a Fake) -> Applier<&'a Fake> {
        let state = FleetState::load(self.dir.path()).unwrap();
        Applier::new(fake, Some(self.trust()), self.dir.path(), state)
    }
    fn cert(&self, name: &str, ip: &str) -> StoreEntry {
        let (c, _) = self.ca.leaf(&format!("spiffe://t/{name}"), &[ip]);
        StoreEntry {
            key: StoreKey::Cert(c.identity().clone()),
            value: StoreValue::Cert(c),
        }
    }
    fn endpoint(&self, name: &str, ep: &str) -> StoreEntry {
        StoreEntry {
            key: StoreKey::NodeEndpoint(id(name)),
            value: StoreValue::Endpoint(NodeEndpoint {
                endpoints: vec![ep.parse().unwrap()],
            }),
        }
    }
    fn policy(&self, key: &PolicySigningKey, version: u64, text: &str) -> StoreEntry {
        let doc = PolicyDoc::sign(
            key,
            &DocParams {
                trust_domain: &mesh_proto::identity::TrustDomain::parse("t").unwrap(),
                version,
                issued_at: self.ca.now(),
                name: "policy.toml",
                policy: text,
            },
        )
        .unwrap();
        StoreEntry {
            key: StoreKey::Policy,
            value: StoreValue::Policy(doc),
        }
    }
}

fn id(name: &str) -> SpiffeId {
    SpiffeId::parse(&format!("spiffe://t/{name}")).unwrap()
}

fn put(entry: StoreEntry) -> StoreEvent {
    StoreEvent::Put {
        revision: 1,
        entry: Box::new(entry),
    }
}

fn snapshot(entries: Vec<StoreEntry>) -> StoreEvent {
    StoreEvent::Snapshot(crate::control::store::Snapshot {
        revision: 1,
        entries,
        ignored: vec![],
        reason: crate::control::store::SnapshotReason::Start,
    })
}

const POLICY_A: &str = "[[policy]]
name = \"a\"
action = \"allow\"

[[policy.rule]]
from = [{ identities = [\"spiffe://t/a\"] }]
";
const POLICY_B: &str = "[[policy]]
name = \"b\"
action = \"allow\"

[[policy.rule]]
from = [{ identities = [\"spiffe://t/b\"] }]
";

#[test]
fn a_snapshot_adds_peers_with_their_endpoints_and_skips_the_node_itself() {
    let w = World::new();
    let fake = w.fake();
    let mut a = w.applier(&fake);
    let report = a.apply(snapshot(vec![
        w.cert("a", "100.64.0.1/32"),
        w.endpoint("a", "198.18.0.1:51820"),
        w.cert("self", "100.64.0.9/32"),
        w.cert("b", "100.64.0.2/32"),
    ]));
    let peers = fake.peers.borrow();
    assert_eq!(peers.len(), 2, "{peers:?}");
    assert_eq!(peers[&id("a")].1, Some("198.18.0.1:51820".parse().unwrap()));
    assert_eq!(peers[&id("b")].1, None);
    assert!(!peers.contains_key(&id("self")));
    assert_eq!(a.applied().peers, 2);
    // The first event reports the node's state even with nothing applied.
    assert_eq!(report.map(|r| r.applied_policy_version), Some(0));
}

#[test]
fn an_endpoint_after_its_certificate_updates_the_peer_and_its_loss_keeps_it() {
    let w = World::new();
    let fake = w.fake();
    let mut a = w.applier(&fake);
    a.apply(put(w.cert("a", "100.64.0.1/32")));
    assert_eq!(fake.peers.borrow()[&id("a")].1, None);
    a.apply(put(w.endpoint("a", "198.18.0.1:51820")));
    assert_eq!(
        fake.peers.borrow()[&id("a")].1,
        Some("198.18.0.1:51820".parse().unwrap())
    );
    let calls = fake.calls.borrow().len();
    a.apply(StoreEvent::Deleted {
        revision: 2,
        key: StoreKey::NodeEndpoint(id("a")),
    });
    // The same endpoint seen again changes nothing either.
    a.apply(put(w.endpoint("a", "198.18.0.1:51820")));
    assert_eq!(
        fake.calls.borrow().len(),
        calls,
        "{:?}",
        fake.calls.borrow()
    );
    assert!(fake.peers.borrow().contains_key(&id("a")));
}

#[test]
fn a_certificate_gone_from_the_store_removes_only_the_peer_the_store_added() {
    let w = World::new();
    let fake = w.fake();
    // An operator's peer, not from the store.
    let (op, _) = w.ca.leaf("spiffe://t/op", &["100.64.0.7/32"]);
    fake.peers
        .borrow_mut()
        .insert(op.identity().clone(), (op.fingerprint(), None));
    let mut a = w.applier(&fake);
    a.apply(snapshot(vec![
        w.cert("a", "100.64.0.1/32"),
        w.cert("b", "100.64.0.2/32"),
    ]));
    a.apply(StoreEvent::Deleted {
        revision: 2,
        key: StoreKey::Cert(id("a")),
    });
    assert!(!fake.peers.borrow().contains_key(&id("a")));
    // A resync without b removes b; the operator's peer stays.
    a.apply(snapshot(vec![]));
    let peers = fake.peers.borrow();
    assert_eq!(peers.keys().collect::<Vec<_>>(), vec![op.identity()]);
    assert_eq!(a.applied().peers, 0);
}

#[test]
fn a_refused_certificate_is_counted_once_and_shown_until_it_goes() {
    let w = World::new();
    let fake = w.fake();
    fake.refuse_certs.borrow_mut().insert(id("x"));
    let mut a = w.applier(&fake);
    let x = w.cert("x", "100.64.0.5/32");
    a.apply(put(x.clone()));
    a.apply(snapshot(vec![x]));
    let applied = a.applied();
    assert_eq!(applied.refusals.get("certificate"), Some(&1));
    assert_eq!(
        applied
            .refused
            .get("certs/spiffe://t/x")
            .map(String::as_str),
        Some("signed by another CA")
    );
    assert!(fake.peers.borrow().is_empty());
    a.apply(snapshot(vec![]));
    assert!(a.applied().refused.is_empty());
}

#[test]
fn policy_documents_apply_in_order_and_bad_ones_change_nothing() {
    let w = World::new();
    let fake = w.fake();
    let mut a = w.applier(&fake);
    let r = a.apply(put(w.policy(&w.key, 1, POLICY_A)));
    assert_eq!(
        r.map(|r| r.applied_policy_version),
        Some(1),
        "{:?}",
        a.applied()
    );
    // Another key's document, an older one, the same one again: refused or no-ops.
    let other = PolicySigningKey::generate();
    assert_eq!(a.apply(put(w.policy(&other, 2, POLICY_B))), None);
    assert!(
        a.applied().refused["policy/current"].contains("policy_keys"),
        "{:?}",
        a.applied()
    );
    a.apply(put(w.policy(&w.key, 1, POLICY_A)));
    assert_eq!(fake.policies.borrow().len(), 1);
    // Version 2 by the right key replaces it, and the refusal is over.
    let r = a.apply(put(w.policy(&w.key, 2, POLICY_B)));
    assert_eq!(r.map(|r| r.applied_policy_version), Some(2));
    assert_eq!(fake.policies.borrow().as_slice(), [POLICY_A, POLICY_B]);
    assert!(a.applied().refused.is_empty());
    // An old document put back by hand (a replay) is refused by its number.
    a.apply(put(w.policy(&w.key, 1, POLICY_A)));
    assert!(a.applied().refused["policy/current"].contains("stays"));
    assert_eq!(fake.policies.borrow().len(), 2);
}

#[test]
fn what_was_applied_survives_a_restart_so_old_documents_stay_refused() {
    let w = World::new();
    let fake = w.fake();
    {
        let mut a = w.applier(&fake);
        a.apply(snapshot(vec![
            w.cert("a", "100.64.0.1/32"),
            w.policy(&w.key, 3, POLICY_A),
        ]));
    }
    // A new meshd: its state file says version 3 and peer a came from the store.
    let fake2 = w.fake();
    let mut a = w.applier(&fake2);
    assert_eq!(a.applied().policy_version, 3);
    assert_eq!(a.applied().peers, 1);
    a.apply(put(w.policy(&w.key, 2, POLICY_B)));
    assert!(fake2.policies.borrow().is_empty());
    // And a store that lost peer a meanwhile removes it.
    fake2
        .peers
        .borrow_mut()
        .insert(id("a"), (Fingerprint::of(b"x"), None));
    a.apply(snapshot(vec![]));
    assert!(
        fake2.peers.borrow().is_empty(),
        "{:?}",
        fake2.calls.borrow()
    );
}

#[test]
fn without_policy_keys_no_policy_is_taken_from_the_store() {
    let w = World::new();
    let fake = w.fake();
    let mut a = Applier::new(&fake, None, w.dir.path(), FleetState::default());
    a.apply(put(w.policy(&w.key, 1, POLICY_A)));
    assert!(fake.policies.borrow().is_empty());
    assert!(a.applied().refused["policy/current"].contains("policy_keys"));
}

#[test]
fn garbage_over_a_good_certificate_in_a_resync_changes_nothing() {
    let w = World::new();
    let fake = w.fake();
    let mut a = w.applier(&fake);
    a.apply(snapshot(vec![
        w.cert("a", "100.64.0.1/32"),
        w.endpoint("a", "198.18.0.1:51820"),
    ]));
    let calls = fake.calls.borrow().len();
    // A resync where a's certificate and endpoint no longer decode.
    let garbage = |key: StoreKey| mesh_proto::store::DecodeError {
        key_text: String::new(),
        key: Some(key),
        reason: mesh_proto::store::IgnoreReason::BadCertificate,
        detail: "not a certificate".into(),
    };
    a.apply(StoreEvent::Snapshot(crate::control::store::Snapshot {
        revision: 2,
        entries: vec![],
        ignored: vec![
            garbage(StoreKey::Cert(id("a"))),
            garbage(StoreKey::NodeEndpoint(id("a"))),
        ],
        reason: crate::control::store::SnapshotReason::Compacted {
            compact_revision: 2,
        },
    }));
    assert_eq!(
        fake.calls.borrow().len(),
        calls,
        "{:?}",
        fake.calls.borrow()
    );
    assert_eq!(
        fake.peers.borrow()[&id("a")].1,
        Some("198.18.0.1:51820".parse().unwrap())
    );
    assert_eq!(a.applied().peers, 1);
}

#[test]
fn a_listing_is_applied_in_one_batch_and_a_change_alone() {
    let w = World::new();
    let fake = w.fake();
    fake.refuse_certs.borrow_mut().insert(id("x"));
    let mut a = w.applier(&fake);
    let cert_a = w.cert("a", "100.64.0.1/32");
    a.apply(snapshot(vec![
        cert_a.clone(),
        w.cert("b", "100.64.0.2/32"),
        w.cert("x", "100.64.0.5/32"),
        w.cert("self", "100.64.0.9/32"),
    ]));
    // One batch of the three that are not the node's own; x refused within it.
    assert_eq!(fake.batches.borrow().as_slice(), [3]);
    assert_eq!(fake.peers.borrow().len(), 2);
    assert_eq!(a.applied().refusals.get("certificate"), Some(&1));
    a.apply(put(w.cert("c", "100.64.0.3/32")));
    assert_eq!(fake.batches.borrow().as_slice(), [3, 1]);
    // A resync with only a, unchanged: b and c go, nothing is added.
    a.apply(snapshot(vec![cert_a]));
    assert_eq!(fake.batches.borrow().len(), 2);
    assert_eq!(
        fake.peers.borrow().keys().collect::<Vec<_>>(),
        vec![&id("a")]
    );
}
