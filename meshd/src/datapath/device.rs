//! The TUN device (I/O shell): created with tun-rs, addressed from the node's own
//! certificate, routes for the mesh prefixes added over rtnetlink. The kernel removes
//! the device, its addresses and its routes when the last descriptor closes, so a
//! clean shutdown (or a crash) leaves nothing behind.
//!
//! meshd creates its device; it never joins one that exists (another meshd's, or a
//! persistent device someone made), which would mix two daemons' traffic on one
//! device. tun-rs attaches to a device of the name if there is one, so the name is
//! claimed first ([`NameClaim`]): one `TUNSETIFF` with `IFF_TUN_EXCL`, which the
//! kernel fails with EBUSY when any interface of that name exists and otherwise
//! creates the device, in one step under its own lock (`tun_set_iff` in
//! drivers/net/tun.c) — no window between a check and the creation in which another
//! meshd could create it too. tun-rs then opens its queues on the claimed device, and
//! the claim's queue is closed. (Any process with CAP_NET_ADMIN can still attach to
//! an existing multi-queue device by name without `IFF_TUN_EXCL`; a meshd never does.)

use std::io;
use std::io::{IoSlice, IoSliceMut};
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ipnet::IpNet;
use tun_rs::{DeviceBuilder, SyncDevice};

use crate::datapath::gro::{Coalescer, Resizable, VNET_HDR_LEN};

/// Bytes reserved in front of every packet written with [`Tun::send_batch`]: the
/// virtio-net header when offload is on (`struct virtio_net_hdr`, 10 bytes: the TUN
/// is not asked for `num_buffers`).
pub const TUN_OFFSET: usize = VNET_HDR_LEN;

// Reads go through tun-rs, which sizes the header itself: both must agree.
const _: () = assert!(VNET_HDR_LEN == tun_rs::VIRTIO_NET_HDR_LEN);

/// Largest packet a TUN read returns: a 64 KiB TSO segment behind its header.
pub const TUN_READ_LEN: usize = TUN_OFFSET + 65_535;

/// Why the TUN could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("an interface named {name} exists already (another meshd's TUN?): meshd makes its own device and never shares one; stop whatever holds it, or choose another name")]
    Exists { name: String },
    #[error("cannot create TUN device {name}: {source}")]
    Create { name: String, source: io::Error },
    #[error("cannot add address {addr} to {name}: {source}")]
    Address {
        name: String,
        addr: IpNet,
        source: io::Error,
    },
    #[error("cannot {op} route {net} via {name}: {source}")]
    Route {
        op: &'static str,
        name: String,
        net: IpNet,
        source: io::Error,
    },
}

/// An up, addressed TUN device in non-blocking mode.
///
/// With offload (`IFF_VNET_HDR` plus TSO/USO), every read and write carries a
/// virtio-net header: the kernel hands over TCP segments of up to 64 KiB, which
/// [`Tun::recv_segments`] splits into MTU-sized packets, and takes back the packets
/// our [`Coalescer`] merged ([`Tun::send_batch`]). Without offload (the device refused it) the same calls
/// carry one plain packet each.
pub struct Tun {
    dev: SyncDevice,
    name: String,
    index: u32,
    offload: bool,
    /// The device took UDP segmentation offload too: UDP datagrams may be merged.
    udp_gso: bool,
    /// Writes the kernel refused (shared by every queue of the device).
    write_failures: Arc<AtomicU64>,
}

