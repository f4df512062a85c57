//! The two sides of the comparison: refcounts implied by the metadata ([`Implied`], built by a walk) and the
//! refcounts stored in the image ([`Stored`], read from the refcount blocks and written back by repairs).
//!
//! Memory follows what the metadata references: the implied counts cover every cluster of the file (plus one for
//! a partial cluster past its end; the walk never counts a reference a cluster or more past the end), but are kept
//! in pages made as clusters are counted ([`Paged`]), so a sparse file of terabytes costs what its metadata
//! references.

use std::collections::{BTreeSet, HashMap};

use super::counts::Paged;
use super::layout::Layout;
use super::problem::{Problem, Referrer, Structure};
use super::walk::Sink;
use crate::block::read_padded;
use crate::block::BlockDevice;
use crate::error::{Error, Result};
use crate::format::{RefcountBlock, RefcountTableEntry};

const STRUCTURES: [Structure; 12] = [
    Structure::Header,
    Structure::RefcountTable,
    Structure::RefcountBlock,
    Structure::ActiveL1,
    Structure::SnapshotL1,
    Structure::L2Table,
    Structure::Data,
    Structure::CompressedData,
    Structure::SnapshotTable,
    Structure::BitmapDirectory,
    Structure::BitmapTable,
    Structure::BitmapData,
];

fn owner_code(s: Structure) -> u8 {
    STRUCTURES.iter().position(|&x| x == s).map_or(0, |i| i as u8 + 1)
}

fn owner_of(code: u8) -> Option<Structure> {
    STRUCTURES.get(usize::from(code).checked_sub(1)?).copied()
}

/// Refcounts implied by the metadata, with the kind of structure that first claimed each cluster so that
/// metadata overlapping other metadata is caught as it is counted.
pub struct Implied {
    counts: Paged<u32>,
    owners: Paged<u8>,
    cluster_bits: u32,
    refcount_max: u64,
    /// Overlaps and overflows found while counting.
    pub problems: Vec<Problem>,
    /// Clusters claimed by structures that may not share them.
    pub overlapping: BTreeSet<u64>,
}

impl Implied {
    pub fn new(layout: &Layout) -> Self {
        let n = layout.file_clusters();
        Implied {
            counts: Paged::new(n),
            owners: Paged::new(n),
            cluster_bits: layout.geo.cluster_bits,
            refcount_max: layout.geo.refcount_max(),
            problems: Vec::new(),
            overlapping: BTreeSet::new(),
        }
    }

    /// References to `cluster`.
    pub fn get(&self, cluster: u64) -> u64 {
        u64::from(self.counts.get(cluster))
    }

    /// Number of clusters covered.
    pub fn len(&self) -> u64 {
        self.counts.len()
    }

    /// The first cluster of every page of counts: every referenced cluster lies in a page that starts there.
    pub fn page_starts(&self) -> impl Iterator<Item = u64> + '_ {
        self.counts.page_starts()
    }

    /// `Ok` when every count could be kept.
    ///
    /// # Errors
    /// `Io` (out of memory) at the cluster whose counts could not be allocated.
    pub fn allocated(&self) -> Result<()> {
        self.counts.allocated(self.cluster_bits, "count references")?;
        self.owners.allocated(self.cluster_bits, "count references")
    }

    fn count_one(&mut self, cluster: u64, referrer: Referrer) {
        // A cluster past the end (at most one partial cluster: the walk refuses anything further) extends the
        // range covered.
        let Some(count) = self.counts.slot(cluster) else { return };
        if u64::from(*count) >= self.refcount_max || *count == u32::MAX {
            self.problems.push(Problem::RefcountOverflow { offset: cluster << self.cluster_bits });
            return;
        }
        *count += 1;
        let Some(owner) = self.owners.slot(cluster) else { return };
        match owner_of(*owner) {
            None => *owner = owner_code(referrer.target),
            Some(first) if !first.may_share_with(referrer.target) => {
                if self.overlapping.insert(cluster) {
                    self.problems.push(Problem::Overlap {
                        offset: cluster << self.cluster_bits,
                        first,
                        second: referrer,
                    });
                }
            }
            Some(_) => {}
        }
    }
}

