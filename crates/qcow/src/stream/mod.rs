//! Decoding a qcow2 image read from a pipe, front to back with no seeking, into a raw file.
//!
//! The image is read one host cluster at a time. Cluster 0 holds the header, which says where the active L1
//! table is; the L1 table says where the L2 tables are; each L2 table says which host clusters hold which guest
//! clusters (whole, compressed, or with extended L2 some subclusters). A cluster that arrives after the table
//! naming it is decoded and written on the spot. Writers lay images out so that this is the usual case: QEMU
//! (and this library) allocates an L2 table before the data it maps, and the L1 table comes right after the
//! refcount structures at creation.
//!
//! A cluster that arrives before anything names it may be a data cluster of a table still to come, so it is kept
//! in a [`spool`](StreamOptions::memory_limit): in memory up to a bound, then in a temporary file, or, with no
//! spool directory allowed, the decode stops with an error that says the layout cannot be streamed. Once the L1
//! table and every L2 table it names have been seen, nothing unseen can matter any more and the spool is
//! emptied. The output is never guessed: a table or a kept cluster that turns out to be missing is an error.
//!
//! Refused by name: backing files (the image is not standalone), external data files (the data is not in the
//! stream), encryption.

mod decoder;
mod spool;

use std::fs::File;
use std::io::Read;
use std::path::PathBuf;
use std::sync::mpsc;

use crate::error::{Error, Result};
use crate::format::{feature, FormatError, Geometry, Header};
use decoder::Decoder;
use spool::Spool;

/// QEMU's bound on the L1 table: 32 MiB of entries.
const MAX_L1_BYTES: u64 = 32 << 20;

/// How much is read from the input at once (a multiple of every cluster size).
const READ_SIZE: usize = 8 << 20;

/// How [`decode`] works.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamOptions {
    /// Bytes of not-yet-mapped clusters kept in memory before spilling to a file.
    pub memory_limit: u64,
    /// Where the spool file goes; `None` refuses layouts that need more than `memory_limit`.
    pub spool_dir: Option<PathBuf>,
}

impl Default for StreamOptions {
    /// 256 MiB in memory, then a spool file in the system's temporary directory.
    fn default() -> Self {
        StreamOptions { memory_limit: 256 << 20, spool_dir: Some(std::env::temp_dir()) }
    }
}

/// What [`decode`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamSummary {
    /// The disk's size: the output's length.
    pub virtual_size: u64,
    /// Bytes read from the input.
    pub bytes_read: u64,
    /// Guest bytes written (all-zero data is not written, so the output stays sparse).
    pub data_written: u64,
    /// The most bytes kept at once for clusters not yet mapped.
    pub spool_peak: u64,
    /// Whether the spool went to a temporary file.
    pub spilled: bool,
}

/// Reads as much as fits into `buf`, stopping early only at the end of the input.
fn fill(input: &mut dyn Read, buf: &mut [u8]) -> Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        let Some(rest) = buf.get_mut(got..) else { break };
        match input.read(rest) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("read the input", got as u64, e)),
        }
    }
    Ok(got)
}

/// The header, checked for what a stream cannot follow.
fn header(first: &[u8]) -> Result<Header> {
    let header = Header::parse(first)?;
    header.validate(false)?;
    if let Some(name) = &header.backing_file {
        return Err(Error::Unsupported {
            feature: format!(
                "backing file '{}': stream-decode reads one standalone image (convert it first)",
                String::from_utf8_lossy(name)
            ),
        });
    }
    if header.has_external_data_file() {
        return Err(Error::Unsupported { feature: "external data file: the guest data is not in the stream".into() });
    }
    if header.crypt_method != 0 {
        return Err(Error::Format(FormatError::EncryptionUnsupported { method: header.crypt_method }));
    }
    Ok(header)
}

