//! `qcow-tool commit`: write what an image (and the images between it and the base) holds into the base, as
//! `qemu-img commit` does, then empty the image so that it reads through again, unless `-d` (or `-b`).
//!
//! The chain is opened layer by layer for its block status (which layer answers each range); the ranges answered
//! above the base are read through the image and written into the base by the library, which grows a smaller
//! base first. `-b BASE` names an image of the chain as qemu-img finds it: by the name recorded in the image
//! above it, or by the file a name relative to that image's directory (or an absolute one) opens.

use std::path::{Path, PathBuf};

use qcow::block::BlockDevice;
use qcow::{CommitRange, Config};

use crate::chain::{backing_name, Chain};
use crate::error::{Error, Result};
use crate::open::{self, ChainReads, Format};
use crate::progress::{Progress, ProgressArgs};
use crate::rebase::quiet_progress;
use crate::rw::print;

/// Arguments of `commit`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Format of the image; probed from the file's magic when not given.
    #[arg(short = 'f', value_enum)]
    format: Option<Format>,
    /// The image of the backing chain to commit into (default: the immediate backing file); implies -d.
    #[arg(short = 'b', value_name = "BASE")]
    base: Option<String>,
    /// Leave the image as it is afterwards, instead of emptying it.
    #[arg(short = 'd')]
    drop: bool,
    /// Print nothing but errors.
    #[arg(short = 'q')]
    quiet: bool,
    #[command(flatten)]
    progress: ProgressArgs,
    /// The image whose contents go down into the base.
    file: PathBuf,
}

pub fn run(args: &Args) -> Result<()> {
    let path = &args.file;
    let shown = path.display().to_string();
    let not_found = |base: &str| Error::msg(format!("Did not find '{base}' in the backing chain of '{shown}'"));
    let format = match args.format {
        Some(f) => f,
        None => open::probe(path)?,
    };
    if format == Format::Raw {
        return Err(match &args.base {
            Some(base) => not_found(base),
            None => Error::msg("Image does not have a backing file"),
        });
    }
    let chain = Chain::open(path, Some(Format::Qcow2))?;
    let depth = match &args.base {
        Some(base) => find_base(&chain, base).ok_or_else(|| not_found(base))?,
        None if chain.name(1).is_empty() => return Err(Error::msg("Image does not have a backing file")),
        None => 1,
    };
    let drop_top = args.drop || args.base.is_some();
    let base_path = PathBuf::from(chain.name(depth));
    let base_format = chain.layer_format(depth).unwrap_or(Format::Qcow2);
    drop(chain);
    // The base is opened read-write below, with QEMU's lock, which keeps every other writer out; our own reads of
    // the chain share it, or they would refuse that open.
    let top = open::image_over(path, drop_top, ChainReads::Shared)?;
    let base = match base_format {
        Format::Raw => Base::Raw(open::file(&base_path, false)?),
        // Discard makes zeros cheap in the base: zero clusters instead of written ones.
        Format::Qcow2 => {
            Base::Qcow2(Box::new(open::image_with(&base_path, Config { discard: true, ..Config::default() })?))
        }
    };
    let base_error = |e| open::io_error(&base_path, e);
    // A base smaller than the image grows first, so that the block status below sees the base's new end.
    let size = top.virtual_size().next_multiple_of(512);
    if base.device().info().size_bytes() < size {
        base.device().resize(size / 512).map_err(base_error)?;
        base.device().flush().map_err(base_error)?;
    }
    let ranges = ranges_above(path, depth, size)?;
    let total = ranges.iter().map(|r| r.len).sum();
    let mut progress = Progress::new(&quiet_progress(&args.progress, args.quiet), total, "bytes")?;
    top.commit_to(base.device(), &ranges, &mut |done, total| progress.set(done, total)).map_err(|e| match e {
        qcow::Error::Backing(_) => open::io_error(path, e),
        e => Error::wrap(format!("could not commit '{shown}' into '{}'", base_path.display()), e),
    })?;
    progress.finish(total);
    base.close().map_err(base_error)?;
    if !drop_top {
        top.make_empty().map_err(|e| open::io_error(path, e))?;
    }
    top.close().map_err(|e| open::io_error(path, e))?;
    if !args.quiet {
        print(b"Image committed.\n")?;
    }
    Ok(())
}

/// The base, opened for writing.
enum Base {
    Raw(qcow::block::FileDevice),
    Qcow2(Box<qcow::Image<qcow::block::FileDevice>>),
}

impl Base {
    fn device(&self) -> &dyn BlockDevice {
        match self {
            Base::Raw(file) => file,
            Base::Qcow2(image) => image.as_ref(),
        }
    }

    fn close(self) -> qcow::Result<()> {
        match self {
            Base::Raw(file) => file.flush(),
            Base::Qcow2(image) => image.close(),
        }
    }
}

/// Where `base` is in `chain` (1 for the immediate backing file), as qemu-img finds a backing image:
/// the name recorded in the image above it, or the same file as that name opens relative to the directory of the
/// image above (an absolute name as it is).
fn find_base(chain: &Chain, base: &str) -> Option<usize> {
    let mut depth = 1;
    while !chain.name(depth).is_empty() {
        let above = chain.name(depth - 1);
        let layer = std::fs::canonicalize(chain.name(depth)).ok();
        let candidate = std::fs::canonicalize(backing_name(above, base)).ok();
        if chain.recorded_name(depth) == Some(base) || (layer.is_some() && candidate == layer) {
            return Some(depth);
        }
        depth += 1;
    }
    None
}

/// The ranges of `top` answered by a layer above `base_depth` (allocated there, or reading zeros past the end of
/// a shorter layer), merged.
fn ranges_above(top: &Path, base_depth: usize, size: u64) -> Result<Vec<CommitRange>> {
    let chain = Chain::open_with(top, Some(Format::Qcow2), ChainReads::Shared)?;
    let mut ranges: Vec<CommitRange> = Vec::new();
    for s in chain.status(0, size)? {
        if s.depth >= base_depth || (!s.present && !s.zero) {
            continue;
        }
        let zero = s.zero && !s.data;
        match ranges.last_mut() {
            Some(last) if last.zero == zero && last.offset + last.len == s.start => last.len += s.length,
            _ => ranges.push(CommitRange { offset: s.start, len: s.length, zero }),
        }
    }
    Ok(ranges)
}
