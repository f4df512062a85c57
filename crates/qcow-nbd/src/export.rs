//! What the server serves: a block device, plus what NBD asks that the block-device contract does not answer:
//! which ranges are holes, which layer of a backing chain allocates them, which are dirty in a bitmap, and
//! whether discard does anything.

use qcow::block::{BlockDevice, FileDevice, MemoryDevice};
use qcow::{DepthRun, ExtentKind, Image};

use crate::proto::{NBD_STATE_HOLE, NBD_STATE_ZERO};

/// One run of the `base:allocation` context: a length and its `NBD_STATE_*` flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allocation {
    /// Bytes in the run.
    pub len: u64,
    /// `NBD_STATE_HOLE` and/or `NBD_STATE_ZERO`, or 0 for data.
    pub flags: u32,
}

/// A block device the server can export.
///
/// Every [`BlockDevice`] can be served by wrapping it in [`AllData`]; qcow2 images, files and memory devices are
/// exports directly and say more about their allocation.
pub trait Export: BlockDevice + 'static {
    /// Whether [`BlockDevice::discard`] releases space (and so `NBD_CMD_TRIM` is worth advertising).
    fn can_trim(&self) -> bool;

    /// The allocation state of `offset..offset + len` (clipped to the device), in order, covering the range
    /// from `offset` without gaps. Reporting everything as data (flags 0) is always correct.
    ///
    /// # Errors
    /// Whatever reading the device's metadata fails with.
    fn allocation(&self, offset: u64, len: u64) -> qcow::Result<Vec<Allocation>> {
        let end = offset.saturating_add(len).min(self.info().size_bytes());
        Ok(vec![Allocation { len: end.saturating_sub(offset), flags: 0 }])
    }

    /// The `qemu:allocation-depth` of `offset..offset + len` (clipped to the device): which layer of a backing
    /// chain allocates each part (0 none, 1 the export itself, 2 its backing file, ...), in order and without
    /// gaps. The default, everything at depth 1, is what QEMU reports for a device with no backing chain (a raw
    /// file).
    ///
    /// # Errors
    /// Whatever reading the device's metadata fails with.
    fn allocation_depth(&self, offset: u64, len: u64) -> qcow::Result<Vec<DepthRun>> {
        let end = offset.saturating_add(len).min(self.info().size_bytes());
        Ok(vec![DepthRun { len: end.saturating_sub(offset), depth: 1 }])
    }

    /// Whether the export has the persistent dirty bitmap `name`, which the server may then offer as
    /// `qemu:dirty-bitmap:NAME`. The default: no bitmaps.
    fn has_bitmap(&self, name: &str) -> bool {
        let _ = name;
        false
    }

    /// The dirty bitmap `name` over `offset..offset + len`: runs of (length, dirty) in order and without gaps;
    /// `None` when there is no such bitmap. The default has none.
    ///
    /// # Errors
    /// Whatever reading the bitmap fails with.
    fn dirty_bitmap(&self, name: &str, offset: u64, len: u64) -> qcow::Result<Option<Vec<(u64, bool)>>> {
        let _ = (name, offset, len);
        Ok(None)
    }

    /// The device's metrics in Prometheus text format, when it keeps any.
    ///
    /// # Errors
    /// Whatever collecting them fails with.
    fn prometheus_metrics(&self) -> qcow::Result<Option<String>> {
        Ok(None)
    }
}

/// A qcow2 image: holes and zero runs come from its cluster map, allocation depths from its backing chain.
/// `base:allocation` reports ranges left to a backing file as data, the conservative answer the protocol
/// allows. Its consistent persistent bitmaps are offered as `qemu:dirty-bitmap:NAME`.
impl<D: BlockDevice + 'static> Export for Image<D> {
    fn can_trim(&self) -> bool {
        self.config().discard && !self.is_read_only()
    }

    fn allocation(&self, offset: u64, len: u64) -> qcow::Result<Vec<Allocation>> {
        let backed = self.has_backing();
        let mut out: Vec<Allocation> = Vec::new();
        for extent in self.map(offset, len)? {
            let flags = match extent.kind {
                ExtentKind::Data { .. } | ExtentKind::Compressed { .. } => 0,
                ExtentKind::Unallocated if backed => 0,
                ExtentKind::Unallocated | ExtentKind::Zero => NBD_STATE_HOLE | NBD_STATE_ZERO,
            };
            push(&mut out, Allocation { len: extent.len, flags });
        }
        Ok(out)
    }

    fn allocation_depth(&self, offset: u64, len: u64) -> qcow::Result<Vec<DepthRun>> {
        Image::allocation_depth(self, offset, len)
    }

    fn has_bitmap(&self, name: &str) -> bool {
        // An inconsistent bitmap (left in use on disk) says nothing true, so it is never offered.
        self.list_bitmaps().is_ok_and(|list| list.iter().any(|b| b.name == name && b.consistent))
    }

    fn dirty_bitmap(&self, name: &str, offset: u64, len: u64) -> qcow::Result<Option<Vec<(u64, bool)>>> {
        if !self.has_bitmap(name) {
            return Ok(None);
        }
        let runs = self.bitmap_status(name, offset, len)?;
        Ok(Some(runs.into_iter().map(|r| (r.len, r.dirty)).collect()))
    }

    fn prometheus_metrics(&self) -> qcow::Result<Option<String>> {
        Image::prometheus_metrics(self).map(Some)
    }
}

/// A raw file: every byte is reported as data (sparse regions read as zeros all the same).
impl Export for FileDevice {
    fn can_trim(&self) -> bool {
        self.info().read_write && self.punches_holes()
    }
}

/// A memory device: all data.
impl Export for MemoryDevice {
    fn can_trim(&self) -> bool {
        false
    }
}

/// Any block device, exported with everything reported as data and no trim.
#[derive(Debug)]
pub struct AllData<D>(pub D);

impl<D: BlockDevice> BlockDevice for AllData<D> {
    qcow::forward_block_device_methods!(0; info, read, write, flush, resize, discard, zero_range, disconnect, read_at, write_at);
}

impl<D: BlockDevice + 'static> Export for AllData<D> {
    fn can_trim(&self) -> bool {
        false
    }
}

/// Appends a run, merging it into the previous one when the flags agree.
fn push(out: &mut Vec<Allocation>, run: Allocation) {
    match out.last_mut() {
        Some(last) if last.flags == run.flags => last.len = last.len.saturating_add(run.len),
        _ => out.push(run),
    }
}
