//! Evaluation: the matchers, Istio's decision order, and the one [`DenyReason`].
//!
//! Decision order (Istio AuthorizationPolicy, "Authorization Policy" reference,
//! "Implicit enablement and evaluation order"; ztunnel `src/state.rs` follows it):
//! 1. if any DENY policy that applies to the workload matches → deny;
//! 2. else if any ALLOW policy applies to the workload: allow if one of them matches,
//!    otherwise deny;
//! 3. else the mesh default.
//!
//! AUDIT policies are evaluated on the side and only recorded.

use serde::Serialize;

use super::compile::CompiledPolicy;
use super::ident::trust_domain_of;
use super::model::{
    Action, Condition, Operation, PathPattern, Pattern, Protocol, Rule, Selector, Source,
};
use super::request::Request;

/// A rule by position: `policy` indexes the set's policies, `rule` that policy's
/// rules. Valid for the [`CompiledPolicy`] that produced it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RuleRef {
    pub policy: u32,
    pub rule: u32,
}

/// Why a request or packet was refused. One enum for the decision log, the
/// counters, `explain` and the tests; each has a stable snake_case [`name`] and the
/// HTTP status a layer-7 refusal answers with.
///
/// [`name`]: DenyReason::name
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DenyReason {
    /// A deny rule matched.
    ExplicitDeny(RuleRef),
    /// Allow policies apply to the workload and none matched.
    NoAllowMatched,
    /// No policy decided and the mesh default is deny.
    DefaultDeny,
    /// The HTTP request could not be parsed, or had a smuggling shape.
    MalformedRequest,
    /// The request head exceeded the size limit.
    HeadTooLarge,
    /// The request head was not complete in time.
    RequestTimeout,
    /// Bytes that are not HTTP/1.x on a port inspected at layer 7.
    NotHttp,
    /// An IP fragment on an inspected port that could not be reassembled.
    Fragment,
    /// The flow table is full; a new flow cannot be tracked.
    FlowTableFull,
    /// Per-flow or total held bytes reached their limit.
    BufferFull,
    /// The flow was evicted (idle or under pressure) before it was decided.
    FlowEvicted,
    /// A rate limit was exceeded.
    RateLimited,
    /// A circuit breaker is open.
    CircuitOpen,
    /// Request bytes meshd delivered were lost before the workload read them, and it
    /// keeps no copy to send them again: the connection is reset rather than left to
    /// stall.
    DeliveryLost,
    /// The identity that opened the flow is no longer in the mesh (its peer or
    /// workload was removed): the flow is cut.
    IdentityRemoved,
}

impl DenyReason {
    /// Every reason without a rule, in counter order (for `meshctl status`).
    pub const PLAIN: [DenyReason; 14] = [
        DenyReason::NoAllowMatched,
        DenyReason::DefaultDeny,
        DenyReason::MalformedRequest,
        DenyReason::HeadTooLarge,
        DenyReason::RequestTimeout,
        DenyReason::NotHttp,
        DenyReason::Fragment,
        DenyReason::FlowTableFull,
        DenyReason::BufferFull,
        DenyReason::FlowEvicted,
        DenyReason::RateLimited,
        DenyReason::CircuitOpen,
        DenyReason::DeliveryLost,
        DenyReason::IdentityRemoved,
    ];

    /// Stable snake_case name (log field `reason`, counter label, test expectation).
    pub fn name(self) -> &'static str {
        match self {
            DenyReason::ExplicitDeny(_) => "explicit_deny",
            DenyReason::NoAllowMatched => "no_allow_matched",
            DenyReason::DefaultDeny => "default_deny",
            DenyReason::MalformedRequest => "malformed_request",
            DenyReason::HeadTooLarge => "head_too_large",
            DenyReason::RequestTimeout => "request_timeout",
            DenyReason::NotHttp => "not_http",
            DenyReason::Fragment => "fragment",
            DenyReason::FlowTableFull => "flow_table_full",
            DenyReason::BufferFull => "buffer_full",
            DenyReason::FlowEvicted => "flow_evicted",
            DenyReason::RateLimited => "rate_limited",
            DenyReason::CircuitOpen => "circuit_open",
            DenyReason::DeliveryLost => "delivery_lost",
            DenyReason::IdentityRemoved => "identity_removed",
        }
    }

    /// The status of the HTTP response injected for a layer-7 refusal.
    pub fn http_status(self) -> u16 {
        match self {
            DenyReason::ExplicitDeny(_) | DenyReason::NoAllowMatched | DenyReason::DefaultDeny => {
                403
            }
            DenyReason::MalformedRequest | DenyReason::NotHttp | DenyReason::Fragment => 400,
            DenyReason::HeadTooLarge => 431,
            DenyReason::RequestTimeout => 408,
            DenyReason::RateLimited => 429,
            DenyReason::FlowTableFull | DenyReason::BufferFull | DenyReason::FlowEvicted => 503,
            DenyReason::CircuitOpen | DenyReason::IdentityRemoved => 503,
            DenyReason::DeliveryLost => 502,
        }
    }

    /// True for refusals decided by policy (as opposed to limits and bad input).
    pub fn is_policy(self) -> bool {
        matches!(
            self,
            DenyReason::ExplicitDeny(_) | DenyReason::NoAllowMatched | DenyReason::DefaultDeny
        )
    }
}

