//! `failover test | planned | unplanned | commit | cleanup | change-point`, the one
//! builder of a failover request (the CLI's and the lab's), and the failover part of
//! `vm show`.

use clap::Subcommand;
use siterecovery_proto::model::FailoverKind;
use siterecovery_proto::v1;

use super::jobs::started;
use super::output::utc;
use super::words::failover_kind;
use super::{CliError, Operator};

#[derive(Subcommand)]
pub enum FailoverCmd {
    /// Start a test VM (VM-test) from a point; replication goes on.
    Test {
        vm: String,
        /// latest, latest-app-consistent or a point id (see `points VM`).
        #[arg(long, default_value = "latest")]
        point: String,
        /// mapped (the mapped network and reserved address), isolated (NETWORK-test-isolated) or none.
        #[arg(long, default_value = "mapped", value_parser = parse_test_network)]
        test_network: i32,
        #[arg(long)]
        wait: bool,
    },
    /// Stop the primary VM, ship its last changes, start it on the replica host; then reverse replication.
    Planned {
        vm: String,
        /// Always the last point shipped from the stopped primary.
        #[arg(long, default_value = "latest")]
        point: String,
        #[arg(long)]
        wait: bool,
    },
    /// Start the VM on the replica host from a point; the primary may be gone.
    Unplanned {
        vm: String,
        /// latest, latest-app-consistent or a point id (see `points VM`).
        #[arg(long, default_value = "latest")]
        point: String,
        /// Try to stop the primary VM first (best effort).
        #[arg(long)]
        shutdown_primary: bool,
        #[arg(long)]
        wait: bool,
    },
    /// Make the failed-over VM's disks its own (other points are discarded).
    Commit {
        vm: String,
        #[arg(long)]
        wait: bool,
    },
    /// Remove the test VM of a test failover and its overlay.
    Cleanup {
        vm: String,
        #[arg(long)]
        wait: bool,
    },
    /// Restart the failed-over VM from another point (before commit).
    ChangePoint {
        vm: String,
        #[arg(long)]
        point: String,
        #[arg(long)]
        wait: bool,
    },
}

fn parse_test_network(s: &str) -> Result<i32, String> {
    Ok(match s {
        "mapped" => v1::TestNetwork::Mapped,
        "isolated" => v1::TestNetwork::Isolated,
        "none" => v1::TestNetwork::None,
        _ => return Err("use mapped, isolated or none".into()),
    }
    .into())
}

/// A failover of `vm` of `kind` from `point`, with the defaults: the mapped test
/// network, no shutdown of the primary.
pub fn request(vm: impl Into<String>, kind: FailoverKind, point: impl Into<String>) -> v1::FailoverRequest {
    v1::FailoverRequest {
        vm: vm.into(),
        r#type: kind.into(),
        point: point.into(),
        test_network: 0,
        shutdown_primary: false,
    }
}

/// `failover ...`: starts the job, then prints or follows it.
pub async fn run(op: &mut Operator, cmd: FailoverCmd) -> Result<(), CliError> {
    let (job, wait) = match cmd {
        FailoverCmd::Test { vm, point, test_network, wait } => {
            let req = v1::FailoverRequest { test_network, ..request(vm, FailoverKind::Test, point) };
            (op.prot.failover(req).await, wait)
        }
        FailoverCmd::Planned { vm, point, wait } => {
            (op.prot.failover(request(vm, FailoverKind::Planned, point)).await, wait)
        }
        FailoverCmd::Unplanned { vm, point, shutdown_primary, wait } => {
            let req = v1::FailoverRequest { shutdown_primary, ..request(vm, FailoverKind::Unplanned, point) };
            (op.prot.failover(req).await, wait)
        }
        FailoverCmd::Commit { vm, wait } => (op.prot.commit_failover(v1::VmRequest { vm }).await, wait),
        FailoverCmd::Cleanup { vm, wait } => (op.prot.cleanup_test_failover(v1::VmRequest { vm }).await, wait),
        FailoverCmd::ChangePoint { vm, point, wait } => {
            (op.prot.change_point(v1::ChangePointRequest { vm, point }).await, wait)
        }
    };
    let job = job.map_err(|s| op.rpc(s))?.into_inner();
    started(op, job, wait).await
}

/// The failover part of `vm show` (a VM started by a failover on its host).
pub fn print_vm_failover(f: &v1::FailoverInfo) {
    let of = if f.test_of.is_empty() { String::new() } else { format!(", test of {}", f.test_of) };
    let committed = if f.committed { "committed" } else { "not committed" };
    println!(
        "failover  {} from point {} ({committed}{of}), started {}",
        failover_kind(f.kind),
        if f.point_id.is_empty() { "-" } else { &f.point_id },
        utc(f.started_unix_ms)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_request_builder_for_every_kind() {
        let r = request("vm1", FailoverKind::Planned, "latest");
        assert_eq!(r.vm, "vm1");
        assert_eq!(r.r#type, v1::FailoverKind::Planned as i32);
        assert_eq!(r.point, "latest");
        assert_eq!(r.test_network, 0, "unspecified = mapped");
        assert!(!r.shutdown_primary);
        assert_eq!(parse_test_network("isolated"), Ok(v1::TestNetwork::Isolated as i32));
        assert!(parse_test_network("bridged").is_err());
    }
}
