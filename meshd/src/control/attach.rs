//! Attaching pods (I/O shell): the kernel routing that makes every packet of a pod
//! behind a veth pass through meshd, and only with the pod's own source addresses.
//!
//! A pod sits in its own network namespace; the host end of its veth pair is in the
//! host's. The operator (or CNI plugin) creates the pair, addresses the pod, lets the
//! host answer the pod's ARP (`proxy_arp`) and enables forwarding. meshd then installs,
//! with rtnetlink:
//!
//! ```text
//! pref 100  iif <tun>                   lookup 51820   # what meshd delivers → pod veths
//! pref 105  iif <veth> to fe80::/10 ipproto icmpv6 lookup local  # neighbour discovery
//! pref 106  iif <veth> to ff00::/8  ipproto icmpv6 lookup local  #   (IPv6 only)
//! pref 110  iif <veth> from <pod addr>  lookup 51822   # the pod's own addresses: to
//! pref 111  iif <veth> from <pod addr>  lookup main    #   the host or the mesh → TUN
//! pref 120  iif <veth>                  lookup 51821   # anything else it sends → quarantine
//! pref 130  iif <veth>                  prohibit
//! pref 150                              lookup local   # moved from pref 0 (see below)
//! table 51820: <pod addr> dev <veth>
//! table 51821: <mesh prefixes> dev <tun>q              # meshd counts and drops these
//! table 51822: <the host's own addresses> dev <tun>
//! ```
//!
//! The pods' own routes live only in table 51820, consulted for packets meshd writes to
//! the TUN, so the host never forwards one pod's packet straight to another: same-host
//! traffic enters the TUN, where the enforcer decides it like any other (invariant 3).
//! That holds for the host itself too, both ways. The kernel consults its `local`
//! table (the host's own addresses) first of all, at pref 0, so a pod's packets to its
//! host were delivered at once, without policy and whatever their source; meshd moves
//! that lookup to pref 150, after the pods' rules (Cilium moves it to 100 likewise), so
//! that they go into the TUN through table 51822 and are decided as the pod's, like
//! pod to pod. For every other interface nothing changes: no rule before 150 matches
//! its packets. The host's own packets to its pods follow the main table into the TUN
//! as well (meshd decides them as the node's identity); the TUN takes back, with
//! `accept_local`, the packets meshd delivers from the host's own addresses (its ICMP
//! errors, path MTU among them, and its replies), which the kernel would otherwise drop
//! as martians; and early demux is turned off, since it would tie a pod's packet to the
//! host's socket before routing, and a packet with a socket is never forwarded.
//! A packet with a source other than the pod's own addresses never reaches the TUN
//! (where it could pass as its neighbour's): it lands on the quarantine device, where
//! meshd counts it as `forged_source`, or is refused outright. Neighbour discovery
//! (link-local and multicast ICMPv6) still reaches the host directly; ARP is not
//! routed. The host filter ([`crate::control::hostfilter`]) drops anything else a pod sends
//! anywhere but into the TUN, so a route the pod adds (to the underlay, to the host's
//! underlay address) leads nowhere.
//!
//! When meshd stops, the veths' rules stay, and so does the moved `local` rule: a pod
//! whose host runs no meshd reaches nothing (its host's addresses included) until meshd
//! attaches it again. `ip rule add pref 0 lookup local` (and `-6`) puts the lookup back
//! on a host without pods.

use std::ffi::CString;
use std::io;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::sys::netlink::{finish, header, push_attr, request, route_message};

