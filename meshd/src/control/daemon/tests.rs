use super::*;
use mesh_proto::testing::TestCa;

#[test]
fn check_peer_accepts_sound_refuses_foreign_and_self() {
    let ca = TestCa::new("t");
    let now = mesh_proto::testing::NOW;
    let (own, _) = ca.leaf("spiffe://t/a", &["100.64.0.1/32"]);
    let (b, _) = ca.leaf("spiffe://t/b", &["100.64.0.2/32"]);
    let (old, _) = ca.expired_leaf("spiffe://t/c", &["100.64.0.3/32"]);
    let (foreign, _) = ca.foreign_leaf("spiffe://t/d", &["100.64.0.4/32"]);
    let (clash, _) = ca.leaf("spiffe://t/e", &["100.64.0.1/32"]);
    let (future, _) = ca.future_leaf("spiffe://t/f", &["100.64.0.5/32"]);
    assert_eq!(check_peer(&ca.ca(), &own, &b, now), Ok(None));
    // Outside their window: kept, with the reason the data path gives.
    assert_eq!(
        check_peer(&ca.ca(), &own, &old, now),
        Ok(Some(OutsideWindow::Expired(old.not_after())))
    );
    assert_eq!(
        check_peer(&ca.ca(), &own, &future, now),
        Ok(Some(OutsideWindow::NotYetValid(future.not_before())))
    );
    assert!(!peer_spec(&future).is_valid_at(now));
    assert!(check_peer(&ca.ca(), &own, &foreign, now).is_err());
    assert!(check_peer(&ca.ca(), &own, &own, now)
        .unwrap_err()
        .contains("own identity"));
    // Addresses are the overlap check's business (crate::peers::overlap).
    assert_eq!(check_peer(&ca.ca(), &own, &clash, now), Ok(None));
}

/// A directory of files for `load`: the CA, the node's certificate and key, and
/// meshd.toml with `extra` appended; removed on drop.
struct Files(std::path::PathBuf);

