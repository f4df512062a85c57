//! Online compaction: the highest movable clusters go to the lowest free ones while the image stays in use.
//!
//! A round finds the lowest free clusters, then walks the metadata one L2 table per hold of the lock to find the
//! highest movable clusters above them: refcount blocks, L2 tables with refcount 1 linked from the active L1
//! table, and data clusters with refcount 1 that active L2 entries link (not compressed, not preallocated zero,
//! not in an external data file). Tables move under the lock (see the module above); data moves in three steps,
//! the copy without the lock.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::super::compact::Referrer;
use super::super::meta::Meta;
use super::super::trust::Trusted;
use super::super::Image;
use super::{Move, MoveStage};
use crate::block::BlockDevice;
use crate::error::Result;
use crate::format::{L2Entry, L2Kind, RefcountTableEntry};

/// What a round of online compaction did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OnlineCompaction {
    /// Clusters moved to a lower place and relinked.
    pub moved: u64,
    /// Data moves dropped because a client wrote the cluster (or changed its mapping) while it was copied.
    pub cancelled: u64,
    /// File length before, in bytes.
    pub old_size: u64,
    /// File length after, in bytes.
    pub new_size: u64,
}

/// A planned move.
#[derive(Debug, Clone, Copy)]
struct Planned {
    from: u64,
    to: u64,
    referrer: Referrer,
}

impl Meta {
    /// The lowest `want` free clusters below `below` that allocation could take now (their refcount block exists
    /// and the worker is not erasing them).
    fn free_targets(&mut self, dev: &dyn BlockDevice, want: u64, below: u64, _trusted: Trusted) -> Result<Vec<u64>> {
        let per_block = self.geo.refcount_block_entries();
        let mut targets = Vec::new();
        let mut c = self.alloc.hint().max(1);
        while c < below && (targets.len() as u64) < want {
            let block = c / per_block;
            if self.reftable.get(block as usize).is_none_or(|e| RefcountTableEntry(*e).block_offset().is_none()) {
                c = (block + 1) * per_block; // no block: nothing here can be allocated without creating one
                continue;
            }
            if self.refcount(dev, c)? == 0 && !self.reclaim.is_busy(c) {
                targets.push(c);
            }
            c += 1;
        }
        Ok(targets)
    }

    /// Adds the movable clusters reached through active L1 entry `l1` that lie above `above` to `top`, which
    /// keeps the `keep` highest.
    fn movable_under(
        &mut self,
        dev: &dyn BlockDevice,
        l1: u64,
        above: u64,
        keep: usize,
        top: &mut BinaryHeap<Reverse<(u64, Referrer)>>,
    ) -> Result<()> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        if l1 >= self.l1_size() {
            return Ok(());
        }
        let entry = self.l1_entry(dev, l1)?;
        let Some(l2) = entry.l2_offset() else { return Ok(()) };
        if !entry.is_copied() {
            return Ok(()); // shared with a snapshot: so are its entries
        }
        let offer = |host: u64, key: Referrer, top: &mut BinaryHeap<Reverse<(u64, Referrer)>>| {
            if host > above && (top.len() < keep || top.peek().is_some_and(|Reverse((low, _))| host > *low)) {
                top.push(Reverse((host, key)));
                if top.len() > keep {
                    top.pop();
                }
            }
        };
        offer(l2.0 / cs, Referrer::L2Table { l1 }, top);
        if self.data_file_size.is_some() {
            return Ok(());
        }
        for index in 0..geo.l2_entries() {
            let entry = self.l2_entry(dev, l2, index)?;
            if let Ok(L2Kind::Normal { host, copied: true }) = entry.kind(&geo) {
                offer(host.0 / cs, Referrer::Data { l1, index }, top);
            }
        }
        Ok(())
    }

    /// Moves a table under the lock: its cached bytes (with every unwritten change) are rekeyed to `to`, whose
    /// refcount is taken, the pointer is rewritten, and the old place is freed after the next writeback.
    fn move_table(&mut self, dev: &dyn BlockDevice, p: Planned) -> Result<bool> {
        let cs = self.geo.cluster_size();
        let (from, kind) = match p.referrer {
            Referrer::L2Table { l1 } => {
                let entry = self.l1_entry(dev, l1)?;
                if entry.l2_offset().map(|o| o.0 / cs) != Some(p.from) || !entry.is_copied() {
                    return Ok(false);
                }
                (p.from * cs, super::super::cache::TableKind::L2)
            }
            Referrer::RefcountBlock { index } => {
                let entry = self.reftable.get(index as usize).map_or(0, |e| RefcountTableEntry(*e).offset_field());
                if entry != p.from * cs {
                    return Ok(false);
                }
                (p.from * cs, super::super::cache::TableKind::RefcountBlock)
            }
            Referrer::Data { .. } => return Ok(false),
        };
        if self.refcount(dev, p.from)? != 1 || self.refcount(dev, p.to)? != 0 || self.reclaim.is_busy(p.to) {
            return Ok(false);
        }
        self.load_table(dev, from, kind)?;
        // Taking the destination's refcount may load a refcount block and evict clean pieces: it comes first, and
        // the table is rekeyed only whole (a piece missing now would be read later from the wrong place).
        self.set_refcount(dev, p.to, 1)?;
        if !self.cache.rekey(from, p.to * cs) {
            self.set_refcount(dev, p.to, 0)?;
            return Ok(false);
        }
        // Repointing also tells the overlap index where the table now is.
        self.repoint(dev, p.referrer, p.to)?;
        self.free_later(p.from);
        Ok(true)
    }

    /// The L2 entry a data referrer names now, if its table is still there.
    fn data_entry(&mut self, dev: &dyn BlockDevice, l1: u64, index: u64) -> Result<Option<L2Entry>> {
        if l1 >= self.l1_size() {
            return Ok(None);
        }
        let entry = self.l1_entry(dev, l1)?;
        match entry.l2_offset() {
            Some(l2) if entry.is_copied() => Ok(Some(self.l2_entry(dev, l2, index)?)),
            _ => Ok(None),
        }
    }
}

