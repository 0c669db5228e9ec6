//! `meshctl cert ...`: issue, renew, show and verify mesh certificates.

use crate::Global;
use anyhow::{anyhow, bail, Context, Result};
use clap::Subcommand;
use ipnet::IpNet;
use mesh_proto::cert::{parse_time, CaSigner, CertKind, Certificate, LeafParams, VerifyError};
use mesh_proto::files;
use mesh_proto::identity::SpiffeId;
use mesh_proto::key::{PrivateKey, PublicKey};
use mesh_proto::time::UnixTime;
use std::io::Read;
use std::path::{Path, PathBuf};

pub const DAY: u64 = 86_400;
/// Leaves are valid for a year unless `--validity` says otherwise (and never past the CA).
const DEFAULT_LEAF_VALIDITY: u64 = 365 * DAY;

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Issue a leaf certificate binding an identity, addresses and groups to a key
    #[command(after_help = "Examples:
  # new key pair: writes web.crt and web.key (0600)
  meshctl cert issue --identity spiffe://example.org/web --ip 100.64.0.1 \\
      --ip fd00:6d65:7368::1 --group frontend --out web.crt
  # for an existing key (base64, or a file holding it)
  meshctl cert issue --identity spiffe://example.org/db --ip 100.64.0.2 \\
      --pub \"$(meshctl key pub db.key)\" --validity 90d --out db.crt")]
    Issue {
        /// The workload's SPIFFE ID, spiffe://<trust-domain>/<path>
        #[arg(long, value_name = "SPIFFE_ID")]
        identity: SpiffeId,
        /// Overlay address or prefix (repeatable, at least one): 100.64.0.1, 100.64.1.0/24
        #[arg(long, value_name = "ADDR", required = true, value_parser = parse_net)]
        ip: Vec<IpNet>,
        /// Group for policy (repeatable)
        #[arg(long, value_name = "GROUP")]
        group: Vec<String>,
        /// How long the certificate is valid: e.g. 365d, 12h (default: 365d, capped at the CA's expiry)
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        validity: Option<u64>,
        /// The workload's public key (base64, or a file holding it); default: generate a key pair
        #[arg(long = "pub", value_name = "KEY")]
        public: Option<String>,
        /// Where to write the certificate
        #[arg(long, value_name = "PATH")]
        out: PathBuf,
        /// Where to write a generated private key (default: --out with extension .key)
        #[arg(long, value_name = "PATH", conflicts_with = "public")]
        key_out: Option<PathBuf>,
        #[command(flatten)]
        signing: SigningCa,
        /// Replace existing files
        #[arg(long)]
        force: bool,
    },
    /// Issue a certificate's successor: the same identity, addresses, groups and key,
    /// valid from now; written over the old file (atomically) unless --out names another
    #[command(after_help = "Examples:
  # in place: a running meshd takes its renewed node.cert within a second
  meshctl cert renew web.crt
  # 90 days, to another file (then hand it to the peers: meshctl peer add web-next.crt)
  meshctl cert renew web.crt --validity 90d --out web-next.crt")]
    Renew {
        /// The certificate to renew (expired or not)
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// How long the new certificate is valid: e.g. 365d, 12h (default: 365d, capped at the CA's expiry)
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        validity: Option<u64>,
        /// Where to write the new certificate (default: over FILE)
        #[arg(long, value_name = "PATH")]
        out: Option<PathBuf>,
        #[command(flatten)]
        signing: SigningCa,
        /// Replace an existing --out file
        #[arg(long)]
        force: bool,
    },
    /// Print a certificate's fields (without verifying it)
    #[command(after_help = "Examples:
  meshctl cert show web.crt
  meshctl cert show --json web.crt")]
    Show {
        /// Certificate file; `-` reads stdin
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Verify a leaf certificate against a CA: signature, issuer, validity, constraints
    #[command(after_help = "Examples:
  meshctl cert verify --ca ca.crt web.crt
  meshctl cert verify --ca ca.crt --at 2027-01-01T00:00:00Z web.crt")]
    Verify {
        /// CA certificate
        #[arg(long, value_name = "PATH", default_value = "ca.crt")]
        ca: PathBuf,
        /// Verify as of this time (RFC 3339 UTC, or Unix seconds) instead of now
        #[arg(long, value_name = "TIME", value_parser = parse_at)]
        at: Option<UnixTime>,
        /// Leaf certificate file; `-` reads stdin
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
}

/// The CA that signs: `--ca` and `--ca-key`.
#[derive(clap::Args, Debug)]
pub struct SigningCa {
    /// CA certificate
    #[arg(long, value_name = "PATH", default_value = "ca.crt")]
    ca: PathBuf,
    /// CA signing key (mode 0600)
    #[arg(long, value_name = "PATH", default_value = "ca.key")]
    ca_key: PathBuf,
}

pub fn run(cmd: Command, g: &Global) -> Result<()> {
    match cmd {
        Command::Issue {
            identity,
            ip,
            group,
            validity,
            public,
            out,
            key_out,
            signing,
            force,
        } => {
            let signer = signer(&signing)?;
            let now = crate::now();
            let validity = leaf_validity(&signer, validity, now);
            let (public_key, new_key) = match public {
                Some(p) => (read_public(&p)?, None),
                None => {
                    let key = PrivateKey::generate();
                    let path = key_out.unwrap_or_else(|| out.with_extension("key"));
                    (key.public_key(), Some((path, key)))
                }
            };
            check_new(&out, force)?;
            if let Some((path, _)) = &new_key {
                if *path == out {
                    bail!(
                        "{}: the certificate and the new private key would share this path; pass --key-out",
                        out.display()
                    );
                }
                check_new(path, force)?;
            }
            let params = LeafParams {
                identity,
                addresses: ip,
                groups: group,
                public_key,
                validity_secs: validity,
            };
            let cert = signer.issue(params, now)?;
            if let Some((path, key)) = &new_key {
                files::write_private_key(path, key)?;
            }
            files::write_certificate(&out, &cert)?;
            let key_file = new_key.as_ref().map(|(p, _)| p.clone());
            if g.json {
                crate::print_json(&serde_json::json!({
                    "cert_file": out,
                    "key_file": key_file,
                    "certificate": cert.summary(),
                }))?;
            } else {
                let addrs: Vec<String> = cert.addresses().iter().map(|a| a.to_string()).collect();
                out!(
                    "wrote {} ({}, {}, valid until {})",
                    out.display(),
                    cert.identity(),
                    addrs.join(" "),
                    cert.not_after()
                )?;
                match key_file {
                    Some(k) => outln!(" and {} (mode 0600)", k.display())?,
                    None => outln!()?,
                }
            }
            Ok(())
        }
        Command::Renew {
            file,
            validity,
            out,
            signing,
            force,
        } => {
            let old = files::read_certificate(&file)?;
            if old.kind() == CertKind::Ca {
                bail!(
                    "{}: a CA certificate; renew leaves with this command",
                    file.display()
                );
            }
            let signer = signer(&signing)?;
            let out = match out {
                Some(o) if o != file => {
                    check_new(&o, force)?;
                    o
                }
                _ => file.clone(),
            };
            let now = crate::now();
            let params = LeafParams {
                identity: old.identity().clone(),
                addresses: old.addresses().to_vec(),
                groups: old.groups().to_vec(),
                public_key: PublicKey::from(*old.public_key()),
                validity_secs: leaf_validity(&signer, validity, now),
            };
            let cert = signer
                .issue(params, now)
                .with_context(|| format!("renewing {}", file.display()))?;
            files::write_certificate(&out, &cert)?;
            if g.json {
                crate::print_json(&serde_json::json!({
                    "cert_file": out,
                    "renewed": file,
                    "previous_not_after": old.not_after().to_string(),
                    "certificate": cert.summary(),
                }))?;
            } else {
                outln!(
                    "wrote {} ({}, valid until {}; {} was valid until {})",
                    out.display(),
                    cert.identity(),
                    cert.not_after(),
                    file.display(),
                    old.not_after()
                )?;
            }
            Ok(())
        }
        Command::Show { file } => {
            let cert = read_cert(&file)?;
            if g.json {
                crate::print_json(&cert.summary())?;
            } else {
                out!("{}", human(&cert))?;
            }
            Ok(())
        }
        Command::Verify { ca, at, file } => {
            let ca_name = ca.display();
            let ca = files::read_ca(&ca)?;
            let leaf = read_cert(&file)?;
            let now = at.unwrap_or_else(crate::now);
            let v = ca.verify(&leaf, now).map_err(|e| match e {
                VerifyError::CaExpired(_) | VerifyError::CaNotYetValid(_) => {
                    anyhow!("{ca_name}: {e}")
                }
                e => anyhow!("{}: {e}", file.display()),
            })?;
            if g.json {
                crate::print_json(&serde_json::json!({
                    "ok": true,
                    "identity": v.identity(),
                    "addresses": v.addresses(),
                    "groups": v.groups(),
                    "not_after": v.not_after().to_string(),
                    "fingerprint": v.fingerprint(),
                    "ca": ca.fingerprint(),
                }))?;
            } else {
                outln!(
                    "ok: {} signed by {} ({}), valid until {}",
                    v.identity(),
                    ca.trust_domain(),
                    ca_name,
                    v.not_after()
                )?;
            }
            Ok(())
        }
    }
}

/// The CA that signs: its certificate and signing key, checked to belong together.
fn signer(s: &SigningCa) -> Result<CaSigner> {
    CaSigner::from_parts(
        files::read_certificate(&s.ca)?,
        files::read_ca_key(&s.ca_key)?,
    )
    .map_err(|e| anyhow!("{} with {}: {e}", s.ca.display(), s.ca_key.display()))
}

/// `--validity`, or a year, never past the CA's own end.
fn leaf_validity(signer: &CaSigner, validity: Option<u64>, now: UnixTime) -> u64 {
    validity.unwrap_or_else(|| {
        DEFAULT_LEAF_VALIDITY.min(signer.cert().not_after().secs().saturating_sub(now.secs()))
    })
}

/// A certificate from a file, or stdin for `-`.
fn read_cert(path: &Path) -> Result<Certificate> {
    if path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin()
            .take(mesh_proto::cert::MAX_CERT_LEN as u64 + 1)
            .read_to_string(&mut s)
            .context("stdin")?;
        return Certificate::from_pem(&s).context("stdin");
    }
    Ok(files::read_certificate(path)?)
}

