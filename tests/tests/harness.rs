//! Self-tests of the harness with plain namespaces (no meshd): the underlay connects
//! hosts, commands run inside hosts, cleanup removes everything.

mesh_tests::isolate!();

#[test]
fn underlay_connects_hosts_over_ipv4_and_ipv6() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    let a = mesh.host("a").without_meshd().up()?;
    let b = mesh.host("b").without_meshd().up()?;
    a.ping(b.underlay_v4())?;
    b.ping(a.underlay_v6())?;
    // No default route: the outside world is unreachable from a host.
    let out = a.exec("ip", &["route", "get", "1.1.1.1"])?;
    assert!(!out.success(), "host a has a route to 1.1.1.1: {out:?}");
    Ok(())
}

#[test]
fn commands_run_inside_the_host_namespace() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    let a = mesh.host("a").without_meshd().up()?;
    let out = a.run("ip", &["-brief", "addr", "show", "dev", "eth0"])?;
    assert!(
        out.stdout_str().contains(&a.underlay_v4().to_string()),
        "{out:?}"
    );
    Ok(())
}

#[test]
fn servers_and_clients_in_hosts() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    let a = mesh.host("a").without_meshd().up()?;
    let b = mesh.host("b").without_meshd().up()?;
    b.write_www("hello.txt", b"hello from b")?;
    b.serve_http(8080)?;
    let r = a.http_get_addr(b.underlay_v4(), 8080, "/hello.txt")?;
    assert_eq!((r.status, r.body.as_slice()), (200, &b"hello from b"[..]));
    let r = a.http_get_addr(b.underlay_v6(), 8080, "/hello.txt")?;
    assert_eq!(r.status, 200);
    b.serve_udp_echo(7000)?;
    a.udp_echo(b.underlay_v4(), 7000)?;
    a.udp_echo(b.underlay_v6(), 7000)?;
    Ok(())
}

#[test]
fn capture_sees_underlay_traffic() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    let a = mesh.host("a").without_meshd().up()?;
    let b = mesh.host("b").without_meshd().up()?;
    b.write_www("marker.txt", b"PLAINTEXT-MARKER-1234")?;
    b.serve_http(8080)?;
    let cap = mesh.capture_underlay("tcp port 8080")?;
    a.http_get_addr(b.underlay_v4(), 8080, "/marker.txt")?;
    let pcap = cap.finish()?;
    // Unencrypted traffic shows in the capture: the check the dataplane tests rely on
    // can see a marker when it is there.
    assert!(contains(&pcap, b"PLAINTEXT-MARKER-1234"));
    Ok(())
}

#[test]
fn cleanup_removes_namespaces() -> mesh_tests::Result {
    let names = {
        let mut mesh = mesh_tests::mesh!();
        let a = mesh.host("a").without_meshd().up()?;
        a.serve_udp_echo(7000)?;
        vec![a.netns().name().to_string()]
    };
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()?;
    let list = String::from_utf8_lossy(&out.stdout);
    for n in names {
        assert!(
            !list
                .lines()
                .any(|l| l.split_whitespace().next() == Some(&n)),
            "{n} left behind: {list}"
        );
    }
    Ok(())
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn a_meshd_that_fails_to_start_is_reported_with_its_log() -> mesh_tests::Result {
    let mut mesh = mesh_tests::mesh!();
    // An unknown field: meshd must refuse the config and exit.
    let err = match mesh.host("a").config("[bogus]\nfield = 1").up() {
        Ok(_) => panic!("meshd started with an invalid config"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("meshd exited during startup"), "{err}");
    assert!(err.contains("last lines of"), "{err}");
    Ok(())
}

#[test]
fn a_panicking_test_still_cleans_up() -> mesh_tests::Result {
    let mut seen = None;
    let result =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> anyhow::Result<()> {
            let mut mesh = mesh_tests::mesh!();
            let a = mesh.host("a").without_meshd().up()?;
            a.serve_udp_echo(7000)?;
            seen = Some((
                a.netns().name().to_string(),
                a.background_pids(),
                mesh.dir().to_path_buf(),
            ));
            panic!("deliberate panic inside a test");
        }));
    assert!(result.is_err(), "the closure should have panicked");
    let Some((ns, pids, dir)) = seen else {
        return Ok(()); // skipped (MESH_SKIP_NETNS=1)
    };
    assert!(!pids.is_empty());
    for pid in pids {
        // Reaped: the PID no longer names a process of ours.
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        assert!(
            !status.contains("mesh-testtool"),
            "process {pid} survived the panic"
        );
    }
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()?;
    let list = String::from_utf8_lossy(&out.stdout);
    assert!(
        !list
            .lines()
            .any(|l| l.split_whitespace().next() == Some(ns.as_str())),
        "{ns} survived: {list}"
    );
    // The directory is kept for inspection after a failure; this test removes it.
    assert!(dir.exists());
    std::fs::remove_dir_all(dir)?;
    Ok(())
}
