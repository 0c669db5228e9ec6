//! The checked policy model: what a policy file means once it has been parsed and
//! validated. Every value here is valid by construction (identities, CIDRs, patterns,
//! header names), so the compiler and evaluator never see raw input.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// What a policy does when one of its rules matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
    /// Recorded in the decision log; never changes the decision.
    Audit,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
            Action::Audit => "audit",
        }
    }
}

/// The mesh default, used when no policy decides (`[policy] default` in meshd.toml).
/// Deny is the recommended default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DefaultAction {
    #[default]
    Deny,
    Allow,
}

impl DefaultAction {
    /// As in meshd.toml and on the wire: `deny` or `allow`.
    pub fn as_str(self) -> &'static str {
        match self {
            DefaultAction::Deny => "deny",
            DefaultAction::Allow => "allow",
        }
    }
}

/// Transport protocol of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    Icmp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Icmp => "icmp",
        }
    }

    pub fn parse(s: &str) -> Option<Protocol> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Some(Protocol::Tcp),
            "udp" => Some(Protocol::Udp),
            "icmp" => Some(Protocol::Icmp),
            _ => None,
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string pattern with Istio's wildcard forms: exact, `prefix*`, `*suffix`, or `*`.
/// A `*` anywhere else is literal (validation warns about it).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Pattern {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Any,
}

impl Pattern {
    /// Reads `*`, `abc*`, `*abc` or `abc`. Case is kept; callers lowercase when the
    /// field is case-insensitive.
    pub fn parse(s: &str) -> Pattern {
        if s == "*" {
            Pattern::Any
        } else if let Some(rest) = s.strip_prefix('*') {
            Pattern::Suffix(rest.to_string())
        } else if let Some(rest) = s.strip_suffix('*') {
            Pattern::Prefix(rest.to_string())
        } else {
            Pattern::Exact(s.to_string())
        }
    }

    /// Case-sensitive match on bytes.
    pub fn matches(&self, v: &[u8]) -> bool {
        match self {
            Pattern::Exact(p) => v == p.as_bytes(),
            Pattern::Prefix(p) => v.starts_with(p.as_bytes()),
            Pattern::Suffix(p) => v.ends_with(p.as_bytes()),
            Pattern::Any => true,
        }
    }

    /// ASCII case-insensitive match; the pattern is stored lowercase.
    pub fn matches_ignore_case(&self, v: &[u8]) -> bool {
        match self {
            Pattern::Exact(p) => v.eq_ignore_ascii_case(p.as_bytes()),
            Pattern::Prefix(p) => {
                v.len() >= p.len() && v[..p.len()].eq_ignore_ascii_case(p.as_bytes())
            }
            Pattern::Suffix(p) => {
                v.len() >= p.len() && v[v.len() - p.len()..].eq_ignore_ascii_case(p.as_bytes())
            }
            Pattern::Any => true,
        }
    }

    /// Matches the values of a header as Envoy does when it is sent more than once:
    /// joined by `,` into one value (`x: 1` and `x: 2` read `1,2`), without building
    /// the joined string. No values (the header is absent): no match, not even `*`.
    pub fn matches_joined<'a, I>(&self, values: I) -> bool
    where
        I: DoubleEndedIterator<Item = &'a [u8]> + Clone,
    {
        if values.clone().next().is_none() {
            return false;
        }
        // The joined bytes, forwards and backwards.
        let forwards = values
            .clone()
            .enumerate()
            .flat_map(|(i, v)| (i > 0).then_some(b',').into_iter().chain(v.iter().copied()));
        let mut backwards = values.rev().enumerate().flat_map(|(i, v)| {
            (i > 0)
                .then_some(b',')
                .into_iter()
                .chain(v.iter().rev().copied())
        });
        match self {
            Pattern::Exact(p) => forwards.eq(p.bytes()),
            Pattern::Prefix(p) => {
                let mut forwards = forwards;
                p.bytes().all(|b| forwards.next() == Some(b))
            }
            Pattern::Suffix(p) => p.bytes().rev().all(|b| backwards.next() == Some(b)),
            Pattern::Any => true,
        }
    }

