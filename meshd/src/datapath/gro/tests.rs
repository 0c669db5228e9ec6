//! The coalescer against a reference segmenter: every merged packet, split the way
//! the kernel splits a GSO packet, must give back the original packets byte for byte
//! and in per-flow order.

use super::*;

const TCP_ACK: u8 = TcpFlags::ACK.0;

const OFF: usize = VNET_HDR_LEN;
const BIG: usize = OFF + 65_535 + OFF;

/// A test packet buffer: `mem` is the capacity, `len` what it holds.
struct Buf {
    mem: Vec<u8>,
    len: usize,
}

impl AsRef<[u8]> for Buf {
    fn as_ref(&self) -> &[u8] {
        &self.mem[..self.len]
    }
}

impl AsMut<[u8]> for Buf {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.mem[..self.len]
    }
}

impl Resizable for Buf {
    fn capacity(&self) -> usize {
        self.mem.len()
    }
    fn set_len(&mut self, len: usize) {
        assert!(len <= self.mem.len(), "grown past capacity");
        self.len = len;
    }
}

fn bufs(pkts: &[Vec<u8>], capacity: usize) -> Vec<Buf> {
    pkts.iter()
        .map(|p| {
            let mut mem = vec![0xee; capacity.max(OFF + p.len())];
            mem[OFF..OFF + p.len()].copy_from_slice(p);
            Buf {
                mem,
                len: OFF + p.len(),
            }
        })
        .collect()
}

/// Coalesces `pkts`; returns the written buffers (header + packet) and their indices.
fn coalesce_with(pkts: &[Vec<u8>], capacity: usize, udp_gso: bool) -> (Vec<Vec<u8>>, Vec<usize>) {
    let mut b = bufs(pkts, capacity);
    let mut c = Coalescer::new(pkts.len());
    let idx = c.coalesce(&mut b, OFF, udp_gso).to_vec();
    let out = idx
        .iter()
        .map(|&i| b[i].as_ref()[OFF - VNET_HDR_LEN..].to_vec())
        .collect();
    (out, idx)
}

fn coalesce(pkts: &[Vec<u8>]) -> Vec<Vec<u8>> {
    coalesce_with(pkts, BIG, true).0
}

// ---- an independent packet builder -------------------------------------------------

fn csum16(data: &[u8], mut acc: u32) -> u32 {
    for c in data.chunks(2) {
        acc += u32::from(c[0]) << 8 | u32::from(*c.get(1).unwrap_or(&0));
    }
    acc
}

fn fold16(mut acc: u32) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

fn pseudo(v6: bool, ip: &[u8], proto: u8, len: usize) -> u32 {
    let addrs = if v6 { &ip[8..40] } else { &ip[12..20] };
    csum16(addrs, u32::from(proto) + len as u32)
}

/// A TCP or UDP packet, described field by field.
#[derive(Clone)]
struct Pkt {
    v6: bool,
    udp: bool,
    sport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    window: u16,
    options: Vec<u8>,
    payload: Vec<u8>,
    id: u16,
    ttl: u8,
    tos: u8,
    flow_label: u32,
    ip_options: Vec<u8>,
    more_fragments: bool,
    /// Added to the transport checksum (0: correct).
    corrupt: u16,
}

fn tcp(v6: bool, seq: u32, len: usize) -> Pkt {
    Pkt {
        v6,
        udp: false,
        sport: 40_000,
        seq,
        ack: 7,
        flags: TCP_ACK,
        window: 500,
        options: vec![],
        payload: (0..len).map(|i| (i as u32 ^ seq) as u8).collect(),
        id: 100,
        ttl: 64,
        tos: 0,
        flow_label: 0x12345,
        ip_options: vec![],
        more_fragments: false,
        corrupt: 0,
    }
}

fn udp(v6: bool, id: u16, len: usize) -> Pkt {
    Pkt {
        udp: true,
        flags: 0,
        id,
        ..tcp(v6, u32::from(id), len)
    }
}

impl Pkt {
    fn with(mut self, f: impl FnOnce(&mut Pkt)) -> Pkt {
        f(&mut self);
        self
    }

