//! The writing half of a check: rebuilding the refcount structures, correcting COPIED flags, and clearing the
//! dirty and corrupt bits. Each step is ordered so that a crash at any point leaves an image no worse than
//! before it (see the module documentation of [`check`](super)).

use super::layout::Layout;
use super::problem::{Problem, Structure};
use super::refcounts::{Implied, Stored};
use super::CheckReport;
use crate::block::read_padded;
use crate::block::BlockDevice;
use crate::error::{Error, Result};
use crate::format::{be64, serialize_snapshot_table};
use crate::format::{feature, ClusterType, Extension, Header, L1Entry, L2Entry, RefcountBlock, RefcountSizing};

/// QEMU's cap on the refcount table.
const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Header fields patched in place: refcount_table_offset (u64) and refcount_table_clusters (u32) at byte 48;
/// incompatible_features (u64, version 3) at byte 72. Both lie in the first sector, whose write is atomic.
const REFTABLE_FIELDS: usize = 48;
const INCOMPATIBLE_FIELD: usize = 72;
/// nb_snapshots (u32) and snapshots_offset (u64) at byte 60, in the first sector too.
const SNAPSHOT_FIELDS: usize = 60;

/// Writes `bytes` at `offset`, growing the device first when they end past it.
pub fn write_grow(dev: &dyn BlockDevice, offset: u64, bytes: &[u8]) -> Result<()> {
    let end = offset.checked_add(bytes.len() as u64).ok_or_else(|| Error::corrupt("write offset overflows", offset))?;
    let info = dev.info();
    if end > info.size_bytes() {
        dev.resize(end.div_ceil(info.sector_size.max(1)))?;
    }
    dev.write_at(offset, bytes)
}

/// Rewrites the first sector with `patch` applied to it.
fn patch_first_sector(dev: &dyn BlockDevice, file_len: u64, patch: impl FnOnce(&mut [u8])) -> Result<()> {
    let mut sector = vec![0u8; 512];
    read_padded(dev, file_len, 0, &mut sector)?;
    patch(&mut sector);
    dev.write_at(0, &sector)
}

fn put(bytes: &mut [u8], at: usize, value: &[u8]) {
    if let Some(dst) = bytes.get_mut(at..at + value.len()) {
        dst.copy_from_slice(value);
    }
}

/// Whether `header` has a bitmaps extension that QEMU no longer trusts: autoclear bit 0 is clear (always so in
/// version 2), so a program without bitmap support has written the image since the bitmaps were saved.
pub fn has_stale_bitmaps(header: &Header) -> bool {
    header.autoclear_features & feature::BITMAPS == 0 && header.extension(Extension::BITMAPS).is_some()
}

/// The bytes `header` uses in cluster 0 as it lies on disk: fixed fields, extensions, end marker, and the
/// backing file name wherever it is.
fn header_extent(header: &Header) -> u64 {
    let fixed = if header.version == 2 { 72 } else { u64::from(header.header_length) };
    let extensions = header
        .extensions
        .iter()
        .fold(8u64, |acc, e| acc.saturating_add(8).saturating_add((e.data.len() as u64).next_multiple_of(8)));
    let name_end = match header.backing_file_offset {
        0 => 0,
        at => at.saturating_add(u64::from(header.backing_file_size)),
    };
    fixed.saturating_add(extensions).max(name_end)
}

/// Rewrites the header as QEMU's read-write open does before its check repairs anything: autoclear bits it does
/// not know are cleared, and a stale bitmaps extension (see [`has_stale_bitmaps`]) is removed, which leaves the
/// bitmap clusters as leaks for the repair to free. Every other extension is kept byte for byte.
///
/// The new header goes out in one write from offset 0 that also covers what the old one used, so that the bytes
/// it no longer uses read as zeros, as after QEMU's rewrite; it is flushed before the caller frees anything, so a
/// crash on either side of it leaves at worst leaks (the extension it drops is one QEMU ignores already). Like
/// every header write, it is atomic only where the device writes it whole. Returns whether the header changed.
pub fn rewrite_header_as_qemu_opens_it(dev: &dyn BlockDevice, layout: &mut Layout) -> Result<bool> {
    let old = &layout.header;
    let stale = has_stale_bitmaps(old);
    if old.autoclear_features & !feature::KNOWN_AUTOCLEAR == 0 && !stale {
        return Ok(false);
    }
    let mut new = old.clone();
    new.autoclear_features &= feature::KNOWN_AUTOCLEAR;
    if stale {
        new.remove_extension(Extension::BITMAPS);
    }
    // A header that does not serialise again (a version 2 header holding version 3 values) is left as it is:
    // QEMU ignores what would have been dropped, so the image is no worse, its bitmap clusters stay leaks.
    if new.layout().is_err() {
        return Ok(false);
    }
    let Ok(mut bytes) = new.serialize() else { return Ok(false) };
    let used = usize::try_from(header_extent(old).min(layout.geo.cluster_size())).unwrap_or(0);
    bytes.resize(bytes.len().max(used).next_multiple_of(512), 0);
    write_grow(dev, 0, &bytes)?;
    dev.flush()?;
    layout.header = new;
    Ok(true)
}

