//! `qcow-tool serve`: exports a qcow2 image (through the engine, backing chain and compression included) or a
//! raw file over NBD until SIGINT or SIGTERM, which stop it cleanly: requests in flight are answered and the
//! image is flushed.
//!
//! The metadata contexts offered are `base:allocation`, `qemu:allocation-depth` (always, where qemu-nbd needs
//! `-A`) and, with `-B NAME`, the image's dirty bitmap NAME; a name the image does not have is refused at start.
//!
//! The first line on stdout is `listening on ADDRESS` once the socket is bound, so scripts that pass port 0 learn
//! the port. Connects, disconnects and errors are logged to stderr.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use qcow::{Config, ReclaimerOptions};
use qcow_nbd::{Bind, Export, MetricsServer, Server, ServerConfig};

use crate::error::{Context, Error, Result};
use crate::open::{self, Format};

/// Arguments of `serve`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The image to serve (qcow2 or raw; probed unless -f is given).
    file: PathBuf,
    /// The image's format.
    #[arg(short = 'f', long = "format", value_enum)]
    format: Option<Format>,
    /// Refuse writes (EPERM) and open the image read-only.
    #[arg(long)]
    read_only: bool,
    /// The export's name (clients may also ask for the empty name).
    #[arg(long, default_value = "")]
    export_name: String,
    /// TCP address to listen on; port 0 picks a free port.
    #[arg(long, value_name = "ADDR:PORT", conflicts_with = "socket")]
    bind: Option<SocketAddr>,
    /// Unix socket to listen on instead of TCP (the file must not exist).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// How many clients are served at once (later ones wait); above 1 the export advertises multi-conn.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    shared: u32,
    /// Requests of one connection that run concurrently.
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    threads: u32,
    /// Serve the image's Prometheus metrics at http://ADDR:PORT/metrics.
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<SocketAddr>,
    /// Log every request error and protocol detail, not only connections and failures.
    #[arg(short, long)]
    verbose: bool,
    /// Run the background space reclaimer on a qcow2 image: erase freed clusters, compact the file online once
    /// enough has been discarded, give a free tail back, flush a few seconds after writes.
    #[arg(long, conflicts_with = "read_only")]
    reclaim: bool,
    /// With --reclaim: how many zeroed free clusters to keep ready for allocation.
    #[arg(long, value_name = "N", default_value_t = 0, requires = "reclaim")]
    keep_erased: u64,
    /// Budget of a qcow2 image's metadata cache (K/M/G suffixes; default 32M, which maps 256 GiB of data at
    /// 64 KiB clusters).
    #[arg(long, value_name = "SIZE")]
    cache_size: Option<String>,
    /// With --reclaim: compact once this much has been discarded (K/M/G/T suffixes).
    #[arg(long, value_name = "SIZE", default_value = "64M", requires = "reclaim")]
    compact_after: String,
    /// Offer the image's persistent dirty bitmap NAME as the `qemu:dirty-bitmap:NAME` metadata context, as
    /// qemu-nbd's -B does; may be given several times.
    #[arg(short = 'B', long = "bitmap", value_name = "NAME")]
    bitmaps: Vec<String>,
}

/// The default listening address, as qemu-nbd's: loopback only, the NBD port.
const DEFAULT_BIND: &str = "127.0.0.1:10809";

pub fn run(args: &Args) -> Result<()> {
    let level = if args.verbose { tracing::Level::DEBUG } else { tracing::Level::INFO };
    // A second subscriber (tests calling run twice) is not an error worth stopping for.
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_max_level(level)
        .with_target(false)
        .try_init();

    let format = match args.format {
        Some(f) => f,
        None => open::probe(&args.file)?,
    };
    match format {
        Format::Raw => serve(Arc::new(open::file(&args.file, args.read_only)?), args),
        Format::Qcow2 => {
            // Discard is on so that TRIM and WRITE_ZEROES give space back.
            let mut config = Config { discard: !args.read_only, read_only: args.read_only, ..Config::default() };
            if let Some(size) = &args.cache_size {
                config.cache_size = open::size(size)?;
            }
            if args.reclaim {
                config.keep_erased = args.keep_erased;
                config.compact_after_unmaps = open::size(&args.compact_after)?.div_ceil(512).max(1);
            }
            let image = Arc::new(open::image_with(&args.file, config)?);
            if args.reclaim {
                image
                    .start_reclaimer(ReclaimerOptions::default())
                    .map_err(|e| Error::wrap("could not start the reclaimer", open::io_error(&args.file, e)))?;
            }
            let served = serve(Arc::clone(&image), args);
            // Closed here, once the server is done with it, so that a failed last writeback is a failed exit
            // rather than a drop that cannot report. A metrics endpoint still holds the image, and the process
            // ends without dropping it: its metadata is at least written back and flushed.
            let closed = match Arc::try_unwrap(image) {
                Ok(image) => image.close(),
                Err(shared) => shared.flush(),
            };
            served.and(closed.map_err(|e| open::io_error(&args.file, e)))
        }
    }
}

fn serve<E: Export>(export: Arc<E>, args: &Args) -> Result<()> {
    // qemu-nbd offers (and checks) its -B bitmaps last given first, which fixes the order clients see them
    // listed and the context ids they get: the same here.
    let bitmaps: Vec<String> = args.bitmaps.iter().rev().cloned().collect();
    // Refused before anything listens, in qemu-nbd's words.
    if let Some(name) = bitmaps.iter().find(|name| !export.has_bitmap(name)) {
        return Err(Error::msg(format!("Bitmap '{name}' is not found")));
    }
    let bind = match (&args.socket, args.bind) {
        (Some(path), _) => Bind::Unix(path.clone()),
        (None, Some(addr)) => Bind::Tcp(addr),
        (None, None) => Bind::Tcp(DEFAULT_BIND.parse().map_err(|e| Error::wrap("default address", e))?),
    };
    let config = ServerConfig {
        export_name: args.export_name.clone(),
        read_only: args.read_only,
        max_connections: args.shared as usize,
        workers: args.threads as usize,
        bitmaps,
    };
    let server = Server::bind(Arc::clone(&export), &bind, config).context(|| format!("could not listen on {bind}"))?;
    let local = server.local_addr().context(|| format!("could not query the address of {bind}"))?;

    if let Some(addr) = args.metrics {
        let metrics = MetricsServer::bind(addr, Arc::clone(&export))
            .context(|| format!("could not listen for metrics on {addr}"))?;
        let at = metrics.local_addr().context(|| "could not query the metrics address")?;
        tracing::info!(%at, "metrics at http://{at}/metrics");
        std::thread::spawn(move || metrics.run());
    }

    let handle = server.handle();
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM])
        .context(|| "could not install the SIGINT/SIGTERM handlers")?;
    std::thread::spawn(move || {
        let mut stopping = false;
        for signal in signals.forever() {
            if stopping {
                // A second signal: the user does not want to wait for clients to finish.
                tracing::warn!(signal, "second signal: exiting without waiting for clients");
                std::process::exit(130);
            }
            stopping = true;
            tracing::info!(signal, "stopping: answering requests in flight, then flushing the image (again to quit)");
            handle.shutdown();
        }
    });

    tracing::info!(file = %args.file.display(), %local, "serving");
    let mut stdout = std::io::stdout();
    writeln!(stdout, "listening on {local}").and_then(|()| stdout.flush()).context(|| "could not write to stdout")?;
    server.run().context(|| format!("serving '{}' failed", args.file.display()))
}
