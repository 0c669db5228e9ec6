//! `meshctl policy ...`: check, test and explain policy files offline; apply them to
//! a running meshd and explain against its live policy over the control socket.

use crate::client::Client;
use crate::Global;
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use mesh_proto::control::PolicyApplyRequest;
use mesh_proto::policy::{
    self, parse_header, CompiledPolicy, DefaultAction, Explanation, HttpSpec, Protocol, RequestSpec,
};
use std::path::{Path, PathBuf};

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Validate a policy file: print errors and warnings
    #[command(after_help = "Examples:
  meshctl policy check policy.toml")]
    Check {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Run a policy file's [[test]] cases offline; exit 1 if any fails
    #[command(after_help = "Examples:
  meshctl policy test policy.toml
  meshctl policy test --default allow --json policy.toml")]
    Test {
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// The mesh default the tests run under (meshd.toml `[policy] default`)
        #[arg(long, value_enum, default_value_t = Default::Deny)]
        default: Default,
    },
    /// Show the decision for a described request as the data path makes it, the rule
    /// that made it, and why every other policy did not match (offline with --file,
    /// else from meshd). Without --method, --path, --host or --header the request is a
    /// connection that sends no HTTP (refused as not_http on an inspected port)
    #[command(after_help = "Examples:
  meshctl policy explain --file policy.toml --from spiffe://t/web --to-port 8080
  meshctl policy explain --file policy.toml --from spiffe://t/web --to-port 8080 \\
      --method POST --path /api/items --header 'x-env: prod' --json
  meshctl --socket /run/meshd.sock policy explain --from spiffe://t/web --to-port 5432")]
    Explain(Box<ExplainArgs>),
    /// Validate a policy file and send it to meshd, which runs its tests and swaps it
    /// in atomically (a policy whose tests fail is refused)
    #[command(after_help = "Examples:
  meshctl --socket /run/meshd.sock policy apply policy.toml")]
    Apply {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Policy signing keys for the fleet store
    #[command(subcommand)]
    Key(crate::store::KeyCommand),
    /// Validate a policy file, run its [[test]] cases, sign it as the next version and
    /// write it to the fleet store, unless someone else published meanwhile
    #[command(after_help = "Examples:
  meshctl --store http://198.18.0.9:2379 --trust-domain example.org \\
      policy publish policy.toml --key policy.key
  meshctl ... policy publish policy.toml --key policy.key --expect-version 6")]
    Publish {
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// The policy signing key (meshctl policy key gen)
        #[arg(long, value_name = "KEY")]
        key: PathBuf,
        /// The mesh default the tests run under (meshd.toml `[policy] default`)
        #[arg(long, value_enum, default_value_t = Default::Deny)]
        default: Default,
        /// Publish only if the version in force is still this one (the one reviewed)
        #[arg(long, value_name = "N")]
        expect_version: Option<u64>,
    },
    /// List the policy versions published to the fleet store, or print one
    #[command(after_help = "Examples:
  meshctl --store http://198.18.0.9:2379 --trust-domain example.org policy history
  meshctl ... policy history 4 > v4.toml
  meshctl ... policy history --trust policy.pub    # check every signature")]
    History {
        /// Print this version's policy text
        #[arg(value_name = "VERSION")]
        version: Option<u64>,
        /// Check signatures against these policy public keys (repeatable)
        #[arg(long = "trust", value_name = "PUB")]
        trust: Vec<PathBuf>,
    },
    /// Publish the content of version N again, as a new version signed with KEY
    #[command(after_help = "Examples:
  meshctl --store http://198.18.0.9:2379 --trust-domain example.org \\
      policy rollback 4 --key policy.key")]
    Rollback {
        #[arg(value_name = "N")]
        version: u64,
        /// The policy signing key
        #[arg(long, value_name = "KEY")]
        key: PathBuf,
        /// Other policy public keys that version N may be signed by (repeatable)
        #[arg(long = "trust", value_name = "PUB")]
        trust: Vec<PathBuf>,
        /// The mesh default the tests run under
        #[arg(long, value_enum, default_value_t = Default::Deny)]
        default: Default,
    },
}

/// The mesh default, as on the command line.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Default {
    Deny,
    Allow,
}

