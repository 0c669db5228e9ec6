//! Unit tests of the policy engine: parsing and its errors, warnings, every matcher
//! (with negations and wildcards), Istio's evaluation order, the index, explain and
//! the test runner.

use super::eval::{rule_mismatch, HttpAbsent};
use super::*;
use proptest::prelude::*;

fn compile(src: &str) -> CompiledPolicy {
    compile_with(src, DefaultAction::Deny)
}

fn compile_with(src: &str, default: DefaultAction) -> CompiledPolicy {
    match parse("p.toml", src) {
        Ok(p) => CompiledPolicy::compile(p.set, default),
        Err(e) => panic!("{e}"),
    }
}

fn decide(c: &CompiledPolicy, spec: &RequestSpec) -> Decision {
    spec.with_request(|r| evaluate(c, r))
}

fn allowed(c: &CompiledPolicy, spec: &RequestSpec) -> bool {
    decide(c, spec).is_allowed()
}

fn err(src: &str) -> PolicyError {
    match parse("p.toml", src) {
        Ok(_) => panic!("expected an error for:\n{src}"),
        Err(e) => e,
    }
}

fn warnings(src: &str) -> Vec<String> {
    parse("p.toml", src)
        .unwrap_or_else(|e| panic!("{e}"))
        .warnings
        .iter()
        .map(|w| w.to_string())
        .collect()
}

/// One allow policy with one rule whose body is `rule` (TOML lines).
fn allow_rule(rule: &str) -> CompiledPolicy {
    compile(&format!(
        "[[policy]]\nname = \"p\"\naction = \"allow\"\n[[policy.rule]]\n{rule}\n"
    ))
}

fn get(from: &str, port: u16, path: &str) -> RequestSpec {
    RequestSpec::tcp(from, port).http("GET", path)
}

// ---- parsing and errors ------------------------------------------------------

#[test]
fn empty_file_is_an_error() {
    let e = err("");
    assert_eq!(e.line, 1);
    assert!(e.to_string().contains("no [[policy]]"), "{e}");
    let e = err("# only a comment\n");
    assert!(e.to_string().starts_with("p.toml:1: no [[policy]]"), "{e}");
    // An explicit empty list is how to apply no policies.
    assert!(parse("p.toml", "policy = []\n").is_ok());
}

#[test]
fn invalid_toml_names_line() {
    let e = err("[[policy]]\nname = \"a\"\naction = allow\n");
    assert_eq!(e.line, 3, "{e}");
    assert!(e.to_string().starts_with("p.toml:3: "), "{e}");
}

#[test]
fn unknown_fields_are_errors_with_line_and_field() {
    let src = "[[policy]]\nname = \"a\"\naction = \"allow\"\n[[policy.rule]]\nfrom = [{ identites = [\"spiffe://t/a\"] }]\n";
    let e = err(src);
    assert_eq!(e.line, 5, "{e}");
    assert!(e.message.contains("unknown field `identites`"), "{e}");
    assert_eq!(e.field, "from");

    let e = err("[[policy]]\nname = \"a\"\nactoin = \"allow\"\n");
    assert!(e.message.contains("actoin"), "{e}");
    let e = err("[[policy]]\nname = \"a\"\naction = \"permit\"\n");
    assert_eq!(e.line, 3, "{e}");
    assert_eq!(e.field, "action");
    assert!(e.message.contains("permit"), "{e}");
    let e = err("[[policy]]\naction = \"allow\"\n");
    assert!(e.message.contains("missing field `name`"), "{e}");
}

#[test]
fn bad_cidr_identity_port_are_errors() {
    let base = "[[policy]]\nname = \"a\"\naction = \"allow\"\n[[policy.rule]]\n";
    let e = err(&format!(
        "{base}from = [{{ addresses = [\"10.0.0.0/33\"] }}]\n"
    ));
    assert_eq!(
        (e.line, e.field.as_str()),
        (5, "policy[0].rule[0].from[0].addresses"),
        "{e}"
    );
    assert!(e.message.contains("10.0.0.0/33"), "{e}");
    let e = err(&format!(
        "{base}from = [{{ addresses = [\"10.0.0.1/8\"] }}]\n"
    ));
    assert!(e.message.contains("10.0.0.0/8"), "{e}");
    let e = err(&format!(
        "{base}from = [{{ identities = [\"spiffe://T/a\"] }}]\n"
    ));
    assert_eq!(e.field, "policy[0].rule[0].from[0].identities", "{e}");
    let e = err(&format!("{base}from = [{{ identities = [\"web\"] }}]\n"));
    assert!(e.message.contains("spiffe://"), "{e}");
    let e = err(&format!(
        "{base}from = [{{ identities = [\"spiffe://t/*/x\"] }}]\n"
    ));
    assert!(e.message.contains('*'), "{e}");
    let e = err(&format!("{base}from = [{{ trust_domains = [\"Bad\"] }}]\n"));
    assert_eq!(e.field, "policy[0].rule[0].from[0].trust_domains", "{e}");
    let e = err(&format!("{base}\n[[policy.rule.to]]\nports = [70000]\n"));
    assert_eq!(
        (e.line, e.field.as_str()),
        (7, "policy[0].rule[0].to[0].ports"),
        "{e}"
    );
    let e = err(&format!("{base}to = [{{ protocols = [\"sctp\"] }}]\n"));
    assert!(e.message.contains("sctp"), "{e}");
    let e = err(&format!("{base}to = [{{ hosts = [\"a.com:99999\"] }}]\n"));
    assert!(e.message.contains("99999"), "{e}");
    let e = err(&format!(
        "{base}to = [{{ ports = [80], methods = [\"G ET\"] }}]\n"
    ));
    assert_eq!(e.field, "policy[0].rule[0].to[0].methods", "{e}");
    let e = err(&format!(
        "{base}to = [{{ ports = [80] }}]\nwhen = [{{ key = \"source.ip\", values = [\"x\"] }}]\n"
    ));
    assert!(e.message.contains("request.headers[<name>]"), "{e}");
    let e = err(&format!(
        "{base}to = [{{ ports = [80] }}]\nwhen = [{{ key = \"request.headers[x]\" }}]\n"
    ));
    assert!(e.message.contains("values"), "{e}");
}

#[test]
fn duplicate_names_are_errors() {
    let e = err("[[policy]]\nname = \"a\"\naction = \"allow\"\n[[policy]]\nname = \"a\"\naction = \"deny\"\n");
    assert_eq!(e.line, 4, "{e}");
    assert!(e.message.contains("duplicate policy name"), "{e}");
}

#[test]
fn test_cases_are_checked() {
    let base = "[[policy]]\nname = \"a\"\naction = \"allow\"\n[[test]]\n";
    let e = err(&format!(
        "{base}from = \"nope\"\nto_port = 1\nexpect = \"allow\"\n"
    ));
    assert_eq!((e.line, e.field.as_str()), (5, "test[0].from"), "{e}");
    let e = err(&format!(
        "{base}from = \"spiffe://t/a\"\nto_port = 1\nexpect = \"maybe\"\n"
    ));
    assert_eq!(e.field, "test[0].expect", "{e}");
    let e = err(&format!(
        "{base}to_port = 1\nexpect = \"allow\"\nexpect_policy = \"zz\"\n"
    ));
    assert!(e.message.contains("zz"), "{e}");
    let e = err(&format!("{base}expect = \"allow\"\n"));
    assert!(e.message.contains("to_port"), "{e}");
    let e = err(&format!(
        "{base}to_port = 1\nproto = \"udp\"\nmethod = \"GET\"\nexpect = \"deny\"\n"
    ));
    assert!(e.message.contains("tcp"), "{e}");
    let e = err(&format!(
        "{base}to_port = 1\nheaders = [\"novalue\"]\nexpect = \"deny\"\n"
    ));
    assert_eq!(e.field, "test[0].headers", "{e}");
}

// ---- warnings ----------------------------------------------------------------

#[test]
fn rules_that_can_never_match_warn() {
    let w = warnings(
        r#"
[[policy]]
name = "a"
action = "allow"
[[policy.rule]]
to = [{ ports = [80], protocols = ["udp"], methods = ["GET"] }]
[[policy.rule]]
to = [{ protocols = ["icmp"], ports = [80] }]
[[policy.rule]]
to = [{ ports = [80], methods = ["get"] }]

[[policy]]
name = "empty"
action = "allow"
"#,
    );
    let all = w.join("\n");
    assert!(
        all.contains("p.toml:5: warning: policy[0].rule[0].to[0]: HTTP fields"),
        "{all}"
    );
    assert!(all.contains("icmp has no ports"), "{all}");
    assert!(all.contains("case-sensitive"), "{all}");
    assert!(all.contains("policy \"empty\" has no rules"), "{all}");
    assert_eq!(w.len(), 4, "{all}");
}

/// Issue 18: the docs promise a warning for a value its `not_*` field excludes; it
/// existed only for groups, ports and methods.
#[test]
fn values_their_negation_excludes_warn() {
    let w = warnings(
        r#"
[[policy]]
name = "a"
action = "deny"
[[policy.rule]]
from = [{ identities = ["spiffe://t/a"], not_identities = ["spiffe://t/*"] }]
[[policy.rule]]
from = [{ trust_domains = ["t"], not_trust_domains = ["t"] }]
[[policy.rule]]
from = [{ addresses = ["100.64.1.0/24"], not_addresses = ["100.64.0.0/16"] }]
[[policy.rule]]
to = [{ ports = [80], paths = ["/admin/users"], not_paths = ["/admin/*"] }]
[[policy.rule]]
to = [{ ports = [80], hosts = ["api.example.org:8080"], not_hosts = ["*.example.org"] }]
[[policy.rule]]
to = [{ ports = [80], methods = ["POST"], not_methods = ["*"] }]
[[policy.rule]]
to = [{ ports = [80] }]
when = [{ key = "request.headers[x-env]", values = ["prod-eu"], not_values = ["prod*"] }]
[[policy.rule]]
from = [{ identities = ["spiffe://t/a"], not_identities = ["spiffe://t/b*"] }]
to = [{ ports = [80], paths = ["/api/*"], not_paths = ["/api/private/*"], hosts = ["a.org"], not_hosts = ["a.org:8080"] }]
"#,
    );
    let all = w.join("\n");
    for want in [
        "p.toml:5: warning: policy[0].rule[0].from[0].identities: \"spiffe://t/a\" in identities is excluded by \"spiffe://t/*\" in not_identities: it can never match",
        "p.toml:7: warning: policy[0].rule[1].from[0].trust_domains: \"t\" in trust_domains is excluded",
        "p.toml:9: warning: policy[0].rule[2].from[0].addresses: \"100.64.1.0/24\" in addresses is excluded by \"100.64.0.0/16\"",
        "p.toml:11: warning: policy[0].rule[3].to[0].paths: \"/admin/users\" in paths is excluded by \"/admin/*\"",
        "p.toml:13: warning: policy[0].rule[4].to[0].hosts: \"api.example.org:8080\" in hosts is excluded by \"*.example.org\"",
        "p.toml:15: warning: policy[0].rule[5].to[0].methods: \"POST\" in methods is excluded by \"*\"",
        "p.toml:17: warning: policy[0].rule[6].when[0].values: \"prod-eu\" in values is excluded by \"prod*\"",
    ] {
        assert!(all.contains(want), "{want}\n{all}");
    }
    // The last rule's negations only narrow it.
    assert_eq!(w.len(), 7, "{all}");
}

/// Issue 18: `100.064.0.0/16` was read as decimal while `100.064.0.7` was refused;
/// leading zeros are refused in both (and in the prefix length); names and test names
/// with control characters (printed by `policy test`) are refused.
#[test]
fn leading_zeros_and_control_characters_are_refused() {
    let with = |addr: &str| {
        parse(
            "p.toml",
            &format!(
                "[[policy]]\nname = \"a\"\naction = \"allow\"\n[[policy.rule]]\nfrom = [{{ addresses = [\"{addr}\"] }}]\n"
            ),
        )
    };
    for bad in [
        "100.064.0.0/16",
        "100.064.0.7",
        "100.64.0.0/010",
        "010.0.0.0/8",
        "100.64.0.0/",
        "100.64.0.0/+8",
    ] {
        let e = with(bad).err().unwrap_or_else(|| panic!("{bad} accepted"));
        assert_eq!(e.field, "policy[0].rule[0].from[0].addresses", "{e}");
        assert!(e.message.contains("not an address block"), "{bad}: {e}");
    }
    assert!(with("100.064.0.7")
        .unwrap_err()
        .message
        .contains("leading zeros"));
    for good in [
        "100.64.0.0/10",
        "100.64.0.7",
        "0.0.0.0/0",
        "fd00:0db8::/32",
        "fd00::7",
        "::ffff:100.64.0.7",
    ] {
        assert!(with(good).is_ok(), "{good}: {:?}", with(good).err());
    }
    for (src, field) in [
        ("[[policy]]\nname = \"a\\u001b[31m\"\naction = \"allow\"\n", "policy[0].name"),
        ("[[policy]]\nname = \"a\"\naction = \"allow\"\n[[policy.rule]]\nname = \"r\\u0007\"\n", "policy[0].rule[0].name"),
        ("[[policy]]\nname = \"a\"\naction = \"allow\"\n[[policy.rule]]\nname = \"two\\nlines\"\n", "policy[0].rule[0].name"),
        ("[[policy]]\nname = \"a\"\naction = \"allow\"\n[[test]]\nname = \"t\\u001b]0;x\\u0007\"\nfrom = \"spiffe://t/a\"\nto_port = 1\nexpect = \"deny\"\n", "test[0].name"),
    ] {
        let e = err(src);
        assert_eq!(e.field, field, "{e}");
        assert!(e.message.contains("control characters"), "{e}");
    }
}

