//! A client of a running meshd (I/O shell), for meshd's own use: `meshd check-config`
//! asks the meshd on the configured control socket for its status, to tell its port
//! and device from a stranger's. Depends on the control contract (`mesh_proto`) alone.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use mesh_proto::control::{parse_reply, Request, Status, StatusRequest, MAX_REQUEST_BYTES};

/// How long the whole exchange may take.
const TIMEOUT: Duration = Duration::from_secs(2);

/// The status of the meshd listening on `path`, if one answers within a second or
/// two.
pub fn ask_status(path: &Path) -> Option<Status> {
    let mut s = UnixStream::connect(path).ok()?;
    s.set_read_timeout(Some(TIMEOUT)).ok()?;
    s.set_write_timeout(Some(TIMEOUT)).ok()?;
    let mut line = Request::from(StatusRequest {}).to_line();
    line.push('\n');
    s.write_all(line.as_bytes()).ok()?;
    let reply = read_line(&s, instant_now() + TIMEOUT)?;
    parse_reply::<StatusRequest>(&reply).ok()?.ok()
}

/// The first line `stream` sends (without its newline; a last line without one
/// counts), if it arrives whole before `deadline` and is no longer than a request
/// may be.
fn read_line(mut stream: &UnixStream, deadline: Instant) -> Option<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.iter().position(|&b| b == b'\n') {
            buf.truncate(end);
            return String::from_utf8(buf).ok();
        }
        if buf.len() > MAX_REQUEST_BYTES {
            return None;
        }
        let left = deadline.saturating_duration_since(instant_now());
        if left.is_zero() {
            return None;
        }
        stream.set_read_timeout(Some(left)).ok()?;
        match stream.read(&mut chunk) {
            Ok(0) if buf.is_empty() => return None,
            Ok(0) => return String::from_utf8(buf).ok(),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
}

/// The I/O shell's clock (the exchange's deadline).
#[allow(clippy::disallowed_methods)] // I/O shell: the deadline of a control exchange
fn instant_now() -> Instant {
    Instant::now()
}
