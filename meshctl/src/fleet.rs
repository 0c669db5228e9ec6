//! `meshctl fleet status|diff`: the nodes of the fleet store, what each applies and
//! how far it lags behind the published policy. Nodes are the `nodes/` entries, which
//! each node writes under its lease: a host that died leaves when its lease ends.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use clap::Subcommand;
use mesh_proto::cert::Fingerprint;
use mesh_proto::signed::PolicyDoc;
use mesh_proto::store::{decode, NodeEndpoint, NodeStatus, StoreKey, StoreValue};
use serde::Serialize;

use crate::store::StoreArgs;
use crate::Global;

/// One node in `fleet status`.
#[derive(Serialize)]
struct NodeRow {
    identity: String,
    endpoints: Vec<String>,
    /// Its entries' lease is still running.
    alive: bool,
    /// Seconds left of that lease.
    lease_ttl: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<NodeStatus>,
    /// Published version minus applied version (when both are known).
    #[serde(skip_serializing_if = "Option::is_none")]
    lag: Option<u64>,
    /// Why an entry of the node is unreadable.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    errors: Vec<String>,
}

#[derive(Serialize)]
struct Fleet {
    prefix: String,
    published_version: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    published_digest: Option<Fingerprint>,
    nodes: Vec<NodeRow>,
}

fn fleet(s: &StoreArgs) -> Result<Fleet> {
    let mut store = s.connect(None)?;
    let prefix = store.prefix.clone();
    let published = match store.get(&StoreKey::Policy)? {
        Some(r) => PolicyDoc::parse(&r.value).ok(),
        None => None,
    };
    let mut rows: BTreeMap<String, NodeRow> = BTreeMap::new();
    let mut leases: BTreeMap<i64, i64> = BTreeMap::new();
    for (k, read) in store.list(&prefix.nodes())? {
        let decoded = decode(&prefix, &k, &read.value);
        let id = match &decoded {
            Ok(e) => match &e.key {
                StoreKey::NodeEndpoint(id) | StoreKey::NodeStatus(id) => id.to_string(),
                _ => continue,
            },
            Err(e) => match &e.key {
                Some(StoreKey::NodeEndpoint(id)) | Some(StoreKey::NodeStatus(id)) => id.to_string(),
                _ => e.key_text.clone(),
            },
        };
        let ttl = if read.lease == 0 {
            0
        } else if let Some(t) = leases.get(&read.lease) {
            *t
        } else {
            let t = store.lease_ttl(read.lease)?;
            leases.insert(read.lease, t);
            t
        };
        let row = rows.entry(id.clone()).or_insert_with(|| NodeRow {
            identity: id,
            endpoints: Vec::new(),
            alive: false,
            lease_ttl: 0,
            status: None,
            lag: None,
            errors: Vec::new(),
        });
        row.alive |= ttl > 0;
        row.lease_ttl = row.lease_ttl.max(ttl);
        match decoded {
            Ok(e) => match e.value {
                StoreValue::Endpoint(NodeEndpoint { endpoints }) => {
                    row.endpoints = endpoints.iter().map(|e| e.to_string()).collect();
                }
                StoreValue::Status(st) => row.status = Some(st),
                _ => {}
            },
            Err(e) => row.errors.push(format!("{}: {}", e.reason, e.detail)),
        }
    }
    let published_version = published.as_ref().map_or(0, PolicyDoc::version);
    for row in rows.values_mut() {
        if let Some(st) = &row.status {
            if published_version > 0 && st.applied_policy_version > 0 {
                row.lag = Some(published_version.saturating_sub(st.applied_policy_version));
            }
        }
    }
    Ok(Fleet {
        prefix: prefix.to_string(),
        published_version,
        published_digest: published.as_ref().map(PolicyDoc::policy_digest),
        nodes: rows.into_values().collect(),
    })
}

/// `meshctl fleet ...`.
#[derive(Subcommand, Debug)]
pub enum FleetCommand {
    /// Every node in the store: endpoint, alive (its lease runs), applied policy
    /// version, lag behind the published one, store revision seen, meshd version
    #[command(after_help = "Examples:
  meshctl --store http://198.18.0.9:2379 --trust-domain example.org fleet status
  MESHCTL_STORE=http://198.18.0.9:2379 meshctl --trust-domain example.org fleet status --json")]
    Status,
    /// The nodes whose applied policy differs from the published one; exit 1 if any
    #[command(after_help = "Examples:
  meshctl --store http://198.18.0.9:2379 --trust-domain example.org fleet diff")]
    Diff,
}

pub fn fleet_cmd(s: &StoreArgs, cmd: FleetCommand, g: &Global) -> Result<()> {
    let f = fleet(s)?;
    match cmd {
        FleetCommand::Status => {
            if g.json {
                return crate::print_json(&f);
            }
            println!(
                "published policy version: {}",
                if f.published_version == 0 {
                    "none".to_string()
                } else {
                    f.published_version.to_string()
                }
            );
            if f.nodes.is_empty() {
                println!("no nodes under {}", f.prefix);
                return Ok(());
            }
            println!(
                "{:<36} {:<24} {:<10} {:<8} {:<5} {:<9} MESHD",
                "NODE", "ENDPOINT", "ALIVE", "POLICY", "LAG", "REVISION"
            );
            for n in &f.nodes {
                let alive = if n.alive {
                    format!("yes ({}s)", n.lease_ttl)
                } else {
                    "no".into()
                };
                let (policy, revision, version) = match &n.status {
                    Some(st) => (
                        applied(st),
                        st.store_revision.to_string(),
                        st.meshd_version.clone(),
                    ),
                    None => ("?".into(), "?".into(), "?".into()),
                };
                let lag = n.lag.map_or("-".to_string(), |l| l.to_string());
                println!(
                    "{:<36} {:<24} {:<10} {:<8} {:<5} {:<9} {version}",
                    n.identity,
                    n.endpoints.join(","),
                    alive,
                    policy,
                    lag,
                    revision
                );
                for e in &n.errors {
                    println!("    unreadable entry: {e}");
                }
            }
            Ok(())
        }
        FleetCommand::Diff => {
            let differ: Vec<&NodeRow> = f
                .nodes
                .iter()
                .filter(|n| match &n.status {
                    Some(st) => st.applied_policy_version != f.published_version,
                    None => true,
                })
                .collect();
            if g.json {
                crate::print_json(&serde_json::json!({
                    "published_version": f.published_version,
                    "in_step": differ.is_empty(),
                    "differ": differ,
                }))?;
            } else {
                for n in &differ {
                    match &n.status {
                        Some(st) => println!(
                            "{}: applies {}, published {}",
                            n.identity,
                            applied(st),
                            f.published_version
                        ),
                        None => println!("{}: no status entry", n.identity),
                    }
                }
            }
            if differ.is_empty() {
                if !g.json {
                    println!(
                        "all {} nodes apply the published policy version {}",
                        f.nodes.len(),
                        f.published_version
                    );
                }
                Ok(())
            } else {
                bail!(
                    "{} of {} nodes differ from the published policy version {}",
                    differ.len(),
                    f.nodes.len(),
                    f.published_version
                )
            }
        }
    }
}

/// A node's applied policy: its store version, or `local` for a policy from a file or
/// the control socket, or `none`.
fn applied(st: &NodeStatus) -> String {
    match (st.applied_policy_version, st.policy_digest) {
        (0, Some(_)) => "local".into(),
        (0, None) => "none".into(),
        (v, _) => v.to_string(),
    }
}
