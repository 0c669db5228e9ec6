//! HTTP/1.x request stream parser (sans-IO).
//!
//! [`RequestStream`] follows the client→server byte stream of one connection through any
//! number of requests (keep-alive, pipelining): it parses each request head with
//! `httparse`, then follows the body (Content-Length, or chunked with extensions and
//! trailers) to its end so that the next head is found and decided too. It is fed the
//! bytes not yet consumed and answers, like `httparse`, with a [`Step`]: a complete head
//! and its length, some body bytes, or `Partial` (more bytes needed, nothing consumed).
//! Body bytes are counted and their framing checked as they pass; they are never copied
//! or kept, so a body of any size streams in constant memory.
//!
//! For a caller that receives the stream out of order ([`crate::enforce::l7`]): body content
//! whose values decide nothing can be skipped unseen ([`RequestStream::opaque`],
//! [`RequestStream::skip_opaque`]), and inside a chunked body the framing after a
//! chunk's data can be read before that data has arrived, since its position is known
//! ([`RequestStream::chunk_data`], [`RequestStream::framing`]). The next head is read
//! only in stream order.
//!
//! # Refused shapes (request smuggling, RFC 9112 §6.3, §11.2)
//!
//! Every [`HttpError`] ends the connection with a 400 (431 for size limits). Refused:
//! - both Content-Length and Transfer-Encoding; Content-Length repeated (even with equal
//!   values) or not a plain decimal number; Transfer-Encoding other than exactly
//!   `chunked` (one header, one coding), or in an HTTP/1.0 request;
//! - header names that are `Content_Length` / `Transfer_Encoding` (some servers map `_`
//!   to `-`);
//! - a bare LF (LF without CR) anywhere in a head, chunk line or trailer; obs-fold (a
//!   header line starting with SP or HTAB) — `httparse` refuses it in heads, this parser
//!   in trailers; a CR not followed by LF;
//! - chunk sizes that are empty, not hex, have a sign, `0x` prefix or whitespace before
//!   them, or more than 15 hex digits; whitespace after a size not followed by `;`;
//!   malformed chunk extensions; chunk data not followed by CRLF;
//! - HTTP/1.1 without Host or with several; an absolute-form target whose authority is
//!   not the Host header; `CONNECT` (after it the stream is no longer HTTP and cannot be
//!   inspected).
//!
//! Known limit: after a `101 Switching Protocols` the bytes are not HTTP; this parser
//! refuses them as such (the server→client direction is not read yet).

#[cfg(test)]
mod tests;

use std::str;

/// Most header fields a request head may have; more is a 431.
pub const MAX_HEADERS: usize = 100;

/// Size limits of a request stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Longest request head (request line, header fields, final CRLF); longer is a 431.
    pub max_head: usize,
    /// Longest chunk-size line including extensions.
    pub max_chunk_line: usize,
    /// Longest trailer section.
    pub max_trailers: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_head: 16 * 1024,
            max_chunk_line: 4096,
            max_trailers: 8 * 1024,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

/// How the body of a request is framed (RFC 9112 §6.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyKind {
    /// No Content-Length and no Transfer-Encoding: no body.
    None,
    Length(u64),
    Chunked,
}

/// A parsed and checked request head. Borrows the bytes it was parsed from.
#[derive(Clone, Copy, Debug)]
pub struct RequestHead<'a> {
    pub method: &'a str,
    /// The request-target exactly as sent; see `mesh_proto::http_path::normalize`.
    pub target: &'a str,
    pub version: Version,
    /// The Host header, OWS trimmed (required for HTTP/1.1, at most one).
    pub host: Option<&'a str>,
    pub headers: &'a [httparse::Header<'a>],
    pub body: BodyKind,
}

impl<'a> RequestHead<'a> {
    /// Value of the first header field named `name` (case-insensitive), OWS trimmed.
    pub fn header(&self, name: &str) -> Option<&'a [u8]> {
        self.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| trim_ows(h.value))
    }
}

