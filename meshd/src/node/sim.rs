//! The in-memory tier (STYLE.md point 8, tier ii): whole node cores of several hosts
//! wired together over a simulated underlay, with a simulated clock, so that scenarios
//! which need no kernel (handshakes, renewals, policy changes, layer-7 refusals,
//! restarts) run in plain `cargo test`, in milliseconds, and replay exactly.
//!
//! Shaped after smoltcp's `tests/netsim.rs` and nebula's `e2e/router`: each [`Host`]
//! holds what a meshd holds on its data path (its [`Node`] counters, its
//! [`PeerTable`], its [`Enforcer`] and decision log) and is driven the way
//! `datapath` drives a daemon: a packet its TUN gives goes through
//! [`node::from_tun`], a datagram its socket gives through [`node::from_udp`], what
//! the enforcer emits through [`peers::outbound`], timers through [`Enforcer::poll`]
//! and [`peers::tick`]. What a host writes to its TUN waits in [`Host::tun`] for the
//! test's workloads (a userspace TCP/IP stack in this crate's own tests).
//!
//! The [`Link`] carries datagrams between underlay addresses with seeded loss,
//! duplication, reordering and delay; the [`Clock`] moves only when the test moves it.
//! A run is fixed by its seed (`MESHD_SIM_SEED` replays one; [`seed`] prints it) up
//! to the order of events the code under test produces itself.
//!
//! One thing is not simulated: boringtun reads its own clock for the WireGuard
//! timers (handshake retransmission after REKEY_TIMEOUT, 5 s; rekeying; keepalives).
//! Its `mock-instant` feature would freeze that clock for every build that unifies
//! features with a test build, the real daemon's included, so it is not used. The
//! link therefore never loses handshake messages (recovering one needs that timer);
//! it duplicates, delays and reorders them like any datagram, and loses data
//! messages (type 4) at the configured rate.
//!
//! Built for this crate's tests and, with the `testing` feature, for other crates'.
//! Everything here panics on bad input: it is for tests only.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use mesh_proto::cert::{Certificate, LeafParams};
use mesh_proto::identity::SpiffeId;
use mesh_proto::key::PrivateKey;
use mesh_proto::policy::{self, CompiledPolicy, DefaultAction};
use mesh_proto::testing::TestCa;
use mesh_proto::time::UnixTime;

use crate::enforce::decisions::{DecisionLog, LogLimits};
use crate::enforce::{self, Emit, Enforcer, Toward};
use crate::node::{self, Inbound, Now, Outbound};
use crate::peers::{
    self, build_table, Local, Node, Peer, PeerEntry, PeerSpec, PeerTable, Source, INDEX_MASK,
    WG_OVERHEAD,
};

/// The environment variable that fixes a run's seed.
pub const SEED_VAR: &str = "MESHD_SIM_SEED";

/// WireGuard timers tick at this interval, as in `datapath`.
pub const TICK: Duration = Duration::from_millis(250);

/// Largest packet a host handles (a TUN read, a datagram).
const BUF_LEN: usize = 65_536 + WG_OVERHEAD;

/// The seed of a run: `MESHD_SIM_SEED` if set, else a fresh one. Printed (the test
/// harness shows it when the test fails) with the line that replays it.
pub fn seed(test: &str) -> u64 {
    let seed = match std::env::var(SEED_VAR) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|e| panic!("{SEED_VAR}={v:?} is not a u64: {e}")),
        Err(_) => rand_core::RngCore::next_u64(&mut rand_core::OsRng),
    };
    eprintln!("{test}: seed {seed} (replay: {SEED_VAR}={seed} cargo test -p meshd {test})");
    seed
}

/// A small deterministic generator (SplitMix64): the link's faults and the hosts'
/// session slots come from it.
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

    /// True with probability `per_mille` / 1000.
    pub fn chance(&mut self, per_mille: u32) -> bool {
        per_mille > 0 && self.next_u64() % 1000 < u64::from(per_mille)
    }

    /// A duration in `[0, max)`, in microseconds.
    pub fn below(&mut self, max: Duration) -> Duration {
        let us = max.as_micros() as u64;
        if us == 0 {
            return Duration::ZERO;
        }
        Duration::from_micros(self.next_u64() % us)
    }
}

