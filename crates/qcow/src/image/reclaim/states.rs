//! The reclaimer's bookkeeping: which free host clusters are known to read as zeros, which the worker is
//! erasing right now, and which clusters are being moved.
//!
//! Only clusters in a state other than junk are recorded. A free cluster (refcount 0) inside the file that is not
//! recorded is junk: it may still hold old bytes, from this session or an earlier one. So the bookkeeping costs
//! nothing at open and stays in proportion to what the reclaimer has done, not to the file.

use std::collections::{BTreeMap, BTreeSet};

/// What the reclaimer knows about one host cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterState {
    /// In use: its refcount is above zero and something links it.
    Allocated,
    /// Free, and it may still hold old bytes (discarded on a device that cannot punch holes, or freed in an
    /// earlier session).
    Junk,
    /// Free, claimed by the worker, which is writing zeros over it (or punching it) right now. Nothing may
    /// allocate it until that is done.
    Erasing,
    /// Free and zeroed, but the zeros are not yet durable.
    Erased,
    /// Free, zeroed and flushed: safe to hand out.
    Available,
    /// Allocated as the destination of a move, not yet linked: the copy is in flight.
    Destination,
}

/// Where a data-cluster move stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoveStage {
    /// The destination is taken (refcount 1, not linked) and the data is being copied.
    Copying,
    /// A client wrote to the guest cluster while it was being copied: the copy is stale and will be dropped.
    Cancelled,
}

/// One data-cluster move in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Move {
    /// The host cluster the data lives in now.
    pub from: u64,
    /// The host cluster it is being copied to.
    pub to: u64,
    /// The L2 entry that linked `from` when the move began; the move completes only if it still does.
    pub entry: u64,
    /// Where the move stands.
    pub stage: MoveStage,
}

/// The reclaimer's state of the clusters it has touched.
#[derive(Debug, Default)]
pub struct ClusterStates {
    erasing: BTreeSet<u64>,
    /// Erased clusters, with the flush generation they were erased in.
    erased: BTreeMap<u64, u64>,
    /// Flushes begun so far: a flush promotes what was erased in earlier generations.
    generation: u64,
    available: BTreeSet<u64>,
    /// Data moves in progress, by guest cluster.
    moves: BTreeMap<u64, Move>,
    /// Destinations of the moves, by host cluster.
    destinations: BTreeSet<u64>,
    /// Where the next search for junk starts.
    pub junk_cursor: u64,
}

impl ClusterStates {
    /// The recorded state of a cluster, or `None` when nothing is recorded (junk if free, else allocated).
    pub fn recorded(&self, cluster: u64) -> Option<ClusterState> {
        if self.erasing.contains(&cluster) {
            Some(ClusterState::Erasing)
        } else if self.erased.contains_key(&cluster) {
            Some(ClusterState::Erased)
        } else if self.available.contains(&cluster) {
            Some(ClusterState::Available)
        } else if self.destinations.contains(&cluster) {
            Some(ClusterState::Destination)
        } else {
            None
        }
    }

    /// Whether a free cluster must not be allocated now (the worker is erasing it).
    pub fn is_busy(&self, cluster: u64) -> bool {
        !self.erasing.is_empty() && self.erasing.contains(&cluster)
    }

    /// A cluster got a refcount above zero: it is in use and no longer free.
    pub fn taken(&mut self, cluster: u64) {
        if !self.erased.is_empty() {
            self.erased.remove(&cluster);
        }
        if !self.available.is_empty() {
            self.available.remove(&cluster);
        }
    }

    /// A cluster's refcount dropped to zero: whatever it holds, it is junk now.
    pub fn freed(&mut self, cluster: u64) {
        self.taken(cluster);
        self.destinations.remove(&cluster);
    }

    /// A freed cluster was punched out of the file: it reads as zeros once the next flush completes.
    pub fn punched(&mut self, cluster: u64) {
        self.erased.insert(cluster, self.generation);
    }

    /// The file was truncated to `end` clusters: nothing at or past it exists any more.
    pub fn truncated(&mut self, end: u64) {
        self.erased.split_off(&end);
        self.available.split_off(&end);
        self.junk_cursor = self.junk_cursor.min(end);
    }

    /// Pops the lowest available cluster, to allocate it.
    pub fn take_available(&mut self) -> Option<u64> {
        self.available.pop_first()
    }

