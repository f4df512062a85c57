//! Discard: the guest no longer needs a range, so it reads as zeros from now on and whole clusters give their
//! host space back.
//!
//! Whole clusters are unmapped: their L2 entry becomes a zero-flag entry (version 3, and always when a backing
//! file must not show through) or unallocated (version 2 without a backing file), and their host clusters are
//! released once the new entry is durable, like any other dropped reference. An L2 table left with nothing but
//! entries that read as zeros without help is freed too, when no backing file could show through its absence.
//! Partial clusters, and clusters whose entry cannot express "zeros" (version 2 over a backing file; external
//! data files, whose clusters are not refcounted), are written with zeros instead.
//!
//! Freed host clusters inside the file are then punched out of it (`BlockDevice::discard`), under the metadata
//! lock so that no allocation can hand them out in between.

use std::sync::atomic::Ordering;

use super::meta::Meta;
use super::Image;
use crate::block::BlockDevice;
use crate::error::{Error, Result};
use crate::format::{GuestOffset, L1Entry, L2Entry, L2Kind, SubclusterBitmap};

/// What discards have done since the image was opened, in 512-byte sectors.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiscardStats {
    /// Sectors written with zeros because they did not cover whole clusters.
    pub erased_sectors: u64,
    /// Sectors whose clusters were unmapped.
    pub unmapped_sectors: u64,
}

/// How a discard treats one whole guest cluster.
enum Unmap {
    /// Already reads as zeros and holds nothing.
    Nothing,
    /// Replace the entry and release these host clusters (first, count).
    Entry(L2Entry, Option<(u64, u64)>),
    /// The entry cannot say "zeros" here: write zeros.
    WriteZeros,
}

impl Meta {
    /// Unmaps whole guest clusters `first..=last`. Returns the clusters that ended with nothing (to count as
    /// unmapped) and the guest clusters that must be written with zeros instead.
    fn unmap_clusters(
        &mut self,
        dev: &dyn BlockDevice,
        first: u64,
        last: u64,
        backed: bool,
    ) -> Result<(u64, Vec<u64>)> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let v3 = self.header.version >= 3;
        let external = self.data_file_size.is_some();
        let (mut unmapped, mut zero_instead) = (0, Vec::new());
        let mut touched_l2 = Vec::new();
        for guest_cluster in first..=last {
            let guest = GuestOffset(guest_cluster * cs);
            let l1_index = geo.l1_index(guest);
            let l2 = self.l1_entry(dev, l1_index)?.l2_offset();
            let index = geo.l2_index(guest);
            let entry = match l2 {
                Some(l2) => self.l2_entry(dev, l2, index)?,
                None => L2Entry(0),
            };
            let at = l2.map_or(0, |l2| l2.0 + index * geo.l2_entry_size());
            let kind = entry.kind(&geo).map_err(|what| Error::corrupt(what, at))?;
            let reads_zero = if v3 { L2Entry::zero(None) } else { L2Entry(0) };
            let bitmap = match l2 {
                Some(l2) if geo.extended_l2 => self.l2_bitmap(dev, l2, index)?,
                _ => SubclusterBitmap::default(),
            };
            let action = match kind {
                _ if external => Unmap::WriteZeros,
                // Extended entries say "zeros" with their subcluster zero bits.
                L2Kind::Unallocated | L2Kind::Zero { host: None } if geo.extended_l2 => {
                    if bitmap == SubclusterBitmap::ALL_ZERO || (bitmap == SubclusterBitmap::default() && !backed) {
                        Unmap::Nothing
                    } else {
                        Unmap::Entry(L2Entry(0), None)
                    }
                }
                L2Kind::Unallocated if !backed => Unmap::Nothing,
                L2Kind::Zero { host: None } => Unmap::Nothing,
                _ if backed && !v3 => Unmap::WriteZeros,
                L2Kind::Unallocated => Unmap::Entry(L2Entry::zero(None), None),
                L2Kind::Normal { host, .. } | L2Kind::Zero { host: Some(host) } => {
                    Unmap::Entry(reads_zero, Some((host.0 / cs, 1)))
                }
                L2Kind::Compressed { host, len } => {
                    let first = host.0 / cs;
                    let last = (host.0 + len.max(1) - 1) / cs;
                    Unmap::Entry(reads_zero, Some((first, last - first + 1)))
                }
            };
            match action {
                Unmap::Nothing => unmapped += 1,
                Unmap::WriteZeros => zero_instead.push(guest_cluster),
                Unmap::Entry(new, release) => {
                    let l2 = self.l2_for_write(dev, l1_index)?;
                    if geo.extended_l2 {
                        self.set_l2_entry(dev, l2, index, L2Entry(0))?;
                        self.set_l2_bitmap(dev, l2, index, SubclusterBitmap::ALL_ZERO)?;
                    } else {
                        self.set_l2_entry(dev, l2, index, new)?;
                    }
                    if let Some((first, count)) = release {
                        for cluster in first..first + count {
                            self.free_later(cluster);
                        }
                    }
                    if touched_l2.last() != Some(&l1_index) {
                        touched_l2.push(l1_index);
                    }
                    unmapped += 1;
                }
            }
        }
        if !backed && !external {
            for l1_index in touched_l2 {
                self.free_l2_if_empty(dev, l1_index)?;
            }
        }
        Ok((unmapped, zero_instead))
    }

    /// Frees the L2 table of `l1_index` when every entry reads as zeros without a host cluster: with no backing
    /// file, an absent table says the same.
    fn free_l2_if_empty(&mut self, dev: &dyn BlockDevice, l1_index: u64) -> Result<()> {
        let entry = self.l1_entry(dev, l1_index)?;
        let Some(l2) = entry.l2_offset() else { return Ok(()) };
        let geo = self.geo;
        for index in 0..geo.l2_entries() {
            let e = self.l2_entry(dev, l2, index)?;
            let empty = e.0 == 0 || e == L2Entry::zero(None);
            let bitmap = if geo.extended_l2 { self.l2_bitmap(dev, l2, index)? } else { SubclusterBitmap::default() };
            if !empty || bitmap.allocated() != 0 {
                return Ok(());
            }
        }
        self.set_l1_entry(dev, l1_index, L1Entry(0))?;
        // Unlinked: its edits need never reach the disk, and its cluster may soon hold something else.
        self.cache.remove(l2.0);
        self.free_later(l2.0 / geo.cluster_size());
        Ok(())
    }
}

