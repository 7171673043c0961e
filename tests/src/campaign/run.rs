//! Running one scenario ([`run_scenario`]) and checking its invariants. A broken
//! invariant panics (the lab then prints every log); the caller reports the seed.

use std::os::unix::process::ExitStatusExt as _;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::commit::crash_after_failover;
use super::plan::{Failover, Fault, Host, Link, NetFault, Plan, Rng};
use super::stream::{BLOCK, BLOCKS, Prefix, StreamWriter, prefix_of};
use crate::cli::EVENT_TIMEOUT;
use crate::lab::Lab;
use crate::output::assert_ok;
use crate::proc::{Proc, free_port};
use crate::proxy::FaultProxy;
use crate::wait::{unix_now_ms, wait_until};
use crate::world::World;

pub(super) const VM: &str = "vm1";
/// How long an armed agent may run before its failpoint counts as not hit.
const FAILPOINT_WINDOW: Duration = Duration::from_secs(5);
/// The sender's log line at the end of a full initial copy.
const INITIAL_COPY_DONE: &str = "initial copy complete";
const RESYNC: &str = "resynchronising:";

/// What a scenario did and saw.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// `Some(true)` when the armed failpoint fired, `Some(false)` when it did not (the
    /// agent was killed with SIGKILL instead), `None` for other faults.
    pub failpoint_hit: Option<bool>,
    /// The same for the change-point or commit failpoint after an unplanned failover.
    pub after_failover_hit: Option<bool>,
    pub acked: u64,
    pub points_checked: usize,
    pub resyncs: usize,
    /// Why the sender resynchronised (distinct reasons).
    pub resync_reasons: Vec<String>,
    pub note: String,
}

pub(super) struct Scenario {
    pub(super) w: World,
    /// In front of hv-b's peer port (the address hv-b registered).
    proxy: FaultProxy,
    /// In front of the provider, for the agents (the vault's provider address).
    proxy_p: FaultProxy,
    b_extra: Vec<String>,
    pub(super) rng: Rng,
}

impl Scenario {
    fn b_extra(&self) -> Vec<&str> {
        self.b_extra.iter().map(String::as_str).collect()
    }

    fn extra(&self, host: Host) -> Vec<&str> {
        if host == Host::B { self.b_extra() } else { Vec::new() }
    }

    fn proc_mut(&mut self, host: Host) -> &mut Proc {
        if host == Host::A { &mut self.w.a } else { &mut self.w.b }
    }

    pub(super) fn restart(&mut self, host: Host) {
        let dir = self.w.dir(host.name());
        let extra = self.extra(host);
        let p = self.w.lab.start_agent_with(host.name(), &dir, &extra);
        *self.proc_mut(host) = p;
        self.w.lab.wait_host_heartbeat_since(host.name(), unix_now_ms());
    }

    /// Starts `host` (stopped) with `name` armed to crash once.
    pub(super) fn start_armed(&mut self, host: Host, name: &str) {
        let dir = self.w.dir(host.name());
        let extra = self.extra(host);
        let p = self.w.lab.start_agent_armed(host.name(), &dir, &format!("{name}=1*return(crash)"), &extra);
        *self.proc_mut(host) = p;
    }

    /// Waits for the armed `host` to crash at `name`: true when it did (exit by SIGABRT
    /// and the "failpoint NAME: crash" line); else the agent is killed with SIGKILL.
    pub(super) fn wait_crash(&mut self, host: Host, name: &str) -> bool {
        let proc = self.proc_mut(host);
        match proc.wait_exit(FAILPOINT_WINDOW) {
            Some(status) => {
                let log = std::fs::read_to_string(&proc.log).unwrap_or_default();
                assert_eq!(
                    status.signal(),
                    Some(6),
                    "{} armed at {name} exited with {status}, not SIGABRT",
                    host.name()
                );
                assert!(log.contains(&format!("failpoint {name}: crash")), "no 'failpoint {name}: crash' in the log");
                true
            }
            None => {
                proc.kill9();
                false
            }
        }
    }

