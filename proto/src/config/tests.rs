use super::*;

const GOOD: &str = r#"
[node]
cert = "a.crt"
key = "a.key"
ca = "ca.crt"
listen = "198.18.0.1:51820"
state_dir = "state"
control_socket = "meshd.sock"

[[peer]]
cert = "b.crt"
endpoint = "198.18.0.2:51820"

[[peer]]
cert = "/abs/c.crt"
"#;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(Path::new("/etc/mesh/meshd.toml"), text)
}

#[test]
fn good_config_with_defaults_and_relative_paths() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.node.cert, Path::new("/etc/mesh/a.crt"));
    assert_eq!(c.node.tun, "mesh0");
    assert_eq!(c.node.mtu, 1420);
    assert_eq!(c.node.workers, 2);
    let one_per_direction = parse(&GOOD.replace("state_dir", "workers = 0\nstate_dir")).unwrap();
    assert_eq!(one_per_direction.node.workers, 0);
    assert_eq!(c.node.log_level, LogLevel::Info);
    assert_eq!(c.node.routes, None);
    assert_eq!(c.node.cpu_latency_us, None);
    assert!(
        c.node.host_filter,
        "the host filter is on unless switched off"
    );
    assert!(c.node.udp_offload);
    assert!(c.policy.is_none());
    assert_eq!(c.peers.len(), 2);
    assert_eq!(
        c.peers[0].endpoint,
        Some("198.18.0.2:51820".parse().unwrap())
    );
    assert_eq!(c.peers[1].cert, Path::new("/abs/c.crt"));
    assert_eq!(c.peers[1].endpoint, None);
    assert_eq!(c.line_of("peer[1].cert"), Some(15));
    assert_eq!(
        c.error("peer[0].cert", "cannot read").to_string(),
        "/etc/mesh/meshd.toml:11: peer[0].cert: cannot read"
    );
}

#[test]
fn ipv6_listen_routes_policy() {
    let text = GOOD.replace("198.18.0.1:51820", "[fd00:198:18::1]:51820").replace(
        "control_socket = \"meshd.sock\"",
        "control_socket = \"meshd.sock\"\nroutes = [\"100.64.0.0/10\", \"fd00:6d65:7368::/48\"]\nmtu = 1280\ncpu_latency_us = 0\nhost_filter = false\nudp_offload = false\n\n[policy]\ndefault = \"allow\"\nfile = \"p.toml\"",
    );
    let c = parse(&text).unwrap();
    assert!(c.node.listen.is_ipv6());
    assert_eq!(c.node.routes.as_ref().unwrap().len(), 2);
    assert_eq!(c.node.mtu, 1280);
    assert_eq!(c.node.cpu_latency_us, Some(0));
    assert!(!c.node.host_filter);
    assert!(!c.node.udp_offload);
    assert_eq!(c.line_of("node.udp_offload"), Some(13));
    let p = c.policy.unwrap();
    assert_eq!(p.default, PolicyDefault::Allow);
    assert_eq!(p.file, Some(PathBuf::from("/etc/mesh/p.toml")));
}

