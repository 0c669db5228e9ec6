//! `explain` and `[[test]]` never disagree with the data path (issue 18).
//!
//! Every `[[test]]` case of every example policy shipped in the repository (the
//! ```toml blocks of docs/policy.md and README.md, the policy files scripts/demo.sh
//! writes) is decided twice: by `mesh_proto::policy::explain`, which `meshctl policy
//! explain` and `policy test` print, and by the enforcer of the data path, fed real
//! IPv4/IPv6 packets as a peer sends them: a TCP SYN, then (once the local server
//! answered) one segment carrying the case's HTTP request, or bytes that are not HTTP
//! when the case describes none; a UDP datagram; an ICMP echo request. The two must
//! give the same decision, reason and deciding rule.
//!
//! The enforcer's outcome is read as an operator reads it: a refusal from the decision
//! log (reason, policy, rule), an allowance from the per-rule counters; and the packets
//! must agree with it (an allowed request is delivered, a refused one answered).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use etherparse::PacketBuilder;
use mesh_proto::policy::{self, CompiledPolicy, DefaultAction, Protocol, TestCase};
use mesh_proto::time::UnixTime;
use meshd::enforce::decisions::DecisionLog;
use meshd::enforce::{DropReason, Emit, Enforcer, Limits, LocalWorkload, Sender, Toward, Verdict};

const WALL: UnixTime = UnixTime(1_795_673_877);
const CLIENT_PORT: u16 = 40_000;
const CLIENT_SEQ: u32 = 1_000;
const SERVER_SEQ: u32 = 5_000;

/// A decision in names, from either side.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Outcome {
    decision: String,
    reason: String,
    /// `policy/rule` that decided, if a rule did.
    rule: Option<String>,
}

/// A policy file shipped in the repository: where it is, its text, its mesh default.
struct Example {
    /// `file:line`, the line of the block's opening (its text starts on the next).
    name: String,
    file: String,
    line: usize,
    text: String,
    default: DefaultAction,
}

fn repo_file(path: &str) -> String {
    let full = format!("{}/../{path}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{full}: {e}"))
}

/// `(line of the opening fence, text)` of each ```toml block of a Markdown file.
fn toml_blocks(doc: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (i, line) in doc.lines().enumerate() {
        match &mut current {
            None if line.trim() == "```toml" => current = Some((i + 1, String::new())),
            None => {}
            Some(_) if line.trim() == "```" => out.extend(current.take()),
            Some((_, text)) => {
                text.push_str(line);
                text.push('\n');
            }
        }
    }
    out
}

/// The policy files a shell script writes with `cat >FILE <<MARK ... MARK`, its
/// `$VAR`s replaced by the values the script assigns them (`VAR=value`).
fn heredoc_policies(script: &str) -> Vec<(usize, String)> {
    let vars: Vec<(String, String)> = script
        .lines()
        .filter_map(|l| l.split_once('='))
        .filter(|(k, v)| {
            !k.is_empty()
                && k.bytes().all(|b| b.is_ascii_uppercase() || b == b'_')
                && !v.is_empty()
                && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.')
        })
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mut out = Vec::new();
    let mut current: Option<(usize, String, String)> = None;
    for (i, line) in script.lines().enumerate() {
        match &mut current {
            None => {
                if let Some(at) = line.find("<<") {
                    if line.trim_start().starts_with("cat >") {
                        let mark = line[at + 2..].trim().trim_matches(['\'', '"']);
                        current = Some((i + 1, mark.to_string(), String::new()));
                    }
                }
            }
            Some((start, mark, text)) => {
                if line.trim() == mark {
                    if text.contains("[[policy]]") {
                        out.push((*start, std::mem::take(text)));
                    }
                    current = None;
                } else {
                    let mut line = line.to_string();
                    for (k, v) in &vars {
                        line = line.replace(&format!("${{{k}}}"), v);
                        line = line.replace(&format!("${k}"), v);
                    }
                    assert!(
                        !line.contains('$'),
                        "line {}: unknown variable in {line:?}",
                        i + 1
                    );
                    text.push_str(&line);
                    text.push('\n');
                }
            }
        }
    }
    out
}

fn examples() -> Vec<Example> {
    let default_of = |text: &str| {
        if text.contains("# mesh default: allow") {
            DefaultAction::Allow
        } else {
            DefaultAction::Deny
        }
    };
    let mut out = Vec::new();
    for (path, all) in [("docs/policy.md", true), ("README.md", false)] {
        for (line, text) in toml_blocks(&repo_file(path)) {
            if all || text.contains("[[policy]]") {
                out.push(Example {
                    name: format!("{path}:{line}"),
                    file: path.to_string(),
                    line,
                    default: default_of(&text),
                    text,
                });
            }
        }
    }
    for (line, text) in heredoc_policies(&repo_file("scripts/demo.sh")) {
        out.push(Example {
            name: format!("scripts/demo.sh:{line}"),
            file: "scripts/demo.sh".to_string(),
            line,
            default: default_of(&text),
            text,
        });
    }
    out
}

