use super::*;

const CISN: u32 = 7000;
const SISN: u32 = 90_000;

/// Denies POST and every path under /admin; allows the rest.
fn policy(req: &Request<'_>) -> Verdict {
    if req.head.method == "POST" || req.path.starts_with("/admin") {
        Verdict::Refuse {
            status: 403,
            reason: "denied by policy",
        }
    } else {
        Verdict::Allow
    }
}

/// One flow, a fake clock and a fake server that receives what the flow delivers as a
/// TCP receiver does: in order, keeping bytes that arrive ahead (the first copy of
/// each) until the hole before them is filled, checking that what it has never changes.
struct Net {
    flow: L7Flow,
    now: Timestamp,
    cisn: SeqNumber,
    /// Client stream as the server received it, in order.
    server: Vec<u8>,
    /// Bytes received ahead of `server`, by stream offset.
    ahead: std::collections::BTreeMap<usize, Vec<u8>>,
    /// Check that bytes received twice are equal. Off where a test forges bytes that
    /// may land in an opaque body (which passes unread, l7 module docs): there what
    /// must hold is that the heads the server reads were decided.
    strict: bool,
    server_fin: bool,
    decisions: Vec<(String, String)>,
    refusal: Option<Refusal>,
}

impl Net {
    fn new() -> Net {
        Net::with(Config::default(), CISN)
    }

    fn with(config: Config, cisn: u32) -> Net {
        let now = Timestamp::from_millis(1_000);
        let mut net = Net {
            flow: L7Flow::new(config, now),
            now,
            cisn: SeqNumber(cisn),
            server: Vec::new(),
            ahead: std::collections::BTreeMap::new(),
            strict: true,
            server_fin: false,
            decisions: Vec::new(),
            refusal: None,
        };
        let syn = seg(net.cisn, 0, Flags::SYN, b"");
        assert_eq!(
            net.flow.on_client_segment(&syn, now, policy).fate,
            Fate::Forward
        );
        let syn_ack = seg(
            SeqNumber(SISN),
            cisn.wrapping_add(1),
            Flags::SYN | Flags::ACK,
            b"",
        );
        assert!(net.flow.on_server_segment(&syn_ack, now));
        net
    }

    /// Client stream offset → sequence number.
    fn at(&self, off: usize) -> SeqNumber {
        self.cisn + 1 + off
    }

    /// Sends client bytes at stream offset `off`; applies the outcome to the fake server.
    fn send(&mut self, off: usize, payload: &[u8]) -> Outcome {
        self.send_flags(off, payload, Flags::ACK | Flags::PSH)
    }

    fn send_flags(&mut self, off: usize, payload: &[u8], flags: Flags) -> Outcome {
        let s = seg(self.at(off), SISN + 1, flags, payload);
        let decisions = &mut self.decisions;
        let outcome = self.flow.on_client_segment(&s, self.now, |req| {
            assert_eq!(req.host(), Some("svc"));
            assert_eq!(req.headers().next().map(|(n, _)| n), Some("Host"));
            decisions.push((req.method().to_string(), req.path.to_string()));
            policy(req)
        });
        match outcome.fate {
            Fate::Forward => self.deliver(s.seq, payload, flags.contains(Flags::FIN)),
            Fate::Trim { start, end, fin } => {
                self.deliver(s.seq + start, &payload[start..end], fin)
            }
            Fate::Drop(_) => {}
        }
        if let Some(r) = outcome.release {
            let data = self.flow.release_data().to_vec();
            assert_eq!(data.len(), r.len);
            self.deliver(r.seq, &data, r.fin);
        }
        if let Some(r) = outcome.refusal {
            assert!(self.refusal.is_none(), "refused twice");
            self.refusal = Some(r);
        }
        outcome
    }

    fn deliver(&mut self, seq: SeqNumber, data: &[u8], fin: bool) {
        if data.is_empty() && !fin {
            // An ACK: the server's TCP answers it, the stream does not change.
            return;
        }
        let off = seq - self.at(0);
        assert!(off >= 0, "delivered before the stream start");
        let off = off as usize;
        assert!(!self.server_fin || data.is_empty(), "data after FIN");
        if off > self.server.len() {
            // Ahead of a hole (opaque body bytes pass out of order): kept until it fills.
            assert!(!fin, "FIN out of order");
            let kept = self.ahead.entry(off).or_insert_with(|| data.to_vec());
            let overlap = kept.len().min(data.len());
            if self.strict {
                assert_eq!(
                    &kept[..overlap],
                    &data[..overlap],
                    "delivered bytes changed"
                );
            }
            if data.len() > kept.len() {
                *kept = data.to_vec();
            }
            self.server_ack();
            return;
        }
        let overlap = (self.server.len() - off).min(data.len());
        if self.strict {
            assert_eq!(
                &self.server[off..off + overlap],
                &data[..overlap],
                "delivered bytes changed"
            );
        }
        self.server.extend_from_slice(&data[overlap..]);
        // Bytes kept ahead that the stream now reaches.
        while let Some((&at, _)) = self.ahead.range(..=self.server.len()).next() {
            let bytes = self.ahead.remove(&at).unwrap_or_default();
            let have = self.server.len() - at;
            let overlap = have.min(bytes.len());
            if self.strict {
                assert_eq!(
                    &self.server[at..at + overlap],
                    &bytes[..overlap],
                    "delivered bytes changed"
                );
            }
            self.server.extend_from_slice(&bytes[overlap..]);
        }
        if fin {
            self.server_fin = true;
        }
        // The server's TCP acknowledges what it received in order.
        self.server_ack();
    }

    /// The server acknowledges the client bytes it has (its FIN counted); a refused
    /// flow drops the ACK.
    fn server_ack(&mut self) {
        let ack = self.at(self.server.len() + usize::from(self.server_fin));
        let s = seg(SeqNumber(SISN + 1), ack.0, Flags::ACK, b"");
        let forwarded = self.flow.on_server_segment(&s, self.now);
        assert_eq!(forwarded, !self.flow.is_closed());
    }

    fn tick(&mut self, ms: u64) {
        self.now = Timestamp::from_millis(self.now.millis() + ms);
    }
}

fn seg(seq: SeqNumber, ack: u32, flags: Flags, payload: &[u8]) -> Segment<'_> {
    Segment {
        seq,
        ack: SeqNumber(ack),
        flags,
        window: 65535,
        timestamps: None,
        payload,
    }
}

/// The segment goes out without its payload (an ACK, so that the server answers it).
const ACK_ONLY: Fate = Fate::Trim {
    start: 0,
    end: 0,
    fin: false,
};

const GET: &[u8] = b"GET /api/items HTTP/1.1\r\nHost: svc\r\n\r\n";
const POST: &[u8] = b"POST /api/items HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\n\r\nhello";

#[test]
fn allowed_get_passes_unchanged_and_uncopied() {
    let mut net = Net::new();
    let o = net.send(0, GET);
    assert_eq!(
        o,
        Outcome {
            fate: Fate::Forward,
            timestamps: None,
            release: None,
            refusal: None,
            held_ack: None,
            answer: None,
        }
    );
    assert_eq!(net.server, GET);
    assert_eq!(
        net.decisions,
        [("GET".to_string(), "/api/items".to_string())]
    );
    assert_eq!(net.flow.stats().copied, 0);
    assert_eq!(net.flow.held(), 0);
    assert!(net.flow.memory() < 64, "no reassembly buffer was allocated");
}

#[test]
fn denied_post_is_refused_before_any_byte_is_released() {
    let mut net = Net::new();
    // The server sent something first (e.g. nothing; its SYN counts).
    let o = net.send(0, POST);
    assert_eq!(o.fate, Fate::Drop(DropReason::Refused));
    assert_eq!(o.release, None);
    let r = o.refusal.expect("refused");
    assert_eq!(
        r,
        Refusal {
            cause: RefuseCause::Policy {
                status: 403,
                reason: "denied by policy"
            },
            client_seq: SeqNumber(SISN + 1),
            client_ack: net.at(POST.len()),
            server_seq: net.at(0),
            server_ack: SeqNumber(SISN + 1),
            response_end: SeqNumber(SISN + 1)
                + (crate::enforce::l7::response::response_len(&r.cause) + 1),
        }
    );
    assert_eq!(r.cause.status(), 403);
    assert!(net.server.is_empty());
    assert!(net.flow.is_closed());
    // Whatever else the client sends is dropped; so is the server's side.
    assert_eq!(
        net.send(POST.len(), GET).fate,
        Fate::Drop(DropReason::Refused)
    );
    let late = seg(SeqNumber(SISN + 1), 0, Flags::ACK, b"x");
    assert!(!net.flow.on_server_segment(&late, net.now));
    assert!(net.server.is_empty());
}

#[test]
fn denied_second_request_on_keep_alive() {
    let mut net = Net::new();
    assert_eq!(net.send(0, GET).fate, Fate::Forward);
    // The server answers; the injected response must follow its bytes.
    let resp = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
    let s = seg(
        SeqNumber(SISN + 1),
        CISN + 1 + GET.len() as u32,
        Flags::ACK,
        resp,
    );
    assert!(net.flow.on_server_segment(&s, net.now));
    let o = net.send(GET.len(), POST);
    assert_eq!(o.fate, Fate::Drop(DropReason::Refused));
    let r = o.refusal.unwrap();
    assert_eq!(
        r.server_seq,
        net.at(GET.len()),
        "RST right after the first request"
    );
    assert_eq!(r.client_seq, SeqNumber(SISN + 1) + resp.len());
    assert_eq!(net.server, GET);
    assert_eq!(net.decisions.len(), 2);
}

