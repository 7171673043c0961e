//! The local admin socket (`<data-dir>/agent.sock`, mode 0600): commands an operator on
//! the host runs without the provider — the seeds' way to bring a VM (the management
//! server's own VM, say) up at the secondary site when the provider is down.
//!
//! One JSON request line, one JSON answer line:
//! `{"op":"failover","vm":"V","point":"latest"}` →
//! `{"ok":true,"vm":"V","point":"p12","uris":["nbd+unix:///…"]}` or `{"ok":false,"error":"…"}`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use siterecovery_proto::model::{PointSelector, VmName};
use siterecovery_proto::v1;

use crate::control::command::point_selector;
use crate::protection::Protection;

/// Longest request line accepted.
const MAX_LINE: usize = 4096;

pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join("agent.sock")
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Request {
    pub op: String,
    pub vm: String,
    #[serde(default)]
    pub point: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Answer {
    pub ok: bool,
    #[serde(default)]
    pub error: String,
    #[serde(default)]
    pub vm: String,
    #[serde(default)]
    pub point: String,
    #[serde(default)]
    pub uris: Vec<String>,
}

/// Serves the admin socket until `shutdown`.
pub async fn serve(listener: UnixListener, protection: Arc<Protection>, shutdown: CancellationToken) {
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => match a {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!("admin socket accept: {e}");
                    continue;
                }
            },
        };
        let protection = protection.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, &protection).await {
                tracing::warn!("admin request: {e}");
            }
        });
    }
}

async fn handle(stream: UnixStream, protection: &Protection) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    let n = BufReader::new(r).take(MAX_LINE as u64).read_line(&mut line).await?;
    let answer = if n == 0 {
        return Ok(());
    } else {
        match serde_json::from_str::<Request>(&line) {
            Ok(req) if req.op == "failover" => match local_failover(protection, &req).await {
                Ok(vm) => {
                    tracing::warn!(vm = %req.vm, "local failover done on this host (provider not involved)");
                    Answer {
                        ok: true,
                        vm: vm.name.clone(),
                        point: vm.failover.map(|f| f.point_id).unwrap_or_default(),
                        uris: vm.disks.into_iter().map(|d| d.nbd_unix_uri).collect(),
                        ..Default::default()
                    }
                }
                Err(error) => Answer { error, ..Default::default() },
            },
            Ok(req) => Answer { error: format!("unknown op {:?}", req.op), ..Default::default() },
            Err(e) => Answer { error: format!("bad request: {e}"), ..Default::default() },
        }
    };
    let mut out = serde_json::to_vec(&answer).map_err(std::io::Error::other)?;
    out.push(b'\n');
    w.write_all(&out).await
}

/// A local failover request, its VM name and point checked first (the socket is local,
/// but its requests are input from outside the process all the same).
async fn local_failover(protection: &Protection, req: &Request) -> Result<v1::Vm, String> {
    let (vm, point) = failover_target(req)?;
    protection.local_failover(&vm, point).await.map_err(|e| e.to_string())
}

/// The VM and point of a failover request, or why they are refused (naming the field).
fn failover_target(req: &Request) -> Result<(VmName, PointSelector), String> {
    let vm = VmName::new(req.vm.as_str()).map_err(|e| format!("invalid argument: vm: {e}"))?;
    let point = point_selector(&req.point).map_err(|e| format!("invalid argument: point: {e}"))?;
    Ok((vm, point))
}

use tokio::io::AsyncReadExt as _;

/// Sends one request to a running agent.
pub async fn call(data_dir: &Path, req: &Request) -> std::io::Result<Answer> {
    let stream = UnixStream::connect(socket_path(data_dir)).await?;
    let (r, mut w) = stream.into_split();
    let mut line = serde_json::to_vec(req).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line).await?;
    let mut answer = String::new();
    BufReader::new(r).take(1 << 20).read_line(&mut answer).await?;
    serde_json::from_str(&answer).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use siterecovery_proto::model::{PointId, PointSeq};

    use super::*;

    fn req(vm: &str, point: &str) -> Request {
        Request { op: "failover".into(), vm: vm.into(), point: point.into() }
    }

    #[test]
    fn a_failover_request_names_a_valid_vm_and_point() {
        let p3 = PointSelector::Id(PointId::from_seq(PointSeq(3)));
        assert_eq!(failover_target(&req("vm1", "")), Ok(("vm1".parse().expect("vm"), PointSelector::Latest)));
        assert_eq!(failover_target(&req("vm1", "p3")).map(|t| t.1), Ok(p3));
        assert_eq!(failover_target(&req("vm1", "3")).map(|t| t.1), Ok(p3), "a bare sequence number");
        for bad in ["", "../etc", "a/b", ".", "-x", &"v".repeat(64)] {
            let e = failover_target(&req(bad, "latest")).expect_err(bad);
            assert!(e.starts_with("invalid argument: vm:"), "{bad:?}: {e}");
        }
        for bad in ["p03", "../p1", "newest"] {
            let e = failover_target(&req("vm1", bad)).expect_err(bad);
            assert!(e.starts_with("invalid argument: point:"), "{bad:?}: {e}");
        }
    }
}
