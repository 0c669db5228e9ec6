//! HTTP request-target → normalised path: the form that layer-7 policy matches.
//!
//! This is a security boundary. A policy rule such as `deny paths = ["/admin/*"]` is only
//! as strong as the agreement between this function and the server behind it about what
//! path a request names. Where servers could disagree, the request is **rejected** (the
//! enforcer answers 400) rather than guessed at. The same function is used by the data
//! path, by policy tests and by `meshctl policy explain`, so what explain shows is what is
//! enforced.
//!
//! # The rule
//!
//! Input is the raw request-target of the request line (RFC 9112 §3.2).
//!
//! 1. **Forms.** origin-form (`/p?q`) is the normal case. absolute-form
//!    (`http://host/p?q`, scheme `http` or `https`, any case) is reduced to its path (an
//!    empty path becomes `/`). asterisk-form (`*`) yields `*`. Anything else
//!    (authority-form, relative paths) is rejected: [`PathError::NotOriginForm`].
//! 2. **Query and fragment** are not part of the path: the path ends at the first `?`.
//!    A `#` is not allowed in a request-target at all (RFC 9112 §3.2; servers differ on
//!    whether it ends the path), so it is rejected: [`PathError::Fragment`].
//! 3. **Percent-decoding** (RFC 3986 §2.3, §6.2.2.2): `%XX` of an *unreserved* character
//!    (`A-Z a-z 0-9 - . _ ~`) is decoded. Any other `%XX` stays encoded, with its hex
//!    digits upper-cased (`%2a` → `%2A`), so one character has one spelling. Decoding is
//!    done once: `%252e` is `%252e`, not `.`. A character outside ASCII has one spelling
//!    too, the percent-encoded UTF-8 that RFC 3986 §2.5 prescribes (as Envoy's path
//!    normalisation writes it): `ü` sent raw becomes `%C3%BC`, like `%c3%bc`.
//! 4. **UTF-8 only.** The bytes above 0x7F, encoded or raw, must form UTF-8 (RFC 3629):
//!    an overlong form (`%C0%AF`, a `/` in disguise that some decoders accept), a
//!    surrogate, a stray continuation byte or a cut sequence is refused:
//!    [`PathError::InvalidUtf8`].
//! 5. **Encoded separators are rejected.** `%2F` (`/`) and `%5C` (`\`) in any case:
//!    [`PathError::EncodedSeparator`]. Some servers decode them before routing and some
//!    do not, so no policy answer would be right for both. A literal `\` is rejected for
//!    the same reason ([`PathError::Backslash`]: some servers treat it as `/`). Encoded
//!    control characters (`%00`–`%1F`, `%7F`) are rejected: [`PathError::EncodedControl`]
//!    (C servers may end the path at `%00`).
//! 6. **Path parameters are rejected.** A `;` in the path, raw or as `%3B`, is refused:
//!    [`PathError::PathParameter`]. Servers disagree about it: Tomcat, Jetty and Spring
//!    strip each segment's `;parameters` before routing (`/admin;x=1` is `/admin`,
//!    `/..;/admin` climbs), others keep them as part of the name, and some decode `%3B`
//!    first. Matching with parameters stripped would be wrong for the second kind,
//!    matching them as written wrong for the first (a deny on `/admin` would pass
//!    `/admin;jsessionid=1` to Tomcat), so neither answer is safe.
//! 7. **Dot segments** (RFC 3986 §5.2.4), after decoding, so `%2e%2e` is `..`: `.` is
//!    removed, `..` removes the previous segment and never climbs above the root
//!    (`/../a` → `/a`).
//! 8. **Repeated slashes** are merged: `//admin` → `/admin`. A trailing slash is kept
//!    (`/api/` and `/api` differ), including the one left by a final dot segment
//!    (`/a/.` → `/a/`, `/a/b/..` → `/a/`).
//!
//! The result always starts with `/` (or is `*`), is ASCII, contains no `?`, `#`, `\`,
//! `;`, empty segments or dot segments, and is a fixed point: normalising it again
//! gives itself.

use thiserror::Error;

/// Why a request-target has no normalised path. Each makes the enforcer answer 400.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum PathError {
    #[error("request target is not origin-form, absolute-form or `*`")]
    NotOriginForm,
    #[error("request target contains `#` (fragments are not sent in requests)")]
    Fragment,
    #[error("request target contains an encoded `/` or `\\` (%2F or %5C)")]
    EncodedSeparator,
    #[error("request target contains a `\\`")]
    Backslash,
    #[error("request target contains an encoded control character")]
    EncodedControl,
    #[error("request target contains `%` not followed by two hex digits")]
    BadPercent,
    #[error(
        "request target has path parameters (`;`, raw or %3B), which servers read differently"
    )]
    PathParameter,
    #[error(
        "request target has bytes that are not UTF-8 (an overlong, surrogate or cut sequence)"
    )]
    InvalidUtf8,
}

