//! [`FileDevice`]: a block device over a file, with positional (and vectored) I/O only.
//!
//! Invariants:
//! - There is no file cursor in use: every transfer is `preadv`/`pwritev` at an explicit offset, so any number of
//!   threads can share the device.
//! - `len` holds the file's byte length as this device last made or saw it; `info()` derives the size in sectors
//!   from it (rounded up, since qemu leaves images whose length is not a sector multiple) without a syscall. Bytes
//!   between the end of the file and the end of the last sector read as zeros.
//! - With `O_DIRECT`, every transfer the kernel sees has its offset, length and memory address aligned to
//!   [`DIRECT_ALIGN`]; requests that are not go through an aligned bounce buffer. A bounced write is a
//!   read-modify-write of whole blocks, so it holds `rmw` exclusively while ordinary writes, discards and resizes
//!   hold it shared: no other change can land between its read and its write.
//! - Once disconnected, a device stays disconnected.

use std::alloc::{self, Layout};
use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, IoSliceMut};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::file_lock::{self, Locking};
use super::{check_request, BlockDevice, Info, SECTOR_SIZE};
use crate::error::{Error, Result};

/// The alignment `O_DIRECT` transfers are given: a page, which satisfies every common logical block size.
const DIRECT_ALIGN: u64 = 4096;

/// The most a bounced `O_DIRECT` transfer moves per system call, so a huge request does not allocate a huge bounce
/// buffer.
const BOUNCE_MAX: u64 = 1 << 20;

/// The most buffers handed to one `preadv`/`pwritev`; Linux refuses more than `IOV_MAX` (1024).
const MAX_IOVECS: usize = 1024;

/// How a [`FileDevice`] opens its file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FileOptions {
    /// Open read-only: writes, resizes and discards answer `ReadOnly`.
    pub read_only: bool,
    /// Open with `O_DIRECT`, bypassing the page cache. Not every filesystem supports it.
    pub direct: bool,
    /// The locks taken on the file against other users; QEMU's by default.
    pub locking: Locking,
}

/// A block device stored in a file.
#[derive(Debug)]
pub struct FileDevice {
    file: File,
    read_write: bool,
    direct: bool,
    len: AtomicU64,
    disconnected: AtomicBool,
    punch_holes: AtomicBool,
    /// Whether the filesystem can zero a range without writing it; false once it said it cannot.
    zero_ranges: AtomicBool,
    rmw: RwLock<()>,
}

impl FileDevice {
    /// Opens an existing file.
    ///
    /// # Errors
    /// `Io` when the file cannot be opened or its length read; with `opts.direct`, an `Io` error of kind
    /// [`io::ErrorKind::Unsupported`] when the filesystem refuses `O_DIRECT`.
    pub fn open(path: impl AsRef<Path>, opts: &FileOptions) -> Result<Self> {
        let path = path.as_ref();
        let mut oo = OpenOptions::new();
        oo.read(true).write(!opts.read_only);
        Self::open_with(path, &mut oo, opts)
    }

    /// Creates a file, or truncates an existing one, to length 0, and opens it read-write.
    ///
    /// # Errors
    /// `InvalidArgument` when `opts.read_only` is set (an empty read-only device is of no use); otherwise as
    /// [`open`](Self::open).
    pub fn create(path: impl AsRef<Path>, opts: &FileOptions) -> Result<Self> {
        if opts.read_only {
            return Err(Error::invalid("create", "a created file cannot be read-only"));
        }
        let path = path.as_ref();
        let mut oo = OpenOptions::new();
        // Truncated only once locked: a file another process holds must not lose its contents to the refusal.
        oo.read(true).write(true).create(true);
        let dev = Self::open_with(path, &mut oo, opts)?;
        dev.file.set_len(0).map_err(|e| Error::io("create", 0, e))?;
        dev.len.store(0, Ordering::Release);
        Ok(dev)
    }

    fn open_with(path: &Path, oo: &mut OpenOptions, opts: &FileOptions) -> Result<Self> {
        if opts.direct {
            oo.custom_flags(libc::O_DIRECT);
        }
        let file = oo.open(path).map_err(|e| {
            if opts.direct && e.raw_os_error() == Some(libc::EINVAL) {
                Error::io(
                    "open",
                    0,
                    io::Error::new(
                        io::ErrorKind::Unsupported,
                        format!("O_DIRECT is not supported by the filesystem holding {}: {e}", path.display()),
                    ),
                )
            } else {
                Error::io("open", 0, e)
            }
        })?;
        file_lock::lock(&file, path, !opts.read_only, opts.locking)?;
        Self::new(file, !opts.read_only, opts.direct)
    }

    /// Wraps an open file. Whether it was opened with `O_DIRECT` is asked of the file itself.
    ///
    /// # Errors
    /// `Io` when the file's length or flags cannot be read.
    pub fn from_file(file: File, read_write: bool) -> Result<Self> {
        // SAFETY: F_GETFL only reads the descriptor's status flags; the descriptor is open for as long as `file`.
        let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
        if flags < 0 {
            return Err(Error::io("open", 0, io::Error::last_os_error()));
        }
        Self::new(file, read_write, flags & libc::O_DIRECT != 0)
    }

    fn new(file: File, read_write: bool, direct: bool) -> Result<Self> {
        let len = file.metadata().map_err(|e| Error::io("open", 0, e))?.len();
        Ok(FileDevice {
            file,
            read_write,
            direct,
            len: AtomicU64::new(len),
            disconnected: AtomicBool::new(false),
            punch_holes: AtomicBool::new(true),
            zero_ranges: AtomicBool::new(true),
            rmw: RwLock::new(()),
        })
    }

    /// The underlying file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The file's exact length in bytes (not rounded to sectors), as this device last made or saw it.
    pub fn len_bytes(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }

