//! Layer 3/4 authorization policy (issue 4, "Must show") with real meshd processes in
//! network namespaces: default deny, one identity on one port, deny over allow, cutting
//! established connections, refused policies, persistence, bad input, the decision log
//! and the counters.
//!
//! The server host is `c` (it carries the policy); `a` and `b` are clients with the
//! identities `spiffe://t/a` and `spiffe://t/b`.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use mesh_tests::{wait, Host};

mesh_tests::isolate!();

const HTTP: u16 = 8080;
const HTTP_OTHER: u16 = 8081;
const UDP_ECHO: u16 = 7000;
const ECHO: u16 = 9000;

/// `a` may open TCP connections to port 8080; nothing else is allowed.
const ALLOW_A_8080: &str = r#"
[[policy]]
name = "a-web"
action = "allow"

[[policy.rule]]
name = "a-8080"
from = [{ identities = ["spiffe://t/a"] }]
to = [{ ports = [8080], protocols = ["tcp"] }]

[[test]]
name = "a reaches the web port"
from = "spiffe://t/a"
to_port = 8080
expect = "allow"

[[test]]
name = "b does not"
from = "spiffe://t/b"
to_port = 8080
expect = "deny"
expect_reason = "no_allow_matched"
"#;

/// Only `b`, on port 8080.
const ALLOW_B_8080: &str = r#"
[[policy]]
name = "b-web"
action = "allow"

[[policy.rule]]
name = "b-8080"
from = [{ identities = ["spiffe://t/b"] }]
to = [{ ports = [8080] }]

[[test]]
name = "b reaches the web port"
from = "spiffe://t/b"
to_port = 8080
expect = "allow"

[[test]]
name = "a no longer does"
from = "spiffe://t/a"
to_port = 8080
expect = "deny"
"#;

/// Serves `/<name>.txt` over HTTP on `port`.
fn serve(h: &Host, port: u16) -> Result<()> {
    h.write_www(&format!("{}.txt", h.name()), h.name().as_bytes())?;
    h.serve_http(port)
}

/// `src` gets `dst`'s page on `port` (retried while the first handshake completes).
fn assert_http_ok(src: &Host, dst: &Host, port: u16) -> Result<()> {
    let r = src
        .http_get_eventually(dst.overlay_v4(), port, &format!("/{}.txt", dst.name()))
        .with_context(|| format!("{} -> {}:{port}", src.name(), dst.name()))?;
    ensure!(
        r.status == 200 && r.body == dst.name().as_bytes(),
        "{} -> {}:{port}: {} {:?}",
        src.name(),
        dst.name(),
        r.status,
        String::from_utf8_lossy(&r.body)
    );
    Ok(())
}

/// No TCP connection from `src` to `dst:port` completes within 3 s.
fn assert_http_blocked(src: &Host, dst: IpAddr, port: u16) -> Result<()> {
    let r = src.http_get_limit(dst, port, "/", Duration::from_secs(3));
    ensure!(
        r.is_err(),
        "{} reached {dst}:{port} over HTTP: {r:?}",
        src.name()
    );
    Ok(())
}

fn assert_udp_blocked(src: &Host, dst: IpAddr) -> Result<()> {
    let out = src.udp_echo_once(dst, UDP_ECHO)?;
    ensure!(!out.success(), "{} got a UDP echo from {dst}", src.name());
    Ok(())
}

fn assert_ping_blocked(src: &Host, dst: IpAddr) -> Result<()> {
    let out = src.ping_once(dst, 3)?;
    ensure!(!out.success(), "{} pinged {dst}: {out:?}", src.name());
    Ok(())
}

/// A connected UDP socket on `src` sending to a closed port `dst:port` learns that
/// the port is closed: the ICMP port-unreachable error got back to `src`.
fn assert_udp_refused(src: &Host, dst: IpAddr, port: u16) -> Result<()> {
    let script = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1)
