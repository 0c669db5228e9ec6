//! `meshctl policy ...` run as an operator would: the real binary on policy files in a
//! fresh directory, and against a fake meshd on a Unix socket for apply/explain.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::{Command, Output};

const POLICY: &str = r#"
[[policy]]
name = "api"
action = "allow"
[[policy.rule]]
name = "read"
from = [{ identities = ["spiffe://t/web"] }]
to = [{ ports = [8080], methods = ["GET"], paths = ["/api/*"] }]

[[policy]]
name = "no-admin"
action = "deny"
[[policy.rule]]
to = [{ ports = [8080], paths = ["/admin/*"] }]

[[test]]
name = "web reads"
from = "spiffe://t/web"
to_port = 8080
method = "GET"
path = "/api/items"
expect = "allow"
expect_rule = "read"

[[test]]
name = "admin via dot-dot"
from = "spiffe://t/web"
to_port = 8080
path = "/api/../admin/x"
expect = "deny"
expect_policy = "no-admin"
"#;

const FAILING_TEST: &str = r#"
[[test]]
name = "wrong on purpose"
from = "spiffe://t/web"
to_port = 8080
method = "POST"
path = "/api/items"
expect = "allow"
"#;

struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("meshctl-policy-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        Dir(d)
    }

    fn write(&self, name: &str, text: &str) {
        fs::write(self.0.join(name), text).unwrap();
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_meshctl"))
            .args(args)
            .current_dir(&self.0)
            .env_remove("MESHD_SOCKET")
            .output()
            .unwrap()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn test_passes_and_fails_with_exit_codes() {
    let d = Dir::new("test");
    d.write("ok.toml", POLICY);
    let out = d.run(&["policy", "test", "ok.toml"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("PASS  web reads (line 16): allow (allow_matched) by api/read"),
        "{stdout}"
    );
    assert!(stdout.contains("PASS  admin via dot-dot"), "{stdout}");
    assert!(stdout.ends_with("2 passed, 0 failed\n"), "{stdout}");

    d.write("bad.toml", &format!("{POLICY}{FAILING_TEST}"));
    let out = d.run(&["policy", "test", "bad.toml"]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("FAIL  wrong on purpose (line 33): expected allow, got deny; decided deny (no_allow_matched)"), "{stdout}");
    assert_eq!(
        text(&out.stderr),
        "meshctl: bad.toml: 1 of 3 policy tests failed\n"
    );

    let out = d.run(&["policy", "test", "--json", "bad.toml"]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["passed"].as_u64(), v["failed"].as_u64()),
        (Some(2), Some(1))
    );
    assert_eq!(v["results"][2]["got"]["reason"], "no_allow_matched");
}

#[test]
fn bad_files_are_one_line_errors_naming_file_line_field() {
    let d = Dir::new("bad");
    let cases = [
        ("empty.toml", "", "meshctl: empty.toml:1: no [[policy]] in the file"),
        ("toml.toml", "[[policy]\n", "meshctl: toml.toml:1: "),
        (
            "unknown.toml",
            "[[policy]]\nname = \"a\"\naction = \"allow\"\nselecter = {}\n",
            "meshctl: unknown.toml:4: ",
        ),
        (
            "cidr.toml",
            "[[policy]]\nname = \"a\"\naction = \"allow\"\n[[policy.rule]]\nfrom = [{ addresses = [\"100.64.0.0/99\"] }]\n",
            "meshctl: cidr.toml:5: policy[0].rule[0].from[0].addresses: \"100.64.0.0/99\"",
        ),
        (
            "id.toml",
            "[[policy]]\nname = \"a\"\naction = \"allow\"\n[[policy.rule]]\nfrom = [{ identities = [\"spiffe://t/a//b\"] }]\n",
            "meshctl: id.toml:5: policy[0].rule[0].from[0].identities: ",
        ),
    ];
    for (file, src, want) in cases {
        d.write(file, src);
        let out = d.run(&["policy", "test", file]);
        assert_eq!(out.status.code(), Some(1), "{file}");
        let err = text(&out.stderr);
        assert!(err.starts_with(want), "{file}: {err}");
        assert_eq!(err.lines().count(), 1, "{file}: {err}");
    }
    let out = d.run(&["policy", "test", "missing.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("missing.toml"));
}

#[test]
fn explain_offline_text_and_json() {
    let d = Dir::new("explain");
    d.write("p.toml", POLICY);
    let out = d.run(&[
        "policy",
        "explain",
        "--file",
        "p.toml",
        "--from",
        "spiffe://t/web",
        "--to-port",
        "8080",
        "--method",
        "POST",
        "--path",
        "/api/items",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with("deny (no_allow_matched, http 403)\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains("api/read (allow, line 5): no match: to[0].methods: POST not in [GET]"),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "no-admin/0 (deny, line 13): no match: to[0].paths: /api/items not in [/admin/*]"
        ),
        "{stdout}"
    );

    let out = d.run(&[
        "policy",
        "explain",
        "--file",
        "p.toml",
        "--from",
        "spiffe://t/web",
        "--to-port",
        "8080",
        "--path",
        "/admin/x",
        "--header",
        "x-a: b",
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["decision"], "deny");
    assert_eq!(v["policy"], "no-admin");
    assert_eq!(v["rule"], "0");
    assert_eq!(v["l7"], true);

    let out = d.run(&[
        "policy",
        "explain",
        "--file",
        "p.toml",
        "--from",
        "web",
        "--to-port",
        "1",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).starts_with("meshctl: from: "),
        "{}",
        text(&out.stderr)
    );
    let out = d.run(&[
        "policy",
        "explain",
        "--from",
        "spiffe://t/web",
        "--to-port",
        "1",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("MESHD_SOCKET"));
}

/// A fake meshd: answers one connection with `reply`, returns the request line.
/// Issue 18: `check` warns where inspection refuses what a rule seems to allow (udp on
/// an HTTP port), `explain` says what the data path does with non-HTTP traffic there,
/// and HTTP fields without ports are a one-line error.
#[test]
fn inspection_is_checked_and_explained() {
    let d = Dir::new("inspect");
    d.write(
        "p.toml",
        &format!("{POLICY}\n[[policy]]\nname = \"l4\"\naction = \"allow\"\n[[policy.rule]]\nto = [{{ ports = [8080, 9090] }}]\n"),
    );
    let out = d.run(&["policy", "check", "p.toml"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains(
            "p.toml:36: warning: policy[2].rule[0].to[0]: udp to port 8080 is refused (not_http)"
        ),
        "{err}"
    );
    assert!(
        text(&out.stdout).ends_with("1 warnings\n"),
        "{}",
        text(&out.stdout)
    );

    let explain = |extra: &[&str]| {
        let mut args = vec![
            "policy",
            "explain",
            "--file",
            "p.toml",
            "--from",
            "spiffe://t/web",
            "--to-port",
            "8080",
        ];
        args.extend(extra);
        let out = d.run(&args);
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
    };
    let stdout = explain(&[]);
    assert!(
        stdout.starts_with("deny (not_http, http 400)\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains("note: port 8080 is inspected at layer 7"),
        "{stdout}"
    );
    let stdout = explain(&["--proto", "udp"]);
    assert!(
        stdout.starts_with("deny (not_http, http 400)\n"),
        "{stdout}"
    );
    let stdout = explain(&["--method", "GET", "--path", "/api/x", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        (v["reason"].as_str(), v["stage"].as_str()),
        (Some("allow_matched"), Some("request"))
    );

    d.write(
        "noports.toml",
        "[[policy]]\nname = \"a\"\naction = \"deny\"\n[[policy.rule]]\nto = [{ paths = [\"/admin/*\"] }]\n",
    );
    let out = d.run(&["policy", "check", "noports.toml"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.starts_with("meshctl: noports.toml:5: policy[0].rule[0].to[0]: HTTP fields (methods, paths, hosts, header conditions) need `ports`"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

fn fake_meshd(sock: &std::path::Path, reply: &'static str) -> std::thread::JoinHandle<String> {
    let listener = UnixListener::bind(sock).unwrap();
    // The fake daemon is the I/O side of the test; it must run beside the binary.
    #[allow(clippy::disallowed_methods)]
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line).unwrap();
        (&stream).write_all(reply.as_bytes()).unwrap();
        line
    })
}

#[test]
fn apply_and_online_explain_talk_the_control_protocol() {
    let d = Dir::new("online");
    d.write("p.toml", POLICY);
    let sock = d.0.join("meshd.sock");
    let sock_arg = sock.to_str().unwrap();

    let server = fake_meshd(
        &sock,
        "{\"ok\":true,\"result\":{\"name\":\"p.toml\",\"policies\":1,\"tests\":1,\"cut_flows\":0}}\n",
    );
    let out = d.run(&["--socket", sock_arg, "policy", "apply", "p.toml"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let req: serde_json::Value = serde_json::from_str(&server.join().unwrap()).unwrap();
    assert_eq!(req["op"], "policy_apply");
    assert_eq!(req["source"], POLICY);
    assert_eq!(req["name"], "p.toml");
    fs::remove_file(&sock).unwrap();

    let server = fake_meshd(
        &sock,
        "{\"ok\":false,\"error\":\"policy tests failed: 1 of 2\"}\n",
    );
    let out = d.run(&["--socket", sock_arg, "policy", "apply", "p.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        "meshctl: meshd: policy tests failed: 1 of 2\n"
    );
    server.join().unwrap();
    fs::remove_file(&sock).unwrap();

    // A broken file never reaches the daemon.
    d.write("broken.toml", "[[policy]]\nname = 1\n");
    let out = d.run(&["--socket", sock_arg, "policy", "apply", "broken.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).starts_with("meshctl: broken.toml:2: name: "),
        "{}",
        text(&out.stderr)
    );

    // Online explain sends the described request and prints the daemon's answer.
    let reply = r#"{"ok":true,"result":{"decision":"allow","reason":"allow_matched","policy":"api","rule":"read","l7":true,"default":"deny","policies":[]}}
"#;
    let server = fake_meshd(&sock, reply);
    let out = d.run(&[
        "--socket",
        sock_arg,
        "policy",
        "explain",
        "--from",
        "spiffe://t/web",
        "--to-port",
        "8080",
        "--method",
        "GET",
        "--path",
        "/api/x",
        "--header",
        "X-Env: prod",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with("allow (allow_matched)\ndecided by: api/read\n"),
        "{}",
        text(&out.stdout)
    );
    let req: serde_json::Value = serde_json::from_str(&server.join().unwrap()).unwrap();
    assert_eq!(req["op"], "explain");
    assert_eq!(req["from"], "spiffe://t/web");
    assert_eq!(req["to_port"], 8080);
    assert_eq!(req["proto"], "tcp");
    assert_eq!(req["http"]["method"], "GET");
    assert_eq!(
        req["http"]["headers"][0],
        serde_json::json!(["x-env", "prod"])
    );
    // The daemon side decodes exactly this into a RequestSpec.
    let mut spec = req.as_object().unwrap().clone();
    spec.remove("op");
    let spec: mesh_proto::policy::RequestSpec =
        serde_json::from_value(serde_json::Value::Object(spec)).unwrap();
    assert_eq!(spec.to_port, 8080);
}