    fn bytes(&self) -> Vec<u8> {
        let mut l4 = vec![];
        let proto = if self.udp { PROTO_UDP } else { PROTO_TCP };
        l4.extend_from_slice(&self.sport.to_be_bytes());
        l4.extend_from_slice(&5201u16.to_be_bytes());
        if self.udp {
            l4.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
            l4.extend_from_slice(&[0, 0]);
        } else {
            let doff = (20 + self.options.len()) / 4;
            l4.extend_from_slice(&self.seq.to_be_bytes());
            l4.extend_from_slice(&self.ack.to_be_bytes());
            l4.push((doff as u8) << 4);
            l4.push(self.flags);
            l4.extend_from_slice(&self.window.to_be_bytes());
            l4.extend_from_slice(&[0, 0, 0, 0]);
            l4.extend_from_slice(&self.options);
        }
        l4.extend_from_slice(&self.payload);
        let mut ip = vec![];
        if self.v6 {
            let tc = u32::from(self.tos);
            let first = 6 << 28 | tc << 20 | self.flow_label;
            ip.extend_from_slice(&first.to_be_bytes());
            ip.extend_from_slice(&(l4.len() as u16).to_be_bytes());
            ip.push(proto);
            ip.push(self.ttl);
            ip.extend_from_slice(&[
                0xfd, 0, 0x6d, 0x65, 0x73, 0x68, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
            ]);
            ip.extend_from_slice(&[
                0xfd, 0, 0x6d, 0x65, 0x73, 0x68, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2,
            ]);
        } else {
            let ihl = (20 + self.ip_options.len()) / 4;
            ip.push(0x40 | ihl as u8);
            ip.push(self.tos);
            ip.extend_from_slice(&((ihl * 4 + l4.len()) as u16).to_be_bytes());
            ip.extend_from_slice(&self.id.to_be_bytes());
            let frag: u16 = if self.more_fragments { 0x2000 } else { 0x4000 };
            ip.extend_from_slice(&frag.to_be_bytes());
            ip.push(self.ttl);
            ip.push(proto);
            ip.extend_from_slice(&[0, 0, 100, 64, 0, 1, 100, 64, 0, 2]);
            ip.extend_from_slice(&self.ip_options);
            let c = !fold16(csum16(&ip, 0));
            ip[10..12].copy_from_slice(&c.to_be_bytes());
        }
        let at = if self.udp { 6 } else { 16 };
        let mut c = !fold16(csum16(&l4, pseudo(self.v6, &ip, proto, l4.len())));
        if self.udp && c == 0 {
            c = 0xffff;
        }
        c = c.wrapping_add(self.corrupt);
        l4[at..at + 2].copy_from_slice(&c.to_be_bytes());
        ip.extend_from_slice(&l4);
        ip
    }
}

// ---- the reference segmenter -------------------------------------------------------

fn le16(b: &[u8], at: usize) -> usize {
    usize::from(u16::from_le_bytes([b[at], b[at + 1]]))
}

