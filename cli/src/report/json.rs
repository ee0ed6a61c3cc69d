//! The JSON text the report's data is made of: numbers as JSON ([`num`],
//! and [`short`] for means) and comma-joined lists ([`join`], which the
//! `--element` messages use too).

/// A number as JSON: finite ones shortest, the others as strings (`"nan"`,
/// `"inf"`, `"-inf"`), which the page shows as such.
pub(super) fn num(x: f64, f32_values: bool) -> String {
    if x.is_nan() {
        "\"nan\"".into()
    } else if x.is_infinite() {
        if x > 0.0 { "\"inf\"" } else { "\"-inf\"" }.into()
    } else if f32_values {
        format!("{}", x as f32)
    } else {
        format!("{x}")
    }
}

/// A mean as JSON, to 4 significant digits (the page shows no more).
pub(super) fn short(x: f64) -> String {
    if x == 0.0 || !x.is_finite() {
        "0".into()
    } else {
        let s = format!("{x:.3e}");
        // `1.000e0` -> `1e0`: JSON reads either; shorter is smaller.
        match s.split_once('e') {
            Some((m, e)) => {
                let m = m.trim_end_matches('0').trim_end_matches('.');
                format!("{m}e{e}")
            }
            None => s,
        }
    }
}

/// The texts of `v` (made by `f`), comma-separated.
pub(super) fn join<T>(v: impl IntoIterator<Item = T>, f: impl Fn(T) -> String) -> String {
    let parts: Vec<String> = v.into_iter().map(f).collect();
    parts.join(",")
}
