//! Workload scenarios (issue 7, "Must show") with real meshd processes: pods with their
//! own identities in their own namespaces behind hosts, policy that tells two pods of
//! one host apart, same-host traffic through meshd, forged sources, runtime changes.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use mesh_tests::{wait, Host, Mesh, Pod};

mesh_tests::isolate!();

const HTTP: u16 = 8080;

/// h2 (pods pc, pd): pc takes HTTP from pa only; pd from nobody.
const H2_POLICY: &str = r#"
[[policy]]
name = "pc-from-pa"
action = "allow"
selector = { identities = ["spiffe://t/pc"] }
[[policy.rule]]
name = "pa-http"
from = [{ identities = ["spiffe://t/pa"] }]
to = [{ ports = [8080] }]
"#;

/// h1 (pods pa, pb): pb takes HTTP from its neighbour pa; pa from nobody.
const H1_POLICY: &str = r#"
[[policy]]
name = "pb-from-pa"
action = "allow"
selector = { identities = ["spiffe://t/pb"] }
[[policy.rule]]
name = "pa-http"
from = [{ identities = ["spiffe://t/pa"] }]
to = [{ ports = [8080] }]
"#;

fn serve(pods: &[&Pod]) -> Result<()> {
    for p in pods {
        p.write_www("who", p.name.as_bytes())?;
        p.serve_http(HTTP)?;
    }
    Ok(())
}

/// `src` gets `dst`'s page over IPv4 (retrying while the first handshake completes).
fn assert_gets(src: &Pod, dst: &Pod) -> Result<()> {
    assert_gets_at(src, dst, dst.address)
}

fn assert_gets_at(src: &Pod, dst: &Pod, addr: IpAddr) -> Result<()> {
    let r = src
        .http_get_eventually(addr, HTTP, "/who")
        .with_context(|| format!("{} -> {} at {addr}", src.name, dst.name))?;
    ensure!(
        r.status == 200 && r.body == dst.name.as_bytes(),
        "{} -> {}: {} {:?}",
        src.name,
        dst.name,
        r.status,
        String::from_utf8_lossy(&r.body)
    );
    Ok(())
}

fn assert_refused(src: &Pod, dst: &Pod) -> Result<()> {
    assert_refused_at(src, dst, dst.address)
}

fn assert_refused_at(src: &Pod, dst: &Pod, addr: IpAddr) -> Result<()> {
    let r = src.http_get_limit(addr, HTTP, "/who", Duration::from_secs(3));
    ensure!(
        r.is_err(),
        "{} reached {} at {addr}: {r:?}",
        src.name,
        dst.name
    );
    Ok(())
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

/// Waits until `h`'s decision log has a record with all of `fields`.
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

fn status_json(h: &Host) -> Result<serde_json::Value> {
    let out = h.meshctl(&["status", "--json"])?.check()?;
    serde_json::from_slice(&out.stdout).context("status --json")
}

#[test]
fn pods_on_two_hosts_are_told_apart_by_policy() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    Ok(pods_on_two_hosts_are_told_apart_by_policy_in(&mut mesh)?)
}

