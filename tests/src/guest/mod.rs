//! A real Linux guest for the QEMU hook's tests, from Debian packages only: the cloud
//! kernel (`linux-image-cloud-amd64`), and an initramfs built once per test run from
//! `busybox-static`, the kernel's virtio/ACPI-button/evdev modules and `mke2fs`/`e2fsck`
//! with their libraries (`e2fsprogs`), cached in the target dir.
//!
//! Its `/init` (`init.sh`) formats the virtio disk as ext4 on first boot, else mounts
//! it (replaying the journal after a crash), unmounts and runs `e2fsck -fn`; then it
//! checks every file it wrote before, writes `sr.files=N` more (0: until power-off),
//! each followed by `sync`, and powers off when the ACPI power button is pressed (QMP
//! `system_powerdown`): the kernel's `button` driver reports it on an evdev device,
//! which `/init` watches — no acpid needed. Reports are `SR-...` lines on the serial
//! console, which the hook writes to `serial.log` in the VM folder ([`Serial`]).

mod cpio;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use crate::proc::{bin, bin_dir};
use crate::wait::wait_until;

const INIT: &str = include_str!("init.sh");
/// Modules in `insmod` order (the cloud kernel has ext4 built in, virtio as modules).
const MODULES: &[&str] = &[
    "drivers/virtio/virtio_ring",
    "drivers/virtio/virtio",
    "drivers/virtio/virtio_pci_modern_dev",
    "drivers/virtio/virtio_pci_legacy_dev",
    "drivers/virtio/virtio_pci",
    "drivers/block/virtio_blk",
    "drivers/acpi/button",
    "drivers/input/evdev",
];

/// The kernel and the initramfs of the test guest.
#[derive(Debug, Clone)]
pub struct Guest {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

fn newest_cloud_kernel() -> (PathBuf, String) {
    let mut found: Vec<String> = std::fs::read_dir("/boot")
        .map(|d| d.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
        .unwrap_or_default();
    found.retain(|n| n.starts_with("vmlinuz-") && n.ends_with("-cloud-amd64"));
    found.sort();
    let name = found.pop().expect("no /boot/vmlinuz-*-cloud-amd64: install linux-image-cloud-amd64 (.ci/test does)");
    let version = name.trim_start_matches("vmlinuz-").to_owned();
    (Path::new("/boot").join(name), version)
}

/// The shared libraries `ldd` lists for `exe` (absolute paths).
fn libraries(exe: &str) -> Vec<String> {
    let out = std::process::Command::new("ldd").arg(exe).output().expect("ldd");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with('/')).map(str::to_owned))
        .collect()
}

impl Guest {
    /// Builds the initramfs once per test process (reused across processes while the
    /// inputs are the same: its name carries a hash of them).
    pub fn get() -> &'static Guest {
        static G: OnceLock<Guest> = OnceLock::new();
        G.get_or_init(Self::build)
    }

    fn build() -> Guest {
        let (kernel, version) = newest_cloud_kernel();
        let busybox = "/bin/busybox";
        assert!(Path::new(busybox).is_file(), "no {busybox}: install busybox-static (.ci/test does)");
        let mut files: BTreeMap<String, (u32, Vec<u8>)> = BTreeMap::new();
        let read = |p: &str| std::fs::read(p).unwrap_or_else(|e| panic!("{p}: {e}"));
        files.insert("init".into(), (0o755, INIT.as_bytes().to_vec()));
        files.insert("bin/busybox".into(), (0o755, read(busybox)));
        for tool in ["/usr/sbin/mke2fs", "/usr/sbin/e2fsck"] {
            files.insert(tool[1..].into(), (0o755, read(tool)));
            for lib in libraries(tool) {
                files.insert(lib[1..].into(), (0o755, read(&lib)));
            }
        }
        if Path::new("/etc/mke2fs.conf").is_file() {
            files.insert("etc/mke2fs.conf".into(), (0o644, read("/etc/mke2fs.conf")));
        }
        for m in MODULES {
            let p = format!("/lib/modules/{version}/kernel/{m}.ko");
            let short = m.rsplit('/').next().unwrap_or(m);
            files.insert(format!("lib/modules/{short}.ko"), (0o644, read(&p)));
        }
        let archive = cpio::newc(&files);
        let hash = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            archive.hash(&mut h);
            h.finish()
        };
        let dir = bin_dir().join("guest");
        std::fs::create_dir_all(&dir).expect("guest dir");
        let initrd = dir.join(format!("initramfs-{hash:016x}.cpio"));
        if !initrd.is_file() {
            let tmp = dir.join(format!(".initramfs-{}.tmp", std::process::id()));
            std::fs::write(&tmp, &archive).expect("write initramfs");
            std::fs::rename(&tmp, &initrd).expect("rename initramfs");
        }
        Guest { kernel, initrd }
    }

    /// The `--on-vm-start` command: the hook boots this guest (TCG) writing `files`
    /// files (0: until power-off).
    pub fn on_start(&self, files: u32) -> String {
        format!(
            "{} start --accel tcg --kernel {} --initrd {} --append 'console=ttyS0 panic=-1 quiet sr.files={files}' --qemu-arg=-no-reboot",
            bin("siterecovery-qemu-hook").display(),
            self.kernel.display(),
            self.initrd.display(),
        )
    }

    /// The `--on-vm-stop` command, with a `grace` period in seconds.
    pub fn on_stop(grace: u64) -> String {
        format!("{} stop --grace {grace}", bin("siterecovery-qemu-hook").display())
    }
}

