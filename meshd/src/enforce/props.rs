//! Property tests of the enforcer (issue 18, "Must show"): whatever an identity that
//! policy grants nothing sends — any flags, sequence numbers, RSTs, ICMP errors, with
//! time jumps and restarts, interleaved with the local server's own packets that are
//! not an opening towards it — not a byte of it reaches a local workload; and a flow
//! cut by a policy change delivers nothing in either direction afterwards.
//!
//! The same two scenarios run in the fuzz target `fuzz/fuzz_targets/enforcer.rs`.

use std::sync::Arc;
use std::time::Duration;

use etherparse::PacketBuilder;
use mesh_proto::policy::{self, CompiledPolicy, DefaultAction};
use mesh_proto::time::UnixTime;
use proptest::prelude::*;

use super::*;

const X: &str = "spiffe://t/x";
const A: &str = "spiffe://t/a";
/// X's own address, and A's (which X may hold too: certificates with overlapping
/// prefixes; the flow's far end must still be told apart by identity).
const X_ADDR: [u8; 4] = [100, 64, 0, 9];
const A_ADDR: [u8; 4] = [100, 64, 0, 1];
const LOCAL: [u8; 4] = [100, 64, 0, 3];
const WALL: UnixTime = UnixTime(1_795_673_877);
/// Marks every payload X sends: it must never reach the local workload.
const MARK: &[u8] = b"XMARK";

/// A may GET `/api/*` on 80 (inspected) and use 8080 (TCP and UDP) and UDP 7000; X
/// nothing anywhere.
const A_ONLY: &str = r#"
[[policy]]
name = "a"
action = "allow"
[[policy.rule]]
from = [{ identities = ["spiffe://t/a"] }]
to = [{ ports = [80], methods = ["GET"], paths = ["/api/*"] }]
[[policy.rule]]
from = [{ identities = ["spiffe://t/a"] }]
to = [{ ports = [8080, 7000] }]
"#;

/// The same rights for X as for A: what X had before the cut.
const A_AND_X: &str = r#"
[[policy]]
name = "a"
action = "allow"
[[policy.rule]]
from = [{ identities = ["spiffe://t/a", "spiffe://t/x"] }]
to = [{ ports = [80], methods = ["GET"], paths = ["/api/*"] }]
[[policy.rule]]
from = [{ identities = ["spiffe://t/a", "spiffe://t/x"] }]
to = [{ ports = [8080, 7000] }]
"#;

fn compiled(src: &str) -> CompiledPolicy {
    let parsed = policy::parse("props.toml", src).expect("property policy parses");
    CompiledPolicy::compile(parsed.set, DefaultAction::Deny)
}

fn enforcer(src: &str) -> Enforcer {
    Enforcer::new(
        LocalWorkload {
            identity: Some("spiffe://t/c".into()),
            groups: Arc::from(Vec::new()),
        },
        compiled(src),
        Limits {
            flows: 256,
            ..Limits::default()
        },
        Arc::new(DecisionLog::new(Default::default())),
    )
}

fn sender(id: &str) -> Sender {
    Sender {
        identity: id.into(),
        groups: Arc::from(Vec::new()),
    }
}

/// A TCP segment; `flags` uses the wire bits (FIN 1, SYN 2, RST 4, PSH 8, ACK 16,
/// URG 32).
#[allow(clippy::too_many_arguments)] // one field each of the segment
fn tcp(
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    flags: u8,
    seq: u32,
    ack: u32,
    payload: &[u8],
) -> Vec<u8> {
    let mut b = PacketBuilder::ipv4(src, dst, 64).tcp(sport, dport, seq, 64_000);
    if flags & 0x01 != 0 {
        b = b.fin();
    }
    if flags & 0x02 != 0 {
        b = b.syn();
    }
    if flags & 0x04 != 0 {
        b = b.rst();
    }
    if flags & 0x08 != 0 {
        b = b.psh();
    }
    if flags & 0x10 != 0 {
        b = b.ack(ack);
    }
    if flags & 0x20 != 0 {
        b = b.urg(0);
    }
    let mut out = Vec::new();
    b.write(&mut out, payload).expect("test segment builds");
    out
}

fn udp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ipv4(src, dst, 64)
        .udp(sport, dport)
        .write(&mut out, payload)
        .expect("test datagram builds");
    out
}

/// An ICMP error from `src` to the local workload quoting `quoted`.
fn icmp_error(src: [u8; 4], frag_needed: bool, quoted: &[u8]) -> Vec<u8> {
    use etherparse::icmpv4::DestUnreachableHeader;
    let ty = if frag_needed {
        DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 552 }
    } else {
        DestUnreachableHeader::Port
    };
    let mut out = Vec::new();
    PacketBuilder::ipv4(src, LOCAL, 64)
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(ty))
        .write(&mut out, &quoted[..quoted.len().min(28)])
        .expect("test ICMP error builds");
    out
}

