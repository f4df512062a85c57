//! Creating an image with the layout qemu-img uses: header, refcount table, refcount blocks, then the L1 table.

use super::backing::{BackingResolver, NoBacking};
use super::meta::write_meta;
use super::options::{Compat, CreateOptions, Preallocation};
use super::{Config, Image};
use crate::block::BlockDevice;
use crate::error::{Error, Result};
use crate::format::{
    Geometry, GuestOffset, Header, HostOffset, L2Entry, RefcountBlock, RefcountSizing, SubclusterBitmap,
};

/// QEMU's cap on the L1 table.
const MAX_L1_BYTES: u64 = 32 << 20;

impl<D: BlockDevice> Image<D> {
    /// Formats `device` as a new qcow2 image and opens it. Whatever the device held is overwritten.
    ///
    /// # Errors
    /// `InvalidArgument` for options qemu-img would refuse (including a size too large for the cluster size),
    /// `ReadOnly`, `Io`.
    pub fn create(device: D, options: &CreateOptions, config: Config) -> Result<Self> {
        Self::create_with(device, options, config, &NoBacking)
    }

    /// Formats `device` as a new qcow2 image and opens it, opening its backing file through `resolver`.
    ///
    /// # Errors
    /// As [`Image::create`], plus whatever the resolver refuses.
    pub fn create_with(
        device: D,
        options: &CreateOptions,
        config: Config,
        resolver: &dyn BackingResolver,
    ) -> Result<Self> {
        options.validate()?;
        if config.read_only || !device.info().read_write {
            return Err(Error::ReadOnly { op: "create" });
        }
        let size =
            options.size.checked_next_multiple_of(512).ok_or_else(|| Error::invalid("create", "size overflows"))?;
        let cluster_bits = options.cluster_size.trailing_zeros();
        let refcount_order = options.refcount_bits.trailing_zeros();
        let geo = Geometry { cluster_bits, refcount_order, extended_l2: options.extended_l2 };
        let cs = geo.cluster_size();
        let l1_entries = geo.l1_entries_for(size);
        if l1_entries * 8 > MAX_L1_BYTES {
            return Err(Error::invalid(
                "create",
                format!("size {size} needs an L1 table over 32 MiB at {cs}-byte clusters: use larger clusters"),
            ));
        }
        let l1_clusters = geo.clusters_for(l1_entries * 8);
        let rbe = geo.refcount_block_entries();
        let RefcountSizing { blocks, table_clusters } = RefcountSizing::for_clusters(1 + l1_clusters, &geo);
        let blocks_at = 1 + table_clusters;
        let l1_at = blocks_at + blocks;
        let total = l1_at + l1_clusters;

        let version = if options.compat == Compat::V2 { 2 } else { 3 };
        let mut header = Header::for_create(size, cluster_bits, refcount_order, version, options.lazy_refcounts);
        if let Some(name) = &options.backing_file {
            header.set_backing_file(Some(name.as_bytes()), options.backing_format.as_deref());
        }
        header.set_compression_type(options.compression_type);
        if let Some(name) = &options.data_file {
            header.set_external_data_file(Some(name), options.data_file_raw);
        }
        header.set_extended_l2(options.extended_l2);
        header.refcount_table_offset = cs;
        header.refcount_table_clusters = table_clusters as u32;
        header.l1_size = l1_entries as u32;
        header.l1_table_offset = if l1_entries == 0 { 0 } else { l1_at * cs };

        // Start from an empty device so that everything not written reads as zeros. A device that cannot
        // shrink (a partition, or an image through its device interface) keeps its old bytes, which only
        // matters for clusters mapped without being written: preallocation then writes zeros.
        let blank = device.info().size_bytes() == 0 || device.resize(0).is_ok();
        let mut table = vec![0u8; (table_clusters * cs) as usize];
        let mut block = vec![0u8; cs as usize];
        for b in 0..blocks {
            block.fill(0);
            let mut view = RefcountBlock::new(&mut block[..], refcount_order);
            for c in b * rbe..((b + 1) * rbe).min(total) {
                view.set(c % rbe, 1);
            }
            let offset = (blocks_at + b) * cs;
            write_meta(&device, offset, &block)?;
            if let Some(slot) = table.get_mut((b * 8) as usize..(b * 8 + 8) as usize) {
                slot.copy_from_slice(&offset.to_be_bytes());
            }
        }
        write_meta(&device, cs, &table)?;
        if l1_entries > 0 {
            write_meta(&device, l1_at * cs, &vec![0u8; (l1_entries * 8).next_multiple_of(512) as usize])?;
        }
        let mut head = header.serialize()?;
        head.resize(head.len().next_multiple_of(512), 0);
        write_meta(&device, 0, &head)?;
        device.flush()?;

        let image = Image::open_with(device, config, resolver)?;
        // Every structure in it is ours: its refcounts say exactly what is in use.
        image.meta().trust_own_refcounts();
        if options.preallocation == Preallocation::Metadata {
            image.preallocate_metadata(!blank)?;
        }
        Ok(image)
    }

    /// Allocates every L2 table and data cluster, as qemu-img's `preallocation=metadata`: each L2 table is
    /// followed by the data clusters it maps, and the file is extended (sparsely) to cover them.
    fn preallocate_metadata(&self, write_zeros: bool) -> Result<()> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let size = self.virtual_size();
        let clusters = geo.clusters_for(size);
        let per_table = geo.l2_entries();
        let mut m = self.meta();
        let mut guest_cluster = 0;
        while guest_cluster < clusters {
            let guest = GuestOffset(guest_cluster * cs);
            let l1_index = geo.l1_index(guest);
            let l2 = m.l2_for_write(&self.dev, l1_index)?;
            let n = (per_table - geo.l2_index(guest)).min(clusters - guest_cluster);
            let first = m.alloc_clusters(&self.dev, n)?;
            if write_zeros {
                for c in first..first + n {
                    self.dev.write_at(c * cs, &self.zeros)?;
                }
            }
            for i in 0..n {
                let index = geo.l2_index(GuestOffset((guest_cluster + i) * cs));
                m.set_l2_entry(&self.dev, l2, index, L2Entry::normal(HostOffset((first + i) * cs)))?;
                if geo.extended_l2 {
                    m.set_l2_bitmap(&self.dev, l2, index, SubclusterBitmap::ALL_ALLOCATED)?;
                }
            }
            guest_cluster += n;
            if m.cache.over_budget() {
                m.writeback(&self.dev)?;
            }
        }
        m.writeback(&self.dev)?;
        drop(m);
        self.dev.flush()
    }
}
