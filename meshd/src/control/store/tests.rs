use super::*;
use mesh_proto::config::{StoreTls, DEFAULT_LEASE_SECS};

fn config(tls: Option<StoreTls>) -> StoreConfig {
    StoreConfig {
        endpoints: vec!["https://198.18.0.9:2379".into()],
        prefix: None,
        tls,
        policy_keys: Vec::new(),
        lease_secs: DEFAULT_LEASE_SECS,
        advertise: vec!["198.18.0.1:51820".parse().unwrap()],
    }
}

#[test]
fn settings_take_the_default_prefix_and_read_the_tls_files() {
    let dir = std::env::temp_dir().join(format!("meshd-store-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let td = TrustDomain::parse("example.org").unwrap();
    let s = StoreSettings::load(&config(None), &td).unwrap();
    assert_eq!(s.prefix.as_str(), "/meshd/example.org/");
    assert!(s.tls.is_none());
    std::fs::write(dir.join("ca.pem"), b"CA").unwrap();
    std::fs::write(dir.join("c.pem"), b"CERT").unwrap();
    let tls = StoreTls {
        ca: dir.join("ca.pem"),
        client: Some((dir.join("c.pem"), dir.join("missing.pem"))),
    };
    // A missing file is named in the error, before anything starts.
    let err = StoreSettings::load(&config(Some(tls.clone())), &td)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with(&dir.join("missing.pem").display().to_string()),
        "{err}"
    );
    std::fs::write(dir.join("missing.pem"), b"KEY").unwrap();
    let s = StoreSettings::load(&config(Some(tls)), &td).unwrap();
    let t = s.tls.unwrap();
    assert_eq!(t.ca, b"CA");
    assert_eq!(t.client, Some((b"CERT".to_vec(), b"KEY".to_vec())));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// With no store at all, the client starts, reports itself disconnected, and
/// stops at once when asked (it is waiting out its backoff, not blocking).
#[test]
fn an_unreachable_store_is_reported_and_stop_returns() {
    let (tx, rx) = std::sync::mpsc::channel();
    let settings = StoreSettings {
        // Nothing listens on port 1 of loopback: refused at once.
        endpoints: vec!["http://127.0.0.1:1".into()],
        prefix: Prefix::parse("/meshd/t/").unwrap(),
        lease_secs: 2,
        tls: None,
    };
    let node = NodeInfo {
        identity: SpiffeId::parse("spiffe://t/a").unwrap(),
        endpoints: vec!["127.0.0.1:51820".parse().unwrap()],
        meshd_version: "test".into(),
        cert: None,
    };
    let handle = StoreClient::start(settings, node, move |e| {
        let _ = tx.send(e);
    })
    .unwrap();
    let first = rx.recv_timeout(Duration::from_secs(30)).unwrap();
    assert!(
        matches!(first, StoreEvent::Disconnected { .. }),
        "{first:?}"
    );
    let st = handle.status();
    assert!(!st.connected);
    assert!(st.last_error.is_some());
    assert_eq!(st.prefix, "/meshd/t/");
    handle.stop();
    // The sink is gone with the client's thread.
    assert!(rx.recv().is_err());
}
