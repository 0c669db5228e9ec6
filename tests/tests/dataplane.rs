//! Data plane scenarios (issue 3, "Must show") with real meshd processes in network
//! namespaces: reachability, encryption, identity, resilience, bad input, runtime peers.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use mesh_tests::{wait, Host, PeerSet, Validity};
use sha2::{Digest, Sha256};

mesh_tests::isolate!();

const HTTP: u16 = 8080;
const UDP_ECHO: u16 = 7000;

/// Each host serves `/<name>.txt` over HTTP and echoes UDP.
fn serve_all(hosts: &[&Host]) -> Result<()> {
    for h in hosts {
        h.write_www(&format!("{}.txt", h.name()), h.name().as_bytes())?;
        h.serve_http(HTTP)?;
        h.serve_udp_echo(UDP_ECHO)?;
    }
    Ok(())
}

/// TCP (HTTP), UDP and ICMP from `src` to `dst` over both overlay families.
fn assert_reaches(src: &Host, dst: &Host) -> Result<()> {
    for addr in [dst.overlay_v4(), dst.overlay_v6()] {
        let ctx = || format!("{} -> {} at {addr}", src.name(), dst.name());
        let r = src
            .http_get_eventually(addr, HTTP, &format!("/{}.txt", dst.name()))
            .with_context(ctx)?;
        ensure!(
            r.status == 200 && r.body == dst.name().as_bytes(),
            "{}: got {} {:?}",
            ctx(),
            r.status,
            String::from_utf8_lossy(&r.body)
        );
        src.udp_echo(addr, UDP_ECHO).with_context(ctx)?;
        src.ping(addr).with_context(ctx)?;
    }
    Ok(())
}

/// No HTTP, UDP or ICMP from `src` reaches `dst` (each attempt bounded to seconds).
fn assert_cut_off(src: &Host, dst: IpAddr) -> Result<()> {
    let r = src.http_get_limit(dst, HTTP, "/", Duration::from_secs(3));
    ensure!(r.is_err(), "{} reached {dst} over HTTP: {r:?}", src.name());
    let out = src.udp_echo_once(dst, UDP_ECHO)?;
    ensure!(!out.success(), "{} got a UDP echo from {dst}", src.name());
    let out = src.ping_once(dst, 3)?;
    ensure!(!out.success(), "{} pinged {dst}: {out:?}", src.name());
    Ok(())
}

/// Every file under `dir` with its bytes (the daemon's persisted state).
fn snapshot(
    dir: &std::path::Path,
) -> Result<std::collections::BTreeMap<std::path::PathBuf, Vec<u8>>> {
    let mut out = std::collections::BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries {
            let p = e?.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.insert(p.clone(), std::fs::read(&p)?);
            }
        }
    }
    Ok(out)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn random_bytes(n: usize) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut buf = vec![0u8; n];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn three_hosts_reach_each_other_over_ipv4_and_ipv6() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    let [a, b, c] = mesh.hosts(["a", "b", "c"])?;
    serve_all(&[&a, &b, &c])?;
    for src in [&a, &b, &c] {
        for dst in [&a, &b, &c] {
            if src.name() != dst.name() {
                assert_reaches(src, dst)?;
            }
        }
    }
    // The operator's view names every peer.
    let table = a.meshctl(&["status"])?.check()?.stdout_str();
    for id in [a.identity(), b.identity(), c.identity()] {
        assert!(table.contains(id), "`meshctl status` lacks {id}:\n{table}");
    }
    // Every host now shows a completed handshake and traffic with both others.
    for h in [&a, &b, &c] {
        let s = h.status()?;
        assert_eq!(s.identity, h.identity());
        assert_eq!(s.peers.len(), 2, "{}: {s:?}", h.name());
        for p in &s.peers {
            assert!(p.latest_handshake.is_some(), "{}: {p:?}", h.name());
            assert!(p.rx_bytes > 0 && p.tx_bytes > 0, "{}: {p:?}", h.name());
        }
    }
    Ok(())
}

#[test]
fn ipv6_underlay_carries_both_overlay_families() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    let a = mesh.host("a").ipv6_underlay().up()?;
    let b = mesh.host("b").ipv6_underlay().up()?;
    serve_all(&[&a, &b])?;
    assert_reaches(&a, &b)?;
    assert_reaches(&b, &a)?;
    let s = a.status()?;
    let ep = s.peer(b.identity()).and_then(|p| p.endpoint.clone());
    assert_eq!(ep, Some(b.endpoint().to_string()), "{s:?}");
    Ok(())
}

