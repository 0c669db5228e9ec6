//! The fault scenario shared by `tests/tests/faults.rs` and `mesh-faultbench`: a client
//! host `a` and a server host `c` whose meshds reach each other only through an
//! impairment [`Relay`] on host `r`. `c` runs a transfer server
//! ([`crate::transfer`]) on an inspected port ([`INSPECTED`], HTTP rules) and on a
//! layer-4 port ([`PLAIN`]), under a default-deny policy that lets `a` upload to
//! `/upload` and download `/files/*` on the first and reach the second. `a` denies by
//! default what a peer opens.

use std::time::Duration;

use anyhow::{ensure, Result};

use crate::host::Host;
use crate::mesh::{Mesh, PeerSet};
use crate::relay::{Impairment, Relay};

/// The port with HTTP rules: every request is decided at layer 7.
pub const INSPECTED: u16 = 8080;
/// The port allowed at layer 4 only.
pub const PLAIN: u16 = 8081;

/// `c`'s policy: `a` may GET `/files/*` and `/ready` and POST `/upload` on
/// [`INSPECTED`], and reach [`PLAIN`]; nothing else.
pub const POLICY: &str = r#"
[[policy]]
name = "transfers"
action = "allow"

[[policy.rule]]
name = "inspected"
from = [{ identities = ["spiffe://t/a"] }]
to = [{ ports = [8080], methods = ["GET"], paths = ["/files/*", "/ready"] },
      { ports = [8080], methods = ["POST"], paths = ["/upload"] }]

[[policy.rule]]
name = "plain"
from = [{ identities = ["spiffe://t/a"] }]
to = [{ ports = [8081] }]

[[test]]
name = "uploads are inspected"
from = "spiffe://t/a"
to_port = 8080
method = "POST"
path = "/upload"
expect = "allow"

[[test]]
name = "other paths are not"
from = "spiffe://t/a"
to_port = 8080
method = "POST"
path = "/other"
expect = "deny"
"#;

/// Client, server and the relay between them.
pub struct Faulty {
    pub a: Host,
    pub c: Host,
    pub relay: Relay,
}

impl Faulty {
    /// Brings up `c` (policy, transfer servers on both ports), `a`, and the relay
    /// between them, unimpaired; returns once `a` got an answer on both ports. Then
    /// the caller sets the impairment ([`Relay::set`]).
    pub fn start(mesh: &mut Mesh) -> Result<Faulty> {
        let c = mesh
            .host("c")
            .peers(PeerSet::None)
            .policy("deny", POLICY)
            .up()?;
        // Default deny on the client too: after a restart, its meshd must still tell
        // the answers to its own connections from flows a peer opens.
        let a = mesh
            .host("a")
            .peers(PeerSet::None)
            .policy("deny", "policy = []\n")
            .up()?;
        let relay = Relay::start(mesh, "r", &a, &c, Impairment::none())?;
        for port in [INSPECTED, PLAIN] {
            c.serve_transfers(port)?;
            let r = a.http_get_eventually(c.overlay_v4(), port, "/ready")?;
            ensure!(r.status == 200, "warm-up GET on port {port}: {r:?}");
        }
        Ok(Faulty { a, c, relay })
    }

    /// Writes `www/<name>` on `c` (downloaded as `/files/<name>`).
    pub fn publish(&self, name: &str, data: &[u8]) -> Result<()> {
        self.c.write_www(name, data)
    }
}

/// A generous limit for one transfer of `bytes` under faults (debug builds on a busy
/// machine included): the point of a fault test is that a transfer ends, intact, and
/// does not hang; how fast is for the benchmark.
pub fn limit_for(bytes: usize) -> Duration {
    Duration::from_secs(30 + (bytes >> 20) as u64 * 10)
}
