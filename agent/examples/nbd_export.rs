//! Serves one raw image over NBD with the agent's server, untracked (benchmarks, manual
//! tests): `cargo run --release -p siterecovery-agent --example nbd_export -- --socket
//! /tmp/d.sock --export disk0 disk.img`, then `qemu-io -f raw
//! 'nbd+unix:///disk0?socket=/tmp/d.sock'`. Stops on Ctrl-C or SIGTERM.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use siterecovery_agent::disk::RawFile;
use siterecovery_agent::nbd::{Exports, TcpSecurity, serve_tcp, serve_unix};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
struct Args {
    /// Unix socket to listen on (replaced if it exists).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// TCP address to listen on as well, e.g. 127.0.0.1:10809.
    #[arg(long)]
    tcp: Option<String>,
    /// Export name.
    #[arg(long, default_value = "")]
    export: String,
    /// Refuse writes.
    #[arg(long)]
    read_only: bool,
    /// Serve the image through the replication tracker with tracking on (every write
    /// appended to an HRL log beside the image before it is acknowledged), as a
    /// protected VM's disk is.
    #[arg(long)]
    tracked: bool,
    /// The raw image.
    image: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    let args = Args::parse();
    anyhow::ensure!(args.socket.is_some() || args.tcp.is_some(), "give --socket and/or --tcp");
    let dev: Arc<dyn siterecovery_agent::disk::BlockDevice> = if args.tracked {
        let id = siterecovery_agent::hrl::DiskId::new("disk0")?;
        Arc::new(siterecovery_agent::tracker::TrackedDisk::open(&args.image, id, true)?)
    } else {
        Arc::new(RawFile::open(&args.image, args.read_only).with_context(|| format!("open {}", args.image.display()))?)
    };
    let exports = Arc::new(Exports::new());
    exports.add(args.export.clone(), dev)?;
    let shutdown = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(path) = &args.socket {
        let _ = std::fs::remove_file(path);
        let listener = tokio::net::UnixListener::bind(path).with_context(|| format!("bind {}", path.display()))?;
        tasks.spawn(serve_unix(listener, exports.clone(), shutdown.clone()));
    }
    if let Some(addr) = &args.tcp {
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("bind {addr}"))?;
        tasks.spawn(serve_tcp(listener, exports.clone(), TcpSecurity::Insecure, shutdown.clone()));
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    shutdown.cancel();
    while tasks.join_next().await.is_some() {}
    if let Some(path) = &args.socket {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}
