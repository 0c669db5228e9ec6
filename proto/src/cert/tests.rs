use super::*;
use crate::key::PrivateKey;
use crate::testing::{net, TestCa, NOW};

const A4: &str = "100.64.0.1/32";
const A6: &str = "fd00:6d65:7368::1/128";

fn ca_params(td: &str) -> CaParams {
    CaParams {
        trust_domain: crate::identity::TrustDomain::parse(td).unwrap(),
        validity_secs: 1000,
        constraints: CaConstraints::default(),
    }
}

fn leaf_params(id: &str, addrs: &[&str], groups: &[&str]) -> LeafParams {
    LeafParams {
        identity: SpiffeId::parse(id).unwrap(),
        addresses: addrs.iter().map(|a| net(a)).collect(),
        groups: groups.iter().map(|g| g.to_string()).collect(),
        public_key: PrivateKey::generate().public_key(),
        validity_secs: 100,
    }
}

#[test]
fn round_trip_leaf() {
    let ca = TestCa::new("t");
    let (cert, key) = ca.leaf_with_groups(
        "spiffe://t/a",
        &[A4, A6, "100.64.8.0/24"],
        &["web", "ns:prod"],
    );
    let pem = cert.to_pem();
    assert!(pem.starts_with("-----BEGIN MESH CERTIFICATE-----\nversion: 1\nkind: leaf\n"));
    assert!(pem.ends_with("-----END MESH CERTIFICATE-----\n"));
    assert!(pem.contains("\naddresses: 100.64.0.1/32 fd00:6d65:7368::1/128 100.64.8.0/24\n"));
    let back = Certificate::from_pem(&pem).unwrap();
    assert_eq!(back, cert);
    assert_eq!(back.to_pem(), pem);
    assert_eq!(back.kind(), CertKind::Leaf);
    assert_eq!(back.identity().to_string(), "spiffe://t/a");
    assert_eq!(back.addresses(), &[net(A4), net(A6), net("100.64.8.0/24")]);
    assert_eq!(back.groups(), &["web".to_string(), "ns:prod".to_string()]);
    assert_eq!(back.public_key(), key.public_key().as_bytes());
    assert_eq!(back.issuer(), &ca.cert().fingerprint());
    assert_eq!(back.fingerprint(), Fingerprint::of(pem.as_bytes()));
    assert_eq!(back.not_before(), NOW.saturating_sub(86_400));
    assert!(back.ca_constraints().is_none());
    // Surrounding whitespace is not part of the certificate.
    assert_eq!(
        Certificate::from_pem(&format!("\n\n  {pem}\n\n")).unwrap(),
        cert
    );
    // Serde carries the armored text.
    let json = serde_json::to_string(&cert).unwrap();
    assert_eq!(serde_json::from_str::<Certificate>(&json).unwrap(), cert);
    let v = ca.ca().verify(&back, NOW).unwrap();
    assert_eq!(v.wg_public_key(), key.public_key());
    assert_eq!(v.identity(), cert.identity());
}

#[test]
fn round_trip_ca() {
    let ca = TestCa::with_constraints("t", &["100.64.0.0/10", "fd00:6d65:7368::/48"], &["web"]);
    let pem = ca.cert().to_pem();
    assert!(pem.contains("\nidentity: spiffe://t\nallowed_addresses: 100.64.0.0/10 fd00:6d65:7368::/48\nallowed_groups: web\n"), "{pem}");
    assert!(pem.contains("\nissuer: self\n"));
    let back = Certificate::from_pem(&pem).unwrap();
    assert_eq!(back.kind(), CertKind::Ca);
    assert_eq!(back.issuer(), &back.fingerprint());
    let c = back.ca_constraints().unwrap();
    assert_eq!(
        c.addresses,
        vec![net("100.64.0.0/10"), net("fd00:6d65:7368::/48")]
    );
    assert_eq!(c.groups, vec!["web".to_string()]);
    Ca::new(back).unwrap();
    // No constraints reads "any".
    let open = TestCa::new("t");
    assert!(open
        .cert()
        .as_pem()
        .contains("\nallowed_addresses: any\nallowed_groups: any\n"));
    assert_eq!(
        open.cert().ca_constraints(),
        Some(&CaConstraints::default())
    );
}

