//! The `meshd.toml` schema: parsed with serde (`deny_unknown_fields`), then validated
//! once into [`Config`], the checked type the daemon takes.
//!
//! Every error names the file, the line and the field (`meshd.toml:7: node.mtu: ...`).
//! Relative paths are resolved against the directory of the config file, so the same
//! file means the same thing whatever the daemon's working directory.
//!
//! ```toml
//! [node]
//! cert = "a.crt"
//! key = "a.key"
//! ca = "ca.crt"
//! listen = "198.18.0.1:51820"
//! tun = "mesh0"              # default "mesh0"
//! mtu = 1420                 # default 1420
//! state_dir = "state"
//! control_socket = "meshd.sock"
//! routes = ["100.64.0.0/10"] # optional
//! log_level = "info"         # default "info"
//! cpu_latency_us = 0         # optional: CPU wake-up latency to request while traffic flows
//! host_filter = true         # default true: nftables keeps the mesh addresses meshd's alone
//! udp_offload = true         # default true: UDP GRO/GSO on the underlay socket
//! workers = 2                # default 2: data-path threads, each doing both directions
//!                            # (0: one thread per direction)
//!
//! [policy]                   # optional
//! default = "deny"
//! file = "policy.toml"       # optional
//!
//! [[peer]]
//! cert = "b.crt"
//! endpoint = "198.18.0.2:51820"   # optional
//!
//! [[workload]]               # a local workload with its own identity and key
//! name = "web"               # label: 1-32 of [a-z0-9-], not "node"
//! cert = "web.crt"
//! key = "web.key"
//! veth = "p-web"             # optional: host end of the pod's veth
//!
//! [store]                    # optional: the fleet store (etcd), see mesh_proto::store
//! endpoints = ["http://198.18.0.9:2379"]   # http:// or https://, host and port
//! prefix = "/meshd/example.org/"  # default /meshd/<trust domain>/
//! policy_keys = ["policy.pub"]    # policy public keys whose documents are accepted
//! lease_secs = 10            # default 10: a dead node's entries go after this long
//! advertise = ["198.18.0.1:51820"]  # where peers reach this node; default node.listen
//! tls_ca = "etcd-ca.pem"     # with https: the CA of etcd's server certificate
//! tls_cert = "etcd.pem"      # optional client certificate (with tls_key)
//! tls_key = "etcd-key.pem"
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

use crate::identity::TrustDomain;
use crate::store::Prefix;

/// Default TUN device name.
pub const DEFAULT_TUN: &str = "mesh0";
/// Default TUN MTU: a 1500-byte underlay minus the IPv6 + UDP + WireGuard overhead (80).
pub const DEFAULT_MTU: u16 = 1420;
/// IPv6 requires links of at least 1280 bytes (RFC 8200, section 5).
pub const MIN_MTU: u16 = 1280;
/// Upper bound: a jumbo-frame underlay.
pub const MAX_MTU: u16 = 9000;
/// Default `node.workers`. Measured with scripts/bench.sh on 2 shared cores (layer-4
/// row, 3 runs each, medians): two workers and one thread per direction carry the
/// same bulk throughput (5.2 vs 5.1 Gbit/s, one stream), but two workers answer small
/// exchanges with fewer thread wake-ups: 55.9k vs 47.8k HTTP requests/s.
pub const DEFAULT_WORKERS: u8 = 2;
/// Most `node.workers`.
pub const MAX_WORKERS: u8 = 16;