fn pods_on_two_hosts_are_told_apart_by_policy_in(mesh: &mut Mesh) -> Result<()> {
    let h1 = mesh.host("h1").policy("deny", H1_POLICY).up()?;
    let h2 = mesh.host("h2").policy("deny", H2_POLICY).up()?;
    let pa = mesh.pod(&h1, "pa", &[])?;
    let pb = mesh.pod(&h1, "pb", &[])?;
    let pc = mesh.pod(&h2, "pc", &[])?;
    let pd = mesh.pod(&h2, "pd", &[])?;
    serve(&[&pa, &pb, &pc, &pd])?;
    let marker = format!("POD-MARKER-{}", std::process::id()).repeat(500);
    pc.write_www("marker", marker.as_bytes())?;
    let cap = mesh.capture_underlay("")?;

    // Across hosts: pa may reach pc, its neighbour pb may not, and nobody reaches pd.
    assert_gets(&pa, &pc)?;
    let r = pa.http_get_eventually(pc.address, HTTP, "/marker")?;
    ensure!(
        r.status == 200 && r.body == marker.as_bytes(),
        "marker: {}",
        r.status
    );
    // Invariant 1 holds for pods: between hosts only WireGuard (and neighbour
    // discovery), and the payload never in clear.
    let pcap_path = cap.path().to_path_buf();
    let clear = cap.finish_packets(
        "not arp and not ether multicast and not ether broadcast and not (udp port 51820) \
         and not (icmp6 and ip6[40] >= 133 and ip6[40] <= 137)",
    )?;
    ensure!(
        clear.is_empty(),
        "non-WireGuard packets on the underlay: {clear:?}"
    );
    let pcap = std::fs::read(&pcap_path)?;
    ensure!(
        !pcap.windows(20).any(|w| w == &marker.as_bytes()[..20]),
        "pod payload crossed the underlay in clear"
    );
    assert_refused(&pb, &pc)?;
    assert_refused(&pa, &pd)?;
    assert_logged(
        &h2,
        &[
            ("src", "spiffe://t/pb"),
            ("dst", "spiffe://t/pc"),
            ("decision", "deny"),
        ],
    )?;
    // Same host: pa may reach pb, pb may not reach pa; both decided by h1's meshd.
    assert_gets(&pa, &pb)?;
    assert_refused(&pb, &pa)?;
    // The same over IPv6.
    assert_gets_at(&pa, &pc, pc.address_v6)?;
    assert_refused_at(&pb, &pc, pc.address_v6)?;
    assert_gets_at(&pa, &pb, pb.address_v6)?;
    assert_refused_at(&pb, &pa, pa.address_v6)?;
    assert_logged(
        &h1,
        &[
            ("src", "spiffe://t/pb"),
            ("dst", "spiffe://t/pa"),
            ("decision", "deny"),
        ],
    )?;

    // Each pair of workloads has its own session, keyed by their own keys: h2 holds
    // completed sessions pc-pa, pc-pb and pd-pa (each carried the attempts above), and
    // pd-pb, never used, has no handshake.
    let s = status_json(&h2)?;
    let session = |local: &str, remote: &str| {
        s["peers"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["local"] == local && p["identity"] == remote)
            .cloned()
            .unwrap_or_default()
    };
    for (local, remote) in [("pc", "pa"), ("pc", "pb"), ("pd", "pa")] {
        let p = session(
            &format!("spiffe://t/{local}"),
            &format!("spiffe://t/{remote}"),
        );
        ensure!(
            !p["latest_handshake"].is_null() && p["rx_bytes"].as_u64() > Some(0),
            "{local}-{remote}: {p}"
        );
    }
    let pd_pb = session("spiffe://t/pd", "spiffe://t/pb");
    ensure!(pd_pb["public_key"].is_string(), "no pd-pb session: {s}");
    ensure!(pd_pb["latest_handshake"].is_null(), "pd-pb: {pd_pb}");
    let names: Vec<&str> = s["workloads"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|w| w["identity"].as_str())
        .collect();
    ensure!(
        names == ["spiffe://t/h2", "spiffe://t/pc", "spiffe://t/pd"],
        "{names:?}"
    );
    let table = h2.meshctl(&["status"])?.check()?.stdout_str();
    ensure!(
        table.contains("workload: spiffe://t/pc (pc)") && table.contains("attach: veth:p-pc"),
        "{table}"
    );
    Ok(())
}

#[test]
fn a_pod_forging_its_neighbours_address_is_dropped_and_counted() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    Ok(a_pod_forging_its_neighbours_address_is_dropped_and_counted_in(&mut mesh)?)
}

