//! The TLS-mandatory negotiation with an in-process rustls client over an in-memory
//! stream: what is refused before `STARTTLS`, who is refused after it, and a session
//! that reads and writes inside TLS. Plus the caps: per export at `NBD_OPT_GO`, and
//! the request bytes in flight per connection (back-pressure).

use std::time::Duration;

use rustls::pki_types::ServerName;
use siterecovery_certs::ca::{LEAF_VALIDITY, ServerNames};
use siterecovery_certs::live::{Expect, LiveIdentity, RevocationList, Trust, client_config_with};
use siterecovery_certs::tls::PemIdentity;
use siterecovery_certs::{PeerIdentity, Role, VaultCa, VaultId};
use tokio::io::DuplexStream;
use tokio_rustls::TlsConnector;

use super::*;

const DEADLINE: Duration = Duration::from_secs(10);

/// A vault with a host (the server) and a way to issue client certificates.
struct Pki {
    vault: VaultId,
    ca: VaultCa,
    revoked: Arc<RevocationList>,
    tls: Arc<NbdTls>,
}

impl Pki {
    fn new() -> Self {
        let vault = VaultId::generate();
        let ca = VaultCa::create(vault.clone(), "t").expect("ca");
        let host = PeerIdentity::new(vault.clone(), Role::Host, "h1").expect("id");
        let names = ServerNames::for_address("127.0.0.1:10809").expect("names");
        let (cert_pem, key_pem) = ca.issue_local(&host, &names, LEAF_VALIDITY).expect("host cert");
        let revoked = RevocationList::new();
        let trust = Trust {
            vault: vault.clone(),
            ca_pem: ca.cert_pem().to_owned(),
            identity: LiveIdentity::new(&PemIdentity { cert_pem, key_pem }).expect("live"),
            revoked: revoked.clone(),
        };
        let tls = Arc::new(NbdTls::new(&trust).expect("nbd tls"));
        Self { vault, ca, revoked, tls }
    }

    fn client(&self, role: Role, name: &str) -> PemIdentity {
        let id = PeerIdentity::new(self.vault.clone(), role, name).expect("id");
        let (cert_pem, key_pem) = self.ca.issue_local(&id, &ServerNames::default(), LEAF_VALIDITY).expect("client");
        PemIdentity { cert_pem, key_pem }
    }

    /// A TLS connector presenting `id` (none when `None`), trusting this vault's CA.
    fn connector(&self, id: Option<&PemIdentity>) -> TlsConnector {
        let live = id.map(|i| LiveIdentity::new(i).expect("live"));
        let cfg = client_config_with(
            &self.vault,
            self.ca.cert_pem(),
            &RevocationList::new(),
            Expect::AnyMember,
            live.as_ref(),
        )
        .expect("client config");
        TlsConnector::from(Arc::new(cfg))
    }
}

fn exports_with_disk(size: usize) -> (Arc<Exports>, Arc<tests::MemDisk>) {
    let disk = tests::MemDisk::new(size, false);
    let exports = Arc::new(Exports::new());
    exports.add("d".into(), disk.clone()).expect("add");
    (exports, disk)
}

/// Starts a TLS-mandatory server connection on one end of a pipe; returns the other.
fn tls_server(
    exports: Arc<Exports>,
    tls: Arc<NbdTls>,
) -> (DuplexStream, tokio::task::JoinHandle<Result<(), NbdError>>) {
    let (client, server) = tokio::io::duplex(1 << 20);
    let srv = tokio::spawn(async move { serve_tls(server, exports, &tls, CancellationToken::new(), "test").await });
    (client, srv)
}

async fn send_option<W: AsyncWrite + Unpin>(w: &mut W, option: u32, data: &[u8]) {
    try_send_option(w, option, data).await.expect("send option");
}

async fn try_send_option<W: AsyncWrite + Unpin>(w: &mut W, option: u32, data: &[u8]) -> io::Result<()> {
    let mut b = Vec::new();
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    w.write_all(&b).await?;
    w.flush().await
}