/// What [`RequestStream::parse`] found at the start of its input.
#[derive(Debug)]
pub enum Step<'a> {
    /// A complete, checked request head, `len` bytes long. The parser now expects its
    /// body (if any) and then the next head.
    Head { head: RequestHead<'a>, len: usize },
    /// `len` (> 0) bytes of the current request's body, chunk framing or trailers.
    Body { len: usize },
    /// More bytes are needed (a head is incomplete, or the input is empty). Nothing was
    /// consumed: call again with these bytes and more.
    Partial,
}

/// Why the stream is not acceptable HTTP/1.x. After an error the parser stays failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    #[error("not an HTTP/1.x request head ({0})")]
    Malformed(httparse::Error),
    #[error("request head larger than the limit")]
    HeadTooLarge,
    #[error("more than {MAX_HEADERS} header fields")]
    TooManyHeaders,
    #[error("bare LF (LF without CR) in the request")]
    BareLf,
    #[error("both Content-Length and Transfer-Encoding")]
    ContentLengthAndTransferEncoding,
    #[error("more than one Content-Length")]
    RepeatedContentLength,
    #[error("Content-Length is not a decimal number")]
    InvalidContentLength,
    #[error("Transfer-Encoding other than a single `chunked`")]
    UnsupportedTransferCoding,
    #[error("Transfer-Encoding in an HTTP/1.0 request")]
    TransferEncodingInHttp10,
    #[error("header name with `_` that reads as Content-Length or Transfer-Encoding")]
    AmbiguousHeaderName,
    #[error("HTTP/1.1 request without Host")]
    MissingHost,
    #[error("more than one Host")]
    RepeatedHost,
    #[error("Host is not valid text")]
    InvalidHost,
    #[error("absolute-form target names another host than Host")]
    HostMismatch,
    #[error("CONNECT is not supported on an inspected port")]
    Connect,
    #[error("invalid chunk size")]
    InvalidChunkSize,
    #[error("chunk size too large")]
    ChunkSizeTooLarge,
    #[error("invalid chunk extension")]
    InvalidChunkExtension,
    #[error("chunk size line too long")]
    ChunkLineTooLong,
    #[error("chunk data not followed by CRLF")]
    MissingChunkCrlf,
    #[error("obs-fold (line folding) in trailers")]
    ObsFold,
    #[error("invalid trailer field")]
    InvalidTrailer,
    #[error("trailer section larger than the limit")]
    TrailersTooLarge,
}

