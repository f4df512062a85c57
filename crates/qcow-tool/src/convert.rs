//! `qcow-tool convert`: copy a raw or qcow2 image into a raw or qcow2 image, as `qemu-img convert` does, with
//! the library's parallel engine ([`qcow::convert::run`]).
//!
//! Only data is copied: holes in a raw source and unallocated or zero clusters in a qcow2 source are skipped,
//! and so are all-zero blocks, so a raw output is sparse and a qcow2 output allocates only what holds data. A
//! qcow2 source that is an overlay is read through its backing chain, so the copy stands alone, unless `-B`
//! makes the output an overlay itself: then only what differs from the new backing file is stored.
//!
//! With `-c`, every cluster of a qcow2 output that holds data is compressed (on every core, with the image's
//! `compression_type` and the level `-o compression_level=N` gives); clusters that compression does not shrink
//! are stored as they are, as qemu-img does. The output is the same file on every run, whatever the thread
//! count: clusters are stored in guest order.

use std::path::{Path, PathBuf};

use qcow::block::{BlockDevice, FileDevice, FileOptions, Padded, Unsynced, SECTOR_SIZE};
use qcow::convert::{AllocationMap, Compression, DeviceTarget, ImageTarget, Options, Source, Target, Union, Watch};
use qcow::{Config, CreateOptions, FileResolver, Image};

use crate::error::{Context, Error, Result};
use crate::open::{self, Format};
use crate::progress::{Progress, ProgressArgs};

/// Arguments of `convert`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Source format; probed from the file's magic when not given.
    #[arg(short = 'f', value_enum)]
    format: Option<Format>,
    /// Output format.
    #[arg(short = 'O', value_enum, default_value = "raw")]
    output_format: Format,
    /// Options of a qcow2 output, as for `create` (its size is the source's), plus compression_level=N for -c
    /// (zlib 1..=9, default 6; zstd 1..=22, default 3). May be given more than once.
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Compress the data clusters of the (qcow2) output; -o compression_type=zlib|zstd picks the algorithm.
    #[arg(short = 'c')]
    compress: bool,
    /// Make the (qcow2) output an overlay of this backing file, storing only what differs from it. A relative
    /// name is resolved against the output's directory and recorded as given.
    #[arg(short = 'B', short_alias = 'b', value_name = "BACKING")]
    backing: Option<String>,
    /// Format of the backing file given with -B; probed when not given.
    #[arg(short = 'F', value_enum, value_name = "FMT")]
    backing_format: Option<Format>,
    /// Convert an internal snapshot of a qcow2 source instead of its current state: snapshot.name=NAME,
    /// snapshot.id=ID, or a bare name or id.
    #[arg(short = 'l', value_name = "SNAPSHOT")]
    snapshot: Option<String>,
    /// Do not create the output: write into an existing image or file at least as large as the source. Everything
    /// the source does not hold is zeroed.
    #[arg(short = 'n')]
    no_create: bool,
    /// Worker threads (qemu-img's number of parallel requests); every core by default.
    #[arg(short = 'm', value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    threads: Option<u16>,
    /// Accepted for qemu-img compatibility: workers always run out of order, while the output is stored in
    /// order, so the result is the same file either way.
    #[arg(short = 'W')]
    out_of_order: bool,
    /// Cache mode of the output, as qemu-img's: unsafe (the default, as in qemu-img convert) never forces the
    /// output to stable storage; writeback, writethrough, none and directsync flush it when the copy is done.
    #[arg(short = 't', value_name = "CACHE", default_value = "unsafe")]
    cache: Cache,
    #[command(flatten)]
    progress: ProgressArgs,
    /// The image to read.
    src: PathBuf,
    /// The image to write; an existing file is overwritten (unless -n).
    dst: PathBuf,
}

