//! `qcow-tool bench`: the request pattern of `qemu-img bench`, run against the library.
//!
//! `-c COUNT` requests of `-s SIZE` bytes, reads or (`-w`) writes, `-d DEPTH` of them in flight at once: a pool
//! of DEPTH threads shares one open image (the library's operations take `&self`), each taking the next
//! request as soon as its last one completes, as QEMU's completion callback issues the next. Request k reads
//! or writes at `-o OFFSET` for k = 0, then at (OFFSET + k * STEP) modulo (image size - SIZE), QEMU's wrap.
//!
//! Cache modes are QEMU's: `none` opens the file with O_DIRECT, `writeback` (the default) uses the page cache,
//! `writethrough` and `directsync` flush after every write, `unsafe` ignores every flush (the library's own
//! included). `--flush-interval N` flushes after every N completed requests; by default the queue is drained
//! first (no new request starts until the flush is done), `--no-drain` flushes while requests go on. Only the
//! requests and flushes are timed, not opening or closing the image.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::thread::Thread;
use std::time::Instant;

use qcow::block::{BlockDevice, FileDevice, FileOptions, Locking};
use qcow::{Config, FileResolver, Image};

use crate::error::{Context, Error, Result};
use crate::open::{self, Format};
use crate::rw::print;

/// Arguments of `bench`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Number of requests.
    #[arg(short = 'c', default_value_t = 75_000)]
    count: u64,
    /// Requests in flight at once.
    #[arg(short = 'd', default_value_t = 64)]
    depth: u64,
    /// Bytes per request (K, M suffixes accepted).
    #[arg(short = 's', default_value = "4096")]
    size: String,
    /// Offset increment between requests; 0 (the default) means the request size.
    #[arg(short = 'S', default_value = "0")]
    step: String,
    /// Offset of the first request.
    #[arg(short = 'o', default_value = "0")]
    offset: String,
    /// Write instead of read.
    #[arg(short = 'w')]
    write: bool,
    /// Cache mode: none (O_DIRECT), writeback, writethrough, directsync, unsafe.
    #[arg(short = 't', default_value = "writeback")]
    cache: String,
    /// Image format; probed from the file's magic when not given.
    #[arg(short = 'f', value_enum)]
    format: Option<Format>,
    /// I/O engine: only `threads` (a pool of threads, one per request in flight).
    #[arg(short = 'i', default_value = "threads")]
    aio: String,
    /// Flush after every N completed requests (write tests only; N at least the depth).
    #[arg(long, value_name = "N", default_value_t = 0)]
    flush_interval: u64,
    /// With --flush-interval, flush without waiting for the requests in flight.
    #[arg(long)]
    no_drain: bool,
    /// Byte value written by write requests.
    #[arg(long, default_value_t = 0)]
    pattern: u8,
    /// Print only errors.
    #[arg(short = 'q')]
    quiet: bool,
    /// Budget of the qcow2 metadata cache (K/M/G suffixes; the library's default is 32M, which maps 256 GiB of
    /// data at 64 KiB clusters). qemu-img's counterpart is the `l2-cache-size` option.
    #[arg(long, value_name = "SIZE")]
    cache_size: Option<String>,
    /// Random offsets (aligned to the request size, from a fixed seed) instead of stepping; qemu-img bench has no
    /// such mode.
    #[arg(long)]
    random: bool,
    /// Keep requests within the first SIZE bytes of the image (K/M/G suffixes).
    #[arg(long, value_name = "SIZE")]
    span: Option<String>,
    /// Also run a thread that writes 4 KiB into a new cluster from --flusher-offset on and flushes, every MS
    /// milliseconds, for as long as the requests run (the image is opened read-write).
    #[arg(long, value_name = "MS")]
    flusher_ms: Option<u64>,
    /// Where the flusher's writes start (K/M/G suffixes).
    #[arg(long, value_name = "OFFSET", default_value = "0")]
    flusher_offset: String,
    /// Write metadata back with the metadata lock held throughout, as the engine did before its writeback
    /// queue: for measuring the difference.
    #[arg(long)]
    writeback_under_lock: bool,
    /// Print how long the metadata lock was held (median and 99th percentile, by use) after the run.
    #[arg(long)]
    lock_stats: bool,
    /// The image to use.
    file: PathBuf,
}

