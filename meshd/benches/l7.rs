//! The layer-7 path: TCP reassembly, the HTTP request-head parser, and the per-flow
//! hold/decide/release machine that combines them.
//!
//! - `reassembly/in_order_1400`: `flow::Reassembler` buffering one in-order 1400-byte
//!   segment and consuming it (what a held head costs per segment);
//! - `http_parse/*`: `http::RequestStream::parse` of a short (curl-like) and a long
//!   (browser-like) request head;
//! - `l7_flow/*`: `l7::L7Flow::on_client_segment` (plus the server's ACK) over an
//!   in-order stream: 1400-byte body segments of one large upload (the no-copy
//!   forward path), and segments that each carry one complete GET head (parse,
//!   normalise, decide per segment).
//! - `l7_enforcer/*`: the same two streams as whole IPv4 packets through
//!   `enforce::Enforcer::inbound` with a compiled layer-7 policy (`GET`/`PUT` on `/*`):
//!   what the data path pays per client packet on an inspected port (packet parse,
//!   TCP checksum, flow lookup, the L7 flow, policy evaluation per request head).
//!
//! Run: `cargo bench -p meshd --bench l7`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use etherparse::PacketBuilder;
use mesh_proto::policy::{parse, CompiledPolicy, DefaultAction};
use mesh_proto::time::UnixTime;
use meshd::enforce::decisions::DecisionLog;
use meshd::enforce::flow::{Flags, Reassembler, Segment, SeqNumber, Timestamp};
use meshd::enforce::http::{RequestStream, Step, MAX_HEADERS};
use meshd::enforce::l7::{Config, Fate, L7Flow, Request, Verdict};
use meshd::enforce::{self, Emit, Enforcer, LocalWorkload, Sender};

const SEGMENT: usize = 1400;

const SHORT_HEAD: &[u8] =
    b"GET /api/items/42 HTTP/1.1\r\nHost: server\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n";

const LONG_HEAD: &[u8] = b"GET /static/app/main.3f9a1c.js?v=2026-11-26 HTTP/1.1\r\n\
Host: shop.example.internal\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:130.0) Gecko/20100101 Firefox/130.0\r\n\
Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n\
Accept-Language: en-GB,en;q=0.5\r\n\
Accept-Encoding: gzip, deflate, br, zstd\r\n\
Referer: https://shop.example.internal/cart\r\n\
Connection: keep-alive\r\n\
Cookie: session=4f1c2e9a8b7d6c5e4f3a2b1c0d9e8f7a; theme=dark; consent=1\r\n\
Upgrade-Insecure-Requests: 1\r\n\
Sec-Fetch-Dest: script\r\n\
Sec-Fetch-Mode: no-cors\r\n\
Sec-Fetch-Site: same-origin\r\n\
Priority: u=1\r\n\
X-Request-Id: 0b6f8a52-2c1e-4d7b-9a3f-5e8c1d2b4a6f\r\n\
\r\n";

fn bench_reassembly(c: &mut Criterion) {
    let mut group = c.benchmark_group("reassembly");
    group.throughput(Throughput::Bytes(SEGMENT as u64));
    let data = vec![0x42u8; SEGMENT];
    let mut r = Reassembler::new(SeqNumber(1), 64 * 1024);
    let mut seq = SeqNumber(1);
    group.bench_function("in_order_1400", |b| {
        b.iter(|| {
            if let Err(e) = r.insert(seq, black_box(&data)) {
                panic!("in-order insert refused: {e:?}");
            }
            let n = r.contiguous().len();
            r.consume(n);
            seq = seq + n;
            n
        })
    });
    group.finish();
}

fn bench_http_parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("http_parse");
    for (name, head) in [("short_head", SHORT_HEAD), ("long_head", LONG_HEAD)] {
        group.throughput(Throughput::Bytes(head.len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| {
                let mut stream = RequestStream::default();
                let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                match stream.parse(black_box(head), &mut headers) {
                    Ok(Step::Head { len, .. }) => len,
                    other => panic!("{name} does not parse: {other:?}"),
                }
            })
        });
    }
    group.finish();
}

/// Allows GET; what a compiled policy lookup answers is measured in mesh-proto's
/// `policy` bench, so the callback here is trivial.
fn allow_get(req: &Request<'_>) -> Verdict {
    if req.method() == "GET" {
        Verdict::Allow
    } else {
        Verdict::Refuse {
            status: 403,
            reason: "denied by policy",
        }
    }
}

