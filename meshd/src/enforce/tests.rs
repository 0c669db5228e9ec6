use super::*;
use etherparse::PacketBuilder;
use mesh_proto::policy::{self, DefaultAction};

const A: &str = "spiffe://t/a";
const B: &str = "spiffe://t/b";
const PEER_A: [u8; 4] = [100, 64, 0, 1];
const LOCAL: [u8; 4] = [100, 64, 0, 3];
const WALL: UnixTime = UnixTime(1_795_673_877);

fn t(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

fn sender(id: &str) -> Sender {
    Sender {
        identity: id.into(),
        groups: Vec::<String>::new().into(),
    }
}

fn compiled(src: &str, default: DefaultAction) -> CompiledPolicy {
    let parsed = policy::parse("test.toml", src).expect("test policy parses");
    CompiledPolicy::compile(parsed.set, default)
}

const NO_POLICIES: &str = "policy = []";

const ALLOW_A_8080: &str = r#"
[[policy]]
name = "web"
action = "allow"
[[policy.rule]]
name = "a-http"
from = [{ identities = ["spiffe://t/a"] }]
to = [{ ports = [8080] }]
"#;

fn enforcer(policy_src: &str, flows: usize) -> (Enforcer, Arc<DecisionLog>) {
    let log = Arc::new(DecisionLog::new(Default::default()));
    let e = Enforcer::new(
        LocalWorkload {
            identity: Some("spiffe://t/c".into()),
            groups: Arc::from(Vec::new()),
        },
        compiled(policy_src, DefaultAction::Deny),
        Limits {
            flows,
            ..Limits::default()
        },
        log.clone(),
    );
    (e, log)
}

fn tcp(
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    flags: &str,
    seq: u32,
    payload: &[u8],
) -> Vec<u8> {
    let mut b = PacketBuilder::ipv4(src, dst, 64).tcp(sport, dport, seq, 64_000);
    if flags.contains('S') {
        b = b.syn();
    }
    if flags.contains('A') {
        b = b.ack(1);
    }
    if flags.contains('F') {
        b = b.fin();
    }
    if flags.contains('R') {
        b = b.rst();
    }
    let mut out = Vec::new();
    b.write(&mut out, payload).unwrap();
    out
}

fn udp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ipv4(src, dst, 64)
        .udp(sport, dport)
        .write(&mut out, b"x")
        .unwrap();
    out
}

/// A local workload's packet going out to peer A.
fn outbound(e: &Enforcer, packet: &[u8], now: Duration) -> Verdict {
    e.outbound(Some(&A.into()), packet, now, &mut Emit::default())
}

fn denied(r: DenyReason) -> Verdict {
    Verdict::Drop(DropReason::Denied(r))
}

#[test]
fn allow_for_one_identity_on_one_port_lets_exactly_that_through() {
    let (e, _) = enforcer(ALLOW_A_8080, 1024);
    let syn = tcp(PEER_A, LOCAL, 40000, 8080, "S", 1, b"");
    assert_eq!(
        e.inbound(&sender(A), &syn, t(0), WALL, &mut Emit::default()),
        Verdict::Deliver
    );
    // Another identity, same packet shape: refused.
    assert_eq!(
        e.inbound(
            &sender(B),
            &tcp(PEER_A, LOCAL, 40001, 8080, "S", 1, b""),
            t(0),
            WALL,
            &mut Emit::default()
        ),
        denied(DenyReason::NoAllowMatched)
    );
    // Same identity, another port: refused.
    assert_eq!(
        e.inbound(
            &sender(A),
            &tcp(PEER_A, LOCAL, 40002, 22, "S", 1, b""),
            t(0),
            WALL,
            &mut Emit::default()
        ),
        denied(DenyReason::NoAllowMatched)
    );
    // UDP to the allowed port is another protocol: the rule names no protocol, so
    // Istio semantics allow it (ports match any protocol).
    let v = e.inbound(
        &sender(A),
        &udp(PEER_A, LOCAL, 5000, 8080),
        t(0),
        WALL,
        &mut Emit::default(),
    );
    assert_eq!(v, Verdict::Deliver);
}

#[test]
fn replies_on_allowed_flows_pass_both_ways() {
    let (e, _) = enforcer(ALLOW_A_8080, 1024);
    e.inbound(
        &sender(A),
        &tcp(PEER_A, LOCAL, 40000, 8080, "S", 1, b""),
        t(0),
        WALL,
        &mut Emit::default(),
    );
    // The server's SYN-ACK and data go out.
    assert_eq!(
        outbound(&e, &tcp(LOCAL, PEER_A, 8080, 40000, "SA", 9, b""), t(1)),
        Verdict::Deliver
    );
    // The client's next segments come in on the tracked flow.
    assert_eq!(
        e.inbound(
            &sender(A),
            &tcp(PEER_A, LOCAL, 40000, 8080, "A", 2, b"GET"),
            t(2),
            WALL,
            &mut Emit::default()
        ),
        Verdict::Deliver
    );
}

#[test]
fn replies_to_local_connections_pass_under_deny_all() {
    let (e, _) = enforcer(NO_POLICIES, 1024);
    // Nothing allowed inbound...
    assert_eq!(
        e.inbound(
            &sender(A),
            &tcp(PEER_A, LOCAL, 80, 50000, "SA", 1, b""),
            t(0),
            WALL,
            &mut Emit::default()
        ),
        denied(DenyReason::DefaultDeny)
    );
    // ...but once the local workload opens the connection, its replies pass.
    assert_eq!(
        outbound(&e, &tcp(LOCAL, PEER_A, 50000, 80, "S", 1, b""), t(1)),
        Verdict::Deliver
    );
    assert_eq!(
        e.inbound(
            &sender(A),
            &tcp(PEER_A, LOCAL, 80, 50000, "SA", 1, b""),
            t(2),
            WALL,
            &mut Emit::default()
        ),
        Verdict::Deliver
    );
}

#[test]
fn deny_overrides_allow_and_is_logged_with_its_rule() {
    let src = format!(
        "{ALLOW_A_8080}\n[[policy]]\nname = \"block\"\naction = \"deny\"\n[[policy.rule]]\nname = \"no-a\"\nfrom = [{{ identities = [\"{A}\"] }}]\n"
    );
    let (e, log) = enforcer(&src, 1024);
    let v = e.inbound(
        &sender(A),
        &tcp(PEER_A, LOCAL, 40000, 8080, "S", 1, b""),
        t(0),
        WALL,
        &mut Emit::default(),
    );
    assert!(matches!(
        v,
        Verdict::Drop(DropReason::Denied(DenyReason::ExplicitDeny(_)))
    ));
    let line = log.tail(1).pop().expect("deny logged");
    let rec: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(rec["src"], A);
    assert_eq!(rec["src_addr"], "100.64.0.1");
    assert_eq!(rec["dst_port"], 8080);
    assert_eq!(rec["proto"], "tcp");
    assert_eq!(rec["decision"], "deny");
    assert_eq!(rec["reason"], "explicit_deny");
    assert_eq!(rec["policy"], "block");
    assert_eq!(rec["rule"], "no-a");
    let c = e.counters();
    assert_eq!(c.drops.get("explicit_deny"), Some(&1));
    assert_eq!(c.rules.len(), 1);
    assert_eq!(c.rules[0].deny, 1);
}

#[test]
fn stricter_policy_cuts_established_flow_with_sequence_numbers() {
    let (e, log) = enforcer(ALLOW_A_8080, 1024);
    e.inbound(
        &sender(A),
        &tcp(PEER_A, LOCAL, 40000, 8080, "S", 100, b""),
        t(0),
        WALL,
        &mut Emit::default(),
    );
    outbound(&e, &tcp(LOCAL, PEER_A, 8080, 40000, "SA", 500, b""), t(1));
    e.inbound(
        &sender(A),
        &tcp(PEER_A, LOCAL, 40000, 8080, "A", 101, b"hello"),
        t(2),
        WALL,
        &mut Emit::default(),
    );
    let cuts = e.set_policy(compiled(NO_POLICIES, DefaultAction::Deny), t(3), WALL);
    assert_eq!(cuts.len(), 1);
    assert_eq!(cuts[0].key.dst_port, 8080);
    assert_eq!(cuts[0].client_next_seq, Some(106));
    assert_eq!(cuts[0].server_next_seq, Some(501));
    assert!(log.tail(1)[0].contains("default_deny"));
    let mut emit = Emit::default();
    cuts[0].resets(&mut emit);
    let rsts: Vec<(Toward, u32, bool)> = emit
        .packets()
        .map(
            |(t, p)| match etherparse::SlicedPacket::from_ip(p).unwrap().transport {
                Some(etherparse::TransportSlice::Tcp(tcp)) => (t, tcp.sequence_number(), tcp.rst()),
                _ => panic!("not TCP"),
            },
        )
        .collect();
    assert_eq!(
        rsts,
        vec![(Toward::Local, 106, true), (Toward::Peer, 501, true)]
    );
    // Later segments of the cut flow are refused; the server's replies too.
    assert_eq!(
        e.inbound(
            &sender(A),
            &tcp(PEER_A, LOCAL, 40000, 8080, "A", 106, b"more"),
            t(4),
            WALL,
            &mut Emit::default()
        ),
        denied(DenyReason::DefaultDeny)
    );
    assert_eq!(e.counters().flows, 0);
}

#[test]
fn renewed_groups_and_removed_identities_redecide_established_flows() {
    const OPS_8080: &str = r#"
[[policy]]
name = "ops"
action = "allow"
[[policy.rule]]
from = [{ groups = ["ops"] }]
to = [{ ports = [8080] }]
"#;
    let (e, log) = enforcer(OPS_8080, 1024);
    let ops = |id: &str| Sender {
        identity: id.into(),
        groups: vec!["ops".to_string()].into(),
    };
    let open = |port: u16, from: &Sender| {
        let syn = tcp(PEER_A, LOCAL, port, 8080, "S", 100, b"");
        e.inbound(from, &syn, t(0), WALL, &mut Emit::default())
    };
    assert_eq!(open(40000, &ops(A)), Verdict::Deliver);
    assert_eq!(open(40001, &ops(B)), Verdict::Deliver);
    fn groups(a: &[&str]) -> Arc<[String]> {
        a.iter().map(|g| g.to_string()).collect()
    }
    /// The identities in the mesh and their groups: A's and B's as given (`None`:
    /// gone), everyone else's none.
    type Groups = Option<&'static [&'static str]>;
    fn mesh(a: Groups, b: Groups) -> impl Fn(&str) -> Option<Arc<[String]>> {
        move |id: &str| match id {
            A => a.map(groups),
            B => b.map(groups),
            _ => Some(groups(&[])),
        }
    }
    // Nothing changed: nothing re-decided.
    let cuts = e.refresh_identities(mesh(Some(&["ops"]), Some(&["ops"])), t(1), WALL);
    assert!(cuts.is_empty());
    assert_eq!(e.counters().flows, 2);
    // A's certificate renewed without ops: its flow is cut, B's stays.
    let cuts = e.refresh_identities(mesh(Some(&["web"]), Some(&["ops"])), t(2), WALL);
    assert_eq!(cuts.len(), 1);
    assert_eq!(cuts[0].key.src_port, 40000);
    assert_eq!(cuts[0].client_next_seq, Some(101));
    assert_eq!(e.counters().flows, 1);
    assert!(log.tail(1)[0].contains("spiffe://t/a"), "{:?}", log.tail(1));
    // B removed from the mesh: its flow is cut whatever the policy says.
    let cuts = e.refresh_identities(mesh(Some(&["ops"]), None), t(3), WALL);
    assert_eq!(cuts.len(), 1);
    assert_eq!(cuts[0].key.src_port, 40001);
    assert_eq!(e.counters().flows, 0);
    let line = &log.tail(1)[0];
    assert!(
        line.contains("identity_removed") && line.contains("spiffe://t/b"),
        "{line}"
    );
    // A, given ops back, opens flows again.
    assert_eq!(open(40002, &ops(A)), Verdict::Deliver);
}