#[test]
fn clean_policy_has_no_warnings() {
    let w = warnings(
        "[[policy]]\nname = \"a\"\naction = \"allow\"\n[[policy.rule]]\nfrom = [{ identities = [\"spiffe://t/a\"] }]\nto = [{ ports = [80], methods = [\"GET\"], paths = [\"/api/*\", \"*.png\"] }]\n",
    );
    assert!(w.is_empty(), "{w:?}");
}

// ---- large files -----------------------------------------------------------------

/// A generated file: policy "head", then policy "big" of `BIG_RULES` rules (rule `i`
/// named `r{i}`, its body `body(i)` when that gives one), then `tail`. Keeps the
/// line of each `[[policy.rule]]`, of big's `[[policy]]` and of the tail's start.
struct BigFile {
    src: String,
    big_line: usize,
    rule_line: Vec<usize>,
    tail_line: usize,
}

const BIG_RULES: usize = 20_000;

fn big_file(body: impl Fn(usize) -> Option<String>, tail: &str) -> BigFile {
    let mut lines: Vec<String> = vec![
        "[[policy]]".into(),
        "name = \"head\"".into(),
        "action = \"deny\"".into(),
        "[[policy.rule]]".into(),
        "from = [{ trust_domains = [\"evil\"] }]".into(),
        String::new(),
    ];
    let big_line = lines.len() + 1;
    lines.extend(["[[policy]]", "name = \"big\"", "action = \"allow\""].map(String::from));
    let mut rule_line = Vec::with_capacity(BIG_RULES);
    for i in 0..BIG_RULES {
        rule_line.push(lines.len() + 1);
        lines.push("[[policy.rule]]".into());
        let body = body(i).unwrap_or_else(|| {
            format!(
                "name = \"r{i}\"\nfrom = [{{ identities = [\"spiffe://t/svc-{i}\"] }}]\nto = [{{ ports = [{}] }}]",
                1_000 + i
            )
        });
        lines.extend(body.lines().map(String::from));
    }
    lines.push(String::new());
    let tail_line = lines.len() + 1;
    let mut src = lines.join("\n");
    src.push('\n');
    src.push_str(tail);
    BigFile {
        src,
        big_line,
        rule_line,
        tail_line,
    }
}

/// Line numbers stay exact in a file of 20,000 rules: errors and warnings about its
/// last rules, a duplicate policy after them, a test case at the end. (Finding a
/// line used to count newlines from the start of the file for every rule, and the
/// duplicate-name checks compared every pair: a file this size took minutes.)
#[test]
fn large_file_reports_exact_lines() {
    let last = BIG_RULES - 1;
    let rule = |i: usize, extra: &str| {
        Some(format!(
            "name = \"r{i}\"\nfrom = [{{ identities = [\"spiffe://t/svc-{i}\"] }}]\n{extra}"
        ))
    };

    // A valid file: warnings on rules at the end, in file order; its test passes.
    let f = big_file(
        |i| match i {
            7 => rule(i, "to = [{ ports = [80], protocols = [\"icmp\"] }]"),
            i if i == last - 1 => rule(i, "to = [{ ports = [80], methods = [\"get\"] }]"),
            i if i == last => rule(
                i,
                "to = [{ ports = [80] }]\nwhen = [{ key = \"request.headers[host]\", values = [\"a\"] }]",
            ),
            _ => None,
        },
        "[[test]]\nfrom = \"spiffe://t/svc-19990\"\nto_port = 20990\nexpect = \"allow\"\nexpect_policy = \"big\"\nexpect_rule = \"r19990\"\n",
    );
    let loaded = load("big.toml", &f.src, DefaultAction::Deny).unwrap_or_else(|e| panic!("{e}"));
    let got: Vec<String> = loaded.warnings.iter().map(|w| w.to_string()).collect();
    assert_eq!(
        got,
        [
            format!("big.toml:{}: warning: policy[1].rule[7].to[0].ports: icmp has no ports: this can never match", f.rule_line[7]),
            format!("big.toml:{}: warning: policy[1].rule[{}].to[0].methods: methods are case-sensitive: \"get\" never matches \"GET\"", f.rule_line[last - 1], last - 1),
            format!("big.toml:{}: warning: policy[1].rule[{last}].when[0].key: use `hosts` in `to` for the Host header (it handles ports and case)", f.rule_line[last]),
        ]
    );
    assert_eq!(loaded.results.len(), 1);
    assert!(loaded.tests_passed(), "{:?}", loaded.results);
    assert_eq!(loaded.results[0].line, f.tail_line);
    let big = &loaded.compiled.set().policies[1];
    assert_eq!(big.line, f.big_line);
    assert_eq!(big.rules.len(), BIG_RULES);
    assert!(big
        .rules
        .iter()
        .zip(&f.rule_line)
        .all(|(r, &line)| r.line == line));

    let fails = |f: &BigFile| match parse("big.toml", &f.src) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    };
    // A duplicate rule name near the end.
    let f = big_file(|i| (i == last - 1).then(|| "name = \"r7\"".to_string()), "");
    assert_eq!(
        fails(&f),
        format!(
            "big.toml:{}: policy[1].rule[{}].name: duplicate rule name \"r7\" in policy \"big\"",
            f.rule_line[last - 1],
            last - 1
        )
    );
    // A duplicate policy name after the big policy.
    let f = big_file(|_| None, "[[policy]]\nname = \"big\"\naction = \"deny\"\n");
    assert_eq!(
        fails(&f),
        format!(
            "big.toml:{}: policy[2].name: duplicate policy name \"big\" (first at line {})",
            f.tail_line, f.big_line
        )
    );
    // A bad value in the last rule: the line of the value.
    let f = big_file(
        |i| {
            (i == last)
                .then(|| rule(i, "to = [{ ports = [0] }]"))
                .flatten()
        },
        "",
    );
    assert_eq!(
        fails(&f),
        format!(
            "big.toml:{}: policy[1].rule[{last}].to[0].ports: port 0 is not in 1-65535",
            f.rule_line[last] + 3
        )
    );
    // An empty list in the last rule: the line of the list.
    let f = big_file(
        |i| {
            (i == last)
                .then(|| rule(i, "to = [{ ports = [80] }]\nwhen = [\n  { key = \"request.headers[a]\", values = [] },\n]"))
                .flatten()
        },
        "",
    );
    assert_eq!(
        fails(&f),
        format!(
            "big.toml:{}: policy[1].rule[{last}].when[0].values: empty list: it would match nothing; write the values, or leave `values` out",
            f.rule_line[last] + 5
        )
    );
    // A TOML error in the last rule: its line and the key written on it.
    let f = big_file(
        |i| {
            (i == last)
                .then(|| rule(i, "to = [{ ports = [80] }]\nprots = [80]"))
                .flatten()
        },
        "",
    );
    let e = parse("big.toml", &f.src)
        .err()
        .unwrap_or_else(|| panic!("expected an error"));
    assert_eq!(
        (e.line, e.field.as_str()),
        (f.rule_line[last] + 4, "prots"),
        "{e}"
    );
    assert!(e.message.contains("unknown field `prots`"), "{e}");
    // A test case naming a policy the file does not have.
    let f = big_file(
        |_| None,
        "[[test]]\nfrom = \"spiffe://t/a\"\nto_port = 80\nexpect = \"deny\"\nexpect_policy = \"nope\"\n",
    );
    assert_eq!(
        fails(&f),
        format!(
            "big.toml:{}: test[0].expect_policy: no policy named \"nope\" in this file",
            f.tail_line
        )
    );
}

// ---- evaluation order ----------------------------------------------------------

const ORDER: &str = r#"
[[policy]]
name = "allow-a"
action = "allow"
[[policy.rule]]
from = [{ identities = ["spiffe://t/a", "spiffe://t/b"] }]
to = [{ ports = [8080] }]

[[policy]]
name = "deny-b"
action = "deny"
[[policy.rule]]
from = [{ identities = ["spiffe://t/b"] }]

[[policy]]
name = "audit-all"
action = "audit"
[[policy.rule]]
"#;

#[test]
fn deny_beats_allow_then_allow_then_no_allow_matched() {
    let c = compile(ORDER);
    let d = decide(&c, &RequestSpec::tcp("spiffe://t/b", 8080));
    assert_eq!(d.deny_reason().map(DenyReason::name), Some("explicit_deny"));
    assert_eq!(c.describe(d.rule().unwrap()), "deny-b/0");

    let d = decide(&c, &RequestSpec::tcp("spiffe://t/a", 8080));
    assert!(d.is_allowed());
    assert_eq!(d.reason_name(), "allow_matched");
    assert_eq!(c.describe(d.rule().unwrap()), "allow-a/0");

    let d = decide(&c, &RequestSpec::tcp("spiffe://t/a", 9090));
    assert_eq!(d.verdict, Verdict::Deny(DenyReason::NoAllowMatched));
    assert_eq!(d.deny_reason().unwrap().http_status(), 403);
}

#[test]
fn audit_is_recorded_without_changing_the_decision() {
    let c = compile(ORDER);
    for (from, port, allow) in [
        ("spiffe://t/a", 8080, true),
        ("spiffe://t/b", 8080, false),
        ("spiffe://t/c", 1, false),
    ] {
        let d = decide(&c, &RequestSpec::tcp(from, port));
        assert_eq!(d.is_allowed(), allow, "{from}:{port}");
        assert_eq!(d.audit.len(), 1);
        assert_eq!(c.describe(d.audit[0]), "audit-all/0");
    }
    // Audit alone never decides: the default does.
    let c = compile_with(
        "[[policy]]\nname = \"au\"\naction = \"audit\"\n[[policy.rule]]\n",
        DefaultAction::Allow,
    );
    let d = decide(&c, &RequestSpec::tcp("spiffe://t/a", 1));
    assert_eq!(d.verdict, Verdict::Allow(AllowReason::DefaultAllow));
    assert_eq!(d.audit.len(), 1);
}

#[test]
fn mesh_default_applies_when_no_allow_policy_applies() {
    let deny_only =
        "[[policy]]\nname = \"d\"\naction = \"deny\"\n[[policy.rule]]\nto = [{ ports = [22] }]\n";
    let c = compile_with(deny_only, DefaultAction::Allow);
    assert_eq!(
        decide(&c, &RequestSpec::tcp("spiffe://t/a", 80)).reason_name(),
        "default_allow"
    );
    assert_eq!(
        decide(&c, &RequestSpec::tcp("spiffe://t/a", 22)).reason_name(),
        "explicit_deny"
    );
    let c = compile_with(deny_only, DefaultAction::Deny);
    assert_eq!(
        decide(&c, &RequestSpec::tcp("spiffe://t/a", 80)).reason_name(),
        "default_deny"
    );
    let c = CompiledPolicy::empty(DefaultAction::Deny);
    assert_eq!(
        decide(&c, &RequestSpec::tcp("spiffe://t/a", 80)).reason_name(),
        "default_deny"
    );
}

#[test]
fn allow_policy_without_rules_denies_what_it_selects() {
    let c = compile_with(
        "[[policy]]\nname = \"lock\"\naction = \"allow\"\n",
        DefaultAction::Allow,
    );
    assert_eq!(
        decide(&c, &RequestSpec::tcp("spiffe://t/a", 80)).reason_name(),
        "no_allow_matched"
    );
    // An empty rule matches everything.
    let c = allow_rule("");
    assert!(allowed(&c, &RequestSpec::tcp("spiffe://t/a", 80)));
}

#[test]
fn selectors_limit_where_policies_apply() {
    let c = compile_with(
        r#"
[[policy]]
name = "api-only"
action = "allow"
selector = { identities = ["spiffe://t/api"] }
[[policy.rule]]
from = [{ identities = ["spiffe://t/web"] }]

[[policy]]
name = "deny-db"
action = "deny"
selector = { groups = ["db"] }
[[policy.rule]]
"#,
        DefaultAction::Allow,
    );
    let mut to_api = RequestSpec::tcp("spiffe://t/other", 80);
    to_api.workload = Some("spiffe://t/api".into());
    assert_eq!(decide(&c, &to_api).reason_name(), "no_allow_matched");
    let mut to_cache = to_api.clone();
    to_cache.workload = Some("spiffe://t/cache".into());
    // The allow policy does not select the cache, so the mesh default decides.
    assert_eq!(decide(&c, &to_cache).reason_name(), "default_allow");
    to_cache.workload_groups = vec!["db".into()];
    assert_eq!(decide(&c, &to_cache).reason_name(), "explicit_deny");
    let e = explain(&c, &to_api);
    assert!(e.policies[1]
        .not_selected
        .as_deref()
        .unwrap()
        .contains("selector.groups"));
}

#[test]
fn first_matching_rule_in_file_order_decides() {
    let c = compile(
        r#"
[[policy]]
name = "wide"
action = "allow"
[[policy.rule]]
name = "any-port"
from = [{ identities = ["spiffe://t/*"] }]
[[policy]]
name = "narrow"
action = "allow"
[[policy.rule]]
from = [{ identities = ["spiffe://t/a"] }]
to = [{ ports = [80] }]
"#,
    );
    let d = decide(&c, &RequestSpec::tcp("spiffe://t/a", 80));
    assert_eq!(c.describe(d.rule().unwrap()), "wide/any-port");
}

// ---- matchers: from --------------------------------------------------------------

