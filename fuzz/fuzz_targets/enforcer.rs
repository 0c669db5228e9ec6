//! The enforcer (IP/TCP/UDP/ICMP parsing, connection tracking, layer-4 and layer-7
//! policy, injected answers) under arbitrary packets in both directions, policy changes,
//! identities renewed or removed, and time. Mostly well-formed TCP segments of one
//! connection to an inspected port, built from the input, so that the fuzzer reaches the
//! layer-7 path; raw packets too. The first byte picks the scenario: that mix, or one
//! of the two properties of issue 18 (an identity granted nothing gets nothing through,
//! whatever it sends among the local server's packets, with time jumps and restarts; a
//! flow cut by a policy change delivers nothing in either direction afterwards).
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use etherparse::PacketBuilder;
use libfuzzer_sys::fuzz_target;
use mesh_proto::policy::{self, CompiledPolicy, DefaultAction, PolicySet};
use mesh_proto::time::UnixTime;
use meshd::enforce::conntrack::Timeouts;
use meshd::enforce::decisions::{DecisionLog, LogLimits};
use meshd::enforce::{self, Emit, Enforcer, Limits, LocalWorkload, Sender, Toward};

const POLICY: &str = r#"
[[policy]]
name = "api"
action = "allow"
[[policy.rule]]
name = "read"
from = [{ identities = ["spiffe://t/a"] }]
to = [{ ports = [80], methods = ["GET"], paths = ["/api/*"] }]
[[policy.rule]]
name = "l4"
from = [{ identities = ["spiffe://t/a"] }]
to = [{ ports = [8080] }]
"#;

const PEER: [u8; 4] = [100, 64, 0, 1];
const LOCAL: [u8; 4] = [100, 64, 0, 3];
const WALL: UnixTime = UnixTime(1_795_673_877);

#[path = "common/input.rs"]
mod input;
use input::Input;

fn compiled(default: DefaultAction) -> CompiledPolicy {
    // Parsed once: the fuzzer's time goes to the enforcer, not to TOML.
    static SET: OnceLock<PolicySet> = OnceLock::new();
    let set = SET.get_or_init(|| {
        policy::parse("fuzz.toml", POLICY)
            .expect("policy parses")
            .set
    });
    CompiledPolicy::compile(set.clone(), default)
}

fn tcp(from_client: bool, port: u16, seq: u32, ack: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
    let (src, dst, sport, dport) = if from_client {
        (PEER, LOCAL, 40000, port)
    } else {
        (LOCAL, PEER, port, 40000)
    };
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
    let mut out = Vec::new();
    let _ = b.write(&mut out, payload);
    out
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    match input.u8().unwrap_or(0) % 4 {
        0 | 1 => mixed(&mut input),
        2 => adversary(&mut input, false),
        _ => adversary(&mut input, true),
    }
});

