//! The bitmap operations of [`Image`]: list, add, remove, clear, enable, disable, merge, query and store, with
//! QEMU's rules (`block/dirty-bitmap.c`, `block/monitor/bitmap-qmp-cmds.c`). Wording for people is the front
//! ends' business; errors here say what was refused and why.

use std::ops::Range;
use std::sync::Arc;

use super::bits::DirtyBits;
use super::{retrack, BitmapSet, Live, MAX_TOTAL_BITMAP_BYTES};
use crate::block::BlockDevice;
use crate::error::{Error, Result};
use crate::format::{
    bitmap_data_bytes, check_new_bitmap, feature, BitmapEntry, BitmapError, MAX_BITMAPS, MAX_BITMAP_DIRECTORY_BYTES,
};
use crate::image::Image;

/// One persistent dirty bitmap, with the flags `qemu-img info` reports and its state in this open image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    /// The bitmap's name, unique in the image.
    pub name: String,
    /// Guest bytes one bit covers.
    pub granularity: u64,
    /// The in-use flag as the image's directory records it now: set for every bitmap an image open for writing
    /// may change, and for a bitmap left inconsistent. False for a bitmap added and not stored yet.
    pub in_use: bool,
    /// The auto flag: whether the bitmap records writes whenever the image is opened (as it would be stored now).
    pub auto: bool,
    /// Whether writes set its bits (for a read-only image: whether they would).
    pub enabled: bool,
    /// Whether its bits can be trusted; false for a bitmap that was already in use when the image was opened
    /// (its writer did not store it), which can only be listed and removed.
    pub consistent: bool,
}

/// A run of a bitmap's answer for a guest range: `len` bytes, all dirty or all clean.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapRun {
    /// Length in bytes.
    pub len: u64,
    /// Whether the bytes were written since the bitmap was created or last cleared.
    pub dirty: bool,
}

/// The dirty ranges of one bitmap, in guest byte offsets, in order and merged; from
/// [`Image::dirty_ranges`]. Writes made while iterating may or may not show.
#[derive(Debug)]
pub struct DirtyRanges {
    bits: Arc<DirtyBits>,
    granularity_bits: u32,
    size: u64,
    /// The next bit to look at.
    at: u64,
}

impl Iterator for DirtyRanges {
    type Item = Range<u64>;

    fn next(&mut self) -> Option<Range<u64>> {
        let len = self.bits.len();
        if self.at < len && !self.bits.get(self.at) {
            self.at = self.bits.run_end(self.at, len);
        }
        if self.at >= len {
            return None;
        }
        let end = self.bits.run_end(self.at, len);
        let g = self.granularity_bits;
        let range = (self.at << g).min(self.size)..(end << g).min(self.size);
        self.at = end;
        Some(range)
    }
}

/// `InvalidArgument` for an operation on a bitmap the image does not have.
fn not_found(op: &'static str, name: &str) -> Error {
    Error::invalid(op, format!("no bitmap named {name:?}"))
}

/// `InvalidArgument` for an operation on an inconsistent bitmap.
fn inconsistent(op: &'static str, name: &str) -> Error {
    Error::invalid(op, format!("bitmap '{name}' is inconsistent and cannot be used; remove it"))
}

/// The consistent bitmap `name` of `set`, for `op`.
fn usable<'a>(set: &'a BitmapSet, op: &'static str, name: &str) -> Result<&'a Live> {
    let b = set.find(name).ok_or_else(|| not_found(op, name))?;
    if !b.consistent() {
        return Err(inconsistent(op, name));
    }
    Ok(b)
}

impl<D: BlockDevice> Image<D> {
    /// The persistent dirty bitmaps as the image's directory records them now, parsed but not validated, whatever
    /// autoclear bit 0 says (see [`Image::list_bitmaps`] for what QEMU would make of them).
    ///
    /// # Errors
    /// `Corrupt` for a malformed directory, `Io`.
    pub fn bitmaps(&self) -> Result<Vec<BitmapEntry>> {
        self.meta().bitmaps(&self.dev)
    }

    /// Whether QEMU may trust the image's bitmaps (autoclear bit 0). A read-write open keeps it set, because this
    /// version maintains bitmaps; a program without bitmap support clears it.
    pub fn bitmaps_consistent(&self) -> bool {
        self.meta().header.autoclear_features & feature::BITMAPS != 0
    }

    /// The granularity QEMU gives a new bitmap when none is asked for: the cluster size, kept within 4 KiB ..
    /// 64 KiB (`bdrv_get_default_bitmap_granularity`).
    pub fn default_bitmap_granularity(&self) -> u64 {
        self.geo.cluster_size().clamp(4096, 65536)
    }

