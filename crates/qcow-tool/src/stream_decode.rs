//! `qcow-tool stream-decode OUT < IMAGE`: decode a qcow2 image read from standard input, front to back with no
//! seeking (a pipe works), into the raw file OUT, which stays sparse. See [`qcow::stream`] for the layouts it
//! follows and when it spools.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use qcow::stream::StreamOptions;

use crate::error::{Context, Error, Result};
use crate::progress::{Progress, ProgressArgs};

/// Arguments of `stream-decode`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Bytes of clusters that arrive before the table mapping them kept in memory (K/M/G suffixes), before they
    /// go to a temporary file.
    #[arg(long, value_name = "SIZE", default_value = "256M")]
    memory: String,
    /// Never spool to a temporary file: refuse layouts that need more than --memory instead.
    #[arg(long)]
    no_spool: bool,
    /// Directory for the spool file (default: $TMPDIR or /tmp).
    #[arg(long, value_name = "DIR")]
    spool_dir: Option<PathBuf>,
    #[command(flatten)]
    progress: ProgressArgs,
    /// The raw file to write; an existing file is overwritten.
    out: PathBuf,
}

pub fn run(args: &Args) -> Result<()> {
    let memory = crate::open::size(&args.memory)?;
    let options = StreamOptions {
        memory_limit: memory,
        spool_dir: if args.no_spool { None } else { Some(args.spool_dir.clone().unwrap_or_else(std::env::temp_dir)) },
    };
    let stdin = std::io::stdin();
    // A regular file on stdin has a length, so progress can be a percentage; a pipe's cannot.
    let total = std::fs::metadata("/dev/stdin").ok().filter(|m| m.is_file()).map_or(0, |m| m.size());
    let out = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&args.out)
        .context(|| format!("could not create '{}'", args.out.display()))?;
    let mut progress = Progress::new(&args.progress, total, "bytes")?;
    // Larger hand-overs from the writer of the pipe; the default 64 KiB costs a wake-up per 64 KiB.
    qcow::stream::enlarge_pipe(&stdin, 1 << 20);
    let mut input = stdin;
    let result = qcow::stream::decode(&mut input, &out, &options, &mut |done| progress.set(done, total.max(done)));
    match result {
        Ok(summary) => {
            progress.finish(summary.bytes_read);
            out.sync_all().context(|| format!("could not flush '{}'", args.out.display()))
        }
        Err(e) => {
            drop(out);
            let _ = std::fs::remove_file(&args.out);
            Err(Error::wrap("could not decode the image on standard input", e))
        }
    }
}
