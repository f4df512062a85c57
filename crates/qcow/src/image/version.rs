//! Changing an image's version between 2 ("0.10") and 3 ("1.1"), as QEMU's `qcow2_upgrade` and
//! `qcow2_downgrade` do.
//!
//! An upgrade rewrites the snapshot table first when an entry lacks the 16 bytes of extra data version 3 requires
//! (new table durable, then the header switched, then the old table freed), then writes a version 3 header. A
//! downgrade is refused for what version 2 cannot express (refcounts other than 16 bits, an external data file,
//! snapshots of another size or with a VM state over 4 GiB, extended L2 entries and other incompatible features,
//! zstd-compressed clusters); otherwise lazy refcounts are settled (the image made clean), zero clusters become
//! what version 2 can say (unallocated where nothing shows through, zeros written where a backing file or a
//! preallocated cluster would): those of the active tables through the write path, those of the snapshots' tables
//! in place, as QEMU does it. Only then, with all of that durable, is the version 2 header written: the header
//! write is the commit point of both directions.

use super::meta::{be64, Meta};
use super::overlap::MetaKind;
use super::{Image, Refusal};
use crate::block::BlockDevice;
use crate::error::{Error, Result};
use crate::format::{
    feature, snapshot_table_size, CompressionType, Extension, GuestOffset, Header, HostOffset, L1Entry, L2Entry,
    L2Kind, Snapshot, HEADER_V2_LENGTH,
};

/// The L2 tables a snapshot's L1 table (on disk) points at.
fn snapshot_l2_tables(dev: &dyn BlockDevice, m: &Meta, s: &Snapshot) -> Result<Vec<u64>> {
    let mut l1 = vec![0u8; (u64::from(s.l1_size) * 8).next_multiple_of(512) as usize];
    dev.read_at(s.l1_table_offset, &mut l1)?;
    let mut tables = Vec::new();
    for (i, raw) in l1.chunks_exact(8).take(s.l1_size as usize).enumerate() {
        let entry = L1Entry(be64(raw));
        let at = s.l1_table_offset + i as u64 * 8;
        if entry.is_malformed(&m.geo) {
            return Err(Error::corrupt("malformed snapshot L1 entry", at));
        }
        if let Some(l2) = entry.l2_offset() {
            if l2.0.checked_add(m.geo.cluster_size()).is_none_or(|end| end > dev.info().size_bytes()) {
                return Err(Error::corrupt("snapshot L1 entry points outside the file", at));
            }
            tables.push(l2.0);
        }
    }
    Ok(tables)
}

