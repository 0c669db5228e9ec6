//! The compiled form: the checked [`PolicySet`] plus an index per action, so that
//! evaluation looks only at rules that could match the request's receiving workload,
//! destination port and source identity (as nebula's firewall compiles rules into a
//! lookup tree).
//!
//! Index shape, per action: receiving workload → destination port → source identity
//! → rules. A policy's rules are filed under the workload keys of its selector (see
//! below). Within that, a rule is filed under each port it names when every `to`
//! entry names ports, else under "any port". Within that, a rule is filed under the
//! identity keys of its `from` entries when every entry constrains the source
//! identity, else under "any source". An entry constrains the identity through
//! `identities` without `*` (exact IDs, `prefix*`, `*suffix`), else through
//! `trust_domains` (trust domain `td` is the exact key `spiffe://td` plus the prefix
//! key `spiffe://td/`).
//! Negations (`not_identities`, ...) only narrow what an entry matches, so they
//! neither make a rule indexable nor stop it being filed under its positive keys.
//! (The parser refuses `identities = []`; an empty list would add no key.)
//!
//! Identity keys, per (action, workload key, port) bucket:
//! - exact IDs: a hash map, one lookup;
//! - prefixes: a hash map from the prefix to its rules, plus the sorted set of
//!   distinct prefix lengths. A request looks up its identity cut at each of those
//!   lengths (no longer than the identity), so it visits only the rules whose
//!   prefix is a prefix of its identity. The number of lookups is the number of
//!   distinct prefix lengths, at most the identity's length and in practice a
//!   handful (prefixes are written per trust domain or path segment), never the
//!   number of rules. A byte trie would bound the work by the identity's length
//!   alone but costs a node per byte of every prefix; a sorted list searched by
//!   binary search grows with the number of prefixes. The map keeps the exact-ID
//!   path's lookup cost and adds nothing when a bucket holds no prefixes;
//! - suffixes: the same, keyed by suffix and cutting the identity from its end;
//! - `*`, and rules that do not constrain the identity: one "any source" list,
//!   which every request with that port visits.
//!
//! Workload keys, from a policy's selector (which must hold for any of its rules to
//! match, and for an allow policy to make the workload default-deny). Selector
//! fields AND, so a selector is filed under the keys of one field, the one likely
//! to pick fewest workloads:
//! - `identities` naming only exact IDs: each ID;
//! - else `groups`: each group (a hash map, one lookup per group of the workload);
//! - else `identities` without `*`: exact IDs, prefixes and suffixes, looked up as
//!   for sources (prefix and suffix tables with their distinct lengths);
//! - else (no selector, an empty one, or `identities` with `*` and no `groups`):
//!   "any workload", which every request visits.
//!
//! (The parser refuses a written `[]`, which would add no key.) The
//! key is a necessary condition only; each candidate is still checked against its
//! whole selector (`selector_mismatch`), so a selector naming both identities and
//! groups costs its groups check only when its identity key (or group) matched. The
//! same workload index, holding selector numbers, answers "does any allow policy
//! select this workload" (step 2 of the evaluation order) without scanning every
//! allow policy.
//!
//! Every list is in file order (by [`RuleRef`]). A lookup visits several lists
//! (per matching workload key and port bucket: the exact list, each matching prefix
//! and suffix list, the any-source list); the first match in file order is the
//! least matching [`RuleRef`] over all of them, found by stopping each list at the
//! best so far. One rule may sit in several visited lists (say under `spiffe://t/a*`
//! and `*/b`, both matching `spiffe://t/a/b`, as a source or as the workload), so a
//! visitor that collects matches (audit) removes repeats.

use std::collections::{HashMap, HashSet};

use super::eval::{rule_matches_leniency, selector_mismatch, HttpAbsent, RuleRef};
use super::model::{Action, DefaultAction, Pattern, PolicySet, Protocol, Rule, Selector};
use super::request::Request;

