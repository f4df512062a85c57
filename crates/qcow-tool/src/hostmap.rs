//! What QEMU's block status learns from a qcow2 file beyond the library's guest mapping, so that `map` prints
//! what `qemu-img map` prints:
//! - the host cluster still allocated under a zero cluster ("zero" with an "offset");
//! - the host cluster of an extended L2 entry under its unallocated subclusters (not "present", "zero" where
//!   nothing below answers, with an "offset");
//! - whether the image looks metadata-preallocated (QEMU's test: more clusters with a nonzero refcount than the
//!   file really allocates, by a tenth and at least two), in which case QEMU asks the file system about each
//!   data range and reports file holes as zeros.
//!
//! Both read the image's tables straight from the file, as QEMU does on open.

use std::os::unix::fs::MetadataExt;

use qcow::block::{BlockDevice, FileDevice};
use qcow::format::{L1Entry, L2Entry, RefcountBlock, RefcountTableEntry};
use qcow::Image;

/// Reads `len` bytes at `offset` of the file; `None` past its end or on error (QEMU would fail the query; the
/// library's own mapping already read these tables, so this does not happen on an image it opened).
pub fn read(dev: &FileDevice, offset: u64, len: u64) -> Option<Vec<u8>> {
    let end = offset.checked_add(len)?;
    if end > dev.len_bytes() {
        return None;
    }
    let start = offset - offset % 512;
    let mut buf = vec![0u8; usize::try_from(end.next_multiple_of(512) - start).ok()?];
    dev.read_at(start, &mut buf).ok()?;
    buf.get(usize::try_from(offset - start).ok()?..).map(<[u8]>::to_vec)
}

fn be64(bytes: &[u8], at: usize) -> u64 {
    bytes.get(at..at + 8).and_then(|b| b.try_into().ok()).map_or(0, u64::from_be_bytes)
}

/// Looks up host clusters behind guest offsets, keeping the last L1 entry and L2 table read.
pub struct HostLookup<'a> {
    image: &'a Image<FileDevice>,
    /// The last L1 entry read: its index and the offset of its L2 table (0 for none).
    l1: Option<(u64, u64)>,
    l2: Option<(u64, Vec<u8>)>,
}

impl<'a> HostLookup<'a> {
    /// Lookups in `image`'s active L1 table.
    pub fn new(image: &'a Image<FileDevice>) -> Self {
        HostLookup { image, l1: None, l2: None }
    }

    /// Bytes of one L2 entry (the first eight hold the offset in both forms).
    fn entry_bytes(&self) -> u64 {
        if self.image.header().has_extended_l2() {
            16
        } else {
            8
        }
    }

    /// The offset of the L2 table behind L1 entry `l1_index`; `None` when it has none.
    fn l2_offset(&mut self, l1_index: u64) -> Option<u64> {
        let header = self.image.header();
        if l1_index >= u64::from(header.l1_size) {
            return None;
        }
        let l2_offset = match self.l1 {
            Some((index, offset)) if index == l1_index => offset,
            _ => {
                let at = header.l1_table_offset.checked_add(l1_index * 8)?;
                let offset = L1Entry(be64(&read(self.image.device(), at, 8)?, 0)).offset_field();
                self.l1 = Some((l1_index, offset));
                offset
            }
        };
        (l2_offset != 0).then_some(l2_offset)
    }

    /// The host offset of guest byte `guest`, if its L2 entry points to an uncompressed host cluster.
    pub fn host(&mut self, guest: u64) -> Option<u64> {
        let cs = self.image.geometry().cluster_size();
        let entry_bytes = self.entry_bytes();
        let per_l2 = cs / entry_bytes;
        let cluster = guest / cs;
        let l2_offset = self.l2_offset(cluster / per_l2)?;
        if self.l2.as_ref().is_none_or(|(at, _)| *at != l2_offset) {
            self.l2 = Some((l2_offset, read(self.image.device(), l2_offset, cs)?));
        }
        let table = &self.l2.as_ref()?.1;
        let entry = L2Entry(be64(table, usize::try_from((cluster % per_l2) * entry_bytes).ok()?));
        entry.host_cluster().map(|host| host.0 + guest % cs)
    }

    /// For an unallocated range `guest..end` (`guest < end`): where its first run QEMU reports alike stops (after
    /// `guest`), and the host offset of `guest` that QEMU reports for it. Only an extended L2 entry keeps a host
    /// cluster under unallocated subclusters, so the run is one cluster there, the whole range otherwise; an
    /// L2 table that does not exist is skipped whole.
    pub fn unallocated_run(&mut self, guest: u64, end: u64) -> (u64, Option<u64>) {
        if !self.image.header().has_extended_l2() {
            return (end, None);
        }
        let cs = self.image.geometry().cluster_size();
        let span = cs.saturating_mul(cs / self.entry_bytes());
        let cluster_end = (guest / cs).saturating_add(1).saturating_mul(cs);
        if self.l2_offset(guest / span).is_none() {
            let span_end = (guest / span).saturating_add(1).saturating_mul(span);
            return (span_end.min(end), None);
        }
        (cluster_end.min(end), self.host(guest))
    }
}

/// Whether QEMU would take `image` for metadata-preallocated.
pub fn metadata_preallocated(image: &Image<FileDevice>) -> bool {
    let dev = image.device();
    let header = image.header();
    let cs = image.geometry().cluster_size();
    let file_len = dev.len_bytes();
    let real = dev.file().metadata().map_or(file_len, |m| m.blocks().saturating_mul(512));
    let real_clusters = real / cs;
    let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
    let end_cluster = file_len.div_ceil(cs);
    let table_bytes = u64::from(header.refcount_table_clusters) * cs;
    let Some(table) = read(dev, header.refcount_table_offset, table_bytes) else { return false };
    let per_block = (cs * 8) >> header.refcount_order;
    let mut count = 0u64;
    for (i, entry) in table.chunks_exact(8).enumerate() {
        let first = i as u64 * per_block;
        if first >= end_cluster || count >= threshold {
            break;
        }
        let offset = RefcountTableEntry(be64(entry, 0)).offset_field();
        if offset == 0 {
            continue;
        }
        let Some(bytes) = read(dev, offset, cs) else { continue };
        let block = RefcountBlock::new(bytes, header.refcount_order);
        for j in 0..per_block.min(end_cluster - first) {
            count += u64::from(block.get(j).unwrap_or(0) != 0);
            if count >= threshold {
                break;
            }
        }
    }
    count >= threshold
}
