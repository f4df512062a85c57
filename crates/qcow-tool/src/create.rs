//! `qcow-tool create`: format a new qcow2 image, as `qemu-img create -f qcow2` does.

use std::path::{Path, PathBuf};

use qcow::block::{FileDevice, FileOptions};
use qcow::format::CompressionType;
use qcow::{Compat, Config, CreateOptions, FileResolver, Image, Preallocation};

use crate::error::{Context, Error, Result};
use crate::open::{self, Format};

/// Arguments of `create`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Image format; only qcow2 can be created.
    #[arg(short = 'f', value_enum, default_value = "qcow2")]
    format: Format,
    /// qemu-img style options: cluster_size=SIZE, refcount_bits=N, compat=0.10|1.1, lazy_refcounts=on|off,
    /// preallocation=off|metadata|falloc|full, size=SIZE, extended_l2=on|off, data_file=NAME,
    /// data_file_raw=on|off, backing_file=NAME, backing_fmt=raw|qcow2, compression_type=zlib|zstd.
    /// May be given more than once.
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Backing file: the new image is an overlay that reads what it does not hold from it. A relative name is
    /// resolved against the new image's directory, and recorded as given.
    #[arg(short = 'b', value_name = "BACKING")]
    backing: Option<String>,
    /// Format of the backing file (raw or qcow2); required with -b, since formats are never probed.
    #[arg(short = 'F', value_enum, value_name = "FMT")]
    backing_format: Option<Format>,
    /// Print nothing on success.
    #[arg(short = 'q')]
    quiet: bool,
    /// The file to create; an existing file is overwritten.
    file: PathBuf,
    /// Virtual size in bytes, with an optional K, M, G, T, P or E suffix. With a backing file it defaults to the
    /// backing file's size.
    size: Option<String>,
}

pub fn run(args: &Args) -> Result<()> {
    if args.format != Format::Qcow2 {
        return Err(Error::msg(format!("cannot create {} images: only qcow2 is supported", args.format.name())));
    }
    let mut options = CreateOptions::new(0);
    let mut fill = None;
    for list in &args.options {
        let (rest, mode) = file_preallocation(list)?;
        fill = mode.or(fill);
        options.apply(&rest).context(|| "invalid -o option")?;
    }
    if fill.is_some() {
        // falloc and full preallocate the metadata as `metadata` does, then allocate the whole file.
        options.preallocation = Preallocation::Metadata;
    }
    if let Some(backing) = &args.backing {
        options.backing_file = Some(backing.clone());
    }
    if let Some(format) = args.backing_format {
        options.backing_format = Some(format.name().to_string());
    }
    let path = &args.file;
    if options.backing_file.is_some() && options.preallocation != Preallocation::Off {
        return Err(Error::msg("a backing file and preallocation cannot be used together"));
    }
    let size_option = args.options.iter().flat_map(|l| l.split(',')).any(|kv| kv.trim().starts_with("size="));
    match (&args.size, &options.backing_file) {
        (Some(text), _) => options.size = open::size(text)?,
        (None, _) if size_option => {}
        (None, Some(name)) => {
            // Checked first, so that a missing -F is reported as such rather than as a failed open.
            options.validate().context(|| "invalid -o option")?;
            options.size = backing_size(path, name, options.backing_format.as_deref())?;
        }
        (None, None) => return Err(Error::msg("missing SIZE: give it after the file name, or as -o size=SIZE")),
    }
    options.validate().context(|| "invalid -o option")?;
    if !args.quiet {
        let mut line = formatting_line(&path.display().to_string(), &options);
        if let Some(mode) = fill {
            line = line.replace("preallocation=metadata", &format!("preallocation={mode}"));
        }
        println!("{line}");
    }
    let made = create(path, &options)
        .and_then(|image| image.close().context(|| format!("could not write '{}'", path.display())))
        .and_then(|()| if fill.is_some() { allocate_holes(path) } else { Ok(()) });
    if made.is_err() {
        // Leave no half-made image behind.
        let _ = std::fs::remove_file(path);
    }
    made
}

/// Takes `preallocation=falloc|full` out of a `-o` list (the library preallocates metadata only) and refuses
/// encryption by name. Returns the rest of the list and the file preallocation asked for.
fn file_preallocation(list: &str) -> Result<(String, Option<&'static str>)> {
    let mut rest = Vec::new();
    let mut mode = None;
    for item in list.split(',').filter(|s| !s.is_empty()) {
        let (key, value) = item.split_once('=').unwrap_or((item, ""));
        match (key.trim(), value.trim()) {
            ("preallocation", "falloc") => mode = Some("falloc"),
            ("preallocation", "full") => mode = Some("full"),
            ("encryption" | "encrypt.format", _) => {
                return Err(Error::msg(format!("-o {item}: encrypted images are not supported")));
            }
            (k, _) if k.starts_with("encrypt.") => {
                return Err(Error::msg(format!("-o {item}: encrypted images are not supported")));
            }
            _ => rest.push(item),
        }
    }
    Ok((rest.join(","), mode))
}

