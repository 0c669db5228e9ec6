//! Policy helpers: apply a policy as an operator would (`meshctl policy apply`), read
//! the decision log (`meshctl log --json`) and the enforcement counters
//! (`meshctl status --json`).

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::host::Host;
use crate::process::Output;
use crate::wait;

static POLICY_COUNTER: AtomicU32 = AtomicU32::new(0);

/// Decision-log lines, as `meshctl log --json` prints them (one JSON object each).
#[derive(Clone, Debug)]
pub struct Decisions(pub Vec<Value>);

/// The value at `key` in a decision: a top-level field, or `http.status` style for a
/// nested one; strings as they are, numbers and booleans as text, absent as `None`.
pub fn field(rec: &Value, key: &str) -> Option<String> {
    let mut v = rec;
    for part in key.split('.') {
        v = v.get(part)?;
    }
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Null => None,
        other => Some(other.to_string()),
    }
}

impl Decisions {
    /// The decisions whose every `(key, value)` matches (see [`field`]).
    pub fn matching(&self, want: &[(&str, &str)]) -> Vec<&Value> {
        self.0
            .iter()
            .filter(|rec| {
                want.iter()
                    .all(|(k, v)| field(rec, k).as_deref() == Some(*v))
            })
            .collect()
    }

    /// Whether some decision matches every `(key, value)`.
    pub fn contains(&self, want: &[(&str, &str)]) -> bool {
        !self.matching(want).is_empty()
    }

    /// Panics, printing the whole log, unless some decision matches `want`.
    #[track_caller]
    pub fn assert_contains(&self, want: &[(&str, &str)]) {
        assert!(
            self.contains(want),
            "no decision with {want:?} in the log:\n{}",
            self.lines()
        );
    }

    /// Panics unless no decision matches `want`.
    #[track_caller]
    pub fn assert_none(&self, want: &[(&str, &str)]) {
        assert!(
            !self.contains(want),
            "unexpected decision with {want:?} in the log:\n{}",
            self.lines()
        );
    }

    /// One JSON line per decision, for error messages.
    pub fn lines(&self) -> String {
        self.0
            .iter()
            .map(Value::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Host {
    /// Writes `source` to a new file in the host's directory and runs `meshctl policy
    /// apply` on it. Returns the output whether it succeeded or not (tests of refusals
    /// look at it); use [`Output::check`] when it must succeed.
    pub fn apply_policy(&self, source: &str) -> Result<Output> {
        let n = POLICY_COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = self.dir().join(format!("apply-{n}.toml"));
        std::fs::write(&path, source).with_context(|| format!("write {}", path.display()))?;
        let p = path.to_str().context("path is not UTF-8")?;
        self.meshctl(&["policy", "apply", p])
    }

    /// The last `n` decisions of the decision log (`meshctl log --json -n N`).
    pub fn decisions_last(&self, n: u32) -> Result<Decisions> {
        let n = n.to_string();
        let out = self.meshctl(&["log", "--json", "-n", &n])?.check()?;
        let mut recs = Vec::new();
        for line in out.stdout_str().lines().filter(|l| !l.trim().is_empty()) {
            recs.push(
                serde_json::from_str(line)
                    .with_context(|| format!("`meshctl log --json` printed {line:?}"))?,
            );
        }
        Ok(Decisions(recs))
    }

    /// The whole retained decision log.
    pub fn decisions(&self) -> Result<Decisions> {
        self.decisions_last(10_000)
    }

    /// Waits (bounded) until the decision log holds a decision matching `want`; the
    /// error prints the log. For decisions made on a packet the test did not wait for.
    pub fn wait_decision(&self, want: &[(&str, &str)]) -> Result<Decisions> {
        let r = wait::until(
            &format!("a decision with {want:?} in {}'s log", self.name()),
            Duration::from_secs(10),
            || {
                let d = self.decisions()?;
                Ok(d.contains(want).then_some(d))
            },
        );
        match r {
            Ok(d) => Ok(d),
            Err(e) => bail!("{e:#}; the log:\n{}", self.decisions()?.lines()),
        }
    }

    /// `enforcement` of `meshctl status --json`: the policy in force, counters per
    /// reason and per policy/rule, flows, decision-log counters.
    pub fn enforcement(&self) -> Result<Value> {
        let out = self.meshctl(&["status", "--json"])?.check()?;
        let v: Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("parsing `meshctl status --json`: {}", out.stdout_str()))?;
        v.get("enforcement")
            .cloned()
            .context("`meshctl status --json` has no `enforcement`")
    }

    /// The counter `kind` ("allow", "deny" or "audit") of rule `policy/rule` in
    /// `meshctl status`; 0 when the rule has not counted anything yet.
    pub fn rule_count(&self, policy: &str, rule: &str, kind: &str) -> Result<u64> {
        let e = self.enforcement()?;
        let rules = e["counters"]["rules"]
            .as_array()
            .with_context(|| format!("no counters.rules in {e}"))?;
        Ok(rules
            .iter()
            .find(|r| r["policy"] == policy && field(r, "rule").as_deref() == Some(rule))
            .and_then(|r| r[kind].as_u64())
            .unwrap_or(0))
    }

    /// `meshctl policy explain --json ARGS` against the running meshd, parsed.
    pub fn explain(&self, args: &[&str]) -> Result<Value> {
        let mut all = vec!["--json", "policy", "explain"];
        all.extend_from_slice(args);
        let out = self.meshctl(&all)?.check()?;
        serde_json::from_slice(&out.stdout)
            .with_context(|| format!("parsing explain: {}", out.stdout_str()))
    }
}
