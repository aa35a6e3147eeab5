//! Values of command-line flags, parsed the same way wherever they are taken.
use std::time::Duration;

/// `15s`, `500ms`, `2m`, or plain seconds; between 1ms and 10m.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = parse_span(s)?;
    if d.is_zero() || d > Duration::from_secs(600) {
        return Err(format!("{s:?}: give a duration between 1ms and 10m"));
    }
    Ok(d)
}

/// As [`parse_duration`], and 0 too (no wait at all).
pub fn parse_wait(s: &str) -> Result<Duration, String> {
    let d = parse_span(s)?;
    if d > Duration::from_secs(600) {
        return Err(format!("{s:?}: give a duration between 0 and 10m"));
    }
    Ok(d)
}

fn parse_span(s: &str) -> Result<Duration, String> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map(|i| s.split_at(i))
        .unwrap_or((s, "s"));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 15s, 500ms, 2m)"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        // Checked: a huge count of minutes must be an error, not an overflow.
        "m" => n
            .checked_mul(60)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("{s:?} is too long"))?,
        _ => return Err(format!("{s:?} is not a duration (e.g. 15s, 500ms, 2m)")),
    };
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_units_and_bounds() {
        assert_eq!(parse_duration("15s"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("0").is_err(), "a timeout of 0 is refused");
        assert!(parse_duration("11m").is_err());
        assert!(parse_duration("5h").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("").is_err());
        assert!(
            parse_duration(&format!("{}m", u64::MAX)).is_err(),
            "no overflow"
        );
    }

    #[test]
    fn a_wait_may_be_zero() {
        assert_eq!(parse_wait("0"), Ok(Duration::ZERO));
        assert_eq!(parse_wait("0ms"), Ok(Duration::ZERO));
        assert_eq!(parse_wait("5s"), Ok(Duration::from_secs(5)));
        assert!(parse_wait("11m").is_err());
    }
}
