//! Packets the enforcer sends on its own: the HTTP response that refuses a request, the
//! RST that tells the server the connection is gone, and segments that carry bytes from
//! the enforcer's reassembled view (sans-IO: bytes out, the shell writes them).
//!
//! A refusal ([`crate::enforce::l7::Refusal`]) becomes two packets:
//! - [`response`] to the client, as if from the server: an HTTP/1.1 response with the
//!   refusal's status, a one-line text body and `connection: close`, in one segment with
//!   ACK, PSH and FIN, at the sequence number the client expects from the server and
//!   acknowledging all the client sent. The client reads a complete answer and a closed
//!   connection.
//! - [`reset`] to the server, as if from the client: RST+ACK at the sequence number right
//!   after the last byte delivered to it, so it discards the connection without ever
//!   seeing the refused request (RFC 9293 §3.10.7.3; an exact match also passes the
//!   RFC 5961 check).
//!
//! All packets are IPv4 or IPv6 (as the endpoints are) with correct checksums, TTL/hop
//! limit 64, no IP options. TCP options are the caller's ([`tcp_packet_with`],
//! [`segments`]): segments sent on a client's behalf carry the options it sent
//! (timestamps, RFC 7323). Writing reuses the caller's `Vec`, so the data path allocates
//! only when a packet is larger than any before.

use std::net::{IpAddr, SocketAddr};

use crate::enforce::flow::{Flags, SeqNumber};
use crate::enforce::l7::response::write_response;
pub use crate::enforce::l7::response::{http_response, reason_phrase, response_len};
use crate::enforce::l7::Refusal;

const TTL: u8 = 64;

/// The two ends of a TCP connection, as the client opened it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Endpoints {
    pub client: SocketAddr,
    pub server: SocketAddr,
}

/// Why a packet could not be built.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("endpoints {0} and {1} are not of the same IP version")]
    MixedFamilies(SocketAddr, SocketAddr),
    #[error("payload of {0} bytes does not fit in one packet")]
    TooLarge(usize),
    #[error("building the packet: {0}")]
    Build(#[from] etherparse::err::packet::BuildWriteError),
    #[error("TCP options: {0}")]
    Options(#[from] etherparse::TcpOptionWriteError),
}

/// One TCP segment from `src` to `dst`.
#[derive(Clone, Copy, Debug)]
pub struct TcpSegment<'a> {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub seq: SeqNumber,
    /// Sent with the ACK flag when `Some`.
    pub ack: Option<SeqNumber>,
    /// FIN, SYN, RST, PSH; ACK is set from `ack`.
    pub flags: Flags,
    pub window: u16,
    pub payload: &'a [u8],
}

/// Writes `seg` as an IP packet into `out` (cleared first), without TCP options.
pub fn tcp_packet(seg: &TcpSegment<'_>, out: &mut Vec<u8>) -> Result<(), InjectError> {
    tcp_packet_with(seg, &[], out)
}

/// Writes `seg` as an IP packet into `out` (cleared first), with the TCP `options` (as
/// on the wire, at most 40 bytes; padded with zeros to a multiple of 4).
pub fn tcp_packet_with(
    seg: &TcpSegment<'_>,
    options: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), InjectError> {
    out.clear();
    if seg.payload.len() > 65_000 {
        return Err(InjectError::TooLarge(seg.payload.len()));
    }
    let ip = match (seg.src.ip(), seg.dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            etherparse::PacketBuilder::ipv4(s.octets(), d.octets(), TTL)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            etherparse::PacketBuilder::ipv6(s.octets(), d.octets(), TTL)
        }
        _ => return Err(InjectError::MixedFamilies(seg.src, seg.dst)),
    };
    let mut b = ip.tcp(seg.src.port(), seg.dst.port(), seg.seq.0, seg.window);
    if let Some(ack) = seg.ack {
        b = b.ack(ack.0);
    }
    if seg.flags.contains(Flags::SYN) {
        b = b.syn();
    }
    if seg.flags.contains(Flags::PSH) {
        b = b.psh();
    }
    if seg.flags.contains(Flags::FIN) {
        b = b.fin();
    }
    if seg.flags.contains(Flags::RST) {
        b = b.rst();
    }
    if !options.is_empty() {
        b = b.options_raw(options)?;
    }
    out.reserve(b.size(seg.payload.len()));
    b.write(out, seg.payload)?;
    Ok(())
}

