//! Traffic helpers: real servers and clients run inside hosts.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::host::Host;
use crate::process::Output;
use crate::wait;

static BODY_COUNTER: AtomicU32 = AtomicU32::new(0);

/// How long "eventually reachable" checks retry (a first handshake included).
pub const REACH_TIMEOUT: Duration = Duration::from_secs(15);

/// An HTTP response as curl saw it.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub body: Vec<u8>,
}

/// `http://<addr>:<port><path>`, IPv6 bracketed.
pub fn url(addr: IpAddr, port: u16, path: &str) -> String {
    format!("http://{}{path}", SocketAddr::new(addr, port))
}

impl Host {
    /// Writes `www/<name>` (served by [`Host::serve_http`]).
    pub fn write_www(&self, name: &str, data: &[u8]) -> Result<()> {
        let p = self.dir().join("www").join(name);
        std::fs::write(&p, data).with_context(|| format!("write {}", p.display()))
    }

    /// Starts a real HTTP server (`python3 -m http.server`, dual-stack on `::`) serving
    /// this host's `www/`; returns once the port listens.
    pub fn serve_http(&self, port: u16) -> Result<()> {
        let python = which("python3")?;
        let port_s = port.to_string();
        self.spawn(
            &format!("http-{port}"),
            &python,
            &[
                "-m",
                "http.server",
                &port_s,
                "--bind",
                "::",
                "--directory",
                "www",
            ],
        )?;
        self.wait_listening("tcp", port)
    }

    /// Waits until something listens on `port` (`proto` is "tcp" or "udp").
    pub fn wait_listening(&self, proto: &str, port: u16) -> Result<()> {
        let flag = if proto == "udp" { "-Hlun" } else { "-Hltn" };
        let filter = format!("sport = :{port}");
        wait::until(
            &format!("{proto} port {port} to listen in {}", self.name()),
            Duration::from_secs(10),
            || {
                let out = self.run("ss", &[flag, &filter])?;
                Ok((!out.stdout_str().trim().is_empty()).then_some(()))
            },
        )
    }

    /// `curl` from this host to `addr:port/path` (one attempt, 10 s limit). Any HTTP
    /// status is `Ok`; no response at all is an error with curl's message.
    pub fn http_get_addr(&self, addr: IpAddr, port: u16, path: &str) -> Result<HttpResponse> {
        self.http_get_limit(addr, port, path, Duration::from_secs(10))
    }

    pub fn http_get_limit(
        &self,
        addr: IpAddr,
        port: u16,
        path: &str,
        limit: Duration,
    ) -> Result<HttpResponse> {
        let n = BODY_COUNTER.fetch_add(1, Ordering::Relaxed);
        let body_path = self.dir().join(format!("curl-body-{n}"));
        let body_s = body_path.to_str().context("path is not UTF-8")?;
        let max = format!("{}", limit.as_secs_f64());
        let u = url(addr, port, path);
        let out = self.exec_timeout(
            "curl",
            &[
                "-sS",
                "-g",
                "--max-time",
                &max,
                "-o",
                body_s,
                "-w",
                "%{http_code}",
                &u,
            ],
            limit + Duration::from_secs(5),
        )?;
        if !out.success() {
            bail!("{out} (from {})", self.name());
        }
        let status: u16 = out
            .stdout_str()
            .trim()
            .parse()
            .with_context(|| format!("curl printed no status: {out:?}"))?;
        let body = std::fs::read(&body_path).unwrap_or_default();
        let _ = std::fs::remove_file(&body_path);
        Ok(HttpResponse { status, body })
    }

    /// `curl` to `to`'s IPv4 overlay address.
    pub fn http_get(&self, to: &Host, port: u16, path: &str) -> Result<HttpResponse> {
        self.http_get_addr(to.overlay_v4(), port, path)
    }

    /// Retries [`Host::http_get_addr`] until it gets a response (first contact may wait
    /// for a handshake).
    pub fn http_get_eventually(&self, addr: IpAddr, port: u16, path: &str) -> Result<HttpResponse> {
        wait::retry(
            &format!("{} to get {}", self.name(), url(addr, port, path)),
            REACH_TIMEOUT,
            || self.http_get_limit(addr, port, path, Duration::from_secs(3)),
        )
    }