/// Replaces the refcount table and blocks with new ones holding `implied` counts, written past everything the
/// counts cover. The header switches to them only after they are durable; the old structures become leaks.
pub fn rebuild_refcounts(dev: &dyn BlockDevice, layout: &mut Layout, implied: &Implied) -> Result<()> {
    let geo = layout.geo;
    let cs = geo.cluster_size();
    let per_block = geo.refcount_block_entries();
    let start = implied.len();
    let RefcountSizing { blocks, table_clusters } = RefcountSizing::for_clusters(start, &geo);
    if table_clusters * cs > MAX_REFTABLE_BYTES {
        return Err(Error::Unsupported { feature: "a refcount table larger than 8 MiB".into() });
    }
    let table_at = start * cs;
    let blocks_at = start + table_clusters;
    let total = blocks_at + blocks;
    let mut table = vec![0u8; (table_clusters * cs) as usize];
    let mut bytes = vec![0u8; cs as usize];
    for b in 0..blocks {
        bytes.fill(0);
        let mut block = RefcountBlock::new(bytes.as_mut_slice(), geo.refcount_order);
        for i in 0..per_block {
            let cluster = b * per_block + i;
            if cluster >= total {
                break;
            }
            // Past the counts: the new table and blocks themselves.
            let n = if cluster < start { implied.get(cluster) } else { 1 };
            if !block.set(i, n) {
                return Err(Error::corrupt("refcount does not fit the refcount width", cluster * cs));
            }
        }
        let offset = (blocks_at + b) * cs;
        write_grow(dev, offset, &bytes)?;
        put(&mut table, (b * 8) as usize, &offset.to_be_bytes());
    }
    write_grow(dev, table_at, &table)?;
    dev.flush()?;
    patch_first_sector(dev, layout.file_len, |s| {
        put(s, REFTABLE_FIELDS, &table_at.to_be_bytes());
        put(s, REFTABLE_FIELDS + 8, &(table_clusters as u32).to_be_bytes());
    })?;
    dev.flush()?;
    layout.header.refcount_table_offset = table_at;
    layout.header.refcount_table_clusters = table_clusters as u32;
    layout.reftable = table.chunks_exact(8).map(be64).collect();
    layout.file_len = dev.info().size_bytes();
    Ok(())
}

/// Checks (and with `repair`, corrects) the COPIED flags of the active L1 and L2 tables against the stored
/// refcounts: set exactly when the refcount is 1. Runs after refcount repairs, so the flags follow the repaired
/// counts.
pub fn copied_flags(dev: &dyn BlockDevice, layout: &Layout, repair: bool, report: &mut CheckReport) -> Result<()> {
    let geo = layout.geo;
    let cs = geo.cluster_size();
    let l1_at = layout.header.l1_table_offset;
    let l1_bytes = u64::from(layout.header.l1_size) * 8;
    if l1_bytes == 0 || l1_at >= layout.file_len {
        return Ok(());
    }
    let mut stored = Stored::new(dev, layout);
    let mut l1 = vec![0u8; l1_bytes as usize];
    read_padded(dev, layout.file_len, l1_at, &mut l1)?;
    let mut l1_dirty = false;
    let entry_size = geo.l2_entry_size() as usize;
    let mut table = vec![0u8; cs as usize];
    for i in 0..layout.header.l1_size as usize {
        let Some(raw) = l1.get_mut(i * 8..i * 8 + 8) else { break };
        let l1_entry = L1Entry(be64(raw));
        let entry = l1_entry.0;
        let l2 = l1_entry.offset_field();
        if l2 == 0 {
            continue;
        }
        let Ok(refcount) = stored.get(l2 >> geo.cluster_bits)? else { continue };
        let at = l1_at + (i * 8) as u64;
        if (refcount == 1) != l1_entry.is_copied() {
            let fixed = l1_entry.with_copied(refcount == 1);
            if repair {
                raw.copy_from_slice(&fixed.0.to_be_bytes());
                l1_dirty = true;
                report.corruptions_fixed += 1;
                let found = Problem::CopiedFlag { table: Structure::ActiveL1, at, entry, refcount };
                report.note(Problem::Repaired(Box::new(found)));
            } else {
                report.found(Problem::CopiedFlag { table: Structure::ActiveL1, at, entry, refcount });
            }
        }
        read_padded(dev, layout.file_len, l2, &mut table)?;
        // A table we could not safely write back (misaligned, or past the end of the file) is only reported.
        let writable = geo.is_aligned(l2) && l2.saturating_add(cs) <= layout.file_len.next_multiple_of(cs);
        let mut l2_dirty = false;
        for (j, slot) in table.chunks_exact_mut(entry_size).enumerate() {
            let l2_entry = L2Entry(be64(slot));
            let entry = l2_entry.0;
            let kind = l2_entry.cluster_type(geo.extended_l2, layout.data_file);
            if !matches!(kind, ClusterType::Normal | ClusterType::ZeroAlloc) {
                continue;
            }
            let refcount = if layout.data_file {
                1
            } else {
                match stored.get(l2_entry.offset_field() >> geo.cluster_bits)? {
                    Ok(n) => n,
                    Err(_) => continue,
                }
            };
            if (refcount == 1) == l2_entry.is_copied() {
                continue;
            }
            let problem =
                Problem::CopiedFlag { table: Structure::L2Table, at: l2 + (j * entry_size) as u64, entry, refcount };
            if repair && writable {
                let fixed = l2_entry.with_copied(refcount == 1);
                put(slot, 0, &fixed.0.to_be_bytes());
                l2_dirty = true;
                report.corruptions_fixed += 1;
                report.note(Problem::Repaired(Box::new(problem)));
            } else {
                report.found(problem);
            }
        }
        if l2_dirty {
            dev.write_at(l2, &table)?;
        }
    }
    if l1_dirty {
        dev.flush()?;
        let start = l1_at & !511;
        let end = (l1_at + l1_bytes).next_multiple_of(512);
        let mut sectors = vec![0u8; (end - start) as usize];
        read_padded(dev, layout.file_len, start, &mut sectors)?;
        put(&mut sectors, (l1_at - start) as usize, &l1);
        write_grow(dev, start, &sectors)?;
    }
    Ok(())
}

