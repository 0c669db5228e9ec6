//! Workload identities: SPIFFE IDs, `spiffe://<trust-domain>/<path>`.
//!
//! Parsing follows the SPIFFE ID standard (SPIFFE-ID.md, sections 2.1–2.3): scheme
//! `spiffe`, a trust domain of lowercase letters, digits, `.`, `-` and `_`, a path of
//! segments of letters, digits, `.`, `-` and `_` with no empty, `.` or `..` segment,
//! no query, fragment, port or userinfo, at most 2048 bytes in all.

use std::fmt;
use std::str::FromStr;

/// A validated SPIFFE ID. Display gives the canonical `spiffe://td/path` form.
///
/// Serde: a string, validated on the way in.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpiffeId {
    trust_domain: TrustDomain,
    /// Empty for the trust domain's own ID, else starts with `/`.
    path: String,
}

/// A validated trust domain name.
///
/// Serde: a string, validated on the way in.
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

/// SPIFFE-ID.md 2.3: implementations must accept IDs up to 2048 bytes; we refuse longer.
const MAX_ID_LEN: usize = 2048;
/// SPIFFE-ID.md 2.3: a trust domain name is at most 255 characters.
const MAX_TRUST_DOMAIN_LEN: usize = 255;
const SCHEME: &str = "spiffe://";

impl SpiffeId {
    /// Parses and validates `s`; the result's Display is exactly `s`.
    pub fn parse(s: &str) -> Result<SpiffeId, IdError> {
        if s.is_empty() {
            return Err(IdError::Empty);
        }
        // SPIFFE-ID.md 2: the scheme is `spiffe`, followed by `://` and an authority.
        let rest = s.strip_prefix(SCHEME).ok_or(IdError::WrongScheme)?;
        if s.len() > MAX_ID_LEN {
            return Err(IdError::TooLong);
        }
        // SPIFFE-ID.md 2.2: no query or fragment anywhere.
        if let Some(c) = rest.chars().find(|c| matches!(c, '?' | '#')) {
            return Err(IdError::ForbiddenComponent(c));
        }
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let trust_domain = TrustDomain::parse(td)?;
        validate_path(path)?;
        Ok(SpiffeId {
            trust_domain,
            path: path.to_owned(),
        })
    }

