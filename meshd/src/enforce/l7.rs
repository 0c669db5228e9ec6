//! Layer-7 enforcement of one TCP flow: hold, decide, release (sans-IO).
//!
//! [`L7Flow`] sits in the packet path of one connection to a port with HTTP rules. The
//! shell feeds it every client→server segment ([`L7Flow::on_client_segment`]) and every
//! server→client segment ([`L7Flow::on_server_segment`]), with `now`, and calls
//! [`L7Flow::poll`] at [`L7Flow::poll_at`]. For each client segment it answers with an
//! [`Outcome`]: what to do with the segment itself ([`Fate`]), bytes to send to the server
//! from its own reassembled view ([`Release`], read with [`L7Flow::release_data`]), and
//! whether the flow is refused ([`Refusal`]; the enforcer's `inject` builds the packets).
//!
//! # Guarantees (DESIGN.md invariants 3 and 4)
//!
//! - **Decide before delivery.** A byte is forwarded or released only once the request
//!   it belongs to has a head that was parsed, its path normalised
//!   ([`mesh_proto::http_path`]) and the decision callback answered [`Verdict::Allow`].
//!   Bytes of an undecided head are held (copied here; the segment is dropped); bytes
//!   that cannot be decided (non-HTTP, malformed, too large, too slow, truncated) are
//!   refused — fail closed.
//! - **Delivered is inspected.** Forwarded bytes are the bytes the parser read, in stream
//!   order, each once: a retransmission of delivered bytes is cut away (what is left is an
//!   empty segment, so the server still answers it with an ACK); a segment that disagrees
//!   with buffered bytes is dropped whole. One exception, by design: *opaque* body bytes
//!   ([`RequestStream::opaque`]: the rest of a Content-Length body, of a chunk's data)
//!   ahead of the stream position pass out of order, unheld and unread, as on a layer-4
//!   port. Their values decide nothing (no policy reads a body) and where they end is
//!   fixed by sequence position, so the next request head, its framing and chunk sizes
//!   are still read in order from meshd's own view and delivered as read; what the
//!   server makes of two different copies of a body byte is its TCP's business, as it is
//!   without meshd. Why: bytes meshd holds are bytes the server never sees, so it cannot
//!   answer a loss with SACK blocks or duplicate ACKs (RFC 2018, RFC 5681 §3.2), and the
//!   client must wait for its retransmission timer at every loss; through an inspected
//!   port an upload under 0.5% loss then crawled and failed (issue 26). The framing of
//!   a chunked body after such a hole is read ahead of it (next section) and passes
//!   too; every byte of it the server may still lack is checked against meshd's copy.
//! - **No copy unless held.** In-order segments of an allowed stream (a head completed
//!   within the segment, a body of any size) are forwarded as they came, possibly cut,
//!   and so are opaque body bytes out of order; only a head split across segments, or
//!   other out-of-order data (a head, chunk framing), is copied; and ahead of a hole,
//!   the framing of a chunked body (a few bytes per chunk, [`MAX_FRAMING_BYTES`]).
//! - **The sender's options go along.** A segment forwarded or cut keeps its TCP
//!   options; bytes released from the buffer carry the timestamps of the client segment
//!   that released them, and acknowledgements of held bytes the server's ([`Release`],
//!   [`HeldAck`]; RFC 7323 §4.3). Without them the server echoes an older timestamp and
//!   the client's round-trip estimate, then its retransmission timer, grows by the time
//!   meshd held the bytes (issue 26). Neither carries SACK blocks: those describe the
//!   sender's own receive queue at the moment it sent them, and a segment with data is
//!   not a duplicate ACK, so nothing is lost by leaving them out; meshd never sends a
//!   SACK for bytes it holds (it would promise what the server never received).
//! - **A refused connection closes cleanly.** After a refusal the server has been reset
//!   and says nothing more, so the flow answers the client on its behalf until the
//!   client has closed ([`Answer`]): it is never left retransmitting its FIN.
//! - **Bounded.** At most `Config::max_held` bytes are buffered per flow; a head larger
//!   than `limits.max_head` is refused with 431, one incomplete for `head_timeout` with
//!   408. Bytes held behind a hole in a body (a head after a loss in the body before
//!   it) wait while the client still sends, at most [`BODY_HOLE_LIMIT`] without
//!   progress, then 408. The copy of framing read ahead of a hole is at most
//!   [`MAX_FRAMING_BYTES`] in [`MAX_FRAMING_RUNS`] runs; beyond, the flow stops reading
//!   ahead and holds the framing (a flood of tiny chunks costs that, no more).
//!
//! # Parsing ahead of a hole (chunked bodies)
//!
//! In a chunk's data, where the data ends (and the next chunk's framing starts) is
//! known from its size line. When a segment beyond a hole carries that end, the parser
//! jumps over the rest of the data, unread (it decides nothing), and reads the framing
//! from the segment: size lines, extensions, and after the last chunk the trailers;
//! then the next chunk's data again passes unread, and so on to the end of the body
//! (`run_ahead`, [`RequestStream::chunk_data`], [`RequestStream::framing`]). The
//! framing so read goes to the server with the segment, like the data, so the server
//! sees everything after a loss and answers with SACK blocks: a chunked upload repairs
//! a loss by fast retransmit, as one with a Content-Length does.
//!
//! What keeps invariants 3 and 4: the framing read ahead belongs to a request already
//! allowed, and wrong framing is refused (400) at once, before it is sent; the flow
//! keeps a copy of every framing byte from the hole up to its position, the stretch
//! the server may still lack (`Passed`), and the client's retransmissions there go out
//! again only if they agree with it (else dropped whole, as conflicts); chunk data
//! there goes out again as it comes. The next request head is never read ahead of a
//! hole: the parser stops at the end of the body, and what follows is held (not
//! acknowledged to the client: that would cover the hole) until the server has
//! acknowledged every byte before it; it is then read in order at the next client
//! segment. The copy goes as the server acknowledges it.
//!
//! # Driving it (the shell)
//!
//! ```text
//! client→server segment:  let o = flow.on_client_segment(&seg, now, |req| policy(req));
//!     1. o.fate:     Forward → send the packet unchanged
//!                    Trim{start,end,fin} → send it with payload[start..end],
//!                        seq + start, FIN only if `fin`, its TCP options kept (fix
//!                        lengths, checksums)
//!                    Drop(_) → drop it (count the reason)
//!     2. o.release:  send flow.release_data() to the server from `seq`, split to the
//!                    MSS, the last piece with FIN if `fin`, each with the release's
//!                    timestamps option (inject::segments does it)
//!     3. o.refusal:  send inject::response(...) to the client and inject::reset(...)
//!                    to the server; log the cause; the flow ends
//!     4. o.held_ack: send the ACK to the client
//!     5. o.answer:   (a refused flow) send the response again, an ACK of the
//!                    client's FIN, or a RST, to the client (see Answer)
//! server→client segment:  flow.on_server_segment(&seg, now) → Forward / Drop
//! timer:                  at flow.poll_at(), flow.poll(now) → Option<Refusal>
//! ```
//! `release_data()` is valid until the next call that takes `&mut self`. The shell feeds
//! only segments whose IP and TCP checksums it verified: a corrupt segment that was
//! inspected would fix the bytes of its sequence range.
//!
//! # Known limits
//!
//! - Bytes are delivered once. If a delivered segment is lost between the enforcer and
//!   the server (a full TUN backlog), the client's retransmission is cut to an empty ACK:
//!   the flow keeps no copy to compare it with, so it cannot tell the same bytes from
//!   other ones. Rather than let the connection stall until the client gives up
//!   (minutes), the flow counts such retransmissions of bytes the server has not
//!   acknowledged; after [`LOST_AFTER`] in a row without the server's acknowledgement
//!   moving, it refuses the flow ([`RefuseCause::Undelivered`], 502, the server reset
//!   at the point it acknowledged): safe and live, at the price of that connection.
//!   Bytes released from the flow's buffer (a held head) were in part acknowledged to
//!   the client already ([`HeldAck`]), and the client never sends those again: as a
//!   backstop, released bytes the server has not acknowledged [`RELEASE_ACK_TIMEOUT`]
//!   after they went out (with no progress meanwhile) refuse the flow the same way.
//! - Held head bytes are acknowledged to the client on the server's behalf
//!   ([`HeldAck`]) with the server's last window, not reduced by what is held.
//! - With pipelining, a refusal answers the oldest request the server has not answered
//!   yet (responses are not parsed), and ends the connection.
//! - After `101 Switching Protocols` (WebSocket, h2c) the bytes are not HTTP/1.x and are
//!   refused with 400; `CONNECT` is refused.
//! - A lost segment that carries a chunk-size line leaves the data after it without a
//!   known end: everything after it is held until the hole is filled, unseen by the
//!   server, which repairs such a loss at the client's retransmission timer, not by
//!   fast retransmit. So do a head after a hole, and framing beyond the copy's bound.
//!   At most `max_held` bytes wait; the client sends the rest again.

