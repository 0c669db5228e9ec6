//! Flow lookup: the per-packet connection-table work of the data path.
//!
//! - `conntrack/*`: `ConnTrack::track` of a packet of an established flow (original
//!   direction and reply) and of an unknown flow, in tables of 100 and 10,000 flows.
//! - `l4/inbound_established`: `enforce::Enforcer::inbound` of a 1400-byte TCP segment on an allowed,
//!   established flow (packet parse, shard lock, lookup, cached decision), with 10,000
//!   flows tracked; `l4/outbound_reply` is the server's answer on such a flow.
//!
//! Run: `cargo bench -p meshd --bench flow`.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use etherparse::PacketBuilder;
use mesh_proto::policy::{parse, CompiledPolicy, DefaultAction};
use mesh_proto::time::UnixTime;
use meshd::enforce::conntrack::{
    ConnTrack, FlowKey, Observation, Origin, TcpFlags, TcpSegmentInfo, Timeouts, PROTO_TCP,
};
use meshd::enforce::decisions::DecisionLog;
use meshd::enforce::{Emit, Enforcer, Limits, LocalWorkload, Sender, Verdict};

const CLIENT: [u8; 4] = [100, 64, 0, 1];
const SERVER: [u8; 4] = [100, 64, 0, 2];
const NOW: Duration = Duration::from_secs(100);
const WALL: UnixTime = UnixTime(1_795_673_877);

fn key(i: usize) -> FlowKey {
    FlowKey {
        proto: PROTO_TCP,
        src: IpAddr::V4(Ipv4Addr::from(CLIENT)),
        dst: IpAddr::V4(Ipv4Addr::from(SERVER)),
        src_port: 10_000 + (i % 50_000) as u16,
        dst_port: 80 + (i / 50_000) as u16,
    }
}

fn segment(syn: bool, seq: u32, payload_len: u32) -> Observation {
    Observation {
        tcp: Some(TcpSegmentInfo {
            flags: if syn { TcpFlags::SYN } else { TcpFlags::ACK },
            seq,
            ack: 1,
            payload_len,
            ..TcpSegmentInfo::default()
        }),
    }
}

fn bench_conntrack(c: &mut Criterion) {
    let mut group = c.benchmark_group("conntrack");
    for n in [100, 10_000] {
        let mut table: ConnTrack<u32> = ConnTrack::new(n, Timeouts::default());
        for i in 0..n {
            if table
                .insert(key(i), Origin::Remote, 0, &segment(true, 0, 0), NOW)
                .is_err()
            {
                panic!("table of {n} refused flow {i}");
            }
        }
        let hit = key(n / 2);
        let reply = hit.reversed();
        let miss = key(n + 1);
        let data = segment(false, 1, 1400);
        group.bench_function(BenchmarkId::new("track_hit", n), |b| {
            b.iter(|| table.track(black_box(&hit), &data, NOW).is_some())
        });
        group.bench_function(BenchmarkId::new("track_reply", n), |b| {
            b.iter(|| table.track(black_box(&reply), &data, NOW).is_some())
        });
        group.bench_function(BenchmarkId::new("track_miss", n), |b| {
            b.iter(|| table.track(black_box(&miss), &data, NOW).is_some())
        });
    }
    group.finish();
}

fn tcp_packet(
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    syn: bool,
    len: usize,
) -> Vec<u8> {
    let mut b = PacketBuilder::ipv4(src, dst, 64).tcp(sport, dport, 1, 64_000);
    b = if syn { b.syn() } else { b.ack(1) };
    let mut out = Vec::new();
    if let Err(e) = b.write(&mut out, &vec![0x5a; len]) {
        panic!("cannot build a test packet: {e}");
    }
    out
}

const POLICY: &str = r#"
[[policy]]
name = "web"
action = "allow"
[[policy.rule]]
from = [{ identities = ["spiffe://bench/client"] }]
to = [{ ports = [80] }]
"#;

fn bench_l4(c: &mut Criterion) {
    const FLOWS: usize = 10_000;
    let policy = match parse("bench.toml", POLICY) {
        Ok(p) => CompiledPolicy::compile(p.set, DefaultAction::Deny),
        Err(e) => panic!("bench policy: {e}"),
    };
    let enforcer = Enforcer::new(
        LocalWorkload {
            identity: Some("spiffe://bench/server".into()),
            groups: Vec::<String>::new().into(),
        },
        policy,
        Limits {
            flows: 2 * FLOWS,
            ..Limits::default()
        },
        Arc::new(DecisionLog::new(Default::default())),
    );
    let sender = Sender {
        identity: "spiffe://bench/client".into(),
        groups: Vec::<String>::new().into(),
    };
    let mut emit = Emit::default();
    for i in 0..FLOWS {
        let syn = tcp_packet(CLIENT, SERVER, 10_000 + i as u16, 80, true, 0);
        assert_eq!(
            enforcer.inbound(&sender, &syn, NOW, WALL, &mut emit),
            Verdict::Deliver,
            "flow {i} must be allowed"
        );
    }
    let sport = 10_000 + (FLOWS / 2) as u16;
    let data = tcp_packet(CLIENT, SERVER, sport, 80, false, 1400);
    let reply = tcp_packet(SERVER, CLIENT, 80, sport, false, 1400);
    assert_eq!(
        enforcer.inbound(&sender, &data, NOW, WALL, &mut emit),
        Verdict::Deliver
    );
    let client = Some(&sender.identity);
    assert_eq!(
        enforcer.outbound(client, &reply, NOW, &mut emit),
        Verdict::Deliver
    );

    let mut group = c.benchmark_group("l4");
    group.bench_function(BenchmarkId::new("inbound_established", FLOWS), |b| {
        b.iter(|| enforcer.inbound(&sender, black_box(&data), NOW, WALL, &mut emit))
    });
    group.bench_function(BenchmarkId::new("outbound_reply", FLOWS), |b| {
        b.iter(|| enforcer.outbound(client, black_box(&reply), NOW, &mut emit))
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500));
    targets = bench_conntrack, bench_l4
}
criterion_main!(benches);
