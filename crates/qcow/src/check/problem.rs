//! One finding of a check: what is wrong, where, and how serious it is.

use std::fmt;

/// How a finding counts in a [`CheckReport`](super::CheckReport), as `qemu-img check` counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Severity {
    /// Data may be corrupted, or further writes may corrupt it.
    Corruption,
    /// Space is wasted; no harm to data.
    Leak,
    /// The check itself could not examine something.
    CheckError,
    /// Detail about a finding already counted another way (for example the pointers to an over-referenced
    /// cluster, whose refcount mismatch is the corruption); not counted itself.
    Detail,
}

/// A structure of the image, named as the qcow2 specification names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Structure {
    /// The header, in cluster 0.
    Header,
    /// The refcount table.
    RefcountTable,
    /// A refcount block.
    RefcountBlock,
    /// The active L1 table.
    ActiveL1,
    /// The L1 table of an internal snapshot.
    SnapshotL1,
    /// An L2 table.
    L2Table,
    /// A guest data cluster.
    Data,
    /// Compressed guest data.
    CompressedData,
    /// The snapshot table.
    SnapshotTable,
    /// The bitmap directory.
    BitmapDirectory,
    /// A bitmap table.
    BitmapTable,
    /// A cluster of bitmap data.
    BitmapData,
}

impl Structure {
    /// The structure's name, as messages print it.
    pub fn name(self) -> &'static str {
        match self {
            Structure::Header => "header",
            Structure::RefcountTable => "refcount table",
            Structure::RefcountBlock => "refcount block",
            Structure::ActiveL1 => "active L1 table",
            Structure::SnapshotL1 => "snapshot L1 table",
            Structure::L2Table => "L2 table",
            Structure::Data => "data cluster",
            Structure::CompressedData => "compressed data",
            Structure::SnapshotTable => "snapshot table",
            Structure::BitmapDirectory => "bitmap directory",
            Structure::BitmapTable => "bitmap table",
            Structure::BitmapData => "bitmap data cluster",
        }
    }

    /// Whether two references of these kinds may legitimately point into one host cluster: L2 tables and data
    /// shared between the active tree and snapshots, and compressed clusters packed together.
    pub fn may_share_with(self, other: Structure) -> bool {
        self == other && matches!(self, Structure::L2Table | Structure::Data | Structure::CompressedData)
    }
}

impl fmt::Display for Structure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Who points at a cluster: the structure that holds the pointer and the byte offset of the pointer in the
/// image file (0 for header fields).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Referrer {
    /// What kind of structure the referenced cluster is, according to this pointer.
    pub target: Structure,
    /// File offset of the pointer itself.
    pub at: u64,
}

