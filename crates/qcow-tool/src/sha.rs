//! `qcow-tool sha`: a digest of the virtual disk, the same as `qemu-img convert -O raw` followed by
//! `sha256sum` (or `sha1sum`) gives.
//!
//! Ranges the image does not map (holes, zero clusters, unallocated clusters with no backing data) are hashed
//! as zeros without being read.

use std::path::PathBuf;

use sha1::Sha1;
use sha2::{Digest, Sha256};

use crate::disk::Disk;
use crate::error::{Error, Result};
use crate::open::{self, Format};
use crate::progress::{Progress, ProgressArgs};
use crate::rw::print;

/// Bytes hashed per step.
const CHUNK: u64 = 4 << 20;

/// Digest algorithms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Algorithm {
    /// SHA-256.
    Sha256,
    /// SHA-1, as the reference qcow-tool printed.
    Sha1,
}

/// Arguments of `sha`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Digest algorithm.
    #[arg(long, value_enum, default_value = "sha256")]
    algorithm: Algorithm,
    /// Image format; probed from the file's magic when not given.
    #[arg(short = 'f', value_enum)]
    format: Option<Format>,
    #[command(flatten)]
    progress: ProgressArgs,
    /// The image to digest.
    file: PathBuf,
}

/// Either hasher.
enum Hasher {
    Sha256(Sha256),
    Sha1(Sha1),
}

impl Hasher {
    fn update(&mut self, bytes: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(bytes),
            Hasher::Sha1(h) => h.update(bytes),
        }
    }

    fn hex(self) -> String {
        let bytes: Vec<u8> = match self {
            Hasher::Sha256(h) => h.finalize().to_vec(),
            Hasher::Sha1(h) => h.finalize().to_vec(),
        };
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}

pub fn run(args: &Args) -> Result<()> {
    let path = &args.file;
    let disk = Disk::open(path, args.format)?;
    let size = disk.size();
    let mut hasher = match args.algorithm {
        Algorithm::Sha256 => Hasher::Sha256(Sha256::new()),
        Algorithm::Sha1 => Hasher::Sha1(Sha1::new()),
    };
    let mut progress = Progress::new(&args.progress, size, "bytes")?;
    let zeros = vec![0u8; CHUNK as usize];
    let mut buf = Vec::new();
    let mut pos = 0;
    while pos < size {
        let stop = (pos + CHUNK).min(size);
        let len = (stop - pos) as usize;
        let ranges = disk.map().data_ranges(pos, stop - pos).map_err(|e| open::io_error(path, e))?;
        if ranges.iter().all(|&(_, l)| l == 0) {
            hasher.update(zeros.get(..len).unwrap_or(&zeros));
        } else {
            buf.resize(len.next_multiple_of(512), 0);
            disk.read(pos, &mut buf)
                .map_err(|e| Error::wrap(format!("could not read '{}' at byte {pos}", path.display()), e))?;
            hasher.update(buf.get(..len).unwrap_or(&buf));
        }
        pos = stop;
        progress.set(pos, size);
    }
    progress.finish(size);
    print(format!("{}\n", hasher.hex()).as_bytes())
}