    /// Restarts `host` with `name` armed to fail once with `errno`, and waits (up to
    /// the failpoint window) for it to fire: true when it did. The agent must keep
    /// running through the error.
    fn fail_at(&mut self, host: Host, name: &str, errno: &str) -> bool {
        self.proc_mut(host).stop_gracefully();
        let dir = self.w.dir(host.name());
        let extra = self.extra(host);
        let armed = format!("{name}=1*return({errno})");
        let p = self.w.lab.start_agent_armed(host.name(), &dir, &armed, &extra);
        *self.proc_mut(host) = p;
        self.w.lab.wait_host_heartbeat_since(host.name(), unix_now_ms());
        let line = format!("failpoint {name}: {errno}");
        let log = self.proc_mut(host).log.clone();
        let hit = wait_until(FAILPOINT_WINDOW, || std::fs::read_to_string(&log).is_ok_and(|l| l.contains(&line)));
        assert!(self.proc_mut(host).is_running(), "{} exited after the injected {errno} at {name}", host.name());
        hit
    }

    /// Restarts `host` with `name` armed and waits for the crash ([`Self::wait_crash`]).
    fn crash_at(&mut self, host: Host, name: &str) -> bool {
        self.proc_mut(host).stop_gracefully();
        self.start_armed(host, name);
        self.wait_crash(host, name)
    }
}

