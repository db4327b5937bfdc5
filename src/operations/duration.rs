//! ISO-8601 durations of fixed length (`PT4H`, `P2D`, `P1W`, `P1DT12H30M`), as the operations API
//! takes them for "stuck for longer than".

/// The longest duration accepted: 100 years of 365.25 days. Longer ones would overflow date
/// arithmetic ("stuck for longer than" is subtracted from now).
const MAX_SECONDS: i64 = 3_155_760_000;

/// Parses a duration; years and months are refused (they have no fixed length), and so is
/// anything longer than 100 years.
pub fn parse_iso8601(text: &str) -> Result<chrono::Duration, String> {
    let invalid = || format!("{text:?} is not an ISO-8601 duration such as PT4H, P2D or P1DT12H");
    let rest = text.strip_prefix('P').ok_or_else(invalid)?;
    let (date, time) = match rest.split_once('T') {
        Some((date, time)) if !time.is_empty() => (date, Some(time)),
        Some(_) => return Err(invalid()),
        None => (rest, None),
    };
    if date.is_empty() && time.is_none() {
        return Err(invalid());
    }
    let mut seconds: i64 = 0;
    let mut add = |part: &str, units: &[(char, i64)]| -> Result<(), String> {
        let mut number = String::new();
        let mut allowed = units.iter();
        for c in part.chars() {
            if c.is_ascii_digit() {
                number.push(c);
                continue;
            }
            let value: i64 = number.parse().map_err(|_| invalid())?;
            number.clear();
            // Units must come in order, each at most once.
            let (_, factor) = allowed
                .by_ref()
                .find(|(unit, _)| *unit == c)
                .ok_or_else(|| {
                    if c == 'Y' || (c == 'M' && units[0].0 == 'W') {
                        format!(
                            "{text:?}: years and months have no fixed length; use weeks or days"
                        )
                    } else {
                        invalid()
                    }
                })?;
            seconds = value
                .checked_mul(*factor)
                .and_then(|s| s.checked_add(seconds))
                .ok_or_else(invalid)?;
        }
        if number.is_empty() {
            Ok(())
        } else {
            Err(invalid())
        }
    };
    add(date, &[('W', 7 * 86_400), ('D', 86_400)])?;
    if let Some(time) = time {
        add(time, &[('H', 3_600), ('M', 60), ('S', 1)])?;
    }
    if seconds > MAX_SECONDS {
        return Err(format!("{text:?} is longer than 100 years"));
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
    }

    #[test]
    fn anything_else_is_refused_with_a_reason() {
        for bad in [
            "", "P", "PT", "4H", "P1H", "PT1D", "P1Y", "P1M", "PT1H1H", "P-1D", "PT1.5H", "P1DT",
        ] {
            assert!(parse_iso8601(bad).is_err(), "{bad}");
        }
        assert!(parse_iso8601("P1Y").unwrap_err().contains("fixed length"));
        for huge in ["PT9223372036854776S", "P99999999999999999999D", "P5300W"] {
            assert!(parse_iso8601(huge).is_err(), "{huge}");
        }
        assert_eq!(
            parse_iso8601("P5200W").map(|d| d.num_weeks()),
            Ok(5200),
            "a hundred years is fine"
        );
    }
}
