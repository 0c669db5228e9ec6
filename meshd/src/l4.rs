//! Enforcement at layers 3 and 4 (invariant 3: policy decides before delivery).
//!
//! Every packet between a peer and a local workload passes here: inbound after
//! decryption and the secure-naming check, outbound before encryption. Flows are
//! tracked ([`crate::conntrack`]):
//! - a flow a peer opens is decided by policy once, from the identity its key proved;
//!   the decision is cached with the policy generation and re-evaluated when the
//!   policy changes ([`L4Enforcer::set_policy`] cuts flows the new policy forbids);
//! - replies to a flow a local workload opened pass (policy governs what may reach a
//!   workload, not its answers);
//! - ICMP errors pass only when the packet they quote belongs to a tracked flow;
//! - denied flows are not tracked, so a flood of refused packets cannot fill the table.
//!
//! IP fragments are dropped and counted (`fragment`): without ports they cannot be
//! decided, and nothing in the overlay needs them (its MTU is set for the tunnel).
//!
//! Not synchronised by a global lock: the table is split in shards chosen by a hash
//! that is the same for both directions of a flow, and the policy is an `ArcSwap`
//! snapshot.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use arc_swap::ArcSwap;
use mesh_proto::policy::{
    AllowReason, CompiledPolicy, Decision, DenyReason, Protocol, Request, RuleRef,
    Verdict as PolicyVerdict,
};
use mesh_proto::time::UnixTime;
use serde::Serialize;

use crate::conntrack::{
    ConnTrack, Dir, FlowKey, Observation, Origin, TcpFlags, TcpSegmentInfo, Timeouts, PROTO_ICMP,
    PROTO_ICMPV6, PROTO_TCP, PROTO_UDP,
};
use crate::decisions::{DecisionLog, DecisionRecord};

/// The authenticated sender of inbound packets: the identity its key proved and its
/// certificate's groups. Cloned into each flow it opens (reference counts only).
#[derive(Clone, Debug)]
pub struct Sender {
    pub identity: Arc<str>,
    pub groups: Arc<[String]>,
}

/// The local workload that policies select (its certificate).
#[derive(Clone, Debug, Default)]
pub struct LocalWorkload {
    pub identity: Option<String>,
    pub groups: Vec<String>,
}

/// What to do with a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Deliver,
    Drop(Drop),
}

/// Why a packet was not delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drop {
    /// Refused by policy or a limit; in the decision log.
    Denied(DenyReason),
    /// Not a well-formed IPv4/IPv6 packet with a complete transport header.
    Malformed,
    /// A TCP segment of no tracked flow on a port inspected at layer 7: its stream
    /// cannot be inspected from the middle, so it fails closed.
    Untracked,
    /// A protocol meshd does not carry (neither TCP, UDP nor ICMP).
    Protocol,
    /// An ICMP error quoting no tracked flow, or an ICMP message other than echo.
    StrayIcmp,
}

impl Drop {
    pub fn name(self) -> &'static str {
        match self {
            Drop::Denied(r) => r.name(),
            Drop::Malformed => "malformed",
            Drop::Untracked => "untracked",
            Drop::Protocol => "protocol",
            Drop::StrayIcmp => "stray_icmp",
        }
    }
}

/// A flow a new policy forbids: the shell resets both ends (TCP) with these numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cut {
    /// The flow as its opener (the peer) sent it: `src` is the remote client.
    pub key: FlowKey,
    /// Next sequence number of the client (for a reset towards the local server).
    pub client_next_seq: Option<u32>,
    /// Next sequence number of the server (for a reset towards the client).
    pub server_next_seq: Option<u32>,
}

/// What a flow opened by a peer carries.
#[derive(Clone, Debug)]
pub struct FlowState {
    /// Policy generation of the cached decision.
    gen: u64,
    allowed: bool,
    /// Present for flows a peer opened: re-evaluation needs who sent them.
    sender: Option<Sender>,
}