/// Runs the scenario of `plan`; panics when an invariant breaks.
pub fn run_scenario(plan: &Plan) -> Outcome {
    let mut out = Outcome::default();
    let lab = Lab::new(&format!("campaign-{}", plan.seed));
    let proxy_p_port = free_port();
    let proxy_p = FaultProxy::start(proxy_p_port, lab.provider_port);
    let slot_b = lab.host_slot("hv-b");
    let real_b = free_port();
    let proxy = FaultProxy::start(slot_b.listen_port, real_b);
    let b_extra = vec!["--peer-listen".to_owned(), format!("127.0.0.1:{real_b}")];
    let b_args: Vec<&str> = b_extra.iter().map(String::as_str).collect();
    let w = World::start_via(lab, &format!("127.0.0.1:{proxy_p_port}"), &[], &b_args);
    w.pair("fast", &[]);
    // 256 MiB: the pending logs of a fault held for seconds (the stream rewrites its
    // 4 MiB region, and every rewrite is logged) stay below the sender's cap of 50% of
    // the disk size, past which it resynchronises instead of shipping the logs.
    w.vm(VM, &["256M"], &[]);
    let mut s = Scenario { w, proxy, proxy_p, b_extra, rng: Rng::new(plan.seed ^ 0x5eed) };

    // A crash in the initial copy is armed before protection starts.
    let initial_crash = matches!(plan.fault, Fault::Failpoint { name, .. } if name.starts_with("initial."));
    if let Fault::Failpoint { host, name } = plan.fault
        && initial_crash
    {
        s.w.lab.qio_ok(&s.w.uris(VM)[0], &["write -P 0x5a 4M 16M"]);
        let hit = start_protect_crashing(&mut s, host, name);
        out.failpoint_hit = Some(hit);
    }
    if initial_crash {
        // Protected already: the copy resumes after the crash.
        s.w.wait_point_after(VM, 0, "first point after the initial copy resumed");
    } else {
        s.w.protect_with_point(VM);
    }
    let uri_a = s.w.uris(VM)[0].clone();
    let writer = StreamWriter::start(uri_a.clone(), plan.per_call, Duration::from_millis(plan.pace_ms));
    assert!(wait_until(Duration::from_secs(30), || writer.acked() >= BLOCKS / 2), "the writer made no progress");

    // The fault.
    let t_fault = unix_now_ms();
    match plan.fault {
        Fault::Failpoint { host, name } if !initial_crash => {
            let hit = s.crash_at(host, name);
            out.failpoint_hit = Some(hit);
            s.restart(host);
        }
        Fault::Failpoint { .. } => {}
        Fault::IoError { host, name, errno } => {
            // The failed write is retried by the writer: (a) below finds it on the
            // primary only once acknowledged, and the stream at one prefix.
            let before = writer.failures();
            let hit = s.fail_at(host, name, errno);
            out.failpoint_hit = Some(hit);
            out.note = format!("{name} {errno}: writer failures {before} -> {}", writer.failures());
        }
        Fault::Kill { host, after_ms } => {
            // A random moment for the kill (the fault's timing, not a synchronisation).
            std::thread::sleep(Duration::from_millis(after_ms));
            s.proc_mut(host).kill9();
            s.restart(host);
        }
        Fault::KillProvider { after_ms } => {
            std::thread::sleep(Duration::from_millis(after_ms));
            s.w.provider.as_mut().expect("provider").kill9();
            s.w.start_provider();
            s.w.lab.wait_host_connected("hv-a");
            s.w.lab.wait_host_connected("hv-b");
        }
        Fault::Net { link, fault, after_ms, hold_ms } => {
            std::thread::sleep(Duration::from_millis(after_ms));
            out.note = net_fault(&s, link, fault, hold_ms);
        }
    }
    // Replication resumes: a point made after the recovery, with writes still flowing.
    let recovered = unix_now_ms();
    s.w.wait_point_after(VM, recovered, "a point after the fault");
    let until = writer.acked() + BLOCKS / 2;
    assert!(wait_until(Duration::from_secs(30), || writer.acked() >= until), "the writer is stuck after the fault");
    let (acked, issued, err) = writer.stop();
    out.acked = acked;
    let stopped = unix_now_ms();
    eprintln!("[campaign] {acked} writes acknowledged, {issued} issued; last writer error: {err:?}");

    // (a) every acknowledged write is on the primary (and it is at one prefix).
    let k_primary = match prefix_of(&image_of(&s.w, &uri_a, "primary"), issued) {
        Prefix::At(k) => k,
        Prefix::Torn(why) => panic!("(a) the primary's image is at no prefix of the write stream: {why}"),
    };
    assert!(k_primary >= acked, "(a) the primary holds {k_primary} writes, {acked} were acknowledged");

    // (b) the points: never applied twice; each at a prefix, in order; the latest at
    // the primary's.
    s.w.wait_point_after(VM, stopped, "a point after the writes stopped");
    let ok = wait_until(EVENT_TIMEOUT, || {
        s.w.points(VM).last().is_some_and(|p| point_prefix(&s.w, p, issued) == Prefix::At(k_primary))
    });
    assert!(ok, "(b) the latest point never reached the primary's prefix {k_primary}");
    let points = s.w.points(VM);
    check_no_duplicate(&points, t_fault);
    let mut chosen: Vec<&Value> = points.iter().filter(|_| s.rng.chance(30)).take(3).collect();
    chosen.extend(points.last());
    let mut last_k = 0;
    for p in &chosen {
        match point_prefix(&s.w, p, issued) {
            Prefix::At(k) => {
                assert!(k >= last_k, "(b) point {} at prefix {k} is older than an earlier point's {last_k}", p["id"]);
                last_k = k;
            }
            Prefix::Torn(why) => panic!("(b) point {} is torn: {why}", p["id"]),
        }
    }
    out.points_checked = chosen.len();

    // (c) no second full copy.
    let log_a = std::fs::read_to_string(&s.w.a.log).unwrap_or_default();
    let copies = log_a.matches(INITIAL_COPY_DONE).count();
    let reasons: Vec<&str> = log_a.lines().filter_map(|l| l.split_once(RESYNC).map(|(_, r)| r.trim())).collect();
    out.resyncs = reasons.len();
    out.resync_reasons = reasons.iter().map(|r| r.to_string()).collect();
    out.resync_reasons.sort();
    out.resync_reasons.dedup();
    assert!(copies <= 1, "(c) the sender made {copies} full initial copies");
    // A network fault loses no log: delta replication resumes where it was acknowledged.
    if matches!(plan.fault, Fault::Net { .. }) {
        assert!(reasons.is_empty(), "(c) the sender resynchronised after a network fault: {reasons:?}");
    }
    if initial_crash && out.failpoint_hit == Some(true) {
        // Resumed from the acknowledged offset, or (a crash after the last chunk's
        // acknowledgement) found already complete at the replica: never sent again.
        assert!(log_a.contains("resuming the initial copy"), "(c) the initial copy was restarted, not resumed");
    }

    // (d) a failover from a retained point yields exactly its image.
    out.after_failover_hit = failover(&mut s, plan, k_primary, issued);
    out
}