#[test]
fn identity_patterns() {
    let cases = [
        ("spiffe://t/web", "spiffe://t/web", true),
        ("spiffe://t/web", "spiffe://t/web2", false),
        ("spiffe://t/web-*", "spiffe://t/web-1", true),
        ("spiffe://t/web-*", "spiffe://t/api", false),
        ("*/web", "spiffe://u/web", true),
        ("*/web", "spiffe://u/web2", false),
        ("*", "spiffe://u/anything", true),
    ];
    for (pat, id, want) in cases {
        let c = allow_rule(&format!("from = [{{ identities = [\"{pat}\"] }}]"));
        assert_eq!(
            allowed(&c, &RequestSpec::tcp(id, 80)),
            want,
            "{pat} vs {id}"
        );
        let c = allow_rule(&format!("from = [{{ not_identities = [\"{pat}\"] }}]"));
        assert_eq!(
            allowed(&c, &RequestSpec::tcp(id, 80)),
            !want,
            "not {pat} vs {id}"
        );
    }
    // A source without an identity matches no identity pattern, even `*`.
    let c = allow_rule("from = [{ identities = [\"*\"] }]");
    let mut anon = RequestSpec::tcp("spiffe://t/x", 80);
    anon.from = None;
    assert!(!allowed(&c, &anon));
}

#[test]
fn groups_trust_domains_addresses() {
    let mut r = RequestSpec::tcp("spiffe://prod.example/web", 80);
    r.from_groups = vec!["web".into(), "eu".into()];
    r.from_address = Some("100.64.1.7".parse().unwrap());
    let table = [
        ("groups = [\"web\"]", true),
        ("groups = [\"db\", \"eu\"]", true),
        ("groups = [\"db\"]", false),
        ("not_groups = [\"eu\"]", false),
        ("not_groups = [\"db\"]", true),
        ("trust_domains = [\"prod.example\"]", true),
        ("trust_domains = [\"dev.example\"]", false),
        ("not_trust_domains = [\"prod.example\"]", false),
        ("not_trust_domains = [\"dev.example\"]", true),
        ("addresses = [\"100.64.1.0/24\"]", true),
        ("addresses = [\"100.64.1.7\"]", true),
        ("addresses = [\"100.64.2.0/24\"]", false),
        ("addresses = [\"fd00:6d65:7368::/48\"]", false),
        ("not_addresses = [\"100.64.0.0/10\"]", false),
        ("not_addresses = [\"100.65.0.0/16\"]", true),
        // Fields AND.
        ("groups = [\"web\"], addresses = [\"100.64.2.0/24\"]", false),
        (
            "groups = [\"web\"], trust_domains = [\"prod.example\"]",
            true,
        ),
    ];
    for (src, want) in table {
        let c = allow_rule(&format!("from = [{{ {src} }}]"));
        assert_eq!(allowed(&c, &r), want, "{src}");
    }
}

#[test]
fn from_entries_or() {
    let c = allow_rule("from = [{ identities = [\"spiffe://t/a\"] }, { groups = [\"ops\"] }]");
    assert!(allowed(&c, &RequestSpec::tcp("spiffe://t/a", 1)));
    let mut ops = RequestSpec::tcp("spiffe://t/z", 1);
    ops.from_groups = vec!["ops".into()];
    assert!(allowed(&c, &ops));
    assert!(!allowed(&c, &RequestSpec::tcp("spiffe://t/z", 1)));
}

/// Issue 18: an empty list or an entry that constrains nothing is refused, with the
/// line and the field, wherever it is written. A deny rule with `identities = []`
/// used to match nothing (so it silently denied nothing), and `from = [{}]` or
/// `from = []` to match every source.
#[test]
fn empty_lists_and_vacuous_entries_are_errors() {
    let head = "[[policy]]\nname = \"p\"\naction = \"deny\"\n";
    let table: &[(&str, usize, &str, &str)] = &[
        // (body after the policy head, line, field, message start)
        ("[[policy.rule]]\nfrom = [{ identities = [] }]", 5, "policy[0].rule[0].from[0].identities", "empty list: it would match nothing"),
        ("[[policy.rule]]\nfrom = [{ groups = [] }]", 5, "policy[0].rule[0].from[0].groups", "empty list"),
        ("[[policy.rule]]\nfrom = [{ trust_domains = [] }]", 5, "policy[0].rule[0].from[0].trust_domains", "empty list"),
        ("[[policy.rule]]\nfrom = [{ addresses = [] }]", 5, "policy[0].rule[0].from[0].addresses", "empty list"),
        ("[[policy.rule]]\nfrom = [{ identities = [\"*\"], not_groups = [] }]", 5, "policy[0].rule[0].from[0].not_groups", "empty list: it excludes nothing"),
        ("[[policy.rule]]\nto = [{ ports = [] }]", 5, "policy[0].rule[0].to[0].ports", "empty list"),
        ("[[policy.rule]]\nto = [{ ports = [80], protocols = [] }]", 5, "policy[0].rule[0].to[0].protocols", "empty list"),
        ("[[policy.rule]]\nto = [{ ports = [80], methods = [] }]", 5, "policy[0].rule[0].to[0].methods", "empty list"),
        ("[[policy.rule]]\nto = [{ ports = [80], paths = [] }]", 5, "policy[0].rule[0].to[0].paths", "empty list"),
        ("[[policy.rule]]\nto = [{ ports = [80], hosts = [] }]", 5, "policy[0].rule[0].to[0].hosts", "empty list"),
        ("[[policy.rule]]\nto = [{ ports = [80], not_paths = [] }]", 5, "policy[0].rule[0].to[0].not_paths", "empty list: it excludes nothing"),
        ("selector = { identities = [] }\n[[policy.rule]]", 4, "policy[0].selector.identities", "empty list"),
        ("selector = { groups = [] }\n[[policy.rule]]", 4, "policy[0].selector.groups", "empty list"),
        ("[[policy.rule]]\nfrom = [{}]", 5, "policy[0].rule[0].from[0]", "empty `from` entry: it would match any source"),
        ("[[policy.rule]]\nfrom = [\n  { groups = [\"a\"] },\n  {},\n]", 7, "policy[0].rule[0].from[1]", "empty `from` entry"),
        ("[[policy.rule]]\nto = [{}]", 5, "policy[0].rule[0].to[0]", "empty `to` entry: it would match any operation"),
        ("[[policy.rule]]\n[[policy.rule.to]]\n", 5, "policy[0].rule[0].to[0]", "empty `to` entry"),
        ("[[policy.rule]]\nfrom = []", 5, "policy[0].rule[0].from", "empty list: write the sources, or leave `from` out"),
        ("[[policy.rule]]\nto = []", 5, "policy[0].rule[0].to", "empty list"),
        ("[[policy.rule]]\nwhen = []", 5, "policy[0].rule[0].when", "empty list"),
        ("[[policy.rule]]\nto = [{ ports = [80] }]\nwhen = [{ key = \"request.headers[a]\", not_values = [] }]", 6, "policy[0].rule[0].when[0].not_values", "empty list"),
        ("[[policy.rule]]\nto = [{ ports = [80] }]\nwhen = [{ key = \"request.headers[a]\", values = [] }]", 6, "policy[0].rule[0].when[0].values", "empty list"),
        ("[[policy.rule]]\nto = [{ ports = [80] }]\nwhen = [{ key = \"request.headers[a]\" }]", 6, "policy[0].rule[0].when[0]", "a condition needs `values` or `not_values`"),
    ];
    for &(body, line, field, message) in table {
        let e = err(&format!("{head}{body}\n"));
        assert_eq!((e.line, e.field.as_str()), (line, field), "{body}: {e}");
        assert!(e.message.starts_with(message), "{body}: {e}");
    }
}

// ---- matchers: to --------------------------------------------------------------

#[test]
fn ports_and_protocols() {
    let mut udp = RequestSpec::tcp("spiffe://t/a", 53);
    udp.proto = Protocol::Udp;
    let mut icmp = RequestSpec::tcp("spiffe://t/a", 0);
    icmp.proto = Protocol::Icmp;
    let tcp53 = RequestSpec::tcp("spiffe://t/a", 53);
    let table: [(&str, [bool; 3]); 6] = [
        ("ports = [53]", [true, true, false]),
        ("ports = [53], protocols = [\"udp\"]", [false, true, false]),
        ("not_ports = [53]", [false, false, true]),
        ("protocols = [\"icmp\"]", [false, false, true]),
        ("protocols = [\"tcp\", \"udp\"]", [true, true, false]),
        ("ports = [80]", [false, false, false]),
    ];
    for (to, want) in table {
        let c = allow_rule(&format!("to = [{{ {to} }}]"));
        let got = [allowed(&c, &tcp53), allowed(&c, &udp), allowed(&c, &icmp)];
        assert_eq!(got, want, "{to}");
    }
    // `to` entries OR.
    let c = allow_rule("to = [{ ports = [80] }, { ports = [53], protocols = [\"udp\"] }]");
    assert!(allowed(&c, &udp));
    assert!(!allowed(&c, &tcp53));
    assert!(allowed(&c, &RequestSpec::tcp("spiffe://t/a", 80)));
}

#[test]
fn methods_and_paths() {
    let table = [
        ("methods = [\"GET\", \"HEAD\"]", "GET", "/x", true),
        ("methods = [\"GET\"]", "POST", "/x", false),
        ("not_methods = [\"DELETE\"]", "GET", "/x", true),
        ("not_methods = [\"DELETE\"]", "DELETE", "/x", false),
        ("paths = [\"/api/items\"]", "GET", "/api/items", true),
        ("paths = [\"/api/items\"]", "GET", "/api/items/1", false),
        ("paths = [\"/api/*\"]", "GET", "/api/items/1", true),
        ("paths = [\"/api/*\"]", "GET", "/api/", true),
        ("paths = [\"/api/*\"]", "GET", "/api", false),
        ("paths = [\"/api/*\"]", "GET", "/apix", false),
        ("paths = [\"*.png\"]", "GET", "/img/a.png", true),
        ("paths = [\"*.png\"]", "GET", "/img/a.png.txt", false),
        ("paths = [\"*\"]", "GET", "/anything", true),
        ("not_paths = [\"/admin/*\"]", "GET", "/admin/x", false),
        ("not_paths = [\"/admin/*\"]", "GET", "/public", true),
        (
            "paths = [\"/api/*\"], not_paths = [\"/api/private/*\"]",
            "GET",
            "/api/private/k",
            false,
        ),
        (
            "paths = [\"/api/*\"], not_paths = [\"/api/private/*\"]",
            "GET",
            "/api/public",
            true,
        ),
        (
            "methods = [\"GET\"], paths = [\"/api/*\"]",
            "POST",
            "/api/items",
            false,
        ),
    ];
    for (to, method, path, want) in table {
        let c = allow_rule(&format!("to = [{{ ports = [80], {to} }}]"));
        let r = RequestSpec::tcp("spiffe://t/a", 80).http(method, path);
        assert_eq!(allowed(&c, &r), want, "{to} vs {method} {path}");
    }
}

/// Issue 18: Istio's string match (exact, `prefix*`, `*suffix`, `*`) applies to
/// methods as to hosts, paths and header values; `methods = ["*"]` was literal, so a
/// deny on it denied nothing.
#[test]
fn methods_match_like_every_istio_string_field() {
    let c = compile(
        r#"
[[policy]]
name = "no-writes"
action = "deny"
[[policy.rule]]
to = [{ ports = [80], methods = ["P*", "*TE"] }]
[[policy]]
name = "lock"
action = "deny"
[[policy.rule]]
to = [{ ports = [81], methods = ["*"] }]
[[policy]]
name = "open"
action = "allow"
[[policy.rule]]
to = [{ ports = [80, 81], protocols = ["tcp"] }]
"#,
    );
    for (method, port, want) in [
        ("GET", 80, true),
        ("POST", 80, false),
        ("PUT", 80, false),
        ("PATCH", 80, false),
        ("DELETE", 80, false),
        ("OPTIONS", 80, true),
        ("GET", 81, false),
        ("HEAD", 81, false),
        ("BREW", 81, false),
    ] {
        let r = RequestSpec::tcp("spiffe://t/a", port).http(method, "/");
        assert_eq!(allowed(&c, &r), want, "{method} to {port}");
    }
    // A `*` inside a value would be literal: refused for methods, paths and hosts.
    for (to, field) in [
        ("methods = [\"G*T\"]", "methods"),
        ("methods = [\"**\"]", "methods"),
        ("paths = [\"/api/*/items\"]", "paths"),
        ("not_paths = [\"*/a*\"]", "not_paths"),
        ("hosts = [\"api.*.example.org\"]", "hosts"),
    ] {
        let e = err(&format!(
            "[[policy]]\nname = \"p\"\naction = \"deny\"\n[[policy.rule]]\nto = [{{ ports = [80], {to} }}]\n"
        ));
        assert_eq!(e.field, format!("policy[0].rule[0].to[0].{field}"), "{e}");
        assert!(e.message.contains("`*` is a wildcard only"), "{e}");
    }
}