/// One option reply: (option, reply type, data).
async fn reply<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<(u32, u32, Vec<u8>)> {
    let magic = r.read_u64().await?;
    assert_eq!(magic, OPTION_REPLY_MAGIC, "option reply magic");
    let option = r.read_u32().await?;
    let rep = r.read_u32().await?;
    let len = r.read_u32().await?;
    let mut data = vec![0; len as usize];
    r.read_exact(&mut data).await?;
    Ok((option, rep, data))
}

/// The greeting, then the client's flags.
async fn hello<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) {
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).await.expect("greeting");
    assert_eq!(&greeting[..8], &NBDMAGIC.to_be_bytes());
    s.write_all(&(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes()).await.expect("flags");
}

fn go_data(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    d
}

/// Replies to `GO` until its final one (`ACK` or an error).
async fn go<R: AsyncRead + AsyncWrite + Unpin>(s: &mut R, name: &str) -> io::Result<(u32, Vec<u8>)> {
    try_send_option(s, OPT_GO, &go_data(name)).await?;
    loop {
        let (opt, rep, data) = reply(s).await?;
        assert_eq!(opt, OPT_GO);
        if rep != REP_INFO {
            return Ok((rep, data));
        }
    }
}

/// STARTTLS acknowledged, then the TLS handshake with `id`.
async fn start_tls(
    mut c: DuplexStream,
    pki: &Pki,
    id: Option<&PemIdentity>,
) -> io::Result<tokio_rustls::client::TlsStream<DuplexStream>> {
    hello(&mut c).await;
    send_option(&mut c, OPT_STARTTLS, &[]).await;
    let (opt, rep, _) = reply(&mut c).await?;
    assert_eq!((opt, rep), (OPT_STARTTLS, REP_ACK));
    let name = ServerName::try_from("127.0.0.1").expect("name");
    pki.connector(id).connect(name, c).await
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

#[test]
fn before_starttls_every_option_gets_tls_reqd_and_export_name_closes() {
    let pki = Pki::new();
    let (exports, disk) = exports_with_disk(4096);
    rt().block_on(async move {
        let (mut c, srv) = tls_server(exports, pki.tls.clone());
        hello(&mut c).await;
        for (opt, data) in [
            (OPT_GO, go_data("d")),
            (OPT_INFO, go_data("d")),
            (OPT_LIST, vec![]),
            (OPT_STRUCTURED_REPLY, vec![]),
            (99, vec![1, 2, 3]),
        ] {
            send_option(&mut c, opt, &data).await;
            let (o, rep, msg) = reply(&mut c).await.expect("reply");
            assert_eq!((o, rep), (opt, REP_ERR_TLS_REQD), "option {opt} before STARTTLS");
            assert!(String::from_utf8_lossy(&msg).contains("TLS is required"), "message: {msg:?}");
        }
        // STARTTLS with data is invalid; the connection goes on.
        send_option(&mut c, OPT_STARTTLS, b"x").await;
        assert_eq!(reply(&mut c).await.expect("reply").1, REP_ERR_INVALID);
        // EXPORT_NAME has no error reply: the connection is closed.
        send_option(&mut c, OPT_EXPORT_NAME, b"d").await;
        let mut rest = Vec::new();
        tokio::time::timeout(DEADLINE, c.read_to_end(&mut rest)).await.expect("closed in time").expect("read");
        assert!(rest.is_empty(), "nothing sent for EXPORT_NAME before TLS: {rest:x?}");
        let r = srv.await.expect("join");
        assert!(matches!(r, Err(NbdError::ExportNameRefused(_))), "{r:?}");
    });
    assert_eq!(disk.snapshot(), vec![0; 4096]);
}

#[test]
fn inside_tls_an_nbd_certificate_reads_and_writes() {
    let pki = Pki::new();
    let (exports, disk) = exports_with_disk(8192);
    let id = pki.client(Role::Nbd, "qemu");
    rt().block_on(async move {
        let (c, srv) = tls_server(exports, pki.tls.clone());
        let mut t = tokio::time::timeout(DEADLINE, start_tls(c, &pki, Some(&id))).await.expect("in time").expect("tls");
        // A second STARTTLS inside TLS is invalid.
        send_option(&mut t, OPT_STARTTLS, &[]).await;
        assert_eq!(reply(&mut t).await.expect("reply").1, REP_ERR_INVALID);
        let (rep, _) = go(&mut t, "d").await.expect("go");
        assert_eq!(rep, REP_ACK, "GO inside TLS");
        let mut w = tests::header(&tests::req(CMD_WRITE, 0, 4096, 4)).to_vec();
        w.extend_from_slice(b"tls!");
        w.extend_from_slice(&tests::header(&Request { flags: 0, cmd: CMD_READ, cookie: 9, offset: 4096, len: 4 }));
        w.extend_from_slice(&tests::header(&tests::req(CMD_DISC, 0, 0, 0)));
        t.write_all(&w).await.expect("requests");
        t.flush().await.expect("flush");
        let mut out = Vec::new();
        let _ = tokio::time::timeout(DEADLINE, t.read_to_end(&mut out)).await.expect("closed in time");
        let mut read_reply = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
        read_reply.extend_from_slice(&0u32.to_be_bytes());
        read_reply.extend_from_slice(&9u64.to_be_bytes());
        read_reply.extend_from_slice(b"tls!");
        assert!(out.windows(read_reply.len()).any(|x| x == read_reply), "read back inside TLS: {out:x?}");
        srv.await.expect("join").expect("clean end");
    });
    assert_eq!(&disk.snapshot()[4096..4100], b"tls!");
}

#[test]
fn a_host_certificate_may_open_exports_too() {
    let pki = Pki::new();
    let (exports, _disk) = exports_with_disk(4096);
    let id = pki.client(Role::Host, "h2");
    rt().block_on(async move {
        let (c, _srv) = tls_server(exports, pki.tls.clone());
        let mut t = start_tls(c, &pki, Some(&id)).await.expect("tls");
        assert_eq!(go(&mut t, "d").await.expect("go").0, REP_ACK);
    });
}

#[test]
fn other_roles_get_policy_with_a_message_for_every_option() {
    let pki = Pki::new();
    let (exports, disk) = exports_with_disk(4096);
    for role in [Role::Operator, Role::Provider] {
        let id = pki.client(role, "someone");
        let exports = exports.clone();
        let tls = pki.tls.clone();
        rt().block_on(async {
            let (c, srv) = tls_server(exports, tls);
            let mut t = start_tls(c, &pki, Some(&id)).await.expect("tls");
            send_option(&mut t, OPT_STRUCTURED_REPLY, &[]).await;
            let (_, rep, msg) = reply(&mut t).await.expect("reply");
            assert_eq!(rep, REP_ERR_POLICY, "{role}");
            let msg = String::from_utf8_lossy(&msg).into_owned();
            assert!(msg.contains(&format!("role {role}")) && msg.contains("nbd-client-cert"), "{msg}");
            let (rep, _) = go(&mut t, "d").await.expect("go");
            assert_eq!(rep, REP_ERR_POLICY, "GO by a {role} certificate");
            send_option(&mut t, OPT_EXPORT_NAME, b"d").await;
            let r = srv.await.expect("join");
            assert!(matches!(r, Err(NbdError::ExportNameRefused(_))), "{r:?}");
        });
    }
    assert_eq!(disk.snapshot(), vec![0; 4096]);
}

/// The TLS handshake fails on the server: the client never gets to an option reply.
fn refused_at_handshake(pki: &Pki, id: Option<PemIdentity>, what: &str) {
    let (exports, _disk) = exports_with_disk(4096);
    rt().block_on(async {
        let (c, srv) = tls_server(exports, pki.tls.clone());
        // With TLS 1.3 the client may finish connect() before the server refuses it;
        // then the refusal shows on the first read.
        if let Ok(mut t) = start_tls(c, pki, id.as_ref()).await {
            let got = tokio::time::timeout(DEADLINE, go(&mut t, "d")).await.expect("in time");
            assert!(got.is_err(), "{what}: got an option reply {got:?}");
        }
        let r = tokio::time::timeout(DEADLINE, srv).await.expect("in time").expect("join");
        assert!(matches!(r, Err(NbdError::Tls(_))), "{what}: {r:?}");
    });
}

#[test]
fn no_certificate_another_vault_or_a_revoked_one_is_refused() {
    let pki = Pki::new();
    refused_at_handshake(&pki, None, "no client certificate");
    let other = Pki::new();
    // The other vault's client, trusting our CA (so only the server's check stands).
    refused_at_handshake(&pki, Some(other.client(Role::Nbd, "qemu")), "a certificate of another vault");
    let id = pki.client(Role::Nbd, "qemu");
    pki.revoked.insert(&siterecovery_certs::live::serial_of_pem(&id.cert_pem).expect("serial"));
    refused_at_handshake(&pki, Some(id), "a revoked certificate");
}

#[test]
fn starttls_on_a_plain_listener_is_refused_by_policy() {
    let (exports, _disk) = exports_with_disk(4096);
    rt().block_on(async move {
        let (mut c, server) = tokio::io::duplex(1 << 16);
        let srv = tokio::spawn(serve_connection(server, exports, CancellationToken::new()));
        hello(&mut c).await;
        send_option(&mut c, OPT_STARTTLS, &[]).await;
        assert_eq!(reply(&mut c).await.expect("reply").1, REP_ERR_POLICY);
        // The plain session still works.
        assert_eq!(go(&mut c, "d").await.expect("go").0, REP_ACK);
        drop(c);
        let _ = srv.await;
    });
}

#[test]
fn go_over_the_export_cap_is_refused_in_band() {
    let disk = tests::MemDisk::new(4096, false);
    let exports = Arc::new(Exports::with_limits(Limits::new(8, 2, 64 << 20).expect("limits")));
    exports.add("d".into(), disk).expect("add");
    rt().block_on(async move {
        let mut held = Vec::new();
        for _ in 0..2 {
            let (mut c, server) = tokio::io::duplex(1 << 16);
            held.push(tokio::spawn(serve_connection(server, exports.clone(), CancellationToken::new())));
            hello(&mut c).await;
            assert_eq!(go(&mut c, "d").await.expect("go").0, REP_ACK);
            held.push(tokio::spawn(async move {
                // Keep the session open until the test ends.
                let mut sink = Vec::new();
                let _ = c.read_to_end(&mut sink).await;
                Ok(())
            }));
        }
        let (mut c, server) = tokio::io::duplex(1 << 16);
        let _srv = tokio::spawn(serve_connection(server, exports.clone(), CancellationToken::new()));
        hello(&mut c).await;
        let (rep, msg) = go(&mut c, "d").await.expect("go");
        assert_eq!(rep, REP_ERR_POLICY, "a third connection to a disk capped at 2");
        assert!(String::from_utf8_lossy(&msg).contains("cap of 2"), "{msg:?}");
        // INFO does not take a slot: it is still answered.
        send_option(&mut c, OPT_INFO, &go_data("d")).await;
        assert_eq!(reply(&mut c).await.expect("info").1, REP_INFO);
    });
}

/// A device whose writes block until released, counting the writes that started.
struct GateDisk {
    started: std::sync::atomic::AtomicUsize,
    open: (std::sync::Mutex<bool>, std::sync::Condvar),
}

impl BlockDevice for GateDisk {
    fn size(&self) -> u64 {
        64 << 20
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_at(&self, _buf: &mut [u8], _offset: u64) -> Result<(), DiskError> {
        Ok(())
    }
    fn write_at(&self, _data: &[u8], _offset: u64, _fua: bool) -> Result<(), DiskError> {
        self.started.fetch_add(1, Ordering::SeqCst);
        let (m, cv) = &self.open;
        let mut open = m.lock().unwrap_or_else(|e| e.into_inner());
        while !*open {
            open = cv.wait(open).unwrap_or_else(|e| e.into_inner());
        }
        Ok(())
    }
    fn write_zeroes(&self, _offset: u64, _len: u64, _fua: bool, _no_hole: bool) -> Result<(), DiskError> {
        Ok(())
    }
    fn trim(&self, _offset: u64, _len: u64) -> Result<(), DiskError> {
        Ok(())
    }
    fn flush(&self) -> Result<(), DiskError> {
        Ok(())
    }
}

#[test]
fn write_payload_beyond_the_memory_cap_waits_for_replies() {
    let disk = Arc::new(GateDisk {
        started: std::sync::atomic::AtomicUsize::new(0),
        open: (std::sync::Mutex::new(false), std::sync::Condvar::new()),
    });
    // The smallest cap: one maximal request's worth.
    let exports = Arc::new(Exports::with_limits(Limits::new(8, 8, u64::from(MAX_PAYLOAD)).expect("limits")));
    exports.add("d".into(), disk.clone()).expect("add");
    let mib = 1usize << 20;
    let writes = 48; // 48 MiB of payload against a 32 MiB budget
    rt().block_on(async {
        let (mut c, server) = tokio::io::duplex(64 << 10);
        let srv = tokio::spawn(serve_connection(server, exports.clone(), CancellationToken::new()));
        hello(&mut c).await;
        assert_eq!(go(&mut c, "d").await.expect("go").0, REP_ACK);
        let (mut cr, mut cw) = tokio::io::split(c);
        let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let sent2 = sent.clone();
        let writer = tokio::spawn(async move {
            let payload = vec![0xabu8; mib];
            for i in 0..writes {
                let mut h = tests::header(&tests::req(CMD_WRITE, 0, (i * mib) as u64, mib as u32)).to_vec();
                h[8..16].copy_from_slice(&(i as u64).to_be_bytes());
                cw.write_all(&h).await.expect("header");
                cw.write_all(&payload).await.expect("payload");
                sent2.fetch_add(1, Ordering::SeqCst);
            }
            cw
        });
        // The server takes 32 writes (its budget), then stops reading: the client's
        // writes stall with the pipe full, well short of all 48.
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while disk.started.load(Ordering::SeqCst) < 32 {
            assert!(tokio::time::Instant::now() < deadline, "the server did not take its budget's worth");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Stable: nothing more is read while no reply is taken.
        let sent_then = sent.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(disk.started.load(Ordering::SeqCst), 32, "more writes started than the budget allows");
        assert_eq!(sent.load(Ordering::SeqCst), sent_then, "the server kept reading payload past its budget");
        assert!(sent_then < writes, "the whole payload went in: no back-pressure");
        // Release the device: the budget comes back and everything completes.
        {
            let (m, cv) = &disk.open;
            *m.lock().unwrap_or_else(|e| e.into_inner()) = true;
            cv.notify_all();
        }
        let mut replies = vec![0u8; 16 * writes];
        tokio::time::timeout(DEADLINE, cr.read_exact(&mut replies)).await.expect("replies in time").expect("read");
        let mut cw = tokio::time::timeout(DEADLINE, writer).await.expect("writer done").expect("join");
        cw.write_all(&tests::header(&tests::req(CMD_DISC, 0, 0, 0))).await.expect("disc");
        srv.await.expect("join").expect("clean end");
    });
    assert_eq!(disk.started.load(Ordering::SeqCst), writes);
}
