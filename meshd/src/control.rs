//! The control socket (I/O shell): a Unix stream socket, mode 0600, that accepts only
//! clients running as the daemon's user or root (SO_PEERCRED). One JSON request per
//! line, one JSON reply per line (`mesh_proto::control`). A malformed request gets an
//! error reply and changes nothing.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use std::net::SocketAddr;

use mesh_proto::control::{
    PeerInfo, PeerList, PeerRemoved, Request, Response, Status, WorkloadInfo, WorkloadList,
    WorkloadRemoved, MAX_REQUEST_BYTES,
};
use mesh_proto::time::UnixTime;

use crate::daemon::Daemon;
use crate::datapath::unix_now;
use crate::transport::wait_readable;
use crate::workloads::WorkloadSpec;
use mesh_proto::policy::RequestSpec;

/// Concurrent control connections; more are refused with an error reply.
const MAX_CLIENTS: usize = 16;
/// A client that sends nothing for this long is disconnected.
const CLIENT_IDLE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {}: another meshd is listening there", path.display())]
    InUse { path: PathBuf },
    #[error("control socket {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
}

/// The bound socket; removes its file on drop.
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ControlSocket {
    pub fn bind(path: &Path) -> Result<ControlSocket, ControlError> {
        let io_err = |source| ControlError::Io {
            path: path.to_path_buf(),
            source,
        };
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(ControlError::InUse {
                    path: path.to_path_buf(),
                });
            }
            // A stale socket from a daemon that died.
            std::fs::remove_file(path).map_err(io_err)?;
        }
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir).map_err(io_err)?;
            }
        }
        let listener = UnixListener::bind(path).map_err(io_err)?;
        // The peer-credential check also covers the instant between bind and chmod.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io_err)?;
        listener.set_nonblocking(true).map_err(io_err)?;
        Ok(ControlSocket {
            listener,
            path: path.to_path_buf(),
        })
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Accepts clients until shutdown; each client is served on its own thread.
#[allow(clippy::disallowed_methods)] // I/O shell: one thread per control client
pub fn serve(sock: &ControlSocket, d: Arc<Daemon>) {
    let clients = Arc::new(AtomicUsize::new(0));
    while !d.shutdown.is_set() {
        let stream = match sock.listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let _ = wait_readable(sock.listener.as_raw_fd(), 200);
                continue;
            }
            Err(e) => {
                tracing::warn!("control accept: {e}");
                continue;
            }
        };
        if clients.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
            clients.fetch_sub(1, Ordering::SeqCst);
            let mut s = stream;
            let _ = writeln!(
                s,
                "{}",
                Response::error("too many control clients").to_line()
            );
            continue;
        }
        let d = d.clone();
        let clients = clients.clone();
        let spawned = std::thread::Builder::new()
            .name("control-client".into())
            .spawn(move || {
                if let Err(e) = client(stream, &d) {
                    tracing::debug!("control client: {e}");
                }
                clients.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            tracing::warn!("cannot start control client thread: {e}");
        }
    }
}

/// Whether the client closed its end (a zero-byte peek without blocking).
fn peer_closed(s: &UnixStream) -> bool {
    let mut probe = [0u8; 1];
    // SAFETY: `probe` is valid for writes of its length; MSG_PEEK leaves the data.
    let n = unsafe {
        libc::recv(
            s.as_raw_fd(),
            probe.as_mut_ptr().cast(),
            probe.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n == 0
}

/// The uid of the process at the other end of `s`.
fn peer_uid(s: &UnixStream) -> io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes and describe a ucred buffer.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.uid)
}

