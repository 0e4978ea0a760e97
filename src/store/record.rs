//! An event as the log stores it, and the time it is stored at.

/// An event to append, already encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    /// Unique id (a UUID string).
    pub event_id: String,
    /// The type key.
    pub event_type: String,
    /// The schema version of `data`.
    pub event_version: i64,
    /// The event's fields as a JSON object.
    pub data: String,
    /// Correlation and causation ids and the like, as a JSON object.
    pub metadata: String,
    /// When the event happened (ISO 8601), if known.
    pub occurred_at: Option<String>,
}

/// The current UTC time, ISO 8601 with microseconds.
pub fn now_iso() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    iso_of(
        i64::try_from(now.as_secs()).unwrap_or(i64::MAX),
        now.subsec_micros(),
    )
}

/// A UTC time given in seconds (and microseconds) since 1970, ISO 8601.
pub fn iso_of(secs: i64, micros: u32) -> String {
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}+00:00",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
    )
}

/// A POSIX timestamp (`time.time()`) as `datetime.fromtimestamp(ts, timezone.utc).isoformat()`
/// writes it: the microseconds rounded half to even as CPython rounds them, and left out when
/// zero. None for what that datetime cannot hold (not finite, or outside the years 1-9999).
pub fn iso_of_timestamp(ts: f64) -> Option<String> {
    if !ts.is_finite() {
        return None;
    }
    // CPython's _PyTime_DoubleToDenominator: split, scale, round half even, carry.
    let mut secs = ts.trunc();
    let mut micros = ((ts - secs) * 1e6).round_ties_even();
    if micros >= 1e6 {
        micros -= 1e6;
        secs += 1.0;
    } else if micros < 0.0 {
        micros += 1e6;
        secs -= 1.0;
    }
    // Years 1..=9999 (0001-01-01 and 10000-01-01 in seconds since 1970).
    if !(-62_135_596_800.0..253_402_300_800.0).contains(&secs) {
        return None;
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let (secs, micros) = (secs as i64, micros as u32);
    let mut out = iso_of(secs, micros);
    if micros == 0 {
        out.replace_range(19..26, ""); // ".000000"
    }
    Some(out)
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (Howard Hinnant's method).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_dates_are_right() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert!(now_iso().ends_with("+00:00"));
        assert_eq!(iso_of(86_400 + 61, 5), "1970-01-02T00:01:01.000005+00:00");
    }

    #[test]
    fn timestamps_round_and_print_as_python_does() {
        // Values checked against datetime.fromtimestamp(ts, timezone.utc).isoformat().
        let cases = [
            (0.0, "1970-01-01T00:00:00+00:00"),
            (1.5, "1970-01-01T00:00:01.500000+00:00"),
            (1_733_400_000.123_456, "2024-12-05T12:00:00.123456+00:00"),
            (0.000_000_5, "1970-01-01T00:00:00+00:00"), // half: to even (0)
            (0.000_001_5, "1970-01-01T00:00:00.000002+00:00"), // half: to even (2)
            (-0.5, "1969-12-31T23:59:59.500000+00:00"),
            (1.999_999_9, "1970-01-01T00:00:02+00:00"), // rounds up into the next second
        ];
        for (ts, want) in cases {
            assert_eq!(iso_of_timestamp(ts).as_deref(), Some(want), "{ts}");
        }
        assert_eq!(iso_of_timestamp(f64::NAN), None);
        assert_eq!(iso_of_timestamp(1e12), None); // year 33658
        assert_eq!(iso_of_timestamp(-7e10), None); // before year 1
    }
}
