//! Prometheus metrics end to end: both services' `/metrics` pass `promtool check
//! metrics`; the shipped alert rules pass `promtool check rules` and their unit tests;
//! a real Prometheus scrapes a provider and two agents, its query API returns a
//! replicating VM's RPO lag and bytes replicated, and stopping the replica host
//! fires the host-disconnected and RPO alerts (the shipped rules, with short `for:`).
//!
//! Run: `cargo build --workspace --bins && cargo test -p siterecovery-tests --test metrics`.

use std::time::Duration;

use siterecovery_tests::metrics::{
    Prometheus, dashboard_queries, http_get, promtool, promtool_check, rules_dir, sample, scrape, scrape_openmetrics,
};
use siterecovery_tests::*;

const VM: &str = "vm1";

/// A world with `vm1` (one 16 MiB disk) written through NBD and protected, with a point.
fn replicating(test: &str) -> World {
    let w = World::new(test);
    w.vm(VM, &["16M"], &[]);
    let uris = w.uris(VM);
    w.qio_ok(&uris[0], &["write -P 0x5a 0 1M"]);
    w.protect_with_point(VM);
    w
}

#[track_caller]
fn scrape_ok(w: &World, what: &str, port: u16) -> String {
    let text = scrape(port).unwrap_or_else(|| {
        w.dump_logs();
        panic!("{what}: no answer on 127.0.0.1:{port}/metrics")
    });
    let (ok, out) = promtool_check(&text);
    assert!(ok, "promtool check metrics refuses the {what}'s metrics: {out}\n{text}");
    text
}

#[test]
fn both_services_metrics_pass_promtool_and_show_the_replicating_vm() {
    let w = replicating("metrics_promtool");
    let vm = [("vm", VM)];
    // The provider learns a status per cycle: wait until one reports bytes shipped.
    let mut provider = String::new();
    let seen = wait_until(EVENT_TIMEOUT, || {
        provider = scrape(w.provider_metrics_port).unwrap_or_default();
        sample(&provider, "siterecovery_vm_replicated_bytes_total", &vm).is_some_and(|b| b >= 1e6)
    });
    assert!(seen, "the provider's metrics show no bytes replicated for {VM}:\n{provider}");
    let started = std::time::Instant::now();
    let provider = scrape_ok(&w, "provider", w.provider_metrics_port);
    eprintln!("[metrics] provider: {} bytes, scrape and promtool in {:?}", provider.len(), started.elapsed());
    let hv_a = scrape_ok(&w, "agent hv-a", w.host_slot("hv-a").metrics_port);
    let hv_b = scrape_ok(&w, "agent hv-b", w.host_slot("hv-b").metrics_port);

    let p = |name: &str, labels: &[(&str, &str)]| sample(&provider, name, labels);
    assert_eq!(p("siterecovery_vm_replication_state", &[("vm", VM), ("state", "replicating")]), Some(1.0));
    assert_eq!(p("siterecovery_vm_replication_state", &[("vm", VM), ("state", "paused")]), Some(0.0));
    assert_eq!(p("siterecovery_vm_rpo_interval_seconds", &vm), Some(1.0));
    let lag = p("siterecovery_vm_rpo_lag_seconds", &vm).expect("RPO lag of vm1");
    assert!((0.0..60.0).contains(&lag), "RPO lag {lag}");
    assert!(p("siterecovery_vm_last_point_timestamp_seconds", &vm).is_some_and(|t| t > unix_now() as f64 - 120.0));
    assert!(p("siterecovery_vm_rpo_breach_predicted_seconds", &vm).is_some());
    assert_eq!(
        [("Normal", 1.0), ("Warning", 0.0), ("Critical", 0.0)]
            .iter()
            .filter_map(|(h, _)| p("siterecovery_vm_health", &[("vm", VM), ("health", h)]))
            .sum::<f64>(),
        1.0,
        "one health is current"
    );
    for host in ["hv-a", "hv-b"] {
        assert_eq!(p("siterecovery_host_connected", &[("host", host)]), Some(1.0), "{host} connected");
        let expiry = p("siterecovery_host_certificate_expiry_timestamp_seconds", &[("host", host)]);
        assert!(expiry.is_some_and(|t| t > unix_now() as f64), "{host}: certificate expiry {expiry:?}");
        let beat = p("siterecovery_host_last_heartbeat_timestamp_seconds", &[("host", host)]);
        assert!(beat.is_some_and(|t| t > unix_now() as f64 - 60.0), "{host}: last heartbeat {beat:?}");
    }
    let enabled = [("kind", "Enable protection"), ("state", "succeeded")];
    assert!(p("siterecovery_jobs", &enabled).is_some_and(|n| n >= 1.0), "jobs:\n{provider}");
    assert!(p("siterecovery_job_duration_seconds_count", &[("kind", "Enable protection")]).is_some_and(|n| n >= 1.0));

    // hv-a: its sender and the NBD writes of the test.
    let a = |name: &str, labels: &[(&str, &str)]| sample(&hv_a, name, labels);
    assert_eq!(a("siterecovery_sender_state", &[("vm", VM), ("state", "REPLICATING")]), Some(1.0), "{hv_a}");
    assert!(a("siterecovery_sender_replicated_bytes_total", &vm).is_some_and(|b| b >= 1e6));
    let export = [("export", "vm1-disk0"), ("op", "write")];
    assert!(a("siterecovery_nbd_operations_total", &export).is_some_and(|n| n >= 1.0), "{hv_a}");
    assert!(a("siterecovery_nbd_bytes_total", &export).is_some_and(|n| n >= 1048576.0), "{hv_a}");
    let le_inf = [("export", "vm1-disk0"), ("op", "write"), ("le", "+Inf")];
    assert_eq!(
        a("siterecovery_nbd_operation_duration_seconds_bucket", &le_inf),
        a("siterecovery_nbd_operations_total", &export)
    );
    let disk = [("vm", VM), ("disk", "disk0")];
    assert!(a("siterecovery_disk_pending_log_bytes", &disk).is_some(), "{hv_a}");
    assert_eq!(a("siterecovery_disk_on_bitmap", &disk), Some(0.0));
    // hv-b replicates nothing of its own.
    assert!(sample(&hv_b, "siterecovery_sender_state", &vm).is_none(), "{hv_b}");
    // Anything but GET /metrics is refused.
    assert_eq!(http_get(w.provider_metrics_port, "/").map(|(s, _)| s), Some(404));
}