/// A file device whose flushes can be switched off (cache=unsafe).
struct BenchDevice {
    file: FileDevice,
    ignore_flush: bool,
}

impl BlockDevice for BenchDevice {
    qcow::forward_block_device_methods!(file; info, read, write, resize, discard, zero_range, disconnect, read_at, write_at);
    fn flush(&self) -> qcow::Result<()> {
        if self.ignore_flush {
            return Ok(());
        }
        self.file.flush()
    }
}

/// What is benchmarked.
enum Target {
    Raw(BenchDevice),
    Qcow2(Box<Image<BenchDevice>>),
}

impl Target {
    fn device(&self) -> &dyn BlockDevice {
        match self {
            Target::Raw(dev) => dev,
            Target::Qcow2(image) => &**image,
        }
    }

    fn size(&self) -> u64 {
        match self {
            Target::Raw(dev) => dev.file.len_bytes(),
            Target::Qcow2(image) => image.virtual_size(),
        }
    }

    /// The metadata lock's hold times, for a qcow2 image.
    fn lock_hold_times(&self) -> Option<qcow::LockHoldTimes> {
        match self {
            Target::Raw(_) => None,
            Target::Qcow2(image) => Some(image.lock_hold_times()),
        }
    }

    fn close(self) -> qcow::Result<()> {
        match self {
            Target::Raw(dev) => dev.flush(),
            Target::Qcow2(image) => image.close(),
        }
    }
}

/// How a cache mode opens and flushes.
struct Cache {
    direct: bool,
    flush_each_write: bool,
    ignore_flush: bool,
}

fn cache_mode(name: &str) -> Result<Cache> {
    let (direct, flush_each_write, ignore_flush) = match name {
        "none" | "off" => (true, false, false),
        "writeback" => (false, false, false),
        "writethrough" => (false, true, false),
        "directsync" => (true, true, false),
        "unsafe" => (false, false, true),
        other => {
            return Err(Error::msg(format!(
                "invalid cache option '{other}': use none, writeback, writethrough, directsync or unsafe"
            )))
        }
    };
    Ok(Cache { direct, flush_each_write, ignore_flush })
}

/// The request schedule shared by the workers.
/// Where the run is. Issuing and completing a request touch only the atomics: with dozens of workers, a mutex
/// taken twice per request costs more context switches than the requests themselves. Waits (for a drain to end,
/// or for the requests in flight to finish) park the thread; whoever ends the wait unparks exactly the threads
/// parked for it, which then run without contending for a shared lock.
#[derive(Default)]
struct Schedule {
    issued: AtomicU64,
    completed: AtomicU64,
    in_flight: AtomicU64,
    /// A drained flush is due or running: no request may start.
    draining: AtomicBool,
    /// Set with `error`: every worker stops.
    stop: AtomicBool,
    error: Mutex<Option<Error>>,
    /// Workers waiting for a drain to end.
    held: Parked,
    /// The worker draining, waiting for the requests in flight.
    drainer: Parked,
}

/// Threads parked until a condition they wait on turns false.
#[derive(Default)]
struct Parked(Mutex<Vec<Thread>>);

impl Parked {
    /// Parks while `blocked` holds or until `stop`; whoever makes `blocked` false calls `wake` after doing so.
    fn wait_while(&self, stop: &AtomicBool, blocked: impl Fn() -> bool) {
        while blocked() && !stop.load(Ordering::SeqCst) {
            self.0.lock().unwrap_or_else(|e| e.into_inner()).push(std::thread::current());
            // Looked at again once registered: a change made before `wake` took the list is seen here, and one
            // made after it unparks this thread.
            if !blocked() || stop.load(Ordering::SeqCst) {
                return;
            }
            std::thread::park();
        }
    }

