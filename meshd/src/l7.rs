//! Layer-7 enforcement of one TCP flow: hold, decide, release (sans-IO).
//!
//! [`L7Flow`] sits in the packet path of one connection to a port with HTTP rules. The
//! shell feeds it every client→server segment ([`L7Flow::on_client_segment`]) and every
//! server→client segment ([`L7Flow::on_server_segment`]), with `now`, and calls
//! [`L7Flow::poll`] at [`L7Flow::poll_at`]. For each client segment it answers with an
//! [`Outcome`]: what to do with the segment itself ([`Fate`]), bytes to send to the server
//! from its own reassembled view ([`Release`], read with [`L7Flow::release_data`]), and
//! whether the flow is refused ([`Refusal`]; build the packets with [`crate::inject`]).
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
//!   with buffered bytes is dropped whole.
//! - **No copy unless held.** In-order segments of an allowed stream (a head completed
//!   within the segment, a body of any size) are forwarded as they came, possibly cut;
//!   only a head split across segments, or out-of-order data, is copied.
//! - **A refused connection closes cleanly.** After a refusal the server has been reset
//!   and says nothing more, so the flow answers the client on its behalf until the
//!   client has closed ([`Answer`]): it is never left retransmitting its FIN.
//! - **Bounded.** At most `Config::max_held` bytes are buffered per flow; a head larger
//!   than `limits.max_head` is refused with 431, one incomplete for `head_timeout` with
//!   408.
//!
//! # Driving it (the shell)
//!
//! ```text
//! client→server segment:  let o = flow.on_client_segment(&seg, now, |req| policy(req));
//!     1. o.fate:     Forward → send the packet unchanged
//!                    Trim{start,end,fin} → send it with payload[start..end],
//!                        seq + start, FIN only if `fin` (fix lengths, checksums)
//!                    Drop(_) → drop it (count the reason)
//!     2. o.release:  send flow.release_data() to the server from `seq`, split to the
//!                    MSS, the last piece with FIN if `fin` (inject::segments does it)
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

#[cfg(test)]
mod tests;

use std::time::Duration;

use mesh_proto::http_path::{self, PathError};

use crate::flow::{
    Direction, Flags, InsertError, InvalidSegment, Reassembler, Segment, SeqNumber, TcpFlow,
    Timestamp, Track,
};
use crate::http::{HttpError, Limits, RequestHead, RequestStream, Step, MAX_HEADERS};

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
            max_held: 64 * 1024,
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

/// Retransmissions of delivered bytes that the server has not acknowledged, in a row
/// and without its acknowledgement moving, after which those bytes count as lost on the
/// way to the server. A spurious retransmission (the server's ACK late or lost on the
/// way back) is followed by that ACK; a lost segment is retransmitted once by fast
/// retransmit and then at each RTO (about 0.2, 0.4, 0.8 s): three of them take a
/// second or two.
pub const LOST_AFTER: u8 = 3;

