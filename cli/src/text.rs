//! Small text helpers shared by the subcommands' output.

use std::fmt::Write as _;

/// A value for a `key=value` token: as is when it is a plain word, else in
/// double quotes with `\`-escapes (so a line always splits on spaces).
pub fn word(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| !c.is_whitespace() && !c.is_control() && c != '"' && c != '\\');
    if plain {
        s.to_string()
    } else {
        format!("\"{}\"", s.escape_debug())
    }
}

/// Lower-case hex of `b`, at most `max` bytes of it (0 = all), with
/// `..(+N)` after a cut.
pub fn hex(b: &[u8], max: usize) -> String {
    let shown = if max == 0 { b.len() } else { b.len().min(max) };
    let mut s = String::with_capacity(shown * 2 + 12);
    for x in &b[..shown] {
        let _ = write!(s, "{x:02x}");
    }
    if shown < b.len() {
        let _ = write!(s, "..(+{})", b.len() - shown);
    }
    s
}

/// `2025-11-26T00:00:00.123456789Z` for nanoseconds since the Unix epoch.
pub fn utc(ns: u64) -> String {
    let secs = ns / 1_000_000_000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ns % 1_000_000_000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_quote_only_when_needed() {
        assert_eq!(word("layer1_weight"), "layer1_weight");
        assert_eq!(word("<module>"), "<module>");
        assert_eq!(word("3.11.7 (main)"), "\"3.11.7 (main)\"");
        assert_eq!(word(""), "\"\"");
        assert_eq!(word("a\"b"), "\"a\\\"b\"");
        assert_eq!(word("tab\there"), "\"tab\\there\"");
    }

    #[test]
    fn hex_cuts_with_a_count() {
        assert_eq!(hex(&[0, 0xab, 0xff], 0), "00abff");
        assert_eq!(hex(&[0, 0xab, 0xff], 2), "00ab..(+1)");
        assert_eq!(hex(&[], 4), "");
    }

    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(utc(0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(utc(1_764_115_200_000_000_000), "2025-11-26T00:00:00.000000000Z");
        assert_eq!(utc(951_782_400_000_000_001), "2000-02-29T00:00:00.000000001Z");
    }
}
