//! `mesh-soak`: a mesh of five hosts under mixed traffic for a while, sampled over time,
//! checked at the end (issue 26, "Deliver" 3). `scripts/soak.sh` builds and runs it.
//!
//! ```text
//! mesh-soak [--duration 10m] [--sample 15s]     (or MESH_SOAK_DURATION=60s)
//! ```
//!
//! Hosts: servers `srv1`, `srv2` (default deny; clients may GET `/ok/*` and POST
//! `/upload` on the inspected port 8080, never `/deny/*`; reach the layer-4 port 8081
//! and UDP 7000) and clients `cli1`..`cli3` (no policy). Each client loops, alternating
//! servers, over: HTTP GETs on the inspected port (1 in 10 to `/deny/*`, which must be
//! refused with 403), a 256 KiB upload on the inspected port, 1 MiB bulk uploads and
//! downloads on the layer-4 port (checked by SHA-256), UDP echoes. Meanwhile: the
//! servers' policy is replaced through `meshctl policy apply` every sixth of the run
//! (the same decisions by other rules, so every flow is decided again), `cli1`'s
//! certificate is renewed at a third (`meshctl peer add` on the others), and `srv2`'s
//! meshd is restarted (SIGTERM) at half. Every sample: tracked flows (`meshctl status
//! --json`), meshd's resident memory (`/proc/<pid>/status`), and client sockets stuck
//! in SYN-SENT, FIN-WAIT-1/2, CLOSING or LAST-ACK (`ss` in the clients' namespaces).
//!
//! Checks at the end (exit 1 if any fails, with the table):
//! - no crash: every meshd runs and none logged a panic;
//! - resident memory at the end (last samples under traffic) at most 10% above its
//!   warm-up level (first samples after the warm-up: a fifth of a long run, half of a
//!   short one, at most two minutes, as the memory fills);
//! - tracked flows back to their warm-up level (10%, or a small absolute slack) once
//!   the traffic stopped and the tables drained (at most 30 s: closed and refused
//!   flows leave within the closing timeout). Compared under traffic instead, the
//!   count follows the rate of operations, which a shared machine moves by half;
//! - every allowed transfer intact (outside the restart window: every one succeeded;
//!   anywhere: none returned other bytes), and UDP echoes answered (at least 99%: UDP
//!   may lose a datagram on a loaded host);
//! - every denied request refused (403 outside the restart window; never a 200);
//! - no client socket stuck once the traffic stopped and 15 s passed.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mesh_tests::transfer::{pattern, sha256_hex};
use mesh_tests::{wait, Host, Mesh, Validity};

const HTTP: u16 = 8080;
const BULK: u16 = 8081;
const UDP: u16 = 7000;
/// The UDP source port of every client's echoes.
const UDP_CLIENT_PORT: u16 = 47000;
/// How long the flow tables may take to drain once the traffic stopped: the closing
/// timeout (10 s) and a margin.
const DRAIN: Duration = Duration::from_secs(30);
/// Flows a host may keep once drained: its UDP flows (one per client and server, from
/// [`UDP_CLIENT_PORT`]) and a few closing late.
const LONG_LIVED: u64 = 10;
const BULK_BYTES: usize = 1 << 20;
const UPLOAD_BYTES: usize = 256 << 10;

/// The servers' policy; `variant` changes rule names and adds an audit rule, not what
/// is decided, so that replacing one by the other decides every flow again.
fn policy(variant: u32) -> String {
    format!(
        r#"
[[policy]]
name = "soak-{variant}"
action = "allow"

[[policy.rule]]
name = "http-{variant}"
from = [{{ groups = ["clients"] }}]
to = [{{ ports = [8080], methods = ["GET"], paths = ["/ok/*"] }},
      {{ ports = [8080], methods = ["POST"], paths = ["/upload"] }}]

[[policy.rule]]
name = "bulk-{variant}"
from = [{{ groups = ["clients"] }}]
to = [{{ ports = [8081, 7000] }}]

[[policy]]
name = "watch-{variant}"
action = "audit"
[[policy.rule]]
to = [{{ ports = [8080], paths = ["/ok/{variant}*"] }}]

[[test]]
name = "allowed"
from = "spiffe://t/cli1"
from_groups = ["clients"]
to_port = 8080
method = "GET"
path = "/ok/1"
expect = "allow"

[[test]]
name = "denied"
from = "spiffe://t/cli1"
from_groups = ["clients"]
to_port = 8080
method = "GET"
path = "/deny/1"
expect = "deny"
"#
    )
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    HttpAllowed,
    HttpDenied,
    InspectedUpload,
    BulkUpload,
    BulkDownload,
    Udp,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::HttpAllowed => "HTTP allowed",
            Kind::HttpDenied => "HTTP denied",
            Kind::InspectedUpload => "upload (inspected)",
            Kind::BulkUpload => "bulk upload (layer 4)",
            Kind::BulkDownload => "bulk download (layer 4)",
            Kind::Udp => "UDP echo",
        }
    }
}

