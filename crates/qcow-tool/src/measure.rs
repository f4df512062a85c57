//! `qcow-tool measure`: how large a new image would be, with the numbers `qemu-img measure` gives for the same
//! input: for a size (`--size N`) or for the data of an existing image, as raw or qcow2, in human or JSON form.
//!
//! For qcow2, "fully allocated" is QEMU's preallocation size: header cluster, every L2 table, the L1 table, the
//! refcount structures for all of it (found by iterating until the count covers itself), plus the data.
//! "Required" takes the data clusters back out and adds only those the input holds (whole clusters around
//! each range of data), over-counting metadata as QEMU does. Persistent bitmaps are counted as QEMU counts
//! them when both the input and the output could hold them.

use std::path::PathBuf;

use qcow::format::{Geometry, RefcountSizing};
use qcow::{Compat, CreateOptions};

use crate::chain::Chain;
use crate::error::{Context, Error, Result};
use crate::info::Output;
use crate::open::{self, Format};
use crate::rw::print;

/// The largest L1 table QEMU accepts, in bytes.
const MAX_L1_BYTES: u64 = 32 << 20;

/// Arguments of `measure`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Output style.
    #[arg(long, value_enum, default_value = "human")]
    output: Output,
    /// Format of the input image; probed from its magic when not given.
    #[arg(short = 'f', value_enum)]
    format: Option<Format>,
    /// Format of the image to measure for.
    #[arg(short = 'O', value_enum, default_value = "raw")]
    output_format: Format,
    /// qcow2 creation options, as for `create` (preallocation=off|metadata|falloc|full too). May be repeated.
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Measure a new, empty image of this size instead of an input image.
    #[arg(long, value_name = "SIZE")]
    size: Option<String>,
    /// The input image whose data the new image would hold.
    file: Option<PathBuf>,
}

/// What `measure` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measurement {
    /// Bytes needed for the data the input holds.
    pub required: u64,
    /// Bytes of a fully allocated image.
    pub fully_allocated: u64,
    /// Bytes for persistent bitmaps, when they are counted.
    pub bitmaps: Option<u64>,
}

/// The output's parameters that the numbers depend on.
struct Target {
    cluster_size: u64,
    refcount_order: u32,
    extended_l2: bool,
    compat: Compat,
    /// Whether a backing file is named, so no input cluster can be assumed shared.
    backing: bool,
    /// preallocation=full or falloc: all data is written.
    full: bool,
}

fn target(lists: &[String]) -> Result<Target> {
    let mut options = CreateOptions::new(0);
    let mut full = false;
    for list in lists {
        for item in list.split(',').filter(|s| !s.is_empty()) {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| Error::msg(format!("invalid -o option '{item}': expected key=value")))?;
            match (key.trim(), value.trim()) {
                ("preallocation", "full" | "falloc") => full = true,
                ("encrypt.format" | "encryption", _) => {
                    return Err(Error::msg(format!("-o {item}: encrypted images are not supported")));
                }
                (k, v) => options.set(k, v).context(|| "invalid -o option")?,
            }
        }
    }
    let mut check = options.clone();
    check.size = check.cluster_size;
    check.backing_file = None;
    check.preallocation = qcow::Preallocation::Off;
    check.validate().context(|| "invalid -o option")?;
    Ok(Target {
        cluster_size: options.cluster_size,
        refcount_order: options.refcount_bits.trailing_zeros(),
        extended_l2: options.extended_l2,
        compat: options.compat,
        backing: options.backing_file.is_some(),
        full,
    })
}

/// Bytes of refcount table and blocks needed to count `clusters` clusters and themselves.
fn refcount_metadata_size(clusters: u64, cluster_size: u64, refcount_order: u32) -> u64 {
    let geometry = Geometry { cluster_bits: cluster_size.trailing_zeros(), refcount_order, extended_l2: false };
    RefcountSizing::for_clusters(clusters, &geometry).clusters() * cluster_size
}

/// Bytes of a fully preallocated image of `size` bytes.
fn prealloc_size(size: u64, t: &Target) -> u64 {
    let cs = t.cluster_size;
    let aligned = size.next_multiple_of(cs);
    let entry = if t.extended_l2 { 16 } else { 8 };
    let mut meta = cs;
    let l2_entries = (aligned / cs).next_multiple_of(cs / entry);
    meta += l2_entries * entry;
    let l1_entries = (l2_entries * entry / cs).next_multiple_of(cs / 8);
    meta += l1_entries * 8;
    meta += refcount_metadata_size((meta + aligned) / cs, cs, t.refcount_order);
    meta + aligned
}

