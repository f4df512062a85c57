//! The internal snapshot table: parsing it from the bytes at `snapshots_offset`, validating each snapshot's L1
//! pointer, and writing the table back.
//!
//! Each entry is a fixed 40-byte part (`u64 l1_table_offset, u32 l1_size, u16 id_size, u16 name_size,
//! u32 date_sec, u32 date_nsec, u64 vm_clock_nsec, u32 vm_state_size, u32 extra_data_size`), then the extra data,
//! the ID and the name. Every entry starts on an 8-byte boundary of the table; the last one is not padded, so the
//! table (and, as qemu-img leaves it, the whole file) may end on any byte.
//!
//! Invariants kept by a parsed [`Snapshot`]:
//! - `extra` holds the entry's extra data verbatim, known fields and unknown ones alike, so that rewriting the
//!   table loses nothing a newer writer stored there;
//! - `extra` is at most [`MAX_SNAPSHOT_EXTRA_DATA`] bytes, and at least 16 in a version 3 image;
//! - `serialize_snapshot_table(&parse_snapshot_table(b, n, v)?)` reproduces the first
//!   [`snapshot_table_size`] bytes of `b` exactly, provided the IDs and names are valid UTF-8 (they are read
//!   lossily; qemu-img only writes UTF-8).
//!
//! The L1 table a snapshot points at is checked by [`Snapshot::validate`], which needs the cluster size; QEMU
//! checks it only when a snapshot is used or the image is checked, not at open.

use super::header::{MAX_L1_BYTES, MAX_SNAPSHOTS, SNAPSHOT_HEADER_BYTES};

/// QEMU's `QCOW_MAX_SNAPSHOT_EXTRA_DATA`: the most extra data one entry may carry.
pub const MAX_SNAPSHOT_EXTRA_DATA: u32 = 1024;
/// QEMU's `QCOW_MAX_SNAPSHOTS_SIZE`: the largest snapshot table it reads (64 MiB).
pub const MAX_SNAPSHOT_TABLE_BYTES: u64 = 64 << 20;
/// The extra data every version 3 entry must have: `vm_state_size_large` and `disk_size`.
const MIN_V3_EXTRA_DATA: u32 = 16;
/// The fixed part of an entry, as a `usize` for slicing.
const FIXED: usize = SNAPSHOT_HEADER_BYTES as usize;

/// A snapshot table entry failed to parse or to validate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// `nb_snapshots` is above QEMU's limit.
    #[error("too many snapshots: {count}, at most 65536")]
    TooMany {
        /// The snapshot count from the header.
        count: u32,
    },
    /// The table ends inside an entry.
    #[error(
        "snapshot table entry {index} at table offset {offset:#x} truncated: needs {needed:#x} bytes of the table, \
         only {available:#x} available"
    )]
    Truncated {
        /// The entry's index.
        index: u32,
        /// Where the entry starts, relative to `snapshots_offset`.
        offset: u64,
        /// The table length the entry needs, counted from the start of the table.
        needed: u64,
        /// The bytes there are.
        available: u64,
    },
    /// An entry has more extra data than QEMU accepts.
    #[error(
        "snapshot table entry {index} at table offset {offset:#x} has {size:#x} bytes of extra data, at most 0x400"
    )]
    ExtraDataTooLarge {
        /// The entry's index.
        index: u32,
        /// Where the entry starts, relative to `snapshots_offset`.
        offset: u64,
        /// The `extra_data_size` found.
        size: u32,
    },
    /// A version 3 entry lacks the 16 bytes of extra data (`vm_state_size_large`, `disk_size`) version 3 requires.
    #[error(
        "version 3 snapshot table entry {index} at table offset {offset:#x} has {size:#x} bytes of extra data, at \
         least 0x10 required"
    )]
    ExtraDataIncomplete {
        /// The entry's index.
        index: u32,
        /// Where the entry starts, relative to `snapshots_offset`.
        offset: u64,
        /// The `extra_data_size` found.
        size: u32,
    },
    /// The table grows past QEMU's 64 MiB limit.
    #[error("snapshot table too large: entry {index} ends at table offset {end:#x}, at most 0x4000000 allowed")]
    TableTooLarge {
        /// The entry that crossed the limit.
        index: u32,
        /// Where it ends, relative to `snapshots_offset`.
        end: u64,
    },
    /// A snapshot's L1 table does not start on a cluster boundary.
    #[error("snapshot {id} L1 table offset {offset:#x} is not aligned to a cluster")]
    L1Misaligned {
        /// The snapshot's ID, as read from the image.
        id: String,
        /// The `l1_table_offset` found.
        offset: u64,
    },
    /// A snapshot's L1 table is larger than QEMU's 32 MiB L1 limit.
    #[error("snapshot {id} L1 table too large: {l1_size:#x} entries, at most 0x400000")]
    L1TooLarge {
        /// The snapshot's ID, as read from the image.
        id: String,
        /// The `l1_size` found.
        l1_size: u32,
    },
    /// A snapshot's L1 table would end past the largest signed 64-bit file offset.
    #[error("snapshot {id} L1 table at {offset:#x} with {l1_size:#x} entries overflows the file offset range")]
    L1Overflow {
        /// The snapshot's ID, as read from the image.
        id: String,
        /// The `l1_table_offset` found.
        offset: u64,
        /// The `l1_size` found.
        l1_size: u32,
    },
}

