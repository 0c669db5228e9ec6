//! The underlay UDP socket (I/O shell). IPv4 or IPv6; a socket bound to an IPv6
//! address also carries IPv4 (dual stack), with IPv4-mapped addresses translated at
//! this edge so the core only ever sees plain IPv4 endpoints.
//!
//! Batching: with UDP GRO (`UDP_GRO`) one `recvmsg` returns up to 64 datagrams from
//! one sender, laid end to end with a common segment size; with UDP GSO
//! (`UDP_SEGMENT`) one `sendmsg` sends up to 64 equal-sized datagrams to one
//! destination ([`GsoBatch`]). Either falls back to one datagram per system call,
//! with a log line, where the kernel refuses it; `node.udp_offload = false` turns
//! both off.
//!
//! A read is split into datagrams here and nowhere else ([`Received::datagrams`]):
//! the segment size the kernel reports is never used as a divisor or chunk size
//! unchecked. A datagram of zero bytes is legal UDP and anyone can send one; it comes
//! out as one empty datagram, which the core counts as malformed.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::sys::poll::wait_writable;

/// Socket buffer size requested. As root `SO_RCVBUFFORCE`/`SO_SNDBUFFORCE` go past
/// net.core.[rw]mem_max; otherwise the kernel caps the plain request at that maximum.
/// A burst of 64 KiB TSO segments from the TUN arrives faster than one thread
/// decrypts it; this absorbs several of them without drops.
const SOCKET_BUFFER: usize = 16 << 20;

/// `SO_SNDBUFFORCE` and `SO_RCVBUFFORCE` (asm-generic/socket.h; not in `libc` for
/// every target).
const SO_SNDBUFFORCE: libc::c_int = 32;
const SO_RCVBUFFORCE: libc::c_int = 33;

/// How long a send waits, in all, for room in a full socket buffer before the
/// datagram is dropped, and the step of each wait.
const SEND_WAIT_MS: i32 = 100;
const SEND_WAIT_STEP_MS: i32 = 10;

/// Most datagrams one GSO send may carry (the kernel's `UDP_MAX_SEGMENTS`).
pub const GSO_MAX_SEGMENTS: usize = 64;
/// Most bytes one GSO send may carry (a UDP datagram's length field is 16 bits).
pub const GSO_MAX_BYTES: usize = 65_000;
/// Receive buffer for one GRO read: 64 segments of a full-MTU datagram.
pub const GRO_BUF_LEN: usize = 64 * 1500 + 4096;

pub struct Udp {
    socket: UdpSocket,
    v6: bool,
    local: SocketAddr,
    /// GRO and GSO were asked for (`node.udp_offload`); siblings ask the same.
    offload: bool,
    /// UDP GRO is on: reads may return several datagrams.
    gro: bool,
    /// UDP GSO works (cleared, with a log line, the first time the kernel refuses it).
    gso: AtomicBool,
    /// Datagrams not sent (refused, or the send buffer stayed full past the
    /// backpressure wait); shared by the sibling sockets.
    send_failures: Arc<AtomicU64>,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on UDP {addr}: {source}")]
pub struct BindError {
    pub addr: SocketAddr,
    pub source: io::Error,
}

/// One read from the socket: `len` bytes from `from`, datagrams of `segment` bytes
/// each (the last may be shorter); [`Received::datagrams`] splits them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Received {
    pub len: usize,
    pub from: SocketAddr,
    /// Never 0, whatever the kernel reported (a read of 0 bytes is one empty datagram).
    segment: usize,
}

impl Received {
    /// A read of `len` bytes whose datagrams are `segment` bytes long; a `segment` of
    /// 0 (a zero-length datagram read without GRO, or no size reported) means one
    /// datagram of `len` bytes.
    pub fn new(len: usize, from: SocketAddr, segment: usize) -> Received {
        let segment = if segment == 0 { len } else { segment };
        Received {
            len,
            from,
            segment: segment.max(1),
        }
    }

