//! The version 1 text body: emit and strict parse, plus the small codecs it uses
//! (hex, base64, RFC 3339 timestamps).

use super::{
    validate_address, validate_group, CaConstraints, CertError, CertKind, Fingerprint, Serial,
    CERT_VERSION, MAX_ADDRESSES, MAX_GROUPS,
};
use crate::identity::SpiffeId;
use crate::time::UnixTime;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use ipnet::IpNet;
use std::fmt::{self, Write as _};

/// The fields of a body, in the order they are written.
pub(crate) struct Body {
    pub kind: CertKind,
    pub identity: SpiffeId,
    pub addresses: Vec<IpNet>,
    pub groups: Vec<String>,
    pub constraints: Option<CaConstraints>,
    pub public_key: [u8; 32],
    pub not_before: UnixTime,
    pub not_after: UnixTime,
    pub serial: Serial,
    /// `None` for a self-signed CA (`issuer: self`).
    pub issuer: Option<Fingerprint>,
}

/// The result of parsing everything between the armor lines.
pub(crate) struct Parsed {
    pub body_len: usize,
    pub signature: [u8; 64],
    pub kind: CertKind,
    pub identity: SpiffeId,
    pub addresses: Vec<IpNet>,
    pub groups: Vec<String>,
    pub constraints: Option<CaConstraints>,
    pub public_key: [u8; 32],
    pub not_before: UnixTime,
    pub not_after: UnixTime,
    pub serial: Serial,
    pub issuer: Option<Fingerprint>,
}

pub(crate) fn emit_body(b: &Body) -> String {
    let mut s = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(s, "version: {CERT_VERSION}");
    let _ = writeln!(s, "kind: {}", b.kind);
    let _ = writeln!(s, "identity: {}", b.identity);
    match (&b.kind, &b.constraints) {
        (CertKind::Ca, Some(c)) => {
            line(&mut s, "allowed_addresses", &or_any(&join(&c.addresses)));
            line(&mut s, "allowed_groups", &or_any(&c.groups.join(" ")));
        }
        _ => {
            line(&mut s, "addresses", &join(&b.addresses));
            line(&mut s, "groups", &b.groups.join(" "));
        }
    }
    let _ = writeln!(s, "public_key: {}", b64(&b.public_key));
    let _ = writeln!(s, "not_before: {}", b.not_before);
    let _ = writeln!(s, "not_after: {}", b.not_after);
    let _ = writeln!(s, "serial: {}", b.serial);
    match &b.issuer {
        Some(fp) => {
            let _ = writeln!(s, "issuer: {fp}");
        }
        None => s.push_str("issuer: self\n"),
    }
    s
}

/// `key: value`, or `key:` for an empty value (no trailing space to trip diffs).
fn line(s: &mut String, key: &str, value: &str) {
    if value.is_empty() {
        let _ = writeln!(s, "{key}:");
    } else {
        let _ = writeln!(s, "{key}: {value}");
    }
}

fn or_any(v: &str) -> String {
    if v.is_empty() {
        "any".into()
    } else {
        v.into()
    }
}

/// Reads the lines of a body in their fixed order. Line numbers count from the
/// `BEGIN` line as line 1.
struct Lines<'a> {
    rest: &'a str,
    consumed: usize,
    line: usize,
}

impl<'a> Lines<'a> {
    /// The value of the next line, which must be `name: value` (or `name:` if
    /// `allow_empty`). Returns (line number, value).
    fn field(&mut self, name: &'static str) -> Result<(usize, &'a str), CertError> {
        self.line += 1;
        let line_no = self.line;
        let Some(nl) = self.rest.find('\n') else {
            return Err(CertError::Line {
                line: line_no,
                problem: format!("expected field {name:?}, found the end of the certificate"),
            });
        };
        let text = &self.rest[..nl];
        self.rest = &self.rest[nl + 1..];
        self.consumed += nl + 1;
        let Some((key, value)) = text.split_once(':') else {
            return Err(CertError::Line {
                line: line_no,
                problem: format!("expected \"{name}: ...\", found {text:?}"),
            });
        };
        if key != name {
            return Err(CertError::Line {
                line: line_no,
                problem: format!("expected field {name:?}, found {key:?}"),
            });
        }
        if value.is_empty() {
            return Ok((line_no, ""));
        }
        match value.strip_prefix(' ') {
            Some(v) if !v.is_empty() && v.trim() == v => Ok((line_no, v)),
            _ => Err(CertError::Field {
                line: line_no,
                field: name,
                problem: "write \"name: value\" with exactly one space and no trailing space"
                    .into(),
            }),
        }
    }
}

