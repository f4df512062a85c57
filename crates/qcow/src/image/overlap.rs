//! Metadata corruption met during normal I/O, handled as QEMU handles it: a write that would land on metadata is
//! refused, the image is marked corrupt (incompatible bit 1, on disk when the image is writable), and every later
//! write is refused; reads keep working wherever the mapping is sane.
//!
//! What counts as metadata follows QEMU's default ("cached") overlap checks: the header cluster, the active L1
//! table, the refcount table, the refcount blocks, the snapshot table and the snapshots' L1 tables, the active L2
//! tables and the bitmap directory. Bitmap tables and snapshot-only L2 tables are not checked (QEMU leaves them
//! out by default too).
//!
//! The checks sit only where a pointer read from disk decides where bytes go: a guest write into a host cluster
//! an L2 entry names, a table loaded through an L1 or refcount-table entry, and every metadata cluster written
//! back. Clusters the allocator hands out are free by refcount and need no check. The structures that are not
//! fixed by the header are kept as in-memory sets (refcount blocks from the refcount table, active L2 tables from
//! the L1 table), built on first use and kept up to date as entries change, so a check costs two hash lookups.

use std::sync::OnceLock;

use super::cache::TableKind;
use super::meta::{be64, Meta};
use super::offset_hash::{OffsetMap, OffsetSet};
use crate::block::BlockDevice;
use crate::error::{Error, Result};
use crate::format::{
    feature, snapshot_table_size, BitmapsExtension, Extension, Header, L1Entry, L2Entry, L2Kind, RefcountTableEntry,
};

/// A kind of metadata, as QEMU's overlap checks name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaKind {
    /// Cluster 0.
    Header,
    /// The L1 table the header points at.
    ActiveL1,
    /// The refcount table.
    RefcountTable,
    /// A refcount block named by the refcount table.
    RefcountBlock,
    /// The snapshot table.
    SnapshotTable,
    /// The L1 table of an internal snapshot.
    InactiveL1,
    /// An L2 table named by the active L1 table.
    ActiveL2,
    /// The persistent-bitmap directory.
    BitmapDirectory,
}

impl MetaKind {
    /// Why a write to a cluster holding this kind of metadata is refused (QEMU: "Preventing invalid write on
    /// metadata (overlaps with ...)").
    fn write_refused(self) -> &'static str {
        match self {
            MetaKind::Header => "write refused: it would overwrite the qcow2 header",
            MetaKind::ActiveL1 => "write refused: it would overwrite the active L1 table",
            MetaKind::RefcountTable => "write refused: it would overwrite the refcount table",
            MetaKind::RefcountBlock => "write refused: it would overwrite a refcount block",
            MetaKind::SnapshotTable => "write refused: it would overwrite the snapshot table",
            MetaKind::InactiveL1 => "write refused: it would overwrite a snapshot's L1 table",
            MetaKind::ActiveL2 => "write refused: it would overwrite an active L2 table",
            MetaKind::BitmapDirectory => "write refused: it would overwrite the bitmap directory",
        }
    }

    fn of(kind: TableKind) -> MetaKind {
        match kind {
            TableKind::L1 => MetaKind::ActiveL1,
            TableKind::L2 => MetaKind::ActiveL2,
            TableKind::RefcountBlock => MetaKind::RefcountBlock,
        }
    }
}

/// Why a table loaded through an on-disk pointer cannot be used: it sits on other metadata.
fn load_refused(loading: TableKind, found: MetaKind) -> &'static str {
    match (loading, found) {
        (TableKind::L2, MetaKind::Header) => "L1 entry points an L2 table at the qcow2 header",
        (TableKind::L2, MetaKind::ActiveL1) => "L1 entry points an L2 table at the active L1 table",
        (TableKind::L2, MetaKind::RefcountTable) => "L1 entry points an L2 table at the refcount table",
        (TableKind::L2, MetaKind::RefcountBlock) => "L1 entry points an L2 table at a refcount block",
        (TableKind::L2, MetaKind::SnapshotTable) => "L1 entry points an L2 table at the snapshot table",
        (TableKind::L2, MetaKind::InactiveL1) => "L1 entry points an L2 table at a snapshot's L1 table",
        (TableKind::L2, MetaKind::BitmapDirectory) => "L1 entry points an L2 table at the bitmap directory",
        (TableKind::RefcountBlock, MetaKind::ActiveL2) => "refcount table entry points at an active L2 table",
        (TableKind::RefcountBlock, MetaKind::ActiveL1) => "refcount table entry points at the active L1 table",
        (TableKind::RefcountBlock, MetaKind::RefcountTable) => "refcount table entry points at the refcount table",
        (TableKind::RefcountBlock, _) => "refcount table entry points at other metadata",
        (TableKind::L1, _) => "the L1 table overlaps other metadata",
        (TableKind::L2, MetaKind::ActiveL2) => "L2 table overlaps another L2 table",
    }
}

