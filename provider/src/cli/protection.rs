//! The operator's protection commands: policies, cloud pairings, protect / import /
//! unprotect / resync / reprotect, recovery points and their exports, and the
//! replication part of `vm show`.

use std::time::Duration;

use clap::{Args, Subcommand};
use siterecovery_proto::model::bandwidth::{BandwidthSpec, human_rate};
use siterecovery_proto::model::units::{human_size, parse_duration};
use siterecovery_proto::v1;

use super::jobs::started;
use super::output::{age, ms, print_json, print_table, utc};
use super::views::{self, CloudView, Deleted, ExportView, PairingView, PointView, PolicyView, Unexported, Unpaired};
use super::words::{health, initial_method, point_kind, replication_state};
use super::{CliError, Operator};
use crate::relationship::health::coarse;

#[derive(Subcommand)]
pub enum PolicyCmd {
    /// Create a replication policy.
    Create(PolicyCreate),
    /// List policies.
    List,
    /// Delete a policy no pairing uses.
    Delete { name: String },
}

#[derive(Args)]
pub struct PolicyCreate {
    #[arg(long)]
    name: String,
    /// Replication interval: 30s, 5m or 15m.
    #[arg(long, value_parser = parse_duration)]
    interval: Duration,
    /// How long recovery points are kept (1h to 30d).
    #[arg(long, value_parser = parse_duration)]
    retention: Duration,
    /// App-consistent snapshot frequency (default never).
    #[arg(long, value_parser = parse_duration)]
    app_consistent_every: Option<Duration>,
    /// Compress replication traffic (zstd).
    #[arg(long)]
    compression: bool,
    /// Initial replication: network (now), offline, or at=TIME (RFC 3339).
    #[arg(long, default_value = "network", value_parser = parse_initial)]
    initial: (i32, i64),
    /// Replication port on the replica host (default: the host's listener).
    #[arg(long, default_value_t = 0)]
    port: u32,
    /// Business hours START-END (0-23) outside which automatic resync runs, e.g. 18-6.
    #[arg(long, value_name = "START-END", value_parser = parse_window)]
    resync_window: Option<(u32, u32)>,
    /// Replication rate limit, per relationship, e.g. "08:00-18:00=50M,*=0": windows
    /// HH:MM-HH:MM in the primary host's local time, `*` for the rest of the day, a rate
    /// in bytes/s (K, M, G suffixes; 0 = unlimited). Also capped by the host's own
    /// `agent serve --bandwidth`: the smaller limit applies. Default: unlimited.
    #[arg(long, value_name = "SPEC", value_parser = parse_bandwidth)]
    bandwidth: Option<BandwidthSpec>,
    /// Rate limit of bulk traffic (the initial copy, resync and dirty-block catch-up),
    /// same syntax; default: the --bandwidth limit.
    #[arg(long, value_name = "SPEC", value_parser = parse_bandwidth)]
    resync_bandwidth: Option<BandwidthSpec>,
}

fn parse_bandwidth(s: &str) -> Result<BandwidthSpec, String> {
    s.parse().map_err(|e: siterecovery_proto::model::bandwidth::BandwidthError| e.to_string())
}

impl PolicyCreate {
    fn into_policy(self) -> v1::Policy {
        let (start, end) = self.resync_window.unwrap_or((0, 0));
        v1::Policy {
            name: self.name,
            interval_ms: self.interval.as_millis() as u64,
            retention_ms: self.retention.as_millis() as u64,
            app_consistent_every_ms: self.app_consistent_every.map(|d| d.as_millis() as u64).unwrap_or(0),
            compression: self.compression,
            initial_method: self.initial.0,
            initial_at_unix_ms: self.initial.1,
            port: self.port,
            resync_window_start_hour: start,
            resync_window_end_hour: end,
            bandwidth: self.bandwidth.map(|s| s.to_string()).unwrap_or_default(),
            resync_bandwidth: self.resync_bandwidth.map(|s| s.to_string()).unwrap_or_default(),
        }
    }
}

/// `network`, `offline` or `at=TIME` (RFC 3339): the wire's method and start time.
fn parse_initial(s: &str) -> Result<(i32, i64), String> {
    match s {
        "network" => Ok((v1::InitialMethod::Network.into(), 0)),
        "offline" => Ok((v1::InitialMethod::Offline.into(), 0)),
        _ => {
            let t = s
                .strip_prefix("at=")
                .ok_or("use network, offline or at=TIME (RFC 3339, e.g. at=2025-01-31T22:00:00Z)")?;
            let t = time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
                .map_err(|e| format!("{t:?} is not an RFC 3339 time (e.g. 2025-01-31T22:00:00Z): {e}"))?;
            Ok((v1::InitialMethod::At.into(), (t.unix_timestamp_nanos() / 1_000_000) as i64))
        }
    }
}

