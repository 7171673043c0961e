//! The QEMU command line of a VM: a pure function of its `vm.json` and the hook's flags.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::vm::{MachineConfig, VmConfig};

/// `-accel`: `kvm` (the default on a hypervisor) or `tcg` (emulation: tests, no KVM).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl FromStr for Accel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            _ => Err(format!("{s:?} is not an accelerator (kvm or tcg)")),
        }
    }
}

/// How the NICs of one VM network reach the host: `NETWORK=tap:IFNAME`,
/// `NETWORK=bridge:BRIDGE` (QEMU's bridge helper), `*=...` for every network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetMap {
    pub network: String,
    pub backend: NetBackend,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetBackend {
    Tap(String),
    Bridge(String),
}

fn ifname(s: &str) -> Result<String, String> {
    let ok = !s.is_empty() && s.len() <= 15 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok { Ok(s.to_owned()) } else { Err(format!("{s:?} is not an interface name (1-15 of A-Z a-z 0-9 - _ .)")) }
}

impl FromStr for NetMap {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (network, backend) =
            s.split_once('=').ok_or_else(|| format!("{s:?}: want NETWORK=tap:IF or NETWORK=bridge:BR"))?;
        if network.is_empty() || network.contains(',') {
            return Err(format!("{s:?}: bad network name {network:?}"));
        }
        let backend = match backend.split_once(':') {
            Some(("tap", n)) => NetBackend::Tap(ifname(n)?),
            Some(("bridge", n)) => NetBackend::Bridge(ifname(n)?),
            _ => return Err(format!("{s:?}: want tap:IF or bridge:BR after '='")),
        };
        Ok(NetMap { network: network.to_owned(), backend })
    }
}

/// Direct kernel boot for VMs whose config names none (`--kernel` on the hook).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Boot {
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub append: Option<String>,
}

/// Everything `start` needs besides the VM folder.
#[derive(Debug, Clone)]
pub struct Launch {
    pub accel: Accel,
    pub nets: Vec<NetMap>,
    /// `-serial` value; `None`: `file:<folder>/serial.log`.
    pub serial: Option<String>,
    pub default_boot: Boot,
    /// Passed to QEMU as they are, after ours.
    pub extra: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("vm.json: {0}")]
    Machine(String),
    #[error(
        "NIC {index} (network {network:?}) has no --net mapping; give --net {network}=tap:IF, --net {network}=bridge:BR or --net '*=...'"
    )]
    UnmappedNic { index: usize, network: String },
    #[error("{want} NBD URIs for {disks} disks")]
    Uris { want: usize, disks: usize },
    #[error("--initrd and --append need --kernel")]
    BootWithoutKernel,
}

/// QEMU's option syntax doubles a comma inside a value.
fn esc(s: &str) -> String {
    s.replace(',', ",,")
}

fn path_str(p: &Path) -> String {
    esc(&p.to_string_lossy())
}

