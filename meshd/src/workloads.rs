//! Local workloads: the identities this host holds besides its own (pods), each with
//! its own certificate and static key, from meshd.toml's `[[workload]]` tables and
//! from `meshctl workload add` (persisted in `<state_dir>/workloads.json`).
//!
//! The effective set is `node + (config workloads − removed) ∪ added`, where an added
//! workload replaces a config workload of the same name — the bookkeeping peers use
//! (`state::PeerChanges`). Certificates and keys stay in the operator's files: the
//! state file records their paths, and every start reads and verifies them again.
//!
//! Each workload is a [`Local`] of the session table: its own static key, one session
//! with every peer (`crate::peers`). How a workload's traffic reaches meshd (its
//! attachment) is set up by [`crate::attach`]; the `quarantine` thread counts what
//! pods send with sources they do not own and re-attaches pods whose veth (re)appears.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use ipnet::IpNet;
use mesh_proto::cert::{Ca, Certificate, VerifiedCert};
use mesh_proto::config::{
    check_interface_name, check_workload_name, Config, ConfigError, NODE_WORKLOAD,
};
use mesh_proto::control::{Attach, ControlError, WorkloadInfo, WorkloadList};
use mesh_proto::files;
use mesh_proto::key::{PrivateKey, PublicKey};
use mesh_proto::time::UnixTime;
use serde::{Deserialize, Serialize};

use crate::attach::{if_index, Attacher};
use crate::daemon::{one_line, peer_spec, Daemon, Registry};
use crate::device::Tun;
use crate::hostfilter::{PodLink, Ruleset};
use crate::peers::{build_table, is_routable, Local, PeerTable};
use crate::poll::wait_readable;
use crate::state::StateError;

pub const STATE_FILE: &str = "workloads.json";
use crate::state::STATE_VERSION;

/// Where a workload comes from (as `workload_list` reports it).
pub use mesh_proto::control::WorkloadSource as Origin;

/// What the operator asked for: a named certificate and key, and an attachment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadSpec {
    pub name: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub veth: Option<String>,
}

impl WorkloadSpec {
    /// Checks the name and the interface name (not the files).
    pub fn check(&self) -> Result<(), String> {
        check_workload_name(&self.name).map_err(|e| format!("name: {e}"))?;
        if let Some(v) = &self.veth {
            check_interface_name(v).map_err(|e| format!("veth: {e}"))?;
        }
        if !self.cert.is_absolute() || !self.key.is_absolute() {
            return Err("cert and key must be absolute paths".into());
        }
        Ok(())
    }
}

/// One local workload of the effective set, verified, with its static key loaded.
#[derive(Clone, Debug)]
pub struct Workload {
    pub spec: WorkloadSpec,
    pub cert: Certificate,
    pub local: Arc<Local>,
    pub origin: Origin,
}

impl Workload {
    pub fn info(&self) -> WorkloadInfo {
        WorkloadInfo {
            name: self.spec.name.clone(),
            identity: self.cert.identity().to_string(),
            public_key: PublicKey::from(*self.cert.public_key()).to_base64(),
            addresses: self.cert.addresses().to_vec(),
            groups: self.cert.groups().to_vec(),
            not_before: self.cert.not_before(),
            not_after: self.cert.not_after(),
            attach: match &self.spec.veth {
                Some(v) => Attach::Veth(v.clone()),
                None => Attach::Tun,
            },
            source: self.origin,
        }
    }
}

/// Reads a workload's certificate and key and checks them: signed by the CA, valid
/// now, and the key is the certificate's.
pub fn read(
    ca: &Ca,
    spec: &WorkloadSpec,
    now: UnixTime,
) -> Result<(VerifiedCert, PrivateKey), String> {
    let cert = files::read_certificate(&spec.cert).map_err(|e| e.to_string())?;
    let cert = ca
        .verify(&cert, now)
        .map_err(|e| format!("{}: {e}", spec.cert.display()))?;
    let key = files::read_private_key(&spec.key).map_err(|e| e.to_string())?;
    if key.public_key().as_bytes() != cert.public_key() {
        return Err(format!(
            "{} does not match the public key in {}",
            spec.key.display(),
            spec.cert.display()
        ));
    }
    Ok((cert, key))
}

