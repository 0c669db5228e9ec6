//! The stop signal (I/O shell): a flag the loops poll between waits and the
//! timed threads wait on, so that a trigger wakes them at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// A shutdown flag the loops poll and the timer thread waits on.
#[derive(Default)]
pub struct Shutdown {
    flag: AtomicBool,
    lock: Mutex<()>,
    cv: Condvar,
}

impl Shutdown {
    pub fn new() -> Arc<Shutdown> {
        Arc::new(Shutdown::default())
    }

    pub fn trigger(&self) {
        self.flag.store(true, Ordering::SeqCst);
        let _g = self.lock.lock();
        self.cv.notify_all();
    }

    pub fn is_set(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// Waits up to `d`; true if shutdown was triggered.
    pub fn wait_timeout(&self, d: Duration) -> bool {
        let g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        if self.is_set() {
            return true;
        }
        let _ = self.cv.wait_timeout(g, d);
        self.is_set()
    }
}