impl Meta {
    /// Whether the L2 table at `l2`, as it is on disk (snapshot tables are never cached dirty), holds a compressed
    /// cluster.
    fn compressed_on_disk(&self, dev: &dyn BlockDevice, l2: u64) -> Result<bool> {
        let mut table = vec![0u8; self.geo.cluster_size() as usize];
        dev.read_at(l2, &mut table)?;
        for (i, raw) in table.chunks_exact(self.geo.l2_entry_size() as usize).enumerate() {
            let entry = L2Entry(be64(raw));
            let at = l2 + i as u64 * self.geo.l2_entry_size();
            if let L2Kind::Compressed { .. } = entry.kind(&self.geo).map_err(|what| Error::corrupt(what, at))? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Whether any active L2 entry is compressed.
    fn active_compressed(&mut self, dev: &dyn BlockDevice) -> Result<bool> {
        for l1_index in 0..self.l1_size() {
            let Some(l2) = self.l1_entry(dev, l1_index)?.l2_offset() else { continue };
            for index in 0..self.geo.l2_entries() {
                if self.l2_entry(dev, l2, index)?.is_compressed() {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }
}

impl<D: BlockDevice> Image<D> {
    /// Refuses a downgrade to version 2 of this image once its refcounts are `refcount_bits` wide and its size
    /// `size`, checking in QEMU's order.
    pub(super) fn check_downgrade(&self, refcount_bits: u64, size: u64) -> Result<()> {
        let mut m = self.meta();
        if refcount_bits != 16 {
            return Err(Refusal::DowngradeRefcountWidth.into());
        }
        if m.header.has_external_data_file() {
            return Err(Refusal::DowngradeDataFile.into());
        }
        let snapshots = m.snapshots(&self.dev)?;
        for s in &snapshots {
            if s.vm_state_bytes() > u64::from(u32::MAX) || s.disk_size().is_some_and(|d| d != size) {
                return Err(Refusal::DowngradeSnapshot { id: s.id.clone() }.into());
            }
        }
        // The dirty bit goes with lazy refcounts (the image is made clean first); only the compression type may
        // stay, and only while no cluster is compressed with it.
        let bits = m.header.incompatible_features & !(feature::DIRTY | feature::COMPRESSION_TYPE);
        if bits != 0 {
            return Err(Refusal::DowngradeIncompatibleFeatures { bits }.into());
        }
        let zstd = m.header.compression_type != CompressionType::Deflate;
        if zstd && m.active_compressed(&self.dev)? {
            return Err(Refusal::DowngradeZstdClusters.into());
        }
        for s in snapshots.iter().filter(|_| zstd) {
            for l2 in snapshot_l2_tables(&self.dev, &m, s)? {
                if m.compressed_on_disk(&self.dev, l2)? {
                    return Err(Refusal::DowngradeZstdClusters.into());
                }
            }
        }
        Ok(())
    }

    /// Makes the image version 3: snapshot entries completed with the extra data version 3 requires, then the
    /// header.
    pub(super) fn upgrade(&mut self) -> Result<()> {
        let snapshots = self.snapshots()?;
        if snapshots.iter().any(|s| s.extra.len() < 16) {
            let size = self.virtual_size();
            let old_len = snapshot_table_size(&snapshots);
            let completed: Vec<_> = snapshots
                .into_iter()
                .map(|mut s| {
                    if s.extra.len() < 16 {
                        let large = s.vm_state_size_large().unwrap_or(u64::from(s.vm_state_size));
                        // QEMU takes a missing disk size for the image's current size.
                        let disk = s.disk_size().unwrap_or(size);
                        let mut extra = large.to_be_bytes().to_vec();
                        extra.extend_from_slice(&disk.to_be_bytes());
                        s.extra = extra;
                    }
                    s
                })
                .collect();
            self.replace_snapshot_table(&completed, old_len)?;
        }
        let meta = self.meta.get_mut().unwrap_or_else(|e| e.into_inner());
        let mut header = meta.header.clone();
        let template = Header::for_create(header.size, header.cluster_bits, 4, 3, false);
        header.version = 3;
        header.header_length = template.header_length;
        header.extra_header_bytes = template.extra_header_bytes.clone();
        header.set_compression_type(CompressionType::Deflate);
        if header.extension(Extension::FEATURE_TABLE).is_none() {
            header.set_feature_names(&template.feature_names());
        }
        header.layout()?;
        meta.commit_header(&self.dev, header)
    }

    /// Makes the image version 2, after [`check_downgrade`](Self::check_downgrade) passed.
    pub(super) fn downgrade(&mut self) -> Result<()> {
        // Before the header can become version 2, which could not record them: left on disk, no longer kept.
        self.abandon_bitmaps();
        {
            let meta = self.meta.get_mut().unwrap_or_else(|e| e.into_inner());
            // Lazy refcounts end here: the refcounts on disk must be exact before the bit goes.
            meta.writeback(&self.dev)?;
            meta.mark_clean(&self.dev)?;
            meta.header.compatible_features = 0;
        }
        self.expand_zero_clusters()?;
        self.expand_snapshot_zero_clusters()?;
        let meta = self.meta.get_mut().unwrap_or_else(|e| e.into_inner());
        let mut header = meta.header.clone();
        header.version = 2;
        header.header_length = HEADER_V2_LENGTH;
        header.extra_header_bytes.clear();
        header.set_compression_type(CompressionType::Deflate);
        header.incompatible_features = 0;
        header.compatible_features = 0;
        // The bitmaps were abandoned above (their extension stays, as QEMU leaves it); the raw-data-file bit
        // cannot be set, since data files were refused.
        header.autoclear_features = 0;
        header.remove_extension(Extension::FEATURE_TABLE);
        header.layout()?;
        meta.commit_header(&self.dev, header)
    }

    /// Turns every zero cluster of the active tables into what version 2 can express, one L2 table at a time:
    /// unallocated when nothing would show through (no backing file, no preallocated cluster), otherwise a data
    /// cluster of zeros written through the ordinary write path (which allocates and links it in order).
    fn expand_zero_clusters(&self) -> Result<()> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let size = self.virtual_size().next_multiple_of(512);
        let l1_size = self.meta().l1_size();
        for l1_index in 0..l1_size {
            let mut to_unmap = Vec::new();
            let mut to_write = Vec::new();
            {
                let mut m = self.meta();
                let Some(l2) = m.l1_entry(&self.dev, l1_index)?.l2_offset() else { continue };
                for index in 0..geo.l2_entries() {
                    let at = l2.0 + index * geo.l2_entry_size();
                    let entry = m.l2_entry(&self.dev, l2, index)?;
                    let guest = l1_index * geo.l2_span() + index * cs;
                    match m.decode_l2(&self.dev, entry, at)? {
                        L2Kind::Zero { host: None } if self.backing.is_none() => to_unmap.push(guest),
                        L2Kind::Zero { .. } => to_write.push(guest),
                        _ => {}
                    }
                }
            }
            if !to_unmap.is_empty() {
                let _resize = self.resize.read().unwrap_or_else(|e| e.into_inner());
                let mut m = self.meta();
                let l2 = m.l2_for_write(&self.dev, l1_index)?;
                for guest in to_unmap {
                    m.set_l2_entry(&self.dev, l2, geo.l2_index(GuestOffset(guest)), L2Entry(0))?;
                }
            }
            for guest in to_write {
                let len = cs.min(size.saturating_sub(guest));
                if len > 0 {
                    self.write_at(guest, self.zeros.get(..len as usize).unwrap_or(&[]))?;
                }
            }
        }
        self.flush_all()
    }

    /// Turns the zero clusters of the snapshots' L2 tables into what version 2 can express, editing each table
    /// in place as QEMU does (every tree that shares it keeps reading the same): unallocated where nothing would
    /// show through, else a zeroed cluster counted once per tree that reaches the table. The new clusters'
    /// refcounts and zeros are durable before the table that points at them is written.
    fn expand_snapshot_zero_clusters(&self) -> Result<()> {
        let snapshots = self.snapshots()?;
        let geo = self.geo;
        let cs = geo.cluster_size();
        let entry_size = geo.l2_entry_size() as usize;
        for s in &snapshots {
            let tables = snapshot_l2_tables(&self.dev, &self.meta(), s)?;
            for l2 in tables {
                let mut m = self.meta();
                // The table on disk is the current one: nothing of it may wait in the cache.
                m.writeback(&self.dev)?;
                let mut table = vec![0u8; cs as usize];
                self.dev.read_at(l2, &mut table)?;
                let l2_refcount = m.refcount(&self.dev, l2 / cs)?;
                let mut changed = Vec::new();
                for (j, raw) in table.chunks_exact(entry_size).enumerate() {
                    let at = l2 + (j * entry_size) as u64;
                    match m.decode_l2(&self.dev, L2Entry(be64(raw)), at)? {
                        L2Kind::Zero { host: None } if self.backing.is_none() => changed.push((j, None)),
                        L2Kind::Zero { host: None } => {
                            let host = m.alloc_clusters(&self.dev, 1)? * cs;
                            m.set_refcount(&self.dev, host / cs, l2_refcount.max(1))?;
                            changed.push((j, Some(HostOffset(host))));
                        }
                        L2Kind::Zero { host: Some(host) } => changed.push((j, Some(host))),
                        _ => {}
                    }
                }
                if changed.is_empty() {
                    continue;
                }
                for &(_, host) in &changed {
                    if let Some(host) = host {
                        m.check_data_write(&self.dev, host.0)?;
                        self.dev.write_at(host.0, &self.zeros)?;
                    }
                }
                m.writeback(&self.dev)?;
                self.dev.flush()?;
                for &(j, host) in &changed {
                    let entry = match host {
                        None => L2Entry(0),
                        Some(h) if m.refcount(&self.dev, h.0 / cs)? == 1 => L2Entry::normal(h),
                        // Shared: a normal entry without the COPIED flag.
                        Some(h) => L2Entry(h.0),
                    };
                    if let Some(slot) = table.get_mut(j * entry_size..j * entry_size + 8) {
                        slot.copy_from_slice(&entry.0.to_be_bytes());
                    }
                }
                m.check_meta_write(&self.dev, l2, MetaKind::ActiveL2)?;
                self.dev.write_at(l2, &table)?;
                self.dev.flush()?;
                m.cache.remove(l2);
            }
        }
        Ok(())
    }
}
