//! A mesh of test hosts: network namespaces on a shared underlay, each running a real
//! `meshd` with a certificate from the test's own CA.
//!
//! Topology: one "underlay" namespace per mesh holds a bridge `br0`; every host is a
//! namespace joined to it by a veth pair (`h-<name>` on the bridge, `eth0` in the
//! host). Host number `i` (from 1) gets underlay 198.18.0.i/15 and fd00:198:18::i/64,
//! overlay 100.64.0.i and fd00:6d65:7368::i. No default route anywhere.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;

use crate::ca::{TestCa, Validity};
use crate::isolate::{availability, Availability};
use crate::netns::Netns;
use crate::process::{last_lines, run_with_limit, Background, Output};
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

/// Where the workspace's binaries are (next to the test executable).
#[derive(Debug)]
pub struct Bins {
    pub meshd: PathBuf,
    pub meshctl: PathBuf,
    pub testtool: PathBuf,
}

impl Bins {
    /// `target/<profile>/{meshd,meshctl,mesh-testtool}`, found from the test executable
    /// (`target/<profile>/deps/<test>-<hash>`).
    pub fn locate() -> Result<Bins> {
        let exe = std::env::current_exe().context("finding the test executable")?;
        let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
        if dir.ends_with("deps") {
            dir.pop();
        }
        let find = |name: &str| -> Result<PathBuf> {
            let p = dir.join(name);
            if p.is_file() {
                Ok(p)
            } else {
                bail!(
                    "{} not found: build the binaries first with `cargo build --workspace --bins` \
                     (the netns tests run the real meshd and meshctl)",
                    p.display()
                )
            }
        };
        let bins = Bins {
            meshd: find("meshd")?,
            meshctl: find("meshctl")?,
            testtool: find("mesh-testtool")?,
        };
        // `cargo test -p mesh-tests` does not rebuild meshd: refuse to test a stale one.
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        for (bin, crates) in [
            (&bins.meshd, &["meshd", "proto"][..]),
            (&bins.meshctl, &["meshctl", "proto"][..]),
        ] {
            let built = modified(bin).unwrap_or(std::time::SystemTime::UNIX_EPOCH);
            for c in crates {
                if let Some(newer) = newest_source(&root.join(c).join("src"), built) {
                    bail!(
                        "{} is older than {}: rebuild with `cargo build --workspace --bins`",
                        bin.display(),
                        newer.display()
                    );
                }
            }
        }
        Ok(bins)
    }
}

fn modified(p: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// A `.rs` file under `dir` modified after `than`, if any.
fn newest_source(dir: &Path, than: std::time::SystemTime) -> Option<PathBuf> {
    let entries = std::fs::read_dir(dir).ok()?;
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            if let Some(n) = newest_source(&p, than) {
                return Some(n);
            }
        } else if p.extension().is_some_and(|x| x == "rs") && modified(&p).is_some_and(|m| m > than)
        {
            return Some(p);
        }
    }
    None
}

/// One test's mesh: CA, underlay, hosts, temp dir. Dropping it stops every process the
/// harness started and deletes every namespace and link, also when the test panics
/// (then it prints each meshd's last log lines and keeps the directory).
pub struct Mesh {
    test: String,
    prefix: String,
    dir: PathBuf,
    bins: Arc<Bins>,
    ca: Arc<TestCa>,
    hosts: Vec<Host>,
    captures: Vec<Arc<Mutex<Option<Background>>>>,
    // Dropped after the hosts (see Drop).
    underlay: Option<Netns>,
    next_index: u32,
    _slot: Slot,
}

