//! The layer-7 flow (reassembly, HTTP parsing, hold and release) under arbitrary client
//! and server segments and time. Beyond "no panic", the bytes the server would read
//! must be contiguous and never change (invariant 4: what is delivered is what was
//! inspected).
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshd::flow::{Flags, Segment, SeqNumber, Timestamp};
use meshd::l7::{Config, Fate, L7Flow, Request, Verdict};

const CISN: u32 = 4_294_960_000; // wraps within the first few KiB
const SISN: u32 = 90_000;

#[path = "common/input.rs"]
mod input;
use input::Input;

fn decide(req: &Request<'_>) -> Verdict {
    if req.path.starts_with("/admin") {
        Verdict::Refuse {
            status: 403,
            reason: "denied",
        }
    } else {
        Verdict::Allow
    }
}

/// What the server received, by client stream offset.
struct Server(Vec<u8>);

impl Server {
    fn deliver(&mut self, off: i64, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        assert!(off >= 0, "delivered before the stream start");
        let off = off as usize;
        assert!(off <= self.0.len(), "delivered out of order");
        let overlap = (self.0.len() - off).min(data.len());
        assert_eq!(
            &self.0[off..off + overlap],
            &data[..overlap],
            "delivered bytes changed"
        );
        self.0.extend_from_slice(&data[overlap..]);
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
        payload: &[],
    };
    flow.on_client_segment(&syn, now, decide);
    let syn_ack = Segment {
        seq: SeqNumber(SISN),
        ack: start,
        flags: Flags(Flags::SYN.0 | Flags::ACK.0),
        window: 65535,
        payload: &[],
    };
    flow.on_server_segment(&syn_ack, now);
    let mut server = Server(Vec::new());
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
                    payload,
                };
                let o = flow.on_client_segment(&seg, now, decide);
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
                let acked = usize::from(input.u16()) % (server.0.len() + 1);
                let len = usize::from(input.u8().unwrap_or(0) % 64);
                let payload = input.bytes(len);
                let seg = Segment {
                    seq: SeqNumber(SISN + 1) + server_sent,
                    ack: start + acked,
                    flags: Flags(Flags::ACK.0 | Flags::PSH.0),
                    window: 65535,
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
    }
});
