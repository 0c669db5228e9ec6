//! `explain`: the decision for a described request, the policy and rule that made
//! it, and for every other policy why it did not match. Uses the same matchers as
//! [`evaluate`](super::eval::evaluate), walking every rule instead of the index.

use serde::{Deserialize, Serialize};

use super::compile::CompiledPolicy;
use super::eval::{
    decide_staged, rule_mismatch, selector_mismatch, Decision, HttpAbsent, RuleMiss, RuleRef, Stage,
};
use super::ident::trust_domain_of;
use super::model::{Action, Protocol, Rule};
use super::request::{Request, RequestSpec};

/// A decision in names: what the log, `explain --json` and test results print.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecisionSummary {
    /// `allow` or `deny`.
    pub decision: String,
    /// Reason name: `allow_matched`, `default_allow`, or a [`DenyReason`] name.
    ///
    /// [`DenyReason`]: super::eval::DenyReason
    pub reason: String,
    /// HTTP status of a layer-7 refusal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// Audit rules that matched, as `policy/rule`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audit: Vec<String>,
}

impl DecisionSummary {
    pub fn new(policy: &CompiledPolicy, d: &Decision) -> DecisionSummary {
        let (pol, rule) = match d.rule() {
            Some(r) => {
                let (p, l) = policy.rule_label(r);
                (Some(p.to_string()), Some(l))
            }
            None => (None, None),
        };
        DecisionSummary {
            decision: if d.is_allowed() { "allow" } else { "deny" }.to_string(),
            reason: d.reason_name().to_string(),
            status: d.deny_reason().map(|r| r.http_status()),
            policy: pol,
            rule,
            audit: d.audit.iter().map(|&r| policy.describe(r)).collect(),
        }
    }
}

/// The full answer of `explain`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Explanation {
    #[serde(flatten)]
    pub decision: DecisionSummary,
    /// Whether the destination port is inspected at layer 7.
    pub l7: bool,
    /// The mesh default (`allow` or `deny`).
    pub default: String,
    /// The path policy matched, when normalisation changed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub normalized_path: Option<String>,
    /// Why the path was refused before policy, if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_error: Option<String>,
    /// How the data path came to the decision (`layer4`, `opening`, `not_http`,
    /// `request`); the rules are traced as that stage reads them.
    #[serde(default)]
    pub stage: Stage,
    /// What the data path did besides policy, in a sentence, when it matters: HTTP
    /// attributes not read on a port that is not inspected, a connection refused at
    /// its opening, non-HTTP traffic refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    pub policies: Vec<PolicyTrace>,
}

/// How one policy related to the request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyTrace {
    pub name: String,
    pub action: Action,
    pub line: usize,
    /// Why the selector does not pick the workload, if it does not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_selected: Option<String>,
    pub rules: Vec<RuleTrace>,
}

/// How one rule related to the request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleTrace {
    pub rule: String,
    pub line: usize,
    pub matched: bool,
    /// Why it did not match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub why_not: Option<String>,
}

/// Explains the decision for a described request as the data path makes it
/// ([`RequestSpec::decide`]): on a port inspected at layer 7 for the workload, the
/// connection's opening, then the path normalised (a path that cannot be is refused,
/// 400, before any policy is consulted; the explanation then lists no policies), then
/// the request; elsewhere one layer-4 decision.
pub fn explain(policy: &CompiledPolicy, spec: &RequestSpec) -> Explanation {
    let staged = spec.decide_staged(policy);
    match staged.normalized {
        Some(Ok(n)) => {
            let mut e =
                n.with_request(|req| explain_staged(policy, req, &staged.decision, staged.stage));
            if let (Some(raw), Some(norm)) = (&spec.http, &n.http) {
                if raw.path != norm.path {
                    e.normalized_path = Some(norm.path.clone());
                }
            }
            e
        }
        Some(Err(err)) => Explanation {
            decision: DecisionSummary::new(policy, &staged.decision),
            l7: true,
            default: default_name(policy),
            normalized_path: None,
            path_error: Some(err.to_string()),
            stage: staged.stage,
            note: None,
            policies: Vec::new(),
        },
        None => {
            spec.with_request(|req| explain_staged(policy, req, &staged.decision, staged.stage))
        }
    }
}

fn default_name(policy: &CompiledPolicy) -> String {
    match policy.default_action() {
        super::model::DefaultAction::Allow => "allow",
        super::model::DefaultAction::Deny => "deny",
    }
    .to_string()
}

/// Explains the decision for a request whose path (if any) is normalised already.
pub fn explain_request(policy: &CompiledPolicy, req: &Request<'_>) -> Explanation {
    let (decision, stage) = decide_staged(policy, req);
    explain_staged(policy, req, &decision, stage)
}