    /// Every persistent bitmap, in the directory's order (bitmaps added while open last), as QEMU would load
    /// them: none when autoclear bit 0 says a program without bitmap support wrote the image.
    ///
    /// # Errors
    /// `Bitmap` for a directory or table QEMU would refuse (read-only images read them on the first call), `Io`.
    pub fn list_bitmaps(&self) -> Result<Vec<BitmapInfo>> {
        self.check_connected()?;
        self.with_bitmaps(|set| {
            Ok(set
                .list
                .iter()
                .map(|b| {
                    let stored = b.on_disk.as_ref().map(|d| &d.entry);
                    BitmapInfo {
                        name: b.name.clone(),
                        granularity: b.granularity(),
                        in_use: stored.is_some_and(BitmapEntry::in_use),
                        auto: if b.consistent() { b.enabled } else { stored.is_some_and(BitmapEntry::auto) },
                        enabled: b.tracks_writes(),
                        consistent: b.consistent(),
                    }
                })
                .collect())
        })
    }

    /// Runs `f` on the bitmap set held shared (so that writers go on), reading a read-only image's bitmaps
    /// first if they were not read yet.
    fn with_bitmaps<R>(&self, f: impl FnOnce(&BitmapSet) -> Result<R>) -> Result<R> {
        {
            let set = self.bitmaps.read();
            if set.loaded {
                return f(&set);
            }
        }
        let mut set = self.bitmaps.write();
        self.ensure_bitmaps_loaded(&mut set)?;
        f(&set)
    }

    /// Adds an empty bitmap named `name` covering `granularity` guest bytes per bit; `enabled` makes it record
    /// writes from now on. It reaches the image when the bitmaps are stored (at close, or
    /// [`Image::store_bitmaps`]), as in QEMU.
    ///
    /// # Errors
    /// `ReadOnly`; `InvalidArgument`, changing nothing, for a version 2 image (which cannot keep bitmaps), a name
    /// that is empty, longer than 1023 bytes or taken, a granularity that is not a power of two from 512 bytes to
    /// 2 GiB, a bitmap larger than QEMU allows (512 MiB of bits), a 65536th bitmap or a directory past 64 MiB;
    /// `Unsupported` when the image's bitmaps would hold more than 1 GiB of bits in memory.
    pub fn add_bitmap(&self, name: &str, granularity: u64, enabled: bool) -> Result<()> {
        const OP: &str = "add bitmap";
        self.check_writable(OP)?;
        if self.meta().header.version < 3 {
            return Err(Error::invalid(OP, "qcow2 version 2 images cannot store dirty bitmaps"));
        }
        let mut tracking = self.resize.write().unwrap_or_else(|e| e.into_inner());
        let size = self.virtual_size();
        check_new_bitmap(name, granularity, size, self.geo.cluster_size())
            .map_err(|e| Error::invalid(OP, e.to_string()))?;
        let mut set = self.bitmaps.write();
        self.ensure_bitmaps_loaded(&mut set)?;
        if set.find(name).is_some() {
            return Err(Error::invalid(OP, format!("a bitmap named {name:?} exists already")));
        }
        if set.list.len() >= MAX_BITMAPS as usize {
            return Err(Error::invalid(OP, BitmapError::TooMany { count: MAX_BITMAPS.saturating_add(1) }.to_string()));
        }
        let granularity_bits = granularity.trailing_zeros() as u8;
        let new = BitmapEntry { name: name.to_owned(), ..BitmapEntry::default() };
        let directory = set
            .list
            .iter()
            .map(|b| BitmapEntry { name: b.name.clone(), ..BitmapEntry::default() }.disk_len())
            .fold(new.disk_len(), u64::saturating_add);
        if directory > MAX_BITMAP_DIRECTORY_BYTES {
            return Err(Error::invalid(OP, BitmapError::DirectoryFull { size: directory }.to_string()));
        }
        let held = set
            .list
            .iter()
            .filter(|b| b.consistent())
            .map(|b| bitmap_data_bytes(size, b.granularity_bits))
            .fold(bitmap_data_bytes(size, granularity_bits), u64::saturating_add);
        if held > MAX_TOTAL_BITMAP_BYTES {
            return Err(Error::Unsupported {
                feature: format!("persistent bitmaps holding {held:#x} bytes of data, more than 1 GiB in total"),
            });
        }
        set.list.push(Live {
            name: name.to_owned(),
            granularity_bits,
            enabled,
            bits: Some(Arc::new(DirtyBits::new(size.div_ceil(granularity)))),
            on_disk: None,
        });
        retrack(&set, &mut tracking);
        Ok(())
    }