type ClusterMap<V> = OffsetMap<V>;
type ClusterSet = OffsetSet;

/// The first corruption found while the image was open. Once set, every write is refused with it.
#[derive(Debug, Default)]
pub struct Corruption(OnceLock<(&'static str, u64)>);

impl Corruption {
    /// `Corrupt` with the first evidence once corruption was found.
    pub fn check(&self) -> Result<()> {
        match self.0.get() {
            Some(&(what, offset)) => Err(Error::Corrupt { what, offset }),
            None => Ok(()),
        }
    }
}

/// A range of host clusters `[first, end)` holding one kind of metadata.
type ClusterRange = (u64, u64, MetaKind);

/// The metadata locations that are not fixed by the header, kept so that a check is a few lookups.
#[derive(Debug)]
pub struct OverlapIndex {
    /// Active L2 tables by host cluster, with how many L1 entries name each; built on first use.
    l2: Option<ClusterMap<u32>>,
    /// Refcount blocks by host cluster; rebuilt from the refcount table when it is replaced.
    refblocks: Option<ClusterSet>,
    /// Snapshot table and snapshot L1 tables (this version never changes them while open); read on first use.
    snapshots: Option<Vec<ClusterRange>>,
    /// The bitmap directory, when QEMU would consider it (the bitmaps autoclear bit was set at open).
    bitmap_directory: Option<ClusterRange>,
    /// Off while refcounts are rebuilt: the old refcount structures may be stale then.
    pub enabled: bool,
}

/// Host clusters covering `len` bytes from `offset`.
fn cluster_range(offset: u64, len: u64, cluster_bits: u32, kind: MetaKind) -> Option<ClusterRange> {
    if len == 0 {
        return None;
    }
    let end = offset.checked_add(len)?;
    let cs = 1u64 << cluster_bits;
    Some((offset >> cluster_bits, end.div_ceil(cs), kind))
}

impl OverlapIndex {
    /// The index for an image whose header (as read at open) is `header`.
    pub fn new(header: &Header) -> Self {
        OverlapIndex {
            l2: None,
            refblocks: None,
            snapshots: None,
            bitmap_directory: Self::bitmap_directory_of(header),
            enabled: true,
        }
    }

    /// The bitmap directory has moved (or gone): `header` says where it is now.
    pub fn bitmap_directory_replaced(&mut self, header: &Header) {
        self.bitmap_directory = Self::bitmap_directory_of(header);
    }

    fn bitmap_directory_of(header: &Header) -> Option<ClusterRange> {
        (header.autoclear_features & feature::BITMAPS != 0)
            .then(|| header.extension(Extension::BITMAPS))
            .flatten()
            .and_then(|ext| BitmapsExtension::parse(&ext.data).ok())
            .and_then(|ext| {
                cluster_range(ext.directory_offset, ext.directory_size, header.cluster_bits, MetaKind::BitmapDirectory)
            })
    }

    /// The active L1 table changed wholesale (a snapshot was opened): forget its L2 tables.
    pub fn l1_replaced(&mut self) {
        self.l2 = None;
    }

    /// The refcount table was replaced (grown or rebuilt): forget its blocks.
    pub fn reftable_replaced(&mut self) {
        self.refblocks = None;
    }

    /// The snapshot table moved or its entries changed: forget where the snapshot L1 tables are.
    pub fn snapshot_table_replaced(&mut self) {
        self.snapshots = None;
    }

    /// A refcount-table entry now names a block at `offset`.
    pub fn refblock_added(&mut self, offset: u64, cluster_bits: u32) {
        if let Some(set) = &mut self.refblocks {
            set.insert(offset >> cluster_bits);
        }
    }

    /// An L1 entry changed from `old` to `new`.
    pub fn l1_entry_changed(&mut self, old: L1Entry, new: L1Entry, cluster_bits: u32) {
        let Some(map) = &mut self.l2 else { return };
        if let Some(l2) = old.l2_offset() {
            let cluster = l2.0 >> cluster_bits;
            if let Some(n) = map.get_mut(&cluster) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    map.remove(&cluster);
                }
            }
        }
        if let Some(l2) = new.l2_offset() {
            *map.entry(l2.0 >> cluster_bits).or_insert(0) += 1;
        }
    }
}

