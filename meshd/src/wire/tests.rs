use super::*;

#[test]
fn ipv4_view() {
    let p = build::udp(
        "100.64.0.1".parse().unwrap(),
        "100.64.0.2".parse().unwrap(),
        b"hi",
    );
    let mut padded = p.clone();
    padded.extend_from_slice(&[0; 6]);
    let v = IpPacket::new_checked(&padded[..]).unwrap();
    assert_eq!(v.version(), 4);
    assert_eq!(v.len(), 30);
    assert_eq!(v.src_addr(), "100.64.0.1".parse::<IpAddr>().unwrap());
    assert_eq!(v.dst_addr(), "100.64.0.2".parse::<IpAddr>().unwrap());
    assert_eq!(v.protocol(), 17);
    assert_eq!(v.as_bytes(), &p[..]);
}

#[test]
fn ipv6_view() {
    let s: IpAddr = "fd00:6d65:7368::1".parse().unwrap();
    let d: IpAddr = "fd00:6d65:7368::2".parse().unwrap();
    let p = build::udp(s, d, b"hello");
    let v = IpPacket::new_checked(&p[..]).unwrap();
    assert_eq!(
        (v.version(), v.len(), v.src_addr(), v.dst_addr()),
        (6, 53, s, d)
    );
}

#[test]
fn rejects_bad_lengths_and_versions() {
    let p = build::udp(
        "100.64.0.1".parse().unwrap(),
        "100.64.0.2".parse().unwrap(),
        b"hi",
    );
    let cases: Vec<(Vec<u8>, WireError)> = vec![
        (vec![], WireError::Truncated),
        (p[..19].to_vec(), WireError::Truncated),
        (
            {
                let mut q = p.clone();
                q[0] = 0x44;
                q
            },
            WireError::BadHeaderLen,
        ),
        (
            {
                let mut q = p.clone();
                q[0] = 0x4f;
                q
            },
            WireError::BadHeaderLen,
        ),
        (
            {
                let mut q = p.clone();
                q[3] = 200;
                q
            },
            WireError::BadTotalLen,
        ),
        (
            {
                let mut q = p.clone();
                q[3] = 10;
                q
            },
            WireError::BadTotalLen,
        ),
        (
            {
                let mut q = p.clone();
                q[0] = 0x55;
                q
            },
            WireError::BadVersion(5),
        ),
        (vec![0x60; 39], WireError::Truncated),
        (
            {
                let mut q = vec![0u8; 40];
                q[0] = 0x60;
                q[5] = 1;
                q
            },
            WireError::BadTotalLen,
        ),
    ];
    for (bytes, want) in cases {
        assert_eq!(
            IpPacket::new_checked(&bytes[..]).map(|_| ()),
            Err(want),
            "{bytes:?}"
        );
    }
}

/// An IPv6 packet from fd00::1 to fd00::2 whose chain is `chain` (each header as
/// (its own type, its bytes)), then `l4` of protocol `proto`.
fn v6_chain(chain: &[(u8, Vec<u8>)], proto: u8, l4: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    for (i, (_, bytes)) in chain.iter().enumerate() {
        let mut h = bytes.clone();
        h[0] = chain.get(i + 1).map_or(proto, |(t, _)| *t);
        body.extend_from_slice(&h);
    }
    body.extend_from_slice(l4);
    let first = chain.first().map_or(proto, |(t, _)| *t);
    let mut p = vec![
        0x60,
        0,
        0,
        0,
        (body.len() >> 8) as u8,
        body.len() as u8,
        first,
        64,
    ];
    p.extend_from_slice(&"fd00::1".parse::<Ipv6Addr>().unwrap().octets());
    p.extend_from_slice(&"fd00::2".parse::<Ipv6Addr>().unwrap().octets());
    p.extend_from_slice(&body);
    p
}

fn tcp_header(flags: u8, options: &[u8]) -> Vec<u8> {
    let len = 20 + options.len();
    let mut t = vec![0x30, 0x39, 0, 80, 0, 0, 0, 7, 0, 0, 0, 9];
    t.extend_from_slice(&[((len / 4) << 4) as u8, flags, 0xff, 0xfe, 0, 0, 0, 0]);
    t.extend_from_slice(options);
    t
}

fn walk(p: &[u8]) -> Result<(u8, usize, bool), WireError> {
    let ip = IpPacket::new_checked(p)?;
    ip.payload().map(|x| (x.protocol, x.offset, x.fragment))
}

const HOP: u8 = 0;
const DEST: u8 = 60;
const FRAG: u8 = 44;
const AUTH: u8 = 51;