s.connect((sys.argv[1], int(sys.argv[2])))
for _ in range(3):
    s.send(b'x')
    try:
        s.recv(16)
    except ConnectionRefusedError:
        print('refused'); sys.exit(0)
    except socket.timeout:
        pass
print('no ICMP error came back'); sys.exit(1)
"#;
    let out = src.exec(
        "python3",
        &["-c", script, &dst.to_string(), &port.to_string()],
    )?;
    ensure!(out.success(), "{} -> {dst}:{port}/udp: {out:?}", src.name());
    Ok(())
}

/// Every file under `dir` with its bytes (the daemon's persisted state).
fn snapshot(dir: &Path) -> Result<BTreeMap<PathBuf, Vec<u8>>> {
    let mut out = BTreeMap::new();
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

/// The policy in force on `h`, as `meshctl status --json` reports it.
fn policy_in_force(h: &Host) -> Result<serde_json::Value> {
    Ok(h.enforcement()?["policy"].clone())
}

#[test]
fn default_deny_with_nothing_allowed_blocks_all_traffic() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    let c = mesh.host("c").policy("deny", "policy = []\n").up()?;
    let [a, b] = mesh.hosts(["a", "b"])?;
    serve(&c, HTTP)?;
    c.serve_udp_echo(UDP_ECHO)?;
    serve(&a, HTTP)?;
    // c may still reach out: a has no policy, and the replies c receives belong to
    // flows c opened (connection tracking), so they pass c's default deny.
    assert_http_ok(&c, &a, HTTP)?;
    c.ping(a.overlay_v4())?;
    a.serve_udp_echo(UDP_ECHO)?;
    c.udp_echo(a.overlay_v4(), UDP_ECHO)?;
    // An ICMP error about a flow c opened (port unreachable) is let in with it.
    assert_udp_refused(&c, a.overlay_v4(), UDP_ECHO + 1)?;
    // Nothing reaches c: TCP, UDP, ICMP, from either identity, over either family.
    for src in [&a, &b] {
        for dst in [c.overlay_v4(), c.overlay_v6()] {
            assert_http_blocked(src, dst, HTTP)?;
        }
        assert_udp_blocked(src, c.overlay_v4())?;
        assert_ping_blocked(src, c.overlay_v4())?;
    }
    // Each was refused by the mesh default, and the log says so.
    for (src, proto) in [(&a, "tcp"), (&b, "tcp"), (&a, "udp"), (&a, "icmp")] {
        c.wait_decision(&[
            ("src", src.identity()),
            ("proto", proto),
            ("decision", "deny"),
            ("reason", "default_deny"),
        ])?;
    }
    let d = c.decisions()?;
    d.assert_contains(&[
        ("src", "spiffe://t/b"),
        ("dst_port", &HTTP.to_string()),
        ("src_addr", &b.overlay_v4().to_string()),
    ]);
    let e = c.enforcement()?;
    assert!(
        e["counters"]["drops"]["default_deny"].as_u64().unwrap_or(0) > 0,
        "no default_deny counter: {e}"
    );
    Ok(())
}

