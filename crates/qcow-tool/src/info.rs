//! `qcow-tool info`: what `qemu-img info` says about an image, in its human and JSON forms.
//!
//! A file without the qcow2 magic is reported as raw, as qemu-img's probing does for a file the user names.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use qcow::ImageInfo;
use serde_json::{json, Value};

use crate::error::{Context, Result};
use crate::open::{self, Format};

/// Output styles of `info`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Text for people, like qemu-img's.
    Human,
    /// JSON with qemu-img's field names.
    Json,
}

/// Arguments of `info`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Output style.
    #[arg(long, value_enum, default_value = "human")]
    output: Output,
    /// Image format; probed from the file's magic when not given.
    #[arg(short = 'f', value_enum)]
    format: Option<Format>,
    /// The image to describe.
    file: PathBuf,
}

/// What the file system says about the image file.
struct FileFacts {
    length: u64,
    allocated: u64,
}

pub fn run(args: &Args) -> Result<()> {
    let path = &args.file;
    let name = path.display().to_string();
    let format = match args.format {
        Some(f) => f,
        None => open::probe(path)?,
    };
    let meta = std::fs::metadata(path).context(|| format!("could not open '{name}'"))?;
    let facts = FileFacts { length: meta.len(), allocated: meta.blocks().saturating_mul(512) };
    let qcow2 = match format {
        Format::Qcow2 => Some(open::image(path, true)?.info()),
        Format::Raw => None,
    };
    let text = match args.output {
        Output::Json => {
            let value = to_json(&name, &facts, qcow2.as_ref());
            serde_json::to_string_pretty(&value).context(|| "could not format JSON")?
        }
        Output::Human => to_human(&name, &facts, qcow2.as_ref()),
    };
    crate::rw::print(text.as_bytes())?;
    crate::rw::print(b"\n")
}

fn to_json(name: &str, file: &FileFacts, qcow2: Option<&ImageInfo>) -> Value {
    let Some(i) = qcow2 else {
        return json!({
            "virtual-size": file.length,
            "filename": name,
            "format": "raw",
            "actual-size": file.allocated,
            "dirty-flag": false,
        });
    };
    let mut data = json!({
        "compat": i.compat,
        "compression-type": i.compression_type,
        "refcount-bits": i.refcount_bits,
    });
    if i.compat != "0.10" {
        if let Some(map) = data.as_object_mut() {
            map.insert("lazy-refcounts".into(), i.lazy_refcounts.into());
            map.insert("corrupt".into(), i.corrupt.into());
            map.insert("extended-l2".into(), i.extended_l2.into());
        }
    }
    json!({
        "virtual-size": i.virtual_size,
        "filename": name,
        "cluster-size": i.cluster_size,
        "format": "qcow2",
        "actual-size": file.allocated,
        "format-specific": { "type": "qcow2", "data": data },
        "dirty-flag": i.dirty,
    })
}

fn to_human(name: &str, file: &FileFacts, qcow2: Option<&ImageInfo>) -> String {
    let format = if qcow2.is_some() { "qcow2" } else { "raw" };
    let virtual_size = qcow2.map_or(file.length, |i| i.virtual_size);
    let mut out = vec![
        format!("image: {name}"),
        format!("file format: {format}"),
        format!("virtual size: {} ({virtual_size} bytes)", size_to_str(virtual_size)),
        format!("disk size: {}", size_to_str(file.allocated)),
    ];
    if let Some(i) = qcow2 {
        out.push(format!("cluster_size: {}", i.cluster_size));
        out.push("Format specific information:".into());
        out.push(format!("    compat: {}", i.compat));
        out.push(format!("    compression type: {}", i.compression_type));
        if i.compat != "0.10" {
            out.push(format!("    lazy refcounts: {}", i.lazy_refcounts));
        }
        out.push(format!("    refcount bits: {}", i.refcount_bits));
        if i.compat != "0.10" {
            out.push(format!("    corrupt: {}", i.corrupt));
            out.push(format!("    extended l2: {}", i.extended_l2));
        }
    }
    out.push("Child node '/file':".into());
    out.push(format!("    filename: {name}"));
    out.push("    protocol type: file".into());
    out.push(format!("    file length: {} ({} bytes)", size_to_str(file.length), file.length));
    out.push(format!("    disk size: {}", size_to_str(file.allocated)));
    out.join("\n")
}

/// A size as qemu's `size_to_str` writes it: three significant digits and a binary unit ("1 GiB", "196 KiB",
/// "1.5 MiB", "0 B"). The unit switches up once the number would reach 1000.
pub fn size_to_str(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let scaled = bytes as f64 * 1024.0 / 1000.0;
    let mut unit = 0;
    while unit + 1 < UNITS.len() && scaled >= (1u64 << (10 * (unit + 1))) as f64 {
        unit += 1;
    }
    let value = bytes as f64 / (1u64 << (10 * unit)) as f64;
    format!("{} {}", three_significant(value), UNITS.get(unit).unwrap_or(&"B"))
}

/// C's `%0.3g` for values below 1000.
fn three_significant(value: f64) -> String {
    if value == 0.0 {
        return "0".into();
    }
    let magnitude = value.abs().log10().floor() as i32;
    let decimals = (2 - magnitude).max(0) as usize;
    let text = format!("{value:.decimals$}");
    if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_print_like_qemu() {
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(512), "512 B");
        assert_eq!(size_to_str(1000), "0.977 KiB");
        assert_eq!(size_to_str(1024), "1 KiB");
        assert_eq!(size_to_str(200704), "196 KiB");
        assert_eq!(size_to_str(197120), "192 KiB");
        assert_eq!(size_to_str(1 << 30), "1 GiB");
        assert_eq!(size_to_str(3 << 29), "1.5 GiB");
        assert_eq!(size_to_str(10 << 20), "10 MiB");
        assert_eq!(size_to_str(1_000_000), "977 KiB");
    }
}
