//! `qcow-tool mapped`: the extents the image maps, merged (not fixed-size chunks), as text or JSON.

use std::path::PathBuf;

use qcow::MappedKind;

use crate::error::Result;
use crate::open;
use crate::rw::print;

/// Arguments of `mapped`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The qcow2 image.
    file: PathBuf,
    /// Leave out ranges the image maps as zeros (zero clusters), listing only stored data.
    #[arg(long)]
    ignore_zeroes: bool,
    /// Output format: `human` (one "START LENGTH KIND" line per extent, in bytes) or `json`.
    #[arg(long, default_value = "human", value_parser = ["human", "json"])]
    output: String,
}

pub fn run(args: &Args) -> Result<()> {
    let image = open::image(&args.file, true)?;
    let extents = image.mapped_extents(args.ignore_zeroes).map_err(|e| open::io_error(&args.file, e))?;
    let kind = |k: MappedKind| match k {
        MappedKind::Data => "data",
        MappedKind::Zero => "zero",
    };
    let text = if args.output == "json" {
        let list: Vec<serde_json::Value> = extents
            .iter()
            .map(|e| serde_json::json!({ "start": e.start, "length": e.length, "kind": kind(e.kind) }))
            .collect();
        format!("{}\n", serde_json::Value::Array(list))
    } else {
        extents.iter().map(|e| format!("{} {} {}\n", e.start, e.length, kind(e.kind))).collect()
    };
    print(text.as_bytes())
}
