//! The on-disk rules shared by `meshd` and `meshctl`: private keys are readable only
//! by their owner, and files are replaced atomically (temp file in the same
//! directory, fsync, rename, fsync of the directory). Every error names the path.

use crate::cert::{Ca, CaSigningKey, CertError, Certificate, VerifyError};
use crate::key::{KeyError, PrivateKey};
use crate::signed::{PolicyPublicKey, PolicySigningKey, SignedError};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Files larger than this are refused before reading (certificates and keys are small).
pub const MAX_FILE_LEN: u64 = 1024 * 1024;

/// Mode for private keys and the CA signing key.
pub const PRIVATE_MODE: u32 = 0o600;
/// Mode for certificates (public).
pub const PUBLIC_MODE: u32 = 0o644;

/// A file operation that failed; Display names the path and says what to do.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}: private key is accessible by group or others (mode {mode:04o}); run: chmod 600 {}", path.display(), path.display())]
    Permissions { path: PathBuf, mode: u32 },
    #[error("{}: not a regular file", path.display())]
    NotAFile { path: PathBuf },
    #[error("{}: file is larger than {MAX_FILE_LEN} bytes", path.display())]
    TooLarge { path: PathBuf },
    #[error("{}: not UTF-8 text", path.display())]
    NotText { path: PathBuf },
    #[error("{}: {source}", path.display())]
    Key { path: PathBuf, source: KeyError },
    #[error("{}: {source}", path.display())]
    Cert { path: PathBuf, source: CertError },
    #[error("{}: {source}", path.display())]
    Verify { path: PathBuf, source: VerifyError },
    #[error("{}: {source}", path.display())]
    Signed { path: PathBuf, source: SignedError },
}

