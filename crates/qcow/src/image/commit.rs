//! Commit: writing what an image's chain holds above a base image into that base, as `qemu-img commit` does.
//!
//! Which ranges the layers above the base hold is known to whoever opened the chain layer by layer (the caller);
//! this image supplies their contents, read through its own chain. The base, raw or qcow2, is any writable
//! [`BlockDevice`]: it is grown first when it is smaller than this image, then receives the data, and zeros where
//! the chain reads zeros, and is flushed last. Until the flush, the base may hold part of the new data, but this
//! image reads the same throughout, because everything it reads in the ranges written comes from the layers
//! above the base. Emptying this image afterwards ([`Image::make_empty`]) comes only after that flush.

use super::Image;
use crate::block::{BlockDevice, SECTOR_SIZE};
use crate::error::{Error, ErrorKind, Result};

/// Bytes read and written per request.
const CHUNK: u64 = 2 << 20;

/// A guest range that a commit writes into the base.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitRange {
    /// First guest byte (a multiple of 512).
    pub offset: u64,
    /// Length in bytes (a multiple of 512, or up to the end of the disk).
    pub len: u64,
    /// Whether the chain reads zeros here: the base gets zeros, unmapped where it can.
    pub zero: bool,
}

/// What a commit wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommitSummary {
    /// Bytes of data written into the base.
    pub data_bytes: u64,
    /// Bytes made to read as zeros in the base.
    pub zero_bytes: u64,
    /// The base's size before, when it had to grow to this image's size.
    pub grown_from: Option<u64>,
}

impl<D: BlockDevice> Image<D> {
    /// Writes `ranges` of this image's guest view into `base`: data read through this image, and zeros (by
    /// discarding, which leaves the base reading zeros, or by writing them where the base cannot discard) where
    /// the range says the chain reads zeros. A base smaller than this image grows to its size first; the base is
    /// flushed at the end. `progress` is told the bytes done and the bytes to do.
    ///
    /// # Errors
    /// `InvalidArgument` for a range that is not sector aligned or lies past the end of this image; whatever the
    /// base returns for a write, resize, discard or flush; read errors of this image and its backing files.
    pub fn commit_to(
        &self,
        base: &dyn BlockDevice,
        ranges: &[CommitRange],
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<CommitSummary> {
        let size = self.virtual_size().next_multiple_of(SECTOR_SIZE);
        let mut total = 0u64;
        for r in ranges {
            let end = r.offset.checked_add(r.len).filter(|&e| e <= size);
            if r.offset % SECTOR_SIZE != 0 || r.len % SECTOR_SIZE != 0 || end.is_none() {
                return Err(Error::invalid(
                    "commit",
                    format!("range {:#x}+{:#x} is not whole sectors of the disk ({size:#x} bytes)", r.offset, r.len),
                ));
            }
            total += r.len;
        }
        let mut summary = CommitSummary::default();
        let base_size = base.info().size_bytes();
        if base_size < size {
            base.resize(size / SECTOR_SIZE)?;
            summary.grown_from = Some(base_size);
        }
        let mut buf = vec![0u8; CHUNK as usize];
        let mut done = 0;
        progress(0, total);
        for r in ranges {
            if r.zero {
                zero(base, r.offset, r.len)?;
                summary.zero_bytes += r.len;
                done += r.len;
                progress(done, total);
                continue;
            }
            let mut pos = r.offset;
            while pos < r.offset + r.len {
                let len = CHUNK.min(r.offset + r.len - pos);
                let Some(piece) = buf.get_mut(..len as usize) else { break };
                self.read_at(pos, piece)?;
                base.write_at(pos, piece)?;
                summary.data_bytes += len;
                done += len;
                pos += len;
                progress(done, total);
            }
        }
        base.flush()?;
        Ok(summary)
    }
}

/// Makes `len` bytes at `offset` of `dev` read as zeros: discarded where the device can, else written.
fn zero(dev: &dyn BlockDevice, offset: u64, len: u64) -> Result<()> {
    match dev.discard(offset / SECTOR_SIZE, len / SECTOR_SIZE) {
        Err(e) if e.kind() == ErrorKind::Unimplemented => crate::block::write_zeros(dev, offset, len),
        other => other,
    }
}
