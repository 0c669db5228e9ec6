//! The host's kernel side of invariant 3 (issue 18, weaknesses 1 and 4): nothing
//! reaches a mesh address except through meshd, and a pod reaches nothing around it.
//!
//! An attacker here is a plain namespace on the underlay, with no key, that routes the
//! overlay to a host ([`Mesh::attacker`], [`Host::route_via`]). Negative checks wait
//! for the host filter's (or meshd's) drop counter to count what was sent, then look
//! at what arrived: by then the packet is gone, so no sleep decides the outcome.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use mesh_proto::control::{HostFilterState, HostFilterStatus};
use mesh_tests::{wait, Host, Mesh};

mesh_tests::isolate!();

const HTTP: u16 = 8080;
const UDP: u16 = 7070;
const TABLE: &str = "inet meshd-mesh0";

fn filter(h: &Host) -> Result<HostFilterStatus> {
    h.status()?
        .host_filter
        .context("meshctl status --json has no host_filter")
}

/// Waits until `h`'s host filter counted `field` (`underlay_drops` or `pod_drops`)
/// reaching at least `at_least`.
fn wait_dropped(h: &Host, what: &str, at_least: u64) -> Result<()> {
    wait::until(
        &format!(
            "{}'s host filter to count {at_least} {what} drops",
            h.name()
        ),
        Duration::from_secs(10),
        || {
            let f = filter(h)?;
            let n = if what == "underlay" {
                f.underlay_drops
            } else {
                f.pod_drops
            };
            Ok((n >= at_least).then_some(()))
        },
    )
}

fn refused(from: &Host, addr: IpAddr) -> Result<()> {
    let r = from.http_get_limit(addr, HTTP, "/who", Duration::from_secs(3));
    ensure!(r.is_err(), "{} reached {addr}:{HTTP}: {r:?}", from.name());
    Ok(())
}

/// Gives `h`'s `eth0` the (host) address `addr` too: a source to forge.
fn add_address(h: &Host, addr: IpAddr) -> Result<()> {
    match addr {
        IpAddr::V4(_) => h
            .netns()
            .ip(&["addr", "add", &format!("{addr}/32"), "dev", "eth0"]),
        IpAddr::V6(_) => h.netns().ip(&[
            "addr",
            "add",
            &format!("{addr}/128"),
            "dev",
            "eth0",
            "nodad",
        ]),
    }
}

/// The decision log of `h` as JSON records.
fn decisions(h: &Host) -> Result<Vec<serde_json::Value>> {
    let out = h.meshctl(&["log", "--json", "-n", "500"])?.check()?;
    Ok(out
        .stdout_str()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

fn assert_logged(h: &Host, fields: &[(&str, &str)]) -> Result<()> {
    wait::until(
        &format!("{} to log {fields:?}", h.name()),
        Duration::from_secs(5),
        || {
            Ok(decisions(h)?
                .iter()
                .any(|r| fields.iter().all(|(k, v)| r[*k] == *v))
                .then_some(()))
        },
    )
}

#[test]
fn the_underlay_reaches_no_mesh_address_in_plaintext() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    Ok(the_underlay_reaches_no_mesh_address_in_plaintext_in(
        &mut mesh,
    )?)
}

fn the_underlay_reaches_no_mesh_address_in_plaintext_in(mesh: &mut Mesh) -> Result<()> {
    let h1 = mesh.host("h1").up()?;
    let pa = mesh.pod(&h1, "pa", &[])?;
    let pb = mesh.pod(&h1, "pb", &[])?;
    h1.write_www("who", b"h1")?;
    h1.serve_http(HTTP)?;
    h1.serve_udp_sink(UDP)?;
    pa.serve_udp_sink(UDP)?;
    let x = mesh.attacker("x")?;
    x.route_overlay_via(&h1)?;

    // The node's overlay addresses, TCP and UDP, IPv4 and IPv6: no session, nothing
    // delivered.
    for addr in [h1.overlay_v4(), h1.overlay_v6()] {
        refused(&x, addr)?;
        x.udp_send(None, SocketAddr::new(addr, UDP), "from-the-underlay")?
            .check()?;
    }
    // A pod's addresses, sent as its neighbour pb (a source the kernel forwards, and
    // meshd would take for pb's): nothing reaches pa.
    for (own, target) in [(pb.address, pa.address), (pb.address_v6, pa.address_v6)] {
        add_address(&x, own)?;
        x.udp_send(Some(own), SocketAddr::new(target, UDP), "as-pb")?
            .check()?;
    }
    // Two TCP connections (a SYN each at least), two datagrams to the node, two to pa.
    wait_dropped(&h1, "underlay", 6)?;
    ensure!(
        h1.udp_sink_received(UDP)?.is_empty() && pa.udp_sink_received(UDP)?.is_empty(),
        "plaintext from the underlay was delivered: h1 {:?}, pa {:?}",
        h1.udp_sink_received(UDP)?,
        pa.udp_sink_received(UDP)?
    );

    // What the operator sees.
    let f = filter(&h1)?;
    ensure!(
        f.state == HostFilterState::Installed && f.table == TABLE,
        "{f:?}"
    );
    // The node's and the pods' addresses, each a host address.
    let mut protects: Vec<IpAddr> = f.protects.iter().map(|n| n.addr()).collect();
    protects.sort();
    let mut want = vec![
        h1.overlay_v4(),
        h1.overlay_v6(),
        pa.address,
        pa.address_v6,
        pb.address,
        pb.address_v6,
    ];
    want.sort();
    ensure!(
        protects == want
            && f.protects
                .iter()
                .all(|n| n.prefix_len() == n.max_prefix_len()),
        "{f:?}"
    );
    ensure!(f.pods == ["p-pa", "p-pb"], "{f:?}");
    let text = h1.meshctl(&["status"])?.check()?.stdout_str();
    ensure!(
        text.contains("host filter: nftables table inet meshd-mesh0: 100.64.0.1/32, 100.65.1.1/32")
            && text.contains("reached only through meshd (mesh0) and loopback")
            && text.contains("pods held to meshd, from their own addresses: p-pa, p-pb"),
        "{text}"
    );

    // Through meshd the same services answer: pb's own datagram reaches pa.
    pb.udp_send(None, SocketAddr::new(pa.address, UDP), "through-meshd")?
        .check()?;
    pa.wait_udp_sink(UDP, pb.address, "through-meshd")?;
    Ok(())
}

/// `node.host_filter = false`: meshd says so at start and in status, and then the
/// underlay does reach the overlay addresses (what the filter is for).
#[test]
fn without_its_host_filter_meshd_warns_and_the_underlay_gets_in() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    Ok(without_its_host_filter_meshd_warns_and_the_underlay_gets_in_in(&mut mesh)?)
}