/// Writes `seg` as packets of at most `mss` bytes of payload and options each (RFC 6691:
/// the sender subtracts its options from the MSS), each with the TCP `options`, calling
/// `emit` with each packet (built in `out`, which is reused). Sequence numbers advance;
/// PSH and FIN are set only on the last packet. An empty payload gives one packet.
pub fn segments(
    seg: &TcpSegment<'_>,
    options: &[u8],
    mss: usize,
    out: &mut Vec<u8>,
    mut emit: impl FnMut(&[u8]),
) -> Result<(), InjectError> {
    let mss = mss.saturating_sub(options.len()).max(1);
    let last_flags = seg.flags;
    let mid_flags = seg.flags.without(Flags::PSH).without(Flags::FIN);
    let mut off = 0;
    loop {
        let end = (off + mss).min(seg.payload.len());
        let last = end == seg.payload.len();
        let piece = TcpSegment {
            seq: seg.seq + off,
            flags: if last { last_flags } else { mid_flags },
            payload: &seg.payload[off..end],
            ..*seg
        };
        tcp_packet_with(&piece, options, out)?;
        emit(out);
        if last {
            return Ok(());
        }
        off = end;
    }
}

/// The packet that answers the refused client (see the module docs). `text` is scratch
/// space for the response text.
pub fn response(
    ends: &Endpoints,
    refusal: &Refusal,
    text: &mut String,
    out: &mut Vec<u8>,
) -> Result<(), InjectError> {
    text.clear();
    let _ = write_response(refusal.cause.status(), refusal.cause, text);
    tcp_packet(
        &TcpSegment {
            src: ends.server,
            dst: ends.client,
            seq: refusal.client_seq,
            ack: Some(refusal.client_ack),
            flags: Flags::PSH | Flags::FIN,
            window: 65_535,
            payload: text.as_bytes(),
        },
        out,
    )
}

