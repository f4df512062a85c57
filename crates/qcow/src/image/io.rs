//! Guest reads and writes: map under the lock, move data without it, then commit mappings under it again.
//!
//! A write owns the guest clusters it touches (a range lock) from planning to commit. Clusters it may write in
//! place (refcount one) are written directly; every other cluster gets a new host cluster, filled with the old
//! contents (copy-on-write) or zeros around the new data, and only then linked into its L2 table. A shared
//! cluster is never written in place.

use std::io::{IoSlice, IoSliceMut};

use super::lock_timing::LockUse;
use super::meta::Meta;
use super::ranges::RangeGuard;
use super::Image;
use crate::block::BlockDevice;
use crate::error::{Error, Result};
use crate::format::{GuestOffset, HostOffset, L1Entry, L2Entry, L2Kind};

use super::iov::{self, Gather, Scatter};
use super::mapping::ExtentKind;

/// What a write does to one guest cluster.
#[derive(Debug, Clone, Copy)]
struct ClusterPlan {
    guest_cluster: u64,
    /// Where the cluster's data goes (assigned after planning when `allocate`).
    target: HostOffset,
    /// Whether `target` is a new cluster still to be allocated.
    allocate: bool,
    /// Whether bytes around the new data must be filled (the cluster is new to this mapping).
    fill: Fill,
    /// Host clusters (first, count) to release once the new mapping is durable.
    release: Option<(u64, u64)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fill {
    /// Written in place: only the new bytes are written.
    InPlace,
    /// A fresh mapping whose untouched bytes read as zeros.
    Zeros,
    /// A fresh mapping whose untouched bytes come from the old host cluster.
    CopyFrom(HostOffset),
    /// A fresh mapping whose untouched bytes come from the backing file.
    Backing,
    /// A fresh mapping whose untouched bytes come from a compressed cluster.
    Decompress(HostOffset, u64),
}

fn check_aligned(op: &'static str, offset: u64, len: usize) -> Result<()> {
    if offset % 512 != 0 || len % 512 != 0 {
        return Err(Error::invalid(op, format!("offset {offset:#x} and length {len} must be multiples of 512")));
    }
    Ok(())
}

impl Meta {
    /// The L2 table for `l1_index`, allocated or copied so it may be modified in place.
    pub fn l2_for_write(&mut self, dev: &dyn BlockDevice, l1_index: u64) -> Result<HostOffset> {
        let entry = self.l1_entry(dev, l1_index)?;
        match entry.l2_offset() {
            Some(l2) if entry.is_copied() => Ok(l2),
            old => {
                let cs = self.geo.cluster_size();
                let cluster = self.alloc_clusters(dev, 1)?;
                let new = HostOffset(cluster * cs);
                let bytes = match old {
                    Some(l2) => self.copy_shared_l2(dev, l2)?,
                    None => vec![0u8; cs as usize].into_boxed_slice(),
                };
                self.cache.insert_table(new.0, super::cache::TableKind::L2, &bytes);
                self.set_l1_entry(dev, l1_index, L1Entry::new(new))?;
                if let Some(l2) = old {
                    self.free_later(l2.0 / cs);
                }
                Ok(new)
            }
        }
    }

    /// A private copy of a shared L2 table. Refcounts count references by traversal, so the clusters it maps
    /// were already counted once per L1 table reaching the shared copy: they keep their counts. COPIED flags are
    /// cleared because those clusters stay shared with the old table.
    fn copy_shared_l2(&mut self, dev: &dyn BlockDevice, l2: HostOffset) -> Result<Box<[u8]>> {
        let geo = self.geo;
        let mut bytes = self.table_bytes(dev, l2.0, super::cache::TableKind::L2)?;
        let stride = geo.l2_entry_size() as usize;
        for slot in bytes.chunks_exact_mut(stride) {
            if let Some(flags) = slot.first_mut() {
                *flags &= 0x7f;
            }
        }
        Ok(bytes)
    }

