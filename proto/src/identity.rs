//! Workload identities: SPIFFE IDs, `spiffe://<trust-domain>/<path>`.
//!
//! Parsing follows the SPIFFE ID standard (SPIFFE-ID.md, sections 2.1–2.3): scheme
//! `spiffe`, a trust domain of lowercase letters, digits, `.`, `-` and `_`, a path of
//! segments of letters, digits, `.`, `-` and `_` with no empty, `.` or `..` segment,
//! no query, fragment, port or userinfo, at most 2048 bytes in all.

/// A validated SPIFFE ID. Display gives the canonical `spiffe://td/path` form.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpiffeId {
    trust_domain: TrustDomain,
    /// Empty for the trust domain's own ID, else starts with `/`.
    path: String,
}

/// A validated trust domain name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TrustDomain(String);

/// Why a string is not a SPIFFE ID; each variant names the rule broken.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("empty SPIFFE ID")]
    Empty,
    #[error("SPIFFE ID must start with the scheme \"spiffe://\"")]
    WrongScheme,
    #[error("SPIFFE ID has an empty trust domain")]
    EmptyTrustDomain,
    #[error(
        "trust domain may contain only lowercase letters, digits, '.', '-' and '_' (found {0:?})"
    )]
    BadTrustDomainChar(char),
    #[error("trust domain is longer than 255 bytes")]
    TrustDomainTooLong,
    #[error("SPIFFE ID may not contain a port, userinfo, query or fragment ({0:?})")]
    ForbiddenComponent(char),
    #[error("path segments may contain only letters, digits, '.', '-' and '_' (found {0:?})")]
    BadPathChar(char),
    #[error("path may not contain an empty segment (\"//\")")]
    EmptySegment,
    #[error("path may not contain a \".\" or \"..\" segment")]
    DotSegment,
    #[error("path may not end with \"/\"")]
    TrailingSlash,
    #[error("SPIFFE ID is longer than 2048 bytes")]
    TooLong,
}

impl SpiffeId {
    pub fn parse(s: &str) -> Result<SpiffeId, IdError> {
        let _ = s;
        todo!("issue 2")
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The path, `""` or starting with `/`.
    pub fn path(&self) -> &str {
        &self.path
    }
}

impl TrustDomain {
    pub fn parse(s: &str) -> Result<TrustDomain, IdError> {
        let _ = s;
        todo!("issue 2")
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}
