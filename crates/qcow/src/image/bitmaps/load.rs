//! Reading the bitmaps of an image as QEMU's `qcow2_load_dirty_bitmaps` does: the directory validated entry by
//! entry (`bitmap_list_load`, `check_dir_entry`), the data of every consistent bitmap read into memory
//! (`load_bitmap`), and, on a read-write open, those bitmaps marked in use on disk in place
//! (`update_ext_header_and_dir_in_place`).
//!
//! Only a header whose bitmaps autoclear bit is set is believed: with the bit clear a program without bitmap
//! support wrote the image since, QEMU ignores the bitmaps, and a read-write open drops their extension (its
//! clusters become leaks for `qemu-img check -r` to free).

use std::collections::HashSet;
use std::sync::Arc;

use super::bits::DirtyBits;
use super::{with_in_use, BitmapSet, Live, OnDisk, MAX_TOTAL_BITMAP_BYTES};
use crate::block::BlockDevice;
use crate::error::{Error, Result};
use crate::format::{
    bitmap_data_bytes, bitmap_table_entries, feature, parse_bitmap_directory, parse_bitmap_table,
    serialize_bitmap_directory, BitmapCluster, BitmapEntry, BitmapError, BitmapsExtension, Extension,
    MAX_BITMAP_DIRECTORY_BYTES,
};
use crate::image::meta::{write_meta, Meta};
use crate::image::overlap::MetaKind;
use crate::image::Image;

/// `BitmapError::Constraint` for the bitmap `name`.
fn constraint(name: &str, reason: &'static str, value: u64) -> BitmapError {
    BitmapError::Constraint { name: name.to_owned(), reason, value }
}

impl Meta {
    /// The bitmaps extension, when the header has one and QEMU would read it (autoclear bit 0 set).
    pub(super) fn trusted_bitmaps_extension(&self) -> Result<Option<BitmapsExtension>> {
        if self.header.autoclear_features & feature::BITMAPS == 0 {
            return Ok(None);
        }
        let Some(ext) = self.header.extension(Extension::BITMAPS) else { return Ok(None) };
        BitmapsExtension::parse(&ext.data).map(Some).map_err(|source| Error::Bitmap { offset: 0, source })
    }

    /// The persistent bitmaps the header's extension points at, parsed but not validated (what `qemu-img check`
    /// and a refcount rebuild count), whatever the autoclear bit says.
    pub fn bitmaps(&mut self, dev: &dyn BlockDevice) -> Result<Vec<BitmapEntry>> {
        let Some(ext) = self.header.extension(Extension::BITMAPS) else {
            return Ok(Vec::new());
        };
        let ext = BitmapsExtension::parse(&ext.data).map_err(|_| Error::corrupt("malformed bitmaps extension", 0))?;
        let size = ext.directory_size.min(MAX_BITMAP_DIRECTORY_BYTES);
        if ext.directory_offset % 512 != 0
            || ext.directory_offset.checked_add(size).is_none_or(|end| end > dev.info().size_bytes())
        {
            return Err(Error::corrupt("bitmap directory outside the file", ext.directory_offset));
        }
        let mut bytes = vec![0u8; size.next_multiple_of(512) as usize];
        dev.read_at(ext.directory_offset, &mut bytes)?;
        parse_bitmap_directory(bytes.get(..size as usize).unwrap_or(&[]), ext.nb_bitmaps)
            .map_err(|_| Error::corrupt("malformed bitmap directory", ext.directory_offset))
    }

    /// The directory as QEMU loads it: the extension and every entry validated against the disk size, names
    /// unique. `None` when QEMU would read no bitmaps.
    fn validated_bitmap_directory(&mut self, dev: &dyn BlockDevice) -> Result<Option<Vec<BitmapEntry>>> {
        let Some(ext) = self.trusted_bitmaps_extension()? else { return Ok(None) };
        let cs = self.geo.cluster_size();
        ext.validate(cs).map_err(|source| Error::Bitmap { offset: 0, source })?;
        let at = ext.directory_offset;
        if at.checked_add(ext.directory_size).is_none_or(|end| end > dev.info().size_bytes()) {
            return Err(Error::corrupt("bitmap directory outside the file", at));
        }
        // Bounded by the extension's validation (64 MiB) and by the file.
        let mut bytes = vec![0u8; ext.directory_size.next_multiple_of(512) as usize];
        dev.read_at(at, &mut bytes)?;
        let entries = parse_bitmap_directory(bytes.get(..ext.directory_size as usize).unwrap_or(&[]), ext.nb_bitmaps)
            .map_err(|source| Error::Bitmap { offset: at, source })?;
        let mut names = HashSet::new();
        for e in &entries {
            e.validate(cs, self.header.size).map_err(|source| Error::Bitmap { offset: at, source })?;
            if !names.insert(e.name.as_str()) {
                let source = constraint(&e.name, "another bitmap has the same name", 0);
                return Err(Error::Bitmap { offset: at, source });
            }
        }
        Ok(Some(entries))
    }