/// Runtime workload changes, persisted in `<state_dir>/workloads.json`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadChanges {
    pub version: u32,
    /// Workloads added at run time.
    pub added: Vec<WorkloadSpec>,
    /// Names of config-file workloads removed at run time.
    pub removed: Vec<String>,
}

impl crate::state::StateFile for WorkloadChanges {
    const FILE: &'static str = STATE_FILE;
    const HOLDS: (&'static str, &'static str) = (
        "the workloads added and removed at run time",
        "meshctl workload add, workload remove",
    );
    fn version(&self) -> u32 {
        self.version
    }
}

impl WorkloadChanges {
    /// Reads the state file; a missing file means "no changes".
    pub fn load(state_dir: &Path) -> Result<WorkloadChanges, StateError> {
        Ok(crate::state::read(state_dir)?.unwrap_or(WorkloadChanges {
            version: STATE_VERSION,
            ..WorkloadChanges::default()
        }))
    }

    /// Writes atomically (temp file, fsync, rename), mode 0600.
    pub fn save(&self, state_dir: &Path) -> Result<(), StateError> {
        crate::state::write(state_dir, self)
    }

    /// Records an added (or replaced) workload.
    pub fn add(&mut self, spec: WorkloadSpec) {
        self.removed.retain(|r| *r != spec.name);
        self.added.retain(|w| w.name != spec.name);
        self.added.push(spec);
    }

    /// Records a removal. `from_config`: the name is a config-file workload.
    pub fn remove(&mut self, name: &str, from_config: bool) {
        self.added.retain(|w| w.name != name);
        if from_config && !self.removed.iter().any(|r| r == name) {
            self.removed.push(name.to_string());
        }
    }

    /// The effective specs: config workloads not removed nor replaced, then the added
    /// ones, each with its origin.
    pub fn apply(&self, config: &[WorkloadSpec]) -> Vec<(WorkloadSpec, Origin)> {
        config
            .iter()
            .filter(|w| {
                !self.removed.contains(&w.name) && !self.added.iter().any(|a| a.name == w.name)
            })
            .map(|w| (w.clone(), Origin::Config))
            .chain(self.added.iter().map(|w| (w.clone(), Origin::Runtime)))
            .collect()
    }
}

/// The node's own workload name, for messages.
pub fn is_node(name: &str) -> bool {
    name == NODE_WORKLOAD
}

/// The node's own identity as workload `node`, then the config's `[[workload]]`s and
/// the persisted runtime changes. A config workload that does not check out stops the
/// start (its error names the field); a stored one is skipped with an error logged.
pub(crate) fn load(
    config: &Config,
    ca: &Ca,
    cert: &VerifiedCert,
    key: &PrivateKey,
    now: UnixTime,
) -> Result<(Vec<Workload>, Vec<WorkloadSpec>, WorkloadChanges), ConfigError> {
    let n = &config.node;
    let own: &Certificate = cert;
    let mut workloads = vec![Workload {
        spec: WorkloadSpec {
            name: mesh_proto::config::NODE_WORKLOAD.into(),
            cert: n.cert.clone(),
            key: n.key.clone(),
            veth: None,
        },
        cert: own.clone(),
        local: Arc::new(Local::new(peer_spec(own), *key.as_bytes())),
        origin: Origin::Node,
    }];
    let config_workloads: Vec<WorkloadSpec> = config
        .workloads
        .iter()
        .map(|w| WorkloadSpec {
            name: w.name.clone(),
            cert: w.cert.clone(),
            key: w.key.clone(),
            veth: w.veth.clone(),
        })
        .collect();
    let changes = WorkloadChanges::load(&n.state_dir)
        .map_err(|e| config.error("node.state_dir", one_line(&e)))?;
    for (spec, origin) in changes.apply(&config_workloads) {
        match crate::workloads::read(ca, &spec, now) {
            Ok((c, k)) => workloads.push(Workload {
                local: Arc::new(Local::new(peer_spec(&c), *k.as_bytes())),
                cert: c.into_inner(),
                spec,
                origin,
            }),
            Err(e) if origin == Origin::Config => {
                let i = config_workloads
                    .iter()
                    .position(|w| w.name == spec.name)
                    .unwrap_or(0);
                return Err(config.error(&format!("workload[{i}].cert"), e));
            }
            Err(e) => tracing::error!(workload = %spec.name, "stored workload skipped: {e}"),
        }
    }
    Ok((workloads, config_workloads, changes))
}