/// Writes zeros into every hole of the file, so that all of it is allocated on disk (QEMU's falloc and full;
/// with no fallocate call available to safe code, both write zeros, as `full` does).
fn allocate_holes(path: &Path) -> Result<()> {
    use qcow::convert::AllocationMap;
    use std::os::unix::fs::FileExt;
    let dev = open::file(path, false)?;
    let len = dev.len_bytes();
    let fail = |e| Error::wrap(format!("could not preallocate '{}'", path.display()), e);
    let zeros = vec![0u8; 1 << 20];
    let mut pos = 0;
    let mut data = dev.data_ranges(0, len).map_err(fail)?;
    data.push((len, 0));
    for (start, n) in data {
        while pos < start.min(len) {
            let chunk = (start.min(len) - pos).min(zeros.len() as u64) as usize;
            dev.file()
                .write_all_at(zeros.get(..chunk).unwrap_or(&zeros), pos)
                .context(|| format!("could not preallocate '{}'", path.display()))?;
            pos += chunk as u64;
        }
        pos = pos.max(start.saturating_add(n));
    }
    dev.file().sync_all().context(|| format!("could not flush '{}'", path.display()))
}

/// Creates the image, opening its backing file (if any) under the tool's policy.
fn create(path: &Path, options: &CreateOptions) -> Result<Image<FileDevice>> {
    let made = if open::policy() == qcow::BackingPolicy::default() {
        Image::create_path(path, options, Config::default())
    } else {
        FileDevice::create(path, &FileOptions::default()).and_then(|dev| {
            Image::create_with(dev, options, Config::default(), &FileResolver::new(path, open::policy()))
        })
    };
    made.map_err(|e| Error::wrap(format!("could not create '{}'{}", path.display(), open::hint(&e)), e))
}

/// Where a backing file name recorded in the image at `image` points: relative names are relative to the
/// image's directory, as the library resolves them.
pub(crate) fn backing_path(image: &Path, name: &str) -> PathBuf {
    let named = Path::new(name);
    if named.is_absolute() {
        return named.to_path_buf();
    }
    image.parent().map_or_else(|| named.to_path_buf(), |dir| dir.join(named))
}

/// The virtual size of the backing file: a raw file's length, or a qcow2 image's virtual size.
fn backing_size(image: &Path, name: &str, format: Option<&str>) -> Result<u64> {
    let path = backing_path(image, name);
    if Path::new(name).is_absolute() && !open::policy().allow_absolute {
        return Err(Error::msg(format!(
            "backing file '{name}' is an absolute path, which is not followed \
             (pass --allow-absolute-backing to follow it)"
        )));
    }
    match format {
        Some("raw") => {
            let meta =
                std::fs::metadata(&path).context(|| format!("could not open backing file '{}'", path.display()))?;
            // A raw file is read in whole sectors, so its last partial sector counts, as in qemu-img.
            Ok(meta.len().next_multiple_of(512))
        }
        _ => Ok(open::image(&path, true)?.virtual_size()),
    }
}

/// The line qemu-img prints before it creates an image.
fn formatting_line(file: &str, o: &CreateOptions) -> String {
    let mut line = format!("Formatting '{file}', fmt=qcow2 cluster_size={} extended_l2=off", o.cluster_size);
    if o.preallocation == Preallocation::Metadata {
        line.push_str(" preallocation=metadata");
    }
    let compression = match o.compression_type {
        CompressionType::Zstd => "zstd",
        _ => "zlib",
    };
    line.push_str(&format!(" compression_type={compression} size={}", o.size));
    if o.compat == Compat::V2 {
        line.push_str(" compat=0.10");
    }
    if let Some(name) = &o.backing_file {
        line.push_str(&format!(" backing_file={name}"));
    }
    if let Some(format) = &o.backing_format {
        line.push_str(&format!(" backing_fmt={format}"));
    }
    let lazy = if o.lazy_refcounts { "on" } else { "off" };
    line.push_str(&format!(" lazy_refcounts={lazy} refcount_bits={}", o.refcount_bits));
    line
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn the_formatting_line_matches_qemu_img() {
        assert_eq!(
            formatting_line("a.qcow2", &CreateOptions::new(1 << 30)),
            "Formatting 'a.qcow2', fmt=qcow2 cluster_size=65536 extended_l2=off compression_type=zlib \
             size=1073741824 lazy_refcounts=off refcount_bits=16"
        );
        let mut o = CreateOptions::new(10 << 20);
        o.apply("cluster_size=4k,refcount_bits=1,lazy_refcounts=on,preallocation=metadata").unwrap();
        assert_eq!(
            formatting_line("c.qcow2", &o),
            "Formatting 'c.qcow2', fmt=qcow2 cluster_size=4096 extended_l2=off preallocation=metadata \
             compression_type=zlib size=10485760 lazy_refcounts=on refcount_bits=1"
        );
        let mut o = CreateOptions::new(10 << 20);
        o.apply("backing_file=base.raw,backing_fmt=raw,compression_type=zstd").unwrap();
        assert_eq!(
            formatting_line("ov.qcow2", &o),
            "Formatting 'ov.qcow2', fmt=qcow2 cluster_size=65536 extended_l2=off compression_type=zstd \
             size=10485760 backing_file=base.raw backing_fmt=raw lazy_refcounts=off refcount_bits=16"
        );
    }
}