/// The guest's serial console (`serial.log` in a VM folder): its `SR-` lines.
#[derive(Debug, Clone)]
pub struct Serial {
    pub path: PathBuf,
}

impl Serial {
    pub fn of(vm_folder: &Path) -> Serial {
        Serial { path: vm_folder.join("serial.log") }
    }

    pub fn text(&self) -> String {
        std::fs::read(&self.path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    /// The `SR-` reports, without the prefix (`FILE b1-3 ok`, `SYNCED b1-4`, ...).
    pub fn reports(&self) -> Vec<String> {
        self.text()
            .lines()
            .filter_map(|l| l.trim_end_matches('\r').split_once("SR-").map(|(_, r)| r.to_owned()))
            .collect()
    }

    /// Waits for a report starting with `prefix`; returns it.
    #[track_caller]
    pub fn wait_for(&self, prefix: &str, timeout: Duration) -> String {
        let mut found = None;
        let ok = wait_until(timeout, || {
            found = self.reports().into_iter().find(|r| r.starts_with(prefix));
            found.is_some()
        });
        assert!(
            ok,
            "the guest did not report {prefix:?} within {timeout:?}; its console {}:\n{}",
            self.path.display(),
            tail(&self.text())
        );
        found.unwrap_or_default()
    }

    /// Names of the files the guest reported synced.
    pub fn synced(&self) -> Vec<String> {
        self.reports().iter().filter_map(|r| r.strip_prefix("SYNCED ").map(str::to_owned)).collect()
    }

    /// The file checks of the last boot: name → ok.
    pub fn checked(&self) -> BTreeMap<String, bool> {
        let reports = self.reports();
        let start = reports.iter().rposition(|r| r.starts_with("BOOT ")).unwrap_or(0);
        reports[start..]
            .iter()
            .filter_map(|r| r.strip_prefix("FILE "))
            .filter_map(|r| r.split_once(' ').map(|(n, s)| (n.to_owned(), s == "ok")))
            .collect()
    }
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// The pid of the QEMU a VM folder's pid file names, if it runs and is that VM's (its
/// command line names the folder's QMP socket).
pub fn qemu_pid(vm_folder: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(vm_folder.join("qemu.pid")).ok()?.trim().parse().ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    if stat.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().next()) == Some("Z") {
        return None;
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let qmp = vm_folder.join("qmp.sock");
    String::from_utf8_lossy(&cmdline).contains(&*qmp.to_string_lossy()).then_some(pid)
}

/// SIGKILLs the QEMU of a VM folder (a host crash), and waits until it is gone.
pub fn kill_qemu(vm_folder: &Path) {
    if let Some(pid) = qemu_pid(vm_folder) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        assert!(wait_until(Duration::from_secs(10), || qemu_pid(vm_folder).is_none()), "QEMU {pid} survived SIGKILL");
    }
}

/// Kills, when dropped, the QEMU the hook started in each folder (a test that panics
/// leaves no guest behind). Declare it after the `World`, so it drops first.
#[derive(Debug, Default)]
pub struct QemuReaper {
    pub folders: Vec<PathBuf>,
}

impl QemuReaper {
    pub fn new(folders: &[PathBuf]) -> Self {
        Self { folders: folders.to_vec() }
    }
}

impl Drop for QemuReaper {
    fn drop(&mut self) {
        for f in &self.folders {
            if let Some(pid) = qemu_pid(f) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
}

/// `e2fsck -fn` of a raw image file on the host: (exit code, output).
pub fn e2fsck(image: &Path) -> (i32, String) {
    let o = std::process::Command::new("/usr/sbin/e2fsck").args(["-fn"]).arg(image).output().expect("run e2fsck");
    (
        o.status.code().unwrap_or(-1),
        format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)),
    )
}
