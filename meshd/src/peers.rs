//! Peers, WireGuard sessions and cryptokey routing (sans-IO).
//!
//! The I/O shell hands this module buffers and `now` and gets back what to do
//! ([`Outbound`], [`Inbound`], [`Transmit`]); it never touches a socket here.
//!
//! Identity (DESIGN.md invariant 2): a peer exists in the table only with a certificate
//! the CA verified; its WireGuard session is built for exactly that certificate's key,
//! so a handshake completes only for the key the certificate names. A handshake
//! initiation is matched to a peer by the static key it proves
//! (`parse_handshake_anon`), everything else by the receiver index we chose. After
//! decryption, the packet's source address must be one of the certificate's addresses
//! (secure naming), else it is dropped and counted.
//!
//! Concurrency: the table is an immutable snapshot (swapped whole by the control
//! plane, read without locks through `ArcSwap`); each peer's session sits behind its own
//! `Mutex`, so two peers never contend and there is no global lock per packet.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519;
use ipnet::IpNet;
use mesh_proto::cert::CLOCK_SKEW_SECS;
use mesh_proto::control::{NodeDrops, PeerDrops};
use mesh_proto::identity::SpiffeId;
use mesh_proto::time::UnixTime;

use crate::enforce::{self, Emit, Enforcer, Sender, Verdict};
use crate::routing::PrefixTable;
use crate::wire::{IpPacket, WireError};

/// Handshake initiations and responses per second above which the node answers with
/// cookie replies instead of doing Diffie-Hellman (WireGuard paper, section 5.3).
pub const HANDSHAKE_RATE_LIMIT: u64 = 100;

/// Overhead WireGuard adds to an IP packet (type, index, counter, tag).
pub const WG_OVERHEAD: usize = 32;

/// Size of a cookie reply message.
const COOKIE_REPLY_LEN: usize = 64;

/// Largest handshake message; `dst` buffers must hold at least this.
pub const MIN_DST_LEN: usize = 148;

/// What a verified certificate says about a peer. Built by the shell after
/// `Ca::verify`; nothing here re-checks signatures.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerSpec {
    pub identity: SpiffeId,
    pub public_key: [u8; 32],
    pub addresses: Vec<IpNet>,
    pub groups: Vec<String>,
    pub not_before: UnixTime,
    pub not_after: UnixTime,
}

impl PeerSpec {
    /// Whether the certificate is inside its validity window at `now`, with the same
    /// clock-skew allowance `Ca::verify` uses.
    pub fn is_valid_at(&self, now: UnixTime) -> bool {
        now.saturating_add(CLOCK_SKEW_SECS) >= self.not_before
            && now <= self.not_after.saturating_add(CLOCK_SKEW_SECS)
    }

    /// Secure naming: `src` is one of the certificate's addresses.
    pub fn owns_source(&self, src: IpAddr) -> bool {
        self.addresses.iter().any(|n| n.contains(&src))
    }
}

/// This node's static key and handshake rate limiter.
pub struct Node {
    secret: x25519::StaticSecret,
    public: x25519::PublicKey,
    rate_limiter: Arc<RateLimiter>,
    drops: DropCounters,
}

/// Node-wide drop counters.
#[derive(Default, Debug)]
pub struct DropCounters {
    pub malformed: AtomicU64,
    pub unknown_peer: AtomicU64,
    pub no_route: AtomicU64,
}

