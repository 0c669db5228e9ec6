//! Enforcement in the packet path (invariant 3: policy decides before delivery).
//!
//! Every packet between a peer and a local workload passes here: inbound after
//! decryption and the secure-naming check, outbound before encryption. Flows are
//! tracked ([`crate::enforce::conntrack`]):
//! - a flow a peer opens is decided by policy once, from the identity its key proved;
//!   the decision is cached with the policy generation and re-evaluated when the
//!   policy changes ([`Enforcer::set_policy`] cuts flows the new policy forbids);
//! - replies to a flow a local workload opened pass (policy governs what may reach a
//!   workload, not its answers);
//! - a flow counts as opened by a local workload only when meshd saw it open it: a SYN
//!   without ACK going out (TCP), its first datagram (UDP), an echo request (ICMP).
//!   A local packet of no flow that is not an opening (a SYN-ACK, data, a
//!   retransmission, after a flow expired or meshd restarted) creates nothing; a TCP
//!   one is answered with resets to both ends so that neither waits for a timeout.
//!   A peer's packet of no flow is decided as a new inbound packet; one that policy
//!   refuses and that is not a SYN is answered with resets too;
//! - a flow is bound to the identity at its far end: a flow a peer opened takes
//!   packets only from that identity, one a local workload opened takes replies only
//!   from the peer it was sent to;
//! - RSTs are taken only at the sequence number their receiver expects and FINs only
//!   inside its window ([`crate::enforce::conntrack::Flow::observe`], RFC 5961); a RST inside
//!   the window but not exact is answered with a challenge ACK on its receiver's
//!   behalf and goes no further;
//! - a flow a new policy forbids is cut: resets to both ends, and a tombstone that
//!   refuses its packets in both directions (a UDP server's next datagram must not
//!   reopen it as the local side's) until policy allows a new opening or it expires;
//! - ICMP errors pass only from the far end of the flow they quote, about a packet
//!   that went from here to it (for TCP, a sequence number sent and not yet
//!   acknowledged, RFC 5927 §4.1);
//! - denied flows are not tracked, so a flood of refused packets cannot fill the table;
//! - on a port with HTTP rules (`CompiledPolicy::inspects`), a TCP flow is inspected at
//!   layer 7 ([`crate::enforce::l7`]): each request head is decided with its method, normalised
//!   path, host and headers; what is delivered, trimmed, released or refused comes back
//!   as the verdict plus packets in an [`Emit`] (an injected 4xx towards the peer and a
//!   reset towards the local server on refusal). A segment of such a flow must carry
//!   a valid TCP checksum: inspected bytes must be the bytes the server accepts. A SYN
//!   from a source that no rule could allow there, whatever its requests, is refused
//!   with a reset (`policy::deny_every_request`) instead of completing a handshake
//!   that could carry nothing; UDP to such a port is refused unless the rule that
//!   allows it names UDP (HTTP/3 would pass uninspected). After a refusal, meshd
//!   answers the client on the server's behalf until it has closed (the response
//!   again if it was lost, an ACK of its FIN, a reset for more data), and the flow
//!   leaves the table within the closing timeout; a new SYN on the same 5-tuple
//!   starts a new flow, as after any close (Linux conntrack does the same for
//!   TIME-WAIT reuse).
//!
//! # After a restart
//!
//! meshd does not re-learn the connections that were open before it started. The
//! first packet of each, in either direction, is decided as a packet of no flow: a
//! local workload's is no opening, a peer's is refused unless policy allows it (then,
//! on a layer-4 port, the flow is picked up as the peer's); either way a refused one
//! is answered with resets to both ends, so both see the connection fail at once
//! instead of waiting on a silent black hole (issue 26.3). The local end's reset
//! carries the refused segment's number, which is old if the local end had received
//! more than the peer knows (its ACKs lost while meshd was down); an empty segment
//! before that number makes the local end answer with an ACK of what it expects, and
//! that ACK, a local packet of no flow, gets the exact reset. Re-learning them from the
//! kernel's socket tables (sock_diag in the node's and every pod's namespace) was the
//! alternative; it was not chosen because a socket table does not prove who opened a
//! connection (a workload with CAP_NET_ADMIN can create an established socket for any
//! 5-tuple with TCP_REPAIR, and simultaneous open or a listener on the same port
//! blur it), so it would let a restart turn an unknown flow into an allowed one —
//! exactly what invariant 3 forbids. The price is one reconnect per connection per
//! restart; the same resets answer a flow that expired or was evicted.
//!
//! Packets are read through [`crate::wire`]'s views, once: the node core hands over
//! the IP view `peers` checked ([`Enforcer::inbound_ip`], [`Enforcer::outbound_ip`],
//! [`Enforcer::between_locals_ip`]), and the enforcer walks its extension headers and
//! reads its transport header into the facts it decides on (`Parsed`). A packet whose
//! chain or transport header is malformed is dropped (`malformed`).
//!
//! IP fragments are dropped and counted (`fragment`): without ports they cannot be
//! decided, and nothing in the overlay needs them (its MTU is set for the tunnel).
//!
//! Not synchronised by a global lock: the table is split in shards chosen by a hash
//! that is the same for both directions of a flow, and the policy is an `ArcSwap`
//! snapshot.

pub mod conntrack;
pub mod decisions;
pub mod flow;
pub mod http;
pub mod inject;
pub mod l7;
mod layer7;
mod parse;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use arc_swap::ArcSwap;
use mesh_proto::policy::{
    AllowReason, CompiledPolicy, Decision, DenyReason, Protocol, Request, RuleRef,
    Verdict as PolicyVerdict,
};
use mesh_proto::time::UnixTime;
use serde::Serialize;

use crate::enforce::conntrack::{
    ConnTrack, Dir, FlowHash, FlowHasher, Observation, Origin, Seen, TcpSegmentInfo, Timeouts,
};
use crate::enforce::decisions::{DecisionLog, DecisionRecord, HttpSummary};
use crate::enforce::flow::{Flags, Segment, SeqNumber, Timestamp, Timestamps};
use crate::wire::checksum;
use crate::wire::{
    self, FlowKey, IcmpPacket, IpPacket, TcpPacket, UdpPacket, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP,
    PROTO_UDP,
};
use inject::{Endpoints, TcpSegment};
use l7::{L7Flow, Refusal, RefuseCause};
#[cfg(test)]
use parse::parse;
use parse::{parse_drop, parse_ip, parsed_from_key, Kind, ParseError, Parsed};

pub use mesh_proto::policy::{LocalWorkload, Sender};

/// Both ends of a flow being decided: who sent it, and the local workload receiving it.
#[derive(Clone, Copy, Debug)]
struct Who<'a> {
    sender: &'a Sender,
    receiver: &'a LocalWorkload,
}

