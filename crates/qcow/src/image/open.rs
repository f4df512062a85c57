//! Opening an image: read and validate the header, refuse what cannot be handled by name, and bring a
//! read-write image to a state where it may allocate (unknown autoclear bits cleared, dirty refcounts rebuilt).
//!
//! Opening costs O(1) in the virtual size: only the header and the refcount table (sized by the file, not by
//! the disk) are read. L1 clusters, L2 tables and refcount blocks are loaded on demand.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, RwLock};

use super::backing::{BackingResolver, NoBacking};
use super::cache::MetadataCache;
use super::meta::{be64, Meta};
use super::overlap::{Corruption, OverlapIndex};
use super::ranges::RangeLocks;
use super::{Config, Image};
use crate::block::{BlockDevice, Padded};
use crate::error::{Error, Result};
use crate::format::feature::FeatureKind;
use crate::format::{feature, Geometry, Header};

/// Incompatible features this version reads and writes.
const SUPPORTED_INCOMPATIBLE: u64 =
    feature::DIRTY | feature::CORRUPT | feature::COMPRESSION_TYPE | feature::EXTERNAL_DATA_FILE | feature::EXTENDED_L2;

/// The name the image gives an incompatible feature bit, or QEMU's name for it.
fn feature_name(header: &Header, bit: u8) -> String {
    header
        .feature_names()
        .into_iter()
        .find(|f| f.kind == FeatureKind::Incompatible && f.bit == bit)
        .map(|f| f.name)
        .unwrap_or_else(|| format!("incompatible feature bit {bit}"))
}

impl<D: BlockDevice> Image<D> {
    /// Opens the qcow2 image stored on `device`.
    ///
    /// With `config.read_only` (or a read-only device) nothing is ever written. A read-write open clears
    /// autoclear bits this version does not maintain, loads the persistent bitmaps and marks them in use (as QEMU
    /// does: they say "inconsistent" on disk until they are stored at close) and, when the image is dirty,
    /// rebuilds its refcounts.
    ///
    /// # Errors
    /// `Format` for a header that fails validation (each rule has its own variant), `Unsupported` naming a
    /// feature this version cannot handle, `Bitmap` for a read-write open of bitmaps QEMU would refuse to load,
    /// `Corrupt`, `Io`.
    pub fn open(device: D, config: Config) -> Result<Self> {
        Self::open_with(device, config, &NoBacking)
    }

    /// Opens the image on `device`, opening its backing file (if it names one) through `resolver`.
    ///
    /// # Errors
    /// As [`Image::open`], plus whatever the resolver refuses.
    pub fn open_with(device: D, config: Config, resolver: &dyn BackingResolver) -> Result<Self> {
        let read_only = config.read_only || !device.info().read_write;
        let dev = Padded::new(device);
        let mut first = vec![0u8; 512];
        dev.read_at(0, &mut first)?;
        let cluster_bits = Header::peek_cluster_bits(&first)?;
        let mut cluster0 = vec![0u8; 1usize << cluster_bits];
        dev.read_at(0, &mut cluster0)?;
        let header = Header::parse(&cluster0)?;
        header.validate(!read_only)?;
        let unsupported = header.incompatible_features & !SUPPORTED_INCOMPATIBLE;
        if unsupported != 0 {
            let names: Vec<String> =
                (0..64u8).filter(|b| unsupported & (1 << b) != 0).map(|b| feature_name(&header, b)).collect();
            return Err(Error::Unsupported { feature: names.join(", ") });
        }
        let backing = match &header.backing_file {
            Some(name) => {
                let name = String::from_utf8_lossy(name);
                Some(resolver.open_backing(&name, header.backing_format().as_deref())?)
            }
            None => None,
        };
        let data_file = match header.external_data_file() {
            Some(name) if header.has_external_data_file() => Some(resolver.open_data_file(&name, read_only)?),
            None if header.has_external_data_file() => {
                return Err(Error::Unsupported { feature: "external data file with no name recorded".into() })
            }
            _ => None,
        };
        let geo = Geometry {
            cluster_bits: header.cluster_bits,
            refcount_order: header.refcount_order,
            extended_l2: header.incompatible_features & feature::EXTENDED_L2 != 0,
        };
        let cs = geo.cluster_size();
        let end_cluster = dev.info().size_bytes().div_ceil(cs);
        let table_bytes = u64::from(header.refcount_table_clusters) * cs;
        let mut raw = vec![0u8; table_bytes as usize];
        dev.read_at(header.refcount_table_offset, &mut raw)?;
        let reftable: Vec<u64> = raw.chunks_exact(8).map(be64).collect();
        let size = header.size;
        let compression = header.compression_type;
        let dirty = header.incompatible_features & feature::DIRTY != 0;
        let corruption = Arc::new(Corruption::default());
        let read_grace = Arc::new(super::reclaim::ReadGrace::default());
        let writeback_queue = Arc::new(super::writeback_queue::WritebackQueue::default());
        let meta = Meta {
            queue: Arc::clone(&writeback_queue),
            overlap: OverlapIndex::new(&header),
            corruption: Arc::clone(&corruption),
            writable: !read_only,
            reclaim: Default::default(),
            read_grace: Arc::clone(&read_grace),
            trust: None,
            header,
            geo,
            reftable,
            reftable_dirty: BTreeSet::new(),
            cache: MetadataCache::new(config.cache_size, cs),
            alloc: super::allocator::Allocator::new(end_cluster),
            header_dirty: false,
            lazy_dirty: false,
            data_file_size: data_file.as_ref().map(|d| d.info().size_bytes()),
        };
        let image = Image {
            dev,
            meta: RwLock::new(meta),
            ranges: RangeLocks::default(),
            resize: RwLock::new(Default::default()),
            geo,
            size: AtomicU64::new(size),
            read_only,
            disconnected: AtomicBool::new(false),
            corruption,
            zeros: vec![0u8; cs as usize].into_boxed_slice(),
            config,
            backing,
            compression,
            data_file,
            counters: Default::default(),
            read_grace,
            reclaimer: Mutex::new(None),
            reclaimer_error: Mutex::new(None),
            reclaim_memo: Default::default(),
            unflushed_since: AtomicU64::new(0),
            opened: std::time::Instant::now(),
            bitmaps: Default::default(),
            writeback_queue,
            data_sizing: Mutex::new(()),
            lock_times: Default::default(),
        };
        if !read_only {
            image.prepare_for_writes(dirty)?;
        }
        if image.config.check_on_connect {
            image.verify_refcounts()?;
        }
        Ok(image)
    }

    /// Clears autoclear bits nobody maintains, loads the persistent bitmaps (marking them in use, as QEMU does)
    /// and rebuilds the refcounts of a dirty image, before any allocation can happen.
    fn prepare_for_writes(&self, dirty: bool) -> Result<()> {
        {
            let mut m = self.meta();
            // Bitmaps are maintained. A raw data file stays a valid raw image: guest data is written at guest
            // offsets, zeros included. Any other autoclear bit belongs to a feature this version does not keep.
            let keep = m.header.autoclear_features & (feature::DATA_FILE_RAW | feature::BITMAPS);
            let mut changed = m.header.autoclear_features != keep;
            m.header.autoclear_features = keep;
            // Bitmaps a program without bitmap support left stale: QEMU drops their extension (they leak).
            changed |= m.drop_stale_bitmaps();
            if changed {
                m.write_header(&self.dev)?;
                self.dev.flush()?;
            }
        }
        self.load_bitmaps_for_writing()?;
        if dirty {
            self.meta().rebuild_refcounts(&self.dev)?;
        }
        Ok(())
    }
}
