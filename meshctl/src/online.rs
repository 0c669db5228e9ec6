//! Commands that talk to a running meshd over its control socket: `status`,
//! `peer add|remove|list` (through [`Client`], in the contract's types).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;
use mesh_proto::control::{
    CpuLatencyState, Enforcement, HostFilterState, HostFilterStatus, PeerAddRequest, PeerList,
    PeerListRequest, PeerRemoveRequest, Status, StatusRequest, WorkloadSource,
};
use mesh_proto::time::{span, Term, UnixTime};

use crate::client::Client;
use crate::Global;

#[derive(Subcommand, Debug)]
pub enum PeerCommand {
    /// Add (or replace) a peer by its certificate; meshd verifies it against the CA
    #[command(after_help = "Examples:
  meshctl peer add b.crt --endpoint 198.18.0.2:51820
  meshctl peer add b.crt            # endpoint learned when b connects")]
    Add {
        /// The peer's certificate (PEM)
        #[arg(value_name = "CERT")]
        cert: PathBuf,
        /// The peer's underlay address and port
        #[arg(long, value_name = "ADDR:PORT")]
        endpoint: Option<SocketAddr>,
    },
    /// Remove a peer by identity
    #[command(after_help = "Example:\n  meshctl peer remove spiffe://example.org/b")]
    Remove {
        #[arg(value_name = "SPIFFE_ID")]
        identity: String,
    },
    /// List the configured peers
    List,
    /// Verify a certificate against the CA and write it to the fleet store, where
    /// every meshd watching it takes it as a peer (--store)
    #[command(after_help = "Example:
  meshctl --store http://198.18.0.9:2379 peer publish web.crt --ca ca.crt")]
    Publish {
        #[arg(value_name = "CERT")]
        cert: PathBuf,
        /// The mesh CA certificate (also gives the trust domain)
        #[arg(long, value_name = "CA")]
        ca: PathBuf,
    },
}

pub fn status(g: &Global) -> Result<()> {
    let s = Client::new(g).call(StatusRequest {})?;
    if g.json {
        crate::print_json(&s)
    } else {
        out!("{}", render_status(&s, crate::now()))
    }
}

pub fn peer(cmd: PeerCommand, g: &Global) -> Result<()> {
    let client = Client::new(g);
    match cmd {
        PeerCommand::Publish { cert, ca } => {
            return crate::store::peer_publish(&g.store, &cert, &ca, g);
        }
        PeerCommand::Add { cert, endpoint } => {
            let pem =
                std::fs::read_to_string(&cert).with_context(|| format!("{}", cert.display()))?;
            let info = client.call(PeerAddRequest {
                cert: pem,
                endpoint,
            })?;
            if g.json {
                crate::print_json(&info)?;
            } else {
                outln!("added {}", info.identity)?;
            }
        }
        PeerCommand::Remove { identity } => {
            let r = client.call(PeerRemoveRequest { identity })?;
            if g.json {
                crate::print_json(&r)?;
            } else {
                outln!("removed {}", r.removed)?;
            }
        }
        PeerCommand::List => {
            let list = client.call(PeerListRequest {})?;
            if g.json {
                crate::print_json(&list)?;
            } else {
                out!("{}", render_peer_list(&list))?;
            }
        }
    }
    Ok(())
}

