//! One host of a mesh: its namespace, its meshd, and the operator's view of it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;

use crate::bins::Bins;
use crate::ca::{TestCa, Validity};
use crate::mesh::{lock, COMMAND_TIMEOUT, MESH_PORT, OVERLAY_V4, OVERLAY_V6, READY_TIMEOUT};
use crate::netns::Netns;
use crate::process::{last_lines, run_with_limit, Background, Output};
use crate::wait;
use mesh_proto::time::UnixTime;

impl Host {
    /// Writes meshd.toml (format of the brief) with `peers`, extra keys of `[node]`
    /// (`node_extra`) and extra TOML after the peers (`extra`).
    pub(crate) fn write_config(
        &self,
        peers: &[&Host],
        node_extra: &str,
        extra: &str,
    ) -> Result<()> {
        let dir = &self.0.dir;
        let mut config = String::new();
        // Wildcard, so a host keeps its socket when it moves to another address.
        let listen = if self.0.ipv6_underlay {
            format!("[::]:{MESH_PORT}")
        } else {
            format!("0.0.0.0:{MESH_PORT}")
        };
        let _ = write!(
            config,
            "[node]\ncert = \"host.crt\"\nkey = \"host.key\"\nca = \"ca.crt\"\n\
             listen = \"{listen}\"\ntun = \"mesh0\"\nstate_dir = \"state\"\n\
             control_socket = \"meshd.sock\"\nroutes = [\"{OVERLAY_V4}\", \"{OVERLAY_V6}\"]\n\
             log_level = \"debug\"\n{node_extra}"
        );
        std::fs::create_dir_all(dir.join("peers"))?;
        for p in peers {
            let file = format!("peers/{}.crt", p.name());
            std::fs::write(dir.join(&file), p.cert_pem())?;
            let _ = write!(
                config,
                "\n[[peer]]\ncert = \"{file}\"\nendpoint = \"{}\"\n",
                p.endpoint()
            );
        }
        let path = self.config_path();
        // The harness's own part must be valid; `extra` may be broken on purpose.
        mesh_proto::config::Config::parse(&path, &config)
            .map_err(|e| anyhow!("the harness wrote an invalid meshd.toml: {e}"))?;
        if !extra.is_empty() {
            config.push('\n');
            config.push_str(extra);
        }
        std::fs::write(&path, config).with_context(|| format!("write {}", path.display()))
    }
}

/// Status of one meshd, as `meshctl status --json` prints it.
#[derive(Clone, Debug, Deserialize)]
pub struct Status {
    pub ready: bool,
    #[serde(default)]
    pub identity: String,
    /// Its x25519 public key (base64).
    #[serde(default)]
    pub public_key: String,
    #[serde(default)]
    pub listen: String,
    #[serde(default)]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub peers: Vec<PeerStatus>,
    #[serde(default)]
    pub drops: BTreeMap<String, u64>,
    /// The local workloads, the node's own (`node`) first.
    #[serde(default)]
    pub workloads: Vec<WorkloadStatus>,
    /// The host filter (nftables): state, what it protects, what it dropped.
    #[serde(default)]
    pub host_filter: Option<mesh_proto::control::HostFilterStatus>,
    /// The fleet store: connection, what was applied and refused.
    #[serde(default)]
    pub store: Option<mesh_proto::store::StoreStatus>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct WorkloadStatus {
    pub name: String,
    #[serde(default)]
    pub groups: Vec<String>,
    /// End of its certificate's validity (Unix seconds).
    pub not_after: u64,
}

#[derive(Clone, Debug, Deserialize)]
pub struct PeerStatus {
    pub identity: String,
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub latest_handshake: Option<u64>,
    #[serde(default)]
    pub rx_bytes: u64,
    #[serde(default)]
    pub tx_bytes: u64,
    #[serde(default)]
    pub drops: BTreeMap<String, u64>,
    /// End of the peer's certificate's validity (Unix seconds).
    #[serde(default)]
    pub not_after: u64,
}

impl Status {
    pub fn peer(&self, identity: &str) -> Option<&PeerStatus> {
        self.peers.iter().find(|p| p.identity == identity)
    }

