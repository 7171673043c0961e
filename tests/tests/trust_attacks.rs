//! Issue 9's attacks that the other trust suites do not replay, with the real binaries:
//! a host's inventory report naming another host's VM (and a VM nobody created), sent
//! by hand through the real grpcurl with that host's own certificate; and an agent
//! pointed at a server that holds a valid certificate of the vault but is not the
//! provider.
//!
//! Run: `cargo build --workspace --bins && cargo test -p siterecovery-tests --test trust_attacks`.

use std::path::Path;
use std::time::Duration;

use serde_json::json;
use siterecovery_tests::*;

const VM: &str = "vm1";
const DEADLINE: Duration = Duration::from_secs(30);

fn log_contains(path: &Path, needle: &str) -> bool {
    std::fs::read_to_string(path).is_ok_and(|s| s.contains(needle))
}

#[test]
fn a_hosts_report_cannot_create_move_or_overwrite_another_hosts_vm() {
    let w = World::unpaired("report_integrity", &[], &[]);
    w.vm(VM, &["16M"], &[]);
    let before = w.show(VM);
    assert_eq!(before["host"], "hv-a", "{before}");
    // hv-b, with its own valid certificate, reports hv-a's VM as its own (another disk
    // size, running) and a VM the provider never placed anywhere.
    let hello = json!({"hello": {"agent_version": "attacker", "listen_address": ""}});
    let report = json!({"inventory": {"free_bytes": 1, "vms": [
        {"name": VM, "disks": [{"id": "disk0", "size_bytes": 4096}], "power_state": "POWER_STATE_RUNNING"},
        {"name": "ghost", "disks": [{"id": "disk0", "size_bytes": 4096}]},
    ]}});
    let mut flags = w.host_tls("hv-b");
    flags.extend(strings(&["-max-time", "10"]));
    let o = w.grpcurl_stream(
        &flags,
        "control.proto",
        &[hello.to_string(), report.to_string()],
        &w.addr(),
        "siterecovery.v1.Control/Session",
    );
    // The messages themselves are valid (nothing for the wire boundary to refuse):
    // the stream was accepted and ended by the client.
    assert!(!String::from_utf8_lossy(&o.stderr).contains("error getting request data"), "{o:?}");
    // The provider says so, once per VM (a positive event: without the rule nothing
    // would be logged and the records would move).
    let log = w.root.join("provider.log");
    for name in [VM, "ghost"] {
        assert!(
            wait_until(DEADLINE, || {
                std::fs::read_to_string(&log).is_ok_and(|s| {
                    s.lines().any(|l| l.contains("reported VM refused") && l.contains(name) && l.contains("hv-b"))
                })
            }),
            "the provider did not log the refusal of hv-b's report of {name}"
        );
    }
    let after = w.show(VM);
    assert_eq!(after["host"], "hv-a", "hv-b's report moved the VM: {after}");
    assert_eq!(
        after["disks"][0]["size_bytes"], before["disks"][0]["size_bytes"],
        "hv-b's report rewrote the VM's disks"
    );
    assert_eq!(after["power_state"], before["power_state"], "hv-b's report changed the VM's power state");
    assert!(w.try_show("ghost").is_none(), "a report created a VM the provider never placed");
    // The real hv-b is unaffected: it connects again and heartbeats.
    let since = unix_now_ms();
    w.wait_host_heartbeat_since("hv-b", since);
    assert_eq!(w.show(VM)["host"], "hv-a");
}

#[test]
fn an_agent_refuses_a_provider_address_that_answers_with_a_host_certificate() {
    let mut w = World::unpaired("provider_role", &[], &[]);
    w.a.stop_gracefully();
    // hv-a's provider address now points at hv-b's peer listener: a server with a
    // valid certificate of the vault, of role host.
    let dir = w.dir("hv-a");
    let cfg_path = dir.join("agent.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).expect("agent.json")).expect("json");
    let b_addr = format!("127.0.0.1:{}", w.lab.host_slot("hv-b").listen_port);
    cfg["provider_address"] = json!(b_addr);
    std::fs::write(&cfg_path, serde_json::to_vec_pretty(&cfg).expect("json")).expect("write agent.json");
    let since = unix_now_ms();
    let mut a = w.lab.start_agent("hv-a");
    let log = w.root.join("agent-hv-a.log");
    assert!(
        wait_until(DEADLINE, || log_contains(&log, "not a provider")),
        "hv-a did not refuse a host certificate in place of the provider's"
    );
    assert!(a.is_running(), "hv-a gave up instead of retrying");
    // hv-a never reached the real provider either: no heartbeat since.
    let host = w.host("hv-a").expect("hv-a");
    assert!(host["last_heartbeat_unix_ms"].as_i64().unwrap_or(0) < since, "{host}");
    w.a = a;
}
