//! Robustness scenarios with real meshd processes in network namespaces (issues 18
//! and 26): bad input on the underlay without UDP offload, a TUN device or port that
//! is taken, damaged state files, overlapping certificate addresses, the control
//! socket's client slots.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use mesh_tests::{wait, Host};
use sha2::{Digest, Sha256};

mesh_tests::isolate!();

const HTTP: u16 = 8080;

fn random_bytes(n: usize) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut buf = vec![0u8; n];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf)
}

/// A file of `len` random bytes served by `to` arrives at `from` intact, over both
/// overlay families.
fn assert_transfer(from: &Host, to: &Host, len: usize) -> Result<()> {
    let data = random_bytes(len)?;
    let name = format!("{}-{len}.bin", to.name());
    to.write_www(&name, &data)?;
    for addr in [to.overlay_v4(), to.overlay_v6()] {
        let r = from
            .http_get_eventually(addr, HTTP, &format!("/{name}"))
            .with_context(|| format!("{} -> {} at {addr}", from.name(), to.name()))?;
        ensure!(
            r.status == 200 && Sha256::digest(&r.body) == Sha256::digest(&data),
            "{} -> {addr}: status {}, {} of {len} bytes",
            from.name(),
            r.status,
            r.body.len()
        );
    }
    Ok(())
}

fn drops(h: &Host, counter: &str) -> Result<u64> {
    Ok(h.status()?.drops.get(counter).copied().unwrap_or(0))
}

/// Issue 18, weakness 9: without UDP GRO (`udp_offload = false`, as on a kernel that
/// lacks it), a zero-length datagram to meshd's port used to panic the receive worker
/// and stop the daemon. Now it is counted as malformed, like random garbage, and
/// traffic carries on.
#[test]
fn without_udp_offload_empty_datagrams_and_garbage_are_counted_and_traffic_flows(
) -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    let a = mesh.host("a").node_config("udp_offload = false").up()?;
    let b = mesh.host("b").node_config("udp_offload = false").up()?;
    for h in [&a, &b] {
        let log = h.log();
        let said = log.lines().rev().find(|l| l.contains("UDP offload"));
        assert!(
            said.is_some_and(|l| l.contains("gro=false") && l.contains("gso=false")),
            "{}: {said:?}",
            h.name()
        );
        h.serve_http(HTTP)?;
    }
    // Bulk both ways: one datagram per system call on either side.
    assert_transfer(&a, &b, 2 << 20)?;
    assert_transfer(&b, &a, 2 << 20)?;

    let before = drops(&a, "malformed")?;
    b.send_empty_datagrams(a.endpoint(), 3)?;
    // Counted: meshd read them (and is still there to say so).
    wait::until(
        "a to count the empty datagrams",
        Duration::from_secs(10),
        || Ok((drops(&a, "malformed")? >= before + 3).then_some(())),
    )?;
    let before = a.status()?.total_drops();
    b.send_garbage(a.endpoint(), 500, 0x9e37)?;
    wait::until("a to count the garbage", Duration::from_secs(10), || {
        Ok((a.status()?.total_drops() >= before + 500).then_some(()))
    })?;
    assert!(a.meshd_alive()?, "meshd died:\n{}", a.log());
    assert_transfer(&a, &b, 1 << 20)?;
    assert_transfer(&b, &a, 1 << 20)?;
    Ok(())
}

/// Issue 18: sixteen idle root clients used to hold every control-socket slot for a
/// minute. Now the operator's `meshctl` is served at once (it takes the slot of the
/// longest-waiting client), and idle clients are let go within seconds.
#[test]
fn idle_control_clients_do_not_lock_the_operator_out() -> mesh_tests::Result {
    use std::io::Read;
    let mut mesh = mesh_tests::mesh!();
    let a = mesh.host("a").up()?;
    let idle = (0..16)
        .map(|_| std::os::unix::net::UnixStream::connect(a.socket_path()))
        .collect::<std::io::Result<Vec<_>>>()?;
    let s = a.status()?;
    assert!(s.ready, "{s:?}");
    // Every idle client is let go (one for `meshctl status`, the others when their
    // time to send a request is up): each sees the end of its connection.
    for mut c in idle {
        c.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut buf = [0u8; 64];
        assert_eq!(c.read(&mut buf)?, 0, "an idle client kept its connection");
    }
    assert!(a.meshd_alive()?);
    Ok(())
}

