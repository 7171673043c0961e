//! The `/metrics` endpoint both daemons serve (feature `daemon`): `--metrics-listen`
//! parsed into [`MetricsListen`], and a minimal HTTP/1.1 responder for Prometheus.
//!
//! Why not hyper: it is in the tree through tonic, but only its HTTP/2 server; a
//! scraper sends one `GET /metrics` every few seconds, which a bounded reader of one
//! request per connection (`Connection: close`) answers in a few dozen lines without
//! another feature of hyper compiled into both binaries.
//!
//! The metrics are rendered by the caller (with `prometheus-client`, in OpenMetrics
//! text). A client that asks for OpenMetrics (`Accept: application/openmetrics-text`,
//! as Prometheus does) gets it as rendered; any other (curl, `promtool check metrics`)
//! gets the classic text format 0.0.4 ([`to_text_format`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Where `--metrics-listen` serves: an address, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsListen {
    Off,
    Addr(SocketAddr),
}

/// `--metrics-listen` was neither `off` nor an `IP:PORT`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("metrics listen address {0:?}: expected IP:PORT (e.g. 127.0.0.1:9464) or off")]
pub struct InvalidMetricsListen(pub String);

impl std::str::FromStr for MetricsListen {
    type Err = InvalidMetricsListen;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("off") {
            return Ok(Self::Off);
        }
        s.parse::<SocketAddr>().map(Self::Addr).map_err(|_| InvalidMetricsListen(s.to_owned()))
    }
}

impl std::fmt::Display for MetricsListen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Off => f.write_str("off"),
            Self::Addr(a) => write!(f, "{a}"),
        }
    }
}

/// Renders the metrics (OpenMetrics text) at each scrape; called on a blocking thread.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Largest request head read; a longer one is answered 431 and closed.
const MAX_HEAD: usize = 8 * 1024;
/// Time a client has to send its request head and read the answer.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Scrapes answered at once; more connections wait in the accept queue.
const MAX_CONCURRENT: usize = 8;

/// `--metrics-listen` as given, or the daemon's default when it was not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsConfig {
    pub listen: MetricsListen,
    /// Given by the operator: failing to bind it fails the start. The default address
    /// in use (a second daemon on the host, a lab) only turns the metrics off, warned.
    pub explicit: bool,
}

impl MetricsConfig {
    pub fn new(flag: Option<MetricsListen>, default: SocketAddr) -> Self {
        match flag {
            Some(listen) => Self { listen, explicit: true },
            None => Self { listen: MetricsListen::Addr(default), explicit: false },
        }
    }

    /// No metrics endpoint (library callers, tests).
    pub const OFF: Self = Self { listen: MetricsListen::Off, explicit: true };
}

/// Binds the metrics address (nothing for `off`); the error names the address.
pub async fn bind(cfg: MetricsConfig) -> std::io::Result<Option<TcpListener>> {
    let MetricsListen::Addr(a) = cfg.listen else { return Ok(None) };
    match TcpListener::bind(a).await {
        Ok(l) => Ok(Some(l)),
        Err(e) if !cfg.explicit && e.kind() == std::io::ErrorKind::AddrInUse => {
            tracing::warn!("metrics off: the default address {a} is in use (choose one with --metrics-listen, or off)");
            Ok(None)
        }
        Err(e) => {
            Err(std::io::Error::new(e.kind(), format!("cannot listen on {a} for metrics (--metrics-listen): {e}")))
        }
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, render: Render, shutdown: CancellationToken) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT));
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => return,
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
        };
        let conn = tokio::select! {
            _ = shutdown.cancelled() => return,
            c = listener.accept() => c,
        };
        let stream = match conn {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!("metrics: accept: {e}");
                continue;
            }
        };
        let render = render.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = tokio::time::timeout(TIMEOUT, answer(stream, render)).await.unwrap_or(Ok(())) {
                tracing::debug!("metrics: {e}");
            }
        });
    }
}

