//! A CPU wake-up latency request, held while traffic flows (`node.cpu_latency_us`).
//!
//! When a packet arrives for a data-path thread that sleeps on an idle CPU, that CPU
//! must first leave its idle state. On a virtual machine whose idle vCPUs halt, that
//! is an interrupt through the hypervisor: about 60 µs measured on the benchmark
//! machine, and a ping through the mesh hands off between threads four times
//! (docs/benchmarks.md, "A round trip, traced"). The kernel's CPU latency QoS
//! (`/dev/cpu_dma_latency`, Documentation/power/pm_qos_interface.rst) bounds the exit
//! latency of the idle states CPUs may enter while some process holds a request open;
//! with 0, idle CPUs poll, and waking a thread there is a flag the idle loop sees at
//! once, without an interrupt.
//!
//! Polling idle CPUs cost power and, on a VM, host CPU time. So the request is opt-in
//! and held only while traffic flows: a data-path thread takes it when it handles
//! packets and none is held (the first exchange after a quiet spell still pays the
//! slow wake-ups), and the timer thread withdraws it after a whole tick without
//! traffic. The file is the request: closing it withdraws it, also when meshd dies.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering::Relaxed};
use std::sync::Mutex;

use mesh_proto::control::{CpuLatencyState, CpuLatencyStatus};

/// The kernel's CPU latency QoS device.
pub const DEVICE: &str = "/dev/cpu_dma_latency";

/// No request configured.
const OFF: u8 = 0;
/// Configured, not held (no recent traffic).
const RELEASED: u8 = 1;
/// Held: the device file is open with our value written.
const HELD: u8 = 2;
/// The device refused the request (logged once); not tried again.
const FAILED: u8 = 3;

pub struct CpuLatency {
    /// The requested latency; `None` when the configuration asks for none.
    us: Option<u32>,
    device: PathBuf,
    state: AtomicU8,
    /// Traffic since the timer's last look.
    seen: AtomicBool,
    /// The open request while held.
    file: Mutex<Option<File>>,
}

impl CpuLatency {
    /// A request of `us` µs (none if `None`) through the kernel's device.
    pub fn new(us: Option<u32>) -> CpuLatency {
        CpuLatency::with_device(us, DEVICE)
    }

    /// The same through another file (tests).
    pub fn with_device(us: Option<u32>, device: impl Into<PathBuf>) -> CpuLatency {
        CpuLatency {
            us,
            device: device.into(),
            state: AtomicU8::new(if us.is_some() { RELEASED } else { OFF }),
            seen: AtomicBool::new(false),
            file: Mutex::new(None),
        }
    }

    /// Data path: packets were handled. When nothing changes, two relaxed loads of
    /// lines every thread only reads; the request is taken here, on the first traffic
    /// after a quiet spell.
    #[inline]
    pub fn traffic(&self) {
        let state = self.state.load(Relaxed);
        if state == OFF || state == FAILED {
            return;
        }
        if !self.seen.load(Relaxed) {
            self.seen.store(true, Relaxed);
        }
        if state == RELEASED {
            self.take();
        }
    }

    #[cold]
    fn take(&self) {
        // Another thread taking (or the timer releasing) it: that thread decides.
        let Ok(mut file) = self.file.try_lock() else {
            return;
        };
        let Some(us) = self.us else { return };
        if self.state.load(Relaxed) != RELEASED {
            return;
        }
        match open_request(&self.device, us) {
            Ok(f) => {
                *file = Some(f);
                self.state.store(HELD, Relaxed);
                tracing::debug!("CPU wake-up latency of {us} µs requested (traffic)");
            }
            Err(e) => {
                self.state.store(FAILED, Relaxed);
                tracing::warn!(
                    "cannot request a CPU wake-up latency of {us} µs (node.cpu_latency_us) through {}: {e}; idle CPUs keep their idle states",
                    self.device.display()
                );
            }
        }
    }

