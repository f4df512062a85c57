//! [`DirtyBits`]: the in-memory bits of one persistent bitmap, one per granule of the guest disk.
//!
//! The bits live in chunks of 4 KiB (32768 bits) allocated when a bit in them is first set, so a clean bitmap
//! costs one pointer-sized slot per chunk and a dirty one only the chunks its writes touched. Setting bits takes
//! `&self` and uses atomic OR on 64-bit words: writers never wait for each other here. Word `w` of the whole
//! bitmap holds bits `64 w ..= 64 w + 63`, least significant first, which is exactly how QEMU serialises a bitmap
//! into its data clusters (little-endian 64-bit words), so a stored cluster is the words' little-endian bytes.
//!
//! Invariant: no bit at or past `len` is ever set.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// 64-bit words per chunk.
const CHUNK_WORDS: usize = 512;
/// Bits per chunk.
pub const CHUNK_BITS: u64 = CHUNK_WORDS as u64 * 64;

type Chunk = Box<[AtomicU64]>;

fn new_chunk() -> Chunk {
    (0..CHUNK_WORDS).map(|_| AtomicU64::new(0)).collect()
}

/// The bits of one bitmap.
#[derive(Debug)]
pub struct DirtyBits {
    /// Number of bits.
    len: u64,
    chunks: Box<[OnceLock<Chunk>]>,
}

/// The mask of bits `lo..hi` within one word (`lo < hi <= 64`).
fn word_mask(lo: u64, hi: u64) -> u64 {
    let upper = if hi >= 64 { u64::MAX } else { (1u64 << hi) - 1 };
    upper & !((1u64 << lo) - 1)
}

