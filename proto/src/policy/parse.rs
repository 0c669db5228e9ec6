//! Policy files: TOML → raw serde structs (unknown fields are errors) → the checked
//! model. Every error names the file, the line and the field.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

use super::cases::{Expect, TestCase};
use super::ident;
use super::model::{
    Action, Condition, HostPattern, Operation, PathPattern, PathTemplate, Pattern, Policy,
    PolicySet, Protocol, Rule, Selector, Source,
};
use super::request::{is_tchar, parse_header, HttpSpec, RequestSpec};
use super::validate::{lint, PolicyWarning};
use crate::http_path;

/// A policy file that cannot be used. Display: `file:line: field: message`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}: {field}{}{message}", if field.is_empty() { "" } else { ": " })]
pub struct PolicyError {
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// Field path, e.g. `policy[0].rule[1].from[0].addresses`; empty for the file.
    pub field: String,
    pub message: String,
}

/// A parsed, checked policy file and its warnings.
#[derive(Clone, Debug)]
pub struct Parsed {
    pub set: PolicySet,
    pub warnings: Vec<PolicyWarning>,
}

// ---- raw file format ----------------------------------------------------------

/// A list field: `None` when absent; the list's own span locates an empty one.
type Strings = Option<Spanned<Vec<Spanned<String>>>>;
type Ports = Option<Spanned<Vec<Spanned<i64>>>>;
/// An array of tables (`from`, `to`, `when`): `None` when absent.
type Tables<T> = Option<Spanned<Vec<Spanned<T>>>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    policy: Option<Vec<Spanned<RawPolicy>>>,
    #[serde(default)]
    test: Vec<Spanned<RawTest>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    name: Spanned<String>,
    action: Action,
    selector: Option<Spanned<RawSelector>>,
    #[serde(default)]
    rule: Vec<Spanned<RawRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSelector {
    identities: Strings,
    groups: Strings,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Option<Spanned<String>>,
    from: Tables<RawSource>,
    to: Tables<RawOperation>,
    when: Tables<RawCondition>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    identities: Strings,
    not_identities: Strings,
    groups: Strings,
    not_groups: Strings,
    trust_domains: Strings,
    not_trust_domains: Strings,
    addresses: Strings,
    not_addresses: Strings,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOperation {
    ports: Ports,
    not_ports: Ports,
    protocols: Option<Spanned<Vec<Protocol>>>,
    methods: Strings,
    not_methods: Strings,
    paths: Strings,
    not_paths: Strings,
    hosts: Strings,
    not_hosts: Strings,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCondition {
    key: Spanned<String>,
    values: Strings,
    not_values: Strings,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RuleLabel {
    Index(i64),
    Name(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTest {
    name: Option<Spanned<String>>,
    from: Option<Spanned<String>>,
    #[serde(default)]
    from_groups: Vec<String>,
    from_address: Option<Spanned<String>>,
    workload: Option<Spanned<String>>,
    #[serde(default)]
    workload_groups: Vec<String>,
    to_address: Option<Spanned<String>>,
    to_port: Option<Spanned<i64>>,
    proto: Option<Protocol>,
    method: Option<String>,
    path: Option<Spanned<String>>,
    host: Option<String>,
    #[serde(default)]
    headers: Vec<Spanned<String>>,
    expect: Spanned<String>,
    expect_policy: Option<String>,
    expect_rule: Option<RuleLabel>,
    expect_reason: Option<Spanned<String>>,
}

// ---- conversion ---------------------------------------------------------------

/// Parses and checks a policy file. `file` names it in messages.
pub fn parse(file: &str, source: &str) -> Result<Parsed, PolicyError> {
    let cx = Cx {
        file,
        lines: Lines::new(source),
    };
    let raw: RawFile = toml::from_str(source).map_err(|e| cx.toml_error(&e))?;
    let Some(raw_policies) = raw.policy else {
        return Err(cx.err(
            0,
            "",
            "no [[policy]] in the file (to apply no policies at all, write `policy = []`)",
        ));
    };
    let mut set = PolicySet {
        source: file.to_string(),
        ..PolicySet::default()
    };
    // Policy name → line of its first `[[policy]]`, for duplicates and test cases.
    let mut names: HashMap<String, usize> = HashMap::with_capacity(raw_policies.len());
    for (pi, rp) in raw_policies.into_iter().enumerate() {
        let line = cx.line(rp.span().start);
        let p = cx.policy(pi, rp.into_inner(), line)?;
        if let Some(first) = names.get(&p.name) {
            return Err(cx.err_line(
                line,
                &format!("policy[{pi}].name"),
                &format!("duplicate policy name {:?} (first at line {first})", p.name),
            ));
        }
        names.insert(p.name.clone(), line);
        set.policies.push(p);
    }
    for (ti, rt) in raw.test.into_iter().enumerate() {
        let line = cx.line(rt.span().start);
        let t = cx.test(ti, rt.into_inner(), line, &names)?;
        set.tests.push(t);
    }
    let warnings = lint(&set);
    Ok(Parsed { set, warnings })
}

/// Where each line of a source starts, found once per file, so that the line of a
/// span costs a binary search: a file of n rules asks for about n lines, and counting
/// newlines from the start of the file each time made parsing quadratic.
struct Lines<'a> {
    source: &'a str,
    /// Byte offset of the start of each line; `starts[0] == 0`.
    starts: Vec<usize>,
}

impl<'a> Lines<'a> {
    fn new(source: &'a str) -> Lines<'a> {
        let starts = std::iter::once(0)
            .chain(
                source
                    .bytes()
                    .enumerate()
                    .filter(|&(_, b)| b == b'\n')
                    .map(|(i, _)| i + 1),
            )
            .collect();
        Lines { source, starts }
    }

    /// The 1-based line holding byte `offset` (offsets past the end count as the
    /// end): one more than the number of newlines before it.
    fn line(&self, offset: usize) -> usize {
        let offset = offset.min(self.source.len());
        self.starts.partition_point(|&s| s <= offset)
    }

    /// The text of 1-based `line` as `str::lines` gives it: without its `\n` or
    /// `\r\n`; empty past the end.
    fn text(&self, line: usize) -> &'a str {
        let Some(&start) = line.checked_sub(1).and_then(|i| self.starts.get(i)) else {
            return "";
        };
        match self.starts.get(line) {
            Some(&next) => {
                let text = &self.source[start..next - 1];
                text.strip_suffix('\r').unwrap_or(text)
            }
            None => &self.source[start..],
        }
    }
}

struct Cx<'a> {
    file: &'a str,
    lines: Lines<'a>,
}

impl Cx<'_> {
    fn line(&self, offset: usize) -> usize {
        self.lines.line(offset)
    }

    fn err(&self, offset: usize, field: &str, message: &str) -> PolicyError {
        self.err_line(self.line(offset), field, message)
    }

    fn err_line(&self, line: usize, field: &str, message: &str) -> PolicyError {
        PolicyError {
            file: self.file.to_string(),
            line,
            field: field.to_string(),
            message: message.to_string(),
        }
    }

    /// A TOML or serde error: the line from its span, the field from the key
    /// written on that line when there is one.
    fn toml_error(&self, e: &toml::de::Error) -> PolicyError {
        let offset = e.span().map_or(0, |s| s.start);
        let line = self.line(offset);
        let text = self.lines.text(line);
        let field = text
            .split_once('=')
            .map(|(k, _)| k.trim())
            .filter(|k| !k.is_empty() && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
            .unwrap_or("");
        let message = e.message().trim().replace('\n', " ");
        let message = if message.is_empty() {
            "invalid TOML".to_string()
        } else {
            message
        };
        self.err_line(line, field, &message)
    }

    fn policy(&self, pi: usize, rp: RawPolicy, line: usize) -> Result<Policy, PolicyError> {
        let at = format!("policy[{pi}]");
        let name = rp.name.get_ref().trim().to_string();
        if name.is_empty()
            || name.contains('/')
            || name.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(self.err(
                rp.name.span().start,
                &format!("{at}.name"),
                "policy name must be non-empty, without spaces, control characters or '/'",
            ));
        }
        let selector = match rp.selector {
            None => None,
            Some(s) => {
                let s = s.into_inner();
                Some(Selector {
                    identities: self.list(
                        &s.identities,
                        &format!("{at}.selector.identities"),
                        |v| {
                            ident::check_id_pattern(v)?;
                            Ok(Pattern::parse(v))
                        },
                    )?,
                    groups: self.list(&s.groups, &format!("{at}.selector.groups"), group)?,
                })
            }
        };
        let mut rules = Vec::with_capacity(rp.rule.len());
        let mut rule_names = HashSet::new();
        for (ri, rr) in rp.rule.into_iter().enumerate() {
            let rline = self.line(rr.span().start);
            let rule = self.rule(&format!("{at}.rule[{ri}]"), rr.into_inner(), rline)?;
            if let Some(n) = &rule.name {
                if !rule_names.insert(n.clone()) {
                    return Err(self.err_line(
                        rline,
                        &format!("{at}.rule[{ri}].name"),
                        &format!("duplicate rule name {n:?} in policy {name:?}"),
                    ));
                }
            }
            rules.push(rule);
        }
        Ok(Policy {
            name,
            action: rp.action,
            selector,
            rules,
            line,
        })
    }

    fn rule(&self, at: &str, rr: RawRule, line: usize) -> Result<Rule, PolicyError> {
        let name = match rr.name {
            None => None,
            Some(n) => {
                let s = n.get_ref().trim();
                if s.is_empty()
                    || s.contains('/')
                    || s.chars().any(char::is_control)
                    || s.bytes().all(|b| b.is_ascii_digit())
                {
                    return Err(self.err(
                        n.span().start,
                        &format!("{at}.name"),
                        "rule name must be non-empty, without control characters or '/', and not a number",
                    ));
                }
                Some(s.to_string())
            }
        };
        let from = self.tables(
            rr.from,
            &format!("{at}.from"),
            "write the sources, or leave `from` out to match any source",
            |i, s, line| self.source_entry(&format!("{at}.from[{i}]"), s, line),
        )?;
        let when_line = rr.when.as_ref().map(|w| self.line(w.span().start));
        let when = self.tables(
            rr.when,
            &format!("{at}.when"),
            "write the conditions, or leave `when` out",
            |i, c, line| self.condition(&format!("{at}.when[{i}]"), c, line),
        )?;
        // Only the ports a rule names are inspected at layer 7 (an HTTP rule without
        // ports used to make every TCP port inspected, for every workload): HTTP
        // fields, or header conditions (which make each `to` entry layer 7), need
        // ports.
        const NEEDS_PORTS: &str = "HTTP fields (methods, paths, hosts, header conditions) need `ports`: only the ports a rule names are inspected at layer 7";
        if let (Some(wline), None) = (when_line, &rr.to) {
            return Err(self.err_line(
                wline,
                &format!("{at}.when"),
                &format!("{NEEDS_PORTS}; add `to = [{{ ports = [...] }}]`"),
            ));
        }
        let to = self.tables(
            rr.to,
            &format!("{at}.to"),
            "write the operations, or leave `to` out to match any operation",
            |i, o, line| {
                let op = self.operation(&format!("{at}.to[{i}]"), o, line)?;
                if (op.is_l7() || !when.is_empty()) && op.ports.is_none() {
                    return Err(self.err_line(line, &format!("{at}.to[{i}]"), NEEDS_PORTS));
                }
                Ok(op)
            },
        )?;
        Ok(Rule {
            name,
            from,
            to,
            when,
            line,
        })
    }

    fn source_entry(&self, at: &str, s: RawSource, line: usize) -> Result<Source, PolicyError> {
        let fields = [
            &s.identities,
            &s.not_identities,
            &s.groups,
            &s.not_groups,
            &s.trust_domains,
            &s.not_trust_domains,
            &s.addresses,
            &s.not_addresses,
        ];
        if fields.iter().all(|f| f.is_none()) {
            return Err(self.err_line(
                line,
                at,
                "empty `from` entry: it would match any source; name identities, groups, trust domains or addresses, or remove the entry",
            ));
        }
        let id = |v: &str| {
            ident::check_id_pattern(v)?;
            Ok(Pattern::parse(v))
        };
        let td = |v: &str| {
            ident::check_trust_domain(v)?;
            Ok(v.to_string())
        };
        Ok(Source {
            identities: self.list(&s.identities, &format!("{at}.identities"), id)?,
            not_identities: self.nlist(&s.not_identities, &format!("{at}.not_identities"), id)?,
            groups: self.list(&s.groups, &format!("{at}.groups"), group)?,
            not_groups: self.nlist(&s.not_groups, &format!("{at}.not_groups"), group)?,
            trust_domains: self.list(&s.trust_domains, &format!("{at}.trust_domains"), td)?,
            not_trust_domains: self.nlist(
                &s.not_trust_domains,
                &format!("{at}.not_trust_domains"),
                td,
            )?,
            addresses: self.list(&s.addresses, &format!("{at}.addresses"), cidr)?,
            not_addresses: self.nlist(&s.not_addresses, &format!("{at}.not_addresses"), cidr)?,
        })
    }

    fn operation(&self, at: &str, o: RawOperation, line: usize) -> Result<Operation, PolicyError> {
        let vacuous = o.ports.is_none()
            && o.not_ports.is_none()
            && o.protocols.is_none()
            && [
                &o.methods,
                &o.not_methods,
                &o.paths,
                &o.not_paths,
                &o.hosts,
                &o.not_hosts,
            ]
            .iter()
            .all(|f| f.is_none());
        if vacuous {
            return Err(self.err_line(
                line,
                at,
                "empty `to` entry: it would match any operation; name ports, protocols, methods, paths or hosts, or remove the entry",
            ));
        }
        let ports = |v: &Ports, field: &str| -> Result<_, PolicyError> {
            v.as_ref()
                .map(|v| {
                    self.not_empty(v.span().start, &format!("{at}.{field}"), v.get_ref(), field)?;
                    v.get_ref()
                        .iter()
                        .map(|p| {
                            u16::try_from(*p.get_ref())
                                .ok()
                                .filter(|&p| p != 0)
                                .ok_or_else(|| {
                                    self.err(
                                        p.span().start,
                                        &format!("{at}.{field}"),
                                        &format!("port {} is not in 1-65535", p.get_ref()),
                                    )
                                })
                        })
                        .collect::<Result<Vec<u16>, _>>()
                })
                .transpose()
        };
        let path = path_pattern;
        Ok(Operation {
            ports: ports(&o.ports, "ports")?,
            not_ports: ports(&o.not_ports, "not_ports")?.unwrap_or_default(),
            protocols: match o.protocols {
                None => None,
                Some(p) => {
                    self.not_empty(
                        p.span().start,
                        &format!("{at}.protocols"),
                        p.get_ref(),
                        "protocols",
                    )?;
                    Some(p.into_inner())
                }
            },
            methods: self.list(&o.methods, &format!("{at}.methods"), method)?,
            not_methods: self.nlist(&o.not_methods, &format!("{at}.not_methods"), method)?,
            paths: self.list(&o.paths, &format!("{at}.paths"), path)?,
            not_paths: self.nlist(&o.not_paths, &format!("{at}.not_paths"), path)?,
            hosts: self.list(&o.hosts, &format!("{at}.hosts"), host)?,
            not_hosts: self.nlist(&o.not_hosts, &format!("{at}.not_hosts"), host)?,
        })
    }

    fn condition(&self, at: &str, c: RawCondition, line: usize) -> Result<Condition, PolicyError> {
        let key = c.key.get_ref().trim();
        let header = key
            .strip_prefix("request.headers[")
            .and_then(|k| k.strip_suffix(']'))
            .filter(|h| !h.is_empty() && h.bytes().all(is_tchar))
            .ok_or_else(|| {
                self.err(
                    c.key.span().start,
                    &format!("{at}.key"),
                    &format!(
                        "unsupported condition key {key:?}: the supported form is \"request.headers[<name>]\""
                    ),
                )
            })?;
        if c.values.is_none() && c.not_values.is_none() {
            return Err(self.err_line(line, at, "a condition needs `values` or `not_values`"));
        }
        let val = |v: &str| Ok(Pattern::parse(v));
        Ok(Condition {
            key: key.to_string(),
            header: header.to_ascii_lowercase(),
            values: self.list(&c.values, &format!("{at}.values"), val)?,
            not_values: self.nlist(&c.not_values, &format!("{at}.not_values"), val)?,
        })
    }

    /// Converts a positive list field, keeping `None` (absent) apart from `[]`.
    fn list<T>(
        &self,
        v: &Strings,
        field: &str,
        f: impl Fn(&str) -> Result<T, String>,
    ) -> Result<Option<Vec<T>>, PolicyError> {
        v.as_ref()
            .map(|v| {
                let name = field.rsplit('.').next().unwrap_or(field);
                self.not_empty(v.span().start, field, v.get_ref(), name)?;
                v.get_ref()
                    .iter()
                    .map(|s| {
                        f(s.get_ref()).map_err(|m| {
                            self.err(s.span().start, field, &format!("{:?}: {m}", s.get_ref()))
                        })
                    })
                    .collect()
            })
            .transpose()
    }

    /// Refuses a list written empty (`identities = []`): a positive one would match
    /// nothing (a deny rule that silently denies nothing), a `not_*` one excludes
    /// nothing; either way the file does not say what its author meant.
    fn not_empty<T>(
        &self,
        offset: usize,
        field: &str,
        v: &[T],
        name: &str,
    ) -> Result<(), PolicyError> {
        if !v.is_empty() {
            return Ok(());
        }
        let what = if name.starts_with("not_") {
            "it excludes nothing"
        } else {
            "it would match nothing"
        };
        Err(self.err(
            offset,
            field,
            &format!("empty list: {what}; write the values, or leave `{name}` out"),
        ))
    }

    /// Converts an array of tables (`from`, `to`, `when`), each entry by `f` with its
    /// line; `[]` written out is an error (Istio reads it as absent, which for `from`
    /// means any source).
    fn tables<R, T>(
        &self,
        v: Tables<R>,
        field: &str,
        hint: &str,
        mut f: impl FnMut(usize, R, usize) -> Result<T, PolicyError>,
    ) -> Result<Vec<T>, PolicyError> {
        let Some(v) = v else {
            return Ok(Vec::new());
        };
        if v.get_ref().is_empty() {
            return Err(self.err(v.span().start, field, &format!("empty list: {hint}")));
        }
        let mut out = Vec::with_capacity(v.get_ref().len());
        for (i, entry) in v.into_inner().into_iter().enumerate() {
            let line = self.line(entry.span().start);
            out.push(f(i, entry.into_inner(), line)?);
        }
        Ok(out)
    }

    /// Converts a `not_*` list field (absent = empty).
    fn nlist<T>(
        &self,
        v: &Strings,
        field: &str,
        f: impl Fn(&str) -> Result<T, String>,
    ) -> Result<Vec<T>, PolicyError> {
        Ok(self.list(v, field, f)?.unwrap_or_default())
    }

    fn test(
        &self,
        ti: usize,
        rt: RawTest,
        line: usize,
        policies: &HashMap<String, usize>,
    ) -> Result<TestCase, PolicyError> {
        let at = format!("test[{ti}]");
        let f = |name: &str| format!("{at}.{name}");
        let id = |v: &Option<Spanned<String>>, name: &str| -> Result<Option<String>, PolicyError> {
            match v {
                None => Ok(None),
                Some(s) => {
                    ident::check_id(s.get_ref()).map_err(|m| {
                        self.err(s.span().start, &f(name), &format!("{:?}: {m}", s.get_ref()))
                    })?;
                    Ok(Some(s.get_ref().clone()))
                }
            }
        };
        let addr =
            |v: &Option<Spanned<String>>, name: &str| -> Result<Option<IpAddr>, PolicyError> {
                match v {
                    None => Ok(None),
                    Some(s) => s.get_ref().parse().map(Some).map_err(|_| {
                        self.err(
                            s.span().start,
                            &f(name),
                            &format!("{:?} is not an IP address", s.get_ref()),
                        )
                    }),
                }
            };
        let proto = rt.proto.unwrap_or(Protocol::Tcp);
        let to_port = match &rt.to_port {
            Some(p) => u16::try_from(*p.get_ref())
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| {
                    self.err(
                        p.span().start,
                        &f("to_port"),
                        &format!("port {} is not in 1-65535", p.get_ref()),
                    )
                })?,
            None if proto == Protocol::Icmp => 0,
            None => return Err(self.err_line(line, &f("to_port"), "missing field `to_port`")),
        };
        let has_http =
            rt.method.is_some() || rt.path.is_some() || rt.host.is_some() || !rt.headers.is_empty();
        let http = if has_http {
            let mut headers = Vec::new();
            for h in &rt.headers {
                headers.push(
                    parse_header(h.get_ref())
                        .map_err(|e| self.err(h.span().start, &f("headers"), &e.to_string()))?,
                );
            }
            let path = rt
                .path
                .as_ref()
                .map_or_else(|| "/".to_string(), |p| p.get_ref().clone());
            Some(HttpSpec {
                method: rt.method.clone().unwrap_or_else(|| "GET".to_string()),
                path,
                host: rt.host.clone(),
                headers,
            })
        } else {
            None
        };
        let request = RequestSpec {
            from: id(&rt.from, "from")?,
            from_groups: rt.from_groups,
            from_address: addr(&rt.from_address, "from_address")?,
            workload: id(&rt.workload, "workload")?,
            workload_groups: rt.workload_groups,
            to_address: addr(&rt.to_address, "to_address")?,
            to_port,
            proto,
            http,
        };
        request
            .check()
            .map_err(|e| self.err_line(line, &at, &e.to_string()))?;
        let allow = match rt.expect.get_ref().as_str() {
            "allow" => true,
            "deny" => false,
            other => {
                return Err(self.err(
                    rt.expect.span().start,
                    &f("expect"),
                    &format!("expected \"allow\" or \"deny\", got {other:?}"),
                ))
            }
        };
        if let Some(p) = &rt.expect_policy {
            if !policies.contains_key(p) {
                return Err(self.err_line(
                    line,
                    &f("expect_policy"),
                    &format!("no policy named {p:?} in this file"),
                ));
            }
        }
        const REASONS: [&str; 7] = [
            "explicit_deny",
            "no_allow_matched",
            "default_deny",
            "allow_matched",
            "default_allow",
            "malformed_request",
            "not_http",
        ];
        if let Some(r) = &rt.expect_reason {
            if !REASONS.contains(&r.get_ref().as_str()) {
                return Err(self.err(
                    r.span().start,
                    &f("expect_reason"),
                    &format!(
                        "unknown reason {:?}; one of {}",
                        r.get_ref(),
                        REASONS.join(", ")
                    ),
                ));
            }
        }
        Ok(TestCase {
            name: match rt.name {
                Some(n) if n.get_ref().chars().any(char::is_control) => {
                    // Printed by `policy test` and in refusals: no terminal escapes.
                    return Err(self.err(
                        n.span().start,
                        &f("name"),
                        "a test name may not contain control characters",
                    ));
                }
                Some(n) => n.into_inner(),
                None => format!("test[{ti}]"),
            },
            line,
            request,
            expect: Expect {
                allow,
                policy: rt.expect_policy,
                rule: rt.expect_rule.map(|r| match r {
                    RuleLabel::Index(i) => i.to_string(),
                    RuleLabel::Name(n) => n,
                }),
                reason: rt.expect_reason.map(Spanned::into_inner),
            },
        })
    }
}

fn group(v: &str) -> Result<String, String> {
    if v.is_empty() || v.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("a group is a non-empty name without spaces".into());
    }
    Ok(v.to_string())
}

