//! `qcow-tool convert`: copy a raw or qcow2 image into a new raw or qcow2 image, as `qemu-img convert` does.
//!
//! Only data is copied: holes in a raw source and unallocated or zero clusters in a qcow2 source are skipped,
//! and so are all-zero blocks, so a raw output is sparse and a qcow2 output allocates only what holds data. A
//! qcow2 source that is an overlay is read through its backing chain, so the copy stands alone.
//!
//! With `-c`, every cluster of a qcow2 output that holds data is written compressed (whole clusters, the last
//! partial one included); clusters that compression does not shrink are stored as they are, as qemu-img does.

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
    /// Compress the data clusters of the (qcow2) output; -o compression_type=zlib|zstd picks the algorithm.
    #[arg(short = 'c')]
    compress: bool,
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
            // An overlay reads through its backing chain.
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
            if args.compress {
                return Err(Error::msg("raw output cannot be compressed: -c needs -O qcow2"));
            }
        }
    }
    refuse_same_file(src_path, dst_path)?;
    let result = match args.output_format {
        Format::Raw => to_raw(&source, dst_path, args.progress),
        Format::Qcow2 => to_qcow2(&source, &options, dst_path, args.progress, args.compress),
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

/// Progress on stderr in hundredths of a percent, as qemu-img shows it; silent unless `show`.
fn progress_printer(show: bool) -> impl FnMut(u64, u64) {
    let mut shown: Option<u64> = None;
    move |done: u64, total: u64| {
        if !show {
            return;
        }
        let step = if total == 0 { 10_000 } else { (u128::from(done) * 10_000 / u128::from(total)) as u64 };
        if shown != Some(step) {
            shown = Some(step);
            eprint!("    ({}.{:02}/100%)\r", step / 100, step % 100);
            let _ = std::io::stderr().flush();
        }
    }
}

fn copy(source: &Source, dst: &dyn BlockDevice, dst_path: &Path, show: bool) -> Result<()> {
    let (src, map, size) = source.parts();
    let mut progress = progress_printer(show);
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

fn to_qcow2(source: &Source, options: &CreateOptions, path: &Path, show: bool, compress: bool) -> Result<()> {
    let dev = create_file(path)?;
    let image =
        Image::create(dev, options, Config::default()).context(|| format!("could not format '{}'", path.display()))?;
    if compress {
        if show {
            let result = copy_compressed(source, &image, path, &mut progress_printer(true));
            eprintln!();
            result?;
        } else {
            copy_compressed(source, &image, path, &mut |_, _| {})?;
        }
    } else {
        copy(source, &image, path, show)?;
    }
    image.close().context(|| format!("could not write '{}'", path.display()))
}

/// The most [`copy_compressed`] reads at once.
const COMPRESS_CHUNK: u64 = 2 << 20;

/// How much of the source [`copy_compressed`] maps at once: a multiple of every cluster size.
const MAP_WINDOW: u64 = 1 << 30;

/// Copies the source into `image` one whole cluster at a time, each written compressed. Only clusters that the
/// source's map says may hold data are read, and clusters that read as all zeros are not written at all. The
/// last cluster of a disk whose size is not a cluster multiple is written compressed too, as far as the disk's
/// last sector.
fn copy_compressed(
    source: &Source,
    image: &Image<FileDevice>,
    path: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    let (src, map, size) = source.parts();
    let cs = image.geometry().cluster_size();
    let disk_end = size.next_multiple_of(SECTOR_SIZE);
    let failed =
        |what: &str, at: u64| format!("could not {what} at byte {at} while compressing into '{}'", path.display());
    progress(0, size);
    let mut buf = Vec::new();
    let mut window = 0;
    while window < size {
        let window_end = size.min(window + MAP_WINDOW);
        // Clusters of this window that may hold data, in order, each once. The window is a whole number of
        // clusters, so every cluster belongs to exactly one window.
        let mut clusters: Vec<u64> = Vec::new();
        let ranges = map
            .data_ranges(window, window_end - window)
            .map_err(|e| Error::wrap(failed("map the source", window), e))?;
        for (start, len) in ranges {
            let (start, end) = (start.max(window), start.saturating_add(len).min(window_end));
            if start < end {
                clusters.extend(start / cs..end.div_ceil(cs));
            }
        }
        clusters.sort_unstable();
        clusters.dedup();
        let mut i = 0;
        while let Some(&first) = clusters.get(i) {
            // A run of consecutive clusters, read in one go.
            let mut count = 1;
            while clusters.get(i + count) == Some(&(first + count as u64)) && (count as u64 + 1) * cs <= COMPRESS_CHUNK
            {
                count += 1;
            }
            let start = first * cs;
            let end = ((first + count as u64) * cs).min(disk_end);
            buf.resize((end - start) as usize, 0);
            src.read_at(start, &mut buf).map_err(|e| Error::wrap(failed("read the source", start), e))?;
            for (n, cluster) in buf.chunks(cs as usize).enumerate() {
                if cluster.iter().all(|&b| b == 0) {
                    continue;
                }
                let at = start + n as u64 * cs;
                image.write_compressed(at, cluster).map_err(|e| Error::wrap(failed("write", at), e))?;
            }
            progress(end.min(size), size);
            i += count;
        }
        window = window_end;
        progress(window, size);
    }
    progress(size, size);
    Ok(())
}