    fn plan_write(&mut self, dev: &dyn BlockDevice, first: u64, last: u64, backed: bool) -> Result<Vec<ClusterPlan>> {
        self.corruption.check()?;
        let geo = self.geo;
        let cs = geo.cluster_size();
        let mut plans = Vec::with_capacity((last - first + 1) as usize);
        let mut needs_new = 0;
        for guest_cluster in first..=last {
            if self.reclaim.moving() {
                // A copy of this cluster in flight would miss what is written now.
                self.reclaim.cancel_move(guest_cluster);
            }
            let guest = GuestOffset(guest_cluster * cs);
            let l2 = self.l2_for_write(dev, geo.l1_index(guest))?;
            let index = geo.l2_index(guest);
            let entry = self.l2_entry(dev, l2, index)?;
            let at = l2.0 + index * geo.l2_entry_size();
            let kind = self.decode_l2(dev, entry, at)?;
            let external = self.data_file_size.is_some();
            let (target, fill, release) = match kind {
                // In an external data file every guest cluster has its fixed place: the guest offset.
                L2Kind::Unallocated if external && entry.is_copied() => (HostOffset(0), Fill::InPlace, None),
                L2Kind::Normal { host, copied: true } => (host, Fill::InPlace, None),
                _ if external => {
                    let fill = if backed && matches!(kind, L2Kind::Unallocated) { Fill::Backing } else { Fill::Zeros };
                    (HostOffset(guest.0), fill, None)
                }
                L2Kind::Zero { host: Some(host) } if entry.is_copied() => (host, Fill::Zeros, None),
                L2Kind::Normal { host, copied: false } => (HostOffset(0), Fill::CopyFrom(host), Some((host.0 / cs, 1))),
                L2Kind::Zero { host: Some(host) } => (HostOffset(0), Fill::Zeros, Some((host.0 / cs, 1))),
                L2Kind::Zero { host: None } => (HostOffset(0), Fill::Zeros, None),
                L2Kind::Unallocated if backed => (HostOffset(0), Fill::Backing, None),
                L2Kind::Unallocated => (HostOffset(0), Fill::Zeros, None),
                L2Kind::Compressed { host, len } => {
                    let first = host.0 / cs;
                    let last = (host.0 + len.max(1) - 1) / cs;
                    (HostOffset(0), Fill::Decompress(host, len), Some((first, last - first + 1)))
                }
            };
            // Everything but in-place writes, preallocated zero clusters and data-file clusters needs a new cluster.
            let allocate = match kind {
                _ if external || fill == Fill::InPlace => false,
                L2Kind::Zero { host: Some(_) } => release.is_some(),
                _ => true,
            };
            if allocate {
                needs_new += 1;
            } else if !external {
                // The target came from an L2 entry on disk: it must not be metadata.
                self.check_data_write(dev, target.0)?;
            }
            plans.push(ClusterPlan { guest_cluster, target, allocate, fill, release });
        }
        if needs_new > 0 {
            let first = self.alloc_clusters(dev, needs_new)?;
            for (plan, cluster) in plans.iter_mut().filter(|p| p.allocate).zip(first..) {
                plan.target = HostOffset(cluster * cs);
            }
        }
        Ok(plans)
    }

    /// The plans of a write that only overwrites clusters in place (each is a normal cluster with refcount one
    /// in an L2 table with refcount one, in the image file), or `None` when any cluster needs more. Changes
    /// nothing but cancelling moves of those clusters.
    fn in_place_plans(&mut self, dev: &dyn BlockDevice, first: u64, last: u64) -> Result<Option<Vec<ClusterPlan>>> {
        self.corruption.check()?;
        if self.data_file_size.is_some() {
            return Ok(None);
        }
        let geo = self.geo;
        let cs = geo.cluster_size();
        let mut plans = Vec::with_capacity((last - first + 1) as usize);
        for guest_cluster in first..=last {
            let guest = GuestOffset(guest_cluster * cs);
            let l1 = self.l1_entry(dev, geo.l1_index(guest))?;
            let Some(l2) = l1.l2_offset().filter(|_| l1.is_copied()) else { return Ok(None) };
            let index = geo.l2_index(guest);
            let entry = self.l2_entry(dev, l2, index)?;
            let at = l2.0 + index * geo.l2_entry_size();
            let L2Kind::Normal { host, copied: true } = self.decode_l2(dev, entry, at)? else { return Ok(None) };
            // The target came from an L2 entry on disk: it must not be metadata.
            self.check_data_write(dev, host.0)?;
            plans.push(ClusterPlan {
                guest_cluster,
                target: host,
                allocate: false,
                fill: Fill::InPlace,
                release: None,
            });
        }
        if self.reclaim.moving() {
            // A copy of these clusters in flight would miss what is written now.
            (first..=last).for_each(|c| self.reclaim.cancel_move(c));
        }
        Ok(Some(plans))
    }

