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

pub mod batch;
pub mod cpu_latency;
pub mod device;
pub mod gro;
pub mod transport;

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::datapath::batch::TunBatch;
use crate::datapath::cpu_latency::CpuLatency;
use crate::datapath::device::{Tun, TUN_READ_LEN};
use crate::datapath::transport::{GsoBatch, Udp, GRO_BUF_LEN, GSO_MAX_BYTES};
use crate::enforce::decisions::DecisionLog;
use crate::enforce::{Emit, Enforcer, Toward};
use crate::node::{self, Inbound, Now, Outbound};
use crate::peers::{self, Node, PeerTable};
use crate::sys::clock::unix_now;
use crate::sys::poll::{wait_readable, wait_readable2};
use crate::sys::shutdown::Shutdown;

/// Largest datagram or TUN packet handled.
const BUF_LEN: usize = 65_536;
/// How often the loops look at the shutdown flag while idle.
const IDLE_POLL_MS: i32 = 200;
/// WireGuard timers tick at this interval (boringtun's own device uses 250 ms).
const TIMER_TICK: Duration = Duration::from_millis(250);
/// Packets one TSO segment may split into (64 KiB at an MSS of 512 bytes and more).
const SPLIT_MAX: usize = 128;
/// Packets written to the TUN in one batch (one UDP GRO read carries up to 64). Each
/// buffer can grow to a 64 KiB coalesced packet: 32 keep a worker's share of resident
/// memory near 2 MiB with no measurable loss against 64 (scripts/memtest.sh, bench.sh).
const TUN_BATCH: usize = 32;
/// Packets between two workloads of this host written back to the TUN in one batch.
const LOCAL_BATCH: usize = 8;

/// What the packet path owns, shared by its threads: the node core's state (its
/// counters, the peer table snapshot, the enforcer), the TUN and the socket, and the
/// flags it heeds. The daemon (the control layer) holds it and changes what the data
/// path reads through these same handles (it stores a new table snapshot, sets the
/// enforcer's policy); the data path never calls up into the daemon.
pub struct Plane {
    pub node: Node,
    pub table: ArcSwap<PeerTable>,
    pub enforce: Enforcer,
    pub log: Arc<DecisionLog>,
    /// The shell's monotonic clock starts here.
    pub epoch: Instant,
    pub tun: Tun,
    pub udp: Udp,
    pub shutdown: Arc<Shutdown>,
    /// The CPU wake-up latency request (`node.cpu_latency_us`), held while traffic
    /// flows: marked by the data-path threads, withdrawn by the timer thread.
    pub cpu_latency: CpuLatency,
    /// The length of each segment buffer after the first: one MTU-sized packet
    /// (`node.mtu`, at least IPv6's 1280) and room to spare ([`Plane::segment_len`]).
    pub seg_len: usize,
}

impl Plane {
    /// The monotonic time of the shell.
    pub fn mono(&self) -> Duration {
        self.epoch.elapsed()
    }

    /// The segment buffer length for TUN MTU `mtu`.
    pub fn segment_len(mtu: u16) -> usize {
        usize::from(mtu).max(1280) + 64
    }
}

/// What one read did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// Handled a read; there may be more.
    Busy,
    /// Nothing waiting.
    Drained,
    /// The descriptor failed (logged); back off before the next read.
    Failed,
}

/// TUN → UDP: the buffers of one worker.
struct ToPeers {
    raw: Vec<u8>,
    segs: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    dst: Vec<u8>,
    out: GsoBatch,
    /// Packets between two workloads of this host, back to the TUN.
    local: TunBatch,
    emit: Emit,
    aux: Vec<u8>,
}

impl ToPeers {
    fn new(d: &Plane) -> ToPeers {
        // The first buffer takes a whole unsegmented packet; the others one MTU each.
        let seg_len = d.seg_len;
        ToPeers {
            raw: vec![0u8; TUN_READ_LEN],
            segs: (0..SPLIT_MAX)
                .map(|i| vec![0u8; if i == 0 { BUF_LEN } else { seg_len }])
                .collect(),
            sizes: vec![0usize; SPLIT_MAX],
            dst: vec![0u8; BUF_LEN + peers::WG_OVERHEAD],
            out: GsoBatch::default(),
            local: TunBatch::new(LOCAL_BATCH),
            emit: Emit::default(),
            aux: vec![0u8; BUF_LEN + peers::WG_OVERHEAD],
        }
    }

