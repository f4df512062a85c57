//! `qcow-tool info`: what `qemu-img info` says about an image, in its human and JSON forms.
//!
//! A file without the qcow2 magic is reported as raw, as qemu-img's probing does for a file the user names.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use qcow::block::FileDevice;
use qcow::{Image, ImageInfo};
use serde_json::{json, Value};

use crate::error::{Context, Error, Result};
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

/// One internal snapshot, in the units qemu-img reports.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SnapshotFacts {
    id: String,
    name: String,
    vm_state_size: u64,
    date_sec: u64,
    date_nsec: u64,
    vm_clock_nsec: u64,
    icount: Option<u64>,
}

/// One persistent dirty bitmap.
#[derive(Debug, Clone, PartialEq, Eq)]
struct BitmapFacts {
    name: String,
    granularity: u64,
    in_use: bool,
    auto: bool,
}

/// Everything `info` says about a qcow2 image.
struct Qcow2Facts {
    info: ImageInfo,
    backing_file: Option<String>,
    backing_format: Option<String>,
    /// The external data file's name, and whether it is a valid raw image on its own.
    data_file: Option<(String, bool)>,
    snapshots: Vec<SnapshotFacts>,
    /// The snapshot table as read, for the human listing.
    table: Vec<qcow::format::Snapshot>,
    bitmaps: Vec<BitmapFacts>,
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
        // Like qemu-img info, look at the image alone: its backing file is named, not opened.
        Format::Qcow2 => Some(gather(&open::image_metadata(path)?, &name)?),
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

fn gather(image: &Image<FileDevice>, name: &str) -> Result<Qcow2Facts> {
    let header = image.header();
    let table =
        image.snapshots().map_err(|e| Error::wrap(format!("could not read the snapshot table of '{name}'"), e))?;
    let snapshots = table
        .iter()
        .map(|s| SnapshotFacts {
            id: s.id.clone(),
            name: s.name.clone(),
            vm_state_size: s.vm_state_bytes(),
            date_sec: u64::from(s.date_sec),
            date_nsec: u64::from(s.date_nsec),
            vm_clock_nsec: s.vm_clock_nsec,
            // QEMU reads an icount of -1 as "none".
            icount: s.icount().filter(|&n| n != u64::MAX),
        })
        .collect();
    // QEMU ignores the bitmaps of an image whose autoclear bit 0 was cleared by a writer that does not maintain
    // them: they are inconsistent, and not listed.
    let bitmaps = if header.autoclear_features & qcow::format::feature::BITMAPS == 0 {
        Vec::new()
    } else {
        image
            .bitmaps()
            .map_err(|e| Error::wrap(format!("could not read the bitmap directory of '{name}'"), e))?
            .iter()
            .map(|b| BitmapFacts {
                name: b.name.clone(),
                granularity: b.granularity(),
                in_use: b.in_use(),
                auto: b.auto(),
            })
            .collect()
    };
    Ok(Qcow2Facts {
        info: image.info(),
        backing_file: header.backing_file.as_deref().map(|b| String::from_utf8_lossy(b).into_owned()),
        backing_format: header.backing_format(),
        data_file: header
            .has_external_data_file()
            .then(|| (header.external_data_file().unwrap_or_default(), header.is_data_file_raw())),
        snapshots,
        table,
        bitmaps,
    })
}

fn snapshot_json(s: &SnapshotFacts) -> Value {
    let mut v = json!({
        "id": s.id,
        "name": s.name,
        "vm-state-size": s.vm_state_size,
        "date-sec": s.date_sec,
        "date-nsec": s.date_nsec,
        "vm-clock-sec": s.vm_clock_nsec / 1_000_000_000,
        "vm-clock-nsec": s.vm_clock_nsec % 1_000_000_000,
    });
    if let (Some(icount), Some(map)) = (s.icount, v.as_object_mut()) {
        map.insert("icount".into(), icount.into());
    }
    v
}

fn bitmap_flags(b: &BitmapFacts) -> Vec<&'static str> {
    let mut flags = Vec::new();
    if b.in_use {
        flags.push("in-use");
    }
    if b.auto {
        flags.push("auto");
    }
    flags
}

