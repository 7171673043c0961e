//! Property tests of the vault key file's decoder ([`VaultKeyFile::parse`] and
//! [`VaultKeyFile::read`]): signed files round-trip; arbitrary text and damaged files
//! (a flipped byte, cut short, extended) are refused as tampered or read back with the
//! signed content unchanged, never a panic; text over the size limit is refused.

use std::sync::OnceLock;

use proptest::prelude::*;

use super::*;

/// One CA for every case (making a key pair per case would dominate the run).
fn ca() -> &'static VaultCa {
    static CA: OnceLock<VaultCa> = OnceLock::new();
    CA.get_or_init(|| VaultCa::create(VaultId::generate(), "contoso").expect("ca"))
}

fn file_strategy() -> impl Strategy<Value = VaultKeyFile> {
    ("\\PC{0,16}", "[a-z0-9.:-]{1,24}", "[0-9a-f]{0,64}", any::<i64>())
        .prop_map(|(name, addr, secret, exp)| VaultKeyFile::new(ca(), &name, &addr, &secret, exp).expect("file"))
}

#[derive(Debug, Clone)]
enum Damage {
    Flip(prop::sample::Index, u8),
    Cut(prop::sample::Index),
    Extend(String),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        (any::<prop::sample::Index>(), 1..=127u8).prop_map(|(i, x)| Damage::Flip(i, x)),
        any::<prop::sample::Index>().prop_map(Damage::Cut),
        "\\PC{1,16}".prop_map(Damage::Extend),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn signed_files_round_trip(f in file_strategy(), pretty in any::<bool>()) {
        let text = if pretty { serde_json::to_string_pretty(&f) } else { serde_json::to_string(&f) }.expect("json");
        prop_assert_eq!(VaultKeyFile::parse(&text).expect("parse"), f);
    }

    #[test]
    fn arbitrary_text_is_refused(text in "\\PC{0,256}", object in any::<bool>()) {
        let text = if object { format!("{{{text}}}") } else { text };
        let r = VaultKeyFile::parse(&text);
        prop_assert!(matches!(r, Err(CertError::Tampered(_))), "{:?}", r);
    }

    #[test]
    fn a_damaged_file_is_refused_or_reads_the_signed_content(f in file_strategy(), d in damage()) {
        let text = serde_json::to_string_pretty(&f).expect("json");
        let mut b = text.into_bytes();
        match &d {
            // ASCII flips of ASCII bytes keep the text UTF-8 (the file is read as text).
            Damage::Flip(i, x) => {
                let i = i.index(b.len());
                if b[i].is_ascii() {
                    b[i] ^= x;
                }
            }
            Damage::Cut(i) => {
                let i = i.index(b.len());
                b.truncate(i);
            }
            Damage::Extend(tail) => b.extend_from_slice(tail.as_bytes()),
        }
        let Ok(bad) = String::from_utf8(b) else { return Ok(()) };
        match VaultKeyFile::parse(&bad) {
            // Whitespace, a letter's case in the hex signature, JSON after the object is
            // refused by serde: what parses carries exactly the signed content.
            Ok(g) => prop_assert_eq!(g.content, f.content),
            Err(CertError::Tampered(_)) => {}
            Err(e) => prop_assert!(false, "{e:?}"),
        }
    }
}

#[test]
fn text_over_the_limit_is_refused() {
    let f = VaultKeyFile::new(ca(), "c", "127.0.0.1:1", "s", 1).expect("file");
    // A valid file padded with whitespace past the limit (valid JSON, refused by size).
    let mut text = serde_json::to_string(&f).expect("json");
    text.push_str(&" ".repeat(MAX_LEN as usize));
    assert!(matches!(VaultKeyFile::parse(&text), Err(CertError::Tampered(_))));
    assert!(VaultKeyFile::parse(text.trim_end()).is_ok());
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path().join("vault.key");
    std::fs::write(&p, &text).expect("write");
    assert!(matches!(VaultKeyFile::read(&p), Err(CertError::Tampered(_))));
}