    /// Reads one packet or TSO segment from the TUN and queues its packets, encrypted,
    /// for their peers.
    fn step(&mut self, d: &Plane, tun: &Tun, udp: &Udp) -> Step {
        let n = match tun.recv_segments(&mut self.raw, &mut self.segs, &mut self.sizes) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Drained,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Step::Busy,
            // A segment tun-rs could not split (malformed header, too many segments):
            // that packet is lost, the device is fine.
            Err(e) if e.raw_os_error().is_none() => {
                d.node.count_malformed();
                tracing::debug!("TUN segment dropped: {e}");
                return Step::Busy;
            }
            Err(e) => {
                tracing::error!("read from TUN failed: {e}");
                return Step::Failed;
            }
        };
        let table = d.table.load();
        let now = Now {
            wall: unix_now(),
            mono: d.mono(),
        };
        let (out, dst, local, emit, aux) = (
            &mut self.out,
            &mut self.dst,
            &mut self.local,
            &mut self.emit,
            &mut self.aux,
        );
        for (seg, &len) in self.segs.iter().zip(&self.sizes).take(n) {
            let packet = &seg[..len];
            // The local workload (by source), policy, then the peer (by destination).
            // Encrypted in place into the GSO batch: the ciphertext is not copied.
            let want = (len + peers::WG_OVERHEAD).max(peers::MIN_DST_LEN);
            let aside = want > GSO_MAX_BYTES;
            let space: &mut [u8] = if aside {
                // Larger than any UDP datagram: encrypted aside, refused by the socket.
                &mut dst[..]
            } else {
                out.space(udp, want)
            };
            let start = space.as_ptr();
            match node::from_tun(&d.node, &table, &d.enforce, packet, space, now, emit) {
                Outbound::Send { to, data } if aside => send_on(udp, data, to),
                Outbound::Send { to, data } => {
                    // `peers::from_tun` writes its datagram at the start of `dst`.
                    debug_assert_eq!(data.as_ptr(), start);
                    let n = data.len();
                    out.commit(udp, n, to);
                }
                // To another workload of this host: back into the TUN, coalesced.
                Outbound::Deliver(p) => local.push(tun, p),
                Outbound::Queued | Outbound::Done => {}
                Outbound::Drop(reason) => tracing::trace!(?reason, "outbound drop"),
            }
            if !emit.is_empty() {
                // The enforcer's packets go after what is already queued.
                out.flush(udp);
                for (toward, p) in emit.packets() {
                    match toward {
                        Toward::Local => local.push(tun, p),
                        Toward::Peer => send_to_peer(d, &table, p, aux),
                    }
                }
                emit.clear();
            }
        }
        local.flush(tun);
        Step::Busy
    }

    fn flush(&mut self, udp: &Udp) {
        self.out.flush(udp);
    }
}

/// UDP → TUN: the buffers of one worker.
struct FromPeers {
    raw: Vec<u8>,
    batch: TunBatch,
    aux: Vec<u8>,
    emit: Emit,
}

impl FromPeers {
    fn new() -> FromPeers {
        FromPeers {
            raw: vec![0u8; GRO_BUF_LEN],
            batch: TunBatch::new(TUN_BATCH),
            aux: vec![0u8; BUF_LEN],
            emit: Emit::default(),
        }
    }