impl From<Default> for DefaultAction {
    fn from(d: Default) -> DefaultAction {
        match d {
            Default::Deny => DefaultAction::Deny,
            Default::Allow => DefaultAction::Allow,
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Proto {
    Tcp,
    Udp,
    Icmp,
}

#[derive(Args, Debug)]
pub struct ExplainArgs {
    /// Policy file to explain against (offline); without it, ask the running meshd
    #[arg(long, value_name = "FILE")]
    file: Option<PathBuf>,
    /// Mesh default for --file (meshd.toml `[policy] default`)
    #[arg(long, value_enum, default_value_t = Default::Deny)]
    default: Default,
    /// Source identity (SPIFFE ID)
    #[arg(long, value_name = "SPIFFE_ID")]
    from: Option<String>,
    /// A group of the source's certificate (repeatable)
    #[arg(long = "from-group", value_name = "GROUP")]
    from_groups: Vec<String>,
    /// Source overlay address
    #[arg(long, value_name = "IP")]
    from_address: Option<std::net::IpAddr>,
    /// The local workload receiving the request (for policy selectors)
    #[arg(long, value_name = "SPIFFE_ID")]
    workload: Option<String>,
    /// A group of the local workload (repeatable)
    #[arg(long = "workload-group", value_name = "GROUP")]
    workload_groups: Vec<String>,
    /// Destination overlay address
    #[arg(long, value_name = "IP")]
    to_address: Option<std::net::IpAddr>,
    /// Destination port (not for icmp)
    #[arg(long, value_name = "PORT")]
    to_port: Option<u16>,
    /// Transport protocol
    #[arg(long, value_enum, default_value_t = Proto::Tcp)]
    proto: Proto,
    /// HTTP method (layer 7)
    #[arg(long)]
    method: Option<String>,
    /// HTTP request path, normalised as the enforcer does (layer 7; not read on a
    /// port that is not inspected)
    #[arg(long)]
    path: Option<String>,
    /// HTTP Host header (layer 7)
    #[arg(long)]
    host: Option<String>,
    /// HTTP header `name: value` (repeatable, layer 7)
    #[arg(long = "header", value_name = "NAME: VALUE")]
    headers: Vec<String>,
}

pub fn run(cmd: Command, g: &Global) -> Result<()> {
    match cmd {
        Command::Check { file } => check(&file, g),
        Command::Test { file, default } => test(&file, default.into(), g),
        Command::Explain(args) => explain(*args, g),
        Command::Apply { file } => apply(&file, g),
        Command::Key(c) => crate::store::key(c, g),
        Command::Publish {
            file,
            key,
            default,
            expect_version,
        } => crate::store::publish(&g.store, &file, &key, default.into(), expect_version, g),
        Command::History { version, trust } => crate::store::history(&g.store, version, &trust, g),
        Command::Rollback {
            version,
            key,
            trust,
            default,
        } => crate::store::rollback(&g.store, version, &key, &trust, default.into(), g),
    }
}

/// Reads and parses a policy file; warnings go to stderr.
fn load(file: &Path, quiet: bool) -> Result<(String, policy::Parsed)> {
    let source = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read policy file {}", file.display()))?;
    let name = file.display().to_string();
    let parsed = policy::parse(&name, &source)?;
    if !quiet {
        for w in &parsed.warnings {
            crate::warn_line(&w.to_string());
        }
    }
    Ok((source, parsed))
}

fn check(file: &Path, g: &Global) -> Result<()> {
    let (_, parsed) = load(file, g.json)?;
    if g.json {
        crate::print_json(&serde_json::json!({
            "file": file,
            "policies": parsed.set.policies.len(),
            "tests": parsed.set.tests.len(),
            "warnings": parsed.warnings.iter().map(|w| w.to_string()).collect::<Vec<_>>(),
        }))
    } else {
        outln!(
            "{}: ok: {} policies, {} tests, {} warnings",
            file.display(),
            parsed.set.policies.len(),
            parsed.set.tests.len(),
            parsed.warnings.len()
        )?;
        Ok(())
    }
}

fn test(file: &Path, default: DefaultAction, g: &Global) -> Result<()> {
    let (_, parsed) = load(file, g.json)?;
    let warnings: Vec<String> = parsed.warnings.iter().map(|w| w.to_string()).collect();
    let compiled = CompiledPolicy::compile(parsed.set, default);
    let results = policy::run_tests(&compiled);
    let failed = results.iter().filter(|r| !r.passed).count();
    if g.json {
        crate::print_json(&serde_json::json!({
            "file": file,
            "passed": results.len() - failed,
            "failed": failed,
            "results": results,
            "warnings": warnings,
        }))?;
    } else {
        for r in &results {
            let got = &r.got;
            let by = match (&got.policy, &got.rule) {
                (Some(p), Some(rule)) => format!(" by {p}/{rule}"),
                _ => String::new(),
            };
            match &r.failure {
                None => outln!(
                    "PASS  {} (line {}): {} ({}){by}",
                    r.name,
                    r.line,
                    got.decision,
                    got.reason
                )?,
                Some(f) => outln!(
                    "FAIL  {} (line {}): {f}; decided {} ({}){by}",
                    r.name,
                    r.line,
                    got.decision,
                    got.reason
                )?,
            }
        }
        if results.is_empty() {
            outln!("{}: no [[test]] cases", file.display())?;
        } else {
            outln!("{} passed, {failed} failed", results.len() - failed)?;
        }
    }
    if failed > 0 {
        bail!(
            "{}: {failed} of {} policy tests failed",
            file.display(),
            results.len()
        );
    }
    Ok(())
}

impl ExplainArgs {
    fn spec(&self) -> Result<RequestSpec> {
        let proto = match self.proto {
            Proto::Tcp => Protocol::Tcp,
            Proto::Udp => Protocol::Udp,
            Proto::Icmp => Protocol::Icmp,
        };
        let to_port = match (self.to_port, proto) {
            (Some(p), _) => p,
            (None, Protocol::Icmp) => 0,
            (None, _) => bail!("--to-port is required for {proto}"),
        };
        let has_http = self.method.is_some()
            || self.path.is_some()
            || self.host.is_some()
            || !self.headers.is_empty();
        let http = if has_http {
            let headers = self
                .headers
                .iter()
                .map(|h| parse_header(h))
                .collect::<Result<Vec<_>, _>>()?;
            Some(HttpSpec {
                method: self.method.clone().unwrap_or_else(|| "GET".into()),
                path: self.path.clone().unwrap_or_else(|| "/".into()),
                host: self.host.clone(),
                headers,
            })
        } else {
            None
        };
        let spec = RequestSpec {
            from: self.from.clone(),
            from_groups: self.from_groups.clone(),
            from_address: self.from_address,
            workload: self.workload.clone(),
            workload_groups: self.workload_groups.clone(),
            to_address: self.to_address,
            to_port,
            proto,
            http,
        };
        spec.check()?;
        Ok(spec)
    }
}

fn explain(args: ExplainArgs, g: &Global) -> Result<()> {
    let spec = args.spec()?;
    let explanation: Explanation = match &args.file {
        Some(file) => {
            let (_, parsed) = load(file, true)?;
            let compiled = CompiledPolicy::compile(parsed.set, args.default.into());
            policy::explain(&compiled, &spec)
        }
        None => Client::new(g).call(spec)?,
    };
    if g.json {
        crate::print_json(&explanation)
    } else {
        out!("{explanation}")?;
        Ok(())
    }
}

fn apply(file: &Path, g: &Global) -> Result<()> {
    // Validate here first so errors name the operator's file and line; meshd checks
    // again, runs the [[test]] cases under its own default, and refuses on failure.
    let (source, _) = load(file, g.json)?;
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| file.display().to_string());
    let applied = Client::new(g).call(PolicyApplyRequest {
        source,
        name: Some(name),
    })?;
    if g.json {
        return crate::print_json(&applied);
    }
    out!(
        "applied {}: {} policies, {} tests passed",
        file.display(),
        applied.policies,
        applied.tests
    )?;
    if applied.cut_flows > 0 {
        out!("; {} established flows it forbids cut", applied.cut_flows)?;
    }
    outln!()
}
