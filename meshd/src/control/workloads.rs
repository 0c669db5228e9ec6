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
//! attachment) is set up by [`crate::control::attach`]; the `quarantine` thread counts what
//! pods send with sources they do not own and re-attaches pods whose veth (re)appears.
//!
//! This module holds the workloads' types, their loading and their persisted changes;
//! it knows nothing of the running daemon. What the daemon does with them (add,
//! remove, renew, attach, the `quarantine` thread) is in `daemon/workload_ops.rs`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ipnet::IpNet;
use mesh_proto::cert::{Ca, Certificate, VerifiedCert};
use mesh_proto::config::{
    check_interface_name, check_workload_name, Config, ConfigError, NODE_WORKLOAD,
};
use mesh_proto::control::{Attach, WorkloadInfo};
use mesh_proto::files;
use mesh_proto::key::{PrivateKey, PublicKey};
use mesh_proto::time::UnixTime;
use serde::{Deserialize, Serialize};

use crate::control::attach::Attacher;
use crate::control::hostfilter::{PodLink, Ruleset};
use crate::control::state::StateError;
use crate::datapath::device::Tun;
use crate::peers::{peer_spec, Local};

pub const STATE_FILE: &str = "workloads.json";
use crate::control::state::STATE_VERSION;

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

impl crate::control::state::StateFile for WorkloadChanges {
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
        Ok(
            crate::control::state::read(state_dir)?.unwrap_or(WorkloadChanges {
                version: STATE_VERSION,
                ..WorkloadChanges::default()
            }),
        )
    }

    /// Writes atomically (temp file, fsync, rename), mode 0600.
    pub fn save(&self, state_dir: &Path) -> Result<(), StateError> {
        crate::control::state::write(state_dir, self)
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
        .map_err(|e| config.error("node.state_dir", e.to_string().replace('\n', " ")))?;
    for (spec, origin) in changes.apply(&config_workloads) {
        match crate::control::workloads::read(ca, &spec, now) {
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
/// (see [`crate::control::attach`]). Made when the first workload behind a veth arrives, so a
/// host without pods changes nothing in the kernel's routing.
pub struct Pods {
    pub(crate) attacher: Attacher,
    /// Attached veths and the interface index they had then (a re-created veth gets
    /// a new one and must be attached again).
    pub(crate) attached: HashMap<String, u32>,
    /// Kept open for the routes through it; read by the `quarantine` thread.
    pub(crate) _quarantine: Arc<Tun>,
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
    pub(crate) fn due(&mut self, digest: u64, now: UnixTime) -> bool {
        if self.seen != Some(digest) {
            self.seen = Some(digest);
            self.refused = None;
            return true;
        }
        matches!(&self.refused, Some((_, at)) if now.0 >= at.0.saturating_add(Self::RETRY_SECS))
    }

    /// The files were refused for `why`; whether that is news worth a log line.
    pub(crate) fn refused(&mut self, why: &str, now: UnixTime) -> bool {
        let news = self.refused.as_ref().is_none_or(|(last, _)| last != why);
        self.refused = Some((why.to_string(), now));
        news
    }

    /// The files hold the certificate in force (taken now, or already).
    pub(crate) fn taken(&mut self) {
        self.refused = None;
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
