//! Rewriting the backing file an image records: its name and its backing-format extension.
//!
//! The header write is the commit point. Everything before it (guest data a rebase copied in, and the tables
//! that map it) is written back and flushed first, so a crash before the header write leaves the image naming
//! its old backing file, with copies that read the same as what they copied, and a crash after it leaves the
//! new name recorded over data that is already durable. The header is written in one request from offset 0.

use super::backing::Backing;
use super::meta::Meta;
use super::{Image, Refusal};
use crate::block::BlockDevice;
use crate::error::{Error, Result};
use crate::format::{FormatError, Header};

/// Longest backing file name QEMU accepts in a header.
const MAX_BACKING_NAME: usize = 1023;

impl Meta {
    /// The header with its backing file set to `name` in `format` (or removed with `None`), checked to be one
    /// QEMU accepts and to fit in cluster 0.
    pub(super) fn header_with_backing(&self, name: Option<&str>, format: Option<&str>) -> Result<Header> {
        let mut header = self.header.clone();
        match name {
            Some("") => return Err(Error::invalid("change the backing file", "an empty backing file name")),
            Some(name) if name.len() > MAX_BACKING_NAME => {
                return Err(Refusal::BackingNameTooLong { len: name.len() }.into())
            }
            Some(_) if format.is_none_or(str::is_empty) => return Err(Refusal::BackingFormatRequired.into()),
            Some(name) => header.set_backing_file(Some(name.as_bytes()), format),
            None => header.set_backing_file(None, None),
        }
        match header.serialize() {
            Err(FormatError::HeaderDoesNotFit { needed, cluster_size }) => {
                Err(Refusal::HeaderFull { needed, cluster_size }.into())
            }
            Err(e) => Err(e.into()),
            Ok(_) => {
                header.layout()?;
                Ok(header)
            }
        }
    }

    /// Makes every change so far durable, then writes `header` as the image's header and makes it durable.
    pub(super) fn commit_header(&mut self, dev: &dyn BlockDevice, header: Header) -> Result<()> {
        self.writeback(dev)?;
        dev.flush()?;
        let old = std::mem::replace(&mut self.header, header);
        if let Err(e) = self.write_header(dev) {
            self.header = old;
            return Err(e);
        }
        dev.flush()
    }
}

impl<D: BlockDevice> Image<D> {
    /// Records `name` in `format` as the image's backing file (relative names are relative to the image's
    /// directory, as the caller resolved them), or with `None` records that it has none, and from now on reads
    /// what it does not hold from `backing` (zeros with `None`). Nothing is copied: this is an unsafe rebase, for
    /// a backing file that was renamed or moved, or whose contents the caller knows to be the same.
    ///
    /// Every change made before is durable first; the header write is the commit point.
    ///
    /// # Errors
    /// [`Refusal::BackingFormatRequired`] for a name without a format (formats are recorded, never probed),
    /// [`Refusal::BackingNameTooLong`], [`Refusal::HeaderFull`] (nothing written for any of them);
    /// `InvalidArgument` for an empty name; `ReadOnly`, `Corrupt`, `Io`.
    pub fn set_backing_file(
        &mut self,
        name: Option<&str>,
        format: Option<&str>,
        backing: Option<Backing>,
    ) -> Result<()> {
        let result = self.switch_backing(name, format, backing);
        self.observe(result)
    }

    pub(super) fn switch_backing(
        &mut self,
        name: Option<&str>,
        format: Option<&str>,
        backing: Option<Backing>,
    ) -> Result<()> {
        self.check_writable("change the backing file")?;
        let meta = self.meta.get_mut().unwrap_or_else(|e| e.into_inner());
        let header = meta.header_with_backing(name, format)?;
        meta.commit_header(&self.dev, header)?;
        self.backing = backing;
        Ok(())
    }
}
