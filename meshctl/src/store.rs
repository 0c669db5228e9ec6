//! Commands against the fleet store (etcd): `policy publish|history|rollback`,
//! `peer publish` (`fleet status|diff` are in `fleet.rs`), and `policy key gen`, which makes the key
//! they sign with. The layout is `mesh_proto::store`'s; documents are
//! `mesh_proto::signed`'s. meshctl runs its own current-thread tokio runtime for the
//! etcd client; every request has a time limit.
//!
//! Publishing is a compare-and-swap: the new document and its history entry are
//! written in one etcd transaction that succeeds only if `policy/current` is still
//! the document the new version was based on, so two operators cannot silently
//! overwrite each other.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, Txn, TxnOp};
use mesh_proto::cert::Fingerprint;
use mesh_proto::files;
use mesh_proto::identity::TrustDomain;
use mesh_proto::policy::{self, DefaultAction};
use mesh_proto::signed::{DocParams, PolicyDoc, PolicySigningKey, PolicyTrust};
use mesh_proto::store::{decode, Prefix, StoreKey, StoreValue};
use serde::Serialize;

use crate::Global;

/// Every etcd request's time limit.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the store is and how to reach it (global options).
#[derive(Args, Debug, Clone)]
pub struct StoreArgs {
    /// etcd endpoint(s) of the fleet store, comma-separated (http://HOST:PORT)
    #[arg(
        long = "store",
        global = true,
        env = "MESHCTL_STORE",
        value_name = "URL"
    )]
    pub endpoints: Option<String>,
    /// Key prefix in the store (default /meshd/<trust domain>/)
    #[arg(
        long = "store-prefix",
        global = true,
        env = "MESHCTL_STORE_PREFIX",
        value_name = "PREFIX"
    )]
    pub prefix: Option<String>,
    /// The mesh's trust domain (for the default prefix and policy documents)
    #[arg(long, global = true, env = "MESHCTL_TRUST_DOMAIN", value_name = "NAME")]
    pub trust_domain: Option<TrustDomain>,
    /// CA certificate (PEM) of etcd's server certificate, for https:// endpoints
    #[arg(
        long = "store-ca",
        global = true,
        env = "MESHCTL_STORE_CA",
        value_name = "PEM"
    )]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd, with --store-key
    #[arg(
        long = "store-cert",
        global = true,
        env = "MESHCTL_STORE_CERT",
        value_name = "PEM"
    )]
    pub tls_cert: Option<PathBuf>,
    /// Client key (PEM) for etcd, with --store-cert
    #[arg(
        long = "store-key",
        global = true,
        env = "MESHCTL_STORE_KEY",
        value_name = "PEM"
    )]
    pub tls_key: Option<PathBuf>,
}

/// `meshctl policy key ...`.
#[derive(Subcommand, Debug)]
pub enum KeyCommand {
    /// Generate a policy signing key (ed25519): KEY (mode 0600) and, beside it, its
    /// public key with the extension .pub, which meshd.toml's [store] policy_keys names
    #[command(after_help = "Examples:
  meshctl policy key gen --out policy.key    # writes policy.key and policy.pub")]
    Gen {
        #[arg(long, value_name = "KEY")]
        out: PathBuf,
        /// Replace existing files
        #[arg(long)]
        force: bool,
    },
}

pub fn key(cmd: KeyCommand, g: &Global) -> Result<()> {
    let KeyCommand::Gen { out, force } = cmd;
    let public = out.with_extension("pub");
    if public == out {
        bail!(
            "{}: name the key file with an extension other than .pub (e.g. policy.key)",
            out.display()
        );
    }
    crate::cert::check_new(&out, force)?;
    crate::cert::check_new(&public, force)?;
    let key = PolicySigningKey::generate();
    files::write_policy_key(&out, &key)?;
    files::write_policy_public_key(&public, &key.public_key())?;
    let id = key.public_key().id();
    if g.json {
        crate::print_json(&serde_json::json!({
            "key_file": out, "public_file": public, "key_id": id,
        }))
    } else {
        println!(
            "policy key {id}: {} (private, mode 0600), {} (public: list it in meshd.toml [store] policy_keys)",
            out.display(),
            public.display()
        );
        Ok(())
    }
}

/// A connection to the store with the prefix in force.
pub(crate) struct Store {
    client: Client,
    pub(crate) prefix: Prefix,
    endpoints: String,
    runtime: tokio::runtime::Runtime,
}

