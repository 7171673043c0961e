//! The operator's side: connecting to a provider with an operator certificate, and
//! rendering answers as tables or JSON.
//!
//! Errors are turned into sentences an operator can act on (unreachable provider,
//! certificates of another vault, an expired certificate) before they reach `main`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use siterecovery_certs::files;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Failure to reach or talk to the provider.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("no provider address: pass --connect HOST:PORT or set SITERECOVERY_CONNECT")]
    NoAddress,
    #[error("no operator certificates: pass --certs DIR (from `provider operator-cert`) or set SITERECOVERY_CERTS")]
    NoCerts,
    #[error("cannot read operator certificates in {dir}: {reason}")]
    Certs { dir: PathBuf, reason: String },
    #[error("operator certificate {path} is not valid now: {reason}; ask for a new one with `provider operator-cert`")]
    Expired { path: PathBuf, reason: String },
    #[error("cannot reach the provider at {address}: {reason}")]
    Unreachable { address: String, reason: String },
    #[error(
        "the provider at {address} refused the connection's TLS: {reason} (are --certs from this provider's vault?)"
    )]
    Tls { address: String, reason: String },
    #[error("{0}")]
    Rpc(String),
    #[error("job {id} ({kind}) failed: {error}")]
    JobFailed { id: String, kind: String, error: String },
    #[error("lost the stream of job {id} while it ran; follow it again with `job watch {id}`")]
    JobLost { id: String },
    #[error("output: {0}")]
    Output(String),
    #[error("{0}")]
    Usage(String),
}

/// Parses "[scheme://]host:port" into the https URI and the host name for TLS.
fn endpoint_parts(address: &str) -> (String, String) {
    let bare = address.trim_start_matches("https://").trim_start_matches("http://");
    (format!("https://{bare}"), siterecovery_certs::host_of(bare).to_owned())
}

/// Operator credentials from an OPDIR made by `provider operator-cert`.
pub struct OperatorCerts {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl OperatorCerts {
    pub fn load(dir: &Path) -> Result<Self, CliError> {
        let read = |name: &str| {
            files::read_text(&dir.join(name))
                .map_err(|e| CliError::Certs { dir: dir.to_path_buf(), reason: e.to_string() })
        };
        let certs = Self { ca_pem: read("ca.pem")?, cert_pem: read("op.pem")?, key_pem: read("op.key")? };
        siterecovery_certs::ca::check_valid_now("op.pem", &certs.cert_pem)
            .map_err(|e| CliError::Expired { path: dir.join("op.pem"), reason: e.to_string() })?;
        // A certificate of another vault would be refused at the handshake, and with
        // TLS 1.3 that shows only as a broken first call: say it plainly now.
        siterecovery_certs::tls::verify_issued_by(&certs.ca_pem, &certs.cert_pem).map_err(|e| CliError::Certs {
            dir: dir.to_path_buf(),
            reason: format!(
                "op.pem was not issued by the vault CA in ca.pem ({e}); are these certificates of this vault?"
            ),
        })?;
        Ok(certs)
    }
}

/// Connects with mutual TLS; the handshake happens here, so a refusal is reported now.
pub async fn connect(address: &str, certs: &OperatorCerts) -> Result<Channel, CliError> {
    siterecovery_certs::tls::install_crypto_provider();
    let (uri, host) = endpoint_parts(address);
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&certs.ca_pem))
        .identity(Identity::from_pem(&certs.cert_pem, &certs.key_pem))
        .domain_name(host);
    let endpoint = Endpoint::from_shared(uri)
        .map_err(|e| CliError::Unreachable { address: address.into(), reason: e.to_string() })?
        .tls_config(tls)
        .map_err(|e| CliError::Tls { address: address.into(), reason: e.to_string() })?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(180));
    endpoint.connect().await.map_err(|e| classify_transport(address, &e))
}

/// Describes a transport error with its whole source chain, classified.
pub fn classify_transport(address: &str, e: &(dyn std::error::Error + 'static)) -> CliError {
    let mut reason = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        reason = format!("{reason}: {s}");
        src = s.source();
    }
    let lower = reason.to_lowercase();
    if lower.contains("certificate") || lower.contains("tls") || lower.contains("handshake") || lower.contains("alert")
    {
        CliError::Tls { address: address.into(), reason }
    } else {
        CliError::Unreachable { address: address.into(), reason }
    }
}

/// Turns an RPC status into an operator-facing error.
pub fn rpc_error(address: &str, s: tonic::Status) -> CliError {
    use tonic::Code;
    match s.code() {
        Code::Unavailable | Code::Unknown if s.message().contains("transport") || s.message().contains("connect") => {
            classify_transport(address, &s)
        }
        Code::Unauthenticated | Code::PermissionDenied => CliError::Rpc(format!("refused: {}", s.message())),
        Code::Cancelled | Code::Unknown | Code::Unavailable
            if s.message().contains("cancel")
                || s.message().contains("broken pipe")
                || s.message().contains("reset") =>
        {
            CliError::Tls {
                address: address.into(),
                reason: format!(
                    "the provider closed the connection ({}); it may have refused our certificate",
                    s.message()
                ),
            }
        }
        _ => CliError::Rpc(s.message().to_owned()),
    }
}

/// Parses sizes: bytes, or a number with K/M/G/T (binary units), e.g. `10G`, `512M`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                'B' => 1,
                _ => return Err(format!("{s:?}: unknown size suffix {c:?} (use K, M, G or T)")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: u64 = num.trim().parse().map_err(|_| format!("{s:?} is not a size (e.g. 10G, 512M, 1048576)"))?;
    n.checked_mul(mult).ok_or_else(|| format!("{s:?} is too large"))
}

/// Parses durations: a number with s/m/h/d, e.g. `30s`, `5m`, `24h`, `5d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a duration (e.g. 30s, 5m, 24h, 5d)"))?;
    let secs = match unit {
        "s" | "" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => return Err(format!("{s:?}: unknown duration unit {unit:?} (use s, m, h or d)")),
    };
    Ok(Duration::from_secs(secs))
}

/// Human size with binary units.
pub fn human_size(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

/// "12s ago" style age of a unix-ms timestamp.
pub fn age(unix_ms: i64) -> String {
    if unix_ms <= 0 {
        return "never".into();
    }
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0);
    let s = (now - unix_ms).max(0) / 1000;
    match s {
        0..60 => format!("{s}s ago"),
        60..3600 => format!("{}m ago", s / 60),
        3600..86400 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86400),
    }
}

/// Prints rows as an aligned table with a header.
pub fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{:<w$}  ", c, w = widths[i]));
            }
        }
        println!("{}", s.trim_end());
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(|s| s.as_str()).collect());
    }
}

pub mod protection;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert!(parse_size("10X").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999999999999T").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86400)));
        assert_eq!(parse_duration("5d"), Ok(Duration::from_secs(5 * 86400)));
        assert!(parse_duration("5w").is_err());
        assert!(parse_duration("m").is_err());
    }

    #[test]
    fn endpoints() {
        assert_eq!(endpoint_parts("127.0.0.1:7443"), ("https://127.0.0.1:7443".into(), "127.0.0.1".into()));
        assert_eq!(endpoint_parts("https://localhost:1"), ("https://localhost:1".into(), "localhost".into()));
    }
}
