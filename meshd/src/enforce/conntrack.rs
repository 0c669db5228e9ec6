//! Connection tracking (sans-IO): which flows exist, who opened them, and the value
//! the enforcer cached for each (its policy decision).
//!
//! A flow is keyed by its 5-tuple as seen in the packet that opened it (the
//! *original* direction); a packet whose reversed 5-tuple matches is a *reply*. ICMP
//! echo uses its identifier as both ports, so a reply (same identifier, addresses
//! swapped) matches the request's flow.
//!
//! TCP flows are followed per direction as an observer in the path sees them: the
//! highest sequence number each side sent, what each acknowledged, the right edge of
//! the window each offered (scaled, RFC 7323). [`Flow::observe`] takes a RST only at
//! a number its receiver can expect (RFC 5961 §3.2) and a FIN only inside its
//! receiver's window; what it does not take changes nothing (a forged RST cannot end
//! a flow, a forged FIN cannot start its closing timeout). The numbers a reset must
//! carry to end a connection come from the same state ([`Flow::next_seq`],
//! [`Flow::acked`]), so they are right whatever the last segment was (a keepalive
//! probe sits one below the next sequence number).
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
use std::time::Duration;

use hashbrown::hash_table::HashTable;
use slab::Slab;

use crate::enforce::flow::SeqNumber;

pub use crate::wire::{FlowKey, TcpFlags, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};

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

/// What the tracker learns from one packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Observation {
    /// TCP only: flags, sequence number, acknowledgement number and payload length.
    pub tcp: Option<TcpSegmentInfo>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpSegmentInfo {
    pub flags: TcpFlags,
    pub seq: u32,
    pub ack: u32,
    pub payload_len: u32,
    /// The advertised window, as on the wire (unscaled).
    pub window: u16,
    /// On a SYN: the window scale option (RFC 7323 §2.2), if present.
    pub wscale: Option<u8>,
}

impl TcpSegmentInfo {
    /// A TCP opening: SYN without ACK (and without RST). Only such a segment going out
    /// makes a flow count as opened by the local side (DESIGN.md invariant 3).
    pub fn opens(&self) -> bool {
        self.flags.syn() && !self.flags.ack() && !self.flags.rst()
    }

    /// Sequence space the segment occupies: payload, plus one each for SYN and FIN
    /// (RFC 9293 §3.4).
    fn seq_len(&self) -> usize {
        self.payload_len as usize + usize::from(self.flags.syn()) + usize::from(self.flags.fin())
    }
}

/// Idle timeouts, by state.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// A TCP flow that has not completed its handshake, or a UDP/ICMP flow with no reply.
    pub unreplied: Duration,
    /// An established TCP flow. Longer than Linux's default keepalive time (7,200 s)
    /// so that the first keepalive probe of an idle connection still finds its flow:
    /// a local workload's segment of a flow meshd no longer tracks is answered with
    /// resets, not taken as a new opening.
    pub tcp_established: Duration,
    /// A TCP flow after FIN in both directions, a RST, a refusal or a cut.
    pub tcp_closing: Duration,
    /// A UDP or ICMP flow that saw replies.
    pub datagram_replied: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            unreplied: Duration::from_secs(30),
            tcp_established: Duration::from_secs(2 * 3600 + 600),
            tcp_closing: Duration::from_secs(10),
            datagram_replied: Duration::from_secs(180),
        }
    }
}

/// The TCP state of one direction of a flow, as an observer in the path sees it in
/// that side's segments (RFC 9293 §3.3.1): what it sent (its SND.NXT), what it
/// acknowledged (its RCV.NXT as last announced) and the right edge of the window it
/// offered (RCV.NXT + RCV.WND).
#[derive(Clone, Copy, Debug, Default)]
struct TcpSide {
    /// A segment from this side was taken.
    seen: bool,
    /// Its SYN was seen (so its window scale offer is known).
    syn: bool,
    /// Its FIN was taken.
    fin: bool,
    has_ack: bool,
    /// Window scale it offered on its SYN, if any.
    wscale: Option<u8>,
    /// Sequence number of the first segment taken from it (its ISN if the SYN was seen).
    start: SeqNumber,
    /// One past the highest sequence number it sent (SYN and FIN count).
    end: SeqNumber,
    /// Its highest acknowledgement (valid with `has_ack`).
    acked: SeqNumber,
    /// The farthest right edge of the window it offered: `acked + window`, scaled.
    right: SeqNumber,
    /// Its largest window, scaled.
    max_window: u32,
}

/// What the tracker made of one packet ([`Flow::observe`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// Taken: the flow's state follows it.
    Taken,
    /// A RST at the sequence number its receiver expects: taken, the flow has ended.
    Reset,
    /// A RST inside its receiver's window but not at the number it expects (RFC 5961
    /// §3.2): not taken. A receiver answers it with a challenge ACK, so that a sender
    /// who lost track can send an exact reset.
    RstInWindow,
    /// A RST or FIN outside its receiver's window: not taken, and the receiver would
    /// not take it either.
    OutOfWindow,
}

