//! Layer-7 (HTTP/1.x) authorization in the packet path (issue 5, "Must show") with real
//! meshd processes, real curl and a client that reuses one connection. The server on
//! `c` records every request and every byte it reads, so each test can prove that a
//! refused request never reached it.

use std::time::Duration;

use anyhow::{Context, Result};
use mesh_tests::http::RecordingServer;
use mesh_tests::Host;
use sha2::{Digest, Sha256};

mesh_tests::isolate!();

const HTTP: u16 = 8080;

/// `a` may read `/api/*` and `/public/*`, upload to `/upload`, and read `/env/*` only
/// with a production `x-env` header and no `x-debug`; nobody reaches `/admin`.
const POLICY: &str = r#"
[[policy]]
name = "api"
action = "allow"

[[policy.rule]]
name = "read"
from = [{ identities = ["spiffe://t/a"] }]
to = [{ ports = [8080], methods = ["GET"], paths = ["/api/*", "/public/*"] }]

[[policy.rule]]
name = "upload"
from = [{ identities = ["spiffe://t/a"] }]
to = [{ ports = [8080], methods = ["POST"], paths = ["/upload"] }]

[[policy.rule]]
name = "prod-env"
from = [{ identities = ["spiffe://t/a"] }]
to = [{ ports = [8080], methods = ["GET"], paths = ["/env/*"] }]
when = [
  { key = "request.headers[x-env]", values = ["prod", "prod-*"] },
  { key = "request.headers[x-debug]", not_values = ["*"] },
]

[[policy.rule]]
name = "vhost"
from = [{ identities = ["spiffe://t/a"] }]
to = [{ ports = [8080], methods = ["GET"], paths = ["/vhost/*"], hosts = ["api.internal"] }]

[[policy]]
name = "no-admin"
action = "deny"
[[policy.rule]]
name = "admin"
to = [{ ports = [8080], paths = ["/admin", "/admin/*"] }]

[[test]]
name = "GET items"
from = "spiffe://t/a"
to_port = 8080
method = "GET"
path = "/api/items"
expect = "allow"
expect_rule = "read"

[[test]]
name = "POST items"
from = "spiffe://t/a"
to_port = 8080
method = "POST"
path = "/api/items"
expect = "deny"
expect_reason = "no_allow_matched"

[[test]]
name = "dot-dot into admin"
from = "spiffe://t/a"
to_port = 8080
path = "/public/../admin"
expect = "deny"
expect_policy = "no-admin"
"#;

/// `c` serves HTTP on 8080 under [`POLICY`] (mesh default deny); `a` is the client.
/// Returns once `a` got an allowed response through the mesh.
fn setup(mesh: &mut mesh_tests::Mesh) -> Result<(Host, Host, RecordingServer)> {
    let c = mesh.host("c").policy("deny", POLICY).up()?;
    let a = mesh.host("a").up()?;
    let server = c.serve_recording(HTTP)?;
    let r = a.http_get_eventually(c.overlay_v4(), HTTP, "/api/ready")?;
    anyhow::ensure!(r.status == 200, "warm-up GET: {r:?}");
    Ok((a, c, server))
}

