//! What a worker does with one chunk: read it, find what is zero (or, for an overlay, what equals the backing
//! file), and compress clusters, producing the [`Piece`]s the writer stores in order.

use std::ops::Range;

use super::tasks::Task;
use super::{Compression, Source};
use crate::error::{Error, Result};
use crate::format::compress_at_level;

/// One thing to store.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece {
    /// The bytes `range` of the chunk's buffer, at guest offset `at`.
    Data {
        /// Guest offset.
        at: u64,
        /// Bytes of the buffer.
        range: Range<usize>,
    },
    /// Zeros.
    Zero {
        /// Guest offset.
        at: u64,
        /// Bytes.
        len: u64,
    },
    /// The compressed form of the whole cluster at `at`.
    Compressed {
        /// Guest offset of the cluster.
        at: u64,
        /// The compressed bytes.
        bytes: Vec<u8>,
    },
}

/// A processed chunk: its buffer (handed back for reuse once stored) and what to store.
pub struct Done {
    /// The chunk's bytes, as read.
    pub buf: Vec<u8>,
    /// What to store, in guest order.
    pub pieces: Vec<Piece>,
    /// Where the chunk ends, for progress.
    pub end: u64,
}

/// Whether `buf` is all zeros. Folds without an early exit so that it vectorises; callers hand it granules.
pub fn is_zero(buf: &[u8]) -> bool {
    let mut words = buf.chunks_exact(16);
    let mut acc = 0u128;
    for w in &mut words {
        let mut a = [0u8; 16];
        a.copy_from_slice(w);
        acc |= u128::from_ne_bytes(a);
    }
    acc == 0 && words.remainder().iter().all(|&b| b == 0)
}

/// How one granule (or cluster) is to be stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// Nothing to do: it is zero on a destination that reads as zeros, or equal to the backing file.
    Skip,
    /// Store zeros.
    Zero,
    /// Store the data.
    Data,
}

fn classify(data: &[u8], base: Option<&[u8]>, target_is_zero: bool) -> Class {
    match base {
        // On a destination that may hold anything, equal to the backing file is not enough.
        Some(base) if target_is_zero && data == base => Class::Skip,
        Some(base) if is_zero(data) => {
            if target_is_zero && is_zero(base) {
                Class::Skip
            } else {
                Class::Zero
            }
        }
        Some(_) => Class::Data,
        None if is_zero(data) => {
            if target_is_zero {
                Class::Skip
            } else {
                Class::Zero
            }
        }
        None => Class::Data,
    }
}

fn slice_of(buf: &[u8], range: Range<usize>) -> Result<&[u8]> {
    let (lo, hi) = (range.start, range.end);
    buf.get(range).ok_or_else(|| Error::invalid("convert", format!("internal: bytes {lo}..{hi} of {}", buf.len())))
}

/// Reads and processes `task`, reusing `buf` for the data.
pub fn process(
    task: Task,
    mut buf: Vec<u8>,
    source: &Source<'_>,
    granule: u64,
    compression: Option<Compression>,
    target_is_zero: bool,
) -> Result<Done> {
    let (offset, len) = match task {
        Task::Zero { offset, len } => {
            buf.clear();
            return Ok(Done { buf, pieces: vec![Piece::Zero { at: offset, len }], end: offset + len });
        }
        Task::Copy { offset, len } => (offset, len),
    };
    let n = usize::try_from(len).map_err(|_| Error::invalid("convert", "chunk does not fit in memory"))?;
    buf.resize(n, 0);
    source.device.read_at(offset, &mut buf)?;
    let base = match source.base {
        Some(base) => {
            let mut b = vec![0u8; n];
            base.read_at(offset, &mut b)?;
            Some(b)
        }
        None => None,
    };
    let unit = compression.map_or(granule, |c| c.cluster_size);
    let end = offset + len;
    let mut pieces = Vec::new();
    // Consecutive granules of one class are stored as one piece.
    let mut run: Option<(Class, u64)> = None;
    let close = |pieces: &mut Vec<Piece>, run: Option<(Class, u64)>, to: u64| match run {
        Some((Class::Data, from)) => {
            pieces.push(Piece::Data { at: from, range: (from - offset) as usize..(to - offset) as usize })
        }
        Some((Class::Zero, from)) => pieces.push(Piece::Zero { at: from, len: to - from }),
        _ => {}
    };
    let mut pos = offset;
    while pos < end {
        let next = (pos / unit + 1).saturating_mul(unit).min(end);
        let range = (pos - offset) as usize..(next - offset) as usize;
        let data = slice_of(&buf, range.clone())?;
        let base_data = match &base {
            Some(b) => Some(slice_of(b, range.clone())?),
            None => None,
        };
        let class = classify(data, base_data, target_is_zero);
        match compression {
            Some(c) if class == Class::Data => {
                close(&mut pieces, run.take(), pos);
                pieces.push(compressed_piece(c, pos, data, range)?);
            }
            _ => match run {
                Some((current, _)) if current == class => {}
                _ => {
                    close(&mut pieces, run.take(), pos);
                    run = Some((class, pos));
                }
            },
        }
        pos = next;
    }
    close(&mut pieces, run, end);
    Ok(Done { buf, pieces, end })
}

/// Compresses the cluster `data` at `at` (the last one of a disk may be short: it is compressed zero padded);
/// where compression does not shrink it, it is stored as data, as QEMU does.
fn compressed_piece(c: Compression, at: u64, data: &[u8], range: Range<usize>) -> Result<Piece> {
    let failed = |_| Error::corrupt("compressing a cluster failed", at);
    let compressed = if data.len() as u64 == c.cluster_size {
        compress_at_level(c.kind, data, c.level).map_err(failed)?
    } else {
        let mut whole = vec![0u8; c.cluster_size as usize];
        if let Some(head) = whole.get_mut(..data.len()) {
            head.copy_from_slice(data);
        }
        compress_at_level(c.kind, &whole, c.level).map_err(failed)?
    };
    Ok(match compressed {
        Some(bytes) => Piece::Compressed { at, bytes },
        None => Piece::Data { at, range },
    })
}