    /// The worker claims free clusters to erase them.
    pub fn claim_for_erasing(&mut self, clusters: &[u64]) {
        self.erasing.extend(clusters.iter().copied());
    }

    /// The worker finished erasing (`ok`) or gave up on (`!ok`) clusters it claimed.
    pub fn erasing_done(&mut self, clusters: &[u64], ok: bool) {
        for c in clusters {
            if self.erasing.remove(c) && ok {
                self.erased.insert(*c, self.generation);
            }
        }
    }

    /// A flush begins: what is erased from now on belongs to the next generation. Returns the generation the
    /// flush will promote, up to and including.
    pub fn begin_flush(&mut self) -> u64 {
        self.generation += 1;
        self.generation - 1
    }

    /// A flush begun at `generation` completed: clusters erased up to it are available now.
    pub fn flushed(&mut self, generation: u64) {
        let done: Vec<u64> = self.erased.iter().filter(|(_, g)| **g <= generation).map(|(c, _)| *c).collect();
        for c in done {
            self.erased.remove(&c);
            self.available.insert(c);
        }
    }

    /// Records a data move of guest cluster `guest`.
    pub fn begin_move(&mut self, guest: u64, m: Move) {
        self.destinations.insert(m.to);
        self.moves.insert(guest, m);
    }

    /// A client is about to write guest cluster `guest` in place: a copy of it in flight is stale.
    pub fn cancel_move(&mut self, guest: u64) {
        if let Some(m) = self.moves.get_mut(&guest) {
            m.stage = MoveStage::Cancelled;
        }
    }

    /// Every copy in flight is stale: the tables are about to change wholesale (a snapshot is created, applied or
    /// deleted), so no move may relink what it copied.
    pub fn cancel_all_moves(&mut self) {
        for m in self.moves.values_mut() {
            m.stage = MoveStage::Cancelled;
        }
    }

    /// Whether any data move is in flight (the write path's fast check).
    pub fn moving(&self) -> bool {
        !self.moves.is_empty()
    }

    /// The move of guest cluster `guest`, if one is in flight.
    pub fn current_move(&self, guest: u64) -> Option<Move> {
        self.moves.get(&guest).copied()
    }

    /// Ends the move of guest cluster `guest`, returning it.
    pub fn end_move(&mut self, guest: u64) -> Option<Move> {
        let m = self.moves.remove(&guest)?;
        self.destinations.remove(&m.to);
        Some(m)
    }

    /// Counts of (erasing, erased, available, moving) clusters.
    pub fn counts(&self) -> (u64, u64, u64, u64) {
        (self.erasing.len() as u64, self.erased.len() as u64, self.available.len() as u64, self.moves.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_walks_from_junk_to_available_and_leaves_when_taken() {
        let mut s = ClusterStates::default();
        assert_eq!(s.recorded(7), None);
        s.claim_for_erasing(&[7, 8]);
        assert!(s.is_busy(7));
        assert_eq!(s.recorded(7), Some(ClusterState::Erasing));
        s.erasing_done(&[7], true);
        s.erasing_done(&[8], false);
        assert_eq!((s.recorded(7), s.recorded(8)), (Some(ClusterState::Erased), None));
        let generation = s.begin_flush();
        s.punched(9);
        s.flushed(generation);
        assert_eq!((s.recorded(7), s.recorded(9)), (Some(ClusterState::Available), Some(ClusterState::Erased)));
        assert_eq!(s.take_available(), Some(7));
        s.taken(9);
        assert_eq!(s.counts(), (0, 0, 0, 0));
    }

    #[test]
    fn a_write_cancels_the_move_of_its_cluster_only() {
        let mut s = ClusterStates::default();
        s.begin_move(3, Move { from: 100, to: 5, entry: 0, stage: MoveStage::Copying });
        s.begin_move(4, Move { from: 101, to: 6, entry: 0, stage: MoveStage::Copying });
        assert_eq!(s.recorded(5), Some(ClusterState::Destination));
        s.cancel_move(3);
        s.cancel_move(99);
        assert_eq!(s.end_move(3).map(|m| m.stage), Some(MoveStage::Cancelled));
        assert_eq!(s.end_move(4).map(|m| m.stage), Some(MoveStage::Copying));
        assert!(!s.moving());
        s.erased.insert(10, 0);
        s.available.insert(20);
        s.truncated(15);
        assert_eq!((s.recorded(10), s.recorded(20)), (Some(ClusterState::Erased), None));
    }
}
