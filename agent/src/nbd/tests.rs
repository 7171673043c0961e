//! Protocol tests of the NBD server over in-memory streams, and property tests of `plan`.

use super::*;
use proptest::prelude::*;

/// An in-memory device for protocol tests.
pub(super) struct MemDisk {
    data: Mutex<Vec<u8>>,
    read_only: bool,
}

impl MemDisk {
    pub(super) fn new(size: usize, read_only: bool) -> Arc<Self> {
        Arc::new(Self { data: Mutex::new(vec![0; size]), read_only })
    }
    pub(super) fn snapshot(&self) -> Vec<u8> {
        self.data.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl BlockDevice for MemDisk {
    fn size(&self) -> u64 {
        self.snapshot().len() as u64
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        let d = self.data.lock().unwrap_or_else(|e| e.into_inner());
        crate::disk::check_range(offset, buf.len() as u64, d.len() as u64)?;
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write_at(&self, data: &[u8], offset: u64, _fua: bool) -> Result<(), DiskError> {
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        let mut d = self.data.lock().unwrap_or_else(|e| e.into_inner());
        crate::disk::check_range(offset, data.len() as u64, d.len() as u64)?;
        d[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, _fua: bool, _no_hole: bool) -> Result<(), DiskError> {
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        let mut d = self.data.lock().unwrap_or_else(|e| e.into_inner());
        crate::disk::check_range(offset, len, d.len() as u64)?;
        d[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.write_zeroes(offset, len, false, false)
    }
    fn flush(&self) -> Result<(), DiskError> {
        Ok(())
    }
}

pub(super) fn req(cmd: u16, flags: u16, offset: u64, len: u32) -> Request {
    Request { flags, cmd, cookie: 7, offset, len }
}

pub(super) fn header(r: &Request) -> [u8; REQUEST_LEN] {
    let mut h = [0u8; REQUEST_LEN];
    h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&r.flags.to_be_bytes());
    h[6..8].copy_from_slice(&r.cmd.to_be_bytes());
    h[8..16].copy_from_slice(&r.cookie.to_be_bytes());
    h[16..24].copy_from_slice(&r.offset.to_be_bytes());
    h[24..28].copy_from_slice(&r.len.to_be_bytes());
    h
}

#[test]
fn parse_roundtrip_and_bad_magic() {
    let r = req(CMD_WRITE, CMD_FLAG_FUA, 4096, 512);
    assert_eq!(parse_request(&header(&r)).ok(), Some(r));
    let mut h = header(&r);
    h[0] ^= 1;
    assert!(matches!(parse_request(&h), Err(NbdError::RequestMagic(_))));
}

#[test]
fn plan_rules() {
    let size = 1 << 20;
    let p = |r: Request| plan(&r, size, false, false);
    assert_eq!(p(req(CMD_READ, 0, 0, 4096)), Plan::Read { offset: 0, len: 4096 });
    assert_eq!(p(req(CMD_READ, 0, size - 1, 2)), Plan::Reject { errno: EINVAL, discard: 0 });
    assert_eq!(p(req(CMD_READ, 0, u64::MAX, 2)), Plan::Reject { errno: EINVAL, discard: 0 });
    assert_eq!(p(req(CMD_READ, 0, 0, MAX_PAYLOAD + 1)), Plan::Reject { errno: EINVAL, discard: 0 });
    assert_eq!(p(req(CMD_WRITE, 0, size, 512)), Plan::Reject { errno: ENOSPC, discard: 512 });
    assert_eq!(p(req(CMD_WRITE, 0, u64::MAX - 10, 512)), Plan::Reject { errno: ENOSPC, discard: 512 });
    assert_eq!(p(req(CMD_WRITE, 0, 0, MAX_PAYLOAD + 1)), Plan::RejectAndClose { errno: EINVAL });
    assert_eq!(p(req(CMD_WRITE, CMD_FLAG_FUA, 0, 1)), Plan::Write { offset: 0, len: 1, fua: true });
    assert_eq!(p(req(CMD_WRITE, 1 << 9, 0, 1)), Plan::Reject { errno: EINVAL, discard: 1 });
    assert_eq!(p(req(99, 0, 0, 4096)), Plan::Reject { errno: EINVAL, discard: 0 });
    assert_eq!(p(req(CMD_TRIM, 0, size, 1)), Plan::Reject { errno: EINVAL, discard: 0 });
    assert_eq!(p(req(CMD_WRITE_ZEROES, 0, size, 1)), Plan::Reject { errno: ENOSPC, discard: 0 });
    assert_eq!(
        p(req(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 0, 4096)),
        Plan::Zeroes { offset: 0, len: 4096, fua: false, no_hole: true }
    );
    assert_eq!(p(req(CMD_FLUSH, 0, 0, 0)), Plan::Flush);
    assert_eq!(p(req(CMD_DISC, 0, 0, 0)), Plan::Disconnect);
    // Read-only and closed exports.
    assert_eq!(plan(&req(CMD_WRITE, 0, 0, 8), size, true, false), Plan::Reject { errno: EPERM, discard: 8 });
    assert_eq!(plan(&req(CMD_TRIM, 0, 0, 8), size, true, false), Plan::Reject { errno: EPERM, discard: 0 });
    assert_eq!(plan(&req(CMD_READ, 0, 0, 8), size, true, false), Plan::Read { offset: 0, len: 8 });
    assert_eq!(plan(&req(CMD_WRITE, 0, 0, 8), size, false, true), Plan::Reject { errno: ESHUTDOWN, discard: 8 });
}

#[test]
fn disk_errors_map_to_errnos() {
    let oor = DiskError::OutOfRange { offset: 0, len: 1, size: 0 };
    assert_eq!(errno_of(&oor, true), ENOSPC);
    assert_eq!(errno_of(&oor, false), EINVAL);
    assert_eq!(errno_of(&DiskError::ReadOnly, true), EPERM);
    assert_eq!(errno_of(&DiskError::Stopped, true), ESHUTDOWN);
    assert_eq!(errno_of(&DiskError::NoSpace(io::Error::other("x")), true), ENOSPC);
    assert_eq!(errno_of(&DiskError::Io(io::Error::other("x")), false), EIO);
}

#[test]
fn info_request_parsing() {
    let mut d = Vec::new();
    d.extend_from_slice(&3u32.to_be_bytes());
    d.extend_from_slice(b"abc");
    d.extend_from_slice(&2u16.to_be_bytes());
    d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    d.extend_from_slice(&INFO_NAME.to_be_bytes());
    let (name, infos) = parse_info_request(&d).expect("valid");
    assert_eq!(name, b"abc");
    assert_eq!(infos, vec![INFO_BLOCK_SIZE, INFO_NAME]);
    assert!(parse_info_request(&d[..d.len() - 1]).is_none());
    let mut huge = u32::MAX.to_be_bytes().to_vec();
    huge.extend_from_slice(&[0, 0]);
    assert!(parse_info_request(&huge).is_none());
}

#[test]
fn exports_registry() {
    let exports = Exports::new();
    exports.add("a".into(), MemDisk::new(512, false)).expect("add");
    assert!(matches!(exports.add("a".into(), MemDisk::new(512, false)), Err(NbdError::DuplicateExport(_))));
    assert!(matches!(exports.add("x".repeat(5000), MemDisk::new(512, false)), Err(NbdError::ExportName(_))));
    exports.add("b".into(), MemDisk::new(512, false)).expect("add");
    assert_eq!(exports.names(), vec!["a".to_string(), "b".to_string()]);
    let held = exports.get("a").expect("present");
    assert!(exports.remove("a").is_some());
    assert!(held.is_closed());
    assert!(exports.get("a").is_none());
    assert!(exports.remove("a").is_none());
}

/// Client bytes of a valid handshake: fixed newstyle, no zeroes, structured replies
/// when asked, `NBD_OPT_GO` for `name`.
fn client_hello(name: &str, structured: bool) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes());
    if structured {
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&OPT_STRUCTURED_REPLY.to_be_bytes());
        b.extend_from_slice(&0u32.to_be_bytes());
    }
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&OPT_GO.to_be_bytes());
    b.extend_from_slice(&(4 + name.len() as u32 + 2).to_be_bytes());
    b.extend_from_slice(&(name.len() as u32).to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(&0u16.to_be_bytes());
    b
}

/// Runs a connection over an in-memory pipe with `input` as everything the client
/// sends; returns what the server sent. Bounded by a deadline so a hang fails.
fn run_bytes(exports: Arc<Exports>, input: Vec<u8>) -> Vec<u8> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async move {
        let (client, server) = tokio::io::duplex(64 << 10);
        let token = CancellationToken::new();
        let srv = tokio::spawn(serve_connection(server, exports, token.clone()));
        let (mut cr, mut cw) = tokio::io::split(client);
        let writer = tokio::spawn(async move {
            let _ = cw.write_all(&input).await;
            let _ = cw.shutdown().await;
            cw
        });
        let mut out = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), cr.read_to_end(&mut out)).await;
        assert!(read.is_ok(), "server did not close the connection in time");
        token.cancel();
        let _ = writer.await;
        let _ = srv.await;
        out
    })
}

