use super::*;
use crate::testing::NOW;

const POLICY: &str = r#"[[policy]]
name = "web"
action = "allow"
[[policy.rule]]
name = "a-reads"
from = [{ identities = ["spiffe://t/a"] }]
to = [{ ports = [8080] }]

[[test]]
name = "a reaches web"
from = "spiffe://t/a"
to_port = 8080
expect = "allow"
"#;

fn td(s: &str) -> TrustDomain {
    TrustDomain::parse(s).unwrap()
}

fn trust(keys: &[&PolicySigningKey]) -> PolicyTrust {
    PolicyTrust {
        trust_domain: td("t"),
        keys: keys.iter().map(|k| k.public_key()).collect(),
    }
}

fn sign(key: &PolicySigningKey, version: u64, policy: &str) -> PolicyDoc {
    PolicyDoc::sign(
        key,
        &DocParams {
            trust_domain: &td("t"),
            version,
            issued_at: NOW,
            name: "policy.toml",
            policy,
        },
    )
    .unwrap()
}

fn check(
    bytes: &[u8],
    trust: &PolicyTrust,
    current: u64,
) -> Result<VerifiedPolicyDoc, SignedError> {
    verify(bytes, trust, current, DefaultAction::Deny, NOW)
}

#[test]
fn round_trip_and_verify() {
    let key = PolicySigningKey::generate();
    let doc = sign(&key, 7, POLICY);
    let text = doc.as_text();
    assert!(text.starts_with(
        "-----BEGIN MESH POLICY DOCUMENT-----\nversion: 1\ntrust_domain: t\npolicy_version: 7\n"
    ));
    assert!(text.contains(&format!("\nsigner: {}\n", key.public_key().id())));
    assert!(text.contains(&format!(
        "\npolicy_length: {}\n{POLICY}signature: ",
        POLICY.len()
    )));
    assert!(text.ends_with("-----END MESH POLICY DOCUMENT-----\n"));
    let back = PolicyDoc::parse(text.as_bytes()).unwrap();
    assert_eq!(back, doc);
    assert_eq!(back.policy(), POLICY);
    assert_eq!(back.version(), 7);
    assert_eq!(back.issued_at(), NOW);
    assert_eq!(back.name(), "policy.toml");
    assert_eq!(back.signer(), key.public_key().id());
    // Surrounding whitespace is not part of the document.
    assert_eq!(
        PolicyDoc::parse(format!("\n {text}\n\n").as_bytes()).unwrap(),
        doc
    );
    let v = check(text.as_bytes(), &trust(&[&key]), 6).unwrap();
    assert_eq!(v.version(), 7);
    assert!(v.loaded().tests_passed());
    assert_eq!(v.loaded().compiled.set().policies.len(), 1);
    // Any accepted key will do: the signer is found by its id.
    let other = PolicySigningKey::generate();
    assert!(check(text.as_bytes(), &trust(&[&other, &key]), 0).is_ok());
}

#[test]
fn policy_text_is_carried_verbatim() {
    let key = PolicySigningKey::generate();
    // An armor line, a fake signature line and CRLF inside the policy cannot end or
    // change the document: it is delimited by its length.
    let tricky = "# -----END MESH POLICY DOCUMENT-----\r\n# signature: AAAA\n[[policy]]\nname = \"x\"\naction = \"deny\"\n[[policy.rule]]\nto = [{ ports = [1] }]";
    let doc = sign(&key, 1, tricky);
    assert_eq!(
        doc.policy(),
        format!("{tricky}\n"),
        "a final newline is added"
    );
    let v = check(doc.as_text().as_bytes(), &trust(&[&key]), 0).unwrap();
    assert_eq!(v.policy(), format!("{tricky}\n"));
    // No policies at all (the mesh default decides) is a valid document; an empty
    // text is a valid document form but not a valid policy.
    let none = sign(&key, 2, "policy = []\n");
    assert!(check(none.as_text().as_bytes(), &trust(&[&key]), 1).is_ok());
    let empty = sign(&key, 3, "");
    assert_eq!(empty.policy(), "");
    assert!(matches!(
        check(empty.as_text().as_bytes(), &trust(&[&key]), 2),
        Err(SignedError::InvalidPolicy { version: 3, .. })
    ));
}