/// Each bad input gives the expected "file:line: field: ..." prefix.
#[test]
fn errors_name_file_line_and_field() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "listen = \"198.18.0.1:51820\"",
            "listen = \"198.18.0.1\"",
            "/etc/mesh/meshd.toml:6: node.listen: ",
        ),
        (
            "state_dir = \"state\"",
            "workers = 17\nstate_dir = \"state\"",
            "/etc/mesh/meshd.toml:7: node.workers: 17 is out of range 0..=16",
        ),
        (
            "state_dir",
            "lisen = 1\nstate_dir",
            "/etc/mesh/meshd.toml:7: node: unknown field `lisen`",
        ),
        (
            "endpoint = \"198.18.0.2:51820\"",
            "endpoint = \"nope\"",
            "/etc/mesh/meshd.toml:12: peer[0].endpoint: ",
        ),
        (
            "cert = \"/abs/c.crt\"",
            "cert = \"/abs/c.crt\"\nport = 3",
            "/etc/mesh/meshd.toml:16: peer[1]: unknown field `port`",
        ),
        (
            "state_dir = \"state\"",
            "state_dir = \"state\"\nmtu = 100",
            "/etc/mesh/meshd.toml:8: node.mtu: 100 is out of range",
        ),
        (
            "state_dir = \"state\"",
            "state_dir = \"state\"\nmtu = \"big\"",
            "/etc/mesh/meshd.toml:8: node: invalid type",
        ),
        (
            "state_dir = \"state\"",
            "state_dir = \"state\"\ntun = \"this-name-is-too-long\"",
            "/etc/mesh/meshd.toml:8: node.tun: ",
        ),
        (
            "state_dir = \"state\"",
            "state_dir = \"state\"\nroutes = [\"100.64.0.1/10\"]",
            "/etc/mesh/meshd.toml:8: node.routes[0]: \"100.64.0.1/10\" has host bits set",
        ),
        (
            "state_dir = \"state\"",
            "state_dir = \"state\"\nlog_level = \"loud\"",
            "/etc/mesh/meshd.toml:8: node.log_level: ",
        ),
        (
            "state_dir = \"state\"",
            "state_dir = \"state\"\ncpu_latency_us = -1",
            "/etc/mesh/meshd.toml:8: node.cpu_latency_us: -1 is out of range 0..=100000 (microseconds)",
        ),
        (
            "state_dir = \"state\"",
            "state_dir = \"state\"\ncpu_latency_us = 100001",
            "/etc/mesh/meshd.toml:8: node.cpu_latency_us: 100001 is out of range",
        ),
        (
            "state_dir = \"state\"",
            "state_dir = \"state\"\nhost_filter = \"off\"",
            "/etc/mesh/meshd.toml:8: node: invalid type: string \"off\", expected a boolean",
        ),
        (
            "cert = \"/abs/c.crt\"",
            "cert = \"b.crt\"",
            "/etc/mesh/meshd.toml:15: peer[1].cert: same certificate as peer[0]",
        ),
        (
            "[[peer]]\ncert = \"b.crt\"",
            "[policy]\ndefault = \"maybe\"\n[[peer]]\ncert = \"b.crt\"",
            "/etc/mesh/meshd.toml:11: policy.default: ",
        ),
        (
            "cert = \"a.crt\"",
            "cert = \"\"",
            "/etc/mesh/meshd.toml:3: node.cert: path may not be empty",
        ),
        (
            "cert = \"a.crt\"\n",
            "",
            "/etc/mesh/meshd.toml:2: node: missing field `cert`",
        ),
        ("[node]", "[node", "/etc/mesh/meshd.toml:2: "),
    ];
    for (from, to, want) in cases {
        let text = GOOD.replacen(from, to, 1);
        assert_ne!(text, GOOD, "case {from:?} did not apply");
        let err = parse(&text).expect_err(to).to_string();
        assert!(
            err.starts_with(want),
            "for {to:?}\n got: {err}\nwant: {want}..."
        );
        assert!(!err.contains('\n'), "one line: {err}");
    }
}

#[test]
fn workloads_parse_and_errors_name_the_field() {
    let text = format!(
        "{GOOD}\n[[workload]]\nname = \"web\"\ncert = \"web.crt\"\nkey = \"web.key\"\nveth = \"p-web\"\n\n[[workload]]\nname = \"db\"\ncert = \"db.crt\"\nkey = \"db.key\"\n"
    );
    let c = parse(&text).unwrap();
    assert_eq!(c.workloads.len(), 2);
    assert_eq!(c.workloads[0].cert, Path::new("/etc/mesh/web.crt"));
    assert_eq!(c.workloads[0].veth.as_deref(), Some("p-web"));
    assert_eq!(c.workloads[1].veth, None);
    for (from, to, want) in [
        (
            "name = \"db\"",
            "name = \"web\"",
            "workload[1].name: same name as workload[0]",
        ),
        (
            "name = \"db\"",
            "name = \"node\"",
            "workload[1].name: \"node\" is the node's own identity",
        ),
        ("name = \"db\"", "name = \"DB\"", "workload[1].name: "),
        (
            "veth = \"p-web\"",
            "veth = \"mesh0\"",
            "workload[0].veth: \"mesh0\" is used already",
        ),
        (
            "cert = \"db.crt\"",
            "cert = \"a.crt\"",
            "workload[1].cert: certificate already used",
        ),
        (
            "key = \"db.key\"",
            "key = \"db.key\"\nport = 1",
            "workload[1]: unknown field `port`",
        ),
    ] {
        let bad = text.replacen(from, to, 1);
        let err = parse(&bad).expect_err(to).to_string();
        assert!(err.contains(want), "for {to:?}: {err}");
    }
}

