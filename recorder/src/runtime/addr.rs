//! Hashing of object addresses for the maps the hot paths look up.
//!
//! Owns [`AddrHasher`] and [`AddrMap`]; no state, no locking. Nothing here
//! runs in signal context.

use std::collections::HashMap;

/// Hashes object addresses (and small tuples of them) for the maps looked
/// up on every boundary: one multiply instead of SipHash, which is built to
/// resist chosen keys; ours are addresses the allocator picked.
#[derive(Default, Clone, Copy)]
pub struct AddrHasher(u64);

impl std::hash::Hasher for AddrHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u64(&mut self, x: u64) {
        self.0 = (self.0.rotate_left(5) ^ x).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    fn write_usize(&mut self, x: usize) {
        self.write_u64(x as u64);
    }
    fn write_i32(&mut self, x: i32) {
        self.write_u64(x as u32 as u64);
    }
    fn write_u32(&mut self, x: u32) {
        self.write_u64(u64::from(x));
    }
}

/// A `HashMap` keyed by addresses, with [`AddrHasher`].
pub type AddrMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<AddrHasher>>;