    /// Rewrites the directory in place with every entry of `entries` as given, in QEMU's flushed order: the header
    /// without the bitmaps autoclear bit (from here until the last step QEMU ignores the bitmaps, so a crash leaves
    /// them stale rather than wrong), the directory, then the header with the bit again.
    pub(super) fn rewrite_bitmap_directory_in_place(
        &mut self,
        dev: &dyn BlockDevice,
        entries: &[BitmapEntry],
    ) -> Result<()> {
        let Some(ext) = self.trusted_bitmaps_extension()? else {
            return Err(Error::corrupt("no bitmap directory to rewrite", 0));
        };
        let bytes = serialize_bitmap_directory(entries);
        if bytes.len() as u64 != ext.directory_size {
            return Err(Error::corrupt("bitmap directory changed size", ext.directory_offset));
        }
        let cs = self.geo.cluster_size();
        let at = ext.directory_offset;
        for cluster in at / cs..=(at + ext.directory_size - 1) / cs {
            self.check_meta_write(dev, cluster * cs, MetaKind::BitmapDirectory)?;
        }
        // The last sector keeps whatever follows the directory in it.
        let mut sectors = vec![0u8; ext.directory_size.next_multiple_of(512) as usize];
        let tail = sectors.len() - 512;
        if let Some(last) = sectors.get_mut(tail..) {
            dev.read_at(at + tail as u64, last)?;
        }
        if let Some(head) = sectors.get_mut(..bytes.len()) {
            head.copy_from_slice(&bytes);
        }
        self.header.autoclear_features &= !feature::BITMAPS;
        self.write_header(dev)?;
        dev.flush()?;
        write_meta(dev, at, &sectors)?;
        dev.flush()?;
        self.header.autoclear_features |= feature::BITMAPS;
        self.write_header(dev)?;
        dev.flush()
    }

    /// Removes a bitmaps extension QEMU would ignore (autoclear bit 0 clear), as QEMU's read-write open does; its
    /// clusters stay allocated, as leaks. Answers whether the header changed.
    pub(in crate::image) fn drop_stale_bitmaps(&mut self) -> bool {
        self.header.autoclear_features & feature::BITMAPS == 0
            && self.header.remove_extension(Extension::BITMAPS).is_some()
    }
}

impl<D: BlockDevice> Image<D> {
    /// Reads the image's bitmaps into `set`: the directory validated, then the data of each consistent bitmap.
    pub(super) fn read_bitmaps(&self, set: &mut BitmapSet) -> Result<()> {
        let entries = self.meta().validated_bitmap_directory(&self.dev)?.unwrap_or_default();
        let size = self.virtual_size();
        let total = entries
            .iter()
            .filter(|e| !e.in_use())
            .fold(0u64, |n, e| n.saturating_add(bitmap_data_bytes(size, e.granularity_bits)));
        if total > MAX_TOTAL_BITMAP_BYTES {
            return Err(Error::Unsupported {
                feature: format!("persistent bitmaps holding {total:#x} bytes of data, more than 1 GiB in total"),
            });
        }
        let mut list = Vec::with_capacity(entries.len());
        for entry in entries {
            let (bits, data) = if entry.in_use() {
                // QEMU does not read the data of an inconsistent bitmap.
                (None, None)
            } else {
                let (bits, data) = self.read_bitmap_data(&entry, size)?;
                (Some(Arc::new(bits)), Some(data))
            };
            list.push(Live {
                name: entry.name.clone(),
                granularity_bits: entry.granularity_bits,
                enabled: entry.auto(),
                bits,
                on_disk: Some(OnDisk { entry, data }),
            });
        }
        set.list = list;
        set.loaded = true;
        Ok(())
    }