/// A validated meshd configuration. Paths are absolute or relative to the process's
/// working directory (already joined with the config file's directory).
#[derive(Clone, Debug)]
pub struct Config {
    /// The file this configuration came from.
    pub file: PathBuf,
    pub node: NodeConfig,
    /// `None` when the file has no `[policy]` table.
    pub policy: Option<PolicyConfig>,
    pub peers: Vec<PeerConfig>,
    pub workloads: Vec<WorkloadConfig>,
    /// `None` when the file has no `[store]` table: no fleet store, files only.
    pub store: Option<StoreConfig>,
    /// Line of each field (`node.cert`, `peer[0].endpoint`, ...), for later errors.
    lines: BTreeMap<String, usize>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    pub listen: SocketAddr,
    pub tun: String,
    pub mtu: u16,
    pub state_dir: PathBuf,
    pub control_socket: PathBuf,
    /// Routes to send into the TUN; `None` means "derive them" (the CA's address
    /// constraints, else the peers' addresses).
    pub routes: Option<Vec<IpNet>>,
    pub log_level: LogLevel,
    /// The CPU wake-up latency (µs) meshd asks the kernel for while traffic flows
    /// (the CPU latency QoS, `/dev/cpu_dma_latency`); `None`: no request, the
    /// machine's idle states as configured.
    pub cpu_latency_us: Option<u32>,
    /// Whether meshd installs its host filter (nftables): nothing reaches a mesh
    /// address (the node's, its pods') except through meshd, and pods reach nothing
    /// around it. `false` runs without, with a warning at start and in status.
    pub host_filter: bool,
    /// Batch datagrams on the underlay socket with UDP GRO and GSO where the kernel
    /// offers them (default); `false`: one datagram per system call, as on a kernel
    /// without them.
    pub udp_offload: bool,
    /// Data-path threads, each reading both the TUN and the socket; 0: one thread per
    /// direction ([`DEFAULT_WORKERS`]).
    pub workers: u8,
}

/// Upper bound of `node.cpu_latency_us`: a request above 100 ms would not keep any
/// idle state out, so it is a mistake.
pub const MAX_CPU_LATENCY_US: u32 = 100_000;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyConfig {
    pub default: PolicyDefault,
    pub file: Option<PathBuf>,
}

/// What the mesh does with traffic no policy speaks about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyDefault {
    Deny,
    Allow,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerConfig {
    pub cert: PathBuf,
    pub endpoint: Option<SocketAddr>,
}

/// A local workload: its own certificate and key, and how its traffic reaches meshd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadConfig {
    pub name: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The host end of the veth pair whose other end is in the workload's network
    /// namespace. `None`: the workload's addresses are routed into the TUN by the
    /// operator (processes of the host itself).
    pub veth: Option<String>,
}

/// `[store]`: the fleet store (etcd) this node watches and reports to. The store is
/// not trusted for identity or policy: certificates from it are verified against
/// `node.ca`, policy documents against `policy_keys` (see `mesh_proto::store`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreConfig {
    /// etcd client URLs (`http://host:port`, or all `https://` with `tls_ca`).
    pub endpoints: Vec<String>,
    /// `None`: [`Prefix::for_trust_domain`] of the node's CA.
    pub prefix: Option<Prefix>,
    /// TLS to etcd; `Some` exactly when the endpoints are `https://`.
    pub tls: Option<StoreTls>,
    /// Policy public key files (`meshctl policy key gen`); documents signed by other
    /// keys are refused. Empty: no policy is taken from the store.
    pub policy_keys: Vec<PathBuf>,
    /// TTL of the lease the node's endpoint and status are written under.
    pub lease_secs: u32,
    /// The endpoints this node publishes (`[store] advertise`, else `node.listen`,
    /// which must then be a specific address); never empty.
    pub advertise: Vec<SocketAddr>,
}

/// TLS settings for the etcd client (PEM files).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreTls {
    /// The CA that signed etcd's server certificate.
    pub ca: PathBuf,
    /// A client certificate and its key, for etcd's `--client-cert-auth`.
    pub client: Option<(PathBuf, PathBuf)>,
}

impl StoreConfig {
    /// The prefix in force: the configured one, else `/meshd/<trust domain>/`.
    pub fn prefix_for(&self, trust_domain: &TrustDomain) -> Prefix {
        self.prefix
            .clone()
            .unwrap_or_else(|| Prefix::for_trust_domain(trust_domain))
    }
}

/// Default of `store.lease_secs`.
pub const DEFAULT_LEASE_SECS: u32 = 10;
/// etcd refuses leases shorter than about 1.5 election timeouts (2 s by default).
pub const MIN_LEASE_SECS: u32 = 2;
pub const MAX_LEASE_SECS: u32 = 3600;
/// Most endpoints in `store.endpoints`.
pub const MAX_STORE_ENDPOINTS: usize = 16;

/// An etcd client URL: `http://` or `https://`, a host (name, IPv4 or `[IPv6]`) and a
/// port, nothing else. Returns whether it is `https`.
pub fn check_store_endpoint(url: &str) -> Result<bool, String> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else {
        return Err(format!(
            "{url:?} must start with http:// or https:// (e.g. \"http://198.18.0.9:2379\")"
        ));
    };
    let bad = || format!("{url:?} must be scheme://host:port with nothing after the port");
    let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => {}
        _ => return Err(format!("{url:?}: port {port} is out of range 1..=65535")),
    }
    let host_ok = if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        v6.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        !host.is_empty()
            && host.len() <= 253
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
    };
    if !host_ok {
        return Err(format!("{url:?}: {host:?} is not a host name or address"));
    }
    Ok(tls)
}