#[test]
fn looser_policy_keeps_flows_and_redecides_lazily() {
    let (e, _) = enforcer(ALLOW_A_8080, 1024);
    e.inbound(
        &sender(A),
        &tcp(PEER_A, LOCAL, 40000, 8080, "S", 1, b""),
        t(0),
        WALL,
        &mut Emit::default(),
    );
    let cuts = e.set_policy(compiled(ALLOW_A_8080, DefaultAction::Allow), t(1), WALL);
    assert!(cuts.is_empty());
    assert_eq!(e.counters().flows, 1);
}

#[test]
fn fragments_are_dropped_and_counted() {
    let (e, _) = enforcer(ALLOW_A_8080, 1024);
    let mut p = udp(PEER_A, LOCAL, 5000, 8080);
    p[6] |= 0x20; // more fragments
    assert_eq!(
        e.inbound(&sender(A), &p, t(0), WALL, &mut Emit::default()),
        denied(DenyReason::Fragment)
    );
    assert_eq!(e.counters().drops.get("fragment"), Some(&1));
}

#[test]
fn icmp_errors_pass_only_for_tracked_flows() {
    let (e, _) = enforcer(NO_POLICIES, 1024);
    let sent = udp(LOCAL, PEER_A, 5000, 53);
    let icmp_err = |quoted: &[u8]| {
        let mut out = Vec::new();
        PacketBuilder::ipv4(PEER_A, LOCAL, 64)
            .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
                etherparse::icmpv4::DestUnreachableHeader::Port,
            ))
            .write(&mut out, quoted)
            .unwrap();
        out
    };
    // No flow yet: stray.
    assert_eq!(
        e.inbound(
            &sender(A),
            &icmp_err(&sent),
            t(0),
            WALL,
            &mut Emit::default()
        ),
        Verdict::Drop(DropReason::StrayIcmp)
    );
    outbound(&e, &sent, t(1));
    assert_eq!(
        e.inbound(
            &sender(A),
            &icmp_err(&sent),
            t(2),
            WALL,
            &mut Emit::default()
        ),
        Verdict::Deliver
    );
}

#[test]
fn icmp_echo_is_a_flow_by_identifier() {
    let (e, _) = enforcer(NO_POLICIES, 1024);
    let mut req = Vec::new();
    PacketBuilder::ipv4(LOCAL, PEER_A, 64)
        .icmpv4_echo_request(7, 1)
        .write(&mut req, b"ping")
        .unwrap();
    let mut reply = Vec::new();
    PacketBuilder::ipv4(PEER_A, LOCAL, 64)
        .icmpv4_echo_reply(7, 1)
        .write(&mut reply, b"ping")
        .unwrap();
    assert_eq!(outbound(&e, &req, t(0)), Verdict::Deliver);
    assert_eq!(
        e.inbound(&sender(A), &reply, t(1), WALL, &mut Emit::default()),
        Verdict::Deliver
    );
    // An echo request from the peer is a new flow, refused by default deny.
    let mut peer_req = Vec::new();
    PacketBuilder::ipv4(PEER_A, LOCAL, 64)
        .icmpv4_echo_request(9, 1)
        .write(&mut peer_req, b"ping")
        .unwrap();
    assert_eq!(
        e.inbound(&sender(A), &peer_req, t(1), WALL, &mut Emit::default()),
        denied(DenyReason::DefaultDeny)
    );
}

#[test]
fn denied_flood_is_not_tracked() {
    let (e, log) = enforcer(ALLOW_A_8080, 1024);
    for port in 0..5_000u16 {
        e.inbound(
            &sender(B),
            &tcp(PEER_A, LOCAL, port, 8080, "S", 1, b""),
            t(0),
            WALL,
            &mut Emit::default(),
        );
    }
    let c = e.counters();
    assert_eq!(c.flows, 0);
    assert_eq!(c.drops.get("no_allow_matched"), Some(&5_000));
    // The log's per-second budget holds; the rest is counted as suppressed.
    assert!(log.counters().written <= 2_000);
    assert!(log.counters().suppressed >= 3_000);
}

#[test]
fn full_table_refuses_new_flows_and_says_so() {
    // One flow per shard: the second established flow in a shard cannot be tracked.
    let (e, log) = enforcer(ALLOW_A_8080, 1);
    let mut refused = 0;
    for port in 1..200u16 {
        let v = e.inbound(
            &sender(A),
            &tcp(PEER_A, LOCAL, port, 8080, "S", 1, b""),
            t(0),
            WALL,
            &mut Emit::default(),
        );
        outbound(&e, &tcp(LOCAL, PEER_A, 8080, port, "SA", 1, b""), t(0));
        if v == denied(DenyReason::FlowTableFull) {
            refused += 1;
        }
    }
    assert!(refused > 0);
    assert!(e.counters().flows <= SHARDS);
    assert!(log
        .tail(10_000)
        .iter()
        .any(|l| l.contains("flow_table_full")));
}

#[test]
fn mid_stream_segments_fail_closed_only_on_inspected_ports() {
    let l7 = r#"
[[policy]]
name = "api"
action = "allow"
[[policy.rule]]
from = [{ identities = ["spiffe://t/a"] }]
to = [{ ports = [80], methods = ["GET"] }]
[[policy.rule]]
from = [{ identities = ["spiffe://t/a"] }]
to = [{ ports = [9000] }]
"#;
    let (e, _) = enforcer(l7, 1024);
    assert_eq!(
        e.inbound(
            &sender(A),
            &tcp(PEER_A, LOCAL, 40000, 80, "A", 5, b"GET / HTTP/1.1"),
            t(0),
            WALL,
            &mut Emit::default()
        ),
        Verdict::Drop(DropReason::Untracked)
    );
    // A layer-4 port picks the flow up mid-stream (e.g. after a restart).
    assert_eq!(
        e.inbound(
            &sender(A),
            &tcp(PEER_A, LOCAL, 40000, 9000, "A", 5, b"x"),
            t(0),
            WALL,
            &mut Emit::default()
        ),
        Verdict::Deliver
    );
}

#[test]
fn malformed_packets_are_counted() {
    let (e, _) = enforcer(ALLOW_A_8080, 1024);
    for bad in [&[][..], &[0x45, 0, 0], &[0x60; 10], &[0xff; 40]] {
        assert_eq!(
            e.inbound(&sender(A), bad, t(0), WALL, &mut Emit::default()),
            Verdict::Drop(DropReason::Malformed)
        );
    }
    // A TCP header cut short.
    let mut p = tcp(PEER_A, LOCAL, 1, 8080, "S", 1, b"");
    p.truncate(30);
    p[3] = 30;
    assert!(matches!(
        e.inbound(&sender(A), &p, t(0), WALL, &mut Emit::default()),
        Verdict::Drop(_)
    ));
    assert!(e.counters().drops.get("malformed").copied().unwrap_or(0) >= 4);
}

#[test]
fn ipv6_flows_are_tracked() {
    let (e, _) = enforcer(ALLOW_A_8080, 1024);
    let a6: [u8; 16] = "fd00:6d65:7368::1"
        .parse::<std::net::Ipv6Addr>()
        .unwrap()
        .octets();
    let c6: [u8; 16] = "fd00:6d65:7368::3"
        .parse::<std::net::Ipv6Addr>()
        .unwrap()
        .octets();
    let mut syn = Vec::new();
    PacketBuilder::ipv6(a6, c6, 64)
        .tcp(40000, 8080, 1, 1000)
        .syn()
        .write(&mut syn, b"")
        .unwrap();
    assert_eq!(
        e.inbound(&sender(A), &syn, t(0), WALL, &mut Emit::default()),
        Verdict::Deliver
    );
    let mut synack = Vec::new();
    PacketBuilder::ipv6(c6, a6, 64)
        .tcp(8080, 40000, 1, 1000)
        .syn()
        .ack(2)
        .write(&mut synack, b"")
        .unwrap();
    assert_eq!(outbound(&e, &synack, t(1)), Verdict::Deliver);
    assert_eq!(e.counters().flows, 1);
}

/// An IPv6 TCP SYN from A (port `sport`) to the local workload's port 8080 with the
/// extension headers `chain` (each a next-header value and the header's bytes, whose
/// first byte is overwritten with the next one) between the IPv6 and TCP headers.
fn v6_syn_with(chain: &[(u8, Vec<u8>)], sport: u16) -> Vec<u8> {
    let a6 = "fd00:6d65:7368::1".parse::<std::net::Ipv6Addr>().unwrap();
    let c6 = "fd00:6d65:7368::3".parse::<std::net::Ipv6Addr>().unwrap();
    let mut plain = Vec::new();
    PacketBuilder::ipv6(a6.octets(), c6.octets(), 64)
        .tcp(sport, 8080, 1, 1000)
        .syn()
        .write(&mut plain, b"")
        .unwrap();
    let (ip, tcp) = plain.split_at(40);
    let mut exts = Vec::new();
    for (i, (_, bytes)) in chain.iter().enumerate() {
        let mut h = bytes.clone();
        h[0] = chain.get(i + 1).map_or(PROTO_TCP, |(t, _)| *t);
        exts.extend_from_slice(&h);
    }
    let mut p = ip.to_vec();
    if let Some((first, _)) = chain.first() {
        p[6] = *first;
    }
    let len = exts.len() + tcp.len();
    (p[4], p[5]) = ((len >> 8) as u8, len as u8);
    p.extend_from_slice(&exts);
    p.extend_from_slice(tcp);
    p
}

/// The extension chain is walked to the transport header (the flow is decided by its
/// TCP ports); a fragment anywhere in it is refused as a fragment, a malformed chain as
/// malformed (the checks etherparse made before the enforcer used `wire`).
#[test]
fn ipv6_extension_headers_are_walked_and_fragments_refused() {
    let (e, _) = enforcer(ALLOW_A_8080, 1024);
    let opts = vec![0u8; 8];
    let frag = |offset: u16, more: bool| {
        let w = (offset << 3) | u16::from(more);
        vec![0, 0, (w >> 8) as u8, w as u8, 0, 0, 0, 7]
    };
    let inbound = |p: &[u8]| e.inbound(&sender(A), p, t(0), WALL, &mut Emit::default());
    let p = v6_syn_with(&[(0, opts.clone()), (60, opts.clone())], 40000);
    assert_eq!(inbound(&p), Verdict::Deliver);
    // An atomic fragment (offset 0, no more) is a whole packet (RFC 8200 §4.5).
    assert_eq!(
        inbound(&v6_syn_with(&[(44, frag(0, false))], 40001)),
        Verdict::Deliver
    );
    for (offset, more) in [(0, true), (4, false), (100, true)] {
        let p = v6_syn_with(&[(60, opts.clone()), (44, frag(offset, more))], 40002);
        assert_eq!(inbound(&p), denied(DenyReason::Fragment), "{offset} {more}");
    }
    // Hop-by-hop after another header, and a header longer than the packet.
    let mut long = opts.clone();
    long[1] = 9;
    for chain in [
        vec![(60, opts.clone()), (0, opts.clone())],
        vec![(60, long)],
    ] {
        assert_eq!(
            inbound(&v6_syn_with(&chain, 40003)),
            Verdict::Drop(DropReason::Malformed)
        );
    }
    assert_eq!(e.counters().drops.get("fragment"), Some(&3));
    assert_eq!(e.counters().drops.get("malformed"), Some(&2));
    assert_eq!(e.counters().flows, 2);
}