/// Limits of the enforcer.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Flows tracked at most, over all shards.
    pub flows: usize,
    pub timeouts: Timeouts,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            flows: 65_536,
            timeouts: Timeouts::default(),
        }
    }
}

const SHARDS: usize = 16;

struct Active {
    policy: CompiledPolicy,
    gen: u64,
}

/// Per-rule hit counts since the policy was applied.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct RuleCount {
    pub policy: String,
    pub rule: String,
    pub allow: u64,
    pub deny: u64,
    pub audit: u64,
}

/// Counters for `meshctl status`.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct L4Counters {
    pub delivered: u64,
    pub flows: usize,
    pub flows_evicted: u64,
    /// Drops by reason name.
    pub drops: std::collections::BTreeMap<&'static str, u64>,
    pub rules: Vec<RuleCount>,
}

const DROP_SLOTS: usize = 32;

/// The layer-3/4 enforcer of one host.
pub struct L4Enforcer {
    local: LocalWorkload,
    active: ArcSwap<Active>,
    shards: Box<[Mutex<ConnTrack<FlowState>>]>,
    hasher: std::collections::hash_map::RandomState,
    log: Arc<DecisionLog>,
    delivered: AtomicU64,
    drops: [AtomicU64; DROP_SLOTS],
    rule_hits: Mutex<HashMap<RuleRef, [u64; 3]>>,
}

impl std::fmt::Debug for L4Enforcer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("L4Enforcer")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

/// The transport facts of one packet.
#[derive(Clone, Copy, Debug)]
struct Parsed {
    key: FlowKey,
    obs: Observation,
    protocol: Protocol,
    kind: Kind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// TCP, UDP, ICMP echo.
    Flow,
    /// An ICMP error; `key` is the quoted packet's flow.
    IcmpError,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ParseError {
    Malformed,
    Fragment,
    Protocol,
    StrayIcmp,
}

impl L4Enforcer {
    pub fn new(
        local: LocalWorkload,
        policy: CompiledPolicy,
        limits: Limits,
        log: Arc<DecisionLog>,
    ) -> Self {
        let per_shard = limits.flows.div_ceil(SHARDS).max(1);
        L4Enforcer {
            local,
            active: ArcSwap::from_pointee(Active { policy, gen: 1 }),
            shards: (0..SHARDS)
                .map(|_| Mutex::new(ConnTrack::new(per_shard, limits.timeouts)))
                .collect(),
            hasher: std::collections::hash_map::RandomState::new(),
            log,
            delivered: AtomicU64::new(0),
            drops: std::array::from_fn(|_| AtomicU64::new(0)),
            rule_hits: Mutex::new(HashMap::new()),
        }
    }

    /// The policy in force.
    pub fn with_policy<R>(&self, f: impl FnOnce(&CompiledPolicy) -> R) -> R {
        f(&self.active.load().policy)
    }

