//! TCP flow tracking and client→server stream reassembly (sans-IO).
//!
//! Nothing here reads a clock or touches a socket: segments and `now` come in, outcomes go
//! out. Three pieces:
//!
//! - [`SeqNumber`]: TCP sequence numbers, compared and advanced modulo 2³² (RFC 9293
//!   §3.4). No raw `u32` arithmetic on sequence numbers anywhere else.
//! - [`TcpFlow`]: per-direction tracking of one connection from its handshake: initial
//!   sequence numbers, how far each side has sent, what each side has acknowledged, FIN
//!   and RST. Both directions have a [`Side`] so that later features (rate limits, circuit
//!   breaking) can read the server→client direction too.
//! - [`Reassembler`]: a bounded buffer that turns client→server segments into the byte
//!   stream the enforcer inspects and then delivers *from its own view* (DESIGN.md
//!   invariant 4). Bytes once buffered are never replaced: a later segment that disagrees
//!   with them is refused whole ([`InsertError::Conflict`]).

mod reassembler;
mod seq;

pub use reassembler::{InsertError, Inserted, Reassembler, MAX_RANGES};
pub use seq::SeqNumber;

use std::time::Duration;

/// A point on the shell's monotonic clock, in milliseconds since an epoch the shell
/// chooses (e.g. its start). The sans-IO cores only compare and add; they never read it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(u64);

impl Timestamp {
    pub const fn from_millis(ms: u64) -> Timestamp {
        Timestamp(ms)
    }

    pub const fn millis(self) -> u64 {
        self.0
    }

    /// `self + d`, saturating.
    pub fn plus(self, d: Duration) -> Timestamp {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Timestamp(self.0.saturating_add(ms))
    }

    /// Time elapsed from `earlier` to `self`, zero if `earlier` is later.
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }
}

/// The TCP flags of a [`Segment`]: the packet path's one flags type.
pub use crate::wire::TcpFlags as Flags;

/// The parts of a TCP segment that flow tracking reads. `payload` borrows the shell's
/// packet buffer; nothing here keeps it beyond the call unless it says so.
#[derive(Clone, Copy, Debug)]
pub struct Segment<'a> {
    pub seq: SeqNumber,
    pub ack: SeqNumber,
    pub flags: Flags,
    pub window: u16,
    /// Its timestamps option ([`Timestamps::parse`] of the options), if any.
    pub timestamps: Option<Timestamps>,
    pub payload: &'a [u8],
}

/// The TCP timestamps option (RFC 7323 §3.2): kind 8, length 10.
///
/// Once both SYNs carried it, every segment carries it (§3.2), and the receiver
/// echoes the `val` of the segment that advanced its window (`TS.Recent`, §4.3) in
/// the `ecr` of its ACKs; the sender measures its round-trip time from that echo.
/// Bytes meshd sends on the client's behalf must therefore carry the `val` of the
/// client segment that made them go, or the server echoes an older one and the
/// client's RTT estimate grows by the time meshd held them (issue 26).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timestamps {
    /// TSval: the sender's timestamp clock.
    pub val: u32,
    /// TSecr: the latest TSval received from the other side.
    pub ecr: u32,
}

impl Timestamps {
    /// Option kind (RFC 7323 §3.2).
    pub const KIND: u8 = 8;
    /// Option length, kind and length bytes included.
    pub const LEN: u8 = 10;

    /// Finds the timestamps option in TCP `options` (the bytes between the fixed
    /// 20-byte header and the payload), walking the TLV list of RFC 9293 §3.1: kind 0
    /// ends it, kind 1 is one byte of padding, every other kind has a length byte. A
    /// malformed list (a length below 2 or past the end) yields `None`.
    pub fn parse(options: &[u8]) -> Option<Timestamps> {
        Timestamps::locate(options).map(|(_, ts)| ts)
    }

    /// [`parse`](Self::parse), with where the option starts in `options` (its kind
    /// byte), for [`write_at`](Self::write_at).
    pub fn locate(options: &[u8]) -> Option<(usize, Timestamps)> {
        let mut i = 0;
        while i < options.len() {
            match options[i] {
                0 => return None,
                1 => i += 1,
                kind => {
                    let len = usize::from(*options.get(i + 1)?);
                    if len < 2 || i + len > options.len() {
                        return None;
                    }
                    if kind == Timestamps::KIND && len == usize::from(Timestamps::LEN) {
                        let field = |at: usize| -> Option<u32> {
                            Some(u32::from_be_bytes(
                                options.get(i + at..i + at + 4)?.try_into().ok()?,
                            ))
                        };
                        return Some((
                            i,
                            Timestamps {
                                val: field(2)?,
                                ecr: field(6)?,
                            },
                        ));
                    }
                    i += len;
                }
            }
        }
        None
    }

