//! The hash of the engine's maps keyed by host offsets or cluster indices: one multiplication.
//!
//! These maps sit under the metadata lock on every request (the metadata cache, the overlap index), and SipHash
//! took a sixth of a cached lookup. Its resistance to chosen keys buys little here: the keys are offsets inside
//! the image's own file, and the maps are bounded (the cache by its budget, the index by the tables the image
//! has), so a hostile image that made them collide could slow lookups down, never make them unbounded.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

/// Fibonacci hashing of a `u64`, its high half folded down: byte offsets are multiples of 512 or more, and the
/// table indexes with the low bits.
#[derive(Default, Clone, Copy)]
pub struct OffsetHasher(u64);

impl Hasher for OffsetHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(self.0.rotate_left(8) ^ u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        let h = (self.0 ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.0 = h ^ (h >> 29);
    }
}

/// A map keyed by host offsets or cluster indices.
pub type OffsetMap<V> = HashMap<u64, V, BuildHasherDefault<OffsetHasher>>;

/// A set of host offsets or cluster indices.
pub type OffsetSet = HashSet<u64, BuildHasherDefault<OffsetHasher>>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    #[test]
    fn cluster_aligned_offsets_spread_over_the_low_bits() {
        let build = BuildHasherDefault::<OffsetHasher>::default();
        let buckets: HashSet<u64> = (0..1024u64).map(|i| build.hash_one(i * 65536) & 1023).collect();
        // A hash that kept the offsets' zero low bits would put all of them in one bucket of 1024.
        assert!(buckets.len() > 500, "{} buckets used", buckets.len());
    }
}
