//! Peers, WireGuard sessions and cryptokey routing (sans-IO).
//!
//! The I/O shell hands this module buffers and `now` and gets back what to do
//! ([`Outbound`], [`Inbound`], [`Transmit`]); it never touches a socket here.
//!
//! Workloads: a host holds several local workloads ([`Local`]: the node's own identity
//! and its pods), each with its own certificate and static key. A peer is a remote
//! workload. A session ([`Peer`]) joins one local and one remote workload and is keyed
//! by their two keys, so traffic from pod A to remote pod C is encrypted under A's and
//! C's keys. One UDP port carries every session; the wire format is plain WireGuard.
//!
//! Identity (DESIGN.md invariant 2): a peer exists in the table only with a certificate
//! the CA verified; its WireGuard session is built for exactly that certificate's key,
//! so a handshake completes only for the key the certificate names. A handshake
//! initiation names its responder only through MAC1, keyed by the responder's public
//! key (WireGuard paper, section 5.4.4): each local workload's precomputed MAC1 key
//! (its `RateLimiter`) is tried in turn, which costs one keyed BLAKE2s per local key and
//! no Diffie-Hellman. The matching local's key then recovers the initiator's static key
//! (`parse_handshake_anon`), which picks the session. Everything else is matched by the
//! receiver index we chose. After decryption, the packet's source address must be one
//! of the remote certificate's addresses (secure naming) and its destination one of the
//! local workload's, else it is dropped and counted.
//!
//! Outbound, the source address of a packet from the TUN picks the local workload (a
//! packet whose source no local certificate holds is dropped and counted), the
//! destination picks the remote one ([`place`], [`PeerTable::route_from`]). Policy is
//! not this module's: the node core (`node`) asks the enforcer between
//! placing and encrypting a packet, and between decrypting and delivering one.
//!
//! Concurrency: the table is an immutable snapshot (swapped whole by the control
//! plane, read without locks through `ArcSwap`); each peer's session sits behind its own
//! `Mutex`, so two peers never contend and there is no global lock per packet.

pub mod overlap;
pub mod routing;

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

use mesh_proto::policy::{LocalWorkload, Sender};

mod build;
mod table;
use crate::wire::{IpPacket, WireError};
pub use build::{build_table, claims, peer_spec, PeerEntry, Source};
pub use table::{PeerTable, TableError};

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

    /// Which end of its validity window the certificate is past at `now`; `None`
    /// when [`PeerSpec::is_valid_at`] admits it.
    pub fn outside_window(&self, now: UnixTime) -> Option<OutsideWindow> {
        if self.is_valid_at(now) {
            None
        } else if now.saturating_add(CLOCK_SKEW_SECS) < self.not_before {
            Some(OutsideWindow::NotYetValid(self.not_before))
        } else {
            Some(OutsideWindow::Expired(self.not_after))
        }
    }

    /// Secure naming: `src` is one of the certificate's addresses.
    pub fn owns_source(&self, src: IpAddr) -> bool {
        self.addresses.iter().any(|n| n.contains(&src))
    }
}

/// Why a certificate that is otherwise sound is refused at `now`: the data path
/// refuses its handshakes and packets ([`PeerSpec::is_valid_at`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutsideWindow {
    /// Ended at this time.
    Expired(UnixTime),
    /// Starts at this time.
    NotYetValid(UnixTime),
}

impl std::fmt::Display for OutsideWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OutsideWindow::Expired(t) => write!(f, "certificate expired at {t}"),
            OutsideWindow::NotYetValid(t) => write!(f, "certificate is not valid before {t}"),
        }
    }
}

/// A local workload: its verified certificate facts and its static key, with the MAC1
/// key and handshake rate limiter derived from its public key.
pub struct Local {
    pub spec: PeerSpec,
    /// What policy sees when this workload receives (selectors, `dst` in the log).
    pub workload: LocalWorkload,
    /// What policy sees when this workload sends to another local workload.
    pub sender: Sender,
    secret: x25519::StaticSecret,
    public: x25519::PublicKey,
    rate_limiter: Arc<RateLimiter>,
}

impl std::fmt::Debug for Local {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Local")
            .field("identity", &self.spec.identity)
            .finish_non_exhaustive()
    }
}

