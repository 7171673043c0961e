//! The metrics endpoints and a real Prometheus: [`scrape`] (plain HTTP GET, no client
//! crate), [`promtool_check`] (`promtool check metrics`), and [`Prometheus`], a server
//! started on loopback with a generated config and its own data dir, stopped by PID.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::lab::Lab;
use crate::proc::{Proc, free_port};
use crate::wait::wait_until;

/// `GET /metrics` on `127.0.0.1:port` (text format 0.0.4); `None` unless it answers 200.
pub fn scrape(port: u16) -> Option<String> {
    http_get(port, "/metrics").filter(|(status, _)| *status == 200).map(|(_, body)| body)
}

/// `GET /metrics` asking for OpenMetrics, as Prometheus does.
pub fn scrape_openmetrics(port: u16) -> Option<String> {
    http_get_with(port, "/metrics", "Accept: application/openmetrics-text;version=1.0.0\r\n")
        .filter(|(status, _)| *status == 200)
        .map(|(_, body)| body)
}

/// One GET on loopback: the status code and the body.
pub fn http_get(port: u16, target: &str) -> Option<(u16, String)> {
    http_get_with(port, target, "")
}

fn http_get_with(port: u16, target: &str, headers: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    // HTTP/1.0: Prometheus answers without chunked encoding.
    write!(s, "GET {target} HTTP/1.0\r\nHost: 127.0.0.1\r\n{headers}Connection: close\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

/// The value of the first sample of `name` whose labels contain every `labels` pair.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (n, rest) = series.split_once('{').unwrap_or((series, ""));
        if n != name || !labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))) {
            return None;
        }
        value.parse().ok()
    })
}

/// `promtool check metrics` of `text`: its exit status and what it printed.
pub fn promtool_check(text: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; .ci/test installs it)");
    child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("write to promtool");
    let o = child.wait_with_output().expect("promtool");
    (o.status.success(), format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
}

/// `promtool` with `args` in `dir`: exit status and output.
pub fn promtool(dir: &Path, args: &[&str]) -> (bool, String) {
    let o = Command::new("promtool").args(args).current_dir(dir).output().expect("promtool");
    (o.status.success(), format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
}

/// Every query of the shipped Grafana dashboard, its variables set to match anything.
pub fn dashboard_queries() -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/grafana/siterecovery.json");
    let d: Value = serde_json::from_str(&std::fs::read_to_string(path).expect("dashboard")).expect("dashboard JSON");
    let mut out = Vec::new();
    for p in d["panels"].as_array().into_iter().flatten() {
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(e) = t["expr"].as_str() {
                out.push(e.replace("$job", ".*").replace("$vm", ".*"));
            }
        }
    }
    out
}

/// The repository's `dist/prometheus` folder.
pub fn rules_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/prometheus")
}

/// A Prometheus server on loopback, scraping `targets` (job name, port) every second
/// and evaluating `rules` (a rule file's text) every second.
pub struct Prometheus {
    pub port: u16,
    pub proc: Proc,
}

impl Prometheus {
    pub fn start(lab: &Lab, targets: &[(&str, u16)], rules: Option<&str>) -> Self {
        let dir = lab.root.join("prometheus");
        std::fs::create_dir_all(dir.join("data")).expect("prometheus dir");
        let mut cfg = String::from("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n");
        if let Some(r) = rules {
            std::fs::write(dir.join("rules.yml"), r).expect("rules");
            cfg.push_str("rule_files:\n  - rules.yml\n");
        }
        cfg.push_str("scrape_configs:\n");
        for (job, port) in targets {
            cfg.push_str(&format!("  - job_name: {job}\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"));
        }
        std::fs::write(dir.join("prometheus.yml"), cfg).expect("prometheus.yml");
        let port = free_port();
        let mut cmd = Command::new("prometheus");
        cmd.arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"));
        let mut proc = lab.spawn("prometheus", &mut cmd);
        let up = wait_until(Duration::from_secs(30), || {
            !proc.is_running() || http_get(port, "/-/ready").is_some_and(|(s, _)| s == 200)
        });
        assert!(up && proc.is_running(), "prometheus did not get ready (log {})", proc.log.display());
        Self { port, proc }
    }

    /// `/api/v1/query` of `expr`: the result vector (empty on any error).
    pub fn query(&self, expr: &str) -> Vec<Value> {
        let Some((200, body)) = self.get_query(expr) else { return Vec::new() };
        let v: Value = serde_json::from_str(&body).unwrap_or_default();
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// The HTTP status and body of `/api/v1/query` of `expr` (400 for a bad expression).
    pub fn get_query(&self, expr: &str) -> Option<(u16, String)> {
        let q: String = expr
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        http_get(self.port, &format!("/api/v1/query?query={q}"))
    }

    /// The value of the first series `expr` returns.
    pub fn value(&self, expr: &str) -> Option<f64> {
        self.query(expr).first()?["value"][1].as_str()?.parse().ok()
    }

    /// Alerts in state `firing`, by name, from `/api/v1/alerts`.
    pub fn firing(&self) -> Vec<Value> {
        let Some((200, body)) = http_get(self.port, "/api/v1/alerts") else { return Vec::new() };
        let v: Value = serde_json::from_str(&body).unwrap_or_default();
        v["data"]["alerts"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|a| a["state"] == "firing")
            .collect()
    }
}
