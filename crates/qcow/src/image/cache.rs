//! The metadata cache: L1 clusters, refcount blocks and slices of L2 tables, keyed by their host offset.
//!
//! The cache is write-back and bounded in bytes. A piece modified here is marked dirty and reaches the disk only
//! when [`writeback`](super::writeback) writes it, in the order the durability rules demand; eviction only ever
//! drops clean pieces, so a dirty one can never be lost or written out of order. When every piece is dirty the
//! cache may grow past its budget until the next writeback, which the engine triggers itself.
//!
//! L2 tables are cached in slices of [`L2_SLICE`] bytes, as QEMU's `l2-cache-entry-size` does by default: a random
//! read over a large image then costs one small read per miss instead of a whole table, and the same budget maps
//! sixteen times as many scattered places at 64 KiB clusters. L1 clusters and refcount blocks are cached whole.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

use super::offset_hash::OffsetMap;

/// Bytes of an L2 table cached as one piece (or the whole table, for clusters smaller than this).
pub const L2_SLICE: u64 = 4096;

/// What a cached piece holds, which decides when writeback writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TableKind {
    /// A refcount block.
    RefcountBlock,
    /// A slice of an L2 table.
    L2,
    /// One cluster of the L1 table.
    L1,
}

struct Slot {
    bytes: Box<[u8]>,
    kind: TableKind,
    dirty: bool,
    tick: u64,
    /// Changes with every modification: a writeback that copied the piece marks it clean only if it is still
    /// the copy it wrote.
    version: u64,
    /// Looked up under the shared lock since eviction last passed it: such a lookup cannot move the piece in the
    /// recency order, so eviction gives it a second chance instead (as a clock cache does).
    referenced: AtomicBool,
}

/// A cluster with cached pieces: what kind of table it is and how many of its pieces are cached.
#[derive(Clone, Copy)]
struct Owner {
    kind: TableKind,
    pieces: u32,
}

/// A bounded write-back cache of metadata, in pieces: whole clusters, or slices of L2 tables.
pub struct MetadataCache {
    slots: OffsetMap<Slot>,
    owners: OffsetMap<Owner>,
    lru: BTreeMap<u64, u64>,
    tick: u64,
    used: u64,
    budget: u64,
    cluster_size: u64,
    /// Accesses after which a piece's place in the recency order is renewed; see `touch`.
    renew_after: u64,
}

impl MetadataCache {
    /// A cache of tables of `cluster_size` bytes that keeps at most `budget` bytes of clean pieces (at least
    /// eight clusters, so that a table being moved and the clusters it needs fit together).
    pub fn new(budget: u64, cluster_size: u64) -> Self {
        let budget = budget.max(cluster_size.saturating_mul(8));
        MetadataCache {
            slots: OffsetMap::default(),
            owners: OffsetMap::default(),
            lru: BTreeMap::new(),
            tick: 0,
            used: 0,
            budget,
            cluster_size,
            renew_after: budget / L2_SLICE.min(cluster_size) / 4,
        }
    }

    /// Bytes of one cached piece of a table of this kind.
    pub fn piece_len(&self, kind: TableKind) -> u64 {
        match kind {
            TableKind::L2 => L2_SLICE.min(self.cluster_size),
            TableKind::L1 | TableKind::RefcountBlock => self.cluster_size,
        }
    }

    /// The key of the piece of the table at `cluster` holding byte `at` of it, and that byte's place in the piece.
    pub fn piece_of(&self, kind: TableKind, cluster: u64, at: u64) -> (u64, usize) {
        let piece = self.piece_len(kind);
        (cluster + at / piece * piece, (at % piece) as usize)
    }

    fn cluster_of(&self, key: u64) -> u64 {
        key & !(self.cluster_size - 1)
    }

    /// Records an access. The recency order is renewed only for a piece whose place in it is older than a quarter
    /// of what the cache holds (approximate LRU, as in a segmented cache): every lookup runs under the metadata
    /// lock, and moving a piece that is among the most recent anyway changes no eviction.
    fn touch(&mut self, key: u64) {
        self.tick += 1;
        let tick = self.tick;
        if let Some(slot) = self.slots.get_mut(&key) {
            if tick - slot.tick <= self.renew_after {
                return;
            }
            self.lru.remove(&slot.tick);
            slot.tick = tick;
            self.lru.insert(tick, key);
        }
    }

    /// The piece at `key`, if cached.
    pub fn get(&mut self, key: u64) -> Option<&[u8]> {
        self.touch(key);
        self.slots.get(&key).map(|s| &*s.bytes)
    }

    /// The piece at `key` for modification, marking it dirty.
    pub fn get_mut(&mut self, key: u64) -> Option<&mut [u8]> {
        self.touch(key);
        let version = self.tick;
        self.slots.get_mut(&key).map(|s| {
            s.dirty = true;
            s.version = version;
            &mut *s.bytes
        })
    }