/// One tracked flow and the caller's value for it.
#[derive(Clone, Debug)]
pub struct Flow<V> {
    pub origin: Origin,
    pub value: V,
    pub last_seen: Duration,
    /// A packet travelled in the reply direction.
    pub replied: bool,
    /// Ended by a RST, or by its owner ([`Flow::close`]).
    closed: bool,
    /// TCP only: per direction ([`Dir::index`]).
    tcp: [TcpSide; 2],
}

impl<V> Flow<V> {
    fn new(origin: Origin, value: V, now: Duration) -> Self {
        Flow {
            origin,
            value,
            last_seen: now,
            replied: false,
            closed: false,
            tcp: [TcpSide::default(); 2],
        }
    }

    /// The next sequence number of the sender in `dir` (the highest it used, so that
    /// a keepalive probe at next−1 does not lower it), once a segment was seen.
    pub fn next_seq(&self, dir: Dir) -> Option<u32> {
        let s = &self.tcp[dir.index()];
        s.seen.then_some(s.end.0)
    }

    /// What the receiver of `dir` last acknowledged of that direction's stream: the
    /// other candidate, besides [`Flow::next_seq`], for the number it expects next.
    pub fn acked(&self, dir: Dir) -> Option<u32> {
        let r = &self.tcp[1 - dir.index()];
        r.has_ack.then_some(r.acked.0)
    }

    /// The challenge ACK (RFC 5961 §3.2) the receiver of `dir` would send to a RST
    /// that was not exact: its own next sequence number and what it acknowledged.
    pub fn challenge(&self, dir: Dir) -> Option<(SeqNumber, SeqNumber)> {
        let r = &self.tcp[1 - dir.index()];
        (r.seen && r.has_ack).then_some((r.end, r.acked))
    }

    /// Whether a TCP sequence number quoted by an ICMP error (RFC 5927 §4.1) is one the
    /// sender in `dir` has sent and its receiver not yet acknowledged: between SND.UNA
    /// and SND.NXT. Always true for other protocols' flows (no sequence numbers).
    pub fn sent_unacked(&self, dir: Dir, seq: u32) -> bool {
        let (s, r) = (&self.tcp[dir.index()], &self.tcp[1 - dir.index()]);
        if !s.seen {
            return false;
        }
        let una = if r.has_ack { r.acked } else { s.start };
        (0..=s.end - una).contains(&(SeqNumber(seq) - una))
    }

    /// Whether the flow has ended (RST, FIN in both directions, or closed by its owner).
    pub fn is_closing(&self) -> bool {
        self.closed || (self.tcp[0].fin && self.tcp[1].fin)
    }

    /// Ends the flow: it is kept for the closing timeout only (a refused or cut flow).
    pub fn close(&mut self) {
        self.closed = true;
    }

    /// Records what a packet in `dir` shows, and says whether it was taken. A RST is
    /// taken only at the sequence number its receiver expects (RFC 5961 §3.2, from
    /// what this tracker saw: between what the receiver acknowledged and what the
    /// sender sent), a FIN only inside its receiver's window; one that is not taken
    /// changes nothing, not even the idle timer.
    pub fn observe(&mut self, dir: Dir, obs: &Observation, now: Duration) -> Seen {
        let i = dir.index();
        let seen = match obs.tcp {
            Some(t) if t.flags.rst() => match self.rst_check(i, &t) {
                Seen::Reset => {
                    self.closed = true;
                    Seen::Reset
                }
                other => return other,
            },
            Some(t) if t.flags.fin() && !self.fin_in_window(i, &t) => return Seen::OutOfWindow,
            Some(t) => {
                self.record(i, &t);
                Seen::Taken
            }
            None => Seen::Taken,
        };
        self.last_seen = now;
        if dir == Dir::Reply {
            self.replied = true;
        }
        seen
    }

    /// Window scale in effect for the windows side `i` advertises: its offer if both
    /// SYNs carried the option, none if a SYN without it was seen, and the largest
    /// (14) when the handshake was not seen (a flow picked up mid-stream): a window
    /// read too large only makes the checks more lenient.
    fn scale(&self, i: usize) -> u8 {
        let (a, b) = (&self.tcp[0], &self.tcp[1]);
        if !(a.syn && b.syn) {
            return 14;
        }
        match (a.wscale, b.wscale) {
            (Some(_), Some(_)) => self.tcp[i].wscale.unwrap_or(0).min(14),
            _ => 0,
        }
    }

