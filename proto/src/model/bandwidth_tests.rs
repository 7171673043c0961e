use super::*;

fn spec(s: &str) -> BandwidthSpec {
    s.parse().expect("a valid spec")
}

fn err(s: &str) -> BandwidthError {
    s.parse::<BandwidthSpec>().expect_err("refused")
}

const H: u32 = 3600;

#[test]
fn business_hours_and_the_rest_of_the_day() {
    let s = spec("08:00-18:00=50M,*=0");
    assert_eq!(s.windows, vec![(Window { start: 8 * H, end: 18 * H }, 50 << 20)]);
    assert_eq!(s.otherwise, 0);
    assert_eq!(s.rate_at(8 * H - 1), 0);
    assert_eq!(s.rate_at(8 * H), 50 << 20);
    assert_eq!(s.rate_at(18 * H - 1), 50 << 20);
    assert_eq!(s.rate_at(18 * H), 0);
    assert!(!s.is_unlimited());
}

#[test]
fn a_bare_rate_is_the_whole_day_and_zero_is_unlimited() {
    assert_eq!(spec("20M"), BandwidthSpec { windows: vec![], otherwise: 20 << 20 });
    assert_eq!(spec("*=1048576").otherwise, 1 << 20);
    assert!(spec("0").is_unlimited());
    assert!(spec("*=0").is_unlimited());
    assert!(BandwidthSpec::unlimited().is_unlimited());
    // Without `*` the rest of the day is unlimited.
    assert_eq!(spec("01:00-02:00=1M").rate_at(0), 0);
}

#[test]
fn windows_wrap_past_midnight_and_24_00_ends_the_day() {
    let s = spec("22:00-06:00=10M, 12:00-22:00 = 1M ,*=5M");
    assert_eq!(s.rate_at(23 * H), 10 << 20);
    assert_eq!(s.rate_at(0), 10 << 20);
    assert_eq!(s.rate_at(6 * H - 1), 10 << 20);
    assert_eq!(s.rate_at(6 * H), 5 << 20);
    assert_eq!(s.rate_at(13 * H), 1 << 20);
    assert_eq!(s.rate_at(22 * H - 1), 1 << 20);
    assert_eq!(spec("12:00-24:00=1M").rate_at(DAY_SECS - 1), 1 << 20);
    assert_eq!(s.rate_at(DAY_SECS + 1), 10 << 20, "seconds past a day wrap");
}

#[test]
fn display_round_trips() {
    for s in ["08:00-18:00=50M,*=0", "22:00-06:00=10M,12:30-22:00=1000,*=5G", "12:00-24:00=3K", "*=7", "0"] {
        let a = spec(s);
        assert_eq!(spec(&a.to_string()), a, "{s} -> {a}");
    }
    assert_eq!(spec("08:00-18:00=52428800").to_string(), "08:00-18:00=50M,*=0");
    assert_eq!(human_rate(0), "unlimited");
    assert_eq!(human_rate(20 << 20), "20.0 MiB/s");
}

#[test]
fn serde_as_the_same_text() {
    let s: BandwidthSpec = serde_json::from_str("\"08:00-18:00=50M\"").expect("json");
    assert_eq!(s, spec("08:00-18:00=50M"));
    assert_eq!(serde_json::to_string(&s).expect("json"), "\"08:00-18:00=50M,*=0\"");
    let e = serde_json::from_str::<BandwidthSpec>("\"08:00-25:00=1M\"").expect_err("refused");
    assert!(e.to_string().contains("not a time of day"), "{e}");
}

#[test]
fn every_malformed_class_is_refused_with_its_rule() {
    assert_eq!(err(""), BandwidthError::Empty);
    assert_eq!(err("  "), BandwidthError::Empty);
    assert_eq!(err("08:00-18:00=50M,,*=0"), BandwidthError::EmptyEntry("08:00-18:00=50M,,*=0".into()));
    assert_eq!(err("*=0,"), BandwidthError::EmptyEntry("*=0,".into()));
    assert_eq!(err("08:00-18:00"), BandwidthError::MissingRate("08:00-18:00".into()));
    assert_eq!(err("08:00-18:00=1M,5M"), BandwidthError::MissingRate("5M".into()));
    assert_eq!(err("08:00=1M"), BandwidthError::NotAWindow("08:00".into()));
    assert_eq!(err("8:00-18:00=1M"), BandwidthError::NotATime("8:00".into()));
    assert_eq!(err("08:00-18:0=1M"), BandwidthError::NotATime("18:0".into()));
    assert_eq!(err("08:00-25:00=1M"), BandwidthError::NotATime("25:00".into()));
    assert_eq!(err("08:60-18:00=1M"), BandwidthError::NotATime("08:60".into()));
    assert_eq!(err("24:00-06:00=1M"), BandwidthError::NotATime("24:00".into()), "24:00 only ends a window");
    assert_eq!(err("0800-1800=1M"), BandwidthError::NotATime("0800".into()));
    assert_eq!(err("+8:00-18:00=1M"), BandwidthError::NotATime("+8:00".into()));
    assert_eq!(err("08:00-08:00=1M"), BandwidthError::EmptyWindow("08:00-08:00".into()));
    assert_eq!(err("00:00-24:00=1M"), BandwidthError::EmptyWindow("00:00-24:00".into()));
    assert!(
        matches!(err("08:00-18:00=fast"), BandwidthError::Rate(e, UnitError::NotASize(_)) if e == "08:00-18:00=fast")
    );
    assert!(matches!(err("*=10X"), BandwidthError::Rate(_, UnitError::SizeSuffix { .. })));
    assert!(matches!(err("*=-1M"), BandwidthError::Rate(_, UnitError::NotASize(_))));
    assert!(matches!(err("*="), BandwidthError::Rate(_, UnitError::NotASize(_))));
    assert!(matches!(err("*=16777216T"), BandwidthError::Rate(_, UnitError::TooLarge(_))));
    assert_eq!(err("*=1M,*=2M"), BandwidthError::DuplicateDefault);
    assert_eq!(err("*=1M,2M"), BandwidthError::MissingRate("2M".into()));
    assert_eq!(
        err("08:00-18:00=1M,17:00-19:00=2M"),
        BandwidthError::Overlap("08:00-18:00".into(), "17:00-19:00".into())
    );
    assert_eq!(
        err("22:00-06:00=1M,05:00-07:00=2M"),
        BandwidthError::Overlap("22:00-06:00".into(), "05:00-07:00".into())
    );
    assert_eq!(
        err("22:00-06:00=1M,23:00-01:00=2M"),
        BandwidthError::Overlap("22:00-06:00".into(), "23:00-01:00".into())
    );
    // Touching windows do not overlap.
    assert_eq!(spec("08:00-12:00=1M,12:00-18:00=2M").rate_at(12 * H), 2 << 20);
    assert_eq!(err("08:00-18:00=1M,17:00-19:00=2M").to_string(), "windows 08:00-18:00 and 17:00-19:00 overlap");
    assert_eq!(
        err("08:00-25:00=1M").to_string(),
        "\"25:00\" is not a time of day (HH:MM, 00:00 to 23:59, or 24:00 to end a window)"
    );
}
