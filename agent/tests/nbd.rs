//! The NBD server against real clients (qemu-io, qemu-img from qemu-utils) and against
//! hand-made malformed packets, on temp unix sockets and `127.0.0.1:0`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use siterecovery_agent::disk::RawFile;
use siterecovery_agent::nbd::{Exports, TcpSecurity, serve_tcp, serve_unix};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;

const MIB: u64 = 1 << 20;
const DEADLINE: Duration = Duration::from_secs(30);
const IO_DEADLINE: Duration = Duration::from_secs(5);

/// One in-process server with a unix and a TCP listener.
struct Server {
    dir: tempfile::TempDir,
    socket: PathBuf,
    port: u16,
    exports: Arc<Exports>,
    shutdown: CancellationToken,
    tasks: tokio::task::JoinSet<()>,
}

impl Server {
    async fn start() -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("nbd.sock");
        let unix = tokio::net::UnixListener::bind(&socket).expect("bind unix");
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind tcp");
        let port = tcp.local_addr().expect("addr").port();
        let exports = Arc::new(Exports::new());
        let shutdown = CancellationToken::new();
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(serve_unix(unix, exports.clone(), shutdown.clone()));
        tasks.spawn(serve_tcp(tcp, exports.clone(), TcpSecurity::Insecure, shutdown.clone()));
        Server { dir, socket, port, exports, shutdown, tasks }
    }

    /// Creates a sparse raw image of `size` bytes and exports it as `name`.
    fn add_image(&self, name: &str, size: u64, read_only: bool) -> PathBuf {
        let path = self.dir.path().join(format!("{name}.img"));
        std::fs::File::create(&path).expect("create").set_len(size).expect("set_len");
        let dev = RawFile::open(&path, read_only).expect("open");
        self.exports.add(name.to_string(), Arc::new(dev)).expect("add export");
        path
    }

    fn unix_uri(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.socket.display())
    }

    fn tcp_uri(&self, name: &str) -> String {
        format!("nbd://127.0.0.1:{}/{name}", self.port)
    }

    async fn stop(mut self) {
        self.shutdown.cancel();
        tokio::time::timeout(DEADLINE, async { while self.tasks.join_next().await.is_some() {} })
            .await
            .expect("servers stop after shutdown");
    }
}

