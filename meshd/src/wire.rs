//! Typed views over IP packets (sans-IO): the one parser of the packet path.
//!
//! Contract (as in smoltcp's `wire`): each view's `new_checked` validates what its
//! accessors read (version, header and length fields against the buffer); after it
//! succeeds no accessor panics, whatever the bytes. The views copy nothing: they
//! borrow the packet buffer.
//!
//! A packet is parsed once per path: `peers` checks the IP header
//! ([`IpPacket::new_checked`]) when it places a packet from the TUN or decrypts one
//! from a peer, and the node core hands that view on; the enforcer walks the IPv4
//! authentication header or IPv6 extension chain ([`IpPacket::payload`]) and reads
//! the transport header ([`TcpPacket`], [`UdpPacket`], [`IcmpPacket`]) from it.
//! What a flow is keyed by ([`FlowKey`]) and the TCP flags ([`TcpFlags`]) are
//! defined here too, for conntrack, flow tracking and GRO alike.

pub mod checksum;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;

// IPv6 extension headers the walk follows (RFC 8200 §4; AH, RFC 4302, also in IPv4).
const EXT_HOP_BY_HOP: u8 = 0;
const EXT_ROUTING: u8 = 43;
const EXT_FRAGMENT: u8 = 44;
const EXT_AUTH: u8 = 51;
const EXT_DEST_OPTS: u8 = 60;

/// Why bytes are not an IP packet. Small and `Copy`: it names the drop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireError {
    /// Shorter than the fixed header of its version.
    Truncated,
    /// The version nibble is neither 4 nor 6.
    BadVersion(u8),
    /// IPv4 IHL below 5 or past the buffer.
    BadHeaderLen,
    /// The length field disagrees with the buffer (larger than the bytes received, or
    /// smaller than the header).
    BadTotalLen,
    /// An IPv4 authentication header or IPv6 extension header that is truncated or
    /// malformed, or a hop-by-hop header that is not the first (RFC 8200 §4.1).
    BadExtension,
}

mod field {
    use std::ops::Range;
    pub const V4_HEADER_LEN: usize = 20;
    pub const V4_TOTAL_LEN: Range<usize> = 2..4;
    pub const V4_FRAG: Range<usize> = 6..8;
    pub const V4_PROTOCOL: usize = 9;
    pub const V4_SRC: Range<usize> = 12..16;
    pub const V4_DST: Range<usize> = 16..20;
    pub const V6_HEADER_LEN: usize = 40;
    pub const V6_PAYLOAD_LEN: Range<usize> = 4..6;
    pub const V6_NEXT_HEADER: usize = 6;
    pub const V6_SRC: Range<usize> = 8..24;
    pub const V6_DST: Range<usize> = 24..40;
}

/// An IPv4 or IPv6 packet whose lengths have been checked.
#[derive(Clone, Copy, Debug)]
pub struct IpPacket<T: AsRef<[u8]>> {
    buffer: T,
    version: u8,
    len: usize,
}