fn compile(ex: &Example) -> CompiledPolicy {
    let parsed = policy::parse(&ex.name, &ex.text).unwrap_or_else(|e| panic!("{e}"));
    CompiledPolicy::compile(parsed.set, ex.default)
}

/// What `explain` (and so `policy test`) says about a case.
fn explained(policy: &CompiledPolicy, case: &TestCase) -> Outcome {
    let e = policy::explain(policy, &case.request).decision;
    Outcome {
        decision: e.decision,
        reason: e.reason,
        rule: e.policy.zip(e.rule).map(|(p, r)| format!("{p}/{r}")),
    }
}

type IpStep = etherparse::PacketBuilderStep<etherparse::IpHeaders>;

/// A packet from `src` to `dst`, IPv4 or IPv6 as the addresses are.
fn packet(
    src: IpAddr,
    dst: IpAddr,
    payload: &[u8],
    build: impl FnOnce(IpStep) -> Built,
) -> Vec<u8> {
    let ip = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => PacketBuilder::ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => PacketBuilder::ipv6(s.octets(), d.octets(), 64),
        _ => panic!("{src} and {dst} are not of one family"),
    };
    let mut out = Vec::new();
    match build(ip) {
        Built::Tcp(b) => b.write(&mut out, payload),
        Built::Udp(b) => b.write(&mut out, payload),
        Built::Icmp(b) => b.write(&mut out, payload),
    }
    .expect("test packet builds");
    out
}

enum Built {
    Tcp(etherparse::PacketBuilderStep<etherparse::TcpHeader>),
    Udp(etherparse::PacketBuilderStep<etherparse::UdpHeader>),
    Icmp(etherparse::PacketBuilderStep<etherparse::Icmpv4Header>),
}

/// A TCP segment: `flags` from "S", "A", "P".
fn tcp(
    src: (IpAddr, u16),
    dst: (IpAddr, u16),
    flags: &str,
    seq: u32,
    ack: u32,
    payload: &[u8],
) -> Vec<u8> {
    packet(src.0, dst.0, payload, |ip| {
        let mut b = ip.tcp(src.1, dst.1, seq, 64_000);
        if flags.contains('S') {
            b = b.syn();
        }
        if flags.contains('A') {
            b = b.ack(ack);
        }
        if flags.contains('P') {
            b = b.psh();
        }
        Built::Tcp(b)
    })
}

/// The request a case describes, as a client writes it: HTTP/1.1 with its Host, or
/// HTTP/1.0 when it gives none (a Host header would be matched by `hosts` rules).
fn http_request(case: &TestCase) -> Option<Vec<u8>> {
    let h = case.request.http.as_ref()?;
    let mut out = match &h.host {
        Some(host) => format!("{} {} HTTP/1.1\r\nHost: {host}\r\n", h.method, h.path),
        None => format!("{} {} HTTP/1.0\r\n", h.method, h.path),
    };
    for (name, value) in &h.headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("\r\n");
    Some(out.into_bytes())
}

/// Bytes a client of another protocol sends first (a TLS ClientHello's start).
const NOT_HTTP: &[u8] = b"\x16\x03\x01\x00\x2a\x01\x00\x00\x26\x03\x03 not http at all\r\n\r\n";

