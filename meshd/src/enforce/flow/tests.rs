use super::*;

const ISN: u32 = 1000;

fn reasm(cap: usize) -> Reassembler {
    Reassembler::new(SeqNumber(ISN + 1), cap)
}

fn at(off: u32) -> SeqNumber {
    SeqNumber(ISN + 1) + off as usize
}

/// Consumes and returns everything contiguous.
fn drain(r: &mut Reassembler) -> Vec<u8> {
    let out = r.contiguous().to_vec();
    r.consume(out.len());
    out
}

#[test]
fn in_order() {
    let mut r = reasm(1024);
    assert_eq!(r.insert(at(0), b"GET ").unwrap().new, 4);
    assert_eq!(r.insert(at(4), b"/ HTTP/1.1").unwrap().new, 10);
    assert_eq!(r.contiguous(), b"GET / HTTP/1.1");
    r.consume(4);
    assert_eq!(r.base(), at(4));
    assert_eq!(r.contiguous(), b"/ HTTP/1.1");
    assert_eq!(drain(&mut r), b"/ HTTP/1.1");
    assert!(r.is_empty());
}

#[test]
fn out_of_order_fills_holes() {
    let mut r = reasm(1024);
    r.insert(at(8), b"89").unwrap();
    r.insert(at(4), b"4567").unwrap();
    assert_eq!(r.contiguous(), b"");
    assert_eq!(r.buffered(), 6);
    r.insert(at(0), b"0123").unwrap();
    assert_eq!(drain(&mut r), b"0123456789");
}

#[test]
fn duplicates_are_recognised() {
    let mut r = reasm(1024);
    r.insert(at(0), b"hello").unwrap();
    let dup = r.insert(at(0), b"hello").unwrap();
    assert_eq!(
        dup,
        Inserted {
            old: 0,
            duplicate: 5,
            new: 0,
            truncated: 0
        }
    );
    let part = r.insert(at(3), b"lo wor").unwrap();
    assert_eq!(
        part,
        Inserted {
            old: 0,
            duplicate: 2,
            new: 4,
            truncated: 0
        }
    );
    r.consume(5);
    // A retransmission of consumed bytes is trimmed to what is new.
    let re = r.insert(at(0), b"hello world").unwrap();
    assert_eq!(
        re,
        Inserted {
            old: 5,
            duplicate: 4,
            new: 2,
            truncated: 0
        }
    );
    assert_eq!(drain(&mut r), b" world");
    let all_old = r.insert(at(0), b"hello").unwrap();
    assert_eq!(all_old.old, 5);
    assert!(r.is_empty());
}

#[test]
fn overlap_with_different_bytes_is_refused_whole() {
    let mut r = reasm(1024);
    r.insert(at(0), b"GET /public").unwrap();
    // Same length, different bytes at offset 5: refused, and its new tail not kept.
    let err = r.insert(at(4), b"/admin HTTP/1.1").unwrap_err();
    assert_eq!(err, InsertError::Conflict { seq: at(5) });
    assert_eq!(r.contiguous(), b"GET /public");
    assert_eq!(r.buffered(), 11);
    // Out-of-order data is protected the same way.
    r.insert(at(20), b"xyz").unwrap();
    assert_eq!(
        r.insert(at(19), b"?xyZ").unwrap_err(),
        InsertError::Conflict { seq: at(22) }
    );
    assert_eq!(r.buffered(), 14);
}

#[test]
fn wrapping_sequence_numbers() {
    let start = SeqNumber(u32::MAX - 3);
    let mut r = Reassembler::new(start, 64);
    r.insert(start + 6, b"ghij").unwrap();
    r.insert(start, b"abcdef").unwrap();
    assert_eq!(drain(&mut r), b"abcdefghij");
    assert_eq!(r.base(), SeqNumber(6));
    // A retransmission from before the wrap is old.
    assert_eq!(r.insert(start + 2, b"cd").unwrap().old, 2);
}

