//! `qcow-tool rebase`: move an image onto another backing file, as `qemu-img rebase` does.
//!
//! Safe mode (the default) opens the image with its backing chain and the new backing file, and the library
//! copies in what differs before recording the new name; `-b ""` flattens. `-u` only rewrites the name and the
//! format, opening neither backing file. A relative `-b` is relative to the image's directory, as qemu-img has
//! it, and recorded as given. The new backing file's format is never probed: `-F` is required wherever qemu-img
//! requires it (any new name), and refused up front rather than after the copy.

use std::path::{Path, PathBuf};

use qcow::block::{FileDevice, Padded};
use qcow::{Backing, NewBacking, RebaseOptions, Refusal};

use crate::chain::backing_name;
use crate::error::{Error, Result};
use crate::open::{self, Format};
use crate::progress::{Progress, ProgressArgs};

/// Format names qemu-img knows but this tool cannot open as a backing file.
const OTHER_QEMU_FORMATS: &[&str] = &[
    "blkdebug",
    "blklogwrites",
    "blkverify",
    "bochs",
    "cloop",
    "compress",
    "copy-before-write",
    "copy-on-read",
    "dmg",
    "file",
    "ftp",
    "ftps",
    "host_cdrom",
    "host_device",
    "http",
    "https",
    "luks",
    "nbd",
    "null-aio",
    "null-co",
    "nvme",
    "parallels",
    "preallocate",
    "qcow",
    "qed",
    "quorum",
    "replication",
    "snapshot-access",
    "ssh",
    "throttle",
    "vdi",
    "vhdx",
    "vmdk",
    "vpc",
    "vvfat",
];

/// Arguments of `rebase`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Unsafe mode: only rewrite the backing file name and format; nothing is compared or copied, and neither
    /// backing file needs to open (for a backing file that was renamed or moved).
    #[arg(short = 'u')]
    unsafe_mode: bool,
    /// The new backing file ("" for none: the image then holds everything itself). Relative to the image's
    /// directory, and recorded as given.
    #[arg(short = 'b', value_name = "BACKING", allow_hyphen_values = true)]
    backing: Option<String>,
    /// Format of the new backing file (raw or qcow2): required with a new backing file name, since formats are
    /// recorded and never probed.
    #[arg(short = 'F', short_alias = 'B', value_name = "FMT")]
    backing_format: Option<String>,
    /// Write the clusters copied in compressed.
    #[arg(short = 'c')]
    compress: bool,
    /// Format of the image; probed from the file's magic when not given.
    #[arg(short = 'f', value_enum)]
    format: Option<Format>,
    /// Print nothing but errors (no progress).
    #[arg(short = 'q')]
    quiet: bool,
    #[command(flatten)]
    progress: ProgressArgs,
    /// The image to rebase.
    file: PathBuf,
}