/// The pod plumbing of a running daemon: the routing rules and the quarantine device
/// (see [`crate::attach`]). Made when the first workload behind a veth arrives, so a
/// host without pods changes nothing in the kernel's routing.
pub struct Pods {
    attacher: Attacher,
    /// Attached veths and the interface index they had then (a re-created veth gets
    /// a new one and must be attached again).
    attached: HashMap<String, u32>,
    /// Kept open for the routes through it; read by [`quarantine_loop`].
    _quarantine: Arc<Tun>,
}

/// The table for the node's state: its own overlay addresses (the first workload's,
/// each a host address on the TUN) and every workload behind a veth, attached or not
/// yet (a pod is held to meshd from the moment its veth may appear). The routed mesh
/// prefixes are not in it: they may cover the underlay (a more specific route keeps
/// the endpoints there), and the interface rules keep whatever they route to the TUN.
pub(crate) fn host_filter_ruleset(tun: &str, workloads: &[Workload]) -> Ruleset {
    let mesh: Vec<IpNet> = workloads.first().map_or_else(Vec::new, |node| {
        node.cert
            .addresses()
            .iter()
            .map(|a| IpNet::from(a.addr()))
            .collect()
    });
    let pods = workloads
        .iter()
        .filter_map(|w| {
            Some(PodLink {
                veth: w.spec.veth.clone()?,
                addresses: w.cert.addresses().to_vec(),
            })
        })
        .collect();
    Ruleset::new(tun, &quarantine_name(tun), &mesh, pods)
}

/// The quarantine device's name: the TUN's, plus `q` (within 15 bytes).
pub(crate) fn quarantine_name(tun: &str) -> String {
    format!("{}q", &tun[..tun.len().min(14)])
}

impl Daemon {
    /// The local workloads (the node's own first).
    pub fn workload_list(&self) -> WorkloadList {
        let reg = self.lock_registry();
        WorkloadList {
            workloads: reg.workloads.iter().map(Workload::info).collect(),
        }
    }

    /// At start: attaches every workload behind a veth. One whose veth is missing is
    /// kept and logged; it is attached when the veth appears
    /// ([`Daemon::reconcile_attachments`]).
    pub(crate) fn attach_all(&self, workloads: Vec<Workload>) -> Result<(), String> {
        let mut reg = self.lock_registry();
        reg.workloads = workloads;
        for (name, veth, addresses) in veth_workloads(&reg) {
            if let Err(e) = self.attach(&mut reg, &veth, &addresses) {
                tracing::error!(workload = %name, "cannot attach: {e}");
            }
        }
        Ok(())
    }

