//! `meshctl ca ...`: create the mesh certificate authority.

use crate::cert::{check_new, parse_duration, parse_net, DAY};
use crate::Global;
use anyhow::Result;
use clap::Subcommand;
use ipnet::IpNet;
use mesh_proto::cert::{CaConstraints, CaParams, CaSigner};
use mesh_proto::files;
use mesh_proto::identity::TrustDomain;
use std::path::PathBuf;

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create a CA: an ed25519 key (ca.key, mode 0600) and a self-signed certificate
    #[command(after_help = "Examples:
  meshctl ca init --trust-domain example.org
  meshctl ca init --trust-domain example.org --validity 5y \\
      --allow-ip 100.64.0.0/10 --allow-ip fd00:6d65:7368::/48 --allow-group web --allow-group db")]
    Init {
        /// Trust domain of every identity this CA signs (spiffe://<trust-domain>/...)
        #[arg(long, value_name = "NAME")]
        trust_domain: TrustDomain,
        /// How long the CA is valid: e.g. 10y, 365d, 12h
        #[arg(long, value_name = "DURATION", default_value = "10y", value_parser = parse_duration)]
        validity: u64,
        /// Leaves may only use addresses inside this prefix (repeatable; default: any)
        #[arg(long = "allow-ip", value_name = "PREFIX", value_parser = parse_net)]
        allow_ip: Vec<IpNet>,
        /// Leaves may only carry this group (repeatable; default: any)
        #[arg(long = "allow-group", value_name = "GROUP")]
        allow_group: Vec<String>,
        /// Where to write the CA certificate
        #[arg(long, value_name = "PATH", default_value = "ca.crt")]
        cert: PathBuf,
        /// Where to write the CA signing key (mode 0600)
        #[arg(long, value_name = "PATH", default_value = "ca.key")]
        key: PathBuf,
        /// Replace existing files
        #[arg(long)]
        force: bool,
    },
}

pub fn run(cmd: Command, g: &Global) -> Result<()> {
    match cmd {
        Command::Init {
            trust_domain,
            validity,
            allow_ip,
            allow_group,
            cert,
            key,
            force,
        } => {
            check_new(&cert, force)?;
            check_new(&key, force)?;
            let params = CaParams {
                trust_domain,
                validity_secs: validity,
                constraints: CaConstraints {
                    addresses: allow_ip,
                    groups: allow_group,
                },
            };
            let signer = CaSigner::init(params, crate::now())?;
            // Key first: a certificate without its key is useless, the reverse is not.
            files::write_ca_key(&key, signer.signing_key())?;
            files::write_certificate(&cert, signer.cert())?;
            let c = signer.cert();
            if g.json {
                crate::print_json(&serde_json::json!({
                    "cert_file": cert,
                    "key_file": key,
                    "certificate": c.summary(),
                }))?;
            } else {
                outln!(
                    "wrote {} (CA {}, valid until {}, fingerprint {}) and {} (mode 0600)",
                    cert.display(),
                    c.identity(),
                    c.not_after(),
                    c.fingerprint(),
                    key.display()
                )?;
                if validity < DAY {
                    outln!("note: the CA expires in less than a day")?;
                }
            }
            Ok(())
        }
    }
}