/// `curl -X METHOD` from `a` to `c`, extra curl arguments after.
fn curl(a: &Host, c: &Host, method: &str, path: &str, extra: &[&str]) -> Result<u16> {
    let mut args = vec!["-X", method, "--path-as-is"];
    args.extend_from_slice(extra);
    let r = a.curl(c.overlay_v4(), HTTP, path, &args)?;
    anyhow::ensure!(
        r.status != 0,
        "curl {method} {path} got no response (exit {:?}): {}",
        r.code,
        r.stderr
    );
    Ok(r.status)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn allowed_get_passes_and_a_post_to_the_same_path_gets_403_unseen() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    let (a, c, server) = setup(&mut mesh)?;
    assert_eq!(curl(&a, &c, "GET", "/api/items", &[])?, 200);
    assert!(server.saw("GET", "/api/items")?);
    let marker = "POST-BODY-MARKER-7f3a";
    let status = curl(&a, &c, "POST", "/api/items", &["--data-binary", marker])?;
    assert_eq!(status, 403);
    // The server never saw the refused request: not its head, not its body.
    assert!(
        !server.saw("POST", "/api/items")?,
        "{:?}",
        server.requests()?
    );
    let raw = server.raw();
    assert!(!contains(&raw, b"POST"), "the server read a POST");
    assert!(
        !contains(&raw, marker.as_bytes()),
        "the server read the body"
    );
    c.wait_decision(&[
        ("src", "spiffe://t/a"),
        ("decision", "deny"),
        ("reason", "no_allow_matched"),
        ("http.method", "POST"),
        ("http.path", "/api/items"),
        ("http.status", "403"),
    ])?;
    // Other methods and paths are refused the same way; the allowed one still passes.
    assert_eq!(curl(&a, &c, "DELETE", "/api/items", &[])?, 403);
    assert_eq!(curl(&a, &c, "GET", "/private", &[])?, 403);
    assert_eq!(curl(&a, &c, "GET", "/api/items", &[])?, 200);
    // The same over the IPv6 overlay.
    let v6 = |method: &str| -> Result<u16> {
        Ok(a.curl(c.overlay_v6(), HTTP, "/api/v6", &["-X", method])?
            .status)
    };
    assert_eq!(v6("GET")?, 200);
    assert_eq!(v6("POST")?, 403);
    assert!(server.saw("GET", "/api/v6")? && !server.saw("POST", "/api/v6")?);
    let e = c.enforcement()?;
    assert!(
        e["counters"]["http_refused"].as_u64().unwrap_or(0) >= 3,
        "{e}"
    );
    assert!(c.rule_count("api", "read", "allow")? >= 2, "{e}");
    Ok(())
}

#[test]
fn a_denied_request_on_a_kept_alive_connection_gets_403_after_allowed_ones() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    let (a, c, server) = setup(&mut mesh)?;
    let before = server.requests()?.len();
    let s = a.http_session(
        c.overlay_v4(),
        HTTP,
        &[
            "GET /api/one",
            "GET /api/two",
            "POST /api/items",
            "GET /api/three",
        ],
    )?;
    let statuses: Vec<u16> = s.responses.iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![200, 200, 403], "{s:?}");
    assert!(s.responses[2].close, "the 403 keeps the connection: {s:?}");
    assert!(
        matches!(s.end.as_str(), "closed" | "reset"),
        "after the 403 the connection {}",
        s.end
    );
    // The server saw exactly the two allowed requests, on one connection.
    let seen = &server.requests()?[before..];
    let paths: Vec<&str> = seen.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(paths, vec!["/api/one", "/api/two"], "{seen:?}");
    assert_eq!(seen[0].client_port, seen[1].client_port, "{seen:?}");
    // A connection of allowed requests only stays open for all of them.
    let s = a.http_session(
        c.overlay_v4(),
        HTTP,
        &["GET /api/a", "GET /public/b", "GET /api/c"],
    )?;
    assert_eq!(s.responses.len(), 3, "{s:?}");
    assert!(s.responses.iter().all(|r| r.status == 200), "{s:?}");
    assert_eq!(s.end, "done");
    Ok(())
}