fn without_its_host_filter_meshd_warns_and_the_underlay_gets_in_in(mesh: &mut Mesh) -> Result<()> {
    let h9 = mesh.host("h9").node_config("host_filter = false").up()?;
    let py = mesh.pod(&h9, "py", &[])?;
    let pz = mesh.pod(&h9, "pz", &[])?;
    ensure!(
        h9.log().contains("WARN")
            && h9
                .log()
                .contains("host filter DISABLED (node.host_filter = false)"),
        "{}",
        h9.log()
    );
    let f = filter(&h9)?;
    ensure!(f.state == HostFilterState::Disabled, "{f:?}");
    let text = h9.meshctl(&["status"])?.check()?.stdout_str();
    ensure!(
        text.contains("host filter: DISABLED (node.host_filter = false)"),
        "{text}"
    );
    ensure!(h9.nft_tables()?.is_empty(), "{:?}", h9.nft_tables()?);
    let meshd = mesh.bins().meshd.to_str().context("utf-8")?.to_string();
    let config = h9.config_path();
    let check = h9.exec(
        &meshd,
        &[
            "check-config",
            "--config",
            config.to_str().context("utf-8")?,
        ],
    )?;
    ensure!(
        check.success()
            && check.stdout_str().contains(
                "warning: node.host_filter = false: meshd would run without its host filter"
            ),
        "{check:?}"
    );

    h9.write_www("who", b"h9")?;
    h9.serve_http(HTTP)?;
    pz.serve_udp_sink(UDP)?;
    let x = mesh.attacker("x")?;
    x.route_overlay_via(&h9)?;
    for addr in [h9.overlay_v4(), h9.overlay_v6()] {
        let r = x.http_get_eventually(addr, HTTP, "/who")?;
        ensure!(r.status == 200 && r.body == b"h9", "{addr}: {}", r.status);
    }
    add_address(&x, py.address)?;
    x.udp_send(Some(py.address), SocketAddr::new(pz.address, UDP), "as-py")?
        .check()?;
    pz.wait_udp_sink(UDP, py.address, "as-py")?;
    Ok(())
}

/// h1: its own port 8080 takes pa (allowed, and audited so that the log shows it),
/// not pb; the pods themselves keep the mesh default (deny).
const H1_POLICY: &str = r#"
[[policy]]
name = "h1-from-pa"
action = "allow"
selector = { identities = ["spiffe://t/h1"] }
[[policy.rule]]
name = "pa-http"
from = [{ identities = ["spiffe://t/pa"] }]
to = [{ ports = [8080] }]

[[policy]]
name = "h1-watch"
action = "audit"
selector = { identities = ["spiffe://t/h1"] }
[[policy.rule]]
name = "pa-http"
from = [{ identities = ["spiffe://t/pa"] }]
to = [{ ports = [8080] }]
"#;