/// Issue 18, weakness 5 (admission): a certificate whose addresses overlap another
/// identity's — a peer's, a pod's, the node's own — is refused wherever it enters,
/// naming both identities and prefixes; a renewal (same identity and addresses) is
/// taken as before.
#[test]
fn certificates_overlapping_another_identity_are_refused_where_they_enter() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    let [a, b] = mesh.hosts(["a", "b"])?;
    let pod = mesh.pod(&a, "p1", &[])?;
    let ca = mesh.ca().clone();
    // A certificate (and key) for `identity` over `nets`, in a's directory.
    let issue = |name: &str, nets: &[&str]| -> Result<(String, String)> {
        let nets: Vec<ipnet::IpNet> = nets.iter().map(|n| n.parse()).collect::<Result<_, _>>()?;
        let issued = ca.issue_nets(
            &format!("spiffe://t/{name}"),
            &nets,
            &[],
            None,
            mesh_tests::Validity::Current,
        )?;
        let (crt, key) = (
            a.dir().join(format!("{name}.crt")),
            a.dir().join(format!("{name}.key")),
        );
        std::fs::write(&crt, &issued.cert_pem)?;
        std::fs::write(&key, &issued.key_b64)?;
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        Ok((
            crt.to_str().context("path")?.to_string(),
            key.to_str().context("path")?.to_string(),
        ))
    };
    let refused = |args: &[&str], want: &str| -> Result<()> {
        let out = a.meshctl(args)?;
        ensure!(!out.success(), "{args:?} accepted: {out:?}");
        let err = out.stderr_str();
        ensure!(
            err.contains(want) && err.lines().count() == 1,
            "{args:?}: {err}"
        );
        Ok(())
    };
    let (x, _) = issue("x", &["100.64.0.2/31"])?;
    refused(
        &["peer", "add", &x],
        "address 100.64.0.2/31 of spiffe://t/x overlaps 100.64.0.2/32 of spiffe://t/b",
    )?;
    let (y, _) = issue("y", &["100.65.1.0/24"])?;
    refused(
        &["peer", "add", &y],
        "address 100.65.1.0/24 of spiffe://t/y overlaps 100.65.1.1/32 of spiffe://t/p1",
    )?;
    let (z, _) = issue("z", &["100.64.0.0/30"])?;
    refused(
        &["peer", "add", &z],
        "address 100.64.0.0/30 of spiffe://t/z overlaps 100.64.0.1/32 of spiffe://t/a",
    )?;
    let (w, w_key) = issue("w", &["100.64.0.2/32"])?;
    refused(
        &["workload", "add", "w", "--cert", &w, "--key", &w_key],
        "address 100.64.0.2/32 of spiffe://t/w overlaps 100.64.0.2/32 of spiffe://t/b",
    )?;
    let (v, v_key) = issue("v", &["100.65.1.1/32"])?;
    refused(
        &["workload", "add", "v", "--cert", &v, "--key", &v_key],
        "overlaps 100.65.1.1/32 of spiffe://t/p1",
    )?;
    // Nothing of it was taken.
    let s = a.status()?;
    let peers: Vec<&str> = s.peers.iter().map(|p| p.identity.as_str()).collect();
    let workloads: Vec<&str> = s.workloads.iter().map(|w| w.name.as_str()).collect();
    assert_eq!(peers, ["spiffe://t/b", "spiffe://t/b"], "{s:?}");
    assert_eq!(workloads, ["node", "p1"], "{s:?}");
    // Renewals: the same identities and addresses are taken.
    b.renew_cert(&["renewed"], mesh_tests::Validity::Current)?;
    a.peer_add(&b)?;
    pod.renew_cert(&mesh, &["renewed"], mesh_tests::Validity::Current)?;
    a.ping(b.overlay_v4())?;
    pod.ping(b.overlay_v4())?;
    // In meshd.toml: `meshd check-config` names the file, line and field.
    let mut config = std::fs::read_to_string(a.config_path())?;
    config.push_str("\n[[peer]]\ncert = \"x.crt\"\n");
    let line = config.lines().count();
    let path = a.dir().join("overlap.toml");
    std::fs::write(&path, config)?;
    let meshd = mesh.bins().meshd.to_str().context("path")?.to_string();
    let out = a.exec(
        &meshd,
        &["check-config", "--config", path.to_str().context("path")?],
    )?;
    assert_eq!(out.code, Some(1), "{out:?}");
    let err = out.stderr_str();
    assert!(
        err.contains(&format!("overlap.toml:{line}: peer[1].cert: "))
            && err.contains(
                "address 100.64.0.2/31 of spiffe://t/x overlaps 100.64.0.2/32 of spiffe://t/b"
            ),
        "{err}"
    );
    Ok(())
}

