//! A real etcd for fleet-store tests, and a store client to watch it with.
//!
//! [`Mesh::etcd`] starts Debian's `etcd` (package `etcd-server`, 3.4) as a plain
//! process in a host of its own on the mesh's underlay, with its own underlay address
//! (198.18.0.i), its data directory in the test's directory and its log beside it
//! (the last lines are printed when a test fails). Readiness is a real client call
//! (`etcdctl endpoint health`); it is stopped by PID when dropped. Peer traffic stays
//! on the namespace's loopback: a single-member cluster.
//!
//! [`Mesh::etcd_tls`] does the same with TLS: a throwaway X.509 CA (openssl), a server
//! certificate for etcd's address and a client certificate that etcd requires
//! (`--client-cert-auth`); [`Etcd::tls`] names the files.
//!
//! [`StoreNode`] runs meshd's store client (`mesh-testtool store-node`) in a host and
//! reads the events it prints, one JSON line each.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::host::Host;
use crate::mesh::{lock, Mesh};
use crate::process::{last_lines, Background, Output};
use crate::wait;

/// etcd's client port.
pub const ETCD_PORT: u16 = 2379;
/// How long etcd may take to answer a health check after starting.
pub const ETCD_READY: Duration = Duration::from_secs(20);

/// A running (or stopped) etcd; dropping it kills the process.
pub struct Etcd {
    host: Host,
    data: PathBuf,
    log: PathBuf,
    process: Mutex<Option<Background>>,
    tls: Option<EtcdTls>,
}

/// PEM files for TLS to etcd (in etcd's host directory).
#[derive(Clone, Debug)]
pub struct EtcdTls {
    /// The CA of the server and client certificates.
    pub ca: PathBuf,
    /// A client certificate etcd accepts, and its key.
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
}

impl Mesh {
    /// Starts an etcd in a new host named `etcd` and waits until it answers.
    pub fn etcd(&mut self) -> Result<Etcd> {
        self.start_etcd(false)
    }

    /// As [`Mesh::etcd`], serving only TLS clients with a certificate.
    pub fn etcd_tls(&mut self) -> Result<Etcd> {
        self.start_etcd(true)
    }

    fn start_etcd(&mut self, tls: bool) -> Result<Etcd> {
        if !crate::mesh::in_path("etcd") || !crate::mesh::in_path("etcdctl") {
            bail!(
                "etcd is missing: apt-get install etcd-server etcd-client (scripts/test.sh does)"
            );
        }
        if tls && !crate::mesh::in_path("openssl") {
            bail!("openssl is missing: apt-get install openssl");
        }
        let host = self.host("etcd").without_meshd().up()?;
        let tls = if tls { Some(make_tls(&host)?) } else { None };
        let etcd = Etcd {
            data: host.dir().join("data"),
            log: host.dir().join("etcd.log"),
            host,
            process: Mutex::new(None),
            tls,
        };
        etcd.start()?;
        Ok(etcd)
    }
}

