//! The physical limit for sequential reads: one thread, one `pread` after another over a whole file, no format
//! and no queue. `scripts/bench-engine.sh` measures its CPU time per GiB next to `qcow-tool bench` and `qemu-img
//! bench` reading the same data.
//!
//! `cargo run --release --example pread_loop -p qcow -- FILE [BLOCK_BYTES] [--buffered]`
//!
//! Opens FILE with `O_DIRECT` unless `--buffered` is given, reads it from offset 0 to its end in BLOCK_BYTES
//! requests (default 65536, a multiple of 4096) into a page-aligned buffer, and prints
//! `bytes <N> seconds <S> reads <R>`.

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::time::Instant;

/// `O_DIRECT` wants the memory address, offset and length aligned to the logical block size; a page covers every
/// common one.
const ALIGN: usize = 4096;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut path = None;
    let mut block = 65536usize;
    let mut direct = true;
    for arg in std::env::args().skip(1) {
        if arg == "--buffered" {
            direct = false;
        } else if path.is_none() {
            path = Some(PathBuf::from(arg));
        } else {
            block = arg.parse().map_err(|e| format!("block size '{arg}': {e}"))?;
        }
    }
    let path = path.ok_or("usage: pread_loop FILE [BLOCK_BYTES] [--buffered]")?;
    if block == 0 || block % ALIGN != 0 {
        return Err(format!("block size {block}: a positive multiple of {ALIGN}").into());
    }

    let mut options = OpenOptions::new();
    options.read(true);
    if direct {
        options.custom_flags(libc::O_DIRECT);
    }
    let file = options.open(&path).map_err(|e| format!("open {}: {e}", path.display()))?;

    // A Vec<u8> is only byte-aligned: over-allocate by one alignment unit and read into the aligned window.
    let mut storage = vec![0u8; block + ALIGN];
    let start = storage.as_ptr().align_offset(ALIGN);
    let end = start.checked_add(block).ok_or("buffer window overflows")?;
    let buf = storage.get_mut(start..end).ok_or("no aligned window in the buffer")?;

    let began = Instant::now();
    let mut offset = 0u64;
    let mut reads = 0u64;
    loop {
        let n = file.read_at(buf, offset).map_err(|e| format!("pread {} at {offset}: {e}", path.display()))?;
        reads += 1;
        offset += n as u64;
        // A short read is the end of the file; reading on from an unaligned offset would fail under O_DIRECT.
        if n < block {
            break;
        }
    }
    let seconds = began.elapsed().as_secs_f64();
    println!("bytes {offset} seconds {seconds:.6} reads {reads}");
    Ok(())
}
