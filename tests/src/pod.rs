//! Pods: workloads with their own identity in their own network namespace behind a
//! host, attached as a CNI plugin would: a veth pair (`p-<pod>` on the host, `eth0` in
//! the pod), the pod's address on `eth0` with the TUN's MTU, the overlay routed out of
//! `eth0`, the host
//! answering the pod's ARP (`proxy_arp`) and forwarding. Then, as an operator would,
//! `meshctl workload add` on the host and `meshctl peer add` on every other host.
//!
//! Pod number `n` (from 1) of host number `i` gets 100.65.i.n and fd00:6d65:7368:i::n;
//! its IPv6 overlay is routed via the host end's link-local address fe80::1. A pod is a
//! [`Host`] without meshd, so every traffic helper works from and to it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};

use crate::host::{Host, HostInner};
use crate::mesh::{write_private, Mesh, OVERLAY_V4, OVERLAY_V6};
use crate::netns::Netns;
use crate::Validity;

/// A pod: its own namespace (use it as a [`Host`] through `Deref`), its identity and
/// the host it sits behind.
pub struct Pod {
    pub ns: Host,
    pub on: Host,
    pub name: String,
    pub identity: String,
    pub address: IpAddr,
    pub address_v6: IpAddr,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
}

impl std::ops::Deref for Pod {
    type Target = Host;
    fn deref(&self) -> &Host {
        &self.ns
    }
}

impl Pod {
    /// The host end of its veth.
    pub fn veth(&self) -> String {
        format!("p-{}", self.name)
    }

    /// `meshctl workload add` on its host.
    pub fn add_to_host(&self) -> Result<()> {
        let cert = self.cert_path.to_str().context("path is not UTF-8")?;
        let key = self.key_path.to_str().context("path is not UTF-8")?;
        let veth = self.veth();
        self.on
            .meshctl(&[
                "workload", "add", &self.name, "--cert", cert, "--key", key, "--veth", &veth,
            ])?
            .check()
            .with_context(|| format!("adding workload {} to {}", self.name, self.on.name()))?;
        Ok(())
    }

    /// Issues the pod a new certificate for the same identity, addresses and key, with
    /// `groups` and `validity`, put in place of its certificate file (written beside,
    /// then renamed over it), where its host's meshd takes it from; then gives it to
    /// every other host with meshd (`meshctl peer add`). Returns the new end.
    pub fn renew_cert(
        &self,
        mesh: &Mesh,
        groups: &[&str],
        validity: Validity,
    ) -> Result<mesh_proto::time::UnixTime> {
        let groups: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
        let issued = self.on.0.ca.issue(
            &self.identity,
            &[self.address, self.address_v6],
            &groups,
            Some(&self.ns.public_key()),
            validity,
        )?;
        let next = self.cert_path.with_extension("crt.new");
        std::fs::write(&next, &issued.cert_pem)?;
        std::fs::rename(&next, &self.cert_path)
            .with_context(|| format!("rename over {}", self.cert_path.display()))?;
        for h in mesh.all_hosts() {
            if !h.has_meshd() || h.name() == self.on.name() {
                continue;
            }
            let cert = h.dir().join("peers").join(format!("{}.crt", self.name));
            std::fs::write(&cert, &issued.cert_pem)?;
            let cert = cert.to_str().context("path is not UTF-8")?.to_string();
            let ep = self.on.endpoint().to_string();
            h.meshctl(&["peer", "add", &cert, "--endpoint", &ep])?
                .check()
                .with_context(|| format!("giving {} pod {}'s renewal", h.name(), self.name))?;
        }
        Ok(issued.cert.not_after())
    }

    /// `meshctl workload remove` on its host.
    pub fn remove_from_host(&self) -> Result<()> {
        self.on
            .meshctl(&["workload", "remove", &self.name])?
            .check()
            .map(|_| ())
    }
}

/// A pod's certificate and key files, issued before the pod exists (for a
/// `[[workload]]` table in meshd.toml).
pub struct PodCert {
    pub name: String,
    pub identity: String,
    pub address: IpAddr,
    pub address_v6: IpAddr,
    pub cert_pem: String,
    pub public_key: String,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    dir: PathBuf,
}

impl PodCert {
    /// The `[[workload]]` table for it.
    pub fn workload_toml(&self) -> String {
        format!(
            "[[workload]]\nname = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\nveth = \"p-{}\"\n",
            self.name,
            self.cert_path.display(),
            self.key_path.display(),
            self.name
        )
    }
}

impl Mesh {
    /// A pod `name` (1–12 of `[a-z0-9]`, unique in the mesh) behind `on`, with identity
    /// `spiffe://t/<name>` and `groups`; added to `on`'s meshd as a workload and to
    /// every other host's meshd as a peer.
    pub fn pod(&mut self, on: &Host, name: &str, groups: &[&str]) -> Result<Pod> {
        let cert = self.pod_cert(on, name, groups)?;
        let pod = self.plug_pod(on, cert)?;
        pod.add_to_host()?;
        Ok(pod)
    }

