//! `meshctl log`: the running meshd's decision log — every deny and every audit match —
//! and, with `-f`, new decisions as they happen.

use std::io::Write;

use anyhow::{bail, Result};
use clap::Args;
use mesh_proto::control::{DecisionRecord, LogRequest};

use crate::client::{Client, ClientError};
use crate::Global;

#[derive(Args, Debug)]
#[command(after_help = "Examples:
  meshctl log                 # the last 50 decisions
  meshctl log -n 200 --json   # as JSON lines
  meshctl log -f              # and follow new ones until interrupted")]
pub struct LogArgs {
    /// Follow: keep printing new decisions
    #[arg(short = 'f', long)]
    follow: bool,
    /// How many past decisions to show first
    #[arg(short = 'n', long, default_value_t = 50)]
    lines: u32,
}

pub fn run(args: LogArgs, g: &Global) -> Result<()> {
    let client = Client::new(g);
    let req = LogRequest {
        follow: args.follow,
        lines: Some(args.lines),
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if !args.follow {
        for rec in &client.call(req)?.lines {
            print_record(&mut out, rec, g.json)?;
        }
        return out.flush().map_err(crate::stdout_error);
    }
    let (tail, mut stream) = client.follow_log(req)?;
    for rec in &tail.lines {
        print_record(&mut out, rec, g.json)?;
    }
    out.flush().map_err(crate::stdout_error)?;
    loop {
        let rec = match stream.next_record() {
            Ok(rec) => rec,
            Err(ClientError::Closed { .. }) => bail!("meshd closed the log stream"),
            Err(e) => return Err(e.into()),
        };
        print_record(&mut out, &rec, g.json)?;
        out.flush().map_err(crate::stdout_error)?;
    }
}

fn print_record(out: &mut impl Write, rec: &DecisionRecord, json: bool) -> Result<()> {
    if json {
        // The record as meshd wrote it: the same fields, the same values.
        let line = serde_json::to_string(rec)?;
        writeln!(out, "{line}")
    } else {
        writeln!(out, "{}", render(rec))
    }
    .map_err(crate::stdout_error)
}

/// One decision as a line for people:
/// `TIME DECISION REASON SRC (ADDR) -> [DST (]ADDR:PORT/PROTO[)] [policy/rule]
/// [METHOD PATH -> STATUS]`, where DST is the receiving workload's identity.
pub fn render(r: &DecisionRecord) -> String {
    let to = format!("{}:{}/{}", r.dst_addr, r.dst_port, r.proto.as_str());
    let to = match &r.dst {
        Some(dst) => format!("{dst} ({to})"),
        None => to,
    };
    let mut line = format!(
        "{} {} {} {} ({}) -> {to}",
        r.time,
        r.decision.as_str(),
        r.reason,
        r.src.as_deref().unwrap_or("-"),
        r.src_addr,
    );
    if let (Some(p), Some(rule)) = (&r.policy, &r.rule) {
        line += &format!(" {p}/{rule}");
    }
    if let Some(h) = &r.http {
        line += &format!(" {} {}", h.method, h.path);
        if let Some(st) = h.status {
            line += &format!(" -> {st}");
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(json: serde_json::Value) -> DecisionRecord {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn renders_l4_and_l7_decisions() {
        let l4 = record(
            serde_json::json!({"time":"2026-11-26T06:17:57Z","src":"spiffe://t/a","src_addr":"100.64.0.1",
            "dst_addr":"100.64.0.3","dst_port":22,"proto":"tcp","decision":"deny","reason":"explicit_deny",
            "policy":"block","rule":"no-ssh"}),
        );
        assert_eq!(
            render(&l4),
            "2026-11-26T06:17:57Z deny explicit_deny spiffe://t/a (100.64.0.1) -> 100.64.0.3:22/tcp block/no-ssh"
        );
        let l7 = record(
            serde_json::json!({"time":"t","src":"spiffe://t/a","src_addr":"100.64.0.1","dst_addr":"100.64.0.2","dst_port":80,
            "proto":"tcp","decision":"deny","reason":"no_allow_matched","http":{"method":"POST","path":"/api","status":403}}),
        );
        assert!(render(&l7).ends_with("-> 100.64.0.2:80/tcp POST /api -> 403"));
        let to_pod = record(
            serde_json::json!({"time":"t","src":"spiffe://t/a","src_addr":"100.64.0.1","dst":"spiffe://t/pc",
            "dst_addr":"100.65.1.1","dst_port":80,"proto":"tcp","decision":"deny","reason":"default_deny"}),
        );
        assert!(render(&to_pod).ends_with("(100.64.0.1) -> spiffe://t/pc (100.65.1.1:80/tcp)"));
    }
}