fn join<T: std::fmt::Display>(items: &[T]) -> String {
    if items.is_empty() {
        return "(none)".into();
    }
    items
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

fn ago(t: UnixTime, now: UnixTime) -> String {
    format!("{} ago", span(now.secs().saturating_sub(t.secs())))
}

/// A certificate's validity for people: when it ends, how far off that is, and what
/// follows when it is outside its window (`refused`: who refuses it then).
fn validity(not_before: UnixTime, not_after: UnixTime, now: UnixTime, refused: &str) -> String {
    if not_after == UnixTime(0) {
        return "(not reported by this meshd)".into();
    }
    match Term::at(not_before, not_after, now) {
        Term::NotYetValid { starts_in } => format!(
            "NOT YET VALID, from {not_before} (in {}): {refused} until then",
            span(starts_in)
        ),
        Term::Valid { left } => format!("valid until {not_after} ({} left)", span(left)),
        Term::RenewSoon { left } => format!(
            "expires {not_after} (in {}): renew it (meshctl cert renew)",
            span(left)
        ),
        Term::Expired { ago } => {
            format!("EXPIRED {not_after} ({} ago): {refused}", span(ago))
        }
    }
}

/// The host filter's lines of `status`: what it keeps to meshd, or loudly that
/// nothing does.
fn render_host_filter(f: &HostFilterStatus, tun: &str) -> String {
    match f.state {
        HostFilterState::Disabled => "  host filter: DISABLED (node.host_filter = false): the underlay reaches the overlay addresses in plaintext, and pods reach this host around meshd\n".into(),
        HostFilterState::Missing => format!(
            "  host filter: MISSING: table {} is gone from the kernel; the mesh addresses are unprotected until meshd restarts\n",
            f.table
        ),
        HostFilterState::Installed => {
            let mut o = format!(
                "  host filter: nftables table {}: {} reached only through meshd ({tun}) and loopback\n",
                f.table,
                join(&f.protects)
            );
            if !f.pods.is_empty() {
                o += &format!(
                    "    pods held to meshd, from their own addresses: {}\n",
                    f.pods.join(", ")
                );
            }
            o += &format!(
                "    dropped: underlay {}, pods {}\n",
                f.underlay_drops, f.pod_drops
            );
            o
        }
    }
}

/// The fleet store's lines of `status`: connected or not since when, the revision,
/// what was applied and what was refused (by key, with the reason).
fn render_store(st: &mesh_proto::store::StoreStatus, now: UnixTime) -> String {
    let c = &st.client;
    let ago = span(now.0.saturating_sub(c.since.0));
    let state = if c.connected {
        format!("connected for {ago}, revision {}", c.revision)
    } else {
        format!(
            "NOT CONNECTED for {ago} ({}); enforcing what was applied",
            c.last_error.as_deref().unwrap_or("not yet reached")
        )
    };
    let mut o = format!(
        "  store: {} {} ({state})\n",
        c.endpoints.join(","),
        c.prefix
    );
    let policy = match st.applied.policy_version {
        0 => "none from the store".to_string(),
        v => format!("version {v}"),
    };
    o += &format!(
        "    applied: policy {policy}, {} peers; listings {}\n",
        st.applied.peers, c.snapshots
    );
    if !c.ignored.is_empty() {
        let list: Vec<String> = c.ignored.iter().map(|(k, n)| format!("{k} {n}")).collect();
        o += &format!("    ignored (malformed): {}\n", list.join(", "));
    }
    for (key, reason) in &st.applied.refused {
        o += &format!("    REFUSED {key}: {reason}\n");
    }
    o
}

/// `wg show`-like text for people.
pub fn render_status(s: &Status, now: UnixTime) -> String {
    let mut o = String::new();
    let ready = if s.ready { "ready" } else { "starting" };
    o += &format!("identity: {}\n", s.identity);
    o += &format!("  public key: {}\n", s.public_key);
    o += &format!("  listening: {} (tun {}, {ready})\n", s.listen, s.tun);
    o += &format!("  addresses: {}\n", join(&s.addresses));
    if let Some(node) = s
        .workloads
        .iter()
        .find(|w| w.source == WorkloadSource::Node)
    {
        o += &format!(
            "  certificate: {}\n",
            validity(node.not_before, node.not_after, now, "peers refuse it")
        );
    }
    o += &format!(
        "  drops: malformed {}, unknown_peer {}, no_route {}, forged_source {}, misdirected {}, tun_write {}, udp_send {}\n",
        s.drops.malformed,
        s.drops.unknown_peer,
        s.drops.no_route,
        s.drops.forged_source,
        s.drops.misdirected,
        s.drops.tun_write,
        s.drops.udp_send
    );
    if let Some(c) = s.cpu_latency {
        let now = match c.state {
            CpuLatencyState::Held => "held now",
            CpuLatencyState::Released => "not held now: no recent traffic",
            CpuLatencyState::Failed => "REFUSED by the kernel (see meshd's log)",
        };
        o += &format!(
            "  cpu wake-up latency: {} µs requested while traffic flows ({now})\n",
            c.requested_us
        );
    }
    if let Some(f) = &s.host_filter {
        o += &render_host_filter(f, &s.tun);
    }
    if let Some(st) = &s.store {
        o += &render_store(st, now);
    }
    for w in s
        .workloads
        .iter()
        .filter(|w| w.source != WorkloadSource::Node)
    {
        o += &format!("\nworkload: {} ({})\n", w.identity, w.name);
        o += &format!("  public key: {}\n", w.public_key);
        o += &format!("  addresses: {}\n", join(&w.addresses));
        o += &format!("  attach: {} ({})\n", w.attach, w.source.as_str());
        o += &format!(
            "  certificate: {}\n",
            validity(w.not_before, w.not_after, now, "peers refuse it")
        );
    }
    for p in &s.peers {
        o += &format!("\npeer: {}\n", p.identity);
        if let Some(l) = p.local.as_ref().filter(|l| **l != s.identity) {
            o += &format!("  local workload: {l}\n");
        }
        o += &format!("  public key: {}\n", p.public_key);
        o += &format!(
            "  endpoint: {}\n",
            p.endpoint
                .map_or("(unknown)".to_string(), |e| e.to_string())
        );
        o += &format!("  addresses: {}\n", join(&p.addresses));
        o += &format!(
            "  certificate: {}\n",
            validity(p.not_before, p.not_after, now, "its handshakes are refused")
        );
        o += &format!(
            "  latest handshake: {}\n",
            p.latest_handshake
                .map_or("(none)".to_string(), |t| format!("{t} ({})", ago(t, now)))
        );
        o += &format!(
            "  transfer: {} received, {} sent\n",
            bytes(p.rx_bytes),
            bytes(p.tx_bytes)
        );
        o += &format!("  drops: spoofed_source {}\n", p.drops.spoofed_source);
    }
    if let Some(e) = &s.enforcement {
        o += &render_enforcement(e);
    }
    o
}

/// The policy in force and what enforcement did (status' `enforcement`).
fn render_enforcement(e: &Enforcement) -> String {
    let (p, c) = (&e.policy, &e.counters);
    let default = p.default.as_str();
    let mut o = if p.name.is_empty() {
        format!("\npolicy: none, default {default}\n")
    } else {
        format!(
            "\npolicy: {} ({}), {} policies, default {default}\n",
            p.name,
            p.origin.as_str(),
            p.policies,
        )
    };
    o += &format!(
        "  flows: {} tracked ({} inspected at layer 7, {} bytes held), {} evicted\n",
        c.flows, c.l7_flows, c.l7_held_bytes, c.flows_evicted
    );
    o += &format!(
        "  packets delivered: {}; http requests: {} decided, {} refused\n",
        c.delivered, c.http_requests, c.http_refused
    );
    if !c.drops.is_empty() {
        let list: Vec<String> = c.drops.iter().map(|(k, v)| format!("{k} {v}")).collect();
        o += &format!("  drops: {}\n", list.join(", "));
    }
    if !c.rules.is_empty() {
        o += "  rules:\n";
        for r in &c.rules {
            o += &format!(
                "    {}/{}: allow {}, deny {}, audit {}\n",
                r.policy, r.rule, r.allow, r.deny, r.audit
            );
        }
    }
    o += &format!(
        "  decision log: {} written, {} suppressed\n",
        e.decision_log.written, e.decision_log.suppressed
    );
    o
}

pub fn render_peer_list(l: &PeerList) -> String {
    let rows: Vec<[String; 5]> = l
        .peers
        .iter()
        .map(|p| {
            [
                p.identity.clone(),
                p.endpoint.map_or("-".to_string(), |e| e.to_string()),
                join(&p.addresses),
                p.not_after.to_string(),
                p.source.as_str().to_string(),
            ]
        })
        .collect();
    let head = ["IDENTITY", "ENDPOINT", "ADDRESSES", "NOT AFTER", "SOURCE"];
    table(head, &rows)
}

/// A table for people: a header row, then columns padded to their widest cell (the
/// last column unpadded), like `wg show` and `ip` print.
pub fn table<const N: usize>(head: [&str; N], rows: &[[String; N]]) -> String {
    let mut w = head.map(str::len);
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut s = String::new();
        for (i, c) in cells.enumerate() {
            if i + 1 == N {
                s += c;
            } else {
                s += &format!("{c:<width$}  ", width = w[i]);
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut o = line(&mut head.iter().copied());
    for r in rows {
        o += &line(&mut r.iter().map(String::as_str));
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_proto::control::{
        Attach, EnforcementCounters, LogCounters, NodeDrops, PeerDrops, PeerInfo, PeerSource,
        PeerStatus, PolicyInfo, PolicyOrigin, RuleCount,
    };
    use mesh_proto::policy::DefaultAction;

    #[test]
    fn status_text_names_everything() {
        let s = Status {
            ready: true,
            identity: "spiffe://t/a".into(),
            public_key: "KA".into(),
            listen: "198.18.0.1:51820".parse().unwrap(),
            tun: "mesh0".into(),
            addresses: vec!["100.64.0.1/32".parse().unwrap()],
            peers: vec![PeerStatus {
                identity: "spiffe://t/b".into(),
                local: Some("spiffe://t/web".into()),
                public_key: "KB".into(),
                endpoint: Some("198.18.0.2:51820".parse().unwrap()),
                addresses: vec!["100.64.0.2/32".parse().unwrap()],
                latest_handshake: Some(UnixTime(100)),
                rx_bytes: 2048,
                tx_bytes: 10,
                drops: PeerDrops { spoofed_source: 4 },
                not_before: UnixTime(0),
                not_after: UnixTime(100),
            }],
            drops: NodeDrops {
                malformed: 1,
                unknown_peer: 2,
                no_route: 3,
                forged_source: 4,
                misdirected: 0,
                tun_write: 5,
                udp_send: 6,
            },
            workloads: vec![
                mesh_proto::control::WorkloadInfo {
                    name: "node".into(),
                    identity: "spiffe://t/a".into(),
                    public_key: "KA".into(),
                    addresses: vec!["100.64.0.1/32".parse().unwrap()],
                    groups: vec![],
                    not_before: UnixTime(0),
                    not_after: UnixTime(112 + 3 * 86_400 + 7200),
                    attach: Attach::Tun,
                    source: WorkloadSource::Node,
                },
                mesh_proto::control::WorkloadInfo {
                    name: "web".into(),
                    identity: "spiffe://t/web".into(),
                    public_key: "KW".into(),
                    addresses: vec!["100.65.1.1/32".parse().unwrap()],
                    groups: vec![],
                    not_before: UnixTime(0),
                    not_after: UnixTime(120),
                    attach: Attach::Veth("p-web".into()),
                    source: WorkloadSource::Runtime,
                },
            ],
            enforcement: Some(Enforcement {
                policy: PolicyInfo {
                    name: "p.toml".into(),
                    origin: PolicyOrigin::Applied,
                    default: DefaultAction::Deny,
                    policies: 2,
                    tests: 0,
                    source: String::new(),
                },
                counters: EnforcementCounters {
                    flows: 3,
                    l7_flows: 1,
                    drops: [("no_allow_matched".to_string(), 7)].into(),
                    rules: vec![RuleCount {
                        policy: "web".into(),
                        rule: "0".into(),
                        allow: 5,
                        deny: 0,
                        audit: 0,
                    }],
                    ..EnforcementCounters::default()
                },
                decision_log: LogCounters {
                    written: 7,
                    suppressed: 0,
                    follower_lost: 0,
                },
            }),
            cpu_latency: Some(mesh_proto::control::CpuLatencyStatus {
                requested_us: 0,
                state: CpuLatencyState::Held,
            }),
            host_filter: Some(HostFilterStatus {
                state: HostFilterState::Installed,
                table: "inet meshd-mesh0".into(),
                protects: vec!["100.64.0.0/10".parse().unwrap()],
                pods: vec!["p-web".into()],
                underlay_drops: 3,
                pod_drops: 1,
            }),
            store: Some(mesh_proto::store::StoreStatus {
                client: mesh_proto::store::StoreClientStatus {
                    endpoints: vec!["http://198.18.0.9:2379".into()],
                    prefix: "/meshd/t/".into(),
                    connected: false,
                    since: UnixTime(100),
                    last_error: Some("connecting: refused".into()),
                    revision: 9,
                    snapshots: 1,
                    ignored: [("bad_value".to_string(), 2)].into(),
                },
                applied: mesh_proto::store::StoreApplied {
                    policy_version: 4,
                    peers: 2,
                    refused: [("certs/spiffe://t/x".to_string(), "another CA".to_string())].into(),
                    refusals: Default::default(),
                },
            }),
        };
        let t = render_status(&s, UnixTime(112));
        for want in [
            "identity: spiffe://t/a",
            "listening: 198.18.0.1:51820 (tun mesh0, ready)",
            "store: http://198.18.0.9:2379 /meshd/t/ (NOT CONNECTED for 12 seconds (connecting: refused); enforcing what was applied)",
            "applied: policy version 4, 2 peers; listings 1",
            "ignored (malformed): bad_value 2",
            "REFUSED certs/spiffe://t/x: another CA",
            "policy: p.toml (applied), 2 policies, default deny",
            "drops: no_allow_matched 7",
            "web/0: allow 5, deny 0, audit 0",
            "drops: malformed 1, unknown_peer 2, no_route 3, forged_source 4, misdirected 0, tun_write 5, udp_send 6",
            "cpu wake-up latency: 0 µs requested while traffic flows (held now)",
            "host filter: nftables table inet meshd-mesh0: 100.64.0.0/10 reached only through meshd (mesh0) and loopback",
            "pods held to meshd, from their own addresses: p-web",
            "dropped: underlay 3, pods 1",
            "workload: spiffe://t/web (web)",
            "attach: veth:p-web (runtime)",
            "local workload: spiffe://t/web",
            "peer: spiffe://t/b",
            "endpoint: 198.18.0.2:51820",
            "latest handshake: 1970-01-01T00:01:40Z (12 seconds ago)",
            "transfer: 2.00 KiB received, 10 B sent",
            "drops: spoofed_source 4",
            // The node's 3-day window: more than a fifth of it left.
            "certificate: valid until 1970-01-04T02:01:52Z (3 days, 2 hours left)",
            // The workload's 2-minute window, 8 seconds left: inside its notice (24 s).
            "certificate: expires 1970-01-01T00:02:00Z (in 8 seconds): renew it",
            // The peer's ended 12 seconds ago.
            "certificate: EXPIRED 1970-01-01T00:01:40Z (12 seconds ago): its handshakes are refused",
        ] {
            assert!(t.contains(want), "missing {want:?} in\n{t}");
        }
    }

    #[test]
    fn a_host_filter_that_is_off_or_gone_is_said_loudly() {
        let off = render_host_filter(&HostFilterStatus::disabled(), "mesh0");
        assert!(
            off.starts_with("  host filter: DISABLED (node.host_filter = false)"),
            "{off}"
        );
        let gone = render_host_filter(
            &HostFilterStatus {
                state: HostFilterState::Missing,
                table: "inet meshd-mesh0".into(),
                ..HostFilterStatus::disabled()
            },
            "mesh0",
        );
        assert!(
            gone.contains("MISSING: table inet meshd-mesh0 is gone"),
            "{gone}"
        );
    }

    #[test]
    fn peer_table_is_aligned() {
        let l = PeerList {
            peers: vec![PeerInfo {
                identity: "spiffe://t/b".into(),
                public_key: "K".into(),
                endpoint: None,
                addresses: vec!["100.64.0.2/32".parse().unwrap()],
                groups: vec![],
                not_after: UnixTime(0),
                source: PeerSource::Runtime,
            }],
        };
        let t = render_peer_list(&l);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].find("ENDPOINT"), lines[1].find('-'));
    }
}