fn client(stream: UnixStream, d: &Daemon) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    let mut out = stream.try_clone()?;
    let uid = peer_uid(&stream)?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if uid != me && uid != 0 {
        tracing::warn!(uid, "control client refused: not the daemon's user or root");
        writeln!(out, "{}", Response::error("permission denied").to_line())?;
        return Ok(());
    }
    stream.set_read_timeout(Some(CLIENT_IDLE))?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        let n = (&mut reader)
            .take(MAX_REQUEST_BYTES as u64 + 1)
            .read_line(&mut line);
        let reply = match n {
            Ok(0) => return Ok(()),
            Ok(n) if n > MAX_REQUEST_BYTES => {
                writeln!(
                    out,
                    "{}",
                    Response::error(format!(
                        "bad request: longer than {MAX_REQUEST_BYTES} bytes"
                    ))
                    .to_line()
                )?;
                return Ok(());
            }
            Ok(_) => {
                if let Ok(Request::Log {
                    follow: true,
                    lines,
                }) = Request::parse(&line)
                {
                    return follow_log(d, out, lines);
                }
                handle(d, &line, unix_now())
            }
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                Response::error("bad request: not UTF-8")
            }
            Err(e) => return Err(e),
        };
        writeln!(out, "{}", reply.to_line())?;
    }
}

