//! Connection tracking (sans-IO): which flows exist, who opened them, and the value
//! the enforcer cached for each (its policy decision).
//!
//! A flow is keyed by its 5-tuple as seen in the packet that opened it (the
//! *original* direction); a packet whose reversed 5-tuple matches is a *reply*. ICMP
//! echo uses its identifier as both ports, so a reply (same identifier, addresses
//! swapped) matches the request's flow.
//!
//! Bounded by construction (invariant 6): the table never holds more than its
//! capacity. When full, expired flows are removed first (at most one full sweep per
//! second, so a flood cannot make every insert scan the table), then the oldest flow
//! that never saw a reply among a bounded sample (a half-open flood must not evict
//! established connections); if none is found, `insert` returns [`TableFull`] and the
//! caller fails closed for the new flow.
//!
//! Time is an argument: `now` is a [`Duration`] since an arbitrary, fixed epoch chosen
//! by the shell (its start).
//!
//! One hash per packet: a [`FlowHash`] is computed over the unordered pair of
//! endpoints, so a packet and its reply hash alike. The caller computes it once
//! (the enforcer also picks its shard with it) and the table finds the flow in
//! either direction without hashing again. The hash is keyed per process
//! ([`FlowHasher`]), so that peers cannot choose 5-tuples that collide.
//!
//! Memory follows the flows in use: the hash index holds only keys and slot numbers
//! (44 bytes a flow, reserved up front for the capacity, at most twice that after
//! churn), the flows themselves live
//! in a slab that fills from the front and reuses freed slots, so a host with a few
//! thousand flows does not touch the pages a full table would.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::time::Duration;

use hashbrown::hash_table::HashTable;
use slab::Slab;

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;

/// A flow's 5-tuple in one direction. For ICMP echo, both ports hold the identifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub proto: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
}

impl FlowKey {
    /// The same flow seen from the other end.
    pub fn reversed(&self) -> FlowKey {
        FlowKey {
            proto: self.proto,
            src: self.dst,
            dst: self.src,
            src_port: self.dst_port,
            dst_port: self.src_port,
        }
    }
}

/// A flow's hash, the same for both directions ([`FlowHasher::hash`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowHash(u64);

impl FlowHash {
    /// A shard index below `n` (n > 0) for this flow.
    pub fn shard(self, n: usize) -> usize {
        // The high bits: the table itself uses the low ones to place the flow.
        ((self.0 >> 32) as usize) % n
    }
}

/// Hashes flow keys with a key chosen at random per process (SipHash), so that
/// nobody outside can predict which 5-tuples collide. Clones hash alike.
#[derive(Clone, Debug, Default)]
pub struct FlowHasher(RandomState);

impl FlowHasher {
    /// The hash of `key`'s flow: the same for `key` and `key.reversed()`.
    pub fn hash(&self, key: &FlowKey) -> FlowHash {
        let a = (key.src, key.src_port);
        let b = (key.dst, key.dst_port);
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        FlowHash(self.0.hash_one((key.proto, lo, hi)))
    }
}

/// Which side of the mesh opened a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A local workload opened it (its first packet went out through the tunnel).
    Local,
    /// A peer opened it (its first packet arrived through the tunnel).
    Remote,
}

/// Direction of a packet relative to the flow it belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// Same direction as the packet that opened the flow.
    Original,
    /// The other way.
    Reply,
}

impl Dir {
    fn index(self) -> usize {
        match self {
            Dir::Original => 0,
            Dir::Reply => 1,
        }
    }
}

/// TCP flags the tracker looks at.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpFlags {
    pub syn: bool,
    pub ack: bool,
    pub fin: bool,
    pub rst: bool,
}

/// What the tracker learns from one packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Observation {
    /// TCP only: flags, sequence number, acknowledgement number and payload length.
    pub tcp: Option<TcpSegmentInfo>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpSegmentInfo {
    pub flags: TcpFlags,
    pub seq: u32,
    pub ack: u32,
    pub payload_len: u32,
}