mod passed;
pub mod response;
#[cfg(test)]
mod tests;

use std::time::Duration;

use mesh_proto::http_path::{self, PathError};

use crate::enforce::flow::{
    Direction, Flags, InsertError, InvalidSegment, Reassembler, Segment, SeqNumber, TcpFlow,
    Timestamp, Timestamps, Track,
};
use crate::enforce::http::{HttpError, Limits, RequestHead, RequestStream, Step, MAX_HEADERS};
use passed::Passed;
pub use passed::{MAX_FRAMING_BYTES, MAX_FRAMING_RUNS};

/// Per-flow limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    pub limits: Limits,
    /// Most bytes buffered per flow (held heads and out-of-order data). At least
    /// `limits.max_head + 1` is used, so that a head at the limit can be held.
    pub max_held: usize,
    /// An incomplete request head (or a hole in the stream) older than this is refused
    /// with 408.
    pub head_timeout: Duration,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            limits: Limits::default(),
            // A window of a few milliseconds at gigabit rates, so that reordering costs
            // no resends (mesh-faultbench, 25% reordering: 64 KiB made a chunked upload
            // resend 37 of 50 MB); all flows together stay under
            // `enforce::Limits::l7_total_held`.
            max_held: 1024 * 1024,
            head_timeout: Duration::from_secs(10),
        }
    }
}

/// A request as the decision callback sees it.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    pub head: RequestHead<'a>,
    /// `head.target` normalised by [`http_path::normalize`]: what path rules match.
    pub path: &'a str,
}

impl<'a> Request<'a> {
    pub fn method(&self) -> &'a str {
        self.head.method
    }

    pub fn host(&self) -> Option<&'a str> {
        self.head.host
    }

    /// First value of header `name` (case-insensitive), OWS trimmed.
    pub fn header(&self, name: &str) -> Option<&'a [u8]> {
        self.head.header(name)
    }

    /// All header fields in order, as (name, value).
    pub fn headers(&self) -> impl Iterator<Item = (&'a str, &'a [u8])> + 'a {
        self.head.headers.iter().map(|h| (h.name, h.value))
    }
}

/// The decision callback's answer for one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Refuse with an injected response of this status (403 policy, 429 rate limit, 503
    /// open circuit); `reason` is a short text for the response body.
    Refuse {
        status: u16,
        reason: &'static str,
    },
}

/// Retransmissions of the same delivered bytes that the server has not acknowledged, in
/// a row, [`LOST_SPACING`] apart and without its acknowledgement moving, after which
/// those bytes count as lost on the way to the server. A spurious retransmission (the
/// server's ACK late or lost on the way back) is followed by that ACK; a lost segment is
/// retransmitted once by fast retransmit and then at each RTO (about 0.2, 0.4, 0.8 s),
/// always from the same sequence number (the first byte the server lacks): three of
/// them take a second or two.
pub const LOST_AFTER: u8 = 3;

/// How far apart retransmissions of the same bytes must be to count towards
/// [`LOST_AFTER`]: less than any retransmission timeout (Linux's minimum is 200 ms).
/// A burst of retransmissions (a sender's loss recovery resending what meshd has just
/// released from its buffer, or a duplicated datagram) is one event, not three
/// (regression: issue 26, a chunked upload under 0.5% loss refused with 502).
pub const LOST_SPACING: Duration = Duration::from_millis(100);

/// Retransmissions of delivered bytes the server has not acknowledged (see
/// [`LOST_AFTER`]).
#[derive(Clone, Copy, Debug, Default)]
struct Unacked {
    /// How many, in a row.
    count: u8,
    /// The server's acknowledgement when the last one was counted.
    server_acked: Option<SeqNumber>,
    /// Where the last one counted started, and when it came.
    seq: SeqNumber,
    at: Timestamp,
}

/// How long released bytes may stay unacknowledged by the server, with its
/// acknowledgement standing still, before they count as lost (see the module's known
/// limits). A server's TCP acknowledges within its delayed-ACK time (at most 200 ms on
/// Linux) even when its application does not read.
pub const RELEASE_ACK_TIMEOUT: Duration = Duration::from_secs(3);

/// The longest a hole in a request body may hold the bytes after it while the client
/// keeps sending without filling it (see [`L7Flow::poll`]): a client whose
/// retransmissions keep getting lost backs off exponentially (RFC 6298 §5.5), and
/// holding bytes for a client that never fills the hole costs memory.
pub const BODY_HOLE_LIMIT: Duration = Duration::from_secs(60);

/// Why a flow was refused. Feeds the decision log and counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RefuseCause {
    #[error("{reason}")]
    Policy { status: u16, reason: &'static str },
    #[error("{0}")]
    Http(HttpError),
    #[error("{0}")]
    Path(PathError),
    #[error("request not completed in time")]
    Timeout,
    #[error("request stream ended inside a request head")]
    Truncated,
    #[error("held bytes over the flow's limit")]
    HoldFull,
    /// The enforcer as a whole holds as much as it may (all flows together).
    #[error("meshd is holding too many undecided bytes; try again")]
    Overload,
    /// Many stacks take the urgent byte out of the stream the application reads, so
    /// what the server would read is not what was inspected.
    #[error("TCP urgent data on an inspected connection")]
    Urgent,
    /// Delivered bytes lost between meshd and the server (see [`LOST_AFTER`]).
    #[error("request bytes were lost on the way to the server")]
    Undelivered,
}

impl RefuseCause {
    /// Status of the injected response.
    pub fn status(self) -> u16 {
        match self {
            RefuseCause::Policy { status, .. } => status,
            RefuseCause::Http(e) => e.status(),
            RefuseCause::Path(_) | RefuseCause::Truncated | RefuseCause::Urgent => 400,
            RefuseCause::Overload => 503,
            RefuseCause::Timeout => 408,
            RefuseCause::HoldFull => 431,
            RefuseCause::Undelivered => 502,
        }
    }
}

