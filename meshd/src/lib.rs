//! meshd: the daemon. `run(config)` is shared by `main` and the tests.
//!
//! Sans-IO cores (`wire`, `flow`, `http`, `enforce`, `peers`) take bytes, state and
//! `now`, and return what the shell must do. The I/O shell (`datapath`, `device`,
//! `transport`, `control`) is thin.

pub mod conntrack;
pub mod decisions;
pub mod flow;
pub mod http;
pub mod inject;
pub mod l4;
pub mod l7;