/// Packets in both directions of mostly one connection to an inspected port and one
/// to a layer-4 port, raw bytes, policy and identity changes, time.
fn mixed(input: &mut Input<'_>) {
    let log = Arc::new(DecisionLog::new(LogLimits {
        ring: 16,
        ..LogLimits::default()
    }));
    let e = Enforcer::new(
        LocalWorkload {
            identity: Some("spiffe://t/c".into()),
            groups: Arc::from(Vec::new()),
        },
        compiled(DefaultAction::Deny),
        Limits {
            flows: 64,
            ..Limits::default()
        },
        log,
    );
    let sender = Sender {
        identity: "spiffe://t/a".into(),
        groups: Arc::from(Vec::new()),
    };
    let mut emit = Emit::default();
    let mut now = Duration::from_millis(10);
    let (mut cseq, mut sseq) = (1000u32, 5000u32);
    while let Some(op) = input.u8() {
        match op % 8 {
            0..=3 => {
                // A client segment to port 80 (inspected) or 8080: sequence numbers near
                // the connection's, flags from the input.
                let port = if op & 0x80 != 0 { 8080 } else { 80 };
                let flags = input.u8().unwrap_or(0x18);
                let delta = input.u8().unwrap_or(0) as i8 as i32;
                let len = usize::from(input.u8().unwrap_or(0));
                let payload = input.bytes(len);
                let seq = cseq.wrapping_add_signed(delta);
                let pkt = tcp(true, port, seq, sseq, flags, payload);
                let _ = e.inbound(&sender, &pkt, now, WALL, &mut emit);
                if delta == 0 {
                    cseq = cseq.wrapping_add(payload.len() as u32 + u32::from(flags & 0x03 != 0));
                }
            }
            4 => {
                let port = if op & 0x80 != 0 { 8080 } else { 80 };
                let flags = input.u8().unwrap_or(0x10);
                let len = usize::from(input.u8().unwrap_or(0) % 64);
                let payload = input.bytes(len);
                let pkt = tcp(false, port, sseq, cseq, flags, payload);
                let _ = e.outbound(Some(&sender.identity), &pkt, now, &mut emit);
                sseq = sseq.wrapping_add(payload.len() as u32 + u32::from(flags & 0x03 != 0));
            }
            5 => {
                let len = usize::from(input.u16() % 1600);
                let raw = input.bytes(len);
                if op & 0x80 != 0 {
                    let _ = e.outbound(Some(&sender.identity), raw, now, &mut emit);
                } else {
                    let _ = e.inbound(&sender, raw, now, WALL, &mut emit);
                }
            }
            6 => {
                now += Duration::from_millis(250 * u64::from(input.u8().unwrap_or(1)));
                let _ = e.poll(now, WALL, &mut emit);
            }
            7 if op & 0x40 != 0 => {
                // The mesh's identities changed: A's certificate renewed with or without
                // a group, or A removed; the flows cut are reset.
                let gone = op & 0x20 != 0;
                let groups: Arc<[String]> = if op & 0x10 != 0 {
                    Arc::from(vec!["ops".to_string()])
                } else {
                    Arc::from(Vec::new())
                };
                let known = |id: &str| (!gone || id != "spiffe://t/a").then(|| groups.clone());
                for cut in e.refresh_identities(known, now, WALL) {
                    cut.resets(&mut emit);
                }
            }
            _ => {
                // A policy change: stricter (default deny, no policies) or back.
                let p = if op & 0x80 != 0 {
                    CompiledPolicy::empty(DefaultAction::Deny)
                } else {
                    compiled(DefaultAction::Deny)
                };
                let _ = e.set_policy(p, now, WALL);
            }
        }
        // Every packet the enforcer emits is a whole IP packet.
        for (_, pkt) in emit.packets() {
            assert!(
                etherparse::SlicedPacket::from_ip(pkt).is_ok(),
                "emitted a broken packet"
            );
        }
        emit.clear();
    }
}

// ---- The two properties of issue 18 (also property tests in meshd/src/enforce/props.rs)

const X: &str = "spiffe://t/x";
/// X's own address; X may also send from A's (`PEER`: certificates with overlapping
/// prefixes), and must still be told apart by identity.
const X_ADDR: [u8; 4] = [100, 64, 0, 9];
/// In every payload X sends: must never reach the local workload.
const MARK: &[u8] = b"XMARK";

/// A may GET `/api/*` on 80 (inspected) and use 8080 and 7000; X nothing.
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

/// X with A's rights: before the cut.
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

fn policy_of(src: &'static str) -> CompiledPolicy {
    static A: OnceLock<PolicySet> = OnceLock::new();
    static AX: OnceLock<PolicySet> = OnceLock::new();
    let cell = if src == A_ONLY { &A } else { &AX };
    let set = cell.get_or_init(|| policy::parse("fuzz.toml", src).expect("policy parses").set);
    CompiledPolicy::compile(set.clone(), DefaultAction::Deny)
}

fn new_enforcer(src: &'static str) -> Enforcer {
    Enforcer::new(
        LocalWorkload {
            identity: Some("spiffe://t/c".into()),
            groups: Arc::from(Vec::new()),
        },
        policy_of(src),
        Limits {
            flows: 64,
            ..Limits::default()
        },
        Arc::new(DecisionLog::new(LogLimits {
            ring: 16,
            ..LogLimits::default()
        })),
    )
}

#[allow(clippy::too_many_arguments)] // one field each of the segment
fn segment(
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
    let _ = b.write(&mut out, payload);
    out
}

fn datagram(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = PacketBuilder::ipv4(src, dst, 64)
        .udp(sport, dport)
        .write(&mut out, payload);
    out
}

/// A sequence number near the ones the scenario uses, or any.
fn seq_from(input: &mut Input<'_>) -> u32 {
    match input.u8().unwrap_or(0) {
        b @ 0..=63 => 995 + u32::from(b % 16),
        b @ 64..=127 => 4_995 + u32::from(b % 16),
        b @ 128..=191 => 1_000 + 37 * u32::from(b % 40),
        _ => u32::from(input.u16()) << 16 | u32::from(input.u16()),
    }
}

