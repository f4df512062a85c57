//! `qcow-tool map`: where each part of the guest disk lives, as `qemu-img map` prints it, in its human and JSON
//! forms, byte for byte.

use std::path::PathBuf;

use crate::chain::{Chain, Status};
use crate::error::{Error, Result};
use crate::info::Output;
use crate::open::{self, Format};
use crate::rw::print;

/// Arguments of `map`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Output style: `human` lists the data and where it is stored; `json` every range with its status.
    #[arg(long, value_enum, default_value = "human")]
    output: Output,
    /// Image format; probed from the file's magic when not given.
    #[arg(short = 'f', long = "format", value_enum)]
    format: Option<Format>,
    /// First guest byte to map (a size: K, M, G... suffixes accepted).
    #[arg(long, value_name = "OFFSET")]
    start_offset: Option<String>,
    /// Most bytes to map from the start offset.
    #[arg(long, value_name = "LENGTH")]
    max_length: Option<String>,
    /// The image to map.
    file: PathBuf,
}

pub fn run(args: &Args) -> Result<()> {
    let chain = Chain::open(&args.file, args.format)?;
    let start = args.start_offset.as_deref().map(open::size).transpose()?.unwrap_or(0);
    let end = match args.max_length.as_deref().map(open::size).transpose()? {
        Some(len) => start.saturating_add(len),
        None => u64::MAX,
    };
    let entries = chain.status(start, end)?;
    match args.output {
        Output::Json => print(json(&entries).as_bytes()),
        Output::Human => {
            let (text, refused) = human(&chain, &entries);
            print(text.as_bytes())?;
            if refused {
                // qemu-img's words, after the lines it printed.
                return Err(Error::msg("File contains external, encrypted or compressed clusters."));
            }
            Ok(())
        }
    }
}

/// One entry as qemu-img's JSON prints it.
fn json_entry(e: &Status) -> String {
    let mut s = format!(
        "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \
         \"compressed\": {}",
        e.start, e.length, e.depth, e.present, e.zero, e.data, e.compressed
    );
    if let Some(offset) = e.offset {
        s.push_str(&format!(", \"offset\": {offset}"));
    }
    s.push('}');
    s
}

/// The JSON list, one entry a line, as qemu-img lays it out.
fn json(entries: &[Status]) -> String {
    let body: Vec<String> = entries.iter().map(json_entry).collect();
    format!("[{}]\n", body.join(",\n"))
}

/// The human table, and whether it stopped at data without a host offset (compressed), which qemu-img refuses
/// to show.
fn human(chain: &Chain, entries: &[Status]) -> (String, bool) {
    let mut out = format!("{:<16}{:<16}{:<16}{}\n", "Offset", "Length", "Mapped to", "File");
    for e in entries.iter().filter(|e| e.data) {
        let Some(offset) = e.offset else { return (out, true) };
        // Data the file system holds as a hole reads as zeros; qemu-img leaves it out.
        if e.zero {
            continue;
        }
        out.push_str(&format!("{:<16}{:<16}{:<16}{}\n", hex(e.start), hex(e.length), hex(offset), chain.name(e.depth)));
    }
    (out, false)
}

/// C's `%#x`: "0" for zero, "0x..." otherwise.
fn hex(n: u64) -> String {
    if n == 0 {
        "0".into()
    } else {
        format!("{n:#x}")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn json_entries_are_laid_out_like_qemu_img() {
        let e = Status {
            start: 0,
            length: 65536,
            depth: 0,
            present: true,
            zero: false,
            data: true,
            compressed: false,
            offset: Some(327680),
        };
        let z = Status { start: 65536, length: 983040, present: false, zero: true, data: false, offset: None, ..e };
        assert_eq!(
            json(&[e, z]),
            "[{ \"start\": 0, \"length\": 65536, \"depth\": 0, \"present\": true, \"zero\": false, \"data\": true, \
             \"compressed\": false, \"offset\": 327680},\n{ \"start\": 65536, \"length\": 983040, \"depth\": 0, \
             \"present\": false, \"zero\": true, \"data\": false, \"compressed\": false}]\n"
        );
        assert_eq!(hex(0), "0");
        assert_eq!(hex(65536), "0x10000");
    }
}
