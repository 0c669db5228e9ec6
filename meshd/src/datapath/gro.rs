//! Coalescing of TCP and UDP segments for TUN writes (sans-IO): software GRO.
//!
//! With offload on, the TUN takes one packet per write behind a virtio-net header, and
//! that packet may be a "super-packet" the kernel segments again (or delivers whole to
//! a local socket). [`Coalescer::coalesce`] merges consecutive segments of a flow in
//! a batch, in place, into such super-packets, so that a bulk transfer costs one
//! write per run of segments instead of one per segment.
//!
//! The rule the merge follows: the kernel's segmentation of a merged packet
//! (`tcp_gso_segment` / `__udp_gso_segment` behind `inet_gso_segment` or
//! `ipv6_gso_segment`) must give back the original packets byte for byte. So only
//! what those functions rebuild may differ between the segments of a run (sequence
//! number, IPv4 ID, lengths, checksums, PSH on the last one); every other header
//! byte must be identical, and a run's checksums are verified before they are
//! replaced by `CHECKSUM_PARTIAL` (a corrupt segment stays alone for the kernel to
//! drop). Anything else, malformed packets included, is written unmerged with a
//! zeroed header; the coalescer drops nothing.
//!
//! Order: the packets of one flow leave in the order they came. A packet that cannot
//! join its flow's open run closes that run; packets of different flows interleave
//! freely.
//!
//! Memory: all state is allocated in [`Coalescer::new`]; a call allocates nothing.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::wire::checksum::{fold, sum};
use crate::wire::{FlowKey, TcpFlags, TcpPacket, UdpPacket, PROTO_TCP, PROTO_UDP};

/// Size of the virtio-net header (`struct virtio_net_hdr`, without `num_buffers`).
pub const VNET_HDR_LEN: usize = 10;

// virtio-net header fields (include/uapi/linux/virtio_net.h).
const VNET_F_NEEDS_CSUM: u8 = 1;
const VNET_GSO_TCPV4: u8 = 1;
const VNET_GSO_TCPV6: u8 = 4;
const VNET_GSO_UDP_L4: u8 = 5;

const TCP_PSH: u8 = TcpFlags::PSH.0;

const IPV4_HDR: usize = 20;
const IPV6_HDR: usize = 40;
/// Where the checksum sits in the TCP and UDP headers (`csum_offset`).
const TCP_CSUM_AT: usize = 16;
const UDP_CSUM_AT: usize = 6;

/// Largest merged IP packet: the IPv4 total length field's limit, kept for IPv6 too.
const MAX_IP_LEN: usize = 65_535;

/// A packet buffer whose held length can change within a fixed capacity.
pub trait Resizable {
    /// Bytes the buffer can hold in all.
    fn capacity(&self) -> usize;
    /// Sets the held length (at most [`Resizable::capacity`]); bytes between the old
    /// and the new length keep whatever the buffer held.
    fn set_len(&mut self, len: usize);
}

