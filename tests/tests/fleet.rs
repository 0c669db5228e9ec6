//! The fleet store (issue 20) against a real etcd: `meshctl` publishing signed policy
//! (history, rollback, compare-and-swap conflicts), certificates and the fleet view;
//! and meshd's store client listing and watching, ignoring garbage with reasons,
//! keeping its node's entries under a lease, coming back after etcd restarts and
//! listing again after a compaction.
//!
//! Each test has an etcd host (`Mesh::etcd`) and an operator host `op` that runs
//! meshctl; store clients run in hosts of their own (`StoreNode`).

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use mesh_tests::{Etcd, Host, Mesh, StoreNode, StoreNodeConfig};
use serde_json::Value;

mesh_tests::isolate!();

const PREFIX: &str = "/meshd/t/";
const EVENT: Duration = Duration::from_secs(20);

/// `spiffe://t/a` may reach port 8080; its test says so.
const POLICY_V1: &str = r#"[[policy]]
name = "web"
action = "allow"
[[policy.rule]]
name = "a-web"
from = [{ identities = ["spiffe://t/a"] }]
to = [{ ports = [8080] }]

[[test]]
name = "a reaches web"
from = "spiffe://t/a"
to_port = 8080
expect = "allow"
"#;

/// Also `spiffe://t/b`.
const POLICY_V2: &str = r#"[[policy]]
name = "web"
action = "allow"
[[policy.rule]]
name = "a-b-web"
from = [{ identities = ["spiffe://t/a", "spiffe://t/b"] }]
to = [{ ports = [8080] }]

[[test]]
name = "b reaches web"
from = "spiffe://t/b"
to_port = 8080
expect = "allow"
"#;

/// meshctl in `host` against the store, trust domain `t`.
fn ctl(host: &Host, etcd: &Etcd, args: &[&str]) -> Result<mesh_tests::Output> {
    let url = etcd.url();
    let mut all = vec!["--store", url.as_str(), "--trust-domain", "t"];
    all.extend_from_slice(args);
    host.meshctl(&all)
}

fn json(out: &mesh_tests::Output) -> Result<Value> {
    serde_json::from_slice(&out.stdout).with_context(|| format!("not JSON: {}", out.stdout_str()))
}

fn write(host: &Host, name: &str, text: &str) -> Result<()> {
    std::fs::write(host.dir().join(name), text)?;
    Ok(())
}

/// The operator's host with a policy key and the two policy files.
fn operator(mesh: &mut Mesh) -> Result<Host> {
    let op = mesh.host("op").without_meshd().up()?;
    write(&op, "v1.toml", POLICY_V1)?;
    write(&op, "v2.toml", POLICY_V2)?;
    write(&op, "ca.crt", &mesh.ca().cert_pem())?;
    op.meshctl(&["policy", "key", "gen", "--out", "policy.key"])?
        .check()?;
    Ok(op)
}

fn history(op: &Host, etcd: &Etcd) -> Result<Vec<Value>> {
    let out = ctl(op, etcd, &["--json", "policy", "history"])?.check()?;
    Ok(json(&out)?.as_array().cloned().unwrap_or_default())
}