fn seg(seq: SeqNumber, ack: SeqNumber, flags: Flags, payload: &[u8]) -> Segment<'_> {
    Segment {
        seq,
        ack,
        flags,
        window: 65535,
        timestamps: None,
        payload,
    }
}

/// An established flow: (flow, client's next seq, server's next seq).
fn established(now: Timestamp) -> (L7Flow, SeqNumber, SeqNumber) {
    let mut flow = L7Flow::new(Config::default(), now);
    let cisn = SeqNumber(1_000);
    let sisn = SeqNumber(50_000);
    let out = flow.on_client_segment(&seg(cisn, SeqNumber(0), Flags::SYN, b""), now, allow_get);
    assert_eq!(out.fate, Fate::Forward);
    assert!(flow.on_server_segment(&seg(sisn, cisn + 1, Flags::SYN | Flags::ACK, b""), now));
    let out = flow.on_client_segment(&seg(cisn + 1, sisn + 1, Flags::ACK, b""), now, allow_get);
    assert!(
        !matches!(out.fate, Fate::Drop(_)),
        "handshake ACK dropped: {out:?}"
    );
    (flow, cisn + 1, sisn + 1)
}

fn bench_l7_flow(c: &mut Criterion) {
    let now = Timestamp::from_millis(1_000);
    let mut group = c.benchmark_group("l7_flow");

    // One upload with a body far larger than the run: every timed segment is body.
    group.throughput(Throughput::Bytes(SEGMENT as u64));
    let head = b"PUT /upload HTTP/1.1\r\nHost: server\r\nContent-Length: 1000000000000\r\n\r\n";
    let allow_all = |_: &Request<'_>| Verdict::Allow;
    let (mut flow, mut cseq, sseq) = established(now);
    let out = flow.on_client_segment(
        &seg(cseq, sseq, Flags::ACK | Flags::PSH, head),
        now,
        allow_all,
    );
    assert_eq!(out.fate, Fate::Forward, "the upload's head must pass");
    cseq = cseq + head.len();
    let body = vec![0x61u8; SEGMENT];
    group.bench_function("body_segment_1400", |b| {
        b.iter(|| {
            let out = flow.on_client_segment(
                &seg(cseq, sseq, Flags::ACK, black_box(&body)),
                now,
                allow_all,
            );
            if out.fate != Fate::Forward {
                panic!("body segment not forwarded: {out:?}");
            }
            cseq = cseq + body.len();
            flow.on_server_segment(&seg(sseq, cseq, Flags::ACK, b""), now)
        })
    });

    // Keep-alive GETs, one complete head per segment.
    group.throughput(Throughput::Elements(1));
    let (mut flow, mut cseq, sseq) = established(now);
    group.bench_function("get_head_per_segment", |b| {
        b.iter(|| {
            let out = flow.on_client_segment(
                &seg(cseq, sseq, Flags::ACK | Flags::PSH, black_box(SHORT_HEAD)),
                now,
                allow_get,
            );
            if out.fate != Fate::Forward {
                panic!("GET segment not forwarded: {out:?}");
            }
            cseq = cseq + SHORT_HEAD.len();
            flow.on_server_segment(&seg(sseq, cseq, Flags::ACK, b""), now)
        })
    });
    group.finish();
}

const L7_POLICY: &str = r#"
[[policy]]
name = "web"
action = "allow"
[[policy.rule]]
from = [{ identities = ["spiffe://bench/client"] }]
to = [{ ports = [80], methods = ["GET", "PUT"], paths = ["/*"] }]
"#;

const CLIENT: [u8; 4] = [100, 64, 0, 1];
const SERVER: [u8; 4] = [100, 64, 0, 2];
const CPORT: u16 = 40_000;

/// An IPv4 TCP packet with valid checksums. `ack` sets the ACK flag.
fn packet(to_server: bool, seq: u32, ack: Option<u32>, syn: bool, payload: &[u8]) -> Vec<u8> {
    let (src, dst, sport, dport) = if to_server {
        (CLIENT, SERVER, CPORT, 80)
    } else {
        (SERVER, CLIENT, 80, CPORT)
    };
    let mut b = PacketBuilder::ipv4(src, dst, 64).tcp(sport, dport, seq, 65_535);
    if syn {
        b = b.syn();
    }
    if let Some(a) = ack {
        b = b.ack(a);
    }
    if !payload.is_empty() {
        b = b.psh();
    }
    let mut out = Vec::with_capacity(40 + payload.len());
    if let Err(e) = b.write(&mut out, payload) {
        panic!("cannot build a test packet: {e}");
    }
    out
}

