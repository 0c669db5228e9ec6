//! The table of local workloads and sessions: an immutable snapshot the control plane
//! swaps whole and the packet path reads without locks.

use std::collections::HashMap;
use std::net::IpAddr;
use std::net::SocketAddr;
use std::sync::Arc;

use ipnet::IpNet;
use mesh_proto::identity::SpiffeId;

use super::{Local, Peer, PeerSpec, INDEX_MASK};
use crate::peers::routing::PrefixTable;

/// An immutable snapshot of the local workloads and the sessions, indexed for the
/// packet path: sessions by (local key, peer key), by slot, by (local, destination);
/// locals by source address.
#[derive(Default)]
pub struct PeerTable {
    locals: Vec<Arc<Local>>,
    local_routes: PrefixTable<usize>,
    peers: Vec<Arc<Peer>>,
    by_key: HashMap<([u8; 32], [u8; 32]), usize>,
    by_index: HashMap<u32, usize>,
    /// Peer address → row of `sessions` (one row per remote workload).
    routes: PrefixTable<usize>,
    /// `sessions[row][local]`: the session of that remote workload with that local one.
    sessions: Vec<Vec<Option<usize>>>,
}

/// Why a set of peers cannot form a table.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    #[error("{0} appears twice")]
    DuplicateIdentity(SpiffeId),
    #[error("{a} and {b} have the same public key")]
    DuplicateKey { a: SpiffeId, b: SpiffeId },
    #[error("address {net} of {b} is already held by {a}")]
    DuplicateAddress {
        net: IpNet,
        a: SpiffeId,
        b: SpiffeId,
    },
    #[error("peer slot {0} used twice")]
    DuplicateIndex(u32),
    #[error("a session of {0} belongs to no local workload of this table")]
    UnknownLocal(SpiffeId),
}

impl PeerTable {
    /// A table whose local workloads are those the sessions name (tests, and hosts
    /// with a single identity).
    pub fn new(peers: Vec<Arc<Peer>>) -> Result<PeerTable, TableError> {
        let mut locals: Vec<Arc<Local>> = Vec::new();
        for p in &peers {
            if !locals.iter().any(|l| Arc::ptr_eq(l, &p.local)) {
                locals.push(p.local.clone());
            }
        }
        PeerTable::with_locals(locals, peers)
    }

    /// Builds a table; sessions keep their state (they are shared with the previous
    /// snapshot through `Arc`). Local and remote workloads may not share an identity,
    /// a key or an address; each (local, remote) pair has at most one session.
    pub fn with_locals(
        locals: Vec<Arc<Local>>,
        peers: Vec<Arc<Peer>>,
    ) -> Result<PeerTable, TableError> {
        let mut t = PeerTable {
            peers: Vec::with_capacity(peers.len()),
            ..PeerTable::default()
        };
        // Every workload (local or remote) by key, and its identity.
        let mut keys: HashMap<[u8; 32], SpiffeId> = HashMap::new();
        let mut ids: HashMap<SpiffeId, [u8; 32]> = HashMap::new();
        let mut owners: PrefixTable<SpiffeId> = PrefixTable::new();
        let mut claim = |spec: &PeerSpec| -> Result<bool, TableError> {
            match (keys.get(&spec.public_key), ids.get(&spec.identity)) {
                (Some(id), _) if *id == spec.identity => return Ok(false),
                (Some(id), _) => {
                    return Err(TableError::DuplicateKey {
                        a: id.clone(),
                        b: spec.identity.clone(),
                    })
                }
                (None, Some(_)) => {
                    return Err(TableError::DuplicateIdentity(spec.identity.clone()))
                }
                (None, None) => {}
            }
            for net in &spec.addresses {
                if let Err(dup) = owners.insert(*net, spec.identity.clone()) {
                    let a = owners
                        .lookup(dup.0.addr())
                        .cloned()
                        .unwrap_or_else(|| spec.identity.clone());
                    return Err(TableError::DuplicateAddress {
                        net: dup.0,
                        a,
                        b: spec.identity.clone(),
                    });
                }
            }
            keys.insert(spec.public_key, spec.identity.clone());
            ids.insert(spec.identity.clone(), spec.public_key);
            Ok(true)
        };
        for (i, l) in locals.iter().enumerate() {
            if !claim(&l.spec)? {
                return Err(TableError::DuplicateIdentity(l.spec.identity.clone()));
            }
            for net in &l.spec.addresses {
                // Cannot fail: `claim` refused duplicate addresses already.
                let _ = t.local_routes.insert(*net, i);
            }
        }
        t.locals = locals;
        let mut rows: HashMap<[u8; 32], usize> = HashMap::new();
        for p in peers {
            let i = t.peers.len();
            let Some(li) = t.locals.iter().position(|l| Arc::ptr_eq(l, &p.local)) else {
                return Err(TableError::UnknownLocal(p.spec.identity.clone()));
            };
            if t.locals
                .iter()
                .any(|l| l.spec.public_key == p.spec.public_key)
            {
                return Err(TableError::DuplicateKey {
                    a: p.local.spec.identity.clone(),
                    b: p.spec.identity.clone(),
                });
            }
            let fresh_remote = claim(&p.spec)?;
            let row = match rows.get(&p.spec.public_key) {
                Some(&r) => {
                    // The same key seen again must carry the same certificate facts.
                    let first = t.sessions[r].iter().flatten().next().map(|&j| &t.peers[j]);
                    if first.is_some_and(|q| q.spec != p.spec) {
                        return Err(TableError::DuplicateIdentity(p.spec.identity.clone()));
                    }
                    r
                }
                None => {
                    debug_assert!(fresh_remote);
                    let r = t.sessions.len();
                    t.sessions.push(vec![None; t.locals.len()]);
                    rows.insert(p.spec.public_key, r);
                    for net in &p.spec.addresses {
                        let _ = t.routes.insert(*net, r);
                    }
                    r
                }
            };
            if t.sessions[row][li].replace(i).is_some() {
                return Err(TableError::DuplicateIdentity(p.spec.identity.clone()));
            }
            if t.by_index.insert(p.index, i).is_some() {
                return Err(TableError::DuplicateIndex(p.index));
            }
            t.by_key
                .insert((p.local.spec.public_key, p.spec.public_key), i);
            t.peers.push(p);
        }
        Ok(t)
    }