    /// Decides an inbound packet from `sender` (already decrypted, its source address
    /// checked against the sender's certificate).
    pub fn inbound(
        &self,
        sender: &Sender,
        packet: &[u8],
        now: Duration,
        wall: UnixTime,
    ) -> Verdict {
        let p = match parse(packet) {
            Ok(p) => p,
            Err(e) => return self.dropped(parse_drop(e)),
        };
        let active = self.active.load();
        let mut shard = self.shard(&p.key);
        if p.kind == Kind::IcmpError {
            // The quoted packet went from here to the sender: a tracked flow either way.
            let known = shard.get(&p.key).or_else(|| shard.get(&p.key.reversed()));
            return match known {
                Some(f) if f.value.allowed => self.deliver(),
                _ => self.dropped(Drop::StrayIcmp),
            };
        }
        match shard.track(&p.key, &p.obs, now) {
            Some((Dir::Reply, flow)) if flow.origin == Origin::Local => return self.deliver(),
            Some((Dir::Original, flow)) if flow.origin == Origin::Remote => {
                if flow.value.gen == active.gen {
                    return if flow.value.allowed {
                        self.deliver()
                    } else {
                        self.dropped(Drop::Denied(DenyReason::NoAllowMatched))
                    };
                }
                // Policy changed since this flow was decided: decide again.
                let decision = self.decide(&active.policy, sender, &p);
                flow.value.gen = active.gen;
                flow.value.allowed = decision.is_allowed();
                drop(shard);
                return self.after_decision(&active.policy, sender, &p, &decision, now, wall);
            }
            Some(_) => return self.dropped(Drop::Malformed),
            None => {}
        }
        // A new flow opened by the peer.
        if p.protocol == Protocol::Tcp {
            let mid_stream = p.obs.tcp.is_some_and(|t| !t.flags.syn || t.flags.ack);
            if mid_stream && active.policy.needs_l7(Protocol::Tcp, p.key.dst_port) {
                return self.dropped(Drop::Untracked);
            }
        }
        let decision = self.decide(&active.policy, sender, &p);
        if decision.is_allowed() {
            let state = FlowState {
                gen: active.gen,
                allowed: true,
                sender: Some(sender.clone()),
            };
            if shard
                .insert(p.key, Origin::Remote, state, &p.obs, now)
                .is_err()
            {
                drop(shard);
                let full = Decision::refused(DenyReason::FlowTableFull);
                return self.after_decision(&active.policy, sender, &p, &full, now, wall);
            }
        }
        drop(shard);
        self.after_decision(&active.policy, sender, &p, &decision, now, wall)
    }

    /// Decides an outbound packet from a local workload (before encryption): replies
    /// on flows peers opened pass while the flow is allowed; anything else opens or
    /// continues a flow of the local workload's own.
    pub fn outbound(&self, packet: &[u8], now: Duration) -> Verdict {
        let p = match parse(packet) {
            // A local workload's fragments and ICMP errors are its own business;
            // only what comes in is policed.
            Err(ParseError::Fragment | ParseError::StrayIcmp | ParseError::Protocol) => {
                return self.deliver()
            }
            Err(ParseError::Malformed) => return self.dropped(Drop::Malformed),
            Ok(p) => p,
        };
        if p.kind == Kind::IcmpError {
            return self.deliver();
        }
        let mut shard = self.shard(&p.key);
        match shard.track(&p.key, &p.obs, now) {
            Some((Dir::Reply, flow)) if flow.origin == Origin::Remote => {
                if flow.value.allowed {
                    self.deliver()
                } else {
                    self.dropped(Drop::Denied(DenyReason::NoAllowMatched))
                }
            }
            Some(_) => self.deliver(),
            None => {
                let state = FlowState {
                    gen: 0,
                    allowed: true,
                    sender: None,
                };
                match shard.insert(p.key, Origin::Local, state, &p.obs, now) {
                    Ok(_) => self.deliver(),
                    Err(_) => self.dropped(Drop::Denied(DenyReason::FlowTableFull)),
                }
            }
        }
    }

    /// Swaps in a new policy and re-decides every flow a peer opened; returns the
    /// flows it now forbids (removed from the table), for the shell to reset.
    pub fn set_policy(&self, policy: CompiledPolicy, now: Duration, wall: UnixTime) -> Vec<Cut> {
        let gen = self.active.load().gen + 1;
        self.active.store(Arc::new(Active { policy, gen }));
        self.rule_hits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        let active = self.active.load();
        let mut cuts = Vec::new();
        let mut denied = Vec::new();
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            shard.retain(|key, flow| {
                let Some(sender) = flow.value.sender.clone() else {
                    return true;
                };
                let Some(p) = parsed_from_key(key) else {
                    return true;
                };
                let decision = self.decide(&active.policy, &sender, &p);
                flow.value.gen = active.gen;
                flow.value.allowed = decision.is_allowed();
                if decision.is_allowed() {
                    return true;
                }
                cuts.push(Cut {
                    key: *key,
                    client_next_seq: flow.next_seq(Dir::Original),
                    server_next_seq: flow.next_seq(Dir::Reply),
                });
                denied.push((sender, p, decision));
                false
            });
        }
        for (sender, p, decision) in &denied {
            self.after_decision(&active.policy, sender, p, decision, now, wall);
        }
        cuts
    }

