//! The Internet checksum (RFC 1071), shared by everything that checks or rewrites a
//! TCP, UDP or IPv4 checksum on the packet path: summed a word at a time in native
//! order, with AVX2 where the CPU has it, as it runs over every payload byte it covers.

/// One's-complement sum of `data` as big-endian 16-bit words (RFC 1071), unfolded,
/// plus `initial`.
pub fn sum(data: &[u8], initial: u64) -> u64 {
    // RFC 1071 §2(B): the sum is byte-order independent, so the bulk is summed as
    // native-order 32-bit words (no byte swaps) and the folded result swapped once.
    let bulk = data.len() & !3;
    let mut acc = initial + u64::from(u16::from_be(fold(sum_words(&data[..bulk]))));
    let mut rest = data[bulk..].chunks_exact(2);
    for c in &mut rest {
        acc += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = rest.remainder() {
        acc += u64::from(*last) << 8;
    }
    acc
}

/// Sum of `data` (a multiple of 4 bytes) as native-order 32-bit words: with AVX2
/// where the CPU has it (this loop is most of the time of a checksum check).
fn sum_words(data: &[u8]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { sum_words_avx2(data) };
    }
    sum_words_portable(data)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_words_avx2(data: &[u8]) -> u64 {
    // The same loop, compiled for AVX2 (the compiler vectorizes it).
    sum_words_portable(data)
}

#[inline(always)]
fn sum_words_portable(data: &[u8]) -> u64 {
    // A 64-bit accumulator of 32-bit words cannot overflow below 2^32 words.
    data.chunks_exact(4)
        .map(|c| u64::from(u32::from_ne_bytes([c[0], c[1], c[2], c[3]])))
        .sum()
}

/// Folds an unfolded sum to 16 bits (end-around carries); a correct checksum over
/// data that includes its checksum field folds to 0xffff.
pub fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// RFC 1071 as written: big-endian 16-bit words, an odd byte padded with zero.
    fn reference(data: &[u8], mut acc: u32) -> u16 {
        for c in data.chunks(2) {
            acc += u32::from(c[0]) << 8 | u32::from(*c.get(1).unwrap_or(&0));
        }
        while acc >> 16 != 0 {
            acc = (acc & 0xffff) + (acc >> 16);
        }
        acc as u16
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        /// The fast checksum (native order, vectorized) agrees with the plain
        /// big-endian one, at every length and alignment.
        #[test]
        fn checksum_sum_matches_the_reference(
            data in prop::collection::vec(any::<u8>(), 0..3000),
            skip in 0..8usize,
            initial in 0..0xffff_u32,
        ) {
            let d = &data[skip.min(data.len())..];
            prop_assert_eq!(
                fold(sum(d, u64::from(initial))) % 0xffff,
                reference(d, initial) % 0xffff
            );
        }
    }
}