impl Local {
    /// `spec.public_key` must be the public key of `private_key` (the shell checked the
    /// certificate against the key file).
    pub fn new(spec: PeerSpec, private_key: [u8; 32]) -> Local {
        let secret = x25519::StaticSecret::from(private_key);
        let public = x25519::PublicKey::from(&secret);
        Local {
            workload: LocalWorkload {
                identity: Some(spec.identity.to_string().into()),
                groups: spec.groups.clone().into(),
            },
            sender: Sender {
                identity: spec.identity.to_string().into(),
                groups: spec.groups.clone().into(),
            },
            spec,
            rate_limiter: Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT)),
            secret,
            public,
        }
    }

    pub fn public_key(&self) -> [u8; 32] {
        *self.public.as_bytes()
    }

    fn new_tunn(&self, remote: &PeerSpec, index: u32) -> Tunn {
        Tunn::new(
            self.secret.clone(),
            x25519::PublicKey::from(remote.public_key),
            None,
            None,
            index & INDEX_MASK,
            Some(self.rate_limiter.clone()),
        )
    }
}

/// Node-wide state of the core: the drop counters no peer can be blamed for.
#[derive(Default, Debug)]
pub struct Node {
    drops: DropCounters,
}

/// Node-wide drop counters.
#[derive(Default, Debug)]
pub struct DropCounters {
    pub malformed: AtomicU64,
    pub unknown_peer: AtomicU64,
    pub no_route: AtomicU64,
    pub forged_source: AtomicU64,
    pub misdirected: AtomicU64,
}

impl Node {
    pub fn new() -> Node {
        Node::default()
    }

    pub fn drops(&self) -> NodeDrops {
        NodeDrops {
            malformed: self.drops.malformed.load(Ordering::Relaxed),
            unknown_peer: self.drops.unknown_peer.load(Ordering::Relaxed),
            no_route: self.drops.no_route.load(Ordering::Relaxed),
            forged_source: self.drops.forged_source.load(Ordering::Relaxed),
            misdirected: self.drops.misdirected.load(Ordering::Relaxed),
            // Counted by the shell's devices (the daemon's status fills them in).
            tun_write: 0,
            udp_send: 0,
        }
    }

