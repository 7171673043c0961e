//! The agent's Prometheus metrics (`agent serve --metrics-listen`), collected at scrape
//! time: each protected VM's sender (from the latest status the sender reported) and
//! each NBD export's I/O counters ([`crate::nbd::stats`]).

use std::sync::Arc;

use siterecovery_proto::metrics::{Families, Labels, MetricsConfig, Render, http};
use siterecovery_proto::v1;
use tokio_util::sync::CancellationToken;

use crate::nbd::stats::{self, Op};
use crate::protection::Protection;
use crate::vm::VmManager;

/// `--metrics-listen` when not given (the provider's is 9464).
pub const DEFAULT_LISTEN: std::net::SocketAddr =
    std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9465);

/// Binds `listen` and serves the metrics until `shutdown` (nothing for `off`).
pub async fn spawn(
    listen: MetricsConfig,
    protection: Arc<Protection>,
    vms: Arc<VmManager>,
    shutdown: CancellationToken,
) -> std::io::Result<Option<tokio::task::JoinHandle<()>>> {
    let Some(listener) = http::bind(listen).await? else { return Ok(None) };
    tracing::info!(metrics = %listener.local_addr()?, "metrics on http://{}/metrics", listener.local_addr()?);
    let render: Render = Arc::new(move || {
        let mut f = Families::default();
        disks(&mut f, &vms);
        render(f, &protection.latest_statuses(), now_ms())
    });
    Ok(Some(tokio::spawn(http::serve(listener, render, shutdown))))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

const STATES: [v1::SenderState; 10] = [
    v1::SenderState::Unspecified,
    v1::SenderState::Waiting,
    v1::SenderState::Initial,
    v1::SenderState::Replicating,
    v1::SenderState::ResyncRequired,
    v1::SenderState::Resynchronising,
    v1::SenderState::Paused,
    v1::SenderState::Stopped,
    v1::SenderState::Error,
    v1::SenderState::WaitingForImport,
];

fn state_name(s: v1::SenderState) -> &'static str {
    s.as_str_name().strip_prefix("SENDER_STATE_").unwrap_or("UNSPECIFIED")
}

/// Per disk of every running VM: its pending logs and whether it runs on its bitmap.
fn disks(f: &mut Families, vms: &VmManager) {
    for (vm, disks) in vms.all_disk_handles() {
        for (id, disk) in disks {
            let l: Labels = vec![("vm", vm.clone()), ("disk", id.to_string())];
            f.gauge(
                "siterecovery_disk_pending_log_bytes",
                "Bytes of the disk's HRL logs not yet deleted (sealed and open).",
                l.clone(),
                disk.pending_log_bytes() as f64,
            );
            let bitmap = disk.bitmap_state();
            f.gauge(
                "siterecovery_disk_bitmap_dirty_blocks",
                "Blocks marked in the disk's dirty-block bitmap (0 when it runs on logs).",
                l.clone(),
                bitmap.as_ref().map_or(0.0, |b| b.dirty_blocks as f64),
            );
            f.gauge(
                "siterecovery_disk_on_bitmap",
                "Whether the disk tracks writes in its dirty-block bitmap (past its log budget).",
                l,
                if bitmap.is_some() { 1.0 } else { 0.0 },
            );
        }
    }
}

