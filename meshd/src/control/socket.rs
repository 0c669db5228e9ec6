//! The control socket (I/O shell): a Unix stream socket, mode 0600, that accepts only
//! clients running as the daemon's user or root (SO_PEERCRED). One JSON request per
//! line, one JSON reply per line, in the types of the contract `mesh_proto::control`:
//! [`handle`] parses a [`Request`], asks the daemon through [`Api`] (whose methods
//! return the contract's result types and [`ControlError`]s) and answers. A malformed
//! request gets a [`ControlError::BadRequest`] and changes nothing.
//!
//! Clients are bounded ([`Limits`]) and none can hold a slot for long without using
//! it: a request line must arrive within seconds of connecting (or of the previous
//! reply), and when every slot is taken a new client takes the one of the client
//! that has waited longest, so an operator always gets in.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::net::SocketAddr;

use mesh_proto::control::{
    reply_line, ControlError, DecisionRecord, Explanation, LogRequest, LogTail, PeerAddRequest,
    PeerInfo, PeerList, PeerRemoveRequest, PeerRemoved, PolicyApplied, PolicyApplyRequest,
    PolicyInfo, Request, Response, Status, WorkloadAddRequest, WorkloadInfo, WorkloadList,
    WorkloadRemoveRequest, WorkloadRemoved, DEFAULT_LOG_LINES, MAX_REQUEST_BYTES,
};
use mesh_proto::time::UnixTime;

use crate::control::daemon::Daemon;
use crate::control::workloads::WorkloadSpec;
use crate::sys::clock::unix_now;
use crate::sys::poll::wait_readable;
use crate::sys::shutdown::Shutdown;
use mesh_proto::policy::RequestSpec;

/// How many clients are served at once, and how long each may take to send a request.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections served at once. When all are taken, a new client takes the slot
    /// of the client that has waited longest without sending a whole request (else
    /// of the oldest `log -f` follower); only when every slot is busy with a request
    /// is it refused, with an error reply.
    pub clients: usize,
    /// A client must send a whole request line within this long of connecting (or
    /// of its previous reply), else it is disconnected.
    pub request_timeout: Duration,
}

impl Default for Limits {
    /// 16 clients, 5 s per request: `meshctl` sends its request at once; a script
    /// that holds a connection open without using it gives way within seconds.
    fn default() -> Limits {
        Limits {
            clients: 16,
            request_timeout: Duration::from_secs(5),
        }
    }
}