#[test]
fn policy_publish_history_rollback_and_conflicts() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    let etcd = mesh.etcd()?;
    let op = operator(&mut mesh)?;
    use std::os::unix::fs::PermissionsExt;
    let mode = |f: &str| -> Result<u32> {
        Ok(std::fs::metadata(op.dir().join(f))?.permissions().mode() & 0o777)
    };
    assert_eq!((mode("policy.key")?, mode("policy.pub")?), (0o600, 0o644));

    let out = ctl(
        &op,
        &etcd,
        &["policy", "publish", "v1.toml", "--key", "policy.key"],
    )?
    .check()?;
    assert!(
        out.stdout_str()
            .starts_with("published policy version 1 (v1.toml)"),
        "{out:?}"
    );
    ctl(
        &op,
        &etcd,
        &["policy", "publish", "v2.toml", "--key", "policy.key"],
    )?
    .check()?;

    // What the store holds is a signed document carrying the file verbatim.
    let current = etcd
        .get(&format!("{PREFIX}policy/current"))?
        .context("no current policy")?;
    let current = String::from_utf8(current)?;
    assert!(current.starts_with("-----BEGIN MESH POLICY DOCUMENT-----\nversion: 1\ntrust_domain: t\npolicy_version: 2\n"), "{current}");
    assert!(current.contains(POLICY_V2));

    let h = history(&op, &etcd)?;
    let versions: Vec<(u64, bool)> = h
        .iter()
        .map(|e| (e["version"].as_u64().unwrap_or(0), e["current"] == true))
        .collect();
    assert_eq!(versions, [(1, false), (2, true)]);
    let out = ctl(&op, &etcd, &["policy", "history", "1"])?.check()?;
    assert_eq!(
        out.stdout_str(),
        POLICY_V1,
        "history 1 prints version 1's text"
    );

    // Rollback: version 1's content as version 3, signed anew.
    let out = ctl(
        &op,
        &etcd,
        &["policy", "rollback", "1", "--key", "policy.key"],
    )?
    .check()?;
    assert!(
        out.stdout_str()
            .contains("published policy version 3 (v1.toml): the content of version 1"),
        "{out:?}"
    );
    let h = history(&op, &etcd)?;
    assert_eq!(h.len(), 3);
    assert_eq!(h[2]["version"], 3);
    assert_eq!(h[2]["current"], true);
    assert_eq!(
        h[2]["policy_digest"], h[0]["policy_digest"],
        "rollback restores version 1's text"
    );
    assert_ne!(h[2]["policy_digest"], h[1]["policy_digest"]);

    // An operator who reviewed version 2 publishes: someone else published version 3
    // meanwhile, so the compare-and-swap refuses and nothing is written.
    let out = ctl(
        &op,
        &etcd,
        &[
            "policy",
            "publish",
            "v2.toml",
            "--key",
            "policy.key",
            "--expect-version",
            "2",
        ],
    )?;
    assert!(!out.success(), "a stale publish succeeded: {out:?}");
    let err = out.stderr_str();
    assert!(
        err.contains("conflict: someone else published version 3"),
        "{err}"
    );
    assert!(err.contains("nothing written"), "{err}");
    assert_eq!(history(&op, &etcd)?.len(), 3);

    // A policy whose own tests fail is not published.
    write(
        &op,
        "bad.toml",
        &POLICY_V1.replace("expect = \"allow\"", "expect = \"deny\""),
    )?;
    let out = ctl(
        &op,
        &etcd,
        &["policy", "publish", "bad.toml", "--key", "policy.key"],
    )?;
    assert!(
        !out.success(),
        "a policy with failing tests was published: {out:?}"
    );
    assert!(
        out.stderr_str().contains("1 of 1 policy tests failed"),
        "{out:?}"
    );
    assert_eq!(history(&op, &etcd)?.len(), 3);

    // Someone with write access to etcd replaces version 1 in the history with a
    // document signed by another key: `history --trust` says so, and rollback
    // refuses to re-sign it.
    op.meshctl(&["policy", "key", "gen", "--out", "stranger.key"])?
        .check()?;
    let planted_prefix = "/planted/";
    let url = etcd.url();
    op.meshctl(&[
        "--store",
        &url,
        "--trust-domain",
        "t",
        "--store-prefix",
        planted_prefix,
        "policy",
        "publish",
        "v2.toml",
        "--key",
        "stranger.key",
    ])?
    .check()?;
    let planted = etcd
        .get(&format!("{planted_prefix}policy/current"))?
        .context("planted document")?;
    etcd.put(
        &format!("{PREFIX}policy/history/00000000000000000001"),
        &planted,
    )?;
    let out = ctl(
        &op,
        &etcd,
        &["policy", "rollback", "1", "--key", "policy.key"],
    )?;
    assert!(
        !out.success(),
        "rollback re-signed a planted document: {out:?}"
    );
    let err = out.stderr_str();
    assert!(
        err.contains("not among the accepted policy keys") && err.contains("refusing to re-sign"),
        "{err}"
    );
    assert_eq!(history(&op, &etcd)?.len(), 3, "nothing written");
    let out = ctl(
        &op,
        &etcd,
        &["--json", "policy", "history", "--trust", "policy.pub"],
    )?
    .check()?;
    let h = json(&out)?;
    let sigs: Vec<&str> = h
        .as_array()
        .context("history")?
        .iter()
        .map(|e| e["signature"].as_str().unwrap_or(""))
        .collect();
    assert!(
        sigs[0].contains("not among the accepted policy keys"),
        "{sigs:?}"
    );
    assert_eq!(&sigs[1..], ["ok", "ok"]);
    Ok(())
}