/// One step of a scenario.
#[derive(Clone, Debug)]
enum Op {
    /// A TCP segment from X (from its own address or A's).
    TcpFromX {
        a_addr: bool,
        sport: u16,
        dport: u16,
        flags: u8,
        seq: u32,
        ack: u32,
        payload: Vec<u8>,
    },
    UdpFromX {
        a_addr: bool,
        sport: u16,
        dport: u16,
    },
    /// An ICMP error from X about a TCP or UDP packet from here to `to_a` (A's address
    /// or X's).
    IcmpFromX {
        a_addr: bool,
        to_a: bool,
        tcp: bool,
        lport: u16,
        rport: u16,
        seq: u32,
    },
    /// A TCP segment from A (A's own connections, which X may try to write into).
    TcpFromA {
        sport: u16,
        dport: u16,
        flags: u8,
        seq: u32,
        ack: u32,
        get: bool,
    },
    /// The local server's TCP segment to X's address (never an opening) or to A's
    /// (anything).
    LocalTcp {
        to_a: bool,
        lport: u16,
        rport: u16,
        flags: u8,
        seq: u32,
        ack: u32,
        payload: bool,
    },
    /// The local workload's datagram to A (an opening towards A, not X).
    LocalUdpToA { lport: u16, rport: u16 },
    /// The local server's datagram back on the flow X had on UDP 7000 (cut scenario).
    LocalUdpOnCut,
    /// Time passes; the shell polls.
    Wait(u64),
    /// meshd restarts: a fresh enforcer, nothing tracked.
    Restart,
}

fn port() -> impl Strategy<Value = u16> {
    prop_oneof![Just(80u16), Just(8080), Just(7000), Just(9000)]
}

fn peer_port() -> impl Strategy<Value = u16> {
    prop_oneof![Just(40000u16), Just(40001)]
}

/// Sequence numbers near the ones the scenarios use, or anything.
fn seq() -> impl Strategy<Value = u32> {
    prop_oneof![
        (995u32..1_010),
        (4_995u32..5_010),
        (0u32..40).prop_map(|d| 1_000 + 37 * d),
        any::<u32>(),
    ]
}

fn x_payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(Vec::new()),
        Just(b"GET /api/x HTTP/1.1\r\nHost: c\r\nX-Mark: XMARK\r\n\r\n".to_vec()),
        Just(b"GET /admin HTTP/1.1\r\nHost: c\r\nX-Mark: XMARK\r\n\r\n".to_vec()),
        proptest::collection::vec(any::<u8>(), 0..24).prop_map(|mut v| {
            v.extend_from_slice(MARK);
            v
        }),
    ]
}

fn op(cut_scenario: bool) -> impl Strategy<Value = Op> {
    let local_udp_on_cut = if cut_scenario { 2u32 } else { 0 };
    prop_oneof![
        6 => (any::<bool>(), peer_port(), port(), any::<u8>(), seq(), seq(), x_payload()).prop_map(
            |(a_addr, sport, dport, flags, seq, ack, payload)| Op::TcpFromX {
                a_addr, sport, dport, flags: flags & 0x3f, seq, ack, payload,
            }
        ),
        1 => (any::<bool>(), peer_port(), port())
            .prop_map(|(a_addr, sport, dport)| Op::UdpFromX { a_addr, sport, dport }),
        2 => (any::<bool>(), any::<bool>(), any::<bool>(), port(), peer_port(), seq()).prop_map(
            |(a_addr, to_a, tcp, lport, rport, seq)| Op::IcmpFromX {
                a_addr, to_a, tcp, lport, rport, seq,
            }
        ),
        2 => (peer_port(), port(), any::<u8>(), seq(), seq(), any::<bool>()).prop_map(
            |(sport, dport, flags, seq, ack, get)| Op::TcpFromA {
                sport, dport, flags: flags & 0x1f, seq, ack, get,
            }
        ),
        4 => (any::<bool>(), port(), peer_port(), any::<u8>(), seq(), seq(), any::<bool>()).prop_map(
            |(to_a, lport, rport, flags, seq, ack, payload)| Op::LocalTcp {
                to_a, lport, rport, flags: flags & 0x1f, seq, ack, payload,
            }
        ),
        1 => (port(), peer_port()).prop_map(|(lport, rport)| Op::LocalUdpToA { lport, rport }),
        local_udp_on_cut => Just(Op::LocalUdpOnCut),
        2 => prop_oneof![
            (1u64..2_000),
            (9_000u64..12_000),
            (25_000u64..40_000),
            Just(2 * 3600 * 1000 + 700_000),
        ]
        .prop_map(Op::Wait),
        1 => Just(Op::Restart),
    ]
}