#[test]
fn pipelined_requests_in_one_segment() {
    let mut net = Net::new();
    let mut both = GET.to_vec();
    both.extend_from_slice(b"GET /admin/users HTTP/1.1\r\nHost: svc\r\n\r\n");
    let o = net.send(0, &both);
    assert_eq!(
        o.fate,
        Fate::Trim {
            start: 0,
            end: GET.len(),
            fin: false
        }
    );
    assert_eq!(o.refusal.unwrap().server_seq, net.at(GET.len()));
    assert_eq!(net.server, GET);

    let mut net = Net::new();
    let three = [GET, GET, GET].concat();
    assert_eq!(net.send(0, &three).fate, Fate::Forward);
    assert_eq!(net.decisions.len(), 3);
}

#[test]
fn large_body_streams_without_being_held() {
    let mut net = Net::new();
    let body_len = 4 << 20;
    let head = format!("PUT /upload HTTP/1.1\r\nHost: svc\r\nContent-Length: {body_len}\r\n\r\n");
    assert_eq!(net.send(0, head.as_bytes()).fate, Fate::Forward);
    let chunk = vec![b'z'; 1400];
    let mut off = head.len();
    let mut left = body_len;
    while left > 0 {
        let n = left.min(chunk.len());
        let o = net.send(off, &chunk[..n]);
        assert_eq!(o.fate, Fate::Forward);
        assert_eq!(net.flow.held(), 0);
        off += n;
        left -= n;
    }
    // The next request on the connection is still decided.
    assert_eq!(net.send(off, GET).fate, Fate::Forward);
    assert_eq!(
        net.send(off + GET.len(), POST).fate,
        Fate::Drop(DropReason::Refused)
    );
    assert_eq!(net.flow.stats().copied, 0);
    assert_eq!(net.server.len(), head.len() + body_len + GET.len());
    assert_eq!(net.decisions.len(), 3);
}

#[test]
fn chunked_upload_streams_and_next_head_is_decided() {
    let mut net = Net::new();
    let req = b"PUT /u HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n";
    assert_eq!(net.send(0, req).fate, Fate::Forward);
    let body = b"4;ext=1\r\nabcd\r\n0\r\nX-T: 1\r\n\r\n";
    // Split inside the chunk line and the trailers: each piece still forwards.
    let mut off = req.len();
    for piece in body.chunks(3) {
        assert_eq!(net.send(off, piece).fate, Fate::Forward);
        off += piece.len();
    }
    let o = net.send(off, b"GET /admin HTTP/1.1\r\nHost: svc\r\n\r\n");
    assert_eq!(o.refusal.unwrap().cause.status(), 403);
    assert_eq!(net.server.len(), req.len() + body.len());
}

#[test]
fn head_split_at_every_offset_is_held_then_released() {
    let mut two = GET.to_vec();
    two.extend_from_slice(POST);
    for i in 1..two.len() {
        let mut net = Net::new();
        net.send(0, &two[..i]);
        net.send(i, &two[i..]);
        // Whatever the split, the GET is delivered and nothing of the POST.
        assert_eq!(net.server, GET, "split at {i}");
        let r = net.refusal.expect("POST refused");
        assert_eq!(r.server_seq, net.at(GET.len()), "split at {i}");
        assert_eq!(net.decisions.len(), 2, "split at {i}");
    }
    for i in 1..GET.len() {
        let mut net = Net::new();
        let o = net.send(0, &GET[..i]);
        assert_eq!(o.fate, Fate::Drop(DropReason::Buffered), "split at {i}");
        assert!(net.server.is_empty());
        let o = net.send(i, &GET[i..]);
        assert_eq!(o.release.map(|r| r.len), Some(GET.len()), "split at {i}");
        assert_eq!(net.server, GET);
        assert_eq!(
            net.flow.held(),
            GET.len(),
            "released bytes are kept until the next call"
        );
        net.flow.poll(net.now);
        assert_eq!(net.flow.held(), 0);
    }
}

#[test]
fn byte_by_byte_keep_alive() {
    let mut net = Net::new();
    let stream = [
        GET,
        GET,
        b"GET /public/../admin HTTP/1.1\r\nHost: svc\r\n\r\n",
    ]
    .concat();
    for (i, b) in stream.iter().enumerate() {
        net.send(i, std::slice::from_ref(b));
    }
    assert_eq!(net.server, [GET, GET].concat());
    assert_eq!(net.decisions[2], ("GET".to_string(), "/admin".to_string()));
    assert_eq!(net.refusal.unwrap().cause.status(), 403);
}

#[test]
fn out_of_order_segments_are_buffered_then_released_in_order() {
    let mut net = Net::new();
    let (a, rest) = GET.split_at(10);
    let (b, c) = rest.split_at(10);
    assert_eq!(net.send(20, c).fate, Fate::Drop(DropReason::Buffered));
    assert_eq!(net.send(10, b).fate, Fate::Drop(DropReason::Buffered));
    assert!(net.decisions.is_empty());
    let o = net.send(0, a);
    assert_eq!(o.release.unwrap().len, GET.len());
    assert_eq!(net.server, GET);
}

/// Regression (issue 26): a body held out of order is a body the server never sees, so
/// it cannot answer a loss with SACK blocks or duplicate ACKs and the client waits for
/// its retransmission timer at every loss. Opaque body bytes ahead of the stream
/// position pass as they came, unheld; the position moves over them once the server
/// acknowledges them, and the next head is decided as usual.
#[test]
fn out_of_order_body_bytes_pass_unheld() {
    let mut net = Net::new();
    let head = b"PUT /u HTTP/1.1\r\nHost: svc\r\nContent-Length: 30\r\n\r\n";
    net.send(0, head);
    let body: Vec<u8> = (0..30).map(|i| b'a' + i as u8 % 26).collect();
    let h = head.len();
    assert_eq!(net.send(h + 20, &body[20..]).fate, Fate::Forward);
    assert_eq!(net.send(h + 10, &body[10..20]).fate, Fate::Forward);
    assert_eq!(net.flow.held(), 0, "nothing held");
    assert_eq!(net.server.len(), h, "the server waits for the hole");
    // The hole, in order: straight through; the server has the whole body.
    assert_eq!(net.send(h, &body[..10]).fate, Fate::Forward);
    assert_eq!(net.server, [&head[..], &body].concat());
    // The server's acknowledgement moved the position over what passed ahead: the
    // next request is decided in order and goes straight through.
    let o = net.send(h + 30, GET);
    assert_eq!(o.fate, Fate::Forward);
    assert_eq!(net.decisions.len(), 2);
    assert_eq!(net.server, [&head[..], &body, GET].concat());
    let stats = net.flow.stats();
    assert_eq!((stats.copied, stats.released), (0, 0), "{stats:?}");
    // A retransmission of body bytes the server has is cut, as before.
    let o = net.send(h + 10, &body[10..20]);
    assert!(
        matches!(o.fate, Fate::Trim { start, end, .. } if start == end),
        "{o:?}"
    );
}

/// The next head is never taken ahead of a hole, and bytes that reach past the body
/// are held, not passed: only what cannot move a head passes out of order.
#[test]
fn only_opaque_bytes_pass_out_of_order() {
    let mut net = Net::new();
    let head = b"PUT /u HTTP/1.1\r\nHost: svc\r\nContent-Length: 30\r\n\r\n";
    let h = head.len();
    net.send(0, head);
    let body = [b'x'; 30];
    // Reaching past the body into the next head: held.
    let tail = [&body[25..], GET].concat();
    assert_eq!(
        net.send(h + 25, &tail).fate,
        Fate::Drop(DropReason::Buffered)
    );
    assert_eq!(net.decisions.len(), 1, "not decided ahead of the hole");
    // A FIN inside the body ahead of the hole is held too (it must follow the bytes).
    let mut net2 = Net::new();
    net2.send(0, head);
    let o = net2.send_flags(h + 10, &body[10..], Flags::ACK | Flags::FIN);
    assert_eq!(o.fate, Fate::Drop(DropReason::Buffered));
    // The hole arrives: the body goes out from the buffer with what was held behind it,
    // the head decided in order.
    let o = net.send(h, &body[..25]);
    assert_eq!(o.release.map(|r| r.len), Some(25 + tail.len()));
    assert_eq!(net.decisions.len(), 2);
    assert_eq!(net.server, [&head[..], &body, GET].concat());
    // Chunked: a chunk's data passes out of order, and the framing after it is read
    // ahead of the hole (see `chunk_framing_after_a_hole_is_read_ahead_of_it`).
    let mut net = Net::new();
    let head = b"PUT /c HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n";
    let h = head.len();
    net.send(0, head);
    net.send(h, b"14\r\n");
    let data = [b'd'; 20];
    assert_eq!(net.send(h + 4 + 10, &data[10..]).fate, Fate::Forward);
    let o = net.send(h + 4 + 20, b"\r\n0\r\n\r\n");
    assert_eq!(o.fate, Fate::Forward, "framing read ahead of the hole");
    net.send(h + 4, &data[..10]);
    net.send(h + 4 + 20, b"\r\n0\r\n\r\n");
    assert_eq!(
        net.server,
        [&head[..], b"14\r\n", &data, b"\r\n0\r\n\r\n"].concat()
    );
}