/// Routing table of the pods' veths, consulted for packets leaving the TUN.
pub const PODS_TABLE: u32 = 51820;
/// Routing table of packets whose source a pod does not own.
pub const QUARANTINE_TABLE: u32 = 51821;
/// Routing table of the host's own addresses, through the TUN, for its pods' packets.
pub const HOST_TABLE: u32 = 51822;
const PREF_FROM_TUN: u32 = 100;
/// An earlier meshd's rule that sent the host's own packets straight to its pods,
/// around policy: removed where found.
const PREF_FROM_HOST_BEFORE: u32 = 101;
const PREF_LINK_LOCAL: u32 = 105;
const PREF_MULTICAST: u32 = 106;
const PREF_TO_HOST: u32 = 110;
const PREF_OWN_SOURCE: u32 = 111;
const PREF_QUARANTINE: u32 = 120;
const PREF_PROHIBIT: u32 = 130;
/// Where the `local` table's rule moves to, after every rule of a pod's veth.
const PREF_LOCAL: u32 = 150;
const RT_TABLE_LOCAL: u32 = libc::RT_TABLE_LOCAL as u32;
const IPPROTO_ICMPV6: u8 = libc::IPPROTO_ICMPV6 as u8;

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("interface {0} does not exist (create the pod's veth first)")]
    NoInterface(String),
    #[error("cannot {what}: {source}")]
    Netlink { what: String, source: io::Error },
    #[error("cannot set {0}")]
    Sysctl(String),
}

/// The interface index of `name`.
pub fn if_index(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

/// The routing state for pods of one meshd: the TUN's rule is installed on creation
/// and removed on drop, each veth's on [`Attacher::attach`] / [`Attacher::detach`].
pub struct Attacher {
    tun: String,
    /// The host's own overlay addresses: the source of its packets to its pods.
    host: Vec<IpAddr>,
    /// The quarantine device's name, when there is one.
    quarantine: Option<String>,
    /// Prefixes routed to the quarantine device.
    prefixes: Vec<IpNet>,
}

impl Attacher {
    /// Installs the TUN's rule (replacing a stale one from an earlier run), routes the
    /// host's own addresses through the TUN in [`HOST_TABLE`], lets the TUN take back
    /// packets from them ([`host_sysctls`]), moves the `local` table's rule after the
    /// pods' ([`move_local`]) and, when `quarantine` names a device, routes `prefixes`
    /// to it in the quarantine table.
    pub fn new(
        tun: &str,
        host: &[IpAddr],
        quarantine: Option<&str>,
        prefixes: &[IpNet],
    ) -> Result<Attacher, AttachError> {
        let a = Attacher {
            tun: tun.to_string(),
            host: host.to_vec(),
            quarantine: quarantine.map(str::to_string),
            prefixes: prefixes.to_vec(),
        };
        for rule in a.own_rules() {
            rule.replace()?;
        }
        for v6 in [false, true] {
            Rule {
                iif: Some("lo"),
                ..Rule::new(v6, PREF_FROM_HOST_BEFORE, Action::Table(PODS_TABLE))
            }
            .delete_all()?;
        }
        let index = if_index(tun).ok_or_else(|| AttachError::NoInterface(tun.into()))?;
        for h in &a.host {
            route(true, IpNet::from(*h), index, HOST_TABLE, None)?;
        }
        host_sysctls(tun)?;
        move_local()?;
        if let Some(q) = &a.quarantine {
            let index = if_index(q).ok_or_else(|| AttachError::NoInterface(q.clone()))?;
            for p in &a.prefixes {
                route(true, *p, index, QUARANTINE_TABLE, None)?;
            }
        }
        Ok(a)
    }

    /// Routes `addresses` (the pod's certificate's) to `veth` for packets leaving the
    /// TUN, and lets only those sources from `veth` into the TUN.
    pub fn attach(&self, veth: &str, addresses: &[IpNet]) -> Result<(), AttachError> {
        let index = if_index(veth).ok_or_else(|| AttachError::NoInterface(veth.into()))?;
        let result = (|| {
            for a in addresses {
                let src = self
                    .host
                    .iter()
                    .copied()
                    .find(|h| h.is_ipv6() == a.addr().is_ipv6());
                route(true, *a, index, PODS_TABLE, src)?;
                for rule in own_source_rules(veth, *a) {
                    rule.replace()?;
                }
            }
            for rule in veth_rules(veth, self.quarantine.is_some()) {
                rule.replace()?;
            }
            Ok(())
        })();
        if result.is_err() {
            self.detach(veth, addresses);
        }
        result
    }

    /// Undoes [`Attacher::attach`]; what is already gone is fine.
    pub fn detach(&self, veth: &str, addresses: &[IpNet]) {
        let index = if_index(veth);
        for a in addresses {
            if let Some(i) = index {
                let _ = route(false, *a, i, PODS_TABLE, None);
            }
            for rule in own_source_rules(veth, *a) {
                let _ = rule.delete_all();
            }
        }
        for rule in veth_rules(veth, true) {
            let _ = rule.delete_all();
        }
    }
}

/// The rules that send a pod's packets from its own address `a` into the TUN: to the
/// host's addresses (table [`HOST_TABLE`]) and to the mesh (the main table's routes).
fn own_source_rules(veth: &str, a: IpNet) -> [Rule<'_>; 2] {
    let v6 = a.addr().is_ipv6();
    let from = |pref, table| Rule {
        iif: Some(veth),
        src: Some(a),
        ..Rule::new(v6, pref, Action::Table(table))
    };
    [
        from(PREF_TO_HOST, HOST_TABLE),
        from(PREF_OWN_SOURCE, libc::RT_TABLE_MAIN as u32),
    ]
}

/// The rules of a veth whatever the pod's addresses: neighbour discovery to the host,
/// then (with a quarantine device) the quarantine, then refusal.
fn veth_rules(veth: &str, quarantine: bool) -> Vec<Rule<'_>> {
    let mut rules = Vec::new();
    for (pref, dst) in [(PREF_LINK_LOCAL, "fe80::/10"), (PREF_MULTICAST, "ff00::/8")] {
        rules.push(Rule {
            iif: Some(veth),
            dst: dst.parse().ok(),
            proto: Some(IPPROTO_ICMPV6),
            ..Rule::new(true, pref, Action::Table(RT_TABLE_LOCAL))
        });
    }
    for v6 in [false, true] {
        if quarantine {
            rules.push(Rule {
                iif: Some(veth),
                ..Rule::new(v6, PREF_QUARANTINE, Action::Table(QUARANTINE_TABLE))
            });
        }
        rules.push(Rule {
            iif: Some(veth),
            ..Rule::new(v6, PREF_PROHIBIT, Action::Prohibit)
        });
    }
    rules
}

