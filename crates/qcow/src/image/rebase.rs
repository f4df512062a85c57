//! Safe rebase: moving an image onto another backing file (or onto none) without changing what its guest reads,
//! as `qemu-img rebase` does it.
//!
//! Only what the image does not hold itself reads through to a backing file, so only unallocated ranges can
//! change. Each is compared between the old backing file and the new one, in pieces of the image's allocation
//! unit (a subcluster, or a cluster when writing compressed), and the pieces that differ are copied in from the
//! old one: as data, or as zero clusters where the old backing file had ended (it read zeros there). Then the
//! header switches to the new backing file ([`backing_change`](super::backing_change)), after everything copied
//! is durable. A crash at any point leaves an image whose guest data is unchanged: before the switch the copies
//! read what they copied, after it they hide the new backing file's differences.

use super::backing::Backing;
use super::Image;
use crate::block::BlockDevice;
use crate::error::{Error, Result};

/// Bytes compared per read of the two backing files.
const CHUNK: u64 = 2 << 20;

/// How a rebase copies what differs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RebaseOptions {
    /// Write the copied clusters compressed (whole clusters only; a piece smaller than a cluster is written as
    /// it is).
    pub compress: bool,
}

/// What a rebase did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RebaseSummary {
    /// Bytes copied in from the old backing file because the new one differs there.
    pub copied_bytes: u64,
    /// Bytes made zero clusters because the old backing file ended before them and the new one has data there.
    pub zeroed_bytes: u64,
}

/// The new backing file of a rebase: its name as it will be recorded, its format, and the opened file.
pub struct NewBacking {
    /// The name to record (a relative name is relative to the image's directory).
    pub name: String,
    /// The format to record: "raw" or "qcow2".
    pub format: String,
    /// The opened backing file, read to find what differs and afterwards read through.
    pub backing: Backing,
}