/// Held bytes behind opaque bytes that reached the server out of order become
/// contiguous when the server acknowledges them (not by a client segment): they are
/// inspected at the next client segment, whatever it carries.
#[test]
fn a_head_held_behind_a_passed_body_is_decided_once_the_server_has_the_body() {
    let mut net = Net::new();
    let head = b"PUT /u HTTP/1.1\r\nHost: svc\r\nContent-Length: 30\r\n\r\n";
    let h = head.len();
    net.send(0, head);
    let body = [b'y'; 30];
    assert_eq!(net.send(h + 10, &body[10..]).fate, Fate::Forward);
    assert_eq!(net.send(h + 30, GET).fate, Fate::Drop(DropReason::Buffered));
    // The hole goes out from the buffer; the server then has the whole body and says so.
    let o = net.send(h, &body[..10]);
    assert_eq!(o.release.map(|r| r.len), Some(10));
    assert_eq!(net.server.len(), h + 30);
    assert_eq!(net.decisions.len(), 1);
    // The client sends the held head again (nothing acknowledged it): now decided.
    let o = net.send(h + 30, GET);
    assert_eq!(o.release.map(|r| r.len), Some(GET.len()));
    assert_eq!(net.decisions.len(), 2);
    assert_eq!(net.server, [&head[..], &body, GET].concat());
}

/// Regression (issue 26): bytes released from the buffer went to the server without
/// TCP timestamps; the server kept echoing the timestamp of the last segment before
/// the hole, and the client's RTT estimate grew by the time meshd held the bytes.
/// A release carries the timestamps of the client segment that completed it, and an
/// acknowledgement of held bytes the server's TSval and the client's TSval echoed.
#[test]
fn released_bytes_and_held_acks_carry_timestamps() {
    let mut net = Net::new();
    // The server's TSval, from its segments.
    let mut ack = seg(SeqNumber(SISN + 1), CISN + 1, Flags::ACK, b"");
    ack.timestamps = Some(Timestamps { val: 500, ecr: 40 });
    assert!(net.flow.on_server_segment(&ack, net.now));
    let (a, b) = GET.split_at(12);
    let mut first = seg(net.at(0), SISN + 1, Flags::ACK | Flags::PSH, a);
    first.timestamps = Some(Timestamps { val: 41, ecr: 500 });
    let o = net.flow.on_client_segment(&first, net.now, policy);
    assert_eq!(o.fate, Fate::Drop(DropReason::Buffered));
    assert_eq!(
        o.held_ack.and_then(|h| h.timestamps),
        Some(Timestamps { val: 500, ecr: 41 }),
        "the server's clock, the client's value echoed"
    );
    let mut second = seg(net.at(12), SISN + 1, Flags::ACK | Flags::PSH, b);
    second.timestamps = Some(Timestamps { val: 77, ecr: 501 });
    let o = net.flow.on_client_segment(&second, net.now, policy);
    let release = o.release.expect("released");
    assert_eq!(release.len, GET.len());
    assert_eq!(
        release.timestamps,
        Some(Timestamps { val: 77, ecr: 501 }),
        "the segment that released the bytes, not the first one held"
    );
    // Out of order and then filled: the hole-filler's timestamps (RFC 7323 §4.3).
    let mut net = Net::new();
    let head = b"PUT /c HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n";
    net.send(0, head);
    let h = head.len();
    let framing = b"3\r\nabc\r\n0\r\n\r\n";
    let mut late = seg(net.at(h + 3), SISN + 1, Flags::ACK, &framing[3..]);
    late.timestamps = Some(Timestamps { val: 90, ecr: 1 });
    assert_eq!(
        net.flow.on_client_segment(&late, net.now, policy).fate,
        Fate::Drop(DropReason::Buffered)
    );
    let mut hole = seg(net.at(h), SISN + 1, Flags::ACK, &framing[..3]);
    hole.timestamps = Some(Timestamps { val: 95, ecr: 1 });
    let o = net.flow.on_client_segment(&hole, net.now, policy);
    assert_eq!(
        o.release.map(|r| (r.len, r.timestamps)),
        Some((framing.len(), Some(Timestamps { val: 95, ecr: 1 })))
    );
    // No timestamps negotiated, none invented.
    let mut net = Net::new();
    net.send(0, a);
    let o = net.send(12, b);
    assert_eq!(o.release.map(|r| r.timestamps), Some(None));
}

/// Bytes held behind a hole in a body (chunk framing after a loss) wait while the client
/// still sends: a retransmission lost again is no reason for a 408. A silent client, or
/// one that never fills the hole, still ends in 408.
#[test]
fn a_hole_in_a_body_waits_while_the_client_sends() {
    let timeout = Config::default().head_timeout;
    let start = || {
        let mut net = Net::new();
        let head = b"PUT /c HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n";
        net.send(0, head);
        let h = head.len();
        let o = net.send(h + 3, b"abc\r\n");
        assert_eq!(o.fate, Fate::Drop(DropReason::Buffered));
        (net, h)
    };
    // The client keeps sending (more data after the hole, or the same again).
    let (mut net, h) = start();
    for _ in 0..5 {
        net.tick(timeout.as_millis() as u64 - 1000);
        assert_eq!(net.flow.poll(net.now), None);
        net.send(h + 3, b"abc\r\n");
    }
    net.send(h, b"3\r\n");
    assert_eq!(net.flow.poll(net.now), None);
    assert_eq!(net.flow.held(), 0);
    // Silent for the head timeout: 408.
    let (mut net, _) = start();
    net.tick(timeout.as_millis() as u64);
    assert_eq!(
        net.flow.poll(net.now).map(|r| r.cause),
        Some(RefuseCause::Timeout)
    );
    // Sending, but never the hole: 408 after BODY_HOLE_LIMIT.
    let (mut net, h) = start();
    let mut waited = 0;
    let refusal = loop {
        net.tick(1000);
        waited += 1000;
        if let Some(r) = net.flow.poll(net.now) {
            break r;
        }
        net.send(h + 3, b"abc\r\n");
    };
    assert_eq!(refusal.cause, RefuseCause::Timeout);
    assert_eq!(Duration::from_millis(waited), BODY_HOLE_LIMIT);
}

#[test]
fn duplicates_are_recognised() {
    let mut net = Net::new();
    // Duplicate of held bytes: dropped.
    net.send(0, &GET[..10]);
    assert_eq!(
        net.send(0, &GET[..10]).fate,
        Fate::Drop(DropReason::Duplicate)
    );
    net.send(10, &GET[10..]);
    assert_eq!(net.server, GET);
    // Duplicate of delivered bytes: sent on without payload, so the server ACKs again.
    let o = net.send(0, GET);
    assert_eq!(
        o.fate,
        Fate::Trim {
            start: GET.len(),
            end: GET.len(),
            fin: false
        }
    );
    assert!(net.flow.stats().retransmitted >= (10 + GET.len()) as u64);
}

#[test]
fn overlapping_segment_with_different_bytes_is_never_delivered() {
    let mut net = Net::new();
    let allowed = b"GET /public/xx HTTP/1.1\r\nHost: svc\r\n\r\n";
    let evil = b"GET /admin/xxx HTTP/1.1\r\nHost: svc\r\n\r\n";
    assert_eq!(allowed.len(), evil.len());
    net.send(0, &allowed[..12]);
    // A "retransmission" that rewrites the held bytes and completes the head.
    let o = net.send(0, evil);
    assert!(
        matches!(o.fate, Fate::Drop(DropReason::Conflict(_))),
        "{o:?}"
    );
    assert_eq!(o.release, None);
    assert!(net.decisions.is_empty());
    net.send(12, &allowed[12..]);
    assert_eq!(net.server, allowed);
    assert_eq!(net.decisions[0].1, "/public/xx");
    assert_eq!(net.flow.stats().conflicts, 1);

    // Rewriting already delivered bytes: the old part is cut, the new part inspected.
    let tail = b"GET /admin HTTP/1.1\r\nHost: svc\r\n\r\n";
    let mut rewrite = evil.to_vec();
    rewrite.extend_from_slice(tail);
    let o = net.send(0, &rewrite);
    assert_eq!(
        o.fate,
        Fate::Trim {
            start: evil.len(),
            end: evil.len(),
            fin: false
        }
    );
    assert_eq!(o.refusal.unwrap().cause.status(), 403);
    assert_eq!(
        net.server, allowed,
        "the rewritten bytes never reach the server"
    );
    assert_eq!(net.decisions[1].1, "/admin");
}

#[test]
fn overlap_partly_new_is_trimmed() {
    let mut net = Net::new();
    let two = [GET, GET].concat();
    net.send(0, &two[..20]);
    net.send(20, &two[20..GET.len()]);
    // 10 old bytes, then the second GET.
    let o = net.send(GET.len() - 10, &two[GET.len() - 10..]);
    assert_eq!(
        o.fate,
        Fate::Trim {
            start: 10,
            end: GET.len() + 10,
            fin: false
        }
    );
    assert_eq!(net.server, two);
}