    /// Counts a packet with a forged source that never reached the TUN (the shell
    /// caught it elsewhere, e.g. on the quarantine device).
    pub fn count_forged(&self) {
        self.drops.forged_source.fetch_add(1, Ordering::Relaxed);
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
            DropReason::ForgedSource => &self.drops.forged_source,
            DropReason::Misdirected => &self.drops.misdirected,
            // Counted on the peer, or not worth a counter.
            DropReason::SpoofedSource | DropReason::NotRoutable => return,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// Peer slots are 24 bits (the top of a 32-bit receiver index).
pub const INDEX_MASK: u32 = 0x00ff_ffff;

/// A session between a local workload and a peer (a remote workload): the peer's
/// verified certificate facts, the WireGuard session and its counters.
pub struct Peer {
    pub spec: PeerSpec,
    /// The local end of the session.
    pub local: Arc<Local>,
    /// The identity and groups policy sees for this peer's packets.
    pub sender: Sender,
    pub index: u32,
    /// Shared with the peer's successor when a certificate is renewed for the same
    /// keys ([`Peer::succeed`]), so a packet still on its way through the old table
    /// works on the same session as the new table's.
    state: Arc<Mutex<PeerState>>,
    rx_bytes: AtomicU64,
    tx_bytes: AtomicU64,
    spoofed_source: AtomicU64,
    /// Seconds since the epoch of the last completed handshake, 0 = never.
    latest_handshake: AtomicU64,
    /// Set once the "certificate expired" refusal has been logged.
    refused_logged: AtomicBool,
}

struct PeerState {
    /// The WireGuard state machine, made on first use ([`Peer::session`]): a
    /// `Tunn` is 11 KB, and most of the peers a host lists (every local workload ×
    /// every remote one) may never exchange a packet.
    tunn: Option<Box<Tunn>>,
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
    /// The session between `local` and the peer `spec`. `index` is the session's 24-bit
    /// slot: boringtun numbers its sessions `index << 8 | n`, so a receiver index names
    /// its session.
    pub fn new(
        local: &Arc<Local>,
        spec: PeerSpec,
        index: u32,
        endpoint: Option<SocketAddr>,
    ) -> Peer {
        let state = PeerState {
            tunn: None,
            endpoint,
        };
        Peer::with_state(local, spec, index, Arc::new(Mutex::new(state)))
    }

    fn with_state(
        local: &Arc<Local>,
        spec: PeerSpec,
        index: u32,
        state: Arc<Mutex<PeerState>>,
    ) -> Peer {
        Peer {
            sender: Sender {
                identity: spec.identity.to_string().into(),
                groups: spec.groups.clone().into(),
            },
            local: local.clone(),
            spec,
            index,
            state,
            rx_bytes: AtomicU64::new(0),
            tx_bytes: AtomicU64::new(0),
            spoofed_source: AtomicU64::new(0),
            latest_handshake: AtomicU64::new(0),
            refused_logged: AtomicBool::new(false),
        }
    }

    /// The same session under renewed certificate facts: `local` or `spec` differs
    /// from `old`'s but neither static key does, so the WireGuard state (its keys and
    /// its receiver index), the endpoint and the counters carry over, and traffic
    /// goes on without a handshake. Policy sees the new facts from the first packet
    /// that finds the new table; an expiry already logged for the old certificate is
    /// forgotten.
    pub fn succeed(old: &Peer, local: &Arc<Local>, spec: PeerSpec) -> Peer {
        debug_assert_eq!(old.local.spec.public_key, local.spec.public_key);
        debug_assert_eq!(old.spec.public_key, spec.public_key);
        let p = Peer::with_state(local, spec, old.index, old.state.clone());
        for (to, from) in [
            (&p.rx_bytes, &old.rx_bytes),
            (&p.tx_bytes, &old.tx_bytes),
            (&p.spoofed_source, &old.spoofed_source),
            (&p.latest_handshake, &old.latest_handshake),
        ] {
            to.store(from.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        p
    }

    /// The session state in `st` (this peer's, locked), made now if this is its
    /// first use.
    fn session<'s>(&self, st: &'s mut PeerState) -> &'s mut Tunn {
        st.tunn
            .get_or_insert_with(|| Box::new(self.local.new_tunn(&self.spec, self.index)))
    }

    /// Whether the WireGuard state has been made.
    #[cfg(test)]
    pub(crate) fn has_session_state(&self) -> bool {
        self.lock().tunn.is_some()
    }

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
    fn admit(&self, now: UnixTime) -> bool {
        let Some(why) = self.spec.outside_window(now) else {
            return true;
        };
        if !self.refused_logged.swap(true, Ordering::Relaxed) {
            tracing::error!(
                peer = %self.spec.identity,
                "peer refused: {why} (valid from {} to {})",
                self.spec.not_before,
                self.spec.not_after
            );
            self.reset_sessions();
        }
        false
    }

    /// Whether no WireGuard session is established (none made yet, or all expired).
    pub fn lacks_session(&self) -> bool {
        self.lock()
            .tunn
            .as_ref()
            .is_none_or(|t| t.time_since_last_handshake().is_none())
    }

    /// Drops every session (used when the certificate stops being valid).
    pub fn reset_sessions(&self) {
        self.lock().tunn = None;
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
    /// A TUN packet whose source address no local workload's certificate holds (a
    /// workload sending as its neighbour, or as nobody).
    ForgedSource,
    /// A decrypted packet whose destination is not the session's local workload.
    Misdirected,
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

/// What to do with a packet read from the TUN, once placed and encrypted.
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
    /// Write `packet` back to the TUN: it goes from one local workload to another
    /// (never encrypted, never on the underlay).
    Deliver(&'a [u8]),
    Drop(DropReason),
}

/// What to do with a datagram read from the UDP socket.
pub enum Inbound<'a> {
    /// A packet of `peer`'s, decrypted in place, its source one of the peer's
    /// certificate's addresses and its destination one of the session's local
    /// workload's (secure naming): for the enforcer, then the TUN.
    Decrypted {
        packet: &'a [u8],
        /// `packet`'s checked IP header, for the enforcer (parsed once).
        ip: IpPacket<&'a [u8]>,
        peer: &'a Peer,
    },
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
    /// A data packet from `from` under a receiver index no session of this node has
    /// (it restarted, and numbered its sessions otherwise): call [`initiate`] for each
    /// of [`PeerTable::stale_at`]`(from)` and send what it returns.
    RehandshakeAt(SocketAddr),
    Drop(DropReason),
}

/// A datagram the shell must send.
#[derive(Debug)]
pub struct Transmit<'a> {
    pub to: SocketAddr,
    pub data: &'a [u8],
}

/// TUN → underlay without policy (the enforcer's own packets: injected responses and
/// resets): placed and routed as the node core does for a workload's packet, a packet
/// for a local workload comes back as [`Outbound::Deliver`].
/// `dst` must hold `packet.len() + WG_OVERHEAD` and at least [`MIN_DST_LEN`] bytes.
pub fn outbound<'a>(
    node: &Node,
    table: &PeerTable,
    packet: &'a [u8],
    dst: &'a mut [u8],
    now: UnixTime,
) -> Outbound<'a> {
    let Placed { ip, from, to } = match place(node, table, packet) {
        Ok(placed) => placed,
        Err(drop) => return drop,
    };
    if to.is_some() {
        if from.is_none() {
            return drop_out(node, DropReason::ForgedSource);
        }
        return Outbound::Deliver(packet);
    }
    encrypt(node, table, from, ip.dst_addr(), ip.as_bytes(), dst, now)
}