/// A policy set ready for evaluation. Immutable; the daemon swaps whole values.
#[derive(Debug)]
pub struct CompiledPolicy {
    set: PolicySet,
    default: DefaultAction,
    deny: ActionIndex,
    allow: ActionIndex,
    audit: ActionIndex,
    /// Distinct selectors of allow policies; `None` = an allow policy selecting all.
    allow_selectors: Vec<Option<Selector>>,
    /// Positions in `allow_selectors`, by the workload keys of each selector.
    allow_by_workload: WorkloadIndex<Vec<u32>>,
    /// Where HTTP is inspected; see [`CompiledPolicy::inspects`].
    inspect: Inspection,
    /// First dense rule slot of each policy, then the total.
    slot_base: Vec<usize>,
}

/// The ports inspected at layer 7, per receiving workload: each port named by a
/// layer-7 `to` entry (one with methods, paths or hosts, or in a rule with header
/// conditions) of an allow or deny rule, filed under the workload keys of the rule's
/// policy, with the policy (whose whole selector is checked on lookup). Audit rules
/// never make a port inspected: auditing must not change a decision.
#[derive(Debug, Default)]
struct Inspection {
    /// Every port inspected for some workload: most requests go to other ports and
    /// are answered by this one lookup.
    ports: HashSet<u16>,
    by_workload: WorkloadIndex<HashMap<u16, PortPolicies>>,
}

/// The policies that make one port inspected (`http`), and those (with HTTP rules or
/// not) with a rule naming the port and udp (`udp`), which lets UDP there be decided
/// by policy.
#[derive(Debug, Default)]
struct PortPolicies {
    http: Vec<u32>,
    udp: Vec<u32>,
}