impl<D: BlockDevice> Image<D> {
    /// One round of online compaction: moves up to `max_moves` of the highest movable clusters into the lowest
    /// free ones, then gives a free tail of the file back. Guest reads and writes go on meanwhile and never wait
    /// for it; `stop` is polled between steps.
    ///
    /// The first round of a session judges the refcounts (a check of the whole metadata, guest I/O waiting
    /// meanwhile) unless something showed them trustworthy already.
    ///
    /// # Errors
    /// `ReadOnly`, `Disconnected`, `Untrusted` (nothing was changed), `Corrupt` for metadata that cannot be
    /// followed, `Io`. A failure leaves a consistent image that at worst leaks the clusters of the moves in
    /// flight.
    pub fn compact_online(&self, max_moves: u64, stop: &dyn Fn() -> bool) -> Result<OnlineCompaction> {
        self.observe(self.compact_round(max_moves, stop))
    }

    fn compact_round(&self, max_moves: u64, stop: &dyn Fn() -> bool) -> Result<OnlineCompaction> {
        self.check_writable("compact")?;
        let trusted = self.trust_refcounts("compact")?;
        let mut report = OnlineCompaction { old_size: self.dev.info().size_bytes(), ..Default::default() };
        let plan = self.plan_online(max_moves.max(1), trusted)?;
        let (tables, data): (Vec<Planned>, Vec<Planned>) =
            plan.into_iter().partition(|p| !matches!(p.referrer, Referrer::Data { .. }));
        if !tables.is_empty() {
            let _resize = self.resize.read().unwrap_or_else(|e| e.into_inner());
            let mut m = self.meta();
            m.mark_dirty(&self.dev)?;
            for p in tables {
                if m.move_table(&self.dev, p)? {
                    report.moved += 1;
                }
            }
        }
        if !data.is_empty() && !stop() {
            let (moved, cancelled) = self.move_data(&data)?;
            report.moved += moved;
            report.cancelled += cancelled;
        }
        {
            let _resize = self.resize.read().unwrap_or_else(|e| e.into_inner());
            let mut m = self.meta();
            m.writeback(&self.dev)?;
            let trusted = m.still_trusted(trusted)?;
            m.trim_file(&self.dev, trusted)?;
        }
        report.new_size = self.dev.info().size_bytes();
        let c = &self.counters;
        c.moved_bytes.fetch_add(report.moved * self.geo.cluster_size(), std::sync::atomic::Ordering::Relaxed);
        c.cancelled_moves.fetch_add(report.cancelled, std::sync::atomic::Ordering::Relaxed);
        Ok(report)
    }