fn explain_staged(
    policy: &CompiledPolicy,
    req: &Request<'_>,
    decision: &Decision,
    stage: Stage,
) -> Explanation {
    // The rules as the stage read them: without HTTP attributes except for a request
    // decided with them; at the opening of an inspected connection, as
    // `deny_every_request` reads them.
    let connection = Request { http: None, ..*req };
    let opening = matches!(stage, Stage::Opening)
        || (stage == Stage::NotHttp && req.protocol == Protocol::Tcp);
    let traced = if stage == Stage::Request {
        req
    } else {
        &connection
    };
    let absent = |action: Action| match (opening, action) {
        (true, Action::Deny) => HttpAbsent::MatchIfEvery,
        (true, Action::Allow) => HttpAbsent::Match,
        (_, action) => HttpAbsent::of(action),
    };
    let mut policies = Vec::new();
    for (pi, p) in policy.set().policies.iter().enumerate() {
        let not_selected = p
            .selector
            .as_ref()
            .and_then(|s| selector_mismatch(s, traced))
            .map(|f| {
                format!(
                    "{f} does not select workload {}",
                    traced.dst_identity.unwrap_or("(unknown)")
                )
            });
        let rules = p
            .rules
            .iter()
            .enumerate()
            .map(|(ri, rule)| {
                let r = RuleRef {
                    policy: pi as u32,
                    rule: ri as u32,
                };
                let miss = rule_mismatch(rule, traced, absent(p.action));
                RuleTrace {
                    rule: policy.rule_label(r).1,
                    line: rule.line,
                    matched: miss.is_none() && not_selected.is_none(),
                    why_not: miss.map(|m| describe_miss(rule, &m, traced)),
                }
            })
            .collect();
        policies.push(PolicyTrace {
            name: p.name.clone(),
            action: p.action,
            line: p.line,
            not_selected,
            rules,
        });
    }
    let port = req.dst_port;
    let note = match stage {
        Stage::Layer4 if req.http.is_some() => Some(format!(
            "port {port} is not inspected at layer 7 for this workload: one decision per connection, the HTTP attributes are never read"
        )),
        Stage::Opening => Some(format!(
            "refused when the connection opens: no request this source could send to port {port} would be allowed (allow rules are read as if their HTTP fields matched)"
        )),
        Stage::NotHttp if req.protocol == Protocol::Udp => Some(format!(
            "port {port} has HTTP rules for this workload and no rule there names udp: a datagram (HTTP/3 could be one) cannot be inspected, so it is refused"
        )),
        Stage::NotHttp => Some(format!(
            "port {port} is inspected at layer 7 for this workload: a connection must carry HTTP/1.x requests, and one that sends anything else is refused (describe a request, with --method and --path, to see how it is decided)"
        )),
        _ => None,
    };
    Explanation {
        decision: DecisionSummary::new(policy, decision),
        l7: stage != Stage::Layer4,
        default: default_name(policy),
        normalized_path: None,
        path_error: None,
        stage,
        note,
        policies,
    }
}

fn list<T: std::fmt::Display>(v: &[T]) -> String {
    let items: Vec<String> = v.iter().map(|x| x.to_string()).collect();
    format!("[{}]", items.join(", "))
}

fn opt<T: std::fmt::Display>(v: &Option<Vec<T>>) -> String {
    v.as_deref().map_or_else(|| "[]".to_string(), list)
}

