//! meshd with the fleet store (issue 20), against a real etcd: hosts that start with
//! nothing but their own certificate, the CA and the store's address reach each
//! other; a policy published once is enforced on every host; what the store cannot
//! vouch for (a certificate of another CA, a document signed by an unknown key)
//! changes nothing; with etcd gone traffic and enforcement go on, a meshd restarted
//! meanwhile enforces the last policy it applied, and the policy published after etcd
//! returns is applied everywhere.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use mesh_tests::{Etcd, Host, PeerSet};

mesh_tests::isolate!();

const PREFIX: &str = "/meshd/t/";
const HTTP: u16 = 8080;
/// Generous: a change reaches a host in well under a second (scripts/bench-fleet.sh).
const CONVERGE: Duration = Duration::from_secs(30);

/// Every member of the mesh may reach port 8080 (the hosts' own file).
const OPEN: &str = r#"[[policy]]
name = "open"
action = "allow"
[[policy.rule]]
from = [{ identities = ["spiffe://t/*"] }]
to = [{ ports = [8080] }]
"#;

/// Only `a`.
const ONLY_A: &str = r#"[[policy]]
name = "only-a"
action = "allow"
[[policy.rule]]
from = [{ identities = ["spiffe://t/a"] }]
to = [{ ports = [8080] }]

[[test]]
name = "b is refused"
from = "spiffe://t/b"
to_port = 8080
expect = "deny"
"#;

/// `a` and `b`.
const A_AND_B: &str = r#"[[policy]]
name = "a-and-b"
action = "allow"
[[policy.rule]]
from = [{ identities = ["spiffe://t/a", "spiffe://t/b"] }]
to = [{ ports = [8080] }]
"#;

fn ctl(op: &Host, etcd: &Etcd, args: &[&str]) -> Result<mesh_tests::Output> {
    let url = etcd.url();
    let mut all = vec!["--store", url.as_str(), "--trust-domain", "t"];
    all.extend_from_slice(args);
    op.meshctl(&all)
}

fn publish(op: &Host, etcd: &Etcd, file: &str, key: &str) -> Result<mesh_tests::Output> {
    ctl(op, etcd, &["policy", "publish", file, "--key", key])
}

fn serve(h: &Host) -> Result<()> {
    h.write_www(&format!("{}.txt", h.name()), h.name().as_bytes())?;
    h.serve_http(HTTP)
}

fn reaches(src: &Host, dst: &Host) -> Result<()> {
    let r = src
        .http_get_eventually(dst.overlay_v4(), HTTP, &format!("/{}.txt", dst.name()))
        .with_context(|| format!("{} -> {}", src.name(), dst.name()))?;
    ensure!(
        r.status == 200 && r.body == dst.name().as_bytes(),
        "{} -> {}: {}",
        src.name(),
        dst.name(),
        r.status
    );
    Ok(())
}

fn refused(src: &Host, dst: IpAddr) -> Result<()> {
    let r = src.http_get_limit(dst, HTTP, "/", Duration::from_secs(3));
    ensure!(r.is_err(), "{} reached {dst}: {r:?}", src.name());
    Ok(())
}

/// Waits until every host applies store policy `version`.
fn applied_everywhere(hosts: &[&Host], version: u64) -> Result<()> {
    for h in hosts {
        mesh_tests::wait::until(
            &format!("{} to apply store policy {version}", h.name()),
            CONVERGE,
            || {
                let st = h.status()?;
                let v = st.store.as_ref().map(|s| s.applied.policy_version);
                Ok((v == Some(version)).then_some(()))
            },
        )?;
    }
    Ok(())
}