/// One operation's outcome.
#[derive(Clone, Debug)]
struct Op {
    kind: Kind,
    server: String,
    started: Duration,
    ended: Duration,
    /// As expected (allowed: whole and intact; denied: 403).
    ok: bool,
    /// A result that breaks a rule whenever it happens (other bytes than sent, a denied
    /// request answered 200).
    wrong: bool,
    detail: String,
}

/// A sample of one host.
#[derive(Clone, Copy, Debug, Default)]
struct HostSample {
    flows: u64,
    l7_flows: u64,
    rss_kib: u64,
}

#[derive(Clone, Debug)]
struct Sample {
    at: Duration,
    hosts: Vec<HostSample>,
    stuck: usize,
    ops: usize,
    failed: usize,
}

struct Args {
    duration: Duration,
    sample: Option<Duration>,
}

fn parse_duration(s: &str) -> Result<Duration> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, "s"), |i| s.split_at(i));
    let n: u64 = num.parse().with_context(|| format!("duration {s:?}"))?;
    Ok(Duration::from_secs(match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => bail!("duration {s:?}: use 90s, 10m or 1h"),
    }))
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        duration: match std::env::var("MESH_SOAK_DURATION") {
            Ok(v) => parse_duration(&v)?,
            Err(_) => Duration::from_secs(600),
        },
        sample: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--duration" => args.duration = parse_duration(&value()?)?,
            "--sample" => args.sample = Some(parse_duration(&value()?)?),
            "-h" | "--help" => {
                println!("usage: mesh-soak [--duration 10m] [--sample 15s]");
                std::process::exit(0);
            }
            other => bail!(
                "unknown argument {other:?} (usage: mesh-soak [--duration 10m] [--sample 15s])"
            ),
        }
    }
    if args.duration < Duration::from_secs(30) {
        bail!("--duration: at least 30s");
    }
    Ok(args)
}

fn main() {
    mesh_tests::isolate::isolate_process();
    match parse_args().and_then(run) {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        // MESH_SKIP_NETNS=1 without the privileges: skipped on purpose (Mesh::new said so).
        Err(e) if mesh_tests::mesh::is_skip(&e) => {}
        Err(e) => {
            eprintln!("mesh-soak: {e:#}");
            std::process::exit(2);
        }
    }
}