/// The simulated time: a monotonic clock from zero, and the wall clock it implies.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    mono: Duration,
    wall_at_zero: UnixTime,
}

impl Clock {
    /// A clock at monotonic zero, wall time `wall`.
    pub fn new(wall: UnixTime) -> Clock {
        Clock {
            mono: Duration::ZERO,
            wall_at_zero: wall,
        }
    }

    pub fn now(&self) -> Now {
        Now {
            wall: self.wall_at_zero.saturating_add(self.mono.as_secs()),
            mono: self.mono,
        }
    }

    /// Moves the wall clock `secs` ahead of the monotonic one (as a long suspend, or
    /// weeks of uptime in one step): certificates expire, flows do not.
    pub fn jump_wall(&mut self, secs: u64) {
        self.wall_at_zero = self.wall_at_zero.saturating_add(secs);
    }

    /// Moves the clock to `mono`; it never goes back.
    pub fn set(&mut self, mono: Duration) {
        self.mono = self.mono.max(mono);
    }
}

/// What the link does to the datagrams it carries. Rates are per mille.
#[derive(Clone, Copy, Debug, Default)]
pub struct Faults {
    /// Data messages lost (never handshake messages: see the module docs).
    pub loss: u32,
    /// Datagrams sent twice (each copy then meets the other faults on its own).
    pub duplicate: u32,
    /// Datagrams held back by up to `reorder_by` more, so later ones overtake them.
    pub reorder: u32,
    pub reorder_by: Duration,
    /// One-way delay of every datagram.
    pub delay: Duration,
}

impl Faults {
    /// A clean link with a 1 ms one-way delay.
    pub fn none() -> Faults {
        Faults {
            delay: Duration::from_millis(1),
            ..Faults::default()
        }
    }

    /// 5% loss, 5% duplication, 20% reordering by up to 8 ms, 1 ms delay.
    pub fn lossy() -> Faults {
        Faults {
            loss: 50,
            duplicate: 50,
            reorder: 200,
            reorder_by: Duration::from_millis(8),
            delay: Duration::from_millis(1),
        }
    }
}

/// WireGuard message types (the first byte of a datagram; WireGuard paper, section 5.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    HandshakeInitiation,
    HandshakeResponse,
    CookieReply,
    Data,
    Other,
}

impl Kind {
    pub fn of(datagram: &[u8]) -> Kind {
        match datagram.first() {
            Some(1) => Kind::HandshakeInitiation,
            Some(2) => Kind::HandshakeResponse,
            Some(3) => Kind::CookieReply,
            Some(4) => Kind::Data,
            _ => Kind::Other,
        }
    }
}

/// A datagram on the link.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Datagram {
    pub from: SocketAddr,
    pub to: SocketAddr,
    pub data: Vec<u8>,
}

/// One datagram as it was sent (before any fault), for the test to look at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sent {
    pub at: Duration,
    pub from: SocketAddr,
    pub to: SocketAddr,
    pub kind: Kind,
    pub len: usize,
}

/// What the faults did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    pub sent: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub reordered: u64,
    pub delivered: u64,
}

/// The underlay: datagrams in flight, ordered by arrival time (then by sending order).
pub struct Link {
    faults: Faults,
    rng: Rng,
    queue: BinaryHeap<Reverse<(Duration, u64, Datagram)>>,
    order: u64,
    sent: Vec<Sent>,
    stats: LinkStats,
}

impl Link {
    pub fn new(faults: Faults, seed: u64) -> Link {
        Link {
            faults,
            rng: Rng::new(seed),
            queue: BinaryHeap::new(),
            order: 0,
            sent: Vec::new(),
            stats: LinkStats::default(),
        }
    }

    pub fn set_faults(&mut self, faults: Faults) {
        self.faults = faults;
    }

