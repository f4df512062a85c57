//! The parallel copy: workers take chunks in guest order under a window that bounds how far they may run ahead
//! of the writer, and the calling thread stores their results strictly in guest order. Into a qcow2 image the
//! calling thread only allocates (in guest order, so the layout never depends on the thread count) and a store
//! pool writes the data, several chunks at once.

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::sync::{Condvar, Mutex, MutexGuard};

use super::target::Target;
use super::tasks::{Task, Tasks};
use super::work::{process, Done, Piece, Rules};
use super::{Options, Source};
use crate::block::{BlockDevice, SECTOR_SIZE};
use crate::error::{Error, Result};

/// What the workers and the writer share.
struct State<'a> {
    tasks: Tasks<'a>,
    /// The sequence number the next task gets.
    next_seq: u64,
    /// How many tasks are wholly stored (in any order, once a store pool writes data): the window lets workers
    /// run this many plus `in_flight` ahead.
    stored: u64,
    /// Set when the copy fails: workers stop taking tasks.
    abort: bool,
    /// Buffers handed back by the writer.
    pool: Vec<Vec<u8>>,
}

struct Shared<'a> {
    state: Mutex<State<'a>>,
    wake: Condvar,
}

impl<'a> Shared<'a> {
    fn lock(&self) -> MutexGuard<'_, State<'a>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn abort(&self) {
        self.lock().abort = true;
        self.wake.notify_all();
    }
}

/// Copies `source` into `target` as [`Options`] say (see the [module](super) documentation).
///
/// `progress(done, total)` is called from the calling thread as chunks are stored, with `total == size`, and a
/// last time with `done == total`; the target is flushed at the end.
///
/// # Errors
/// `InvalidArgument` when the source or the target is shorter than the size (rounded up to a sector)
/// or the options are unusable; otherwise the first error of the map, the source or the target, after which the
/// target holds part of the data.
pub fn run(
    source: &Source<'_>,
    target: &dyn Target,
    options: &Options,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    let size = source.size;
    let padded = size
        .checked_next_multiple_of(SECTOR_SIZE)
        .ok_or_else(|| Error::invalid("convert", format!("size {size} overflows")))?;
    let src_len = source.device.info().size_bytes();
    if src_len < padded {
        return Err(Error::invalid("convert", format!("source is {src_len} bytes, shorter than {size}")));
    }
    let dst_len = target.size_bytes();
    if dst_len < padded {
        return Err(Error::invalid("convert", format!("destination is {dst_len} bytes, shorter than {size}")));
    }
    let granule = options.zero_granule.max(SECTOR_SIZE).checked_next_power_of_two().unwrap_or(SECTOR_SIZE);
    let (align, unit) = match options.compression {
        Some(c) if !c.cluster_size.is_power_of_two() || c.cluster_size < SECTOR_SIZE => {
            return Err(Error::invalid("convert", format!("cluster size {} is not usable", c.cluster_size)));
        }
        Some(c) => (c.cluster_size, c.cluster_size),
        None => (SECTOR_SIZE, granule),
    };
    let chunk = options.chunk_size.max(unit).checked_next_power_of_two().unwrap_or(unit);
    let threads = options.threads.max(1);
    let in_flight = u64::try_from(options.in_flight.max(threads)).unwrap_or(u64::MAX);
    let shared = Shared {
        state: Mutex::new(State {
            tasks: Tasks::new(source.map, size, padded, chunk, align, !options.target_is_zero),
            next_seq: 0,
            stored: 0,
            abort: false,
            pool: Vec::new(),
        }),
        wake: Condvar::new(),
    };
    progress(0, size);
    let (tx, rx) = mpsc::channel::<(u64, Result<Done>)>();
    let failed_store: Mutex<Option<Error>> = Mutex::new(None);
    // A target that allocates in order and takes data from any thread (a qcow2 image) gets its data written by a
    // pool of its own: the writer only allocates, in guest order, so the file is the same whatever the thread
    // count, and the data writes run side by side.
    let prepared_device = target.prepared_device();
    let (store_tx, store_rx) = mpsc::channel::<Done>();
    let store_rx = Mutex::new(store_rx);
    let result = std::thread::scope(|scope| {
        for _ in 0..threads {
            let tx = tx.clone();
            let shared = &shared;
            let rules = Rules { granule, compression: options.compression, target_is_zero: options.target_is_zero };
            let direct_target = target.concurrent();
            scope.spawn(move || worker(shared, source, direct_target, &tx, in_flight, rules));
        }
        drop(tx);
        let sender = store_tx;
        if let Some(dev) = prepared_device {
            for _ in 0..threads {
                let (shared, failed_store, store_rx) = (&shared, &failed_store, &store_rx);
                scope.spawn(move || store_prepared(dev, shared, store_rx, failed_store));
            }
        }
        let pool = prepared_device.map(|_| &sender);
        let result = write_in_order(&shared, &rx, target, pool, size, progress);
        // The store pool ends once every prepared chunk was handed to it and written.
        drop(sender);
        if result.is_err() {
            shared.abort();
        }
        result
    });
    // A store that failed stopped the copy: its error is the cause of any the writer met after it.
    if let Some(e) = failed_store.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(e);
    }
    result?;
    progress(size, size);
    target.flush()
}

