//! Bulk transfers for the fault tests and the soak: a small HTTP/1.1 server
//! (`mesh-testtool transfer-serve`) that serves files and hashes what is uploaded, and
//! curl-driven uploads and downloads whose bytes are checked by SHA-256.
//!
//! The server, one thread per connection, keep-alive:
//! - `GET /files/<name>`: the file `<dir>/<name>` (Content-Length, streamed);
//! - any other `GET` or `HEAD`: `200` with body `ok <path>\n`;
//! - `POST`/`PUT` with a Content-Length or chunked body: reads it all (answering
//!   `Expect: 100-continue` first) and answers `{"len": N, "sha256": "<hex>"}`.
//!
//! It does not parse what it does not need; it is a test peer, not a web server.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::host::Host;
use crate::traffic::url;

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of `data`, hex.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// `n` bytes from a seed (xorshift64*): reproducible test data without /dev/urandom.
pub fn pattern(n: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(n);
    out
}

/// Runs the server on `[::]:port` (dual-stack) until killed; prints `listening`.
pub fn serve(port: u16, dir: &Path) -> Result<()> {
    let sock = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None)?;
    sock.set_only_v6(false)?;
    sock.set_reuse_address(true)?;
    let addr: SocketAddr = SocketAddr::new(IpAddr::from([0u16; 8]), port);
    sock.bind(&addr.into())
        .with_context(|| format!("bind {addr}"))?;
    sock.listen(128)?;
    let listener: TcpListener = sock.into();
    println!("listening on {addr}");
    let _ = std::io::stdout().flush();
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let dir = dir.to_path_buf();
        spawn(move || {
            let _ = connection(conn, &dir);
        });
    }
    Ok(())
}

#[allow(clippy::disallowed_methods)] // a server thread per connection (I/O tool).
fn spawn(f: impl FnOnce() + Send + 'static) {
    std::thread::spawn(f);
}

/// One connection: requests until the client closes or asks to.
fn connection(conn: TcpStream, dir: &Path) -> Result<()> {
    // A peer gone for good (a refused or cut connection) must not pin a thread forever.
    conn.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut out = conn.try_clone()?;
    let mut r = BufReader::with_capacity(1 << 16, conn);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
            bail!("bad request line {line:?}");
        };
        let (method, target) = (method.to_string(), target.to_string());
        let (mut length, mut chunked, mut close, mut expect) = (0u64, false, false, false);
        loop {
            let mut h = String::new();
            if r.read_line(&mut h)? == 0 {
                return Ok(());
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (name, value) = h.split_once(':').unwrap_or((h, ""));
            let value = value.trim();
            match name.to_ascii_lowercase().as_str() {
                "content-length" => length = value.parse().context("content-length")?,
                "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
                "connection" => close = value.eq_ignore_ascii_case("close"),
                "expect" => expect = value.eq_ignore_ascii_case("100-continue"),
                _ => {}
            }
        }
        if expect {
            out.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        let mut hash = Sha256::new();
        let mut len = 0u64;
        if chunked {
            loop {
                let mut size = String::new();
                r.read_line(&mut size)?;
                let size = size.trim().split(';').next().unwrap_or("");
                let n = u64::from_str_radix(size, 16).context("chunk size")?;
                if n == 0 {
                    // Trailers, then the empty line.
                    loop {
                        let mut t = String::new();
                        if r.read_line(&mut t)? == 0 || t.trim_end().is_empty() {
                            break;
                        }
                    }
                    break;
                }
                len += copy_hashed(&mut r, n, &mut hash)?;
                let mut crlf = [0u8; 2];
                r.read_exact(&mut crlf)?;
            }
        } else {
            len = copy_hashed(&mut r, length, &mut hash)?;
            if len < length {
                return Ok(());
            }
        }
        let conn_hdr = if close { "connection: close\r\n" } else { "" };
        if method == "POST" || method == "PUT" {
            let body = format!(
                "{{\"len\": {len}, \"sha256\": \"{}\"}}\n",
                hex(&hash.finalize())
            );
            write!(
                out,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{conn_hdr}\r\n{body}",
                body.len()
            )?;
        } else if let Some(name) = target.strip_prefix("/files/") {
            match std::fs::File::open(dir.join(name.replace('/', "_"))) {
                Ok(mut f) => {
                    let size = f.metadata()?.len();
                    write!(
                        out,
                        "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: {size}\r\n{conn_hdr}\r\n"
                    )?;
                    if method != "HEAD" {
                        std::io::copy(&mut f, &mut out)?;
                    }
                }
                Err(_) => {
                    write!(
                        out,
                        "HTTP/1.1 404 Not Found\r\ncontent-length: 10\r\n{conn_hdr}\r\nnot found\n"
                    )?;
                }
            }
        } else {
            let body = format!("ok {target}\n");
            write!(
                out,
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n{conn_hdr}\r\n",
                body.len()
            )?;
            if method != "HEAD" {
                out.write_all(body.as_bytes())?;
            }
        }
        out.flush()?;
        if close {
            return Ok(());
        }
    }
}

