//! Reading a source without copying it: the source file mapped into memory, so that workers check and compress
//! the page cache's own bytes and the writer hands them straight to the destination. This saves one copy of
//! every byte, which is most of a copy's CPU time when data does not compress.
//!
//! A mapping fails with `SIGBUS` when the file is truncated under it; [`FileMap`] is meant for sources opened
//! read-only that nobody shrinks during the copy, as for any reader of a disk image in use.

use std::fs::File;
use std::os::unix::io::AsRawFd;

use crate::block::BlockDevice;
use crate::error::{Error, Result};
use crate::image::{ExtentKind, Image};

/// A whole file mapped read-only.
pub struct FileMap {
    ptr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is read-only and never changed through this type; sharing `&[u8]` views of it between
// threads is as safe as sharing any immutable slice.
unsafe impl Send for FileMap {}
// SAFETY: as above.
unsafe impl Sync for FileMap {}

impl FileMap {
    /// Maps all of `file` (its current length) read-only, advising the kernel that it is read in order.
    ///
    /// # Errors
    /// `Io` when the file cannot be mapped (some file systems and special files cannot be), or is empty.
    pub fn new(file: &File) -> Result<Self> {
        let len = file.metadata().map_err(|e| Error::io("map the source", 0, e))?.len();
        let len = usize::try_from(len).map_err(|_| Error::invalid("map the source", "file too large to map"))?;
        if len == 0 {
            return Err(Error::invalid("map the source", "empty file"));
        }
        // SAFETY: a fresh read-only shared mapping of a valid descriptor; the kernel picks the address. The result
        // is checked against MAP_FAILED before use.
        let ptr =
            unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, file.as_raw_fd(), 0) };
        if ptr == libc::MAP_FAILED {
            return Err(Error::io("map the source", 0, std::io::Error::last_os_error()));
        }
        // SAFETY: advice on the mapping just made; failure only loses read-ahead, so it is ignored.
        unsafe {
            libc::madvise(ptr, len, libc::MADV_SEQUENTIAL);
        }
        Ok(FileMap { ptr, len })
    }

    /// Drops the pages of `bytes` (a slice of this mapping) from the process's page tables once they have been
    /// used, so that the resident set stays about the size of the chunks in flight instead of growing to the
    /// whole file. The page cache keeps them; reading them again faults them back in.
    pub fn release(&self, bytes: &[u8]) {
        let base = self.ptr as usize;
        let start = bytes.as_ptr() as usize;
        if start < base || start.saturating_add(bytes.len()) > base + self.len {
            return;
        }
        // Whole pages inside the slice only: a page shared with a neighbour still in use stays.
        let page = 4096;
        let lo = start.next_multiple_of(page);
        let hi = (start + bytes.len()) / page * page;
        if lo < hi {
            // SAFETY: `lo..hi` lies inside this mapping (checked above); MADV_DONTNEED on a shared read-only file
            // mapping only unmaps pages, and later reads fault them back from the file. Failure is harmless.
            unsafe {
                libc::madvise(lo as *mut libc::c_void, hi - lo, libc::MADV_DONTNEED);
            }
        }
    }

    /// The file's bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` maps `len` readable bytes for as long as `self` lives (unmapped only in Drop), and nothing
        // writes through this mapping.
        unsafe { std::slice::from_raw_parts(self.ptr.cast::<u8>(), self.len) }
    }
}

impl Drop for FileMap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`; no slice of it outlives `self`.
        unsafe {
            libc::munmap(self.ptr, self.len);
        }
    }
}

/// Where a guest range of a source is, for reading it without a copy.
pub enum Span<'a> {
    /// The guest bytes at this guest offset, in place.
    Bytes(u64, &'a [u8]),
    /// This many bytes at this guest offset that read as zeros.
    Zeros(u64, u64),
}

/// A source whose bytes can be borrowed rather than read.
pub trait Direct: Sync {
    /// The spans covering `offset..offset + len`, in order, or `None` when some part cannot be borrowed (it must
    /// then be read the usual way).
    ///
    /// # Errors
    /// Whatever the source reports while mapping.
    fn spans(&self, offset: u64, len: u64) -> Result<Option<Vec<Span<'_>>>>;

    /// Says that `bytes`, from a span, have been stored and will not be looked at again.
    fn release(&self, bytes: &[u8]);
}

/// A raw file: guest offsets are file offsets.
impl Direct for FileMap {
    fn spans(&self, offset: u64, len: u64) -> Result<Option<Vec<Span<'_>>>> {
        let (Ok(lo), Ok(hi)) = (usize::try_from(offset), usize::try_from(offset.saturating_add(len))) else {
            return Ok(None);
        };
        // The last sector of a file whose length is not a sector multiple is read the usual way (zero padded).
        Ok(self.as_slice().get(lo..hi).map(|bytes| vec![Span::Bytes(offset, bytes)]))
    }

    fn release(&self, bytes: &[u8]) {
        FileMap::release(self, bytes)
    }
}

/// A qcow2 image and its file's mapping: normal data clusters are borrowed from the mapping at their host
/// offsets, zero and unallocated clusters read as zeros; a compressed cluster, a backing file or an external
/// data file mean the range is read the usual way.
pub struct ImageMap<'a, D: BlockDevice> {
    image: &'a Image<D>,
    file: &'a FileMap,
}

impl<'a, D: BlockDevice> ImageMap<'a, D> {
    /// Borrows data clusters of `image` from `file`, the mapping of the image's own file; `None` for an image
    /// whose data is (partly) elsewhere: one with a backing file or an external data file.
    pub fn new(image: &'a Image<D>, file: &'a FileMap) -> Option<Self> {
        (!image.has_backing() && !image.header().has_external_data_file()).then_some(ImageMap { image, file })
    }
}

impl<D: BlockDevice> Direct for ImageMap<'_, D> {
    fn spans(&self, offset: u64, len: u64) -> Result<Option<Vec<Span<'_>>>> {
        let file = self.file.as_slice();
        let mut spans = Vec::new();
        for extent in self.image.map(offset, len)? {
            match extent.kind {
                ExtentKind::Data { host } => {
                    let (Ok(lo), Ok(hi)) =
                        (usize::try_from(host.0), usize::try_from(host.0.saturating_add(extent.len)))
                    else {
                        return Ok(None);
                    };
                    match file.get(lo..hi) {
                        Some(bytes) => spans.push(Span::Bytes(extent.guest.0, bytes)),
                        // Past the end of the file (a cluster the file ends inside): read it the usual way.
                        None => return Ok(None),
                    }
                }
                ExtentKind::Zero | ExtentKind::Unallocated => spans.push(Span::Zeros(extent.guest.0, extent.len)),
                ExtentKind::Compressed { .. } => return Ok(None),
            }
        }
        Ok(Some(spans))
    }

    fn release(&self, bytes: &[u8]) {
        self.file.release(bytes)
    }
}
