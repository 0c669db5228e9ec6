//! The real `meshctl` binary, run as an operator would, in a fresh directory per test.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// A fresh working directory, removed when the test passes.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("meshctl-cli-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        Dir(d)
    }

    fn path(&self, f: &str) -> PathBuf {
        self.0.join(f)
    }

    fn run(&self, args: &[&str]) -> Output {
        self.run_stdin(args, None)
    }

    fn run_stdin(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut child = Command::new(env!("CARGO_BIN_EXE_meshctl"))
            .args(args)
            .current_dir(&self.0)
            .env_remove("MESHD_SOCKET")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = child.stdin.take().unwrap();
        if let Some(s) = stdin {
            input.write_all(s.as_bytes()).unwrap();
        }
        drop(input);
        child.wait_with_output().unwrap()
    }

    /// Runs and requires success; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "meshctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.stderr.is_empty(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs and requires failure with exit `code`, nothing on stdout and exactly one
    /// line on stderr that contains every one of `want`; returns that line.
    fn fails(&self, args: &[&str], code: i32, want: &[&str]) -> String {
        let out = self.run(args);
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(out.status.code(), Some(code), "meshctl {args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "meshctl {args:?} printed to stdout");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "not one line: {stderr:?}");
        assert!(stderr.ends_with('\n'));
        assert!(stderr.starts_with("meshctl: "), "{stderr}");
        for w in want {
            assert!(stderr.contains(w), "{stderr:?} lacks {w:?}");
        }
        stderr
    }

    fn mode(&self, f: &str) -> u32 {
        fs::metadata(self.path(f)).unwrap().permissions().mode() & 0o777
    }

    fn chmod(&self, f: &str, mode: u32) {
        fs::set_permissions(self.path(f), fs::Permissions::from_mode(mode)).unwrap();
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

/// A CA and one leaf, a.crt / a.key.
fn setup(d: &Dir) {
    d.ok(&[
        "ca",
        "init",
        "--trust-domain",
        "t",
        "--allow-ip",
        "100.64.0.0/10",
        "--allow-ip",
        "fd00:6d65:7368::/48",
        "--allow-group",
        "web",
    ]);
    d.ok(&[
        "cert",
        "issue",
        "--identity",
        "spiffe://t/a",
        "--ip",
        "100.64.0.1",
        "--ip",
        "fd00:6d65:7368::1/128",
        "--group",
        "web",
        "--out",
        "a.crt",
    ]);
}

#[test]
fn ca_init_issue_verify_show() {
    let d = Dir::new("flow");
    setup(&d);
    assert_eq!(d.mode("ca.key"), 0o600);
    assert_eq!(d.mode("a.key"), 0o600);
    assert_eq!(d.mode("ca.crt"), 0o644);

    let out = d.ok(&["cert", "verify", "--ca", "ca.crt", "a.crt"]);
    assert!(out.starts_with("ok: spiffe://t/a"), "{out}");
    let v = json(&d.ok(&["cert", "verify", "--ca", "ca.crt", "a.crt", "--json"]));
    assert_eq!(v["ok"], true);
    assert_eq!(v["identity"], "spiffe://t/a");

    let show = json(&d.ok(&["cert", "show", "--json", "a.crt"]));
    assert_eq!(show["kind"], "leaf");
    assert_eq!(show["identity"], "spiffe://t/a");
    assert_eq!(
        show["addresses"],
        serde_json::json!(["100.64.0.1/32", "fd00:6d65:7368::1/128"])
    );
    assert_eq!(show["groups"], serde_json::json!(["web"]));
    // The certificate carries the public key of the generated private key.
    let public = d.ok(&["key", "pub", "a.key"]);
    assert_eq!(show["public_key"], public.trim());
    let ca = json(&d.ok(&["--json", "cert", "show", "ca.crt"]));
    assert_eq!(ca["kind"], "ca");
    assert_eq!(ca["identity"], "spiffe://t");
    assert_eq!(show["issuer"], ca["fingerprint"]);
    assert_eq!(
        ca["constraints"]["addresses"],
        serde_json::json!(["100.64.0.0/10", "fd00:6d65:7368::/48"])
    );

    let human = d.ok(&["cert", "show", "a.crt"]);
    assert!(
        human.contains("identity          spiffe://t/a\n"),
        "{human}"
    );
    assert!(
        human.contains("100.64.0.1/32, fd00:6d65:7368::1/128"),
        "{human}"
    );
    // stdin works too.
    let pem = fs::read_to_string(d.path("a.crt")).unwrap();
    let out = d.run_stdin(&["cert", "show", "-"], Some(&pem));
    assert!(out.status.success());
}

#[test]
fn renew_keeps_every_fact_but_the_validity() {
    let d = Dir::new("renew");
    setup(&d);
    let before = json(&d.ok(&["cert", "show", "--json", "a.crt"]));
    let key = fs::read(d.path("a.key")).unwrap();
    // In place, for 90 days.
    let out = d.ok(&["cert", "renew", "a.crt", "--validity", "90d"]);
    assert!(
        out.starts_with("wrote a.crt (spiffe://t/a, valid until "),
        "{out}"
    );
    let after = json(&d.ok(&["cert", "show", "--json", "a.crt"]));
    for field in ["identity", "addresses", "groups", "public_key", "issuer"] {
        assert_eq!(after[field], before[field], "{field}");
    }
    assert_ne!(after["fingerprint"], before["fingerprint"]);
    assert_ne!(after["not_after"], before["not_after"]);
    assert_eq!(d.mode("a.crt"), 0o644);
    assert_eq!(
        fs::read(d.path("a.key")).unwrap(),
        key,
        "the key is not touched"
    );
    let v = json(&d.ok(&["cert", "verify", "--ca", "ca.crt", "a.crt", "--json"]));
    assert_eq!(v["ok"], true);
    // Valid from now for 90 days (give or take the seconds this test takes).
    let (from, to) = (
        after["not_before_unix"].as_u64().unwrap(),
        after["not_after_unix"].as_u64().unwrap(),
    );
    assert_eq!(to - from, 90 * 86_400);
    assert!(from >= before["not_before_unix"].as_u64().unwrap());
    let ninety = after["not_after"].as_str().unwrap();
    // To another file, as JSON; an existing one only with --force.
    let j = json(&d.ok(&["cert", "renew", "a.crt", "--out", "next.crt", "--json"]));
    assert_eq!(j["cert_file"], "next.crt");
    assert_eq!(j["previous_not_after"], ninety);
    assert_eq!(j["certificate"]["public_key"], before["public_key"]);
    d.fails(
        &["cert", "renew", "a.crt", "--out", "next.crt"],
        1,
        &["next.crt", "already exists", "--force"],
    );
    d.ok(&["cert", "renew", "a.crt", "--out", "next.crt", "--force"]);
    // A CA certificate is not a leaf to renew; a missing file names its path.
    d.fails(
        &["cert", "renew", "ca.crt"],
        1,
        &["ca.crt", "CA certificate"],
    );
    d.fails(&["cert", "renew", "nope.crt"], 1, &["nope.crt"]);
}

#[test]
fn issue_for_an_existing_key() {
    let d = Dir::new("pubkey");
    d.ok(&["ca", "init", "--trust-domain", "t"]);
    let public = d.ok(&["key", "gen", "--out", "b.key"]);
    assert_eq!(d.mode("b.key"), 0o600);
    let public = public.trim();
    d.ok(&[
        "cert",
        "issue",
        "--identity",
        "spiffe://t/b",
        "--ip",
        "100.64.0.2",
        "--pub",
        public,
        "--out",
        "b.crt",
        "--validity",
        "30d",
    ]);
    assert!(!d.path("b.key.tmp").exists());
    let show = json(&d.ok(&["cert", "show", "b.crt", "--json"]));
    assert_eq!(show["public_key"], public);
    let days = (show["not_after_unix"].as_u64().unwrap()
        - show["not_before_unix"].as_u64().unwrap())
        / 86_400;
    assert_eq!(days, 30);
    // A public key file works; a private key file is refused rather than published.
    fs::write(d.path("b.pub"), format!("{public}\n")).unwrap();
    d.chmod("b.pub", 0o644);
    d.ok(&[
        "cert",
        "issue",
        "--identity",
        "spiffe://t/b",
        "--ip",
        "100.64.0.2",
        "--pub",
        "b.pub",
        "--out",
        "b2.crt",
    ]);
    assert_eq!(
        json(&d.ok(&["cert", "show", "b2.crt", "--json"]))["public_key"],
        public
    );
    d.fails(
        &[
            "cert",
            "issue",
            "--identity",
            "spiffe://t/b",
            "--ip",
            "100.64.0.2",
            "--pub",
            "b.key",
            "--out",
            "b3.crt",
        ],
        1,
        &["b.key", "looks like a private key"],
    );
    d.fails(
        &[
            "cert",
            "issue",
            "--identity",
            "spiffe://t/b",
            "--ip",
            "100.64.0.2",
            "--pub",
            "nope",
            "--out",
            "b3.crt",
        ],
        1,
        &["\"nope\"", "not a base64 public key"],
    );
    // `key gen | key pub`, like wg.
    let private = d.ok(&["key", "gen"]);
    let out = d.run_stdin(&["key", "pub"], Some(&private));
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap().trim().len(), 44);
    // Refuses to overwrite without --force.
    d.fails(
        &[
            "cert",
            "issue",
            "--identity",
            "spiffe://t/b",
            "--ip",
            "100.64.0.2",
            "--pub",
            public,
            "--out",
            "b.crt",
        ],
        1,
        &["b.crt", "already exists", "--force"],
    );
    d.ok(&[
        "cert",
        "issue",
        "--identity",
        "spiffe://t/b",
        "--ip",
        "100.64.0.2",
        "--pub",
        public,
        "--out",
        "b.crt",
        "--force",
    ]);
}

#[test]
fn verify_rejects_what_it_must() {
    let d = Dir::new("verify");
    setup(&d);
    // Expired (as of a later time).
    d.fails(
        &[
            "cert",
            "verify",
            "--ca",
            "ca.crt",
            "--at",
            "2100-01-01T00:00:00Z",
            "a.crt",
        ],
        1,
        &["expired at"],
    );
    // Another CA.
    fs::create_dir(d.path("other")).unwrap();
    d.ok(&[
        "ca",
        "init",
        "--trust-domain",
        "t",
        "--cert",
        "other/ca.crt",
        "--key",
        "other/ca.key",
    ]);
    d.fails(
        &["cert", "verify", "--ca", "other/ca.crt", "a.crt"],
        1,
        &["a.crt", "not by this CA"],
    );
    // A leaf as the CA.
    d.fails(
        &["cert", "verify", "--ca", "a.crt", "a.crt"],
        1,
        &["a.crt", "a leaf cannot sign"],
    );
    // Outside the CA's constraints, refused at issue.
    d.fails(
        &[
            "cert",
            "issue",
            "--identity",
            "spiffe://t/x",
            "--ip",
            "10.0.0.1",
            "--out",
            "x.crt",
        ],
        1,
        &["10.0.0.1/32 is outside"],
    );
    d.fails(
        &[
            "cert",
            "issue",
            "--identity",
            "spiffe://t/x",
            "--ip",
            "100.64.0.9",
            "--group",
            "admin",
            "--out",
            "x.crt",
        ],
        1,
        &["admin"],
    );
    d.fails(
        &[
            "cert",
            "issue",
            "--identity",
            "spiffe://u/x",
            "--ip",
            "100.64.0.9",
            "--out",
            "x.crt",
        ],
        1,
        &["trust domain t"],
    );
    assert!(!d.path("x.crt").exists() && !d.path("x.key").exists());
}

#[test]
fn bad_input_gives_one_line_and_nonzero_exit() {
    let d = Dir::new("bad");
    setup(&d);
    // Missing file.
    d.fails(
        &["cert", "show", "missing.crt"],
        1,
        &["missing.crt", "No such file"],
    );
    d.fails(
        &["cert", "verify", "--ca", "nope.crt", "a.crt"],
        1,
        &["nope.crt"],
    );
    d.fails(
        &[
            "cert",
            "issue",
            "--ca",
            "nope.crt",
            "--identity",
            "spiffe://t/x",
            "--ip",
            "100.64.0.9",
            "--out",
            "x.crt",
        ],
        1,
        &["nope.crt"],
    );
    // Corrupt certificate: garbage, and one flipped byte in the body.
    fs::write(d.path("garbage.crt"), "hello\n").unwrap();
    d.fails(
        &["cert", "show", "garbage.crt"],
        1,
        &["garbage.crt", "not a mesh certificate"],
    );
    let pem = fs::read_to_string(d.path("a.crt")).unwrap();
    fs::write(
        d.path("flip.crt"),
        pem.replace("100.64.0.1/32", "100.64.0.2/32"),
    )
    .unwrap();
    d.fails(
        &["cert", "verify", "--ca", "ca.crt", "flip.crt"],
        1,
        &["flip.crt", "signature does not verify"],
    );
    fs::write(d.path("trunc.crt"), &pem[..pem.len() / 2]).unwrap();
    d.fails(
        &["cert", "verify", "--ca", "ca.crt", "trunc.crt"],
        1,
        &["trunc.crt", "truncated"],
    );
    fs::write(d.path("bin.crt"), [0xff, 0xfe, 0x00]).unwrap();
    d.fails(&["cert", "show", "bin.crt"], 1, &["bin.crt"]);
    // World-readable keys.
    d.chmod("a.key", 0o644);
    d.fails(&["key", "pub", "a.key"], 1, &["a.key", "chmod 600 a.key"]);
    d.chmod("ca.key", 0o640);
    d.fails(
        &[
            "cert",
            "issue",
            "--identity",
            "spiffe://t/x",
            "--ip",
            "100.64.0.9",
            "--out",
            "x.crt",
        ],
        1,
        &["ca.key", "chmod 600 ca.key"],
    );
    d.chmod("ca.key", 0o600);
    // Invalid identity, address, duration, trust domain: usage errors (exit 2).
    d.fails(
        &[
            "cert",
            "issue",
            "--identity",
            "spiffe://t/a/../b",
            "--ip",
            "100.64.0.9",
            "--out",
            "x.crt",
        ],
        2,
        &["\".\" or \"..\" segment"],
    );
    d.fails(
        &[
            "cert",
            "issue",
            "--identity",
            "http://t/a",
            "--ip",
            "100.64.0.9",
            "--out",
            "x.crt",
        ],
        2,
        &["scheme"],
    );
    d.fails(
        &[
            "cert",
            "issue",
            "--identity",
            "spiffe://t/a",
            "--ip",
            "100.64.0.1/24",
            "--out",
            "x.crt",
        ],
        1,
        &["host bits"],
    );
    d.fails(
        &[
            "cert",
            "issue",
            "--identity",
            "spiffe://t/a",
            "--ip",
            "nope",
            "--out",
            "x.crt",
        ],
        2,
        &["not an IP address"],
    );
    d.fails(
        &["ca", "init", "--trust-domain", "Bad.Domain", "--force"],
        2,
        &["lowercase"],
    );
    d.fails(
        &[
            "ca",
            "init",
            "--trust-domain",
            "t",
            "--validity",
            "5w",
            "--force",
        ],
        2,
        &["unknown unit"],
    );
    // Unknown flag, missing arguments, missing subcommand.
    d.fails(
        &["cert", "show", "--bogus", "a.crt"],
        2,
        &["--bogus", "usage: meshctl cert show"],
    );
    d.fails(&["cert", "issue", "--out", "x.crt"], 2, &["--identity"]);
    d.fails(&["cert"], 2, &["subcommand"]);
    d.fails(&[], 2, &["subcommand"]);
    // The certificate would overwrite its own new key.
    d.fails(
        &[
            "cert",
            "issue",
            "--identity",
            "spiffe://t/x",
            "--ip",
            "100.64.0.9",
            "--out",
            "x.key",
        ],
        1,
        &["x.key", "--key-out"],
    );
    // Existing CA is not overwritten.
    d.fails(
        &["ca", "init", "--trust-domain", "t"],
        1,
        &["ca.crt", "already exists"],
    );
    assert!(!d.path("x.crt").exists());
}

#[test]
fn help_has_an_example_for_each_command() {
    let d = Dir::new("help");
    for cmd in [
        "ca init",
        "cert issue",
        "cert renew",
        "cert show",
        "cert verify",
        "key gen",
        "key pub",
    ] {
        let mut args: Vec<&str> = cmd.split(' ').collect();
        args.push("--help");
        let out = d.ok(&args);
        assert!(out.contains("Examples:"), "{cmd}: {out}");
        assert!(out.contains(&format!("meshctl {cmd} ")), "{cmd}: {out}");
    }
    let top = d.ok(&["--help"]);
    assert!(
        top.contains("--socket <PATH>") && top.contains("MESHD_SOCKET"),
        "{top}"
    );
}

#[test]
fn paths_in_errors_are_as_given() {
    let d = Dir::new("paths");
    let abs = d.path("nowhere/ca.crt");
    let abs = abs.to_str().unwrap();
    d.fails(&["cert", "show", abs], 1, &[abs]);
    assert!(Path::new(&d.0).exists());
}

/// The write end of a pipe whose reader is gone: what `meshctl … | head -1` gives
/// meshctl once head has its line (here before meshctl writes, so the test does not
/// depend on timing).
fn closed_pipe() -> Stdio {
    let mut reader = Command::new("true").stdin(Stdio::piped()).spawn().unwrap();
    let write_end = reader.stdin.take().unwrap();
    reader.wait().unwrap();
    Stdio::from(write_end)
}

/// A fake meshd on `sock` answering each of `replies` to one connection, in order.
fn fake_meshd(sock: &Path, replies: Vec<String>) -> std::thread::JoinHandle<()> {
    let listener = std::os::unix::net::UnixListener::bind(sock).unwrap();
    // The fake daemon is the I/O side of the test; it must run beside the binary.
    #[allow(clippy::disallowed_methods)]
    std::thread::spawn(move || {
        use std::io::BufRead;
        for reply in replies {
            let (stream, _) = listener.accept().unwrap();
            let mut line = String::new();
            std::io::BufReader::new(&stream)
                .read_line(&mut line)
                .unwrap();
            // meshctl may be gone already (its stdout closed): a write error is fine.
            let _ = (&stream).write_all(reply.as_bytes());
        }
    })
}

/// `meshctl … | head -1`: every command that prints ends quietly (no panic, nothing
/// on stderr) with the status a shell gives a tool that SIGPIPE ended, when nobody
/// reads its output any more.
#[test]
fn a_closed_stdout_ends_every_command_quietly() {
    let d = Dir::new("closed-stdout");
    setup(&d);
    fs::write(
        d.path("p.toml"),
        "[[policy]]\nname = \"api\"\naction = \"allow\"\n[[policy.rule]]\n\
         from = [{ identities = [\"spiffe://t/web\"] }]\nto = [{ ports = [8080] }]\n\n\
         [[test]]\nname = \"web\"\nfrom = \"spiffe://t/web\"\nto_port = 8080\nexpect = \"allow\"\n",
    )
    .unwrap();
    d.ok(&["key", "gen", "--out", "k.key"]);
    let sock = d.path("meshd.sock");
    let sock = sock.to_str().unwrap();
    let status = serde_json::json!({
        "ready": true, "identity": "spiffe://t/a", "public_key": "k", "listen": "198.18.0.1:51820",
        "tun": "mesh0", "addresses": ["100.64.0.1/32"], "peers": [], "drops": mesh_proto::control::NodeDrops::default(),
    });
    let ok = |result: serde_json::Value| {
        format!("{}\n", serde_json::json!({"ok": true, "result": result}))
    };
    let online: Vec<(Vec<&str>, String)> = vec![
        (vec!["status"], ok(status.clone())),
        (vec!["status", "--json"], ok(status)),
        (vec!["peer", "list"], ok(serde_json::json!({"peers": []}))),
        (
            vec!["workload", "list"],
            ok(serde_json::json!({"workloads": []})),
        ),
        (
            vec!["log"],
            ok(
                serde_json::json!({"lines": [{"time": "t", "src": "spiffe://t/a",
                "src_addr": "100.64.0.1", "dst": null, "dst_addr": "100.64.0.2", "dst_port": 22,
                "proto": "tcp", "decision": "deny", "reason": "default_deny",
                "policy": null, "rule": null}]}),
            ),
        ),
    ];
    let server = fake_meshd(
        &d.path("meshd.sock"),
        online.iter().map(|(_, r)| r.clone()).collect(),
    );
    let offline: Vec<Vec<&str>> = vec![
        vec!["cert", "show", "a.crt"],
        vec!["cert", "show", "--json", "a.crt"],
        vec!["cert", "verify", "--ca", "ca.crt", "a.crt"],
        vec![
            "cert",
            "issue",
            "--identity",
            "spiffe://t/b",
            "--ip",
            "100.64.0.2",
            "--out",
            "b.crt",
        ],
        vec![
            "cert", "renew", "a.crt", "--out", "a2.crt", "--ca", "ca.crt", "--ca-key", "ca.key",
        ],
        vec![
            "ca",
            "init",
            "--trust-domain",
            "u",
            "--cert",
            "u.crt",
            "--key",
            "u.key",
        ],
        vec!["key", "gen"],
        vec!["key", "pub", "k.key"],
        vec!["policy", "check", "p.toml"],
        vec!["policy", "test", "p.toml"],
        vec![
            "policy",
            "explain",
            "--file",
            "p.toml",
            "--from",
            "spiffe://t/web",
            "--to-port",
            "8080",
        ],
    ];
    let with_socket: Vec<Vec<&str>> = online
        .iter()
        .map(|(args, _)| [&["--socket", sock][..], args].concat())
        .collect();
    for args in offline.iter().chain(&with_socket) {
        let out = Command::new(env!("CARGO_BIN_EXE_meshctl"))
            .args(args)
            .current_dir(&d.0)
            .env_remove("MESHD_SOCKET")
            .stdin(Stdio::null())
            .stdout(closed_pipe())
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(141), "meshctl {args:?}: {stderr}");
        assert!(stderr.is_empty(), "meshctl {args:?}: {stderr}");
    }
    server.join().unwrap();
}