impl std::fmt::Display for DenyReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for DenyReason {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// Why a request was allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AllowReason {
    /// An allow rule matched.
    Matched(RuleRef),
    /// No policy decided and the mesh default is allow.
    DefaultAllow,
}

impl AllowReason {
    pub fn name(self) -> &'static str {
        match self {
            AllowReason::Matched(_) => "allow_matched",
            AllowReason::DefaultAllow => "default_allow",
        }
    }
}

/// The outcome of a decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    Allow(AllowReason),
    Deny(DenyReason),
}

/// A decision: the verdict, and the audit rules that matched (recorded, never
/// changing the verdict). `audit` allocates only when an audit rule matches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    pub audit: Vec<RuleRef>,
}

impl Decision {
    /// A refusal made outside policy (limits, bad input).
    pub fn refused(reason: DenyReason) -> Decision {
        Decision {
            verdict: Verdict::Deny(reason),
            audit: Vec::new(),
        }
    }

    pub fn is_allowed(&self) -> bool {
        matches!(self.verdict, Verdict::Allow(_))
    }

    pub fn deny_reason(&self) -> Option<DenyReason> {
        match self.verdict {
            Verdict::Deny(r) => Some(r),
            Verdict::Allow(_) => None,
        }
    }

    /// The rule that decided, if a rule did.
    pub fn rule(&self) -> Option<RuleRef> {
        match self.verdict {
            Verdict::Allow(AllowReason::Matched(r))
            | Verdict::Deny(DenyReason::ExplicitDeny(r)) => Some(r),
            _ => None,
        }
    }

    /// Stable snake_case name of the reason (`allow_matched`, `explicit_deny`, ...).
    pub fn reason_name(&self) -> &'static str {
        match self.verdict {
            Verdict::Allow(a) => a.name(),
            Verdict::Deny(d) => d.name(),
        }
    }
}

/// Decides `req` under `policy`. Cost depends on the rules and allow selectors
/// indexed under the request's receiving workload, port and source identity, not on
/// unrelated rules or policies.
///
/// On a port inspected at layer 7 for the receiving workload
/// ([`CompiledPolicy::inspects`]) a request without HTTP attributes is what the data
/// path refuses before policy: UDP there (it could be HTTP/3, which is not inspected)
/// and a TCP connection that sends no HTTP/1.x request are `not_http`, unless no request
/// the source could send would be allowed ([`deny_every_request`]), which the enforcer
/// refuses at the connection's opening with that reason.
pub fn evaluate(policy: &CompiledPolicy, req: &Request<'_>) -> Decision {
    if req.http.is_none() && req.protocol != Protocol::Icmp && policy.inspects(req) {
        let reason = match req.protocol {
            Protocol::Tcp => deny_every_request(policy, req).unwrap_or(DenyReason::NotHttp),
            _ => DenyReason::NotHttp,
        };
        return Decision::refused(reason);
    }
    let mut audit = Vec::new();
    policy.for_each_candidate(Action::Audit, req, |r| {
        if policy.rule_matches(r, req) {
            audit.push(r);
        }
    });
    if audit.len() > 1 {
        // Candidates come list by list, and a rule filed under two keys that both
        // match (a prefix and a suffix) comes twice.
        audit.sort_unstable();
        audit.dedup();
    }
    // Step 1: any matching deny wins.
    if let Some(r) = policy.first_match(Action::Deny, req) {
        return Decision {
            verdict: Verdict::Deny(DenyReason::ExplicitDeny(r)),
            audit,
        };
    }
    // Step 2: allow policies that apply make the workload default-deny.
    let verdict = if policy.allow_applies(req) {
        match policy.first_match(Action::Allow, req) {
            Some(r) => Verdict::Allow(AllowReason::Matched(r)),
            None => Verdict::Deny(DenyReason::NoAllowMatched),
        }
    } else {
        // Step 3: the mesh default.
        match policy.default_action() {
            super::model::DefaultAction::Allow => Verdict::Allow(AllowReason::DefaultAllow),
            super::model::DefaultAction::Deny => Verdict::Deny(DenyReason::DefaultDeny),
        }
    };
    Decision { verdict, audit }
}