/// The name the node's own identity goes by among the workloads.
pub const NODE_WORKLOAD: &str = "node";

/// A workload label: 1 to 32 of `[a-z0-9-]`, not starting with '-', not `node`.
pub fn check_workload_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 32 {
        return Err(format!("{name:?} must be 1 to 32 bytes long"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        || name.starts_with('-')
    {
        return Err(format!(
            "{name:?} may contain only a-z, 0-9 and '-' (not first)"
        ));
    }
    if name == NODE_WORKLOAD {
        return Err(format!("{name:?} is the node's own identity"));
    }
    Ok(())
}

/// A Linux interface name (1..=15 bytes of letters, digits, '-', '_', '.').
pub fn check_interface_name(name: &str) -> Result<(), String> {
    check_ifname(name)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

/// A configuration error: file, line (when known), field (when known) and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl Config {
    /// Reads and validates `path`. The only I/O is reading the file itself; the
    /// certificate and key files it names are not opened here.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            line: None,
            field: None,
            message: format!("cannot read: {e}"),
        })?;
        Config::parse(path, &text)
    }

    /// Validates `text` as if read from `path` (used for error messages and to resolve
    /// relative paths).
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let mut v = Validator {
            file: path,
            text,
            base: path.parent().unwrap_or(Path::new("")).to_path_buf(),
            lines: BTreeMap::new(),
        };
        let raw: RawConfig = toml::from_str(text).map_err(|e| v.toml_error(&e))?;
        v.validate(raw)
    }

    /// An error about `field` of this configuration, located at the field's line.
    pub fn error(&self, field: &str, message: impl fmt::Display) -> ConfigError {
        ConfigError {
            file: self.file.clone(),
            line: self.lines.get(field).copied(),
            field: Some(field.to_string()),
            message: message.to_string(),
        }
    }

    /// The line on which `field` (e.g. `node.cert`, `peer[1].cert`) was written.
    pub fn line_of(&self, field: &str) -> Option<usize> {
        self.lines.get(field).copied()
    }
}

/// A network prefix with no host bits set (`100.64.0.0/10`, not `100.64.0.1/10`).
pub fn parse_prefix(s: &str) -> Result<IpNet, String> {
    let net: IpNet = s
        .parse()
        .map_err(|_| format!("{s:?} is not a prefix (e.g. \"100.64.0.0/10\")"))?;
    if net.trunc() != net {
        return Err(format!(
            "{s:?} has host bits set; did you mean \"{}\"?",
            net.trunc()
        ));
    }
    Ok(net)
}

/// Linux interface names: 1..=15 bytes, no '/', no whitespace, not "." or "..".
fn check_ifname(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 15 {
        return Err(format!("{name:?} must be 1 to 15 bytes long"));
    }
    if name == "." || name == ".." {
        return Err(format!("{name:?} is not a valid interface name"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "{name:?} may contain only letters, digits, '-', '_' and '.' (found {c:?})"
        ));
    }
    Ok(())
}

/// 1-based line number of byte `offset` in `text`.
pub fn line_of_offset(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The table header in force at `line` (1-based): `node`, `policy`, `peer[2]`, or
/// `None` at top level.
fn section_at(text: &str, line: usize) -> Option<String> {
    let mut section: Option<String> = None;
    let mut peer_count = 0usize;
    let mut workload_count = 0usize;
    for (i, l) in text.lines().enumerate() {
        if i + 1 > line {
            break;
        }
        let t = l.trim();
        if let Some(rest) = t.strip_prefix("[[") {
            let name = rest.split("]]").next().unwrap_or("").trim();
            if name == "peer" {
                section = Some(format!("peer[{peer_count}]"));
                peer_count += 1;
            } else if name == "workload" {
                section = Some(format!("workload[{workload_count}]"));
                workload_count += 1;
            } else {
                section = Some(name.to_string());
            }
        } else if let Some(rest) = t.strip_prefix('[') {
            section = Some(rest.split(']').next().unwrap_or("").trim().to_string());
        }
    }
    section
}

mod validate;
use validate::{RawConfig, Validator};

#[cfg(test)]
mod tests;
