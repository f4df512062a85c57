//! Progress for operations the library runs in one call (a check): a device wrapper that counts the bytes read
//! through it against an estimate of what the operation will read.
//!
//! For a check, the estimate is the metadata a walk reads: one cluster per L2 table the active L1 table points
//! to and per refcount block the refcount table points to, taken from the header before the check starts.
//! The check also reads snapshot trees and reads refcount blocks again, so the bar is held below 100% until
//! the operation returns.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use qcow::block::{BlockDevice, FileDevice};
use qcow::format::Header;

use crate::progress::Progress;

/// A device that reports the bytes read through it as progress.
pub struct Metered<'a> {
    inner: &'a FileDevice,
    read: AtomicU64,
    total: u64,
    progress: Mutex<Progress>,
}

impl<'a> Metered<'a> {
    /// Counts reads of `inner` against `total` bytes.
    pub fn new(inner: &'a FileDevice, total: u64, progress: Progress) -> Self {
        Metered { inner, read: AtomicU64::new(0), total: total.max(1), progress: Mutex::new(progress) }
    }

    /// Reports the operation done.
    pub fn finish(&self) {
        self.progress.lock().unwrap_or_else(|e| e.into_inner()).finish(self.total);
    }

    fn count(&self, bytes: u64) {
        let read = self.read.fetch_add(bytes, Ordering::Relaxed).saturating_add(bytes);
        // Held at 99% until the operation returns: the estimate cannot know every read.
        let shown = read.min(self.total.saturating_mul(99) / 100);
        self.progress.lock().unwrap_or_else(|e| e.into_inner()).set(shown, self.total);
    }
}

/// Bytes a check of the qcow2 image on `dev` will read, roughly: its header cluster, L1 and refcount tables, and
/// one cluster per L2 table and refcount block they point to. The file's length when the header cannot be
/// read (the check itself will say why).
pub fn check_estimate(dev: &FileDevice) -> u64 {
    let file_len = dev.len_bytes();
    estimate(dev).unwrap_or(file_len).clamp(1, file_len.max(1))
}

/// Reads `len` bytes at `offset` of the file; `None` past its end or on error.
fn read(dev: &FileDevice, offset: u64, len: u64) -> Option<Vec<u8>> {
    let end = offset.checked_add(len)?;
    if end > dev.len_bytes() {
        return None;
    }
    let start = offset - offset % 512;
    let mut buf = vec![0u8; usize::try_from(end.next_multiple_of(512) - start).ok()?];
    dev.read_at(start, &mut buf).ok()?;
    buf.get(usize::try_from(offset - start).ok()?..).map(<[u8]>::to_vec)
}

fn nonzero_entries(table: &[u8]) -> u64 {
    table.chunks_exact(8).filter(|e| e.iter().any(|&b| b != 0)).count() as u64
}

fn estimate(dev: &FileDevice) -> Option<u64> {
    let first = read(dev, 0, 512)?;
    let cluster_bits = Header::peek_cluster_bits(&first).ok()?;
    let cs = 1u64 << cluster_bits;
    let header = Header::parse(&read(dev, 0, cs.min(dev.len_bytes()))?).ok()?;
    let l1_bytes = u64::from(header.l1_size) * 8;
    let reftable_bytes = u64::from(header.refcount_table_clusters) * cs;
    let l1 = read(dev, header.l1_table_offset, l1_bytes)?;
    let reftable = read(dev, header.refcount_table_offset, reftable_bytes)?;
    let tables = nonzero_entries(&l1) + nonzero_entries(&reftable);
    Some(cs + l1_bytes + reftable_bytes + tables * cs)
}

impl BlockDevice for Metered<'_> {
    qcow::forward_block_device_methods!(inner; info, write, flush, resize, discard, zero_range, disconnect, write_at);
    fn read(&self, sector: u64, bufs: &mut [std::io::IoSliceMut<'_>]) -> qcow::Result<()> {
        let bytes: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        self.inner.read(sector, bufs)?;
        self.count(bytes);
        Ok(())
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> qcow::Result<()> {
        self.inner.read_at(offset, buf)?;
        self.count(buf.len() as u64);
        Ok(())
    }
}