impl DirtyBits {
    /// A bitmap of `len` clear bits. The caller bounds `len` (QEMU's limits cap it at 2^32).
    pub fn new(len: u64) -> Self {
        let chunks = usize::try_from(len.div_ceil(CHUNK_BITS)).unwrap_or(0);
        DirtyBits { len, chunks: (0..chunks).map(|_| OnceLock::new()).collect() }
    }

    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.len
    }

    fn chunk(&self, index: u64) -> Option<&Chunk> {
        self.chunks.get(usize::try_from(index).ok()?)?.get()
    }

    fn chunk_or_new(&self, index: u64) -> Option<&Chunk> {
        Some(self.chunks.get(usize::try_from(index).ok()?)?.get_or_init(new_chunk))
    }

    /// Word `w` of the bitmap, 0 when its chunk was never allocated.
    fn word(&self, w: u64) -> u64 {
        self.chunk(w / CHUNK_WORDS as u64)
            .and_then(|c| c.get((w % CHUNK_WORDS as u64) as usize))
            .map_or(0, |a| a.load(Ordering::Relaxed))
    }

    /// ORs `mask` into word `w`, allocating its chunk; a word that has the bits already is only read, so that
    /// writers setting bits that are set do not fight over the cache line.
    fn or_word(&self, w: u64, mask: u64) {
        if let Some(word) =
            self.chunk_or_new(w / CHUNK_WORDS as u64).and_then(|c| c.get((w % CHUNK_WORDS as u64) as usize))
        {
            if word.load(Ordering::Relaxed) & mask != mask {
                word.fetch_or(mask, Ordering::Relaxed);
            }
        }
    }

    /// Sets bits `lo..hi`, clipped to the bitmap.
    pub fn set(&self, lo: u64, hi: u64) {
        let hi = hi.min(self.len);
        let mut bit = lo;
        while bit < hi {
            let w = bit / 64;
            let end = hi.min((w + 1) * 64);
            self.or_word(w, word_mask(bit % 64, end - w * 64));
            bit = end;
        }
    }

    /// Whether bit `bit` is set.
    pub fn get(&self, bit: u64) -> bool {
        bit < self.len && self.word(bit / 64) >> (bit % 64) & 1 == 1
    }

    /// The end of the run of bits equal to `get(from)` that starts at `from`, at most `limit` (and `len`).
    pub fn run_end(&self, from: u64, limit: u64) -> u64 {
        let limit = limit.min(self.len);
        if from >= limit {
            return from;
        }
        let dirty = self.get(from);
        let mut bit = from;
        while bit < limit {
            let w = bit / 64;
            if !dirty && bit % CHUNK_BITS == 0 && self.chunk(w / CHUNK_WORDS as u64).is_none() {
                // A chunk never allocated is all clear.
                bit += CHUNK_BITS;
                continue;
            }
            let raw = self.word(w);
            // Bits that differ from the run's value, from `bit` on.
            let differing = (if dirty { !raw } else { raw }) & !((1u64 << (bit % 64)) - 1);
            if differing != 0 {
                return (w * 64 + u64::from(differing.trailing_zeros())).min(limit);
            }
            bit = (w + 1) * 64;
        }
        limit
    }

    /// The bytes of bits `first..first + 8 * len` (`first` a multiple of 64), as QEMU stores them, or `None` when
    /// they are all clear. Bits past the bitmap's end read as clear.
    pub fn serialize(&self, first: u64, len: usize) -> Option<Vec<u8>> {
        let words = len.div_ceil(8) as u64;
        let first_word = first / 64;
        if (0..words).all(|i| self.word(first_word + i) == 0) {
            return None;
        }
        let mut out: Vec<u8> = (0..words).flat_map(|i| self.word(first_word + i).to_le_bytes()).collect();
        out.truncate(len);
        Some(out)
    }

    /// ORs bytes stored as [`serialize`](Self::serialize) writes them into bits from `first` (a multiple of 64);
    /// bits past the bitmap's end are dropped.
    pub fn deserialize(&self, first: u64, bytes: &[u8]) {
        for (i, chunk) in bytes.chunks(8).enumerate() {
            let mut word = [0u8; 8];
            if let Some(dst) = word.get_mut(..chunk.len()) {
                dst.copy_from_slice(chunk);
            }
            let raw = u64::from_le_bytes(word);
            if raw == 0 {
                continue;
            }
            let w = first / 64 + i as u64;
            let lo = w * 64;
            if lo >= self.len {
                break;
            }
            let keep = if self.len - lo >= 64 { u64::MAX } else { (1u64 << (self.len - lo)) - 1 };
            self.or_word(w, raw & keep);
        }
    }

    /// ORs every bit of `other` (same length) into this bitmap.
    pub fn or_with(&self, other: &DirtyBits) {
        for (i, slot) in other.chunks.iter().enumerate() {
            let Some(chunk) = slot.get() else { continue };
            for (j, word) in chunk.iter().enumerate() {
                let raw = word.load(Ordering::Relaxed);
                if raw != 0 {
                    self.or_word((i * CHUNK_WORDS + j) as u64, raw);
                }
            }
        }
    }

    /// A copy with `len` bits: bits past the new end are dropped, new bits are clear.
    pub fn resized(&self, len: u64) -> DirtyBits {
        let out = DirtyBits::new(len);
        for (i, slot) in self.chunks.iter().enumerate() {
            let Some(chunk) = slot.get() else { continue };
            let bytes: Vec<u8> = chunk.iter().flat_map(|w| w.load(Ordering::Relaxed).to_le_bytes()).collect();
            out.deserialize(i as u64 * CHUNK_BITS, &bytes);
        }
        out
    }

    /// Bytes of memory the allocated chunks take.
    #[cfg(test)]
    pub fn allocated_bytes(&self) -> u64 {
        self.chunks.iter().filter(|c| c.get().is_some()).count() as u64 * (CHUNK_WORDS as u64 * 8)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn runs(bits: &DirtyBits) -> Vec<(u64, u64, bool)> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < bits.len() {
            let end = bits.run_end(at, u64::MAX);
            out.push((at, end, bits.get(at)));
            at = end;
        }
        out
    }

    #[test]
    fn set_bits_read_back_as_runs_and_nothing_past_the_end_is_set() {
        let bits = DirtyBits::new(100_000);
        assert_eq!(runs(&bits), [(0, 100_000, false)]);
        assert_eq!(bits.allocated_bytes(), 0);
        bits.set(3, 5);
        bits.set(63, 130);
        bits.set(99_990, 200_000);
        assert_eq!(
            runs(&bits),
            [
                (0, 3, false),
                (3, 5, true),
                (5, 63, false),
                (63, 130, true),
                (130, 99_990, false),
                (99_990, 100_000, true)
            ]
        );
        assert!(!bits.get(100_000));
        assert_eq!(bits.allocated_bytes(), 2 * 4096, "only the two chunks written are allocated");
        assert_eq!(bits.run_end(70, 100), 100, "runs stop at the limit");
    }

    #[test]
    fn serialized_bytes_are_qemus_little_endian_words() {
        let bits = DirtyBits::new(1000);
        assert_eq!(bits.serialize(0, 125), None);
        bits.set(0, 1);
        bits.set(9, 10);
        bits.set(64, 66);
        let bytes = bits.serialize(0, 125).unwrap();
        assert_eq!(bytes.len(), 125);
        assert_eq!(&bytes[..3], &[0x01, 0x02, 0x00]);
        assert_eq!(bytes[8], 0x03);
        let back = DirtyBits::new(1000);
        back.deserialize(0, &bytes);
        assert_eq!(runs(&back), runs(&bits));
        // Bits past the end in stored bytes are dropped.
        let short = DirtyBits::new(70);
        short.deserialize(0, &[0xff; 16]);
        assert_eq!(runs(&short), [(0, 70, true)]);
        assert_eq!(short.serialize(64, 8).unwrap(), [0x3f, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn or_with_and_resized_keep_the_bits_they_should() {
        let a = DirtyBits::new(70_000);
        let b = DirtyBits::new(70_000);
        a.set(10, 20);
        b.set(15, 40_000);
        a.or_with(&b);
        assert_eq!(runs(&a), [(0, 10, false), (10, 40_000, true), (40_000, 70_000, false)]);
        let small = a.resized(12);
        assert_eq!(runs(&small), [(0, 10, false), (10, 12, true)]);
        let big = small.resized(100_000);
        assert_eq!(runs(&big), [(0, 10, false), (10, 12, true), (12, 100_000, false)]);
    }

    #[test]
    fn concurrent_setters_lose_no_bit() {
        let bits = std::sync::Arc::new(DirtyBits::new(1 << 20));
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let bits = bits.clone();
                std::thread::spawn(move || {
                    for i in 0..(1u64 << 16) {
                        let bit = i * 16 + t * 4;
                        bits.set(bit, bit + 1);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        for i in 0..(1u64 << 18) {
            assert!(bits.get(i * 4), "bit {}", i * 4);
            assert!(!bits.get(i * 4 + 1), "bit {}", i * 4 + 1);
        }
    }
}
