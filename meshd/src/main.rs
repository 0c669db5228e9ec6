//! `meshd --config FILE` runs the daemon; `meshd check-config --config FILE` checks
//! the configuration and everything it names, and whether this host would give meshd
//! its port and its TUN's name (the port is bound and let go at once); it changes
//! nothing.

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
        error_line("meshd: --config FILE is required");
        return ExitCode::from(2);
    };
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            error_line(&format!("meshd: {e}"));
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

/// `meshd check-config`: exit 0 if meshd would start with everything the
/// configuration names in force; otherwise one line per problem on stderr, exit 1.
fn check(config: Config) -> ExitCode {
    let l = match meshd::load(config, meshd::sys::clock::unix_now()) {
        Ok(l) => l,
        Err(e) => {
            error_line(&format!("meshd: {e}"));
            return ExitCode::from(1);
        }
    };
    // What meshd would start with but refuse at run time is a problem here, and so
    // is what the host would refuse it at start (its port, its device's name).
    let problems: Vec<_> = l
        .refused
        .iter()
        .cloned()
        .chain(meshd::control::daemon::check_host(&l.config))
        .collect();
    let mut failed = !problems.is_empty();
    for e in &problems {
        error_line(&format!("meshd: {e}"));
    }
    if l.config.node.host_filter {
        if let Err(e) = meshd::control::hostfilter::check(&l.host_filter_ruleset()) {
            error_line(&format!(
                "meshd: {}",
                l.config.error(
                    "node.host_filter",
                    format!("{e}; meshd would not start (or set host_filter = false in [node] to run unprotected)")
                )
            ));
            failed = true;
        }
    }
    if failed {
        return ExitCode::from(1);
    }
    say(&format!(
        "{}: ok: {} on {}, {} peer(s)",
        l.config.file.display(),
        l.cert.identity(),
        l.config.node.listen,
        l.peers.len()
    ));
    if !l.config.node.host_filter {
        say("warning: node.host_filter = false: meshd would run without its host filter; the underlay would reach the overlay addresses in plaintext");
    }
    if let Some(us) = l.config.node.cpu_latency_us {
        if let Err(e) = meshd::datapath::cpu_latency::probe() {
            say(&format!(
                "warning: node.cpu_latency_us = {us}: cannot open {} ({e}); meshd would run without the request",
                meshd::datapath::cpu_latency::DEVICE
            ));
        }
    }
    ExitCode::SUCCESS
}

/// Exit status of a command whose reader went away (`meshd check-config | head -1`):
/// what a shell reports for a process that SIGPIPE ended, as it ends C tools.
const CLOSED_STDOUT: i32 = 128 + libc::SIGPIPE;

/// Prints a line on stdout; if nobody reads it any more, exits quietly.
fn say(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{line}").and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(CLOSED_STDOUT);
        }
        error_line(&format!("meshd: cannot write to stdout: {e}"));
        std::process::exit(1);
    }
}

/// Prints a line on stderr, if it can (a closed stderr is not worth a panic).
fn error_line(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn run(config: Config) -> ExitCode {
    let shutdown = meshd::Shutdown::new();
    let mut signals = match Signals::new([SIGTERM, SIGINT]) {
        Ok(s) => s,
        Err(e) => {
            error_line(&format!("meshd: cannot install signal handlers: {e}"));
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
            error_line(&format!("meshd: {}", e.to_string().replace('\n', " ")));
            ExitCode::from(1)
        }
    }
}
