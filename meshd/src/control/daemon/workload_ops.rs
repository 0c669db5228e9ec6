//! The daemon's operations on its local workloads: list, add, remove, renew in
//! place from their files, and the pods' attachment (routing rules, the quarantine
//! device) kept in step with their veths. The workload types, their loading and
//! their persisted changes are in `crate::control::workloads`; this is where the daemon's
//! registry, peer table and host filter change with them.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use ipnet::IpNet;
use mesh_proto::cert::{Certificate, VerifiedCert};
use mesh_proto::control::{ControlError, WorkloadInfo, WorkloadList};
use mesh_proto::time::UnixTime;

use super::{Daemon, Registry};
use crate::control::attach::{if_index, Attacher};
use crate::control::workloads::{
    is_node, quarantine_name, read, Origin, Pods, Workload, WorkloadSpec,
};
use crate::datapath::device::Tun;
use crate::peers::{build_table, is_routable, peer_spec, Local, PeerTable};
use crate::sys::poll::wait_readable;

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
    /// [`crate::control::workloads::CertFileWatch`]).
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
        if let Some(o) =
            crate::peers::overlap::against((w.cert.identity(), w.cert.addresses()), others)
        {
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