impl Meta {
    /// Records corruption found at `offset`, sets the corrupt bit in the on-disk header when the image is
    /// writable (best effort: the write that found it fails either way), and returns the error to report.
    ///
    /// Only the incompatible-features field is patched on disk, so header changes not yet written back (which
    /// may point at metadata that is not durable) stay unwritten. Version 2 headers have no such field: the
    /// image then refuses writes until it is closed, as QEMU does.
    pub fn signal_corruption(&mut self, dev: &dyn BlockDevice, what: &'static str, offset: u64) -> Error {
        let _ = self.corruption.0.set((what, offset));
        // A read-only image is left as it is on disk, and reports what the disk says (QEMU: a non-fatal event).
        if self.writable && self.header.incompatible_features & feature::CORRUPT == 0 {
            self.header.incompatible_features |= feature::CORRUPT;
            if self.header.version >= 3 {
                // A header copy being written outside the lock must not land after the bit and clear it.
                self.queue.wait_idle();
                let _ = mark_corrupt_on_disk(dev);
            }
        }
        Error::corrupt(what, offset)
    }

    /// Refuses a guest-data write into the host cluster at `host` (found through an L2 entry) when that cluster
    /// holds metadata.
    pub fn check_data_write(&mut self, dev: &dyn BlockDevice, host: u64) -> Result<()> {
        if !self.overlap.enabled {
            return Ok(());
        }
        match self.overlapping(dev, host >> self.geo.cluster_bits, None)? {
            Some(kind) => Err(self.signal_corruption(dev, kind.write_refused(), host)),
            None => Ok(()),
        }
    }

    /// Refuses writing back a metadata cluster of kind `own` at `offset` when it would land on other metadata.
    pub fn check_meta_write(&mut self, dev: &dyn BlockDevice, offset: u64, own: MetaKind) -> Result<()> {
        if !self.overlap.enabled {
            return Ok(());
        }
        match self.overlapping(dev, offset >> self.geo.cluster_bits, Some(own))? {
            Some(kind) => Err(self.signal_corruption(dev, kind.write_refused(), offset)),
            None => Ok(()),
        }
    }

    /// Refuses loading a table of kind `kind` at `offset` (named by an on-disk pointer) when it sits on other
    /// metadata, or when the cache already holds that cluster as a different kind of table.
    pub fn check_table_load(&mut self, dev: &dyn BlockDevice, offset: u64, kind: TableKind) -> Result<()> {
        if !self.overlap.enabled || kind == TableKind::L1 {
            // L1 clusters come from the header, which was validated at open; their writeback is checked.
            return Ok(());
        }
        let found = match self.cache.cluster_kind(offset) {
            Some(cached) if cached != kind => Some(MetaKind::of(cached)),
            _ => self.overlapping(dev, offset >> self.geo.cluster_bits, Some(MetaKind::of(kind)))?,
        };
        match found {
            Some(other) => Err(self.signal_corruption(dev, load_refused(kind, other), offset)),
            None => Ok(()),
        }
    }

    /// Decodes the L2 entry stored at byte `at`. A normal or preallocated-zero entry whose offset is not cluster
    /// aligned is corruption QEMU signals (it marks a writable image corrupt) at once; reserved bits fail the
    /// request here, and `Image::observe` records them where the operation returns.
    pub fn decode_l2(&mut self, dev: &dyn BlockDevice, entry: L2Entry, at: u64) -> Result<L2Kind> {
        match entry.kind(&self.geo) {
            Ok(kind) => Ok(kind),
            Err(what) if entry.host_cluster().is_some_and(|h| !self.geo.is_aligned(h.0)) => {
                Err(self.signal_corruption(dev, what, at))
            }
            Err(what) => Err(Error::corrupt(what, at)),
        }
    }

    /// The kind of metadata host cluster `cluster` holds, other than `ignore`.
    fn overlapping(
        &mut self,
        dev: &dyn BlockDevice,
        cluster: u64,
        ignore: Option<MetaKind>,
    ) -> Result<Option<MetaKind>> {
        let cb = self.geo.cluster_bits;
        let h = &self.header;
        let fixed = [
            Some((0, 1, MetaKind::Header)),
            cluster_range(h.l1_table_offset, u64::from(h.l1_size) * 8, cb, MetaKind::ActiveL1),
            cluster_range(
                h.refcount_table_offset,
                u64::from(h.refcount_table_clusters) << cb,
                cb,
                MetaKind::RefcountTable,
            ),
            self.overlap.bitmap_directory,
        ];
        let hit = |r: &ClusterRange| Some(r.2) != ignore && (r.0..r.1).contains(&cluster);
        if let Some(r) = fixed.iter().flatten().find(|r| hit(r)) {
            return Ok(Some(r.2));
        }
        if self.header.nb_snapshots != 0 {
            if let Some(r) = self.snapshot_ranges(dev).iter().find(|r| hit(r)) {
                return Ok(Some(r.2));
            }
        }
        if ignore != Some(MetaKind::RefcountBlock) && self.refblock_set().contains(&cluster) {
            return Ok(Some(MetaKind::RefcountBlock));
        }
        if ignore != Some(MetaKind::ActiveL2) && self.l2_set(dev)?.contains_key(&cluster) {
            return Ok(Some(MetaKind::ActiveL2));
        }
        Ok(None)
    }

