use std::collections::BTreeMap;

use serde_json::json;

use super::*;
use crate::policy::{self, Action, DefaultAction, HttpSpec, Protocol};
use crate::time::UnixTime;

fn peer_info() -> PeerInfo {
    PeerInfo {
        identity: "spiffe://t/b".into(),
        public_key: "KB".into(),
        endpoint: Some("[fd00:198:18::2]:51820".parse().unwrap()),
        addresses: vec!["100.64.0.2/32".parse().unwrap()],
        groups: vec!["db".into()],
        not_after: UnixTime(20),
        source: PeerSource::Runtime,
    }
}

fn workload(name: &str, attach: Attach, source: WorkloadSource) -> WorkloadInfo {
    WorkloadInfo {
        name: name.into(),
        identity: format!("spiffe://t/{name}"),
        public_key: "KW".into(),
        addresses: vec!["100.65.1.1/32".parse().unwrap()],
        groups: vec![],
        not_before: UnixTime(1),
        not_after: UnixTime(2),
        attach,
        source,
    }
}

fn policy_info() -> PolicyInfo {
    PolicyInfo {
        name: "p.toml".into(),
        origin: PolicyOrigin::Applied,
        default: DefaultAction::Deny,
        policies: 2,
        tests: 1,
        source: "[[policy]]\n".into(),
    }
}

fn status() -> Status {
    Status {
        ready: true,
        identity: "spiffe://t/a".into(),
        public_key: "k".into(),
        listen: "198.18.0.1:51820".parse().unwrap(),
        tun: "mesh0".into(),
        addresses: vec!["100.64.0.1/32".parse().unwrap()],
        peers: vec![PeerStatus {
            identity: "spiffe://t/b".into(),
            local: Some("spiffe://t/a".into()),
            public_key: "k2".into(),
            endpoint: None,
            addresses: vec!["100.64.0.2/32".parse().unwrap()],
            latest_handshake: None,
            rx_bytes: 1,
            tx_bytes: 2,
            drops: PeerDrops { spoofed_source: 3 },
            not_before: UnixTime(10),
            not_after: UnixTime(20),
        }],
        drops: NodeDrops::default(),
        workloads: vec![
            workload("node", Attach::Tun, WorkloadSource::Node),
            workload("web", Attach::Veth("p-web".into()), WorkloadSource::Runtime),
        ],
        enforcement: Some(Enforcement {
            policy: policy_info(),
            counters: EnforcementCounters {
                delivered: 9,
                flows: 3,
                drops: BTreeMap::from([("default_deny".to_string(), 7)]),
                rules: vec![RuleCount {
                    policy: "web".into(),
                    rule: "0".into(),
                    allow: 5,
                    deny: 0,
                    audit: 1,
                }],
                http_refused: 2,
                ..EnforcementCounters::default()
            },
            decision_log: LogCounters {
                written: 7,
                suppressed: 1,
                follower_lost: 0,
            },
        }),
        cpu_latency: Some(CpuLatencyStatus {
            requested_us: 0,
            state: CpuLatencyState::Released,
        }),
        host_filter: Some(HostFilterStatus {
            state: HostFilterState::Installed,
            table: "inet meshd-mesh0".into(),
            protects: vec!["100.64.0.0/10".parse().unwrap()],
            pods: vec!["p-web".into()],
            underlay_drops: 4,
            pod_drops: 1,
        }),
        store: None,
    }
}

fn spec() -> RequestSpec {
    RequestSpec {
        from: Some("spiffe://t/web".into()),
        from_groups: vec!["front".into()],
        from_address: Some("100.64.0.9".parse().unwrap()),
        workload: None,
        workload_groups: vec![],
        to_address: None,
        to_port: 8080,
        proto: Protocol::Tcp,
        http: Some(HttpSpec {
            method: "GET".into(),
            path: "/api/x".into(),
            host: None,
            headers: vec![("x-env".into(), "prod".into())],
        }),
    }
}

fn explanation() -> Explanation {
    let source = "[[policy]]\nname = \"api\"\naction = \"allow\"\n[[policy.rule]]\n\
                  from = [{ identities = [\"spiffe://t/web\"] }]\n\
                  to = [{ ports = [8080], methods = [\"GET\"] }]\n";
    let loaded = policy::load("p.toml", source, DefaultAction::Deny).unwrap();
    policy::explain(&loaded.compiled, &spec())
}

