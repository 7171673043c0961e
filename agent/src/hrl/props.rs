//! Property tests of the HRL reader that `tests.rs` does not hold: records read back
//! exactly as written, bytes appended after a log are never taken for records, and a
//! record claiming more than [`MAX_RECORD_DATA`] is refused before that much is read or
//! allocated (the random-bytes, flip and cut properties are in `tests.rs`).

use std::io::Cursor;

use proptest::prelude::*;

use super::*;
use crate::testkit::tmpdir;

/// A record to write: kind, offset, length, flags, fill byte.
type Rec = (RecordKind, u64, u64, u8, u8);

fn rec_strategy() -> impl Strategy<Value = Rec> {
    (
        prop::sample::select(vec![RecordKind::Write, RecordKind::Zeroes, RecordKind::Trim]),
        prop_oneof![0..1u64 << 20, (u64::MAX >> 1)..u64::MAX - 8192],
        1..4096u64,
        prop::sample::select(vec![0, FLAG_FUA]),
        any::<u8>(),
    )
}

/// The log of `recs` as bytes.
fn log(recs: &[Rec], seal: bool) -> Vec<u8> {
    let dir = tmpdir();
    let mut w = HrlWriter::create(dir.path(), &DiskId::new("disk-0").expect("id"), LogSeq(5)).expect("create");
    for &(kind, off, len, flags, fill) in recs {
        let data = if kind == RecordKind::Write { vec![fill; len as usize] } else { Vec::new() };
        w.append(&EncodedRecord::new(kind, flags, off, len, &data).expect("encode"), &data).expect("append");
    }
    let path = w.path().to_owned();
    if seal {
        w.seal().expect("seal");
    }
    std::fs::read(path).expect("read log")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn records_read_back_as_written(recs in prop::collection::vec(rec_strategy(), 0..12), seal in any::<bool>()) {
        let bytes = log(&recs, seal);
        let mut r = HrlReader::new(&bytes[..]).expect("header");
        prop_assert_eq!(r.header().seq, LogSeq(5));
        let mut data = Vec::new();
        for &(kind, off, len, flags, fill) in &recs {
            let got = r.next_record(&mut data).expect("record").expect("not the end");
            prop_assert_eq!((got.kind, got.offset, got.length, got.flags), (kind, off, len, flags));
            let want = if kind == RecordKind::Write { vec![fill; len as usize] } else { Vec::new() };
            prop_assert!(data == want);
        }
        prop_assert!(r.next_record(&mut data).expect("end").is_none());
        prop_assert_eq!(r.footer().is_some(), seal);
        prop_assert_eq!(r.valid_len(), bytes.len() as u64);
    }

    #[test]
    fn appended_bytes_are_never_records(
        recs in prop::collection::vec(rec_strategy(), 0..6),
        seal in any::<bool>(),
        tail in prop::collection::vec(any::<u8>(), 1..64),
    ) {
        let good = log(&recs, seal);
        let mut bad = good.clone();
        bad.extend_from_slice(&tail);
        let mut r = HrlReader::new(&bad[..]).expect("header");
        let s = scan_reader(&mut r).expect("scan");
        prop_assert!(matches!(s.end, ScanEnd::Torn(_)), "{:?}", s.end);
        prop_assert!(s.valid_len <= good.len() as u64);
        prop_assert_eq!(s.record_count, recs.len() as u64);
        if seal {
            prop_assert!(matches!(s.end, ScanEnd::Torn(HrlError::TrailingData { .. })), "{:?}", s.end);
            prop_assert!(Coalesced::new(Cursor::new(bad)).is_err());
        }
    }

    #[test]
    fn a_record_over_the_limit_is_refused(len in MAX_RECORD_DATA + 1..=u64::MAX >> 1, seal in any::<bool>()) {
        let mut b = log(&[(RecordKind::Write, 0, 16, 0, 1)], seal);
        // The record's length field claims `len`; 16 bytes of data follow.
        b[FILE_HEADER_LEN + 16..FILE_HEADER_LEN + 24].copy_from_slice(&len.to_le_bytes());
        let mut r = HrlReader::new(&b[..]).expect("header");
        let got = r.next_record(&mut Vec::new());
        prop_assert!(matches!(got, Err(HrlError::RecordTooLarge { len: l, .. }) if l == len), "{:?}", got);
        prop_assert!(Coalesced::new(Cursor::new(b)).is_err());
    }
}