impl StoreArgs {
    /// The trust domain: `--trust-domain`, else `fallback` (e.g. from `--ca`).
    fn trust_domain(&self, fallback: Option<&TrustDomain>) -> Result<TrustDomain> {
        self.trust_domain
            .clone()
            .or_else(|| fallback.cloned())
            .ok_or_else(|| {
                anyhow!("no trust domain: pass --trust-domain NAME or set MESHCTL_TRUST_DOMAIN")
            })
    }

    fn prefix(&self, td: Option<&TrustDomain>) -> Result<Prefix> {
        match (&self.prefix, td.or(self.trust_domain.as_ref())) {
            (Some(p), _) => Prefix::parse(p).map_err(|e| anyhow!("--store-prefix: {e}")),
            (None, Some(td)) => Ok(Prefix::for_trust_domain(td)),
            (None, None) => bail!(
                "no store prefix: pass --trust-domain NAME (the prefix is /meshd/<trust domain>/) or --store-prefix"
            ),
        }
    }

    /// Connects to the store (`td`: a trust domain known from the command's files).
    pub(crate) fn connect(&self, td: Option<&TrustDomain>) -> Result<Store> {
        let endpoints = self
            .endpoints
            .clone()
            .ok_or_else(|| anyhow!("no fleet store: pass --store URL or set MESHCTL_STORE"))?;
        let list: Vec<String> = endpoints.split(',').map(|s| s.trim().to_string()).collect();
        for e in &list {
            mesh_proto::config::check_store_endpoint(e).map_err(|m| anyhow!("--store: {m}"))?;
        }
        let prefix = self.prefix(td)?;
        let mut options = ConnectOptions::new().with_connect_timeout(Duration::from_secs(5));
        if let Some(ca) = &self.tls_ca {
            let read = |p: &Path| std::fs::read(p).with_context(|| p.display().to_string());
            let mut tls = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(read(ca)?));
            match (&self.tls_cert, &self.tls_key) {
                (Some(c), Some(k)) => {
                    tls = tls.identity(etcd_client::Identity::from_pem(read(c)?, read(k)?));
                }
                (None, None) => {}
                _ => bail!("--store-cert and --store-key go together"),
            }
            options = options.with_tls(tls);
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the runtime for the etcd client")?;
        let client = runtime
            .block_on(timed(&endpoints, Client::connect(&list, Some(options))))
            .with_context(|| format!("cannot reach the fleet store at {endpoints}"))?;
        Ok(Store {
            client,
            prefix,
            endpoints,
            runtime,
        })
    }
}