    /// Timer thread, once per tick: withdraws the request after a tick without
    /// traffic.
    pub fn tick(&self) {
        if self.seen.swap(false, Relaxed) || self.state.load(Relaxed) != HELD {
            return;
        }
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if self.state.load(Relaxed) == HELD {
            // Closing the file withdraws the request.
            *file = None;
            self.state.store(RELEASED, Relaxed);
            tracing::debug!("CPU wake-up latency request withdrawn (no traffic)");
        }
    }

    /// Whether the request is held now.
    pub fn held(&self) -> bool {
        self.state.load(Relaxed) == HELD
    }

    /// For `meshctl status`; `None` without a configured request.
    pub fn status(&self) -> Option<CpuLatencyStatus> {
        let state = match self.state.load(Relaxed) {
            HELD => CpuLatencyState::Held,
            RELEASED => CpuLatencyState::Released,
            FAILED => CpuLatencyState::Failed,
            _ => return None,
        };
        Some(CpuLatencyStatus {
            requested_us: self.us?,
            state,
        })
    }
}

/// Whether the kernel's device can be opened for a request (`meshd check-config`).
/// Opening without writing requests nothing: the kernel's default.
pub fn probe() -> std::io::Result<()> {
    OpenOptions::new().write(true).open(DEVICE).map(drop)
}

/// Opens `device` and writes the request: a 32-bit integer in native byte order
/// (the device takes four bytes as binary, anything else as a hex string).
fn open_request(device: &Path, us: u32) -> std::io::Result<File> {
    let mut f = OpenOptions::new().write(true).open(device)?;
    let value = i32::try_from(us).unwrap_or(i32::MAX);
    f.write_all(&value.to_ne_bytes())?;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch directory of this test, removed when dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(test: &str) -> Scratch {
            let dir = std::env::temp_dir()
                .join(format!("meshd-cpu-latency-{test}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A plain file standing in for the device.
    fn device(test: &str) -> (Scratch, PathBuf) {
        let dir = Scratch::new(test);
        let path = dir.0.join("cpu_dma_latency");
        std::fs::write(&path, b"").unwrap();
        (dir, path)
    }

    #[test]
    fn off_without_a_configured_value() {
        let (_dir, path) = device("off");
        let c = CpuLatency::with_device(None, &path);
        c.traffic();
        c.tick();
        assert!(!c.held());
        assert_eq!(c.status(), None);
        assert_eq!(std::fs::read(&path).unwrap(), b"");
    }

    /// Taken at the first traffic with the value as four native-endian bytes, kept
    /// while every tick saw traffic, withdrawn after a tick without, taken again.
    #[test]
    fn held_while_traffic_flows() {
        let (_dir, path) = device("held");
        let c = CpuLatency::with_device(Some(7), &path);
        assert!(!c.held());
        assert_eq!(c.status().unwrap().state, CpuLatencyState::Released);
        c.tick();
        assert!(!c.held(), "no traffic, no request");

        c.traffic();
        assert!(c.held());
        assert_eq!(std::fs::read(&path).unwrap(), 7i32.to_ne_bytes());
        let s = c.status().unwrap();
        assert_eq!((s.requested_us, s.state), (7, CpuLatencyState::Held));

        for _ in 0..3 {
            c.traffic();
            c.tick();
            assert!(c.held(), "traffic in every tick keeps it");
        }
        c.tick();
        assert!(!c.held(), "a tick without traffic withdraws it");
        assert!(c.file.lock().unwrap().is_none(), "the file is closed");

        c.traffic();
        assert!(c.held(), "taken again");
    }

    #[test]
    fn a_refused_request_is_not_tried_again() {
        let dir = Scratch::new("refused");
        let c = CpuLatency::with_device(Some(0), dir.0.join("missing"));
        c.traffic();
        assert!(!c.held());
        assert_eq!(c.status().unwrap().state, CpuLatencyState::Failed);
        // The device appears later: still not tried (the warning said so).
        std::fs::write(dir.0.join("missing"), b"").unwrap();
        c.traffic();
        c.tick();
        assert!(!c.held());
    }
}