#[test]
fn underlay_capture_never_shows_the_overlay_payload() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    let [a, b] = mesh.hosts(["a", "b"])?;
    let marker = format!("MESH-MARKER-{}", hex(&random_bytes(8)?));
    b.write_www("marker.txt", marker.repeat(2000).as_bytes())?;
    b.serve_http(HTTP)?;
    b.serve_udp_echo(UDP_ECHO)?;
    let cap = mesh.capture_underlay("")?;
    for addr in [b.overlay_v4(), b.overlay_v6()] {
        let r = a.http_get_eventually(addr, HTTP, "/marker.txt")?;
        assert_eq!(r.status, 200);
        assert!(contains(&r.body, marker.as_bytes()));
    }
    let pcap_path = cap.path().to_path_buf();
    // Invariant 1, whole: between hosts, every packet is WireGuard on the mesh port
    // (apart from neighbour discovery: ARP, IPv6 ND, and link multicast such as MLD).
    let clear = cap.finish_packets(
        "not arp and not ether multicast and not ether broadcast and not (udp port 51820) \
         and not (icmp6 and ip6[40] >= 133 and ip6[40] <= 137)",
    )?;
    assert!(
        clear.is_empty(),
        "non-WireGuard packets on the underlay:\n{}",
        clear.join("\n")
    );
    let pcap = std::fs::read(&pcap_path)?;
    // The capture saw the transfer (two copies of ~50 kB went through it)...
    assert!(
        pcap.len() > 2 * marker.len() * 2000,
        "capture too small ({} bytes): did it see the transfer?",
        pcap.len()
    );
    // ...and none of it in clear.
    assert!(
        !contains(&pcap, marker.as_bytes()),
        "the marker crossed the underlay unencrypted"
    );
    Ok(())
}

#[test]
fn multi_megabyte_transfer_arrives_byte_identical() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    let [a, b] = mesh.hosts(["a", "b"])?;
    let data = random_bytes(8 << 20)?;
    b.write_www("big.bin", &data)?;
    b.serve_http(HTTP)?;
    let want = hex(&Sha256::digest(&data));
    for addr in [b.overlay_v4(), b.overlay_v6()] {
        // Warm up the session, then time-limit the real transfer generously.
        a.http_get_eventually(addr, HTTP, "/")?;
        let r = a.http_get_limit(addr, HTTP, "/big.bin", Duration::from_secs(60))?;
        assert_eq!(r.status, 200);
        assert_eq!(r.body.len(), data.len(), "length over {addr}");
        assert_eq!(hex(&Sha256::digest(&r.body)), want, "checksum over {addr}");
    }
    // Nothing was lost on the way: every TUN write (merged segments included) was
    // taken by the kernel, and no datagram outlasted the send-buffer backpressure.
    for h in [&a, &b] {
        let s = h.status()?;
        for counter in ["tun_write", "udp_send"] {
            assert_eq!(
                s.drops.get(counter),
                Some(&0),
                "{} {counter}: {s:?}",
                h.name()
            );
        }
    }
    Ok(())
}

/// Receives numbered datagrams on port 9000 of argv[1] until number 2999 or 3 s of
/// silence, then writes "count N bad B inorder X" to udp-result.txt.
const UDP_BULK_RX: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
s.bind((sys.argv[1], 9000))
s.settimeout(3)
print("ready", flush=True)
got = []
try:
    while not got or int(got[-1][:8]) != 2999:
        got.append(s.recv(65535))
except socket.timeout:
    pass
def want(i):
    return (b"%08d" % i) + bytes([(i + k) % 251 for k in range(1192 if i % 97 else 300)])
nums = [int(d[:8]) for d in got]
bad = sum(1 for d, i in zip(got, nums) if d != want(i))
inorder = all(a < b for a, b in zip(nums, nums[1:]))
open("udp-result.txt", "w").write("count %d bad %d inorder %s" % (len(got), bad, inorder))
print("done", flush=True)
"#;

/// Sends 3,000 numbered datagrams (1,200 bytes, every 97th 308) to port 9000.
const UDP_BULK_TX: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET, socket.SOCK_DGRAM)
s.connect((sys.argv[1], 9000))
for i in range(3000):
    s.send((b"%08d" % i) + bytes([(i + k) % 251 for k in range(1192 if i % 97 else 300)]))
"#;

