//! The metadata cache: L1 clusters, L2 tables and refcount blocks, keyed by their host offset.
//!
//! The cache is write-back and bounded. A cluster modified here is marked dirty and reaches the disk only when
//! [`writeback`](super::writeback) writes it, in the order the durability rules demand; eviction only ever drops
//! clean clusters, so a dirty cluster can never be lost or written out of order. When every cluster is dirty the
//! cache may grow past its budget until the next writeback, which the engine triggers itself.

use std::collections::{BTreeMap, HashMap};

/// What a cached cluster holds, which decides when writeback writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TableKind {
    /// A refcount block.
    RefcountBlock,
    /// An L2 table.
    L2,
    /// One cluster of the L1 table.
    L1,
}

struct Slot {
    bytes: Box<[u8]>,
    kind: TableKind,
    dirty: bool,
    tick: u64,
}

/// A bounded write-back cache of metadata clusters.
pub struct MetadataCache {
    slots: HashMap<u64, Slot>,
    lru: BTreeMap<u64, u64>,
    tick: u64,
    capacity: usize,
}

impl MetadataCache {
    /// A cache that keeps at most `capacity` clean clusters (at least 4).
    pub fn new(capacity: usize) -> Self {
        MetadataCache { slots: HashMap::new(), lru: BTreeMap::new(), tick: 0, capacity: capacity.max(4) }
    }

    fn touch(&mut self, offset: u64) {
        self.tick += 1;
        let tick = self.tick;
        if let Some(slot) = self.slots.get_mut(&offset) {
            self.lru.remove(&slot.tick);
            slot.tick = tick;
            self.lru.insert(tick, offset);
        }
    }

    /// The cluster at `offset`, if cached.
    pub fn get(&mut self, offset: u64) -> Option<&[u8]> {
        self.touch(offset);
        self.slots.get(&offset).map(|s| &*s.bytes)
    }

    /// The cluster at `offset` for modification, marking it dirty.
    pub fn get_mut(&mut self, offset: u64) -> Option<&mut [u8]> {
        self.touch(offset);
        self.slots.get_mut(&offset).map(|s| {
            s.dirty = true;
            &mut *s.bytes
        })
    }

    /// What the cluster cached at `offset` holds, if it is cached.
    pub fn kind(&self, offset: u64) -> Option<TableKind> {
        self.slots.get(&offset).map(|s| s.kind)
    }

    /// Whether the cluster at `offset` is cached.
    pub fn contains(&self, offset: u64) -> bool {
        self.slots.contains_key(&offset)
    }

    /// Inserts a cluster, replacing any cached copy, then evicts clean clusters beyond the budget.
    pub fn insert(&mut self, offset: u64, kind: TableKind, bytes: Box<[u8]>, dirty: bool) {
        self.remove(offset);
        self.tick += 1;
        self.slots.insert(offset, Slot { bytes, kind, dirty, tick: self.tick });
        self.lru.insert(self.tick, offset);
        self.evict(Some(offset));
    }

    /// Drops a cluster from the cache, dirty or not (used when the cluster itself is freed or replaced).
    pub fn remove(&mut self, offset: u64) {
        if let Some(slot) = self.slots.remove(&offset) {
            self.lru.remove(&slot.tick);
        }
    }

    /// Drops the least recently used clean clusters beyond the budget, never `keep` (the cluster a caller is
    /// about to use).
    fn evict(&mut self, keep: Option<u64>) {
        if self.slots.len() <= self.capacity {
            return;
        }
        let excess = self.slots.len() - self.capacity;
        let victims: Vec<(u64, u64)> = self
            .lru
            .iter()
            .filter(|(_, off)| Some(**off) != keep && self.slots.get(off).is_some_and(|s| !s.dirty))
            .take(excess)
            .map(|(t, o)| (*t, *o))
            .collect();
        for (tick, offset) in victims {
            self.lru.remove(&tick);
            self.slots.remove(&offset);
        }
    }

    /// Whether dirty clusters have pushed the cache past its budget, so a writeback is due.
    pub fn over_budget(&self) -> bool {
        self.slots.len() > self.capacity
    }

    /// Whether any cluster of one kind is dirty.
    pub fn has_dirty(&self, kind: TableKind) -> bool {
        self.slots.values().any(|s| s.dirty && s.kind == kind)
    }

    /// Offsets of the dirty clusters of one kind, in ascending order so writeback I/O is sequential.
    pub fn dirty(&self, kind: TableKind) -> Vec<u64> {
        let mut v: Vec<u64> = self.slots.iter().filter(|(_, s)| s.dirty && s.kind == kind).map(|(o, _)| *o).collect();
        v.sort_unstable();
        v
    }

    /// The bytes of a cluster without touching its recency, for writing it out.
    pub fn peek(&self, offset: u64) -> Option<&[u8]> {
        self.slots.get(&offset).map(|s| &*s.bytes)
    }

    /// Marks a cluster clean after it has been written.
    pub fn mark_clean(&mut self, offset: u64) {
        if let Some(s) = self.slots.get_mut(&offset) {
            s.dirty = false;
        }
    }

    /// Evicts clean clusters beyond the budget (after a writeback made some clean).
    pub fn shrink(&mut self) {
        self.evict(None);
    }

    /// Drops every clean cluster.
    pub fn clear_clean(&mut self) {
        let clean: Vec<u64> = self.slots.iter().filter(|(_, s)| !s.dirty).map(|(o, _)| *o).collect();
        for o in clean {
            self.remove(o);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eviction_keeps_dirty_clusters_and_drops_least_recent_clean_ones() {
        let mut c = MetadataCache::new(4);
        for i in 0..4u64 {
            c.insert(i * 512, TableKind::L2, vec![i as u8; 512].into(), i == 0);
        }
        assert!(c.get(512).is_some());
        c.insert(4 * 512, TableKind::L2, vec![4; 512].into(), false);
        // 0 is dirty and 512 was touched: 1024 is the least recent clean cluster.
        assert!(c.contains(0));
        assert!(c.contains(512));
        assert!(!c.contains(1024));
        assert_eq!(c.dirty(TableKind::L2), vec![0]);
        c.mark_clean(0);
        assert!(c.dirty(TableKind::L2).is_empty());
    }

    #[test]
    fn a_freshly_inserted_cluster_survives_even_when_every_other_one_is_dirty() {
        let mut c = MetadataCache::new(4);
        for i in 0..4u64 {
            c.insert(i * 512, TableKind::L2, vec![0; 512].into(), true);
        }
        c.insert(4 * 512, TableKind::L2, vec![9; 512].into(), false);
        assert_eq!(c.get(4 * 512).and_then(|b| b.first().copied()), Some(9));
    }

    #[test]
    fn a_cache_of_dirty_clusters_grows_and_reports_it() {
        let mut c = MetadataCache::new(4);
        for i in 0..6u64 {
            c.insert(i * 512, TableKind::RefcountBlock, vec![0; 512].into(), true);
        }
        assert!(c.over_budget());
        for i in 0..6u64 {
            c.mark_clean(i * 512);
        }
        c.shrink();
        assert!(!c.over_budget());
    }
}
