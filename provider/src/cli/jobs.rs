//! `job list | show | watch`, and following the job any long command starts (`--wait`):
//! steps printed as they change, a progress bar on a terminal, a line every 2 s
//! otherwise.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use clap::Subcommand;
use siterecovery_proto::model::units::human_size;
use siterecovery_proto::v1;

use super::output::{age, print_json, print_table, utc};
use super::views::{self, JobView};
use super::words::{job_kind, job_state, step_state};
use super::{CliError, Operator};
use crate::relationship::health::coarse;

#[derive(Subcommand)]
pub enum JobCmd {
    /// List jobs, oldest first.
    List,
    /// Show a job with its steps.
    Show { id: String },
    /// Follow a job until it ends; exit non-zero when it fails.
    Watch { id: String },
}

/// `job list | show | watch`.
pub async fn run(op: &mut Operator, cmd: JobCmd) -> Result<(), CliError> {
    match cmd {
        JobCmd::List => {
            let jobs = op.prot.list_jobs(v1::ListJobsRequest {}).await.map_err(|s| op.rpc(s))?.into_inner().jobs;
            if op.json {
                return print_json(&views::all::<_, JobView>(&jobs));
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
        JobCmd::Show { id } => {
            let j = op.prot.get_job(v1::GetJobRequest { id }).await.map_err(|s| op.rpc(s))?.into_inner();
            if op.json {
                print_json(&JobView::from(&j))
            } else {
                print_job(&j);
                Ok(())
            }
        }
        JobCmd::Watch { id } => watch(op, &id).await,
    }
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
        println!("  [{}] {}{}", step_state(s.state), s.name, took);
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
pub async fn watch(op: &mut Operator, id: &str) -> Result<(), CliError> {
    let json = op.json;
    let mut stream = op.prot.watch_job(v1::GetJobRequest { id: id.into() }).await.map_err(|s| op.rpc(s))?.into_inner();
    let mut f =
        Follow { tty: !json && std::io::stdout().is_terminal(), bar_shown: false, last: None, last_progress: None };
    while let Some(j) = stream.message().await.map_err(|s| op.rpc(s))? {
        if !json {
            f.update(&j);
        } else {
            f.last = Some(j);
        }
    }
    f.clear_bar();
    let Some(j) = f.last else { return Err(CliError::JobLost { id: id.into() }) };
    if json {
        print_json(&JobView::from(&j))?;
    } else if j.state() == v1::JobState::Succeeded {
        println!("{} {} succeeded", j.id, job_kind(j.kind));
    }
    match j.state() {
        v1::JobState::Succeeded => Ok(()),
        v1::JobState::Failed => Err(CliError::JobFailed { id: j.id, kind: job_kind(j.kind).into(), error: j.error }),
        _ => Err(CliError::JobLost { id: j.id }),
    }
}

/// After a command that starts a job: print the job, or follow it with `--wait`.
pub async fn started(op: &mut Operator, job: v1::Job, wait: bool) -> Result<(), CliError> {
    if wait {
        if !op.json {
            println!("{} {} started for VM {}", job.id, job_kind(job.kind), job.vm);
        }
        return watch(op, &job.id).await;
    }
    if op.json {
        print_json(&JobView::from(&job))
    } else {
        println!("{} {} started for VM {}; follow it with `job watch {}`", job.id, job_kind(job.kind), job.vm, job.id);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
