//! Small text helpers shared by the subcommands' output.

use memwatch_analyzer::{ChangeRef, WhatRef};
use memwatch_format::dtype::{Dtype, FloatFormat, Value};
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
    fn floats_print_as_python_and_numpy_do() {
        assert_eq!(fmt_float(0.5), "0.5");
        assert_eq!(fmt_float(-2.0), "-2.0");
        assert_eq!(fmt_float(1e-5), "1e-05");
        assert_eq!(fmt_float(5.877471754111438e-39), "5.877471754111438e-39");
        assert_eq!(fmt_float(1.8446744073709552e19), "1.8446744073709552e+19");
        assert_eq!(fmt_float(1e16), "1e+16");
        assert_eq!(fmt_float(9999999999999998.0), "9999999999999998.0");
        assert_eq!(fmt_float(-0.0), "-0.0");
        assert_eq!(element("<f4", &0.1f32.to_le_bytes()).as_deref(), Some("0.1"));
        assert_eq!(element("<f4", &1e-10f32.to_le_bytes()).as_deref(), Some("1e-10"));
        assert_eq!(element("<f4", &3.0f32.to_le_bytes()).as_deref(), Some("3.0"));
        assert_eq!(
            element("<bfloat16", &0x3dcdu16.to_le_bytes()).as_deref(),
            Some("0.10009765625")
        );
        assert_eq!(element("|float8_e5m2", &[0x7c]).as_deref(), Some("inf"));
        assert_eq!(element("|b1", &[1]).as_deref(), Some("true"));
        assert_eq!(
            element("<c8", &[0, 0, 0, 0, 0, 0, 0x80, 0x3f]).as_deref(),
            Some("1j")
        );
        assert_eq!(
            element("<c8", &[0, 0, 0x80, 0x3f, 0, 0, 0, 0xc0]).as_deref(),
            Some("(1-2j)")
        );
        assert_eq!(element("<bf16", &[0, 0]), None);
    }

    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(utc(0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(utc(1_764_115_200_000_000_000), "2025-11-26T00:00:00.000000000Z");
        assert_eq!(utc(951_782_400_000_000_001), "2000-02-29T00:00:00.000000001Z");
    }
}

/// One element of dtype `dtype` (`<f4`, `|u1`, `>i2`, `<bfloat16`, see
/// [`memwatch_format::dtype`]) as text, as Python prints the value (a
/// complex one as `(1+2j)`), or `None` when the dtype is not a number
/// type this build knows.
pub fn element(dtype: &str, b: &[u8]) -> Option<String> {
    let d = Dtype::parse(dtype)?;
    Some(match d.decode(b)? {
        // Shortest text that reads back as the same float32, as numpy prints it.
        Value::Float(x) if d.float_format() == Some(FloatFormat::F32) => fmt_f32(x as f32),
        Value::Float(x) => fmt_float(x),
        Value::Complex(re, im) => fmt_complex(re, im),
        Value::Int(i) => i.to_string(),
        Value::UInt(u) => u.to_string(),
        Value::Bool(v) => v.to_string(),
    })
}

/// How many elements a byte change changed, when its region has a dtype
/// (elements whose bytes all stayed the same are not counted).
pub fn elements_changed(row: &ChangeRef<'_>) -> Option<u64> {
    let WhatRef::Bytes { ranges, .. } = &row.what else {
        return None;
    };
    let size = row.region.filter(|r| r.dtype.is_some())?.itemsize.max(1) as usize;
    let n = ranges
        .iter()
        .flat_map(|r| r.old.chunks(size).zip(r.new.chunks(size)))
        .filter(|(a, b)| a != b)
        .count();
    Some(n as u64)
}