    /// The literal part (without the wildcard).
    pub fn literal(&self) -> &str {
        match self {
            Pattern::Exact(p) | Pattern::Prefix(p) | Pattern::Suffix(p) => p,
            Pattern::Any => "",
        }
    }
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pattern::Exact(p) => write!(f, "{p}"),
            Pattern::Prefix(p) => write!(f, "{p}*"),
            Pattern::Suffix(p) => write!(f, "*{p}"),
            Pattern::Any => f.write_str("*"),
        }
    }
}

/// A path pattern: Istio's string match ([`Pattern`]: exact, `prefix*`, `*suffix`, `*`)
/// or, when it holds `{*}` or `{**}`, a path template (Istio 1.22+, which hands it to
/// Envoy's URI template matcher).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PathPattern {
    Match(Pattern),
    Template(PathTemplate),
}

impl PathPattern {
    /// Matches a normalised path (`http_path::normalize`).
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathPattern::Match(p) => p.matches(path.as_bytes()),
            PathPattern::Template(t) => t.matches(path),
        }
    }
}

impl std::fmt::Display for PathPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PathPattern::Match(p) => p.fmt(f),
            PathPattern::Template(t) => t.fmt(f),
        }
    }
}

/// A path template, as Istio's `paths` reads one (AuthorizationPolicy `Operation.paths`,
/// Istio 1.22+) and Envoy matches it (`extensions.path.match.uri_template`, which turns
/// it into a regular expression): `/` then segments joined by `/`, where
/// - `{*}` is one whole segment, at least one character, no `/` (Envoy: `[pchar]+`);
/// - `{**}` is any text, `/` included, possibly empty (Envoy: `[pchar/]*`), so
///   `/a/{**}` matches `/a/` and `/a/b/c` but not `/a`; it is the last operator
///   (literal segments may follow it: `/a/{**}/b`);
/// - any other segment is literal; a template ending in `/` ends with an empty one.
///
/// An operator shares its segment with nothing (`/a/{*}.txt` is refused), and `*`,
/// `{`, `}` appear nowhere else, as Istio requires.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PathTemplate {
    segments: Vec<TemplateSegment>,
    /// Position of the `{**}` segment, if any.
    many: Option<usize>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum TemplateSegment {
    Literal(String),
    /// `{*}`
    One,
    /// `{**}`
    Many,
}

impl TemplateSegment {
    fn matches(&self, seg: &str) -> bool {
        match self {
            TemplateSegment::Literal(l) => seg == l,
            TemplateSegment::One => !seg.is_empty(),
            TemplateSegment::Many => true,
        }
    }
}

impl PathTemplate {
    /// True if `s` is meant as a template (holds `{*}` or `{**}`).
    pub fn is_template(s: &str) -> bool {
        s.contains("{*}") || s.contains("{**}")
    }

    /// Reads a template by the rules in the type's doc; `literal` checks (and may
    /// rewrite) each literal segment. The error says what is wrong.
    pub fn parse(
        s: &str,
        mut literal: impl FnMut(&str) -> Result<String, String>,
    ) -> Result<PathTemplate, String> {
        let rest = s
            .strip_prefix('/')
            .ok_or("a path template starts with '/'")?;
        let mut segments = Vec::new();
        let mut many = None;
        let count = rest.split('/').count();
        for (i, seg) in rest.split('/').enumerate() {
            let part = match seg {
                "{*}" => TemplateSegment::One,
                "{**}" => TemplateSegment::Many,
                _ if seg.contains(['*', '{', '}']) => {
                    return Err(format!(
                        "segment {seg:?}: in a path template `*`, `{{` and `}}` may appear only as a whole segment `{{*}}` or `{{**}}`"
                    ))
                }
                "" if i + 1 < count => {
                    return Err(
                        "empty segment (\"//\"): a normalised path has none, so this can never match"
                            .into(),
                    )
                }
                _ => TemplateSegment::Literal(literal(seg)?),
            };
            let operator = matches!(part, TemplateSegment::One | TemplateSegment::Many);
            if operator && many.is_some() {
                return Err("`{**}` must be the last operator of a path template".into());
            }
            if part == TemplateSegment::Many {
                many = Some(segments.len());
            }
            segments.push(part);
        }
        Ok(PathTemplate { segments, many })
    }