const API_POLICY: &str = r#"
[[policy]]
name = "api"
action = "allow"
[[policy.rule]]
name = "a-reads"
from = [{ identities = ["spiffe://t/a"] }]
to = [{ ports = [80], methods = ["GET"], paths = ["/api/*"] }]
"#;

/// A client on the peer talking to a server on port 80 (or `port`) of the local
/// workload.
struct Conn {
    sport: u16,
    port: u16,
    cseq: u32,
    sseq: u32,
}

impl Conn {
    fn open(e: &Enforcer, sport: u16) -> Conn {
        Conn::open_to(e, sport, 80)
    }

    fn open_to(e: &Enforcer, sport: u16, port: u16) -> Conn {
        let mut c = Conn {
            sport,
            port,
            cseq: 1000,
            sseq: 5000,
        };
        let mut emit = Emit::default();
        let syn = c.client("S", b"");
        assert_eq!(
            e.inbound(&sender(A), &syn, t(0), WALL, &mut emit),
            Verdict::Deliver
        );
        c.cseq += 1;
        let synack = c.server("SA", b"");
        assert_eq!(outbound(e, &synack, t(0)), Verdict::Deliver);
        c.sseq += 1;
        let ack = c.client("A", b"");
        assert_eq!(
            e.inbound(&sender(A), &ack, t(0), WALL, &mut emit),
            Verdict::Deliver
        );
        c
    }

    fn client(&self, flags: &str, payload: &[u8]) -> Vec<u8> {
        self.client_at(flags, self.cseq, payload)
    }

    /// A client segment at sequence number `seq`, acknowledging the server's next.
    fn client_at(&self, flags: &str, seq: u32, payload: &[u8]) -> Vec<u8> {
        let b = PacketBuilder::ipv4(PEER_A, LOCAL, 64).tcp(self.sport, self.port, seq, 64_000);
        build(b, flags, self.sseq, payload)
    }

    fn server(&self, flags: &str, payload: &[u8]) -> Vec<u8> {
        self.server_at(flags, self.sseq, payload)
    }

    fn server_at(&self, flags: &str, seq: u32, payload: &[u8]) -> Vec<u8> {
        let b = PacketBuilder::ipv4(LOCAL, PEER_A, 64).tcp(self.port, self.sport, seq, 64_000);
        build(b, flags, self.cseq, payload)
    }

    /// Sends `payload` from the client in one segment.
    fn send(&mut self, e: &Enforcer, payload: &[u8], emit: &mut Emit) -> Verdict {
        let pkt = self.client("A", payload);
        let v = e.inbound(&sender(A), &pkt, t(10), WALL, emit);
        self.cseq += payload.len() as u32;
        v
    }
}

/// Finishes a TCP segment: `flags` from "SAFR" (ACK acknowledges `ack`).
fn build(
    mut b: etherparse::PacketBuilderStep<etherparse::TcpHeader>,
    flags: &str,
    ack: u32,
    payload: &[u8],
) -> Vec<u8> {
    if flags.contains('S') {
        b = b.syn();
    }
    if flags.contains('A') {
        b = b.ack(ack);
    }
    if flags.contains('F') {
        b = b.fin();
    }
    if flags.contains('R') {
        b = b.rst();
    }
    let mut out = Vec::new();
    b.write(&mut out, payload).unwrap();
    out
}

/// Every emitted TCP segment: where it goes, from which port, its flags ("SAFR"
/// letters), sequence and acknowledgement numbers, and payload length.
fn segments(emit: &Emit) -> Vec<(Toward, u16, String, u32, u32, usize)> {
    emit.packets()
        .map(|(t, pkt)| {
            let sliced = etherparse::SlicedPacket::from_ip(pkt).expect("emitted packet parses");
            let Some(etherparse::TransportSlice::Tcp(tcp)) = sliced.transport else {
                panic!("not TCP");
            };
            let mut flags = String::new();
            for (on, c) in [
                (tcp.syn(), 'S'),
                (tcp.ack(), 'A'),
                (tcp.fin(), 'F'),
                (tcp.rst(), 'R'),
            ] {
                if on {
                    flags.push(c);
                }
            }
            (
                t,
                tcp.source_port(),
                flags,
                tcp.sequence_number(),
                tcp.acknowledgment_number(),
                tcp.payload().len(),
            )
        })
        .collect()
}

fn tcp_payloads(emit: &Emit, toward: Toward) -> Vec<(Vec<u8>, bool)> {
    emit.packets()
        .filter(|(t, _)| *t == toward)
        .map(|(_, pkt)| {
            let sliced = etherparse::SlicedPacket::from_ip(pkt).expect("emitted packet parses");
            match sliced.transport {
                Some(etherparse::TransportSlice::Tcp(tcp)) => (tcp.payload().to_vec(), tcp.rst()),
                other => panic!("not TCP: {other:?}"),
            }
        })
        .collect()
}

#[test]
fn l7_allowed_request_is_forwarded_unchanged() {
    let (e, _) = enforcer(API_POLICY, 1024);
    let mut c = Conn::open(&e, 40000);
    let mut emit = Emit::default();
    let v = c.send(&e, b"GET /api/items HTTP/1.1\r\nHost: c\r\n\r\n", &mut emit);
    assert_eq!(v, Verdict::Deliver);
    assert!(emit.is_empty());
    let counters = e.counters();
    assert_eq!(counters.http_requests, 1);
    assert_eq!(counters.l7_flows, 1);
}