impl Node {
    pub fn new(private_key: [u8; 32]) -> Node {
        let secret = x25519::StaticSecret::from(private_key);
        let public = x25519::PublicKey::from(&secret);
        Node {
            rate_limiter: Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT)),
            secret,
            public,
            drops: DropCounters::default(),
        }
    }

    pub fn public_key(&self) -> [u8; 32] {
        *self.public.as_bytes()
    }

    /// Resets the handshake rate limiter's count; call about once a second.
    pub fn reset_rate_limiter(&self) {
        self.rate_limiter.reset_count();
    }

    pub fn drops(&self) -> NodeDrops {
        NodeDrops {
            malformed: self.drops.malformed.load(Ordering::Relaxed),
            unknown_peer: self.drops.unknown_peer.load(Ordering::Relaxed),
            no_route: self.drops.no_route.load(Ordering::Relaxed),
        }
    }

    /// Counts a packet the shell could not even hand to the core (a TUN segment
    /// that could not be split).
    pub fn count_malformed(&self) {
        self.drops.malformed.fetch_add(1, Ordering::Relaxed);
    }

    fn count(&self, reason: DropReason) {
        let c = match reason {
            DropReason::Malformed(_) | DropReason::Crypto(_) => &self.drops.malformed,
            DropReason::UnknownPeer | DropReason::PeerExpired => &self.drops.unknown_peer,
            DropReason::NoRoute | DropReason::NoEndpoint => &self.drops.no_route,
            // Counted on the peer / by the enforcer.
            DropReason::SpoofedSource | DropReason::Policy(_) | DropReason::NotRoutable => return,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Builds the session for a peer. `index` is the peer's 24-bit slot: boringtun
    /// numbers its sessions `index << 8 | n`, so a receiver index names its peer.
    pub fn new_peer(&self, spec: PeerSpec, index: u32, endpoint: Option<SocketAddr>) -> Peer {
        let tunn = self.new_tunn(&spec, index);
        Peer {
            sender: Sender {
                identity: spec.identity.to_string().into(),
                groups: spec.groups.clone().into(),
            },
            spec,
            index,
            state: Mutex::new(PeerState { tunn, endpoint }),
            rx_bytes: AtomicU64::new(0),
            tx_bytes: AtomicU64::new(0),
            spoofed_source: AtomicU64::new(0),
            latest_handshake: AtomicU64::new(0),
            refused_logged: AtomicBool::new(false),
        }
    }

    fn new_tunn(&self, spec: &PeerSpec, index: u32) -> Tunn {
        Tunn::new(
            self.secret.clone(),
            x25519::PublicKey::from(spec.public_key),
            None,
            None,
            index & INDEX_MASK,
            Some(self.rate_limiter.clone()),
        )
    }
}

/// The time of a packet: wall clock (certificates, logs) and the shell's monotonic
/// clock (flow timeouts).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Now {
    pub wall: UnixTime,
    pub mono: std::time::Duration,
}

/// Peer slots are 24 bits (the top of a 32-bit receiver index).
pub const INDEX_MASK: u32 = 0x00ff_ffff;

/// A peer: its verified certificate facts, its session and its counters.
pub struct Peer {
    pub spec: PeerSpec,
    /// The identity and groups policy sees for this peer's packets.
    pub sender: Sender,
    pub index: u32,
    state: Mutex<PeerState>,
    rx_bytes: AtomicU64,
    tx_bytes: AtomicU64,
    spoofed_source: AtomicU64,
    /// Seconds since the epoch of the last completed handshake, 0 = never.
    latest_handshake: AtomicU64,
    /// Set once the "certificate expired" refusal has been logged.
    refused_logged: AtomicBool,
}

struct PeerState {
    tunn: Tunn,
    endpoint: Option<SocketAddr>,
}

/// A snapshot of a peer's counters and endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerStats {
    pub endpoint: Option<SocketAddr>,
    pub latest_handshake: Option<UnixTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub drops: PeerDrops,
}

impl Peer {
    fn lock(&self) -> MutexGuard<'_, PeerState> {
        // A panic while holding the lock leaves a session that is at worst stale;
        // keep forwarding rather than poisoning the data path.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn endpoint(&self) -> Option<SocketAddr> {
        self.lock().endpoint
    }

    pub fn set_endpoint(&self, endpoint: Option<SocketAddr>) {
        self.lock().endpoint = endpoint;
    }

    pub fn stats(&self) -> PeerStats {
        let hs = self.latest_handshake.load(Ordering::Relaxed);
        PeerStats {
            endpoint: self.endpoint(),
            latest_handshake: (hs != 0).then_some(UnixTime(hs)),
            rx_bytes: self.rx_bytes.load(Ordering::Relaxed),
            tx_bytes: self.tx_bytes.load(Ordering::Relaxed),
            drops: PeerDrops {
                spoofed_source: self.spoofed_source.load(Ordering::Relaxed),
            },
        }
    }

    /// Whether the certificate is valid at `now`. The first time it is not, the
    /// refusal is logged and the sessions are dropped.
    fn admit(&self, node: &Node, now: UnixTime) -> bool {
        if self.spec.is_valid_at(now) {
            return true;
        }
        if !self.refused_logged.swap(true, Ordering::Relaxed) {
            tracing::error!(
                peer = %self.spec.identity,
                "peer refused: certificate expired at {} (valid from {})",
                self.spec.not_after,
                self.spec.not_before
            );
            self.reset_sessions(node);
        }
        false
    }

    /// Drops every session (used when the certificate stops being valid).
    pub fn reset_sessions(&self, node: &Node) {
        let mut st = self.lock();
        st.tunn = node.new_tunn(&self.spec, self.index);
    }
}