/// Runs the scenario and checks, at each step, that nothing of X reached the local
/// workload and (`cut`) that nothing of the local side reached X.
struct Run {
    e: Enforcer,
    policy: &'static str,
    now: Duration,
    emit: Emit,
    x: Sender,
    a: Sender,
    /// The local side may still send on the UDP flow X had (cut scenario): false once
    /// a restart or a long silence may have let its tombstone go, after which the
    /// server's next datagram is a new opening of its own.
    udp_tombstone: bool,
    /// When something last passed on that UDP flow.
    udp_touched: Duration,
}

impl Run {
    fn new(policy: &'static str) -> Run {
        Run {
            e: enforcer(policy),
            policy,
            now: Duration::from_secs(1),
            emit: Emit::default(),
            x: sender(X),
            a: sender(A),
            udp_tombstone: false,
            udp_touched: Duration::ZERO,
        }
    }

    /// Nothing the enforcer just emitted towards the local workload carries X's bytes
    /// or a SYN in X's name.
    fn check_emitted(&mut self, what: &Op) -> Result<(), TestCaseError> {
        for (toward, pkt) in self.emit.packets() {
            if toward != Toward::Local {
                continue;
            }
            prop_assert!(
                !pkt.windows(MARK.len()).any(|w| w == MARK),
                "X's bytes emitted towards the local workload after {what:?}"
            );
        }
        self.emit.clear();
        Ok(())
    }

    fn x_inbound(&mut self, pkt: &[u8], what: &Op) -> Result<(), TestCaseError> {
        let v = self.e.inbound(&self.x, pkt, self.now, WALL, &mut self.emit);
        prop_assert_ne!(v, Verdict::Deliver, "X's packet delivered: {:?}", what);
        for (toward, out) in self.emit.packets() {
            let p = parse(out).map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
            let syn = p.obs.tcp.is_some_and(|t| t.flags.syn());
            prop_assert!(
                toward != Toward::Local || (!syn && p.obs.tcp.is_none_or(|t| t.payload_len == 0)),
                "a segment with bytes or a SYN emitted to the local workload for X's {what:?}"
            );
        }
        self.check_emitted(what)
    }

    fn step(&mut self, op: &Op, cut: bool) -> Result<(), TestCaseError> {
        let addr = |a_addr: bool| if a_addr { A_ADDR } else { X_ADDR };
        match op {
            Op::TcpFromX {
                a_addr,
                sport,
                dport,
                flags,
                seq,
                ack,
                payload,
            } => {
                let pkt = tcp(
                    addr(*a_addr),
                    LOCAL,
                    *sport,
                    *dport,
                    *flags,
                    *seq,
                    *ack,
                    payload,
                );
                self.x_inbound(&pkt, op)?;
            }
            Op::UdpFromX {
                a_addr,
                sport,
                dport,
            } => {
                let pkt = udp(addr(*a_addr), LOCAL, *sport, *dport, MARK);
                self.x_inbound(&pkt, op)?;
            }
            Op::IcmpFromX {
                a_addr,
                to_a,
                tcp: is_tcp,
                lport,
                rport,
                seq,
            } => {
                let to = addr(*to_a);
                let quoted = if *is_tcp {
                    tcp(LOCAL, to, *lport, *rport, 0x10, *seq, 0, b"")
                } else {
                    udp(LOCAL, to, *lport, *rport, b"")
                };
                let pkt = icmp_error(addr(*a_addr), *seq % 2 == 0, &quoted);
                self.x_inbound(&pkt, op)?;
            }
            Op::TcpFromA {
                sport,
                dport,
                flags,
                seq,
                ack,
                get,
            } => {
                let payload: &[u8] = if *get {
                    b"GET /api/a HTTP/1.1\r\nHost: c\r\n\r\n"
                } else {
                    b""
                };
                let pkt = tcp(A_ADDR, LOCAL, *sport, *dport, *flags, *seq, *ack, payload);
                let _ = self
                    .e
                    .inbound(&self.a, &pkt, self.now, WALL, &mut self.emit);
                self.check_emitted(op)?;
            }
            Op::LocalTcp {
                to_a,
                lport,
                rport,
                flags,
                seq,
                ack,
                payload,
            } => {
                let mut flags = *flags;
                if !to_a && flags & 0x02 != 0 {
                    // Never an opening towards X: a SYN goes with ACK.
                    flags |= 0x10;
                }
                let body: &[u8] = if *payload { b"server bytes" } else { b"" };
                let pkt = tcp(LOCAL, addr(*to_a), *lport, *rport, flags, *seq, *ack, body);
                let peer = if *to_a { &self.a } else { &self.x };
                let v = self
                    .e
                    .outbound(Some(&peer.identity), &pkt, self.now, &mut self.emit);
                if cut && !to_a {
                    prop_assert_ne!(v, Verdict::Deliver, "local packet to X delivered: {:?}", op);
                }
                self.check_emitted(op)?;
            }
            Op::LocalUdpToA { lport, rport } => {
                let pkt = udp(LOCAL, A_ADDR, *lport, *rport, b"to a");
                let _ = self
                    .e
                    .outbound(Some(&self.a.identity), &pkt, self.now, &mut self.emit);
                self.check_emitted(op)?;
            }
            Op::LocalUdpOnCut => {
                let tombstone_alive = self.udp_tombstone
                    && self.now.saturating_sub(self.udp_touched)
                        < Timeouts::default().datagram_replied;
                if tombstone_alive {
                    let pkt = udp(LOCAL, X_ADDR, 7000, 40000, b"from the server");
                    let v = self
                        .e
                        .outbound(Some(&self.x.identity), &pkt, self.now, &mut self.emit);
                    prop_assert_ne!(v, Verdict::Deliver, "the cut UDP flow reopened");
                    self.udp_touched = self.now;
                    self.check_emitted(op)?;
                }
            }
            Op::Wait(ms) => {
                self.now += Duration::from_millis(*ms);
                self.e.poll(self.now, WALL, &mut self.emit);
                self.check_emitted(op)?;
            }
            Op::Restart => {
                self.e = enforcer(self.policy);
                self.udp_tombstone = false;
            }
        }
        Ok(())
    }

