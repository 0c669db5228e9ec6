//! Process isolation: the test binary moves itself into fresh network and mount
//! namespaces before `main`, so every namespace, link and mount a test makes dies with
//! the process, even on abort or SIGKILL.
//!
//! Each test file calls [`crate::isolate!`] once; it installs a `#[ctor]` that runs
//! [`isolate_process`] while the process is still single-threaded (unsharing a mount
//! namespace is refused once threads exist).

use std::ffi::CString;
use std::sync::OnceLock;

/// What happened when the process tried to isolate itself.
static STATE: OnceLock<Result<(), String>> = OnceLock::new();

/// Environment variable that turns "no privileges" from a failure into a skip.
pub const SKIP_ENV: &str = "MESH_SKIP_NETNS";

/// Runs before `main` (from the `#[ctor]` that [`crate::isolate!`] installs):
/// `unshare(CLONE_NEWNET | CLONE_NEWNS)`, make every mount private (so nothing we
/// mount leaks back to the host), and mount a private tmpfs on `/run/netns` (so named
/// namespaces made by `ip netns add` live and die with this process).
pub fn isolate_process() {
    let result = isolate_inner();
    let _ = STATE.set(result);
}

fn isolate_inner() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("the netns tests need root (CAP_SYS_ADMIN and CAP_NET_ADMIN); run them as root, e.g. `sudo -E cargo test -p mesh-tests`".into());
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Err("/dev/net/tun is missing: meshd needs a TUN device (load the `tun` module, or run the container with --device /dev/net/tun)".into());
    }
    // SAFETY: called from a constructor before main, while the process has one thread.
    if unsafe { libc::unshare(libc::CLONE_NEWNET | libc::CLONE_NEWNS) } != 0 {
        return Err(format!(
            "unshare(CLONE_NEWNET|CLONE_NEWNS) failed: {} (the netns tests need CAP_SYS_ADMIN)",
            std::io::Error::last_os_error()
        ));
    }
    mount(None, "/", None, libc::MS_REC | libc::MS_PRIVATE, None)
        .map_err(|e| format!("making mounts private failed: {e}"))?;
    std::fs::create_dir_all("/run/netns").map_err(|e| format!("mkdir /run/netns: {e}"))?;
    mount(
        Some("tmpfs"),
        "/run/netns",
        Some("tmpfs"),
        0,
        Some("mode=0755"),
    )
    .map_err(|e| format!("mounting a private tmpfs on /run/netns failed: {e}"))?;
    // The test process's own namespace is empty; bring loopback up for local tools.
    let status = std::process::Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .map_err(|e| format!("running `ip` failed: {e} (install iproute2)"))?;
    if !status.success() {
        return Err("`ip link set lo up` failed in the test namespace".into());
    }
    Ok(())
}

fn mount(
    source: Option<&str>,
    target: &str,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> std::io::Result<()> {
    let c = |s: &str| CString::new(s).map_err(|_| std::io::Error::other("NUL in mount argument"));
    let source = source.map(c).transpose()?;
    let target = c(target)?;
    let fstype = fstype.map(c).transpose()?;
    let data = data.map(c).transpose()?;
    let ptr = |s: &Option<CString>| s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: every pointer is either null or a NUL-terminated string that outlives the call.
    let rc = unsafe {
        libc::mount(
            ptr(&source),
            target.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Whether netns tests can run in this process.
#[derive(Debug)]
pub enum Availability {
    Ready,
    /// Not possible here, and `MESH_SKIP_NETNS=1` asks to skip: the note says why.
    Skip(String),
}

/// `Ok(Ready)` when the process isolated itself; `Ok(Skip)` when it could not and
/// `MESH_SKIP_NETNS=1` is set; otherwise an error that says what is missing.
pub fn availability() -> anyhow::Result<Availability> {
    let state = STATE.get().cloned().unwrap_or_else(|| {
        Err("this test binary did not isolate itself: add `mesh_tests::isolate!();` at the top of the test file".into())
    });
    match state {
        Ok(()) => Ok(Availability::Ready),
        Err(why) if std::env::var(SKIP_ENV).as_deref() == Ok("1") => Ok(Availability::Skip(why)),
        Err(why) => Err(anyhow::anyhow!(
            "netns test cannot run: {why}. Set {SKIP_ENV}=1 to skip the netns tests on purpose"
        )),
    }
}

/// Installs the constructor that isolates this test binary (see the module docs).
/// Put it once at the top of every test file that uses [`crate::Mesh`].
#[macro_export]
macro_rules! isolate {
    () => {
        #[$crate::ctor::ctor]
        fn __mesh_tests_isolate() {
            $crate::isolate::isolate_process();
        }
    };
}