/// Runs a qemu tool with a deadline; returns whether it exited 0.
async fn run(program: &str, args: &[&str]) -> bool {
    let child = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
    let out = tokio::time::timeout(DEADLINE, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} timed out"))
        .expect("wait");
    if !out.status.success() {
        eprintln!(
            "{program} {args:?}: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out.status.success()
}

async fn qemu_io(uri: &str, cmds: &[&str]) -> bool {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(uri);
    run("qemu-io", &args).await
}

fn write_expected(path: &Path, size: u64, runs: &[(u64, u64, u8)]) {
    let mut data = vec![0u8; size as usize];
    for &(off, len, byte) in runs {
        data[off as usize..(off + len) as usize].fill(byte);
    }
    std::fs::write(path, data).expect("write expected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_clients_over_unix_and_tcp() {
    let server = Server::start().await;
    let size = 4 * MIB;
    let image = server.add_image("disk0", size, false);
    let unix = server.unix_uri("disk0");
    let tcp = server.tcp_uri("disk0");

    assert!(qemu_io(&unix, &["write -P 0xab 0 1M", "write -P 0xcd 3M 64k"]).await);
    assert!(qemu_io(&unix, &["read -P 0xab 0 1M", "read -P 0xcd 3M 64k", "read -P 0 1M 2M"]).await);
    assert!(!qemu_io(&unix, &["read -P 0xac 0 1M"]).await, "a wrong pattern must fail");
    assert!(qemu_io(&tcp, &["read -P 0xab 0 1M", "read -P 0xcd 3M 64k"]).await);
    assert!(!qemu_io(&tcp, &["read -P 0xcd 0 64k"]).await, "a wrong pattern must fail");
    assert!(qemu_io(&tcp, &["write -P 0x11 2M 4k", "read -P 0x11 2M 4k"]).await);

    let expected = server.dir.path().join("expected.img");
    write_expected(&expected, size, &[(0, MIB, 0xab), (2 * MIB, 4096, 0x11), (3 * MIB, 65536, 0xcd)]);
    let expected_s = expected.to_str().expect("utf8 path");
    assert!(run("qemu-img", &["compare", "-f", "raw", "-F", "raw", &unix, expected_s]).await);
    assert!(run("qemu-img", &["compare", "-f", "raw", "-F", "raw", &tcp, expected_s]).await);
    assert_eq!(std::fs::read(&image).expect("image"), std::fs::read(&expected).expect("expected"));

    let copy = server.dir.path().join("copy.img");
    let copy_s = copy.to_str().expect("utf8 path");
    assert!(run("qemu-img", &["convert", "-f", "raw", "-O", "raw", &unix, copy_s]).await);
    assert!(run("qemu-img", &["compare", "-f", "raw", "-F", "raw", copy_s, expected_s]).await);

    // Zeroes (with and without NO_HOLE-style full allocation) and discard.
    assert!(qemu_io(&unix, &["write -z 0 64k", "write -z -u 64k 64k", "discard 3M 64k"]).await);
    assert!(qemu_io(&tcp, &["read -P 0 0 128k", "read -P 0xab 128k 64k", "read -P 0 3M 64k"]).await);
    assert!(qemu_io(&unix, &["write -f -P 0x22 1M 4k", "flush", "read -P 0x22 1M 4k"]).await);

    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_bench_reads_and_writes() {
    let server = Server::start().await;
    server.add_image("bench", 16 * MIB, false);
    let unix = server.unix_uri("bench");
    let tcp = server.tcp_uri("bench");
    let base = ["bench", "-f", "raw", "-t", "none", "-s", "64k", "-c", "2000", "-d", "16"];
    let with = |extra: &[&'static str], uri: &str| -> Vec<String> {
        base.iter().chain(extra).map(|s| s.to_string()).chain([uri.to_string()]).collect()
    };
    for args in [with(&[], &unix), with(&["-w", "--pattern", "0x5a"], &unix), with(&["-w"], &tcp), with(&[], &tcp)] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert!(run("qemu-img", &args).await, "qemu-img {args:?}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_added_and_removed_while_serving() {
    let server = Server::start().await;
    server.add_image("a", MIB, false);
    assert!(qemu_io(&server.unix_uri("a"), &["write -P 0x01 0 4k"]).await);
    assert!(!qemu_io(&server.unix_uri("b"), &["read 0 4k"]).await, "unknown export must fail");
    server.add_image("b", MIB, false);
    assert!(qemu_io(&server.unix_uri("b"), &["write -P 0x02 0 4k", "read -P 0x02 0 4k"]).await);

    // A connection that opened "a" before its removal gets ESHUTDOWN afterwards.
    let mut c = RawClient::connect(&server.socket).await;
    c.go("a").await.expect("go a");
    assert_eq!(c.request(CMD_READ, 0, 0, 4096, &[]).await, (0, vec![0x01; 4096]));
    assert!(server.exports.remove("a").is_some());
    assert_eq!(c.request(CMD_READ, 0, 0, 4096, &[]).await, (ESHUTDOWN, vec![]));
    assert_eq!(c.request(CMD_WRITE, 0, 0, 4, b"oops").await, (ESHUTDOWN, vec![]));
    assert!(!qemu_io(&server.unix_uri("a"), &["read 0 4k"]).await, "removed export must fail");
    assert_eq!(server.exports.names(), vec!["b".to_string()]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_idle_connections() {
    let server = Server::start().await;
    server.add_image("d", MIB, false);
    let mut idle = RawClient::connect(&server.socket).await;
    idle.go("d").await.expect("go");
    let mut in_handshake = RawClient::connect(&server.socket).await;
    in_handshake.read_exact(18).await;
    server.stop().await;
    assert!(idle.at_eof().await, "transmission connection closed on shutdown");
    assert!(in_handshake.at_eof().await, "handshake connection closed on shutdown");
}

// --- A raw protocol client for malformed packets ---------------------------------

const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const OPT_EXPORT_NAME: u32 = 1;
const OPT_LIST: u32 = 3;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const EPERM: u32 = 1;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const ESHUTDOWN: u32 = 108;

struct RawClient {
    s: UnixStream,
    cookie: u64,
}

impl RawClient {
    /// Connects and does the initial greeting (fixed newstyle, no zeroes).
    async fn connect(path: &Path) -> RawClient {
        let s = UnixStream::connect(path).await.expect("connect");
        RawClient { s, cookie: 0 }
    }

    async fn read_exact(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0; n];
        tokio::time::timeout(IO_DEADLINE, self.s.read_exact(&mut b)).await.expect("reply in time").expect("read");
        b
    }

    async fn greet(&mut self) {
        let hello = self.read_exact(18).await;
        assert_eq!(&hello[..8], b"NBDMAGIC");
        assert_eq!(u16::from_be_bytes([hello[16], hello[17]]), 0b11);
        self.s.write_all(&3u32.to_be_bytes()).await.expect("flags");
    }

    async fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).await.expect("send option");
    }

    /// Reads one option reply: (option, type, data).
    async fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let h = self.read_exact(20).await;
        assert_eq!(u64::from_be_bytes(h[..8].try_into().expect("8")), OPT_REPLY_MAGIC);
        let option = u32::from_be_bytes(h[8..12].try_into().expect("4"));
        let typ = u32::from_be_bytes(h[12..16].try_into().expect("4"));
        let len = u32::from_be_bytes(h[16..20].try_into().expect("4"));
        let data = self.read_exact(len as usize).await;
        (option, typ, data)
    }

    fn go_payload(name: &str) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        d
    }

    /// Greets and sends `NBD_OPT_GO`; `Ok((size, flags))` or `Err(reply type)`.
    async fn go(&mut self, name: &str) -> Result<(u64, u16), u32> {
        self.greet().await;
        self.go_again(name).await
    }

    async fn go_again(&mut self, name: &str) -> Result<(u64, u16), u32> {
        self.send_option(OPT_GO, &Self::go_payload(name)).await;
        let mut export = None;
        loop {
            let (opt, typ, data) = self.option_reply().await;
            assert_eq!(opt, OPT_GO);
            match typ {
                REP_INFO if data[..2] == [0, 0] => {
                    let size = u64::from_be_bytes(data[2..10].try_into().expect("8"));
                    export = Some((size, u16::from_be_bytes([data[10], data[11]])));
                }
                REP_INFO => {}
                REP_ACK => return Ok(export.expect("NBD_INFO_EXPORT sent")),
                err => return Err(err),
            }
        }
    }

    /// Sends one request and reads its simple reply: (errno, data).
    async fn request(&mut self, cmd: u16, flags: u16, offset: u64, len: u32, payload: &[u8]) -> (u32, Vec<u8>) {
        self.send_request(REQUEST_MAGIC, cmd, flags, offset, len, payload).await;
        let h = self.read_exact(16).await;
        assert_eq!(u32::from_be_bytes(h[..4].try_into().expect("4")), SIMPLE_REPLY_MAGIC);
        assert_eq!(u64::from_be_bytes(h[8..16].try_into().expect("8")), self.cookie);
        let errno = u32::from_be_bytes(h[4..8].try_into().expect("4"));
        let data = if errno == 0 && cmd == CMD_READ { self.read_exact(len as usize).await } else { vec![] };
        (errno, data)
    }

    async fn send_request(&mut self, magic: u32, cmd: u16, flags: u16, offset: u64, len: u32, payload: &[u8]) {
        self.cookie += 1;
        let mut b = magic.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&cmd.to_be_bytes());
        b.extend_from_slice(&self.cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(payload);
        // The server may already have closed: the check is on what comes back.
        let _ = self.s.write_all(&b).await;
    }

    /// True when the server closed the connection (end of stream, or reset).
    async fn at_eof(&mut self) -> bool {
        let mut b = [0u8; 64];
        loop {
            match tokio::time::timeout(IO_DEADLINE, self.s.read(&mut b)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_packets_are_refused_and_the_server_survives() {
    let server = Server::start().await;
    let size = MIB;
    let image = server.add_image("disk", size, false);
    server.add_image("ro", size, true);
    assert!(qemu_io(&server.unix_uri("disk"), &["write -P 0x77 0 64k"]).await);
    let before = std::fs::read(&image).expect("image");

    // Transmission errors on one connection: each answered, the stream stays in sync.
    let mut c = RawClient::connect(&server.socket).await;
    let (got_size, flags) = c.go("disk").await.expect("go");
    assert_eq!(got_size, size);
    assert_eq!(flags & 0b10, 0, "not read-only");
    assert_eq!(c.request(CMD_READ, 0, 0, (32 << 20) + 1, &[]).await.0, EINVAL, "read > max payload");
    assert_eq!(c.request(CMD_READ, 0, size, 512, &[]).await.0, EINVAL, "read past the end");
    assert_eq!(c.request(CMD_READ, 0, u64::MAX - 100, 4096, &[]).await.0, EINVAL, "overflowing read");
    assert_eq!(c.request(CMD_WRITE, 0, size - 256, 512, &[0xee; 512]).await.0, ENOSPC, "write past the end");
    assert_eq!(c.request(CMD_WRITE, 0, u64::MAX - 100, 512, &[0xee; 512]).await.0, ENOSPC, "overflowing write");
    assert_eq!(c.request(4, 0, size, 1, &[]).await.0, EINVAL, "trim past the end");
    assert_eq!(c.request(42, 0, 0, 512, &[]).await.0, EINVAL, "unknown command");
    assert_eq!(c.request(CMD_WRITE, 0x100, 0, 4, b"flag").await.0, EINVAL, "unknown flag");
    assert_eq!(c.request(CMD_READ, 0, 0, 8, &[]).await, (0, vec![0x77; 8]), "still in sync");
    c.send_request(0xdead_beef, CMD_READ, 0, 0, 8, &[]).await;
    assert!(c.at_eof().await, "bad request magic closes the connection");

    // A write above the maximum payload: EINVAL, then the connection is closed.
    let mut c = RawClient::connect(&server.socket).await;
    c.go("disk").await.expect("go");
    assert_eq!(c.request(CMD_WRITE, 0, 0, (32 << 20) + 1, &[0xee; 4096]).await.0, EINVAL);
    assert!(c.at_eof().await, "oversized write closes the connection");

    // Read-only export: writes refused with EPERM, reads fine.
    let mut c = RawClient::connect(&server.socket).await;
    let (_, flags) = c.go("ro").await.expect("go ro");
    assert_eq!(flags & 0b10, 0b10, "read-only flag advertised");
    assert_eq!(c.request(CMD_WRITE, 0, 0, 4, b"nope").await.0, EPERM);
    assert_eq!(c.request(CMD_READ, 0, 0, 4, &[]).await.0, 0);

    // Handshake: unknown option, unknown export, LIST, oversized options, bad magic.
    let mut c = RawClient::connect(&server.socket).await;
    c.greet().await;
    c.send_option(99, b"xyz").await;
    assert_eq!(c.option_reply().await.1, REP_ERR_UNSUP);
    c.send_option(OPT_GO, &RawClient::go_payload("nope")).await;
    assert_eq!(c.option_reply().await.1, REP_ERR_UNKNOWN);
    c.send_option(OPT_LIST, &[]).await;
    let mut names = Vec::new();
    loop {
        let (_, typ, data) = c.option_reply().await;
        if typ == REP_ACK {
            break;
        }
        assert_eq!(typ, REP_SERVER);
        names.push(String::from_utf8(data[4..].to_vec()).expect("utf8"));
    }
    assert_eq!(names, vec!["disk".to_string(), "ro".to_string()]);
    c.send_option(OPT_GO, &vec![b'x'; 8192]).await;
    assert_eq!(c.option_reply().await.1, REP_ERR_TOO_BIG, "oversized option refused in-band");
    assert_eq!(c.go_again("disk").await.map(|(s, _)| s), Ok(size), "handshake still in sync");

    let mut c = RawClient::connect(&server.socket).await;
    c.greet().await;
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&OPT_GO.to_be_bytes());
    b.extend_from_slice(&(64u32 << 20).to_be_bytes());
    c.s.write_all(&b).await.expect("send");
    assert!(c.at_eof().await, "a huge option closes the connection");

    let mut c = RawClient::connect(&server.socket).await;
    c.greet().await;
    c.s.write_all(&[0x55; 16]).await.expect("send");
    assert!(c.at_eof().await, "bad option magic closes the connection");

    let mut c = RawClient::connect(&server.socket).await;
    c.greet().await;
    c.send_option(OPT_EXPORT_NAME, b"nope").await;
    assert!(c.at_eof().await, "EXPORT_NAME of an unknown export closes the connection");

    let mut c = RawClient::connect(&server.socket).await;
    c.read_exact(18).await;
    c.s.write_all(&0xffff_fff0u32.to_be_bytes()).await.expect("send");
    assert!(c.at_eof().await, "unknown client flags close the connection");

    // Nothing reached the disk, and real clients still work against the same server.
    assert_eq!(std::fs::read(&image).expect("image"), before);
    assert!(qemu_io(&server.unix_uri("disk"), &["read -P 0x77 0 64k", "write -P 0x78 64k 4k"]).await);
    assert!(qemu_io(&server.tcp_uri("disk"), &["read -P 0x78 64k 4k"]).await);
    server.stop().await;
}
