//! Coalescing of a TUN write batch (software GRO): 64 in-order 1400-byte TCP segments,
//! of one flow and of 8 interleaved flows, through meshd's `gro::Coalescer` and
//! through tun-rs' `GROTable` (what meshd used before; it copies each packet into a
//! fresh `Vec`). Each iteration first refills the buffers with the original packets,
//! as the data path does; `refill` times that part alone.
//!
//! Run: `cargo bench -p meshd --bench gro`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use etherparse::{IpHeaders, Ipv4Header, PacketBuilder};
use meshd::datapath::batch::PacketBuf;
use meshd::datapath::gro::Coalescer;
use tun_rs::GROTable;

const BATCH: usize = 64;
const PAYLOAD: usize = 1400;
const OFFSET: usize = 10;
const CAPACITY: usize = 65_535 + 2 * OFFSET;

/// `BATCH` in-order segments spread round-robin over `flows` TCP flows.
fn segments(flows: usize) -> Vec<Vec<u8>> {
    (0..BATCH)
        .map(|i| {
            let (flow, n) = (i % flows, i / flows);
            let mut ip = match Ipv4Header::new(
                0,
                64,
                etherparse::IpNumber::TCP,
                [100, 64, 0, 1],
                [100, 64, 0, 2],
            ) {
                Ok(h) => h,
                Err(e) => panic!("IPv4 header: {e}"),
            };
            ip.identification = 1000 + n as u16;
            ip.dont_fragment = true;
            let payload: Vec<u8> = (0..PAYLOAD).map(|b| (b + i) as u8).collect();
            let seq = 1 + (n * PAYLOAD) as u32;
            let builder = PacketBuilder::ip(IpHeaders::Ipv4(ip, Default::default()))
                .tcp(40_000 + flow as u16, 5201, seq, 512)
                .ack(77);
            let mut out = Vec::new();
            if let Err(e) = builder.write(&mut out, &payload) {
                panic!("segment: {e}");
            }
            out
        })
        .collect()
}

fn refill_ours(bufs: &mut [PacketBuf], pkts: &[Vec<u8>]) {
    for (b, p) in bufs.iter_mut().zip(pkts) {
        b.space()[OFFSET..OFFSET + p.len()].copy_from_slice(p);
        b.set_len(OFFSET + p.len());
    }
}

fn refill_vecs(bufs: &mut [Vec<u8>], pkts: &[Vec<u8>]) {
    for (b, p) in bufs.iter_mut().zip(pkts) {
        b.clear();
        b.extend_from_slice(&[0; OFFSET]);
        b.extend_from_slice(p);
    }
}

fn bench_gro(c: &mut Criterion) {
    let mut group = c.benchmark_group("gro");
    group.throughput(Throughput::Elements(BATCH as u64));
    for flows in [1, 8] {
        let pkts = segments(flows);
        let mut ours: Vec<PacketBuf> = (0..BATCH).map(|_| PacketBuf::new(CAPACITY)).collect();
        let mut coalescer = Coalescer::new(BATCH);
        refill_ours(&mut ours, &pkts);
        let written = coalescer.coalesce(&mut ours, OFFSET, false).len();
        // 46 segments of 1400 bytes fill a 64 KiB packet.
        let per_flow = (BATCH / flows).div_ceil(46);
        assert_eq!(written, flows * per_flow, "merged as far as 64 KiB allows");
        group.bench_function(format!("ours/{flows}flows"), |b| {
            b.iter(|| {
                refill_ours(&mut ours, &pkts);
                black_box(
                    coalescer
                        .coalesce(black_box(&mut ours), OFFSET, false)
                        .len(),
                )
            })
        });
        group.bench_function(format!("refill/{flows}flows"), |b| {
            b.iter(|| {
                refill_ours(&mut ours, &pkts);
                black_box(&mut ours);
            })
        });

        let mut vecs: Vec<Vec<u8>> = (0..BATCH).map(|_| Vec::with_capacity(CAPACITY)).collect();
        let mut table = GROTable::new();
        group.bench_function(format!("tun-rs/{flows}flows"), |b| {
            b.iter(|| {
                refill_vecs(&mut vecs, &pkts);
                if let Err(e) = table.apply_gro(black_box(&mut vecs), OFFSET, false) {
                    panic!("tun-rs GRO: {e}");
                }
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500));
    targets = bench_gro
}
criterion_main!(benches);