/// Normalises `target` by the rule in the module docs.
pub fn normalize(target: &str) -> Result<String, PathError> {
    let mut out = String::with_capacity(target.len());
    normalize_into(target, &mut out)?;
    Ok(out)
}

/// As [`normalize`], writing into `out` (cleared first) so that a caller on the data path
/// can reuse one buffer and allocate nothing per request. On error `out` is unspecified.
pub fn normalize_into(target: &str, out: &mut String) -> Result<(), PathError> {
    out.clear();
    if target == "*" {
        out.push('*');
        return Ok(());
    }
    let path = origin_path(target)?;
    if path.contains('#') {
        return Err(PathError::Fragment);
    }
    let path = match path.find('?') {
        Some(q) => &path[..q],
        None => path,
    };
    if path.contains('\\') {
        return Err(PathError::Backslash);
    }
    if path.contains(';') {
        return Err(PathError::PathParameter);
    }

    // `path` starts with '/'. Each segment is decoded straight into `out` after a '/',
    // then kept, or removed and resolved as a dot segment.
    let mut trailing_slash = false;
    for raw in path[1..].split('/') {
        let start = out.len();
        out.push('/');
        decode_segment_into(raw, out)?;
        match &out[start + 1..] {
            // Repeated slash, or the final empty segment of a path ending in '/'.
            "" | "." => {
                out.truncate(start);
                trailing_slash = true;
            }
            ".." => {
                out.truncate(start);
                let parent = out.rfind('/').unwrap_or(0);
                out.truncate(parent);
                trailing_slash = true;
            }
            _ => trailing_slash = false,
        }
    }
    if trailing_slash || out.is_empty() {
        out.push('/');
    }
    Ok(())
}

/// Normalises a piece of one segment (no `/`) by rules 3 to 6, appending it to `out`:
/// for path *patterns*, whose cut segments (the end of a prefix such as `/api/v*`, the
/// start of a suffix such as `*.png`) must be spelled as normalised paths spell them.
/// Dot segments are not resolved (a cut segment is not a whole one); a `?`, `#` or `/`
/// is the caller's to refuse.
pub fn normalize_segment_into(piece: &str, out: &mut String) -> Result<(), PathError> {
    if piece.contains('\\') {
        return Err(PathError::Backslash);
    }
    if piece.contains(';') {
        return Err(PathError::PathParameter);
    }
    decode_segment_into(piece, out)
}

/// The path part of an origin-form or absolute-form target (query still attached).
fn origin_path(target: &str) -> Result<&str, PathError> {
    if target.starts_with('/') {
        return Ok(target);
    }
    let rest = strip_prefix_ignore_case(target, "http://")
        .or_else(|| strip_prefix_ignore_case(target, "https://"))
        .ok_or(PathError::NotOriginForm)?;
    // authority = up to the first '/', '?' or '#'.
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    if end == 0 {
        return Err(PathError::NotOriginForm);
    }
    let path = &rest[end..];
    if path.starts_with('/') {
        Ok(path)
    } else if path.starts_with('#') {
        Err(PathError::Fragment)
    } else {
        // Empty path, possibly with a query: the path is "/".
        Ok("/")
    }
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    if s.len() >= prefix.len()
        && s.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
    {
        Some(&s[prefix.len()..])
    } else {
        None
    }
}

/// Decodes one path segment, appending it to `seg`, by rules 3 to 6.
fn decode_segment_into(raw: &str, seg: &mut String) -> Result<(), PathError> {
    let bytes = raw.as_bytes();
    let mut utf8 = Utf8::default();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b != b'%' {
            if b.is_ascii() {
                utf8.ascii()?;
                seg.push(char::from(b));
            } else {
                // Raw UTF-8 (already valid: `raw` is a str), written encoded.
                utf8.byte(b)?;
                push_encoded(seg, b);
            }
            i += 1;
            continue;
        }
        let hi = bytes.get(i + 1).copied().and_then(hex_value);
        let lo = bytes.get(i + 2).copied().and_then(hex_value);
        let (Some(hi), Some(lo)) = (hi, lo) else {
            return Err(PathError::BadPercent);
        };
        let b = hi << 4 | lo;
        match b {
            b'/' | b'\\' => return Err(PathError::EncodedSeparator),
            b';' => return Err(PathError::PathParameter),
            0x00..=0x1f | 0x7f => return Err(PathError::EncodedControl),
            0x80..=0xff => {
                utf8.byte(b)?;
                push_encoded(seg, b);
            }
            b => {
                utf8.ascii()?;
                if is_unreserved(b) {
                    seg.push(char::from(b));
                } else {
                    push_encoded(seg, b);
                }
            }
        }
        i += 3;
    }
    utf8.end()
}