/// An immutable snapshot of the peers, indexed three ways.
#[derive(Default)]
pub struct PeerTable {
    peers: Vec<Arc<Peer>>,
    by_key: HashMap<[u8; 32], usize>,
    by_index: HashMap<u32, usize>,
    routes: PrefixTable<usize>,
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
}

impl PeerTable {
    /// Builds a table; peers keep their sessions (they are shared with the previous
    /// snapshot through `Arc`).
    pub fn new(peers: Vec<Arc<Peer>>) -> Result<PeerTable, TableError> {
        let mut t = PeerTable {
            peers: Vec::with_capacity(peers.len()),
            ..PeerTable::default()
        };
        for p in peers {
            let i = t.peers.len();
            if let Some(&j) = t.by_key.get(&p.spec.public_key) {
                return Err(TableError::DuplicateKey {
                    a: t.peers[j].spec.identity.clone(),
                    b: p.spec.identity.clone(),
                });
            }
            if let Some(q) = t.peers.iter().find(|q| q.spec.identity == p.spec.identity) {
                return Err(TableError::DuplicateIdentity(q.spec.identity.clone()));
            }
            if t.by_index.insert(p.index, i).is_some() {
                return Err(TableError::DuplicateIndex(p.index));
            }
            t.by_key.insert(p.spec.public_key, i);
            for net in &p.spec.addresses {
                if let Err(dup) = t.routes.insert(*net, i) {
                    let a = t
                        .routes
                        .lookup(dup.0.addr())
                        .map(|&j| t.peers[j].spec.identity.clone())
                        .unwrap_or_else(|| p.spec.identity.clone());
                    return Err(TableError::DuplicateAddress {
                        net: dup.0,
                        a,
                        b: p.spec.identity.clone(),
                    });
                }
            }
            t.peers.push(p);
        }
        Ok(t)
    }

    pub fn peers(&self) -> &[Arc<Peer>] {
        &self.peers
    }

    pub fn by_identity(&self, id: &SpiffeId) -> Option<&Arc<Peer>> {
        self.peers.iter().find(|p| &p.spec.identity == id)
    }

    /// Cryptokey routing: the peer whose certificate holds the longest prefix
    /// containing `dst`.
    pub fn route(&self, dst: IpAddr) -> Option<&Arc<Peer>> {
        self.routes.lookup(dst).map(|&i| &self.peers[i])
    }

    fn by_receiver_index(&self, receiver_index: u32) -> Option<&Arc<Peer>> {
        self.by_index
            .get(&(receiver_index >> 8))
            .map(|&i| &self.peers[i])
    }

    /// A slot not used by this table, starting the search at `hint`.
    pub fn free_index(&self, hint: u32) -> u32 {
        let mut i = hint & INDEX_MASK;
        while self.by_index.contains_key(&i) {
            i = (i + 1) & INDEX_MASK;
        }
        i
    }
}

/// Why the core dropped a packet. Small and `Copy`: counters and logs use it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// A TUN packet that is not IP, or a datagram that is not WireGuard.
    Malformed(Malformed),
    /// WireGuard rejected the datagram (bad MAC or tag, replay, no session...).
    Crypto(CryptoError),
    /// A handshake from a key no certificate in the table names, or an index we did
    /// not hand out. No answer is sent.
    UnknownPeer,
    /// The peer's certificate is not valid now.
    PeerExpired,
    /// No peer holds the destination address.
    NoRoute,
    /// A multicast, broadcast or link-local destination (not counted).
    NotRoutable,
    /// The peer has no known underlay endpoint yet.
    NoEndpoint,
    /// The decrypted source address is not in the sender's certificate.
    SpoofedSource,
    /// The enforcer refused the packet.
    Policy(enforce::Drop),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Malformed {
    Ip(WireError),
    WireGuard,
}

