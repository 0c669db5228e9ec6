//! Validation of `meshd.toml`: the raw tables as written (serde, with spans), checked
//! field by field into [`Config`]; every error names the file, line and field.

use super::*;

// ---- raw, as written ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
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
    workers: Option<Spanned<i64>>,
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

pub(super) struct Validator<'a> {
    pub(super) file: &'a Path,
    pub(super) text: &'a str,
    pub(super) base: PathBuf,
    pub(super) lines: BTreeMap<String, usize>,
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
    pub(super) fn toml_error(&self, e: &toml::de::Error) -> ConfigError {
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

    pub(super) fn validate(&mut self, raw: RawConfig) -> Result<Config, ConfigError> {
        let node = self.node(&raw.node)?;
        let policy = self.policy(raw.policy)?;
        let peers = self.peers(&raw.peer)?;
        let workloads = self.workloads(&raw.workload, &node)?;
        let store = match raw.store {
            None => None,
            Some(st) => Some(self.store(st, node.listen)?),
        };
        Ok(Config {
            file: self.file.to_path_buf(),
            node,
            policy,
            peers,
            workloads,
            store,
            lines: std::mem::take(&mut self.lines),
        })
    }

    /// `[node]`.
    fn node(&mut self, n: &RawNode) -> Result<NodeConfig, ConfigError> {
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
        let workers = match &n.workers {
            None => DEFAULT_WORKERS,
            Some(w) => {
                self.note("node.workers", &w.span());
                let v = *w.get_ref();
                if !(0..=i64::from(MAX_WORKERS)).contains(&v) {
                    return Err(self.err(
                        &w.span(),
                        "node.workers",
                        format!(
                            "{v} is out of range 0..={MAX_WORKERS} (0: one thread per direction)"
                        ),
                    ));
                }
                v as u8
            }
        };
        Ok(NodeConfig {
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
            workers,
        })
    }

    /// `[policy]`.
    fn policy(
        &mut self,
        raw: Option<Spanned<RawPolicy>>,
    ) -> Result<Option<PolicyConfig>, ConfigError> {
        Ok(match raw {
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
        })
    }

    /// `[[peer]]`.
    fn peers(&mut self, raw: &[Spanned<RawPeer>]) -> Result<Vec<PeerConfig>, ConfigError> {
        let mut peers = Vec::with_capacity(raw.len());
        for (i, p) in raw.iter().enumerate() {
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
        Ok(peers)
    }

    /// `[[workload]]`: names, certificates and veths unique, none the node's.
    fn workloads(
        &mut self,
        raw: &[Spanned<RawWorkload>],
        node: &NodeConfig,
    ) -> Result<Vec<WorkloadConfig>, ConfigError> {
        let mut workloads: Vec<WorkloadConfig> = Vec::with_capacity(raw.len());
        for (i, w) in raw.iter().enumerate() {
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
            if cert == node.cert || workloads.iter().any(|q| q.cert == cert) {
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
                    if *v.get_ref() == node.tun
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
        Ok(workloads)
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
