//! Starting QEMU (daemonized, its pid file in the VM folder) and stopping it: ACPI
//! power-down over QMP, the grace period, QMP `quit`, then SIGKILL by the pid file.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::{HookError, Launch, PID_FILE, QMP_SOCKET, Qmp, qemu_args};
use crate::vm::read_config;

/// The pid in the VM folder's pid file, if that process is alive and is this VM's QEMU
/// (its command line names the VM's QMP socket: a recycled pid is not ours).
pub fn running_pid(folder: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(folder.join(PID_FILE)).ok()?.trim().parse().ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The state follows the parenthesised command name; a zombie has exited.
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
    if state == Some("Z") {
        return None;
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let qmp = folder.join(QMP_SOCKET);
    let ours = String::from_utf8_lossy(&cmdline).contains(&*qmp.to_string_lossy());
    ours.then_some(pid)
}

/// Starts QEMU for the VM in `folder`; returns its pid once QEMU has daemonized (its
/// disks opened).
pub fn start(qemu: &Path, folder: &Path, vm: &str, uris: &[String], l: &Launch) -> Result<i32, HookError> {
    let config = read_config(folder)
        .map_err(|e| HookError::Config(format!("{}: {e}", folder.display())))?
        .ok_or_else(|| HookError::Config(format!("{} has no vm.json", folder.display())))?;
    if config.name != vm {
        return Err(HookError::Config(format!("{} holds VM {:?}, not {vm:?}", folder.display(), config.name)));
    }
    if let Some(pid) = running_pid(folder) {
        return Err(HookError::AlreadyRunning(pid));
    }
    let uris: Vec<String> = if uris.is_empty() {
        let sock = folder.join("nbd.sock");
        config.disks.iter().map(|d| format!("nbd+unix:///{vm}-{}?socket={}", d.id, sock.display())).collect()
    } else {
        uris.to_vec()
    };
    let args = qemu_args(&config, folder, &uris, l).map_err(|e| HookError::Config(e.to_string()))?;
    let _ = std::fs::remove_file(folder.join(PID_FILE));
    let out = Command::new(qemu)
        .args(&args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|error| HookError::QemuMissing { path: qemu.to_path_buf(), error })?;
    if !out.status.success() {
        return Err(HookError::QemuFailed {
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().into(),
        });
    }
    running_pid(folder).ok_or_else(|| HookError::QemuFailed {
        status: out.status,
        stderr: format!("no live QEMU in {} after it daemonized", folder.join(PID_FILE).display()),
    })
}

/// The timings of `stop`.
#[derive(Debug, Clone, Copy)]
pub struct StopPlan {
    /// How long the guest has to power off after the ACPI request.
    pub grace: Duration,
    /// How long QEMU has to exit after QMP `quit` (then SIGKILL).
    pub quit_timeout: Duration,
}

/// How QEMU ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopOutcome {
    NotRunning,
    PoweredOff,
    Quit,
    Killed,
}

fn wait_gone(folder: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while running_pid(folder).is_some() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

fn sigkill(folder: &Path, pid: i32) -> Result<StopOutcome, HookError> {
    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    if !wait_gone(folder, Duration::from_secs(10)) {
        return Err(HookError::Unkillable(pid));
    }
    Ok(StopOutcome::Killed)
}

/// Stops the QEMU of the VM in `folder`: ACPI power-down, `grace`, QMP `quit`,
/// `quit_timeout`, SIGKILL.
pub fn stop(folder: &Path, plan: StopPlan) -> Result<StopOutcome, HookError> {
    let qmp_path: PathBuf = folder.join(QMP_SOCKET);
    let Some(pid) = running_pid(folder) else {
        return Ok(StopOutcome::NotRunning);
    };
    let outcome = match Qmp::connect(&qmp_path, Duration::from_secs(5)) {
        Err(error) => {
            sigkill(folder, pid)?;
            return Err(HookError::QmpSocket { pid, path: qmp_path, error });
        }
        Ok(mut q) => {
            let asked = q.execute("system_powerdown");
            if asked.is_ok() && q.wait_closed(plan.grace) && wait_gone(folder, Duration::from_secs(2)) {
                StopOutcome::PoweredOff
            } else {
                let _ = q.execute("quit");
                if q.wait_closed(plan.quit_timeout) && wait_gone(folder, plan.quit_timeout) {
                    StopOutcome::Quit
                } else {
                    sigkill(folder, pid)?
                }
            }
        }
    };
    if !wait_gone(folder, Duration::from_secs(5)) {
        sigkill(folder, pid)?;
    }
    let _ = std::fs::remove_file(folder.join(PID_FILE));
    Ok(outcome)
}
