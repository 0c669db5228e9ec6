//! The peer table built from the effective peer set: one session per (local
//! workload, peer), kept across rebuilds where both static keys are unchanged. The
//! control plane (`daemon`, `workloads`) builds a table at every change and swaps it
//! in; the in-memory tier builds its tables the same way.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;

use mesh_proto::cert::Certificate;

use super::{Local, Peer, PeerSpec, PeerTable, INDEX_MASK};
use crate::peers::overlap;

/// Where a peer comes from (as `peer_list` reports it).
pub use mesh_proto::control::PeerSource as Source;

/// One peer of the effective set: a certificate the CA signed, and where to reach it.
#[derive(Clone, Debug)]
pub struct PeerEntry {
    pub cert: Certificate,
    pub spec: PeerSpec,
    pub endpoint: Option<SocketAddr>,
    pub source: Source,
}

/// The identities of `locals` and `entries` with their addresses, for
/// [`crate::peers::overlap`].
pub fn claims<'a>(
    locals: impl IntoIterator<Item = &'a PeerSpec>,
    entries: &'a [PeerEntry],
) -> Vec<overlap::Claim<'a>> {
    locals
        .into_iter()
        .chain(entries.iter().map(|e| &e.spec))
        .map(|s| (&s.identity, &s.addresses[..]))
        .collect()
}

/// What a peer certificate's verification says about it.
pub fn peer_spec(cert: &Certificate) -> PeerSpec {
    PeerSpec {
        identity: cert.identity().clone(),
        public_key: *cert.public_key(),
        addresses: cert.addresses().to_vec(),
        groups: cert.groups().to_vec(),
        not_before: cert.not_before(),
        not_after: cert.not_after(),
    }
}

/// Builds a table of one session per (local workload, peer), keeping the session (and
/// counters) of every pair whose two static keys are unchanged, so a change elsewhere,
/// or a certificate renewed for the same key, does not interrupt traffic.
pub fn build_table(
    locals: &[Arc<Local>],
    entries: &[PeerEntry],
    old: &PeerTable,
    mut hint: u32,
) -> Result<PeerTable, String> {
    // Every way an identity enters checks this first with a message of its own; here,
    // no table with overlapping addresses is ever built.
    if let Some(o) = overlap::first(&claims(locals.iter().map(|l| &l.spec), entries)) {
        return Err(o.to_string());
    }
    let mut peers: Vec<Arc<Peer>> = Vec::with_capacity(entries.len() * locals.len());
    let mut fresh: Vec<(usize, usize, usize)> = Vec::new();
    for (ei, e) in entries.iter().enumerate() {
        for (li, local) in locals.iter().enumerate() {
            match old.by_keys(&local.spec.public_key, &e.spec.public_key) {
                Some(p) => {
                    let kept = if p.spec == e.spec && Arc::ptr_eq(&p.local, local) {
                        p.clone()
                    } else {
                        // The same two keys under a renewed certificate (either
                        // side's): the session carries on, in its slot.
                        Arc::new(Peer::succeed(p, local, e.spec.clone()))
                    };
                    if let Some(ep) = e.endpoint {
                        if kept.endpoint().is_none() {
                            kept.set_endpoint(Some(ep));
                        }
                    }
                    peers.push(kept)
                }
                None => {
                    fresh.push((peers.len(), ei, li));
                    peers.push(Arc::new(Peer::new(local, e.spec.clone(), 0, e.endpoint)));
                }
            }
        }
    }
    // Give new sessions slots unused by both the old and the kept sessions.
    let fresh_at: BTreeSet<usize> = fresh.iter().map(|f| f.0).collect();
    let used: BTreeSet<u32> = peers
        .iter()
        .enumerate()
        .filter(|(i, _)| !fresh_at.contains(i))
        .map(|(_, p)| p.index)
        .chain(old.peers().iter().map(|p| p.index))
        .collect();
    for (i, ei, li) in fresh {
        hint &= INDEX_MASK;
        while hint == 0 || used.contains(&hint) {
            hint = (hint + 1) & INDEX_MASK;
        }
        let e = &entries[ei];
        peers[i] = Arc::new(Peer::new(&locals[li], e.spec.clone(), hint, e.endpoint));
        hint += 1;
    }
    PeerTable::with_locals(locals.to_vec(), peers).map_err(|e| e.to_string())
}