/// `log -f`: the last lines as one reply, then every new decision as a line of its
/// own, until the client goes away or the daemon stops.
fn follow_log(d: &Daemon, mut out: UnixStream, lines: Option<u32>) -> io::Result<()> {
    let rx = match d.log.follow() {
        Ok(rx) => rx,
        Err(e) => {
            writeln!(out, "{}", Response::error(e.to_string()).to_line())?;
            return Ok(());
        }
    };
    let n = lines.map_or(LOG_LINES, |n| n as usize);
    let first = Response::ok(serde_json::json!({ "lines": log_lines(&d.log.tail(n)) }));
    writeln!(out, "{}", first.to_line())?;
    while !d.shutdown.is_set() {
        match rx.recv_timeout(Duration::from_millis(500)) {
            Ok(line) => writeln!(out, "{line}")?,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                // Notice a client that went away even when nothing is logged.
                if peer_closed(&out) {
                    return Ok(());
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
        }
    }
    Ok(())
}

/// What the control socket asks of the daemon; [`Daemon`] implements it, tests use a
/// fake. Every method either applies its change completely or returns an error and
/// changes nothing.
pub trait Api {
    fn status(&self) -> Status;
    fn peer_list(&self) -> PeerList;
    fn peer_add(
        &self,
        pem: &str,
        endpoint: Option<SocketAddr>,
        now: UnixTime,
    ) -> Result<PeerInfo, String>;
    fn peer_remove(&self, identity: &str) -> Result<String, String>;
    /// Validates, tests, persists and swaps in a policy; cuts flows it forbids.
    fn policy_apply(
        &self,
        source: &str,
        name: &str,
        now: UnixTime,
    ) -> Result<serde_json::Value, String>;
    fn policy_get(&self) -> serde_json::Value;
    fn explain(&self, spec: RequestSpec) -> serde_json::Value;
    /// The last `n` decision-log lines, oldest first.
    fn log_tail(&self, n: usize) -> Vec<Arc<str>>;
    fn workload_list(&self) -> WorkloadList;
    fn workload_add(&self, spec: WorkloadSpec, now: UnixTime) -> Result<WorkloadInfo, String>;
    fn workload_remove(&self, name: &str) -> Result<String, String>;
}

impl Api for Daemon {
    fn status(&self) -> Status {
        Daemon::status(self)
    }
    fn peer_list(&self) -> PeerList {
        Daemon::peer_list(self)
    }
    fn peer_add(
        &self,
        pem: &str,
        endpoint: Option<SocketAddr>,
        now: UnixTime,
    ) -> Result<PeerInfo, String> {
        Daemon::peer_add(self, pem, endpoint, now)
    }
    fn peer_remove(&self, identity: &str) -> Result<String, String> {
        Daemon::peer_remove(self, identity)
    }
    fn policy_apply(
        &self,
        source: &str,
        name: &str,
        now: UnixTime,
    ) -> Result<serde_json::Value, String> {
        let (result, cuts) = Daemon::policy_apply(self, source, name, now)?;
        self.cut_flows(&cuts);
        Ok(result)
    }
    fn policy_get(&self) -> serde_json::Value {
        Daemon::policy_get(self)
    }
    fn explain(&self, spec: RequestSpec) -> serde_json::Value {
        Daemon::explain(self, spec)
    }
    fn log_tail(&self, n: usize) -> Vec<Arc<str>> {
        self.log.tail(n)
    }
    fn workload_list(&self) -> WorkloadList {
        Daemon::workload_list(self)
    }
    fn workload_add(&self, spec: WorkloadSpec, now: UnixTime) -> Result<WorkloadInfo, String> {
        Daemon::workload_add(self, spec, now)
    }
    fn workload_remove(&self, name: &str) -> Result<String, String> {
        Daemon::workload_remove(self, name)
    }
}

/// Default number of lines `log` returns.
const LOG_LINES: usize = 50;

/// The decision-log lines as JSON values (each line is a JSON object).
fn log_lines(lines: &[Arc<str>]) -> Vec<serde_json::Value> {
    lines
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Serves one request line at `now`.
pub fn handle(d: &dyn Api, line: &str, now: UnixTime) -> Response {
    let req = match Request::parse(line) {
        Ok(r) => r,
        Err(e) => return Response::error(e),
    };
    match req {
        Request::Status(_) => Response::ok(d.status()),
        Request::PeerList(_) => Response::ok(d.peer_list()),
        Request::PeerAdd { cert, endpoint } => match d.peer_add(&cert, endpoint, now) {
            Ok(info) => Response::ok(info),
            Err(e) => Response::error(e),
        },
        Request::PeerRemove { identity } => match d.peer_remove(&identity) {
            Ok(removed) => Response::ok(PeerRemoved { removed }),
            Err(e) => Response::error(e),
        },
        Request::PolicyApply { source, name } => {
            let name = name.unwrap_or_else(|| "policy.toml".into());
            match d.policy_apply(&source, &name, now) {
                Ok(r) => Response::ok(r),
                Err(e) => Response::error(e),
            }
        }
        Request::PolicyGet(_) => Response::ok(d.policy_get()),
        Request::Explain(map) => {
            match serde_json::from_value::<RequestSpec>(serde_json::Value::Object(map)) {
                Ok(spec) => Response::ok(d.explain(spec)),
                Err(e) => Response::error(format!("bad request: explain: {e}")),
            }
        }
        Request::Log { lines, .. } => {
            let n = lines.map_or(LOG_LINES, |n| n as usize);
            Response::ok(serde_json::json!({ "lines": log_lines(&d.log_tail(n)) }))
        }
        Request::WorkloadList(_) => Response::ok(d.workload_list()),
        Request::WorkloadAdd {
            name,
            cert,
            key,
            veth,
        } => {
            let spec = WorkloadSpec {
                name,
                cert: cert.into(),
                key: key.into(),
                veth,
            };
            match d.workload_add(spec, now) {
                Ok(info) => Response::ok(info),
                Err(e) => Response::error(e),
            }
        }
        Request::WorkloadRemove { name } => match d.workload_remove(&name) {
            Ok(removed) => Response::ok(WorkloadRemoved { removed }),
            Err(e) => Response::error(e),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use mesh_proto::control::{NodeDrops, PeerInfo};

    use super::*;

    /// Records which operations ran.
    #[derive(Default)]
    struct Fake {
        calls: RefCell<Vec<String>>,
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
        ) -> Result<PeerInfo, String> {
            self.calls
                .borrow_mut()
                .push(format!("add {pem} {endpoint:?} {}", now.secs()));
            Err("peer_add: not a mesh certificate".into())
        }
        fn peer_remove(&self, identity: &str) -> Result<String, String> {
            self.calls.borrow_mut().push(format!("remove {identity}"));
            Ok(identity.into())
        }
        fn policy_apply(
            &self,
            source: &str,
            name: &str,
            _now: UnixTime,
        ) -> Result<serde_json::Value, String> {
            self.calls
                .borrow_mut()
                .push(format!("apply {name} {}", source.len()));
            Err("policy_apply: test case 1 failed".into())
        }
        fn policy_get(&self) -> serde_json::Value {
            self.calls.borrow_mut().push("policy_get".into());
            serde_json::json!({"name": ""})
        }
        fn explain(&self, spec: RequestSpec) -> serde_json::Value {
            self.calls
                .borrow_mut()
                .push(format!("explain {}", spec.to_port));
            serde_json::json!({})
        }
        fn log_tail(&self, n: usize) -> Vec<Arc<str>> {
            self.calls.borrow_mut().push(format!("log {n}"));
            vec![Arc::from("{\"decision\":\"deny\"}")]
        }
        fn workload_list(&self) -> WorkloadList {
            self.calls.borrow_mut().push("workload_list".into());
            WorkloadList { workloads: vec![] }
        }
        fn workload_add(&self, spec: WorkloadSpec, _now: UnixTime) -> Result<WorkloadInfo, String> {
            self.calls
                .borrow_mut()
                .push(format!("workload_add {} {:?}", spec.name, spec.veth));
            Err("workload_add: web: no such file".into())
        }
        fn workload_remove(&self, name: &str) -> Result<String, String> {
            self.calls
                .borrow_mut()
                .push(format!("workload_remove {name}"));
            Ok(name.into())
        }
    }

    #[test]
    fn malformed_requests_get_an_error_and_call_nothing() {
        let f = Fake::default();
        for bad in [
            "",
            "}{",
            "{\"op\":\"status\",\"verbose\":true}",
            "{\"op\":\"peer_add\",\"endpoint\":\"198.18.0.2:51820\"}",
            "{\"op\":\"peer_remove\"}",
            "{\"op\":\"shutdown\"}",
            "\u{0}\u{1}binary",
        ] {
            let r = handle(&f, bad, UnixTime(5));
            assert!(!r.ok, "{bad:?}");
            assert!(r.error.unwrap().starts_with("bad request"), "{bad:?}");
        }
        assert!(f.calls.borrow().is_empty());
    }

    #[test]
    fn requests_reach_the_daemon() {
        let f = Fake::default();
        assert!(handle(&f, "{\"op\":\"status\"}\n", UnixTime(5)).ok);
        assert!(handle(&f, "{\"op\":\"peer_list\"}", UnixTime(5)).ok);
        let r = handle(
            &f,
            "{\"op\":\"peer_add\",\"cert\":\"x\",\"endpoint\":\"198.18.0.2:51820\"}",
            UnixTime(5),
        );
        assert_eq!(r.error.as_deref(), Some("peer_add: not a mesh certificate"));
        let r = handle(
            &f,
            "{\"op\":\"peer_remove\",\"identity\":\"spiffe://t/b\"}",
            UnixTime(5),
        );
        assert_eq!(r.result.unwrap()["removed"], "spiffe://t/b");
        let r = handle(&f, "{\"op\":\"policy_get\"}", UnixTime(5));
        assert!(r.ok);
        let r = handle(
            &f,
            "{\"op\":\"policy_apply\",\"source\":\"x\",\"name\":\"p.toml\"}",
            UnixTime(5),
        );
        assert_eq!(r.error.as_deref(), Some("policy_apply: test case 1 failed"));
        let r = handle(&f, "{\"op\":\"log\",\"lines\":3}", UnixTime(5));
        assert_eq!(r.result.unwrap()["lines"][0]["decision"], "deny");
        let r = handle(
            &f,
            "{\"op\":\"explain\",\"from\":\"spiffe://t/a\",\"to_port\":80,\"proto\":\"tcp\"}",
            UnixTime(5),
        );
        assert!(r.ok, "{:?}", r.error);
        let r = handle(
            &f,
            "{\"op\":\"explain\",\"to_port\":\"eighty\"}",
            UnixTime(5),
        );
        assert!(r.error.unwrap().starts_with("bad request"));
        assert_eq!(
            *f.calls.borrow(),
            vec![
                "status".to_string(),
                "list".into(),
                "add x Some(198.18.0.2:51820) 5".into(),
                "remove spiffe://t/b".into(),
                "policy_get".into(),
                "apply p.toml 1".into(),
                "log 3".into(),
                "explain 80".into(),
            ]
        );
    }
}
