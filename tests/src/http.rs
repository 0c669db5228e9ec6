//! HTTP and TCP tools for policy and layer-7 tests, run inside hosts (`httptool.py`):
//! a server that records every request and every byte it receives (so a test can prove
//! that a refused request never reached it), a client that sends several requests on
//! one kept-alive connection, a raw-bytes client, a long-lived TCP connection whose
//! end is reported, and curl with arbitrary arguments.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::Value;

use crate::host::Host;
use crate::traffic::url;

const TOOL: &str = include_str!("httptool.py");

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A request as the recording server saw it.
#[derive(Clone, Debug, Deserialize)]
pub struct SeenRequest {
    pub method: String,
    pub path: String,
    pub client_port: u16,
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
    pub body_len: u64,
    pub sha256: String,
}

/// A recording HTTP/1.1 server started by [`Host::serve_recording`].
pub struct RecordingServer {
    port: u16,
    dir: PathBuf,
}

impl RecordingServer {
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Every request the server parsed so far, in order.
    pub fn requests(&self) -> Result<Vec<SeenRequest>> {
        let p = self.dir.join(format!("requests-{}.jsonl", self.port));
        let text = std::fs::read_to_string(&p).unwrap_or_default();
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).with_context(|| format!("{}: {l:?}", p.display())))
            .collect()
    }

    /// Every byte the server read from any connection so far.
    pub fn raw(&self) -> Vec<u8> {
        std::fs::read(self.dir.join(format!("raw-{}.bin", self.port))).unwrap_or_default()
    }

    /// Whether any request with this method and path (as sent) reached the server.
    pub fn saw(&self, method: &str, path: &str) -> Result<bool> {
        Ok(self
            .requests()?
            .iter()
            .any(|r| r.method == method && r.path == path))
    }
}

/// One response on a kept-alive connection ([`Host::http_session`]).
#[derive(Clone, Debug, Deserialize)]
pub struct SessionResponse {
    pub status: u16,
    pub body: String,
    pub close: bool,
}

/// What [`Host::http_session`] saw: the responses in order, and how the connection
/// ended (`done`: every request answered; `closed`, `reset`, `timeout`, `open`: the
/// server announced `connection: close` but kept the connection open).
#[derive(Clone, Debug)]
pub struct Session {
    pub responses: Vec<SessionResponse>,
    pub end: String,
}

/// What [`Host::send_raw`] got back.
#[derive(Clone, Debug, Deserialize)]
pub struct RawReply {
    pub received: String,
    pub end: String,
}

/// A curl result: status (0 when curl got no response), body, curl's exit code.
#[derive(Clone, Debug)]
pub struct Curl {
    pub status: u16,
    pub body: Vec<u8>,
    pub code: Option<i32>,
    pub stderr: String,
}

impl Host {
    /// `httptool.py` in this host's directory (written on first use).
    fn httptool(&self) -> Result<(PathBuf, PathBuf)> {
        let tool = self.dir().join("httptool.py");
        if !tool.exists() {
            std::fs::write(&tool, TOOL).with_context(|| format!("write {}", tool.display()))?;
        }
        Ok((crate::traffic::which("python3")?, tool))
    }

    /// Starts the recording HTTP/1.1 server on `[::]:port` (dual-stack, keep-alive);
    /// returns once the port listens.
    pub fn serve_recording(&self, port: u16) -> Result<RecordingServer> {
        let (python, tool) = self.httptool()?;
        let tool_s = tool.to_str().context("path is not UTF-8")?;
        let dir = self.dir().join(format!("http-{port}"));
        std::fs::create_dir_all(&dir)?;
        let dir_s = dir.to_str().context("path is not UTF-8")?;
        let label = format!("recording-{port}");
        self.spawn(
            &label,
            &python,
            &[tool_s, "serve", &port.to_string(), dir_s],
        )?;
        self.wait_background_output(&label, "listening")?;
        self.wait_listening("tcp", port)?;
        Ok(RecordingServer { port, dir })
    }

    /// Starts a TCP echo server on `[::]:port`; returns once it listens.
    pub fn serve_tcp_echo(&self, port: u16) -> Result<()> {
        let (python, tool) = self.httptool()?;
        let tool_s = tool.to_str().context("path is not UTF-8")?;
        let label = format!("tcp-echo-{port}");
        self.spawn(&label, &python, &[tool_s, "echo-serve", &port.to_string()])?;
        self.wait_background_output(&label, "listening")?;
        self.wait_listening("tcp", port)
    }

    /// Opens a long-lived TCP connection to the echo server at `addr:port` in the
    /// background (labelled `label`), returning once one echo came back. The client
    /// keeps exchanging lines and prints `ended: ...` once the connection is reset or
    /// closed: wait for that with [`Host::wait_background_output`].
    pub fn hold_tcp(&self, label: &str, addr: IpAddr, port: u16) -> Result<()> {
        let (python, tool) = self.httptool()?;
        let tool_s = tool.to_str().context("path is not UTF-8")?;
        self.spawn(
            label,
            &python,
            &[tool_s, "hold", &addr.to_string(), &port.to_string()],
        )?;
        self.wait_background_output(label, "connected")
    }

