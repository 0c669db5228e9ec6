//! One parse of a packet's transport facts for the enforcer: the flow key, what it
//! observes, whether it opens a flow, the TCP view, an ICMP error's quote. Built on
//! the checked views of `wire`, from the packet or from a key (a cut flow's resets).

use super::*;

/// The transport facts of one packet.
#[derive(Clone, Copy, Debug)]
pub(super) struct Parsed<'a> {
    pub(super) key: FlowKey,
    pub(super) obs: Observation,
    pub(super) protocol: Protocol,
    pub(super) kind: Kind,
    /// The packet opens a flow of its own: a TCP SYN without ACK, a UDP datagram, an
    /// ICMP echo request. Nothing else makes a local workload the opener of a flow.
    pub(super) opens: bool,
    /// TCP: the segment, header and payload, in the packet.
    pub(super) tcp: Option<TcpPacket<'a>>,
    /// ICMP errors: the error's own addresses and what it quotes beyond the 5-tuple.
    pub(super) quote: Option<Quote>,
}

/// What an ICMP error says about itself and the packet it quotes.
#[derive(Clone, Copy, Debug)]
pub(super) struct Quote {
    /// The error's own source and destination.
    pub(super) src: IpAddr,
    pub(super) dst: IpAddr,
    /// TCP: the quoted segment's sequence number (in the first 8 bytes of its header,
    /// which every ICMP error carries).
    pub(super) seq: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    /// TCP, UDP, ICMP echo.
    Flow,
    /// An ICMP error; `key` is the quoted packet's flow.
    IcmpError,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ParseError {
    Malformed,
    Fragment,
    Protocol,
    StrayIcmp,
}

pub(super) fn parse_drop(e: ParseError) -> DropReason {
    match e {
        ParseError::Malformed => DropReason::Malformed,
        ParseError::Fragment => DropReason::Denied(DenyReason::Fragment),
        ParseError::Protocol => DropReason::Protocol,
        ParseError::StrayIcmp => DropReason::StrayIcmp,
    }
}

pub(super) fn parsed_from_key(key: &FlowKey) -> Option<Parsed<'static>> {
    let protocol = match key.proto {
        PROTO_TCP => Protocol::Tcp,
        PROTO_UDP => Protocol::Udp,
        PROTO_ICMP | PROTO_ICMPV6 => Protocol::Icmp,
        _ => return None,
    };
    Some(Parsed {
        key: *key,
        obs: Observation { tcp: None },
        protocol,
        kind: Kind::Flow,
        opens: false,
        tcp: None,
        quote: None,
    })
}

/// Reads the 5-tuple and TCP facts of the bytes of an IP packet (the enforcer's own
/// packets in tests; the packet path hands over the view [`parse_ip`] takes).
#[cfg(test)]
pub(super) fn parse(packet: &[u8]) -> Result<Parsed<'_>, ParseError> {
    parse_ip(&IpPacket::new_checked(packet).map_err(|_| ParseError::Malformed)?)
}

/// Reads the 5-tuple and TCP facts of a checked IP packet: the extension chain and
/// the transport header, through the [`crate::wire`] views (the TCP view borrows the
/// packet: its segment is read from it as is, not copied).
pub(super) fn parse_ip<'a>(ip: &IpPacket<&'a [u8]>) -> Result<Parsed<'a>, ParseError> {
    let payload = ip.payload().map_err(|_| ParseError::Malformed)?;
    if payload.fragment {
        return Err(ParseError::Fragment);
    }
    let (src, dst) = (ip.src_addr(), ip.dst_addr());
    let proto = payload.protocol;
    let l4 = payload.data;
    let key = |src_port, dst_port| FlowKey {
        proto,
        src,
        dst,
        src_port,
        dst_port,
    };
    match proto {
        PROTO_TCP => {
            let tcp = TcpPacket::new_checked(l4).map_err(|_| ParseError::Malformed)?;
            let flags = tcp.flags();
            let info = TcpSegmentInfo {
                flags,
                seq: tcp.seq_number(),
                ack: tcp.ack_number(),
                payload_len: tcp.payload().len() as u32,
                window: tcp.window(),
                wscale: if flags.syn() {
                    tcp.window_scale()
                } else {
                    None
                },
            };
            Ok(Parsed {
                key: key(tcp.src_port(), tcp.dst_port()),
                obs: Observation { tcp: Some(info) },
                protocol: Protocol::Tcp,
                kind: Kind::Flow,
                opens: info.opens(),
                tcp: Some(tcp),
                quote: None,
            })
        }
        PROTO_UDP => {
            let udp = UdpPacket::new_checked(l4).map_err(|_| ParseError::Malformed)?;
            Ok(Parsed {
                key: key(udp.src_port(), udp.dst_port()),
                obs: Observation { tcp: None },
                protocol: Protocol::Udp,
                kind: Kind::Flow,
                opens: true,
                tcp: None,
                quote: None,
            })
        }
        PROTO_ICMP | PROTO_ICMPV6 => parse_icmp(proto, src, dst, l4),
        _ => Err(ParseError::Protocol),
    }
}

/// ICMP echo (request and reply share the identifier, used as both ports) and the
/// errors that quote a packet (RFC 792; RFC 4443 §3), whose flow is the quoted one.
pub(super) fn parse_icmp(
    proto: u8,
    src: IpAddr,
    dst: IpAddr,
    l4: &[u8],
) -> Result<Parsed<'_>, ParseError> {
    let icmp = IcmpPacket::new_checked(l4).map_err(|_| ParseError::Malformed)?;
    let ty = icmp.msg_type();
    let (echo, request, error) = if proto == PROTO_ICMP {
        (matches!(ty, 0 | 8), ty == 8, matches!(ty, 3 | 11 | 12))
    } else {
        (matches!(ty, 128 | 129), ty == 128, matches!(ty, 1..=4))
    };
    if echo {
        let id = icmp.echo_ident();
        return Ok(Parsed {
            key: FlowKey {
                proto,
                src,
                dst,
                src_port: id,
                dst_port: id,
            },
            obs: Observation { tcp: None },
            protocol: Protocol::Icmp,
            kind: Kind::Flow,
            opens: request,
            tcp: None,
            quote: None,
        });
    }
    if !error {
        return Err(ParseError::StrayIcmp);
    }
    let (inner, seq) = wire::quoted_flow(icmp.data()).ok_or(ParseError::StrayIcmp)?;
    Ok(Parsed {
        key: inner,
        obs: Observation { tcp: None },
        protocol: Protocol::Icmp,
        kind: Kind::IcmpError,
        opens: false,
        tcp: None,
        quote: Some(Quote { src, dst, seq }),
    })
}
