//! The host filter (I/O shell over the `nft` tool): meshd is the only way to a mesh
//! address (invariant 3).
//!
//! Linux accepts a packet for any local address on any interface (the weak host
//! model, RFC 1122 section 3.3.4.2), and forwards between any two. Left alone, a
//! machine on the underlay that routes the overlay to a host reaches the node's overlay
//! addresses in plaintext, and the pods behind it (the host forwards into the TUN,
//! where a packet whose source is a pod's address would even be taken as that pod's);
//! and a pod reaches its host's underlay and link-local addresses, or the underlay
//! itself, around meshd. So meshd installs one nftables table of its own, named after
//! its TUN (`inet meshd-<tun>`, so that two meshds on one host keep apart):
//!
//! ```text
//! input:   from lo or the TUN                              accept
//!          from a pod's veth: neighbour discovery          accept
//!          from a pod's veth: anything else                drop  (counter "pods")
//!          to a mesh address                               drop  (counter "underlay")
//! forward: pod veth → TUN, from that pod's own addresses   accept
//!          pod veth → quarantine device                    accept (meshd counts forged_source)
//!          from a pod's veth: anything else                drop  (counter "pods")
//!          TUN → a pod's veth                              accept
//!          from the TUN: anything else                     drop
//!          into the TUN or a pod's veth, or to a mesh address  drop  (counter "underlay")
//! ```
//!
//! The mesh addresses are the node's own overlay addresses and every pod's. Every
//! chain's policy is accept and only drops are final, so the table closes what meshd
//! owns and opens nothing another ruleset closes. Packets through meshd are untouched:
//! what the TUN delivers was decided by policy, and a pod's packets reach the TUN only
//! from its own addresses (the routing of `attach` sends them there; this
//! table holds them to it even before the pod is attached, or if that routing is
//! changed). The routed mesh prefixes are not in the sets: they may cover the underlay
//! (a more specific route keeps the endpoints there), and what is routed into the TUN
//! is kept by the interface rules.
//!
//! The table is replaced whole, in one nft transaction, at start (a table left by a
//! meshd that was killed is replaced, never duplicated) and whenever the set of pods
//! changes, and deleted at stop. meshd refuses to start when nft cannot install it;
//! `[node] host_filter = false` runs without, with a warning at start and in status.
//! nft is run as a command (Debian package nftables) rather than through a crate:
//! `nftables` (0.6) is typed JSON over the same binary, a dependency for a ruleset of a
//! dozen lines that reads better as the text an operator sees in `nft list ruleset`
//! (which the unit tests pin); `rustables` speaks netlink itself but is GPL-3.0, which
//! this Apache-2.0 workspace cannot take. The counters are read back as JSON
//! (`nft -j`).

use std::fmt::Write as _;
use std::io::{self, Write as _};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use ipnet::IpNet;
use mesh_proto::control::{HostFilterState, HostFilterStatus};

/// The nftables table of the meshd whose TUN is `tun`.
pub fn table_name(tun: &str) -> String {
    format!("meshd-{tun}")
}

/// A pod's link as the filter sees it: the host end of its veth and the addresses
/// it may send from (its certificate's).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodLink {
    pub veth: String,
    pub addresses: Vec<IpNet>,
}

/// What the table says: built from the node's state, rendered as an nft script.
/// Interface names are checked by the configuration (letters, digits, `-`, `_`, `.`),
/// so they are safe inside nft's double quotes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ruleset {
    tun: String,
    quarantine: String,
    /// The mesh addresses, aggregated (nft refuses overlapping set elements).
    protects: Vec<IpNet>,
    pods: Vec<PodLink>,
}

/// ICMPv6 a pod may send its host directly: neighbour discovery (RFC 4861) and
/// multicast listener reports (RFC 3810), link-local chatter that moves no data.
const POD_LINK_ICMPV6: &str = "nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert, mld-listener-report, mld2-listener-report";

