//! `meshd --config FILE` runs the daemon; `meshd check-config --config FILE` checks
//! the configuration and everything it names, and touches nothing.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mesh_proto::config::Config;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "meshd",
    version,
    about = "The meshd daemon: an identity-bound WireGuard overlay."
)]
struct Cli {
    /// Configuration file (meshd.toml)
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Check the configuration and the files it names; exit 0 if meshd would start
    CheckConfig,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let Some(path) = cli.config else {
        eprintln!("meshd: --config FILE is required");
        return ExitCode::from(2);
    };
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("meshd: {e}");
            return ExitCode::from(1);
        }
    };
    let filter = EnvFilter::try_from_env("MESHD_LOG")
        .unwrap_or_else(|_| EnvFilter::new(config.node.log_level.as_str()));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    match cli.command {
        Some(Command::CheckConfig) => check(config),
        None => run(config),
    }
}

fn check(config: Config) -> ExitCode {
    match meshd::load(config, meshd::datapath::unix_now()) {
        Ok(l) => {
            if l.config.node.host_filter {
                if let Err(e) = meshd::hostfilter::check(&l) {
                    eprintln!(
                        "meshd: {}",
                        l.config.error(
                            "node.host_filter",
                            format!("{e}; meshd would not start (or set host_filter = false in [node] to run unprotected)")
                        )
                    );
                    return ExitCode::from(1);
                }
            }
            println!(
                "{}: ok: {} on {}, {} peer(s)",
                l.config.file.display(),
                l.cert.identity(),
                l.config.node.listen,
                l.peers.len()
            );
            if !l.config.node.host_filter {
                println!(
                    "warning: node.host_filter = false: meshd would run without its host filter; the underlay would reach the overlay addresses in plaintext"
                );
            }
            if let Some(us) = l.config.node.cpu_latency_us {
                if let Err(e) = meshd::cpu_latency::probe() {
                    println!(
                        "warning: node.cpu_latency_us = {us}: cannot open {} ({e}); meshd would run without the request",
                        meshd::cpu_latency::DEVICE
                    );
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("meshd: {e}");
            ExitCode::from(1)
        }
    }
}

fn run(config: Config) -> ExitCode {
    let shutdown = meshd::Shutdown::new();
    let mut signals = match Signals::new([SIGTERM, SIGINT]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("meshd: cannot install signal handlers: {e}");
            return ExitCode::from(1);
        }
    };
    let handle = signals.handle();
    let s = shutdown.clone();
    #[allow(clippy::disallowed_methods)] // I/O shell: the signal-waiting thread
    let waiter = std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            tracing::info!(signal = sig, "shutting down");
            s.trigger();
        }
    });
    let result = meshd::run(config, shutdown.clone());
    handle.close();
    let _ = waiter.join();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshd: {}", e.to_string().replace('\n', " "));
            ExitCode::from(1)
        }
    }
}