/// Idle timeouts, by state.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// A TCP flow that has not completed its handshake, or a UDP/ICMP flow with no reply.
    pub unreplied: Duration,
    /// An established TCP flow.
    pub tcp_established: Duration,
    /// A TCP flow after FIN in both directions or RST.
    pub tcp_closing: Duration,
    /// A UDP or ICMP flow that saw replies.
    pub datagram_replied: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            unreplied: Duration::from_secs(30),
            tcp_established: Duration::from_secs(2 * 3600),
            tcp_closing: Duration::from_secs(10),
            datagram_replied: Duration::from_secs(180),
        }
    }
}

/// One tracked flow and the caller's value for it.
#[derive(Clone, Debug)]
pub struct Flow<V> {
    pub origin: Origin,
    pub value: V,
    pub last_seen: Duration,
    /// A packet travelled in the reply direction.
    pub replied: bool,
    /// FIN seen, per direction.
    fin: [bool; 2],
    rst: bool,
    /// TCP: the sequence number following the last segment, per direction; what a
    /// reset injected in that direction must carry to be accepted.
    next_seq: [Option<u32>; 2],
}

impl<V> Flow<V> {
    fn new(origin: Origin, value: V, now: Duration) -> Self {
        Flow {
            origin,
            value,
            last_seen: now,
            replied: false,
            fin: [false; 2],
            rst: false,
            next_seq: [None; 2],
        }
    }

    /// The next sequence number of the sender in `dir`, once a segment was seen.
    pub fn next_seq(&self, dir: Dir) -> Option<u32> {
        self.next_seq[dir.index()]
    }

    /// Whether the flow has ended (RST, or FIN in both directions).
    pub fn is_closing(&self) -> bool {
        self.rst || (self.fin[0] && self.fin[1])
    }

    fn observe(&mut self, dir: Dir, obs: &Observation, now: Duration) {
        self.last_seen = now;
        if dir == Dir::Reply {
            self.replied = true;
        }
        if let Some(tcp) = obs.tcp {
            let i = dir.index();
            self.fin[i] |= tcp.flags.fin;
            self.rst |= tcp.flags.rst;
            // SYN and FIN each occupy one sequence number (RFC 9293, 3.4).
            let len = tcp.payload_len + u32::from(tcp.flags.syn) + u32::from(tcp.flags.fin);
            self.next_seq[i] = Some(tcp.seq.wrapping_add(len));
        }
    }

    fn timeout(&self, proto: u8, t: &Timeouts) -> Duration {
        match proto {
            PROTO_TCP if self.is_closing() => t.tcp_closing,
            PROTO_TCP if self.replied => t.tcp_established,
            _ if self.replied => t.datagram_replied,
            _ => t.unreplied,
        }
    }

    fn expired(&self, proto: u8, t: &Timeouts, now: Duration) -> bool {
        now.saturating_sub(self.last_seen) > self.timeout(proto, t)
    }
}

/// The table is full of live, established flows; the new flow must be refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("connection table full ({capacity} flows)")]
pub struct TableFull {
    pub capacity: usize,
}

/// The connection table. Not synchronised: the shell shards it.
#[derive(Debug)]
pub struct ConnTrack<V> {
    /// Original key → slot in `flows`. Reserved for the capacity up front; under
    /// insert/remove churn its tombstones can make it rebuild once, one size up (so
    /// at most twice the reservation), never more since it never holds more than
    /// `capacity` keys. The hash is not stored: the cold paths that need a flow's
    /// hash (eviction, a rebuild) compute it again.
    index: HashTable<(FlowKey, u32)>,
    flows: Slab<Flow<V>>,
    hasher: FlowHasher,
    capacity: usize,
    timeouts: Timeouts,
    evicted: u64,
    last_sweep: Option<Duration>,
}

