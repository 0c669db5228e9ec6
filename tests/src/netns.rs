//! Named network namespaces and running commands inside them.
//!
//! The test thread never switches namespace: a command enters its namespace in the
//! child, between fork and exec (`pre_exec` + `setns`), and gets `PR_SET_PDEATHSIG`
//! so it cannot outlive the test process.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// A named network namespace (`/run/netns/<name>`, on the process's private tmpfs).
/// Dropping it deletes the namespace; stop its processes first.
#[derive(Debug)]
pub struct Netns {
    name: String,
    file: File,
}

impl Netns {
    /// `ip netns add <name>`, then loopback up.
    pub fn create(name: &str) -> Result<Netns> {
        ip(&["netns", "add", name])?;
        let path = format!("/run/netns/{name}");
        let file = File::open(&path).with_context(|| format!("open {path}"))?;
        let ns = Netns {
            name: name.to_string(),
            file,
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs inside this namespace and is killed if the thread that
    /// spawned it dies. Spawn it while `self` is alive (the namespace file stays open).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        in_namespace(&mut cmd, self.file.as_raw_fd());
        cmd
    }

    /// `ip -n <ns> <args>`; fails with ip's stderr.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        ip(&all)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("mesh-tests: cleanup: {e:#}");
        }
    }
}

/// Makes `cmd` enter the network namespace `fd` and die with its parent.
fn in_namespace(cmd: &mut Command, fd: i32) {
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the closure runs in the forked child before exec and only makes raw
    // syscalls (setns, prctl, getppid), which are async-signal-safe; `fd` stays open in
    // the parent for as long as the `Netns` that owns it, and the caller spawns while
    // holding it.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() != parent {
                return Err(std::io::Error::other("test process exited"));
            }
            Ok(())
        });
    }
}

/// Runs `ip <args>` in the test process's namespace (or wherever `-n` points).
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (install iproute2)")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
