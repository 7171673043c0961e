//! `siterecovery-qemu-hook`: runs the agent's VMs under QEMU (see `qemu_hook`).
//!
//! ```text
//! agent serve \
//!   --on-vm-start 'siterecovery-qemu-hook start --net "*=bridge:br0"' \
//!   --on-vm-stop  'siterecovery-qemu-hook stop --grace 60'
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use siterecovery_agent::qemu_hook::{self, Accel, Boot, Launch, NetMap, StopPlan};

/// Runs a siterecovery VM under QEMU on its NBD exports. Called by the agent
/// (`agent serve --on-vm-start/--on-vm-stop`), which sets SITERECOVERY_VM,
/// SITERECOVERY_VM_FOLDER and SITERECOVERY_NBD_URIS; memory, CPUs, boot settings and
/// NICs come from the VM's vm.json in the folder.
///
/// Exit codes: 0 done, 2 bad config or environment, 3 QEMU missing, 4 QEMU refused to
/// start (or already runs), 5 QMP socket missing or broken, 6 QEMU would not stop.
#[derive(Parser)]
#[command(name = "siterecovery-qemu-hook", version)]
struct Cli {
    /// The VM folder (the agent sets it).
    #[arg(long, env = "SITERECOVERY_VM_FOLDER", global = true)]
    folder: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

// Parsed once per run: the size of the larger variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// Start QEMU detached (`-daemonize`; qemu.pid, qmp.sock, serial.log in the VM folder).
    Start {
        /// The VM's name (the agent sets it); checked against vm.json.
        #[arg(long, env = "SITERECOVERY_VM")]
        vm: String,
        /// The NBD URIs of the VM's disks, space-separated (the agent sets them).
        #[arg(long, env = "SITERECOVERY_NBD_URIS", default_value = "")]
        nbd_uris: String,
        /// The QEMU binary.
        #[arg(long, default_value = "qemu-system-x86_64")]
        qemu: PathBuf,
        /// Accelerator: kvm, or tcg (emulation, e.g. where KVM is unavailable).
        #[arg(long, default_value = "kvm")]
        accel: Accel,
        /// Where the NICs of a VM network go: NETWORK=tap:IFNAME or NETWORK=bridge:BRIDGE,
        /// `*` for any network. Repeatable. A VM with a NIC on an unmapped network does not start.
        #[arg(long = "net")]
        nets: Vec<NetMap>,
        /// Kernel for VMs whose config names none (direct boot; else they boot from disk0).
        #[arg(long)]
        kernel: Option<PathBuf>,
        /// Initrd with --kernel.
        #[arg(long, requires = "kernel")]
        initrd: Option<PathBuf>,
        /// Kernel command line with --kernel.
        #[arg(long, requires = "kernel")]
        append: Option<String>,
        /// QEMU's -serial value (default: file:<folder>/serial.log).
        #[arg(long)]
        serial: Option<String>,
        /// An extra QEMU argument, after ours (repeatable; `--qemu-arg=-no-reboot`).
        #[arg(long = "qemu-arg", allow_hyphen_values = true)]
        extra: Vec<String>,
    },
    /// Ask the guest to power off (ACPI over QMP), then QMP quit after the grace period,
    /// then SIGKILL.
    Stop {
        /// Seconds the guest has to power off.
        #[arg(long, default_value_t = 60)]
        grace: u64,
        /// Seconds QEMU has to exit after QMP quit, before SIGKILL.
        #[arg(long, default_value_t = 10)]
        quit_timeout: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let Some(folder) = cli.folder else {
        eprintln!("siterecovery-qemu-hook: no VM folder: set SITERECOVERY_VM_FOLDER (the agent does) or pass --folder");
        return ExitCode::from(2);
    };
    let result = match cli.cmd {
        Cmd::Start { vm, nbd_uris, qemu, accel, nets, kernel, initrd, append, serial, extra } => {
            let uris: Vec<String> = nbd_uris.split_whitespace().map(str::to_owned).collect();
            let launch = Launch { accel, nets, serial, default_boot: Boot { kernel, initrd, append }, extra };
            qemu_hook::start(&qemu, &folder, &vm, &uris, &launch).map(|pid| {
                println!("QEMU runs VM {vm} (pid {pid}, QMP {})", folder.join(qemu_hook::QMP_SOCKET).display())
            })
        }
        Cmd::Stop { grace, quit_timeout } => {
            let plan = StopPlan { grace: Duration::from_secs(grace), quit_timeout: Duration::from_secs(quit_timeout) };
            qemu_hook::stop(&folder, plan).map(|o| println!("QEMU of {}: {o:?}", folder.display()))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("siterecovery-qemu-hook: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}