/// WireGuard errors, reduced to a `Copy` enum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CryptoError {
    InvalidMac,
    InvalidAeadTag,
    Replay,
    NoSession,
    UnderLoad,
    Other,
}

impl From<&WireGuardError> for CryptoError {
    fn from(e: &WireGuardError) -> CryptoError {
        match e {
            WireGuardError::InvalidMac => CryptoError::InvalidMac,
            WireGuardError::InvalidAeadTag => CryptoError::InvalidAeadTag,
            WireGuardError::InvalidCounter | WireGuardError::DuplicateCounter => {
                CryptoError::Replay
            }
            WireGuardError::NoCurrentSession | WireGuardError::WrongIndex => CryptoError::NoSession,
            WireGuardError::UnderLoad => CryptoError::UnderLoad,
            _ => CryptoError::Other,
        }
    }
}

/// What to do with a packet read from the TUN.
#[derive(Debug)]
pub enum Outbound<'a> {
    /// Send `data` to `to` over UDP (an encrypted packet or a handshake initiation;
    /// in the latter case the packet waits in the session's queue).
    Send {
        to: SocketAddr,
        data: &'a [u8],
    },
    /// Queued while a handshake is in flight; nothing to send now.
    Queued,
    Drop(DropReason),
}

/// What to do with a datagram read from the UDP socket.
pub enum Inbound<'a> {
    /// Write `packet` to the TUN.
    Deliver(&'a [u8]),
    /// Send `data` to `to` (handshake response, keepalive, cookie reply). If `flush`
    /// is set, then call [`flush`] for that peer until it returns `None`: packets
    /// queued during the handshake can go now.
    Send {
        to: SocketAddr,
        data: &'a [u8],
        flush: Option<Arc<Peer>>,
    },
    /// Consumed (keepalive, cookie reply).
    Done,
    /// A data packet for a session this node does not have: call [`initiate`] for the
    /// peer and send what it returns.
    Rehandshake(Arc<Peer>),
    Drop(DropReason),
}

/// A datagram the shell must send.
#[derive(Debug)]
pub struct Transmit<'a> {
    pub to: SocketAddr,
    pub data: &'a [u8],
}

/// TUN → underlay: route by destination address, encrypt for that peer.
/// `dst` must hold `packet.len() + WG_OVERHEAD` and at least [`MIN_DST_LEN`] bytes.
pub fn outbound<'a>(
    node: &Node,
    table: &PeerTable,
    packet: &[u8],
    dst: &'a mut [u8],
    now: UnixTime,
) -> Outbound<'a> {
    let ip = match IpPacket::new_checked(packet) {
        Ok(ip) => ip,
        Err(e) => return drop_out(node, DropReason::Malformed(Malformed::Ip(e))),
    };
    if !is_routable(ip.dst_addr()) {
        // Multicast and link-local traffic the kernel emits on any interface (router
        // solicitations, MLD): not for the mesh, not worth a counter.
        return Outbound::Drop(DropReason::NotRoutable);
    }
    let Some(peer) = table.route(ip.dst_addr()) else {
        return drop_out(node, DropReason::NoRoute);
    };
    if !peer.admit(node, now) {
        return drop_out(node, DropReason::PeerExpired);
    }
    let packet = ip.as_bytes();
    let mut st = peer.lock();
    let Some(to) = st.endpoint else {
        return drop_out(node, DropReason::NoEndpoint);
    };
    match st.tunn.encapsulate(packet, dst) {
        TunnResult::WriteToNetwork(data) => {
            // A handshake initiation is 148 bytes and carries no payload; a data
            // packet is exactly the payload plus the overhead.
            if data.len() == packet.len() + WG_OVERHEAD {
                peer.tx_bytes
                    .fetch_add(packet.len() as u64, Ordering::Relaxed);
            }
            Outbound::Send { to, data }
        }
        TunnResult::Done => Outbound::Queued,
        TunnResult::Err(e) => drop_out(node, DropReason::Crypto((&e).into())),
        TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {
            drop_out(node, DropReason::Crypto(CryptoError::Other))
        }
    }
}