/// Takes tasks in order while the window allows, processes them, and sends the results to the writer.
fn worker<'a>(
    shared: &Shared<'_>,
    source: &Source<'a>,
    direct_target: Option<&dyn BlockDevice>,
    tx: &mpsc::Sender<(u64, Result<Done>)>,
    in_flight: u64,
    rules: Rules,
) {
    loop {
        let (seq, task, buf): (u64, Task, Vec<u8>) = {
            let mut s = shared.lock();
            while !s.abort && s.next_seq >= s.stored.saturating_add(in_flight) {
                s = shared.wake.wait(s).unwrap_or_else(|e| e.into_inner());
            }
            if s.abort {
                return;
            }
            let seq = s.next_seq;
            match s.tasks.next_task() {
                Ok(None) => return,
                Ok(Some(task)) => {
                    s.next_seq += 1;
                    let buf = s.pool.pop().unwrap_or_default();
                    (seq, task, buf)
                }
                Err(e) => {
                    s.next_seq += 1;
                    let _ = tx.send((seq, Err(e)));
                    return;
                }
            }
        };
        let done = process(task, buf, source, rules).and_then(|done| match direct_target {
            Some(dev) => store_data(dev, done),
            None => Ok(done),
        });
        let failed = done.is_err();
        if tx.send((seq, done)).is_err() || failed {
            return;
        }
    }
}

/// Receives results and stores them in sequence order, returning buffers to the pool and opening the window.
/// With `prepared`, data pieces the target could prepare are allocated here, in order, and their chunks go to the
/// store pool, which writes them and then returns the buffers.
fn write_in_order(
    shared: &Shared<'_>,
    rx: &mpsc::Receiver<(u64, Result<Done>)>,
    target: &dyn Target,
    prepared: Option<&mpsc::Sender<Done>>,
    size: u64,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    let mut waiting: BTreeMap<u64, Result<Done>> = BTreeMap::new();
    let mut next = 0u64;
    // The channel closes when every worker has finished: all tasks were handed out (or the copy failed).
    for (seq, done) in rx {
        waiting.insert(seq, done);
        while let Some(done) = waiting.remove(&next) {
            let mut done = done?;
            next += 1;
            let end = done.end.min(size);
            if let Some(pool) = prepared {
                let later = prepare(target, &mut done)?;
                if !later.is_empty() {
                    done.pieces = later;
                    pool.send(done).map_err(|_| Error::invalid("convert", "internal: the store pool stopped"))?;
                    progress(end, size);
                    continue;
                }
            } else {
                store(target, &done)?;
            }
            chunk_stored(shared, done.buf);
            progress(end, size);
        }
    }
    if let Some((_, done)) = waiting.into_iter().next() {
        // A gap in the sequence: a worker stopped without sending its task's result.
        done?;
        return Err(Error::invalid("convert", format!("internal: chunk {next} was never processed")));
    }
    Ok(())
}

/// One chunk is wholly stored: its buffer goes back to the pool and the window opens by one.
fn chunk_stored(shared: &Shared<'_>, buf: Vec<u8>) {
    {
        let mut s = shared.lock();
        s.stored += 1;
        s.pool.push(buf);
    }
    shared.wake.notify_all();
}

/// Stores the pieces of `done` that must be stored in order, allocating the data pieces the target can prepare;
/// answers those, for the store pool to write.
fn prepare(target: &dyn Target, done: &mut Done) -> Result<Vec<Piece>> {
    let mut later = Vec::new();
    for piece in std::mem::take(&mut done.pieces) {
        let (at, len) = match &piece {
            Piece::Data { at, range } => (*at, range.len() as u64),
            _ => {
                store_piece(target, done, &piece)?;
                continue;
            }
        };
        if target.prepare_data(at, len)? {
            later.push(piece);
        } else {
            store_piece(target, done, &piece)?;
        }
    }
    Ok(later)
}

/// A thread of the store pool: writes the prepared data of each chunk it receives, then returns its buffer.
fn store_prepared(
    dev: &dyn BlockDevice,
    shared: &Shared<'_>,
    chunks: &Mutex<mpsc::Receiver<Done>>,
    failed: &Mutex<Option<Error>>,
) {
    loop {
        let next = chunks.lock().unwrap_or_else(|e| e.into_inner()).recv();
        let Ok(done) = next else { return };
        match store_data(dev, done) {
            Ok(done) => chunk_stored(shared, done.buf),
            Err(e) => {
                failed.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(e);
                shared.abort();
                return;
            }
        }
    }
}

/// Writes the data pieces of `done` straight to `dev` (a destination whose layout does not depend on write
/// order), leaving the rest for the writer.
fn store_data(dev: &dyn BlockDevice, mut done: Done) -> Result<Done> {
    let mut rest = Vec::new();
    for piece in std::mem::take(&mut done.pieces) {
        match piece {
            Piece::Data { at, range } => dev.write_at(at, buffer_part(&done, &range)?)?,
            other => rest.push(other),
        }
    }
    done.pieces = rest;
    Ok(done)
}

fn buffer_part<'d>(done: &'d Done, range: &std::ops::Range<usize>) -> Result<&'d [u8]> {
    done.buf.get(range.clone()).ok_or_else(|| {
        Error::invalid("convert", format!("internal: piece {range:?} of a {}-byte chunk", done.buf.len()))
    })
}

fn store(target: &dyn Target, done: &Done) -> Result<()> {
    for piece in &done.pieces {
        store_piece(target, done, piece)?;
    }
    Ok(())
}

fn store_piece(target: &dyn Target, done: &Done, piece: &Piece) -> Result<()> {
    match piece {
        Piece::Data { at, range } => target.write_data(*at, buffer_part(done, range)?),
        Piece::Zero { at, len } => target.write_zeroes(*at, *len),
        Piece::Compressed { at, bytes } => target.write_compressed(*at, bytes),
    }
}