/// What to do with a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Send it on unchanged.
    Deliver,
    /// Do not send it.
    Drop(DropReason),
    /// Do not send it as it is: the layer-7 inspector took it (held, trimmed,
    /// released); whatever goes out in its place is in the [`Emit`].
    Consumed,
}

/// Where an emitted packet goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Toward {
    /// Written to the TUN: to a local workload.
    Local,
    /// Sent through the tunnel to the peer that owns its destination address.
    Peer,
}

/// Packets the enforcer asks the shell to send, in order, besides the verdict on the
/// packet it was given. Reused: the shell calls [`Emit::clear`] after sending.
#[derive(Debug, Default)]
pub struct Emit {
    buf: Vec<u8>,
    packets: Vec<(Toward, std::ops::Range<usize>)>,
    scratch: Vec<u8>,
    text: String,
}

impl Emit {
    pub fn clear(&mut self) {
        self.buf.clear();
        self.packets.clear();
    }

    pub fn is_empty(&self) -> bool {
        self.packets.is_empty()
    }

    /// The packets, in the order they must be sent.
    pub fn packets(&self) -> impl Iterator<Item = (Toward, &[u8])> + '_ {
        self.packets.iter().map(|(t, r)| (*t, &self.buf[r.clone()]))
    }

    fn push_scratch(&mut self, toward: Toward) {
        let start = self.buf.len();
        self.buf.extend_from_slice(&self.scratch);
        self.packets.push((toward, start..self.buf.len()));
    }

    fn push(&mut self, toward: Toward, packet: &[u8]) {
        let start = self.buf.len();
        self.buf.extend_from_slice(packet);
        self.packets.push((toward, start..self.buf.len()));
    }

    /// A bare RST from `src` to `dst` carrying `seq`, sent `toward` its receiver.
    fn push_reset(&mut self, src: SocketAddr, dst: SocketAddr, seq: SeqNumber, toward: Toward) {
        self.push_segment(src, dst, seq, None, Flags::RST, toward);
    }

    /// A segment without payload from `src` to `dst`, sent `toward` its receiver;
    /// with ACK when `ack` is given.
    fn push_segment(
        &mut self,
        src: SocketAddr,
        dst: SocketAddr,
        seq: SeqNumber,
        ack: Option<SeqNumber>,
        flags: Flags,
        toward: Toward,
    ) {
        let seg = TcpSegment {
            src,
            dst,
            seq,
            ack,
            flags,
            window: if flags.contains(Flags::RST) {
                0
            } else {
                u16::MAX
            },
            payload: &[],
        };
        if inject::tcp_packet(&seg, &mut self.scratch).is_ok() {
            self.push_scratch(toward);
        }
    }
}

/// Why a packet was not delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// Refused by policy or a limit; in the decision log.
    Denied(DenyReason),
    /// Not a well-formed IPv4/IPv6 packet with a complete transport header.
    Malformed,
    /// A TCP segment of no tracked flow on a port inspected at layer 7: its stream
    /// cannot be inspected from the middle, so it fails closed.
    Untracked,
    /// A protocol meshd does not carry (neither TCP, UDP nor ICMP).
    Protocol,
    /// A segment of an inspected flow with a wrong TCP checksum.
    Checksum,
    /// A segment the layer-7 inspector will not pass (duplicate, conflicting with
    /// inspected bytes, out of window, after FIN, or of a refused flow).
    Inspection,
    /// An ICMP error quoting no tracked flow, or not from that flow's far end, or
    /// an ICMP message other than echo.
    StrayIcmp,
    /// A packet of a tracked flow from (or, going out, to) another identity than the
    /// one at the flow's far end.
    WrongPeer,
    /// A RST not at the sequence number its receiver expects, or a FIN outside its
    /// receiver's window (RFC 5961): not taken.
    OutOfWindow,
}

impl DropReason {
    pub fn name(self) -> &'static str {
        match self {
            DropReason::Denied(r) => r.name(),
            DropReason::Malformed => "malformed",
            DropReason::Untracked => "untracked",
            DropReason::Protocol => "protocol",
            DropReason::Checksum => "checksum",
            DropReason::Inspection => "inspection",
            DropReason::StrayIcmp => "stray_icmp",
            DropReason::WrongPeer => "wrong_peer",
            DropReason::OutOfWindow => "out_of_window",
        }
    }
}

/// A flow a new policy forbids: the shell resets both ends (TCP) with these numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cut {
    /// The flow as its opener (the peer) sent it: `src` is the remote client.
    pub key: FlowKey,
    /// Next sequence number of the client (for a reset towards the local server).
    pub client_next_seq: Option<u32>,
    /// What the server last acknowledged, when it differs from `client_next_seq`.
    pub client_acked_seq: Option<u32>,
    /// Next sequence number of the server (for a reset towards the client).
    pub server_next_seq: Option<u32>,
    /// What the client last acknowledged, when it differs from `server_next_seq`.
    pub server_acked_seq: Option<u32>,
}

impl Cut {
    /// The resets that end a cut TCP flow: to the local server as if from the client,
    /// to the client (through the tunnel) as if from the server. A receiver takes a
    /// reset only at exactly the sequence number it expects next (RFC 5961 §3.2;
    /// Linux answers any other in its window with a challenge ACK): the sender's next
    /// number (its highest, whatever its last segment was, e.g. a keepalive probe at
    /// next−1) once everything sent arrived, or what the receiver last acknowledged
    /// while bytes are on their way. When the two differ, a reset goes at each. Other
    /// protocols have no connection to end; their next packets are refused (the
    /// flow's tombstone).
    pub fn resets(&self, emit: &mut Emit) {
        if self.key.proto != PROTO_TCP {
            return;
        }
        let client = SocketAddr::new(self.key.src, self.key.src_port);
        let server = SocketAddr::new(self.key.dst, self.key.dst_port);
        for (seq, src, dst, toward) in [
            (self.client_next_seq, client, server, Toward::Local),
            (self.client_acked_seq, client, server, Toward::Local),
            (self.server_next_seq, server, client, Toward::Peer),
            (self.server_acked_seq, server, client, Toward::Peer),
        ] {
            if let Some(seq) = seq {
                emit.push_reset(src, dst, SeqNumber(seq), toward);
            }
        }
    }
}

/// What a flow carries.
#[derive(Debug)]
pub struct FlowState {
    /// Policy generation of the cached decision.
    gen: u64,
    allowed: bool,
    /// Cut by a policy or identity change: a tombstone that refuses the flow's
    /// packets in both directions until policy allows a new opening, or it expires.
    cut: bool,
    /// Present for flows a peer opened: re-evaluation needs who sent them, and only
    /// that identity may send more.
    sender: Option<Sender>,
    /// The local workload that received the flow a peer opened.
    receiver: Option<LocalWorkload>,
    /// For flows a local workload opened: the identity of the peer it sent to, the
    /// only one whose replies it takes.
    peer: Option<Arc<str>>,
    /// Present for TCP flows a peer opened to a port with HTTP rules.
    l7: Option<Box<L7Flow>>,
}