    fn commit_write(&mut self, dev: &dyn BlockDevice, plans: &[ClusterPlan]) -> Result<()> {
        let geo = self.geo;
        for plan in plans.iter().filter(|p| p.fill != Fill::InPlace) {
            let guest = GuestOffset(plan.guest_cluster * geo.cluster_size());
            let l2 = self.l2_for_write(dev, geo.l1_index(guest))?;
            let entry = L2Entry::normal(plan.target);
            self.set_l2_entry(dev, l2, geo.l2_index(guest), entry)?;
            if let Some((first, count)) = plan.release {
                for cluster in first..first + count {
                    self.free_later(cluster);
                }
            }
        }
        Ok(())
    }
}

/// One piece of a vectored device write.
pub(super) enum Piece<'a> {
    /// Bytes owned by the caller.
    Borrowed(&'a [u8]),
    /// Bytes built for this write.
    Owned(Vec<u8>),
}

impl<D: BlockDevice> Image<D> {
    /// Reads `buf.len()` bytes from guest offset `offset`. Both must be multiples of 512. Bytes past the
    /// virtual size (inside the last sector) read as zeros.
    ///
    /// # Errors
    /// `InvalidArgument` for a misaligned or out-of-range request, `Corrupt` for bad metadata on the way,
    /// `Unsupported` for clusters this version cannot decode, `Io`, `Disconnected`.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.observe(self.read_guest(offset, Scatter::one(buf)))
    }

    /// Fills `bufs`, in order, from guest offset `offset`, as one request: the range of all of them is mapped
    /// once, and each extent's data lands in whichever buffers it covers. Every length must be a multiple of 512.
    pub(super) fn read_vectored(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
        self.observe(self.read_guest(offset, Scatter::new(bufs)))
    }

    fn read_guest(&self, offset: u64, bufs: Scatter<'_>) -> Result<()> {
        self.check_connected()?;
        let len = bufs.len();
        check_aligned("read", offset, bufs.misfit(512).unwrap_or(0))?;
        let limit = self.virtual_size().next_multiple_of(512);
        if offset.checked_add(len).is_none_or(|end| end > limit) {
            return Err(Error::invalid("read", format!("range {offset:#x}+{len:#x} is past the end ({limit:#x})")));
        }
        if len == 0 {
            return Ok(());
        }
        let _resize = self.resize.read().unwrap_or_else(|e| e.into_inner());
        self.read_mapped(offset, bufs)?;
        super::metrics::Counters::add(&self.counters.read_bytes, len);
        Ok(())
    }

    /// Reads guest data through the current mapping; the caller holds the resize lock.
    pub(super) fn read_mapped(&self, offset: u64, mut bufs: Scatter<'_>) -> Result<()> {
        let len = bufs.len();
        let (extents, _reading) = {
            // Most reads find their tables cached and map under the shared lock; the rest map exclusively. Either
            // way the read registers before the lock is released, so no cluster it maps is reused until it is
            // done (a reference is removed only under the exclusive lock, before the grace period it waits out).
            let shared = self.meta_shared(LockUse::Lookup);
            match shared.map_cached(offset, len) {
                Some(extents) => (extents, self.read_grace.enter()),
                None => {
                    drop(shared);
                    let mut m = self.meta_for(LockUse::Lookup);
                    let extents = m.map(&self.dev, offset, len)?;
                    (extents, self.read_grace.enter())
                }
            }
        };
        for extent in extents {
            let mut parts = bufs.take(extent.len);
            match extent.kind {
                ExtentKind::Data { host } => {
                    let mut iov: Vec<IoSliceMut<'_>> = parts.into_iter().map(IoSliceMut::new).collect();
                    crate::block::read_vectored_at(self.data_device(), host.0, &mut iov)?;
                }
                ExtentKind::Zero => parts.iter_mut().for_each(|p| p.fill(0)),
                ExtentKind::Unallocated => match &self.backing {
                    Some(backing) => backing.read_pieces(extent.guest.0, &mut parts)?,
                    None => parts.iter_mut().for_each(|p| p.fill(0)),
                },
                ExtentKind::Compressed { host, len } => {
                    let cs = self.geo.cluster_size();
                    let mut cluster = vec![0u8; cs as usize];
                    self.read_compressed(host, len, &mut cluster)?;
                    let at = self.geo.offset_in_cluster(extent.guest.0) as usize;
                    match cluster.get(at..).filter(|src| src.len() as u64 >= extent.len) {
                        Some(src) => iov::scatter_from(&mut parts, src),
                        None => return Err(Error::corrupt("compressed extent outside its cluster", host.0)),
                    }
                }
            }
        }
        Ok(())
    }