impl Inspection {
    /// Files policy `pi`'s inspected ports (and its ports named with udp).
    fn add(&mut self, pi: u32, keys: &[WorkloadKey], rules: &[Rule]) {
        let mut http = Vec::new();
        let mut udp = Vec::new();
        for rule in rules {
            for op in &rule.to {
                let Some(ports) = &op.ports else {
                    // The parser refuses layer-7 entries without ports.
                    continue;
                };
                let named = ports.iter().copied().filter(|p| !op.not_ports.contains(p));
                let l7 = op.is_l7() || !rule.when.is_empty();
                if l7 && op.allows(Protocol::Tcp) {
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
        for list in [&mut http, &mut udp] {
            list.sort_unstable();
            list.dedup();
        }
        // A policy without HTTP rules still files the ports it names with udp: UDP
        // there was thought of, whichever policy inspects the port for TCP.
        if http.is_empty() && udp.is_empty() {
            return;
        }
        self.ports.extend(http.iter().copied());
        for key in keys {
            let by_port = self.by_workload.slot(key.clone());
            for &port in &http {
                by_port.entry(port).or_default().http.push(pi);
            }
            for &port in &udp {
                by_port.entry(port).or_default().udp.push(pi);
            }
        }
    }
}

/// Rules of one action, by the receiving workload, then port, then source.
type ActionIndex = WorkloadIndex<PortIndex>;

/// Values (rule indexes, selector numbers) filed under the workload keys of a
/// selector; see the module doc for which keys a selector gets.
#[derive(Debug, Default)]
struct WorkloadIndex<T> {
    by_identity: HashMap<Box<str>, T>,
    by_prefix: AffixIndex<T>,
    by_suffix: AffixIndex<T>,
    by_group: HashMap<Box<str>, T>,
    any_workload: T,
}

impl<T: Default> WorkloadIndex<T> {
    /// The value filed under `key`, created empty if new.
    fn slot(&mut self, key: WorkloadKey) -> &mut T {
        match key {
            WorkloadKey::Identity(IdKey::Exact(id)) => {
                self.by_identity.entry(id.into()).or_default()
            }
            WorkloadKey::Identity(IdKey::Prefix(p)) => self.by_prefix.slot(p),
            WorkloadKey::Identity(IdKey::Suffix(s)) => self.by_suffix.slot(s),
            WorkloadKey::Group(g) => self.by_group.entry(g.into()).or_default(),
            WorkloadKey::Any => &mut self.any_workload,
        }
    }
}

impl<T> WorkloadIndex<T> {
    /// Calls `f` with every value filed under a key that the workload with identity
    /// `id` and `groups` matches: its exact ID, each prefix and suffix of it, each
    /// of its groups, and "any workload". A workload without an identity matches no
    /// identity key (no identity selector picks it). Repeated groups visit twice.
    fn for_each_match<'a>(
        &'a self,
        id: Option<&str>,
        groups: &[String],
        f: &mut impl FnMut(&'a T),
    ) {
        if let Some(id) = id {
            if let Some(v) = self.by_identity.get(id) {
                f(v);
            }
            self.by_prefix.for_each_match(id, End::Start, f);
            self.by_suffix.for_each_match(id, End::End, f);
        }
        if !self.by_group.is_empty() {
            for g in groups {
                if let Some(v) = self.by_group.get(g.as_str()) {
                    f(v);
                }
            }
        }
        f(&self.any_workload);
    }
}

/// A key a selector is filed under.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum WorkloadKey {
    Identity(IdKey),
    Group(String),
    Any,
}

/// The workload keys of a policy's selector (`None` = no selector), without
/// repeats; empty for a selector that picks no workload. Any workload the selector
/// picks matches one of the keys: every field of a selector must match.
fn workload_keys(sel: Option<&Selector>) -> Vec<WorkloadKey> {
    let Some(sel) = sel else {
        return vec![WorkloadKey::Any];
    };
    let ids = sel
        .identities
        .as_ref()
        .filter(|ids| !ids.contains(&Pattern::Any));
    let id_key = |p: &Pattern| {
        WorkloadKey::Identity(match p {
            Pattern::Exact(id) => IdKey::Exact(id.clone()),
            Pattern::Prefix(p) => IdKey::Prefix(p.clone()),
            Pattern::Suffix(s) => IdKey::Suffix(s.clone()),
            // Filtered out above; "any workload" would be right anyway.
            Pattern::Any => return WorkloadKey::Any,
        })
    };
    let exact_only = ids.is_some_and(|ids| ids.iter().all(|p| matches!(p, Pattern::Exact(_))));
    let mut keys: Vec<WorkloadKey> = match (ids, &sel.groups) {
        (Some(ids), _) if exact_only => ids.iter().map(id_key).collect(),
        (_, Some(groups)) => groups.iter().cloned().map(WorkloadKey::Group).collect(),
        (Some(ids), None) => ids.iter().map(id_key).collect(),
        (None, None) => vec![WorkloadKey::Any],
    };
    keys.sort_unstable();
    keys.dedup();
    keys
}

/// Rules of one action and workload key, by destination port, then source.
#[derive(Debug, Default)]
struct PortIndex {
    by_port: HashMap<u16, SourceIndex>,
    any_port: SourceIndex,
}

impl PortIndex {
    fn insert(&mut self, rule: &Rule, r: RuleRef) {
        match rule_ports(rule) {
            Some(ports) => {
                for port in ports {
                    self.by_port.entry(port).or_default().insert(rule, r);
                }
            }
            None => self.any_port.insert(rule, r),
        }
    }

    /// Calls `f` with each candidate list for a request: those of the request's
    /// port (never for ICMP, which has none), then those of "any port".
    fn for_each_list<'a>(&'a self, req: &Request<'_>, f: &mut impl FnMut(&'a [RuleRef])) {
        if req.protocol != Protocol::Icmp {
            if let Some(s) = self.by_port.get(&req.dst_port) {
                s.for_each_list(req.src_identity, f);
            }
        }
        self.any_port.for_each_list(req.src_identity, f);
    }
}

