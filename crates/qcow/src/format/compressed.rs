//! Compressed clusters, pure: the L2 descriptor that locates the compressed bytes, and the deflate and zstd
//! codecs as QEMU uses them. No I/O happens here.
//!
//! A compressed L2 entry holds, below bit 62, a host byte offset in its low `x = 62 - (cluster_bits - 8)` bits and
//! a count of 512-byte sectors minus one above it. The data starts at the offset, which need not be aligned, and
//! ends somewhere in the last sector, so a reader fetches [`CompressedDescriptor::readable_len`] bytes and lets
//! the codec stop when the cluster is full: what follows the compressed stream is ignored.
//!
//! Codec rules, mirroring block/qcow2-threads.c and block/qcow2.c:
//! - deflate is raw deflate (no zlib header or checksum), written with a 4 KiB window (window bits 12) at the
//!   default level; reading inflates until the cluster is full, and input left over is fine;
//! - zstd is one or more standard frames at zstd's default level (QEMU sets no level); reading decodes whole
//!   frames until the cluster is full, and a frame that would produce more than the cluster is an error;
//! - a cluster is stored compressed only when the compressed form is at most `cluster_size - 1` bytes (QEMU
//!   compresses into a buffer of that size and writes a normal cluster on `-ENOMEM`), which [`compress`] reports
//!   as `Ok(None)`.
//!
//! Memory: [`decompress`] allocates only its fixed-size codec state, whatever the input claims; zstd frames are
//! decoded in one shot straight into `out`, so a frame header announcing a large window or content size cannot
//! make it allocate more. [`compress`] allocates at most about the input's size.

use std::cell::RefCell;
use std::ops::RangeInclusive;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use zstd::zstd_safe;

use super::entry::COMPRESSED as COMPRESSED_FLAG;
use super::header::{MAX_CLUSTER_BITS, MIN_CLUSTER_BITS};
use super::CompressionType;

/// Compressed data is counted in 512-byte sectors regardless of the image's cluster size.
const SECTOR: u64 = 512;
/// QEMU's deflate window: `deflateInit2(..., -12, ...)`.
const DEFLATE_WINDOW_BITS: u8 = 12;

/// A compressed cluster could not be described, compressed or decompressed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CompressionError {
    /// `cluster_bits` is outside 9..=21, so the descriptor layout is undefined.
    #[error("cluster_bits {bits} outside 9..=21: no compressed descriptor layout")]
    ClusterBits {
        /// The `cluster_bits` given.
        bits: u32,
    },
    /// Zero bytes of compressed data cannot be described.
    #[error("compressed data of zero bytes at {host_offset:#x} cannot be described")]
    Empty {
        /// Where the data would start.
        host_offset: u64,
    },
    /// The host offset does not fit the descriptor's offset field.
    #[error("compressed data offset {host_offset:#x} does not fit the descriptor's {offset_bits}-bit offset field")]
    OffsetTooLarge {
        /// Where the data starts.
        host_offset: u64,
        /// The width of the offset field at this cluster size.
        offset_bits: u32,
    },
    /// The data spans more sectors than the descriptor's sector field can count.
    #[error("compressed data of {len:#x} bytes at {host_offset:#x} spans more than {max_sectors:#x} sectors")]
    TooLong {
        /// Where the data starts.
        host_offset: u64,
        /// The data length.
        len: u64,
        /// The most sectors the field can count at this cluster size.
        max_sectors: u64,
    },
    /// The compressed stream is malformed.
    #[error("corrupt {kind:?} data after {consumed:#x} input bytes and {produced:#x} output bytes: {reason}")]
    Corrupt {
        /// The compression type.
        kind: CompressionType,
        /// What the decoder reported.
        reason: &'static str,
        /// Input bytes consumed before the failure.
        consumed: u64,
        /// Output bytes produced before the failure.
        produced: u64,
    },
    /// The compressed stream ends before the cluster is full.
    #[error("{kind:?} data ends after {consumed:#x} input bytes with {produced:#x} of {expected:#x} output bytes")]
    ShortOutput {
        /// The compression type.
        kind: CompressionType,
        /// Input bytes consumed.
        consumed: u64,
        /// Output bytes produced.
        produced: u64,
        /// The output size asked for (one cluster).
        expected: u64,
    },
    /// The codec itself failed (for example it could not allocate its state); the data may be fine.
    #[error("{kind:?} codec failed: {reason}")]
    Codec {
        /// The compression type.
        kind: CompressionType,
        /// What failed.
        reason: &'static str,
    },
}

