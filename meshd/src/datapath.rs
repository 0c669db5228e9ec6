//! The packet loops (I/O shell): read, hand the bytes to the sans-IO core in `peers`,
//! act on what it returns. One thread per direction plus a timer thread. Buffers are
//! allocated once per thread; the peer table is read through its `ArcSwap` snapshot,
//! so a packet takes no lock but its own peer's session lock.
//!
//! Batching, so that a system call carries many packets:
//! - TUN → UDP: one TUN read returns a TCP segment of up to 64 KiB (TSO), split into
//!   MTU-sized packets; each passes `Enforcer::outbound` and is encrypted, and the
//!   ciphertexts leave in one UDP GSO send per peer. Reads continue until the TUN is
//!   drained; what is queued is sent then, so a lone packet is never held back.
//! - UDP → TUN: one UDP read returns up to 64 datagrams (GRO); each is decrypted in
//!   place into a TUN batch buffer and passes the secure-naming check and
//!   `Enforcer::inbound` on its own (invariant 3) before it joins the batch; the
//!   batch is written, coalesced per flow, when full or when the socket is drained.
//!
//! Reads are non-blocking; a loop polls (with a timeout, to notice shutdown) only
//! when the descriptor is drained. Nothing is queued without bound: a full batch is
//! written before more is read, and the kernel's socket and TUN queues push back on
//! the senders.

use std::io;
use std::time::Duration;

use mesh_proto::time::UnixTime;

use crate::batch::TunBatch;
use crate::daemon::Daemon;
use crate::device::TUN_READ_LEN;
use crate::enforce::{Emit, Toward, Verdict};
use crate::peers::{self, Inbound, Now, Outbound};
use crate::transport::{wait_readable, GsoBatch, GRO_BUF_LEN, GSO_MAX_BYTES};

/// Largest datagram or TUN packet handled.
const BUF_LEN: usize = 65_536;
/// How often the loops look at the shutdown flag while idle.
const IDLE_POLL_MS: i32 = 200;
/// WireGuard timers tick at this interval (boringtun's own device uses 250 ms).
const TIMER_TICK: Duration = Duration::from_millis(250);
/// Packets one TSO segment may split into (64 KiB at an MSS of 512 bytes and more).
const SPLIT_MAX: usize = 128;
/// Packets written to the TUN in one batch (one UDP GRO read carries up to 64).
const TUN_BATCH: usize = 64;

/// Wall-clock seconds. The I/O shell is where the clock is read.
#[allow(clippy::disallowed_methods)] // I/O shell: the one place `now` comes from
pub fn unix_now() -> UnixTime {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    UnixTime(secs)
}

/// TUN → UDP.
pub fn tun_loop(d: &Daemon) {
    let mut raw = vec![0u8; TUN_READ_LEN];
    // The first buffer takes a whole unsegmented packet; the others one MTU each.
    let seg_len = usize::from(d.config().node.mtu).max(1280) + 64;
    let mut segs: Vec<Vec<u8>> = (0..SPLIT_MAX)
        .map(|i| vec![0u8; if i == 0 { BUF_LEN } else { seg_len }])
        .collect();
    let mut sizes = vec![0usize; SPLIT_MAX];
    let mut dst = vec![0u8; BUF_LEN + peers::WG_OVERHEAD];
    let mut out = GsoBatch::default();
    while !d.shutdown.is_set() {
        let n = match d.tun.recv_segments(&mut raw, &mut segs, &mut sizes) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                out.flush(&d.udp);
                if let Err(e) = wait_readable(d.tun.fd(), IDLE_POLL_MS) {
                    tracing::error!("poll on TUN failed: {e}");
                }
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // A segment tun-rs could not split (malformed header, too many segments):
            // that packet is lost, the device is fine.
            Err(e) if e.raw_os_error().is_none() => {
                d.node.count_malformed();
                tracing::debug!("TUN segment dropped: {e}");
                continue;
            }
            Err(e) => {
                tracing::error!("read from TUN failed: {e}");
                if d.shutdown.wait_timeout(Duration::from_millis(100)) {
                    break;
                }
                continue;
            }
        };
        let table = d.table.load();
        let now = unix_now();
        let mono = d.mono();
        for (seg, &len) in segs.iter().zip(&sizes).take(n) {
            let packet = &seg[..len];
            // Policy sees what local workloads send: replies on flows peers opened, and
            // the flows the workloads open themselves (whose replies then come back in).
            match d.enforce.outbound(packet, mono) {
                Verdict::Deliver => {}
                Verdict::Drop(reason) => {
                    tracing::trace!(reason = reason.name(), "outbound refused");
                    continue;
                }
                Verdict::Consumed => continue,
            }
            if packet.len() + peers::WG_OVERHEAD > GSO_MAX_BYTES {
                // Larger than any UDP datagram: encrypted aside, refused by the socket.
                match peers::outbound(&d.node, &table, packet, &mut dst, now) {
                    Outbound::Send { to, data } => out.push(&d.udp, data, to),
                    Outbound::Queued => {}
                    Outbound::Drop(reason) => tracing::trace!(?reason, "outbound drop"),
                }
                continue;
            }
            // Encrypted in place into the GSO batch: the ciphertext is not copied.
            let space = out.space(
                &d.udp,
                (packet.len() + peers::WG_OVERHEAD).max(peers::MIN_DST_LEN),
            );
            let start = space.as_ptr();
            match peers::outbound(&d.node, &table, packet, space, now) {
                Outbound::Send { to, data } => {
                    // `peers::outbound` writes its datagram at the start of `dst`.
                    debug_assert_eq!(data.as_ptr(), start);
                    let n = data.len();
                    out.commit(&d.udp, n, to);
                }
                Outbound::Queued => {}
                Outbound::Drop(reason) => tracing::trace!(?reason, "outbound drop"),
            }
        }
    }
}

