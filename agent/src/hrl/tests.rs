//! Round trips, torn tails, corruption and coalescing of HRL logs (with property tests).

use super::*;
use proptest::prelude::*;
use std::fs::OpenOptions;
use std::io::Cursor;

fn disk() -> DiskId {
    DiskId::new("disk-0").expect("valid id")
}

/// Ops as (kind, offset, length, fill byte) on a small disk.
type Op = (RecordKind, u64, u64, u8);

fn write_log(dir: &Path, seq: u64, ops: &[Op], seal: bool) -> PathBuf {
    let mut w = HrlWriter::create(dir, &disk(), LogSeq(seq)).expect("create");
    for &(kind, off, len, fill) in ops {
        let data = if kind == RecordKind::Write { vec![fill; len as usize] } else { Vec::new() };
        let rec = EncodedRecord::new(kind, 0, off, len, &data).expect("encode");
        w.append(&rec, &data).expect("append");
    }
    let path = w.path().to_owned();
    if seal {
        w.seal().expect("seal");
    }
    path
}

fn apply_in_order(size: usize, ops: &[Op]) -> Vec<u8> {
    let mut img = vec![0u8; size];
    for &(kind, off, len, fill) in ops {
        let v = if kind == RecordKind::Write { fill } else { 0 };
        img[off as usize..(off + len) as usize].fill(v);
    }
    img
}

fn apply_coalesced<R: Read + Seek>(size: usize, c: &mut Coalesced<R>) -> Vec<u8> {
    let mut img = vec![0u8; size];
    let mut last_end = 0;
    for item in c.items() {
        let (off, len, bytes) = match item.expect("item") {
            CoalescedItem::Write { offset, data } => (offset, data.len() as u64, Some(data)),
            CoalescedItem::Zeroes { offset, len } | CoalescedItem::Trim { offset, len } => (offset, len, None),
        };
        assert!(off >= last_end, "extents must ascend without overlap");
        last_end = off + len;
        match bytes {
            Some(d) => img[off as usize..last_end as usize].copy_from_slice(&d),
            None => img[off as usize..last_end as usize].fill(0),
        }
    }
    img
}

#[test]
fn round_trip_and_seal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ops = [(RecordKind::Write, 0, 4096, 1), (RecordKind::Zeroes, 100, 10, 0), (RecordKind::Trim, 8192, 512, 0)];
    let path = write_log(dir.path(), 7, &ops, true);
    assert_eq!(path.file_name().and_then(|n| n.to_str()), Some("disk-0.0000000000000007.hrl"));
    let footer = verify_sealed(&path).expect("verify");
    assert_eq!(footer.record_count, 3);
    assert_eq!(footer.data_bytes, 4096);
    let mut r = HrlReader::open(&path).expect("open");
    assert_eq!(r.header().seq, LogSeq(7));
    let mut data = Vec::new();
    let rec = r.next_record(&mut data).expect("rec").expect("some");
    assert_eq!((rec.kind, rec.offset, rec.length), (RecordKind::Write, 0, 4096));
    assert!(data.iter().all(|&b| b == 1));
    assert_eq!(parse_log_file_name(&disk(), "disk-0.0000000000000007.hrl"), Some(LogSeq(7)));
    assert_eq!(parse_log_file_name(&disk(), "disk-00.0000000000000007.hrl"), None);
}

#[test]
fn open_log_is_not_sealed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_log(dir.path(), 1, &[(RecordKind::Write, 0, 10, 3)], false);
    assert!(matches!(verify_sealed(&path), Err(HrlError::NotSealed { .. })));
    let s = scan(&path).expect("scan");
    assert!(matches!(s.end, ScanEnd::Open));
    assert_eq!(s.record_count, 1);
}

#[test]
fn chopped_mid_record_is_truncated_to_last_whole_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ops = [(RecordKind::Write, 0, 1000, 1), (RecordKind::Write, 500, 1000, 2), (RecordKind::Write, 0, 3000, 3)];
    let path = write_log(dir.path(), 1, &ops, false);
    let full = std::fs::metadata(&path).expect("meta").len();
    let two = (FILE_HEADER_LEN + 2 * RECORD_HEADER_LEN + 2000) as u64;
    for cut in [two + 1, two + 20, two + RECORD_HEADER_LEN as u64 + 7, full - 1] {
        let f = OpenOptions::new().write(true).open(&path).expect("open");
        f.set_len(cut).expect("chop");
        let s = scan(&path).expect("scan");
        assert!(matches!(s.end, ScanEnd::Torn(HrlError::Truncated { .. })), "cut {cut}: {:?}", s.end);
        assert_eq!(truncate_torn_tail(&path).expect("truncate"), two);
        assert_eq!(std::fs::metadata(&path).expect("meta").len(), two);
        let s = scan(&path).expect("scan");
        assert!(matches!(s.end, ScanEnd::Open));
        assert_eq!(s.record_count, 2);
        // Appending after recovery continues the chain: the sealed log verifies.
        let mut w = HrlWriter::open_append(&path).expect("reopen");
        let data = vec![3u8; 3000];
        w.append(&EncodedRecord::new(RecordKind::Write, 0, 0, 3000, &data).expect("enc"), &data).expect("append");
        w.seal().expect("seal");
        assert_eq!(verify_sealed(&path).expect("verify").record_count, 3);
        // Unseal again for the next cut.
        let f = OpenOptions::new().write(true).open(&path).expect("open");
        f.set_len(full).expect("unseal");
    }
}