#[test]
fn pipelined_and_smuggling_shaped_requests_never_reach_the_server() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    let (a, c, server) = setup(&mut mesh)?;
    let send = |data: &str| {
        a.send_raw(
            c.overlay_v4(),
            HTTP,
            data.as_bytes(),
            Duration::from_secs(10),
        )
    };
    // Two allowed requests written at once: both reach the server, both are answered.
    let r = send(
        "GET /api/p1 HTTP/1.1\r\nHost: c\r\n\r\nGET /api/p2 HTTP/1.1\r\nHost: c\r\nConnection: close\r\n\r\n",
    )?;
    assert_eq!(r.received.matches("HTTP/1.1 200").count(), 2, "{r:?}");
    assert!(server.saw("GET", "/api/p1")? && server.saw("GET", "/api/p2")?);
    // An allowed request with a denied one pipelined behind it: the denied one, head
    // and body, never reaches the server, and the client gets a 403.
    let r = send(
        "GET /api/p3 HTTP/1.1\r\nHost: c\r\n\r\nPOST /api/items HTTP/1.1\r\nHost: c\r\n\
         Content-Length: 12\r\n\r\nSMUGGLED-ONE",
    )?;
    assert!(r.received.contains("HTTP/1.1 403"), "{r:?}");
    // Framing a server could read differently from the enforcer: refused with 400.
    for (what, data) in [
        (
            "Content-Length and Transfer-Encoding",
            "POST /upload HTTP/1.1\r\nHost: c\r\nContent-Length: 17\r\n\
             Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nSMUGGLED-TWO",
        ),
        (
            "conflicting Content-Length",
            "POST /upload HTTP/1.1\r\nHost: c\r\nContent-Length: 3\r\n\
             Content-Length: 14\r\n\r\nSMUGGLED-THREE",
        ),
        (
            "obs-fold",
            "GET /api/x HTTP/1.1\r\nHost: c\r\nX-A: 1\r\n Transfer-Encoding: chunked\r\n\r\n",
        ),
    ] {
        let r = send(data)?;
        assert!(
            r.received.starts_with("HTTP/1.1 400") || (r.received.is_empty() && r.end == "reset"),
            "{what}: {r:?}"
        );
        assert!(!server.saw("POST", "/upload")?, "{what}: the server saw it");
    }
    c.wait_decision(&[("reason", "malformed_request"), ("http.status", "400")])?;
    let raw = server.raw();
    assert!(
        !contains(&raw, b"SMUGGLED") && !contains(&raw, b"POST"),
        "the server read a refused request: {:?}",
        String::from_utf8_lossy(&raw)
    );
    Ok(())
}

#[test]
fn large_heads_pass_oversized_get_431_and_unfinished_408() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    let (a, c, server) = setup(&mut mesh)?;
    // A large head within the 16 KiB limit passes: it is held until complete, and
    // acknowledged while held, so a sender is not stuck at its congestion window
    // (about 15 KB here; l7::HeldAck).
    let large = format!(
        "GET /api/large HTTP/1.1\r\nHost: c\r\nX-Large: {}\r\nConnection: close\r\n\r\n",
        "L".repeat(15 * 1024 + 512)
    );
    let r = a.send_raw(
        c.overlay_v4(),
        HTTP,
        large.as_bytes(),
        Duration::from_secs(10),
    )?;
    assert!(
        r.received.starts_with("HTTP/1.1 200"),
        "{:?}; {}",
        r.end,
        c.enforcement()?
    );
    assert!(server.saw("GET", "/api/large")?);
    // A head over the limit: 431 at once, and the server never sees it.
    let big = format!(
        "GET /api/big HTTP/1.1\r\nHost: c\r\nX-Big: {}\r\n\r\n",
        "B".repeat(20 * 1024)
    );
    let r = a.send_raw(
        c.overlay_v4(),
        HTTP,
        big.as_bytes(),
        Duration::from_secs(10),
    )?;
    assert!(r.received.starts_with("HTTP/1.1 431"), "{:?}", r.end);
    // A head that never ends: answered with 408 once the head timeout passes (10 s).
    let r = a.send_raw(
        c.overlay_v4(),
        HTTP,
        b"GET /api/slow HTTP/1.1\r\nHost: c\r\nX-Slow: 1\r\n",
        Duration::from_secs(25),
    )?;
    assert!(r.received.starts_with("HTTP/1.1 408"), "{r:?}");
    let d = c.decisions()?;
    d.assert_contains(&[("reason", "head_too_large"), ("http.status", "431")]);
    d.assert_contains(&[("reason", "request_timeout"), ("http.status", "408")]);
    let raw = server.raw();
    assert!(
        !contains(&raw, b"/api/big") && !contains(&raw, b"/api/slow"),
        "the server read a refused head"
    );
    Ok(())
}