impl Files {
    fn new(name: &str, ca: &TestCa) -> Files {
        let dir =
            std::env::temp_dir().join(format!("meshd-daemon-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        ca.write_ca(&dir);
        ca.write_leaf(&dir, "a", "spiffe://t/a", &["100.64.0.1/32"], &[]);
        Files(dir)
    }

    fn cert(&self, name: &str, cert: &Certificate) {
        files::write_certificate(&self.0.join(format!("{name}.crt")), cert).unwrap();
    }

    fn config(&self, extra: &str) -> Config {
        self.config_listen("127.0.0.1:0", extra)
    }

    fn config_listen(&self, listen: &str, extra: &str) -> Config {
        let text = format!(
            "[node]\ncert = \"a.crt\"\nkey = \"a.key\"\nca = \"ca.crt\"\n\
             listen = \"{listen}\"\nstate_dir = \"state\"\n\
             control_socket = \"meshd.sock\"\n{extra}"
        );
        Config::parse(&self.0.join("meshd.toml"), &text).unwrap()
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// node.mtu reaches the enforcer: the segments it builds fit the TUN.
#[test]
fn the_enforcers_segments_follow_the_mtu() {
    let ca = TestCa::new("t");
    let f = Files::new("mss", &ca);
    assert_eq!(enforcer_limits(&f.config("")).mss, 1360);
    assert_eq!(enforcer_limits(&f.config("mtu = 1280\n")).mss, 1220);
    assert_eq!(enforcer_limits(&f.config("mtu = 9000\n")).mss, 8940);
}

/// `[[peer]]` certificates outside their window: meshd starts (their handshakes
/// are refused), `check-config` names each with the data path's reason.
#[test]
fn config_peers_outside_their_window_are_reported_with_the_right_reason() {
    let ca = TestCa::new("t");
    let f = Files::new("window", &ca);
    let (old, _) = ca.expired_leaf("spiffe://t/old", &["100.64.0.3/32"]);
    let (future, _) = ca.future_leaf("spiffe://t/future", &["100.64.0.4/32"]);
    let (b, _) = ca.leaf("spiffe://t/b", &["100.64.0.2/32"]);
    f.cert("old", &old);
    f.cert("future", &future);
    f.cert("b", &b);
    let config = f.config(
        "\n[[peer]]\ncert = \"old.crt\"\n\n[[peer]]\ncert = \"b.crt\"\n\n[[peer]]\ncert = \"future.crt\"\n",
    );
    let l = load(config, mesh_proto::testing::NOW).unwrap();
    assert_eq!(l.peers.len(), 3, "kept in the registry");
    let refused: Vec<String> = l.refused.iter().map(ToString::to_string).collect();
    assert_eq!(refused.len(), 2, "{refused:?}");
    let toml = f.0.join("meshd.toml").display().to_string();
    assert!(
        refused[0].starts_with(&format!("{toml}:10: peer[0].cert: "))
            && refused[0].contains(&format!("certificate expired at {}", old.not_after()))
            && refused[0].contains("spiffe://t/old"),
        "{}",
        refused[0]
    );
    assert!(
        refused[1].starts_with(&format!("{toml}:16: peer[2].cert: "))
            && refused[1].contains(&format!(
                "certificate is not valid before {}",
                future.not_before()
            ))
            && !refused[1].contains("expired"),
        "{}",
        refused[1]
    );
}

/// Issue 18, weakness 5: certificates whose addresses overlap another identity's
/// (the node's, a workload's, a peer's) are refused wherever they enter at
/// start, naming both identities and prefixes.
#[test]
fn overlapping_addresses_are_refused_at_load() {
    let ca = TestCa::new("t");
    let f = Files::new("overlap", &ca);
    let (b, _) = ca.leaf("spiffe://t/b", &["100.64.0.2/32"]);
    let (x, _) = ca.leaf("spiffe://t/x", &["100.64.0.2/31"]);
    let (wide, _) = ca.leaf("spiffe://t/wide", &["100.64.0.0/24"]);
    f.cert("b", &b);
    f.cert("x", &x);
    f.cert("wide", &wide);
    let toml = f.0.join("meshd.toml").display().to_string();
    let peer = |file: &str| format!("\n[[peer]]\ncert = \"{file}.crt\"\n");
    let err = |extra: &str| match load(f.config(extra), mesh_proto::testing::NOW) {
        Ok(_) => panic!("accepted: {extra}"),
        Err(e) => e.to_string(),
    };
    // The node's own address.
    let e = err(&peer("wide"));
    assert!(
        e.starts_with(&format!("{toml}:10: peer[0].cert: "))
            && e.contains(
                "address 100.64.0.0/24 of spiffe://t/wide overlaps 100.64.0.1/32 of spiffe://t/a"
            ),
        "{e}"
    );
    // Another peer's.
    let e = err(&format!("{}{}", peer("b"), peer("x")));
    assert!(
        e.starts_with(&format!("{toml}:13: peer[1].cert: "))
            && e.contains(
                "address 100.64.0.2/31 of spiffe://t/x overlaps 100.64.0.2/32 of spiffe://t/b"
            ),
        "{e}"
    );
    // A local workload's (pod's), against a peer.
    ca.write_leaf(&f.0, "pod", "spiffe://t/pod", &["100.64.0.3/32"], &[]);
    let workload = "\n[[workload]]\nname = \"pod\"\ncert = \"pod.crt\"\nkey = \"pod.key\"\n";
    let e = err(&format!("{workload}{}", peer("x")));
    assert!(
        e.starts_with(&format!("{toml}:15: peer[0].cert: "))
            && e.contains("of spiffe://t/x overlaps 100.64.0.3/32 of spiffe://t/pod"),
        "{e}"
    );
    // A workload against the node.
    ca.write_leaf(&f.0, "clash", "spiffe://t/clash", &["100.64.0.1/32"], &[]);
    let e = err("\n[[workload]]\nname = \"clash\"\ncert = \"clash.crt\"\nkey = \"clash.key\"\n");
    assert!(
        e.starts_with(&format!("{toml}:11: workload[0].cert: "))
            && e.contains("of spiffe://t/clash overlaps 100.64.0.1/32 of spiffe://t/a"),
        "{e}"
    );
    // Stored by an earlier meshd: skipped (logged), the rest starts.
    let mut changes = PeerChanges::load(&f.0.join("state")).unwrap();
    changes.add(crate::control::state::StoredPeer {
        identity: "spiffe://t/x".into(),
        cert: x.to_pem(),
        endpoint: None,
    });
    changes.save(&f.0.join("state")).unwrap();
    let l = load(f.config(&peer("b")), mesh_proto::testing::NOW).unwrap();
    let ids: Vec<String> = l
        .peers
        .iter()
        .map(|p| p.spec.identity.to_string())
        .collect();
    assert_eq!(ids, ["spiffe://t/b"]);
    // A renewal (the same identity and addresses, stored over the config's)
    // overlaps nothing.
    let (b2, _) = ca.leaf("spiffe://t/b", &["100.64.0.2/32"]);
    changes.add(crate::control::state::StoredPeer {
        identity: "spiffe://t/b".into(),
        cert: b2.to_pem(),
        endpoint: None,
    });
    changes.save(&f.0.join("state")).unwrap();
    let l = load(f.config(&peer("b")), mesh_proto::testing::NOW).unwrap();
    let got: Vec<(String, Source)> = l
        .peers
        .iter()
        .map(|p| (p.spec.identity.to_string(), p.source))
        .collect();
    assert_eq!(got, [("spiffe://t/b".to_string(), Source::Runtime)]);
    assert_eq!(l.peers[0].cert, b2);
}

/// Issue 26, failure 5 (and 4): `check-config` fails where the start would on
/// this host — a port in use, an address not on this host, an interface of the
/// TUN's name — naming `meshd.toml:N: node.listen` / `node.tun`; not for the meshd
/// that runs with this configuration itself.
#[test]
fn check_config_checks_the_port_and_the_device_name_on_this_host() {
    let ca = TestCa::new("t");
    let f = Files::new("host", &ca);
    let toml = f.0.join("meshd.toml").display().to_string();
    let problems =
        |c: &Config| -> Vec<String> { check_host(c).iter().map(ToString::to_string).collect() };
    assert_eq!(
        problems(&f.config("tun = \"meshd-t-free\"\n")),
        Vec::<String>::new()
    );
    // A port someone holds.
    let held = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let c = f.config_listen(&format!("127.0.0.1:{port}"), "tun = \"meshd-t-free\"\n");
    let p = problems(&c);
    assert!(
        p.len() == 1
            && p[0].starts_with(&format!(
                "{toml}:5: node.listen: cannot listen on UDP 127.0.0.1:{port}: "
            ))
            && p[0].ends_with("another process holds this port (another meshd?)"),
        "{p:?}"
    );
    // An address this host does not have (an unassigned underlay address), unless
    // the host lets anyone bind any address (then meshd would start too).
    let nonlocal = std::fs::read_to_string("/proc/sys/net/ipv4/ip_nonlocal_bind")
        .is_ok_and(|v| v.trim() != "0");
    if !nonlocal {
        let c = f.config_listen("198.19.255.254:51820", "tun = \"meshd-t-free\"\n");
        let p = problems(&c);
        assert!(
            p.len() == 1
                && p[0].contains("node.listen")
                && p[0].ends_with("the address is not on this host"),
            "{p:?}"
        );
    }
    // An interface of the TUN's name (every host has `lo`).
    let p = problems(&f.config("tun = \"lo\"\n"));
    assert!(
        p.len() == 1
            && p[0].starts_with(&format!(
                "{toml}:8: node.tun: an interface named lo exists already"
            )),
        "{p:?}"
    );
    // Both held by the meshd that runs this configuration: its control socket
    // says so.
    let status = Status {
        ready: true,
        identity: "spiffe://t/a".into(),
        public_key: String::new(),
        listen: format!("0.0.0.0:{port}").parse().unwrap(),
        tun: "lo".into(),
        addresses: vec![],
        peers: vec![],
        drops: NodeDrops::default(),
        workloads: vec![],
        enforcement: None,
        cpu_latency: None,
        host_filter: None,
        store: None,
    };
    let listener = std::os::unix::net::UnixListener::bind(f.0.join("meshd.sock")).unwrap();
    // The running meshd's side of the test.
    #[allow(clippy::disallowed_methods)]
    let running = std::thread::spawn(move || {
        use std::io::{BufRead, Write};
        let (s, _) = listener.accept().unwrap();
        let mut line = String::new();
        std::io::BufReader::new(&s).read_line(&mut line).unwrap();
        assert!(line.contains("\"status\""), "{line}");
        let reply = mesh_proto::control::reply_line(&Ok(status));
        (&s).write_all(format!("{reply}\n").as_bytes()).unwrap();
    });
    let c = f.config_listen(&format!("127.0.0.1:{port}"), "tun = \"lo\"\n");
    assert_eq!(problems(&c), Vec::<String>::new());
    running.join().unwrap();
}

/// No table with overlapping addresses is built, whichever way they came.
#[test]
fn tables_with_overlapping_addresses_are_never_built() {
    let ca = TestCa::new("t");
    let entry = |cert: &Certificate| PeerEntry {
        spec: peer_spec(cert),
        cert: cert.clone(),
        endpoint: None,
        source: Source::Runtime,
    };
    let (a, ka) = ca.leaf("spiffe://t/a", &["100.64.0.1/32"]);
    let (b, _) = ca.leaf("spiffe://t/b", &["100.64.0.2/32"]);
    let (x, _) = ca.leaf("spiffe://t/x", &["100.64.0.0/30"]);
    let locals = vec![Arc::new(Local::new(peer_spec(&a), *ka.as_bytes()))];
    let e = build_table(&locals, &[entry(&b), entry(&x)], &PeerTable::default(), 1)
        .err()
        .unwrap();
    assert!(
        e.contains("spiffe://t/x") && e.contains("spiffe://t/a"),
        "{e}"
    );
    let (y, _) = ca.leaf("spiffe://t/y", &["100.64.0.2/31"]);
    let e = build_table(&locals, &[entry(&b), entry(&y)], &PeerTable::default(), 1)
        .err()
        .unwrap();
    assert!(
        e.starts_with(
            "address 100.64.0.2/31 of spiffe://t/y overlaps 100.64.0.2/32 of spiffe://t/b"
        ),
        "{e}"
    );
}

/// Every enforcer counter reaches `status` under its own name.
#[test]
fn enforcement_counters_keep_every_field() {
    let c = enforcement_counters(enforce::L4Counters {
        delivered: 1,
        flows: 2,
        flows_cut: 3,
        flows_evicted: 4,
        drops: [("default_deny", 5)].into(),
        rules: vec![enforce::RuleCount {
            policy: "p".into(),
            rule: "r".into(),
            allow: 6,
            deny: 7,
            audit: 8,
        }],
        l7_flows: 9,
        l7_held_bytes: 10,
        http_requests: 11,
        http_refused: 12,
    });
    assert_eq!(
        serde_json::to_value(c).unwrap(),
        serde_json::json!({"delivered": 1, "flows": 2, "flows_cut": 3, "flows_evicted": 4,
            "drops": {"default_deny": 5},
            "rules": [{"policy": "p", "rule": "r", "allow": 6, "deny": 7, "audit": 8}],
            "l7_flows": 9, "l7_held_bytes": 10, "http_requests": 11, "http_refused": 12})
    );
}

#[test]
fn rebuild_keeps_unchanged_peers() {
    let ca = TestCa::new("t");
    let (b, _) = ca.leaf("spiffe://t/b", &["100.64.0.2/32"]);
    let (c, _) = ca.leaf("spiffe://t/c", &["100.64.0.3/32"]);
    let entry = |cert: &Certificate| PeerEntry {
        spec: peer_spec(cert),
        cert: cert.clone(),
        endpoint: None,
        source: Source::Runtime,
    };
    let (a, ka) = ca.leaf("spiffe://t/a", &["100.64.0.1/32"]);
    let locals = vec![Arc::new(Local::new(peer_spec(&a), *ka.as_bytes()))];
    let t1 = build_table(&locals, &[entry(&b)], &PeerTable::default(), 1).unwrap();
    let t2 = build_table(&locals, &[entry(&b), entry(&c)], &t1, 1).unwrap();
    assert!(Arc::ptr_eq(&t1.peers()[0], &t2.peers()[0]));
    assert_ne!(t2.peers()[0].index, t2.peers()[1].index);
    assert!(t2.route("100.64.0.3".parse().unwrap()).is_some());
}

#[test]
fn rebuild_after_renewal_keeps_the_session_for_the_same_keys_only() {
    let ca = TestCa::new("t");
    let entry = |cert: &Certificate| PeerEntry {
        spec: peer_spec(cert),
        cert: cert.clone(),
        endpoint: None,
        source: Source::Runtime,
    };
    // A certificate for the same key as `cert`, ending a day later.
    let renew = |cert: &Certificate, groups: &[&str]| {
        let params = mesh_proto::cert::LeafParams {
            identity: cert.identity().clone(),
            addresses: cert.addresses().to_vec(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            public_key: mesh_proto::key::PublicKey::from(*cert.public_key()),
            validity_secs: cert.not_after().0 - cert.not_before().0 + 86_400,
        };
        ca.signer().issue(params, cert.not_before()).unwrap()
    };
    let (a, ka) = ca.leaf("spiffe://t/a", &["100.64.0.1/32"]);
    let (b, _) = ca.leaf("spiffe://t/b", &["100.64.0.2/32"]);
    let local = |cert: &Certificate, key: &PrivateKey| {
        vec![Arc::new(Local::new(peer_spec(cert), *key.as_bytes()))]
    };
    let t1 = build_table(&local(&a, &ka), &[entry(&b)], &PeerTable::default(), 1).unwrap();
    let old = t1.peers()[0].clone();
    old.set_endpoint(Some("198.18.0.2:51820".parse().unwrap()));

    // The peer's certificate renewed for its key: a successor in the same slot,
    // on the same session state, with the new facts.
    let b2 = renew(&b, &["db"]);
    let t2 = build_table(&local(&a, &ka), &[entry(&b2)], &t1, 7).unwrap();
    let p2 = &t2.peers()[0];
    assert!(!Arc::ptr_eq(&old, p2));
    assert_eq!(p2.index, old.index);
    assert_eq!(p2.spec.not_after, b2.not_after());
    assert_eq!(p2.sender.groups.as_ref(), ["db".to_string()]);
    assert_eq!(p2.endpoint(), old.endpoint());
    old.set_endpoint(Some("198.18.0.9:51820".parse().unwrap()));
    assert_eq!(p2.endpoint(), old.endpoint(), "state not shared");

    // The node's own certificate renewed for its key: likewise.
    let a2 = renew(&a, &["web"]);
    let t3 = build_table(&local(&a2, &ka), &[entry(&b2)], &t2, 7).unwrap();
    let p3 = &t3.peers()[0];
    assert_eq!(p3.index, old.index);
    assert_eq!(p3.local.spec.not_after, a2.not_after());
    assert_eq!(p3.endpoint(), old.endpoint());

    // A new key on either side is a new session in a new slot.
    let (b3, _) = ca.leaf("spiffe://t/b", &["100.64.0.2/32"]);
    let t4 = build_table(&local(&a2, &ka), &[entry(&b3)], &t3, 7).unwrap();
    assert_ne!(t4.peers()[0].index, old.index);
    assert_eq!(t4.peers()[0].endpoint(), None);
    let (a3, ka3) = ca.leaf("spiffe://t/a", &["100.64.0.1/32"]);
    let t5 = build_table(&local(&a3, &ka3), &[entry(&b2)], &t3, 7).unwrap();
    assert_ne!(t5.peers()[0].index, old.index);
    assert_eq!(t5.peers()[0].endpoint(), None);
}