/// Istio 1.22+ path templates, matched as Envoy's URI template matcher does
/// (`{*}` = `[^/]+`, `{**}` = `.*`, joined by `/`); Istio's documented examples.
#[test]
fn path_templates() {
    let table: &[(&str, &str, bool)] = &[
        ("/foo/{*}", "/foo/bar", true),
        ("/foo/{*}", "/foo/bar/baz", false),
        ("/foo/{*}", "/foo/", false),
        ("/foo/{*}", "/foo", false),
        ("/foo/{**}/", "/foo/bar/", true),
        ("/foo/{**}/", "/foo/bar/baz/", true),
        ("/foo/{**}/", "/foo/bar", false),
        // Istio's page lists this as a match; Envoy's regex (`/foo/[..]*/`) does not.
        ("/foo/{**}/", "/foo/bar/baz.txt", false),
        ("/foo/{*}/bar/{**}", "/foo/buzz/bar/", true),
        ("/foo/{*}/bar/{**}", "/foo/buzz/bar/baz", true),
        ("/foo/{*}/bar/{**}", "/foo/buzz/bar", false),
        ("/foo/{*}/bar/{**}", "/foo/a/b/bar/baz", false),
        ("/a/{**}", "/a/", true),
        ("/a/{**}", "/a/b/c", true),
        ("/a/{**}", "/a", false),
        ("/a/{**}", "/ab", false),
        ("/a/{**}/b", "/a/x/y/b", true),
        ("/a/{**}/b", "/a/x/b", true),
        ("/a/{**}/b", "/a/b", false),
        ("/a/{**}/b", "/a/x/b/c", false),
        ("/{**}", "/", true),
        ("/{**}", "/anything/at/all", true),
        ("/{**}", "*", false),
        ("/{*}/{*}", "/a/b", true),
        ("/{*}/{*}", "/a/b/", false),
    ];
    for &(pattern, path, want) in table {
        let c = allow_rule(&format!(
            "to = [{{ ports = [80], paths = [\"{pattern}\"] }}]"
        ));
        assert_eq!(
            allowed(&c, &get("spiffe://t/a", 80, path)),
            want,
            "{pattern} vs {path}"
        );
    }
    for (bad, why) in [
        ("/*/baz/{*}", "may appear only as a whole segment"),
        ("/**/baz/{*}", "may appear only as a whole segment"),
        ("/{**}/foo/{*}", "must be the last operator"),
        ("/{**}/{**}", "must be the last operator"),
        ("/foo/{*}.txt", "may appear only as a whole segment"),
        ("/foo/{x}/{*}", "may appear only as a whole segment"),
        ("foo/{*}", "starts with '/'"),
        ("/a//{*}", "empty segment"),
    ] {
        let e = err(&format!(
            "[[policy]]\nname = \"p\"\naction = \"deny\"\n[[policy.rule]]\nto = [{{ ports = [80], paths = [\"{bad}\"] }}]\n"
        ));
        assert_eq!(e.field, "policy[0].rule[0].to[0].paths", "{e}");
        assert!(e.message.contains(why), "{bad}: {e}");
    }
}

/// Issue 18: path patterns are spelled as normalised requests are (the same
/// `http_path` rules), so a pattern catches every spelling of what it names; one that
/// no normalised path can match is refused.
#[test]
fn path_patterns_are_normalised_like_requests() {
    let table: &[(&str, &str, bool)] = &[
        // A prefix with a character outside ASCII catches it encoded, in either case.
        ("/admin/\u{fc}*", "/admin/%C3%BCber", true),
        ("/admin/\u{fc}*", "/admin/%c3%bcber", true),
        ("/admin/\u{fc}*", "/admin/\u{fc}ber", true),
        ("/admin/\u{fc}*", "/admin/uber", false),
        ("/%c3%bc", "/\u{fc}", true),
        ("/%c3%bc", "/%C3%BC", true),
        // Unreserved characters are decoded in patterns as in requests.
        ("/%7Eadmin", "/~admin", true),
        ("/%7Eadmin", "/%7eadmin", true),
        ("/%61pi/*", "/api/x", true),
        ("*/%69nfo", "/x/info", true),
        ("*.%70ng", "/a.png", true),
        // Other escapes are kept, hex upper-cased.
        ("/a%20b", "/a%20b", true),
        ("/a%2ab", "/a%2Ab", true),
        ("/a%2ab", "/a*b", false),
        // Dot segments and repeated slashes resolve in whole segments...
        ("/a/./b", "/a/b", true),
        ("/a/x/../b", "/a/b", true),
        ("//admin", "/admin", true),
        ("/api/./*", "/api/x", true),
        // ...but a cut segment is only decoded: `/a/.*` is a prefix of `/a/.env`.
        ("/a/.*", "/a/.env", true),
        ("/a/.*", "/a/b", false),
        ("/api/{*}/%7Ex", "/api/1/~x", true),
    ];
    for &(pattern, path, want) in table {
        let c = allow_rule(&format!(
            "to = [{{ ports = [80], paths = [\"{pattern}\"] }}]"
        ));
        // As the enforcer decides: the request's path normalised first.
        assert_eq!(
            get("spiffe://t/a", 80, path).decide(&c).is_allowed(),
            want,
            "{pattern} vs {path}"
        );
    }
    // What the set holds is the normalised spelling (explain shows it).
    let c = allow_rule("to = [{ ports = [80], paths = [\"/%7Eadmin/%c3%bc*\"] }]");
    assert_eq!(
        c.set().policies[0].rules[0].to[0].paths.as_ref().unwrap()[0].to_string(),
        "/~admin/%C3%BC*"
    );
    for (bad, why) in [
        (
            "/admin%2F*",
            "can never match: request target contains an encoded `/`",
        ),
        ("/admin%2fx", "can never match"),
        ("/a\\\\b", "can never match"),
        (
            "/admin;x",
            "can never match: request target has path parameters",
        ),
        ("*;jsessionid", "can never match"),
        (
            "/%c0%af",
            "can never match: request target has bytes that are not UTF-8",
        ),
        ("/caf%C3*", "not UTF-8"),
        ("/a%00", "control character"),
        ("/a%zz", "`%` not followed by two hex digits"),
        ("/a?b=1", "without the query"),
        ("/a#x", "without the query or fragment"),
        ("api", "starts with '/'"),
        ("api/*", "starts with '/'"),
        ("*/../x", "no `.` or `..` segments"),
        ("*/x/.", "no `.` or `..` segments"),
        ("*//x", "empty segment"),
        ("/a/{*}/..", "no `.` or `..` segments"),
    ] {
        let e = err(&format!(
            "[[policy]]\nname = \"p\"\naction = \"deny\"\n[[policy.rule]]\nto = [{{ ports = [80], paths = [\"{bad}\"] }}]\n"
        ));
        assert_eq!(e.field, "policy[0].rule[0].to[0].paths", "{bad}: {e}");
        assert!(e.message.contains(why), "{bad}: {e}");
    }
}

#[test]
fn hosts_with_ports_case_and_wildcards() {
    let table = [
        ("example.com", "example.com", true),
        ("example.com", "EXAMPLE.com:8080", true),
        ("example.com", "example.org", false),
        ("example.com:8080", "example.com:8080", true),
        ("example.com:8080", "example.com:9090", false),
        ("example.com:8080", "example.com", false),
        ("example.com:80", "example.com", true),
        ("*.example.com", "api.example.com", true),
        ("*.example.com", "api.example.com:443", true),
        ("*.example.com", "example.com", false),
        ("api.*", "api.internal", true),
        ("*", "anything:1", true),
        ("[fd00::1]:8080", "[FD00::1]:8080", true),
        ("[fd00::1]", "[fd00::1]:80", true),
    ];
    for (pat, host, want) in table {
        let c = allow_rule(&format!("to = [{{ ports = [80], hosts = [\"{pat}\"] }}]"));
        let mut r = get("spiffe://t/a", 80, "/");
        r.http.as_mut().unwrap().host = Some(host.into());
        assert_eq!(allowed(&c, &r), want, "{pat} vs {host}");
        let c = allow_rule(&format!(
            "to = [{{ ports = [80], not_hosts = [\"{pat}\"] }}]"
        ));
        assert_eq!(allowed(&c, &r), !want, "not {pat} vs {host}");
    }
    // No Host header: `hosts` fails, `not_hosts` holds.
    let c = allow_rule("to = [{ ports = [80], hosts = [\"*\"] }]");
    assert!(!allowed(&c, &get("spiffe://t/a", 80, "/")));
    let c = allow_rule("to = [{ ports = [80], not_hosts = [\"*\"] }]");
    assert!(allowed(&c, &get("spiffe://t/a", 80, "/")));
}

#[test]
fn header_conditions() {
    let with = |headers: &[&str]| {
        let mut r = get("spiffe://t/a", 80, "/");
        r.http.as_mut().unwrap().headers =
            headers.iter().map(|h| parse_header(h).unwrap()).collect();
        r
    };
    let table = [
        ("values = [\"prod\"]", vec!["X-Env: prod"], true),
        ("values = [\"prod\"]", vec!["x-env: dev"], false),
        ("values = [\"prod\"]", vec![], false),
        // A header sent twice is one value, joined by ",", as Envoy matches it
        // (issue 18: each value used to be matched alone).
        (
            "values = [\"prod\"]",
            vec!["x-env: dev", "x-env: prod"],
            false,
        ),
        (
            "values = [\"dev,prod\"]",
            vec!["x-env: dev", "x-env: prod"],
            true,
        ),
        (
            "values = [\"dev,*\"]",
            vec!["x-env: dev", "x-env: prod"],
            true,
        ),
        (
            "values = [\"*,prod\"]",
            vec!["x-env: dev", "x-env: prod"],
            true,
        ),
        (
            "values = [\"*v,pr*\"]",
            vec!["x-env: dev", "x-env: prod"],
            false,
        ),
        (
            "values = [\"dev,p*\"]",
            vec!["x-env: dev", "X-Env: prod"],
            true,
        ),
        (
            "values = [\"a,,c\"]",
            vec!["x-env: a", "x-env: ", "x-env: c"],
            true,
        ),
        ("values = [\"*\"]", vec!["x-env: ", "x-env: "], true),
        (
            "not_values = [\"prod\"]",
            vec!["x-env: prod", "x-env: prod"],
            true,
        ),
        (
            "not_values = [\"prod,prod\"]",
            vec!["x-env: prod", "x-env: prod"],
            false,
        ),
        (
            "not_values = [\"*,prod\"]",
            vec!["x-env: dev", "x-env: prod"],
            false,
        ),
        (
            "not_values = [\"de*\"]",
            vec!["x-env: dev", "x-env: prod"],
            false,
        ),
        ("values = [\"pr*\"]", vec!["x-env: prod"], true),
        ("values = [\"*od\"]", vec!["x-env: prod"], true),
        ("values = [\"*\"]", vec!["x-env: "], true),
        ("values = [\"*\"]", vec![], false),
        ("not_values = [\"dev\"]", vec!["x-env: prod"], true),
        ("not_values = [\"dev\"]", vec!["x-env: dev"], false),
        ("not_values = [\"dev\"]", vec![], true),
        ("not_values = [\"*\"]", vec![], true),
        ("not_values = [\"*\"]", vec!["x-env: x"], false),
        (
            "values = [\"prod\"], not_values = [\"prod-eu\"]",
            vec!["x-env: prod"],
            true,
        ),
    ];
    for (cond, headers, want) in table {
        let c = allow_rule(&format!(
            "to = [{{ ports = [80] }}]\nwhen = [{{ key = \"request.headers[X-Env]\", {cond} }}]"
        ));
        assert_eq!(allowed(&c, &with(&headers)), want, "{cond} vs {headers:?}");
    }
    // Conditions AND.
    let c = allow_rule(
        "to = [{ ports = [80] }]\nwhen = [{ key = \"request.headers[a]\", values = [\"1\"] }, { key = \"request.headers[b]\", values = [\"2\"] }]",
    );
    assert!(allowed(&c, &with(&["a: 1", "b: 2"])));
    assert!(!allowed(&c, &with(&["a: 1"])));
}

#[test]
fn http_fields_without_http_attributes() {
    // Istio's reading, where a request has no HTTP attributes on a port that is not
    // inspected: allow rules with HTTP fields do not match it, deny rules ignore those
    // fields and match (fail closed). On an inspected port it is `not_http` (below).
    let c = compile(
        r#"
[[policy]]
name = "deny-post"
action = "deny"
[[policy.rule]]
to = [{ ports = [80], methods = ["POST"] }]
[[policy]]
name = "allow-get"
action = "allow"
[[policy.rule]]
to = [{ ports = [80, 81], methods = ["GET"] }]
"#,
    );
    RequestSpec::tcp("spiffe://t/a", 80).with_request(|r| {
        let deny = RuleRef { policy: 0, rule: 0 };
        assert_eq!(c.first_match(Action::Deny, r), Some(deny));
        assert_eq!(c.first_match(Action::Allow, r), None);
    });
    assert!(allowed(&c, &get("spiffe://t/a", 80, "/")));
    assert!(!allowed(
        &c,
        &RequestSpec::tcp("spiffe://t/a", 80).http("POST", "/")
    ));
}