fn push_encoded(seg: &mut String, b: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    seg.push('%');
    seg.push(char::from(HEX[usize::from(b >> 4)]));
    seg.push(char::from(HEX[usize::from(b & 0xf)]));
}

/// Checks that the bytes above 0x7F of a segment, fed one by one, form UTF-8 (rule 4),
/// without allocating: one character's bytes are kept until it is complete, then
/// checked by the standard library (which refuses overlong forms and surrogates).
#[derive(Default)]
struct Utf8 {
    buf: [u8; 4],
    len: usize,
    /// Bytes the current character needs; 0 between characters.
    want: usize,
}

impl Utf8 {
    fn byte(&mut self, b: u8) -> Result<(), PathError> {
        if self.want == 0 {
            // RFC 3629 §4: lead bytes C2-DF, E0-EF, F0-F4 (C0, C1 and F5-FF only
            // start overlong or out-of-range forms; 80-BF only continue).
            self.want = match b {
                0xc2..=0xdf => 2,
                0xe0..=0xef => 3,
                0xf0..=0xf4 => 4,
                _ => return Err(PathError::InvalidUtf8),
            };
            self.len = 0;
        }
        self.buf[self.len] = b;
        self.len += 1;
        if self.len == self.want {
            std::str::from_utf8(&self.buf[..self.len]).map_err(|_| PathError::InvalidUtf8)?;
            self.want = 0;
        }
        Ok(())
    }

    /// An ASCII character: valid only between multi-byte characters.
    fn ascii(&self) -> Result<(), PathError> {
        if self.want != 0 {
            return Err(PathError::InvalidUtf8);
        }
        Ok(())
    }