#[allow(clippy::disallowed_methods)] // the soak's schedule: it acts and samples at times.
fn sleep_until(t: Instant) {
    let now = wait::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

/// Everything the workers and the controller share.
struct Run {
    start: Instant,
    deadline: Instant,
    ops: Mutex<Vec<Op>>,
    stop: AtomicBool,
    servers: Vec<Host>,
    blob_sha: String,
    upload: Vec<u8>,
    upload_sha: String,
}

impl Run {
    fn since(&self) -> Duration {
        wait::now().duration_since(self.start)
    }

    fn record(&self, op: Op) {
        self.ops.lock().unwrap_or_else(|p| p.into_inner()).push(op);
    }

    /// One client's loop until the deadline.
    fn client(&self, c: &Host) {
        let (mut i, mut http) = (0u64, 0u64);
        while wait::now() < self.deadline && !self.stop.load(Ordering::Relaxed) {
            i += 1;
            let srv = &self.servers[(i % self.servers.len() as u64) as usize];
            let started = self.since();
            let (kind, result) = match i % 20 {
                0 => (Kind::BulkUpload, self.bulk_upload(c, srv)),
                10 => (Kind::BulkDownload, self.bulk_download(c, srv)),
                7 => (Kind::InspectedUpload, self.inspected_upload(c, srv)),
                5 | 15 => (Kind::Udp, self.udp(c, srv)),
                _ => {
                    http += 1;
                    if http % 10 == 0 {
                        (
                            Kind::HttpDenied,
                            self.http(c, srv, &format!("/deny/{i}"), 403),
                        )
                    } else {
                        (
                            Kind::HttpAllowed,
                            self.http(c, srv, &format!("/ok/{i}"), 200),
                        )
                    }
                }
            };
            let (ok, wrong, detail) = result.unwrap_or_else(|e| (false, false, format!("{e:#}")));
            self.record(Op {
                kind,
                server: srv.name().to_string(),
                started,
                ended: self.since(),
                ok,
                wrong,
                detail: format!("{} -> {}: {detail}", c.name(), srv.name()),
            });
        }
    }

    /// GET `path`: `want` 200 (with the server's `ok <path>` body) or 403.
    fn http(&self, c: &Host, srv: &Host, path: &str, want: u16) -> Result<(bool, bool, String)> {
        let r = c.curl(srv.overlay_v4(), HTTP, path, &["--max-time", "10"])?;
        let body_ok = r.body == format!("ok {path}\n").as_bytes();
        let ok = r.status == want && (want != 200 || body_ok);
        // A denied request answered 200, or a 200 with another body that curl took as
        // whole. A body cut short by a reset (curl fails: 56) is a failed transfer, not
        // other bytes: what a restarted meshd does on purpose to connections it cannot
        // know (issue 26), counted as a failure in the restart window.
        let whole = r.code == Some(0);
        let wrong = r.status == 200 && (want == 403 || (whole && !body_ok));
        Ok((
            ok,
            wrong,
            format!(
                "GET {path}: {} (curl exit {:?}) {}",
                r.status,
                r.code,
                r.stderr.trim()
            ),
        ))
    }

    fn inspected_upload(&self, c: &Host, srv: &Host) -> Result<(bool, bool, String)> {
        let t = c.upload(
            srv.overlay_v4(),
            HTTP,
            "/upload",
            &self.upload,
            Duration::from_secs(15),
            &[],
        )?;
        let ok = t.intact(self.upload.len(), &self.upload_sha);
        Ok((
            ok,
            t.code == Some(0) && t.status == 200 && !ok,
            format!("{t:?}"),
        ))
    }

    fn bulk_upload(&self, c: &Host, srv: &Host) -> Result<(bool, bool, String)> {
        let data = pattern(BULK_BYTES, 77);
        let t = c.upload(
            srv.overlay_v4(),
            BULK,
            "/upload",
            &data,
            Duration::from_secs(20),
            &[],
        )?;
        let ok = t.intact(data.len(), &self.blob_sha);
        Ok((
            ok,
            t.code == Some(0) && t.status == 200 && !ok,
            format!("{t:?}"),
        ))
    }

    fn bulk_download(&self, c: &Host, srv: &Host) -> Result<(bool, bool, String)> {
        let t = c.download(
            srv.overlay_v4(),
            BULK,
            "/files/blob.bin",
            Duration::from_secs(20),
            &[],
        )?;
        let ok = t.intact(BULK_BYTES, &self.blob_sha);
        Ok((
            ok,
            t.code == Some(0) && t.status == 200 && !ok,
            format!("{t:?}"),
        ))
    }

    fn udp(&self, c: &Host, srv: &Host) -> Result<(bool, bool, String)> {
        // From one source port per client, as a client that keeps its socket: one
        // flow per client and server. From a new port each time, every echo would
        // leave a flow for the datagram timeout (180 s, as conntrack's), longer than
        // a short run, and the table could never come back to its warm-up level.
        let out = c.udp_echo_from(srv.overlay_v4(), UDP, UDP_CLIENT_PORT)?;
        Ok((out.success(), false, format!("{out}")))
    }
}

/// Client sockets in a state that should not last (see the module docs).
fn stuck_sockets(clients: &[Host]) -> Result<(usize, Vec<String>)> {
    let mut lines = Vec::new();
    for c in clients {
        let out = c.run(
            "ss",
            &[
                "-Htan",
                "state",
                "syn-sent",
                "state",
                "fin-wait-1",
                "state",
                "fin-wait-2",
                "state",
                "closing",
                "state",
                "last-ack",
            ],
        )?;
        lines.extend(
            out.stdout_str()
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| {
                    format!(
                        "{}: {}",
                        c.name(),
                        l.split_whitespace().collect::<Vec<_>>().join(" ")
                    )
                }),
        );
    }
    Ok((lines.len(), lines))
}

