//! Policy evaluation cost against the number of rules (issue 6: evaluation must not
//! grow linearly with unrelated rules).
//!
//! Each policy holds `n` rules; the one that matches the request sits in the middle,
//! among `n - 1` unrelated rules of one of these shapes:
//! - `other_ports`: other identities, other ports (indexed away by port);
//! - `same_port`: other identities, the same port (indexed away by identity);
//! - `l7_same_port`: as `same_port`, with HTTP methods and paths, asked with an HTTP
//!   request;
//! - `prefix_sources`: other identity *prefixes* (`spiffe://bench/svc-7/*`) on the same
//!   port; the matching rule names the client exactly;
//! - `prefix_match`: as `prefix_sources`, but the matching rule is a prefix too
//!   (`spiffe://bench/cli*`);
//! - `suffix_match`: other identity *suffixes* (`*/svc-7`) on the same port; the
//!   matching rule is a suffix too (`*/client`).
//!
//! `selected_policies/<n>`: `n` allow policies, each selecting its own workload
//! (`selector = { identities = ["spiffe://bench/svc-<i>"] }`, one policy per service)
//! and admitting the client on port 80; the request goes to the workload of policy
//! `n / 2`. Every rule is filed under the same port and source, so only the selector
//! tells them apart.
//!
//! Run: `cargo bench -p mesh-proto --bench policy`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use mesh_proto::policy::{
    evaluate, parse, CompiledPolicy, DefaultAction, Header, HttpRequest, Protocol, Request,
};

const CLIENT: &str = "spiffe://bench/client";
const SIZES: [usize; 3] = [10, 1_000, 10_000];

#[derive(Clone, Copy)]
enum Shape {
    OtherPorts,
    SamePort,
    L7SamePort,
    PrefixSources,
    PrefixMatch,
    SuffixMatch,
}

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Shape::OtherPorts => "other_ports",
            Shape::SamePort => "same_port",
            Shape::L7SamePort => "l7_same_port",
            Shape::PrefixSources => "prefix_sources",
            Shape::PrefixMatch => "prefix_match",
            Shape::SuffixMatch => "suffix_match",
        }
    }
}

/// A policy file of `n` rules in one allow policy; the matching rule is rule `n / 2`.
fn policy_source(shape: Shape, n: usize) -> String {
    let mut s = String::from("[[policy]]\nname = \"bench\"\naction = \"allow\"\n");
    for i in 0..n {
        s.push_str("[[policy.rule]]\n");
        let matching = i == n / 2;
        let (from, port) = match (shape, matching) {
            (Shape::PrefixMatch, true) => ("\"spiffe://bench/cli*\"".to_string(), 80),
            (Shape::SuffixMatch, true) => ("\"*/client\"".to_string(), 80),
            (_, true) => (format!("\"{CLIENT}\""), 80),
            (Shape::OtherPorts, false) => {
                (format!("\"spiffe://bench/svc-{i}\""), 1_000 + i % 60_000)
            }
            (Shape::SamePort | Shape::L7SamePort, false) => {
                (format!("\"spiffe://bench/svc-{i}\""), 80)
            }
            (Shape::PrefixSources | Shape::PrefixMatch, false) => {
                (format!("\"spiffe://bench/svc-{i}/*\""), 80)
            }
            (Shape::SuffixMatch, false) => (format!("\"*/svc-{i}\""), 80),
        };
        s.push_str(&format!("from = [{{ identities = [{from}] }}]\n"));
        match shape {
            Shape::L7SamePort => s.push_str(&format!(
                "to = [{{ ports = [{port}], methods = [\"GET\"], paths = [\"/api/*\"] }}]\n"
            )),
            _ => s.push_str(&format!("to = [{{ ports = [{port}] }}]\n")),
        }
    }
    s
}

/// `n` allow policies, policy `i` selecting workload `svc-<i>` and admitting the client.
fn selected_source(n: usize) -> String {
    let mut s = String::new();
    for i in 0..n {
        s.push_str(&format!(
            "[[policy]]\nname = \"svc-{i}\"\naction = \"allow\"\n\
             selector = {{ identities = [\"spiffe://bench/svc-{i}\"] }}\n\
             [[policy.rule]]\nfrom = [{{ identities = [\"{CLIENT}\"] }}]\n\
             to = [{{ ports = [80] }}]\n"
        ));
    }
    s
}

fn compile(shape: Shape, n: usize) -> CompiledPolicy {
    compile_source(&policy_source(shape, n))
}

fn compile_source(src: &str) -> CompiledPolicy {
    let parsed = match parse("bench.toml", src) {
        Ok(p) => p,
        Err(e) => panic!("bench policy does not parse: {e}"),
    };
    CompiledPolicy::compile(parsed.set, DefaultAction::Deny)
}

fn bench_policy(c: &mut Criterion) {
    let headers = [
        Header {
            name: "host",
            value: b"server",
        },
        Header {
            name: "user-agent",
            value: b"bench",
        },
    ];
    let http = HttpRequest {
        method: "GET",
        path: "/api/items/42",
        host: Some("server"),
        headers: &headers,
    };
    let mut group = c.benchmark_group("policy_evaluate");
    for shape in [
        Shape::OtherPorts,
        Shape::SamePort,
        Shape::L7SamePort,
        Shape::PrefixSources,
        Shape::PrefixMatch,
        Shape::SuffixMatch,
    ] {
        for n in SIZES {
            let policy = compile(shape, n);
            let req = Request {
                src_identity: Some(CLIENT),
                src_groups: &[],
                src_addr: None,
                dst_identity: None,
                dst_groups: &[],
                dst_addr: None,
                dst_port: 80,
                protocol: Protocol::Tcp,
                http: matches!(shape, Shape::L7SamePort).then_some(http),
            };
            assert!(
                evaluate(&policy, &req).is_allowed(),
                "{} with {n} rules must allow the client",
                shape.name()
            );
            group.bench_with_input(BenchmarkId::new(shape.name(), n), &req, |b, req| {
                b.iter(|| evaluate(black_box(&policy), black_box(req)))
            });
        }
    }
    for n in SIZES {
        let policy = compile_source(&selected_source(n));
        let workload = format!("spiffe://bench/svc-{}", n / 2);
        let req = Request {
            src_identity: Some(CLIENT),
            src_groups: &[],
            src_addr: None,
            dst_identity: Some(&workload),
            dst_groups: &[],
            dst_addr: None,
            dst_port: 80,
            protocol: Protocol::Tcp,
            http: None,
        };
        let d = evaluate(&policy, &req);
        assert!(
            d.is_allowed() && d.rule().is_some_and(|r| r.policy as usize == n / 2),
            "selected_policies with {n} policies must allow by policy {}",
            n / 2
        );
        group.bench_with_input(BenchmarkId::new("selected_policies", n), &req, |b, req| {
            b.iter(|| evaluate(black_box(&policy), black_box(req)))
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500));
    targets = bench_policy
}
criterion_main!(benches);