/// Splits one written buffer (virtio-net header + packet) the way the kernel's GSO
/// does (`tcp_gso_segment`, `__udp_gso_segment`, `inet_gso_segment`,
/// `ipv6_gso_segment`), checking on the way that the header is one it accepts.
pub(crate) fn resegment(out: &[u8]) -> Vec<Vec<u8>> {
    let (hdr, pkt) = out.split_at(VNET_HDR_LEN);
    if hdr == [0; VNET_HDR_LEN] {
        return vec![pkt.to_vec()];
    }
    let v6 = pkt[0] >> 4 == 6;
    assert_eq!(hdr[0], 1, "NEEDS_CSUM");
    let tcp = match (hdr[1], v6) {
        (1, false) | (4, true) => true,
        (5, _) => false,
        t => panic!("gso_type {t:?}"),
    };
    let (hdr_len, gso, ip_len, csum_off) = (le16(hdr, 2), le16(hdr, 4), le16(hdr, 6), le16(hdr, 8));
    assert_eq!(ip_len, if v6 { 40 } else { 20 }, "csum_start");
    assert_eq!(csum_off, if tcp { 16 } else { 6 }, "csum_offset");
    let l4_hdr = if tcp {
        usize::from(pkt[ip_len + 12] >> 4) * 4
    } else {
        8
    };
    assert_eq!(hdr_len, ip_len + l4_hdr, "hdr_len");
    assert!(
        pkt.len() - hdr_len > gso,
        "a GSO packet holds more than one segment"
    );
    if v6 {
        assert_eq!(usize::from(be16(pkt, 4)), pkt.len() - 40);
    } else {
        assert_eq!(usize::from(be16(pkt, 2)), pkt.len());
        assert_eq!(
            fold16(csum16(&pkt[..20], 0)),
            0xffff,
            "IPv4 header checksum"
        );
    }
    if !tcp {
        assert_eq!(
            usize::from(be16(pkt, ip_len + 4)),
            pkt.len() - ip_len,
            "UDP length"
        );
    }
    let merged_l4 = pkt.len() - ip_len;
    let partial = u32::from(be16(pkt, ip_len + csum_off));
    assert_eq!(
        partial,
        u32::from(fold16(pseudo(v6, pkt, if tcp { 6 } else { 17 }, merged_l4))),
        "the checksum field holds the pseudo-header sum"
    );
    let chunks: Vec<&[u8]> = pkt[hdr_len..].chunks(gso).collect();
    let n = chunks.len();
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, chunk)| {
            let mut s = pkt[..hdr_len].to_vec();
            s.extend_from_slice(chunk);
            let l4_len = s.len() - ip_len;
            if v6 {
                s[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
            } else {
                let id = be16(pkt, 4).wrapping_add(i as u16);
                s[4..6].copy_from_slice(&id.to_be_bytes());
                let total = s.len() as u16;
                s[2..4].copy_from_slice(&total.to_be_bytes());
                s[10..12].fill(0);
                let c = !fold16(csum16(&s[..20], 0));
                s[10..12].copy_from_slice(&c.to_be_bytes());
            }
            let l4 = ip_len;
            if tcp {
                let seq = be32(pkt, l4 + 4).wrapping_add((i * gso) as u32);
                s[l4 + 4..l4 + 8].copy_from_slice(&seq.to_be_bytes());
                if i + 1 < n {
                    s[l4 + 13] &= !(TCP_PSH | 0x01);
                }
            } else {
                s[l4 + 4..l4 + 6].copy_from_slice(&(l4_len as u16).to_be_bytes());
            }
            // CHECKSUM_PARTIAL: the seed is the merged field with the length swapped.
            let seed = partial + u32::from(!(merged_l4 as u16)) + l4_len as u32;
            s[l4 + csum_off..l4 + csum_off + 2].fill(0);
            let mut c = !fold16(csum16(&s[l4..], seed));
            if !tcp && c == 0 {
                c = 0xffff;
            }
            s[l4 + csum_off..l4 + csum_off + 2].copy_from_slice(&c.to_be_bytes());
            s
        })
        .collect()
}

fn resegment_all(outs: &[Vec<u8>]) -> Vec<Vec<u8>> {
    outs.iter().flat_map(|o| resegment(o)).collect()
}

/// Coalesces `pkts` and checks that the written buffers give them back, in order;
/// returns how many segments each written buffer holds.
fn shape(pkts: &[Pkt]) -> Vec<usize> {
    let raw: Vec<Vec<u8>> = pkts.iter().map(Pkt::bytes).collect();
    let out = coalesce(&raw);
    assert_eq!(
        resegment_all(&out),
        raw,
        "resegmented output differs from the input"
    );
    out.iter().map(|o| resegment(o).len()).collect()
}

/// In-order TCP segments of one flow, as bytes (for other modules' tests).
pub(crate) fn bulk(v6: bool, sizes: &[usize]) -> Vec<Vec<u8>> {
    seqs(v6, sizes).iter().map(Pkt::bytes).collect()
}

fn seqs(v6: bool, sizes: &[usize]) -> Vec<Pkt> {
    let mut seq = 1_000;
    let mut id = 100;
    sizes
        .iter()
        .map(|&n| {
            let p = tcp(v6, seq, n).with(|p| p.id = id);
            seq += n as u32;
            id += 1;
            p
        })
        .collect()
}

// ---- merge rules -------------------------------------------------------------------

