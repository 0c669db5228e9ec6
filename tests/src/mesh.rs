//! A mesh of test hosts: network namespaces on a shared underlay, each running a real
//! `meshd` with a certificate from the test's own CA.
//!
//! Topology: one "underlay" namespace per mesh holds a bridge `br0`; every host is a
//! namespace joined to it by a veth pair (`h-<name>` on the bridge, `eth0` in the
//! host). Host number `i` (from 1) gets underlay 198.18.0.i/15 and fd00:198:18::i/64,
//! overlay 100.64.0.i and fd00:6d65:7368::i. No default route anywhere.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::bins::Bins;
use crate::ca::{TestCa, Validity};
use crate::capture::Capture;
use crate::host::{Host, HostInner};
use crate::isolate::{availability, Availability};
use crate::netns::Netns;
use crate::process::{last_lines, Background};
use crate::wait;

/// meshd's UDP port on every host.
pub const MESH_PORT: u16 = 51820;
/// Overlay prefixes routed into the TUN on every host.
pub const OVERLAY_V4: &str = "100.64.0.0/10";
pub const OVERLAY_V6: &str = "fd00:6d65:7368::/48";
/// How long a meshd may take to report ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// Default limit for one command run in a host.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

static MESH_COUNTER: AtomicU32 = AtomicU32::new(0);

/// How many meshes may run at once in one test process (`MESH_TESTS_PARALLEL`, default:
/// the number of CPUs, at least 2). cargo runs tests on as many threads as CPUs, but
/// each mesh runs several daemons; too many at once on a small machine turn deadlines
/// into flakes.
static SLOTS: (Mutex<usize>, std::sync::Condvar) = (Mutex::new(0), std::sync::Condvar::new());

fn slot_limit() -> usize {
    std::env::var("MESH_TESTS_PARALLEL")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
                .max(2)
        })
}

/// One running mesh's place in [`SLOTS`]; released on drop.
struct Slot;

impl Slot {
    fn take() -> Slot {
        let limit = slot_limit();
        let mut used = lock(&SLOTS.0);
        while *used >= limit {
            used = SLOTS.1.wait(used).unwrap_or_else(|p| p.into_inner());
        }
        *used += 1;
        Slot
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        *lock(&SLOTS.0) -= 1;
        SLOTS.1.notify_one();
    }
}

/// Returned (inside `anyhow::Error`) by [`Mesh::new`] when the test must be skipped
/// because `MESH_SKIP_NETNS=1` is set and netns tests cannot run here.
#[derive(Debug, thiserror::Error)]
#[error("skipped: {0}")]
pub struct Skip(pub String);

/// Whether `e` is a [`Skip`] (used by [`crate::mesh!`]).
pub fn is_skip(e: &anyhow::Error) -> bool {
    e.downcast_ref::<Skip>().is_some()
}

/// One test's mesh: CA, underlay, hosts, temp dir. Dropping it stops every process the
/// harness started and deletes every namespace and link, also when the test panics
/// (then it prints each meshd's last log lines and keeps the directory).
pub struct Mesh {
    test: String,
    pub(crate) prefix: String,
    dir: PathBuf,
    pub(crate) bins: Arc<Bins>,
    ca: Arc<TestCa>,
    pub(crate) hosts: Vec<Host>,
    captures: Vec<Arc<Mutex<Option<Background>>>>,
    // Dropped after the hosts (see Drop).
    underlay: Option<Netns>,
    next_index: u32,
    /// Keep the directory at the end, as after a failed test ([`Mesh::keep`]).
    keep: bool,
    _slot: Slot,
}

impl Mesh {
    /// Keeps the mesh's directory (logs, configurations, captures) when it is dropped,
    /// as for a failed test: for a run that reports failure without panicking.
    pub fn keep(&mut self) {
        self.keep = true;
    }