pub fn run(args: &Args) -> Result<()> {
    if !args.unsafe_mode && args.backing.is_none() {
        return Err(Error::msg("Must specify backing file (-b) or use unsafe mode (-u)"));
    }
    let path = &args.file;
    let format = match args.format {
        Some(f) => f,
        None => open::probe(path)?,
    };
    if format == Format::Raw && args.compress {
        return Err(Error::msg("Compression not supported for this file format"));
    }
    let backing_format = match args.backing_format.as_deref() {
        None => None,
        Some(f @ ("raw" | "qcow2")) => Some(f),
        Some(f) if OTHER_QEMU_FORMATS.contains(&f) => {
            return Err(Error::msg(format!("backing format '{f}' is not supported (raw and qcow2 are)")));
        }
        Some(f) => return Err(Error::msg(format!("Invalid format name: '{f}'"))),
    };
    let shown = args.backing.clone().unwrap_or_default();
    let change_failed = |why: &str| Error::msg(format!("Could not change the backing file to '{shown}': {why}"));
    if format == Format::Raw {
        return Err(change_failed("Operation not supported"));
    }
    // An empty name and no name both remove the backing file; the format goes with the name.
    let name = args.backing.as_deref().filter(|b| !b.is_empty());
    if name.is_some() && backing_format.is_none() {
        return Err(change_failed("backing format must be specified"));
    }
    let refused = |e: qcow::Error| match &e {
        qcow::Error::Refused(Refusal::HeaderFull { .. }) => change_failed("No space left in the file header"),
        qcow::Error::Refused(Refusal::BackingNameTooLong { .. }) => change_failed("Invalid argument"),
        qcow::Error::Refused(Refusal::BackingFormatRequired) => change_failed("backing format must be specified"),
        _ => open::io_error(path, e),
    };
    if args.unsafe_mode {
        let mut image = open::image_without_backing(path)?;
        image.set_backing_file(name, backing_format, None).map_err(refused)?;
        return image.close().map_err(|e| open::io_error(path, e));
    }
    let mut image = open::image(path, false)?;
    let new = match (name, backing_format) {
        (Some(name), Some(format)) => Some(NewBacking {
            name: name.to_string(),
            format: format.to_string(),
            backing: open_new_backing(path, name, format)?,
        }),
        _ => None,
    };
    let total = image.virtual_size();
    let mut progress = Progress::new(&quiet_progress(&args.progress, args.quiet), total, "bytes")?;
    image
        .rebase(new, RebaseOptions { compress: args.compress }, &mut |done, total| progress.set(done, total))
        .map_err(refused)?;
    progress.finish(total);
    image.close().map_err(|e| open::io_error(path, e))
}

/// No progress at all with -q, as qemu-img.
pub fn quiet_progress(args: &ProgressArgs, quiet: bool) -> ProgressArgs {
    if quiet {
        ProgressArgs { progress: false, progress_fd: None }
    } else {
        args.clone()
    }
}

/// Opens the new backing file `name` (relative to the directory of `image`) as `format`, refusing one whose
/// chain leads back to the image itself (the image would become its own backing file).
fn open_new_backing(image: &Path, name: &str, format: &str) -> Result<Backing> {
    let full = PathBuf::from(backing_name(&image.display().to_string(), name));
    let failed = |e: Error| Error::wrap(format!("Could not open new backing file '{name}'"), e);
    let fmt = if format == "raw" { Format::Raw } else { Format::Qcow2 };
    if leads_back(image, &full, fmt).map_err(failed)? {
        return Err(failed(Error::msg(format!("its backing chain leads back to '{}' itself", image.display()))));
    }
    match fmt {
        Format::Raw => {
            let file: FileDevice = open::file(&full, true).map_err(failed)?;
            let size = file.len_bytes();
            Ok(Backing::new(Box::new(Padded::new(file)), size))
        }
        Format::Qcow2 => {
            let backing = open::image(&full, true).map_err(failed)?;
            let size = backing.virtual_size();
            Ok(Backing::new(Box::new(backing), size))
        }
    }
}

/// Whether the chain that starts at `start` (in `format`) reaches `image`; only headers are read.
fn leads_back(image: &Path, start: &Path, format: Format) -> Result<bool> {
    let Ok(own) = std::fs::canonicalize(image) else { return Ok(false) };
    let (mut name, mut format) = (start.display().to_string(), format);
    for _ in 0..64 {
        if std::fs::canonicalize(&name).is_ok_and(|p| p == own) {
            return Ok(true);
        }
        if format == Format::Raw {
            return Ok(false);
        }
        let header = open::image_metadata(Path::new(&name))?.header();
        let Some(next) = header.backing_file.as_deref() else { return Ok(false) };
        format = match header.backing_format().as_deref() {
            Some("raw") => Format::Raw,
            _ => Format::Qcow2,
        };
        name = backing_name(&name, &String::from_utf8_lossy(next));
    }
    Ok(false)
}
