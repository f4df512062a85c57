//! An image and its backing chain seen layer by layer, and the block status QEMU reports for a guest range: for
//! each part, which layer answers (its depth), whether it is allocated there, reads as zeros, holds data, is
//! compressed, and where in that layer's file it lives. `map`, `measure` and `compare` ask this question.
//!
//! Each qcow2 layer is opened for its metadata only (the library's own chain is not used), so that the answer
//! names the layer and its host offset, as `qemu-img map` does; host clusters and refcounts come from the
//! library (`Image::map`, `Image::host_clusters`, `Image::clusters_in_use`). Backing files are followed under the tool's
//! policy: relative names against the overlay's directory, formats taken from the image, never probed.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use qcow::block::FileDevice;
use qcow::convert::AllocationMap;
use qcow::{ExtentKind, Image};

use crate::error::{Error, Result};
use crate::open::{self, ChainReads, Format};

/// Longest chain followed, as a guard against loops.
const MAX_DEPTH: usize = 64;

/// One image of the chain.
enum Body {
    /// A qcow2 image, and whether QEMU takes it for metadata-preallocated.
    Qcow2(Box<Image<FileDevice>>, bool),
    Raw(FileDevice),
}

/// One image of the chain, with the name QEMU gives it and the name the image above records for it.
struct Layer {
    name: String,
    recorded: Option<String>,
    size: u64,
    body: Body,
}

/// An image and the images under it, top first.
pub struct Chain {
    layers: Vec<Layer>,
}

/// What QEMU's block status says about one guest range (the fields of `qemu-img map --output=json`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// First guest byte.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Index of the layer that answers, 0 for the top image.
    pub depth: usize,
    /// Allocated in that layer.
    pub present: bool,
    /// Reads as zeros.
    pub zero: bool,
    /// Holds data.
    pub data: bool,
    /// Compressed data.
    pub compressed: bool,
    /// Host offset in the layer's file, when it has one.
    pub offset: Option<u64>,
}

impl Status {
    /// Whether `next` continues this entry, by QEMU's merge rule.
    fn mergeable(&self, next: &Status) -> bool {
        self.length > 0
            && self.start + self.length == next.start
            && (self.depth, self.present, self.zero, self.data, self.compressed)
                == (next.depth, next.present, next.zero, next.data, next.compressed)
            && match (self.offset, next.offset) {
                (None, None) => true,
                (Some(a), Some(b)) => a + self.length == b,
                _ => false,
            }
    }
}

/// Appends `s` to `out`, merging it into the last entry when QEMU would.
fn push(out: &mut Vec<Status>, s: Status) {
    if s.length == 0 {
        return;
    }
    if let Some(last) = out.last_mut() {
        if last.mergeable(&s) {
            last.length += s.length;
            return;
        }
    }
    out.push(s);
}

/// Whether QEMU would take `image` for metadata-preallocated: more clusters with a nonzero refcount than the
/// file really allocates, by a tenth and at least two. In that case QEMU asks the file system about each data
/// range and reports file holes as zeros.
fn metadata_preallocated(image: &Image<FileDevice>) -> bool {
    let dev = image.device();
    let cs = image.geometry().cluster_size();
    let real = dev.file().metadata().map_or(dev.len_bytes(), |m| m.blocks().saturating_mul(512));
    let real_clusters = real / cs;
    let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
    image.clusters_in_use(threshold).is_ok_and(|n| n >= threshold)
}

/// The path QEMU opens for a backing file `backing` named in the image `image`: an absolute name as it is, a
/// relative one appended to the image's name up to its last slash.
pub fn backing_name(image: &str, backing: &str) -> String {
    if backing.starts_with('/') {
        return backing.to_string();
    }
    match image.rfind('/') {
        Some(slash) => format!("{}{backing}", image.get(..=slash).unwrap_or("")),
        None => backing.to_string(),
    }
}

impl Chain {
    /// Opens `path` (as `format`, or probed) and every backing file under it.
    pub fn open(path: &Path, format: Option<Format>) -> Result<Self> {
        Self::open_with(path, format, ChainReads::Locked)
    }

