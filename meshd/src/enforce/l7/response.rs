//! The HTTP response text with which meshd refuses a request: the same bytes whether
//! the flow needs only their length (where the answer ends in the server's sequence
//! space) or the packet builder writes them.

use std::fmt::Write as _;

use super::RefuseCause;

/// The reason phrase of the statuses the enforcer answers with.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        403 => "Forbidden",
        408 => "Request Timeout",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// Writes the HTTP response text for `status` into `out` (cleared first). The body is
/// `reason` (control characters replaced by spaces) and a newline.
pub fn http_response(status: u16, reason: &str, out: &mut String) {
    out.clear();
    // Writing to a String cannot fail.
    let _ = write_response(status, reason, out);
}

/// Length in bytes of the response that refuses with `cause` (the enforcer's
/// refusal payload), without writing it: a refused flow needs it to know where its answer
/// ends in the server's sequence space.
pub fn response_len(cause: &RefuseCause) -> usize {
    let mut n = Count(0);
    let _ = write_response(cause.status(), cause, &mut n);
    n.0
}

pub(crate) fn write_response(
    status: u16,
    reason: impl std::fmt::Display,
    out: &mut impl std::fmt::Write,
) -> std::fmt::Result {
    let mut body = Count(1);
    write!(Printable(&mut body), "{reason}")?;
    write!(
        out,
        "HTTP/1.1 {status} {}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        reason_phrase(status),
        body.0
    )?;
    write!(Printable(&mut *out), "{reason}")?;
    out.write_char('\n')
}

/// Counts the bytes written to it.
struct Count(usize);

impl std::fmt::Write for Count {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0 += s.len();
        Ok(())
    }
}

/// Writes through to `W` with control characters replaced by spaces.
struct Printable<W>(W);

impl<W: std::fmt::Write> std::fmt::Write for Printable<W> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        for c in s.chars() {
            self.0.write_char(if c.is_control() { ' ' } else { c })?;
        }
        Ok(())
    }
}
