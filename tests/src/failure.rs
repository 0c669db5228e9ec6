//! Test results that keep the evidence: an error becomes a panic at the `?` that meets
//! it, while the [`crate::Mesh`] is still alive, so the mesh's `Drop` sees a failing
//! test, prints every meshd's last log lines and keeps the test's directory.
//!
//! ```no_run
//! fn t() -> mesh_tests::Result {
//!     let mut mesh = mesh_tests::mesh!();
//!     mesh.host("a").up()?; // an error here panics with its whole chain
//!     Ok(())
//! }
//! # fn main() { let _ = t(); }
//! ```

use std::fmt;

/// What a failed test returns; never constructed: the conversion panics first.
pub struct Failed(());

impl<E: Into<anyhow::Error>> From<E> for Failed {
    #[track_caller]
    fn from(e: E) -> Failed {
        panic!("{:?}", e.into())
    }
}

impl fmt::Debug for Failed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("test failed (see the panic above)")
    }
}

/// The return type of netns tests.
pub type Result<T = ()> = std::result::Result<T, Failed>;
