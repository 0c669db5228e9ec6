//! The packet loops (I/O shell): read, hand the bytes to the sans-IO core in `peers`,
//! act on what it returns. One thread per direction plus a timer thread. Buffers are
//! allocated once per thread; the peer table is read through its `ArcSwap` snapshot,
//! so a packet takes no lock but its own peer's session lock.
//!
//! Reads are non-blocking; a loop polls (with a timeout, to notice shutdown) only
//! when the descriptor is drained, so a busy loop makes one system call per packet.
//! The performance issue replaces these with batched reads and writes.

use std::io;
use std::time::Duration;

use mesh_proto::time::UnixTime;

use crate::daemon::Daemon;
use crate::enforce::{Emit, Toward};
use crate::peers::{self, Inbound, Now, Outbound};
use crate::transport::wait_readable;

/// Largest datagram or TUN packet handled.
const BUF_LEN: usize = 65_536;
/// How often the loops look at the shutdown flag while idle.
const IDLE_POLL_MS: i32 = 200;
/// WireGuard timers tick at this interval (boringtun's own device uses 250 ms).
const TIMER_TICK: Duration = Duration::from_millis(250);

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
    let mut src = vec![0u8; BUF_LEN];
    let mut dst = vec![0u8; BUF_LEN + peers::WG_OVERHEAD];
    let mut aux = vec![0u8; BUF_LEN + peers::WG_OVERHEAD];
    let mut emit = Emit::default();
    while !d.shutdown.is_set() {
        let n = match d.tun.recv(&mut src) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if let Err(e) = wait_readable(d.tun.fd(), IDLE_POLL_MS) {
                    tracing::error!("poll on TUN failed: {e}");
                }
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!("read from TUN failed: {e}");
                if d.shutdown.wait_timeout(Duration::from_millis(100)) {
                    break;
                }
                continue;
            }
        };
        // The local workload (by source), policy, then the peer (by destination).
        let table = d.table.load();
        let now = Now {
            wall: unix_now(),
            mono: d.mono(),
        };
        match peers::from_tun(
            &d.node,
            &table,
            &d.enforce,
            &src[..n],
            &mut dst,
            now,
            &mut emit,
        ) {
            Outbound::Send { to, data } => send(d, data, to),
            Outbound::Deliver(packet) => {
                if let Err(e) = d.tun.send(packet) {
                    tracing::debug!("write to TUN failed: {e}");
                }
            }
            Outbound::Queued | Outbound::Done => {}
            Outbound::Drop(reason) => tracing::trace!(?reason, "outbound drop"),
        }
        if !emit.is_empty() {
            send_emitted(d, &emit, &mut aux);
            emit.clear();
        }
    }
}

/// UDP → TUN.
pub fn udp_loop(d: &Daemon) {
    let mut src = vec![0u8; BUF_LEN];
    let mut dst = vec![0u8; BUF_LEN];
    let mut aux = vec![0u8; BUF_LEN];
    let mut emit = Emit::default();
    while !d.shutdown.is_set() {
        let (n, from) = match d.udp.recv_from(&mut src) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
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
        let table = d.table.load();
        let now = Now {
            wall: unix_now(),
            mono: d.mono(),
        };
        match peers::inbound(
            &d.node,
            &table,
            &d.enforce,
            from,
            &src[..n],
            &mut dst,
            now,
            &mut emit,
        ) {
            Inbound::Deliver(packet) => {
                if let Err(e) = d.tun.send(packet) {
                    tracing::debug!("write to TUN failed: {e}");
                }
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
            send_emitted(d, &emit, &mut aux);
            emit.clear();
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
            Toward::Peer => match peers::outbound(&d.node, &table, packet, aux, unix_now()) {
                Outbound::Send { to, data } => send(d, data, to),
                // Towards a workload of this host.
                Outbound::Deliver(packet) => {
                    if let Err(e) = d.tun.send(packet) {
                        tracing::debug!("write to TUN failed: {e}");
                    }
                }
                Outbound::Queued | Outbound::Done => {}
                Outbound::Drop(reason) => tracing::debug!(?reason, "injected packet dropped"),
            },
        }
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
            d.table.load().reset_rate_limiters();
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