/// UDP → TUN.
pub fn udp_loop(d: &Daemon) {
    let mut raw = vec![0u8; GRO_BUF_LEN];
    let mut batch = TunBatch::new(TUN_BATCH);
    let mut aux = vec![0u8; BUF_LEN];
    let mut emit = Emit::default();
    while !d.shutdown.is_set() {
        let r = match d.udp.recv_batch(&mut raw) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                batch.flush(&d.tun);
                if let Err(e) = wait_readable(d.udp.fd(), IDLE_POLL_MS) {
                    tracing::error!("poll on UDP failed: {e}");
                }
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // ICMP errors surface here (ECONNREFUSED...); they are not fatal.
                tracing::debug!("UDP receive: {e}");
                continue;
            }
        };
        let from = r.from;
        let table = d.table.load();
        let now = Now {
            wall: unix_now(),
            mono: d.mono(),
        };
        for datagram in raw[..r.len].chunks(r.segment) {
            if batch.is_full() {
                batch.flush(&d.tun);
            }
            // Decrypted in place into the batch: a delivered packet is not copied.
            let slot = batch.slot();
            match peers::inbound(
                &d.node, &table, &d.enforce, from, datagram, slot, now, &mut emit,
            ) {
                Inbound::Deliver(packet) => {
                    let len = packet.len();
                    batch.commit(len);
                }
                Inbound::Send { to, data, flush } => {
                    send(d, data, to);
                    if let Some(peer) = flush {
                        while let Some(t) = peers::flush(&peer, &mut aux) {
                            send(d, t.data, t.to);
                        }
                    }
                }
                Inbound::Done => {}
                Inbound::Rehandshake(peer) => {
                    if let Some(t) = peers::initiate(&peer, &mut aux) {
                        send(d, t.data, t.to);
                    }
                }
                Inbound::Drop(reason) => tracing::trace!(?reason, %from, "inbound drop"),
            }
            if !emit.is_empty() {
                // In order with the delivered packets: local ones join the batch.
                for (toward, packet) in emit.packets() {
                    match toward {
                        Toward::Local => batch.push(&d.tun, packet),
                        Toward::Peer => send_to_peer(d, &table, packet, &mut aux),
                    }
                }
                emit.clear();
            }
        }
    }
}

/// Sends what the enforcer emitted: to local workloads through the TUN, to peers
/// encrypted through their sessions (routed by destination, without policy: these
/// are the enforcer's own answers).
pub fn send_emitted(d: &Daemon, emit: &Emit, aux: &mut [u8]) {
    let table = d.table.load();
    for (toward, packet) in emit.packets() {
        match toward {
            Toward::Local => {
                if let Err(e) = d.tun.send(packet) {
                    tracing::debug!("write to TUN failed: {e}");
                }
            }
            Toward::Peer => send_to_peer(d, &table, packet, aux),
        }
    }
}

/// Encrypts an enforcer-made packet for the peer that owns its destination.
fn send_to_peer(d: &Daemon, table: &peers::PeerTable, packet: &[u8], aux: &mut [u8]) {
    match peers::outbound(&d.node, table, packet, aux, unix_now()) {
        Outbound::Send { to, data } => send(d, data, to),
        Outbound::Queued => {}
        Outbound::Drop(reason) => tracing::debug!(?reason, "injected packet dropped"),
    }
}

/// WireGuard timers for every peer, and the handshake rate limiter's reset.
pub fn timer_loop(d: &Daemon) {
    let mut dst = vec![0u8; BUF_LEN];
    let mut emit = Emit::default();
    let mut ticks = 0u64;
    while !d.shutdown.wait_timeout(TIMER_TICK) {
        ticks += 1;
        if ticks.is_multiple_of(4) {
            d.node.reset_rate_limiter();
        }
        let now = unix_now();
        // Overdue request heads (408) and expired flows.
        d.enforce.poll(d.mono(), now, &mut emit);
        if !emit.is_empty() {
            send_emitted(d, &emit, &mut dst);
            emit.clear();
        }
        let table = d.table.load();
        for peer in table.peers() {
            if let Some(t) = peers::tick(&d.node, peer, &mut dst, now) {
                send(d, t.data, t.to);
            }
        }
    }
}

fn send(d: &Daemon, data: &[u8], to: std::net::SocketAddr) {
    if let Err(e) = d.udp.send_to(data, to) {
        tracing::debug!(%to, "UDP send failed: {e}");
    }
}