/// A refused flow: what to inject. Sequence numbers are those the two ends expect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The server's sequence number after the response and its FIN: what the client
    /// acknowledges once it has the whole answer.
    pub response_end: SeqNumber,
    pub cause: RefuseCause,
    /// Sequence number of the response segment to the client (the server's next byte).
    pub client_seq: SeqNumber,
    /// Acknowledgement it carries (the client's bytes received in order).
    pub client_ack: SeqNumber,
    /// Sequence number of the RST to the server (the client's bytes delivered to it).
    pub server_seq: SeqNumber,
    /// Acknowledgement the RST carries (the server's next byte).
    pub server_ack: SeqNumber,
}

/// What the shell does with the client segment it just passed in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    /// Send it unchanged.
    Forward,
    /// Send it with only `payload[start..end]`, sequence number `seq + start`, and FIN only
    /// if `fin`. An empty range still goes out (an ACK, or the FIN).
    Trim { start: usize, end: usize, fin: bool },
    /// Do not send it.
    Drop(DropReason),
}

/// Why a client segment was not sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// Its bytes were taken into the flow's buffer (held, or released in [`Outcome::release`]).
    Buffered,
    /// A retransmission of bytes already buffered.
    Duplicate,
    /// It disagrees with bytes already received at this sequence number (invariant 4).
    Conflict(SeqNumber),
    /// Beyond the flow's buffer (or too many holes); the client will send it again.
    OutOfWindow,
    /// Data after the stream's FIN, or a FIN that moved.
    AfterFin,
    /// It does not fit the tracked connection (no handshake seen, closed...).
    Untracked(InvalidSegment),
    /// The flow was refused earlier.
    Refused,
}

/// Bytes to send to the server from [`L7Flow::release_data`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Release {
    pub seq: SeqNumber,
    pub len: usize,
    /// Set FIN on the last segment.
    pub fin: bool,
    /// Acknowledgement and window to send with it: the client's latest.
    pub ack: Option<SeqNumber>,
    pub window: u16,
    /// The timestamps option to send with every piece: the client's newest (by its
    /// TSval), normally those of the segment that made the bytes go. RFC 7323 §4.3:
    /// the server takes the TSval of the segment that fills its window as `TS.Recent`
    /// and echoes it, so the client measures its real round trip; and §5 (PAWS): the
    /// server drops a segment whose TSval is older than `TS.Recent`, so released bytes
    /// must never carry an older TSval than a segment the server already took (a
    /// reordered hole-filler does). `None` when that segment had none (timestamps not
    /// negotiated).
    pub timestamps: Option<Timestamps>,
}

/// A pure ACK to send to the client on the server's behalf, acknowledging the bytes of
/// an undecided head that the flow holds.
///
/// Why: held bytes never reach the server, so the server never acknowledges them. A
/// sender stops at its congestion window (about 10 segments on a fresh Linux
/// connection) and then only retransmits: a head larger than that never completes and
/// ends in 408 instead of being decided (or refused with 431), and a client that writes
/// its head in pieces with Nagle's algorithm waits for an ACK that never comes. The
/// flow owns the bytes once it holds them (they are released to the server or the flow
/// is refused), so acknowledging them is what a proxy would do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeldAck {
    /// The server's next sequence number.
    pub seq: SeqNumber,
    /// One past the last client byte held in order.
    pub ack: SeqNumber,
    /// The server's last advertised window (as on the wire).
    pub window: u16,
    /// Timestamps as the server would send them (RFC 7323 §4.3): its latest TSval,
    /// echoing the TSval of the client segment acknowledged. `None` unless both sides
    /// sent timestamps.
    pub timestamps: Option<Timestamps>,
}

/// What meshd sends the client, on the server's behalf, for a segment that came after
/// the flow was refused (the server was reset and will say nothing): enough for the
/// client to close cleanly instead of retransmitting into silence (a client socket
/// left in LAST-ACK or FIN-WAIT).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// The refusal's response again, [`L7Flow::refusal`] (build it as for
    /// [`Outcome::refusal`]): the client has not acknowledged all of it, so it was lost
    /// or crossed the segment. It acknowledges all the client has sent since, its FIN
    /// included. (Not carried here: an outcome stays small on the data path.)
    Response,
    /// A pure ACK of the client's FIN.
    Ack { seq: SeqNumber, ack: SeqNumber },
    /// A RST: the client sent data after it had the whole answer; nobody will read it.
    Reset { seq: SeqNumber },
}

/// How often at most a refused flow sends its response again ([`Answer::Response`]):
/// a client segment that crossed the response must not each earn a copy.
pub const ANSWER_INTERVAL: Duration = Duration::from_millis(200);

/// The answer to one client segment. Apply in field order: fate, release, refusal,
/// held_ack, answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub fate: Fate,
    /// Send the segment of `fate` (forwarded or cut) with these timestamps instead of
    /// its own. Set when it carries bytes inspected in order and its TSval is older
    /// than the client's newest (it was reordered): the server would drop it as old
    /// (PAWS, RFC 7323 §5), and meshd cuts the client's retransmission of inspected
    /// bytes, so nothing would ever repair the drop.
    pub timestamps: Option<Timestamps>,
    pub release: Option<Release>,
    pub refusal: Option<Refusal>,
    /// Acknowledge held bytes to the client (see [`HeldAck`]).
    pub held_ack: Option<HeldAck>,
    /// For a segment of a refused flow: what to send the client ([`Answer`]).
    pub answer: Option<Answer>,
}

impl Outcome {
    fn fate(fate: Fate) -> Outcome {
        Outcome {
            fate,
            timestamps: None,
            release: None,
            refusal: None,
            held_ack: None,
            answer: None,
        }
    }
}

/// Counters of one flow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Request heads decided.
    pub requests: u64,
    /// Bytes forwarded straight from the segments they came in.
    pub forwarded: u64,
    /// Bytes copied into the flow's buffer.
    pub copied: u64,
    /// Bytes released from the buffer.
    pub released: u64,
    /// Retransmitted bytes recognised (delivered or buffered before).
    pub retransmitted: u64,
    /// Segments dropped for disagreeing with earlier bytes (saturating; u32 keeps a
    /// tracked flow small).
    pub conflicts: u32,
    /// Segments dropped for lack of buffer room (saturating).
    pub out_of_window: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Open,
    Refused,
}