#[test]
fn bounded_window_and_holes() {
    let mut r = reasm(16);
    // Reaching beyond the window: the part that fits is kept.
    let cut = r.insert(at(10), b"0123456789").unwrap();
    assert_eq!((cut.new, cut.truncated), (6, 4));
    assert_eq!(r.insert(at(10), b"012345").unwrap().duplicate, 6);
    assert_eq!(
        r.insert(at(1_000_000), b"x").unwrap_err(),
        InsertError::Full
    );
    assert_eq!(r.insert(at(16), b"x").unwrap_err(), InsertError::Full);
    assert_eq!(r.buffered(), 6);

    let mut r = reasm(1024);
    for i in 0..MAX_RANGES as u32 {
        r.insert(at(10 + i * 2), b"x").unwrap();
    }
    let beyond = 20 + MAX_RANGES as u32 * 2;
    assert_eq!(
        r.insert(at(beyond), b"y").unwrap_err(),
        InsertError::TooManyHoles
    );
    // Filling a hole between two ranges merges them, which is always allowed.
    r.insert(at(11), b"x").unwrap();
    r.insert(at(beyond), b"y").unwrap();
    // A segment covering several ranges merges them all.
    let all = vec![b'x'; 10 + MAX_RANGES * 2];
    r.insert(at(0), &all).unwrap();
    assert_eq!(r.contiguous().len(), all.len());
}

#[test]
fn buffer_is_reused_after_consumption() {
    let mut r = reasm(64);
    for round in 0..100u32 {
        r.insert(at(round * 40), &[round as u8; 40]).unwrap();
        assert_eq!(drain(&mut r), vec![round as u8; 40]);
    }
    assert!(r.memory() <= 128);
}

#[test]
fn compacts_instead_of_growing_past_cap() {
    let mut r = reasm(32);
    r.insert(at(0), &[1; 20]).unwrap();
    r.insert(at(24), &[3; 4]).unwrap();
    r.consume(20);
    // Offset 8..28 from the new base needs room past the old head: compaction.
    r.insert(at(28), &[4; 20]).unwrap();
    r.insert(at(20), &[2; 4]).unwrap();
    let mut want = vec![2; 4];
    want.extend([3; 4]);
    want.extend([4; 20]);
    assert_eq!(drain(&mut r), want);
    assert!(r.memory() <= 64);
}

#[test]
fn fin_in_the_middle() {
    let mut r = reasm(1024);
    r.insert(at(0), b"abc").unwrap();
    r.set_fin(at(6)).unwrap();
    assert!(!r.fin_in_order());
    // Data after the FIN is refused; a second FIN elsewhere too.
    assert_eq!(r.insert(at(5), b"xy").unwrap_err(), InsertError::AfterFin);
    assert_eq!(r.set_fin(at(8)).unwrap_err(), InsertError::FinConflict);
    r.set_fin(at(6)).unwrap();
    r.insert(at(3), b"def").unwrap();
    assert!(r.fin_in_order());
    assert_eq!(drain(&mut r), b"abcdef");
    assert!(r.fin_in_order());
    // A FIN before data already received is refused.
    let mut r = reasm(1024);
    r.insert(at(4), b"zz").unwrap();
    assert_eq!(r.set_fin(at(5)).unwrap_err(), InsertError::FinConflict);
}

#[test]
fn skip_takes_bytes_straight_from_segments() {
    let mut r = reasm(1024);
    assert!(r.skip(100));
    assert_eq!(r.base(), at(100));
    r.insert(at(110), b"later").unwrap();
    assert!(r.skip(10));
    assert_eq!(r.contiguous(), b"later");
    assert!(!r.skip(1), "cannot skip buffered bytes");
}

#[test]
fn forget_drops_buffered_copies_and_keeps_what_follows() {
    let mut r = reasm(1024);
    r.insert(at(10), b"0123456789").unwrap();
    r.insert(at(30), b"abc").unwrap();
    r.forget(15);
    assert_eq!(r.base(), at(15));
    assert_eq!(r.buffered(), 5 + 3);
    r.forget(5);
    assert_eq!(r.contiguous(), b"", "a hole before abc");
    assert_eq!(r.buffered(), 3);
    r.forget(10);
    assert_eq!(r.contiguous(), b"abc");
    // Never past the FIN.
    r.set_fin(at(40)).unwrap();
    r.forget(100);
    assert_eq!(r.base(), at(40));
    assert!(r.fin_in_order());
}