    fn attach(&self, reg: &mut Registry, veth: &str, addresses: &[IpNet]) -> Result<(), String> {
        if reg.pods.is_none() {
            let n = &self.config.node;
            let qname = quarantine_name(self.plane.tun.name());
            let q = Arc::new(Tun::create(&qname, n.mtu, &[]).map_err(|e| e.to_string())?);
            // The host's own traffic to its pods comes from its certificate's addresses.
            let host: Vec<std::net::IpAddr> = reg.workloads.first().map_or_else(Vec::new, |w| {
                w.cert.addresses().iter().map(|a| a.addr()).collect()
            });
            let attacher = Attacher::new(
                self.plane.tun.name(),
                &host,
                Some(q.name()),
                &self.static_routes,
            )
            .map_err(|e| e.to_string())?;
            self.quarantine.store(Arc::new(Some(q.clone())));
            reg.pods = Some(Pods {
                attacher,
                attached: HashMap::new(),
                _quarantine: q,
            });
        }
        let pods = reg.pods.as_mut().ok_or("internal: no pod plumbing")?;
        let index = if_index(veth).ok_or_else(|| format!("interface {veth} does not exist"))?;
        pods.attacher
            .attach(veth, addresses)
            .map_err(|e| e.to_string())?;
        pods.attached.insert(veth.to_string(), index);
        // Packets to the pod from the host and from other pods enter the TUN too.
        for a in addresses.iter().filter(|a| !self.covered(a)) {
            if let Err(e) = self.plane.tun.add_route(a.trunc()) {
                tracing::error!("{e}");
            }
        }
        Ok(())
    }

    fn detach(&self, reg: &mut Registry, veth: &str, addresses: &[IpNet]) {
        if let Some(pods) = reg.pods.as_mut() {
            pods.attacher.detach(veth, addresses);
            pods.attached.remove(veth);
        }
        for a in addresses.iter().filter(|a| !self.covered(a)) {
            if let Err(e) = self.plane.tun.remove_route(a.trunc()) {
                tracing::warn!("{e}");
            }
        }
    }

    /// Attaches workloads whose veth appeared or was re-created since they were last
    /// attached (a pod that started after meshd, or restarted: its routes went with
    /// the old interface). The `quarantine` thread calls this about once a second.
    pub(crate) fn reconcile_attachments(&self) {
        let mut reg = self.lock_registry();
        for (name, veth, addresses) in veth_workloads(&reg) {
            let had = reg
                .pods
                .as_ref()
                .and_then(|p| p.attached.get(&veth).copied());
            let now = if_index(&veth);
            if now == had {
                continue;
            }
            if now.is_none() {
                tracing::warn!(workload = %name, %veth, "veth gone; the workload is detached");
                if let Some(p) = reg.pods.as_mut() {
                    p.attached.remove(&veth);
                }
                continue;
            }
            match self.attach(&mut reg, &veth, &addresses) {
                Ok(()) => tracing::info!(workload = %name, %veth, "workload attached"),
                Err(e) => tracing::warn!(workload = %name, "cannot attach: {e}"),
            }
        }
    }

    fn covered(&self, net: &IpNet) -> bool {
        self.static_routes.iter().any(|r| r.contains(net))
    }

    /// Looks at every local workload's certificate and key files — the node's
    /// (`node.cert`, `node.key`) and each workload's — from the timer, every second,
    /// and once a pair's bytes change takes a renewed certificate
    /// ([`Daemon::renew_local`]), logging what happened: a refused one leaves the
    /// certificate in force as it was, and is tried again every minute while the files
    /// stay as they are (a certificate not yet valid may be by then; see
    /// [`CertFileWatch`]).
    pub fn check_cert_files(&self, now: UnixTime) {
        use std::hash::BuildHasher;
        let specs: Vec<WorkloadSpec> = {
            let reg = self.lock_registry();
            reg.workloads.iter().map(|w| w.spec.clone()).collect()
        };
        let mut watches = self.cert_files.lock().unwrap_or_else(|p| p.into_inner());
        watches.retain(|name, _| specs.iter().any(|s| s.name == *name));
        for spec in &specs {
            let seen = self.cert_files_hasher.hash_one((
                std::fs::read(&spec.cert).unwrap_or_default(),
                std::fs::read(&spec.key).unwrap_or_default(),
            ));
            let watch = watches.entry(spec.name.clone()).or_default();
            if !watch.due(seen, now) {
                continue;
            }
            let what = if is_node(&spec.name) {
                "node certificate".to_string()
            } else {
                format!("certificate of workload {}", spec.name)
            };
            match self.renew_local(&spec.name, now) {
                Ok(None) => watch.taken(),
                Ok(Some((renewed, before))) => {
                    watch.taken();
                    tracing::info!(
                        identity = %renewed.identity(),
                        "{what} renewed from {}: valid until {} (was {})",
                        spec.cert.display(),
                        renewed.not_after(),
                        before.not_after()
                    );
                    if renewed.public_key() != before.public_key() {
                        tracing::warn!(
                            "the renewed {what} has a new key: its sessions start over, and each peer reaches it only once it holds this certificate (meshctl peer add)"
                        );
                    }
                }
                Err(e) => {
                    if watch.refused(&e, now) {
                        tracing::error!(
                            "{what} not renewed from {}: {e}; the one in force stays",
                            spec.cert.display()
                        );
                    }
                }
            }
        }
    }

