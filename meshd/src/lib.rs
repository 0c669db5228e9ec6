//! meshd: the daemon. `run(config)` is shared by `main` and the tests.
//!
//! Sans-IO cores (`wire`, `routing`, `peers`, `enforce`, `flow`, `http`) take bytes,
//! state and `now`, and return what the shell must do. The I/O shell (`datapath`,
//! `device`, `transport`, `control`) is thin; `daemon` holds the control-plane state
//! and `state` the persisted peer changes. `store` is the fleet store client (etcd),
//! on a thread and tokio runtime of its own; `fleet` applies what it reads to the
//! daemon (with a `[store]` table).
//!
//! Layers, bottom to top; no module imports one above it, and no modules import each
//! other in a circle (README "Layout"): small system helpers (`clock`, `poll`, `netlink`,
//! `shutdown`) → the sans-IO cores (`wire`, `peers`, `enforce` and what it uses) →
//! `node`, the sans-IO node core → the data path's I/O shell (`datapath` with its
//! [`datapath::Plane`], `device`, `batch`, `transport`, `gro`) → the control plane
//! (`daemon`, `workloads`, `control`, `client`, `attach`, `hostfilter`, `fleet`,
//! `store`, `state`). The daemon holds the data path's `Plane` and changes what it
//! reads (the table snapshot, the policy); the data path never calls the daemon.

pub mod attach;
pub mod batch;
pub mod checksum;
pub mod client;
pub mod clock;
pub mod conntrack;
pub mod control;
pub mod cpu_latency;
pub mod daemon;
pub mod datapath;
pub mod decisions;
pub mod device;
pub mod enforce;
pub mod expiry;
pub mod fleet;
pub mod flow;
pub mod gro;
pub mod hostfilter;
pub mod http;
pub mod inject;
pub mod l7;
pub mod netlink;
pub mod node;
pub mod overlap;
pub mod peers;
pub mod poll;
pub mod routing;
pub mod shutdown;
pub mod state;
pub mod store;
pub mod transport;
pub mod wire;
pub mod workloads;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use mesh_proto::config::{Config, ConfigError};

pub use daemon::{load, Daemon, Loaded};
pub use shutdown::Shutdown;

/// Why `run` failed; Display is one line.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Start(#[from] daemon::StartError),
    #[error(transparent)]
    Control(#[from] control::SocketError),
    #[error(transparent)]
    Fleet(#[from] fleet::FleetError),
    #[error("cannot start thread: {0}")]
    Thread(std::io::Error),
    #[error("internal error: the {0} thread panicked (see the log)")]
    Panicked(String),
}

/// Loads `config` (nothing is touched if that fails), brings the node up and runs
/// until `shutdown` is triggered. Returns after every thread stopped, the control
/// socket is removed and the TUN closed (which removes it and its routes).
pub fn run(config: Config, shutdown: Arc<Shutdown>) -> Result<(), RunError> {
    let loaded = load(config, clock::unix_now())?;
    let socket_path = loaded.config.node.control_socket.clone();
    // First, so that a second meshd on the same socket stops before touching anything.
    let sock = control::ControlSocket::bind(&socket_path)?;
    let d = Arc::new(Daemon::start(loaded, shutdown.clone())?);

    let mut threads = Vec::new();
    let spawn = |name: &str, f: Body, d: Arc<Daemon>| {
        #[allow(clippy::disallowed_methods)] // I/O shell: the data-path and control threads
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                // A thread that panics takes the daemon down with it (and `run`
                // reports it) rather than leaving a half-working node.
                let _guard = StopOnPanic(d.plane.shutdown.clone());
                f(&d)
            })
            .map_err(RunError::Thread)
    };
    // The data path's threads get its plane only; the control plane's the daemon.
    let mut list: Vec<(String, Body)> = datapath::threads(d.config().node.workers)
        .into_iter()
        .map(|(name, f)| {
            let f: Body = Box::new(move |d: &Daemon| f(&d.plane));
            (name, f)
        })
        .collect();
    list.push(("chores".into(), Box::new(daemon::chores_loop)));
    list.push(("quarantine".into(), Box::new(daemon::quarantine_loop)));
    for (name, f) in list {
        match spawn(&name, f, d.clone()) {
            Ok(t) => threads.push(t),
            Err(e) => {
                shutdown.trigger();
                for t in threads {
                    let _ = t.join();
                }
                return Err(e);
            }
        }
    }
    // The store input goes after the data path, so that what it applies is in force
    // at once; it never holds up the start (an unreachable store is retried).
    let fleet = match fleet::Fleet::start(&d) {
        Ok(f) => f,
        Err(e) => {
            shutdown.trigger();
            for t in threads {
                let _ = t.join();
            }
            return Err(RunError::Fleet(e));
        }
    };
    d.ready.store(true, Ordering::SeqCst);
    let names: Vec<&str> = threads.iter().filter_map(|t| t.thread().name()).collect();
    tracing::info!(
        socket = %socket_path.display(),
        threads = %names.join(","),
        "ready"
    );
    control::serve(&sock, d.clone());
    let mut panicked = None;
    for t in threads {
        let name = t.thread().name().unwrap_or("?").to_string();
        if t.join().is_err() {
            panicked = Some(name);
        }
    }
    drop(sock);
    if let Some(f) = fleet {
        f.stop();
    }
    d.save_learned_endpoints();
    // The host filter goes after the TUN, so the overlay addresses are never up
    // without it; a control client still holding the daemon (`log -f`) keeps the TUN
    // until the process exits, but not the filter.
    match Arc::try_unwrap(d) {
        Ok(d) => drop(d),
        Err(d) => d.remove_host_filter(),
    }
    if let Some(name) = panicked {
        return Err(RunError::Panicked(name));
    }
    tracing::info!("stopped");
    Ok(())
}

/// A thread's body: it gets the daemon (the data path's only its plane).
type Body = Box<dyn FnOnce(&Daemon) + Send>;

struct StopOnPanic(Arc<Shutdown>);

impl Drop for StopOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.trigger();
        }
    }
}