/// Where a compressed cluster's bytes are: the decoded form of a compressed L2 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CompressedDescriptor {
    /// Host byte offset of the first compressed byte; not aligned.
    pub host_offset: u64,
    /// Number of 512-byte sectors the data touches, counted from the sector holding `host_offset`; at least 1.
    pub sectors: u64,
}

impl CompressedDescriptor {
    /// Decodes a compressed L2 entry (bit 62 set; bits 62 and 63 are not part of either field). `cluster_bits`
    /// comes from a validated header; values outside 9..=21 are clamped into that range.
    pub fn decode(entry: u64, cluster_bits: u32) -> Self {
        let (offset_bits, sector_bits) = layout(cluster_bits.clamp(MIN_CLUSTER_BITS, MAX_CLUSTER_BITS));
        let host_offset = entry & mask(offset_bits);
        let sectors = ((entry >> offset_bits) & mask(sector_bits)) + 1;
        CompressedDescriptor { host_offset, sectors }
    }

    /// The L2 entry for `compressed_len` bytes stored at `host_offset`, with bit 62 set and COPIED clear. The
    /// sector field is `((offset + len - 1) >> 9) - (offset >> 9)`, as QEMU writes it.
    ///
    /// # Errors
    /// [`CompressionError::ClusterBits`] outside 9..=21, [`CompressionError::Empty`] for zero bytes,
    /// [`CompressionError::OffsetTooLarge`] when the offset needs more than `62 - (cluster_bits - 8)` bits, and
    /// [`CompressionError::TooLong`] when the data spans more sectors than the field counts.
    pub fn encode(host_offset: u64, compressed_len: u64, cluster_bits: u32) -> Result<u64, CompressionError> {
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(CompressionError::ClusterBits { bits: cluster_bits });
        }
        let (offset_bits, sector_bits) = layout(cluster_bits);
        if compressed_len == 0 {
            return Err(CompressionError::Empty { host_offset });
        }
        if host_offset > mask(offset_bits) {
            return Err(CompressionError::OffsetTooLarge { host_offset, offset_bits });
        }
        // host_offset < 2^54 and a length that overflows is certainly too long.
        let too_long =
            CompressionError::TooLong { host_offset, len: compressed_len, max_sectors: mask(sector_bits) + 1 };
        let last = host_offset.checked_add(compressed_len - 1).ok_or(too_long.clone())?;
        let field = (last / SECTOR) - (host_offset / SECTOR);
        if field > mask(sector_bits) {
            return Err(too_long);
        }
        Ok(COMPRESSED_FLAG | (field << offset_bits) | host_offset)
    }

    /// Bytes a reader may fetch from `host_offset`: up to the end of the last sector. QEMU reads exactly this much
    /// and counts exactly this range in refcounts.
    pub fn readable_len(&self) -> u64 {
        self.sectors.saturating_mul(SECTOR).saturating_sub(self.host_offset % SECTOR)
    }

    /// The host clusters (by index, offset >> cluster_bits) that `[host_offset, host_offset + readable_len)`
    /// touches; each gets one refcount from this entry. Data may cross into the next cluster, so there can be two.
    pub fn host_clusters(&self, cluster_bits: u32) -> RangeInclusive<u64> {
        let bits = cluster_bits.min(63);
        let last_byte = self.host_offset.saturating_add(self.readable_len().max(1) - 1);
        (self.host_offset >> bits)..=(last_byte >> bits)
    }
}

/// The widths of the offset and sector fields at `cluster_bits` (9..=21).
fn layout(cluster_bits: u32) -> (u32, u32) {
    let sector_bits = cluster_bits - 8;
    (62 - sector_bits, sector_bits)
}

fn mask(bits: u32) -> u64 {
    (1u64 << bits) - 1
}

/// Decompresses one cluster: fills all of `out` from the compressed bytes in `input`, which may run on past the
/// end of the stream (the descriptor only knows the length to a sector).
///
/// # Errors
/// [`CompressionError::Corrupt`] for a malformed stream (or, for zstd, a frame producing more than `out` holds),
/// [`CompressionError::ShortOutput`] when the input ends or the stream finishes before `out` is full,
/// [`CompressionError::Codec`] when the codec cannot start.
pub fn decompress(kind: CompressionType, input: &[u8], out: &mut [u8]) -> Result<(), CompressionError> {
    match kind {
        CompressionType::Deflate => inflate(input, out),
        CompressionType::Zstd => zstd_decompress(input, out),
    }
}