#[test]
fn allow_for_one_identity_on_one_port_lets_exactly_that_through() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    let c = mesh.host("c").policy("deny", ALLOW_A_8080).up()?;
    let [a, b] = mesh.hosts(["a", "b"])?;
    serve(&c, HTTP)?;
    serve(&c, HTTP_OTHER)?;
    c.serve_udp_echo(UDP_ECHO)?;
    // Exactly that: a to 8080 over TCP, with the replies.
    assert_http_ok(&a, &c, HTTP)?;
    assert_http_ok(&a, &c, HTTP)?;
    // Not another port, protocol or identity.
    assert_http_blocked(&a, c.overlay_v4(), HTTP_OTHER)?;
    assert_udp_blocked(&a, c.overlay_v4())?;
    assert_ping_blocked(&a, c.overlay_v4())?;
    b.ping(a.overlay_v4())?; // b's sessions work; only policy stops it at c
    assert_http_blocked(&b, c.overlay_v4(), HTTP)?;
    // The decision log shows each deny with who, where and why.
    let port = HTTP.to_string();
    let other = HTTP_OTHER.to_string();
    c.wait_decision(&[
        ("src", "spiffe://t/b"),
        ("dst_port", &port),
        ("decision", "deny"),
        ("reason", "no_allow_matched"),
    ])?;
    let d = c.decisions()?;
    d.assert_contains(&[
        ("src", "spiffe://t/a"),
        ("dst_port", &other),
        ("proto", "tcp"),
    ]);
    d.assert_contains(&[
        ("src", "spiffe://t/a"),
        ("proto", "udp"),
        ("decision", "deny"),
    ]);
    d.assert_contains(&[
        ("src", "spiffe://t/a"),
        ("proto", "icmp"),
        ("decision", "deny"),
    ]);
    // Allowed traffic is not logged as denied.
    d.assert_none(&[
        ("src", "spiffe://t/a"),
        ("dst_port", &port),
        ("decision", "deny"),
    ]);
    // The operator's text view names the denied identity and the reason.
    let text = c.meshctl(&["log"])?.check()?.stdout_str();
    assert!(
        text.lines()
            .any(|l| l.contains("spiffe://t/b") && l.contains("no_allow_matched")),
        "`meshctl log`:\n{text}"
    );
    // Counters per policy and rule.
    assert!(
        c.rule_count("a-web", "a-8080", "allow")? >= 1,
        "{}",
        c.enforcement()?
    );
    Ok(())
}

#[test]
fn a_deny_overrides_an_allow() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    let policy = r#"
[[policy]]
name = "everyone-web"
action = "allow"
[[policy.rule]]
from = [{ identities = ["*"] }]
to = [{ ports = [8080] }]

[[policy]]
name = "block-a"
action = "deny"
[[policy.rule]]
name = "a"
from = [{ identities = ["spiffe://t/a"] }]

[[test]]
from = "spiffe://t/b"
to_port = 8080
expect = "allow"

[[test]]
from = "spiffe://t/a"
to_port = 8080
expect = "deny"
expect_policy = "block-a"
"#;
    let c = mesh.host("c").policy("deny", policy).up()?;
    let [a, b] = mesh.hosts(["a", "b"])?;
    serve(&c, HTTP)?;
    assert_http_ok(&b, &c, HTTP)?;
    a.ping(b.overlay_v4())?;
    // `meshctl log -f` shows a deny live. It starts with the last line of the log (b
    // to a port nobody may use); once that is printed it follows.
    assert_http_blocked(&b, c.overlay_v4(), HTTP_OTHER)?;
    c.wait_decision(&[("src", "spiffe://t/b"), ("reason", "no_allow_matched")])?;
    let sock = c.socket_path();
    let sock = sock.to_str().context("path")?;
    c.spawn(
        "follow",
        &mesh.bins().meshctl,
        &["--socket", sock, "--json", "log", "-f", "-n", "1"],
    )?;
    c.wait_background_output("follow", "no_allow_matched")?;
    assert_http_blocked(&a, c.overlay_v4(), HTTP)?;
    c.wait_background_output("follow", "explicit_deny")?;
    c.wait_decision(&[
        ("src", "spiffe://t/a"),
        ("decision", "deny"),
        ("reason", "explicit_deny"),
        ("policy", "block-a"),
        ("rule", "a"),
    ])?;
    assert!(c.rule_count("block-a", "a", "deny")? >= 1);
    assert!(c.rule_count("everyone-web", "0", "allow")? >= 1);
    Ok(())
}

