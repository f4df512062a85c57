//! [`FaultyDevice`]: a test tool that injects I/O errors and simulates power loss. It is compiled always so that
//! integration tests and downstream crates can use it, but nothing in the library depends on it.
//!
//! Model: the inner device holds the *durable* state. Writes, resizes and discards since the last successful flush
//! are kept in a journal instead of reaching the inner device; reads and `info()` see the inner device with the
//! journal applied in order. A flush applies the journal to the inner device in order, flushes it, and empties the
//! journal. A power loss applies a chosen subset of the journal (in order), drops the rest, and leaves the device
//! crashed: every later operation answers `Disconnected`, while the inner device stays usable so the test can
//! reopen what survived.
//!
//! Invariants: all state lives behind one mutex, held for the whole of every operation, so the journal order is
//! the order in which operations completed; once crashed or disconnected, the device stays so.

use std::fmt;
use std::io::{IoSlice, IoSliceMut};
use std::sync::{Mutex, MutexGuard};

use super::{check_request, BlockDevice, Info};
use crate::error::{Error, ErrorKind, Result};

/// An operation kind whose calls [`FaultyDevice::fail_next`] can make fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultyOp {
    /// [`BlockDevice::read`] (and `read_at`).
    Read,
    /// [`BlockDevice::write`] (and `write_at`).
    Write,
    /// [`BlockDevice::flush`].
    Flush,
    /// [`BlockDevice::resize`].
    Resize,
    /// [`BlockDevice::discard`].
    Discard,
}

/// A change made since the last flush, not yet on the inner device.
enum Entry {
    Write { sector: u64, data: Vec<u8> },
    Resize { sectors: u64 },
    Discard { sector: u64, count: u64 },
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Entry::Write { sector, data } => write!(f, "Write {{ sector: {sector}, bytes: {} }}", data.len()),
            Entry::Resize { sectors } => write!(f, "Resize {{ sectors: {sectors} }}"),
            Entry::Discard { sector, count } => write!(f, "Discard {{ sector: {sector}, count: {count} }}"),
        }
    }
}

/// For each operation kind, how many more calls succeed before one fails.
#[derive(Debug, Default)]
struct Faults {
    read: Option<u64>,
    write: Option<u64>,
    flush: Option<u64>,
    resize: Option<u64>,
    discard: Option<u64>,
}

impl Faults {
    fn slot(&mut self, op: FaultyOp) -> &mut Option<u64> {
        match op {
            FaultyOp::Read => &mut self.read,
            FaultyOp::Write => &mut self.write,
            FaultyOp::Flush => &mut self.flush,
            FaultyOp::Resize => &mut self.resize,
            FaultyOp::Discard => &mut self.discard,
        }
    }
}

#[derive(Debug, Default)]
struct State {
    journal: Vec<Entry>,
    faults: Faults,
    crashed: bool,
    disconnected: bool,
    writes: u64,
    flushes: u64,
    crash_after_writes: Option<u64>,
    crash_after_flushes: Option<u64>,
}

/// A device wrapper for tests: fails chosen operations and simulates power loss. See the module documentation for
/// the model.
///
/// ```
/// use qcow::block::{BlockDevice, FaultyDevice, MemoryDevice};
///
/// # fn main() -> Result<(), qcow::Error> {
/// let dev = FaultyDevice::new(MemoryDevice::new(4096));
/// dev.write(0, &[std::io::IoSlice::new(&[1; 512])])?;
/// dev.flush()?;
/// dev.write(1, &[std::io::IoSlice::new(&[2; 512])])?;
/// dev.power_loss_keep_none()?;
/// assert!(dev.read(0, &mut [std::io::IoSliceMut::new(&mut [0; 512])]).is_err());
/// let survived = dev.into_inner().snapshot();
/// assert_eq!(&survived[..512], &[1; 512][..]);
/// assert_eq!(&survived[512..1024], &[0; 512][..]);
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct FaultyDevice<D: BlockDevice> {
    inner: D,
    state: Mutex<State>,
}

impl<D: BlockDevice> FaultyDevice<D> {
    /// Wraps `inner`, whose current contents are the durable state.
    pub fn new(inner: D) -> Self {
        FaultyDevice { inner, state: Mutex::new(State::default()) }
    }

    /// The inner device: the durable state, without the journal.
    pub fn inner(&self) -> &D {
        &self.inner
    }