/// Rule lists are in file order (by [`RuleRef`]), so the first match is the
/// deciding one.
#[derive(Debug, Default)]
struct SourceIndex {
    by_identity: HashMap<Box<str>, Vec<RuleRef>>,
    by_prefix: AffixIndex<Vec<RuleRef>>,
    by_suffix: AffixIndex<Vec<RuleRef>>,
    any_source: Vec<RuleRef>,
}

impl SourceIndex {
    fn insert(&mut self, rule: &Rule, r: RuleRef) {
        match identity_keys(rule) {
            Some(keys) => {
                for key in keys {
                    match key {
                        IdKey::Exact(id) => {
                            push_once(self.by_identity.entry(id.into()).or_default(), r)
                        }
                        IdKey::Prefix(p) => push_once(self.by_prefix.slot(p), r),
                        IdKey::Suffix(s) => push_once(self.by_suffix.slot(s), r),
                    }
                }
            }
            None => self.any_source.push(r),
        }
    }

    /// Calls `f` with every list that may hold a rule matching a source with
    /// identity `id`: for no identity, only the any-source list.
    fn for_each_list<'a>(&'a self, id: Option<&str>, f: &mut impl FnMut(&'a [RuleRef])) {
        if let Some(id) = id {
            if let Some(list) = self.by_identity.get(id) {
                f(list);
            }
            self.by_prefix
                .for_each_match(id, End::Start, &mut |l: &'a Vec<RuleRef>| f(l));
            self.by_suffix
                .for_each_match(id, End::End, &mut |l: &'a Vec<RuleRef>| f(l));
        }
        if !self.any_source.is_empty() {
            f(&self.any_source);
        }
    }
}

/// Appends `r` unless it is already last (a rule naming one key twice).
fn push_once(list: &mut Vec<RuleRef>, r: RuleRef) {
    if list.last() != Some(&r) {
        list.push(r);
    }
}

/// Which end of the identity an [`AffixIndex`] matches.
#[derive(Clone, Copy)]
enum End {
    Start,
    End,
}

/// Values (rule lists, selector numbers) filed under identity prefixes (or
/// suffixes), by the pattern's literal.
#[derive(Debug)]
struct AffixIndex<T> {
    by_literal: HashMap<Box<str>, T>,
    /// The distinct literal lengths, ascending.
    lens: Vec<usize>,
}

impl<T> Default for AffixIndex<T> {
    fn default() -> Self {
        AffixIndex {
            by_literal: HashMap::new(),
            lens: Vec::new(),
        }
    }
}

impl<T: Default> AffixIndex<T> {
    /// The value filed under `literal`, created empty if new.
    fn slot(&mut self, literal: String) -> &mut T {
        if let Err(i) = self.lens.binary_search(&literal.len()) {
            self.lens.insert(i, literal.len());
        }
        self.by_literal.entry(literal.into()).or_default()
    }
}

impl<T> AffixIndex<T> {
    /// Calls `f` with the value of each literal that `id` starts (or ends) with.
    fn for_each_match<'a>(&'a self, id: &str, end: End, f: &mut impl FnMut(&'a T)) {
        for &len in &self.lens {
            if len > id.len() {
                break;
            }
            // `get` is `None` off a character boundary, where no literal can match.
            let part = match end {
                End::Start => id.get(..len),
                End::End => id.get(id.len() - len..),
            };
            if let Some(list) = part.and_then(|p| self.by_literal.get(p)) {
                f(list);
            }
        }
    }
}

/// A key a rule (or selector) is filed under: an identity pattern other than `*`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum IdKey {
    Exact(String),
    Prefix(String),
    Suffix(String),
}

/// The identity keys a rule is filed under, if every `from` entry constrains the
/// source identity; `None` files it under any source. A rule matches only when one
/// of its entries does, and an entry only identities that match one of its keys, so
/// a request whose identity matches none of the keys cannot match the rule.
fn identity_keys(rule: &Rule) -> Option<Vec<IdKey>> {
    if rule.from.is_empty() {
        return None;
    }
    let mut out = Vec::new();
    for s in &rule.from {
        match (&s.identities, &s.trust_domains) {
            (Some(ids), _) if !ids.contains(&Pattern::Any) => {
                for p in ids {
                    out.push(match p {
                        Pattern::Exact(id) => IdKey::Exact(id.clone()),
                        Pattern::Prefix(p) => IdKey::Prefix(p.clone()),
                        Pattern::Suffix(s) => IdKey::Suffix(s.clone()),
                        Pattern::Any => return None,
                    });
                }
            }
            // As `source_mismatch` reads it, the trust domain of `spiffe://td` and of
            // `spiffe://td/...` is `td` (a checked trust domain has no `/` and is not
            // empty), and of nothing else.
            (_, Some(tds)) => {
                for td in tds {
                    out.push(IdKey::Exact(format!("spiffe://{td}")));
                    out.push(IdKey::Prefix(format!("spiffe://{td}/")));
                }
            }
            _ => return None,
        }
    }
    Some(out)
}

/// The ports a rule is limited to, if every `to` entry names ports.
fn rule_ports(rule: &Rule) -> Option<Vec<u16>> {
    if rule.to.is_empty() {
        return None;
    }
    let mut out = Vec::new();
    for op in &rule.to {
        out.extend(op.ports.as_ref()?.iter().copied());
    }
    out.sort_unstable();
    out.dedup();
    Some(out)
}

impl CompiledPolicy {
    /// Compiles a checked set under the mesh default.
    pub fn compile(set: PolicySet, default: DefaultAction) -> CompiledPolicy {
        let mut c = CompiledPolicy {
            set: PolicySet::default(),
            default,
            deny: ActionIndex::default(),
            allow: ActionIndex::default(),
            audit: ActionIndex::default(),
            allow_selectors: Vec::new(),
            allow_by_workload: WorkloadIndex::default(),
            inspect: Inspection::default(),
            slot_base: Vec::with_capacity(set.policies.len() + 1),
        };
        let mut total = 0;
        for p in &set.policies {
            c.slot_base.push(total);
            total += p.rules.len();
        }
        c.slot_base.push(total);
        // A hash set beside the list, which keeps first-seen order: comparing each new
        // selector with every one before it was quadratic in the number of policies.
        let mut selectors_seen: HashSet<&Option<Selector>> = HashSet::new();
        for (pi, p) in set.policies.iter().enumerate() {
            let keys = workload_keys(p.selector.as_ref());
            if p.action == Action::Allow && selectors_seen.insert(&p.selector) {
                let n = c.allow_selectors.len() as u32;
                c.allow_selectors.push(p.selector.clone());
                for key in &keys {
                    c.allow_by_workload.slot(key.clone()).push(n);
                }
            }
            if p.action != Action::Audit {
                c.inspect.add(pi as u32, &keys, &p.rules);
            }
            let index = match p.action {
                Action::Deny => &mut c.deny,
                Action::Allow => &mut c.allow,
                Action::Audit => &mut c.audit,
            };
            for key in keys {
                let ports = index.slot(key);
                for (ri, rule) in p.rules.iter().enumerate() {
                    let r = RuleRef {
                        policy: pi as u32,
                        rule: ri as u32,
                    };
                    ports.insert(rule, r);
                }
            }
        }
        c.set = set;
        c
    }