#[test]
fn shipped_alert_rules_pass_promtool_check_and_their_unit_tests() {
    let dir = rules_dir();
    let (ok, out) = promtool(&dir, &["check", "rules", "alerts.yml"]);
    assert!(ok && out.contains("SUCCESS: 6 rules found"), "promtool check rules: {out}");
    let (ok, out) = promtool(&dir, &["test", "rules", "alerts_test.yml"]);
    assert!(ok, "promtool test rules: {out}");
}

#[test]
fn prometheus_scrapes_both_services_and_fires_when_the_replica_host_stops() {
    let mut w = replicating("metrics_prometheus");
    // The shipped rules with short `for:` (the test cannot wait 5 minutes).
    let rules = std::fs::read_to_string(rules_dir().join("alerts.yml")).expect("alerts.yml");
    let rules = rules.replace("for: 5m", "for: 2s").replace("for: 1m", "for: 2s");
    assert!(!rules.contains("for: 5m") && !rules.contains("for: 1m"));
    let (a_port, b_port) = (w.host_slot("hv-a").metrics_port, w.host_slot("hv-b").metrics_port);
    let targets = [("provider", w.provider_metrics_port), ("agent-hv-a", a_port), ("agent-hv-b", b_port)];
    let prom = Prometheus::start(&w.lab, &targets, Some(&rules));

    let lag = r#"siterecovery_vm_rpo_lag_seconds{job="provider",vm="vm1"}"#;
    let bytes = r#"siterecovery_vm_replicated_bytes_total{job="provider",vm="vm1"}"#;
    let sent = r#"siterecovery_sender_replicated_bytes_total{job="agent-hv-a",vm="vm1"}"#;
    let up = r#"sum(up{job=~"provider|agent-hv-a|agent-hv-b"})"#;
    let scraped = wait_until(Duration::from_secs(30), || {
        prom.value(up) == Some(3.0)
            && prom.value(lag).is_some()
            && prom.value(bytes).is_some_and(|b| b >= 1e6)
            && prom.value(sent).is_some_and(|b| b >= 1e6)
    });
    if !scraped {
        w.dump_logs();
    }
    assert!(
        scraped,
        "Prometheus: up {:?}, lag {:?}, bytes {:?}, sent {:?}",
        prom.value(up),
        prom.value(lag),
        prom.value(bytes),
        prom.value(sent)
    );
    let om = scrape_openmetrics(w.provider_metrics_port).unwrap_or_default();
    assert!(om.ends_with("# EOF\n") && om.contains("# TYPE siterecovery_vm_replicated_bytes counter"), "{om}");
    let lag_before = prom.value(lag).unwrap_or_default();
    assert!(lag_before < 10.0, "RPO lag {lag_before} s while replicating every second");
    assert!(prom.firing().is_empty(), "alerts while healthy: {:?}", prom.firing());

    w.b.stop_gracefully();
    let names = |p: &Prometheus| -> Vec<String> {
        p.firing().iter().map(|a| a["labels"]["alertname"].as_str().unwrap_or_default().to_owned()).collect()
    };
    let mut firing = Vec::new();
    let fired = wait_until(Duration::from_secs(60), || {
        firing = names(&prom);
        firing.iter().any(|n| n == "SiterecoveryHostDisconnected")
            && firing.iter().any(|n| n == "SiterecoveryRpoWarning")
    });
    assert!(fired, "alerts after stopping hv-b: {firing:?}; lag now {:?}", prom.value(lag));
    assert_eq!(prom.value(r#"siterecovery_host_connected{job="provider",host="hv-b"}"#), Some(0.0));
    assert_eq!(prom.value(r#"siterecovery_host_connected{job="provider",host="hv-a"}"#), Some(1.0));
    let disconnected = prom.firing();
    let host = disconnected.iter().find(|a| a["labels"]["alertname"] == "SiterecoveryHostDisconnected");
    assert_eq!(host.map(|a| a["labels"]["host"].clone()), Some(serde_json::json!("hv-b")));
    assert!(prom.value(lag).is_some_and(|l| l > 2.0), "RPO lag {:?}", prom.value(lag));

    // Every query of the shipped dashboard parses, and most find series.
    let queries = dashboard_queries();
    assert!(queries.len() >= 15, "{queries:?}");
    let mut empty = Vec::new();
    for q in &queries {
        let (status, body) = prom.get_query(q).unwrap_or_default();
        assert_eq!(status, 200, "dashboard query {q}: {body}");
        if prom.query(q).is_empty() {
            empty.push(q.clone());
        }
    }
    assert!(empty.len() * 4 <= queries.len(), "dashboard queries without series: {empty:?}");
}