#[test]
fn a_stricter_policy_cuts_an_established_connection() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    let both = r#"
[[policy]]
name = "a-in"
action = "allow"
[[policy.rule]]
from = [{ identities = ["spiffe://t/a"] }]
to = [{ ports = [8080, 9000] }]
"#;
    let c = mesh.host("c").policy("deny", both).up()?;
    let a = mesh.host("a").up()?;
    serve(&c, HTTP)?;
    c.serve_tcp_echo(ECHO)?;
    assert_http_ok(&a, &c, HTTP)?;
    a.hold_tcp("hold", c.overlay_v4(), ECHO)?;
    // Only 8080 now: the open connection to 9000 is forbidden and is cut at once (a TCP
    // reset to both ends), not left to time out.
    let stricter = both.replace("[8080, 9000]", "[8080]");
    let started = mesh_tests::wait::now();
    c.apply_policy(&stricter)?.check()?;
    a.wait_background_output("hold", "ended")?;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "the cut took {took:?}");
    // The server's end was reset too.
    mesh_tests::wait::until(
        "the echo server's connection to end",
        Duration::from_secs(5),
        || {
            let out = c.run("ss", &["-Htn", "state", "established", "sport = :9000"])?;
            Ok(out.stdout_str().trim().is_empty().then_some(()))
        },
    )?;
    // New connections to 9000 are refused; 8080 still works.
    let r = a.exec(
        "timeout",
        &[
            "3",
            "bash",
            "-c",
            &format!("echo x > /dev/tcp/{}/{ECHO}", c.overlay_v4()),
        ],
    )?;
    assert!(!r.success(), "a opened a new connection to 9000: {r:?}");
    assert_http_ok(&a, &c, HTTP)?;
    Ok(())
}

#[test]
fn a_policy_whose_tests_fail_is_refused_and_the_old_one_stays() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    let c = mesh.host("c").policy("deny", ALLOW_A_8080).up()?;
    let [a, b] = mesh.hosts(["a", "b"])?;
    serve(&c, HTTP)?;
    assert_http_ok(&a, &c, HTTP)?;
    let before = policy_in_force(&c)?;
    let state = snapshot(&c.dir().join("state"))?;
    // Valid, but its own test case contradicts it.
    let broken = format!(
        "{ALLOW_B_8080}\n[[test]]\nname = \"a keeps access\"\nfrom = \"spiffe://t/a\"\n\
         to_port = 8080\nexpect = \"allow\"\n"
    );
    let out = c.apply_policy(&broken)?;
    assert!(
        !out.success(),
        "a policy with a failing test was applied: {out:?}"
    );
    let err = out.stderr_str();
    assert_eq!(err.trim().lines().count(), 1, "not one line: {err:?}");
    assert!(
        err.contains("a keeps access") || err.contains("test"),
        "the error does not name the failing test: {err:?}"
    );
    // The old policy is in force, in memory and on disk.
    assert_eq!(policy_in_force(&c)?, before);
    assert!(
        state == snapshot(&c.dir().join("state"))?,
        "persisted state changed"
    );
    assert_http_ok(&a, &c, HTTP)?;
    assert_http_blocked(&b, c.overlay_v4(), HTTP)?;
    Ok(())
}

#[test]
fn a_restart_keeps_the_applied_policy() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    let c = mesh.host("c").policy("deny", ALLOW_A_8080).up()?;
    let [a, b] = mesh.hosts(["a", "b"])?;
    serve(&c, HTTP)?;
    assert_http_ok(&a, &c, HTTP)?;
    // Apply b-only at run time: it replaces the configured file's policy.
    c.apply_policy(ALLOW_B_8080)?.check()?;
    assert_http_ok(&b, &c, HTTP)?;
    assert_http_blocked(&a, c.overlay_v4(), HTTP)?;
    let applied = policy_in_force(&c)?;
    assert_eq!(applied["origin"], "applied", "{applied}");
    // No clean shutdown: the policy was persisted when it was applied.
    c.kill_meshd()?;
    c.start()?;
    // The log says which policy is in force and why the file is not.
    assert!(
        c.log()
            .contains("policy in force: the one applied at run time"),
        "no word on the applied policy shadowing policy.file"
    );
    let after = policy_in_force(&c)?;
    assert_eq!(after["name"], applied["name"], "{after}");
    assert_eq!(after["origin"], "applied", "{after}");
    assert_http_ok(&b, &c, HTTP)?;
    assert_http_blocked(&a, c.overlay_v4(), HTTP)?;
    // a's attempt reached the new daemon and was refused by the applied policy.
    c.wait_decision(&[
        ("src", "spiffe://t/a"),
        ("dst_port", &HTTP.to_string()),
        ("decision", "deny"),
    ])?;
    Ok(())
}

