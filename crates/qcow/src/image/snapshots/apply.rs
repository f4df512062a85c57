//! Reverting the active layer to a snapshot (`qcow2_snapshot_goto`).

use super::super::meta::{write_meta, Meta};
use super::create::l1_bytes;
use super::{refused, SnapshotRefusal};
use crate::block::BlockDevice;
use crate::error::{Error, Result};
use crate::format::Snapshot;

const OP: &str = "apply a snapshot";
/// QEMU's cap on the L1 table, in entries.
const MAX_L1_ENTRIES: u64 = (32 << 20) / 8;

impl Meta {
    /// Applies the snapshot whose ID, or else name, is `id_or_name`; see [`super`] for the order of writes.
    pub(in super::super) fn apply_snapshot(&mut self, dev: &dyn BlockDevice, id_or_name: &str) -> Result<Snapshot> {
        if self.data_file_size.is_some() {
            return Err(refused(OP, SnapshotRefusal::ExternalDataFile));
        }
        let table = self.snapshots(dev)?;
        let found = table.iter().find(|s| s.id == id_or_name).or_else(|| table.iter().find(|s| s.name == id_or_name));
        let Some(snapshot) = found.cloned() else {
            return Err(refused(OP, SnapshotRefusal::NotFound { name: id_or_name.into() }));
        };
        let snapshot_l1 = self.snapshot_l1(dev, &snapshot)?;
        // QEMU assumes the current size for an entry that does not record one.
        let size = snapshot.disk_size().unwrap_or(self.header.size);
        if size % 512 != 0 {
            return Err(Error::corrupt("snapshot disk size is not a multiple of 512", self.header.snapshots_offset));
        }
        let entries = u64::from(snapshot.l1_size).max(self.geo.l1_entries_for(size));
        if entries > MAX_L1_ENTRIES {
            return Err(Error::corrupt(
                "snapshot disk size needs an L1 table over 32 MiB",
                self.header.snapshots_offset,
            ));
        }

        self.reclaim.cancel_all_moves();
        self.writeback(dev)?;
        let old_l1 = self.active_l1(dev)?;
        // The new active tree is counted before anything points at it.
        self.raise_tree(dev, OP, &snapshot_l1)?;
        // Its tables are shared with the snapshot now; flags a snapshot kept from earlier times must not let a
        // write go in place.
        self.clear_copied_below(dev, &snapshot_l1)?;
        let cs = self.geo.cluster_size();
        let offset = if entries > 0 { self.alloc_clusters(dev, self.geo.clusters_for(entries * 8))? * cs } else { 0 };
        self.forget_cached(offset, entries);
        self.writeback(dev)?;
        if entries > 0 {
            write_meta(dev, offset, &l1_bytes(&snapshot_l1, entries))?;
        }
        dev.flush()?;

        // The commit: L1 offset, L1 size and virtual size change in one header sector.
        let (old_offset, old_entries) = (self.header.l1_table_offset, self.l1_size());
        self.forget_cached(old_offset, old_entries);
        self.header.l1_table_offset = offset;
        self.header.l1_size = entries as u32;
        self.header.size = size;
        self.overlap.l1_replaced();
        self.write_header(dev)?;
        dev.flush()?;

        self.lower_tree(dev, &old_l1)?;
        self.free_l1_clusters(dev, old_offset, old_entries)?;
        self.recompute_active_copied(dev)?;
        self.writeback(dev)?;
        Ok(snapshot)
    }
}
