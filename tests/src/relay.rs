//! A userspace impairment relay for the fault tests: this kernel has no `netem` qdisc, so
//! the underlay between two meshds goes through a small UDP relay that loses, reorders,
//! duplicates, corrupts and delays datagrams, in both directions, from a seed.
//!
//! # Shape
//!
//! The relay runs in a host of its own (a namespace on the underlay, no meshd) with two
//! UDP sockets, one "face" per meshd. Each meshd is given the other's face as that
//! peer's endpoint (`meshctl peer add --endpoint`), so every datagram between them, the
//! WireGuard handshakes included, crosses the relay:
//!
//! ```text
//!   a ──► face_b ─(impair toward b)─► face_a ──► b      (b sees a at face_a)
//!   a ◄── face_b ◄─(impair toward a)─ face_a ◄── b      (a sees b at face_b)
//! ```
//!
//! A meshd learns a peer's endpoint from the source of its authenticated packets; the
//! relay sends toward b from face_a and toward a from face_b, so what each meshd learns
//! is the relay again. A restarted meshd keeps its port: the relay carries on.
//!
//! # Determinism
//!
//! What happens to the n-th datagram of a direction is a function of the seed, the
//! direction and n only ([`Impairer`]): every datagram draws the same number of random
//! numbers whatever its fate, so a run with the same seed (`MESH_RELAY_SEED`, printed by
//! [`Relay::start`]) replays the same sequence of fates. Which TCP segment meets which
//! fate still depends on timing (handshakes, keepalives and the kernel's pacing), as
//! with netem.
//!
//! # Pieces
//!
//! - [`Impairment`]: the rates and delays, as text `loss=0.05,reorder=0.25,...`.
//! - [`Impairer`] and [`DelayQueue`]: the sans-IO core (fate of each datagram; datagrams
//!   waiting for their time), unit-tested below.
//! - [`serve`]: the I/O shell (`mesh-testtool relay`), one thread per direction and a
//!   control socket on loopback (`set <impairment>`, `stats`).
//! - [`Relay`]: the harness's handle, started by [`Relay::start`] in a test's mesh.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::host::Host;
use crate::mesh::{lock, Mesh, PeerSet};

/// What the relay does to datagrams, each rate a probability per datagram.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Impairment {
    /// Dropped.
    pub loss: f64,
    /// Held back by `hold` while later datagrams pass.
    pub reorder: f64,
    /// Sent twice.
    pub duplicate: f64,
    /// One byte changed (WireGuard's authentication then refuses the datagram: to a
    /// meshd it is a counted `malformed` drop).
    pub corrupt: f64,
    /// Added to every datagram.
    pub delay: Duration,
    /// Up to this much more, uniformly (reorders datagrams closer than it).
    pub jitter: Duration,
    /// How long a reordered datagram is held back.
    pub hold: Duration,
}

impl Impairment {
    /// Nothing impaired.
    pub fn none() -> Impairment {
        Impairment::default()
    }

    /// Loss alone.
    pub fn loss(rate: f64) -> Impairment {
        Impairment {
            loss: rate,
            ..Impairment::default()
        }
    }

    /// Reordering alone: `rate` of the datagrams held back by 3 ms.
    pub fn reorder(rate: f64) -> Impairment {
        Impairment {
            reorder: rate,
            hold: Duration::from_millis(3),
            ..Impairment::default()
        }
    }