impl Ruleset {
    /// The table for the meshd on `tun` (with quarantine device `quarantine`):
    /// `mesh` holds the node's overlay addresses; the pods' addresses are added.
    pub fn new(tun: &str, quarantine: &str, mesh: &[IpNet], pods: Vec<PodLink>) -> Ruleset {
        let all: Vec<IpNet> = mesh
            .iter()
            .chain(pods.iter().flat_map(|p| p.addresses.iter()))
            .map(IpNet::trunc)
            .collect();
        Ruleset {
            tun: tun.to_string(),
            quarantine: quarantine.to_string(),
            protects: IpNet::aggregate(&all),
            pods,
        }
    }

    pub fn table(&self) -> String {
        table_name(&self.tun)
    }

    /// The mesh addresses the table keeps to meshd.
    pub fn protects(&self) -> &[IpNet] {
        &self.protects
    }

    /// The pods' veths the table holds to meshd.
    pub fn pod_links(&self) -> Vec<String> {
        self.pods.iter().map(|p| p.veth.clone()).collect()
    }

    /// The nft script that replaces the table in one transaction: declared (a no-op
    /// when it exists), deleted, declared with its rules.
    pub fn script(&self) -> String {
        let table = self.table();
        let tun = &self.tun;
        let mut s = format!("table inet {table}\ndelete table inet {table}\n");
        let _ = writeln!(s, "table inet {table} {{");
        s += "\tcounter underlay {\n\t}\n\tcounter pods {\n\t}\n";

        let pods = quoted_set(self.pods.iter().map(|p| p.veth.as_str()));
        let (v4, v6) = split(&self.protects);

        s += "\tchain input {\n\t\ttype filter hook input priority filter; policy accept;\n";
        let _ = writeln!(s, "\t\tiifname {{ \"lo\", \"{tun}\" }} accept");
        if !self.pods.is_empty() {
            let _ = writeln!(
                s,
                "\t\tiifname {pods} icmpv6 type {{ {POD_LINK_ICMPV6} }} accept"
            );
            let _ = writeln!(s, "\t\tiifname {pods} counter name \"pods\" drop");
        }
        mesh_drops(&mut s, &v4, &v6);
        s += "\t}\n";

        s += "\tchain forward {\n\t\ttype filter hook forward priority filter; policy accept;\n";
        for p in &self.pods {
            let (own4, own6) = split(&p.addresses);
            for (family, own) in [("ip", own4), ("ip6", own6)] {
                if !own.is_empty() {
                    let _ = writeln!(
                        s,
                        "\t\tiifname \"{}\" oifname \"{tun}\" {family} saddr {} accept",
                        p.veth,
                        net_set(&own)
                    );
                }
            }
        }
        if !self.pods.is_empty() {
            let _ = writeln!(
                s,
                "\t\tiifname {pods} oifname \"{}\" accept",
                self.quarantine
            );
            let _ = writeln!(s, "\t\tiifname {pods} counter name \"pods\" drop");
            let _ = writeln!(s, "\t\tiifname \"{tun}\" oifname {pods} accept");
        }
        let _ = writeln!(s, "\t\tiifname \"{tun}\" drop");
        let into = if self.pods.is_empty() {
            format!("\"{tun}\"")
        } else {
            quoted_set(
                std::iter::once(tun.as_str()).chain(self.pods.iter().map(|p| p.veth.as_str())),
            )
        };
        let _ = writeln!(s, "\t\toifname {into} counter name \"underlay\" drop");
        mesh_drops(&mut s, &v4, &v6);
        s += "\t}\n}\n";
        s
    }

    /// The nft script that deletes the table, whether or not it exists.
    pub fn delete_script(&self) -> String {
        let table = self.table();
        format!("table inet {table}\ndelete table inet {table}\n")
    }
}

/// `ip daddr { ... } counter name "underlay" drop`, per family that has addresses.
fn mesh_drops(s: &mut String, v4: &[IpNet], v6: &[IpNet]) {
    for (family, nets) in [("ip", v4), ("ip6", v6)] {
        if !nets.is_empty() {
            let _ = writeln!(
                s,
                "\t\t{family} daddr {} counter name \"underlay\" drop",
                net_set(nets)
            );
        }
    }
}