impl FlowState {
    fn remote(gen: u64, who: Who<'_>, l7: Option<Box<L7Flow>>) -> FlowState {
        FlowState {
            gen,
            allowed: true,
            cut: false,
            sender: Some(who.sender.clone()),
            receiver: Some(who.receiver.clone()),
            peer: None,
            l7,
        }
    }

    fn local(peer: Option<&Arc<str>>) -> FlowState {
        FlowState {
            gen: 0,
            allowed: true,
            cut: false,
            sender: None,
            receiver: None,
            peer: peer.cloned(),
            l7: None,
        }
    }

    /// Whether `identity` is the flow's far end: its opener for a flow a peer opened,
    /// the peer it went to for one a local workload opened.
    fn far_end_is(&self, identity: Option<&Arc<str>>) -> bool {
        let far = self
            .sender
            .as_ref()
            .map(|s| &s.identity)
            .or(self.peer.as_ref());
        match (far, identity) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b) || **a == **b,
            (None, None) => true,
            _ => false,
        }
    }
}

/// What [`Enforcer::redecide`] does with a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Redo {
    /// Leave it (and its cached decision) as it is.
    Keep,
    /// Decide it again under the policy in force.
    Decide,
    /// Refuse it, whatever the policy says.
    Refuse(DenyReason),
}

/// Limits of the enforcer.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Flows tracked at most, over all shards.
    pub flows: usize,
    pub timeouts: Timeouts,
    /// Per inspected flow: head size, held bytes, head timeout.
    pub l7: l7::Config,
    /// Largest TCP payload of a segment the enforcer builds towards a local workload.
    pub mss: usize,
    /// Bytes all inspected flows together may hold; past it, the flow that grows is
    /// refused (503) and its bytes freed.
    pub l7_total_held: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            flows: 65_536,
            timeouts: Timeouts::default(),
            l7: l7::Config::default(),
            // TUN MTU 1420 less an IPv6 and a TCP header.
            mss: 1360,
            l7_total_held: 64 << 20,
        }
    }
}

const SHARDS: usize = 16;

struct Active {
    policy: CompiledPolicy,
    gen: u64,
    /// Allow, deny and audit hits per rule (`CompiledPolicy::rule_slot`), since this
    /// policy was applied: atomics, so counting a decision takes no lock.
    hits: Box<[[AtomicU64; 3]]>,
}

impl Active {
    fn new(policy: CompiledPolicy, gen: u64) -> Active {
        let hits = (0..policy.rule_count())
            .map(|_| std::array::from_fn(|_| AtomicU64::new(0)))
            .collect();
        Active { policy, gen, hits }
    }