/// A throwaway CA, a server certificate for `host`'s underlay address and a client
/// certificate, made with openssl (EC P-256) in the host's directory.
fn make_tls(host: &Host) -> Result<EtcdTls> {
    let dir = host.dir();
    let openssl = |args: &[&str]| -> Result<()> {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .context("running openssl")?;
        if !out.status.success() {
            bail!(
                "openssl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    };
    let key = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend_from_slice(&key);
    ca.extend_from_slice(&[
        "-keyout",
        "tls-ca.key",
        "-out",
        "tls-ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=etcd test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    openssl(&ca)?;
    let server_ext = format!(
        "subjectAltName=IP:{}\nextendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature\nbasicConstraints=CA:FALSE\n",
        host.underlay_v4()
    );
    let client_ext =
        "extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\nbasicConstraints=CA:FALSE\n".to_string();
    for (name, ext) in [("server", server_ext), ("client", client_ext)] {
        let (k, csr, pem, extfile) = (
            format!("tls-{name}.key"),
            format!("tls-{name}.csr"),
            format!("tls-{name}.pem"),
            format!("tls-{name}.ext"),
        );
        std::fs::write(dir.join(&extfile), ext)?;
        let subj = format!("/CN={name}");
        let mut req = vec!["req"];
        req.extend_from_slice(&key);
        req.extend_from_slice(&["-keyout", &k, "-out", &csr, "-subj", &subj]);
        openssl(&req)?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "tls-ca.pem",
            "-CAkey",
            "tls-ca.key",
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "2",
            "-extfile",
            &extfile,
        ])?;
    }
    Ok(EtcdTls {
        ca: dir.join("tls-ca.pem"),
        client_cert: dir.join("tls-client.pem"),
        client_key: dir.join("tls-client.key"),
        server_cert: dir.join("tls-server.pem"),
        server_key: dir.join("tls-server.key"),
    })
}

impl Etcd {
    /// `http://<underlay address>:2379` (`https://` with TLS).
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}:{ETCD_PORT}", self.host.underlay_v4())
    }

    /// The TLS files, for an etcd from [`Mesh::etcd_tls`].
    pub fn tls(&self) -> Option<&EtcdTls> {
        self.tls.as_ref()
    }

    pub fn host(&self) -> &Host {
        &self.host
    }

    /// Starts etcd on its data directory (kept across restarts) and waits until
    /// `etcdctl endpoint health` succeeds.
    pub fn start(&self) -> Result<()> {
        let mut slot = lock(&self.process);
        if slot.is_some() {
            bail!("etcd runs already");
        }
        let url = self.url();
        let peer = "http://127.0.0.1:2380";
        let mut cmd = self.host.netns().command("etcd");
        cmd.args(["--name", "etcd", "--data-dir"])
            .arg(&self.data)
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
                "--listen-peer-urls",
                peer,
                "--initial-advertise-peer-urls",
                peer,
                "--initial-cluster",
                &format!("etcd={peer}"),
                "--logger",
                "zap",
                "--log-outputs",
                "stderr",
            ])
            .current_dir(self.host.dir());
        if let Some(t) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&t.server_cert)
                .arg("--key-file")
                .arg(&t.server_key)
                .arg("--trusted-ca-file")
                .arg(&t.ca)
                .arg("--client-cert-auth");
        }
        *slot = Some(Background::spawn_to(
            cmd,
            "etcd",
            self.log.clone(),
            self.log.clone(),
        )?);
        drop(slot);
        let ready = wait::until("etcd to answer a health check", ETCD_READY, || {
            if let Some(status) = lock(&self.process)
                .as_mut()
                .ok_or_else(|| anyhow!("etcd is not running"))?
                .exited()?
            {
                bail!("etcd exited during startup ({status})");
            }
            Ok(self
                .etcdctl(&["endpoint", "health"])?
                .success()
                .then_some(()))
        });
        ready.map_err(|e| {
            anyhow!(
                "{e:#}\n---- last lines of {} ----\n{}",
                self.log.display(),
                last_lines(&self.log(), 30)
            )
        })
    }

    /// SIGTERM and wait for etcd to exit (its data stays).
    pub fn stop(&self) -> Result<()> {
        let mut bg = lock(&self.process).take().context("etcd is not running")?;
        bg.stop_within(libc::SIGTERM, Duration::from_secs(10))?;
        Ok(())
    }

    /// `etcdctl --endpoints <url> <args>` in etcd's host.
    pub fn etcdctl(&self, args: &[&str]) -> Result<Output> {
        let url = self.url();
        let mut all: Vec<String> = vec![
            "--endpoints".into(),
            url,
            "--dial-timeout".into(),
            "2s".into(),
        ];
        if let Some(t) = &self.tls {
            for (flag, path) in [
                ("--cacert", &t.ca),
                ("--cert", &t.client_cert),
                ("--key", &t.client_key),
            ] {
                all.push(flag.into());
                all.push(path.display().to_string());
            }
        }
        all.extend(args.iter().map(|a| a.to_string()));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        self.host.exec("etcdctl", &all)
    }

    /// `etcdctl put KEY VALUE` (the value passed on the command line).
    pub fn put(&self, key: &str, value: &[u8]) -> Result<()> {
        let value = std::str::from_utf8(value).context("etcdctl put takes text")?;
        // `--` so that a value starting with '-' is not an option.
        self.etcdctl(&["put", "--", key, value])?.check()?;
        Ok(())
    }

    /// The value at `key`, if any.
    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let out = self
            .etcdctl(&["get", "--print-value-only", "--", key])?
            .check()?;
        if out.stdout.is_empty() {
            return Ok(None);
        }
        let mut v = out.stdout;
        // etcdctl ends the value with a newline.
        if v.last() == Some(&b'\n') {
            v.pop();
        }
        Ok(Some(v))
    }

    /// The store's current revision.
    pub fn revision(&self) -> Result<i64> {
        let out = self.etcdctl(&["get", "-w", "json", "--", "/"])?.check()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        v["header"]["revision"]
            .as_i64()
            .context("etcdctl get -w json: no header.revision")
    }

    /// Compacts the history up to the current revision: watchers behind it are
    /// cancelled.
    pub fn compact(&self) -> Result<i64> {
        let rev = self.revision()?;
        self.etcdctl(&["compact", &rev.to_string(), "--physical"])?
            .check()?;
        Ok(rev)
    }

    /// Everything etcd logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- last lines of {} ----\n{}",
                self.log.display(),
                last_lines(&self.log(), 30)
            );
        }
        if let Some(mut bg) = lock(&self.process).take() {
            let _ = bg.kill();
        }
    }
}

