//! The workloads of the in-memory tier: a real userspace TCP/IP stack (smoltcp) per
//! host, whose device is that host's TUN, and the loop that runs stacks and mesh
//! together on the simulated clock.

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::time::Duration;

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpProtocol, Ipv4Packet, TcpPacket};

use super::Mesh;

/// The overlay MTU meshd sets on its TUN by default.
const MTU: usize = 1420;

/// Rounds of the whole world at one instant before it counts as a livelock.
const MAX_ROUNDS: usize = 100_000;

/// A TUN as a smoltcp device: what the node writes comes in through `rx`, what the
/// stack sends goes out through `tx`.
#[derive(Default)]
struct Tun {
    rx: VecDeque<Vec<u8>>,
    tx: Vec<Vec<u8>>,
}

struct RxToken(Vec<u8>);
struct TxToken<'a>(&'a mut Vec<Vec<u8>>);

impl phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0u8; len];
        let r = f(&mut buf);
        self.0.push(buf);
        r
    }
}

impl Device for Tun {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _: Instant) -> Option<(RxToken, TxToken<'_>)> {
        let p = self.rx.pop_front()?;
        Some((RxToken(p), TxToken(&mut self.tx)))
    }

    fn transmit(&mut self, _: Instant) -> Option<TxToken<'_>> {
        Some(TxToken(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        // Checksums are computed and verified (the default): meshd's own packets
        // (resets, injected responses) must carry valid ones to be taken.
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = MTU;
        caps
    }
}

/// One host's workloads: an interface with the host's overlay address.
struct Stack {
    iface: Interface,
    sockets: SocketSet<'static>,
    tun: Tun,
}

fn instant(t: Duration) -> Instant {
    Instant::from_micros(t.as_micros() as i64)
}

impl Stack {
    fn new(addr: Ipv4Addr, seed: u64, now: Duration) -> Stack {
        let mut tun = Tun::default();
        let mut config = Config::new(HardwareAddress::Ip);
        config.random_seed = seed;
        let mut iface = Interface::new(config, &mut tun, instant(now));
        iface.update_ip_addrs(|a| {
            // The whole overlay on link: every packet goes to the TUN.
            a.push(IpCidr::new(IpAddress::Ipv4(addr), 10))
                .expect("one address");
        });
        Stack {
            iface,
            sockets: SocketSet::new(Vec::new()),
            tun,
        }
    }
}

/// A TCP segment seen on a TUN (written by the node for a workload, or sent by one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub at: Duration,
    /// The host whose TUN it crossed.
    pub host: usize,
    pub src: (Ipv4Addr, u16),
    pub dst: (Ipv4Addr, u16),
    pub rst: bool,
    pub syn: bool,
    pub payload: usize,
}

impl Seen {
    fn parse(at: Duration, host: usize, packet: &[u8]) -> Option<Seen> {
        let ip = Ipv4Packet::new_checked(packet).ok()?;
        if ip.next_header() != IpProtocol::Tcp {
            return None;
        }
        let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
        Some(Seen {
            at,
            host,
            src: (ip.src_addr(), tcp.src_port()),
            dst: (ip.dst_addr(), tcp.dst_port()),
            rst: tcp.rst(),
            syn: tcp.syn(),
            payload: tcp.payload().len(),
        })
    }

    /// Whether it belongs to the connection between `a` and `b` (either way).
    pub fn between(&self, a: (Ipv4Addr, u16), b: (Ipv4Addr, u16)) -> bool {
        (self.src == a && self.dst == b) || (self.src == b && self.dst == a)
    }
}

/// A TCP connection's end: the host it lives on and its socket.
#[derive(Clone, Copy, Debug)]
pub struct End {
    pub host: usize,
    pub socket: SocketHandle,
}

/// The mesh and every host's workloads, on one simulated clock.
pub struct World {
    pub mesh: Mesh,
    stacks: Vec<Stack>,
    /// Every TCP segment delivered to a workload (written by a node to its TUN).
    pub delivered: Vec<Seen>,
    next_port: u16,
}

impl World {
    pub fn new(mesh: Mesh) -> World {
        let now = mesh.now().mono;
        let stacks = mesh
            .hosts
            .iter()
            .enumerate()
            .map(|(i, h)| Stack::new(h.overlay, mesh.seed ^ (i as u64 + 1), now))
            .collect();
        World {
            mesh,
            stacks,
            delivered: Vec::new(),
            next_port: 40_000,
        }
    }

    pub fn now(&self) -> Duration {
        self.mesh.now().mono
    }

    fn add_socket(&mut self, h: usize) -> SocketHandle {
        let buf = || tcp::SocketBuffer::new(vec![0u8; 64 * 1024]);
        self.stacks[h].sockets.add(tcp::Socket::new(buf(), buf()))
    }