/// Lets the TUN take packets whose source is one of the host's own addresses (what
/// meshd delivers from the host to its pods); without it the kernel drops them as
/// martians (`fib_validate_source`). IPv6 has no such check.
///
/// And turns early demux off (`net.ipv4.ip_early_demux`, IPv6 included): it looks up
/// the host's socket for a packet before it is routed, and a pod's packet to its host
/// that carries that socket is then refused by the forwarding into the TUN
/// (`ip_forward`, `ip6_forward`: a forwarded packet has no socket), so no connection
/// between the host and its pods would complete. Routers turn it off for the same
/// reason; the host's own receive path routes each packet instead of taking the
/// socket's cached route.
fn host_sysctls(tun: &str) -> Result<(), AttachError> {
    for (key, value) in [
        (format!("net/ipv4/conf/{tun}/accept_local"), "1"),
        ("net/ipv4/ip_early_demux".to_string(), "0"),
    ] {
        let path = format!("/proc/sys/{key}");
        std::fs::write(&path, value).map_err(|e| AttachError::Sysctl(format!("{path}: {e}")))?;
    }
    Ok(())
}

/// Moves the `local` table's lookup from pref 0 to [`PREF_LOCAL`], after every rule of
/// the pods' veths: added there first (when missing), then removed from pref 0, so
/// the host's own addresses are never without a rule.
fn move_local() -> Result<(), AttachError> {
    for v6 in [false, true] {
        Rule::new(v6, PREF_LOCAL, Action::Table(RT_TABLE_LOCAL)).ensure()?;
        Rule::new(v6, 0, Action::Table(RT_TABLE_LOCAL)).delete_all()?;
    }
    Ok(())
}