    /// The node's own workload (`node`): its certificate's facts.
    pub fn node(&self) -> Option<&WorkloadStatus> {
        self.workloads.iter().find(|w| w.name == "node")
    }

    /// Sum of the top-level drop counters.
    pub fn total_drops(&self) -> u64 {
        self.drops.values().sum()
    }
}

/// A host in the mesh: a cheap handle (clone freely). The [`Mesh`] stops its processes
/// and deletes its namespace when the mesh drops.
#[derive(Clone)]
pub struct Host(pub(crate) Arc<HostInner>);

pub struct HostInner {
    pub(crate) name: String,
    pub(crate) identity: String,
    pub(crate) index: u32,
    pub(crate) dir: PathBuf,
    pub(crate) bins: Arc<Bins>,
    pub(crate) ca: Arc<TestCa>,
    pub(crate) underlay_v4: Mutex<IpAddr>,
    pub(crate) underlay_v6: IpAddr,
    pub(crate) ipv6_underlay: bool,
    pub(crate) overlay_v4: IpAddr,
    pub(crate) overlay_v6: IpAddr,
    pub(crate) cert_pem: Mutex<String>,
    pub(crate) public_key: Mutex<String>,
    pub(crate) meshd: Mutex<Option<Background>>,
    /// Environment for the next meshd started here ([`Host::set_meshd_env`]).
    pub(crate) meshd_env: Mutex<Vec<(String, String)>>,
    pub(crate) background: Mutex<Vec<Background>>,
    pub(crate) ns: Netns,
}

impl Drop for HostInner {
    fn drop(&mut self) {
        // Processes first: a namespace with live processes would outlive `ip netns del`.
        if let Some(mut m) = lock(&self.meshd).take() {
            let _ = m.kill();
        }
        lock(&self.background).clear();
    }
}

impl Host {
    pub fn name(&self) -> &str {
        &self.0.name
    }

    pub fn identity(&self) -> &str {
        &self.0.identity
    }

    pub fn index(&self) -> u32 {
        self.0.index
    }

    pub fn dir(&self) -> &Path {
        &self.0.dir
    }

    pub fn netns(&self) -> &Netns {
        &self.0.ns
    }

    pub fn overlay_v4(&self) -> IpAddr {
        self.0.overlay_v4
    }

    pub fn overlay_v6(&self) -> IpAddr {
        self.0.overlay_v6
    }

    pub fn underlay_v4(&self) -> IpAddr {
        *lock(&self.0.underlay_v4)
    }

    pub fn underlay_v6(&self) -> IpAddr {
        self.0.underlay_v6
    }

    /// Its meshd's underlay endpoint: IPv4, or IPv6 for a host built with
    /// [`HostBuilder::ipv6_underlay`].
    pub fn endpoint(&self) -> SocketAddr {
        if self.0.ipv6_underlay {
            SocketAddr::new(self.underlay_v6(), MESH_PORT)
        } else {
            SocketAddr::new(self.underlay_v4(), MESH_PORT)
        }
    }

    pub fn cert_pem(&self) -> String {
        lock(&self.0.cert_pem).clone()
    }

    /// Issues this host a new certificate for the same identity, addresses and key,
    /// with `groups` and `validity`, and puts it in place of `host.crt` the way an
    /// operator should (written beside it, then renamed over it), where a running
    /// meshd takes it from. [`Host::cert_pem`] is the new one from then on. Returns
    /// the new certificate's end.
    pub fn renew_cert(&self, groups: &[&str], validity: Validity) -> Result<UnixTime> {
        let groups: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
        let issued = self.0.ca.issue(
            &self.0.identity,
            &[self.0.overlay_v4, self.0.overlay_v6],
            &groups,
            Some(&self.public_key()),
            validity,
        )?;
        let next = self.0.dir.join("host.crt.new");
        std::fs::write(&next, &issued.cert_pem)?;
        std::fs::rename(&next, self.cert_path())
            .with_context(|| format!("rename over {}", self.cert_path().display()))?;
        *lock(&self.0.cert_pem) = issued.cert_pem;
        Ok(issued.cert.not_after())
    }