    /// Reads local workload `name`'s certificate and key again and, when they are a
    /// renewal of the certificate in force (the same identity and addresses; a new
    /// validity, groups or key), puts them in force: sessions under an unchanged key
    /// carry on ([`crate::peers::Peer::succeed`]), and policy sees the new facts.
    /// Returns the new certificate and the one it replaced; `None` when the files hold
    /// the certificate already in force (or the workload is gone).
    pub(crate) fn renew_local(
        &self,
        name: &str,
        now: UnixTime,
    ) -> Result<Option<(VerifiedCert, Certificate)>, String> {
        let mut reg = self.lock_registry();
        let Some(i) = reg.workloads.iter().position(|w| w.spec.name == name) else {
            return Ok(None);
        };
        let current = reg.workloads[i].clone();
        let (cert, key) = read(&self.ca, &current.spec, now)?;
        if *cert == current.cert {
            return Ok(None);
        }
        let (whose, how) = if is_node(name) {
            ("this node's", "a restart")
        } else {
            ("the workload's", "`meshctl workload add`")
        };
        if cert.identity() != current.cert.identity() {
            return Err(format!(
                "it names {}, not {whose} {}: an identity changes only by {how}",
                cert.identity(),
                current.cert.identity()
            ));
        }
        if cert.addresses() != current.cert.addresses() {
            return Err(format!(
                "its addresses ({}) are not {whose} ({}): addresses change only by {how}",
                list(cert.addresses()),
                list(current.cert.addresses())
            ));
        }
        if let Some(p) = reg
            .entries
            .iter()
            .find(|e| e.spec.public_key == *cert.public_key())
        {
            return Err(format!("its key is peer {}'s", p.spec.identity));
        }
        let mut workloads = reg.workloads.clone();
        workloads[i] = Workload {
            local: Arc::new(Local::new(peer_spec(&cert), *key.as_bytes())),
            cert: (*cert).clone(),
            spec: current.spec,
            origin: current.origin,
        };
        let locals: Vec<Arc<Local>> = workloads.iter().map(|x| x.local.clone()).collect();
        let table = self.table_for(&reg, &locals)?;
        self.install(table);
        reg.workloads = workloads;
        Ok(Some((cert, current.cert)))
    }