    /// Matches a normalised path. Allocation-free: the path is split in place.
    pub fn matches(&self, path: &str) -> bool {
        let Some(rest) = path.strip_prefix('/') else {
            // `*` (asterisk-form) is not a path.
            return false;
        };
        match self.many {
            None => {
                let mut parts = rest.split('/');
                self.segments
                    .iter()
                    .all(|t| parts.next().is_some_and(|p| t.matches(p)))
                    && parts.next().is_none()
            }
            // `{**}` takes whatever the segments before it (from the front) and after
            // it (from the back) leave, `/` included; it may be empty, so the path has
            // at least as many `/`-separated parts as the template has segments.
            Some(k) => {
                if rest.split('/').count() < self.segments.len() {
                    return false;
                }
                let mut front = rest.split('/');
                let mut back = rest.rsplit('/');
                self.segments[..k]
                    .iter()
                    .all(|t| front.next().is_some_and(|p| t.matches(p)))
                    && self.segments[k + 1..]
                        .iter()
                        .rev()
                        .all(|t| back.next().is_some_and(|p| t.matches(p)))
            }
        }
    }
}

impl std::fmt::Display for PathTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for seg in &self.segments {
            f.write_str("/")?;
            match seg {
                TemplateSegment::Literal(l) => f.write_str(l)?,
                TemplateSegment::One => f.write_str("{*}")?,
                TemplateSegment::Many => f.write_str("{**}")?,
            }
        }
        Ok(())
    }
}

/// A Host pattern: a hostname pattern (lowercase, wildcards as [`Pattern`]) and an
/// optional port. Without a port it matches the host with any port or none; with a
/// port, only that port, where a Host header without a port means port 80 (RFC 9110
/// §4.2.1: the scheme's default; only plain HTTP is inspected).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HostPattern {
    pub name: Pattern,
    pub port: Option<u16>,
}

impl HostPattern {
    /// Matches a Host header value (`name`, `name:port`, `[v6]`, `[v6]:port`),
    /// case-insensitively.
    pub fn matches(&self, host: &str) -> bool {
        let (name, port) = split_host_port(host);
        if let Some(want) = self.port {
            if port.unwrap_or(80) != want {
                return false;
            }
        }
        self.name.matches_ignore_case(name.as_bytes())
    }
}

impl std::fmt::Display for HostPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.port {
            Some(p) => write!(f, "{}:{p}", self.name),
            None => write!(f, "{}", self.name),
        }
    }
}

/// Splits `host[:port]` (RFC 9110 §7.2 Host = uri-host [ ":" port ]). A bracketed
/// IPv6 literal keeps its brackets; an unparseable port leaves the whole value as
/// the name (so it matches no pattern that names a port).
pub(crate) fn split_host_port(host: &str) -> (&str, Option<u16>) {
    let cut = if host.starts_with('[') {
        host.find("]:").map(|i| i + 1)
    } else {
        host.rfind(':')
    };
    match cut {
        Some(i) => match host[i + 1..].parse::<u16>() {
            Ok(p) => (&host[..i], Some(p)),
            Err(_) => (host, None),
        },
        None => (host, None),
    }
}

/// A checked policy file: policies in file order, then the file's test cases.
#[derive(Clone, Debug, Default)]
pub struct PolicySet {
    /// Name the set was loaded from (file name), used in messages.
    pub source: String,
    pub policies: Vec<Policy>,
    pub tests: Vec<crate::policy::cases::TestCase>,
}