    /// Removes expired flows (the shell calls this periodically).
    pub fn sweep(&self, now: Duration) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).sweep(now))
            .sum()
    }

    pub fn counters(&self) -> L4Counters {
        let mut c = L4Counters {
            delivered: self.delivered.load(Ordering::Relaxed),
            ..L4Counters::default()
        };
        for s in self.shards.iter() {
            let s = s.lock().unwrap_or_else(|e| e.into_inner());
            c.flows += s.len();
            c.flows_evicted += s.evicted();
        }
        for (slot, n) in self.drops.iter().enumerate() {
            let n = n.load(Ordering::Relaxed);
            if n > 0 {
                c.drops.insert(slot_name(slot), n);
            }
        }
        let active = self.active.load();
        let hits = self.rule_hits.lock().unwrap_or_else(|e| e.into_inner());
        let mut rules: Vec<_> = hits.iter().collect();
        rules.sort_by_key(|(r, _)| **r);
        for (r, [allow, deny, audit]) in rules {
            let (policy, rule) = active.policy.rule_label(*r);
            c.rules.push(RuleCount {
                policy: policy.to_string(),
                rule,
                allow: *allow,
                deny: *deny,
                audit: *audit,
            });
        }
        c
    }

    fn shard(&self, key: &FlowKey) -> MutexGuard<'_, ConnTrack<FlowState>> {
        // Hash the unordered pair of endpoints, so both directions meet in one shard.
        let a = (key.src, key.src_port);
        let b = (key.dst, key.dst_port);
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        let i = (self.hasher.hash_one((key.proto, lo, hi)) as usize) % self.shards.len();
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    fn decide(&self, policy: &CompiledPolicy, sender: &Sender, p: &Parsed) -> Decision {
        let req = Request {
            src_identity: Some(&sender.identity),
            src_groups: &sender.groups,
            src_addr: Some(p.key.src),
            dst_identity: self.local.identity.as_deref(),
            dst_groups: &self.local.groups,
            dst_addr: Some(p.key.dst),
            dst_port: if p.protocol == Protocol::Icmp {
                0
            } else {
                p.key.dst_port
            },
            protocol: p.protocol,
            http: None,
        };
        mesh_proto::policy::evaluate(policy, &req)
    }

    /// Counts, logs (denies and audit matches) and turns a decision into a verdict.
    fn after_decision(
        &self,
        policy: &CompiledPolicy,
        sender: &Sender,
        p: &Parsed,
        decision: &Decision,
        now: Duration,
        wall: UnixTime,
    ) -> Verdict {
        {
            let mut hits = self.rule_hits.lock().unwrap_or_else(|e| e.into_inner());
            match decision.verdict {
                PolicyVerdict::Allow(AllowReason::Matched(r)) => hits.entry(r).or_default()[0] += 1,
                PolicyVerdict::Deny(DenyReason::ExplicitDeny(r)) => {
                    hits.entry(r).or_default()[1] += 1
                }
                _ => {}
            }
            for r in &decision.audit {
                hits.entry(*r).or_default()[2] += 1;
            }
        }
        let write = |verdict: &str, reason: &str, rule: Option<RuleRef>| {
            let label = rule.map(|r| policy.rule_label(r));
            let src_addr = p.key.src.to_string();
            let dst_addr = p.key.dst.to_string();
            self.log.record(
                &DecisionRecord {
                    time: wall.to_string(),
                    src: Some(&sender.identity),
                    src_addr,
                    dst: self.local.identity.as_deref(),
                    dst_addr,
                    dst_port: if p.protocol == Protocol::Icmp {
                        0
                    } else {
                        p.key.dst_port
                    },
                    proto: p.protocol.as_str(),
                    decision: verdict,
                    reason,
                    policy: label.as_ref().map(|(p, _)| *p),
                    rule: label.as_ref().map(|(_, r)| r.as_str()),
                    http: None,
                },
                now,
            );
        };
        for r in &decision.audit {
            write("audit", "audit_matched", Some(*r));
        }
        match decision.verdict {
            PolicyVerdict::Allow(_) => self.deliver(),
            PolicyVerdict::Deny(reason) => {
                write("deny", reason.name(), decision.rule());
                self.dropped(Drop::Denied(reason))
            }
        }
    }

    fn deliver(&self) -> Verdict {
        self.delivered.fetch_add(1, Ordering::Relaxed);
        Verdict::Deliver
    }

    fn dropped(&self, d: Drop) -> Verdict {
        self.drops[drop_slot(d)].fetch_add(1, Ordering::Relaxed);
        Verdict::Drop(d)
    }
}