fn frag(offset: u16, more: bool) -> Vec<u8> {
    let w = (offset << 3) | u16::from(more);
    vec![0, 0, (w >> 8) as u8, w as u8, 0, 0, 0, 1]
}

#[test]
fn ipv6_extension_chain_is_walked_to_the_transport() {
    let t = tcp_header(0x02, &[]);
    let opts = |n: u8| {
        let mut h = vec![0u8; (usize::from(n) + 1) * 8];
        h[1] = n;
        h
    };
    let auth = {
        let mut h = vec![0u8; 16];
        h[1] = 2; // (2 + 2) * 4 bytes
        h
    };
    let p = v6_chain(
        &[(HOP, opts(0)), (DEST, opts(1)), (AUTH, auth)],
        PROTO_TCP,
        &t,
    );
    assert_eq!(walk(&p), Ok((PROTO_TCP, 40 + 8 + 16 + 16, false)));
    // An atomic fragment (offset 0, no more fragments) is a whole packet.
    let p = v6_chain(&[(FRAG, frag(0, false))], PROTO_UDP, &[0; 8]);
    assert_eq!(walk(&p), Ok((PROTO_UDP, 48, false)));
    // A protocol that is not an extension header ends the walk (59: no next header).
    let p = v6_chain(&[(DEST, opts(0))], 59, &[]);
    assert_eq!(walk(&p), Ok((59, 48, false)));
}

#[test]
fn ipv6_fragments_are_seen_at_any_offset() {
    for (offset, more) in [(0, true), (1, true), (4, false), (8, false), (12, false)] {
        let p = v6_chain(&[(FRAG, frag(offset, more))], PROTO_TCP, &[0; 20]);
        assert_eq!(walk(&p), Ok((PROTO_TCP, 48, true)), "offset {offset}");
    }
}

#[test]
fn malformed_extension_chains_are_refused() {
    let mut short_opts = vec![0u8; 8];
    short_opts[1] = 4; // claims 40 bytes
    let cases = [
        // Hop-by-hop only first (RFC 8200 §4.1).
        v6_chain(
            &[(DEST, vec![0; 8]), (HOP, vec![0; 8])],
            PROTO_TCP,
            &[0; 20],
        ),
        v6_chain(&[(DEST, short_opts)], PROTO_TCP, &[]),
        v6_chain(&[(FRAG, vec![0; 4])], PROTO_TCP, &[]),
        // An authentication header of length 0, and one longer than the packet.
        v6_chain(&[(AUTH, vec![0; 12])], PROTO_TCP, &[0; 20]),
        v6_chain(
            &[(AUTH, vec![0, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])],
            PROTO_TCP,
            &[],
        ),
    ];
    for p in cases {
        assert_eq!(walk(&p), Err(WireError::BadExtension), "{p:?}");
    }
}