/// Compresses one cluster with the image's compression type. `Ok(None)` means "store it uncompressed": the
/// compressed form would not be smaller than the input, by QEMU's rule (at most `input.len() - 1` bytes, or it
/// is written as a normal cluster).
///
/// # Errors
/// [`CompressionError::Codec`] when the codec fails for another reason than running out of room.
pub fn compress(kind: CompressionType, input: &[u8]) -> Result<Option<Vec<u8>>, CompressionError> {
    compress_at_level(kind, input, None)
}

/// As [`compress`], at `level` instead of the codec's default (QEMU's choice): deflate takes 1..=9, zstd 1..=22;
/// levels outside the range are clamped into it. The output reads back with [`decompress`] whatever the level.
///
/// # Errors
/// As [`compress`].
pub fn compress_at_level(
    kind: CompressionType,
    input: &[u8],
    level: Option<i32>,
) -> Result<Option<Vec<u8>>, CompressionError> {
    let limit = input.len().saturating_sub(1);
    let compressed = match kind {
        CompressionType::Deflate => deflate(input, limit, level)?,
        CompressionType::Zstd => zstd_compress(input, level)?,
    };
    Ok(compressed.filter(|c| c.len() <= limit && !input.is_empty()))
}

thread_local! {
    /// Each thread's last deflate compressor and its level: a compressor's state is large, and a converter
    /// compresses thousands of clusters per thread, so it is reset between clusters rather than rebuilt.
    static DEFLATE: RefCell<Option<(u32, Compress)>> = const { RefCell::new(None) };
    /// Each thread's zstd compression context, for the same reason.
    static ZSTD: RefCell<Option<zstd_safe::CCtx<'static>>> = const { RefCell::new(None) };
}

fn deflate(input: &[u8], limit: usize, level: Option<i32>) -> Result<Option<Vec<u8>>, CompressionError> {
    let level = match level {
        Some(l) => Compression::new(l.clamp(1, 9).unsigned_abs()),
        None => Compression::default(),
    };
    DEFLATE.with(|cell| {
        let mut cached = cell.borrow_mut();
        let c = match cached.take() {
            Some((l, mut c)) if l == level.level() => {
                c.reset();
                c
            }
            _ => Compress::new_with_window_bits(level, false, DEFLATE_WINDOW_BITS),
        };
        let (c, result) = deflate_with(c, input, limit);
        // Only a compressor that finished its stream is reused: one that ran out of room still holds output
        // that a reset does not reliably drop.
        if matches!(result, Ok(Some(_))) {
            *cached = Some((level.level(), c));
        }
        result
    })
}

fn deflate_with(mut c: Compress, input: &[u8], limit: usize) -> (Compress, Result<Option<Vec<u8>>, CompressionError>) {
    let codec_err = |reason| CompressionError::Codec { kind: CompressionType::Deflate, reason };
    // QEMU compresses into a buffer of cluster_size - 1 bytes; running out of room there means "don't compress".
    let mut out = Vec::with_capacity(limit);
    loop {
        let before = (c.total_in(), c.total_out());
        let rest = usize::try_from(c.total_in()).ok().and_then(|i| input.get(i..)).unwrap_or(&[]);
        let status = match c.compress_vec(rest, &mut out, FlushCompress::Finish) {
            Ok(status) => status,
            Err(_) => return (c, Err(codec_err("deflate failed"))),
        };
        if status == Status::StreamEnd {
            return (c, Ok(Some(out)));
        }
        if out.len() >= limit || before == (c.total_in(), c.total_out()) {
            return (c, Ok(None));
        }
    }
}

