//! Waiting for a descriptor (I/O shell): `poll(2)` on one or two descriptors with a
//! timeout, so that the loops that wait can still notice shutdown between waits.
//! An interrupted wait is reported as "nothing ready", never as an error.

use std::io;
use std::os::fd::RawFd;

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

/// Waits until `fd` is writable or `timeout_ms` passes.
pub fn wait_writable(fd: RawFd, timeout_ms: i32) -> io::Result<()> {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: `p` is one valid pollfd for the duration of the call.
    let r = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
}

/// Waits until either descriptor is readable or `timeout_ms` passes; says which
/// are (an error or hang-up counts, so that the next read reports it). Interrupted:
/// both `false`.
pub fn wait_readable2(a: RawFd, b: RawFd, timeout_ms: i32) -> io::Result<(bool, bool)> {
    let mut p = [
        libc::pollfd {
            fd: a,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: b,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: `p` is two valid pollfds for the duration of the call.
    let r = unsafe { libc::poll(p.as_mut_ptr(), 2, timeout_ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok((p[0].revents != 0, p[1].revents != 0))
}