/// An address block or an address. The address is read by the standard library's
/// parser, as test cases' addresses are: it refuses an IPv4 octet with a leading zero
/// (`100.064.0.7`, which some tools read as octal), where `ipnet`'s own parser read
/// `100.064.0.0/16` as decimal; the prefix length is plain decimal too.
fn cidr(v: &str) -> Result<IpNet, String> {
    const BAD: &str = "not an address block (CIDR such as \"100.64.0.0/10\") or an IP address";
    let (addr, len) = match v.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (v, None),
    };
    let leading_zero = |s: &str| s.len() > 1 && s.starts_with('0');
    let addr: IpAddr = addr.parse().map_err(|_| {
        if addr.split('.').any(leading_zero) {
            format!("{BAD}: leading zeros are not allowed (they read as octal in some tools)")
        } else {
            BAD.to_string()
        }
    })?;
    let n = match len {
        None => IpNet::from(addr),
        Some(l) => {
            if l.is_empty() || !l.bytes().all(|b| b.is_ascii_digit()) || leading_zero(l) {
                return Err(BAD.into());
            }
            let l: u8 = l.parse().map_err(|_| BAD.to_string())?;
            IpNet::new(addr, l).map_err(|_| BAD.to_string())?
        }
    };
    if n.trunc() != n {
        return Err(format!(
            "address block has host bits set (did you mean {}?)",
            n.trunc()
        ));
    }
    Ok(n)
}