#[test]
fn a_stricter_policy_cuts_an_upload_in_progress() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    let (a, c, server) = setup(&mut mesh)?;
    a.trickle_upload("upload", c.overlay_v4(), HTTP, "/upload")?;
    // The body is flowing to the server.
    let before = server.raw().len();
    mesh_tests::wait::until(
        "the upload to reach the server",
        Duration::from_secs(10),
        || Ok((server.raw().len() > before + 2048).then_some(())),
    )?;
    // a is denied outright now: its upload in progress is cut, not left to finish.
    let policies = POLICY.split("[[test]]").next().unwrap_or_default();
    let deny_a = format!(
        "{policies}\n[[policy]]\nname = \"quarantine\"\naction = \"deny\"\n[[policy.rule]]\n\
         from = [{{ identities = [\"spiffe://t/a\"] }}]\n"
    );
    c.apply_policy(&deny_a)?.check()?;
    a.wait_background_output("upload", "ended")?;
    // The server's end was reset too: no connection on the port is left open.
    mesh_tests::wait::until(
        "the server's connection to end",
        Duration::from_secs(10),
        || {
            let out = c.run("ss", &["-Htn", "state", "established", "sport = :8080"])?;
            Ok(out.stdout_str().trim().is_empty().then_some(()))
        },
    )?;
    c.wait_decision(&[
        ("src", "spiffe://t/a"),
        ("reason", "explicit_deny"),
        ("policy", "quarantine"),
    ])?;
    // And a new connection is refused at its SYN: no rule could allow a there now,
    // whatever it asks (issue 18.7).
    let r = a.curl(c.overlay_v4(), HTTP, "/api/items", &[])?;
    assert_eq!((r.status, r.code), (0, Some(7)), "{}", r.stderr);
    Ok(())
}

#[test]
fn a_stricter_policy_cuts_a_connection_holding_a_partial_head() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    let (a, c, _server) = setup(&mut mesh)?;
    // Half a request head, held by meshd (the server has the connection, no bytes).
    let script = format!(
        "exec 3<>/dev/tcp/{}/{HTTP}; printf 'GET /api/x HTTP/1.1\\r\\nHost: c\\r\\n' >&3; \
         echo sent; cat <&3 >/dev/null; echo ended",
        c.overlay_v4()
    );
    a.spawn(
        "partial",
        std::path::Path::new("/bin/bash"),
        &["-c", &script],
    )?;
    a.wait_background_output("partial", "sent")?;
    let established = || -> Result<bool> {
        let out = c.run("ss", &["-Htn", "state", "established", "sport = :8080"])?;
        Ok(!out.stdout_str().trim().is_empty())
    };
    mesh_tests::wait::until("the server to accept", Duration::from_secs(5), || {
        Ok(established()?.then_some(()))
    })?;
    let policies = POLICY.split("[[test]]").next().unwrap_or_default();
    let deny_a = format!(
        "{policies}\n[[policy]]\nname = \"quarantine\"\naction = \"deny\"\n[[policy.rule]]\n\
         from = [{{ identities = [\"spiffe://t/a\"] }}]\n"
    );
    c.apply_policy(&deny_a)?.check()?;
    // Both ends are reset at once, well before the 10 s head timeout would end it.
    a.wait_background_output("partial", "ended")?;
    mesh_tests::wait::until(
        "the server's connection to end",
        Duration::from_secs(3),
        || Ok((!established()?).then_some(())),
    )?;
    Ok(())
}

#[test]
fn a_connection_from_before_a_restart_is_reset_not_left_hanging() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    let (a, c, server) = setup(&mut mesh)?;
    a.reuse_later("reuse", c.overlay_v4(), HTTP)?;
    assert!(server.saw("GET", "/api/first")?);
    // The new meshd does not know the connection, so it cannot inspect it: the
    // segment is dropped and both ends are reset, so the client reconnects at once.
    c.kill_meshd()?;
    c.start()?;
    c.ping(a.overlay_v4())?; // the new session
    let started = mesh_tests::wait::now();
    a.trigger("reuse")?;
    a.wait_background_output("reuse", "second: ")?;
    let out = std::fs::read_to_string(a.dir().join("reuse.out"))?;
    assert!(
        out.contains("second: reset") || out.contains("second: closed"),
        "{out}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(!server.saw("GET", "/api/second")?);
    // A new connection is inspected as usual.
    assert_eq!(curl(&a, &c, "GET", "/api/third", &[])?, 200);
    Ok(())
}

