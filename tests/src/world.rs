//! [`World`]: the two-site set-up most end-to-end tests start from. A provider serving
//! with `--test-intervals`, a primary host `hv-a` (site primary, cloud gold-a) and a
//! replica host `hv-b` (site secondary, cloud gold-b), registered, running and
//! connected; usually gold-a paired with gold-b under a 1 s policy.
//!
//! A `World` derefs to its [`Lab`], so `w.show("vm1")` is `w.lab.show("vm1")`.

use std::ops::Deref;
use std::path::PathBuf;

use crate::lab::Lab;
use crate::proc::Proc;

/// The provider's `serve` flags in a world: short policy intervals are allowed.
pub const TEST_INTERVALS: &[&str] = &["--test-intervals"];

/// Provider + hv-a + hv-b. The processes are stopped (by PID) before the lab's
/// directory goes: fields drop in order.
pub struct World {
    pub provider: Option<Proc>,
    pub a: Proc,
    pub b: Proc,
    pub lab: Lab,
}

impl Deref for World {
    type Target = Lab;
    fn deref(&self) -> &Lab {
        &self.lab
    }
}

impl World {
    /// hv-a and hv-b connected, policy `fast` (1 s, 1 h retention), gold-a paired with
    /// gold-b. No VM yet.
    pub fn new(test: &str) -> Self {
        let w = Self::unpaired(test, &[], &[]);
        w.pair("fast", &[]);
        w
    }

    /// hv-a and hv-b (served with the extra `agent serve` flags) registered, running
    /// and connected; no policy, no pairing.
    pub fn unpaired(test: &str, a_extra: &[&str], b_extra: &[&str]) -> Self {
        Self::start(Lab::new(test), a_extra, b_extra)
    }

    /// [`Self::unpaired`] in a lab made beforehand (when the agents' flags name files
    /// in it).
    pub fn start(lab: Lab, a_extra: &[&str], b_extra: &[&str]) -> Self {
        let addr = lab.addr();
        Self::start_via(lab, &addr, a_extra, b_extra)
    }

    /// [`Self::start`] with the vault naming `provider_address` as the provider's
    /// address (what the agents connect to, e.g. a [`crate::proxy::FaultProxy`] in
    /// front of the provider); the provider still listens on [`Lab::addr`], where the
    /// operator CLI connects.
    pub fn start_via(lab: Lab, provider_address: &str, a_extra: &[&str], b_extra: &[&str]) -> Self {
        let o = lab.create_vault_at(&lab.provider_dir, provider_address, &lab.vault_key, &[]);
        crate::output::assert_ok(&o, "vault create");
        let provider = lab.start_provider_with(TEST_INTERVALS);
        lab.operator_cert();
        lab.register_agent("hv-a", "primary", "gold-a");
        lab.register_agent("hv-b", "secondary", "gold-b");
        let a = lab.start_agent_with("hv-a", &lab.host_slot("hv-a").dir, a_extra);
        let b = lab.start_agent_with("hv-b", &lab.host_slot("hv-b").dir, b_extra);
        lab.wait_host_connected("hv-a");
        lab.wait_host_connected("hv-b");
        Self { provider: Some(provider), a, b, lab }
    }

    /// `policy create --name NAME --interval 1s --retention 1h EXTRA`, then gold-a
    /// paired with gold-b under it.
    pub fn pair(&self, policy: &str, extra: &[&str]) {
        self.pair_every(policy, "1s", extra);
    }

    /// [`Self::pair`] with another interval (the retention stays 1 h).
    pub fn pair_every(&self, policy: &str, interval: &str, extra: &[&str]) {
        let mut args = vec!["policy", "create", "--name", policy, "--interval", interval, "--retention", "1h"];
        args.extend_from_slice(extra);
        self.lab.cli_json(&args);
        self.lab.cli_json(&["cloud", "pair", "--source", "gold-a", "--target", "gold-b", "--policy", policy]);
    }

    /// `vm create --host hv-a --name NAME --disk D... --nic N...`.
    pub fn vm(&self, name: &str, disks: &[&str], nics: &[&str]) {
        let mut args = vec!["vm", "create", "--host", "hv-a", "--name", name];
        for d in disks {
            args.extend(["--disk", d]);
        }
        for n in nics {
            args.extend(["--nic", n]);
        }
        self.lab.cli_json(&args);
    }

    /// Data dir of `host`.
    pub fn dir(&self, host: &str) -> PathBuf {
        self.lab.host_slot(host).dir
    }

    /// `host`'s folder of its VM `vm`.
    pub fn vm_dir(&self, host: &str, vm: &str) -> PathBuf {
        self.dir(host).join("vms").join(vm)
    }

    /// `host`'s replica folder of `vm`.
    pub fn replica_dir(&self, host: &str, vm: &str) -> PathBuf {
        self.dir(host).join("replicas").join(vm)
    }

    /// Stops the provider gracefully (SIGTERM, exit 0).
    #[track_caller]
    pub fn stop_provider(&mut self) {
        self.provider.as_mut().expect("the provider runs").stop_gracefully();
    }

    /// Starts the provider again (same data dir and port).
    pub fn start_provider(&mut self) {
        self.provider = Some(self.lab.start_provider_with(TEST_INTERVALS));
    }
}
