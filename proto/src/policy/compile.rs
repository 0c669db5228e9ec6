//! The compiled form: the checked [`PolicySet`] plus an index per action, so that
//! evaluation looks only at rules that could match the request's destination port
//! and source identity (as nebula's firewall compiles rules into a lookup tree).
//!
//! Index shape, per action: destination port → source identity → rules. A rule is
//! filed under each port it names when every `to` entry names ports, else under
//! "any port"; within that, under each exact identity when every `from` entry lists
//! only exact identities, else under "any source". A lookup visits at most four
//! short, ordered lists.

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
    any_source: Vec<RuleRef>,
}

impl SourceIndex {
    fn insert(&mut self, rule: &Rule, r: RuleRef) {
        match exact_identities(rule) {
            Some(ids) => {
                for id in ids {
                    let list = self.by_identity.entry(id.into()).or_default();
                    if list.last() != Some(&r) {
                        list.push(r);
                    }
                }
            }
            None => self.any_source.push(r),
        }
    }

    fn lists<'a>(&'a self, id: Option<&str>) -> [&'a [RuleRef]; 2] {
        let by_id = id
            .and_then(|id| self.by_identity.get(id))
            .map_or(&[][..], |v| &v[..]);
        [by_id, &self.any_source]
    }
}

/// The exact identities a rule is limited to, if every `from` entry lists only
/// exact identities.
fn exact_identities(rule: &Rule) -> Option<Vec<&str>> {
    if rule.from.is_empty() {
        return None;
    }
    let mut out = Vec::new();
    for s in &rule.from {
        for p in s.identities.as_ref()? {
            match p {
                Pattern::Exact(id) => out.push(id.as_str()),
                _ => return None,
            }
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
        for (pi, p) in set.policies.iter().enumerate() {
            if p.action == Action::Allow && !c.allow_selectors.contains(&p.selector) {
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
                note_l7(&mut c.l7_ports, &mut c.l7_any_port_except, rule);
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
    /// (the index's work; for tests and benchmarks).
    pub fn candidates(&self, action: Action, req: &Request<'_>) -> usize {
        self.candidate_lists(action, req)
            .iter()
            .map(|l| l.len())
            .sum()
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

    /// The (up to four) candidate lists for a request.
    fn candidate_lists<'a>(&'a self, action: Action, req: &Request<'_>) -> [&'a [RuleRef]; 4] {
        let idx = self.index(action);
        let [a, b] = idx
            .by_port
            .get(&req.dst_port)
            .filter(|_| req.protocol != Protocol::Icmp)
            .map_or([&[][..], &[][..]], |s| s.lists(req.src_identity));
        let [c, d] = idx.any_port.lists(req.src_identity);
        [a, b, c, d]
    }

    pub(crate) fn for_each_candidate(
        &self,
        action: Action,
        req: &Request<'_>,
        mut f: impl FnMut(RuleRef),
    ) {
        for list in self.candidate_lists(action, req) {
            list.iter().copied().for_each(&mut f);
        }
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
        let mut best: Option<RuleRef> = None;
        for list in self.candidate_lists(action, req) {
            for &r in list {
                if best.is_some_and(|b| r >= b) {
                    break;
                }
                if self.rule_matches_leniency(r, req, lenient) {
                    best = Some(r);
                    break;
                }
            }
        }
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

fn note_l7(ports: &mut HashSet<u16>, any_except: &mut Vec<Vec<u16>>, rule: &Rule) {
    if !rule.is_l7() {
        return;
    }
    // Header conditions make every `to` entry of the rule layer 7.
    let whole_rule = !rule.when.is_empty();
    if rule.to.is_empty() {
        any_except.push(Vec::new());
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
                if !any_except.contains(&op.not_ports) {
                    any_except.push(op.not_ports.clone());
                }
            }
        }
    }
}
