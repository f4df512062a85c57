//! What a worker does with one chunk: read its bytes into the chunk's buffer (the one the writer then stores
//! from, so that every byte is copied once, by the kernel), find what is zero (or, for an overlay, what equals
//! the backing file), and compress clusters, producing the [`Piece`]s the writer stores in order.

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
    /// The chunk's bytes.
    pub buf: Vec<u8>,
    /// What to store, in guest order.
    pub pieces: Vec<Piece>,
    /// Where the chunk ends, for progress.
    pub end: u64,
}

/// Whether `buf` is all zeros. Folds blocks without an early exit inside them, so that the fold vectorises, and
/// stops at the first block with data.
pub fn is_zero(buf: &[u8]) -> bool {
    buf.chunks(256).all(|block| block.iter().fold(0u8, |a, &b| a | b) == 0)
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

/// How a worker treats every chunk.
#[derive(Clone, Copy)]
pub struct Rules {
    /// The unit checked for zeros when not compressing.
    pub granule: u64,
    /// Compress clusters, or not.
    pub compression: Option<Compression>,
    /// Whether the destination reads as zeros where not written.
    pub target_is_zero: bool,
}

/// Processes `task`, reading its bytes into `buf`.
pub fn process(task: Task, mut buf: Vec<u8>, source: &Source<'_>, rules: Rules) -> Result<Done> {
    let (offset, len) = match task {
        Task::Zero { offset, len } => {
            buf.clear();
            return Ok(Done { buf, pieces: vec![Piece::Zero { at: offset, len }], end: offset + len });
        }
        Task::Copy { offset, len } => (offset, len),
    };
    let end = offset + len;
    let mut pieces = Vec::new();
    let n = usize::try_from(len).map_err(|_| Error::invalid("convert", "chunk does not fit in memory"))?;
    buf.resize(n, 0);
    source.device.read_at(offset, &mut buf)?;
    if let Some(watch) = source.watch {
        watch.check(offset)?;
    }
    let base = match source.base {
        Some(base) => {
            let mut b = vec![0u8; n];
            base.read_at(offset, &mut b)?;
            Some(b)
        }
        None => None,
    };
    scan(offset, &buf, base.as_deref(), rules, &mut pieces)?;
    Ok(Done { buf, pieces, end })
}

/// Classifies `data` (guest bytes at `at`, the chunk's buffer) unit by unit and appends what to store.
fn scan(at: u64, data: &[u8], base: Option<&[u8]>, rules: Rules, pieces: &mut Vec<Piece>) -> Result<()> {
    let unit = rules.compression.map_or(rules.granule, |c| c.cluster_size);
    let end = at + data.len() as u64;
    // Consecutive units of one class are stored as one piece.
    let mut run: Option<(Class, u64)> = None;
    let close = |pieces: &mut Vec<Piece>, run: Option<(Class, u64)>, to: u64| -> Result<()> {
        match run {
            Some((Class::Data, from)) => {
                pieces.push(Piece::Data { at: from, range: (from - at) as usize..(to - at) as usize })
            }
            Some((Class::Zero, from)) => pieces.push(Piece::Zero { at: from, len: to - from }),
            _ => {}
        }
        Ok(())
    };
    let mut pos = at;
    while pos < end {
        let next = (pos / unit + 1).saturating_mul(unit).min(end);
        let range = (pos - at) as usize..(next - at) as usize;
        let part = slice_of(data, range.clone())?;
        let base_part = match base {
            Some(b) => Some(slice_of(b, range.clone())?),
            None => None,
        };
        let class = classify(part, base_part, rules.target_is_zero);
        match rules.compression {
            Some(c) if class == Class::Data => {
                close(pieces, run.take(), pos)?;
                match compressed(c, pos, part)? {
                    Some(bytes) => pieces.push(Piece::Compressed { at: pos, bytes }),
                    None => pieces.push(Piece::Data { at: pos, range }),
                }
            }
            _ if class != Class::Data => {
                if run.is_none_or(|(current, _)| current != class) {
                    close(pieces, run.take(), pos)?;
                    run = Some((class, pos));
                }
            }
            _ => match run {
                Some((current, _)) if current == class => {}
                _ => {
                    close(pieces, run.take(), pos)?;
                    run = Some((class, pos));
                }
            },
        }
        pos = next;
    }
    close(pieces, run, end)
}

/// The compressed form of the cluster `data` at `at` (the last one of a disk may be short: it is compressed zero
/// padded), or `None` where compression does not shrink it: it is then stored as data, as QEMU does.
fn compressed(c: Compression, at: u64, data: &[u8]) -> Result<Option<Vec<u8>>> {
    let failed = |_| Error::corrupt("compressing a cluster failed", at);
    if data.len() as u64 == c.cluster_size {
        return compress_at_level(c.kind, data, c.level).map_err(failed);
    }
    let mut whole = vec![0u8; c.cluster_size as usize];
    if let Some(head) = whole.get_mut(..data.len()) {
        head.copy_from_slice(data);
    }
    compress_at_level(c.kind, &whole, c.level).map_err(failed)
}