/// The write end of a pipe whose reader is gone (`… | head -1` once head has its
/// line; here before anything is written, so no timing is involved).
fn closed_pipe() -> Result<std::process::Stdio> {
    let mut reader = std::process::Command::new("true")
        .stdin(std::process::Stdio::piped())
        .spawn()?;
    let write_end = reader.stdin.take().context("stdin")?;
    reader.wait()?;
    Ok(write_end.into())
}

/// A copy of `h`'s meshd.toml as `<name>.toml`, for a second meshd beside the first
/// with its own identity (`spiffe://t/<name>`, overlay 100.64.9.9), control socket
/// and state directory, listening on `listen` with TUN `tun`. Returns its path and
/// the lines of `node.listen` and `node.tun`.
fn second_config(
    mesh: &mesh_tests::Mesh,
    h: &Host,
    name: &str,
    listen: &str,
    tun: &str,
) -> Result<(String, usize, usize)> {
    let issued = mesh.ca().issue(
        &format!("spiffe://t/{name}"),
        &["100.64.9.9".parse()?],
        &[],
        None,
        mesh_tests::Validity::Current,
    )?;
    std::fs::write(h.dir().join(format!("{name}.crt")), &issued.cert_pem)?;
    let key = h.dir().join(format!("{name}.key"));
    std::fs::write(&key, &issued.key_b64)?;
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let text = std::fs::read_to_string(h.config_path())?;
    let mut out = String::new();
    let (mut listen_line, mut tun_line) = (0, 0);
    for (i, line) in text.lines().enumerate() {
        let line = if line.starts_with("cert = \"host.crt\"") {
            format!("cert = \"{name}.crt\"")
        } else if line.starts_with("key = \"host.key\"") {
            format!("key = \"{name}.key\"")
        } else if line.starts_with("listen = ") {
            listen_line = i + 1;
            format!("listen = \"{listen}\"")
        } else if line.starts_with("tun = ") {
            tun_line = i + 1;
            format!("tun = \"{tun}\"")
        } else if line.starts_with("control_socket = ") {
            format!("control_socket = \"{name}.sock\"")
        } else if line.starts_with("state_dir = ") {
            format!("state_dir = \"{name}-state\"")
        } else {
            line.to_string()
        };
        out.push_str(&line);
        out.push('\n');
    }
    ensure!(
        listen_line > 0 && tun_line > 0,
        "no listen or tun in {text}"
    );
    let path = h.dir().join(format!("{name}.toml"));
    std::fs::write(&path, out)?;
    Ok((
        path.to_str().context("path")?.to_string(),
        listen_line,
        tun_line,
    ))
}

