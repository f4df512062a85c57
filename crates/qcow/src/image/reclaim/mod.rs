//! The space reclaimer: explicit states for free and moving host clusters, the work that advances them (erasing
//! junk, promoting erased clusters at a flush, moving clusters down while the image is in use) and the background
//! worker that does that work on its own.
//!
//! States (see [`ClusterState`]): a freed cluster is **junk** until it is punched out of the file or written
//! with zeros (**erasing** while the worker does that without the metadata lock, then **erased**); the next
//! completed flush makes it **available**, and allocation of single clusters draws from the available pool
//! before anything else. A cluster chosen as the destination of a move is allocated but not linked until its copy
//! is durable and its pointer rewritten.
//!
//! Everything here that treats a refcount of zero as free (erasing junk, choosing move destinations, trimming a
//! free tail) runs only with the refcounts trusted (`super::trust`); a damaged image is refused before the first
//! change, and corruption met by any I/O path halts the background worker.
//!
//! Online compaction ([`Image::compact_online`]) moves the highest movable clusters into the lowest free ones
//! while guest I/O goes on:
//! - refcount blocks and L2 tables are moved under the metadata lock, by rekeying their cached copy: writeback
//!   then writes the new copy and its refcount, then the pointer, then frees the old place, in that order;
//! - data clusters are copied without the lock. A client write to a cluster being copied cancels its move (the
//!   write path marks it); a move completes only if the L2 entry is unchanged. The pointer is rewritten only
//!   after the copy is durable, and the old cluster is freed by writeback only once the new pointer is durable and
//!   the readers that may still read it have left ([`grace`]), so client I/O never waits
//!   for the reclaimer, and a crash at any point leaks at worst the clusters in flight.

mod erase;
mod grace;
mod moves;
mod states;
mod worker;

pub(crate) use grace::ReadGrace;
pub use moves::OnlineCompaction;
pub use states::ClusterState;
pub(crate) use states::{ClusterStates, Move, MoveStage};
pub(crate) use worker::{ReclaimMemo, WorkerSlot};
pub use worker::{ReclaimPass, ReclaimerOptions};

impl<D: crate::block::BlockDevice> super::Image<D> {
    /// What the reclaimer knows about host cluster `cluster`.
    ///
    /// # Errors
    /// `Corrupt` or `Io` while reading its refcount, `Disconnected`.
    pub fn cluster_state(&self, cluster: u64) -> crate::Result<ClusterState> {
        self.check_connected()?;
        let mut m = self.meta();
        let recorded = m.reclaim.recorded(cluster);
        Ok(match (m.refcount(&self.dev, cluster)?, recorded) {
            (_, Some(state)) => state,
            (0, None) => ClusterState::Junk,
            _ => ClusterState::Allocated,
        })
    }
}