    /// Reads one datagram or GRO run from the socket; delivered packets join the TUN
    /// batch (written when it is full).
    fn step(&mut self, d: &Plane, tun: &Tun, udp: &Udp) -> Step {
        let r = match udp.recv_batch(&mut self.raw) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Drained,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Step::Busy,
            Err(e) => {
                // ICMP errors surface here (ECONNREFUSED...); they are not fatal.
                tracing::debug!("UDP receive: {e}");
                return Step::Busy;
            }
        };
        let from = r.from;
        let table = d.table.load();
        let now = Now {
            wall: unix_now(),
            mono: d.mono(),
        };
        let (batch, aux, emit) = (&mut self.batch, &mut self.aux, &mut self.emit);
        for datagram in r.datagrams(&self.raw) {
            if batch.is_full() {
                batch.flush(tun);
            }
            // Decrypted in place into the batch: a delivered packet is not copied.
            let slot = batch.slot();
            match node::from_udp(&d.node, &table, &d.enforce, from, datagram, slot, now, emit) {
                Inbound::Deliver(packet) => {
                    let len = packet.len();
                    batch.commit(len);
                }
                Inbound::Send { to, data, flush } => {
                    send_on(udp, data, to);
                    if let Some(peer) = flush {
                        while let Some(t) = peers::flush(&peer, aux) {
                            send_on(udp, t.data, t.to);
                        }
                    }
                }
                Inbound::Done => {}
                again @ (Inbound::Rehandshake(_) | Inbound::RehandshakeAt(_)) => {
                    node::rehandshake(&table, &again, aux, |t| send_on(udp, t.data, t.to));
                }
                Inbound::Drop(reason) => tracing::trace!(?reason, %from, "inbound drop"),
            }
            if !emit.is_empty() {
                // In order with the delivered packets: local ones join the batch.
                for (toward, packet) in emit.packets() {
                    match toward {
                        Toward::Local => batch.push(tun, packet),
                        Toward::Peer => send_to_peer(d, &table, packet, aux),
                    }
                }
                emit.clear();
            }
        }
        Step::Busy
    }

    fn flush(&mut self, tun: &Tun) {
        self.batch.flush(tun);
    }
}

/// TUN → UDP, one thread (the per-direction layout).
pub fn tun_loop(d: &Plane) {
    let mut s = ToPeers::new(d);
    while !d.shutdown.is_set() {
        match s.step(d, &d.tun, &d.udp) {
            Step::Busy => d.cpu_latency.traffic(),
            Step::Drained => {
                s.flush(&d.udp);
                if let Err(e) = wait_readable(d.tun.fd(), IDLE_POLL_MS) {
                    tracing::error!("poll on TUN failed: {e}");
                }
            }
            Step::Failed => {
                s.flush(&d.udp);
                if d.shutdown.wait_timeout(Duration::from_millis(100)) {
                    break;
                }
            }
        }
    }
}

/// UDP → TUN, one thread (the per-direction layout).
pub fn udp_loop(d: &Plane) {
    let mut s = FromPeers::new();
    while !d.shutdown.is_set() {
        match s.step(d, &d.tun, &d.udp) {
            Step::Busy => d.cpu_latency.traffic(),
            Step::Drained | Step::Failed => {
                s.flush(&d.tun);
                if let Err(e) = wait_readable(d.udp.fd(), IDLE_POLL_MS) {
                    tracing::error!("poll on UDP failed: {e}");
                }
            }
        }
    }
}

/// Reads per direction before a worker turns to the other one.
const WORKER_ROUND: usize = 8;