    /// A fresh mesh for `test` (use [`crate::test_name!`]): checks that netns tests can
    /// run, finds the binaries, makes a CA for trust domain `t`, a temp dir and the
    /// underlay. Prefer [`crate::mesh!`], which also handles `MESH_SKIP_NETNS`.
    pub fn new(test: &str) -> Result<Mesh> {
        match availability()? {
            Availability::Ready => {}
            Availability::Skip(why) => {
                // Straight to fd 2, past the test harness's output capture: a skip must
                // be visible.
                use std::io::Write;
                let _ = writeln!(
                    std::io::stderr(),
                    "mesh-tests: SKIPPING {test}: {why} (MESH_SKIP_NETNS=1 is set)"
                );
                return Err(Skip(why).into());
            }
        }
        check_tools()?;
        let bins = Arc::new(Bins::locate()?);
        let slot = Slot::take();
        let n = MESH_COUNTER.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("m{n}-");
        let short: String = test.chars().take(40).collect();
        let dir = std::env::temp_dir()
            .join("mesh-tests")
            .join(format!("{short}.{}.{n}", std::process::id()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("rm -r {}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        let ca = Arc::new(TestCa::new("t").context("making the test CA")?);
        std::fs::write(dir.join("ca.crt"), ca.cert_pem())?;
        let underlay = Netns::create(&format!("{prefix}ul"))?;
        underlay.ip(&["link", "add", "br0", "type", "bridge"])?;
        underlay.ip(&["link", "set", "br0", "up"])?;
        Ok(Mesh {
            test: test.to_string(),
            prefix,
            dir,
            bins,
            ca,
            hosts: Vec::new(),
            captures: Vec::new(),
            underlay: Some(underlay),
            next_index: 1,
            keep: false,
            _slot: slot,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn ca(&self) -> &Arc<TestCa> {
        &self.ca
    }

    pub fn bins(&self) -> &Bins {
        &self.bins
    }

    /// A new CA for another trust domain (an outsider's CA in identity tests).
    pub fn other_ca(&self, trust_domain: &str) -> Result<Arc<TestCa>> {
        Ok(Arc::new(TestCa::new(trust_domain)?))
    }

    /// Declares host `name` (1–12 characters of `[a-z0-9]`).
    pub fn host(&mut self, name: &str) -> HostBuilder<'_> {
        HostBuilder {
            identity: format!("spiffe://t/{name}"),
            name: name.to_string(),
            ca: None,
            validity: Validity::Current,
            groups: Vec::new(),
            meshd: true,
            peers: PeerSet::All,
            extra_config: String::new(),
            node_config: String::new(),
            ipv6_underlay: false,
            policy: None,
            store: None,
            mesh: self,
        }
    }

    /// Brings up hosts `names` with default settings (identity `spiffe://t/<name>`),
    /// each listing all the others (and the running hosts) as peers in its meshd.toml;
    /// the meshds start in parallel.
    pub fn hosts<const N: usize>(&mut self, names: [&str; N]) -> Result<[Host; N]> {
        let batch = names
            .iter()
            .map(|name| HostSettings {
                name: name.to_string(),
                identity: format!("spiffe://t/{name}"),
                ca: None,
                validity: Validity::Current,
                groups: Vec::new(),
                meshd: true,
                peers: PeerSet::All,
                extra_config: String::new(),
                node_config: String::new(),
                ipv6_underlay: false,
                policy: None,
                store: None,
            })
            .collect();
        let out = self.bring_up(batch)?;
        out.try_into()
            .map_err(|_| anyhow!("internal: host count mismatch"))
    }

    /// The hosts brought up so far.
    pub fn all_hosts(&self) -> &[Host] {
        &self.hosts
    }

    fn underlay(&self) -> &Netns {
        self.underlay
            .as_ref()
            .expect("the underlay lives as long as the mesh")
    }

    /// Starts a packet capture on the underlay bridge (every packet between hosts);
    /// returns once tcpdump reports that it is listening.
    pub fn capture_underlay(&mut self, filter: &str) -> Result<Capture> {
        let n = self.captures.len();
        let file = self.dir.join(format!("underlay-{n}.pcap"));
        let mut cmd = self.underlay().command("tcpdump");
        cmd.args([
            "-i",
            "br0",
            "-n",
            "-U",
            "--immediate-mode",
            // A 32 MiB capture buffer: on a loaded 2-core machine tcpdump may not run
            // for a while, and the kernel drops what does not fit.
            "-B",
            "32768",
            "-s",
            "0",
            "-Z",
            "root",
            "-w",
        ])
        .arg(&file);
        if !filter.is_empty() {
            cmd.args(filter.split_whitespace());
        }
        let bg = Background::spawn(cmd, &self.dir, &format!("tcpdump-{n}"))?;
        let slot = Arc::new(Mutex::new(Some(bg)));
        self.captures.push(slot.clone());
        wait::until(
            "tcpdump to start listening",
            Duration::from_secs(10),
            || {
                let mut guard = lock(&slot);
                let bg = guard.as_mut().ok_or_else(|| anyhow!("capture stopped"))?;
                if bg.stderr_text().contains("listening on") {
                    return Ok(Some(()));
                }
                if let Some(status) = bg.exited()? {
                    bail!("tcpdump exited ({status}): {}", bg.stderr_text().trim());
                }
                Ok(None)
            },
        )?;
        Ok(Capture { slot, file })
    }

    fn alloc_index(&mut self) -> u32 {
        let i = self.next_index;
        self.next_index += 1;
        i
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        if panicking {
            for h in self.hosts.iter().filter(|h| h.has_meshd()) {
                eprintln!(
                    "---- {}: last lines of {} ----\n{}",
                    self.test,
                    h.log_path().display(),
                    last_lines(&h.log(), 40)
                );
            }
        }
        for c in &self.captures {
            if let Some(mut bg) = lock(c).take() {
                let _ = bg.kill();
            }
        }
        // A meshd that exited without the test stopping it is a failure (invariant 5:
        // bad input never crashes the daemon), even if every assertion passed.
        let mut died = Vec::new();
        for h in &self.hosts {
            if let Some(m) = lock(&h.0.meshd).as_mut() {
                if let Ok(Some(status)) = m.exited() {
                    died.push(format!(
                        "meshd in {} exited on its own ({status}); last lines of {}:\n{}",
                        h.name(),
                        h.log_path().display(),
                        last_lines(&h.log(), 30)
                    ));
                }
            }
        }
        for h in &self.hosts {
            h.stop_all();
        }
        // Namespaces go when the last handle to each host drops; the underlay now.
        self.hosts.clear();
        self.underlay.take();
        if panicking || self.keep || !died.is_empty() {
            eprintln!("mesh-tests: kept {} for inspection", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
        if !panicking && !died.is_empty() {
            panic!("{}", died.join("\n"));
        }
    }
}

/// Which existing hosts a new host is peered with (both directions).
#[derive(Clone, Debug)]
pub enum PeerSet {
    /// Every running host with meshd that trusts the same CA.
    All,
    /// None: the test adds peers itself.
    None,
    /// These host names.
    Only(Vec<String>),
}

/// Settings for one host; [`HostBuilder::up`] makes it.
pub struct HostBuilder<'m> {
    mesh: &'m mut Mesh,
    name: String,
    identity: String,
    ca: Option<Arc<TestCa>>,
    validity: Validity,
    groups: Vec<String>,
    meshd: bool,
    peers: PeerSet,
    extra_config: String,
    node_config: String,
    ipv6_underlay: bool,
    policy: Option<(String, String)>,
    store: Option<String>,
}

impl HostBuilder<'_> {
    /// A `[store]` table: the keys in `toml` (`endpoints`, `policy_keys`, ...) plus
    /// `advertise`, this host's own endpoint.
    pub fn store(mut self, toml: &str) -> Self {
        self.store = Some(toml.to_string());
        self
    }

    /// meshd listens on `[::]` and peers reach it at its IPv6 underlay address.
    pub fn ipv6_underlay(mut self) -> Self {
        self.ipv6_underlay = true;
        self
    }

    pub fn identity(mut self, id: &str) -> Self {
        self.identity = id.to_string();
        self
    }

    /// Certificate (and trusted CA) from `ca` instead of the mesh's CA.
    pub fn ca(mut self, ca: &Arc<TestCa>) -> Self {
        self.ca = Some(ca.clone());
        self
    }

    /// Its own certificate's validity window.
    pub fn validity(mut self, v: Validity) -> Self {
        self.validity = v;
        self
    }

    /// Groups in its certificate.
    pub fn groups(mut self, groups: &[&str]) -> Self {
        self.groups = groups.iter().map(|g| g.to_string()).collect();
        self
    }

    pub fn peers(mut self, p: PeerSet) -> Self {
        self.peers = p;
        self
    }

    /// A policy file (`policy.toml` in the host's directory) with the mesh default
    /// `default` ("deny" or "allow"): adds `[policy]` to meshd.toml.
    pub fn policy(mut self, default: &str, source: &str) -> Self {
        self.policy = Some((default.to_string(), source.to_string()));
        self
    }

    /// Extra TOML appended to meshd.toml (e.g. a `[policy]` table).
    pub fn config(mut self, toml: &str) -> Self {
        self.extra_config.push_str(toml);
        self.extra_config.push('\n');
        self
    }

    /// Extra keys of meshd.toml's `[node]` table (e.g. `cpu_latency_us = 0`).
    pub fn node_config(mut self, toml: &str) -> Self {
        self.node_config.push_str(toml);
        self.node_config.push('\n');
        self
    }

    /// Only the namespace and underlay link, no certificate and no meshd (harness
    /// self-tests, plain traffic).
    pub fn without_meshd(mut self) -> Self {
        self.meshd = false;
        self
    }

    /// Creates the namespace and link, issues the certificate, writes meshd.toml, starts
    /// meshd and waits until `meshctl status --json` says ready; then adds it as a peer
    /// to the running hosts chosen by [`PeerSet`] (with `meshctl peer add`, as an
    /// operator would).
    pub fn up(self) -> Result<Host> {
        let HostBuilder {
            mesh,
            name,
            identity,
            ca,
            validity,
            groups,
            meshd,
            peers,
            extra_config,
            node_config,
            ipv6_underlay,
            policy,
            store,
        } = self;
        let settings = HostSettings {
            ipv6_underlay,
            policy,
            name,
            identity,
            ca,
            validity,
            groups,
            meshd,
            peers,
            extra_config,
            node_config,
            store,
        };
        let mut hosts = mesh.bring_up(vec![settings])?;
        hosts.pop().context("internal: no host")
    }
}

/// What a [`HostBuilder`] collected.
struct HostSettings {
    name: String,
    identity: String,
    ca: Option<Arc<TestCa>>,
    validity: Validity,
    groups: Vec<String>,
    meshd: bool,
    peers: PeerSet,
    extra_config: String,
    node_config: String,
    ipv6_underlay: bool,
    policy: Option<(String, String)>,
    store: Option<String>,
}

impl HostSettings {
    fn wants(&self, other: &Host) -> bool {
        match &self.peers {
            PeerSet::All => true,
            PeerSet::None => false,
            PeerSet::Only(names) => names.iter().any(|n| n == other.name()),
        }
    }
}

impl Mesh {
    /// Brings up a batch of hosts: namespaces and certificates first, then every
    /// meshd.toml lists the batch's other hosts (and the chosen running hosts) as peers,
    /// then all meshds start and are waited for, then running hosts learn the new ones
    /// with `meshctl peer add`.
    fn bring_up(&mut self, batch: Vec<HostSettings>) -> Result<Vec<Host>> {
        let existing: Vec<Host> = self.hosts.clone();
        let mut new = Vec::with_capacity(batch.len());
        for settings in &batch {
            new.push(self.prepare(settings)?);
        }
        let same_ca = |a: &Host, b: &Host| Arc::ptr_eq(&a.0.ca, &b.0.ca);
        for (settings, host) in batch.iter().zip(&new) {
            if !settings.meshd {
                continue;
            }
            let peers: Vec<&Host> = existing
                .iter()
                .filter(|p| p.has_meshd() && same_ca(p, host) && settings.wants(p))
                .chain(new.iter().zip(&batch).filter_map(|(p, ps)| {
                    (p.name() != host.name() && ps.meshd && same_ca(p, host) && settings.wants(p))
                        .then_some(p)
                }))
                .collect();
            let mut extra = String::new();
            if let Some((default, source)) = &settings.policy {
                std::fs::write(host.dir().join("policy.toml"), source)?;
                extra.push_str(&format!(
                    "[policy]\ndefault = \"{default}\"\nfile = \"policy.toml\"\n\n"
                ));
            }
            extra.push_str(&settings.extra_config);
            if let Some(store) = &settings.store {
                extra.push_str(&format!(
                    "\n[store]\n{store}\nadvertise = [\"{}\"]\n",
                    host.endpoint()
                ));
            }
            host.write_config(&peers, &settings.node_config, &extra)?;
        }
        for (settings, host) in batch.iter().zip(&new) {
            if settings.meshd {
                host.spawn_meshd()?;
            }
        }
        for (settings, host) in batch.iter().zip(&new) {
            if settings.meshd {
                host.wait_ready()?;
            }
        }
        for (settings, host) in batch.iter().zip(&new) {
            if !settings.meshd {
                continue;
            }
            for p in existing
                .iter()
                .filter(|p| p.has_meshd() && same_ca(p, host) && settings.wants(p))
            {
                p.peer_add(host)?;
            }
        }
        Ok(new)
    }

    /// Namespace, underlay link and addresses, certificate and key files.
    fn prepare(&mut self, settings: &HostSettings) -> Result<Host> {
        let name = &settings.name;
        if name.is_empty()
            || name.len() > 12
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            bail!("host name {name:?}: use 1-12 characters of [a-z0-9] (veth names are limited to 15 bytes)");
        }
        if self.hosts.iter().any(|h| h.name() == name) {
            bail!("host {name:?} exists already");
        }
        let index = self.alloc_index();
        let dir = self.dir.join(name);
        std::fs::create_dir_all(dir.join("www"))?;
        let ns = Netns::create(&format!("{}{name}", self.prefix))?;
        let veth = format!("h-{name}");
        self.underlay().ip(&[
            "link",
            "add",
            &veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ])?;
        self.underlay()
            .ip(&["link", "set", &veth, "master", "br0", "up"])?;
        let underlay_v4 = underlay_v4(index, 18);
        let underlay_v6 = IpAddr::V6(Ipv6Addr::new(0xfd00, 0x198, 0x18, 0, 0, 0, 0, index as u16));
        ns.ip(&["addr", "add", &format!("{underlay_v4}/15"), "dev", "eth0"])?;
        ns.ip(&[
            "addr",
            "add",
            &format!("{underlay_v6}/64"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        let overlay_v4 = IpAddr::V4(Ipv4Addr::new(100, 64, (index >> 8) as u8, index as u8));
        let overlay_v6 = IpAddr::V6(Ipv6Addr::new(
            0xfd00,
            0x6d65,
            0x7368,
            0,
            0,
            0,
            0,
            index as u16,
        ));
        let ca = settings.ca.clone().unwrap_or_else(|| self.ca.clone());
        let host = Host(Arc::new(HostInner {
            name: name.clone(),
            identity: settings.identity.clone(),
            index,
            dir: dir.clone(),
            bins: self.bins.clone(),
            ca: ca.clone(),
            underlay_v4: Mutex::new(underlay_v4),
            underlay_v6,
            ipv6_underlay: settings.ipv6_underlay,
            overlay_v4,
            overlay_v6,
            cert_pem: Mutex::new(String::new()),
            public_key: Mutex::new(String::new()),
            meshd: Mutex::new(None),
            meshd_env: Mutex::new(Vec::new()),
            background: Mutex::new(Vec::new()),
            ns,
        }));
        self.hosts.push(host.clone());
        if settings.meshd {
            let issued = ca.issue(
                &settings.identity,
                &[overlay_v4, overlay_v6],
                &settings.groups,
                None,
                settings.validity,
            )?;
            *lock(&host.0.cert_pem) = issued.cert_pem.clone();
            *lock(&host.0.public_key) = issued.public_key_b64.clone();
            std::fs::write(dir.join("host.crt"), &issued.cert_pem)?;
            write_private(&dir.join("host.key"), issued.key_b64.as_bytes())?;
            std::fs::write(dir.join("ca.crt"), ca.cert_pem())?;
        }
        Ok(host)
    }
}

/// 198.<second>.0.i.
pub fn underlay_v4(index: u32, second: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(198, second, (index >> 8) as u8, index as u8))
}

pub(crate) fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("write {}", path.display()))?;
    f.write_all(data)?;
    Ok(())
}

/// Locks ignoring poisoning: cleanup must still work after a panic.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The external tools the harness runs; a clear error if one is missing.
fn check_tools() -> Result<()> {
    let missing: Vec<&str> = [
        ("ip", "iproute2"),
        ("ss", "iproute2"),
        ("timeout", "coreutils"),
        ("curl", "curl"),
        ("ping", "iputils-ping"),
        ("tcpdump", "tcpdump"),
        ("nft", "nftables"),
        ("python3", "python3"),
    ]
    .into_iter()
    .filter(|(tool, _)| !in_path(tool))
    .map(|(_, pkg)| pkg)
    .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        bail!(
            "missing tools for the netns tests: apt-get install {}",
            missing.join(" ")
        )
    }
}

pub(crate) fn in_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}