#[test]
fn udp_bulk_arrives_intact_and_in_order() -> mesh_tests::Result {
    // A burst of one UDP flow reaches the receiving meshd in batches, which it writes
    // to its TUN merged (UDP segmentation offload) where the device takes it.
    let mut mesh = mesh_tests::mesh!();
    let [a, b] = mesh.hosts(["a", "b"])?;
    for addr in [b.overlay_v4(), b.overlay_v6()] {
        a.ping(addr)?;
        let label = format!("udp-rx-{addr}");
        let addr_s = addr.to_string();
        b.spawn(
            &label,
            std::path::Path::new("python3"),
            &["-c", UDP_BULK_RX, &addr_s],
        )?;
        b.wait_background_output(&label, "ready")?;
        a.exec_timeout(
            "python3",
            &["-c", UDP_BULK_TX, &addr_s],
            Duration::from_secs(30),
        )?
        .check()?;
        b.wait_background_output(&label, "done")?;
        let result = std::fs::read_to_string(b.dir().join("udp-result.txt"))?;
        let field = |name: &str| -> Result<String> {
            let mut words = result.split_whitespace();
            words.find(|w| *w == name).context("field")?;
            Ok(words.next().context("value")?.to_string())
        };
        // UDP may lose datagrams on a loaded machine (the sender's own queue); what
        // arrives must be whole, unchanged and in order.
        let count: usize = field("count")?.parse()?;
        assert!(count >= 1000, "over {addr}: {result}");
        assert_eq!(field("bad")?, "0", "over {addr}: {result}");
        assert_eq!(field("inorder")?, "True", "over {addr}: {result}");
    }
    let s = b.status()?;
    assert_eq!(s.drops.get("tun_write"), Some(&0), "{s:?}");
    Ok(())
}

#[test]
fn fallback_data_paths_carry_traffic_intact() -> mesh_tests::Result {
    // The configurations meshd falls back to, or that an operator may choose: a TUN
    // without offload (a kernel that refuses it: one packet per read and write), and
    // one thread per direction instead of workers. Both must carry the same traffic.
    let mut mesh = mesh_tests::mesh!();
    let [a, b] = mesh.hosts(["a", "b"])?;
    serve_all(&[&a, &b])?;
    let data = random_bytes(4 << 20)?;
    b.write_www("big.bin", &data)?;
    let want = hex(&Sha256::digest(&data));
    // The TUN without offload through meshd's environment (a test hook: the kernel
    // decides this one), one thread per direction through meshd.toml's node.workers.
    for (key, value, offload, threads) in [
        ("MESHD_OFFLOAD", "0", "tso=false", "worker0,worker1,"),
        ("workers", "0", "tso=true", "tun,udp,"),
    ] {
        for h in [&a, &b] {
            h.set_meshd_env("MESHD_OFFLOAD", "1");
            if key == "workers" {
                let path = h.config_path();
                let text = std::fs::read_to_string(&path)?;
                std::fs::write(&path, text.replacen("[node]\n", "[node]\nworkers = 0\n", 1))?;
            } else {
                h.set_meshd_env(key, value);
            }
            restart_cleanly(h)?;
            // What this meshd (the last lines of the log) says it runs.
            let log = h.log();
            let said = |what: &str| log.lines().rev().find(|l| l.contains(what));
            let device = said("TUN offload");
            assert!(
                device.is_some_and(|l| l.contains(offload)),
                "{key}={value}: {device:?}"
            );
            let ready = said("ready");
            let want = format!("threads={threads}");
            assert!(
                ready.is_some_and(|l| l.contains(&want)),
                "{key}={value}: {ready:?}"
            );
        }
        assert_reaches(&a, &b)?;
        assert_reaches(&b, &a)?;
        let addr = b.overlay_v4();
        let r = a.http_get_limit(addr, HTTP, "/big.bin", Duration::from_secs(60))?;
        assert_eq!(r.status, 200, "{key}={value}");
        assert_eq!(hex(&Sha256::digest(&r.body)), want, "{key}={value}");
    }
    Ok(())
}