/// Istio's string match (exact, `prefix*`, `*suffix`, `*`), with `*` nowhere else:
/// inside a value it would be literal, and a rule that means a wildcard there would
/// match nothing (a deny that denies nothing).
fn wildcard(v: &str) -> Result<Pattern, String> {
    let p = Pattern::parse(v);
    if p.literal().contains('*') {
        return Err("`*` is a wildcard only alone, at the start or at the end".into());
    }
    Ok(p)
}

fn method(v: &str) -> Result<Pattern, String> {
    if v.is_empty() || !v.bytes().all(is_tchar) {
        return Err("an HTTP method is a token such as GET or POST".into());
    }
    wildcard(v)
}

/// A `paths` value: a template when it holds `{*}` or `{**}` (Istio 1.22+), else
/// Istio's string match; either way spelled as requests are once normalised
/// ([`http_path`]), so that `/%7Eadmin` is `/~admin` and `/admin/ü*` catches
/// `/admin/%C3%BCber`. A pattern no normalised path can match is refused.
fn path_pattern(v: &str) -> Result<PathPattern, String> {
    if v.is_empty() {
        return Err("empty path".into());
    }
    if v.contains(['?', '#']) {
        return Err(
            "paths are matched without the query or fragment: a pattern with `?` or `#` can never match"
                .into(),
        );
    }
    if PathTemplate::is_template(v) {
        return PathTemplate::parse(v, whole_segment).map(PathPattern::Template);
    }
    let p = wildcard(v).map_err(|e| {
        format!("{e} (for one path segment write `{{*}}`, for any number `{{**}}`)")
    })?;
    let starts_with_slash = || {
        if p.literal().starts_with('/') {
            Ok(())
        } else {
            Err("a normalised path starts with '/': this can never match".to_string())
        }
    };
    let p = match &p {
        Pattern::Any => Pattern::Any,
        Pattern::Exact(s) => {
            starts_with_slash()?;
            Pattern::Exact(http_path::normalize(s).map_err(never)?)
        }
        // `/a/b/cut*`: whole segments normalised as a path (dot segments resolved, a
        // trailing `/` kept), the cut last one only decoded.
        Pattern::Prefix(s) => {
            starts_with_slash()?;
            let cut = s.rfind('/').map_or(0, |i| i + 1);
            let mut out = http_path::normalize(&s[..cut]).map_err(never)?;
            http_path::normalize_segment_into(&s[cut..], &mut out).map_err(never)?;
            Pattern::Prefix(out)
        }
        // `*cut/b/c`: the cut first segment only decoded, the others whole.
        Pattern::Suffix(s) => {
            let mut out = String::with_capacity(s.len());
            let count = s.split('/').count();
            for (i, seg) in s.split('/').enumerate() {
                if i == 0 {
                    http_path::normalize_segment_into(seg, &mut out).map_err(never)?;
                    continue;
                }
                out.push('/');
                if seg.is_empty() && i + 1 < count {
                    return Err(
                        "empty segment (\"//\"): a normalised path has none, so this can never match"
                            .into(),
                    );
                }
                out.push_str(&whole_segment(seg)?);
            }
            Pattern::Suffix(out)
        }
    };
    Ok(PathPattern::Match(p))
}