    /// Whether discard punches holes. True until a discard finds that the filesystem cannot, after which discards
    /// write zeros instead.
    pub fn punches_holes(&self) -> bool {
        self.punch_holes.load(Ordering::Relaxed)
    }

    /// Whether the file was opened with `O_DIRECT`.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    fn check_connected(&self) -> Result<()> {
        if self.disconnected.load(Ordering::Acquire) {
            Err(Error::Disconnected)
        } else {
            Ok(())
        }
    }

    fn check_writable(&self, op: &'static str) -> Result<()> {
        self.check_connected()?;
        if self.read_write {
            Ok(())
        } else {
            Err(Error::ReadOnly { op })
        }
    }

    // The lock guards no data, only the exclusion described in the module doc, so poisoning means nothing.
    fn shared(&self) -> RwLockReadGuard<'_, ()> {
        self.rmw.read().unwrap_or_else(|e| e.into_inner())
    }

    fn exclusive(&self) -> RwLockWriteGuard<'_, ()> {
        self.rmw.write().unwrap_or_else(|e| e.into_inner())
    }

    fn is_aligned(offset: u64, mut lens_and_addrs: impl Iterator<Item = (usize, usize)>) -> bool {
        // DIRECT_ALIGN is a power of two, so the low bits tell alignment.
        let mask = DIRECT_ALIGN - 1;
        // Empty buffers take no part in the transfer, and their address may be anything.
        offset & mask == 0 && lens_and_addrs.all(|(len, addr)| len == 0 || (len as u64 | addr as u64) & mask == 0)
    }

    fn file_len_now(&self, op: &'static str, offset: u64) -> Result<u64> {
        Ok(self.file.metadata().map_err(|e| Error::io(op, offset, e))?.len())
    }

    /// Fills `bufs` from byte `offset`, zero-filling whatever lies past the end of the file.
    fn read_bytes(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
        if !self.direct || Self::is_aligned(offset, bufs.iter().map(|b| (b.len(), b.as_ptr() as usize))) {
            return self.preadv_all(offset, bufs);
        }
        let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        let end = offset.saturating_add(total);
        let mut bounce = AlignedBuf::new(bounce_len(offset, end))?;
        let mut pos = offset;
        while pos < end {
            let (ws, we) = window(pos, end);
            let hi = end.min(we);
            let win = bounce.slice_mut(to_usize(we - ws))?;
            self.preadv_all(ws, &mut [IoSliceMut::new(win)])?;
            let src = win.get(to_usize(pos - ws)..to_usize(hi - ws)).ok_or_else(|| internal("read", pos))?;
            scatter(bufs, to_usize(pos - offset), src);
            pos = hi;
        }
        Ok(())
    }

    /// Writes `bufs` at byte `offset`, extending the file if they run past its end.
    fn write_bytes(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
        let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        let end = offset.saturating_add(total);
        if !self.direct {
            self.pwritev_all(offset, bufs)?;
            self.len.fetch_max(end, Ordering::AcqRel);
            return Ok(());
        }
        if Self::is_aligned(offset, bufs.iter().map(|b| (b.len(), b.as_ptr() as usize))) {
            let _shared = self.shared();
            self.pwritev_all(offset, bufs)?;
            self.len.fetch_max(end, Ordering::AcqRel);
            return Ok(());
        }

        let _exclusive = self.exclusive();
        let before = self.file_len_now("write", offset)?;
        let mut bounce = AlignedBuf::new(bounce_len(offset, end))?;
        let mut pos = offset;
        let mut written_end = offset;
        let result = (|| -> Result<()> {
            while pos < end {
                let (ws, we) = window(pos, end);
                let hi = end.min(we);
                let win = bounce.slice_mut(to_usize(we - ws))?;
                let block = to_usize(DIRECT_ALIGN);
                if pos > ws {
                    let head = win.get_mut(..block).ok_or_else(|| internal("write", ws))?;
                    self.preadv_all(ws, &mut [IoSliceMut::new(head)])?;
                }
                if hi < we {
                    let at = win.len().saturating_sub(block);
                    let tail = win.get_mut(at..).ok_or_else(|| internal("write", we))?;
                    self.preadv_all(we - DIRECT_ALIGN, &mut [IoSliceMut::new(tail)])?;
                }
                let dst = win.get_mut(to_usize(pos - ws)..to_usize(hi - ws)).ok_or_else(|| internal("write", pos))?;
                gather(bufs, to_usize(pos - offset), dst);
                self.pwritev_all(ws, &[IoSlice::new(win)])?;
                written_end = we;
                pos = hi;
            }
            Ok(())
        })();
        // Whole-block writes may have carried zeros past the request's end and the file's old end; cut them off
        // so the file is exactly as long as buffered I/O would have left it.
        let keep = before.max(end);
        if written_end > keep {
            self.file.set_len(keep).map_err(|e| Error::io("write", keep, e))?;
        }
        result?;
        self.len.fetch_max(end, Ordering::AcqRel);
        Ok(())
    }

    /// `preadv` until `bufs` are full, zero-filling past the end of the file.
    fn preadv_all(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
        let lens: Vec<usize> = bufs.iter().map(|b| b.len()).collect();
        let mut at = Cursor::default();
        let mut pos = offset;
        loop {
            let mut iov: Vec<libc::iovec> = Vec::new();
            for (i, buf) in bufs.iter_mut().enumerate().skip(at.idx) {
                let part = if i == at.idx { buf.get_mut(at.skip..).unwrap_or_default() } else { &mut **buf };
                if part.is_empty() {
                    continue;
                }
                iov.push(libc::iovec { iov_base: part.as_mut_ptr().cast(), iov_len: part.len() });
                if iov.len() == MAX_IOVECS {
                    break;
                }
            }
            if iov.is_empty() {
                return Ok(());
            }
            let want: usize = iov.iter().map(|v| v.iov_len).sum();
            let off = to_off_t("read", pos)?;
            // SAFETY: every iovec points into a distinct live `&mut [u8]` from `bufs`, which stays mutably borrowed
            // and unmoved for the whole call; `iov.len()` is at most MAX_IOVECS, so it fits a c_int.
            let n = unsafe { libc::preadv(self.file.as_raw_fd(), iov.as_ptr(), iov.len() as libc::c_int, off) };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::io("read", pos, err));
            }
            let n = n.unsigned_abs();
            if n == 0 {
                zero_from(bufs, at);
                return Ok(());
            }
            at.advance(&lens, n);
            pos = pos.saturating_add(n as u64);
            // O_DIRECT cannot continue from an unaligned offset, and a short direct read means end of file.
            if self.direct && n < want && pos >= self.file_len_now("read", pos)? {
                zero_from(bufs, at);
                return Ok(());
            }
        }
    }

    /// `pwritev` until all of `bufs` is written.
    fn pwritev_all(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
        let lens: Vec<usize> = bufs.iter().map(|b| b.len()).collect();
        let mut at = Cursor::default();
        let mut pos = offset;
        loop {
            let mut iov: Vec<libc::iovec> = Vec::new();
            for (i, buf) in bufs.iter().enumerate().skip(at.idx) {
                let part = if i == at.idx { buf.get(at.skip..).unwrap_or_default() } else { &**buf };
                if part.is_empty() {
                    continue;
                }
                iov.push(libc::iovec {
                    // pwritev only reads through the pointer; iovec is shared with preadv, hence `*mut`.
                    iov_base: part.as_ptr().cast_mut().cast(),
                    iov_len: part.len(),
                });
                if iov.len() == MAX_IOVECS {
                    break;
                }
            }
            if iov.is_empty() {
                return Ok(());
            }
            let off = to_off_t("write", pos)?;
            // SAFETY: every iovec points into a live `&[u8]` from `bufs`, borrowed for the whole call, and pwritev
            // does not write through them; `iov.len()` is at most MAX_IOVECS, so it fits a c_int.
            let n = unsafe { libc::pwritev(self.file.as_raw_fd(), iov.as_ptr(), iov.len() as libc::c_int, off) };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::io("write", pos, err));
            }
            let n = n.unsigned_abs();
            if n == 0 {
                return Err(Error::io("write", pos, io::Error::from(io::ErrorKind::WriteZero)));
            }
            at.advance(&lens, n);
            pos = pos.saturating_add(n as u64);
        }
    }

    /// `fallocate` with `mode` over `len` bytes at `offset`; `Ok(false)` when the filesystem cannot do that.
    fn fallocate(&self, op: &'static str, mode: libc::c_int, offset: u64, len: u64) -> Result<bool> {
        let off = to_off_t(op, offset)?;
        let n = to_off_t(op, len)?;
        loop {
            // SAFETY: fallocate only acts on the open descriptor; no memory is passed.
            let r = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, n) };
            if r == 0 {
                return Ok(true);
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => return Ok(false),
                _ => return Err(Error::io(op, offset, err)),
            }
        }
    }

    /// Tries to punch a hole; `Ok(false)` when the filesystem cannot.
    fn punch(&self, offset: u64, len: u64) -> Result<bool> {
        self.fallocate("discard", libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, len)
    }

    /// Tries `fallocate(FALLOC_FL_ZERO_RANGE)`, which also grows the file when the range ends past it; `Ok(false)`
    /// when the filesystem cannot.
    fn fallocate_zero(&self, offset: u64, len: u64) -> Result<bool> {
        self.fallocate("zero range", libc::FALLOC_FL_ZERO_RANGE, offset, len)
    }

    /// Writes zeros over `[offset, end)`, for filesystems that cannot punch holes.
    fn write_zeros(&self, offset: u64, end: u64) -> Result<()> {
        let chunk = vec![0u8; to_usize(BOUNCE_MAX.min(end.saturating_sub(offset)))];
        let mut pos = offset;
        while pos < end {
            let n = (end - pos).min(chunk.len() as u64);
            let part = chunk.get(..to_usize(n)).ok_or_else(|| internal("discard", pos))?;
            self.write_bytes(pos, &[IoSlice::new(part)])?;
            pos += n;
        }
        Ok(())
    }
}