#[test]
fn host_certified_by_another_ca_cannot_exchange_traffic() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    let [a, b] = mesh.hosts(["a", "b"])?;
    serve_all(&[&a, &b])?;
    assert_reaches(&a, &b)?;
    // The outsider runs a real meshd under its own CA, in the mesh's trust domain and
    // address range; its CA also certifies a's real public key, so the outsider's meshd
    // happily initiates handshakes towards a.
    let other = mesh.other_ca("t")?;
    let evil = mesh
        .host("evil")
        .identity("spiffe://t/evil")
        .ca(&other)
        .peers(PeerSet::None)
        .up()?;
    serve_all(&[&evil])?;
    let forged_a = other.issue(
        a.identity(),
        &[a.overlay_v4(), a.overlay_v6()],
        &[],
        Some(&a.public_key()),
        Validity::Current,
    )?;
    let forged_path = evil.dir().join("a-by-other-ca.crt");
    std::fs::write(&forged_path, &forged_a.cert_pem)?;
    let ep = a.endpoint().to_string();
    evil.meshctl(&[
        "peer",
        "add",
        forged_path.to_str().unwrap_or_default(),
        "--endpoint",
        &ep,
    ])?
    .check()?;
    // The mesh refuses the outsider's certificate.
    let evil_cert = evil.cert_path();
    let out = a.meshctl(&[
        "peer",
        "add",
        evil_cert.to_str().unwrap_or_default(),
        "--endpoint",
        &evil.endpoint().to_string(),
    ])?;
    assert!(
        !out.success(),
        "a accepted a certificate from another CA: {out:?}"
    );
    // No traffic either way, over either family; a never answers the outsider's
    // handshakes (watched on the underlay).
    let cap = mesh.capture_underlay("")?;
    for addr in [a.overlay_v4(), a.overlay_v6()] {
        assert_cut_off(&evil, addr)?;
    }
    for addr in [evil.overlay_v4(), evil.overlay_v6()] {
        assert_cut_off(&a, addr)?;
    }
    let to_evil = cap.finish_packets(&format!(
        "udp and src host {} and dst host {}",
        a.underlay_v4(),
        evil.underlay_v4()
    ))?;
    assert!(
        to_evil.is_empty(),
        "a answered the outsider:\n{}",
        to_evil.join("\n")
    );
    let s = a.status()?;
    assert!(s.peer(evil.identity()).is_none(), "{s:?}");
    assert!(
        s.drops.get("unknown_peer").copied().unwrap_or(0) > 0,
        "the outsider's handshakes were not counted: {:?}",
        s.drops
    );
    assert!(
        s.peer(b.identity())
            .is_some_and(|p| p.drops.values().sum::<u64>() == 0),
        "{s:?}"
    );
    // The mesh still works.
    assert_reaches(&b, &a)?;
    Ok(())
}

#[test]
fn forged_overlay_source_is_dropped_and_counted() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    let [a, b, c] = mesh.hosts(["a", "b", "c"])?;
    serve_all(&[&c])?;
    // b and c have a session.
    b.ping(c.overlay_v4())?;
    b.ping(c.overlay_v6())?;
    // b claims a's overlay addresses locally and sends from them to c.
    b.netns().ip(&[
        "addr",
        "add",
        &format!("{}/32", a.overlay_v4()),
        "dev",
        "lo",
    ])?;
    b.netns().ip(&[
        "addr",
        "add",
        &format!("{}/128", a.overlay_v6()),
        "dev",
        "lo",
        "nodad",
    ])?;
    let before = c
        .status()?
        .peer(b.identity())
        .map(|p| p.drops.get("spoofed_source").copied().unwrap_or(0))
        .unwrap_or(0);
    for (src, dst) in [
        (a.overlay_v4(), c.overlay_v4()),
        (a.overlay_v6(), c.overlay_v6()),
    ] {
        let out = b.exec(
            "ping",
            &[
                "-n",
                "-c",
                "3",
                "-i",
                "0.2",
                "-W",
                "1",
                "-I",
                &src.to_string(),
                &dst.to_string(),
            ],
        )?;
        assert!(
            !out.success(),
            "a forged ping from {src} got an answer: {out:?}"
        );
    }
    let got = wait::until(
        "c to count b's spoofed packets",
        Duration::from_secs(10),
        || {
            let s = c.status()?;
            let n = s
                .peer(b.identity())
                .map(|p| p.drops.get("spoofed_source").copied().unwrap_or(0))
                .unwrap_or(0);
            Ok((n >= before + 6).then_some(n))
        },
    )?;
    assert!(got >= before + 6);
    // Nothing was credited to a, whose address was forged.
    let s = c.status()?;
    let a_peer = s.peer(a.identity()).context("c lists a")?;
    assert_eq!(a_peer.rx_bytes, 0, "{a_peer:?}");
    Ok(())
}