fn zstd_compress(input: &[u8], level: Option<i32>) -> Result<Option<Vec<u8>>, CompressionError> {
    let codec_err = |reason| CompressionError::Codec { kind: CompressionType::Zstd, reason };
    ZSTD.with(|cell| {
        let mut cached = cell.borrow_mut();
        let cctx = match cached.as_mut() {
            Some(cctx) => cctx,
            None => {
                cached.insert(zstd_safe::CCtx::try_create().ok_or(codec_err("cannot create a compression context"))?)
            }
        };
        // Room for any input, so the only failures are real ones; the size rule is applied by the caller. A
        // frame that fits QEMU's cluster_size - 1 buffer is exactly one no longer than that.
        let mut out = Vec::with_capacity(zstd_safe::compress_bound(input.len()));
        let level = level.map_or(zstd_safe::CLEVEL_DEFAULT, |l| l.clamp(1, 22));
        // One-shot compression sets every parameter from the level, so nothing carries over from the last use.
        cctx.compress(&mut out, input, level).map_err(|code| codec_err(zstd_safe::get_error_name(code)))?;
        Ok(Some(out))
    })
}

fn inflate(input: &[u8], out: &mut [u8]) -> Result<(), CompressionError> {
    const KIND: CompressionType = CompressionType::Deflate;
    // Window bits 15 reads every stream QEMU's 12 does, and streams other writers made with larger windows.
    let mut d = Decompress::new(false);
    loop {
        let consumed = d.total_in();
        let produced = d.total_out();
        if produced >= len_u64(out.len()) {
            return Ok(());
        }
        let rest_in = usize::try_from(consumed).ok().and_then(|i| input.get(i..)).unwrap_or(&[]);
        let rest_out = usize::try_from(produced).ok().and_then(|o| out.get_mut(o..)).unwrap_or(&mut []);
        let status = d.decompress(rest_in, rest_out, FlushDecompress::None).map_err(|_| CompressionError::Corrupt {
            kind: KIND,
            reason: "invalid deflate stream",
            consumed,
            produced,
        })?;
        let progressed = d.total_in() != consumed || d.total_out() != produced;
        if d.total_out() < len_u64(out.len()) && (status == Status::StreamEnd || !progressed) {
            return Err(CompressionError::ShortOutput {
                kind: KIND,
                consumed: d.total_in(),
                produced: d.total_out(),
                expected: len_u64(out.len()),
            });
        }
    }
}

fn zstd_decompress(input: &[u8], out: &mut [u8]) -> Result<(), CompressionError> {
    const KIND: CompressionType = CompressionType::Zstd;
    let mut dctx = zstd_safe::DCtx::try_create()
        .ok_or(CompressionError::Codec { kind: KIND, reason: "cannot create a decompression context" })?;
    let (mut consumed, mut produced) = (0usize, 0usize);
    while produced < out.len() {
        let rest_in = input.get(consumed..).unwrap_or(&[]);
        let corrupt = |code| CompressionError::Corrupt {
            kind: KIND,
            reason: zstd_safe::get_error_name(code),
            consumed: len_u64(consumed),
            produced: len_u64(produced),
        };
        if rest_in.is_empty() {
            break;
        }
        // One whole frame at a time, decoded in one shot into what is left of `out`: zstd then needs no window
        // buffer, and a frame larger than the rest of the cluster fails (QEMU's "not fully flushed" error).
        let frame_len = zstd_safe::find_frame_compressed_size(rest_in).map_err(corrupt)?;
        let frame = rest_in.get(..frame_len).unwrap_or(rest_in);
        let rest_out = out.get_mut(produced..).unwrap_or(&mut []);
        let n = dctx.decompress(rest_out, frame).map_err(corrupt)?;
        // Every frame is at least a few bytes long, so the loop ends within input.len() rounds.
        consumed = consumed.saturating_add(frame_len.max(1));
        produced = produced.saturating_add(n);
    }
    if produced < out.len() {
        return Err(CompressionError::ShortOutput {
            kind: KIND,
            consumed: len_u64(consumed),
            produced: len_u64(produced),
            expected: len_u64(out.len()),
        });
    }
    Ok(())
}

