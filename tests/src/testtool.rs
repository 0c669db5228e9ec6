//! `mesh-testtool`: small traffic tools the netns tests run inside hosts.
//!
//! - `udp-echo <bind>`: echo every datagram back; prints `listening` once bound.
//! - `udp-ping <addr:port> <tries> [source port]`: send a datagram (from `source port`, else
//!   an ephemeral one), expect it back within 1 s per try;
//!   exit 0 on the first echo, 1 if none came.
//! - `udp-garbage <addr:port> <count> <seed>`: send `count` random datagrams.
//! - `udp-sink <bind>`: print `from <addr> <payload>` for every datagram; prints
//!   `listening` once bound.
//! - `udp-send <source ip> <addr:port> <payload>`: send one datagram from `source ip`
//!   (an address of this host, or `any`).
//! - `udp-empty <addr:port> <count>`: send `count` datagrams of zero bytes.
//! - `relay <face_a> <a> <face_b> <b> <control> <seed> <impairment>`: the impairment
//!   relay of the fault tests ([`mesh_tests::relay`]); runs until killed.
//! - `relay-ctl <control> <command>`: one command to a relay; prints its answer.
//! - `transfer-serve <port> <dir>`: the bulk-transfer HTTP server
//!   ([`mesh_tests::transfer`]); prints `listening` once bound.
//! - `store-node <etcd urls> <prefix> <identity> <advertise addr:port> <lease secs>
//!   <applied policy version>`: run meshd's store client for that node and print
//!   every event as one JSON line (with the client's status) until killed. TLS to
//!   etcd from the PEM files in `MESH_STORE_TLS_CA`, `_CERT` and `_KEY`.

use std::io::Write;
use std::net::{SocketAddr, UdpSocket};
use std::process::ExitCode;
use std::time::Duration;

use mesh_tests::{relay, transfer};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        ["udp-echo", bind] => udp_echo(bind),
        ["udp-ping", target, tries] => udp_ping(target, tries, "0"),
        ["udp-ping", target, tries, port] => udp_ping(target, tries, port),
        ["udp-garbage", target, count, seed] => udp_garbage(target, count, seed),
        ["udp-sink", bind] => udp_sink(bind),
        ["udp-send", source, target, payload] => udp_send(source, target, payload),
        ["udp-empty", target, count] => udp_empty(target, count),
        ["relay", face_a, a, face_b, b, control, seed, imp] => {
            relay(face_a, a, face_b, b, control, seed, imp)
        }
        ["relay-ctl", control, command] => parse_addr(control).and_then(|c| {
            let reply = relay::control_client(c, command).map_err(|e| format!("{e:#}"))?;
            println!("{reply}");
            Ok(())
        }),
        ["transfer-serve", port, dir] => port
            .parse()
            .map_err(|e| format!("bad port: {e}"))
            .and_then(|p| {
                transfer::serve(p, std::path::Path::new(dir)).map_err(|e| format!("{e:#}"))
            }),
        ["store-node", endpoints, prefix, identity, advertise, lease, applied] => {
            store_node(endpoints, prefix, identity, advertise, lease, applied)
        }
        _ => Err("usage: mesh-testtool transfer-serve <port> <dir> | udp-echo <bind> | udp-ping <addr:port> <tries> [source port] | udp-garbage <addr:port> <count> <seed> | udp-sink <bind> | udp-send <source ip|any> <addr:port> <payload> | udp-empty <addr:port> <count> | relay <face_a> <a> <face_b> <b> <control> <seed> <impairment> | relay-ctl <control> <command> | store-node <urls> <prefix> <identity> <advertise> <lease secs> <applied version>".to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-testtool: {e}");
            ExitCode::FAILURE
        }
    }
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|e| format!("bad address {s:?}: {e}"))
}

fn relay(
    face_a: &str,
    a: &str,
    face_b: &str,
    b: &str,
    control: &str,
    seed: &str,
    imp: &str,
) -> Result<(), String> {
    let plan = relay::Plan {
        face_a: parse_addr(face_a)?,
        a: parse_addr(a)?,
        face_b: parse_addr(face_b)?,
        b: parse_addr(b)?,
        control: parse_addr(control)?,
    };
    let seed = seed.parse().map_err(|e| format!("bad seed: {e}"))?;
    let imp = relay::Impairment::parse(imp).map_err(|e| format!("{e:#}"))?;
    relay::serve(plan, seed, imp).map_err(|e| format!("{e:#}"))
}