    /// One `ping -c <count>` run (each reply waited for at most 1 s).
    pub fn ping_once(&self, addr: IpAddr, count: u32) -> Result<Output> {
        let c = count.to_string();
        let a = addr.to_string();
        self.exec("ping", &["-n", "-c", &c, "-i", "0.2", "-W", "1", &a])
    }

    /// ICMP echo to `addr` succeeds (retried up to [`REACH_TIMEOUT`]).
    pub fn ping(&self, addr: IpAddr) -> Result<()> {
        wait::retry(
            &format!("{} to ping {addr}", self.name()),
            REACH_TIMEOUT,
            || self.ping_once(addr, 1)?.check().map(|_| ()),
        )
    }

    /// Starts a UDP echo server on `[::]:port` (dual-stack); returns once it listens.
    pub fn serve_udp_echo(&self, port: u16) -> Result<()> {
        let tool = self.bins_testtool();
        let bind = format!("[::]:{port}");
        self.spawn(&format!("udp-echo-{port}"), &tool, &["udp-echo", &bind])?;
        self.wait_background_output(&format!("udp-echo-{port}"), "listening")
    }

    /// One UDP datagram to `addr:port` comes back unchanged (the tool retries a few
    /// times within a second each; the whole check retries up to [`REACH_TIMEOUT`]).
    pub fn udp_echo(&self, addr: IpAddr, port: u16) -> Result<()> {
        let tool = self.bins_testtool();
        let target = SocketAddr::new(addr, port).to_string();
        let tool_s = tool.to_str().context("path is not UTF-8")?;
        wait::retry(
            &format!("{} to get a UDP echo from {target}", self.name()),
            REACH_TIMEOUT,
            || {
                self.exec(tool_s, &["udp-ping", &target, "3"])?
                    .check()
                    .map(|_| ())
            },
        )
    }

    /// One UDP echo attempt (3 tries of 1 s), for checks that expect no answer.
    pub fn udp_echo_once(&self, addr: IpAddr, port: u16) -> Result<Output> {
        self.udp_echo_from(addr, port, 0)
    }

    /// [`Host::udp_echo_once`] from UDP port `source` of this host (0: an ephemeral
    /// one): one flow however often it is repeated, as a client that keeps its socket.
    pub fn udp_echo_from(&self, addr: IpAddr, port: u16, source: u16) -> Result<Output> {
        let tool = self.bins_testtool();
        let tool_s = tool.to_str().context("path is not UTF-8")?;
        let target = SocketAddr::new(addr, port).to_string();
        self.exec(tool_s, &["udp-ping", &target, "3", &source.to_string()])
    }

    /// Sends `count` random datagrams (seeded, 1–1400 bytes) to `to` from this host.
    pub fn send_garbage(&self, to: SocketAddr, count: u32, seed: u64) -> Result<()> {
        let tool = self.bins_testtool();
        let tool_s = tool.to_str().context("path is not UTF-8")?;
        self.run(
            tool_s,
            &[
                "udp-garbage",
                &to.to_string(),
                &count.to_string(),
                &seed.to_string(),
            ],
        )
        .map(|_| ())
    }

    /// Sends `count` UDP datagrams of zero bytes to `to` from this host.
    pub fn send_empty_datagrams(&self, to: SocketAddr, count: u32) -> Result<()> {
        let tool = self.bins_testtool();
        let tool_s = tool.to_str().context("path is not UTF-8")?;
        self.run(tool_s, &["udp-empty", &to.to_string(), &count.to_string()])
            .map(|_| ())
    }
}

/// `python3`'s full path (pyenv shims included), so it runs the same inside a host.
pub(crate) fn which(tool: &str) -> Result<std::path::PathBuf> {
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(tool))
                .find(|p| p.is_file())
        })
        .with_context(|| format!("{tool} not found in PATH"))
}