/// Arms `name` on `host` (a primary failpoint of the initial copy), runs `protect`, and
/// waits for the crash; the agent is then started unarmed. True when it fired.
fn start_protect_crashing(s: &mut Scenario, host: Host, name: &str) -> bool {
    s.proc_mut(host).stop_gracefully();
    s.start_armed(host, name);
    s.w.lab.wait_host_heartbeat_since(host.name(), unix_now_ms());
    // `protect` without --wait: the crash may come before the job ends.
    assert_ok(&s.w.lab.cli(&["protect", VM]), "protect");
    let hit = s.wait_crash(host, name);
    s.restart(host);
    hit
}

/// Applies `fault` to `link` for `hold_ms`, checks what health says, heals.
fn net_fault(s: &Scenario, link: Link, fault: NetFault, hold_ms: u64) -> String {
    let started = Instant::now();
    let proxy = if link == Link::Peer { &s.proxy } else { &s.proxy_p };
    match fault {
        NetFault::Cut => proxy.cut(),
        NetFault::Stall => proxy.stall(),
        NetFault::Throttle(rate) => proxy.throttle(rate),
        NetFault::Reset => proxy.reset(),
    }
    let mut note = format!("{link:?} {fault:?}");
    if matches!(fault, NetFault::Cut | NetFault::Stall) {
        // Health says what is happening while the link is down: on the peer link the
        // sender's retries or the missing points; on the provider link the primary
        // host's lost connection.
        let r = s.w.lab.wait_replication(VM, "a health reason while the link is down", EVENT_TIMEOUT, |r| {
            let reasons = r["health_reasons"].as_array().cloned().unwrap_or_default();
            let said = match link {
                Link::Peer => !reasons.is_empty(),
                Link::Provider => reasons.iter().any(|x| x.as_str().is_some_and(|t| t.contains("not connected"))),
            };
            r["health"] != "Normal" && said
        });
        note = format!("{note}: health {} {}", r["health"], r["health_reasons"]);
        eprintln!("[campaign] while {note}");
    }
    // A reset is over at once; the others are held.
    let hold = Duration::from_millis(if fault == NetFault::Reset { 0 } else { hold_ms });
    if let Some(left) = hold.checked_sub(started.elapsed()) {
        // Holding the fault for its drawn duration.
        std::thread::sleep(left);
    }
    proxy.heal();
    if link == Link::Provider {
        s.w.lab.wait_host_connected("hv-a");
        s.w.lab.wait_host_connected("hv-b");
    }
    let (accepted, refused) = proxy.connections();
    format!("{note}; proxy: {accepted} connections, {refused} refused, {} bytes", proxy.forwarded())
}