    /// Sends `data` from `from` to `to` at `now`.
    pub fn send(&mut self, now: Duration, from: SocketAddr, to: SocketAddr, data: &[u8]) {
        let kind = Kind::of(data);
        self.sent.push(Sent {
            at: now,
            from,
            to,
            kind,
            len: data.len(),
        });
        self.stats.sent += 1;
        let f = self.faults;
        let copies = if self.rng.chance(f.duplicate) {
            self.stats.duplicated += 1;
            2
        } else {
            1
        };
        for _ in 0..copies {
            if kind == Kind::Data && self.rng.chance(f.loss) {
                self.stats.lost += 1;
                continue;
            }
            let mut at = now + f.delay;
            if self.rng.chance(f.reorder) {
                self.stats.reordered += 1;
                at += self.rng.below(f.reorder_by);
            }
            self.order += 1;
            let d = Datagram {
                from,
                to,
                data: data.to_vec(),
            };
            self.queue.push(Reverse((at, self.order, d)));
        }
    }

    /// When the next datagram arrives.
    pub fn next_arrival(&self) -> Option<Duration> {
        self.queue.peek().map(|Reverse((at, _, _))| *at)
    }

    /// The next datagram that has arrived by `now`.
    pub fn arrived(&mut self, now: Duration) -> Option<Datagram> {
        if self.next_arrival()? > now {
            return None;
        }
        self.stats.delivered += 1;
        self.queue.pop().map(|Reverse((_, _, d))| d)
    }

    /// Every datagram sent so far, in sending order.
    pub fn sent(&self) -> &[Sent] {
        &self.sent
    }

    /// How many datagrams of `kind` were sent at or after `since`.
    pub fn count_since(&self, kind: Kind, since: Duration) -> usize {
        self.sent
            .iter()
            .filter(|s| s.kind == kind && s.at >= since)
            .count()
    }

    pub fn stats(&self) -> LinkStats {
        self.stats
    }
}

/// What a host is made of that survives a restart: its key, certificate and policy.
struct Member {
    name: String,
    key: PrivateKey,
    cert: Certificate,
    /// The policy applied last (its source and the default), none at first.
    policy: Option<(String, DefaultAction)>,
}

/// The data-path state of one host, as a meshd holds it, plus its TUN's queue.
pub struct Host {
    pub name: String,
    /// Its underlay address (the UDP socket).
    pub addr: SocketAddr,
    /// Its overlay address (its certificate's).
    pub overlay: Ipv4Addr,
    pub node: Node,
    pub table: PeerTable,
    pub enforce: Enforcer,
    pub log: Arc<DecisionLog>,
    /// Packets written to the TUN (for this host's workloads), oldest first.
    pub tun: VecDeque<Vec<u8>>,
    /// Why packets were dropped, with counts.
    drops: Vec<(node::Drop, u64)>,
    dst: Vec<u8>,
    aux: Vec<u8>,
    emit: Emit,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("name", &self.name)
            .field("addr", &self.addr)
            .field("drops", &self.drops)
            .finish_non_exhaustive()
    }
}

impl Host {
    fn new(
        name: &str,
        addr: SocketAddr,
        overlay: Ipv4Addr,
        local: Arc<Local>,
        table: PeerTable,
        policy: CompiledPolicy,
    ) -> Host {
        let log = Arc::new(DecisionLog::new(LogLimits::default()));
        let enforce = Enforcer::new(
            local.workload.clone(),
            policy,
            enforce::Limits::default(),
            log.clone(),
        );
        Host {
            name: name.to_string(),
            addr,
            overlay,
            node: Node::new(),
            table,
            enforce,
            log,
            tun: VecDeque::new(),
            drops: Vec::new(),
            dst: vec![0u8; BUF_LEN],
            aux: vec![0u8; BUF_LEN],
            emit: Emit::default(),
        }
    }

    /// A packet a workload of this host wrote to the TUN.
    pub fn from_tun(&mut self, packet: &[u8], now: Now, link: &mut Link) {
        let out = node::from_tun(
            &self.node,
            &self.table,
            &self.enforce,
            packet,
            &mut self.dst,
            now,
            &mut self.emit,
        );
        match out {
            Outbound::Send { to, data } => link.send(now.mono, self.addr, to, data),
            Outbound::Deliver(p) => self.tun.push_back(p.to_vec()),
            Outbound::Queued | Outbound::Done => {}
            Outbound::Drop(r) => count(&mut self.drops, r),
        }
        self.send_emitted(now, link);
    }