/// Clears the dirty and corrupt bits (version 3 only has them), after everything else is durable.
pub fn mark_clean(dev: &dyn BlockDevice, layout: &Layout) -> Result<()> {
    let bits = layout.header.incompatible_features;
    if layout.header.version < 3 || bits & (feature::DIRTY | feature::CORRUPT) == 0 {
        return Ok(());
    }
    dev.flush()?;
    let cleared = bits & !(feature::DIRTY | feature::CORRUPT);
    patch_first_sector(dev, layout.file_len, |s| put(s, INCOMPATIBLE_FIELD, &cleared.to_be_bytes()))?;
    dev.flush()
}

/// Rewrites the snapshot table with its defects fixed: too much extra data cut to 1024 bytes (done while
/// reading), and version 3 entries given the 16 bytes of extra data they lack (the VM state size and the disk
/// size, as QEMU fills them). Runs once the refcounts are sound, so a refcount of zero means free: the new table
/// goes to the first free run that existing refcount blocks describe, counted and written before the header
/// points at it (a crash leaks it), and the old table is released after. Returns whether the table was
/// rewritten: without such a run (every described cluster in use) the defects stay, reported.
pub fn rewrite_snapshot_table(dev: &dyn BlockDevice, layout: &Layout) -> Result<bool> {
    let Ok(snapshots) = &layout.snapshots else { return Ok(false) };
    let fixed: Vec<crate::format::Snapshot> = snapshots
        .iter()
        .map(|s| {
            let mut s = s.clone();
            if layout.header.version >= 3 && s.extra.len() < 16 {
                let mut extra = vec![0u8; 16];
                put(&mut extra, 0, &u64::from(s.vm_state_size).to_be_bytes());
                put(&mut extra, 8, &layout.header.size.to_be_bytes());
                if let (Some(dst), Some(src)) = (extra.get_mut(..s.extra.len()), s.extra.get(..)) {
                    dst.copy_from_slice(src);
                }
                s.extra = extra;
            }
            s
        })
        .collect();
    let Ok(count) = u32::try_from(fixed.len()) else { return Ok(false) };
    let mut bytes = serialize_snapshot_table(&fixed);
    bytes.resize(bytes.len().next_multiple_of(512), 0);
    let geo = layout.geo;
    let cs = geo.cluster_size();
    let clusters = geo.clusters_for(bytes.len() as u64).max(1);
    let mut stored = Stored::new(dev, layout);
    let Some(first) = stored.free_run(clusters)? else { return Ok(false) };
    for cluster in first..first + clusters {
        stored.set(cluster, 1)?;
    }
    stored.write_back()?;
    write_grow(dev, first * cs, &bytes)?;
    dev.flush()?;
    patch_first_sector(dev, layout.file_len, |s| {
        put(s, SNAPSHOT_FIELDS, &count.to_be_bytes());
        put(s, SNAPSHOT_FIELDS + 4, &(first * cs).to_be_bytes());
    })?;
    dev.flush()?;
    let (old, old_len) = (layout.header.snapshots_offset, layout.snapshots_size);
    if old != 0 && old_len > 0 {
        for cluster in old / cs..=old.saturating_add(old_len - 1) / cs {
            if let Ok(n) = stored.get(cluster)? {
                stored.set(cluster, n.saturating_sub(1))?;
            }
        }
        stored.write_back()?;
    }
    Ok(true)
}