#[test]
fn expired_peer_certificate_is_refused_with_a_clear_log_line() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    let a = mesh.host("a").up()?;
    let expired = mesh.ca().issue(
        "spiffe://t/old",
        &[IpAddr::V4(Ipv4Addr::new(100, 64, 9, 9))],
        &[],
        None,
        Validity::Expired,
    )?;
    let path = a.dir().join("old.crt");
    std::fs::write(&path, &expired.cert_pem)?;
    let path_s = path.to_str().context("path")?;
    // At run time: refused, the error says why.
    let out = a.meshctl(&["peer", "add", path_s, "--endpoint", "198.18.9.9:51820"])?;
    assert!(!out.success(), "expired certificate accepted: {out:?}");
    assert!(out.stderr_str().contains("expired"), "{out:?}");
    assert!(a.status()?.peer("spiffe://t/old").is_none());
    // From the config file: meshd refuses that peer and logs why.
    let mut config = std::fs::read_to_string(a.config_path())?;
    config.push_str("\n[[peer]]\ncert = \"old.crt\"\nendpoint = \"198.18.9.9:51820\"\n");
    std::fs::write(a.config_path(), config)?;
    a.stop_meshd()?;
    let started = a.start();
    let log = a.log();
    let line = log
        .lines()
        .find(|l| l.contains("spiffe://t/old") && l.contains("expired"))
        .or_else(|| {
            log.lines()
                .find(|l| l.contains("old.crt") && l.contains("expired"))
        });
    assert!(line.is_some(), "no log line about the expired peer:\n{log}");
    // Refusing that peer does not take the node down.
    started?;
    assert!(a.meshd_alive()?);
    Ok(())
}

#[test]
fn own_certificate_nearing_and_past_its_end_is_announced() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    // Ends 10 s from now: inside its renewal notice from the start.
    let a = mesh.host("a").validity(Validity::EndsIn(10)).up()?;
    let line_with = |words: &[&str]| {
        let log = a.log();
        Ok(log
            .lines()
            .find(|l| words.iter().all(|w| l.contains(w)))
            .map(str::to_string))
    };
    let warning = wait::until("the renewal warning", Duration::from_secs(10), || {
        line_with(&["WARN", "certificate of spiffe://t/a expires at"])
    })
    .with_context(|| a.log())?;
    assert!(
        warning.contains("meshctl cert renew") && warning.contains("meshd takes it"),
        "{warning}"
    );
    let status = a.meshctl(&["status"])?.stdout_str();
    assert!(status.contains("certificate: expires"), "{status}");
    // Then, once it has ended: an error, once, and status says so.
    let error = wait::until("the expiry error", Duration::from_secs(40), || {
        line_with(&["ERROR", "certificate of spiffe://t/a expired at"])
    })
    .with_context(|| a.log())?;
    assert!(error.contains("peers refuse"), "{error}");
    let status = a.meshctl(&["status"])?.stdout_str();
    assert!(status.contains("certificate: EXPIRED"), "{status}");
    // Said once each, and the daemon carries on (peers decide what to refuse).
    let log = a.log();
    assert_eq!(log.matches("expires at").count(), 1, "{log}");
    assert_eq!(log.matches("expired at").count(), 1, "{log}");
    assert!(a.meshd_alive()?);
    Ok(())
}

#[test]
fn a_new_node_key_is_taken_and_peers_follow_once_they_hold_its_certificate() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    let [a, c] = mesh.hosts(["a", "c"])?;
    a.ping(c.overlay_v4())?;
    let old = a.status()?.public_key;
    // A new key and its certificate, written over a's files: a takes both, says what
    // it means, and keeps running.
    let new = a.rotate_key(&[], Validity::Current)?;
    wait::until("a to take its new key", Duration::from_secs(10), || {
        Ok((a.status()?.public_key == new).then_some(()))
    })
    .with_context(|| a.log())?;
    assert_ne!(old, new);
    let log = a.log();
    assert!(
        log.contains("node certificate renewed") && log.contains("has a new key"),
        "{log}"
    );
    // c still holds a's old certificate: a's new key gets no session with it.
    assert!(
        !a.ping_once(c.overlay_v4(), 1)?.success(),
        "c answered a's new key"
    );
    // Once c holds the new certificate, traffic flows again.
    c.peer_add(&a)?;
    a.ping(c.overlay_v4())?;
    assert!(a.meshd_alive()? && c.meshd_alive()?);
    Ok(())
}

/// The kernel's CPU latency QoS: the smallest latency any process requests now (µs).
fn cpu_latency_in_force() -> Result<i32> {
    let bytes = std::fs::read("/dev/cpu_dma_latency").context("read /dev/cpu_dma_latency")?;
    let value: [u8; 4] = bytes.as_slice().try_into().context("not 4 bytes")?;
    Ok(i32::from_ne_bytes(value))
}