/// A request meshd delivered but the server's host lost (here: an nftables rule on `c`
/// drops it after meshd's TUN write). meshd keeps no copy to check the client's
/// retransmissions against, so it cuts them; after three the client gets 502 and the
/// log says `delivery_lost`, within seconds, instead of a connection that hangs until
/// curl's 20 s limit. The same for a head meshd held (acknowledging its first piece to
/// the client) and released when the second came: 502.
#[test]
fn a_request_lost_after_delivery_gets_502_instead_of_hanging() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    let (a, c, server) = setup(&mut mesh)?;
    c.run(
        "nft",
        &[
            "add table inet lose; add chain inet lose in { type filter hook input priority 0; }; \
           add rule inet lose in tcp dport 8080 tcp flags & psh == psh counter drop",
        ],
    )?;
    assert_eq!(curl(&a, &c, "GET", "/api/lost", &[])?, 502);
    assert!(!server.saw("GET", "/api/lost")?, "{:?}", server.requests()?);
    let rules = c.run("nft", &["list table inet lose"])?.stdout_str();
    assert!(
        !rules.contains("packets 0 "),
        "the rule dropped the request: {rules}"
    );
    c.wait_decision(&[
        ("src", "spiffe://t/a"),
        ("decision", "deny"),
        ("reason", "delivery_lost"),
        ("http.status", "502"),
    ])?;
    // A head in two pieces: the first held and acknowledged by meshd, both released
    // when the second comes, and lost.
    let reply = a.send_raw_pieces(
        c.overlay_v4(),
        HTTP,
        &[b"GET /api/held HTTP/1.1\r\nHo", b"st: c\r\n\r\n"],
        Duration::from_secs(20),
    )?;
    assert!(
        reply.received.starts_with("HTTP/1.1 502 Bad Gateway\r\n"),
        "{reply:?}"
    );
    assert!(!server.saw("GET", "/api/held")?);
    // Nothing else is affected: without the rule, the same requests pass.
    c.run("nft", &["delete table inet lose"])?;
    assert_eq!(curl(&a, &c, "GET", "/api/lost", &[])?, 200);
    assert!(server.saw("GET", "/api/lost")?);
    let reply = a.send_raw_pieces(
        c.overlay_v4(),
        HTTP,
        &[
            b"GET /api/held HTTP/1.1\r\nHo",
            b"st: c\r\nConnection: close\r\n\r\n",
        ],
        Duration::from_secs(20),
    )?;
    assert!(reply.received.starts_with("HTTP/1.1 200"), "{reply:?}");
    assert!(server.saw("GET", "/api/held")?);
    Ok(())
}

#[test]
fn path_tricks_are_decided_by_the_normalised_path() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    let (a, c, server) = setup(&mut mesh)?;
    assert_eq!(curl(&a, &c, "GET", "/public/hello", &[])?, 200);
    // Each of these reads as an allowed /public path or as something other than
    // /admin to a naive matcher; normalised, each is /admin (or refused as ambiguous).
    for (path, want, reason) in [
        ("/public/../admin", 403, "explicit_deny"),
        ("/public/./../admin/users", 403, "explicit_deny"),
        ("//admin", 403, "explicit_deny"),
        ("/public/%2e%2e/admin", 403, "explicit_deny"),
        ("/admin%2F", 400, "malformed_request"),
        ("/public/..%2Fadmin", 400, "malformed_request"),
    ] {
        let got = curl(&a, &c, "GET", path, &[])?;
        assert_eq!(got, want, "GET {path}");
        c.wait_decision(&[("reason", reason), ("decision", "deny")])
            .with_context(|| format!("GET {path}"))?;
    }
    let d = c.decisions()?;
    d.assert_contains(&[("policy", "no-admin"), ("http.status", "403")]);
    let raw = server.raw();
    assert!(
        !contains(&raw, b"admin"),
        "the server read a request for admin: {:?}",
        server.requests()?
    );
    // The allowed path still works after the refusals.
    assert_eq!(curl(&a, &c, "GET", "/public/../public/x", &[])?, 200);
    assert!(server.saw("GET", "/public/../public/x")?);
    Ok(())
}