    /// Where guest data lives: the external data file when there is one, else the image file.
    fn data_device(&self) -> &dyn BlockDevice {
        match &self.data_file {
            Some(data) => data.as_ref(),
            None => &self.dev,
        }
    }

    /// Decompresses the cluster whose compressed bytes start at `host` into `out` (one cluster). The read is
    /// bounded by the descriptor, and data running past the end of the file is an error, not zeros.
    pub(super) fn read_compressed(&self, host: HostOffset, len: u64, out: &mut [u8]) -> Result<()> {
        let start = host.0 & !511;
        let end = host.0.checked_add(len).ok_or_else(|| Error::corrupt("compressed descriptor overflows", host.0))?;
        if end > self.dev.info().size_bytes() {
            return Err(Error::corrupt("compressed cluster data runs past the end of the file", host.0));
        }
        let mut raw = vec![0u8; (end.next_multiple_of(512) - start) as usize];
        self.dev.read_at(start, &mut raw)?;
        let input = raw.get((host.0 - start) as usize..).unwrap_or(&[]);
        crate::format::decompress(self.compression, input, out)
            .map_err(|_| Error::corrupt("compressed cluster does not decompress to a full cluster", host.0))
    }

    /// Writes `buf` at guest offset `offset`. Both must be multiples of 512.
    ///
    /// # Errors
    /// `ReadOnly`, `InvalidArgument`, `Corrupt`, `Unsupported`, `Io`, `Disconnected`. On `Io` part of the data
    /// may have been written, and clusters may leak; no mapping ever points at unwritten data.
    pub fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.observe(self.write_guest(offset, &Gather::one(buf), true))
    }

    /// Writes `bufs`, in order, at guest offset `offset`, as one request: the clusters of all of them are planned,
    /// allocated and linked together, and each cluster's data is taken from whichever buffers cover it. Every
    /// length must be a multiple of 512.
    pub(super) fn write_vectored(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
        self.observe(self.write_guest(offset, &Gather::new(bufs), true))
    }

    /// A write that no bitmap records: the zeros a resize writes past the old end, which is not a guest write.
    pub(super) fn write_untracked(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.observe(self.write_guest(offset, &Gather::one(buf), false))
    }

    fn write_guest(&self, offset: u64, buf: &Gather<'_>, tracked: bool) -> Result<()> {
        self.check_writable("write")?;
        let len = buf.len();
        check_aligned("write", offset, buf.misfit(512).unwrap_or(0))?;
        let limit = self.virtual_size().next_multiple_of(512);
        if offset.checked_add(len).is_none_or(|end| end > limit) {
            return Err(Error::invalid("write", format!("range {offset:#x}+{len:#x} is past the end ({limit:#x})")));
        }
        if len == 0 {
            return Ok(());
        }
        // Shared for the whole write; the bitmaps record its range before any data moves.
        let _resize = self.lock_for_write(offset, len, tracked)?;
        let cb = self.geo.cluster_bits;
        let first = offset >> cb;
        let last = (offset + len - 1) >> cb;
        super::metrics::Counters::add(&self.counters.written_bytes, len);
        self.note_unflushed();
        if self.geo.extended_l2 {
            // Subcluster bitmaps change even on in-place writes: always exclusive.
            let _owned = self.ranges.lock(first, last + 1);
            return self.write_subclusters(offset, buf);
        }
        let mut retried = false;
        let (owned, plans) = loop {
            {
                // Most writes overwrite clusters in place and change no metadata: they share their clusters with
                // other such writes and take the metadata lock once.
                let _shared = self.ranges.lock_shared(first, last + 1);
                let plans = self.meta_for(LockUse::Lookup).in_place_plans(&self.dev, first, last)?;
                if let Some(plans) = plans {
                    return self.write_planned(offset, buf, &plans);
                }
            }
            let Some(owned) = self.ranges.lock_to_allocate(first, last + 1) else { continue };
            let mut m = self.meta_for(LockUse::Allocation);
            // Nothing lies at or past the end of the file: fresh clusters placed there read as zeros already.
            let file_end = self.dev.info().size_bytes();
            let plans = m.plan_write(&self.dev, first, last, self.backing.is_some())?;
            if plans.iter().all(|p| p.fill == Fill::InPlace) && !retried && m.data_file_size.is_none() {
                // Another writer allocated these clusters while this one waited: share them instead.
                retried = true;
                continue;
            }
            if plans.iter().any(|p| p.fill != Fill::InPlace) {
                m.mark_dirty(&self.dev)?;
            }
            let past_end =
                m.data_file_size.is_none() && plans.iter().all(|p| p.fill == Fill::InPlace || p.target.0 >= file_end);
            if past_end && self.zero_filled_in_part(offset, len, &plans) {
                // Linked in the same critical section that allocated them: the writers queued on these clusters
                // wait for no I/O at all. (Growing the file gave them zeros; writeback flushes before it writes
                // the L2 tables, so the growth is durable before the links.)
                m.commit_write(&self.dev, &plans)?;
                let over_budget = m.cache.over_budget();
                drop(m);
                if over_budget {
                    self.write_back_unlocked(false)?;
                }
                return self.write_linked(offset, buf, owned, &plans);
            }
            break (owned, plans);
        };
        if self.zero_filled_in_part(offset, len, &plans) && self.zero_fresh_clusters(&plans)? {
            // The fresh clusters read as what the guest had there (zeros) already: they are linked now, before
            // their data arrives, and the write goes on as an overwrite, sharing its clusters with the writers
            // that were waiting for them instead of holding them off until its data is on disk. A flush in between
            // makes the zeros durable before the links (writeback flushes before it writes L2 tables).
            let over_budget = {
                let mut m = self.meta_for(LockUse::Allocation);
                m.commit_write(&self.dev, &plans)?;
                m.cache.over_budget()
            };
            if over_budget {
                self.write_back_unlocked(false)?;
            }
            return self.write_linked(offset, buf, owned, &plans);
        }
        self.write_planned(offset, buf, &plans)?;
        let mut m = self.meta_for(LockUse::Allocation);
        m.commit_write(&self.dev, &plans)?;
        drop(owned);
        let over_budget = m.cache.over_budget();
        drop(m);
        if over_budget {
            self.write_back_unlocked(false)?;
        }
        Ok(())
    }

    /// Allocates the unallocated guest clusters of `offset..offset + len` and links them as clusters that read
    /// as zeros, as a write of that range would allocate them, without writing any data: a later write there is
    /// an overwrite in place. A copy that allocates in guest order with this and then writes from many threads
    /// lays out the same file whatever the thread count (`convert` does).
    ///
    /// Answers false, having changed nothing, when this cannot be done that way: an image with a backing file
    /// (unallocated clusters read from it), an external data file, extended L2 entries, or a range that is
    /// partly allocated already. Clusters already allocated throughout answer true.
    ///
    /// # Errors
    /// As [`write_at`](Self::write_at).
    pub fn allocate_zeroed(&self, offset: u64, len: u64) -> Result<bool> {
        self.observe(self.allocate_guest(offset, len))
    }

    fn allocate_guest(&self, offset: u64, len: u64) -> Result<bool> {
        self.check_writable("write")?;
        check_aligned("write", offset, usize::try_from(len).unwrap_or(usize::MAX))?;
        let limit = self.virtual_size().next_multiple_of(512);
        if offset.checked_add(len).is_none_or(|end| end > limit) {
            return Err(Error::invalid("write", format!("range {offset:#x}+{len:#x} is past the end ({limit:#x})")));
        }
        if len == 0 {
            return Ok(true);
        }
        if self.backing.is_some() || self.data_file.is_some() || self.geo.extended_l2 {
            return Ok(false);
        }
        // Nothing a guest can see changes (the clusters read as zeros before and after), so no bitmap records it.
        let _resize = self.lock_for_write(offset, len, false)?;
        let cb = self.geo.cluster_bits;
        let (first, last) = (offset >> cb, (offset + len - 1) >> cb);
        let _owned = self.ranges.lock(first, last + 1);
        let mut m = self.meta_for(LockUse::Allocation);
        let extents = m.map(&self.dev, first << cb, (last + 1 - first) << cb)?;
        if extents.iter().all(|e| matches!(e.kind, ExtentKind::Data { .. })) {
            return Ok(true);
        }
        if !extents.iter().all(|e| e.kind == ExtentKind::Unallocated) {
            return Ok(false);
        }
        let file_end = self.dev.info().size_bytes();
        let plans = m.plan_write(&self.dev, first, last, false)?;
        m.mark_dirty(&self.dev)?;
        if plans.iter().any(|p| p.fill != Fill::Zeros || p.target.0 < file_end) {
            // Not all past the end of the file: each is zeroed before it is linked.
            drop(m);
            for plan in &plans {
                if !self.zero_cluster(plan.target.0)? {
                    self.flush_pieces(plan.target.0, &[Piece::Borrowed(&self.zeros)])?;
                }
            }
            m = self.meta_for(LockUse::Allocation);
        }
        // Past the end of the file they read as zeros already; writeback flushes before it writes the L2
        // tables, so the growth (or the zeroing) is durable before the links.
        m.commit_write(&self.dev, &plans)?;
        let over_budget = m.cache.over_budget();
        drop(m);
        if over_budget {
            self.write_back_unlocked(false)?;
        }
        Ok(true)
    }

    /// Does the data I/O of a planned write, one vectored device write per physically contiguous run.
    fn write_planned(&self, offset: u64, buf: &Gather<'_>, plans: &[ClusterPlan]) -> Result<()> {
        let cs = self.geo.cluster_size();
        let end = offset + buf.len();
        let mut run_start: Option<u64> = None;
        let mut run_end = 0u64;
        let mut pieces: Vec<Piece<'_>> = Vec::new();
        for plan in plans {
            let cluster_start = plan.guest_cluster * cs;
            let lo = offset.max(cluster_start);
            let hi = end.min(cluster_start + cs);
            // The caller's bytes for this cluster, which may lie in several of its buffers.
            let data = || buf.range(lo - offset, hi - offset).into_iter().map(Piece::Borrowed);
            let whole_cluster = lo == cluster_start && hi == cluster_start + cs;
            let (host, mut these) = match plan.fill {
                _ if whole_cluster => (plan.target.0, data().collect()),
                Fill::InPlace => (plan.target.0 + (lo - cluster_start), data().collect()),
                Fill::Zeros if self.zero_cluster(plan.target.0)? => {
                    (plan.target.0 + (lo - cluster_start), data().collect())
                }
                Fill::Zeros => {
                    let head = (lo - cluster_start) as usize;
                    let tail = (cluster_start + cs - hi) as usize;
                    let mut v = Vec::with_capacity(3);
                    if head > 0 {
                        v.push(Piece::Borrowed(self.zeros.get(..head).unwrap_or(&[])));
                    }
                    v.extend(data());
                    if tail > 0 {
                        v.push(Piece::Borrowed(self.zeros.get(..tail).unwrap_or(&[])));
                    }
                    (plan.target.0, v)
                }
                Fill::CopyFrom(_) | Fill::Backing | Fill::Decompress(..) => {
                    let mut whole = vec![0u8; cs as usize];
                    match (plan.fill, &self.backing) {
                        (Fill::CopyFrom(old), _) => self.data_device().read_at(old.0, &mut whole)?,
                        (Fill::Decompress(host, len), _) => self.read_compressed(host, len, &mut whole)?,
                        (_, Some(backing)) => backing.read(cluster_start, &mut whole)?,
                        _ => {}
                    }
                    if let Some(dst) = whole.get_mut((lo - cluster_start) as usize..(hi - cluster_start) as usize) {
                        buf.copy_to(lo - offset, dst);
                    }
                    (plan.target.0, vec![Piece::Owned(whole)])
                }
            };
            let len: u64 = these.iter().map(|p| piece_len(p) as u64).sum();
            if run_start.is_some() && run_end == host {
                pieces.append(&mut these);
                run_end += len;
            } else {
                if let Some(start) = run_start {
                    self.flush_pieces(start, &pieces)?;
                }
                pieces = these;
                run_start = Some(host);
                run_end = host + len;
            }
        }
        if let Some(start) = run_start {
            self.flush_pieces(start, &pieces)?;
        }
        Ok(())
    }

    /// Whether a planned write has clusters new to its mapping, and each of them is written only in part and
    /// reads as zeros elsewhere: once such clusters read as zeros on the device, they may be linked before their
    /// data arrives. Not so for copy-on-write (the old bytes must land first) or a whole cluster of new data (the
    /// write itself is the zeroing).
    fn zero_filled_in_part(&self, offset: u64, len: u64, plans: &[ClusterPlan]) -> bool {
        let cs = self.geo.cluster_size();
        let end = offset + len;
        let partial = |p: &ClusterPlan| {
            let start = p.guest_cluster * cs;
            offset > start || end < start + cs
        };
        let mut fresh = plans.iter().filter(|p| p.fill != Fill::InPlace).peekable();
        fresh.peek().is_some() && fresh.all(|p| p.fill == Fill::Zeros && partial(p))
    }

    /// Zeroes every cluster new to the mapping without writing it; false (some perhaps zeroed, none linked) when
    /// the device cannot.
    fn zero_fresh_clusters(&self, plans: &[ClusterPlan]) -> Result<bool> {
        for plan in plans.iter().filter(|p| p.fill != Fill::InPlace) {
            if !self.zero_cluster(plan.target.0)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Writes the data of a write whose clusters are all linked already, as an overwrite: the range turns shared,
    /// so the writers queued on those clusters run beside this one.
    fn write_linked(&self, offset: u64, buf: &Gather<'_>, owned: RangeGuard<'_>, plans: &[ClusterPlan]) -> Result<()> {
        let _shared = owned.share();
        let in_place: Vec<ClusterPlan> =
            plans.iter().map(|p| ClusterPlan { allocate: false, fill: Fill::InPlace, release: None, ..*p }).collect();
        self.write_planned(offset, buf, &in_place)
    }

    /// Makes the cluster at `host` read as zeros without writing it, when the data device can (QEMU does the same
    /// before writing part of a fresh cluster): the write then carries only the guest's bytes, and the file system
    /// allocates the cluster once, as one extent, instead of taking a cluster of zeros through the page or the
    /// disk. Answers false when the device cannot; the caller writes the zeros.
    fn zero_cluster(&self, host: u64) -> Result<bool> {
        let cs = self.geo.cluster_size();
        let device = self.data_device();
        let (sector, count) = (host / 512, cs / 512);
        if host.saturating_add(cs) > device.info().size_bytes() {
            // This grows the file: one size change at a time (`Padded` serialises the image file's; this lock an
            // external data file's), so that a writer growing it less far cannot cut this cluster off again.
            let _sizing = self.data_sizing.lock().unwrap_or_else(|e| e.into_inner());
            return device.zero_range(sector, count);
        }
        device.zero_range(sector, count)
    }

    pub(super) fn flush_pieces(&self, host: u64, pieces: &[Piece<'_>]) -> Result<()> {
        let bufs: Vec<IoSlice<'_>> = pieces
            .iter()
            .map(|p| match p {
                Piece::Borrowed(b) => IoSlice::new(b),
                Piece::Owned(v) => IoSlice::new(v),
            })
            .collect();
        let device = self.data_device();
        let end = host + bufs.iter().map(|b| b.len() as u64).sum::<u64>();
        if end > device.info().size_bytes() {
            // Files may end inside an allocated cluster (QEMU writes only the subclusters it touches, and data
            // files grow as written). Growth never shrinks, and is serialised with every other size change.
            let _sizing = self.data_sizing.lock().unwrap_or_else(|e| e.into_inner());
            device.grow_to(end.div_ceil(512))?;
        }
        device.write(host / 512, &bufs)
    }
}

fn piece_len(p: &Piece<'_>) -> usize {
    match p {
        Piece::Borrowed(b) => b.len(),
        Piece::Owned(v) => v.len(),
    }
}