    /// The size of each datagram but the last (at least 1).
    pub fn segment(&self) -> usize {
        self.segment
    }

    /// The datagrams of this read, from the buffer it was read into: `len` bytes cut
    /// every `segment` bytes, or, for a read of 0 bytes, one empty datagram (so that
    /// it is counted like any other malformed one).
    pub fn datagrams<'a>(&self, buf: &'a [u8]) -> Datagrams<'a> {
        let rest = &buf[..self.len.min(buf.len())];
        Datagrams {
            rest,
            segment: self.segment,
            empty: rest.is_empty().then_some(&[][..]),
        }
    }
}

/// The datagrams of one read ([`Received::datagrams`]).
#[derive(Clone, Debug)]
pub struct Datagrams<'a> {
    rest: &'a [u8],
    /// At least 1.
    segment: usize,
    /// The one empty datagram of a read of 0 bytes, until it is taken.
    empty: Option<&'a [u8]>,
}

impl<'a> Iterator for Datagrams<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        if self.rest.is_empty() {
            return self.empty.take();
        }
        let (datagram, rest) = self.rest.split_at(self.segment.min(self.rest.len()));
        self.rest = rest;
        Some(datagram)
    }
}

impl Udp {
    /// Binds `addr`, with UDP GRO and GSO where the kernel has them if `offload`.
    /// The socket allows siblings ([`Udp::open_sibling`]), but the address must be
    /// free: a port another process holds, even one that also allows sharing (a
    /// second meshd), is refused as before.
    pub fn bind(addr: SocketAddr, offload: bool) -> Result<Udp, BindError> {
        if addr.port() != 0 {
            // A probe without SO_REUSEPORT fails if anyone holds the port.
            Udp::probe(addr)?;
        }
        Udp::bind_shared(addr, offload)
    }

    /// Binds `addr` exclusively and lets it go: whether [`Udp::bind`] would get it
    /// now (the address is on this host, the port is free). Used by `meshd
    /// check-config`.
    pub fn probe(addr: SocketAddr) -> Result<(), BindError> {
        let err = |source| BindError { addr, source };
        let probe = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
            .map_err(err)?;
        if addr.is_ipv6() {
            probe.set_only_v6(false).map_err(err)?;
        }
        probe.bind(&addr.into()).map_err(err)
    }

    fn bind_shared(addr: SocketAddr, offload: bool) -> Result<Udp, BindError> {
        let err = |source| BindError { addr, source };
        let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
            .map_err(err)?;
        if addr.is_ipv6() {
            socket.set_only_v6(false).map_err(err)?;
        }
        // Larger buffers absorb bursts; failure only costs performance.
        let fd = socket.as_raw_fd();
        if setsockopt_int(fd, libc::SOL_SOCKET, SO_RCVBUFFORCE, SOCKET_BUFFER as i32).is_err() {
            let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
        }
        if setsockopt_int(fd, libc::SOL_SOCKET, SO_SNDBUFFORCE, SOCKET_BUFFER as i32).is_err() {
            let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
        }
        let gro = offload
            && match setsockopt_int(fd, libc::SOL_UDP, libc::UDP_GRO, 1) {
                Ok(()) => true,
                Err(e) => {
                    tracing::info!("UDP GRO unavailable ({e}): one datagram per read");
                    false
                }
            };
        // Workers may open sibling sockets on the same address ([`Udp::open_sibling`]);
        // the kernel keeps each remote address on one of them. Only the same user
        // can join the group.
        let _ = socket.set_reuse_port(true);
        socket.set_nonblocking(true).map_err(err)?;
        socket.bind(&addr.into()).map_err(err)?;
        let socket: UdpSocket = socket.into();
        let local = socket.local_addr().map_err(err)?;
        Ok(Udp {
            socket,
            v6: addr.is_ipv6(),
            local,
            offload,
            gro,
            gso: AtomicBool::new(offload),
            send_failures: Arc::default(),
        })
    }