    /// Unwraps the inner device. Journal entries not yet flushed are dropped, as a power loss would; call
    /// [`power_loss_keep_all`](Self::power_loss_keep_all) first to keep them.
    pub fn into_inner(self) -> D {
        self.inner
    }

    /// Makes a call of kind `op` fail with an `Io` error (`EIO`): `after` calls of that kind succeed first, then
    /// one fails, then the fault is gone. A later `fail_next` for the same kind replaces this one.
    pub fn fail_next(&self, op: FaultyOp, after: u64) {
        *self.lock().faults.slot(op) = Some(after);
    }

    /// Removes every fault set by [`fail_next`](Self::fail_next).
    pub fn clear_faults(&self) {
        self.lock().faults = Faults::default();
    }

    /// How many entries (writes, resizes and discards) the journal holds: the changes a power loss now would
    /// lose.
    pub fn pending_writes(&self) -> usize {
        self.lock().journal.len()
    }

    /// How many times `write` has been called, whatever the outcome.
    pub fn write_count(&self) -> u64 {
        self.lock().writes
    }

    /// How many times `flush` has been called, whatever the outcome.
    pub fn flush_count(&self) -> u64 {
        self.lock().flushes
    }

    /// Whether a power loss has happened.
    pub fn is_crashed(&self) -> bool {
        self.lock().crashed
    }

    /// Loses power once `n` more writes have completed: the next write call after them finds the machine dead.
    /// It is not applied, the journal is dropped (nothing unflushed survives), and that call and every later
    /// operation answer `Disconnected`. Operations between the `n`th write and the next one (reads, flushes, ...)
    /// still happen, so cutting at every `n` from 0 to [`write_count`](Self::write_count) of a clean run visits
    /// every write boundary. Writes that fail do not count as completed.
    pub fn crash_after_writes(&self, n: u64) {
        self.lock().crash_after_writes = Some(n);
    }

    /// Loses power once `n` more flushes have completed: the next flush call finds the machine dead, as
    /// [`crash_after_writes`](Self::crash_after_writes) does for writes. That flush applies nothing.
    pub fn crash_after_flushes(&self, n: u64) {
        self.lock().crash_after_flushes = Some(n);
    }

    /// Loses power now. Journal entry `i` (0 is the oldest) reaches the inner device when `keep(i)` is true,
    /// in order; the others are lost. A kept write that runs past the inner device's end (because the resize
    /// before it was lost) grows the inner device to fit, as a write past the end of a file does. Afterwards every
    /// operation answers `Disconnected`.
    ///
    /// # Errors
    /// The first error the inner device returned while applying kept entries; the remaining kept entries are
    /// still applied and the device is crashed regardless.
    pub fn power_loss(&self, keep: &dyn Fn(usize) -> bool) -> Result<()> {
        let mut st = self.lock();
        self.crash(&mut st, keep)
    }

    /// Loses power now, keeping nothing since the last flush.
    ///
    /// # Errors
    /// As [`power_loss`](Self::power_loss); keeping nothing, it cannot fail in practice.
    pub fn power_loss_keep_none(&self) -> Result<()> {
        self.power_loss(&|_| false)
    }

    /// Loses power now, after everything written reached the inner device.
    ///
    /// # Errors
    /// As [`power_loss`](Self::power_loss).
    pub fn power_loss_keep_all(&self) -> Result<()> {
        self.power_loss(&|_| true)
    }

