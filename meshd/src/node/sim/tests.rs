//! Scenarios of the in-memory tier: real TCP endpoints (smoltcp) on hosts whose node
//! cores talk over a simulated, faulty underlay. Each runs in milliseconds; each
//! prints its seed (`MESHD_SIM_SEED` replays it).

use std::time::Duration;

use mesh_proto::policy::DefaultAction;

use super::stack::{End, Seen, World};
use super::*;

const ECHO: u16 = 9000;

/// `a` may reach `c` on 9000.
const A_TO_ECHO: &str = r#"
[[policy]]
name = "a-in"
action = "allow"
[[policy.rule]]
from = [{ identities = ["spiffe://t/a"] }]
to = [{ ports = [9000] }]
"#;

/// Bytes that differ from one position to the next, and from one run to another.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    (0..len).map(|_| rng.next_u64() as u8).collect()
}

/// Writes what `out` still holds from `*sent` on and reads what arrived into `got`.
fn pump(w: &mut World, end: End, out: &[u8], sent: &mut usize, got: &mut Vec<u8>) {
    let s = w.tcp(end);
    if s.can_send() && *sent < out.len() {
        *sent += s.send_slice(&out[*sent..]).unwrap_or(0);
    }
    while s.can_recv() {
        let mut buf = [0u8; 4096];
        match s.recv_slice(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// A connection from host `a` to `port` on host `c`, carrying `up` from client to
/// server and `down` back at the same time, to the last byte.
struct Transfer {
    client: End,
    server: End,
    up: Vec<u8>,
    down: Vec<u8>,
    sent_up: usize,
    sent_down: usize,
    got_up: Vec<u8>,
    got_down: Vec<u8>,
}

impl Transfer {
    fn open(w: &mut World, a: usize, c: usize, port: u16, up: Vec<u8>, down: Vec<u8>) -> Self {
        let server = w.listen(c, port);
        let client = w.connect(a, c, port);
        Transfer {
            client,
            server,
            up,
            down,
            sent_up: 0,
            sent_down: 0,
            got_up: Vec::new(),
            got_down: Vec::new(),
        }
    }

    fn pump(&mut self, w: &mut World) -> bool {
        pump(
            w,
            self.client,
            &self.up,
            &mut self.sent_up,
            &mut self.got_down,
        );
        pump(
            w,
            self.server,
            &self.down,
            &mut self.sent_down,
            &mut self.got_up,
        );
        self.got_up.len() >= self.up.len() && self.got_down.len() >= self.down.len()
    }

    /// Both ways, to the last byte, within `limit` of simulated time.
    fn run(&mut self, w: &mut World, what: &str, limit: Duration) {
        w.run_until(what, limit, |w| self.pump(w));
        assert!(self.got_up == self.up, "{what}: the server got other bytes");
        assert!(
            self.got_down == self.down,
            "{what}: the client got other bytes"
        );
    }

    /// More bytes both ways on the open connection.
    fn more(&mut self, up: &[u8], down: &[u8]) {
        self.up.extend_from_slice(up);
        self.down.extend_from_slice(down);
    }
}

/// Handshake on demand, then TCP both ways through both node cores, under loss,
/// duplication and reordering: the first packet waits for the handshake and goes with
/// it, duplicates die in WireGuard's replay window, TCP retransmits what was lost, and
/// both streams arrive byte-identical. Policy at `c` admits the flow `a` opened; the
/// replies pass at `a` as replies of the flow its workload opened.
#[test]
fn handshake_on_demand_then_tcp_both_ways_under_loss_and_reordering() {
    let seed = seed("handshake_on_demand_then_tcp_both_ways_under_loss_and_reordering");
    let mut mesh = Mesh::new(seed, Faults::lossy(), &[("a", &[]), ("c", &[])]);
    let (a, c) = (mesh.index("a"), mesh.index("c"));
    mesh.apply_policy(c, A_TO_ECHO, DefaultAction::Deny);
    let mut w = World::new(mesh);
    // No WireGuard state before the first packet, and nothing on the link.
    assert!(!w.mesh.hosts[a].peer("c").has_session_state());
    assert!(w.mesh.link.sent().is_empty());

    let mut t = Transfer::open(
        &mut w,
        a,
        c,
        ECHO,
        pattern(seed, 64 * 1024),
        pattern(!seed, 96 * 1024),
    );
    t.run(&mut w, "the transfer", Duration::from_secs(600));

    let link = &w.mesh.link;
    // On demand: the first datagram is `a`'s initiation, and one handshake served.
    let first = link.sent()[0];
    assert_eq!(
        (first.kind, first.from),
        (Kind::HandshakeInitiation, underlay(a))
    );
    assert_eq!(
        link.count_since(Kind::HandshakeInitiation, Duration::ZERO),
        1
    );
    assert_eq!(link.count_since(Kind::HandshakeResponse, Duration::ZERO), 1);
    // The SYN that started the handshake waited in the session's queue and left as
    // soon as the response came (a few ms), not with TCP's retransmission (1 s on).
    // (A data message of WG_OVERHEAD bytes is a keepalive: the initiator's first.)
    let first_data = link
        .sent()
        .iter()
        .find(|s| s.kind == Kind::Data && s.from == underlay(a) && s.len > WG_OVERHEAD)
        .expect("data from a");
    assert!(
        first_data.at < Duration::from_millis(100),
        "queued packet not flushed after the handshake: {first_data:?}"
    );
    let stats = link.stats();
    assert!(
        stats.lost + stats.duplicated + stats.reordered > 0,
        "no fault happened: {stats:?}"
    );
    // Each duplicate that arrived was refused as a replay, never delivered twice.
    let replays: u64 = w
        .mesh
        .hosts
        .iter()
        .map(|h| {
            h.drops(node::Drop::Peer(peers::DropReason::Crypto(
                peers::CryptoError::Replay,
            )))
        })
        .sum();
    assert!(replays <= stats.duplicated, "{replays} replays, {stats:?}");
    for (h, other) in [(a, "c"), (c, "a")] {
        let s = w.mesh.hosts[h].peer(other).stats();
        assert!(s.latest_handshake.is_some(), "{other}: {s:?}");
        assert!(s.rx_bytes > 64 * 1024 && s.tx_bytes > 64 * 1024, "{s:?}");
    }
    // The flow was decided once, allowed by the rule for the identity the key proved.
    let rules = w.mesh.hosts[c].enforce.counters().rules;
    assert!(
        rules.iter().any(|r| r.policy == "a-in" && r.allow == 1),
        "{rules:?}"
    );
}

/// Group `web` may reach `c` on 9000, group `ops` on 9001.
const BY_GROUP: &str = r#"
[[policy]]
name = "web-in"
action = "allow"
[[policy.rule]]
from = [{ groups = ["web"] }]
to = [{ ports = [9000] }]

[[policy]]
name = "ops-in"
action = "allow"
[[policy.rule]]
from = [{ groups = ["ops"] }]
to = [{ ports = [9001] }]
"#;

/// Runs `t` until the server has at least `n` of the bytes sent up.
fn run_until_up(w: &mut World, t: &mut Transfer, n: usize, what: &str) {
    w.run_until(what, Duration::from_secs(600), |w| {
        t.pump(w);
        t.got_up.len() >= n
    });
}

/// TCP resets of the connection of `end` delivered to a workload (either end).
fn resets(w: &mut World, end: End) -> Vec<Seen> {
    let (local, remote) = w.endpoints(end);
    w.delivered
        .iter()
        .filter(|s| s.rst && s.between(local, remote))
        .cloned()
        .collect()
}

/// A certificate renewed for the same key, on both ends, in the middle of a transfer
/// (bytes in flight, a lossy link): the session carries on without a handshake, the
/// flow is not cut, and the renewed certificates are what the hosts use from then on:
/// with the wall clock past the first certificates' expiry the transfer goes on to
/// the last byte, and a port only the renewed certificate's new group may reach opens.
#[test]
fn certificate_renewed_in_place_while_traffic_flows() {
    let seed = seed("certificate_renewed_in_place_while_traffic_flows");
    let mut mesh = Mesh::new(seed, Faults::lossy(), &[("a", &["web"]), ("c", &[])]);
    let (a, c) = (mesh.index("a"), mesh.index("c"));
    mesh.apply_policy(c, BY_GROUP, DefaultAction::Deny);
    let mut w = World::new(mesh);
    let first = w.mesh.hosts[c].peer("a").spec.clone();

    let mut t = Transfer::open(
        &mut w,
        a,
        c,
        ECHO,
        pattern(seed, 64 * 1024),
        pattern(!seed, 64 * 1024),
    );
    run_until_up(&mut w, &mut t, 16 * 1024, "the transfer's first quarter");
    let handshake = w.mesh.hosts[a].peer("c").stats().latest_handshake;
    assert!(handshake.is_some());
    let renewed_at = w.now();
    // `a` gains the group `ops`; `c` renews as it was. No flow is cut.
    assert_eq!(w.mesh.renew(a, &["web", "ops"]), [0, 0]);
    assert_eq!(w.mesh.renew(c, &[]), [0, 0]);
    assert_eq!(w.mesh.hosts[c].peer("a").spec.groups, ["web", "ops"]);
    // Then weeks pass by the wall clock, at once: the first certificates are past
    // their expiry (and its skew allowance), the renewed ones are not.
    let now = w.mesh.now().wall;
    w.mesh
        .clock
        .jump_wall(first.not_after.0 + mesh_proto::cert::CLOCK_SKEW_SECS + 60 - now.0);
    let now = w.mesh.now().wall;
    assert!(!first.is_valid_at(now));
    for (h, other) in [(a, "c"), (c, "a")] {
        assert!(w.mesh.hosts[h].peer(other).spec.is_valid_at(now));
    }

    t.more(&pattern(seed ^ 1, 32 * 1024), &pattern(seed ^ 2, 32 * 1024));
    t.run(
        &mut w,
        "the transfer across the renewal",
        Duration::from_secs(600),
    );

    // The same session all along: no handshake since, none recorded.
    assert_eq!(
        w.mesh
            .link
            .count_since(Kind::HandshakeInitiation, renewed_at),
        0
    );
    assert_eq!(
        w.mesh.hosts[a].peer("c").stats().latest_handshake,
        handshake
    );
    for h in [a, c] {
        assert_eq!(
            w.mesh.hosts[h].drops(node::Drop::Peer(peers::DropReason::PeerExpired)),
            0
        );
    }
    let cut = resets(&mut w, t.client);
    assert!(cut.is_empty(), "{cut:?}");

    // Policy sees the renewed certificate's groups: `ops` reaches 9001.
    let mut ops = Transfer::open(&mut w, a, c, 9001, b"ping".to_vec(), b"pong".to_vec());
    ops.run(&mut w, "the ops connection", Duration::from_secs(60));
    let rules = w.mesh.hosts[c].enforce.counters().rules;
    assert!(
        rules.iter().any(|r| r.policy == "ops-in" && r.allow == 1),
        "{rules:?}"
    );
}

/// `a` may reach `c` on 9000 and 9001.
const A_TO_BOTH: &str = r#"
[[policy]]
name = "a-in"
action = "allow"
[[policy.rule]]
from = [{ identities = ["spiffe://t/a"] }]
to = [{ ports = [9000, 9001] }]
"#;

/// `a` may reach `c` on 9001 only.
const A_TO_9001: &str = r#"
[[policy]]
name = "a-in"
action = "allow"
[[policy.rule]]
from = [{ identities = ["spiffe://t/a"] }]
to = [{ ports = [9001] }]
"#;

/// A policy applied while two connections carry data cuts the one it now forbids,
/// at once: both its ends get a reset they take (the sockets close), and none of the
/// bytes the client goes on writing reaches the server; the connection it still
/// allows carries on, and a new connection to the forbidden port never opens.
#[test]
fn policy_change_cuts_an_established_flow() {
    let seed = seed("policy_change_cuts_an_established_flow");
    let mut mesh = Mesh::new(seed, Faults::lossy(), &[("a", &[]), ("c", &[])]);
    let (a, c) = (mesh.index("a"), mesh.index("c"));
    mesh.apply_policy(c, A_TO_BOTH, DefaultAction::Deny);
    let mut w = World::new(mesh);
    let mut cut = Transfer::open(
        &mut w,
        a,
        c,
        ECHO,
        pattern(seed, 8192),
        pattern(!seed, 8192),
    );
    let mut kept = Transfer::open(&mut w, a, c, 9001, pattern(seed ^ 1, 8192), vec![]);
    w.run_until("both transfers", Duration::from_secs(600), |w| {
        let one = cut.pump(w);
        kept.pump(w) && one
    });
    let (client, server) = w.endpoints(cut.client);

    // The resets the cut sends go out on a clean link: a lost one is not sent again
    // (the flow's next packets are refused), which is not what this test is about.
    w.mesh.link.set_faults(Faults::none());
    assert_eq!(w.mesh.apply_policy(c, A_TO_9001, DefaultAction::Deny), 1);
    let cut_at = w.delivered.len();
    w.mesh.link.set_faults(Faults::lossy());
    // The client writes on; the new connection tries to open.
    cut.more(&pattern(seed ^ 2, 8192), &[]);
    kept.more(&pattern(seed ^ 3, 16 * 1024), &pattern(seed ^ 4, 16 * 1024));
    let late = w.connect(a, c, ECHO);
    let late_server = w.listen(c, ECHO);
    kept.run(
        &mut w,
        "the connection still allowed",
        Duration::from_secs(600),
    );
    w.run_for(Duration::from_secs(5));

    let at = |w: &World, h: usize| {
        w.delivered
            .iter()
            .skip(cut_at)
            .filter(|s| s.host == h && s.between(client, server))
            .cloned()
            .collect::<Vec<_>>()
    };
    // Each end got a reset, and took it.
    assert!(at(&w, a).iter().any(|s| s.rst), "{:?}", at(&w, a));
    assert!(at(&w, c).iter().any(|s| s.rst), "{:?}", at(&w, c));
    assert!(!w.tcp(cut.client).is_open());
    assert!(!w.tcp(cut.server).is_open());
    // After the cut no byte reached the server, nor a SYN: only resets, and the empty
    // probes meshd sends with them for a late packet of the cut flow (to draw the
    // server's ACK, answered with the exact reset; `enforce::untracked_resets`).
    let after: Vec<_> = at(&w, c)
        .into_iter()
        .filter(|s| s.payload > 0 || s.syn)
        .collect();
    assert!(after.is_empty(), "{after:?}");
    assert_eq!(cut.got_up.len(), 8192);
    // The new connection never reached `c`'s workload.
    assert!(!w.tcp(late).may_send());
    assert!(!w.tcp(late_server).is_active());
    let (late_client, _) = w.endpoints(late);
    let syns: Vec<_> = w
        .delivered
        .iter()
        .filter(|s| s.host == c && s.src == late_client)
        .collect();
    assert!(syns.is_empty(), "{syns:?}");
}

/// Port 8080 of `c` serves `a` GET requests under /public/ only.
const PUBLIC_ONLY: &str = r#"
[[policy]]
name = "public"
action = "allow"
[[policy.rule]]
from = [{ identities = ["spiffe://t/a"] }]
to = [{ ports = [8080], methods = ["GET"], paths = ["/public/*"] }]
"#;

/// Sends `request` from a new connection of `a` to 8080 on `c`; the server answers
/// `response` once it has the whole request. Returns what the server got and what
/// the client got, once the client has a whole response head.
fn http_exchange(
    w: &mut World,
    a: usize,
    c: usize,
    request: &[u8],
    response: &[u8],
) -> (Vec<u8>, Vec<u8>) {
    let server = w.listen(c, 8080);
    let client = w.connect(a, c, 8080);
    let (mut sent, mut answered) = (0, 0);
    let (mut got_server, mut got_client) = (Vec::new(), Vec::new());
    w.run_until("the exchange", Duration::from_secs(60), |w| {
        pump(w, client, request, &mut sent, &mut got_client);
        let whole = got_server.len() >= request.len();
        let out: &[u8] = if whole { response } else { &[] };
        pump(w, server, out, &mut answered, &mut got_server);
        got_client.windows(4).any(|x| x == b"\r\n\r\n")
    });
    // Whatever is still on its way to the server arrives.
    w.run_for(Duration::from_secs(1));
    pump(w, server, &[], &mut answered, &mut got_server);
    // A listener a reset sent back to listening would take the next connection.
    w.tcp(server).abort();
    (got_server, got_client)
}

/// A request the HTTP rules deny gets meshd's 403 and its head never reaches the
/// server; an allowed one on the same port passes as sent and gets the server's
/// answer. Over a lossy, reordering link, so the heads are reassembled first.
#[test]
fn layer_7_refusal_on_a_port_with_http_rules() {
    let seed = seed("layer_7_refusal_on_a_port_with_http_rules");
    let mut mesh = Mesh::new(seed, Faults::lossy(), &[("a", &[]), ("c", &[])]);
    let (a, c) = (mesh.index("a"), mesh.index("c"));
    mesh.apply_policy(c, PUBLIC_ONLY, DefaultAction::Deny);
    let mut w = World::new(mesh);
    let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

    let denied = b"GET /admin/users HTTP/1.1\r\nHost: c\r\n\r\n";
    let (server, client) = http_exchange(&mut w, a, c, denied, ok);
    assert!(server.is_empty(), "{}", String::from_utf8_lossy(&server));
    assert!(
        client.starts_with(b"HTTP/1.1 403 "),
        "{}",
        String::from_utf8_lossy(&client)
    );

    let allowed = b"GET /public/index.html HTTP/1.1\r\nHost: c\r\n\r\n";
    let (server, client) = http_exchange(&mut w, a, c, allowed, ok);
    assert_eq!(server, allowed);
    assert_eq!(client, ok);
    let log = w.mesh.hosts[c].decisions();
    assert!(log.iter().any(|l| l.contains("/admin/users")), "{log:?}");
}
