//! Erasing junk: free clusters that may hold old bytes are punched out of the file, or written with zeros where
//! the device cannot punch, without the metadata lock. While that runs they are claimed (`Erasing`), so nothing
//! allocates or truncates them.

use std::sync::atomic::Ordering;

use super::super::meta::Meta;
use super::super::trust::Trusted;
use super::super::Image;
use crate::block::BlockDevice;
use crate::error::{ErrorKind, Result};

/// Clusters looked at per search for junk, so that one search holds the metadata lock only briefly.
const SEARCH_BUDGET: u64 = 1 << 16;

impl Meta {
    /// Up to `want` junk clusters among the first `whole` clusters of the file, searched from the junk cursor
    /// (wrapping once), looking at no more than [`SEARCH_BUDGET`] clusters.
    fn find_junk(&mut self, dev: &dyn BlockDevice, want: u64, whole: u64, _trusted: Trusted) -> Result<Vec<u64>> {
        let mut found = Vec::new();
        if whole <= 1 {
            return Ok(found);
        }
        let mut c = self.junk_start(whole);
        for _ in 0..SEARCH_BUDGET.min(whole - 1) {
            if found.len() as u64 >= want {
                break;
            }
            if self.refcount(dev, c)? == 0 && self.reclaim.recorded(c).is_none() {
                found.push(c);
            }
            c = if c + 1 >= whole { 1 } else { c + 1 };
        }
        self.reclaim.junk_cursor = c;
        Ok(found)
    }

    fn junk_start(&self, whole: u64) -> u64 {
        let c = self.reclaim.junk_cursor;
        if c == 0 || c >= whole {
            1
        } else {
            c
        }
    }
}

impl<D: BlockDevice> Image<D> {
    /// Erases up to `max` junk clusters inside the file: punched where the device can, written with zeros
    /// elsewhere. Guest I/O goes on meanwhile. Returns how many were erased; they become available at the next
    /// completed flush.
    ///
    /// Junk is found by refcount, so the first call of a session judges the refcounts (a check of the whole
    /// metadata) unless something showed them trustworthy already.
    ///
    /// # Errors
    /// `ReadOnly`, `Disconnected`, `Untrusted` (nothing was changed), `Corrupt`, `Io`. Clusters that could not
    /// be erased stay junk.
    pub fn erase_junk(&self, max: u64) -> Result<u64> {
        self.observe(self.erase_some(max))
    }

    fn erase_some(&self, max: u64) -> Result<u64> {
        self.check_writable("erase")?;
        if max == 0 {
            return Ok(0);
        }
        let trusted = self.trust_refcounts("erase")?;
        let cs = self.geo.cluster_size();
        let claimed = {
            let mut m = self.meta();
            let whole = (self.dev.info().size_bytes() / cs).min(m.alloc.end_cluster());
            let trusted = m.still_trusted(trusted)?;
            let junk = m.find_junk(&self.dev, max, whole, trusted)?;
            m.reclaim.claim_for_erasing(&junk);
            junk
        };
        if claimed.is_empty() {
            return Ok(0);
        }
        let result = self.erase_runs(&claimed);
        self.meta().reclaim.erasing_done(&claimed, result.is_ok());
        result?;
        self.note_unflushed();
        Ok(claimed.len() as u64)
    }

    /// Erases the claimed clusters, one device request per contiguous run.
    fn erase_runs(&self, clusters: &[u64]) -> Result<()> {
        let cs = self.geo.cluster_size();
        let mut i = 0;
        while let Some(&first) = clusters.get(i) {
            let mut count = 1;
            while clusters.get(i + count as usize) == Some(&(first + count)) {
                count += 1;
            }
            self.erase_run(first * cs, count * cs)?;
            i += count as usize;
        }
        Ok(())
    }

    fn erase_run(&self, start: u64, len: u64) -> Result<()> {
        if !self.counters.punch_unsupported.load(Ordering::Relaxed) {
            match self.dev.discard(start / 512, len / 512) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Unimplemented => {
                    self.counters.punch_unsupported.store(true, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
        crate::block::write_zeros(&self.dev, start, len)
    }
}