/// `node.cpu_latency_us`: meshd requests the CPU wake-up latency while traffic flows
/// (the kernel's aggregate drops to it) and withdraws it once traffic stops.
#[test]
fn cpu_latency_request_is_held_while_traffic_flows() -> mesh_tests::Result {
    const US: i32 = 3;
    let mut mesh = mesh_tests::mesh!();
    let b = mesh.host("b").up()?;
    let a = mesh.host("a").node_config("cpu_latency_us = 3").up()?;
    let state = |h: &Host| -> Result<String> {
        let s = h.meshctl(&["status", "--json"])?.check()?.stdout_str();
        let v: serde_json::Value = serde_json::from_str(&s)?;
        Ok(v["cpu_latency"]["state"]
            .as_str()
            .unwrap_or("none")
            .to_string())
    };
    let released = |h: &Host| -> Result<Option<()>> {
        Ok((state(h)? == "released" && cpu_latency_in_force()? != US).then_some(()))
    };
    wait::until("no request before traffic", Duration::from_secs(10), || {
        released(&a)
    })?;
    let before = cpu_latency_in_force()?;
    (before > US).then_some(()).with_context(|| {
        format!(
            "another process holds a CPU latency request of {before} µs: meshd's cannot be seen"
        )
    })?;
    assert_eq!(state(&b)?, "none", "b has no cpu_latency_us");
    assert!(
        a.log().contains("requesting a CPU wake-up latency of 3 µs"),
        "{}",
        a.log()
    );
    // 5 s of pings: held while they flow.
    std::thread::scope(|s| -> Result<()> {
        let pings = s.spawn(|| a.ping_once(b.overlay_v4(), 25)?.check().map(|_| ()));
        let held = wait::until(
            "the request while pings flow",
            Duration::from_secs(5),
            || Ok((state(&a)? == "held" && cpu_latency_in_force()? == US).then_some(())),
        );
        pings.join().expect("ping thread")?;
        held.with_context(|| a.log())
    })?;
    let status = a.meshctl(&["status"])?.stdout_str();
    assert!(
        status.contains("cpu wake-up latency: 3 µs requested while traffic flows"),
        "{status}"
    );
    // Withdrawn once they stop (a tick without traffic: 250-500 ms).
    wait::until("the request withdrawn", Duration::from_secs(10), || {
        released(&a)
    })
    .with_context(|| a.log())?;
    Ok(())
}

/// `meshd check-config` verifies a configuration (certificates, keys, policy) without
/// touching anything: beside a running meshd on the same files it neither fails nor
/// disturbs it; a bad field is one line naming file, line and field, exit code 1.
#[test]
fn check_config_verifies_without_touching_the_running_node() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    let [a, b] = mesh.hosts(["a", "b"])?;
    let meshd = mesh.bins().meshd.to_str().context("path")?.to_string();
    let check = |config: &std::path::Path| -> Result<mesh_tests::Output> {
        a.exec(
            &meshd,
            &["check-config", "--config", config.to_str().context("path")?],
        )
    };
    let config = a.config_path();
    let ok = check(&config)?;
    assert_eq!(ok.code, Some(0), "{ok:?}");
    let out = ok.stdout_str();
    assert!(
        out.contains(": ok: spiffe://t/a on ") && out.contains("1 peer(s)"),
        "{out}"
    );
    a.ping(b.overlay_v4())?;

    let text = std::fs::read_to_string(&config)?;
    let broken = a.dir().join("broken.toml");
    std::fs::write(&broken, text.replacen("[node]\n", "[node]\nmtu = 100\n", 1))?;
    let bad = check(&broken)?;
    assert_eq!(bad.code, Some(1), "{bad:?}");
    let err = bad.stderr_str();
    assert!(
        err.trim_end()
            .ends_with("broken.toml:2: node.mtu: 100 is out of range 1280..=9000")
            && err.lines().count() == 1,
        "{err}"
    );
    assert!(a.meshd_alive()?);
    a.ping(b.overlay_v4())?;
    Ok(())
}