    /// What the piece cached at `key` holds, if it is cached.
    pub fn kind(&self, key: u64) -> Option<TableKind> {
        self.slots.get(&key).map(|s| s.kind)
    }

    /// What the table with pieces cached in the cluster at `cluster` is, if any piece of it is cached.
    pub fn cluster_kind(&self, cluster: u64) -> Option<TableKind> {
        self.owners.get(&cluster).map(|o| o.kind)
    }

    /// Inserts one piece, replacing any cached copy, then evicts clean pieces beyond the budget.
    pub fn insert(&mut self, key: u64, kind: TableKind, bytes: Box<[u8]>, dirty: bool) {
        self.remove_piece(key);
        self.tick += 1;
        self.used += bytes.len() as u64;
        self.slots.insert(
            key,
            Slot { bytes, kind, dirty, tick: self.tick, version: self.tick, referenced: AtomicBool::new(false) },
        );
        self.lru.insert(self.tick, key);
        let cluster = self.cluster_of(key);
        self.owners.entry(cluster).and_modify(|o| o.pieces += 1).or_insert(Owner { kind, pieces: 1 });
        self.evict(Some(key));
    }

    /// Inserts a whole table, cut into its pieces, all dirty (a table just created or copied).
    pub fn insert_table(&mut self, cluster: u64, kind: TableKind, bytes: &[u8]) {
        self.remove(cluster);
        let piece = self.piece_len(kind) as usize;
        for (i, chunk) in bytes.chunks(piece).enumerate() {
            self.insert(cluster + (i * piece) as u64, kind, chunk.into(), true);
        }
    }

    fn remove_piece(&mut self, key: u64) {
        if let Some(slot) = self.slots.remove(&key) {
            self.lru.remove(&slot.tick);
            self.used -= slot.bytes.len() as u64;
            let cluster = self.cluster_of(key);
            if let Some(owner) = self.owners.get_mut(&cluster) {
                owner.pieces -= 1;
                if owner.pieces == 0 {
                    self.owners.remove(&cluster);
                }
            }
        }
    }

    /// Drops every cached piece of the cluster at `cluster`, dirty or not (used when the table itself is freed
    /// or replaced).
    pub fn remove(&mut self, cluster: u64) {
        let Some(owner) = self.owners.get(&cluster).copied() else { return };
        let piece = self.piece_len(owner.kind);
        let mut key = cluster;
        while key < cluster + self.cluster_size && self.owners.contains_key(&cluster) {
            self.remove_piece(key);
            key += piece;
        }
    }

    /// Moves every piece of the table at `from` to `to`, dirty, when all of its pieces are cached; otherwise
    /// changes nothing and answers false. This is how a table moves without writing it: its pieces, with every
    /// unwritten change, become the new copy that writeback will write.
    pub fn rekey(&mut self, from: u64, to: u64) -> bool {
        let Some(owner) = self.owners.get(&from).copied() else { return false };
        let piece = self.piece_len(owner.kind);
        let mut pieces = Vec::new();
        let mut at = 0;
        while at < self.cluster_size {
            match self.slots.get(&(from + at)) {
                Some(slot) => pieces.push(slot.bytes.clone()),
                None => return false,
            }
            at += piece;
        }
        // Taken out before anything is inserted, so that no eviction can drop a clean piece not yet copied.
        self.remove(from);
        self.remove(to);
        let mut key = to;
        for bytes in pieces {
            self.insert(key, owner.kind, bytes, true);
            key += piece;
        }
        true
    }

    /// Drops the least recently used clean pieces beyond the budget, never `keep` (the piece a caller is about
    /// to use). A piece looked up under the shared lock since the last eviction is renewed instead, once.
    fn evict(&mut self, keep: Option<u64>) {
        if self.used <= self.budget {
            return;
        }
        let mut excess = self.used - self.budget;
        let mut victims = Vec::new();
        let mut renewed = Vec::new();
        for (&tick, &key) in &self.lru {
            if excess == 0 {
                break;
            }
            if Some(key) == keep {
                continue;
            }
            if let Some(slot) = self.slots.get(&key).filter(|s| !s.dirty) {
                if slot.referenced.swap(false, Ordering::Relaxed) {
                    renewed.push((tick, key));
                    continue;
                }
                excess = excess.saturating_sub(slot.bytes.len() as u64);
                victims.push((tick, key));
            }
        }
        for (_, key) in victims {
            self.remove_piece(key);
        }
        for (old, key) in renewed {
            self.tick += 1;
            let tick = self.tick;
            if let Some(slot) = self.slots.get_mut(&key) {
                self.lru.remove(&old);
                slot.tick = tick;
                self.lru.insert(tick, key);
            }
        }
        if excess > 0 && self.used > self.budget {
            // Everything clean had a second chance: this pass takes what is left, oldest first.
            self.evict_unreferenced(keep);
        }
    }

