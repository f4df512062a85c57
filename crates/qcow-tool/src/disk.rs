//! The virtual disk behind a file the user names, for commands that read guest data: a raw file as it is, or a
//! qcow2 image read through its backing chain.

use std::path::Path;

use qcow::block::{BlockDevice, FileDevice};
use qcow::convert::AllocationMap;
use qcow::Image;

use crate::error::Result;
use crate::open::{self, Format};

/// A readable virtual disk.
pub enum Disk {
    /// A raw file.
    Raw(FileDevice),
    /// A qcow2 image with its backing chain.
    Qcow2(Box<Image<FileDevice>>),
}

impl Disk {
    /// Opens `path` read-only, as `format` or as its magic says.
    pub fn open(path: &Path, format: Option<Format>) -> Result<Self> {
        let format = match format {
            Some(f) => f,
            None => open::probe(path)?,
        };
        Ok(match format {
            Format::Raw => Disk::Raw(open::file(path, true)?),
            Format::Qcow2 => Disk::Qcow2(Box::new(open::image(path, true)?)),
        })
    }

    /// The guest's size in bytes.
    pub fn size(&self) -> u64 {
        match self {
            Disk::Raw(dev) => dev.len_bytes(),
            Disk::Qcow2(image) => image.virtual_size(),
        }
    }

    /// The device to read.
    pub fn device(&self) -> &dyn BlockDevice {
        match self {
            Disk::Raw(dev) => dev,
            Disk::Qcow2(image) => &**image,
        }
    }

    /// Which ranges may hold data.
    pub fn map(&self) -> &dyn AllocationMap {
        match self {
            Disk::Raw(dev) => dev,
            Disk::Qcow2(image) => &**image,
        }
    }

    /// Reads `buf.len()` bytes at `offset` (a sector multiple); what lies past the end of the disk reads as
    /// zeros, so a disk whose size is not a sector multiple reads whole sectors.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> qcow::Result<()> {
        let dev = self.device();
        qcow::block::read_padded(dev, dev.info().size_bytes(), offset, buf)
    }
}
