//! `[[test]]` cases carried by policy files, and the runner behind `meshctl policy
//! test` and the daemon's refusal of a policy whose tests fail.

use serde::{Deserialize, Serialize};

use super::compile::CompiledPolicy;
use super::explain::DecisionSummary;
use super::request::RequestSpec;

/// One `[[test]]`: a described request and what policy must decide.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestCase {
    pub name: String,
    pub line: usize,
    pub request: RequestSpec,
    pub expect: Expect,
}

/// The expected decision; `policy`, `rule` and `reason` are checked when given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expect {
    pub allow: bool,
    pub policy: Option<String>,
    /// Rule label: its `name`, or its index in the policy.
    pub rule: Option<String>,
    /// A decision reason name (`explicit_deny`, `no_allow_matched`, ...).
    pub reason: Option<String>,
}

/// The outcome of one case.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaseResult {
    pub name: String,
    pub line: usize,
    pub passed: bool,
    pub got: DecisionSummary,
    /// What differed, when the case failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
}

/// Runs every test case of the compiled set, in file order.
pub fn run_tests(policy: &CompiledPolicy) -> Vec<CaseResult> {
    policy
        .set()
        .tests
        .iter()
        .map(|t| run_case(policy, t))
        .collect()
}

/// True if every case passed.
pub fn all_passed(results: &[CaseResult]) -> bool {
    results.iter().all(|r| r.passed)
}

fn run_case(policy: &CompiledPolicy, t: &TestCase) -> CaseResult {
    let decision = t.request.decide(policy);
    let got = DecisionSummary::new(policy, &decision);
    let mut diffs = Vec::new();
    let want = if t.expect.allow { "allow" } else { "deny" };
    if got.decision != want {
        diffs.push(format!("expected {want}, got {}", got.decision));
    }
    if let Some(p) = &t.expect.policy {
        if got.policy.as_ref() != Some(p) {
            diffs.push(format!(
                "expected policy {p:?}, got {}",
                got.policy
                    .as_deref()
                    .map_or("none".to_string(), |g| format!("{g:?}"))
            ));
        }
    }
    if let Some(r) = &t.expect.rule {
        if got.rule.as_ref() != Some(r) {
            diffs.push(format!(
                "expected rule {r:?}, got {}",
                got.rule
                    .as_deref()
                    .map_or("none".to_string(), |g| format!("{g:?}"))
            ));
        }
    }
    if let Some(r) = &t.expect.reason {
        if &got.reason != r {
            diffs.push(format!("expected reason {r}, got {}", got.reason));
        }
    }
    CaseResult {
        name: t.name.clone(),
        line: t.line,
        passed: diffs.is_empty(),
        got,
        failure: (!diffs.is_empty()).then(|| diffs.join("; ")),
    }
}
