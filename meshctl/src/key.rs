//! `meshctl key ...`: x25519 keys in WireGuard's format.

use crate::cert::check_new;
use crate::Global;
use anyhow::{Context, Result};
use clap::Subcommand;
use mesh_proto::files;
use mesh_proto::key::PrivateKey;
use std::io::Read;
use std::path::PathBuf;

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Generate a private key: into a file (mode 0600, prints the public key) or to stdout
    #[command(after_help = "Examples:
  meshctl key gen --out web.key        # writes web.key (0600), prints the public key
  meshctl key gen | meshctl key pub    # like wg genkey | wg pubkey")]
    Gen {
        /// Write the private key here (mode 0600) instead of printing it
        #[arg(long, value_name = "PATH")]
        out: Option<PathBuf>,
        /// Replace an existing file
        #[arg(long)]
        force: bool,
    },
    /// Print the public key of a private key (from a file, or stdin)
    #[command(after_help = "Examples:
  meshctl key pub web.key
  meshctl key gen | meshctl key pub")]
    Pub {
        /// Private key file (mode 0600); `-` or absent: read stdin
        #[arg(value_name = "FILE")]
        file: Option<PathBuf>,
    },
}

pub fn run(cmd: Command, g: &Global) -> Result<()> {
    match cmd {
        Command::Gen { out, force } => {
            let key = PrivateKey::generate();
            let public = key.public_key();
            match out {
                Some(path) => {
                    check_new(&path, force)?;
                    files::write_private_key(&path, &key)?;
                    if g.json {
                        crate::print_json(&serde_json::json!({
                            "key_file": path, "public_key": public,
                        }))?;
                    } else {
                        outln!("{public}")?;
                    }
                }
                None if g.json => crate::print_json(&serde_json::json!({
                    "private_key": key.to_base64(), "public_key": public,
                }))?,
                None => outln!("{}", key.to_base64())?,
            }
            Ok(())
        }
        Command::Pub { file } => {
            let key = match file {
                Some(p) if p.as_os_str() != "-" => files::read_private_key(&p)?,
                _ => {
                    let mut s = String::new();
                    std::io::stdin()
                        .take(4096)
                        .read_to_string(&mut s)
                        .context("stdin")?;
                    PrivateKey::from_base64(s.trim()).context("stdin")?
                }
            };
            let public = key.public_key();
            if g.json {
                crate::print_json(&serde_json::json!({ "public_key": public }))?;
            } else {
                outln!("{public}")?;
            }
            Ok(())
        }
    }
}
