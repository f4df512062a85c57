//! Deleting a snapshot (`qcow2_snapshot_delete`).

use super::super::meta::Meta;
use super::{refused, SnapshotRefusal};
use crate::block::BlockDevice;
use crate::error::Result;
use crate::format::{snapshot_table_size, Snapshot};

const OP: &str = "delete a snapshot";

impl Meta {
    /// Deletes the first snapshot named `name`; see [`super`] for the order of writes.
    pub(in super::super) fn delete_snapshot(&mut self, dev: &dyn BlockDevice, name: &str) -> Result<Snapshot> {
        if self.data_file_size.is_some() {
            return Err(refused(OP, SnapshotRefusal::ExternalDataFile));
        }
        let mut table = self.snapshots(dev)?;
        let old_len = snapshot_table_size(&table);
        let Some(index) = table.iter().position(|s| s.name == name) else {
            return Err(refused(OP, SnapshotRefusal::NotFound { name: name.into() }));
        };
        let snapshot = table.remove(index);
        // Validated before anything changes, as QEMU validates it.
        let l1 = self.snapshot_l1(dev, &snapshot)?;

        self.reclaim.cancel_all_moves();
        self.writeback(dev)?;
        // The commit: once the table without the entry is durable, nothing reaches the snapshot's tree.
        self.replace_snapshot_table(dev, &table, old_len)?;
        self.lower_tree(dev, &l1)?;
        self.free_l1_clusters(dev, snapshot.l1_table_offset, u64::from(snapshot.l1_size))?;
        // Clusters the active layer now holds alone may be written in place again.
        self.recompute_active_copied(dev)?;
        self.writeback(dev)?;
        Ok(snapshot)
    }
}
