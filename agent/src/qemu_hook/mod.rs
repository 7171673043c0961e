//! `siterecovery-qemu-hook`: runs a VM under QEMU on its NBD exports, for
//! `agent serve --on-vm-start "siterecovery-qemu-hook start ..." --on-vm-stop
//! "siterecovery-qemu-hook stop ..."`.
//!
//! The agent runs its hooks with `sh -c` and the VM in the environment
//! (`SITERECOVERY_VM`, `SITERECOVERY_VM_FOLDER`, `SITERECOVERY_NBD_URIS`); the hook
//! reads the VM's `vm.json` (memory, CPUs, boot settings, NICs) from the folder.
//! `start` runs `qemu-system-x86_64 -daemonize` with its pid file (`qemu.pid`), QMP
//! socket (`qmp.sock`) and serial console (`serial.log`) in the VM folder; `stop` asks
//! the guest to power down over QMP (ACPI), waits the grace period, then QMP `quit`,
//! then SIGKILL by the pid file. The parts: `launch` (the QEMU command line, pure),
//! `qmp` (the QMP client), `process` (the pid file and the stop sequence).

mod launch;
mod process;
mod qmp;

pub use launch::{Accel, Boot, Launch, LaunchError, NetMap, qemu_args};
pub use process::{StopOutcome, StopPlan, start, stop};
pub use qmp::{Qmp, QmpError};

use std::path::PathBuf;

/// The pid file QEMU writes in the VM folder.
pub const PID_FILE: &str = "qemu.pid";
/// The QMP socket in the VM folder.
pub const QMP_SOCKET: &str = "qmp.sock";
/// The serial console's file in the VM folder (unless `--serial` says otherwise).
pub const SERIAL_LOG: &str = "serial.log";

/// What went wrong, with the exit code the hook ends with.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("{0}")]
    Config(String),
    #[error("QEMU not found: {} ({error}); install qemu-system-x86 or pass --qemu PATH", .path.display())]
    QemuMissing { path: PathBuf, error: std::io::Error },
    #[error("QEMU failed to start the VM ({status}): {stderr}")]
    QemuFailed { status: std::process::ExitStatus, stderr: String },
    #[error("QEMU of this VM already runs (pid {0})")]
    AlreadyRunning(i32),
    #[error("QEMU runs (pid {pid}) but its QMP socket {} is unusable: {error}; killed it", .path.display())]
    QmpSocket { pid: i32, path: PathBuf, error: QmpError },
    #[error("QEMU (pid {0}) did not exit even after SIGKILL")]
    Unkillable(i32),
}

impl HookError {
    /// The process exit code: 2 bad config or environment, 3 QEMU missing, 4 QEMU
    /// refused to start, 5 QMP socket missing or broken, 6 QEMU would not stop.
    pub fn exit_code(&self) -> i32 {
        match self {
            HookError::Config(_) => 2,
            HookError::QemuMissing { .. } => 3,
            HookError::QemuFailed { .. } | HookError::AlreadyRunning(_) => 4,
            HookError::QmpSocket { .. } => 5,
            HookError::Unkillable(_) => 6,
        }
    }
}