impl<T: AsRef<[u8]>> IpPacket<T> {
    /// Checks the header and length fields; the packet is the first [`Self::len`]
    /// bytes of `buffer` (trailing bytes, e.g. link padding, are ignored).
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        let b = buffer.as_ref();
        let first = *b.first().ok_or(WireError::Truncated)?;
        let version = first >> 4;
        let len = match version {
            4 => {
                if b.len() < field::V4_HEADER_LEN {
                    return Err(WireError::Truncated);
                }
                let ihl = usize::from(first & 0x0f) * 4;
                if ihl < field::V4_HEADER_LEN || ihl > b.len() {
                    return Err(WireError::BadHeaderLen);
                }
                let total = be16(&b[field::V4_TOTAL_LEN]);
                if total < ihl || total > b.len() {
                    return Err(WireError::BadTotalLen);
                }
                total
            }
            6 => {
                if b.len() < field::V6_HEADER_LEN {
                    return Err(WireError::Truncated);
                }
                let payload = be16(&b[field::V6_PAYLOAD_LEN]);
                let total = field::V6_HEADER_LEN + payload;
                if total > b.len() {
                    return Err(WireError::BadTotalLen);
                }
                total
            }
            v => return Err(WireError::BadVersion(v)),
        };
        Ok(IpPacket {
            buffer,
            version,
            len,
        })
    }

    /// 4 or 6.
    pub fn version(&self) -> u8 {
        self.version
    }

    /// Length of the packet as its header states it.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn src_addr(&self) -> IpAddr {
        let b = self.buffer.as_ref();
        if self.version == 4 {
            IpAddr::V4(v4(&b[field::V4_SRC]))
        } else {
            IpAddr::V6(v6(&b[field::V6_SRC]))
        }
    }

    pub fn dst_addr(&self) -> IpAddr {
        let b = self.buffer.as_ref();
        if self.version == 4 {
            IpAddr::V4(v4(&b[field::V4_DST]))
        } else {
            IpAddr::V6(v6(&b[field::V6_DST]))
        }
    }

    /// IPv4 protocol or IPv6 next header (extension headers are not followed).
    pub fn protocol(&self) -> u8 {
        let b = self.buffer.as_ref();
        if self.version == 4 {
            b[field::V4_PROTOCOL]
        } else {
            b[field::V6_NEXT_HEADER]
        }
    }

    /// The packet's bytes (without trailing padding).
    pub fn as_bytes(&self) -> &[u8] {
        &self.buffer.as_ref()[..self.len]
    }
}

impl<'a> IpPacket<&'a [u8]> {
    /// The transport payload: past the IPv4 header and its authentication header
    /// (RFC 4302), or past the IPv6 extension headers (RFC 8200 §4: hop-by-hop first
    /// only, routing, fragment, destination options, AH); the walk stops at the
    /// first other next-header value, which is the transport protocol. Errors when a
    /// header of the chain does not fit or is malformed.
    pub fn payload(&self) -> Result<IpPayload<'a>, WireError> {
        let b = &self.buffer[..self.len];
        if self.version == 4 {
            let ihl = usize::from(b[0] & 0x0f) * 4;
            let flags_offset = be16(&b[field::V4_FRAG]);
            // More fragments, or a fragment offset (RFC 791 §3.1).
            let fragment = flags_offset & 0x3fff != 0;
            let mut protocol = b[field::V4_PROTOCOL];
            let mut offset = ihl;
            if protocol == EXT_AUTH {
                let len = auth_header_len(&b[offset..])?;
                protocol = b[offset];
                offset += len;
            }
            return Ok(IpPayload {
                protocol,
                offset,
                fragment,
                data: &b[offset..],
            });
        }
        let mut protocol = b[field::V6_NEXT_HEADER];
        let mut offset = field::V6_HEADER_LEN;
        let mut fragment = false;
        let mut first = true;
        loop {
            let rest = &b[offset..];
            let len = match protocol {
                EXT_HOP_BY_HOP if !first => return Err(WireError::BadExtension),
                EXT_HOP_BY_HOP | EXT_ROUTING | EXT_DEST_OPTS => {
                    let len = rest
                        .get(1)
                        .map(|l| (usize::from(*l) + 1) * 8)
                        .ok_or(WireError::BadExtension)?;
                    if rest.len() < len {
                        return Err(WireError::BadExtension);
                    }
                    len
                }
                EXT_FRAGMENT => {
                    // Fragment offset (13 bits) and M, the last bit (RFC 8200 §4.5).
                    let word = rest.get(2..4).ok_or(WireError::BadExtension)?;
                    if rest.len() < 8 {
                        return Err(WireError::BadExtension);
                    }
                    fragment |= be16(word) & 0xfff9 != 0;
                    8
                }
                EXT_AUTH => auth_header_len(rest)?,
                _ => break,
            };
            protocol = rest[0];
            offset += len;
            first = false;
        }
        Ok(IpPayload {
            protocol,
            offset,
            fragment,
            data: &b[offset..],
        })
    }
}