impl HttpError {
    /// The status of the response that refuses the request.
    pub fn status(self) -> u16 {
        match self {
            HttpError::HeadTooLarge | HttpError::TooManyHeaders => 431,
            _ => 400,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Head,
    Length(u64),
    Chunked(Chunk),
    Failed(HttpError),
}

/// Position inside a chunked body (RFC 9112 §7.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chunk {
    /// Reading the hex chunk size; `line` counts the bytes of the size line so far.
    Size {
        value: u64,
        digits: u8,
        line: usize,
    },
    /// Whitespace after the size: only more whitespace or `;` may follow.
    SizeWs {
        value: u64,
        line: usize,
    },
    Ext {
        value: u64,
        line: usize,
        quoted: bool,
        escaped: bool,
    },
    /// CR of the size line seen; LF must follow.
    SizeLf {
        value: u64,
    },
    Data {
        remaining: u64,
    },
    DataCr,
    DataLf,
    /// At the start of a trailer line (or of the CRLF that ends the message).
    TrailerStart {
        total: usize,
    },
    TrailerLine {
        total: usize,
        colon: bool,
    },
    TrailerLineLf {
        total: usize,
    },
    EndLf,
}

impl Chunk {
    /// Framing (a size line, the CRLF after data, trailers), not a chunk's data.
    fn is_framing(self) -> bool {
        !matches!(self, Chunk::Data { .. })
    }
}

/// One connection's request stream, client→server.
#[derive(Clone, Debug)]
pub struct RequestStream {
    state: State,
    limits: Limits,
    requests: u64,
    /// Length of the opaque run the parser entered last (a Content-Length body, a
    /// chunk's data), for [`RequestStream::opaque_run`].
    run: u64,
}

impl Default for RequestStream {
    fn default() -> RequestStream {
        RequestStream::new(Limits::default())
    }
}

impl RequestStream {
    pub fn new(limits: Limits) -> RequestStream {
        RequestStream {
            state: State::Head,
            limits,
            requests: 0,
            run: 0,
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// True between requests: the next byte starts a request head.
    pub fn at_head(&self) -> bool {
        self.state == State::Head
    }

    /// Request heads parsed so far.
    pub fn requests(&self) -> u64 {
        self.requests
    }

    /// How many of the next stream bytes are body content whose values change nothing
    /// the parser decides: the rest of a Content-Length body, or of a chunk's data (its
    /// CRLF, the next size line and trailers are framing, and are not counted). Where
    /// they end is fixed by sequence position alone, so a caller may let them pass in
    /// any order and skip them with [`skip_opaque`](Self::skip_opaque).
    pub fn opaque(&self) -> u64 {
        match self.state {
            State::Length(n) => n,
            State::Chunked(Chunk::Data { remaining }) => remaining,
            _ => 0,
        }
    }

    /// While in opaque bytes: how many of the run (a Content-Length body, a chunk's
    /// data) are behind the parser's position, and how many ahead (as
    /// [`opaque`](Self::opaque)). `None` elsewhere.
    pub fn opaque_run(&self) -> Option<(u64, u64)> {
        let ahead = self.opaque();
        (ahead > 0).then(|| (self.run.saturating_sub(ahead), ahead))
    }

    /// Inside a chunk's data: how many of its bytes are ahead (as
    /// [`opaque`](Self::opaque)); `None` elsewhere, a Content-Length body included.
    /// What follows them is chunk framing (the CRLF, then the next chunk-size line),
    /// which [`framing`](Self::framing) reads after [`skip_opaque`](Self::skip_opaque)
    /// jumped there: a caller may read the framing of a chunked body ahead of bytes
    /// of chunk data it has not received yet.
    pub fn chunk_data(&self) -> Option<u64> {
        match self.state {
            State::Chunked(Chunk::Data { remaining }) => Some(remaining),
            _ => None,
        }
    }

    /// Consumes `n` opaque bytes without seeing them; `n` is clamped to
    /// [`opaque`](Self::opaque).
    pub fn skip_opaque(&mut self, n: u64) {
        let n = n.min(self.opaque());
        self.state = match self.state {
            State::Length(m) if m == n => State::Head,
            State::Length(m) => State::Length(m - n),
            State::Chunked(Chunk::Data { remaining }) if remaining == n => {
                State::Chunked(Chunk::DataCr)
            }
            State::Chunked(Chunk::Data { remaining }) => State::Chunked(Chunk::Data {
                remaining: remaining - n,
            }),
            other => other,
        };
    }

    /// Looks at `input`, the stream bytes not yet consumed, and says what its first bytes
    /// are. `headers` is scratch space for the head's fields (the returned head borrows
    /// it); a caller on the data path keeps it on its stack.
    pub fn parse<'a>(
        &mut self,
        input: &'a [u8],
        headers: &'a mut [httparse::Header<'a>; MAX_HEADERS],
    ) -> Result<Step<'a>, HttpError> {
        match self.state {
            State::Failed(e) => Err(e),
            _ if input.is_empty() => Ok(Step::Partial),
            State::Head => {
                let result = self.parse_head(input, headers);
                if let Err(e) = result {
                    self.state = State::Failed(e);
                }
                result
            }
            _ => self.body(input).map(|len| Step::Body { len }),
        }
    }

    /// Consumes body bytes (and chunk framing, trailers) of the current request from the
    /// start of `input`: how many, 0 when the parser is at a head or `input` is empty. The
    /// same as [`parse`](Self::parse) between heads, without the header scratch space.
    pub fn body(&mut self, input: &[u8]) -> Result<usize, HttpError> {
        let result = match self.state {
            State::Failed(e) => Err(e),
            State::Head => Ok(0),
            _ if input.is_empty() => Ok(0),
            State::Length(remaining) => {
                let len = usize::try_from(remaining)
                    .unwrap_or(usize::MAX)
                    .min(input.len());
                let remaining = remaining - len as u64;
                self.state = if remaining == 0 {
                    State::Head
                } else {
                    State::Length(remaining)
                };
                Ok(len)
            }
            State::Chunked(chunk) => self.parse_chunked(chunk, input, false),
        };
        if let Err(e) = result {
            self.state = State::Failed(e);
        }
        result
    }

