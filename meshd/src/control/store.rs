//! The fleet store client: keeps a node in step with the store on etcd, off the
//! packet path.
//!
//! It runs on a thread of its own with a current-thread tokio runtime (nothing on the
//! packet path awaits it, DESIGN.md "Runtimes"). It lists the prefix, then watches it
//! from the revision it read, and hands every change to a sink as a typed
//! [`StoreEvent`]; and it keeps this node's endpoint and status under an etcd lease,
//! so that a dead host's entries go when its lease ends.
//!
//! # What the consumer gets
//! - [`StoreEvent::Snapshot`]: everything under the prefix at one revision, first at
//!   start and again after every resync (a watch that etcd cancelled, or whose
//!   revision was compacted while the client was away). The consumer replaces its
//!   view: an entry in neither `entries` nor `ignored` is gone; an entry in `ignored`
//!   keeps its last good value (garbage over a good certificate changes nothing).
//! - [`StoreEvent::Put`] / [`StoreEvent::Deleted`] in revision order, and
//!   [`StoreEvent::Ignored`] for a value that does not decode (also counted and
//!   logged here).
//! - [`StoreEvent::Connected`] / [`StoreEvent::Disconnected`] on each change of state.
//!
//! Nothing is missed: after a lost connection the watch resumes from the last
//! revision seen, and if etcd compacted that revision meanwhile the client lists
//! again (a Snapshot). Decoding checks form only ([`mesh_proto::store::decode`]):
//! verifying certificates against the CA and policy documents against the policy
//! keys is the consumer's work, one call each (`Ca::verify`,
//! `mesh_proto::signed::verify`), because the store is not trusted for identity or
//! policy.
//!
//! # Failure handling
//! An unreachable store (at start or later) is retried with backoff (250 ms doubling
//! to 5 s), logged once per change of state (warn when lost, info when back). Every
//! request has a time limit, and a lease keep-alive that goes unanswered for a lease
//! TTL counts as a lost connection, so a store behind a dead link is noticed within
//! a TTL.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use etcd_client::{
    Client, ConnectOptions, EventType, GetOptions, PutOptions, WatchOptions, WatchStream,
};
use mesh_proto::cert::{Certificate, Fingerprint};
use mesh_proto::config::StoreConfig;
use mesh_proto::identity::{SpiffeId, TrustDomain};
use mesh_proto::store::{
    decode, encode, DecodeError, NodeEndpoint, NodeStatus, Prefix, StoreClientStatus, StoreEntry,
    StoreKey, StoreValue,
};
use tokio::sync::mpsc;

use crate::sys::clock::unix_now;

/// Every request's time limit (a balanced gRPC channel waits, rather than fails, while
/// no endpoint is reachable).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Time limit of one TCP connection attempt.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Entries per page when listing: with etcd's 1.5 MiB value limit, a page stays
/// under [`MAX_MESSAGE`] whatever was written.
const PAGE: i64 = 64;
/// Largest gRPC message accepted (a page of the listing, a batch of watch events).
const MAX_MESSAGE: usize = 128 * 1024 * 1024;

/// What the client needs: `[store]` with the TLS files read.
#[derive(Clone, Debug)]
pub struct StoreSettings {
    pub endpoints: Vec<String>,
    pub prefix: Prefix,
    pub lease_secs: u32,
    pub tls: Option<TlsPem>,
}

/// PEM contents for TLS to etcd.
#[derive(Clone)]
pub struct TlsPem {
    pub ca: Vec<u8>,
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for TlsPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsPem(..)")
    }
}

/// Why the client could not start. Display is one line.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{}: {source}", path.display())]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the store client: {0}")]
    Start(std::io::Error),
}