    /// Validates and adds (or replaces) a local workload; attached, then persisted,
    /// then in force. Nothing changes if a step fails. What the request asks for and
    /// this host cannot take (a certificate, an overlap, a veth that is missing or
    /// taken) is [`ControlError::Refused`]; the host filter and the state file failing
    /// are [`ControlError::Internal`].
    pub fn workload_add(
        &self,
        spec: WorkloadSpec,
        now: UnixTime,
    ) -> Result<WorkloadInfo, ControlError> {
        let line = |e: String| format!("workload_add: {}: {e}", spec.name);
        let fail = |e: String| ControlError::Refused(line(e));
        let internal = |e: String| ControlError::Internal(line(e));
        spec.check().map_err(fail)?;
        let (cert, key) = read(&self.ca, &spec, now).map_err(fail)?;
        let w = Workload {
            local: Arc::new(Local::new(peer_spec(&cert), *key.as_bytes())),
            cert: cert.into_inner(),
            spec: spec.clone(),
            origin: Origin::Runtime,
        };
        let mut reg = self.lock_registry();
        let old = reg.workloads.iter().position(|x| x.spec.name == spec.name);
        // Against the other local workloads (not the one it replaces) and the peers.
        let others = reg
            .workloads
            .iter()
            .filter(|x| x.spec.name != spec.name)
            .map(|x| (x.cert.identity(), x.cert.addresses()))
            .chain(
                reg.entries
                    .iter()
                    .map(|e| (&e.spec.identity, &e.spec.addresses[..])),
            );
        if let Some(o) = crate::overlap::against((w.cert.identity(), w.cert.addresses()), others) {
            return Err(fail(o.to_string()));
        }
        if let Some(v) = &spec.veth {
            if reg
                .workloads
                .iter()
                .any(|x| x.spec.name != spec.name && x.spec.veth.as_ref() == Some(v))
            {
                return Err(fail(format!("veth {v} is attached to another workload")));
            }
        }
        let mut workloads = reg.workloads.clone();
        match old {
            Some(i) => workloads[i] = w.clone(),
            None => workloads.push(w.clone()),
        }
        let locals: Vec<Arc<Local>> = workloads.iter().map(|x| x.local.clone()).collect();
        let table = self.table_for(&reg, &locals).map_err(fail)?;
        // The host filter holds the pod to meshd before it is attached.
        self.update_host_filter(&workloads).map_err(internal)?;
        // Re-attach: the old attachment goes, the new one comes (rolled back on error).
        let previous = old.map(|i| reg.workloads[i].clone());
        if let Some(p) = &previous {
            if let Some(v) = &p.spec.veth {
                self.detach(&mut reg, v, p.cert.addresses());
            }
        }
        let restore = |d: &Daemon, reg: &mut Registry| {
            if let Some(p) = &previous {
                if let Some(v) = &p.spec.veth {
                    let _ = d.attach(reg, v, p.cert.addresses());
                }
            }
        };
        let undo_filter = |d: &Daemon, reg: &Registry| {
            if let Err(e) = d.update_host_filter(&reg.workloads) {
                tracing::error!("{e}");
            }
        };
        if let Some(v) = &spec.veth {
            if let Err(e) = self.attach(&mut reg, v, w.cert.addresses()) {
                restore(self, &mut reg);
                undo_filter(self, &reg);
                return Err(fail(e));
            }
        }
        let mut changes = reg.workload_changes.clone();
        changes.add(spec.clone());
        if let Err(e) = changes.save(&self.config.node.state_dir) {
            if let Some(v) = &spec.veth {
                self.detach(&mut reg, v, w.cert.addresses());
            }
            restore(self, &mut reg);
            undo_filter(self, &reg);
            return Err(internal(format!("cannot persist: {e}")));
        }
        self.install(table);
        reg.workloads = workloads;
        reg.workload_changes = changes;
        tracing::info!(workload = %spec.name, identity = %w.cert.identity(), "workload added");
        Ok(w.info())
    }

    /// Removes a local workload (config or runtime; not the node's own); persisted
    /// before it takes effect.
    pub fn workload_remove(&self, name: &str) -> Result<String, ControlError> {
        if is_node(name) {
            return Err(ControlError::Refused(
                "workload_remove: \"node\" is the node's own identity".into(),
            ));
        }
        let mut reg = self.lock_registry();
        let Some(i) = reg.workloads.iter().position(|w| w.spec.name == name) else {
            return Err(ControlError::NotFound(format!(
                "workload_remove: no workload {name:?}"
            )));
        };
        let mut workloads = reg.workloads.clone();
        let gone = workloads.remove(i);
        let locals: Vec<Arc<Local>> = workloads.iter().map(|x| x.local.clone()).collect();
        let table = self
            .table_for(&reg, &locals)
            .map_err(|e| ControlError::Internal(format!("workload_remove: {e}")))?;
        let from_config = reg.config_workloads.iter().any(|w| w.name == name);
        let mut changes = reg.workload_changes.clone();
        changes.remove(name, from_config);
        changes
            .save(&self.config.node.state_dir)
            .map_err(|e| ControlError::Internal(format!("workload_remove: cannot persist: {e}")))?;
        self.install(table);
        if let Some(v) = &gone.spec.veth {
            self.detach(&mut reg, v, gone.cert.addresses());
        }
        reg.workloads = workloads;
        reg.workload_changes = changes;
        if let Err(e) = self.update_host_filter(&reg.workloads) {
            tracing::error!(workload = %name, "{e}");
        }
        tracing::info!(workload = %name, identity = %gone.cert.identity(), "workload removed");
        Ok(name.to_string())
    }

