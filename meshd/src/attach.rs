//! Attaching pods (I/O shell): the kernel routing that makes every packet of a pod
//! behind a veth pass through meshd, and only with the pod's own source addresses.
//!
//! A pod sits in its own network namespace; the host end of its veth pair is in the
//! host's. The operator (or CNI plugin) creates the pair, addresses the pod, lets the
//! host answer the pod's ARP (`proxy_arp`) and enables forwarding. meshd then installs,
//! with rtnetlink:
//!
//! ```text
//! pref 100  iif <tun>                  lookup 51820   # what meshd delivers → pod veths
//! pref 101  iif lo                     lookup 51820   # the host's own packets → pod veths
//! pref 110  iif <veth> from <pod addr> lookup main    # the pod's own addresses → TUN
//! pref 120  iif <veth>                 lookup 51821   # anything else it sends → quarantine
//! pref 130  iif <veth>                 prohibit
//! table 51820: <pod addr> dev <veth>
//! table 51821: <mesh prefixes> dev <tun>q             # meshd counts and drops these
//! ```
//!
//! The pods' own routes live only in table 51820, consulted for packets meshd writes to
//! the TUN and for the host's own packets, so the host never forwards one pod's packet
//! straight to another: same-host traffic enters the TUN, where the enforcer decides it
//! like any other (invariant 3). The host itself talks to its pods directly (its
//! addresses are local, and a packet from them that came back out of the TUN would be
//! dropped by the kernel as a martian): its ICMP errors (path MTU) reach the pods, and
//! the host, which controls its pods anyway, is not subject to their policy.
//! A packet with a source other than the pod's own addresses never reaches the TUN
//! (where it could pass as its neighbour's): it lands on the quarantine device, where
//! meshd counts it as `forged_source`, or is refused outright.

use std::ffi::CString;
use std::io;
use std::mem;
use std::net::IpAddr;

use ipnet::IpNet;

/// Routing table of the pods' veths, consulted for packets leaving the TUN.
pub const PODS_TABLE: u32 = 51820;
/// Routing table of packets whose source a pod does not own.
pub const QUARANTINE_TABLE: u32 = 51821;
const PREF_FROM_TUN: u32 = 100;
const PREF_FROM_HOST: u32 = 101;
const PREF_OWN_SOURCE: u32 = 110;
const PREF_QUARANTINE: u32 = 120;
const PREF_PROHIBIT: u32 = 130;

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("interface {0} does not exist (create the pod's veth first)")]
    NoInterface(String),
    #[error("cannot {what}: {source}")]
    Netlink { what: String, source: io::Error },
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
    /// Installs the TUN's rule (replacing a stale one from an earlier run) and, when
    /// `quarantine` names a device, routes `prefixes` to it in the quarantine table.
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
                Rule {
                    v6: a.addr().is_ipv6(),
                    pref: PREF_OWN_SOURCE,
                    iif: veth,
                    src: Some(*a),
                    action: Action::Table(libc::RT_TABLE_MAIN as u32),
                }
                .replace()?;
            }
            for v6 in [false, true] {
                if self.quarantine.is_some() {
                    Rule {
                        v6,
                        pref: PREF_QUARANTINE,
                        iif: veth,
                        src: None,
                        action: Action::Table(QUARANTINE_TABLE),
                    }
                    .replace()?;
                }
                Rule {
                    v6,
                    pref: PREF_PROHIBIT,
                    iif: veth,
                    src: None,
                    action: Action::Prohibit,
                }
                .replace()?;
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
            let _ = Rule {
                v6: a.addr().is_ipv6(),
                pref: PREF_OWN_SOURCE,
                iif: veth,
                src: Some(*a),
                action: Action::Table(libc::RT_TABLE_MAIN as u32),
            }
            .delete_all();
        }
        for v6 in [false, true] {
            let _ = Rule {
                v6,
                pref: PREF_QUARANTINE,
                iif: veth,
                src: None,
                action: Action::Table(QUARANTINE_TABLE),
            }
            .delete_all();
            let _ = Rule {
                v6,
                pref: PREF_PROHIBIT,
                iif: veth,
                src: None,
                action: Action::Prohibit,
            }
            .delete_all();
        }
    }
}

impl Attacher {
    /// The rules that send packets leaving the TUN, and the host's own, to the pods.
    fn own_rules(&self) -> Vec<Rule<'_>> {
        let mut rules = Vec::new();
        for v6 in [false, true] {
            for (pref, iif) in [(PREF_FROM_TUN, self.tun.as_str()), (PREF_FROM_HOST, "lo")] {
                rules.push(Rule {
                    v6,
                    pref,
                    iif,
                    src: None,
                    action: Action::Table(PODS_TABLE),
                });
            }
        }
        rules
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
    iif: &'a str,
    src: Option<IpNet>,
    action: Action,
}

// From linux/fib_rules.h (not all in the libc crate).
const FRA_SRC: u16 = 2;
const FRA_IIFNAME: u16 = 3;
const FRA_PRIORITY: u16 = 6;
const FRA_TABLE: u16 = 15;
const FR_ACT_TO_TBL: u8 = 1;
const FR_ACT_PROHIBIT: u8 = 8;