/// Reads one request head and answers it.
async fn answer(mut stream: TcpStream, render: Render) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() >= MAX_HEAD {
            return respond(&mut stream, "431 Request Header Fields Too Large", "text/plain", b"too large\n").await;
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head);
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or_default().split(' ');
    let (method, target) = (first.next().unwrap_or_default(), first.next().unwrap_or_default());
    let openmetrics = lines.any(|l| {
        l.split_once(':')
            .is_some_and(|(k, v)| k.trim().eq_ignore_ascii_case("accept") && v.contains("application/openmetrics-text"))
    });
    let path = target.split('?').next().unwrap_or_default();
    if method != "GET" && method != "HEAD" {
        return respond(&mut stream, "405 Method Not Allowed", "text/plain", b"GET /metrics\n").await;
    }
    if path != "/metrics" {
        return respond(&mut stream, "404 Not Found", "text/plain", b"see /metrics\n").await;
    }
    let text = tokio::task::spawn_blocking(move || render()).await.unwrap_or_default();
    let (ctype, body) = if openmetrics {
        ("application/openmetrics-text; version=1.0.0; charset=utf-8", text)
    } else {
        ("text/plain; version=0.0.4; charset=utf-8", to_text_format(&text))
    };
    let body = if method == "HEAD" { &b""[..] } else { body.as_bytes() };
    respond(&mut stream, "200 OK", ctype, body).await
}

async fn respond(stream: &mut TcpStream, status: &str, ctype: &str, body: &[u8]) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    stream.shutdown().await
}

/// OpenMetrics text (as `prometheus-client` writes it) in the classic Prometheus text
/// format 0.0.4: a counter family is named with its `_total` suffix, and the `# UNIT`
/// and `# EOF` lines (unknown there) are dropped.
pub fn to_text_format(om: &str) -> String {
    let counters: std::collections::HashSet<&str> = om
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .filter(|n| !n.ends_with("_total"))
        .collect();
    let mut out = String::with_capacity(om.len() + 64);
    for line in om.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            counters.contains(name).then(|| format!("{p}{name}_total {tail}"))
        });
        match renamed {
            Some(l) => out.push_str(l.trim_end()),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_is_an_address_or_off() {
        assert_eq!("off".parse::<MetricsListen>(), Ok(MetricsListen::Off));
        assert_eq!("127.0.0.1:9464".parse::<MetricsListen>().map(|l| l.to_string()), Ok("127.0.0.1:9464".into()));
        assert!("localhost:9464".parse::<MetricsListen>().is_err());
        assert!("9464".parse::<MetricsListen>().is_err());
        assert!("".parse::<MetricsListen>().is_err());
    }

    #[test]
    fn counters_take_their_total_suffix_and_unit_lines_go() {
        let om = "# HELP a_bytes Bytes.\n# TYPE a_bytes counter\n# UNIT a_bytes bytes\na_bytes_total{x=\"1\"} 3\n\
                  # HELP g Gauge.\n# TYPE g gauge\ng 1\n# EOF\n";
        let t = to_text_format(om);
        assert_eq!(
            t,
            "# HELP a_bytes_total Bytes.\n# TYPE a_bytes_total counter\na_bytes_total{x=\"1\"} 3\n\
             # HELP g Gauge.\n# TYPE g gauge\ng 1\n"
        );
    }

    #[tokio::test]
    async fn a_taken_default_port_turns_metrics_off_but_a_given_one_fails() {
        let taken = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = taken.local_addr().expect("addr");
        assert!(bind(MetricsConfig::new(None, addr)).await.expect("default in use: off").is_none());
        let e = bind(MetricsConfig::new(Some(MetricsListen::Addr(addr)), addr)).await.expect_err("given in use");
        assert!(e.to_string().contains(&addr.to_string()), "{e}");
        assert!(bind(MetricsConfig::OFF).await.expect("off").is_none());
    }

    #[tokio::test]
    async fn serves_metrics_and_refuses_other_paths() {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let stop = CancellationToken::new();
        let render: Render = Arc::new(|| "# HELP g G.\n# TYPE g gauge\ng 1\n# EOF\n".to_owned());
        let task = tokio::spawn(serve(l, render, stop.clone()));
        async fn get(addr: SocketAddr, req: &str) -> String {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            s.write_all(req.as_bytes()).await.expect("write");
            let mut out = String::new();
            s.read_to_string(&mut out).await.expect("read");
            out
        }
        let plain = get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(plain.starts_with("HTTP/1.1 200 OK\r\n"), "{plain}");
        assert!(plain.contains("version=0.0.4") && plain.ends_with("g 1\n"), "{plain}");
        let om = get(addr, "GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text;version=1.0.0\r\n\r\n").await;
        assert!(om.contains("openmetrics-text") && om.ends_with("# EOF\n"), "{om}");
        assert!(get(addr, "GET / HTTP/1.1\r\n\r\n").await.starts_with("HTTP/1.1 404"));
        assert!(get(addr, "POST /metrics HTTP/1.1\r\n\r\n").await.starts_with("HTTP/1.1 405"));
        stop.cancel();
        task.await.expect("server task");
    }
}
