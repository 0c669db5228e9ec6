//! `policy_apply`, `policy_get` (and `explain`, whose request and result belong to
//! the policy model: [`crate::policy::RequestSpec`], [`crate::policy::Explanation`]).

use serde::{Deserialize, Serialize};

use crate::policy::DefaultAction;

/// `{"op":"policy_apply","source":"<toml>","name":"file.toml"}`: the daemon parses,
/// compiles and tests the policy under its own default, persists it and swaps it in;
/// a policy whose tests fail is refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyApplyRequest {
    /// The policy file's text.
    pub source: String,
    /// The file name errors and status name it by; `policy.toml` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// `{"op":"policy_get"}`: no arguments.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyGetRequest {}

/// Where the policy in force came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyOrigin {
    /// No policy: the mesh default alone.
    None,
    /// meshd.toml's `[policy] file`.
    Config,
    /// `policy apply` (persisted in the state directory; wins over the config's
    /// file at start).
    Applied,
}

impl PolicyOrigin {
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyOrigin::None => "none",
            PolicyOrigin::Config => "config",
            PolicyOrigin::Applied => "applied",
        }
    }
}

/// Result of `policy_get`, and `status.enforcement.policy`: the policy in force.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyInfo {
    /// The file name it was applied or configured under; empty when there is none.
    pub name: String,
    pub origin: PolicyOrigin,
    /// The mesh default it runs under.
    pub default: DefaultAction,
    /// `[[policy]]` tables, and `[[test]]` cases (all passed, or it would not be in
    /// force).
    pub policies: u64,
    pub tests: u64,
    /// The policy file's text.
    #[serde(default)]
    pub source: String,
}

/// Result of `policy_apply`: what is in force now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyApplied {
    pub name: String,
    pub policies: u64,
    pub tests: u64,
    /// Established flows the new policy forbids, cut (reset at both ends).
    pub cut_flows: u64,
}