fn a_pod_forging_its_neighbours_address_is_dropped_and_counted_in(mesh: &mut Mesh) -> Result<()> {
    let h1 = mesh.host("h1").up()?;
    let h2 = mesh.host("h2").up()?;
    let pa = mesh.pod(&h1, "pa", &[])?;
    let pb = mesh.pod(&h1, "pb", &[])?;
    let pc = mesh.pod(&h2, "pc", &[])?;
    serve(&[&pc])?;
    // Both pods reach pc under their own names (no policy on h2: allow).
    assert_gets(&pa, &pc)?;
    assert_gets(&pb, &pc)?;
    let before = status_json(&h2)?;

    // pa takes pb's address and sends as pb.
    pa.run(
        "ip",
        &["addr", "add", &format!("{}/32", pb.address), "dev", "eth0"],
    )?;
    let target = pc.address.to_string();
    let src = pb.address.to_string();
    let out = pa.exec(
        "ping",
        &["-n", "-c", "3", "-i", "0.2", "-W", "1", "-I", &src, &target],
    )?;
    ensure!(!out.success(), "forged ping got through: {out:?}");
    let r = pa.exec(
        "curl",
        &[
            "-sS",
            "--max-time",
            "2",
            "--interface",
            &src,
            &format!("http://{target}:{HTTP}/who"),
        ],
    )?;
    ensure!(!r.success(), "forged HTTP got through: {r:?}");

    let s = status_json(&h1)?;
    let forged = s["drops"]["forged_source"].as_u64().unwrap_or(0);
    ensure!(
        forged >= 3,
        "h1 counted {forged} forged packets: {}",
        s["drops"]
    );
    // Nothing more reached h2 from pb's identity.
    let after = status_json(&h2)?;
    let rx = |s: &serde_json::Value| {
        s["peers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["identity"] == "spiffe://t/pb")
            .map(|p| p["rx_bytes"].as_u64().unwrap_or(0))
            .sum::<u64>()
    };
    ensure!(rx(&after) == rx(&before), "pb's sessions carried more data");
    Ok(())
}

#[test]
fn workloads_added_and_removed_at_runtime_survive_a_restart() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    Ok(workloads_added_and_removed_at_runtime_survive_a_restart_in(
        &mut mesh,
    )?)
}

fn workloads_added_and_removed_at_runtime_survive_a_restart_in(mesh: &mut Mesh) -> Result<()> {
    let h1 = mesh.host("h1").up()?;
    let h2 = mesh.host("h2").up()?;
    let pa = mesh.pod(&h1, "pa", &[])?;
    let pc = mesh.pod(&h2, "pc", &[])?;
    serve(&[&pa, &pc])?;
    assert_gets(&pa, &pc)?;
    assert_gets(&pc, &pa)?;

    let list = h1.meshctl(&["workload", "list"])?.check()?.stdout_str();
    ensure!(
        list.contains("pa") && list.contains("veth:p-pa") && list.contains("runtime"),
        "{list}"
    );

    // Persisted: after a restart pa still has its identity and its routes.
    h1.stop_meshd()?;
    h1.start()?;
    let list = h1
        .meshctl(&["workload", "list", "--json"])?
        .check()?
        .stdout_str();
    ensure!(list.contains("spiffe://t/pa"), "{list}");
    assert_gets(&pa, &pc)?;

    // Removed: pa is cut off, and stays removed after a restart.
    pa.remove_from_host()?;
    assert_refused(&pa, &pc)?;
    assert_refused(&pc, &pa)?;
    h1.stop_meshd()?;
    h1.start()?;
    let list = h1
        .meshctl(&["workload", "list", "--json"])?
        .check()?
        .stdout_str();
    ensure!(!list.contains("spiffe://t/pa"), "{list}");
    assert_refused(&pa, &pc)?;

    // Added back: reachable again.
    pa.add_to_host()?;
    assert_gets(&pa, &pc)?;

    // Invalid additions change nothing.
    let bad = h1.meshctl(&[
        "workload", "add", "node", "--cert", "host.crt", "--key", "host.key",
    ])?;
    ensure!(!bad.success(), "{bad:?}");
    let wrong_key = h1.meshctl(&[
        "workload",
        "add",
        "px",
        "--cert",
        pa.cert_path.to_str().context("utf-8")?,
        "--key",
        "host.key",
    ])?;
    ensure!(
        !wrong_key.success() && wrong_key.stderr_str().contains("does not match"),
        "{wrong_key:?}"
    );
    Ok(())
}

#[test]
fn a_config_file_workload_is_attached_when_its_pod_appears() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    Ok(a_config_file_workload_is_attached_when_its_pod_appears_in(
        &mut mesh,
    )?)
}

