//! TCP sequence numbers: arithmetic and comparison modulo 2³² (RFC 9293 §3.4).

use std::cmp::Ordering;
use std::fmt;
use std::ops::{Add, Sub};

/// A TCP sequence number. Ordering is by the signed 32-bit distance between two numbers,
/// as TCP defines it, so it is only meaningful for numbers less than 2³¹ apart (any two
/// numbers within one connection's window are).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SeqNumber(pub u32);

impl SeqNumber {
    /// Signed distance from `earlier` to `self`: positive when `self` is after `earlier`.
    pub fn distance_from(self, earlier: SeqNumber) -> i64 {
        // Reinterpreting the wrapped difference as i32 is the RFC 9293 comparison.
        i64::from(self.0.wrapping_sub(earlier.0) as i32)
    }

    pub fn max(self, other: SeqNumber) -> SeqNumber {
        if other > self {
            other
        } else {
            self
        }
    }
}

impl fmt::Debug for SeqNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "seq {}", self.0)
    }
}

impl fmt::Display for SeqNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl Add<usize> for SeqNumber {
    type Output = SeqNumber;

    /// Advances by `n` bytes, wrapping. `n` must be below 2³¹ (a TCP window always is).
    fn add(self, n: usize) -> SeqNumber {
        debug_assert!(n < 1 << 31, "sequence advance {n} exceeds half the space");
        SeqNumber(self.0.wrapping_add(n as u32))
    }
}

impl Sub<usize> for SeqNumber {
    type Output = SeqNumber;

    /// Goes back by `n` bytes, wrapping. `n` must be below 2³¹.
    fn sub(self, n: usize) -> SeqNumber {
        debug_assert!(n < 1 << 31, "sequence step {n} exceeds half the space");
        SeqNumber(self.0.wrapping_sub(n as u32))
    }
}

impl Sub<SeqNumber> for SeqNumber {
    type Output = i64;

    /// Same as [`SeqNumber::distance_from`].
    fn sub(self, earlier: SeqNumber) -> i64 {
        self.distance_from(earlier)
    }
}

impl PartialOrd for SeqNumber {
    fn partial_cmp(&self, other: &SeqNumber) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for SeqNumber {
    /// Not a total order over all of `u32` (it is circular), but consistent for numbers
    /// less than 2³¹ apart, which is all TCP compares.
    fn cmp(&self, other: &SeqNumber) -> Ordering {
        self.distance_from(*other).cmp(&0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps_and_compares_across_zero() {
        let a = SeqNumber(u32::MAX - 2);
        let b = a + 5;
        assert_eq!(b, SeqNumber(2));
        assert!(b > a);
        assert!(a < b);
        assert_eq!(b - a, 5);
        assert_eq!(a - b, -5);
        assert_eq!(b - 5usize, a);
        assert_eq!(a.max(b), b);
        assert_eq!(b.max(a), b);
    }

    #[test]
    fn half_space_is_the_horizon() {
        let a = SeqNumber(0);
        assert!(SeqNumber((1 << 31) - 1) > a);
        assert!(SeqNumber(1 << 31) < a, "2^31 ahead reads as behind");
    }
}
