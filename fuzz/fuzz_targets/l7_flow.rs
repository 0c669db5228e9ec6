//! The layer-7 flow (reassembly, HTTP parsing, hold and release) under arbitrary client
//! and server segments and time. Beyond "no panic": the server's TCP is modelled (it
//! reads its stream in order and drops what it has; of a byte that arrives ahead it
//! keeps the first copy, or, chosen by the input, the last: Linux replaces a queued
//! out-of-order segment that a later one covers), and the request heads its HTTP
//! parser reads from that stream must be exactly the heads the flow allowed, in order,
//! with nothing unparseable (invariant 4: what is delivered is what was inspected;
//! opaque body bytes may pass out of order and differ between copies, but cannot move
//! a head, and chunk framing passed ahead of a hole is what meshd read).
//!
//! The input may also build a true client stream (a chunked upload of a few chunks,
//! trailers, pipelined requests) and send pieces of it in any order among the forged
//! ones: as long as nothing was forged, the server's stream must be a prefix of it,
//! byte for byte.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use meshd::enforce::flow::{Flags, Segment, SeqNumber, Timestamp};
use meshd::enforce::http::{RequestStream, Step, MAX_HEADERS};
use meshd::enforce::l7::{Config, Fate, L7Flow, Request, Verdict};

const CISN: u32 = 4_294_960_000; // wraps within the first few KiB
const SISN: u32 = 90_000;

#[path = "common/input.rs"]
mod input;
use input::Input;

/// Allows all but `/admin`; records the heads allowed, as sent.
fn decide(req: &Request<'_>, allowed: &mut Vec<(String, String)>) -> Verdict {
    if req.path.starts_with("/admin") {
        Verdict::Refuse {
            status: 403,
            reason: "denied",
        }
    } else {
        allowed.push((req.method().to_string(), req.head.target.to_string()));
        Verdict::Allow
    }
}

/// The server's TCP and HTTP parser, by client stream offset.
struct Server {
    stream: Vec<u8>,
    /// Bytes received ahead of `stream`, by offset.
    ahead: BTreeMap<usize, u8>,
    /// A later copy of a byte ahead replaces the first.
    last_wins: bool,
    parser: RequestStream,
    parsed: usize,
    heads: Vec<(String, String)>,
}

impl Server {
    fn deliver(&mut self, off: i64, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        assert!(off >= 0, "delivered before the stream start");
        let off = off as usize;
        for (i, &b) in data.iter().enumerate() {
            let at = off + i;
            if at < self.stream.len() {
                continue;
            }
            if self.last_wins {
                self.ahead.insert(at, b);
            } else {
                self.ahead.entry(at).or_insert(b);
            }
        }
        while let Some(b) = self.ahead.remove(&self.stream.len()) {
            self.stream.push(b);
        }
        self.parse();
    }

    fn parse(&mut self) {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            match self.parser.parse(&self.stream[self.parsed..], &mut headers) {
                Ok(Step::Head { head, len }) => {
                    self.heads
                        .push((head.method.to_string(), head.target.to_string()));
                    self.parsed += len;
                }
                Ok(Step::Body { len }) => self.parsed += len,
                Ok(Step::Partial) => return,
                Err(e) => panic!("the server read bytes meshd did not allow: {e}"),
            }
        }
    }
}

