//! Taking a snapshot of the active layer (`qcow2_snapshot_create`).

use super::super::meta::{write_meta, Meta};
use super::{next_snapshot_id, refused, SnapshotRefusal, MAX_SNAPSHOTS, MAX_SNAPSHOT_NAME};
use crate::block::BlockDevice;
use crate::error::Result;
use crate::format::{snapshot_table_size, L1Entry, Snapshot, MAX_SNAPSHOT_TABLE_BYTES};

const OP: &str = "create a snapshot";

/// The extra data QEMU 10 writes for a snapshot taken by qemu-img: `vm_state_size_large` 0, `disk_size`, and an
/// `icount` of 0 (qemu-img's zeroed snapshot info; a VM outside record/replay would write -1).
fn extra_data(disk_size: u64) -> Vec<u8> {
    [0u64, disk_size, 0].iter().flat_map(|v| v.to_be_bytes()).collect()
}

/// The bytes of an L1 table holding `entries`, COPIED cleared, zero padded to `len` entries and to a sector.
pub(super) fn l1_bytes(entries: &[L1Entry], len: u64) -> Vec<u8> {
    let mut bytes: Vec<u8> = entries.iter().flat_map(|e| e.with_copied(false).0.to_be_bytes()).collect();
    bytes.resize((len * 8).next_multiple_of(512) as usize, 0);
    bytes
}

impl Meta {
    /// Creates the snapshot `name` dated `date` (seconds, nanoseconds); see [`super`] for the order of writes.
    pub(in super::super) fn create_snapshot(
        &mut self,
        dev: &dyn BlockDevice,
        name: &str,
        date: (u32, u32),
    ) -> Result<Snapshot> {
        if self.data_file_size.is_some() {
            return Err(refused(OP, SnapshotRefusal::ExternalDataFile));
        }
        if name.len() > MAX_SNAPSHOT_NAME {
            return Err(refused(OP, SnapshotRefusal::NameTooLong { len: name.len() }));
        }
        if name.contains('\0') {
            return Err(refused(OP, SnapshotRefusal::NameHasNul));
        }
        let old = self.snapshots(dev)?;
        if old.len() >= MAX_SNAPSHOTS {
            return Err(refused(OP, SnapshotRefusal::TooMany));
        }
        if let Some(s) = old.iter().find(|s| s.name == name) {
            return Err(refused(OP, SnapshotRefusal::NameExists { name: name.into(), id: s.id.clone() }));
        }
        let id = next_snapshot_id(&old);
        if old.iter().any(|s| s.id == id) {
            return Err(refused(OP, SnapshotRefusal::IdTaken { id }));
        }
        let mut snapshot = Snapshot {
            l1_table_offset: 0,
            l1_size: self.header.l1_size,
            id,
            name: name.into(),
            date_sec: date.0,
            date_nsec: date.1,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            extra: extra_data(self.header.size),
        };
        let mut table = old.clone();
        table.push(snapshot.clone());
        let bytes = snapshot_table_size(&table);
        if bytes > MAX_SNAPSHOT_TABLE_BYTES {
            return Err(refused(OP, SnapshotRefusal::TableTooLarge { bytes }));
        }

        self.reclaim.cancel_all_moves();
        self.writeback(dev)?;
        let l1 = self.active_l1(dev)?;
        // Every reference the copy adds is counted before anything points at the copy.
        self.raise_tree(dev, OP, &l1)?;
        // The active tables are shared now: every write to them must copy first.
        self.clear_copied_below(dev, &l1)?;
        for (index, entry) in l1.iter().enumerate() {
            if entry.is_copied() {
                self.set_l1_entry(dev, index as u64, entry.with_copied(false))?;
            }
        }
        let entries = l1.len() as u64;
        if entries > 0 {
            let cs = self.geo.cluster_size();
            snapshot.l1_table_offset = self.alloc_clusters(dev, self.geo.clusters_for(entries * 8))? * cs;
            self.forget_cached(snapshot.l1_table_offset, entries);
        }
        // Refcounts, then the cleared flags, are durable before the copy and long before the table names it.
        self.writeback(dev)?;
        if entries > 0 {
            write_meta(dev, snapshot.l1_table_offset, &l1_bytes(&l1, entries))?;
        }
        dev.flush()?;
        if let Some(last) = table.last_mut() {
            last.l1_table_offset = snapshot.l1_table_offset;
        }
        // The commit: the header switches to the new table.
        self.replace_snapshot_table(dev, &table, snapshot_table_size(&old))?;
        Ok(snapshot)
    }
}