    /// Every session.
    pub fn peers(&self) -> &[Arc<Peer>] {
        &self.peers
    }

    /// The sessions with a peer last seen at `endpoint` that have no WireGuard session
    /// established: those a data packet from there under an unknown receiver index may
    /// belong to ([`super::Inbound::RehandshakeAt`]). A linear scan: only for that.
    pub fn stale_at(&self, endpoint: SocketAddr) -> impl Iterator<Item = &Arc<Peer>> + '_ {
        self.peers
            .iter()
            .filter(move |p| p.endpoint() == Some(endpoint) && p.lacks_session())
    }

    /// The local workloads, in the order they were given.
    pub fn locals(&self) -> &[Arc<Local>] {
        &self.locals
    }

    /// The sessions with the remote workload `id` (one per local workload).
    pub fn sessions_of<'a>(&'a self, id: &'a SpiffeId) -> impl Iterator<Item = &'a Arc<Peer>> + 'a {
        self.peers.iter().filter(move |p| &p.spec.identity == id)
    }

    /// The first session with the remote workload `id`.
    pub fn by_identity(&self, id: &SpiffeId) -> Option<&Arc<Peer>> {
        self.peers.iter().find(|p| &p.spec.identity == id)
    }

    /// The session of local `local` with the remote workload `remote`, by keys.
    pub fn by_keys(&self, local: &[u8; 32], remote: &[u8; 32]) -> Option<&Arc<Peer>> {
        self.by_key.get(&(*local, *remote)).map(|&i| &self.peers[i])
    }

    /// The local workload whose certificate holds `addr`, as an index into
    /// [`PeerTable::locals`].
    pub fn local_for(&self, addr: IpAddr) -> Option<usize> {
        self.local_routes.lookup(addr).copied()
    }

    /// Cryptokey routing: the session of local workload `local` (an index into
    /// [`PeerTable::locals`]) with the peer whose certificate holds the longest prefix
    /// containing `dst`; the first local workload's session when `local` is `None`.
    pub fn route_from(&self, local: Option<usize>, dst: IpAddr) -> Option<&Arc<Peer>> {
        let row = &self.sessions[*self.routes.lookup(dst)?];
        let session = match local {
            Some(li) => row.get(li).copied().flatten(),
            None => row.iter().flatten().next().copied(),
        };
        session.map(|i| &self.peers[i])
    }

    /// The session of the first local workload with the peer holding `dst`.
    pub fn route(&self, dst: IpAddr) -> Option<&Arc<Peer>> {
        self.route_from(None, dst)
    }

    pub(super) fn by_receiver_index(&self, receiver_index: u32) -> Option<&Arc<Peer>> {
        self.by_index
            .get(&(receiver_index >> 8))
            .map(|&i| &self.peers[i])
    }

    /// A slot not used by this table, starting the search at `hint`.
    pub fn free_index(&self, hint: u32) -> u32 {
        let mut i = hint & INDEX_MASK;
        while i == 0 || self.by_index.contains_key(&i) {
            i = (i + 1) & INDEX_MASK;
        }
        i
    }

    /// Resets every local workload's handshake rate limiter count; call about once a
    /// second.
    pub fn reset_rate_limiters(&self) {
        for l in &self.locals {
            l.rate_limiter.reset_count();
        }
    }
}
