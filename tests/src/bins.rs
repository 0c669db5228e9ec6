//! The workspace binaries the harness runs, found next to the test executable.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Where the workspace's binaries are (next to the test executable).
#[derive(Debug)]
pub struct Bins {
    pub meshd: PathBuf,
    pub meshctl: PathBuf,
    pub testtool: PathBuf,
}

impl Bins {
    /// `target/<profile>/{meshd,meshctl,mesh-testtool}`, found from the test executable
    /// (`target/<profile>/deps/<test>-<hash>`).
    pub fn locate() -> Result<Bins> {
        let exe = std::env::current_exe().context("finding the test executable")?;
        let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
        if dir.ends_with("deps") {
            dir.pop();
        }
        let find = |name: &str| -> Result<PathBuf> {
            let p = dir.join(name);
            if p.is_file() {
                Ok(p)
            } else {
                bail!(
                    "{} not found: build the binaries first with `cargo build --workspace --bins` \
                     (the netns tests run the real meshd and meshctl)",
                    p.display()
                )
            }
        };
        let bins = Bins {
            meshd: find("meshd")?,
            meshctl: find("meshctl")?,
            testtool: find("mesh-testtool")?,
        };
        // `cargo test -p mesh-tests` does not rebuild meshd: refuse to test a stale one.
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        for (bin, crates) in [
            (&bins.meshd, &["meshd", "proto"][..]),
            (&bins.meshctl, &["meshctl", "proto"][..]),
        ] {
            let built = modified(bin).unwrap_or(std::time::SystemTime::UNIX_EPOCH);
            for c in crates {
                if let Some(newer) = newest_source(&root.join(c).join("src"), built) {
                    bail!(
                        "{} is older than {}: rebuild with `cargo build --workspace --bins`",
                        bin.display(),
                        newer.display()
                    );
                }
            }
        }
        Ok(bins)
    }
}

fn modified(p: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// A `.rs` file under `dir` modified after `than`, if any. Test suites (`tests.rs`,
/// compiled only under `cfg(test)`) are not part of a binary: cargo does not rebuild
/// one for them, so they would make the check fail for good.
fn newest_source(dir: &Path, than: std::time::SystemTime) -> Option<PathBuf> {
    let entries = std::fs::read_dir(dir).ok()?;
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            if let Some(n) = newest_source(&p, than) {
                return Some(n);
            }
        } else if p.extension().is_some_and(|x| x == "rs")
            && !p.ends_with("tests.rs")
            && modified(&p).is_some_and(|m| m > than)
        {
            return Some(p);
        }
    }
    None
}