    /// Gives this host a new key and a certificate for it (same identity and
    /// addresses, `groups`, `validity`), each written beside its file and renamed over
    /// it (the key first); [`Host::cert_pem`] and [`Host::public_key`] are the new ones
    /// from then on. Returns the new public key (base64).
    pub fn rotate_key(&self, groups: &[&str], validity: Validity) -> Result<String> {
        let groups: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
        let issued = self.0.ca.issue(
            &self.0.identity,
            &[self.0.overlay_v4, self.0.overlay_v6],
            &groups,
            None,
            validity,
        )?;
        let key = self.0.dir.join("host.key");
        let next = self.0.dir.join("host.key.new");
        crate::mesh::write_private(&next, issued.key_b64.as_bytes())?;
        std::fs::rename(&next, &key).with_context(|| format!("rename over {}", key.display()))?;
        let next = self.0.dir.join("host.crt.new");
        std::fs::write(&next, &issued.cert_pem)?;
        std::fs::rename(&next, self.cert_path())
            .with_context(|| format!("rename over {}", self.cert_path().display()))?;
        *lock(&self.0.cert_pem) = issued.cert_pem;
        *lock(&self.0.public_key) = issued.public_key_b64.clone();
        Ok(issued.public_key_b64)
    }

    /// Its x25519 public key, base64.
    pub fn public_key(&self) -> String {
        lock(&self.0.public_key).clone()
    }

    pub fn cert_path(&self) -> PathBuf {
        self.0.dir.join("host.crt")
    }

    pub fn socket_path(&self) -> PathBuf {
        self.0.dir.join("meshd.sock")
    }

    pub fn config_path(&self) -> PathBuf {
        self.0.dir.join("meshd.toml")
    }

    pub fn log_path(&self) -> PathBuf {
        self.0.dir.join("meshd.log")
    }

    /// Everything meshd wrote to stdout and stderr so far (all runs).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The `mesh-testtool` binary (UDP echo, garbage sender).
    pub fn bins_testtool(&self) -> PathBuf {
        self.0.bins.testtool.clone()
    }

    pub(crate) fn has_meshd(&self) -> bool {
        !lock(&self.0.cert_pem).is_empty()
    }

    /// Runs `program args` in this host, output captured, under [`COMMAND_TIMEOUT`].
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<Output> {
        self.exec_timeout(program, args, COMMAND_TIMEOUT)
    }

    pub fn exec_timeout(&self, program: &str, args: &[&str], timeout: Duration) -> Result<Output> {
        let mut base = self.0.ns.command("timeout");
        base.current_dir(&self.0.dir);
        run_with_limit(base, program, args, timeout)
    }

    /// Like [`Host::exec`] but fails unless the command exits 0.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<Output> {
        self.exec(program, args)?
            .check()
            .with_context(|| format!("in host {}", self.name()))
    }

    /// Starts `program args` in this host in the background; the host stops it when the
    /// mesh drops. [`Host::wait_background_output`] finds it by `label`.
    pub fn spawn(&self, label: &str, program: &Path, args: &[&str]) -> Result<()> {
        let mut cmd = self.0.ns.command(program);
        cmd.args(args).current_dir(&self.0.dir);
        let bg = Background::spawn(cmd, &self.0.dir, label)?;
        lock(&self.0.background).push(bg);
        Ok(())
    }