/// For a connection on a port inspected at layer 7, whose requests are decided one by
/// one: the reason every request `req`'s source could send would be denied, if there
/// is one; `None` when some request could still be allowed. `req` carries no HTTP
/// attributes; this reads the rules the other way round from [`evaluate`] without
/// them: a deny rule counts only if it matches every request (no HTTP fields, or only
/// `methods`/`paths` of `*`), an allow rule counts if it could match some request
/// (HTTP fields ignored).
///
/// Exact on the side that matters: it never answers `Some` for a connection on which
/// some request would be allowed (an allow rule that could match always counts). It
/// may answer `None` for one on which every request will be refused anyway (allow
/// rules whose HTTP fields contradict each other, a deny on `hosts = ["*"]`, which
/// an HTTP/1.0 request without Host escapes); those are refused request by request.
///
/// The enforcer asks it when a connection to an inspected port opens (a SYN no
/// request could follow is refused then, issue 18), and when the policy changes: a
/// connection that the new policy refuses whatever it asks is cut at once (issue 4:
/// "a flow the new policy forbids is cut"), not left to stream the rest of a body
/// until its next request head. `explain` and `[[test]]` cases apply it first too.
pub fn deny_every_request(policy: &CompiledPolicy, req: &Request<'_>) -> Option<DenyReason> {
    debug_assert!(req.http.is_none());
    if let Some(r) = policy.first_match_leniency(Action::Deny, req, HttpAbsent::MatchIfEvery) {
        return Some(DenyReason::ExplicitDeny(r));
    }
    if policy.allow_applies(req) {
        return match policy.first_match_leniency(Action::Allow, req, HttpAbsent::Match) {
            Some(_) => None,
            None => Some(DenyReason::NoAllowMatched),
        };
    }
    match policy.default_action() {
        super::model::DefaultAction::Allow => None,
        super::model::DefaultAction::Deny => Some(DenyReason::DefaultDeny),
    }
}

/// How the data path reached a decision on a request described whole (a `[[test]]`
/// case, `explain`): what [`decide`] did before and instead of [`evaluate`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// The port is not inspected for the workload: one decision per connection or
    /// datagram, HTTP attributes (if described) never read.
    Layer4,
    /// Inspected; refused at the connection's opening: no request it could send
    /// would be allowed ([`deny_every_request`]).
    Opening,
    /// Inspected, and not HTTP/1.x: UDP, or a TCP connection described without HTTP
    /// attributes (`not_http`).
    NotHttp,
    /// Inspected; the request was decided with its HTTP attributes.
    #[default]
    Request,
}

/// What the data path decides for a request described whole: on a port inspected at
/// layer 7 for the workload, the connection's opening first ([`deny_every_request`]),
/// then the request with its HTTP attributes, or `not_http` without them; elsewhere
/// one layer-4 decision, HTTP attributes ignored (the enforcer never reads them
/// there). `req`'s path must be normalised already (see [`RequestSpec::decide`]).
///
/// [`RequestSpec::decide`]: super::RequestSpec::decide
pub fn decide(policy: &CompiledPolicy, req: &Request<'_>) -> Decision {
    decide_staged(policy, req).0
}

/// [`decide`], saying how.
pub(crate) fn decide_staged(policy: &CompiledPolicy, req: &Request<'_>) -> (Decision, Stage) {
    let connection = Request { http: None, ..*req };
    if req.protocol == Protocol::Icmp || !policy.inspects(req) {
        return (evaluate(policy, &connection), Stage::Layer4);
    }
    if req.protocol == Protocol::Tcp {
        if let Some(reason) = deny_every_request(policy, &connection) {
            return (Decision::refused(reason), Stage::Opening);
        }
        if req.http.is_some() {
            return (evaluate(policy, req), Stage::Request);
        }
    }
    (Decision::refused(DenyReason::NotHttp), Stage::NotHttp)
}

