//! `mesh-faultbench`: measures transfers through the fault scenario
//! ([`mesh_tests::faults`]) and prints a markdown table: for each impairment and kind
//! of transfer, how many of N runs completed intact and how long they took.
//!
//! ```text
//! mesh-faultbench [--runs N] [--mb M] [--limit SECS] [--kinds l7-up,l4-up,...] IMPAIRMENT...
//! mesh-faultbench restart [--runs N] [--mb M] [--limit SECS] [--kinds ...]
//! ```
//! Kinds: `l7-up`, `l7-up-chunked`, `l7-down` (the inspected port), `l4-up`, `l4-down`
//! (the layer-4 port). An impairment is the relay's text (`loss=0.005`, `reorder=0.25,hold=3ms`,
//! `none`). `restart` kills meshd (SIGKILL) on the receiving host, then on the sending
//! host, once a quarter of the bytes crossed the relay, starts it again, and reports how
//! each transfer ended and how long after the restart. Runs as root (network
//! namespaces), with the binaries beside it (`cargo build --release -p mesh-tests
//! --bins` and the workspace's); `MESH_RELAY_SEED` fixes the relay's seed.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mesh_tests::faults::{Faulty, INSPECTED, PLAIN};
use mesh_tests::relay::Impairment;
use mesh_tests::transfer::{pattern, sha256_hex, Transfer};
use mesh_tests::{wait, Host, Mesh};

struct Args {
    runs: usize,
    mb: usize,
    limit: Duration,
    kinds: Vec<String>,
    restart: bool,
    impairments: Vec<String>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        runs: 5,
        mb: 50,
        limit: Duration::from_secs(60),
        kinds: vec!["l7-up".into(), "l4-up".into()],
        restart: false,
        impairments: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--runs" => args.runs = value()?.parse()?,
            "--mb" => args.mb = value()?.parse()?,
            "--limit" => args.limit = Duration::from_secs(value()?.parse()?),
            "--kinds" => args.kinds = value()?.split(',').map(str::to_string).collect(),
            "restart" => args.restart = true,
            "-h" | "--help" => {
                println!("{}", USAGE);
                std::process::exit(0);
            }
            other => {
                Impairment::parse(other)?;
                args.impairments.push(other.to_string());
            }
        }
    }
    if !args.restart && args.impairments.is_empty() {
        bail!("{USAGE}");
    }
    Ok(args)
}

const USAGE: &str = "usage: mesh-faultbench [--runs N] [--mb M] [--limit SECS] [--kinds l7-up,l4-up,l7-down,l4-down] IMPAIRMENT... | restart [...]";

fn main() {
    mesh_tests::isolate::isolate_process();
    if let Err(e) = run() {
        eprintln!("mesh-faultbench: {e:#}");
        std::process::exit(1);
    }
}

#[allow(clippy::disallowed_methods)] // a benchmark reads the clock.
fn now() -> Instant {
    Instant::now()
}