    fn refblock_set(&mut self) -> &ClusterSet {
        let cb = self.geo.cluster_bits;
        let reftable = &self.reftable;
        self.overlap.refblocks.get_or_insert_with(|| {
            reftable.iter().filter_map(|e| RefcountTableEntry(*e).block_offset()).map(|o| o.0 >> cb).collect()
        })
    }

    /// Active L2 tables. Built by one pass over the L1 table, taking each L1 cluster from the cache when it is
    /// there (it may be newer than the disk) and from the disk otherwise, without filling the cache.
    fn l2_set(&mut self, dev: &dyn BlockDevice) -> Result<&ClusterMap<u32>> {
        if self.overlap.l2.is_none() {
            let cs = self.geo.cluster_size();
            let cb = self.geo.cluster_bits;
            let start = self.header.l1_table_offset;
            let entries = self.l1_size();
            let mut map = ClusterMap::<u32>::default();
            let mut cluster_at = start & !(cs - 1);
            let mut done = 0u64;
            let mut disk = vec![0u8; cs as usize];
            while done < entries {
                let bytes: &[u8] = match self.cache.peek(cluster_at) {
                    Some(b) => b,
                    None => {
                        dev.read_at(cluster_at, &mut disk)?;
                        &disk
                    }
                };
                let skip = if done == 0 { (start - cluster_at) as usize } else { 0 };
                for raw in bytes.get(skip..).unwrap_or(&[]).chunks_exact(8).take((entries - done) as usize) {
                    let entry = L1Entry(be64(raw));
                    done += 1;
                    if entry.is_malformed(&self.geo) {
                        continue;
                    }
                    if let Some(l2) = entry.l2_offset() {
                        *map.entry(l2.0 >> cb).or_insert(0) += 1;
                    }
                }
                cluster_at += cs;
            }
            self.overlap.l2 = Some(map);
        }
        match &self.overlap.l2 {
            Some(map) => Ok(map),
            None => Err(Error::corrupt("L2 table index missing", self.header.l1_table_offset)),
        }
    }

    /// The snapshot table and the snapshots' L1 tables. A table that cannot be parsed still protects its first
    /// cluster; its problems are reported by whoever reads the snapshots.
    fn snapshot_ranges(&mut self, dev: &dyn BlockDevice) -> &[ClusterRange] {
        if self.overlap.snapshots.is_none() {
            let cb = self.geo.cluster_bits;
            let offset = self.header.snapshots_offset;
            let ranges = match self.snapshots(dev) {
                Ok(list) => {
                    let mut ranges: Vec<ClusterRange> = list
                        .iter()
                        .filter_map(|s| {
                            cluster_range(s.l1_table_offset, u64::from(s.l1_size) * 8, cb, MetaKind::InactiveL1)
                        })
                        .collect();
                    ranges.extend(cluster_range(offset, snapshot_table_size(&list), cb, MetaKind::SnapshotTable));
                    ranges
                }
                Err(_) => cluster_range(offset, 1, cb, MetaKind::SnapshotTable).into_iter().collect(),
            };
            self.overlap.snapshots = Some(ranges);
        }
        self.overlap.snapshots.as_deref().unwrap_or(&[])
    }
}

/// Sets incompatible bit 1 in the on-disk header (bytes 72..80 of a version 3 header) and flushes.
fn mark_corrupt_on_disk(dev: &dyn BlockDevice) -> Result<()> {
    let mut sector = vec![0u8; 512];
    dev.read_at(0, &mut sector)?;
    let field = sector.get_mut(72..80).ok_or_else(|| Error::corrupt("header shorter than 80 bytes", 0))?;
    let value = be64(field) | feature::CORRUPT;
    field.copy_from_slice(&value.to_be_bytes());
    dev.write_at(0, &sector)?;
    dev.flush()
}