/// How a rule's layer-7 fields (methods, paths, hosts, header conditions) treat a
/// request without HTTP attributes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum HttpAbsent {
    /// They match, as Istio's deny rules do for TCP traffic (failing closed); also
    /// "could match some request" for [`deny_every_request`]'s allow step.
    Match,
    /// They do not match (Istio's allow and audit rules).
    Miss,
    /// They match only if they match every request: `methods` and `paths` holding
    /// `*`, and nothing else HTTP (for [`deny_every_request`]'s deny step).
    MatchIfEvery,
}

impl HttpAbsent {
    /// [`evaluate`]'s reading for a rule of `action`.
    pub(crate) fn of(action: Action) -> HttpAbsent {
        if action == Action::Deny {
            HttpAbsent::Match
        } else {
            HttpAbsent::Miss
        }
    }
}

// ---- matchers -------------------------------------------------------------------
//
// Each returns the name of the first field that fails (`None` = matches), so the
// evaluator and `explain` share one implementation.

/// Does the selector pick the destination workload?
pub(crate) fn selector_mismatch(sel: &Selector, req: &Request<'_>) -> Option<&'static str> {
    if let Some(ids) = &sel.identities {
        let ok = req
            .dst_identity
            .is_some_and(|id| ids.iter().any(|p| p.matches(id.as_bytes())));
        if !ok {
            return Some("selector.identities");
        }
    }
    if let Some(groups) = &sel.groups {
        if !req.dst_groups.iter().any(|g| groups.contains(g)) {
            return Some("selector.groups");
        }
    }
    None
}

pub(crate) fn source_mismatch(s: &Source, req: &Request<'_>) -> Option<&'static str> {
    let id = req.src_identity;
    if let Some(ids) = &s.identities {
        if !id.is_some_and(|id| ids.iter().any(|p| p.matches(id.as_bytes()))) {
            return Some("identities");
        }
    }
    if let Some(id) = id {
        if s.not_identities.iter().any(|p| p.matches(id.as_bytes())) {
            return Some("not_identities");
        }
    }
    if let Some(groups) = &s.groups {
        if !req.src_groups.iter().any(|g| groups.contains(g)) {
            return Some("groups");
        }
    }
    if req.src_groups.iter().any(|g| s.not_groups.contains(g)) {
        return Some("not_groups");
    }
    let td = id.map(trust_domain_of);
    if let Some(tds) = &s.trust_domains {
        if !td.is_some_and(|td| tds.iter().any(|t| t == td)) {
            return Some("trust_domains");
        }
    }
    if let Some(td) = td {
        if s.not_trust_domains.iter().any(|t| t == td) {
            return Some("not_trust_domains");
        }
    }
    if let Some(nets) = &s.addresses {
        if !req
            .src_addr
            .is_some_and(|a| nets.iter().any(|n| n.contains(&a)))
        {
            return Some("addresses");
        }
    }
    if let Some(a) = req.src_addr {
        if s.not_addresses.iter().any(|n| n.contains(&a)) {
            return Some("not_addresses");
        }
    }
    None
}

/// `absent`: how HTTP fields treat a request without HTTP attributes. As in Istio, a
/// deny rule then ignores its HTTP fields (failing closed), while an allow or audit
/// rule does not match.
pub(crate) fn operation_mismatch(
    op: &Operation,
    req: &Request<'_>,
    absent: HttpAbsent,
) -> Option<&'static str> {
    if let Some(protos) = &op.protocols {
        if !protos.contains(&req.protocol) {
            return Some("protocols");
        }
    }
    if let Some(ports) = &op.ports {
        if req.protocol == Protocol::Icmp || !ports.contains(&req.dst_port) {
            return Some("ports");
        }
    }
    if req.protocol != Protocol::Icmp && op.not_ports.contains(&req.dst_port) {
        return Some("not_ports");
    }
    if !op.is_l7() {
        return None;
    }
    // HTTP fields describe HTTP requests, which travel over TCP only.
    if req.protocol != Protocol::Tcp {
        return Some("protocols");
    }
    let Some(h) = &req.http else {
        return match absent {
            HttpAbsent::Match => None,
            HttpAbsent::MatchIfEvery if every_request(op) => None,
            _ => Some("http"),
        };
    };
    let method = h.method.as_bytes();
    if let Some(m) = &op.methods {
        if !m.iter().any(|m| m.matches(method)) {
            return Some("methods");
        }
    }
    if op.not_methods.iter().any(|m| m.matches(method)) {
        return Some("not_methods");
    }
    let path = h.path;
    if let Some(p) = &op.paths {
        if !p.iter().any(|p| p.matches(path)) {
            return Some("paths");
        }
    }
    if op.not_paths.iter().any(|p| p.matches(path)) {
        return Some("not_paths");
    }
    if let Some(hosts) = &op.hosts {
        if !h
            .host
            .is_some_and(|host| hosts.iter().any(|p| p.matches(host)))
        {
            return Some("hosts");
        }
    }
    if let Some(host) = h.host {
        if op.not_hosts.iter().any(|p| p.matches(host)) {
            return Some("not_hosts");
        }
    }
    None
}

/// Do the HTTP fields of `op` match every HTTP request? Only `*` in `methods` and
/// `paths` does (a Host may be absent in HTTP/1.0, a negation excludes something).
fn every_request(op: &Operation) -> bool {
    let any_method = match &op.methods {
        None => true,
        Some(m) => m.contains(&Pattern::Any),
    };
    let any_path = match &op.paths {
        None => true,
        Some(p) => p.contains(&PathPattern::Match(Pattern::Any)),
    };
    any_method
        && any_path
        && op.hosts.is_none()
        && op.not_methods.is_empty()
        && op.not_paths.is_empty()
        && op.not_hosts.is_empty()
}

pub(crate) fn condition_mismatch(
    c: &Condition,
    req: &Request<'_>,
    absent: HttpAbsent,
) -> Option<&'static str> {
    if req.protocol != Protocol::Tcp {
        return Some("key");
    }
    let Some(h) = &req.http else {
        // No header condition holds for every request.
        return if absent == HttpAbsent::Match {
            None
        } else {
            Some("key")
        };
    };
    // A header sent more than once is matched joined by `,`, as Envoy matches it
    // (`HeaderUtility::getAllOfHeaderAsString`), on both sides: `values` and
    // `not_values` see the same one value.
    let joined = || h.header_values(&c.header);
    if let Some(values) = &c.values {
        if !values.iter().any(|p| p.matches_joined(joined())) {
            return Some("values");
        }
    }
    if c.not_values.iter().any(|p| p.matches_joined(joined())) {
        return Some("not_values");
    }
    None
}

