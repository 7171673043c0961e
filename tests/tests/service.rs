//! Issue 11, points 2 and 5 with the real binaries: `Type=notify` (READY=1 once the
//! provider listens and once the agent's control channel to the provider is up,
//! STOPPING=1 at SIGTERM; received on a real unix datagram socket as `NOTIFY_SOCKET`)
//! and `grpc.health.v1.Health` asked by the real grpcurl (SERVING, and NOT_SERVING
//! during the `--drain` after SIGTERM, the listener still up).
//!
//! Run: `cargo build --workspace --bins && cargo test -p siterecovery-tests --test service`.

use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use siterecovery_tests::*;

const READY: Duration = Duration::from_secs(20);

fn start_provider(lab: &Lab, notify: &NotifySocket, extra: &[&str]) -> Proc {
    let mut cmd = Command::new(bin("provider"));
    cmd.args(["serve", "--data-dir"]).arg(&lab.provider_dir).args(["--listen", &lab.addr()]).args(extra);
    cmd.env("NOTIFY_SOCKET", &notify.path);
    lab.spawn("provider", &mut cmd)
}

fn start_agent(lab: &Lab, name: &str, notify: &NotifySocket, extra: &[&str]) -> Proc {
    let slot = lab.host_slot(name);
    let nbd = format!("127.0.0.1:{}", slot.nbd_port);
    let mut cmd = Command::new(bin("agent"));
    cmd.arg("--data-dir").arg(&slot.dir);
    cmd.args(["serve", "--heartbeat", HEARTBEAT, "--nbd-listen", &nbd, "--nbd-insecure-tcp"]).args(extra);
    cmd.env("NOTIFY_SOCKET", &notify.path);
    lab.spawn(&format!("agent-{name}"), &mut cmd)
}

/// SIGTERM, then: health NOT_SERVING while the process is still up (the drain), and
/// STOPPING=1 sent; the process then exits 0.
fn assert_drains(lab: &Lab, p: &mut Proc, notify: &mut NotifySocket, tls: &[String], addr: &str) {
    p.signal(Signal::SIGTERM);
    let mut seen = None;
    let drained = wait_until(Duration::from_secs(10), || {
        let h = lab.health(tls, addr);
        let up = p.is_running();
        seen = Some(format!("{h:?} (running: {up})"));
        up && h.as_deref() == Ok("NOT_SERVING")
    });
    assert!(drained, "no NOT_SERVING from a draining listener; last answer {seen:?}");
    assert!(notify.wait_line("STOPPING=1", Duration::from_secs(5)), "no STOPPING=1: {:?}", notify.received);
    let status = p.wait_exit(Duration::from_secs(15)).expect("exit after the drain");
    assert!(status.success(), "exit after the drain: {status}");
}

#[test]
fn provider_is_ready_once_listening_and_drains_not_serving() {
    let lab = Lab::new("provider_notify_health");
    lab.create_vault();
    let mut notify = NotifySocket::bind(&lab.root.join("notify-provider"));
    let mut p = start_provider(&lab, &notify, &["--drain", "3s"]);
    assert!(notify.wait_line("READY=1", READY), "no READY=1 from the provider: {:?}", notify.received);
    assert!(notify.received.iter().any(|m| m.contains("STATUS=serving vault")), "{:?}", notify.received);
    lab.operator_cert();
    // A monitor with only the vault's CA (no client certificate) gets the health...
    let ca_only = tls_args(&lab.opdir.join("ca.pem"), None);
    assert_eq!(lab.health(&ca_only, &lab.addr()), Ok("SERVING".to_owned()));
    // ...and an operator finds the service by reflection.
    let o = lab.grpcurl_with(&lab.op_tls(), &["-d", "{}", &lab.addr(), "grpc.health.v1.Health/Check"]);
    assert_ok(&o, "Health/Check by reflection");
    assert!(stdout(&o).contains("SERVING"), "{}", stdout(&o));
    let o = lab.grpcurl_with(
        &lab.op_tls(),
        &["-d", r#"{"service":"siterecovery.v1.Control"}"#, &lab.addr(), "grpc.health.v1.Health/Check"],
    );
    assert!(stdout(&o).contains("SERVING"), "per-service health: {}", stdout(&o));
    assert_drains(&lab, &mut p, &mut notify, &ca_only, &lab.addr());
}

#[test]
fn agent_is_ready_only_once_its_control_channel_is_up() {
    let lab = Lab::new("agent_notify_health");
    lab.create_vault();
    let mut provider = lab.start_provider();
    lab.operator_cert();
    lab.register_agent("hv1", "primary", "gold-a");
    provider.stop_gracefully();

    // The provider is down: the agent serves its listeners but is not ready.
    let mut notify = NotifySocket::bind(&lab.root.join("notify-hv1"));
    let mut agent = start_agent(&lab, "hv1", &notify, &["--drain", "2s"]);
    let peer = format!("127.0.0.1:{}", lab.host_slot("hv1").listen_port);
    let op = lab.op_tls();
    let listening = wait_until(READY, || lab.health(&op, &peer).is_ok());
    assert!(listening, "the agent's peer listener never answered: {:?}", lab.health(&op, &peer));
    assert_eq!(lab.health(&op, &peer), Ok("NOT_SERVING".to_owned()), "health before the control channel");
    assert!(!notify.wait_line("READY=1", Duration::from_secs(2)), "READY=1 without a provider: {:?}", notify.received);
    // The peer listener is mutual TLS: no health without a certificate of the vault.
    let ca_only = tls_args(&lab.opdir.join("ca.pem"), None);
    assert!(lab.health(&ca_only, &peer).is_err(), "the peer listener answered without a client certificate");

    let _provider = lab.start_provider();
    assert!(notify.wait_line("READY=1", READY), "no READY=1 once the provider is up: {:?}", notify.received);
    lab.wait_host_connected("hv1");
    assert!(notify.received.iter().any(|m| m.contains("control channel to the provider")), "{:?}", notify.received);
    assert_eq!(lab.health(&op, &peer), Ok("SERVING".to_owned()));
    // A host's own certificate works too.
    assert_eq!(lab.health(&lab.host_tls("hv1"), &peer), Ok("SERVING".to_owned()));
    assert_drains(&lab, &mut agent, &mut notify, &op, &peer);
}