/// Runs one etcd request under [`REQUEST_TIMEOUT`].
async fn timed<T>(
    endpoints: &str,
    f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T> {
    match tokio::time::timeout(REQUEST_TIMEOUT, f).await {
        Ok(r) => r.map_err(|e| anyhow!("fleet store at {endpoints}: {e}")),
        Err(_) => bail!(
            "fleet store at {endpoints}: no answer within {} s",
            REQUEST_TIMEOUT.as_secs()
        ),
    }
}

/// A key's value with its revisions.
pub(crate) struct Read {
    pub(crate) value: Vec<u8>,
    pub(crate) mod_revision: i64,
    pub(crate) lease: i64,
}

impl Store {
    pub(crate) fn get(&mut self, key: &StoreKey) -> Result<Option<Read>> {
        let k = self.prefix.key(key);
        let (client, endpoints) = (&mut self.client, &self.endpoints);
        let resp = self
            .runtime
            .block_on(timed(endpoints, client.get(k, None)))?;
        Ok(resp.kvs().first().map(|kv| Read {
            value: kv.value().to_vec(),
            mod_revision: kv.mod_revision(),
            lease: kv.lease(),
        }))
    }

    /// Every key/value under `prefix` (in key order).
    pub(crate) fn list(&mut self, prefix: &str) -> Result<Vec<(Vec<u8>, Read)>> {
        let (client, endpoints) = (&mut self.client, &self.endpoints);
        let resp = self.runtime.block_on(timed(
            endpoints,
            client.get(prefix, Some(GetOptions::new().with_prefix())),
        ))?;
        Ok(resp
            .kvs()
            .iter()
            .map(|kv| {
                (
                    kv.key().to_vec(),
                    Read {
                        value: kv.value().to_vec(),
                        mod_revision: kv.mod_revision(),
                        lease: kv.lease(),
                    },
                )
            })
            .collect())
    }

    fn put(&mut self, key: &StoreKey, value: Vec<u8>) -> Result<()> {
        let k = self.prefix.key(key);
        let (client, endpoints) = (&mut self.client, &self.endpoints);
        self.runtime
            .block_on(timed(endpoints, client.put(k, value, None)))?;
        Ok(())
    }

    /// Seconds left of `lease` (0: gone).
    pub(crate) fn lease_ttl(&mut self, lease: i64) -> Result<i64> {
        let (client, endpoints) = (&mut self.client, &self.endpoints);
        let resp = self
            .runtime
            .block_on(timed(endpoints, client.lease_time_to_live(lease, None)))?;
        Ok(resp.ttl().max(0))
    }

    /// The current document: its parsed form and the revision it was written at;
    /// `None` when nothing was published.
    fn current(&mut self) -> Result<Option<(PolicyDoc, i64)>> {
        let Some(read) = self.get(&StoreKey::Policy)? else {
            return Ok(None);
        };
        let doc = PolicyDoc::parse(&read.value).map_err(|e| {
            anyhow!(
                "{} holds no readable policy document ({e}); fix or delete it (etcdctl del {}) before publishing",
                self.prefix.key(&StoreKey::Policy),
                self.prefix.key(&StoreKey::Policy)
            )
        })?;
        Ok(Some((doc, read.mod_revision)))
    }

    /// Writes `doc` as the current document and its history entry, if the current
    /// document is still the one written at `base` (0: none). On a conflict, says
    /// who published meanwhile and writes nothing.
    fn publish(&mut self, doc: &PolicyDoc, base: i64) -> Result<()> {
        let current = self.prefix.key(&StoreKey::Policy);
        let history = self.prefix.key(&StoreKey::PolicyHistory(doc.version()));
        let guard = if base == 0 {
            Compare::create_revision(current.clone(), CompareOp::Equal, 0)
        } else {
            Compare::mod_revision(current.clone(), CompareOp::Equal, base)
        };
        let txn = Txn::new()
            .when([
                guard,
                Compare::create_revision(history.clone(), CompareOp::Equal, 0),
            ])
            .and_then([
                TxnOp::put(current.clone(), doc.as_text(), None),
                TxnOp::put(history, doc.as_text(), None),
            ]);
        let (client, endpoints) = (&mut self.client, &self.endpoints);
        let resp = self.runtime.block_on(timed(endpoints, client.txn(txn)))?;
        if resp.succeeded() {
            return Ok(());
        }
        let now = match self.current() {
            Ok(Some((d, rev))) if rev == base => bail!(
                "{} exists although the current document is still version {}: it was written outside meshctl; nothing written. Remove it (etcdctl del) if it is not yours",
                self.prefix.key(&StoreKey::PolicyHistory(doc.version())),
                d.version()
            ),
            Ok(Some((d, _))) => format!(
                "version {} (signed by key {}, issued {})",
                d.version(),
                short(&d.signer()),
                d.issued_at()
            ),
            Ok(None) => "a change (the current document was deleted)".to_string(),
            Err(e) => format!("a change ({e})"),
        };
        bail!(
            "conflict: someone else published {now} after version {} was read; nothing written. Review it (meshctl policy history) and publish again",
            doc.version() - 1
        )
    }
}

/// The first 16 hex digits of a key id, as tables show it.
fn short(id: &Fingerprint) -> String {
    id.to_string()[..16].to_string()
}

/// Reads, checks and tests a policy file as `meshctl policy test` does; refuses one
/// whose tests fail. Returns its text.
fn checked_policy(file: &Path, default: DefaultAction, quiet: bool) -> Result<String> {
    let source = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read policy file {}", file.display()))?;
    test_source(&file.display().to_string(), &source, default, quiet)?;
    Ok(source)
}

fn test_source(
    name: &str,
    source: &str,
    default: DefaultAction,
    quiet: bool,
) -> Result<policy::Loaded> {
    let loaded = policy::load(name, source, default)?;
    if !quiet {
        for w in &loaded.warnings {
            eprintln!("{w}");
        }
    }
    if let Some(summary) = loaded.failure_summary() {
        bail!("{summary}; nothing published");
    }
    Ok(loaded)
}

fn file_name(file: &Path) -> String {
    file.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| file.display().to_string())
}