fn split(nets: &[IpNet]) -> (Vec<IpNet>, Vec<IpNet>) {
    nets.iter().partition(|n| matches!(n, IpNet::V4(_)))
}

/// `{ 100.64.0.1, 100.65.0.0/16 }`: host routes without their length, as nft prints.
fn net_set(nets: &[IpNet]) -> String {
    let items: Vec<String> = nets
        .iter()
        .map(|n| {
            let n = n.trunc();
            if n.prefix_len() == n.max_prefix_len() {
                n.addr().to_string()
            } else {
                n.to_string()
            }
        })
        .collect();
    format!("{{ {} }}", items.join(", "))
}

fn quoted_set<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let items: Vec<String> = names.map(|n| format!("\"{n}\"")).collect();
    format!("{{ {} }}", items.join(", "))
}

/// At start, before the TUN exists: installs the filter for `ruleset`, or, when
/// `enabled` is false (`node.host_filter = false`), says loudly that there is none.
/// A filter that cannot be installed stops the start (the caller says which setting).
pub fn start(enabled: bool, ruleset: Ruleset) -> Result<Option<HostFilter>, FilterError> {
    if !enabled {
        tracing::warn!(
            "host filter DISABLED (node.host_filter = false): plaintext from the underlay reaches this node's overlay addresses and its pods', and pods reach this host around meshd; every service listening on them is open to anyone on the underlay"
        );
        return Ok(None);
    }
    HostFilter::install(ruleset).map(Some)
}

/// Why nft could not do what meshd asked.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error("cannot run nft (install the Debian package nftables): {0}")]
    Spawn(io::Error),
    #[error("nft refused to {what}: {message}")]
    Refused { what: &'static str, message: String },
}

/// Runs `nft <args>` with `input` on its standard input; its output, or its error
/// message on one line.
fn nft(args: &[&str], input: &str, what: &'static str) -> Result<String, FilterError> {
    let mut child = Command::new("nft")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(FilterError::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        // A write error shows as nft's own error below.
        let _ = stdin.write_all(input.as_bytes());
    }
    let out = child.wait_with_output().map_err(FilterError::Spawn)?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    // nft repeats the offending line and marks it with carets: the first line says it.
    let message = stderr
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map_or_else(|| format!("exit status {}", out.status), str::to_string);
    Err(FilterError::Refused { what, message })
}

/// `meshd check-config`: whether nft would install `ruleset`, the table meshd
/// installs at start (`nft -c`: checked by the kernel, nothing changed).
pub fn check(ruleset: &Ruleset) -> Result<(), FilterError> {
    nft(&["-c", "-f", "-"], &ruleset.script(), "take the table").map(|_| ())
}

/// The installed table: replaced when the pods change, deleted on [`HostFilter::remove`]
/// or drop.
pub struct HostFilter {
    ruleset: Mutex<Option<Ruleset>>,
}