    /// An empty policy set under `default` (what a daemon runs with no policy file).
    pub fn empty(default: DefaultAction) -> CompiledPolicy {
        CompiledPolicy::compile(PolicySet::default(), default)
    }

    /// The checked set this was compiled from (names, lines, test cases).
    pub fn set(&self) -> &PolicySet {
        &self.set
    }

    pub fn default_action(&self) -> DefaultAction {
        self.default
    }

    /// Is `req`'s destination port inspected at layer 7 for its receiving workload
    /// (`dst_identity`, `dst_groups`), over its protocol? Only that is read of `req`.
    ///
    /// TCP: when an allow or deny rule of a policy that selects the workload has a
    /// layer-7 `to` entry naming the port; then every connection there must carry
    /// HTTP/1.x requests, each decided with its HTTP attributes, and anything else is
    /// refused (`not_http`). UDP: when that holds and no allow or deny rule of a policy
    /// that selects the workload (with HTTP rules or not) names the port with protocol
    /// udp: a datagram there could be HTTP/3,
    /// which cannot be inspected, so it is refused (`not_http`) rather than let past
    /// the HTTP rules. ICMP: never. Audit rules never make a port inspected.
    ///
    /// Cost: one hash lookup for a port no rule inspects; else the policies filed
    /// under the port for the workload's keys (not every policy).
    pub fn inspects(&self, req: &Request<'_>) -> bool {
        if req.protocol == Protocol::Icmp || !self.inspect.ports.contains(&req.dst_port) {
            return false;
        }
        let selects = |pi: &u32| match &self.set.policies[*pi as usize].selector {
            None => true,
            Some(s) => selector_mismatch(s, req).is_none(),
        };
        let (mut http, mut udp) = (false, false);
        self.inspect
            .by_workload
            .for_each_match(req.dst_identity, req.dst_groups, &mut |by_port| {
                if let Some(p) = by_port.get(&req.dst_port) {
                    http = http || p.http.iter().any(selects);
                    udp = udp || (req.protocol == Protocol::Udp && p.udp.iter().any(selects));
                }
            });
        match req.protocol {
            Protocol::Tcp => http,
            Protocol::Udp => http && !udp,
            Protocol::Icmp => false,
        }
    }