/// A true client stream from the input: a chunked PUT of up to 8 chunks (sizes up to
/// 1,000, some with extensions), maybe trailers, then an allowed GET or a denied one.
fn true_stream(input: &mut Input<'_>) -> Vec<u8> {
    let mut s = b"PUT /up HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    let shape = input.u8().unwrap_or(0);
    for k in 0..usize::from(shape % 8) + 1 {
        let size = usize::from(input.u16() % 1000) + 1;
        let ext = if shape & 0x10 != 0 { ";e=\"x\"" } else { "" };
        s.extend(format!("{size:x}{ext}\r\n").as_bytes());
        s.extend((0..size).map(|i| b'a' + ((i + k) % 26) as u8));
        s.extend(b"\r\n");
    }
    s.extend(b"0\r\n");
    if shape & 0x20 != 0 {
        s.extend(b"T: 1\r\nU: 2\r\n");
    }
    s.extend(b"\r\n");
    s.extend(if shape & 0x40 != 0 {
        &b"GET /admin HTTP/1.1\r\nHost: s\r\n\r\n"[..]
    } else {
        &b"GET /next HTTP/1.1\r\nHost: s\r\n\r\n"[..]
    });
    s
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let mode = input.u8().unwrap_or(0);
    let small = mode & 1 == 1;
    let truth = (mode & 4 != 0).then(|| true_stream(&mut input));
    let mut forged = false;
    let config = if small {
        Config {
            max_held: 600,
            ..Config::default()
        }
    } else {
        Config::default()
    };
    let mut now = Timestamp::from_millis(1_000);
    let mut flow = L7Flow::new(config, now);
    let start = SeqNumber(CISN) + 1;
    let syn = Segment {
        seq: SeqNumber(CISN),
        ack: SeqNumber(0),
        flags: Flags::SYN,
        window: 65535,
        timestamps: None,
        payload: &[],
    };
    let mut allowed = Vec::new();
    flow.on_client_segment(&syn, now, |r| decide(r, &mut allowed));
    let syn_ack = Segment {
        seq: SeqNumber(SISN),
        ack: start,
        flags: Flags(Flags::SYN.0 | Flags::ACK.0),
        window: 65535,
        timestamps: None,
        payload: &[],
    };
    flow.on_server_segment(&syn_ack, now);
    let mut server = Server {
        stream: Vec::new(),
        ahead: BTreeMap::new(),
        last_wins: mode & 2 != 0,
        parser: RequestStream::default(),
        parsed: 0,
        heads: Vec::new(),
    };
    let mut server_sent = 0usize;
    while let Some(op) = input.u8() {
        // With a true stream, most client segments are pieces of it.
        let op = match (&truth, op % 8) {
            (Some(_), 4..=6) => 5,
            (_, op) => op % 4,
        };
        match op {
            0 | 1 | 5 => {
                let (off, flags, payload) = match &truth {
                    Some(t) if op == 5 => {
                        let off = usize::from(input.u16()) % t.len();
                        let len = usize::from(input.u8().unwrap_or(0)) * 8 + 1;
                        let end = (off + len).min(t.len());
                        let fin = end == t.len() && input.u8().unwrap_or(0) & 1 == 1;
                        let flags = if fin { 0x19 } else { 0x18 };
                        (off, Flags(flags), &t[off..end])
                    }
                    _ => {
                        let off = usize::from(input.u16() % 4096);
                        let flags = Flags((input.u8().unwrap_or(0x18) & 0x3d) | Flags::ACK.0);
                        let len = usize::from(input.u8().unwrap_or(0));
                        forged = true;
                        (off, flags, input.bytes(len))
                    }
                };
                let seg = Segment {
                    seq: start + off,
                    ack: SeqNumber(SISN + 1) + server_sent,
                    flags,
                    window: 65535,
                    timestamps: None,
                    payload,
                };
                let o = flow.on_client_segment(&seg, now, |r| decide(r, &mut allowed));
                match o.fate {
                    Fate::Forward => server.deliver(seg.seq - start, payload),
                    Fate::Trim {
                        start: a, end: b, ..
                    } => {
                        assert!(a <= b && b <= payload.len());
                        server.deliver(seg.seq + a - start, &payload[a..b]);
                    }
                    Fate::Drop(_) => {}
                }
                if let Some(r) = o.release {
                    let data = flow.release_data();
                    assert_eq!(data.len(), r.len);
                    server.deliver(r.seq - start, data);
                }
            }
            2 => {
                // The server: acknowledges some of what it has, maybe sends bytes.
                let acked = usize::from(input.u16()) % (server.stream.len() + 1);
                let len = usize::from(input.u8().unwrap_or(0) % 64);
                let payload = input.bytes(len);
                let seg = Segment {
                    seq: SeqNumber(SISN + 1) + server_sent,
                    ack: start + acked,
                    flags: Flags(Flags::ACK.0 | Flags::PSH.0),
                    window: 65535,
                    timestamps: None,
                    payload,
                };
                if flow.on_server_segment(&seg, now) {
                    server_sent += payload.len();
                }
            }
            _ => {
                now =
                    Timestamp::from_millis(now.millis() + 100 * u64::from(input.u8().unwrap_or(1)));
                let _ = flow.poll(now);
            }
        }
        assert!(
            server.heads.len() <= allowed.len()
                && server.heads[..] == allowed[..server.heads.len()],
            "the server read {:?}, meshd allowed {:?}",
            server.heads,
            allowed
        );
        if let (Some(t), false) = (&truth, forged) {
            let ahead_true = server.ahead.iter().all(|(&at, &b)| t.get(at) == Some(&b));
            assert!(
                t.starts_with(&server.stream) && ahead_true,
                "the server received other bytes than the client sent"
            );
        }
    }
});
