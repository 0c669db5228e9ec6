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

// ---- raw, as written ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    node: RawNode,
    policy: Option<Spanned<RawPolicy>>,
    #[serde(default)]
    peer: Vec<Spanned<RawPeer>>,
    #[serde(default)]
    workload: Vec<Spanned<RawWorkload>>,
    store: Option<Spanned<RawStore>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    endpoints: Vec<Spanned<String>>,
    prefix: Option<Spanned<String>>,
    #[serde(default)]
    policy_keys: Vec<Spanned<String>>,
    lease_secs: Option<Spanned<i64>>,
    tls_ca: Option<Spanned<String>>,
    tls_cert: Option<Spanned<String>>,
    tls_key: Option<Spanned<String>>,
    advertise: Option<Vec<Spanned<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorkload {
    name: Spanned<String>,
    cert: Spanned<String>,
    key: Spanned<String>,
    veth: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    cert: Spanned<String>,
    key: Spanned<String>,
    ca: Spanned<String>,
    listen: Spanned<String>,
    tun: Option<Spanned<String>>,
    mtu: Option<Spanned<i64>>,
    state_dir: Spanned<String>,
    control_socket: Spanned<String>,
    routes: Option<Vec<Spanned<String>>>,
    log_level: Option<Spanned<String>>,
    cpu_latency_us: Option<Spanned<i64>>,
    host_filter: Option<Spanned<bool>>,
    udp_offload: Option<Spanned<bool>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    default: Option<Spanned<String>>,
    file: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    cert: Spanned<String>,
    endpoint: Option<Spanned<String>>,
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

struct Validator<'a> {
    file: &'a Path,
    text: &'a str,
    base: PathBuf,
    lines: BTreeMap<String, usize>,
}