/// The transport part of an IP packet ([`IpPacket::payload`]).
#[derive(Clone, Copy, Debug)]
pub struct IpPayload<'a> {
    /// The transport protocol (IPv4 protocol, or the IPv6 chain's last next header).
    pub protocol: u8,
    /// Where `data` starts in the packet.
    pub offset: usize,
    /// The packet is a fragment (first or later): its transport header may be
    /// incomplete or absent.
    pub fragment: bool,
    pub data: &'a [u8],
}

/// Length of an authentication header (RFC 4302 §2.2: its length field counts 32-bit
/// words minus two); at least its fixed 12 bytes, within `b`.
fn auth_header_len(b: &[u8]) -> Result<usize, WireError> {
    if b.len() < 12 || b[1] == 0 {
        return Err(WireError::BadExtension);
    }
    let len = (usize::from(b[1]) + 2) * 4;
    if b.len() < len {
        return Err(WireError::BadExtension);
    }
    Ok(len)
}

/// TCP header flags, with the wire bit values (RFC 9293 §3.1), so the flags byte of a
/// header passes unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TcpFlags(pub u8);

impl TcpFlags {
    pub const FIN: TcpFlags = TcpFlags(0x01);
    pub const SYN: TcpFlags = TcpFlags(0x02);
    pub const RST: TcpFlags = TcpFlags(0x04);
    pub const PSH: TcpFlags = TcpFlags(0x08);
    pub const ACK: TcpFlags = TcpFlags(0x10);
    pub const URG: TcpFlags = TcpFlags(0x20);

    pub const fn contains(self, other: TcpFlags) -> bool {
        self.0 & other.0 == other.0
    }

    pub const fn union(self, other: TcpFlags) -> TcpFlags {
        TcpFlags(self.0 | other.0)
    }

    pub const fn without(self, other: TcpFlags) -> TcpFlags {
        TcpFlags(self.0 & !other.0)
    }

    pub const fn syn(self) -> bool {
        self.contains(TcpFlags::SYN)
    }

    pub const fn ack(self) -> bool {
        self.contains(TcpFlags::ACK)
    }

    pub const fn fin(self) -> bool {
        self.contains(TcpFlags::FIN)
    }

    pub const fn rst(self) -> bool {
        self.contains(TcpFlags::RST)
    }
}

impl std::ops::BitOr for TcpFlags {
    type Output = TcpFlags;
    fn bitor(self, rhs: TcpFlags) -> TcpFlags {
        self.union(rhs)
    }
}

/// A TCP segment whose header length has been checked (RFC 9293 §3.1).
#[derive(Clone, Copy, Debug)]
pub struct TcpPacket<'a> {
    buffer: &'a [u8],
    /// The fixed header, as an array: its fields are read without bounds checks.
    fixed: &'a [u8; 20],
    header_len: usize,
}

impl<'a> TcpPacket<'a> {
    pub const MIN_HEADER_LEN: usize = 20;

    /// Checks that the fixed header fits and that the data offset is at least 5 words
    /// and within `buffer`; the segment is all of `buffer`.
    pub fn new_checked(buffer: &'a [u8]) -> Result<Self, WireError> {
        let fixed: &[u8; 20] = buffer.first_chunk().ok_or(WireError::Truncated)?;
        let header_len = usize::from(fixed[12] >> 4) * 4;
        if header_len < Self::MIN_HEADER_LEN || header_len > buffer.len() {
            return Err(WireError::BadHeaderLen);
        }
        Ok(TcpPacket {
            buffer,
            fixed,
            header_len,
        })
    }

    pub fn src_port(&self) -> u16 {
        u16::from_be_bytes([self.fixed[0], self.fixed[1]])
    }

    pub fn dst_port(&self) -> u16 {
        u16::from_be_bytes([self.fixed[2], self.fixed[3]])
    }

    pub fn seq_number(&self) -> u32 {
        u32::from_be_bytes([self.fixed[4], self.fixed[5], self.fixed[6], self.fixed[7]])
    }

    pub fn ack_number(&self) -> u32 {
        u32::from_be_bytes([self.fixed[8], self.fixed[9], self.fixed[10], self.fixed[11]])
    }