fn to_json(name: &str, file: &FileFacts, qcow2: Option<&Qcow2Facts>) -> Value {
    let Some(q) = qcow2 else {
        return json!({
            "virtual-size": file.length,
            "filename": name,
            "format": "raw",
            "actual-size": file.allocated,
            "dirty-flag": false,
        });
    };
    let i = &q.info;
    let mut data = json!({
        "compat": i.compat,
        "compression-type": i.compression_type,
        "refcount-bits": i.refcount_bits,
    });
    if let Some(map) = data.as_object_mut() {
        if i.compat != "0.10" {
            map.insert("lazy-refcounts".into(), i.lazy_refcounts.into());
            map.insert("corrupt".into(), i.corrupt.into());
            map.insert("extended-l2".into(), i.extended_l2.into());
        }
        if let Some((file, raw)) = &q.data_file {
            map.insert("data-file".into(), file.as_str().into());
            map.insert("data-file-raw".into(), (*raw).into());
        }
        if !q.bitmaps.is_empty() {
            let bitmaps: Vec<Value> = q
                .bitmaps
                .iter()
                .map(|b| json!({"flags": bitmap_flags(b), "name": b.name, "granularity": b.granularity}))
                .collect();
            map.insert("bitmaps".into(), bitmaps.into());
        }
    }
    let mut v = json!({
        "virtual-size": i.virtual_size,
        "filename": name,
        "cluster-size": i.cluster_size,
        "format": "qcow2",
        "actual-size": file.allocated,
        "format-specific": { "type": "qcow2", "data": data },
        "dirty-flag": i.dirty,
    });
    if let Some(map) = v.as_object_mut() {
        if let Some(backing) = &q.backing_file {
            map.insert("backing-filename".into(), backing.as_str().into());
            map.insert("full-backing-filename".into(), crate::chain::backing_name(name, backing).into());
        }
        if let Some(format) = &q.backing_format {
            map.insert("backing-filename-format".into(), format.as_str().into());
        }
        if !q.snapshots.is_empty() {
            map.insert("snapshots".into(), q.snapshots.iter().map(snapshot_json).collect::<Vec<_>>().into());
        }
    }
    v
}

fn to_human(name: &str, file: &FileFacts, qcow2: Option<&Qcow2Facts>) -> String {
    let format = if qcow2.is_some() { "qcow2" } else { "raw" };
    let virtual_size = qcow2.map_or(file.length, |q| q.info.virtual_size);
    let mut out = vec![
        format!("image: {name}"),
        format!("file format: {format}"),
        format!("virtual size: {} ({virtual_size} bytes)", size_to_str(virtual_size)),
        format!("disk size: {}", size_to_str(file.allocated)),
    ];
    if let Some(q) = qcow2 {
        let i = &q.info;
        out.push(format!("cluster_size: {}", i.cluster_size));
        if i.dirty {
            out.push("cleanly shut down: no".into());
        }
        if let Some(backing) = &q.backing_file {
            let full = crate::chain::backing_name(name, backing);
            if full == *backing {
                out.push(format!("backing file: {backing}"));
            } else {
                out.push(format!("backing file: {backing} (actual path: {full})"));
            }
        }
        if let Some(format) = &q.backing_format {
            out.push(format!("backing file format: {format}"));
        }
        out.extend(crate::snapshot::table(&q.table));
        out.push("Format specific information:".into());
        out.push(format!("    compat: {}", i.compat));
        out.push(format!("    compression type: {}", i.compression_type));
        if i.compat != "0.10" {
            out.push(format!("    lazy refcounts: {}", i.lazy_refcounts));
        }
        if !q.bitmaps.is_empty() {
            out.push("    bitmaps:".into());
            for (n, b) in q.bitmaps.iter().enumerate() {
                out.push(format!("        [{n}]:"));
                out.push("            flags:".into());
                for (f, flag) in bitmap_flags(b).iter().enumerate() {
                    out.push(format!("                [{f}]: {flag}"));
                }
                out.push(format!("            name: {}", b.name));
                out.push(format!("            granularity: {}", b.granularity));
            }
        }
        out.push(format!("    refcount bits: {}", i.refcount_bits));
        if let Some((file, raw)) = &q.data_file {
            out.push(format!("    data file: {file}"));
            out.push(format!("    data file raw: {raw}"));
        }
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
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
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
