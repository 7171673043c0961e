//! The operator's protection commands: policies, cloud pairings, protect / unprotect /
//! resync, recovery points and jobs, rendered as tables, progress or JSON.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use siterecovery_proto::v1;
use siterecovery_proto::v1::inventory_client::InventoryClient;
use siterecovery_proto::v1::protection_client::ProtectionClient;
use tonic::transport::Channel;

use super::{CliError, age, human_size, print_table};
use crate::health::coarse;
use crate::policy::human_duration;

type Prot = ProtectionClient<Channel>;

fn out(v: &serde_json::Value) -> Result<(), CliError> {
    let s = serde_json::to_string_pretty(v).map_err(|e| CliError::Output(e.to_string()))?;
    println!("{s}");
    Ok(())
}

fn ms(d: u64) -> String {
    if d == 0 { "-".into() } else { human_duration(Duration::from_millis(d)) }
}

/// "2025-01-31 22:00:05 UTC" for a unix-ms time (0 → "-").
pub fn utc(unix_ms: i64) -> String {
    if unix_ms <= 0 {
        return "-".into();
    }
    let secs = unix_ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC", rem / 3600, (rem % 3600) / 60, rem % 60)
}

// The words the CLI prints for the wire's enums.

/// The wire's failover kind of the CLI's word (`test`, `planned`, `unplanned`).
pub fn failover_type(word: &str) -> Result<i32, CliError> {
    match siterecovery_proto::model::FailoverKind::from_word(word) {
        Some(k) if k != siterecovery_proto::model::FailoverKind::Local => Ok(k.into()),
        _ => Err(CliError::Usage(format!("failover type {word:?}: use test, planned or unplanned"))),
    }
}

fn job_kind(v: i32) -> &'static str {
    crate::job::kind_name(v)
}

fn job_state(v: i32) -> &'static str {
    crate::job::JobState::name_of(v)
}

fn step_state(v: i32) -> &'static str {
    crate::job::StepState::name_of(v)
}

pub fn replication_state(v: i32) -> &'static str {
    crate::protection::ReplicationState::try_from(v).map_or("unknown", |s| s.as_str())
}

pub fn health(v: i32) -> &'static str {
    crate::health::Health::try_from(v).map_or("unknown", |h| h.as_str())
}

fn failover_kind(v: i32) -> &'static str {
    siterecovery_proto::model::FailoverKind::try_from(v).map_or("unknown", |k| k.as_str())
}

fn point_kind(v: i32) -> &'static str {
    siterecovery_proto::model::PointKind::try_from(v).map_or("unknown", |k| k.as_str())
}

fn action_kind(v: i32) -> &'static str {
    match v1::PlanActionKind::try_from(v) {
        Ok(v1::PlanActionKind::Script) => "script",
        Ok(v1::PlanActionKind::Manual) => "manual",
        _ => "unknown",
    }
}

/// `network`, `offline` or `at=<RFC 3339>`, as `policy create --initial` takes it.
pub fn initial_method(p: &v1::Policy) -> String {
    match v1::InitialMethod::try_from(p.initial_method) {
        Ok(v1::InitialMethod::Offline) => "offline".into(),
        Ok(v1::InitialMethod::At) => {
            time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(p.initial_at_unix_ms) * 1_000_000)
                .ok()
                .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
                .map_or_else(|| "at=?".into(), |t| format!("at={t}"))
        }
        _ => "network".into(),
    }
}

pub fn policy_json(p: &v1::Policy) -> serde_json::Value {
    serde_json::json!({
        "name": p.name, "interval_ms": p.interval_ms, "retention_ms": p.retention_ms,
        "app_consistent_every_ms": p.app_consistent_every_ms, "compression": p.compression,
        "initial_method": initial_method(p), "port": p.port,
        "resync_window_start_hour": p.resync_window_start_hour, "resync_window_end_hour": p.resync_window_end_hour,
    })
}

