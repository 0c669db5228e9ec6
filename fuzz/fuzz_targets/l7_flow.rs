//! The layer-7 flow (reassembly, HTTP parsing, hold and release) under arbitrary client
//! and server segments and time. Beyond "no panic": the server's TCP is modelled (it
//! reads its stream in order, keeps the first copy of a byte that arrives ahead, drops
//! what it has), and the request heads its HTTP parser reads from that stream must be
//! exactly the heads the flow allowed, in order, with nothing unparseable (invariant 4:
//! what is delivered is what was inspected; opaque body bytes may pass out of order and
//! differ between copies, but cannot move a head).
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use meshd::flow::{Flags, Segment, SeqNumber, Timestamp};
use meshd::http::{RequestStream, Step, MAX_HEADERS};
use meshd::l7::{Config, Fate, L7Flow, Request, Verdict};

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
    ahead: BTreeMap<usize, Vec<u8>>,
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
        if off + data.len() <= self.stream.len() {
            return;
        }
        let skip = self.stream.len().saturating_sub(off);
        self.ahead
            .entry(off + skip)
            .or_insert_with(|| data[skip..].to_vec());
        // Whatever now starts at or before the end of the stream extends it.
        while let Some((&at, _)) = self.ahead.range(..=self.stream.len()).next() {
            let bytes = self.ahead.remove(&at).unwrap_or_default();
            let have = self.stream.len() - at;
            if bytes.len() > have {
                self.stream.extend_from_slice(&bytes[have..]);
            }
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

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let small = input.u8().unwrap_or(0) & 1 == 1;
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
        parser: RequestStream::default(),
        parsed: 0,
        heads: Vec::new(),
    };
    let mut server_sent = 0usize;
    while let Some(op) = input.u8() {
        match op % 4 {
            0 | 1 => {
                let off = usize::from(input.u16() % 4096);
                let flags = Flags((input.u8().unwrap_or(0x18) & 0x3d) | Flags::ACK.0);
                let len = usize::from(input.u8().unwrap_or(0));
                let payload = input.bytes(len);
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
    }
});
