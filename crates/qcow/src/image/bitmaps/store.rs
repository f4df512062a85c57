//! Storing the bitmaps as QEMU's `qcow2_store_persistent_dirty_bitmaps` does, and rewriting the directory when a
//! bitmap is removed (`update_ext_header_and_dir`).
//!
//! Order of a store: data clusters for the parts of each bitmap with set bits (parts with none are 0 in the
//! table), then each new table, then a new directory; the refcounts of all of them written back and everything
//! flushed; then the header pointing at the new directory, with the bitmaps autoclear bit set, flushed: the
//! commit point. Only then are the old directory, tables and data clusters released (through `free_later`, so
//! writeback drops their refcounts after the header is durable). A crash before the header leaves the old
//! directory, in which every bitmap open for writing says in use; after it, the new one.
//!
//! A store holds the metadata lock from its first allocation to its last release, data writes included: it runs
//! at close or when asked, writes a few clusters per bitmap, and must not interleave with other allocations
//! between its writeback and its header.

use std::collections::HashMap;

use super::{BitmapSet, Live, OnDisk};
use crate::block::BlockDevice;
use crate::error::{Error, Result};
use crate::format::{
    bitmap_data_bytes, bitmap_table_entries, feature, serialize_bitmap_directory, BitmapCluster, BitmapEntry,
    BitmapError, BitmapsExtension, Extension, BITMAP_FLAG_AUTO, BITMAP_TYPE_DIRTY_TRACKING, MAX_BITMAP_DATA_BYTES,
    MAX_BITMAP_DIRECTORY_BYTES, MAX_BITMAP_TABLE_ENTRIES,
};
use crate::image::meta::{write_meta, Meta};
use crate::image::Image;

/// `bytes` zero padded to a multiple of 512.
fn sectors(mut bytes: Vec<u8>) -> Vec<u8> {
    bytes.resize(bytes.len().next_multiple_of(512), 0);
    bytes
}

impl Meta {
    /// Writes `entries` as a new directory (none at all when empty: the extension and the autoclear bit go, as
    /// QEMU does), makes it and every cluster allocated before it durable, switches the header to it and queues
    /// the old directory's clusters for release. The caller queues whatever else the old directory owned and
    /// writes back.
    fn commit_bitmap_directory(&mut self, dev: &dyn BlockDevice, entries: &[BitmapEntry]) -> Result<()> {
        let cs = self.geo.cluster_size();
        let old = self.trusted_bitmaps_extension()?;
        let mut new_dir = None;
        if !entries.is_empty() {
            let bytes = serialize_bitmap_directory(entries);
            let size = bytes.len() as u64;
            if size > MAX_BITMAP_DIRECTORY_BYTES {
                return Err(Error::Bitmap { offset: 0, source: BitmapError::DirectoryFull { size } });
            }
            let count = u32::try_from(entries.len()).unwrap_or(u32::MAX);
            let ext = BitmapsExtension { nb_bitmaps: count, directory_size: size, directory_offset: 0 };
            // Checked before anything is allocated: the extension must fit in the header cluster.
            let mut trial = self.header.clone();
            trial.set_extension(Extension::BITMAPS, ext.to_bytes().to_vec());
            trial.serialize()?;
            let first = self.alloc_clusters(dev, self.geo.clusters_for(size).max(1))?;
            write_meta(dev, first * cs, &sectors(bytes))?;
            new_dir = Some(BitmapsExtension { directory_offset: first * cs, ..ext });
        }
        // The directory, the tables and data written before it, and all their refcounts, durable before the
        // header names any of them. (Writeback may move the refcount table: the header is edited only after.)
        self.writeback(dev)?;
        dev.flush()?;
        match new_dir {
            Some(ext) => {
                self.header.set_extension(Extension::BITMAPS, ext.to_bytes().to_vec());
                self.header.autoclear_features |= feature::BITMAPS;
            }
            None => {
                self.header.remove_extension(Extension::BITMAPS);
                self.header.autoclear_features &= !feature::BITMAPS;
            }
        }
        self.write_header(dev)?;
        dev.flush()?;
        self.overlap.bitmap_directory_replaced(&self.header);
        if let Some(old) = old.filter(|o| o.directory_size > 0) {
            let last = old.directory_offset.saturating_add(old.directory_size - 1);
            let (start, end) = (old.directory_offset / cs, last / cs);
            for cluster in start..=end {
                self.free_later(cluster);
            }
        }
        Ok(())
    }

