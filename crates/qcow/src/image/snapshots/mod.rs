//! Internal snapshots made, applied and deleted, as QEMU's qcow2 driver does it (`block/qcow2-snapshot.c`).
//!
//! A snapshot is a copy of the active L1 table plus one more reference to everything that table reaches; its
//! entry in the snapshot table is what makes it exist. Each operation orders its writes around one commit point,
//! a single header write that durably switches from the old state to the new one:
//! - **create** ([`create`]): refcounts of the active tree raised by one, COPIED cleared in the active tables, the
//!   L1 copy written, then the new snapshot table written and the header switched to it; the old table is freed.
//! - **apply** ([`apply`]): refcounts of the snapshot's tree raised by one and its tables' stale COPIED flags
//!   cleared, a new active L1 table (the snapshot's, resized to its disk size) written, then the header switched
//!   to it (L1 offset, L1 size and virtual size in one sector); the old active tree is then released.
//! - **delete** ([`delete`]): the snapshot table rewritten without the entry (the commit), then the snapshot's
//!   tree released and COPIED set again where a cluster is left with one reference.
//!
//! Before the commit a crash leaves leaks (refcounts raised for references that never came to be); after it,
//! leaks (refcounts not yet lowered). QEMU's check also counts a COPIED flag that disagrees with a refcount, and
//! two such states cannot be avoided by any order of writes, because the flag and the refcount live in different
//! clusters: during create, an active entry may still carry COPIED over a refcount already raised to two (the
//! cluster has one reference: writing it in place is what COPIED allows, and right); during delete, an active
//! entry may lack COPIED over a refcount already lowered to one (it is copied on write once more than needed).
//! Neither can lose data. Apply has no such window.
//!
//! Guest I/O waits while an operation runs: each takes the resize lock for writing, as offline compaction does,
//! and holds the metadata lock throughout. Data moves of the reclaimer in flight are cancelled, since the tables
//! they would relink change wholesale. Bitmaps are not touched. Applying a snapshot does not yet mark AUTO
//! bitmaps dirty: the bitmap engine that would is not part of this version (see `image/snapshot.rs`: a
//! read-write open clears the bitmaps' autoclear bit, so QEMU does not trust them anyway).

mod apply;
mod create;
mod delete;
mod tree;

use super::meta::Meta;
use super::Image;
use crate::block::BlockDevice;
use crate::error::{Error, ErrorKind, Result};
use crate::format::Snapshot;

/// QEMU's `QCOW_MAX_SNAPSHOTS`: the most snapshots an image may have.
pub const MAX_SNAPSHOTS: usize = 65536;
/// The longest name QEMU can give a snapshot: its `QEMUSnapshotInfo` holds 256 bytes, the last a NUL.
pub const MAX_SNAPSHOT_NAME: usize = 255;

/// Why a snapshot operation was refused; nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotRefusal {
    /// No snapshot has that name (or ID, where IDs are looked up).
    #[error("no snapshot {name:?}")]
    NotFound {
        /// The name (or ID) asked for.
        name: String,
    },
    /// A snapshot with that name exists already.
    #[error("a snapshot named {name:?} exists already (ID {id})")]
    NameExists {
        /// The name asked for.
        name: String,
        /// The existing snapshot's ID.
        id: String,
    },
    /// The ID the next-ID rule gives is taken (only after IDs wrapped around).
    #[error("the next snapshot ID, {id}, is taken")]
    IdTaken {
        /// The ID.
        id: String,
    },
    /// The name is longer than QEMU can hold.
    #[error("the snapshot name is {len} bytes long, at most 255 allowed")]
    NameTooLong {
        /// The name's length in bytes.
        len: usize,
    },
    /// The name contains a NUL byte, which QEMU would read as its end.
    #[error("the snapshot name contains a NUL byte")]
    NameHasNul,
    /// The image has QEMU's maximum of snapshots already.
    #[error("the image has 65536 snapshots already, the most QEMU allows")]
    TooMany,
    /// The new snapshot table would pass QEMU's 64 MiB limit.
    #[error("the snapshot table would take {bytes:#x} bytes, at most 0x4000000 allowed")]
    TableTooLarge {
        /// The size the table would have.
        bytes: u64,
    },
    /// The image keeps its guest data in an external data file, whose clusters have no refcounts to share.
    #[error("internal snapshots are not supported with an external data file")]
    ExternalDataFile,
    /// A cluster's refcount is at the most its width can hold, so it cannot gain the snapshot's reference.
    #[error("the refcount of the cluster at {offset:#x} is at the most refcount_bits allows")]
    RefcountOverflow {
        /// The cluster's host offset.
        offset: u64,
    },
}