/// `policy create | list | delete`.
pub async fn policy(
    prot: &mut Prot,
    cmd: PolicyArgs,
    json: bool,
    rpc: &impl Fn(tonic::Status) -> CliError,
) -> Result<(), CliError> {
    match cmd {
        PolicyArgs::Create(p) => {
            let p = prot.create_policy(p).await.map_err(rpc)?.into_inner();
            if json {
                out(&policy_json(&p))?;
            } else {
                println!("policy {} created: every {}, points kept {}", p.name, ms(p.interval_ms), ms(p.retention_ms));
            }
        }
        PolicyArgs::List => {
            let ps = prot.list_policies(v1::ListPoliciesRequest {}).await.map_err(rpc)?.into_inner().policies;
            if json {
                out(&serde_json::Value::Array(ps.iter().map(policy_json).collect()))?;
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
                        ]
                    })
                    .collect();
                print_table(
                    &["POLICY", "INTERVAL", "RETENTION", "APP-CONSISTENT", "COMPRESSION", "INITIAL", "BUSINESS HOURS"],
                    &rows,
                );
            }
        }
        PolicyArgs::Delete(name) => {
            prot.delete_policy(v1::DeletePolicyRequest { name: name.clone() }).await.map_err(rpc)?;
            if json {
                out(&serde_json::json!({"deleted": name}))?;
            } else {
                println!("policy {name} deleted");
            }
        }
    }
    Ok(())
}

/// What `policy` does, decoupled from clap.
pub enum PolicyArgs {
    Create(v1::Policy),
    List,
    Delete(String),
}

/// What `cloud` does.
pub enum CloudArgs {
    Pair(v1::CloudPairing),
    List,
    Unpair(String),
}