/// One `[[policy]]`.
#[derive(Clone, Debug)]
pub struct Policy {
    pub name: String,
    pub action: Action,
    /// Which local workloads the policy applies to; `None` = all.
    pub selector: Option<Selector>,
    /// Istio semantics: a policy with no rules matches nothing (an allow policy with
    /// no rules therefore denies everything it selects); an empty rule matches
    /// everything.
    pub rules: Vec<Rule>,
    /// 1-based line of the `[[policy]]` table.
    pub line: usize,
}

/// Local workloads a policy applies to. Fields AND, values within a field OR.
///
/// In every matcher here, a positive field is `None` when absent (no constraint) and
/// never empty (the parser refuses `[]`; an empty one would match nothing); a `not_*`
/// field excludes what it lists.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Selector {
    pub identities: Option<Vec<Pattern>>,
    pub groups: Option<Vec<String>>,
}

/// One `[[policy.rule]]`: matches when any `from` entry matches (or there are none),
/// any `to` entry matches (or there are none), and every `when` condition holds.
#[derive(Clone, Debug, Default)]
pub struct Rule {
    pub name: Option<String>,
    pub from: Vec<Source>,
    pub to: Vec<Operation>,
    pub when: Vec<Condition>,
    pub line: usize,
}

impl Rule {
    /// True if the rule needs HTTP attributes (methods, paths, hosts, headers).
    pub fn is_l7(&self) -> bool {
        !self.when.is_empty() || self.to.iter().any(Operation::is_l7)
    }
}

/// One `from` entry. Fields AND; values within a field OR; `not_*` fields match
/// when no listed value matches.
#[derive(Clone, Debug, Default)]
pub struct Source {
    pub identities: Option<Vec<Pattern>>,
    pub not_identities: Vec<Pattern>,
    pub groups: Option<Vec<String>>,
    pub not_groups: Vec<String>,
    pub trust_domains: Option<Vec<String>>,
    pub not_trust_domains: Vec<String>,
    pub addresses: Option<Vec<IpNet>>,
    pub not_addresses: Vec<IpNet>,
}

/// One `to` entry. Fields AND; values within a field OR.
#[derive(Clone, Debug, Default)]
pub struct Operation {
    pub ports: Option<Vec<u16>>,
    pub not_ports: Vec<u16>,
    pub protocols: Option<Vec<Protocol>>,
    /// Case-sensitive (RFC 9110 §9.1), with Istio's wildcards: `methods = ["*"]` is
    /// every method.
    pub methods: Option<Vec<Pattern>>,
    pub not_methods: Vec<Pattern>,
    pub paths: Option<Vec<PathPattern>>,
    pub not_paths: Vec<PathPattern>,
    pub hosts: Option<Vec<HostPattern>>,
    pub not_hosts: Vec<HostPattern>,
}

impl Operation {
    /// True if `protocols` admits `p` (an absent field admits every protocol).
    pub fn allows(&self, p: Protocol) -> bool {
        match &self.protocols {
            None => true,
            Some(list) => list.contains(&p),
        }
    }

    /// True if matching needs HTTP attributes.
    pub fn is_l7(&self) -> bool {
        self.methods.is_some()
            || self.paths.is_some()
            || self.hosts.is_some()
            || !self.not_methods.is_empty()
            || !self.not_paths.is_empty()
            || !self.not_hosts.is_empty()
    }
}

/// One `when` condition on an HTTP request header. Holds when some value of the
/// header matches `values` (if given) and no value matches `not_values`.
#[derive(Clone, Debug, Default)]
pub struct Condition {
    /// The condition key as written, `request.headers[name]`.
    pub key: String,
    /// Header name, lowercase.
    pub header: String,
    pub values: Option<Vec<Pattern>>,
    pub not_values: Vec<Pattern>,
}