/// How long released bytes may stay unacknowledged by the server, with its
/// acknowledgement standing still, before they count as lost (see the module's known
/// limits). A server's TCP acknowledges within its delayed-ACK time (at most 200 ms on
/// Linux) even when its application does not read.
pub const RELEASE_ACK_TIMEOUT: Duration = Duration::from_secs(3);

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
    /// Segments dropped for disagreeing with earlier bytes.
    pub conflicts: u64,
    /// Segments dropped for lack of buffer room.
    pub out_of_window: u64,
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
    /// Retransmissions of delivered bytes the server has not acknowledged, in a row,
    /// and the server's acknowledgement when the last one came (see [`LOST_AFTER`]).
    unacked_retransmits: (u8, Option<SeqNumber>),
    /// End of the bytes released from the buffer that the server has not acknowledged,
    /// and since when its acknowledgement has not moved.
    unacked_release: Option<(SeqNumber, Timestamp)>,
    /// Once refused by meshd: the refusal, to answer what the client sends after it
    /// (`None` again once the client is reset or reset the flow itself). Its
    /// `client_ack` follows the client: one past the highest sequence number it sent.
    refusal: Option<Refusal>,
    /// When the response last went to the client.
    answered_at: Timestamp,
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
            unacked_retransmits: (0, None),
            unacked_release: None,
            refusal: None,
            answered_at: Timestamp::default(),
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
        Some(match &self.reasm {
            Some(r) => r.base() + self.releasing,
            None => start,
        })
    }

    /// The refusal meshd answered the client with, once refused (its `client_ack`
    /// follows what the client sent since); `None` before, or once the client reset.
    pub fn refusal(&self) -> Option<Refusal> {
        self.refusal
    }

    /// Bytes buffered now (for a total limit across flows).
    pub fn held(&self) -> usize {
        self.reasm.as_ref().map_or(0, Reassembler::buffered)
    }

    /// Memory the flow's buffer occupies.
    pub fn memory(&self) -> usize {
        self.reasm.as_ref().map_or(0, Reassembler::memory) + self.path.capacity()
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

    fn head_deadline(&self) -> Option<Timestamp> {
        self.held_since.map(|t| t.plus(self.config.head_timeout))
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
            self.answered_at = now;
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
            self.answered_at = now;
        }
        outcome
    }

    /// A client segment after meshd refused the flow: answered on the server's behalf
    /// ([`Answer`]) until the client has closed. The client has the whole answer once
    /// it acknowledges the response's FIN; before that, the response goes again (lost
    /// on the way, or the segment crossed it); after, its FIN is acknowledged and any
    /// data reset (RFC 9293 §3.10.7.4: a reset at the number it expects, which it has
    /// just acknowledged).
    fn after_refusal(&mut self, seg: &Segment<'_>, now: Timestamp) -> Outcome {
        let mut outcome = Outcome::fate(Fate::Drop(DropReason::Refused));
        let Some(refusal) = self.refusal.as_mut() else {
            return outcome;
        };
        if seg.flags.contains(Flags::RST) {
            self.refusal = None;
            return outcome;
        }
        let end = seg.seq + seg.seq_len();
        if end > refusal.client_ack {
            refusal.client_ack = end;
        }
        let refusal = *refusal;
        let has_all = seg.flags.contains(Flags::ACK) && seg.ack - refusal.response_end >= 0;
        if !has_all {
            if now.since(self.answered_at) >= ANSWER_INTERVAL {
                self.answered_at = now;
                outcome.answer = Some(Answer::Response);
            }
        } else if !seg.payload.is_empty() {
            self.refusal = None;
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
        let forwarded = self.stats.forwarded + self.stats.released;
        let outcome = self.on_data(seg, &mut decide);
        let progressed = self.stats.forwarded + self.stats.released > forwarded;
        self.update_held_since(now, progressed);
        if let (Some(r), None) = (outcome.release, outcome.refusal) {
            let since = self.unacked_release.map_or(now, |(_, since)| since);
            self.unacked_release = Some((r.seq + r.len, since));
        }
        outcome
    }

    fn on_data(
        &mut self,
        seg: &Segment<'_>,
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

        let base = reasm.base();
        let behind = base - seg.seq;
        let direct = reasm.is_empty() && behind >= 0 && (behind as usize) < payload.len();
        let (fate, refusal) = if direct {
            self.on_direct(payload, behind as usize, decide)
        } else {
            match self.on_buffered(seg, decide) {
                Ok(r) => r,
                Err(fate) => return Outcome::fate(fate),
            }
        };

        let mut outcome = Outcome {
            refusal,
            ..Outcome::fate(fate)
        };
        if self.releasing > 0 {
            let reasm = self.reasm.as_ref().expect("checked above");
            outcome.release = Some(Release {
                seq: reasm.base(),
                len: self.releasing,
                fin: false,
                ack: self.tcp.client.acked,
                window: self.tcp.client.window,
            });
        }
        if outcome.refusal.is_none() {
            self.place_fin(seg, &mut outcome);
        }
        if let Some(refusal) = &mut outcome.refusal {
            *refusal = self.refuse(refusal.cause);
        } else {
            outcome.held_ack = self.held_ack();
        }
        outcome
    }

    /// An ACK for the bytes held in order beyond those being released now, if any (see
    /// [`HeldAck`]). Out-of-order bytes are not acknowledged: the client must fill the
    /// hole first.
    fn held_ack(&self) -> Option<HeldAck> {
        let reasm = self.reasm.as_ref()?;
        let in_order = reasm.contiguous().len();
        if in_order <= self.releasing || self.phase == Phase::Refused {
            return None;
        }
        Some(HeldAck {
            seq: self.tcp.server.sent_end?,
            ack: reasm.base() + in_order,
            window: self.tcp.server.window,
        })
    }

    /// The segment starts at or before the stream position, nothing is buffered: inspect
    /// `payload[skip..]` in place and forward the allowed part of it.
    fn on_direct(
        &mut self,
        payload: &[u8],
        skip: usize,
        decide: &mut impl FnMut(&Request<'_>) -> Verdict,
    ) -> (Fate, Option<Refusal>) {
        let data = &payload[skip..];
        let (allowed, cause) = inspect(
            &mut self.http,
            &mut self.path,
            data,
            decide,
            &mut self.stats,
        );
        let reasm = self.reasm.as_mut().expect("caller checked");
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
        let fate = if skip == 0 && allowed == data.len() {
            Fate::Forward
        } else if allowed == 0 && skip == 0 {
            Fate::Drop(if cause.is_some() {
                DropReason::Refused
            } else {
                DropReason::Buffered
            })
        } else {
            Fate::Trim {
                start: skip,
                end: skip + allowed,
                fin: false,
            }
        };
        (fate, cause.map(placeholder))
    }

    /// Everything else: buffer the segment's new bytes, then inspect what is contiguous
    /// and release the allowed part from the buffer.
    fn on_buffered(
        &mut self,
        seg: &Segment<'_>,
        decide: &mut impl FnMut(&Request<'_>) -> Verdict,
    ) -> Result<(Fate, Option<Refusal>), Fate> {
        let reasm = self.reasm.as_mut().expect("caller checked");
        let payload = seg.payload;
        // Bytes before this were delivered (or skipped); from here on they are held.
        let delivered_end = reasm.base();
        let inserted = match reasm.insert(seg.seq, payload) {
            Ok(inserted) => inserted,
            Err(InsertError::Conflict { seq }) => {
                self.stats.conflicts += 1;
                return Err(Fate::Drop(DropReason::Conflict(seq)));
            }
            Err(InsertError::Full | InsertError::TooManyHoles) => {
                self.stats.out_of_window += 1;
                return Err(Fate::Drop(DropReason::OutOfWindow));
            }
            Err(InsertError::AfterFin | InsertError::FinConflict) => {
                return Err(Fate::Drop(DropReason::AfterFin));
            }
        };
        self.stats.retransmitted += (inserted.old + inserted.duplicate) as u64;
        self.stats.copied += inserted.new as u64;
        if inserted.truncated > 0 {
            self.stats.out_of_window += 1;
        }
        if inserted.new == 0 {
            if inserted.old > 0 && self.delivery_lost(seg, delivered_end) {
                return Ok((
                    Fate::Drop(DropReason::Refused),
                    Some(placeholder(RefuseCause::Undelivered)),
                ));
            }
            let fate = if inserted.duplicate > 0 {
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
            return Ok((fate, None));
        }
        let data = reasm.contiguous();
        let (allowed, cause) = inspect(
            &mut self.http,
            &mut self.path,
            data,
            decide,
            &mut self.stats,
        );
        self.releasing = allowed;
        self.stats.released += allowed as u64;
        Ok((Fate::Drop(DropReason::Buffered), cause.map(placeholder)))
    }

    /// Counts a retransmission of delivered bytes (those before `delivered_end`; the
    /// rest of the segment may be held bytes, which the server has not seen by design);
    /// true once [`LOST_AFTER`] of them came for delivered bytes the server has not
    /// acknowledged, with its acknowledgement standing still.
    fn delivery_lost(&mut self, seg: &Segment<'_>, delivered_end: SeqNumber) -> bool {
        let acked = self.tcp.server.acked;
        let seg_end = seg.seq + seg.payload.len();
        let end = if seg_end - delivered_end > 0 {
            delivered_end
        } else {
            seg_end
        };
        let (count, at) = self.unacked_retransmits;
        self.unacked_retransmits = match acked {
            // The server has all of it: a spurious retransmission.
            Some(a) if end - a <= 0 => (0, None),
            _ if count > 0 && at == acked => (count.saturating_add(1), acked),
            _ => (1, acked),
        };
        self.unacked_retransmits.0 >= LOST_AFTER
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
            if reasm.fin_in_order() {
                // Everything up to the FIN arrived but part of it is an undecided head:
                // the request can never complete.
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
            _ => delivered,
        };
        let refusal = Refusal {
            cause,
            client_seq: server_next,
            client_ack: client_sent,
            server_seq,
            server_ack: server_next,
            // The response and its FIN.
            response_end: server_next + (crate::inject::response_len(&cause) + 1),
        };
        self.refusal = Some(refusal);
        refusal
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
/// any. Bytes after the allowed prefix are an incomplete head unless refused.
fn inspect(
    http: &mut RequestStream,
    path: &mut String,
    data: &[u8],
    decide: &mut impl FnMut(&Request<'_>) -> Verdict,
    stats: &mut Stats,
) -> (usize, Option<RefuseCause>) {
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