    /// Consumes the framing of a chunked body only, from the start of `input`: the CRLF
    /// that ends a chunk's data, chunk-size lines (with extensions), and after the
    /// last chunk the trailer section and its final CRLF; checked as by
    /// [`body`](Self::body). Stops before a chunk's data, at the end of the message
    /// (the next head is not framing) and at the end of `input`. 0 when the parser is
    /// not in chunk framing.
    pub fn framing(&mut self, input: &[u8]) -> Result<usize, HttpError> {
        let result = match self.state {
            State::Failed(e) => Err(e),
            State::Chunked(chunk) if chunk.is_framing() => self.parse_chunked(chunk, input, true),
            _ => Ok(0),
        };
        if let Err(e) = result {
            self.state = State::Failed(e);
        }
        result
    }

    fn parse_head<'a>(
        &mut self,
        input: &'a [u8],
        headers: &'a mut [httparse::Header<'a>; MAX_HEADERS],
    ) -> Result<Step<'a>, HttpError> {
        let mut req = httparse::Request::new(headers);
        let len = match req.parse(input) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => {
                return if input.len() > self.limits.max_head {
                    Err(HttpError::HeadTooLarge)
                } else {
                    Ok(Step::Partial)
                };
            }
            Err(httparse::Error::TooManyHeaders) => return Err(HttpError::TooManyHeaders),
            Err(e) => return Err(HttpError::Malformed(e)),
        };
        if len > self.limits.max_head {
            return Err(HttpError::HeadTooLarge);
        }
        // httparse accepts a bare LF as a line end; servers differ, so refuse it.
        if has_bare_lf(&input[..len]) {
            return Err(HttpError::BareLf);
        }
        let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version)
        else {
            return Err(HttpError::Malformed(httparse::Error::Token));
        };
        let version = if version == 0 {
            Version::Http10
        } else {
            Version::Http11
        };
        let headers: &'a [httparse::Header<'a>] = req.headers;
        let (body, host) = check_fields(method, target, version, headers)?;
        self.state = match body {
            BodyKind::None | BodyKind::Length(0) => State::Head,
            BodyKind::Length(n) => {
                self.run = n;
                State::Length(n)
            }
            BodyKind::Chunked => State::Chunked(Chunk::Size {
                value: 0,
                digits: 0,
                line: 0,
            }),
        };
        self.requests += 1;
        Ok(Step::Head {
            head: RequestHead {
                method,
                target,
                version,
                host,
                headers,
                body,
            },
            len,
        })
    }

    /// Walks chunked framing from `chunk` over `input`, stopping at the end of `input` or
    /// of the message (so that a following head is parsed as a head), and with
    /// `framing_only` where chunk framing ends (see [`framing`](Self::framing)).
    fn parse_chunked(
        &mut self,
        mut chunk: Chunk,
        input: &[u8],
        framing_only: bool,
    ) -> Result<usize, HttpError> {
        use Chunk::*;
        let max_line = self.limits.max_chunk_line;
        let max_trailers = self.limits.max_trailers;
        let mut i = 0;
        while i < input.len() {
            if framing_only && !chunk.is_framing() {
                break;
            }
            if let Data { remaining } = chunk {
                let take = usize::try_from(remaining)
                    .unwrap_or(usize::MAX)
                    .min(input.len() - i);
                i += take;
                let remaining = remaining - take as u64;
                chunk = if remaining == 0 {
                    DataCr
                } else {
                    Data { remaining }
                };
                continue;
            }
            let b = input[i];
            i += 1;
            chunk = match chunk {
                Size {
                    value,
                    digits,
                    line,
                } => {
                    if line + 1 > max_line {
                        return Err(HttpError::ChunkLineTooLong);
                    }
                    let line = line + 1;
                    match (hex_digit(b), digits) {
                        (Some(_), 15) => return Err(HttpError::ChunkSizeTooLarge),
                        (Some(d), _) => Size {
                            value: value << 4 | u64::from(d),
                            digits: digits + 1,
                            line,
                        },
                        (None, 0) => return Err(HttpError::InvalidChunkSize),
                        (None, _) => match b {
                            b';' => Ext {
                                value,
                                line,
                                quoted: false,
                                escaped: false,
                            },
                            b' ' | b'\t' => SizeWs { value, line },
                            b'\r' => SizeLf { value },
                            b'\n' => return Err(HttpError::BareLf),
                            _ => return Err(HttpError::InvalidChunkSize),
                        },
                    }
                }
                SizeWs { value, line } => {
                    if line + 1 > max_line {
                        return Err(HttpError::ChunkLineTooLong);
                    }
                    match b {
                        b' ' | b'\t' => SizeWs {
                            value,
                            line: line + 1,
                        },
                        b';' => Ext {
                            value,
                            line: line + 1,
                            quoted: false,
                            escaped: false,
                        },
                        _ => return Err(HttpError::InvalidChunkSize),
                    }
                }
                Ext {
                    value,
                    line,
                    quoted,
                    escaped,
                } => {
                    if line + 1 > max_line {
                        return Err(HttpError::ChunkLineTooLong);
                    }
                    let line = line + 1;
                    // chunk-ext = *( BWS ";" BWS ext-name [ BWS "=" BWS ext-val ] ),
                    // ext-val = token / quoted-string (RFC 9112 §7.1.1, RFC 9110 §5.6.4).
                    if quoted {
                        if escaped {
                            if !is_qd_text(b) && b != b'"' && b != b'\\' {
                                return Err(HttpError::InvalidChunkExtension);
                            }
                            Ext {
                                value,
                                line,
                                quoted,
                                escaped: false,
                            }
                        } else {
                            match b {
                                b'\\' => Ext {
                                    value,
                                    line,
                                    quoted,
                                    escaped: true,
                                },
                                b'"' => Ext {
                                    value,
                                    line,
                                    quoted: false,
                                    escaped,
                                },
                                b if is_qd_text(b) => Ext {
                                    value,
                                    line,
                                    quoted,
                                    escaped,
                                },
                                _ => return Err(HttpError::InvalidChunkExtension),
                            }
                        }
                    } else {
                        match b {
                            b'\r' => SizeLf { value },
                            b'\n' => return Err(HttpError::BareLf),
                            b'"' => Ext {
                                value,
                                line,
                                quoted: true,
                                escaped,
                            },
                            b';' | b'=' | b' ' | b'\t' => Ext {
                                value,
                                line,
                                quoted,
                                escaped,
                            },
                            b if is_tchar(b) => Ext {
                                value,
                                line,
                                quoted,
                                escaped,
                            },
                            _ => return Err(HttpError::InvalidChunkExtension),
                        }
                    }
                }
                SizeLf { value } => match (b, value) {
                    (b'\n', 0) => TrailerStart { total: 0 },
                    (b'\n', remaining) => {
                        self.run = remaining;
                        Data { remaining }
                    }
                    _ => return Err(HttpError::InvalidChunkSize),
                },
                Data { .. } => unreachable!("handled above"),
                DataCr => match b {
                    b'\r' => DataLf,
                    _ => return Err(HttpError::MissingChunkCrlf),
                },
                DataLf => match b {
                    b'\n' => Size {
                        value: 0,
                        digits: 0,
                        line: 0,
                    },
                    _ => return Err(HttpError::MissingChunkCrlf),
                },
                TrailerStart { total } => match b {
                    b'\r' => EndLf,
                    b'\n' => return Err(HttpError::BareLf),
                    b' ' | b'\t' => return Err(HttpError::ObsFold),
                    b if is_tchar(b) => TrailerLine {
                        total: trailer_total(total, max_trailers)?,
                        colon: false,
                    },
                    _ => return Err(HttpError::InvalidTrailer),
                },
                TrailerLine { total, colon } => {
                    let total = trailer_total(total, max_trailers)?;
                    match b {
                        b'\r' if colon => TrailerLineLf { total },
                        b'\n' => return Err(HttpError::BareLf),
                        b':' => TrailerLine { total, colon: true },
                        b if colon && (b == b'\t' || b >= 0x20) && b != 0x7f => {
                            TrailerLine { total, colon }
                        }
                        b if !colon && is_tchar(b) => TrailerLine { total, colon },
                        _ => return Err(HttpError::InvalidTrailer),
                    }
                }
                TrailerLineLf { total } => match b {
                    b'\n' => TrailerStart { total },
                    _ => return Err(HttpError::InvalidTrailer),
                },
                EndLf => match b {
                    b'\n' => {
                        self.state = State::Head;
                        return Ok(i);
                    }
                    _ => return Err(HttpError::InvalidTrailer),
                },
            };
        }
        self.state = State::Chunked(chunk);
        Ok(i)
    }
}