/// A packet from the TUN, checked and placed: its local sender and its local receiver
/// (indices into the table's local workloads), if any.
pub struct Placed<'p> {
    pub ip: IpPacket<&'p [u8]>,
    pub from: Option<usize>,
    pub to: Option<usize>,
}

/// Checks and places a packet from the TUN, or says why it goes nowhere.
pub fn place<'a, 'p>(
    node: &Node,
    table: &PeerTable,
    packet: &'p [u8],
) -> Result<Placed<'p>, Outbound<'a>> {
    let ip = match IpPacket::new_checked(packet) {
        Ok(ip) => ip,
        Err(e) => return Err(drop_out(node, DropReason::Malformed(Malformed::Ip(e)))),
    };
    if !is_routable(ip.dst_addr()) {
        // Multicast and link-local traffic the kernel emits on any interface (router
        // solicitations, MLD): not for the mesh, not worth a counter.
        return Err(Outbound::Drop(DropReason::NotRoutable));
    }
    let from = table.local_for(ip.src_addr());
    let to = table.local_for(ip.dst_addr());
    Ok(Placed { ip, from, to })
}

/// Encrypts `packet` for the session of `from` with the peer holding `to`. A source no
/// local workload holds (`from` is `None`; only the host itself can send such a packet,
/// pods are held to their own addresses by `attach`) goes out under the
/// first local workload, the node's own identity, and the receiver drops and counts it
/// (secure naming), as before there were workloads.
fn encrypt<'a>(
    node: &Node,
    table: &PeerTable,
    from: Option<usize>,
    to_addr: IpAddr,
    packet: &[u8],
    dst: &'a mut [u8],
    now: UnixTime,
) -> Outbound<'a> {
    let Some(peer) = table.route_from(from, to_addr) else {
        return drop_out(node, DropReason::NoRoute);
    };
    encrypt_for(node, peer, packet, dst, now)
}

/// Encrypts `packet` for the session with `peer`.
pub fn encrypt_for<'a>(
    node: &Node,
    peer: &Peer,
    packet: &[u8],
    dst: &'a mut [u8],
    now: UnixTime,
) -> Outbound<'a> {
    if !peer.admit(now) {
        return drop_out(node, DropReason::PeerExpired);
    }
    let mut st = peer.lock();
    let Some(to) = st.endpoint else {
        return drop_out(node, DropReason::NoEndpoint);
    };
    match peer.session(&mut st).encapsulate(packet, dst) {
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

pub(crate) fn is_routable(dst: IpAddr) -> bool {
    match dst {
        IpAddr::V4(a) => !(a.is_multicast() || a.is_broadcast() || a.is_link_local()),
        IpAddr::V6(a) => !(a.is_multicast() || (a.segments()[0] & 0xffc0) == 0xfe80),
    }
}

/// Counts `reason` and says drop.
pub fn drop_out(node: &Node, reason: DropReason) -> Outbound<'static> {
    node.count(reason);
    Outbound::Drop(reason)
}