    /// Pairs the highest movable clusters with the lowest free clusters below them.
    fn plan_online(&self, max_moves: u64, trusted: Trusted) -> Result<Vec<Planned>> {
        let (targets, l1_size, refblocks) = {
            let mut m = self.meta();
            let end = m.alloc.end_cluster();
            let trusted = m.still_trusted(trusted)?;
            let targets = m.free_targets(&self.dev, max_moves, end, trusted)?;
            let refblocks: Vec<(u64, u64)> = m
                .reftable
                .iter()
                .enumerate()
                .filter_map(|(i, e)| {
                    Some((i as u64, RefcountTableEntry(*e).block_offset()?.0 / self.geo.cluster_size()))
                })
                .collect();
            (targets, m.l1_size(), refblocks)
        };
        let Some(&lowest) = targets.first() else { return Ok(Vec::new()) };
        let keep = targets.len();
        let mut top = BinaryHeap::new();
        for (index, host) in refblocks {
            if host > lowest {
                top.push(Reverse((host, Referrer::RefcountBlock { index })));
                if top.len() > keep {
                    top.pop();
                }
            }
        }
        for l1 in 0..l1_size {
            let _resize = self.resize.read().unwrap_or_else(|e| e.into_inner());
            self.meta().movable_under(&self.dev, l1, lowest, keep, &mut top)?;
        }
        let mut sources: Vec<(u64, Referrer)> = top.into_iter().map(|Reverse(c)| c).collect();
        sources.sort_unstable_by(|a, b| b.cmp(a));
        Ok(sources
            .into_iter()
            .zip(targets)
            .take_while(|((from, _), to)| to < from)
            .map(|((from, referrer), to)| Planned { from, to, referrer })
            .collect())
    }

    /// Moves data clusters: take the destinations and register the moves, copy without the lock and make the
    /// copies durable, relink what no client touched meanwhile, then free the old places once no reader can be
    /// reading them. Returns (moved, cancelled).
    fn move_data(&self, planned: &[Planned]) -> Result<(u64, u64)> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let guest_of = |l1: u64, index: u64| l1 * geo.l2_entries() + index;
        // 1. Register.
        let mut started = Vec::new();
        {
            let _resize = self.resize.read().unwrap_or_else(|e| e.into_inner());
            let mut m = self.meta();
            m.mark_dirty(&self.dev)?;
            for p in planned {
                let Referrer::Data { l1, index } = p.referrer else { continue };
                let Some(entry) = m.data_entry(&self.dev, l1, index)? else { continue };
                let still =
                    matches!(entry.kind(&geo), Ok(L2Kind::Normal { host, copied: true }) if host.0 / cs == p.from);
                if !still
                    || m.refcount(&self.dev, p.from)? != 1
                    || m.refcount(&self.dev, p.to)? != 0
                    || m.reclaim.is_busy(p.to)
                {
                    continue;
                }
                let guest = guest_of(l1, index);
                // A writer owning the cluster may be writing it in place right now: leave it for a later round.
                let Some(_owned) = self.ranges.try_lock(guest, guest + 1) else { continue };
                m.set_refcount(&self.dev, p.to, 1)?;
                m.reclaim.begin_move(guest, Move { from: p.from, to: p.to, entry: entry.0, stage: MoveStage::Copying });
                started.push((guest, l1, index));
            }
        }
        // 2. Copy, without the lock; the copies are durable before any pointer names them.
        let copied = self.copy_moves(&started);
        // 3. Relink (or drop) every started move, whatever the copy did.
        let mut retired = Vec::new();
        let mut cancelled = 0;
        {
            let _resize = self.resize.read().unwrap_or_else(|e| e.into_inner());
            let mut m = self.meta();
            for &(guest, l1, index) in &started {
                let Some(mv) = m.reclaim.end_move(guest) else { continue };
                let entry = m.data_entry(&self.dev, l1, index)?;
                if copied.is_ok() && mv.stage == MoveStage::Copying && entry.map(|e| e.0) == Some(mv.entry) {
                    m.repoint(&self.dev, Referrer::Data { l1, index }, mv.to)?;
                    retired.push(mv.from);
                } else {
                    m.adjust_refcount(&self.dev, mv.to, -1)?;
                    cancelled += 1;
                }
            }
        }
        copied?;
        // 4. Freed once the new pointers are durable, and (writeback waits for them) once no reader that mapped
        // the old places before the relink is still reading them.
        if !retired.is_empty() {
            let _resize = self.resize.read().unwrap_or_else(|e| e.into_inner());
            let mut m = self.meta();
            for &from in &retired {
                m.free_later(from);
            }
        }
        Ok((retired.len() as u64, cancelled))
    }

    fn copy_moves(&self, started: &[(u64, u64, u64)]) -> Result<()> {
        if started.is_empty() {
            return Ok(());
        }
        let cs = self.geo.cluster_size();
        let mut buf = vec![0u8; cs as usize];
        for &(guest, _, _) in started {
            let Some(mv) = self.meta().reclaim.current_move(guest) else { continue };
            if mv.stage != MoveStage::Copying {
                continue;
            }
            self.dev.read_at(mv.from * cs, &mut buf)?;
            self.dev.write_at(mv.to * cs, &buf)?;
        }
        self.dev.flush()
    }
}
