//! The network-namespace test harness: hosts as network namespaces on a shared
//! underlay, each running a real `meshd`, driven as an operator would (`meshctl`).
//!
//! ```no_run
//! mesh_tests::isolate!(); // once per test file
//!
//! // In a test file this carries `#[test]`.
//! fn http_across_the_mesh() -> mesh_tests::Result {
//!     let mut mesh = mesh_tests::mesh!(); // fresh CA, underlay; Drop cleans up
//!     let a = mesh.host("a").identity("spiffe://t/a").up()?;
//!     let c = mesh.host("c").up()?;
//!     c.serve_http(8080)?; // returns once the port listens
//!     assert_eq!(a.http_get_eventually(c.overlay_v4(), 8080, "/")?.status, 200);
//!     Ok(())
//! }
//! # fn main() { let _ = http_across_the_mesh(); }
//! ```
//!
//! Policy tests drive meshd as an operator would: [`Host::apply_policy`] (`meshctl
//! policy apply`), [`Host::decisions`] (`meshctl log --json`, with
//! [`Decisions::assert_contains`]), [`Host::enforcement`] and [`Host::rule_count`]
//! (`meshctl status --json`), [`Host::explain`]. Layer-7 tests use
//! [`Host::serve_recording`], an HTTP/1.1 server that records every request and every
//! byte it reads (so a test can prove a refused request never reached it), and
//! [`Host::http_session`] (several requests on one kept-alive connection),
//! [`Host::send_raw`], [`Host::curl`], [`Host::hold_tcp`] and
//! [`Host::trickle_upload`] (long-lived connections whose end is reported).
//!
//! Running: as root, `cargo build --workspace --bins && cargo test -p mesh-tests`
//! (the tests run the real `meshd` and `meshctl` from `target/debug/` and refuse stale
//! ones). Needs iproute2, curl, iputils-ping, tcpdump and python3.
//!
//! Without root or `/dev/net/tun`, [`mesh!`] fails the test with a message saying what
//! is missing, unless `MESH_SKIP_NETNS=1` is set, in which case it prints a note and
//! returns `Ok(())`. `MESH_TESTS_PARALLEL=N` caps how many meshes one test binary runs
//! at once (default: the number of CPUs, at least 2).
//!
//! Each test's files (certificates, meshd.toml, meshd.log, captures) live in
//! `$TMPDIR/mesh-tests/<test>.<pid>.<n>/<host>/`; they are removed when the test passes
//! and kept (with the path printed) when it fails.

pub mod attack;
pub mod bins;
pub mod ca;
pub mod capture;
pub mod etcd;
pub mod failure;
pub mod faults;
pub mod host;
pub mod http;
pub mod isolate;
pub mod mesh;
pub mod netns;
pub mod pod;
pub mod policy;
pub mod process;
pub mod relay;
pub mod traffic;
pub mod transfer;
pub mod wait;

pub use ca::{TestCa, Validity};
pub use etcd::{Etcd, StoreNode, StoreNodeConfig};
pub use failure::{Failed, Result};
pub use host::{Host, Status};
pub use http::{RecordingServer, Session};
pub use mesh::{Mesh, PeerSet};
pub use pod::Pod;
pub use policy::Decisions;
pub use process::Output;

#[doc(hidden)]
pub use ctor;

/// The name of the enclosing test function.
#[macro_export]
macro_rules! test_name {
    () => {{
        fn f() {}
        fn type_name_of<T>(_: T) -> &'static str {
            std::any::type_name::<T>()
        }
        let name = type_name_of(f);
        let name = name.strip_suffix("::f").unwrap_or(name);
        name.rsplit("::").next().unwrap_or(name)
    }};
}

/// `Mesh::new(test_name!())?`, except that under `MESH_SKIP_NETNS=1` (when netns tests
/// cannot run here) it returns `Ok(())` from the test after printing a note. Use it in
/// tests returning [`Result`] (errors become panics while the mesh is alive, so its
/// logs are printed and its directory kept).
#[macro_export]
macro_rules! mesh {
    () => {
        match $crate::Mesh::new($crate::test_name!()) {
            Ok(m) => m,
            Err(e) if $crate::mesh::is_skip(&e) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    };
}