fn field_err(line: usize, field: &'static str, problem: impl Into<String>) -> CertError {
    CertError::Field {
        line,
        field,
        problem: problem.into(),
    }
}

/// Parses the text between the armor lines: the body fields, then `signature:`.
pub(crate) fn parse_inner(inner: &str) -> Result<Parsed, CertError> {
    let mut l = Lines {
        rest: inner,
        consumed: 0,
        line: 1,
    };
    let (_, version) = l.field("version")?;
    if version != CERT_VERSION.to_string() {
        return Err(CertError::UnsupportedVersion(version.to_owned()));
    }
    let (n, kind) = l.field("kind")?;
    let kind = match kind {
        "ca" => CertKind::Ca,
        "leaf" => CertKind::Leaf,
        other => {
            return Err(field_err(
                n,
                "kind",
                format!("expected ca or leaf, found {other:?}"),
            ))
        }
    };
    let (n, identity) = l.field("identity")?;
    let identity =
        SpiffeId::parse(identity).map_err(|e| field_err(n, "identity", e.to_string()))?;
    let (mut addresses, mut groups, mut constraints) = (Vec::new(), Vec::new(), None);
    match kind {
        CertKind::Leaf => {
            if identity.is_trust_domain_id() {
                return Err(field_err(n, "identity", "a leaf identity needs a path"));
            }
            let (n, v) = l.field("addresses")?;
            addresses = parse_addresses(n, "addresses", v)?;
            if addresses.is_empty() {
                return Err(field_err(
                    n,
                    "addresses",
                    "a leaf needs at least one address",
                ));
            }
            let (n, v) = l.field("groups")?;
            groups = parse_groups(n, "groups", v)?;
        }
        CertKind::Ca => {
            if !identity.is_trust_domain_id() {
                return Err(field_err(
                    n,
                    "identity",
                    "a CA identity is spiffe://<trust-domain> with no path",
                ));
            }
            let (n, v) = l.field("allowed_addresses")?;
            let a = parse_any_or(n, "allowed_addresses", v, parse_addresses)?;
            let (n, v) = l.field("allowed_groups")?;
            let g = parse_any_or(n, "allowed_groups", v, parse_groups)?;
            constraints = Some(CaConstraints {
                addresses: a,
                groups: g,
            });
        }
    }
    let (n, pk) = l.field("public_key")?;
    let public_key = parse_b64::<32>(pk)
        .ok_or_else(|| field_err(n, "public_key", "expected 32 bytes in base64"))?;
    let (n, nb) = l.field("not_before")?;
    let not_before = parse_time(nb).ok_or_else(|| field_err(n, "not_before", TIME_FORMAT))?;
    let (n, na) = l.field("not_after")?;
    let not_after = parse_time(na).ok_or_else(|| field_err(n, "not_after", TIME_FORMAT))?;
    if not_after <= not_before {
        return Err(field_err(n, "not_after", "must be later than not_before"));
    }
    let (n, serial) = l.field("serial")?;
    let serial = parse_hex::<16>(serial)
        .map(Serial)
        .ok_or_else(|| field_err(n, "serial", "expected 32 lowercase hex digits"))?;
    let (n, issuer) = l.field("issuer")?;
    let issuer = match (kind, issuer) {
        (CertKind::Ca, "self") => None,
        (CertKind::Ca, _) => {
            return Err(field_err(
                n,
                "issuer",
                "a CA certificate must be self-signed (\"self\")",
            ))
        }
        (CertKind::Leaf, fp) => Some(Fingerprint::parse(fp).ok_or_else(|| {
            field_err(
                n,
                "issuer",
                "expected a SHA-256 fingerprint (64 lowercase hex digits)",
            )
        })?),
    };
    let body_len = l.consumed;
    let (n, sig) = l.field("signature")?;
    let signature = parse_b64::<64>(sig)
        .ok_or_else(|| field_err(n, "signature", "expected 64 bytes in base64"))?;
    if !l.rest.is_empty() {
        return Err(CertError::Line {
            line: n + 1,
            problem: "unexpected text after the signature".into(),
        });
    }
    Ok(Parsed {
        body_len,
        signature,
        kind,
        identity,
        addresses,
        groups,
        constraints,
        public_key,
        not_before,
        not_after,
        serial,
        issuer,
    })
}