    fn evict_unreferenced(&mut self, keep: Option<u64>) {
        let mut excess = self.used.saturating_sub(self.budget);
        let mut victims = Vec::new();
        for &key in self.lru.values() {
            if excess == 0 {
                break;
            }
            if let Some(slot) = self.slots.get(&key).filter(|s| !s.dirty && Some(key) != keep) {
                excess = excess.saturating_sub(slot.bytes.len() as u64);
                victims.push(key);
            }
        }
        for key in victims {
            self.remove_piece(key);
        }
    }

    /// The piece at `key` for a lookup under the shared lock, if cached as `kind`: it is marked referenced, so
    /// that eviction renews it.
    pub fn lookup_shared(&self, key: u64, kind: TableKind) -> Option<&[u8]> {
        let slot = self.slots.get(&key).filter(|s| s.kind == kind)?;
        if !slot.referenced.load(Ordering::Relaxed) {
            slot.referenced.store(true, Ordering::Relaxed);
        }
        Some(&slot.bytes)
    }

    /// Whether dirty pieces have pushed the cache past its budget, so a writeback is due.
    pub fn over_budget(&self) -> bool {
        self.used > self.budget
    }

    /// Whether any piece of one kind is dirty.
    pub fn has_dirty(&self, kind: TableKind) -> bool {
        self.slots.values().any(|s| s.dirty && s.kind == kind)
    }

    /// Keys of the dirty pieces of one kind, in ascending order so writeback I/O is sequential.
    pub fn dirty(&self, kind: TableKind) -> Vec<u64> {
        let mut v: Vec<u64> = self.slots.iter().filter(|(_, s)| s.dirty && s.kind == kind).map(|(o, _)| *o).collect();
        v.sort_unstable();
        v
    }

    /// The bytes of a piece without touching its recency, for writing it out.
    pub fn peek(&self, key: u64) -> Option<&[u8]> {
        self.slots.get(&key).map(|s| &*s.bytes)
    }

    /// Marks a piece clean after it has been written.
    pub fn mark_clean(&mut self, key: u64) {
        if let Some(s) = self.slots.get_mut(&key) {
            s.dirty = false;
        }
    }

    /// The dirty pieces of one kind, in ascending order, each with a copy of its bytes and its version: what a
    /// writeback outside the lock writes.
    pub fn dirty_copies(&self, kind: TableKind) -> Vec<(u64, u64, Box<[u8]>)> {
        let mut v: Vec<(u64, u64, Box<[u8]>)> = self
            .slots
            .iter()
            .filter(|(_, s)| s.dirty && s.kind == kind)
            .map(|(o, s)| (*o, s.version, s.bytes.clone()))
            .collect();
        v.sort_unstable_by_key(|p| p.0);
        v
    }

    /// Marks a piece clean after a copy of it was written, unless it changed since the copy was taken (then the
    /// change still has to be written) or was dropped meanwhile.
    pub fn mark_clean_if(&mut self, key: u64, version: u64) {
        if let Some(s) = self.slots.get_mut(&key).filter(|s| s.version == version) {
            s.dirty = false;
        }
    }

    /// Evicts clean pieces beyond the budget (after a writeback made some clean).
    pub fn shrink(&mut self) {
        self.evict(None);
    }