#[test]
fn refuses_unsigned() {
    let key = PolicySigningKey::generate();
    // A bare policy file written into the store.
    assert_eq!(
        check(POLICY.as_bytes(), &trust(&[&key]), 0).unwrap_err(),
        SignedError::Unsigned
    );
    // The armor with its signature line removed.
    let text = sign(&key, 1, POLICY).as_text().to_string();
    let cut = text.find("signature: ").unwrap();
    let end = text[cut..].find('\n').unwrap();
    let unsigned = format!("{}{}", &text[..cut], &text[cut + end + 1..]);
    assert_eq!(
        check(unsigned.as_bytes(), &trust(&[&key]), 0).unwrap_err(),
        SignedError::Unsigned
    );
    let err = SignedError::Unsigned.to_string();
    assert!(err.contains("meshctl policy publish"), "{err}");
}

#[test]
fn refuses_a_key_not_accepted() {
    let key = PolicySigningKey::generate();
    let stranger = PolicySigningKey::generate();
    let doc = sign(&stranger, 1, POLICY);
    assert_eq!(
        check(doc.as_text().as_bytes(), &trust(&[&key]), 0).unwrap_err(),
        SignedError::UnknownSigner(stranger.public_key().id())
    );
    // No keys at all: nothing is accepted.
    assert!(matches!(
        check(doc.as_text().as_bytes(), &trust(&[]), 0),
        Err(SignedError::UnknownSigner(_))
    ));
}

#[test]
fn refuses_a_bad_signature() {
    let key = PolicySigningKey::generate();
    let text = sign(&key, 3, POLICY).as_text().to_string();
    let t = trust(&[&key]);
    // One changed byte of the policy (port 8080 -> 8081): same length, same form.
    let widened = text.replace("ports = [8080]", "ports = [8081]");
    assert_ne!(widened, text);
    assert_eq!(
        check(widened.as_bytes(), &t, 0).unwrap_err(),
        SignedError::BadSignature(key.public_key().id())
    );
    // A higher version number claimed over the same signature.
    let bumped = text.replace("policy_version: 3\n", "policy_version: 4\n");
    assert_eq!(
        check(bumped.as_bytes(), &t, 0).unwrap_err(),
        SignedError::BadSignature(key.public_key().id())
    );
    // Another document's signature.
    let other = sign(&key, 3, "").as_text().to_string();
    let sig_line = |s: &str| {
        let i = s.find("signature: ").unwrap();
        s[i..i + s[i..].find('\n').unwrap()].to_string()
    };
    let swapped = text.replace(&sig_line(&text), &sig_line(&other));
    assert_eq!(
        check(swapped.as_bytes(), &t, 0).unwrap_err(),
        SignedError::BadSignature(key.public_key().id())
    );
}

#[test]
fn refuses_a_version_not_newer() {
    let key = PolicySigningKey::generate();
    let t = trust(&[&key]);
    let doc = sign(&key, 5, POLICY);
    for current in [5, 6, u64::MAX] {
        assert_eq!(
            check(doc.as_text().as_bytes(), &t, current).unwrap_err(),
            SignedError::NotNewer {
                version: 5,
                current
            }
        );
    }
    // A rollback is a new version whose content is an old one: accepted.
    let rollback = sign(&key, 7, doc.policy());
    let v = check(rollback.as_text().as_bytes(), &t, 6).unwrap();
    assert_eq!(v.policy_digest(), doc.policy_digest());
    let err = SignedError::NotNewer {
        version: 5,
        current: 6,
    }
    .to_string();
    assert!(err.contains("rollback"), "{err}");
}

#[test]
fn refuses_too_large() {
    let key = PolicySigningKey::generate();
    let filler = format!("{POLICY}# {}\n", "x".repeat(MAX_POLICY_DOC_LEN));
    let err = PolicyDoc::sign(
        &key,
        &DocParams {
            trust_domain: &td("t"),
            version: 1,
            issued_at: NOW,
            name: "big.toml",
            policy: &filler,
        },
    )
    .unwrap_err();
    assert!(matches!(err, SignedError::TooLarge { .. }), "{err}");
    // Refused before parsing, whatever the bytes.
    let big = vec![b'x'; MAX_POLICY_DOC_LEN + 1];
    assert_eq!(
        check(&big, &trust(&[&key]), 0).unwrap_err(),
        SignedError::TooLarge {
            len: MAX_POLICY_DOC_LEN + 1
        }
    );
    // Exactly at the limit, the size is not the complaint.
    let at = vec![b'x'; MAX_POLICY_DOC_LEN];
    assert_eq!(
        check(&at, &trust(&[&key]), 0).unwrap_err(),
        SignedError::Unsigned
    );
}