impl Rule<'_> {
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
        let src_len = self.src.map_or(0, |s| s.prefix_len());
        b.extend_from_slice(&[family, 0, src_len, 0, 0, 0, 0, action]);
        b.extend_from_slice(&0u32.to_ne_bytes());
        let mut name = self.iif.as_bytes().to_vec();
        name.push(0);
        push_attr(&mut b, FRA_IIFNAME, &name);
        push_attr(&mut b, FRA_PRIORITY, &self.pref.to_ne_bytes());
        if let Action::Table(t) = self.action {
            push_attr(&mut b, FRA_TABLE, &t.to_ne_bytes());
        }
        match self.src.map(|s| s.trunc()) {
            Some(IpNet::V4(n)) => push_attr(&mut b, FRA_SRC, &n.addr().octets()),
            Some(IpNet::V6(n)) => push_attr(&mut b, FRA_SRC, &n.addr().octets()),
            None => {}
        }
        finish(&mut b);
        b
    }

    fn what(&self, op: &str) -> String {
        let src = self.src.map_or(String::new(), |s| format!(" from {s}"));
        format!("{op} rule pref {} iif {}{src}", self.pref, self.iif)
    }

    /// Removes every copy of this rule, then adds it once.
    fn replace(&self) -> Result<(), AttachError> {
        self.delete_all()?;
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

/// The RTM_NEWROUTE / RTM_DELROUTE request for `net dev <oif>` with link scope, in
/// `table` (`None`: the main table) and with preferred source `src`.
pub(crate) fn route_message(
    add: bool,
    net: IpNet,
    oif: u32,
    table: Option<u32>,
    src: Option<IpAddr>,
) -> Vec<u8> {
    let (kind, flags) = if add {
        (
            libc::RTM_NEWROUTE,
            libc::NLM_F_REQUEST | libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_REPLACE,
        )
    } else {
        (libc::RTM_DELROUTE, libc::NLM_F_REQUEST | libc::NLM_F_ACK)
    };
    let mut b = header(kind, flags as u16);
    let family = match net {
        IpNet::V4(_) => libc::AF_INET,
        IpNet::V6(_) => libc::AF_INET6,
    } as u8;
    // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
    // Tables past 255 only fit the RTA_TABLE attribute.
    b.extend_from_slice(&[
        family,
        net.prefix_len(),
        0,
        0,
        if table.is_some() {
            libc::RT_TABLE_UNSPEC
        } else {
            libc::RT_TABLE_MAIN
        },
        libc::RTPROT_STATIC,
        libc::RT_SCOPE_LINK,
        libc::RTN_UNICAST,
    ]);
    b.extend_from_slice(&0u32.to_ne_bytes());
    match net.trunc() {
        IpNet::V4(n) => push_attr(&mut b, libc::RTA_DST, &n.addr().octets()),
        IpNet::V6(n) => push_attr(&mut b, libc::RTA_DST, &n.addr().octets()),
    }
    push_attr(&mut b, libc::RTA_OIF, &oif.to_ne_bytes());
    if let Some(table) = table {
        push_attr(&mut b, libc::RTA_TABLE, &table.to_ne_bytes());
    }
    match src {
        Some(IpAddr::V4(a)) => push_attr(&mut b, libc::RTA_PREFSRC, &a.octets()),
        Some(IpAddr::V6(a)) => push_attr(&mut b, libc::RTA_PREFSRC, &a.octets()),
        None => {}
    }
    finish(&mut b);
    b
}

fn header(kind: u16, flags: u16) -> Vec<u8> {
    let mut b = Vec::with_capacity(96);
    b.extend_from_slice(&0u32.to_ne_bytes()); // length, patched by `finish`
    b.extend_from_slice(&kind.to_ne_bytes());
    b.extend_from_slice(&flags.to_ne_bytes());
    b.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    b.extend_from_slice(&0u32.to_ne_bytes()); // port id
    b
}

fn finish(b: &mut [u8]) {
    let len = b.len() as u32;
    b[..4].copy_from_slice(&len.to_ne_bytes());
}

fn push_attr(buf: &mut Vec<u8>, kind: u16, data: &[u8]) {
    let len = 4 + data.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(data);
    while !buf.len().is_multiple_of(4) {
        buf.push(0);
    }
}

/// Sends one request and reads its acknowledgement (an `NLMSG_ERROR` with errno 0).
pub(crate) fn request(msg: &[u8]) -> io::Result<()> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let _close = Close(fd);
    // SAFETY: sockaddr_nl is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_nl = unsafe { mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: `msg` and `addr` are valid for the lengths passed.
    let n = unsafe {
        libc::sendto(
            fd,
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&addr as *const libc::sockaddr_nl).cast(),
            mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut reply = [0u8; 1024];
    // SAFETY: `reply` is valid for writes of its length.
    let n = unsafe { libc::recv(fd, reply.as_mut_ptr().cast(), reply.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if (n as usize) < 20 || u16::from_ne_bytes([reply[4], reply[5]]) != libc::NLMSG_ERROR as u16 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "unexpected netlink reply",
        ));
    }
    match i32::from_ne_bytes([reply[16], reply[17], reply[18], reply[19]]) {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(-e)),
    }
}

struct Close(i32);

impl Drop for Close {
    fn drop(&mut self) {
        // SAFETY: we own this descriptor and close it once.
        unsafe { libc::close(self.0) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_message_layout() {
        let r = Rule {
            v6: false,
            pref: 110,
            iif: "p-a",
            src: Some("100.65.1.1/32".parse().unwrap()),
            action: Action::Table(254),
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
    }
}