/// Why the control socket cannot be bound.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
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
    pub fn bind(path: &Path) -> Result<ControlSocket, SocketError> {
        let io_err = |source| SocketError::Io {
            path: path.to_path_buf(),
            source,
        };
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(SocketError::InUse {
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

/// What a connected client is doing, for [`Slots::admit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Doing {
    /// Connected, or answered, and no whole request since: may be dropped for a new
    /// client.
    Waiting,
    /// A request is being served: never dropped.
    Busy,
    /// Following the decision log (`log -f`): dropped for a new client only when no
    /// client is waiting.
    Following,
}

struct Slot {
    id: u64,
    doing: Doing,
    /// When `doing` began.
    since: Instant,
    /// A handle on the connection, to end it when the slot is given away.
    stream: UnixStream,
}

/// The clients being served; bounded by [`Limits::clients`].
#[derive(Default)]
struct Slots {
    list: Mutex<(u64, Vec<Slot>)>,
}

impl Slots {
    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, Vec<Slot>)> {
        self.list.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A slot for a new client, if one is free or can be freed (the longest-waiting
    /// client, else the oldest follower, is disconnected); `None` when every slot
    /// serves a request.
    fn admit(&self, stream: &UnixStream, max: usize, now: Instant) -> Option<u64> {
        let mut guard = self.lock();
        let (next, list) = &mut *guard;
        if list.len() >= max {
            let victim = [Doing::Waiting, Doing::Following].iter().find_map(|d| {
                list.iter()
                    .enumerate()
                    .filter(|(_, s)| s.doing == *d)
                    .min_by_key(|(_, s)| (s.since, s.id))
                    .map(|(i, _)| i)
            })?;
            let gone = list.swap_remove(victim);
            tracing::info!(
                doing = ?gone.doing,
                "control socket full: the {} client gives its slot to a new one",
                if gone.doing == Doing::Waiting { "longest-idle" } else { "oldest following" }
            );
            // Its thread sees the end of its connection and leaves.
            let _ = gone.stream.shutdown(std::net::Shutdown::Both);
        }
        let stream = stream.try_clone().ok()?;
        *next += 1;
        list.push(Slot {
            id: *next,
            doing: Doing::Waiting,
            since: now,
            stream,
        });
        Some(*next)
    }

    fn set(&self, id: u64, doing: Doing, now: Instant) {
        if let Some(s) = self.lock().1.iter_mut().find(|s| s.id == id) {
            s.doing = doing;
            s.since = now;
        }
    }

    fn leave(&self, id: u64) {
        self.lock().1.retain(|s| s.id != id);
    }
}

/// The I/O shell's clock (control connections' deadlines).
#[allow(clippy::disallowed_methods)] // I/O shell: deadlines of control clients
fn instant_now() -> Instant {
    Instant::now()
}

/// Accepts clients until shutdown; each client is served on its own thread.
pub fn serve(sock: &ControlSocket, d: Arc<Daemon>) {
    let shutdown = d.plane.shutdown.clone();
    serve_with(sock, d, &shutdown, Limits::default());
}

/// [`serve`] for any [`Api`], with `limits`.
#[allow(clippy::disallowed_methods)] // I/O shell: one thread per control client
pub fn serve_with<A: Api + Send + Sync + 'static>(
    sock: &ControlSocket,
    api: Arc<A>,
    shutdown: &Shutdown,
    limits: Limits,
) {
    let slots = Arc::new(Slots::default());
    while !shutdown.is_set() {
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
        let Some(id) = slots.admit(&stream, limits.clients, instant_now()) else {
            let mut s = stream;
            let busy = ControlError::Busy(
                "too many control clients, each serving a request: try again".into(),
            );
            let _ = writeln!(s, "{}", reply_line::<()>(&Err(busy)));
            continue;
        };
        let api = api.clone();
        let slots2 = slots.clone();
        let spawned = std::thread::Builder::new()
            .name("control-client".into())
            .spawn(move || {
                let c = Client {
                    id,
                    slots: &slots2,
                    timeout: limits.request_timeout,
                };
                if let Err(e) = c.serve(stream, &*api) {
                    tracing::debug!("control client: {e}");
                }
                slots2.leave(id);
            });
        if let Err(e) = spawned {
            tracing::warn!("cannot start control client thread: {e}");
            slots.leave(id);
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

/// One line read from a client.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    Request(String),
    /// The client closed its end (after a whole line, or with nothing pending).
    End,
    TooLong,
    NotUtf8,
    /// No whole line before the deadline.
    TimedOut,
}

/// Reads request lines; bytes after a line stay for the next one (pipelined
/// requests).
struct LineReader {
    buf: Vec<u8>,
}

impl LineReader {
    /// The next line from `stream` (without its newline), if it arrives before
    /// `deadline`; `now` is the I/O shell's clock.
    fn next(
        &mut self,
        mut stream: &UnixStream,
        deadline: Instant,
        now: impl Fn() -> Instant,
    ) -> io::Result<Line> {
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                return Ok(Self::decode(line));
            }
            if self.buf.len() > MAX_REQUEST_BYTES {
                return Ok(Line::TooLong);
            }
            let left = deadline.saturating_duration_since(now());
            if left.is_zero() {
                return Ok(Line::TimedOut);
            }
            stream.set_read_timeout(Some(left))?;
            match stream.read(&mut chunk) {
                // The end: a last line without its newline is still a request.
                Ok(0) if self.buf.is_empty() => return Ok(Line::End),
                Ok(0) => return Ok(Self::decode(std::mem::take(&mut self.buf))),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn decode(line: Vec<u8>) -> Line {
        if line.len() > MAX_REQUEST_BYTES {
            return Line::TooLong;
        }
        match String::from_utf8(line) {
            Ok(l) => Line::Request(l),
            Err(_) => Line::NotUtf8,
        }
    }
}

/// One client's connection and its slot.
struct Client<'a> {
    id: u64,
    slots: &'a Slots,
    timeout: Duration,
}

impl Client<'_> {
    fn serve(&self, stream: UnixStream, api: &dyn Api) -> io::Result<()> {
        stream.set_nonblocking(false)?;
        let mut out = stream.try_clone()?;
        let uid = peer_uid(&stream)?;
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        if uid != me && uid != 0 {
            tracing::warn!(uid, "control client refused: not the daemon's user or root");
            let denied = ControlError::NotAllowed("permission denied".into());
            writeln!(out, "{}", reply_line::<()>(&Err(denied)))?;
            return Ok(());
        }
        let mut reader = LineReader { buf: Vec::new() };
        let mut waiting_since = instant_now();
        loop {
            let line = reader.next(&stream, waiting_since + self.timeout, instant_now)?;
            let reply = match line {
                Line::End => return Ok(()),
                Line::TimedOut => {
                    tracing::debug!("control client sent no request in {:?}", self.timeout);
                    return Ok(());
                }
                Line::TooLong => {
                    let long = ControlError::BadRequest(format!(
                        "bad request: longer than {MAX_REQUEST_BYTES} bytes"
                    ));
                    writeln!(out, "{}", reply_line::<()>(&Err(long)))?;
                    return Ok(());
                }
                Line::NotUtf8 => Err(ControlError::BadRequest("bad request: not UTF-8".into())),
                Line::Request(line) => {
                    if let Ok(Request::Log(LogRequest {
                        follow: true,
                        lines,
                    })) = Request::parse(&line)
                    {
                        self.slots.set(self.id, Doing::Following, instant_now());
                        return follow_log(api, out, lines);
                    }
                    self.slots.set(self.id, Doing::Busy, instant_now());
                    handle(api, &line, unix_now())
                }
            };
            // Waiting from its answer on, marked before the reply goes out: a client
            // that has its answer and asks again, or a new client, must find the
            // slots in the order the answers went (the test of the slots saw the last
            // client answered still marked busy, and the one before it taken instead).
            waiting_since = instant_now();
            self.slots.set(self.id, Doing::Waiting, waiting_since);
            writeln!(out, "{}", reply_line(&reply))?;
        }
    }
}

/// `log -f`: the last lines as one reply ([`LogTail`]), then every new decision as a
/// line of its own (a [`DecisionRecord`] as the log wrote it), until the client goes
/// away or the daemon stops.
fn follow_log(d: &dyn Api, mut out: UnixStream, lines: Option<u32>) -> io::Result<()> {
    let rx = match d.log_follow() {
        Ok(rx) => rx,
        Err(e) => {
            writeln!(out, "{}", reply_line::<()>(&Err(e)))?;
            return Ok(());
        }
    };
    writeln!(out, "{}", reply_line(&Ok(log_tail(d, lines))))?;
    while !d.stopping() {
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
/// fake. Results are the contract's types. Every method either applies its change
/// completely or returns an error and changes nothing.
pub trait Api {
    fn status(&self) -> Status;
    fn peer_list(&self) -> PeerList;
    fn peer_add(
        &self,
        pem: &str,
        endpoint: Option<SocketAddr>,
        now: UnixTime,
    ) -> Result<PeerInfo, ControlError>;
    fn peer_remove(&self, identity: &str) -> Result<PeerRemoved, ControlError>;
    /// Validates, tests, persists and swaps in a policy; cuts flows it forbids.
    fn policy_apply(
        &self,
        source: &str,
        name: &str,
        now: UnixTime,
    ) -> Result<PolicyApplied, ControlError>;
    fn policy_get(&self) -> PolicyInfo;
    fn explain(&self, spec: RequestSpec) -> Explanation;
    /// The last `n` decision-log lines, oldest first.
    fn log_tail(&self, n: usize) -> Vec<Arc<str>>;
    /// Every decision-log line from now on (`log -f`).
    fn log_follow(&self) -> Result<Receiver<Arc<str>>, ControlError>;
    /// The daemon is shutting down (followers stop).
    fn stopping(&self) -> bool;
    fn workload_list(&self) -> WorkloadList;
    fn workload_add(&self, spec: WorkloadSpec, now: UnixTime)
        -> Result<WorkloadInfo, ControlError>;
    fn workload_remove(&self, name: &str) -> Result<WorkloadRemoved, ControlError>;
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
    ) -> Result<PeerInfo, ControlError> {
        Daemon::peer_add(self, pem, endpoint, now)
    }
    fn peer_remove(&self, identity: &str) -> Result<PeerRemoved, ControlError> {
        Daemon::peer_remove(self, identity).map(|removed| PeerRemoved { removed })
    }
    fn policy_apply(
        &self,
        source: &str,
        name: &str,
        now: UnixTime,
    ) -> Result<PolicyApplied, ControlError> {
        let (result, cuts) = Daemon::policy_apply(self, source, name, now)?;
        self.cut_flows(&cuts);
        Ok(result)
    }
    fn policy_get(&self) -> PolicyInfo {
        Daemon::policy_get(self)
    }
    fn explain(&self, spec: RequestSpec) -> Explanation {
        Daemon::explain(self, spec)
    }
    fn log_tail(&self, n: usize) -> Vec<Arc<str>> {
        self.plane.log.tail(n)
    }
    fn log_follow(&self) -> Result<Receiver<Arc<str>>, ControlError> {
        self.plane
            .log
            .follow()
            .map_err(|e| ControlError::Busy(e.to_string()))
    }
    fn stopping(&self) -> bool {
        self.plane.shutdown.is_set()
    }
    fn workload_list(&self) -> WorkloadList {
        Daemon::workload_list(self)
    }
    fn workload_add(
        &self,
        spec: WorkloadSpec,
        now: UnixTime,
    ) -> Result<WorkloadInfo, ControlError> {
        Daemon::workload_add(self, spec, now)
    }
    fn workload_remove(&self, name: &str) -> Result<WorkloadRemoved, ControlError> {
        Daemon::workload_remove(self, name).map(|removed| WorkloadRemoved { removed })
    }
}

/// The last `lines` decisions ([`DEFAULT_LOG_LINES`] when not said), as records. A
/// line that is not a record (none is: the log writes them) is left out.
fn log_tail(d: &dyn Api, lines: Option<u32>) -> LogTail {
    let n = lines.unwrap_or(DEFAULT_LOG_LINES) as usize;
    LogTail {
        lines: d
            .log_tail(n)
            .iter()
            .filter_map(|l| serde_json::from_str::<DecisionRecord>(l).ok())
            .collect(),
    }
}

/// Serves one request line at `now`.
pub fn handle(d: &dyn Api, line: &str, now: UnixTime) -> Result<Response, ControlError> {
    Ok(match Request::parse(line)? {
        Request::Status(_) => Response::Status(Box::new(d.status())),
        Request::PeerList(_) => Response::PeerList(d.peer_list()),
        Request::PeerAdd(PeerAddRequest { cert, endpoint }) => {
            Response::PeerInfo(d.peer_add(&cert, endpoint, now)?)
        }
        Request::PeerRemove(PeerRemoveRequest { identity }) => {
            Response::PeerRemoved(d.peer_remove(&identity)?)
        }
        Request::PolicyApply(PolicyApplyRequest { source, name }) => {
            let name = name.unwrap_or_else(|| "policy.toml".into());
            Response::PolicyApplied(d.policy_apply(&source, &name, now)?)
        }
        Request::PolicyGet(_) => Response::PolicyInfo(d.policy_get()),
        Request::Explain(spec) => Response::Explanation(Box::new(d.explain(spec))),
        Request::Log(LogRequest { lines, .. }) => Response::LogTail(log_tail(d, lines)),
        Request::WorkloadList(_) => Response::WorkloadList(d.workload_list()),
        Request::WorkloadAdd(WorkloadAddRequest {
            name,
            cert,
            key,
            veth,
        }) => {
            let spec = WorkloadSpec {
                name,
                cert: cert.into(),
                key: key.into(),
                veth,
            };
            Response::WorkloadInfo(d.workload_add(spec, now)?)
        }
        Request::WorkloadRemove(WorkloadRemoveRequest { name }) => {
            Response::WorkloadRemoved(d.workload_remove(&name)?)
        }
    })
}

#[cfg(test)]
mod tests {
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
            let dir = std::env::temp_dir()
                .join(format!("meshd-control-test-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            let path = dir.join("meshd.sock");
            let sock = ControlSocket::bind(&path).unwrap();
            let shutdown = Shutdown::new();
            let stop = shutdown.clone();
            // The server side of the test runs beside it.
            #[allow(clippy::disallowed_methods)]
            let thread = std::thread::spawn(move || {
                serve_with(&sock, Arc::new(Fake::default()), &stop, limits)
            });
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
}