#[test]
fn merges_in_order_tcp4_segments_with_the_header_the_kernel_wants() {
    let pkts: Vec<Vec<u8>> = seqs(false, &[1000, 1000, 1000])
        .iter()
        .map(Pkt::bytes)
        .collect();
    let out = coalesce(&pkts);
    assert_eq!(out.len(), 1);
    let o = &out[0];
    // flags, gso_type TCPV4, hdr_len 40, gso_size 1000, csum_start 20, csum_offset 16
    assert_eq!(&o[..10], &[1, 1, 40, 0, 0xe8, 3, 20, 0, 16, 0]);
    assert_eq!(o.len(), 10 + 40 + 3000);
    assert_eq!(usize::from(be16(&o[10..], 2)), 3040);
    assert_eq!(resegment(o), pkts);
}

#[test]
fn merges_tcp6_segments() {
    let pkts: Vec<Vec<u8>> = seqs(true, &[1200, 1200, 300])
        .iter()
        .map(Pkt::bytes)
        .collect();
    let out = coalesce(&pkts);
    assert_eq!(out.len(), 1);
    assert_eq!(&out[0][..10], &[1, 4, 60, 0, 0xb0, 4, 40, 0, 16, 0]);
    assert_eq!(usize::from(be16(&out[0][10..], 4)), 20 + 2700);
    assert_eq!(resegment(&out[0]), pkts);
}

#[test]
fn a_single_segment_is_written_with_a_zeroed_header_and_unchanged() {
    let p = seqs(false, &[1000])[0].bytes();
    let out = coalesce(std::slice::from_ref(&p));
    assert_eq!(out[0][..10], [0; 10]);
    assert_eq!(out[0][10..], p[..]);
}

#[test]
fn a_shorter_segment_ends_the_run() {
    assert_eq!(shape(&seqs(false, &[1000, 1000, 500, 1000])), vec![3, 1]);
    assert_eq!(shape(&seqs(true, &[1000, 500, 500])), vec![2, 1]);
}

#[test]
fn a_larger_segment_does_not_join() {
    assert_eq!(shape(&seqs(false, &[500, 1000, 1000])), vec![1, 2]);
}

#[test]
fn psh_may_end_a_run_but_not_sit_in_it() {
    let mut p = seqs(false, &[1000, 1000, 1000, 1000]);
    p[1].flags |= TCP_PSH;
    assert_eq!(shape(&p), vec![2, 2]);
    let out = coalesce(&p.iter().map(Pkt::bytes).collect::<Vec<_>>());
    assert_eq!(
        out[0][10 + 20 + 13],
        TCP_ACK | TCP_PSH,
        "the merged packet carries PSH"
    );
    assert_eq!(out[1][10 + 20 + 13], TCP_ACK);
    // A PSH head stays alone.
    let mut p = seqs(false, &[1000, 1000]);
    p[0].flags |= TCP_PSH;
    assert_eq!(shape(&p), vec![1, 1]);
}

#[test]
fn control_flags_are_never_merged() {
    for flags in [
        0x01 | TCP_ACK,
        0x02 | TCP_ACK,
        0x04 | TCP_ACK,
        0x20 | TCP_ACK,
        0x40 | TCP_ACK,
        0x80 | TCP_ACK,
        0,
    ] {
        let mut p = seqs(false, &[1000, 1000, 1000]);
        p[1].flags = flags;
        assert_eq!(shape(&p), vec![1, 1, 1], "flags {flags:#x}");
    }
}

#[test]
fn equal_options_merge_and_different_ones_do_not() {
    let ts = |v: u8| vec![1, 1, 8, 10, 0, 0, 0, v, 0, 0, 0, 9];
    let mut p = seqs(false, &[1000, 1000, 1000]);
    for q in &mut p {
        q.options = ts(1);
    }
    assert_eq!(shape(&p), vec![3]);
    p[2].options = ts(2);
    assert_eq!(shape(&p), vec![2, 1]);
    // Same bytes, other length (header length differs).
    p[2].options = [ts(1), vec![1, 1, 1, 1]].concat();
    assert_eq!(shape(&p), vec![2, 1]);
}

#[test]
fn a_sequence_gap_or_overlap_ends_the_run() {
    let mut p = seqs(false, &[1000, 1000, 1000]);
    p[2].seq += 1;
    assert_eq!(shape(&p), vec![2, 1]);
    // An overlap: the segments after it continue from the overlapping one.
    let mut p = seqs(true, &[1000, 1000, 1000]);
    p[1].seq -= 1;
    p[2].seq -= 1;
    assert_eq!(shape(&p), vec![1, 2]);
}

