//! The one place policy meets [`crate::identity`]: checks identities, identity
//! patterns and trust domains written in policy files, and splits an identity
//! string into its trust domain.
//!
//! Requests carry identities as their canonical string (`SpiffeId`'s Display), so
//! evaluation compares bytes and never allocates.
//!
//! ADAPTER: `proto::identity::SpiffeId::parse` is being written on another branch.
//! Until it lands, [`check_id`] and [`check_trust_domain`] apply the same SPIFFE rules
//! (SPIFFE-ID.md §2.1–2.3) themselves; switch them to `SpiffeId::parse` /
//! `TrustDomain::parse` once it does (the tests here then still hold).

const SCHEME: &str = "spiffe://";

/// Checks a full SPIFFE ID, `spiffe://<trust-domain>[/<path>]`.
pub(crate) fn check_id(s: &str) -> Result<(), String> {
    let rest = s
        .strip_prefix(SCHEME)
        .ok_or_else(|| "SPIFFE ID must start with the scheme \"spiffe://\"".to_string())?;
    if s.len() > 2048 {
        return Err("SPIFFE ID is longer than 2048 bytes".into());
    }
    let (td, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    check_trust_domain(td)?;
    check_path(path, false)
}

/// Checks a trust domain name (lowercase letters, digits, `.`, `-`, `_`).
pub(crate) fn check_trust_domain(td: &str) -> Result<(), String> {
    if td.is_empty() {
        return Err("empty trust domain".into());
    }
    if td.len() > 255 {
        return Err("trust domain is longer than 255 bytes".into());
    }
    if let Some(c) = td
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')))
    {
        return Err(match c {
            ':' | '@' | '?' | '#' => {
                format!("SPIFFE ID may not contain a port, userinfo, query or fragment ({c:?})")
            }
            _ => format!(
                "trust domain may contain only lowercase letters, digits, '.', '-' and '_' (found {c:?})"
            ),
        });
    }
    Ok(())
}

/// Checks a path (`""` or `/seg/seg`). With `partial`, the path is a fragment of a
/// wildcard pattern, so empty segments at its ends are allowed.
fn check_path(path: &str, partial: bool) -> Result<(), String> {
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
    if !partial {
        if path.ends_with('/') {
            return Err("path may not end with \"/\"".into());
        }
        let segs = path[1..].split('/');
        for seg in segs {
            if seg.is_empty() {
                return Err("path may not contain an empty segment (\"//\")".into());
            }
            if seg == "." || seg == ".." {
                return Err("path may not contain a \".\" or \"..\" segment".into());
            }
        }
    } else if path.contains("//") {
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
                check_path(&rest[i..], true)
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
        return check_path(suffix, true);
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
