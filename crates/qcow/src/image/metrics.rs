//! Counters and gauges of an open image, and their Prometheus text form, so that any server embedding an image
//! can publish them (with the configuration's `id` as the `id` label).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::Image;
use crate::block::BlockDevice;
use crate::error::Result;

/// Images dropped without [`Image::close`] whose last writeback, marking clean or flush failed. Process-wide,
/// because the image that failed is gone by the time anyone can ask.
static FAILED_DROPS: AtomicU64 = AtomicU64::new(0);

/// How many images in this process were dropped (not closed) and could not write back their metadata, mark
/// themselves clean or flush on the way. Dropping is best effort and the crate does not log, so this count is
/// the only trace of such a failure; [`Image::close`] returns the error instead.
pub fn failed_drops() -> u64 {
    FAILED_DROPS.load(Ordering::Relaxed)
}

pub(super) fn note_failed_drop() {
    FAILED_DROPS.fetch_add(1, Ordering::Relaxed);
}

/// Counters shared by every thread using the image.
#[derive(Debug, Default)]
pub struct Counters {
    pub read_bytes: AtomicU64,
    pub written_bytes: AtomicU64,
    pub discarded_bytes: AtomicU64,
    /// Sectors written with zeros by discards of partial clusters.
    pub erased_sectors: AtomicU64,
    /// Sectors whose clusters discards unmapped.
    pub unmapped_sectors: AtomicU64,
    /// Bytes of clusters online compaction moved and relinked.
    pub moved_bytes: AtomicU64,
    /// Data moves cancelled because a client wrote the cluster while it was copied.
    pub cancelled_moves: AtomicU64,
    /// The device answered a hole punch with `Unimplemented`: freed clusters keep their old bytes.
    pub punch_unsupported: AtomicBool,
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// What an image has done and how its file is used, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Metrics {
    /// Guest bytes read since open.
    pub read_bytes: u64,
    /// Guest bytes written since open.
    pub written_bytes: u64,
    /// Guest bytes discarded since open.
    pub discarded_bytes: u64,
    /// Bytes of host clusters in use (refcount above zero).
    pub used_bytes: u64,
    /// Length of the image file.
    pub file_bytes: u64,
    /// Free clusters inside the file not known to read as zeros: discarded where the device cannot punch holes,
    /// or freed before the image was opened.
    pub junk_bytes: u64,
    /// Free clusters punched or zeroed (or being zeroed by the reclaimer) whose zeros are not yet flushed.
    pub erased_bytes: u64,
    /// Free clusters zeroed and flushed: what allocation of single clusters takes first.
    pub available_bytes: u64,
    /// Data clusters being moved by online compaction right now.
    pub moving_bytes: u64,
    /// Bytes of clusters online compaction has moved since open.
    pub moved_bytes: u64,
    /// Data moves cancelled by client writes since open.
    pub cancelled_moves: u64,
}

impl<D: BlockDevice> Image<D> {
    /// The image's counters and gauges. Used and free space come from the refcounts of every cluster in the
    /// file, read under the metadata lock (a cost in proportion to the file, paid per call); the states of free
    /// clusters from the reclaimer's bookkeeping.
    ///
    /// # Errors
    /// `Corrupt` or `Io` while reading refcounts, `Disconnected`.
    pub fn metrics(&self) -> Result<Metrics> {
        self.check_connected()?;
        let c = &self.counters;
        let cs = self.geo.cluster_size();
        let file_bytes = self.dev.info().size_bytes();
        let (mut used, mut free) = (0u64, 0u64);
        let (erasing, erased, available, moving) = {
            let mut m = self.meta();
            for cluster in 0..file_bytes / cs {
                if m.refcount(&self.dev, cluster)? == 0 {
                    free += 1;
                } else {
                    used += 1;
                }
            }
            m.reclaim.counts()
        };
        let zeroed = (erasing + erased + available).min(free);
        Ok(Metrics {
            read_bytes: c.read_bytes.load(Ordering::Relaxed),
            written_bytes: c.written_bytes.load(Ordering::Relaxed),
            discarded_bytes: c.discarded_bytes.load(Ordering::Relaxed),
            used_bytes: used * cs,
            file_bytes,
            junk_bytes: (free - zeroed) * cs,
            erased_bytes: (erasing + erased).min(free) * cs,
            available_bytes: available.min(free) * cs,
            moving_bytes: moving * cs,
            moved_bytes: c.moved_bytes.load(Ordering::Relaxed),
            cancelled_moves: c.cancelled_moves.load(Ordering::Relaxed),
        })
    }

    /// The metrics in the Prometheus text exposition format, each labelled with the configuration's `id`.
    ///
    /// # Errors
    /// As [`metrics`](Self::metrics).
    pub fn prometheus_metrics(&self) -> Result<String> {
        let m = self.metrics()?;
        let id =
            self.config.id.as_deref().unwrap_or("").replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
        let rows: [(&str, &str, &str, u64); 11] = [
            ("qcow_read_bytes_total", "counter", "Guest bytes read.", m.read_bytes),
            ("qcow_written_bytes_total", "counter", "Guest bytes written.", m.written_bytes),
            ("qcow_discarded_bytes_total", "counter", "Guest bytes discarded.", m.discarded_bytes),
            ("qcow_used_bytes", "gauge", "Bytes of host clusters in use.", m.used_bytes),
            ("qcow_file_bytes", "gauge", "Length of the image file.", m.file_bytes),
            ("qcow_junk_bytes", "gauge", "Free clusters in the file not known to read as zeros.", m.junk_bytes),
            ("qcow_erased_bytes", "gauge", "Free clusters zeroed but not yet flushed.", m.erased_bytes),
            ("qcow_available_bytes", "gauge", "Free clusters zeroed and flushed.", m.available_bytes),
            ("qcow_moving_bytes", "gauge", "Clusters being moved by online compaction.", m.moving_bytes),
            ("qcow_moved_bytes_total", "counter", "Bytes of clusters moved by online compaction.", m.moved_bytes),
            ("qcow_cancelled_moves_total", "counter", "Moves cancelled by client writes.", m.cancelled_moves),
        ];
        let mut out = String::new();
        for (name, kind, help, value) in rows {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{id=\"{id}\"}} {value}");
        }
        Ok(out)
    }
}
