//! Typed views over IP packets (sans-IO).
//!
//! Contract (as in smoltcp's `wire`): [`IpPacket::new_checked`] validates the version,
//! the header length and the total length against the buffer; after it succeeds no
//! accessor panics, whatever the bytes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

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
}

mod field {
    use std::ops::Range;
    pub const V4_HEADER_LEN: usize = 20;
    pub const V4_TOTAL_LEN: Range<usize> = 2..4;
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
mod tests {
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

    #[test]
    fn never_panics_on_arbitrary_bytes() {
        use proptest::prelude::*;
        proptest!(|(bytes in proptest::collection::vec(any::<u8>(), 0..80))| {
            if let Ok(v) = IpPacket::new_checked(&bytes[..]) {
                let _ = (v.src_addr(), v.dst_addr(), v.protocol(), v.as_bytes().len());
            }
        });
    }
}