const TIME_FORMAT: &str = "expected a UTC time like 2026-11-26T06:17:57Z";

fn parse_any_or<T>(
    n: usize,
    field: &'static str,
    v: &str,
    f: fn(usize, &'static str, &str) -> Result<Vec<T>, CertError>,
) -> Result<Vec<T>, CertError> {
    match v {
        "any" => Ok(Vec::new()),
        "" => Err(field_err(n, field, "write \"any\" or a list")),
        v => f(n, field, v),
    }
}

fn parse_addresses(n: usize, field: &'static str, v: &str) -> Result<Vec<IpNet>, CertError> {
    let mut out: Vec<IpNet> = Vec::new();
    if v.is_empty() {
        return Ok(out);
    }
    for item in v.split(' ') {
        let net: IpNet = item
            .parse()
            .map_err(|_| field_err(n, field, format!("{item:?} is not an address/prefix")))?;
        validate_address(&net).map_err(|e| field_err(n, field, e))?;
        if net.to_string() != item {
            return Err(field_err(
                n,
                field,
                format!("{item:?} is not canonical (write {net})"),
            ));
        }
        if out.contains(&net) {
            return Err(field_err(n, field, format!("{net} is listed twice")));
        }
        out.push(net);
    }
    if out.len() > MAX_ADDRESSES {
        return Err(field_err(
            n,
            field,
            format!("more than {MAX_ADDRESSES} entries"),
        ));
    }
    Ok(out)
}

fn parse_groups(n: usize, field: &'static str, v: &str) -> Result<Vec<String>, CertError> {
    let mut out: Vec<String> = Vec::new();
    if v.is_empty() {
        return Ok(out);
    }
    for g in v.split(' ') {
        validate_group(g).map_err(|e| field_err(n, field, e))?;
        if out.iter().any(|x| x == g) {
            return Err(field_err(n, field, format!("group {g:?} is listed twice")));
        }
        out.push(g.to_owned());
    }
    if out.len() > MAX_GROUPS {
        return Err(field_err(
            n,
            field,
            format!("more than {MAX_GROUPS} entries"),
        ));
    }
    Ok(out)
}

pub(crate) fn join(nets: &[IpNet]) -> String {
    nets.iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

pub(crate) fn b64(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

/// Strict base64: canonical padding and trailing bits, exact length.
pub(crate) fn parse_b64<const N: usize>(s: &str) -> Option<[u8; N]> {
    let v = STANDARD.decode(s).ok()?;
    let arr = <[u8; N]>::try_from(v.as_slice()).ok()?;
    (b64(&arr) == s).then_some(arr)
}

pub(crate) fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    for b in bytes {
        write!(f, "{b:02x}")?;
    }
    Ok(())
}

/// Exactly `2 * N` lowercase hex digits.
pub(crate) fn parse_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let s = s.as_bytes();
    if s.len() != 2 * N {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = digit(s[2 * i])? << 4 | digit(s[2 * i + 1])?;
    }
    Some(out)
}

/// Parses exactly `YYYY-MM-DDTHH:MM:SSZ` (RFC 3339, UTC, whole seconds), the form
/// [`UnixTime`]'s Display writes; anything else, including impossible dates, is `None`.
pub fn parse_time(s: &str) -> Option<UnixTime> {
    let b = s.as_bytes();
    if b.len() != 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
        || b[19] != b'Z'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = &s[r];
        if !part.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        part.parse().ok()
    };
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if y < 1970 || !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 59
    {
        return None;
    }
    let secs = days_from_civil(y, m, d) * 86_400 + hh * 3600 + mm * 60 + ss;
    let t = UnixTime(u64::try_from(secs).ok()?);
    // Rejects dates like 02-30 that would silently roll over.
    (t.to_string() == s).then_some(t)
}

/// Howard Hinnant's `days_from_civil`: (year, month, day) to days since 1970-01-01.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}