#[test]
fn sequence_numbers_wrap() {
    let mut p = seqs(false, &[1000, 1000, 1000]);
    for (i, q) in p.iter_mut().enumerate() {
        q.seq = (u32::MAX - 1500).wrapping_add(i as u32 * 1000);
    }
    assert_eq!(shape(&p), vec![3]);
}

#[test]
fn ipv4_ids_must_be_consecutive() {
    let mut p = seqs(false, &[1000, 1000, 1000]);
    p[2].id += 1;
    assert_eq!(shape(&p), vec![2, 1]);
    for q in &mut p {
        q.id = 7;
    }
    assert_eq!(
        shape(&p),
        vec![1, 1, 1],
        "a fixed ID is not what segmentation rebuilds"
    );
    for (i, q) in p.iter_mut().enumerate() {
        q.id = 0xffff_u16.wrapping_add(i as u16);
    }
    assert_eq!(shape(&p), vec![3], "IDs wrap");
}

#[test]
fn ip_header_differences_end_the_run() {
    // TTL / hop limit, TOS / traffic class, flow label (IPv6 only).
    let cases: [fn(&mut Pkt); 3] = [|p| p.ttl = 63, |p| p.tos = 4, |p| p.flow_label = 1];
    for (n, change) in cases.iter().enumerate() {
        for v6 in [false, true] {
            let mut p = seqs(v6, &[1000, 1000, 1000]);
            change(&mut p[2]);
            let want = if n == 2 && !v6 { vec![3] } else { vec![2, 1] };
            assert_eq!(shape(&p), want, "case {n} v6 {v6}");
        }
    }
}

#[test]
fn ack_and_window_must_match() {
    let mut p = seqs(false, &[1000, 1000, 1000]);
    p[1].ack += 1;
    p[2].ack += 1;
    assert_eq!(shape(&p), vec![1, 2]);
    let mut p = seqs(true, &[1000, 1000, 1000]);
    p[2].window += 1;
    assert_eq!(shape(&p), vec![2, 1]);
}

#[test]
fn ipv4_options_and_fragments_are_not_merged() {
    let mut p = seqs(false, &[1000, 1000, 1000]);
    for q in &mut p {
        q.ip_options = vec![1, 1, 1, 1];
    }
    assert_eq!(shape(&p), vec![1, 1, 1]);
    let mut p = seqs(false, &[1000, 1000, 1000]);
    p[1].more_fragments = true;
    assert_eq!(shape(&p), vec![1, 1, 1]);
}

#[test]
fn merged_length_stays_within_64k() {
    let p = seqs(false, &[1400; 48]);
    let shape = shape(&p);
    // (65535 - 40) / 1400 = 46 segments fit.
    assert_eq!(shape, vec![46, 2]);
    let p = seqs(true, &[1400; 48]);
    // IPv6: 40 + 20 + 46 * 1400 = 64460 fits, a 47th would not.
    assert_eq!(self::shape(&p), vec![46, 2]);
}

#[test]
fn merged_length_stays_within_the_buffer() {
    let raw: Vec<Vec<u8>> = seqs(false, &[1000; 5]).iter().map(Pkt::bytes).collect();
    let (out, _) = coalesce_with(&raw, OFF + 40 + 2500, true);
    assert_eq!(
        out.iter().map(|o| resegment(o).len()).collect::<Vec<_>>(),
        vec![2, 2, 1]
    );
    assert_eq!(resegment_all(&out), raw);
}

#[test]
fn a_corrupt_segment_is_written_alone_for_the_kernel_to_drop() {
    let mut p = seqs(false, &[1000, 1000, 1000]);
    p[1].corrupt = 1;
    assert_eq!(shape(&p), vec![1, 1, 1]);
    let mut p = seqs(true, &[1000, 1000, 1000]);
    p[0].corrupt = 5;
    assert_eq!(shape(&p), vec![1, 2]);
    // A TCP checksum of 0xffff (the other zero) would come back as 0.
    let mut p = seqs(false, &[1000, 1000]);
    let raw: Vec<Vec<u8>> = p.iter_mut().map(|q| q.bytes()).collect();
    let mut odd = raw.clone();
    odd[1][36..38].copy_from_slice(&[0xff, 0xff]);
    let (out, _) = coalesce_with(&odd, BIG, true);
    assert_eq!(out.len(), 2);
}