fn seg(seq: u32, ack: u32, flags: Flags, payload: &[u8]) -> Segment<'_> {
    Segment {
        seq: SeqNumber(seq),
        ack: SeqNumber(ack),
        flags,
        window: 65535,
        timestamps: None,
        payload,
    }
}

const C2S: Direction = Direction::ClientToServer;
const S2C: Direction = Direction::ServerToClient;

fn established(now: Timestamp) -> TcpFlow {
    let mut f = TcpFlow::new(now);
    assert_eq!(
        f.on_segment(C2S, &seg(ISN, 0, Flags::SYN, b""), now),
        Track::Handshake
    );
    assert_eq!(
        f.on_segment(S2C, &seg(5000, ISN + 1, Flags::SYN | Flags::ACK, b""), now),
        Track::Handshake
    );
    assert_eq!(f.state(), TcpState::Established);
    f
}

#[test]
fn handshake_sets_both_sides() {
    let t0 = Timestamp::from_millis(0);
    let mut f = established(t0);
    assert_eq!(f.client_stream_start(), Some(SeqNumber(ISN + 1)));
    assert_eq!(f.server.isn, Some(SeqNumber(5000)));
    assert_eq!(f.server.sent_end, Some(SeqNumber(5001)));
    let t1 = Timestamp::from_millis(10);
    assert_eq!(
        f.on_segment(C2S, &seg(ISN + 1, 5001, Flags::ACK, b"GET"), t1),
        Track::Data
    );
    assert_eq!(f.client.sent_end, Some(SeqNumber(ISN + 4)));
    assert_eq!(f.client.acked, Some(SeqNumber(5001)));
    assert_eq!(
        f.on_segment(S2C, &seg(5001, ISN + 4, Flags::ACK, b"HTTP/1.1 200"), t1),
        Track::Data
    );
    assert_eq!(f.server.sent_end, Some(SeqNumber(5013)));
    assert_eq!(f.server.acked, Some(SeqNumber(ISN + 4)));
    assert!(!f.is_idle(Timestamp::from_millis(1000), Duration::from_secs(5)));
    assert!(f.is_idle(Timestamp::from_millis(5010), Duration::from_secs(5)));
}

#[test]
fn no_handshake_no_data() {
    let now = Timestamp::default();
    let mut f = TcpFlow::new(now);
    assert_eq!(
        f.on_segment(C2S, &seg(ISN, 0, Flags::ACK, b"GET / HTTP/1.1\r\n"), now),
        Track::Invalid(InvalidSegment::NoHandshake)
    );
    f.on_segment(C2S, &seg(ISN, 0, Flags::SYN, b""), now);
    // Data before the SYN-ACK.
    assert_eq!(
        f.on_segment(C2S, &seg(ISN + 1, 0, Flags::ACK, b"x"), now),
        Track::Invalid(InvalidSegment::NoHandshake)
    );
    // A SYN-ACK for another ISN.
    assert_eq!(
        f.on_segment(S2C, &seg(5000, 77, Flags::SYN | Flags::ACK, b""), now),
        Track::Invalid(InvalidSegment::SynAckMismatch)
    );
}

#[test]
fn syn_with_new_isn_after_establishment_is_refused() {
    let now = Timestamp::default();
    let mut f = established(now);
    assert_eq!(
        f.on_segment(C2S, &seg(ISN, 0, Flags::SYN, b""), now),
        Track::Handshake,
        "retransmitted SYN"
    );
    assert_eq!(
        f.on_segment(C2S, &seg(ISN + 99, 0, Flags::SYN, b""), now),
        Track::Invalid(InvalidSegment::SynMismatch)
    );
}

#[test]
fn rst_closes_the_flow() {
    let now = Timestamp::default();
    let mut f = established(now);
    assert_eq!(
        f.on_segment(C2S, &seg(ISN + 1, 0, Flags::RST, b""), now),
        Track::Reset
    );
    assert_eq!(f.state(), TcpState::Closed);
    assert_eq!(
        f.on_segment(C2S, &seg(ISN + 1, 5001, Flags::ACK, b"x"), now),
        Track::Invalid(InvalidSegment::Closed)
    );
}

