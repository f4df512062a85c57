//! Noticing that a source file shrank during a copy.
//!
//! Sources are read with `pread` into the workers' own buffers, never mapped: a mapping of a file that another
//! process truncates kills the reader with `SIGBUS`, while a read merely comes up short. A file device reads
//! zeros past the end of its file, so a truncation under a copy would otherwise pass for holes; [`Watch`] turns
//! it into an error naming where the copy was.

use std::fs::File;
use std::io;

use crate::error::{Error, Result};

/// The length a source file had when the copy began, compared with its length after every read.
pub struct Watch<'a> {
    file: &'a File,
    len: u64,
}

impl<'a> Watch<'a> {
    /// Watches `file` (the source itself, or the file a qcow2 source lives in) from its current length on.
    ///
    /// # Errors
    /// `Io` when the file's length cannot be read.
    pub fn new(file: &'a File) -> Result<Self> {
        let len = file.metadata().map_err(|e| Error::io("read the source's length", 0, e))?.len();
        Ok(Watch { file, len })
    }

    /// The length the file had when watching began.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the file was empty when watching began.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Called after the read of the guest range at `offset`: an error if the file is now shorter than it was,
    /// since the read may then have returned zeros for bytes the file held when the copy began.
    ///
    /// # Errors
    /// `Io` (`UnexpectedEof`) naming both lengths, at `offset`.
    pub fn check(&self, offset: u64) -> Result<()> {
        let now = self.file.metadata().map_err(|e| Error::io("read the source's length", offset, e))?.len();
        if now < self.len {
            let why = format!("the source file shrank from {} to {now} bytes during the copy", self.len);
            return Err(Error::io("read the source", offset, io::Error::new(io::ErrorKind::UnexpectedEof, why)));
        }
        Ok(())
    }
}