    /// A datagram the UDP socket received from `from`.
    pub fn from_udp(&mut self, from: SocketAddr, datagram: &[u8], now: Now, link: &mut Link) {
        let inbound = node::from_udp(
            &self.node,
            &self.table,
            &self.enforce,
            from,
            datagram,
            &mut self.dst,
            now,
            &mut self.emit,
        );
        match inbound {
            Inbound::Deliver(p) => self.tun.push_back(p.to_vec()),
            Inbound::Send { to, data, flush } => {
                link.send(now.mono, self.addr, to, data);
                if let Some(peer) = flush {
                    while let Some(t) = peers::flush(&peer, &mut self.aux) {
                        link.send(now.mono, self.addr, t.to, t.data);
                    }
                }
            }
            Inbound::Done => {}
            again @ (Inbound::Rehandshake(_) | Inbound::RehandshakeAt(_)) => {
                let addr = self.addr;
                node::rehandshake(&self.table, &again, &mut self.aux, |t| {
                    link.send(now.mono, addr, t.to, t.data)
                });
            }
            Inbound::Drop(r) => count(&mut self.drops, r),
        }
        self.send_emitted(now, link);
    }

    /// The timer thread's round: the enforcer's timeouts, the WireGuard timers, the
    /// handshake rate limiters' reset.
    pub fn tick(&mut self, now: Now, link: &mut Link) {
        self.table.reset_rate_limiters();
        self.enforce.poll(now.mono, now.wall, &mut self.emit);
        self.send_emitted(now, link);
        for peer in self.table.peers() {
            if let Some(t) = peers::tick(&self.node, peer, &mut self.aux, now.wall) {
                link.send(now.mono, self.addr, t.to, t.data);
            }
        }
    }

    /// Swaps in a policy and resets both ends of the flows it cuts (what
    /// `meshctl policy apply` makes the daemon do); returns how many it cut.
    pub fn set_policy(&mut self, policy: CompiledPolicy, now: Now, link: &mut Link) -> usize {
        let cuts = self.enforce.set_policy(policy, now.mono, now.wall);
        self.cut(&cuts, now, link);
        cuts.len()
    }

    /// After the table changed: re-decides flows whose identities left or changed
    /// groups and resets those cut (the daemon's `refresh_flows`); returns how many.
    pub fn refresh_flows(&mut self, now: Now, link: &mut Link) -> usize {
        let mut groups: HashMap<&str, Arc<[String]>> = HashMap::new();
        for p in self.table.peers() {
            groups.insert(&p.sender.identity, p.sender.groups.clone());
        }
        for l in self.table.locals() {
            if let Some(id) = &l.workload.identity {
                groups.insert(id, l.workload.groups.clone());
            }
        }
        let cuts =
            self.enforce
                .refresh_identities(|id| groups.get(id).cloned(), now.mono, now.wall);
        drop(groups);
        self.cut(&cuts, now, link);
        cuts.len()
    }

    fn cut(&mut self, cuts: &[enforce::Cut], now: Now, link: &mut Link) {
        for c in cuts {
            c.resets(&mut self.emit);
        }
        self.send_emitted(now, link);
    }

    /// Sends what the enforcer emitted: to local workloads through the TUN, to peers
    /// through their sessions, without policy (`datapath::send_to_peer`).
    fn send_emitted(&mut self, now: Now, link: &mut Link) {
        for (toward, p) in self.emit.packets() {
            let out = match toward {
                Toward::Local => peers::Outbound::Deliver(p),
                Toward::Peer => {
                    peers::outbound(&self.node, &self.table, p, &mut self.aux, now.wall)
                }
            };
            match out {
                peers::Outbound::Send { to, data } => link.send(now.mono, self.addr, to, data),
                peers::Outbound::Deliver(p) => self.tun.push_back(p.to_vec()),
                peers::Outbound::Queued => {}
                peers::Outbound::Drop(r) => count(&mut self.drops, node::Drop::Peer(r)),
            }
        }
        self.emit.clear();
    }

