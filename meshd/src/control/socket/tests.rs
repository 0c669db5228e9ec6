use mesh_proto::control::{
    parse_reply_as, Attach, ErrorKind, NodeDrops, PeerInfo, PolicyOrigin, WorkloadSource,
};
use mesh_proto::policy::{DefaultAction, Protocol};

use super::*;

/// Records which operations ran.
#[derive(Default)]
struct Fake {
    calls: Calls,
}

#[derive(Default)]
struct Calls(Mutex<Vec<String>>);

impl Calls {
    fn borrow_mut(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        self.0.lock().unwrap()
    }

    fn borrow(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        self.0.lock().unwrap()
    }
}

impl Api for Fake {
    fn status(&self) -> Status {
        self.calls.borrow_mut().push("status".into());
        Status {
            ready: true,
            identity: "spiffe://t/a".into(),
            public_key: "k".into(),
            listen: "198.18.0.1:51820".parse().unwrap(),
            tun: "mesh0".into(),
            addresses: vec![],
            peers: vec![],
            drops: NodeDrops::default(),
            workloads: vec![],
            enforcement: None,
            cpu_latency: None,
            host_filter: None,
            store: None,
        }
    }
    fn peer_list(&self) -> PeerList {
        self.calls.borrow_mut().push("list".into());
        PeerList { peers: vec![] }
    }
    fn peer_add(
        &self,
        pem: &str,
        endpoint: Option<SocketAddr>,
        now: UnixTime,
    ) -> Result<PeerInfo, ControlError> {
        self.calls
            .borrow_mut()
            .push(format!("add {pem} {endpoint:?} {}", now.secs()));
        Err(ControlError::Refused(
            "peer_add: not a mesh certificate".into(),
        ))
    }
    fn peer_remove(&self, identity: &str) -> Result<PeerRemoved, ControlError> {
        self.calls.borrow_mut().push(format!("remove {identity}"));
        if identity == "spiffe://t/nobody" {
            return Err(ControlError::NotFound(format!(
                "peer_remove: no peer {identity}"
            )));
        }
        Ok(PeerRemoved {
            removed: identity.into(),
        })
    }
    fn policy_apply(
        &self,
        source: &str,
        name: &str,
        _now: UnixTime,
    ) -> Result<PolicyApplied, ControlError> {
        self.calls
            .borrow_mut()
            .push(format!("apply {name} {}", source.len()));
        Err(ControlError::Refused(
            "policy_apply: test case 1 failed".into(),
        ))
    }
    fn policy_get(&self) -> PolicyInfo {
        self.calls.borrow_mut().push("policy_get".into());
        PolicyInfo {
            name: String::new(),
            origin: PolicyOrigin::None,
            default: DefaultAction::Deny,
            policies: 0,
            tests: 0,
            source: String::new(),
        }
    }
    fn explain(&self, spec: RequestSpec) -> Explanation {
        self.calls
            .borrow_mut()
            .push(format!("explain {}", spec.to_port));
        let empty = mesh_proto::policy::CompiledPolicy::empty(DefaultAction::Deny);
        mesh_proto::policy::explain(&empty, &spec)
    }
    fn log_tail(&self, n: usize) -> Vec<Arc<str>> {
        self.calls.borrow_mut().push(format!("log {n}"));
        vec![
            Arc::from(
                "{\"time\":\"t\",\"src\":\"spiffe://t/a\",\"src_addr\":\"100.64.0.1\",\"dst\":null,\"dst_addr\":\"100.64.0.2\",\"dst_port\":22,\"proto\":\"tcp\",\"decision\":\"deny\",\"reason\":\"default_deny\",\"policy\":null,\"rule\":null}",
            ),
            // Not a record: left out, the others still answered.
            Arc::from("{\"decision\":\"deny\"}"),
        ]
    }
    fn log_follow(&self) -> Result<Receiver<Arc<str>>, ControlError> {
        Err(ControlError::Busy(
            "too many log followers (at most 0)".into(),
        ))
    }
    fn stopping(&self) -> bool {
        false
    }
    fn workload_list(&self) -> WorkloadList {
        self.calls.borrow_mut().push("workload_list".into());
        WorkloadList { workloads: vec![] }
    }
    fn workload_add(
        &self,
        spec: WorkloadSpec,
        _now: UnixTime,
    ) -> Result<WorkloadInfo, ControlError> {
        self.calls
            .borrow_mut()
            .push(format!("workload_add {} {:?}", spec.name, spec.veth));
        if spec.name == "web" {
            return Err(ControlError::Refused(
                "workload_add: web: no such file".into(),
            ));
        }
        Ok(WorkloadInfo {
            name: spec.name,
            identity: "spiffe://t/db".into(),
            public_key: "k".into(),
            addresses: vec![],
            groups: vec![],
            not_before: UnixTime(0),
            not_after: UnixTime(1),
            attach: Attach::Tun,
            source: WorkloadSource::Runtime,
        })
    }
    fn workload_remove(&self, name: &str) -> Result<WorkloadRemoved, ControlError> {
        self.calls
            .borrow_mut()
            .push(format!("workload_remove {name}"));
        Ok(WorkloadRemoved {
            removed: name.into(),
        })
    }
}