fn describe_miss(rule: &Rule, miss: &RuleMiss, req: &Request<'_>) -> String {
    let id = req.src_identity.unwrap_or("(none)");
    let groups = list(req.src_groups);
    let addr = req
        .src_addr
        .map_or_else(|| "(none)".to_string(), |a| a.to_string());
    let http = req.http.as_ref();
    let method = http.map_or("(not HTTP)", |h| h.method);
    let path = http.map_or("(not HTTP)", |h| h.path);
    let host = http.and_then(|h| h.host).unwrap_or("(none)");
    match miss {
        RuleMiss::From(fields) => {
            let parts: Vec<String> = fields
                .iter()
                .enumerate()
                .map(|(i, &f)| {
                    let s = &rule.from[i];
                    let detail = match f {
                        "identities" => format!("{id} not in {}", opt(&s.identities)),
                        "not_identities" => format!("{id} is in {}", list(&s.not_identities)),
                        "groups" => format!("{groups} not in {}", opt(&s.groups)),
                        "not_groups" => format!("{groups} meets {}", list(&s.not_groups)),
                        "trust_domains" => {
                            format!("{} not in {}", trust_domain_of(id), opt(&s.trust_domains))
                        }
                        "not_trust_domains" => format!(
                            "{} is in {}",
                            trust_domain_of(id),
                            list(&s.not_trust_domains)
                        ),
                        "addresses" => format!("{addr} not in {}", opt(&s.addresses)),
                        "not_addresses" => format!("{addr} is in {}", list(&s.not_addresses)),
                        _ => String::new(),
                    };
                    format!("from[{i}].{f}: {detail}")
                })
                .collect();
            parts.join("; ")
        }
        RuleMiss::To(fields) => {
            let parts: Vec<String> = fields
                .iter()
                .enumerate()
                .map(|(i, &f)| {
                    let o = &rule.to[i];
                    let detail = match f {
                        "protocols" if o.is_l7() && o.allows(req.protocol) => {
                            format!("HTTP fields need tcp, request is {}", req.protocol)
                        }
                        "protocols" => format!("{} not in {}", req.protocol, opt(&o.protocols)),
                        "ports" => format!("{} not in {}", req.dst_port, opt(&o.ports)),
                        "not_ports" => format!("{} is in {}", req.dst_port, list(&o.not_ports)),
                        "http" => {
                            "the request has no HTTP attributes (give --method/--path)".to_string()
                        }
                        "methods" => format!("{method} not in {}", opt(&o.methods)),
                        "not_methods" => format!("{method} is in {}", list(&o.not_methods)),
                        "paths" => format!("{path} not in {}", opt(&o.paths)),
                        "not_paths" => format!("{path} is in {}", list(&o.not_paths)),
                        "hosts" => format!("{host} not in {}", opt(&o.hosts)),
                        "not_hosts" => format!("{host} is in {}", list(&o.not_hosts)),
                        _ => String::new(),
                    };
                    format!("to[{i}].{f}: {detail}")
                })
                .collect();
            parts.join("; ")
        }
        RuleMiss::When(i, f) => {
            let c = &rule.when[*i];
            // The one value conditions match: a repeated header's values joined by `,`.
            let got: Vec<String> = http
                .map(|h| {
                    h.header_values(&c.header)
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                        .collect()
                })
                .unwrap_or_default();
            let got = if http.is_none() {
                "(not HTTP)".to_string()
            } else if got.is_empty() {
                "(absent)".to_string()
            } else {
                format!("{:?}", got.join(","))
            };
            let detail = match *f {
                "values" => format!("{} = {got} not in {}", c.header, opt(&c.values)),
                "not_values" => format!("{} = {got} meets {}", c.header, list(&c.not_values)),
                _ => format!("{} needs an HTTP request, got {got}", c.key),
            };
            format!("when[{i}].{f}: {detail}")
        }
    }
}

impl std::fmt::Display for Explanation {
    /// The human form printed by `meshctl policy explain`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let d = &self.decision;
        write!(f, "{} ({}", d.decision, d.reason)?;
        if let Some(s) = d.status {
            write!(f, ", http {s}")?;
        }
        writeln!(f, ")")?;
        if let (Some(p), Some(r)) = (&d.policy, &d.rule) {
            writeln!(f, "decided by: {p}/{r}")?;
        } else {
            let why = match d.reason.as_str() {
                "malformed_request" => "the request cannot be parsed",
                "not_http" => {
                    "the port is inspected at layer 7 and this is not an HTTP/1.x request"
                }
                "no_allow_matched" => "allow policies apply to the workload and none matched",
                "default_deny" => "no policy decided; mesh default is deny",
                "default_allow" => "no policy decided; mesh default is allow",
                _ => "",
            };
            writeln!(f, "decided by: {why}")?;
        }
        if let Some(n) = &self.note {
            writeln!(f, "note: {n}")?;
        }
        for a in &d.audit {
            writeln!(f, "audit: {a}")?;
        }
        if let Some(p) = &self.normalized_path {
            writeln!(f, "path normalised to: {p}")?;
        }
        if let Some(e) = &self.path_error {
            writeln!(f, "path refused: {e}")?;
        }
        writeln!(
            f,
            "layer: {}",
            if self.l7 { "7 (port inspected)" } else { "4" }
        )?;
        for p in &self.policies {
            let decided = |r: &RuleTrace| {
                d.policy.as_deref() == Some(p.name.as_str())
                    && d.rule.as_deref() == Some(r.rule.as_str())
            };
            if let Some(ns) = &p.not_selected {
                writeln!(f, "  {} ({}): not applied: {ns}", p.name, p.action.as_str())?;
                continue;
            }
            if p.rules.is_empty() {
                writeln!(
                    f,
                    "  {} ({}): no rules, matches nothing",
                    p.name,
                    p.action.as_str()
                )?;
                continue;
            }
            for r in &p.rules {
                let state = if decided(r) {
                    "DECIDED".to_string()
                } else if r.matched {
                    match (p.action, self.stage) {
                        (Action::Audit, _) => "matched (audit)".to_string(),
                        (Action::Allow, Stage::Opening | Stage::NotHttp) => {
                            "could match a request (HTTP fields not read)".to_string()
                        }
                        _ => "matched (not first)".to_string(),
                    }
                } else {
                    format!("no match: {}", r.why_not.as_deref().unwrap_or(""))
                };
                writeln!(
                    f,
                    "  {}/{} ({}, line {}): {state}",
                    p.name,
                    r.rule,
                    p.action.as_str(),
                    r.line
                )?;
            }
        }
        Ok(())
    }
}
