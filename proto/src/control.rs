//! The control contract between `meshd` and `meshctl`: one JSON request line from the
//! client, one JSON reply line from the daemon, over a Unix socket (mode 0600, peer
//! credentials checked by the daemon). Everything that crosses the socket is a type of
//! this module; neither side reads the other's JSON by string keys.
//!
//! # Requests
//!
//! A [`Request`] is an object tagged by `op`; its other fields are those of the call's
//! request struct. Each request struct names its reply type through [`Call`]:
//!
//! | `op`              | request struct            | result                        |
//! |-------------------|---------------------------|-------------------------------|
//! | `status`          | [`StatusRequest`]         | [`Status`]                    |
//! | `peer_add`        | [`PeerAddRequest`]        | [`PeerInfo`]                  |
//! | `peer_remove`     | [`PeerRemoveRequest`]     | [`PeerRemoved`]               |
//! | `peer_list`       | [`PeerListRequest`]       | [`PeerList`]                  |
//! | `policy_apply`    | [`PolicyApplyRequest`]    | [`PolicyApplied`]             |
//! | `policy_get`      | [`PolicyGetRequest`]      | [`PolicyInfo`]                |
//! | `explain`         | [`RequestSpec`]           | [`Explanation`]               |
//! | `log`             | [`LogRequest`]            | [`LogTail`] (then, with `follow`, one [`DecisionRecord`] per line) |
//! | `workload_add`    | [`WorkloadAddRequest`]    | [`WorkloadInfo`]              |
//! | `workload_remove` | [`WorkloadRemoveRequest`] | [`WorkloadRemoved`]           |
//! | `workload_list`   | [`WorkloadListRequest`]   | [`WorkloadList`]              |
//!
//! For example `{"op":"peer_remove","identity":"spiffe://t/b"}`. An unknown `op`, an
//! unknown or missing field, or a field of the wrong type is a
//! [`ControlError::BadRequest`] and changes nothing.
//!
//! # Replies
//!
//! `{"ok":true,"result":<the call's result>}`, or
//! `{"ok":false,"kind":"<ErrorKind>","error":"<one line>"}` ([`ControlError`]). This is
//! the wire format meshd spoke before the contract was typed, plus `kind`: a reply
//! without `kind` (from such a meshd) reads as [`ControlError::Refused`].
//!
//! Identities and keys travel as their canonical strings (SPIFFE ID, base64 key),
//! addresses and prefixes as text (`100.64.0.1/32`), times as Unix seconds.
//!
//! Result types are forward-compatible one way: fields a newer daemon adds are ignored,
//! and fields an older daemon lacks read as their defaults where the field's doc says
//! so. Request types are strict (`deny_unknown_fields`): a daemon never guesses.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

mod log;
mod peers;
mod policy;
mod status;
mod workloads;

#[cfg(test)]
mod tests;

pub use self::log::{DecisionRecord, HttpSummary, LogRequest, LogTail, DEFAULT_LOG_LINES};
pub use self::peers::{
    PeerAddRequest, PeerInfo, PeerList, PeerListRequest, PeerRemoveRequest, PeerRemoved, PeerSource,
};
pub use self::policy::{
    PolicyApplied, PolicyApplyRequest, PolicyGetRequest, PolicyInfo, PolicyOrigin,
};
pub use self::status::{
    CpuLatencyState, CpuLatencyStatus, Enforcement, EnforcementCounters, HostFilterState,
    HostFilterStatus, LogCounters, NodeDrops, PeerDrops, PeerStatus, RuleCount, Status,
    StatusRequest,
};
pub use self::workloads::{
    Attach, BadAttach, WorkloadAddRequest, WorkloadInfo, WorkloadList, WorkloadListRequest,
    WorkloadRemoveRequest, WorkloadRemoved, WorkloadSource,
};
pub use crate::policy::{Explanation, RequestSpec};

