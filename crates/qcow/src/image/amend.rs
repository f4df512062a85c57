//! Amending an open image's options, as `qemu-img amend` does for qcow2: version, lazy refcounts, refcount width,
//! the external data file's name and raw bit, and the virtual size.
//!
//! Every refusal is decided before the first change, in the order QEMU reports them, so a refused amend changes
//! nothing. The changes then run in QEMU's order: upgrade first (later options may need version 3), then the
//! refcount width, the data file fields, lazy refcounts and the size, and the downgrade last (so that what
//! version 2 cannot hold has been removed before). Each step makes its own changes durable and ends with a
//! header write (or, for the size, a resize), so a crash leaves the image with some steps done and each step
//! either done or not.

use super::{Compat, Image, Refusal};
use crate::block::BlockDevice;
use crate::error::Result;
use crate::format::{feature, Extension};

/// The options an amend changes; `None` leaves an option as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AmendOptions {
    /// The version: "0.10" (2) or "1.1" (3).
    pub compat: Option<Compat>,
    /// The virtual size in bytes (a multiple of 512); shrinking drops what lies past the new end. Zero means
    /// unchanged, as for QEMU.
    pub size: Option<u64>,
    /// Lazy refcounts on or off (on needs version 3).
    pub lazy_refcounts: Option<bool>,
    /// The refcount width in bits: a power of two from 1 to 64 (other than 16 needs version 3).
    pub refcount_bits: Option<u64>,
    /// The external data file's name as recorded (only for images that have one); empty removes the name.
    pub data_file: Option<String>,
    /// Whether the external data file stays a valid raw image: may be turned off, never on.
    pub data_file_raw: Option<bool>,
    /// The backing file name: accepted only when it is the one recorded (a rebase changes it).
    pub backing_file: Option<String>,
    /// The backing file format: accepted only when it is the one recorded.
    pub backing_format: Option<String>,
}

impl AmendOptions {
    /// Whether no option is set.
    pub fn is_empty(&self) -> bool {
        *self == AmendOptions::default()
    }
}

/// What an amend will do, once every refusal is past.
#[derive(Debug, Default)]
struct Plan {
    upgrade: bool,
    refcount_bits: Option<u64>,
    data_file: Option<String>,
    data_file_raw_off: bool,
    lazy_refcounts: Option<bool>,
    size: Option<u64>,
    downgrade: bool,
}

impl<D: BlockDevice> Image<D> {
    /// Changes the image's options as `options` asks. `progress` is told the steps done and the steps to do.
    ///
    /// # Errors
    /// A [`Refusal`] naming what cannot be done, before anything is written: a refcount width that is not a
    /// power of two up to 64 or that needs version 3, a data file name for an image without one, the raw bit
    /// turned on, a backing file other than the recorded one, lazy refcounts on version 2, a size not a multiple
    /// of 512 or of a version 2 image with snapshots, a refcount too large for a narrower width, and the
    /// downgrade refusals (16-bit refcounts, no data file, snapshots of the current size with small VM states,
    /// no incompatible features, no zstd-compressed clusters).
    /// `Untrusted` when shrinking an image whose refcounts cannot be trusted; `ReadOnly`, `Corrupt`, `Io`.
    pub fn amend(&mut self, options: &AmendOptions, progress: &mut dyn FnMut(u64, u64)) -> Result<()> {
        let result = self.amend_options(options, progress);
        self.observe(result)
    }

    fn amend_options(&mut self, options: &AmendOptions, progress: &mut dyn FnMut(u64, u64)) -> Result<()> {
        self.check_writable("amend")?;
        let plan = self.plan(options)?;
        let steps = [
            plan.upgrade,
            plan.refcount_bits.is_some(),
            plan.data_file.is_some() || plan.data_file_raw_off,
            plan.lazy_refcounts.is_some(),
            plan.size.is_some(),
            plan.downgrade,
        ];
        let total = steps.iter().filter(|&&s| s).count() as u64;
        let mut done = 0;
        let mut step = |progress: &mut dyn FnMut(u64, u64)| {
            done += 1;
            progress(done, total);
        };
        progress(0, total);
        if plan.upgrade {
            self.upgrade()?;
            step(progress);
        }
        if let Some(bits) = plan.refcount_bits {
            self.change_refcount_width(bits)?;
            step(progress);
        }
        if plan.data_file.is_some() || plan.data_file_raw_off {
            let meta = self.meta.get_mut().unwrap_or_else(|e| e.into_inner());
            let mut header = meta.header.clone();
            if plan.data_file_raw_off {
                header.autoclear_features &= !feature::DATA_FILE_RAW;
            }
            match plan.data_file.as_deref() {
                Some("") => {
                    header.remove_extension(Extension::DATA_FILE);
                }
                Some(name) => header.set_extension(Extension::DATA_FILE, name.as_bytes().to_vec()),
                None => {}
            }
            header.layout()?;
            meta.commit_header(&self.dev, header)?;
            step(progress);
        }
        if let Some(on) = plan.lazy_refcounts {
            let meta = self.meta.get_mut().unwrap_or_else(|e| e.into_inner());
            if !on {
                // The refcounts on disk must be exact before the image stops saying they may not be.
                meta.writeback(&self.dev)?;
                meta.mark_clean(&self.dev)?;
            }
            let mut header = meta.header.clone();
            if on {
                header.compatible_features |= feature::LAZY_REFCOUNTS;
            } else {
                header.compatible_features &= !feature::LAZY_REFCOUNTS;
            }
            meta.commit_header(&self.dev, header)?;
            step(progress);
        }
        if let Some(size) = plan.size {
            self.resize(size, true)?;
            step(progress);
        }
        if plan.downgrade {
            self.downgrade()?;
            step(progress);
        }
        Ok(())
    }