#[test]
fn a_pod_reaches_its_own_host_only_as_policy_allows() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    Ok(a_pod_reaches_its_own_host_only_as_policy_allows_in(
        &mut mesh,
    )?)
}

fn a_pod_reaches_its_own_host_only_as_policy_allows_in(mesh: &mut Mesh) -> Result<()> {
    let h1 = mesh.host("h1").policy("deny", H1_POLICY).up()?;
    let pa = mesh.pod(&h1, "pa", &[])?;
    let pb = mesh.pod(&h1, "pb", &[])?;
    h1.write_www("who", b"h1")?;
    h1.serve_http(HTTP)?;
    for addr in [h1.overlay_v4(), h1.overlay_v6()] {
        let r = pa.http_get_eventually(addr, HTTP, "/who")?;
        ensure!(
            r.status == 200 && r.body == b"h1",
            "pa -> {addr}: {}",
            r.status
        );
        refused(&pb, addr)?;
    }
    // Decided by h1's meshd under each pod's own identity.
    assert_logged(
        &h1,
        &[
            ("src", "spiffe://t/pa"),
            ("dst", "spiffe://t/h1"),
            ("decision", "audit"),
        ],
    )?;
    assert_logged(
        &h1,
        &[
            ("src", "spiffe://t/pb"),
            ("dst", "spiffe://t/h1"),
            ("src_addr", &pb.address_v6.to_string()),
            ("decision", "deny"),
        ],
    )?;
    Ok(())
}

#[test]
fn a_pod_sends_only_through_meshd_and_from_its_own_addresses() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    Ok(a_pod_sends_only_through_meshd_and_from_its_own_addresses_in(&mut mesh)?)
}

fn a_pod_sends_only_through_meshd_and_from_its_own_addresses_in(mesh: &mut Mesh) -> Result<()> {
    let h1 = mesh.host("h1").up()?;
    let h2 = mesh.host("h2").up()?;
    let pa = mesh.pod(&h1, "pa", &[])?;
    let pb = mesh.pod(&h1, "pb", &[])?;
    h1.write_www("who", b"h1")?;
    h1.serve_http(HTTP)?;
    h1.serve_udp_sink(UDP)?;
    h2.serve_udp_sink(UDP)?;

    // pa routes the underlay itself: plaintext to another host, and to its own host's
    // underlay and link-local addresses (around meshd), get nowhere.
    pa.netns()
        .ip(&["route", "add", "198.18.0.0/15", "dev", "eth0"])?;
    pa.netns().ip(&[
        "-6",
        "route",
        "add",
        "fd00:198:18::/64",
        "via",
        "fe80::1",
        "dev",
        "eth0",
    ])?;
    for to in [
        h2.underlay_v4(),
        h2.underlay_v6(),
        h1.underlay_v4(),
        h1.underlay_v6(),
    ] {
        pa.udp_send(None, SocketAddr::new(to, UDP), "plain")?
            .check()?;
    }
    refused(&pa, h1.underlay_v4())?;
    let link_local = pa.exec(
        "curl",
        &[
            "-sS",
            "-g",
            "--max-time",
            "3",
            "http://[fe80::1%eth0]:8080/who",
        ],
    )?;
    ensure!(!link_local.success(), "pa reached fe80::1: {link_local:?}");
    // Four datagrams and at least the SYN of the connection to h1's underlay address.
    wait_dropped(&h1, "pod", 5)?;
    ensure!(
        h2.udp_sink_received(UDP)?.is_empty() && h1.udp_sink_received(UDP)?.is_empty(),
        "a pod's plaintext arrived: h2 {:?}, h1 {:?}",
        h2.udp_sink_received(UDP)?,
        h1.udp_sink_received(UDP)?
    );

    // pa takes pb's addresses and sends to its host as pb: quarantined and counted,
    // nothing delivered.
    let forged_before = h1
        .status()?
        .drops
        .get("forged_source")
        .copied()
        .unwrap_or(0);
    for addr in [pb.address, pb.address_v6] {
        add_address(&pa, addr)?;
    }
    for (src, dst) in [
        (pb.address, h1.overlay_v4()),
        (pb.address_v6, h1.overlay_v6()),
    ] {
        pa.udp_send(Some(src), SocketAddr::new(dst, UDP), "as-pb")?
            .check()?;
    }
    wait::until(
        "h1 to count pa's forged datagrams",
        Duration::from_secs(10),
        || {
            let n = h1
                .status()?
                .drops
                .get("forged_source")
                .copied()
                .unwrap_or(0);
            Ok((n >= forged_before + 2).then_some(()))
        },
    )?;
    ensure!(
        h1.udp_sink_received(UDP)?.is_empty(),
        "a forged datagram reached h1: {:?}",
        h1.udp_sink_received(UDP)?
    );

    // From its own addresses, through meshd, pa reaches its host (no policy: allow).
    for (src, dst) in [
        (pa.address, h1.overlay_v4()),
        (pa.address_v6, h1.overlay_v6()),
    ] {
        pa.udp_send(Some(src), SocketAddr::new(dst, UDP), "own")?
            .check()?;
        h1.wait_udp_sink(UDP, src, "own")?;
    }
    let r = pa.http_get_eventually(h1.overlay_v4(), HTTP, "/who")?;
    ensure!(r.status == 200 && r.body == b"h1", "{}", r.status);
    Ok(())
}