/// An unknown op, a garbled line, an unknown or missing or ill-typed field: a
/// typed bad-request error, and the daemon is not asked anything.
#[test]
fn malformed_requests_get_a_bad_request_error_and_call_nothing() {
    let f = Fake::default();
    for bad in [
        "",
        "}{",
        "{\"op\":\"status\",\"verbose\":true}",
        "{\"op\":\"peer_add\",\"endpoint\":\"198.18.0.2:51820\"}",
        "{\"op\":\"peer_remove\"}",
        "{\"op\":\"shutdown\"}",
        "{\"op\":\"explain\",\"to_port\":\"eighty\",\"proto\":\"tcp\"}",
        "{\"op\":\"workload_add\",\"name\":\"web\"}",
        "\u{0}\u{1}binary",
    ] {
        let e = handle(&f, bad, UnixTime(5)).expect_err(bad);
        assert_eq!(e.kind(), ErrorKind::BadRequest, "{bad:?}: {e}");
        assert!(e.message().starts_with("bad request"), "{bad:?}: {e}");
        // On the wire: one line, the kind beside the message.
        let line = reply_line::<()>(&Err(e));
        assert!(
            line.starts_with("{\"ok\":false,\"kind\":\"bad_request\",\"error\":\"bad request"),
            "{line}"
        );
    }
    assert!(f.calls.borrow().is_empty());
}

