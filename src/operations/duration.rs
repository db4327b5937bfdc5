//! ISO-8601 durations of fixed length (`PT4H`, `P2D`, `P1W`, `P1DT12H30M`), as the operations API
//! takes them for "stuck for longer than".
//!
//! Exactly the strings [`PATTERN`] matches are accepted (the OpenAPI document publishes it, and
//! clients generated from it must not be refused): weeks, days, hours, minutes and seconds, each
//! at most once and in that order, with at most 3, 4, 5, 6 and 8 digits, so that no duration
//! exceeds 63 years and date arithmetic cannot overflow. Years and months are refused (they have
//! no fixed length). `P` and `PT` alone mean zero.

/// The accepted durations, as a JSON Schema (ECMA-262) pattern.
pub const PATTERN: &str =
    "^P([0-9]{1,3}W)?([0-9]{1,4}D)?(T([0-9]{1,5}H)?([0-9]{1,6}M)?([0-9]{1,8}S)?)?$";

/// Parses a duration matching [`PATTERN`].
pub fn parse_iso8601(text: &str) -> Result<chrono::Duration, String> {
    let invalid = || {
        if text.contains('Y')
            || text
                .split('T')
                .next()
                .is_some_and(|date| date.contains('M'))
        {
            format!("{text:?}: years and months have no fixed length; use weeks or days")
        } else {
            format!(
                "{text:?} is not a duration such as PT4H, P2D or P1DT12H (at most 999 weeks, 9999 days, 99999 hours, 999999 minutes, 99999999 seconds)"
            )
        }
    };
    let rest = text.strip_prefix('P').ok_or_else(invalid)?;
    let (date, time) = match rest.split_once('T') {
        Some((date, time)) => (date, Some(time)),
        None => (rest, None),
    };
    let mut seconds: i64 = 0;
    let mut add = |part: &str, units: &[(u8, usize, i64)]| -> Result<(), String> {
        let mut allowed = units.iter();
        let mut bytes = part.as_bytes();
        while !bytes.is_empty() {
            let digits = bytes.iter().take_while(|b| b.is_ascii_digit()).count();
            let Some(&unit) = bytes.get(digits) else {
                return Err(invalid());
            };
            // Units come in order, each at most once, with at most so many digits.
            let (_, max_digits, factor) = allowed
                .by_ref()
                .find(|(u, _, _)| *u == unit)
                .ok_or_else(invalid)?;
            if digits == 0 || digits > *max_digits {
                return Err(invalid());
            }
            let value: i64 = std::str::from_utf8(&bytes[..digits])
                .ok()
                .and_then(|d| d.parse().ok())
                .ok_or_else(invalid)?;
            seconds += value * factor;
            bytes = &bytes[digits + 1..];
        }
        Ok(())
    };
    add(date, &[(b'W', 3, 7 * 86_400), (b'D', 4, 86_400)])?;
    if let Some(time) = time {
        add(time, &[(b'H', 5, 3_600), (b'M', 6, 60), (b'S', 8, 1)])?;
    }
    chrono::Duration::try_seconds(seconds).ok_or_else(invalid)
}

#[cfg(test)]
mod tests {
    use super::parse_iso8601;

    #[test]
    fn fixed_length_durations_parse() {
        let seconds = |text| parse_iso8601(text).map(|d| d.num_seconds());
        assert_eq!(seconds("PT4H"), Ok(4 * 3600));
        assert_eq!(seconds("P2D"), Ok(2 * 86_400));
        assert_eq!(seconds("P1W"), Ok(7 * 86_400));
        assert_eq!(
            seconds("P1DT12H30M15S"),
            Ok(86_400 + 12 * 3600 + 30 * 60 + 15)
        );
        assert_eq!(seconds("PT90M"), Ok(90 * 60));
        assert_eq!(seconds("P"), Ok(0));
        assert_eq!(seconds("PT"), Ok(0));
        assert_eq!(
            seconds("P999W9999DT99999H999999M99999999S").map(|s| s / 86_400 / 365),
            Ok(63),
            "the longest is about 63 years"
        );
    }

    #[test]
    fn anything_else_is_refused_with_a_reason() {
        for bad in [
            "",
            "4H",
            "P1H",
            "PT1D",
            "P1Y",
            "P1M",
            "PT1H1H",
            "P-1D",
            "PT1.5H",
            "P1D1W",
            "PTT",
            "P１D",
            "P1000W",
            "PT123456789S",
            "PT9223372036854776S",
            "P99999999999999999999D",
        ] {
            assert!(parse_iso8601(bad).is_err(), "{bad}");
        }
        assert!(parse_iso8601("P1Y").unwrap_err().contains("fixed length"));
    }

    /// The parser and the published pattern accept exactly the same strings: whatever the
    /// pattern generates is accepted, and on arbitrary strings the two agree.
    #[test]
    fn the_parser_accepts_exactly_what_the_published_pattern_matches() {
        use proptest::prelude::*;
        let pattern = regex::Regex::new(super::PATTERN).unwrap();
        let unanchored = super::PATTERN.trim_start_matches('^').trim_end_matches('$');
        proptest!(|(text in proptest::string::string_regex(unanchored).unwrap())| {
            prop_assert!(parse_iso8601(&text).is_ok(), "{}", text);
        });
        proptest!(|(text in "P([0-9]{0,9}[WDHMSTY1.]){0,6}")| {
            prop_assert_eq!(parse_iso8601(&text).is_ok(), pattern.is_match(&text), "{}", text);
        });
    }
}