impl<D: BlockDevice> Image<D> {
    /// Moves the image onto `new` (or, with `None`, onto no backing file: everything the old chain provided is
    /// copied in) so that the guest reads exactly what it read before, then records the new backing file.
    /// `progress` is told the bytes of the disk examined so far and the disk's size.
    ///
    /// # Errors
    /// The refusals of [`Image::set_backing_file`], made before anything is copied; `Unsupported` for compressed
    /// copies into an image with an external data file; `Backing` when a backing file cannot be read; `ReadOnly`,
    /// `Corrupt`, `Io`. After an error the guest data is unchanged and the old backing file still recorded.
    pub fn rebase(
        &mut self,
        new: Option<NewBacking>,
        options: RebaseOptions,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<RebaseSummary> {
        let result = self.rebase_onto(new, options, progress);
        self.observe(result)
    }

    fn rebase_onto(
        &mut self,
        new: Option<NewBacking>,
        options: RebaseOptions,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<RebaseSummary> {
        self.check_writable("rebase")?;
        // Every refusal comes before the first copy.
        let (name, format) = match &new {
            Some(n) => (Some(n.name.as_str()), Some(n.format.as_str())),
            None => (None, None),
        };
        self.meta().header_with_backing(name, format)?;
        if options.compress && self.data_file.is_some() {
            return Err(Error::Unsupported {
                feature: "compressed clusters in an image with an external data file".into(),
            });
        }
        let summary = self.copy_differences(new.as_ref().map(|n| &n.backing), options, progress)?;
        self.flush_all()?;
        match new {
            Some(n) => self.switch_backing(Some(&n.name), Some(&n.format), Some(n.backing))?,
            None => self.switch_backing(None, None, None)?,
        }
        Ok(summary)
    }

    /// Copies in every piece of the unallocated ranges where the old and the new backing file differ.
    fn copy_differences(
        &self,
        new: Option<&Backing>,
        options: RebaseOptions,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<RebaseSummary> {
        let cs = self.geo.cluster_size();
        let unit = if options.compress || !self.geo.extended_l2 { cs } else { cs / 32 };
        let size = self.virtual_size().next_multiple_of(512);
        let old_size = self.backing.as_ref().map_or(0, Backing::size);
        let new_size = new.map_or(0, Backing::size);
        // Past the end of both backing files both read zeros: nothing there can differ.
        let reach = old_size.max(new_size).min(size).next_multiple_of(unit).min(size);
        let mut summary = RebaseSummary::default();
        let mut old_buf = vec![0u8; CHUNK as usize];
        let mut new_buf = vec![0u8; CHUNK as usize];
        let window = CHUNK * 64;
        let mut at = 0;
        while at < reach {
            let end = at.saturating_add(window).min(reach);
            for extent in self.map(at, end - at)? {
                if extent.kind != super::ExtentKind::Unallocated {
                    continue;
                }
                let (lo, hi) = (extent.guest.0, (extent.guest.0 + extent.len).min(reach));
                let mut pos = lo;
                while pos < hi {
                    let stop = (pos + CHUNK).min(hi);
                    let len = (stop - pos) as usize;
                    let (Some(old), Some(new_piece)) = (old_buf.get_mut(..len), new_buf.get_mut(..len)) else {
                        break;
                    };
                    read_backing(self.backing.as_ref(), pos, old)?;
                    read_backing(new, pos, new_piece)?;
                    self.copy_runs(pos, old, new_piece, unit, old_size, options, &mut summary)?;
                    progress(stop, size);
                    pos = stop;
                }
            }
            progress(end, size);
            at = end;
        }
        progress(size, size);
        Ok(summary)
    }

    /// Writes the pieces of `old` (read at guest offset `at`) that differ from `new`.
    #[allow(clippy::too_many_arguments)]
    fn copy_runs(
        &self,
        at: u64,
        old: &[u8],
        new: &[u8],
        unit: u64,
        old_size: u64,
        options: RebaseOptions,
        summary: &mut RebaseSummary,
    ) -> Result<()> {
        let mut offset = 0usize;
        while offset < old.len() {
            // Pieces end on unit boundaries of the disk, so that the writes below cover whole allocation units.
            let piece_end = ((at + offset as u64) / unit + 1) * unit - at;
            let piece_end = (piece_end as usize).min(old.len());
            let differs = old.get(offset..piece_end) != new.get(offset..piece_end);
            let mut run_end = piece_end;
            while run_end < old.len() {
                let next = (((at + run_end as u64) / unit + 1) * unit - at) as usize;
                let next = next.min(old.len());
                if (old.get(run_end..next) != new.get(run_end..next)) != differs {
                    break;
                }
                run_end = next;
            }
            if differs {
                let (lo, hi) = (at + offset as u64, at + run_end as u64);
                if lo >= old_size {
                    // The old backing file had ended: the guest read zeros, which a zero cluster keeps.
                    self.zero_unallocated(lo, hi)?;
                    summary.zeroed_bytes += hi - lo;
                } else {
                    let data = old.get(offset..run_end).unwrap_or(&[]);
                    self.write_copy(lo, data, options)?;
                    summary.copied_bytes += hi - lo;
                }
            }
            offset = run_end;
        }
        Ok(())
    }

    /// Writes copied data at `offset`: whole clusters compressed when asked, everything else as it is.
    fn write_copy(&self, offset: u64, data: &[u8], options: RebaseOptions) -> Result<()> {
        if !options.compress {
            return self.write_at(offset, data);
        }
        let cs = self.geo.cluster_size();
        let size = self.virtual_size().next_multiple_of(512);
        let mut pos = 0usize;
        while pos < data.len() {
            let guest = offset + pos as u64;
            let cluster_end = ((guest / cs + 1) * cs).min(size);
            let len = ((cluster_end - guest) as usize).min(data.len() - pos);
            let piece = data.get(pos..pos + len).unwrap_or(&[]);
            if guest % cs == 0 && guest + len as u64 == cluster_end {
                self.write_compressed(guest, piece)?;
            } else {
                self.write_at(guest, piece)?;
            }
            pos += len;
        }
        Ok(())
    }
}

/// Reads `buf` at `offset` of a backing file, zeros past its end or without one.
fn read_backing(backing: Option<&Backing>, offset: u64, buf: &mut [u8]) -> Result<()> {
    match backing {
        Some(b) => b.read(offset, buf),
        None => {
            buf.fill(0);
            Ok(())
        }
    }
}
