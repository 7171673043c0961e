//! The process set-up both binaries share (feature `daemon`): logging to stderr, the
//! root cancellation token tripped by SIGTERM or SIGINT, and a `main` that runs one
//! future on a Tokio runtime and exits non-zero with the whole error chain.
//!
//! It lives in `proto` because that is the one crate the provider and the agent both
//! build on besides `certs` (whose job is certificates); behind a feature, so the
//! protocol and model stay free of logging and signal handling for anyone else.

use std::fmt::Display;
use std::future::Future;

use tokio_util::sync::CancellationToken;

/// Logs to stderr (colours only on a terminal), as JSON lines when `json`; `RUST_LOG`
/// overrides the `default` filter (e.g. `info` for daemons, `warn` for commands).
pub fn init_logging(json: bool, default: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

/// Cancels the returned token on SIGTERM or SIGINT. Call it inside the runtime.
pub fn shutdown_on_signals() -> std::io::Result<CancellationToken> {
    use tokio::signal::unix::{SignalKind, signal};
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let t = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
        t.cancel();
    });
    Ok(token)
}

/// Runs `main` on a multi-threaded runtime; on an error prints `error: {e:#}` (with
/// `anyhow`, the whole chain) and exits 1.
pub fn run_main<E: Display>(main: impl Future<Output = Result<(), E>>) {
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(main) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
