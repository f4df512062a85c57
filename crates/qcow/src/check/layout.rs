//! What the header says, read for a check: the parsed header, the geometry, the refcount table and the snapshot
//! list. A header that fails validation refuses the check, as QEMU refuses to open such an image.

use crate::block::{read_padded, BlockDevice};
use crate::error::Result;
use crate::format::be64;
use crate::format::{
    feature, parse_snapshot_table_for_check, Geometry, Header, Snapshot, SnapshotDefect, SnapshotError,
    MAX_SNAPSHOT_TABLE_BYTES,
};

/// The image as its header describes it.
pub struct Layout {
    pub header: Header,
    pub geo: Geometry,
    /// Length of the image file in bytes.
    pub file_len: u64,
    /// Raw refcount table entries.
    pub reftable: Vec<u64>,
    /// The snapshot list, or why it could not be read.
    pub snapshots: std::result::Result<Vec<Snapshot>, String>,
    /// Entries that a repair must rewrite.
    pub snapshot_defects: Vec<SnapshotDefect>,
    /// Bytes the snapshot table occupies on disk.
    pub snapshots_size: u64,
    /// Whether guest data lives in an external data file (and is therefore not refcounted).
    pub data_file: bool,
}

impl Layout {
    /// Reads and validates the header and loads the refcount table and snapshot list. With `repairing`, snapshot
    /// entries with too much extra data are read (and reported) rather than refusing the table.
    pub fn read(dev: &dyn BlockDevice, repairing: bool) -> Result<Layout> {
        let file_len = dev.info().size_bytes();
        let mut first = vec![0u8; 512];
        read_padded(dev, file_len, 0, &mut first)?;
        let cluster_bits = Header::peek_cluster_bits(&first)?;
        let mut cluster0 = vec![0u8; 1usize << cluster_bits];
        read_padded(dev, file_len, 0, &mut cluster0)?;
        let header = Header::parse(&cluster0)?;
        // QEMU opens images for a check without requiring a refcount table (a repair rebuilds one); every other
        // open-time rule holds.
        let mut rules = header.clone();
        rules.refcount_table_clusters = rules.refcount_table_clusters.max(1);
        rules.validate(false)?;
        let geo = Geometry {
            cluster_bits: header.cluster_bits,
            refcount_order: header.refcount_order,
            extended_l2: header.incompatible_features & feature::EXTENDED_L2 != 0,
        };
        let table_bytes = u64::from(header.refcount_table_clusters) * geo.cluster_size();
        let mut raw = vec![0u8; table_bytes as usize];
        read_padded(dev, file_len, header.refcount_table_offset, &mut raw)?;
        let reftable = raw.chunks_exact(8).map(be64).collect();
        let (snapshots, snapshot_defects, snapshots_size) = match read_snapshots(dev, file_len, &header, repairing) {
            Ok((snaps, defects, len)) => (Ok(snaps), defects, len),
            Err(why) => (Err(why), Vec::new(), 0),
        };
        let data_file = header.incompatible_features & feature::EXTERNAL_DATA_FILE != 0;
        Ok(Layout { header, geo, file_len, reftable, snapshots, snapshot_defects, snapshots_size, data_file })
    }

    /// Clusters the file holds, the last one possibly partial.
    pub fn file_clusters(&self) -> u64 {
        self.file_len.div_ceil(self.geo.cluster_size())
    }
}

fn read_snapshots(
    dev: &dyn BlockDevice,
    file_len: u64,
    header: &Header,
    repairing: bool,
) -> std::result::Result<(Vec<Snapshot>, Vec<SnapshotDefect>, u64), String> {
    if header.nb_snapshots == 0 {
        return Ok((Vec::new(), Vec::new(), 0));
    }
    let offset = header.snapshots_offset;
    let mut len = file_len.saturating_sub(offset).min(MAX_SNAPSHOT_TABLE_BYTES);
    if len == 0 {
        return Err("the snapshot table starts past the end of the file".into());
    }
    // Past the end of the file the table reads as zeros, as QEMU reads it: an entry that runs off the end is
    // read again with as many bytes as it asks for (never more than QEMU's 64 MiB cap).
    loop {
        let mut bytes = vec![0u8; len as usize];
        read_padded(dev, file_len, offset, &mut bytes).map_err(|e| e.to_string())?;
        // Each entry's L1 pointer is judged by the walk, entry by entry, as QEMU's check does: one bad entry does
        // not hide the others.
        match parse_snapshot_table_for_check(&bytes, header.nb_snapshots, header.version, repairing) {
            Err(SnapshotError::Truncated { needed, .. }) if needed > len && needed <= MAX_SNAPSHOT_TABLE_BYTES => {
                // At least doubled: growing by one entry at a time re-reads the table once per entry, which for
                // 65536 entries near the end of the file is a quadratic spin.
                len = needed.max(len.saturating_mul(2)).min(MAX_SNAPSHOT_TABLE_BYTES);
            }
            result => return result.map_err(|e| e.to_string()),
        }
    }
}
