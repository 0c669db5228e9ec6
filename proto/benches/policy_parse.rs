//! Cost of reading a policy file against its size: `meshctl policy check|apply` and
//! meshd's start parse, check and compile the whole file, so a file of 10,000 rules
//! must load in well under a second.
//!
//! - `policy_parse/<n>`: one allow policy of `n` named rules (each its own identity
//!   and port, every fourth with HTTP methods and paths), a small deny policy and a
//!   few `[[test]]` cases: [`parse`] (TOML, checks, warnings).
//! - `policy_parse_policies/<n>`: `n` policies of one rule each, each selecting its
//!   own workload: the per-policy work (name checks, selectors).
//! - `policy_compile/<n>`, `policy_compile_policies/<n>`: [`CompiledPolicy::compile`]
//!   of the same two shapes, already parsed.
//!
//! Run: `cargo bench -p mesh-proto --bench policy_parse`.

use std::fmt::Write as _;
use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion};
use mesh_proto::policy::{parse, CompiledPolicy, DefaultAction, PolicySet};

const SIZES: [usize; 3] = [100, 1_000, 10_000];

/// One policy of `n` rules, a deny policy and three test cases.
fn many_rules(n: usize) -> String {
    let mut s = String::from("[[policy]]\nname = \"web\"\naction = \"allow\"\n");
    for i in 0..n {
        let port = 1_000 + i % 60_000;
        let _ = write!(
            s,
            "\n[[policy.rule]]\nname = \"r{i}\"\nfrom = [{{ identities = [\"spiffe://bench/svc-{i}\"] }}]\n"
        );
        if i % 4 == 0 {
            let _ = writeln!(
                s,
                "to = [{{ ports = [{port}], methods = [\"GET\"], paths = [\"/api/{i}/*\"] }}]"
            );
        } else {
            let _ = writeln!(s, "to = [{{ ports = [{port}] }}]");
        }
    }
    s.push_str(
        "\n[[policy]]\nname = \"block\"\naction = \"deny\"\n[[policy.rule]]\n\
         from = [{ trust_domains = [\"evil\"] }]\n",
    );
    for (who, port, expect) in [
        ("svc-0", 1_000, "allow"),
        ("svc-1", 1_000, "deny"),
        ("svc-1", 1_001, "allow"),
    ] {
        let _ = write!(
            s,
            "\n[[test]]\nfrom = \"spiffe://bench/{who}\"\nto_port = {port}\nmethod = \"GET\"\n\
             path = \"/api/0/x\"\nexpect = \"{expect}\"\n"
        );
    }
    s
}

/// `n` allow policies of one rule, each selecting its own workload.
fn many_policies(n: usize) -> String {
    let mut s = String::new();
    for i in 0..n {
        let _ = write!(
            s,
            "[[policy]]\nname = \"p{i}\"\naction = \"allow\"\n\
             selector = {{ identities = [\"spiffe://bench/server-{i}\"] }}\n\
             [[policy.rule]]\nfrom = [{{ identities = [\"spiffe://bench/client-{i}\"] }}]\n\
             to = [{{ ports = [443] }}]\n\n"
        );
    }
    s.push_str("[[test]]\nfrom = \"spiffe://bench/client-0\"\nworkload = \"spiffe://bench/server-0\"\nto_port = 443\nexpect = \"allow\"\nexpect_policy = \"p0\"\n");
    s
}

fn parsed(src: &str) -> PolicySet {
    match parse("bench.toml", src) {
        Ok(p) => p.set,
        Err(e) => panic!("bench policy does not parse: {e}"),
    }
}

fn bench_parse(c: &mut Criterion) {
    for (name, make) in [
        ("policy_parse", many_rules as fn(usize) -> String),
        ("policy_parse_policies", many_policies),
    ] {
        let mut group = c.benchmark_group(name);
        group.sample_size(10);
        for n in SIZES {
            let src = make(n);
            // Every test case of the file must pass: the bench reads a usable policy.
            let loaded = match mesh_proto::policy::load("bench.toml", &src, DefaultAction::Deny) {
                Ok(l) => l,
                Err(e) => panic!("bench policy does not load: {e}"),
            };
            assert!(loaded.tests_passed(), "{name}/{n}: {:?}", loaded.results);
            group.bench_with_input(BenchmarkId::from_parameter(n), &src, |b, src| {
                b.iter(|| parse("bench.toml", black_box(src)))
            });
        }
        group.finish();
    }
}

fn bench_compile(c: &mut Criterion) {
    for (name, make) in [
        ("policy_compile", many_rules as fn(usize) -> String),
        ("policy_compile_policies", many_policies),
    ] {
        let mut group = c.benchmark_group(name);
        group.sample_size(10);
        for n in SIZES {
            let set = parsed(&make(n));
            group.bench_with_input(BenchmarkId::from_parameter(n), &set, |b, set| {
                b.iter_batched(
                    || set.clone(),
                    |set| CompiledPolicy::compile(set, DefaultAction::Deny),
                    BatchSize::LargeInput,
                )
            });
        }
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500));
    targets = bench_parse, bench_compile
}
criterion_main!(benches);