impl HostFilter {
    /// Installs (or replaces) the table of `ruleset`.
    pub fn install(ruleset: Ruleset) -> Result<HostFilter, FilterError> {
        nft(&["-f", "-"], &ruleset.script(), "install the table")?;
        tracing::info!(
            table = %format!("inet {}", ruleset.table()),
            protects = %list(ruleset.protects()),
            pods = ruleset.pods.len(),
            "host filter installed: mesh addresses are reached only through meshd"
        );
        Ok(HostFilter {
            ruleset: Mutex::new(Some(ruleset)),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Ruleset>> {
        self.ruleset.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the table with `ruleset` (the pods changed); the old one stays in
    /// force if nft refuses.
    pub fn update(&self, ruleset: Ruleset) -> Result<(), FilterError> {
        let mut current = self.lock();
        if current.as_ref() == Some(&ruleset) {
            return Ok(());
        }
        nft(&["-f", "-"], &ruleset.script(), "replace the table")?;
        *current = Some(ruleset);
        Ok(())
    }

    /// Deletes the table (at stop); later calls do nothing.
    pub fn remove(&self) {
        let Some(r) = self.lock().take() else {
            return;
        };
        match nft(&["-f", "-"], &r.delete_script(), "delete the table") {
            Ok(_) => tracing::info!(table = %format!("inet {}", r.table()), "host filter removed"),
            Err(e) => tracing::error!("cannot remove the host filter inet {}: {e}", r.table()),
        }
    }

    /// What the table protects and what it dropped, read back from the kernel: a
    /// table someone deleted shows as missing.
    pub fn status(&self) -> HostFilterStatus {
        let Some(r) = self.lock().clone() else {
            return HostFilterStatus::disabled();
        };
        let table = r.table();
        let listed = nft(
            &["-j", "list", "table", "inet", &table],
            "",
            "list the table",
        );
        let (state, underlay, pods) = match listed.as_deref().map(counters) {
            Ok(Some((u, p))) => (HostFilterState::Installed, u, p),
            _ => (HostFilterState::Missing, 0, 0),
        };
        HostFilterStatus {
            state,
            table: format!("inet {table}"),
            protects: r.protects().to_vec(),
            pods: r.pod_links(),
            underlay_drops: underlay,
            pod_drops: pods,
        }
    }
}

impl Drop for HostFilter {
    fn drop(&mut self) {
        self.remove();
    }
}

/// The packets of the counters `underlay` and `pods` in `nft -j list table` output;
/// `None` if they are not both there (not our table, or not a table at all).
fn counters(json: &str) -> Option<(u64, u64)> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    let mut found = (None, None);
    for item in v.get("nftables")?.as_array()? {
        let Some(c) = item.get("counter") else {
            continue;
        };
        let packets = c.get("packets").and_then(serde_json::Value::as_u64);
        match c.get("name").and_then(serde_json::Value::as_str) {
            Some("underlay") => found.0 = packets,
            Some("pods") => found.1 = packets,
            _ => {}
        }
    }
    Some((found.0?, found.1?))
}

fn list(nets: &[IpNet]) -> String {
    let all: Vec<String> = nets.iter().map(ToString::to_string).collect();
    all.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(s: &[&str]) -> Vec<IpNet> {
        s.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn script_without_pods_keeps_the_mesh_addresses_to_the_tun_and_loopback() {
        let r = Ruleset::new(
            "mesh0",
            "mesh0q",
            &nets(&["100.64.0.1/32", "fd00:6d65:7368::1/128"]),
            vec![],
        );
        assert_eq!(
            r.protects(),
            nets(&["100.64.0.1/32", "fd00:6d65:7368::1/128"])
        );
        let want = "\
table inet meshd-mesh0
delete table inet meshd-mesh0
table inet meshd-mesh0 {
\tcounter underlay {
\t}
\tcounter pods {
\t}
\tchain input {
\t\ttype filter hook input priority filter; policy accept;
\t\tiifname { \"lo\", \"mesh0\" } accept
\t\tip daddr { 100.64.0.1 } counter name \"underlay\" drop
\t\tip6 daddr { fd00:6d65:7368::1 } counter name \"underlay\" drop
\t}
\tchain forward {
\t\ttype filter hook forward priority filter; policy accept;
\t\tiifname \"mesh0\" drop
\t\toifname \"mesh0\" counter name \"underlay\" drop
\t\tip daddr { 100.64.0.1 } counter name \"underlay\" drop
\t\tip6 daddr { fd00:6d65:7368::1 } counter name \"underlay\" drop
\t}
}
";
        assert_eq!(r.script(), want);
        assert_eq!(
            r.delete_script(),
            "table inet meshd-mesh0\ndelete table inet meshd-mesh0\n"
        );
    }

    #[test]
    fn script_with_pods_holds_each_pod_to_the_tun_and_its_own_sources() {
        let r = Ruleset::new(
            "mesh1",
            "mesh1q",
            &nets(&["100.64.0.1/32", "fd00:6d65:7368::1/128"]),
            vec![
                PodLink {
                    veth: "p-pa".into(),
                    addresses: nets(&["100.65.1.1/32", "fd00:6d65:7368:1::1/128"]),
                },
                PodLink {
                    veth: "p.b".into(),
                    addresses: nets(&["100.65.1.2/32"]),
                },
            ],
        );
        assert_eq!(r.table(), "meshd-mesh1");
        assert_eq!(r.pod_links(), ["p-pa", "p.b"]);
        let s = r.script();
        let input = s
            .split("chain input")
            .nth(1)
            .unwrap()
            .split("chain forward")
            .next()
            .unwrap();
        let forward = s.split("chain forward").nth(1).unwrap();
        let lines = |chain: &str| -> Vec<String> {
            chain
                .lines()
                .skip(2)
                .map(|l| l.trim().to_string())
                .filter(|l| l != "}" && !l.is_empty())
                .collect()
        };
        assert_eq!(
            lines(input),
            [
                "iifname { \"lo\", \"mesh1\" } accept",
                "iifname { \"p-pa\", \"p.b\" } icmpv6 type { nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert, mld-listener-report, mld2-listener-report } accept",
                "iifname { \"p-pa\", \"p.b\" } counter name \"pods\" drop",
                "ip daddr { 100.64.0.1, 100.65.1.1, 100.65.1.2 } counter name \"underlay\" drop",
                "ip6 daddr { fd00:6d65:7368::1, fd00:6d65:7368:1::1 } counter name \"underlay\" drop",
            ]
        );
        assert_eq!(
            lines(forward),
            [
                "iifname \"p-pa\" oifname \"mesh1\" ip saddr { 100.65.1.1 } accept",
                "iifname \"p-pa\" oifname \"mesh1\" ip6 saddr { fd00:6d65:7368:1::1 } accept",
                "iifname \"p.b\" oifname \"mesh1\" ip saddr { 100.65.1.2 } accept",
                "iifname { \"p-pa\", \"p.b\" } oifname \"mesh1q\" accept",
                "iifname { \"p-pa\", \"p.b\" } counter name \"pods\" drop",
                "iifname \"mesh1\" oifname { \"p-pa\", \"p.b\" } accept",
                "iifname \"mesh1\" drop",
                "oifname { \"mesh1\", \"p-pa\", \"p.b\" } counter name \"underlay\" drop",
                "ip daddr { 100.64.0.1, 100.65.1.1, 100.65.1.2 } counter name \"underlay\" drop",
                "ip6 daddr { fd00:6d65:7368::1, fd00:6d65:7368:1::1 } counter name \"underlay\" drop",
            ]
        );
    }

    #[test]
    fn overlapping_addresses_are_aggregated() {
        let r = Ruleset::new(
            "mesh0",
            "mesh0q",
            &nets(&["100.64.0.7/32"]),
            vec![PodLink {
                veth: "p-a".into(),
                addresses: nets(&["100.64.0.1/24", "100.64.0.0/25", "100.64.1.0/24"]),
            }],
        );
        assert_eq!(r.protects(), nets(&["100.64.0.0/23"]));
    }

    #[test]
    fn counters_are_read_from_nft_json() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
            {"table": {"family": "inet", "name": "meshd-mesh0", "handle": 3}},
            {"counter": {"family": "inet", "name": "underlay", "table": "meshd-mesh0", "handle": 1, "packets": 7, "bytes": 420}},
            {"counter": {"family": "inet", "name": "pods", "table": "meshd-mesh0", "handle": 2, "packets": 2, "bytes": 120}}]}"#;
        assert_eq!(counters(json), Some((7, 2)));
        assert_eq!(counters(r#"{"nftables": [{"metainfo": {}}]}"#), None);
        assert_eq!(counters("Error: No such file or directory"), None);
    }
}