impl StoreSettings {
    /// The settings `[store]` names, for a node of `trust_domain` (the default
    /// prefix). Reads the TLS files, the only I/O before [`StoreClient::start`].
    pub fn load(
        config: &StoreConfig,
        trust_domain: &TrustDomain,
    ) -> Result<StoreSettings, StoreError> {
        let read = |path: &std::path::Path| {
            std::fs::read(path).map_err(|source| StoreError::Read {
                path: path.to_owned(),
                source,
            })
        };
        let tls = match &config.tls {
            None => None,
            Some(t) => Some(TlsPem {
                ca: read(&t.ca)?,
                client: match &t.client {
                    None => None,
                    Some((c, k)) => Some((read(c)?, read(k)?)),
                },
            }),
        };
        Ok(StoreSettings {
            endpoints: config.endpoints.clone(),
            prefix: config.prefix_for(trust_domain),
            lease_secs: config.lease_secs,
            tls,
        })
    }
}

/// This node, as it appears in the store.
#[derive(Clone, Debug)]
pub struct NodeInfo {
    pub identity: SpiffeId,
    /// Where peers reach its meshd (`[store] advertise`).
    pub endpoints: Vec<SocketAddr>,
    /// `meshd --version`.
    pub meshd_version: String,
    /// The node's own certificate as it is now (it changes with an in-place renewal),
    /// written to `certs/<identity>` whenever it differs from what this client last
    /// wrote or the store holds (not under the lease: a host that is down stays a
    /// peer). Peers verify it against their CA like any certificate.
    pub cert: Option<OwnCert>,
}

/// Reads the node's certificate now; `None` once the node is going away.
#[derive(Clone)]
pub struct OwnCert(pub Arc<dyn Fn() -> Option<Certificate> + Send + Sync>);

impl std::fmt::Debug for OwnCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OwnCert(..)")
    }
}

/// What this node has applied, for its status entry ([`StoreHandle::publish_status`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeReport {
    /// The store policy document version in force; 0 when none from the store.
    pub applied_policy_version: u64,
    /// SHA-256 of the policy text in force, wherever it came from.
    pub policy_digest: Option<Fingerprint>,
}

/// Everything under the prefix at one revision.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub revision: i64,
    pub entries: Vec<StoreEntry>,
    /// Entries present but not decoded (also counted and logged).
    pub ignored: Vec<DecodeError>,
    pub reason: SnapshotReason,
}

/// Why the client listed the prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SnapshotReason {
    /// The first listing.
    Start,
    /// etcd compacted past the revision the watch was to resume from.
    Compacted { compact_revision: i64 },
    /// etcd cancelled the watch.
    Cancelled { reason: String },
}

/// What the store client reports to its consumer, in order.
#[derive(Clone, Debug)]
pub enum StoreEvent {
    /// The store is reachable again (or for the first time), at `revision`.
    Connected {
        revision: i64,
    },
    /// The store became unreachable; the client retries with backoff and the
    /// consumer keeps what it has.
    Disconnected {
        error: String,
    },
    Snapshot(Snapshot),
    Put {
        revision: i64,
        entry: Box<StoreEntry>,
    },
    Deleted {
        revision: i64,
        key: StoreKey,
    },
    Ignored {
        revision: i64,
        error: DecodeError,
    },
}

/// The store client. [`StoreClient::start`] is its one entry point.
pub struct StoreClient;

enum Command {
    PublishStatus(NodeReport),
    Stop,
}

struct Shared {
    status: Mutex<StoreClientStatus>,
}