#[test]
fn signing_key_round_trip() {
    let ca = TestCa::new("t");
    let pem = ca.signer().signing_key().to_pem();
    assert!(pem.starts_with("-----BEGIN MESH CA KEY-----\n"));
    let key = CaSigningKey::from_pem(&pem).unwrap();
    let signer = CaSigner::from_parts(ca.cert().clone(), key).unwrap();
    let leaf = signer
        .issue(leaf_params("spiffe://t/x", &[A4], &[]), NOW)
        .unwrap();
    ca.ca().verify(&leaf, NOW).unwrap();
    assert!(!format!("{:?}", signer.signing_key()).contains(pem.lines().nth(1).unwrap()));
    assert!(matches!(
        CaSigner::from_parts(ca.cert().clone(), CaSigningKey::generate()),
        Err(CertError::KeyMismatch)
    ));
    assert!(CaSigningKey::from_pem("garbage").is_err());
}

/// Flipping any single byte of the stored certificate makes parsing or verification
/// fail: the signature covers every body byte, and the armor, field names and
/// signature encoding are checked exactly.
#[test]
fn every_byte_flip_is_caught() {
    let ca = TestCa::new("t");
    let verifier = ca.ca();
    let (leaf, _) = ca.leaf_with_groups("spiffe://t/a", &[A4, A6], &["web"]);
    let ca_pem = ca.cert().to_pem();
    // The stored block, without the final newline (surrounding whitespace is not part
    // of the certificate and is ignored on reading).
    let block = leaf.as_pem().trim_end();
    for i in 0..block.len() {
        for mask in [0x01u8, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80] {
            let mut bytes = block.as_bytes().to_vec();
            bytes[i] ^= mask;
            let Ok(s) = std::str::from_utf8(&bytes) else {
                continue; // not UTF-8: cannot even be read as text
            };
            if let Ok(c) = Certificate::from_pem(s) {
                assert!(
                    verifier.verify(&c, NOW).is_err(),
                    "flip {mask:#04x} at byte {i} ({:?}) still verifies",
                    block.as_bytes()[i] as char
                );
            }
        }
    }
    let block = ca_pem.trim_end();
    for i in 0..block.len() {
        for mask in [0x01u8, 0x20] {
            let mut bytes = block.as_bytes().to_vec();
            bytes[i] ^= mask;
            let Ok(s) = std::str::from_utf8(&bytes) else {
                continue;
            };
            if let Ok(c) = Certificate::from_pem(s) {
                assert!(
                    Ca::new(c).is_err(),
                    "CA flip {mask:#04x} at byte {i} still accepted"
                );
            }
        }
    }
}

#[test]
fn validity_window() {
    let ca = TestCa::new("t");
    let v = ca.ca();
    let (old, _) = ca.expired_leaf("spiffe://t/a", &[A4]);
    let err = v.verify(&old, NOW).unwrap_err();
    assert_eq!(err, VerifyError::Expired(old.not_after()));
    assert!(
        err.to_string()
            .starts_with("certificate expired at 2026-11-25T06:17:57Z"),
        "{err}"
    );
    let (future, _) = ca.future_leaf("spiffe://t/a", &[A4]);
    assert_eq!(
        v.verify(&future, NOW).unwrap_err(),
        VerifyError::NotYetValid(future.not_before())
    );
    // Clock skew: up to CLOCK_SKEW_SECS either side is tolerated, one more is not.
    let (leaf, _) = ca.leaf_at("spiffe://t/a", &[A4], &[], NOW, 1000);
    assert!(v.verify(&leaf, NOW.saturating_sub(CLOCK_SKEW_SECS)).is_ok());
    assert!(v
        .verify(&leaf, NOW.saturating_sub(CLOCK_SKEW_SECS + 1))
        .is_err());
    assert!(v
        .verify(&leaf, NOW.saturating_add(1000 + CLOCK_SKEW_SECS))
        .is_ok());
    assert!(v
        .verify(&leaf, NOW.saturating_add(1000 + CLOCK_SKEW_SECS + 1))
        .is_err());
}