    /// Drops every clean piece.
    pub fn clear_clean(&mut self) {
        let clean: Vec<u64> = self.slots.iter().filter(|(_, s)| !s.dirty).map(|(o, _)| *o).collect();
        for key in clean {
            self.remove_piece(key);
        }
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn eviction_keeps_dirty_pieces_and_drops_least_recent_clean_ones() {
        let mut c = MetadataCache::new(0, 512);
        for i in 0..8u64 {
            c.insert(i * 512, TableKind::L2, vec![i as u8; 512].into(), i == 0);
        }
        assert!(c.get(512).is_some());
        c.insert(8 * 512, TableKind::L2, vec![8; 512].into(), false);
        // 0 is dirty and 512 was touched: 1024 is the least recent clean piece.
        assert!(c.cluster_kind(0).is_some());
        assert!(c.cluster_kind(512).is_some());
        assert!(c.cluster_kind(1024).is_none());
        assert_eq!(c.dirty(TableKind::L2), vec![0]);
        c.mark_clean(0);
        assert!(c.dirty(TableKind::L2).is_empty());
    }

    #[test]
    fn a_piece_looked_up_under_the_shared_lock_gets_a_second_chance() {
        let mut c = MetadataCache::new(0, 512);
        for i in 0..8u64 {
            c.insert(i * 512, TableKind::L2, vec![i as u8; 512].into(), false);
        }
        // 0 is the least recent, but a shared lookup saw it: 512 goes instead.
        assert!(c.lookup_shared(0, TableKind::L2).is_some());
        assert!(c.lookup_shared(0, TableKind::RefcountBlock).is_none(), "a lookup names the kind it expects");
        c.insert(8 * 512, TableKind::L2, vec![8; 512].into(), false);
        assert!(c.cluster_kind(0).is_some());
        assert!(c.cluster_kind(512).is_none());
        // Renewed to the recent end: the next two evictions take the older pieces.
        c.insert(9 * 512, TableKind::L2, vec![9; 512].into(), false);
        c.insert(10 * 512, TableKind::L2, vec![10; 512].into(), false);
        assert!(c.cluster_kind(1024).is_none() && c.cluster_kind(1536).is_none());
        assert!(c.cluster_kind(0).is_some());
    }

    #[test]
    fn a_freshly_inserted_piece_survives_even_when_every_other_one_is_dirty() {
        let mut c = MetadataCache::new(0, 512);
        for i in 0..8u64 {
            c.insert(i * 512, TableKind::L2, vec![0; 512].into(), true);
        }
        c.insert(8 * 512, TableKind::L2, vec![9; 512].into(), false);
        assert_eq!(c.get(8 * 512).and_then(|b| b.first().copied()), Some(9));
    }

    #[test]
    fn a_cache_of_dirty_pieces_grows_and_reports_it() {
        let mut c = MetadataCache::new(0, 512);
        for i in 0..10u64 {
            c.insert(i * 512, TableKind::RefcountBlock, vec![0; 512].into(), true);
        }
        assert!(c.over_budget());
        for i in 0..10u64 {
            c.mark_clean(i * 512);
        }
        c.shrink();
        assert!(!c.over_budget());
    }

    #[test]
    fn a_copy_written_back_marks_the_piece_clean_only_while_it_is_unchanged() {
        let mut c = MetadataCache::new(1 << 20, 512);
        c.insert(0, TableKind::L2, vec![1; 512].into(), true);
        c.insert(512, TableKind::L2, vec![2; 512].into(), true);
        let copies = c.dirty_copies(TableKind::L2);
        assert_eq!(copies.iter().map(|p| (p.0, p.2[0])).collect::<Vec<_>>(), vec![(0, 1), (512, 2)]);
        // Changed after the copy was taken: the change is not on disk yet.
        if let Some(b) = c.get_mut(512) {
            b[0] = 3;
        }
        for (key, version, _) in copies {
            c.mark_clean_if(key, version);
        }
        assert_eq!(c.dirty(TableKind::L2), vec![512]);
    }

    #[test]
    fn l2_tables_are_cached_in_slices_and_dropped_whole() {
        let cs = 65536;
        let mut c = MetadataCache::new(1 << 20, cs);
        assert_eq!(c.piece_of(TableKind::L2, 3 * cs, 8200), (3 * cs + 8192, 8));
        assert_eq!(c.piece_of(TableKind::RefcountBlock, 5 * cs, 8200), (5 * cs, 8200));
        let table: Vec<u8> = (0..cs).map(|i| (i / L2_SLICE) as u8).collect();
        c.insert_table(3 * cs, TableKind::L2, &table);
        assert_eq!(c.dirty(TableKind::L2).len(), 16);
        assert_eq!(c.peek(3 * cs + 5 * L2_SLICE).map(|b| (b.len(), b[0])), Some((4096, 5)));
        assert_eq!(c.cluster_kind(3 * cs), Some(TableKind::L2));
        c.remove(3 * cs);
        assert!(c.cluster_kind(3 * cs).is_none());
        assert!(c.dirty(TableKind::L2).is_empty());
        assert!(!c.over_budget());
    }

    #[test]
    fn a_table_moves_only_with_every_slice_cached() {
        let cs = 16384;
        let mut c = MetadataCache::new(1 << 20, cs);
        c.insert(cs, TableKind::L2, vec![1; 4096].into(), false);
        assert!(!c.rekey(cs, 4 * cs), "three of four slices are missing");
        assert!(c.cluster_kind(cs).is_some() && c.cluster_kind(4 * cs).is_none());
        for i in 1..4u64 {
            c.insert(cs + i * 4096, TableKind::L2, vec![i as u8 + 1; 4096].into(), false);
        }
        assert!(c.rekey(cs, 4 * cs));
        assert!(c.cluster_kind(cs).is_none());
        assert_eq!(c.dirty(TableKind::L2), (0..4u64).map(|i| 4 * cs + i * 4096).collect::<Vec<_>>());
        assert_eq!(c.peek(4 * cs + 3 * 4096).map(|b| b[0]), Some(4));
    }
}