#[test]
fn requests_reach_the_daemon_and_get_its_typed_answer() {
    let f = Fake::default();
    let now = UnixTime(5);
    match handle(&f, "{\"op\":\"status\"}\n", now) {
        Ok(Response::Status(s)) => assert_eq!(s.identity, "spiffe://t/a"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        handle(&f, "{\"op\":\"peer_list\"}", now),
        Ok(Response::PeerList(l)) if l.peers.is_empty()
    ));
    let r = handle(
        &f,
        "{\"op\":\"peer_add\",\"cert\":\"x\",\"endpoint\":\"198.18.0.2:51820\"}",
        now,
    );
    assert_eq!(
        r,
        Err(ControlError::Refused(
            "peer_add: not a mesh certificate".into()
        ))
    );
    let r = handle(
        &f,
        "{\"op\":\"peer_remove\",\"identity\":\"spiffe://t/b\"}",
        now,
    );
    assert_eq!(
        r,
        Ok(Response::PeerRemoved(PeerRemoved {
            removed: "spiffe://t/b".into()
        }))
    );
    let r = handle(
        &f,
        "{\"op\":\"peer_remove\",\"identity\":\"spiffe://t/nobody\"}",
        now,
    );
    assert_eq!(r.map_err(|e| e.kind()), Err(ErrorKind::NotFound));
    assert!(matches!(
        handle(&f, "{\"op\":\"policy_get\"}", now),
        Ok(Response::PolicyInfo(p)) if p.origin == PolicyOrigin::None
    ));
    let r = handle(
        &f,
        "{\"op\":\"policy_apply\",\"source\":\"x\",\"name\":\"p.toml\"}",
        now,
    );
    assert_eq!(
        r,
        Err(ControlError::Refused(
            "policy_apply: test case 1 failed".into()
        ))
    );
    match handle(&f, "{\"op\":\"log\",\"lines\":3}", now) {
        Ok(Response::LogTail(t)) => {
            assert_eq!(t.lines.len(), 1);
            assert_eq!(t.lines[0].reason, "default_deny");
            assert_eq!(t.lines[0].proto, Protocol::Tcp);
        }
        other => panic!("{other:?}"),
    }
    match handle(
        &f,
        "{\"op\":\"explain\",\"from\":\"spiffe://t/a\",\"to_port\":80,\"proto\":\"tcp\"}",
        now,
    ) {
        Ok(Response::Explanation(e)) => assert_eq!(e.decision.reason, "default_deny"),
        other => panic!("{other:?}"),
    }
    let r = handle(
        &f,
        "{\"op\":\"workload_add\",\"name\":\"db\",\"cert\":\"/d.crt\",\"key\":\"/d.key\"}",
        now,
    );
    assert!(
        matches!(&r, Ok(Response::WorkloadInfo(w)) if w.name == "db"),
        "{r:?}"
    );
    assert!(matches!(
        handle(&f, "{\"op\":\"workload_remove\",\"name\":\"db\"}", now),
        Ok(Response::WorkloadRemoved(r)) if r.removed == "db"
    ));
    assert!(matches!(
        handle(&f, "{\"op\":\"workload_list\"}", now),
        Ok(Response::WorkloadList(_))
    ));
    assert_eq!(
        *f.calls.borrow(),
        vec![
            "status".to_string(),
            "list".into(),
            "add x Some(198.18.0.2:51820) 5".into(),
            "remove spiffe://t/b".into(),
            "remove spiffe://t/nobody".into(),
            "policy_get".into(),
            "apply p.toml 1".into(),
            "log 3".into(),
            "explain 80".into(),
            "workload_add db None".into(),
            "workload_remove db".into(),
            "workload_list".into(),
        ]
    );
}

