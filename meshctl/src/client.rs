//! The client side of the control contract (`mesh_proto::control`): one request line
//! to meshd's socket, one typed reply back; for `log -f`, then a stream of decision
//! records. Every command that talks to a running meshd goes through [`Client`].

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use mesh_proto::control::{
    parse_reply, BadReply, Call, ControlError, DecisionRecord, ErrorKind, LogRequest, LogTail,
    Request,
};

use crate::Global;

/// Where meshctl looks for meshd when neither --socket nor MESHD_SOCKET is given.
pub const DEFAULT_SOCKET: &str = "/run/meshd/meshd.sock";

/// How long meshctl waits for a reply: a daemon that never answers must not hang the
/// operator's shell.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a call to meshd did not give its result.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach meshd at {} (is it running? set --socket or MESHD_SOCKET)", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: cannot send request", path.display())]
    Send {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: cannot read reply", path.display())]
    Receive {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: meshd closed the connection", path.display())]
    Closed { path: PathBuf },
    /// The reply is not one of the contract.
    #[error(transparent)]
    BadReply(#[from] BadReply),
    /// meshd answered with an error: its one line, said to be meshd's.
    #[error("meshd: {0}")]
    Daemon(ControlError),
}

impl ClientError {
    /// meshctl's exit status for this error (see `main.rs`).
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::Daemon(e) => match e.kind() {
                ErrorKind::Refused => 1,
                ErrorKind::NotFound => 3,
                ErrorKind::NotAllowed => 4,
                ErrorKind::Busy => 5,
                ErrorKind::BadRequest => 6,
                ErrorKind::Internal => 7,
            },
            _ => 1,
        }
    }
}

/// meshd's control socket.
pub struct Client {
    path: PathBuf,
}

impl Client {
    /// The socket of --socket, else MESHD_SOCKET, else [`DEFAULT_SOCKET`].
    pub fn new(g: &Global) -> Client {
        Client {
            path: g
                .socket
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET)),
        }
    }

    /// Sends `req` and returns its result, or meshd's error.
    pub fn call<C: Call>(&self, req: C) -> Result<C::Response, ClientError> {
        let (_, line) = self.exchange(req.into(), Some(REPLY_TIMEOUT))?;
        parse_reply::<C>(&line)?.map_err(ClientError::Daemon)
    }

    /// `log` with `follow`: the last decisions, then a stream of new ones.
    pub fn follow_log(&self, req: LogRequest) -> Result<(LogTail, LogStream), ClientError> {
        let req = LogRequest {
            follow: true,
            ..req
        };
        // A follower waits for decisions as long as they take.
        let (reader, line) = self.exchange(req.into(), None)?;
        let tail = parse_reply::<LogRequest>(&line)?.map_err(ClientError::Daemon)?;
        Ok((
            tail,
            LogStream {
                reader,
                path: self.path.clone(),
            },
        ))
    }

    /// Sends one request line and reads one reply line; the reader stays for more.
    fn exchange(
        &self,
        req: Request,
        timeout: Option<Duration>,
    ) -> Result<(BufReader<UnixStream>, String), ClientError> {
        let path = || self.path.clone();
        let s = UnixStream::connect(&self.path).map_err(|source| ClientError::Connect {
            path: path(),
            source,
        })?;
        s.set_read_timeout(timeout)
            .map_err(|source| ClientError::Receive {
                path: path(),
                source,
            })?;
        let mut line = req.to_line();
        line.push('\n');
        (&s).write_all(line.as_bytes())
            .map_err(|source| ClientError::Send {
                path: path(),
                source,
            })?;
        let mut reader = BufReader::new(s);
        let mut reply = String::new();
        reader
            .read_line(&mut reply)
            .map_err(|source| ClientError::Receive {
                path: path(),
                source,
            })?;
        if reply.trim().is_empty() {
            return Err(ClientError::Closed { path: path() });
        }
        Ok((reader, reply))
    }
}

/// The decisions meshd sends a follower, one record per line.
pub struct LogStream {
    reader: BufReader<UnixStream>,
    path: PathBuf,
}

impl LogStream {
    /// The next decision; `Closed` when meshd ends the stream. A line that is not a
    /// record (from a meshd of another version) is skipped.
    pub fn next_record(&mut self) -> Result<DecisionRecord, ClientError> {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self
                .reader
                .read_line(&mut line)
                .map_err(|source| ClientError::Receive {
                    path: self.path.clone(),
                    source,
                })?;
            if n == 0 {
                return Err(ClientError::Closed {
                    path: self.path.clone(),
                });
            }
            if let Ok(rec) = serde_json::from_str(&line) {
                return Ok(rec);
            }
        }
    }
}