fn len_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::path::Path;
    use std::process::Command;

    const KINDS: [CompressionType; 2] = [CompressionType::Deflate, CompressionType::Zstd];

    fn run(dir: &Path, prog: &str, args: &[&str]) {
        let out = match Command::new(prog).current_dir(dir).args(args).output() {
            Ok(out) => out,
            Err(e) => panic!("cannot run {prog} ({e}): install qemu-utils"),
        };
        assert!(out.status.success(), "{prog} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    fn be64(file: &[u8], at: u64) -> u64 {
        u64::from_be_bytes(file[at as usize..at as usize + 8].try_into().unwrap())
    }

    /// A cluster that compresses, but not to nothing.
    fn text_cluster(len: usize) -> Vec<u8> {
        (0..len).map(|i| b"the quick brown fox jumps over the lazy dog "[i % 44] ^ (i / 4096) as u8).collect()
    }

    /// A cluster that does not compress.
    fn noise(len: usize) -> Vec<u8> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn descriptors_round_trip_at_every_cluster_size() {
        for bits in 9..=21u32 {
            let cs = 1u64 << bits;
            for (host, len) in [(0x1234_5e00u64, 1u64), (0x50000, cs - 1), (0x5004f, 0x1b1), (0x501ff, 2), (1, cs)] {
                let entry = CompressedDescriptor::encode(host, len, bits).unwrap();
                assert_eq!(entry >> 62, 1, "bit 62 set, COPIED clear");
                let d = CompressedDescriptor::decode(entry, bits);
                assert_eq!(d.host_offset, host);
                assert_eq!(d.sectors, (host + len - 1) / 512 - host / 512 + 1);
                assert!(d.readable_len() >= len && d.readable_len() < len + 512);
                assert_eq!((host + d.readable_len()) % 512, 0, "ends on a sector boundary");
            }
        }
    }

    #[test]
    fn descriptor_fields_have_qemus_layout() {
        // 64 KiB clusters: x = 54; the entry qemu-io wrote for the second compressed cluster of a fresh image.
        let d = CompressedDescriptor::decode(0x4000_0000_0005_004f, 16);
        assert_eq!(d, CompressedDescriptor { host_offset: 0x5004f, sectors: 1 });
        assert_eq!(d.readable_len(), 0x1b1);
        assert_eq!(d.host_clusters(16), 5..=5);
        let crossing = CompressedDescriptor::decode((2 << 54) | 0x5ff00, 16);
        assert_eq!((crossing.sectors, crossing.readable_len()), (3, 0x500));
        assert_eq!(crossing.host_clusters(16), 5..=6);
        // 2 MiB clusters: x = 49, 13 sector bits; 512-byte clusters: x = 61, 1 sector bit.
        assert_eq!(CompressedDescriptor::decode(u64::MAX, 21).sectors, 1 << 13);
        assert_eq!(CompressedDescriptor::decode(u64::MAX, 21).host_offset, (1 << 49) - 1);
        assert_eq!(
            CompressedDescriptor::decode(u64::MAX, 9),
            CompressedDescriptor { host_offset: (1 << 61) - 1, sectors: 2 }
        );
    }

    #[test]
    fn encode_refuses_what_the_descriptor_cannot_hold() {
        assert_eq!(CompressedDescriptor::encode(0, 10, 8), Err(CompressionError::ClusterBits { bits: 8 }));
        assert_eq!(CompressedDescriptor::encode(0, 10, 22), Err(CompressionError::ClusterBits { bits: 22 }));
        assert_eq!(CompressedDescriptor::encode(0x200, 0, 16), Err(CompressionError::Empty { host_offset: 0x200 }));
        assert_eq!(
            CompressedDescriptor::encode(1 << 54, 10, 16),
            Err(CompressionError::OffsetTooLarge { host_offset: 1 << 54, offset_bits: 54 })
        );
        // 64 KiB clusters count up to 256 sectors.
        assert!(CompressedDescriptor::encode(0x200, 256 * 512, 16).is_ok());
        assert_eq!(
            CompressedDescriptor::encode(0x201, 256 * 512, 16),
            Err(CompressionError::TooLong { host_offset: 0x201, len: 256 * 512, max_sectors: 256 })
        );
        assert!(matches!(CompressedDescriptor::encode(0x200, u64::MAX, 16), Err(CompressionError::TooLong { .. })));
    }

    #[test]
    fn both_codecs_round_trip_a_cluster() {
        for kind in KINDS {
            for bits in [9u32, 12, 16, 21] {
                let cluster = text_cluster(1 << bits);
                let c = compress(kind, &cluster).unwrap().expect("text compresses");
                assert!(c.len() < cluster.len());
                let mut back = vec![0u8; cluster.len()];
                // Pad to the sector as a reader fetches it: trailing bytes are ignored.
                let mut padded = c.clone();
                padded.resize(c.len().next_multiple_of(512), 0xee);
                decompress(kind, &padded, &mut back).unwrap();
                assert!(back == cluster, "{kind:?} at {bits} bits");
            }
        }
    }

    #[test]
    fn incompressible_clusters_are_stored_plain() {
        for kind in KINDS {
            assert_eq!(compress(kind, &noise(1 << 16)).unwrap(), None, "{kind:?}");
            assert_eq!(compress(kind, &[]).unwrap(), None, "{kind:?}");
            assert_eq!(compress(kind, &[0]).unwrap(), None, "{kind:?}");
        }
    }

    #[test]
    fn deflate_uses_a_4_kib_window_like_qemu() {
        // Two identical random 8 KiB halves: a 32 KiB window would find the repeat, a 4 KiB one cannot.
        let half = noise(8192);
        let input = [half.clone(), half].concat();
        assert_eq!(compress(CompressionType::Deflate, &input).unwrap(), None);
        assert!(compress(CompressionType::Zstd, &input).unwrap().is_some());
    }

    #[test]
    fn zstd_reads_several_frames_and_ignores_trailing_bytes() {
        let cluster = text_cluster(1 << 16);
        let (a, b) = cluster.split_at(20_000);
        let mut input = zstd::bulk::compress(a, 3).unwrap();
        input.extend(zstd::bulk::compress(b, 19).unwrap());
        input.extend([0xde, 0xad, 0xbe, 0xef]);
        let mut back = vec![0u8; cluster.len()];
        decompress(CompressionType::Zstd, &input, &mut back).unwrap();
        assert!(back == cluster);
    }

    #[test]
    fn zstd_frames_that_overrun_the_cluster_are_refused() {
        let data = text_cluster(70_000);
        let input = zstd::bulk::compress(&data, 3).unwrap();
        let mut out = vec![0u8; 1 << 16];
        assert!(matches!(decompress(CompressionType::Zstd, &input, &mut out), Err(CompressionError::Corrupt { .. })));
    }

    #[test]
    fn short_and_broken_streams_are_errors() {
        let cluster = text_cluster(1 << 16);
        for kind in KINDS {
            let c = compress(kind, &cluster).unwrap().unwrap();
            let mut out = vec![0u8; cluster.len()];
            assert!(decompress(kind, &[], &mut out).is_err(), "{kind:?} empty input");
            for cut in [1, c.len() / 2] {
                assert!(decompress(kind, &c[..cut], &mut out).is_err(), "{kind:?} cut at {cut}");
            }
            assert!(decompress(kind, &noise(4096), &mut out).is_err(), "{kind:?} garbage");
            // A smaller cluster's stream ends before a larger cluster is full.
            let small = compress(kind, &cluster[..4096]).unwrap().unwrap();
            let err = decompress(kind, &small, &mut out).unwrap_err();
            assert!(matches!(err, CompressionError::ShortOutput { produced: 4096, expected: 0x10000, .. }), "{err}");
            // Filling an empty buffer needs nothing.
            decompress(kind, &[], &mut []).unwrap();
        }
        // A zstd frame is decoded whole, so losing its last byte loses the frame. Deflate may still fill the
        // cluster without its final bytes (the end-of-block code), which QEMU accepts too.
        let c = compress(CompressionType::Zstd, &cluster).unwrap().unwrap();
        let mut out = vec![0u8; cluster.len()];
        assert!(decompress(CompressionType::Zstd, &c[..c.len() - 1], &mut out).is_err());
        let err = decompress(CompressionType::Zstd, &[0x28, 0xb5, 0x2f, 0xfd, 0xff], &mut [0u8; 512]).unwrap_err();
        assert!(err.to_string().starts_with("corrupt Zstd data after 0x0 input bytes"), "{err}");
    }

    /// Writes two compressed clusters with qemu-io into a fresh image, then finds, reads and decompresses them by
    /// hand: L1 at the header's offset, L2 in its first entry, the descriptors in the L2's first two entries.
    fn decompress_what_qemu_wrote(compression_type: &str, kind: CompressionType) {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let opt = format!("compression_type={compression_type}");
        run(d, "qemu-img", &["create", "-q", "-f", "qcow2", "-o", &opt, "x.qcow2", "1M"]);
        run(d, "qemu-io", &["-c", "write -c -P 0x5a 0 64k", "-c", "write -c -P 7 64k 64k", "x.qcow2"]);
        let file = std::fs::read(d.join("x.qcow2")).unwrap();
        let l2 = be64(&file, be64(&file, 40)) & 0x00ff_ffff_ffff_fe00;
        assert_eq!(l2, 0x40000, "qemu-img's layout for 64 KiB clusters");
        for (index, pattern) in [(0u64, 0x5au8), (1, 7)] {
            let entry = be64(&file, l2 + 8 * index);
            assert_eq!(entry >> 62, 1, "compressed, not COPIED");
            let desc = CompressedDescriptor::decode(entry, 16);
            let start = desc.host_offset as usize;
            // qemu-img does not pad the file after the last compressed cluster: the readable range runs past
            // EOF, and QEMU reads the missing tail of the sector as zeros.
            let end = start + desc.readable_len() as usize;
            let mut input = file[start..end.min(file.len())].to_vec();
            input.resize(end - start, 0);
            let mut out = vec![0u8; 1 << 16];
            decompress(kind, &input, &mut out).unwrap();
            assert!(out.iter().all(|&b| b == pattern), "cluster {index}");
        }
    }

    #[test]
    fn decompresses_deflate_clusters_written_by_qemu() {
        decompress_what_qemu_wrote("zlib", CompressionType::Deflate);
    }

    #[test]
    fn decompresses_zstd_clusters_written_by_qemu() {
        decompress_what_qemu_wrote("zstd", CompressionType::Zstd);
    }

    #[test]
    fn qemu_reads_what_we_compress() {
        for (name, kind) in [("zlib", CompressionType::Deflate), ("zstd", CompressionType::Zstd)] {
            let dir = tempfile::tempdir().unwrap();
            let d = dir.path();
            let opt = format!("compression_type={name}");
            run(d, "qemu-img", &["create", "-q", "-f", "qcow2", "-o", &opt, "x.qcow2", "1M"]);
            // Let QEMU allocate the L2 with one compressed cluster, then replace that cluster's bytes and
            // descriptor with ours, appended at the end of the file.
            run(d, "qemu-io", &["-c", "write -c -P 1 0 64k", "x.qcow2"]);
            let mut file = std::fs::read(d.join("x.qcow2")).unwrap();
            let cluster = text_cluster(1 << 16);
            let data = compress(kind, &cluster).unwrap().unwrap();
            let host = file.len().next_multiple_of(1 << 16) as u64;
            file.resize(host as usize, 0);
            file.extend_from_slice(&data);
            let entry = CompressedDescriptor::encode(host, data.len() as u64, 16).unwrap();
            file[0x40000..0x40008].copy_from_slice(&entry.to_be_bytes());
            std::fs::write(d.join("x.qcow2"), &file).unwrap();
            std::fs::write(d.join("want.raw"), &cluster).unwrap();
            run(d, "qemu-img", &["convert", "-O", "raw", "x.qcow2", "got.raw"]);
            let got = std::fs::read(d.join("got.raw")).unwrap();
            assert!(got[..1 << 16] == cluster[..], "{name}: QEMU decodes our data");
        }
    }

    proptest! {
        #[test]
        fn random_input_never_panics(input in proptest::collection::vec(any::<u8>(), 0..2048), out_len in 0usize..9000) {
            let mut out = vec![0u8; out_len];
            for kind in KINDS {
                let _ = decompress(kind, &input, &mut out);
            }
        }

        #[test]
        fn random_zstd_frame_headers_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..64)) {
            let input = [&[0x28, 0xb5, 0x2f, 0xfd][..], &tail].concat();
            let _ = decompress(CompressionType::Zstd, &input, &mut [0u8; 4096]);
        }

        #[test]
        fn compressed_data_decompresses(seed in any::<u64>(), run_len in 1usize..64) {
            let data: Vec<u8> = (0..4096).map(|i| ((i / run_len) as u64 ^ seed).to_le_bytes()[i % 8]).collect();
            for kind in KINDS {
                if let Some(c) = compress(kind, &data).unwrap() {
                    let mut back = vec![0u8; data.len()];
                    decompress(kind, &c, &mut back).unwrap();
                    prop_assert!(back == data);
                }
            }
        }

        #[test]
        fn any_entry_decodes_within_its_fields(entry in any::<u64>(), bits in 0u32..40) {
            let d = CompressedDescriptor::decode(entry, bits);
            prop_assert!(d.sectors >= 1);
            prop_assert!(d.readable_len() >= 1);
            let r = d.host_clusters(bits);
            prop_assert!(r.start() <= r.end());
        }
    }
}