impl Tun {
    /// Creates `name` with `mtu` and the given addresses (each as a host address with
    /// the prefix from the certificate), and brings it up. Offload is asked for; a
    /// device that refuses it is used without (with a log line).
    pub fn create(name: &str, mtu: u16, addresses: &[IpNet]) -> Result<Tun, DeviceError> {
        let create = |source| DeviceError::Create {
            name: name.to_string(),
            source,
        };
        let exists = || DeviceError::Exists {
            name: name.to_string(),
        };
        // Multi-queue so that each data-path worker can have its own queue
        // ([`Tun::open_queue`]); a single queue behaves as a plain TUN.
        let build = |offload: bool, multi_queue: bool| -> Result<SyncDevice, DeviceError> {
            // Held until tun-rs has its queue on the device the claim created.
            let _claim = if multi_queue {
                match NameClaim::take(name, offload) {
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Err(exists()),
                    r => Some(r.map_err(create)?),
                }
            } else {
                // A single-queue device cannot be claimed beside tun-rs's queue:
                // checked instead. In the instant between, the kernel still refuses
                // to attach to a single-queue device in use (EBUSY).
                if if_exists(name) {
                    return Err(exists());
                }
                None
            };
            DeviceBuilder::new()
                .name(name)
                .mtu(mtu)
                .offload(offload)
                .multi_queue(multi_queue)
                .enable(true)
                .build_sync()
                .map_err(|e| match e.raw_os_error() {
                    Some(libc::EBUSY) => exists(),
                    _ => create(e),
                })
        };
        // MESHD_OFFLOAD=0 turns offload off (to compare, or to work around a kernel
        // that mishandles it); the data path is the same, one packet per call.
        let want_offload = std::env::var("MESHD_OFFLOAD").map_or(true, |v| v != "0");
        let dev = match build(want_offload, true) {
            Ok(dev) => dev,
            Err(e @ DeviceError::Exists { .. }) => return Err(e),
            Err(e) => {
                tracing::warn!("TUN offload unavailable ({e}): one packet per read and write");
                match build(false, true) {
                    Ok(dev) => dev,
                    Err(e @ DeviceError::Exists { .. }) => return Err(e),
                    Err(_) => build(false, false)?,
                }
            }
        };
        for a in addresses {
            let r = match a {
                IpNet::V4(n) => dev.add_address_v4(n.addr(), n.prefix_len()),
                IpNet::V6(n) => dev.add_address_v6(n.addr(), n.prefix_len()),
            };
            r.map_err(|source| DeviceError::Address {
                name: name.to_string(),
                addr: *a,
                source,
            })?;
        }
        dev.set_nonblocking(true).map_err(create)?;
        let index = dev.if_index().map_err(create)?;
        let name = dev.name().unwrap_or_else(|_| name.to_string());
        let offload = dev.tcp_gso();
        let udp_gso = offload && dev.udp_gso();
        tracing::info!(tun = %name, tso = offload, uso = udp_gso, "TUN offload");
        Ok(Tun {
            dev,
            name,
            index,
            offload,
            udp_gso,
            write_failures: Arc::default(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Another queue of the same device, non-blocking, for another worker thread.
    /// The kernel spreads the packets it hands to the TUN over the queues by flow
    /// hash, so one flow always comes out of one queue.
    pub fn open_queue(&self) -> io::Result<Tun> {
        let dev = self.dev.try_clone()?;
        dev.set_nonblocking(true)?;
        Ok(Tun {
            dev,
            name: self.name.clone(),
            index: self.index,
            offload: self.offload,
            udp_gso: self.udp_gso,
            write_failures: self.write_failures.clone(),
        })
    }

    /// Whether reads and writes carry the virtio-net header (TSO/GRO).
    pub fn offload(&self) -> bool {
        self.offload
    }

    /// Whether the device also takes UDP segmentation offload (USO), so that UDP
    /// datagrams of a flow may be written merged.
    pub fn udp_gso(&self) -> bool {
        self.udp_gso
    }

    /// Reads one packet; `WouldBlock` when none is waiting. With offload a TSO
    /// segment comes back whole, as one packet (cut at `buf.len()`): for readers that
    /// only look at headers or count (the quarantine device). The data path uses
    /// [`Tun::recv_segments`].
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.offload {
            return self.dev.recv(buf);
        }
        let mut hdr = [0u8; TUN_OFFSET];
        let n = self
            .dev
            .recv_vectored(&mut [IoSliceMut::new(&mut hdr), IoSliceMut::new(buf)])?;
        Ok(n.saturating_sub(TUN_OFFSET))
    }

    /// Reads one packet or one TSO segment, split into MTU-sized packets:
    /// `segments[i][..sizes[i]]` for `i < n`. `raw` holds [`TUN_READ_LEN`] bytes;
    /// `segments[0]` must hold a whole packet, the others an MTU each. A segment that
    /// needs more packets than `segments` has is an `InvalidInput` error (dropped).
    pub fn recv_segments<B: AsRef<[u8]> + AsMut<[u8]>>(
        &self,
        raw: &mut [u8],
        segments: &mut [B],
        sizes: &mut [usize],
    ) -> io::Result<usize> {
        self.dev.recv_multiple(raw, segments, sizes, 0)
    }

    /// Writes one packet.
    pub fn send(&self, packet: &[u8]) -> io::Result<usize> {
        let result = if !self.offload {
            self.dev.send(packet)
        } else {
            // A zeroed virtio-net header: no segmentation, checksum complete.
            let hdr = [0u8; TUN_OFFSET];
            self.dev
                .send_vectored(&[IoSlice::new(&hdr), IoSlice::new(packet)])
                .map(|n| n.saturating_sub(TUN_OFFSET))
        };
        if result.is_err() {
            self.write_failures.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    /// Writes the kernel refused so far, on every queue of this device (a write
    /// carries one packet or one merged run of segments).
    pub fn write_failures(&self) -> u64 {
        self.write_failures.load(Ordering::Relaxed)
    }

    /// Writes a batch of packets, each at [`TUN_OFFSET`] in its buffer; with offload,
    /// `gro` first merges consecutive segments of one TCP (or UDP) flow, and each
    /// resulting packet goes out with its virtio-net header in one write. Every
    /// packet is attempted; the error returned is the last one seen (a closed device
    /// stops the batch at once).
    pub fn send_batch<B>(&self, gro: &mut Coalescer, bufs: &mut [B]) -> io::Result<()>
    where
        B: AsRef<[u8]> + AsMut<[u8]> + Resizable,
    {
        let mut result = Ok(());
        let mut write = |bytes: &[u8]| match self.dev.send(bytes) {
            Ok(_) => true,
            Err(e) => {
                self.write_failures.fetch_add(1, Ordering::Relaxed);
                let closed = e.raw_os_error() == Some(libc::EBADFD);
                result = Err(e);
                !closed
            }
        };
        if !self.offload {
            for b in bufs.iter() {
                if let Some(packet) = b.as_ref().get(TUN_OFFSET..) {
                    if !write(packet) {
                        break;
                    }
                }
            }
        } else {
            for &i in gro.coalesce(bufs, TUN_OFFSET, self.udp_gso) {
                // The coalescer put the header just before the packet.
                if !write(&bufs[i].as_ref()[TUN_OFFSET - VNET_HDR_LEN..]) {
                    break;
                }
            }
        }
        result
    }

    pub fn fd(&self) -> RawFd {
        self.dev.as_raw_fd()
    }

    pub fn add_route(&self, net: IpNet) -> Result<(), DeviceError> {
        netlink::route(true, net, self.index).map_err(|source| DeviceError::Route {
            op: "add",
            name: self.name.clone(),
            net,
            source,
        })
    }

    pub fn remove_route(&self, net: IpNet) -> Result<(), DeviceError> {
        netlink::route(false, net, self.index).map_err(|source| DeviceError::Route {
            op: "remove",
            name: self.name.clone(),
            net,
            source,
        })
    }
}

/// A new TUN device's name, held by a queue of our own: see the module docs.
struct NameClaim {
    /// Closed on drop: the device stays while tun-rs's queues hold it.
    _queue: OwnedFd,
}

impl NameClaim {
    /// Creates TUN device `name` with the flags tun-rs asks for (multi-queue, no
    /// packet information, the virtio-net header with `offload`), or fails with EBUSY
    /// if an interface of that name exists.
    fn take(name: &str, offload: bool) -> io::Result<NameClaim> {
        let cname = std::ffi::CString::new(name)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let bytes = cname.as_bytes_with_nul();
        if bytes.len() > libc::IFNAMSIZ {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        // SAFETY: a valid NUL-terminated path and flags; the result is checked.
        let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just opened and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: all-zero is a valid ifreq.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, &src) in req.ifr_name.iter_mut().zip(bytes) {
            *dst = src as libc::c_char;
        }
        let mut flags =
            libc::IFF_TUN | libc::IFF_NO_PI | libc::IFF_MULTI_QUEUE | libc::IFF_TUN_EXCL;
        if offload {
            flags |= libc::IFF_VNET_HDR;
        }
        // The kernel reads ifr_flags as a 16-bit field; IFF_TUN_EXCL is its top bit.
        req.ifr_ifru.ifru_flags = flags as u16 as libc::c_short;
        // SAFETY: `req` is a valid ifreq that outlives the call; TUNSETIFF reads and
        // writes only within it.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(NameClaim { _queue: fd })
    }
}

/// Whether an interface named `name` exists in this network namespace.
pub fn if_exists(name: &str) -> bool {
    let Ok(cname) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: a valid NUL-terminated string; if_nametoindex only reads it.
    unsafe { libc::if_nametoindex(cname.as_ptr()) != 0 }
}

/// Whether a route for `net` is needed at all: a route that is exactly one of our own
/// host addresses would only shadow the local route.
pub fn route_needed(net: &IpNet, own: &[IpNet]) -> bool {
    !own.iter()
        .any(|o| o.trunc() == *net && o.prefix_len() == o.max_prefix_len())
        && !matches!(net.addr(), IpAddr::V4(a) if a.is_unspecified() && net.prefix_len() == 0)
        && !matches!(net.addr(), IpAddr::V6(a) if a.is_unspecified() && net.prefix_len() == 0)
}

/// Minimal rtnetlink client: add or delete one route through an interface.
mod netlink {
    use std::io;

    use ipnet::IpNet;

    /// The request bytes for RTM_NEWROUTE / RTM_DELROUTE (main table, link scope).
    pub(super) fn message(add: bool, net: IpNet, oif: u32) -> Vec<u8> {
        crate::sys::netlink::route_message(add, net, oif, None, None)
    }

    /// Adds or deletes one route through the shared netlink request in `attach`.
    pub(super) fn route(add: bool, net: IpNet, oif: u32) -> io::Result<()> {
        match crate::sys::netlink::request(&message(add, net, oif)) {
            // Deleting a route the kernel already removed is fine.
            Err(e) if !add && e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
            r => r,
        }
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn route_message_layout() {
            let m = super::message(true, "100.64.0.0/10".parse().unwrap(), 7);
            // header + rtmsg + RTA_DST(4+4) + RTA_OIF(4+4)
            assert_eq!(m.len(), 16 + 12 + 8 + 8);
            assert_eq!(
                u32::from_ne_bytes([m[0], m[1], m[2], m[3]]) as usize,
                m.len()
            );
            assert_eq!(m[16], libc::AF_INET as u8);
            assert_eq!(m[17], 10);
            assert_eq!(m[20], libc::RT_TABLE_MAIN);
            assert_eq!(&m[32..36], &[100, 64, 0, 0]);
            assert_eq!(u32::from_ne_bytes([m[40], m[41], m[42], m[43]]), 7);
            let m6 = super::message(false, "fd00:6d65:7368::/48".parse().unwrap(), 3);
            assert_eq!(m6.len(), 16 + 12 + 20 + 8);
            assert_eq!(m6[17], 48);
            // Another table: unspecified in rtmsg, named by RTA_TABLE (4+4 more).
            let t = crate::sys::netlink::route_message(
                true,
                "100.64.0.0/10".parse().unwrap(),
                7,
                Some(1000),
                None,
            );
            assert_eq!(t.len(), m.len() + 8);
            assert_eq!(t[20], libc::RT_TABLE_UNSPEC);
            assert_eq!(u16::from_ne_bytes([t[46], t[47]]), libc::RTA_TABLE);
            assert_eq!(u32::from_ne_bytes([t[48], t[49], t[50], t[51]]), 1000);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_host_routes_are_skipped() {
        let own: Vec<IpNet> = vec!["100.64.0.1/32".parse().unwrap()];
        assert!(!route_needed(&"100.64.0.1/32".parse().unwrap(), &own));
        assert!(route_needed(&"100.64.0.2/32".parse().unwrap(), &own));
        assert!(route_needed(&"100.64.0.0/10".parse().unwrap(), &own));
        assert!(!route_needed(&"0.0.0.0/0".parse().unwrap(), &own));
    }
}
