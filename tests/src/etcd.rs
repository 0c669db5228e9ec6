//! A real etcd for fleet-store tests, and a store client to watch it with.
//!
//! [`Mesh::etcd`] starts Debian's `etcd` (package `etcd-server`, 3.4) as a plain
//! process in a host of its own on the mesh's underlay, with its own underlay address
//! (198.18.0.i), its data directory in the test's directory and its log beside it
//! (the last lines are printed when a test fails). Readiness is a real client call
//! (`etcdctl endpoint health`); it is stopped by PID when dropped. Peer traffic stays
//! on the namespace's loopback: a single-member cluster.
//!
//! [`StoreNode`] runs meshd's store client (`mesh-testtool store-node`) in a host and
//! reads the events it prints, one JSON line each.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::host::Host;
use crate::mesh::{lock, Mesh};
use crate::process::{last_lines, Background, Output};
use crate::wait;

/// etcd's client port.
pub const ETCD_PORT: u16 = 2379;
/// How long etcd may take to answer a health check after starting.
pub const ETCD_READY: Duration = Duration::from_secs(20);

/// A running (or stopped) etcd; dropping it kills the process.
pub struct Etcd {
    host: Host,
    data: PathBuf,
    log: PathBuf,
    process: Mutex<Option<Background>>,
}

impl Mesh {
    /// Starts an etcd in a new host named `etcd` and waits until it answers.
    pub fn etcd(&mut self) -> Result<Etcd> {
        if !crate::mesh::in_path("etcd") || !crate::mesh::in_path("etcdctl") {
            bail!(
                "etcd is missing: apt-get install etcd-server etcd-client (scripts/test.sh does)"
            );
        }
        let host = self.host("etcd").without_meshd().up()?;
        let etcd = Etcd {
            data: host.dir().join("data"),
            log: host.dir().join("etcd.log"),
            host,
            process: Mutex::new(None),
        };
        etcd.start()?;
        Ok(etcd)
    }
}

impl Etcd {
    /// `http://<underlay address>:2379`.
    pub fn url(&self) -> String {
        format!("http://{}:{ETCD_PORT}", self.host.underlay_v4())
    }

    pub fn host(&self) -> &Host {
        &self.host
    }

    /// Starts etcd on its data directory (kept across restarts) and waits until
    /// `etcdctl endpoint health` succeeds.
    pub fn start(&self) -> Result<()> {
        let mut slot = lock(&self.process);
        if slot.is_some() {
            bail!("etcd runs already");
        }
        let url = self.url();
        let peer = "http://127.0.0.1:2380";
        let mut cmd = self.host.netns().command("etcd");
        cmd.args(["--name", "etcd", "--data-dir"])
            .arg(&self.data)
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
                "--listen-peer-urls",
                peer,
                "--initial-advertise-peer-urls",
                peer,
                "--initial-cluster",
                &format!("etcd={peer}"),
                "--logger",
                "zap",
                "--log-outputs",
                "stderr",
            ])
            .current_dir(self.host.dir());
        *slot = Some(Background::spawn_to(
            cmd,
            "etcd",
            self.log.clone(),
            self.log.clone(),
        )?);
        drop(slot);
        let ready = wait::until("etcd to answer a health check", ETCD_READY, || {
            if let Some(status) = lock(&self.process)
                .as_mut()
                .ok_or_else(|| anyhow!("etcd is not running"))?
                .exited()?
            {
                bail!("etcd exited during startup ({status})");
            }
            Ok(self
                .etcdctl(&["endpoint", "health"])?
                .success()
                .then_some(()))
        });
        ready.map_err(|e| {
            anyhow!(
                "{e:#}\n---- last lines of {} ----\n{}",
                self.log.display(),
                last_lines(&self.log(), 30)
            )
        })
    }

    /// SIGTERM and wait for etcd to exit (its data stays).
    pub fn stop(&self) -> Result<()> {
        let mut bg = lock(&self.process).take().context("etcd is not running")?;
        bg.stop_within(libc::SIGTERM, Duration::from_secs(10))?;
        Ok(())
    }

    /// `etcdctl --endpoints <url> <args>` in etcd's host.
    pub fn etcdctl(&self, args: &[&str]) -> Result<Output> {
        let url = self.url();
        let mut all = vec!["--endpoints", url.as_str(), "--dial-timeout", "2s"];
        all.extend_from_slice(args);
        self.host.exec("etcdctl", &all)
    }

    /// `etcdctl put KEY VALUE` (the value passed on the command line).
    pub fn put(&self, key: &str, value: &[u8]) -> Result<()> {
        let value = std::str::from_utf8(value).context("etcdctl put takes text")?;
        // `--` so that a value starting with '-' is not an option.
        self.etcdctl(&["put", "--", key, value])?.check()?;
        Ok(())
    }

    /// The value at `key`, if any.
    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let out = self
            .etcdctl(&["get", "--print-value-only", "--", key])?
            .check()?;
        if out.stdout.is_empty() {
            return Ok(None);
        }
        let mut v = out.stdout;
        // etcdctl ends the value with a newline.
        if v.last() == Some(&b'\n') {
            v.pop();
        }
        Ok(Some(v))
    }

    /// The store's current revision.
    pub fn revision(&self) -> Result<i64> {
        let out = self.etcdctl(&["get", "-w", "json", "--", "/"])?.check()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        v["header"]["revision"]
            .as_i64()
            .context("etcdctl get -w json: no header.revision")
    }

    /// Compacts the history up to the current revision: watchers behind it are
    /// cancelled.
    pub fn compact(&self) -> Result<i64> {
        let rev = self.revision()?;
        self.etcdctl(&["compact", &rev.to_string(), "--physical"])?
            .check()?;
        Ok(rev)
    }

    /// Everything etcd logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- last lines of {} ----\n{}",
                self.log.display(),
                last_lines(&self.log(), 30)
            );
        }
        if let Some(mut bg) = lock(&self.process).take() {
            let _ = bg.kill();
        }
    }
}