/// One internal snapshot: a frozen L1 table plus the metadata QEMU keeps about it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Snapshot {
    /// Host offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Number of entries in that L1 table.
    pub l1_size: u32,
    /// The unique ID (qemu-img numbers them "1", "2", ...).
    pub id: String,
    /// The user-visible name.
    pub name: String,
    /// Creation time, seconds since the Unix epoch.
    pub date_sec: u32,
    /// Creation time, nanoseconds part.
    pub date_nsec: u32,
    /// The guest's virtual clock when the snapshot was taken, in nanoseconds.
    pub vm_clock_nsec: u64,
    /// Size of the saved VM state; 0 when there is none or when it does not fit 32 bits (see
    /// [`Snapshot::vm_state_size_large`]).
    pub vm_state_size: u32,
    /// The extra data, verbatim: `u64 vm_state_size_large, u64 disk_size, u64 icount` as far as present, then
    /// anything newer, preserved.
    pub extra: Vec<u8>,
}

impl Snapshot {
    /// The 64-bit VM state size from the extra data, when the entry has it.
    pub fn vm_state_size_large(&self) -> Option<u64> {
        extra_u64(&self.extra, 0)
    }

    /// The virtual disk size when the snapshot was taken, when the entry records it (QEMU assumes the current
    /// size otherwise).
    pub fn disk_size(&self) -> Option<u64> {
        extra_u64(&self.extra, 8)
    }

    /// The instruction count of record/replay mode, when the entry records it. qemu-img 10 writes 0 here for a
    /// snapshot taken outside replay.
    pub fn icount(&self) -> Option<u64> {
        extra_u64(&self.extra, 16)
    }

    /// The VM state size as QEMU reads it: the 64-bit field when present, else the 32-bit one.
    pub fn vm_state_bytes(&self) -> u64 {
        self.vm_state_size_large().unwrap_or(u64::from(self.vm_state_size))
    }

    /// Checks the snapshot's L1 table pointer the way `qemu-img check` does: cluster aligned, at most 32 MiB of
    /// entries, and no overflow of a signed 64-bit file offset. `cluster_size` must be a power of two.
    ///
    /// # Errors
    /// [`SnapshotError::L1TooLarge`], [`SnapshotError::L1Overflow`] or [`SnapshotError::L1Misaligned`], each
    /// naming the snapshot by its ID.
    pub fn validate(&self, cluster_size: u64) -> Result<(), SnapshotError> {
        let bytes = u64::from(self.l1_size) * 8;
        if bytes > MAX_L1_BYTES {
            return Err(SnapshotError::L1TooLarge { id: self.id.clone(), l1_size: self.l1_size });
        }
        // QEMU hands offsets to functions taking int64_t, so the table must end below i64::MAX.
        if self.l1_table_offset.checked_add(bytes).is_none_or(|end| end > i64::MAX as u64) {
            return Err(SnapshotError::L1Overflow {
                id: self.id.clone(),
                offset: self.l1_table_offset,
                l1_size: self.l1_size,
            });
        }
        if self.l1_table_offset & cluster_size.wrapping_sub(1) != 0 {
            return Err(SnapshotError::L1Misaligned { id: self.id.clone(), offset: self.l1_table_offset });
        }
        Ok(())
    }