impl Sink for Implied {
    fn reference(&mut self, offset: u64, len: u64, referrer: Referrer) {
        let first = offset >> self.cluster_bits;
        let last = (offset + len - 1) >> self.cluster_bits;
        for cluster in first..=last {
            self.count_one(cluster, referrer);
        }
    }

    fn count(&self, cluster: u64) -> u64 {
        self.get(cluster)
    }

    fn clusters(&self) -> u64 {
        self.len()
    }
}

/// A sink for the second walk: collects every pointer to a chosen set of clusters.
struct Referrers<'a> {
    pub wanted: &'a BTreeSet<u64>,
    pub found: HashMap<u64, Vec<Referrer>>,
    pub cluster_bits: u32,
    pub clusters: u64,
}

impl Sink for Referrers<'_> {
    fn reference(&mut self, offset: u64, len: u64, referrer: Referrer) {
        let first = offset >> self.cluster_bits;
        let last = (offset + len - 1) >> self.cluster_bits;
        for cluster in self.wanted.range(first..=last) {
            self.found.entry(*cluster).or_default().push(referrer);
        }
    }

    fn count(&self, _: u64) -> u64 {
        1
    }

    fn clusters(&self) -> u64 {
        self.clusters
    }
}

/// Every pointer to each cluster of `wanted`, found by walking the metadata once more.
pub fn referrers(
    dev: &dyn BlockDevice,
    layout: &Layout,
    wanted: &BTreeSet<u64>,
) -> Result<HashMap<u64, Vec<Referrer>>> {
    let mut sink = Referrers {
        wanted,
        found: HashMap::new(),
        cluster_bits: layout.geo.cluster_bits,
        clusters: layout.file_clusters(),
    };
    super::walk::Walk::new(dev, layout, false).run(&mut sink)?;
    Ok(sink.found)
}

/// Why a stored refcount could not be read.
#[derive(Debug, Clone, Copy)]
pub struct Unreadable {
    /// The refcount table entry whose block pointer is misaligned.
    pub table_index: u64,
}

/// Refcounts as stored in the image, read block by block and written back when a repair changes them.
pub struct Stored<'a> {
    dev: &'a dyn BlockDevice,
    layout: &'a Layout,
    blocks: HashMap<u64, Vec<u8>>,
    dirty: BTreeSet<u64>,
    /// The block used last, kept out of the map: lookups run cluster by cluster, so it is nearly always the one
    /// asked for next.
    current: Option<(u64, Vec<u8>)>,
}

/// Loaded refcount blocks kept at most, in bytes, before clean ones are dropped.
const CACHE_BYTES: usize = 64 << 20;

impl<'a> Stored<'a> {
    pub fn new(dev: &'a dyn BlockDevice, layout: &'a Layout) -> Self {
        Stored { dev, layout, blocks: HashMap::new(), dirty: BTreeSet::new(), current: None }
    }

    /// Where the refcount block describing `cluster` lives: `Ok(None)` when none is allocated.
    fn locate(&self, cluster: u64) -> std::result::Result<(u64, Option<u64>), Unreadable> {
        let geo = self.layout.geo;
        let table_index = cluster / geo.refcount_block_entries();
        let entry = usize::try_from(table_index).ok().and_then(|i| self.layout.reftable.get(i)).copied();
        let offset = RefcountTableEntry(entry.unwrap_or(0)).offset_field();
        if offset == 0 {
            return Ok((table_index, None));
        }
        if !geo.is_aligned(offset) {
            return Err(Unreadable { table_index });
        }
        Ok((table_index, Some(offset)))
    }