impl Validator<'_> {
    fn line(&self, span: &Range<usize>) -> usize {
        line_of_offset(self.text, span.start)
    }

    fn err(&self, span: &Range<usize>, field: &str, message: impl fmt::Display) -> ConfigError {
        ConfigError {
            file: self.file.to_path_buf(),
            line: Some(self.line(span)),
            field: Some(field.to_string()),
            message: message.to_string(),
        }
    }

    /// A serde/TOML error: the span gives the line; the table header above it (if any)
    /// names the section, and the message names the key.
    fn toml_error(&self, e: &toml::de::Error) -> ConfigError {
        let line = e.span().map(|s| line_of_offset(self.text, s.start));
        let field = line.and_then(|l| section_at(self.text, l));
        ConfigError {
            file: self.file.to_path_buf(),
            line,
            field,
            message: e.message().trim().replace('\n', " "),
        }
    }

    fn note(&mut self, field: &str, span: &Range<usize>) {
        let line = self.line(span);
        self.lines.insert(field.to_string(), line);
    }

    fn path(&mut self, field: &str, s: &Spanned<String>) -> Result<PathBuf, ConfigError> {
        self.note(field, &s.span());
        let value = s.get_ref();
        if value.is_empty() {
            return Err(self.err(&s.span(), field, "path may not be empty"));
        }
        Ok(self.base.join(value))
    }

    fn socket_addr(&mut self, field: &str, s: &Spanned<String>) -> Result<SocketAddr, ConfigError> {
        self.note(field, &s.span());
        let addr: SocketAddr = s.get_ref().parse().map_err(|_| {
            self.err(
                &s.span(),
                field,
                format!(
                    "{:?} is not an address and port (e.g. \"198.18.0.1:51820\" or \"[fd00:198:18::1]:51820\")",
                    s.get_ref()
                ),
            )
        })?;
        if addr.port() == 0 && field != "node.listen" {
            return Err(self.err(&s.span(), field, "port 0 is not a valid endpoint"));
        }
        Ok(addr)
    }

    fn validate(&mut self, raw: RawConfig) -> Result<Config, ConfigError> {
        let n = raw.node;
        let cert = self.path("node.cert", &n.cert)?;
        let key = self.path("node.key", &n.key)?;
        let ca = self.path("node.ca", &n.ca)?;
        let listen = self.socket_addr("node.listen", &n.listen)?;
        let tun = match &n.tun {
            None => DEFAULT_TUN.to_string(),
            Some(t) => {
                self.note("node.tun", &t.span());
                check_ifname(t.get_ref()).map_err(|m| self.err(&t.span(), "node.tun", m))?;
                t.get_ref().clone()
            }
        };
        let mtu = match &n.mtu {
            None => DEFAULT_MTU,
            Some(m) => {
                self.note("node.mtu", &m.span());
                let v = *m.get_ref();
                if !(i64::from(MIN_MTU)..=i64::from(MAX_MTU)).contains(&v) {
                    return Err(self.err(
                        &m.span(),
                        "node.mtu",
                        format!("{v} is out of range {MIN_MTU}..={MAX_MTU}"),
                    ));
                }
                v as u16
            }
        };
        let state_dir = self.path("node.state_dir", &n.state_dir)?;
        let control_socket = self.path("node.control_socket", &n.control_socket)?;
        let routes = match &n.routes {
            None => None,
            Some(list) => {
                let mut out = Vec::with_capacity(list.len());
                for (i, r) in list.iter().enumerate() {
                    let field = format!("node.routes[{i}]");
                    self.note(&field, &r.span());
                    let net =
                        parse_prefix(r.get_ref()).map_err(|m| self.err(&r.span(), &field, m))?;
                    out.push(net);
                }
                Some(out)
            }
        };
        let log_level = match &n.log_level {
            None => LogLevel::Info,
            Some(l) => {
                self.note("node.log_level", &l.span());
                match l.get_ref().as_str() {
                    "error" => LogLevel::Error,
                    "warn" => LogLevel::Warn,
                    "info" => LogLevel::Info,
                    "debug" => LogLevel::Debug,
                    "trace" => LogLevel::Trace,
                    other => {
                        return Err(self.err(
                            &l.span(),
                            "node.log_level",
                            format!("{other:?} is not one of \"error\", \"warn\", \"info\", \"debug\", \"trace\""),
                        ))
                    }
                }
            }
        };
        let cpu_latency_us = match &n.cpu_latency_us {
            None => None,
            Some(c) => {
                self.note("node.cpu_latency_us", &c.span());
                let v = *c.get_ref();
                if !(0..=i64::from(MAX_CPU_LATENCY_US)).contains(&v) {
                    return Err(self.err(
                        &c.span(),
                        "node.cpu_latency_us",
                        format!("{v} is out of range 0..={MAX_CPU_LATENCY_US} (microseconds)"),
                    ));
                }
                Some(v as u32)
            }
        };
        let host_filter = match &n.host_filter {
            None => true,
            Some(h) => {
                self.note("node.host_filter", &h.span());
                *h.get_ref()
            }
        };
        let udp_offload = match &n.udp_offload {
            None => true,
            Some(o) => {
                self.note("node.udp_offload", &o.span());
                *o.get_ref()
            }
        };

        let policy = match raw.policy {
            None => None,
            Some(p) => {
                let span = p.span();
                self.note("policy", &span);
                let p = p.into_inner();
                let default = match &p.default {
                    None => PolicyDefault::Deny,
                    Some(d) => {
                        self.note("policy.default", &d.span());
                        match d.get_ref().as_str() {
                            "deny" => PolicyDefault::Deny,
                            "allow" => PolicyDefault::Allow,
                            other => {
                                return Err(self.err(
                                    &d.span(),
                                    "policy.default",
                                    format!("{other:?} is not \"deny\" or \"allow\""),
                                ))
                            }
                        }
                    }
                };
                let file = match &p.file {
                    None => None,
                    Some(f) => Some(self.path("policy.file", f)?),
                };
                Some(PolicyConfig { default, file })
            }
        };

        let mut peers = Vec::with_capacity(raw.peer.len());
        for (i, p) in raw.peer.iter().enumerate() {
            self.note(&format!("peer[{i}]"), &p.span());
            let p = p.get_ref();
            let cert = self.path(&format!("peer[{i}].cert"), &p.cert)?;
            let endpoint = match &p.endpoint {
                None => None,
                Some(e) => Some(self.socket_addr(&format!("peer[{i}].endpoint"), e)?),
            };
            if let Some(j) = peers.iter().position(|q: &PeerConfig| q.cert == cert) {
                return Err(self.err(
                    &p.cert.span(),
                    &format!("peer[{i}].cert"),
                    format!("same certificate as peer[{j}]"),
                ));
            }
            peers.push(PeerConfig { cert, endpoint });
        }

        let mut workloads: Vec<WorkloadConfig> = Vec::with_capacity(raw.workload.len());
        for (i, w) in raw.workload.iter().enumerate() {
            self.note(&format!("workload[{i}]"), &w.span());
            let w = w.get_ref();
            let field = format!("workload[{i}].name");
            self.note(&field, &w.name.span());
            let name = w.name.get_ref().clone();
            check_workload_name(&name).map_err(|m| self.err(&w.name.span(), &field, m))?;
            if let Some(j) = workloads.iter().position(|q| q.name == name) {
                return Err(self.err(
                    &w.name.span(),
                    &field,
                    format!("same name as workload[{j}]"),
                ));
            }
            let cert = self.path(&format!("workload[{i}].cert"), &w.cert)?;
            let key = self.path(&format!("workload[{i}].key"), &w.key)?;
            if cert == self.base.join(n.cert.get_ref()) || workloads.iter().any(|q| q.cert == cert)
            {
                return Err(self.err(
                    &w.cert.span(),
                    &format!("workload[{i}].cert"),
                    "certificate already used by the node or another workload",
                ));
            }
            let veth = match &w.veth {
                None => None,
                Some(v) => {
                    let field = format!("workload[{i}].veth");
                    self.note(&field, &v.span());
                    check_ifname(v.get_ref()).map_err(|m| self.err(&v.span(), &field, m))?;
                    if *v.get_ref() == tun
                        || workloads
                            .iter()
                            .any(|q| q.veth.as_ref() == Some(v.get_ref()))
                    {
                        return Err(self.err(
                            &v.span(),
                            &field,
                            format!("{:?} is used already", v.get_ref()),
                        ));
                    }
                    Some(v.get_ref().clone())
                }
            };
            workloads.push(WorkloadConfig {
                name,
                cert,
                key,
                veth,
            });
        }

        let store = match raw.store {
            None => None,
            Some(st) => Some(self.store(st, listen)?),
        };

        Ok(Config {
            file: self.file.to_path_buf(),
            node: NodeConfig {
                cert,
                key,
                ca,
                listen,
                tun,
                mtu,
                state_dir,
                control_socket,
                routes,
                log_level,
                cpu_latency_us,
                host_filter,
                udp_offload,
            },
            policy,
            peers,
            workloads,
            store,
            lines: std::mem::take(&mut self.lines),
        })
    }

    fn store(
        &mut self,
        st: Spanned<RawStore>,
        listen: SocketAddr,
    ) -> Result<StoreConfig, ConfigError> {
        let span = st.span();
        self.note("store", &span);
        let st = st.into_inner();
        if st.endpoints.is_empty() || st.endpoints.len() > MAX_STORE_ENDPOINTS {
            return Err(self.err(
                &span,
                "store.endpoints",
                format!("list 1 to {MAX_STORE_ENDPOINTS} etcd endpoints (e.g. [\"http://198.18.0.9:2379\"])"),
            ));
        }
        let mut endpoints = Vec::with_capacity(st.endpoints.len());
        let mut https = None;
        for (i, e) in st.endpoints.iter().enumerate() {
            let field = format!("store.endpoints[{i}]");
            self.note(&field, &e.span());
            let tls =
                check_store_endpoint(e.get_ref()).map_err(|m| self.err(&e.span(), &field, m))?;
            if https.is_some_and(|h| h != tls) {
                return Err(self.err(&e.span(), &field, "mixes http:// and https:// endpoints"));
            }
            https = Some(tls);
            endpoints.push(e.get_ref().clone());
        }
        let https = https == Some(true);
        let prefix = match &st.prefix {
            None => None,
            Some(p) => {
                self.note("store.prefix", &p.span());
                Some(
                    Prefix::parse(p.get_ref())
                        .map_err(|m| self.err(&p.span(), "store.prefix", m))?,
                )
            }
        };
        let mut policy_keys = Vec::with_capacity(st.policy_keys.len());
        for (i, k) in st.policy_keys.iter().enumerate() {
            let field = format!("store.policy_keys[{i}]");
            let path = self.path(&field, k)?;
            if policy_keys.contains(&path) {
                return Err(self.err(&k.span(), &field, "listed twice"));
            }
            policy_keys.push(path);
        }
        let lease_secs = match &st.lease_secs {
            None => DEFAULT_LEASE_SECS,
            Some(l) => {
                self.note("store.lease_secs", &l.span());
                let v = *l.get_ref();
                if !(i64::from(MIN_LEASE_SECS)..=i64::from(MAX_LEASE_SECS)).contains(&v) {
                    return Err(self.err(
                        &l.span(),
                        "store.lease_secs",
                        format!(
                            "{v} is out of range {MIN_LEASE_SECS}..={MAX_LEASE_SECS} (seconds)"
                        ),
                    ));
                }
                v as u32
            }
        };
        let ca = st
            .tls_ca
            .as_ref()
            .map(|c| self.path("store.tls_ca", c))
            .transpose()?;
        let cert = st
            .tls_cert
            .as_ref()
            .map(|c| self.path("store.tls_cert", c))
            .transpose()?;
        let key = st
            .tls_key
            .as_ref()
            .map(|c| self.path("store.tls_key", c))
            .transpose()?;
        let client = match (cert, key) {
            (None, None) => None,
            (Some(c), Some(k)) => Some((c, k)),
            (Some(_), None) => {
                let s = st
                    .tls_cert
                    .as_ref()
                    .map(Spanned::span)
                    .unwrap_or(span.clone());
                return Err(self.err(&s, "store.tls_cert", "needs tls_key too"));
            }
            (None, Some(_)) => {
                let s = st
                    .tls_key
                    .as_ref()
                    .map(Spanned::span)
                    .unwrap_or(span.clone());
                return Err(self.err(&s, "store.tls_key", "needs tls_cert too"));
            }
        };
        let tls = match (https, ca) {
            (true, Some(ca)) => Some(StoreTls { ca, client }),
            (true, None) => {
                return Err(self.err(
                    &span,
                    "store.tls_ca",
                    "https:// endpoints need tls_ca, the CA of etcd's server certificate",
                ))
            }
            (false, None) if client.is_none() => None,
            (false, _) => {
                let field = if st.tls_ca.is_some() {
                    "store.tls_ca"
                } else {
                    "store.tls_cert"
                };
                let s = st
                    .tls_ca
                    .as_ref()
                    .or(st.tls_cert.as_ref())
                    .map(Spanned::span)
                    .unwrap_or(span.clone());
                return Err(self.err(&s, field, "TLS settings need https:// endpoints"));
            }
        };
        let mut advertise = Vec::new();
        for (i, a) in st.advertise.iter().flatten().enumerate() {
            let field = format!("store.advertise[{i}]");
            let addr = self.socket_addr(&field, a)?;
            if addr.ip().is_unspecified() {
                return Err(self.err(
                    &a.span(),
                    &field,
                    format!("{addr} is not an address peers can reach"),
                ));
            }
            advertise.push(addr);
        }
        if advertise.len() > crate::store::MAX_ENDPOINTS {
            return Err(self.err(
                &span,
                "store.advertise",
                format!("at most {} endpoints", crate::store::MAX_ENDPOINTS),
            ));
        }
        if advertise.is_empty() {
            if listen.ip().is_unspecified() {
                return Err(self.err(
                    &span,
                    "store.advertise",
                    format!("node.listen is {listen}: name the address and port peers reach this node at (advertise = [\"198.18.0.1:{}\"])", listen.port()),
                ));
            }
            advertise.push(listen);
        }
        Ok(StoreConfig {
            endpoints,
            prefix,
            tls,
            policy_keys,
            lease_secs,
            advertise,
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[node]
cert = "a.crt"
key = "a.key"
ca = "ca.crt"
listen = "198.18.0.1:51820"
state_dir = "state"
control_socket = "meshd.sock"

[[peer]]
cert = "b.crt"
endpoint = "198.18.0.2:51820"

[[peer]]
cert = "/abs/c.crt"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/mesh/meshd.toml"), text)
    }

    #[test]
    fn good_config_with_defaults_and_relative_paths() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.node.cert, Path::new("/etc/mesh/a.crt"));
        assert_eq!(c.node.tun, "mesh0");
        assert_eq!(c.node.mtu, 1420);
        assert_eq!(c.node.log_level, LogLevel::Info);
        assert_eq!(c.node.routes, None);
        assert_eq!(c.node.cpu_latency_us, None);
        assert!(
            c.node.host_filter,
            "the host filter is on unless switched off"
        );
        assert!(c.node.udp_offload);
        assert!(c.policy.is_none());
        assert_eq!(c.peers.len(), 2);
        assert_eq!(
            c.peers[0].endpoint,
            Some("198.18.0.2:51820".parse().unwrap())
        );
        assert_eq!(c.peers[1].cert, Path::new("/abs/c.crt"));
        assert_eq!(c.peers[1].endpoint, None);
        assert_eq!(c.line_of("peer[1].cert"), Some(15));
        assert_eq!(
            c.error("peer[0].cert", "cannot read").to_string(),
            "/etc/mesh/meshd.toml:11: peer[0].cert: cannot read"
        );
    }

    #[test]
    fn ipv6_listen_routes_policy() {
        let text = GOOD.replace("198.18.0.1:51820", "[fd00:198:18::1]:51820").replace(
            "control_socket = \"meshd.sock\"",
            "control_socket = \"meshd.sock\"\nroutes = [\"100.64.0.0/10\", \"fd00:6d65:7368::/48\"]\nmtu = 1280\ncpu_latency_us = 0\nhost_filter = false\nudp_offload = false\n\n[policy]\ndefault = \"allow\"\nfile = \"p.toml\"",
        );
        let c = parse(&text).unwrap();
        assert!(c.node.listen.is_ipv6());
        assert_eq!(c.node.routes.as_ref().unwrap().len(), 2);
        assert_eq!(c.node.mtu, 1280);
        assert_eq!(c.node.cpu_latency_us, Some(0));
        assert!(!c.node.host_filter);
        assert!(!c.node.udp_offload);
        assert_eq!(c.line_of("node.udp_offload"), Some(13));
        let p = c.policy.unwrap();
        assert_eq!(p.default, PolicyDefault::Allow);
        assert_eq!(p.file, Some(PathBuf::from("/etc/mesh/p.toml")));
    }

    /// Each bad input gives the expected "file:line: field: ..." prefix.
    #[test]
    fn errors_name_file_line_and_field() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "listen = \"198.18.0.1:51820\"",
                "listen = \"198.18.0.1\"",
                "/etc/mesh/meshd.toml:6: node.listen: ",
            ),
            (
                "state_dir",
                "lisen = 1\nstate_dir",
                "/etc/mesh/meshd.toml:7: node: unknown field `lisen`",
            ),
            (
                "endpoint = \"198.18.0.2:51820\"",
                "endpoint = \"nope\"",
                "/etc/mesh/meshd.toml:12: peer[0].endpoint: ",
            ),
            (
                "cert = \"/abs/c.crt\"",
                "cert = \"/abs/c.crt\"\nport = 3",
                "/etc/mesh/meshd.toml:16: peer[1]: unknown field `port`",
            ),
            (
                "state_dir = \"state\"",
                "state_dir = \"state\"\nmtu = 100",
                "/etc/mesh/meshd.toml:8: node.mtu: 100 is out of range",
            ),
            (
                "state_dir = \"state\"",
                "state_dir = \"state\"\nmtu = \"big\"",
                "/etc/mesh/meshd.toml:8: node: invalid type",
            ),
            (
                "state_dir = \"state\"",
                "state_dir = \"state\"\ntun = \"this-name-is-too-long\"",
                "/etc/mesh/meshd.toml:8: node.tun: ",
            ),
            (
                "state_dir = \"state\"",
                "state_dir = \"state\"\nroutes = [\"100.64.0.1/10\"]",
                "/etc/mesh/meshd.toml:8: node.routes[0]: \"100.64.0.1/10\" has host bits set",
            ),
            (
                "state_dir = \"state\"",
                "state_dir = \"state\"\nlog_level = \"loud\"",
                "/etc/mesh/meshd.toml:8: node.log_level: ",
            ),
            (
                "state_dir = \"state\"",
                "state_dir = \"state\"\ncpu_latency_us = -1",
                "/etc/mesh/meshd.toml:8: node.cpu_latency_us: -1 is out of range 0..=100000 (microseconds)",
            ),
            (
                "state_dir = \"state\"",
                "state_dir = \"state\"\ncpu_latency_us = 100001",
                "/etc/mesh/meshd.toml:8: node.cpu_latency_us: 100001 is out of range",
            ),
            (
                "state_dir = \"state\"",
                "state_dir = \"state\"\nhost_filter = \"off\"",
                "/etc/mesh/meshd.toml:8: node: invalid type: string \"off\", expected a boolean",
            ),
            (
                "cert = \"/abs/c.crt\"",
                "cert = \"b.crt\"",
                "/etc/mesh/meshd.toml:15: peer[1].cert: same certificate as peer[0]",
            ),
            (
                "[[peer]]\ncert = \"b.crt\"",
                "[policy]\ndefault = \"maybe\"\n[[peer]]\ncert = \"b.crt\"",
                "/etc/mesh/meshd.toml:11: policy.default: ",
            ),
            (
                "cert = \"a.crt\"",
                "cert = \"\"",
                "/etc/mesh/meshd.toml:3: node.cert: path may not be empty",
            ),
            (
                "cert = \"a.crt\"\n",
                "",
                "/etc/mesh/meshd.toml:2: node: missing field `cert`",
            ),
            ("[node]", "[node", "/etc/mesh/meshd.toml:2: "),
        ];
        for (from, to, want) in cases {
            let text = GOOD.replacen(from, to, 1);
            assert_ne!(text, GOOD, "case {from:?} did not apply");
            let err = parse(&text).expect_err(to).to_string();
            assert!(
                err.starts_with(want),
                "for {to:?}\n got: {err}\nwant: {want}..."
            );
            assert!(!err.contains('\n'), "one line: {err}");
        }
    }

    #[test]
    fn workloads_parse_and_errors_name_the_field() {
        let text = format!(
            "{GOOD}\n[[workload]]\nname = \"web\"\ncert = \"web.crt\"\nkey = \"web.key\"\nveth = \"p-web\"\n\n[[workload]]\nname = \"db\"\ncert = \"db.crt\"\nkey = \"db.key\"\n"
        );
        let c = parse(&text).unwrap();
        assert_eq!(c.workloads.len(), 2);
        assert_eq!(c.workloads[0].cert, Path::new("/etc/mesh/web.crt"));
        assert_eq!(c.workloads[0].veth.as_deref(), Some("p-web"));
        assert_eq!(c.workloads[1].veth, None);
        for (from, to, want) in [
            (
                "name = \"db\"",
                "name = \"web\"",
                "workload[1].name: same name as workload[0]",
            ),
            (
                "name = \"db\"",
                "name = \"node\"",
                "workload[1].name: \"node\" is the node's own identity",
            ),
            ("name = \"db\"", "name = \"DB\"", "workload[1].name: "),
            (
                "veth = \"p-web\"",
                "veth = \"mesh0\"",
                "workload[0].veth: \"mesh0\" is used already",
            ),
            (
                "cert = \"db.crt\"",
                "cert = \"a.crt\"",
                "workload[1].cert: certificate already used",
            ),
            (
                "key = \"db.key\"",
                "key = \"db.key\"\nport = 1",
                "workload[1]: unknown field `port`",
            ),
        ] {
            let bad = text.replacen(from, to, 1);
            let err = parse(&bad).expect_err(to).to_string();
            assert!(err.contains(want), "for {to:?}: {err}");
        }
    }

    #[test]
    fn store_table() {
        let text = format!(
            "{GOOD}\n[store]\nendpoints = [\"http://198.18.0.9:2379\", \"http://[fd00::9]:2379\"]\npolicy_keys = [\"policy.pub\", \"/keys/old.pub\"]\n"
        );
        let c = parse(&text).unwrap();
        let s = c.store.as_ref().unwrap();
        assert_eq!(s.endpoints.len(), 2);
        assert_eq!(s.prefix, None);
        assert_eq!(s.tls, None);
        assert_eq!(s.lease_secs, DEFAULT_LEASE_SECS);
        assert_eq!(s.advertise, ["198.18.0.1:51820".parse().unwrap()]);
        assert_eq!(
            s.policy_keys,
            [
                PathBuf::from("/etc/mesh/policy.pub"),
                PathBuf::from("/keys/old.pub")
            ]
        );
        let td = TrustDomain::parse("example.org").unwrap();
        assert_eq!(s.prefix_for(&td).as_str(), "/meshd/example.org/");
        assert!(parse(GOOD).unwrap().store.is_none());

        let tls = format!(
            "{GOOD}\n[store]\nendpoints = [\"https://etcd.example.org:2379\"]\nprefix = \"/fleet/a/\"\nlease_secs = 3\ntls_ca = \"etcd-ca.pem\"\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"\n"
        );
        let c = parse(&tls.replace("198.18.0.1:51820", "0.0.0.0:51820"));
        let e = c.unwrap_err().to_string();
        assert!(
            e.starts_with("/etc/mesh/meshd.toml:17: store.advertise: node.listen is 0.0.0.0:51820"),
            "{e}"
        );
        let c = parse(&format!("{tls}advertise = [\"[fd00::1]:51820\"]\n")).unwrap();
        let s = c.store.unwrap();
        assert_eq!(s.advertise, ["[fd00::1]:51820".parse().unwrap()]);
        assert_eq!(s.prefix_for(&td).as_str(), "/fleet/a/");
        assert_eq!(s.lease_secs, 3);
        assert_eq!(
            s.tls,
            Some(StoreTls {
                ca: PathBuf::from("/etc/mesh/etcd-ca.pem"),
                client: Some((
                    PathBuf::from("/etc/mesh/c.pem"),
                    PathBuf::from("/etc/mesh/k.pem")
                )),
            })
        );

        // Line 17 is `[store]`, line 18 `endpoints`.
        let base = format!("{GOOD}\n[store]\nendpoints = [\"http://198.18.0.9:2379\"]\n");
        for (add, want) in [
            ("", "OK"),
            (
                "prefix = \"meshd\"\n",
                "meshd.toml:19: store.prefix: \"meshd\" must start and end with \"/\"",
            ),
            (
                "lease_secs = 1\n",
                "meshd.toml:19: store.lease_secs: 1 is out of range 2..=3600",
            ),
            (
                "policy_keys = [\"a.pub\", \"a.pub\"]\n",
                "meshd.toml:19: store.policy_keys[1]: listed twice",
            ),
            (
                "policy_keys = [\"\"]\n",
                "meshd.toml:19: store.policy_keys[0]: path may not be empty",
            ),
            (
                "tls_ca = \"ca.pem\"\n",
                "meshd.toml:19: store.tls_ca: TLS settings need https:// endpoints",
            ),
            (
                "tls_cert = \"c.pem\"\n",
                "meshd.toml:19: store.tls_cert: needs tls_key too",
            ),
            (
                "endpont = 1\n",
                "meshd.toml:19: store: unknown field `endpont`",
            ),
        ] {
            let text = format!("{base}{add}");
            match parse(&text) {
                Ok(_) => assert_eq!(want, "OK", "{add:?} was accepted"),
                Err(e) => {
                    let e = e.to_string();
                    assert!(e.starts_with(&format!("/etc/mesh/{want}")), "{add:?}: {e}");
                }
            }
        }
        for (endpoints, want) in [
            ("[]", "meshd.toml:17: store.endpoints: list 1 to 16"),
            ("[\"198.18.0.9:2379\"]", "meshd.toml:18: store.endpoints[0]: \"198.18.0.9:2379\" must start with http://"),
            ("[\"http://198.18.0.9\"]", "meshd.toml:18: store.endpoints[0]: "),
            ("[\"http://198.18.0.9:2379/v3\"]", "meshd.toml:18: store.endpoints[0]: "),
            ("[\"http://198.18.0.9:0\"]", "meshd.toml:18: store.endpoints[0]: \"http://198.18.0.9:0\": port 0 is out of range"),
            ("[\"http://a b:1\"]", "meshd.toml:18: store.endpoints[0]: "),
            ("[\"http://[zz]:1\"]", "meshd.toml:18: store.endpoints[0]: "),
            ("[\"http://a:1\", \"https://b:1\"]", "meshd.toml:18: store.endpoints[1]: mixes http:// and https://"),
            ("[\"https://b:1\"]", "meshd.toml:17: store.tls_ca: https:// endpoints need tls_ca"),
        ] {
            let text = format!("{GOOD}\n[store]\nendpoints = {endpoints}\n");
            let e = parse(&text).expect_err(endpoints).to_string();
            assert!(e.starts_with(&format!("/etc/mesh/{want}")), "{endpoints}: {e}");
            assert!(!e.contains('\n'), "one line: {e}");
        }
    }

    #[test]
    fn missing_node_table() {
        let err = parse("[[peer]]\ncert = \"b.crt\"\n").unwrap_err();
        assert!(err.to_string().contains("missing field `node`"), "{err}");
    }

    #[test]
    fn line_numbers_from_offsets() {
        assert_eq!(line_of_offset("a\nb\nc", 0), 1);
        assert_eq!(line_of_offset("a\nb\nc", 2), 2);
        assert_eq!(line_of_offset("a\nb\nc", 4), 3);
        assert_eq!(line_of_offset("a\nb\nc", 99), 3);
    }
}