    /// The table of `entry`, every entry checked as QEMU's `check_table_entry` checks it.
    pub(super) fn read_bitmap_table(&self, entry: &BitmapEntry) -> Result<Vec<BitmapCluster>> {
        let cs = self.geo.cluster_size();
        let len = u64::from(entry.table_size) * 8;
        // QEMU would read zeros past the end of the file; `qemu-img check` calls such a pointer a corruption, and
        // so does this: the open fails before it writes anything.
        if !self.inside_file(entry.table_offset, len) {
            return Err(Error::corrupt("bitmap table outside the file", entry.table_offset));
        }
        // Bounded by validation: table_size * cluster_size <= 512 MiB, so at most 8 MiB of table.
        let mut bytes = vec![0u8; len.next_multiple_of(512) as usize];
        self.dev.read_at(entry.table_offset, &mut bytes)?;
        parse_bitmap_table(bytes.get(..len as usize).unwrap_or(&[]))
            .into_iter()
            .enumerate()
            .map(|(i, t)| {
                t.kind(cs).map_err(|reason| Error::Bitmap {
                    offset: entry.table_offset + i as u64 * 8,
                    source: constraint(&entry.name, reason, t.0),
                })
            })
            .collect()
    }

    /// The bits of the consistent bitmap `entry` of a `size`-byte disk, and the data clusters its table names.
    fn read_bitmap_data(&self, entry: &BitmapEntry, size: u64) -> Result<(DirtyBits, Vec<u64>)> {
        let cs = self.geo.cluster_size();
        let table = self.read_bitmap_table(entry)?;
        let expected = bitmap_table_entries(size, entry.granularity_bits, cs);
        if table.len() as u64 != expected {
            return Err(Error::Bitmap {
                offset: entry.table_offset,
                source: constraint(&entry.name, "bitmap table size does not match the disk size", expected),
            });
        }
        let bits = DirtyBits::new(size.div_ceil(entry.granularity()));
        let bits_per_cluster = cs * 8;
        let mut data = Vec::new();
        let mut buf = vec![0u8; cs as usize];
        for (i, part) in table.iter().enumerate() {
            let first = i as u64 * bits_per_cluster;
            match *part {
                BitmapCluster::Zeros => {}
                BitmapCluster::Ones => bits.set(first, first + bits_per_cluster),
                BitmapCluster::Data(offset) => {
                    if !self.inside_file(offset, 1) {
                        return Err(Error::corrupt("bitmap data cluster outside the file", entry.table_offset));
                    }
                    self.dev.read_at(offset, &mut buf)?;
                    bits.deserialize(first, &buf);
                    data.push(offset);
                }
            }
        }
        Ok((bits, data))
    }

    /// Whether `len` bytes from `offset` lie in the file's clusters (the file may end inside its last one).
    fn inside_file(&self, offset: u64, len: u64) -> bool {
        let end = self.dev.info().size_bytes().next_multiple_of(self.geo.cluster_size());
        offset.checked_add(len).is_some_and(|e| e <= end)
    }

    /// Reads the bitmaps of a read-only image the first time they are needed.
    pub(super) fn ensure_bitmaps_loaded(&self, set: &mut BitmapSet) -> Result<()> {
        if !set.loaded {
            self.read_bitmaps(set)?;
        }
        Ok(())
    }

    /// Loads the bitmaps of an image opened read-write and marks the consistent ones in use on disk, as QEMU's
    /// read-write open does, before any write can happen.
    pub(in crate::image) fn load_bitmaps_for_writing(&self) -> Result<()> {
        let mut tracking = self.resize.write().unwrap_or_else(|e| e.into_inner());
        let mut set = self.bitmaps.write();
        self.read_bitmaps(&mut set)?;
        let marked = self.mark_bitmaps_in_use(&mut set);
        super::retrack(&set, &mut tracking);
        marked
    }

    /// Marks every consistent bitmap that has an entry in the directory in use there (in place, in QEMU's
    /// order), so that the directory says "inconsistent" for as long as writes may change them.
    pub(super) fn mark_bitmaps_in_use(&self, set: &mut BitmapSet) -> Result<()> {
        if !set.has_unmarked_entries() {
            set.needs_mark = false;
            return Ok(());
        }
        let entries: Vec<BitmapEntry> = set
            .list
            .iter()
            .filter_map(|b| b.on_disk.as_ref().map(|d| with_in_use(&d.entry, b.consistent() || d.entry.in_use())))
            .collect();
        self.meta().rewrite_bitmap_directory_in_place(&self.dev, &entries)?;
        for (b, e) in set.list.iter_mut().filter(|b| b.on_disk.is_some()).zip(entries) {
            if let Some(d) = b.on_disk.as_mut() {
                d.entry = e;
            }
        }
        set.needs_mark = false;
        Ok(())
    }
}
