//! Element types of watched regions: the `dtype` string of a region's
//! [`Layout`](crate::Layout), parsed, and elements decoded from their bytes.
//!
//! A dtype string is a numpy array-protocol type string (`<f4`, `>i2`,
//! `|b1`, `<c8`) or one of memwatch's own names for types numpy lacks
//! (`<bfloat16`, `|float8_e4m3fn`, `|float8_e4m3fnuz`, `|float8_e5m2`,
//! `|float8_e5m2fnuz`, `|float8_e8m0fnu`, `<complex32`): a byte-order
//! character and the type's name as torch and `ml_dtypes` spell it, which
//! numpy's own parser rejects, so they cannot be read as a numpy type.
//! `docs/format.md` lists them. Every reader here decodes both kinds
//! itself (no torch, no numpy); a string it does not know parses to
//! `None`, and callers show such elements as bytes.
//!
//! ```
//! use memwatch_format::dtype::{Dtype, Value};
//! let bf16 = Dtype::parse("<bfloat16").unwrap();
//! assert_eq!(bf16.itemsize, 2);
//! assert_eq!(bf16.decode(&[0x80, 0x3f]), Some(Value::Float(1.0)));
//! assert_eq!(Dtype::parse("|float8_e4m3fn").unwrap().decode(&[0x7e]), Some(Value::Float(448.0)));
//! assert!(Dtype::parse("<M8[ns]").is_none());
//! ```

/// How a floating-point element is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloatFormat {
    /// IEEE 754 binary16 (numpy `f2`).
    F16,
    /// IEEE 754 binary32 (`f4`).
    F32,
    /// IEEE 754 binary64 (`f8`).
    F64,
    /// bfloat16: the top 16 bits of a binary32 (`bfloat16`).
    BF16,
    /// 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities, NaN
    /// is `S.1111.111` (`float8_e4m3fn`).
    F8E4M3FN,
    /// 1 sign, 4 exponent (bias 8), 3 mantissa bits; no infinities, no
    /// negative zero, the single NaN is `0x80` (`float8_e4m3fnuz`).
    F8E4M3FNUZ,
    /// 1 sign, 5 exponent (bias 15), 2 mantissa bits, IEEE-like with
    /// infinities and NaNs (`float8_e5m2`).
    F8E5M2,
    /// 1 sign, 5 exponent (bias 16), 2 mantissa bits; no infinities, no
    /// negative zero, the single NaN is `0x80` (`float8_e5m2fnuz`).
    F8E5M2FNUZ,
    /// 8 exponent bits (bias 127), no sign, no mantissa: `2^(b-127)`;
    /// `0xff` is NaN (`float8_e8m0fnu`, the scale type of MX formats).
    F8E8M0FNU,
}

/// What kind of element a dtype holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// One byte, zero is false (`b1`).
    Bool,
    /// Two's-complement signed integer (`i1` .. `i8`).
    Int,
    /// Unsigned integer (`u1` .. `u8`).
    UInt,
    /// A real floating-point number.
    Float(FloatFormat),
    /// Real part then imaginary part, each of this format (`c8`, `c16`,
    /// `complex32`).
    Complex(FloatFormat),
}

/// A parsed dtype string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dtype {
    pub kind: Kind,
    /// Bytes per element.
    pub itemsize: u32,
    /// Most significant byte first (`>`).
    pub big_endian: bool,
}

/// One decoded element.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    Bool(bool),
    Int(i64),
    UInt(u64),
    /// Every float format here is exact as an f64, NaN sign included.
    Float(f64),
    /// Real and imaginary parts.
    Complex(f64, f64),
}

impl Value {
    /// The value as one f64: `None` for a complex value. Integers beyond
    /// 2^53 lose precision; a bool is 0 or 1.
    pub fn as_f64(&self) -> Option<f64> {
        Some(match *self {
            Value::Bool(b) => f64::from(u8::from(b)),
            Value::Int(i) => i as f64,
            Value::UInt(u) => u as f64,
            Value::Float(x) => x,
            Value::Complex(..) => return None,
        })
    }

    /// A NaN or an infinity (in either part of a complex value).
    pub fn is_nonfinite(&self) -> bool {
        match *self {
            Value::Float(x) => !x.is_finite(),
            Value::Complex(re, im) => !re.is_finite() || !im.is_finite(),
            _ => false,
        }
    }
}