#[test]
fn flows_interleave_and_keep_their_order() {
    let a = seqs(false, &[1000, 1000, 1000]);
    let b: Vec<Pkt> = seqs(false, &[800, 800, 800])
        .into_iter()
        .map(|p| p.with(|p| p.sport = 40_001))
        .collect();
    let c = seqs(true, &[900, 900]);
    let pkts = [
        a[0].clone(),
        b[0].clone(),
        c[0].clone(),
        a[1].clone(),
        b[1].clone(),
        a[2].clone(),
        c[1].clone(),
        b[2].clone(),
    ];
    let raw: Vec<Vec<u8>> = pkts.iter().map(Pkt::bytes).collect();
    let (out, idx) = coalesce_with(&raw, BIG, true);
    assert_eq!(idx, vec![0, 1, 2]);
    assert_eq!(
        resegment(&out[0]),
        [raw[0].clone(), raw[3].clone(), raw[5].clone()]
    );
    assert_eq!(
        resegment(&out[1]),
        [raw[1].clone(), raw[4].clone(), raw[7].clone()]
    );
    assert_eq!(resegment(&out[2]), [raw[2].clone(), raw[6].clone()]);
}

#[test]
fn a_packet_that_cannot_join_closes_its_flows_run() {
    // A FIN between two segments that would otherwise merge: the later segment must
    // not overtake it.
    let mut p = seqs(false, &[1000, 1000, 1000, 1000]);
    p[1].flags |= 0x01;
    p[1].payload.clear();
    p[2].seq = p[1].seq;
    p[3].seq = p[2].seq + 1000;
    assert_eq!(shape(&p), vec![1, 1, 2]);
}

#[test]
fn ipv6_extension_headers_close_every_run() {
    let a = seqs(true, &[1000, 1000]);
    let mut ext = a[0].bytes();
    ext[6] = 0; // hop-by-hop: the flow is unknown
    let raw = vec![a[0].bytes(), ext.clone(), a[1].bytes()];
    let (out, _) = coalesce_with(&raw, BIG, true);
    assert_eq!(out.len(), 3);
    assert_eq!(out[1][10..], ext[..]);
}

#[test]
fn malformed_packets_pass_unchanged() {
    let good = seqs(false, &[1000, 1000]);
    let garbage: Vec<Vec<u8>> = vec![
        vec![],
        vec![0x45],
        vec![0x45; 19],
        vec![0x45; 24],
        {
            // claims options beyond its end
            let mut p = good[0].bytes();
            p[0] = 0x4f;
            p.truncate(40);
            p
        },
        {
            // TCP data offset past the end
            let mut p = good[0].bytes();
            p[32] = 0xf0;
            p.truncate(50);
            p
        },
        {
            // total length disagrees with the buffer
            let mut p = good[0].bytes();
            p.push(0);
            p
        },
        vec![0x60; 44],
        vec![0x99; 100],
    ];
    for g in &garbage {
        let raw = vec![good[0].bytes(), g.clone(), good[1].bytes()];
        let (out, idx) = coalesce_with(&raw, BIG, true);
        assert!(idx.contains(&1), "{g:?} dropped");
        let at = idx.iter().position(|&i| i == 1).unwrap_or(0);
        assert_eq!(out[at][..10], [0; 10]);
        assert_eq!(out[at][10..], g[..]);
        // The good segments merge around it (it belongs to no flow, or closes none
        // that it is not in) and come back unchanged.
        let mut back = resegment_all(&out);
        let g_at = back.iter().position(|b| b == g).unwrap_or(0);
        back.remove(g_at);
        assert_eq!(back, [raw[0].clone(), raw[2].clone()]);
    }
}

