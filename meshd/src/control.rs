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

use mesh_proto::control::{PeerRemoved, Request, Response, MAX_REQUEST_BYTES};

use crate::daemon::Daemon;
use crate::datapath::unix_now;
use crate::transport::wait_readable;

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
            Ok(_) => handle(d, &line),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                Response::error("bad request: not UTF-8")
            }
            Err(e) => return Err(e),
        };
        writeln!(out, "{}", reply.to_line())?;
    }
}

/// Serves one request line.
pub fn handle(d: &Daemon, line: &str) -> Response {
    let req = match Request::parse(line) {
        Ok(r) => r,
        Err(e) => return Response::error(e),
    };
    match req {
        Request::Status(_) => Response::ok(d.status()),
        Request::PeerList(_) => Response::ok(d.peer_list()),
        Request::PeerAdd { cert, endpoint } => match d.peer_add(&cert, endpoint, unix_now()) {
            Ok(info) => Response::ok(info),
            Err(e) => Response::error(e),
        },
        Request::PeerRemove { identity } => match d.peer_remove(&identity) {
            Ok(removed) => Response::ok(PeerRemoved { removed }),
            Err(e) => Response::error(e),
        },
        Request::PolicyApply { .. }
        | Request::PolicyGet(_)
        | Request::Explain(_)
        | Request::Log { .. } => {
            Response::error("policy operations are not available in this meshd build")
        }
    }
}