    /// `(policy name, rule label)` of a rule: the label is the rule's `name`, else
    /// its index in the policy.
    pub fn rule_label(&self, r: RuleRef) -> (&str, String) {
        let p = &self.set.policies[r.policy as usize];
        let rule = &p.rules[r.rule as usize];
        (
            &p.name,
            rule.name.clone().unwrap_or_else(|| r.rule.to_string()),
        )
    }

    /// `policy/rule`, as written in logs and explain.
    pub fn describe(&self, r: RuleRef) -> String {
        let (p, rule) = self.rule_label(r);
        format!("{p}/{rule}")
    }

    /// Number of rules in all policies: the size of a dense per-rule counter array.
    pub fn rule_count(&self) -> usize {
        self.slot_base.last().copied().unwrap_or(0)
    }

    /// Dense index of a rule in `0..rule_count()`, for per-rule counters.
    pub fn rule_slot(&self, r: RuleRef) -> usize {
        self.slot_base[r.policy as usize] + r.rule as usize
    }

    /// Every rule, in file order, with its `policy/rule` description.
    pub fn rules(&self) -> impl Iterator<Item = (RuleRef, String)> + '_ {
        self.set
            .policies
            .iter()
            .enumerate()
            .flat_map(move |(pi, p)| {
                (0..p.rules.len()).map(move |ri| {
                    let r = RuleRef {
                        policy: pi as u32,
                        rule: ri as u32,
                    };
                    (r, self.describe(r))
                })
            })
    }

    /// How many rules of `action` policies evaluation would look at for `req`
    /// (the index's work; for tests and benchmarks). A rule filed under several
    /// keys that all match `req` counts once per key.
    pub fn candidates(&self, action: Action, req: &Request<'_>) -> usize {
        let mut n = 0;
        self.for_each_list(action, req, |l| n += l.len());
        n
    }

    /// How many allow-policy selectors evaluation would check for `req` to decide
    /// whether an allow policy selects the receiving workload (the workload index's
    /// work, for tests and benchmarks; a selector filed under several keys that all
    /// match counts once per key). Checking stops at the first that selects.
    pub fn selector_candidates(&self, req: &Request<'_>) -> usize {
        let mut n = 0;
        self.allow_selected(req, |_| n += 1);
        n
    }