fn lock(m: &Mutex<StoreClientStatus>) -> MutexGuard<'_, StoreClientStatus> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running store client. Dropping it stops the client as [`StoreHandle::stop`] does.
pub struct StoreHandle {
    shared: Arc<Shared>,
    commands: mpsc::UnboundedSender<Command>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StoreClient {
    /// Starts the client on a thread of its own (named `store`) and returns at once;
    /// the store need not be reachable. `sink` is called on that thread for every
    /// event, in order; it should not block for long (apply, or forward to a channel).
    pub fn start(
        settings: StoreSettings,
        node: NodeInfo,
        sink: impl FnMut(StoreEvent) + Send + 'static,
    ) -> Result<StoreHandle, StoreError> {
        let shared = Arc::new(Shared {
            status: Mutex::new(StoreClientStatus {
                endpoints: settings.endpoints.clone(),
                prefix: settings.prefix.to_string(),
                since: unix_now(),
                ..StoreClientStatus::default()
            }),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(StoreError::Start)?;
        let mut ctx = Ctx {
            settings,
            node,
            sink: Box::new(sink),
            shared: shared.clone(),
            commands: rx,
            seen: None,
            report: NodeReport::default(),
            lost: None,
            cert_published: None,
        };
        #[allow(clippy::disallowed_methods)] // I/O shell: the store client's own thread
        let thread = std::thread::Builder::new()
            .name("store".into())
            .spawn(move || runtime.block_on(ctx.run()))
            .map_err(StoreError::Start)?;
        Ok(StoreHandle {
            shared,
            commands: tx,
            thread: Some(thread),
        })
    }
}

/// Sends this node's status entry from elsewhere (the event sink).
#[derive(Clone)]
pub struct StatusPublisher(mpsc::UnboundedSender<Command>);

impl StatusPublisher {
    /// As [`StoreHandle::publish_status`].
    pub fn publish(&self, report: NodeReport) {
        let _ = self.0.send(Command::PublishStatus(report));
    }
}

impl StoreHandle {
    pub fn publisher(&self) -> StatusPublisher {
        StatusPublisher(self.commands.clone())
    }

    /// Reads [`StoreHandle::status`] from elsewhere (the control socket).
    pub fn status_reader(&self) -> impl Fn() -> StoreClientStatus + Send + Sync + 'static {
        let shared = self.shared.clone();
        move || lock(&shared.status).clone()
    }

    /// The client's state now: connected or not and since when, revision seen,
    /// entries ignored by reason.
    pub fn status(&self) -> StoreClientStatus {
        lock(&self.shared.status).clone()
    }

    /// Writes this node's status entry (now if connected, else on reconnecting).
    /// Call it when what the node applied changes, not for every event: each write
    /// is an event every node sees.
    pub fn publish_status(&self, report: NodeReport) {
        let _ = self.commands.send(Command::PublishStatus(report));
    }

    /// Stops the client: revokes its lease (the node's entries go at once) if the
    /// store answers within a few seconds, and joins its thread.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let _ = self.commands.send(Command::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for StoreHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Why a session ended.
enum End {
    /// Asked to stop.
    Stopped,
    /// Lost the store; retry.
    Lost(String),
}

fn lost(what: &str) -> impl FnOnce(etcd_client::Error) -> End + '_ {
    move |e| End::Lost(format!("{what}: {e}"))
}

/// Runs `f` under [`REQUEST_TIMEOUT`].
async fn timed<T>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, End> {
    match tokio::time::timeout(REQUEST_TIMEOUT, f).await {
        Ok(r) => r.map_err(lost(what)),
        Err(_) => Err(End::Lost(format!(
            "{what}: no answer within {} s",
            REQUEST_TIMEOUT.as_secs()
        ))),
    }
}

struct Ctx {
    settings: StoreSettings,
    node: NodeInfo,
    sink: Box<dyn FnMut(StoreEvent) + Send>,
    shared: Arc<Shared>,
    commands: mpsc::UnboundedReceiver<Command>,
    /// The last revision whose events were all delivered (`None`: never listed).
    seen: Option<i64>,
    report: NodeReport,
    /// `Some(error)` while the store is unreachable (logged once per change).
    lost: Option<String>,
    /// The node's certificate this session wrote or found in the store.
    cert_published: Option<Fingerprint>,
}

impl Ctx {
    async fn run(&mut self) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let error = match self.session().await {
                End::Stopped => return,
                End::Lost(e) => e,
            };
            if self.mark_lost(&error) {
                backoff = BACKOFF_MIN;
            }
            let wake = tokio::time::sleep(backoff);
            tokio::pin!(wake);
            loop {
                tokio::select! {
                    _ = &mut wake => break,
                    cmd = self.commands.recv() => match cmd {
                        None | Some(Command::Stop) => return,
                        Some(Command::PublishStatus(r)) => self.report = r,
                    },
                }
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Records a lost store; true on the change from connected (or starting).
    fn mark_lost(&mut self, error: &str) -> bool {
        let first = self.lost.is_none();
        {
            let mut st = lock(&self.shared.status);
            if first || st.connected {
                st.since = unix_now();
            }
            st.connected = false;
            st.last_error = Some(error.to_string());
        }
        if first {
            tracing::warn!(
                endpoints = %self.settings.endpoints.join(","),
                error,
                "store unreachable; retrying with backoff (enforcing what was applied)"
            );
            (self.sink)(StoreEvent::Disconnected {
                error: error.to_string(),
            });
        } else {
            tracing::debug!(error, "store still unreachable");
        }
        self.lost = Some(error.to_string());
        first
    }

    fn mark_connected(&mut self, revision: i64) {
        let first = {
            let mut st = lock(&self.shared.status);
            let first = !st.connected && st.last_error.is_none();
            st.connected = true;
            st.since = unix_now();
            st.revision = revision;
            first
        };
        if self.lost.take().is_some() || first {
            tracing::info!(
                endpoints = %self.settings.endpoints.join(","),
                prefix = %self.settings.prefix,
                revision,
                "store connected"
            );
        }
        (self.sink)(StoreEvent::Connected { revision });
    }

    async fn connect(&self) -> Result<Client, End> {
        let mut options = ConnectOptions::new().with_connect_timeout(CONNECT_TIMEOUT);
        if let Some(tls) = &self.settings.tls {
            let mut t = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(&tls.ca));
            if let Some((cert, key)) = &tls.client {
                t = t.identity(etcd_client::Identity::from_pem(cert, key));
            }
            options = options.with_tls(t);
        }
        timed(
            "connecting",
            Client::connect(&self.settings.endpoints, Some(options)),
        )
        .await
    }

    /// One connection: lease and node entries, then list (or resume) and watch until
    /// the store is lost or the client is stopped.
    async fn session(&mut self) -> End {
        let mut client = match self.connect().await {
            Ok(c) => c,
            Err(e) => return e,
        };
        match self.serve(&mut client).await {
            Ok(()) => End::Stopped,
            Err(e) => e,
        }
    }

    async fn serve(&mut self, client: &mut Client) -> Result<(), End> {
        let ttl = i64::from(self.settings.lease_secs);
        let lease = timed("granting a lease", client.lease_grant(ttl, None))
            .await?
            .id();
        self.put_endpoint(client, lease).await?;
        self.cert_published = None;
        self.put_cert(client).await?;
        self.put_status(client, lease).await?;
        let (mut keeper, mut answers) =
            timed("keeping the lease alive", client.lease_keep_alive(lease)).await?;
        let tick = Duration::from_millis((ttl as u64 * 1000 / 3).max(200));
        let mut ticker = tokio::time::interval(tick);
        let mut last_answer = tokio::time::Instant::now();

        // Resume from the last revision seen, or list.
        let mut rev = match self.seen {
            Some(rev) => rev,
            None => self.list(client, SnapshotReason::Start).await?,
        };
        let mut connected = false;
        loop {
            let mut watch = self.watch(client, rev + 1).await?;
            if !connected {
                self.mark_connected(rev);
                connected = true;
            }
            let reason = loop {
                tokio::select! {
                    cmd = self.commands.recv() => match cmd {
                        None | Some(Command::Stop) => {
                            // Best effort: the node's entries go now rather than at the TTL.
                            let revoke = client.lease_revoke(lease);
                            let _ = tokio::time::timeout(Duration::from_secs(2), revoke).await;
                            return Ok(());
                        }
                        Some(Command::PublishStatus(r)) => {
                            self.report = r;
                            self.put_status(client, lease).await?;
                        }
                    },
                    _ = ticker.tick() => {
                        if last_answer.elapsed() > Duration::from_secs(ttl as u64) {
                            return Err(End::Lost(format!(
                                "no answer to the lease keep-alive for {ttl} s"
                            )));
                        }
                        timed("keeping the lease alive", keeper.keep_alive()).await?;
                        // A renewed certificate goes out within a tick.
                        self.put_cert(client).await?;
                    }
                    answer = answers.message() => {
                        match answer.map_err(lost("keeping the lease alive"))? {
                            None => return Err(End::Lost("the lease keep-alive stream ended".into())),
                            Some(a) if a.ttl() <= 0 => {
                                return Err(End::Lost("the node's lease expired".into()))
                            }
                            Some(_) => last_answer = tokio::time::Instant::now(),
                        }
                    }
                    msg = watch.message() => {
                        let Some(resp) = msg.map_err(lost("watching"))? else {
                            return Err(End::Lost("the watch stream ended".into()));
                        };
                        // etcd: a watch whose start revision was compacted is cancelled
                        // with compact_revision set; the client must list again.
                        if resp.compact_revision() > 0 {
                            break SnapshotReason::Compacted {
                                compact_revision: resp.compact_revision(),
                            };
                        }
                        if resp.canceled() {
                            break SnapshotReason::Cancelled {
                                reason: resp.cancel_reason().to_string(),
                            };
                        }
                        for ev in resp.events() {
                            self.event(ev);
                        }
                    }
                }
            };
            tracing::warn!(?reason, "store watch ended; listing the prefix again");
            drop(watch);
            rev = self.list(client, reason).await?;
        }
    }

    async fn watch(&self, client: &mut Client, from: i64) -> Result<WatchStream, End> {
        let options = WatchOptions::new().with_prefix().with_start_revision(from);
        let mut watcher = client.watch_client().max_decoding_message_size(MAX_MESSAGE);
        timed(
            "watching",
            watcher.watch(self.settings.prefix.as_str(), Some(options)),
        )
        .await
    }

    /// Lists the prefix at one revision, page by page, and hands the consumer a
    /// snapshot. Returns the revision.
    async fn list(&mut self, client: &mut Client, reason: SnapshotReason) -> Result<i64, End> {
        let prefix = self.settings.prefix.as_str();
        // The end of the prefix range: the prefix with its last byte incremented
        // (it ends in '/', so no carry).
        let mut end = prefix.as_bytes().to_vec();
        if let Some(last) = end.last_mut() {
            *last += 1;
        }
        let mut kv = client.kv_client().max_decoding_message_size(MAX_MESSAGE);
        let mut from = prefix.as_bytes().to_vec();
        let mut revision = 0;
        let mut entries = Vec::new();
        let mut ignored = Vec::new();
        loop {
            let mut options = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            if revision > 0 {
                options = options.with_revision(revision);
            }
            let mut resp = timed("listing", kv.get(from.clone(), Some(options))).await?;
            if revision == 0 {
                revision = resp.header().map_or(0, |h| h.revision());
            }
            let more = resp.more();
            let kvs = resp.take_kvs();
            let Some(last) = kvs.last() else { break };
            from = last.key().to_vec();
            from.push(0);
            for kv in &kvs {
                match decode(&self.settings.prefix, kv.key(), kv.value()) {
                    Ok(e) => entries.push(e),
                    Err(e) => {
                        self.count_ignored(&e);
                        ignored.push(e);
                    }
                }
            }
            if !more {
                break;
            }
        }
        {
            let mut st = lock(&self.shared.status);
            st.snapshots += 1;
            st.revision = revision;
        }
        tracing::info!(
            revision,
            entries = entries.len(),
            ignored = ignored.len(),
            ?reason,
            "store listed"
        );
        self.seen = Some(revision);
        (self.sink)(StoreEvent::Snapshot(Snapshot {
            revision,
            entries,
            ignored,
            reason,
        }));
        Ok(revision)
    }

    fn count_ignored(&self, e: &DecodeError) {
        tracing::warn!(key = %e.key_text, reason = %e.reason, detail = %e.detail, "store entry ignored");
        let mut st = lock(&self.shared.status);
        *st.ignored.entry(e.reason.name().to_string()).or_insert(0) += 1;
    }

    /// One watch event, decoded and handed on.
    fn event(&mut self, ev: &etcd_client::Event) {
        let Some(kv) = ev.kv() else { return };
        let revision = kv.mod_revision();
        let out = match ev.event_type() {
            EventType::Put => match decode(&self.settings.prefix, kv.key(), kv.value()) {
                Ok(entry) => Some(StoreEvent::Put {
                    revision,
                    entry: Box::new(entry),
                }),
                Err(error) => {
                    self.count_ignored(&error);
                    Some(StoreEvent::Ignored { revision, error })
                }
            },
            // A garbage key that goes away needs no word.
            EventType::Delete => self
                .settings
                .prefix
                .parse_key(kv.key())
                .ok()
                .map(|key| StoreEvent::Deleted { revision, key }),
        };
        self.seen = Some(self.seen.map_or(revision, |s| s.max(revision)));
        lock(&self.shared.status).revision = self.seen.unwrap_or(revision);
        if let Some(out) = out {
            (self.sink)(out);
        }
    }

    async fn put_endpoint(&self, client: &mut Client, lease: i64) -> Result<(), End> {
        let key = self
            .settings
            .prefix
            .key(&StoreKey::NodeEndpoint(self.node.identity.clone()));
        let value = encode(&StoreValue::Endpoint(NodeEndpoint {
            endpoints: self.node.endpoints.clone(),
        }));
        let options = PutOptions::new().with_lease(lease);
        timed(
            "writing the node's endpoint",
            client.put(key, value, Some(options)),
        )
        .await?;
        Ok(())
    }

    async fn put_cert(&mut self, client: &mut Client) -> Result<(), End> {
        let Some(cert) = self.node.cert.as_ref().and_then(|c| (c.0)()) else {
            return Ok(());
        };
        let fingerprint = cert.fingerprint();
        if self.cert_published == Some(fingerprint) {
            return Ok(());
        }
        let key = self
            .settings
            .prefix
            .key(&StoreKey::Cert(self.node.identity.clone()));
        let value = encode(&StoreValue::Cert(cert.clone()));
        let got = timed(
            "reading the node's certificate",
            client.get(key.clone(), None),
        )
        .await?;
        if got.kvs().first().map(|kv| kv.value()) != Some(value.as_slice()) {
            timed(
                "writing the node's certificate",
                client.put(key, value, None),
            )
            .await?;
            tracing::info!(%fingerprint, "store: this node's certificate published");
        }
        self.cert_published = Some(fingerprint);
        Ok(())
    }

    async fn put_status(&self, client: &mut Client, lease: i64) -> Result<(), End> {
        let key = self
            .settings
            .prefix
            .key(&StoreKey::NodeStatus(self.node.identity.clone()));
        let value = encode(&StoreValue::Status(NodeStatus {
            applied_policy_version: self.report.applied_policy_version,
            policy_digest: self.report.policy_digest,
            store_revision: self.seen.unwrap_or(0),
            meshd_version: self.node.meshd_version.clone(),
            updated_at: unix_now(),
        }));
        let options = PutOptions::new().with_lease(lease);
        timed(
            "writing the node's status",
            client.put(key, value, Some(options)),
        )
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
