//! Bounded client→server stream reassembly.

use super::SeqNumber;

/// Most disjoint filled ranges (so at most this many holes) a [`Reassembler`] tracks,
/// like smoltcp's assembler: a fixed bound, and a typed error beyond it. 64: a client
/// whose segments arrive reordered by a few milliseconds at gigabit rates leaves dozens
/// of holes in a window (measured with `mesh-faultbench`, 25% reordering: 8 ranges made
/// a chunked upload through an inspected port resend 37 of 50 MB; docs/benchmarks.md).
pub const MAX_RANGES: usize = 64;

/// Buffer bytes an emptied window keeps for the next hole (the reassembly window's
/// size before it grew to 1 MiB); a burst beyond it is given back when it drains.
pub const RETAINED: usize = 64 * 1024;
/// Range entries an emptied window keeps.
const RETAINED_RANGES: usize = 8;

/// A window of one direction's byte stream, starting at [`Reassembler::base`], the first
/// byte not yet consumed.
///
/// Guarantees:
/// - At most `cap` bytes past `base` are ever buffered: a segment starting beyond is
///   refused ([`InsertError::Full`]), one reaching beyond is cut ([`Inserted::truncated`]);
///   in at most
///   [`MAX_RANGES`] filled ranges. When a segment would make one range too many, the
///   farthest range is forgotten if the segment lies before it (never-inspected bytes;
///   the sender sends them again), so the window can always fill from the front;
///   otherwise the segment is refused ([`InsertError::TooManyHoles`]).
/// - A buffered byte is never replaced. A segment overlapping buffered bytes with other
///   values is refused whole ([`InsertError::Conflict`]), so what [`contiguous`] returns
///   is what was first received, and what the caller inspects is what it delivers.
/// - Bytes before `base` are gone; a retransmission of them is trimmed and reported as
///   [`Inserted::old`] (they cannot be compared any more: the caller already delivered
///   its own copy, and delivers nothing of them again).
/// - Nothing is allocated until bytes must be buffered; the buffer then grows to the
///   span it needs (at most `cap`, at most twice that in capacity) and is reused. Once
///   everything buffered is consumed, a buffer or range list larger than [`RETAINED`]
///   bytes (or entries) is given back: a flow that held a burst keeps no more than
///   that between bursts (what it holds is charged to a global limit, what it keeps
///   is not).
///
/// [`contiguous`]: Reassembler::contiguous
#[derive(Clone, Debug)]
pub struct Reassembler {
    base: SeqNumber,
    /// `buf[head + i]` holds byte `base + i` where some range covers `i`.
    head: usize,
    buf: Vec<u8>,
    /// Filled ranges as offsets from `base`: sorted, disjoint, not adjacent; at most
    /// [`MAX_RANGES`] (on the heap, so that a flow with nothing buffered stays small).
    ranges: Vec<(usize, usize)>,
    cap: usize,
    fin: Option<SeqNumber>,
}

/// What [`Reassembler::insert`] did with a segment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Inserted {
    /// Leading bytes before `base` (consumed earlier): a retransmission, trimmed.
    pub old: usize,
    /// Bytes equal to bytes already buffered: a retransmission, nothing changed.
    pub duplicate: usize,
    /// Bytes buffered for the first time.
    pub new: usize,
    /// Trailing bytes beyond the window, not buffered (the sender sends them again).
    pub truncated: usize,
}

/// Why a segment was not buffered. Nothing of it was kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InsertError {
    #[error("segment reaches beyond the reassembly window")]
    Full,
    #[error("segment would leave more than {MAX_RANGES} holes in the reassembly window")]
    TooManyHoles,
    #[error("segment disagrees with bytes already received at sequence {seq}")]
    Conflict { seq: SeqNumber },
    #[error("segment data after the stream's FIN")]
    AfterFin,
    #[error("FIN at a different position than an earlier FIN or than data already received")]
    FinConflict,
}

impl Reassembler {
    /// An empty window whose first byte is `start` (one past the ISN), holding at most
    /// `cap` bytes (which must be below 2³⁰).
    pub fn new(start: SeqNumber, cap: usize) -> Reassembler {
        debug_assert!(cap < 1 << 30);
        Reassembler {
            base: start,
            head: 0,
            buf: Vec::new(),
            ranges: Vec::new(),
            cap,
            fin: None,
        }
    }

    /// The first byte not yet consumed.
    pub fn base(&self) -> SeqNumber {
        self.base
    }

    pub fn cap(&self) -> usize {
        self.cap
    }

    /// The stream's FIN, once seen.
    pub fn fin(&self) -> Option<SeqNumber> {
        self.fin
    }

    /// Nothing buffered.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Bytes buffered (filled), contiguous or not.
    pub fn buffered(&self) -> usize {
        self.filled().iter().map(|(s, e)| e - s).sum()
    }

    /// Bytes of memory held by the buffer (for a global limit).
    pub fn memory(&self) -> usize {
        self.buf.capacity()
    }

    /// The buffered bytes that follow `base` without a hole.
    pub fn contiguous(&self) -> &[u8] {
        match self.filled().first() {
            Some(&(0, end)) => &self.buf[self.head..self.head + end],
            _ => &[],
        }
    }

    /// True when every byte before the FIN has been received (and perhaps consumed).
    pub fn fin_in_order(&self) -> bool {
        self.fin == Some(self.base + self.contiguous().len())
    }

    fn filled(&self) -> &[(usize, usize)] {
        &self.ranges
    }