#[test]
fn l7_denied_request_is_answered_403_and_server_reset() {
    let (e, log) = enforcer(API_POLICY, 1024);
    let mut c = Conn::open(&e, 40000);
    let mut emit = Emit::default();
    let v = c.send(
        &e,
        b"POST /api/items HTTP/1.1\r\nHost: c\r\ncontent-length: 0\r\n\r\n",
        &mut emit,
    );
    // The request never reaches the server.
    assert_ne!(v, Verdict::Deliver);
    let to_client = tcp_payloads(&emit, Toward::Peer);
    assert_eq!(to_client.len(), 1);
    let text = String::from_utf8_lossy(&to_client[0].0);
    assert!(text.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{text}");
    assert!(text.contains("connection: close"));
    let to_server = tcp_payloads(&emit, Toward::Local);
    assert_eq!(
        to_server,
        vec![(vec![], true)],
        "only a reset reaches the server"
    );
    let rec: serde_json::Value = serde_json::from_str(&log.tail(1)[0]).unwrap();
    assert_eq!(rec["decision"], "deny");
    assert_eq!(rec["reason"], "no_allow_matched");
    assert_eq!(rec["http"]["method"], "POST");
    assert_eq!(rec["http"]["path"], "/api/items");
    assert_eq!(rec["http"]["status"], 403);
}

#[test]
fn l7_second_request_on_keep_alive_is_decided_too() {
    let (e, log) = enforcer(API_POLICY, 1024);
    let mut c = Conn::open(&e, 40000);
    let mut emit = Emit::default();
    assert_eq!(
        c.send(&e, b"GET /api/a HTTP/1.1\r\nHost: c\r\n\r\n", &mut emit),
        Verdict::Deliver
    );
    emit.clear();
    c.send(&e, b"GET /admin HTTP/1.1\r\nHost: c\r\n\r\n", &mut emit);
    let to_client = tcp_payloads(&emit, Toward::Peer);
    assert!(String::from_utf8_lossy(&to_client[0].0).starts_with("HTTP/1.1 403"));
    assert!(log.tail(1)[0].contains("\"/admin\""));
}

#[test]
fn l7_path_tricks_are_decided_on_the_normalised_path() {
    let (e, log) = enforcer(API_POLICY, 1024);
    for (i, target) in ["/api/../admin", "//api/../admin", "/api/%2e%2e/admin"]
        .iter()
        .enumerate()
    {
        let mut c = Conn::open(&e, 41000 + i as u16);
        let mut emit = Emit::default();
        let req = format!("GET {target} HTTP/1.1\r\nHost: c\r\n\r\n");
        assert_ne!(
            c.send(&e, req.as_bytes(), &mut emit),
            Verdict::Deliver,
            "{target}"
        );
        assert!(
            log.tail(1)[0].contains("\"path\":\"/admin\""),
            "{target}: {}",
            log.tail(1)[0]
        );
    }
    // An encoded slash is refused as malformed (400), whatever the rules say.
    let mut c = Conn::open(&e, 42000);
    let mut emit = Emit::default();
    c.send(
        &e,
        b"GET /api%2F..%2Fadmin HTTP/1.1\r\nHost: c\r\n\r\n",
        &mut emit,
    );
    let to_client = tcp_payloads(&emit, Toward::Peer);
    assert!(String::from_utf8_lossy(&to_client[0].0).starts_with("HTTP/1.1 400"));
}

#[test]
fn l7_non_http_bytes_are_refused_400() {
    let (e, log) = enforcer(API_POLICY, 1024);
    let mut c = Conn::open(&e, 40000);
    let mut emit = Emit::default();
    c.send(
        &e,
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 hello tls\r\n\r\n",
        &mut emit,
    );
    let to_client = tcp_payloads(&emit, Toward::Peer);
    assert!(String::from_utf8_lossy(&to_client[0].0).starts_with("HTTP/1.1 400"));
    assert!(
        log.tail(1)[0].contains("\"reason\":\"not_http\""),
        "{}",
        log.tail(1)[0]
    );
}

#[test]
fn l7_split_head_is_held_then_released_in_order() {
    let (e, _) = enforcer(API_POLICY, 1024);
    let mut c = Conn::open(&e, 40000);
    let mut emit = Emit::default();
    assert_eq!(c.send(&e, b"GET /api/ite", &mut emit), Verdict::Consumed);
    assert!(
        tcp_payloads(&emit, Toward::Local).is_empty(),
        "nothing of an undecided head is delivered"
    );
    // The held bytes are acknowledged to the client on the server's behalf (a pure
    // ACK, l7::HeldAck), so the client keeps sending.
    assert_eq!(
        tcp_payloads(&emit, Toward::Peer),
        vec![(Vec::new(), false)],
        "one pure ACK to the client"
    );
    let mut emit = Emit::default();
    assert_eq!(
        c.send(&e, b"ms HTTP/1.1\r\nHost: c\r\n\r\n", &mut emit),
        Verdict::Consumed
    );
    let released: Vec<u8> = tcp_payloads(&emit, Toward::Local)
        .into_iter()
        .flat_map(|(p, _)| p)
        .collect();
    assert_eq!(released, b"GET /api/items HTTP/1.1\r\nHost: c\r\n\r\n");
}

#[test]
fn l7_incomplete_head_times_out_with_408() {
    let (e, log) = enforcer(API_POLICY, 1024);
    let mut c = Conn::open(&e, 40000);
    let mut emit = Emit::default();
    c.send(&e, b"GET /api/items HTTP/1.1\r\n", &mut emit);
    assert!(tcp_payloads(&emit, Toward::Local).is_empty());
    let mut emit = Emit::default();
    e.poll(t(10) + Duration::from_secs(11), WALL, &mut emit);
    let to_client = tcp_payloads(&emit, Toward::Peer);
    assert!(String::from_utf8_lossy(&to_client[0].0).starts_with("HTTP/1.1 408"));
    assert!(log.tail(1)[0].contains("request_timeout"));
}

/// A delivered request lost before the server read it (client retransmissions the
/// server never acknowledges): after `LOST_AFTER` of them the client gets 502, the
/// server a reset at the point it acknowledged, and the log says `delivery_lost`.
#[test]
fn l7_request_lost_before_the_server_ends_in_502_not_a_stall() {
    let (e, log) = enforcer(API_POLICY, 1024);
    let mut c = Conn::open(&e, 40000);
    let mut emit = Emit::default();
    let get = b"GET /api/items HTTP/1.1\r\nHost: c\r\n\r\n";
    assert_eq!(c.send(&e, get, &mut emit), Verdict::Deliver);
    assert_eq!(outbound(&e, &c.server("A", b""), t(10)), Verdict::Deliver);
    let lost_at = c.cseq;
    assert_eq!(c.send(&e, get, &mut emit), Verdict::Deliver);
    for k in 1..=crate::enforce::l7::LOST_AFTER {
        c.cseq = lost_at;
        emit.clear();
        // At the client's retransmission timer: a burst would be one event.
        let pkt = c.client("A", get);
        let v = e.inbound(
            &sender(A),
            &pkt,
            t(10 + 200 * u64::from(k)),
            WALL,
            &mut emit,
        );
        if k < crate::enforce::l7::LOST_AFTER {
            assert_eq!(v, Verdict::Consumed, "retransmission {k}: cut to an ACK");
            let to_server = tcp_payloads(&emit, Toward::Local);
            assert_eq!(to_server, vec![(vec![], false)], "retransmission {k}");
        }
    }
    let to_client = tcp_payloads(&emit, Toward::Peer);
    let text = String::from_utf8_lossy(&to_client[0].0);
    assert!(text.starts_with("HTTP/1.1 502 Bad Gateway\r\n"), "{text}");
    let resets: Vec<u32> = emit
        .packets()
        .filter(|(t, _)| *t == Toward::Local)
        .filter_map(
            |(_, pkt)| match etherparse::SlicedPacket::from_ip(pkt).ok()?.transport {
                Some(etherparse::TransportSlice::Tcp(tcp)) if tcp.rst() => {
                    Some(tcp.sequence_number())
                }
                _ => None,
            },
        )
        .collect();
    assert_eq!(
        resets,
        vec![lost_at],
        "the reset goes where the server stopped"
    );
    let rec: serde_json::Value = serde_json::from_str(&log.tail(1)[0]).unwrap();
    assert_eq!(rec["reason"], "delivery_lost");
    assert_eq!(rec["http"]["status"], 502);
    assert_eq!(e.counters().drops.get("delivery_lost"), Some(&1));
}

#[test]
fn l7_segment_with_bad_checksum_is_dropped() {
    let (e, _) = enforcer(API_POLICY, 1024);
    let c = Conn::open(&e, 40000);
    let mut pkt = c.client("A", b"GET /api/items HTTP/1.1\r\nHost: c\r\n\r\n");
    let last = pkt.len() - 1;
    pkt[last] ^= 0x20;
    let v = e.inbound(&sender(A), &pkt, t(10), WALL, &mut Emit::default());
    assert_eq!(v, Verdict::Drop(DropReason::Checksum));
}

#[test]
fn l7_mid_stream_without_handshake_fails_closed() {
    let (e, _) = enforcer(API_POLICY, 1024);
    let c = Conn {
        sport: 40000,
        port: 80,
        cseq: 1,
        sseq: 1,
    };
    let pkt = c.client("A", b"GET /api/items HTTP/1.1\r\nHost: c\r\n\r\n");
    let mut emit = Emit::default();
    let v = e.inbound(&sender(A), &pkt, t(0), WALL, &mut emit);
    assert_eq!(v, Verdict::Drop(DropReason::Untracked));
    // Both ends are reset so that they reconnect at once (a flow from before a restart
    // would otherwise hang until its timeouts): each RST at the number its receiver
    // expects; nothing of the segment is delivered. The local end also gets an empty
    // segment just before that number, which it answers with an ACK if the reset was
    // old (see `untracked_resets`).
    let rsts: Vec<(Toward, u32, bool, usize)> = emit
        .packets()
        .map(
            |(t, p)| match etherparse::SlicedPacket::from_ip(p).unwrap().transport {
                Some(etherparse::TransportSlice::Tcp(tcp)) => {
                    (t, tcp.sequence_number(), tcp.rst(), tcp.payload().len())
                }
                _ => panic!("not TCP"),
            },
        )
        .collect();
    assert_eq!(
        rsts,
        vec![
            (Toward::Peer, c.sseq, true, 0),
            (Toward::Local, c.cseq, true, 0),
            (Toward::Local, c.cseq - 1, false, 0)
        ]
    );
    // A RST is never answered.
    let mut emit = Emit::default();
    let rst = {
        let mut out = Vec::new();
        PacketBuilder::ipv4(PEER_A, LOCAL, 64)
            .tcp(40000, 80, 1, 0)
            .rst()
            .ack(1)
            .write(&mut out, b"")
            .unwrap();
        out
    };
    e.inbound(&sender(A), &rst, t(0), WALL, &mut emit);
    assert!(emit.is_empty());
}

#[test]
fn l7_flow_is_cut_when_the_new_policy_refuses_every_request() {
    // Regression (netns test l7.rs, upload in progress): an inspected flow streaming
    // an allowed request's body was left open by a policy that denies its source
    // outright, until its next request head.
    let (e, log) = enforcer(API_POLICY, 1024);
    let mut c = Conn::open(&e, 40000);
    let mut emit = Emit::default();
    let get = b"GET /api/items HTTP/1.1\r\nHost: c\r\n\r\n";
    assert_eq!(c.send(&e, get, &mut emit), Verdict::Deliver);
    // A policy that still lets a GET: the open flow stays, requests decide.
    let still = format!("{API_POLICY}\n[[policy]]\nname = \"no-admin\"\naction = \"deny\"\n[[policy.rule]]\nto = [{{ ports = [80], paths = [\"/admin\"] }}]\n");
    let cuts = e.set_policy(compiled(&still, DefaultAction::Deny), t(11), WALL);
    assert!(cuts.is_empty(), "{}", cuts.len());
    // A policy that denies a whatever it asks: cut now.
    let quarantine = format!("{still}\n[[policy]]\nname = \"quarantine\"\naction = \"deny\"\n[[policy.rule]]\nfrom = [{{ identities = [\"spiffe://t/a\"] }}]\n");
    let cuts = e.set_policy(compiled(&quarantine, DefaultAction::Deny), t(12), WALL);
    assert_eq!(cuts.len(), 1);
    assert_eq!(cuts[0].key.dst_port, 80);
    assert!(log.tail(1)[0].contains("quarantine"), "{}", log.tail(1)[0]);
    // The flow is gone: further segments of it fail closed.
    let v = c.send(&e, b"more body", &mut Emit::default());
    assert_ne!(v, Verdict::Deliver);
}

#[test]
fn cut_of_an_l7_flow_resets_the_server_at_what_it_received() {
    // Regression (netns test l7.rs, partial head): the reset towards the server carried
    // the client's next sequence number, held bytes included; Linux answers such a RST
    // with a challenge ACK and the server's connection stayed open.
    let (e, _) = enforcer(API_POLICY, 1024);
    let mut c = Conn::open(&e, 40000);
    let start = c.cseq;
    let mut emit = Emit::default();
    assert_eq!(c.send(&e, b"GET /api/ite", &mut emit), Verdict::Consumed);
    let quarantine = format!("{API_POLICY}\n[[policy]]\nname = \"q\"\naction = \"deny\"\n[[policy.rule]]\nfrom = [{{ identities = [\"spiffe://t/a\"] }}]\n");
    let cuts = e.set_policy(compiled(&quarantine, DefaultAction::Deny), t(12), WALL);
    assert_eq!(cuts.len(), 1);
    assert_eq!(
        cuts[0].client_next_seq,
        Some(start),
        "held bytes never reached it"
    );
    assert_eq!(cuts[0].server_next_seq, Some(c.sseq));
}

/// Two workloads of one host (as `peers::from_tun` hands them over): the flow is
/// decided as inbound traffic of its receiver with the sender's identity; replies
/// pass as the receiver's answers; the other direction is decided on its own; the
/// decision log names the receiving workload as `dst`.
#[test]
fn same_host_flows_are_decided_for_the_receiving_workload() {
    const PA: [u8; 4] = [100, 65, 1, 1];
    const PB: [u8; 4] = [100, 65, 1, 2];
    let src = r#"
[[policy]]
name = "pb-from-pa"
action = "allow"
selector = { identities = ["spiffe://t/pb"] }
[[policy.rule]]
from = [{ identities = ["spiffe://t/pa"] }]
to = [{ ports = [8080] }]
"#;
    let (e, log) = enforcer(src, 1024);
    let workload = |id: &str| LocalWorkload {
        identity: Some(id.into()),
        groups: Arc::from(Vec::new()),
    };
    let (pa, pb) = (workload("spiffe://t/pa"), workload("spiffe://t/pb"));
    let (spa, spb) = (sender("spiffe://t/pa"), sender("spiffe://t/pb"));
    let mut emit = Emit::default();
    let syn = tcp(PA, PB, 40000, 8080, "S", 1, b"");
    assert_eq!(
        e.between_locals(&spa, &pb, &syn, t(0), WALL, &mut emit),
        Verdict::Deliver
    );
    let syn_ack = tcp(PB, PA, 8080, 40000, "SA", 9, b"");
    assert_eq!(
        e.between_locals(&spb, &pa, &syn_ack, t(1), WALL, &mut emit),
        Verdict::Deliver
    );
    let ack = tcp(PA, PB, 40000, 8080, "A", 2, b"");
    assert_eq!(
        e.between_locals(&spa, &pb, &ack, t(2), WALL, &mut emit),
        Verdict::Deliver
    );
    // pb opening a flow to pa is pa's to decide: no policy selects pa, so the
    // mesh default (deny) decides.
    let back = tcp(PB, PA, 40001, 8080, "S", 1, b"");
    assert_eq!(
        e.between_locals(&spb, &pa, &back, t(3), WALL, &mut emit),
        denied(DenyReason::DefaultDeny)
    );
    let rec: serde_json::Value = serde_json::from_str(&log.tail(1)[0]).unwrap();
    assert_eq!(rec["src"], "spiffe://t/pb");
    assert_eq!(rec["dst"], "spiffe://t/pa");
    assert!(emit.is_empty());
}

#[test]
fn l7_total_held_budget_sheds_the_flow_that_grows() {
    let log = Arc::new(DecisionLog::new(Default::default()));
    let e = Enforcer::new(
        LocalWorkload {
            identity: Some("spiffe://t/c".into()),
            groups: Arc::from(Vec::new()),
        },
        compiled(API_POLICY, DefaultAction::Deny),
        Limits {
            l7_total_held: 100,
            ..Limits::default()
        },
        log.clone(),
    );
    // Two slow heads of 60 bytes each: the first fits the 100-byte budget...
    let mut a = Conn::open(&e, 40000);
    let mut emit = Emit::default();
    a.send(&e, &[b'G'; 1][..], &mut emit);
    a.send(
        &e,
        b"ET /api/items HTTP/1.1\r\nHost: c\r\nX-Pad: aaaaaaaaaaaaaaaaaaaa",
        &mut emit,
    );
    assert!(
        tcp_payloads(&emit, Toward::Peer)
            .iter()
            .all(|(p, _)| p.is_empty()),
        "no refusal yet"
    );
    // ...the second takes the total over it: that flow is refused with 503, not the first.
    let mut b = Conn::open(&e, 40001);
    let mut emit = Emit::default();
    b.send(
        &e,
        b"GET /api/items HTTP/1.1\r\nHost: c\r\nX-Pad: bbbbbbbbbbbbbbbbbbbbbbbbbbbbbb",
        &mut emit,
    );
    let to_client = tcp_payloads(&emit, Toward::Peer);
    assert!(
        to_client
            .iter()
            .any(|(p, _)| p.starts_with(b"HTTP/1.1 503")),
        "{to_client:?}"
    );
    assert!(log.tail(1)[0].contains("buffer_full"));
    // The first flow still completes its head and is allowed.
    let mut emit = Emit::default();
    a.send(&e, b"\r\n\r\n", &mut emit);
    let released: Vec<u8> = tcp_payloads(&emit, Toward::Local)
        .into_iter()
        .flat_map(|(p, _)| p)
        .collect();
    assert!(
        released.starts_with(b"GET /api/items"),
        "{:?}",
        String::from_utf8_lossy(&released)
    );
}

// ---- Flow state: who opened a flow, RSTs and FINs in the window (issue 18.2) -------

const GET_ITEMS: &[u8] = b"GET /api/items HTTP/1.1\r\nHost: c\r\n\r\n";
const GET_ADMIN: &[u8] = b"GET /admin HTTP/1.1\r\nHost: c\r\n\r\n";

/// No emitted packet towards the local workload carries a byte of payload.
fn nothing_delivered(emit: &Emit) -> bool {
    segments(emit)
        .iter()
        .all(|(t, _, _, _, _, len)| *t != Toward::Local || *len == 0)
}

/// Regression (issue 18.2): conntrack took a client's RST far outside the window and
/// ended the inspected flow, the first step of getting in uninspected.
#[test]
fn rst_outside_the_window_is_not_taken() {
    let (e, _) = enforcer(API_POLICY, 1024);
    let mut c = Conn::open(&e, 40000);
    let mut emit = Emit::default();
    let bogus = c.client_at("R", c.cseq.wrapping_add(1 << 30), b"");
    assert_eq!(
        e.inbound(&sender(A), &bogus, t(1), WALL, &mut emit),
        Verdict::Drop(DropReason::OutOfWindow)
    );
    assert!(emit.is_empty(), "nothing answers a RST outside the window");
    // The flow is still there and still inspected.
    assert_eq!(c.send(&e, GET_ITEMS, &mut emit), Verdict::Deliver);
    assert_ne!(c.send(&e, GET_ADMIN, &mut emit), Verdict::Deliver);
    assert!(tcp_payloads(&emit, Toward::Peer)[0]
        .0
        .starts_with(b"HTTP/1.1 403"));
    assert_eq!(e.counters().drops.get("out_of_window"), Some(&1));
}

/// RFC 5961 §3.2: a RST inside the window but not at the number the server expects
/// is not taken; its sender gets the challenge ACK the server would send (the
/// server's next sequence number, acknowledging what it has). Only an exact RST ends
/// the flow.
#[test]
fn rst_in_the_window_gets_a_challenge_ack_and_only_an_exact_one_ends_the_flow() {
    let (e, _) = enforcer(API_POLICY, 1024);
    let mut c = Conn::open(&e, 40000);
    let mut emit = Emit::default();
    assert_eq!(c.send(&e, GET_ITEMS, &mut emit), Verdict::Deliver);
    assert_eq!(
        outbound(&e, &c.server("A", b""), t(10)),
        Verdict::Deliver,
        "the server acknowledges the request"
    );
    let near = c.client_at("R", c.cseq + 100, b"");
    let mut emit = Emit::default();
    assert_eq!(
        e.inbound(&sender(A), &near, t(11), WALL, &mut emit),
        Verdict::Drop(DropReason::OutOfWindow)
    );
    assert_eq!(
        segments(&emit),
        vec![(Toward::Peer, 80, "A".to_string(), c.sseq, c.cseq, 0)]
    );
    assert_eq!(
        c.send(&e, GET_ITEMS, &mut Emit::default()),
        Verdict::Deliver
    );
    // The exact one passes and ends the flow.
    let exact = c.client("R", b"");
    let mut emit = Emit::default();
    assert_eq!(
        e.inbound(&sender(A), &exact, t(12), WALL, &mut emit),
        Verdict::Deliver
    );
    assert!(emit.is_empty());
    assert_ne!(
        c.send(&e, GET_ITEMS, &mut Emit::default()),
        Verdict::Deliver
    );
}

/// A server's RST is held to the same rule (outbound), and a RST refusing a SYN is
/// taken only if it acknowledges the SYN (RFC 9293 §3.10.7.3).
#[test]
fn server_resets_are_checked_too() {
    let (e, _) = enforcer(ALLOW_A_8080, 1024);
    let syn = tcp(PEER_A, LOCAL, 40000, 8080, "S", 100, b"");
    assert_eq!(
        e.inbound(&sender(A), &syn, t(0), WALL, &mut Emit::default()),
        Verdict::Deliver
    );
    let c = Conn {
        sport: 40000,
        port: 8080,
        cseq: 101,
        sseq: 0,
    };
    // Without ACK, or acknowledging something else: not taken.
    assert_eq!(
        outbound(&e, &c.server_at("R", 0, b""), t(1)),
        Verdict::Drop(DropReason::OutOfWindow)
    );
    let wrong = Conn { cseq: 5, ..c };
    assert_eq!(
        outbound(&e, &wrong.server_at("RA", 0, b""), t(1)),
        Verdict::Drop(DropReason::OutOfWindow)
    );
    // RST+ACK of the SYN (a closed port): taken.
    assert_eq!(
        outbound(&e, &c.server_at("RA", 0, b""), t(1)),
        Verdict::Deliver
    );
}

/// A FIN far outside the window is not taken (it would start the closing timeout of
/// a flow that is not closing); one in the window is.
#[test]
fn fin_outside_the_window_is_not_taken() {
    let (e, _) = enforcer(ALLOW_A_8080, 1024);
    let mut c = Conn::open_to(&e, 40000, 8080);
    let far = c.client_at("FA", c.cseq.wrapping_add(1 << 30), b"");
    assert_eq!(
        e.inbound(&sender(A), &far, t(1), WALL, &mut Emit::default()),
        Verdict::Drop(DropReason::OutOfWindow)
    );
    let fin = c.client("FA", b"");
    assert_eq!(
        e.inbound(&sender(A), &fin, t(1), WALL, &mut Emit::default()),
        Verdict::Deliver
    );
    c.cseq += 1;
    assert_eq!(outbound(&e, &c.server("FA", b""), t(2)), Verdict::Deliver);
}

/// Regression (issue 18.2): a local packet of no flow that is not an opening (the
/// server's retransmitted SYN-ACK, data, a FIN) made the flow the local side's, and
/// every later packet from the peer passed as a reply, with neither policy nor
/// inspection. Now it creates nothing, is answered with resets to both ends, and the
/// peer's packets are decided as new inbound packets.
#[test]
fn only_an_opening_makes_a_flow_the_local_sides() {
    let (e, _) = enforcer(NO_POLICIES, 1024);
    for (flags, payload) in [("SA", &b""[..]), ("A", b"data"), ("FA", b"")] {
        let mut emit = Emit::default();
        let pkt = tcp(LOCAL, PEER_A, 80, 40000, flags, 7, payload);
        assert_eq!(
            e.outbound(Some(&A.into()), &pkt, t(0), &mut emit),
            Verdict::Drop(DropReason::Untracked),
            "{flags}"
        );
        // The local end is reset at the number it acknowledged, the peer at the
        // segment's own, and probed just before it (should that number be old, its
        // ACK gets the exact reset).
        assert_eq!(
            segments(&emit),
            vec![
                (Toward::Local, 40000, "R".to_string(), 1, 0, 0),
                (Toward::Peer, 80, "R".to_string(), 7, 0, 0),
                (Toward::Peer, 80, "A".to_string(), 6, 1, 0),
            ],
            "{flags}"
        );
    }
    assert_eq!(e.counters().flows, 0);
    let mut emit = Emit::default();
    let get = tcp(
        PEER_A,
        LOCAL,
        40000,
        80,
        "A",
        1,
        b"GET /admin HTTP/1.1\r\n\r\n",
    );
    assert_eq!(
        e.inbound(&sender(A), &get, t(1), WALL, &mut emit),
        denied(DenyReason::DefaultDeny)
    );
    assert!(nothing_delivered(&emit));
    // An ICMP echo reply is no opening either; a request is.
    let echo = |req: bool, src, dst| {
        let b = PacketBuilder::ipv4(src, dst, 64);
        let b = if req {
            b.icmpv4_echo_request(9, 1)
        } else {
            b.icmpv4_echo_reply(9, 1)
        };
        let mut out = Vec::new();
        b.write(&mut out, b"ping").unwrap();
        out
    };
    assert_eq!(
        outbound(&e, &echo(false, LOCAL, PEER_A), t(2)),
        Verdict::Drop(DropReason::Untracked)
    );
    assert_eq!(
        e.inbound(
            &sender(A),
            &echo(true, PEER_A, LOCAL),
            t(2),
            WALL,
            &mut emit
        ),
        denied(DenyReason::DefaultDeny)
    );
    // A SYN going out opens a flow; its answer comes in.
    let syn = tcp(LOCAL, PEER_A, 50000, 80, "S", 1, b"");
    assert_eq!(outbound(&e, &syn, t(3)), Verdict::Deliver);
    let syn_ack = tcp(PEER_A, LOCAL, 80, 50000, "SA", 1, b"");
    assert_eq!(
        e.inbound(&sender(A), &syn_ack, t(3), WALL, &mut Emit::default()),
        Verdict::Deliver
    );
}

/// Regression (issue 18.2, "the same path opens after an established flow's idle
/// timeout"): once an inspected flow has expired, the server's next segment does not
/// make it the server's own, and the client's next request is refused mid-stream.
#[test]
fn an_expired_inspected_flow_is_not_reopened_by_the_server() {
    let (e, _) = enforcer(API_POLICY, 1024);
    let mut c = Conn::open(&e, 40000);
    assert_eq!(
        c.send(&e, GET_ITEMS, &mut Emit::default()),
        Verdict::Deliver
    );
    let later = t(10) + Timeouts::default().tcp_established + Duration::from_secs(1);
    let mut emit = Emit::default();
    assert_eq!(
        e.outbound(Some(&A.into()), &c.server("A", b"late"), later, &mut emit),
        Verdict::Drop(DropReason::Untracked)
    );
    let mut emit = Emit::default();
    let admin = c.client("A", GET_ADMIN);
    assert_eq!(
        e.inbound(&sender(A), &admin, later, WALL, &mut emit),
        Verdict::Drop(DropReason::Untracked)
    );
    assert!(nothing_delivered(&emit));
}

/// Regression (issue 18.2): after a restart, a server that speaks first on an
/// inspected port was recorded as the opener, and `/admin` went through uninspected.
#[test]
fn after_a_restart_a_server_speaking_first_opens_nothing() {
    let (e, _) = enforcer(API_POLICY, 1024);
    let c = Conn {
        sport: 40000,
        port: 80,
        cseq: 1000,
        sseq: 5000,
    };
    let mut emit = Emit::default();
    assert_eq!(
        e.outbound(
            Some(&A.into()),
            &c.server("A", b"220 ready\r\n"),
            t(0),
            &mut emit
        ),
        Verdict::Drop(DropReason::Untracked)
    );
    let mut emit = Emit::default();
    assert_eq!(
        e.inbound(&sender(A), &c.client("A", GET_ADMIN), t(1), WALL, &mut emit),
        Verdict::Drop(DropReason::Untracked)
    );
    assert!(nothing_delivered(&emit));
    assert_eq!(e.counters().flows, 0);
}

// ---- Cuts hold (issue 18.3) ------------------------------------------------------------

fn udp_from(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ipv4(src, dst, 64)
        .udp(sport, dport)
        .write(&mut out, payload)
        .unwrap();
    out
}

/// Regression (issue 18.3): after `policy apply` revoked a UDP flow whose server kept
/// sending, the server's next datagram reopened the flow as the local side's and the
/// client's datagrams kept arriving. The cut flow stays cut in both directions until
/// policy allows a new opening.
#[test]
fn a_cut_udp_flow_stays_cut_both_ways_until_policy_allows_it_again() {
    let (e, _) = enforcer(ALLOW_A_8080, 1024);
    let from_client = udp_from(PEER_A, LOCAL, 5000, 8080, b"ping");
    let from_server = udp_from(LOCAL, PEER_A, 8080, 5000, b"pong");
    let inbound = |pkt: &[u8], ms| e.inbound(&sender(A), pkt, t(ms), WALL, &mut Emit::default());
    assert_eq!(inbound(&from_client, 0), Verdict::Deliver);
    assert_eq!(outbound(&e, &from_server, t(1)), Verdict::Deliver);
    let cuts = e.set_policy(compiled(NO_POLICIES, DefaultAction::Deny), t(2), WALL);
    assert_eq!(cuts.len(), 1);
    let mut emit = Emit::default();
    cuts[0].resets(&mut emit);
    assert!(emit.is_empty(), "no connection to reset for UDP");
    // The server keeps sending, the client too: nothing passes, for as long as the
    // server keeps at it.
    for ms in (3..200_000).step_by(20_000) {
        assert_ne!(outbound(&e, &from_server, t(ms)), Verdict::Deliver, "{ms}");
        assert_ne!(inbound(&from_client, ms + 1), Verdict::Deliver, "{ms}");
    }
    let c = e.counters();
    assert_eq!((c.flows, c.flows_cut), (0, 1));
    // Policy allows the client again: its next datagram is a new opening.
    e.set_policy(
        compiled(ALLOW_A_8080, DefaultAction::Deny),
        t(200_000),
        WALL,
    );
    assert_eq!(inbound(&from_client, 200_001), Verdict::Deliver);
    assert_eq!(outbound(&e, &from_server, t(200_002)), Verdict::Deliver);
    let c = e.counters();
    assert_eq!((c.flows, c.flows_cut), (1, 0));
}

/// A cut TCP flow stays cut: the server's retransmissions and the client's segments
/// are refused, and nothing re-creates the flow; the tombstone leaves the table after
/// the closing timeout.
#[test]
fn a_cut_tcp_flow_stays_cut_and_its_tombstone_expires() {
    let (e, _) = enforcer(ALLOW_A_8080, 1024);
    let mut c = Conn::open_to(&e, 40000, 8080);
    assert_eq!(c.send(&e, b"hello", &mut Emit::default()), Verdict::Deliver);
    let cuts = e.set_policy(compiled(NO_POLICIES, DefaultAction::Deny), t(20), WALL);
    assert_eq!(cuts.len(), 1);
    for pkt in [c.server("SA", b""), c.server("A", b"late data")] {
        assert_ne!(outbound(&e, &pkt, t(21)), Verdict::Deliver);
    }
    let mut emit = Emit::default();
    let more = c.client("A", b"more");
    assert_eq!(
        e.inbound(&sender(A), &more, t(22), WALL, &mut emit),
        denied(DenyReason::DefaultDeny)
    );
    assert!(nothing_delivered(&emit));
    assert_eq!(e.counters().flows_cut, 1);
    let later = t(22) + Timeouts::default().tcp_closing + Duration::from_secs(1);
    e.poll(later, WALL, &mut Emit::default());
    assert_eq!(e.counters().flows_cut, 0);
}

/// Regression (issue 18.3): a TCP cut right after the client's keepalive probe (one
/// byte before its next sequence number) reset the server one too low; Linux ignored
/// it and the flow went on. The reset carries the client's next number whatever its
/// last segment was.
#[test]
fn a_cut_after_a_keepalive_probe_resets_at_the_next_sequence_number() {
    let (e, _) = enforcer(ALLOW_A_8080, 1024);
    let mut c = Conn::open_to(&e, 40000, 8080);
    assert_eq!(c.send(&e, b"hello", &mut Emit::default()), Verdict::Deliver);
    assert_eq!(outbound(&e, &c.server("A", b""), t(11)), Verdict::Deliver);
    let probe = c.client_at("A", c.cseq - 1, b"");
    assert_eq!(
        e.inbound(&sender(A), &probe, t(12), WALL, &mut Emit::default()),
        Verdict::Deliver
    );
    assert_eq!(outbound(&e, &c.server("A", b""), t(12)), Verdict::Deliver);
    let cuts = e.set_policy(compiled(NO_POLICIES, DefaultAction::Deny), t(13), WALL);
    let mut emit = Emit::default();
    cuts[0].resets(&mut emit);
    assert_eq!(
        segments(&emit),
        vec![
            (Toward::Local, 40000, "R".to_string(), c.cseq, 0, 0),
            (Toward::Peer, 8080, "R".to_string(), c.sseq, 0, 0)
        ]
    );
}

/// While bytes are on their way, the receiver expects what it acknowledged, not the
/// sender's next number: a reset goes at each.
#[test]
fn a_cut_with_bytes_in_flight_resets_at_both_candidates() {
    let (e, _) = enforcer(ALLOW_A_8080, 1024);
    let mut c = Conn::open_to(&e, 40000, 8080);
    let acked = c.cseq;
    assert_eq!(
        c.send(&e, b"in flight", &mut Emit::default()),
        Verdict::Deliver
    );
    let cuts = e.set_policy(compiled(NO_POLICIES, DefaultAction::Deny), t(13), WALL);
    assert_eq!(cuts[0].client_next_seq, Some(c.cseq));
    assert_eq!(cuts[0].client_acked_seq, Some(acked));
    let mut emit = Emit::default();
    cuts[0].resets(&mut emit);
    let to_server: Vec<u32> = segments(&emit)
        .into_iter()
        .filter(|s| s.0 == Toward::Local)
        .map(|s| s.3)
        .collect();
    assert_eq!(to_server, vec![c.cseq, acked]);
}

// ---- Flows bound to the identity at their far end (issue 18.5) ---------------------

/// Regression (issue 18.5): a peer whose certificate's prefix overlapped another
/// peer's addresses wrote into that peer's open, allowed connection, while its own SYN
/// to the same port was denied. A flow a peer opened takes packets from that identity
/// only.
#[test]
fn a_flow_a_peer_opened_takes_packets_from_that_identity_only() {
    let (e, _) = enforcer(ALLOW_A_8080, 1024);
    let mut c = Conn::open_to(&e, 40000, 8080);
    let intruder = sender(B);
    let mut emit = Emit::default();
    // Same addresses and ports, the right sequence numbers: another identity.
    let pkt = c.client("A", b"injected");
    assert_eq!(
        e.inbound(&intruder, &pkt, t(1), WALL, &mut emit),
        Verdict::Drop(DropReason::WrongPeer)
    );
    let rst = c.client("R", b"");
    assert_eq!(
        e.inbound(&intruder, &rst, t(1), WALL, &mut emit),
        Verdict::Drop(DropReason::WrongPeer)
    );
    assert!(emit.is_empty());
    // Its own connection is decided as its own: refused.
    let syn = tcp(PEER_A, LOCAL, 40001, 8080, "S", 1, b"");
    assert_eq!(
        e.inbound(&intruder, &syn, t(1), WALL, &mut emit),
        denied(DenyReason::NoAllowMatched)
    );
    // The opener's flow goes on untouched.
    assert_eq!(c.send(&e, b"hello", &mut emit), Verdict::Deliver);
    assert_eq!(e.counters().drops.get("wrong_peer"), Some(&2));
    // The server's answers go to the opener only (routing that picked another peer
    // for the address must not hand them over).
    let answer = c.server("A", b"answer");
    assert_eq!(
        e.outbound(Some(&B.into()), &answer, t(2), &mut emit),
        Verdict::Drop(DropReason::WrongPeer)
    );
    assert_eq!(outbound(&e, &answer, t(2)), Verdict::Deliver);
}

/// A flow a local workload opened takes replies only from the peer it went to.
#[test]
fn a_flow_the_local_side_opened_takes_replies_from_its_peer_only() {
    let (e, _) = enforcer(NO_POLICIES, 1024);
    let syn = tcp(LOCAL, PEER_A, 50000, 443, "S", 1, b"");
    assert_eq!(outbound(&e, &syn, t(0)), Verdict::Deliver);
    let syn_ack = tcp(PEER_A, LOCAL, 443, 50000, "SA", 1, b"");
    assert_eq!(
        e.inbound(&sender(B), &syn_ack, t(1), WALL, &mut Emit::default()),
        Verdict::Drop(DropReason::WrongPeer)
    );
    assert_eq!(
        e.inbound(&sender(A), &syn_ack, t(1), WALL, &mut Emit::default()),
        Verdict::Deliver
    );
    // Its own next segments go to that peer only, too.
    let ack = tcp(LOCAL, PEER_A, 50000, 443, "A", 2, b"");
    assert_eq!(
        e.outbound(Some(&B.into()), &ack, t(2), &mut Emit::default()),
        Verdict::Drop(DropReason::WrongPeer)
    );
    assert_eq!(outbound(&e, &ack, t(2)), Verdict::Deliver);
}

// ---- ICMP errors from the far end only (issue 18.6) --------------------------------

const PEER_B: [u8; 4] = [100, 64, 0, 2];

/// An ICMP "fragmentation needed" from `src` to `dst` quoting `quoted`.
fn frag_needed(src: [u8; 4], dst: [u8; 4], quoted: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ipv4(src, dst, 64)
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 552 },
        ))
        .write(&mut out, &quoted[..quoted.len().min(28)])
        .unwrap();
    out
}