    // A panic while the lock was held (for instance a failed assertion in a test thread) leaves the state as it
    // was between two entries, which is still a state a power loss could produce.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn crash(&self, st: &mut State, keep: &dyn Fn(usize) -> bool) -> Result<()> {
        let journal = std::mem::take(&mut st.journal);
        st.crashed = true;
        let mut first_err = None;
        for (i, entry) in journal.iter().enumerate() {
            if keep(i) {
                if let Err(e) = self.apply(entry, true) {
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn apply(&self, entry: &Entry, grow_to_fit: bool) -> Result<()> {
        match entry {
            Entry::Write { sector, data } => {
                if grow_to_fit {
                    let info = self.inner.info();
                    let sectors = data.len() as u64 / info.sector_size.max(1);
                    let end = sector.saturating_add(sectors);
                    if end > info.size_sectors {
                        self.inner.resize(end)?;
                    }
                }
                self.inner.write(*sector, &[std::io::IoSlice::new(data)])
            }
            Entry::Resize { sectors } => self.inner.resize(*sectors),
            Entry::Discard { sector, count } => match self.inner.discard(*sector, *count) {
                Err(e) if e.kind() == ErrorKind::Unimplemented => self.write_zeros(*sector, *count),
                other => other,
            },
        }
    }

    /// Stands in for discard on inner devices that do not implement it, so that discarded sectors read as zeros
    /// as the contract says.
    fn write_zeros(&self, sector: u64, count: u64) -> Result<()> {
        let sector_size = self.inner.info().sector_size;
        super::write_zeros(&self.inner, sector.saturating_mul(sector_size), count.saturating_mul(sector_size))
    }

    fn check_alive(st: &State) -> Result<()> {
        if st.crashed || st.disconnected {
            Err(Error::Disconnected)
        } else {
            Ok(())
        }
    }

    fn inject(st: &mut State, op: FaultyOp, name: &'static str, offset: u64) -> Result<()> {
        let slot = st.faults.slot(op);
        match *slot {
            Some(0) => {
                *slot = None;
                Err(Error::io(name, offset, std::io::Error::from_raw_os_error(libc::EIO)))
            }
            Some(n) => {
                *slot = Some(n - 1);
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// The inner device's info with the journal's latest resize applied.
    fn view_info(&self, st: &State) -> Info {
        let mut info = self.inner.info();
        if let Some(sectors) = st.journal.iter().rev().find_map(|e| match e {
            Entry::Resize { sectors } => Some(*sectors),
            _ => None,
        }) {
            info.size_sectors = sectors;
        }
        info
    }

    fn check_writable(&self, st: &State, op: &'static str) -> Result<Info> {
        let info = self.view_info(st);
        if info.read_write {
            Ok(info)
        } else {
            Err(Error::ReadOnly { op })
        }
    }
}

/// Copies the part of `src` (sectors from `src_sector`) that overlaps `dst` (sectors from `dst_sector`).
fn overlay(dst: &mut [u8], dst_sector: u64, src: &[u8], src_sector: u64, sector_size: u64) {
    let Some(range) = overlap(dst.len(), dst_sector, src.len(), src_sector, sector_size) else {
        return;
    };
    let (d, s) = range;
    if let (Some(d), Some(s)) = (dst.get_mut(d), src.get(s)) {
        d.copy_from_slice(s);
    }
}

/// Zeroes the part of `dst` (sectors from `dst_sector`) inside sectors `[from, to)`.
fn zero_sectors(dst: &mut [u8], dst_sector: u64, from: u64, to: u64, sector_size: u64) {
    let lo = from.max(dst_sector);
    let hi = to.min(dst_sector.saturating_add(dst.len() as u64 / sector_size.max(1)));
    if lo >= hi {
        return;
    }
    let start = to_usize((lo - dst_sector).saturating_mul(sector_size));
    let end = to_usize((hi - dst_sector).saturating_mul(sector_size));
    if let Some(d) = dst.get_mut(start..end) {
        d.fill(0);
    }
}

type ByteRange = std::ops::Range<usize>;

/// The byte ranges, in `dst` and in `src`, of where two sector runs overlap.
fn overlap(
    dst_len: usize,
    dst_sector: u64,
    src_len: usize,
    src_sector: u64,
    sector_size: u64,
) -> Option<(ByteRange, ByteRange)> {
    let ss = sector_size.max(1);
    let dst_end = dst_sector.saturating_add(dst_len as u64 / ss);
    let src_end = src_sector.saturating_add(src_len as u64 / ss);
    let lo = dst_sector.max(src_sector);
    let hi = dst_end.min(src_end);
    if lo >= hi {
        return None;
    }
    let len = to_usize((hi - lo).saturating_mul(ss));
    let d = to_usize((lo - dst_sector).saturating_mul(ss));
    let s = to_usize((lo - src_sector).saturating_mul(ss));
    Some((d..d.saturating_add(len), s..s.saturating_add(len)))
}

/// Only called on lengths of buffers already in memory, so it fits.
fn to_usize(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

impl<D: BlockDevice> BlockDevice for FaultyDevice<D> {
    fn info(&self) -> Info {
        let st = self.lock();
        self.view_info(&st)
    }

    fn read(&self, sector: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
        let mut st = self.lock();
        Self::check_alive(&st)?;
        let info = self.view_info(&st);
        let ss = info.sector_size.max(1);
        Self::inject(&mut st, FaultyOp::Read, "read", sector.saturating_mul(ss))?;
        let total = check_request(&info, "read", sector, bufs.iter().map(|b| b.len()))?;
        if st.journal.is_empty() {
            return self.inner.read(sector, bufs);
        }
        let mut view = vec![0u8; to_usize(total)];
        let durable = self.inner.info().size_sectors;
        if sector < durable {
            let inside = (durable - sector).saturating_mul(ss).min(total);
            if let Some(prefix) = view.get_mut(..to_usize(inside)) {
                if !prefix.is_empty() {
                    self.inner.read(sector, &mut [std::io::IoSliceMut::new(prefix)])?;
                }
            }
        }
        for entry in &st.journal {
            match entry {
                Entry::Write { sector: at, data } => overlay(&mut view, sector, data, *at, ss),
                Entry::Discard { sector: at, count } => {
                    zero_sectors(&mut view, sector, *at, at.saturating_add(*count), ss)
                }
                // What lay beyond a shrink is gone, even if a later resize grows the device again.
                Entry::Resize { sectors } => zero_sectors(&mut view, sector, *sectors, u64::MAX, ss),
            }
        }
        let mut rest: &[u8] = &view;
        for buf in bufs.iter_mut() {
            let (now, later) = rest.split_at(buf.len().min(rest.len()));
            if let Some(dst) = buf.get_mut(..now.len()) {
                dst.copy_from_slice(now);
            }
            rest = later;
        }
        Ok(())
    }

    fn write(&self, sector: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
        let mut st = self.lock();
        st.writes = st.writes.saturating_add(1);
        Self::check_alive(&st)?;
        if st.crash_after_writes == Some(0) {
            // Keeping nothing cannot fail, and the device is crashed either way.
            let _ = self.crash(&mut st, &|_| false);
            return Err(Error::Disconnected);
        }
        let info = self.check_writable(&st, "write")?;
        Self::inject(&mut st, FaultyOp::Write, "write", sector.saturating_mul(info.sector_size))?;
        let total = check_request(&info, "write", sector, bufs.iter().map(|b| b.len()))?;
        let mut data = Vec::with_capacity(to_usize(total));
        for buf in bufs {
            data.extend_from_slice(buf);
        }
        st.journal.push(Entry::Write { sector, data });
        if let Some(n) = st.crash_after_writes.as_mut() {
            *n = n.saturating_sub(1);
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        let mut st = self.lock();
        st.flushes = st.flushes.saturating_add(1);
        Self::check_alive(&st)?;
        if st.crash_after_flushes == Some(0) {
            let _ = self.crash(&mut st, &|_| false);
            return Err(Error::Disconnected);
        }
        Self::inject(&mut st, FaultyOp::Flush, "flush", 0)?;
        let journal = std::mem::take(&mut st.journal);
        let mut entries = journal.into_iter();
        while let Some(entry) = entries.next() {
            if let Err(e) = self.apply(&entry, false) {
                // The failed entry and those after it are still unflushed.
                st.journal = std::iter::once(entry).chain(entries).collect();
                return Err(e);
            }
        }
        self.inner.flush()?;
        if let Some(n) = st.crash_after_flushes.as_mut() {
            *n = n.saturating_sub(1);
        }
        Ok(())
    }

    fn resize(&self, sectors: u64) -> Result<()> {
        let mut st = self.lock();
        Self::check_alive(&st)?;
        let info = self.check_writable(&st, "resize")?;
        Self::inject(&mut st, FaultyOp::Resize, "resize", sectors.saturating_mul(info.sector_size))?;
        st.journal.push(Entry::Resize { sectors });
        Ok(())
    }

    fn discard(&self, sector: u64, count: u64) -> Result<()> {
        let mut st = self.lock();
        Self::check_alive(&st)?;
        let info = self.check_writable(&st, "discard")?;
        Self::inject(&mut st, FaultyOp::Discard, "discard", sector.saturating_mul(info.sector_size))?;
        match sector.checked_add(count) {
            Some(end) if end <= info.size_sectors => {}
            _ => {
                return Err(Error::invalid(
                    "discard",
                    format!(
                        "sectors {sector}..+{count} run past the end of the device ({} sectors)",
                        info.size_sectors
                    ),
                ))
            }
        }
        if count > 0 {
            st.journal.push(Entry::Discard { sector, count });
        }
        Ok(())
    }

    /// Marks this wrapper disconnected. The inner device is left connected so that a test can inspect or reopen
    /// it, and the journal is kept so that a later [`power_loss`](FaultyDevice::power_loss) can still decide
    /// what survives.
    fn disconnect(&self) {
        self.lock().disconnected = true;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::block::MemoryDevice;
    use std::io::{IoSlice, IoSliceMut};

    fn dev(sectors: u64) -> FaultyDevice<MemoryDevice> {
        FaultyDevice::new(MemoryDevice::new(sectors * 512))
    }

    fn read_sector<D: BlockDevice>(d: &D, sector: u64) -> Vec<u8> {
        let mut buf = vec![0u8; 512];
        d.read(sector, &mut [IoSliceMut::new(&mut buf)]).unwrap();
        buf
    }

    fn sector(snapshot: &[u8], i: usize) -> &[u8] {
        &snapshot[i * 512..(i + 1) * 512]
    }

    #[test]
    fn fail_next_fails_the_nth_call_once() {
        let d = dev(4);
        d.fail_next(FaultyOp::Write, 2);
        d.write(0, &[IoSlice::new(&[1; 512])]).unwrap();
        d.write(1, &[IoSlice::new(&[1; 512])]).unwrap();
        match d.write(2, &[IoSlice::new(&[1; 512])]).unwrap_err() {
            Error::Io { op, offset, source } => {
                assert_eq!(op, "write");
                assert_eq!(offset, 1024);
                assert_eq!(source.raw_os_error(), Some(libc::EIO));
            }
            other => panic!("unexpected {other:?}"),
        }
        d.write(2, &[IoSlice::new(&[1; 512])]).unwrap();
        assert_eq!(d.pending_writes(), 3);

        d.fail_next(FaultyOp::Read, 0);
        assert_eq!(d.read(0, &mut [IoSliceMut::new(&mut [0; 512])]).unwrap_err().kind(), ErrorKind::Io);
        assert_eq!(read_sector(&d, 0), vec![1; 512]);

        d.fail_next(FaultyOp::Flush, 0);
        assert_eq!(d.flush().unwrap_err().kind(), ErrorKind::Io);
        assert_eq!(d.pending_writes(), 3, "a failed flush keeps the journal");
        d.fail_next(FaultyOp::Resize, 0);
        assert_eq!(d.resize(8).unwrap_err().kind(), ErrorKind::Io);
        d.fail_next(FaultyOp::Discard, 0);
        assert_eq!(d.discard(0, 1).unwrap_err().kind(), ErrorKind::Io);
        assert_eq!(d.pending_writes(), 3);

        // Faults only fire for their own kind, and clear_faults removes them.
        d.fail_next(FaultyOp::Write, 0);
        d.fail_next(FaultyOp::Flush, 1);
        d.clear_faults();
        d.write(3, &[IoSlice::new(&[1; 512])]).unwrap();
        d.flush().unwrap();
        d.flush().unwrap();
        assert_eq!(d.inner().snapshot(), vec![1; 2048]);
    }

    #[test]
    fn journal_is_visible_before_flush_and_durable_after() {
        let d = dev(4);
        d.write(1, &[IoSlice::new(&[7; 512]), IoSlice::new(&[8; 512])]).unwrap();
        d.write(2, &[IoSlice::new(&[9; 512])]).unwrap();
        assert_eq!(d.pending_writes(), 2);
        assert_eq!(read_sector(&d, 1), vec![7; 512]);
        assert_eq!(read_sector(&d, 2), vec![9; 512], "later entries win");
        assert_eq!(d.inner().snapshot(), vec![0; 2048], "nothing durable yet");
        // A vectored read across journal and durable data.
        let mut a = vec![0xffu8; 1024];
        let mut b = vec![0xffu8; 1024];
        d.read(0, &mut [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b)]).unwrap();
        assert_eq!(&a[..512], &[0; 512][..]);
        assert_eq!(&a[512..], &[7; 512][..]);
        assert_eq!(&b[..512], &[9; 512][..]);
        assert_eq!(&b[512..], &[0; 512][..]);

        d.flush().unwrap();
        assert_eq!(d.pending_writes(), 0);
        let snap = d.inner().snapshot();
        assert_eq!(sector(&snap, 1), &[7; 512][..]);
        assert_eq!(sector(&snap, 2), &[9; 512][..]);
        assert_eq!(d.write_count(), 2);
        assert_eq!(d.flush_count(), 1);
    }

    #[test]
    fn requests_are_validated_against_the_journaled_view() {
        let d = dev(2);
        let mut odd = vec![0u8; 100];
        assert_eq!(d.read(0, &mut [IoSliceMut::new(&mut odd)]).unwrap_err().kind(), ErrorKind::InvalidArgument);
        assert_eq!(d.write(2, &[IoSlice::new(&[0; 512])]).unwrap_err().kind(), ErrorKind::InvalidArgument);
        d.resize(4).unwrap();
        assert_eq!(d.info().size_sectors, 4);
        assert_eq!(d.inner().info().size_sectors, 2);
        d.write(3, &[IoSlice::new(&[5; 512])]).unwrap();
        assert_eq!(read_sector(&d, 2), vec![0; 512]);
        assert_eq!(read_sector(&d, 3), vec![5; 512]);
        assert_eq!(d.discard(3, 2).unwrap_err().kind(), ErrorKind::InvalidArgument);
        d.flush().unwrap();
        assert_eq!(d.inner().info().size_sectors, 4);
        assert_eq!(sector(&d.inner().snapshot(), 3), &[5; 512][..]);
    }

    #[test]
    fn shrink_then_grow_reads_zeros() {
        let d = FaultyDevice::new(MemoryDevice::from_bytes(vec![3; 4 * 512]));
        d.resize(1).unwrap();
        d.resize(4).unwrap();
        let mut buf = vec![0xffu8; 4 * 512];
        d.read(0, &mut [IoSliceMut::new(&mut buf)]).unwrap();
        assert_eq!(&buf[..512], &[3; 512][..]);
        assert_eq!(&buf[512..], &vec![0; 3 * 512][..]);
        d.flush().unwrap();
        assert_eq!(d.inner().snapshot(), buf);
    }

    #[test]
    fn discard_is_journaled() {
        let d = FaultyDevice::new(MemoryDevice::from_bytes(vec![3; 4 * 512]));
        d.discard(1, 2).unwrap();
        d.discard(0, 0).unwrap();
        assert_eq!(d.pending_writes(), 1);
        assert_eq!(read_sector(&d, 1), vec![0; 512]);
        assert_eq!(read_sector(&d, 3), vec![3; 512]);
        assert_eq!(d.inner().snapshot(), vec![3; 4 * 512]);
        d.flush().unwrap();
        let snap = d.inner().snapshot();
        assert_eq!(sector(&snap, 0), &[3; 512][..]);
        assert_eq!(sector(&snap, 2), &[0; 512][..]);
    }

    #[test]
    fn power_loss_keeps_the_chosen_subset() {
        let d = dev(4);
        d.write(0, &[IoSlice::new(&[1; 512])]).unwrap();
        d.flush().unwrap();
        d.write(0, &[IoSlice::new(&[2; 512])]).unwrap(); // 0
        d.write(1, &[IoSlice::new(&[3; 512])]).unwrap(); // 1
        d.write(2, &[IoSlice::new(&[4; 512])]).unwrap(); // 2
        d.power_loss(&|i| i != 1).unwrap();
        assert!(d.is_crashed());
        assert_eq!(d.pending_writes(), 0);
        let snap = d.inner().snapshot();
        assert_eq!(sector(&snap, 0), &[2; 512][..]);
        assert_eq!(sector(&snap, 1), &[0; 512][..]);
        assert_eq!(sector(&snap, 2), &[4; 512][..]);

        // A dead machine answers nothing.
        let mut buf = vec![0u8; 512];
        assert!(matches!(d.read(0, &mut [IoSliceMut::new(&mut buf)]), Err(Error::Disconnected)));
        assert!(matches!(d.write(0, &[IoSlice::new(&buf)]), Err(Error::Disconnected)));
        assert!(matches!(d.flush(), Err(Error::Disconnected)));
        assert!(matches!(d.resize(8), Err(Error::Disconnected)));
        assert!(matches!(d.discard(0, 1), Err(Error::Disconnected)));
        // The surviving state reopens.
        let inner = d.into_inner();
        assert_eq!(read_sector(&inner, 2), vec![4; 512]);
    }

    #[test]
    fn power_loss_conveniences() {
        let d = dev(2);
        d.write(0, &[IoSlice::new(&[1; 512])]).unwrap();
        d.power_loss_keep_none().unwrap();
        assert_eq!(d.inner().snapshot(), vec![0; 1024]);

        let d = dev(2);
        d.write(0, &[IoSlice::new(&[1; 512])]).unwrap();
        d.discard(0, 1).unwrap();
        d.write(1, &[IoSlice::new(&[2; 512])]).unwrap();
        d.power_loss_keep_all().unwrap();
        let snap = d.inner().snapshot();
        assert_eq!(sector(&snap, 0), &[0; 512][..]);
        assert_eq!(sector(&snap, 1), &[2; 512][..]);
    }

    #[test]
    fn resizes_are_kept_or_dropped_as_units() {
        let d = dev(2);
        d.resize(4).unwrap(); // 0
        d.write(3, &[IoSlice::new(&[6; 512])]).unwrap(); // 1
        d.power_loss(&|i| i == 0).unwrap();
        assert_eq!(d.inner().info().size_sectors, 4);
        assert_eq!(d.inner().snapshot(), vec![0; 2048]);

        let d = dev(2);
        d.resize(4).unwrap();
        d.write(0, &[IoSlice::new(&[6; 512])]).unwrap();
        d.power_loss(&|i| i == 1).unwrap();
        assert_eq!(d.inner().info().size_sectors, 2, "the dropped resize leaves the size as it was");
        assert_eq!(sector(&d.inner().snapshot(), 0), &[6; 512][..]);

        // A kept write past a lost resize grows the device as a file would grow.
        let d = dev(2);
        d.resize(4).unwrap();
        d.write(3, &[IoSlice::new(&[6; 512])]).unwrap();
        d.power_loss(&|i| i == 1).unwrap();
        assert_eq!(d.inner().info().size_sectors, 4);
        assert_eq!(sector(&d.inner().snapshot(), 3), &[6; 512][..]);
    }

    #[test]
    fn crash_after_writes_cuts_at_the_next_write() {
        let d = dev(4);
        d.crash_after_writes(2);
        d.write(0, &[IoSlice::new(&[1; 512])]).unwrap();
        d.flush().unwrap();
        d.write(1, &[IoSlice::new(&[2; 512])]).unwrap();
        assert_eq!(read_sector(&d, 1), vec![2; 512]);
        assert!(matches!(d.write(2, &[IoSlice::new(&[3; 512])]), Err(Error::Disconnected)));
        assert!(d.is_crashed());
        assert!(matches!(d.flush(), Err(Error::Disconnected)));
        let snap = d.inner().snapshot();
        assert_eq!(sector(&snap, 0), &[1; 512][..]);
        assert_eq!(sector(&snap, 1), &[0; 512][..], "unflushed writes are lost");
        assert_eq!(sector(&snap, 2), &[0; 512][..], "the cutting write is not applied");
        assert_eq!(d.write_count(), 3);

        // Zero: the very next write finds the machine dead.
        let d = dev(1);
        d.crash_after_writes(0);
        assert!(matches!(d.write(0, &[IoSlice::new(&[1; 512])]), Err(Error::Disconnected)));
        assert_eq!(d.inner().snapshot(), vec![0; 512]);

        // A failed write does not count as completed.
        let d = dev(2);
        d.crash_after_writes(1);
        d.fail_next(FaultyOp::Write, 0);
        assert_eq!(d.write(0, &[IoSlice::new(&[1; 512])]).unwrap_err().kind(), ErrorKind::Io);
        d.write(0, &[IoSlice::new(&[1; 512])]).unwrap();
        d.flush().unwrap();
        assert!(matches!(d.write(1, &[IoSlice::new(&[1; 512])]), Err(Error::Disconnected)));
        assert_eq!(sector(&d.inner().snapshot(), 0), &[1; 512][..]);
    }

    #[test]
    fn crash_after_flushes_cuts_at_the_next_flush() {
        let d = dev(2);
        d.crash_after_flushes(1);
        d.write(0, &[IoSlice::new(&[1; 512])]).unwrap();
        d.flush().unwrap();
        d.write(1, &[IoSlice::new(&[2; 512])]).unwrap();
        assert!(matches!(d.flush(), Err(Error::Disconnected)));
        let snap = d.inner().snapshot();
        assert_eq!(sector(&snap, 0), &[1; 512][..]);
        assert_eq!(sector(&snap, 1), &[0; 512][..]);
        assert_eq!(d.flush_count(), 2);
    }

    /// The intended use: run a workload once to count writes, then cut it at every write boundary and check that
    /// what survives is exactly what was flushed before the cut.
    #[test]
    fn cutting_a_workload_at_every_write() {
        fn workload(d: &FaultyDevice<MemoryDevice>) -> Result<()> {
            for i in 0..6u8 {
                d.write(u64::from(i % 3), &[IoSlice::new(&[i + 1; 512])])?;
                if i % 2 == 1 {
                    d.flush()?;
                }
            }
            Ok(())
        }
        let clean = dev(3);
        workload(&clean).unwrap();
        let writes = clean.write_count();
        assert_eq!(writes, 6);
        for n in 0..=writes {
            let d = dev(3);
            d.crash_after_writes(n);
            let result = workload(&d);
            if n < writes {
                assert!(matches!(result, Err(Error::Disconnected)));
            } else {
                result.unwrap();
                d.power_loss_keep_none().unwrap();
            }
            // Writes 1..=n happened; flushes follow every second write, so the durable prefix is n rounded down
            // to even.
            let durable = (n / 2) * 2;
            let mut want = vec![0u8; 3 * 512];
            for i in 0..durable as u8 {
                want[(i as usize % 3) * 512..][..512].fill(i + 1);
            }
            assert_eq!(d.inner().snapshot(), want, "cut after {n} writes");
        }
    }

    #[test]
    fn read_only_inner_refuses_changes() {
        let d = FaultyDevice::new(MemoryDevice::new(1024).read_only());
        assert!(!d.info().read_write);
        assert_eq!(d.write(0, &[IoSlice::new(&[1; 512])]).unwrap_err().kind(), ErrorKind::ReadOnly);
        assert_eq!(d.resize(4).unwrap_err().kind(), ErrorKind::ReadOnly);
        assert_eq!(d.discard(0, 1).unwrap_err().kind(), ErrorKind::ReadOnly);
        d.flush().unwrap();
        assert_eq!(d.pending_writes(), 0);
    }

    #[test]
    fn disconnect_keeps_inner_usable_and_journal_decidable() {
        let d = dev(2);
        d.write(0, &[IoSlice::new(&[1; 512])]).unwrap();
        d.disconnect();
        let mut buf = vec![0u8; 512];
        assert!(matches!(d.read(0, &mut [IoSliceMut::new(&mut buf)]), Err(Error::Disconnected)));
        assert!(matches!(d.write(0, &[IoSlice::new(&buf)]), Err(Error::Disconnected)));
        assert!(matches!(d.flush(), Err(Error::Disconnected)));
        assert!(matches!(d.resize(1), Err(Error::Disconnected)));
        assert!(matches!(d.discard(0, 1), Err(Error::Disconnected)));
        assert_eq!(d.pending_writes(), 1);
        d.power_loss_keep_all().unwrap();
        assert_eq!(read_sector(d.inner(), 0), vec![1; 512]);
    }

    /// An inner device without discard: flushing a discard writes zeros instead.
    struct NoDiscard(MemoryDevice);

    impl BlockDevice for NoDiscard {
        fn info(&self) -> Info {
            self.0.info()
        }
        fn read(&self, sector: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
            self.0.read(sector, bufs)
        }
        fn write(&self, sector: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
            self.0.write(sector, bufs)
        }
        fn flush(&self) -> Result<()> {
            self.0.flush()
        }
        fn resize(&self, sectors: u64) -> Result<()> {
            self.0.resize(sectors)
        }
        fn disconnect(&self) {
            self.0.disconnect()
        }
    }

    #[test]
    fn discard_on_an_inner_without_discard_writes_zeros() {
        let d = FaultyDevice::new(NoDiscard(MemoryDevice::from_bytes(vec![9; 600 * 512])));
        d.discard(10, 300).unwrap();
        d.flush().unwrap();
        let snap = d.inner().0.snapshot();
        assert!(snap[..10 * 512].iter().all(|&b| b == 9));
        assert!(snap[10 * 512..310 * 512].iter().all(|&b| b == 0));
        assert!(snap[310 * 512..].iter().all(|&b| b == 9));
    }

    #[test]
    fn failed_flush_keeps_unapplied_entries() {
        // Stacked: the outer device's flush applies its journal to an inner faulty device that fails the resize.
        let d = FaultyDevice::new(dev(2));
        d.write(0, &[IoSlice::new(&[1; 512])]).unwrap();
        d.resize(1).unwrap();
        d.write(0, &[IoSlice::new(&[2; 512])]).unwrap();
        d.inner().fail_next(FaultyOp::Resize, 0);
        assert_eq!(d.flush().unwrap_err().kind(), ErrorKind::Io);
        assert_eq!(d.pending_writes(), 2, "the write before the failure was applied");
        assert_eq!(read_sector(d.inner(), 0), vec![1; 512]);
        assert_eq!(read_sector(&d, 0), vec![2; 512]);
        d.flush().unwrap();
        assert_eq!(d.pending_writes(), 0);
        assert_eq!(d.inner().inner().snapshot(), vec![2; 512]);
    }
}