    /// Writes these values over the option found at `at` by [`locate`](Self::locate).
    pub fn write_at(self, options: &mut [u8], at: usize) {
        if let Some(field) = options.get_mut(at + 2..at + 10) {
            field[..4].copy_from_slice(&self.val.to_be_bytes());
            field[4..].copy_from_slice(&self.ecr.to_be_bytes());
        }
    }

    /// The option as sent on the wire, led by two NOPs so that the fields are
    /// 32-bit aligned (RFC 7323 Appendix A), as Linux and BSD send it.
    pub fn emit(self) -> [u8; 12] {
        let mut out = [
            1,
            1,
            Timestamps::KIND,
            Timestamps::LEN,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
        ];
        out[4..8].copy_from_slice(&self.val.to_be_bytes());
        out[8..12].copy_from_slice(&self.ecr.to_be_bytes());
        out
    }
}

impl Segment<'_> {
    /// Sequence space the segment occupies: payload, plus one each for SYN and FIN.
    pub fn seq_len(&self) -> usize {
        self.payload.len()
            + usize::from(self.flags.contains(Flags::SYN))
            + usize::from(self.flags.contains(Flags::FIN))
    }
}

/// Which way a segment travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// From the connection's initiator (the peer that sent the first SYN).
    ClientToServer,
    ServerToClient,
}

/// What one side of a connection has sent and acknowledged, as seen in its segments.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Side {
    /// Initial sequence number, from this side's SYN.
    pub isn: Option<SeqNumber>,
    /// One past the highest sequence number this side has sent (SYN and FIN count).
    pub sent_end: Option<SeqNumber>,
    /// The highest acknowledgement this side has sent: what it has received of the
    /// other side's stream.
    pub acked: Option<SeqNumber>,
    /// Last advertised window (unscaled, as on the wire).
    pub window: u16,
    /// Sequence number of this side's FIN, once seen.
    pub fin: Option<SeqNumber>,
    /// Payload bytes seen from this side, retransmissions included.
    pub bytes: u64,
    pub segments: u64,
}

impl Side {
    fn record(&mut self, seg: &Segment<'_>) {
        self.segments += 1;
        self.bytes += seg.payload.len() as u64;
        self.window = seg.window;
        let end = seg.seq + seg.seq_len();
        if !matches!(self.sent_end, Some(e) if end <= e) {
            self.sent_end = Some(end);
        }
        if seg.flags.contains(Flags::ACK) && !matches!(self.acked, Some(a) if seg.ack <= a) {
            self.acked = Some(seg.ack);
        }
        if seg.flags.contains(Flags::FIN) && self.fin.is_none() {
            self.fin =
                Some(seg.seq + seg.payload.len() + usize::from(seg.flags.contains(Flags::SYN)));
        }
    }
}

/// Connection state as far as an observer in the path can tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpState {
    /// Nothing seen yet.
    Unseen,
    /// The client's SYN was seen.
    SynSent,
    /// The server answered with SYN-ACK for the client's ISN.
    Established,
    /// Both sides sent FIN; the last ACKs may still pass (a flow table may expire the
    /// flow sooner than an established one).
    Closing,
    /// A RST was seen.
    Closed,
}

/// How the tracker classifies one segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Track {
    /// A handshake segment (SYN, SYN-ACK); it carries no stream data to inspect.
    Handshake,
    /// A segment of an established connection: process its payload and FIN.
    Data,
    /// A RST: the connection is over; pass it on.
    Reset,
    /// Refuse the segment (drop it): see the reason.
    Invalid(InvalidSegment),
}

/// Why a segment does not fit the tracked connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidSegment {
    #[error("segment of a connection whose handshake was not seen")]
    NoHandshake,
    #[error("SYN with a different initial sequence number on an established connection")]
    SynMismatch,
    #[error("SYN-ACK that does not acknowledge the client's SYN")]
    SynAckMismatch,
    #[error("segment after the connection closed")]
    Closed,
}

/// One TCP connection, both directions, from its handshake.
#[derive(Clone, Debug)]
pub struct TcpFlow {
    pub client: Side,
    pub server: Side,
    state: TcpState,
    last_seen: Timestamp,
}