    fn wake(&self) {
        let threads = std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()));
        for thread in threads {
            thread.unpark();
        }
    }
}

impl Schedule {
    fn fail(&self, e: Error) {
        self.error.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(e);
        self.stop.store(true, Ordering::SeqCst);
        self.held.wake();
        self.drainer.wake();
    }

    /// Marks one request finished; the last one out of a drain wakes the drainer.
    fn leave(&self) {
        // SeqCst pairs with the drainer's store of `draining` and load of `in_flight`: one of the two sees the other.
        if self.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 && self.draining.load(Ordering::SeqCst) {
            self.drainer.wake();
        }
    }
}

/// The run's fixed parameters.
struct Plan {
    count: u64,
    bufsize: u64,
    step: u64,
    first: u64,
    image_size: u64,
    write: bool,
    pattern: u8,
    flush_interval: u64,
    drain: bool,
    flush_each_write: bool,
    random: bool,
}

impl Plan {
    /// Offset of request `k`, wrapped as QEMU wraps it.
    fn offset(&self, k: u64) -> u64 {
        if self.random {
            // splitmix64 of the request number: the same offsets every run, spread over the whole span.
            let mut z = k.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            let slots = (self.image_size.saturating_sub(self.first) / self.bufsize.max(1)).max(1);
            return self.first + z % slots * self.bufsize;
        }
        if k == 0 {
            return self.first;
        }
        if self.image_size <= self.bufsize {
            return 0;
        }
        let span = u128::from(self.image_size - self.bufsize);
        ((u128::from(self.first) + u128::from(k) * u128::from(self.step)) % span) as u64
    }
}

/// A buffer of `len` bytes aligned to 4 KiB, so that O_DIRECT needs no bounce copy.
fn aligned(len: usize, fill: u8) -> (Vec<u8>, usize) {
    let buf = vec![fill; len + 4096];
    let skew = buf.as_ptr() as usize % 4096;
    let start = if skew == 0 { 0 } else { 4096 - skew };
    (buf, start)
}

fn worker(dev: &dyn BlockDevice, plan: &Plan, state: &Schedule) {
    let (mut storage, start) = aligned(plan.bufsize as usize, plan.pattern);
    let Some(buf) = storage.get_mut(start..start + plan.bufsize as usize) else { return };
    loop {
        if state.stop.load(Ordering::SeqCst) {
            return;
        }
        // Counted in flight before looking at `draining`, so that a drain either sees this request or this
        // request sees the drain.
        state.in_flight.fetch_add(1, Ordering::SeqCst);
        if state.draining.load(Ordering::SeqCst) {
            state.leave();
            state.held.wait_while(&state.stop, || state.draining.load(Ordering::SeqCst));
            continue;
        }
        let k = state.issued.fetch_add(1, Ordering::SeqCst);
        if k >= plan.count {
            state.leave();
            return;
        }
        let offset = plan.offset(k);
        let mut result = if plan.write { dev.write_at(offset, buf) } else { dev.read_at(offset, buf) };
        if result.is_ok() && plan.write && plan.flush_each_write {
            result = dev.flush();
        }
        state.leave();
        if let Err(e) = result {
            let what = if plan.write { "write" } else { "read" };
            state.fail(Error::wrap(format!("failed {what} request at offset {offset}"), e));
            return;
        }
        let completed = state.completed.fetch_add(1, Ordering::SeqCst) + 1;
        if plan.flush_interval == 0 || !completed.is_multiple_of(plan.flush_interval) {
            continue;
        }
        if plan.drain {
            state.draining.store(true, Ordering::SeqCst);
            state.drainer.wait_while(&state.stop, || state.in_flight.load(Ordering::SeqCst) > 0);
        }
        if let Err(e) = dev.flush() {
            state.fail(Error::wrap("failed flush request", e));
        }
        state.draining.store(false, Ordering::SeqCst);
        state.held.wake();
    }
}