fn trailer_total(total: usize, max: usize) -> Result<usize, HttpError> {
    if total + 1 > max {
        Err(HttpError::TrailersTooLarge)
    } else {
        Ok(total + 1)
    }
}

/// Checks the header fields of a parsed head (see the module docs) and returns the body
/// framing and the host.
fn check_fields<'a>(
    method: &str,
    target: &str,
    version: Version,
    headers: &'a [httparse::Header<'a>],
) -> Result<(BodyKind, Option<&'a str>), HttpError> {
    if method == "CONNECT" {
        return Err(HttpError::Connect);
    }
    let mut content_length = None;
    let mut chunked = false;
    let mut host = None;
    for h in headers {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            if content_length.is_some() {
                return Err(HttpError::RepeatedContentLength);
            }
            content_length = Some(parse_content_length(trim_ows(h.value))?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            if chunked || !trim_ows(h.value).eq_ignore_ascii_case(b"chunked") {
                return Err(HttpError::UnsupportedTransferCoding);
            }
            chunked = true;
        } else if name.eq_ignore_ascii_case("host") {
            if host.is_some() {
                return Err(HttpError::RepeatedHost);
            }
            let value = str::from_utf8(trim_ows(h.value)).map_err(|_| HttpError::InvalidHost)?;
            host = Some(value);
        } else if name.eq_ignore_ascii_case("content_length")
            || name.eq_ignore_ascii_case("transfer_encoding")
        {
            return Err(HttpError::AmbiguousHeaderName);
        }
    }
    if chunked && content_length.is_some() {
        return Err(HttpError::ContentLengthAndTransferEncoding);
    }
    if chunked && version == Version::Http10 {
        return Err(HttpError::TransferEncodingInHttp10);
    }
    if host.is_none() && version == Version::Http11 {
        return Err(HttpError::MissingHost);
    }
    if let (Some(authority), Some(host)) = (absolute_form_authority(target), host) {
        if !authority.eq_ignore_ascii_case(host) {
            return Err(HttpError::HostMismatch);
        }
    }
    let body = match (chunked, content_length) {
        (true, _) => BodyKind::Chunked,
        (false, Some(n)) => BodyKind::Length(n),
        (false, None) => BodyKind::None,
    };
    Ok((body, host))
}