#[test]
fn endpoint_learned_from_a_peer_survives_a_restart() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    let b = mesh.host("b").peers(PeerSet::None).up()?;
    let a = mesh.host("a").peers(PeerSet::None).up()?;
    a.peer_add(&b)?;
    // b has a's certificate but no endpoint for it: it learns one from a's handshake.
    let cert = b.dir().join("a.crt");
    std::fs::write(&cert, a.cert_pem())?;
    b.meshctl(&["peer", "add", cert.to_str().context("path")?])?
        .check()?;
    let endpoint_of_a = |h: &Host| -> Result<Option<String>> {
        Ok(h.status()?
            .peer(a.identity())
            .context("b lists a")?
            .endpoint
            .clone())
    };
    assert_eq!(endpoint_of_a(&b)?, None);
    a.ping(b.overlay_v4())?;
    let learned = Some(a.endpoint().to_string());
    assert_eq!(endpoint_of_a(&b)?, learned);
    restart_cleanly(&b)?;
    assert_eq!(endpoint_of_a(&b)?, learned, "{}", b.log());
    // b speaks first: only the endpoint it learned before the restart can carry it.
    b.ping(a.overlay_v4())?;
    // An endpoint the operator sets since wins over the learned one (here: the same
    // address, so the learned entry no longer applies and traffic still flows).
    b.peer_add(&a)?;
    restart_cleanly(&b)?;
    assert_eq!(endpoint_of_a(&b)?, learned);
    let state = std::fs::read_to_string(b.dir().join("state/endpoints.json"))?;
    assert!(!state.contains("spiffe://t/a"), "{state}");
    b.ping(a.overlay_v4())?;
    Ok(())
}

#[test]
fn kill_9_and_restart_resumes_traffic() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    let [a, b, c] = mesh.hosts(["a", "b", "c"])?;
    serve_all(&[&a, &b, &c])?;
    assert_reaches(&a, &b)?;
    assert_reaches(&b, &a)?;
    assert_reaches(&c, &a)?;
    b.kill_meshd()?;
    assert_cut_off(&a, b.overlay_v4())?;
    b.start()?;
    assert_reaches(&b, &a)?;
    assert_reaches(&a, &b)?;
    assert_reaches(&c, &b)?;
    // a and c never restarted and still talk.
    assert_reaches(&c, &a)?;
    Ok(())
}

#[test]
fn moved_host_resumes_traffic() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    let [a, b] = mesh.hosts(["a", "b"])?;
    serve_all(&[&a, &b])?;
    assert_reaches(&a, &b)?;
    let new = Ipv4Addr::new(198, 19, 0, b.index() as u8);
    b.move_underlay(new)?;
    // b speaks first from its new address; a learns it from the authenticated packets.
    assert_reaches(&b, &a)?;
    assert_reaches(&a, &b)?;
    let s = a.status()?;
    let ep = s.peer(b.identity()).and_then(|p| p.endpoint.clone());
    assert_eq!(
        ep.as_deref(),
        Some(format!("{new}:{}", mesh_tests::mesh::MESH_PORT).as_str())
    );
    Ok(())
}

#[test]
fn random_datagrams_are_dropped_and_counted() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    let [a, b] = mesh.hosts(["a", "b"])?;
    serve_all(&[&a, &b])?;
    assert_reaches(&b, &a)?;
    let before = a.status()?.total_drops();
    const COUNT: u64 = 5000;
    b.send_garbage(a.endpoint(), COUNT as u32, 0x5eed)?;
    let after = wait::until("a to count the garbage", Duration::from_secs(10), || {
        let n = a.status()?.total_drops();
        Ok((n >= before + COUNT).then_some(n))
    });
    let now = a.status()?;
    assert!(
        after.is_ok(),
        "sent {COUNT} random datagrams, drops went from {before} to {}: {:?}",
        now.total_drops(),
        now.drops
    );
    assert!(a.meshd_alive()?, "meshd died:\n{}", a.log());
    assert_reaches(&b, &a)?;
    assert_reaches(&a, &b)?;
    Ok(())
}