pub async fn cloud(
    inv: &mut InventoryClient<Channel>,
    prot: &mut Prot,
    cmd: CloudArgs,
    json: bool,
    rpc: &impl Fn(tonic::Status) -> CliError,
) -> Result<(), CliError> {
    match cmd {
        CloudArgs::Pair(p) => {
            let p = prot.pair_clouds(p).await.map_err(rpc)?.into_inner();
            if json {
                out(
                    &serde_json::json!({"source_cloud": p.source_cloud, "target_cloud": p.target_cloud, "policy": p.policy}),
                )?;
            } else {
                println!("cloud {} paired with {} under policy {}", p.source_cloud, p.target_cloud, p.policy);
            }
        }
        CloudArgs::Unpair(source) => {
            prot.unpair_clouds(v1::UnpairCloudsRequest { source_cloud: source.clone() }).await.map_err(rpc)?;
            if json {
                out(&serde_json::json!({"unpaired": source}))?;
            } else {
                println!("cloud {source} unpaired");
            }
        }
        CloudArgs::List => {
            let clouds = inv.list_clouds(v1::ListCloudsRequest {}).await.map_err(rpc)?.into_inner().clouds;
            let pairings = prot.list_pairings(v1::ListPairingsRequest {}).await.map_err(rpc)?.into_inner().pairings;
            let pairing_of = |c: &str| -> (String, String) {
                if let Some(p) = pairings.iter().find(|p| p.source_cloud == c) {
                    (format!("→ {}", p.target_cloud), p.policy.clone())
                } else if let Some(p) = pairings.iter().find(|p| p.target_cloud == c) {
                    (format!("← {}", p.source_cloud), p.policy.clone())
                } else {
                    ("-".into(), "-".into())
                }
            };
            if json {
                let v: Vec<_> = clouds
                    .iter()
                    .map(|c| {
                        let p = pairings.iter().find(|p| p.source_cloud == c.name);
                        serde_json::json!({
                            "name": c.name, "site": c.site, "hosts": c.hosts,
                            "target_cloud": p.map(|p| p.target_cloud.clone()),
                            "policy": p.map(|p| p.policy.clone()),
                            "source_clouds": pairings.iter().filter(|p| p.target_cloud == c.name).map(|p| p.source_cloud.clone()).collect::<Vec<_>>(),
                        })
                    })
                    .collect();
                out(&serde_json::Value::Array(v))?;
            } else {
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

pub fn job_json(j: &v1::Job) -> serde_json::Value {
    serde_json::json!({
        "id": j.id, "kind": job_kind(j.kind), "vm": j.vm, "state": job_state(j.state), "error": j.error,
        "done_bytes": j.done_bytes, "total_bytes": j.total_bytes, "rate_bytes_per_sec": j.rate_bytes_per_sec,
        "created_unix_ms": j.created_unix_ms, "ended_unix_ms": j.ended_unix_ms,
        "steps": j.steps.iter().map(|s| serde_json::json!({
            "name": s.name, "state": step_state(s.state), "detail": s.detail,
            "started_unix_ms": s.started_unix_ms, "ended_unix_ms": s.ended_unix_ms,
        })).collect::<Vec<_>>(),
    })
}

fn print_job(j: &v1::Job) {
    println!("job       {} ({})", j.id, job_kind(j.kind));
    println!("VM        {}", j.vm);
    println!("state     {}", job_state(j.state));
    println!("created   {}", utc(j.created_unix_ms));
    if j.ended_unix_ms > 0 {
        println!("ended     {}", utc(j.ended_unix_ms));
    }
    if j.total_bytes > 0 {
        println!("progress  {}", progress_text(j));
    }
    if !j.error.is_empty() {
        println!("error     {}", j.error);
    }
    for s in &j.steps {
        let took = if s.ended_unix_ms > 0 && s.started_unix_ms > 0 {
            format!(" ({})", coarse((s.ended_unix_ms - s.started_unix_ms).max(0) as u64))
        } else {
            String::new()
        };
        println!("  [{}] {}{}", s.state, s.name, took);
        if !s.detail.is_empty() {
            println!("        {}", s.detail);
        }
    }
}

fn progress_text(j: &v1::Job) -> String {
    let mut s = format!("{} of {}", human_size(j.done_bytes), human_size(j.total_bytes));
    if let Some(pct) = (j.done_bytes.min(j.total_bytes) * 100).checked_div(j.total_bytes) {
        s.push_str(&format!(" ({pct}%)"));
    }
    if j.rate_bytes_per_sec > 0 && j.state() == v1::JobState::Running {
        s.push_str(&format!(", {}/s", human_size(j.rate_bytes_per_sec)));
        let left = j.total_bytes.saturating_sub(j.done_bytes);
        s.push_str(&format!(", ETA {}", coarse(left * 1000 / j.rate_bytes_per_sec)));
    }
    s
}

/// The one-line bar drawn on a terminal.
fn bar(j: &v1::Job) -> String {
    const W: u64 = 30;
    let filled = (j.done_bytes.min(j.total_bytes) * W).checked_div(j.total_bytes).unwrap_or(0) as usize;
    format!("[{}{}] {}", "#".repeat(filled), "-".repeat(W as usize - filled), progress_text(j))
}

/// Prints a job's changes as they stream in.
struct Follow {
    tty: bool,
    bar_shown: bool,
    last: Option<v1::Job>,
    last_progress: Option<Instant>,
}

impl Follow {
    fn clear_bar(&mut self) {
        if self.bar_shown {
            print!("\r\x1b[K");
            self.bar_shown = false;
        }
    }

    fn update(&mut self, j: &v1::Job) {
        let prev = self.last.take();
        for (i, s) in j.steps.iter().enumerate() {
            let before = prev.as_ref().and_then(|p| p.steps.get(i));
            let changed_state = before.is_none_or(|b| b.state != s.state);
            if changed_state && s.state() != v1::StepState::Pending {
                self.clear_bar();
                let detail = if s.detail.is_empty() { String::new() } else { format!(": {}", s.detail) };
                println!("{} {} {}{detail}", j.id, step_state(s.state), s.name);
            }
        }
        if j.state() == v1::JobState::Running
            && j.total_bytes > 0
            && prev.as_ref().is_some_and(|p| p.done_bytes != j.done_bytes)
        {
            if self.tty {
                print!("\r\x1b[K{}", bar(j));
                self.bar_shown = true;
            } else if self.last_progress.is_none_or(|t| t.elapsed() >= Duration::from_secs(2)) {
                println!("{} progress {}", j.id, progress_text(j));
                self.last_progress = Some(Instant::now());
            }
        }
        let _ = std::io::stdout().flush();
        self.last = Some(j.clone());
    }
}

/// Follows job `id` until it ends; an error when it failed.
pub async fn watch(
    prot: &mut Prot,
    id: &str,
    json: bool,
    rpc: &impl Fn(tonic::Status) -> CliError,
) -> Result<(), CliError> {
    let mut stream = prot.watch_job(v1::GetJobRequest { id: id.into() }).await.map_err(rpc)?.into_inner();
    let mut f =
        Follow { tty: !json && std::io::stdout().is_terminal(), bar_shown: false, last: None, last_progress: None };
    while let Some(j) = stream.message().await.map_err(rpc)? {
        if !json {
            f.update(&j);
        } else {
            f.last = Some(j);
        }
    }
    f.clear_bar();
    let Some(j) = f.last else { return Err(CliError::JobLost { id: id.into() }) };
    if json {
        out(&job_json(&j))?;
    } else if j.state() == v1::JobState::Succeeded {
        println!("{} {} succeeded", j.id, job_kind(j.kind));
    }
    match j.state() {
        v1::JobState::Succeeded => Ok(()),
        v1::JobState::Failed => Err(CliError::JobFailed { id: j.id, kind: job_kind(j.kind).into(), error: j.error }),
        _ => Err(CliError::JobLost { id: j.id }),
    }
}

/// After protect / unprotect / resync: print the job, or follow it with `--wait`.
pub async fn started(
    prot: &mut Prot,
    job: v1::Job,
    wait: bool,
    json: bool,
    rpc: &impl Fn(tonic::Status) -> CliError,
) -> Result<(), CliError> {
    if wait {
        if !json {
            println!("{} {} started for VM {}", job.id, job.kind, job.vm);
        }
        return watch(prot, &job.id, json, rpc).await;
    }
    if json {
        out(&job_json(&job))
    } else {
        println!("{} {} started for VM {}; follow it with `job watch {}`", job.id, job.kind, job.vm, job.id);
        Ok(())
    }
}

/// What `job` does.
pub enum JobArgs {
    List,
    Show(String),
    Watch(String),
}

pub async fn job(
    prot: &mut Prot,
    cmd: JobArgs,
    json: bool,
    rpc: &impl Fn(tonic::Status) -> CliError,
) -> Result<(), CliError> {
    match cmd {
        JobArgs::List => {
            let jobs = prot.list_jobs(v1::ListJobsRequest {}).await.map_err(rpc)?.into_inner().jobs;
            if json {
                return out(&serde_json::Value::Array(jobs.iter().map(job_json).collect()));
            }
            let rows: Vec<_> = jobs
                .iter()
                .map(|j| {
                    let step = j
                        .steps
                        .iter()
                        .find(|s| matches!(s.state(), v1::StepState::Running | v1::StepState::Failed))
                        .map(|s| s.name.clone())
                        .unwrap_or_else(|| "-".into());
                    vec![
                        j.id.clone(),
                        job_kind(j.kind).into(),
                        j.vm.clone(),
                        job_state(j.state).into(),
                        step,
                        age(j.created_unix_ms),
                        j.error.clone(),
                    ]
                })
                .collect();
            print_table(&["JOB", "KIND", "VM", "STATE", "STEP", "CREATED", "ERROR"], &rows);
            Ok(())
        }
        JobArgs::Show(id) => {
            let j = prot.get_job(v1::GetJobRequest { id }).await.map_err(rpc)?.into_inner();
            if json {
                out(&job_json(&j))
            } else {
                print_job(&j);
                Ok(())
            }
        }
        JobArgs::Watch(id) => watch(prot, &id, json, rpc).await,
    }
}

pub fn point_json(p: &v1::RecoveryPoint) -> serde_json::Value {
    serde_json::json!({
        "id": p.id, "seq": p.seq, "created_unix_ms": p.created_unix_ms, "app_consistent": p.app_consistent,
        "size_bytes": p.size_bytes, "kind": point_kind(p.kind),
    })
}

pub async fn points(
    prot: &mut Prot,
    vm: String,
    json: bool,
    rpc: &impl Fn(tonic::Status) -> CliError,
) -> Result<(), CliError> {
    let ps = prot.list_points(v1::ListPointsRequest { vm }).await.map_err(rpc)?.into_inner().points;
    if json {
        return out(&serde_json::Value::Array(ps.iter().map(point_json).collect()));
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

/// What `point` does.
pub enum PointArgs {
    Export { vm: String, point: String },
    Unexport(String),
}

pub async fn point(
    prot: &mut Prot,
    cmd: PointArgs,
    json: bool,
    rpc: &impl Fn(tonic::Status) -> CliError,
) -> Result<(), CliError> {
    match cmd {
        PointArgs::Export { vm, point } => {
            let r = prot.export_point(v1::ExportPointRequest { vm, point }).await.map_err(rpc)?.into_inner();
            if json {
                out(&serde_json::json!({"uri": r.uri, "point_id": r.point_id}))
            } else {
                println!("{}", r.uri);
                Ok(())
            }
        }
        PointArgs::Unexport(vm) => {
            prot.unexport_point(v1::UnexportPointRequest { vm: vm.clone() }).await.map_err(rpc)?;
            if json {
                out(&serde_json::json!({"unexported": vm}))
            } else {
                println!("export of {vm}'s point removed");
                Ok(())
            }
        }
    }
}

pub fn replication_json(r: &v1::Replication) -> serde_json::Value {
    serde_json::json!({
        "relationship_id": r.relationship_id, "primary_host": r.primary_host, "replica_host": r.replica_host,
        "policy": r.policy, "state": replication_state(r.state), "health": health(r.health), "health_reasons": r.health_reasons,
        "last_point_unix_ms": r.last_point_unix_ms, "last_point_id": r.last_point_id, "rpo_lag_ms": r.rpo_lag_ms,
        "pending_log_bytes": r.pending_log_bytes, "bytes_replicated": r.bytes_replicated, "error": r.error,
        "done_bytes": r.done_bytes, "total_bytes": r.total_bytes,
        "addresses": r.addresses.iter().map(|a| serde_json::json!({
            "nic": a.nic, "source_network": a.source_network, "source_ip": a.source_ip,
            "target_network": a.target_network, "target_ip": a.target_ip, "dhcp": a.dhcp, "note": a.note,
        })).collect::<Vec<_>>(),
        "test_failover_vm": r.test_failover_vm,
    })
}

pub fn vm_failover_json(f: &v1::FailoverInfo) -> serde_json::Value {
    serde_json::json!({
        "relationship_id": f.relationship_id, "point_id": f.point_id, "kind": failover_kind(f.kind), "committed": f.committed,
        "test_of": f.test_of, "started_unix_ms": f.started_unix_ms,
    })
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

/// What `failover` does.
pub enum FailoverArgs {
    Start(v1::FailoverRequest),
    Commit(String),
    Cleanup(String),
    ChangePoint(v1::ChangePointRequest),
}

pub async fn failover(
    prot: &mut Prot,
    cmd: FailoverArgs,
    wait: bool,
    json: bool,
    rpc: &impl Fn(tonic::Status) -> CliError,
) -> Result<(), CliError> {
    let job = match cmd {
        FailoverArgs::Start(r) => prot.failover(r).await,
        FailoverArgs::Commit(vm) => prot.commit_failover(v1::VmRequest { vm }).await,
        FailoverArgs::Cleanup(vm) => prot.cleanup_test_failover(v1::VmRequest { vm }).await,
        FailoverArgs::ChangePoint(r) => prot.change_point(r).await,
    }
    .map_err(rpc)?
    .into_inner();
    started(prot, job, wait, json, rpc).await
}

/// What `network` does.
pub enum NetworkArgs {
    Create(v1::VmNetwork),
    List,
    Map(v1::NetworkMapping),
    Mappings,
}

pub fn network_json(n: &v1::VmNetwork) -> serde_json::Value {
    serde_json::json!({
        "site": n.site, "name": n.name, "subnet": n.subnet, "pools": n.pools, "gateway": n.gateway, "dns": n.dns,
    })
}

pub async fn network(
    prot: &mut Prot,
    cmd: NetworkArgs,
    json: bool,
    rpc: &impl Fn(tonic::Status) -> CliError,
) -> Result<(), CliError> {
    match cmd {
        NetworkArgs::Create(n) => {
            let n = prot.create_network(n).await.map_err(rpc)?.into_inner();
            if json {
                return out(&network_json(&n));
            }
            let pools =
                if n.pools.is_empty() { "no static pool".to_string() } else { format!("pools {}", n.pools.join(", ")) };
            println!("network {} created at site {}: {} ({pools})", n.name, n.site, n.subnet);
        }
        NetworkArgs::List => {
            let nets = prot.list_networks(v1::ListNetworksRequest {}).await.map_err(rpc)?.into_inner().networks;
            if json {
                return out(&serde_json::Value::Array(nets.iter().map(network_json).collect()));
            }
            let rows: Vec<_> = nets
                .iter()
                .map(|n| {
                    let dash = |s: String| if s.is_empty() { "-".to_string() } else { s };
                    vec![
                        n.name.clone(),
                        n.site.clone(),
                        n.subnet.clone(),
                        dash(n.pools.join(",")),
                        dash(n.gateway.clone()),
                        dash(n.dns.join(",")),
                    ]
                })
                .collect();
            print_table(&["NETWORK", "SITE", "SUBNET", "POOLS", "GATEWAY", "DNS"], &rows);
        }
        NetworkArgs::Map(m) => {
            let m = prot.map_network(m).await.map_err(rpc)?.into_inner();
            if json {
                return out(&serde_json::json!({"source": m.source, "target": m.target}));
            }
            println!("network {} mapped to {}", m.source, m.target);
        }
        NetworkArgs::Mappings => {
            let maps =
                prot.list_network_mappings(v1::ListNetworkMappingsRequest {}).await.map_err(rpc)?.into_inner().mappings;
            if json {
                return out(&serde_json::Value::Array(
                    maps.iter().map(|m| serde_json::json!({"source": m.source, "target": m.target})).collect(),
                ));
            }
            let rows: Vec<_> = maps.iter().map(|m| vec![m.source.clone(), m.target.clone()]).collect();
            print_table(&["SOURCE", "TARGET"], &rows);
        }
    }
    Ok(())
}

/// Builds a plan from `plan create` flags.
pub fn plan_from_flags(
    name: String,
    groups: &[String],
    scripts: &[String],
    manuals: &[String],
    script_timeout: Duration,
) -> Result<v1::RecoveryPlan, String> {
    use crate::plan::{parse_action, parse_group};
    let mut plan = v1::RecoveryPlan { name, groups: vec![], actions: vec![] };
    for g in groups {
        let (order, vms) = parse_group(g)?;
        plan.groups.push(v1::PlanGroup { order, vms });
    }
    for (flag, kind, list) in
        [("script", v1::PlanActionKind::Script, scripts), ("manual", v1::PlanActionKind::Manual, manuals)]
    {
        for a in list {
            let (after_group, command) = parse_action(flag, a)?;
            plan.actions.push(v1::PlanAction {
                after_group,
                kind: kind.into(),
                command,
                timeout_secs: script_timeout.as_secs().clamp(1, u64::from(u32::MAX)) as u32,
            });
        }
    }
    Ok(plan)
}

/// What `plan` does.
pub enum PlanArgs {
    Create(v1::RecoveryPlan),
    List,
    Failover { plan: String, kind: String, wait: bool },
    Confirm(String),
}

pub fn plan_json(p: &v1::RecoveryPlan) -> serde_json::Value {
    serde_json::json!({
        "name": p.name,
        "groups": p.groups.iter().map(|g| serde_json::json!({"order": g.order, "vms": g.vms})).collect::<Vec<_>>(),
        "actions": p.actions.iter().map(|a| serde_json::json!({
            "after_group": a.after_group, "kind": action_kind(a.kind), "command": a.command, "timeout_secs": a.timeout_secs,
        })).collect::<Vec<_>>(),
    })
}

pub async fn plan(
    prot: &mut Prot,
    cmd: PlanArgs,
    json: bool,
    rpc: &impl Fn(tonic::Status) -> CliError,
) -> Result<(), CliError> {
    match cmd {
        PlanArgs::Create(p) => {
            let p = prot.create_plan(p).await.map_err(rpc)?.into_inner();
            if json {
                return out(&plan_json(&p));
            }
            let vms: usize = p.groups.iter().map(|g| g.vms.len()).sum();
            println!(
                "recovery plan {} created: {} group(s), {vms} VM(s), {} action(s)",
                p.name,
                p.groups.len(),
                p.actions.len()
            );
        }
        PlanArgs::List => {
            let plans = prot.list_plans(v1::ListPlansRequest {}).await.map_err(rpc)?.into_inner().plans;
            if json {
                return out(&serde_json::Value::Array(plans.iter().map(plan_json).collect()));
            }
            let rows: Vec<_> = plans
                .iter()
                .map(|p| {
                    let groups: Vec<String> =
                        p.groups.iter().map(|g| format!("{}:{}", g.order, g.vms.join(","))).collect();
                    let actions: Vec<String> = p
                        .actions
                        .iter()
                        .map(|a| format!("{}@{} {}", action_kind(a.kind), a.after_group, a.command))
                        .collect();
                    vec![
                        p.name.clone(),
                        groups.join(" "),
                        if actions.is_empty() { "-".into() } else { actions.join("; ") },
                    ]
                })
                .collect();
            print_table(&["PLAN", "GROUPS", "ACTIONS"], &rows);
        }
        PlanArgs::Failover { plan, kind, wait } => {
            let job = prot
                .plan_failover(v1::PlanFailoverRequest { plan, r#type: failover_type(&kind)? })
                .await
                .map_err(rpc)?
                .into_inner();
            return started(prot, job, wait, json, rpc).await;
        }
        PlanArgs::Confirm(job_id) => {
            let j = prot.confirm_plan_action(v1::ConfirmPlanActionRequest { job_id }).await.map_err(rpc)?.into_inner();
            if json {
                return out(&job_json(&j));
            }
            println!("{}: manual action confirmed; the plan goes on", j.id);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "-");
        assert_eq!(utc(951_868_800_000), "2000-03-01 00:00:00 UTC");
        assert_eq!(utc(1_738_360_805_000), "2025-01-31 22:00:05 UTC");
    }

    #[test]
    fn progress_and_bar() {
        let j = v1::Job {
            state: v1::JobState::Running.into(),
            done_bytes: 1 << 29,
            total_bytes: 1 << 30,
            rate_bytes_per_sec: 1 << 20,
            ..Default::default()
        };
        assert_eq!(progress_text(&j), "512.0 MiB of 1.0 GiB (50%), 1.0 MiB/s, ETA 8m");
        assert!(bar(&j).starts_with("[###############---------------]"));
    }
}