#[test]
fn corrupt_data_byte_is_detected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_log(dir.path(), 1, &[(RecordKind::Write, 0, 100, 1), (RecordKind::Write, 0, 100, 2)], true);
    let mut bytes = std::fs::read(&path).expect("read");
    let second = FILE_HEADER_LEN + RECORD_HEADER_LEN + 100;
    bytes[second + RECORD_HEADER_LEN + 5] ^= 0x40;
    std::fs::write(&path, &bytes).expect("write");
    match verify_sealed(&path) {
        Err(HrlError::ChecksumMismatch { at, .. }) => assert_eq!(at, second as u64),
        other => panic!("expected checksum mismatch, got {other:?}"),
    }
    assert_eq!(truncate_torn_tail(&path).expect("truncate"), second as u64);
}

#[test]
fn coalesce_keeps_last_version() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut ops: Vec<Op> = (0..100).map(|i| (RecordKind::Write, 4096, 4096, i as u8)).collect();
    ops.push((RecordKind::Write, 0, 6000, 200));
    ops.push((RecordKind::Zeroes, 5000, 100, 0));
    let path = write_log(dir.path(), 1, &ops, true);
    let mut c = Coalesced::open(&path).expect("coalesce");
    let ex: Vec<(u64, u64, RecordKind)> = c.extents().iter().map(|e| (e.offset, e.len, e.kind)).collect();
    assert_eq!(
        ex,
        vec![
            (0, 5000, RecordKind::Write),
            (5000, 100, RecordKind::Zeroes),
            (5100, 900, RecordKind::Write),
            (6000, 2192, RecordKind::Write)
        ]
    );
    assert_eq!(c.write_bytes(), 5000 + 900 + 2192);
    assert_eq!(apply_coalesced(16384, &mut c), apply_in_order(16384, &ops));
}

fn op_strategy(size: u64) -> impl Strategy<Value = Op> {
    (0..3u8, 0..size, 1..=size / 4, any::<u8>()).prop_map(move |(k, off, len, fill)| {
        let kind = RecordKind::from_u8(k + 1).unwrap_or(RecordKind::Write);
        let len = len.min(size - off).max(1);
        let off = off.min(size - len);
        (kind, off, len, fill)
    })
}

fn log_bytes(ops: &[Op], seal: bool) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_log(dir.path(), 3, ops, seal);
    std::fs::read(path).expect("read")
}

/// Drives every decoder over `bytes`; they must return, never panic.
fn decode_all(bytes: &[u8]) -> Result<LogScan, HrlError> {
    let _ = Coalesced::new(Cursor::new(bytes.to_vec()));
    let mut r = HrlReader::new(bytes)?;
    scan_reader(&mut r)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, .. ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = decode_all(&bytes);
        let mut with_header = log_bytes(&[], false);
        with_header.extend_from_slice(&bytes);
        let _ = decode_all(&with_header);
    }

    #[test]
    fn corruption_is_detected(
        ops in proptest::collection::vec(op_strategy(8192), 1..20),
        seal in any::<bool>(),
        pos in any::<proptest::sample::Index>(),
        xor in 1..=255u8,
    ) {
        let good = log_bytes(&ops, seal);
        let mut bad = good.clone();
        let i = pos.index(bad.len());
        bad[i] ^= xor;
        match decode_all(&bad) {
            // A damaged header: the log is refused outright.
            Err(_) => prop_assert!(i < FILE_HEADER_LEN),
            Ok(s) => {
                // The damage ends the valid part at or before the damaged byte, and
                // it is never taken for a clean end.
                prop_assert!(matches!(s.end, ScanEnd::Torn(_)), "undetected flip at {} ({:?})", i, s.end);
                prop_assert!(s.valid_len <= i as u64);
            }
        }
        // Truncation anywhere (other than at a record boundary of an open log) is
        // detected too.
        let cut = pos.index(good.len());
        if let Ok(s) = decode_all(&good[..cut]) {
            prop_assert!(s.valid_len <= cut as u64);
            prop_assert!(!matches!(s.end, ScanEnd::Sealed(_)));
        }
    }

    #[test]
    fn coalesced_equals_in_order(ops in proptest::collection::vec(op_strategy(8192), 0..40)) {
        let bytes = log_bytes(&ops, true);
        let mut c = Coalesced::new(Cursor::new(bytes)).expect("coalesce");
        prop_assert_eq!(apply_coalesced(8192, &mut c), apply_in_order(8192, &ops));
    }
}