    /// Removes the bitmap `name`, consistent or not: from the image's directory at once (the new directory is
    /// durable before the bitmap's clusters are freed), as QEMU removes it.
    ///
    /// # Errors
    /// `ReadOnly`; `InvalidArgument` when there is no such bitmap; `Io`, `Corrupt` (the bitmap is then still
    /// listed, unless the new directory was already committed).
    pub fn remove_bitmap(&self, name: &str) -> Result<()> {
        const OP: &str = "remove bitmap";
        self.check_writable(OP)?;
        let mut tracking = self.resize.write().unwrap_or_else(|e| e.into_inner());
        let mut set = self.bitmaps.write();
        self.ensure_bitmaps_loaded(&mut set)?;
        let index = set.list.iter().position(|b| b.name == name).ok_or_else(|| not_found(OP, name))?;
        let result = self.observe(self.remove_stored_bitmap(&mut set, index));
        retrack(&set, &mut tracking);
        result
    }

    /// Clears every bit of the bitmap `name`.
    ///
    /// # Errors
    /// `ReadOnly`; `InvalidArgument` when there is no such bitmap or it is inconsistent.
    pub fn clear_bitmap(&self, name: &str) -> Result<()> {
        const OP: &str = "clear bitmap";
        self.check_writable(OP)?;
        let mut tracking = self.resize.write().unwrap_or_else(|e| e.into_inner());
        let mut set = self.bitmaps.write();
        self.ensure_bitmaps_loaded(&mut set)?;
        usable(&set, OP, name)?;
        if let Some(b) = set.find_mut(name) {
            let len = b.bits.as_ref().map_or(0, |bits| bits.len());
            b.bits = Some(Arc::new(DirtyBits::new(len)));
        }
        retrack(&set, &mut tracking);
        Ok(())
    }

    /// Makes the bitmap `name` record writes from now on (and whenever the image is opened, once stored).
    ///
    /// # Errors
    /// `ReadOnly`; `InvalidArgument` when there is no such bitmap or it is inconsistent.
    pub fn enable_bitmap(&self, name: &str) -> Result<()> {
        self.set_bitmap_enabled("enable bitmap", name, true)
    }

    /// Makes the bitmap `name` stop recording writes; its bits stay as they are.
    ///
    /// # Errors
    /// `ReadOnly`; `InvalidArgument` when there is no such bitmap or it is inconsistent.
    pub fn disable_bitmap(&self, name: &str) -> Result<()> {
        self.set_bitmap_enabled("disable bitmap", name, false)
    }

    fn set_bitmap_enabled(&self, op: &'static str, name: &str, enabled: bool) -> Result<()> {
        self.check_writable(op)?;
        let mut tracking = self.resize.write().unwrap_or_else(|e| e.into_inner());
        let mut set = self.bitmaps.write();
        self.ensure_bitmaps_loaded(&mut set)?;
        usable(&set, op, name)?;
        if let Some(b) = set.find_mut(name) {
            b.enabled = enabled;
        }
        retrack(&set, &mut tracking);
        Ok(())
    }

    /// Sets in the bitmap `dst` every bit of the bitmap `src` of this image, as QEMU's merge does: the
    /// destination may be disabled, the granularities may differ (a source granule dirties every destination
    /// granule it touches), and a bitmap may be merged into itself.
    ///
    /// # Errors
    /// `ReadOnly`; `InvalidArgument` when either bitmap is missing or inconsistent (the destination is judged
    /// first, as QEMU does).
    pub fn merge_bitmap(&self, src: &str, dst: &str) -> Result<()> {
        const OP: &str = "merge bitmap";
        self.check_writable(OP)?;
        let _size = self.resize.read().unwrap_or_else(|e| e.into_inner());
        let mut set = self.bitmaps.write();
        self.ensure_bitmaps_loaded(&mut set)?;
        usable(&set, OP, dst)?;
        let from = usable(&set, OP, src)?;
        let (bits, g) = (from.bits.clone(), from.granularity_bits);
        let to = usable(&set, OP, dst)?;
        if let Some(bits) = bits {
            merge_into(to, bits, g, self.virtual_size());
        }
        Ok(())
    }