/// How many flows a full table looks at to find one to evict.
const EVICTION_SAMPLE: usize = 64;
/// A full table sweeps expired flows at most this often.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

impl<V> ConnTrack<V> {
    /// A table of at most `capacity` flows (at most `u32::MAX`); its memory is
    /// reserved up front.
    pub fn new(capacity: usize, timeouts: Timeouts) -> Self {
        ConnTrack::with_hasher(capacity, timeouts, FlowHasher::default())
    }

    /// As [`ConnTrack::new`], hashing with `hasher`: the `*_hashed` methods take
    /// hashes made by it (or a clone).
    pub fn with_hasher(capacity: usize, timeouts: Timeouts, hasher: FlowHasher) -> Self {
        let capacity = capacity.min(u32::MAX as usize);
        ConnTrack {
            index: HashTable::with_capacity(capacity),
            flows: Slab::with_capacity(capacity),
            hasher,
            capacity,
            timeouts,
            evicted: 0,
            last_sweep: None,
        }
    }

    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Flows removed to make room for new ones since the table was made.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Finds the flow of a packet with 5-tuple `key`, records what the packet shows,
    /// and tells in which direction it travels. An expired flow is not found (and is
    /// removed).
    pub fn track(
        &mut self,
        key: &FlowKey,
        obs: &Observation,
        now: Duration,
    ) -> Option<(Dir, &mut Flow<V>)> {
        let h = self.hasher.hash(key);
        self.track_hashed(h, key, obs, now)
    }

    /// [`ConnTrack::track`] with the flow's hash already computed.
    pub fn track_hashed(
        &mut self,
        h: FlowHash,
        key: &FlowKey,
        obs: &Observation,
        now: Duration,
    ) -> Option<(Dir, &mut Flow<V>)> {
        // The original direction first: if both a flow and its mirror image exist
        // (two ends that opened the same 5-tuple), the packet belongs to its own.
        let (dir, entry) = match self.index.find_entry(h.0, |(k, _)| k == key) {
            Ok(e) => (Dir::Original, e),
            Err(absent) => {
                let r = key.reversed();
                let e = absent.into_table().find_entry(h.0, |(k, _)| *k == r).ok()?;
                (Dir::Reply, e)
            }
        };
        let slot = entry.get().1 as usize;
        if self.flows[slot].expired(key.proto, &self.timeouts, now) {
            entry.remove();
            self.flows.remove(slot);
            return None;
        }
        let flow = &mut self.flows[slot];
        flow.observe(dir, obs, now);
        Some((dir, flow))
    }

    /// Every tracked flow, in no particular order.
    pub fn flows(&self) -> impl Iterator<Item = &Flow<V>> {
        self.flows.iter().map(|(_, f)| f)
    }

    /// The flow stored under exactly `key` (its original direction), without
    /// recording anything.
    pub fn get(&self, key: &FlowKey) -> Option<&Flow<V>> {
        self.get_hashed(self.hasher.hash(key), key)
    }

    /// [`ConnTrack::get`] with the flow's hash already computed.
    pub fn get_hashed(&self, h: FlowHash, key: &FlowKey) -> Option<&Flow<V>> {
        let &(_, slot) = self.index.find(h.0, |(k, _)| k == key)?;
        Some(&self.flows[slot as usize])
    }

    /// Starts tracking a flow opened by a packet with 5-tuple `key`. Makes room if
    /// needed (see the module docs); refuses with [`TableFull`] otherwise. A flow
    /// already tracked under `key` is kept as it is.
    pub fn insert(
        &mut self,
        key: FlowKey,
        origin: Origin,
        value: V,
        obs: &Observation,
        now: Duration,
    ) -> Result<&mut Flow<V>, TableFull> {
        let h = self.hasher.hash(&key);
        self.insert_hashed(h, key, origin, value, obs, now)
    }