fn is_routable(dst: IpAddr) -> bool {
    match dst {
        IpAddr::V4(a) => !(a.is_multicast() || a.is_broadcast() || a.is_link_local()),
        IpAddr::V6(a) => !(a.is_multicast() || (a.segments()[0] & 0xffc0) == 0xfe80),
    }
}

fn drop_out(node: &Node, reason: DropReason) -> Outbound<'static> {
    node.count(reason);
    Outbound::Drop(reason)
}

fn drop_in(node: &Node, reason: DropReason) -> Inbound<'static> {
    node.count(reason);
    Inbound::Drop(reason)
}

/// Underlay → TUN: authenticate, find the session, decrypt, check the source address
/// against the sender's certificate, ask the enforcer, deliver.
/// `dst` must be at least as long as `datagram` and [`MIN_DST_LEN`].
#[allow(clippy::too_many_arguments)] // state, input, output buffers and clock: all needed
pub fn inbound<'a>(
    node: &Node,
    table: &PeerTable,
    enforce: &Enforcer,
    from: SocketAddr,
    datagram: &[u8],
    dst: &'a mut [u8],
    now: Now,
    emit: &mut Emit,
) -> Inbound<'a> {
    let mono = now.mono;
    let now = now.wall;
    // MAC1 is checked for handshake messages, and under load MAC2: without a valid
    // cookie the answer is a cookie reply and nothing else (WireGuard section 5.4.7).
    let mut cookie = [0u8; COOKIE_REPLY_LEN];
    let packet = match node
        .rate_limiter
        .verify_packet(Some(from.ip()), datagram, &mut cookie)
    {
        Ok(p) => p,
        Err(TunnResult::WriteToNetwork(reply)) => {
            let n = reply.len();
            dst[..n].copy_from_slice(reply);
            return Inbound::Send {
                to: from,
                data: &dst[..n],
                flush: None,
            };
        }
        Err(TunnResult::Err(WireGuardError::InvalidPacket)) => {
            return drop_in(node, DropReason::Malformed(Malformed::WireGuard))
        }
        Err(TunnResult::Err(e)) => return drop_in(node, DropReason::Crypto((&e).into())),
        Err(_) => return drop_in(node, DropReason::Malformed(Malformed::WireGuard)),
    };
    let (peer, handshake) = match &packet {
        Packet::HandshakeInit(p) => {
            // Only the static key the initiator proves can pick the peer.
            let Ok(half) = parse_handshake_anon(&node.secret, &node.public, p) else {
                return drop_in(node, DropReason::Crypto(CryptoError::Other));
            };
            match table.by_key.get(&half.peer_static_public) {
                Some(&i) => (&table.peers[i], true),
                None => return drop_in(node, DropReason::UnknownPeer),
            }
        }
        Packet::HandshakeResponse(p) => match table.by_receiver_index(p.receiver_idx) {
            Some(peer) => (peer, true),
            None => return drop_in(node, DropReason::UnknownPeer),
        },
        Packet::PacketCookieReply(p) => match table.by_receiver_index(p.receiver_idx) {
            Some(peer) => (peer, false),
            None => return drop_in(node, DropReason::UnknownPeer),
        },
        Packet::PacketData(p) => match table.by_receiver_index(p.receiver_idx) {
            Some(peer) => (peer, false),
            None => return drop_in(node, DropReason::UnknownPeer),
        },
    };
    let authenticates = !matches!(packet, Packet::PacketCookieReply(_));
    let is_data = matches!(packet, Packet::PacketData(_));
    if !peer.admit(node, now) {
        return drop_in(node, DropReason::PeerExpired);
    }

    let mut st = peer.lock();
    let result = st.tunn.decapsulate(Some(from.ip()), datagram, dst);
    if !matches!(result, TunnResult::Err(_)) && authenticates {
        // Roaming: an authenticated packet from a new address moves the peer there
        // (WireGuard section 2.1).
        if st.endpoint != Some(from) {
            if st.endpoint.is_some() {
                tracing::info!(peer = %peer.spec.identity, endpoint = %from, "peer roamed");
            }
            st.endpoint = Some(from);
        }
    }
    drop(st);
    match result {
        TunnResult::Done => Inbound::Done,
        // Data for a session we no longer have (typically: this node restarted while
        // the peer kept its session). Rather than wait for the peer's timers (15 s),
        // start a handshake towards the peer's known endpoint; boringtun sends at most
        // one initiation per REKEY_TIMEOUT, so this cannot be used for amplification.
        TunnResult::Err(WireGuardError::NoCurrentSession) if is_data => {
            node.count(DropReason::Crypto(CryptoError::NoSession));
            Inbound::Rehandshake(peer.clone())
        }
        TunnResult::Err(e) => drop_in(node, DropReason::Crypto((&e).into())),
        TunnResult::WriteToNetwork(data) => {
            if handshake {
                peer.latest_handshake.store(now.secs(), Ordering::Relaxed);
                peer.refused_logged.store(false, Ordering::Relaxed);
            }
            Inbound::Send {
                to: from,
                data,
                flush: Some(peer.clone()),
            }
        }
        TunnResult::WriteToTunnelV4(packet, src) => deliver(
            node,
            peer,
            enforce,
            IpAddr::V4(src),
            packet,
            Now { wall: now, mono },
            emit,
        ),
        TunnResult::WriteToTunnelV6(packet, src) => deliver(
            node,
            peer,
            enforce,
            IpAddr::V6(src),
            packet,
            Now { wall: now, mono },
            emit,
        ),
    }
}