/// Issue 18: a port is inspected (non-HTTP refused as `not_http`) only for the
/// workloads a policy with HTTP fields selects, only through allow and deny rules,
/// only on the ports those rules name; UDP there is refused unless a rule names udp
/// with the port. A rule with HTTP fields and no ports is an error.
#[test]
fn inspection_follows_the_selector_the_action_and_the_ports() {
    let c = compile(
        r#"
[[policy]]
name = "api"
action = "allow"
selector = { identities = ["spiffe://t/api"] }
[[policy.rule]]
to = [{ ports = [8080], paths = ["/api/*"] }, { ports = [5432] }]
[[policy.rule]]
to = [{ ports = [9000] }]
when = [{ key = "request.headers[x]", values = ["y"] }]
[[policy.rule]]
to = [{ ports = [8443], methods = ["GET"] }, { ports = [8443], protocols = ["udp"] }]

[[policy]]
name = "no-admin"
action = "deny"
selector = { groups = ["web"] }
[[policy.rule]]
to = [{ ports = [80, 81], not_ports = [81], paths = ["/admin/*"] }]

[[policy]]
name = "watch"
action = "audit"
[[policy.rule]]
to = [{ ports = [7000], paths = ["*"] }]
"#,
    );
    let at = |wl: Option<&str>, groups: &[&str], proto: Protocol, port: u16| {
        let mut spec = to_workload(wl, groups);
        spec.to_port = port;
        spec.proto = proto;
        spec.with_request(|r| c.inspects(r))
    };
    let api = Some("spiffe://t/api");
    let other = Some("spiffe://t/other");
    use Protocol::{Icmp, Tcp, Udp};
    // (workload, groups, protocol, port, inspected)
    type Case<'a> = (Option<&'a str>, &'a [&'a str], Protocol, u16, bool);
    let table: &[Case] = &[
        (api, &[], Tcp, 8080, true),
        (api, &[], Tcp, 9000, true),
        (api, &[], Tcp, 8443, true),
        (api, &[], Tcp, 5432, false),
        (api, &[], Tcp, 22, false),
        // Another workload: the policy does not select it.
        (other, &[], Tcp, 8080, false),
        (None, &[], Tcp, 8080, false),
        // Deny rules inspect too, on the ports they name less not_ports.
        (other, &["web"], Tcp, 80, true),
        (other, &["web"], Tcp, 81, false),
        (other, &[], Tcp, 80, false),
        // Audit never makes a port inspected.
        (api, &[], Tcp, 7000, false),
        (other, &["web"], Tcp, 7000, false),
        // UDP to an inspected port is refused unless a rule names udp with it.
        (api, &[], Udp, 8080, true),
        (api, &[], Udp, 9000, true),
        (api, &[], Udp, 8443, false),
        (api, &[], Udp, 5432, false),
        (other, &[], Udp, 8080, false),
        (api, &[], Icmp, 8080, false),
    ];
    for &(wl, groups, proto, port, want) in table {
        assert_eq!(
            at(wl, groups, proto, port),
            want,
            "{wl:?} {groups:?} {proto} {port}"
        );
    }
    // What that means for a request described without HTTP attributes.
    let to = |wl: Option<&str>, proto: Protocol, port: u16| {
        let mut spec = to_workload(wl, &[]);
        spec.to_port = port;
        spec.proto = proto;
        spec.decide(&c).reason_name()
    };
    assert_eq!(to(api, Tcp, 8080), "not_http");
    assert_eq!(to(api, Udp, 8080), "not_http");
    assert_eq!(to(api, Udp, 8443), "allow_matched");
    assert_eq!(to(api, Tcp, 5432), "allow_matched");
    // For another workload the API's HTTP rules change nothing: the mesh default.
    assert_eq!(to(other, Tcp, 8080), "default_deny");
    // A rule with HTTP fields and no ports is an error, wherever the fields are.
    for (rule, line, field) in [
        ("to = [{ paths = [\"/a\"] }]", 5, "policy[0].rule[0].to[0]"),
        ("to = [{ ports = [80] }, { methods = [\"GET\"] }]", 5, "policy[0].rule[0].to[1]"),
        ("to = [{ not_ports = [22], hosts = [\"a\"] }]", 5, "policy[0].rule[0].to[0]"),
        ("when = [{ key = \"request.headers[a]\", values = [\"1\"] }]", 5, "policy[0].rule[0].when"),
        (
            "to = [{ protocols = [\"tcp\"] }]\nwhen = [{ key = \"request.headers[a]\", values = [\"1\"] }]",
            5,
            "policy[0].rule[0].to[0]",
        ),
    ] {
        for action in ["allow", "deny", "audit"] {
            let e = err(&format!(
                "[[policy]]\nname = \"p\"\naction = \"{action}\"\n[[policy.rule]]\n{rule}\n"
            ));
            assert_eq!((e.line, e.field.as_str()), (line, field), "{rule}: {e}");
            assert!(e.message.contains("need `ports`"), "{rule}: {e}");
        }
    }
}

/// `policy check` says where inspection changes what a rule seems to say: udp refused
/// on an HTTP port though the rule names no protocol, and an audit rule with HTTP
/// fields on a port nothing inspects.
#[test]
fn inspection_warnings() {
    let w = warnings(
        r#"
[[policy]]
name = "web"
action = "allow"
selector = { identities = ["spiffe://t/web"] }
[[policy.rule]]
to = [{ ports = [8080], methods = ["GET"] }]
[[policy.rule]]
to = [{ ports = [8080, 5432] }]
[[policy.rule]]
to = [{ ports = [8080], protocols = ["tcp"] }]
[[policy.rule]]
from = [{ identities = ["spiffe://t/ops"] }]

[[policy]]
name = "db"
action = "allow"
selector = { identities = ["spiffe://t/db"] }
[[policy.rule]]
to = [{ ports = [8080] }]

[[policy]]
name = "watch"
action = "audit"
[[policy.rule]]
to = [{ ports = [8080, 7000], paths = ["/admin/*"] }]
"#,
    );
    let all = w.join("\n");
    assert!(
        all.contains("p.toml:8: warning: policy[0].rule[1].to[0]: udp to port 8080 is refused (not_http), though this rule names no protocol"),
        "{all}"
    );
    assert!(
        all.contains("p.toml:12: warning: policy[0].rule[3]: udp to port 8080 is refused"),
        "{all}"
    );
    assert!(
        all.contains(
            "p.toml:25: warning: policy[2].rule[0].to[0]: port 7000 is not inspected at layer 7"
        ),
        "{all}"
    );
    // `db` is another workload: its 8080 is not inspected, udp there is its own.
    assert_eq!(w.len(), 3, "{all}");
}

// ---- explain and the runner ------------------------------------------------------

#[test]
fn explain_names_decider_and_why_others_missed() {
    let c = compile(ORDER);
    let e = explain(&c, &RequestSpec::tcp("spiffe://t/c", 9090));
    assert_eq!(e.decision.decision, "deny");
    assert_eq!(e.decision.reason, "no_allow_matched");
    let why = e.policies[0].rules[0].why_not.as_deref().unwrap();
    assert!(
        why.contains("from[0].identities: spiffe://t/c not in [spiffe://t/a, spiffe://t/b]"),
        "{why}"
    );
    let text = e.to_string();
    assert!(
        text.starts_with("deny (no_allow_matched, http 403)\n"),
        "{text}"
    );
    assert!(
        text.contains("audit-all/0 (audit, line 18): matched (audit)"),
        "{text}"
    );

    let e = explain(&c, &RequestSpec::tcp("spiffe://t/a", 9090));
    let why = e.policies[0].rules[0].why_not.as_deref().unwrap();
    assert_eq!(why, "to[0].ports: 9090 not in [8080]");
    let e = explain(&c, &RequestSpec::tcp("spiffe://t/b", 8080));
    assert_eq!(
        (e.decision.policy.as_deref(), e.decision.rule.as_deref()),
        (Some("deny-b"), Some("0"))
    );
    assert!(
        e.to_string().contains("deny-b/0 (deny, line 12): DECIDED"),
        "{e}"
    );
    let json = serde_json::to_value(&e).unwrap();
    assert_eq!(json["decision"], "deny");
    assert_eq!(json["reason"], "explicit_deny");
    assert_eq!(json["status"], 403);
}

/// Issue 18: explain and `[[test]]` report what the data path does, `not_http` and
/// the refusal at a connection's opening included; HTTP attributes on a port that is
/// not inspected are not read (a path the enforcer would refuse is not refused there).
#[test]
fn explain_and_tests_report_what_the_data_path_does() {
    let src = r#"
[[policy]]
name = "api"
action = "allow"
[[policy.rule]]
name = "read"
from = [{ identities = ["spiffe://t/web"] }]
to = [{ ports = [8080], methods = ["GET"] }, { ports = [22], protocols = ["tcp"] }]

[[policy]]
name = "watch"
action = "audit"
[[policy.rule]]
to = [{ ports = [22, 8080], paths = ["*"] }]

[[test]]
name = "not HTTP on the HTTP port"
from = "spiffe://t/web"
to_port = 8080
expect = "deny"
expect_reason = "not_http"

[[test]]
name = "udp to the HTTP port"
from = "spiffe://t/web"
to_port = 8080
proto = "udp"
expect = "deny"
expect_reason = "not_http"

[[test]]
name = "ssh with an HTTP path the enforcer never reads"
from = "spiffe://t/web"
to_port = 22
path = "/a%2Fb"
expect = "allow"
expect_reason = "allow_matched"
"#;
    let c = compile(src);
    let results = run_tests(&c);
    assert!(all_passed(&results), "{results:#?}");

    let e = explain(&c, &RequestSpec::tcp("spiffe://t/web", 8080));
    assert_eq!(
        (e.decision.reason.as_str(), e.stage, e.l7),
        ("not_http", Stage::NotHttp, true)
    );
    assert_eq!(e.decision.status, Some(400));
    let text = e.to_string();
    assert!(text.starts_with("deny (not_http, http 400)\n"), "{text}");
    assert!(
        text.contains("note: port 8080 is inspected at layer 7 for this workload"),
        "{text}"
    );
    assert!(
        text.contains("api/read (allow, line 5): could match a request (HTTP fields not read)"),
        "{text}"
    );

    // No rule could allow batch on 8080: refused when its connection opens, with the
    // reason of every request it could send.
    let e = explain(&c, &get("spiffe://t/batch", 8080, "/x"));
    assert_eq!(
        (e.decision.reason.as_str(), e.stage),
        ("no_allow_matched", Stage::Opening)
    );
    assert!(
        e.to_string()
            .contains("note: refused when the connection opens"),
        "{e}"
    );
    // ...before its path is read: not malformed.
    let e = explain(&c, &get("spiffe://t/batch", 8080, "/a%2Fb"));
    assert_eq!(
        (e.decision.reason.as_str(), e.stage),
        ("no_allow_matched", Stage::Opening)
    );

    let mut udp = RequestSpec::tcp("spiffe://t/web", 8080);
    udp.proto = Protocol::Udp;
    let e = explain(&c, &udp);
    assert_eq!(
        (e.decision.reason.as_str(), e.stage),
        ("not_http", Stage::NotHttp)
    );
    assert!(e.to_string().contains("no rule there names udp"), "{e}");

    // Port 22 is not inspected: HTTP attributes are not read, audit rules with HTTP
    // fields do not match there, the path is not normalised.
    let e = explain(&c, &get("spiffe://t/web", 22, "/a%2Fb"));
    assert_eq!(
        (e.decision.reason.as_str(), e.stage, e.l7),
        ("allow_matched", Stage::Layer4, false)
    );
    assert!(e.decision.audit.is_empty(), "{:?}", e.decision.audit);
    assert_eq!((&e.path_error, &e.normalized_path), (&None, &None));
    assert!(
        e.to_string()
            .contains("note: port 22 is not inspected at layer 7"),
        "{e}"
    );

    // A request on the inspected port is decided with its attributes; audit records it.
    let e = explain(&c, &get("spiffe://t/web", 8080, "/x"));
    assert_eq!(
        (e.decision.reason.as_str(), e.stage),
        ("allow_matched", Stage::Request)
    );
    assert_eq!(e.decision.audit, ["watch/0"]);
    assert_eq!(e.note, None);
    let json = serde_json::to_value(&e).unwrap();
    assert_eq!(json["stage"], "request");
}

#[test]
fn runner_reports_each_case() {
    let src = format!(
        "{ORDER}
[[test]]
name = \"a allowed\"
from = \"spiffe://t/a\"
to_port = 8080
expect = \"allow\"
expect_policy = \"allow-a\"
expect_rule = 0

[[test]]
name = \"wrong on purpose\"
from = \"spiffe://t/b\"
to_port = 8080
expect = \"allow\"

[[test]]
name = \"reason\"
from = \"spiffe://t/c\"
to_port = 8080
expect = \"deny\"
expect_reason = \"default_deny\"
"
    );
    let loaded = load("p.toml", &src, DefaultAction::Deny).unwrap();
    let r = &loaded.results;
    assert_eq!(r.len(), 3);
    assert!(r[0].passed, "{:?}", r[0]);
    assert!(!r[1].passed);
    assert_eq!(r[1].failure.as_deref(), Some("expected allow, got deny"));
    assert_eq!(r[1].got.policy.as_deref(), Some("deny-b"));
    assert!(!r[2].passed);
    assert_eq!(
        r[2].failure.as_deref(),
        Some("expected reason default_deny, got no_allow_matched")
    );
    assert!(!loaded.tests_passed());
    assert_eq!(
        loaded.failure_summary().as_deref(),
        Some("p.toml: 2 of 3 policy tests failed: \"wrong on purpose\" (line 28): expected allow, got deny; \"reason\" (line 34): expected reason default_deny, got no_allow_matched")
    );
}

#[test]
fn deny_reasons_have_stable_names_and_statuses() {
    let table = [
        (
            DenyReason::ExplicitDeny(RuleRef { policy: 0, rule: 0 }),
            "explicit_deny",
            403,
        ),
        (DenyReason::NoAllowMatched, "no_allow_matched", 403),
        (DenyReason::DefaultDeny, "default_deny", 403),
        (DenyReason::MalformedRequest, "malformed_request", 400),
        (DenyReason::HeadTooLarge, "head_too_large", 431),
        (DenyReason::RequestTimeout, "request_timeout", 408),
        (DenyReason::NotHttp, "not_http", 400),
        (DenyReason::Fragment, "fragment", 400),
        (DenyReason::FlowTableFull, "flow_table_full", 503),
        (DenyReason::BufferFull, "buffer_full", 503),
        (DenyReason::FlowEvicted, "flow_evicted", 503),
        (DenyReason::RateLimited, "rate_limited", 429),
        (DenyReason::CircuitOpen, "circuit_open", 503),
        (DenyReason::DeliveryLost, "delivery_lost", 502),
        (DenyReason::IdentityRemoved, "identity_removed", 503),
    ];
    for (r, name, status) in table {
        assert_eq!((r.name(), r.http_status()), (name, status));
        assert_eq!(serde_json::to_string(&r).unwrap(), format!("\"{name}\""));
    }
    assert_eq!(DenyReason::PLAIN.len(), table.len() - 1);
}

// ---- the index -------------------------------------------------------------------

fn selected(p: &Policy, req: &Request<'_>) -> bool {
    match &p.selector {
        None => true,
        Some(s) => super::eval::selector_mismatch(s, req).is_none(),
    }
}