    /// [`ConnTrack::insert`] with the flow's hash already computed.
    pub fn insert_hashed(
        &mut self,
        h: FlowHash,
        key: FlowKey,
        origin: Origin,
        value: V,
        obs: &Observation,
        now: Duration,
    ) -> Result<&mut Flow<V>, TableFull> {
        if let Some(&(_, slot)) = self.index.find(h.0, |(k, _)| *k == key) {
            return Ok(&mut self.flows[slot as usize]);
        }
        if self.flows.len() >= self.capacity {
            self.make_room(now)?;
        }
        let mut flow = Flow::new(origin, value, now);
        flow.observe(Dir::Original, obs, now);
        let slot = self.flows.insert(flow);
        let hasher = &self.hasher;
        let rehash = |(k, _): &(FlowKey, u32)| hasher.hash(k).0;
        // Absent (looked up above); `slot` < capacity <= u32::MAX.
        self.index.insert_unique(h.0, (key, slot as u32), rehash);
        Ok(&mut self.flows[slot])
    }

    fn make_room(&mut self, now: Duration) -> Result<(), TableFull> {
        let due = self
            .last_sweep
            .is_none_or(|t| now.saturating_sub(t) >= SWEEP_INTERVAL);
        if due && self.sweep(now) > 0 {
            return Ok(());
        }
        // Oldest flow that never saw a reply, among a sample (the index's order
        // follows the keyed hash): half-open floods evict each other, never an
        // established connection.
        let flows = &self.flows;
        let victim = self
            .index
            .iter()
            .take(EVICTION_SAMPLE)
            .map(|&(k, slot)| (k, &flows[slot as usize]))
            .filter(|(_, f)| !f.replied)
            .min_by_key(|(_, f)| f.last_seen)
            .map(|(k, _)| k);
        match victim {
            Some(k) => {
                self.remove(&k);
                self.evicted += 1;
                Ok(())
            }
            None => Err(TableFull {
                capacity: self.capacity,
            }),
        }
    }

    /// Removes expired flows; returns how many.
    pub fn sweep(&mut self, now: Duration) -> usize {
        self.last_sweep = Some(now);
        let timeouts = self.timeouts;
        let before = self.flows.len();
        self.retain(|k, f| !f.expired(k.proto, &timeouts, now));
        before - self.flows.len()
    }

    /// Visits every flow (e.g. to re-evaluate cached decisions after a policy change);
    /// flows for which `f` returns false are removed.
    pub fn retain(&mut self, mut f: impl FnMut(&FlowKey, &mut Flow<V>) -> bool) {
        let flows = &mut self.flows;
        self.index.retain(|(k, slot)| {
            let keep = f(k, &mut flows[*slot as usize]);
            if !keep {
                flows.remove(*slot as usize);
            }
            keep
        });
    }

    pub fn remove(&mut self, key: &FlowKey) -> Option<Flow<V>> {
        self.remove_hashed(self.hasher.hash(key), key)
    }

