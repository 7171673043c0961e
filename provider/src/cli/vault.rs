//! `vault create | key | fingerprint` and `operator-cert`: the local commands that make
//! a vault, its host registration key file and operator certificates, and show the
//! CA's fingerprint hosts pin, on the provider's data dir (no connection to a running
//! provider).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;
use clap::{Args, Subcommand};
use serde::Serialize;
use siterecovery_proto::model::units::parse_duration;

use crate::vault;

#[derive(Subcommand)]
pub enum VaultCmd {
    /// Create a new vault: CA, provider certificate, store, and a vault key file.
    Create {
        #[arg(long)]
        name: String,
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// Address hosts and operators use to reach this provider (HOST:PORT).
        #[arg(long, value_name = "ADDR")]
        address: String,
        /// Where to write the vault key file (hand it to hosts to register).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Lifetime of the registration secret.
        #[arg(long, default_value = "5d", value_parser = parse_duration)]
        expiry: Duration,
    },
    /// Issue a new vault key file; the previous registration secret stops working.
    Key {
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        #[arg(long, default_value = "5d", value_parser = parse_duration)]
        expiry: Duration,
    },
    /// Print the CA's SHA-256 fingerprint, for `agent register --ca-fingerprint`.
    Fingerprint {
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
    },
}

// `operator-cert`.
#[derive(Args)]
pub struct OperatorCertArgs {
    #[arg(long, value_name = "DIR")]
    data_dir: PathBuf,
    #[arg(long, value_name = "OPDIR")]
    out: PathBuf,
    /// Operator name recorded in the certificate.
    #[arg(long, default_value = "operator")]
    name: String,
    /// Validity of the certificate.
    #[arg(long, default_value = "365d", value_parser = parse_duration)]
    validity: Duration,
}

/// `--json` of `vault create`.
#[derive(Serialize)]
struct VaultCreated<'a> {
    address: &'a str,
    ca_fingerprint: &'a str,
    name: &'a str,
    /// The `agent register` line to run on each host (HOST, SITE, ... to fill in).
    register_command: &'a str,
    vault_id: String,
    vault_key: &'a Path,
}

/// `--json` of `vault fingerprint`.
#[derive(Serialize)]
struct Fingerprint<'a> {
    ca_fingerprint: &'a str,
}

/// The `agent register` line that pins the CA by `fingerprint`, with the host's own
/// values as placeholders.
fn register_command(key: &Path, fingerprint: &str) -> String {
    format!(
        "agent register --vault-key {} --ca-fingerprint {fingerprint} --host HOST --site SITE --cloud CLOUD \
         --data-dir DIR --listen ADDR",
        key.display()
    )
}

/// `--json` of `operator-cert`.
#[derive(Serialize)]
struct OperatorCertIssued<'a> {
    dir: &'a Path,
    identity: String,
}

/// `vault create | key`.
pub fn run(cmd: VaultCmd, json: bool) -> Result<()> {
    match cmd {
        VaultCmd::Create { name, data_dir, address, out, expiry } => {
            let v = vault::create(&data_dir, &name, &address, &out, expiry)?;
            let fingerprint = vault::ca_fingerprint(&data_dir)?;
            let register = register_command(&out, &fingerprint);
            if json {
                let view = VaultCreated {
                    address: &v.info.address,
                    ca_fingerprint: &fingerprint,
                    name: &v.info.name,
                    register_command: &register,
                    vault_id: v.info.vault_id.to_string(),
                    vault_key: &out,
                };
                println!("{}", serde_json::to_string(&view)?);
            } else {
                println!("vault {} ({}) created in {}", v.info.name, v.info.vault_id, data_dir.display());
                println!("vault key file: {} (registration secret valid {})", out.display(), lifetime(expiry));
                println!("CA fingerprint: {fingerprint}");
                println!("next: provider serve --data-dir {}", data_dir.display());
                println!("then on each host (the fingerprint refuses a forged vault key file):");
                println!("  {register}");
            }
        }
        VaultCmd::Key { data_dir, out, expiry } => {
            let v = vault::Vault::open(&data_dir)?;
            // Works while `provider serve` runs: the secret is a file, not in the store.
            v.issue_key_file(&out, expiry)?;
            println!("vault key file written to {}; the previous one no longer registers hosts", out.display());
        }
        VaultCmd::Fingerprint { data_dir } => {
            let fingerprint = vault::ca_fingerprint(&data_dir)?;
            if json {
                println!("{}", serde_json::to_string(&Fingerprint { ca_fingerprint: &fingerprint })?);
            } else {
                println!("{fingerprint}");
            }
        }
    }
    Ok(())
}

/// `operator-cert`.
pub fn operator_cert(a: OperatorCertArgs, json: bool) -> Result<()> {
    let v = vault::Vault::open(&a.data_dir)?;
    let id = v.issue_operator_cert(&a.out, &a.name, a.validity)?;
    if json {
        println!("{}", serde_json::to_string(&OperatorCertIssued { dir: &a.out, identity: id.uri() })?);
    } else {
        println!("operator certificate for {} written to {} (ca.pem, op.pem, op.key)", id.uri(), a.out.display());
        println!("use: provider --connect {} --certs {} host list", v.info.address, a.out.display());
    }
    Ok(())
}

/// "5 days", "12 hours" or "90 s": how long a registration secret stays valid.
fn lifetime(d: Duration) -> String {
    let s = d.as_secs();
    if s.is_multiple_of(86400) {
        format!("{} days", s / 86400)
    } else if s.is_multiple_of(3600) {
        format!("{} hours", s / 3600)
    } else {
        format!("{s} s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes_and_json() {
        assert_eq!(lifetime(Duration::from_secs(5 * 86400)), "5 days");
        assert_eq!(lifetime(Duration::from_secs(7200)), "2 hours");
        assert_eq!(lifetime(Duration::from_secs(90)), "90 s");
        let v = VaultCreated {
            address: "a:1",
            ca_fingerprint: "sha256:ab",
            name: "lab",
            register_command: "agent register",
            vault_id: "v-1".into(),
            vault_key: Path::new("/k"),
        };
        assert_eq!(
            serde_json::to_string(&v).ok().as_deref(),
            Some(
                r#"{"address":"a:1","ca_fingerprint":"sha256:ab","name":"lab","register_command":"agent register","vault_id":"v-1","vault_key":"/k"}"#
            )
        );
        let line = register_command(Path::new("/tmp/vault.key"), "sha256:ab");
        assert!(
            line.starts_with("agent register --vault-key /tmp/vault.key --ca-fingerprint sha256:ab --host HOST "),
            "{line}"
        );
        assert!(line.ends_with("--data-dir DIR --listen ADDR") && !line.contains('\\'), "{line}");
    }
}