fn open_target(args: &Args, cache: &Cache) -> Result<Target> {
    let path = &args.file;
    let format = match args.format {
        Some(f) => f,
        None => open::probe(path)?,
    };
    let writable = args.write || args.flusher_ms.is_some();
    let file = FileDevice::open(
        path,
        &FileOptions {
            read_only: !writable,
            direct: cache.direct,
            locking: if !writable && crate::open::forced_share() { Locking::ForceShare } else { Locking::Qemu },
        },
    )
    .context(|| format!("could not open '{}'", path.display()))?;
    let dev = BenchDevice { file, ignore_flush: cache.ignore_flush };
    Ok(match format {
        Format::Raw => Target::Raw(dev),
        Format::Qcow2 => {
            let mut config = if writable { Config::default() } else { Config::read_only() };
            if let Some(size) = &args.cache_size {
                config.cache_size = open::size(size)?;
            }
            config.writeback_under_lock = args.writeback_under_lock;
            config.time_locks = args.lock_stats;
            let image = Image::open_with(dev, config, &FileResolver::new(path, open::policy()))
                .map_err(|e| open::open_error(path, e))?;
            Target::Qcow2(Box::new(image))
        }
    })
}

pub fn run(args: &Args) -> Result<()> {
    if args.aio != "threads" {
        return Err(Error::msg(format!("-i {}: only the 'threads' I/O engine is available", args.aio)));
    }
    let cache = cache_mode(&args.cache)?;
    let bufsize = open::size(&args.size)?;
    if bufsize == 0 || bufsize % 512 != 0 || bufsize > 1 << 30 {
        return Err(Error::msg(format!("invalid buffer size '{}': a multiple of 512 up to 1G", args.size)));
    }
    let step = match open::size(&args.step)? {
        0 => bufsize,
        n => n,
    };
    let first = open::size(&args.offset)?;
    if args.depth == 0 || args.depth > 4096 {
        return Err(Error::msg(format!("invalid queue depth {}: from 1 to 4096", args.depth)));
    }
    if args.flush_interval > 0 && !args.write {
        return Err(Error::msg("--flush-interval is only available in write tests"));
    }
    if args.flush_interval > 0 && args.flush_interval < args.depth {
        return Err(Error::msg("flush interval can't be smaller than depth"));
    }
    if args.no_drain && args.flush_interval == 0 {
        return Err(Error::msg("--no-drain requires a flush interval"));
    }
    let target = open_target(args, &cache)?;
    let image_size = match &args.span {
        Some(span) => open::size(span)?.min(target.size()),
        None => target.size(),
    };
    if first.saturating_add(bufsize) > image_size {
        return Err(Error::msg(format!(
            "offset {first} plus request size {bufsize} runs past the end of '{}' ({image_size} bytes)",
            args.file.display()
        )));
    }
    let plan = Plan {
        count: args.count,
        bufsize,
        step,
        first,
        image_size,
        write: args.write,
        pattern: args.pattern,
        flush_interval: args.flush_interval,
        drain: !args.no_drain,
        flush_each_write: cache.flush_each_write,
        random: args.random,
    };
    let flusher_offset = open::size(&args.flusher_offset)?;
    if args.flusher_ms.is_some() && flusher_offset.saturating_add(4096) > target.size() {
        return Err(Error::msg(format!("--flusher-offset {flusher_offset} leaves no room for its writes")));
    }
    if !args.quiet {
        let mut text = format!(
            "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size {})\n",
            args.count,
            if args.write { "write" } else { "read" },
            bufsize,
            args.depth,
            first,
            step
        );
        if args.flush_interval > 0 {
            text.push_str(&format!("Sending flush every {} requests\n", args.flush_interval));
        }
        print(text.as_bytes())?;
    }
    let state = Schedule::default();
    let threads = args.depth.min(args.count.max(1));
    let started = Instant::now();
    let workers_done = AtomicBool::new(false);
    let flushes = AtomicU64::new(0);
    std::thread::scope(|scope| {
        if let Some(ms) = args.flusher_ms {
            let (dev, state, done, flushes) = (target.device(), &state, &workers_done, &flushes);
            scope.spawn(move || flusher(dev, flusher_offset, ms, state, done, flushes));
        }
        let workers: Vec<_> = (0..threads).map(|_| scope.spawn(|| worker(target.device(), &plan, &state))).collect();
        for w in workers {
            let _ = w.join();
        }
        workers_done.store(true, Ordering::SeqCst);
    });
    let elapsed = started.elapsed();
    let hold_times = target.lock_hold_times();
    let failed = state.error.into_inner().unwrap_or_else(|e| e.into_inner());
    let closed = target.close().map_err(|e| open::io_error(&args.file, e));
    if let Some(e) = failed {
        return Err(e);
    }
    closed?;
    if !args.quiet {
        print(format!("Run completed in {:.3} seconds.\n", elapsed.as_secs_f64()).as_bytes())?;
        if args.flusher_ms.is_some() {
            print(format!("Flusher: {} writes and flushes.\n", flushes.load(Ordering::SeqCst)).as_bytes())?;
        }
        if let Some(times) = hold_times.filter(|_| args.lock_stats) {
            let line = |name: &str, t: qcow::HoldTimes| {
                format!(
                    "Lock held for {name}: median {:.1} us, p99 {:.1} us ({} times)\n",
                    t.median.as_secs_f64() * 1e6,
                    t.p99.as_secs_f64() * 1e6,
                    t.count
                )
            };
            let text = line("lookups", times.lookup)
                + &line("allocation", times.allocation)
                + &line("writeback", times.writeback);
            print(text.as_bytes())?;
        }
    }
    Ok(())
}