    /// Parses `loss=0.05,reorder=0.25,duplicate=0.01,corrupt=0.01,delay=1ms,jitter=0ms,
    /// hold=3ms` (any subset, any order; `none` or an empty text for nothing).
    pub fn parse(text: &str) -> Result<Impairment> {
        let mut imp = Impairment::default();
        for field in text.split(',').map(str::trim) {
            if field.is_empty() || field == "none" {
                continue;
            }
            let (key, value) = field
                .split_once('=')
                .with_context(|| format!("impairment {field:?}: expected key=value"))?;
            let rate = || -> Result<f64> {
                let r: f64 = value
                    .parse()
                    .with_context(|| format!("impairment {key}: {value:?} is not a number"))?;
                if !(0.0..=1.0).contains(&r) {
                    bail!("impairment {key}: {r} is not a probability in [0, 1]");
                }
                Ok(r)
            };
            let millis = || -> Result<Duration> {
                let ms = value.strip_suffix("ms").unwrap_or(value);
                let ms: f64 = ms
                    .parse()
                    .with_context(|| format!("impairment {key}: {value:?} is not 12ms"))?;
                if !(0.0..=60_000.0).contains(&ms) {
                    bail!("impairment {key}: {value} is out of range");
                }
                Ok(Duration::from_secs_f64(ms / 1000.0))
            };
            match key {
                "loss" => imp.loss = rate()?,
                "reorder" => imp.reorder = rate()?,
                "duplicate" => imp.duplicate = rate()?,
                "corrupt" => imp.corrupt = rate()?,
                "delay" => imp.delay = millis()?,
                "jitter" => imp.jitter = millis()?,
                "hold" => imp.hold = millis()?,
                _ => bail!("impairment: unknown key {key:?} (loss, reorder, duplicate, corrupt, delay, jitter, hold)"),
            }
        }
        Ok(imp)
    }
}

impl fmt::Display for Impairment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        write!(
            f,
            "loss={},reorder={},duplicate={},corrupt={},delay={}ms,jitter={}ms,hold={}ms",
            self.loss,
            self.reorder,
            self.duplicate,
            self.corrupt,
            ms(self.delay),
            ms(self.jitter),
            ms(self.hold)
        )
    }
}

/// SplitMix64 (Steele, Lea, Flood 2014): small, fast, and every seed is a good one.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// What happens to one datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fate {
    /// Copies sent: 0 (lost), 1, or 2 (duplicated).
    pub copies: u8,
    /// The first copy has `bytes[at] ^= mask` (mask never 0).
    pub corrupt: Option<(usize, u8)>,
    /// Held back (reordered) by the impairment's `hold`.
    pub reordered: bool,
    /// When it leaves, from its arrival.
    pub delay: Duration,
}

/// Which way a datagram travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    TowardA,
    TowardB,
}

/// The fates of one direction's datagrams, from a seed (see the module docs).
#[derive(Clone, Debug)]
pub struct Impairer {
    imp: Impairment,
    rng: Rng,
}

impl Impairer {
    pub fn new(imp: Impairment, seed: u64, dir: Direction) -> Impairer {
        // Two independent streams from one seed.
        let stream = match dir {
            Direction::TowardA => 0x5157_4150_4f54_4f41,
            Direction::TowardB => 0x5157_4150_4f54_4f42,
        };
        let mut mix = Rng::new(seed ^ stream);
        Impairer {
            imp,
            rng: Rng::new(mix.next_u64()),
        }
    }

    pub fn impairment(&self) -> Impairment {
        self.imp
    }

    /// Takes another impairment from the next datagram on; the random stream goes on.
    pub fn set(&mut self, imp: Impairment) {
        self.imp = imp;
    }

    /// The fate of the next datagram, `len` bytes long. Draws seven numbers, always.
    pub fn fate(&mut self, len: usize) -> Fate {
        let [lost, dup, corrupt, reorder, jitter, at, mask] =
            std::array::from_fn(|_| self.rng.unit());
        let imp = &self.imp;
        if lost < imp.loss {
            return Fate {
                copies: 0,
                corrupt: None,
                reordered: false,
                delay: Duration::ZERO,
            };
        }
        let corrupt = (corrupt < imp.corrupt && len > 0).then(|| {
            let at = ((at * len as f64) as usize).min(len - 1);
            (at, 1 + (mask * 255.0) as u8)
        });
        let reordered = reorder < imp.reorder;
        let mut delay = imp.delay + imp.jitter.mul_f64(jitter);
        if reordered {
            delay += imp.hold;
        }
        Fate {
            copies: if dup < imp.duplicate { 2 } else { 1 },
            corrupt,
            reordered,
            delay,
        }
    }
}

/// Datagrams waiting for their time, in order of it (ties in arrival order), at most
/// `limit` of them: bounded like a real queue, which drops when full.
#[derive(Debug)]
pub struct DelayQueue {
    heap: BinaryHeap<Reverse<(Duration, u64, Vec<u8>)>>,
    next: u64,
    limit: usize,
}

impl DelayQueue {
    pub fn new(limit: usize) -> DelayQueue {
        DelayQueue {
            heap: BinaryHeap::new(),
            next: 0,
            limit,
        }
    }