    /// Queues the release of clusters the old directory's bitmaps owned, each as many times as it is named but
    /// never below a refcount of zero (a damaged table could name a cluster twice, or one already free).
    fn release_bitmap_clusters(&mut self, dev: &dyn BlockDevice, clusters: &[u64]) -> Result<()> {
        let mut named: HashMap<u64, u64> = HashMap::new();
        for &c in clusters {
            *named.entry(c).or_default() += 1;
        }
        let mut ordered: Vec<(u64, u64)> = named.into_iter().collect();
        ordered.sort_unstable();
        for (cluster, times) in ordered {
            let refcount = self.refcount(dev, cluster)?;
            for _ in 0..times.min(refcount) {
                self.free_later(cluster);
            }
        }
        Ok(())
    }
}

/// Everything a bitmap's current directory entry owns, as host clusters.
fn owned_clusters(d: &OnDisk, cs: u64) -> Vec<u64> {
    let table_bytes = u64::from(d.entry.table_size) * 8;
    let mut out: Vec<u64> = d.data.iter().flatten().map(|o| o / cs).collect();
    if table_bytes > 0 && d.entry.table_offset != 0 {
        // An inconsistent bitmap's entry was never checked against the file: no arithmetic on it may overflow.
        let last = d.entry.table_offset.saturating_add(table_bytes - 1);
        out.extend(d.entry.table_offset / cs..=last / cs);
    }
    out
}

impl<D: BlockDevice> Image<D> {
    /// Makes sure the data clusters of `live`'s on-disk table are known (they are read at load only for
    /// consistent bitmaps).
    fn learn_data_clusters(&self, live: &mut Live) -> Result<()> {
        let Some(d) = live.on_disk.as_mut() else { return Ok(()) };
        if d.data.is_none() {
            // A table that cannot be read owns nothing this code will free: its clusters stay, as leaks.
            let data = match self.read_bitmap_table(&d.entry) {
                Ok(table) => table
                    .into_iter()
                    .filter_map(|c| match c {
                        BitmapCluster::Data(o) => Some(o),
                        _ => None,
                    })
                    .collect(),
                Err(_) => Vec::new(),
            };
            d.data = Some(data);
        }
        Ok(())
    }

    /// Writes the bits of the consistent bitmap `live` as a new table and data clusters, and returns its new
    /// directory entry with the data clusters' offsets. The clusters are allocated through the engine, so their
    /// refcounts are written back with everything else before the header can reach them.
    fn write_bitmap(&self, m: &mut Meta, live: &Live, size: u64) -> Result<OnDisk> {
        let cs = self.geo.cluster_size();
        let Some(bits) = &live.bits else { return Err(Error::corrupt("storing an inconsistent bitmap", 0)) };
        let entries = bitmap_table_entries(size, live.granularity_bits, cs);
        let data_bytes = bitmap_data_bytes(size, live.granularity_bits);
        if entries == 0 || entries > u64::from(MAX_BITMAP_TABLE_ENTRIES) || entries * cs > MAX_BITMAP_DATA_BYTES {
            return Err(Error::Bitmap { offset: 0, source: BitmapError::DataTooLarge { bytes: data_bytes } });
        }
        let mut table: Vec<u8> = Vec::with_capacity((entries * 8) as usize);
        let mut data = Vec::new();
        for i in 0..entries {
            let part = (data_bytes - i * cs).min(cs);
            let offset = match bits.serialize(i * cs * 8, part as usize) {
                None => 0,
                Some(mut bytes) => {
                    bytes.resize(cs as usize, 0);
                    let at = m.alloc_clusters(&self.dev, 1)? * cs;
                    write_meta(&self.dev, at, &bytes)?;
                    data.push(at);
                    at
                }
            };
            table.extend_from_slice(&offset.to_be_bytes());
        }
        let table_at = m.alloc_clusters(&self.dev, self.geo.clusters_for(entries * 8).max(1))? * cs;
        write_meta(&self.dev, table_at, &sectors(table))?;
        let entry = BitmapEntry {
            table_offset: table_at,
            table_size: u32::try_from(entries).unwrap_or(u32::MAX),
            flags: if live.enabled { BITMAP_FLAG_AUTO } else { 0 },
            kind: BITMAP_TYPE_DIRTY_TRACKING,
            granularity_bits: live.granularity_bits,
            name: live.name.clone(),
            extra: Vec::new(),
        };
        // QEMU checks every entry it writes as it checks the entries it reads.
        entry.validate(cs, size).map_err(|source| Error::Bitmap { offset: table_at, source })?;
        Ok(OnDisk { entry, data: Some(data) })
    }