    /// Buffers `data`, which starts at `seq`, by the rules in the type's docs.
    pub fn insert(&mut self, seq: SeqNumber, data: &[u8]) -> Result<Inserted, InsertError> {
        let mut off = seq - self.base;
        let mut data = data;
        let mut old = 0;
        if off < 0 {
            let behind = usize::try_from(-off).unwrap_or(usize::MAX);
            if behind >= data.len() {
                return Ok(Inserted {
                    old: data.len(),
                    ..Inserted::default()
                });
            }
            old = behind;
            data = &data[behind..];
            off = 0;
        }
        if data.is_empty() {
            return Ok(Inserted::default());
        }
        let off = match usize::try_from(off) {
            Ok(off) if off < self.cap => off,
            _ => return Err(InsertError::Full),
        };
        let mut end = off + data.len();
        let mut truncated = 0;
        if end > self.cap {
            // Keep the part that fits: the front of the stream must always be able to
            // make progress, whatever the segment size.
            truncated = end - self.cap;
            data = &data[..data.len() - truncated];
            end = self.cap;
        }
        if let Some(fin) = self.fin {
            if end as i64 > fin - self.base {
                return Err(InsertError::AfterFin);
            }
        }
        // Overlaps with buffered bytes must agree byte for byte.
        let mut duplicate = 0;
        for &(s, e) in self.filled() {
            let (lo, hi) = (s.max(off), e.min(end));
            if lo < hi {
                if self.buf[self.head + lo..self.head + hi] != data[lo - off..hi - off] {
                    let at = (lo..hi)
                        .find(|&i| self.buf[self.head + i] != data[i - off])
                        .unwrap_or(lo);
                    return Err(InsertError::Conflict {
                        seq: self.base + at,
                    });
                }
                duplicate += hi - lo;
            }
        }
        if duplicate == data.len() {
            return Ok(Inserted {
                old,
                duplicate,
                new: 0,
                truncated,
            });
        }

        // The new range absorbs every range it overlaps or touches.
        let first = self.filled().iter().position(|&(_, e)| e >= off);
        let n = self.ranges.len();
        let first = first.unwrap_or(n);
        let last = self.filled()[first..]
            .iter()
            .position(|&(s, _)| s > end)
            .map_or(n, |p| first + p);
        let absorbed = last - first;
        if n - absorbed + 1 > MAX_RANGES {
            if last == n {
                return Err(InsertError::TooManyHoles);
            }
            // Bytes nearer the stream position win: forget the farthest range (never
            // inspected nor delivered; the sender will send it again). Otherwise a
            // window full of holes could never fill from the front.
            self.ranges.pop();
        }

        self.make_room(end);
        self.buf[self.head + off..self.head + end].copy_from_slice(data);

        let mut merged = (off, end);
        if absorbed > 0 {
            merged.0 = merged.0.min(self.ranges[first].0);
            merged.1 = merged.1.max(self.ranges[last - 1].1);
        }
        // Replace ranges[first..last] by `merged`.
        self.ranges.drain(first..last);
        self.ranges.insert(first, merged);

        Ok(Inserted {
            old,
            duplicate,
            new: data.len() - duplicate,
            truncated,
        })
    }

    /// Records the stream's FIN at `seq`.
    pub fn set_fin(&mut self, seq: SeqNumber) -> Result<(), InsertError> {
        if let Some(fin) = self.fin {
            return if fin == seq {
                Ok(())
            } else {
                Err(InsertError::FinConflict)
            };
        }
        let end = self.filled().last().map_or(0, |&(_, e)| e);
        if seq - self.base < end as i64 {
            return Err(InsertError::FinConflict);
        }
        self.fin = Some(seq);
        Ok(())
    }

    /// Drops the first `n` bytes of [`contiguous`](Self::contiguous) (delivered) and
    /// advances `base` past them. `n` beyond the contiguous bytes is clamped.
    pub fn consume(&mut self, n: usize) {
        let n = n.min(self.contiguous().len());
        if n == 0 {
            return;
        }
        self.advance(n);
    }

    /// Advances `base` by `n` bytes that the caller took straight from a segment, without
    /// buffering them. Only valid while nothing is buffered in the first `n` bytes; returns
    /// false (and does nothing) otherwise.
    pub fn skip(&mut self, n: usize) -> bool {
        if self.filled().first().is_some_and(|&(s, _)| s < n) {
            return false;
        }
        if let Some(fin) = self.fin {
            if n as i64 > fin - self.base {
                return false;
            }
        }
        self.advance(n);
        true
    }

    /// Advances `base` by `n` bytes that the receiver has from elsewhere (it
    /// acknowledged them), dropping any buffered copy of them: opaque body bytes the
    /// caller let through out of order. Clamped to the FIN.
    pub fn forget(&mut self, n: usize) {
        let n = match self.fin {
            Some(fin) => n.min(usize::try_from(fin - self.base).unwrap_or(0)),
            None => n,
        };
        if n > 0 {
            self.advance(n);
        }
    }

    fn advance(&mut self, n: usize) {
        self.base = self.base + n;
        self.ranges.retain_mut(|(s, e)| {
            if *e > n {
                (*s, *e) = (s.saturating_sub(n), *e - n);
                true
            } else {
                false
            }
        });
        if self.ranges.is_empty() {
            self.head = 0;
            self.buf.clear();
            self.buf.shrink_to(RETAINED);
            self.ranges.shrink_to(RETAINED_RANGES);
        } else {
            self.head += n;
        }
    }

    /// Makes `buf[head + end - 1]` addressable, moving the live bytes to the front first
    /// when the buffer would otherwise grow past `cap`.
    fn make_room(&mut self, end: usize) {
        if self.head + end > self.cap && self.head > 0 {
            self.buf.copy_within(self.head.., 0);
            self.buf.truncate(self.buf.len() - self.head);
            self.head = 0;
        }
        if self.buf.len() < self.head + end {
            self.buf.resize(self.head + end, 0);
        }
    }
}
