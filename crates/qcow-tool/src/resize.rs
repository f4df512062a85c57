//! `qcow-tool resize`: change an image's virtual size, as `qemu-img resize FILE [+|-]SIZE [--shrink]` does.
//!
//! Growing needs nothing; shrinking drops everything past the new end and is refused without `--shrink`, with
//! qemu-img's words. A qcow2 image only takes sizes in whole sectors, a raw file any size, as with qemu-img.

use std::path::PathBuf;

use crate::error::{Context, Error, Result};
use crate::open::{self, Format};
use crate::rw::print;

/// Arguments of `resize`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Image format; probed from the file's magic when not given.
    #[arg(short = 'f', long = "format", value_enum)]
    format: Option<Format>,
    /// Allow making the image smaller, which deletes the data past the new end (the reference's name for it,
    /// --ignore-data-loss, is accepted too).
    #[arg(long, alias = "ignore-data-loss")]
    shrink: bool,
    /// Print nothing on success.
    #[arg(short = 'q', long)]
    quiet: bool,
    /// The image to resize.
    file: PathBuf,
    /// The new size, or with + or - the change (K, M, G, T, P suffixes accepted).
    #[arg(allow_hyphen_values = true, value_name = "[+|-]SIZE")]
    size: String,
}

/// The new size: `text` is absolute, or relative to `current` with a sign.
fn new_size(text: &str, current: u64) -> Result<u64> {
    let positive = || Error::msg(format!("new image size must be positive (asked for '{text}')"));
    if let Some(rest) = text.strip_prefix('+') {
        return current.checked_add(open::size(rest)?).ok_or_else(|| Error::msg(format!("'{text}': size overflows")));
    }
    if let Some(rest) = text.strip_prefix('-') {
        return current.checked_sub(open::size(rest)?).filter(|&n| n > 0).ok_or_else(positive);
    }
    let size = open::size(text)?;
    if size == 0 {
        return Err(positive());
    }
    Ok(size)
}

pub fn run(args: &Args) -> Result<()> {
    let path = &args.file;
    let format = match args.format {
        Some(f) => f,
        None => open::probe(path)?,
    };
    let shrink_refused = || Error::msg("use the --shrink option to perform a shrink operation");
    match format {
        Format::Raw => {
            let dev = open::file(path, false)?;
            let current = dev.len_bytes();
            let size = new_size(&args.size, current)?;
            if size < current && !args.shrink {
                return Err(shrink_refused());
            }
            dev.file().set_len(size).context(|| format!("could not resize '{}'", path.display()))?;
        }
        Format::Qcow2 => {
            let image = open::image(path, false)?;
            let current = image.virtual_size();
            let size = new_size(&args.size, current)?;
            if size < current && !args.shrink {
                return Err(shrink_refused());
            }
            if size % 512 != 0 {
                // qemu-img's words; its qcow2 driver refuses the size after the shrink question, as here.
                return Err(Error::msg("The new size must be a multiple of 512"));
            }
            // qemu-img's words, and its order: a bitmap left in use by a writer that did not store it blocks it.
            let bitmaps = image.list_bitmaps().map_err(|e| open::io_error(path, e))?;
            if let Some(b) = bitmaps.iter().find(|b| !b.consistent) {
                return Err(Error::msg(crate::bitmap::inconsistent(path, &b.name)));
            }
            if size < current && !image.snapshots().map_err(|e| open::io_error(path, e))?.is_empty() {
                return Err(Error::msg(format!("'{}': can't shrink an image which has snapshots", path.display())));
            }
            image.resize(size, args.shrink).map_err(|e| open::io_error(path, e))?;
            image.close().map_err(|e| open::io_error(path, e))?;
        }
    }
    if !args.quiet {
        print(b"Image resized.\n")?;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn sizes_may_be_relative() {
        assert_eq!(new_size("+1M", 1 << 20).unwrap(), 2 << 20);
        assert_eq!(new_size("-512K", 1 << 20).unwrap(), 512 << 10);
        assert_eq!(new_size("3G", 1 << 20).unwrap(), 3 << 30);
        assert!(new_size("-1M", 1 << 20).is_err());
        assert!(new_size("0", 1 << 20).is_err());
        assert!(new_size("12Q", 1 << 20).is_err());
    }
}
