//! What policy is asked about: [`Request`] (borrowed, built by the enforcer per flow
//! or HTTP request without allocating) and [`RequestSpec`] (owned, described by an
//! operator in a `[[test]]`, on the `meshctl policy explain` command line or in the
//! control API's `explain` message).

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::compile::CompiledPolicy;
use super::eval::{decide_staged, deny_every_request, Decision, DenyReason, Stage};
use super::model::Protocol;
use crate::http_path::{self, PathError};

/// One HTTP request header as the parser saw it (the shape of `httparse::Header`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header<'a> {
    pub name: &'a str,
    pub value: &'a [u8],
}

/// HTTP attributes of a request, present on ports inspected at layer 7.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HttpRequest<'a> {
    /// Method as sent (case-sensitive, RFC 9110 §9.1).
    pub method: &'a str,
    /// Path already normalised (`proto::http_path::normalize`), without the query.
    pub path: &'a str,
    /// The Host header (or the request-target's authority), if any.
    pub host: Option<&'a str>,
    pub headers: &'a [Header<'a>],
}

impl<'a> HttpRequest<'a> {
    /// Values of the header named `name` (case-insensitive), in the order sent.
    pub fn header_values<'s>(
        &'s self,
        name: &'s str,
    ) -> impl DoubleEndedIterator<Item = &'a [u8]> + Clone + 's {
        self.headers
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    }
}

/// A request to decide: who sends, to which local workload, port and protocol, and
/// for layer 7 the HTTP attributes.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// The source's identity, proven by its key: the canonical SPIFFE ID string
    /// (`SpiffeId`'s Display). `None` for a source without a mesh identity.
    pub src_identity: Option<&'a str>,
    /// The source certificate's groups.
    pub src_groups: &'a [String],
    pub src_addr: Option<IpAddr>,
    /// The local workload receiving the request (for policy selectors).
    pub dst_identity: Option<&'a str>,
    pub dst_groups: &'a [String],
    pub dst_addr: Option<IpAddr>,
    /// Destination port; 0 for ICMP, which has none (a rule naming ports never
    /// matches ICMP).
    pub dst_port: u16,
    pub protocol: Protocol,
    pub http: Option<HttpRequest<'a>>,
}

/// HTTP part of a [`RequestSpec`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSpec {
    pub method: String,
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Headers as `(name, value)`, in order; names compare case-insensitively.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<(String, String)>,
}

/// An owned, described request: the fields of `{"op":"explain",...}` beside `op` and
/// what a `[[test]]` case describes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_groups: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_address: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workload_groups: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_address: Option<IpAddr>,
    pub to_port: u16,
    pub proto: Protocol,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSpec>,
}

/// Why a [`RequestSpec`] cannot be asked about.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("from: {0}")]
    BadIdentity(String),
    #[error("workload: {0}")]
    BadWorkload(String),
    #[error("empty path")]
    EmptyPath,
    #[error("header {0:?}: expected \"name: value\"")]
    BadHeader(String),
    #[error("HTTP attributes need protocol tcp (got {0})")]
    HttpNotTcp(Protocol),
    #[error("port must be 1-65535 for {0}")]
    NoPort(Protocol),
}

impl RequestSpec {
    /// A TCP request from `from` to `port`, without HTTP attributes.
    pub fn tcp(from: &str, port: u16) -> RequestSpec {
        RequestSpec {
            from: Some(from.to_string()),
            from_groups: Vec::new(),
            from_address: None,
            workload: None,
            workload_groups: Vec::new(),
            to_address: None,
            to_port: port,
            proto: Protocol::Tcp,
            http: None,
        }
    }

    /// Adds HTTP attributes (builder style, for tests).
    pub fn http(mut self, method: &str, path: &str) -> RequestSpec {
        self.http = Some(HttpSpec {
            method: method.to_string(),
            path: path.to_string(),
            host: None,
            headers: Vec::new(),
        });
        self
    }

