//! What an inspected flow let through ahead of a hole in a chunked body, and its copy
//! of the chunk framing there (see the `l7` module docs, "Parsing ahead of a hole").

use std::collections::VecDeque;

use crate::enforce::flow::SeqNumber;

/// Most bytes of chunk framing (size lines, trailers) a flow copies while it parses
/// ahead of a hole. A chunk's framing is about 8 bytes (CRLF, size, CRLF); curl sends
/// 64 KiB chunks, so this covers tens of megabytes of window. Beyond it the flow stops
/// parsing ahead and holds the framing until the server has everything before it
/// (fail closed, invariant 6).
pub const MAX_FRAMING_BYTES: usize = 4096;

/// Most separate runs of framing copied (one per chunk): 256 chunks of 64 KiB are
/// 16 MiB. Bounds the memory of a flood of tiny chunks, with [`MAX_FRAMING_BYTES`].
pub const MAX_FRAMING_RUNS: usize = 256;

/// The stretch `[from, position)` of the client stream that the flow let through while
/// bytes before it may still be missing at the server: chunk data (opaque, passed
/// unheld and uncopied, or not received yet) and chunk framing the flow parsed ahead of
/// the hole. The server may lack any of these bytes, so the client's retransmissions of
/// them go out again; what guarantees that the server reads the framing meshd read
/// (invariant 4) is the copy kept here of every framing byte in the stretch: a
/// retransmission that disagrees with it is dropped whole.
///
/// Bounded: at most [`MAX_FRAMING_BYTES`] in [`MAX_FRAMING_RUNS`] runs
/// ([`Passed::room`] says what still fits; the caller stops parsing ahead when nothing
/// does). Copies go as the server acknowledges them ([`Passed::acked`]).
#[derive(Debug)]
pub struct Passed {
    from: SeqNumber,
    /// Where each run of copied framing starts and how long it is, in stream order,
    /// none adjacent to the next.
    runs: VecDeque<(SeqNumber, usize)>,
    /// The runs' bytes, one run after the other.
    bytes: VecDeque<u8>,
}

impl Passed {
    /// A stretch starting at `from`, with nothing copied yet.
    pub fn new(from: SeqNumber) -> Passed {
        Passed {
            from,
            runs: VecDeque::new(),
            bytes: VecDeque::new(),
        }
    }

    /// The first byte the server may lack.
    pub fn from(&self) -> SeqNumber {
        self.from
    }

    /// How many framing bytes starting at `seq` (the end of the stretch) may still be
    /// copied.
    pub fn room(&self, seq: SeqNumber) -> usize {
        let extends = self.runs.back().is_some_and(|&(s, n)| s + n == seq);
        if !extends && self.runs.len() >= MAX_FRAMING_RUNS {
            return 0;
        }
        MAX_FRAMING_BYTES - self.bytes.len()
    }

    /// Copies framing bytes `data` read at `seq`, after all those copied before. At
    /// most [`room`](Self::room) bytes.
    pub fn record(&mut self, seq: SeqNumber, data: &[u8]) {
        debug_assert!(data.len() <= self.room(seq));
        if data.is_empty() {
            return;
        }
        match self.runs.back_mut() {
            Some((s, n)) if *s + *n == seq => *n += data.len(),
            _ => self.runs.push_back((seq, data.len())),
        }
        self.bytes.extend(data);
    }

    /// Checks `data`, received at `seq`, against the framing copied where they
    /// overlap: `Err` with the first sequence number where they differ.
    pub fn check(&self, seq: SeqNumber, data: &[u8]) -> Result<(), SeqNumber> {
        let end = seq + data.len();
        let mut at = 0;
        for &(s, n) in &self.runs {
            let run_end = s + n;
            if s - end >= 0 {
                break;
            }
            let (lo, hi) = (s.max(seq), if run_end < end { run_end } else { end });
            if hi - lo > 0 {
                let copy = self
                    .bytes
                    .range(at + (lo - s) as usize..at + (hi - s) as usize);
                let got = &data[(lo - seq) as usize..(hi - seq) as usize];
                if let Some(i) = copy.zip(got).position(|(a, b)| a != b) {
                    return Err(lo + i);
                }
            }
            at += n;
        }
        Ok(())
    }

    /// The server has every byte before `acked`: the stretch starts there at the
    /// earliest, and copies of framing before it go. True if a copy went (there is
    /// room again).
    pub fn acked(&mut self, acked: SeqNumber) -> bool {
        if acked - self.from > 0 {
            self.from = acked;
        }
        let mut freed = false;
        while let Some(&(s, n)) = self.runs.front() {
            if (s + n) - acked > 0 {
                break;
            }
            self.runs.pop_front();
            self.bytes.drain(..n);
            freed = true;
        }
        freed
    }

    /// Bytes of memory it occupies.
    pub fn memory(&self) -> usize {
        std::mem::size_of::<Passed>()
            + self.bytes.capacity()
            + self.runs.capacity() * std::mem::size_of::<(SeqNumber, usize)>()
    }
}