fn a_config_file_workload_is_attached_when_its_pod_appears_in(mesh: &mut Mesh) -> Result<()> {
    let h1 = mesh.host("h1").up()?;
    let h2 = mesh.host("h2").up()?;
    let pc = mesh.pod(&h2, "pc", &[])?;
    serve(&[&pc])?;
    // pa is written into h1's meshd.toml before its pod exists.
    let cert = mesh.pod_cert(&h1, "pa", &[])?;
    let mut config = std::fs::read_to_string(h1.config_path())?;
    config.push('\n');
    config.push_str(&cert.workload_toml());
    std::fs::write(h1.config_path(), config)?;
    h1.stop_meshd()?;
    h1.start()?;
    let list = h1.meshctl(&["workload", "list"])?.check()?.stdout_str();
    ensure!(
        list.contains("spiffe://t/pa") && list.contains("config"),
        "{list}"
    );
    // The pod comes up (veth created): meshd attaches it on its own.
    let pa = mesh.plug_pod(&h1, cert)?;
    assert_gets(&pa, &pc)?;
    wait::until("h1 to log the attachment", Duration::from_secs(5), || {
        Ok(h1.log().contains("workload attached").then_some(()))
    })?;
    // A config workload removed at run time stays removed after a restart.
    pa.remove_from_host()?;
    h1.stop_meshd()?;
    h1.start()?;
    let list = h1.meshctl(&["workload", "list"])?.check()?.stdout_str();
    ensure!(!list.contains("spiffe://t/pa"), "{list}");
    assert_refused(&pa, &pc)?;
    Ok(())
}

/// A pod whose link MTU exceeds the tunnel's learns the path MTU from its host's ICMP
/// errors, which reach it directly, as does the host's own traffic to its pods (a
/// packet from the host's own address that came back out of the TUN would be dropped
/// by the kernel as a martian).
#[test]
fn pods_learn_the_path_mtu_and_their_host_reaches_them() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    Ok(pods_learn_the_path_mtu_and_their_host_reaches_them_in(
        &mut mesh,
    )?)
}

fn pods_learn_the_path_mtu_and_their_host_reaches_them_in(mesh: &mut Mesh) -> Result<()> {
    let h1 = mesh.host("h1").up()?;
    let h2 = mesh.host("h2").up()?;
    let pa = mesh.pod(&h1, "pa", &[])?;
    let pc = mesh.pod(&h2, "pc", &[])?;
    serve(&[&pa, &pc])?;
    let big: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
    pc.write_www("big", &big)?;
    for (h, p) in [(&h1, &pa), (&h2, &pc)] {
        h.netns().ip(&["link", "set", &p.veth(), "mtu", "1500"])?;
        p.netns().ip(&["link", "set", "eth0", "mtu", "1500"])?;
    }
    let r = pa.http_get_eventually(pc.address, HTTP, "/big")?;
    ensure!(
        r.status == 200 && r.body == big,
        "big: {} ({} bytes)",
        r.status,
        r.body.len()
    );
    let r = h1.http_get_eventually(pa.address, HTTP, "/who")?;
    ensure!(
        r.status == 200 && r.body == b"pa",
        "host to its pod: {}",
        r.status
    );
    Ok(())
}

#[test]
fn a_pods_certificate_renewed_in_place_is_taken_without_a_restart() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    Ok(a_pods_certificate_renewed_in_place_is_taken_without_a_restart_in(&mut mesh)?)
}

fn a_pods_certificate_renewed_in_place_is_taken_without_a_restart_in(
    mesh: &mut Mesh,
) -> Result<()> {
    const BUYERS: &str = r#"
[[policy]]
name = "buyers-in"
action = "allow"
[[policy.rule]]
from = [{ groups = ["buyers"] }]
to = [{ ports = [8080] }]
"#;
    let h1 = mesh.host("h1").up()?;
    let h2 = mesh.host("h2").policy("deny", BUYERS).up()?;
    let pa = mesh.pod(&h1, "pa", &[])?;
    let pc = mesh.pod(&h2, "pc", &[])?;
    serve(&[&pc])?;
    // pa's certificate names no group: h2 refuses it.
    assert_refused(&pa, &pc)?;
    // Renewed in place with group buyers: h1's meshd takes it from the file, h2 from
    // `peer add`; then pc answers.
    let end = pa.renew_cert(mesh, &["buyers"], mesh_tests::Validity::EndsIn(2 * 86_400))?;
    let end_on_h1 = || -> Result<Option<u64>> {
        let s = status_json(&h1)?;
        Ok(s["workloads"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|w| w["name"] == "pa")
            .and_then(|w| w["not_after"].as_u64()))
    };
    wait::until("h1 to take pa's renewal", Duration::from_secs(10), || {
        Ok((end_on_h1()? == Some(end.0)).then_some(()))
    })
    .with_context(|| h1.log())?;
    assert_gets(&pa, &pc)?;
    ensure!(
        h1.log().contains("certificate of workload pa renewed"),
        "{}",
        h1.log()
    );
    Ok(())
}