    /// Queues `bytes` to leave at `due`; false (dropped) when full.
    pub fn push(&mut self, due: Duration, bytes: Vec<u8>) -> bool {
        if self.heap.len() >= self.limit {
            return false;
        }
        self.heap.push(Reverse((due, self.next, bytes)));
        self.next += 1;
        true
    }

    /// When the first datagram is due.
    pub fn next_due(&self) -> Option<Duration> {
        self.heap.peek().map(|Reverse((due, _, _))| *due)
    }

    /// The next datagram due at `now`, if any.
    pub fn pop_due(&mut self, now: Duration) -> Option<Vec<u8>> {
        if self.next_due()? > now {
            return None;
        }
        self.heap.pop().map(|Reverse((_, _, bytes))| bytes)
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

/// Counters of one direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub datagrams: u64,
    pub bytes: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub corrupted: u64,
    pub reordered: u64,
    /// Dropped because the delay queue was full.
    pub overflow: u64,
}

/// What `stats` on the control socket answers.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Stats {
    pub seed: u64,
    pub impairment: String,
    pub toward_a: Counters,
    pub toward_b: Counters,
}

/// One direction's counters, shared between its thread and the control thread.
#[derive(Default)]
struct SharedCounters([AtomicU64; 7]);

impl SharedCounters {
    fn add(&self, i: usize, n: u64) {
        self.0[i].fetch_add(n, Ordering::Relaxed);
    }

    fn get(&self) -> Counters {
        let v: [u64; 7] = std::array::from_fn(|i| self.0[i].load(Ordering::Relaxed));
        Counters {
            datagrams: v[0],
            bytes: v[1],
            lost: v[2],
            duplicated: v[3],
            corrupted: v[4],
            reordered: v[5],
            overflow: v[6],
        }
    }
}

/// Where the relay listens and sends.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    /// The face b talks to, representing a; datagrams from it go to `a`.
    pub face_a: SocketAddr,
    /// a's real endpoint.
    pub a: SocketAddr,
    /// The face a talks to, representing b.
    pub face_b: SocketAddr,
    pub b: SocketAddr,
    /// The control socket (loopback of the relay's namespace).
    pub control: SocketAddr,
}

struct Shared {
    seed: u64,
    imp: Mutex<(u64, Impairment)>,
    counters: [SharedCounters; 2],
    start: Instant,
}

/// Runs the relay (the I/O shell of `mesh-testtool relay`) until killed; prints
/// `relay listening seed=<seed>` once both faces and the control socket are bound.
pub fn serve(plan: Plan, seed: u64, imp: Impairment) -> Result<()> {
    let bind = |addr: SocketAddr| -> Result<UdpSocket> {
        let s = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::DGRAM,
            None,
        )?;
        // Deep buffers: the relay must lose only what it is told to.
        let _ = s.set_recv_buffer_size(8 << 20);
        let _ = s.set_send_buffer_size(8 << 20);
        s.bind(&addr.into())
            .with_context(|| format!("bind {addr}"))?;
        Ok(s.into())
    };
    let face_a = bind(plan.face_a)?;
    let face_b = bind(plan.face_b)?;
    let control =
        UdpSocket::bind(plan.control).with_context(|| format!("bind {}", plan.control))?;
    let shared = Arc::new(Shared {
        seed,
        imp: Mutex::new((0, imp)),
        counters: Default::default(),
        start: clock(),
    });
    // Toward b: what a sends to face_b goes out of face_a; and the other way round.
    for (dir, from, out, to) in [
        (
            Direction::TowardB,
            face_b.try_clone()?,
            face_a.try_clone()?,
            plan.b,
        ),
        (
            Direction::TowardA,
            face_a.try_clone()?,
            face_b.try_clone()?,
            plan.a,
        ),
    ] {
        let shared = shared.clone();
        spawn(move || {
            if let Err(e) = forward(&shared, dir, &from, &out, to) {
                eprintln!("relay {dir:?}: {e:#}");
                std::process::exit(1);
            }
        });
    }
    println!("relay listening seed={seed} impairment={imp}");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let mut buf = [0u8; 2048];
    loop {
        let (n, from) = control.recv_from(&mut buf)?;
        let text = String::from_utf8_lossy(&buf[..n]);
        let reply = match text.trim().split_once(' ').unwrap_or((text.trim(), "")) {
            ("set", spec) => match Impairment::parse(spec) {
                Ok(new) => {
                    let mut g = lock(&shared.imp);
                    *g = (g.0 + 1, new);
                    format!("ok {new}")
                }
                Err(e) => format!("error {e:#}"),
            },
            ("stats", _) => serde_json::to_string(&Stats {
                seed: shared.seed,
                impairment: lock(&shared.imp).1.to_string(),
                toward_a: shared.counters[0].get(),
                toward_b: shared.counters[1].get(),
            })?,
            _ => "error: commands are `set <impairment>` and `stats`".to_string(),
        };
        let _ = control.send_to(reply.as_bytes(), from);
    }
}