    /// As [`open`](Self::open), every layer opened with the locks of `reads`.
    pub fn open_with(path: &Path, format: Option<Format>, reads: ChainReads) -> Result<Self> {
        let mut layers = Vec::new();
        let mut name = path.display().to_string();
        let mut recorded = None;
        let mut format = match format {
            Some(f) => f,
            None => open::probe(path)?,
        };
        loop {
            if layers.len() >= MAX_DEPTH {
                return Err(Error::msg(format!("'{name}': backing chain longer than {MAX_DEPTH} images")));
            }
            let here = PathBuf::from(&name);
            match format {
                Format::Raw => {
                    let dev = open::chain_file(&here, reads)?;
                    let size = dev.len_bytes();
                    layers.push(Layer { name, recorded, size, body: Body::Raw(dev) });
                    break;
                }
                Format::Qcow2 => {
                    let image = open::image_metadata_with(&here, reads)?;
                    let header = image.header();
                    if header.has_external_data_file() {
                        return Err(Error::msg(format!(
                            "'{name}' keeps its data in an external data file, which this command does not support"
                        )));
                    }
                    let size = image.virtual_size();
                    let backing = header.backing_file.as_deref().map(|b| String::from_utf8_lossy(b).into_owned());
                    let backing_format = header.backing_format();
                    let preallocated = metadata_preallocated(&image);
                    let body = Body::Qcow2(Box::new(image), preallocated);
                    layers.push(Layer { name: name.clone(), recorded: recorded.take(), size, body });
                    let Some(backing) = backing else { break };
                    if backing.starts_with('/') && !open::policy().allow_absolute {
                        return Err(Error::msg(format!(
                            "'{name}': backing file '{backing}' is an absolute path, which is not followed \
                             (pass --allow-absolute-backing to follow it)"
                        )));
                    }
                    let next = backing_name(&name, &backing);
                    format = match backing_format.as_deref() {
                        Some("raw") => Format::Raw,
                        Some("qcow2") => Format::Qcow2,
                        Some(other) => {
                            return Err(Error::msg(format!(
                                "'{name}': backing file '{backing}' has format '{other}', which is not supported"
                            )))
                        }
                        None => {
                            return Err(Error::msg(format!(
                                "'{name}': backing file '{backing}' has no recorded format, and formats are \
                                 never probed"
                            )))
                        }
                    };
                    name = next;
                    recorded = Some(backing);
                }
            }
        }
        Ok(Chain { layers })
    }

    /// The top image's virtual size.
    pub fn size(&self) -> u64 {
        self.layers.first().map_or(0, |l| l.size)
    }

    /// The name of the layer at `depth`, as QEMU names it.
    pub fn name(&self, depth: usize) -> &str {
        self.layers.get(depth).map_or("", |l| l.name.as_str())
    }

    /// The name the image above records for the layer at `depth` (none for the top).
    pub fn recorded_name(&self, depth: usize) -> Option<&str> {
        self.layers.get(depth).and_then(|l| l.recorded.as_deref())
    }

    /// The format of the layer at `depth`.
    pub fn layer_format(&self, depth: usize) -> Option<Format> {
        self.layers.get(depth).map(|l| match l.body {
            Body::Raw(_) => Format::Raw,
            Body::Qcow2(..) => Format::Qcow2,
        })
    }

    /// The top image, when it is qcow2.
    pub fn top_image(&self) -> Option<&Image<FileDevice>> {
        match self.layers.first().map(|l| &l.body) {
            Some(Body::Qcow2(image, _)) => Some(image),
            _ => None,
        }
    }

    /// The block status of `start..end` of the top image, merged as `qemu-img map` merges it.
    pub fn status(&self, start: u64, end: u64) -> Result<Vec<Status>> {
        let mut out = Vec::new();
        let end = end.min(self.size());
        if start < end {
            self.layer_status(0, start, end, &mut out)?;
        }
        Ok(out)
    }