#[test]
fn structured_read_and_errors_over_a_pipe() {
    let disk = MemDisk::new(8192, false);
    let exports = Arc::new(Exports::new());
    exports.add("d".into(), disk.clone()).expect("add");
    let mut input = client_hello("d", true);
    let mut w = header(&req(CMD_WRITE, 0, 0, 4));
    w[8..16].copy_from_slice(&1u64.to_be_bytes());
    input.extend_from_slice(&w);
    input.extend_from_slice(b"wxyz");
    input.extend_from_slice(&header(&Request { flags: 0, cmd: CMD_READ, cookie: 2, offset: 1, len: 2 }));
    input.extend_from_slice(&header(&Request { flags: 0, cmd: CMD_READ, cookie: 3, offset: 8192, len: 2 }));
    input.extend_from_slice(&header(&Request { flags: 0, cmd: CMD_DISC, cookie: 4, offset: 0, len: 0 }));
    let out = run_bytes(exports, input);
    assert_eq!(&disk.snapshot()[..4], b"wxyz");
    // Structured OFFSET_DATA chunk for cookie 2 carrying "xy".
    let mut chunk = Vec::new();
    chunk.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    chunk.extend_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
    chunk.extend_from_slice(&REPLY_TYPE_OFFSET_DATA.to_be_bytes());
    chunk.extend_from_slice(&2u64.to_be_bytes());
    chunk.extend_from_slice(&10u32.to_be_bytes());
    chunk.extend_from_slice(&1u64.to_be_bytes());
    chunk.extend_from_slice(b"xy");
    assert!(out.windows(chunk.len()).any(|w| w == chunk), "no data chunk in {out:x?}");
    let mut err = Vec::new();
    err.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    err.extend_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
    err.extend_from_slice(&REPLY_TYPE_ERROR.to_be_bytes());
    err.extend_from_slice(&3u64.to_be_bytes());
    err.extend_from_slice(&6u32.to_be_bytes());
    err.extend_from_slice(&EINVAL.to_be_bytes());
    assert!(out.windows(err.len()).any(|w| w == err), "no error chunk in {out:x?}");
}