impl BlockDevice for FileDevice {
    fn info(&self) -> Info {
        Info {
            sector_size: SECTOR_SIZE,
            size_sectors: self.len_bytes().div_ceil(SECTOR_SIZE),
            read_write: self.read_write,
        }
    }

    fn read(&self, sector: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
        self.check_connected()?;
        check_request(&self.info(), "read", sector, bufs.iter().map(|b| b.len()))?;
        self.read_bytes(sector.saturating_mul(SECTOR_SIZE), bufs)
    }

    fn write(&self, sector: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
        self.check_writable("write")?;
        check_request(&self.info(), "write", sector, bufs.iter().map(|b| b.len()))?;
        self.write_bytes(sector.saturating_mul(SECTOR_SIZE), bufs)
    }

    fn flush(&self) -> Result<()> {
        self.check_connected()?;
        if !self.read_write {
            return Ok(());
        }
        self.file.sync_data().map_err(|e| Error::io("flush", 0, e))
    }

    fn resize(&self, sectors: u64) -> Result<()> {
        self.check_writable("resize")?;
        let bytes = sectors
            .checked_mul(SECTOR_SIZE)
            .filter(|b| i64::try_from(*b).is_ok())
            .ok_or_else(|| Error::invalid("resize", format!("{sectors} sectors is too large for a file")))?;
        // Growing only adds zeros past the end, which no read-modify-write in flight can be relying on: writes
        // carry on meanwhile. Shrinking waits for them, and holds new ones off.
        let (_shared, _exclusive);
        if bytes >= self.len_bytes() {
            _shared = self.shared();
        } else {
            _exclusive = self.exclusive();
        }
        self.file.set_len(bytes).map_err(|e| Error::io("resize", bytes, e))?;
        self.len.store(bytes, Ordering::Release);
        Ok(())
    }