/// Longest request line the daemon reads (a certificate PEM or policy file fits easily).
pub const MAX_REQUEST_BYTES: usize = 1 << 20;

/// A control request: one of the calls, tagged by `op` (see the module docs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Status(StatusRequest),
    PeerAdd(PeerAddRequest),
    PeerRemove(PeerRemoveRequest),
    PeerList(PeerListRequest),
    PolicyApply(PolicyApplyRequest),
    PolicyGet(PolicyGetRequest),
    /// A described request for `policy explain`; its fields belong to the policy model.
    Explain(RequestSpec),
    Log(LogRequest),
    WorkloadAdd(WorkloadAddRequest),
    WorkloadRemove(WorkloadRemoveRequest),
    WorkloadList(WorkloadListRequest),
}

impl Request {
    /// Parses one request line (a trailing newline is allowed).
    pub fn parse(line: &str) -> Result<Request, ControlError> {
        let bad = |e: &dyn std::fmt::Display| ControlError::BadRequest(format!("bad request: {e}"));
        let v: serde_json::Value = serde_json::from_str(line.trim_end()).map_err(|e| bad(&e))?;
        if !v.is_object() {
            return Err(bad(&"expected a JSON object with an \"op\" field"));
        }
        serde_json::from_value(v).map_err(|e| bad(&e))
    }

    /// The request as one line of JSON (no newline).
    pub fn to_line(&self) -> String {
        // Strings, numbers and addresses only: encoding cannot fail.
        serde_json::to_string(self).unwrap_or_else(|_| String::from("{}"))
    }
}

/// A request struct and the type of its result: what a client sends and what it
/// decodes the reply's `result` into.
pub trait Call: Into<Request> {
    type Response: Serialize + DeserializeOwned;
}

macro_rules! calls {
    ($($variant:ident($req:ty) -> $resp:ty;)*) => {$(
        impl From<$req> for Request {
            fn from(r: $req) -> Request {
                Request::$variant(r)
            }
        }
        impl Call for $req {
            type Response = $resp;
        }
    )*};
}

calls! {
    Status(StatusRequest) -> Status;
    PeerAdd(PeerAddRequest) -> PeerInfo;
    PeerRemove(PeerRemoveRequest) -> PeerRemoved;
    PeerList(PeerListRequest) -> PeerList;
    PolicyApply(PolicyApplyRequest) -> PolicyApplied;
    PolicyGet(PolicyGetRequest) -> PolicyInfo;
    Explain(RequestSpec) -> Explanation;
    Log(LogRequest) -> LogTail;
    WorkloadAdd(WorkloadAddRequest) -> WorkloadInfo;
    WorkloadRemove(WorkloadRemoveRequest) -> WorkloadRemoved;
    WorkloadList(WorkloadListRequest) -> WorkloadList;
}

/// The result of any call, as the daemon answers it; a client decodes the concrete
/// type its request names ([`Call::Response`]).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Response {
    Status(Box<Status>),
    PeerInfo(PeerInfo),
    PeerRemoved(PeerRemoved),
    PeerList(PeerList),
    PolicyApplied(PolicyApplied),
    PolicyInfo(PolicyInfo),
    Explanation(Box<Explanation>),
    LogTail(LogTail),
    WorkloadInfo(WorkloadInfo),
    WorkloadRemoved(WorkloadRemoved),
    WorkloadList(WorkloadList),
}

/// Why the daemon did not do what was asked. Each variant holds the one line shown to
/// the operator (no newline), which names the call and the thing refused:
/// `peer_remove: no peer spiffe://t/b`. Nothing changed in the daemon.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// The request line does not parse into a [`Request`], or a field is not of its
    /// type: the client and the daemon disagree on the contract.
    #[error("{0}")]
    BadRequest(String),
    /// The client may not use the socket (not the daemon's user or root).
    #[error("{0}")]
    NotAllowed(String),
    /// A well-formed request that validation refused; the message says why (a
    /// certificate not signed by the CA, addresses that overlap, a policy whose tests
    /// fail, ...).
    #[error("{0}")]
    Refused(String),
    /// The request names a peer or workload the daemon does not have.
    #[error("{0}")]
    NotFound(String),
    /// Every slot is taken (control clients, log followers): try again.
    #[error("{0}")]
    Busy(String),
    /// The daemon could not carry out a valid request (a state file it cannot write,
    /// the kernel refusing a change); its log has more.
    #[error("{0}")]
    Internal(String),
}

