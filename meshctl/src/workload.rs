//! `meshctl workload add|remove|list`: the running meshd's local workloads (pods),
//! each with its own certificate and key. meshd verifies and persists them.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use clap::Subcommand;
use mesh_proto::control::{
    WorkloadAddRequest, WorkloadList, WorkloadListRequest, WorkloadRemoveRequest,
};

use crate::client::Client;
use crate::Global;

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Add (or replace) a local workload; meshd reads and verifies its certificate
    /// and key (mode 0600) and keeps using those files after a restart
    #[command(after_help = "Examples:
  meshctl workload add web --cert web.crt --key web.key --veth p-web
  meshctl workload add batch --cert batch.crt --key batch.key   # addresses routed by the operator")]
    Add {
        /// A label for the workload: 1-32 of [a-z0-9-]
        #[arg(value_name = "NAME")]
        name: String,
        /// The workload's certificate (PEM)
        #[arg(long, value_name = "FILE")]
        cert: PathBuf,
        /// The workload's private key
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// Host end of the veth pair into the workload's network namespace
        #[arg(long, value_name = "IFNAME")]
        veth: Option<String>,
    },
    /// Remove a local workload by name
    #[command(after_help = "Example:\n  meshctl workload remove web")]
    Remove {
        #[arg(value_name = "NAME")]
        name: String,
    },
    /// List the local workloads (the node's own identity is `node`)
    List,
}

fn absolute(p: &Path) -> Result<String> {
    let abs = std::fs::canonicalize(p).with_context(|| format!("{}", p.display()))?;
    abs.to_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow!("{}: path is not UTF-8", abs.display()))
}

pub fn run(cmd: Command, g: &Global) -> Result<()> {
    let client = Client::new(g);
    match cmd {
        Command::Add {
            name,
            cert,
            key,
            veth,
        } => {
            mesh_proto::config::check_workload_name(&name).map_err(|e| anyhow!("name: {e}"))?;
            if let Some(v) = &veth {
                mesh_proto::config::check_interface_name(v).map_err(|e| anyhow!("--veth: {e}"))?;
            }
            // Checked here for a clear message; meshd checks again.
            let pem =
                std::fs::read_to_string(&cert).with_context(|| format!("{}", cert.display()))?;
            mesh_proto::cert::Certificate::from_pem(&pem)
                .with_context(|| format!("{}", cert.display()))?;
            mesh_proto::files::read_private_key(&key)?;
            let info = client.call(WorkloadAddRequest {
                name,
                cert: absolute(&cert)?,
                key: absolute(&key)?,
                veth,
            })?;
            if g.json {
                crate::print_json(&info)?;
            } else {
                outln!("added {} ({})", info.name, info.identity)?;
            }
        }
        Command::Remove { name } => {
            let r = client.call(WorkloadRemoveRequest { name })?;
            if g.json {
                crate::print_json(&r)?;
            } else {
                outln!("removed {}", r.removed)?;
            }
        }
        Command::List => {
            let list = client.call(WorkloadListRequest {})?;
            if g.json {
                crate::print_json(&list)?;
            } else {
                out!("{}", render_list(&list))?;
            }
        }
    }
    Ok(())
}

/// An aligned table for people.
pub fn render_list(l: &WorkloadList) -> String {
    let rows: Vec<[String; 5]> = l
        .workloads
        .iter()
        .map(|w| {
            [
                w.name.clone(),
                w.identity.clone(),
                w.addresses
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
                w.attach.to_string(),
                w.source.as_str().to_string(),
            ]
        })
        .collect();
    let head = ["NAME", "IDENTITY", "ADDRESSES", "ATTACH", "SOURCE"];
    crate::online::table(head, &rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_proto::control::{Attach, WorkloadInfo, WorkloadSource};
    use mesh_proto::time::UnixTime;

    #[test]
    fn table_is_aligned_and_names_attachments() {
        let l = WorkloadList {
            workloads: vec![
                WorkloadInfo {
                    name: "node".into(),
                    identity: "spiffe://t/h1".into(),
                    public_key: "K".into(),
                    addresses: vec!["100.64.0.1/32".parse().unwrap()],
                    groups: vec![],
                    not_before: UnixTime(0),
                    not_after: UnixTime(0),
                    attach: Attach::Tun,
                    source: WorkloadSource::Node,
                },
                WorkloadInfo {
                    name: "web".into(),
                    identity: "spiffe://t/web".into(),
                    public_key: "K".into(),
                    addresses: vec!["100.65.1.1/32".parse().unwrap()],
                    groups: vec![],
                    not_before: UnixTime(0),
                    not_after: UnixTime(0),
                    attach: Attach::Veth("p-web".into()),
                    source: WorkloadSource::Runtime,
                },
            ],
        };
        let t = render_list(&l);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0].find("ATTACH"), lines[2].find("veth:p-web"));
        assert!(lines[2].ends_with("runtime"));
    }
}
