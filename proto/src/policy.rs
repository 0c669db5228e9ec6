//! Authorization policy: the TOML language, its checked model, the compiled index,
//! evaluation, `explain`, and the `[[test]]` runner. Pure: no I/O, no clock.
//!
//! Semantics are Istio's AuthorizationPolicy (see `docs/policy.md`): any matching
//! deny → deny; else if any allow policy applies to the workload, allow only if one
//! matches; else the mesh default. Audit matches are recorded, never decide.
//!
//! The daemon's use:
//! ```
//! use mesh_proto::policy::{self, CompiledPolicy, DefaultAction, Protocol, Request};
//! let src = r#"
//! [[policy]]
//! name = "web"
//! action = "allow"
//! [[policy.rule]]
//! from = [{ identities = ["spiffe://t/a"] }]
//! to = [{ ports = [8080] }]
//! "#;
//! let parsed = policy::parse("policy.toml", src).unwrap();
//! let compiled = CompiledPolicy::compile(parsed.set, DefaultAction::Deny);
//! assert!(policy::all_passed(&policy::run_tests(&compiled)));
//! let req = Request {
//!     src_identity: Some("spiffe://t/a"), src_groups: &[], src_addr: None,
//!     dst_identity: None, dst_groups: &[], dst_addr: None,
//!     dst_port: 8080, protocol: Protocol::Tcp, http: None,
//! };
//! assert!(policy::evaluate(&compiled, &req).is_allowed());
//! assert!(!compiled.inspects(&req));
//! ```

mod cases;
mod compile;
mod eval;
mod explain;
mod ident;
mod model;
mod parse;
mod principal;
mod request;
mod validate;

#[cfg(test)]
mod tests;

pub use cases::{all_passed, run_tests, CaseResult, Expect, TestCase};
pub use compile::CompiledPolicy;
pub use eval::{
    decide, deny_every_request, evaluate, AllowReason, Decision, DenyReason, RuleRef, Stage,
    Verdict,
};
pub use explain::{explain, explain_request, DecisionSummary, Explanation, PolicyTrace, RuleTrace};
pub use model::{
    Action, Condition, DefaultAction, HostPattern, Operation, Pattern, Policy, PolicySet, Protocol,
    Rule, Selector, Source,
};
pub use parse::{parse, Parsed, PolicyError};
pub use principal::{LocalWorkload, Sender};
pub use request::{parse_header, Header, HttpRequest, HttpSpec, Request, RequestSpec, SpecError};
pub use validate::PolicyWarning;

/// Parses, checks and compiles a policy file and runs its `[[test]]` cases: what
/// `meshctl policy apply` and the daemon do before swapping a policy in.
pub fn load(file: &str, source: &str, default: DefaultAction) -> Result<Loaded, PolicyError> {
    let parsed = parse(file, source)?;
    let compiled = CompiledPolicy::compile(parsed.set, default);
    let results = run_tests(&compiled);
    Ok(Loaded {
        compiled,
        warnings: parsed.warnings,
        results,
    })
}

/// The outcome of [`load`].
#[derive(Debug)]
pub struct Loaded {
    pub compiled: CompiledPolicy,
    pub warnings: Vec<PolicyWarning>,
    pub results: Vec<CaseResult>,
}

impl Loaded {
    /// True if every test case passed (a policy is applied only then).
    pub fn tests_passed(&self) -> bool {
        all_passed(&self.results)
    }

    /// One line saying which tests failed, for refusing the policy; `None` if all
    /// passed. E.g. `policy.toml: 1 of 3 policy tests failed: "post items" (line 30):
    /// expected allow, got deny`.
    pub fn failure_summary(&self) -> Option<String> {
        let failed: Vec<String> = self
            .results
            .iter()
            .filter(|r| !r.passed)
            .map(|r| {
                format!(
                    "{:?} (line {}): {}",
                    r.name,
                    r.line,
                    r.failure.as_deref().unwrap_or("failed")
                )
            })
            .collect();
        if failed.is_empty() {
            return None;
        }
        Some(format!(
            "{}: {} of {} policy tests failed: {}",
            self.compiled.set().source,
            failed.len(),
            self.results.len(),
            failed.join("; ")
        ))
    }
}
