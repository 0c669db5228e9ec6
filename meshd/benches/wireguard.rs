//! WireGuard encapsulation and decapsulation of 1400-byte packets: the cryptographic
//! cost per packet of the data path (boringtun's `noise::Tunn`, which meshd's sessions
//! wrap), after a completed handshake.
//!
//! Run: `cargo bench -p meshd --bench wireguard`.

use std::hint::black_box;
use std::time::Duration;

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use etherparse::PacketBuilder;

const PACKET: usize = 1400;
/// Room for a packet plus WireGuard's 32 bytes of header and tag.
const BUF: usize = 2048;

/// An IPv4/UDP packet of `PACKET` bytes in all, as a workload would hand to the TUN.
fn inner_packet() -> Vec<u8> {
    let payload = vec![0xa5; PACKET - 20 - 8];
    let mut out = Vec::with_capacity(PACKET);
    let b = PacketBuilder::ipv4([100, 64, 0, 1], [100, 64, 0, 2], 64).udp(40_000, 5_201);
    if let Err(e) = b.write(&mut out, &payload) {
        panic!("cannot build the inner packet: {e}");
    }
    assert_eq!(out.len(), PACKET);
    out
}

/// Two tunnels with a completed handshake: `(initiator, responder)`.
fn session_pair() -> (Tunn, Tunn) {
    let a_secret = StaticSecret::from([1u8; 32]);
    let b_secret = StaticSecret::from([2u8; 32]);
    let a_public = PublicKey::from(&a_secret);
    let b_public = PublicKey::from(&b_secret);
    let mut a = Tunn::new(a_secret, b_public, None, None, 1, None);
    let mut b = Tunn::new(b_secret, a_public, None, None, 2, None);
    let mut buf_a = [0u8; BUF];
    let mut buf_b = [0u8; BUF];
    let init = match a.format_handshake_initiation(&mut buf_a, false) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        other => panic!("no handshake initiation: {other:?}"),
    };
    let response = match b.decapsulate(None, &init, &mut buf_b) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        other => panic!("no handshake response: {other:?}"),
    };
    // The initiator answers with a keepalive, which confirms the session to the
    // responder.
    let keepalive = match a.decapsulate(None, &response, &mut buf_a) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        other => panic!("no keepalive after the handshake: {other:?}"),
    };
    match b.decapsulate(None, &keepalive, &mut buf_b) {
        TunnResult::Done => {}
        other => panic!("keepalive not accepted: {other:?}"),
    }
    (a, b)
}

fn bench_wireguard(c: &mut Criterion) {
    let packet = inner_packet();
    let (mut a, mut b) = session_pair();
    let mut dst = vec![0u8; BUF];
    let mut group = c.benchmark_group("wireguard");
    group.throughput(Throughput::Bytes(PACKET as u64));

    group.bench_function("encapsulate_1400", |bench| {
        bench.iter(|| match a.encapsulate(black_box(&packet), &mut dst) {
            TunnResult::WriteToNetwork(p) => p.len(),
            other => panic!("encapsulate: {other:?}"),
        })
    });

    // Each datagram decrypts once (replay protection), so every iteration gets a
    // fresh one, made outside the timed part.
    let mut sealed = vec![0u8; BUF];
    group.bench_function("decapsulate_1400", |bench| {
        bench.iter_batched_ref(
            || match a.encapsulate(&packet, &mut sealed) {
                TunnResult::WriteToNetwork(p) => p.to_vec(),
                other => panic!("encapsulate: {other:?}"),
            },
            |datagram| match b.decapsulate(None, black_box(datagram), &mut dst) {
                TunnResult::WriteToTunnelV4(p, _) => p.len(),
                other => panic!("decapsulate: {other:?}"),
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500));
    targets = bench_wireguard
}
criterion_main!(benches);
