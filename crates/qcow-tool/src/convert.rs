//! `qcow-tool convert`: copy a raw or qcow2 image into a new raw or qcow2 image, as `qemu-img convert` does.
//!
//! Only data is copied: holes in a raw source and unallocated or zero clusters in a qcow2 source are skipped,
//! and so are all-zero blocks, so a raw output is sparse and a qcow2 output allocates only what holds data.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use qcow::block::{BlockDevice, FileDevice, FileOptions, SECTOR_SIZE};
use qcow::convert::AllocationMap;
use qcow::{Config, CreateOptions, Image};

use crate::error::{Context, Error, Result};
use crate::open::{self, Format};

/// Arguments of `convert`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Source format; probed from the file's magic when not given.
    #[arg(short = 'f', value_enum)]
    format: Option<Format>,
    /// Output format.
    #[arg(short = 'O', value_enum, default_value = "raw")]
    output_format: Format,
    /// Options of a qcow2 output, as for `create` (its size is the source's). May be given more than once.
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Show progress on stderr.
    #[arg(short = 'p')]
    progress: bool,
    /// The image to read.
    src: PathBuf,
    /// The image to write; an existing file is overwritten.
    dst: PathBuf,
}

/// An open source image.
enum Source {
    Raw(FileDevice),
    Qcow2(Box<Image<FileDevice>>),
}

impl Source {
    fn open(path: &Path, format: Option<Format>) -> Result<Self> {
        let format = match format {
            Some(f) => f,
            None => open::probe(path)?,
        };
        Ok(match format {
            Format::Raw => Source::Raw(open::file(path, true)?),
            Format::Qcow2 => Source::Qcow2(Box::new(open::image(path, true)?)),
        })
    }

    /// The device, its allocation map, and its size in bytes.
    fn parts(&self) -> (&dyn BlockDevice, &dyn AllocationMap, u64) {
        match self {
            Source::Raw(dev) => (dev, dev, dev.len_bytes()),
            Source::Qcow2(image) => (&**image, &**image, image.virtual_size()),
        }
    }
}

pub fn run(args: &Args) -> Result<()> {
    let (src_path, dst_path) = (&args.src, &args.dst);
    let source = Source::open(src_path, args.format)?;
    let (_, _, size) = source.parts();
    let mut options = CreateOptions::new(size);
    match args.output_format {
        Format::Qcow2 => {
            for list in &args.options {
                options.apply(list).context(|| "invalid -o option")?;
            }
            options.size = size;
            options.validate().context(|| "invalid -o option")?;
        }
        Format::Raw => {
            if let Some(list) = args.options.first() {
                return Err(Error::msg(format!("raw output takes no -o options (got '{list}')")));
            }
        }
    }
    refuse_same_file(src_path, dst_path)?;
    let result = match args.output_format {
        Format::Raw => to_raw(&source, dst_path, args.progress),
        Format::Qcow2 => to_qcow2(&source, &options, dst_path, args.progress),
    };
    if result.is_err() {
        // Leave no half-written copy behind.
        let _ = std::fs::remove_file(dst_path);
    }
    result
}

/// Refuses to overwrite the source: creating the destination truncates it.
fn refuse_same_file(src: &Path, dst: &Path) -> Result<()> {
    let (Ok(a), Ok(b)) = (std::fs::metadata(src), std::fs::metadata(dst)) else {
        return Ok(());
    };
    if a.dev() == b.dev() && a.ino() == b.ino() {
        return Err(Error::msg(format!(
            "'{}' and '{}' are the same file: the source would be overwritten",
            src.display(),
            dst.display()
        )));
    }
    Ok(())
}

fn create_file(path: &Path) -> Result<FileDevice> {
    FileDevice::create(path, &FileOptions::default()).context(|| format!("could not create '{}'", path.display()))
}

fn copy(source: &Source, dst: &dyn BlockDevice, dst_path: &Path, show: bool) -> Result<()> {
    let (src, map, size) = source.parts();
    let mut shown: Option<u64> = None;
    let mut progress = |done: u64, total: u64| {
        if !show {
            return;
        }
        // Hundredths of a percent, as qemu-img shows them.
        let step = if total == 0 { 10_000 } else { (u128::from(done) * 10_000 / u128::from(total)) as u64 };
        if shown != Some(step) {
            shown = Some(step);
            eprint!("    ({}.{:02}/100%)\r", step / 100, step % 100);
            let _ = std::io::stderr().flush();
        }
    };
    let result = qcow::convert::convert(src, map, size, dst, &mut progress)
        .context(|| format!("could not copy to '{}'", dst_path.display()));
    if show {
        eprintln!();
    }
    result
}

fn to_raw(source: &Source, path: &Path, show: bool) -> Result<()> {
    let (_, _, size) = source.parts();
    let dev = create_file(path)?;
    dev.resize(size.div_ceil(SECTOR_SIZE)).context(|| format!("could not resize '{}'", path.display()))?;
    copy(source, &dev, path, show)?;
    // The copy moved whole sectors; the file keeps the source's exact length.
    dev.file().set_len(size).context(|| format!("could not resize '{}'", path.display()))?;
    dev.flush().context(|| format!("could not flush '{}'", path.display()))
}

fn to_qcow2(source: &Source, options: &CreateOptions, path: &Path, show: bool) -> Result<()> {
    let dev = create_file(path)?;
    let image =
        Image::create(dev, options, Config::default()).context(|| format!("could not format '{}'", path.display()))?;
    copy(source, &image, path, show)?;
    image.close().context(|| format!("could not write '{}'", path.display()))
}
