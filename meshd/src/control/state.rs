//! The state directory: what the node changed at run time, so that a restart comes
//! back the same. Runtime peer changes are in `<state_dir>/peers.json`; workloads
//! (`workloads.json`), the applied policy (`policy.json`) and learned endpoints
//! (`endpoints.json`) follow the same rules ([`StateFile`]).
//!
//! The effective peer set is `(config peers − removed) ∪ added`, where an added peer
//! replaces a config peer of the same identity. Removing a config peer records its
//! identity in `removed`; adding it back clears that.
//!
//! A crash can never leave the node unable to start: each file is replaced
//! atomically (temp file, fsync, rename, fsync of the directory), and the copy it
//! replaces stays beside it as `<file>.prev`. A file that is damaged (cut short,
//! garbage: what a disk or an editor, not meshd, leaves) is replaced at start by its
//! previous copy, with an error in the log naming both; meshd moves it aside as
//! `<file>.damaged` when it next writes the file. A file that is whole but wrong (a
//! field this meshd does not know, another version) is refused, as is a damaged one
//! with no usable previous copy: the error names the file and says how to recover.

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
    /// Whole, but not what this meshd reads.
    #[error("{}: not a state file this meshd can use: {message}; meshd will not overwrite it: fix it, or move it away to start without {}, then redo what it held ({})", path.display(), what.0, what.1)]
    Parse {
        path: PathBuf,
        message: String,
        /// What the file holds, and how it is made again ([`StateFile::HOLDS`]).
        what: (&'static str, &'static str),
    },
    /// Cut short or garbage, and no usable previous copy.
    #[error("{}: damaged ({message}), and its previous copy {} is {prev}: move it away to start without {}, then redo what it held ({}); or put a good copy in its place", path.display(), prev_path(path).display(), what.0, what.1)]
    Damaged {
        path: PathBuf,
        message: String,
        /// What is wrong with the previous copy.
        prev: String,
        what: (&'static str, &'static str),
    },
    #[error("{0}")]
    Write(#[from] files::FileError),
    #[error("{}: cannot create: {source}", path.display())]
    CreateDir { path: PathBuf, source: io::Error },
}

/// A versioned JSON file in the state directory (peers, workloads, policy): read whole,
/// written atomically (temp file, fsync, rename, fsync of the directory) with mode
/// 0600, the copy it replaces kept as `<file>.prev`; never overwritten when whole but
/// unreadable to this meshd.
pub trait StateFile: Serialize + serde::de::DeserializeOwned {
    /// File name inside the state directory.
    const FILE: &'static str;
    /// What the file holds, and how it is made again, for the errors about it:
    /// ("the peers added and removed at run time", "meshctl peer add, peer remove").
    const HOLDS: (&'static str, &'static str);
    fn version(&self) -> u32;
}

/// `<file>.prev`: the copy a write replaced.
pub fn prev_path(path: &Path) -> PathBuf {
    with_suffix(path, ".prev")
}