#[test]
fn udp_merges_only_with_udp_gso() {
    for v6 in [false, true] {
        let p: Vec<Vec<u8>> = (0..4)
            .map(|i| udp(v6, 10 + i, if i == 3 { 200 } else { 1200 }).bytes())
            .collect();
        let (out, _) = coalesce_with(&p, BIG, true);
        assert_eq!(out.len(), 1);
        let ip = if v6 { 40 } else { 20 };
        assert_eq!(&out[0][..10], &[1, 5, ip + 8, 0, 0xb0, 4, ip, 0, 6, 0]);
        assert_eq!(resegment(&out[0]), p);
        let (out, _) = coalesce_with(&p, BIG, false);
        assert_eq!(
            out,
            p.iter()
                .map(|q| [&[0; 10][..], q].concat())
                .collect::<Vec<_>>()
        );
    }
}

#[test]
fn udp_refusals() {
    // Larger after smaller, non-consecutive IDs, a missing checksum.
    let sizes = [(10, 500), (11, 1000)];
    let p: Vec<Vec<u8>> = sizes
        .iter()
        .map(|&(id, n)| udp(false, id, n).bytes())
        .collect();
    assert_eq!(coalesce(&p).len(), 2);
    let p: Vec<Vec<u8>> = [10, 12]
        .iter()
        .map(|&id| udp(false, id, 500).bytes())
        .collect();
    assert_eq!(coalesce(&p).len(), 2);
    let mut p: Vec<Vec<u8>> = [10, 11]
        .iter()
        .map(|&id| udp(false, id, 500).bytes())
        .collect();
    p[1][26..28].fill(0);
    assert_eq!(coalesce(&p).len(), 2);
}

#[test]
fn state_is_allocated_once() {
    let raw: Vec<Vec<u8>> = seqs(false, &[1000; 32]).iter().map(Pkt::bytes).collect();
    let mut c = Coalescer::new(32);
    let caps = |c: &Coalescer| (c.runs.capacity(), c.slots.capacity(), c.out.capacity());
    let before = caps(&c);
    for round in 0..100 {
        let mut b = bufs(&raw, BIG);
        // Every packet its own flow half the time: the most runs a batch can have.
        if round % 2 == 1 {
            for (i, x) in b.iter_mut().enumerate() {
                x.mem[OFF + 20] = i as u8;
            }
        }
        let n = c.coalesce(&mut b, OFF, true).len();
        assert_eq!(n, if round % 2 == 1 { 32 } else { 1 });
    }
    assert_eq!(caps(&c), before);
}

#[test]
fn a_larger_offset_keeps_the_header_just_before_the_packet() {
    let raw: Vec<Vec<u8>> = seqs(false, &[1000, 1000]).iter().map(Pkt::bytes).collect();
    let mut b: Vec<Buf> = raw
        .iter()
        .map(|p| {
            let mut mem = vec![0xee; BIG + 6];
            mem[16..16 + p.len()].copy_from_slice(p);
            Buf {
                mem,
                len: 16 + p.len(),
            }
        })
        .collect();
    let idx = Coalescer::new(2).coalesce(&mut b, 16, false).to_vec();
    assert_eq!(idx, vec![0]);
    assert_eq!(&b[0].mem[..6], &[0xee; 6]);
    assert_eq!(resegment(&b[0].as_ref()[6..]), raw);
}

// ---- random batches ----------------------------------------------------------------

mod random {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    /// One packet of a random batch: which flow, what happens to it.
    #[derive(Debug, Clone)]
    struct Step {
        flow: usize,
        /// Selects the size: mostly the flow's full size.
        size: u8,
        /// Selects a deviation: mostly none.
        tweak: u8,
        short: u16,
    }

    fn step() -> impl Strategy<Value = Step> {
        (0..5usize, any::<u8>(), any::<u8>(), 1..1500u16).prop_map(|(flow, size, tweak, short)| {
            Step {
                flow,
                size,
                tweak,
                short,
            }
        })
    }