    /// Bytes the entry takes on disk, without the padding that aligns the next entry.
    fn disk_len(&self) -> u64 {
        SNAPSHOT_HEADER_BYTES + len_u64(self.extra.len()) + len_u64(self.id.len()) + len_u64(self.name.len())
    }
}

/// Parses `count` snapshot table entries from `bytes`, the table as read from `snapshots_offset`.
///
/// `bytes` may be longer than the table (the caller typically reads up to 64 MiB, bounded by the end of the
/// file); only what the entries describe is looked at. `version` is the image's qcow2 version; version 3 entries
/// must carry at least 16 bytes of extra data. Nothing is allocated in proportion to `count` beyond what `bytes`
/// can actually hold.
///
/// # Errors
/// [`SnapshotError::TooMany`] for a `count` above 65536; for the first bad entry,
/// [`SnapshotError::Truncated`], [`SnapshotError::ExtraDataTooLarge`], [`SnapshotError::ExtraDataIncomplete`] or
/// [`SnapshotError::TableTooLarge`].
pub fn parse_snapshot_table(bytes: &[u8], count: u32, version: u32) -> Result<Vec<Snapshot>, SnapshotError> {
    parse_entries(bytes, count, version, false).map(|(snaps, _, _)| snaps)
}

/// Something wrong with a snapshot table entry that a check reports and a repair fixes by rewriting the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotDefect {
    /// The entry had more than 1024 bytes of extra data; only the first 1024 were kept.
    ExtraDataDropped {
        /// The entry's index.
        index: u32,
        /// The `extra_data_size` found.
        size: u32,
    },
    /// A version 3 entry with less than the 16 bytes of extra data version 3 requires.
    ExtraDataIncomplete {
        /// The entry's index.
        index: u32,
        /// The `extra_data_size` found.
        size: u32,
    },
}

/// Parses the snapshot table as `qemu-img check` reads it: an entry lacking version 3's extra data is kept and
/// reported, and with `drop_excess` (a repair) an entry with too much extra data keeps its first 1024 bytes and is
/// reported; without it, too much extra data is still an error. Also returns the bytes the table occupies on
/// disk as found (which `snapshot_table_size` of the kept entries may undercount).
///
/// # Errors
/// As [`parse_snapshot_table`], less the defects above.
pub fn parse_snapshot_table_for_check(
    bytes: &[u8],
    count: u32,
    version: u32,
    drop_excess: bool,
) -> Result<(Vec<Snapshot>, Vec<SnapshotDefect>, u64), SnapshotError> {
    parse_entries(bytes, count, version, true).and_then(|(snaps, defects, len)| {
        match defects.iter().find(|d| matches!(d, SnapshotDefect::ExtraDataDropped { .. })) {
            Some(&SnapshotDefect::ExtraDataDropped { index, size }) if !drop_excess => {
                Err(SnapshotError::ExtraDataTooLarge { index, offset: 0, size })
            }
            _ => Ok((snaps, defects, len)),
        }
    })
}