    /// Checks the description: identities are SPIFFE IDs, the path is absolute,
    /// HTTP only over TCP, a port unless ICMP.
    pub fn check(&self) -> Result<(), SpecError> {
        if let Some(f) = &self.from {
            super::ident::check_id(f).map_err(SpecError::BadIdentity)?;
        }
        if let Some(w) = &self.workload {
            super::ident::check_id(w).map_err(SpecError::BadWorkload)?;
        }
        if self.proto != Protocol::Icmp && self.to_port == 0 {
            return Err(SpecError::NoPort(self.proto));
        }
        if let Some(h) = &self.http {
            if self.proto != Protocol::Tcp {
                return Err(SpecError::HttpNotTcp(self.proto));
            }
            if h.path.is_empty() {
                return Err(SpecError::EmptyPath);
            }
        }
        Ok(())
    }

    /// The same request with its path normalised as the enforcer does
    /// ([`http_path::normalize`]), so tests and explain see what is enforced.
    pub fn normalized(&self) -> Result<RequestSpec, PathError> {
        let mut out = self.clone();
        if let Some(h) = &mut out.http {
            h.path = http_path::normalize(&h.path)?;
        }
        Ok(out)
    }

    /// Decides this request as the data path does ([`decide`](super::decide)): on a
    /// port inspected at layer 7 for the workload, the connection's opening first, then
    /// the path normalised (one that cannot be is refused as a malformed request, 400)
    /// and the request decided; elsewhere one layer-4 decision, HTTP attributes and
    /// path never read.
    pub fn decide(&self, policy: &CompiledPolicy) -> Decision {
        self.decide_staged(policy).decision
    }

    /// [`decide`](Self::decide), saying how, with the request as decided (its path
    /// normalised) when the path was read.
    pub(crate) fn decide_staged(&self, policy: &CompiledPolicy) -> Staged {
        let reads_path = self.http.is_some()
            && self.proto == Protocol::Tcp
            && self.with_request(|r| {
                policy.inspects(r)
                    && deny_every_request(policy, &Request { http: None, ..*r }).is_none()
            });
        if !reads_path {
            let (decision, stage) = self.with_request(|r| decide_staged(policy, r));
            return Staged {
                decision,
                stage,
                normalized: None,
            };
        }
        match self.normalized() {
            Ok(n) => {
                let (decision, stage) = n.with_request(|r| decide_staged(policy, r));
                Staged {
                    decision,
                    stage,
                    normalized: Some(Ok(n)),
                }
            }
            Err(e) => Staged {
                decision: Decision::refused(DenyReason::MalformedRequest),
                stage: Stage::Request,
                normalized: Some(Err(e)),
            },
        }
    }

    /// Calls `f` with the borrowed [`Request`] this describes, path as written
    /// (see [`normalized`](Self::normalized)). ICMP gets port 0.
    pub fn with_request<R>(&self, f: impl FnOnce(&Request<'_>) -> R) -> R {
        let headers: Vec<Header<'_>> = self
            .http
            .iter()
            .flat_map(|h| h.headers.iter())
            .map(|(n, v)| Header {
                name: n.as_str(),
                value: v.as_bytes(),
            })
            .collect();
        let req = Request {
            src_identity: self.from.as_deref(),
            src_groups: &self.from_groups,
            src_addr: self.from_address,
            dst_identity: self.workload.as_deref(),
            dst_groups: &self.workload_groups,
            dst_addr: self.to_address,
            dst_port: if self.proto == Protocol::Icmp {
                0
            } else {
                self.to_port
            },
            protocol: self.proto,
            http: self.http.as_ref().map(|h| HttpRequest {
                method: &h.method,
                path: &h.path,
                host: h.host.as_deref(),
                headers: &headers,
            }),
        };
        f(&req)
    }
}

/// A described request as the data path decided it.
pub(crate) struct Staged {
    pub decision: Decision,
    pub stage: Stage,
    /// The request with its path normalised, or why it could not be, when the data
    /// path read the path.
    pub normalized: Option<Result<RequestSpec, PathError>>,
}

/// Parses a `name: value` header as written on the command line or in a test.
pub fn parse_header(s: &str) -> Result<(String, String), SpecError> {
    let (n, v) = s
        .split_once(':')
        .ok_or_else(|| SpecError::BadHeader(s.to_string()))?;
    let n = n.trim();
    if n.is_empty() || !n.bytes().all(is_tchar) {
        return Err(SpecError::BadHeader(s.to_string()));
    }
    Ok((n.to_ascii_lowercase(), v.trim().to_string()))
}

/// RFC 9110 §5.6.2 token characters.
pub(crate) fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}