impl Mesh {
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
            ipv6_underlay: false,
            policy: None,
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
                ipv6_underlay: false,
                policy: None,
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
            for h in &self.hosts {
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
        if panicking || !died.is_empty() {
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
    ipv6_underlay: bool,
    policy: Option<(String, String)>,
}

impl HostBuilder<'_> {
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
            ipv6_underlay,
            policy,
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
    ipv6_underlay: bool,
    policy: Option<(String, String)>,
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
            host.write_config(&peers, &extra)?;
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

impl Host {
    /// Writes meshd.toml (format of the brief) with `peers` and extra TOML.
    fn write_config(&self, peers: &[&Host], extra: &str) -> Result<()> {
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
             log_level = \"debug\"\n"
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
    #[serde(default)]
    pub listen: String,
    #[serde(default)]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub peers: Vec<PeerStatus>,
    #[serde(default)]
    pub drops: BTreeMap<String, u64>,
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
}

impl Status {
    pub fn peer(&self, identity: &str) -> Option<&PeerStatus> {
        self.peers.iter().find(|p| p.identity == identity)
    }

    /// Sum of the top-level drop counters.
    pub fn total_drops(&self) -> u64 {
        self.drops.values().sum()
    }
}

/// A host in the mesh: a cheap handle (clone freely). The [`Mesh`] stops its processes
/// and deletes its namespace when the mesh drops.
#[derive(Clone)]
pub struct Host(Arc<HostInner>);

pub struct HostInner {
    name: String,
    identity: String,
    index: u32,
    dir: PathBuf,
    bins: Arc<Bins>,
    ca: Arc<TestCa>,
    underlay_v4: Mutex<IpAddr>,
    underlay_v6: IpAddr,
    ipv6_underlay: bool,
    overlay_v4: IpAddr,
    overlay_v6: IpAddr,
    cert_pem: Mutex<String>,
    public_key: Mutex<String>,
    meshd: Mutex<Option<Background>>,
    background: Mutex<Vec<Background>>,
    ns: Netns,
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

    fn has_meshd(&self) -> bool {
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
    fn stop_all(&self) {
        if let Some(mut m) = lock(&self.0.meshd).take() {
            let _ = m.kill();
        }
        lock(&self.0.background).clear();
    }

    // ---- meshd lifecycle ----

    /// Starts meshd (`meshd --config meshd.toml`) and waits until it reports ready.
    pub fn start(&self) -> Result<()> {
        self.spawn_meshd()?;
        self.wait_ready()
    }

    /// Starts meshd without waiting.
    fn spawn_meshd(&self) -> Result<()> {
        {
            let mut slot = lock(&self.0.meshd);
            if slot.is_some() {
                bail!("meshd already runs in {}", self.name());
            }
            let mut cmd = self.0.ns.command(&self.0.bins.meshd);
            cmd.arg("--config")
                .arg(self.config_path())
                .current_dir(&self.0.dir)
                .env("RUST_BACKTRACE", "1");
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
        let cert = self
            .0
            .dir
            .join("peers")
            .join(format!("{}.crt", other.name()));
        std::fs::create_dir_all(self.0.dir.join("peers"))?;
        std::fs::write(&cert, other.cert_pem())?;
        let cert = cert.to_str().context("path is not UTF-8")?.to_string();
        let ep = other.endpoint().to_string();
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

/// A running underlay capture; [`Capture::finish`] stops it and returns the pcap bytes.
pub struct Capture {
    slot: Arc<Mutex<Option<Background>>>,
    file: PathBuf,
}

impl Capture {
    /// The pcap file being written.
    pub fn path(&self) -> &Path {
        &self.file
    }

    /// Stops tcpdump and returns the raw pcap file.
    pub fn finish(self) -> Result<Vec<u8>> {
        self.stop()?;
        std::fs::read(&self.file).with_context(|| format!("read {}", self.file.display()))
    }

    /// Stops tcpdump and returns one line per captured packet that matches `filter` (a
    /// pcap filter expression; empty: all), as `tcpdump -n -r` prints them.
    pub fn finish_packets(self, filter: &str) -> Result<Vec<String>> {
        self.stop()?;
        let mut cmd = std::process::Command::new("tcpdump");
        cmd.arg("-n").arg("-r").arg(&self.file);
        if !filter.is_empty() {
            cmd.arg(filter);
        }
        let out = cmd.output().context("running tcpdump -r")?;
        if !out.status.success() {
            bail!(
                "tcpdump -r {} failed: {}",
                self.file.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect())
    }

    fn stop(&self) -> Result<()> {
        if let Some(mut bg) = lock(&self.slot).take() {
            // SIGINT makes tcpdump flush and exit.
            bg.stop_within(libc::SIGINT, Duration::from_secs(10))?;
        }
        Ok(())
    }
}

/// 198.<second>.0.i.
pub fn underlay_v4(index: u32, second: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(198, second, (index >> 8) as u8, index as u8))
}

fn write_private(path: &Path, data: &[u8]) -> Result<()> {
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

fn in_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}
