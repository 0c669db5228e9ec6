//! rtnetlink requests (I/O shell): message building (header, attributes) and one
//! request with its acknowledgement. Shared by the TUN's routes (`device`) and the
//! pods' rules and routes (`attach`).

use std::io;
use std::mem;
use std::net::IpAddr;

use ipnet::IpNet;

/// The RTM_NEWROUTE / RTM_DELROUTE request for `net dev <oif>` with link scope, in
/// `table` (`None`: the main table) and with preferred source `src`.
pub(crate) fn route_message(
    add: bool,
    net: IpNet,
    oif: u32,
    table: Option<u32>,
    src: Option<IpAddr>,
) -> Vec<u8> {
    let (kind, flags) = if add {
        (
            libc::RTM_NEWROUTE,
            libc::NLM_F_REQUEST | libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_REPLACE,
        )
    } else {
        (libc::RTM_DELROUTE, libc::NLM_F_REQUEST | libc::NLM_F_ACK)
    };
    let mut b = header(kind, flags as u16);
    let family = match net {
        IpNet::V4(_) => libc::AF_INET,
        IpNet::V6(_) => libc::AF_INET6,
    } as u8;
    // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
    // Tables past 255 only fit the RTA_TABLE attribute.
    b.extend_from_slice(&[
        family,
        net.prefix_len(),
        0,
        0,
        if table.is_some() {
            libc::RT_TABLE_UNSPEC
        } else {
            libc::RT_TABLE_MAIN
        },
        libc::RTPROT_STATIC,
        libc::RT_SCOPE_LINK,
        libc::RTN_UNICAST,
    ]);
    b.extend_from_slice(&0u32.to_ne_bytes());
    match net.trunc() {
        IpNet::V4(n) => push_attr(&mut b, libc::RTA_DST, &n.addr().octets()),
        IpNet::V6(n) => push_attr(&mut b, libc::RTA_DST, &n.addr().octets()),
    }
    push_attr(&mut b, libc::RTA_OIF, &oif.to_ne_bytes());
    if let Some(table) = table {
        push_attr(&mut b, libc::RTA_TABLE, &table.to_ne_bytes());
    }
    match src {
        Some(IpAddr::V4(a)) => push_attr(&mut b, libc::RTA_PREFSRC, &a.octets()),
        Some(IpAddr::V6(a)) => push_attr(&mut b, libc::RTA_PREFSRC, &a.octets()),
        None => {}
    }
    finish(&mut b);
    b
}

pub(crate) fn header(kind: u16, flags: u16) -> Vec<u8> {
    let mut b = Vec::with_capacity(96);
    b.extend_from_slice(&0u32.to_ne_bytes()); // length, patched by `finish`
    b.extend_from_slice(&kind.to_ne_bytes());
    b.extend_from_slice(&flags.to_ne_bytes());
    b.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    b.extend_from_slice(&0u32.to_ne_bytes()); // port id
    b
}

pub(crate) fn finish(b: &mut [u8]) {
    let len = b.len() as u32;
    b[..4].copy_from_slice(&len.to_ne_bytes());
}

pub(crate) fn push_attr(buf: &mut Vec<u8>, kind: u16, data: &[u8]) {
    let len = 4 + data.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(data);
    while !buf.len().is_multiple_of(4) {
        buf.push(0);
    }
}

/// Sends one request and reads its acknowledgement (an `NLMSG_ERROR` with errno 0).
pub(crate) fn request(msg: &[u8]) -> io::Result<()> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let _close = Close(fd);
    // SAFETY: sockaddr_nl is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_nl = unsafe { mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: `msg` and `addr` are valid for the lengths passed.
    let n = unsafe {
        libc::sendto(
            fd,
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&addr as *const libc::sockaddr_nl).cast(),
            mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut reply = [0u8; 1024];
    // SAFETY: `reply` is valid for writes of its length.
    let n = unsafe { libc::recv(fd, reply.as_mut_ptr().cast(), reply.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if (n as usize) < 20 || u16::from_ne_bytes([reply[4], reply[5]]) != libc::NLMSG_ERROR as u16 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "unexpected netlink reply",
        ));
    }
    match i32::from_ne_bytes([reply[16], reply[17], reply[18], reply[19]]) {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(-e)),
    }
}

struct Close(i32);

impl Drop for Close {
    fn drop(&mut self) {
        // SAFETY: we own this descriptor and close it once.
        unsafe { libc::close(self.0) };
    }
}