#[test]
fn removed_export_gets_eshutdown() {
    let disk = MemDisk::new(4096, false);
    let exports = Arc::new(Exports::new());
    exports.add("d".into(), disk.clone()).expect("add");
    let held = exports.get("d").expect("present");
    exports.remove("d");
    // A session opened before the removal: run the transmission directly.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let out = rt.block_on(async move {
        let (client, server) = tokio::io::duplex(1 << 16);
        let (sr, sw) = tokio::io::split(server);
        let session = Session { export: held, structured: false, request_bytes: MAX_BYTES_IN_FLIGHT, _slot: None };
        let srv = tokio::spawn(transmission(BufReader::new(sr), sw, session, CancellationToken::new()));
        let (mut cr, mut cw) = tokio::io::split(client);
        let mut input = header(&req(CMD_WRITE, 0, 0, 4)).to_vec();
        input.extend_from_slice(b"abcd");
        input.extend_from_slice(&header(&req(CMD_DISC, 0, 0, 0)));
        cw.write_all(&input).await.expect("write");
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), cr.read_to_end(&mut out))
            .await
            .expect("closed in time")
            .expect("read");
        let _ = srv.await;
        out
    });
    let mut expect = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
    expect.extend_from_slice(&ESHUTDOWN.to_be_bytes());
    expect.extend_from_slice(&7u64.to_be_bytes());
    assert_eq!(out, expect);
    assert_eq!(disk.snapshot(), vec![0; 4096]);
}