fn parse_entries(
    bytes: &[u8],
    count: u32,
    version: u32,
    lenient: bool,
) -> Result<(Vec<Snapshot>, Vec<SnapshotDefect>, u64), SnapshotError> {
    if count > MAX_SNAPSHOTS {
        return Err(SnapshotError::TooMany { count });
    }
    // A lying count must not reserve memory: each entry needs at least its fixed part.
    let fit = bytes.len() / FIXED;
    let mut snaps = Vec::with_capacity(usize::try_from(count).map_or(fit, |c| c.min(fit)));
    let mut offset: u64 = 0;
    let mut defects = Vec::new();
    for index in 0..count {
        offset = round_up8(offset);
        let at = |needed: u64| SnapshotError::Truncated { index, offset, needed, available: len_u64(bytes.len()) };
        let fixed = slice(bytes, offset, SNAPSHOT_HEADER_BYTES).ok_or_else(|| at(offset + SNAPSHOT_HEADER_BYTES))?;
        let mut r = Reader(fixed);
        let l1_table_offset = r.u64();
        let l1_size = r.u32();
        let id_size = r.u16();
        let name_size = r.u16();
        let date_sec = r.u32();
        let date_nsec = r.u32();
        let vm_clock_nsec = r.u64();
        let vm_state_size = r.u32();
        let extra_size = r.u32();
        // QEMU rejects oversized extra data before reading any of it, so the size never drives a large read.
        if extra_size > MAX_SNAPSHOT_EXTRA_DATA {
            if !lenient {
                return Err(SnapshotError::ExtraDataTooLarge { index, offset, size: extra_size });
            }
            defects.push(SnapshotDefect::ExtraDataDropped { index, size: extra_size });
        }
        if version >= 3 && extra_size < MIN_V3_EXTRA_DATA {
            if !lenient {
                return Err(SnapshotError::ExtraDataIncomplete { index, offset, size: extra_size });
            }
            defects.push(SnapshotDefect::ExtraDataIncomplete { index, size: extra_size });
        }
        // Every length is at most 16 or 32 bits and already bounded, so these sums cannot overflow a u64.
        let extra_at = offset + SNAPSHOT_HEADER_BYTES;
        let id_at = extra_at + u64::from(extra_size);
        let name_at = id_at + u64::from(id_size);
        let end = name_at + u64::from(name_size);
        if end > MAX_SNAPSHOT_TABLE_BYTES {
            return Err(SnapshotError::TableTooLarge { index, end });
        }
        let kept = extra_size.min(MAX_SNAPSHOT_EXTRA_DATA);
        let extra = slice(bytes, extra_at, u64::from(kept)).ok_or_else(|| at(end))?;
        let id = slice(bytes, id_at, u64::from(id_size)).ok_or_else(|| at(end))?;
        let name = slice(bytes, name_at, u64::from(name_size)).ok_or_else(|| at(end))?;
        snaps.push(Snapshot {
            l1_table_offset,
            l1_size,
            id: String::from_utf8_lossy(id).into_owned(),
            name: String::from_utf8_lossy(name).into_owned(),
            date_sec,
            date_nsec,
            vm_clock_nsec,
            vm_state_size,
            extra: extra.to_vec(),
        });
        offset = end;
    }
    Ok((snaps, defects, offset))
}

/// The length of the table [`serialize_snapshot_table`] writes for `snaps`: entries aligned to 8 bytes, the last
/// one unpadded. This is QEMU's `snapshots_size`, the byte range to refcount.
pub fn snapshot_table_size(snaps: &[Snapshot]) -> u64 {
    snaps.iter().fold(0u64, |end, s| round_up8(end).saturating_add(s.disk_len()))
}

/// Writes `snaps` as a snapshot table, laid out as QEMU lays it out: each entry at the next 8-byte boundary, zero
/// padding between entries, none after the last. The exact inverse of [`parse_snapshot_table`].
///
/// Fields are written verbatim: the caller keeps `extra` within [`MAX_SNAPSHOT_EXTRA_DATA`] (and at least 16
/// bytes for version 3), and IDs and names within 65535 bytes; longer ones are cut to what their length fields
/// can express.
pub fn serialize_snapshot_table(snaps: &[Snapshot]) -> Vec<u8> {
    let mut out = Vec::with_capacity(usize::try_from(snapshot_table_size(snaps)).unwrap_or(0));
    for s in snaps {
        out.resize(out.len().next_multiple_of(8), 0);
        let extra = s.extra.get(..s.extra.len().min(u32::MAX as usize)).unwrap_or(&[]);
        let id = s.id.as_bytes().get(..s.id.len().min(usize::from(u16::MAX))).unwrap_or(&[]);
        let name = s.name.as_bytes().get(..s.name.len().min(usize::from(u16::MAX))).unwrap_or(&[]);
        out.extend_from_slice(&s.l1_table_offset.to_be_bytes());
        out.extend_from_slice(&s.l1_size.to_be_bytes());
        out.extend_from_slice(&u16::try_from(id.len()).unwrap_or(u16::MAX).to_be_bytes());
        out.extend_from_slice(&u16::try_from(name.len()).unwrap_or(u16::MAX).to_be_bytes());
        out.extend_from_slice(&s.date_sec.to_be_bytes());
        out.extend_from_slice(&s.date_nsec.to_be_bytes());
        out.extend_from_slice(&s.vm_clock_nsec.to_be_bytes());
        out.extend_from_slice(&s.vm_state_size.to_be_bytes());
        out.extend_from_slice(&u32::try_from(extra.len()).unwrap_or(u32::MAX).to_be_bytes());
        out.extend_from_slice(extra);
        out.extend_from_slice(id);
        out.extend_from_slice(name);
    }
    out
}

