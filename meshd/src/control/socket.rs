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
mod tests;
