//! The provider's Prometheus metrics (`provider serve --metrics-listen`), collected at
//! scrape time from what the provider keeps anyway: every relationship's record (state,
//! health, the latest status of its sender), every host's record and live session, and
//! the job records.
//!
//! - per VM: replication state and health (one series per state, 1 for the current),
//!   RPO lag and the policy interval it is judged by, last point time, pending log
//!   bytes, bytes replicated, resyncs, the measured shipping rate and the predicted time
//!   to an RPO breach ([`predict`]);
//! - per host: connected, last heartbeat, certificate expiry;
//! - per job kind: jobs by state, and a histogram of the finished jobs' durations.

pub mod predict;

use std::sync::Arc;

use siterecovery_proto::metrics::{Families, Labels, MetricsConfig, Render, http};
use tokio_util::sync::CancellationToken;

use self::predict::{Rates, seconds_to_breach};
use crate::control::Sessions;
use crate::inventory::HostRecord;
use crate::jobs::{JobKind, JobRecord, JobState, now_ms};
use crate::relationship::lookup::host_name;
use crate::relationship::{Core, Health, ReplicationState};
use crate::store::{HOSTS, JOBS};

/// `--metrics-listen` when not given: loopback, the port after node_exporter's 9100s
/// (9464 provider, 9465 agent).
pub const DEFAULT_LISTEN: std::net::SocketAddr =
    std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9464);

/// Binds `listen` and serves the metrics until `shutdown` (nothing for `off`).
pub async fn spawn(
    listen: MetricsConfig,
    core: Arc<Core>,
    sessions: Arc<Sessions>,
    shutdown: CancellationToken,
) -> std::io::Result<Option<tokio::task::JoinHandle<()>>> {
    let Some(listener) = http::bind(listen).await? else { return Ok(None) };
    tracing::info!(metrics = %listener.local_addr()?, "metrics on http://{}/metrics", listener.local_addr()?);
    let rates = Arc::new(Rates::default());
    let render: Render = Arc::new(move || render(&core, &sessions, &rates, now_ms()));
    Ok(Some(tokio::spawn(http::serve(listener, render, shutdown))))
}

/// Upper bounds of the job duration buckets, seconds.
const JOB_BUCKETS: [f64; 10] = [1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 14400.0];

/// The metrics text (OpenMetrics) now.
pub fn render(core: &Core, sessions: &Sessions, rates: &Rates, now: i64) -> String {
    let mut f = Families::default();
    let hosts: Vec<HostRecord> = core.store.list(HOSTS).unwrap_or_default();
    relationships(&mut f, core, sessions, rates, &hosts, now);
    for h in &hosts {
        let live = sessions.status(h.id.as_str());
        let l: Labels = vec![("host", h.name.to_string()), ("site", h.site.to_string())];
        f.gauge(
            "siterecovery_host_connected",
            "Whether the host's agent has a live control session.",
            l.clone(),
            if live.connected { 1.0 } else { 0.0 },
        );
        if live.last_heartbeat_unix_ms > 0 {
            f.gauge(
                "siterecovery_host_last_heartbeat_timestamp_seconds",
                "Time of the host's last heartbeat (since this provider started).",
                l.clone(),
                live.last_heartbeat_unix_ms as f64 / 1000.0,
            );
        }
        if h.cert_not_after_unix_ms > 0 {
            f.gauge(
                "siterecovery_host_certificate_expiry_timestamp_seconds",
                "Expiry (notAfter) of the host's current certificate.",
                l,
                h.cert_not_after_unix_ms as f64 / 1000.0,
            );
        }
    }
    let jobs: Vec<JobRecord> = core.store.list(JOBS).unwrap_or_default();
    jobs_metrics(&mut f, &jobs);
    f.encode()
}