/// One inconsistency found by a check. `Display` prints one line, in `qemu-img check`'s words where it has some.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Problem {
    /// The stored refcount differs from the number of references the metadata implies.
    RefcountMismatch {
        /// Cluster index.
        cluster: u64,
        /// Refcount stored in the refcount blocks.
        stored: u64,
        /// References found by walking the metadata.
        references: u64,
    },
    /// The refcount of a cluster could not be read (its refcount block pointer is misaligned).
    RefcountUnreadable {
        /// Cluster index.
        cluster: u64,
        /// Index of the refcount table entry.
        table_index: u64,
    },
    /// A pointer targets a region that ends one cluster or more past the end of the file.
    OutsideFile {
        /// The pointer.
        referrer: Referrer,
        /// Target offset.
        offset: u64,
        /// Target length in bytes.
        len: u64,
    },
    /// A pointer that must be cluster aligned is not.
    Misaligned {
        /// The pointer.
        referrer: Referrer,
        /// The misaligned target offset.
        offset: u64,
    },
    /// A table entry has reserved bits set.
    ReservedBits {
        /// The table holding the entry.
        table: Structure,
        /// File offset of the entry.
        at: u64,
        /// The raw entry.
        entry: u64,
    },
    /// The COPIED flag of an L1 or L2 entry disagrees with the stored refcount (it must be set exactly when the
    /// refcount is 1).
    CopiedFlag {
        /// The table holding the entry.
        table: Structure,
        /// File offset of the entry.
        at: u64,
        /// The raw entry.
        entry: u64,
        /// The stored refcount of the cluster it points at.
        refcount: u64,
    },
    /// A compressed L2 entry is malformed (COPIED set, used with an external data file, or with a subcluster
    /// bitmap).
    BadCompressedEntry {
        /// File offset of the entry.
        at: u64,
        /// The raw entry.
        entry: u64,
        /// What is wrong with it.
        why: &'static str,
    },
    /// An extended L2 entry's subcluster bitmap contradicts itself or its entry.
    BadSubclusterBitmap {
        /// File offset of the entry.
        at: u64,
        /// The raw bitmap.
        bitmap: u64,
    },
    /// A cluster that holds metadata is also claimed by another structure.
    Overlap {
        /// File offset of the cluster.
        offset: u64,
        /// The structure that claimed it first.
        first: Structure,
        /// The structure that claims it again.
        second: Referrer,
    },
    /// A cluster is referenced more often than its refcount allows; every pointer to it is listed.
    SharedCluster {
        /// File offset of the cluster.
        offset: u64,
        /// Every pointer to it that the walk found.
        referrers: Vec<Referrer>,
    },
    /// Counting another reference would overflow the refcount width.
    RefcountOverflow {
        /// File offset of the cluster.
        offset: u64,
    },
    /// A refcount block is referenced more than once, or overlaps other metadata.
    RefcountBlockShared {
        /// Index of the refcount table entry.
        table_index: u64,
        /// References found.
        references: u64,
    },
    /// A snapshot's L1 table is misaligned or too large.
    BadSnapshotL1 {
        /// The snapshot's id.
        id: String,
        /// What is wrong.
        why: &'static str,
    },
    /// An L1 table is referenced by more than one owner.
    L1TableShared {
        /// Its file offset.
        offset: u64,
    },
    /// An L2 table appears twice in the same L1 table; its entries are counted once.
    L2TableRepeated {
        /// File offset of the repeated L1 entry.
        at: u64,
        /// The L2 table.
        offset: u64,
    },
    /// Snapshots exist in an image with an external data file.
    SnapshotsWithDataFile {
        /// How many.
        count: u32,
    },
    /// A structure could not be read or parsed, so what it references was not counted.
    Unreadable {
        /// The structure.
        what: Structure,
        /// Its offset.
        offset: u64,
        /// Why.
        why: String,
    },
    /// The refcount structures are broken in a way that only a rebuild can fix, and the repair mode does not
    /// allow one.
    NeedsRebuild,
    /// A snapshot table entry that only a rewrite of the table fixes.
    Snapshot(crate::format::SnapshotDefect),
    /// Refcounts were not repaired because part of the metadata could not be read: clusters only that part
    /// references would have looked free, and a repair would have freed them.
    RepairRefused,
    /// A finding that the repair fixed (counted in `corruptions_fixed` or `leaks_fixed`, not as found).
    Repaired(Box<Problem>),
    /// The header has a bitmaps extension but autoclear bit 0 is clear: a program without bitmap support wrote
    /// the image, so the bitmaps are not trusted and their clusters count as leaks. Not counted itself.
    StaleBitmaps {
        /// Whether a repair removed the extension from the header, as QEMU's read-write open does.
        removed: bool,
    },
}