/// Reads big-endian fields in order from a slice known to be long enough; a short slice reads as zeros rather
/// than panicking (callers slice exactly the fixed part first).
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        if let Some((head, rest)) = self.0.split_first_chunk::<N>() {
            out = *head;
            self.0 = rest;
        }
        out
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.take())
    }
    fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.take())
    }
}

/// `len` bytes of `buf` from `at`, or `None` when they are not all there.
fn slice(buf: &[u8], at: u64, len: u64) -> Option<&[u8]> {
    let start = usize::try_from(at).ok()?;
    let stop = usize::try_from(at.checked_add(len)?).ok()?;
    buf.get(start..stop)
}

/// The big-endian u64 at `at` in the extra data, when the extra data reaches that far.
fn extra_u64(extra: &[u8], at: usize) -> Option<u64> {
    let bytes = extra.get(at..at.checked_add(8)?)?;
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

fn round_up8(n: u64) -> u64 {
    n.saturating_add(7) & !7
}

fn len_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::path::Path;
    use std::process::Command;

    fn run(dir: &Path, prog: &str, args: &[&str]) {
        let out = match Command::new(prog).current_dir(dir).args(args).output() {
            Ok(out) => out,
            Err(e) => panic!("cannot run {prog} ({e}): install qemu-utils"),
        };
        assert!(out.status.success(), "{prog} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Makes an image with `create_opts`, writes 64 KiB and takes the snapshots `s1` and `second` as the brief's
    /// recipe does; returns the whole file.
    fn qemu_image_with_snapshots(create_opts: &[&str]) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        args.extend_from_slice(create_opts);
        args.extend_from_slice(&["x.qcow2", "1M"]);
        run(d, "qemu-img", &args);
        run(d, "qemu-io", &["-c", "write -P 1 0 64k", "x.qcow2"]);
        run(d, "qemu-img", &["snapshot", "-c", "s1", "x.qcow2"]);
        run(d, "qemu-img", &["snapshot", "-c", "second", "x.qcow2"]);
        std::fs::read(d.join("x.qcow2")).unwrap()
    }

    /// The header's `nb_snapshots`, and the table bytes as a caller would read them: from `snapshots_offset` up
    /// to 64 MiB or the end of the file.
    fn table_of(file: &[u8]) -> (u32, u32, &[u8]) {
        let version = u32::from_be_bytes(file[4..8].try_into().unwrap());
        let count = u32::from_be_bytes(file[60..64].try_into().unwrap());
        let offset = u64::from_be_bytes(file[64..72].try_into().unwrap()) as usize;
        let end = file.len().min(offset + MAX_SNAPSHOT_TABLE_BYTES as usize);
        (version, count, &file[offset..end])
    }

    fn check_qemu_table(file: &[u8], expected_version: u32) {
        let (version, count, table) = table_of(file);
        assert_eq!((version, count), (expected_version, 2));
        let snaps = parse_snapshot_table(table, count, version).unwrap();
        let names: Vec<_> = snaps.iter().map(|s| (s.id.as_str(), s.name.as_str())).collect();
        assert_eq!(names, [("1", "s1"), ("2", "second")]);
        for s in &snaps {
            s.validate(1 << 16).unwrap();
            assert_eq!(s.l1_size, 1);
            // qemu-img 10 writes 24 bytes of extra data in both versions, icount included.
            assert_eq!(s.extra.len(), 24);
            assert_eq!(s.disk_size(), Some(1 << 20));
            assert_eq!(s.vm_state_size_large(), Some(0));
            assert_eq!(s.vm_state_bytes(), 0);
            assert!(s.icount().is_some());
            assert!(s.date_sec > 0);
        }
        assert_ne!(snaps[0].l1_table_offset, snaps[1].l1_table_offset);
        let out = serialize_snapshot_table(&snaps);
        assert_eq!(out.len() as u64, snapshot_table_size(&snaps));
        assert_eq!(out[..], table[..out.len()], "serialize differs from qemu-img");
        // Entry 1 starts 8-aligned after entry 0 (40 + 24 + 1 + 2 = 67 bytes), and the table ends unpadded.
        assert_eq!(out.len(), 72 + 40 + 24 + 1 + 6);
    }

    #[test]
    fn parses_and_reproduces_a_qemu_v3_snapshot_table() {
        let file = qemu_image_with_snapshots(&[]);
        check_qemu_table(&file, 3);
    }

    #[test]
    fn parses_and_reproduces_a_qemu_v2_snapshot_table() {
        let file = qemu_image_with_snapshots(&["-o", "compat=0.10"]);
        check_qemu_table(&file, 2);
    }

    #[test]
    fn qemu_leaves_the_file_ending_inside_the_last_sector_of_the_table() {
        let file = qemu_image_with_snapshots(&[]);
        let (_, count, table) = table_of(&file);
        let snaps = parse_snapshot_table(table, count, 3).unwrap();
        // The caller must not demand a sector- or cluster-padded table at the end of the file.
        assert_eq!(table.len() as u64, snapshot_table_size(&snaps));
    }

    fn sample(extra: Vec<u8>) -> Snapshot {
        Snapshot {
            l1_table_offset: 0x7_0000,
            l1_size: 3,
            id: "7".into(),
            name: "före".into(),
            date_sec: 1_700_000_000,
            date_nsec: 123,
            vm_clock_nsec: 0xdead_beef,
            vm_state_size: 0,
            extra,
        }
    }

    #[test]
    fn unknown_extra_data_survives_a_round_trip() {
        let mut extra = vec![0u8; 40];
        extra[..8].copy_from_slice(&(5u64 << 32).to_be_bytes());
        extra[8..16].copy_from_slice(&(1u64 << 30).to_be_bytes());
        extra[16..24].copy_from_slice(&u64::MAX.to_be_bytes());
        extra[24..].fill(0xa5);
        let snaps = vec![sample(extra), sample(vec![0; 16]), sample(vec![0; 1024])];
        let bytes = serialize_snapshot_table(&snaps);
        let back = parse_snapshot_table(&bytes, 3, 3).unwrap();
        assert_eq!(back, snaps);
        assert_eq!(back[0].vm_state_bytes(), 5 << 32);
        assert_eq!(back[0].disk_size(), Some(1 << 30));
        assert_eq!(back[0].icount(), Some(u64::MAX));
        assert_eq!(back[1].icount(), None);
        assert_eq!(serialize_snapshot_table(&back), bytes);
    }

    #[test]
    fn version_2_entries_may_lack_extra_data_and_version_3_may_not() {
        let bytes = serialize_snapshot_table(&[sample(vec![])]);
        let v2 = parse_snapshot_table(&bytes, 1, 2).unwrap();
        assert_eq!((v2[0].disk_size(), v2[0].vm_state_bytes()), (None, 0));
        assert_eq!(
            parse_snapshot_table(&bytes, 1, 3),
            Err(SnapshotError::ExtraDataIncomplete { index: 0, offset: 0, size: 0 })
        );
    }

    #[test]
    fn oversized_extra_data_is_refused_before_it_is_read() {
        let mut bytes = serialize_snapshot_table(&[sample(vec![0; 16]), sample(vec![0; 16])]);
        // Entry 1 starts at 40 + 16 + 1 + 5 = 62, rounded to 64; its extra_data_size is at 64 + 36.
        bytes[100..104].copy_from_slice(&0xffff_fff0u32.to_be_bytes());
        let err = parse_snapshot_table(&bytes, 2, 3).unwrap_err();
        assert_eq!(err, SnapshotError::ExtraDataTooLarge { index: 1, offset: 0x40, size: 0xffff_fff0 });
        assert!(err.to_string().contains("0xfffffff0"), "{err}");
        bytes[100..104].copy_from_slice(&1025u32.to_be_bytes());
        assert!(matches!(parse_snapshot_table(&bytes, 2, 3), Err(SnapshotError::ExtraDataTooLarge { .. })));
    }

    #[test]
    fn truncated_tables_and_huge_names_are_errors() {
        let bytes = serialize_snapshot_table(&[sample(vec![0; 16])]);
        for cut in 0..bytes.len() {
            assert!(
                matches!(parse_snapshot_table(&bytes[..cut], 1, 3), Err(SnapshotError::Truncated { index: 0, .. })),
                "cut at {cut}"
            );
        }
        let mut huge = bytes.clone();
        huge[12..16].copy_from_slice(&[0xff; 4]); // id_size and name_size both 65535
        assert_eq!(
            parse_snapshot_table(&huge, 1, 3),
            Err(SnapshotError::Truncated { index: 0, offset: 0, needed: 40 + 16 + 2 * 65535, available: 62 })
        );
        // A count larger than the bytes can hold fails on the first missing entry, not on allocation.
        assert!(matches!(
            parse_snapshot_table(&bytes, 65536, 3),
            Err(SnapshotError::Truncated { index: 1, offset: 64, .. })
        ));
        assert_eq!(parse_snapshot_table(&bytes, 65537, 3), Err(SnapshotError::TooMany { count: 65537 }));
        assert_eq!(parse_snapshot_table(&[], 0, 3), Ok(vec![]));
    }

    #[test]
    fn a_table_past_64_mib_is_refused() {
        // Entries of the largest possible size (40 + 1024 + 2 * 65535 bytes) cross 64 MiB at entry 507.
        let mut entry = serialize_snapshot_table(&[sample(vec![0; 1024])]);
        entry[12..16].copy_from_slice(&[0xff; 4]);
        entry.truncate(40);
        let per_entry = round_up8(40 + 1024 + 2 * 65535);
        let index = (MAX_SNAPSHOT_TABLE_BYTES / per_entry) as u32;
        let mut table = Vec::new();
        for _ in 0..=index {
            table.resize(table.len().next_multiple_of(8), 0);
            table.extend_from_slice(&entry);
            table.resize(table.len() + 1024 + 2 * 65535, b'n');
        }
        let err = parse_snapshot_table(&table, index + 1, 3).unwrap_err();
        assert_eq!(err, SnapshotError::TableTooLarge { index, end: u64::from(index) * per_entry + per_entry - 2 });
    }

    #[test]
    fn validate_checks_the_l1_pointer() {
        let mut s = sample(vec![0; 16]);
        s.validate(1 << 16).unwrap();
        s.l1_table_offset = 0x7_0200;
        assert_eq!(s.validate(1 << 16), Err(SnapshotError::L1Misaligned { id: "7".into(), offset: 0x7_0200 }));
        s.validate(512).unwrap();
        s.l1_size = (32 << 20) / 8 + 1;
        let err = s.validate(512).unwrap_err();
        assert_eq!(err.to_string(), "snapshot 7 L1 table too large: 0x400001 entries, at most 0x400000");
        s.l1_size = 2;
        s.l1_table_offset = i64::MAX as u64 - 8;
        assert!(matches!(s.validate(512), Err(SnapshotError::L1Overflow { .. })));
    }

    proptest! {
        #[test]
        fn random_tables_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600), count in 0u32..70_000,
                                     version in 2u32..=3) {
            if let Ok(snaps) = parse_snapshot_table(&bytes, count, version) {
                let out = serialize_snapshot_table(&snaps);
                prop_assert!(out.len() <= bytes.len());
                for s in &snaps {
                    let _ = s.validate(1 << 16);
                }
            }
        }

        #[test]
        fn serialized_tables_parse_back(entries in proptest::collection::vec(
            (any::<u64>(), any::<u32>(), "[a-z0-9]{0,12}", "\\PC{0,20}", any::<u32>(), any::<u64>(),
             proptest::collection::vec(any::<u8>(), 16..64)), 0..8)) {
            let snaps: Vec<Snapshot> = entries.into_iter().map(|(l1, l1_size, id, name, date, clock, extra)| Snapshot {
                l1_table_offset: l1, l1_size, id, name, date_sec: date, date_nsec: date / 3,
                vm_clock_nsec: clock, vm_state_size: date ^ 1, extra,
            }).collect();
            let bytes = serialize_snapshot_table(&snaps);
            prop_assert_eq!(parse_snapshot_table(&bytes, snaps.len() as u32, 3).unwrap(), snaps);
        }
    }
}