fn drop_slot(d: Drop) -> usize {
    match d {
        Drop::Malformed => 0,
        Drop::Untracked => 1,
        Drop::Protocol => 2,
        Drop::StrayIcmp => 3,
        Drop::Denied(r) => {
            4 + match r {
                DenyReason::ExplicitDeny(_) => 0,
                other => {
                    1 + DenyReason::PLAIN
                        .iter()
                        .position(|x| *x == other)
                        .unwrap_or(0)
                }
            }
        }
    }
}

fn slot_name(slot: usize) -> &'static str {
    match slot {
        0 => Drop::Malformed.name(),
        1 => Drop::Untracked.name(),
        2 => Drop::Protocol.name(),
        3 => Drop::StrayIcmp.name(),
        4 => "explicit_deny",
        n => DenyReason::PLAIN.get(n - 5).map_or("other", |r| r.name()),
    }
}

fn parse_drop(e: ParseError) -> Drop {
    match e {
        ParseError::Malformed => Drop::Malformed,
        ParseError::Fragment => Drop::Denied(DenyReason::Fragment),
        ParseError::Protocol => Drop::Protocol,
        ParseError::StrayIcmp => Drop::StrayIcmp,
    }
}

fn parsed_from_key(key: &FlowKey) -> Option<Parsed> {
    let protocol = match key.proto {
        PROTO_TCP => Protocol::Tcp,
        PROTO_UDP => Protocol::Udp,
        PROTO_ICMP | PROTO_ICMPV6 => Protocol::Icmp,
        _ => return None,
    };
    Some(Parsed {
        key: *key,
        obs: Observation { tcp: None },
        protocol,
        kind: Kind::Flow,
    })
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes([
        *b.get(at)?,
        *b.get(at + 1)?,
        *b.get(at + 2)?,
        *b.get(at + 3)?,
    ]))
}

