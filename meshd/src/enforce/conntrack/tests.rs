use super::*;

fn key(sport: u16, dport: u16) -> FlowKey {
    FlowKey {
        proto: PROTO_TCP,
        src: "100.64.0.1".parse().unwrap(),
        dst: "100.64.0.2".parse().unwrap(),
        src_port: sport,
        dst_port: dport,
    }
}

fn tcp(syn: bool, ack: bool, fin: bool, rst: bool, seq: u32, len: u32) -> Observation {
    Observation {
        tcp: Some(TcpSegmentInfo {
            flags: flags_of(syn, ack, fin, rst),
            seq,
            ack: 0,
            payload_len: len,
            ..TcpSegmentInfo::default()
        }),
    }
}

const NONE: Observation = Observation { tcp: None };

fn flags_of(syn: bool, ack: bool, fin: bool, rst: bool) -> TcpFlags {
    [
        (syn, TcpFlags::SYN),
        (ack, TcpFlags::ACK),
        (fin, TcpFlags::FIN),
        (rst, TcpFlags::RST),
    ]
    .into_iter()
    .filter(|(on, _)| *on)
    .fold(TcpFlags::default(), |all, (_, f)| all | f)
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

#[test]
fn both_directions_hash_alike_and_clones_agree() {
    let h = FlowHasher::default();
    let k = key(40000, 80);
    assert_eq!(h.hash(&k), h.hash(&k.reversed()));
    assert_eq!(h.clone().hash(&k), h.hash(&k));
    assert_ne!(h.hash(&k), h.hash(&key(40001, 80)));
    // A table given the shared hasher finds what the hashed calls stored.
    let mut ct = ConnTrack::with_hasher(8, Timeouts::default(), h.clone());
    ct.insert_hashed(h.hash(&k), k, Origin::Local, 1u8, &NONE, secs(0))
        .unwrap();
    assert!(ct.get(&k).is_some());
    let (dir, _, _) = ct.track(&k.reversed(), &NONE, secs(1)).unwrap();
    assert_eq!(dir, Dir::Reply);
    assert!(ct.remove_hashed(h.hash(&k), &k).is_some());
    assert!(ct.is_empty());
}

/// Two ends that opened the same 5-tuple towards each other: each packet belongs
/// to the flow of its own direction.
#[test]
fn mirror_image_flows_stay_apart() {
    let mut ct = ConnTrack::new(8, Timeouts::default());
    let k = key(7, 7);
    ct.insert(k, Origin::Local, 'l', &NONE, secs(0)).unwrap();
    ct.insert(k.reversed(), Origin::Remote, 'r', &NONE, secs(0))
        .unwrap();
    let (dir, _, f) = ct.track(&k, &NONE, secs(1)).unwrap();
    assert_eq!((dir, f.value), (Dir::Original, 'l'));
    let (dir, _, f) = ct.track(&k.reversed(), &NONE, secs(1)).unwrap();
    assert_eq!((dir, f.value), (Dir::Original, 'r'));
}

#[test]
fn reply_matches_reversed_key() {
    let mut ct = ConnTrack::new(8, Timeouts::default());
    let k = key(40000, 80);
    ct.insert(k, Origin::Remote, "allow", &NONE, secs(0))
        .unwrap();
    let (dir, _, flow) = ct.track(&k.reversed(), &NONE, secs(1)).unwrap();
    assert_eq!(dir, Dir::Reply);
    assert!(flow.replied);
    assert_eq!(flow.value, "allow");
    let (dir, _, _) = ct.track(&k, &NONE, secs(2)).unwrap();
    assert_eq!(dir, Dir::Original);
    // A different source port is a different flow.
    assert!(ct.track(&key(40001, 80), &NONE, secs(2)).is_none());
}

#[test]
fn tracks_next_sequence_per_direction_with_wrap() {
    let mut ct = ConnTrack::new(8, Timeouts::default());
    let k = key(40000, 80);
    let f = ct
        .insert(
            k,
            Origin::Remote,
            (),
            &tcp(true, false, false, false, u32::MAX, 0),
            secs(0),
        )
        .unwrap();
    // SYN occupies one sequence number: wraps to 0.
    assert_eq!(f.next_seq(Dir::Original), Some(0));
    ct.track(&k.reversed(), &tcp(true, true, false, false, 7, 0), secs(0));
    ct.track(&k, &tcp(false, true, false, false, 0, 100), secs(0));
    let (_, _, f) = ct.track(&k, &NONE, secs(0)).unwrap();
    assert_eq!(f.next_seq(Dir::Original), Some(100));
    assert_eq!(f.next_seq(Dir::Reply), Some(8));
}

/// A segment with everything set: flags from "SAFR", sequence and acknowledgement
/// numbers, payload length, window.
fn seg(flags: &str, seq: u32, ack: u32, len: u32, window: u16) -> Observation {
    Observation {
        tcp: Some(TcpSegmentInfo {
            flags: flags_of(
                flags.contains('S'),
                flags.contains('A'),
                flags.contains('F'),
                flags.contains('R'),
            ),
            seq,
            ack,
            payload_len: len,
            window,
            wscale: None,
        }),
    }
}

/// A client (1000) and a server (5000) after their handshake, the client's 100
/// bytes acknowledged.
fn established() -> (ConnTrack<()>, FlowKey) {
    let mut ct = ConnTrack::new(8, Timeouts::default());
    let k = key(40000, 80);
    ct.insert(k, Origin::Remote, (), &seg("S", 1000, 0, 0, 1000), secs(0))
        .unwrap();
    ct.track(&k.reversed(), &seg("SA", 5000, 1001, 0, 1000), secs(0));
    ct.track(&k, &seg("A", 1001, 5001, 100, 1000), secs(0));
    ct.track(&k.reversed(), &seg("A", 5001, 1101, 0, 1000), secs(0));
    (ct, k)
}

/// Regression (issue 18.3): the reset of a cut flow took the sequence number after
/// the last segment, one too low when that was a keepalive probe (next−1).
#[test]
fn next_sequence_is_the_highest_sent_whatever_the_last_segment() {
    let (mut ct, k) = established();
    let (_, seen, f) = ct
        .track(&k, &seg("A", 1100, 5001, 0, 1000), secs(1))
        .unwrap();
    assert_eq!(seen, Seen::Taken);
    assert_eq!(f.next_seq(Dir::Original), Some(1101));
    assert_eq!(f.acked(Dir::Original), Some(1101));
    assert_eq!(f.next_seq(Dir::Reply), Some(5001));
}

/// RFC 5961 §3.2 from the middle: exact (between what the receiver acknowledged
/// and what the sender sent), in the window, or outside.
#[test]
fn resets_are_taken_only_at_the_expected_number() {
    for (seq, want) in [
        (1101, Seen::Reset),
        (1500, Seen::RstInWindow),
        (1101 + 1000 + 10, Seen::OutOfWindow),
        (900, Seen::OutOfWindow),
        (1101u32.wrapping_add(1 << 31), Seen::OutOfWindow),
    ] {
        let (mut ct, k) = established();
        let (_, seen, f) = ct.track(&k, &seg("R", seq, 0, 0, 0), secs(1)).unwrap();
        assert_eq!(seen, want, "RST at {seq}");
        assert_eq!(f.is_closing(), want == Seen::Reset, "RST at {seq}");
    }
    // Data sent and not yet acknowledged: the receiver may expect any number up
    // to the sender's next.
    let (mut ct, k) = established();
    ct.track(&k, &seg("A", 1101, 5001, 50, 1000), secs(1));
    let (_, seen, _) = ct.track(&k, &seg("R", 1151, 0, 0, 0), secs(1)).unwrap();
    assert_eq!(seen, Seen::Reset);
}

/// Regression (netns test flows.rs, soak-like loop): a server that closed answers
/// a request that crossed its FIN with a RST at the FIN's own number, which the
/// client has acknowledged; Linux takes it (`tcp_reset_check`), the tracker did
/// not, and the client sat in LAST-ACK.
#[test]
fn a_reset_at_the_number_of_a_fin_already_acknowledged_is_taken() {
    let (mut ct, k) = established();
    // The server's FIN at 5001, acknowledged by the client, whose request crossed it.
    ct.track(&k.reversed(), &seg("FA", 5001, 1101, 0, 1000), secs(1));
    ct.track(&k, &seg("A", 1101, 5001, 50, 1000), secs(1));
    ct.track(&k, &seg("FA", 1151, 5002, 0, 1000), secs(1));
    let (_, seen, f) = ct
        .track(&k.reversed(), &seg("R", 5001, 0, 0, 0), secs(1))
        .unwrap();
    assert_eq!(seen, Seen::Reset);
    assert!(f.is_closing());
    // One before that is still outside.
    let (mut ct, k) = established();
    ct.track(&k.reversed(), &seg("FA", 5001, 1101, 0, 1000), secs(1));
    ct.track(&k, &seg("A", 1101, 5002, 0, 1000), secs(1));
    let (_, seen, _) = ct
        .track(&k.reversed(), &seg("R", 5000, 0, 0, 0), secs(1))
        .unwrap();
    assert_eq!(seen, Seen::OutOfWindow);
}

/// RFC 9293 §3.10.7.3: in SYN-SENT a RST is taken only if it acknowledges the SYN.
#[test]
fn a_reset_answering_a_syn_must_acknowledge_it() {
    let mut ct = ConnTrack::new(8, Timeouts::default());
    let k = key(40000, 80);
    ct.insert(k, Origin::Local, (), &seg("S", 1000, 0, 0, 1000), secs(0))
        .unwrap();
    for (flags, ack, want) in [
        ("R", 0, Seen::OutOfWindow),
        ("RA", 1000, Seen::OutOfWindow),
        ("RA", 1001, Seen::Reset),
    ] {
        let (_, seen, _) = ct
            .track(&k.reversed(), &seg(flags, 0, ack, 0, 0), secs(1))
            .unwrap();
        assert_eq!(seen, want, "{flags} ack {ack}");
    }
}

/// A FIN far outside the receiver's window is not taken; an acknowledgement of
/// bytes never sent does not move what resets are checked against.
#[test]
fn fins_and_acknowledgements_outside_are_not_taken() {
    let (mut ct, k) = established();
    let far = 1101u32.wrapping_add(1 << 20);
    let (_, seen, f) = ct
        .track(&k, &seg("FA", far, 5001, 0, 1000), secs(1))
        .unwrap();
    assert_eq!(seen, Seen::OutOfWindow);
    assert_eq!(f.next_seq(Dir::Original), Some(1101));
    let (_, seen, _) = ct
        .track(&k, &seg("FA", 1101, 5001, 0, 1000), secs(1))
        .unwrap();
    assert_eq!(seen, Seen::Taken);
    // The server acknowledges far more than the client sent: not taken.
    ct.track(&k.reversed(), &seg("A", 5001, 900_000, 0, 1000), secs(1));
    let (_, _, f) = ct.track(&k, &NONE, secs(1)).unwrap();
    assert_eq!(f.acked(Dir::Original), Some(1101));
}

#[test]
fn idle_flows_expire_by_state() {
    let t = Timeouts::default();
    let mut ct = ConnTrack::new(8, t);
    let k = key(1, 2);
    ct.insert(
        k,
        Origin::Local,
        (),
        &tcp(true, false, false, false, 0, 0),
        secs(0),
    )
    .unwrap();
    // Unreplied: gone after 30 s.
    assert!(ct.track(&k, &NONE, t.unreplied + secs(1)).is_none());
    assert!(ct.is_empty());

    ct.insert(
        k,
        Origin::Local,
        (),
        &tcp(true, false, false, false, 0, 0),
        secs(0),
    )
    .unwrap();
    ct.track(&k.reversed(), &tcp(true, true, false, false, 0, 0), secs(1));
    // Established: still there long after the unreplied timeout.
    assert!(ct.track(&k, &NONE, secs(1000)).is_some());
    // Both FINs: closing timeout applies.
    ct.track(&k, &tcp(false, true, true, false, 1, 0), secs(1000));
    ct.track(
        &k.reversed(),
        &tcp(false, true, true, false, 1, 0),
        secs(1000),
    );
    assert_eq!(ct.sweep(secs(1000) + t.tcp_closing + secs(1)), 1);
}

#[test]
fn full_table_evicts_half_open_before_established() {
    let mut ct = ConnTrack::new(2, Timeouts::default());
    let est = key(1, 80);
    ct.insert(est, Origin::Remote, 'e', &NONE, secs(0)).unwrap();
    ct.track(&est.reversed(), &NONE, secs(0));
    ct.insert(key(2, 80), Origin::Remote, 'h', &NONE, secs(1))
        .unwrap();
    // Full: the half-open flow goes, the established one stays.
    ct.insert(key(3, 80), Origin::Remote, 'n', &NONE, secs(2))
        .unwrap();
    assert_eq!(ct.len(), 2);
    assert_eq!(ct.evicted(), 1);
    assert!(ct.track(&est, &NONE, secs(2)).is_some());
    assert!(ct.track(&key(2, 80), &NONE, secs(2)).is_none());
}

#[test]
fn full_of_established_refuses_new_flow() {
    let mut ct = ConnTrack::new(1, Timeouts::default());
    let est = key(1, 80);
    ct.insert(est, Origin::Remote, (), &NONE, secs(0)).unwrap();
    ct.track(&est.reversed(), &NONE, secs(0));
    let err = ct
        .insert(key(2, 80), Origin::Remote, (), &NONE, secs(1))
        .unwrap_err();
    assert_eq!(err, TableFull { capacity: 1 });
    assert_eq!(ct.len(), 1);
    // Once the established flow has expired, there is room again.
    let later = secs(1) + Timeouts::default().tcp_established + secs(1);
    assert!(ct
        .insert(key(2, 80), Origin::Remote, (), &NONE, later)
        .is_ok());
}

#[test]
fn never_exceeds_capacity_under_flood() {
    let mut ct = ConnTrack::new(64, Timeouts::default());
    let slab = ct.flows.capacity();
    let index = ct.index.capacity();
    for p in 0..10_000u16 {
        let _ = ct.insert(key(p, 80), Origin::Remote, (), &NONE, secs(0));
        assert!(ct.len() <= 64);
        assert_eq!(ct.index.len(), ct.flows.len());
        // Freed slots are reused: the slab never grows. The index may be rebuilt
        // once, one size up, when removals have left it full of tombstones.
        assert_eq!(ct.flows.capacity(), slab);
        assert!(
            ct.index.capacity() <= 2 * index + 16,
            "{}",
            ct.index.capacity()
        );
    }
}

#[test]
fn retain_removes_rejected_flows() {
    let mut ct = ConnTrack::new(8, Timeouts::default());
    ct.insert(key(1, 80), Origin::Remote, 80u16, &NONE, secs(0))
        .unwrap();
    ct.insert(key(1, 22), Origin::Remote, 22u16, &NONE, secs(0))
        .unwrap();
    ct.retain(|_, f| f.value != 22);
    assert_eq!(ct.len(), 1);
    assert!(ct.track(&key(1, 80), &NONE, secs(0)).is_some());
}