    fn zero_range(&self, sector: u64, count: u64) -> Result<bool> {
        self.check_writable("zero range")?;
        if count == 0 || !self.zero_ranges.load(Ordering::Relaxed) {
            return Ok(count == 0);
        }
        let offset = sector
            .checked_mul(SECTOR_SIZE)
            .ok_or_else(|| Error::invalid("zero range", format!("sector {sector} is too large for a file")))?;
        let len = count
            .checked_mul(SECTOR_SIZE)
            .filter(|l| offset.checked_add(*l).is_some_and(|end| i64::try_from(end).is_ok()))
            .ok_or_else(|| Error::invalid("zero range", format!("{count} sectors from {sector} are too many")))?;
        // Shared, as ordinary writes: a bounced read-modify-write must not straddle the change.
        let _shared = self.shared();
        if !self.fallocate_zero(offset, len)? {
            self.zero_ranges.store(false, Ordering::Relaxed);
            return Ok(false);
        }
        self.len.fetch_max(offset + len, Ordering::AcqRel);
        Ok(true)
    }

    fn discard(&self, sector: u64, count: u64) -> Result<()> {
        self.check_writable("discard")?;
        let size = self.info().size_sectors;
        let end_sector = match sector.checked_add(count) {
            Some(end) if end <= size => end,
            _ => {
                return Err(Error::invalid(
                    "discard",
                    format!("sectors {sector}..+{count} run past the end of the device ({size} sectors)"),
                ))
            }
        };
        if count == 0 {
            return Ok(());
        }
        let offset = sector.saturating_mul(SECTOR_SIZE);
        let end = end_sector.saturating_mul(SECTOR_SIZE);
        if self.punches_holes() {
            let _shared = self.shared();
            if self.punch(offset, end - offset)? {
                return Ok(());
            }
            self.punch_holes.store(false, Ordering::Relaxed);
        }
        // Past the end of the file already reads as zeros; writing there would only change the file's length.
        let end = end.min(self.len_bytes());
        self.write_zeros(offset, end)
    }

    fn disconnect(&self) {
        self.disconnected.store(true, Ordering::Release);
    }
}

/// A position inside a list of buffers: buffer `idx`, `skip` bytes in.
#[derive(Debug, Default, Clone, Copy)]
struct Cursor {
    idx: usize,
    skip: usize,
}

impl Cursor {
    fn advance(&mut self, lens: &[usize], mut n: usize) {
        while n > 0 {
            let Some(&len) = lens.get(self.idx) else { return };
            let left = len.saturating_sub(self.skip);
            if n < left {
                self.skip += n;
                return;
            }
            n -= left;
            self.idx += 1;
            self.skip = 0;
        }
        // Land past empty buffers too, so a cursor at the end of the data is at the end of the list.
        while lens.get(self.idx).is_some_and(|&len| self.skip >= len) {
            self.idx += 1;
            self.skip = 0;
        }
    }
}