#[test]
fn ca_validity_bounds_leaves() {
    let signer = CaSigner::init(ca_params("t"), NOW).unwrap();
    // A leaf may not outlive its CA.
    let mut p = leaf_params("spiffe://t/a", &[A4], &[]);
    p.validity_secs = 2000;
    let err = signer.issue(p, NOW).unwrap_err();
    assert!(err.to_string().contains("past the CA's expiry"), "{err}");
    // A CA cannot issue before it is valid.
    let err = signer
        .issue(
            leaf_params("spiffe://t/a", &[A4], &[]),
            NOW.saturating_sub(1),
        )
        .unwrap_err();
    assert!(err.to_string().contains("the CA is valid from"), "{err}");
    // An expired CA's leaves fail.
    let leaf = signer
        .issue(leaf_params("spiffe://t/a", &[A4], &[]), NOW)
        .unwrap();
    let ca = signer.ca();
    assert!(ca.verify(&leaf, NOW.saturating_add(50)).is_ok());
    let late = NOW.saturating_add(1000 + CLOCK_SKEW_SECS + 1);
    assert!(matches!(
        ca.verify(&leaf, late),
        Err(VerifyError::CaExpired(_))
    ));
}

#[test]
fn another_cas_leaf_is_rejected() {
    let ca = TestCa::new("t");
    let (foreign, _) = ca.foreign_leaf("spiffe://t/a", &[A4]);
    let err = ca.ca().verify(&foreign, NOW).unwrap_err();
    assert!(matches!(err, VerifyError::WrongIssuer { .. }), "{err}");
    // Even when it claims our CA as issuer, the signature gives it away: graft the
    // foreign body onto our issuer fingerprint by re-signing with the other key.
    let other = TestCa::new("t");
    let forged = forge(&foreign, ca.cert().fingerprint(), other.signer());
    let err = ca.ca().verify(&forged, NOW).unwrap_err();
    assert!(matches!(err, VerifyError::BadSignature { .. }), "{err}");
}

/// Re-signs `cert`'s body with `issuer` replaced, using `key`'s signer.
fn forge(cert: &Certificate, issuer: Fingerprint, signer: &CaSigner) -> Certificate {
    let pem = cert.as_pem();
    let old = format!("issuer: {}\n", cert.issuer());
    let new = format!("issuer: {issuer}\n");
    let start = pem.find("version:").unwrap();
    let end = pem.find("signature:").unwrap();
    let body = pem[start..end].replace(&old, &new);
    let sig = ed25519_dalek::Signer::sign(
        signer.signing_key().inner(),
        &signed_message(body.as_bytes()),
    );
    Certificate::from_pem(&format!(
        "{BEGIN}\n{body}signature: {}\n{END}\n",
        text::b64(&sig.to_bytes())
    ))
    .unwrap()
}

#[test]
fn a_leaf_cannot_sign() {
    let ca = TestCa::new("t");
    let (leaf, _) = ca.leaf("spiffe://t/a", &[A4]);
    // A leaf is not a CA for verification...
    let err = Ca::new(leaf.clone()).unwrap_err();
    assert_eq!(err, VerifyError::NotCa("spiffe://t/a".into()));
    assert!(err.to_string().contains("a leaf cannot sign"));
    // ...nor for issuing, whatever key comes with it...
    assert!(matches!(
        CaSigner::from_parts(leaf.clone(), CaSigningKey::generate()),
        Err(CertError::NotCa(_))
    ));
    // ...and a certificate that names a leaf as its issuer is refused.
    let fake = forge(
        &ca.leaf("spiffe://t/b", &["100.64.0.2/32"]).0,
        leaf.fingerprint(),
        ca.signer(),
    );
    assert!(matches!(
        ca.ca().verify(&fake, NOW),
        Err(VerifyError::WrongIssuer { .. })
    ));
    // A CA certificate is not a peer identity.
    assert_eq!(
        ca.ca().verify(ca.cert(), NOW).unwrap_err(),
        VerifyError::NotLeaf("spiffe://t".into())
    );
}