    /// Builds the packets of a batch from `steps`: five flows (IPv4/IPv6, TCP with and
    /// without options, UDP), in-order by default, with random deviations.
    fn build(steps: &[Step], seq0: u32, id0: u16) -> Vec<Vec<u8>> {
        let mut next_seq = [seq0; 5];
        let mut next_id = [id0; 5];
        let mut out = vec![];
        for (n, s) in steps.iter().enumerate() {
            let v6 = s.flow % 2 == 1;
            let is_udp = s.flow == 4;
            let full = 1000 + 100 * s.flow;
            let len = match s.size {
                0..=200 => full,
                201..=230 => usize::from(s.short).min(full),
                231..=250 => usize::from(s.short),
                _ => 0,
            };
            let mut p = if is_udp {
                udp(v6, 0, len.max(1))
            } else {
                tcp(v6, 0, len)
            };
            p.sport = 30_000 + s.flow as u16;
            p.seq = next_seq[s.flow];
            p.id = next_id[s.flow];
            if s.flow == 2 {
                p.options = vec![1, 1, 8, 10, 0, 0, 1, 0, 0, 0, 0, 2];
            }
            for b in p.payload.iter_mut() {
                *b = b.wrapping_add(n as u8);
            }
            match s.tweak {
                0..=199 => {}
                200..=205 => p.flags |= TCP_PSH,
                206..=208 => p.flags |= 0x01,
                209 => p.flags = 0x02,
                210 => p.flags |= 0x04,
                211..=213 => p.seq = p.seq.wrapping_add(u32::from(s.short)),
                214..=216 => p.id = p.id.wrapping_add(2),
                217..=219 => p.options = vec![1, 1, 8, 10, 0, 0, 1, 0, 0, 0, 0, s.tweak],
                220..=222 => p.ttl = 1,
                223..=225 => p.corrupt = 1,
                226..=228 => p.window = 0,
                229..=231 => p.ack = 8,
                232..=234 => p.flow_label = 3,
                235 => p.more_fragments = true,
                236 => p.ip_options = vec![1, 1, 1, 1],
                _ => {}
            }
            if s.tweak == 237 {
                out.push(vec![0x45, 0, 0, 3]);
                continue;
            }
            next_seq[s.flow] = p.seq.wrapping_add(p.payload.len() as u32);
            next_id[s.flow] = p.id.wrapping_add(1);
            let mut bytes = p.bytes();
            if s.tweak == 238 {
                // A packet of the flow the coalescer cannot place: an IPv6 extension
                // header, an IPv4 non-first fragment.
                if v6 {
                    bytes[6] = 0;
                } else {
                    bytes[7] = 0x10;
                }
            }
            out.push(bytes);
        }
        out
    }

    /// The flow a packet belongs to in a random batch (malformed ones share one).
    fn flow_of(p: &[u8]) -> (u8, u16) {
        match p.first().map(|b| b >> 4) {
            Some(4) if p.len() >= 24 => (4, be16(p, 20)),
            Some(6) if p.len() >= 44 => (6, be16(p, 40)),
            _ => (0, 0),
        }
    }

    fn by_flow(pkts: &[Vec<u8>]) -> HashMap<(u8, u16), Vec<Vec<u8>>> {
        let mut m: HashMap<_, Vec<_>> = HashMap::new();
        for p in pkts {
            m.entry(flow_of(p)).or_default().push(p.clone());
        }
        m
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        #[test]
        fn resegmenting_the_output_gives_back_the_input(
            steps in prop::collection::vec(step(), 1..64),
            seq0 in any::<u32>(),
            id0 in any::<u16>(),
            small in any::<bool>(),
            udp_gso in any::<bool>(),
        ) {
            let raw = build(&steps, seq0, id0);
            let capacity = if small { OFF + 5000 } else { BIG };
            let (out, idx) = coalesce_with(&raw, capacity, udp_gso);
            prop_assert!(idx.windows(2).all(|w| w[0] < w[1]), "written in batch order");
            let back = resegment_all(&out);
            prop_assert_eq!(back.len(), raw.len());
            prop_assert!(by_flow(&back) == by_flow(&raw), "per-flow packets or order differ");
            // Nothing that could merge was left unmerged: an in-order bulk batch
            // without deviations comes out as one packet per flow.
            let fits = (0..5).all(|f| steps.iter().filter(|s| s.flow == f).count() * 1400 < 60_000);
            if steps.iter().all(|s| s.size <= 200 && s.tweak < 200) && udp_gso && !small && fits {
                let flows = steps.iter().map(|s| s.flow).collect::<std::collections::HashSet<_>>();
                prop_assert_eq!(out.len(), flows.len());
            }
        }
    }
}