/// Layer-7 state of one TCP connection.
#[derive(Debug)]
pub struct L7Flow {
    config: Config,
    tcp: TcpFlow,
    /// Created at the client's SYN, for the ISN in `stream_isn`.
    reasm: Option<Reassembler>,
    stream_isn: Option<SeqNumber>,
    http: RequestStream,
    phase: Phase,
    /// Bytes at the front of the reassembler released by the last call.
    releasing: usize,
    /// Since when bytes have been buffered without being decided.
    held_since: Option<Timestamp>,
    path: String,
    stats: Stats,
    /// Retransmissions of delivered bytes the server has not acknowledged.
    unacked_retransmits: Unacked,
    /// End of the bytes released from the buffer that the server has not acknowledged,
    /// and since when its acknowledgement has not moved.
    unacked_release: Option<(SeqNumber, Timestamp)>,
    /// Once refused by meshd: what answers the client after it (`None` again once
    /// the client is reset or reset the flow itself). Boxed: most flows are never
    /// refused, and every tracked flow carries this field.
    refused: Option<Box<Refused>>,
    /// The server's latest TSval, for [`HeldAck::timestamps`].
    server_tsval: Option<u32>,
    /// The timestamps of the client's newest segment (by its TSval), for
    /// [`Release::timestamps`].
    client_ts: Option<Timestamps>,
    /// The last run of opaque body bytes the parser entered, as sequence numbers
    /// (start, end): its bytes may pass out of order and again (see `on_data`).
    span: Option<(SeqNumber, SeqNumber)>,
    /// When the client last sent stream bytes (any, retransmissions included): a hole
    /// in a body is waited for while the client is still sending.
    client_seen: Timestamp,
    /// The stream position moved over opaque bytes the server acknowledged, so held
    /// bytes may have become contiguous: inspect them at the next client segment.
    recheck: bool,
    /// While the parser is ahead of a hole in a chunked body: what passed since the
    /// hole, with a copy of its framing (see `run_ahead`). Boxed: rare, and every
    /// tracked flow carries this field.
    passed: Option<Box<Passed>>,
}

impl L7Flow {
    pub fn new(config: Config, now: Timestamp) -> L7Flow {
        L7Flow {
            config,
            tcp: TcpFlow::new(now),
            reasm: None,
            stream_isn: None,
            http: RequestStream::new(config.limits),
            phase: Phase::Open,
            releasing: 0,
            held_since: None,
            path: String::new(),
            stats: Stats::default(),
            unacked_retransmits: Unacked::default(),
            unacked_release: None,
            refused: None,
            server_tsval: None,
            client_ts: None,
            span: None,
            client_seen: now,
            recheck: false,
            passed: None,
        }
    }

    pub fn tcp(&self) -> &TcpFlow {
        &self.tcp
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// True once refused (or reset by the client): nothing more reaches the server, and
    /// the shell may forget the flow once the client has closed (it answers what the
    /// client sends, [`Outcome::answer`], for as long as it keeps the flow).
    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Refused
    }

    /// The client sequence number the server expects next: the end of the stream this
    /// flow delivered to it, held bytes excluded. A reset towards the server must carry
    /// exactly this number: Linux answers any other in-window RST with a challenge ACK
    /// and keeps the connection (RFC 5961 §3.2).
    pub fn server_expects(&self) -> Option<SeqNumber> {
        let start = self.tcp.client_stream_start()?;
        Some(match (&self.reasm, &self.passed) {
            // Ahead of a hole: the first byte the server lacks, as far as meshd knows.
            (Some(_), Some(p)) => match self.tcp.server.acked {
                Some(acked) => p.from().max(acked),
                None => p.from(),
            },
            (Some(r), None) => r.base() + self.releasing,
            (None, _) => start,
        })
    }

    /// The refusal meshd answered the client with, once refused (its `client_ack`
    /// follows what the client sent since); `None` before, or once the client reset.
    pub fn refusal(&self) -> Option<Refusal> {
        self.refused.as_ref().map(|r| r.refusal)
    }

    /// Bytes buffered now (for a total limit across flows). The copy of framing read
    /// ahead of a hole is not counted: it changes when the server acknowledges, and
    /// is bounded per flow ([`MAX_FRAMING_BYTES`]).
    pub fn held(&self) -> usize {
        self.reasm.as_ref().map_or(0, Reassembler::buffered)
    }

    /// Memory the flow's buffer occupies.
    pub fn memory(&self) -> usize {
        self.reasm.as_ref().map_or(0, Reassembler::memory)
            + self.path.capacity()
            + self.passed.as_ref().map_or(0, |p| p.memory())
    }

    /// The bytes of the last [`Outcome::release`].
    pub fn release_data(&self) -> &[u8] {
        match &self.reasm {
            Some(r) => &r.contiguous()[..self.releasing],
            None => &[],
        }
    }

    /// When [`poll`](Self::poll) must next be called, if at all.
    pub fn poll_at(&self) -> Option<Timestamp> {
        match self.phase {
            Phase::Open => [self.head_deadline(), self.release_deadline()]
                .into_iter()
                .flatten()
                .min(),
            Phase::Refused => None,
        }
    }

    /// Bytes held waiting for a request head to complete time out `head_timeout` after
    /// the stream last moved on. Bytes held behind a hole in a body (the head is
    /// decided; or the next head, after a body read ahead of the hole) wait while the
    /// client still sends (its retransmissions fill the hole), up to
    /// [`BODY_HOLE_LIMIT`] without progress.
    fn head_deadline(&self) -> Option<Timestamp> {
        let since = self.held_since?;
        let head = since.plus(self.config.head_timeout);
        // A head held because the body before it has a hole waits as the body does.
        if self.http.at_head() && self.passed.is_none() {
            return Some(head);
        }
        let silent = self.client_seen.max(since).plus(self.config.head_timeout);
        Some(silent.min(since.plus(BODY_HOLE_LIMIT)))
    }

    fn release_deadline(&self) -> Option<Timestamp> {
        self.unacked_release
            .map(|(_, since)| since.plus(RELEASE_ACK_TIMEOUT))
    }

    /// Refuses the flow with 502 if released bytes stayed unacknowledged by the server
    /// for [`RELEASE_ACK_TIMEOUT`], with 408 if bytes have been held longer than
    /// `head_timeout`.
    pub fn poll(&mut self, now: Timestamp) -> Option<Refusal> {
        self.finish_release();
        if self.phase == Phase::Refused {
            return None;
        }
        let due = |at: Option<Timestamp>| at.is_some_and(|at| now >= at);
        let refusal = if due(self.release_deadline()) {
            Some(self.refuse(RefuseCause::Undelivered))
        } else if due(self.head_deadline()) {
            Some(self.refuse(RefuseCause::Timeout))
        } else {
            None
        };
        if refusal.is_some() {
            self.answered(now);
        }
        refusal
    }

    /// Refuses the flow now because the enforcer is over its total memory budget,
    /// and frees what it holds (fail closed, invariant 6). `None` if already refused.
    pub fn shed(&mut self) -> Option<Refusal> {
        if self.phase == Phase::Refused {
            return None;
        }
        self.finish_release();
        let refusal = self.refuse(RefuseCause::Overload);
        self.reasm = None;
        Some(refusal)
    }

    /// Tracks a server→client segment: `true` to forward it, `false` to drop it.
    pub fn on_server_segment(&mut self, seg: &Segment<'_>, now: Timestamp) -> bool {
        if self.phase != Phase::Open {
            return false;
        }
        let acked_before = self.tcp.server.acked;
        if matches!(
            self.tcp.on_segment(Direction::ServerToClient, seg, now),
            Track::Invalid(_)
        ) {
            return false;
        }
        if let Some(ts) = seg.timestamps {
            self.server_tsval = Some(ts.val);
        }
        self.catch_up();
        if let (Some((end, _)), Some(acked)) = (self.unacked_release, self.tcp.server.acked) {
            if end - acked <= 0 {
                self.unacked_release = None;
            } else if Some(acked) != acked_before {
                // Progress: the server is taking the released bytes.
                self.unacked_release = Some((end, now));
            }
        }
        true
    }

