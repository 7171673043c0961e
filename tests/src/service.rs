//! What a service manager and a monitor see of a daemon: a real unix datagram socket
//! standing in for systemd's `$NOTIFY_SOCKET` ([`NotifySocket`]), and the real grpcurl
//! asking `grpc.health.v1.Health/Check` ([`Lab::health`]).

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::lab::Lab;

/// `grpc.health.v1` (from the gRPC repository), for a grpcurl without reflection: the
/// provider's reflection wants a vault certificate, its Health does not.
const HEALTH_PROTO: &str = r#"syntax = "proto3";
package grpc.health.v1;
message HealthCheckRequest { string service = 1; }
message HealthCheckResponse {
  enum ServingStatus { UNKNOWN = 0; SERVING = 1; NOT_SERVING = 2; SERVICE_UNKNOWN = 3; }
  ServingStatus status = 1;
}
service Health {
  rpc Check(HealthCheckRequest) returns (HealthCheckResponse);
  rpc Watch(HealthCheckRequest) returns (stream HealthCheckResponse);
}
"#;

/// A bound unix datagram socket to pass as `NOTIFY_SOCKET`; collects what arrives.
pub struct NotifySocket {
    sock: UnixDatagram,
    pub path: PathBuf,
    /// Every datagram received so far, in order.
    pub received: Vec<String>,
}

impl NotifySocket {
    /// Binds `path`, writable by anyone (a daemon may run as another user).
    pub fn bind(path: &Path) -> Self {
        let _ = std::fs::remove_file(path);
        let sock = UnixDatagram::bind(path).unwrap_or_else(|e| panic!("bind {}: {e}", path.display()));
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777)).expect("chmod notify socket");
        sock.set_read_timeout(Some(Duration::from_millis(100))).expect("read timeout");
        Self { sock, path: path.to_path_buf(), received: Vec::new() }
    }

    /// Receives for at most `timeout` until a datagram has a line `line` (e.g.
    /// `READY=1`); true when one did (now or earlier).
    pub fn wait_line(&mut self, line: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.has_line(line) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            let mut buf = [0u8; 4096];
            if let Ok(n) = self.sock.recv(&mut buf) {
                self.received.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
    }

    /// True when a datagram received so far has the line `line`.
    pub fn has_line(&self, line: &str) -> bool {
        self.received.iter().any(|m| m.lines().any(|l| l == line))
    }
}

impl Lab {
    /// `grpcurl grpc.health.v1.Health/Check` at `addr` with TLS flags `tls` (no client
    /// certificate: `tls_args(ca, None)`); the status name (`SERVING`, `NOT_SERVING`),
    /// or `Err` with grpcurl's exit code and stderr.
    pub fn health(&self, tls: &[String], addr: &str) -> Result<String, String> {
        let proto = self.root.join("health.proto");
        if !proto.exists() {
            std::fs::write(&proto, HEALTH_PROTO).expect("write health.proto");
        }
        let mut args = tls.to_vec();
        args.extend(crate::grpcurl::strings(&[
            "-import-path",
            &self.root.display().to_string(),
            "-proto",
            "health.proto",
        ]));
        args.extend(crate::grpcurl::strings(&["-emit-defaults", "-d", "{}", addr, "grpc.health.v1.Health/Check"]));
        let o = self.grpcurl(&args);
        if !o.status.success() {
            return Err(format!("exit {:?}: {}", o.status.code(), crate::output::stderr(&o)));
        }
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).map_err(|e| format!("{e}"))?;
        Ok(v["status"].as_str().unwrap_or("").to_owned())
    }
}
