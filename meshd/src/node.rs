//! The node core (sans-IO): one packet through the whole node, and what the shell
//! must do with it.
//!
//! Outbound (a packet the TUN gave): place it ([`peers::place`]: its local sender by
//! source address, its local receiver if any), decide it ([`Enforcer`]), then either
//! hand it back for the TUN (between two workloads of this host, never encrypted) or
//! route and encrypt it for the session with the peer that holds its destination.
//! Inbound (a datagram the UDP socket gave): authenticate and decrypt it, check secure
//! naming ([`peers::inbound`]), decide it under the identity the key proved, deliver.
//!
//! Layers: the shell (`datapath`) reads, batches and writes; this module
//! composes [`peers`] (sessions, WireGuard, cryptokey routing, secure naming) and
//! [`crate::enforce`] (policy, flows, layer 7), which know nothing of each other.
//! Time is an argument ([`Now`]); nothing here reads a clock or touches a socket.
//!
//! What the enforcer sends on its own (injected responses, resets) comes back in an
//! [`Emit`] beside the verdict on the packet given; the shell sends those through
//! [`peers::outbound`] (routed, encrypted, no policy: they are the enforcer's own).

use std::net::SocketAddr;
use std::sync::Arc;

use mesh_proto::time::UnixTime;

use crate::enforce::{self, Emit, Enforcer, Verdict};
use crate::peers::{self, DropReason, Node, Peer, PeerTable, Transmit};

#[cfg(any(test, feature = "testing"))]
pub mod sim;

/// The time of a packet: wall clock (certificates, logs) and the shell's monotonic
/// clock (flow timeouts).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Now {
    pub wall: UnixTime,
    pub mono: std::time::Duration,
}

/// Why the node did not pass a packet on: the sessions' reason, or the enforcer's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drop {
    Peer(DropReason),
    Policy(enforce::DropReason),
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
    /// Write `packet` back to the TUN: it goes from one local workload to another and
    /// the enforcer let it through (never encrypted, never on the underlay).
    Deliver(&'a [u8]),
    /// The enforcer took the packet (layer-7 inspection); what replaces it is in the
    /// [`Emit`].
    Done,
    Drop(Drop),
}

/// What to do with a datagram read from the UDP socket.
pub enum Inbound<'a> {
    /// Write `packet` to the TUN.
    Deliver(&'a [u8]),
    /// Send `data` to `to` (handshake response, keepalive, cookie reply). If `flush`
    /// is set, then call [`peers::flush`] for that peer until it returns `None`:
    /// packets queued during the handshake can go now.
    Send {
        to: SocketAddr,
        data: &'a [u8],
        flush: Option<Arc<Peer>>,
    },
    /// Consumed (keepalive, cookie reply), or taken by the enforcer (what replaces it
    /// is in the [`Emit`]).
    Done,
    /// A data packet for a session this node does not have: call [`peers::initiate`]
    /// for the peer and send what it returns.
    Rehandshake(Arc<Peer>),
    /// A data packet from `from` under a receiver index no session has: call
    /// [`peers::initiate`] for each of [`PeerTable::stale_at`]`(from)`.
    RehandshakeAt(SocketAddr),
    Drop(Drop),
}