#[test]
fn hosts_join_through_the_store_and_policy_published_once_is_enforced_everywhere(
) -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    let etcd = mesh.etcd()?;
    let op = mesh.host("op").without_meshd().up()?;
    op.meshctl(&["policy", "key", "gen", "--out", "policy.key"])?
        .check()?;
    op.meshctl(&["policy", "key", "gen", "--out", "rogue.key"])?
        .check()?;
    for (name, text) in [("only-a.toml", ONLY_A), ("a-and-b.toml", A_AND_B)] {
        std::fs::write(op.dir().join(name), text)?;
    }
    let store = format!(
        "endpoints = [\"{}\"]\npolicy_keys = [\"{}\"]\nlease_secs = 2",
        etcd.url(),
        op.dir().join("policy.pub").display()
    );
    // No [[peer]] anywhere: each host knows only its own certificate, the CA and
    // the store.
    let mut hosts = Vec::new();
    for name in ["a", "b", "c"] {
        let h = mesh
            .host(name)
            .peers(PeerSet::None)
            .policy("deny", OPEN)
            .store(&store)
            .up()?;
        serve(&h)?;
        hosts.push(h);
    }
    let [a, b, c] = [&hosts[0], &hosts[1], &hosts[2]];
    for h in [a, b, c] {
        mesh_tests::wait::until(&format!("{} to have 2 peers", h.name()), CONVERGE, || {
            Ok((h.status()?.peers.len() == 2).then_some(()))
        })?;
    }
    reaches(b, c)?;
    reaches(c, a)?;

    // a's certificate renewed in place (same key, a new end): its meshd publishes it,
    // and every other host takes it, session kept.
    let key = format!("{PREFIX}certs/spiffe://t/a");
    let old = etcd.get(&key)?;
    let end = a.renew_cert(&["renewed"], mesh_tests::Validity::EndsIn(600))?;
    mesh_tests::wait::until("a's renewal in the store", CONVERGE, || {
        Ok((etcd.get(&key)? != old).then_some(()))
    })?;
    for h in [b, c] {
        mesh_tests::wait::until(
            &format!("{} to take a's renewal", h.name()),
            CONVERGE,
            || {
                let st = h.status()?;
                let got = st.peer("spiffe://t/a").map(|p| p.not_after);
                Ok((got == Some(end.0)).then_some(()))
            },
        )?;
    }
    reaches(a, c)?;

    // What the store cannot vouch for: a certificate of another CA written by hand,
    // a document signed by a key no host accepts. Logged, shown, nothing changes.
    let other = mesh.other_ca("t")?;
    let evil = other.issue(
        "spiffe://t/evil",
        &["100.64.3.3".parse()?],
        &[],
        None,
        mesh_tests::Validity::Current,
    )?;
    etcd.put(
        &format!("{PREFIX}certs/spiffe://t/evil"),
        evil.cert_pem.as_bytes(),
    )?;
    publish(&op, &etcd, "only-a.toml", "rogue.key")?.check()?;
    for h in [a, b, c] {
        let st =
            mesh_tests::wait::until(&format!("{} to refuse both", h.name()), CONVERGE, || {
                let st = h.status()?;
                let n = st.store.as_ref().map_or(0, |s| s.applied.refused.len());
                Ok((n == 2).then_some(st))
            })?;
        let store = st.store.context("no store in status")?;
        assert!(store.client.connected, "{store:?}");
        assert_eq!(store.applied.policy_version, 0, "{store:?}");
        assert_eq!(st.peers.len(), 2, "{:?}", st.peers);
        let log = h.log();
        assert!(
            log.contains("certs/spiffe://t/evil refused"),
            "{}",
            h.name()
        );
        assert!(log.contains("policy/current refused"), "{}", h.name());
    }
    reaches(b, c)?;

    // Published once with the accepted key (version 2: the rogue one took 1):
    // enforced on every host; b, allowed a moment ago, is refused everywhere.
    publish(&op, &etcd, "only-a.toml", "policy.key")?.check()?;
    applied_everywhere(&[a, b, c], 2)?;
    refused(b, c.overlay_v4())?;
    refused(c, b.overlay_v4())?;
    reaches(a, b)?;
    reaches(a, c)?;
    let out = ctl(&op, &etcd, &["fleet", "diff"])?;
    assert!(out.success(), "fleet diff: {out:?}");

    // etcd goes away: traffic and enforcement go on.
    etcd.stop()?;
    reaches(a, c)?;
    refused(b, c.overlay_v4())?;
    // A meshd restarted meanwhile enforces the last policy it applied.
    c.kill_meshd()?;
    c.start()?;
    let st = c.status()?;
    let store = st.store.context("no store in status")?;
    assert!(!store.client.connected, "{store:?}");
    assert_eq!(store.applied.policy_version, 2, "{store:?}");
    reaches(a, c)?;
    refused(b, c.overlay_v4())?;

    // etcd is back: the policy published now is applied everywhere, c included.
    etcd.start()?;
    publish(&op, &etcd, "a-and-b.toml", "policy.key")?.check()?;
    applied_everywhere(&[a, b, c], 3)?;
    reaches(b, c)?;
    refused(c, a.overlay_v4())?;
    Ok(())
}