/// Regression (issue 18.6): a peer with no ICMP rights sent ICMP errors quoting a flow
/// between two other parties, and they were delivered (the path MTU to a peer dropped
/// to 552 for ten minutes). An error is delivered only from the far end of the flow
/// it quotes, about a packet that went from here to it, with a TCP sequence number
/// sent and not yet acknowledged.
#[test]
fn icmp_errors_pass_only_from_the_far_end_of_the_flow_they_quote() {
    let (e, _) = enforcer(NO_POLICIES, 1024);
    let stray = Verdict::Drop(DropReason::StrayIcmp);
    // The local workload's connection to A: SYN, SYN-ACK, 100 bytes not acknowledged.
    let syn = tcp(LOCAL, PEER_A, 50000, 443, "S", 1000, b"");
    assert_eq!(outbound(&e, &syn, t(0)), Verdict::Deliver);
    let mut syn_ack = Vec::new();
    PacketBuilder::ipv4(PEER_A, LOCAL, 64)
        .tcp(443, 50000, 9000, 64_000)
        .syn()
        .ack(1001)
        .write(&mut syn_ack, b"")
        .unwrap();
    assert_eq!(
        e.inbound(&sender(A), &syn_ack, t(1), WALL, &mut Emit::default()),
        Verdict::Deliver
    );
    let mut data = Vec::new();
    PacketBuilder::ipv4(LOCAL, PEER_A, 64)
        .tcp(50000, 443, 1001, 64_000)
        .ack(9001)
        .write(&mut data, &[0x5a; 100])
        .unwrap();
    assert_eq!(outbound(&e, &data, t(2)), Verdict::Deliver);
    let icmp = |who: &str, src, quoted: &[u8]| {
        e.inbound(
            &sender(who),
            &frag_needed(src, LOCAL, quoted),
            t(3),
            WALL,
            &mut Emit::default(),
        )
    };
    // From another peer (its own address, or the far end's: overlapping prefixes).
    assert_eq!(icmp(B, PEER_B, &data), stray);
    assert_eq!(icmp(B, PEER_A, &data), stray);
    // From the far end, but about a packet of its own (the quoted one went the other
    // way), or with a sequence number outside what is in flight.
    assert_eq!(icmp(A, PEER_A, &syn_ack), stray);
    let mut old = Vec::new();
    PacketBuilder::ipv4(LOCAL, PEER_A, 64)
        .tcp(50000, 443, 1001u32.wrapping_sub(1 << 20), 64_000)
        .write(&mut old, &[0; 8])
        .unwrap();
    assert_eq!(icmp(A, PEER_A, &old), stray);
    // From the far end about a segment in flight: delivered.
    assert_eq!(icmp(A, PEER_A, &data), Verdict::Deliver);
    assert_eq!(e.counters().drops.get("stray_icmp"), Some(&4));
}