/// Decodes the qcow2 image read from `input` into `output`, which is truncated and then set to the disk's size;
/// only data is written, so the output is sparse. `progress(bytes_read)` is called as input is consumed.
///
/// # Errors
/// `Format` for a bad header, `Unsupported` for a backing file, an external data file, or (without a spool
/// directory) a layout that needs more than the memory bound; `Corrupt` for a table that is malformed or never
/// arrives; `Io` for the input, the output or the spool file.
pub fn decode(
    input: &mut (dyn Read + Send),
    output: &File,
    options: &StreamOptions,
    progress: &mut dyn FnMut(u64),
) -> Result<StreamSummary> {
    let mut buf = vec![0u8; READ_SIZE];
    let got = fill(input, &mut buf)?;
    let mut first = buf.get(..got.max(512).min(buf.len())).unwrap_or(&[]).to_vec();
    first.resize(first.len().max(512), 0);
    let header = header(&first)?;
    let geo = Geometry {
        cluster_bits: header.cluster_bits,
        refcount_order: header.refcount_order,
        extended_l2: header.incompatible_features & feature::EXTENDED_L2 != 0,
    };
    let cs = geo.cluster_size();
    let l1_bytes = u64::from(header.l1_size) * 8;
    if l1_bytes > MAX_L1_BYTES {
        return Err(Error::corrupt("L1 table larger than 32 MiB", header.l1_table_offset));
    }
    if u64::from(header.l1_size) < geo.l1_entries_for(header.size) {
        return Err(Error::corrupt("L1 table too small for the disk size", header.l1_table_offset));
    }
    if header.l1_size > 0 && (header.l1_table_offset < cs || header.l1_table_offset % cs != 0) {
        return Err(Error::corrupt("L1 table not cluster aligned, or inside the header", header.l1_table_offset));
    }
    output.set_len(0).map_err(|e| Error::io("truncate the output", 0, e))?;
    output.set_len(header.size).map_err(|e| Error::io("size the output", header.size, e))?;
    let spool = Spool::new(options.memory_limit, options.spool_dir.clone());
    let mut decoder = Decoder::new(output, &header, geo, spool);
    let cs_len = cs as usize;
    let mut index = 0u64;
    let mut total = 0u64;
    // The first buffer is decoded here; a reader thread fills the next ones while the decoder writes, so that
    // reading the pipe and writing the output overlap. Every buffer but the last is full, and the buffer size
    // is a multiple of every cluster size, so clusters never straddle two buffers.
    let mut decode_buffer = |buf: &[u8], got: usize, decoder: &mut Decoder<'_>| -> Result<()> {
        let mut from = 0;
        while from < got {
            let len = cs_len.min(got - from);
            decoder.cluster(index, buf, from, len)?;
            index += 1;
            from += len;
        }
        decoder.flush_run(buf)?;
        total += got as u64;
        progress(total);
        Ok(())
    };
    decode_buffer(&buf, got, &mut decoder)?;
    if got == buf.len() {
        let (full_tx, full_rx) = mpsc::sync_channel::<Result<(Vec<u8>, usize)>>(1);
        let (empty_tx, empty_rx) = mpsc::channel::<Vec<u8>>();
        let _ = empty_tx.send(buf);
        std::thread::scope(|scope| -> Result<()> {
            scope.spawn(move || loop {
                let mut next = empty_rx.try_recv().unwrap_or_else(|_| vec![0u8; READ_SIZE]);
                let got = fill(input, &mut next);
                let last = !matches!(got, Ok(n) if n == READ_SIZE);
                // A decoder that stopped (on an error) has dropped its end: stop too.
                if full_tx.send(got.map(|n| (next, n))).is_err() || last {
                    return;
                }
            });
            let mut decode_all = || -> Result<()> {
                for item in full_rx.iter() {
                    let (next, got) = item?;
                    decode_buffer(&next, got, &mut decoder)?;
                    let _ = empty_tx.send(next);
                }
                Ok(())
            };
            let result = decode_all();
            // Unblocks a reader waiting to hand over a buffer after a failure, so that the scope can end.
            drop(full_rx);
            result
        })?;
    }
    decoder.end()?;
    let (spool_peak, spilled) = decoder.spool_stats();
    Ok(StreamSummary {
        virtual_size: header.size,
        bytes_read: total,
        data_written: decoder.written,
        spool_peak,
        spilled,
    })
}

/// Asks the kernel for a pipe buffer of `bytes` on `fd` when it is a pipe (`F_SETPIPE_SZ`), so that the writer
/// and [`decode`] hand over megabytes, not 64 KiB, per wake-up. Returns whether it took; a file, a terminal, or a
/// limit below `bytes` (`/proc/sys/fs/pipe-max-size` for unprivileged users) leave things as they are.
pub fn enlarge_pipe(fd: &impl std::os::unix::io::AsFd, bytes: usize) -> bool {
    use std::os::unix::io::AsRawFd;
    let Ok(size) = libc::c_int::try_from(bytes) else { return false };
    let fd = fd.as_fd();
    // SAFETY: fcntl with F_SETPIPE_SZ and an int argument only changes the pipe's capacity; the descriptor is
    // borrowed and stays open for the call. On anything but a pipe it fails with EBADF or EINVAL, ignored.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, size) >= 0 }
}