/// An enforcer with one established, inspected flow from the client to port 80:
/// (enforcer, sender, client's next seq, server's next seq).
fn inspected_flow(now: Duration, wall: UnixTime) -> (Enforcer, Sender, u32, u32) {
    let policy = match parse("bench.toml", L7_POLICY) {
        Ok(p) => CompiledPolicy::compile(p.set, DefaultAction::Deny),
        Err(e) => panic!("bench policy: {e}"),
    };
    let enforcer = Enforcer::new(
        LocalWorkload {
            identity: Some("spiffe://bench/server".into()),
            groups: Vec::<String>::new().into(),
        },
        policy,
        enforce::Limits::default(),
        Arc::new(DecisionLog::new(Default::default())),
    );
    let sender = Sender {
        identity: "spiffe://bench/client".into(),
        groups: Vec::<String>::new().into(),
    };
    let (cisn, sisn) = (1_000u32, 50_000u32);
    let mut emit = Emit::default();
    let deliver = enforce::Verdict::Deliver;
    let syn = packet(true, cisn, None, true, b"");
    assert_eq!(
        enforcer.inbound(&sender, &syn, now, wall, &mut emit),
        deliver
    );
    let syn_ack = packet(false, sisn, Some(cisn + 1), true, b"");
    assert_eq!(
        enforcer.outbound(Some(&sender.identity), &syn_ack, now, &mut emit),
        deliver
    );
    let ack = packet(true, cisn + 1, Some(sisn + 1), false, b"");
    assert_eq!(
        enforcer.inbound(&sender, &ack, now, wall, &mut emit),
        deliver
    );
    (enforcer, sender, cisn + 1, sisn + 1)
}

fn bench_l7_enforcer(c: &mut Criterion) {
    let now = Duration::from_secs(100);
    let wall = UnixTime(1_795_673_877);
    let mut group = c.benchmark_group("l7_enforcer");
    let mut emit = Emit::default();

    // Body segments of one large upload. Each packet carries its own sequence number
    // and checksum, so they are built outside the timed part, in stream order.
    group.throughput(Throughput::Bytes(SEGMENT as u64));
    let (enforcer, sender, mut cseq, sseq) = inspected_flow(now, wall);
    let head = b"PUT /upload HTTP/1.1\r\nHost: server\r\nContent-Length: 1000000000000\r\n\r\n";
    let put = packet(true, cseq, Some(sseq), false, head);
    assert_eq!(
        enforcer.inbound(&sender, &put, now, wall, &mut emit),
        enforce::Verdict::Deliver,
        "the upload's head must pass"
    );
    cseq += head.len() as u32;
    let body = vec![0x61u8; SEGMENT];
    group.bench_function("inbound_body_1400", |b| {
        b.iter_batched_ref(
            || {
                let p = packet(true, cseq, Some(sseq), false, &body);
                cseq = cseq.wrapping_add(SEGMENT as u32);
                p
            },
            |p| match enforcer.inbound(&sender, black_box(p), now, wall, &mut emit) {
                enforce::Verdict::Deliver => {}
                other => panic!("body segment not delivered: {other:?}"),
            },
            BatchSize::SmallInput,
        )
    });

    // Keep-alive GETs, one complete head per packet.
    group.throughput(Throughput::Elements(1));
    let (enforcer, sender, mut cseq, sseq) = inspected_flow(now, wall);
    group.bench_function("inbound_get_head", |b| {
        b.iter_batched_ref(
            || {
                let p = packet(true, cseq, Some(sseq), false, SHORT_HEAD);
                cseq = cseq.wrapping_add(SHORT_HEAD.len() as u32);
                p
            },
            |p| match enforcer.inbound(&sender, black_box(p), now, wall, &mut emit) {
                enforce::Verdict::Deliver => {}
                other => panic!("GET not delivered: {other:?}"),
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
    targets = bench_reassembly, bench_http_parse, bench_l7_flow, bench_l7_enforcer
}
criterion_main!(benches);
