//! How times are written for people, in messages and tables.
//!
//! A leaf: errors and every view use it; it uses nothing of this crate.

/// `2.5s`, `150ms`, `20us` or `100ns`: the shortest exact text for a time.
pub fn duration_text(ns: u64) -> String {
    for (unit, per) in [("s", 1_000_000_000u64), ("ms", 1_000_000), ("us", 1_000)] {
        if ns >= per {
            let whole = ns / per;
            let frac = ns % per;
            if frac == 0 {
                return format!("{whole}{unit}");
            }
            let width = per.ilog10() as usize;
            let text = format!("{whole}.{frac:0width$}");
            return format!("{}{unit}", text.trim_end_matches('0'));
        }
    }
    format!("{ns}ns")
}