/// The flusher: a write of 4 KiB into the next new cluster, then a flush, every `ms` milliseconds, until the
/// workers are done. Each flush has metadata to write back (the write allocated).
fn flusher(dev: &dyn BlockDevice, first: u64, ms: u64, state: &Schedule, done: &AtomicBool, flushes: &AtomicU64) {
    let (storage, start) = aligned(4096, 0x5a);
    let Some(buf) = storage.get(start..start + 4096) else { return };
    let size = dev.info().size_bytes();
    let mut offset = first;
    while !done.load(Ordering::SeqCst) && !state.stop.load(Ordering::SeqCst) {
        let result = dev.write_at(offset, buf).and_then(|()| dev.flush());
        if let Err(e) = result {
            state.fail(Error::wrap(format!("failed flusher write or flush at offset {offset}"), e));
            return;
        }
        flushes.fetch_add(1, Ordering::Relaxed);
        offset += 65536;
        if offset.saturating_add(4096) > size {
            offset = first;
        }
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn plan(first: u64, step: u64, bufsize: u64, image_size: u64) -> Plan {
        Plan {
            count: 10,
            bufsize,
            step,
            first,
            image_size,
            write: false,
            pattern: 0,
            flush_interval: 0,
            drain: true,
            flush_each_write: false,
            random: false,
        }
    }

    #[test]
    fn offsets_wrap_as_qemu_wraps_them() {
        let p = plan(0, 4096, 4096, 16384);
        let got: Vec<u64> = (0..5).map(|k| p.offset(k)).collect();
        // Wrapped modulo size - bufsize = 12288: the last request never runs past the end.
        assert_eq!(got, vec![0, 4096, 8192, 0, 4096]);
        let p = plan(8192, 4096, 4096, 4096);
        assert_eq!(p.offset(0), 8192);
        assert_eq!(p.offset(3), 0);
    }
}