    /// X, while allowed, opens a TCP flow to 8080, an inspected one to 80 (with an
    /// allowed request) and a UDP flow to 7000 that the server answers; then the
    /// policy takes X's rights away and the cuts are reset.
    fn open_and_cut(&mut self) -> Result<(), TestCaseError> {
        let (x, now) = (self.x.clone(), self.now);
        let xi = Some(&x.identity);
        let deliver = |v: Verdict| -> Result<(), TestCaseError> {
            prop_assert_eq!(v, Verdict::Deliver);
            Ok(())
        };
        for (sport, dport) in [(40000, 8080), (40001, 80)] {
            let syn = tcp(X_ADDR, LOCAL, sport, dport, 0x02, 1000, 0, b"");
            deliver(self.e.inbound(&x, &syn, now, WALL, &mut self.emit))?;
            let syn_ack = tcp(LOCAL, X_ADDR, dport, sport, 0x12, 5000, 1001, b"");
            deliver(self.e.outbound(xi, &syn_ack, now, &mut self.emit))?;
            let get = b"GET /api/x HTTP/1.1\r\nHost: c\r\n\r\n";
            let data = tcp(X_ADDR, LOCAL, sport, dport, 0x18, 1001, 5001, get);
            deliver(self.e.inbound(&x, &data, now, WALL, &mut self.emit))?;
        }
        let dgram = udp(X_ADDR, LOCAL, 40000, 7000, b"hello");
        deliver(self.e.inbound(&x, &dgram, now, WALL, &mut self.emit))?;
        let answer = udp(LOCAL, X_ADDR, 7000, 40000, b"hi");
        deliver(self.e.outbound(xi, &answer, now, &mut self.emit))?;
        self.emit.clear();
        let cuts = self.e.set_policy(compiled(A_ONLY), now, WALL);
        prop_assert_eq!(cuts.len(), 3);
        for cut in &cuts {
            cut.resets(&mut self.emit);
        }
        self.emit.clear();
        self.policy = A_ONLY;
        self.udp_tombstone = true;
        self.udp_touched = now;
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Issue 18: for a policy that gives X nothing, no sequence of X's packets (any
    /// flags and numbers, RSTs, ICMP errors, with time jumps and restarts, among the
    /// local server's own packets that open nothing towards X) delivers a byte of X's.
    #[test]
    fn nothing_of_an_identity_granted_nothing_reaches_the_workload(
        ops in proptest::collection::vec(op(false), 1..80)
    ) {
        let mut run = Run::new(A_ONLY);
        for op in &ops {
            run.step(op, false)?;
        }
    }

    /// Its sibling: flows X opened while it was allowed, cut by a policy change,
    /// deliver nothing in either direction afterwards.
    #[test]
    fn a_cut_flow_delivers_nothing_either_way(
        ops in proptest::collection::vec(op(true), 1..80)
    ) {
        let mut run = Run::new(A_AND_X);
        run.open_and_cut()?;
        for op in &ops {
            run.step(op, true)?;
        }
    }
}