fn relationships(f: &mut Families, core: &Core, sessions: &Sessions, rates: &Rates, hosts: &[HostRecord], now: i64) {
    let states: Vec<&str> = ReplicationState::ALL.iter().map(|s| s.as_str()).collect();
    let healths: Vec<&str> = [Health::Normal, Health::Warning, Health::Critical].iter().map(|h| h.as_str()).collect();
    let mut recs = core.protection.all();
    recs.sort_by(|a, b| a.vm.cmp(&b.vm));
    rates.retain(&recs.iter().map(|r| r.id.as_str()).collect::<Vec<_>>());
    for rec in &recs {
        let vm: Labels = vec![("vm", rec.vm.clone())];
        let primary = host_name(hosts, &rec.primary_host_id);
        let connected = sessions.status(&rec.primary_host_id).connected;
        let (health, _) = rec.health(connected, &primary, now);
        f.gauge(
            "siterecovery_vm_replication_info",
            "The VM's relationship: its hosts and policy (value 1).",
            vec![
                ("vm", rec.vm.clone()),
                ("relationship", rec.id.clone()),
                ("primary_host", primary),
                ("replica_host", host_name(hosts, &rec.replica_host_id)),
                ("policy", rec.policy.clone()),
            ],
            1.0,
        );
        f.state_set(
            "siterecovery_vm_replication_state",
            "Replication state of the VM (1 for the current state).",
            &vm,
            "state",
            &states,
            rec.state.as_str(),
        );
        f.state_set(
            "siterecovery_vm_health",
            "Replication health of the VM (1 for the current health).",
            &vm,
            "health",
            &healths,
            health.as_str(),
        );
        let interval = rec.interval_ms as f64 / 1000.0;
        f.gauge(
            "siterecovery_vm_rpo_interval_seconds",
            "The replication interval of the VM's policy (the RPO it is judged by).",
            vm.clone(),
            interval,
        );
        let s = &rec.status;
        let tracked = s.last_point_unix_ms > 0 && !rec.state.in_failover() && rec.state != ReplicationState::NotEnabled;
        let lag = if tracked { (now - s.last_point_unix_ms).max(0) as f64 / 1000.0 } else { 0.0 };
        if s.last_point_unix_ms > 0 {
            f.gauge(
                "siterecovery_vm_last_point_timestamp_seconds",
                "Creation time of the VM's latest recovery point at the replica.",
                vm.clone(),
                s.last_point_unix_ms as f64 / 1000.0,
            );
        }
        if tracked {
            f.gauge(
                "siterecovery_vm_rpo_lag_seconds",
                "Age of the VM's latest recovery point (its current RPO).",
                vm.clone(),
                lag,
            );
        }
        f.gauge(
            "siterecovery_vm_pending_log_bytes",
            "Bytes of the VM's write logs not yet at the replica.",
            vm.clone(),
            s.pending_log_bytes as f64,
        );
        f.counter(
            "siterecovery_vm_replicated_bytes",
            "Bytes the VM's sender put on the wire since protection started (resets if the agent restarts).",
            vm.clone(),
            s.bytes_replicated,
        );
        f.counter("siterecovery_vm_resyncs", "Resyncs of the VM completed.", vm.clone(), rec.resyncs_completed);
        f.counter(
            "siterecovery_vm_resync_blocks_sent",
            "4 KiB blocks the VM's last resync sent.",
            vm.clone(),
            s.resync_blocks_sent,
        );
        f.counter(
            "siterecovery_vm_resync_wire_bytes",
            "Bytes the VM's last resync put on the wire.",
            vm.clone(),
            s.resync_wire_bytes,
        );
        let rate = rates.observe(&rec.id, s.received_unix_ms, s.bytes_replicated, s.pending_log_bytes);
        f.gauge(
            "siterecovery_vm_shipping_rate_bytes_per_second",
            "Measured rate the VM's changes ship at.",
            vm.clone(),
            rate,
        );
        if tracked && rec.state == ReplicationState::Replicating {
            f.gauge(
                "siterecovery_vm_rpo_breach_predicted_seconds",
                "Predicted time until the VM's RPO lag reaches twice its interval (+Inf: none predicted).",
                vm,
                seconds_to_breach(lag, interval, s.pending_log_bytes, rate),
            );
        }
    }
}

fn jobs_metrics(f: &mut Families, jobs: &[JobRecord]) {
    let state_name = |s: JobState| match s {
        JobState::Running => "running",
        JobState::Succeeded => "succeeded",
        JobState::Failed => "failed",
    };
    for kind in JobKind::ALL {
        let of_kind: Vec<&JobRecord> = jobs.iter().filter(|j| j.kind == kind).collect();
        for state in [JobState::Running, JobState::Succeeded, JobState::Failed] {
            let n = of_kind.iter().filter(|j| j.state == state).count();
            let l: Labels = vec![("kind", kind.to_string()), ("state", state_name(state).to_owned())];
            f.gauge("siterecovery_jobs", "Jobs in the provider's store, by kind and state.", l, n as f64);
        }
        let mut buckets: Vec<(f64, u64)> = JOB_BUCKETS.iter().chain([&f64::INFINITY]).map(|b| (*b, 0)).collect();
        let (mut count, mut sum) = (0, 0.0);
        for j in of_kind.iter().filter(|j| j.state != JobState::Running && j.ended_unix_ms >= j.created_unix_ms) {
            let d = (j.ended_unix_ms - j.created_unix_ms) as f64 / 1000.0;
            if let Some(b) = buckets.iter_mut().find(|(le, _)| d <= *le) {
                b.1 += 1;
            }
            count += 1;
            sum += d;
        }
        f.histogram(
            "siterecovery_job_duration_seconds",
            "Duration of the finished jobs in the store, by kind.",
            vec![("kind", kind.to_string())],
            buckets,
            count,
            sum,
        );
    }
}