/// The arguments of `qemu-system-x86_64` (without the program) for `config` in `folder`,
/// its disks at `uris` (one per disk, in order).
pub fn qemu_args(config: &VmConfig, folder: &Path, uris: &[String], l: &Launch) -> Result<Vec<String>, LaunchError> {
    let m: &MachineConfig = &config.machine;
    m.validate().map_err(LaunchError::Machine)?;
    if uris.len() != config.disks.len() {
        return Err(LaunchError::Uris { want: uris.len(), disks: config.disks.len() });
    }
    let mut a: Vec<String> = Vec::new();
    let mut push = |xs: &[&str]| a.extend(xs.iter().map(|x| x.to_string()));
    let accel = match l.accel {
        Accel::Kvm => "kvm",
        Accel::Tcg => "tcg",
    };
    push(&["-name", &format!("guest={},process=siterecovery-{}", esc(&config.name), esc(&config.name))]);
    push(&["-accel", accel, "-m", &format!("{}M", m.memory_bytes >> 20), "-smp", &m.cpus.to_string()]);
    push(&["-nodefaults", "-display", "none", "-daemonize"]);
    push(&["-pidfile", &folder.join(super::PID_FILE).to_string_lossy()]);
    push(&["-qmp", &format!("unix:{},server=on,wait=off", path_str(&folder.join(super::QMP_SOCKET)))]);
    let serial = l.serial.clone().unwrap_or_else(|| format!("file:{}", folder.join(super::SERIAL_LOG).display()));
    push(&["-serial", &serial]);
    for uri in uris {
        push(&["-drive", &format!("file={},format=raw,if=virtio,cache=none", esc(uri))]);
    }
    for (index, nic) in config.nics.iter().enumerate() {
        let map = l
            .nets
            .iter()
            .find(|n| n.network == nic.network)
            .or_else(|| l.nets.iter().find(|n| n.network == "*"))
            .ok_or_else(|| LaunchError::UnmappedNic { index, network: nic.network.clone() })?;
        let netdev = match &map.backend {
            NetBackend::Tap(t) => format!("tap,id=net{index},ifname={t},script=no,downscript=no"),
            NetBackend::Bridge(b) => format!("bridge,id=net{index},br={b}"),
        };
        push(&["-netdev", &netdev, "-device", &format!("virtio-net-pci,netdev=net{index},mac={}", esc(&nic.mac))]);
    }
    let vm_boot = (!m.kernel.is_empty()).then(|| Boot {
        kernel: Some(PathBuf::from(&m.kernel)),
        initrd: (!m.initrd.is_empty()).then(|| PathBuf::from(&m.initrd)),
        append: (!m.append.is_empty()).then(|| m.append.clone()),
    });
    let boot = vm_boot.as_ref().unwrap_or(&l.default_boot);
    match &boot.kernel {
        Some(k) => {
            push(&["-kernel", &k.to_string_lossy()]);
            if let Some(i) = &boot.initrd {
                push(&["-initrd", &i.to_string_lossy()]);
            }
            if let Some(ap) = &boot.append {
                push(&["-append", ap]);
            }
        }
        None if boot.initrd.is_some() || boot.append.is_some() => return Err(LaunchError::BootWithoutKernel),
        None => push(&["-boot", "order=c"]),
    }
    a.extend(l.extra.iter().cloned());
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::{DiskConfig, NicConfig, Power};

    fn vm() -> VmConfig {
        VmConfig {
            name: "vm1".into(),
            created_unix_ms: 0,
            power: Power::Running,
            disks: vec![DiskConfig {
                id: "disk0".into(),
                size_bytes: 1 << 20,
                file: "disk0.img".into(),
                tracking: false,
            }],
            nics: vec![],
            failover: None,
            machine: MachineConfig::default(),
        }
    }

    fn launch() -> Launch {
        Launch { accel: Accel::Kvm, nets: vec![], serial: None, default_boot: Boot::default(), extra: vec![] }
    }

    fn uris() -> Vec<String> {
        vec!["nbd+unix:///vm1-disk0?socket=/d/a,b/nbd.sock".into()]
    }

    fn after<'a>(a: &'a [String], flag: &str) -> Vec<&'a str> {
        a.windows(2).filter(|w| w[0] == flag).map(|w| w[1].as_str()).collect()
    }

    #[test]
    fn defaults_boot_disk0_with_1g_1cpu_and_qmp_in_the_folder() {
        let a = qemu_args(&vm(), Path::new("/d/a,b"), &uris(), &launch()).expect("accepted");
        assert_eq!(after(&a, "-m"), ["1024M"]);
        assert_eq!(after(&a, "-smp"), ["1"]);
        assert_eq!(after(&a, "-accel"), ["kvm"]);
        assert_eq!(
            after(&a, "-drive"),
            ["file=nbd+unix:///vm1-disk0?socket=/d/a,,b/nbd.sock,format=raw,if=virtio,cache=none"]
        );
        assert_eq!(after(&a, "-qmp"), ["unix:/d/a,,b/qmp.sock,server=on,wait=off"]);
        assert_eq!(after(&a, "-pidfile"), ["/d/a,b/qemu.pid"]);
        assert_eq!(after(&a, "-boot"), ["order=c"]);
        assert!(after(&a, "-kernel").is_empty());
    }

    #[test]
    fn vm_kernel_wins_over_the_hook_default_and_memory_cpus_follow_the_config() {
        let mut c = vm();
        c.machine = MachineConfig {
            memory_bytes: 256 << 20,
            cpus: 2,
            kernel: "/k".into(),
            initrd: "/i".into(),
            append: "x=1".into(),
        };
        let mut l = launch();
        l.accel = Accel::Tcg;
        l.default_boot = Boot { kernel: Some("/other".into()), initrd: None, append: None };
        let a = qemu_args(&c, Path::new("/d"), &uris(), &l).expect("accepted");
        assert_eq!((after(&a, "-m"), after(&a, "-smp")), (vec!["256M"], vec!["2"]));
        assert_eq!(
            (after(&a, "-kernel"), after(&a, "-initrd"), after(&a, "-append")),
            (vec!["/k"], vec!["/i"], vec!["x=1"])
        );
        assert_eq!(after(&a, "-accel"), ["tcg"]);
        // The hook's kernel is the default for VMs that name none.
        let a = qemu_args(&vm(), Path::new("/d"), &uris(), &l).expect("accepted");
        assert_eq!(after(&a, "-kernel"), ["/other"]);
    }

    #[test]
    fn nics_need_a_mapping_and_get_their_mac() {
        let mut c = vm();
        c.nics =
            vec![NicConfig { network: "corp".into(), ip: String::new(), dhcp: true, mac: "52:54:00:01:02:03".into() }];
        let err = qemu_args(&c, Path::new("/d"), &uris(), &launch()).expect_err("refused");
        assert!(matches!(err, LaunchError::UnmappedNic { index: 0, .. }), "{err}");
        let mut l = launch();
        l.nets = vec!["*=bridge:br0".parse().expect("accepted")];
        let a = qemu_args(&c, Path::new("/d"), &uris(), &l).expect("accepted");
        assert_eq!(after(&a, "-netdev"), ["bridge,id=net0,br=br0"]);
        assert_eq!(after(&a, "-device"), ["virtio-net-pci,netdev=net0,mac=52:54:00:01:02:03"]);
        l.nets = vec!["corp=tap:tap7".parse().expect("accepted"), "*=bridge:br0".parse().expect("accepted")];
        let a = qemu_args(&c, Path::new("/d"), &uris(), &l).expect("accepted");
        assert_eq!(after(&a, "-netdev"), ["tap,id=net0,ifname=tap7,script=no,downscript=no"]);
    }

    #[test]
    fn bad_values_are_refused() {
        for bad in ["corp", "corp=tap:", "corp=vde:x", "=tap:t", "c=tap:a,b", "c=tap:waytoolonginterface"] {
            assert!(bad.parse::<NetMap>().is_err(), "{bad}");
        }
        assert!("xen".parse::<Accel>().is_err());
        let mut c = vm();
        c.machine.cpus = 0;
        assert!(matches!(qemu_args(&c, Path::new("/d"), &uris(), &launch()), Err(LaunchError::Machine(_))));
        c.machine = MachineConfig { memory_bytes: 1 << 20, ..MachineConfig::default() };
        assert!(matches!(qemu_args(&c, Path::new("/d"), &uris(), &launch()), Err(LaunchError::Machine(_))));
        assert!(matches!(qemu_args(&vm(), Path::new("/d"), &[], &launch()), Err(LaunchError::Uris { .. })));
    }
}