fn deliver<'a>(
    node: &Node,
    peer: &Peer,
    enforce: &Enforcer,
    src: IpAddr,
    packet: &'a mut [u8],
    now: Now,
    emit: &mut Emit,
) -> Inbound<'a> {
    let packet: &'a [u8] = packet;
    if IpPacket::new_checked(packet).is_err() {
        return drop_in(node, DropReason::Malformed(Malformed::WireGuard));
    }
    // Secure naming (invariant 2): identity comes from the key, so the source address
    // must be one the key's certificate holds.
    if !peer.spec.owns_source(src) {
        peer.spoofed_source.fetch_add(1, Ordering::Relaxed);
        return Inbound::Drop(DropReason::SpoofedSource);
    }
    peer.rx_bytes
        .fetch_add(packet.len() as u64, Ordering::Relaxed);
    match enforce.inbound(&peer.sender, packet, now.mono, now.wall, emit) {
        Verdict::Deliver => Inbound::Deliver(packet),
        Verdict::Drop(r) => Inbound::Drop(DropReason::Policy(r)),
        // The inspector took the packet; what replaces it is in `emit`.
        Verdict::Consumed => Inbound::Done,
    }
}

/// After a handshake: the next packet queued for `peer`, encrypted, if any.
pub fn flush<'a>(peer: &Peer, dst: &'a mut [u8]) -> Option<Transmit<'a>> {
    let mut st = peer.lock();
    let to = st.endpoint?;
    match st.tunn.decapsulate(None, &[], dst) {
        TunnResult::WriteToNetwork(data) => {
            peer.tx_bytes.fetch_add(
                data.len().saturating_sub(WG_OVERHEAD) as u64,
                Ordering::Relaxed,
            );
            Some(Transmit { to, data })
        }
        _ => None,
    }
}

/// A handshake initiation to `peer`'s endpoint, unless one is already in flight.
pub fn initiate<'a>(peer: &Peer, dst: &'a mut [u8]) -> Option<Transmit<'a>> {
    let mut st = peer.lock();
    let to = st.endpoint?;
    match st.tunn.format_handshake_initiation(dst, false) {
        TunnResult::WriteToNetwork(data) => Some(Transmit { to, data }),
        _ => None,
    }
}

/// Timers (rekey, retransmit, keepalive, expiry) for one peer; call every ~250 ms.
/// Also drops the sessions of a peer whose certificate is no longer valid.
pub fn tick<'a>(
    node: &Node,
    peer: &Peer,
    dst: &'a mut [u8],
    now: UnixTime,
) -> Option<Transmit<'a>> {
    if !peer.admit(node, now) {
        return None;
    }
    let mut st = peer.lock();
    let endpoint = st.endpoint;
    match st.tunn.update_timers(dst) {
        TunnResult::WriteToNetwork(data) => endpoint.map(|to| Transmit { to, data }),
        _ => None,
    }
}

#[cfg(test)]
#[path = "peers/tests.rs"]
mod tests;