/// The first changed element of a byte change, when its region has a
/// dtype this build decodes: its index (`[3, 4]`), old and new value as
/// Python prints them.
pub fn first_element(row: &ChangeRef<'_>) -> Option<(String, String, String)> {
    let WhatRef::Bytes { ranges, .. } = &row.what else {
        return None;
    };
    let region = row.region?;
    let dtype = region.dtype.as_deref()?;
    let size = region.itemsize.max(1) as usize;
    for r in ranges.iter() {
        let pairs = r.old.chunks_exact(size).zip(r.new.chunks_exact(size));
        for (k, (a, b)) in pairs.enumerate() {
            if a == b {
                continue;
            }
            let at = r.offset + (k * size) as u64;
            let idx = memwatch_analyzer::index_at(region, at)?;
            let idx: Vec<String> = idx.iter().map(u64::to_string).collect();
            return Some((
                format!("[{}]", idx.join(", ")),
                element(dtype, a)?,
                element(dtype, b)?,
            ));
        }
    }
    None
}

/// A complex number the way Python prints it: `(1+2j)`, `-3j`, `(nan+infj)`.
fn fmt_complex(re: f64, im: f64) -> String {
    let part = |x: f64| {
        let s = fmt_float(x);
        s.strip_suffix(".0").map(str::to_string).unwrap_or(s)
    };
    let im_txt = if im.is_nan() || im.is_sign_positive() {
        format!("+{}", part(im))
    } else {
        part(im)
    };
    if re == 0.0 && re.is_sign_positive() {
        format!("{}j", part(im))
    } else {
        format!("({}{im_txt}j)", part(re))
    }
}

/// A float the way Python prints it (`0.5`, `1.0`, `1e-05`, `1.5e+16`,
/// `nan`, `inf`).
pub fn fmt_float(x: f64) -> String {
    if x.is_nan() {
        "nan".into()
    } else if x.is_infinite() {
        if x > 0.0 { "inf" } else { "-inf" }.into()
    } else if x != 0.0 && !(1e-4..1e16).contains(&x.abs()) {
        python_exponent(&format!("{x:e}"))
    } else if x == x.trunc() {
        format!("{x:.1}")
    } else {
        format!("{x}")
    }
}

/// A float32 the way numpy prints it: its shortest digits, an exponent as
/// Python writes one outside `[1e-4, 1e16)`.
fn fmt_f32(x: f32) -> String {
    if x.is_finite() && x != 0.0 && !(1e-4..1e16).contains(&x.abs()) {
        python_exponent(&format!("{x:e}"))
    } else if x.is_finite() && x != x.trunc() {
        format!("{x}")
    } else {
        fmt_float(f64::from(x))
    }
}

/// Rust's `1.5e16` / `1e-5` as Python writes them: `1.5e+16`, `1e-05`.
fn python_exponent(rust: &str) -> String {
    let Some((mantissa, exp)) = rust.split_once('e') else {
        return rust.to_string();
    };
    let (sign, digits) = match exp.strip_prefix('-') {
        Some(d) => ('-', d),
        None => ('+', exp),
    };
    format!("{mantissa}e{sign}{digits:0>2}")
}

/// A time after the trace started: `2.5s`, `150ms`, `20us`, `100ns`, or a
/// plain number of nanoseconds when `plain_ns` (as `query --time` always
/// took them).
pub fn parse_time(s: &str, plain_ns: bool) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let per: u64 = match unit {
        "s" => 1_000_000_000,
        "ms" => 1_000_000,
        "us" => 1_000,
        "ns" => 1,
        "" if plain_ns => 1,
        _ => {
            return Err(format!(
                "{s:?} is not a time: give a number with a unit, like 2.5s, 150ms, 20us or 100ns"
            ))
        }
    };
    let (whole, frac) = num.split_once('.').unwrap_or((num, ""));
    let digits = per.ilog10() as usize;
    if num.is_empty() || frac.len() > digits || !whole.chars().chain(frac.chars()).all(|c| c.is_ascii_digit())
    {
        return Err(format!(
            "{s:?} is not a time (at most nanosecond precision): like 2.5s, 150ms, 20us or 100ns"
        ));
    }
    let whole: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| format!("{s:?} is too large"))?
    };
    let frac_ns: u64 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<digits$}")
            .parse()
            .map_err(|_| format!("{s:?} is not a time"))?
    };
    whole
        .checked_mul(per)
        .and_then(|w| w.checked_add(frac_ns))
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Parses `query --time A..B`: times as [`parse_time`] reads them (a plain
/// number is nanoseconds), either end may be left out.
pub fn parse_time_range(s: &str) -> Result<(u64, u64), String> {
    parse_range_with(s, |x| parse_time(x, true))
}

/// A point in a trace: after a seq, or at a time after the trace started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    Seq(u64),
    /// Nanoseconds since the trace started.
    Time(u64),
}