/// The metrics text (OpenMetrics): `f` (collected already) plus these statuses and the
/// NBD counters.
pub fn render(mut f: Families, statuses: &[v1::ReplicationStatus], now_ms: i64) -> String {
    let names: Vec<&str> = STATES.iter().map(|s| state_name(*s)).collect();
    let mut statuses: Vec<&v1::ReplicationStatus> = statuses.iter().collect();
    statuses.sort_by(|a, b| a.vm.cmp(&b.vm));
    f.declare_gauge("siterecovery_sender_state", "State of the VM's sender on this host (1 for the current state).");
    for s in statuses {
        let vm: Labels = vec![("vm", s.vm.clone())];
        let state = v1::SenderState::try_from(s.state).unwrap_or(v1::SenderState::Unspecified);
        f.state_set(
            "siterecovery_sender_state",
            "State of the VM's sender on this host (1 for the current state).",
            &vm,
            "state",
            &names,
            state_name(state),
        );
        let point_ms = s.last_point.as_ref().map(|p| p.created_unix_ms).unwrap_or(0);
        if point_ms > 0 {
            f.gauge(
                "siterecovery_sender_last_point_timestamp_seconds",
                "Creation time of the VM's latest recovery point acknowledged by the replica.",
                vm.clone(),
                point_ms as f64 / 1000.0,
            );
            f.gauge(
                "siterecovery_sender_rpo_lag_seconds",
                "Age of the VM's latest recovery point, as this host sees it.",
                vm.clone(),
                (now_ms - point_ms).max(0) as f64 / 1000.0,
            );
        }
        f.gauge(
            "siterecovery_sender_pending_log_bytes",
            "Bytes of the VM's write logs not yet acknowledged by the replica.",
            vm.clone(),
            s.pending_log_bytes as f64,
        );
        f.counter(
            "siterecovery_sender_replicated_bytes",
            "Bytes the VM's sender put on the wire since protection started.",
            vm.clone(),
            s.bytes_replicated,
        );
        f.counter(
            "siterecovery_sender_cycles",
            "Replication cycles attempted since the agent started.",
            vm.clone(),
            s.cycles,
        );
        f.counter(
            "siterecovery_sender_missed_cycles",
            "Replication cycles failed or late since the agent started.",
            vm.clone(),
            s.missed_cycles,
        );
        f.counter(
            "siterecovery_sender_resync_wire_bytes",
            "Bytes the last resync of the VM put on the wire.",
            vm.clone(),
            s.resync_wire_bytes,
        );
        f.gauge(
            "siterecovery_sender_bandwidth_limit_bytes_per_second",
            "The VM's replication rate limit now (the smaller of the host's and the policy's; 0 = unlimited).",
            vm.clone(),
            s.bandwidth_limit as f64,
        );
        f.gauge(
            "siterecovery_sender_achieved_bytes_per_second",
            "Bytes per second the VM's sender put on the wire lately (over the last second or two).",
            vm,
            s.achieved_bytes_per_sec as f64,
        );
    }
    nbd(&mut f);
    f.encode()
}

fn nbd(f: &mut Families) {
    for (export, s) in stats::snapshot() {
        for op in Op::ALL {
            let o = s.op(op);
            let l: Labels = vec![("export", export.clone()), ("op", op.as_str().to_owned())];
            use std::sync::atomic::Ordering::Relaxed;
            f.counter(
                "siterecovery_nbd_operations",
                "NBD requests executed, by export and operation.",
                l.clone(),
                o.ops.load(Relaxed),
            );
            f.counter(
                "siterecovery_nbd_bytes",
                "Payload bytes of the NBD requests, by export and operation.",
                l.clone(),
                o.bytes.load(Relaxed),
            );
            f.counter(
                "siterecovery_nbd_errors",
                "NBD requests answered with an error.",
                l.clone(),
                o.errors.load(Relaxed),
            );
            let (buckets, count, sum) = o.histogram();
            f.histogram(
                "siterecovery_nbd_operation_duration_seconds",
                "Time of the device call of an NBD request (log append and image write for a write).",
                l,
                buckets,
                count,
                sum,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replicating_vm_has_its_lag_and_state() {
        let s = v1::ReplicationStatus {
            vm: "vm1".into(),
            state: v1::SenderState::Replicating as i32,
            last_point: Some(v1::RecoveryPoint { created_unix_ms: 10_000, ..Default::default() }),
            pending_log_bytes: 4096,
            bytes_replicated: 1 << 20,
            bandwidth_limit: 20 << 20,
            achieved_bytes_per_sec: 19 << 20,
            ..Default::default()
        };
        let t = render(Families::default(), &[s], 12_500);
        for want in [
            "siterecovery_sender_state{vm=\"vm1\",state=\"REPLICATING\"} 1.0\n",
            "siterecovery_sender_state{vm=\"vm1\",state=\"PAUSED\"} 0.0\n",
            "siterecovery_sender_rpo_lag_seconds{vm=\"vm1\"} 2.5\n",
            "siterecovery_sender_last_point_timestamp_seconds{vm=\"vm1\"} 10.0\n",
            "siterecovery_sender_pending_log_bytes{vm=\"vm1\"} 4096.0\n",
            "siterecovery_sender_replicated_bytes_total{vm=\"vm1\"} 1048576\n",
            "siterecovery_sender_bandwidth_limit_bytes_per_second{vm=\"vm1\"} 20971520.0\n",
            "siterecovery_sender_achieved_bytes_per_second{vm=\"vm1\"} 19922944.0\n",
        ] {
            assert!(t.contains(want), "{want:?} missing in\n{t}");
        }
    }
}