/// TUN → underlay, with policy: the source address picks the local workload; a
/// packet to another local workload (from a source a local workload holds; else it is
/// dropped and counted) is decided by the enforcer as inbound traffic of its receiver and
/// comes back as [`Outbound::Deliver`]; anything else is routed to the peer that holds
/// its destination, passes the enforcer's outbound check (which binds the flow to that
/// peer's identity) and is encrypted for that session.
/// `dst` must hold `packet.len() + WG_OVERHEAD` and at least [`peers::MIN_DST_LEN`]
/// bytes.
#[allow(clippy::too_many_arguments)] // state, input, output buffers and clock: all needed
pub fn from_tun<'a>(
    node: &Node,
    table: &PeerTable,
    enforce: &Enforcer,
    packet: &'a [u8],
    dst: &'a mut [u8],
    now: Now,
    emit: &mut Emit,
) -> Outbound<'a> {
    let placed = match peers::place(node, table, packet) {
        Ok(placed) => placed,
        Err(out) => return from_peers(out),
    };
    if let Some(to) = placed.to {
        // Between two workloads of this host: policy decides as for a peer's packet,
        // with the sender's identity; nothing is encrypted.
        let Some(from) = placed.from else {
            return from_peers(peers::drop_out(node, DropReason::ForgedSource));
        };
        let (from, to) = (&table.locals()[from], &table.locals()[to]);
        let verdict = enforce.between_locals_ip(
            &from.sender,
            &to.workload,
            &placed.ip,
            now.mono,
            now.wall,
            emit,
        );
        return match verdict {
            Verdict::Deliver => Outbound::Deliver(packet),
            Verdict::Drop(r) => Outbound::Drop(Drop::Policy(r)),
            Verdict::Consumed => Outbound::Done,
        };
    }
    let Some(peer) = table.route_from(placed.from, placed.ip.dst_addr()) else {
        return from_peers(peers::drop_out(node, DropReason::NoRoute));
    };
    // Policy sees what local workloads send: replies on flows peers opened, and the
    // flows the workloads open themselves (whose replies then come back in, from the
    // identity they were sent to only).
    match enforce.outbound_ip(Some(&peer.sender.identity), &placed.ip, now.mono, emit) {
        Verdict::Deliver => {}
        Verdict::Drop(r) => return Outbound::Drop(Drop::Policy(r)),
        Verdict::Consumed => return Outbound::Done,
    }
    from_peers(peers::encrypt_for(
        node,
        peer,
        placed.ip.as_bytes(),
        dst,
        now.wall,
    ))
}

/// Underlay → TUN: [`peers::inbound`] authenticates, decrypts and checks secure
/// naming; then the enforcer decides the packet under the identity the key proved,
/// for the session's local workload.
/// `dst` must be at least as long as `datagram` and [`peers::MIN_DST_LEN`].
#[allow(clippy::too_many_arguments)] // state, input, output buffers and clock: all needed
pub fn from_udp<'a>(
    node: &Node,
    table: &'a PeerTable,
    enforce: &Enforcer,
    from: SocketAddr,
    datagram: &[u8],
    dst: &'a mut [u8],
    now: Now,
    emit: &mut Emit,
) -> Inbound<'a> {
    match peers::inbound(node, table, from, datagram, dst, now.wall) {
        peers::Inbound::Decrypted { packet, ip, peer } => {
            let verdict = enforce.inbound_ip(
                &peer.local.workload,
                &peer.sender,
                &ip,
                now.mono,
                now.wall,
                emit,
            );
            match verdict {
                Verdict::Deliver => Inbound::Deliver(packet),
                Verdict::Drop(r) => Inbound::Drop(Drop::Policy(r)),
                // The inspector took the packet; what replaces it is in `emit`.
                Verdict::Consumed => Inbound::Done,
            }
        }
        peers::Inbound::Send { to, data, flush } => Inbound::Send { to, data, flush },
        peers::Inbound::Done => Inbound::Done,
        peers::Inbound::Rehandshake(peer) => Inbound::Rehandshake(peer),
        peers::Inbound::RehandshakeAt(from) => Inbound::RehandshakeAt(from),
        peers::Inbound::Drop(r) => Inbound::Drop(Drop::Peer(r)),
    }
}

/// The handshake initiations that answer [`Inbound::Rehandshake`] or
/// [`Inbound::RehandshakeAt`], each given to `send`.
pub fn rehandshake(
    table: &PeerTable,
    inbound: &Inbound<'_>,
    aux: &mut [u8],
    mut send: impl FnMut(Transmit<'_>),
) {
    match inbound {
        Inbound::Rehandshake(peer) => {
            if let Some(t) = peers::initiate(peer, aux) {
                send(t);
            }
        }
        Inbound::RehandshakeAt(from) => {
            for peer in table.stale_at(*from) {
                if let Some(t) = peers::initiate(peer, aux) {
                    send(t);
                }
            }
        }
        _ => {}
    }
}

fn from_peers(out: peers::Outbound<'_>) -> Outbound<'_> {
    match out {
        peers::Outbound::Send { to, data } => Outbound::Send { to, data },
        peers::Outbound::Queued => Outbound::Queued,
        peers::Outbound::Deliver(p) => Outbound::Deliver(p),
        peers::Outbound::Drop(r) => Outbound::Drop(Drop::Peer(r)),
    }
}
