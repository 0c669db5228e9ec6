//! meshctl: the meshd operator's tool. Nouns then verbs (`meshctl cert issue`).
//! Results go to stdout, errors to stderr as one line naming the problem and the file.
//!
//! Exit codes: 0 ok; 1 error (meshctl's own, or meshd refused the request as invalid:
//! its reason follows `meshd: `); 2 usage error; and for meshd's other answers
//! ([`mesh_proto::control::ControlError`]): 3 not found (no such peer or workload),
//! 4 not allowed (the control socket refused this user), 5 busy (try again),
//! 6 bad request (meshd did not understand meshctl: different versions?), 7 meshd
//! failed (see its log); 141 when the reader of stdout went away (`meshctl … | head
//! -1`), quietly, as a shell reports a C tool that SIGPIPE ended.

/// Prints to stdout through [`out`]: `?` it; a reader that went away ends meshctl
/// quietly.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::out(format_args!($($arg)*))
    };
}

/// [`out!`] with a newline.
macro_rules! outln {
    () => {
        $crate::out(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::out(format_args!("{}\n", format_args!($($arg)*)))
    };
}

mod ca;
mod cert;
mod client;
mod fleet;
mod key;
mod log;
mod online;
mod policy;
mod store;
mod workload;

use clap::{Args, Parser, Subcommand};
use mesh_proto::time::UnixTime;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "meshctl",
    version,
    about = "Operate a meshd mesh: CA, certificates, keys, peers, policy, status.",
    color = clap::ColorChoice::Never,
    after_help = "Examples:
  meshctl ca init --trust-domain example.org
  meshctl cert issue --identity spiffe://example.org/web --ip 100.64.0.1 --out web.crt
  meshctl cert verify --ca ca.crt web.crt
  meshctl cert show --json web.crt
  meshctl --store http://198.18.0.9:2379 --trust-domain example.org fleet status"
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

/// Options every subcommand accepts.
#[derive(Args, Debug, Clone)]
pub struct Global {
    /// meshd's control socket (for commands that talk to a running meshd)
    #[arg(long, global = true, env = "MESHD_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Print results as JSON
    #[arg(long, global = true)]
    pub json: bool,
    #[command(flatten)]
    pub store: store::StoreArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Create and inspect the mesh certificate authority
    #[command(subcommand)]
    Ca(ca::Command),
    /// Issue, renew, show and verify mesh certificates
    #[command(subcommand)]
    Cert(cert::Command),
    /// Generate x25519 (WireGuard) keys
    #[command(subcommand)]
    Key(key::Command),
    /// Check, test and explain policy files; apply them to meshd
    #[command(subcommand)]
    Policy(policy::Command),
    /// Show the running meshd's decision log (denies and audit matches); -f follows
    Log(log::LogArgs),
    /// Show the running meshd: identity, listen address, peers, handshakes, drops
    Status,
    /// Add, remove and list the running meshd's peers
    #[command(subcommand)]
    Peer(online::PeerCommand),
    /// Add, remove and list the running meshd's local workloads (pods)
    #[command(subcommand)]
    Workload(workload::Command),
    /// The nodes of the fleet store: status and policy drift (--store)
    #[command(subcommand)]
    Fleet(fleet::FleetCommand),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    let result = match cli.command {
        Command::Ca(c) => ca::run(c, &cli.global),
        Command::Cert(c) => cert::run(c, &cli.global),
        Command::Key(c) => key::run(c, &cli.global),
        Command::Policy(c) => policy::run(c, &cli.global),
        Command::Status => online::status(&cli.global),
        Command::Log(a) => log::run(a, &cli.global),
        Command::Peer(c) => online::peer(c, &cli.global),
        Command::Workload(c) => workload::run(c, &cli.global),
        Command::Fleet(c) => fleet::fleet_cmd(&cli.global.store, c, &cli.global),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<StdoutClosed>() => ExitCode::from(CLOSED_STDOUT),
        Err(e) => {
            warn_line(&format!("meshctl: {}", one_line(&e)));
            let code = e
                .downcast_ref::<client::ClientError>()
                .map_or(1, client::ClientError::exit_code);
            ExitCode::from(code)
        }
    }
}

/// Exit status when the reader of stdout went away: 128 + SIGPIPE, what a shell
/// reports for a process that SIGPIPE ended (Rust ignores SIGPIPE, so meshctl sees
/// EPIPE instead and ends itself, quietly).
const CLOSED_STDOUT: u8 = 128 + 13;

/// Nobody reads meshctl's output any more (`meshctl … | head -1`): not an error to
/// report, the end of the command.
#[derive(Debug)]
pub struct StdoutClosed;

impl std::fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stdout closed")
    }
}

impl std::error::Error for StdoutClosed {}

/// Writes to stdout and flushes, so that a closed pipe shows at once; a closed pipe
/// is [`StdoutClosed`].
pub fn out(args: std::fmt::Arguments<'_>) -> anyhow::Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_fmt(args)
        .and_then(|()| stdout.flush())
        .map_err(stdout_error)
}

/// An error writing to stdout: [`StdoutClosed`] for a closed pipe.
pub fn stdout_error(e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        StdoutClosed.into()
    } else {
        anyhow::anyhow!("cannot write to stdout: {e}")
    }
}

/// Prints a line on stderr if it can (a closed stderr is not worth a panic).
pub fn warn_line(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Help and version go to stdout as clap prints them; a usage error becomes one line
/// on stderr with the command's usage, exit code 2.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::{ContextKind, ErrorKind};
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        let _ = e.print();
        return ExitCode::SUCCESS;
    }
    let rendered = e.render().to_string();
    let usage_of = |text: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix("Usage: ").map(str::to_owned))
    };
    let usage = e
        .get(ContextKind::Usage)
        .and_then(|u| usage_of(&u.to_string()))
        .or_else(|| usage_of(&rendered));
    let first = if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        "a subcommand is required".to_owned()
    } else {
        // The first paragraph: "error: ... not provided:" continues on indented lines.
        let para: Vec<&str> = rendered
            .lines()
            .take_while(|l| !l.trim().is_empty())
            .map(str::trim)
            .collect();
        let para = para.join(" ");
        para.strip_prefix("error: ").unwrap_or(&para).to_owned()
    };
    match usage {
        Some(u) => warn_line(&format!("meshctl: {first} (usage: {u})")),
        None => warn_line(&format!("meshctl: {first} (see meshctl --help)")),
    }
    ExitCode::from(2)
}

/// The error and its causes on one line, without repeating a cause that the message
/// already quotes.
fn one_line(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !msg.contains(&c) {
            msg.push_str(": ");
            msg.push_str(&c);
        }
    }
    msg.replace('\n', " ")
}

/// The wall clock. meshctl is an I/O shell; the proto crate takes `now` as an argument.
#[allow(clippy::disallowed_methods)] // the one clock read in meshctl, passed down as `now`
pub fn now() -> UnixTime {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    UnixTime(secs)
}

/// Prints a value as one line of JSON on stdout.
pub fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    outln!("{}", serde_json::to_string(v)?)
}