    /// Starts, in the background (labelled `label`), a client that sends `GET
    /// /api/first` to `addr:port` and waits for the answer (returns then); once
    /// [`Host::trigger`] is called with the same label, it sends `GET /api/second` on
    /// the same connection and prints `second: <status>|closed|reset|timeout`.
    pub fn reuse_later(&self, label: &str, addr: IpAddr, port: u16) -> Result<()> {
        let (python, tool) = self.httptool()?;
        let tool_s = tool.to_str().context("path is not UTF-8")?;
        let trigger = self.dir().join(format!("{label}.go"));
        let trigger = trigger.to_str().context("path is not UTF-8")?;
        self.spawn(
            label,
            &python,
            &[
                tool_s,
                "reuse",
                &addr.to_string(),
                &port.to_string(),
                trigger,
            ],
        )?;
        self.wait_background_output(label, "first ")
    }

    /// Lets the background client `label` of [`Host::reuse_later`] go on.
    pub fn trigger(&self, label: &str) -> Result<()> {
        let p = self.dir().join(format!("{label}.go"));
        std::fs::write(&p, b"").with_context(|| format!("write {}", p.display()))
    }

    /// Starts, in the background (labelled `label`), an HTTP upload to `addr:port/path`
    /// that announces a 1 GB body and sends 1 KiB of it every 100 ms, returning once the
    /// head and the first KiB went out. It prints `ended: ...` once the connection is
    /// reset: wait for that with [`Host::wait_background_output`].
    pub fn trickle_upload(&self, label: &str, addr: IpAddr, port: u16, path: &str) -> Result<()> {
        let (python, tool) = self.httptool()?;
        let tool_s = tool.to_str().context("path is not UTF-8")?;
        self.spawn(
            label,
            &python,
            &[
                tool_s,
                "trickle",
                &addr.to_string(),
                &port.to_string(),
                path,
            ],
        )?;
        self.wait_background_output(label, "connected")
    }

    /// Sends `requests` on one TCP connection, each after the previous one's response.
    /// A request is `"METHOD PATH"` optionally followed by `|Header: value` fields.
    pub fn http_session(&self, addr: IpAddr, port: u16, requests: &[&str]) -> Result<Session> {
        let (python, tool) = self.httptool()?;
        let python = python.to_str().context("path is not UTF-8")?.to_string();
        let tool_s = tool.to_str().context("path is not UTF-8")?;
        let (a, p) = (addr.to_string(), port.to_string());
        let mut args = vec![tool_s, "session", &a, &p, "10"];
        args.extend_from_slice(requests);
        let out = self.exec(&python, &args)?.check()?;
        let mut responses = Vec::new();
        let mut end = None;
        for line in out.stdout_str().lines() {
            let v: Value = serde_json::from_str(line).with_context(|| format!("{line:?}"))?;
            if let Some(e) = v.get("end") {
                end = e.as_str().map(str::to_string);
            } else {
                responses.push(serde_json::from_value(v)?);
            }
        }
        let end = end.with_context(|| format!("the session printed no end: {out:?}"))?;
        Ok(Session { responses, end })
    }

    /// Connects to `addr:port`, sends `data`, and reads until the connection ends
    /// (at most `limit`).
    pub fn send_raw(
        &self,
        addr: IpAddr,
        port: u16,
        data: &[u8],
        limit: Duration,
    ) -> Result<RawReply> {
        self.send_raw_pieces(addr, port, &[data], limit)
    }

    /// [`Host::send_raw`] in pieces: each goes out as its own segment once the previous
    /// one was acknowledged (by the server, or by meshd holding it).
    pub fn send_raw_pieces(
        &self,
        addr: IpAddr,
        port: u16,
        pieces: &[&[u8]],
        limit: Duration,
    ) -> Result<RawReply> {
        let (python, tool) = self.httptool()?;
        let python = python.to_str().context("path is not UTF-8")?.to_string();
        let tool_s = tool.to_str().context("path is not UTF-8")?;
        let hex: Vec<String> = pieces
            .iter()
            .map(|p| p.iter().map(|b| format!("{b:02x}")).collect())
            .collect();
        let (a, p, t) = (
            addr.to_string(),
            port.to_string(),
            format!("{}", limit.as_secs_f64()),
        );
        let mut args = vec![tool_s, "raw", &a, &p, &t];
        args.extend(hex.iter().map(String::as_str));
        let out = self
            .exec_timeout(&python, &args, limit + Duration::from_secs(5))?
            .check()?;
        serde_json::from_slice(&out.stdout).with_context(|| format!("{out:?}"))
    }

    /// `curl -sS -g --max-time 10 <extra...> http://addr:port<path>`; never fails on an
    /// HTTP status or a refused connection (look at `status` and `code`).
    pub fn curl(&self, addr: IpAddr, port: u16, path: &str, extra: &[&str]) -> Result<Curl> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let body_path = self.dir().join(format!("curl-out-{n}"));
        let body_s = body_path.to_str().context("path is not UTF-8")?;
        let u = url(addr, port, path);
        let mut args = vec![
            "-sS",
            "-g",
            "--max-time",
            "20",
            "-o",
            body_s,
            "-w",
            "%{http_code}",
        ];
        args.extend_from_slice(extra);
        args.push(&u);
        let out = self.exec_timeout("curl", &args, Duration::from_secs(30))?;
        let status = out.stdout_str().trim().parse().unwrap_or(0);
        let body = std::fs::read(&body_path).unwrap_or_default();
        let _ = std::fs::remove_file(&body_path);
        if out.code == Some(137) {
            bail!("{out}");
        }
        Ok(Curl {
            status,
            body,
            code: out.code,
            stderr: out.stderr_str(),
        })
    }
}
