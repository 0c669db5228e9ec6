//! The underlay UDP socket (I/O shell). IPv4 or IPv6; a socket bound to an IPv6
//! address also carries IPv4 (dual stack), with IPv4-mapped addresses translated at
//! this edge so the core only ever sees plain IPv4 endpoints.

use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};

use socket2::{Domain, Protocol, Socket, Type};

/// Socket buffer size requested (the kernel caps it at net.core.[rw]mem_max).
const SOCKET_BUFFER: usize = 4 << 20;

pub struct Udp {
    socket: UdpSocket,
    v6: bool,
    local: SocketAddr,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on UDP {addr}: {source}")]
pub struct BindError {
    pub addr: SocketAddr,
    pub source: io::Error,
}

impl Udp {
    pub fn bind(addr: SocketAddr) -> Result<Udp, BindError> {
        let err = |source| BindError { addr, source };
        let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
            .map_err(err)?;
        if addr.is_ipv6() {
            socket.set_only_v6(false).map_err(err)?;
        }
        // Larger buffers absorb bursts; failure only costs performance.
        let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
        let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
        socket.set_nonblocking(true).map_err(err)?;
        socket.bind(&addr.into()).map_err(err)?;
        let socket: UdpSocket = socket.into();
        let local = socket.local_addr().map_err(err)?;
        Ok(Udp {
            socket,
            v6: addr.is_ipv6(),
            local,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Receives one datagram; `WouldBlock` when none is waiting.
    pub fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        let (n, from) = self.socket.recv_from(buf)?;
        Ok((n, canonical(from)))
    }

    /// Sends one datagram. A destination of the other family than the socket is an
    /// `AddrNotAvailable` error (an IPv4-only socket cannot reach an IPv6 peer).
    pub fn send_to(&self, data: &[u8], to: SocketAddr) -> io::Result<usize> {
        let to = match (self.v6, to) {
            (true, SocketAddr::V4(a)) => {
                SocketAddr::new(IpAddr::V6(a.ip().to_ipv6_mapped()), a.port())
            }
            (false, SocketAddr::V6(_)) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrNotAvailable,
                    "IPv6 endpoint on an IPv4 listen address",
                ))
            }
            (_, to) => to,
        };
        self.socket.send_to(data, to)
    }

    pub fn fd(&self) -> RawFd {
        self.socket.as_raw_fd()
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

/// Waits until `fd` is readable or `timeout_ms` passes (the loops re-check the
/// shutdown flag between waits).
pub fn wait_readable(fd: RawFd, timeout_ms: i32) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `p` is one valid pollfd for the duration of the call.
    let r = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(e);
    }
    Ok(r > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_addresses_become_ipv4() {
        let a: SocketAddr = "[::ffff:198.18.0.2]:51820".parse().unwrap();
        assert_eq!(canonical(a), "198.18.0.2:51820".parse().unwrap());
        let b: SocketAddr = "[fd00:198:18::2]:51820".parse().unwrap();
        assert_eq!(canonical(b), b);
    }

    #[test]
    fn loopback_round_trip_dual_stack() {
        let a = Udp::bind("[::1]:0".parse().unwrap()).unwrap();
        let b = Udp::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        assert!(b.send_to(b"x", a.local_addr()).is_err());
        let c = Udp::bind("[::]:0".parse().unwrap()).unwrap();
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
}