impl Problem {
    /// How the finding counts.
    pub fn severity(&self) -> Severity {
        match self {
            Problem::RefcountMismatch { stored, references, .. } if stored > references => Severity::Leak,
            Problem::RefcountUnreadable { .. } | Problem::Unreadable { .. } | Problem::NeedsRebuild => {
                Severity::CheckError
            }
            // Sharing shows up as a refcount lower than the references, which is what QEMU counts (and what a
            // rebuild repairs, leaving the cluster shared and copied on write).
            Problem::Overlap { .. }
            | Problem::SharedCluster { .. }
            | Problem::L1TableShared { .. }
            | Problem::L2TableRepeated { .. }
            | Problem::Repaired(_)
            | Problem::RepairRefused
            | Problem::StaleBitmaps { .. } => Severity::Detail,
            _ => Severity::Corruption,
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::RefcountMismatch { cluster, stored, references } => {
                let word = if stored < references { "ERROR" } else { "Leaked" };
                write!(f, "{word} cluster {cluster} refcount={stored} reference={references}")
            }
            Problem::RefcountUnreadable { cluster, table_index } => write!(
                f,
                "Can't get refcount for cluster {cluster}: refcount table entry {table_index} is not cluster aligned"
            ),
            Problem::OutsideFile { referrer, offset, len } => write!(
                f,
                "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset \
                 {offset:#x} size {len:#x} ({} pointed at from {:#x})",
                referrer.target, referrer.at
            ),
            Problem::Misaligned { referrer, offset } => write!(
                f,
                "ERROR {} offset={offset:#x} is not cluster aligned (pointer at {:#x})",
                referrer.target, referrer.at
            ),
            Problem::ReservedBits { table, at, entry } => {
                write!(f, "ERROR found {table} entry with reserved bits set: {entry:x} (entry at {at:#x})")
            }
            Problem::CopiedFlag { table, at, entry, refcount } => {
                write!(f, "ERROR OFLAG_COPIED in {table} entry at {at:#x}: entry={entry:#x} refcount={refcount}")
            }
            Problem::BadCompressedEntry { at, entry, why } => {
                write!(f, "ERROR compressed cluster entry at {at:#x} ({entry:#x}): {why}")
            }
            Problem::BadSubclusterBitmap { at, bitmap } => {
                write!(f, "ERROR L2 entry at {at:#x} has a corrupted subcluster bitmap {bitmap:#x}")
            }
            Problem::Overlap { offset, first, second } => write!(
                f,
                "ERROR cluster at {offset:#x} is both a {first} and a {} (pointer at {:#x})",
                second.target, second.at
            ),
            Problem::SharedCluster { offset, referrers } => {
                write!(f, "ERROR cluster at {offset:#x} is referenced by")?;
                for (i, r) in referrers.iter().enumerate() {
                    let sep = if i == 0 { " " } else { ", " };
                    write!(f, "{sep}{} pointer at {:#x}", r.target, r.at)?;
                }
                Ok(())
            }
            Problem::RefcountOverflow { offset } => {
                write!(f, "ERROR: overflow cluster offset={offset:#x}: more references than the refcount width holds")
            }
            Problem::RefcountBlockShared { table_index, references } => {
                write!(f, "ERROR refcount block {table_index} refcount={references}")
            }
            // Names and messages from the image are arbitrary bytes: keep the report one line per finding.
            Problem::BadSnapshotL1 { id, why } => write!(f, "ERROR snapshot {}: {why}", id.escape_debug()),
            Problem::L1TableShared { offset } => write!(f, "ERROR L1 table at {offset:#x} is used more than once"),
            Problem::L2TableRepeated { at, offset } => {
                write!(f, "ERROR L1 entry at {at:#x} repeats L2 table {offset:#x} of the same L1 table")
            }
            Problem::SnapshotsWithDataFile { count } => {
                write!(f, "ERROR {count} snapshots in image with data file")
            }
            Problem::Unreadable { what, offset, why } => {
                write!(f, "ERROR cannot read {what} at {offset:#x}: {}", why.escape_debug())
            }
            Problem::NeedsRebuild => write!(f, "ERROR need to rebuild refcount structures"),
            Problem::Snapshot(crate::format::SnapshotDefect::ExtraDataDropped { index, size }) => write!(
                f,
                "ERROR snapshot table entry {index} has too much extra metadata ({size} > 1024): the excess is dropped"
            ),
            Problem::Snapshot(crate::format::SnapshotDefect::ExtraDataIncomplete { index, size }) => {
                write!(f, "ERROR snapshot table entry {index} is incomplete ({size} bytes of extra data, 16 required)")
            }
            Problem::RepairRefused => write!(
                f,
                "ERROR refcounts not repaired: part of the metadata could not be read, and what only it references \
                 would have been freed"
            ),
            Problem::StaleBitmaps { removed } => {
                // QEMU's warning, then what the repair did about it.
                f.write_str(
                    "a program lacking bitmap support modified this file, so all bitmaps are now considered \
                     inconsistent",
                )?;
                if *removed {
                    f.write_str("; the bitmaps extension is removed from the header")?;
                }
                Ok(())
            }
            Problem::Repaired(inner) => {
                let text = inner.to_string();
                let rest = text.strip_prefix("ERROR ").or_else(|| text.strip_prefix("Leaked ")).unwrap_or(&text);
                write!(f, "Repairing {rest}")
            }
        }
    }
}