    /// Does any allow policy select the receiving workload (step 2)? Checks only the
    /// selectors filed under the workload's keys.
    pub(crate) fn allow_applies(&self, req: &Request<'_>) -> bool {
        self.allow_selected(req, |_| ())
    }

    /// [`allow_applies`](Self::allow_applies), calling `visit` with each selector
    /// checked.
    fn allow_selected(&self, req: &Request<'_>, mut visit: impl FnMut(u32)) -> bool {
        let mut found = false;
        self.allow_by_workload
            .for_each_match(req.dst_identity, req.dst_groups, &mut |list| {
                for &i in list {
                    if found {
                        return;
                    }
                    visit(i);
                    found = match &self.allow_selectors[i as usize] {
                        None => true,
                        Some(s) => selector_mismatch(s, req).is_none(),
                    };
                }
            });
        found
    }

    fn index(&self, action: Action) -> &ActionIndex {
        match action {
            Action::Deny => &self.deny,
            Action::Allow => &self.allow,
            Action::Audit => &self.audit,
        }
    }

    /// Calls `f` with each candidate list for a request: per workload key the
    /// receiving workload matches, those of the request's port (never for ICMP,
    /// which has none), then those of "any port".
    fn for_each_list<'a>(
        &'a self,
        action: Action,
        req: &Request<'_>,
        mut f: impl FnMut(&'a [RuleRef]),
    ) {
        self.index(action).for_each_match(
            req.dst_identity,
            req.dst_groups,
            &mut |ports: &'a PortIndex| ports.for_each_list(req, &mut f),
        );
    }

    /// Calls `f` with every rule of `action` policies that could match `req`, not
    /// in file order, and a rule more than once if it is filed under several keys
    /// that match (callers that collect matches sort and dedup).
    pub(crate) fn for_each_candidate(
        &self,
        action: Action,
        req: &Request<'_>,
        mut f: impl FnMut(RuleRef),
    ) {
        self.for_each_list(action, req, |list| list.iter().copied().for_each(&mut f));
    }

    /// The first rule (in file order) of `action` policies that matches.
    pub(crate) fn first_match(&self, action: Action, req: &Request<'_>) -> Option<RuleRef> {
        self.first_match_leniency(action, req, HttpAbsent::of(action))
    }

    /// [`first_match`](Self::first_match) where `absent` says how layer-7 fields read
    /// a request without HTTP attributes (see `eval::deny_every_request`).
    pub(crate) fn first_match_leniency(
        &self,
        action: Action,
        req: &Request<'_>,
        absent: HttpAbsent,
    ) -> Option<RuleRef> {
        // Each list is in file order: the first match in a list is its best, and a
        // list can stop at the best found so far in earlier lists.
        let mut best: Option<RuleRef> = None;
        self.for_each_list(action, req, |list| {
            for &r in list {
                if best.is_some_and(|b| r >= b) {
                    break;
                }
                if self.rule_matches_leniency(r, req, absent) {
                    best = Some(r);
                    break;
                }
            }
        });
        best
    }

    /// Does rule `r` match, including its policy's selector?
    pub(crate) fn rule_matches(&self, r: RuleRef, req: &Request<'_>) -> bool {
        let action = self.set.policies[r.policy as usize].action;
        self.rule_matches_leniency(r, req, HttpAbsent::of(action))
    }

    fn rule_matches_leniency(&self, r: RuleRef, req: &Request<'_>, absent: HttpAbsent) -> bool {
        let p = &self.set.policies[r.policy as usize];
        if let Some(sel) = &p.selector {
            if selector_mismatch(sel, req).is_some() {
                return false;
            }
        }
        rule_matches_leniency(&p.rules[r.rule as usize], req, absent)
    }
}