/// Reads the 5-tuple and TCP facts of an IP packet.
fn parse(packet: &[u8]) -> Result<Parsed, ParseError> {
    let ip = etherparse::IpSlice::from_slice(packet).map_err(|_| ParseError::Malformed)?;
    if ip.is_fragmenting_payload() {
        return Err(ParseError::Fragment);
    }
    let (src, dst) = (ip.source_addr(), ip.destination_addr());
    let proto = ip.payload_ip_number().0;
    let l4 = ip.payload().payload;
    let key = |src_port, dst_port| FlowKey {
        proto,
        src,
        dst,
        src_port,
        dst_port,
    };
    match proto {
        PROTO_TCP => {
            let off = usize::from(l4.get(12).ok_or(ParseError::Malformed)? >> 4) * 4;
            if off < 20 || off > l4.len() {
                return Err(ParseError::Malformed);
            }
            let flags = l4[13];
            let info = TcpSegmentInfo {
                flags: TcpFlags {
                    fin: flags & 0x01 != 0,
                    syn: flags & 0x02 != 0,
                    rst: flags & 0x04 != 0,
                    ack: flags & 0x10 != 0,
                },
                seq: be32(l4, 4).ok_or(ParseError::Malformed)?,
                ack: be32(l4, 8).ok_or(ParseError::Malformed)?,
                payload_len: (l4.len() - off) as u32,
            };
            Ok(Parsed {
                key: key(be16(l4, 0).unwrap_or(0), be16(l4, 2).unwrap_or(0)),
                obs: Observation { tcp: Some(info) },
                protocol: Protocol::Tcp,
                kind: Kind::Flow,
            })
        }
        PROTO_UDP => {
            if l4.len() < 8 {
                return Err(ParseError::Malformed);
            }
            Ok(Parsed {
                key: key(be16(l4, 0).unwrap_or(0), be16(l4, 2).unwrap_or(0)),
                obs: Observation { tcp: None },
                protocol: Protocol::Udp,
                kind: Kind::Flow,
            })
        }
        PROTO_ICMP | PROTO_ICMPV6 => parse_icmp(proto, src, dst, l4),
        _ => Err(ParseError::Protocol),
    }
}

/// ICMP echo (request and reply share the identifier, used as both ports) and the
/// errors that quote a packet (RFC 792; RFC 4443 §3), whose flow is the quoted one.
fn parse_icmp(proto: u8, src: IpAddr, dst: IpAddr, l4: &[u8]) -> Result<Parsed, ParseError> {
    if l4.len() < 8 {
        return Err(ParseError::Malformed);
    }
    let ty = l4[0];
    let (echo, error) = if proto == PROTO_ICMP {
        (matches!(ty, 0 | 8), matches!(ty, 3 | 11 | 12))
    } else {
        (matches!(ty, 128 | 129), matches!(ty, 1..=4))
    };
    if echo {
        let id = be16(l4, 4).unwrap_or(0);
        return Ok(Parsed {
            key: FlowKey {
                proto,
                src,
                dst,
                src_port: id,
                dst_port: id,
            },
            obs: Observation { tcp: None },
            protocol: Protocol::Icmp,
            kind: Kind::Flow,
        });
    }
    if !error {
        return Err(ParseError::StrayIcmp);
    }
    let inner = quoted_key(&l4[8..]).ok_or(ParseError::StrayIcmp)?;
    Ok(Parsed {
        key: inner,
        obs: Observation { tcp: None },
        protocol: Protocol::Icmp,
        kind: Kind::IcmpError,
    })
}

/// The flow of the (truncated) packet an ICMP error quotes: its IP header and at
/// least the first 8 bytes of its transport header.
fn quoted_key(q: &[u8]) -> Option<FlowKey> {
    let (proto, src, dst, l4): (u8, IpAddr, IpAddr, &[u8]) = match q.first()? >> 4 {
        4 => {
            let ihl = usize::from(q[0] & 0x0f) * 4;
            let src: [u8; 4] = q.get(12..16)?.try_into().ok()?;
            let dst: [u8; 4] = q.get(16..20)?.try_into().ok()?;
            (*q.get(9)?, src.into(), dst.into(), q.get(ihl..)?)
        }
        6 => {
            let src: [u8; 16] = q.get(8..24)?.try_into().ok()?;
            let dst: [u8; 16] = q.get(24..40)?.try_into().ok()?;
            (*q.get(6)?, src.into(), dst.into(), q.get(40..)?)
        }
        _ => return None,
    };
    let (sp, dp) = match proto {
        PROTO_TCP | PROTO_UDP => (be16(l4, 0)?, be16(l4, 2)?),
        PROTO_ICMP | PROTO_ICMPV6 => {
            let id = be16(l4, 4)?;
            (id, id)
        }
        _ => return None,
    };
    Some(FlowKey {
        proto,
        src,
        dst,
        src_port: sp,
        dst_port: dp,
    })
}

#[cfg(test)]
mod tests;