/// meshd's answers reach the operator typed: each kind of error is one line naming
/// meshd and its own exit code, a reply that is not of the contract is an error too,
/// and `--json` prints the contract's fields (the keys scripts read).
#[test]
fn meshd_answers_map_to_lines_and_exit_codes() {
    let d = Dir::new("answers");
    let sock = d.path("meshd.sock");
    let sock_arg = sock.to_str().unwrap();
    let err = |kind: &str, msg: &str| {
        format!(
            "{}\n",
            serde_json::json!({"ok": false, "kind": kind, "error": msg})
        )
    };
    let status = serde_json::json!({
        "ready": true, "identity": "spiffe://t/a", "public_key": "k", "listen": "198.18.0.1:51820",
        "tun": "mesh0", "addresses": ["100.64.0.1/32"], "peers": [], "drops": {},
        "workloads": [{"name": "node", "identity": "spiffe://t/a", "public_key": "k",
            "addresses": ["100.64.0.1/32"], "not_after": 9, "attach": "tun", "source": "node"}],
        "enforcement": {
            "policy": {"name": "p.toml", "origin": "applied", "default": "deny",
                "policies": 1, "tests": 0, "source": "S"},
            "counters": {"flows": 2, "drops": {"default_deny": 3},
                "rules": [{"policy": "api", "rule": "0", "allow": 1, "deny": 0, "audit": 0}]},
            "decision_log": {"written": 3, "suppressed": 0, "follower_lost": 0}},
    });
    // (args, reply, exit code, stderr line)
    let cases: Vec<(Vec<&str>, String, i32, &str)> = vec![
        (
            vec!["peer", "remove", "spiffe://t/b"],
            err("not_found", "peer_remove: no peer spiffe://t/b"),
            3,
            "meshctl: meshd: peer_remove: no peer spiffe://t/b\n",
        ),
        (
            vec!["status"],
            err("not_allowed", "permission denied"),
            4,
            "meshctl: meshd: permission denied\n",
        ),
        (
            vec!["peer", "list"],
            err(
                "busy",
                "too many control clients, each serving a request: try again",
            ),
            5,
            "meshctl: meshd: too many control clients, each serving a request: try again\n",
        ),
        (
            vec!["workload", "list"],
            err(
                "bad_request",
                "bad request: unknown variant `workload_list`",
            ),
            6,
            "meshctl: meshd: bad request: unknown variant `workload_list`\n",
        ),
        (
            vec!["workload", "remove", "web"],
            err("internal", "workload_remove: cannot persist: disk full"),
            7,
            "meshctl: meshd: workload_remove: cannot persist: disk full\n",
        ),
        (
            vec!["log"],
            err("refused", "log: no"),
            1,
            "meshctl: meshd: log: no\n",
        ),
        (
            vec!["peer", "list"],
            "{\"ok\":true,\"result\":{\"peers\":\"none\"}}\n".into(),
            1,
            "meshctl: bad reply from meshd: ",
        ),
    ];
    let mut replies: Vec<String> = cases.iter().map(|c| c.1.clone()).collect();
    replies.push(format!(
        "{}\n",
        serde_json::json!({"ok": true, "result": status})
    ));
    let server = fake_meshd(&sock, replies);
    for (args, _, code, line) in &cases {
        let all = [&["--socket", sock_arg][..], args].concat();
        let out = d.run(&all);
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(out.status.code(), Some(*code), "meshctl {args:?}: {stderr}");
        assert!(stderr.starts_with(line), "meshctl {args:?}: {stderr:?}");
        assert_eq!(stderr.lines().count(), 1, "{stderr:?}");
        assert!(out.stdout.is_empty());
    }
    let v = json(&d.ok(&["--socket", sock_arg, "status", "--json"]));
    server.join().unwrap();
    assert_eq!(v["ready"], true);
    assert_eq!(v["workloads"][0]["attach"], "tun");
    let e = &v["enforcement"];
    assert_eq!(e["policy"]["source"], "S");
    assert_eq!(e["policy"]["origin"], "applied");
    assert_eq!(e["counters"]["flows"], 2);
    assert_eq!(e["counters"]["drops"]["default_deny"], 3);
    assert_eq!(e["counters"]["rules"][0]["allow"], 1);
    assert_eq!(e["decision_log"]["written"], 3);
}