    /// Stores every consistent bitmap (inconsistent ones keep their entry as it is) and makes the result durable.
    /// Nothing is written when there is no consistent bitmap.
    pub(super) fn store_bitmap_set(&self, set: &mut BitmapSet) -> Result<()> {
        if !set.list.iter().any(Live::consistent) {
            return Ok(());
        }
        let cs = self.geo.cluster_size();
        let size = self.virtual_size();
        let mut m = self.meta();
        m.corruption.check()?;
        let mut stored = Vec::with_capacity(set.list.len());
        let mut released = Vec::new();
        for live in &set.list {
            match &live.on_disk {
                Some(d) if !live.consistent() => stored.push(d.clone()),
                _ => {
                    stored.push(self.write_bitmap(&mut m, live, size)?);
                    if let Some(d) = &live.on_disk {
                        released.extend(owned_clusters(d, cs));
                    }
                }
            }
        }
        let entries: Vec<BitmapEntry> = stored.iter().map(|d| d.entry.clone()).collect();
        m.commit_bitmap_directory(&self.dev, &entries)?;
        // The set now describes the new directory, whatever happens to the releases below.
        for (live, d) in set.list.iter_mut().zip(stored) {
            live.on_disk = Some(d);
        }
        set.needs_mark = set.has_unmarked_entries();
        m.release_bitmap_clusters(&self.dev, &released)?;
        m.writeback(&self.dev)?;
        drop(m);
        self.dev.flush()
    }

    /// Removes the bitmap at `index` of the set: from the directory at once when it has an entry there (as QEMU
    /// removes it), keeping every other entry as it is on disk, then its clusters.
    pub(super) fn remove_stored_bitmap(&self, set: &mut BitmapSet, index: usize) -> Result<()> {
        let Some(mut live) = (index < set.list.len()).then(|| set.list.remove(index)) else { return Ok(()) };
        if live.on_disk.is_none() {
            return Ok(());
        }
        let restore = |set: &mut BitmapSet, live: Live| set.list.insert(index, live);
        if let Err(e) = self.learn_data_clusters(&mut live) {
            restore(set, live);
            return Err(e);
        }
        let entries: Vec<BitmapEntry> =
            set.list.iter().filter_map(|b| b.on_disk.as_ref().map(|d| d.entry.clone())).collect();
        let cs = self.geo.cluster_size();
        let mut m = self.meta();
        if let Err(e) = m.commit_bitmap_directory(&self.dev, &entries) {
            drop(m);
            restore(set, live);
            return Err(e);
        }
        let released = live.on_disk.as_ref().map(|d| owned_clusters(d, cs)).unwrap_or_default();
        m.release_bitmap_clusters(&self.dev, &released)?;
        m.writeback(&self.dev)?;
        drop(m);
        set.needs_mark = set.has_unmarked_entries();
        self.dev.flush()
    }
}