    /// Moves the stream position over opaque bytes the server acknowledged beyond it:
    /// bytes let through out of order ([`Fate::Forward`] ahead of the position) that
    /// the server now has in order. Held bytes behind them may now be contiguous.
    fn catch_up(&mut self) {
        let (Some(acked), Some(reasm)) = (self.tcp.server.acked, self.reasm.as_mut()) else {
            return;
        };
        if self.releasing > 0 {
            // Bytes released by the last call are still at the front of the buffer: the
            // position is theirs to move first (the next call finishes the release).
            return;
        }
        if let Some(passed) = self.passed.as_mut() {
            if acked - reasm.base() >= 0 {
                // The server has every byte up to the position: nothing is ahead of a
                // hole any more. Held bytes (the next head, framing that did not fit
                // the copy) are read in order from here.
                self.passed = None;
                self.recheck |= !reasm.contiguous().is_empty();
            } else if passed.acked(acked) {
                // Room in the copy again: held framing may be read ahead.
                self.recheck |= !reasm.contiguous().is_empty();
            }
        }
        let ahead = acked - reasm.base();
        // Anything else the server acknowledges was delivered in order already; more
        // than the opaque bytes ahead is not possible and is not believed.
        if ahead <= 0 || ahead as u64 > self.http.opaque() {
            return;
        }
        let before = reasm.base();
        reasm.forget(ahead as usize);
        let moved = reasm.base() - before;
        self.http.skip_opaque(moved as u64);
        self.recheck = !reasm.contiguous().is_empty();
        self.note_span();
    }

    /// Remembers where the opaque run the parser is in starts and ends, if it is in one
    /// (the last one stays once the parser leaves it).
    fn note_span(&mut self) {
        let (Some((behind, ahead)), Some(reasm)) = (self.http.opaque_run(), &self.reasm) else {
            return;
        };
        // Sequence numbers reach 2^31 either way; a window is far less.
        let clamp = |n: u64| usize::try_from(n.min(1 << 30)).unwrap_or(1 << 30);
        let pos = reasm.base() + self.releasing;
        self.span = Some((
            SeqNumber(pos.0.wrapping_sub(clamp(behind) as u32)),
            pos + clamp(ahead),
        ));
    }

    /// Parsing ahead of a hole (module docs): the parser is inside a chunk's data and
    /// this segment, which starts beyond the stream position (after a hole), carries
    /// the end of that data. The parser jumps there, where the chunk's framing starts,
    /// and reads on from this segment; the bytes jumped over are chunk data, which
    /// decides nothing, and whatever of them comes later passes ([`Passed`], `again`).
    /// Not while the copy of framing is full: then the framing is held, as in order.
    fn run_ahead(&mut self, seg: &Segment<'_>) {
        let (Some(left), Some(reasm)) = (self.http.chunk_data(), self.reasm.as_mut()) else {
            return;
        };
        let base = reasm.base();
        // A chunk that ends beyond half the sequence space is beyond any segment.
        let left = match usize::try_from(left) {
            Ok(n) if n < 1 << 30 => n,
            _ => return,
        };
        let end = base + left;
        let seg_end = seg.seq + seg.payload.len();
        if seg.seq - base <= 0 || seg.seq - end > 0 || seg_end - end <= 0 {
            return;
        }
        if self.passed.as_ref().is_some_and(|p| p.room(end) == 0) {
            return;
        }
        // The stretch starts at the run of chunk data the parser is in (its bytes
        // behind the position went out unread, and may go again).
        let from = match self.span {
            Some((start, run_end)) if base - start >= 0 && run_end - base >= 0 => start,
            _ => base,
        };
        self.passed
            .get_or_insert_with(|| Box::new(Passed::new(from)));
        // Held bytes of that data (none unless the copy was full when they came) are
        // forgotten: never sent nor acknowledged, the client sends them again.
        reasm.forget(left);
        let moved = reasm.base() - base;
        self.http.skip_opaque(moved as u64);
        self.recheck |= !reasm.contiguous().is_empty();
    }

    /// How many of the segment's bytes just before the stream position `base` go out
    /// again (at the end of the part behind it): bytes the server may have dropped
    /// (PAWS, RFC 7323 §5, drops a reordered segment older than one it took) or never
    /// had, which only the client can repair. Those are the opaque bytes of the last
    /// run (`span`: they were never read), and anything ahead of a hole ([`Passed`]),
    /// provided it agrees with the copy of the framing there; `Err` with the first
    /// byte where it does not (the segment is dropped whole, invariant 4). Bytes
    /// delivered in order before either are cut as before.
    fn again(&self, seg: &Segment<'_>, base: SeqNumber) -> Result<usize, SeqNumber> {
        let seg_end = seg.seq + seg.payload.len();
        if seg.payload.is_empty() || seg.seq - base >= 0 {
            return Ok(0);
        }
        let end = if seg_end - base < 0 { seg_end } else { base };
        let in_span = self.span.is_some_and(|(start, run_end)| {
            seg.seq - start >= 0 && run_end - seg_end >= 0 && run_end - base >= 0
        });
        let mut n = if in_span { (end - seg.seq) as usize } else { 0 };
        if let Some(passed) = &self.passed {
            let from = passed.from().max(seg.seq);
            if end - from > 0 {
                let (lo, hi) = ((from - seg.seq) as usize, (end - seg.seq) as usize);
                passed.check(from, &seg.payload[lo..hi])?;
                n = n.max(hi - lo);
            }
        }
        Ok(n)
    }

