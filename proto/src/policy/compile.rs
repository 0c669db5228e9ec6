//! The compiled form: the checked [`PolicySet`] plus an index per action, so that
//! evaluation looks only at rules that could match the request's destination port
//! and source identity (as nebula's firewall compiles rules into a lookup tree).
//!
//! Index shape, per action: destination port → source identity → rules. A rule is
//! filed under each port it names when every `to` entry names ports, else under
//! "any port". Within that, a rule is filed under the identity keys of its `from`
//! entries when every entry constrains the source identity, else under "any
//! source". An entry constrains the identity through `identities` without `*`
//! (exact IDs, `prefix*`, `*suffix`), else through `trust_domains` (trust domain
//! `td` is the exact key `spiffe://td` plus the prefix key `spiffe://td/`).
//! Negations (`not_identities`, ...) only narrow what an entry matches, so they
//! neither make a rule indexable nor stop it being filed under its positive keys.
//! An `identities = []` entry matches nothing and adds no key.
//!
//! Identity keys, per (action, port) bucket:
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
//! Every list is in file order (by [`RuleRef`]). A lookup visits several lists
//! (per port bucket: the exact list, each matching prefix and suffix list, the
//! any-source list); the first match in file order is the least matching
//! [`RuleRef`] over all of them, found by stopping each list at the best so far.
//! One rule may sit in several visited lists (say under `spiffe://t/a*` and
//! `*/b`, both matching `spiffe://t/a/b`), so a visitor that collects matches
//! (audit) removes repeats.

use std::collections::{HashMap, HashSet};

use super::eval::{rule_matches_leniency, selector_mismatch, RuleRef};
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
    l7_ports: HashSet<u16>,
    /// `not_ports` lists of layer-7 `to` entries that name no ports.
    l7_any_port_except: Vec<Vec<u16>>,
    /// First dense rule slot of each policy, then the total.
    slot_base: Vec<usize>,
}

#[derive(Debug, Default)]
struct ActionIndex {
    by_port: HashMap<u16, SourceIndex>,
    any_port: SourceIndex,
}

/// Rule lists are in file order (by [`RuleRef`]), so the first match is the
/// deciding one.
#[derive(Debug, Default)]
struct SourceIndex {
    by_identity: HashMap<Box<str>, Vec<RuleRef>>,
    by_prefix: AffixIndex,
    by_suffix: AffixIndex,
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
                        IdKey::Prefix(p) => self.by_prefix.insert(p, r),
                        IdKey::Suffix(s) => self.by_suffix.insert(s, r),
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
            self.by_prefix.for_each_match(id, End::Start, f);
            self.by_suffix.for_each_match(id, End::End, f);
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

/// Rules filed under identity prefixes (or suffixes), by the pattern's literal.
#[derive(Debug, Default)]
struct AffixIndex {
    by_literal: HashMap<Box<str>, Vec<RuleRef>>,
    /// The distinct literal lengths, ascending.
    lens: Vec<usize>,
}

impl AffixIndex {
    fn insert(&mut self, literal: String, r: RuleRef) {
        if let Err(i) = self.lens.binary_search(&literal.len()) {
            self.lens.insert(i, literal.len());
        }
        push_once(self.by_literal.entry(literal.into()).or_default(), r);
    }