    pub fn flags(&self) -> TcpFlags {
        TcpFlags(self.fixed[13])
    }

    /// The advertised window, as on the wire (unscaled).
    pub fn window(&self) -> u16 {
        u16::from_be_bytes([self.fixed[14], self.fixed[15]])
    }

    pub fn checksum(&self) -> u16 {
        u16::from_be_bytes([self.fixed[16], self.fixed[17]])
    }

    /// Header length, options included.
    pub fn header_len(&self) -> usize {
        self.header_len
    }

    /// The options, as on the wire.
    pub fn options(&self) -> &'a [u8] {
        &self.buffer[Self::MIN_HEADER_LEN..self.header_len]
    }

    pub fn payload(&self) -> &'a [u8] {
        &self.buffer[self.header_len..]
    }

    /// The segment: header and payload.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.buffer
    }

    /// The window scale option (RFC 7323 §2.2), if present and well-formed.
    pub fn window_scale(&self) -> Option<u8> {
        let mut opts = self.options();
        while let Some(&kind) = opts.first() {
            match kind {
                0 => return None,
                1 => opts = &opts[1..],
                _ => {
                    let len = usize::from(*opts.get(1)?);
                    if len < 2 || len > opts.len() {
                        return None;
                    }
                    if kind == 3 && len == 3 {
                        return Some(opts[2]);
                    }
                    opts = &opts[len..];
                }
            }
        }
        None
    }
}

/// A UDP datagram whose fixed header fits (RFC 768).
#[derive(Clone, Copy, Debug)]
pub struct UdpPacket<'a> {
    buffer: &'a [u8],
    fixed: &'a [u8; 8],
}

impl<'a> UdpPacket<'a> {
    pub const HEADER_LEN: usize = 8;

    pub fn new_checked(buffer: &'a [u8]) -> Result<Self, WireError> {
        let fixed = buffer.first_chunk().ok_or(WireError::Truncated)?;
        Ok(UdpPacket { buffer, fixed })
    }

    pub fn src_port(&self) -> u16 {
        u16::from_be_bytes([self.fixed[0], self.fixed[1]])
    }

    pub fn dst_port(&self) -> u16 {
        u16::from_be_bytes([self.fixed[2], self.fixed[3]])
    }

    /// The length field: header and payload, as the sender wrote it.
    pub fn length(&self) -> u16 {
        u16::from_be_bytes([self.fixed[4], self.fixed[5]])
    }

    /// 0: sent without a checksum (IPv4 only; RFC 768, RFC 8200 §8.1).
    pub fn checksum(&self) -> u16 {
        u16::from_be_bytes([self.fixed[6], self.fixed[7]])
    }

    pub fn payload(&self) -> &'a [u8] {
        &self.buffer[Self::HEADER_LEN..]
    }
}

/// An ICMP or ICMPv6 message whose fixed 8-byte header fits (RFC 792; RFC 4443 §2.1).
#[derive(Clone, Copy, Debug)]
pub struct IcmpPacket<'a> {
    buffer: &'a [u8],
}

impl<'a> IcmpPacket<'a> {
    pub const HEADER_LEN: usize = 8;

    pub fn new_checked(buffer: &'a [u8]) -> Result<Self, WireError> {
        if buffer.len() < Self::HEADER_LEN {
            return Err(WireError::Truncated);
        }
        Ok(IcmpPacket { buffer })
    }

    pub fn msg_type(&self) -> u8 {
        self.buffer[0]
    }

    /// Echo request and reply: the identifier (bytes 4..6 of the header).
    pub fn echo_ident(&self) -> u16 {
        be16(&self.buffer[4..6]) as u16
    }

    /// What follows the fixed header: for an error, as much of the offending packet
    /// as fits (its IP header and at least 8 bytes of its transport header).
    pub fn data(&self) -> &'a [u8] {
        &self.buffer[Self::HEADER_LEN..]
    }
}