/// This host's node is its pods' first hop: its kernel answers a pod's packet that
/// does not fit the TUN with "fragmentation needed" from the node's address (a pod's
/// veth has a larger MTU; netns test workloads.rs, path MTU). That error reaches the
/// pod about its own flow to a peer; from another pod, or about a packet the pod did
/// not send, it does not.
#[test]
fn the_node_is_its_pods_first_hop_for_icmp_errors() {
    const POD: [u8; 4] = [100, 65, 1, 1];
    let (e, _) = enforcer(NO_POLICIES, 1024);
    let pod = LocalWorkload {
        identity: Some("spiffe://t/pod".into()),
        groups: Arc::from(Vec::new()),
    };
    // The pod's connection to peer A, 100 bytes in flight.
    let syn = tcp(POD, PEER_A, 50000, 443, "S", 1000, b"");
    assert_eq!(outbound(&e, &syn, t(0)), Verdict::Deliver);
    let mut syn_ack = Vec::new();
    PacketBuilder::ipv4(PEER_A, POD, 64)
        .tcp(443, 50000, 9000, 64_000)
        .syn()
        .ack(1001)
        .write(&mut syn_ack, b"")
        .unwrap();
    assert_eq!(
        e.inbound_to(&pod, &sender(A), &syn_ack, t(1), WALL, &mut Emit::default()),
        Verdict::Deliver
    );
    let mut data = Vec::new();
    PacketBuilder::ipv4(POD, PEER_A, 64)
        .tcp(50000, 443, 1001, 64_000)
        .ack(9001)
        .write(&mut data, &[0x5a; 100])
        .unwrap();
    assert_eq!(outbound(&e, &data, t(2)), Verdict::Deliver);
    let icmp = |who: &str, quoted: &[u8]| {
        e.between_locals(
            &sender(who),
            &pod,
            &frag_needed(LOCAL, POD, quoted),
            t(3),
            WALL,
            &mut Emit::default(),
        )
    };
    let stray = Verdict::Drop(DropReason::StrayIcmp);
    // From another workload of the host (with the node's address it would be a
    // forged source, dropped before the enforcer; its identity is what counts here).
    assert_eq!(icmp("spiffe://t/other-pod", &data), stray);
    // From the node about the peer's packet, not the pod's.
    assert_eq!(icmp("spiffe://t/c", &syn_ack), stray);
    // From the node about the pod's segment in flight: delivered.
    assert_eq!(icmp("spiffe://t/c", &data), Verdict::Deliver);
}