    /// A table of the current peers with `locals`, keeping unchanged sessions.
    fn table_for(&self, reg: &Registry, locals: &[Arc<Local>]) -> Result<PeerTable, String> {
        let old = self.plane.table.load_full();
        let hint = self.next_index.load(Ordering::Relaxed);
        build_table(locals, &reg.entries, &old, hint)
    }

    fn install(&self, table: PeerTable) {
        let max = table.peers().iter().map(|p| p.index + 1).max().unwrap_or(1);
        self.next_index.fetch_max(max, Ordering::Relaxed);
        self.plane.table.store(Arc::new(table));
        self.refresh_flows();
    }
}

/// When to try a workload's certificate files: at once when their digest changes,
/// and again a minute after a refusal of the same files. Logs a refusal only when its
/// reason is new.
#[derive(Debug, Default)]
pub(crate) struct CertFileWatch {
    seen: Option<u64>,
    /// The last refusal of the files as they are, and when.
    refused: Option<(String, UnixTime)>,
}

impl CertFileWatch {
    const RETRY_SECS: u64 = 60;

    /// Whether to try the files, whose digest is `digest`, now.
    fn due(&mut self, digest: u64, now: UnixTime) -> bool {
        if self.seen != Some(digest) {
            self.seen = Some(digest);
            self.refused = None;
            return true;
        }
        matches!(&self.refused, Some((_, at)) if now.0 >= at.0.saturating_add(Self::RETRY_SECS))
    }

    /// The files were refused for `why`; whether that is news worth a log line.
    fn refused(&mut self, why: &str, now: UnixTime) -> bool {
        let news = self.refused.as_ref().is_none_or(|(last, _)| last != why);
        self.refused = Some((why.to_string(), now));
        news
    }

    /// The files hold the certificate in force (taken now, or already).
    fn taken(&mut self) {
        self.refused = None;
    }
}

/// Addresses for a message: `100.64.0.1/32, fd00::1/128`.
fn list(addresses: &[IpNet]) -> String {
    let all: Vec<String> = addresses.iter().map(ToString::to_string).collect();
    all.join(", ")
}

/// Name, veth and addresses of every workload behind a veth.
fn veth_workloads(reg: &Registry) -> Vec<(String, String, Vec<IpNet>)> {
    reg.workloads
        .iter()
        .filter_map(|w| {
            let v = w.spec.veth.clone()?;
            Some((w.spec.name.clone(), v, w.cert.addresses().to_vec()))
        })
        .collect()
}