/// `<file>.damaged`: a damaged file, moved aside when meshd next writes the file.
pub fn damaged_path(path: &Path) -> PathBuf {
    with_suffix(path, ".damaged")
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

/// What one copy of a state file holds.
enum Copy<T> {
    Missing,
    Good(T),
    /// Cut short, empty, or not JSON: damage, not a choice anyone made.
    Damaged(String),
    /// Whole JSON, but fields or a version this meshd does not read.
    Wrong(String),
}

fn parse<T: StateFile>(bytes: &[u8]) -> Copy<T> {
    match serde_json::from_slice::<T>(bytes) {
        Ok(v) if v.version() == STATE_VERSION => Copy::Good(v),
        Ok(v) => Copy::Wrong(format!(
            "version {} (this meshd reads {STATE_VERSION})",
            v.version()
        )),
        Err(e) if e.is_eof() || e.is_syntax() => Copy::Damaged(e.to_string()),
        Err(e) => Copy::Wrong(e.to_string()),
    }
}

fn read_copy<T: StateFile>(path: &Path) -> Result<Copy<T>, StateError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(parse(&bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Copy::Missing),
        Err(source) => Err(StateError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Reads `T`'s file; `None` when there is none yet. A damaged file is replaced by
/// its previous copy, with an error logged naming both.
pub fn read<T: StateFile>(state_dir: &Path) -> Result<Option<T>, StateError> {
    let path = state_dir.join(T::FILE);
    let message = match read_copy::<T>(&path)? {
        Copy::Missing => return Ok(None),
        Copy::Good(v) => return Ok(Some(v)),
        Copy::Wrong(message) => {
            return Err(StateError::Parse {
                path,
                message,
                what: T::HOLDS,
            })
        }
        Copy::Damaged(message) => message,
    };
    let prev = prev_path(&path);
    let damaged = |why: &str| StateError::Damaged {
        path: path.clone(),
        message: message.clone(),
        prev: why.to_string(),
        what: T::HOLDS,
    };
    match read_copy::<T>(&prev) {
        Ok(Copy::Good(v)) => {
            tracing::error!(
                "{}: damaged ({message}); using its previous copy {} instead: the last change to {} before the damage may be lost (check, and redo it: {}). meshd replaces the file at its next change and keeps the damaged one as {}",
                path.display(),
                prev.display(),
                T::HOLDS.0,
                T::HOLDS.1,
                damaged_path(&path).display()
            );
            Ok(Some(v))
        }
        Ok(Copy::Missing) => Err(damaged("missing")),
        Ok(Copy::Damaged(m)) => Err(damaged(&format!("damaged too ({m})"))),
        Ok(Copy::Wrong(m)) => Err(damaged(&format!("unusable ({m})"))),
        Err(e) => Err(damaged(&format!("unreadable ({e})"))),
    }
}

/// Writes `value` to its file atomically, creating the state directory if needed;
/// the file it replaces, if good, becomes `<file>.prev`, and if damaged is kept as
/// `<file>.damaged` (the previous good copy stays).
pub fn write<T: StateFile>(state_dir: &Path, value: &T) -> Result<(), StateError> {
    std::fs::create_dir_all(state_dir).map_err(|source| StateError::CreateDir {
        path: state_dir.to_path_buf(),
        source,
    })?;
    let path = state_dir.join(T::FILE);
    let prev = prev_path(&path);
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StateError::Write(files::FileError::Io { path, source })
    };
    match std::fs::read(&path) {
        Ok(bytes) => match parse::<T>(&bytes) {
            // The copy being replaced becomes the previous one: a second name for
            // its bytes (renamed into place, so `.prev` is always whole), or a copy
            // where the file system has no hard links.
            Copy::Good(_) => {
                let tmp = with_suffix(&prev, ".tmp");
                let _ = std::fs::remove_file(&tmp);
                match std::fs::hard_link(&path, &tmp) {
                    Ok(()) => std::fs::rename(&tmp, &prev).map_err(io_err(&prev))?,
                    Err(_) => files::write_atomic(&prev, &bytes, 0o600)?,
                }
            }
            Copy::Damaged(_) | Copy::Wrong(_) => {
                files::write_atomic(&damaged_path(&path), &bytes, 0o600)?;
            }
            Copy::Missing => {}
        },
        // A previous copy of a file someone removed (to start afresh) is stale.
        Err(e) if e.kind() == io::ErrorKind::NotFound => match std::fs::remove_file(&prev) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err(&prev)(e)),
            _ => {}
        },
        Err(e) => return Err(io_err(&path)(e)),
    }
    let mut text = serde_json::to_string_pretty(value).unwrap_or_default();
    text.push('\n');
    // Last: its fsync of the directory also makes the `.prev` rename durable.
    files::write_atomic(&path, text.as_bytes(), 0o600)?;
    Ok(())
}