impl SnapshotRefusal {
    /// The coarse kind: `Unsupported` for an external data file, `InvalidArgument` otherwise.
    pub fn kind(&self) -> ErrorKind {
        match self {
            SnapshotRefusal::ExternalDataFile => ErrorKind::Unsupported,
            _ => ErrorKind::InvalidArgument,
        }
    }
}

fn refused(op: &'static str, why: SnapshotRefusal) -> Error {
    Error::Snapshot { op, why }
}

/// QEMU's next-ID rule (`find_new_snapshot_id`): one more than the largest ID read as C's `strtoul` reads it,
/// so "7" and "7a" both count as 7 and a name-like ID as 0.
pub(crate) fn next_snapshot_id(snapshots: &[Snapshot]) -> String {
    let max = snapshots.iter().map(|s| strtoul(&s.id)).max().unwrap_or(0);
    max.wrapping_add(1).to_string()
}

/// C's `strtoul(s, NULL, 10)` on a 64-bit target: leading white space, an optional sign, decimal digits;
/// `u64::MAX` on overflow; a minus sign negates (modulo 2^64); no digits reads as 0.
fn strtoul(s: &str) -> u64 {
    let bytes = s.as_bytes();
    let mut i = bytes.iter().take_while(|b| matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')).count();
    let negative = match bytes.get(i) {
        Some(b'-') => {
            i += 1;
            true
        }
        Some(b'+') => {
            i += 1;
            false
        }
        _ => false,
    };
    let mut value: u64 = 0;
    let mut overflow = false;
    for b in bytes.iter().skip(i).take_while(|b| b.is_ascii_digit()) {
        match value.checked_mul(10).and_then(|v| v.checked_add(u64::from(b - b'0'))) {
            Some(v) => value = v,
            None => overflow = true,
        }
    }
    if overflow {
        u64::MAX
    } else if negative {
        value.wrapping_neg()
    } else {
        value
    }
}

/// The wall clock as QEMU stamps a snapshot: seconds (modulo 2^32, as its 32-bit field keeps them) and the
/// microseconds of `gettimeofday` as nanoseconds.
fn snapshot_date() -> (u32, u32) {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    ((now.as_secs() & u64::from(u32::MAX)) as u32, now.subsec_micros() * 1000)
}

impl<D: BlockDevice> Image<D> {
    /// Takes an internal snapshot of the active layer, named `name`, as `qemu-img snapshot -c` does: ID by QEMU's
    /// next-ID rule, the wall clock as its date, no VM state, the current virtual size. Returns the new entry.
    ///
    /// Guest I/O waits while it runs. Everything is durable on return.
    ///
    /// # Errors
    /// [`Error::Snapshot`], changing nothing, for an external data file, a name that is taken, longer than 255
    /// bytes or holds a NUL, 65536 snapshots already, a table past 64 MiB, or a refcount at its width's limit;
    /// `ReadOnly`, `Corrupt`, `Io`. A failure after the first write leaks clusters at most.
    pub fn snapshot_create(&self, name: &str) -> Result<Snapshot> {
        self.observe(self.snapshot_op("create a snapshot", |m, dev| m.create_snapshot(dev, name, snapshot_date())))
    }

    /// Reverts the active layer to the snapshot whose ID is `id_or_name`, or else the first one named so (QEMU's
    /// lookup for `qemu-img snapshot -a`), resizing the image to the snapshot's disk size when it differs.
    /// Returns the snapshot applied.
    ///
    /// # Errors
    /// [`Error::Snapshot`], changing nothing, when no snapshot matches, for an external data file, or for a
    /// refcount at its width's limit; `ReadOnly`, `Corrupt` (also for a snapshot whose L1 table is malformed),
    /// `Io`. A failure after the first write leaks clusters at most.
    pub fn snapshot_apply(&self, id_or_name: &str) -> Result<Snapshot> {
        self.observe(self.snapshot_apply_locked(id_or_name))
    }

    /// Applies with guest I/O held off, keeping the persistent bitmaps true: marked in use before the active layer
    /// changes, then resized with it and, where enabled, made wholly dirty.
    fn snapshot_apply_locked(&self, id_or_name: &str) -> Result<Snapshot> {
        self.check_writable("apply a snapshot")?;
        let mut tracking = self.resize.write().unwrap_or_else(|e| e.into_inner());
        self.bitmaps_before_apply(&mut tracking)?;
        let mut m = self.meta();
        let result = m.apply_snapshot(&self.dev, id_or_name);
        let size = m.header.size;
        self.size.store(size, std::sync::atomic::Ordering::Release);
        drop(m);
        // A refusal changed nothing; any other failure may have switched the active layer, so the bitmaps are
        // dirtied then too: too many dirty bits cost a backup time, too few would make it wrong.
        if !matches!(result, Err(Error::Snapshot { .. })) {
            self.bitmaps_after_apply(size, &mut tracking);
        }
        let snapshot = result?;
        self.dev.flush()?;
        Ok(snapshot)
    }

    /// Deletes the first snapshot named `name` (the lookup of `qemu-img snapshot -d`: by name only) and releases
    /// what only it referenced. Returns the entry deleted.
    ///
    /// # Errors
    /// [`Error::Snapshot`], changing nothing, when no snapshot has that name or for an external data file;
    /// `ReadOnly`, `Corrupt` (also for a snapshot whose L1 table is malformed), `Io`. A failure after the table
    /// was rewritten leaks clusters at most.
    pub fn snapshot_delete(&self, name: &str) -> Result<Snapshot> {
        self.observe(self.snapshot_op("delete a snapshot", |m, dev| m.delete_snapshot(dev, name)))
    }

    /// Runs a snapshot operation with guest I/O held off, then makes it durable and publishes the virtual size
    /// (which applying a snapshot may change).
    fn snapshot_op(
        &self,
        op: &'static str,
        f: impl FnOnce(&mut Meta, &dyn BlockDevice) -> Result<Snapshot>,
    ) -> Result<Snapshot> {
        self.check_writable(op)?;
        let _exclusive = self.resize.write().unwrap_or_else(|e| e.into_inner());
        let mut m = self.meta();
        let result = f(&mut m, &self.dev);
        self.size.store(m.header.size, std::sync::atomic::Ordering::Release);
        drop(m);
        let snapshot = result?;
        self.dev.flush()?;
        Ok(snapshot)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn with_ids(ids: &[&str]) -> Vec<Snapshot> {
        ids.iter().map(|id| Snapshot { id: (*id).into(), ..Snapshot::default() }).collect()
    }

    #[test]
    fn the_next_id_follows_qemus_strtoul_rule() {
        assert_eq!(next_snapshot_id(&[]), "1");
        assert_eq!(next_snapshot_id(&with_ids(&["1", "2"])), "3");
        assert_eq!(next_snapshot_id(&with_ids(&["7a", "3"])), "8");
        assert_eq!(next_snapshot_id(&with_ids(&["name", " +12", "\t4"])), "13");
        assert_eq!(next_snapshot_id(&with_ids(&["99999999999999999999999"])), "0");
        assert_eq!(next_snapshot_id(&with_ids(&["-2"])), u64::MAX.to_string());
    }
}
