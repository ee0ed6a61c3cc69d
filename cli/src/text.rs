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

/// One element of array-protocol dtype `dtype` (`<f4`, `|u1`, `>i2`) as
/// text, or `None` when the dtype is not a plain number.
pub fn element(dtype: &str, b: &[u8]) -> Option<String> {
    let (order, rest) = dtype.split_at(1);
    let mut le = b.to_vec();
    if order == ">" {
        le.reverse();
    }
    let kind = rest.chars().next()?;
    let n = le.len();
    let mut a = [0u8; 8];
    a[..n.min(8)].copy_from_slice(&le[..n.min(8)]);
    Some(match (kind, n) {
        ('f', 4) => {
            // Shortest text that reads back as the same float32, as numpy prints it.
            let x = f32::from_le_bytes(le[..4].try_into().ok()?);
            if x.is_finite() && x != x.trunc() {
                format!("{x}")
            } else {
                fmt_float(f64::from(x))
            }
        }
        ('f', 8) => fmt_float(f64::from_le_bytes(a)),
        ('f', 2) => {
            let h = u16::from_le_bytes([le[0], le[1]]);
            let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
            let (e, f) = ((h >> 10) & 0x1f, f64::from(h & 0x3ff));
            fmt_float(match e {
                0 => sign * f * 2f64.powi(-24),
                31 if f == 0.0 => sign * f64::INFINITY,
                31 => f64::NAN,
                e => sign * (1.0 + f / 1024.0) * 2f64.powi(i32::from(e) - 15),
            })
        }
        ('i', 1..=8) => {
            let shift = 64 - 8 * n as u32;
            ((i64::from_le_bytes(a) << shift) >> shift).to_string()
        }
        ('u', 1..=8) => u64::from_le_bytes(a).to_string(),
        ('b', 1) => (le[0] != 0).to_string(),
        _ => return None,
    })
}

/// A float the way Python prints it (`0.5`, `1.0`, `nan`, `inf`).
pub fn fmt_float(x: f64) -> String {
    if x.is_nan() {
        "nan".into()
    } else if x.is_infinite() {
        if x > 0.0 { "inf" } else { "-inf" }.into()
    } else if x == x.trunc() && x.abs() < 1e16 {
        format!("{x:.1}")
    } else {
        format!("{x}")
    }
}

/// Parses `A..B` (either end may be left out) into an inclusive range.
pub fn parse_range(s: &str) -> Result<(u64, u64), String> {
    let (a, b) = s
        .split_once("..")
        .ok_or_else(|| format!("expected A..B (like 10..20, 10.. or ..20), got {s:?}"))?;
    let num = |x: &str, default: u64| -> Result<u64, String> {
        if x.is_empty() {
            Ok(default)
        } else {
            x.parse().map_err(|_| format!("{x:?} is not a number"))
        }
    };
    let (a, b) = (num(a, 0)?, num(b, u64::MAX)?);
    if a > b {
        return Err(format!("the range {s:?} is empty (start after end)"));
    }
    Ok((a, b))
}

#[cfg(test)]
mod element_tests {
    use super::*;

    #[test]
    fn elements_decode_like_python_prints_them() {
        assert_eq!(element("<f4", &0.5f32.to_le_bytes()).unwrap(), "0.5");
        assert_eq!(element("<f4", &0.1f32.to_le_bytes()).unwrap(), "0.1");
        assert_eq!(element("<f4", &3.0f32.to_le_bytes()).unwrap(), "3.0");
        assert_eq!(element("<f8", &2.0f64.to_le_bytes()).unwrap(), "2.0");
        assert_eq!(element("<i2", &(-3i16).to_le_bytes()).unwrap(), "-3");
        assert_eq!(element("|u1", &[200]).unwrap(), "200");
        assert_eq!(element(">i4", &7i32.to_be_bytes()).unwrap(), "7");
        assert_eq!(element("<f4", &f32::NAN.to_le_bytes()).unwrap(), "nan");
        assert_eq!(element("|b1", &[1]).unwrap(), "true");
        assert_eq!(element("<c8", &[0; 8]), None);
    }

    #[test]
    fn ranges_parse_with_open_ends() {
        assert_eq!(parse_range("3..9"), Ok((3, 9)));
        assert_eq!(parse_range("..9"), Ok((0, 9)));
        assert_eq!(parse_range("3.."), Ok((3, u64::MAX)));
        assert!(parse_range("9..3").is_err());
        assert!(parse_range("x").is_err());
    }
}