    fn hit(&self, r: RuleRef, kind: usize) {
        if let Some(h) = self.hits.get(self.policy.rule_slot(r)) {
            h[kind].fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Per-rule hit counts since the policy was applied.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct RuleCount {
    pub policy: String,
    pub rule: String,
    pub allow: u64,
    pub deny: u64,
    pub audit: u64,
}

/// Counters for `meshctl status`.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct L4Counters {
    pub delivered: u64,
    /// Flows tracked, tombstones of cut flows excluded.
    pub flows: usize,
    /// Tombstones of flows cut by a policy or identity change.
    pub flows_cut: usize,
    pub flows_evicted: u64,
    /// Drops by reason name.
    pub drops: std::collections::BTreeMap<&'static str, u64>,
    pub rules: Vec<RuleCount>,
    /// Layer-7 flows being inspected, and bytes they hold.
    pub l7_flows: usize,
    pub l7_held_bytes: usize,
    /// HTTP requests decided, allowed and refused.
    pub http_requests: u64,
    pub http_refused: u64,
}

const DROP_SLOTS: usize = 32;

/// The enforcer of one host.
pub struct Enforcer {
    local: LocalWorkload,
    limits: Limits,
    http_requests: AtomicU64,
    http_refused: AtomicU64,
    /// Bytes held by all inspected flows (recounted exactly at each `poll`).
    held_total: std::sync::atomic::AtomicUsize,
    active: ArcSwap<Active>,
    shards: Box<[Mutex<ConnTrack<FlowState>>]>,
    hasher: FlowHasher,
    log: Arc<DecisionLog>,
    delivered: AtomicU64,
    drops: [AtomicU64; DROP_SLOTS],
}

impl std::fmt::Debug for Enforcer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enforcer")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

impl Enforcer {
    pub fn new(
        local: LocalWorkload,
        policy: CompiledPolicy,
        limits: Limits,
        log: Arc<DecisionLog>,
    ) -> Self {
        let per_shard = limits.flows.div_ceil(SHARDS).max(1);
        let hasher = FlowHasher::default();
        Enforcer {
            local,
            limits,
            http_requests: AtomicU64::new(0),
            http_refused: AtomicU64::new(0),
            held_total: std::sync::atomic::AtomicUsize::new(0),
            active: ArcSwap::from_pointee(Active::new(policy, 1)),
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(ConnTrack::with_hasher(
                        per_shard,
                        limits.timeouts,
                        hasher.clone(),
                    ))
                })
                .collect(),
            hasher,
            log,
            delivered: AtomicU64::new(0),
            drops: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    /// An enforcer with no policies and the default allow (a data plane without
    /// policy; for tests of other layers).
    pub fn allow_all() -> Enforcer {
        Enforcer::new(
            LocalWorkload::default(),
            CompiledPolicy::empty(mesh_proto::policy::DefaultAction::Allow),
            Limits::default(),
            Arc::new(DecisionLog::new(Default::default())),
        )
    }

    /// The policy in force.
    pub fn with_policy<R>(&self, f: impl FnOnce(&CompiledPolicy) -> R) -> R {
        f(&self.active.load().policy)
    }

    /// Decides an inbound packet from `sender` (already decrypted, its source address
    /// checked against the sender's certificate) to the enforcer's own workload.
    pub fn inbound(
        &self,
        sender: &Sender,
        packet: &[u8],
        now: Duration,
        wall: UnixTime,
        emit: &mut Emit,
    ) -> Verdict {
        self.inbound_to(&self.local, sender, packet, now, wall, emit)
    }

    /// [`Enforcer::inbound_ip`] of the bytes of a packet, checked here (tests, fuzzing
    /// and benchmarks; the packet path already has the checked view). A packet whose
    /// IP header does not check is dropped as `malformed`, as by the other byte entry
    /// points.
    pub fn inbound_to(
        &self,
        receiver: &LocalWorkload,
        sender: &Sender,
        packet: &[u8],
        now: Duration,
        wall: UnixTime,
        emit: &mut Emit,
    ) -> Verdict {
        match IpPacket::new_checked(packet) {
            Ok(ip) => self.inbound_ip(receiver, sender, &ip, now, wall, emit),
            Err(_) => self.dropped(DropReason::Malformed),
        }
    }

    /// [`Enforcer::between_locals_ip`] of the bytes of a packet.
    pub fn between_locals(
        &self,
        sender: &Sender,
        receiver: &LocalWorkload,
        packet: &[u8],
        now: Duration,
        wall: UnixTime,
        emit: &mut Emit,
    ) -> Verdict {
        match IpPacket::new_checked(packet) {
            Ok(ip) => self.between_locals_ip(sender, receiver, &ip, now, wall, emit),
            Err(_) => self.dropped(DropReason::Malformed),
        }
    }

    /// [`Enforcer::outbound_ip`] of the bytes of a packet.
    pub fn outbound(
        &self,
        to: Option<&Arc<str>>,
        packet: &[u8],
        now: Duration,
        emit: &mut Emit,
    ) -> Verdict {
        match IpPacket::new_checked(packet) {
            Ok(ip) => self.outbound_ip(to, &ip, now, emit),
            Err(_) => self.dropped(DropReason::Malformed),
        }
    }

    /// Decides a packet between two local workloads: the reply direction of a flow
    /// the receiver opened passes as that flow's outbound traffic; anything else is
    /// inbound traffic of `receiver` from `sender`, decided by policy.
    pub fn between_locals_ip(
        &self,
        sender: &Sender,
        receiver: &LocalWorkload,
        ip: &IpPacket<&[u8]>,
        now: Duration,
        wall: UnixTime,
        emit: &mut Emit,
    ) -> Verdict {
        let parsed = parse_ip(ip);
        let reply = match &parsed {
            Ok(p) if p.kind == Kind::Flow => {
                let h = self.hasher.hash(&p.key);
                let shard = self.shard(h);
                shard.get_hashed(h, &p.key).is_none()
                    && shard
                        .get_hashed(h, &p.key.reversed())
                        .is_some_and(|f| f.origin == Origin::Remote)
            }
            _ => false,
        };
        if reply {
            // The answer goes back to the flow's opener: the receiver.
            self.outbound_parsed(receiver.identity.as_ref(), parsed, now, emit)
        } else {
            self.inbound_parsed(receiver, sender, parsed, now, wall, emit)
        }
    }

    /// Decides an inbound packet from `sender` to the local workload `receiver`: a
    /// packet whose IP header `peers` checked (the view is parsed on, not again).
    pub fn inbound_ip(
        &self,
        receiver: &LocalWorkload,
        sender: &Sender,
        ip: &IpPacket<&[u8]>,
        now: Duration,
        wall: UnixTime,
        emit: &mut Emit,
    ) -> Verdict {
        let parsed = parse_ip(ip);
        self.inbound_parsed(receiver, sender, parsed, now, wall, emit)
    }

    /// [`Enforcer::inbound_ip`] of a packet already parsed.
    #[allow(clippy::too_many_arguments)] // both ends, the packet, the clock: all needed
    fn inbound_parsed(
        &self,
        receiver: &LocalWorkload,
        sender: &Sender,
        parsed: Result<Parsed<'_>, ParseError>,
        now: Duration,
        wall: UnixTime,
        emit: &mut Emit,
    ) -> Verdict {
        let who = Who { sender, receiver };
        let p = match parsed {
            Ok(p) => p,
            Err(e) => return self.dropped(parse_drop(e)),
        };
        let active = self.active.load();
        let h = self.hasher.hash(&p.key);
        let mut shard = self.shard(h);
        if p.kind == Kind::IcmpError {
            // This host's node is its pods' first hop: its kernel tells a pod when a
            // packet does not fit the TUN (path MTU), from the node's own address.
            let hop = self.local.identity.as_deref() == Some(&*sender.identity)
                && receiver.identity != self.local.identity;
            return if icmp_error_admitted(&mut shard, h, &p, &sender.identity, hop, now) {
                self.deliver()
            } else {
                self.dropped(DropReason::StrayIcmp)
            };
        }
        // The table holds a tombstone under this 5-tuple: a new flow replaces it, but
        // it stays (and keeps the local side's packets out) unless policy allows one.
        let mut tombstone = false;
        let mut reopen = false;
        match shard.find_hashed(h, &p.key, now) {
            Some((Dir::Reply, flow)) if flow.origin == Origin::Local => {
                // A reply to a flow a local workload opened: only from the peer it
                // went to (the flow is bound to its far end, not to its addresses).
                if !flow.value.far_end_is(Some(&sender.identity)) {
                    return self.dropped(DropReason::WrongPeer);
                }
                return match flow.observe(Dir::Reply, &p.obs, now) {
                    Seen::Taken | Seen::Reset => self.deliver(),
                    seen => {
                        self.not_taken(seen, flow.challenge(Dir::Reply), &p, Toward::Peer, emit)
                    }
                };
            }
            Some((Dir::Original, flow)) if flow.origin == Origin::Remote => {
                if flow.value.cut {
                    // Decided below as a packet of no flow.
                    flow.last_seen = now;
                    tombstone = true;
                } else if p.opens && flow.is_closing() {
                    // A new connection on a 5-tuple that just closed (TIME-WAIT reuse,
                    // or after a refusal): a new flow, decided as such.
                    reopen = true;
                } else {
                    if !flow.value.far_end_is(Some(&sender.identity)) {
                        return self.dropped(DropReason::WrongPeer);
                    }
                    let seen = flow.observe(Dir::Original, &p.obs, now);
                    if !matches!(seen, Seen::Taken | Seen::Reset) {
                        let challenge = flow.challenge(Dir::Original);
                        return self.not_taken(seen, challenge, &p, Toward::Peer, emit);
                    }
                    if let Some(l7) = flow.value.l7.as_deref_mut() {
                        let verdict = self.l7_client(&active.policy, who, &p, l7, now, wall, emit);
                        if flow.value.l7.as_deref().is_some_and(L7Flow::is_closed) {
                            // Refused or reset: gone within the closing timeout.
                            flow.close();
                        }
                        return verdict;
                    }
                    if flow.value.gen == active.gen {
                        return if flow.value.allowed {
                            self.deliver()
                        } else {
                            self.dropped(DropReason::Denied(DenyReason::NoAllowMatched))
                        };
                    }
                    // Policy changed since this flow was decided: decide again.
                    let decision = self.decide(&active.policy, who, &p);
                    flow.value.gen = active.gen;
                    if !decision.is_allowed() {
                        flow.value.allowed = false;
                        flow.value.cut = true;
                        flow.close();
                    }
                    drop(shard);
                    return self.after_decision(&active.policy, who, &p, &decision, now, wall);
                }
            }
            Some(_) => return self.dropped(DropReason::Malformed),
            None => {}
        }
        if reopen {
            shard.remove_hashed(h, &p.key);
        }
        // A packet of no flow: a new flow opened by the peer, or a packet of a flow
        // meshd does not know (opened before it started, expired, evicted or cut),
        // decided as a new inbound packet.
        if p.protocol == Protocol::Tcp && active.policy.inspects(&self.request(who, &p)) {
            if !p.opens {
                drop(shard);
                untracked_resets(&p, emit, Toward::Peer);
                return self.dropped(DropReason::Untracked);
            }
            // A source that no rule could allow here, whatever its requests, is refused
            // at its SYN: a handshake would only carry refusals.
            let req = self.request(who, &p);
            if let Some(reason) = mesh_proto::policy::deny_every_request(&active.policy, &req) {
                drop(shard);
                refuse_syn(&p, emit);
                let refused = Decision::refused(reason);
                return self.after_decision(&active.policy, who, &p, &refused, now, wall);
            }
            if tombstone {
                shard.remove_hashed(h, &p.key);
            }
            // Requests are decided one by one, with their HTTP attributes; the
            // connection itself is let through to carry them.
            let mut l7 = Box::new(L7Flow::new(self.limits.l7, stamp(now)));
            let verdict = self.l7_client(&active.policy, who, &p, &mut l7, now, wall, emit);
            let state = FlowState::remote(active.gen, who, Some(l7));
            if shard
                .insert_hashed(h, p.key, Origin::Remote, state, &p.obs, now)
                .is_err()
            {
                drop(shard);
                emit.clear();
                let full = Decision::refused(DenyReason::FlowTableFull);
                return self.after_decision(&active.policy, who, &p, &full, now, wall);
            }
            return verdict;
        }
        // UDP to a port inspected for this workload (HTTP/3 could pass the HTTP rules
        // there) is refused by policy itself (`not_http`, `CompiledPolicy::inspects`).
        let decision = self.decide(&active.policy, who, &p);
        let rst = p.obs.tcp.is_some_and(|t| t.flags.rst());
        if decision.is_allowed() && !rst {
            if tombstone {
                shard.remove_hashed(h, &p.key);
            }
            let state = FlowState::remote(active.gen, who, None);
            if shard
                .insert_hashed(h, p.key, Origin::Remote, state, &p.obs, now)
                .is_err()
            {
                drop(shard);
                let full = Decision::refused(DenyReason::FlowTableFull);
                return self.after_decision(&active.policy, who, &p, &full, now, wall);
            }
        } else if !decision.is_allowed() && p.protocol == Protocol::Tcp && !p.opens {
            // A segment of a connection meshd does not know, refused: both ends are
            // reset, so that neither waits on a black hole (after a restart, the
            // local end of a download otherwise waits until the sender gives up).
            untracked_resets(&p, emit, Toward::Peer);
        }
        drop(shard);
        self.after_decision(&active.policy, who, &p, &decision, now, wall)
    }

    /// Decides an outbound packet from a local workload (before encryption) to the
    /// peer `to` (the identity that routing chose for its destination): replies on
    /// flows peers opened pass while the flow is allowed, to its opener only; an
    /// opening (SYN, datagram, echo request) starts a flow of the local workload's own,
    /// whose replies then come in from `to` only. Anything else of no flow is dropped,
    /// and a TCP segment answered with resets to both ends (see the module docs).
    pub fn outbound_ip(
        &self,
        to: Option<&Arc<str>>,
        ip: &IpPacket<&[u8]>,
        now: Duration,
        emit: &mut Emit,
    ) -> Verdict {
        self.outbound_parsed(to, parse_ip(ip), now, emit)
    }

    fn outbound_parsed(
        &self,
        to: Option<&Arc<str>>,
        parsed: Result<Parsed<'_>, ParseError>,
        now: Duration,
        emit: &mut Emit,
    ) -> Verdict {
        let p = match parsed {
            // A local workload's fragments and ICMP errors are its own business;
            // only what comes in is policed.
            Err(ParseError::Fragment | ParseError::StrayIcmp | ParseError::Protocol) => {
                return self.deliver()
            }
            Err(ParseError::Malformed) => return self.dropped(DropReason::Malformed),
            Ok(p) => p,
        };
        if p.kind == Kind::IcmpError {
            return self.deliver();
        }
        let h = self.hasher.hash(&p.key);
        let mut shard = self.shard(h);
        match shard.find_hashed(h, &p.key, now) {
            Some((Dir::Reply, flow)) if flow.origin == Origin::Remote => {
                if flow.value.cut {
                    // The local side of a cut flow: its packets stay out (a UDP
                    // server's next datagram must not reopen the flow as its own).
                    flow.last_seen = now;
                    return self.dropped(DropReason::Denied(DenyReason::NoAllowMatched));
                }
                if !flow.value.far_end_is(to) {
                    return self.dropped(DropReason::WrongPeer);
                }
                let seen = flow.observe(Dir::Reply, &p.obs, now);
                if !matches!(seen, Seen::Taken | Seen::Reset) {
                    let challenge = flow.challenge(Dir::Reply);
                    return self.not_taken(seen, challenge, &p, Toward::Local, emit);
                }
                if let Some(l7) = flow.value.l7.as_deref_mut() {
                    let Some(seg) = segment(&p) else {
                        return self.dropped(DropReason::Malformed);
                    };
                    if l7.on_server_segment(&seg, stamp(now)) {
                        return self.deliver();
                    }
                    if l7.is_closed()
                        && seg.flags.contains(Flags::ACK)
                        && !seg.flags.contains(Flags::RST)
                    {
                        // The server still talks on a connection meshd refused (its
                        // reset lost?): reset it again, at the number it expects.
                        let ends = endpoints(&p);
                        emit.push_reset(ends.client, ends.server, seg.ack, Toward::Local);
                    }
                    return self.dropped(DropReason::Inspection);
                }
                return if flow.value.allowed {
                    self.deliver()
                } else {
                    self.dropped(DropReason::Denied(DenyReason::NoAllowMatched))
                };
            }
            Some((Dir::Original, flow)) if flow.origin == Origin::Local => {
                if !(p.opens && flow.is_closing()) {
                    if !flow.value.far_end_is(to) {
                        return self.dropped(DropReason::WrongPeer);
                    }
                    return match flow.observe(Dir::Original, &p.obs, now) {
                        Seen::Taken | Seen::Reset => self.deliver(),
                        seen => {
                            let challenge = flow.challenge(Dir::Original);
                            self.not_taken(seen, challenge, &p, Toward::Local, emit)
                        }
                    };
                }
                // The local workload opens a new connection on a 5-tuple that just
                // closed: a new flow.
                shard.remove_hashed(h, &p.key);
            }
            // A local packet in the direction a peer's packets travel (two ends that
            // opened the same 5-tuple): not this enforcer's to police.
            Some(_) => return self.deliver(),
            None => {}
        }
        if !p.opens {
            // Not an opening, and of no flow: never a flow of the local side
            // (invariant 3). A TCP segment of a connection meshd does not know is
            // answered with resets to both ends.
            drop(shard);
            untracked_resets(&p, emit, Toward::Local);
            return self.dropped(DropReason::Untracked);
        }
        match shard.insert_hashed(h, p.key, Origin::Local, FlowState::local(to), &p.obs, now) {
            Ok(_) => self.deliver(),
            Err(_) => self.dropped(DropReason::Denied(DenyReason::FlowTableFull)),
        }
    }

    /// A RST or FIN the flow did not take ([`Seen`]): dropped; a RST inside the window
    /// gets the challenge ACK its receiver would send (RFC 5961 §3.2), on the
    /// receiver's behalf and `toward` the RST's sender, so that a sender who lost
    /// track can send an exact one.
    fn not_taken(
        &self,
        seen: Seen,
        challenge: Option<(SeqNumber, SeqNumber)>,
        p: &Parsed<'_>,
        toward: Toward,
        emit: &mut Emit,
    ) -> Verdict {
        if let (Seen::RstInWindow, Some((seq, ack))) = (seen, challenge) {
            // From the packet's receiver back to its sender.
            let from = SocketAddr::new(p.key.dst, p.key.dst_port);
            let to = SocketAddr::new(p.key.src, p.key.src_port);
            emit.push_segment(from, to, seq, Some(ack), Flags::default(), toward);
        }
        self.dropped(DropReason::OutOfWindow)
    }

    /// Swaps in a new policy and re-decides every flow a peer opened; returns the
    /// flows it now forbids (left in the table as tombstones, see the module docs),
    /// for the shell to reset.
    pub fn set_policy(&self, policy: CompiledPolicy, now: Duration, wall: UnixTime) -> Vec<Cut> {
        let gen = self.active.load().gen + 1;
        self.active.store(Arc::new(Active::new(policy, gen)));
        self.redecide(now, wall, |_| Redo::Decide)
    }

    /// Brings the flows peers opened up to date with the identities in the mesh now:
    /// `groups_of` gives each identity's groups, `None` for one no longer in the mesh.
    /// A flow whose sender is gone is cut (`identity_removed`); one whose sender or
    /// receiver now has other groups (a certificate renewed for the same key keeps its
    /// session, and its flows) is decided again under the policy in force. Returns
    /// the flows cut (removed from the table), for the shell to reset, as
    /// [`Enforcer::set_policy`] does.
    pub fn refresh_identities(
        &self,
        groups_of: impl Fn(&str) -> Option<Arc<[String]>>,
        now: Duration,
        wall: UnixTime,
    ) -> Vec<Cut> {
        let renew = |groups: &mut Arc<[String]>, current: Arc<[String]>| {
            let changed = current != *groups;
            *groups = current;
            changed
        };
        self.redecide(now, wall, |flow| {
            let sender = match &mut flow.sender {
                Some(s) => match groups_of(&s.identity) {
                    None => return Redo::Refuse(DenyReason::IdentityRemoved),
                    Some(g) => renew(&mut s.groups, g),
                },
                None => false,
            };
            let receiver = match &mut flow.receiver {
                Some(LocalWorkload {
                    identity: Some(id),
                    groups,
                }) => groups_of(id).is_some_and(|g| renew(groups, g)),
                _ => false,
            };
            if sender || receiver {
                Redo::Decide
            } else {
                Redo::Keep
            }
        })
    }

    /// Decides again each flow a peer opened as `pick` says (it may update the flow's
    /// facts first), under the policy in force; returns those now refused, each left
    /// as a tombstone: its held bytes freed, its packets refused both ways until policy
    /// allows a new opening on its 5-tuple or it expires (closing timeout for TCP,
    /// refreshed by each packet it refuses; a UDP server that keeps sending keeps its
    /// flow cut).
    fn redecide(
        &self,
        now: Duration,
        wall: UnixTime,
        mut pick: impl FnMut(&mut FlowState) -> Redo,
    ) -> Vec<Cut> {
        let active = self.active.load();
        let mut cuts = Vec::new();
        let mut denied = Vec::new();
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            shard.retain(|key, flow| {
                if flow.origin == Origin::Local || flow.value.cut {
                    return true;
                }
                let redo = pick(&mut flow.value);
                if redo == Redo::Keep {
                    return true;
                }
                let (Some(sender), Some(receiver)) =
                    (flow.value.sender.clone(), flow.value.receiver.clone())
                else {
                    return true;
                };
                let Some(p) = parsed_from_key(key) else {
                    return true;
                };
                let who = Who {
                    sender: &sender,
                    receiver: &receiver,
                };
                let decision = if let Redo::Refuse(reason) = redo {
                    Decision::refused(reason)
                } else if flow.value.l7.is_some() {
                    // Decided request by request: the next head meets the new policy,
                    // unless the new policy refuses every request this source could send
                    // here; then the flow is cut now rather than left to stream the rest
                    // of a body (regression: netns test l7.rs, upload in progress).
                    match mesh_proto::policy::deny_every_request(
                        &active.policy,
                        &self.request(who, &p),
                    ) {
                        None => return true,
                        Some(reason) => Decision::refused(reason),
                    }
                } else {
                    self.decide(&active.policy, who, &p)
                };
                flow.value.gen = active.gen;
                flow.value.allowed = decision.is_allowed();
                if decision.is_allowed() {
                    return true;
                }
                // An inspected flow may hold bytes the server never received: the reset
                // towards the server carries what it expects (regression: netns test
                // l7.rs, partial head).
                let (client_next_seq, client_acked_seq) = match &flow.value.l7 {
                    // Exactly what it received: held bytes never reached it.
                    Some(l7) => (l7.server_expects().map(|s| s.0), None),
                    None => (flow.next_seq(Dir::Original), flow.acked(Dir::Original)),
                };
                let server_next_seq = flow.next_seq(Dir::Reply);
                cuts.push(Cut {
                    key: *key,
                    client_next_seq,
                    client_acked_seq: client_acked_seq.filter(|a| Some(*a) != client_next_seq),
                    server_next_seq,
                    server_acked_seq: flow
                        .acked(Dir::Reply)
                        .filter(|a| Some(*a) != server_next_seq),
                });
                denied.push((sender, receiver, p, decision));
                if let Some(l7) = flow.value.l7.take() {
                    self.uncharge(l7.held());
                }
                flow.value.cut = true;
                flow.close();
                true
            });
        }
        for (sender, receiver, p, decision) in &denied {
            let who = Who { sender, receiver };
            self.after_decision(&active.policy, who, p, decision, now, wall);
        }
        cuts
    }

    /// Removes expired flows (the shell calls this periodically).
    pub fn sweep(&self, now: Duration) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).sweep(now))
            .sum()
    }

    pub fn counters(&self) -> L4Counters {
        let mut c = L4Counters {
            delivered: self.delivered.load(Ordering::Relaxed),
            ..L4Counters::default()
        };
        c.http_requests = self.http_requests.load(Ordering::Relaxed);
        c.http_refused = self.http_refused.load(Ordering::Relaxed);
        for s in self.shards.iter() {
            let s = s.lock().unwrap_or_else(|e| e.into_inner());
            let cut = s.flows().filter(|f| f.value.cut).count();
            c.flows += s.len() - cut;
            c.flows_cut += cut;
            c.flows_evicted += s.evicted();
            for l7 in s.flows().filter_map(|f| f.value.l7.as_deref()) {
                c.l7_flows += 1;
                c.l7_held_bytes += l7.held();
            }
        }
        for (slot, n) in self.drops.iter().enumerate() {
            let n = n.load(Ordering::Relaxed);
            if n > 0 {
                c.drops.insert(slot_name(slot), n);
            }
        }
        let active = self.active.load();
        for (r, _) in active.policy.rules() {
            let [allow, deny, audit] = active.hits[active.policy.rule_slot(r)]
                .each_ref()
                .map(|n| n.load(Ordering::Relaxed));
            if allow + deny + audit == 0 {
                continue;
            }
            let (policy, rule) = active.policy.rule_label(r);
            c.rules.push(RuleCount {
                policy: policy.to_string(),
                rule,
                allow,
                deny,
                audit,
            });
        }
        c
    }

    /// The shard of a flow: both directions hash alike, so they meet in one shard.
    fn shard(&self, h: FlowHash) -> MutexGuard<'_, ConnTrack<FlowState>> {
        self.shards[h.shard(self.shards.len())]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn decide(&self, policy: &CompiledPolicy, who: Who<'_>, p: &Parsed<'_>) -> Decision {
        mesh_proto::policy::evaluate(policy, &self.request(who, p))
    }

    /// Counts, logs (denies and audit matches) and turns a decision into a verdict.
    fn after_decision(
        &self,
        policy: &CompiledPolicy,
        who: Who<'_>,
        p: &Parsed<'_>,
        decision: &Decision,
        now: Duration,
        wall: UnixTime,
    ) -> Verdict {
        self.count_rules(policy, decision);
        for r in &decision.audit {
            self.write_log(
                policy,
                who,
                p,
                "audit",
                "audit_matched",
                Some(*r),
                None,
                now,
                wall,
            );
        }
        match decision.verdict {
            PolicyVerdict::Allow(_) => self.deliver(),
            PolicyVerdict::Deny(reason) => {
                self.write_log(
                    policy,
                    who,
                    p,
                    "deny",
                    reason.name(),
                    decision.rule(),
                    None,
                    now,
                    wall,
                );
                self.dropped(DropReason::Denied(reason))
            }
        }
    }

    /// Counts a decision `policy` made against its rules. A decision made under a
    /// policy that has just been replaced is not counted (the counters restart with
    /// each policy).
    fn count_rules(&self, policy: &CompiledPolicy, decision: &Decision) {
        let active = self.active.load();
        if !std::ptr::eq(&active.policy, policy) {
            return;
        }
        match decision.verdict {
            PolicyVerdict::Allow(AllowReason::Matched(r)) => active.hit(r, 0),
            PolicyVerdict::Deny(DenyReason::ExplicitDeny(r)) => active.hit(r, 1),
            _ => {}
        }
        for r in &decision.audit {
            active.hit(*r, 2);
        }
    }

    #[allow(clippy::too_many_arguments)] // one field each of the log line
    fn write_log(
        &self,
        policy: &CompiledPolicy,
        who: Who<'_>,
        p: &Parsed<'_>,
        verdict: &str,
        reason: &str,
        rule: Option<RuleRef>,
        http: Option<HttpSummary<'_>>,
        now: Duration,
        wall: UnixTime,
    ) {
        self.log.record(now, || {
            let (policy, rule) = rule.map(|r| policy.rule_label(r)).unzip();
            DecisionRecord {
                time: wall.to_string(),
                src: Some(&who.sender.identity),
                src_addr: p.key.src.to_string(),
                dst: who.receiver.identity.as_deref(),
                dst_addr: p.key.dst.to_string(),
                dst_port: if p.protocol == Protocol::Icmp {
                    0
                } else {
                    p.key.dst_port
                },
                proto: p.protocol.as_str(),
                decision: verdict,
                reason,
                policy,
                rule,
                http,
            }
        });
    }

    fn deliver(&self) -> Verdict {
        self.delivered.fetch_add(1, Ordering::Relaxed);
        Verdict::Deliver
    }

    fn dropped(&self, d: DropReason) -> Verdict {
        self.drops[drop_slot(d)].fetch_add(1, Ordering::Relaxed);
        Verdict::Drop(d)
    }
}