#[test]
fn header_and_host_conditions_decide_requests() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    let (a, c, server) = setup(&mut mesh)?;
    for (headers, want) in [
        (&["x-env: prod"][..], 200),
        (&["X-Env: prod-eu"][..], 200),
        (&["x-env: dev"][..], 403),
        (&[][..], 403),
        (&["x-env: prod", "x-debug: 1"][..], 403),
    ] {
        let mut args = Vec::new();
        for h in headers {
            args.push("-H");
            args.push(*h);
        }
        let got = curl(&a, &c, "GET", "/env/config", &args)?;
        assert_eq!(got, want, "headers {headers:?}");
    }
    // Host rules: the Host header, any port when the pattern names none.
    for (host, want) in [
        (Some("api.internal"), 200),
        (Some("API.Internal:8080"), 200),
        (Some("other.internal"), 403),
        (None, 403),
    ] {
        let h = host.map(|h| format!("Host: {h}"));
        let args: Vec<&str> = h.iter().flat_map(|h| ["-H", h.as_str()]).collect();
        let got = curl(&a, &c, "GET", "/vhost/x", &args)?;
        assert_eq!(got, want, "Host {host:?}");
    }
    assert_eq!(
        server
            .requests()?
            .iter()
            .filter(|r| r.path == "/vhost/x")
            .count(),
        2
    );
    // Only the two allowed requests reached the server.
    let seen: Vec<_> = server
        .requests()?
        .into_iter()
        .filter(|r| r.path == "/env/config")
        .collect();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(seen.iter().all(|r| !r.headers.contains_key("x-debug")));
    Ok(())
}

#[test]
fn non_http_bytes_on_an_inspected_port_are_refused_unseen() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    let (a, c, server) = setup(&mut mesh)?;
    let cases: [&[u8]; 3] = [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfcMARKER-TLS\r\n\r\n",
        b"SSH-2.0-OpenSSH_9.6 MARKER-SSH\r\n",
        b"\x00\x01\x02\x03MARKER-BIN\x00\x00\x00\x00\x00\x00\x00\x00\r\n\r\n",
    ];
    for data in cases {
        let r = a.send_raw(c.overlay_v4(), HTTP, data, Duration::from_secs(10))?;
        assert!(
            r.received.starts_with("HTTP/1.1 400") || (r.received.is_empty() && r.end == "reset"),
            "{:?}: {r:?}",
            String::from_utf8_lossy(data)
        );
        assert_ne!(r.end, "timeout", "{r:?}");
    }
    c.wait_decision(&[
        ("src", "spiffe://t/a"),
        ("decision", "deny"),
        ("dst_port", "8080"),
    ])?;
    let d = c.decisions()?;
    assert!(
        d.contains(&[("reason", "not_http")]) || d.contains(&[("reason", "malformed_request")]),
        "{d:?}"
    );
    let raw = server.raw();
    assert!(
        !contains(&raw, b"MARKER"),
        "the server read the non-HTTP bytes: {:?}",
        String::from_utf8_lossy(&raw)
    );
    // HTTP still works on the port.
    assert_eq!(curl(&a, &c, "GET", "/api/after", &[])?, 200);
    Ok(())
}