/// Issue 26, failures 4 and 5: a second meshd beside a running one (its own socket
/// and state directory) used to take over the first one's TUN; a port in use or an
/// address not on this host was found only at start, without the config's file and
/// line. Now both `meshd check-config` and the start refuse, each with one line
/// naming `<file>:<line>: node.tun` or `node.listen`; and a device someone made
/// beforehand is refused rather than taken over.
#[test]
fn a_taken_device_name_or_port_is_refused_naming_the_field() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    let [a, b] = mesh.hosts(["a", "b"])?;
    let meshd = mesh.bins().meshd.to_str().context("path")?.to_string();
    let refused = |config: &str, want: &str| -> Result<()> {
        for args in [
            vec!["check-config", "--config", config],
            vec!["--config", config],
        ] {
            let out = a.exec_timeout(&meshd, &args, Duration::from_secs(20))?;
            ensure!(out.code == Some(1), "meshd {args:?}: {out:?}");
            let err = out.stderr_str();
            let last = err.lines().last().unwrap_or_default();
            ensure!(
                last.starts_with("meshd: ") && last.contains(want),
                "meshd {args:?}: {err}"
            );
        }
        Ok(())
    };
    // The same TUN name, another port.
    let (cfg, _, tun_line) = second_config(&mesh, &a, "tun", "0.0.0.0:51821", "mesh0")?;
    refused(
        &cfg,
        &format!("tun.toml:{tun_line}: node.tun: an interface named mesh0 exists already"),
    )?;
    // The same port, another TUN name.
    let (cfg, listen_line, _) = second_config(&mesh, &a, "port", "0.0.0.0:51820", "mesh1")?;
    refused(
        &cfg,
        &format!("port.toml:{listen_line}: node.listen: cannot listen on UDP 0.0.0.0:51820: "),
    )?;
    refused(&cfg, "another process holds this port (another meshd?)")?;
    // An address this host does not have.
    let (cfg, listen_line, _) = second_config(&mesh, &a, "addr", "198.19.9.9:51821", "mesh1")?;
    refused(&cfg, &format!("addr.toml:{listen_line}: node.listen: "))?;
    refused(&cfg, "the address is not on this host")?;
    // The first meshd is untouched, and its own configuration checks out.
    assert!(a.meshd_alive()?);
    a.ping(b.overlay_v4())?;
    let out = a.exec(
        &meshd,
        &[
            "check-config",
            "--config",
            a.config_path().to_str().context("path")?,
        ],
    )?;
    assert_eq!(out.code, Some(0), "{out:?}");
    // A device somebody made before meshd started (persistent, multi-queue, so that
    // it could be joined): refused, not taken over.
    b.stop_meshd()?;
    b.run(
        "ip",
        &[
            "tuntap",
            "add",
            "dev",
            "mesh0",
            "mode",
            "tun",
            "multi_queue",
        ],
    )?;
    assert!(
        b.start().is_err(),
        "meshd started on a device it did not make"
    );
    assert!(
        b.log()
            .contains("node.tun: an interface named mesh0 exists already"),
        "{}",
        b.log()
    );
    b.run("ip", &["link", "del", "mesh0"])?;
    b.start()?;
    a.ping(b.overlay_v4())?;
    // `meshd check-config | head -1`: quiet when its reader is gone.
    let out = a
        .netns()
        .command(&meshd)
        .args(["check-config", "--config"])
        .arg(a.config_path())
        .stdout(closed_pipe()?)
        .stderr(std::process::Stdio::piped())
        .output()?;
    assert_eq!(out.status.code(), Some(141), "{out:?}");
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Issue 26, failure 6: a state file cut short (a disk or an editor, not meshd: its
/// writes are atomic) used to stop the node until someone acted. Now the node starts
/// on the previous copy, loudly; with no usable copy it refuses with the file named
/// and the way out, and starts once the file is moved away.
#[test]
fn a_damaged_state_file_does_not_keep_the_node_down() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    let a = mesh.host("a").peers(mesh_tests::PeerSet::None).up()?;
    let b = mesh.host("b").peers(mesh_tests::PeerSet::None).up()?;
    let c = mesh.host("c").peers(mesh_tests::PeerSet::None).up()?;
    for (x, y) in [(&a, &b), (&b, &a), (&c, &a), (&a, &c)] {
        x.peer_add(y)?;
    }
    const ALLOW: &str = "[[policy]]\nname = \"all\"\naction = \"allow\"\n[[policy.rule]]\n";
    a.apply_policy(ALLOW)?.check()?;
    a.apply_policy(&ALLOW.replace("\"all\"", "\"all2\""))?
        .check()?;
    a.ping(b.overlay_v4())?;
    let state = a.dir().join("state");
    let (peers, policy) = (state.join("peers.json"), state.join("policy.json"));
    a.stop_meshd()?;
    // Cut short, and emptied.
    let whole = std::fs::read(&peers)?;
    std::fs::write(&peers, &whole[..whole.len() / 2])?;
    std::fs::write(&policy, b"")?;
    a.start()?;
    let log = a.log();
    for f in [&peers, &policy] {
        assert!(
            log.contains(&format!("{}: damaged (", f.display()))
                && log.contains(&format!("using its previous copy {}.prev", f.display())),
            "{log}"
        );
    }
    // The copies before the last change of each: b is a peer (c, added last, is
    // not), and the first policy is in force.
    let s = a.status()?;
    assert!(
        s.peer(b.identity()).is_some() && s.peer(c.identity()).is_none(),
        "{s:?}"
    );
    let status: serde_json::Value =
        serde_json::from_slice(&a.meshctl(&["status", "--json"])?.check()?.stdout)?;
    let source = status["enforcement"]["policy"]["source"]
        .as_str()
        .unwrap_or_default();
    assert!(
        source.contains("name = \"all\"") && !source.contains("all2"),
        "{status}"
    );
    a.ping(b.overlay_v4())?;
    // Redone: the file is whole again, the damaged one kept aside.
    a.peer_add(&c)?;
    assert!(state.join("peers.json.damaged").exists());
    a.ping(c.overlay_v4())?;
    // Damaged, and its copy too: refused, naming the file and the way out.
    a.stop_meshd()?;
    std::fs::write(&peers, b"{\"version\":1,\"added\":[")?;
    std::fs::write(state.join("peers.json.prev"), b"")?;
    assert!(a.start().is_err(), "started on a damaged state file");
    let log = a.log();
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("node.state_dir"))
        .unwrap_or_default();
    assert!(
        line.contains(&format!("{}: damaged (", peers.display()))
            && line.contains("is damaged too")
            && line
                .contains("move it away to start without the peers added and removed at run time"),
        "{log}"
    );
    std::fs::rename(&peers, state.join("peers.json.aside"))?;
    a.start()?;
    assert!(a.status()?.peers.is_empty());
    Ok(())
}