    /// How many packets were dropped for `reason`.
    pub fn drops(&self, reason: node::Drop) -> u64 {
        self.drops
            .iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |(_, n)| *n)
    }

    /// Every drop reason seen, with counts.
    pub fn all_drops(&self) -> &[(node::Drop, u64)] {
        &self.drops
    }

    /// The session with the host whose identity is `spiffe://t/<name>`.
    pub fn peer(&self, name: &str) -> &Arc<Peer> {
        let id = identity(name);
        self.table
            .by_identity(&id)
            .unwrap_or_else(|| panic!("{}: no peer {id}", self.name))
    }

    /// The decision log's lines, oldest first.
    pub fn decisions(&self) -> Vec<Arc<str>> {
        self.log.tail(usize::MAX)
    }
}

fn count(drops: &mut Vec<(node::Drop, u64)>, reason: node::Drop) {
    match drops.iter_mut().find(|(r, _)| *r == reason) {
        Some((_, n)) => *n += 1,
        None => drops.push((reason, 1)),
    }
}

/// `spiffe://t/<name>`.
pub fn identity(name: &str) -> SpiffeId {
    SpiffeId::parse(&format!("spiffe://t/{name}")).expect("test identity")
}

/// What a verified certificate says, as the daemon reads it.
fn spec_of(cert: &Certificate) -> PeerSpec {
    PeerSpec {
        identity: cert.identity().clone(),
        public_key: *cert.public_key(),
        addresses: cert.addresses().to_vec(),
        groups: cert.groups().to_vec(),
        not_before: cert.not_before(),
        not_after: cert.not_after(),
    }
}

/// Compiles a policy file, which must pass its own `[[test]]` cases.
pub fn compile(source: &str, default: DefaultAction) -> CompiledPolicy {
    let loaded = policy::load("sim.toml", source, default).expect("test policy");
    assert!(
        loaded.tests_passed(),
        "{}",
        loaded.failure_summary().unwrap_or_default()
    );
    loaded.compiled
}

/// Hosts `a`, `b`, ... on one link: host `i` has underlay address
/// `198.18.0.<i+1>:51820`, overlay address `100.64.0.<i+1>` and identity
/// `spiffe://t/<name>`; every host knows every other one's certificate and endpoint.
pub struct Mesh {
    pub clock: Clock,
    pub link: Link,
    pub hosts: Vec<Host>,
    pub seed: u64,
    members: Vec<Member>,
    ca: TestCa,
    rng: Rng,
    next_tick: Duration,
}

impl Mesh {
    /// Hosts named `names` (each with the groups given), no policy (allow, as a
    /// meshd without `[policy]`), on a link with `faults`.
    pub fn new(seed: u64, faults: Faults, hosts: &[(&str, &[&str])]) -> Mesh {
        let ca = TestCa::new("t");
        let mut rng = Rng::new(seed);
        let link = Link::new(faults, rng.next_u64());
        let members = hosts
            .iter()
            .enumerate()
            .map(|(i, (name, groups))| {
                let key = PrivateKey::generate();
                let cert = issue(&ca, name, &[overlay(i)], groups, &key);
                Member {
                    name: name.to_string(),
                    key,
                    cert,
                    policy: None,
                }
            })
            .collect();
        let mut mesh = Mesh {
            clock: Clock::new(ca.now()),
            link,
            hosts: Vec::new(),
            seed,
            members,
            ca,
            rng,
            next_tick: TICK,
        };
        mesh.hosts = (0..hosts.len()).map(|i| mesh.boot(i)).collect();
        mesh
    }

    /// The host named `name`'s index.
    pub fn index(&self, name: &str) -> usize {
        self.hosts
            .iter()
            .position(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name}"))
    }

    pub fn host(&self, name: &str) -> &Host {
        &self.hosts[self.index(name)]
    }

    pub fn now(&self) -> Now {
        self.clock.now()
    }

