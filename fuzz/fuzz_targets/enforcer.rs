//! The enforcer (IP/TCP/UDP/ICMP parsing, connection tracking, layer-4 and layer-7
//! policy, injected answers) under arbitrary packets in both directions, policy changes,
//! identities renewed or removed, and time. Mostly well-formed TCP segments of one
//! connection to an inspected port, built from the input, so that the fuzzer reaches the
//! layer-7 path; raw packets too.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use etherparse::PacketBuilder;
use libfuzzer_sys::fuzz_target;
use mesh_proto::policy::{self, CompiledPolicy, DefaultAction, PolicySet};
use mesh_proto::time::UnixTime;
use meshd::decisions::{DecisionLog, LogLimits};
use meshd::enforce::{Emit, Enforcer, Limits, LocalWorkload, Sender};

const POLICY: &str = r#"
[[policy]]
name = "api"
action = "allow"
[[policy.rule]]
name = "read"
from = [{ identities = ["spiffe://t/a"] }]
to = [{ ports = [80], methods = ["GET"], paths = ["/api/*"] }]
[[policy.rule]]
name = "l4"
from = [{ identities = ["spiffe://t/a"] }]
to = [{ ports = [8080] }]
"#;

const PEER: [u8; 4] = [100, 64, 0, 1];
const LOCAL: [u8; 4] = [100, 64, 0, 3];
const WALL: UnixTime = UnixTime(1_795_673_877);

#[path = "common/input.rs"]
mod input;
use input::Input;

fn compiled(default: DefaultAction) -> CompiledPolicy {
    // Parsed once: the fuzzer's time goes to the enforcer, not to TOML.
    static SET: OnceLock<PolicySet> = OnceLock::new();
    let set = SET.get_or_init(|| {
        policy::parse("fuzz.toml", POLICY)
            .expect("policy parses")
            .set
    });
    CompiledPolicy::compile(set.clone(), default)
}

fn tcp(from_client: bool, port: u16, seq: u32, ack: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
    let (src, dst, sport, dport) = if from_client {
        (PEER, LOCAL, 40000, port)
    } else {
        (LOCAL, PEER, port, 40000)
    };
    let mut b = PacketBuilder::ipv4(src, dst, 64).tcp(sport, dport, seq, 64_000);
    if flags & 0x01 != 0 {
        b = b.fin();
    }
    if flags & 0x02 != 0 {
        b = b.syn();
    }
    if flags & 0x04 != 0 {
        b = b.rst();
    }
    if flags & 0x08 != 0 {
        b = b.psh();
    }
    if flags & 0x10 != 0 {
        b = b.ack(ack);
    }
    let mut out = Vec::new();
    let _ = b.write(&mut out, payload);
    out
}

fuzz_target!(|data: &[u8]| {
    let log = Arc::new(DecisionLog::new(LogLimits {
        ring: 16,
        ..LogLimits::default()
    }));
    let e = Enforcer::new(
        LocalWorkload {
            identity: Some("spiffe://t/c".into()),
            groups: Arc::from(Vec::new()),
        },
        compiled(DefaultAction::Deny),
        Limits {
            flows: 64,
            ..Limits::default()
        },
        log,
    );
    let sender = Sender {
        identity: "spiffe://t/a".into(),
        groups: Arc::from(Vec::new()),
    };
    let mut emit = Emit::default();
    let mut now = Duration::from_millis(10);
    let (mut cseq, mut sseq) = (1000u32, 5000u32);
    let mut input = Input(data);
    while let Some(op) = input.u8() {
        match op % 8 {
            0..=3 => {
                // A client segment to port 80 (inspected) or 8080: sequence numbers near
                // the connection's, flags from the input.
                let port = if op & 0x80 != 0 { 8080 } else { 80 };
                let flags = input.u8().unwrap_or(0x18);
                let delta = input.u8().unwrap_or(0) as i8 as i32;
                let len = usize::from(input.u8().unwrap_or(0));
                let payload = input.bytes(len);
                let seq = cseq.wrapping_add_signed(delta);
                let pkt = tcp(true, port, seq, sseq, flags, payload);
                let _ = e.inbound(&sender, &pkt, now, WALL, &mut emit);
                if delta == 0 {
                    cseq = cseq.wrapping_add(payload.len() as u32 + u32::from(flags & 0x03 != 0));
                }
            }
            4 => {
                let port = if op & 0x80 != 0 { 8080 } else { 80 };
                let flags = input.u8().unwrap_or(0x10);
                let len = usize::from(input.u8().unwrap_or(0) % 64);
                let payload = input.bytes(len);
                let pkt = tcp(false, port, sseq, cseq, flags, payload);
                let _ = e.outbound(Some(&sender.identity), &pkt, now, &mut emit);
                sseq = sseq.wrapping_add(payload.len() as u32 + u32::from(flags & 0x03 != 0));
            }
            5 => {
                let len = usize::from(input.u16() % 1600);
                let raw = input.bytes(len);
                if op & 0x80 != 0 {
                    let _ = e.outbound(Some(&sender.identity), raw, now, &mut emit);
                } else {
                    let _ = e.inbound(&sender, raw, now, WALL, &mut emit);
                }
            }
            6 => {
                now += Duration::from_millis(250 * u64::from(input.u8().unwrap_or(1)));
                let _ = e.poll(now, WALL, &mut emit);
            }
            7 if op & 0x40 != 0 => {
                // The mesh's identities changed: A's certificate renewed with or without
                // a group, or A removed; the flows cut are reset.
                let gone = op & 0x20 != 0;
                let groups: Arc<[String]> = if op & 0x10 != 0 {
                    Arc::from(vec!["ops".to_string()])
                } else {
                    Arc::from(Vec::new())
                };
                let known = |id: &str| (!gone || id != "spiffe://t/a").then(|| groups.clone());
                for cut in e.refresh_identities(known, now, WALL) {
                    cut.resets(&mut emit);
                }
            }
            _ => {
                // A policy change: stricter (default deny, no policies) or back.
                let p = if op & 0x80 != 0 {
                    CompiledPolicy::empty(DefaultAction::Deny)
                } else {
                    compiled(DefaultAction::Deny)
                };
                let _ = e.set_policy(p, now, WALL);
            }
        }
        // Every packet the enforcer emits is a whole IP packet.
        for (_, pkt) in emit.packets() {
            assert!(
                etherparse::SlicedPacket::from_ip(pkt).is_ok(),
                "emitted a broken packet"
            );
        }
        emit.clear();
    }
});