/// Reads the quarantine device: every packet there came from a pod with a source
/// address its certificate does not hold. Counted (`forged_source`) and dropped.
/// Also re-attaches workloads whose veth (re)appeared, about once a second.
pub fn quarantine_loop(d: &Daemon) {
    let mut buf = vec![0u8; 65_536];
    let mut reconciled = d.plane.mono();
    while !d.plane.shutdown.is_set() {
        if d.plane.mono().saturating_sub(reconciled) >= std::time::Duration::from_secs(1) {
            d.reconcile_attachments();
            reconciled = d.plane.mono();
        }
        let q = d.quarantine.load();
        let Some(tun) = q.as_ref().as_ref() else {
            if d.plane
                .shutdown
                .wait_timeout(std::time::Duration::from_millis(200))
            {
                break;
            }
            continue;
        };
        match tun.recv(&mut buf) {
            Ok(n) => {
                // The device's own link-local chatter (router solicitations) is not a
                // pod's doing.
                let Ok(ip) = crate::wire::IpPacket::new_checked(&buf[..n]) else {
                    d.plane.node.count_forged();
                    continue;
                };
                if is_routable(ip.dst_addr()) && is_routable(ip.src_addr()) {
                    d.plane.node.count_forged();
                    tracing::debug!(src = %ip.src_addr(), dst = %ip.dst_addr(), "forged source dropped");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let _ = wait_readable(tun.fd(), 200);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::error!("read from quarantine device failed: {e}");
                if d.plane
                    .shutdown
                    .wait_timeout(std::time::Duration::from_millis(500))
                {
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str) -> WorkloadSpec {
        WorkloadSpec {
            name: name.into(),
            cert: format!("/w/{name}.crt").into(),
            key: format!("/w/{name}.key").into(),
            veth: Some(format!("p-{name}")),
        }
    }

    #[test]
    fn effective_set_bookkeeping() {
        let config = vec![spec("a"), spec("b")];
        let mut c = WorkloadChanges::default();
        c.remove("a", true);
        c.add(WorkloadSpec {
            veth: None,
            ..spec("b")
        });
        c.add(spec("c"));
        let eff = c.apply(&config);
        let names: Vec<_> = eff.iter().map(|(w, o)| (w.name.as_str(), *o)).collect();
        assert_eq!(names, vec![("b", Origin::Runtime), ("c", Origin::Runtime)]);
        assert_eq!(eff[0].0.veth, None);
        c.add(spec("a"));
        assert!(c.removed.is_empty());
        c.remove("c", false);
        assert_eq!(c.added.len(), 2);
    }

    #[test]
    fn cert_files_are_tried_on_change_and_a_minute_after_a_refusal() {
        let t = UnixTime;
        let mut w = CertFileWatch::default();
        // First look (at start): tried; taken (the certificate in force).
        assert!(w.due(1, t(100)));
        w.taken();
        assert!(!w.due(1, t(101)));
        assert!(!w.due(1, t(10_000)));
        // Changed files: tried at once; refused, logged once per reason.
        assert!(w.due(2, t(200)));
        assert!(w.refused("not yet valid", t(200)));
        assert!(!w.due(2, t(201)));
        assert!(!w.due(2, t(259)));
        assert!(w.due(2, t(260)), "a minute later, the same files again");
        assert!(
            !w.refused("not yet valid", t(260)),
            "same reason, logged already"
        );
        assert!(!w.due(2, t(300)));
        assert!(w.due(2, t(320)));
        assert!(w.refused("expired", t(320)), "a new reason is news");
        // Other files while refused: at once, and their refusal is news again.
        assert!(w.due(3, t(321)));
        assert!(w.refused("expired", t(321)));
        assert!(w.due(3, t(381)));
        w.taken();
        assert!(!w.due(3, t(1_000)));
    }

    #[test]
    fn spec_checks() {
        assert!(spec("web").check().is_ok());
        assert!(spec("node").check().unwrap_err().contains("node"));
        let rel = WorkloadSpec {
            cert: "w.crt".into(),
            ..spec("web")
        };
        assert!(rel.check().unwrap_err().contains("absolute"));
        let long = WorkloadSpec {
            veth: Some("a-very-long-interface".into()),
            ..spec("web")
        };
        assert!(long.check().unwrap_err().starts_with("veth: "));
    }

    #[test]
    fn save_load_round_trip_and_refuse_garbage() {
        let dir = std::env::temp_dir().join(format!("meshd-wl-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut c = WorkloadChanges::load(&dir).unwrap();
        c.add(spec("web"));
        c.remove("old", true);
        c.save(&dir).unwrap();
        assert_eq!(WorkloadChanges::load(&dir).unwrap(), c);
        std::fs::write(dir.join(STATE_FILE), "{garbage").unwrap();
        let e = WorkloadChanges::load(&dir).unwrap_err().to_string();
        assert!(e.contains("workloads.json"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