    /// The end of the segment: a character may not be cut by it.
    fn end(&self) -> Result<(), PathError> {
        self.ascii()
    }
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// RFC 3986 §2.3.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        use PathError::*;
        let cases: &[(&str, Result<&str, PathError>)] = &[
            ("/", Ok("/")),
            ("/api/items", Ok("/api/items")),
            ("/api/items/", Ok("/api/items/")),
            // Dot segments.
            ("/public/../admin", Ok("/admin")),
            ("/a/./b", Ok("/a/b")),
            ("/a/b/..", Ok("/a/")),
            ("/a/.", Ok("/a/")),
            ("/..", Ok("/")),
            ("/../../admin", Ok("/admin")),
            ("/a/b/../../../c", Ok("/c")),
            ("/%2e%2e/admin", Ok("/admin")),
            ("/public/%2e%2e/admin", Ok("/admin")),
            ("/public/%2E%2e/admin", Ok("/admin")),
            ("/public/.%2e/admin", Ok("/admin")),
            ("/a/%2e/b", Ok("/a/b")),
            ("/...", Ok("/...")),
            ("/..a", Ok("/..a")),
            // Path parameters, which servers resolve differently (issue 18).
            ("/public/..;/admin", Err(PathParameter)),
            ("/public/.;x/admin", Err(PathParameter)),
            ("/files;v=1", Err(PathParameter)),
            ("/admin;x=1", Err(PathParameter)),
            ("/admin;jsessionid=1/users", Err(PathParameter)),
            ("/admin%3Bx", Err(PathParameter)),
            ("/admin%3bx", Err(PathParameter)),
            ("/admin?q=a;b", Ok("/admin")),
            // Repeated slashes.
            ("//admin", Ok("/admin")),
            ("/a//b///c", Ok("/a/b/c")),
            ("///", Ok("/")),
            ("//admin//", Ok("/admin/")),
            // Encoded separators and backslash.
            ("/admin%2F", Err(EncodedSeparator)),
            ("/admin%2f", Err(EncodedSeparator)),
            ("/public%2F..%2Fadmin", Err(EncodedSeparator)),
            ("/a%5Cb", Err(EncodedSeparator)),
            ("/a%5cb", Err(EncodedSeparator)),
            ("/a\\..\\admin", Err(Backslash)),
            // Percent-decoding of unreserved characters only, once.
            ("/%61dmin", Ok("/admin")),
            ("/%7Euser", Ok("/~user")),
            ("/a%20b", Ok("/a%20b")),
            ("/a%2ab", Ok("/a%2Ab")),
            ("/%252e%252e/admin", Ok("/%252e%252e/admin")),
            ("/a%", Err(BadPercent)),
            ("/a%4", Err(BadPercent)),
            ("/a%zz", Err(BadPercent)),
            ("/admin%00.png", Err(EncodedControl)),
            ("/a%0d%0a", Err(EncodedControl)),
            ("/a%7f", Err(EncodedControl)),
            // Outside ASCII: one spelling, percent-encoded UTF-8 (issue 18).
            ("/caf\u{e9}", Ok("/caf%C3%A9")),
            ("/admin/\u{fc}ber", Ok("/admin/%C3%BCber")),
            ("/admin/%c3%bcber", Ok("/admin/%C3%BCber")),
            ("/admin/%C3\u{bc}", Err(InvalidUtf8)),
            ("/\u{1f600}", Ok("/%F0%9F%98%80")),
            ("/%F0%9F%98%80", Ok("/%F0%9F%98%80")),
            ("/%ef%bf%bd", Ok("/%EF%BF%BD")),
            // Overlong forms, surrogates, stray and cut sequences.
            ("/%c0%af", Err(InvalidUtf8)),
            ("/%C0%AE%C0%AE/admin", Err(InvalidUtf8)),
            ("/%c1%9c", Err(InvalidUtf8)),
            ("/%e0%80%af", Err(InvalidUtf8)),
            ("/%f0%80%80%af", Err(InvalidUtf8)),
            ("/%ed%a0%80", Err(InvalidUtf8)),
            ("/%f4%90%80%80", Err(InvalidUtf8)),
            ("/%f8%88%80%80%80", Err(InvalidUtf8)),
            ("/%80", Err(InvalidUtf8)),
            ("/%bf", Err(InvalidUtf8)),
            ("/%c3", Err(InvalidUtf8)),
            ("/%c3/x", Err(InvalidUtf8)),
            ("/%c3a", Err(InvalidUtf8)),
            ("/%e2%82", Err(InvalidUtf8)),
            ("/%ff", Err(InvalidUtf8)),
            ("/%e9t%e9", Err(InvalidUtf8)),
            // Query and fragment.
            ("/admin?x=/../public", Ok("/admin")),
            ("/public?/../admin", Ok("/public")),
            ("/a/b/../c?q=1&r=%2F", Ok("/a/c")),
            ("/public#/../admin", Err(Fragment)),
            ("/public?q#x", Err(Fragment)),
            // Forms.
            ("*", Ok("*")),
            ("http://example.com/a/../b", Ok("/b")),
            ("HTTPS://example.com:8443//x", Ok("/x")),
            ("http://example.com", Ok("/")),
            ("http://example.com?q=1", Ok("/")),
            ("http://example.com#x", Err(Fragment)),
            ("http:///x", Err(NotOriginForm)),
            ("example.com:443", Err(NotOriginForm)),
            ("ftp://example.com/x", Err(NotOriginForm)),
            ("admin", Err(NotOriginForm)),
            ("", Err(NotOriginForm)),
        ];
        for (input, want) in cases {
            let got = normalize(input);
            assert_eq!(got.as_deref(), want.as_deref(), "input {input:?}");
        }
    }

    #[test]
    fn normalised_paths_are_fixed_points() {
        for input in [
            "/public/../admin",
            "//a/./b/../c/",
            "/%61%2e%2e/x",
            "/a%20b/%7e",
            "/a/b/..",
            "/caf\u{e9}/%c3%bc",
            "*",
        ] {
            let once = normalize(input).unwrap();
            assert_eq!(normalize(&once).unwrap(), once, "input {input:?}");
        }
    }

    #[test]
    fn normalize_into_reuses_the_buffer() {
        let mut out = String::with_capacity(64);
        let ptr = out.as_ptr();
        normalize_into("/a/../b", &mut out).unwrap();
        assert_eq!(out, "/b");
        normalize_into("//c", &mut out).unwrap();
        assert_eq!(out, "/c");
        assert_eq!(out.as_ptr(), ptr);
    }

    mod arbitrary {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// No input panics; every result is a fixed point with no dot segments,
            /// empty segments, `?`, `#` or `\`.
            #[test]
            fn normalised_is_canonical(target in "[/a-z.%2eEfFcC5?#;\\\\\u{fc}80bB]{0,24}") {
                if let Ok(path) = normalize(&target) {
                    prop_assert_eq!(normalize(&path), Ok(path.clone()));
                    if path != "*" {
                        prop_assert!(path.starts_with('/'));
                    }
                    prop_assert!(path.is_ascii());
                    prop_assert!(!path.contains("//"));
                    prop_assert!(!path.contains(['?', '#', '\\', ';']));
                    for seg in path.split('/') {
                        prop_assert!(seg != "." && seg != "..", "{}", path);
                    }
                }
            }
        }
    }
}