/// One whole segment of a path pattern, normalised; `.` and `..` never survive
/// normalisation, so a pattern naming them can never match.
fn whole_segment(seg: &str) -> Result<String, String> {
    let mut out = String::with_capacity(seg.len());
    http_path::normalize_segment_into(seg, &mut out).map_err(never)?;
    if out == "." || out == ".." {
        return Err(format!(
            "segment {seg:?}: a normalised path has no `.` or `..` segments, so this can never match"
        ));
    }
    Ok(out)
}

/// Why a path pattern can never match: requests spelled so are refused before policy.
fn never(e: http_path::PathError) -> String {
    format!("can never match: {e}, and such requests are refused (400) before policy")
}

fn host(v: &str) -> Result<HostPattern, String> {
    if v.is_empty() {
        return Err("empty host".into());
    }
    let lower = v.to_ascii_lowercase();
    let (name, port) = if lower.starts_with('[') {
        match lower.find(']') {
            Some(i) => match lower[i + 1..].strip_prefix(':') {
                Some(p) => (&lower[..=i], Some(p)),
                None if i + 1 == lower.len() => (&lower[..], None),
                None => return Err("expected [ipv6] or [ipv6]:port".into()),
            },
            None => return Err("unterminated [ipv6] literal".into()),
        }
    } else {
        match lower.rsplit_once(':') {
            Some((n, p)) => (n, Some(p)),
            None => (&lower[..], None),
        }
    };
    let port = match port {
        None => None,
        Some(p) => Some(
            p.parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| format!("port {p:?} is not in 1-65535"))?,
        ),
    };
    if name.is_empty() {
        return Err("empty host name".into());
    }
    if name.bytes().any(|b| b.is_ascii_whitespace() || b == b'/') {
        return Err("a host may not contain spaces or '/'".into());
    }
    Ok(HostPattern {
        name: wildcard(name)?,
        port,
    })
}

#[cfg(test)]
mod tests {
    use super::Lines;

    /// [`Lines`] gives what the definitions it replaces gave: the line is one more
    /// than the newlines before the offset, the text is `str::lines`' item.
    #[test]
    fn lines_agree_with_counting_from_the_start() {
        for src in [
            "",
            "\n",
            "a",
            "a\n",
            "a\nb",
            "a\n\nb\n",
            "x = 1\r\ny = 2\r\n",
            "x = 1\r\ny\r",
            "\r\n\r\n",
            "é = \"ü\"\n→\n",
        ] {
            let lines = Lines::new(src);
            for offset in 0..src.len() + 3 {
                let want = src.as_bytes()[..offset.min(src.len())]
                    .iter()
                    .filter(|&&b| b == b'\n')
                    .count()
                    + 1;
                assert_eq!(lines.line(offset), want, "{src:?} at {offset}");
            }
            for line in 1..src.len() + 3 {
                let want = src.lines().nth(line - 1).unwrap_or("");
                assert_eq!(lines.text(line), want, "{src:?} line {line}");
            }
            assert_eq!(lines.text(0), "");
        }
    }
}