    fn record(&mut self, i: usize, t: &TcpSegmentInfo) {
        let other = {
            let r = &self.tcp[1 - i];
            r.seen.then_some((r.start, r.end))
        };
        let scale = if t.flags.syn() { 0 } else { self.scale(i) };
        let s = &mut self.tcp[i];
        let seq = SeqNumber(t.seq);
        let end = seq + t.seq_len();
        if !s.seen {
            s.seen = true;
            s.start = seq;
            s.end = end;
        } else if end > s.end {
            s.end = end;
        }
        if t.flags.syn() {
            s.syn = true;
            s.wscale = t.wscale;
        }
        s.fin |= t.flags.fin();
        if !t.flags.ack() {
            return;
        }
        let ack = SeqNumber(t.ack);
        // An acknowledgement of bytes the other side never sent, or of none it sent, is
        // not taken (RFC 9293 §3.10.7.4: SND.UNA < SEG.ACK =< SND.NXT): it would move
        // the numbers resets are checked against.
        if other.is_some_and(|(start, end)| ack > end || ack <= start) {
            return;
        }
        let window = u32::from(t.window) << scale;
        if !s.has_ack || ack > s.acked {
            s.acked = ack;
        }
        let right = ack + window as usize;
        if !s.has_ack || right > s.right {
            s.right = right;
        }
        s.has_ack = true;
        s.max_window = s.max_window.max(window);
    }

    /// RFC 5961 §3.2 from the middle: a RST from side `i` is exact when its sequence
    /// number can be its receiver's RCV.NXT, i.e. lies between what the receiver last
    /// acknowledged and what the sender has sent; in the window when it lies before
    /// the right edge the receiver offered. A receiver in SYN-SENT takes a RST only if
    /// it acknowledges its SYN (RFC 9293 §3.10.7.3).
    fn rst_check(&self, i: usize, t: &TcpSegmentInfo) -> Seen {
        let (s, r) = (&self.tcp[i], &self.tcp[1 - i]);
        if r.syn && !r.has_ack {
            return if t.flags.ack() && r.seen && SeqNumber(t.ack) == r.end {
                Seen::Reset
            } else {
                Seen::OutOfWindow
            };
        }
        let mut lo = match (r.has_ack, s.seen) {
            (true, _) => r.acked,
            (false, true) => s.end,
            // Nothing seen to check it against.
            (false, false) => return Seen::Reset,
        };
        if s.fin && (s.end - 1usize) - lo < 0 {
            // After its FIN, a stack answers with a RST at the FIN's own number (the
            // acknowledgement of a segment that crossed the FIN), which the receiver
            // has already acknowledged; Linux takes it in CLOSE-WAIT, CLOSING and
            // LAST-ACK (`tcp_reset_check`), and so does this tracker.
            lo = s.end - 1usize;
        }
        let hi = if s.seen && s.end > lo { s.end } else { lo };
        // Distances from `lo`, so that a number half the space away is not read as
        // both before and after.
        let d = SeqNumber(t.seq) - lo;
        if (0..=hi - lo).contains(&d) {
            Seen::Reset
        } else if r.has_ack && d > 0 && d < r.right - lo {
            Seen::RstInWindow
        } else {
            Seen::OutOfWindow
        }
    }

    /// A FIN is taken when its position lies in its receiver's window, or before it
    /// (a retransmission); far outside, the receiver would drop it too. One window of
    /// slack each way (at least 64 KiB): meshd acknowledges held request bytes on a
    /// server's behalf (`l7::HeldAck`), so a client may send that far past the window
    /// the server itself offered.
    fn fin_in_window(&self, i: usize, t: &TcpSegmentInfo) -> bool {
        let r = &self.tcp[1 - i];
        if !r.has_ack {
            return true;
        }
        let fin = SeqNumber(t.seq) + (t.payload_len as usize + usize::from(t.flags.syn()));
        let slack = i64::from(r.max_window.max(u32::from(u16::MAX)));
        fin - r.right <= slack && fin - r.acked >= -slack
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

    /// Finds the flow of a packet with 5-tuple `key`, records what the packet shows
    /// ([`Flow::observe`]), and tells in which direction it travels and what the flow
    /// made of it. An expired flow is not found (and is removed).
    pub fn track(
        &mut self,
        key: &FlowKey,
        obs: &Observation,
        now: Duration,
    ) -> Option<(Dir, Seen, &mut Flow<V>)> {
        let h = self.hasher.hash(key);
        let (dir, flow) = self.find_hashed(h, key, now)?;
        let seen = flow.observe(dir, obs, now);
        Some((dir, seen, flow))
    }

    /// Finds the flow of a packet with 5-tuple `key` (hashed `h`) and tells in which
    /// direction the packet travels, without recording anything: the caller checks
    /// the packet first, then records it with [`Flow::observe`]. An expired flow is
    /// not found (and is removed).
    pub fn find_hashed(
        &mut self,
        h: FlowHash,
        key: &FlowKey,
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
        Some((dir, &mut self.flows[slot]))
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
mod tests;
