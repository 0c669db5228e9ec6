//! Runtime peer changes, persisted in `<state_dir>/peers.json` (written atomically:
//! temp file, fsync, rename), so a restart comes back with the same peers.
//!
//! The effective peer set is `(config peers − removed) ∪ added`, where an added peer
//! replaces a config peer of the same identity. Removing a config peer records its
//! identity in `removed`; adding it back clears that.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use mesh_proto::files;
use serde::{Deserialize, Serialize};

pub const STATE_FILE: &str = "peers.json";
pub const STATE_VERSION: u32 = 1;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerChanges {
    pub version: u32,
    /// Peers added at run time, by certificate.
    pub added: Vec<StoredPeer>,
    /// Identities of config-file peers removed at run time.
    pub removed: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredPeer {
    pub identity: String,
    pub cert: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{}: not a meshd state file: {message} (fix or move it away; meshd will not overwrite it)", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("{0}")]
    Write(#[from] files::FileError),
    #[error("{}: cannot create: {source}", path.display())]
    CreateDir { path: PathBuf, source: io::Error },
}

/// A versioned JSON file in the state directory (peers, workloads, policy): read whole,
/// written atomically (temp file, fsync, rename) with mode 0600, never overwritten
/// when it cannot be read back.
pub trait StateFile: Serialize + serde::de::DeserializeOwned {
    /// File name inside the state directory.
    const FILE: &'static str;
    fn version(&self) -> u32;
}

/// Reads `T`'s file; `None` when there is none yet.
pub fn read<T: StateFile>(state_dir: &Path) -> Result<Option<T>, StateError> {
    let path = state_dir.join(T::FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(StateError::Read { path, source }),
    };
    let value: T = serde_json::from_str(&text).map_err(|e| StateError::Parse {
        path: path.clone(),
        message: e.to_string(),
    })?;
    if value.version() != STATE_VERSION {
        return Err(StateError::Parse {
            path,
            message: format!(
                "version {} (this meshd reads {STATE_VERSION})",
                value.version()
            ),
        });
    }
    Ok(Some(value))
}

/// Writes `value` to its file atomically, creating the state directory if needed.
pub fn write<T: StateFile>(state_dir: &Path, value: &T) -> Result<(), StateError> {
    std::fs::create_dir_all(state_dir).map_err(|source| StateError::CreateDir {
        path: state_dir.to_path_buf(),
        source,
    })?;
    let mut text = serde_json::to_string_pretty(value).unwrap_or_default();
    text.push('\n');
    files::write_atomic(&state_dir.join(T::FILE), text.as_bytes(), 0o600)?;
    Ok(())
}

impl StateFile for PeerChanges {
    const FILE: &'static str = STATE_FILE;
    fn version(&self) -> u32 {
        self.version
    }
}

impl PeerChanges {
    /// Reads the state file; a missing file means "no changes".
    pub fn load(state_dir: &Path) -> Result<PeerChanges, StateError> {
        Ok(read(state_dir)?.unwrap_or(PeerChanges {
            version: STATE_VERSION,
            ..PeerChanges::default()
        }))
    }

    pub fn save(&self, state_dir: &Path) -> Result<(), StateError> {
        write(state_dir, self)
    }

    /// Records an added (or replaced) peer.
    pub fn add(&mut self, peer: StoredPeer) {
        self.removed.retain(|r| *r != peer.identity);
        self.added.retain(|p| p.identity != peer.identity);
        self.added.push(peer);
    }

    /// Records a removal. `from_config`: the identity is a config-file peer.
    pub fn remove(&mut self, identity: &str, from_config: bool) {
        self.added.retain(|p| p.identity != identity);
        if from_config && !self.removed.iter().any(|r| r == identity) {
            self.removed.push(identity.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(id: &str) -> StoredPeer {
        StoredPeer {
            identity: id.into(),
            cert: format!("PEM of {id}"),
            endpoint: None,
        }
    }

    #[test]
    fn add_remove_bookkeeping() {
        let mut c = PeerChanges::default();
        c.add(stored("spiffe://t/b"));
        c.add(stored("spiffe://t/b"));
        assert_eq!(c.added.len(), 1);
        c.remove("spiffe://t/c", true);
        c.remove("spiffe://t/c", true);
        assert_eq!(c.removed, vec!["spiffe://t/c".to_string()]);
        c.add(stored("spiffe://t/c"));
        assert!(c.removed.is_empty());
        c.remove("spiffe://t/b", false);
        assert_eq!(c.added, vec![stored("spiffe://t/c")]);
    }

    #[test]
    fn save_load_round_trip_and_refuse_garbage() {
        let dir = std::env::temp_dir().join(format!("meshd-state-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(PeerChanges::load(&dir).unwrap().added.len(), 0);
        let mut c = PeerChanges::load(&dir).unwrap();
        c.add(stored("spiffe://t/b"));
        c.remove("spiffe://t/x", true);
        c.save(&dir).unwrap();
        assert_eq!(PeerChanges::load(&dir).unwrap(), c);
        std::fs::write(dir.join(STATE_FILE), "{garbage").unwrap();
        let e = PeerChanges::load(&dir).unwrap_err().to_string();
        assert!(e.contains("peers.json: not a meshd state file"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// The policy applied at run time (`meshctl policy apply`), persisted in
/// `<state_dir>/policy.json` so a restart keeps it. It takes precedence over the
/// config's `[policy] file`.
pub const POLICY_FILE: &str = "policy.json";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredPolicy {
    pub version: u32,
    /// The name it was applied under (the operator's file name).
    pub name: String,
    /// The policy file's text, exactly as applied.
    pub source: String,
}

impl StateFile for StoredPolicy {
    const FILE: &'static str = POLICY_FILE;
    fn version(&self) -> u32 {
        self.version
    }
}

impl StoredPolicy {
    pub fn new(name: &str, source: &str) -> StoredPolicy {
        StoredPolicy {
            version: STATE_VERSION,
            name: name.to_string(),
            source: source.to_string(),
        }
    }

    /// Reads the stored policy; a missing file means none was applied.
    pub fn load(state_dir: &Path) -> Result<Option<StoredPolicy>, StateError> {
        read(state_dir)
    }

    /// Writes atomically (temp file, fsync, rename).
    pub fn save(&self, state_dir: &Path) -> Result<(), StateError> {
        write(state_dir, self)
    }
}

#[cfg(test)]
mod policy_tests {
    use super::*;

    #[test]
    fn stored_policy_round_trips_and_refuses_another_version() {
        let dir = std::env::temp_dir().join(format!("meshd-policy-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(StoredPolicy::load(&dir).unwrap(), None);
        let p = StoredPolicy::new("p.toml", "policy = []\n");
        p.save(&dir).unwrap();
        assert_eq!(StoredPolicy::load(&dir).unwrap(), Some(p));
        std::fs::write(
            dir.join(POLICY_FILE),
            r#"{"version":9,"name":"p.toml","source":""}"#,
        )
        .unwrap();
        let e = StoredPolicy::load(&dir).unwrap_err().to_string();
        assert!(
            e.contains("policy.json: not a meshd state file: version 9"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

pub const ENDPOINTS_FILE: &str = "endpoints.json";

/// Where peers were last heard from, for the peers whose address differs from what
/// the configuration (or `peer add`) says: typically peers with no configured
/// endpoint, which call in first. A cache, kept so that a restarted node can reach
/// them before they speak again; losing it loses nothing configured.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LearnedEndpoints {
    pub version: u32,
    pub peers: Vec<LearnedEndpoint>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LearnedEndpoint {
    pub identity: String,
    /// The source address of the peer's last authenticated packet.
    pub endpoint: SocketAddr,
    /// The endpoint configured for the peer when this one was learned. If the
    /// operator has changed it since, the operator's wins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub configured: Option<SocketAddr>,
}

impl StateFile for LearnedEndpoints {
    const FILE: &'static str = ENDPOINTS_FILE;
    fn version(&self) -> u32 {
        self.version
    }
}

impl LearnedEndpoints {
    /// None learned (what a missing file means).
    pub fn empty() -> LearnedEndpoints {
        LearnedEndpoints {
            version: STATE_VERSION,
            peers: Vec::new(),
        }
    }

    /// From `(identity, configured endpoint, current endpoint)` per peer: the peers
    /// whose current endpoint is known and is not the configured one, by identity.
    pub fn from_peers<I: ToString>(
        peers: impl IntoIterator<Item = (I, Option<SocketAddr>, Option<SocketAddr>)>,
    ) -> LearnedEndpoints {
        let mut learned: Vec<LearnedEndpoint> = peers
            .into_iter()
            .filter_map(|(identity, configured, current)| {
                let endpoint = current.filter(|c| Some(*c) != configured)?;
                Some(LearnedEndpoint {
                    identity: identity.to_string(),
                    endpoint,
                    configured,
                })
            })
            .collect();
        learned.sort_by(|a, b| a.identity.cmp(&b.identity));
        learned.dedup_by(|a, b| a.identity == b.identity);
        LearnedEndpoints {
            peers: learned,
            ..LearnedEndpoints::empty()
        }
    }

    /// The endpoint learned for `identity`, if it was learned while the configured
    /// endpoint was the same as `configured` now.
    /// (Sorted by identity, as [`LearnedEndpoints::from_peers`] keeps them; a file
    /// edited out of order only loses its unsorted entries.)
    pub fn usable(&self, identity: &str, configured: Option<SocketAddr>) -> Option<SocketAddr> {
        let i = self
            .peers
            .binary_search_by(|l| l.identity.as_str().cmp(identity))
            .ok()?;
        let l = &self.peers[i];
        (l.configured == configured).then_some(l.endpoint)
    }
}

#[cfg(test)]
mod endpoint_tests {
    use super::*;

    fn ep(s: &str) -> Option<SocketAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn only_endpoints_that_differ_from_the_configuration_are_kept() {
        let l = LearnedEndpoints::from_peers([
            ("spiffe://t/c", None, ep("198.18.0.3:51820")),
            ("spiffe://t/a", None, None),
            (
                "spiffe://t/b",
                ep("198.18.0.2:51820"),
                ep("198.18.0.2:51820"),
            ),
            (
                "spiffe://t/d",
                ep("198.18.0.4:51820"),
                ep("198.18.9.4:40000"),
            ),
            // A second session with the same peer (another local workload).
            ("spiffe://t/c", None, ep("198.18.0.3:51820")),
        ]);
        let ids: Vec<&str> = l.peers.iter().map(|p| p.identity.as_str()).collect();
        assert_eq!(ids, ["spiffe://t/c", "spiffe://t/d"]);
        assert_eq!(l.usable("spiffe://t/c", None), ep("198.18.0.3:51820"));
        assert_eq!(
            l.usable("spiffe://t/d", ep("198.18.0.4:51820")),
            ep("198.18.9.4:40000")
        );
        // The operator has configured another endpoint since: theirs wins.
        assert_eq!(l.usable("spiffe://t/d", ep("198.18.0.5:51820")), None);
        assert_eq!(l.usable("spiffe://t/c", ep("198.18.0.3:51820")), None);
        assert_eq!(l.usable("spiffe://t/a", None), None);
    }

    #[test]
    fn round_trips_through_the_state_directory() {
        let dir = std::env::temp_dir().join(format!("meshd-endpoints-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(read::<LearnedEndpoints>(&dir).unwrap(), None);
        let l =
            LearnedEndpoints::from_peers([("spiffe://t/c", None, ep("[fd00:198:18::3]:51820"))]);
        write(&dir, &l).unwrap();
        assert_eq!(read::<LearnedEndpoints>(&dir).unwrap(), Some(l));
        std::fs::write(dir.join(ENDPOINTS_FILE), "{not json").unwrap();
        assert!(read::<LearnedEndpoints>(&dir).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