/// memwatch's names for the types numpy has no array-protocol code for,
/// with their kind and size.
const NAMED: &[(&str, Kind, u32)] = &[
    ("bfloat16", Kind::Float(FloatFormat::BF16), 2),
    ("float8_e4m3fn", Kind::Float(FloatFormat::F8E4M3FN), 1),
    ("float8_e4m3fnuz", Kind::Float(FloatFormat::F8E4M3FNUZ), 1),
    ("float8_e5m2", Kind::Float(FloatFormat::F8E5M2), 1),
    ("float8_e5m2fnuz", Kind::Float(FloatFormat::F8E5M2FNUZ), 1),
    ("float8_e8m0fnu", Kind::Float(FloatFormat::F8E8M0FNU), 1),
    ("complex32", Kind::Complex(FloatFormat::F16), 4),
];

impl Dtype {
    /// Parses a dtype string; `None` for one that is not a number type
    /// this crate knows (`<M8[ns]`, `|V16`, a name from a newer memwatch).
    /// The byte-order character (`<`, `>`, `|`, `=`) may be left out
    /// (little-endian, as this crate's writers always are).
    pub fn parse(s: &str) -> Option<Dtype> {
        let (big_endian, rest) = match s.as_bytes().first()? {
            b'>' => (true, &s[1..]),
            b'<' | b'|' | b'=' => (false, &s[1..]),
            _ => (false, s),
        };
        if let Some(&(_, kind, itemsize)) = NAMED.iter().find(|(n, ..)| *n == rest) {
            return Some(Dtype {
                kind,
                itemsize,
                big_endian,
            });
        }
        let code = rest.chars().next()?;
        let itemsize: u32 = rest[1..].parse().ok()?;
        let kind = match (code, itemsize) {
            ('b', 1) => Kind::Bool,
            ('i', 1 | 2 | 4 | 8) => Kind::Int,
            ('u', 1 | 2 | 4 | 8) => Kind::UInt,
            ('f', 2) => Kind::Float(FloatFormat::F16),
            ('f', 4) => Kind::Float(FloatFormat::F32),
            ('f', 8) => Kind::Float(FloatFormat::F64),
            ('c', 8) => Kind::Complex(FloatFormat::F32),
            ('c', 16) => Kind::Complex(FloatFormat::F64),
            _ => return None,
        };
        Some(Dtype {
            kind,
            itemsize,
            big_endian,
        })
    }

    /// Decodes one element; `None` when `b` is not `itemsize` bytes long.
    pub fn decode(&self, b: &[u8]) -> Option<Value> {
        if b.len() != self.itemsize as usize {
            return None;
        }
        let le = |part: &[u8]| -> u64 {
            let mut a = [0u8; 8];
            a[..part.len()].copy_from_slice(part);
            if self.big_endian {
                a[..part.len()].reverse();
            }
            u64::from_le_bytes(a)
        };
        Some(match self.kind {
            Kind::Bool => Value::Bool(b[0] != 0),
            Kind::UInt => Value::UInt(le(b)),
            Kind::Int => {
                let shift = 64 - 8 * b.len() as u32;
                Value::Int(((le(b) as i64) << shift) >> shift)
            }
            Kind::Float(f) => Value::Float(float_of(f, le(b))),
            Kind::Complex(f) => {
                // Each part in the byte order, real part first (as numpy).
                let (re, im) = b.split_at(b.len() / 2);
                Value::Complex(float_of(f, le(re)), float_of(f, le(im)))
            }
        })
    }

    /// The float format of a real or complex dtype.
    pub fn float_format(&self) -> Option<FloatFormat> {
        match self.kind {
            Kind::Float(f) | Kind::Complex(f) => Some(f),
            _ => None,
        }
    }
}

/// Decodes the low bits of `bits` as a float of format `f`.
pub fn float_of(f: FloatFormat, bits: u64) -> f64 {
    match f {
        FloatFormat::F32 => f64::from(f32::from_bits(bits as u32)),
        FloatFormat::F64 => f64::from_bits(bits),
        FloatFormat::BF16 => f64::from(f32::from_bits((bits as u32 & 0xffff) << 16)),
        FloatFormat::F16 => minifloat(bits as u32 & 0xffff, 5, 10, 15, Special::Ieee),
        FloatFormat::F8E4M3FN => minifloat(bits as u32 & 0xff, 4, 3, 7, Special::AllOnesNan),
        FloatFormat::F8E4M3FNUZ => minifloat(bits as u32 & 0xff, 4, 3, 8, Special::NegZeroNan),
        FloatFormat::F8E5M2 => minifloat(bits as u32 & 0xff, 5, 2, 15, Special::Ieee),
        FloatFormat::F8E5M2FNUZ => minifloat(bits as u32 & 0xff, 5, 2, 16, Special::NegZeroNan),
        FloatFormat::F8E8M0FNU => match bits as u8 {
            0xff => f64::NAN,
            e => 2f64.powi(i32::from(e) - 127),
        },
    }
}