/// Both directions on one thread, with its own TUN queue and UDP socket (worker 0
/// uses the daemon's own). The kernel keeps each TCP flow on one TUN queue and each
/// peer's datagrams on one socket, so no flow is reordered between workers. A
/// request answered locally (a ping, a small HTTP exchange) is read back by the
/// thread that delivered it, without waking another one.
pub fn worker_loop(d: &Plane, index: usize) {
    let (own_tun, own_udp) = if index == 0 {
        (None, None)
    } else {
        match (d.tun.open_queue(), d.udp.open_sibling()) {
            (Ok(t), Ok(u)) => (Some(t), Some(u)),
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(
                    worker = index,
                    "no TUN queue or socket for this worker: {e}"
                );
                return;
            }
        }
    };
    let tun = own_tun.as_ref().unwrap_or(&d.tun);
    let udp = own_udp.as_ref().unwrap_or(&d.udp);
    let mut to = ToPeers::new(d);
    let mut from = FromPeers::new();
    // Whether the socket may hold datagrams. After a wake-up that poll reports for
    // the TUN alone (a local workload sending), the socket is not read first: that
    // read would only return EAGAIN, and after an idle spell it is one of the
    // slowest system calls of the round trip (several µs with cold caches).
    let mut udp_ready = true;
    while !d.shutdown.is_set() {
        let mut busy = false;
        let mut failed = false;
        for _ in 0..WORKER_ROUND {
            if !udp_ready {
                break;
            }
            match from.step(d, tun, udp) {
                Step::Busy => busy = true,
                Step::Drained | Step::Failed => break,
            }
        }
        udp_ready = true;
        from.flush(tun);
        for _ in 0..WORKER_ROUND {
            match to.step(d, tun, udp) {
                Step::Busy => busy = true,
                Step::Drained => break,
                Step::Failed => {
                    failed = true;
                    break;
                }
            }
        }
        to.flush(udp);
        if busy {
            d.cpu_latency.traffic();
        }
        if failed && d.shutdown.wait_timeout(Duration::from_millis(100)) {
            break;
        }
        if !busy {
            match wait_readable2(tun.fd(), udp.fd(), IDLE_POLL_MS) {
                Ok((tun_ready, udp_now)) => udp_ready = udp_now || !tun_ready,
                Err(e) => tracing::error!("poll failed: {e}"),
            }
        }
    }
}

/// A data-path thread: its name and body.
pub type Thread = (String, Box<dyn FnOnce(&Plane) + Send>);

/// The data-path threads to start (`node.workers`: 0 = one thread per direction; N =
/// N workers doing both directions, each with its own TUN queue and socket), and the
/// timer thread.
pub fn threads(workers: u8) -> Vec<Thread> {
    let mut t: Vec<Thread> = Vec::new();
    match usize::from(workers) {
        0 => {
            t.push(("tun".into(), Box::new(tun_loop)));
            t.push(("udp".into(), Box::new(udp_loop)));
        }
        n => {
            for i in 0..n {
                t.push((format!("worker{i}"), Box::new(move |d| worker_loop(d, i))));
            }
        }
    }
    t.push(("timers".into(), Box::new(timer_loop)));
    t
}

/// Sends what the enforcer emitted: to local workloads through the TUN, to peers
/// encrypted through their sessions (routed by destination, without policy: these
/// are the enforcer's own answers).
pub fn send_emitted(d: &Plane, emit: &Emit, aux: &mut [u8]) {
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
fn send_to_peer(d: &Plane, table: &peers::PeerTable, packet: &[u8], aux: &mut [u8]) {
    match peers::outbound(&d.node, table, packet, aux, unix_now()) {
        peers::Outbound::Send { to, data } => send(d, data, to),
        // Towards a workload of this host.
        peers::Outbound::Deliver(packet) => {
            if let Err(e) = d.tun.send(packet) {
                tracing::debug!("write to TUN failed: {e}");
            }
        }
        peers::Outbound::Queued => {}
        peers::Outbound::Drop(reason) => tracing::debug!(?reason, "injected packet dropped"),
    }
}

/// WireGuard timers for every peer, the handshake rate limiter's reset, and the
/// enforcer's timeouts. The control plane's chores run on a thread of their own
/// (`daemon::chores_loop`).
pub fn timer_loop(d: &Plane) {
    let mut dst = vec![0u8; BUF_LEN];
    let mut emit = Emit::default();
    let mut ticks = 0u64;
    while !d.shutdown.wait_timeout(TIMER_TICK) {
        ticks += 1;
        d.cpu_latency.tick();
        let now = unix_now();
        if ticks.is_multiple_of(4) {
            d.table.load().reset_rate_limiters();
        }
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

fn send(d: &Plane, data: &[u8], to: std::net::SocketAddr) {
    send_on(&d.udp, data, to);
}

fn send_on(udp: &Udp, data: &[u8], to: std::net::SocketAddr) {
    if let Err(e) = udp.send_to(data, to) {
        tracing::debug!(%to, "UDP send failed: {e}");
    }
}