/// X granted nothing (`cut` false), or the flows X opened while allowed cut by a
/// policy change (`cut`): nothing of X's reaches the local workload, whatever X sends
/// among the local server's packets that open nothing towards X; after a cut, nothing
/// of the local side reaches X either.
fn adversary(input: &mut Input<'_>, cut: bool) {
    let x = Sender {
        identity: X.into(),
        groups: Arc::from(Vec::new()),
    };
    let a = Sender {
        identity: "spiffe://t/a".into(),
        groups: Arc::from(Vec::new()),
    };
    let mut e = new_enforcer(if cut { A_AND_X } else { A_ONLY });
    let mut emit = Emit::default();
    let mut now = Duration::from_secs(1);
    let ports = [80u16, 8080, 7000, 9000];
    let peer_ports = [40000u16, 40001];
    // The cut UDP flow keeps its tombstone while the local side keeps sending on it
    // (a restart or a long silence lets it go; the next datagram is then a new opening
    // of the local side's own, not a packet of the cut flow).
    let mut udp_tombstone = false;
    let mut udp_touched = now;
    if cut {
        let deliver = enforce::Verdict::Deliver;
        for (sport, dport) in [(40000, 8080), (40001, 80)] {
            let syn = segment(X_ADDR, LOCAL, sport, dport, 0x02, 1000, 0, b"");
            assert_eq!(e.inbound(&x, &syn, now, WALL, &mut emit), deliver);
            let syn_ack = segment(LOCAL, X_ADDR, dport, sport, 0x12, 5000, 1001, b"");
            assert_eq!(
                e.outbound(Some(&x.identity), &syn_ack, now, &mut emit),
                deliver
            );
            let get = b"GET /api/x HTTP/1.1\r\nHost: c\r\n\r\n";
            let data = segment(X_ADDR, LOCAL, sport, dport, 0x18, 1001, 5001, get);
            assert_eq!(e.inbound(&x, &data, now, WALL, &mut emit), deliver);
        }
        let hello = datagram(X_ADDR, LOCAL, 40000, 7000, b"hello");
        assert_eq!(e.inbound(&x, &hello, now, WALL, &mut emit), deliver);
        let answer = datagram(LOCAL, X_ADDR, 7000, 40000, b"hi");
        assert_eq!(
            e.outbound(Some(&x.identity), &answer, now, &mut emit),
            deliver
        );
        for c in e.set_policy(policy_of(A_ONLY), now, WALL) {
            c.resets(&mut emit);
        }
        emit.clear();
        udp_tombstone = true;
    }
    let policy = A_ONLY;
    while let Some(op) = input.u8() {
        let from_a_addr = op & 0x80 != 0;
        let x_addr = if from_a_addr { PEER } else { X_ADDR };
        let mut from_x = false;
        match op % 8 {
            0..=2 => {
                let sport = peer_ports[usize::from(op >> 3) % 2];
                let dport = ports[usize::from(op >> 4) % 4];
                let flags = input.u8().unwrap_or(0) & 0x3f;
                let (seq, ack) = (seq_from(input), seq_from(input));
                let len = usize::from(input.u8().unwrap_or(0) % 32);
                let mut payload = input.bytes(len).to_vec();
                payload.extend_from_slice(MARK);
                let pkt = segment(x_addr, LOCAL, sport, dport, flags, seq, ack, &payload);
                let v = e.inbound(&x, &pkt, now, WALL, &mut emit);
                assert_ne!(v, enforce::Verdict::Deliver, "X's segment delivered");
                from_x = true;
            }
            3 => {
                // A datagram from X, or an ICMP error from X about a packet from here.
                let lport = ports[usize::from(op >> 3) % 4];
                let rport = peer_ports[usize::from(op >> 5) % 2];
                let pkt = if op & 0x40 != 0 {
                    datagram(x_addr, LOCAL, rport, lport, MARK)
                } else {
                    let to = if input.u8().unwrap_or(0) & 1 != 0 {
                        PEER
                    } else {
                        X_ADDR
                    };
                    let quoted = if op & 0x20 != 0 {
                        segment(LOCAL, to, lport, rport, 0x10, seq_from(input), 0, b"")
                    } else {
                        datagram(LOCAL, to, lport, rport, b"")
                    };
                    let mut out = Vec::new();
                    let _ = PacketBuilder::ipv4(x_addr, LOCAL, 64)
                        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
                            etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded {
                                next_hop_mtu: 552,
                            },
                        ))
                        .write(&mut out, &quoted[..quoted.len().min(28)]);
                    out
                };
                let v = e.inbound(&x, &pkt, now, WALL, &mut emit);
                assert_ne!(
                    v,
                    enforce::Verdict::Deliver,
                    "X's datagram or ICMP delivered"
                );
                from_x = true;
            }
            4 => {
                // A's own traffic, which X may try to write into.
                let sport = peer_ports[usize::from(op >> 3) % 2];
                let dport = ports[usize::from(op >> 4) % 4];
                let flags = input.u8().unwrap_or(0) & 0x1f;
                let payload: &[u8] = if op & 0x40 != 0 {
                    b"GET /api/a HTTP/1.1\r\nHost: c\r\n\r\n"
                } else {
                    b""
                };
                let (seq, ack) = (seq_from(input), seq_from(input));
                let pkt = segment(PEER, LOCAL, sport, dport, flags, seq, ack, payload);
                let _ = e.inbound(&a, &pkt, now, WALL, &mut emit);
            }
            5 => {
                // The local server to X (never an opening: a SYN goes with ACK) or to A.
                let to_a = from_a_addr;
                let lport = ports[usize::from(op >> 3) % 4];
                let rport = peer_ports[usize::from(op >> 5) % 2];
                let mut flags = input.u8().unwrap_or(0) & 0x1f;
                if !to_a && flags & 0x02 != 0 {
                    flags |= 0x10;
                }
                let (seq, ack) = (seq_from(input), seq_from(input));
                let body: &[u8] = if op & 0x40 != 0 { b"server bytes" } else { b"" };
                let (dst, peer) = if to_a { (PEER, &a) } else { (X_ADDR, &x) };
                let pkt = segment(LOCAL, dst, lport, rport, flags, seq, ack, body);
                let v = e.outbound(Some(&peer.identity), &pkt, now, &mut emit);
                assert!(
                    !cut || to_a || v != enforce::Verdict::Deliver,
                    "the local side reached X after the cut"
                );
            }
            6 => {
                let alive = udp_tombstone
                    && now.saturating_sub(udp_touched) < Timeouts::default().datagram_replied;
                if op & 0x40 != 0 && cut && alive {
                    // The server's next datagram on the cut UDP flow.
                    let pkt = datagram(LOCAL, X_ADDR, 7000, 40000, b"from the server");
                    let v = e.outbound(Some(&x.identity), &pkt, now, &mut emit);
                    assert_ne!(v, enforce::Verdict::Deliver, "the cut UDP flow reopened");
                    udp_touched = now;
                } else {
                    let lport = ports[usize::from(op >> 3) % 4];
                    let pkt = datagram(LOCAL, PEER, lport, 40000, b"to a");
                    let _ = e.outbound(Some(&a.identity), &pkt, now, &mut emit);
                }
            }
            _ if op & 0x40 != 0 => {
                // meshd restarts: nothing tracked.
                e = new_enforcer(policy);
                udp_tombstone = false;
            }
            _ => {
                let ms = match input.u8().unwrap_or(0) {
                    b @ 0..=127 => u64::from(b) * 20,
                    b @ 128..=191 => 9_000 + u64::from(b) * 30,
                    b @ 192..=254 => 25_000 + u64::from(b) * 50,
                    255 => 2 * 3600 * 1000 + 700_000,
                };
                now += Duration::from_millis(ms);
                let _ = e.poll(now, WALL, &mut emit);
            }
        }
        for (toward, pkt) in emit.packets() {
            assert!(
                etherparse::SlicedPacket::from_ip(pkt).is_ok(),
                "emitted a broken packet"
            );
            if toward != Toward::Local {
                continue;
            }
            assert!(
                !pkt.windows(MARK.len()).any(|w| w == MARK),
                "X's bytes emitted towards the local workload"
            );
            if from_x {
                // What answers X's packets towards the workload carries nothing of
                // X's: resets and empty probes, never bytes or a SYN.
                let sliced = etherparse::SlicedPacket::from_ip(pkt).expect("checked above");
                if let Some(etherparse::TransportSlice::Tcp(t)) = sliced.transport {
                    assert!(
                        t.payload().is_empty() && !t.syn(),
                        "a segment with bytes or a SYN towards the workload for X's packet"
                    );
                }
            }
        }
        emit.clear();
    }
}