#[test]
fn ipv4_fragments_and_authentication_header() {
    let base = build::udp(
        "100.64.0.1".parse().unwrap(),
        "100.64.0.2".parse().unwrap(),
        b"hi",
    );
    assert_eq!(walk(&base), Ok((PROTO_UDP, 20, false)));
    for (b6, b7) in [(0x20, 0), (0, 1), (0x1f, 0xff), (0x40 | 0x20, 0)] {
        let mut p = base.clone();
        (p[6], p[7]) = (b6, b7);
        assert_eq!(walk(&p), Ok((PROTO_UDP, 20, true)), "{b6:#x} {b7:#x}");
    }
    // Don't-fragment alone is no fragment.
    let mut p = base.clone();
    p[6] = 0x40;
    assert_eq!(walk(&p), Ok((PROTO_UDP, 20, false)));
    // AH between the IPv4 header and UDP.
    let mut p = base[..20].to_vec();
    p[9] = AUTH;
    p.extend_from_slice(&[PROTO_UDP, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    p.extend_from_slice(&base[20..]);
    p[3] = p.len() as u8;
    assert_eq!(walk(&p), Ok((PROTO_UDP, 32, false)));
    p[21] = 0;
    assert_eq!(walk(&p), Err(WireError::BadExtension));
}

#[test]
fn tcp_view_reads_header_and_options() {
    // MSS, NOP, window scale 7, then EOL padding.
    let mut seg = tcp_header(0x12, &[2, 4, 5, 0xb4, 1, 3, 3, 7]);
    seg.extend_from_slice(b"data");
    let t = TcpPacket::new_checked(&seg).unwrap();
    assert_eq!((t.src_port(), t.dst_port()), (12345, 80));
    assert_eq!((t.seq_number(), t.ack_number()), (7, 9));
    assert_eq!(t.flags(), TcpFlags::SYN | TcpFlags::ACK);
    assert!(t.flags().syn() && t.flags().ack() && !t.flags().rst());
    assert_eq!((t.window(), t.header_len()), (0xfffe, 28));
    assert_eq!(t.window_scale(), Some(7));
    assert_eq!(t.payload(), b"data");
    assert_eq!(
        TcpPacket::new_checked(&seg[..19]).map(|_| ()),
        Err(WireError::Truncated)
    );
    let mut bad = seg.clone();
    bad[12] = 0x40; // 16 bytes
    assert_eq!(
        TcpPacket::new_checked(&bad).map(|_| ()),
        Err(WireError::BadHeaderLen)
    );
    bad[12] = 0xf0; // 60 bytes, past the segment
    assert_eq!(
        TcpPacket::new_checked(&bad).map(|_| ()),
        Err(WireError::BadHeaderLen)
    );
}

#[test]
fn quoted_flow_of_an_icmp_error() {
    let inner = build::udp(
        "100.64.0.1".parse().unwrap(),
        "100.64.0.2".parse().unwrap(),
        b"longer than the quote",
    );
    let (key, seq) = quoted_flow(&inner[..28]).unwrap();
    assert_eq!(
        (key.proto, key.src_port, key.dst_port, seq),
        (PROTO_UDP, 12345, 12345, None)
    );
    assert_eq!(key.src, "100.64.0.1".parse::<IpAddr>().unwrap());
    assert!(quoted_flow(&inner[..23]).is_none());
}

/// The walk agrees with etherparse (the parser it replaced) on what is a packet
/// and where its transport starts, except where etherparse is wrong: it reads the
/// IPv6 fragment header's M flag from the wrong bit, and takes a payload length
/// of 0 as "the rest of the buffer" (a jumbogram without its option).
#[test]
fn agrees_with_etherparse() {
    use proptest::prelude::*;
    let header = prop_oneof![
        Just((HOP, 8usize)),
        Just((DEST, 16)),
        Just((43u8, 8)),
        Just((FRAG, 8)),
        Just((AUTH, 12)),
    ];
    let chain = proptest::collection::vec((header, any::<u8>()), 0..4);
    let l4 = proptest::collection::vec(any::<u8>(), 0..40);
    proptest!(|(chain in chain, l4 in l4, proto in prop_oneof![Just(6u8), Just(17), Just(58)], cut in 0usize..8)| {
        let chain: Vec<(u8, Vec<u8>)> = chain
            .into_iter()
            .map(|((t, len), fill)| {
                let mut h = vec![fill; len];
                match t {
                    AUTH => h[1] = (len / 4 - 2) as u8,
                    FRAG => { h[2] = 0; h[3] = 0; }
                    _ => h[1] = (len / 8 - 1) as u8,
                }
                (t, h)
            })
            .collect();
        let mut p = v6_chain(&chain, proto, &l4);
        // Cut the chain short (a truncated extension header) by lowering the length.
        let pl = (p.len() - 40).saturating_sub(cut * 3);
        prop_assume!(pl > 0);
        p.truncate(40 + pl);
        (p[4], p[5]) = ((pl >> 8) as u8, pl as u8);
        let ours = walk(&p);
        let theirs = etherparse::IpSlice::from_slice(&p);
        match (ours, theirs) {
            (Ok((proto, offset, _)), Ok(ip)) => {
                prop_assert_eq!(proto, ip.payload_ip_number().0);
                prop_assert_eq!(offset, p.len() - ip.payload().payload.len());
            }
            (Err(_), Err(_)) => {}
            (ours, theirs) => prop_assert!(false, "{:?} vs {:?}", ours, theirs.map(|_| ())),
        }
    });
}

#[test]
fn never_panics_on_arbitrary_bytes() {
    use proptest::prelude::*;
    proptest!(|(bytes in proptest::collection::vec(any::<u8>(), 0..80))| {
        if let Ok(v) = IpPacket::new_checked(&bytes[..]) {
            let _ = (v.src_addr(), v.dst_addr(), v.protocol(), v.as_bytes().len());
            if let Ok(p) = v.payload() {
                if let Ok(t) = TcpPacket::new_checked(p.data) {
                    let _ = (t.flags(), t.window_scale(), t.payload().len(), t.options());
                }
                if let Ok(i) = IcmpPacket::new_checked(p.data) {
                    let _ = (i.msg_type(), i.echo_ident(), quoted_flow(i.data()));
                }
            }
        }
    });
}
