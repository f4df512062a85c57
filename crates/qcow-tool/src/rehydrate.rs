//! `qcow-tool rehydrate PREFIX OUT`: rebuild an image from what `dehydrate` kept. The new file has the
//! original's length, its metadata clusters byte for byte, and zeros (holes) wherever guest data was.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use serde_json::Value;

use crate::dehydrate::{paths, MAP_FORMAT};
use crate::error::{Context, Error, Result};

/// Bytes copied at a time.
const CHUNK: u64 = 1 << 20;

/// Arguments of `rehydrate`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// What `dehydrate` wrote: PREFIX.meta and PREFIX.map.
    prefix: String,
    /// The image file to create; it must not exist.
    out: PathBuf,
}

/// The map's runs and file length, checked: runs sorted, disjoint, inside the file.
fn read_map(text: &str, name: &str) -> Result<(u64, Vec<(u64, u64)>)> {
    let bad = |why: &str| Error::msg(format!("'{name}' is not a dehydrated image map: {why}"));
    let v: Value = serde_json::from_str(text).map_err(|e| Error::wrap(format!("'{name}' is not JSON"), e))?;
    if v.get("format").and_then(Value::as_str) != Some(MAP_FORMAT) {
        return Err(bad("unknown format"));
    }
    let file_len = v.get("file-length").and_then(Value::as_u64).ok_or_else(|| bad("no file-length"))?;
    let list = v.get("ranges").and_then(Value::as_array).ok_or_else(|| bad("no ranges"))?;
    let mut runs = Vec::with_capacity(list.len());
    let mut end = 0;
    for item in list {
        let pair = item.as_array().ok_or_else(|| bad("a range is not [offset, length]"))?;
        let (Some(offset), Some(len), 2) =
            (pair.first().and_then(Value::as_u64), pair.get(1).and_then(Value::as_u64), pair.len())
        else {
            return Err(bad("a range is not [offset, length]"));
        };
        let stop = offset.checked_add(len).ok_or_else(|| bad("a range overflows"))?;
        if offset < end || stop > file_len {
            return Err(bad("ranges overlap, are out of order, or run past the file length"));
        }
        end = stop;
        runs.push((offset, len));
    }
    Ok((file_len, runs))
}

pub fn run(args: &Args) -> Result<()> {
    let (meta_path, map_path) = paths(&args.prefix);
    let text = std::fs::read_to_string(&map_path).context(|| format!("could not read '{}'", map_path.display()))?;
    let (file_len, runs) = read_map(&text, &map_path.display().to_string())?;
    let mut meta = File::open(&meta_path).context(|| format!("could not open '{}'", meta_path.display()))?;
    let meta_len = meta.metadata().context(|| format!("could not read '{}'", meta_path.display()))?.len();
    let wanted: u64 = runs.iter().map(|r| r.1).sum();
    if meta_len != wanted {
        return Err(Error::msg(format!(
            "'{}' holds {meta_len} bytes but '{}' describes {wanted}",
            meta_path.display(),
            map_path.display()
        )));
    }
    let out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&args.out)
        .context(|| format!("could not create '{}'", args.out.display()))?;
    let made = (|| {
        out.set_len(file_len).context(|| format!("could not size '{}'", args.out.display()))?;
        let mut buf = Vec::new();
        for &(offset, len) in &runs {
            let mut pos = offset;
            while pos < offset + len {
                let n = (offset + len - pos).min(CHUNK) as usize;
                buf.resize(n, 0);
                meta.read_exact(&mut buf).context(|| format!("could not read '{}'", meta_path.display()))?;
                out.write_all_at(&buf, pos).context(|| format!("could not write '{}'", args.out.display()))?;
                pos += n as u64;
            }
        }
        out.sync_all().context(|| format!("could not flush '{}'", args.out.display()))
    })();
    if made.is_err() {
        let _ = std::fs::remove_file(&args.out);
    }
    made
}