    /// The ID of a trust domain itself, `spiffe://<td>` (used by CA certificates).
    pub fn for_trust_domain(td: &TrustDomain) -> SpiffeId {
        SpiffeId {
            trust_domain: td.clone(),
            path: String::new(),
        }
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The path, `""` or starting with `/`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// True for `spiffe://<td>` with no path (the trust domain's own ID).
    pub fn is_trust_domain_id(&self) -> bool {
        self.path.is_empty()
    }
}

/// SPIFFE-ID.md 2.2: segments separated by `/`, each non-empty, not `.` or `..`, of
/// `[a-zA-Z0-9._-]`; no trailing `/`.
fn validate_path(path: &str) -> Result<(), IdError> {
    if path.is_empty() {
        return Ok(());
    }
    let Some(body) = path.strip_prefix('/') else {
        return Err(IdError::WrongScheme);
    };
    if body.is_empty() {
        return Err(IdError::TrailingSlash);
    }
    let segments: Vec<&str> = body.split('/').collect();
    let last = segments.len() - 1;
    for (i, seg) in segments.iter().enumerate() {
        if seg.is_empty() {
            return Err(if i == last {
                IdError::TrailingSlash
            } else {
                IdError::EmptySegment
            });
        }
        if *seg == "." || *seg == ".." {
            return Err(IdError::DotSegment);
        }
        if let Some(c) = seg
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
        {
            return Err(IdError::BadPathChar(c));
        }
    }
    Ok(())
}

impl TrustDomain {
    /// Validates a bare trust domain name (`example.org`, no scheme).
    pub fn parse(s: &str) -> Result<TrustDomain, IdError> {
        if s.is_empty() {
            return Err(IdError::EmptyTrustDomain);
        }
        // SPIFFE-ID.md 2.1: the authority has no userinfo (`@`) and no port (`:`).
        if let Some(c) = s.chars().find(|c| matches!(c, '@' | ':' | '?' | '#')) {
            return Err(IdError::ForbiddenComponent(c));
        }
        // SPIFFE-ID.md 2.1.1: lowercase letters, digits, dots, dashes and underscores.
        if let Some(c) = s.chars().find(|c| {
            !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_'))
        }) {
            return Err(IdError::BadTrustDomainChar(c));
        }
        if s.len() > MAX_TRUST_DOMAIN_LEN {
            return Err(IdError::TrustDomainTooLong);
        }
        Ok(TrustDomain(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}{}", self.trust_domain.0, self.path)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for SpiffeId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        SpiffeId::parse(s)
    }
}

impl FromStr for TrustDomain {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        TrustDomain::parse(s)
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        SpiffeId::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for TrustDomain {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for TrustDomain {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        TrustDomain::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use IdError::*;

    #[test]
    fn valid_ids_round_trip() {
        let valid = [
            ("spiffe://example.org", "example.org", ""),
            ("spiffe://example.org/workload", "example.org", "/workload"),
            ("spiffe://t/a", "t", "/a"),
            (
                "spiffe://my-td_1.example/ns/prod/sa/web",
                "my-td_1.example",
                "/ns/prod/sa/web",
            ),
            // Path segments may contain uppercase letters, dots, dashes, underscores.
            ("spiffe://t/Foo.Bar-baz_9", "t", "/Foo.Bar-baz_9"),
            // A segment may contain dots as long as it is not exactly "." or "..".
            ("spiffe://t/.../a..b/.x", "t", "/.../a..b/.x"),
            ("spiffe://1.2.3.4/x", "1.2.3.4", "/x"),
        ];
        for (s, td, path) in valid {
            let id = SpiffeId::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(id.trust_domain().as_str(), td, "{s}");
            assert_eq!(id.path(), path, "{s}");
            assert_eq!(id.to_string(), s);
            assert_eq!(s.parse::<SpiffeId>().unwrap(), id);
        }
        let long_td = "a".repeat(255);
        assert!(SpiffeId::parse(&format!("spiffe://{long_td}/x")).is_ok());
        let long_path = "/".to_owned() + &"p".repeat(2048 - "spiffe://t/".len());
        assert!(SpiffeId::parse(&format!("spiffe://t{long_path}")).is_ok());
    }

    #[test]
    fn invalid_ids_name_the_rule() {
        let cases: Vec<(String, IdError)> = vec![
            ("".into(), Empty),
            // Scheme: exactly "spiffe://".
            ("http://t/a".into(), WrongScheme),
            ("SPIFFE://t/a".into(), WrongScheme),
            ("spiffe:/t/a".into(), WrongScheme),
            ("spiffe:t/a".into(), WrongScheme),
            ("t/a".into(), WrongScheme),
            (" spiffe://t/a".into(), WrongScheme),
            // Trust domain.
            ("spiffe://".into(), EmptyTrustDomain),
            ("spiffe:///a".into(), EmptyTrustDomain),
            ("spiffe://Example.org/a".into(), BadTrustDomainChar('E')),
            ("spiffe://exa mple/a".into(), BadTrustDomainChar(' ')),
            ("spiffe://ex%41/a".into(), BadTrustDomainChar('%')),
            ("spiffe://tä/a".into(), BadTrustDomainChar('ä')),
            (
                format!("spiffe://{}/a", "a".repeat(256)),
                TrustDomainTooLong,
            ),
            // No port, userinfo, query or fragment.
            ("spiffe://t:8080/a".into(), ForbiddenComponent(':')),
            ("spiffe://user@t/a".into(), ForbiddenComponent('@')),
            ("spiffe://t/a?x=1".into(), ForbiddenComponent('?')),
            ("spiffe://t/a#frag".into(), ForbiddenComponent('#')),
            ("spiffe://t?x".into(), ForbiddenComponent('?')),
            // Path.
            ("spiffe://t/".into(), TrailingSlash),
            ("spiffe://t/a/".into(), TrailingSlash),
            ("spiffe://t//a".into(), EmptySegment),
            ("spiffe://t/a//b".into(), EmptySegment),
            ("spiffe://t/./a".into(), DotSegment),
            ("spiffe://t/a/..".into(), DotSegment),
            ("spiffe://t/a/../b".into(), DotSegment),
            ("spiffe://t/a b".into(), BadPathChar(' ')),
            ("spiffe://t/a%20b".into(), BadPathChar('%')),
            ("spiffe://t/a:b".into(), BadPathChar(':')),
            ("spiffe://t/a@b".into(), BadPathChar('@')),
            ("spiffe://t/é".into(), BadPathChar('é')),
            // Length.
            (format!("spiffe://t/{}", "p".repeat(2048)), TooLong),
        ];
        for (s, want) in cases {
            assert_eq!(SpiffeId::parse(&s), Err(want.clone()), "{s:?}");
            // Every rejection explains itself in words.
            assert!(!want.to_string().is_empty());
        }
    }

    #[test]
    fn trust_domain_parse() {
        assert_eq!(TrustDomain::parse("t").unwrap().as_str(), "t");
        assert_eq!(TrustDomain::parse(""), Err(EmptyTrustDomain));
        assert_eq!(TrustDomain::parse("T"), Err(BadTrustDomainChar('T')));
        assert_eq!(TrustDomain::parse("t/a"), Err(BadTrustDomainChar('/')));
        assert_eq!(TrustDomain::parse("t:1"), Err(ForbiddenComponent(':')));
        let id = SpiffeId::for_trust_domain(&TrustDomain::parse("t").unwrap());
        assert_eq!(id.to_string(), "spiffe://t");
        assert!(id.is_trust_domain_id());
    }

    #[test]
    fn serde_as_string() {
        let id = SpiffeId::parse("spiffe://t/a").unwrap();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"spiffe://t/a\"");
        assert_eq!(serde_json::from_str::<SpiffeId>(&json).unwrap(), id);
        let err = serde_json::from_str::<SpiffeId>("\"spiffe://t/a/\"").unwrap_err();
        assert!(err.to_string().contains("may not end with"), "{err}");
        let td: TrustDomain = serde_json::from_str("\"t\"").unwrap();
        assert_eq!(serde_json::to_string(&td).unwrap(), "\"t\"");
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(s in "\\PC{0,80}") {
            let _ = SpiffeId::parse(&s);
            let _ = SpiffeId::parse(&format!("spiffe://{s}"));
        }

        #[test]
        fn well_formed_ids_round_trip(
            td in "[a-z0-9._-]{1,30}",
            segs in proptest::collection::vec("[a-zA-Z0-9._-]{1,12}", 0..6),
        ) {
            let s = format!("spiffe://{td}{}", segs.iter().map(|x| format!("/{x}")).collect::<String>());
            let dot = segs.iter().any(|x| x == "." || x == "..");
            match SpiffeId::parse(&s) {
                Ok(id) => {
                    proptest::prop_assert!(!dot);
                    proptest::prop_assert_eq!(id.to_string(), s);
                }
                Err(e) => proptest::prop_assert!(dot && e == DotSegment, "{s}: {e}"),
            }
        }
    }
}
