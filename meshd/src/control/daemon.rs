//! The daemon's state and control-plane operations: loading and checking everything
//! the configuration names (before anything touches the network), the peer registry
//! (config peers + persisted runtime changes), status, and the swap of peer-table
//! snapshots the data path reads.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use ipnet::IpNet;
use mesh_proto::cert::{Ca, Certificate, VerifiedCert, VerifyError};
use mesh_proto::config::{Config, ConfigError};
use mesh_proto::control::{
    ControlError, Enforcement, EnforcementCounters, Explanation, HostFilterStatus, NodeDrops,
    PeerInfo, PeerList, PeerStatus, PolicyApplied, PolicyInfo, PolicyOrigin, RuleCount, Status,
};
use mesh_proto::files;
use mesh_proto::identity::SpiffeId;
use mesh_proto::key::{PrivateKey, PublicKey};
use mesh_proto::time::{span, Term, UnixTime};

use crate::control::expiry::ExpiryWatch;
use crate::control::state::{LearnedEndpoints, PeerChanges, StoredPeer, StoredPolicy};
use crate::control::workloads::{Workload, WorkloadChanges, WorkloadSpec};
use crate::datapath::cpu_latency::CpuLatency;
use crate::datapath::device::{route_needed, Tun};
use crate::datapath::transport::Udp;
use crate::datapath::Plane;
use crate::enforce::decisions::{DecisionLog, LogLimits};
use crate::enforce::{self, Enforcer};
use crate::peers::{
    build_table, claims, peer_spec, Local, Node, OutsideWindow, PeerEntry, PeerTable, Source,
};
use crate::sys::shutdown::Shutdown;
use mesh_proto::policy::{self, CompiledPolicy, DefaultAction, RequestSpec};

mod workload_ops;
pub use workload_ops::quarantine_loop;

/// Everything the configuration names, read and verified. Producing this touches no
/// network state; `meshd check-config` stops here.
pub struct Loaded {
    pub config: Config,
    pub ca: Ca,
    pub cert: VerifiedCert,
    pub key: PrivateKey,
    pub peers: Vec<PeerEntry>,
    pub config_peers: Vec<PeerEntry>,
    pub changes: PeerChanges,
    pub policy: LoadedPolicy,
    /// The local workloads, the node's own first.
    pub workloads: Vec<Workload>,
    pub config_workloads: Vec<WorkloadSpec>,
    pub workload_changes: WorkloadChanges,
    /// What meshd starts with but refuses at run time (logged): `[[peer]]`
    /// certificates outside their validity window. `meshd check-config` fails on them.
    pub refused: Vec<ConfigError>,
}

/// The policy in force at start: the one applied at run time and persisted, else the
/// config's `[policy] file`, else none (the mesh default alone).
pub struct LoadedPolicy {
    pub applied: AppliedPolicy,
    pub compiled: CompiledPolicy,
}

/// Which policy is in force, for `policy_get` and status.
#[derive(Clone, Debug)]
pub struct AppliedPolicy {
    /// File name it was applied or configured under; empty when there is none.
    pub name: String,
    pub origin: PolicyOrigin,
    pub default: DefaultAction,
    pub policies: usize,
    pub tests: usize,
    pub source: String,
}

impl AppliedPolicy {
    /// As `policy_get` and `status` report it.
    pub fn info(&self) -> PolicyInfo {
        PolicyInfo {
            name: self.name.clone(),
            origin: self.origin,
            default: self.default,
            policies: self.policies as u64,
            tests: self.tests as u64,
            source: self.source.clone(),
        }
    }
}

/// The mesh default: deny or allow as configured; with no `[policy]` table at all,
/// allow (as Istio does with no AuthorizationPolicy), so a mesh without policy still
/// carries traffic. The README recommends `default = "deny"`.
pub fn default_action(config: &Config) -> DefaultAction {
    match config.policy.as_ref().map(|p| p.default) {
        None | Some(mesh_proto::config::PolicyDefault::Allow) => DefaultAction::Allow,
        Some(mesh_proto::config::PolicyDefault::Deny) => DefaultAction::Deny,
    }
}

/// Parses, compiles and tests a policy; refuses one whose `[[test]]` cases fail.
pub fn compile_policy(
    name: &str,
    source: &str,
    default: DefaultAction,
    origin: PolicyOrigin,
) -> Result<LoadedPolicy, String> {
    let loaded = policy::load(name, source, default).map_err(|e| e.to_string())?;
    if !loaded.tests_passed() {
        return Err(loaded
            .failure_summary()
            .unwrap_or_else(|| "policy tests failed".into()));
    }
    for w in &loaded.warnings {
        tracing::warn!("{name}: {w}");
    }
    let applied = AppliedPolicy {
        name: name.to_string(),
        origin,
        default,
        policies: loaded.compiled.set().policies.len(),
        tests: loaded.results.len(),
        source: source.to_string(),
    };
    Ok(LoadedPolicy {
        applied,
        compiled: loaded.compiled,
    })
}

/// The enforcer's limits for this node: the segments it builds towards a local
/// workload fit the TUN's MTU (`node.mtu`) less an IPv6 and a TCP header.
pub fn enforcer_limits(config: &Config) -> enforce::Limits {
    enforce::Limits {
        mss: usize::from(config.node.mtu).saturating_sub(60),
        ..enforce::Limits::default()
    }
}