/// The slot hash of a run's flow (its 5-tuple, [`FlowKey`]). Flows in one batch are
/// few and not adversarial (they came through authenticated sessions and policy):
/// one multiply over the XOR of the fields spreads them well enough for a half-empty
/// table.
fn run_hash(key: &FlowKey) -> u32 {
    let word = |a: IpAddr| match a {
        IpAddr::V4(a) => u64::from(u32::from(a)),
        IpAddr::V6(a) => {
            let v = u128::from(a);
            v as u64 ^ (v >> 64) as u64
        }
    };
    let addrs = word(key.src) ^ word(key.dst).rotate_left(32);
    let ports = u64::from(key.src_port) << 16 | u64::from(key.dst_port);
    let h = (addrs ^ ports << 16 ^ u64::from(key.proto)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (h >> 32) as u32
}

/// The mergeable shape of one segment, read from its headers.
#[derive(Clone, Copy)]
struct Segment {
    /// IP header length (20 or 40: options and extension headers are not merged).
    ip_len: usize,
    /// Transport header length (TCP with options, or 8 for UDP).
    l4_len: usize,
    payload: usize,
    /// TCP sequence number (0 for UDP).
    seq: u32,
    /// IPv4 identification (0 for IPv6).
    id: u16,
    /// PSH set (TCP): the segment may only end a run.
    psh: bool,
}

/// What a packet is to the coalescer.
enum Class {
    /// Not a TCP or UDP packet of a flow we follow: written alone, closes nothing.
    Other,
    /// May belong to any flow (an IPv4 fragment, IPv6 extension headers): written
    /// alone, and every open run closes so that no later segment overtakes it.
    Barrier,
    /// A packet of this flow that cannot be merged: written alone, closes the flow's
    /// open run.
    Lone(FlowKey),
    /// A packet that may start or join a run.
    Candidate(FlowKey, Segment),
}

/// One output packet in the making: a head segment and those merged behind it.
struct Run {
    key: FlowKey,
    /// Index of the buffer that holds the run.
    head: usize,
    ip_len: usize,
    l4_len: usize,
    /// Payload of the head segment: the `gso_size`.
    gso_size: usize,
    /// Length of the merged IP packet so far.
    len: usize,
    segments: usize,
    next_seq: u32,
    next_id: u16,
    /// Whether a later segment of the flow may still join.
    open: bool,
    /// A PSH segment ended the run: the merged packet carries PSH.
    psh: bool,
    /// Whether the head's checksums were verified (done when a second segment joins).
    head_verified: bool,
}

/// Merges consecutive segments of TCP (and UDP) flows in a batch of packet buffers.
pub struct Coalescer {
    runs: Vec<Run>,
    /// Open-addressed flow index: run index + 1, 0 for an empty slot.
    slots: Vec<u32>,
    /// The slot [`Coalescer::slot_of`] found last (`usize::MAX`: none).
    recent: usize,
    out: Vec<usize>,
}

impl Coalescer {
    /// A coalescer for batches of up to `batch_capacity` packets (a larger batch
    /// works, but makes the state grow once).
    pub fn new(batch_capacity: usize) -> Coalescer {
        let cap = batch_capacity.max(1);
        Coalescer {
            runs: Vec::with_capacity(cap),
            slots: vec![0; slot_count(cap)],
            recent: usize::MAX,
            out: Vec::with_capacity(cap),
        }
    }

    /// Coalesces `bufs`, each holding `[offset - VNET_HDR_LEN .. offset]` free for the
    /// header and an IP packet from `offset` to its end. Returns the indices of the
    /// buffers to write, in order: each then holds a complete virtio-net header at
    /// `offset - VNET_HDR_LEN` followed by its (possibly merged) packet. Buffers not
    /// returned were merged into an earlier one. `udp_gso` says whether the device
    /// accepts UDP segmentation offload; without it UDP packets are left alone.
    ///
    /// A buffer shorter than `offset` holds no packet and is left out.
    ///
    /// # Panics
    /// If `offset < VNET_HDR_LEN` (a caller's mistake, not packet input).
    pub fn coalesce<B>(&mut self, bufs: &mut [B], offset: usize, udp_gso: bool) -> &[usize]
    where
        B: AsRef<[u8]> + AsMut<[u8]> + Resizable,
    {
        assert!(offset >= VNET_HDR_LEN, "no room for the virtio-net header");
        self.runs.clear();
        self.out.clear();
        if self.slots.len() < slot_count(bufs.len()) {
            self.slots.resize(slot_count(bufs.len()), 0);
        }
        self.slots.fill(0);
        self.recent = usize::MAX;

        for i in 0..bufs.len() {
            let Some(pkt) = bufs[i].as_ref().get(offset..) else {
                continue;
            };
            match classify(pkt, udp_gso) {
                Class::Other => self.alone(bufs, i, offset),
                Class::Barrier => {
                    self.slots.fill(0);
                    self.alone(bufs, i, offset);
                }
                Class::Lone(key) => {
                    if let Some(r) = self.lookup(&key) {
                        self.runs[r].open = false;
                    }
                    self.alone(bufs, i, offset);
                }
                Class::Candidate(key, seg) => {
                    let s = self.slot_of(&key);
                    let joined = match self.slots[s] {
                        0 => false,
                        r => {
                            let r = r as usize - 1;
                            self.runs[r].open && self.try_join(bufs, r, i, &seg, offset)
                        }
                    };
                    if !joined {
                        self.start(bufs, s, key, i, &seg, offset);
                    }
                }
            }
        }

        for r in &self.runs {
            if r.segments > 1 {
                finish(bufs[r.head].as_mut(), r, offset);
            }
        }
        &self.out
    }

    /// Writes buffer `i` on its own, with a zeroed header (its checksums are final).
    fn alone<B: AsMut<[u8]>>(&mut self, bufs: &mut [B], i: usize, offset: usize) {
        bufs[i].as_mut()[offset - VNET_HDR_LEN..offset].fill(0);
        self.out.push(i);
    }

    /// The slot of `key`'s run, or of the empty slot where it would go.
    fn slot_of(&mut self, key: &FlowKey) -> usize {
        // Bulk traffic comes in stretches of one flow: try the previous packet's
        // flow before hashing.
        if let Some(&r) = self.slots.get(self.recent) {
            if r != 0 && self.runs[r as usize - 1].key == *key {
                return self.recent;
            }
        }
        let mask = self.slots.len() - 1;
        let mut s = run_hash(key) as usize & mask;
        loop {
            match self.slots[s] {
                0 => break,
                r if self.runs[r as usize - 1].key == *key => break,
                _ => s = (s + 1) & mask,
            }
        }
        self.recent = s;
        s
    }

    fn lookup(&mut self, key: &FlowKey) -> Option<usize> {
        let s = self.slot_of(key);
        match self.slots[s] {
            0 => None,
            r => Some(r as usize - 1),
        }
    }

    /// Starts a run with buffer `i` in slot `s` (closing the flow's previous run, which
    /// the index stops pointing at).
    fn start<B: AsMut<[u8]>>(
        &mut self,
        bufs: &mut [B],
        s: usize,
        key: FlowKey,
        i: usize,
        seg: &Segment,
        offset: usize,
    ) {
        self.runs.push(Run {
            key,
            head: i,
            ip_len: seg.ip_len,
            l4_len: seg.l4_len,
            gso_size: seg.payload,
            len: seg.ip_len + seg.l4_len + seg.payload,
            segments: 1,
            next_seq: seg.seq.wrapping_add(seg.payload as u32),
            next_id: seg.id.wrapping_add(1),
            open: !seg.psh,
            psh: seg.psh,
            head_verified: false,
        });
        self.slots[s] = self.runs.len() as u32;
        self.alone(bufs, i, offset);
    }

    /// Appends buffer `i`'s payload to run `r` if the kernel would split it back out
    /// unchanged; false (and `r` closed) otherwise.
    fn try_join<B>(
        &mut self,
        bufs: &mut [B],
        r: usize,
        i: usize,
        seg: &Segment,
        offset: usize,
    ) -> bool
    where
        B: AsRef<[u8]> + AsMut<[u8]> + Resizable,
    {
        let run = &mut self.runs[r];
        // `i` comes after the run's head in the batch.
        let (before, after) = bufs.split_at_mut(i);
        let head = &mut before[run.head];
        let pkt = &after[0].as_ref()[offset..];
        let head_pkt = &head.as_ref()[offset..];
        let fits = run.len + seg.payload <= MAX_IP_LEN
            && offset + run.len + seg.payload <= head.capacity();
        let ok = fits
            && seg.ip_len == run.ip_len
            && seg.l4_len == run.l4_len
            && seg.payload <= run.gso_size
            && same_headers(head_pkt, pkt, run, seg)
            && (run.head_verified || checksums_ok(head_pkt, run.ip_len, run.key.proto))
            && checksums_ok(pkt, seg.ip_len, run.key.proto);
        if !ok {
            run.open = false;
            return false;
        }
        run.head_verified = true;
        let from = seg.ip_len + seg.l4_len;
        let at = offset + run.len;
        head.set_len(at + seg.payload);
        head.as_mut()[at..].copy_from_slice(&pkt[from..]);
        run.len += seg.payload;
        run.segments += 1;
        run.next_seq = run.next_seq.wrapping_add(seg.payload as u32);
        run.next_id = run.next_id.wrapping_add(1);
        // A short segment or a PSH ends what segmentation can rebuild.
        run.psh = seg.psh;
        run.open = !seg.psh && seg.payload == run.gso_size;
        true
    }
}

/// Flow-index size for `n` packets: a power of two, at most half full.
fn slot_count(n: usize) -> usize {
    (2 * n.max(8)).next_power_of_two()
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// IPv6 next-header values that are extension headers (RFC 8200 §4, IANA list):
/// the transport header, and so the flow, is further in.
fn is_ipv6_extension(nh: u8) -> bool {
    matches!(nh, 0 | 43 | 44 | 50 | 51 | 60 | 135 | 139 | 140 | 253 | 254)
}

/// Reads what the coalescer needs from one IP packet. Never panics: every access is
/// after a length check.
fn classify(pkt: &[u8], udp_gso: bool) -> Class {
    let Some(&first) = pkt.first() else {
        return Class::Other;
    };
    let (key, ip_len, id, plain) = match first >> 4 {
        4 => {
            if pkt.len() < IPV4_HDR {
                return Class::Other;
            }
            let ihl = usize::from(first & 0x0f) * 4;
            let proto = pkt[9];
            if ihl < IPV4_HDR || ihl > pkt.len() || (proto != PROTO_TCP && proto != PROTO_UDP) {
                return Class::Other;
            }
            let frag = be16(pkt, 6);
            if frag & 0x1fff != 0 {
                // A non-first fragment: its ports are in the first one.
                return Class::Barrier;
            }
            if pkt.len() < ihl + 4 {
                return Class::Barrier;
            }
            let addr = |at: usize| Ipv4Addr::new(pkt[at], pkt[at + 1], pkt[at + 2], pkt[at + 3]);
            let key = FlowKey {
                proto,
                src: IpAddr::V4(addr(12)),
                dst: IpAddr::V4(addr(16)),
                src_port: be16(pkt, ihl),
                dst_port: be16(pkt, ihl + 2),
            };
            // Options, more fragments to come, or a length that disagrees with the
            // buffer: the kernel gets the packet as it is.
            let plain =
                ihl == IPV4_HDR && frag & 0x2000 == 0 && usize::from(be16(pkt, 2)) == pkt.len();
            (key, ihl, be16(pkt, 4), plain)
        }
        6 => {
            if pkt.len() < IPV6_HDR {
                return Class::Other;
            }
            let nh = pkt[6];
            if is_ipv6_extension(nh) {
                return Class::Barrier;
            }
            if (nh != PROTO_TCP && nh != PROTO_UDP) || pkt.len() < IPV6_HDR + 4 {
                return Class::Other;
            }
            let addr = |at: usize| {
                let mut a = [0u8; 16];
                a.copy_from_slice(&pkt[at..at + 16]);
                Ipv6Addr::from(a)
            };
            let key = FlowKey {
                proto: nh,
                src: IpAddr::V6(addr(8)),
                dst: IpAddr::V6(addr(24)),
                src_port: be16(pkt, IPV6_HDR),
                dst_port: be16(pkt, IPV6_HDR + 2),
            };
            let plain = usize::from(be16(pkt, 4)) == pkt.len() - IPV6_HDR;
            (key, IPV6_HDR, 0, plain)
        }
        _ => return Class::Other,
    };
    if key.proto == PROTO_UDP && !udp_gso {
        // No UDP runs exist to close.
        return Class::Other;
    }
    if !plain {
        return Class::Lone(key);
    }
    let l4 = &pkt[ip_len..];
    let seg = if key.proto == PROTO_TCP {
        let Ok(tcp) = TcpPacket::new_checked(l4) else {
            return Class::Lone(key);
        };
        let (flags, payload) = (tcp.flags(), tcp.payload().len());
        // Only plain data segments: SYN, FIN, RST, URG, ECE and CWR each change what
        // segmentation would rebuild (or must reach the stack on their own).
        // A checksum field of 0xffff is the non-canonical form of 0, which
        // segmentation would write back as 0.
        if payload == 0
            || (flags != TcpFlags::ACK && flags != TcpFlags::ACK | TcpFlags::PSH)
            || tcp.checksum() == 0xffff
        {
            return Class::Lone(key);
        }
        Segment {
            ip_len,
            l4_len: tcp.header_len(),
            payload,
            seq: tcp.seq_number(),
            id,
            psh: flags.contains(TcpFlags::PSH),
        }
    } else {
        // The UDP length must be the packet's, and a checksum present: segmentation
        // always computes one, so a datagram sent without (or with the 0 that IPv6
        // forbids) would not come back byte for byte.
        let Ok(udp) = UdpPacket::new_checked(l4) else {
            return Class::Lone(key);
        };
        if udp.payload().is_empty() || usize::from(udp.length()) != l4.len() || udp.checksum() == 0
        {
            return Class::Lone(key);
        }
        Segment {
            ip_len,
            l4_len: UdpPacket::HEADER_LEN,
            payload: udp.payload().len(),
            seq: 0,
            id,
            psh: false,
        }
    };
    Class::Candidate(key, seg)
}

/// Whether `pkt` continues `run` (whose head is `head`) exactly as segmentation would
/// rebuild it: same header bytes except those the kernel rewrites per segment.
fn same_headers(head: &[u8], pkt: &[u8], run: &Run, seg: &Segment) -> bool {
    let ip_ok = if run.key.src.is_ipv6() {
        // Version, traffic class, flow label; then next header, hop limit, addresses.
        head[0..4] == pkt[0..4] && head[6..40] == pkt[6..40]
    } else {
        // Everything but total length, ID and checksum; the ID must be the next one:
        // `inet_gso_segment` numbers the segments head ID + i, for TCP and for
        // UDP_L4 alike (only the old UFO type fragments instead), and virtio-net
        // has no FIXEDID type to keep a fixed ID.
        head[0..2] == pkt[0..2]
            && head[6..10] == pkt[6..10]
            && head[12..20] == pkt[12..20]
            && seg.id == run.next_id
    };
    if !ip_ok {
        return false;
    }
    if run.key.proto != PROTO_TCP {
        return true;
    }
    let (h, p) = (&head[run.ip_len..], &pkt[seg.ip_len..]);
    // Ack number, data offset and flags (PSH aside), window, urgent pointer, options.
    be32(p, 4) == run.next_seq
        && h[8..13] == p[8..13]
        && h[13] & !TCP_PSH == p[13] & !TCP_PSH
        && h[14..16] == p[14..16]
        && h[18..run.l4_len] == p[18..run.l4_len]
}

/// Whether the IPv4 header checksum (if any) and the transport checksum of `pkt` are
/// right: a merged packet gets new ones, which must not turn a corrupt segment into a
/// good one.
fn checksums_ok(pkt: &[u8], ip_len: usize, proto: u8) -> bool {
    let v6 = ip_len == IPV6_HDR;
    if !v6 && fold(sum(&pkt[..ip_len], 0)) != 0xffff {
        return false;
    }
    let l4 = &pkt[ip_len..];
    fold(sum(l4, pseudo_header(pkt, v6, proto, l4.len()))) == 0xffff
}

/// The pseudo-header's share of the transport checksum (RFC 793 §3.1, RFC 8200 §8.1).
fn pseudo_header(pkt: &[u8], v6: bool, proto: u8, l4_len: usize) -> u64 {
    let addrs = if v6 { &pkt[8..40] } else { &pkt[12..20] };
    sum(addrs, u64::from(proto) + l4_len as u64)
}

/// Turns a run's head buffer into the merged packet: lengths, IPv4 header checksum,
/// the pseudo-header checksum `CHECKSUM_PARTIAL` completes, and the virtio-net header.
fn finish(buf: &mut [u8], run: &Run, offset: usize) {
    let (hdr, pkt) = buf[offset - VNET_HDR_LEN..].split_at_mut(VNET_HDR_LEN);
    let pkt = &mut pkt[..run.len];
    let l4_len = run.len - run.ip_len;
    if run.key.src.is_ipv6() {
        pkt[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
    } else {
        pkt[2..4].copy_from_slice(&(run.len as u16).to_be_bytes());
        pkt[10..12].fill(0);
        let c = !fold(sum(&pkt[..run.ip_len], 0));
        pkt[10..12].copy_from_slice(&c.to_be_bytes());
    }
    let (gso_type, csum_at) = match (run.key.proto, run.key.src.is_ipv6()) {
        (PROTO_TCP, false) => (VNET_GSO_TCPV4, TCP_CSUM_AT),
        (PROTO_TCP, true) => (VNET_GSO_TCPV6, TCP_CSUM_AT),
        _ => (VNET_GSO_UDP_L4, UDP_CSUM_AT),
    };
    let l4_at = run.ip_len;
    if run.key.proto == PROTO_TCP {
        if run.psh {
            pkt[l4_at + 13] |= TCP_PSH;
        }
    } else {
        pkt[l4_at + 4..l4_at + 6].copy_from_slice(&(l4_len as u16).to_be_bytes());
    }
    // CHECKSUM_PARTIAL: the field holds the folded, non-inverted pseudo-header sum;
    // the kernel adds the rest from csum_start and inverts.
    let partial = fold(pseudo_header(
        pkt,
        run.key.src.is_ipv6(),
        run.key.proto,
        l4_len,
    ));
    pkt[l4_at + csum_at..l4_at + csum_at + 2].copy_from_slice(&partial.to_be_bytes());

    // struct virtio_net_hdr, little-endian: the TUN device's byte order on the
    // little-endian hosts we run on (tun_is_little_endian()).
    hdr[0] = VNET_F_NEEDS_CSUM;
    hdr[1] = gso_type;
    hdr[2..4].copy_from_slice(&((run.ip_len + run.l4_len) as u16).to_le_bytes());
    hdr[4..6].copy_from_slice(&(run.gso_size as u16).to_le_bytes());
    hdr[6..8].copy_from_slice(&(run.ip_len as u16).to_le_bytes());
    hdr[8..10].copy_from_slice(&(csum_at as u16).to_le_bytes());
}

#[cfg(test)]
pub(crate) mod tests;