/// The RST that ends the server's side of a refused connection (see the module docs).
pub fn reset(ends: &Endpoints, refusal: &Refusal, out: &mut Vec<u8>) -> Result<(), InjectError> {
    tcp_packet(
        &TcpSegment {
            src: ends.client,
            dst: ends.server,
            seq: refusal.server_seq,
            ack: Some(refusal.server_ack),
            flags: Flags::RST,
            window: 0,
            payload: &[],
        },
        out,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::enforce::flow::Timestamps;
    use crate::enforce::l7::RefuseCause;
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};

    fn refusal(cause: RefuseCause) -> Refusal {
        Refusal {
            cause,
            client_seq: SeqNumber(u32::MAX - 3),
            client_ack: SeqNumber(1234),
            server_seq: SeqNumber(1200),
            server_ack: SeqNumber(u32::MAX - 3),
            response_end: SeqNumber(u32::MAX - 3) + (response_len(&cause) + 1),
        }
    }

    fn endpoints_v4() -> Endpoints {
        Endpoints {
            client: "100.64.0.1:40000".parse().unwrap(),
            server: "100.64.0.2:8080".parse().unwrap(),
        }
    }

    fn endpoints_v6() -> Endpoints {
        Endpoints {
            client: "[fd00:6d65:7368::1]:40000".parse().unwrap(),
            server: "[fd00:6d65:7368::2]:8080".parse().unwrap(),
        }
    }

    /// Parses `packet` back and checks addresses and checksums; returns the TCP header
    /// and payload.
    fn parse_back(
        packet: &[u8],
        src: SocketAddr,
        dst: SocketAddr,
    ) -> (etherparse::TcpHeader, Vec<u8>) {
        let p = SlicedPacket::from_ip(packet).expect("parses");
        let Some(TransportSlice::Tcp(tcp)) = p.transport else {
            panic!("not TCP");
        };
        let payload = tcp.payload().to_vec();
        let header = tcp.to_header();
        match p.net {
            Some(NetSlice::Ipv4(ip)) => {
                let h = ip.header().to_header();
                assert_eq!(h.header_checksum, h.calc_header_checksum(), "IPv4 checksum");
                assert_eq!(IpAddr::from(h.source), src.ip());
                assert_eq!(IpAddr::from(h.destination), dst.ip());
                assert_eq!(usize::from(h.total_len), packet.len());
                assert_eq!(
                    header.checksum,
                    header.calc_checksum_ipv4(&h, &payload).unwrap(),
                    "TCP checksum"
                );
            }
            Some(NetSlice::Ipv6(ip)) => {
                let h = ip.header().to_header();
                assert_eq!(IpAddr::from(h.source), src.ip());
                assert_eq!(IpAddr::from(h.destination), dst.ip());
                assert_eq!(
                    header.checksum,
                    header.calc_checksum_ipv6(&h, &payload).unwrap(),
                    "TCP checksum"
                );
            }
            _ => panic!("not IP"),
        }
        assert_eq!(header.source_port, src.port());
        assert_eq!(header.destination_port, dst.port());
        (header, payload)
    }

    #[test]
    fn response_to_client_v4_and_v6() {
        for ends in [endpoints_v4(), endpoints_v6()] {
            let r = refusal(RefuseCause::Policy {
                status: 403,
                reason: "denied by policy",
            });
            let (mut text, mut out) = (String::new(), Vec::new());
            response(&ends, &r, &mut text, &mut out).unwrap();
            let (tcp, payload) = parse_back(&out, ends.server, ends.client);
            assert_eq!(tcp.sequence_number, u32::MAX - 3);
            assert!(tcp.ack && tcp.psh && tcp.fin && !tcp.rst && !tcp.syn);
            assert_eq!(tcp.acknowledgment_number, 1234);
            let body = "denied by policy\n";
            let want = format!(
                "HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            assert_eq!(String::from_utf8(payload.clone()).unwrap(), want);
            // A real HTTP parser reads it as a complete response.
            let mut headers = [httparse::EMPTY_HEADER; 8];
            let mut resp = httparse::Response::new(&mut headers);
            let len = resp.parse(&payload).unwrap().unwrap();
            assert_eq!(resp.code, Some(403));
            assert_eq!(&payload[len..], body.as_bytes());
        }
    }

    #[test]
    fn reset_to_server_v4_and_v6() {
        for ends in [endpoints_v4(), endpoints_v6()] {
            let r = refusal(RefuseCause::Timeout);
            let mut out = Vec::new();
            reset(&ends, &r, &mut out).unwrap();
            let (tcp, payload) = parse_back(&out, ends.client, ends.server);
            assert!(tcp.rst && tcp.ack && !tcp.fin && !tcp.syn);
            assert_eq!(tcp.sequence_number, 1200);
            assert_eq!(tcp.acknowledgment_number, u32::MAX - 3);
            assert!(payload.is_empty());
        }
    }

    #[test]
    fn statuses_and_bodies() {
        let mut text = String::new();
        for (cause, line) in [
            (RefuseCause::Timeout, "HTTP/1.1 408 Request Timeout\r\n"),
            (
                RefuseCause::HoldFull,
                "HTTP/1.1 431 Request Header Fields Too Large\r\n",
            ),
            (RefuseCause::Truncated, "HTTP/1.1 400 Bad Request\r\n"),
        ] {
            http_response(cause.status(), &cause.to_string(), &mut text);
            assert!(text.starts_with(line), "{text}");
            assert!(text.contains("connection: close\r\n"));
        }
        http_response(429, "rate\r\nlimited", &mut text);
        assert!(text.ends_with("\r\n\r\nrate  limited\n"), "{text:?}");
    }

    #[test]
    fn release_segment_carries_bytes() {
        let ends = endpoints_v4();
        let mut out = Vec::new();
        let seg = TcpSegment {
            src: ends.client,
            dst: ends.server,
            seq: SeqNumber(77),
            ack: Some(SeqNumber(88)),
            flags: Flags::PSH,
            window: 1000,
            payload: b"GET / HTTP/1.1\r\n\r\n",
        };
        tcp_packet(&seg, &mut out).unwrap();
        let (tcp, payload) = parse_back(&out, ends.client, ends.server);
        assert_eq!(payload, seg.payload);
        assert_eq!((tcp.sequence_number, tcp.window_size), (77, 1000));
        let cap = out.capacity();
        tcp_packet(&seg, &mut out).unwrap();
        assert_eq!(out.capacity(), cap, "the buffer is reused");
    }

    #[test]
    fn release_is_split_to_the_mss() {
        let ends = endpoints_v6();
        let data: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        let seg = TcpSegment {
            src: ends.client,
            dst: ends.server,
            seq: SeqNumber(u32::MAX - 100),
            ack: Some(SeqNumber(5)),
            flags: Flags::PSH | Flags::FIN,
            window: 500,
            payload: &data,
        };
        let ts = Timestamps {
            val: 0xdead_beef,
            ecr: 7,
        };
        let mut got = Vec::new();
        let mut out = Vec::new();
        segments(&seg, &ts.emit(), 1400, &mut out, |p| {
            got.push(parse_back(p, ends.client, ends.server));
        })
        .unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!(
            got[0].1.len(),
            1400 - 12,
            "the options count against the MSS"
        );
        let mut joined = Vec::new();
        for (i, (tcp, payload)) in got.iter().enumerate() {
            assert_eq!(
                SeqNumber(tcp.sequence_number),
                seg.seq + joined.len(),
                "piece {i}"
            );
            assert_eq!(tcp.fin, i == 2);
            assert_eq!(tcp.psh, i == 2);
            assert!(tcp.ack);
            assert_eq!(
                Timestamps::parse(tcp.options.as_slice()),
                Some(ts),
                "piece {i} carries the timestamps"
            );
            joined.extend_from_slice(payload);
        }
        assert_eq!(joined, data);

        let mut n = 0;
        let empty = TcpSegment {
            payload: &[],
            ..seg
        };
        segments(&empty, &[], 1400, &mut out, |_| n += 1).unwrap();
        assert_eq!(n, 1);
    }

    #[test]
    fn options_are_written_padded_and_checksummed() {
        for ends in [endpoints_v4(), endpoints_v6()] {
            let seg = TcpSegment {
                src: ends.client,
                dst: ends.server,
                seq: SeqNumber(1),
                ack: Some(SeqNumber(2)),
                flags: Flags::PSH,
                window: 9,
                payload: b"body",
            };
            let ts = Timestamps { val: 5, ecr: 6 };
            let mut out = Vec::new();
            tcp_packet_with(&seg, &ts.emit(), &mut out).unwrap();
            let (tcp, payload) = parse_back(&out, ends.client, ends.server);
            assert_eq!(payload, b"body");
            assert_eq!(tcp.header_len(), 32);
            assert_eq!(Timestamps::parse(tcp.options.as_slice()), Some(ts));
            // Options of any length are padded to 32-bit words (RFC 9293 §3.1).
            tcp_packet_with(&seg, &[4, 2], &mut out).unwrap();
            let (tcp, payload) = parse_back(&out, ends.client, ends.server);
            assert_eq!((tcp.header_len(), payload.as_slice()), (24, &b"body"[..]));
            assert_eq!(&tcp.options.as_slice()[..4], &[4, 2, 0, 0]);
            // More than 40 bytes cannot be.
            assert!(matches!(
                tcp_packet_with(&seg, &[1; 41], &mut out),
                Err(InjectError::Options(_))
            ));
        }
    }

    #[test]
    fn mixed_families_are_an_error() {
        let seg = TcpSegment {
            src: "100.64.0.1:1".parse().unwrap(),
            dst: "[fd00:6d65:7368::2]:2".parse().unwrap(),
            seq: SeqNumber(0),
            ack: None,
            flags: Flags::RST,
            window: 0,
            payload: &[],
        };
        assert!(matches!(
            tcp_packet(&seg, &mut Vec::new()),
            Err(InjectError::MixedFamilies(..))
        ));
    }
}