#[test]
fn bad_policy_input_gets_a_clear_error_and_changes_nothing() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    let c = mesh.host("c").policy("deny", ALLOW_A_8080).up()?;
    let [a, b] = mesh.hosts(["a", "b"])?;
    serve(&c, HTTP)?;
    assert_http_ok(&a, &c, HTTP)?;
    let before = policy_in_force(&c)?;
    let state = snapshot(&c.dir().join("state"))?;
    let rule = |from: &str| {
        format!("[[policy]]\nname = \"p\"\naction = \"allow\"\n[[policy.rule]]\nfrom = [{{ {from} }}]\n")
    };
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "invalid TOML",
            "[[policy]\nname = \"p\"\n".to_string(),
            ":1",
        ),
        (
            "unknown field",
            rule("identites = [\"spiffe://t/a\"]"),
            "identites",
        ),
        (
            "bad CIDR",
            rule("addresses = [\"10.0.0.0/33\"]"),
            "10.0.0.0/33",
        ),
        (
            "bad identity",
            rule("identities = [\"spiffe://\"]"),
            "identities",
        ),
        ("empty file", String::new(), "no [[policy]]"),
    ];
    for (what, source, needle) in &cases {
        // Through meshctl, as an operator would.
        let out = c.apply_policy(source)?;
        assert!(!out.success(), "{what}: applied: {out:?}");
        let err = out.stderr_str();
        let err = err.trim();
        assert_eq!(err.lines().count(), 1, "{what}: not one line: {err:?}");
        assert!(err.contains(needle), "{what}: {err:?} lacks {needle:?}");
        assert!(
            err.contains("apply-"),
            "{what}: {err:?} does not name the file"
        );
        // Straight to the daemon, past meshctl's own check.
        let req = serde_json::json!({"op": "policy_apply", "source": source, "name": "bad.toml"});
        let reply = c.control_raw(req.to_string().as_bytes())?;
        let v: serde_json::Value = serde_json::from_str(&reply)?;
        assert_eq!(v["ok"], false, "{what}: the daemon accepted it: {reply}");
        let e = v["error"].as_str().unwrap_or_default();
        assert!(
            !e.is_empty() && !e.contains('\n') && e.contains("bad.toml"),
            "{what}: daemon error {e:?}"
        );
    }
    // Nothing changed: the policy in force, the persisted state, the traffic.
    assert_eq!(policy_in_force(&c)?, before);
    assert!(
        state == snapshot(&c.dir().join("state"))?,
        "persisted state changed"
    );
    assert!(c.meshd_alive()?);
    assert_http_ok(&a, &c, HTTP)?;
    assert_http_blocked(&b, c.overlay_v4(), HTTP)?;
    Ok(())
}

#[test]
fn audit_rules_log_without_changing_the_decision() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    let policy = r#"
# mesh default: allow
[[policy]]
name = "watch-web"
action = "audit"
[[policy.rule]]
name = "web"
to = [{ ports = [8080] }]