impl StateFile for PeerChanges {
    const FILE: &'static str = STATE_FILE;
    const HOLDS: (&'static str, &'static str) = (
        "the peers added and removed at run time",
        "meshctl peer add, peer remove",
    );
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
        assert!(
            e.contains("peers.json: damaged (") && e.contains("peers.json.prev is missing"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("meshd-state-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn changes(ids: &[&str]) -> PeerChanges {
        let mut c = PeerChanges {
            version: STATE_VERSION,
            ..PeerChanges::default()
        };
        for id in ids {
            c.add(stored(id));
        }
        c
    }

    /// Issue 26, failure 6: a damaged file (cut short, emptied, garbage) no longer
    /// stops the node: its previous copy is used, and the damaged one is kept aside
    /// at the next write, which never makes the good previous copy a damaged one.
    #[test]
    fn a_damaged_file_gives_way_to_its_previous_copy() {
        let dir = dir("damaged");
        let path = dir.join(STATE_FILE);
        let (one, two) = (
            changes(&["spiffe://t/b"]),
            changes(&["spiffe://t/b", "spiffe://t/c"]),
        );
        one.save(&dir).unwrap();
        assert!(!prev_path(&path).exists(), "nothing before the first write");
        two.save(&dir).unwrap();
        let whole = std::fs::read(&path).unwrap();
        for damage in [
            &whole[..whole.len() / 2],
            b"",
            b"\0\0\0\0",
            b"{\"version\":1,\"added\":[{",
        ] {
            std::fs::write(&path, damage).unwrap();
            // What a crash leaves of a write in progress: a temp file, ignored.
            std::fs::write(dir.join(".peers.json.tmp.1.1"), &whole[..10]).unwrap();
            // The copy before the last change (the last change is lost, and said so).
            assert_eq!(PeerChanges::load(&dir).unwrap(), one, "{damage:?}");
            assert_eq!(
                std::fs::read(&path).unwrap(),
                damage,
                "reading changes nothing"
            );
        }
        // The next write keeps the damaged file aside and the good previous copy.
        let three = changes(&["spiffe://t/d"]);
        three.save(&dir).unwrap();
        assert_eq!(PeerChanges::load(&dir).unwrap(), three);
        assert_eq!(
            std::fs::read(damaged_path(&path)).unwrap(),
            b"{\"version\":1,\"added\":[{"
        );
        assert_eq!(
            read_copy::<PeerChanges>(&prev_path(&path))
                .ok()
                .and_then(|c| match c {
                    Copy::Good(c) => Some(c),
                    _ => None,
                }),
            Some(one)
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Refused, with the file and the way out named: a whole file this meshd cannot
    /// use (even with a good previous copy: someone made it so), and a damaged one
    /// whose previous copy is missing or damaged too.
    #[test]
    fn a_wrong_file_or_one_without_a_usable_copy_is_refused_with_the_way_out() {
        let dir = dir("refused");
        let path = dir.join(STATE_FILE);
        changes(&["spiffe://t/b"]).save(&dir).unwrap();
        changes(&["spiffe://t/c"]).save(&dir).unwrap();
        std::fs::write(&path, r#"{"version":1,"added":[],"removed":[],"extra":1}"#).unwrap();
        let e = PeerChanges::load(&dir).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("{}: not a state file this meshd can use: unknown field `extra`", path.display()))
                && e.contains("meshd will not overwrite it: fix it, or move it away to start without the peers added and removed at run time, then redo what it held (meshctl peer add, peer remove)"),
            "{e}"
        );
        std::fs::write(&path, "{").unwrap();
        std::fs::write(prev_path(&path), "").unwrap();
        let e = PeerChanges::load(&dir).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("{}: damaged (", path.display()))
                && e.contains(&format!(
                    "its previous copy {} is damaged too (",
                    prev_path(&path).display()
                ))
                && e.contains(
                    "move it away to start without the peers added and removed at run time"
                ),
            "{e}"
        );
        // Moved away (both): a fresh start, and the next write leaves no stale copy.
        std::fs::rename(&path, dir.join("aside")).unwrap();
        assert_eq!(PeerChanges::load(&dir).unwrap().added, vec![]);
        changes(&["spiffe://t/e"]).save(&dir).unwrap();
        assert!(
            !prev_path(&path).exists(),
            "a stale previous copy outlived a reset"
        );
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
    const HOLDS: (&'static str, &'static str) = (
        "the policy applied at run time (the config's [policy] file is then in force)",
        "meshctl policy apply",
    );
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
            e.contains(
                "policy.json: not a state file this meshd can use: version 9 (this meshd reads 1)"
            ) && e.contains("then redo what it held (meshctl policy apply)"),
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
    const HOLDS: (&'static str, &'static str) = (
        "the peers' endpoints learned from their packets",
        "nothing to do: a cache, learned again as peers speak",
    );
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