    /// Calls `f` with the list of each literal that `id` starts (or ends) with.
    fn for_each_match<'a>(&'a self, id: &str, end: End, f: &mut impl FnMut(&'a [RuleRef])) {
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

/// A key a rule is filed under: an identity pattern other than `*`.
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
            l7_ports: HashSet::new(),
            l7_any_port_except: Vec::new(),
            slot_base: Vec::with_capacity(set.policies.len() + 1),
        };
        let mut total = 0;
        for p in &set.policies {
            c.slot_base.push(total);
            total += p.rules.len();
        }
        c.slot_base.push(total);
        // Hash sets beside the lists, which keep first-seen order: comparing each
        // new selector (or not_ports list) with every one before it was quadratic in
        // the number of policies (or rules).
        let mut selectors_seen: HashSet<&Option<Selector>> = HashSet::new();
        let mut l7_seen = L7Seen::default();
        for (pi, p) in set.policies.iter().enumerate() {
            if p.action == Action::Allow && selectors_seen.insert(&p.selector) {
                c.allow_selectors.push(p.selector.clone());
            }
            let index = match p.action {
                Action::Deny => &mut c.deny,
                Action::Allow => &mut c.allow,
                Action::Audit => &mut c.audit,
            };
            for (ri, rule) in p.rules.iter().enumerate() {
                let r = RuleRef {
                    policy: pi as u32,
                    rule: ri as u32,
                };
                match rule_ports(rule) {
                    Some(ports) => {
                        for port in ports {
                            index.by_port.entry(port).or_default().insert(rule, r);
                        }
                    }
                    None => index.any_port.insert(rule, r),
                }
                l7_seen.note(&mut c.l7_ports, &mut c.l7_any_port_except, rule);
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

    /// Does traffic to this destination port need layer-7 inspection? True when
    /// some rule that can apply to the port uses methods, paths, hosts or headers.
    /// Only TCP is ever inspected; other protocols stay at layer 4.
    pub fn needs_l7(&self, protocol: Protocol, port: u16) -> bool {
        protocol == Protocol::Tcp
            && (self.l7_ports.contains(&port)
                || self.l7_any_port_except.iter().any(|ex| !ex.contains(&port)))
    }

    /// Ports named by layer-7 rules, sorted, and whether layer-7 rules also apply
    /// to ports they do not name (then ask [`needs_l7`](Self::needs_l7) per port).
    pub fn l7_ports(&self) -> (Vec<u16>, bool) {
        let mut v: Vec<u16> = self.l7_ports.iter().copied().collect();
        v.sort_unstable();
        (v, !self.l7_any_port_except.is_empty())
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

    pub(crate) fn allow_applies(&self, req: &Request<'_>) -> bool {
        self.allow_selectors.iter().any(|s| match s {
            None => true,
            Some(s) => selector_mismatch(s, req).is_none(),
        })
    }

    fn index(&self, action: Action) -> &ActionIndex {
        match action {
            Action::Deny => &self.deny,
            Action::Allow => &self.allow,
            Action::Audit => &self.audit,
        }
    }

    /// Calls `f` with each candidate list for a request: those of the request's
    /// port (never for ICMP, which has none), then those of "any port".
    fn for_each_list<'a>(
        &'a self,
        action: Action,
        req: &Request<'_>,
        mut f: impl FnMut(&'a [RuleRef]),
    ) {
        let idx = self.index(action);
        if req.protocol != Protocol::Icmp {
            if let Some(s) = idx.by_port.get(&req.dst_port) {
                s.for_each_list(req.src_identity, &mut f);
            }
        }
        idx.any_port.for_each_list(req.src_identity, &mut f);
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
        self.first_match_leniency(action, req, action == Action::Deny)
    }

    /// [`first_match`](Self::first_match) where `lenient` says whether layer-7 fields
    /// match a request without HTTP attributes (see `eval::deny_every_request`).
    pub(crate) fn first_match_leniency(
        &self,
        action: Action,
        req: &Request<'_>,
        lenient: bool,
    ) -> Option<RuleRef> {
        // Each list is in file order: the first match in a list is its best, and a
        // list can stop at the best found so far in earlier lists.
        let mut best: Option<RuleRef> = None;
        self.for_each_list(action, req, |list| {
            for &r in list {
                if best.is_some_and(|b| r >= b) {
                    break;
                }
                if self.rule_matches_leniency(r, req, lenient) {
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
        self.rule_matches_leniency(r, req, action == Action::Deny)
    }

    fn rule_matches_leniency(&self, r: RuleRef, req: &Request<'_>, lenient: bool) -> bool {
        let p = &self.set.policies[r.policy as usize];
        if let Some(sel) = &p.selector {
            if selector_mismatch(sel, req).is_some() {
                return false;
            }
        }
        rule_matches_leniency(&p.rules[r.rule as usize], req, lenient)
    }
}

/// The `not_ports` lists already in `l7_any_port_except`, while compiling.
#[derive(Default)]
struct L7Seen<'a> {
    any_except: HashSet<&'a [u16]>,
}

impl<'a> L7Seen<'a> {
    /// Records where layer-7 rule `rule` needs inspection: the ports it names, or
    /// every port but its `not_ports` (each distinct list once).
    fn note(&mut self, ports: &mut HashSet<u16>, any_except: &mut Vec<Vec<u16>>, rule: &'a Rule) {
        if !rule.is_l7() {
            return;
        }
        // Header conditions make every `to` entry of the rule layer 7.
        let whole_rule = !rule.when.is_empty();
        if rule.to.is_empty() {
            if self.any_except.insert(&[]) {
                any_except.push(Vec::new());
            }
            return;
        }
        for op in &rule.to {
            if !(whole_rule || op.is_l7()) {
                continue;
            }
            if op
                .protocols
                .as_ref()
                .is_some_and(|p| !p.contains(&Protocol::Tcp))
            {
                continue;
            }
            match &op.ports {
                Some(p) => ports.extend(p.iter().copied().filter(|p| !op.not_ports.contains(p))),
                None => {
                    if self.any_except.insert(&op.not_ports) {
                        any_except.push(op.not_ports.clone());
                    }
                }
            }
        }
    }
}
