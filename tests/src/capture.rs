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
            // SIGINT makes tcpdump flush and exit.
            bg.stop_within(libc::SIGINT, Duration::from_secs(10))?;
        }
        Ok(())
    }
}