fn host_sample(h: &Host) -> HostSample {
    let counters = h
        .enforcement()
        .ok()
        .and_then(|e| e.get("counters").cloned())
        .unwrap_or_default();
    let num = |k: &str| counters.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
    let rss_kib = h
        .meshd_pid()
        .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0);
    HostSample {
        flows: num("flows"),
        l7_flows: num("l7_flows"),
        rss_kib,
    }
}

fn sample(run: &Run, hosts: &[Host], clients: &[Host]) -> Result<Sample> {
    let ops = run.ops.lock().unwrap_or_else(|p| p.into_inner());
    let (n, failed) = (ops.len(), ops.iter().filter(|o| !o.ok).count());
    drop(ops);
    Ok(Sample {
        at: run.since(),
        hosts: hosts.iter().map(host_sample).collect(),
        stuck: stuck_sockets(clients)?.0,
        ops: n,
        failed,
    })
}

fn run(args: Args) -> Result<bool> {
    let duration = args.duration;
    let every = args
        .sample
        .unwrap_or_else(|| (duration / 40).clamp(Duration::from_secs(2), Duration::from_secs(15)));
    let mut mesh = Mesh::new("soak")?;
    let mut servers = Vec::new();
    for name in ["srv1", "srv2"] {
        servers.push(mesh.host(name).policy("deny", &policy(0)).up()?);
    }
    let mut clients = Vec::new();
    for name in ["cli1", "cli2", "cli3"] {
        clients.push(mesh.host(name).groups(&["clients"]).up()?);
    }
    let blob = pattern(BULK_BYTES, 77);
    for s in &servers {
        s.write_www("blob.bin", &blob)?;
        s.serve_transfers(HTTP)?;
        s.serve_transfers(BULK)?;
        s.serve_udp_echo(UDP)?;
    }
    for c in &clients {
        for s in &servers {
            let r = c.http_get_eventually(s.overlay_v4(), HTTP, "/ok/ready")?;
            anyhow::ensure!(
                r.status == 200,
                "{} -> {} warm-up: {r:?}",
                c.name(),
                s.name()
            );
        }
    }
    let hosts: Vec<Host> = servers.iter().chain(&clients).cloned().collect();
    let upload = pattern(UPLOAD_BYTES, 5);
    let start = wait::now();
    let run = Run {
        start,
        deadline: start + duration,
        ops: Mutex::new(Vec::new()),
        stop: AtomicBool::new(false),
        servers: servers.clone(),
        blob_sha: sha256_hex(&blob),
        upload_sha: sha256_hex(&upload),
        upload,
    };
    println!(
        "mesh-soak: {} hosts, {:?}, a sample every {:?} ({})",
        hosts.len(),
        duration,
        every,
        mesh.dir().display()
    );
    // A meshd's memory fills for about a minute and a half under this traffic (batch
    // buffers grow to the largest coalesced packets seen, the flow table's pages are
    // touched, the decision log's ring fills), then stays flat (180 s run at 03:05 UTC
    // 2026-12-08: 20.9 MiB at 90 s, 21.1 at 180 s). The warm-up level is taken once
    // most of that is done: at a fifth of a long run, at half of a short one.
    let warmup_end = (duration / 5)
        .max((duration / 2).min(Duration::from_secs(120)))
        .max(Duration::from_secs(10));
    let policy_every = (duration / 6).max(Duration::from_secs(8));
    let renew_at = duration / 3;
    let restart_at = duration / 2;
    let mut samples = Vec::new();
    let mut events: Vec<(Duration, String)> = Vec::new();
    let mut restart_window = None;
    let result = std::thread::scope(|scope| -> Result<()> {
        for c in &clients {
            let run = &run;
            scope.spawn(move || run.client(c));
        }
        let (mut next_sample, mut next_policy, mut variant) = (Duration::ZERO, policy_every, 0);
        let (mut renewed, mut restarted) = (false, false);
        let controller = (|| -> Result<()> {
            while wait::now() < run.deadline {
                let t = run.since();
                if t >= next_sample {
                    samples.push(sample(&run, &hosts, &clients)?);
                    next_sample += every;
                }
                if t >= next_policy {
                    variant += 1;
                    for s in &servers {
                        s.apply_policy(&policy(variant))?.check()?;
                    }
                    events.push((t, format!("policy soak-{variant} applied on the servers")));
                    next_policy += policy_every;
                }
                if !renewed && t >= renew_at {
                    renewed = true;
                    let c = &clients[0];
                    c.renew_cert(&["clients"], Validity::Current)?;
                    for h in hosts.iter().filter(|h| h.name() != c.name()) {
                        h.peer_add(c)?;
                    }
                    events.push((t, format!("{}'s certificate renewed", c.name())));
                }
                if !restarted && t >= restart_at {
                    restarted = true;
                    let s = &servers[1];
                    s.stop_meshd()?;
                    s.start()?;
                    let up = run.since();
                    restart_window = Some((t, up + Duration::from_secs(5)));
                    events.push((
                        t,
                        format!(
                            "{}'s meshd restarted (up after {:.1} s)",
                            s.name(),
                            (up - t).as_secs_f64()
                        ),
                    ));
                }
                let next = next_sample.min(next_policy);
                sleep_until(
                    (start + next)
                        .min(run.deadline)
                        .min(wait::now() + Duration::from_secs(1)),
                );
            }
            Ok(())
        })();
        if controller.is_err() {
            run.stop.store(true, Ordering::Relaxed);
        }
        controller
    });
    result?;
    // The traffic has stopped (the workers joined): the end level under traffic is the
    // last samples; now let sockets settle.
    let traffic_samples = samples.len();
    let settle_until = wait::now() + Duration::from_secs(15);
    let mut stuck = stuck_sockets(&clients)?;
    while stuck.0 > 0 && wait::now() < settle_until {
        sleep_until(wait::now() + Duration::from_secs(1));
        stuck = stuck_sockets(&clients)?;
    }
    // Flows end (closed, refused, reset) and leave the table within the closing
    // timeout (10 s); what stays is long-lived (the clients' UDP flows, 180 s). A
    // flow that never leaves (a refused connection kept for the 2-hour idle timeout,
    // issue 26) keeps the table above its warm-up level.
    let drain_until = wait::now() + DRAIN;
    let mut last = sample(&run, &hosts, &clients)?;
    while last.hosts.iter().any(|h| h.flows > LONG_LIVED) && wait::now() < drain_until {
        sleep_until(wait::now() + Duration::from_secs(1));
        last = sample(&run, &hosts, &clients)?;
    }
    samples.push(last);
    let pass = report(
        &hosts,
        &samples,
        traffic_samples,
        warmup_end,
        &events,
        &run,
        restart_window,
        &stuck,
        every,
    );
    if !matches!(pass, Ok(true)) {
        mesh.keep();
    }
    pass
}

