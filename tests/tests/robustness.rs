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
