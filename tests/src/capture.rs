//! Packet captures on the underlay (tcpdump in the underlay namespace).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::mesh::lock;
use crate::process::Background;

/// A running underlay capture; [`Capture::finish`] stops it and returns the pcap bytes.
pub struct Capture {
    pub(crate) slot: Arc<Mutex<Option<Background>>>,
    pub(crate) file: PathBuf,
}

impl Capture {
    /// The pcap file being written.
    pub fn path(&self) -> &Path {
        &self.file
    }

    /// Stops tcpdump and returns the raw pcap file.
    pub fn finish(self) -> Result<Vec<u8>> {
        self.stop()?;
        std::fs::read(&self.file).with_context(|| format!("read {}", self.file.display()))
    }

    /// Stops tcpdump and returns one line per captured packet that matches `filter` (a
    /// pcap filter expression; empty: all), as `tcpdump -n -r` prints them.
    pub fn finish_packets(self, filter: &str) -> Result<Vec<String>> {
        self.stop()?;
        let mut cmd = std::process::Command::new("tcpdump");
        cmd.arg("-n").arg("-r").arg(&self.file);
        if !filter.is_empty() {
            cmd.arg(filter);
        }
        let out = cmd.output().context("running tcpdump -r")?;
        if !out.status.success() {
            bail!(
                "tcpdump -r {} failed: {}",
                self.file.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect())
    }

    fn stop(&self) -> Result<()> {
        if let Some(mut bg) = lock(&self.slot).take() {
            if let Some(pid) = bg.pid() {
                self.caught_up(pid)?;
            }
            // SIGINT makes tcpdump flush and exit.
            bg.stop_within(libc::SIGINT, Duration::from_secs(10))?;
        }
        Ok(())
    }

    /// Waits until tcpdump has written every packet the kernel gave it: SIGINT ends
    /// its loop at once, and packets still in its socket's queue are lost (seen on a
    /// loaded machine: "39 packets received by filter, 22 captured"). Caught up means
    /// asleep (waiting for packets, in immediate mode) with the file no longer growing
    /// between two looks.
    fn caught_up(&self, pid: u32) -> Result<()> {
        let mut last = None;
        crate::wait::until(
            "tcpdump to write what it captured",
            Duration::from_secs(10),
            || {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                // The state follows the command name in parentheses.
                let asleep = stat
                    .rsplit_once(") ")
                    .is_some_and(|(_, rest)| rest.starts_with('S'));
                let size = std::fs::metadata(&self.file).map(|m| m.len()).ok();
                let done = stat.is_empty() || (asleep && size.is_some() && size == last);
                last = size;
                Ok(done.then_some(()))
            },
        )
    }
}