/// Is the request's port inspected for its workload, by scanning every rule?
fn inspects_by_scan(c: &CompiledPolicy, req: &Request<'_>) -> bool {
    let (mut http, mut udp) = (false, false);
    for p in &c.set().policies {
        if p.action == Action::Audit || !selected(p, req) {
            continue;
        }
        for rule in &p.rules {
            for op in &rule.to {
                let names = op
                    .ports
                    .as_ref()
                    .is_some_and(|ports| ports.contains(&req.dst_port))
                    && !op.not_ports.contains(&req.dst_port);
                http |= names && (op.is_l7() || !rule.when.is_empty()) && op.allows(Protocol::Tcp);
                udp |= names
                    && op
                        .protocols
                        .as_ref()
                        .is_some_and(|p| p.contains(&Protocol::Udp));
            }
        }
    }
    match req.protocol {
        Protocol::Tcp => http,
        Protocol::Udp => http && !udp,
        Protocol::Icmp => false,
    }
}

/// Reference evaluator: Istio's order over every rule, no index; on an inspected
/// port a request without HTTP attributes is refused before policy, naming the
/// first deny rule that matches every request if there is one.
fn brute_force(c: &CompiledPolicy, req: &Request<'_>) -> (bool, Option<RuleRef>) {
    if req.http.is_none() && inspects_by_scan(c, req) {
        let every = if req.protocol == Protocol::Tcp {
            scan(c, Action::Deny, req, HttpAbsent::MatchIfEvery)
                .first()
                .copied()
        } else {
            None
        };
        return (false, every);
    }
    let set = c.set();
    let matching = |action: Action| {
        set.policies.iter().enumerate().flat_map(move |(pi, p)| {
            p.rules.iter().enumerate().filter_map(move |(ri, rule)| {
                let selected = selected(p, req);
                (p.action == action
                    && selected
                    && rule_mismatch(rule, req, HttpAbsent::of(action)).is_none())
                .then_some(RuleRef {
                    policy: pi as u32,
                    rule: ri as u32,
                })
            })
        })
    };
    if let Some(r) = matching(Action::Deny).next() {
        return (false, Some(r));
    }
    let applies = set
        .policies
        .iter()
        .any(|p| p.action == Action::Allow && selected(p, req));
    if applies {
        let r = matching(Action::Allow).next();
        return (r.is_some(), r);
    }
    (c.default_action() == DefaultAction::Allow, None)
}

#[test]
fn index_skips_unrelated_rules_but_agrees_with_brute_force() {
    let mut src = String::new();
    for i in 0..2000 {
        src += &format!(
            "[[policy]]\nname = \"p{i}\"\naction = \"{}\"\n[[policy.rule]]\nfrom = [{{ identities = [\"spiffe://t/s{}\"] }}]\nto = [{{ ports = [{}] }}]\n",
            if i % 7 == 0 { "deny" } else { "allow" },
            i % 50,
            1000 + i % 40
        );
    }
    src += "[[policy]]\nname = \"wild\"\naction = \"allow\"\n[[policy.rule]]\nfrom = [{ identities = [\"spiffe://t/w*\"] }]\n";
    let c = compile(&src);
    for s in 0..55 {
        for port in 995..1045 {
            let spec = RequestSpec::tcp(&format!("spiffe://t/s{s}"), port);
            spec.with_request(|req| {
                let d = evaluate(&c, req);
                assert_eq!(
                    (d.is_allowed(), d.rule()),
                    brute_force(&c, req),
                    "s{s}:{port}"
                );
            });
        }
    }
    assert!(allowed(&c, &RequestSpec::tcp("spiffe://t/w1", 1)));
    // Only the rules filed under the request's port and identity are looked at: of
    // 2001 rules, the 10 for exactly s3 on port 1003 (i = 3 mod 200); the prefix
    // `spiffe://t/w*` is not a prefix of s3's identity.
    RequestSpec::tcp("spiffe://t/s3", 1003).with_request(|req| {
        let n = c.candidates(Action::Allow, req) + c.candidates(Action::Deny, req);
        assert_eq!(n, 10);
    });
    assert_eq!(c.rule_count(), 2001);
    let last = RuleRef {
        policy: 2000,
        rule: 0,
    };
    assert_eq!(c.rule_slot(last), 2000);
    assert_eq!(c.rules().nth(2000), Some((last, "wild/0".to_string())));
}

/// Allow policy `p` with one named rule per `(name, from)`, all on port 80.
fn allow_rules(rules: &[(&str, &str)]) -> CompiledPolicy {
    let mut src = String::from("[[policy]]\nname = \"p\"\naction = \"allow\"\n");
    for (name, from) in rules {
        src += &format!(
            "[[policy.rule]]\nname = \"{name}\"\nfrom = [{from}]\nto = [{{ ports = [80] }}]\n"
        );
    }
    compile(&src)
}

/// The deciding rule's label for a TCP request to port 80 (`None` = identity-less).
fn deciding_rule(c: &CompiledPolicy, from: Option<&str>) -> Option<String> {
    let mut spec = RequestSpec::tcp("spiffe://t/unused", 80);
    spec.from = from.map(String::from);
    let d = decide(c, &spec);
    let brute = spec.with_request(|r| brute_force(c, r));
    assert_eq!((d.is_allowed(), d.rule()), brute, "{from:?}");
    d.rule().map(|r| c.rule_label(r).1)
}