    /// Whether reads use UDP GRO, and sends UDP GSO (until the kernel refuses it).
    pub fn offload(&self) -> (bool, bool) {
        (self.gro, self.gso.load(Ordering::Relaxed))
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Another socket on the same address (`SO_REUSEPORT`), for another worker. The
    /// kernel steers each remote address to one socket of the group.
    pub fn open_sibling(&self) -> io::Result<Udp> {
        let mut sibling = Udp::bind_shared(self.local, self.offload).map_err(|e| e.source)?;
        sibling.send_failures = self.send_failures.clone();
        Ok(sibling)
    }

    /// Datagrams not sent so far, by this socket and its siblings.
    pub fn send_failures(&self) -> u64 {
        self.send_failures.load(Ordering::Relaxed)
    }

    fn failed(&self, datagrams: usize) {
        self.send_failures
            .fetch_add(datagrams as u64, Ordering::Relaxed);
    }

    /// Receives one datagram; `WouldBlock` when none is waiting.
    pub fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        let (n, from) = self.socket.recv_from(buf)?;
        Ok((n, canonical(from)))
    }

    /// Receives one datagram or, with GRO, a run of datagrams from one sender;
    /// `WouldBlock` when none is waiting. `buf` should hold [`GRO_BUF_LEN`] bytes.
    pub fn recv_batch(&self, buf: &mut [u8]) -> io::Result<Received> {
        if !self.gro {
            let (len, from) = self.recv_from(buf)?;
            return Ok(Received::new(len, from, len));
        }
        // SAFETY: all-zero is a valid sockaddr_storage.
        let mut name: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let mut control = [0u64; 8];
        // SAFETY: all-zero is a valid msghdr; the pointers set below outlive the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = (&mut name as *mut libc::sockaddr_storage).cast();
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control);
        // SAFETY: `msg` points at live buffers of the stated lengths.
        let n = unsafe { libc::recvmsg(self.socket.as_raw_fd(), &mut msg, 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let len = n as usize;
        if msg.msg_flags & libc::MSG_TRUNC != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "datagram truncated",
            ));
        }
        let from = sockaddr_to_std(&name).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, "datagram from a non-IP address")
        })?;
        let mut segment = 0;
        // SAFETY: the kernel filled `control` up to msg_controllen; the CMSG macros
        // stay within it.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == libc::UDP_GRO {
                    let v = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::c_int);
                    if v > 0 {
                        segment = v as usize;
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        Ok(Received::new(len, canonical(from), segment))
    }

    /// Sends one datagram. A destination of the other family than the socket is an
    /// `AddrNotAvailable` error (an IPv4-only socket cannot reach an IPv6 peer).
    pub fn send_to(&self, data: &[u8], to: SocketAddr) -> io::Result<usize> {
        let result = self
            .family(to)
            .and_then(|to| self.pushing_back(|| self.socket.send_to(data, to)));
        if result.is_err() {
            self.failed(1);
        }
        result
    }

    /// Backpressure instead of drops: while the send buffer is full, waits for room
    /// (the worker stops reading, so the TUN and the local senders slow down), up to
    /// [`SEND_WAIT_MS`] in all.
    fn pushing_back<T>(&self, mut op: impl FnMut() -> io::Result<T>) -> io::Result<T> {
        let mut waited = 0;
        loop {
            match op() {
                Err(e)
                    if (e.kind() == io::ErrorKind::WouldBlock
                        || e.raw_os_error() == Some(libc::ENOBUFS))
                        && waited < SEND_WAIT_MS =>
                {
                    wait_writable(self.socket.as_raw_fd(), SEND_WAIT_STEP_MS)?;
                    waited += SEND_WAIT_STEP_MS;
                }
                r => return r,
            }
        }
    }

    /// Sends `data` as datagrams of `segment` bytes each (the last may be shorter) to
    /// `to`: one system call with GSO, else one per datagram. A `segment` of 0 means
    /// one datagram of all of `data`.
    pub fn send_segments(&self, data: &[u8], segment: usize, to: SocketAddr) -> io::Result<()> {
        if segment == 0 || data.len() <= segment {
            return self.send_to(data, to).map(|_| ());
        }
        // Here 0 < `segment` < `data.len()`: the datagrams at stake.
        let datagrams = data.len().div_ceil(segment);
        let to = self.family(to).inspect_err(|_| self.failed(datagrams))?;
        // UDP_SEGMENT takes a 16-bit size; a larger one goes datagram by datagram.
        if self.gso.load(Ordering::Relaxed) && segment <= usize::from(u16::MAX) {
            match self.pushing_back(|| self.send_gso(data, segment, to)) {
                Ok(()) => return Ok(()),
                // EIO: the device cannot checksum/segment; EINVAL: no UDP_SEGMENT.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EIO | libc::EINVAL | libc::ENOPROTOOPT)
                    ) =>
                {
                    tracing::warn!("UDP GSO refused ({e}): one datagram per send from now on");
                    self.gso.store(false, Ordering::Relaxed);
                }
                Err(e) => {
                    self.failed(datagrams);
                    return Err(e);
                }
            }
        }
        let mut last = Ok(());
        for chunk in data.chunks(segment) {
            if let Err(e) = self.pushing_back(|| self.socket.send_to(chunk, to)) {
                self.failed(1);
                last = Err(e);
            }
        }
        last
    }

    fn send_gso(&self, data: &[u8], segment: usize, to: SocketAddr) -> io::Result<()> {
        let addr = SockAddr::from(to);
        let mut iov = libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        let mut control = [0u64; 4];
        // SAFETY: all-zero is a valid msghdr; the pointers set below outlive the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = addr.as_ptr() as *mut libc::c_void;
        msg.msg_namelen = addr.len();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE is a pure computation.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(2) } as usize;
        // SAFETY: `control` is aligned and larger than CMSG_SPACE(2); the header and its
        // two data bytes are written inside it.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_UDP;
            (*c).cmsg_type = libc::UDP_SEGMENT;
            (*c).cmsg_len = libc::CMSG_LEN(2) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut u16, segment as u16);
        }
        // SAFETY: `msg` points at live buffers of the stated lengths.
        let n = unsafe { libc::sendmsg(self.socket.as_raw_fd(), &msg, 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn family(&self, to: SocketAddr) -> io::Result<SocketAddr> {
        match (self.v6, to) {
            (true, SocketAddr::V4(a)) => Ok(SocketAddr::new(
                IpAddr::V6(a.ip().to_ipv6_mapped()),
                a.port(),
            )),
            (false, SocketAddr::V6(_)) => Err(io::Error::new(
                io::ErrorKind::AddrNotAvailable,
                "IPv6 endpoint on an IPv4 listen address",
            )),
            (_, to) => Ok(to),
        }
    }

    pub fn fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

fn setsockopt_int(fd: RawFd, level: libc::c_int, name: libc::c_int, v: i32) -> io::Result<()> {
    // SAFETY: `v` is a live c_int for the duration of the call.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&v as *const i32).cast(),
            std::mem::size_of::<i32>() as u32,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn sockaddr_to_std(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match s.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says this storage holds a sockaddr_in.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this storage holds a sockaddr_in6.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Datagrams waiting to go out in one GSO send: same destination, same size (the last
/// may be shorter). The buffer is allocated once; pushing never allocates.
pub struct GsoBatch {
    buf: Box<[u8]>,
    len: usize,
    count: usize,
    segment: usize,
    to: Option<SocketAddr>,
}

impl Default for GsoBatch {
    fn default() -> Self {
        GsoBatch {
            buf: vec![0u8; GSO_MAX_BYTES].into_boxed_slice(),
            len: 0,
            count: 0,
            segment: 0,
            to: None,
        }
    }
}

impl GsoBatch {
    /// Queues `data` for `to`, sending what was queued first if `data` cannot join it.
    pub fn push(&mut self, udp: &Udp, data: &[u8], to: SocketAddr) {
        if data.len() > self.buf.len() {
            send_logged(udp, data, data.len(), to);
            return;
        }
        let space = self.space(udp, data.len());
        space[..data.len()].copy_from_slice(data);
        self.commit(udp, data.len(), to);
    }

    /// Room for the next datagram, of up to `len` bytes (at most [`GSO_MAX_BYTES`]),
    /// to be written in place and kept with [`GsoBatch::commit`]. Sends what is
    /// queued first if `len` more bytes would not fit.
    pub fn space(&mut self, udp: &Udp, len: usize) -> &mut [u8] {
        if self.len + len > self.buf.len() || self.count >= GSO_MAX_SEGMENTS {
            self.flush(udp);
        }
        &mut self.buf[self.len..]
    }

    /// Keeps the `n` bytes just written at [`GsoBatch::space`] as a datagram for
    /// `to`. If it cannot join the queued ones (another destination, or a size GSO
    /// cannot express), those are sent first.
    pub fn commit(&mut self, udp: &Udp, n: usize, to: SocketAddr) {
        let joins = self.to == Some(to)
            && n <= self.segment
            // Only the last datagram may be shorter than the segment size.
            && self.len == self.count * self.segment;
        if !joins {
            if let Some(queued) = self.to.filter(|_| self.count > 0) {
                send_logged(udp, &self.buf[..self.len], self.segment, queued);
                self.buf.copy_within(self.len..self.len + n, 0);
            }
            self.len = 0;
            self.count = 0;
            self.segment = n;
            self.to = Some(to);
        }
        self.len += n;
        self.count += 1;
    }

    /// Sends what is queued.
    pub fn flush(&mut self, udp: &Udp) {
        if let Some(to) = self.to.take() {
            if self.len > 0 {
                send_logged(udp, &self.buf[..self.len], self.segment, to);
            }
        }
        self.len = 0;
        self.count = 0;
        self.segment = 0;
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

fn send_logged(udp: &Udp, data: &[u8], segment: usize, to: SocketAddr) {
    if let Err(e) = udp.send_segments(data, segment, to) {
        tracing::debug!(%to, "UDP send failed: {e}");
    }
}

/// `::ffff:a.b.c.d` becomes `a.b.c.d`.
pub fn canonical(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => a,
        },
        a => a,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::poll::{wait_readable, wait_readable2};

    #[test]
    fn mapped_addresses_become_ipv4() {
        let a: SocketAddr = "[::ffff:198.18.0.2]:51820".parse().unwrap();
        assert_eq!(canonical(a), "198.18.0.2:51820".parse().unwrap());
        let b: SocketAddr = "[fd00:198:18::2]:51820".parse().unwrap();
        assert_eq!(canonical(b), b);
    }

    #[test]
    fn loopback_round_trip_dual_stack() {
        let a = Udp::bind("[::1]:0".parse().unwrap(), true).unwrap();
        let b = Udp::bind("127.0.0.1:0".parse().unwrap(), true).unwrap();
        assert!(b.send_to(b"x", a.local_addr()).is_err());
        let c = Udp::bind("[::]:0".parse().unwrap(), true).unwrap();
        let to = SocketAddr::new("127.0.0.1".parse().unwrap(), c.local_addr().port());
        b.send_to(b"hello", to).unwrap();
        assert!(wait_readable(c.fd(), 5000).unwrap());
        let mut buf = [0u8; 16];
        let (n, from) = c.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello");
        assert_eq!(from, b.local_addr());
        c.send_to(b"back", from).unwrap();
        assert!(wait_readable(b.fd(), 5000).unwrap());
        let (n, _) = b.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"back");
    }

    /// The worker loop reads only what poll reports: readiness per descriptor.
    #[test]
    fn wait_readable2_says_which_descriptor_is_readable() {
        let a = Udp::bind("127.0.0.1:0".parse().unwrap(), true).unwrap();
        let b = Udp::bind("127.0.0.1:0".parse().unwrap(), true).unwrap();
        let sender = Udp::bind("127.0.0.1:0".parse().unwrap(), true).unwrap();
        // Nothing waiting: the timeout passes, neither is readable.
        assert_eq!(wait_readable2(a.fd(), b.fd(), 10).unwrap(), (false, false));
        sender.send_to(b"to b", b.local_addr()).unwrap();
        assert_eq!(wait_readable2(a.fd(), b.fd(), 5000).unwrap(), (false, true));
        sender.send_to(b"to a", a.local_addr()).unwrap();
        assert!(wait_readable(a.fd(), 5000).unwrap());
        assert_eq!(wait_readable2(a.fd(), b.fd(), 5000).unwrap(), (true, true));
        let mut buf = [0u8; 16];
        b.recv_from(&mut buf).unwrap();
        assert_eq!(wait_readable2(a.fd(), b.fd(), 5000).unwrap(), (true, false));
    }

    /// Three datagrams queued for one destination leave as one GSO send and arrive
    /// as the same three datagrams, whether the receiver gets them coalesced (GRO)
    /// or one by one; a datagram for another destination is sent separately.
    #[test]
    fn unsent_datagrams_are_counted_for_the_whole_group() {
        let a = Udp::bind("127.0.0.1:0".parse().unwrap(), true).unwrap();
        let b = a.open_sibling().unwrap();
        let peer = Udp::bind("127.0.0.1:0".parse().unwrap(), true).unwrap();
        // Sent: not counted.
        a.send_to(b"ok", peer.local_addr()).unwrap();
        a.send_segments(&[7u8; 300], 100, peer.local_addr())
            .unwrap();
        assert_eq!(a.send_failures(), 0);
        // An IPv4 socket cannot reach an IPv6 peer: one datagram, then three
        // segments' worth, lost and counted, on either socket of the group.
        let v6: SocketAddr = "[::1]:9".parse().unwrap();
        assert!(a.send_to(b"lost", v6).is_err());
        assert!(b.send_segments(&[7u8; 250], 100, v6).is_err());
        assert_eq!(a.send_failures(), 4);
        assert_eq!(b.send_failures(), 4);
    }

    #[test]
    fn a_held_port_is_refused_siblings_share_it() {
        let a = Udp::bind("127.0.0.1:0".parse().unwrap(), true).unwrap();
        assert!(Udp::bind(a.local_addr(), true).is_err());
        let b = a.open_sibling().unwrap();
        assert_eq!(b.local_addr(), a.local_addr());
    }

    /// With offload (GSO out, GRO in) and without (`node.udp_offload = false`: one
    /// datagram per system call both ways), three datagrams queued for one
    /// destination arrive as the same three; one for another destination separately.
    #[test]
    fn gso_batch_round_trip_with_and_without_offload() {
        for offload in [true, false] {
            let bind = || Udp::bind("127.0.0.1:0".parse().unwrap(), offload).unwrap();
            let (tx, rx, other) = (bind(), bind(), bind());
            if !offload {
                assert_eq!(tx.offload(), (false, false));
            }
            let mut batch = GsoBatch::default();
            let sent: Vec<Vec<u8>> = vec![vec![1u8; 100], vec![2u8; 100], vec![3u8; 40]];
            for d in &sent {
                batch.push(&tx, d, rx.local_addr());
            }
            batch.push(&tx, b"elsewhere", other.local_addr());
            batch.flush(&tx);
            assert!(batch.is_empty());
            let mut got: Vec<Vec<u8>> = Vec::new();
            let mut buf = vec![0u8; GRO_BUF_LEN];
            while got.len() < sent.len() {
                assert!(wait_readable(rx.fd(), 5000).unwrap());
                let r = rx.recv_batch(&mut buf).unwrap();
                assert_eq!(r.from, tx.local_addr());
                got.extend(r.datagrams(&buf).map(|c| c.to_vec()));
            }
            assert_eq!(got, sent, "offload {offload}");
            assert!(wait_readable(other.fd(), 5000).unwrap());
            let r = other.recv_batch(&mut buf).unwrap();
            assert_eq!(&buf[..r.len], b"elsewhere");
        }
    }

    fn split(r: Received, buf: &[u8]) -> Vec<usize> {
        r.datagrams(buf).map(<[u8]>::len).collect()
    }

    /// How a read is cut into datagrams, whatever size the kernel reported.
    #[test]
    fn reads_split_into_datagrams() {
        let from: SocketAddr = "198.18.0.2:51820".parse().unwrap();
        let buf = [7u8; 300];
        // A GRO run: equal segments, the last shorter.
        assert_eq!(split(Received::new(250, from, 100), &buf), [100, 100, 50]);
        assert_eq!(split(Received::new(200, from, 100), &buf), [100, 100]);
        assert_eq!(split(Received::new(3, from, 1), &buf), [1, 1, 1]);
        // One datagram (no GRO, or no size reported).
        assert_eq!(split(Received::new(90, from, 90), &buf), [90]);
        assert_eq!(split(Received::new(90, from, 0), &buf), [90]);
        // A zero-length datagram, with or without GRO: one empty datagram, counted
        // downstream; never a division or a chunk size of 0.
        assert_eq!(split(Received::new(0, from, 0), &buf), [0]);
        assert_eq!(split(Received::new(0, from, 1400), &buf), [0]);
        assert_eq!(Received::new(0, from, 0).segment(), 1);
        // Never past the buffer.
        assert_eq!(split(Received::new(500, from, 200), &buf), [200, 100]);
    }

    /// Anyone can send a zero-length datagram to the port. Read with and without GRO,
    /// it is one empty datagram; the next read is whole.
    #[test]
    fn zero_length_datagrams_are_read_as_one_empty_datagram() {
        for offload in [false, true] {
            let rx = Udp::bind("127.0.0.1:0".parse().unwrap(), offload).unwrap();
            let tx = Udp::bind("127.0.0.1:0".parse().unwrap(), offload).unwrap();
            tx.send_to(b"", rx.local_addr()).unwrap();
            tx.send_to(b"after", rx.local_addr()).unwrap();
            let mut buf = vec![0u8; GRO_BUF_LEN];
            let mut got: Vec<Vec<u8>> = Vec::new();
            while got.len() < 2 {
                assert!(wait_readable(rx.fd(), 5000).unwrap());
                let r = rx.recv_batch(&mut buf).unwrap();
                got.extend(r.datagrams(&buf).map(|d| d.to_vec()));
            }
            assert_eq!(got, [b"".to_vec(), b"after".to_vec()], "offload {offload}");
        }
    }

    /// A segment size of 0 is one datagram, with GSO or without (where it used to be
    /// a chunk size of 0).
    #[test]
    fn a_segment_size_of_zero_sends_one_datagram() {
        for offload in [false, true] {
            let tx = Udp::bind("127.0.0.1:0".parse().unwrap(), offload).unwrap();
            let rx = Udp::bind("127.0.0.1:0".parse().unwrap(), false).unwrap();
            tx.send_segments(b"whole", 0, rx.local_addr()).unwrap();
            assert!(wait_readable(rx.fd(), 5000).unwrap());
            let mut buf = [0u8; 64];
            let (n, _) = rx.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..n], b"whole", "offload {offload}");
        }
    }
}