#[test]
fn malformed_control_requests_get_an_error_and_change_nothing() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    let [a, b] = mesh.hosts(["a", "b"])?;
    serve_all(&[&a, &b])?;
    assert_reaches(&a, &b)?;
    let state_before = snapshot(&a.dir().join("state"))?;
    let peers_before: Vec<String> = a
        .status()?
        .peers
        .iter()
        .map(|p| p.identity.clone())
        .collect();
    let other = mesh.other_ca("t")?;
    let foreign = other.issue(
        "spiffe://t/x",
        &[IpAddr::V4(Ipv4Addr::new(100, 64, 7, 7))],
        &[],
        None,
        Validity::Current,
    )?;
    // Each with the kind of error the contract gives it (mesh_proto::control).
    let requests: Vec<(Vec<u8>, &str)> = vec![
        (b"not json".to_vec(), "bad_request"),
        (b"{}".to_vec(), "bad_request"),
        (b"[1,2,3]".to_vec(), "bad_request"),
        (b"{\"op\":\"no_such_op\"}".to_vec(), "bad_request"),
        (b"{\"op\":\"status\",\"extra\":1}".to_vec(), "bad_request"),
        (
            b"{\"op\":\"peer_add\",\"cert\":\"garbage\"}".to_vec(),
            "refused",
        ),
        (
            serde_json::json!({"op": "peer_add", "cert": foreign.cert_pem})
                .to_string()
                .into_bytes(),
            "refused",
        ),
        (
            serde_json::json!({"op": "peer_add", "cert": b.cert_pem(), "endpoint": "nowhere"})
                .to_string()
                .into_bytes(),
            "bad_request",
        ),
        (
            b"{\"op\":\"peer_remove\",\"identity\":\"not an id\"}".to_vec(),
            "refused",
        ),
        (
            b"{\"op\":\"peer_remove\",\"identity\":\"spiffe://t/nobody\"}".to_vec(),
            "not_found",
        ),
        (vec![0xff, 0xfe, 0x00, 0x01], "bad_request"),
    ];
    for (req, kind) in &requests {
        let reply = a.control_raw(req)?;
        let v: serde_json::Value = serde_json::from_str(&reply).with_context(|| {
            format!(
                "reply to {:?} is not JSON: {reply:?}",
                String::from_utf8_lossy(req)
            )
        })?;
        assert_eq!(
            v["ok"],
            false,
            "request {:?}: {reply}",
            String::from_utf8_lossy(req)
        );
        let err = v["error"].as_str().unwrap_or_default();
        assert!(
            !err.is_empty() && !err.contains('\n'),
            "request {:?}: {reply}",
            String::from_utf8_lossy(req)
        );
        assert_eq!(
            v["kind"],
            *kind,
            "request {:?}: {reply}",
            String::from_utf8_lossy(req)
        );
    }
    let peers_after: Vec<String> = a
        .status()?
        .peers
        .iter()
        .map(|p| p.identity.clone())
        .collect();
    assert_eq!(peers_before, peers_after);
    assert!(
        state_before == snapshot(&a.dir().join("state"))?,
        "the persisted state changed"
    );
    assert!(a.meshd_alive()?);
    assert_reaches(&a, &b)?;
    assert_reaches(&b, &a)?;
    Ok(())
}

#[test]
fn peers_added_and_removed_at_runtime_persist_across_restart() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    let a = mesh.host("a").peers(PeerSet::None).up()?;
    let b = mesh.host("b").peers(PeerSet::None).up()?;
    serve_all(&[&a, &b])?;
    assert!(a.status()?.peers.is_empty());
    assert_cut_off(&a, b.overlay_v4())?;
    a.peer_add(&b)?;
    b.peer_add(&a)?;
    let list = a.meshctl(&["peer", "list"])?.check()?;
    assert!(list.stdout_str().contains(b.identity()), "{list:?}");
    assert_reaches(&a, &b)?;
    // A clean restart keeps the peer (persisted in the state directory, not the config).
    restart_cleanly(&a)?;
    assert!(a.status()?.peer(b.identity()).is_some());
    assert_reaches(&a, &b)?;
    // Removal cuts traffic and also survives a restart.
    a.peer_remove(b.identity())?.check()?;
    assert!(a.status()?.peer(b.identity()).is_none());
    assert_cut_off(&a, b.overlay_v4())?;
    restart_cleanly(&a)?;
    assert!(a.status()?.peer(b.identity()).is_none());
    assert_cut_off(&a, b.overlay_v4())?;
    Ok(())
}

/// SIGTERM: meshd exits and removes its TUN and control socket; then start again.
fn restart_cleanly(h: &Host) -> Result<()> {
    h.stop_meshd()?;
    ensure!(
        !h.socket_path().exists(),
        "control socket left behind after SIGTERM"
    );
    let out = h.exec("ip", &["link", "show", "mesh0"])?;
    ensure!(!out.success(), "TUN left behind after SIGTERM: {out:?}");
    h.start()
}

#[test]
fn control_socket_is_owner_only() -> mesh_tests::Result {
    use std::os::unix::fs::PermissionsExt;
    let mut mesh = mesh_tests::mesh!();
    let a = mesh.host("a").up()?;
    let mode = std::fs::metadata(a.socket_path())?.permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "control socket mode {mode:o}");
    // Another user cannot use it.
    let meshctl = mesh.bins().meshctl.to_str().unwrap_or_default().to_string();
    let sock = a.socket_path().to_str().unwrap_or_default().to_string();
    let out = a.exec(
        "setpriv",
        &[
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            &meshctl,
            "--socket",
            &sock,
            "status",
        ],
    )?;
    assert!(!out.success(), "another user read the status: {out:?}");
    assert!(
        out.stderr_str().contains("ermission denied"),
        "refused for another reason: {out:?}"
    );
    Ok(())
}
