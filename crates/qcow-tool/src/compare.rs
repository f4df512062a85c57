//! `qcow-tool compare`: whether two images hold the same guest data, as `qemu-img compare` decides it, with its
//! messages and exit codes: 0 identical, 1 different, 2 when the comparison could not be made.
//!
//! Ranges where both images read as zeros without storing data are not read. Elsewhere both are read and the
//! first differing 512-byte sector is the reported offset, as qemu-img reports it. Images of different sizes
//! compare equal when the larger one holds only zeros past the smaller one's end, unless `-s` is given. In
//! strict mode the block status of each range (allocation, zero, data, compressed, whether it runs to the end)
//! must match as well.

use std::path::{Path, PathBuf};

use crate::chain::{Chain, Status};
use crate::disk::Disk;
use crate::error::{Error, Result};
use crate::open::{self, Format};
use crate::progress::{Progress, ProgressArgs};
use crate::rw::print;

/// Bytes read from each image at a time.
const CHUNK: u64 = 1 << 20;

/// Arguments of `compare`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Format of the first image; probed from its magic when not given.
    #[arg(short = 'f', value_enum)]
    format1: Option<Format>,
    /// Format of the second image; probed from its magic when not given.
    #[arg(short = 'F', value_enum)]
    format2: Option<Format>,
    /// Strict: images of different sizes, or with different allocation, differ.
    #[arg(short = 's', long)]
    strict: bool,
    /// Print nothing; the exit code tells.
    #[arg(short = 'q', long)]
    quiet: bool,
    #[command(flatten)]
    progress: ProgressArgs,
    /// The first image.
    file1: PathBuf,
    /// The second image.
    file2: PathBuf,
}

/// What the comparison found.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Identical,
    Different(String),
}

/// Runs `compare`; errors are reported here, since they exit 2 rather than 1.
pub fn run(args: &Args) -> Result<u8> {
    match compare(args) {
        Ok((warnings, verdict)) => {
            if !args.quiet {
                let mut text = warnings;
                text.push_str(match &verdict {
                    Verdict::Identical => "Images are identical.",
                    Verdict::Different(why) => why,
                });
                text.push('\n');
                print(text.as_bytes())?;
            }
            Ok(u8::from(verdict != Verdict::Identical))
        }
        Err(e) if e.is_broken_pipe() => Err(e),
        Err(e) => {
            eprintln!("qcow-tool: {}", e.chain());
            Ok(2)
        }
    }
}

fn compare(args: &Args) -> Result<(String, Verdict)> {
    let a = Disk::open(&args.file1, args.format1)?;
    let b = Disk::open(&args.file2, args.format2)?;
    let (size_a, size_b) = (a.size(), b.size());
    if size_a != size_b && args.strict {
        return Ok((String::new(), Verdict::Different("Strict mode: Image size mismatch!".into())));
    }
    let common = size_a.min(size_b);
    let mut progress = Progress::new(&args.progress, common, "bytes")?;
    let content = first_difference(&a, &b, common, [&args.file1, &args.file2], &mut progress)?;
    progress.finish(common);
    if args.strict {
        // qemu-img compares each range's status before its content: a status mismatch at or before the first
        // differing sector is the one it reports.
        let status = status_mismatch(&args.file1, args.format1, &args.file2, args.format2, common)?;
        if let Some(offset) = status.filter(|&s| content.is_none_or(|c| s <= c)) {
            return Ok((
                String::new(),
                Verdict::Different(format!("Strict mode: Offset {offset} block status mismatch!")),
            ));
        }
    }
    if let Some(offset) = content {
        return Ok((String::new(), Verdict::Different(format!("Content mismatch at offset {offset}!"))));
    }
    let mut warnings = String::new();
    if size_a != size_b {
        // Only reached once the common part matched, as qemu-img warns.
        warnings.push_str("Warning: Image size mismatch!\n");
    }
    let (longer, longer_name) = if size_a > size_b { (&a, &args.file1) } else { (&b, &args.file2) };
    let found = first_nonzero(longer, common, size_a.max(size_b), longer_name)?;
    Ok((
        warnings,
        match found {
            Some(offset) => Verdict::Different(format!("Content mismatch at offset {offset}!")),
            None => Verdict::Identical,
        },
    ))
}