/// Random, mostly well-formed request headers (valid magic, commands around the
/// known range, offsets near the end of the disk) with random payload bytes.
fn request_stream() -> impl Strategy<Value = Vec<u8>> {
    let one = (
        0u16..10,
        any::<u16>(),
        prop_oneof![0u64..5000, any::<u64>()],
        prop_oneof![0u32..5000, any::<u32>()],
        any::<bool>(),
    )
        .prop_map(|(cmd, flags, offset, len, good_magic)| {
            let mut h = header(&Request { flags: flags & 0x7, cmd, cookie: u64::from(cmd), offset, len });
            if !good_magic {
                h[3] ^= 0x5a;
            }
            let mut v = h.to_vec();
            if cmd == CMD_WRITE && len < 5000 {
                v.resize(v.len() + len as usize, 0xee);
            }
            v
        });
    proptest::collection::vec(one, 0..12).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn parser_never_panics(bytes in proptest::array::uniform28(any::<u8>()), size in any::<u64>(), ro in any::<bool>(), closed in any::<bool>()) {
        if let Ok(r) = parse_request(&bytes) {
            let p = plan(&r, size, ro, closed);
            // Whatever is accepted lies inside the disk.
            match p {
                Plan::Read { offset, len } | Plan::Write { offset, len, .. } | Plan::Trim { offset, len, .. } | Plan::Zeroes { offset, len, .. } => {
                    prop_assert!(offset.checked_add(u64::from(len)).is_some_and(|e| e <= size));
                    prop_assert!(!closed);
                }
                _ => {}
            }
        }
        let _ = parse_info_request(&bytes);
    }

    #[test]
    fn handshake_survives_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256), prefix in any::<bool>()) {
        let exports = Arc::new(Exports::new());
        exports.add("d".into(), MemDisk::new(4096, false)).expect("add");
        // Half the cases start with valid client flags and option magic so the
        // random part reaches the option parser.
        let mut input = Vec::new();
        if prefix {
            input.extend_from_slice(&1u32.to_be_bytes());
            input.extend_from_slice(&IHAVEOPT.to_be_bytes());
        }
        input.extend_from_slice(&bytes);
        run_bytes(exports, input);
    }

    #[test]
    fn transmission_survives_random_requests(stream in request_stream(), structured in any::<bool>(), ro in any::<bool>()) {
        let disk = MemDisk::new(4096, ro);
        let exports = Arc::new(Exports::new());
        exports.add("d".into(), disk.clone()).expect("add");
        let mut input = client_hello("d", structured);
        input.extend_from_slice(&stream);
        run_bytes(exports, input);
        if ro {
            prop_assert_eq!(disk.snapshot(), vec![0; 4096]);
        }
    }
}