/// Bytes of the data clusters `chain` holds, counted as QEMU counts them.
fn required_data(chain: &Chain, cs: u64) -> Result<u64> {
    let size = chain.size();
    let runs = chain.status(0, size)?;
    let mut required = 0;
    let mut offset = 0;
    let mut runs = runs.iter().peekable();
    while offset < size {
        while runs.peek().is_some_and(|r| r.start + r.length <= offset) {
            runs.next();
        }
        let Some(run) = runs.peek() else { break };
        let mut pnum = run.start + run.length - offset;
        if !run.zero && run.data && run.present {
            pnum = (offset + pnum).next_multiple_of(cs) - offset;
            required += offset % cs + pnum;
        }
        offset += pnum;
    }
    Ok(required)
}

/// Bytes persistent bitmaps of the input would take in the output.
fn bitmaps_size(chain: &Chain, cs: u64) -> Result<u64> {
    let Some(image) = chain.top_image() else { return Ok(0) };
    if image.header().autoclear_features & qcow::format::feature::BITMAPS == 0 {
        return Ok(0);
    }
    let bitmaps =
        image.bitmaps().map_err(|e| Error::wrap(format!("could not read the bitmaps of '{}'", chain.name(0)), e))?;
    let (mut total, mut directory) = (0u64, 0u64);
    for b in bitmaps {
        let bits = image.virtual_size().div_ceil(b.granularity().max(1));
        let clusters = bits.div_ceil(8).div_ceil(cs);
        total += clusters * cs;
        total += (clusters * 8).next_multiple_of(cs);
        directory += (24 + b.name.len() as u64).next_multiple_of(8);
    }
    Ok(total + directory.next_multiple_of(cs))
}

fn too_large() -> Error {
    Error::msg("the image size is too large (try using a larger cluster size)")
}

fn measure(args: &Args) -> Result<Measurement> {
    let chain = match (&args.file, &args.size) {
        (Some(_), Some(_)) => return Err(Error::msg("--size N cannot be used together with a filename")),
        (None, None) => return Err(Error::msg("either --size N or one filename must be specified")),
        (Some(path), None) => Some(Chain::open(path, args.format)?),
        (None, Some(_)) => None,
    };
    let input_size = match (&chain, &args.size) {
        (Some(c), _) => c.size(),
        (None, Some(text)) => open::size(text)?,
        (None, None) => 0,
    };
    if args.output_format == Format::Raw {
        if let Some(list) = args.options.first() {
            return Err(Error::msg(format!("raw output takes no -o options (got '{list}')")));
        }
        let required = match chain {
            Some(_) => input_size,
            None => input_size.checked_next_multiple_of(512).ok_or_else(too_large)?,
        };
        return Ok(Measurement { required, fully_allocated: required, bitmaps: None });
    }
    let t = target(&args.options)?;
    let cs = t.cluster_size;
    let virtual_size = input_size.checked_next_multiple_of(cs).ok_or_else(too_large)?;
    let entry = if t.extended_l2 { 16 } else { 8 };
    let l2_tables = (virtual_size / cs).div_ceil(cs / entry);
    if l2_tables * entry > MAX_L1_BYTES {
        return Err(too_large());
    }
    let mut required = match &chain {
        Some(_) if t.backing => virtual_size,
        Some(c) => required_data(c, cs)?,
        None => 0,
    };
    if t.full {
        required = virtual_size;
    }
    let fully_allocated = prealloc_size(virtual_size, &t);
    let bitmaps = match &chain {
        Some(c) if t.compat == Compat::V3 && c.top_image().is_some_and(|i| i.header().version >= 3) => {
            Some(bitmaps_size(c, cs)?)
        }
        _ => None,
    };
    Ok(Measurement { required: fully_allocated - virtual_size + required, fully_allocated, bitmaps })
}

pub fn run(args: &Args) -> Result<()> {
    let m = measure(args)?;
    let text = match args.output {
        Output::Human => {
            let mut s = format!("required size: {}\nfully allocated size: {}\n", m.required, m.fully_allocated);
            if let Some(b) = m.bitmaps {
                s.push_str(&format!("bitmaps size: {b}\n"));
            }
            s
        }
        Output::Json => {
            let bitmaps = m.bitmaps.map(|b| format!("    \"bitmaps\": {b},\n")).unwrap_or_default();
            format!(
                "{{\n{bitmaps}    \"required\": {},\n    \"fully-allocated\": {}\n}}\n",
                m.required, m.fully_allocated
            )
        }
    };
    print(text.as_bytes())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_gigabyte_measures_as_qemu_img_says() {
        // qemu-img measure --size 1G -O qcow2: required 393216, fully allocated 1074135040.
        let t = target(&[]).unwrap();
        let full = prealloc_size(1 << 30, &t);
        assert_eq!(full, 1_074_135_040);
        assert_eq!(full - (1 << 30), 393_216);
    }
}