fn load_policy(config: &Config) -> Result<LoadedPolicy, ConfigError> {
    let default = default_action(config);
    let state_dir = &config.node.state_dir;
    match StoredPolicy::load(state_dir) {
        Err(e) => return Err(config.error("node.state_dir", one_line(&e))),
        Ok(Some(stored)) => {
            let path = state_dir.join(crate::control::state::POLICY_FILE);
            // The rule: the policy last applied at run time (meshctl policy apply, the
            // fleet store) wins over the config's file until it is removed.
            if let Some(file) = config.policy.as_ref().and_then(|p| p.file.as_ref()) {
                tracing::warn!(
                    applied = %stored.name,
                    "policy in force: the one applied at run time ({}), not policy.file {} (apply the file, or remove {} while meshd is stopped, to go back to it)",
                    path.display(),
                    file.display(),
                    path.display()
                );
            }
            return compile_policy(&stored.name, &stored.source, default, PolicyOrigin::Applied)
                .map_err(|e| {
                    config.error(
                        "node.state_dir",
                        format!("{}: applied policy: {e}", path.display()),
                    )
                });
        }
        Ok(None) => {}
    }
    let Some(file) = config.policy.as_ref().and_then(|p| p.file.as_ref()) else {
        return Ok(LoadedPolicy {
            applied: AppliedPolicy {
                name: String::new(),
                origin: PolicyOrigin::None,
                default,
                policies: 0,
                tests: 0,
                source: String::new(),
            },
            compiled: CompiledPolicy::empty(default),
        });
    };
    let source = std::fs::read_to_string(file)
        .map_err(|e| config.error("policy.file", format!("{}: {e}", file.display())))?;
    compile_policy(
        &file.display().to_string(),
        &source,
        default,
        PolicyOrigin::Config,
    )
    .map_err(|e| config.error("policy.file", e))
}