    /// [`ConnTrack::remove`] with the flow's hash already computed.
    pub fn remove_hashed(&mut self, h: FlowHash, key: &FlowKey) -> Option<Flow<V>> {
        let entry = self.index.find_entry(h.0, |(k, _)| k == key).ok()?;
        let ((_, slot), _) = entry.remove();
        Some(self.flows.remove(slot as usize))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(sport: u16, dport: u16) -> FlowKey {
        FlowKey {
            proto: PROTO_TCP,
            src: "100.64.0.1".parse().unwrap(),
            dst: "100.64.0.2".parse().unwrap(),
            src_port: sport,
            dst_port: dport,
        }
    }

    fn tcp(syn: bool, ack: bool, fin: bool, rst: bool, seq: u32, len: u32) -> Observation {
        Observation {
            tcp: Some(TcpSegmentInfo {
                flags: TcpFlags { syn, ack, fin, rst },
                seq,
                ack: 0,
                payload_len: len,
            }),
        }
    }

    const NONE: Observation = Observation { tcp: None };

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn both_directions_hash_alike_and_clones_agree() {
        let h = FlowHasher::default();
        let k = key(40000, 80);
        assert_eq!(h.hash(&k), h.hash(&k.reversed()));
        assert_eq!(h.clone().hash(&k), h.hash(&k));
        assert_ne!(h.hash(&k), h.hash(&key(40001, 80)));
        // A table given the shared hasher finds what the hashed calls stored.
        let mut ct = ConnTrack::with_hasher(8, Timeouts::default(), h.clone());
        ct.insert_hashed(h.hash(&k), k, Origin::Local, 1u8, &NONE, secs(0))
            .unwrap();
        assert!(ct.get(&k).is_some());
        let (dir, _) = ct.track(&k.reversed(), &NONE, secs(1)).unwrap();
        assert_eq!(dir, Dir::Reply);
        assert!(ct.remove_hashed(h.hash(&k), &k).is_some());
        assert!(ct.is_empty());
    }

    /// Two ends that opened the same 5-tuple towards each other: each packet belongs
    /// to the flow of its own direction.
    #[test]
    fn mirror_image_flows_stay_apart() {
        let mut ct = ConnTrack::new(8, Timeouts::default());
        let k = key(7, 7);
        ct.insert(k, Origin::Local, 'l', &NONE, secs(0)).unwrap();
        ct.insert(k.reversed(), Origin::Remote, 'r', &NONE, secs(0))
            .unwrap();
        let (dir, f) = ct.track(&k, &NONE, secs(1)).unwrap();
        assert_eq!((dir, f.value), (Dir::Original, 'l'));
        let (dir, f) = ct.track(&k.reversed(), &NONE, secs(1)).unwrap();
        assert_eq!((dir, f.value), (Dir::Original, 'r'));
    }

    #[test]
    fn reply_matches_reversed_key() {
        let mut ct = ConnTrack::new(8, Timeouts::default());
        let k = key(40000, 80);
        ct.insert(k, Origin::Remote, "allow", &NONE, secs(0))
            .unwrap();
        let (dir, flow) = ct.track(&k.reversed(), &NONE, secs(1)).unwrap();
        assert_eq!(dir, Dir::Reply);
        assert!(flow.replied);
        assert_eq!(flow.value, "allow");
        let (dir, _) = ct.track(&k, &NONE, secs(2)).unwrap();
        assert_eq!(dir, Dir::Original);
        // A different source port is a different flow.
        assert!(ct.track(&key(40001, 80), &NONE, secs(2)).is_none());
    }

    #[test]
    fn tracks_next_sequence_per_direction_with_wrap() {
        let mut ct = ConnTrack::new(8, Timeouts::default());
        let k = key(40000, 80);
        let f = ct
            .insert(
                k,
                Origin::Remote,
                (),
                &tcp(true, false, false, false, u32::MAX, 0),
                secs(0),
            )
            .unwrap();
        // SYN occupies one sequence number: wraps to 0.
        assert_eq!(f.next_seq(Dir::Original), Some(0));
        ct.track(&k.reversed(), &tcp(true, true, false, false, 7, 0), secs(0));
        ct.track(&k, &tcp(false, true, false, false, 0, 100), secs(0));
        let (_, f) = ct.track(&k, &NONE, secs(0)).unwrap();
        assert_eq!(f.next_seq(Dir::Original), Some(100));
        assert_eq!(f.next_seq(Dir::Reply), Some(8));
    }

    #[test]
    fn idle_flows_expire_by_state() {
        let t = Timeouts::default();
        let mut ct = ConnTrack::new(8, t);
        let k = key(1, 2);
        ct.insert(
            k,
            Origin::Local,
            (),
            &tcp(true, false, false, false, 0, 0),
            secs(0),
        )
        .unwrap();
        // Unreplied: gone after 30 s.
        assert!(ct.track(&k, &NONE, t.unreplied + secs(1)).is_none());
        assert!(ct.is_empty());

        ct.insert(
            k,
            Origin::Local,
            (),
            &tcp(true, false, false, false, 0, 0),
            secs(0),
        )
        .unwrap();
        ct.track(&k.reversed(), &tcp(true, true, false, false, 0, 0), secs(1));
        // Established: still there long after the unreplied timeout.
        assert!(ct.track(&k, &NONE, secs(1000)).is_some());
        // Both FINs: closing timeout applies.
        ct.track(&k, &tcp(false, true, true, false, 1, 0), secs(1000));
        ct.track(
            &k.reversed(),
            &tcp(false, true, true, false, 1, 0),
            secs(1000),
        );
        assert_eq!(ct.sweep(secs(1000) + t.tcp_closing + secs(1)), 1);
    }

    #[test]
    fn full_table_evicts_half_open_before_established() {
        let mut ct = ConnTrack::new(2, Timeouts::default());
        let est = key(1, 80);
        ct.insert(est, Origin::Remote, 'e', &NONE, secs(0)).unwrap();
        ct.track(&est.reversed(), &NONE, secs(0));
        ct.insert(key(2, 80), Origin::Remote, 'h', &NONE, secs(1))
            .unwrap();
        // Full: the half-open flow goes, the established one stays.
        ct.insert(key(3, 80), Origin::Remote, 'n', &NONE, secs(2))
            .unwrap();
        assert_eq!(ct.len(), 2);
        assert_eq!(ct.evicted(), 1);
        assert!(ct.track(&est, &NONE, secs(2)).is_some());
        assert!(ct.track(&key(2, 80), &NONE, secs(2)).is_none());
    }

    #[test]
    fn full_of_established_refuses_new_flow() {
        let mut ct = ConnTrack::new(1, Timeouts::default());
        let est = key(1, 80);
        ct.insert(est, Origin::Remote, (), &NONE, secs(0)).unwrap();
        ct.track(&est.reversed(), &NONE, secs(0));
        let err = ct
            .insert(key(2, 80), Origin::Remote, (), &NONE, secs(1))
            .unwrap_err();
        assert_eq!(err, TableFull { capacity: 1 });
        assert_eq!(ct.len(), 1);
        // Once the established flow has expired, there is room again.
        let later = secs(1) + Timeouts::default().tcp_established + secs(1);
        assert!(ct
            .insert(key(2, 80), Origin::Remote, (), &NONE, later)
            .is_ok());
    }

    #[test]
    fn never_exceeds_capacity_under_flood() {
        let mut ct = ConnTrack::new(64, Timeouts::default());
        let slab = ct.flows.capacity();
        let index = ct.index.capacity();
        for p in 0..10_000u16 {
            let _ = ct.insert(key(p, 80), Origin::Remote, (), &NONE, secs(0));
            assert!(ct.len() <= 64);
            assert_eq!(ct.index.len(), ct.flows.len());
            // Freed slots are reused: the slab never grows. The index may be rebuilt
            // once, one size up, when removals have left it full of tombstones.
            assert_eq!(ct.flows.capacity(), slab);
            assert!(
                ct.index.capacity() <= 2 * index + 16,
                "{}",
                ct.index.capacity()
            );
        }
    }

    #[test]
    fn retain_removes_rejected_flows() {
        let mut ct = ConnTrack::new(8, Timeouts::default());
        ct.insert(key(1, 80), Origin::Remote, 80u16, &NONE, secs(0))
            .unwrap();
        ct.insert(key(1, 22), Origin::Remote, 22u16, &NONE, secs(0))
            .unwrap();
        ct.retain(|_, f| f.value != 22);
        assert_eq!(ct.len(), 1);
        assert!(ct.track(&key(1, 80), &NONE, secs(0)).is_some());
    }
}