fn drop_slot(d: DropReason) -> usize {
    match d {
        DropReason::Malformed => 0,
        DropReason::Untracked => 1,
        DropReason::Protocol => 2,
        DropReason::StrayIcmp => 3,
        DropReason::WrongPeer => DROP_SLOTS - 4,
        DropReason::OutOfWindow => DROP_SLOTS - 3,
        DropReason::Checksum => DROP_SLOTS - 2,
        DropReason::Inspection => DROP_SLOTS - 1,
        DropReason::Denied(r) => {
            4 + match r {
                DenyReason::ExplicitDeny(_) => 0,
                other => {
                    1 + DenyReason::PLAIN
                        .iter()
                        .position(|x| *x == other)
                        .unwrap_or(0)
                }
            }
        }
    }
}

fn slot_name(slot: usize) -> &'static str {
    match slot {
        0 => DropReason::Malformed.name(),
        1 => DropReason::Untracked.name(),
        2 => DropReason::Protocol.name(),
        3 => DropReason::StrayIcmp.name(),
        4 => "explicit_deny",
        n if n == DROP_SLOTS - 4 => DropReason::WrongPeer.name(),
        n if n == DROP_SLOTS - 3 => DropReason::OutOfWindow.name(),
        n if n == DROP_SLOTS - 2 => DropReason::Checksum.name(),
        n if n == DROP_SLOTS - 1 => DropReason::Inspection.name(),
        n => DenyReason::PLAIN.get(n - 5).map_or("other", |r| r.name()),
    }
}

