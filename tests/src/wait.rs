//! Bounded waiting: poll a readiness check until it answers or a deadline passes.
//!
//! This is the one place in the harness that sleeps, and only as the interval of a
//! bounded poll of a real readiness signal (a socket listening, `meshctl status`
//! saying ready) — never as synchronisation by itself.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};

/// Calls `check` until it returns `Ok(Some(_))`, it fails, or `timeout` passes; the
/// error names `what` and the last observation that `check` reported with `Ok(None)`.
pub fn until<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = now() + timeout;
    let mut interval = Duration::from_millis(5);
    loop {
        if let Some(v) = check()? {
            return Ok(v);
        }
        if now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        pause(interval);
        interval = (interval * 2).min(Duration::from_millis(100));
    }
}

/// Like [`until`], but `check` reports failures as `Err`, which are retried and the
/// last one is returned on timeout (e.g. "connection refused" until the server is up).
pub fn retry<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Result<T>) -> Result<T> {
    let mut last = None;
    let result = until(what, timeout, || match check() {
        Ok(v) => Ok(Some(v)),
        Err(e) => {
            last = Some(e);
            Ok(None)
        }
    });
    match (result, last) {
        (Ok(v), _) => Ok(v),
        (Err(e), Some(last)) => Err(e.context(format!("last attempt: {last:#}"))),
        (Err(e), None) => Err(e),
    }
}

#[allow(clippy::disallowed_methods)] // the harness is I/O code: deadlines need the clock.
pub fn now() -> Instant {
    Instant::now()
}

#[allow(clippy::disallowed_methods)] // the interval of a bounded poll; see the module docs.
fn pause(d: Duration) {
    std::thread::sleep(d);
}
