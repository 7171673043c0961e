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
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = install(json, filter);
}

/// A log filter as `RUST_LOG` and the `log-level` key take it (`info`,
/// `warn,siterecovery_agent=debug`), checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogFilter(String);

impl LogFilter {
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("empty log filter (e.g. info, or warn,siterecovery_agent=debug)".into());
        }
        tracing_subscriber::EnvFilter::builder().parse(s).map_err(|e| format!("{s:?} is not a log filter: {e}"))?;
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn filter(&self) -> tracing_subscriber::EnvFilter {
        // Checked in `parse`.
        tracing_subscriber::EnvFilter::builder().parse_lossy(&self.0)
    }
}

impl std::fmt::Display for LogFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Changes the running process's log filter (`systemctl reload` of the log level).
pub struct LogHandle(tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>);

impl LogHandle {
    pub fn set(&self, filter: &LogFilter) -> Result<(), String> {
        self.0.reload(filter.filter()).map_err(|e| e.to_string())
    }
}

/// A daemon's logging: like [`init_logging`] with `filter` (already resolved against
/// `RUST_LOG` by the settings), changeable later through the handle.
pub fn init_daemon_logging(json: bool, filter: &LogFilter) -> LogHandle {
    install(json, filter.filter())
}

fn install(json: bool, filter: tracing_subscriber::EnvFilter) -> LogHandle {
    use std::io::IsTerminal;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer().with_ansi(std::io::stderr().is_terminal()).with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter);
    if json {
        let _ = registry.with(fmt.json()).try_init();
    } else {
        let _ = registry.with(fmt).try_init();
    }
    LogHandle(handle)
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
