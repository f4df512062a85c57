//! The writeback queue: metadata writeback whose device I/O and flushes run outside the metadata lock.
//!
//! A guest flush, and a write that finds the cache over its budget, take a copy of every dirty piece under the
//! lock (the metadata in memory is consistent whenever the lock is free, so the copy is one consistent state),
//! write the copies in the order of [`writeback`](super::writeback) with the lock released, and then, under the
//! lock again, mark clean the pieces that did not change meanwhile and apply the deferred decrements, whose
//! refcount blocks are written the same way. Lookups, overwrites of mapped clusters and allocations go on
//! while the copies are written: a flush stalls nothing but other flushes.
//!
//! Two rules keep the disk in order:
//! - One queued writeback at a time ([`WritebackQueue::turn`]): two copies of one piece never race to the disk.
//! - While copies are being written, nothing else writes metadata to the device. Code that does (a writeback
//!   under the lock, a header write, every structural change) first waits for the copies while holding the
//!   metadata lock, which the copies' I/O never takes; lookups and allocation never wait for them.
//!
//! The durability rules are those of the writeback under the lock: each step's writes are flushed before the
//! next step writes, and the deferred decrements wait for a flush after the references they drop were written
//! and for the reads that may still see those clusters. One more: the first step that writes pointers (L2, L1
//! or the header) is always preceded by a flush, so guest data written since the last flush is durable before
//! any pointer to it even when the copy changed no refcount (an overwrite of a preallocated zero cluster), and so
//! is what an earlier writeback for a cache over budget left unflushed.

use std::sync::{Condvar, Mutex, MutexGuard};

use super::lock_timing::LockUse;
use super::reclaim::ReadGrace;
use super::Image;
use crate::block::BlockDevice;
use crate::error::Result;

/// Who may write metadata to the device, and when.
#[derive(Debug, Default)]
pub struct WritebackQueue {
    /// Held by the one writeback that runs outside the lock.
    turn: Mutex<()>,
    /// Whether copies are being written now.
    in_flight: Mutex<bool>,
    idle: Condvar,
}

impl WritebackQueue {
    /// Waits for this caller's turn to write back outside the lock.
    pub fn turn(&self) -> MutexGuard<'_, ()> {
        self.turn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The turn, if no other writeback has it.
    pub fn try_turn(&self) -> Option<MutexGuard<'_, ()>> {
        match self.turn.try_lock() {
            Ok(turn) => Some(turn),
            Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    fn set_in_flight(&self, value: bool) {
        *self.in_flight.lock().unwrap_or_else(|e| e.into_inner()) = value;
        if !value {
            self.idle.notify_all();
        }
    }

    /// Copies are about to be written (called under the metadata lock, with the turn held).
    pub fn begin(&self) {
        self.set_in_flight(true);
    }

    /// The copies are written, or failed: metadata writers may go on.
    pub fn end(&self) {
        self.set_in_flight(false);
    }

    /// Waits until no copies are being written. Called with the metadata lock held, before writing metadata to
    /// the device any other way.
    pub fn wait_idle(&self) {
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        while *in_flight {
            in_flight = self.idle.wait(in_flight).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// One table piece as it was when copied: its offset, its version in the cache, and its bytes (cut to what is
/// written).
pub(super) type PieceCopy = (u64, u64, Box<[u8]>);

/// A consistent copy of the dirty metadata, to be written with the lock released.
#[derive(Debug, Default)]
pub(super) struct Copies {
    pub refcount_blocks: Vec<PieceCopy>,
    /// Refcount-table clusters: their index in the table, their offset, their bytes.
    pub reftable: Vec<(u64, u64, Vec<u8>)>,
    pub l2: Vec<PieceCopy>,
    pub l1: Vec<PieceCopy>,
    pub header: Option<Vec<u8>>,
    /// Host clusters whose refcount drops once the references above are durably gone.
    pub frees: Vec<u64>,
    /// Whether each step is flushed before the next one writes (not with lazy refcounts and the dirty bit set).
    pub strict: bool,
}

impl Copies {
    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.refcount_blocks.is_empty()
            && self.reftable.is_empty()
            && self.l2.is_empty()
            && self.l1.is_empty()
            && self.header.is_none()
            && self.frees.is_empty()
    }

    /// Writes the copies in crash-safe order, flushing between steps; ends with a flush and the read grace
    /// period when decrements are to follow. The last step's writes are otherwise left unflushed, as a
    /// writeback under the lock leaves them.
    pub fn write(&self, dev: &dyn BlockDevice, grace: &ReadGrace) -> Result<()> {
        let mut unflushed = false;
        let barrier = |unflushed: &mut bool| -> Result<()> {
            if std::mem::take(unflushed) && self.strict {
                dev.flush()?;
            }
            Ok(())
        };
        for (offset, _, bytes) in &self.refcount_blocks {
            super::meta::write_meta(dev, *offset, bytes)?;
            unflushed = true;
        }
        if !self.reftable.is_empty() {
            barrier(&mut unflushed)?;
            for (_, offset, bytes) in &self.reftable {
                super::meta::write_meta(dev, *offset, bytes)?;
                unflushed = true;
            }
        }
        if !self.l2.is_empty() || !self.l1.is_empty() || self.header.is_some() {
            // The pointers come next, and the data they point at must be durable before them even when this
            // copy changed no refcount: guest data written since the last flush (a preallocated zero cluster
            // overwritten, say) and whatever an earlier writeback left unflushed.
            unflushed = true;
        }
        if !self.l2.is_empty() {
            barrier(&mut unflushed)?;
            for (offset, _, bytes) in &self.l2 {
                super::meta::write_meta(dev, *offset, bytes)?;
                unflushed = true;
            }
        }
        if !self.l1.is_empty() || self.header.is_some() {
            barrier(&mut unflushed)?;
            for (offset, _, bytes) in &self.l1 {
                super::meta::write_meta(dev, *offset, bytes)?;
            }
            if let Some(header) = &self.header {
                super::meta::write_meta(dev, 0, header)?;
            }
        }
        if !self.frees.is_empty() {
            // The decrements must not reach the disk before the references they drop are gone, and the clusters
            // they free must not be handed out while a read that mapped them is still reading.
            dev.flush()?;
            grace.wait_for_readers();
        }
        Ok(())
    }
}

impl<D: BlockDevice> Image<D> {
    /// Writes every dirty metadata piece back with the metadata lock released (see the module documentation).
    /// With `wait` false it gives up at once, answering false, when another writeback has the turn.
    ///
    /// # Errors
    /// `Corrupt` once corruption was found, `Io` when a write or flush fails: the pieces not known to be written
    /// stay dirty and the decrements stay deferred, for the next writeback.
    pub(super) fn write_back_unlocked(&self, wait: bool) -> Result<bool> {
        let queue = &*self.writeback_queue;
        let _turn = if wait {
            queue.turn()
        } else {
            match queue.try_turn() {
                Some(turn) => turn,
                None => return Ok(false),
            }
        };
        let mut copies = self.meta_for(LockUse::Writeback).take_copies(&self.dev, true)?;
        while let Some(batch) = copies {
            let written = batch.write(&self.dev, &self.read_grace);
            // Before the lock is taken again: a metadata writer may be waiting for these copies with it held.
            queue.end();
            copies = self.meta_for(LockUse::Writeback).finish_copies(&self.dev, batch, written)?;
        }
        Ok(true)
    }
}