#[test]
fn wrapping_sequence_numbers() {
    for cisn in [u32::MAX - 5, u32::MAX, u32::MAX - GET.len() as u32] {
        let mut net = Net::with(Config::default(), cisn);
        net.send(15, &GET[15..]);
        net.send(0, &GET[..15]);
        assert_eq!(net.server, GET, "isn {cisn}");
        assert_eq!(net.send(GET.len(), GET).fate, Fate::Forward);
        assert_eq!(net.server, [GET, GET].concat());
    }
}

#[test]
fn fin_after_request_is_delivered_once_in_order() {
    let mut net = Net::new();
    let o = net.send_flags(0, GET, Flags::ACK | Flags::FIN);
    assert_eq!(o.fate, Fate::Forward);
    assert!(net.server_fin);

    // FIN received before the data it follows.
    let mut net = Net::new();
    let o = net.send_flags(GET.len(), b"", Flags::ACK | Flags::FIN);
    assert_eq!(o.fate, ACK_ONLY);
    assert!(!net.server_fin);
    let o = net.send(0, GET);
    assert_eq!(
        o.fate,
        Fate::Trim {
            start: 0,
            end: GET.len(),
            fin: true
        }
    );
    assert!(net.server_fin);

    // Split head, FIN on the last piece: released with the FIN.
    let mut net = Net::new();
    net.send(0, &GET[..5]);
    let o = net.send_flags(5, &GET[5..], Flags::ACK | Flags::FIN);
    assert!(o.release.unwrap().fin);
    assert!(net.server_fin);
    assert_eq!(net.server, GET);
}

#[test]
fn fin_in_the_middle() {
    let mut net = Net::new();
    net.send_flags(0, &GET[..10], Flags::ACK | Flags::FIN);
    let r = net.refusal.expect("a head cut by FIN is refused");
    assert_eq!(r.cause, RefuseCause::Truncated);
    assert_eq!(r.cause.status(), 400);
    assert!(net.server.is_empty());

    // Data after an in-order FIN is dropped.
    let mut net = Net::new();
    net.send_flags(0, GET, Flags::ACK | Flags::FIN);
    let o = net.send(GET.len(), GET);
    assert_eq!(o.fate, Fate::Drop(DropReason::AfterFin));
    // A FIN that moves is dropped.
    let o = net.send_flags(0, &GET[..4], Flags::ACK | Flags::FIN);
    assert_eq!(o.fate, Fate::Drop(DropReason::AfterFin));
    assert_eq!(net.server, GET);
}

#[test]
fn rst_ends_the_flow_and_held_bytes_are_never_delivered() {
    let mut net = Net::new();
    net.send(0, &GET[..10]);
    let o = net.send_flags(10, b"", Flags::RST);
    assert_eq!(o.fate, Fate::Forward);
    assert!(net.flow.is_closed());
    assert_eq!(
        net.send(10, &GET[10..]).fate,
        Fate::Drop(DropReason::Refused)
    );
    assert!(net.server.is_empty());
    assert_eq!(
        net.flow.tcp().state(),
        crate::enforce::flow::TcpState::Closed
    );
}

/// Found by the l7_flow fuzz target: a client RST carrying payload went out whole.
/// The reset still reaches the server; its bytes do not.
#[test]
fn a_reset_with_payload_goes_out_without_it() {
    let mut net = Net::new();
    net.send(0, &GET[..10]);
    let o = net.send_flags(10, b"GET /admin HTTP/1.1\r\n\r\n", Flags::RST | Flags::ACK);
    assert_eq!(o.fate, ACK_ONLY);
    assert!(net.server.is_empty());
    assert!(net.flow.is_closed());
    // Without payload it goes as it came.
    let mut net = Net::new();
    assert_eq!(net.send_flags(0, b"", Flags::RST).fate, Fate::Forward);
}

#[test]
fn incomplete_head_times_out_with_408() {
    let mut net = Net::new();
    assert_eq!(net.flow.poll_at(), None);
    net.send(0, &GET[..10]);
    let deadline = net.now.plus(Duration::from_secs(10));
    assert_eq!(net.flow.poll_at(), Some(deadline));
    // More bytes of the same head do not restart the timer (slow loris).
    net.tick(5_000);
    net.send(10, &GET[10..12]);
    assert_eq!(net.flow.poll_at(), Some(deadline));
    assert_eq!(
        net.flow.poll(Timestamp::from_millis(deadline.millis() - 1)),
        None
    );
    let r = net.flow.poll(deadline).expect("408");
    assert_eq!(r.cause, RefuseCause::Timeout);
    assert_eq!(r.cause.status(), 408);
    assert_eq!(r.server_seq, net.at(0));
    assert!(net.server.is_empty());
    assert_eq!(net.flow.poll_at(), None);

    // A completed head stops the timer.
    let mut net = Net::new();
    net.send(0, &GET[..10]);
    net.send(10, &GET[10..]);
    assert_eq!(net.flow.poll_at(), None);
}