fn run() -> Result<()> {
    let args = parse_args()?;
    let data = pattern(args.mb << 20, 1);
    let sha = sha256_hex(&data);
    let mut mesh = Mesh::new("faultbench")?;
    let f = Faulty::start(&mut mesh)?;
    f.publish("big.bin", &data)?;
    println!(
        "{} MiB per transfer, {} runs, limit {:?}, relay seed {}",
        args.mb,
        args.runs,
        args.limit,
        f.relay.seed()
    );
    if args.restart {
        f.a.run("sysctl", &["-qw", "net.ipv4.tcp_rmem=4096 65536 262144"])?;
        println!("| kind | killed | run | outcome | curl exit | total s | after restart s |");
        println!("|---|---|---|---|---|---|---|");
        for kind in &args.kinds {
            for side in ["receiver", "sender"] {
                for i in 0..args.runs {
                    restart_run(&f, kind, side, i, &data, &sha, args.limit)?;
                }
            }
        }
        return Ok(());
    }
    println!(
        "| impairment | kind | completed | times s (min / median / max of completed) | failures |"
    );
    println!("|---|---|---|---|---|");
    for imp in &args.impairments {
        f.relay.set(Impairment::parse(imp)?)?;
        for kind in &args.kinds {
            let mut times = Vec::new();
            let mut failures = Vec::new();
            for _ in 0..args.runs {
                let t = transfer(&f, kind, &data, args.limit, &[])?;
                if t.intact(data.len(), &sha) {
                    times.push(t.elapsed.as_secs_f64());
                } else {
                    failures.push(format!(
                        "{} (curl {:?}, {:.1} s, {} B)",
                        t.status,
                        t.code,
                        t.elapsed.as_secs_f64(),
                        t.len
                    ));
                }
            }
            times.sort_by(f64::total_cmp);
            let span = match times.as_slice() {
                [] => "-".to_string(),
                t => format!(
                    "{:.1} / {:.1} / {:.1}",
                    t[0],
                    t[t.len() / 2],
                    t[t.len() - 1]
                ),
            };
            println!(
                "| {imp} | {kind} | {}/{} | {span} | {} |",
                times.len(),
                args.runs,
                failures.join("; ")
            );
        }
        f.relay.set(Impairment::none())?;
    }
    let s = f.relay.stats()?;
    eprintln!("relay: {s:?}");
    Ok(())
}

fn transfer(
    f: &Faulty,
    kind: &str,
    data: &[u8],
    limit: Duration,
    extra: &[&str],
) -> Result<Transfer> {
    let addr = f.c.overlay_v4();
    let chunked = [&["-H", "Transfer-Encoding: chunked"][..], extra].concat();
    match kind {
        "l7-up" => f.a.upload(addr, INSPECTED, "/upload", data, limit, extra),
        "l7-up-chunked" => {
            f.a.upload(addr, INSPECTED, "/upload", data, limit, &chunked)
        }
        "l4-up" => f.a.upload(addr, PLAIN, "/upload", data, limit, extra),
        "l7-down" => {
            f.a.download(addr, INSPECTED, "/files/big.bin", limit, extra)
        }
        "l4-down" => f.a.download(addr, PLAIN, "/files/big.bin", limit, extra),
        _ => bail!("unknown kind {kind:?}"),
    }
}

/// One transfer with a meshd killed and restarted in the middle of it.
fn restart_run(
    f: &Faulty,
    kind: &str,
    side: &str,
    i: usize,
    data: &[u8],
    sha: &str,
    limit: Duration,
) -> Result<()> {
    let upload = kind.ends_with("-up");
    let (receiver, sender): (&Host, &Host) = if upload { (&f.c, &f.a) } else { (&f.a, &f.c) };
    let victim = if side == "receiver" { receiver } else { sender };
    let before = f.relay.stats()?;
    let moved = |s: &mesh_tests::relay::Stats| {
        if upload {
            s.toward_b.bytes - before.toward_b.bytes
        } else {
            s.toward_a.bytes - before.toward_a.bytes
        }
    };
    let start = now();
    let (t, restarted) = std::thread::scope(|scope| -> Result<(Transfer, Instant)> {
        // Paced (20 MB/s, and a small receive buffer on the client), so that a quarter
        // of the bytes is a moment to act in.
        let job = scope.spawn(|| transfer(f, kind, data, limit, &["--limit-rate", "20M"]));
        wait::until("a quarter of the transfer", limit, || {
            Ok((moved(&f.relay.stats()?) as usize > data.len() / 4).then_some(()))
        })?;
        victim.kill_meshd()?;
        victim.start()?;
        let restarted = now();
        let t = job
            .join()
            .map_err(|_| anyhow::anyhow!("transfer thread panicked"))??;
        Ok((t, restarted))
    })?;
    let end = now();
    let outcome = if t.intact(data.len(), sha) {
        "intact".to_string()
    } else {
        format!("failed: status {} after {} B", t.status, t.len)
    };
    println!(
        "| {kind} | {side} ({}) | {i} | {outcome} | {:?} | {:.1} | {:.1} |",
        victim.name(),
        t.code,
        end.duration_since(start).as_secs_f64(),
        end.duration_since(restarted).as_secs_f64()
    );
    Ok(())
}
