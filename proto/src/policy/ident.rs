//! The one place policy meets [`crate::identity`]: checks identities, identity
//! patterns and trust domains written in policy files, and splits an identity
//! string into its trust domain.
//!
//! Requests carry identities as their canonical string (`SpiffeId`'s Display), so
//! evaluation compares bytes and never allocates. Full IDs and trust domains are
//! checked by [`SpiffeId::parse`] and [`TrustDomain::parse`]; wildcard patterns are
//! checked here with the same character rules.

use crate::identity::{SpiffeId, TrustDomain};

const SCHEME: &str = "spiffe://";

/// Checks a full SPIFFE ID, `spiffe://<trust-domain>[/<path>]`.
pub(crate) fn check_id(s: &str) -> Result<(), String> {
    SpiffeId::parse(s).map(|_| ()).map_err(|e| e.to_string())
}

/// Checks a trust domain name (lowercase letters, digits, `.`, `-`, `_`).
pub(crate) fn check_trust_domain(td: &str) -> Result<(), String> {
    TrustDomain::parse(td)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Checks the literal part of a wildcard pattern's path: SPIFFE path characters,
/// no empty segment.
fn check_path(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Ok(());
    }
    if let Some(c) = path
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '/')))
    {
        return Err(match c {
            '?' | '#' => {
                format!("SPIFFE ID may not contain a port, userinfo, query or fragment ({c:?})")
            }
            _ => format!(
                "path segments may contain only letters, digits, '.', '-' and '_' (found {c:?})"
            ),
        });
    }
    if path.contains("//") {
        return Err("path may not contain an empty segment (\"//\")".into());
    }
    Ok(())
}

/// Checks an identity pattern: a full SPIFFE ID, `*`, `prefix*` (starting with
/// `spiffe://`) or `*suffix`.
pub(crate) fn check_id_pattern(s: &str) -> Result<(), String> {
    if s == "*" {
        return Ok(());
    }
    if s.is_empty() {
        return Err("empty identity".into());
    }
    if let Some(prefix) = s.strip_suffix('*') {
        if prefix.contains('*') {
            return Err("`*` may appear only at the start or the end of an identity".into());
        }
        let rest = prefix.strip_prefix(SCHEME).ok_or_else(|| {
            "an identity prefix pattern must start with \"spiffe://\" (e.g. \"spiffe://t/web-*\")"
                .to_string()
        })?;
        return match rest.find('/') {
            Some(i) => {
                check_trust_domain(&rest[..i])?;
                check_path(&rest[i..])
            }
            // `spiffe://exa*`: a partial trust domain.
            None if rest.is_empty() => Ok(()),
            None => check_trust_domain(rest),
        };
    }
    if let Some(suffix) = s.strip_prefix('*') {
        if suffix.contains('*') {
            return Err("`*` may appear only at the start or the end of an identity".into());
        }
        return check_path(suffix);
    }
    if s.contains('*') {
        return Err("`*` may appear only at the start or the end of an identity".into());
    }
    check_id(s)
}

/// The trust domain of a canonical identity string, or `""` if it has none.
pub(crate) fn trust_domain_of(id: &str) -> &str {
    let rest = id.strip_prefix(SCHEME).unwrap_or("");
    match rest.find('/') {
        Some(i) => &rest[..i],
        None => rest,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(check_id("spiffe://t/a").is_ok());
        assert!(check_id("spiffe://example.org/ns/prod/sa/web").is_ok());
        assert!(check_id("spiffe://t").is_ok());
        for bad in [
            "",
            "http://t/a",
            "spiffe://",
            "spiffe://T/a",
            "spiffe://t:80/a",
            "spiffe://t/a/",
            "spiffe://t//a",
            "spiffe://t/../a",
            "spiffe://t/a?b",
            "spiffe://t/a b",
        ] {
            assert!(check_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn patterns() {
        for ok in [
            "*",
            "spiffe://t/web-*",
            "spiffe://t/*",
            "*/web",
            "*-canary",
            "spiffe://t/a",
        ] {
            assert!(check_id_pattern(ok).is_ok(), "{ok}");
        }
        for bad in ["spiffe://t/*/x", "web-*", "**", "spiffe://T/*", ""] {
            assert!(check_id_pattern(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn trust_domains() {
        assert_eq!(trust_domain_of("spiffe://t/a"), "t");
        assert_eq!(trust_domain_of("spiffe://ex.org"), "ex.org");
        assert_eq!(trust_domain_of("garbage"), "");
    }
}