impl TcpFlow {
    pub fn new(now: Timestamp) -> TcpFlow {
        TcpFlow {
            client: Side::default(),
            server: Side::default(),
            state: TcpState::Unseen,
            last_seen: now,
        }
    }

    pub fn state(&self) -> TcpState {
        self.state
    }

    pub fn last_seen(&self) -> Timestamp {
        self.last_seen
    }

    /// True when nothing was seen in either direction for `idle`: the flow table may
    /// evict it (and an enforcer must then treat further segments as [`Track::Invalid`]).
    pub fn is_idle(&self, now: Timestamp, idle: Duration) -> bool {
        now.since(self.last_seen) >= idle
    }

    /// The client's stream starts here (one past its ISN), once its SYN was seen.
    pub fn client_stream_start(&self) -> Option<SeqNumber> {
        self.client.isn.map(|isn| isn + 1)
    }

    /// Tracks one segment; `now` refreshes the idle timer of valid segments.
    pub fn on_segment(&mut self, dir: Direction, seg: &Segment<'_>, now: Timestamp) -> Track {
        let track = match dir {
            Direction::ClientToServer => self.classify_client(seg),
            Direction::ServerToClient => self.classify_server(seg),
        };
        if matches!(track, Track::Invalid(_)) {
            return track;
        }
        self.last_seen = now;
        match dir {
            Direction::ClientToServer => self.client.record(seg),
            Direction::ServerToClient => self.server.record(seg),
        }
        if track == Track::Reset {
            self.state = TcpState::Closed;
        } else if self.client.fin.is_some()
            && self.server.fin.is_some()
            && self.state == TcpState::Established
        {
            self.state = TcpState::Closing;
        }
        track
    }

    fn classify_client(&mut self, seg: &Segment<'_>) -> Track {
        let syn = seg.flags.contains(Flags::SYN);
        match self.state {
            TcpState::Closed => Track::Invalid(InvalidSegment::Closed),
            _ if seg.flags.contains(Flags::RST) => {
                if self.state == TcpState::Unseen {
                    Track::Invalid(InvalidSegment::NoHandshake)
                } else {
                    Track::Reset
                }
            }
            TcpState::Unseen if syn && !seg.flags.contains(Flags::ACK) => {
                self.client.isn = Some(seg.seq);
                self.state = TcpState::SynSent;
                Track::Handshake
            }
            TcpState::Unseen => Track::Invalid(InvalidSegment::NoHandshake),
            TcpState::SynSent if syn => {
                // A retransmitted SYN, or a new attempt with a new ISN before any answer.
                if self.client.isn != Some(seg.seq) {
                    self.client = Side::default();
                    self.client.isn = Some(seg.seq);
                }
                Track::Handshake
            }
            // Data before the SYN-ACK cannot be acknowledged by the server yet; the
            // client will send it again.
            TcpState::SynSent => Track::Invalid(InvalidSegment::NoHandshake),
            TcpState::Established | TcpState::Closing if syn => {
                if self.client.isn == Some(seg.seq) {
                    Track::Handshake
                } else {
                    Track::Invalid(InvalidSegment::SynMismatch)
                }
            }
            TcpState::Established | TcpState::Closing => Track::Data,
        }
    }

    fn classify_server(&mut self, seg: &Segment<'_>) -> Track {
        let syn = seg.flags.contains(Flags::SYN);
        match self.state {
            TcpState::Closed => Track::Invalid(InvalidSegment::Closed),
            TcpState::Unseen => Track::Invalid(InvalidSegment::NoHandshake),
            _ if seg.flags.contains(Flags::RST) => Track::Reset,
            TcpState::SynSent | TcpState::Established | TcpState::Closing if syn => {
                let expected = self.client.isn.map(|isn| isn + 1);
                if !seg.flags.contains(Flags::ACK) || Some(seg.ack) != expected {
                    return Track::Invalid(InvalidSegment::SynAckMismatch);
                }
                if self.state != TcpState::SynSent && self.server.isn != Some(seg.seq) {
                    return Track::Invalid(InvalidSegment::SynMismatch);
                }
                self.server.isn = Some(seg.seq);
                if self.state == TcpState::SynSent {
                    self.state = TcpState::Established;
                }
                Track::Handshake
            }
            TcpState::SynSent => Track::Invalid(InvalidSegment::NoHandshake),
            TcpState::Established | TcpState::Closing => Track::Data,
        }
    }
}

#[cfg(test)]
mod tests;