/// What the enforcer does with the case's traffic.
fn enforced(policy: CompiledPolicy, case: &TestCase) -> Outcome {
    let spec = &case.request;
    let from = spec.from.as_deref().expect("cases with a source identity");
    let sender = Sender {
        identity: from.into(),
        groups: spec.from_groups.clone().into(),
    };
    let receiver = LocalWorkload {
        identity: spec.workload.as_deref().map(Arc::from),
        groups: spec.workload_groups.clone().into(),
    };
    let v6 = matches!(spec.from_address.or(spec.to_address), Some(IpAddr::V6(_)));
    let src = spec.from_address.unwrap_or(if v6 {
        "fd00::1".parse().unwrap()
    } else {
        "100.64.0.1".parse().unwrap()
    });
    let dst = spec.to_address.unwrap_or(if v6 {
        "fd00::3".parse().unwrap()
    } else {
        "100.64.0.3".parse().unwrap()
    });
    let log = Arc::new(DecisionLog::new(Default::default()));
    let e = Enforcer::new(receiver.clone(), policy, Limits::default(), log.clone());
    let t = Duration::from_millis;
    let mut emit = Emit::default();
    let inbound = |pkt: &[u8], now: u64, emit: &mut Emit| {
        e.inbound_to(&receiver, &sender, pkt, t(now), WALL, emit)
    };
    let client = (src, CLIENT_PORT);
    let server = (dst, spec.to_port);
    let verdict = match spec.proto {
        Protocol::Udp => inbound(
            &packet(src, dst, b"datagram", |ip| {
                Built::Udp(ip.udp(CLIENT_PORT, spec.to_port))
            }),
            0,
            &mut emit,
        ),
        Protocol::Icmp => {
            assert!(!v6, "{}: ICMPv6 cases are not built here", case.name);
            inbound(
                &packet(src, dst, b"ping", |ip| {
                    Built::Icmp(ip.icmpv4_echo_request(7, 1))
                }),
                0,
                &mut emit,
            )
        }
        Protocol::Tcp => {
            let syn = tcp(client, server, "S", CLIENT_SEQ, 0, b"");
            let v = inbound(&syn, 0, &mut emit);
            if v == Verdict::Deliver && e.counters().l7_flows > 0 {
                // Inspected: the server answers, the client sends its request.
                let synack = tcp(server, client, "SA", SERVER_SEQ, CLIENT_SEQ + 1, b"");
                assert_eq!(
                    e.outbound(Some(&sender.identity), &synack, t(1), &mut emit),
                    Verdict::Deliver,
                    "{}",
                    case.name
                );
                let ack = tcp(client, server, "A", CLIENT_SEQ + 1, SERVER_SEQ + 1, b"");
                assert_eq!(
                    inbound(&ack, 2, &mut emit),
                    Verdict::Deliver,
                    "{}",
                    case.name
                );
                let data = http_request(case).unwrap_or_else(|| NOT_HTTP.to_vec());
                let seg = tcp(client, server, "AP", CLIENT_SEQ + 1, SERVER_SEQ + 1, &data);
                inbound(&seg, 3, &mut emit)
            } else {
                v
            }
        }
    };
    let denied = log
        .tail(100)
        .iter()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).expect("log lines are JSON"))
        .find(|rec| rec["decision"] == "deny");
    match denied {
        Some(rec) => {
            // Refused: the packet is not delivered, or the client is answered.
            let answered = emit.packets().any(|(toward, _)| toward == Toward::Peer);
            assert!(
                matches!(verdict, Verdict::Drop(DropReason::Denied(_))) || answered,
                "{}: logged as refused, but {verdict:?} and no answer",
                case.name
            );
            let text = |k: &str| rec[k].as_str().map(String::from);
            Outcome {
                decision: "deny".into(),
                reason: text("reason").expect("a reason"),
                rule: text("policy")
                    .zip(text("rule"))
                    .map(|(p, r)| format!("{p}/{r}")),
            }
        }
        None => {
            assert_eq!(
                verdict,
                Verdict::Deliver,
                "{}: not refused, not delivered",
                case.name
            );
            let rule = e
                .counters()
                .rules
                .into_iter()
                .find(|r| r.allow > 0)
                .map(|r| format!("{}/{}", r.policy, r.rule));
            Outcome {
                decision: "allow".into(),
                reason: if rule.is_some() {
                    "allow_matched"
                } else {
                    "default_allow"
                }
                .into(),
                rule,
            }
        }
    }
}

#[test]
fn every_example_case_is_decided_by_the_enforcer_as_explain_says() {
    let examples = examples();
    let mut cases = 0;
    let mut files = 0;
    let mut kinds = std::collections::BTreeSet::new();
    let mut disagreements = Vec::new();
    for ex in &examples {
        let parsed = compile(ex);
        if !parsed.set().tests.is_empty() {
            files += 1;
        }
        for case in &parsed.set().tests {
            if case.request.from.is_none() {
                // A packet from a peer always carries the identity its key proved.
                continue;
            }
            cases += 1;
            let said = explained(&parsed, case);
            let done = enforced(compile(ex), case);
            kinds.insert(said.reason.clone());
            if said != done {
                disagreements.push(format!(
                    "{}:{} {:?}: explain says {said:?}, the enforcer did {done:?}",
                    ex.file,
                    ex.line + case.line,
                    case.name
                ));
            }
        }
    }
    assert!(disagreements.is_empty(), "{}", disagreements.join("\n"));
    // The examples are all there, and cover what the data path can decide.
    assert!(files >= 12, "found {files} example files with tests");
    assert!(cases >= 45, "found {cases} cases");
    for reason in [
        "allow_matched",
        "default_allow",
        "explicit_deny",
        "no_allow_matched",
        "malformed_request",
        "not_http",
    ] {
        assert!(
            kinds.contains(reason),
            "no example case is decided {reason}: {kinds:?}"
        );
    }
}

#[test]
fn the_script_policies_are_found() {
    // demo.sh's policies live in heredocs with shell variables; make sure the parity
    // test reads them rather than silently finding none.
    let found = heredoc_policies(&repo_file("scripts/demo.sh"));
    assert!(found.len() >= 2, "{found:?}");
    assert!(found.iter().all(|(_, t)| !t.contains('$')), "{found:?}");
    assert!(
        found.iter().any(|(_, t)| t.contains("[[test]]")),
        "{found:?}"
    );
}
