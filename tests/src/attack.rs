//! Helpers for tests that attack a host from around meshd: a machine on the underlay
//! with no key that routes the overlay to a host, UDP sinks that record what reaches
//! them, and the host filter's tables.
//!
//! An attacker is a plain namespace on the underlay bridge ([`Mesh::attacker`]); its
//! routes point only at hosts of the same test ([`Host::route_via`]), never a default
//! route.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};

use crate::host::Host;
use crate::mesh::{lock, Mesh, OVERLAY_V4, OVERLAY_V6};
use crate::process::Output;
use crate::wait;

impl Mesh {
    /// A machine on the underlay with no certificate, key or meshd: a namespace on the
    /// underlay bridge with an underlay address (v4 and v6), and no route into the
    /// overlay until [`Host::route_via`] adds one.
    pub fn attacker(&mut self, name: &str) -> Result<Host> {
        self.host(name).without_meshd().up()
    }
}

impl Host {
    /// Routes `dst` (an address or prefix of the overlay) via `gateway`'s underlay
    /// address of the same family: what a machine on the underlay does to send
    /// plaintext to a host's overlay addresses.
    pub fn route_via(&self, dst: &str, gateway: &Host) -> Result<()> {
        let v6 = dst.contains(':');
        let via = if v6 {
            gateway.underlay_v6()
        } else {
            gateway.underlay_v4()
        };
        let family = if v6 { "-6" } else { "-4" };
        self.netns()
            .ip(&[family, "route", "add", dst, "via", &via.to_string()])
    }

    /// Routes both overlay prefixes via `gateway` ([`Host::route_via`]).
    pub fn route_overlay_via(&self, gateway: &Host) -> Result<()> {
        self.route_via(OVERLAY_V4, gateway)?;
        self.route_via(OVERLAY_V6, gateway)
    }

    /// Starts a UDP sink on `[::]:port` (dual-stack) that records every datagram it
    /// receives (`from <address> <payload>`); returns once it listens.
    pub fn serve_udp_sink(&self, port: u16) -> Result<()> {
        let tool = self.bins_testtool();
        let label = format!("udp-sink-{port}");
        self.spawn(&label, &tool, &["udp-sink", &format!("[::]:{port}")])?;
        self.wait_background_output(&label, "listening")
    }

    /// What the UDP sink on `port` received so far, one `from <address> <payload>`
    /// line per datagram.
    pub fn udp_sink_received(&self, port: u16) -> Result<Vec<String>> {
        let label = format!("udp-sink-{port}");
        let bgs = lock(&self.0.background);
        let bg = bgs
            .iter()
            .rev()
            .find(|b| b.name == label)
            .ok_or_else(|| anyhow!("no UDP sink on port {port} in {}", self.name()))?;
        Ok(bg
            .stdout_text()
            .lines()
            .filter(|l| l.starts_with("from "))
            .map(str::to_string)
            .collect())
    }

    /// Waits until the UDP sink on `port` received `payload` from `from`.
    pub fn wait_udp_sink(&self, port: u16, from: IpAddr, payload: &str) -> Result<()> {
        let line = format!("from {from} {payload}");
        wait::until(
            &format!("{} to receive {line:?} on port {port}", self.name()),
            Duration::from_secs(10),
            || Ok(self.udp_sink_received(port)?.contains(&line).then_some(())),
        )
    }

    /// Sends one UDP datagram with `payload` to `to`, from `source` (an address of this
    /// host) or from whatever address the kernel picks.
    pub fn udp_send(
        &self,
        source: Option<IpAddr>,
        to: SocketAddr,
        payload: &str,
    ) -> Result<Output> {
        let tool = self.bins_testtool();
        let tool = tool.to_str().context("path is not UTF-8")?;
        let source = source.map_or("any".to_string(), |s| s.to_string());
        self.exec(tool, &["udp-send", &source, &to.to_string(), payload])
    }

    /// The nftables tables in this host's namespace (`inet meshd-mesh0`, ...).
    pub fn nft_tables(&self) -> Result<Vec<String>> {
        let out = self.run("nft", &["list", "tables"])?;
        Ok(out
            .stdout_str()
            .lines()
            .filter_map(|l| l.trim().strip_prefix("table ").map(str::to_string))
            .collect())
    }
}