    /// Host `i`'s data-path state as a freshly started meshd has it: new counters,
    /// an empty flow table, sessions numbered from a random slot, every peer at its
    /// configured endpoint.
    fn boot(&mut self, i: usize) -> Host {
        let m = &self.members[i];
        let now = self.clock.now();
        let verified = self.ca.ca().verify(&m.cert, now.wall).expect("own cert");
        let local = Arc::new(Local::new(spec_of(&verified), *m.key.as_bytes()));
        let mut slot = (self.rng.next_u64() as u32) & INDEX_MASK;
        let mut peers = Vec::new();
        for (j, other) in self.members.iter().enumerate() {
            if j == i {
                continue;
            }
            let verified = self
                .ca
                .ca()
                .verify(&other.cert, now.wall)
                .expect("peer cert");
            slot = next_slot(slot);
            peers.push(Arc::new(Peer::new(
                &local,
                spec_of(&verified),
                slot,
                Some(underlay(j)),
            )));
        }
        let table = PeerTable::with_locals(vec![local.clone()], peers).expect("table");
        let policy = match &m.policy {
            Some((source, default)) => compile(source, *default),
            None => CompiledPolicy::empty(DefaultAction::Allow),
        };
        Host::new(&m.name, underlay(i), overlay_addr(i), local, table, policy)
    }

    /// A packet host `h`'s workloads wrote to its TUN.
    pub fn from_tun(&mut self, h: usize, packet: &[u8]) {
        let now = self.clock.now();
        self.hosts[h].from_tun(packet, now, &mut self.link);
    }

    /// Hands every datagram that has arrived by now to its host; returns how many.
    pub fn deliver(&mut self) -> usize {
        let now = self.clock.now();
        let mut n = 0;
        while let Some(d) = self.link.arrived(now.mono) {
            n += 1;
            // A datagram to an address no host has is lost, as on a real underlay.
            if let Some(h) = self.hosts.iter_mut().find(|h| h.addr == d.to) {
                h.from_udp(d.from, &d.data, now, &mut self.link);
            }
        }
        n
    }

    /// When the link or the timers next need the mesh.
    pub fn next_event(&self) -> Duration {
        self.link
            .next_arrival()
            .map_or(self.next_tick, |t| t.min(self.next_tick))
    }

    /// Moves the clock to `t`, running every timer round on the way.
    pub fn advance_to(&mut self, t: Duration) {
        while self.next_tick <= t {
            self.clock.set(self.next_tick);
            let now = self.clock.now();
            for h in &mut self.hosts {
                h.tick(now, &mut self.link);
            }
            self.next_tick += TICK;
        }
        self.clock.set(t);
    }

    /// Applies `source` on host `h` (under `default`); returns how many flows it cut.
    /// A restart keeps it, as the daemon keeps an applied policy in its state
    /// directory.
    pub fn apply_policy(&mut self, h: usize, source: &str, default: DefaultAction) -> usize {
        let policy = compile(source, default);
        self.members[h].policy = Some((source.to_string(), default));
        let now = self.clock.now();
        self.hosts[h].set_policy(policy, now, &mut self.link)
    }

    /// Renews host `h`'s certificate for the same key, with `groups` and a validity
    /// that starts now, and gives it to every host (its own file watch, the others'
    /// `peer add`). Each table is rebuilt by the daemon's own [`build_table`]: a
    /// session whose two keys are unchanged carries on in its slot; then every host
    /// re-decides its flows (`refresh_flows`). Returns the flows cut, per host.
    pub fn renew(&mut self, h: usize, groups: &[&str]) -> Vec<usize> {
        let now = self.clock.now();
        let m = &self.members[h];
        let addrs: Vec<String> = m.cert.addresses().iter().map(|a| a.to_string()).collect();
        let addrs: Vec<&str> = addrs.iter().map(String::as_str).collect();
        let cert = issue_at(&self.ca, &m.name, &addrs, groups, &m.key, now.wall);
        self.ca.ca().verify(&cert, now.wall).expect("renewed cert");
        self.members[h].cert = cert;
        for i in 0..self.hosts.len() {
            let old = &self.hosts[i].table;
            let local = if i == h {
                let m = &self.members[h];
                Arc::new(Local::new(spec_of(&m.cert), *m.key.as_bytes()))
            } else {
                old.locals()[0].clone()
            };
            let entries: Vec<PeerEntry> = (0..self.members.len())
                .filter(|&j| j != i)
                .map(|j| PeerEntry {
                    cert: self.members[j].cert.clone(),
                    spec: spec_of(&self.members[j].cert),
                    endpoint: Some(underlay(j)),
                    source: Source::Config,
                })
                .collect();
            let hint = self.rng.next_u64() as u32;
            let table = build_table(&[local], &entries, old, hint).expect("renewed table");
            self.hosts[i].table = table;
        }
        self.hosts
            .iter_mut()
            .map(|host| host.refresh_flows(now, &mut self.link))
            .collect()
    }