/// `--pub`: a base64 key, or a file holding one.
fn read_public(v: &str) -> Result<PublicKey> {
    if let Ok(k) = PublicKey::from_base64(v) {
        return Ok(k);
    }
    let p = Path::new(v);
    if let Ok(meta) = std::fs::metadata(p) {
        // A file only its owner may read is almost certainly a private key; putting
        // its bytes into a certificate would publish it.
        use std::os::unix::fs::PermissionsExt;
        if meta.is_file() && meta.permissions().mode() & 0o044 == 0 {
            bail!(
                "{v}: looks like a private key (readable only by its owner); pass the public key: --pub \"$(meshctl key pub {v})\""
            );
        }
        return Ok(files::read_public_key(p)?);
    }
    bail!("--pub {v:?}: not a base64 public key (44 characters) and no such file")
}

/// The people's view of `cert show`.
fn human(c: &Certificate) -> String {
    let join = |v: Vec<String>| {
        if v.is_empty() {
            "-".to_owned()
        } else {
            v.join(", ")
        }
    };
    let mut out = String::new();
    let mut row = |k: &str, v: String| out.push_str(&format!("{k:<18}{v}\n"));
    row("kind", c.kind().to_string());
    row("identity", c.identity().to_string());
    match (c.kind(), c.ca_constraints()) {
        (CertKind::Ca, Some(k)) => {
            row("trust domain", c.identity().trust_domain().to_string());
            let any = |v: Vec<String>| {
                if v.is_empty() {
                    "any".to_owned()
                } else {
                    v.join(", ")
                }
            };
            row(
                "allowed addresses",
                any(k.addresses.iter().map(|a| a.to_string()).collect()),
            );
            row("allowed groups", any(k.groups.clone()));
        }
        _ => {
            row(
                "addresses",
                join(c.addresses().iter().map(|a| a.to_string()).collect()),
            );
            row("groups", join(c.groups().to_vec()));
        }
    }
    row(
        "public key",
        PublicKey::from_bytes(*c.public_key()).to_string(),
    );
    row("not before", c.not_before().to_string());
    row("not after", c.not_after().to_string());
    row("serial", c.serial().to_string());
    let issuer = if c.kind() == CertKind::Ca {
        "self".to_owned()
    } else {
        c.issuer().to_string()
    };
    row("issuer", issuer);
    row("fingerprint", c.fingerprint().to_string());
    out
}