fn stamp(now: Duration) -> Timestamp {
    Timestamp::from_millis(u64::try_from(now.as_millis()).unwrap_or(u64::MAX))
}

/// Resets both ends of a connection one of whose segments meshd refuses because it
/// does not track the flow (opened before meshd started, expired, evicted or cut): the
/// segment is dropped (fail closed), and without the resets both ends would wait for
/// their timeouts instead of reconnecting at once. `sender` is where the segment's
/// sender is (`Toward::Peer` for a peer's segment, `Toward::Local` for a local
/// workload's). Each RST carries the sequence number its receiver expects (RFC 9293
/// §3.10.7.1, and exactly, RFC 5961 §3.2): to the segment's sender, the segment's
/// acknowledgement number; to the other end, the segment's own sequence number. A RST
/// is never answered, nor a segment without ACK. A peer is authenticated and its
/// addresses are its own (secure naming), so it can only reset its own connections.
fn untracked_resets(p: &Parsed<'_>, emit: &mut Emit, sender: Toward) {
    let Some(seg) = segment(p) else {
        return;
    };
    if seg.flags.contains(Flags::RST) || !seg.flags.contains(Flags::ACK) {
        return;
    }
    let (from, to) = (
        SocketAddr::new(p.key.src, p.key.src_port),
        SocketAddr::new(p.key.dst, p.key.dst_port),
    );
    let other = match sender {
        Toward::Peer => Toward::Local,
        Toward::Local => Toward::Peer,
    };
    emit.push_reset(to, from, seg.ack, sender);
    emit.push_reset(from, to, seg.seq, other);
    // The other end may have received more than the sender knows (its ACKs lost while
    // meshd was down): then the RST at the segment's number is old and ignored, and
    // that end waits on a connection whose sender was just reset (a download whose
    // server's meshd restarted hung until the client's timeout). An empty segment just
    // before it is unacceptable for the same reason, and a TCP answers an unacceptable
    // segment with an ACK of what it expects (RFC 9293 §3.10.7.4; Linux at most twice
    // a second); that ACK, a packet of no flow, gets the exact reset.
    let probe = seg.seq - 1usize;
    emit.push_segment(from, to, probe, Some(seg.ack), Flags::default(), other);
}