    /// Processes one client→server segment; `decide` is called once per complete request
    /// head, in stream order.
    pub fn on_client_segment(
        &mut self,
        seg: &Segment<'_>,
        now: Timestamp,
        decide: impl FnMut(&Request<'_>) -> Verdict,
    ) -> Outcome {
        self.finish_release();
        if self.phase == Phase::Refused {
            return self.after_refusal(seg, now);
        }
        let outcome = self.on_open_segment(seg, now, decide);
        if outcome.refusal.is_some() {
            self.answered(now);
        }
        outcome
    }

    /// The response went to the client at `now`.
    fn answered(&mut self, now: Timestamp) {
        if let Some(r) = self.refused.as_mut() {
            r.answered_at = now;
        }
    }

    /// A client segment after meshd refused the flow: answered on the server's behalf
    /// ([`Answer`]) until the client has closed. The client has the whole answer once
    /// it acknowledges the response's FIN; before that, the response goes again (lost
    /// on the way, or the segment crossed it); after, its FIN is acknowledged and any
    /// data reset (RFC 9293 §3.10.7.4: a reset at the number it expects, which it has
    /// just acknowledged).
    fn after_refusal(&mut self, seg: &Segment<'_>, now: Timestamp) -> Outcome {
        let mut outcome = Outcome::fate(Fate::Drop(DropReason::Refused));
        let Some(refused) = self.refused.as_mut() else {
            return outcome;
        };
        if seg.flags.contains(Flags::RST) {
            self.refused = None;
            return outcome;
        }
        let end = seg.seq + seg.seq_len();
        if end > refused.refusal.client_ack {
            refused.refusal.client_ack = end;
        }
        let refusal = refused.refusal;
        let has_all = seg.flags.contains(Flags::ACK) && seg.ack - refusal.response_end >= 0;
        if !has_all {
            if now.since(refused.answered_at) >= ANSWER_INTERVAL {
                refused.answered_at = now;
                outcome.answer = Some(Answer::Response);
            }
        } else if !seg.payload.is_empty() {
            self.refused = None;
            outcome.answer = Some(Answer::Reset {
                seq: refusal.response_end,
            });
        } else if seg.flags.contains(Flags::FIN) {
            outcome.answer = Some(Answer::Ack {
                seq: refusal.response_end,
                ack: end,
            });
        }
        outcome
    }

    fn on_open_segment(
        &mut self,
        seg: &Segment<'_>,
        now: Timestamp,
        mut decide: impl FnMut(&Request<'_>) -> Verdict,
    ) -> Outcome {
        self.catch_up();
        match self.tcp.on_segment(Direction::ClientToServer, seg, now) {
            Track::Invalid(why) => return Outcome::fate(Fate::Drop(DropReason::Untracked(why))),
            Track::Reset => {
                // The client aborts: the server may know. Held bytes are never delivered,
                // and neither are bytes on the RST itself (RFC 9293 §3.5.3 lets a
                // reset carry data; no stack should read it, and none gets the chance).
                self.phase = Phase::Refused;
                return Outcome::fate(without_payload(seg));
            }
            Track::Handshake => {
                // A new ISN (a new attempt before the SYN-ACK) starts a new stream; a
                // retransmitted SYN changes nothing.
                let isn = self.tcp.client.isn;
                if isn.is_some() && isn != self.stream_isn {
                    self.stream_isn = isn;
                    let start = self.tcp.client_stream_start().unwrap_or_default();
                    let cap = self.config.max_held.max(self.config.limits.max_head + 1);
                    self.reasm = Some(Reassembler::new(start, cap));
                    self.http = RequestStream::new(self.config.limits);
                    self.passed = None;
                }
                // Data on a SYN (TCP Fast Open) is not taken: without it acknowledged,
                // the client sends it again after the handshake.
                return Outcome::fate(without_payload(seg));
            }
            Track::Data => {}
        }
        if seg.flags.contains(Flags::URG) {
            let refusal = self.refuse(RefuseCause::Urgent);
            return Outcome {
                refusal: Some(refusal),
                ..Outcome::fate(Fate::Drop(DropReason::Refused))
            };
        }
        if let Some(ts) = seg.timestamps {
            // TSvals compare modulo 2^32, like sequence numbers (RFC 7323 §5.2).
            let older =
                matches!(self.client_ts, Some(c) if (ts.val.wrapping_sub(c.val) as i32) < 0);
            if !older {
                self.client_ts = Some(ts);
            }
        }
        let forwarded = self.stats.forwarded + self.stats.released;
        let outcome = self.on_data(seg, now, &mut decide);
        let progressed = self.stats.forwarded + self.stats.released > forwarded;
        if !seg.payload.is_empty() {
            self.client_seen = now;
        }
        self.update_held_since(now, progressed);
        self.note_span();
        // Bytes released ahead of a hole were never acknowledged to the client (no
        // `HeldAck` then): if they are lost, it sends them again.
        if let (Some(r), None, None) = (outcome.release, outcome.refusal, &self.passed) {
            let since = self.unacked_release.map_or(now, |(_, since)| since);
            self.unacked_release = Some((r.seq + r.len, since));
        }
        outcome
    }

    fn on_data(
        &mut self,
        seg: &Segment<'_>,
        now: Timestamp,
        decide: &mut impl FnMut(&Request<'_>) -> Verdict,
    ) -> Outcome {
        let Some(reasm) = self.reasm.as_mut() else {
            return Outcome::fate(Fate::Drop(DropReason::Untracked(
                InvalidSegment::NoHandshake,
            )));
        };
        let payload = seg.payload;
        let has_fin = seg.flags.contains(Flags::FIN);
        if has_fin && reasm.set_fin(seg.seq + payload.len()).is_err() {
            return Outcome::fate(Fate::Drop(DropReason::AfterFin));
        }
        if let Some(fin) = reasm.fin() {
            // Data must end by the FIN; an empty segment (the ACKs after it) may not.
            if !payload.is_empty() && (seg.seq + payload.len()) > fin {
                return Outcome::fate(Fate::Drop(DropReason::AfterFin));
            }
        }

        // A hole in a chunk's data: read the framing after it (see `run_ahead`).
        self.run_ahead(seg);
        let reasm = self.reasm.as_ref().expect("checked above");
        let base = reasm.base();
        let behind = base - seg.seq;
        // Opaque body bytes ahead of the stream position (the rest of a Content-Length
        // body, of a chunk's data) pass out of order, unheld, as on a layer-4 port:
        // the server's TCP then sees what arrived after a loss and answers with SACK
        // blocks or duplicate ACKs, so the client repairs the loss at once (RFC 5681
        // §3.2, RFC 6675) instead of waiting for its retransmission timer. Their
        // values change nothing meshd decides: where they end is fixed by position.
        // The stream position moves over them when the server acknowledges them
        // (`catch_up`) or when they arrive in order. Bytes behind the position that the
        // server may lack go out again (`again`).
        let seg_end = seg.seq + payload.len();
        let end_ahead = seg_end - base;
        let again = match self.again(seg, base) {
            Ok(n) => n,
            Err(seq) => {
                self.stats.conflicts = self.stats.conflicts.saturating_add(1);
                return Outcome::fate(Fate::Drop(DropReason::Conflict(seq)));
            }
        };
        let opaque_ahead = behind < 0 && end_ahead as u64 <= self.http.opaque();
        let all_again = end_ahead <= 0 && again == payload.len();
        if !payload.is_empty() && !has_fin && (opaque_ahead || all_again) {
            self.stats.forwarded += payload.len() as u64;
            return Outcome::fate(Fate::Forward);
        }
        let direct = reasm.is_empty() && behind >= 0 && (behind as usize) < payload.len();
        let recheck = std::mem::take(&mut self.recheck);
        let (fate, refusal) = if direct {
            self.on_direct(payload, behind as usize, again, decide)
        } else {
            match self.on_buffered(seg, recheck, again, now, decide) {
                Ok((fate, refusal)) if again > 0 && refusal.is_none() && !sends(fate) => {
                    // Held or released from the buffer from the position on; the bytes
                    // before it go out again from the segment.
                    let end = payload.len().min(behind as usize);
                    let fate = Fate::Trim {
                        start: end - again,
                        end,
                        fin: false,
                    };
                    (fate, refusal)
                }
                Ok(r) => r,
                Err(fate) => {
                    self.recheck |= recheck;
                    return Outcome::fate(fate);
                }
            }
        };

        let mut outcome = Outcome {
            refusal,
            ..Outcome::fate(fate)
        };
        if direct && sends(fate) {
            if let (Some(own), Some(newest)) = (seg.timestamps, self.client_ts) {
                if (own.val.wrapping_sub(newest.val) as i32) < 0 {
                    outcome.timestamps = Some(newest);
                }
            }
        }
        if self.releasing > 0 {
            let reasm = self.reasm.as_ref().expect("checked above");
            outcome.release = Some(Release {
                seq: reasm.base(),
                len: self.releasing,
                fin: false,
                ack: self.tcp.client.acked,
                window: self.tcp.client.window,
                timestamps: self.client_ts.filter(|_| seg.timestamps.is_some()),
            });
        }
        if outcome.refusal.is_none() {
            self.place_fin(seg, &mut outcome);
        }
        if let Some(refusal) = &mut outcome.refusal {
            *refusal = self.refuse(refusal.cause);
        } else {
            outcome.held_ack = self.held_ack(seg.timestamps);
        }
        outcome
    }

    /// An ACK for the bytes held in order beyond those being released now, if any (see
    /// [`HeldAck`]). Out-of-order bytes are not acknowledged: the client must fill the
    /// hole first.
    fn held_ack(&self, client: Option<Timestamps>) -> Option<HeldAck> {
        let reasm = self.reasm.as_ref()?;
        let in_order = reasm.contiguous().len();
        // Ahead of a hole, "in order" is meshd's view only: an acknowledgement would
        // cover the hole, and the client would never send it again.
        if in_order <= self.releasing || self.phase == Phase::Refused || self.passed.is_some() {
            return None;
        }
        Some(HeldAck {
            seq: self.tcp.server.sent_end?,
            ack: reasm.base() + in_order,
            window: self.tcp.server.window,
            timestamps: match (self.server_tsval, client) {
                (Some(val), Some(c)) => Some(Timestamps { val, ecr: c.val }),
                _ => None,
            },
        })
    }

    /// The segment starts at or before the stream position, nothing is buffered: inspect
    /// `payload[skip..]` in place and forward the allowed part of it, and the last
    /// `again` bytes before it (see `again`).
    fn on_direct(
        &mut self,
        payload: &[u8],
        skip: usize,
        again: usize,
        decide: &mut impl FnMut(&Request<'_>) -> Verdict,
    ) -> (Fate, Option<Refusal>) {
        let data = &payload[skip..];
        let reasm = self.reasm.as_mut().expect("caller checked");
        let (allowed, cause) = inspect(
            &mut self.http,
            &mut self.path,
            data,
            self.passed.as_deref_mut().map(|p| (p, reasm.base())),
            decide,
            &mut self.stats,
        );
        let skipped = reasm.skip(allowed);
        debug_assert!(skipped);
        self.stats.retransmitted += skip as u64;
        self.stats.forwarded += allowed as u64;
        let mut cause = cause;
        if cause.is_none() && allowed < data.len() {
            // An incomplete head: hold it.
            match reasm.insert(reasm.base(), &data[allowed..]) {
                Ok(ins) if ins.truncated == 0 => self.stats.copied += ins.new as u64,
                _ => cause = Some(RefuseCause::HoldFull),
            }
        }
        let start = skip - again;
        let fate = if start == 0 && allowed == data.len() {
            Fate::Forward
        } else if allowed == 0 && skip == 0 {
            Fate::Drop(if cause.is_some() {
                DropReason::Refused
            } else {
                DropReason::Buffered
            })
        } else {
            Fate::Trim {
                start,
                end: skip + allowed,
                fin: false,
            }
        };
        (fate, cause.map(placeholder))
    }

    /// Everything else: buffer the segment's new bytes, then inspect what is contiguous
    /// and release the allowed part from the buffer. `recheck`: held bytes may have
    /// become contiguous without a segment (see `catch_up`); inspect them even if this
    /// segment brings nothing new. `again`: how many of the bytes before the position
    /// go out again (the caller sends them); they are not lost deliveries.
    fn on_buffered(
        &mut self,
        seg: &Segment<'_>,
        recheck: bool,
        again: usize,
        now: Timestamp,
        decide: &mut impl FnMut(&Request<'_>) -> Verdict,
    ) -> Result<(Fate, Option<Refusal>), Fate> {
        let reasm = self.reasm.as_mut().expect("caller checked");
        let payload = seg.payload;
        // Bytes before this were delivered (or skipped); from here on they are held.
        let delivered_end = reasm.base();
        let inserted = match reasm.insert(seg.seq, payload) {
            Ok(inserted) => inserted,
            Err(InsertError::Conflict { seq }) => {
                self.stats.conflicts = self.stats.conflicts.saturating_add(1);
                return Err(Fate::Drop(DropReason::Conflict(seq)));
            }
            Err(InsertError::Full | InsertError::TooManyHoles) => {
                self.stats.out_of_window = self.stats.out_of_window.saturating_add(1);
                return Err(Fate::Drop(DropReason::OutOfWindow));
            }
            Err(InsertError::AfterFin | InsertError::FinConflict) => {
                return Err(Fate::Drop(DropReason::AfterFin));
            }
        };
        self.stats.retransmitted += (inserted.old + inserted.duplicate) as u64;
        self.stats.copied += inserted.new as u64;
        if inserted.truncated > 0 {
            self.stats.out_of_window = self.stats.out_of_window.saturating_add(1);
        }
        let mut fate = Fate::Drop(DropReason::Buffered);
        if inserted.new == 0 {
            if inserted.old > again && self.delivery_lost(seg, delivered_end, now) {
                return Ok((
                    Fate::Drop(DropReason::Refused),
                    Some(placeholder(RefuseCause::Undelivered)),
                ));
            }
            fate = if inserted.duplicate > 0 {
                Fate::Drop(DropReason::Duplicate)
            } else {
                // Empty (an ACK, a FIN) or a retransmission of delivered bytes: send it
                // without payload so that the server still answers it.
                Fate::Trim {
                    start: payload.len(),
                    end: payload.len(),
                    fin: false,
                }
            };
            if !recheck {
                return Ok((fate, None));
            }
        }
        let reasm = self.reasm.as_mut().expect("caller checked");
        let data = reasm.contiguous();
        let (allowed, cause) = inspect(
            &mut self.http,
            &mut self.path,
            data,
            self.passed.as_deref_mut().map(|p| (p, reasm.base())),
            decide,
            &mut self.stats,
        );
        self.releasing = allowed;
        self.stats.released += allowed as u64;
        Ok((fate, cause.map(placeholder)))
    }

    /// Counts a retransmission of delivered bytes (those before `delivered_end`; the
    /// rest of the segment may be held bytes, which the server has not seen by design);
    /// true once [`LOST_AFTER`] of them came for the same delivered bytes the server
    /// has not acknowledged, [`LOST_SPACING`] apart, with its acknowledgement standing
    /// still.
    fn delivery_lost(
        &mut self,
        seg: &Segment<'_>,
        delivered_end: SeqNumber,
        now: Timestamp,
    ) -> bool {
        let acked = self.tcp.server.acked;
        let seg_end = seg.seq + seg.payload.len();
        let end = if seg_end - delivered_end > 0 {
            delivered_end
        } else {
            seg_end
        };
        let last = self.unacked_retransmits;
        let first = Unacked {
            count: 1,
            server_acked: acked,
            seq: seg.seq,
            at: now,
        };
        self.unacked_retransmits = match acked {
            // The server has all of it: a spurious retransmission.
            Some(a) if end - a <= 0 => Unacked::default(),
            _ if last.count > 0 && last.server_acked == acked && last.seq == seg.seq => {
                if now.since(last.at) < LOST_SPACING {
                    last
                } else {
                    Unacked {
                        count: last.count.saturating_add(1),
                        at: now,
                        ..last
                    }
                }
            }
            _ => first,
        };
        self.unacked_retransmits.count >= LOST_AFTER
    }

    /// Puts the stream's FIN on the last bytes sent, once everything before it is sent.
    fn place_fin(&mut self, seg: &Segment<'_>, outcome: &mut Outcome) {
        let Some(reasm) = self.reasm.as_ref() else {
            return;
        };
        let Some(fin) = reasm.fin() else {
            return;
        };
        let sent_end = reasm.base() + self.releasing;
        let nothing_held = reasm.contiguous().len() == self.releasing;
        if sent_end != fin || !nothing_held {
            if reasm.fin_in_order() && self.passed.is_none() {
                // Everything up to the FIN arrived but part of it is an undecided head:
                // the request can never complete. (Ahead of a hole, held bytes wait for
                // the hole to be filled, and are then read.)
                outcome.refusal = Some(placeholder(RefuseCause::Truncated));
            }
            return;
        }
        let len = seg.payload.len();
        match (&mut outcome.release, &mut outcome.fate) {
            (Some(release), _) => release.fin = true,
            (None, Fate::Trim { end, fin: f, .. }) if seg.seq + *end == fin => *f = true,
            (None, Fate::Forward) if seg.flags.contains(Flags::FIN) => {}
            (None, fate @ Fate::Forward) if seg.seq + len == fin => {
                // The FIN came earlier, out of order; these are the last bytes before it.
                *fate = Fate::Trim {
                    start: 0,
                    end: len,
                    fin: true,
                };
            }
            _ => {}
        }
    }

    /// The head timer runs while bytes are held, from the last time the stream moved on.
    fn update_held_since(&mut self, now: Timestamp, progressed: bool) {
        let held = self.held() > self.releasing;
        self.held_since = match (held, self.held_since) {
            (false, _) => None,
            (true, Some(since)) if !progressed => Some(since),
            (true, _) => Some(now),
        };
    }

    /// Drops the bytes released by the previous call from the buffer; frees the buffer of
    /// a refused flow.
    fn finish_release(&mut self) {
        if self.phase == Phase::Refused {
            self.reasm = None;
            self.passed = None;
        } else if let Some(reasm) = self.reasm.as_mut() {
            reasm.consume(self.releasing);
        }
        self.releasing = 0;
    }

    fn refuse(&mut self, cause: RefuseCause) -> Refusal {
        self.phase = Phase::Refused;
        let start = self.tcp.client_stream_start().unwrap_or_default();
        let delivered = match &self.reasm {
            Some(r) => r.base() + self.releasing,
            None => start,
        };
        // Acknowledge all the client sent (it is going away) so that it accepts the answer.
        let client_sent = self.tcp.client.sent_end.unwrap_or(start);
        let server_next = self.tcp.server.sent_end.unwrap_or_default();
        // Bytes lost on the way: the server expects the first of them, what it
        // acknowledged (a reset at any other number only earns a challenge ACK).
        let server_seq = match (cause, self.tcp.server.acked) {
            (RefuseCause::Undelivered, Some(acked)) => acked,
            _ => self.server_expects().unwrap_or(delivered),
        };
        let refusal = Refusal {
            cause,
            client_seq: server_next,
            client_ack: client_sent,
            server_seq,
            server_ack: server_next,
            // The response and its FIN.
            response_end: server_next + (response::response_len(&cause) + 1),
        };
        self.refused = Some(Box::new(Refused {
            refusal,
            answered_at: Timestamp::default(),
        }));
        refusal
    }
}

/// A refused flow's answer to the client ([`L7Flow::refusal`]).
#[derive(Debug)]
struct Refused {
    /// Its `client_ack` follows the client: one past the highest sequence number it
    /// sent.
    refusal: Refusal,
    /// When the response last went to the client.
    answered_at: Timestamp,
}

/// The fate sends some of the segment's bytes.
fn sends(fate: Fate) -> bool {
    match fate {
        Fate::Forward => true,
        Fate::Trim { start, end, .. } => end > start,
        Fate::Drop(_) => false,
    }
}

/// The segment as it came if it carries no payload, else the same without it.
fn without_payload(seg: &Segment<'_>) -> Fate {
    if seg.payload.is_empty() {
        Fate::Forward
    } else {
        Fate::Trim {
            start: 0,
            end: 0,
            fin: false,
        }
    }
}

/// A refusal whose sequence numbers [`L7Flow::refuse`] fills in.
fn placeholder(cause: RefuseCause) -> Refusal {
    Refusal {
        response_end: SeqNumber::default(),
        cause,
        client_seq: SeqNumber::default(),
        client_ack: SeqNumber::default(),
        server_seq: SeqNumber::default(),
        server_ack: SeqNumber::default(),
    }
}

/// Parses `data` (stream bytes from the parser's position), deciding each complete head.
/// Returns how many leading bytes are allowed, and the cause that refuses the stream, if
/// any. Bytes after the allowed prefix are an incomplete head unless refused; with
/// `ahead` (the flow is ahead of a hole; `data` starts at that sequence number), see
/// [`read_ahead`].
fn inspect(
    http: &mut RequestStream,
    path: &mut String,
    data: &[u8],
    ahead: Option<(&mut Passed, SeqNumber)>,
    decide: &mut impl FnMut(&Request<'_>) -> Verdict,
    stats: &mut Stats,
) -> (usize, Option<RefuseCause>) {
    if let Some((passed, seq)) = ahead {
        return read_ahead(http, data, passed, seq);
    }
    let mut pos = 0;
    loop {
        if !http.at_head() {
            // Body bytes: counted, not parsed as a head (and no header scratch space).
            match http.body(&data[pos..]) {
                Ok(0) => return (pos, None),
                Ok(len) => pos += len,
                Err(e) => return (pos, Some(RefuseCause::Http(e))),
            }
            continue;
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        match http.parse(&data[pos..], &mut headers) {
            Ok(Step::Partial) => return (pos, None),
            Ok(Step::Body { len }) => pos += len,
            Ok(Step::Head { head, len }) => {
                if let Err(e) = http_path::normalize_into(head.target, path) {
                    return (pos, Some(RefuseCause::Path(e)));
                }
                stats.requests += 1;
                match decide(&Request {
                    head,
                    path: path.as_str(),
                }) {
                    Verdict::Allow => pos += len,
                    Verdict::Refuse { status, reason } => {
                        return (pos, Some(RefuseCause::Policy { status, reason }))
                    }
                }
            }
            Err(e) => return (pos, Some(RefuseCause::Http(e))),
        }
    }
}

/// [`inspect`] ahead of a hole in a chunked body: passes chunk data unseen and reads
/// the body's framing (size lines, trailers), copying it into `passed` (which checks
/// what the client sends there again). Stops where the copy is full, and at the end of
/// the body: the next head is read once the server has everything before it (no head
/// is decided ahead of a hole). The bytes after the allowed prefix are held.
fn read_ahead(
    http: &mut RequestStream,
    data: &[u8],
    passed: &mut Passed,
    seq: SeqNumber,
) -> (usize, Option<RefuseCause>) {
    let mut pos = 0;
    while pos < data.len() {
        let opaque = http.opaque();
        if opaque > 0 {
            let n = usize::try_from(opaque)
                .unwrap_or(usize::MAX)
                .min(data.len() - pos);
            http.skip_opaque(n as u64);
            pos += n;
            continue;
        }
        let at = seq + pos;
        let fits = passed.room(at).min(data.len() - pos);
        match http.framing(&data[pos..pos + fits]) {
            Ok(0) => break,
            Ok(n) => {
                passed.record(at, &data[pos..pos + n]);
                pos += n;
            }
            Err(e) => return (pos, Some(RefuseCause::Http(e))),
        }
    }
    (pos, None)
}