impl Attacher {
    /// The rules that send packets leaving the TUN to the pods.
    fn own_rules(&self) -> Vec<Rule<'_>> {
        [false, true]
            .into_iter()
            .map(|v6| Rule {
                iif: Some(self.tun.as_str()),
                ..Rule::new(v6, PREF_FROM_TUN, Action::Table(PODS_TABLE))
            })
            .collect()
    }
}

impl Drop for Attacher {
    fn drop(&mut self) {
        for rule in self.own_rules() {
            let _ = rule.delete_all();
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Action {
    Table(u32),
    Prohibit,
}

/// One policy-routing rule (`ip rule`).
#[derive(Clone, Copy, Debug)]
struct Rule<'a> {
    v6: bool,
    pref: u32,
    iif: Option<&'a str>,
    src: Option<IpNet>,
    dst: Option<IpNet>,
    /// The IP protocol matched (`ipproto`).
    proto: Option<u8>,
    action: Action,
}

// From linux/fib_rules.h (not all in the libc crate).
const FRA_DST: u16 = 1;
const FRA_SRC: u16 = 2;
const FRA_IIFNAME: u16 = 3;
const FRA_PRIORITY: u16 = 6;
const FRA_TABLE: u16 = 15;
const FRA_IP_PROTO: u16 = 22;
const FR_ACT_TO_TBL: u8 = 1;
const FR_ACT_PROHIBIT: u8 = 8;

impl Rule<'_> {
    /// `pref <pref> <action>` for every packet of the family.
    fn new(v6: bool, pref: u32, action: Action) -> Rule<'static> {
        Rule {
            v6,
            pref,
            iif: None,
            src: None,
            dst: None,
            proto: None,
            action,
        }
    }

    /// RTM_NEWRULE / RTM_DELRULE request bytes.
    fn message(&self, add: bool) -> Vec<u8> {
        let (kind, flags) = if add {
            (
                libc::RTM_NEWRULE,
                libc::NLM_F_REQUEST | libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_EXCL,
            )
        } else {
            (libc::RTM_DELRULE, libc::NLM_F_REQUEST | libc::NLM_F_ACK)
        };
        let mut b = header(kind, flags as u16);
        let family = if self.v6 {
            libc::AF_INET6
        } else {
            libc::AF_INET
        } as u8;
        let action = match self.action {
            Action::Table(_) => FR_ACT_TO_TBL,
            Action::Prohibit => FR_ACT_PROHIBIT,
        };
        // struct fib_rule_hdr: family, dst_len, src_len, tos, table, res1, res2, action,
        // flags (u32).
        let dst_len = self.dst.map_or(0, |d| d.prefix_len());
        let src_len = self.src.map_or(0, |s| s.prefix_len());
        b.extend_from_slice(&[family, dst_len, src_len, 0, 0, 0, 0, action]);
        b.extend_from_slice(&0u32.to_ne_bytes());
        if let Some(iif) = self.iif {
            let mut name = iif.as_bytes().to_vec();
            name.push(0);
            push_attr(&mut b, FRA_IIFNAME, &name);
        }
        push_attr(&mut b, FRA_PRIORITY, &self.pref.to_ne_bytes());
        if let Action::Table(t) = self.action {
            push_attr(&mut b, FRA_TABLE, &t.to_ne_bytes());
        }
        for (kind, net) in [(FRA_SRC, self.src), (FRA_DST, self.dst)] {
            match net.map(|n| n.trunc()) {
                Some(IpNet::V4(n)) => push_attr(&mut b, kind, &n.addr().octets()),
                Some(IpNet::V6(n)) => push_attr(&mut b, kind, &n.addr().octets()),
                None => {}
            }
        }
        if let Some(p) = self.proto {
            push_attr(&mut b, FRA_IP_PROTO, &[p]);
        }
        finish(&mut b);
        b
    }

    fn what(&self, op: &str) -> String {
        let iif = self.iif.map_or(String::new(), |i| format!(" iif {i}"));
        let src = self.src.map_or(String::new(), |s| format!(" from {s}"));
        let dst = self.dst.map_or(String::new(), |d| format!(" to {d}"));
        format!("{op} rule pref {}{iif}{src}{dst}", self.pref)
    }