/// Output cache modes, by qemu-img's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Cache {
    /// No flushes.
    Unsafe,
    /// Flushes at the end.
    Writeback,
    /// Flushes at the end (writes are not made synchronous).
    Writethrough,
    /// Flushes at the end (the page cache is not bypassed).
    None,
    /// Flushes at the end (writes are not made synchronous, the page cache is not bypassed).
    Directsync,
}

/// An open source or backing image, with its allocation map.
enum Input {
    /// The file.
    Raw(FileDevice),
    /// The image.
    Qcow2(Box<Image<FileDevice>>),
}

impl Input {
    fn open(path: &Path, format: Option<Format>) -> Result<Self> {
        let format = match format {
            Some(f) => f,
            None => open::probe(path)?,
        };
        Ok(match format {
            Format::Raw => Input::Raw(open::file(path, true)?),
            // An overlay reads through its backing chain.
            Format::Qcow2 => Input::Qcow2(Box::new(open::image(path, true)?)),
        })
    }

    fn open_snapshot(path: &Path, format: Option<Format>, spec: &str) -> Result<Self> {
        let format = match format {
            Some(f) => f,
            None => open::probe(path)?,
        };
        if format != Format::Qcow2 {
            return Err(Error::msg(format!("'{}' is raw: only qcow2 images have snapshots (-l)", path.display())));
        }
        let name = snapshot_name(spec)?;
        let image = Image::open_snapshot_path(path, name)
            .map_err(|e| Error::wrap(format!("could not open snapshot '{name}' of '{}'", path.display()), e))?;
        Ok(Input::Qcow2(Box::new(image)))
    }

    fn device(&self) -> &dyn BlockDevice {
        match self {
            Input::Raw(dev) => dev,
            Input::Qcow2(image) => &**image,
        }
    }

    fn map(&self) -> &dyn AllocationMap {
        match self {
            Input::Raw(dev) => dev,
            Input::Qcow2(image) => &**image,
        }
    }

    fn size(&self) -> u64 {
        match self {
            Input::Raw(dev) => dev.len_bytes(),
            Input::Qcow2(image) => image.virtual_size(),
        }
    }

    /// A watch on the file the source's own data lives in, so that a truncation by another process during the
    /// copy is an error rather than zeros. None for a qcow2 source with an external data file.
    fn watch(&self) -> Result<Option<Watch<'_>>> {
        let file = match self {
            Input::Raw(dev) => dev.file(),
            Input::Qcow2(image) if image.header().has_external_data_file() => return Ok(None),
            Input::Qcow2(image) => image.device().file(),
        };
        Watch::new(file).map(Some).map_err(|e| Error::wrap("could not read the source's length".to_string(), e))
    }
}

/// The snapshot `-l` names: `snapshot.name=S`, `snapshot.id=I` (both looked up by name first, then id, as the
/// library does), or a bare name or id.
fn snapshot_name(spec: &str) -> Result<&str> {
    let mut found = None;
    for part in spec.split(',') {
        let value = match part.split_once('=') {
            Some(("snapshot.name" | "snapshot.id", v)) => v,
            Some((key, _)) => {
                return Err(Error::msg(format!("-l {spec}: unknown key '{key}' (snapshot.name, snapshot.id)")))
            }
            None => part,
        };
        if found.is_some() {
            return Err(Error::msg(format!("-l {spec}: name one snapshot")));
        }
        found = Some(value);
    }
    found.filter(|v| !v.is_empty()).ok_or_else(|| Error::msg(format!("-l '{spec}': no snapshot named")))
}

/// Takes `compression_level=N` out of the -o lists (the rest goes to `create`).
fn split_level(lists: &[String]) -> Result<(Vec<String>, Option<i32>)> {
    let mut level = None;
    let mut rest = Vec::new();
    for list in lists {
        let mut keep = Vec::new();
        for kv in list.split(',') {
            match kv.trim().split_once('=') {
                Some(("compression_level", v)) => {
                    let n: i32 = v
                        .parse()
                        .map_err(|_| Error::msg(format!("invalid -o option: compression_level={v}: not a number")))?;
                    if !(1..=22).contains(&n) {
                        return Err(Error::msg(format!(
                            "invalid -o option: compression_level={n}: zlib takes 1..=9, zstd 1..=22"
                        )));
                    }
                    level = Some(n);
                }
                _ => keep.push(kv),
            }
        }
        if !keep.is_empty() {
            rest.push(keep.join(","));
        }
    }
    Ok((rest, level))
}