/// Refuses a SYN: RST+ACK to its sender, as a closed port answers (RFC 9293
/// §3.10.7.1: sequence number zero, acknowledging the SYN).
fn refuse_syn(p: &Parsed<'_>, emit: &mut Emit) {
    let Some(t) = p.obs.tcp else {
        return;
    };
    let ends = endpoints(p);
    let ack = SeqNumber(t.seq) + (t.payload_len as usize + 1);
    emit.push_segment(
        ends.server,
        ends.client,
        SeqNumber(0),
        Some(ack),
        Flags::RST,
        Toward::Peer,
    );
}

/// Whether an ICMP error may reach the local workload (invariant 3): the packet it
/// quotes went from here to the error's sender, on a flow meshd tracks and allows,
/// whose far end is `sender`; for TCP, the quoted sequence number was sent and not
/// yet acknowledged (RFC 5927 §4.1). A peer that is not the flow's far end cannot make
/// the local workload lower its path MTU or drop a connection. There are no routers
/// inside the overlay: an error about a packet to X comes from X (the node's own
/// underlay hops talk to the kernel directly, never through here), except this host's
/// node for its pods (`hop`): the packet a pod sends first crosses the host, whose
/// kernel may answer it (fragmentation needed, towards the TUN's MTU); then the error
/// comes from the node's address about a packet to anyone, on a flow of that pod's.
fn icmp_error_admitted(
    shard: &mut ConnTrack<FlowState>,
    h: FlowHash,
    p: &Parsed<'_>,
    sender: &Arc<str>,
    hop: bool,
    now: Duration,
) -> bool {
    let Some(q) = p.quote else {
        return false;
    };
    if q.dst != p.key.src || (q.src != p.key.dst && !hop) {
        return false;
    }
    let Some((dir, flow)) = shard.find_hashed(h, &p.key, now) else {
        return false;
    };
    let outgoing = matches!(
        (dir, flow.origin),
        (Dir::Original, Origin::Local) | (Dir::Reply, Origin::Remote)
    );
    outgoing
        && flow.value.allowed
        && !flow.value.cut
        && (hop || flow.value.far_end_is(Some(sender)))
        && q.seq.is_none_or(|seq| flow.sent_unacked(dir, seq))
}