#[test]
fn peer_publish_verifies_against_the_ca() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    let etcd = mesh.etcd()?;
    let op = operator(&mut mesh)?;
    let a = mesh.ca().issue(
        "spiffe://t/a",
        &["100.64.0.1".parse::<IpAddr>()?],
        &[],
        None,
        mesh_tests::Validity::Current,
    )?;
    write(&op, "a.crt", &a.cert_pem)?;
    let out = ctl(&op, &etcd, &["peer", "publish", "a.crt", "--ca", "ca.crt"])?.check()?;
    assert!(
        out.stdout_str().starts_with("published spiffe://t/a"),
        "{out:?}"
    );
    let stored = etcd
        .get(&format!("{PREFIX}certs/spiffe://t/a"))?
        .context("no certificate")?;
    assert_eq!(String::from_utf8(stored)?, a.cert_pem);

    // Another CA's certificate, and an expired one, are refused before any write.
    let other = mesh.other_ca("t")?;
    let x = other.issue(
        "spiffe://t/x",
        &["100.64.0.9".parse::<IpAddr>()?],
        &[],
        None,
        mesh_tests::Validity::Current,
    )?;
    write(&op, "x.crt", &x.cert_pem)?;
    let out = ctl(&op, &etcd, &["peer", "publish", "x.crt", "--ca", "ca.crt"])?;
    assert!(!out.success(), "{out:?}");
    assert!(
        out.stderr_str().contains("not by this CA") && out.stderr_str().contains("not published"),
        "{out:?}"
    );
    let old = mesh.ca().issue(
        "spiffe://t/y",
        &["100.64.0.8".parse::<IpAddr>()?],
        &[],
        None,
        mesh_tests::Validity::Expired,
    )?;
    write(&op, "y.crt", &old.cert_pem)?;
    let out = ctl(&op, &etcd, &["peer", "publish", "y.crt", "--ca", "ca.crt"])?;
    assert!(!out.success(), "{out:?}");
    assert!(out.stderr_str().contains("expired"), "{out:?}");
    for id in ["x", "y"] {
        assert_eq!(etcd.get(&format!("{PREFIX}certs/spiffe://t/{id}"))?, None);
    }
    Ok(())
}

fn node_config<'a>(
    etcd_url: &'a str,
    identity: &'a str,
    advertise: &'a str,
    applied: u64,
) -> StoreNodeConfig<'a> {
    StoreNodeConfig {
        endpoints: etcd_url,
        prefix: PREFIX,
        identity,
        advertise,
        lease_secs: 2,
        applied_version: applied,
        tls: None,
    }
}

fn fleet(op: &Host, etcd: &Etcd) -> Result<Value> {
    json(&ctl(op, etcd, &["--json", "fleet", "status"])?.check()?)
}

