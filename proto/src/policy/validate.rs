//! Warnings: rules that are valid but can never match (or not as written), found on
//! the checked model after parsing.

use std::collections::BTreeSet;

use super::model::{
    Action, Operation, PathPattern, Pattern, Policy, PolicySet, Protocol, Rule, Selector,
};

/// A rule or field that is accepted but suspicious. Display:
/// `file:line: warning: field: message`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyWarning {
    pub file: String,
    pub line: usize,
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for PolicyWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}: warning: {}: {}",
            self.file, self.line, self.field, self.message
        )
    }
}

pub(crate) fn lint(set: &PolicySet) -> Vec<PolicyWarning> {
    let mut out = Vec::new();
    for (pi, p) in set.policies.iter().enumerate() {
        let mut warn = |line: usize, field: String, message: String| {
            out.push(PolicyWarning {
                file: set.source.clone(),
                line,
                field,
                message,
            })
        };
        let at = format!("policy[{pi}]");
        if p.rules.is_empty() {
            let what = match p.action {
                Action::Allow => {
                    "it matches nothing, so every request to the workloads it selects is denied"
                }
                Action::Deny | Action::Audit => "it never matches",
            };
            warn(
                p.line,
                at.clone(),
                format!("policy {:?} has no rules: {what}", p.name),
            );
        }
        for (ri, rule) in p.rules.iter().enumerate() {
            lint_rule(&mut warn, &format!("{at}.rule[{ri}]"), rule);
        }
    }
    lint_inspection(set, &mut out);
    out
}

/// The ports a policy's rules make inspected at layer 7 (as `CompiledPolicy::inspects`
/// files them), and those it names with udp.
fn inspected_ports(p: &Policy) -> (BTreeSet<u16>, BTreeSet<u16>) {
    let (mut http, mut udp) = (BTreeSet::new(), BTreeSet::new());
    if p.action == Action::Audit {
        return (http, udp);
    }
    for rule in &p.rules {
        for op in &rule.to {
            let Some(ports) = &op.ports else { continue };
            let named = ports.iter().copied().filter(|p| !op.not_ports.contains(p));
            if (op.is_l7() || !rule.when.is_empty()) && op.allows(Protocol::Tcp) {
                http.extend(named.clone());
            }
            if op
                .protocols
                .as_ref()
                .is_some_and(|p| p.contains(&Protocol::Udp))
            {
                udp.extend(named);
            }
        }
    }
    (http, udp)
}

/// Could one workload be selected by both selectors? Only two lists of exact
/// identities with none in common say no.
fn may_overlap(a: Option<&Selector>, b: Option<&Selector>) -> bool {
    let exact = |s: &Selector| {
        s.identities
            .clone()
            .filter(|ids| ids.iter().all(|p| matches!(p, Pattern::Exact(_))))
    };
    match (a.and_then(exact), b.and_then(exact)) {
        (Some(x), Some(y)) => x.iter().any(|p| y.contains(p)),
        _ => true,
    }
}

fn port_list(ports: &BTreeSet<u16>) -> String {
    let v: Vec<String> = ports.iter().map(u16::to_string).collect();
    v.join(", ")
}