[[policy]]
name = "no-8081"
action = "deny"
[[policy.rule]]
to = [{ ports = [8081] }]
"#;
    let c = mesh.host("c").policy("allow", policy).up()?;
    let a = mesh.host("a").up()?;
    serve(&c, HTTP)?;
    serve(&c, HTTP_OTHER)?;
    assert_http_ok(&a, &c, HTTP)?;
    assert_http_blocked(&a, c.overlay_v4(), HTTP_OTHER)?;
    let d = c.wait_decision(&[
        ("src", "spiffe://t/a"),
        ("decision", "audit"),
        ("policy", "watch-web"),
        ("rule", "web"),
        ("dst_port", &HTTP.to_string()),
    ])?;
    d.assert_contains(&[
        ("src", "spiffe://t/a"),
        ("decision", "deny"),
        ("reason", "explicit_deny"),
        ("policy", "no-8081"),
        ("dst_port", &HTTP_OTHER.to_string()),
    ]);
    // A decision line carries time, who (identity and address), where and what.
    let rec = d.matching(&[("decision", "audit")])[0].clone();
    for key in [
        "time", "src", "src_addr", "dst_addr", "dst_port", "proto", "decision",
    ] {
        assert!(
            mesh_tests::policy::field(&rec, key).is_some(),
            "{key} missing: {rec}"
        );
    }
    assert_eq!(rec["src_addr"], a.overlay_v4().to_string());
    assert_eq!(rec["dst_addr"], c.overlay_v4().to_string());
    assert!(c.rule_count("watch-web", "web", "audit")? >= 1);
    assert!(c.rule_count("no-8081", "0", "deny")? >= 1);
    Ok(())
}

#[test]
fn groups_selectors_and_address_blocks_decide_sources() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    let policy = r#"
[[policy]]
name = "ops-in"
action = "allow"
selector = { identities = ["spiffe://t/c"] }
[[policy.rule]]
name = "ops"
from = [{ groups = ["ops"] }]
to = [{ ports = [8080] }]

[[policy]]
name = "elsewhere"
action = "allow"
selector = { identities = ["spiffe://t/other"] }
[[policy.rule]]
from = [{ identities = ["spiffe://t/b"] }]
"#;
    let c = mesh.host("c").policy("deny", policy).up()?;
    let a = mesh.host("a").groups(&["ops"]).up()?;
    let b = mesh.host("b").up()?;
    serve(&c, HTTP)?;
    // a's certificate says ops; b's says nothing, and the policy that would let b in
    // selects another workload.
    assert_http_ok(&a, &c, HTTP)?;
    b.ping(a.overlay_v4())?;
    assert_http_blocked(&b, c.overlay_v4(), HTTP)?;
    c.wait_decision(&[("src", "spiffe://t/b"), ("reason", "no_allow_matched")])?;
    // Now deny a's overlay address block, at run time.
    let deny_a = format!(
        "{policy}\n[[policy]]\nname = \"quarantine\"\naction = \"deny\"\n[[policy.rule]]\n\
         from = [{{ addresses = [\"{}/32\"] }}]\n",
        a.overlay_v4()
    );
    c.apply_policy(&deny_a)?.check()?;
    assert_http_blocked(&a, c.overlay_v4(), HTTP)?;
    c.wait_decision(&[
        ("src", "spiffe://t/a"),
        ("reason", "explicit_deny"),
        ("policy", "quarantine"),
    ])?;
    Ok(())
}