/// meshd's store client running in a host (`mesh-testtool store-node`), printing
/// every event as a JSON line.
pub struct StoreNode {
    host: Host,
    bg: Option<Background>,
    label: String,
}

/// What a [`StoreNode`] is started with.
pub struct StoreNodeConfig<'a> {
    pub endpoints: &'a str,
    pub prefix: &'a str,
    pub identity: &'a str,
    pub advertise: &'a str,
    pub lease_secs: u32,
    /// Reported as its applied policy version.
    pub applied_version: u64,
    /// TLS to etcd: (CA, client certificate, client key).
    pub tls: Option<(PathBuf, PathBuf, PathBuf)>,
}

impl StoreNode {
    pub fn start(host: &Host, label: &str, c: &StoreNodeConfig<'_>) -> Result<StoreNode> {
        let mut cmd = host.netns().command(host.bins_testtool());
        cmd.args([
            "store-node",
            c.endpoints,
            c.prefix,
            c.identity,
            c.advertise,
            &c.lease_secs.to_string(),
            &c.applied_version.to_string(),
        ])
        .current_dir(host.dir())
        .env("RUST_LOG", "debug");
        if let Some((ca, cert, key)) = &c.tls {
            cmd.env("MESH_STORE_TLS_CA", ca)
                .env("MESH_STORE_TLS_CERT", cert)
                .env("MESH_STORE_TLS_KEY", key);
        }
        let bg = Background::spawn(cmd, host.dir(), label)?;
        Ok(StoreNode {
            host: host.clone(),
            bg: Some(bg),
            label: label.to_string(),
        })
    }

    /// Every event printed so far, parsed.
    pub fn events(&self) -> Vec<serde_json::Value> {
        let text = self
            .bg
            .as_ref()
            .map(Background::stdout_text)
            .unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits (up to `timeout`) for an event after the first `skip` that `pred`
    /// accepts; returns it and its index. Fails early if the process exits.
    pub fn wait_event(
        &mut self,
        what: &str,
        skip: usize,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<(usize, serde_json::Value)> {
        let result = wait::until(what, timeout, || {
            if let Some(found) = self
                .events()
                .into_iter()
                .enumerate()
                .skip(skip)
                .find(|(_, e)| pred(e))
            {
                return Ok(Some(found));
            }
            let bg = self.bg.as_mut().context("store node was stopped")?;
            if let Some(status) = bg.exited()? {
                bail!("{} exited ({status})", self.label);
            }
            Ok(None)
        });
        result.map_err(|e| {
            anyhow!(
                "{e:#} in {}\n---- events ----\n{}\n---- log ----\n{}",
                self.host.name(),
                last_lines(
                    &self
                        .bg
                        .as_ref()
                        .map(Background::stdout_text)
                        .unwrap_or_default(),
                    20
                ),
                last_lines(
                    &self
                        .bg
                        .as_ref()
                        .map(Background::stderr_text)
                        .unwrap_or_default(),
                    20
                )
            )
        })
    }

    /// SIGKILL: the client dies without revoking its lease, as a crashed host would.
    pub fn kill(&mut self) -> Result<()> {
        match self.bg.take() {
            Some(mut bg) => bg.kill(),
            None => bail!("{} was already stopped", self.label),
        }
    }
}