fn record(http: Option<HttpSummary>) -> DecisionRecord {
    DecisionRecord {
        time: "2026-11-26T06:17:57Z".into(),
        src: Some("spiffe://t/a".into()),
        src_addr: "100.64.0.1".parse().unwrap(),
        dst: None,
        dst_addr: "fd00::3".parse().unwrap(),
        dst_port: 22,
        proto: Protocol::Tcp,
        decision: Action::Deny,
        reason: "explicit_deny".into(),
        policy: Some("block".into()),
        rule: Some("no-ssh".into()),
        http,
    }
}

/// Every call's request, with its optional fields present and absent, and its `op`.
fn requests() -> Vec<(Request, &'static str)> {
    vec![
        (StatusRequest {}.into(), "status"),
        (
            PeerAddRequest {
                cert: "PEM".into(),
                endpoint: Some("[fd00:198:18::2]:51820".parse().unwrap()),
            }
            .into(),
            "peer_add",
        ),
        (
            PeerAddRequest {
                cert: "PEM".into(),
                endpoint: None,
            }
            .into(),
            "peer_add",
        ),
        (
            PeerRemoveRequest {
                identity: "spiffe://t/b".into(),
            }
            .into(),
            "peer_remove",
        ),
        (PeerListRequest {}.into(), "peer_list"),
        (
            PolicyApplyRequest {
                source: "[[policy]]\nname = \"x\"\n".into(),
                name: Some("p.toml".into()),
            }
            .into(),
            "policy_apply",
        ),
        (
            PolicyApplyRequest {
                source: String::new(),
                name: None,
            }
            .into(),
            "policy_apply",
        ),
        (PolicyGetRequest {}.into(), "policy_get"),
        (spec().into(), "explain"),
        (
            RequestSpec {
                proto: Protocol::Icmp,
                to_port: 0,
                http: None,
                ..spec()
            }
            .into(),
            "explain",
        ),
        (
            LogRequest {
                follow: true,
                lines: Some(5),
            }
            .into(),
            "log",
        ),
        (LogRequest::default().into(), "log"),
        (
            WorkloadAddRequest {
                name: "web".into(),
                cert: "/w.crt".into(),
                key: "/w.key".into(),
                veth: Some("p-web".into()),
            }
            .into(),
            "workload_add",
        ),
        (
            WorkloadAddRequest {
                name: "batch".into(),
                cert: "/b.crt".into(),
                key: "/b.key".into(),
                veth: None,
            }
            .into(),
            "workload_add",
        ),
        (
            WorkloadRemoveRequest { name: "web".into() }.into(),
            "workload_remove",
        ),
        (WorkloadListRequest {}.into(), "workload_list"),
    ]
}

#[test]
fn every_request_round_trips_under_its_op() {
    let all = requests();
    // Every variant is covered.
    let ops: std::collections::BTreeSet<&str> = all.iter().map(|(_, op)| *op).collect();
    assert_eq!(ops.len(), 11);
    for (r, op) in all {
        let line = r.to_line();
        assert!(!line.contains('\n'), "{line}");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["op"], op, "{line}");
        assert_eq!(Request::parse(&line), Ok(r), "{line}");
        // A trailing newline, as on the socket.
        assert!(Request::parse(&format!("{line}\n")).is_ok());
    }
}