fn endpoints(p: &Parsed<'_>) -> Endpoints {
    Endpoints {
        client: SocketAddr::new(p.key.src, p.key.src_port),
        server: SocketAddr::new(p.key.dst, p.key.dst_port),
    }
}

/// The TCP segment of a parsed TCP packet, for flow tracking and layer 7.
fn segment<'a>(p: &Parsed<'a>) -> Option<Segment<'a>> {
    let tcp = p.tcp?;
    Some(Segment {
        seq: SeqNumber(tcp.seq_number()),
        ack: SeqNumber(tcp.ack_number()),
        flags: tcp.flags(),
        window: tcp.window(),
        timestamps: Timestamps::parse(tcp.options()),
        payload: tcp.payload(),
    })
}

/// The TCP options of a parsed TCP packet, as on the wire.
fn tcp_options<'a>(p: &Parsed<'a>) -> &'a [u8] {
    p.tcp.map(|t| t.options()).unwrap_or_default()
}

/// Verifies the TCP checksum (RFC 9293 §3.1, with the RFC 8200 §8.1 pseudo-header for
/// IPv6).
fn tcp_checksum_ok(p: &Parsed<'_>) -> bool {
    let Some(segment) = p.tcp.map(|t| t.as_bytes()) else {
        return false;
    };
    // The pseudo-header: addresses, protocol and TCP length (end-around carries make
    // adding the length whole the same as adding its two 16-bit words).
    let pseudo = segment.len() as u64 + u64::from(PROTO_TCP);
    let pseudo = match (p.key.src, p.key.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            checksum::sum(&d.octets(), checksum::sum(&s.octets(), pseudo))
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            checksum::sum(&d.octets(), checksum::sum(&s.octets(), pseudo))
        }
        _ => return false,
    };
    checksum::fold(checksum::sum(segment, pseudo)) == 0xffff
}

/// The reason a layer-7 refusal that policy did not make is logged with.
fn refusal_reason(cause: &RefuseCause) -> DenyReason {
    match cause {
        RefuseCause::Policy { .. } => DenyReason::NoAllowMatched,
        RefuseCause::Http(crate::enforce::http::HttpError::Malformed(_)) => DenyReason::NotHttp,
        RefuseCause::Http(
            crate::enforce::http::HttpError::HeadTooLarge
            | crate::enforce::http::HttpError::TooManyHeaders,
        ) => DenyReason::HeadTooLarge,
        RefuseCause::Http(_)
        | RefuseCause::Path(_)
        | RefuseCause::Truncated
        | RefuseCause::Urgent => DenyReason::MalformedRequest,
        RefuseCause::Timeout => DenyReason::RequestTimeout,
        RefuseCause::HoldFull | RefuseCause::Overload => DenyReason::BufferFull,
        RefuseCause::Undelivered => DenyReason::DeliveryLost,
    }
}

#[cfg(test)]
mod props;
#[cfg(test)]
mod tests;