#[test]
fn refuses_an_invalid_policy() {
    let key = PolicySigningKey::generate();
    let t = trust(&[&key]);
    // Signed by an accepted key, but not a valid policy: refused with the policy's
    // own error (file name and line).
    let doc = sign(&key, 2, "[[policy]]\nname = \"x\"\naction = \"maybe\"\n");
    let err = check(doc.as_text().as_bytes(), &t, 0).unwrap_err();
    assert!(
        matches!(err, SignedError::InvalidPolicy { version: 2, .. }),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.starts_with("policy document version 2: policy.toml:3"),
        "{msg}"
    );
    // Valid, but its own tests fail under the node's default.
    let failing = POLICY.replace("expect = \"allow\"", "expect = \"deny\"");
    let doc = sign(&key, 3, &failing);
    let err = check(doc.as_text().as_bytes(), &t, 0).unwrap_err();
    assert!(
        matches!(err, SignedError::TestsFailed { version: 3, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("\"a reaches web\""), "{err}");
}

#[test]
fn refuses_another_trust_domain() {
    let key = PolicySigningKey::generate();
    let doc = PolicyDoc::sign(
        &key,
        &DocParams {
            trust_domain: &td("other.org"),
            version: 1,
            issued_at: NOW,
            name: "policy.toml",
            policy: POLICY,
        },
    )
    .unwrap();
    assert_eq!(
        check(doc.as_text().as_bytes(), &trust(&[&key]), 0).unwrap_err(),
        SignedError::WrongTrustDomain {
            doc: "other.org".into(),
            ours: "t".into()
        }
    );
}

#[test]
fn refuses_a_document_from_the_future() {
    let key = PolicySigningKey::generate();
    let t = trust(&[&key]);
    let at = |issued_at: UnixTime| {
        PolicyDoc::sign(
            &key,
            &DocParams {
                trust_domain: &td("t"),
                version: 1,
                issued_at,
                name: "p.toml",
                policy: POLICY,
            },
        )
        .unwrap()
    };
    let skewed = at(NOW.saturating_add(CLOCK_SKEW_SECS));
    assert!(check(skewed.as_text().as_bytes(), &t, 0).is_ok());
    let future = at(NOW.saturating_add(CLOCK_SKEW_SECS + 1));
    assert!(matches!(
        check(future.as_text().as_bytes(), &t, 0),
        Err(SignedError::FromTheFuture { .. })
    ));
    // Old documents do not expire: a store that is down for a month costs nothing.
    let old = at(UnixTime(1));
    assert!(check(old.as_text().as_bytes(), &t, 0).is_ok());
}

#[test]
fn malformed_documents_are_typed_errors() {
    let key = PolicySigningKey::generate();
    let text = sign(&key, 1, POLICY).as_text().to_string();
    let cases: Vec<(String, &str)> = vec![
        (
            text.replace("version: 1\n", "version: 2\n"),
            "unsupported policy document version 2",
        ),
        (
            text.replace("policy_version: 1\n", "policy_version: 01\n"),
            "field policy_version",
        ),
        (
            text.replace("policy_version: 1\n", "policy_version: 0\n"),
            "field policy_version",
        ),
        (
            text.replace("policy_version: 1\n", "policy_version:  1\n"),
            "exactly one space",
        ),
        (
            text.replace("trust_domain: t\n", "trust_domain: T\n"),
            "field trust_domain",
        ),
        (
            text.replace("issued_at: ", "issued_at: x"),
            "field issued_at",
        ),
        (text.replace("signer: ", "signer: 0"), "field signer"),
        (
            text.replace("name: policy.toml\n", "name:  \n"),
            "line 7, field name",
        ),
        (
            text.replace("name: policy.toml\n", ""),
            "expected field \"name\"",
        ),
        (
            text.replace(
                &format!("policy_length: {}", POLICY.len()),
                &format!("policy_length: {}", POLICY.len() - 1),
            ),
            "do not end a line",
        ),
        (
            text.replace(
                &format!("policy_length: {}", POLICY.len()),
                "policy_length: 99999",
            ),
            "shorter",
        ),
        (
            text.replace(
                &format!("policy_length: {}", POLICY.len()),
                &format!("policy_length: {}", POLICY.len() - 16),
            ),
            "line",
        ),
        (
            text.replace("-----END MESH POLICY DOCUMENT-----\n", ""),
            "truncated",
        ),
        (text[..text.len() / 2].to_string(), "shorter"),
        (text[..text.len() - 20].to_string(), "truncated"),
        (format!("{text}trailing"), "truncated"),
        (
            text.replace("signature: ", "signature: AAAA"),
            "field signature",
        ),
        (
            text.replace("\n-----END", "\nextra\n-----END"),
            "nothing after it",
        ),
    ];
    for (bad, want) in cases {
        let err = PolicyDoc::parse(bad.as_bytes())
            .expect_err(want)
            .to_string();
        assert!(err.contains(want), "want {want:?}, got: {err}");
        assert!(!err.contains('\n'), "one line: {err}");
    }
    assert_eq!(
        PolicyDoc::parse(&[0xff, 0xfe]).unwrap_err(),
        SignedError::NotText
    );
    assert_eq!(PolicyDoc::parse(b"").unwrap_err(), SignedError::Unsigned);
}

#[test]
fn garbage_never_panics() {
    // Every prefix and a few byte flips of a valid document: a typed error or a
    // document, never a panic (the store can hold anything).
    let key = PolicySigningKey::generate();
    let text = sign(&key, 1, POLICY).as_text().as_bytes().to_vec();
    for i in 0..text.len() {
        let _ = PolicyDoc::parse(&text[..i]);
        let mut flipped = text.clone();
        flipped[i] ^= 0x55;
        if let Ok(doc) = PolicyDoc::parse(&flipped) {
            // A flip that still parses must not verify.
            assert!(
                doc.verify(&trust(&[&key]), 0, DefaultAction::Deny, NOW)
                    .is_err(),
                "byte {i}"
            );
        }
    }
}

#[test]
fn sign_refuses_bad_params() {
    let key = PolicySigningKey::generate();
    let t = td("t");
    let params = |version, name| DocParams {
        trust_domain: &t,
        version,
        issued_at: NOW,
        name,
        policy: POLICY,
    };
    assert!(PolicyDoc::sign(&key, &params(0, "p.toml")).is_err());
    assert!(PolicyDoc::sign(&key, &params(1, "")).is_err());
    assert!(PolicyDoc::sign(&key, &params(1, "a\nb")).is_err());
    assert!(PolicyDoc::sign(&key, &params(1, " p.toml")).is_err());
    assert!(PolicyDoc::sign(&key, &params(1, "my policy.toml")).is_ok());
}

#[test]
fn key_files() {
    let key = PolicySigningKey::generate();
    let pem = key.to_pem();
    assert!(pem.starts_with("-----BEGIN MESH POLICY KEY-----\n"));
    let back = PolicySigningKey::from_pem(&pem).unwrap();
    assert_eq!(back.public_key(), key.public_key());
    let public = key.public_key().to_pem();
    assert!(public.starts_with("-----BEGIN MESH POLICY PUBLIC KEY-----\n"));
    assert_eq!(
        PolicyPublicKey::from_pem(&public).unwrap(),
        key.public_key()
    );
    // Neither is taken for the other, nor for a CA key.
    assert!(PolicyPublicKey::from_pem(&pem).is_err());
    assert!(PolicySigningKey::from_pem(&public).is_err());
    let ca_key = crate::cert::CaSigningKey::generate().to_pem();
    assert!(PolicySigningKey::from_pem(&ca_key).is_err());
    assert!(PolicySigningKey::from_pem(
        "-----BEGIN MESH POLICY KEY-----\nAAAA\n-----END MESH POLICY KEY-----"
    )
    .is_err());
    // Debug shows the id, never the seed.
    let dbg = format!("{key:?}");
    assert!(dbg.contains(&key.public_key().id().to_string()));
    assert!(!pem.lines().nth(1).is_some_and(|seed| dbg.contains(seed)));
    // The id is the SHA-256 of the public key: stable across encodings.
    assert_eq!(key.public_key().id(), back.public_key().id());
    assert_ne!(
        key.public_key().id(),
        PolicySigningKey::generate().public_key().id()
    );
}