#[test]
fn a_multi_megabyte_upload_to_an_allowed_path_arrives_intact() -> mesh_tests::Result {
    use std::io::Read;
    let mut mesh = mesh_tests::mesh!();
    let (a, c, server) = setup(&mut mesh)?;
    let mut data = vec![0u8; 8 << 20];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut data)?;
    let file = a.dir().join("upload.bin");
    std::fs::write(&file, &data)?;
    let want = hex(&Sha256::digest(&data));
    let at = format!("@{}", file.display());
    let args = [
        "--data-binary",
        at.as_str(),
        "-H",
        "Content-Type: application/octet-stream",
        "-H",
        "Expect:",
    ];
    let r = a.curl(
        c.overlay_v4(),
        HTTP,
        "/upload",
        &[&["-X", "POST"][..], &args[..]].concat(),
    )?;
    assert_eq!(r.status, 200, "{r:?}");
    let reply: serde_json::Value = serde_json::from_slice(&r.body)?;
    assert_eq!(reply["body_len"], data.len(), "{reply}");
    assert_eq!(reply["sha256"], want.as_str(), "{reply}");
    let seen = server.requests()?;
    assert!(
        seen.iter()
            .any(|s| s.path == "/upload" && s.sha256 == want && s.body_len == data.len() as u64),
        "{seen:?}"
    );
    // Again as curl sends large bodies by default: `Expect: 100-continue`, the server
    // answers 100 before the body.
    let r = a.curl(
        c.overlay_v4(),
        HTTP,
        "/upload",
        &["-X", "POST", "--data-binary", at.as_str()],
    )?;
    assert_eq!(r.status, 200, "{r:?}");
    let reply: serde_json::Value = serde_json::from_slice(&r.body)?;
    assert_eq!(reply["sha256"], want.as_str(), "{reply}");
    assert_eq!(reply["headers"]["expect"], "100-continue", "{reply}");
    // The same body to a denied path: 403, and none of it reaches the server.
    let before = server.raw().len();
    let r = a.curl(
        c.overlay_v4(),
        HTTP,
        "/api/items",
        &[&["-X", "POST"][..], &args[..]].concat(),
    )?;
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(
        server.raw().len(),
        before,
        "the server read the denied upload"
    );
    Ok(())
}

#[test]
fn explain_online_agrees_with_the_data_path() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    let (a, c, _server) = setup(&mut mesh)?;
    let file = c.dir().join("policy.toml");
    let file_s = file.to_str().context("path")?;
    for (method, path, headers, status) in [
        ("GET", "/api/items", &[][..], 200),
        ("POST", "/api/items", &[][..], 403),
        ("GET", "/public/../admin", &[][..], 403),
        ("GET", "/env/x", &["x-env: prod"][..], 200),
        ("GET", "/env/x", &["x-env: dev"][..], 403),
    ] {
        let mut args = vec![
            "--from",
            "spiffe://t/a",
            "--to-port",
            "8080",
            "--method",
            method,
            "--path",
            path,
        ];
        for h in headers {
            args.extend(["--header", h]);
        }
        let online = c.explain(&args)?;
        let what = format!("{method} {path} {headers:?}");
        if path.contains("..") {
            assert_eq!(online["normalized_path"], "/admin", "{what}: {online}");
            assert_eq!(online["policy"], "no-admin", "{what}: {online}");
        }
        assert_eq!(online["l7"], true, "{what}: {online}");
        let want = if status == 200 { "allow" } else { "deny" };
        assert_eq!(online["decision"], want, "{what}: {online}");
        // Offline against the same file: the same decision, reason, policy and rule.
        let mut off = args.clone();
        off.extend(["--file", file_s]);
        let offline = c.explain(&off)?;
        for k in ["decision", "reason", "policy", "rule", "status"] {
            assert_eq!(online[k], offline[k], "{what}: {k}: {online} vs {offline}");
        }
        // And the data path does what explain said.
        let mut curl_args = Vec::new();
        for h in headers {
            curl_args.extend(["-H", *h]);
        }
        assert_eq!(curl(&a, &c, method, path, &curl_args)?, status, "{what}");
        if status != 200 {
            let reason = online["reason"].as_str().unwrap_or_default();
            c.wait_decision(&[("reason", reason), ("http.method", method)])
                .with_context(|| what.clone())?;
        }
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
