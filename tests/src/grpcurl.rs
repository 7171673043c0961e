//! The real `grpcurl` against the provider's and the agents' services: TLS flags for an
//! operator or a host certificate, the schema from the workspace's `.proto` files (so a
//! call does not depend on reflection), unary calls and streams fed from stdin. The
//! tests assert on grpcurl's exit code: 64 + the gRPC status code of a failed call.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::lab::Lab;

/// grpcurl's exit code for a call that ended with gRPC status `code`.
pub const fn grpc_exit(code: i32) -> i32 {
    64 + code
}

/// grpcurl TLS flags: `-cacert CA [-cert C -key K]`.
pub fn tls_args(ca: &Path, client: Option<(&Path, &Path)>) -> Vec<String> {
    let mut v = vec!["-cacert".to_owned(), ca.display().to_string()];
    if let Some((c, k)) = client {
        v.extend(["-cert".to_owned(), c.display().to_string(), "-key".to_owned(), k.display().to_string()]);
    }
    v
}

/// TLS flags with the host certificate an agent keeps in its data dir `dir`.
pub fn host_tls(dir: &Path) -> Vec<String> {
    tls_args(&dir.join("ca.pem"), Some((&dir.join("host.pem"), &dir.join("host.key"))))
}

/// Strings from `&str`s (for grpcurl argument lists).
pub fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// The workspace's `.proto` root (`proto/proto`).
pub fn proto_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto/proto")
}

/// `-import-path <proto root> -proto siterecovery/v1/FILE`: the schema without reflection.
pub fn proto_args(file: &str) -> Vec<String> {
    vec![
        "-import-path".to_owned(),
        proto_dir().display().to_string(),
        "-proto".to_owned(),
        format!("siterecovery/v1/{file}"),
    ]
}

impl Lab {
    /// `--cacert/--cert/--key` of the lab's operator certs, for grpcurl.
    pub fn op_tls(&self) -> Vec<String> {
        tls_args(&self.opdir.join("ca.pem"), Some((&self.opdir.join("op.pem"), &self.opdir.join("op.key"))))
    }

    /// TLS flags with host `name`'s certificate (from its data dir in the lab).
    pub fn host_tls(&self, name: &str) -> Vec<String> {
        host_tls(&self.host_slot(name).dir)
    }

    /// `grpcurl -connect-timeout 2 ARGS` (the real grpcurl, from PATH).
    pub fn grpcurl(&self, args: &[String]) -> Output {
        self.run(Command::new("grpcurl").args(["-connect-timeout", "2"]).args(args))
    }

    /// `grpcurl -connect-timeout 2 FLAGS ARGS` (FLAGS: TLS and other flags).
    pub fn grpcurl_with(&self, flags: &[String], args: &[&str]) -> Output {
        let mut a = flags.to_vec();
        a.extend(strings(args));
        self.grpcurl(&a)
    }

    /// A unary (or server-streaming) call of `method` at `addr` with request `data`
    /// (JSON), the schema from the `.proto` file `proto`; `flags`: TLS and other flags.
    pub fn grpcurl_call(&self, flags: &[String], proto: &str, data: &str, addr: &str, method: &str) -> Output {
        let mut args = flags.to_vec();
        args.extend(proto_args(proto));
        args.extend(strings(&["-d", data, addr, method]));
        self.grpcurl(&args)
    }

    /// A client- or bidi-streaming call: each of `messages` (JSON) is sent in turn from
    /// stdin (`-d @`), then the stream is closed; grpcurl exits when the server ends the
    /// call (bound it with `-max-time` in `flags`).
    pub fn grpcurl_stream(
        &self,
        flags: &[String],
        proto: &str,
        messages: &[String],
        addr: &str,
        method: &str,
    ) -> Output {
        let mut args = flags.to_vec();
        args.extend(proto_args(proto));
        args.extend(strings(&["-d", "@", addr, method]));
        let input = messages.join("\n");
        self.run_with_stdin(Command::new("grpcurl").args(["-connect-timeout", "2"]).args(&args), input.as_bytes())
    }
}