fn drop_in(node: &Node, reason: DropReason) -> Inbound<'static> {
    node.count(reason);
    Inbound::Drop(reason)
}

/// Underlay → TUN: authenticate, find the session, decrypt, check the source address
/// against the sender's certificate and the destination against the session's local
/// workload ([`Inbound::Decrypted`]; the node core asks the enforcer next).
/// `dst` must be at least as long as `datagram` and [`MIN_DST_LEN`].
pub fn inbound<'a>(
    node: &Node,
    table: &'a PeerTable,
    from: SocketAddr,
    datagram: &[u8],
    dst: &'a mut [u8],
    now: UnixTime,
) -> Inbound<'a> {
    let packet = match Tunn::parse_incoming_packet(datagram) {
        Ok(p) => p,
        Err(_) => return drop_in(node, DropReason::Malformed(Malformed::WireGuard)),
    };
    // MAC1 is checked for handshake messages, and under load MAC2: without a valid
    // cookie the answer is a cookie reply and nothing else (WireGuard section 5.4.7).
    // MAC1 is keyed by the responder's public key, so for an initiation the local
    // workload whose key verifies it is the one addressed.
    let mut cookie = [0u8; COOKIE_REPLY_LEN];
    let (peer, handshake) = match &packet {
        Packet::HandshakeInit(p) => {
            let mut found = None;
            for local in table.locals() {
                match check_macs(local, from, datagram, &mut cookie) {
                    Macs::Valid => {
                        found = Some(local);
                        break;
                    }
                    Macs::OtherKey => continue,
                    Macs::Answer(reply) => return cookie_reply(reply, from, dst),
                    Macs::Drop(reason) => return drop_in(node, reason),
                }
            }
            let Some(local) = found else {
                return drop_in(node, DropReason::Crypto(CryptoError::InvalidMac));
            };
            // Only the static key the initiator proves can pick the peer.
            let Ok(half) = parse_handshake_anon(&local.secret, &local.public, p) else {
                return drop_in(node, DropReason::Crypto(CryptoError::Other));
            };
            match table.by_keys(&local.spec.public_key, &half.peer_static_public) {
                Some(peer) => (peer, true),
                None => return drop_in(node, DropReason::UnknownPeer),
            }
        }
        Packet::HandshakeResponse(p) => match table.by_receiver_index(p.receiver_idx) {
            // Addressed to the session's local workload: its MAC1 key.
            Some(peer) => match check_macs(&peer.local, from, datagram, &mut cookie) {
                Macs::Valid => (peer, true),
                Macs::OtherKey => {
                    return drop_in(node, DropReason::Crypto(CryptoError::InvalidMac))
                }
                Macs::Answer(reply) => return cookie_reply(reply, from, dst),
                Macs::Drop(reason) => return drop_in(node, reason),
            },
            None => return drop_in(node, DropReason::UnknownPeer),
        },
        Packet::PacketCookieReply(p) => match table.by_receiver_index(p.receiver_idx) {
            Some(peer) => (peer, false),
            None => return drop_in(node, DropReason::UnknownPeer),
        },
        Packet::PacketData(p) => match table.by_receiver_index(p.receiver_idx) {
            Some(peer) => (peer, false),
            None => {
                // After a restart this node numbers its sessions anew, and a peer
                // that kept its session sends under an index nobody has now: rather
                // than wait for the peer's timers (15 s and more, while its
                // connections stall), handshake with the peers at that endpoint that
                // have no session (see the NoCurrentSession case below).
                node.count(DropReason::UnknownPeer);
                return Inbound::RehandshakeAt(from);
            }
        },
    };
    let authenticates = !matches!(packet, Packet::PacketCookieReply(_));
    let is_data = matches!(packet, Packet::PacketData(_));
    if !peer.admit(now) {
        return drop_in(node, DropReason::PeerExpired);
    }

    let mut st = peer.lock();
    let result = peer
        .session(&mut st)
        .decapsulate(Some(from.ip()), datagram, dst);
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
            if peer.endpoint() == Some(from) {
                Inbound::Rehandshake(peer.clone())
            } else {
                // The index is another session's now (numbered anew after a restart).
                Inbound::RehandshakeAt(from)
            }
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
        TunnResult::WriteToTunnelV4(packet, src) => decrypted(node, peer, IpAddr::V4(src), packet),
        TunnResult::WriteToTunnelV6(packet, src) => decrypted(node, peer, IpAddr::V6(src), packet),
    }
}