    /// Waits until a background process labelled `label` printed `needle` on stdout or
    /// stderr; fails early if it exits.
    pub fn wait_background_output(&self, label: &str, needle: &str) -> Result<()> {
        wait::until(
            &format!("{label} in {} to print {needle:?}", self.name()),
            Duration::from_secs(10),
            || {
                let mut bgs = lock(&self.0.background);
                let bg = bgs
                    .iter_mut()
                    .rev()
                    .find(|b| b.name == label)
                    .ok_or_else(|| anyhow!("no background process {label}"))?;
                if bg.stdout_text().contains(needle) || bg.stderr_text().contains(needle) {
                    return Ok(Some(()));
                }
                if let Some(status) = bg.exited()? {
                    bail!(
                        "{label} exited ({status}): {}",
                        last_lines(&bg.stderr_text(), 10)
                    );
                }
                Ok(None)
            },
        )
    }

    /// PIDs of the background processes the harness started in this host.
    pub fn background_pids(&self) -> Vec<u32> {
        lock(&self.0.background)
            .iter()
            .filter_map(Background::pid)
            .collect()
    }

    /// Stops every process of this host (meshd and background).
    pub(crate) fn stop_all(&self) {
        if let Some(mut m) = lock(&self.0.meshd).take() {
            let _ = m.kill();
        }
        lock(&self.0.background).clear();
    }

    // ---- meshd lifecycle ----

    /// Sets `key=value` in the environment of the meshd started next in this host
    /// (e.g. `MESHD_OFFLOAD=0`); takes effect at the next [`Host::start`].
    pub fn set_meshd_env(&self, key: &str, value: &str) {
        let mut env = lock(&self.0.meshd_env);
        env.retain(|(k, _)| k != key);
        env.push((key.to_string(), value.to_string()));
    }

    /// Starts meshd (`meshd --config meshd.toml`) and waits until it reports ready.
    pub fn start(&self) -> Result<()> {
        self.spawn_meshd()?;
        self.wait_ready()
    }

    /// Starts meshd without waiting.
    pub(crate) fn spawn_meshd(&self) -> Result<()> {
        {
            let mut slot = lock(&self.0.meshd);
            if slot.is_some() {
                bail!("meshd already runs in {}", self.name());
            }
            let mut cmd = self.0.ns.command(&self.0.bins.meshd);
            cmd.arg("--config")
                .arg(self.config_path())
                .current_dir(&self.0.dir)
                .env("RUST_BACKTRACE", "1")
                .envs(lock(&self.0.meshd_env).iter().map(|(k, v)| (k, v)));
            let log = self.log_path();
            *slot = Some(Background::spawn_to(cmd, "meshd", log.clone(), log)?);
        }
        Ok(())
    }

    /// Polls `meshctl status --json` until `ready` is true ([`READY_TIMEOUT`]); on
    /// failure the error carries meshd's last log lines.
    pub fn wait_ready(&self) -> Result<()> {
        let result = wait::until(
            &format!("meshd in {} to report ready", self.name()),
            READY_TIMEOUT,
            || {
                if let Some(status) = lock(&self.0.meshd)
                    .as_mut()
                    .ok_or_else(|| anyhow!("meshd is not running"))?
                    .exited()?
                {
                    bail!("meshd exited during startup ({status})");
                }
                match self.status() {
                    Ok(s) if s.ready => Ok(Some(())),
                    _ => Ok(None),
                }
            },
        );
        if result.is_err() {
            if let Some(mut m) = lock(&self.0.meshd).take() {
                let _ = m.kill();
            }
        }
        result.map_err(|e| {
            anyhow!(
                "{e:#}\n---- last lines of {} ----\n{}",
                self.log_path().display(),
                last_lines(&self.log(), 30)
            )
        })
    }

    /// SIGKILL meshd (no clean shutdown) and reap it.
    pub fn kill_meshd(&self) -> Result<()> {
        match lock(&self.0.meshd).take() {
            Some(mut m) => m.kill(),
            None => bail!("meshd is not running in {}", self.name()),
        }
    }

    /// SIGTERM meshd and wait (up to 10 s) for it to exit; fails if it does not exit,
    /// or exits non-zero.
    pub fn stop_meshd(&self) -> Result<()> {
        let mut m = lock(&self.0.meshd)
            .take()
            .with_context(|| format!("meshd is not running in {}", self.name()))?;
        let status = m.stop_within(libc::SIGTERM, Duration::from_secs(10))?;
        if !status.success() {
            bail!(
                "meshd in {} exited with {status} on SIGTERM; last lines:\n{}",
                self.name(),
                last_lines(&self.log(), 20)
            );
        }
        Ok(())
    }