/// One direction: receive on `from`, impair, send out of `out` to `to`.
fn forward(
    shared: &Shared,
    dir: Direction,
    from: &UdpSocket,
    out: &UdpSocket,
    to: SocketAddr,
) -> Result<()> {
    let counters = &shared.counters[if dir == Direction::TowardA { 0 } else { 1 }];
    let (mut gen, imp) = *lock(&shared.imp);
    let mut impairer = Impairer::new(imp, shared.seed, dir);
    let mut queue = DelayQueue::new(100_000);
    let mut buf = vec![0u8; 65_536];
    let now = || clock().duration_since(shared.start);
    loop {
        let wait = match queue.next_due() {
            Some(due) => due.saturating_sub(now()).max(Duration::from_micros(50)),
            None => Duration::from_millis(100),
        };
        from.set_read_timeout(Some(wait))?;
        match from.recv_from(&mut buf) {
            Ok((n, _)) => {
                let current = *lock(&shared.imp);
                if current.0 != gen {
                    gen = current.0;
                    impairer.set(current.1);
                }
                let fate = impairer.fate(n);
                counters.add(0, 1);
                counters.add(1, n as u64);
                if fate.copies == 0 {
                    counters.add(2, 1);
                }
                if fate.copies == 2 {
                    counters.add(3, 1);
                }
                if fate.reordered {
                    counters.add(5, 1);
                }
                let t = now();
                for copy in 0..fate.copies {
                    let mut bytes = buf[..n].to_vec();
                    if let (0, Some((at, mask))) = (copy, fate.corrupt) {
                        bytes[at] ^= mask;
                        counters.add(4, 1);
                    }
                    if fate.delay.is_zero() && queue.is_empty() {
                        let _ = out.send_to(&bytes, to);
                    } else if !queue.push(t + fate.delay, bytes) {
                        counters.add(6, 1);
                    }
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e.into()),
        }
        let t = now();
        while let Some(bytes) = queue.pop_due(t) {
            let _ = out.send_to(&bytes, to);
        }
    }
}

#[allow(clippy::disallowed_methods)] // the relay is I/O: datagrams leave at their time.
fn clock() -> Instant {
    Instant::now()
}

#[allow(clippy::disallowed_methods)] // one thread per direction of the relay (I/O shell).
fn spawn(f: impl FnOnce() + Send + 'static) {
    std::thread::spawn(f);
}

/// The seed for a new relay: `MESH_RELAY_SEED` if set (to replay a failure), else a
/// fresh one.
pub fn seed_from_env() -> Result<u64> {
    match std::env::var("MESH_RELAY_SEED") {
        Ok(v) => v
            .trim()
            .parse()
            .with_context(|| format!("MESH_RELAY_SEED={v:?} is not a number")),
        Err(_) => {
            let mut b = [0u8; 8];
            use std::io::Read;
            std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
            Ok(u64::from_le_bytes(b))
        }
    }
}

/// A relay running between two hosts of a mesh (see the module docs).
pub struct Relay {
    host: Host,
    seed: u64,
    control: SocketAddr,
}

/// UDP ports of the relay's faces and control socket.
const FACE_A_PORT: u16 = 52001;
const FACE_B_PORT: u16 = 52002;
const CONTROL_PORT: u16 = 52000;

impl Relay {
    /// Starts a relay in a new host `name` (no meshd) and peers `a` and `b` through it
    /// (`meshctl peer add` with the relay's faces as endpoints, both ways). Bring `a`
    /// and `b` up with [`PeerSet::None`] so that they have no direct path. The seed
    /// comes from `MESH_RELAY_SEED` or is fresh; it is printed, so that a failure can be
    /// replayed.
    pub fn start(
        mesh: &mut Mesh,
        name: &str,
        a: &Host,
        b: &Host,
        imp: Impairment,
    ) -> Result<Relay> {
        let host = mesh.host(name).without_meshd().peers(PeerSet::None).up()?;
        let seed = seed_from_env()?;
        eprintln!(
            "mesh-tests: relay {name} between {} and {}: seed {seed} (MESH_RELAY_SEED={seed} replays it), {imp}",
            a.name(),
            b.name()
        );
        let ip = host.underlay_v4();
        let plan = Plan {
            face_a: SocketAddr::new(ip, FACE_A_PORT),
            a: a.endpoint(),
            face_b: SocketAddr::new(ip, FACE_B_PORT),
            b: b.endpoint(),
            control: SocketAddr::from(([127, 0, 0, 1], CONTROL_PORT)),
        };
        let tool = host.bins_testtool();
        let args = [
            "relay".to_string(),
            plan.face_a.to_string(),
            plan.a.to_string(),
            plan.face_b.to_string(),
            plan.b.to_string(),
            plan.control.to_string(),
            seed.to_string(),
            imp.to_string(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        host.spawn("relay", &tool, &args)?;
        host.wait_background_output("relay", "relay listening")?;
        a.peer_add_at(b, plan.face_b)?;
        b.peer_add_at(a, plan.face_a)?;
        Ok(Relay {
            host,
            seed,
            control: plan.control,
        })
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    pub fn host(&self) -> &Host {
        &self.host
    }

    /// Impairs from the next datagram on with `imp` (answered once in force).
    pub fn set(&self, imp: Impairment) -> Result<()> {
        let reply = self.control(&format!("set {imp}"))?;
        if !reply.starts_with("ok ") {
            bail!("relay set {imp}: {reply}");
        }
        Ok(())
    }

    /// Counters so far, both directions.
    pub fn stats(&self) -> Result<Stats> {
        let reply = self.control("stats")?;
        serde_json::from_str(&reply).with_context(|| format!("relay stats: {reply:?}"))
    }

    fn control(&self, command: &str) -> Result<String> {
        let tool = self.host.bins_testtool();
        let tool = tool.to_str().context("path is not UTF-8")?;
        let out = self
            .host
            .run(tool, &["relay-ctl", &self.control.to_string(), command])?;
        let reply = out.stdout_str().trim().to_string();
        if reply.is_empty() {
            return Err(anyhow!("relay {command:?}: no reply"));
        }
        Ok(reply)
    }
}

/// `mesh-testtool relay-ctl <control> <command...>`: sends one command, prints the
/// reply (tries 3 times, 1 s each).
pub fn control_client(control: SocketAddr, command: &str) -> Result<String> {
    let sock = UdpSocket::bind("127.0.0.1:0")?;
    sock.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut buf = vec![0u8; 65_536];
    for _ in 0..3 {
        sock.send_to(command.as_bytes(), control)?;
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            return Ok(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    bail!("no answer from the relay at {control}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(imp: Impairment, seed: u64, n: usize) -> Vec<Fate> {
        let mut i = Impairer::new(imp, seed, Direction::TowardB);
        (0..n).map(|_| i.fate(1400)).collect()
    }

    fn all() -> Impairment {
        Impairment {
            loss: 0.05,
            reorder: 0.25,
            duplicate: 0.02,
            corrupt: 0.01,
            delay: Duration::from_millis(1),
            jitter: Duration::from_millis(2),
            hold: Duration::from_millis(3),
        }
    }

    #[test]
    fn a_seed_replays_the_same_fates() {
        assert_eq!(run(all(), 42, 10_000), run(all(), 42, 10_000));
        assert_ne!(run(all(), 42, 10_000), run(all(), 43, 10_000));
        // The two directions draw from independent streams.
        let mut other = Impairer::new(all(), 42, Direction::TowardA);
        let toward_a: Vec<Fate> = (0..10_000).map(|_| other.fate(1400)).collect();
        assert_ne!(toward_a, run(all(), 42, 10_000));
    }

    #[test]
    fn every_datagram_draws_alike_so_fates_stay_aligned() {
        // The loss decision of datagram n does not depend on the other rates: the
        // same seed loses the same datagrams with and without the other faults.
        let lost = |imp: Impairment| -> Vec<usize> {
            run(imp, 7, 20_000)
                .iter()
                .enumerate()
                .filter(|(_, f)| f.copies == 0)
                .map(|(i, _)| i)
                .collect()
        };
        assert_eq!(lost(Impairment::loss(0.05)), lost(all()));
    }

    #[test]
    fn rates_come_out_as_asked() {
        let n = 200_000;
        let fates = run(all(), 1, n);
        let rate = |pred: &dyn Fn(&Fate) -> bool| {
            fates.iter().filter(|f| pred(f)).count() as f64 / n as f64
        };
        let near = |got: f64, want: f64| (got - want).abs() < want * 0.1;
        let lost = rate(&|f| f.copies == 0);
        assert!(near(lost, 0.05), "loss {lost}");
        // The others apply to the datagrams not lost.
        let kept = 1.0 - lost;
        let dup = rate(&|f| f.copies == 2);
        assert!(near(dup, 0.02 * kept), "duplicate {dup}");
        let corrupt = rate(&|f| f.corrupt.is_some());
        assert!(near(corrupt, 0.01 * kept), "corrupt {corrupt}");
        let reordered = rate(&|f| f.reordered);
        assert!(near(reordered, 0.25 * kept), "reorder {reordered}");
        for f in fates.iter().filter(|f| f.copies > 0) {
            let base = Duration::from_millis(1)
                + if f.reordered {
                    all().hold
                } else {
                    Duration::ZERO
                };
            assert!(f.delay >= base && f.delay < base + all().jitter, "{f:?}");
            if let Some((at, mask)) = f.corrupt {
                assert!(at < 1400 && mask != 0, "{f:?}");
            }
        }
        // Nothing asked, nothing done.
        assert!(run(Impairment::none(), 1, 10_000).iter().all(|f| *f
            == Fate {
                copies: 1,
                corrupt: None,
                reordered: false,
                delay: Duration::ZERO
            }));
    }

    #[test]
    fn corruption_reaches_every_byte_of_short_datagrams() {
        let mut i = Impairer::new(
            Impairment {
                corrupt: 1.0,
                ..Impairment::none()
            },
            3,
            Direction::TowardA,
        );
        let mut seen = [false; 4];
        for _ in 0..1000 {
            let (at, _) = i.fate(4).corrupt.expect("always corrupt");
            seen[at] = true;
        }
        assert_eq!(seen, [true; 4]);
        assert_eq!(
            i.fate(0).corrupt,
            None,
            "an empty datagram has no byte to change"
        );
    }

    #[test]
    fn held_datagrams_leave_after_later_ones() {
        let mut q = DelayQueue::new(3);
        let ms = Duration::from_millis;
        assert!(q.push(ms(5), b"held".to_vec()));
        assert!(q.push(ms(1), b"first".to_vec()));
        assert!(q.push(ms(1), b"second".to_vec()));
        assert!(!q.push(ms(1), b"over".to_vec()), "bounded");
        assert_eq!(q.next_due(), Some(ms(1)));
        assert_eq!(q.pop_due(ms(0)), None);
        assert_eq!(q.pop_due(ms(2)).as_deref(), Some(&b"first"[..]));
        assert_eq!(
            q.pop_due(ms(2)).as_deref(),
            Some(&b"second"[..]),
            "ties keep order"
        );
        assert_eq!(q.pop_due(ms(2)), None);
        assert_eq!(q.pop_due(ms(5)).as_deref(), Some(&b"held"[..]));
        assert!(q.is_empty());
    }

    #[test]
    fn impairment_text_round_trips_and_refuses_nonsense() {
        let text = all().to_string();
        assert_eq!(Impairment::parse(&text).unwrap(), all());
        assert_eq!(Impairment::parse("none").unwrap(), Impairment::none());
        assert_eq!(
            Impairment::parse("loss=0.005").unwrap(),
            Impairment::loss(0.005)
        );
        for bad in ["loss=2", "loss=x", "drop=0.1", "delay=-1ms", "loss"] {
            assert!(Impairment::parse(bad).is_err(), "{bad}");
        }
    }
}