#[test]
fn renewed_certificates_take_effect_on_the_running_session() -> mesh_tests::Result {
    use mesh_tests::ca::Validity;
    let mut mesh = mesh_tests::mesh!();
    let policy = r#"
[[policy]]
name = "ops-in"
action = "allow"
[[policy.rule]]
from = [{ groups = ["ops"] }]
to = [{ ports = [8080, 9000] }]
"#;
    let c = mesh.host("c").policy("deny", policy).up()?;
    let a = mesh.host("a").up()?;
    serve(&c, HTTP)?;
    // A session between them; a's certificate names no group, so c refuses it.
    c.ping(a.overlay_v4())?;
    assert_http_blocked(&a, c.overlay_v4(), HTTP)?;
    let before = a.status()?.node().context("no node workload")?.not_after;

    // a's certificate renewed for its key, now in group ops and ending two days on:
    // a takes it from its file, c with `peer add`. No new handshake on the way.
    let handshakes = mesh.capture_underlay("udp")?;
    let end = a.renew_cert(&["ops"], Validity::EndsIn(2 * 86_400))?;
    assert!(end.0 != before, "the renewal did not change the end");
    c.peer_add(&a)?;
    wait::until(
        "a and c to hold the renewed certificate",
        Duration::from_secs(10),
        || {
            let on_a = a.status()?.node().map(|n| n.not_after) == Some(end.0);
            let on_c = c.status()?.peer(a.identity()).map(|p| p.not_after) == Some(end.0);
            Ok((on_a && on_c).then_some(()))
        },
    )
    .with_context(|| a.log())?;
    assert_http_ok(&a, &c, HTTP)?;
    let node = a.status()?.node().cloned().context("no node workload")?;
    assert!(node.groups == ["ops"], "{node:?}");
    assert!(
        a.log().contains("node certificate renewed"),
        "no log line:\n{}",
        a.log()
    );
    // WireGuard handshake initiations: message type 1, the first byte after the UDP header.
    let initiations = handshakes.finish_packets("udp[8] = 1")?;
    assert!(initiations.is_empty(), "new handshakes: {initiations:?}");

    // A certificate for another identity written over a's: refused, logged, and the
    // renewed one stays in force.
    let other = mesh.ca().issue(
        "spiffe://t/z",
        &[a.overlay_v4(), a.overlay_v6()],
        &[],
        Some(&a.public_key()),
        Validity::Current,
    )?;
    std::fs::write(a.cert_path(), &other.cert_pem)?;
    let line = wait::until("the refusal in a's log", Duration::from_secs(10), || {
        Ok(a.log()
            .lines()
            .find(|l| l.contains("node certificate not renewed"))
            .map(str::to_string))
    })?;
    assert!(
        line.contains("names spiffe://t/z, not this node's spiffe://t/a"),
        "{line}"
    );
    // So is one with other addresses.
    let moved = mesh.ca().issue(
        "spiffe://t/a",
        &[a.overlay_v4()],
        &["ops".to_string()],
        Some(&a.public_key()),
        Validity::Current,
    )?;
    std::fs::write(a.cert_path(), &moved.cert_pem)?;
    let line = wait::until("the second refusal", Duration::from_secs(10), || {
        Ok(a.log()
            .lines()
            .find(|l| l.contains("node certificate not renewed") && l.contains("addresses"))
            .map(str::to_string))
    })?;
    assert!(line.contains("change only by a restart"), "{line}");
    assert!(a.status()?.node().map(|n| n.not_after) == Some(end.0));
    assert_http_ok(&a, &c, HTTP)?;

    // Renewed once more, without ops: the connection a holds open is cut once c takes
    // the certificate, as after a policy change, and new ones are refused.
    c.serve_tcp_echo(ECHO)?;
    a.hold_tcp("held", c.overlay_v4(), ECHO)?;
    let end = a.renew_cert(&[], Validity::EndsIn(3 * 86_400))?;
    c.peer_add(&a)?;
    a.wait_background_output("held", "ended: reset")?;
    assert_eq!(
        c.status()?.peer(a.identity()).map(|p| p.not_after),
        Some(end.0)
    );
    assert_http_blocked(&a, c.overlay_v4(), HTTP)?;
    Ok(())
}

#[test]
fn removing_a_peer_resets_the_connections_it_opened() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    let c = mesh.host("c").up()?;
    let a = mesh.host("a").up()?;
    c.serve_tcp_echo(ECHO)?;
    a.hold_tcp("held", c.overlay_v4(), ECHO)?;
    // The server's end, as c's kernel sees it.
    let established = || -> Result<usize> {
        let filter = format!("( sport = :{ECHO} )");
        let out = c.run("ss", &["-Htn", "state", "established", &filter])?;
        Ok(out.stdout_str().lines().count())
    };
    assert_eq!(established()?, 1);
    c.peer_remove(a.identity())?.check()?;
    // No packet of a's can reach c any more; c resets its server's end at once rather
    // than leave it to a keepalive, and logs why.
    wait::until("c's end to be reset", Duration::from_secs(10), || {
        Ok((established()? == 0).then_some(()))
    })?;
    c.wait_decision(&[("src", "spiffe://t/a"), ("reason", "identity_removed")])?;
    Ok(())
}