/// The flow of the (truncated) packet an ICMP error quotes (its IP header and at
/// least the first 8 bytes of its transport header, RFC 792, RFC 4443 §3), and for
/// TCP its sequence number. `None` when it is too short or of another protocol. Not
/// an [`IpPacket`]: the quote is cut short, so its length fields cannot hold.
pub fn quoted_flow(q: &[u8]) -> Option<(FlowKey, Option<u32>)> {
    let get16 = |b: &[u8], at: usize| b.get(at..at + 2).map(|w| be16(w) as u16);
    let (proto, src, dst, l4): (u8, IpAddr, IpAddr, &[u8]) = match q.first()? >> 4 {
        4 => {
            let ihl = usize::from(q[0] & 0x0f) * 4;
            let src: [u8; 4] = q.get(field::V4_SRC)?.try_into().ok()?;
            let dst: [u8; 4] = q.get(field::V4_DST)?.try_into().ok()?;
            (
                *q.get(field::V4_PROTOCOL)?,
                src.into(),
                dst.into(),
                q.get(ihl..)?,
            )
        }
        6 => {
            let src: [u8; 16] = q.get(field::V6_SRC)?.try_into().ok()?;
            let dst: [u8; 16] = q.get(field::V6_DST)?.try_into().ok()?;
            let l4 = q.get(field::V6_HEADER_LEN..)?;
            (*q.get(field::V6_NEXT_HEADER)?, src.into(), dst.into(), l4)
        }
        _ => return None,
    };
    let (src_port, dst_port, seq) = match proto {
        PROTO_TCP => (get16(l4, 0)?, get16(l4, 2)?, Some(be32(l4.get(4..8)?))),
        PROTO_UDP => (get16(l4, 0)?, get16(l4, 2)?, None),
        PROTO_ICMP | PROTO_ICMPV6 => {
            let id = get16(l4, 4)?;
            (id, id, None)
        }
        _ => return None,
    };
    let key = FlowKey {
        proto,
        src,
        dst,
        src_port,
        dst_port,
    };
    Some((key, seq))
}

/// A flow's 5-tuple in one direction. For ICMP echo, both ports hold the identifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub proto: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
}

impl FlowKey {
    /// The same flow seen from the other end.
    pub fn reversed(&self) -> FlowKey {
        FlowKey {
            proto: self.proto,
            src: self.dst,
            dst: self.src,
            src_port: self.dst_port,
            dst_port: self.src_port,
        }
    }
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be16(b: &[u8]) -> usize {
    usize::from(u16::from_be_bytes([b[0], b[1]]))
}

fn v4(b: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(b[0], b[1], b[2], b[3])
}

fn v6(b: &[u8]) -> Ipv6Addr {
    let mut a = [0u8; 16];
    a.copy_from_slice(b);
    Ipv6Addr::from(a)
}

/// Test helpers: minimal well-formed packets.
#[cfg(test)]
pub(crate) mod build {
    use std::net::IpAddr;

    /// A UDP-in-IP packet from `src` to `dst` carrying `payload` (checksums zero: the
    /// data path does not verify them).
    pub fn udp(src: IpAddr, dst: IpAddr, payload: &[u8]) -> Vec<u8> {
        let udp_len = 8 + payload.len();
        let mut p = Vec::new();
        match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let total = 20 + udp_len;
                p.extend_from_slice(&[
                    0x45,
                    0,
                    (total >> 8) as u8,
                    total as u8,
                    0,
                    0,
                    0,
                    0,
                    64,
                    17,
                    0,
                    0,
                ]);
                p.extend_from_slice(&s.octets());
                p.extend_from_slice(&d.octets());
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                p.extend_from_slice(&[0x60, 0, 0, 0, (udp_len >> 8) as u8, udp_len as u8, 17, 64]);
                p.extend_from_slice(&s.octets());
                p.extend_from_slice(&d.octets());
            }
            _ => panic!("mixed families"),
        }
        p.extend_from_slice(&[
            0x30,
            0x39,
            0x30,
            0x39,
            (udp_len >> 8) as u8,
            udp_len as u8,
            0,
            0,
        ]);
        p.extend_from_slice(payload);
        p
    }
}

#[cfg(test)]
mod tests;