fn mean(v: impl Iterator<Item = u64>) -> f64 {
    let v: Vec<u64> = v.collect();
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<u64>() as f64 / v.len() as f64
    }
}

#[allow(clippy::too_many_arguments)] // everything the report shows
fn report(
    hosts: &[Host],
    samples: &[Sample],
    traffic_samples: usize,
    warmup_end: Duration,
    events: &[(Duration, String)],
    run: &Run,
    restart_window: Option<(Duration, Duration)>,
    stuck: &(usize, Vec<String>),
    every: Duration,
) -> Result<bool> {
    let mut out = String::new();
    // Over time.
    let _ = write!(out, "\n| t s |");
    for h in hosts {
        let _ = write!(out, " {} flows (l7) | {} RSS KiB |", h.name(), h.name());
    }
    let _ = writeln!(out, " stuck client sockets | ops | failed |");
    let _ = write!(out, "|---|");
    for _ in hosts {
        let _ = write!(out, "---|---|");
    }
    let _ = writeln!(out, "---|---|---|");
    for (i, s) in samples.iter().enumerate() {
        let mark = if i == traffic_samples {
            " (settled)"
        } else {
            ""
        };
        let _ = write!(out, "| {:.0}{mark} |", s.at.as_secs_f64());
        for h in &s.hosts {
            let _ = write!(out, " {} ({}) | {} |", h.flows, h.l7_flows, h.rss_kib);
        }
        let _ = writeln!(out, " {} | {} | {} |", s.stuck, s.ops, s.failed);
    }
    let _ = writeln!(out, "\nevents:");
    for (t, e) in events {
        let _ = writeln!(out, "- {:.0} s: {e}", t.as_secs_f64());
    }
    // Operations.
    let ops = run.ops.lock().unwrap_or_else(|p| p.into_inner());
    let in_restart = |o: &Op| {
        restart_window.is_some_and(|(a, b)| o.server == "srv2" && o.started < b && o.ended > a)
    };
    let mut by_kind: BTreeMap<Kind, (usize, usize, usize, usize)> = BTreeMap::new();
    for o in ops.iter() {
        let e = by_kind.entry(o.kind).or_default();
        e.0 += 1;
        if o.ok {
            e.1 += 1;
        } else if in_restart(o) {
            e.2 += 1;
        } else {
            e.3 += 1;
        }
    }
    // The slowest operations: a hang shows here even when it ended well.
    let mut slow: Vec<&Op> = ops.iter().collect();
    slow.sort_by_key(|o| std::cmp::Reverse(o.ended.saturating_sub(o.started)));
    let _ = writeln!(out, "\nslowest operations:");
    for o in slow.iter().take(3) {
        let _ = writeln!(
            out,
            "- [{:.1} s, {:.1} s long, {}] {} {}",
            o.started.as_secs_f64(),
            o.ended.saturating_sub(o.started).as_secs_f64(),
            if o.ok { "ok" } else { "failed" },
            o.kind.name(),
            o.detail.chars().take(300).collect::<String>()
        );
    }
    let _ = writeln!(
        out,
        "\n| traffic | operations | as expected | failed in the restart window | failed otherwise |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|");
    for (k, (n, ok, restart, other)) in &by_kind {
        let _ = writeln!(out, "| {} | {n} | {ok} | {restart} | {other} |", k.name());
    }
    // Checks.
    let mut checks: Vec<(String, bool, String)> = Vec::new();
    let crashed: Vec<String> = hosts
        .iter()
        .filter(|h| !h.meshd_alive().unwrap_or(false) || h.log().contains("panicked"))
        .map(|h| h.name().to_string())
        .collect();
    checks.push((
        "no crash".into(),
        crashed.is_empty(),
        if crashed.is_empty() {
            "every meshd runs, no panic logged".into()
        } else {
            format!("down or panicked: {}", crashed.join(", "))
        },
    ));
    let end: Vec<&Sample> = samples[..traffic_samples].iter().rev().take(3).collect();
    // A host's warm-up level: its first samples once it has run for the warm-up under
    // traffic, before the end samples. The restarted meshd starts again from nothing:
    // its warm-up counts from the restart, and in a run too short for that it is not
    // measured (the full run measures it).
    let before_end = &samples[..traffic_samples.saturating_sub(end.len())];
    let warm_of = |h: &Host| -> Vec<&Sample> {
        let started = match restart_window {
            Some((_, up)) if h.name() == "srv2" => up,
            _ => Duration::ZERO,
        };
        // Nor while the restart disturbs everyone's traffic (the clients' flows to
        // srv2 are reset, their next ones wait for it).
        let disturbed = |at: Duration| {
            restart_window.is_some_and(|(a, b)| at >= a && at <= b + Duration::from_secs(10))
        };
        before_end
            .iter()
            .filter(|s| s.at >= started + warmup_end && !disturbed(s.at))
            .take(3)
            .collect()
    };
    // Flows move with the traffic's phase (a bulk transfer holds one for a while):
    // the allowance is 10% or 3 per client, whichever is more.
    let flow_slack = 9.0;
    let mut flows_detail = Vec::new();
    let mut rss_detail = Vec::new();
    let (mut flows_ok, mut rss_ok) = (true, true);
    let mut measured = 0;
    for (i, h) in hosts.iter().enumerate() {
        let warm = warm_of(h);
        if warm.is_empty() {
            // No warm-up level to come back to: its table must still have drained.
            let drained = samples[samples.len() - 1].hosts[i].flows;
            let f_ok = drained <= LONG_LIVED;
            flows_ok &= f_ok;
            flows_detail.push(format!(
                "{} drained to {drained}{} (restarted too late for a warm-up level)",
                h.name(),
                if f_ok { "" } else { " ✗" }
            ));
            rss_detail.push(format!("{} n/a (restarted too late in this run)", h.name()));
            continue;
        }
        measured += 1;
        let w_flows = mean(warm.iter().map(|s| s.hosts[i].flows));
        // Back to: once the traffic stopped and the table drained (the last sample).
        let e_flows = samples[samples.len() - 1].hosts[i].flows as f64;
        let w_rss = mean(warm.iter().map(|s| s.hosts[i].rss_kib));
        let e_rss = mean(end.iter().map(|s| s.hosts[i].rss_kib));
        let f_ok = e_flows <= (w_flows * 1.1).max(w_flows + flow_slack);
        let r_ok = e_rss <= w_rss * 1.1;
        flows_ok &= f_ok;
        rss_ok &= r_ok;
        flows_detail.push(format!(
            "{} {:.0}→{:.0}{}",
            h.name(),
            w_flows,
            e_flows,
            if f_ok { "" } else { " ✗" }
        ));
        rss_detail.push(format!(
            "{} {:.0}→{:.0} KiB{}",
            h.name(),
            w_rss,
            e_rss,
            if r_ok { "" } else { " ✗" }
        ));
    }
    // Nothing measured is not a pass.
    flows_ok &= measured > 0;
    rss_ok &= measured > 0;
    checks.push((
        "tracked flows back to warm-up level once the traffic stopped (≤ +10%, or +9)".into(),
        flows_ok,
        flows_detail.join(", "),
    ));
    checks.push((
        "resident memory back to warm-up level (≤ +10%)".into(),
        rss_ok,
        rss_detail.join(", "),
    ));
    let failed = |kinds: &[Kind]| -> Vec<&Op> {
        ops.iter()
            .filter(|o| kinds.contains(&o.kind) && (o.wrong || (!o.ok && !in_restart(o))))
            .collect()
    };
    let show = |v: &[&Op]| -> String {
        v.iter()
            .take(5)
            .map(|o| format!("[{:.0} s] {}", o.started.as_secs_f64(), o.detail))
            .collect::<Vec<_>>()
            .join("; ")
    };
    let allowed = failed(&[
        Kind::HttpAllowed,
        Kind::InspectedUpload,
        Kind::BulkUpload,
        Kind::BulkDownload,
    ]);
    let n_allowed = ops
        .iter()
        .filter(|o| !matches!(o.kind, Kind::HttpDenied | Kind::Udp))
        .count();
    checks.push((
        "every allowed transfer intact".into(),
        allowed.is_empty() && n_allowed > 0,
        if allowed.is_empty() {
            format!("{n_allowed} operations")
        } else {
            format!("{} of {n_allowed} not: {}", allowed.len(), show(&allowed))
        },
    ));
    let denied = failed(&[Kind::HttpDenied]);
    let n_denied = ops.iter().filter(|o| o.kind == Kind::HttpDenied).count();
    checks.push((
        "every denied request refused (403)".into(),
        denied.is_empty() && n_denied > 0,
        if denied.is_empty() {
            format!("{n_denied} requests")
        } else {
            format!("{} of {n_denied} not: {}", denied.len(), show(&denied))
        },
    ));
    // UDP promises nothing: a datagram may be lost on a loaded host (three tries of 1 s
    // each per echo). Allowed UDP must still work.
    let udp = failed(&[Kind::Udp]);
    let n_udp = ops.iter().filter(|o| o.kind == Kind::Udp).count();
    checks.push((
        "UDP echoes answered (≥ 99%)".into(),
        n_udp > 0 && udp.len() * 100 <= n_udp,
        if udp.is_empty() {
            format!("{n_udp} echoes")
        } else {
            format!("{} of {n_udp} unanswered: {}", udp.len(), show(&udp))
        },
    ));
    checks.push((
        "no client socket stuck 15 s after the traffic".into(),
        stuck.0 == 0,
        if stuck.0 == 0 {
            "none".into()
        } else {
            format!(
                "{}: {}",
                stuck.0,
                stuck
                    .1
                    .iter()
                    .take(5)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        },
    ));
    let _ = writeln!(out, "\n| check | result | detail |\n|---|---|---|");
    for (name, ok, detail) in &checks {
        let _ = writeln!(
            out,
            "| {name} | {} | {detail} |",
            if *ok { "PASS" } else { "FAIL" }
        );
    }
    let pass = checks.iter().all(|c| c.1);
    let _ = writeln!(
        out,
        "\nmesh-soak: {} (samples every {:?}; warm-up level: the first 3 samples after {:.0} s of a meshd's run; end level: the last 3 under traffic)",
        if pass { "PASS" } else { "FAIL" },
        every,
        warmup_end.as_secs_f64()
    );
    print!("{out}");
    Ok(pass)
}