/// Reads `n` bytes from `r` into `hash`; returns how many came before the end.
fn copy_hashed(r: &mut impl Read, n: u64, hash: &mut Sha256) -> Result<u64> {
    let mut buf = vec![0u8; 1 << 16];
    let mut left = n;
    while left > 0 {
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let got = r.read(&mut buf[..want])?;
        if got == 0 {
            break;
        }
        hash.update(&buf[..got]);
        left -= got as u64;
    }
    Ok(n - left)
}

/// How a transfer ended.
#[derive(Clone, Debug)]
pub struct Transfer {
    /// HTTP status (0: no response).
    pub status: u16,
    /// curl's exit code (28: its time limit).
    pub code: Option<i32>,
    /// Bytes that arrived (the body received, or the length the server counted).
    pub len: u64,
    /// SHA-256 of what arrived, hex.
    pub sha256: String,
    pub elapsed: Duration,
    pub stderr: String,
}

impl Transfer {
    /// Whether `data` arrived whole: status 200, same length and hash.
    pub fn intact(&self, data_len: usize, sha256: &str) -> bool {
        self.status == 200 && self.len == data_len as u64 && self.sha256 == sha256
    }
}

static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

fn scratch(host: &Host, what: &str) -> PathBuf {
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    host.dir().join(format!("{what}-{n}"))
}

#[allow(clippy::disallowed_methods)] // measuring how long a transfer took (not a timed assertion).
fn clock() -> Instant {
    Instant::now()
}

impl Host {
    /// Starts the transfer server (see the module docs) on `[::]:port`, serving the
    /// files of this host's `www/` under `/files/`; returns once it listens.
    pub fn serve_transfers(&self, port: u16) -> Result<()> {
        let tool = self.bins_testtool();
        let www = self.dir().join("www");
        let www = www.to_str().context("path is not UTF-8")?;
        let label = format!("transfer-{port}");
        self.spawn(&label, &tool, &["transfer-serve", &port.to_string(), www])?;
        self.wait_background_output(&label, "listening")?;
        self.wait_listening("tcp", port)
    }

    /// POSTs `data` (written to a file first) to `addr:port/path` with curl, at most
    /// `limit`; `extra` are more curl arguments (e.g. `-H`, `Transfer-Encoding:
    /// chunked`). The length and hash are the server's count of what it read.
    pub fn upload(
        &self,
        addr: IpAddr,
        port: u16,
        path: &str,
        data: &[u8],
        limit: Duration,
        extra: &[&str],
    ) -> Result<Transfer> {
        let file = scratch(self, "upload");
        std::fs::write(&file, data)?;
        let at = format!("@{}", file.display());
        let mut args = vec!["-X", "POST", "--data-binary", &at, "-H", "Expect:"];
        args.extend_from_slice(extra);
        let t = self.curl_transfer(addr, port, path, limit, &args);
        let _ = std::fs::remove_file(&file);
        let (mut t, body) = t?;
        if t.status == 200 {
            let v: serde_json::Value = serde_json::from_slice(&body)
                .with_context(|| format!("upload reply {:?}", String::from_utf8_lossy(&body)))?;
            t.len = v["len"].as_u64().unwrap_or(0);
            t.sha256 = v["sha256"].as_str().unwrap_or("").to_string();
        }
        Ok(t)
    }

    /// GETs `addr:port/path` with curl, at most `limit` (`extra`: more curl
    /// arguments); the length and hash are of the body received.
    pub fn download(
        &self,
        addr: IpAddr,
        port: u16,
        path: &str,
        limit: Duration,
        extra: &[&str],
    ) -> Result<Transfer> {
        let (mut t, body) = self.curl_transfer(addr, port, path, limit, extra)?;
        t.len = body.len() as u64;
        t.sha256 = sha256_hex(&body);
        Ok(t)
    }

    fn curl_transfer(
        &self,
        addr: IpAddr,
        port: u16,
        path: &str,
        limit: Duration,
        extra: &[&str],
    ) -> Result<(Transfer, Vec<u8>)> {
        let out_file = scratch(self, "body");
        let out_s = out_file.to_str().context("path is not UTF-8")?.to_string();
        let max = format!("{}", limit.as_secs_f64());
        let u = url(addr, port, path);
        let mut args = vec![
            "-sS",
            "-g",
            "--max-time",
            &max,
            "-o",
            &out_s,
            "-w",
            "%{http_code}",
        ];
        args.extend_from_slice(extra);
        args.push(&u);
        let start = clock();
        let out = self.exec_timeout("curl", &args, limit + Duration::from_secs(5))?;
        let elapsed = clock().duration_since(start);
        let body = std::fs::read(&out_file).unwrap_or_default();
        let _ = std::fs::remove_file(&out_file);
        if out.code == Some(137) {
            bail!("{out}");
        }
        Ok((
            Transfer {
                status: out.stdout_str().trim().parse().unwrap_or(0),
                code: out.code,
                len: 0,
                sha256: String::new(),
                elapsed,
                stderr: out.stderr_str(),
            },
            body,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_reproducible_and_not_constant() {
        assert_eq!(pattern(1000, 5), pattern(1000, 5));
        assert_ne!(pattern(1000, 5), pattern(1000, 6));
        assert_eq!(pattern(13, 5), pattern(1000, 5)[..13]);
        let p = pattern(1 << 16, 9);
        let zeros = p.iter().filter(|b| **b == 0).count();
        assert!(zeros < 600, "{zeros} zero bytes of 65536");
    }
}