fn udp_echo(bind: &str) -> Result<(), String> {
    let addr = parse_addr(bind)?;
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        None,
    )
    .map_err(|e| format!("socket: {e}"))?;
    if addr.is_ipv6() {
        sock.set_only_v6(false)
            .map_err(|e| format!("IPV6_V6ONLY: {e}"))?;
    }
    sock.bind(&addr.into())
        .map_err(|e| format!("bind {addr}: {e}"))?;
    let sock: UdpSocket = sock.into();
    println!("listening on {addr}");
    let _ = std::io::stdout().flush();
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, from) = sock.recv_from(&mut buf).map_err(|e| format!("recv: {e}"))?;
        let _ = sock.send_to(&buf[..n], from);
    }
}

/// A dual-stack UDP socket bound to `addr`.
fn bind_udp(addr: SocketAddr) -> Result<UdpSocket, String> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        None,
    )
    .map_err(|e| format!("socket: {e}"))?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        sock.set_only_v6(false)
            .map_err(|e| format!("IPV6_V6ONLY: {e}"))?;
    }
    sock.bind(&addr.into())
        .map_err(|e| format!("bind {addr}: {e}"))?;
    Ok(sock.into())
}

fn udp_sink(bind: &str) -> Result<(), String> {
    let addr = parse_addr(bind)?;
    let sock = bind_udp(addr)?;
    println!("listening on {addr}");
    let _ = std::io::stdout().flush();
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, from) = sock.recv_from(&mut buf).map_err(|e| format!("recv: {e}"))?;
        // The IPv4 sources of a dual-stack socket, as IPv4.
        let ip = match from.ip() {
            std::net::IpAddr::V6(a) => a
                .to_ipv4_mapped()
                .map_or(std::net::IpAddr::V6(a), std::net::IpAddr::V4),
            v4 => v4,
        };
        println!("from {ip} {}", String::from_utf8_lossy(&buf[..n]));
        let _ = std::io::stdout().flush();
    }
}

fn udp_send(source: &str, target: &str, payload: &str) -> Result<(), String> {
    let target = parse_addr(target)?;
    let ip: std::net::IpAddr = match source {
        "any" if target.is_ipv6() => std::net::Ipv6Addr::UNSPECIFIED.into(),
        "any" => std::net::Ipv4Addr::UNSPECIFIED.into(),
        s => s.parse().map_err(|e| format!("bad source {s:?}: {e}"))?,
    };
    let sock = bind_udp(SocketAddr::new(ip, 0))?;
    sock.send_to(payload.as_bytes(), target)
        .map_err(|e| format!("send to {target}: {e}"))?;
    println!("sent to {target}");
    Ok(())
}

fn udp_ping(target: &str, tries: &str, port: &str) -> Result<(), String> {
    let target = parse_addr(target)?;
    let tries: u32 = tries.parse().map_err(|e| format!("bad tries: {e}"))?;
    let port: u16 = port.parse().map_err(|e| format!("bad source port: {e}"))?;
    let bind = if target.is_ipv6() {
        SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), port)
    } else {
        SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), port)
    };
    let sock = UdpSocket::bind(bind).map_err(|e| format!("bind: {e}"))?;
    sock.set_read_timeout(Some(Duration::from_secs(1)))
        .map_err(|e| format!("timeout: {e}"))?;
    let mut buf = [0u8; 2048];
    for i in 0..tries {
        let msg = format!("mesh-udp-ping {} {i}", std::process::id());
        sock.send_to(msg.as_bytes(), target)
            .map_err(|e| format!("send to {target}: {e}"))?;
        // Read until our message comes back or the read times out.
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            if from == target && &buf[..n] == msg.as_bytes() {
                println!("echo from {from}");
                return Ok(());
            }
        }
    }
    Err(format!("no UDP echo from {target} after {tries} tries"))
}

fn udp_garbage(target: &str, count: &str, seed: &str) -> Result<(), String> {
    let target = parse_addr(target)?;
    let count: u32 = count.parse().map_err(|e| format!("bad count: {e}"))?;
    let mut state: u64 = seed.parse().map_err(|e| format!("bad seed: {e}"))?;
    state |= 1;
    let bind = if target.is_ipv6() {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    };
    let sock = UdpSocket::bind(bind).map_err(|e| format!("bind: {e}"))?;
    let mut buf = vec![0u8; 1400];
    let mut next = || {
        // xorshift64*: reproducible garbage from the seed.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    for i in 0..count {
        let len = 1 + (next() % 1400) as usize;
        for b in buf[..len].iter_mut() {
            *b = next() as u8;
        }
        sock.send_to(&buf[..len], target)
            .map_err(|e| format!("send to {target}: {e}"))?;
        if i % 100 == 99 {
            pace();
        }
    }
    println!("sent {count} datagrams to {target}");
    Ok(())
}