    fn block(&mut self, table_index: u64, offset: u64) -> Result<&mut Vec<u8>> {
        if self.current.as_ref().is_none_or(|(i, _)| *i != table_index) {
            if let Some((i, bytes)) = self.current.take() {
                self.blocks.insert(i, bytes);
            }
            let bytes = match self.blocks.remove(&table_index) {
                Some(bytes) => bytes,
                None => {
                    if self.blocks.len() * self.layout.geo.cluster_size() as usize >= CACHE_BYTES {
                        self.write_back()?;
                        self.blocks.clear();
                    }
                    let mut bytes = vec![0u8; self.layout.geo.cluster_size() as usize];
                    read_padded(self.dev, self.layout.file_len, offset, &mut bytes)?;
                    bytes
                }
            };
            self.current = Some((table_index, bytes));
        }
        match &mut self.current {
            Some((_, bytes)) => Ok(bytes),
            None => Err(Error::corrupt("refcount block vanished from the cache", offset)),
        }
    }

    /// The clusters each allocated refcount block describes, as `(first, count)`: everywhere else the stored
    /// refcounts read zero.
    pub fn described_ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let per_block = self.layout.geo.refcount_block_entries();
        self.layout
            .reftable
            .iter()
            .enumerate()
            .filter(|&(_, &raw)| RefcountTableEntry(raw).offset_field() != 0)
            .map(move |(i, _)| ((i as u64).saturating_mul(per_block), per_block))
    }

    /// The stored refcount of `cluster`.
    pub fn get(&mut self, cluster: u64) -> Result<std::result::Result<u64, Unreadable>> {
        let (table_index, offset) = match self.locate(cluster) {
            Ok(found) => found,
            Err(e) => return Ok(Err(e)),
        };
        let Some(offset) = offset else { return Ok(Ok(0)) };
        let geo = self.layout.geo;
        let index = cluster % geo.refcount_block_entries();
        let bytes = self.block(table_index, offset)?;
        Ok(Ok(RefcountBlock::new(bytes.as_slice(), geo.refcount_order).get(index).unwrap_or(0)))
    }

    /// The first run of `clusters` clusters from cluster 1 on whose refcounts are zero in refcount blocks that
    /// exist (so taking them allocates no block), if there is one.
    pub fn free_run(&mut self, clusters: u64) -> Result<Option<u64>> {
        let per_block = self.layout.geo.refcount_block_entries();
        let described = (self.layout.reftable.len() as u64).saturating_mul(per_block);
        let (mut start, mut cluster) = (1u64, 1u64);
        while cluster < described {
            let free = matches!(self.locate(cluster), Ok((_, Some(_)))) && matches!(self.get(cluster)?, Ok(0));
            cluster += 1;
            if !free {
                start = cluster;
            } else if cluster - start == clusters {
                return Ok(Some(start));
            }
        }
        Ok(None)
    }

    /// Changes the stored refcount of `cluster` (whose block exists: repairs in place never allocate).
    pub fn set(&mut self, cluster: u64, value: u64) -> Result<()> {
        let geo = self.layout.geo;
        let (table_index, Some(offset)) =
            self.locate(cluster).map_err(|_| Error::corrupt("refcount block is not cluster aligned", 0))?
        else {
            return Err(Error::corrupt("no refcount block to repair", cluster << geo.cluster_bits));
        };
        let index = cluster % geo.refcount_block_entries();
        let bytes = self.block(table_index, offset)?;
        if !RefcountBlock::new(bytes.as_mut_slice(), geo.refcount_order).set(index, value) {
            return Err(Error::corrupt("refcount does not fit the refcount width", cluster << geo.cluster_bits));
        }
        self.dirty.insert(table_index);
        Ok(())
    }

    /// Writes every changed block back. Each change only ever makes a stored refcount agree with the metadata,
    /// so any subset of these writes reaching the disk leaves an image no worse than before.
    pub fn write_back(&mut self) -> Result<()> {
        for table_index in std::mem::take(&mut self.dirty) {
            let Ok((_, Some(offset))) = self.locate(table_index * self.layout.geo.refcount_block_entries()) else {
                continue;
            };
            let bytes = match &self.current {
                Some((i, bytes)) if *i == table_index => Some(bytes),
                _ => self.blocks.get(&table_index),
            };
            if let Some(bytes) = bytes {
                super::repair::write_grow(self.dev, offset, bytes)?;
            }
        }
        Ok(())
    }
}