    /// Restarts host `h`'s meshd: its data-path state starts afresh (counters, flow
    /// table, sessions in other slots) with the same key, certificate and policy; its
    /// TUN keeps what is queued for the workloads, whose sockets outlive a meshd.
    pub fn restart(&mut self, h: usize) {
        let tun = std::mem::take(&mut self.hosts[h].tun);
        self.hosts[h] = self.boot(h);
        self.hosts[h].tun = tun;
    }
}

fn next_slot(slot: u32) -> u32 {
    match (slot + 1) & INDEX_MASK {
        0 => 1,
        s => s,
    }
}

/// Host `i`'s underlay address.
pub fn underlay(i: usize) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, 0, i as u8 + 1)), 51820)
}

/// Host `i`'s overlay address.
pub fn overlay_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(100, 64, 0, i as u8 + 1)
}

fn overlay(i: usize) -> String {
    format!("{}/32", overlay_addr(i))
}

fn issue(
    ca: &TestCa,
    name: &str,
    addrs: &[String],
    groups: &[&str],
    key: &PrivateKey,
) -> Certificate {
    let addrs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    issue_at(ca, name, &addrs, groups, key, ca.now().saturating_sub(3600))
}

fn issue_at(
    ca: &TestCa,
    name: &str,
    addrs: &[&str],
    groups: &[&str],
    key: &PrivateKey,
    issued: UnixTime,
) -> Certificate {
    let params = LeafParams {
        identity: identity(name),
        addresses: addrs.iter().map(|a| mesh_proto::testing::net(a)).collect(),
        groups: groups.iter().map(|g| g.to_string()).collect(),
        public_key: key.public_key(),
        validity_secs: 30 * 86_400,
    };
    ca.signer().issue(params, issued).expect("test leaf")
}

#[cfg(test)]
mod stack;
#[cfg(test)]
mod tests;

#[cfg(test)]
mod link_tests {
    use super::*;

    fn data(n: u8) -> Vec<u8> {
        vec![4, n]
    }

    /// The faults happen at their rates, the same ones for the same seed; handshake
    /// messages are never lost; arrivals come in time order.
    #[test]
    fn faults_follow_the_seed_and_spare_handshakes() {
        let (a, b) = (underlay(0), underlay(1));
        let faults = Faults {
            loss: 200,
            duplicate: 100,
            reorder: 300,
            reorder_by: Duration::from_millis(10),
            delay: Duration::from_millis(1),
        };
        let run = |seed| {
            let mut link = Link::new(faults, seed);
            for i in 0..2000u32 {
                let at = Duration::from_micros(u64::from(i) * 100);
                link.send(at, a, b, &data(i as u8));
                link.send(at, a, b, &[1, 0, 0, 0]);
            }
            let mut got = Vec::new();
            let mut last = Duration::ZERO;
            while let Some(t) = link.next_arrival() {
                assert!(t >= last);
                last = t;
                got.push(link.arrived(t).unwrap().data);
            }
            (link.stats(), got)
        };
        let (stats, got) = run(7);
        assert_eq!(run(7), (stats, got.clone()));
        assert_ne!(run(8).1, got);
        assert_eq!(stats.sent, 4000);
        // 20% of 2000 data messages (and of their duplicates), none of the others.
        assert!((330..=550).contains(&stats.lost), "{stats:?}");
        assert!((300..=500).contains(&stats.duplicated), "{stats:?}");
        let initiations = got.iter().filter(|d| d[0] == 1).count() as u64;
        assert!(initiations >= 2000, "{initiations}");
        assert_eq!(stats.delivered, stats.sent + stats.duplicated - stats.lost);
        assert_eq!(got.len() as u64, stats.delivered);
    }
}