#[test]
fn fleet_status_shows_a_node_until_its_lease_ends() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    let etcd = mesh.etcd()?;
    let op = operator(&mut mesh)?;
    ctl(
        &op,
        &etcd,
        &["policy", "publish", "v1.toml", "--key", "policy.key"],
    )?
    .check()?;
    ctl(
        &op,
        &etcd,
        &["policy", "publish", "v2.toml", "--key", "policy.key"],
    )?
    .check()?;
    let a = mesh.host("a").without_meshd().up()?;
    let url = etcd.url();
    let mut node = StoreNode::start(
        &a,
        "store-a",
        &node_config(&url, "spiffe://t/a", "198.18.0.50:51820", 1),
    )?;
    node.wait_event("the store client to connect", 0, EVENT, |e| {
        e["event"] == "connected"
    })?;

    // The node shows with its endpoint, alive, one version behind.
    let f = mesh_tests::wait::until("node a in fleet status", EVENT, || {
        let f = fleet(&op, &etcd)?;
        let ready = f["nodes"].as_array().is_some_and(|n| {
            n.iter()
                .any(|n| n["identity"] == "spiffe://t/a" && n["status"].is_object())
        });
        Ok(ready.then_some(f))
    })?;
    assert_eq!(f["published_version"], 2);
    let n = &f["nodes"][0];
    assert_eq!(n["identity"], "spiffe://t/a");
    assert_eq!(n["endpoints"], serde_json::json!(["198.18.0.50:51820"]));
    assert_eq!(n["alive"], true);
    assert_eq!(n["status"]["applied_policy_version"], 1);
    assert_eq!(n["status"]["meshd_version"], "test-0.1");
    assert_eq!(n["lag"], 1);
    let out = ctl(&op, &etcd, &["fleet", "diff"])?;
    assert!(!out.success(), "fleet diff found no difference: {out:?}");
    assert!(
        out.stdout_str()
            .contains("spiffe://t/a: applies 1, published 2"),
        "{out:?}"
    );
    assert!(
        out.stderr_str()
            .contains("1 of 1 nodes differ from the published policy version 2"),
        "{out:?}"
    );
    let out = ctl(&op, &etcd, &["fleet", "status"])?.check()?;
    assert!(out.stdout_str().contains("spiffe://t/a"), "{out:?}");

    // The host dies without a word: its entries go when the lease ends.
    node.kill()?;
    mesh_tests::wait::until("node a to leave fleet status", EVENT, || {
        let f = fleet(&op, &etcd)?;
        Ok(f["nodes"]
            .as_array()
            .is_some_and(|n| n.is_empty())
            .then_some(()))
    })?;
    assert_eq!(
        etcd.get(&format!("{PREFIX}nodes/spiffe://t/a/endpoint"))?,
        None
    );
    Ok(())
}

