//! The walk over every structure the header reaches, in the order `qemu-img check` visits them: header, active
//! L1 tree, snapshot L1 trees, snapshot table, refcount table, bitmaps, refcount blocks.
//!
//! The walk reads the tables straight from the device (no cache: a check must see what is on disk) and hands
//! each pointer it finds to a [`Sink`]. The first pass counts references; a second pass, run only when clusters
//! turn out to be over-referenced, collects the pointers to those clusters so that the report can name them all.

use std::collections::HashSet;

use super::layout::Layout;
use super::problem::{Problem, Referrer, Structure};
use crate::block::read_padded;
use crate::block::BlockDevice;
use crate::error::{Error, Result};
use crate::format::{
    be64, feature, parse_bitmap_table, BitmapCluster, BitmapsExtension, ClusterType, Extension, L1Entry, L2Entry,
    RefcountTableEntry, SubclusterBitmap,
};

/// QEMU's limit on an L1 table's size in bytes.
const MAX_L1_BYTES: u64 = 32 << 20;

/// Where a walk's pointers go.
pub trait Sink {
    /// Counts one reference to every cluster that `[offset, offset + len)` touches (already checked to lie
    /// within the file, give or take the partial last cluster).
    fn reference(&mut self, offset: u64, len: u64, referrer: Referrer);
    /// References counted so far to `cluster`.
    fn count(&self, cluster: u64) -> u64;
    /// Clusters the count array covers (the file's, plus a partial one past its end when referenced).
    fn clusters(&self) -> u64;
}

/// `qemu-img check`'s allocation statistics, gathered over the active L1 tree.
#[derive(Debug, Default, Clone, Copy)]
pub struct FragStats {
    pub allocated: u64,
    pub fragmented: u64,
    pub compressed: u64,
}

/// One walk over the metadata.
pub struct Walk<'a> {
    dev: &'a dyn BlockDevice,
    layout: &'a Layout,
    /// Whether findings are recorded (the first pass) or only pointers followed (the referrer pass).
    record: bool,
    /// Whether the refcount table and blocks are visited: not for a rebuild, which replaces them.
    refcounts: bool,
    /// Findings, in walk order.
    pub problems: Vec<Problem>,
    /// Allocation statistics of the active tree.
    pub stats: FragStats,
    /// Something was not walked (unreadable table), so the counts are incomplete and must not drive a rebuild.
    pub incomplete: bool,
    /// The refcount structures are damaged in a way only a rebuild repairs.
    pub rebuild: bool,
    /// Some pointer targets space a cluster or more past the end of the file: a rebuild, which writes past the
    /// end, could land its new structures under it.
    pub points_past_end: bool,
}

impl<'a> Walk<'a> {
    pub fn new(dev: &'a dyn BlockDevice, layout: &'a Layout, record: bool) -> Self {
        Walk {
            dev,
            layout,
            record,
            refcounts: true,
            problems: Vec::new(),
            stats: FragStats::default(),
            incomplete: false,
            rebuild: false,
            points_past_end: false,
        }
    }

    /// The same walk, leaving out the refcount table and blocks.
    pub fn without_refcounts(self) -> Self {
        Walk { refcounts: false, ..self }
    }

    fn problem(&mut self, p: Problem) {
        if self.record {
            self.problems.push(p);
        }
    }

    fn cluster_size(&self) -> u64 {
        self.layout.geo.cluster_size()
    }

    /// Follows one pointer, unless its target ends a cluster or more past the end of the file (QEMU allows
    /// less: qemu-img leaves the last cluster partial).
    fn refer(&mut self, sink: &mut dyn Sink, offset: u64, len: u64, referrer: Referrer) -> bool {
        if len == 0 {
            return true;
        }
        let past_end = offset.saturating_add(len).saturating_sub(self.layout.file_len);
        if past_end >= self.cluster_size() {
            // A rebuild replaces the refcount table, so where the old one points stops mattering (QEMU
            // rebuilds such an image too).
            self.points_past_end |= referrer.target != Structure::RefcountTable;
            self.problem(Problem::OutsideFile { referrer, offset, len });
            return false;
        }
        sink.reference(offset, len, referrer);
        true
    }