/// Points must never be applied twice: sequence numbers strictly increasing, ids unique.
fn check_no_duplicate(points: &[Value], since_ms: i64) {
    let mut seqs: Vec<u64> = points.iter().filter_map(|p| p["seq"].as_u64()).collect();
    let n = seqs.len();
    seqs.dedup();
    assert_eq!(seqs.len(), n, "a point sequence number repeats: {points:?}");
    let mut ids: Vec<&str> = points.iter().filter_map(|p| p["id"].as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), points.len(), "a point id repeats: {points:?}");
    let after = points.iter().filter(|p| p["created_unix_ms"].as_i64().unwrap_or(0) > since_ms).count();
    assert!(after >= 1, "no point after the fault at {since_ms}");
}

/// The first `BLOCKS * BLOCK` bytes behind an NBD URI (copied with `qemu-img dd`).
pub(super) fn image_of(w: &World, uri: &str, tag: &str) -> Vec<u8> {
    let file = w.lab.root.join(format!("{tag}-{}.img", unix_now_ms()));
    let (src, dst) = (format!("if={uri}"), format!("of={}", file.display()));
    let (bs, count) = (format!("bs={BLOCK}"), format!("count={BLOCKS}"));
    let o = w.lab.qemu_img(&["dd", "-f", "raw", "-O", "raw", &src, &dst, &bs, &count]);
    assert_ok(&o, &format!("qemu-img dd {uri}"));
    let bytes = std::fs::read(&file).expect("read the copied image");
    let _ = std::fs::remove_file(&file);
    assert_eq!(bytes.len() as u64, BLOCKS * BLOCK, "qemu-img dd copied {} bytes of {uri}", bytes.len());
    bytes
}

/// The image of point `p` (exported, copied, unexported).
pub(super) fn point_image(w: &World, p: &Value) -> Vec<u8> {
    let id = p["id"].as_str().expect("point id");
    let uris = w.export(VM, id);
    let img = image_of(w, &uris[0], "point");
    assert_ok(&w.lab.cli(&["point", "unexport", VM]), "point unexport");
    img
}

fn point_prefix(w: &World, p: &Value, issued: u64) -> Prefix {
    prefix_of(&point_image(w, p), issued)
}

/// Fails over as drawn and checks the VM starts from exactly the chosen point.
/// After an unplanned failover, crashes the change-point or commit drawn: whether its
/// failpoint fired.
fn failover(s: &mut Scenario, plan: &Plan, k_primary: u64, issued: u64) -> Option<bool> {
    let points = s.w.points(VM);
    let chosen = s.rng.pick(&points).clone();
    let id = chosen["id"].as_str().expect("point id").to_owned();
    match plan.failover {
        Failover::None => None,
        Failover::Test => {
            let want = point_image(&s.w, &chosen);
            s.w.wait_job(&["failover", "test", VM, "--point", &id]);
            let got = image_of(&s.w, &s.w.uris(&format!("{VM}-test"))[0], "test-vm");
            assert!(got == want, "(d) the test VM from point {id} differs from the point's image");
            s.w.wait_job(&["failover", "cleanup", VM]);
            None
        }
        Failover::Planned => {
            s.w.wait_job(&["failover", "planned", VM]);
            let uri = s.w.uris(VM)[0].clone();
            assert!(uri.contains(&s.w.dir("hv-b").display().to_string()), "{VM} is not on hv-b: {uri}");
            let got = prefix_of(&image_of(&s.w, &uri, "planned"), issued);
            assert_eq!(got, Prefix::At(k_primary), "(d) the planned failover lost writes");
            None
        }
        Failover::Unplanned => {
            let want = point_image(&s.w, &chosen);
            s.w.a.kill9();
            s.w.lab.wait_host("hv-a", "disconnected", Duration::from_secs(30), |h| h["connected"] == false);
            s.w.wait_job(&["failover", "unplanned", VM, "--point", &id]);
            let got = image_of(&s.w, &s.w.uris(VM)[0], "unplanned");
            assert!(got == want, "(d) the VM failed over from point {id} differs from the point's image");
            plan.after_failover.map(|fp| crash_after_failover(s, fp, &chosen, &points))
        }
    }
}