#[test]
fn fins_from_both_sides_close() {
    let now = Timestamp::default();
    let mut f = established(now);
    f.on_segment(
        C2S,
        &seg(ISN + 1, 5001, Flags::ACK | Flags::FIN, b"ab"),
        now,
    );
    assert_eq!(f.client.fin, Some(SeqNumber(ISN + 3)));
    assert_eq!(f.state(), TcpState::Established);
    f.on_segment(S2C, &seg(5001, ISN + 4, Flags::ACK | Flags::FIN, b""), now);
    assert_eq!(f.state(), TcpState::Closing);
    // The client's last ACK still belongs to the flow.
    assert_eq!(
        f.on_segment(C2S, &seg(ISN + 4, 5002, Flags::ACK, b""), now),
        Track::Data
    );
    assert_eq!(f.server.acked, Some(SeqNumber(ISN + 4)));
    assert_eq!(f.client.acked, Some(SeqNumber(5002)));
}

#[test]
fn bytes_at_the_front_evict_the_farthest_range() {
    let mut r = reasm(1024);
    for i in 0..MAX_RANGES as u32 {
        r.insert(at(10 + i * 2), b"x").unwrap();
    }
    let beyond = 20 + MAX_RANGES as u32 * 2;
    let farthest = 10 + (MAX_RANGES as u32 - 1) * 2;
    // Beyond every range: refused.
    assert_eq!(
        r.insert(at(beyond), b"y").unwrap_err(),
        InsertError::TooManyHoles
    );
    // In-order bytes are always taken: the farthest range goes.
    r.insert(at(0), b"abc").unwrap();
    assert_eq!(r.contiguous(), b"abc");
    assert_eq!(r.buffered(), 3 + MAX_RANGES - 1);
    // Once there is room, the forgotten byte may come again, even with other contents.
    r.consume(3);
    assert_eq!(r.insert(at(farthest), b"y").unwrap().new, 1);
}

#[test]
fn timestamps_option_is_found_among_others() {
    let ts = Timestamps {
        val: 0x0102_0304,
        ecr: 0xfffe_fdfc,
    };
    // As Linux sends it on data: NOP NOP TS.
    assert_eq!(Timestamps::parse(&ts.emit()), Some(ts));
    // As on a SYN: MSS, SACK-permitted, TS, NOP, window scale.
    let mut syn = vec![2, 4, 0x05, 0xb4, 4, 2];
    syn.extend_from_slice(&ts.emit()[2..]);
    syn.extend_from_slice(&[1, 3, 3, 7]);
    assert_eq!(Timestamps::parse(&syn), Some(ts));
    // After SACK blocks.
    let mut sack = vec![1, 1, 5, 10, 0, 0, 0, 1, 0, 0, 0, 2];
    sack.extend_from_slice(&ts.emit());
    assert_eq!(Timestamps::parse(&sack), Some(ts));
}

#[test]
fn timestamps_absent_or_malformed_is_none() {
    let ts = Timestamps { val: 1, ecr: 2 }.emit();
    for options in [
        &[][..],
        &[1, 1, 1, 1],
        // End of list before it.
        &[0, 0, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2],
        // A length of 0 or 1 would loop or overlap the kind.
        &[3, 0, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2],
        &[3, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2],
        // A length past the end.
        &[2, 40],
        // Truncated, or with a wrong length.
        &ts[..11],
        &[8, 8, 0, 0, 0, 1, 0, 0],
    ] {
        assert_eq!(Timestamps::parse(options), None, "{options:?}");
    }
}

#[test]
fn a_drained_burst_gives_its_memory_back() {
    let mut r = reasm(1 << 20);
    // A hole at the front, then most of a megabyte behind it in many ranges.
    for i in 0..40u32 {
        r.insert(at(1000 + i * 20_000), &[7; 10_000]).unwrap();
    }
    assert!(r.memory() > 512 * 1024, "{}", r.memory());
    // The hole fills; the rest arrives; everything is consumed.
    let mut off = 0u32;
    while off < 1000 + 40 * 20_000 {
        let _ = r.insert(at(off), &[7; 1000]);
        off += 1000;
        let n = r.contiguous().len();
        r.consume(n);
    }
    assert!(r.is_empty());
    assert!(r.memory() <= super::reassembler::RETAINED, "{}", r.memory());
}