    /// A TCP socket on host `h` listening on `port`.
    pub fn listen(&mut self, h: usize, port: u16) -> End {
        let socket = self.add_socket(h);
        self.stacks[h]
            .sockets
            .get_mut::<tcp::Socket>(socket)
            .listen(port)
            .expect("listen");
        End { host: h, socket }
    }

    /// A TCP connection from host `h` to `port` on host `to`'s overlay address.
    pub fn connect(&mut self, h: usize, to: usize, port: u16) -> End {
        let socket = self.add_socket(h);
        self.next_port += 1;
        let local = self.next_port;
        let dst = self.mesh.hosts[to].overlay;
        let stack = &mut self.stacks[h];
        stack
            .sockets
            .get_mut::<tcp::Socket>(socket)
            .connect(stack.iface.context(), (IpAddress::Ipv4(dst), port), local)
            .expect("connect");
        End { host: h, socket }
    }

    pub fn tcp(&mut self, end: End) -> &mut tcp::Socket<'static> {
        self.stacks[end.host]
            .sockets
            .get_mut::<tcp::Socket>(end.socket)
    }

    /// The two endpoints of `end`'s connection, as (address, port) pairs.
    pub fn endpoints(&mut self, end: End) -> ((Ipv4Addr, u16), (Ipv4Addr, u16)) {
        let s = self.tcp(end);
        let v4 = |e: Option<smoltcp::wire::IpEndpoint>| match e {
            Some(smoltcp::wire::IpEndpoint {
                addr: IpAddress::Ipv4(a),
                port,
            }) => (a, port),
            e => panic!("not an IPv4 connection: {e:?}"),
        };
        (v4(s.local_endpoint()), v4(s.remote_endpoint()))
    }

    /// One round at this instant: TUN queues into the stacks, stacks polled, their
    /// packets into the nodes, arrived datagrams into the nodes. Whether anything
    /// moved.
    fn round(&mut self) -> bool {
        let now = self.now();
        let mut moved = false;
        for h in 0..self.stacks.len() {
            let queued = std::mem::take(&mut self.mesh.hosts[h].tun);
            for p in queued {
                if let Some(s) = Seen::parse(now, h, &p) {
                    self.delivered.push(s);
                }
                self.stacks[h].tun.rx.push_back(p);
                moved = true;
            }
            let stack = &mut self.stacks[h];
            stack
                .iface
                .poll(instant(now), &mut stack.tun, &mut stack.sockets);
            for p in std::mem::take(&mut stack.tun.tx) {
                self.mesh.from_tun(h, &p);
                moved = true;
            }
        }
        moved |= self.mesh.deliver() > 0;
        moved
    }

    /// Rounds until nothing moves at this instant; whether anything did.
    fn settle(&mut self) -> bool {
        for i in 0..MAX_ROUNDS {
            if !self.round() {
                return i > 0;
            }
        }
        panic!(
            "still busy after {MAX_ROUNDS} rounds at {:?} (seed {})",
            self.now(),
            self.mesh.seed
        );
    }

    /// The next instant anything is due: a datagram's arrival, a node's timer, a
    /// stack's timer.
    fn next_event(&mut self) -> Duration {
        let now = self.now();
        let mut next = self.mesh.next_event();
        for s in &mut self.stacks {
            if let Some(at) = s.iface.poll_at(instant(now), &s.sockets) {
                let at = Duration::from_micros(at.total_micros().max(0) as u64);
                next = next.min(at);
            }
        }
        // A stack that asks to be polled "now" again after a poll is waiting (e.g. on
        // a closed window): time must move for it too.
        next.max(now + Duration::from_micros(100))
    }

    /// Runs until `done` (which may also read and write sockets) says so, for at
    /// most `limit` of simulated time; panics with the seed after that.
    pub fn run_until(
        &mut self,
        what: &str,
        limit: Duration,
        mut done: impl FnMut(&mut World) -> bool,
    ) {
        let deadline = self.now() + limit;
        loop {
            self.settle();
            if done(self) {
                return;
            }
            // What `done` wrote goes out before time moves.
            if self.settle() {
                continue;
            }
            let next = self.next_event();
            if next > deadline {
                panic!(
                    "{what}: not done after {limit:?} of simulated time (seed {}; link {:?}; drops {:?})",
                    self.mesh.seed,
                    self.mesh.link.stats(),
                    self.mesh.hosts.iter().map(|h| (&h.name, h.all_drops())).collect::<Vec<_>>(),
                );
            }
            self.mesh.advance_to(next);
        }
    }

    /// Runs for `span` of simulated time.
    pub fn run_for(&mut self, span: Duration) {
        let end = self.now() + span;
        loop {
            self.settle();
            let next = self.next_event();
            if next > end {
                self.mesh.advance_to(end);
                self.settle();
                return;
            }
            self.mesh.advance_to(next);
        }
    }
}