impl Point {
    /// The seq this point is: the last event at or before a time.
    pub fn seq(self, reader: &memwatch_format::TraceReader) -> memwatch_analyzer::Result<u64> {
        match self {
            Point::Seq(s) => Ok(s),
            Point::Time(t) => memwatch_analyzer::seq_at_time(reader, t),
        }
    }
}

/// Parses `--at SEQ|TIME`: a plain integer is a seq; a time has a unit
/// (`2.5s`, `150ms`, `20us`, `100ns`, since the trace started).
pub fn parse_point(s: &str) -> Result<Point, String> {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_digit()) {
        return s
            .parse()
            .map(Point::Seq)
            .map_err(|_| format!("seq {s:?} is too large"));
    }
    parse_time(s, false).map(Point::Time).map_err(|_| {
        format!("{s:?} is neither a seq (a plain integer, like 120) nor a time (a number with a unit, like 2.5s or 150ms)")
    })
}

/// Parses `A..B` (either end may be left out) into an inclusive range.
pub fn parse_range(s: &str) -> Result<(u64, u64), String> {
    parse_range_with(s, |x| x.parse().map_err(|_| format!("{x:?} is not a number")))
}

fn parse_range_with(s: &str, num: impl Fn(&str) -> Result<u64, String>) -> Result<(u64, u64), String> {
    let (a, b) = s
        .split_once("..")
        .ok_or_else(|| format!("expected A..B (like 10..20, 10.. or ..20), got {s:?}"))?;
    let end = |x: &str, default: u64| -> Result<u64, String> {
        if x.is_empty() {
            Ok(default)
        } else {
            num(x)
        }
    };
    let (a, b) = (end(a, 0)?, end(b, u64::MAX)?);
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
        // Complex values print as Python prints them (they showed as hex before).
        assert_eq!(element("<c8", &[0; 8]).unwrap(), "0j");
        assert_eq!(element("<M8[ns]", &[0; 8]), None);
    }

    #[test]
    fn times_take_units_and_points_tell_seqs_from_times() {
        assert_eq!(parse_time("2.5s", false), Ok(2_500_000_000));
        assert_eq!(parse_time("150ms", false), Ok(150_000_000));
        assert_eq!(parse_time("0.000000001s", false), Ok(1));
        assert_eq!(parse_time("20us", false), Ok(20_000));
        assert_eq!(parse_time("7ns", false), Ok(7));
        assert_eq!(parse_time("7", true), Ok(7));
        assert!(parse_time("7", false).is_err());
        assert!(parse_time("1.5ns", false).is_err());
        assert!(parse_time("2.5h", false).unwrap_err().contains("like 2.5s"));
        assert!(parse_time("99999999999s", false)
            .unwrap_err()
            .contains("too large"));
        assert_eq!(parse_time_range("1ms..2.5ms"), Ok((1_000_000, 2_500_000)));
        assert_eq!(parse_time_range("100..200"), Ok((100, 200)));
        assert_eq!(parse_time_range("1s.."), Ok((1_000_000_000, u64::MAX)));
        assert!(parse_time_range("2s..1s").is_err());
        assert_eq!(parse_point("120"), Ok(Point::Seq(120)));
        assert_eq!(parse_point("1.5s"), Ok(Point::Time(1_500_000_000)));
        assert_eq!(parse_point("150ms"), Ok(Point::Time(150_000_000)));
        let e = parse_point("12x").unwrap_err();
        assert!(e.contains("neither a seq") && e.contains("2.5s"), "{e}");
        assert!(parse_point("").is_err());
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