    /// Reads `len` bytes at `offset`; what lies past the end of the file reads as zeros, as QEMU reads it.
    fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len as usize];
        read_padded(self.dev, self.layout.file_len, offset, &mut buf)?;
        Ok(buf)
    }

    /// The whole walk, feeding `sink`.
    pub fn run(&mut self, sink: &mut dyn Sink) -> Result<()> {
        let layout = self.layout;
        let cs = self.cluster_size();
        let header = &layout.header;
        self.refer(sink, 0, cs, Referrer { target: Structure::Header, at: 0 });

        let mut l1_tables = HashSet::new();
        l1_tables.insert(header.l1_table_offset);
        self.l1_tree(sink, header.l1_table_offset, u64::from(header.l1_size), true)?;

        if layout.data_file && header.nb_snapshots > 0 {
            self.problem(Problem::SnapshotsWithDataFile { count: header.nb_snapshots });
        }
        match &layout.snapshots {
            Ok(snapshots) => {
                for s in snapshots {
                    if !layout.geo.is_aligned(s.l1_table_offset) {
                        self.problem(Problem::BadSnapshotL1 {
                            id: s.id.clone(),
                            why: "L1 table is not cluster aligned; snapshot table entry corrupted",
                        });
                        continue;
                    }
                    if u64::from(s.l1_size) * 8 > MAX_L1_BYTES {
                        self.problem(Problem::BadSnapshotL1 {
                            id: s.id.clone(),
                            why: "L1 table is too large; snapshot table entry corrupted",
                        });
                        continue;
                    }
                    if s.l1_size > 0 && !l1_tables.insert(s.l1_table_offset) {
                        // Never made by QEMU; counted once more, but its tree is not walked twice.
                        self.problem(Problem::L1TableShared { offset: s.l1_table_offset });
                        let referrer = Referrer { target: Structure::SnapshotL1, at: header.snapshots_offset };
                        self.refer(sink, s.l1_table_offset, u64::from(s.l1_size) * 8, referrer);
                        continue;
                    }
                    self.l1_tree(sink, s.l1_table_offset, u64::from(s.l1_size), false)?;
                }
                let at = Referrer { target: Structure::SnapshotTable, at: 60 };
                self.refer(sink, header.snapshots_offset, layout.snapshots_size, at);
            }
            Err(why) => {
                self.incomplete = true;
                self.problem(Problem::Unreadable {
                    what: Structure::SnapshotTable,
                    offset: header.snapshots_offset,
                    why: why.clone(),
                });
            }
        }

        if self.refcounts {
            let reftable_len = u64::from(header.refcount_table_clusters) * cs;
            let at = Referrer { target: Structure::RefcountTable, at: 48 };
            self.refer(sink, header.refcount_table_offset, reftable_len, at);
        }

        self.bitmaps(sink)?;
        if self.refcounts {
            self.refcount_blocks(sink);
        }
        Ok(())
    }

    /// An L1 table and the L2 tables and data below it. Only the active table gathers statistics.
    fn l1_tree(&mut self, sink: &mut dyn Sink, offset: u64, entries: u64, active: bool) -> Result<()> {
        if entries == 0 {
            return Ok(());
        }
        let target = if active { Structure::ActiveL1 } else { Structure::SnapshotL1 };
        let bytes = entries * 8;
        self.refer(sink, offset, bytes, Referrer { target, at: if active { 40 } else { 0 } });
        if offset >= self.layout.file_len {
            return Ok(()); // reads as zeros: no L2 tables
        }
        let l1 = self.read(offset, bytes)?;
        let mut seen = HashSet::new();
        for (i, raw) in l1.chunks_exact(8).enumerate() {
            let entry = L1Entry(be64(raw));
            if entry == L1Entry::default() {
                continue;
            }
            let at = offset + i as u64 * 8;
            if entry.has_reserved_bits() {
                self.problem(Problem::ReservedBits { table: target, at, entry: entry.0 });
            }
            let l2 = entry.offset_field();
            let referrer = Referrer { target: Structure::L2Table, at };
            self.refer(sink, l2, self.cluster_size(), referrer);
            if !self.layout.geo.is_aligned(l2) {
                self.problem(Problem::Misaligned { referrer, offset: l2 });
            }
            if !seen.insert(l2) {
                self.problem(Problem::L2TableRepeated { at, offset: l2 });
                continue;
            }
            self.l2_table(sink, l2, active)?;
        }
        Ok(())
    }

    fn l2_table(&mut self, sink: &mut dyn Sink, l2: u64, active: bool) -> Result<()> {
        if l2 >= self.layout.file_len {
            return Ok(()); // reads as zeros: nothing allocated
        }
        let geo = self.layout.geo;
        let cs = geo.cluster_size();
        let table = self.read(l2, cs)?;
        let entry_size = geo.l2_entry_size() as usize;
        let mut next_contiguous = 0u64;
        for (i, raw) in table.chunks_exact(entry_size).enumerate() {
            let entry = L2Entry(be64(raw));
            let bitmap = SubclusterBitmap(if geo.extended_l2 { raw.get(8..16).map(be64).unwrap_or(0) } else { 0 });
            if entry == L2Entry::default() && bitmap == SubclusterBitmap::default() {
                continue;
            }
            let at = l2 + (i * entry_size) as u64;
            let kind = entry.cluster_type(geo.extended_l2, self.layout.data_file);
            if kind != ClusterType::Compressed && entry.has_reserved_bits() {
                self.problem(Problem::ReservedBits { table: Structure::L2Table, at, entry: entry.0 });
            }
            match kind {
                ClusterType::Compressed => self.compressed(sink, entry, bitmap, at, active),
                ClusterType::Normal | ClusterType::ZeroAlloc => {
                    let host = entry.offset_field();
                    if bitmap.is_contradictory() {
                        self.problem(Problem::BadSubclusterBitmap { at, bitmap: bitmap.0 });
                    }
                    let referrer = Referrer { target: Structure::Data, at };
                    if !geo.is_aligned(host) {
                        self.problem(Problem::Misaligned { referrer, offset: host });
                    }
                    if active {
                        self.stats.allocated += 1;
                        if next_contiguous != 0 && host != next_contiguous {
                            self.stats.fragmented += 1;
                        }
                        next_contiguous = host.saturating_add(cs);
                    }
                    if !self.layout.data_file {
                        self.refer(sink, host, cs, referrer);
                    }
                }
                ClusterType::ZeroPlain => {}
                ClusterType::Unallocated => {
                    if bitmap.allocated() != 0 {
                        self.problem(Problem::BadSubclusterBitmap { at, bitmap: bitmap.0 });
                    }
                }
            }
        }
        Ok(())
    }

    fn compressed(&mut self, sink: &mut dyn Sink, entry: L2Entry, bitmap: SubclusterBitmap, at: u64, active: bool) {
        let raw = entry.0;
        if entry.is_copied() {
            self.problem(Problem::BadCompressedEntry { at, entry: raw, why: "COPIED must never be set" });
        }
        if self.layout.data_file {
            self.problem(Problem::BadCompressedEntry { at, entry: raw, why: "compressed cluster with a data file" });
            return;
        }
        if bitmap != SubclusterBitmap::default() {
            let why = "compressed cluster with a subcluster bitmap";
            self.problem(Problem::BadCompressedEntry { at, entry: raw, why });
            return;
        }
        let descriptor = entry.compressed_descriptor(&self.layout.geo);
        let referrer = Referrer { target: Structure::CompressedData, at };
        self.refer(sink, descriptor.host_offset, descriptor.readable_len(), referrer);
        if active {
            self.stats.allocated += 1;
            self.stats.compressed += 1;
            self.stats.fragmented += 1;
        }
    }

    /// The bitmap directory, tables and data, counted only while the autoclear bit says QEMU trusts them.
    fn bitmaps(&mut self, sink: &mut dyn Sink) -> Result<()> {
        let header = &self.layout.header;
        if header.autoclear_features & feature::BITMAPS == 0 {
            return Ok(());
        }
        let Some(ext) = header.extension(Extension::BITMAPS) else { return Ok(()) };
        let ext = match BitmapsExtension::parse(&ext.data) {
            Ok(ext) if ext.nb_bitmaps > 0 => ext,
            Ok(_) => return Ok(()),
            Err(e) => {
                self.unreadable(Structure::BitmapDirectory, 0, e.to_string());
                return Ok(());
            }
        };
        // QEMU refuses to open an image whose trusted bitmaps break its rules ("Bitmap 'x' doesn't satisfy the
        // constraints"), and so does the check: this also bounds what is read, the directory to 64 MiB and each
        // table to what 512 MiB of bitmap data needs, whatever sizes the image claims.
        let cs = self.cluster_size();
        ext.validate(cs).map_err(|source| Error::Bitmap { offset: 0, source })?;
        let dir_at = Referrer { target: Structure::BitmapDirectory, at: 0 };
        self.refer(sink, ext.directory_offset, ext.directory_size, dir_at);
        let size = ext.directory_size.min(crate::format::MAX_BITMAP_DIRECTORY_BYTES);
        let bytes = self.read(ext.directory_offset, size)?;
        let entries = match crate::format::parse_bitmap_directory(&bytes, ext.nb_bitmaps) {
            Ok(entries) => entries,
            Err(e) => {
                self.unreadable(Structure::BitmapDirectory, ext.directory_offset, e.to_string());
                return Ok(());
            }
        };
        for bitmap in entries {
            bitmap
                .validate(cs, self.layout.header.size)
                .map_err(|source| Error::Bitmap { offset: ext.directory_offset, source })?;
            let table_bytes = u64::from(bitmap.table_size) * 8;
            let referrer = Referrer { target: Structure::BitmapTable, at: ext.directory_offset };
            self.refer(sink, bitmap.table_offset, table_bytes, referrer);
            if bitmap.table_offset >= self.layout.file_len {
                continue;
            }
            let table = self.read(bitmap.table_offset, table_bytes)?;
            for (i, entry) in parse_bitmap_table(&table).into_iter().enumerate() {
                let at = bitmap.table_offset + i as u64 * 8;
                match entry.kind(cs) {
                    Ok(BitmapCluster::Data(offset)) => {
                        self.refer(sink, offset, cs, Referrer { target: Structure::BitmapData, at });
                    }
                    Ok(_) => {}
                    Err(_) => self.problem(Problem::ReservedBits { table: Structure::BitmapTable, at, entry: entry.0 }),
                }
            }
        }
        Ok(())
    }

    fn unreadable(&mut self, what: Structure, offset: u64, why: String) {
        self.incomplete = true;
        self.problem(Problem::Unreadable { what, offset, why });
    }

    /// Each refcount block must be aligned, inside the file and referenced exactly once; anything else calls for
    /// a rebuild of the refcount structures.
    fn refcount_blocks(&mut self, sink: &mut dyn Sink) {
        let geo = self.layout.geo;
        for (i, &raw) in self.layout.reftable.iter().enumerate() {
            let index = i as u64;
            let entry = RefcountTableEntry(raw);
            let offset = entry.offset_field();
            let at = self.layout.header.refcount_table_offset + index * 8;
            let referrer = Referrer { target: Structure::RefcountBlock, at };
            if entry.has_reserved_bits() {
                self.problem(Problem::ReservedBits { table: Structure::RefcountTable, at, entry: raw });
                self.rebuild = true;
                continue;
            }
            if !geo.is_aligned(offset) {
                self.problem(Problem::Misaligned { referrer, offset });
                self.rebuild = true;
                continue;
            }
            let cluster = offset >> geo.cluster_bits;
            if cluster >= sink.clusters() {
                // Not `points_past_end`: a rebuild replaces this table, so its stray pointers stop mattering.
                self.problem(Problem::OutsideFile { referrer, offset, len: geo.cluster_size() });
                self.rebuild = true;
                continue;
            }
            if offset != 0 {
                sink.reference(offset, geo.cluster_size(), referrer);
                let references = sink.count(cluster);
                if references != 1 {
                    self.problem(Problem::RefcountBlockShared { table_index: index, references });
                    self.rebuild = true;
                }
            }
        }
    }
}
