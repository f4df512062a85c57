//! Internal snapshots as this version handles them: listed, counted in refcount rebuilds, and readable as
//! read-only images. Snapshot-owned clusters are never freed because their refcounts stay above one, which also
//! makes every write to them copy first. (Persistent bitmaps are `super::bitmaps`.)

use std::path::Path;

use super::backing::{BackingPolicy, BackingResolver, FileResolver};
use super::meta::Meta;
use super::{Config, Image};
use crate::block::{BlockDevice, FileDevice, FileOptions};
use crate::error::{Error, Result};
use crate::format::{parse_snapshot_table, Snapshot, MAX_SNAPSHOT_TABLE_BYTES};

impl Meta {
    /// The snapshot table, parsed and validated.
    pub fn snapshots(&mut self, dev: &dyn BlockDevice) -> Result<Vec<Snapshot>> {
        let count = self.header.nb_snapshots;
        if count == 0 {
            return Ok(Vec::new());
        }
        let offset = self.header.snapshots_offset;
        let file = dev.info().size_bytes();
        let len = file.saturating_sub(offset).min(MAX_SNAPSHOT_TABLE_BYTES);
        if len == 0 {
            return Err(Error::corrupt("snapshot table starts past the end of the file", offset));
        }
        let mut bytes = vec![0u8; len.next_multiple_of(512) as usize];
        dev.read_at(offset, &mut bytes)?;
        let snapshots = parse_snapshot_table(&bytes, count, self.header.version)
            .map_err(|_| Error::corrupt("malformed snapshot table", offset))?;
        for s in &snapshots {
            s.validate(self.geo.cluster_size()).map_err(|_| Error::corrupt("malformed snapshot entry", offset))?;
        }
        Ok(snapshots)
    }
}

impl<D: BlockDevice> Image<D> {
    /// The internal snapshots stored in the image.
    ///
    /// # Errors
    /// `Corrupt` for a malformed snapshot table, `Io`.
    pub fn snapshots(&self) -> Result<Vec<Snapshot>> {
        self.meta().snapshots(&self.dev)
    }

    /// Opens the contents of the snapshot named `name` (or with that id) as a read-only image.
    ///
    /// # Errors
    /// `InvalidArgument` when no snapshot has that name or id; as [`Image::open_with`] otherwise.
    pub fn open_snapshot(device: D, name: &str, resolver: &dyn BackingResolver) -> Result<Self> {
        let image = Image::open_with(device, Config::read_only(), resolver)?;
        let snapshot = image
            .snapshots()?
            .into_iter()
            .find(|s| s.name == name)
            .or_else(|| image.snapshots().ok()?.into_iter().find(|s| s.id == name))
            .ok_or_else(|| Error::invalid("open snapshot", format!("no snapshot named {name:?}")))?;
        {
            let mut m = image.meta();
            m.header.l1_table_offset = snapshot.l1_table_offset;
            m.header.l1_size = snapshot.l1_size;
            if let Some(size) = snapshot.disk_size() {
                m.header.size = size;
            }
            m.cache.clear_clean();
            m.overlap.l1_replaced();
            image.size.store(m.header.size, std::sync::atomic::Ordering::Release);
        }
        Ok(image)
    }
}

impl Image<FileDevice> {
    /// Opens the snapshot named `name` of the image file at `path`, read-only.
    ///
    /// # Errors
    /// As [`Image::open_snapshot`].
    pub fn open_snapshot_path(path: impl AsRef<Path>, name: &str) -> Result<Self> {
        let path = path.as_ref();
        let file = FileDevice::open(path, &FileOptions { read_only: true, direct: false, ..FileOptions::default() })?;
        Image::open_snapshot(file, name, &FileResolver::new(path, BackingPolicy::default()))
    }
}

impl Meta {
    /// Writes `snapshots` as a new snapshot table in newly allocated clusters and switches the header to it,
    /// then frees the old table (`old_len` bytes at the current offset). The new table and its refcounts are
    /// durable before the header points at it.
    ///
    /// An empty list is no table at all: offset 0, nothing allocated (a cluster nothing counts would leak).
    pub(super) fn replace_snapshot_table(
        &mut self,
        dev: &dyn BlockDevice,
        snapshots: &[Snapshot],
        old_len: u64,
    ) -> Result<()> {
        let cs = self.geo.cluster_size();
        let mut bytes = crate::format::serialize_snapshot_table(snapshots);
        bytes.resize(bytes.len().next_multiple_of(512), 0);
        self.writeback(dev)?;
        let mut new_offset = 0;
        if !snapshots.is_empty() {
            let clusters = self.geo.clusters_for(bytes.len() as u64).max(1);
            new_offset = self.alloc_clusters(dev, clusters)? * cs;
            self.writeback(dev)?;
            super::meta::write_meta(dev, new_offset, &bytes)?;
            dev.flush()?;
        }
        let old = self.header.snapshots_offset;
        let count =
            u32::try_from(snapshots.len()).map_err(|_| Error::invalid("snapshot table", "too many snapshots"))?;
        self.header.snapshots_offset = new_offset;
        self.header.nb_snapshots = count;
        self.overlap.snapshot_table_replaced();
        self.write_header(dev)?;
        dev.flush()?;
        if old_len > 0 && old != 0 {
            for cluster in old / cs..=(old + old_len - 1) / cs {
                self.free_later(cluster);
            }
        }
        self.writeback(dev)
    }
}

impl<D: BlockDevice> Image<D> {
    /// Replaces the snapshot table with `snapshots` (for repairs that rewrite entries), freeing the old table of
    /// `old_len` bytes.
    pub(crate) fn replace_snapshot_table(&self, snapshots: &[Snapshot], old_len: u64) -> Result<()> {
        self.check_writable("rewrite the snapshot table")?;
        let mut m = self.meta();
        m.replace_snapshot_table(&self.dev, snapshots, old_len)?;
        drop(m);
        self.dev.flush()
    }
}