#[test]
fn non_http_bytes_are_refused_with_400() {
    let mut net = Net::new();
    let o = net.send(0, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03");
    assert_eq!(o.fate, Fate::Drop(DropReason::Refused));
    let r = o.refusal.unwrap();
    assert!(matches!(
        r.cause,
        RefuseCause::Http(HttpError::Malformed(_))
    ));
    assert_eq!(r.cause.status(), 400);
    assert!(net.server.is_empty());
    assert!(net.decisions.is_empty());
}

#[test]
fn head_too_large_is_refused_with_431() {
    let mut net = Net::new();
    let mut off = 0;
    let start = b"GET / HTTP/1.1\r\nHost: svc\r\n";
    net.send(0, start);
    off += start.len();
    let line = b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n";
    while net.refusal.is_none() {
        net.send(off, line);
        off += line.len();
        assert!(net.flow.held() <= Config::default().limits.max_head + line.len());
    }
    assert_eq!(net.refusal.unwrap().cause.status(), 431);
    assert!(net.server.is_empty());
}

#[test]
fn path_tricks_are_decided_on_the_normalised_path() {
    for (target, decided) in [
        ("/public/../admin", Some("/admin")),
        ("//admin", Some("/admin")),
        ("/%2e%2e/admin", Some("/admin")),
        ("/a/./b", Some("/a/b")),
        ("/admin%2F", None),
    ] {
        let mut net = Net::new();
        let req = format!("GET {target} HTTP/1.1\r\nHost: svc\r\n\r\n");
        let o = net.send(0, req.as_bytes());
        match decided {
            Some(path) => assert_eq!(net.decisions, [("GET".to_string(), path.to_string())]),
            None => {
                assert!(net.decisions.is_empty());
                assert_eq!(
                    o.refusal.unwrap().cause,
                    RefuseCause::Path(PathError::EncodedSeparator)
                );
                assert_eq!(RefuseCause::Path(PathError::EncodedSeparator).status(), 400);
            }
        }
    }
}

#[test]
fn untracked_segments_are_dropped() {
    let mut flow = L7Flow::new(Config::default(), Timestamp::default());
    let s = seg(SeqNumber(5), 0, Flags::ACK, GET);
    let o = flow.on_client_segment(&s, Timestamp::default(), policy);
    assert_eq!(
        o.fate,
        Fate::Drop(DropReason::Untracked(InvalidSegment::NoHandshake))
    );
}

#[test]
fn syn_data_is_not_taken() {
    let mut flow = L7Flow::new(Config::default(), Timestamp::default());
    let s = seg(SeqNumber(5), 0, Flags::SYN, GET);
    let o = flow.on_client_segment(&s, Timestamp::default(), |_| {
        panic!("no decision on SYN data")
    });
    assert_eq!(o.fate, ACK_ONLY);
}

#[test]
fn pure_acks_pass_even_while_holding() {
    let mut net = Net::new();
    net.send(0, &GET[..10]);
    let o = net.send(10, b"");
    assert_eq!(o.fate, ACK_ONLY);
    assert!(net.server.is_empty());
}

#[test]
fn out_of_window_segments_are_dropped_not_fatal() {
    let config = Config {
        max_held: 20_000,
        ..Config::default()
    };
    let mut net = Net::with(config, CISN);
    let o = net.send(100_000, b"far ahead");
    assert_eq!(o.fate, Fate::Drop(DropReason::OutOfWindow));
    assert!(!net.flow.is_closed());
    assert_eq!(net.send(0, GET).fate, Fate::Forward);
}

#[test]
fn close_sequence_passes() {
    let mut net = Net::new();
    let o = net.send_flags(0, GET, Flags::ACK | Flags::FIN);
    assert_eq!(o.fate, Fate::Forward);
    let resp = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
    let fin_ack = CISN + 2 + GET.len() as u32;
    let s = seg(SeqNumber(SISN + 1), fin_ack, Flags::ACK | Flags::FIN, resp);
    assert!(net.flow.on_server_segment(&s, net.now));
    assert_eq!(
        net.flow.tcp().state(),
        crate::enforce::flow::TcpState::Closing
    );
    // The client's last ACK, one past its FIN.
    let o = net.send_flags(GET.len() + 1, b"", Flags::ACK);
    assert!(matches!(o.fate, ACK_ONLY | Fate::Forward));
    // A retransmitted FIN goes out again so that the server ACKs it.
    let o = net.send_flags(GET.len(), b"", Flags::ACK | Flags::FIN);
    assert_eq!(
        o.fate,
        Fate::Trim {
            start: 0,
            end: 0,
            fin: true
        }
    );
}

#[test]
fn refused_flow_frees_its_buffer() {
    let mut net = Net::new();
    net.send(0, &GET[..10]);
    assert!(net.flow.memory() >= 10);
    net.send(10, b"\x00garbage");
    assert!(net.flow.is_closed());
    assert_eq!(net.flow.poll(net.now), None);
    assert_eq!(net.flow.held(), 0);
    assert!(net.flow.memory() < 64);
}

mod shuffled {
    use super::*;
    use proptest::prelude::*;

    /// Requests a client may send; `true` if `policy` allows them.
    fn request(kind: u8, size: usize) -> (Vec<u8>, bool) {
        match kind % 5 {
            0 => (GET.to_vec(), true),
            1 => (
                b"GET /public/../admin HTTP/1.1\r\nHost: svc\r\n\r\n".to_vec(),
                false,
            ),
            2 => (POST.to_vec(), false),
            3 => {
                let mut r =
                    format!("PUT /u HTTP/1.1\r\nHost: svc\r\nContent-Length: {size}\r\n\r\n")
                        .into_bytes();
                r.extend((0..size).map(|i| b'a' + (i % 26) as u8));
                (r, true)
            }
            _ => {
                let size = size.max(1);
                let mut r =
                    b"PUT /c HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
                r.extend(format!("{size:x};e=1\r\n").as_bytes());
                r.extend(std::iter::repeat_n(b'q', size));
                r.extend(b"\r\n0\r\nT: 1\r\n\r\n");
                (r, true)
            }
        }
    }

    /// Heads in `stream` (complete ones), as (method, normalised path).
    fn heads(stream: &[u8]) -> Vec<(String, String)> {
        let mut p = RequestStream::default();
        let mut pos = 0;
        let mut out = Vec::new();
        loop {
            let mut hdrs = [httparse::EMPTY_HEADER; MAX_HEADERS];
            match p.parse(&stream[pos..], &mut hdrs) {
                Ok(Step::Head { head, len }) => {
                    let path = http_path::normalize(head.target).unwrap();
                    out.push((head.method.to_string(), path));
                    pos += len;
                }
                Ok(Step::Body { len }) => pos += len,
                Ok(Step::Partial) | Err(_) => return out,
            }
        }
    }

    #[derive(Debug, Clone)]
    enum Send {
        /// Segment `i` of the true stream.
        True(usize),
        /// Forged bytes at a stream offset.
        Forged(usize, Vec<u8>),
    }

    type Scenario = (Vec<(u8, usize)>, Vec<usize>, Vec<Send>, bool, bool);

    fn scenario() -> impl Strategy<Value = Scenario> {
        (
            proptest::collection::vec((0u8..5, 0usize..3000), 1..6),
            proptest::collection::vec(1usize..1500, 1..40),
            proptest::collection::vec(
                prop_oneof![
                    4 => (0usize..64).prop_map(Send::True),
                    1 => (0usize..4000, proptest::collection::vec(any::<u8>(), 1..40))
                        .prop_map(|(o, b)| Send::Forged(o, b)),
                ],
                0..60,
            ),
            any::<bool>(),
            any::<bool>(),
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// Whatever the segmentation, order, duplication and forgery, the bytes the
        /// server receives are bytes whose every request head was decided and allowed.
        /// Without forgery, it receives exactly the stream up to the first denied request.
        #[test]
        fn delivered_is_inspected(
            (reqs, cuts, schedule, forge, small) in scenario(),
        ) {
            let mut stream = Vec::new();
            let mut expect_len = None;
            let mut expect_decisions = Vec::new();
            for &(kind, size) in &reqs {
                let (bytes, allowed) = request(kind, size);
                if expect_len.is_none() {
                    expect_decisions.extend(heads(&bytes));
                    if !allowed {
                        expect_len = Some(stream.len());
                    }
                }
                stream.extend(bytes);
            }
            let expect_len = expect_len.unwrap_or(stream.len());

            // Cut the stream into segments of the drawn sizes (the last size repeats).
            let mut segs = Vec::new();
            let mut off = 0;
            let mut i = 0;
            while off < stream.len() {
                let n = cuts[i.min(cuts.len() - 1)].min(stream.len() - off);
                segs.push((off, n));
                off += n;
                i += 1;
            }

            // A small buffer makes out-of-order segments overflow it.
            let config = if small {
                Config {
                    limits: Limits { max_head: 1024, ..Limits::default() },
                    max_held: 1500,
                    ..Config::default()
                }
            } else {
                Config::default()
            };
            let mut net = Net::with(config, CISN);
            net.strict = !forge;
            let send_true = |net: &mut Net, i: usize| {
                let (off, n) = segs[i % segs.len()];
                net.send(off, &stream[off..off + n]);
            };
            for s in &schedule {
                match s {
                    Send::True(i) => send_true(&mut net, *i),
                    Send::Forged(off, bytes) if forge => {
                        net.send(*off, bytes);
                    }
                    Send::Forged(..) => {}
                }
            }
            // Then everything in order, as TCP retransmission eventually does, until the
            // server's stream stops growing (bytes cut at a full buffer come again).
            loop {
                let before = net.server.len();
                for i in 0..segs.len() {
                    send_true(&mut net, i);
                }
                if net.server.len() == before {
                    break;
                }
            }

            // Every complete head delivered was decided, and allowed, in order.
            let delivered = heads(&net.server);
            prop_assert!(delivered.len() <= net.decisions.len());
            prop_assert_eq!(&delivered[..], &net.decisions[..delivered.len()]);
            for (method, path) in &delivered {
                prop_assert!(method != "POST" && !path.starts_with("/admin"));
            }
            if !forge {
                prop_assert_eq!(net.server.len(), expect_len);
                prop_assert_eq!(&net.server[..], &stream[..expect_len]);
                prop_assert_eq!(&net.decisions, &expect_decisions);
            }
        }
    }
}

/// A delivered segment lost before the server read it: the client retransmits it, the
/// flow cannot tell the same bytes from others (no copy) and cuts them; after
/// LOST_AFTER retransmissions with the server's acknowledgement standing still, the flow
/// is refused (502) and the server reset where it stopped, instead of stalling.
#[test]
fn bytes_lost_on_the_way_to_the_server_end_the_flow_instead_of_stalling() {
    let mut net = Net::new();
    net.send(0, GET);
    assert_eq!(net.server, GET);
    // The second request goes out but never reaches the server (its backlog was full).
    let n = GET.len();
    let lost = seg(net.at(n), SISN + 1, Flags::ACK | Flags::PSH, GET);
    assert_eq!(
        net.flow.on_client_segment(&lost, net.now, policy).fate,
        Fate::Forward
    );
    for k in 1..LOST_AFTER {
        net.tick(200 << k);
        let o = net.send(n, GET);
        assert_eq!(o.refusal, None, "retransmission {k}");
        assert!(matches!(o.fate, Fate::Trim { start, end, .. } if start == end));
    }
    net.tick(1600);
    let o = net.send(n, GET);
    assert_eq!(o.fate, Fate::Drop(DropReason::Refused));
    let r = o.refusal.expect("refused");
    assert_eq!(r.cause, RefuseCause::Undelivered);
    assert_eq!(r.cause.status(), 502);
    // The reset goes where the server stopped; the client hears back for all it sent.
    assert_eq!(r.server_seq, net.at(n));
    assert_eq!(r.client_ack, net.at(2 * n));
    assert!(net.flow.is_closed());
    assert_eq!(net.server, GET, "nothing else was delivered");
}

/// A held head, acknowledged to the client on the server's behalf, released and then
/// lost before the server read it: the client will not send it again, so the flow gives
/// the server RELEASE_ACK_TIMEOUT (restarted whenever its acknowledgement moves), then
/// refuses with 502 and resets the server where it stopped.
#[test]
fn released_bytes_the_server_never_acknowledges_end_the_flow() {
    let mut net = Net::new();
    net.send(0, GET);
    let n = GET.len();
    let head = seg(net.at(n), SISN + 1, Flags::ACK | Flags::PSH, &GET[..10]);
    let o = net.flow.on_client_segment(&head, net.now, policy);
    assert_eq!(o.held_ack.map(|a| a.ack), Some(net.at(n + 10)));
    // The rest completes the head: all of it is released, and lost on the way.
    let rest = seg(
        net.at(n + 10),
        SISN + 1,
        Flags::ACK | Flags::PSH,
        &GET[10..],
    );
    let o = net.flow.on_client_segment(&rest, net.now, policy);
    assert_eq!(o.release.map(|r| (r.seq, r.len)), Some((net.at(n), n)));
    let sent = net.now;
    assert_eq!(net.flow.poll_at(), Some(sent.plus(RELEASE_ACK_TIMEOUT)));
    // The server takes a part after 2 s: the clock starts over from there.
    net.tick(2_000);
    let part = seg(SeqNumber(SISN + 1), net.at(n + 5).0, Flags::ACK, b"");
    assert!(net.flow.on_server_segment(&part, net.now));
    let deadline = net.now.plus(RELEASE_ACK_TIMEOUT);
    assert_eq!(net.flow.poll_at(), Some(deadline));
    assert_eq!(
        net.flow.poll(Timestamp::from_millis(deadline.millis() - 1)),
        None
    );
    let r = net.flow.poll(deadline).expect("refused");
    assert_eq!(r.cause, RefuseCause::Undelivered);
    assert_eq!(r.server_seq, net.at(n + 5), "where the server stopped");
    assert!(net.flow.is_closed());

    // Acknowledged in time: no deadline is left.
    let mut net = Net::new();
    net.send(0, &GET[..10]);
    net.send(10, &GET[10..]);
    assert_eq!(net.server, GET);
    assert_eq!(net.flow.poll_at(), None);
    net.tick(10 * RELEASE_ACK_TIMEOUT.as_millis() as u64);
    assert_eq!(net.flow.poll(net.now), None);
}

/// Retransmissions of bytes the server has (its ACK late or lost on the way back) are
/// cut and never end the flow; a count in progress starts over when the server's
/// acknowledgement moves.
#[test]
fn spurious_retransmissions_are_not_taken_for_loss() {
    let mut net = Net::new();
    net.send(0, GET);
    assert_eq!(net.server, GET);
    for _ in 0..2 * LOST_AFTER {
        let o = net.send(0, GET);
        assert_eq!(o.refusal, None);
        assert!(matches!(o.fate, Fate::Trim { start, end, .. } if start == end));
    }
    // Found by the proptest: a segment that carries a whole request and the start of
    // the next (held), sent again and again. The server acknowledged the delivered
    // part; the held part is not a loss.
    let mut net = Net::new();
    let two = [GET, &GET[..10]].concat();
    net.send(0, &two);
    assert_eq!(net.server, GET);
    for _ in 0..2 * LOST_AFTER {
        let o = net.send(0, &two);
        assert_eq!(o.refusal, None);
    }
    net.send(two.len(), &GET[10..]);
    assert_eq!(net.server, [GET, GET].concat());
    // Unacknowledged for a while, then acknowledged: the count starts over.
    let mut net = Net::new();
    let s = seg(net.at(0), SISN + 1, Flags::ACK | Flags::PSH, GET);
    assert_eq!(
        net.flow.on_client_segment(&s, net.now, policy).fate,
        Fate::Forward
    );
    for _ in 1..LOST_AFTER {
        assert_eq!(net.send(0, GET).refusal, None);
    }
    net.server.extend_from_slice(GET);
    net.server_ack();
    for _ in 0..LOST_AFTER {
        assert_eq!(net.send(0, GET).refusal, None);
    }
    assert!(!net.flow.is_closed());
}

#[test]
fn retransmitted_syn_keeps_the_stream() {
    let mut net = Net::new();
    net.send(0, &GET[..10]);
    let syn = seg(net.cisn, 0, Flags::SYN, b"");
    assert_eq!(
        net.flow.on_client_segment(&syn, net.now, policy).fate,
        Fate::Forward
    );
    net.send(10, &GET[10..]);
    assert_eq!(net.server, GET);
    let syn = seg(net.cisn + 5, 0, Flags::SYN, b"");
    let o = net.flow.on_client_segment(&syn, net.now, policy);
    assert_eq!(
        o.fate,
        Fate::Drop(DropReason::Untracked(InvalidSegment::SynMismatch))
    );
}

#[test]
fn refusal_packets_fit_the_connection() {
    use crate::enforce::inject;
    use etherparse::{SlicedPacket, TransportSlice};

    let mut net = Net::new();
    net.send(0, GET);
    let resp = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
    let s = seg(
        SeqNumber(SISN + 1),
        CISN + 1 + GET.len() as u32,
        Flags::ACK,
        resp,
    );
    assert!(net.flow.on_server_segment(&s, net.now));
    let r = net.send(GET.len(), POST).refusal.unwrap();

    let ends = inject::Endpoints {
        client: "100.64.0.1:40000".parse().unwrap(),
        server: "100.64.0.2:8080".parse().unwrap(),
    };
    let (mut text, mut out) = (String::new(), Vec::new());
    inject::response(&ends, &r, &mut text, &mut out).unwrap();
    let p = SlicedPacket::from_ip(&out).unwrap();
    let Some(TransportSlice::Tcp(tcp)) = p.transport else {
        panic!("not TCP")
    };
    // Right after the server's response, acknowledging the whole POST.
    assert_eq!(tcp.sequence_number(), SISN + 1 + resp.len() as u32);
    assert_eq!(
        tcp.acknowledgment_number(),
        CISN + 1 + (GET.len() + POST.len()) as u32
    );
    assert!(tcp.payload().starts_with(b"HTTP/1.1 403 Forbidden\r\n"));

    inject::reset(&ends, &r, &mut out).unwrap();
    let p = SlicedPacket::from_ip(&out).unwrap();
    let Some(TransportSlice::Tcp(tcp)) = p.transport else {
        panic!("not TCP")
    };
    // Exactly where the server's stream stops: after the GET, before the POST.
    assert!(tcp.rst());
    assert_eq!(tcp.sequence_number(), CISN + 1 + GET.len() as u32);
    assert_eq!(tcp.acknowledgment_number(), SISN + 1 + resp.len() as u32);
}

#[test]
fn urgent_data_is_refused() {
    let mut net = Net::new();
    net.send(0, GET);
    let o = net.send_flags(
        GET.len(),
        b"GET /admin HTTP/1.1\r\n",
        Flags::ACK | Flags::URG,
    );
    assert_eq!(o.fate, Fate::Drop(DropReason::Refused));
    let r = o.refusal.unwrap();
    assert_eq!(r.cause, RefuseCause::Urgent);
    assert_eq!(r.server_seq, net.at(GET.len()));
    assert_eq!(net.server, GET);
}

#[test]
fn a_flow_is_small_until_it_holds_bytes() {
    // 10,000 tracked flows must fit the memory budget (issue 6: under 50 MiB in all).
    let size = std::mem::size_of::<L7Flow>();
    // 640 until the pointer to what passed ahead of a hole (`Passed`, boxed).
    assert!(size <= 648, "L7Flow is {size} bytes");
    let net = Net::new();
    assert_eq!(net.flow.memory(), 0);
}

#[test]
fn held_head_bytes_are_acknowledged_to_the_client() {
    // Regression (netns test l7.rs, large heads): held bytes never reach the server, so
    // without this ACK a sender stops at its congestion window and a head larger than
    // it ends in 408 instead of being decided.
    let mut net = Net::new();
    let head = b"GET /api/items HTTP/1.1\r\nHost: svc\r\nX-Big: ";
    let o = net.send(0, head);
    assert_eq!(o.fate, Fate::Drop(DropReason::Buffered));
    assert_eq!(
        o.held_ack,
        Some(HeldAck {
            seq: SeqNumber(SISN + 1),
            ack: net.at(head.len()),
            window: 65535,
            timestamps: None,
        })
    );
    // A retransmission (our ACK was lost) is acknowledged again.
    let o = net.send(0, head);
    assert_eq!(o.fate, Fate::Drop(DropReason::Duplicate));
    assert_eq!(o.held_ack.map(|a| a.ack), Some(net.at(head.len())));
    // Out of order: only the in-order part is acknowledged.
    let o = net.send(head.len() + 10, b"zzzz");
    assert_eq!(o.held_ack.map(|a| a.ack), Some(net.at(head.len())));
    // Once the head completes and is released, nothing is left to acknowledge: the
    // server's own ACK follows the delivered bytes.
    let o = net.send(head.len(), b"0123456789zzzz\r\n\r\n");
    assert!(o.release.is_some());
    assert_eq!(o.held_ack, None);
    assert!(net.server.starts_with(head));
    // A refused flow acknowledges nothing more.
    let mut net = Net::new();
    let o = net.send(0, b"POST /api/items HTTP/1.1\r\nHost: svc\r\n\r\n");
    assert!(o.refusal.is_some());
    assert_eq!(o.held_ack, None);
}

/// Regression (issue 18.8, issue 26.2): after refusing a request, the flow dropped
/// everything the client sent; the client's FIN was never acknowledged and its socket
/// sat in LAST-ACK retransmitting. Each client segment now gets what the server would
/// have answered: the response again while the client has not acknowledged all of
/// it, an ACK of its FIN, a reset for data nobody will read.
#[test]
fn a_refused_client_is_answered_until_it_has_closed() {
    let mut net = Net::new();
    let r = net.send(0, POST).refusal.expect("refused");
    assert_eq!(
        r.response_end,
        r.client_seq + (crate::enforce::l7::response::response_len(&r.cause) + 1)
    );
    let end = net.at(POST.len());
    let client = |net: &mut Net, seq: SeqNumber, ack: SeqNumber, flags: Flags, data: &[u8]| {
        let s = seg(seq, ack.0, flags, data);
        let o = net.flow.on_client_segment(&s, net.now, policy);
        assert_eq!(o.fate, Fate::Drop(DropReason::Refused));
        assert_eq!((o.release, o.refusal, o.held_ack), (None, None, None));
        o.answer
    };
    // A segment that crossed the response (it acknowledges only the server's SYN):
    // within ANSWER_INTERVAL nothing, after it the response again, acknowledging the
    // client's FIN too.
    let before = r.client_seq;
    let fin = Flags::ACK | Flags::FIN;
    assert_eq!(client(&mut net, end, before, fin, b""), None);
    net.tick(ANSWER_INTERVAL.as_millis() as u64);
    assert_eq!(
        client(&mut net, end, before, fin, b""),
        Some(Answer::Response)
    );
    assert_eq!(
        net.flow.refusal(),
        Some(Refusal {
            client_ack: end + 1,
            ..r
        })
    );
    // The client has the whole answer: its FIN is acknowledged (each time it comes).
    for _ in 0..2 {
        assert_eq!(
            client(&mut net, end, r.response_end, fin, b""),
            Some(Answer::Ack {
                seq: r.response_end,
                ack: end + 1
            })
        );
    }
    // A pure ACK needs nothing.
    assert_eq!(
        client(&mut net, end + 1, r.response_end, Flags::ACK, b""),
        None
    );
    // Data after the answer: reset, then silence.
    assert_eq!(
        client(&mut net, end + 1, r.response_end, Flags::ACK, b"more"),
        Some(Answer::Reset {
            seq: r.response_end
        })
    );
    assert_eq!(client(&mut net, end + 5, r.response_end, fin, b""), None);
    assert!(net.server.is_empty(), "nothing reached the server");
}

/// A client that resets its own refused connection gets nothing back.
#[test]
fn a_refused_client_that_resets_gets_no_answer() {
    let mut net = Net::new();
    let r = net.send(0, POST).refusal.expect("refused");
    let end = net.at(POST.len());
    let rst = seg(end, r.response_end.0, Flags::RST, b"");
    assert_eq!(
        net.flow.on_client_segment(&rst, net.now, policy).answer,
        None
    );
    net.tick(1000);
    let late = seg(end, r.client_seq.0, Flags::ACK, b"");
    assert_eq!(
        net.flow.on_client_segment(&late, net.now, policy).answer,
        None
    );
}

/// Regression (issue 26): a sender in loss recovery resends in one burst bytes that meshd
/// delivered (or just released from its buffer) before the server's acknowledgement of
/// them came back, some twice (a duplicated datagram). That is not a loss on the way to
/// the server, and must not end in 502. The same bytes resent at the sender's
/// retransmission timer, the server's acknowledgement standing still, still are.
#[test]
fn a_burst_of_retransmissions_is_not_a_lost_delivery() {
    let mut net = Net::new();
    net.send(0, GET);
    let n = GET.len();
    // Three more requests go out; the server has not acknowledged them yet.
    let three = [GET, GET, GET].concat();
    let s = seg(net.at(n), SISN + 1, Flags::ACK | Flags::PSH, &three);
    assert_eq!(
        net.flow.on_client_segment(&s, net.now, policy).fate,
        Fate::Forward
    );
    for (k, off) in [0, n, n, 2 * n, 2 * n].into_iter().enumerate() {
        let again = seg(net.at(n + off), SISN + 1, Flags::ACK, GET);
        let o = net.flow.on_client_segment(&again, net.now, policy);
        assert_eq!(o.refusal, None, "retransmission {k} of the burst");
    }
    for k in 0..LOST_AFTER {
        net.tick(200 << k);
        let again = seg(net.at(n), SISN + 1, Flags::ACK, GET);
        let o = net.flow.on_client_segment(&again, net.now, policy);
        let cause = o.refusal.map(|r| r.cause);
        if k + 1 < LOST_AFTER {
            assert_eq!(cause, None, "retransmission {k} at the timer");
        } else {
            assert_eq!(cause, Some(RefuseCause::Undelivered));
        }
    }
}

/// Regression (issue 26): under reordering the server drops a late segment whose TSval
/// is older than one it took since (PAWS, RFC 7323 §5) although meshd delivered it in
/// order; the client's retransmission of those body bytes was then cut as a duplicate,
/// the server never got them, and the upload ended in 502. Opaque body bytes behind the
/// position go out again; head bytes never do.
#[test]
fn retransmitted_body_bytes_go_out_again() {
    let mut net = Net::new();
    let head = b"PUT /u HTTP/1.1\r\nHost: svc\r\nContent-Length: 30\r\n\r\n";
    let h = head.len();
    let body = [b'z'; 30];
    let first = [&head[..], &body[..10]].concat();
    net.send(0, &first);
    net.send(h + 10, &body[10..20]);
    // Body bytes again: out as they came.
    assert_eq!(net.send(h + 10, &body[10..20]).fate, Fate::Forward);
    // Old body bytes and new ones: the whole segment.
    assert_eq!(net.send(h + 15, &body[15..25]).fate, Fate::Forward);
    // Head bytes with body bytes: the head part is cut.
    let o = net.send(0, &first);
    assert!(
        matches!(o.fate, Fate::Trim { start, end, .. } if start == end),
        "{o:?}"
    );
    net.send(h + 25, &body[25..]);
    assert_eq!(net.server, [&head[..], &body].concat());
    // Once the next head is read, the body is behind it: its bytes are cut again.
    net.send(h + 30, GET);
    let o = net.send(h + 10, &body[10..20]);
    assert!(
        matches!(o.fate, Fate::Trim { start, end, .. } if start == end),
        "{o:?}"
    );
    assert_eq!(net.decisions.len(), 2);
}

/// A hole-filler that comes late (reordered) carries an older TSval than segments sent
/// after it; bytes released with it carry the newest, which the server (PAWS) accepts.
#[test]
fn released_bytes_carry_the_newest_timestamps() {
    let mut net = Net::new();
    let (a, b) = GET.split_at(12);
    let mut late = seg(net.at(12), SISN + 1, Flags::ACK | Flags::PSH, b);
    late.timestamps = Some(Timestamps { val: 80, ecr: 3 });
    net.flow.on_client_segment(&late, net.now, policy);
    let mut filler = seg(net.at(0), SISN + 1, Flags::ACK | Flags::PSH, a);
    filler.timestamps = Some(Timestamps { val: 70, ecr: 2 });
    let o = net.flow.on_client_segment(&filler, net.now, policy);
    assert_eq!(
        o.release.map(|r| r.timestamps),
        Some(Some(Timestamps { val: 80, ecr: 3 }))
    );
}

/// A segment of inspected bytes that arrives in order but later than a newer one (its
/// TSval older than one the server may have taken) would be dropped by the server
/// (PAWS), and meshd never sends inspected bytes twice: it goes with the client's
/// newest timestamps.
#[test]
fn an_old_timestamp_on_inspected_bytes_is_raised() {
    let mut net = Net::new();
    let mut ack = seg(net.at(0), SISN + 1, Flags::ACK, b"");
    ack.timestamps = Some(Timestamps { val: 60, ecr: 9 });
    net.flow.on_client_segment(&ack, net.now, policy);
    let mut late = seg(net.at(0), SISN + 1, Flags::ACK | Flags::PSH, GET);
    late.timestamps = Some(Timestamps { val: 55, ecr: 8 });
    let o = net.flow.on_client_segment(&late, net.now, policy);
    assert_eq!(o.fate, Fate::Forward);
    assert_eq!(o.timestamps, Some(Timestamps { val: 60, ecr: 9 }));
    // Newest already: unchanged.
    let mut next = seg(net.at(GET.len()), SISN + 1, Flags::ACK | Flags::PSH, GET);
    next.timestamps = Some(Timestamps { val: 61, ecr: 9 });
    let o = net.flow.on_client_segment(&next, net.now, policy);
    assert_eq!((o.fate, o.timestamps), (Fate::Forward, None));
}

const CHUNKED_PUT: &[u8] = b"PUT /c HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n";

/// A chunked body of chunks of these sizes (data a pattern), the last chunk and an
/// empty trailer section.
fn chunked_body(sizes: &[usize]) -> Vec<u8> {
    let mut body = Vec::new();
    for (k, &n) in sizes.iter().enumerate() {
        body.extend(format!("{n:x}\r\n").as_bytes());
        body.extend((0..n).map(|i| b'a' + ((i + k) % 26) as u8));
        body.extend(b"\r\n");
    }
    body.extend(b"0\r\n\r\n");
    body
}

/// Regression (issue 26): after a loss in a chunk's data, the framing after that data
/// and everything behind it were held until the hole was filled: the server saw nothing
/// past the chunk, answered with no SACK blocks, and the client waited for its
/// retransmission timer at every loss (a 50 MiB chunked upload under 0.5% loss took
/// 5–8 s against 0.5 s with a Content-Length). Where a chunk's data ends is known, so
/// the framing after a hole is read ahead of it and passes with the data, up to the
/// end of the body; nothing is held.
#[test]
fn chunk_framing_after_a_hole_is_read_ahead_of_it() {
    let mut net = Net::new();
    let h = CHUNKED_PUT.len();
    net.send(0, CHUNKED_PUT);
    let body = chunked_body(&[3000, 2500, 4000]);
    // The first size line in order, then segments of 700 bytes; the first is lost.
    net.send(h, &body[..5]);
    let segs: Vec<(usize, usize)> = (5..body.len())
        .step_by(700)
        .map(|o| (o, (o + 700).min(body.len())))
        .collect();
    for &(a, b) in &segs[1..] {
        let o = net.send(h + a, &body[a..b]);
        assert_eq!(o.fate, Fate::Forward, "bytes {a}..{b}");
        assert_eq!(o.held_ack, None);
        assert_eq!(net.flow.held(), 0);
    }
    assert_eq!(net.server.len(), h + 5, "the server waits for the hole");
    // The hole: the server has the whole body.
    let (a, b) = segs[0];
    assert_eq!(net.send(h + a, &body[a..b]).fate, Fate::Forward);
    assert_eq!(net.server, [CHUNKED_PUT, &body].concat());
    // The next request is decided in order and goes straight through.
    assert_eq!(net.send(h + body.len(), GET).fate, Fate::Forward);
    assert_eq!(net.server, [CHUNKED_PUT, &body, GET].concat());
    assert_eq!(net.decisions.len(), 2);
    let stats = net.flow.stats();
    assert_eq!((stats.copied, stats.released), (0, 0), "{stats:?}");
}

/// Framing read ahead of a hole was sent to the server out of order; the client may
/// send its bytes again (the server dropped them, or a loss and a timer crossed). A
/// retransmission that agrees with the copy meshd read goes out again (only the client
/// can repair a drop); one whose framing differs is dropped whole, as a conflict with
/// held bytes is, so that what the server reads as framing is what meshd read
/// (invariant 4). Chunk data may differ: it decides nothing.
#[test]
fn framing_sent_again_ahead_of_a_hole_must_agree_with_what_was_read() {
    let mut net = Net::new();
    let h = CHUNKED_PUT.len();
    net.send(0, CHUNKED_PUT);
    let body = chunked_body(&[100, 100]);
    // "64\r\n" + 100 bytes + "\r\n64\r\n" at 104..110 + 100 bytes + ...
    net.send(h, &body[..4]);
    let straddle = 90..130;
    assert_eq!(
        net.send(h + straddle.start, &body[straddle.clone()]).fate,
        Fate::Forward
    );
    // The same bytes again, and data around the framing: out again.
    assert_eq!(
        net.send(h + straddle.start, &body[straddle.clone()]).fate,
        Fate::Forward
    );
    assert_eq!(net.send(h + 100, &body[100..106]).fate, Fate::Forward);
    let mut other_data = body[straddle.clone()].to_vec();
    other_data[..14].fill(b'#');
    other_data[20..].fill(b'#');
    net.strict = false; // other data bytes at the server: its TCP's business
    assert_eq!(net.send(h + 90, &other_data).fate, Fate::Forward);
    net.strict = true;
    // Other framing: a different size, or a CRLF moved.
    for (at, forged) in [
        (h + 106, &b"FF"[..]),
        (h + 104, b"\n\r"),
        (h + 100, b"xyzw\r\n7"),
    ] {
        let o = net.send(at, forged);
        assert!(
            matches!(o.fate, Fate::Drop(DropReason::Conflict(_))),
            "{forged:?}: {o:?}"
        );
    }
    assert_eq!(net.flow.stats().conflicts, 3);
    // The hole, then the rest: the server reads the framing meshd read.
    net.strict = false;
    net.send(h + 4, &body[4..90]);
    net.send(h + 130, &body[130..]);
    net.send(h + body.len(), GET);
    assert_eq!(&net.server[h + 104..h + 110], b"\r\n64\r\n");
    assert_eq!(net.server.len(), h + body.len() + GET.len());
    assert_eq!(net.decisions.len(), 2);
}

/// The next head is read in order only: ahead of a hole the parser stops at the end of
/// the chunked body (its trailers pass), and what follows waits, unacknowledged (an
/// acknowledgement would cover the hole), while the client sends, until the server has
/// everything before it; then a pipelined request is decided, and a denied one
/// refused, as in order. A FIN behind held bytes is no truncated request while the hole
/// may still be filled.
#[test]
fn the_next_head_waits_for_a_hole_before_it() {
    let mut net = Net::new();
    let h = CHUNKED_PUT.len();
    net.send(0, CHUNKED_PUT);
    let body = chunked_body(&[50]);
    let admin = b"GET /admin/x HTTP/1.1\r\nHost: svc\r\n\r\n";
    let rest = [&body[40..body.len() - 2], b"T: 1\r\n\r\n"].concat();
    let tail = [&rest[..], GET, admin].concat();
    net.send(h, &body[..4]);
    // From inside the chunk's data: the rest of the body, two more requests, the FIN.
    let o = net.send_flags(h + 40, &tail, Flags::ACK | Flags::FIN);
    assert_eq!(
        o.fate,
        Fate::Trim {
            start: 0,
            end: rest.len(),
            fin: false
        }
    );
    assert_eq!((o.refusal, o.held_ack), (None, None));
    assert_eq!(net.decisions.len(), 1, "no head decided ahead of the hole");
    // The held heads wait as a body's hole does: while the client sends.
    let timeout = Config::default().head_timeout.as_millis() as u64;
    for _ in 0..3 {
        net.tick(timeout - 1000);
        assert_eq!(net.flow.poll(net.now), None);
        let o = net.send_flags(h + 40, &tail, Flags::ACK | Flags::FIN);
        assert_eq!(
            o.fate,
            Fate::Trim {
                start: 0,
                end: rest.len(),
                fin: false
            }
        );
    }
    // The hole: the server has the whole body and says so; the held bytes are read at
    // the next client segment (its retransmission).
    assert_eq!(net.send(h + 4, &body[4..40]).fate, Fate::Forward);
    assert_eq!(net.server, [CHUNKED_PUT, &body[..40], &rest].concat());
    let o = net.send_flags(h + 40, &tail, Flags::ACK | Flags::FIN);
    assert_eq!(net.decisions.len(), 3);
    let r = o.refusal.expect("the pipelined /admin is refused");
    assert_eq!(r.cause.status(), 403);
    assert_eq!(r.server_seq, net.at(h + 40 + rest.len() + GET.len()));
    assert_eq!(net.server, [CHUNKED_PUT, &body[..40], &rest, GET].concat());
}

/// A chunk whose framing read ahead of a hole is wrong is refused at once, 400, without
/// waiting for the hole; the wrong bytes never reach the server, and its reset goes
/// where it stopped (the hole), the only number it takes (RFC 5961 §3.2).
#[test]
fn bad_framing_ahead_of_a_hole_is_refused_at_once() {
    let mut net = Net::new();
    let h = CHUNKED_PUT.len();
    net.send(0, CHUNKED_PUT);
    net.send(h, b"a\r\n");
    // Data 3..13, then a size line with a bad digit: the data goes, no framing.
    let o = net.send(h + 8, b"fghij\r\n1z\r\n");
    assert_eq!(
        o.fate,
        Fate::Trim {
            start: 0,
            end: 5,
            fin: false
        }
    );
    let r = o.refusal.expect("refused");
    assert_eq!(r.cause, RefuseCause::Http(HttpError::InvalidChunkSize));
    assert_eq!(r.cause.status(), 400);
    assert_eq!(r.server_seq, net.at(h + 3), "where the server stopped");
    assert!(net.flow.is_closed());
    assert_eq!(net.server.len(), h + 3);
    assert!(!net.ahead.values().any(|b| b.contains(&b'z')));
}

/// Invariant 6: a flood of tiny chunks after a hole cannot make the flow copy framing
/// without bound. The copy stops at MAX_FRAMING_RUNS runs (or MAX_FRAMING_BYTES); the
/// framing after that is held as before (the buffer's limit then drops what does not
/// fit, for the client to send again); once the server has everything up to the
/// position, the rest is read in order and the stream completes exactly.
#[test]
fn a_flood_of_tiny_chunks_ahead_of_a_hole_is_copied_up_to_a_bound() {
    let mut net = Net::new();
    let h = CHUNKED_PUT.len();
    net.send(0, CHUNKED_PUT);
    let chunks = MAX_FRAMING_RUNS * 3;
    let body = chunked_body(&vec![1; chunks]);
    // "1\r\n" in order; the one data byte of the first chunk is the hole.
    net.send(h, &body[..3]);
    let mut held_from = None;
    for a in (4..body.len()).step_by(60) {
        let b = (a + 60).min(body.len());
        let o = net.send(h + a, &body[a..b]);
        match (o.fate, held_from) {
            (Fate::Forward, None) => {}
            (Fate::Trim { start: 0, end, .. }, None) if end < b - a => held_from = Some(a + end),
            (Fate::Drop(DropReason::Buffered | DropReason::OutOfWindow), Some(_)) => {}
            other => panic!("bytes {a}..{b}: {other:?}"),
        }
        assert_eq!(o.held_ack, None);
    }
    // Each chunk's framing ("\r\n1\r\n") is one run: the copy ends with the run that
    // fills it, and then only the chunk's data byte goes.
    let held_from = held_from.expect("the copy filled");
    assert_eq!(held_from, 4 + 6 * MAX_FRAMING_RUNS);
    let bound = Config::default().max_held * 2 + MAX_FRAMING_BYTES + 16 * MAX_FRAMING_RUNS + 1024;
    assert!(net.flow.memory() <= bound, "{}", net.flow.memory());
    // The hole; then the client sends everything again, as its TCP does.
    net.send(h + 3, &body[3..4]);
    while net.server.len() < h + body.len() {
        let before = net.server.len();
        for a in (4..body.len()).step_by(60) {
            net.send(h + a, &body[a..(a + 60).min(body.len())]);
        }
        assert!(net.server.len() > before, "stalled at {}", net.server.len());
    }
    assert_eq!(net.server, [CHUNKED_PUT, &body].concat());
    net.send(h + body.len(), GET);
    assert_eq!(net.decisions.len(), 2);
}
