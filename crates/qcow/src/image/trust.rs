//! Trust in the refcounts, and corruption met while working.
//!
//! Giving space back where a refcount reads zero (truncating a free tail, erasing junk, choosing the
//! destinations of compaction, dropping empty refcount blocks) destroys data when that zero is wrong. Those
//! steps take a [`Trusted`], which only this module makes, and only when one of these holds:
//! - the image was created here, so every structure in it is this engine's;
//! - its refcounts were rebuilt from the metadata (a dirty image opened read-write);
//! - a check of the settled image ([`crate::check::distrust`]) found no corruption and read every structure
//!   (leaks are fine: they free nothing in use).
//!
//! Once held it stays valid while the image is open, because every later change is this engine's own and keeps
//! refcounts and references in step. It is void once corruption has been met: then nothing more is written.
//!
//! Corruption met by any I/O path of the image (a read, a write, a discard, a flush, the reclaimer's work) is
//! recorded as the overlap checks record theirs: the evidence is kept, a writable image gets the corrupt bit, and
//! the background reclaimer stops with the error in [`Image::reclaimer_error`]. A refusal for want of trust is not
//! corruption met: it is made before anything changes, and leaves the file as it was.

use super::meta::Meta;
use super::Image;
use crate::block::BlockDevice;
use crate::error::{Error, Result};
use crate::format::feature;

/// Evidence that the refcounts can be trusted: a cluster whose refcount reads zero is referenced by nothing.
#[derive(Debug, Clone, Copy)]
pub(super) struct Trusted(());

impl Meta {
    /// The evidence, if the refcounts are trusted now and no corruption has been met.
    ///
    /// # Errors
    /// `Corrupt` once corruption was met.
    pub(super) fn trusted(&self) -> Result<Option<Trusted>> {
        self.corruption.check()?;
        Ok(self.trust)
    }

    /// `trusted` again, as long as no corruption was met since it was shown: for work that holds the metadata
    /// lock several times.
    ///
    /// # Errors
    /// `Corrupt` once corruption was met.
    pub(super) fn still_trusted(&self, trusted: Trusted) -> Result<Trusted> {
        self.corruption.check()?;
        Ok(trusted)
    }

    /// Records that the refcounts equal what the metadata implies, because this engine just wrote all of them.
    pub(super) fn trust_own_refcounts(&mut self) {
        self.trust = Some(Trusted(()));
    }

    /// Judges the refcounts by a check of the device, once everything is written back. The caller holds the
    /// metadata lock, and either keeps guest I/O away or accepts that in-flight changes show up as leaks.
    ///
    /// # Errors
    /// `Untrusted` naming the first finding (nothing was changed), `Corrupt` once corruption was met, `Io`.
    pub(super) fn establish_trust(&mut self, dev: &dyn BlockDevice, op: &'static str) -> Result<Trusted> {
        if let Some(trusted) = self.trusted()? {
            return Ok(trusted);
        }
        if self.writable {
            self.writeback(dev)?;
            dev.flush()?;
        }
        match crate::check::distrust(dev)? {
            None => {
                self.trust_own_refcounts();
                Ok(Trusted(()))
            }
            Some(why) => Err(Error::Untrusted { op, why: Box::new(why) }),
        }
    }
}

impl<D: BlockDevice> Image<D> {
    /// The evidence that the refcounts can be trusted, judging them first (a check of the whole metadata, guest
    /// I/O waiting meanwhile) when nothing has shown it yet this session.
    ///
    /// # Errors
    /// As [`Meta::establish_trust`], plus `Disconnected`.
    pub(super) fn trust_refcounts(&self, op: &'static str) -> Result<Trusted> {
        self.check_connected()?;
        if let Some(trusted) = self.meta().trusted()? {
            return Ok(trusted);
        }
        let _no_resize = self.resize.read().unwrap_or_else(|e| e.into_inner());
        self.meta().establish_trust(&self.dev, op)
    }

    /// Compares every stored refcount with what the metadata implies, with the same checker and the same
    /// tolerance as `qemu-img check` (leaks are fine). A writable image that passes may then give free space back
    /// (compaction, the reclaimer) without another check. A dirty image opened read-only passes unjudged: its
    /// refcounts are known to be stale and a read-write open rebuilds them.
    ///
    /// # Errors
    /// `Untrusted` naming the first corruption or unreadable structure, with where its refcount is kept and who
    /// points at it; `Corrupt` once corruption was met; `Io`.
    pub fn verify_refcounts(&self) -> Result<()> {
        if self.meta().header.incompatible_features & feature::DIRTY != 0 && self.read_only {
            return Ok(());
        }
        self.trust_refcounts("verify").map(|_| ())
    }

    /// Passes `result` on, recording corruption of this image's metadata in it first (see the module docs).
    /// Called where an operation returns to its caller, with no lock held.
    pub(super) fn observe<T>(&self, result: Result<T>) -> Result<T> {
        if let Err(e) = &result {
            if e.is_met_corruption() {
                self.met_corruption(e);
            }
        }
        result
    }

    fn met_corruption(&self, e: &Error) {
        if self.corruption.check().is_ok() {
            let (what, offset) = match e {
                Error::Corrupt { what, offset } => (*what, *offset),
                _ => ("metadata failed validation", 0),
            };
            let _ = self.meta().signal_corruption(&self.dev, what, offset);
        }
        self.halt_reclaimer(e);
    }
}
