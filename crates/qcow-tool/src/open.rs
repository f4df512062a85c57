//! Opening the files the user names: probing whether a file is qcow2, and opening it as a file device or a
//! qcow2 image with errors that name the file.

use std::io::Read;
use std::path::Path;

use qcow::block::{FileDevice, FileOptions};
use qcow::{Config, Image};

use crate::error::{Context, Result};

/// An image format, as `-f` and `-O` name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A plain disk image: the guest's bytes, as they are.
    Raw,
    /// A qcow2 image.
    Qcow2,
}

impl Format {
    /// The name qemu-img uses.
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }
}

/// Whether the file starts with the qcow2 magic. A file too short to hold it is not qcow2.
pub fn probe(path: &Path) -> Result<Format> {
    let mut file = std::fs::File::open(path).context(|| format!("could not open '{}'", path.display()))?;
    let mut magic = [0u8; 4];
    let mut got = 0;
    while got < magic.len() {
        let Some(rest) = magic.get_mut(got..) else { break };
        match file.read(rest) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context(|| format!("could not read '{}'", path.display())),
        }
    }
    Ok(if got == magic.len() && u32::from_be_bytes(magic) == qcow::format::MAGIC { Format::Qcow2 } else { Format::Raw })
}

/// Opens a file as a device.
pub fn file(path: &Path, read_only: bool) -> Result<FileDevice> {
    FileDevice::open(path, &FileOptions { read_only, direct: false })
        .context(|| format!("could not open '{}'", path.display()))
}

/// Opens a qcow2 image.
pub fn image(path: &Path, read_only: bool) -> Result<Image<FileDevice>> {
    let dev = file(path, read_only)?;
    let config = if read_only { Config::read_only() } else { Config::default() };
    Image::open(dev, config).context(|| format!("could not open '{}' as qcow2", path.display()))
}

/// Parses a size as qemu-img does, or says what a size looks like.
pub fn size(text: &str) -> Result<u64> {
    qcow::parse_size(text).ok_or_else(|| {
        crate::error::Error::msg(format!(
            "invalid size '{text}': expected a number of bytes, optionally with a K, M, G, T, P or E suffix"
        ))
    })
}