/// Where inspection changes what a rule seems to say:
/// - an allow entry that admits udp by naming no protocol, on a port with HTTP rules
///   for the same workloads: udp there is refused (`not_http`), since a datagram could
///   be HTTP/3, which is not inspected (issue 18);
/// - an audit rule with HTTP fields on a port that no allow or deny rule inspects for
///   those workloads: audit never makes a port inspected, so it never matches.
fn lint_inspection(set: &PolicySet, out: &mut Vec<PolicyWarning>) {
    let ports: Vec<_> = set.policies.iter().map(inspected_ports).collect();
    // The inspected and udp-named ports of the allow and deny policies that may
    // select a workload `p` selects.
    let near = |p: &Policy| {
        let (mut http, mut udp) = (BTreeSet::<u16>::new(), BTreeSet::<u16>::new());
        for (q, (h, u)) in set.policies.iter().zip(&ports) {
            if may_overlap(p.selector.as_ref(), q.selector.as_ref()) {
                http.extend(h);
                udp.extend(u);
            }
        }
        (http, udp)
    };
    for (pi, p) in set.policies.iter().enumerate() {
        if p.action == Action::Deny {
            continue;
        }
        let (http, udp) = near(p);
        for (ri, rule) in p.rules.iter().enumerate() {
            let at = format!("policy[{pi}].rule[{ri}]");
            let mut warn = |field: String, message: String| {
                out.push(PolicyWarning {
                    file: set.source.clone(),
                    line: rule.line,
                    field,
                    message,
                })
            };
            if p.action == Action::Audit {
                for (i, op) in rule.to.iter().enumerate() {
                    if !op.is_l7() && rule.when.is_empty() {
                        continue;
                    }
                    let named: BTreeSet<u16> = op
                        .ports
                        .iter()
                        .flatten()
                        .copied()
                        .filter(|p| !op.not_ports.contains(p) && !http.contains(p))
                        .collect();
                    if !named.is_empty() {
                        warn(
                            format!("{at}.to[{i}]"),
                            format!("port {} is not inspected at layer 7 for these workloads (no allow or deny rule with HTTP fields names it, and audit rules never make a port inspected): requests there are not read, so this rule never matches", port_list(&named)),
                        );
                    }
                }
                continue;
            }
            if !rule.when.is_empty() {
                // Every entry is layer 7: none matches udp.
                continue;
            }
            // (field, ports named or any, not_ports) of each entry admitting udp
            // without naming a protocol.
            type Entry<'a> = (String, Option<&'a Vec<u16>>, &'a [u16]);
            let entries: Vec<Entry> = if rule.to.is_empty() {
                vec![(at.clone(), None, &[][..])]
            } else {
                rule.to
                    .iter()
                    .enumerate()
                    .filter(|(_, op)| op.protocols.is_none() && !op.is_l7())
                    .map(|(i, op)| {
                        (
                            format!("{at}.to[{i}]"),
                            op.ports.as_ref(),
                            &op.not_ports[..],
                        )
                    })
                    .collect()
            };
            for (field, named, not_ports) in entries {
                let refused: BTreeSet<u16> = http
                    .iter()
                    .copied()
                    .filter(|p| {
                        let in_entry = match named {
                            None => true,
                            Some(n) => n.contains(p),
                        };
                        in_entry && !not_ports.contains(p) && !udp.contains(p)
                    })
                    .collect();
                if !refused.is_empty() {
                    warn(
                        field,
                        format!("udp to port {} is refused (not_http), though this rule names no protocol: the port has HTTP rules for these workloads, and a datagram there could be HTTP/3, which is not inspected (write protocols = [\"tcp\"] here, or name \"udp\" with the port to have udp decided by policy)", port_list(&refused)),
                    );
                }
            }
        }
    }
}

fn lint_rule(warn: &mut impl FnMut(usize, String, String), at: &str, rule: &Rule) {
    let line = rule.line;
    for (i, s) in rule.from.iter().enumerate() {
        let a = format!("{at}.from[{i}]");
        let mut conflict = |field: &str, found: Option<(String, String)>| {
            if let Some((p, n)) = found {
                warn(line, format!("{a}.{field}"), excluded(field, &p, &n));
            }
        };
        conflict(
            "identities",
            excluded_by(&s.identities, &s.not_identities, pattern_covers),
        );
        conflict(
            "groups",
            excluded_by(&s.groups, &s.not_groups, |n, p| n == p),
        );
        conflict(
            "trust_domains",
            excluded_by(&s.trust_domains, &s.not_trust_domains, |n, p| n == p),
        );
        conflict(
            "addresses",
            excluded_by(&s.addresses, &s.not_addresses, |n, p| n.contains(p)),
        );
    }
    for (i, op) in rule.to.iter().enumerate() {
        lint_operation(
            warn,
            line,
            &format!("{at}.to[{i}]"),
            op,
            !rule.when.is_empty(),
        );
    }
    for (i, c) in rule.when.iter().enumerate() {
        let a = format!("{at}.when[{i}]");
        if let Some((p, n)) = excluded_by(&c.values, &c.not_values, pattern_covers) {
            warn(line, format!("{a}.values"), excluded("values", &p, &n));
        }
        if c.header == "host" {
            warn(
                line,
                format!("{a}.key"),
                "use `hosts` in `to` for the Host header (it handles ports and case)".into(),
            );
        }
    }
}