impl<D: BlockDevice> Image<D> {
    /// Discards `count` sectors from `sector`: afterwards they read as zeros, and whole clusters give their host
    /// space back (punched out of the file where the device supports it). A free tail of the file is truncated at
    /// once when the refcounts are trusted (an image created here, rebuilt, or verified by
    /// [`verify_refcounts`](Self::verify_refcounts), `check_on_connect`, a compaction or the reclaimer).
    ///
    /// # Errors
    /// `ReadOnly` for a read-only image and `Unimplemented` when the configuration does not enable discard (both
    /// change nothing); `InvalidArgument` for a range past the end; `Corrupt`, `Io`, `Disconnected`.
    pub fn discard(&self, sector: u64, count: u64) -> Result<()> {
        self.observe(self.discard_guest(sector, count))
    }

    fn discard_guest(&self, sector: u64, count: u64) -> Result<()> {
        self.check_writable("discard")?;
        if !self.config.discard {
            return Err(Error::Unimplemented { op: "discard" });
        }
        let size = self.virtual_size().next_multiple_of(512);
        let start = sector.checked_mul(512);
        let end = count.checked_mul(512).and_then(|len| start?.checked_add(len));
        let (Some(start), Some(end)) = (start, end) else {
            return Err(Error::invalid("discard", "sector range overflows"));
        };
        if end > size {
            return Err(Error::invalid("discard", format!("range {start:#x}..{end:#x} is past the end ({size:#x})")));
        }
        if start == end {
            return Ok(());
        }
        super::metrics::Counters::add(&self.counters.discarded_bytes, end - start);
        // Recorded before anything is unmapped (the lock is taken again piece by piece below).
        drop(self.lock_for_write(start, end - start, true)?);
        self.note_unflushed();
        let cs = self.geo.cluster_size();
        // Whole clusters inside the range; the virtual disk's last cluster counts as whole up to the disk's end.
        let first_whole = start.div_ceil(cs);
        let end_whole = if end == size { end.div_ceil(cs) } else { end / cs };
        let mut zero_ranges = Vec::new();
        if first_whole >= end_whole {
            zero_ranges.push((start, end));
        } else {
            if start < first_whole * cs {
                zero_ranges.push((start, first_whole * cs));
            }
            if end_whole * cs < end {
                zero_ranges.push((end_whole * cs, end));
            }
            let (unmapped, instead) = self.unmap_range(first_whole, end_whole - 1)?;
            self.counters.unmapped_sectors.fetch_add(unmapped * cs / 512, Ordering::Relaxed);
            for cluster in instead {
                zero_ranges.push((cluster * cs, ((cluster + 1) * cs).min(size)));
            }
        }
        for (lo, hi) in zero_ranges {
            if self.geo.extended_l2 && self.data_file.is_none() {
                // One cluster at a time: a range shorter than a cluster may still straddle two.
                let mut pos = lo;
                while pos < hi {
                    let next = (pos / cs + 1) * cs;
                    self.zero_subclusters(pos, next.min(hi))?;
                    pos = next;
                }
            } else {
                self.zero_fill(lo, hi)?;
            }
        }
        Ok(())
    }