fn udp_empty(target: &str, count: &str) -> Result<(), String> {
    let target = parse_addr(target)?;
    let count: u32 = count.parse().map_err(|e| format!("bad count: {e}"))?;
    let bind = if target.is_ipv6() {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    };
    let sock = UdpSocket::bind(bind).map_err(|e| format!("bind: {e}"))?;
    for _ in 0..count {
        sock.send_to(&[], target)
            .map_err(|e| format!("send to {target}: {e}"))?;
    }
    println!("sent {count} empty datagrams to {target}");
    Ok(())
}

#[allow(clippy::disallowed_methods)] // a traffic generator paces itself so the receiver's socket buffer does not overflow; not synchronisation.
fn pace() {
    std::thread::sleep(Duration::from_millis(2));
}

fn store_node(
    endpoints: &str,
    prefix: &str,
    identity: &str,
    advertise: &str,
    lease: &str,
    applied: &str,
) -> Result<(), String> {
    use mesh_proto::store::{Prefix, StoreValue};
    use meshd::control::store::{
        NodeInfo, NodeReport, SnapshotReason, StoreClient, StoreEvent, StoreSettings, TlsPem,
    };
    use serde_json::json;

    let prefix = Prefix::parse(prefix)?;
    let settings = StoreSettings {
        endpoints: endpoints.split(',').map(str::to_string).collect(),
        prefix: prefix.clone(),
        lease_secs: lease.parse().map_err(|e| format!("bad lease: {e}"))?,
        tls: match std::env::var_os("MESH_STORE_TLS_CA") {
            None => None,
            Some(ca) => {
                let read = |p: &std::ffi::OsStr| {
                    std::fs::read(p).map_err(|e| format!("{}: {e}", p.to_string_lossy()))
                };
                let client = match (
                    std::env::var_os("MESH_STORE_TLS_CERT"),
                    std::env::var_os("MESH_STORE_TLS_KEY"),
                ) {
                    (Some(c), Some(k)) => Some((read(&c)?, read(&k)?)),
                    _ => None,
                };
                Some(TlsPem {
                    ca: read(&ca)?,
                    client,
                })
            }
        },
    };
    let node = NodeInfo {
        identity: mesh_proto::identity::SpiffeId::parse(identity).map_err(|e| e.to_string())?,
        endpoints: vec![parse_addr(advertise)?],
        meshd_version: "test-0.1".into(),
        cert: None,
    };
    let applied: u64 = applied.parse().map_err(|e| format!("bad version: {e}"))?;
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = StoreClient::start(settings, node, move |e| {
        let _ = tx.send(e);
    })
    .map_err(|e| e.to_string())?;
    handle.publish_status(NodeReport {
        applied_policy_version: applied,
        policy_digest: None,
    });
    let kind = |v: &StoreValue| match v {
        StoreValue::Cert(_) => "cert",
        StoreValue::Endpoint(_) => "endpoint",
        StoreValue::Status(_) => "status",
        StoreValue::Policy(_) => "policy",
        StoreValue::Revocations(_) => "revocations",
    };
    for event in rx {
        let mut line = match event {
            StoreEvent::Connected { revision } => {
                json!({"event": "connected", "revision": revision})
            }
            StoreEvent::Disconnected { error } => json!({"event": "disconnected", "error": error}),
            StoreEvent::Snapshot(s) => json!({
                "event": "snapshot",
                "revision": s.revision,
                "reason": match s.reason {
                    SnapshotReason::Start => "start".to_string(),
                    SnapshotReason::Compacted { .. } => "compacted".to_string(),
                    SnapshotReason::Cancelled { reason } => format!("cancelled: {reason}"),
                },
                "keys": s.entries.iter().map(|e| prefix.key(&e.key)).collect::<Vec<_>>(),
                "kinds": s.entries.iter().map(|e| kind(&e.value)).collect::<Vec<_>>(),
                "ignored": s.ignored.iter().map(|i| json!({"key": i.key_text, "reason": i.reason})).collect::<Vec<_>>(),
            }),
            StoreEvent::Put { revision, entry } => json!({
                "event": "put", "revision": revision, "key": prefix.key(&entry.key), "kind": kind(&entry.value),
            }),
            StoreEvent::Deleted { revision, key } => {
                json!({"event": "deleted", "revision": revision, "key": prefix.key(&key)})
            }
            StoreEvent::Ignored { revision, error } => json!({
                "event": "ignored", "revision": revision, "key": error.key_text,
                "reason": error.reason, "detail": error.detail,
            }),
        };
        line["status"] = serde_json::to_value(handle.status()).map_err(|e| e.to_string())?;
        println!("{line}");
        let _ = std::io::stdout().flush();
    }
    Ok(())
}