#[test]
fn the_filter_is_one_table_across_restarts_and_a_crash() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    Ok(the_filter_is_one_table_across_restarts_and_a_crash_in(
        &mut mesh,
    )?)
}

fn the_filter_is_one_table_across_restarts_and_a_crash_in(mesh: &mut Mesh) -> Result<()> {
    let h1 = mesh.host("h1").up()?;
    let x = mesh.attacker("x")?;
    x.route_overlay_via(&h1)?;
    let one = || -> Result<()> {
        let tables = h1.nft_tables()?;
        ensure!(tables == [TABLE], "tables: {tables:?}");
        Ok(())
    };
    one()?;
    // Stopped: removed.
    h1.stop_meshd()?;
    let tables = h1.nft_tables()?;
    ensure!(tables.is_empty(), "left after a clean stop: {tables:?}");
    h1.start()?;
    one()?;
    // Killed: left behind (the TUN is gone, so it guards nothing), then replaced.
    h1.kill_meshd()?;
    one()?;
    h1.start()?;
    one()?;
    h1.stop_meshd()?;
    h1.start()?;
    one()?;
    // And in force after all that.
    x.udp_send(None, SocketAddr::new(h1.overlay_v4(), UDP), "x")?
        .check()?;
    wait_dropped(&h1, "underlay", 1)?;

    // Deleted by hand: status says the addresses are unprotected.
    h1.run("nft", &["delete", "table", "inet", "meshd-mesh0"])?;
    let f = filter(&h1)?;
    ensure!(f.state == HostFilterState::Missing, "{f:?}");
    let text = h1.meshctl(&["status"])?.check()?.stdout_str();
    ensure!(text.contains("host filter: MISSING"), "{text}");
    // A restart puts it back.
    h1.stop_meshd()?;
    h1.start()?;
    one()?;
    Ok(())
}

#[test]
fn a_host_filter_that_cannot_be_installed_stops_the_start() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    Ok(a_host_filter_that_cannot_be_installed_stops_the_start_in(
        &mut mesh,
    )?)
}

fn a_host_filter_that_cannot_be_installed_stops_the_start_in(mesh: &mut Mesh) -> Result<()> {
    let h1 = mesh.host("h1").up()?;
    h1.stop_meshd()?;
    // No nft where meshd looks for it.
    let path = std::env::var("PATH").unwrap_or_default();
    h1.set_meshd_env("PATH", "/nonexistent");
    let start = h1.start();
    ensure!(start.is_err(), "meshd started without its host filter");
    let want = "node.host_filter: cannot install the host filter (nftables table inet meshd-mesh0): cannot run nft (install the Debian package nftables)";
    ensure!(h1.log().contains(want), "{}", h1.log());
    ensure!(
        h1.log()
            .contains("set host_filter = false in [node] to run unprotected"),
        "{}",
        h1.log()
    );
    // Nothing of it is left: no TUN, no table.
    ensure!(
        !h1.exec("ip", &["link", "show", "mesh0"])?.success(),
        "the TUN exists"
    );
    ensure!(h1.nft_tables()?.is_empty());
    // `check-config` says the same.
    let meshd = mesh.bins().meshd.to_str().context("utf-8")?.to_string();
    let config = h1.config_path();
    let config = config.to_str().context("utf-8")?;
    let check = h1.exec(
        "env",
        &[
            "PATH=/nonexistent",
            &meshd,
            "check-config",
            "--config",
            config,
        ],
    )?;
    ensure!(
        !check.success()
            && check
                .stderr_str()
                .contains("node.host_filter: cannot run nft"),
        "{check:?}"
    );
    // With nft back, the kernel takes the table (checked, not installed), and it starts.
    let check = h1.exec(&meshd, &["check-config", "--config", config])?;
    ensure!(check.success() && h1.nft_tables()?.is_empty(), "{check:?}");
    h1.set_meshd_env("PATH", &path);
    h1.start()?;
    ensure!(filter(&h1)?.state == HostFilterState::Installed);
    Ok(())
}