    /// Sets in this image's bitmap `dst` every bit of the bitmap `src` of the image `source` (QEMU's merge from
    /// another node, `qemu-img bitmap --merge SRC -b SOURCE_FILE`). The two disks must have the same size.
    ///
    /// # Errors
    /// As [`Image::merge_bitmap`]; `InvalidArgument` when the sizes differ; whatever reading `source`'s bitmaps
    /// fails with.
    pub fn merge_bitmap_from<E: BlockDevice>(&self, source: &Image<E>, src: &str, dst: &str) -> Result<()> {
        const OP: &str = "merge bitmap";
        if std::ptr::eq((self as *const Self).cast::<u8>(), (source as *const Image<E>).cast::<u8>()) {
            return self.merge_bitmap(src, dst);
        }
        self.check_writable(OP)?;
        // The destination is judged first, as QEMU judges it; no lock of one image is held while the other's is
        // taken, so two images merging into each other cannot deadlock.
        self.with_bitmaps(|set| usable(set, OP, dst).map(|_| ()))?;
        let (bits, g) = source.with_bitmaps(|theirs| {
            let from = usable(theirs, OP, src)?;
            Ok((from.bits.clone(), from.granularity_bits))
        })?;
        let theirs = source.virtual_size();
        let _size = self.resize.read().unwrap_or_else(|e| e.into_inner());
        let set = self.bitmaps.write();
        let to = usable(&set, OP, dst)?;
        let ours = self.virtual_size();
        if ours != theirs {
            return Err(Error::invalid(
                OP,
                format!("the bitmaps cover disks of different sizes (destination {ours}, source {theirs} bytes)"),
            ));
        }
        if let Some(bits) = bits {
            merge_into(to, bits, g, ours);
        }
        Ok(())
    }

    /// The bitmap `name`'s answer for the guest range `offset..offset + len`, clipped to the disk: runs of dirty
    /// and clean bytes in order and without gaps, each as long as it can be. A run boundary falls on a granule
    /// boundary (or the range's ends).
    ///
    /// # Errors
    /// `InvalidArgument` when there is no bitmap `name`, or it is inconsistent (its bits mean nothing); `Bitmap`
    /// or `Io` when a read-only image's bitmaps cannot be read.
    pub fn bitmap_status(&self, name: &str, offset: u64, len: u64) -> Result<Vec<BitmapRun>> {
        const OP: &str = "bitmap status";
        self.check_connected()?;
        let (bits, g) = self.bitmap_bits(OP, name)?;
        let size = self.virtual_size();
        let start = offset.min(size);
        let end = offset.saturating_add(len).min(size);
        let mut runs = Vec::new();
        let mut at = start;
        while at < end {
            let bit = at >> g;
            let dirty = bits.get(bit);
            let run_end = bits.run_end(bit, end.div_ceil(1u64 << g));
            let stop = (run_end.saturating_mul(1u64 << g)).clamp(at + 1, end);
            runs.push(BitmapRun { len: stop - at, dirty });
            at = stop;
        }
        Ok(runs)
    }

    /// The dirty ranges of the bitmap `name` over the whole disk, as an iterator of guest byte ranges.
    ///
    /// # Errors
    /// As [`Image::bitmap_status`].
    pub fn dirty_ranges(&self, name: &str) -> Result<DirtyRanges> {
        self.check_connected()?;
        let (bits, g) = self.bitmap_bits("dirty ranges", name)?;
        Ok(DirtyRanges { bits, granularity_bits: g, size: self.virtual_size(), at: 0 })
    }

    fn bitmap_bits(&self, op: &'static str, name: &str) -> Result<(Arc<DirtyBits>, u32)> {
        self.with_bitmaps(|set| {
            let b = usable(set, op, name)?;
            let bits = b.bits.clone().ok_or_else(|| inconsistent(op, name))?;
            Ok((bits, u32::from(b.granularity_bits)))
        })
    }

    /// Stores every consistent bitmap in the image now, as closing the image does: afterwards QEMU reads them as
    /// consistent. The image stays open; the next write marks them in use again before it changes anything.
    ///
    /// # Errors
    /// `ReadOnly`; `Io`, `Corrupt`, `Bitmap` (a crash or an error leaves the previous directory, in which the
    /// bitmaps say in use, or the new one).
    pub fn store_bitmaps(&self) -> Result<()> {
        self.check_writable("store bitmaps")?;
        self.observe(self.store_bitmaps_now())
    }

    /// The store of [`Image::store_bitmaps`] and of closing.
    pub(in crate::image) fn store_bitmaps_now(&self) -> Result<()> {
        // Exclusive: every write that set bits has finished, and the next one finds that it must mark first.
        let mut tracking = self.resize.write().unwrap_or_else(|e| e.into_inner());
        let mut set = self.bitmaps.write();
        if !set.loaded {
            return Ok(());
        }
        let stored = self.store_bitmap_set(&mut set);
        retrack(&set, &mut tracking);
        stored
    }
}

/// ORs `bits` (at `2^g` bytes a bit) into the bitmap `to` of a `size`-byte disk.
fn merge_into(to: &Live, bits: Arc<DirtyBits>, g: u8, size: u64) {
    let Some(dst) = &to.bits else { return };
    if g == to.granularity_bits && dst.len() == bits.len() {
        dst.or_with(&bits);
        return;
    }
    let ranges = DirtyRanges { bits, granularity_bits: u32::from(g), size, at: 0 };
    let dg = u32::from(to.granularity_bits);
    for r in ranges {
        dst.set(r.start >> dg, r.end.div_ceil(1u64 << dg));
    }
}