pub fn run(args: &Args) -> Result<()> {
    let (src_path, dst_path) = (&args.src, &args.dst);
    let source = match &args.snapshot {
        Some(spec) => Input::open_snapshot(src_path, args.format, spec)?,
        None => Input::open(src_path, args.format)?,
    };
    let size = source.size();
    let (lists, level) = split_level(&args.options)?;
    if args.output_format == Format::Raw {
        if let Some(list) = lists.first() {
            return Err(Error::msg(format!("raw output takes no -o options (got '{list}')")));
        }
        if args.compress {
            return Err(Error::msg("raw output cannot be compressed: -c needs -O qcow2"));
        }
        if args.backing.is_some() {
            return Err(Error::msg("raw output cannot have a backing file: -B needs -O qcow2"));
        }
    }
    if level.is_some() && !args.compress {
        return Err(Error::msg("-o compression_level only applies with -c"));
    }
    open::refuse_same_file(src_path, dst_path)?;
    let result = match args.output_format {
        Format::Raw => to_raw(args, &source, size),
        Format::Qcow2 => to_qcow2(args, &source, size, &lists, level),
    };
    if result.is_err() && !args.no_create {
        // Leave no half-written copy behind.
        let _ = std::fs::remove_file(dst_path);
    }
    result
}

fn engine_options(args: &Args) -> Options {
    let mut options = Options { target_is_zero: !args.no_create, ..Options::default() };
    if let Some(n) = args.threads {
        options.threads = usize::from(n);
        options.in_flight = options.threads * 2 + 2;
    }
    options
}

/// Runs the copy with progress as the user asked.
fn copy(args: &Args, source: &Source<'_>, target: &dyn Target, options: &Options) -> Result<()> {
    let mut progress = Progress::new(&args.progress, source.size, "bytes")?;
    qcow::convert::run(source, target, options, &mut |done, total| progress.set(done, total))
        .context(|| format!("could not convert '{}' to '{}'", args.src.display(), args.dst.display()))?;
    progress.finish(source.size);
    Ok(())
}

fn to_raw(args: &Args, input: &Input, size: u64) -> Result<()> {
    let path = &args.dst;
    let dev = if args.no_create {
        let dev = open::target_file(path)?;
        if dev.len_bytes() < size {
            return Err(Error::msg(format!(
                "'{}' is {} bytes, smaller than the source's {size} (-n writes into the existing file)",
                path.display(),
                dev.len_bytes()
            )));
        }
        dev
    } else {
        let dev = FileDevice::create(path, &FileOptions::default())
            .context(|| format!("could not create '{}'", path.display()))?;
        dev.resize(size.div_ceil(SECTOR_SIZE)).context(|| format!("could not resize '{}'", path.display()))?;
        dev
    };
    let watch = input.watch()?;
    let source = Source { device: input.device(), map: input.map(), size, base: None, watch: watch.as_ref() };
    let unsynced = Unsynced::new(&dev);
    let target: &dyn BlockDevice = if args.cache == Cache::Unsafe { &unsynced } else { &dev };
    copy(args, &source, &DeviceTarget(target), &engine_options(args))?;
    if !args.no_create {
        // The copy moved whole sectors; the file keeps the source's exact length.
        dev.file().set_len(size).context(|| format!("could not resize '{}'", path.display()))?;
    }
    target.flush().context(|| format!("could not flush '{}'", path.display()))
}