    /// Within one cluster of an extended-L2 image: whole subclusters get their zero bit (their host space stays
    /// with the cluster); the partial subclusters at either end are written with zeros.
    fn zero_subclusters(&self, lo: u64, hi: u64) -> Result<()> {
        let cs = self.geo.cluster_size();
        let sub = cs / 32;
        let cluster = lo / cs;
        let (first_sc, end_sc) = ((lo % cs).div_ceil(sub), (hi - cluster * cs) / sub);
        if first_sc >= end_sc {
            return self.zero_fill(lo, hi);
        }
        let mask = SubclusterBitmap::span(first_sc, end_sc);
        let zeroed = {
            let _resize = self.resize.read().unwrap_or_else(|e| e.into_inner());
            let _owned = self.ranges.lock(cluster, cluster + 1);
            let mut m = self.meta();
            let geo = self.geo;
            let guest = GuestOffset(cluster * cs);
            let current = match m.l1_entry(&self.dev, geo.l1_index(guest))?.l2_offset() {
                Some(l2) => m.l2_entry(&self.dev, l2, geo.l2_index(guest))?,
                None => L2Entry(0),
            };
            if current.is_compressed() {
                false
            } else {
                m.mark_dirty(&self.dev)?;
                let l2 = m.l2_for_write(&self.dev, geo.l1_index(guest))?;
                let bitmap = m.l2_bitmap(&self.dev, l2, geo.l2_index(guest))?;
                m.set_l2_bitmap(&self.dev, l2, geo.l2_index(guest), bitmap.with_zeroed(mask))?;
                true
            }
        };
        if !zeroed {
            return self.zero_fill(lo, hi);
        }
        self.counters.unmapped_sectors.fetch_add((end_sc - first_sc) * sub / 512, Ordering::Relaxed);
        let (span_lo, span_hi) = (cluster * cs + first_sc * sub, cluster * cs + end_sc * sub);
        if lo < span_lo {
            self.zero_fill(lo, span_lo)?;
        }
        if span_hi < hi {
            self.zero_fill(span_hi, hi)?;
        }
        Ok(())
    }

    fn unmap_range(&self, first: u64, last: u64) -> Result<(u64, Vec<u64>)> {
        let _resize = self.resize.read().unwrap_or_else(|e| e.into_inner());
        let _owned = self.ranges.lock(first, last + 1);
        let mut m = self.meta();
        m.mark_dirty(&self.dev)?;
        let pending_before = m.alloc.pending_frees().len();
        let result = m.unmap_clusters(&self.dev, first, last, self.backing.is_some())?;
        let released: Vec<u64> = m.alloc.pending_frees().get(pending_before..).unwrap_or(&[]).to_vec();
        if !released.is_empty() {
            // Make the new entries durable and drop the refcounts now, so the space can be punched out at once.
            m.writeback(&self.dev)?;
            self.punch_free(&mut m, &released)?;
            // A free tail is given back at once, as the reclaimer of the reference package does, where the
            // refcounts are known to say what is free.
            if let Some(trusted) = m.trusted()? {
                m.trim_file(&self.dev, trusted)?;
            }
        }
        Ok(result)
    }

    /// Punches freed clusters out of the file. Done under the metadata lock: nothing can allocate them between
    /// the refcount reaching zero and the punch.
    fn punch_free(&self, m: &mut Meta, clusters: &[u64]) -> Result<()> {
        let cs = self.geo.cluster_size();
        let file = self.dev.info().size_bytes();
        for &cluster in clusters {
            if cluster * cs + cs > file || m.refcount(&self.dev, cluster)? != 0 {
                continue;
            }
            match self.dev.discard(cluster * cs / 512, cs / 512) {
                Ok(()) => m.reclaim.punched(cluster),
                // Devices that cannot punch keep the cluster's old bytes; it is free, so nothing reads them.
                Err(e) if e.kind() == crate::ErrorKind::Unimplemented => {
                    self.counters.punch_unsupported.store(true, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Makes `[lo, hi)` read as zeros by writing zeros, unless it already reads as zeros.
    fn zero_fill(&self, lo: u64, hi: u64) -> Result<()> {
        if self.map(lo, hi - lo)?.iter().all(|e| self.reads_as_zeros(e)) {
            return Ok(());
        }
        crate::block::write_zeros(self, lo, hi - lo)?;
        self.counters.erased_sectors.fetch_add((hi - lo) / 512, Ordering::Relaxed);
        Ok(())
    }

    /// Whether an extent of this image reads as zeros without reading data (a backing file may show through
    /// unallocated clusters).
    pub(crate) fn reads_as_zeros(&self, extent: &super::Extent) -> bool {
        match extent.kind {
            super::ExtentKind::Zero => true,
            super::ExtentKind::Unallocated => self.backing.is_none(),
            _ => false,
        }
    }

    /// What discards have done since the image was opened.
    pub fn stats(&self) -> DiscardStats {
        DiscardStats {
            erased_sectors: self.counters.erased_sectors.load(Ordering::Relaxed),
            unmapped_sectors: self.counters.unmapped_sectors.load(Ordering::Relaxed),
        }
    }
}