/// The same for a flow a peer opened (the quoted packet is the local server's
/// answer) and for a cut flow (nothing passes any more).
#[test]
fn icmp_errors_about_a_peers_flow_come_from_that_peer_and_stop_with_a_cut() {
    let (e, _) = enforcer(ALLOW_A_8080, 1024);
    let c = Conn::open_to(&e, 40000, 8080);
    let answer = c.server("A", &[0x5a; 100]);
    assert_eq!(outbound(&e, &answer, t(1)), Verdict::Deliver);
    let icmp = |who: &str, src| {
        e.inbound(
            &sender(who),
            &frag_needed(src, LOCAL, &answer),
            t(2),
            WALL,
            &mut Emit::default(),
        )
    };
    assert_eq!(icmp(B, PEER_A), Verdict::Drop(DropReason::StrayIcmp));
    assert_eq!(icmp(A, PEER_A), Verdict::Deliver);
    e.set_policy(compiled(NO_POLICIES, DefaultAction::Deny), t(3), WALL);
    assert_eq!(icmp(A, PEER_A), Verdict::Drop(DropReason::StrayIcmp));
}

// ---- Connections refused before they can carry anything (issue 18.7) -----------------

/// Regression (issue 18.7): an identity no rule could ever allow on an inspected port
/// completed the TCP handshake with the server (20 of 20 accepted; only its request
/// got 403). Its SYN is refused: a RST+ACK back, the decision logged, nothing tracked.
#[test]
fn a_syn_no_rule_could_allow_is_refused_on_an_inspected_port() {
    let (e, log) = enforcer(API_POLICY, 1024);
    let mut emit = Emit::default();
    let syn = tcp(PEER_A, LOCAL, 40000, 80, "S", 777, b"");
    assert_eq!(
        e.inbound(&sender(B), &syn, t(0), WALL, &mut emit),
        denied(DenyReason::NoAllowMatched)
    );
    assert_eq!(
        segments(&emit),
        vec![(Toward::Peer, 80, "AR".to_string(), 0, 778, 0)]
    );
    let rec: serde_json::Value = serde_json::from_str(&log.tail(1)[0]).unwrap();
    assert_eq!(rec["src"], B);
    assert_eq!(rec["dst_port"], 80);
    assert_eq!(rec["decision"], "deny");
    assert_eq!(rec["reason"], "no_allow_matched");
    assert_eq!(e.counters().flows, 0);
    // An identity some request of which could be allowed gets its handshake.
    let mut emit = Emit::default();
    assert_eq!(
        e.inbound(&sender(A), &syn, t(0), WALL, &mut emit),
        Verdict::Deliver
    );
    assert!(emit.is_empty());
    // A deny rule that covers the source whatever it asks: refused at the SYN too.
    let quarantine = format!("{API_POLICY}\n[[policy]]\nname = \"q\"\naction = \"deny\"\n[[policy.rule]]\nfrom = [{{ identities = [\"spiffe://t/a\"] }}]\n");
    let (e, log) = enforcer(&quarantine, 1024);
    let mut emit = Emit::default();
    assert!(matches!(
        e.inbound(&sender(A), &syn, t(0), WALL, &mut emit),
        Verdict::Drop(DropReason::Denied(DenyReason::ExplicitDeny(_)))
    ));
    assert_eq!(emit.packets().count(), 1);
    assert!(
        log.tail(1)[0].contains("\"policy\":\"q\""),
        "{}",
        log.tail(1)[0]
    );
}

/// Regression (issue 18.7): UDP to a port with HTTP rules (HTTP/3) passed without
/// inspection when a rule named no protocol: here a path deny that TCP enforces and
/// an allow without HTTP fields. UDP there is refused unless the rule that allows it
/// names UDP.
#[test]
fn udp_to_an_inspected_port_needs_a_rule_that_names_udp() {
    let policy = |protocols: &str| {
        format!(
            "[[policy]]\nname = \"web\"\naction = \"allow\"\n[[policy.rule]]\nfrom = [{{ identities = [\"{A}\"] }}]\nto = [{{ ports = [80]{protocols} }}]\n\n[[policy]]\nname = \"no-admin\"\naction = \"deny\"\n[[policy.rule]]\nto = [{{ ports = [80], paths = [\"/admin\"] }}]\n"
        )
    };
    let quic = udp_from(PEER_A, LOCAL, 5000, 80, b"\xc0quic");
    let (e, log) = enforcer(&policy(""), 1024);
    assert_eq!(
        e.inbound(&sender(A), &quic, t(0), WALL, &mut Emit::default()),
        denied(DenyReason::NotHttp)
    );
    assert!(log.tail(1)[0].contains("not_http"), "{}", log.tail(1)[0]);
    assert_eq!(e.counters().flows, 0);
    // TCP to the same port is inspected, as before.
    let mut c = Conn::open(&e, 40000);
    assert_eq!(
        c.send(&e, GET_ITEMS, &mut Emit::default()),
        Verdict::Deliver
    );
    // A rule that names UDP lets it through.
    let (e, _) = enforcer(&policy(", protocols = [\"tcp\", \"udp\"]"), 1024);
    assert_eq!(
        e.inbound(&sender(A), &quic, t(0), WALL, &mut Emit::default()),
        Verdict::Deliver
    );
}

// ---- Refused and closed flows end properly (issue 18.8, issue 26.2) -----------------

/// The response meshd sent the client: its sequence number and payload length.
fn response_of(emit: &Emit) -> (u32, usize) {
    segments(emit)
        .into_iter()
        .find(|s| s.0 == Toward::Peer && s.5 > 0)
        .map(|s| (s.3, s.5))
        .expect("a response to the client")
}

/// Regression (issue 26.2): a connection refused with 403 that the client closed
/// normally stayed in the flow table (idle timeout 2 hours), and the client's FIN was
/// never acknowledged. The FIN is acknowledged on the server's behalf and the flow
/// leaves the table within the closing timeout.
#[test]
fn a_refused_flow_is_closed_cleanly_and_leaves_the_table_in_seconds() {
    let (e, _) = enforcer(API_POLICY, 1024);
    let mut c = Conn::open(&e, 40000);
    let mut emit = Emit::default();
    assert_ne!(c.send(&e, GET_ADMIN, &mut emit), Verdict::Deliver);
    let (seq, len) = response_of(&emit);
    assert_eq!(seq, c.sseq);
    // The client reads the response and its FIN, then closes.
    c.sseq += len as u32 + 1;
    let mut emit = Emit::default();
    let fin = c.client("FA", b"");
    e.inbound(&sender(A), &fin, t(11), WALL, &mut emit);
    assert_eq!(
        segments(&emit),
        vec![(Toward::Peer, 80, "A".to_string(), c.sseq, c.cseq + 1, 0)]
    );
    assert_eq!(e.counters().flows, 1);
    let soon = t(11) + Timeouts::default().tcp_closing + Duration::from_secs(1);
    e.poll(soon, WALL, &mut Emit::default());
    assert_eq!(e.counters().flows, 0);
}

