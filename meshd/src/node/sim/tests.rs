//! Scenarios of the in-memory tier: real TCP endpoints (smoltcp) on hosts whose node
//! cores talk over a simulated, faulty underlay. Each runs in milliseconds; each
//! prints its seed (`MESHD_SIM_SEED` replays it).

use std::time::Duration;

use mesh_proto::policy::DefaultAction;

use super::stack::{End, World};
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
