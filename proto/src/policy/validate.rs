//! Warnings: rules that are valid but can never match (or not as written), found on
//! the checked model after parsing.

use super::model::{Action, Operation, PolicySet, Protocol, Rule};

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
    out
}

fn lint_rule(warn: &mut impl FnMut(usize, String, String), at: &str, rule: &Rule) {
    let line = rule.line;
    for (i, s) in rule.from.iter().enumerate() {
        let a = format!("{at}.from[{i}]");
        if let Some(g) = &s.groups {
            if g.iter().any(|g| s.not_groups.contains(g)) {
                warn(
                    line,
                    format!("{a}.groups"),
                    "a group is in both groups and not_groups".into(),
                );
            }
        }
    }
    let l7_any_port = rule.is_l7()
        && (rule.to.is_empty()
            || rule.to.iter().any(|op| {
                op.ports.is_none()
                    && (op.is_l7() || !rule.when.is_empty())
                    && op.allows(Protocol::Tcp)
            }));
    if l7_any_port {
        warn(
            line,
            at.to_string(),
            "HTTP fields without `ports`: every TCP port is inspected at layer 7 and non-HTTP traffic on any port is refused (name the HTTP ports)".into(),
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
    if let Some(ports) = &op.ports {
        if ports.iter().any(|p| op.not_ports.contains(p)) {
            warn(
                line,
                format!("{a}.ports"),
                "a port is in both ports and not_ports".into(),
            );
        }
    }
    if let Some(m) = &op.methods {
        if m.iter().any(|m| op.not_methods.contains(m)) {
            warn(
                line,
                format!("{a}.methods"),
                "a method is in both methods and not_methods".into(),
            );
        }
    }
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