fn to_qcow2(args: &Args, input: &Input, size: u64, lists: &[String], level: Option<i32>) -> Result<()> {
    let path = &args.dst;
    if args.no_create {
        if !lists.is_empty() || args.backing.is_some() {
            return Err(Error::msg("-n writes into an existing image: -o and -B do not apply"));
        }
        let file = open::target_file(path)?;
        return if args.cache == Cache::Unsafe {
            into_qcow2(args, input, size, level, Unsynced::new(file), None)
        } else {
            into_qcow2(args, input, size, level, file, None)
        };
    }
    let mut options = CreateOptions::new(size);
    for list in lists {
        options.apply(list).context(|| "invalid -o option")?;
    }
    options.size = size;
    if let Some(backing) = &args.backing {
        options.backing_file = Some(backing.clone());
    }
    if let Some(name) = &options.backing_file {
        let format = match (args.backing_format, &options.backing_format) {
            (Some(f), _) => f,
            (None, Some(f)) if f == "raw" => Format::Raw,
            (None, Some(_)) => Format::Qcow2,
            (None, None) => open::probe(&crate::create::backing_path(path, name))?,
        };
        options.backing_format = Some(format.name().to_string());
    }
    options.validate().context(|| "invalid -o option")?;
    // Opened before the output is made, so that a missing backing file is reported by its name.
    let base = match (&options.backing_file, options.backing_format.as_deref()) {
        (Some(name), format) => {
            let format = if format == Some("raw") { Format::Raw } else { Format::Qcow2 };
            Some(Input::open(&crate::create::backing_path(path, name), Some(format))?)
        }
        (None, _) => None,
    };
    if let Some(name) = &options.data_file {
        let data = crate::create::backing_path(path, name);
        FileDevice::create(&data, &FileOptions::default())
            .context(|| format!("could not create data file '{}'", data.display()))?;
    }
    let file = FileDevice::create(path, &FileOptions::default())
        .context(|| format!("could not create '{}'", path.display()))?;
    if args.cache == Cache::Unsafe {
        into_qcow2(args, input, size, level, Unsynced::new(file), Some((&options, base)))
    } else {
        into_qcow2(args, input, size, level, file, Some((&options, base)))
    }
}

/// Formats `dev` as `create` says (or opens the image on it, for -n) and copies into it.
fn into_qcow2<D: BlockDevice + 'static>(
    args: &Args,
    input: &Input,
    size: u64,
    level: Option<i32>,
    dev: D,
    create: Option<(&CreateOptions, Option<Input>)>,
) -> Result<()> {
    let path = &args.dst;
    let resolver = FileResolver::new(path, open::policy());
    let (image, base) = match create {
        Some((options, base)) => (
            Image::create_with(dev, options, Config::default(), &resolver)
                .map_err(|e| Error::wrap(format!("could not create '{}'{}", path.display(), open::hint(&e)), e))?,
            base,
        ),
        None => (Image::open_with(dev, Config::default(), &resolver).map_err(|e| open::open_error(path, e))?, None),
    };
    if image.virtual_size() < size {
        return Err(Error::msg(format!(
            "'{}' is {} bytes, smaller than the source's {size} (-n writes into the existing image)",
            path.display(),
            image.virtual_size()
        )));
    }
    let mut options = engine_options(args);
    let cs = image.geometry().cluster_size();
    options.zero_granule = cs;
    if args.compress {
        options.compression = Some(Compression { kind: image.header().compression_type, level, cluster_size: cs });
    }
    let padded_base = base.as_ref().map(|b| Padded::new(b.device()));
    let watch = input.watch()?;
    let union = base.as_ref().map(|b| Union(input.map(), b.map()));
    let source = Source {
        device: input.device(),
        map: match &union {
            Some(u) => u,
            None => input.map(),
        },
        size,
        base: padded_base.as_ref().map(|p| p as &dyn BlockDevice),
        watch: watch.as_ref(),
    };
    copy(args, &source, &ImageTarget(&image), &options)?;
    image.close().context(|| format!("could not write '{}'", path.display()))
}