/// Regression (issue 26.2): a new connection from the same client port right after a
/// refused one was silently dropped, and so was one right after an allowed connection
/// closed less than 10 s before. A SYN on a closed 5-tuple starts a new flow, as
/// Linux conntrack does for TIME-WAIT reuse.
#[test]
fn a_new_syn_on_a_closed_five_tuple_starts_a_new_flow() {
    let (e, _) = enforcer(API_POLICY, 1024);
    // Refused.
    let mut refused = Conn::open(&e, 40000);
    assert_ne!(
        refused.send(&e, GET_ADMIN, &mut Emit::default()),
        Verdict::Deliver
    );
    let mut again = Conn::open(&e, 40000);
    assert_eq!(
        again.send(&e, GET_ITEMS, &mut Emit::default()),
        Verdict::Deliver
    );
    // Allowed, closed by both sides.
    let fin = again.client("FA", b"");
    assert_eq!(
        e.inbound(&sender(A), &fin, t(11), WALL, &mut Emit::default()),
        Verdict::Deliver
    );
    again.cseq += 1;
    assert_eq!(
        outbound(&e, &again.server("FA", b""), t(11)),
        Verdict::Deliver
    );
    again.sseq += 1;
    assert_eq!(
        e.inbound(
            &sender(A),
            &again.client("A", b""),
            t(11),
            WALL,
            &mut Emit::default()
        ),
        Verdict::Deliver
    );
    let mut third = Conn::open(&e, 40000);
    assert_eq!(
        third.send(&e, GET_ITEMS, &mut Emit::default()),
        Verdict::Deliver
    );
    assert_ne!(
        third.send(&e, GET_ADMIN, &mut Emit::default()),
        Verdict::Deliver
    );
}

/// A reused 5-tuple is tracked as the new connection it is: on a layer-4 port the
/// old FINs do not leave it on the closing timeout, so its server can answer after
/// a pause.
#[test]
fn a_reused_five_tuple_is_a_fresh_flow() {
    let (e, _) = enforcer(ALLOW_A_8080, 1024);
    let mut c = Conn::open_to(&e, 40000, 8080);
    for (from_client, flags) in [(true, "FA"), (false, "FA"), (true, "A")] {
        let v = if from_client {
            let pkt = c.client(flags, b"");
            e.inbound(&sender(A), &pkt, t(1), WALL, &mut Emit::default())
        } else {
            outbound(&e, &c.server(flags, b""), t(1))
        };
        assert_eq!(v, Verdict::Deliver, "{flags}");
        if flags == "FA" {
            if from_client {
                c.cseq += 1;
            } else {
                c.sseq += 1;
            }
        }
    }
    let c = Conn::open_to(&e, 40000, 8080);
    let later = t(1) + Timeouts::default().tcp_closing + Duration::from_secs(5);
    assert_eq!(
        outbound(&e, &c.server("A", b"after a pause"), later),
        Verdict::Deliver
    );
}

// ---- After a restart: no silent black hole (issue 26.3) ----------------------------

/// Regression (issue 26.3): after the receiving host's meshd restarted, data for its
/// own workload's open connection was taken as a new inbound flow and, under default
/// deny, dropped without a reset; the client waited until the sender's TCP gave up
/// (about 15 minutes). A refused segment of a connection meshd does not know resets
/// both ends (the peer at the number it expects, the local end at the segment's and,
/// should that be old, with an empty segment the local end answers with an ACK); that
/// ACK, a local segment of no flow, gets the exact reset.
#[test]
fn a_refused_segment_of_an_unknown_connection_resets_both_ends() {
    let (e, _) = enforcer(NO_POLICIES, 1024);
    let mut data = Vec::new();
    PacketBuilder::ipv4(PEER_A, LOCAL, 64)
        .tcp(8080, 50000, 9000, 64_000)
        .ack(1001)
        .write(&mut data, &[0x5a; 1000])
        .unwrap();
    let mut emit = Emit::default();
    assert_eq!(
        e.inbound(&sender(A), &data, t(0), WALL, &mut emit),
        denied(DenyReason::DefaultDeny)
    );
    assert_eq!(
        segments(&emit),
        vec![
            (Toward::Peer, 50000, "R".to_string(), 1001, 0, 0),
            (Toward::Local, 8080, "R".to_string(), 9000, 0, 0),
            (Toward::Local, 8080, "A".to_string(), 8999, 1001, 0),
        ]
    );
    // The local end answers with what it expects (it had received more): reset there.
    let mut answer = Vec::new();
    PacketBuilder::ipv4(LOCAL, PEER_A, 64)
        .tcp(50000, 8080, 1001, 64_000)
        .ack(12_000)
        .write(&mut answer, b"")
        .unwrap();
    let mut emit = Emit::default();
    assert_eq!(
        e.outbound(Some(&A.into()), &answer, t(1), &mut emit),
        Verdict::Drop(DropReason::Untracked)
    );
    assert_eq!(
        segments(&emit),
        vec![
            (Toward::Local, 8080, "R".to_string(), 12_000, 0, 0),
            (Toward::Peer, 50000, "R".to_string(), 1001, 0, 0),
            (Toward::Peer, 50000, "A".to_string(), 1000, 12_000, 0),
        ]
    );
    // A SYN that policy refuses is not answered (a refused connection, not a reset
    // of one) — the peer's connection attempt simply fails, as before.
    let mut emit = Emit::default();
    let syn = tcp(PEER_A, LOCAL, 40000, 22, "S", 1, b"");
    assert_eq!(
        e.inbound(&sender(A), &syn, t(2), WALL, &mut emit),
        denied(DenyReason::DefaultDeny)
    );
    assert!(emit.is_empty());
}

/// A client or server segment of connection `sport` → port 80 with TCP `options`.
fn tcp_opts(
    from_client: bool,
    sport: u16,
    seq: u32,
    ack: u32,
    options: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    let b = if from_client {
        PacketBuilder::ipv4(PEER_A, LOCAL, 64).tcp(sport, 80, seq, 64_000)
    } else {
        PacketBuilder::ipv4(LOCAL, PEER_A, 64).tcp(80, sport, seq, 64_000)
    };
    let b = b.ack(ack).options_raw(options).unwrap();
    let mut out = Vec::new();
    b.write(&mut out, payload).unwrap();
    out
}

/// TCP options of every packet emitted `toward`, with their payloads.
fn emitted_options(emit: &Emit, toward: Toward) -> Vec<(Vec<u8>, Vec<u8>)> {
    emit.packets()
        .filter(|(t, _)| *t == toward)
        .map(|(_, pkt)| {
            let sliced = etherparse::SlicedPacket::from_ip(pkt).expect("emitted packet parses");
            match sliced.transport {
                Some(etherparse::TransportSlice::Tcp(tcp)) => {
                    (tcp.options().to_vec(), tcp.payload().to_vec())
                }
                other => panic!("not TCP: {other:?}"),
            }
        })
        .collect()
}

/// Regression (issue 26): what meshd sends on an inspected connection in the client's
/// or the server's name carries their TCP timestamps (RFC 7323): a cut segment keeps
/// its options as sent, released bytes carry the timestamps of the segment that
/// released them, and the acknowledgement of held bytes the server's TSval with the
/// client's echoed. Without them the server echoed a stale timestamp and the client's
/// retransmission timer grew to tens of seconds under mild loss.
#[test]
fn l7_segments_sent_for_the_ends_carry_their_timestamps() {
    let (e, _) = enforcer(API_POLICY, 1024);
    let c = Conn::open(&e, 40001);
    let ts = |val, ecr| Timestamps { val, ecr }.emit();
    let mut emit = Emit::default();
    // The server's clock is at 900.
    let ack = tcp_opts(false, c.sport, c.sseq, c.cseq, &ts(900, 10), b"");
    assert_eq!(outbound(&e, &ack, t(1)), Verdict::Deliver);
    // Half a head: held, acknowledged as the server would.
    let first = b"GET /api/ite";
    let pkt = tcp_opts(true, c.sport, c.cseq, c.sseq, &ts(11, 900), first);
    assert_eq!(
        e.inbound(&sender(A), &pkt, t(2), WALL, &mut emit),
        Verdict::Consumed
    );
    let acks = emitted_options(&emit, Toward::Peer);
    assert_eq!(acks.len(), 1);
    assert_eq!(
        Timestamps::parse(&acks[0].0),
        Some(Timestamps { val: 900, ecr: 11 })
    );
    // The rest releases the head, with the releasing segment's timestamps.
    let mut emit = Emit::default();
    let rest = b"ms HTTP/1.1\r\nHost: c\r\n\r\n";
    let pkt = tcp_opts(
        true,
        c.sport,
        c.cseq + first.len() as u32,
        c.sseq,
        &ts(12, 900),
        rest,
    );
    assert_eq!(
        e.inbound(&sender(A), &pkt, t(3), WALL, &mut emit),
        Verdict::Consumed
    );
    let released = emitted_options(&emit, Toward::Local);
    assert_eq!(released.len(), 1);
    assert_eq!(released[0].1, [&first[..], &rest[..]].concat());
    assert_eq!(
        Timestamps::parse(&released[0].0),
        Some(Timestamps { val: 12, ecr: 900 })
    );
    // A retransmission of the released bytes plus new ones is cut to the new ones,
    // its options (here SACK blocks and timestamps) as they came.
    let mut emit = Emit::default();
    let mut options = vec![1, 1, 5, 10, 0, 0, 0x13, 0x88, 0, 0, 0x13, 0x89];
    options.extend_from_slice(&ts(13, 901));
    let again = [&rest[..], b"GET /api/x HTTP/1.1\r\nHost: c\r\n\r\n"].concat();
    let pkt = tcp_opts(
        true,
        c.sport,
        c.cseq + first.len() as u32,
        c.sseq,
        &options,
        &again,
    );
    assert_eq!(
        e.inbound(&sender(A), &pkt, t(4), WALL, &mut emit),
        Verdict::Consumed
    );
    let cut = emitted_options(&emit, Toward::Local);
    assert_eq!(cut.len(), 1);
    assert_eq!(cut[0], (options, again[rest.len()..].to_vec()));
    // A reordered segment of inspected bytes, older than the client's newest: it goes
    // with the newest timestamps, its other options as they came.
    let mut emit = Emit::default();
    let next = c.cseq + (first.len() + again.len()) as u32;
    let pure = tcp_opts(true, c.sport, next, c.sseq, &ts(20, 902), b"");
    e.inbound(&sender(A), &pure, t(5), WALL, &mut emit);
    let mut emit = Emit::default();
    let get = b"GET /api/y HTTP/1.1\r\nHost: c\r\n\r\n";
    let late = tcp_opts(true, c.sport, next, c.sseq, &ts(19, 901), get);
    assert_eq!(
        e.inbound(&sender(A), &late, t(6), WALL, &mut emit),
        Verdict::Consumed
    );
    let raised = emitted_options(&emit, Toward::Local);
    assert_eq!(raised.len(), 1);
    assert_eq!(raised[0].1, get);
    assert_eq!(
        Timestamps::parse(&raised[0].0),
        Some(Timestamps { val: 20, ecr: 902 })
    );
}