/// The kind of a [`ControlError`], as it travels (`kind`) and as meshctl maps it to an
/// exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    BadRequest,
    NotAllowed,
    Refused,
    NotFound,
    Busy,
    Internal,
}

impl ControlError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> ControlError {
        // The reply is one line.
        let m = message.into().replace('\n', " ");
        match kind {
            ErrorKind::BadRequest => ControlError::BadRequest(m),
            ErrorKind::NotAllowed => ControlError::NotAllowed(m),
            ErrorKind::Refused => ControlError::Refused(m),
            ErrorKind::NotFound => ControlError::NotFound(m),
            ErrorKind::Busy => ControlError::Busy(m),
            ErrorKind::Internal => ControlError::Internal(m),
        }
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            ControlError::BadRequest(_) => ErrorKind::BadRequest,
            ControlError::NotAllowed(_) => ErrorKind::NotAllowed,
            ControlError::Refused(_) => ErrorKind::Refused,
            ControlError::NotFound(_) => ErrorKind::NotFound,
            ControlError::Busy(_) => ErrorKind::Busy,
            ControlError::Internal(_) => ErrorKind::Internal,
        }
    }

    pub fn message(&self) -> &str {
        match self {
            ControlError::BadRequest(m)
            | ControlError::NotAllowed(m)
            | ControlError::Refused(m)
            | ControlError::NotFound(m)
            | ControlError::Busy(m)
            | ControlError::Internal(m) => m,
        }
    }
}

/// A reply line as it travels: the envelope of every call's result or error.
/// (`Option` fields may be absent.)
#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<T>,
    #[serde(skip_serializing_if = "Option::is_none")]
    kind: Option<ErrorKind>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// `reply` as one line of JSON (no newline).
pub fn reply_line<T: Serialize>(reply: &Result<T, ControlError>) -> String {
    let envelope = match reply {
        Ok(result) => Envelope {
            ok: true,
            result: Some(result),
            kind: None,
            error: None,
        },
        Err(e) => Envelope {
            ok: false,
            result: None,
            kind: Some(e.kind()),
            error: Some(e.message().replace('\n', " ")),
        },
    };
    serde_json::to_string(&envelope).unwrap_or_else(|e| {
        reply_line::<()>(&Err(ControlError::Internal(format!(
            "internal: cannot encode the result: {e}"
        ))))
    })
}

/// A reply line that is not a reply of this contract (a daemon of another version, or
/// not meshd at all).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("bad reply from meshd: {0}")]
pub struct BadReply(pub String);

/// Decodes a reply line into the result of call `C`, or the daemon's error.
pub fn parse_reply<C: Call>(line: &str) -> Result<Result<C::Response, ControlError>, BadReply> {
    parse_reply_as(line)
}

/// [`parse_reply`] for a result type named directly.
pub fn parse_reply_as<T: DeserializeOwned>(
    line: &str,
) -> Result<Result<T, ControlError>, BadReply> {
    let e: Envelope<T> =
        serde_json::from_str(line.trim_end()).map_err(|e| BadReply(e.to_string()))?;
    match (e.ok, e.result) {
        (true, Some(result)) => Ok(Ok(result)),
        (true, None) => Err(BadReply("\"ok\" without a \"result\"".into())),
        (false, _) => Ok(Err(ControlError::new(
            e.kind.unwrap_or(ErrorKind::Refused),
            e.error.unwrap_or_else(|| "meshd: unknown error".into()),
        ))),
    }
}