    fn layer_status(&self, depth: usize, start: u64, end: u64, out: &mut Vec<Status>) -> Result<()> {
        let Some(layer) = self.layers.get(depth) else { return Ok(()) };
        let entry = |start: u64, length: u64| Status {
            start,
            length,
            depth,
            present: false,
            zero: false,
            data: false,
            compressed: false,
            offset: None,
        };
        match &layer.body {
            Body::Raw(dev) => {
                // A raw file is allocated everywhere: data where the file system has data, zeros in its holes.
                let mut pos = start;
                let ranges =
                    dev.data_ranges(start, end - start).map_err(|e| open::io_error(Path::new(&layer.name), e))?;
                for (at, len) in ranges {
                    let (at, stop) = (at.max(pos), at.saturating_add(len).min(end));
                    if at >= stop {
                        continue;
                    }
                    push(out, Status { present: true, zero: true, offset: Some(pos), ..entry(pos, at - pos) });
                    push(out, Status { present: true, data: true, offset: Some(at), ..entry(at, stop - at) });
                    pos = stop;
                }
                push(out, Status { present: true, zero: true, offset: Some(pos), ..entry(pos, end - pos) });
            }
            Body::Qcow2(image, preallocated) => {
                let fail = |e| open::io_error(Path::new(&layer.name), e);
                let extents = image.map(start, end - start).map_err(fail)?;
                let cs = image.geometry().cluster_size();
                for e in extents {
                    let (at, len) = (e.guest.0, e.len);
                    match e.kind {
                        ExtentKind::Data { host } if *preallocated => {
                            // QEMU asks the file system: holes and what lies past the end of the file read as
                            // zeros.
                            let dev = image.device();
                            let (host, file_len) = (host.0, dev.len_bytes());
                            let mut pos = host;
                            let hole = |from: u64, to: u64| Status {
                                present: true,
                                data: true,
                                zero: true,
                                offset: Some(from),
                                ..entry(at + (from - host), to - from)
                            };
                            for (d, n) in dev.data_ranges(host, len).map_err(fail)? {
                                let (d, stop) = (d.max(pos), d.saturating_add(n).min(host + len).min(file_len));
                                if d >= stop {
                                    continue;
                                }
                                push(out, hole(pos, d));
                                push(
                                    out,
                                    Status {
                                        present: true,
                                        data: true,
                                        offset: Some(d),
                                        ..entry(at + (d - host), stop - d)
                                    },
                                );
                                pos = stop;
                            }
                            push(out, hole(pos, host + len));
                        }
                        ExtentKind::Data { host } => {
                            push(out, Status { present: true, data: true, offset: Some(host.0), ..entry(at, len) });
                        }
                        ExtentKind::Zero => {
                            // A zero cluster may keep its host cluster, which QEMU reports.
                            let mut hosts = image.host_clusters(at, len).map_err(fail)?.into_iter().peekable();
                            let mut pos = at;
                            while pos < at + len {
                                let stop = (pos / cs + 1).saturating_mul(cs).min(at + len);
                                let cluster = pos - pos % cs;
                                while hosts.next_if(|(guest, _)| guest.0 < cluster).is_some() {}
                                let offset =
                                    hosts.peek().filter(|(guest, _)| guest.0 == cluster).map(|(_, h)| h.0 + pos % cs);
                                push(out, Status { present: true, zero: true, offset, ..entry(pos, stop - pos) });
                                pos = stop;
                            }
                        }
                        ExtentKind::Compressed { .. } => {
                            push(out, Status { present: true, data: true, compressed: true, ..entry(at, len) });
                        }
                        ExtentKind::Unallocated if !image.header().has_extended_l2() => {
                            self.unallocated_status(depth, at, at + len, None, out)?;
                        }
                        ExtentKind::Unallocated => {
                            // Only an extended L2 entry keeps a host cluster under unallocated subclusters; QEMU
                            // reports it, so those clusters are runs of their own.
                            let (mut pos, end) = (at, at + len);
                            for (guest, host) in image.host_clusters(at, len).map_err(fail)? {
                                let start = guest.0.max(pos);
                                if start > pos {
                                    self.unallocated_status(depth, pos, start, None, out)?;
                                }
                                let stop = guest.0.saturating_add(cs).min(end);
                                if stop > start {
                                    let offset = Some(host.0 + (start - guest.0));
                                    self.unallocated_status(depth, start, stop, offset, out)?;
                                }
                                pos = stop.max(pos);
                            }
                            if pos < end {
                                self.unallocated_status(depth, pos, end, None, out)?;
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

impl Chain {
    /// The block status of `start..end`, unallocated in the layer at `depth`, whose host offset for `start` is
    /// `offset` (an extended L2 entry keeps its host cluster under unallocated subclusters).
    fn unallocated_status(
        &self,
        depth: usize,
        start: u64,
        end: u64,
        offset: Option<u64>,
        out: &mut Vec<Status>,
    ) -> Result<()> {
        // The backing file answers as far as it reaches; past its end the image reads zeros, and QEMU still
        // reports the host offset there.
        let reach = match self.layers.get(depth + 1) {
            Some(below) => end.min(below.size.max(start)),
            None => start,
        };
        if reach > start {
            self.layer_status(depth + 1, start, reach, out)?;
        }
        push(
            out,
            Status {
                start: reach,
                length: end - reach,
                depth,
                present: false,
                zero: true,
                data: false,
                compressed: false,
                offset: offset.map(|o| o + (reach - start)),
            },
        );
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn full_backing_names_combine_like_qemu() {
        assert_eq!(backing_name("ov.qcow2", "base.raw"), "base.raw");
        assert_eq!(backing_name("q/ov.qcow2", "base.raw"), "q/base.raw");
        assert_eq!(backing_name("./q/../q/ov.qcow2", "b/base.raw"), "./q/../q/b/base.raw");
        assert_eq!(backing_name("q/ov.qcow2", "/abs/base.raw"), "/abs/base.raw");
    }
}