/// The wire format is the one meshd and meshctl spoke before the contract was typed.
#[test]
fn parses_the_documented_request_lines() {
    assert_eq!(
        Request::parse(r#"{"op":"status"}"#),
        Ok(Request::Status(StatusRequest {}))
    );
    assert_eq!(
        Request::parse(r#"{"op":"peer_add","cert":"PEM","endpoint":"198.18.0.2:51820"}"#),
        Ok(Request::PeerAdd(PeerAddRequest {
            cert: "PEM".into(),
            endpoint: Some("198.18.0.2:51820".parse().unwrap())
        }))
    );
    assert_eq!(
        Request::parse(r#"{"op":"peer_remove","identity":"spiffe://t/b"}"#),
        Ok(Request::PeerRemove(PeerRemoveRequest {
            identity: "spiffe://t/b".into()
        }))
    );
    assert_eq!(
        Request::parse("{\"op\":\"peer_list\"}\n"),
        Ok(Request::PeerList(PeerListRequest {}))
    );
    assert_eq!(
        Request::parse(r#"{"op":"policy_apply","source":"S","name":"file.toml"}"#),
        Ok(Request::PolicyApply(PolicyApplyRequest {
            source: "S".into(),
            name: Some("file.toml".into())
        }))
    );
    assert_eq!(
        Request::parse(r#"{"op":"log","follow":true,"lines":5}"#),
        Ok(Request::Log(LogRequest {
            follow: true,
            lines: Some(5)
        }))
    );
    assert_eq!(
        Request::parse(
            r#"{"op":"workload_add","name":"web","cert":"/w.crt","key":"/w.key","veth":"p-web"}"#
        ),
        Ok(Request::WorkloadAdd(WorkloadAddRequest {
            name: "web".into(),
            cert: "/w.crt".into(),
            key: "/w.key".into(),
            veth: Some("p-web".into()),
        }))
    );
    assert_eq!(
        Request::parse(r#"{"op":"workload_remove","name":"web"}"#),
        Ok(Request::WorkloadRemove(WorkloadRemoveRequest {
            name: "web".into()
        }))
    );
    // explain: the described request's fields beside `op`.
    match Request::parse(
        r#"{"op":"explain","from":"spiffe://t/a","to_port":80,"proto":"tcp","http":{"method":"GET","path":"/","headers":[["x-env","prod"]]}}"#,
    ) {
        Ok(Request::Explain(s)) => {
            assert_eq!(s.from.as_deref(), Some("spiffe://t/a"));
            assert_eq!(s.to_port, 80);
            assert_eq!(
                s.http.unwrap().headers,
                vec![("x-env".into(), "prod".into())]
            );
        }
        other => panic!("{other:?}"),
    }
}

/// An unknown, garbled or ill-typed request is a typed bad-request error, one line,
/// and the reply says so in `kind`.
#[test]
fn garbled_requests_are_bad_requests() {
    for bad in [
        "",
        "not json",
        "}{",
        "{}",
        "[\"status\"]",
        "\"status\"",
        r#"{"op":"reboot"}"#,
        r#"{"op":5}"#,
        r#"{"op":"status","extra":1}"#,
        r#"{"op":"peer_list","verbose":true}"#,
        r#"{"op":"peer_add"}"#,
        r#"{"op":"peer_add","cert":"x","endpoint":"nowhere"}"#,
        r#"{"op":"peer_remove","identity":5}"#,
        r#"{"op":"workload_add","name":"web","cert":"/w.crt"}"#,
        r#"{"op":"explain","to_port":"eighty","proto":"tcp"}"#,
        r#"{"op":"explain","src":"spiffe://t/a","port":80}"#,
        r#"{"op":"log","lines":-1}"#,
        "{\"op\":\"status\"}\n{\"op\":\"status\"}",
    ] {
        let e = Request::parse(bad).expect_err(bad);
        assert_eq!(e.kind(), ErrorKind::BadRequest, "{bad}: {e}");
        assert!(e.message().starts_with("bad request: "), "{e}");
        let line = reply_line::<()>(&Err(e.clone()));
        assert!(!line.contains('\n'), "{line}");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["ok"], false);
        assert_eq!(v["kind"], "bad_request");
        assert!(v["error"].as_str().unwrap().starts_with("bad request: "));
        assert_eq!(parse_reply::<StatusRequest>(&line), Ok(Err(e)));
    }
}

/// The result of `C`, sent as the daemon sends it (through [`Response`]), decoded as
/// the client decodes it.
fn round_trip<C: Call>(result: C::Response, sent: Response)
where
    C::Response: PartialEq + std::fmt::Debug + Clone,
{
    let line = reply_line(&Ok(sent));
    assert!(!line.contains('\n'), "{line}");
    assert_eq!(
        line,
        reply_line(&Ok(result.clone())),
        "Response is untagged"
    );
    assert_eq!(parse_reply::<C>(&line), Ok(Ok(result)), "{line}");
}

#[test]
fn every_result_round_trips() {
    let s = status();
    round_trip::<StatusRequest>(s.clone(), Response::Status(Box::new(s)));
    round_trip::<PeerAddRequest>(peer_info(), Response::PeerInfo(peer_info()));
    let removed = PeerRemoved {
        removed: "spiffe://t/b".into(),
    };
    round_trip::<PeerRemoveRequest>(removed.clone(), Response::PeerRemoved(removed));
    let list = PeerList {
        peers: vec![
            peer_info(),
            PeerInfo {
                endpoint: None,
                source: PeerSource::Config,
                ..peer_info()
            },
        ],
    };
    round_trip::<PeerListRequest>(list.clone(), Response::PeerList(list));
    let applied = PolicyApplied {
        name: "p.toml".into(),
        policies: 2,
        tests: 1,
        cut_flows: 3,
    };
    round_trip::<PolicyApplyRequest>(applied.clone(), Response::PolicyApplied(applied));
    round_trip::<PolicyGetRequest>(policy_info(), Response::PolicyInfo(policy_info()));
    let none = PolicyInfo {
        name: String::new(),
        origin: PolicyOrigin::None,
        default: DefaultAction::Allow,
        policies: 0,
        tests: 0,
        source: String::new(),
    };
    round_trip::<PolicyGetRequest>(none.clone(), Response::PolicyInfo(none));
    let e = explanation();
    assert_eq!(e.decision.decision, "allow");
    round_trip::<RequestSpec>(e.clone(), Response::Explanation(Box::new(e)));
    let tail = LogTail {
        lines: vec![
            record(None),
            record(Some(HttpSummary {
                method: "POST".into(),
                path: "/api".into(),
                host: Some("api.t".into()),
                status: Some(403),
            })),
        ],
    };
    round_trip::<LogRequest>(tail.clone(), Response::LogTail(tail));
    let w = workload("web", Attach::Veth("p-web".into()), WorkloadSource::Runtime);
    round_trip::<WorkloadAddRequest>(w.clone(), Response::WorkloadInfo(w));
    let removed = WorkloadRemoved {
        removed: "web".into(),
    };
    round_trip::<WorkloadRemoveRequest>(removed.clone(), Response::WorkloadRemoved(removed));
    let list = WorkloadList {
        workloads: vec![
            workload("node", Attach::Tun, WorkloadSource::Node),
            workload("db", Attach::Tun, WorkloadSource::Config),
        ],
    };
    round_trip::<WorkloadListRequest>(list.clone(), Response::WorkloadList(list));
}

#[test]
fn errors_round_trip_with_their_kind() {
    for kind in [
        ErrorKind::BadRequest,
        ErrorKind::NotAllowed,
        ErrorKind::Refused,
        ErrorKind::NotFound,
        ErrorKind::Busy,
        ErrorKind::Internal,
    ] {
        let e = ControlError::new(kind, "peer_remove: no peer\nspiffe://t/b");
        assert_eq!(e.kind(), kind);
        // One line, kept word for word otherwise.
        assert_eq!(e.to_string(), "peer_remove: no peer spiffe://t/b");
        let line = reply_line::<PeerRemoved>(&Err(e.clone()));
        assert_eq!(parse_reply::<PeerRemoveRequest>(&line), Ok(Err(e)));
    }
    let line = reply_line::<()>(&Err(ControlError::NotFound(
        "peer_remove: no peer x".into(),
    )));
    assert_eq!(
        line,
        r#"{"ok":false,"kind":"not_found","error":"peer_remove: no peer x"}"#
    );
}

/// A meshd from before `kind`: its error reads as a refusal, its line kept.
#[test]
fn an_error_without_a_kind_reads_as_refused() {
    assert_eq!(
        parse_reply::<PolicyApplyRequest>(r#"{"ok":false,"error":"policy tests failed: 1 of 2"}"#),
        Ok(Err(ControlError::Refused(
            "policy tests failed: 1 of 2".into()
        )))
    );
}

#[test]
fn replies_that_break_the_contract_are_bad_replies() {
    for bad in [
        "",
        "not json",
        r#"{"ok":true}"#,
        r#"{"ok":true,"result":{"peers":"none"}}"#,
        r#"{"ok":true,"result":{"removed":"x"}}"#,
        r#"{"result":{"peers":[]}}"#,
    ] {
        let e = parse_reply::<PeerListRequest>(bad).expect_err(bad);
        assert!(e.to_string().starts_with("bad reply from meshd: "), "{e}");
    }
}

/// The keys scripts and the netns harness read from `meshctl status --json`.
#[test]
fn status_json_shape() {
    let s = status();
    let v = serde_json::to_value(&s).unwrap();
    assert_eq!(
        v["cpu_latency"],
        json!({"requested_us": 0, "state": "released"})
    );
    assert_eq!(
        v["host_filter"],
        json!({"state": "installed", "table": "inet meshd-mesh0",
            "protects": ["100.64.0.0/10"], "pods": ["p-web"],
            "underlay_drops": 4, "pod_drops": 1})
    );
    assert_eq!(v["peers"][0]["latest_handshake"], serde_json::Value::Null);
    assert_eq!(v["peers"][0]["drops"]["spoofed_source"], 3);
    assert_eq!(v["peers"][0]["not_before"], 10);
    assert_eq!(v["peers"][0]["not_after"], 20);
    assert_eq!(v["drops"]["no_route"], 0);
    assert_eq!(v["addresses"][0], "100.64.0.1/32");
    assert_eq!(v["workloads"][0]["attach"], "tun");
    assert_eq!(v["workloads"][0]["source"], "node");
    assert_eq!(v["workloads"][1]["attach"], "veth:p-web");
    assert_eq!(v["workloads"][1]["source"], "runtime");
    let e = &v["enforcement"];
    assert_eq!(
        e["policy"],
        json!({"name": "p.toml", "origin": "applied", "default": "deny",
            "policies": 2, "tests": 1, "source": "[[policy]]\n"})
    );
    assert_eq!(e["counters"]["flows"], 3);
    assert_eq!(e["counters"]["drops"]["default_deny"], 7);
    assert_eq!(e["counters"]["http_refused"], 2);
    assert_eq!(
        e["counters"]["rules"][0],
        json!({"policy": "web", "rule": "0", "allow": 5, "deny": 0, "audit": 1})
    );
    assert_eq!(
        e["decision_log"],
        json!({"written": 7, "suppressed": 1, "follower_lost": 0})
    );
    // A daemon from before the validity fields, the enforcement, the CPU latency and
    // the host filter: they read as 0 or absent, nothing fails.
    let mut old = v.clone();
    for f in ["not_before", "not_after"] {
        old["peers"][0].as_object_mut().unwrap().remove(f);
    }
    for f in ["cpu_latency", "host_filter", "enforcement", "workloads"] {
        old.as_object_mut().unwrap().remove(f);
    }
    let back: Status = serde_json::from_value(old).unwrap();
    assert_eq!(back.peers[0].not_after, UnixTime(0));
    assert_eq!(back.cpu_latency, None);
    assert_eq!(back.host_filter, None);
    assert_eq!(back.enforcement, None);
}

/// A decision line as meshd's decision log writes it reads as a [`DecisionRecord`]
/// (meshd's own test checks the other direction, from its writer).
#[test]
fn decision_lines_read_as_records() {
    let line = r#"{"time":"2026-11-26T06:17:57Z","src":"spiffe://t/a","src_addr":"100.64.0.1","dst":"spiffe://t/pc","dst_addr":"100.65.1.1","dst_port":80,"proto":"tcp","decision":"deny","reason":"no_allow_matched","policy":null,"rule":null,"http":{"method":"POST","path":"/api","status":403}}"#;
    let r: DecisionRecord = serde_json::from_str(line).unwrap();
    assert_eq!(r.dst.as_deref(), Some("spiffe://t/pc"));
    assert_eq!(r.decision, Action::Deny);
    assert_eq!(r.proto, Protocol::Tcp);
    assert_eq!(r.http.as_ref().and_then(|h| h.status), Some(403));
    assert_eq!(r.policy, None);
    let audit = r#"{"time":"t","src":null,"src_addr":"fd00::1","dst":null,"dst_addr":"fd00::2","dst_port":0,"proto":"icmp","decision":"audit","reason":"audit_matched","policy":"watch","rule":"0"}"#;
    let r: DecisionRecord = serde_json::from_str(audit).unwrap();
    assert_eq!((r.decision, r.src.as_deref()), (Action::Audit, None));
    // Written back, the same fields.
    let v = serde_json::to_value(&r).unwrap();
    assert_eq!(v, serde_json::from_str::<serde_json::Value>(audit).unwrap());
}

#[test]
fn attachments_are_text_on_the_wire() {
    for (a, text) in [
        (Attach::Tun, "tun"),
        (Attach::Veth("p-web".into()), "veth:p-web"),
    ] {
        assert_eq!(serde_json::to_value(&a).unwrap(), json!(text));
        assert_eq!(serde_json::from_value::<Attach>(json!(text)).unwrap(), a);
    }
    for bad in ["veth:", "veth", "wifi", ""] {
        let e = serde_json::from_value::<Attach>(json!(bad)).expect_err(bad);
        assert!(
            e.to_string()
                .contains("expected \"tun\" or \"veth:<interface>\""),
            "{e}"
        );
    }
}