fn lint_operation(
    warn: &mut impl FnMut(usize, String, String),
    line: usize,
    a: &str,
    op: &Operation,
    has_when: bool,
) {
    if let Some(protos) = &op.protocols {
        if (op.is_l7() || has_when) && !protos.contains(&Protocol::Tcp) {
            warn(
                line,
                a.to_string(),
                "HTTP fields (methods, paths, hosts, header conditions) need tcp, but protocols excludes it: this can never match".into(),
            );
        }
        if op.ports.is_some() && protos.iter().all(|p| *p == Protocol::Icmp) {
            warn(
                line,
                format!("{a}.ports"),
                "icmp has no ports: this can never match".into(),
            );
        }
    }
    let mut conflict = |field: &str, found: Option<(String, String)>| {
        if let Some((p, n)) = found {
            warn(line, format!("{a}.{field}"), excluded(field, &p, &n));
        }
    };
    conflict(
        "ports",
        excluded_by(&op.ports, &op.not_ports, |n, p| n == p),
    );
    conflict(
        "methods",
        excluded_by(&op.methods, &op.not_methods, pattern_covers),
    );
    conflict(
        "paths",
        excluded_by(&op.paths, &op.not_paths, |n, p| match (n, p) {
            (PathPattern::Match(n), PathPattern::Match(p)) => pattern_covers(n, p),
            (n, p) => n == p,
        }),
    );
    conflict(
        "hosts",
        excluded_by(&op.hosts, &op.not_hosts, |n, p| {
            pattern_covers(&n.name, &p.name) && (n.port.is_none() || n.port == p.port)
        }),
    );
    for m in op.methods.iter().flatten().chain(&op.not_methods) {
        let m = m.to_string();
        if m.bytes().any(|b| b.is_ascii_lowercase()) {
            warn(
                line,
                format!("{a}.methods"),
                format!(
                    "methods are case-sensitive: {m:?} never matches {:?}",
                    m.to_ascii_uppercase()
                ),
            );
        }
    }
}

/// The first value of a positive field that its `not_*` field excludes whole (so it
/// can never match), with the value that excludes it.
fn excluded_by<T: std::fmt::Display>(
    pos: &Option<Vec<T>>,
    neg: &[T],
    covers: impl Fn(&T, &T) -> bool,
) -> Option<(String, String)> {
    pos.iter().flatten().find_map(|p| {
        neg.iter()
            .find(|n| covers(n, p))
            .map(|n| (p.to_string(), n.to_string()))
    })
}

fn excluded(field: &str, value: &str, by: &str) -> String {
    format!("{value:?} in {field} is excluded by {by:?} in not_{field}: it can never match")
}

/// Does negative pattern `n` exclude everything positive pattern `p` matches?
fn pattern_covers(n: &Pattern, p: &Pattern) -> bool {
    match (n, p) {
        (Pattern::Any, _) => true,
        (n, Pattern::Exact(v)) => n.matches(v.as_bytes()),
        (Pattern::Prefix(b), Pattern::Prefix(a)) => a.starts_with(b.as_str()),
        (Pattern::Suffix(b), Pattern::Suffix(a)) => a.ends_with(b.as_str()),
        _ => false,
    }
}
