use super::*;
use crate::signed::{DocParams, PolicySigningKey};
use crate::testing::{TestCa, NOW};

fn prefix() -> Prefix {
    Prefix::for_trust_domain(&TrustDomain::parse("example.org").unwrap())
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

fn status() -> NodeStatus {
    NodeStatus {
        applied_policy_version: 3,
        policy_digest: Some(Fingerprint::of(b"policy")),
        store_revision: 42,
        meshd_version: "0.1.0".into(),
        updated_at: NOW,
    }
}

#[test]
fn keys_round_trip() {
    let p = prefix();
    assert_eq!(p.as_str(), "/meshd/example.org/");
    let web = id("spiffe://example.org/web");
    // A path segment named like a layout word stays part of the identity.
    let tricky = id("spiffe://example.org/ns/status/endpoint");
    let cases = [
        (
            StoreKey::Cert(web.clone()),
            "/meshd/example.org/certs/spiffe://example.org/web",
        ),
        (
            StoreKey::NodeEndpoint(web.clone()),
            "/meshd/example.org/nodes/spiffe://example.org/web/endpoint",
        ),
        (
            StoreKey::NodeStatus(web.clone()),
            "/meshd/example.org/nodes/spiffe://example.org/web/status",
        ),
        (
            StoreKey::NodeStatus(tricky.clone()),
            "/meshd/example.org/nodes/spiffe://example.org/ns/status/endpoint/status",
        ),
        (StoreKey::Policy, "/meshd/example.org/policy/current"),
        (
            StoreKey::PolicyHistory(7),
            "/meshd/example.org/policy/history/00000000000000000007",
        ),
        (
            StoreKey::PolicyHistory(u64::MAX),
            "/meshd/example.org/policy/history/18446744073709551615",
        ),
        (StoreKey::Revocations, "/meshd/example.org/revocations"),
    ];
    for (k, text) in cases {
        assert_eq!(p.key(&k), text);
        assert_eq!(p.parse_key(text.as_bytes()), Ok(k));
    }
    // History keys sort as their versions do.
    assert!(p.key(&StoreKey::PolicyHistory(9)) < p.key(&StoreKey::PolicyHistory(10)));
    assert!(p.key(&StoreKey::Cert(web)).starts_with(&p.certs()));
}

#[test]
fn bad_keys_are_typed_errors() {
    let p = prefix();
    let cases: &[(&[u8], KeyError)] = &[
        (
            b"/other/certs/spiffe://example.org/web",
            KeyError::OutsidePrefix,
        ),
        (b"/meshd/example.org/", KeyError::Unknown),
        (b"/meshd/example.org/junk", KeyError::Unknown),
        (
            b"/meshd/example.org/nodes/spiffe://example.org/web",
            KeyError::Unknown,
        ),
        (
            b"/meshd/example.org/nodes/spiffe://example.org/web/other",
            KeyError::Unknown,
        ),
        (
            b"/meshd/example.org/policy/history/7",
            KeyError::HistoryVersion,
        ),
        (
            b"/meshd/example.org/policy/history/00000000000000000000",
            KeyError::HistoryVersion,
        ),
        (
            b"/meshd/example.org/policy/history/+0000000000000000007",
            KeyError::HistoryVersion,
        ),
        (
            b"/meshd/example.org/policy/history/99999999999999999999",
            KeyError::HistoryVersion,
        ),
        (b"/meshd/example.org/\xff", KeyError::NotText),
    ];
    for (raw, want) in cases {
        assert_eq!(
            p.parse_key(raw).as_ref(),
            Err(want),
            "{:?}",
            String::from_utf8_lossy(raw)
        );
    }
    assert!(matches!(
        p.parse_key(b"/meshd/example.org/certs/spiffe://example.org/a/../b"),
        Err(KeyError::Identity(_))
    ));
    assert!(matches!(
        p.parse_key(b"/meshd/example.org/certs/"),
        Err(KeyError::Identity(_))
    ));
}

#[test]
fn prefixes_are_validated() {
    assert!(Prefix::parse("/meshd/x/").is_ok());
    assert!(Prefix::parse("/a/").is_ok());
    for bad in ["", "/", "meshd/", "/meshd", "/me shd/", "/a//b/", "/é/"] {
        assert!(Prefix::parse(bad).is_err(), "{bad:?}");
    }
    assert!(Prefix::parse(&format!("/{}/", "a".repeat(MAX_PREFIX_LEN))).is_err());
}

#[test]
fn values_round_trip() {
    let p = prefix();
    let ca = TestCa::new("example.org");
    let (cert, _) = ca.leaf("spiffe://example.org/web", &["100.64.0.1/32"]);
    let key = PolicySigningKey::generate();
    let doc = PolicyDoc::sign(
        &key,
        &DocParams {
            trust_domain: ca.ca().trust_domain(),
            version: 4,
            issued_at: NOW,
            name: "p.toml",
            policy: "",
        },
    )
    .unwrap();
    let web = id("spiffe://example.org/web");
    let entries = [
        StoreEntry {
            key: StoreKey::Cert(web.clone()),
            value: StoreValue::Cert(cert),
        },
        StoreEntry {
            key: StoreKey::NodeEndpoint(web.clone()),
            value: StoreValue::Endpoint(NodeEndpoint {
                endpoints: vec![
                    "198.18.0.1:51820".parse().unwrap(),
                    "[fd00::1]:51820".parse().unwrap(),
                ],
            }),
        },
        StoreEntry {
            key: StoreKey::NodeStatus(web),
            value: StoreValue::Status(status()),
        },
        StoreEntry {
            key: StoreKey::Policy,
            value: StoreValue::Policy(doc.clone()),
        },
        StoreEntry {
            key: StoreKey::PolicyHistory(4),
            value: StoreValue::Policy(doc),
        },
        StoreEntry {
            key: StoreKey::Revocations,
            value: StoreValue::Revocations(b"anything".to_vec()),
        },
    ];
    for e in entries {
        let raw_key = p.key(&e.key);
        let bytes = encode(&e.value);
        assert_eq!(decode(&p, raw_key.as_bytes(), &bytes), Ok(e));
    }
    // The status JSON is the documented shape, and unknown fields are ignored.
    let json = String::from_utf8(encode(&StoreValue::Status(status()))).unwrap();
    assert!(
        json.starts_with("{\"applied_policy_version\":3,\"policy_digest\":\""),
        "{json}"
    );
    let newer = json.replace('}', ",\"future_field\":1}");
    let k = p.key(&StoreKey::NodeStatus(id("spiffe://example.org/web")));
    assert!(decode(&p, k.as_bytes(), newer.as_bytes()).is_ok());
}

/// Whatever is under the prefix decodes to an entry or a typed error naming the key.
#[test]
fn garbage_is_a_typed_error() {
    let p = prefix();
    let ca = TestCa::new("example.org");
    let (cert, _) = ca.leaf("spiffe://example.org/web", &["100.64.0.1/32"]);
    let web_cert = p.key(&StoreKey::Cert(id("spiffe://example.org/web")));
    let db_cert = p.key(&StoreKey::Cert(id("spiffe://example.org/db")));
    let ep = p.key(&StoreKey::NodeEndpoint(id("spiffe://example.org/web")));
    let st = p.key(&StoreKey::NodeStatus(id("spiffe://example.org/web")));
    let pol = p.key(&StoreKey::Policy);
    let hist = p.key(&StoreKey::PolicyHistory(2));
    let key = PolicySigningKey::generate();
    let doc3 = PolicyDoc::sign(
        &key,
        &DocParams {
            trust_domain: ca.ca().trust_domain(),
            version: 3,
            issued_at: NOW,
            name: "p.toml",
            policy: "",
        },
    )
    .unwrap();
    let big = vec![b'a'; MAX_CERT_LEN + 1];
    let json_status = String::from_utf8(encode(&StoreValue::Status(status()))).unwrap();
    let cases: Vec<(&str, Vec<u8>, IgnoreReason, Option<&str>)> = vec![
        (
            "/meshd/example.org/junk",
            b"x".to_vec(),
            IgnoreReason::UnknownKey,
            None,
        ),
        (
            "/meshd/example.org/certs/nope",
            cert.as_pem().into(),
            IgnoreReason::BadKey,
            None,
        ),
        (
            &web_cert,
            b"garbage".to_vec(),
            IgnoreReason::BadCertificate,
            Some("not a mesh certificate"),
        ),
        (
            &web_cert,
            vec![0xff, 0x00],
            IgnoreReason::BadCertificate,
            Some("UTF-8"),
        ),
        (
            &web_cert,
            ca.cert().as_pem().into(),
            IgnoreReason::BadCertificate,
            Some("CA"),
        ),
        (&web_cert, big, IgnoreReason::TooLarge, Some("65537 bytes")),
        (
            &db_cert,
            cert.as_pem().into(),
            IgnoreReason::IdentityMismatch,
            Some("spiffe://example.org/web"),
        ),
        (
            &ep,
            b"{}".to_vec(),
            IgnoreReason::BadValue,
            Some("endpoints"),
        ),
        (
            &ep,
            b"{\"endpoints\":[]}".to_vec(),
            IgnoreReason::BadValue,
            Some("1 to 8"),
        ),
        (
            &ep,
            b"{\"endpoints\":[\"0.0.0.0:1\"]}".to_vec(),
            IgnoreReason::BadValue,
            Some("0.0.0.0:1"),
        ),
        (
            &ep,
            b"{\"endpoints\":[\"x\"]}".to_vec(),
            IgnoreReason::BadValue,
            Some("JSON"),
        ),
        (&st, b"null".to_vec(), IgnoreReason::BadValue, None),
        (
            &st,
            json_status.replace("0.1.0", "").into_bytes(),
            IgnoreReason::BadValue,
            Some("meshd_version"),
        ),
        (
            &st,
            json_status.replace("42", "-1").into_bytes(),
            IgnoreReason::BadValue,
            Some("store_revision"),
        ),
        (
            &st,
            vec![b' '; MAX_NODE_VALUE_LEN + 1],
            IgnoreReason::TooLarge,
            None,
        ),
        (
            &pol,
            b"[[policy]]\n".to_vec(),
            IgnoreReason::BadPolicyDocument,
            Some("not a signed policy document"),
        ),
        (
            &pol,
            vec![b'x'; MAX_POLICY_DOC_LEN + 1],
            IgnoreReason::TooLarge,
            None,
        ),
        (
            &hist,
            doc3.as_text().into(),
            IgnoreReason::VersionMismatch,
            Some("version 3"),
        ),
    ];
    for (k, v, reason, detail) in cases {
        let err = decode(&p, k.as_bytes(), &v).expect_err(k);
        assert_eq!(err.reason, reason, "{k}: {err}");
        assert_eq!(err.key_text, k);
        if let Some(d) = detail {
            assert!(
                err.detail.contains(d),
                "{k}: want {d:?} in {:?}",
                err.detail
            );
        }
        assert!(!err.to_string().contains('\n'), "one line: {err}");
        // A key that parsed is named, so its last good value can be kept.
        assert_eq!(
            err.key.is_some(),
            !matches!(reason, IgnoreReason::UnknownKey | IgnoreReason::BadKey)
        );
    }
}

#[test]
fn random_bytes_never_panic() {
    use proptest::prelude::*;
    let p = prefix();
    let keys: Vec<String> = vec![
        p.key(&StoreKey::Cert(id("spiffe://example.org/web"))),
        p.key(&StoreKey::NodeEndpoint(id("spiffe://example.org/web"))),
        p.key(&StoreKey::NodeStatus(id("spiffe://example.org/web"))),
        p.key(&StoreKey::Policy),
        p.key(&StoreKey::PolicyHistory(1)),
    ];
    proptest!(|(k in 0usize..5, v in proptest::collection::vec(any::<u8>(), 0..300), raw_key in proptest::collection::vec(any::<u8>(), 0..80))| {
        let _ = decode(&p, keys[k].as_bytes(), &v);
        let mut full = p.as_str().as_bytes().to_vec();
        full.extend_from_slice(&raw_key);
        let _ = decode(&p, &full, &v);
    });
}
