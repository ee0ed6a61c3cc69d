//! Unit tests of `objects/` that need no running interpreter (the rest is
//! tested from Python: tests/test_objects.py). They take no lock and run
//! nothing in signal context.

use super::repr::decimal;

#[test]
fn decimal_writes_ints_as_repr_does() {
    for v in [
        0,
        7,
        -7,
        10,
        99,
        -100,
        123_456_789,
        i64::MAX,
        i64::MIN,
        i64::MIN + 1,
    ] {
        assert_eq!(decimal(v), v.to_string());
    }
}