/// A control socket in a fresh directory, served with `limits` (and the fake
/// daemon) on a thread until dropped.
struct Served {
    dir: PathBuf,
    path: PathBuf,
    shutdown: Arc<Shutdown>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Served {
    fn start(name: &str, limits: Limits) -> Served {
        let dir =
            std::env::temp_dir().join(format!("meshd-control-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("meshd.sock");
        let sock = ControlSocket::bind(&path).unwrap();
        let shutdown = Shutdown::new();
        let stop = shutdown.clone();
        // The server side of the test runs beside it.
        #[allow(clippy::disallowed_methods)]
        let thread =
            std::thread::spawn(move || serve_with(&sock, Arc::new(Fake::default()), &stop, limits));
        Served {
            dir,
            path,
            shutdown,
            thread: Some(thread),
        }
    }

    /// A connection, reads bounded so that a test fails rather than hangs.
    fn connect(&self) -> UnixStream {
        let s = UnixStream::connect(&self.path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }

    /// Sends `line` on `s` and reads one reply line.
    fn ask(&self, mut s: &UnixStream, line: &str) -> String {
        s.write_all(line.as_bytes()).unwrap();
        read_line(s)
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.shutdown.trigger();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Bytes up to and including a newline, or up to the end; panics if neither
/// comes within the connection's read timeout.
fn read_line(mut s: &UnixStream) -> String {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b) {
            Ok(0) => break,
            Ok(_) => {
                out.push(b[0]);
                if b[0] == b'\n' {
                    break;
                }
            }
            Err(e) => panic!(
                "no reply (got {:?} so far): {e}",
                String::from_utf8_lossy(&out)
            ),
        }
    }
    String::from_utf8(out).unwrap()
}

/// The server ended the connection (a read sees its end).
fn ended(s: &UnixStream) -> bool {
    read_line(s).is_empty()
}

/// Sixteen idle clients no longer lock everyone out: a new client takes the slot
/// of the one that has waited longest, the others keep theirs.
#[test]
fn a_new_client_takes_the_slot_of_the_longest_waiting_one() {
    let served = Served::start(
        "slots",
        Limits {
            clients: 4,
            request_timeout: Duration::from_secs(600),
        },
    );
    let idle: Vec<UnixStream> = (0..4).map(|_| served.connect()).collect();
    // Accepted in order (the listen queue is first in, first out): the fifth
    // comes after the four hold every slot.
    let late = served.connect();
    let reply = served.ask(&late, "{\"op\":\"status\"}\n");
    assert!(reply.contains("\"ok\":true"), "{reply}");
    assert!(ended(&idle[0]), "the longest-waiting client was not let go");
    // The others still hold their slots and are served.
    for s in &idle[1..] {
        let reply = served.ask(s, "{\"op\":\"peer_list\"}\n");
        assert!(reply.contains("\"ok\":true"), "{reply}");
    }
    // Full again; `late` has waited longest (the others were answered after it).
    let next = served.connect();
    let reply = served.ask(&next, "{\"op\":\"status\"}\n");
    assert!(reply.contains("\"ok\":true"), "{reply}");
    assert!(ended(&late));
}

/// A client must send a whole request within the timeout of connecting or of
/// its last reply: one that sends nothing, half a request, or nothing after an
/// answer is disconnected.
#[test]
fn clients_without_a_whole_request_in_time_are_disconnected() {
    let served = Served::start(
        "timeout",
        Limits {
            clients: 4,
            request_timeout: Duration::from_millis(100),
        },
    );
    let silent = served.connect();
    let mut half = served.connect();
    half.write_all(b"{\"op\":\"sta").unwrap();
    let answered = served.connect();
    let reply = served.ask(&answered, "{\"op\":\"status\"}\n");
    assert!(reply.contains("\"ok\":true"), "{reply}");
    assert!(ended(&silent));
    assert!(ended(&half));
    assert!(ended(&answered));
}

/// Errors cross the socket typed: a garbled request is a bad request, a follower
/// over the log's limit is told to try again, and the connection goes on.
#[test]
fn errors_cross_the_socket_with_their_kind() {
    let served = Served::start("errors", Limits::default());
    let s = served.connect();
    for (line, kind) in [
        ("{\"op\":\"no_such_op\"}\n", ErrorKind::BadRequest),
        ("[1,2,3]\n", ErrorKind::BadRequest),
        (
            "{\"op\":\"peer_remove\",\"identity\":\"spiffe://t/nobody\"}\n",
            ErrorKind::NotFound,
        ),
    ] {
        let reply = served.ask(&s, line);
        let e = parse_reply_as::<serde_json::Value>(&reply)
            .unwrap()
            .expect_err(&reply);
        assert_eq!(e.kind(), kind, "{reply}");
    }
    let follower = served.connect();
    let reply = served.ask(&follower, "{\"op\":\"log\",\"follow\":true}\n");
    let e = parse_reply_as::<LogTail>(&reply)
        .unwrap()
        .expect_err(&reply);
    assert_eq!(e.kind(), ErrorKind::Busy, "{reply}");
}

/// The request framing: pipelined lines each get a reply in order; bytes that are
/// not UTF-8 get an error and the connection goes on; an overlong line gets an
/// error and the end; a last line without a newline is still served.
#[test]
fn request_lines_are_framed_as_before() {
    let served = Served::start("framing", Limits::default());
    let s = served.connect();
    (&s).write_all(
        b"{\"op\":\"status\"}\n{\"op\":\"peer_list\"}\n\xff\xfe\n{\"op\":\"policy_get\"}",
    )
    .unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let replies: Vec<String> = (0..4).map(|_| read_line(&s)).collect();
    assert!(
        replies[0].contains("\"identity\":\"spiffe://t/a\""),
        "{replies:?}"
    );
    assert!(replies[1].contains("\"peers\":[]"), "{replies:?}");
    assert!(replies[2].contains("bad request: not UTF-8"), "{replies:?}");
    assert!(replies[3].contains("\"ok\":true"), "{replies:?}");
    assert!(ended(&s));

    let long = served.connect();
    let line = format!(
        "{{\"op\":\"status\",\"x\":\"{}\"}}\n",
        "a".repeat(MAX_REQUEST_BYTES)
    );
    // meshd may answer and close before it has read all: the rest is refused.
    let _ = (&long).write_all(line.as_bytes());
    let reply = read_line(&long);
    assert!(reply.contains("longer than"), "{reply}");
    assert!(ended(&long));
}