fn zero_from(bufs: &mut [IoSliceMut<'_>], at: Cursor) {
    for (i, buf) in bufs.iter_mut().enumerate().skip(at.idx) {
        let start = if i == at.idx { at.skip } else { 0 };
        if let Some(rest) = buf.get_mut(start..) {
            rest.fill(0);
        }
    }
}

/// Copies `src` into the concatenation of `bufs`, starting `pos` bytes in.
fn scatter(bufs: &mut [IoSliceMut<'_>], mut pos: usize, mut src: &[u8]) {
    for buf in bufs.iter_mut() {
        if src.is_empty() {
            return;
        }
        if pos >= buf.len() {
            pos -= buf.len();
            continue;
        }
        let dst = buf.get_mut(pos..).unwrap_or_default();
        let n = dst.len().min(src.len());
        let (now, later) = src.split_at(n);
        if let Some(d) = dst.get_mut(..n) {
            d.copy_from_slice(now);
        }
        src = later;
        pos = 0;
    }
}

/// Copies from the concatenation of `bufs`, starting `pos` bytes in, until `dst` is full.
fn gather(bufs: &[IoSlice<'_>], mut pos: usize, mut dst: &mut [u8]) {
    for buf in bufs {
        if dst.is_empty() {
            return;
        }
        if pos >= buf.len() {
            pos -= buf.len();
            continue;
        }
        let src = buf.get(pos..).unwrap_or_default();
        let n = src.len().min(dst.len());
        let (now, later) = std::mem::take(&mut dst).split_at_mut(n);
        if let Some(s) = src.get(..n) {
            now.copy_from_slice(s);
        }
        dst = later;
        pos = 0;
    }
}

/// The aligned window a bounced transfer covers next: from `pos` rounded down, at most [`BOUNCE_MAX`] long, ending
/// at `end` rounded up if that comes first.
fn window(pos: u64, end: u64) -> (u64, u64) {
    let ws = pos - pos % DIRECT_ALIGN;
    let we = end.div_ceil(DIRECT_ALIGN).saturating_mul(DIRECT_ALIGN).min(ws.saturating_add(BOUNCE_MAX));
    (ws, we)
}

/// The largest window [`window`] will hand out for a request `[offset, end)`.
fn bounce_len(offset: u64, end: u64) -> usize {
    let (ws, we) = window(offset, end);
    to_usize(we - ws)
}

/// Lengths here are bounded by [`BOUNCE_MAX`] or by buffers already in memory, so they fit.
fn to_usize(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

fn to_off_t(op: &'static str, offset: u64) -> Result<libc::off_t> {
    libc::off_t::try_from(offset).map_err(|_| {
        Error::invalid(op, format!("byte offset {offset:#x} does not fit the operating system's file offsets"))
    })
}

fn internal(op: &'static str, offset: u64) -> Error {
    Error::io(op, offset, io::Error::other("bounce buffer bookkeeping went out of range"))
}

/// A zeroed heap buffer aligned to [`DIRECT_ALIGN`], for `O_DIRECT` transfers; freed on drop.
struct AlignedBuf {
    ptr: NonNull<u8>,
    layout: Layout,
}

impl AlignedBuf {
    fn new(len: usize) -> Result<Self> {
        let layout = Layout::from_size_align(len.max(1), to_usize(DIRECT_ALIGN))
            .map_err(|e| Error::io("allocate", 0, io::Error::new(io::ErrorKind::OutOfMemory, e.to_string())))?;
        // SAFETY: the layout's size is at least 1.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).ok_or_else(|| {
            Error::io("allocate", 0, io::Error::new(io::ErrorKind::OutOfMemory, "bounce buffer allocation failed"))
        })?;
        Ok(AlignedBuf { ptr, layout })
    }

    /// The first `len` bytes.
    fn slice_mut(&mut self, len: usize) -> Result<&mut [u8]> {
        if len > self.layout.size() {
            return Err(internal("allocate", len as u64));
        }
        // SAFETY: the allocation is `layout.size()` >= `len` initialised (zeroed) bytes, owned by `self`, and the
        // `&mut self` borrow keeps the slice unique.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), len) })
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `alloc_zeroed` with exactly this layout and is freed only here.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use std::io::Write as _;
    use std::io::{IoSlice, IoSliceMut};
    use std::os::unix::fs::FileExt;

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    #[test]
    fn create_write_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        let d = FileDevice::create(&path, &FileOptions::default()).unwrap();
        assert_eq!(d.info().size_sectors, 0);
        assert!(d.info().read_write);
        d.resize(16).unwrap();
        assert_eq!(d.info().size_sectors, 16);
        assert_eq!(d.len_bytes(), 16 * 512);
        let data = pattern(2048, 1);
        d.write(3, &[IoSlice::new(&data)]).unwrap();
        let mut back = vec![0u8; 2048];
        d.read(3, &mut [IoSliceMut::new(&mut back)]).unwrap();
        assert_eq!(back, data);
        d.flush().unwrap();
        let mut raw = vec![0u8; 2048];
        d.file().read_exact_at(&mut raw, 3 * 512).unwrap();
        assert_eq!(raw, data);
        // create truncates.
        drop(d);
        let d = FileDevice::create(&path, &FileOptions::default()).unwrap();
        assert_eq!(d.len_bytes(), 0);
    }

    #[test]
    fn vectored_read_and_write() {
        let dir = tempfile::tempdir().unwrap();
        let d = FileDevice::create(dir.path().join("disk"), &FileOptions::default()).unwrap();
        d.resize(32).unwrap();
        let a = pattern(512, 1);
        let b = pattern(3 * 512, 2);
        let c = pattern(1024, 3);
        d.write(4, &[IoSlice::new(&a), IoSlice::new(&[]), IoSlice::new(&b), IoSlice::new(&c)]).unwrap();
        let mut x = vec![0u8; 1024];
        let mut y = vec![0u8; 2048];
        let mut z = vec![0u8; 1536];
        d.read(
            3,
            &mut [IoSliceMut::new(&mut x), IoSliceMut::new(&mut []), IoSliceMut::new(&mut y), IoSliceMut::new(&mut z)],
        )
        .unwrap();
        let mut got = Vec::new();
        got.extend_from_slice(&x);
        got.extend_from_slice(&y);
        got.extend_from_slice(&z);
        let mut want = vec![0u8; 512];
        want.extend_from_slice(&a);
        want.extend_from_slice(&b);
        want.extend_from_slice(&c);
        want.extend_from_slice(&[0; 1024]);
        assert!(got == want, "vectored read does not match what was written");
    }

    #[test]
    fn many_buffers_exceeding_iov_max() {
        let dir = tempfile::tempdir().unwrap();
        let d = FileDevice::create(dir.path().join("disk"), &FileOptions::default()).unwrap();
        d.resize(2100).unwrap();
        let blocks: Vec<Vec<u8>> = (0..2100).map(|i| vec![(i % 251) as u8; 512]).collect();
        let refs: Vec<IoSlice<'_>> = blocks.iter().map(|b| IoSlice::new(b)).collect();
        d.write(0, &refs).unwrap();
        let mut back: Vec<Vec<u8>> = (0..2100).map(|_| vec![0xffu8; 512]).collect();
        let mut refs: Vec<IoSliceMut<'_>> = back.iter_mut().map(|b| IoSliceMut::new(b)).collect();
        d.read(0, &mut refs).unwrap();
        assert_eq!(back, blocks);
    }

    #[test]
    fn partial_final_sector_reads_zero_filled() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("odd");
        let data = pattern(1000, 7);
        std::fs::File::create(&path).unwrap().write_all(&data).unwrap();
        let d = FileDevice::open(&path, &FileOptions::default()).unwrap();
        assert_eq!(d.len_bytes(), 1000);
        assert_eq!(d.info().size_sectors, 2);
        let mut a = vec![0xffu8; 512];
        let mut b = vec![0xffu8; 512];
        d.read(0, &mut [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b)]).unwrap();
        assert_eq!(&a[..], &data[..512]);
        assert_eq!(&b[..488], &data[512..]);
        assert_eq!(&b[488..], &[0; 24][..]);
        let mut last = vec![0xffu8; 512];
        d.read(1, &mut [IoSliceMut::new(&mut last)]).unwrap();
        assert_eq!(last, b);
        let mut too_far = vec![0u8; 512];
        assert_eq!(d.read(2, &mut [IoSliceMut::new(&mut too_far)]).unwrap_err().kind(), ErrorKind::InvalidArgument);
        // Writing the last sector makes the length a sector multiple and the size does not change.
        d.write(1, &[IoSlice::new(&[5; 512])]).unwrap();
        assert_eq!(d.len_bytes(), 1024);
        assert_eq!(d.info().size_sectors, 2);
    }

    #[test]
    fn resize_grows_and_shrinks() {
        let dir = tempfile::tempdir().unwrap();
        let d = FileDevice::create(dir.path().join("disk"), &FileOptions::default()).unwrap();
        d.resize(4).unwrap();
        d.write(0, &[IoSlice::new(&[9; 2048])]).unwrap();
        d.resize(2).unwrap();
        assert_eq!(d.info().size_sectors, 2);
        assert_eq!(d.file().metadata().unwrap().len(), 1024);
        let mut buf = vec![0u8; 1536];
        assert_eq!(d.read(0, &mut [IoSliceMut::new(&mut buf)]).unwrap_err().kind(), ErrorKind::InvalidArgument);
        d.resize(3).unwrap();
        d.read(0, &mut [IoSliceMut::new(&mut buf)]).unwrap();
        assert_eq!(&buf[..1024], &[9; 1024][..]);
        assert_eq!(&buf[1024..], &[0; 512][..]);
        assert_eq!(d.resize(u64::MAX).unwrap_err().kind(), ErrorKind::InvalidArgument);
    }

    #[test]
    fn discard_reads_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let d = FileDevice::create(dir.path().join("disk"), &FileOptions::default()).unwrap();
        d.resize(64).unwrap();
        d.write(0, &[IoSlice::new(&vec![0xaa; 64 * 512])]).unwrap();
        d.discard(8, 24).unwrap();
        d.discard(63, 1).unwrap();
        d.discard(0, 0).unwrap();
        assert_eq!(d.len_bytes(), 64 * 512);
        assert_eq!(d.file().metadata().unwrap().len(), 64 * 512);
        let mut buf = vec![0u8; 64 * 512];
        d.read(0, &mut [IoSliceMut::new(&mut buf)]).unwrap();
        assert_eq!(&buf[..8 * 512], &vec![0xaa; 8 * 512][..]);
        assert_eq!(&buf[8 * 512..32 * 512], &vec![0; 24 * 512][..]);
        assert_eq!(&buf[32 * 512..63 * 512], &vec![0xaa; 31 * 512][..]);
        assert_eq!(&buf[63 * 512..], &[0; 512][..]);
        assert_eq!(d.discard(60, 5).unwrap_err().kind(), ErrorKind::InvalidArgument);
        println!("punches holes: {}", d.punches_holes());
    }

    #[test]
    fn zero_range_zeroes_in_place_and_grows_past_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let d = FileDevice::create(dir.path().join("disk"), &FileOptions::default()).unwrap();
        d.resize(16).unwrap();
        d.write(0, &[IoSlice::new(&vec![0xaa; 16 * 512])]).unwrap();
        if !d.zero_range(4, 4).unwrap() {
            // A filesystem without FALLOC_FL_ZERO_RANGE: nothing changed, and the device stops asking.
            assert!(!d.zero_range(0, 1).unwrap());
            let mut buf = vec![0u8; 16 * 512];
            d.read(0, &mut [IoSliceMut::new(&mut buf)]).unwrap();
            assert!(buf.iter().all(|&b| b == 0xaa));
            return;
        }
        // The range straddling the end grows the file to its end, as a write there would.
        assert!(d.zero_range(14, 6).unwrap());
        assert_eq!(d.len_bytes(), 20 * 512);
        assert_eq!(d.file().metadata().unwrap().len(), 20 * 512);
        let mut buf = vec![0u8; 20 * 512];
        d.read(0, &mut [IoSliceMut::new(&mut buf)]).unwrap();
        assert!(buf[..4 * 512].iter().all(|&b| b == 0xaa));
        assert!(buf[4 * 512..8 * 512].iter().all(|&b| b == 0));
        assert!(buf[8 * 512..14 * 512].iter().all(|&b| b == 0xaa));
        assert!(buf[14 * 512..].iter().all(|&b| b == 0));
        assert!(d.zero_range(3, 0).unwrap(), "an empty range is done");
        // A second open of the same file in this process: without locks, or the first open's would refuse it.
        let ro = FileDevice::open(
            dir.path().join("disk"),
            &FileOptions { read_only: true, locking: Locking::Off, ..FileOptions::default() },
        )
        .unwrap();
        assert_eq!(ro.zero_range(0, 1).unwrap_err().kind(), ErrorKind::ReadOnly);
    }

    #[test]
    fn zero_writing_fallback_keeps_the_length() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("odd");
        std::fs::write(&path, vec![0x11; 1000]).unwrap();
        let d = FileDevice::open(&path, &FileOptions::default()).unwrap();
        d.punch_holes.store(false, Ordering::Relaxed);
        d.discard(1, 1).unwrap();
        assert_eq!(d.len_bytes(), 1000);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1000);
        let mut buf = vec![0xffu8; 1024];
        d.read(0, &mut [IoSliceMut::new(&mut buf)]).unwrap();
        assert_eq!(&buf[..512], &[0x11; 512][..]);
        assert_eq!(&buf[512..], &[0; 512][..]);
    }

    #[test]
    fn read_only_refuses_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        std::fs::write(&path, vec![3u8; 2048]).unwrap();
        let opts = FileOptions { read_only: true, direct: false, ..FileOptions::default() };
        let d = FileDevice::open(&path, &opts).unwrap();
        assert!(!d.info().read_write);
        assert_eq!(d.write(0, &[IoSlice::new(&[0; 512])]).unwrap_err().kind(), ErrorKind::ReadOnly);
        assert_eq!(d.resize(1).unwrap_err().kind(), ErrorKind::ReadOnly);
        assert_eq!(d.discard(0, 1).unwrap_err().kind(), ErrorKind::ReadOnly);
        d.flush().unwrap();
        let mut buf = vec![0u8; 512];
        d.read(3, &mut [IoSliceMut::new(&mut buf)]).unwrap();
        assert_eq!(buf, vec![3; 512]);
        assert_eq!(std::fs::read(&path).unwrap(), vec![3u8; 2048]);
        assert_eq!(FileDevice::create(&path, &opts).unwrap_err().kind(), ErrorKind::InvalidArgument);
    }

    #[test]
    fn from_file_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        std::fs::write(&path, vec![4u8; 1536]).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let d = FileDevice::from_file(file, false).unwrap();
        assert_eq!(d.info().size_sectors, 3);
        assert!(!d.is_direct());
        let err = FileDevice::open(dir.path().join("missing"), &FileOptions::default()).unwrap_err();
        match err {
            Error::Io { op, offset, source } => {
                assert_eq!(op, "open");
                assert_eq!(offset, 0);
                assert_eq!(source.kind(), io::ErrorKind::NotFound);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn io_errors_carry_the_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        // Opened write-only behind the device's back, so reads fail with EBADF.
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let d = FileDevice::from_file(file, true).unwrap();
        let mut buf = vec![0u8; 512];
        match d.read(3, &mut [IoSliceMut::new(&mut buf)]).unwrap_err() {
            Error::Io { op, offset, .. } => {
                assert_eq!(op, "read");
                assert_eq!(offset, 3 * 512);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn disconnect_fails_everything() {
        let dir = tempfile::tempdir().unwrap();
        let d = FileDevice::create(dir.path().join("disk"), &FileOptions::default()).unwrap();
        d.resize(2).unwrap();
        d.disconnect();
        let mut buf = vec![0u8; 512];
        assert!(matches!(d.read(0, &mut [IoSliceMut::new(&mut buf)]), Err(Error::Disconnected)));
        assert!(matches!(d.write(0, &[IoSlice::new(&buf)]), Err(Error::Disconnected)));
        assert!(matches!(d.flush(), Err(Error::Disconnected)));
        assert!(matches!(d.resize(4), Err(Error::Disconnected)));
        assert!(matches!(d.discard(0, 1), Err(Error::Disconnected)));
    }

    #[test]
    fn concurrent_writers() {
        let dir = tempfile::tempdir().unwrap();
        let d = std::sync::Arc::new(FileDevice::create(dir.path().join("disk"), &FileOptions::default()).unwrap());
        d.resize(64).unwrap();
        let threads: Vec<_> = (0..8u8)
            .map(|t| {
                let d = d.clone();
                std::thread::spawn(move || {
                    for i in 0..8u64 {
                        d.write(u64::from(t) * 8 + i, &[IoSlice::new(&[t + 1; 512])]).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let mut buf = vec![0u8; 64 * 512];
        d.read(0, &mut [IoSliceMut::new(&mut buf)]).unwrap();
        for (i, chunk) in buf.chunks(512).enumerate() {
            assert!(chunk.iter().all(|&b| b == (i / 8) as u8 + 1));
        }
    }

    #[test]
    fn cursor_and_copies() {
        let lens = [3usize, 0, 2, 0];
        let mut c = Cursor::default();
        c.advance(&lens, 2);
        assert_eq!((c.idx, c.skip), (0, 2));
        c.advance(&lens, 1);
        assert_eq!((c.idx, c.skip), (2, 0));
        c.advance(&lens, 2);
        assert_eq!(c.idx, 4);

        let mut a = [0u8; 3];
        let mut b = [0u8; 4];
        scatter(&mut [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b)], 2, &[1, 2, 3]);
        assert_eq!(a, [0, 0, 1]);
        assert_eq!(b, [2, 3, 0, 0]);
        let mut out = [0u8; 4];
        gather(&[IoSlice::new(&[1, 2]), IoSlice::new(&[]), IoSlice::new(&[3, 4, 5])], 1, &mut out);
        assert_eq!(out, [2, 3, 4, 5]);
    }

    /// O_DIRECT needs a real filesystem (tmpfs may refuse it), so this uses a directory under the working
    /// directory or /var/tmp.
    fn direct_dir() -> tempfile::TempDir {
        tempfile::tempdir_in(".").or_else(|_| tempfile::tempdir_in("/var/tmp")).unwrap()
    }

    fn open_direct(path: &Path, create: bool) -> Option<FileDevice> {
        let opts = FileOptions { read_only: false, direct: true, ..FileOptions::default() };
        let r = if create { FileDevice::create(path, &opts) } else { FileDevice::open(path, &opts) };
        match r {
            Ok(d) => Some(d),
            Err(Error::Io { source, .. }) if source.kind() == io::ErrorKind::Unsupported => {
                println!("note: skipping O_DIRECT assertions: {source}");
                None
            }
            Err(e) => panic!("unexpected error opening with O_DIRECT: {e:?}"),
        }
    }

    #[test]
    fn direct_io_aligned_and_bounced() {
        let dir = direct_dir();
        let path = dir.path().join("direct");
        let Some(d) = open_direct(&path, true) else { return };
        assert!(d.is_direct());
        d.resize(64).unwrap();

        // Aligned: a 4096-aligned buffer at a 4096-aligned offset goes straight through.
        let mut aligned = AlignedBuf::new(8192).unwrap();
        let pat = pattern(8192, 9);
        aligned.slice_mut(8192).unwrap().copy_from_slice(&pat);
        d.write(8, &[IoSlice::new(aligned.slice_mut(8192).unwrap())]).unwrap();
        let mut back = AlignedBuf::new(8192).unwrap();
        d.read(8, &mut [IoSliceMut::new(back.slice_mut(8192).unwrap())]).unwrap();
        assert_eq!(back.slice_mut(8192).unwrap(), &pat[..]);

        // Unaligned offset, lengths and addresses: bounced, read-modify-write keeps the neighbours.
        let small = pattern(512, 3);
        d.write(9, &[IoSlice::new(&small)]).unwrap();
        let odd = pattern(3 * 512, 4);
        d.write(1, &[IoSlice::new(&odd[..512]), IoSlice::new(&odd[512..])]).unwrap();
        let mut whole = vec![0u8; 64 * 512];
        let (first, rest) = whole.split_at_mut(512 * 3);
        d.read(0, &mut [IoSliceMut::new(first), IoSliceMut::new(rest)]).unwrap();
        let mut want = vec![0u8; 64 * 512];
        want[8 * 512..24 * 512].copy_from_slice(&pat);
        want[9 * 512..10 * 512].copy_from_slice(&small);
        want[512..4 * 512].copy_from_slice(&odd);
        assert_eq!(whole, want);
        d.flush().unwrap();

        // Via the page cache, the same bytes.
        assert_eq!(std::fs::read(&path).unwrap(), want);
        assert_eq!(d.len_bytes(), 64 * 512);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 64 * 512);

        // A bounced request larger than the bounce buffer.
        let big = pattern(3 << 20, 5);
        d.resize(8192).unwrap();
        d.write(1, &[IoSlice::new(&big)]).unwrap();
        let mut big_back = vec![0u8; 3 << 20];
        d.read(1, &mut [IoSliceMut::new(&mut big_back)]).unwrap();
        assert_eq!(big_back, big);
    }

    #[test]
    fn direct_io_concurrent_writes_to_one_block() {
        // Eight threads write the eight sectors of the same 4096-byte block through read-modify-write bounces;
        // none may undo another's write.
        let dir = direct_dir();
        let path = dir.path().join("rmw");
        let Some(d) = open_direct(&path, true) else { return };
        d.resize(8).unwrap();
        let d = std::sync::Arc::new(d);
        let threads: Vec<_> = (0..8u8)
            .map(|t| {
                let d = d.clone();
                std::thread::spawn(move || {
                    for round in 0..20u8 {
                        d.write(u64::from(t), &[IoSlice::new(&[t.wrapping_mul(20).wrapping_add(round); 512])]).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let mut buf = vec![0u8; 4096];
        d.read(0, &mut [IoSliceMut::new(&mut buf)]).unwrap();
        for (t, chunk) in buf.chunks(512).enumerate() {
            assert!(chunk.iter().all(|&b| b == (t as u8) * 20 + 19), "sector {t} lost its last write");
        }
    }

    #[test]
    fn direct_io_on_an_odd_length_file() {
        let dir = direct_dir();
        let path = dir.path().join("odd");
        let data = pattern(1000, 6);
        std::fs::write(&path, &data).unwrap();
        let Some(d) = open_direct(&path, false) else { return };
        let mut buf = vec![0xffu8; 1024];
        d.read(0, &mut [IoSliceMut::new(&mut buf)]).unwrap();
        assert_eq!(&buf[..1000], &data[..]);
        assert_eq!(&buf[1000..], &[0; 24][..]);
        // A bounced write must not leave the file longer than the written range.
        d.write(0, &[IoSlice::new(&[7; 512])]).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1000);
        assert_eq!(d.len_bytes(), 1000);
        d.write(1, &[IoSlice::new(&[8; 512])]).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1024);
        assert_eq!(d.len_bytes(), 1024);
        let mut want = vec![7u8; 512];
        want.extend_from_slice(&[8; 512]);
        d.read(0, &mut [IoSliceMut::new(&mut buf)]).unwrap();
        assert_eq!(buf, want);
        d.discard(0, 1).unwrap();
        d.read(0, &mut [IoSliceMut::new(&mut buf)]).unwrap();
        assert_eq!(&buf[..512], &[0; 512][..]);
        assert_eq!(&buf[512..], &[8; 512][..]);
    }

    #[test]
    fn direct_on_tmpfs_is_refused_clearly_or_works() {
        // Older tmpfs refuses O_DIRECT with EINVAL; newer kernels accept it. Either way the answer must be clear.
        let Ok(dir) = tempfile::tempdir_in("/dev/shm") else {
            println!("note: no /dev/shm, skipping");
            return;
        };
        let opts = FileOptions { read_only: false, direct: true, ..FileOptions::default() };
        match FileDevice::create(dir.path().join("d"), &opts) {
            Ok(d) => {
                d.resize(1).unwrap();
                d.write(0, &[IoSlice::new(&[1; 512])]).unwrap();
            }
            Err(Error::Io { op, source, .. }) => {
                assert_eq!(op, "open");
                assert_eq!(source.kind(), io::ErrorKind::Unsupported);
                assert!(source.to_string().contains("O_DIRECT is not supported"), "{source}");
            }
            Err(e) => panic!("unexpected {e:?}"),
        }
    }

    #[test]
    fn from_file_detects_direct() {
        let dir = direct_dir();
        let path = dir.path().join("d");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(&path);
        match file {
            Ok(f) => assert!(FileDevice::from_file(f, false).unwrap().is_direct()),
            Err(e) => println!("note: skipping O_DIRECT assertion: {e}"),
        }
    }
}