#[test]
fn constraints_enforced_at_issue() {
    let ca = TestCa::with_constraints(
        "t",
        &["100.64.0.0/16", "fd00:6d65:7368::/48"],
        &["web", "db"],
    );
    let s = ca.signer();
    let ok = s.issue(
        leaf_params("spiffe://t/a", &["100.64.1.0/24", A6], &["web"]),
        NOW,
    );
    assert!(ok.is_ok());
    let cases: Vec<(LeafParams, &str)> = vec![
        (
            leaf_params("spiffe://other/a", &[A4], &[]),
            "outside the CA's trust domain t",
        ),
        (
            leaf_params("spiffe://t/a", &["100.65.0.1/32"], &[]),
            "100.65.0.1/32 is outside the CA's allowed addresses",
        ),
        (
            leaf_params("spiffe://t/a", &["100.64.0.0/15"], &[]),
            "100.64.0.0/15 is outside",
        ),
        (
            leaf_params("spiffe://t/a", &["fd00:1::1/128"], &[]),
            "fd00:1::1/128 is outside",
        ),
        (
            leaf_params("spiffe://t/a", &[A4], &["admin"]),
            "group \"admin\" is not among",
        ),
        (leaf_params("spiffe://t", &[A4], &[]), "has no path"),
        (
            leaf_params("spiffe://t/a", &[], &[]),
            "at least one address",
        ),
        (
            leaf_params("spiffe://t/a", &["100.64.0.1/24"], &[]),
            "host bits set",
        ),
        (leaf_params("spiffe://t/a", &[A4, A4], &[]), "listed twice"),
        (
            leaf_params("spiffe://t/a", &[A4], &["we b"]),
            "only letters",
        ),
        (
            leaf_params("spiffe://t/a", &[A4], &["web", "web"]),
            "listed twice",
        ),
    ];
    for (p, want) in cases {
        let id = p.identity.to_string();
        let err = s.issue(p, NOW).unwrap_err().to_string();
        assert!(err.contains(want), "{id}: {err:?} lacks {want:?}");
    }
}

#[test]
fn constraints_enforced_at_verify() {
    // A CA whose key signed leaves outside its constraints (as a buggy or older issuer
    // might): verification still refuses them.
    let key = CaSigningKey::generate();
    let mut strict_params = ca_params("t");
    strict_params.constraints = CaConstraints {
        addresses: vec![net("100.64.0.0/16")],
        groups: vec!["web".into()],
    };
    let strict = CaSigner::init_with_key(strict_params, key.clone(), NOW).unwrap();
    let cases = [
        (
            "other",
            leaf_params("spiffe://other/a", &[A4], &[]),
            "trust domain",
        ),
        (
            "t",
            leaf_params("spiffe://t/a", &["100.65.0.1/32"], &[]),
            "allowed addresses",
        ),
        (
            "t",
            leaf_params("spiffe://t/a", &[A4], &["db"]),
            "allowed groups",
        ),
    ];
    for (td, p, want) in cases {
        let open = CaSigner::init_with_key(ca_params(td), key.clone(), NOW).unwrap();
        let leaf = open.issue(p, NOW).unwrap();
        let forged = forge(&leaf, strict.cert().fingerprint(), &strict);
        let err = strict.ca().verify(&forged, NOW).unwrap_err();
        assert!(matches!(err, VerifyError::Constraint(_)), "{err}");
        assert!(err.to_string().contains(want), "{err}");
    }
}