    /// The PID of the running meshd (to read its /proc entries), if one runs.
    pub fn meshd_pid(&self) -> Option<u32> {
        lock(&self.0.meshd).as_ref().and_then(Background::pid)
    }

    /// Whether meshd is still running (not exited).
    pub fn meshd_alive(&self) -> Result<bool> {
        match lock(&self.0.meshd).as_mut() {
            Some(m) => Ok(m.exited()?.is_none()),
            None => Ok(false),
        }
    }

    /// Moves this host to underlay address `new` (same /15): the old address goes away.
    pub fn move_underlay(&self, new: Ipv4Addr) -> Result<()> {
        let mut cur = lock(&self.0.underlay_v4);
        // Delete first: deleting a primary address also deletes the secondaries of its
        // subnet (unless promote_secondaries), which would take the new one with it.
        self.0
            .ns
            .ip(&["addr", "del", &format!("{}/15", *cur), "dev", "eth0"])?;
        self.0
            .ns
            .ip(&["addr", "add", &format!("{new}/15"), "dev", "eth0"])?;
        *cur = IpAddr::V4(new);
        Ok(())
    }

    // ---- meshctl ----

    /// `meshctl --socket <sock> <args>` in this host.
    pub fn meshctl(&self, args: &[&str]) -> Result<Output> {
        let sock = self.socket_path();
        let sock = sock.to_str().context("socket path is not UTF-8")?;
        let meshctl = self.0.bins.meshctl.to_str().context("path is not UTF-8")?;
        let mut all = vec!["--socket", sock];
        all.extend_from_slice(args);
        self.exec_timeout(meshctl, &all, Duration::from_secs(10))
    }

    /// `meshctl status --json`, parsed.
    pub fn status(&self) -> Result<Status> {
        let out = self.meshctl(&["status", "--json"])?.check()?;
        serde_json::from_slice(&out.stdout)
            .with_context(|| format!("parsing `meshctl status --json`: {}", out.stdout_str()))
    }

    /// `meshctl peer add <other's cert> --endpoint <other's endpoint>`.
    pub fn peer_add(&self, other: &Host) -> Result<Output> {
        self.peer_add_at(other, other.endpoint())
    }

    /// `meshctl peer add <other's cert> --endpoint <endpoint>`: `other` reached at
    /// another address than its own (e.g. through a [`crate::relay::Relay`]).
    pub fn peer_add_at(&self, other: &Host, endpoint: SocketAddr) -> Result<Output> {
        let cert = self
            .0
            .dir
            .join("peers")
            .join(format!("{}.crt", other.name()));
        std::fs::create_dir_all(self.0.dir.join("peers"))?;
        std::fs::write(&cert, other.cert_pem())?;
        let cert = cert.to_str().context("path is not UTF-8")?.to_string();
        let ep = endpoint.to_string();
        self.meshctl(&["peer", "add", &cert, "--endpoint", &ep])?
            .check()
            .with_context(|| format!("adding peer {} to {}", other.name(), self.name()))
    }

    /// `meshctl peer remove <identity>`.
    pub fn peer_remove(&self, identity: &str) -> Result<Output> {
        self.meshctl(&["peer", "remove", identity])
    }

    /// Sends one raw line to the control socket and returns the reply line.
    pub fn control_raw(&self, line: &[u8]) -> Result<String> {
        use std::io::{BufRead, BufReader, Write};
        let mut s = std::os::unix::net::UnixStream::connect(self.socket_path())
            .with_context(|| format!("connect {}", self.socket_path().display()))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(line)?;
        if !line.ends_with(b"\n") {
            s.write_all(b"\n")?;
        }
        let mut reply = String::new();
        BufReader::new(s)
            .read_line(&mut reply)
            .context("reading the control reply")?;
        Ok(reply)
    }
}