fn keys(e: &Value) -> Vec<String> {
    e["keys"]
        .as_array()
        .map(|k| {
            k.iter()
                .filter_map(|k| k.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn ignored(e: &Value) -> Vec<(String, String)> {
    e["ignored"]
        .as_array()
        .map(|k| {
            k.iter()
                .map(|i| {
                    (
                        i["key"].as_str().unwrap_or("").to_string(),
                        i["reason"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Issues a certificate for `name` and publishes it with meshctl.
fn publish_cert(mesh: &Mesh, op: &Host, etcd: &Etcd, name: &str, index: u8) -> Result<()> {
    let c = mesh.ca().issue(
        &format!("spiffe://t/{name}"),
        &[format!("100.64.1.{index}").parse::<IpAddr>()?],
        &[],
        None,
        mesh_tests::Validity::Current,
    )?;
    write(op, &format!("{name}.crt"), &c.cert_pem)?;
    ctl(
        op,
        etcd,
        &["peer", "publish", &format!("{name}.crt"), "--ca", "ca.crt"],
    )?
    .check()?;
    Ok(())
}

#[test]
fn store_client_lists_watches_and_ignores_garbage() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    let etcd = mesh.etcd()?;
    let op = operator(&mut mesh)?;
    publish_cert(&mesh, &op, &etcd, "b", 2)?;
    ctl(
        &op,
        &etcd,
        &["policy", "publish", "v1.toml", "--key", "policy.key"],
    )?
    .check()?;
    etcd.put(
        &format!("{PREFIX}certs/spiffe://t/junk"),
        b"not a certificate",
    )?;
    etcd.put(&format!("{PREFIX}surprise"), b"x")?;

    let a = mesh.host("a").without_meshd().up()?;
    let url = etcd.url();
    let mut node = StoreNode::start(
        &a,
        "store-a",
        &node_config(&url, "spiffe://t/a", "198.18.0.50:51820", 0),
    )?;
    let (i, snap) = node.wait_event("the first listing", 0, EVENT, |e| e["event"] == "snapshot")?;
    assert_eq!(snap["reason"], "start");
    let k = keys(&snap);
    for want in [
        "certs/spiffe://t/b",
        "policy/current",
        "policy/history/00000000000000000001",
    ] {
        assert!(
            k.contains(&format!("{PREFIX}{want}")),
            "{want} not in {k:?}"
        );
    }
    let mut ig = ignored(&snap);
    ig.sort();
    assert_eq!(
        ig,
        [
            (
                format!("{PREFIX}certs/spiffe://t/junk"),
                "bad_certificate".to_string()
            ),
            (format!("{PREFIX}surprise"), "unknown_key".to_string()),
        ]
    );
    node.wait_event("connected", i, EVENT, |e| e["event"] == "connected")?;

    // Changes arrive as they happen, garbage with its reason.
    publish_cert(&mesh, &op, &etcd, "c", 3)?;
    let (i, _) = node.wait_event("c's certificate", i, EVENT, |e| {
        e["event"] == "put"
            && e["key"] == format!("{PREFIX}certs/spiffe://t/c")
            && e["kind"] == "cert"
    })?;
    etcd.put(&format!("{PREFIX}policy/current"), POLICY_V2.as_bytes())?;
    let (i, e) = node.wait_event("the unsigned policy", i, EVENT, |e| {
        e["event"] == "ignored" && e["key"] == format!("{PREFIX}policy/current")
    })?;
    assert_eq!(e["reason"], "bad_policy_document");
    assert!(
        e["detail"]
            .as_str()
            .is_some_and(|d| d.contains("not a signed policy document")),
        "{e}"
    );
    let big = format!("x{}", "y".repeat(70 * 1024));
    etcd.put(&format!("{PREFIX}certs/spiffe://t/big"), big.as_bytes())?;
    let (i, e) = node.wait_event("the too large value", i, EVENT, |e| {
        e["event"] == "ignored" && e["key"] == format!("{PREFIX}certs/spiffe://t/big")
    })?;
    assert_eq!(e["reason"], "too_large");
    etcd.etcdctl(&["del", &format!("{PREFIX}certs/spiffe://t/b")])?
        .check()?;
    let (_, e) = node.wait_event("b's certificate deleted", i, EVENT, |e| {
        e["event"] == "deleted" && e["key"] == format!("{PREFIX}certs/spiffe://t/b")
    })?;
    // Counted by reason.
    let ignored = &e["status"]["ignored"];
    assert_eq!(ignored["bad_certificate"], 1, "{e}");
    assert_eq!(ignored["unknown_key"], 1, "{e}");
    assert_eq!(ignored["bad_policy_document"], 1, "{e}");
    assert_eq!(ignored["too_large"], 1, "{e}");
    assert_eq!(e["status"]["connected"], true);
    assert_eq!(e["status"]["snapshots"], 1);
    Ok(())
}

#[test]
fn store_client_waits_for_etcd_and_comes_back_after_a_restart() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    let etcd = mesh.etcd()?;
    let op = operator(&mut mesh)?;
    let a = mesh.host("a").without_meshd().up()?;
    let url = etcd.url();

    // Unreachable at start: said once, then it connects when etcd comes.
    etcd.stop()?;
    let mut node = StoreNode::start(
        &a,
        "store-a",
        &node_config(&url, "spiffe://t/a", "198.18.0.50:51820", 0),
    )?;
    let (i, e) = node.wait_event("the store to be reported unreachable", 0, EVENT, |e| {
        e["event"] == "disconnected"
    })?;
    assert_eq!(e["status"]["connected"], false);
    etcd.start()?;
    let (i, _) = node.wait_event("the first listing", i, EVENT, |e| e["event"] == "snapshot")?;
    let (i, _) = node.wait_event("connected", i, EVENT, |e| e["event"] == "connected")?;
    let disconnected = node
        .events()
        .iter()
        .filter(|e| e["event"] == "disconnected")
        .count();
    assert_eq!(
        disconnected, 1,
        "one report per change of state, not one per retry"
    );

    // etcd stops and restarts: the client resumes where it was, without a new
    // listing, and misses nothing written after.
    etcd.stop()?;
    let (i, _) = node.wait_event("the store lost", i, EVENT, |e| e["event"] == "disconnected")?;
    etcd.start()?;
    let (i, _) = node.wait_event("reconnected", i, EVENT, |e| e["event"] == "connected")?;
    publish_cert(&mesh, &op, &etcd, "b", 2)?;
    let (_, e) = node.wait_event("b's certificate", i, EVENT, |e| {
        e["event"] == "put" && e["key"] == format!("{PREFIX}certs/spiffe://t/b")
    })?;
    assert_eq!(
        e["status"]["snapshots"], 1,
        "resumed from its revision, not listed again"
    );
    // Its endpoint is back under a new lease.
    mesh_tests::wait::until("a's endpoint back in the store", EVENT, || {
        let f = fleet(&op, &etcd)?;
        Ok(f["nodes"]
            .as_array()
            .is_some_and(|n| {
                n.iter()
                    .any(|n| n["identity"] == "spiffe://t/a" && n["alive"] == true)
            })
            .then_some(()))
    })?;
    Ok(())
}

#[test]
fn store_client_lists_again_after_a_compaction() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    let etcd = mesh.etcd()?;
    let op = operator(&mut mesh)?;
    publish_cert(&mesh, &op, &etcd, "b", 2)?;
    let a = mesh.host("a").without_meshd().up()?;
    let url = etcd.url();
    let mut node = StoreNode::start(
        &a,
        "store-a",
        &node_config(&url, "spiffe://t/a", "198.18.0.50:51820", 0),
    )?;
    let (i, _) = node.wait_event("connected", 0, EVENT, |e| e["event"] == "connected")?;

    // Cut a's link: the client notices (no lease keep-alive answer) while changes are
    // made and the history it would resume from is compacted away.
    a.netns().ip(&["link", "set", "eth0", "down"])?;
    let (i, _) = node.wait_event("the store lost", i, EVENT, |e| e["event"] == "disconnected")?;
    publish_cert(&mesh, &op, &etcd, "c", 3)?;
    etcd.etcdctl(&["del", &format!("{PREFIX}certs/spiffe://t/b")])?
        .check()?;
    let compacted = etcd.compact()?;
    a.netns().ip(&["link", "set", "eth0", "up"])?;

    // It lists again: c is there, b is gone, nothing missed.
    let (_, snap) = node.wait_event("a listing after the compaction", i, EVENT, |e| {
        e["event"] == "snapshot"
    })?;
    assert_eq!(snap["reason"], "compacted");
    assert!(
        snap["revision"].as_i64().is_some_and(|r| r >= compacted),
        "{snap}"
    );
    let k = keys(&snap);
    assert!(k.contains(&format!("{PREFIX}certs/spiffe://t/c")), "{k:?}");
    assert!(!k.contains(&format!("{PREFIX}certs/spiffe://t/b")), "{k:?}");
    assert_eq!(snap["status"]["snapshots"], 2);
    Ok(())
}

#[test]
fn meshctl_and_the_store_client_over_tls() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    let etcd = mesh.etcd_tls()?;
    let tls = etcd.tls().context("TLS files")?.clone();
    let op = operator(&mut mesh)?;
    let a = mesh.ca().issue(
        "spiffe://t/a",
        &["100.64.0.1".parse::<IpAddr>()?],
        &[],
        None,
        mesh_tests::Validity::Current,
    )?;
    write(&op, "a.crt", &a.cert_pem)?;
    let url = etcd.url();
    assert!(url.starts_with("https://"), "{url}");
    let (ca, cert, key) = (
        tls.ca.display().to_string(),
        tls.client_cert.display().to_string(),
        tls.client_key.display().to_string(),
    );
    let with_tls = |args: &[&str], client: bool| {
        let mut all = vec!["--store-ca", ca.as_str()];
        if client {
            all.extend_from_slice(&["--store-cert", cert.as_str(), "--store-key", key.as_str()]);
        }
        all.extend_from_slice(args);
        ctl(&op, &etcd, &all)
    };
    // etcd requires a client certificate: without one, nothing is written.
    let out = with_tls(&["peer", "publish", "a.crt", "--ca", "ca.crt"], false)?;
    assert!(
        !out.success(),
        "published without a client certificate: {out:?}"
    );
    with_tls(&["peer", "publish", "a.crt", "--ca", "ca.crt"], true)?.check()?;

    let b = mesh.host("b").without_meshd().up()?;
    let mut config = node_config(&url, "spiffe://t/b", "198.18.0.51:51820", 0);
    config.tls = Some((
        tls.ca.clone(),
        tls.client_cert.clone(),
        tls.client_key.clone(),
    ));
    let mut node = StoreNode::start(&b, "store-b", &config)?;
    let (_, snap) = node.wait_event("the first listing over TLS", 0, EVENT, |e| {
        e["event"] == "snapshot"
    })?;
    assert!(
        keys(&snap).contains(&format!("{PREFIX}certs/spiffe://t/a")),
        "{snap}"
    );
    let f = json(&with_tls(&["--json", "fleet", "status"], true)?.check()?)?;
    assert_eq!(f["nodes"][0]["identity"], "spiffe://t/b", "{f}");
    Ok(())
}