#[test]
fn malformed_text_names_the_problem() {
    let ca = TestCa::new("t");
    let (leaf, _) = ca.leaf("spiffe://t/a", &[A4]);
    let pem = leaf.to_pem();
    let cases: Vec<(String, &str)> = vec![
        ("".into(), "expected a line"),
        ("hello".into(), "not a mesh certificate"),
        (
            pem.replace("-----END MESH CERTIFICATE-----\n", ""),
            "truncated",
        ),
        (format!("{pem}{pem}"), "after"),
        (pem.replace('\n', "\r\n"), "CRLF"),
        (
            pem.replace("version: 1", "version: 2"),
            "unsupported certificate version 2",
        ),
        (
            pem.replace("kind: leaf", "kind: root"),
            "line 3, field kind: expected ca or leaf",
        ),
        (
            pem.replace("identity: spiffe://t/a", "identity: spiffe://t/a/"),
            "field identity: path may not end",
        ),
        (
            pem.replace("identity: ", "identity:  "),
            "exactly one space",
        ),
        (pem.replace("groups:\n", ""), "expected field \"groups\""),
        (
            pem.replace("addresses: 100.64.0.1/32", "addresses: 100.64.0.1"),
            "not an address/prefix",
        ),
        (
            pem.replace("addresses: 100.64.0.1/32", "addresses: 100.64.0.1/24"),
            "host bits",
        ),
        (
            pem.replace("not_before: ", "not_before: x"),
            "expected a UTC time",
        ),
        (pem.replace("serial: ", "serial: Z"), "field serial"),
        (
            pem.replace("signature: ", "signature: A"),
            "field signature",
        ),
        (
            pem.replace("issuer: ", "issuer: self\nissuer: "),
            "expected a SHA-256",
        ),
        ("x".repeat(MAX_CERT_LEN + 1), "larger than"),
    ];
    for (text, want) in cases {
        let err = Certificate::from_pem(&text).unwrap_err().to_string();
        assert!(err.contains(want), "{err:?} lacks {want:?}");
        assert!(!err.contains('\n'), "{err:?} spans lines");
    }
}

#[test]
fn time_parse() {
    for t in [0u64, 951_782_400, 1_795_673_877, 4_102_444_799] {
        let s = UnixTime(t).to_string();
        assert_eq!(parse_time(&s), Some(UnixTime(t)), "{s}");
    }
    for bad in [
        "2026-02-30T00:00:00Z",
        "2026-11-26 06:17:57Z",
        "2026-11-26T06:17:57",
        "2026-11-26T24:00:00Z",
        "1969-12-31T23:59:59Z",
        "+026-11-26T06:17:57Z",
    ] {
        assert_eq!(parse_time(bad), None, "{bad}");
    }
}

fn fixture() -> &'static (Ca, Certificate) {
    static F: std::sync::OnceLock<(Ca, Certificate)> = std::sync::OnceLock::new();
    F.get_or_init(|| {
        let ca = TestCa::new("t");
        let (leaf, _) = ca.leaf_with_groups("spiffe://t/a", &[A4, A6], &["web"]);
        (ca.ca(), leaf)
    })
}

proptest::proptest! {
    /// Arbitrary edits never panic the parser, and nothing but the original verifies.
    #[test]
    fn edits_never_panic_or_verify(start in 0usize..600, len in 0usize..8, insert in "\\PC{0,8}") {
        let (ca, leaf) = fixture();
        let pem = leaf.as_pem();
        let start = start.min(pem.len());
        let end = (start + len).min(pem.len());
        if !pem.is_char_boundary(start) || !pem.is_char_boundary(end) {
            return Ok(());
        }
        let edited = format!("{}{}{}", &pem[..start], insert, &pem[end..]);
        if let Ok(c) = Certificate::from_pem(&edited) {
            if ca.verify(&c, NOW).is_ok() {
                proptest::prop_assert_eq!(&c, leaf);
            }
        }
    }

    #[test]
    fn garbage_never_panics(s in "\\PC{0,300}") {
        let _ = Certificate::from_pem(&s);
        let _ = Certificate::from_pem(&format!("{BEGIN}\n{s}\n{END}\n"));
        let _ = CaSigningKey::from_pem(&s);
    }
}
