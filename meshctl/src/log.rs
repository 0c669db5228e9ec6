//! `meshctl log`: the running meshd's decision log — every deny and every audit match —
//! and, with `-f`, new decisions as they happen.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;

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
    let path = crate::online::socket_path(g);
    let stream = UnixStream::connect(&path).with_context(|| {
        format!(
            "cannot reach meshd at {} (is it running? set --socket or MESHD_SOCKET)",
            path.display()
        )
    })?;
    let req = serde_json::json!({"op": "log", "follow": args.follow, "lines": args.lines});
    (&stream)
        .write_all(format!("{req}\n").as_bytes())
        .with_context(|| format!("cannot write to meshd at {}", path.display()))?;
    let mut reader = BufReader::new(&stream);
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .with_context(|| format!("no reply from meshd at {}", path.display()))?;
    let reply: serde_json::Value =
        serde_json::from_str(&line).map_err(|e| anyhow!("bad reply from meshd: {e}"))?;
    if reply["ok"] != true {
        bail!(
            "{}",
            reply["error"]
                .as_str()
                .unwrap_or("meshd refused the request")
        );
    }
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for rec in reply["result"]["lines"].as_array().into_iter().flatten() {
        print_record(&mut out, rec, g.json)?;
    }
    out.flush().map_err(crate::stdout_error)?;
    if !args.follow {
        return Ok(());
    }
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            bail!("meshd closed the log stream");
        }
        let Ok(rec) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        print_record(&mut out, &rec, g.json)?;
        out.flush().map_err(crate::stdout_error)?;
    }
}

fn print_record(out: &mut impl Write, rec: &serde_json::Value, json: bool) -> Result<()> {
    if json {
        writeln!(out, "{rec}")
    } else {
        writeln!(out, "{}", render(rec))
    }
    .map_err(crate::stdout_error)
}

/// One decision as a line for people:
/// `TIME DECISION REASON SRC (ADDR) -> [DST (]ADDR:PORT/PROTO[)] [policy/rule]
/// [METHOD PATH -> STATUS]`, where DST is the receiving workload's identity.
pub fn render(r: &serde_json::Value) -> String {
    let s = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_string();
    let to = format!(
        "{}:{}/{}",
        s(&r["dst_addr"]),
        r["dst_port"].as_u64().unwrap_or(0),
        s(&r["proto"])
    );
    let to = match r["dst"].as_str() {
        Some(dst) => format!("{dst} ({to})"),
        None => to,
    };
    let mut line = format!(
        "{} {} {} {} ({}) -> {to}",
        s(&r["time"]),
        s(&r["decision"]),
        s(&r["reason"]),
        s(&r["src"]),
        s(&r["src_addr"]),
    );
    if let (Some(p), Some(rule)) = (r["policy"].as_str(), r["rule"].as_str()) {
        line += &format!(" {p}/{rule}");
    }
    let h = &r["http"];
    if h.is_object() {
        line += &format!(" {} {}", s(&h["method"]), s(&h["path"]));
        if let Some(st) = h["status"].as_u64() {
            line += &format!(" -> {st}");
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_l4_and_l7_decisions() {
        let l4 = serde_json::json!({"time":"2026-11-26T06:17:57Z","src":"spiffe://t/a","src_addr":"100.64.0.1",
            "dst_addr":"100.64.0.3","dst_port":22,"proto":"tcp","decision":"deny","reason":"explicit_deny",
            "policy":"block","rule":"no-ssh"});
        assert_eq!(
            render(&l4),
            "2026-11-26T06:17:57Z deny explicit_deny spiffe://t/a (100.64.0.1) -> 100.64.0.3:22/tcp block/no-ssh"
        );
        let l7 = serde_json::json!({"time":"t","src":"spiffe://t/a","src_addr":"a","dst_addr":"b","dst_port":80,
            "proto":"tcp","decision":"deny","reason":"no_allow_matched","http":{"method":"POST","path":"/api","status":403}});
        assert!(render(&l7).ends_with("-> b:80/tcp POST /api -> 403"));
        let to_pod = serde_json::json!({"time":"t","src":"spiffe://t/a","src_addr":"a","dst":"spiffe://t/pc",
            "dst_addr":"b","dst_port":80,"proto":"tcp","decision":"deny","reason":"default_deny"});
        assert!(render(&to_pod).ends_with("(a) -> spiffe://t/pc (b:80/tcp)"));
    }
}
