//! `host list | reset | remove | move | revoked`: the registered hosts, their
//! certificates, and the operator's commands on them.

use anyhow::Result;
use clap::Subcommand;
use siterecovery_proto::v1;

use super::Operator;
use super::output::{age, expiry, print_json, print_table, utc};
use super::views::{self, HostRemoved, HostView, RevokedView};

#[derive(Subcommand)]
pub enum HostCmd {
    /// List the registered hosts: connection, version, address, certificate expiry.
    List,
    /// Revoke the host's certificate and allow exactly one new registration of its name
    /// (`agent register` with the vault key file, e.g. after reinstalling the host).
    Reset {
        /// Host name (or id).
        host: String,
    },
    /// Deregister the host: its certificate is revoked everywhere, its records deleted.
    /// Refused while a protected VM replicates from or to it.
    Remove {
        /// Host name (or id).
        host: String,
    },
    /// Move the host to another site and/or cloud (registration never does).
    Move {
        /// Host name (or id).
        host: String,
        /// The new site (unchanged when not given).
        #[arg(long)]
        site: Option<String>,
        /// The new cloud (unchanged when not given).
        #[arg(long)]
        cloud: Option<String>,
    },
    /// The certificates the vault revoked.
    Revoked,
}

/// `host list | reset | remove | move | revoked`.
pub async fn run(op: &mut Operator, cmd: HostCmd) -> Result<()> {
    match cmd {
        HostCmd::List => list(op).await?,
        HostCmd::Reset { host } => {
            let h =
                op.inv.reset_host(v1::HostRequest { host: host.clone() }).await.map_err(|s| op.rpc(s))?.into_inner();
            if op.json {
                print_json(&HostView::from(&h))?;
            } else {
                let serial = if h.certificate_serial.is_empty() { "-" } else { &h.certificate_serial };
                println!("host {} reset: certificate {serial} revoked", h.name);
                println!(
                    "one new registration of {} is allowed: on the host, `agent register --host {} ...` with the \
                     vault key file (site {}, cloud {})",
                    h.name, h.name, h.site, h.cloud
                );
            }
        }
        HostCmd::Remove { host } => {
            let r =
                op.inv.remove_host(v1::HostRequest { host: host.clone() }).await.map_err(|s| op.rpc(s))?.into_inner();
            if op.json {
                print_json(&HostRemoved { removed: &host, revoked_serial: &r.revoked_serial })?;
            } else {
                let serial = if r.revoked_serial.is_empty() { "-" } else { &r.revoked_serial };
                println!("host {host} removed; certificate {serial} revoked");
            }
        }
        HostCmd::Move { host, site, cloud } => {
            let req = v1::MoveHostRequest { host, site: site.unwrap_or_default(), cloud: cloud.unwrap_or_default() };
            let h = op.inv.move_host(req).await.map_err(|s| op.rpc(s))?.into_inner();
            if op.json {
                print_json(&HostView::from(&h))?;
            } else {
                println!("host {} is now at site {}, cloud {}", h.name, h.site, h.cloud);
            }
        }
        HostCmd::Revoked => {
            let all = op.inv.list_revoked(v1::ListRevokedRequest {}).await.map_err(|s| op.rpc(s))?.into_inner().revoked;
            if op.json {
                print_json(&views::all::<_, RevokedView>(&all))?;
            } else {
                let rows: Vec<_> = all
                    .iter()
                    .map(|r| {
                        vec![
                            r.serial.clone(),
                            r.host_name.clone(),
                            r.host_id.clone(),
                            utc(r.revoked_unix_ms),
                            r.reason.clone(),
                        ]
                    })
                    .collect();
                print_table(&["SERIAL", "HOST", "HOST ID", "REVOKED", "REASON"], &rows);
            }
        }
    }
    Ok(())
}

/// `host list`.
async fn list(op: &mut Operator) -> Result<()> {
    let hosts = op.inv.list_hosts(v1::ListHostsRequest {}).await.map_err(|s| op.rpc(s))?.into_inner().hosts;
    if op.json {
        print_json(&views::all::<_, HostView>(&hosts))?;
    } else {
        print_table(
            &["HOST", "SITE", "CLOUD", "CONNECTED", "LAST HEARTBEAT", "VERSION", "ADDRESS", "CERT EXPIRES", "RESET"],
            &hosts.iter().map(row).collect::<Vec<_>>(),
        );
    }
    Ok(())
}

/// A row of `host list`.
fn row(h: &v1::Host) -> Vec<String> {
    vec![
        h.name.clone(),
        h.site.clone(),
        h.cloud.clone(),
        if h.connected { "yes".into() } else { "no".into() },
        age(h.last_heartbeat_unix_ms),
        h.agent_version.clone(),
        h.address.clone(),
        expiry(h.certificate_expires_unix_ms),
        if h.reset_pending { "pending".into() } else { "-".into() },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_shows_the_certificate_and_the_reset() {
        let h = v1::Host {
            name: "hv-b".into(),
            site: "secondary".into(),
            cloud: "gold-b".into(),
            connected: true,
            certificate_expires_unix_ms: 1,
            reset_pending: true,
            ..Default::default()
        };
        let r = row(&h);
        assert_eq!(r.len(), 9);
        assert_eq!((r[0].as_str(), r[3].as_str()), ("hv-b", "yes"));
        assert_eq!(r[7], "1970-01-01 (expired)");
        assert_eq!(r[8], "pending");
        let r = row(&v1::Host { reset_pending: false, certificate_expires_unix_ms: 0, ..h });
        assert_eq!((r[7].as_str(), r[8].as_str()), ("-", "-"));
    }
}