/// meshd's store client running in a host (`mesh-testtool store-node`), printing
/// every event as a JSON line.
pub struct StoreNode {
    host: Host,
    bg: Option<Background>,
    label: String,
}

/// What a [`StoreNode`] is started with.
pub struct StoreNodeConfig<'a> {
    pub endpoints: &'a str,
    pub prefix: &'a str,
    pub identity: &'a str,
    pub advertise: &'a str,
    pub lease_secs: u32,
    /// Reported as its applied policy version.
    pub applied_version: u64,
}

impl StoreNode {
    pub fn start(host: &Host, label: &str, c: &StoreNodeConfig<'_>) -> Result<StoreNode> {
        let mut cmd = host.netns().command(host.bins_testtool());
        cmd.args([
            "store-node",
            c.endpoints,
            c.prefix,
            c.identity,
            c.advertise,
            &c.lease_secs.to_string(),
            &c.applied_version.to_string(),
        ])
        .current_dir(host.dir())
        .env("RUST_LOG", "debug");
        let bg = Background::spawn(cmd, host.dir(), label)?;
        Ok(StoreNode {
            host: host.clone(),
            bg: Some(bg),
            label: label.to_string(),
        })
    }

    /// Every event printed so far, parsed.
    pub fn events(&self) -> Vec<serde_json::Value> {
        let text = self
            .bg
            .as_ref()
            .map(Background::stdout_text)
            .unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits (up to `timeout`) for an event after the first `skip` that `pred`
    /// accepts; returns it and its index. Fails early if the process exits.
    pub fn wait_event(
        &mut self,
        what: &str,
        skip: usize,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<(usize, serde_json::Value)> {
        let result = wait::until(what, timeout, || {
            if let Some(found) = self
                .events()
                .into_iter()
                .enumerate()
                .skip(skip)
                .find(|(_, e)| pred(e))
            {
                return Ok(Some(found));
            }
            let bg = self.bg.as_mut().context("store node was stopped")?;
            if let Some(status) = bg.exited()? {
                bail!("{} exited ({status})", self.label);
            }
            Ok(None)
        });
        result.map_err(|e| {
            anyhow!(
                "{e:#} in {}\n---- events ----\n{}\n---- log ----\n{}",
                self.host.name(),
                last_lines(
                    &self
                        .bg
                        .as_ref()
                        .map(Background::stdout_text)
                        .unwrap_or_default(),
                    20
                ),
                last_lines(
                    &self
                        .bg
                        .as_ref()
                        .map(Background::stderr_text)
                        .unwrap_or_default(),
                    20
                )
            )
        })
    }

    /// SIGKILL: the client dies without revoking its lease, as a crashed host would.
    pub fn kill(&mut self) -> Result<()> {
        match self.bg.take() {
            Some(mut bg) => bg.kill(),
            None => bail!("{} was already stopped", self.label),
        }
    }
}
