//! meshd: the daemon. `run(config)` is shared by `main` and the tests.
//!
//! Its modules are folders by concern, in layers, bottom to top; none imports one
//! above it and none form a circle (README "Layout";
//! `python3 ../shared/tools/module-graph.py meshd/src` checks it):
//!
//! - [`sys`]: the wall clock, waiting on descriptors, netlink requests, the stop flag;
//! - [`wire`]: checked views of packets (IP with IPv6 extensions, TCP, UDP, ICMP, the
//!   flow key) and checksums;
//! - [`enforce`]: the enforcer and what it uses (connection tracking, TCP flow state
//!   and reassembly, the HTTP parser, the layer-7 flow, its own packets, the decision
//!   log); sans-IO;
//! - [`peers`]: sessions, crypto, secure naming, the peer table and how it is built,
//!   routing, address overlap; sans-IO;
//! - [`node`]: the sans-IO node core that composes the two (place → enforce → encrypt;
//!   decrypt → secure naming → enforce), `now` passed in; `node::sim` runs whole nodes
//!   in memory;
//! - [`datapath`]: the packet path's I/O shell (its `Plane`, the TUN device, the UDP
//!   transport, batching, TUN-write coalescing, the CPU latency request): reads, hands
//!   bytes to the node core, writes what it returns; never calls the control plane;
//! - [`control`]: the control plane: the daemon's state, the control socket and its
//!   client, workloads, the host filter, state files, expiry warnings, the fleet store
//!   (etcd) and the store as an input. It holds the data path's `Plane` and swaps
//!   what it reads (the table snapshot, the policy).

pub mod control;
pub mod datapath;
pub mod enforce;
pub mod node;
pub mod peers;
pub mod sys;
pub mod wire;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use mesh_proto::config::{Config, ConfigError};

pub use control::daemon::{load, Daemon, Loaded};
pub use sys::shutdown::Shutdown;

/// Why `run` failed; Display is one line.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Start(#[from] control::daemon::StartError),
    #[error(transparent)]
    Control(#[from] control::socket::SocketError),
    #[error(transparent)]
    Fleet(#[from] control::fleet::FleetError),
    #[error("cannot start thread: {0}")]
    Thread(std::io::Error),
    #[error("internal error: the {0} thread panicked (see the log)")]
    Panicked(String),
}

/// Loads `config` (nothing is touched if that fails), brings the node up and runs
/// until `shutdown` is triggered. Returns after every thread stopped, the control
/// socket is removed and the TUN closed (which removes it and its routes).
pub fn run(config: Config, shutdown: Arc<Shutdown>) -> Result<(), RunError> {
    let loaded = load(config, sys::clock::unix_now())?;
    let socket_path = loaded.config.node.control_socket.clone();
    // First, so that a second meshd on the same socket stops before touching anything.
    let sock = control::socket::ControlSocket::bind(&socket_path)?;
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
    list.push(("chores".into(), Box::new(control::daemon::chores_loop)));
    list.push((
        "quarantine".into(),
        Box::new(control::daemon::quarantine_loop),
    ));
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
    let fleet = match control::fleet::Fleet::start(&d) {
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
    control::socket::serve(&sock, d.clone());
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