#[test]
fn store_table() {
    let text = format!(
        "{GOOD}\n[store]\nendpoints = [\"http://198.18.0.9:2379\", \"http://[fd00::9]:2379\"]\npolicy_keys = [\"policy.pub\", \"/keys/old.pub\"]\n"
    );
    let c = parse(&text).unwrap();
    let s = c.store.as_ref().unwrap();
    assert_eq!(s.endpoints.len(), 2);
    assert_eq!(s.prefix, None);
    assert_eq!(s.tls, None);
    assert_eq!(s.lease_secs, DEFAULT_LEASE_SECS);
    assert_eq!(s.advertise, ["198.18.0.1:51820".parse().unwrap()]);
    assert_eq!(
        s.policy_keys,
        [
            PathBuf::from("/etc/mesh/policy.pub"),
            PathBuf::from("/keys/old.pub")
        ]
    );
    let td = TrustDomain::parse("example.org").unwrap();
    assert_eq!(s.prefix_for(&td).as_str(), "/meshd/example.org/");
    assert!(parse(GOOD).unwrap().store.is_none());

    let tls = format!(
        "{GOOD}\n[store]\nendpoints = [\"https://etcd.example.org:2379\"]\nprefix = \"/fleet/a/\"\nlease_secs = 3\ntls_ca = \"etcd-ca.pem\"\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"\n"
    );
    let c = parse(&tls.replace("198.18.0.1:51820", "0.0.0.0:51820"));
    let e = c.unwrap_err().to_string();
    assert!(
        e.starts_with("/etc/mesh/meshd.toml:17: store.advertise: node.listen is 0.0.0.0:51820"),
        "{e}"
    );
    let c = parse(&format!("{tls}advertise = [\"[fd00::1]:51820\"]\n")).unwrap();
    let s = c.store.unwrap();
    assert_eq!(s.advertise, ["[fd00::1]:51820".parse().unwrap()]);
    assert_eq!(s.prefix_for(&td).as_str(), "/fleet/a/");
    assert_eq!(s.lease_secs, 3);
    assert_eq!(
        s.tls,
        Some(StoreTls {
            ca: PathBuf::from("/etc/mesh/etcd-ca.pem"),
            client: Some((
                PathBuf::from("/etc/mesh/c.pem"),
                PathBuf::from("/etc/mesh/k.pem")
            )),
        })
    );

    // Line 17 is `[store]`, line 18 `endpoints`.
    let base = format!("{GOOD}\n[store]\nendpoints = [\"http://198.18.0.9:2379\"]\n");
    for (add, want) in [
        ("", "OK"),
        (
            "prefix = \"meshd\"\n",
            "meshd.toml:19: store.prefix: \"meshd\" must start and end with \"/\"",
        ),
        (
            "lease_secs = 1\n",
            "meshd.toml:19: store.lease_secs: 1 is out of range 2..=3600",
        ),
        (
            "policy_keys = [\"a.pub\", \"a.pub\"]\n",
            "meshd.toml:19: store.policy_keys[1]: listed twice",
        ),
        (
            "policy_keys = [\"\"]\n",
            "meshd.toml:19: store.policy_keys[0]: path may not be empty",
        ),
        (
            "tls_ca = \"ca.pem\"\n",
            "meshd.toml:19: store.tls_ca: TLS settings need https:// endpoints",
        ),
        (
            "tls_cert = \"c.pem\"\n",
            "meshd.toml:19: store.tls_cert: needs tls_key too",
        ),
        (
            "endpont = 1\n",
            "meshd.toml:19: store: unknown field `endpont`",
        ),
    ] {
        let text = format!("{base}{add}");
        match parse(&text) {
            Ok(_) => assert_eq!(want, "OK", "{add:?} was accepted"),
            Err(e) => {
                let e = e.to_string();
                assert!(e.starts_with(&format!("/etc/mesh/{want}")), "{add:?}: {e}");
            }
        }
    }
    for (endpoints, want) in [
        ("[]", "meshd.toml:17: store.endpoints: list 1 to 16"),
        (
            "[\"198.18.0.9:2379\"]",
            "meshd.toml:18: store.endpoints[0]: \"198.18.0.9:2379\" must start with http://",
        ),
        (
            "[\"http://198.18.0.9\"]",
            "meshd.toml:18: store.endpoints[0]: ",
        ),
        (
            "[\"http://198.18.0.9:2379/v3\"]",
            "meshd.toml:18: store.endpoints[0]: ",
        ),
        (
            "[\"http://198.18.0.9:0\"]",
            "meshd.toml:18: store.endpoints[0]: \"http://198.18.0.9:0\": port 0 is out of range",
        ),
        ("[\"http://a b:1\"]", "meshd.toml:18: store.endpoints[0]: "),
        ("[\"http://[zz]:1\"]", "meshd.toml:18: store.endpoints[0]: "),
        (
            "[\"http://a:1\", \"https://b:1\"]",
            "meshd.toml:18: store.endpoints[1]: mixes http:// and https://",
        ),
        (
            "[\"https://b:1\"]",
            "meshd.toml:17: store.tls_ca: https:// endpoints need tls_ca",
        ),
    ] {
        let text = format!("{GOOD}\n[store]\nendpoints = {endpoints}\n");
        let e = parse(&text).expect_err(endpoints).to_string();
        assert!(
            e.starts_with(&format!("/etc/mesh/{want}")),
            "{endpoints}: {e}"
        );
        assert!(!e.contains('\n'), "one line: {e}");
    }
}

#[test]
fn missing_node_table() {
    let err = parse("[[peer]]\ncert = \"b.crt\"\n").unwrap_err();
    assert!(err.to_string().contains("missing field `node`"), "{err}");
}

#[test]
fn line_numbers_from_offsets() {
    assert_eq!(line_of_offset("a\nb\nc", 0), 1);
    assert_eq!(line_of_offset("a\nb\nc", 2), 2);
    assert_eq!(line_of_offset("a\nb\nc", 4), 3);
    assert_eq!(line_of_offset("a\nb\nc", 99), 3);
}