    /// Issues pod `name`'s certificate and key (files in `on`'s directory) and
    /// allocates its address; nothing else.
    pub fn pod_cert(&mut self, on: &Host, name: &str, groups: &[&str]) -> Result<PodCert> {
        if name.is_empty()
            || name.len() > 12
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            bail!("pod name {name:?}: use 1-12 characters of [a-z0-9]");
        }
        if self.hosts.iter().any(|h| h.name() == name) {
            bail!("{name:?} exists already");
        }
        let pods = on.dir().join("pods");
        let n = std::fs::read_dir(&pods).map_or(0, |d| d.count()) + 1;
        let address = IpAddr::V4(Ipv4Addr::new(100, 65, on.index() as u8, n as u8));
        let address_v6 = IpAddr::V6(Ipv6Addr::new(
            0xfd00,
            0x6d65,
            0x7368,
            on.index() as u16,
            0,
            0,
            0,
            n as u16,
        ));
        let identity = format!("spiffe://t/{name}");
        let dir = pods.join(name);
        std::fs::create_dir_all(dir.join("www"))?;
        let groups: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
        let issued = on.0.ca.issue(
            &identity,
            &[address, address_v6],
            &groups,
            None,
            Validity::Current,
        )?;
        let cert_path = dir.join("pod.crt");
        let key_path = dir.join("pod.key");
        std::fs::write(&cert_path, &issued.cert_pem)?;
        write_private(&key_path, issued.key_b64.as_bytes())?;
        Ok(PodCert {
            name: name.to_string(),
            identity,
            address,
            address_v6,
            cert_pem: issued.cert_pem,
            public_key: issued.public_key_b64,
            cert_path,
            key_path,
            dir,
        })
    }

    /// Creates the pod's namespace and veth (the CNI plugin's part) and adds it as a
    /// peer to every other host; does not tell `on`'s meshd (see [`Pod::add_to_host`]).
    pub fn plug_pod(&mut self, on: &Host, cert: PodCert) -> Result<Pod> {
        let PodCert {
            name,
            identity,
            address,
            address_v6,
            cert_pem,
            public_key,
            cert_path,
            key_path,
            dir,
        } = cert;
        let name = name.as_str();
        let ns = Netns::create(&format!("{}{name}", self.prefix))?;
        let veth = format!("p-{name}");
        on.netns().ip(&[
            "link",
            "add",
            &veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ])?;
        // As CNI plugins do: the pod's MTU leaves room for the tunnel (the TUN's).
        let mtu = mesh_proto::config::DEFAULT_MTU.to_string();
        on.netns().ip(&["link", "set", &veth, "mtu", &mtu, "up"])?;
        ns.ip(&["addr", "add", &format!("{address}/32"), "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "mtu", &mtu, "up"])?;
        ns.ip(&["route", "add", OVERLAY_V4, "dev", "eth0"])?;
        on.netns()
            .ip(&["addr", "add", "fe80::1/64", "dev", &veth, "nodad"])?;
        ns.ip(&[
            "addr",
            "add",
            &format!("{address_v6}/128"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        ns.ip(&[
            "-6", "route", "add", OVERLAY_V6, "via", "fe80::1", "dev", "eth0",
        ])?;
        for (key, value) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv6.conf.all.forwarding", "1"),
            (&format!("net.ipv4.conf.{veth}.proxy_arp") as &str, "1"),
        ] {
            let path = format!("/proc/sys/{}", key.replace('.', "/"));
            on.run("sh", &["-c", &format!("echo {value} > {path}")])?;
        }
        let pod_host = Host(Arc::new(HostInner {
            name: name.to_string(),
            identity: identity.clone(),
            index: on.index(),
            dir,
            bins: self.bins.clone(),
            ca: on.0.ca.clone(),
            underlay_v4: Mutex::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            underlay_v6: IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            ipv6_underlay: false,
            overlay_v4: address,
            overlay_v6: address_v6,
            cert_pem: Mutex::new(String::new()),
            public_key: Mutex::new(public_key),
            meshd: Mutex::new(None),
            meshd_env: Mutex::new(Vec::new()),
            background: Mutex::new(Vec::new()),
            ns,
        }));
        self.hosts.push(pod_host.clone());
        let pod = Pod {
            ns: pod_host,
            on: on.clone(),
            name: name.to_string(),
            identity,
            address,
            address_v6,
            cert_path,
            key_path,
        };
        let others: Vec<Host> = self
            .hosts
            .iter()
            .filter(|h| h.has_meshd() && h.name() != on.name())
            .cloned()
            .collect();
        for h in others {
            let cert = h.dir().join("peers").join(format!("{name}.crt"));
            std::fs::create_dir_all(h.dir().join("peers"))?;
            std::fs::write(&cert, &cert_pem)?;
            let cert = cert.to_str().context("path is not UTF-8")?.to_string();
            let ep = on.endpoint().to_string();
            h.meshctl(&["peer", "add", &cert, "--endpoint", &ep])?
                .check()
                .with_context(|| format!("adding pod {name} as a peer of {}", h.name()))?;
        }
        Ok(pod)
    }
}