fn parse_window(s: &str) -> Result<(u32, u32), String> {
    let (a, b) = s.split_once('-').ok_or_else(|| format!("{s:?}: expected START-END hours, e.g. 18-6"))?;
    let h = |x: &str| -> Result<u32, String> {
        let n: u32 = x.trim().parse().map_err(|_| format!("{s:?}: {x:?} is not an hour"))?;
        if n > 23 { Err(format!("{s:?}: hours are 0-23")) } else { Ok(n) }
    };
    Ok((h(a)?, h(b)?))
}

/// `policy create | list | delete`.
pub async fn policy(op: &mut Operator, cmd: PolicyCmd) -> Result<(), CliError> {
    match cmd {
        PolicyCmd::Create(p) => {
            let p = op.prot.create_policy(p.into_policy()).await.map_err(|s| op.rpc(s))?.into_inner();
            if op.json {
                print_json(&PolicyView::from(&p))?;
            } else {
                println!("policy {} created: every {}, points kept {}", p.name, ms(p.interval_ms), ms(p.retention_ms));
            }
        }
        PolicyCmd::List => {
            let ps =
                op.prot.list_policies(v1::ListPoliciesRequest {}).await.map_err(|s| op.rpc(s))?.into_inner().policies;
            if op.json {
                print_json(&views::all::<_, PolicyView>(&ps))?;
            } else {
                let rows: Vec<_> = ps
                    .iter()
                    .map(|p| {
                        vec![
                            p.name.clone(),
                            ms(p.interval_ms),
                            ms(p.retention_ms),
                            if p.app_consistent_every_ms == 0 { "never".into() } else { ms(p.app_consistent_every_ms) },
                            if p.compression { "on".into() } else { "off".into() },
                            initial_method(p),
                            if p.resync_window_start_hour == p.resync_window_end_hour {
                                "any time".into()
                            } else {
                                format!("{}-{}", p.resync_window_start_hour, p.resync_window_end_hour)
                            },
                            if p.bandwidth.is_empty() { "unlimited".into() } else { p.bandwidth.clone() },
                        ]
                    })
                    .collect();
                print_table(
                    &[
                        "POLICY",
                        "INTERVAL",
                        "RETENTION",
                        "APP-CONSISTENT",
                        "COMPRESSION",
                        "INITIAL",
                        "BUSINESS HOURS",
                        "BANDWIDTH",
                    ],
                    &rows,
                );
            }
        }
        PolicyCmd::Delete { name } => {
            op.prot.delete_policy(v1::DeletePolicyRequest { name: name.clone() }).await.map_err(|s| op.rpc(s))?;
            if op.json {
                print_json(&Deleted { deleted: &name })?;
            } else {
                println!("policy {name} deleted");
            }
        }
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum CloudCmd {
    /// Pair a source cloud with a target cloud at another site, under a policy.
    Pair {
        #[arg(long)]
        source: String,
        #[arg(long)]
        target: String,
        #[arg(long)]
        policy: String,
    },
    /// Clouds with their site, hosts and pairing.
    List,
    /// Remove the pairing of a source cloud (none of its VMs may be protected).
    Unpair {
        #[arg(long)]
        source: String,
    },
}

/// `cloud pair | list | unpair`.
pub async fn cloud(op: &mut Operator, cmd: CloudCmd) -> Result<(), CliError> {
    match cmd {
        CloudCmd::Pair { source, target, policy } => {
            let req = v1::CloudPairing { source_cloud: source, target_cloud: target, policy };
            let p = op.prot.pair_clouds(req).await.map_err(|s| op.rpc(s))?.into_inner();
            if op.json {
                print_json(&PairingView::from(&p))?;
            } else {
                println!("cloud {} paired with {} under policy {}", p.source_cloud, p.target_cloud, p.policy);
            }
        }
        CloudCmd::Unpair { source } => {
            let req = v1::UnpairCloudsRequest { source_cloud: source.clone() };
            op.prot.unpair_clouds(req).await.map_err(|s| op.rpc(s))?;
            if op.json {
                print_json(&Unpaired { unpaired: &source })?;
            } else {
                println!("cloud {source} unpaired");
            }
        }
        CloudCmd::List => {
            let clouds = op.inv.list_clouds(v1::ListCloudsRequest {}).await.map_err(|s| op.rpc(s))?.into_inner().clouds;
            let pairings =
                op.prot.list_pairings(v1::ListPairingsRequest {}).await.map_err(|s| op.rpc(s))?.into_inner().pairings;
            if op.json {
                let v: Vec<_> = clouds.iter().map(|c| CloudView::new(c, &pairings)).collect();
                print_json(&v)?;
            } else {
                let pairing_of = |c: &str| -> (String, String) {
                    if let Some(p) = pairings.iter().find(|p| p.source_cloud == c) {
                        (format!("→ {}", p.target_cloud), p.policy.clone())
                    } else if let Some(p) = pairings.iter().find(|p| p.target_cloud == c) {
                        (format!("← {}", p.source_cloud), p.policy.clone())
                    } else {
                        ("-".into(), "-".into())
                    }
                };
                let rows: Vec<_> = clouds
                    .iter()
                    .map(|c| {
                        let (pair, policy) = pairing_of(&c.name);
                        vec![c.name.clone(), c.site.clone(), c.hosts.join(","), pair, policy]
                    })
                    .collect();
                print_table(&["CLOUD", "SITE", "HOSTS", "PAIRED", "POLICY"], &rows);
            }
        }
    }
    Ok(())
}

// The top-level commands that start one protection job.
#[derive(Args)]
pub struct ProtectArgs {
    vm: String,
    /// Offline initial replication: absolute directory on the primary host to export
    /// the initial copy to.
    #[arg(long, value_name = "DIR")]
    export_dir: Option<String>,
    /// Watch the job until it ends; exit non-zero when it fails (offline: it ends only
    /// after `protect-import`).
    #[arg(long)]
    wait: bool,
}

// `protect-import`.
#[derive(Args)]
pub struct ImportArgs {
    vm: String,
    /// Absolute path of the export directory on the replica host.
    #[arg(long, value_name = "DIR")]
    dir: String,
    /// Watch the job until it ends (initial replication done); exit non-zero when it fails.
    #[arg(long)]
    wait: bool,
}

// `unprotect`, `resync`, `reprotect`: a VM and `--wait`.
#[derive(Args)]
pub struct VmJobArgs {
    vm: String,
    #[arg(long)]
    wait: bool,
}

/// `protect VM [--export-dir DIR]`.
pub async fn protect(op: &mut Operator, a: ProtectArgs) -> Result<(), CliError> {
    let req = v1::ProtectRequest { vm: a.vm, export_dir: a.export_dir.unwrap_or_default() };
    let job = op.prot.protect(req).await.map_err(|s| op.rpc(s))?.into_inner();
    started(op, job, a.wait).await
}

/// `protect-import VM --dir DIR`.
pub async fn import(op: &mut Operator, a: ImportArgs) -> Result<(), CliError> {
    let req = v1::ImportInitialRequest { vm: a.vm, dir: a.dir };
    let job = op.prot.import_initial(req).await.map_err(|s| op.rpc(s))?.into_inner();
    started(op, job, a.wait).await
}

/// `unprotect VM`.
pub async fn unprotect(op: &mut Operator, a: VmJobArgs) -> Result<(), CliError> {
    let job = op.prot.unprotect(v1::UnprotectRequest { vm: a.vm }).await.map_err(|s| op.rpc(s))?.into_inner();
    started(op, job, a.wait).await
}

/// `resync VM`.
pub async fn resync(op: &mut Operator, a: VmJobArgs) -> Result<(), CliError> {
    let job = op.prot.resync(v1::ResyncRequest { vm: a.vm }).await.map_err(|s| op.rpc(s))?.into_inner();
    started(op, job, a.wait).await
}

/// `reprotect VM`.
pub async fn reprotect(op: &mut Operator, a: VmJobArgs) -> Result<(), CliError> {
    let job = op.prot.reprotect(v1::VmRequest { vm: a.vm }).await.map_err(|s| op.rpc(s))?.into_inner();
    started(op, job, a.wait).await
}

/// `points VM`.
pub async fn points(op: &mut Operator, vm: String) -> Result<(), CliError> {
    let ps = op.prot.list_points(v1::ListPointsRequest { vm }).await.map_err(|s| op.rpc(s))?.into_inner().points;
    if op.json {
        return print_json(&views::all::<_, PointView>(&ps));
    }
    let rows: Vec<_> = ps
        .iter()
        .map(|p| {
            let kind = if p.app_consistent && p.kind() != v1::PointKind::AppConsistent {
                format!("{},app-consistent", point_kind(p.kind))
            } else {
                point_kind(p.kind).into()
            };
            vec![utc(p.created_unix_ms), p.id.clone(), kind, human_size(p.size_bytes)]
        })
        .collect();
    print_table(&["TIME", "POINT", "KIND", "SIZE"], &rows);
    Ok(())
}

#[derive(Subcommand)]
pub enum PointCmd {
    /// Export a point read-only over NBD on the replica host; prints its URI.
    Export {
        vm: String,
        /// `latest` or a point id (see `points VM`).
        #[arg(long, default_value = "latest")]
        point: String,
    },
    /// Remove the export of a VM's point.
    Unexport { vm: String },
}

/// `point export | unexport`.
pub async fn point(op: &mut Operator, cmd: PointCmd) -> Result<(), CliError> {
    match cmd {
        PointCmd::Export { vm, point } => {
            let r =
                op.prot.export_point(v1::ExportPointRequest { vm, point }).await.map_err(|s| op.rpc(s))?.into_inner();
            if op.json {
                print_json(&ExportView::from(&r))
            } else {
                println!("{}", r.uri);
                Ok(())
            }
        }
        PointCmd::Unexport { vm } => {
            op.prot.unexport_point(v1::UnexportPointRequest { vm: vm.clone() }).await.map_err(|s| op.rpc(s))?;
            if op.json {
                print_json(&Unexported { unexported: &vm })
            } else {
                println!("export of {vm}'s point removed");
                Ok(())
            }
        }
    }
}

/// The replication part of `vm show`.
pub fn print_replication(r: Option<&v1::Replication>) {
    let Some(r) = r else {
        println!("replication  not enabled");
        return;
    };
    println!("replication  {} ({})", replication_state(r.state), r.relationship_id);
    let reasons =
        if r.health_reasons.is_empty() { String::new() } else { format!(": {}", r.health_reasons.join("; ")) };
    println!("health       {}{reasons}", health(r.health));
    println!("replica      {} (primary {})", r.replica_host, r.primary_host);
    println!("policy       {}", r.policy);
    if r.done_bytes < r.total_bytes && r.total_bytes > 0 {
        println!("progress     {} of {}", human_size(r.done_bytes), human_size(r.total_bytes));
    }
    println!("RPO lag      {}", if r.last_point_unix_ms > 0 { coarse(r.rpo_lag_ms) } else { "-".into() });
    if r.last_point_unix_ms > 0 {
        println!("last point   {} ({}, {})", r.last_point_id, utc(r.last_point_unix_ms), age(r.last_point_unix_ms));
    } else {
        println!("last point   none yet");
    }
    println!("pending logs {}", human_size(r.pending_log_bytes));
    println!("replicated   {}", human_size(r.bytes_replicated));
    println!(
        "bandwidth    limit {}, achieved {}",
        human_rate(r.bandwidth_limit),
        siterecovery_proto::model::units::human_size(r.achieved_bytes_per_sec) + "/s"
    );
    println!("last error   {}", if r.error.is_empty() { "-" } else { &r.error });
    if !r.test_failover_vm.is_empty() {
        println!("test VM      {} (remove with `failover cleanup`)", r.test_failover_vm);
    }
    for a in &r.addresses {
        let target = if a.target_network.is_empty() {
            "not mapped".to_string()
        } else if a.dhcp {
            format!("{} dhcp", a.target_network)
        } else {
            format!("{} {}", a.target_network, a.target_ip)
        };
        let source = if a.dhcp {
            "dhcp"
        } else if a.source_ip.is_empty() {
            "-"
        } else {
            &a.source_ip
        };
        println!("at failover  nic{} {} {source} → {target} ({})", a.nic, a.source_network, a.note);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initial_methods_and_windows() {
        assert_eq!(parse_initial("offline"), Ok((v1::InitialMethod::Offline.into(), 0)));
        assert_eq!(parse_initial("at=2025-01-31T22:00:00Z"), Ok((v1::InitialMethod::At.into(), 1_738_360_800_000)));
        assert!(parse_initial("at=tomorrow").is_err());
        assert!(parse_initial("later").is_err());
        assert_eq!(parse_window("18-6"), Ok((18, 6)));
        assert_eq!(parse_window("18-24"), Err("\"18-24\": hours are 0-23".into()));
        assert!(parse_window("18").is_err());
    }
}