/// Refuses to replace an existing file unless `--force`.
pub fn check_new(path: &Path, force: bool) -> Result<()> {
    if !force && path.exists() {
        bail!(
            "{}: already exists (use --force to replace it)",
            path.display()
        );
    }
    Ok(())
}

/// `100.64.0.1` (a host: /32 or /128) or `100.64.0.0/10` (a prefix).
pub fn parse_net(s: &str) -> Result<IpNet, String> {
    if let Ok(n) = s.parse::<IpNet>() {
        return Ok(n);
    }
    s.parse::<std::net::IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("{s:?} is not an IP address or prefix"))
}

/// `90d`, `12h`, `30m`, `45s`, `5y` (365 days), or plain seconds.
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 365d, 12h, 30m"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => DAY,
        "y" => 365 * DAY,
        _ => {
            return Err(format!(
                "{s:?}: unknown unit {unit:?} (use s, m, h, d or y)"
            ))
        }
    };
    match n.checked_mul(mult) {
        Some(0) => Err("duration must be positive".into()),
        Some(v) => Ok(v),
        None => Err(format!("{s:?} is too long")),
    }
}

/// `--at`: RFC 3339 UTC (`2027-01-01T00:00:00Z`) or Unix seconds.
fn parse_at(s: &str) -> Result<UnixTime, String> {
    if let Ok(n) = s.parse::<u64>() {
        return Ok(UnixTime(n));
    }
    parse_time(s).ok_or_else(|| format!("{s:?}: expected a time like 2027-01-01T00:00:00Z"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90d"), Ok(90 * DAY));
        assert_eq!(parse_duration("12h"), Ok(12 * 3600));
        assert_eq!(parse_duration("3600"), Ok(3600));
        assert_eq!(parse_duration("1y"), Ok(365 * DAY));
        assert!(parse_duration("0d").is_err());
        assert!(parse_duration("d").is_err());
        assert!(parse_duration("5w").is_err());
        assert!(parse_duration("99999999999999999999y").is_err());
    }

    #[test]
    fn nets() {
        assert_eq!(
            parse_net("100.64.0.1").unwrap().to_string(),
            "100.64.0.1/32"
        );
        assert_eq!(parse_net("fd00::1").unwrap().to_string(), "fd00::1/128");
        assert_eq!(
            parse_net("100.64.0.0/10").unwrap().to_string(),
            "100.64.0.0/10"
        );
        assert!(parse_net("nope").is_err());
    }
}