/// What the MACs of a handshake message say, checked with one local workload's key.
enum Macs<'c> {
    Valid,
    /// MAC1 is not keyed by this workload's public key: addressed to another one.
    OtherKey,
    /// Under load without a valid MAC2: answer with this cookie reply only.
    Answer(&'c [u8]),
    Drop(DropReason),
}

fn check_macs<'c>(
    local: &Local,
    from: SocketAddr,
    datagram: &[u8],
    cookie: &'c mut [u8; COOKIE_REPLY_LEN],
) -> Macs<'c> {
    match local
        .rate_limiter
        .verify_packet(Some(from.ip()), datagram, cookie)
    {
        Ok(_) => Macs::Valid,
        Err(TunnResult::Err(WireGuardError::InvalidMac)) => Macs::OtherKey,
        Err(TunnResult::WriteToNetwork(reply)) => Macs::Answer(reply),
        Err(TunnResult::Err(e)) => Macs::Drop(DropReason::Crypto((&e).into())),
        Err(_) => Macs::Drop(DropReason::Malformed(Malformed::WireGuard)),
    }
}

fn cookie_reply<'a>(reply: &[u8], to: SocketAddr, dst: &'a mut [u8]) -> Inbound<'a> {
    let n = reply.len();
    dst[..n].copy_from_slice(reply);
    Inbound::Send {
        to,
        data: &dst[..n],
        flush: None,
    }
}

/// Secure naming for a decrypted packet of `peer`'s.
fn decrypted<'a>(node: &Node, peer: &'a Peer, src: IpAddr, packet: &'a mut [u8]) -> Inbound<'a> {
    let packet: &'a [u8] = packet;
    let Ok(ip) = IpPacket::new_checked(packet) else {
        return drop_in(node, DropReason::Malformed(Malformed::WireGuard));
    };
    // Secure naming (invariant 2): identity comes from the key, so the source address
    // must be one the key's certificate holds.
    if !peer.spec.owns_source(src) {
        peer.spoofed_source.fetch_add(1, Ordering::Relaxed);
        return Inbound::Drop(DropReason::SpoofedSource);
    }
    // The session is with one local workload: it may only carry that workload's
    // traffic (policy decides with that workload's identity).
    if !peer.local.spec.owns_source(ip.dst_addr()) {
        return drop_in(node, DropReason::Misdirected);
    }
    peer.rx_bytes
        .fetch_add(packet.len() as u64, Ordering::Relaxed);
    Inbound::Decrypted { packet, ip, peer }
}

/// After a handshake: the next packet queued for `peer`, encrypted, if any.
pub fn flush<'a>(peer: &Peer, dst: &'a mut [u8]) -> Option<Transmit<'a>> {
    let mut st = peer.lock();
    let to = st.endpoint?;
    // Only after a handshake, which made the session state.
    match st.tunn.as_mut()?.decapsulate(None, &[], dst) {
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
    match peer
        .session(&mut st)
        .format_handshake_initiation(dst, false)
    {
        TunnResult::WriteToNetwork(data) => Some(Transmit { to, data }),
        _ => None,
    }
}

/// Timers (rekey, retransmit, keepalive, expiry) for one peer; call every ~250 ms.
/// Also drops the sessions of a peer whose certificate is no longer valid.
pub fn tick<'a>(
    _node: &Node,
    peer: &Peer,
    dst: &'a mut [u8],
    now: UnixTime,
) -> Option<Transmit<'a>> {
    if !peer.admit(now) {
        return None;
    }
    let mut st = peer.lock();
    let endpoint = st.endpoint;
    // A peer that never exchanged a packet has nothing to time.
    let tunn = st.tunn.as_mut()?;
    match tunn.update_timers(dst) {
        TunnResult::WriteToNetwork(data) => endpoint.map(|to| Transmit { to, data }),
        _ => None,
    }
}

#[cfg(test)]
#[path = "peers/tests.rs"]
mod tests;