/// Verifies a peer certificate (its addresses are checked against the other
/// identities by [`crate::peers::overlap`]). One outside its validity window at `now` that
/// is otherwise sound is accepted into the registry with `Ok(Some(why))`: it stays
/// listed (a renewal may replace it) and the data path refuses its handshakes, for
/// the same reason ([`crate::peers::PeerSpec::outside_window`]). Anything else is an error.
pub fn check_peer(
    ca: &Ca,
    own: &Certificate,
    cert: &Certificate,
    now: UnixTime,
) -> Result<Option<OutsideWindow>, String> {
    if cert.identity() == own.identity() {
        return Err(format!("{} is this node's own identity", cert.identity()));
    }
    if cert.public_key() == own.public_key() {
        return Err("certificate has this node's own public key".into());
    }
    match ca.verify(cert, now) {
        Ok(_) => Ok(None),
        Err(e @ (VerifyError::Expired(_) | VerifyError::NotYetValid(_))) => {
            // Sound apart from the time: check signature and constraints as of a
            // moment inside its window.
            ca.verify(cert, cert.not_after())
                .map_err(|e| e.to_string())?;
            // The data path's reason (the same window and clock-skew allowance).
            let why = match e {
                VerifyError::NotYetValid(t) => OutsideWindow::NotYetValid(t),
                _ => OutsideWindow::Expired(cert.not_after()),
            };
            Ok(Some(peer_spec(cert).outside_window(now).unwrap_or(why)))
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Reads the node's CA, certificate and key, the config peers and the persisted peer
/// changes, and checks them all. Every error names the config field it comes from.
pub fn load(config: Config, now: UnixTime) -> Result<Loaded, ConfigError> {
    let n = &config.node;
    let ca = files::read_ca(&n.ca).map_err(|e| config.error("node.ca", one_line(&e)))?;
    let own =
        files::read_certificate(&n.cert).map_err(|e| config.error("node.cert", one_line(&e)))?;
    let cert = ca
        .verify(&own, now)
        .map_err(|e| config.error("node.cert", format!("{}: {e}", n.cert.display())))?;
    let key =
        files::read_private_key(&n.key).map_err(|e| config.error("node.key", one_line(&e)))?;
    if key.public_key().as_bytes() != cert.public_key() {
        return Err(config.error(
            "node.key",
            format!(
                "{} does not match the public key in {}",
                n.key.display(),
                n.cert.display()
            ),
        ));
    }

    let mut config_peers = Vec::new();
    let mut refused = Vec::new();
    for (i, p) in config.peers.iter().enumerate() {
        let field = format!("peer[{i}].cert");
        let c = files::read_certificate(&p.cert).map_err(|e| config.error(&field, one_line(&e)))?;
        let outside = check_peer(&ca, &cert, &c, now)
            .map_err(|e| config.error(&field, format!("{}: {e}", p.cert.display())))?;
        if let Some(why) = outside {
            tracing::error!(
                peer = %c.identity(),
                "peer refused: {}: {why} (valid from {} to {})",
                p.cert.display(), c.not_before(), c.not_after()
            );
            refused.push(config.error(
                &field,
                format!(
                    "{}: {why}: meshd would refuse {}'s handshakes",
                    p.cert.display(),
                    c.identity()
                ),
            ));
        }
        config_peers.push(PeerEntry {
            spec: peer_spec(&c),
            cert: c,
            endpoint: p.endpoint,
            source: Source::Config,
        });
    }

    let changes = PeerChanges::load(&n.state_dir)
        .map_err(|e| config.error("node.state_dir", one_line(&e)))?;
    let mut peers: Vec<PeerEntry> = config_peers
        .iter()
        .filter(|p| {
            let id = p.spec.identity.to_string();
            !changes.removed.contains(&id) && !changes.added.iter().any(|a| a.identity == id)
        })
        .cloned()
        .collect();
    for s in &changes.added {
        let c = match Certificate::from_pem(&s.cert) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(peer = %s.identity, "stored peer skipped: {e}");
                continue;
            }
        };
        match check_peer(&ca, &cert, &c, now) {
            Ok(outside) => {
                if let Some(why) = outside {
                    tracing::error!(peer = %c.identity(), "peer refused: {why} (added at run time)");
                }
                peers.push(PeerEntry {
                    spec: peer_spec(&c),
                    cert: c,
                    endpoint: s.endpoint,
                    source: Source::Runtime,
                });
            }
            Err(e) => tracing::error!(peer = %s.identity, "stored peer skipped: {e}"),
        }
    }
    let policy = load_policy(&config)?;
    let (workloads, config_workloads, workload_changes) =
        crate::control::workloads::load(&config, &ca, &cert, &key, now)?;
    let (workloads, peers) =
        admit_addresses(&config, &config_workloads, &config_peers, workloads, peers)?;
    Ok(Loaded {
        config,
        ca,
        cert,
        key,
        peers,
        config_peers,
        changes,
        policy,
        workloads,
        config_workloads,
        workload_changes,
        refused,
    })
}

/// Admits the loaded identities only where their addresses overlap no other's
/// ([`crate::peers::overlap`]). First the configuration on its own — the node, the config's
/// workloads and every `[[peer]]` as written (also one a stored renewal replaces):
/// an overlap there is a config error naming the later entry's field. Then the
/// effective set, one by one against those admitted before: the config's entries in
/// force, the renewals of config entries stored in the state directory, then the
/// rest of it; a stored one that overlaps is skipped, logged (only a meshd from before
/// this check could have stored it, and the node still starts).
fn admit_addresses(
    config: &Config,
    config_workloads: &[WorkloadSpec],
    config_peers: &[PeerEntry],
    workloads: Vec<Workload>,
    peers: Vec<PeerEntry>,
) -> Result<(Vec<Workload>, Vec<PeerEntry>), ConfigError> {
    use crate::control::workloads::Origin;
    let from_config: Vec<&Workload> = workloads
        .iter()
        .filter(|w| w.origin != Origin::Runtime)
        .collect();
    let mut seen: Vec<crate::peers::overlap::Claim<'_>> = Vec::new();
    for w in &from_config {
        let claim = (w.cert.identity(), w.cert.addresses());
        if let Some(o) = crate::peers::overlap::against(claim, seen.iter().copied()) {
            let i = config_workloads
                .iter()
                .position(|c| c.name == w.spec.name)
                .unwrap_or(0);
            return Err(config.error(
                &format!("workload[{i}].cert"),
                format!("{}: {o}", w.spec.cert.display()),
            ));
        }
        seen.push(claim);
    }
    for (i, p) in config_peers.iter().enumerate() {
        let claim = (&p.spec.identity, &p.spec.addresses[..]);
        if let Some(o) = crate::peers::overlap::against(claim, seen.iter().copied()) {
            let path = config.peers.get(i).map(|c| c.cert.display().to_string());
            return Err(config.error(
                &format!("peer[{i}].cert"),
                format!("{}: {o}", path.unwrap_or_default()),
            ));
        }
        seen.push(claim);
    }

    enum Who {
        Workload(Workload),
        Peer(PeerEntry),
    }
    let tier = |who: &Who| match who {
        Who::Workload(w) if w.origin != Origin::Runtime => 0,
        Who::Peer(p) if p.source == Source::Config => 0,
        Who::Workload(w) if config_workloads.iter().any(|c| c.name == w.spec.name) => 1,
        Who::Peer(p)
            if config_peers
                .iter()
                .any(|c| c.spec.identity == p.spec.identity) =>
        {
            1
        }
        _ => 2,
    };
    let mut order: Vec<Who> = workloads
        .into_iter()
        .map(Who::Workload)
        .chain(peers.into_iter().map(Who::Peer))
        .collect();
    // Stable: workloads before peers, each in its own order, within a tier.
    order.sort_by_key(|who| tier(who));
    let mut admitted: Vec<(SpiffeId, Vec<IpNet>)> = Vec::new();
    let (mut workloads, mut peers) = (Vec::new(), Vec::new());
    for who in order {
        let (identity, addresses) = match &who {
            Who::Workload(w) => (w.cert.identity().clone(), w.cert.addresses().to_vec()),
            Who::Peer(p) => (p.spec.identity.clone(), p.spec.addresses.clone()),
        };
        let others = admitted.iter().map(|(i, a)| (i, &a[..]));
        if let Some(o) = crate::peers::overlap::against((&identity, &addresses), others) {
            // The configuration alone overlaps nowhere (checked above): this one
            // comes from the state directory.
            match who {
                Who::Workload(w) => {
                    tracing::error!(workload = %w.spec.name, "stored workload skipped: {o}")
                }
                Who::Peer(p) => {
                    tracing::error!(peer = %p.spec.identity, "stored peer skipped: {o}")
                }
            }
            continue;
        }
        admitted.push((identity, addresses));
        match who {
            Who::Workload(w) => workloads.push(w),
            Who::Peer(p) => peers.push(p),
        }
    }
    Ok((workloads, peers))
}

/// What `meshd check-config` checks on the host beyond the files, so that it fails
/// where the start would: the UDP port can be bound (bound and let go at once) and
/// the TUN's name is free. Both are expected taken by a meshd that runs with this
/// configuration (its control socket answers with this port and device): checking
/// the configuration of a running node before a restart is no error.
pub fn check_host(config: &Config) -> Vec<ConfigError> {
    let n = &config.node;
    let running = crate::control::client::ask_status(&n.control_socket);
    let ours = |s: &Status| s.listen.port() == n.listen.port() && s.tun == n.tun;
    let running = running.filter(ours);
    let mut problems = Vec::new();
    if let Err(e) = Udp::probe(n.listen) {
        // In use by that meshd is expected; anything else (an address not on this
        // host) is what its restart would meet too.
        let held = running.is_some() && e.source.raw_os_error() == Some(libc::EADDRINUSE);
        if !held {
            problems.push(config.error("node.listen", listen_error(&e)));
        }
    }
    if running.is_none() && crate::datapath::device::if_exists(&n.tun) {
        let e = crate::datapath::device::DeviceError::Exists {
            name: n.tun.clone(),
        };
        problems.push(config.error("node.tun", e));
    }
    problems
}

/// What the host said about binding `node.listen`, in words an operator can act on.
pub fn listen_error(e: &crate::datapath::transport::BindError) -> String {
    let hint = match e.source.raw_os_error() {
        Some(libc::EADDRINUSE) => "; another process holds this port (another meshd?)",
        Some(libc::EADDRNOTAVAIL) => "; the address is not on this host",
        Some(libc::EACCES) => "; a port below 1024 needs root or CAP_NET_BIND_SERVICE",
        _ => "",
    };
    format!("{e}{hint}")
}

pub(crate) fn one_line(e: &dyn std::fmt::Display) -> String {
    e.to_string().replace('\n', " ")
}

/// The control plane's view of the peers and local workloads: entries plus the
/// persisted changes.
pub(crate) struct Registry {
    pub(crate) entries: Vec<PeerEntry>,
    config_peers: Vec<PeerEntry>,
    changes: PeerChanges,
    /// Routes currently installed because of peers (when routes are derived from them).
    peer_routes: BTreeSet<IpNet>,
    /// The local workloads, the node's own first.
    pub(crate) workloads: Vec<Workload>,
    pub(crate) config_workloads: Vec<WorkloadSpec>,
    pub(crate) workload_changes: WorkloadChanges,
    /// Pod plumbing, made when the first workload behind a veth arrives.
    pub(crate) pods: Option<crate::control::workloads::Pods>,
}

impl Registry {
    /// The node's own certificate: the first workload's (a renewal replaces it there).
    pub(crate) fn node_cert(&self) -> &Certificate {
        &self.workloads[0].cert
    }

    pub(crate) fn locals(&self) -> Vec<Arc<Local>> {
        self.workloads.iter().map(|w| w.local.clone()).collect()
    }
}

/// The running daemon: the control plane's state, and the data path's it changes.
pub struct Daemon {
    /// What the data path owns and reads (the peer table snapshot, the enforcer, the
    /// TUN and socket). Declared before `host_filter`: the TUN goes first.
    pub plane: Plane,
    applied: Mutex<AppliedPolicy>,
    /// The nftables table that keeps the mesh addresses to meshd; `None` when
    /// `node.host_filter = false`. Dropped (deleted) after the TUN.
    pub(crate) host_filter: Option<crate::control::hostfilter::HostFilter>,
    pub ready: AtomicBool,
    pub(crate) config: Config,
    pub(crate) ca: Ca,
    /// When to try each local workload's certificate and key files again, by name
    /// (timer thread); they are told apart by a keyed digest, so no copy of a key is
    /// kept.
    pub(crate) cert_files: Mutex<HashMap<String, crate::control::workloads::CertFileWatch>>,
    pub(crate) cert_files_hasher: std::hash::RandomState,
    pub(crate) registry: Mutex<Registry>,
    pub(crate) next_index: AtomicU32,
    /// Routes come from the peers' addresses (no `routes` in the config and no CA
    /// address constraints): they change with the peer set.
    dynamic_routes: bool,
    /// Routes into the TUN from the config or the CA's constraints.
    pub(crate) static_routes: Vec<IpNet>,
    /// The quarantine device's packets: read by the `quarantine` thread.
    pub(crate) quarantine: ArcSwap<Option<Arc<Tun>>>,
    /// Renewal warnings given for the local certificates (timer thread).
    expiry: Mutex<ExpiryWatch>,
    /// The learned endpoints last written to the state directory, and whether the
    /// last attempt to write them failed (logged once until a write succeeds).
    learned: Mutex<(LearnedEndpoints, bool)>,
    /// Reads the fleet store input's state for `status` (set by `fleet` when the
    /// config has a `[store]` table).
    store_status: Mutex<Option<StoreStatusReader>>,
}

/// Reads the fleet store input's state.
pub type StoreStatusReader = Box<dyn Fn() -> mesh_proto::store::StoreStatus + Send>;

/// Why the daemon could not start (after the config checked out).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A configured name or address the host will not give meshd (`node.tun`,
    /// `node.listen`), located in meshd.toml like any config error.
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Device(#[from] crate::datapath::device::DeviceError),
    #[error(transparent)]
    Bind(#[from] crate::datapath::transport::BindError),
    #[error("{0}")]
    Peers(String),
    #[error("{0}")]
    HostFilter(String),
}

impl Daemon {
    /// Creates the TUN, binds the socket, installs routes and builds the first peer
    /// table.
    pub fn start(loaded: Loaded, shutdown: Arc<Shutdown>) -> Result<Daemon, StartError> {
        let Loaded {
            config,
            ca,
            cert,
            key: _,
            peers,
            config_peers,
            changes,
            policy,
            workloads,
            config_workloads,
            workload_changes,
            refused: _,
        } = loaded;
        let log = Arc::new(DecisionLog::new(LogLimits::default()));
        let enforce = Enforcer::new(
            workloads[0].local.workload.clone(),
            policy.compiled,
            enforcer_limits(&config),
            log.clone(),
        );
        tracing::info!(
            policy = %policy.applied.name,
            origin = policy.applied.origin.as_str(),
            default = ?policy.applied.default,
            "policy in force"
        );
        let node = Node::new();
        let locals: Vec<Arc<Local>> = workloads.iter().map(|w| w.local.clone()).collect();
        // Sessions are numbered from a random slot: after a restart, a peer still
        // sending under its old session's index most likely names no session at all
        // (then its packets make this node handshake with it, `Inbound::RehandshakeAt`),
        // rather than one with another peer that would only fail to decrypt them.
        let first_slot = rand_core::RngCore::next_u32(&mut rand_core::OsRng);
        let table = build_table(&locals, &peers, &PeerTable::default(), first_slot)
            .map_err(StartError::Peers)?;
        let learned = restore_learned_endpoints(&config.node.state_dir, &peers, &table);
        let own_addrs = cert.addresses().to_vec();
        // The socket first: a port in use stops meshd before it touches any interface.
        let udp = Udp::bind(config.node.listen, config.node.udp_offload)
            .map_err(|e| config.error("node.listen", listen_error(&e)))?;
        // Before the overlay addresses exist.
        let ruleset = crate::control::workloads::host_filter_ruleset(&config.node.tun, &workloads);
        let host_filter =
            crate::control::hostfilter::start(config.node.host_filter, ruleset).map_err(|e| {
                StartError::HostFilter(
                    config
                        .error(
                            "node.host_filter",
                            format!(
                                "cannot install the host filter (nftables table inet {}): {e}; meshd does not run without it: fix that, or set host_filter = false in [node] to run unprotected",
                                crate::control::hostfilter::table_name(&config.node.tun)
                            ),
                        )
                        .to_string(),
                )
            })?;
        let tun =
            Tun::create(&config.node.tun, config.node.mtu, &own_addrs).map_err(|e| match e {
                crate::datapath::device::DeviceError::Exists { .. } => {
                    StartError::Config(config.error("node.tun", e))
                }
                e => StartError::Device(e),
            })?;
        let (gro, gso) = udp.offload();
        tracing::info!(gro, gso, "UDP offload (node.udp_offload)");

        let ca_constraints: Vec<IpNet> = ca
            .cert()
            .ca_constraints()
            .map(|c| c.addresses.clone())
            .unwrap_or_default();
        let (static_routes, dynamic_routes) = match &config.node.routes {
            Some(r) => (r.clone(), false),
            None if !ca_constraints.is_empty() => (ca_constraints, false),
            None => (Vec::new(), true),
        };
        let static_routes_kept = static_routes.clone();
        for r in static_routes.iter().filter(|r| route_needed(r, &own_addrs)) {
            tun.add_route(*r)?;
        }
        let mut peer_routes = BTreeSet::new();
        if dynamic_routes {
            for r in peer_route_set(&peers, &own_addrs) {
                tun.add_route(r)?;
                peer_routes.insert(r);
            }
        }
        tracing::info!(
            identity = %cert.identity(),
            tun = tun.name(),
            listen = %udp.local_addr(),
            peers = peers.len(),
            "meshd up"
        );
        if let Some(us) = config.node.cpu_latency_us {
            tracing::info!(
                "requesting a CPU wake-up latency of {us} µs while traffic flows (node.cpu_latency_us)"
            );
        }
        let next = table.peers().iter().map(|p| p.index + 1).max().unwrap_or(1);
        let d = Daemon {
            plane: Plane {
                cpu_latency: CpuLatency::new(config.node.cpu_latency_us),
                node,
                table: ArcSwap::from_pointee(table),
                enforce,
                log,
                #[allow(clippy::disallowed_methods)] // I/O shell: the monotonic clock's origin
                epoch: std::time::Instant::now(),
                tun,
                udp,
                shutdown,
                seg_len: Plane::segment_len(config.node.mtu),
            },
            applied: Mutex::new(policy.applied),
            host_filter,
            ready: AtomicBool::new(false),
            config,
            ca,
            cert_files: Mutex::new(HashMap::new()),
            cert_files_hasher: std::hash::RandomState::new(),
            registry: Mutex::new(Registry {
                entries: peers,
                config_peers,
                changes,
                peer_routes,
                workloads: Vec::new(),
                config_workloads,
                workload_changes,
                pods: None,
            }),
            next_index: AtomicU32::new(next),
            dynamic_routes,
            static_routes: static_routes_kept,
            quarantine: ArcSwap::from_pointee(None),
            expiry: Mutex::new(ExpiryWatch::default()),
            learned: Mutex::new((learned, false)),
            store_status: Mutex::new(None),
        };
        d.attach_all(workloads).map_err(StartError::Peers)?;
        Ok(d)
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn status(&self) -> Status {
        let table = self.plane.table.load();
        let peers = table
            .peers()
            .iter()
            .map(|p| {
                let s = p.stats();
                PeerStatus {
                    identity: p.spec.identity.to_string(),
                    local: Some(p.local.spec.identity.to_string()),
                    public_key: PublicKey::from(p.spec.public_key).to_base64(),
                    endpoint: s.endpoint,
                    addresses: p.spec.addresses.clone(),
                    latest_handshake: s.latest_handshake,
                    rx_bytes: s.rx_bytes,
                    tx_bytes: s.tx_bytes,
                    drops: s.drops,
                    not_before: p.spec.not_before,
                    not_after: p.spec.not_after,
                }
            })
            .collect();
        let own = self.lock_registry().node_cert().clone();
        Status {
            ready: self.ready.load(Ordering::SeqCst),
            identity: own.identity().to_string(),
            public_key: PublicKey::from(*own.public_key()).to_base64(),
            listen: self.plane.udp.local_addr(),
            tun: self.plane.tun.name().to_string(),
            addresses: own.addresses().to_vec(),
            peers,
            drops: NodeDrops {
                tun_write: self.plane.tun.write_failures(),
                udp_send: self.plane.udp.send_failures(),
                ..self.plane.node.drops()
            },
            workloads: self.workload_list().workloads,
            enforcement: Some(Enforcement {
                policy: self.policy_get(),
                counters: enforcement_counters(self.plane.enforce.counters()),
                decision_log: self.plane.log.counters(),
            }),
            cpu_latency: self.plane.cpu_latency.status(),
            host_filter: Some(self.host_filter_status()),
            store: self
                .store_status
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .map(|read| read()),
        }
    }

    /// Where `status` reads the fleet store input's state from.
    pub fn set_store_status(&self, read: StoreStatusReader) {
        *self.store_status.lock().unwrap_or_else(|p| p.into_inner()) = Some(read);
    }

    /// Logs each local certificate (the node's, the workloads') that has entered its
    /// renewal notice or ended since the last look: peers refuse an ended one, so this
    /// is the operator's only warning on this node.
    pub fn check_certificates(&self, now: UnixTime) {
        let reg = self.lock_registry();
        let mut watch = self.expiry.lock().unwrap_or_else(|p| p.into_inner());
        for w in &reg.workloads {
            let (name, not_after) = (w.spec.name.as_str(), w.cert.not_after());
            let Some(term) = watch.observe(name, w.cert.not_before(), not_after, now) else {
                continue;
            };
            let identity = w.cert.identity();
            let renew = "renew it in place (meshctl cert renew <its file>: meshd takes it within seconds) and give it to the peers (meshctl peer add)";
            match term {
                Term::RenewSoon { left } => tracing::warn!(
                    workload = name,
                    "certificate of {identity} expires at {not_after} (in {}); peers will refuse it then: {renew}",
                    span(left)
                ),
                Term::Expired { ago } => tracing::error!(
                    workload = name,
                    "certificate of {identity} expired at {not_after} ({} ago): peers refuse its handshakes and traffic; {renew}",
                    span(ago)
                ),
                Term::NotYetValid { .. } | Term::Valid { .. } => {}
            }
        }
        watch.end_round();
    }

    /// Writes the endpoints learned from peers' packets (where they differ from the
    /// configured ones) to the state directory, when they changed since the last
    /// write: from the timer every few seconds, and at shutdown.
    pub fn save_learned_endpoints(&self) {
        let current = {
            let reg = self.lock_registry();
            let configured = configured_endpoints(&reg.entries);
            let table = self.plane.table.load();
            LearnedEndpoints::from_peers(table.peers().iter().filter_map(|p| {
                let configured = configured.get(&p.spec.identity).copied().flatten();
                let current = p.endpoint();
                (current.is_some() && current != configured)
                    .then(|| (&p.spec.identity, configured, current))
            }))
        };
        let mut guard = self.learned.lock().unwrap_or_else(|p| p.into_inner());
        let (last, failing) = &mut *guard;
        if *last == current {
            return;
        }
        match crate::control::state::write(&self.config.node.state_dir, &current) {
            Ok(()) => {
                *last = current;
                *failing = false;
            }
            // Retried at every save; said once, not every 10 s.
            Err(e) if !*failing => {
                *failing = true;
                tracing::warn!("cannot save the peers' learned endpoints (retrying): {e}");
            }
            Err(e) => tracing::debug!("cannot save the peers' learned endpoints: {e}"),
        }
    }

    /// Resets both ends of each cut TCP flow (the enforcer removed them already).
    pub fn cut_flows(&self, cuts: &[enforce::Cut]) {
        if cuts.is_empty() {
            return;
        }
        let mut emit = enforce::Emit::default();
        for cut in cuts {
            cut.resets(&mut emit);
        }
        let mut buf = vec![0u8; 2048];
        crate::datapath::send_emitted(&self.plane, &emit, &mut buf);
    }

    /// After the peer table changed: flows opened by an identity no longer in it
    /// (a removed peer or workload) are cut, and flows opened under groups that a
    /// renewed certificate (kept session) no longer names are decided again under
    /// the policy in force and cut if it now forbids them, as after a policy change.
    pub(crate) fn refresh_flows(&self) {
        let table = self.plane.table.load();
        let mut groups: HashMap<&str, Arc<[String]>> = HashMap::new();
        for p in table.peers() {
            groups.insert(&p.sender.identity, p.sender.groups.clone());
        }
        for l in table.locals() {
            if let Some(id) = &l.workload.identity {
                groups.insert(id, l.workload.groups.clone());
            }
        }
        let now = crate::sys::clock::unix_now();
        let cuts = self.plane.enforce.refresh_identities(
            |id| groups.get(id).cloned(),
            self.plane.mono(),
            now,
        );
        if !cuts.is_empty() {
            tracing::info!(
                cut = cuts.len(),
                "flows cut: their identity left the mesh, or its renewed certificate names groups the policy in force does not allow"
            );
            self.cut_flows(&cuts);
        }
    }

    pub fn policy_get(&self) -> PolicyInfo {
        self.applied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .info()
    }

    /// Validates, tests, persists and swaps in a policy; returns what it did and the
    /// flows the new policy cuts (the caller resets them).
    pub fn policy_apply(
        &self,
        source: &str,
        name: &str,
        now: UnixTime,
    ) -> Result<(PolicyApplied, Vec<enforce::Cut>), ControlError> {
        let mut applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
        let loaded = compile_policy(name, source, applied.default, PolicyOrigin::Applied)
            .map_err(|e| ControlError::Refused(format!("policy_apply: {e}")))?;
        StoredPolicy::new(name, source)
            .save(&self.config.node.state_dir)
            .map_err(|e| ControlError::Internal(format!("policy_apply: cannot persist: {e}")))?;
        let cuts = self
            .plane
            .enforce
            .set_policy(loaded.compiled, self.plane.mono(), now);
        *applied = loaded.applied;
        tracing::info!(policy = %name, policies = applied.policies, cut = cuts.len(), "policy applied");
        let result = PolicyApplied {
            name: name.to_string(),
            policies: applied.policies as u64,
            tests: applied.tests as u64,
            cut_flows: cuts.len() as u64,
        };
        Ok((result, cuts))
    }

    /// Explains a described request against the policy in force; the workload is
    /// this node unless the request names one.
    pub fn explain(&self, mut spec: RequestSpec) -> Explanation {
        if spec.workload.is_none() {
            let reg = self.lock_registry();
            let own = reg.node_cert();
            spec.workload = Some(own.identity().to_string());
            spec.workload_groups = own.groups().to_vec();
        }
        self.plane
            .enforce
            .with_policy(|p| policy::explain(p, &spec))
    }

    pub fn peer_list(&self) -> PeerList {
        let reg = self.lock_registry();
        let table = self.plane.table.load();
        PeerList {
            peers: reg
                .entries
                .iter()
                .map(|e| {
                    let endpoint = table
                        .by_identity(&e.spec.identity)
                        .and_then(|p| p.endpoint())
                        .or(e.endpoint);
                    info(e, endpoint)
                })
                .collect(),
        }
    }

    pub(crate) fn lock_registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Validates and adds (or replaces) a peer; persisted before it takes effect.
    pub fn peer_add(
        &self,
        pem: &str,
        endpoint: Option<SocketAddr>,
        now: UnixTime,
    ) -> Result<PeerInfo, ControlError> {
        let refused = |e: String| ControlError::Refused(format!("peer_add: {e}"));
        let cert = Certificate::from_pem(pem).map_err(|e| refused(e.to_string()))?;
        let id = cert.identity().clone();
        self.peer_add_many(&[(cert, endpoint)], now)
            .pop()
            .unwrap_or_else(|| Err(ControlError::Internal("peer_add: no result".into())))?;
        let reg = self.lock_registry();
        let entry = reg
            .entries
            .iter()
            .find(|e| e.spec.identity == id)
            .ok_or_else(|| ControlError::Internal(format!("peer_add: {id} not in force")))?;
        Ok(info(entry, endpoint))
    }

    /// Validates and adds (or replaces) peers in one commit: one table build, one
    /// write of the state file, whatever their number (a fleet store's listing of
    /// a thousand certificates). Each is checked as `peer add` checks it, against the
    /// peers before it in `list` too; one refused does not hold up the others. The
    /// results are in `list`'s order; persisted before any takes effect.
    pub fn peer_add_many(
        &self,
        list: &[(Certificate, Option<SocketAddr>)],
        now: UnixTime,
    ) -> Vec<Result<(), ControlError>> {
        let refused = |e: String| ControlError::Refused(format!("peer_add: {e}"));
        let mut reg = self.lock_registry();
        let mut entries = reg.entries.clone();
        let mut changes = reg.changes.clone();
        let mut results = Vec::with_capacity(list.len());
        let mut added = Vec::new();
        for (cert, endpoint) in list {
            let check = || -> Result<(), ControlError> {
                self.ca
                    .verify(cert, now)
                    .map_err(|e| refused(format!("{}: {e}", cert.identity())))?;
                check_peer(&self.ca, reg.node_cert(), cert, now)
                    .map_err(|e| refused(format!("{}: {e}", cert.identity())))?;
                // Against the local workloads and the other peers (the same
                // identity's certificate is the one replaced).
                let locals = reg.workloads.iter().map(|w| &w.local.spec);
                let others = claims(locals, &entries);
                match crate::peers::overlap::against((cert.identity(), cert.addresses()), others) {
                    Some(o) => Err(refused(o.to_string())),
                    None => Ok(()),
                }
            };
            let result = check();
            if result.is_ok() {
                let entry = PeerEntry {
                    spec: peer_spec(cert),
                    cert: cert.clone(),
                    endpoint: *endpoint,
                    source: Source::Runtime,
                };
                entries.retain(|e| e.spec.identity != entry.spec.identity);
                changes.add(StoredPeer {
                    identity: entry.spec.identity.to_string(),
                    cert: entry.cert.to_pem(),
                    endpoint: *endpoint,
                });
                added.push((entry.spec.identity.clone(), *endpoint));
                entries.push(entry);
            }
            results.push(result);
        }
        if added.is_empty() {
            return results;
        }
        if let Err(e) = self.commit(&mut reg, entries, changes) {
            return results.into_iter().map(|r| r.and(Err(e.clone()))).collect();
        }
        let table = self.plane.table.load();
        for (id, endpoint) in &added {
            if let Some(ep) = endpoint {
                // An unchanged peer keeps its session; the operator's endpoint still
                // wins.
                for p in table.sessions_of(id) {
                    p.set_endpoint(Some(*ep));
                }
            }
            tracing::info!(peer = %id, "peer added");
        }
        results
    }

    /// Removes a peer (config or runtime); persisted before it takes effect.
    pub fn peer_remove(&self, identity: &str) -> Result<String, ControlError> {
        let id = SpiffeId::parse(identity)
            .map_err(|e| ControlError::Refused(format!("peer_remove: {identity:?}: {e}")))?;
        let mut reg = self.lock_registry();
        let Some(pos) = reg.entries.iter().position(|e| e.spec.identity == id) else {
            return Err(ControlError::NotFound(format!("peer_remove: no peer {id}")));
        };
        let mut entries = reg.entries.clone();
        entries.remove(pos);
        let from_config = reg.config_peers.iter().any(|e| e.spec.identity == id);
        let mut changes = reg.changes.clone();
        changes.remove(&id.to_string(), from_config);
        self.commit(&mut reg, entries, changes)?;
        tracing::info!(peer = %id, "peer removed");
        Ok(id.to_string())
    }

    /// Builds the new table (validating it: a set it refuses is
    /// [`ControlError::Refused`]), persists the changes, then swaps the snapshot and
    /// updates routes. Nothing changes if any step before the swap fails.
    fn commit(
        &self,
        reg: &mut Registry,
        entries: Vec<PeerEntry>,
        changes: PeerChanges,
    ) -> Result<(), ControlError> {
        let old = self.plane.table.load_full();
        let hint = self.next_index.load(Ordering::Relaxed);
        let table =
            build_table(&reg.locals(), &entries, &old, hint).map_err(ControlError::Refused)?;
        changes
            .save(&self.config.node.state_dir)
            .map_err(|e| ControlError::Internal(format!("cannot persist peers: {e}")))?;
        let max = table.peers().iter().map(|p| p.index + 1).max().unwrap_or(1);
        self.next_index.fetch_max(max, Ordering::Relaxed);
        self.plane.table.store(Arc::new(table));
        self.refresh_flows();
        if self.dynamic_routes {
            let want = peer_route_set(&entries, reg.node_cert().addresses());
            for r in want.difference(&reg.peer_routes) {
                if let Err(e) = self.plane.tun.add_route(*r) {
                    tracing::error!("{e}");
                }
            }
            for r in reg.peer_routes.difference(&want) {
                if let Err(e) = self.plane.tun.remove_route(*r) {
                    tracing::warn!("{e}");
                }
            }
            reg.peer_routes = want;
        }
        reg.entries = entries;
        reg.changes = changes;
        Ok(())
    }
}

/// The control plane's chores tick at this interval.
const CHORES_TICK: Duration = Duration::from_secs(1);
/// Learned peer endpoints are saved (when changed) every this many ticks: 10 s.
const SAVE_ENDPOINTS_TICKS: u64 = 10;

/// The control plane's timed chores, on a thread of their own so that the data path's
/// timer never calls into the daemon: every second, renewed certificate files are
/// taken and certificates near their end are warned of; every ten, the peers' learned
/// endpoints are saved.
pub fn chores_loop(d: &Daemon) {
    let mut ticks = 0u64;
    while !d.plane.shutdown.wait_timeout(CHORES_TICK) {
        ticks += 1;
        let now = crate::sys::clock::unix_now();
        d.check_cert_files(now);
        d.check_certificates(now);
        if ticks.is_multiple_of(SAVE_ENDPOINTS_TICKS) {
            d.save_learned_endpoints();
        }
    }
}

impl Daemon {
    /// Replaces the host filter's table for the workloads `workloads` (the node's
    /// first); the table in force stays if nft refuses.
    pub(crate) fn update_host_filter(&self, workloads: &[Workload]) -> Result<(), String> {
        let Some(f) = &self.host_filter else {
            return Ok(());
        };
        f.update(crate::control::workloads::host_filter_ruleset(
            self.plane.tun.name(),
            workloads,
        ))
        .map_err(|e| format!("host filter: {e}"))
    }

    /// Deletes the host filter's table (at stop, when the daemon itself outlives `run`).
    pub fn remove_host_filter(&self) {
        if let Some(f) = &self.host_filter {
            f.remove();
        }
    }

    pub(crate) fn host_filter_status(&self) -> HostFilterStatus {
        self.host_filter.as_ref().map_or_else(
            HostFilterStatus::disabled,
            crate::control::hostfilter::HostFilter::status,
        )
    }
}

impl Loaded {
    /// The host filter's table for what was loaded (`meshd check-config` checks it).
    pub fn host_filter_ruleset(&self) -> crate::control::hostfilter::Ruleset {
        crate::control::workloads::host_filter_ruleset(&self.config.node.tun, &self.workloads)
    }
}

fn info(e: &PeerEntry, endpoint: Option<SocketAddr>) -> PeerInfo {
    PeerInfo {
        identity: e.spec.identity.to_string(),
        public_key: PublicKey::from(e.spec.public_key).to_base64(),
        endpoint,
        addresses: e.spec.addresses.clone(),
        groups: e.spec.groups.clone(),
        not_after: e.spec.not_after,
        source: e.source,
    }
}

/// The enforcer's counters as `status` reports them. Every field is named, so that a
/// counter added to the enforcer does not compile until the contract carries it.
fn enforcement_counters(c: enforce::L4Counters) -> EnforcementCounters {
    let enforce::L4Counters {
        delivered,
        flows,
        flows_cut,
        flows_evicted,
        drops,
        rules,
        l7_flows,
        l7_held_bytes,
        http_requests,
        http_refused,
    } = c;
    EnforcementCounters {
        delivered,
        flows: flows as u64,
        flows_cut: flows_cut as u64,
        flows_evicted,
        drops: drops
            .into_iter()
            .map(|(reason, n)| (reason.to_string(), n))
            .collect(),
        rules: rules
            .into_iter()
            .map(|r| {
                let enforce::RuleCount {
                    policy,
                    rule,
                    allow,
                    deny,
                    audit,
                } = r;
                RuleCount {
                    policy,
                    rule,
                    allow,
                    deny,
                    audit,
                }
            })
            .collect(),
        l7_flows: l7_flows as u64,
        l7_held_bytes: l7_held_bytes as u64,
        http_requests,
        http_refused,
    }
}

fn peer_route_set(peers: &[PeerEntry], own: &[IpNet]) -> BTreeSet<IpNet> {
    peers
        .iter()
        .flat_map(|p| p.spec.addresses.iter().map(|a| a.trunc()))
        .filter(|r| route_needed(r, own))
        .collect()
}

/// Points the sessions of each peer at the endpoint it was last heard from before the
/// restart, where that was learned under the endpoint still configured (see
/// [`LearnedEndpoints`]). An unreadable file is a lost cache: logged and ignored. Returns
/// what the file holds, so that an unchanged set is not written again.
fn restore_learned_endpoints(
    state_dir: &std::path::Path,
    entries: &[PeerEntry],
    table: &PeerTable,
) -> LearnedEndpoints {
    let learned = match crate::control::state::read::<LearnedEndpoints>(state_dir) {
        Ok(l) => l.unwrap_or_else(LearnedEndpoints::empty),
        Err(e) => {
            tracing::warn!(
                "ignoring the learned peer endpoints (a cache, replaced when one is next learned): {e}"
            );
            return LearnedEndpoints::empty();
        }
    };
    if learned.peers.is_empty() {
        return learned;
    }
    let configured = configured_endpoints(entries);
    let mut restored = 0;
    for p in table.peers() {
        let configured = configured.get(&p.spec.identity).copied().flatten();
        if let Some(ep) = learned.usable(&p.spec.identity.to_string(), configured) {
            p.set_endpoint(Some(ep));
            restored += 1;
        }
    }
    if restored > 0 {
        tracing::info!(
            sessions = restored,
            "endpoints learned before the restart restored"
        );
    }
    learned
}

/// Each peer's configured endpoint (meshd.toml or `peer add`), by identity.
fn configured_endpoints(entries: &[PeerEntry]) -> HashMap<&SpiffeId, Option<SocketAddr>> {
    entries
        .iter()
        .map(|e| (&e.spec.identity, e.endpoint))
        .collect()
}

#[cfg(test)]
mod tests;
