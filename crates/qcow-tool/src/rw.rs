//! `qcow-tool read` and `qcow-tool write`: move whole sectors between a qcow2 image and the terminal.

use std::io::Write;
use std::path::PathBuf;

use qcow::block::SECTOR_SIZE;

use crate::error::{Context, Error, Result};
use crate::open;

/// The most `read` holds in memory at once.
const READ_CHUNK: u64 = 2 << 20;

/// Arguments of `read`.
#[derive(Debug, clap::Args)]
pub struct ReadArgs {
    /// The qcow2 image to read.
    file: PathBuf,
    /// First sector (512 bytes each) to read.
    #[arg(long, default_value_t = 0)]
    sector: u64,
    /// Number of sectors to read.
    #[arg(long, default_value_t = 1)]
    length: u64,
}

/// Arguments of `write`.
#[derive(Debug, clap::Args)]
pub struct WriteArgs {
    /// The qcow2 image to write.
    file: PathBuf,
    /// Sector (512 bytes each) where the text starts.
    #[arg(long)]
    sector: u64,
    /// The text to write; it is padded with zeros to whole sectors.
    #[arg(long)]
    text: String,
}

/// Writes `bytes` to stdout. A reader that went away shows as a broken pipe in the error's chain.
pub fn print(bytes: &[u8]) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes).and_then(|()| out.flush()).context(|| "could not write to stdout")
}

fn byte_offset(sector: u64) -> Result<u64> {
    sector.checked_mul(SECTOR_SIZE).ok_or_else(|| Error::msg(format!("sector {sector} is beyond any image")))
}

pub fn read(args: &ReadArgs) -> Result<()> {
    let path = &args.file;
    let image = open::image(path, true)?;
    let start = byte_offset(args.sector)?;
    let end = args
        .sector
        .checked_add(args.length)
        .and_then(|s| s.checked_mul(SECTOR_SIZE))
        .ok_or_else(|| Error::msg(format!("sectors {}+{} are beyond any image", args.sector, args.length)))?;
    let size = image.virtual_size().next_multiple_of(SECTOR_SIZE);
    if end > size {
        return Err(Error::msg(format!(
            "sectors {}..{} run past the end of '{}' ({} sectors)",
            args.sector,
            end / SECTOR_SIZE,
            path.display(),
            size / SECTOR_SIZE
        )));
    }
    let mut buf = Vec::new();
    let mut pos = start;
    while pos < end {
        let n = (end - pos).min(READ_CHUNK);
        buf.resize(n as usize, 0);
        image.read_at(pos, &mut buf).context(|| format!("could not read '{}' at byte {pos}", path.display()))?;
        print(&buf)?;
        pos += n;
    }
    Ok(())
}

pub fn write(args: &WriteArgs) -> Result<()> {
    let path = &args.file;
    let image = open::image(path, false)?;
    let offset = byte_offset(args.sector)?;
    let mut data = args.text.as_bytes().to_vec();
    let padded = (data.len() as u64).max(1).next_multiple_of(SECTOR_SIZE);
    data.resize(padded as usize, 0);
    image
        .write_at(offset, &data)
        .context(|| format!("could not write '{}' at sector {}", path.display(), args.sector))?;
    image.flush().context(|| format!("could not flush '{}'", path.display()))?;
    image.close().context(|| format!("could not close '{}'", path.display()))
}