/// Where a rule failed to match, for `explain`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum RuleMiss {
    /// No `from` entry matched; per entry, the first failing field.
    From(Vec<&'static str>),
    /// No `to` entry matched; per entry, the first failing field.
    To(Vec<&'static str>),
    /// `when[i]` failed at a field.
    When(usize, &'static str),
}

/// Where `rule` fails to match `req`, its layer-7 fields read as `absent` says when
/// `req` has no HTTP attributes.
pub(crate) fn rule_mismatch(
    rule: &Rule,
    req: &Request<'_>,
    absent: HttpAbsent,
) -> Option<RuleMiss> {
    if !rule.from.is_empty() {
        let mut misses = Vec::new();
        for s in &rule.from {
            match source_mismatch(s, req) {
                None => {
                    misses.clear();
                    break;
                }
                Some(f) => misses.push(f),
            }
        }
        if !misses.is_empty() {
            return Some(RuleMiss::From(misses));
        }
    }
    if !rule.to.is_empty() {
        let mut misses = Vec::new();
        for op in &rule.to {
            match operation_mismatch(op, req, absent) {
                None => {
                    misses.clear();
                    break;
                }
                Some(f) => misses.push(f),
            }
        }
        if !misses.is_empty() {
            return Some(RuleMiss::To(misses));
        }
    }
    for (i, c) in rule.when.iter().enumerate() {
        if let Some(f) = condition_mismatch(c, req, absent) {
            return Some(RuleMiss::When(i, f));
        }
    }
    None
}

/// Hot-path form of [`rule_mismatch`] (no allocation), where `absent` says how
/// layer-7 fields read a request without HTTP attributes ([`HttpAbsent::of`] the
/// action for [`evaluate`]; otherwise for [`deny_every_request`]).
pub(crate) fn rule_matches_leniency(rule: &Rule, req: &Request<'_>, absent: HttpAbsent) -> bool {
    (rule.from.is_empty() || rule.from.iter().any(|s| source_mismatch(s, req).is_none()))
        && (rule.to.is_empty()
            || rule
                .to
                .iter()
                .any(|op| operation_mismatch(op, req, absent).is_none()))
        && rule
            .when
            .iter()
            .all(|c| condition_mismatch(c, req, absent).is_none())
}