/// `meshctl policy publish FILE --key KEY`.
pub fn publish(
    s: &StoreArgs,
    file: &Path,
    key: &Path,
    default: DefaultAction,
    expect: Option<u64>,
    g: &Global,
) -> Result<()> {
    let td = s.trust_domain(None)?;
    let key = files::read_policy_key(key)?;
    let source = checked_policy(file, default, g.json)?;
    let mut store = s.connect(Some(&td))?;
    let (base_version, base_rev) = match expect {
        // The version the operator reviewed: its history entry was written in the same
        // transaction as the current document then, so it carries that revision.
        Some(0) => (0, 0),
        Some(v) => {
            let read = store
                .get(&StoreKey::PolicyHistory(v))?
                .ok_or_else(|| anyhow!("--expect-version {v}: no such version in the history"))?;
            (v, read.mod_revision)
        }
        None => match store.current()? {
            Some((doc, rev)) => (doc.version(), rev),
            None => (0, 0),
        },
    };
    let version = base_version
        .checked_add(1)
        .ok_or_else(|| anyhow!("the current policy version is the largest possible"))?;
    let doc = PolicyDoc::sign(
        &key,
        &DocParams {
            trust_domain: &td,
            version,
            issued_at: crate::now(),
            name: &file_name(file),
            policy: &source,
        },
    )?;
    store.publish(&doc, base_rev)?;
    report_published(&doc, &store.prefix, None, g)
}

fn report_published(doc: &PolicyDoc, prefix: &Prefix, from: Option<u64>, g: &Global) -> Result<()> {
    if g.json {
        crate::print_json(&serde_json::json!({
            "version": doc.version(),
            "name": doc.name(),
            "signer": doc.signer(),
            "issued_at": doc.issued_at(),
            "policy_digest": doc.policy_digest(),
            "key": prefix.key(&StoreKey::Policy),
            "rollback_of": from,
        }))
    } else {
        match from {
            Some(n) => println!(
                "published policy version {} ({}): the content of version {n}, signed by key {}",
                doc.version(),
                doc.name(),
                short(&doc.signer())
            ),
            None => println!(
                "published policy version {} ({}), signed by key {}",
                doc.version(),
                doc.name(),
                short(&doc.signer())
            ),
        }
        Ok(())
    }
}