    /// Every refusal, in the order QEMU reports them, and the steps to take.
    fn plan(&self, options: &AmendOptions) -> Result<Plan> {
        let header = self.header();
        let old_version = header.version;
        let new_version = match options.compat {
            Some(Compat::V2) => 2,
            Some(Compat::V3) => 3,
            None => old_version,
        };
        let mut plan =
            Plan { upgrade: new_version > old_version, downgrade: new_version < old_version, ..Plan::default() };
        // Checked while the options are read, in the order QEMU lists them.
        if options.data_file.is_some() && !header.has_external_data_file() {
            return Err(Refusal::DataFileNotUsed.into());
        }
        if options.data_file_raw == Some(true) && !header.is_data_file_raw() {
            return Err(Refusal::DataFileRawCannotBeSet.into());
        }
        let current_bits = self.geo.refcount_bits();
        if let Some(bits) = options.refcount_bits {
            if !(1..=64).contains(&bits) || !bits.is_power_of_two() {
                return Err(Refusal::RefcountWidthInvalid { bits }.into());
            }
        }
        // Checked as the steps come.
        let bits = options.refcount_bits.unwrap_or(current_bits);
        if bits != current_bits {
            if new_version < 3 && bits != 16 {
                return Err(Refusal::RefcountWidthNeedsV3.into());
            }
            self.check_refcount_width(bits)?;
            plan.refcount_bits = Some(bits);
        }
        plan.data_file = options.data_file.clone();
        plan.data_file_raw_off = options.data_file_raw == Some(false) && header.is_data_file_raw();
        if options.backing_file.is_some() || options.backing_format.is_some() {
            let recorded = header.backing_file.as_deref().map(|b| String::from_utf8_lossy(b).into_owned());
            if options.backing_file != recorded || options.backing_format != header.backing_format() {
                return Err(Refusal::BackingFileAmend.into());
            }
        }
        if let Some(on) = options.lazy_refcounts {
            if on != header.has_lazy_refcounts() {
                if on && new_version < 3 {
                    return Err(Refusal::LazyRefcountsNeedV3.into());
                }
                plan.lazy_refcounts = Some(on);
            }
        }
        let mut size = self.virtual_size();
        if let Some(new_size) = options.size.filter(|&s| s != 0) {
            if new_size % 512 != 0 {
                return Err(Refusal::SizeNotSectorMultiple { size: new_size }.into());
            }
            // The resize runs after an upgrade and before a downgrade.
            if new_version.max(old_version) < 3 && header.nb_snapshots > 0 {
                return Err(Refusal::ResizeV2WithSnapshots.into());
            }
            let backed_to = self.backing.as_ref().map_or(0, super::Backing::size).min(new_size);
            if new_version.max(old_version) < 3 && backed_to > size {
                return Err(Refusal::GrowV2OverBacking.into());
            }
            if new_size != size {
                plan.size = Some(new_size);
                size = new_size;
            }
        }
        if plan.downgrade {
            self.check_downgrade(bits, size)?;
        }
        Ok(plan)
    }

    /// Refuses a narrower refcount width that some cluster's refcount does not fit, reading only the stored
    /// refcounts (the rebuild counts the references again and checks the same).
    fn check_refcount_width(&self, bits: u64) -> Result<()> {
        if bits >= 64 || bits >= self.geo.refcount_bits() {
            return Ok(());
        }
        let max = (1u64 << bits) - 1;
        let mut m = self.meta();
        for cluster in 0..m.alloc.end_cluster() {
            let refcount = m.refcount(&self.dev, cluster)?;
            if refcount > max {
                let offset = cluster << self.geo.cluster_bits;
                return Err(Refusal::RefcountTooLarge { bits, offset, refcount }.into());
            }
        }
        Ok(())
    }
}
