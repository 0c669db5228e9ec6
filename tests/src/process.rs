//! Processes the harness starts: one-shot commands with captured output and a time
//! limit, and background processes stopped (by PID, only ours) when dropped.

use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// The captured result of a command.
#[derive(Clone)]
pub struct Output {
    pub command: String,
    pub code: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Output {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    /// `Ok(self)` if the command exited 0, else an error with its stderr.
    pub fn check(self) -> Result<Output> {
        if self.success() {
            Ok(self)
        } else {
            bail!("{self}")
        }
    }
}

impl fmt::Display for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let code = match self.code {
            Some(137) => "was killed at its time limit (exit 137)".to_string(),
            Some(c) => format!("exited {c}"),
            None => "died from a signal".to_string(),
        };
        write!(f, "`{}` {code}", self.command)?;
        let err = self.stderr_str();
        let err = err.trim();
        if !err.is_empty() {
            write!(f, ": {}", last_lines(err, 10))?;
        }
        Ok(())
    }
}

impl fmt::Debug for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}; stdout: {}", last_lines(&self.stdout_str(), 10))
    }
}

/// Runs `program args` to completion under `timeout`, capturing its output. `base` is a
/// command whose program is coreutils' `timeout` (possibly already set to enter a
/// namespace, see [`crate::netns::Netns::command`]); `timeout -s KILL` enforces the
/// limit, so a hung client cannot hang the test.
pub fn run_with_limit(
    base: Command,
    program: &str,
    args: &[&str],
    timeout: Duration,
) -> Result<Output> {
    let mut cmd = base;
    cmd.arg("-s")
        .arg("KILL")
        .arg(format!("{}", timeout.as_secs_f64()))
        .arg(program)
        .args(args)
        .stdin(Stdio::null());
    let command = std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    let out = cmd
        .output()
        .with_context(|| format!("starting `{command}`"))?;
    Ok(Output {
        command,
        code: out.status.code(),
        stdout: out.stdout,
        stderr: out.stderr,
    })
}

/// A background process started by the harness; dropping it kills it (SIGKILL to its
/// PID) and reaps it. Its stdout and stderr go to files.
pub struct Background {
    pub(crate) name: String,
    child: Option<Child>,
    pub(crate) stdout: PathBuf,
    pub(crate) stderr: PathBuf,
}

impl Background {
    /// Spawns `cmd` with stdout/stderr to `<dir>/<name>.out` / `.err` (appended).
    pub fn spawn(cmd: Command, dir: &Path, name: &str) -> Result<Background> {
        let stdout = dir.join(format!("{name}.out"));
        let stderr = dir.join(format!("{name}.err"));
        Background::spawn_to(cmd, name, stdout, stderr)
    }

    /// Spawns `cmd` with stdout and stderr appended to the files given (may be equal).
    pub fn spawn_to(
        mut cmd: Command,
        name: &str,
        stdout: PathBuf,
        stderr: PathBuf,
    ) -> Result<Background> {
        let open = |p: &Path| {
            File::options()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("open {}", p.display()))
        };
        cmd.stdin(Stdio::null())
            .stdout(open(&stdout)?)
            .stderr(open(&stderr)?);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        Ok(Background {
            name: name.to_string(),
            child: Some(child),
            stdout,
            stderr,
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `Some(status)` if the process has exited.
    pub fn exited(&mut self) -> Result<Option<std::process::ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => Ok(c.try_wait()?),
            None => bail!("{} was already stopped", self.name),
        }
    }

    pub fn stdout_text(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Sends `signal` and waits for the process to exit.
    pub fn stop_with(&mut self, signal: i32) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            if child.try_wait()?.is_none() {
                let pid = i32::try_from(child.id()).context("pid out of range")?;
                // SAFETY: `pid` is our own child, not yet reaped (try_wait said it is
                // running), so the PID cannot have been reused.
                unsafe { libc::kill(pid, signal) };
            }
            child
                .wait()
                .with_context(|| format!("waiting for {}", self.name))?;
        }
        Ok(())
    }

    /// Sends `signal` and waits up to `limit` for the process to exit; if it does not,
    /// kills it and fails. Returns the exit status.
    pub fn stop_within(
        &mut self,
        signal: i32,
        limit: std::time::Duration,
    ) -> Result<std::process::ExitStatus> {
        let mut child = self
            .child
            .take()
            .with_context(|| format!("{} was already stopped", self.name))?;
        if child.try_wait()?.is_none() {
            let pid = i32::try_from(child.id()).context("pid out of range")?;
            // SAFETY: `pid` is our own child, not yet reaped, so it cannot be reused.
            unsafe { libc::kill(pid, signal) };
        }
        let waited = crate::wait::until(&format!("{} to exit", self.name), limit, || {
            Ok(child.try_wait()?)
        });
        match waited {
            Ok(status) => Ok(status),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(e.context(format!("{} ignored signal {signal}; killed it", self.name)))
            }
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) -> Result<()> {
        self.stop_with(libc::SIGKILL)
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Err(e) = self.kill() {
            eprintln!("mesh-tests: cleanup of {}: {e:#}", self.name);
        }
    }
}

/// The last `n` lines of `text`, for error messages.
pub fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