#[test]
fn identity_prefixes_match_by_bytes_like_the_scan() {
    let c = allow_rules(&[
        ("whole", r#"{ identities = ["spiffe://t/web*"] }"#),
        ("td-root", r#"{ identities = ["spiffe://t/*"] }"#),
        ("partial-td", r#"{ identities = ["spiffe://ex*"] }"#),
        ("any-spiffe", r#"{ identities = ["spiffe://*"] }"#),
    ]);
    let table: &[(Option<&str>, Option<&str>)] = &[
        // The prefix may be the whole identity.
        (Some("spiffe://t/web"), Some("whole")),
        (Some("spiffe://t/web-1/x"), Some("whole")),
        (Some("spiffe://t/we"), Some("td-root")),
        // `spiffe://t/*` needs the slash: not the trust domain's own ID.
        (Some("spiffe://t/a"), Some("td-root")),
        (Some("spiffe://t"), Some("any-spiffe")),
        // Other trust domains, one sharing the first letter.
        (Some("spiffe://tt/web"), Some("any-spiffe")),
        (Some("spiffe://u/a"), Some("any-spiffe")),
        (Some("spiffe://example.org/a"), Some("partial-td")),
        (Some("spiffe://e/a"), Some("any-spiffe")),
        // Patterns are case-sensitive, like IDs; a non-SPIFFE string matches none.
        (Some("SPIFFE://t/web"), None),
        (Some("spiffe:/"), None),
        (Some(""), None),
        // No identity matches no identity pattern.
        (None, None),
    ];
    for &(from, want) in table {
        assert_eq!(deciding_rule(&c, from).as_deref(), want, "{from:?}");
    }
}

#[test]
fn overlapping_prefixes_decide_in_file_order() {
    let long_first = allow_rules(&[
        ("ab", r#"{ identities = ["spiffe://t/ab*"] }"#),
        ("a", r#"{ identities = ["spiffe://t/a*"] }"#),
        ("abc", r#"{ identities = ["spiffe://t/abc"] }"#),
        ("c-suffix", r#"{ identities = ["*c"] }"#),
    ]);
    let short_first = allow_rules(&[
        ("a", r#"{ identities = ["spiffe://t/a*"] }"#),
        ("ab", r#"{ identities = ["spiffe://t/ab*"] }"#),
        ("abc", r#"{ identities = ["spiffe://t/abc"] }"#),
        ("c-suffix", r#"{ identities = ["*c"] }"#),
    ]);
    for (from, long, short) in [
        ("spiffe://t/abc", Some("ab"), Some("a")),
        ("spiffe://t/ab", Some("ab"), Some("a")),
        ("spiffe://t/ax", Some("a"), Some("a")),
        ("spiffe://t/xc", Some("c-suffix"), Some("c-suffix")),
        ("spiffe://t/b", None, None),
    ] {
        assert_eq!(
            deciding_rule(&long_first, Some(from)).as_deref(),
            long,
            "{from}"
        );
        assert_eq!(
            deciding_rule(&short_first, Some(from)).as_deref(),
            short,
            "{from}"
        );
    }
}

#[test]
fn suffixes_trust_domains_and_negations_under_the_index() {
    let c = allow_rules(&[
        (
            "a-not-ab",
            r#"{ identities = ["spiffe://t/a*"], not_identities = ["spiffe://t/ab*"] }"#,
        ),
        ("web", r#"{ identities = ["*/web"] }"#),
        // Any identity except one: not indexable, also matches no identity at all.
        ("not-x", r#"{ not_identities = ["spiffe://t/x"] }"#),
    ]);
    assert_eq!(
        deciding_rule(&c, Some("spiffe://t/a1")).as_deref(),
        Some("a-not-ab")
    );
    assert_eq!(
        deciding_rule(&c, Some("spiffe://t/ab")).as_deref(),
        Some("not-x")
    );
    assert_eq!(
        deciding_rule(&c, Some("spiffe://u/ns/web")).as_deref(),
        Some("web")
    );
    assert_eq!(deciding_rule(&c, Some("spiffe://t/x")), None);
    assert_eq!(deciding_rule(&c, None).as_deref(), Some("not-x"));

    let c = allow_rules(&[
        ("td", r#"{ trust_domains = ["t"] }"#),
        // `*` does not constrain; the trust domain does.
        ("u-any", r#"{ identities = ["*"], trust_domains = ["u"] }"#),
    ]);
    for (from, want) in [
        ("spiffe://t", Some("td")),
        ("spiffe://t/a/b", Some("td")),
        ("spiffe://tt/a", None),
        ("spiffe://u/a", Some("u-any")),
        ("spiffe://u", Some("u-any")),
        ("spiffe://v/a", None),
    ] {
        assert_eq!(deciding_rule(&c, Some(from)).as_deref(), want, "{from}");
    }
    assert_eq!(deciding_rule(&c, None), None);
    // Both are indexed: a request from another trust domain looks at nothing.
    RequestSpec::tcp("spiffe://v/a", 80).with_request(|r| {
        assert_eq!(c.candidates(Action::Allow, r), 0);
    });
}

#[test]
fn audit_rule_filed_under_two_matching_keys_is_recorded_once() {
    let c = compile(
        r#"
[[policy]]
name = "au"
action = "audit"
[[policy.rule]]
from = [{ identities = ["spiffe://t/a*", "*/b", "spiffe://t/a/b"] }, { trust_domains = ["t"] }]
"#,
    );
    let spec = RequestSpec::tcp("spiffe://t/a/b", 80);
    spec.with_request(|r| assert_eq!(c.candidates(Action::Audit, r), 4));
    let d = decide(&c, &spec);
    assert_eq!(d.audit, vec![RuleRef { policy: 0, rule: 0 }]);
}

#[test]
fn unrelated_prefix_and_suffix_rules_are_not_visited() {
    // 10,000 prefix and 10,000 suffix rules for other services, on the same port as
    // the request; the old index scanned all of them for every request. Built as a
    // model, not parsed: parsing a 20,000-rule file takes minutes in a debug build.
    let rule = |name: Option<&str>, id: &str, port: Option<u16>| Rule {
        name: name.map(String::from),
        from: vec![Source {
            identities: Some(vec![Pattern::parse(id)]),
            ..Source::default()
        }],
        to: port
            .map(|p| Operation {
                ports: Some(vec![p]),
                ..Operation::default()
            })
            .into_iter()
            .collect(),
        ..Rule::default()
    };
    let mut rules = Vec::new();
    for i in 0..10_000 {
        rules.push(rule(None, &format!("spiffe://t/svc-{i}/*"), Some(80)));
        rules.push(rule(None, &format!("*/job-{i}"), Some(80)));
    }
    rules.push(rule(Some("client"), "spiffe://t/cli*", None));
    let set = PolicySet {
        policies: vec![Policy {
            name: "p".into(),
            action: Action::Allow,
            selector: None,
            rules,
            line: 1,
        }],
        ..PolicySet::default()
    };
    let c = CompiledPolicy::compile(set, DefaultAction::Deny);
    let count =
        |from: &str| RequestSpec::tcp(from, 80).with_request(|r| c.candidates(Action::Allow, r));
    assert_eq!(count("spiffe://t/client"), 1);
    assert_eq!(count("spiffe://t/other"), 0);
    assert_eq!(count("spiffe://t/svc-42/x"), 1);
    assert_eq!(count("spiffe://t/svc-42/job-7"), 2);
    for (from, want) in [
        ("spiffe://t/client", Some("client")),
        // svc-42's prefix rule is rule 84, job-7's suffix rule 15: file order decides.
        ("spiffe://t/svc-42/job-7", Some("15")),
        ("spiffe://t/x/job-9999", Some("19999")),
        ("spiffe://t/other", None),
    ] {
        assert_eq!(deciding_rule(&c, Some(from)).as_deref(), want, "{from}");
    }
}

/// Does any allow policy select the workload, by scanning every allow policy?
fn allow_applies_by_scan(c: &CompiledPolicy, req: &Request<'_>) -> bool {
    c.set()
        .policies
        .iter()
        .any(|p| p.action == Action::Allow && selected(p, req))
}

/// A request from `spiffe://t/client` to port 80 of workload `id` with `groups`.
fn to_workload(id: Option<&str>, groups: &[&str]) -> RequestSpec {
    let mut spec = RequestSpec::tcp("spiffe://t/client", 80);
    spec.workload = id.map(String::from);
    spec.workload_groups = groups.iter().map(|g| g.to_string()).collect();
    spec
}

/// A receiving workload: identity (or none) and groups.
type Workload = (Option<&'static str>, &'static [&'static str]);

#[test]
fn selector_index_picks_workloads_like_the_scan() {
    // One allow policy per selector, whose only rule matches nothing the client
    // sends: a selected workload is then `no_allow_matched`, an unselected one falls
    // to the mesh default (allow).
    // (selector, [(workload, selected?)])
    let table: &[(&str, &[(Workload, bool)])] = &[
        (
            r#"identities = ["spiffe://t/api"]"#,
            &[
                ((Some("spiffe://t/api"), &[]), true),
                ((Some("spiffe://t/api2"), &[]), false),
                ((Some("spiffe://t/ap"), &[]), false),
                ((None, &["spiffe://t/api"]), false),
            ],
        ),
        (
            r#"identities = ["spiffe://t/ns/*", "*/db"]"#,
            &[
                ((Some("spiffe://t/ns/"), &[]), true),
                ((Some("spiffe://t/ns/web"), &[]), true),
                ((Some("spiffe://t/ns"), &[]), false),
                ((Some("spiffe://u/db"), &[]), true),
                ((Some("spiffe://t/ns/db"), &[]), true),
                ((Some("spiffe://t/xdb"), &[]), false),
                ((None, &[]), false),
            ],
        ),
        (
            r#"groups = ["db", "cache"]"#,
            &[
                ((None, &["cache"]), true),
                ((Some("spiffe://t/a"), &["web", "db"]), true),
                ((Some("spiffe://t/a"), &["web"]), false),
                ((Some("spiffe://t/a"), &[]), false),
            ],
        ),
        // Fields AND: filed under the exact ID, the groups checked on the candidate.
        (
            r#"identities = ["spiffe://t/api"], groups = ["db"]"#,
            &[
                ((Some("spiffe://t/api"), &["db"]), true),
                ((Some("spiffe://t/api"), &["web"]), false),
                ((Some("spiffe://t/other"), &["db"]), false),
                ((None, &["db"]), false),
            ],
        ),
        // A prefix with groups: filed under the groups, the prefix checked.
        (
            r#"identities = ["spiffe://t/ns/*"], groups = ["db"]"#,
            &[
                ((Some("spiffe://t/ns/a"), &["db"]), true),
                ((Some("spiffe://t/other"), &["db"]), false),
                ((Some("spiffe://t/ns/a"), &[]), false),
            ],
        ),
        // `*` is any workload with an identity.
        (
            r#"identities = ["*"]"#,
            &[
                ((Some("spiffe://t/a"), &[]), true),
                ((Some(""), &[]), true),
                ((None, &["db"]), false),
            ],
        ),
        (
            r#"identities = ["*", "spiffe://t/a"], groups = ["db"]"#,
            &[
                ((Some("spiffe://t/b"), &["db"]), true),
                ((Some("spiffe://t/b"), &[]), false),
                ((None, &["db"]), false),
            ],
        ),
        // An empty selector selects every workload (`[]` in a selector is refused).
        (
            "",
            &[((None, &[]), true), ((Some("spiffe://t/a"), &["db"]), true)],
        ),
    ];
    for &(selector, cases) in table {
        let cases = cases.iter().map(|&((id, groups), want)| (id, groups, want));
        let c = compile_with(
            &format!(
                "[[policy]]\nname = \"p\"\naction = \"allow\"\nselector = {{ {selector} }}\n\
                 [[policy.rule]]\nfrom = [{{ identities = [\"spiffe://t/nobody\"] }}]\n"
            ),
            DefaultAction::Allow,
        );
        for (id, groups, want) in cases {
            let spec = to_workload(id, groups);
            let why = format!("selector {{ {selector} }}, workload {id:?} {groups:?}");
            spec.with_request(|r| {
                assert_eq!(c.allow_applies(r), want, "{why}");
                assert_eq!(allow_applies_by_scan(&c, r), want, "{why}");
            });
            let reason = if want {
                "no_allow_matched"
            } else {
                "default_allow"
            };
            assert_eq!(decide(&c, &spec).reason_name(), reason, "{why}");
        }
    }
}

#[test]
fn policies_for_other_workloads_are_not_visited() {
    // One allow policy per service, 10,000 each of: an exact workload ID, a workload
    // group, a workload ID prefix, each admitting the same client on the same port,
    // so that only the selector tells them apart. Built as a model, not parsed (see
    // above).
    let client = |name: &str| Rule {
        name: Some(name.into()),
        from: vec![Source {
            identities: Some(vec![Pattern::parse("spiffe://t/client")]),
            ..Source::default()
        }],
        to: vec![Operation {
            ports: Some(vec![80]),
            ..Operation::default()
        }],
        ..Rule::default()
    };
    let policy = |name: String, selector: Selector| Policy {
        rules: vec![client(&name)],
        name,
        action: Action::Allow,
        selector: Some(selector),
        line: 1,
    };
    let mut policies = Vec::new();
    for i in 0..10_000 {
        policies.push(policy(
            format!("svc-{i}"),
            Selector {
                identities: Some(vec![Pattern::parse(&format!("spiffe://t/svc-{i}"))]),
                groups: None,
            },
        ));
        policies.push(policy(
            format!("grp-{i}"),
            Selector {
                identities: None,
                groups: Some(vec![format!("grp-{i}")]),
            },
        ));
        policies.push(policy(
            format!("ns-{i}"),
            Selector {
                identities: Some(vec![Pattern::parse(&format!("spiffe://t/ns-{i}/*"))]),
                groups: None,
            },
        ));
    }
    let set = PolicySet {
        policies,
        ..PolicySet::default()
    };
    let c = CompiledPolicy::compile(set, DefaultAction::Allow);
    // (workload, groups) → (selectors checked, allow rules looked at, deciding policy)
    let table: &[(Workload, usize, usize, Option<&str>)] = &[
        ((Some("spiffe://t/svc-4242"), &[]), 1, 1, Some("svc-4242")),
        ((None, &["grp-7"]), 1, 1, Some("grp-7")),
        ((Some("spiffe://t/ns-99/db"), &[]), 1, 1, Some("ns-99")),
        // Selected three ways: the three policies' rules, in file order.
        (
            (Some("spiffe://t/svc-5"), &["grp-3", "grp-9999"]),
            1,
            3,
            Some("grp-3"),
        ),
        // Selected by none: the mesh default, after looking at nothing.
        ((Some("spiffe://t/other"), &["web"]), 0, 0, None),
        ((None, &[]), 0, 0, None),
    ];
    for &((id, groups), selectors, rules, want) in table {
        let spec = to_workload(id, groups);
        spec.with_request(|r| {
            assert_eq!(c.selector_candidates(r), selectors, "{id:?} {groups:?}");
            assert_eq!(c.candidates(Action::Allow, r), rules, "{id:?} {groups:?}");
            assert_eq!(c.allow_applies(r), want.is_some());
        });
        let d = decide(&c, &spec);
        let by = d.rule().map(|r| c.rule_label(r).0.to_string());
        assert_eq!(by.as_deref(), want, "{id:?} {groups:?}");
        assert!(d.is_allowed(), "{id:?} {groups:?}");
    }
    // Another source is refused by the policy that selects the workload.
    let mut spec = to_workload(Some("spiffe://t/svc-1"), &[]);
    spec.from = Some("spiffe://t/intruder".into());
    assert_eq!(decide(&c, &spec).reason_name(), "no_allow_matched");
}

// ---- properties ------------------------------------------------------------------

/// Identity patterns: exact IDs, overlapping prefixes, suffixes, `*`, in and out of
/// trust domain `t`.
const ARB_ID_PATTERNS: [&str; 11] = [
    "spiffe://t/a",
    "spiffe://t/b",
    "spiffe://t/ab",
    "spiffe://t/a*",
    "spiffe://t/ab*",
    "spiffe://t/*",
    "spiffe://*",
    "*/c",
    "*b",
    "*",
    "spiffe://u/a",
];

fn arb_source() -> impl Strategy<Value = String> {
    let ids = prop::option::of(prop::sample::subsequence(ARB_ID_PATTERNS.to_vec(), 1..3));
    let not_ids = prop::sample::subsequence(ARB_ID_PATTERNS.to_vec(), 0..2);
    let tds = prop::option::weighted(0.2, prop::sample::subsequence(vec!["t", "u"], 1..2));
    let groups = prop::sample::subsequence(vec!["web", "db"], 0..2);
    (ids, not_ids, tds, groups, any::<bool>()).prop_map(|(ids, not_ids, tds, groups, addr)| {
        let mut f = Vec::new();
        if let Some(ids) = ids {
            f.push(format!("identities = {ids:?}"));
        }
        if !not_ids.is_empty() {
            f.push(format!("not_identities = {not_ids:?}"));
        }
        if let Some(tds) = tds {
            f.push(format!("trust_domains = {tds:?}"));
        }
        if !groups.is_empty() {
            f.push(format!("groups = {groups:?}"));
        }
        if addr {
            f.push("addresses = [\"100.64.0.0/16\"]".to_string());
        }
        if f.is_empty() {
            // An empty entry is refused; `*` is the nearest: any source with an identity.
            f.push("identities = [\"*\"]".to_string());
        }
        format!("{{ {} }}", f.join(", "))
    })
}

fn arb_operation() -> impl Strategy<Value = String> {
    let ports = prop::sample::subsequence(vec![80u16, 443, 8080], 0..3);
    let methods = prop::sample::subsequence(vec!["GET", "POST", "*"], 0..2);
    let paths = prop::sample::subsequence(vec!["/api/*", "*.png", "/admin", "*"], 0..2);
    let protocols = prop::option::weighted(
        0.2,
        prop::sample::select(vec![&["udp"][..], &["tcp"], &["tcp", "udp"]]),
    );
    (ports, methods, paths, any::<bool>(), protocols).prop_map(
        |(ports, methods, paths, neg, protocols)| {
            let mut f = Vec::new();
            if let Some(p) = protocols {
                f.push(format!("protocols = {p:?}"));
            }
            if !ports.is_empty() {
                f.push(format!("ports = {ports:?}"));
            } else if !methods.is_empty() || !paths.is_empty() {
                // HTTP fields need ports.
                f.push("ports = [8080]".to_string());
            } else {
                // An empty entry is refused: every port but one.
                f.push("not_ports = [22]".to_string());
            }
            if !methods.is_empty() {
                f.push(format!("methods = {methods:?}"));
            }
            if !paths.is_empty() {
                let k = if neg { "not_paths" } else { "paths" };
                f.push(format!("{k} = {paths:?}"));
            }
            format!("{{ {} }}", f.join(", "))
        },
    )
}

fn arb_rule() -> impl Strategy<Value = String> {
    (
        prop::collection::vec(arb_source(), 0..3),
        prop::collection::vec(arb_operation(), 0..3),
    )
        .prop_map(|(from, to)| {
            let mut s = "[[policy.rule]]\n".to_string();
            if !from.is_empty() {
                s += &format!("from = [{}]\n", from.join(", "));
            }
            if !to.is_empty() {
                s += &format!("to = [{}]\n", to.join(", "));
            }
            s
        })
}

/// A `selector = ...` line, or none: identity patterns (exact, prefix, suffix, `*`),
/// groups, both, neither (`selector = {}`).
fn arb_selector() -> impl Strategy<Value = String> {
    let ids = prop::option::of(prop::sample::subsequence(ARB_ID_PATTERNS.to_vec(), 1..3));
    let groups = prop::option::of(prop::sample::subsequence(vec!["web", "db", "api"], 1..3));
    prop::option::weighted(0.7, (ids, groups)).prop_map(|sel| {
        let Some((ids, groups)) = sel else {
            return String::new();
        };
        let mut f = Vec::new();
        if let Some(ids) = ids {
            f.push(format!("identities = {ids:?}"));
        }
        if let Some(groups) = groups {
            f.push(format!("groups = {groups:?}"));
        }
        format!("selector = {{ {} }}\n", f.join(", "))
    })
}

/// The receiving workload: an identity (or none) and groups (repeats allowed).
fn arb_workload() -> impl Strategy<Value = (Option<&'static str>, Vec<&'static str>)> {
    (
        prop::sample::select(vec![
            Some("spiffe://t/a"),
            Some("spiffe://t/b"),
            Some("spiffe://t/ab"),
            Some("spiffe://t/abc"),
            Some("spiffe://t/a/c"),
            Some("spiffe://t"),
            Some("spiffe://u/a"),
            None,
        ]),
        prop::collection::vec(prop::sample::select(vec!["web", "db", "api", "x"]), 0..3),
    )
}

fn arb_request() -> impl Strategy<Value = RequestSpec> {
    (
        prop::sample::select(vec![
            Some("spiffe://t/a"),
            Some("spiffe://t/b"),
            Some("spiffe://t/c"),
            Some("spiffe://t/ab"),
            Some("spiffe://t/abc"),
            Some("spiffe://t/a/c"),
            Some("spiffe://t"),
            Some("spiffe://u/a"),
            Some("spiffe://tt/ab"),
            None,
        ]),
        prop::sample::subsequence(vec!["web", "db"], 0..2),
        prop::sample::select(vec![80u16, 443, 8080, 22]),
        prop::option::of((
            prop::sample::select(vec!["GET", "POST"]),
            prop::sample::select(vec!["/api/x", "/a.png", "/admin", "/"]),
        )),
        any::<bool>(),
        arb_workload(),
        prop::bool::weighted(0.15),
    )
        .prop_map(|(from, groups, port, http, near, (wl, wl_groups), udp)| {
            let mut r = RequestSpec::tcp("spiffe://t/a", port);
            r.from = from.map(String::from);
            r.workload = wl.map(String::from);
            r.workload_groups = wl_groups.into_iter().map(String::from).collect();
            r.from_groups = groups.into_iter().map(String::from).collect();
            r.from_address = Some(
                if near { "100.64.3.4" } else { "100.65.3.4" }
                    .parse()
                    .unwrap(),
            );
            match http {
                Some((m, p)) if !udp => r = r.http(m, p),
                _ if udp => r.proto = Protocol::Udp,
                _ => {}
            }
            r
        })
}

proptest! {
    /// A deny rule that matches a request wins, whatever allow rules exist and
    /// wherever the deny policy is in the file.
    #[test]
    fn matching_deny_always_wins(
        allows in prop::collection::vec(prop::collection::vec(arb_rule(), 0..4), 0..5),
        deny in arb_rule(),
        deny_at in 0usize..6,
        req in arb_request(),
        default_allow in any::<bool>(),
    ) {
        let mut policies: Vec<String> = allows
            .iter()
            .enumerate()
            .map(|(i, rules)| format!("[[policy]]\nname = \"allow{i}\"\naction = \"allow\"\n{}", rules.concat()))
            .collect();
        let deny_policy = format!("[[policy]]\nname = \"deny\"\naction = \"deny\"\n{deny}");
        policies.insert(deny_at.min(policies.len()), deny_policy);
        let default = if default_allow { DefaultAction::Allow } else { DefaultAction::Deny };
        let c = compile_with(&policies.concat(), default);
        let deny_idx = c.set().policies.iter().position(|p| p.name == "deny").unwrap();
        req.with_request(|r| {
            let deny_rule = &c.set().policies[deny_idx].rules[0];
            let d = evaluate(&c, r);
            if r.http.is_none() && c.inspects(r) {
                // Refused before policy (not HTTP on an inspected port).
                prop_assert!(!d.is_allowed());
            } else if rule_mismatch(deny_rule, r, HttpAbsent::Match).is_none() {
                prop_assert_eq!(d.verdict, Verdict::Deny(DenyReason::ExplicitDeny(RuleRef { policy: deny_idx as u32, rule: 0 })));
            }
            // And the index agrees with the reference evaluator everywhere.
            prop_assert_eq!((d.is_allowed(), d.rule()), brute_force(&c, r));
            Ok(())
        })?;
    }
}

/// Every rule of `action` policies that matches `req` (selector included), in file
/// order, found by scanning all rules.
fn scan(c: &CompiledPolicy, action: Action, req: &Request<'_>, absent: HttpAbsent) -> Vec<RuleRef> {
    let mut out = Vec::new();
    for (pi, p) in c.set().policies.iter().enumerate() {
        if p.action != action || !selected(p, req) {
            continue;
        }
        for (ri, rule) in p.rules.iter().enumerate() {
            if super::eval::rule_matches_leniency(rule, req, absent) {
                out.push(RuleRef {
                    policy: pi as u32,
                    rule: ri as u32,
                });
            }
        }
    }
    out
}

proptest! {
    /// The index finds what a scan of every rule finds: per action and leniency the
    /// first matching rule, and the whole audit list.
    #[test]
    fn index_agrees_with_a_scan_of_every_rule(
        policies in prop::collection::vec(
            (
                prop::sample::select(vec!["allow", "deny", "audit"]),
                arb_selector(),
                prop::collection::vec(arb_rule(), 0..4),
            ),
            0..6,
        ),
        reqs in prop::collection::vec(arb_request(), 1..6),
    ) {
        let src: String = policies
            .iter()
            .enumerate()
            .map(|(i, (action, selector, rules))| format!("[[policy]]\nname = \"p{i}\"\naction = \"{action}\"\n{selector}{}", rules.concat()))
            .collect();
        let c = compile_with(if src.is_empty() { "policy = []\n" } else { &src }, DefaultAction::Deny);
        for spec in &reqs {
            spec.with_request(|r| {
                for action in [Action::Allow, Action::Deny, Action::Audit] {
                    for absent in [HttpAbsent::Match, HttpAbsent::Miss, HttpAbsent::MatchIfEvery] {
                        prop_assert_eq!(
                            c.first_match_leniency(action, r, absent),
                            scan(&c, action, r, absent).first().copied(),
                            "{:?} {:?} {:?}", action, absent, spec
                        );
                    }
                }
                prop_assert_eq!(c.allow_applies(r), allow_applies_by_scan(&c, r), "{:?}", spec);
                prop_assert_eq!(c.inspects(r), inspects_by_scan(&c, r), "{:?}", spec);
                let d = evaluate(&c, r);
                let refused_before_policy = r.http.is_none() && inspects_by_scan(&c, r);
                let audit = if refused_before_policy {
                    Vec::new()
                } else {
                    scan(&c, Action::Audit, r, HttpAbsent::Miss)
                };
                prop_assert_eq!(&d.audit, &audit);
                prop_assert_eq!((d.is_allowed(), d.rule()), brute_force(&c, r));
                Ok(())
            })?;
        }
    }
}

proptest! {
    /// "Does any allow policy select the workload", through the workload index,
    /// equals a scan of every allow policy's selector; deny and audit policies (also
    /// filed by selector) do not count.
    #[test]
    fn selector_index_agrees_with_a_scan(
        policies in prop::collection::vec(
            (prop::sample::select(vec!["allow", "allow", "deny", "audit"]), arb_selector()),
            0..12,
        ),
        workloads in prop::collection::vec(arb_workload(), 1..8),
    ) {
        let src: String = policies
            .iter()
            .enumerate()
            .map(|(i, (action, selector))| format!("[[policy]]\nname = \"p{i}\"\naction = \"{action}\"\n{selector}[[policy.rule]]\n"))
            .collect();
        let c = compile_with(if src.is_empty() { "policy = []\n" } else { &src }, DefaultAction::Deny);
        for (id, groups) in &workloads {
            to_workload(*id, groups).with_request(|r| {
                let want = allow_applies_by_scan(&c, r);
                prop_assert_eq!(c.allow_applies(r), want, "{:?} {:?}", id, groups);
                // Every policy's one rule is empty: allowed exactly when selected by an
                // allow policy and by no deny policy, as the scan says.
                prop_assert_eq!((evaluate(&c, r).is_allowed(), evaluate(&c, r).rule()), brute_force(&c, r));
                Ok(())
            })?;
        }
    }
}

#[test]
fn tests_and_explain_match_the_normalised_path() {
    let c = compile(
        r#"
[[policy]]
name = "deny-admin"
action = "deny"
[[policy.rule]]
to = [{ ports = [80], paths = ["/admin", "/admin/*"] }]

[[policy]]
name = "allow-all"
action = "allow"
[[policy.rule]]

[[test]]
name = "dot-dot trick"
from = "spiffe://t/a"
to_port = 80
path = "/public/../admin"
expect = "deny"
expect_policy = "deny-admin"

[[test]]
name = "double slash"
from = "spiffe://t/a"
to_port = 80
path = "//admin/x"
expect = "deny"

[[test]]
name = "encoded slash is refused before policy"
from = "spiffe://t/a"
to_port = 80
path = "/admin%2Fx"
expect = "deny"
expect_reason = "malformed_request"
"#,
    );
    let results = run_tests(&c);
    assert!(all_passed(&results), "{results:#?}");
    let e = explain(&c, &get("spiffe://t/a", 80, "/public/../admin"));
    assert_eq!(e.normalized_path.as_deref(), Some("/admin"));
    assert_eq!(e.decision.reason, "explicit_deny");
    let e = explain(&c, &get("spiffe://t/a", 80, "/admin%2fx"));
    assert_eq!(
        (e.decision.reason.as_str(), e.decision.status),
        ("malformed_request", Some(400))
    );
    assert!(e.to_string().contains("path refused: "), "{e}");
}

#[test]
fn section_form_equals_inline_form() {
    let sections = compile(
        r#"
[[policy]]
name = "a"
action = "allow"

[[policy.rule]]
name = "r"

[[policy.rule.from]]
identities = ["spiffe://t/web"]

[[policy.rule.from]]
groups = ["ops"]

[[policy.rule.to]]
ports = [8080]
methods = ["GET"]

[[policy.rule.when]]
key = "request.headers[x-env]"
values = ["prod"]
"#,
    );
    let inline = allow_rule(
        "from = [{ identities = [\"spiffe://t/web\"] }, { groups = [\"ops\"] }]\nto = [{ ports = [8080], methods = [\"GET\"] }]\nwhen = [{ key = \"request.headers[x-env]\", values = [\"prod\"] }]",
    );
    let rule = &sections.set().policies[0].rules[0];
    assert_eq!((rule.from.len(), rule.to.len(), rule.when.len()), (2, 1, 1));
    assert_eq!(rule.line, 6);
    for from in ["spiffe://t/web", "spiffe://t/other"] {
        for env in ["x-env: prod", "x-env: dev"] {
            let mut r = get(from, 8080, "/");
            r.http.as_mut().unwrap().headers = vec![parse_header(env).unwrap()];
            assert_eq!(allowed(&sections, &r), allowed(&inline, &r), "{from} {env}");
        }
    }
    assert!(allowed(&sections, &{
        let mut r = get("spiffe://t/web", 8080, "/");
        r.http.as_mut().unwrap().headers = vec![parse_header("x-env: prod").unwrap()];
        r
    }));
}

proptest! {
    /// Invariant 5: a broken policy file is an error, never a crash. Arbitrary text,
    /// and a valid file cut or corrupted at any byte, parse to Ok or Err.
    #[test]
    fn parse_never_panics(s in "\\PC{0,200}", cut in 0usize..2000, byte in any::<u8>()) {
        let _ = parse("p.toml", &s);
        let doc = format!("{ORDER}\n[[test]]\nfrom = \"spiffe://t/a\"\nto_port = 8080\npath = \"/a/../b\"\nexpect = \"allow\"\n");
        let cut = cut.min(doc.len());
        let mut bytes = doc.as_bytes()[..cut].to_vec();
        bytes.push(byte);
        bytes.extend_from_slice(&doc.as_bytes()[cut..]);
        if let Ok(text) = String::from_utf8(bytes) {
            if let Ok(p) = parse("p.toml", &text) {
                let c = CompiledPolicy::compile(p.set, DefaultAction::Deny);
                let _ = run_tests(&c);
            }
        }
    }
}

#[test]
fn deny_every_request_reads_rules_for_a_whole_inspected_connection() {
    // Used when policy changes under an open layer-7 connection: cut it only if no
    // request it could send would be allowed.
    let c = compile(
        r#"
[[policy]]
name = "no-admin"
action = "deny"
[[policy.rule]]
to = [{ ports = [8080], paths = ["/admin/*"] }]

[[policy]]
name = "api"
action = "allow"
[[policy.rule]]
from = [{ identities = ["spiffe://t/a", "spiffe://t/q"] }]
to = [{ ports = [8080], methods = ["GET"] }]

[[policy]]
name = "quarantine"
action = "deny"
[[policy.rule]]
name = "q"
from = [{ identities = ["spiffe://t/q"] }]
"#,
    );
    let every = |from: &str, port: u16| {
        RequestSpec::tcp(from, port).with_request(|r| deny_every_request(&c, r))
    };
    // a may still GET: an allow rule with HTTP fields could match, and the deny with a
    // path cannot refuse every request.
    assert_eq!(every("spiffe://t/a", 8080), None);
    // q is denied whatever it asks, even though an earlier deny rule has HTTP fields.
    let q = every("spiffe://t/q", 8080);
    assert!(matches!(q, Some(DenyReason::ExplicitDeny(_))), "{q:?}");
    // b matches no allow rule at all.
    assert_eq!(
        every("spiffe://t/b", 8080),
        Some(DenyReason::NoAllowMatched)
    );
    // Without HTTP attributes on the inspected port, the data path's decision for a
    // connection that sends no HTTP: `not_http` for a, and for q and b the reason
    // their connection is refused at its opening.
    assert_eq!(
        RequestSpec::tcp("spiffe://t/a", 8080)
            .decide(&c)
            .reason_name(),
        "not_http"
    );
    assert_eq!(
        RequestSpec::tcp("spiffe://t/q", 8080)
            .decide(&c)
            .reason_name(),
        "explicit_deny"
    );
    // A request from b is refused at the opening, with that reason, whatever it asks.
    let b = get("spiffe://t/b", 8080, "/admin/x").decide(&c);
    assert_eq!(b.verdict, Verdict::Deny(DenyReason::NoAllowMatched));
    // A deny whose HTTP fields match every request counts (methods or paths of `*`);
    // one that could let some request through does not.
    let star = compile(
        r#"
[[policy]]
name = "lock"
action = "deny"
[[policy.rule]]
to = [{ ports = [80], methods = ["*"] }, { ports = [81], paths = ["*"], methods = ["*"] }]
[[policy.rule]]
to = [{ ports = [82], methods = ["*"], not_paths = ["/health"] }, { ports = [83], hosts = ["*"] }]
[[policy]]
name = "open"
action = "allow"
[[policy.rule]]
to = [{ ports = [80, 81, 82, 83], methods = ["GET"] }]
"#,
    );
    for (port, every) in [(80, true), (81, true), (82, false), (83, false)] {
        let got =
            RequestSpec::tcp("spiffe://t/a", port).with_request(|r| deny_every_request(&star, r));
        assert_eq!(got.is_some(), every, "port {port}: {got:?}");
    }
    // Mesh defaults when no allow policy applies.
    let none = compile_with("policy = []\n", DefaultAction::Deny);
    let r = RequestSpec::tcp("spiffe://t/a", 80).with_request(|r| deny_every_request(&none, r));
    assert_eq!(r, Some(DenyReason::DefaultDeny));
    let open = compile_with("policy = []\n", DefaultAction::Allow);
    let r = RequestSpec::tcp("spiffe://t/a", 80).with_request(|r| deny_every_request(&open, r));
    assert_eq!(r, None);
}