/// The first offset where the block status of the two images differs, as qemu-img's strict mode sees it.
fn status_mismatch(
    path_a: &Path,
    format_a: Option<Format>,
    path_b: &Path,
    format_b: Option<Format>,
    common: u64,
) -> Result<Option<u64>> {
    let (chain_a, chain_b) = (Chain::open(path_a, format_a)?, Chain::open(path_b, format_b)?);
    let (list_a, list_b) = (chain_a.status(0, common)?, chain_b.status(0, common)?);
    let flags = |s: &Status, size: u64| {
        (s.present, s.zero, s.data, s.compressed, s.offset.is_some(), s.start + s.length >= size)
    };
    let (mut i, mut j) = (0, 0);
    while let (Some(x), Some(y)) = (list_a.get(i), list_b.get(j)) {
        let at = x.start.max(y.start);
        if flags(x, chain_a.size()) != flags(y, chain_b.size()) {
            return Ok(Some(at));
        }
        let (end_x, end_y) = (x.start + x.length, y.start + y.length);
        if end_x <= end_y {
            i += 1;
        }
        if end_y <= end_x {
            j += 1;
        }
    }
    Ok(None)
}

/// Whether `start..end` may hold data on `disk`.
fn may_hold_data(disk: &Disk, start: u64, end: u64, path: &Path) -> Result<bool> {
    let ranges = disk.map().data_ranges(start, end - start).map_err(|e| open::io_error(path, e))?;
    Ok(ranges.iter().any(|&(_, len)| len > 0))
}

/// The first 512-byte sector below `end` where the two disks differ.
fn first_difference(a: &Disk, b: &Disk, end: u64, paths: [&Path; 2], progress: &mut Progress) -> Result<Option<u64>> {
    let [path_a, path_b] = paths;
    let (mut buf_a, mut buf_b) = (Vec::new(), Vec::new());
    let mut pos = 0;
    while pos < end {
        let stop = (pos + CHUNK).min(end);
        if may_hold_data(a, pos, stop, path_a)? || may_hold_data(b, pos, stop, path_b)? {
            let len = (stop - pos).next_multiple_of(512) as usize;
            buf_a.resize(len, 0);
            buf_b.resize(len, 0);
            a.read(pos, &mut buf_a).map_err(|e| read_error(path_a, pos, e))?;
            b.read(pos, &mut buf_b).map_err(|e| read_error(path_b, pos, e))?;
            let differs = buf_a.chunks(512).zip(buf_b.chunks(512)).position(|(x, y)| x != y);
            if let Some(sector) = differs {
                return Ok(Some(pos + sector as u64 * 512));
            }
        }
        pos = stop;
        progress.set(pos, end);
    }
    Ok(None)
}

/// The first 512-byte sector of `start..end` on `disk` that is not all zeros.
fn first_nonzero(disk: &Disk, start: u64, end: u64, path: &Path) -> Result<Option<u64>> {
    let mut buf = Vec::new();
    let mut pos = start;
    while pos < end {
        let stop = (pos + CHUNK).min(end);
        if may_hold_data(disk, pos, stop, path)? {
            buf.resize((stop - pos).next_multiple_of(512) as usize, 0);
            disk.read(pos, &mut buf).map_err(|e| read_error(path, pos, e))?;
            if let Some(sector) = buf.chunks(512).position(|s| s.iter().any(|&b| b != 0)) {
                return Ok(Some(pos + sector as u64 * 512));
            }
        }
        pos = stop;
    }
    Ok(None)
}

fn read_error(path: &Path, offset: u64, e: qcow::Error) -> Error {
    Error::wrap(format!("error while reading offset {offset} of '{}'", path.display()), e)
}