    /// Removes every copy of this rule, then adds it once.
    fn replace(&self) -> Result<(), AttachError> {
        self.delete_all()?;
        self.add()
    }

    /// Adds this rule unless it is there already.
    fn ensure(&self) -> Result<(), AttachError> {
        match self.add() {
            Err(AttachError::Netlink { source, .. })
                if source.raw_os_error() == Some(libc::EEXIST) =>
            {
                Ok(())
            }
            r => r,
        }
    }

    fn add(&self) -> Result<(), AttachError> {
        request(&self.message(true)).map_err(|source| AttachError::Netlink {
            what: self.what("add"),
            source,
        })
    }

    fn delete_all(&self) -> Result<(), AttachError> {
        for _ in 0..16 {
            match request(&self.message(false)) {
                Ok(()) => continue,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
                Err(source) => {
                    return Err(AttachError::Netlink {
                        what: self.what("delete"),
                        source,
                    })
                }
            }
        }
        Ok(())
    }
}

/// Adds or deletes `net dev <oif> table <table> [src <src>]`.
fn route(
    add: bool,
    net: IpNet,
    oif: u32,
    table: u32,
    src: Option<IpAddr>,
) -> Result<(), AttachError> {
    match request(&route_message(add, net, oif, Some(table), src)) {
        Ok(()) => Ok(()),
        Err(e) if !add && e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
        Err(source) => Err(AttachError::Netlink {
            what: format!(
                "{} route {net} table {table}",
                if add { "add" } else { "delete" }
            ),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_message_layout() {
        let r = Rule {
            iif: Some("p-a"),
            src: Some("100.65.1.1/32".parse().unwrap()),
            ..Rule::new(false, 110, Action::Table(254))
        };
        let m = r.message(true);
        assert_eq!(
            u32::from_ne_bytes([m[0], m[1], m[2], m[3]]) as usize,
            m.len()
        );
        assert_eq!(m[16], libc::AF_INET as u8);
        assert_eq!(m[18], 32, "src_len");
        assert_eq!(m[23], FR_ACT_TO_TBL);
        // header + fib_rule_hdr + IIFNAME("p-a\0") + PRIORITY + TABLE + SRC
        assert_eq!(m.len(), 16 + 12 + 8 + 8 + 8 + 8);
        assert_eq!(&m[28 + 4..28 + 8], b"p-a\0");
        let p = Rule {
            action: Action::Prohibit,
            src: None,
            ..r
        }
        .message(false);
        assert_eq!(p[23], FR_ACT_PROHIBIT);
        assert_eq!(p.len(), 16 + 12 + 8 + 8);
        // Neighbour discovery: to fe80::/10, ICMPv6 only, to the local table.
        let nd = veth_rules("p-a", false)[0].message(true);
        assert_eq!(nd[16], libc::AF_INET6 as u8);
        assert_eq!(nd[17], 10, "dst_len");
        // header + hdr + IIFNAME + PRIORITY + TABLE + DST(4+16) + IP_PROTO(4+1, padded)
        assert_eq!(nd.len(), 16 + 12 + 8 + 8 + 8 + 20 + 8);
        assert_eq!(u16::from_ne_bytes([nd[46], nd[47]]), FRA_TABLE);
        assert_eq!(u32::from_ne_bytes([nd[48], nd[49], nd[50], nd[51]]), 255);
        assert_eq!(u16::from_ne_bytes([nd[54], nd[55]]), FRA_DST);
        assert_eq!(nd[56..58], [0xfe, 0x80]);
        assert_eq!(u16::from_ne_bytes([nd[74], nd[75]]), FRA_IP_PROTO);
        assert_eq!(nd[76], 58);
        // The local table's rule, moved: no interface, no addresses.
        let local = Rule::new(true, PREF_LOCAL, Action::Table(RT_TABLE_LOCAL)).message(true);
        assert_eq!(local.len(), 16 + 12 + 8 + 8);
    }
}