impl FileError {
    /// The file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            FileError::Io { path, .. }
            | FileError::Permissions { path, .. }
            | FileError::NotAFile { path }
            | FileError::TooLarge { path }
            | FileError::NotText { path }
            | FileError::Key { path, .. }
            | FileError::Cert { path, .. }
            | FileError::Verify { path, .. }
            | FileError::Signed { path, .. } => path,
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> FileError + '_ {
    move |source| FileError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Reads a small text file. With `private`, refuses one that group or others can
/// access in any way (`mode & 0o077 != 0`).
fn read_text(path: &Path, private: bool) -> Result<String, FileError> {
    let mut f = File::open(path).map_err(io_err(path))?;
    let meta = f.metadata().map_err(io_err(path))?;
    if !meta.is_file() {
        return Err(FileError::NotAFile {
            path: path.to_owned(),
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if private && mode & 0o077 != 0 {
        return Err(FileError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    if meta.len() > MAX_FILE_LEN {
        return Err(FileError::TooLarge {
            path: path.to_owned(),
        });
    }
    let mut buf = Vec::new();
    (&mut f)
        .take(MAX_FILE_LEN + 1)
        .read_to_end(&mut buf)
        .map_err(io_err(path))?;
    if buf.len() as u64 > MAX_FILE_LEN {
        return Err(FileError::TooLarge {
            path: path.to_owned(),
        });
    }
    String::from_utf8(buf).map_err(|_| FileError::NotText {
        path: path.to_owned(),
    })
}

/// Reads a WireGuard-format private key (one base64 line). Refuses a file that group
/// or others can access.
pub fn read_private_key(path: &Path) -> Result<PrivateKey, FileError> {
    let text = read_text(path, true)?;
    PrivateKey::from_base64(text.trim()).map_err(|source| FileError::Key {
        path: path.to_owned(),
        source,
    })
}

/// Writes a private key as one base64 line, mode 0600, atomically.
pub fn write_private_key(path: &Path, key: &PrivateKey) -> Result<(), FileError> {
    write_atomic(
        path,
        format!("{}\n", key.to_base64()).as_bytes(),
        PRIVATE_MODE,
    )
}

/// Reads a public key (one base64 line); permissions are not checked.
pub fn read_public_key(path: &Path) -> Result<crate::key::PublicKey, FileError> {
    let text = read_text(path, false)?;
    crate::key::PublicKey::from_base64(text.trim()).map_err(|source| FileError::Key {
        path: path.to_owned(),
        source,
    })
}

/// Reads an armored certificate (form only: verify it with `Ca::verify`).
pub fn read_certificate(path: &Path) -> Result<Certificate, FileError> {
    let text = read_text(path, false)?;
    Certificate::from_pem(&text).map_err(|source| FileError::Cert {
        path: path.to_owned(),
        source,
    })
}

/// Reads a CA certificate and checks that it is a self-signed CA ([`Ca::new`]).
pub fn read_ca(path: &Path) -> Result<Ca, FileError> {
    Ca::new(read_certificate(path)?).map_err(|source| FileError::Verify {
        path: path.to_owned(),
        source,
    })
}

/// Writes a certificate, mode 0644, atomically.
pub fn write_certificate(path: &Path, cert: &Certificate) -> Result<(), FileError> {
    write_atomic(path, cert.as_pem().as_bytes(), PUBLIC_MODE)
}

/// Reads a CA signing key. Refuses a file that group or others can access.
pub fn read_ca_key(path: &Path) -> Result<CaSigningKey, FileError> {
    let text = read_text(path, true)?;
    CaSigningKey::from_pem(&text).map_err(|source| FileError::Cert {
        path: path.to_owned(),
        source,
    })
}

/// Writes a CA signing key, mode 0600, atomically.
pub fn write_ca_key(path: &Path, key: &CaSigningKey) -> Result<(), FileError> {
    write_atomic(path, key.to_pem().as_bytes(), PRIVATE_MODE)
}

/// Reads a policy signing key. Refuses a file that group or others can access.
pub fn read_policy_key(path: &Path) -> Result<PolicySigningKey, FileError> {
    let text = read_text(path, true)?;
    PolicySigningKey::from_pem(&text).map_err(|source| FileError::Signed {
        path: path.to_owned(),
        source,
    })
}

/// Writes a policy signing key, mode 0600, atomically.
pub fn write_policy_key(path: &Path, key: &PolicySigningKey) -> Result<(), FileError> {
    write_atomic(path, key.to_pem().as_bytes(), PRIVATE_MODE)
}

/// Reads a policy public key (`[store] policy_keys`, `meshctl policy key gen`'s `.pub`).
pub fn read_policy_public_key(path: &Path) -> Result<PolicyPublicKey, FileError> {
    let text = read_text(path, false)?;
    PolicyPublicKey::from_pem(&text).map_err(|source| FileError::Signed {
        path: path.to_owned(),
        source,
    })
}

/// Writes a policy public key, mode 0644, atomically.
pub fn write_policy_public_key(path: &Path, key: &PolicyPublicKey) -> Result<(), FileError> {
    write_atomic(path, key.to_pem().as_bytes(), PUBLIC_MODE)
}

/// Replaces `path` with `data` so that readers see the old file or the new one, never
/// a mix: a temp file in the same directory (created with `mode`, never wider), data
/// fsynced, renamed over `path`, the directory fsynced. On error the temp file is
/// removed and `path` is untouched.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), FileError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().ok_or_else(|| FileError::NotAFile {
        path: path.to_owned(),
    })?;
    let tmp = dir.join(format!(
        ".{}.tmp.{}.{}",
        name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask may have narrowed `mode`; set it exactly.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    result.map_err(|source| {
        let _ = fs::remove_file(&tmp);
        FileError::Io {
            path: path.to_owned(),
            source,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestCa;

    fn tmpdir(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("mesh-proto-files-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn private_key_round_trip_and_mode() {
        let d = tmpdir("key");
        let p = d.join("a.key");
        let k = PrivateKey::generate();
        write_private_key(&p, &k).unwrap();
        assert_eq!(mode(&p), 0o600);
        assert_eq!(read_private_key(&p).unwrap().as_bytes(), k.as_bytes());
        // Overwrite keeps the mode and replaces the content.
        let k2 = PrivateKey::generate();
        write_private_key(&p, &k2).unwrap();
        assert_eq!(read_private_key(&p).unwrap().as_bytes(), k2.as_bytes());
        assert_eq!(
            fs::read_dir(&d).unwrap().count(),
            1,
            "temp files left behind"
        );
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn readable_key_is_refused_with_fix() {
        let d = tmpdir("perm");
        let p = d.join("a.key");
        write_private_key(&p, &PrivateKey::generate()).unwrap();
        for m in [0o644, 0o640, 0o604, 0o660, 0o700 | 0o010] {
            fs::set_permissions(&p, fs::Permissions::from_mode(m)).unwrap();
            let err = read_private_key(&p).unwrap_err();
            assert!(matches!(err, FileError::Permissions { .. }));
            let msg = err.to_string();
            assert!(msg.contains(&format!("chmod 600 {}", p.display())), "{msg}");
            assert_eq!(err.path(), p);
        }
        fs::set_permissions(&p, fs::Permissions::from_mode(0o400)).unwrap();
        assert!(read_private_key(&p).is_ok());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn errors_name_the_path() {
        let d = tmpdir("errs");
        let missing = d.join("missing.crt");
        let err = read_certificate(&missing).unwrap_err().to_string();
        assert!(err.starts_with(&missing.display().to_string()), "{err}");
        let bad = d.join("bad.crt");
        fs::write(&bad, "garbage").unwrap();
        let err = read_certificate(&bad).unwrap_err().to_string();
        assert!(
            err.contains("bad.crt") && err.contains("not a mesh certificate"),
            "{err}"
        );
        let badkey = d.join("bad.key");
        write_atomic(&badkey, b"nope\n", 0o600).unwrap();
        let err = read_private_key(&badkey).unwrap_err().to_string();
        assert!(err.contains("bad.key") && err.contains("32 bytes"), "{err}");
        let err = read_certificate(&d).unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn certificate_and_ca_key_files() {
        let d = tmpdir("cert");
        let ca = TestCa::new("t");
        let (leaf, _) = ca.leaf("spiffe://t/a", &["100.64.0.1/32"]);
        let cp = d.join("a.crt");
        write_certificate(&cp, &leaf).unwrap();
        assert_eq!(mode(&cp), 0o644);
        assert_eq!(read_certificate(&cp).unwrap(), leaf);
        let kp = d.join("ca.key");
        write_ca_key(&kp, ca.signer().signing_key()).unwrap();
        assert_eq!(mode(&kp), 0o600);
        let key = read_ca_key(&kp).unwrap();
        let ca_path = d.join("ca.crt");
        write_certificate(&ca_path, ca.cert()).unwrap();
        assert_eq!(
            read_ca(&ca_path).unwrap().fingerprint(),
            ca.cert().fingerprint()
        );
        let err = read_ca(&cp).unwrap_err().to_string();
        assert!(
            err.contains("a.crt") && err.contains("a leaf cannot sign"),
            "{err}"
        );
        assert_eq!(key.public_key(), ca.signer().signing_key().public_key());
        fs::set_permissions(&kp, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            read_ca_key(&kp),
            Err(FileError::Permissions { .. })
        ));
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn policy_key_files() {
        let d = tmpdir("policy-key");
        let kp = d.join("policy.key");
        let pp = d.join("policy.pub");
        let key = PolicySigningKey::generate();
        write_policy_key(&kp, &key).unwrap();
        write_policy_public_key(&pp, &key.public_key()).unwrap();
        assert_eq!((mode(&kp), mode(&pp)), (0o600, 0o644));
        assert_eq!(read_policy_key(&kp).unwrap().public_key(), key.public_key());
        assert_eq!(read_policy_public_key(&pp).unwrap(), key.public_key());
        // The private key's mode is checked, and each file is only what it says.
        fs::set_permissions(&kp, fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(
            read_policy_key(&kp),
            Err(FileError::Permissions { .. })
        ));
        let err = read_policy_public_key(&kp).unwrap_err().to_string();
        assert!(
            err.contains("policy.key") && err.contains("MESH POLICY PUBLIC KEY"),
            "{err}"
        );
        fs::remove_dir_all(&d).unwrap();
    }
}