/// One line of `meshctl policy history`.
#[derive(Serialize)]
struct HistoryEntry {
    version: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    issued_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    signer: Option<Fingerprint>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    policy_digest: Option<Fingerprint>,
    policy_bytes: usize,
    current: bool,
    /// `ok`, or why the signature is not trusted (only with --trust).
    #[serde(skip_serializing_if = "Option::is_none")]
    signature: Option<String>,
    /// Why the entry is unreadable.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

fn trust_from(
    td: &TrustDomain,
    keys: &[PathBuf],
    signing: Option<&PolicySigningKey>,
) -> Result<PolicyTrust> {
    let mut list = Vec::new();
    for k in keys {
        list.push(files::read_policy_public_key(k)?);
    }
    if let Some(s) = signing {
        list.push(s.public_key());
    }
    Ok(PolicyTrust {
        trust_domain: td.clone(),
        keys: list,
    })
}

/// `meshctl policy history [VERSION]`.
pub fn history(s: &StoreArgs, version: Option<u64>, trust: &[PathBuf], g: &Global) -> Result<()> {
    let td = s.trust_domain(None).ok();
    let mut store = s.connect(td.as_ref())?;
    if let Some(v) = version {
        let read = store
            .get(&StoreKey::PolicyHistory(v))?
            .ok_or_else(|| anyhow!("no policy version {v} in the history"))?;
        let doc = PolicyDoc::parse(&read.value).map_err(|e| anyhow!("policy version {v}: {e}"))?;
        if !trust.is_empty() {
            let td = s.trust_domain(None)?;
            doc.check_signature(&trust_from(&td, trust, None)?)
                .map_err(|e| anyhow!("policy version {v}: {e}"))?;
        }
        if g.json {
            return crate::print_json(&serde_json::json!({
                "version": doc.version(), "name": doc.name(), "policy": doc.policy(),
            }));
        }
        print!("{}", doc.policy());
        return Ok(());
    }
    let trust = match (&td, trust.is_empty()) {
        (_, true) => None,
        (Some(td), false) => Some(trust_from(td, trust, None)?),
        (None, false) => bail!("--trust needs the trust domain: pass --trust-domain NAME"),
    };
    let current = store.get(&StoreKey::Policy)?.map(|r| r.value);
    let prefix = store.prefix.clone();
    let mut entries = Vec::new();
    for (k, read) in store.list(&prefix.policy_history())? {
        let entry = match decode(&prefix, &k, &read.value) {
            Ok(e) => {
                let (StoreKey::PolicyHistory(version), StoreValue::Policy(doc)) = (e.key, e.value)
                else {
                    continue;
                };
                HistoryEntry {
                    version,
                    issued_at: Some(doc.issued_at().to_string()),
                    signer: Some(doc.signer()),
                    name: Some(doc.name().to_string()),
                    policy_digest: Some(doc.policy_digest()),
                    policy_bytes: doc.policy().len(),
                    current: current.as_deref() == Some(doc.as_text().as_bytes()),
                    signature: trust.as_ref().map(|t| match doc.check_signature(t) {
                        Ok(()) => "ok".to_string(),
                        Err(e) => e.to_string(),
                    }),
                    error: None,
                }
            }
            Err(e) => HistoryEntry {
                version: match e.key {
                    Some(StoreKey::PolicyHistory(v)) => v,
                    _ => 0,
                },
                issued_at: None,
                signer: None,
                name: None,
                policy_digest: None,
                policy_bytes: read.value.len(),
                current: false,
                signature: None,
                error: Some(format!("{}: {}", e.reason, e.detail)),
            },
        };
        entries.push(entry);
    }
    if g.json {
        return crate::print_json(&entries);
    }
    if entries.is_empty() {
        println!("no policy published under {prefix}");
        return Ok(());
    }
    println!(
        "{:<8} {:<20} {:<16} {:<8} {:<16} {:>8}  NAME",
        "VERSION", "ISSUED", "SIGNER", "CURRENT", "DIGEST", "BYTES"
    );
    for e in &entries {
        if let Some(err) = &e.error {
            println!("{:<8} unreadable: {err}", e.version);
            continue;
        }
        let digest = e.policy_digest.map(|d| short(&d)).unwrap_or_default();
        let signer = e.signer.map(|d| short(&d)).unwrap_or_default();
        let mut line = format!(
            "{:<8} {:<20} {:<16} {:<8} {:<16} {:>8}  {}",
            e.version,
            e.issued_at.as_deref().unwrap_or(""),
            signer,
            if e.current { "*" } else { "" },
            digest,
            e.policy_bytes,
            e.name.as_deref().unwrap_or("")
        );
        if let Some(sig) = &e.signature {
            line.push_str(&format!("  signature: {sig}"));
        }
        println!("{line}");
    }
    Ok(())
}

/// `meshctl policy rollback N --key KEY`: publishes version N's content as a new
/// version. Version N's signature must verify under the signing key or a `--trust`
/// key: the store is not trusted, and a rollback must not re-sign a document someone
/// planted in the history.
pub fn rollback(
    s: &StoreArgs,
    version: u64,
    key: &Path,
    trust: &[PathBuf],
    default: DefaultAction,
    g: &Global,
) -> Result<()> {
    let td = s.trust_domain(None)?;
    let key = files::read_policy_key(key)?;
    let accepted = trust_from(&td, trust, Some(&key))?;
    let mut store = s.connect(Some(&td))?;
    let read = store
        .get(&StoreKey::PolicyHistory(version))?
        .ok_or_else(|| anyhow!("no policy version {version} in the history"))?;
    let old =
        PolicyDoc::parse(&read.value).map_err(|e| anyhow!("policy version {version}: {e}"))?;
    if old.version() != version {
        bail!(
            "policy version {version}: the history entry holds version {}",
            old.version()
        );
    }
    old.check_signature(&accepted).map_err(|e| {
        anyhow!("policy version {version}: {e}; refusing to re-sign it (pass --trust PUB for a key that signed it)")
    })?;
    test_source(old.name(), old.policy(), default, g.json)?;
    let (base_version, base_rev) = match store.current()? {
        Some((doc, rev)) => (doc.version(), rev),
        None => (0, 0),
    };
    let doc = PolicyDoc::sign(
        &key,
        &DocParams {
            trust_domain: &td,
            version: base_version + 1,
            issued_at: crate::now(),
            name: old.name(),
            policy: old.policy(),
        },
    )?;
    store.publish(&doc, base_rev)?;
    report_published(&doc, &store.prefix, Some(version), g)
}

/// `meshctl peer publish CERT --ca CA`: verified first, as meshd will.
pub fn peer_publish(s: &StoreArgs, cert: &Path, ca: &Path, g: &Global) -> Result<()> {
    let ca = files::read_ca(ca)?;
    let c = files::read_certificate(cert)?;
    let verified = ca
        .verify(&c, crate::now())
        .map_err(|e| anyhow!("{}: {e}; not published", cert.display()))?;
    let mut store = s.connect(Some(ca.trust_domain()))?;
    let key = StoreKey::Cert(verified.identity().clone());
    store.put(&key, verified.as_pem().as_bytes().to_vec())?;
    if g.json {
        crate::print_json(&serde_json::json!({
            "identity": verified.identity(),
            "key": store.prefix.key(&key),
            "not_after": verified.not_after(),
        }))
    } else {
        println!(
            "published {} (valid until {})",
            verified.identity(),
            verified.not_after()
        );
        Ok(())
    }
}