/// `1*DIGIT`, at most 18 digits (so it fits in u64 with room).
fn parse_content_length(v: &[u8]) -> Result<u64, HttpError> {
    if v.is_empty() || v.len() > 18 || !v.iter().all(u8::is_ascii_digit) {
        return Err(HttpError::InvalidContentLength);
    }
    Ok(v.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

/// The authority of an `http://` or `https://` absolute-form target.
fn absolute_form_authority(target: &str) -> Option<&str> {
    let b = target.as_bytes();
    // Slicing after the ASCII prefix is on a char boundary.
    let rest = if b.len() >= 7 && b[..7].eq_ignore_ascii_case(b"http://") {
        &target[7..]
    } else if b.len() >= 8 && b[..8].eq_ignore_ascii_case(b"https://") {
        &target[8..]
    } else {
        return None;
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    Some(&rest[..end])
}

fn has_bare_lf(bytes: &[u8]) -> bool {
    bytes
        .iter()
        .enumerate()
        .any(|(i, &b)| b == b'\n' && (i == 0 || bytes[i - 1] != b'\r'))
}

fn trim_ows(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|&b| b != b' ' && b != b'\t')
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|&b| b != b' ' && b != b'\t')
        .map_or(start, |p| p + 1);
    &v[start..end]
}

fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// RFC 9110 §5.6.2.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// RFC 9110 §5.6.4: HTAB, SP and visible characters other than `"` and `\`, obs-text.
fn is_qd_text(b: u8) -> bool {
    b == b'\t' || b == b' ' || (0x21..=0x7e).contains(&b) && b != b'"' && b != b'\\' || b >= 0x80
}