/// Where a small float format keeps its NaNs and infinities.
#[derive(Clone, Copy)]
enum Special {
    /// The largest exponent is infinity (zero mantissa) or NaN.
    Ieee,
    /// Finite only: exponent and mantissa all ones is NaN.
    AllOnesNan,
    /// Finite only, no negative zero: sign bit alone is the only NaN.
    NegZeroNan,
}

/// A sign bit, `e` exponent bits with bias `bias` and `m` mantissa bits;
/// a zero exponent is subnormal.
fn minifloat(bits: u32, e: u32, m: u32, bias: i32, special: Special) -> f64 {
    let negative = bits >> (e + m) & 1 == 1;
    let exp = (bits >> m) & ((1 << e) - 1);
    let man = bits & ((1 << m) - 1);
    let max_exp = (1 << e) - 1;
    let sign = if negative { -1.0 } else { 1.0 };
    match special {
        Special::Ieee if exp == max_exp => {
            return if man == 0 {
                sign * f64::INFINITY
            } else {
                f64::NAN.copysign(sign)
            };
        }
        Special::AllOnesNan if exp == max_exp && man == (1 << m) - 1 => return f64::NAN.copysign(sign),
        Special::NegZeroNan if negative && exp == 0 && man == 0 => return f64::NAN,
        _ => {}
    }
    let scale = 2f64.powi(-(m as i32));
    if exp == 0 {
        sign * f64::from(man) * scale * 2f64.powi(1 - bias)
    } else {
        sign * (1.0 + f64::from(man) * scale) * 2f64.powi(exp as i32 - bias)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(dtype: &str, b: &[u8]) -> f64 {
        match Dtype::parse(dtype).unwrap().decode(b).unwrap() {
            Value::Float(x) => x,
            v => panic!("{v:?}"),
        }
    }

    /// float32 bit patterns of torch's `tensor(range(256), dtype=uint8)
    /// .view(F).float()` for each float8 type F, computed once with torch
    /// 2.15 (`tests/test_watch.py::test_float8_table_matches_torch` checks
    /// the recorder against the torch installed now).
    const TORCH_FLOAT8: &str = include_str!("../tests/data/float8_torch.txt");

    #[test]
    fn float8_matches_torch_for_every_byte() {
        let mut checked = 0;
        for line in TORCH_FLOAT8
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (name, table) = line.split_once(':').unwrap();
            let dtype = format!("|{name}");
            let want: Vec<u32> = table
                .split_whitespace()
                .map(|h| u32::from_str_radix(h, 16).unwrap())
                .collect();
            assert_eq!(want.len(), 256, "{name}");
            for (byte, w) in want.iter().enumerate() {
                let want = f32::from_bits(*w);
                let got = f(&dtype, &[byte as u8]);
                if want.is_nan() {
                    assert!(got.is_nan(), "{name} {byte:#04x}: {got} is not NaN");
                } else {
                    assert_eq!(
                        got.to_bits(),
                        f64::from(want).to_bits(),
                        "{name} {byte:#04x}: {got} != {want}"
                    );
                }
                checked += 1;
            }
        }
        assert_eq!(checked, 5 * 256);
    }

    #[test]
    fn float8_landmarks() {
        assert_eq!(f("|float8_e4m3fn", &[0x7e]), 448.0);
        assert!(f("|float8_e4m3fn", &[0x7f]).is_nan());
        assert!(f("|float8_e4m3fn", &[0xff]).is_nan());
        assert_eq!(f("|float8_e4m3fn", &[0x01]), 2f64.powi(-9));
        assert_eq!(f("|float8_e4m3fn", &[0x80]).to_bits(), (-0.0f64).to_bits());
        assert!(f("|float8_e4m3fnuz", &[0x80]).is_nan());
        assert_eq!(f("|float8_e4m3fnuz", &[0x7f]), 240.0);
        assert_eq!(f("|float8_e4m3fnuz", &[0x01]), 2f64.powi(-10));
        assert_eq!(f("|float8_e5m2", &[0x7c]), f64::INFINITY);
        assert_eq!(f("|float8_e5m2", &[0xfc]), f64::NEG_INFINITY);
        assert!(f("|float8_e5m2", &[0x7d]).is_nan());
        assert_eq!(f("|float8_e5m2", &[0x7b]), 57344.0);
        assert!(f("|float8_e5m2fnuz", &[0x80]).is_nan());
        assert_eq!(f("|float8_e5m2fnuz", &[0x7f]), 57344.0);
        assert_eq!(f("|float8_e5m2fnuz", &[0x01]), 2f64.powi(-17));
        assert_eq!(f("|float8_e8m0fnu", &[127]), 1.0);
        assert_eq!(f("|float8_e8m0fnu", &[0]), 2f64.powi(-127));
        assert_eq!(f("|float8_e8m0fnu", &[254]), 2f64.powi(127));
        assert!(f("|float8_e8m0fnu", &[255]).is_nan());
    }

    #[test]
    fn bfloat16_is_the_top_of_a_float32() {
        // (bits, value) as torch prints them with full precision.
        for (bits, want) in [
            (0x3f80u16, 1.0),
            (0xbf80, -1.0),
            (0x3dcd, 0.10009765625),
            (0x4049, 3.140625),
            (0x7f7f, 3.3895313892515355e38),
            (0x0080, 1.1754943508222875e-38),
            (0x0001, 9.183549615799121e-41),
            (0x8000, -0.0),
            (0x7f80, f64::INFINITY),
            (0xff80, f64::NEG_INFINITY),
        ] {
            assert_eq!(
                f("<bfloat16", &bits.to_le_bytes()).to_bits(),
                f64::to_bits(want),
                "{bits:#06x}"
            );
            assert_eq!(f(">bfloat16", &bits.to_be_bytes()).to_bits(), f64::to_bits(want));
        }
        assert!(f("<bfloat16", &0x7fc0u16.to_le_bytes()).is_nan());
    }

    #[test]
    fn numpy_types_decode() {
        assert_eq!(f("<f2", &0x3c00u16.to_le_bytes()), 1.0);
        assert_eq!(f("<f2", &0x0001u16.to_le_bytes()), 2f64.powi(-24));
        assert_eq!(f("<f2", &0x7c00u16.to_le_bytes()), f64::INFINITY);
        assert_eq!(f("<f4", &1.5f32.to_le_bytes()), 1.5);
        assert_eq!(f(">f8", &2.25f64.to_be_bytes()), 2.25);
        let d = |s: &str, b: &[u8]| Dtype::parse(s).unwrap().decode(b).unwrap();
        assert_eq!(d("|b1", &[2]), Value::Bool(true));
        assert_eq!(d("|i1", &[0xff]), Value::Int(-1));
        assert_eq!(d(">i2", &[0xff, 0xfe]), Value::Int(-2));
        assert_eq!(d("<i8", &i64::MIN.to_le_bytes()), Value::Int(i64::MIN));
        assert_eq!(d("<u8", &u64::MAX.to_le_bytes()), Value::UInt(u64::MAX));
        assert_eq!(d("|u1", &[200]), Value::UInt(200));
        let mut c = 1.5f32.to_le_bytes().to_vec();
        c.extend((-2.0f32).to_le_bytes());
        assert_eq!(d("<c8", &c), Value::Complex(1.5, -2.0));
        let mut c = 0.5f64.to_be_bytes().to_vec();
        c.extend(4.0f64.to_be_bytes());
        assert_eq!(d(">c16", &c), Value::Complex(0.5, 4.0));
        let mut c = 0x3c00u16.to_le_bytes().to_vec();
        c.extend(0xc000u16.to_le_bytes());
        assert_eq!(d("<complex32", &c), Value::Complex(1.0, -2.0));
        assert_eq!(Dtype::parse("<bfloat16").unwrap().decode(&[0]), None);
    }

    #[test]
    fn unknown_strings_do_not_parse() {
        for s in [
            "",
            "<",
            "<f3",
            "<f16",
            "|V8",
            "<M8[ns]",
            "<bf16",
            "|float4_e2m1fn_x2",
            "O",
            "<U4",
        ] {
            assert_eq!(Dtype::parse(s), None, "{s:?}");
        }
        assert_eq!(Dtype::parse("f4").unwrap().itemsize, 4);
    }
}
