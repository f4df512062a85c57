//! The state of a streaming decode: which host clusters are tables, which hold data for which guest clusters,
//! and what was kept because nothing named it yet.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;

use super::spool::Spool;
use crate::convert::is_zero;
use crate::error::{Error, Result};
use crate::format::{
    decompress, CompressionType, Geometry, Header, L1Entry, L2Entry, L2Kind, RefcountTableEntry, SubclusterBitmap,
};

/// The unit of zero detection in the output: a file system block.
const ZERO_GRANULE: usize = 4096;

/// Subclusters per cluster with extended L2 entries.
const SUBCLUSTERS: u64 = 32;

/// What an arriving host cluster is needed for.
#[derive(Debug, Clone, Copy)]
enum Use {
    /// Guest data: the whole cluster, or with extended L2 the subclusters set in `mask`.
    Data { guest: u64, mask: Option<u32> },
    /// Part of the compressed cluster being assembled as `id`.
    Piece { id: u64 },
}

/// A compressed cluster whose bytes are being collected.
struct Assembly {
    guest: u64,
    /// First host byte.
    start: u64,
    bytes: Vec<u8>,
    /// Host clusters still to come.
    missing: usize,
}

/// A pending output write of bytes straight out of the current input buffer.
#[derive(Clone, Copy)]
struct Run {
    guest: u64,
    from: usize,
    len: usize,
}

/// Decodes clusters as they arrive.
pub struct Decoder<'a> {
    out: &'a File,
    geo: Geometry,
    cs: u64,
    size: u64,
    compression: CompressionType,
    l1_offset: u64,
    l1: Vec<u8>,
    l1_done: bool,
    /// The refcount table: its offset and length in bytes.
    reftable: (u64, u64),
    /// Refcount blocks the refcount table names: metadata, never data, so they need not be kept.
    refblocks: HashSet<u64>,
    /// L2 tables not yet seen: host cluster -> the L1 indexes naming it.
    l2_at: HashMap<u64, Vec<u64>>,
    uses: HashMap<u64, Vec<Use>>,
    assemblies: HashMap<u64, Assembly>,
    next_id: u64,
    spool: Spool,
    /// The host cluster being processed; every cluster below it has been seen.
    current: u64,
    run: Option<Run>,
    /// Guest bytes written.
    pub written: u64,
}

fn be64(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    if let Some(s) = bytes.get(at..at + 8) {
        b.copy_from_slice(s);
    }
    u64::from_be_bytes(b)
}

impl<'a> Decoder<'a> {
    /// A decoder writing the disk `header` describes into `out`.
    pub fn new(out: &'a File, header: &Header, geo: Geometry, spool: Spool) -> Self {
        let cs = geo.cluster_size();
        let reftable = (header.refcount_table_offset, u64::from(header.refcount_table_clusters) * cs);
        let l1_entries = u64::from(header.l1_size);
        let l1_len = usize::try_from(l1_entries.saturating_mul(8)).unwrap_or(0);
        Decoder {
            out,
            geo,
            cs: geo.cluster_size(),
            size: header.size,
            compression: header.compression_type,
            l1_offset: header.l1_table_offset,
            l1: Vec::with_capacity(l1_len),
            l1_done: l1_len == 0,
            reftable,
            refblocks: HashSet::new(),
            l2_at: HashMap::new(),
            uses: HashMap::new(),
            assemblies: HashMap::new(),
            next_id: 0,
            spool,
            current: 0,
            run: None,
            written: 0,
        }
    }

    /// The most bytes the spool held, and whether it went to a file.
    pub fn spool_stats(&self) -> (u64, bool) {
        (self.spool.peak, self.spool.spilled)
    }

    /// Whether every table that maps data has been seen: from then on nothing unknown can be needed.
    fn all_known(&self) -> bool {
        self.l1_done && self.l2_at.is_empty()
    }

    /// Handles host cluster `index`, whose bytes are `buf[from..from + len]` (`len` is short only for the last
    /// cluster of the stream). Writes may be left pending on `buf`: call [`Decoder::flush_run`] before `buf`
    /// changes.
    pub fn cluster(&mut self, index: u64, buf: &[u8], from: usize, len: usize) -> Result<()> {
        self.current = index;
        let data = buf.get(from..from + len).ok_or_else(|| Error::invalid("stream-decode", "internal: bad slice"))?;
        let start = index * self.cs;
        let mut known = index == 0;
        let l1_len = self.l1.capacity() as u64;
        if !self.l1_done && start + self.cs > self.l1_offset && start < self.l1_offset + l1_len {
            // The table is cluster aligned, so it starts at the start of a cluster and clusters come in order.
            let take = (self.l1_offset + l1_len - start).min(len as u64) as usize;
            self.l1.extend_from_slice(data.get(..take).unwrap_or(&[]));
            known = true;
            if self.l1.len() as u64 == l1_len {
                self.l1_ready()?;
            }
        }
        let (rt_at, rt_len) = self.reftable;
        if start + self.cs > rt_at && start < rt_at.saturating_add(rt_len) && rt_at % self.cs == 0 {
            // Part of the refcount table: note the refcount blocks it names, so that they are not kept.
            known = true;
            let upto = (rt_at + rt_len - start).min(len as u64) as usize;
            for raw in data.get(..upto).unwrap_or(&[]).chunks_exact(8) {
                if let Some(block) = RefcountTableEntry(be64(raw, 0)).block_offset() {
                    self.refblocks.insert(block.0 / self.cs);
                }
            }
        }
        if self.refblocks.remove(&index) {
            known = true;
        }
        if let Some(indexes) = self.l2_at.remove(&index) {
            known = true;
            for l1_index in indexes {
                self.l2_ready(l1_index, data)?;
            }
        }
        // Bytes of this cluster from `keep_from` on are kept even though something named the cluster: see
        // `uncertain_from`.
        let mut keep_from = data.len();
        if let Some(uses) = self.uses.remove(&index) {
            known = true;
            keep_from = self.uncertain_from(start, data.len(), &uses);
            for u in uses {
                self.apply(u, index, Some((buf, from)), data)?;
            }
        }
        if self.all_known() {
            self.spool.clear();
        } else if !known {
            self.spool.put(index, 0, data)?;
        } else if keep_from < data.len() {
            self.spool.put(index, keep_from, data.get(keep_from..).unwrap_or(&[]))?;
        }
        Ok(())
    }

    /// Where the bytes of the cluster at `start` (`len` bytes long) that `uses` may not account for begin.
    /// Compressed clusters are packed byte by byte, and a descriptor only bounds its data to the end of a
    /// sector, so the last sector of each compressed piece, and anything no piece covers, may hold the start of
    /// a compressed cluster whose table is still to come. Whole data clusters leave nothing uncertain.
    fn uncertain_from(&self, start: u64, len: usize, uses: &[Use]) -> usize {
        let mut certain: Vec<(u64, u64)> = Vec::new();
        for u in uses {
            match *u {
                Use::Data { .. } => return len,
                Use::Piece { id } => {
                    if let Some(a) = self.assemblies.get(&id) {
                        let end = (a.start + a.bytes.len() as u64).saturating_sub(511);
                        certain.push((a.start.max(start), end.min(start + len as u64)));
                    }
                }
            }
        }
        certain.sort_unstable();
        let mut reach = start;
        for (lo, hi) in certain {
            if lo > reach {
                break;
            }
            reach = reach.max(hi);
        }
        (reach - start) as usize
    }

    /// The L1 table is complete: note where every L2 table is.
    fn l1_ready(&mut self) -> Result<()> {
        self.l1_done = true;
        let l1 = std::mem::take(&mut self.l1);
        for (i, raw) in l1.chunks_exact(8).enumerate() {
            let entry = L1Entry(be64(raw, 0));
            if entry.is_malformed(&self.geo) {
                return Err(Error::corrupt("malformed L1 entry", self.l1_offset + i as u64 * 8));
            }
            let Some(l2) = entry.l2_offset() else { continue };
            let cluster = l2.0 / self.cs;
            if cluster <= self.current {
                let table = self.passed(cluster, "an L2 table comes before the L1 table and was not kept")?;
                self.l2_ready(i as u64, &table)?;
            } else {
                self.l2_at.entry(cluster).or_default().push(i as u64);
            }
        }
        Ok(())
    }

    /// A whole cluster already passed, from the spool.
    fn passed(&self, cluster: u64, what: &'static str) -> Result<Vec<u8>> {
        match self.spool.get(cluster)? {
            Some((0, data)) => Ok(data),
            _ => Err(Error::corrupt(what, cluster * self.cs)),
        }
    }

    /// The L2 table for L1 index `l1_index` arrived: register (or serve from the spool) every cluster it maps.
    fn l2_ready(&mut self, l1_index: u64, table: &[u8]) -> Result<()> {
        let entries = self.geo.l2_entries();
        let esize = self.geo.l2_entry_size() as usize;
        for j in 0..entries {
            let guest = (l1_index * entries + j).saturating_mul(self.cs);
            if guest >= self.size {
                break;
            }
            let at = j as usize * esize;
            let entry = L2Entry(be64(table, at));
            let kind = entry.kind(&self.geo).map_err(|what| Error::corrupt(what, guest))?;
            match kind {
                L2Kind::Unallocated | L2Kind::Zero { .. } => {}
                L2Kind::Normal { host, .. } => {
                    let mask = if self.geo.extended_l2 {
                        let bitmap = SubclusterBitmap(be64(table, at + 8));
                        // Allocated and not zero; the rest reads as zeros (there is no backing file).
                        let mask = bitmap.data();
                        if mask == 0 {
                            continue;
                        }
                        Some(mask)
                    } else {
                        None
                    };
                    let cluster = host.0 / self.cs;
                    let u = Use::Data { guest, mask };
                    if cluster <= self.current {
                        let data = self.passed(cluster, "a data cluster comes before its L2 table and was not kept")?;
                        self.apply(u, cluster, None, &data)?;
                    } else {
                        self.uses.entry(cluster).or_default().push(u);
                    }
                }
                L2Kind::Compressed { host, len } => self.compressed(guest, host.0, len)?,
            }
        }
        Ok(())
    }

    fn compressed(&mut self, guest: u64, start: u64, len: u64) -> Result<()> {
        let end = start.checked_add(len).ok_or_else(|| Error::corrupt("compressed descriptor overflows", guest))?;
        let id = self.next_id;
        self.next_id += 1;
        let bytes = vec![0u8; usize::try_from(len).map_err(|_| Error::corrupt("compressed length", guest))?];
        self.assemblies.insert(id, Assembly { guest, start, bytes, missing: 0 });
        for cluster in start / self.cs..=(end.max(start + 1) - 1) / self.cs {
            if cluster <= self.current {
                let what = "compressed data comes before its L2 table and was not kept";
                let (kept_from, data) =
                    self.spool.get(cluster)?.ok_or_else(|| Error::corrupt(what, cluster * self.cs))?;
                let kept = cluster * self.cs + kept_from as u64;
                if start.max(cluster * self.cs) < kept {
                    return Err(Error::corrupt(what, cluster * self.cs));
                }
                self.piece(id, kept, &data)?;
            } else {
                if let Some(a) = self.assemblies.get_mut(&id) {
                    a.missing += 1;
                }
                self.uses.entry(cluster).or_default().push(Use::Piece { id });
            }
        }
        if self.assemblies.get(&id).is_some_and(|a| a.missing == 0) {
            self.finish(id)?;
        }
        Ok(())
    }

    /// Copies what assembly `id` needs of `data`, the host bytes at `at`.
    fn piece(&mut self, id: u64, at: u64, data: &[u8]) -> Result<()> {
        let Some(a) = self.assemblies.get_mut(&id) else { return Ok(()) };
        let lo = at.max(a.start);
        let hi = (at + data.len() as u64).min(a.start + a.bytes.len() as u64);
        if lo < hi {
            let src = data.get((lo - at) as usize..(hi - at) as usize).unwrap_or(&[]);
            if let Some(dst) = a.bytes.get_mut((lo - a.start) as usize..(hi - a.start) as usize) {
                dst.copy_from_slice(src);
            }
        }
        Ok(())
    }

    /// Decompresses assembly `id` and writes it.
    fn finish(&mut self, id: u64) -> Result<()> {
        let Some(a) = self.assemblies.remove(&id) else { return Ok(()) };
        let mut cluster = vec![0u8; self.cs as usize];
        decompress(self.compression, &a.bytes, &mut cluster)
            .map_err(|_| Error::corrupt("compressed cluster does not decompress to a full cluster", a.start))?;
        self.write_owned(a.guest, &cluster)
    }

    /// Serves use `u` with host cluster `cluster`, whose bytes are `data`; `origin` says where `data` sits in the
    /// input buffer, so that runs of clusters can be written in one go.
    fn apply(&mut self, u: Use, cluster: u64, origin: Option<(&[u8], usize)>, data: &[u8]) -> Result<()> {
        match u {
            Use::Piece { id } => {
                self.piece(id, cluster * self.cs, data)?;
                let done = match self.assemblies.get_mut(&id) {
                    Some(a) => {
                        a.missing = a.missing.saturating_sub(1);
                        a.missing == 0
                    }
                    None => false,
                };
                if done {
                    self.finish(id)?;
                }
                Ok(())
            }
            Use::Data { guest, mask: None } => match origin {
                Some((buf, from)) => self.write_run(buf, guest, from, data.len()),
                None => self.write_owned(guest, data),
            },
            Use::Data { guest, mask: Some(mask) } => {
                let sub = self.cs / SUBCLUSTERS;
                for i in 0..SUBCLUSTERS {
                    if mask & (1 << i) == 0 {
                        continue;
                    }
                    let lo = (i * sub) as usize;
                    let hi = (lo + sub as usize).min(data.len());
                    if lo < hi {
                        self.write_owned(guest + i * sub, data.get(lo..hi).unwrap_or(&[]))?;
                    }
                }
                Ok(())
            }
        }
    }

    /// Writes `data` at `guest` (clipped to the disk), leaving out the file system blocks that are all zeros so
    /// that the output stays sparse.
    fn write_owned(&mut self, guest: u64, data: &[u8]) -> Result<()> {
        let len = (self.size.saturating_sub(guest)).min(data.len() as u64) as usize;
        let data = data.get(..len).unwrap_or(&[]);
        let mut pos = 0;
        let mut start: Option<usize> = None;
        while pos < data.len() {
            let next = (pos + ZERO_GRANULE).min(data.len());
            if is_zero(data.get(pos..next).unwrap_or(&[])) {
                if let Some(s) = start.take() {
                    self.write_out(guest + s as u64, data.get(s..pos).unwrap_or(&[]))?;
                }
            } else if start.is_none() {
                start = Some(pos);
            }
            pos = next;
        }
        if let Some(s) = start {
            self.write_out(guest + s as u64, data.get(s..).unwrap_or(&[]))?;
        }
        Ok(())
    }

    fn write_out(&mut self, guest: u64, data: &[u8]) -> Result<()> {
        self.out.write_all_at(data, guest).map_err(|e| Error::io("write the output", guest, e))?;
        self.written += data.len() as u64;
        Ok(())
    }

    /// Adds `buf[from..from + len]`, guest data at `guest`, to the pending run, or writes the run and starts
    /// another.
    fn write_run(&mut self, buf: &[u8], guest: u64, from: usize, len: usize) -> Result<()> {
        if let Some(run) = &mut self.run {
            if run.guest + run.len as u64 == guest && run.from + run.len == from {
                run.len += len;
                return Ok(());
            }
        }
        self.flush_run(buf)?;
        self.run = Some(Run { guest, from, len });
        Ok(())
    }

    /// Writes the pending run, whose bytes are in `buf`.
    pub fn flush_run(&mut self, buf: &[u8]) -> Result<()> {
        let Some(run) = self.run.take() else { return Ok(()) };
        let data = buf
            .get(run.from..run.from + run.len)
            .ok_or_else(|| Error::invalid("stream-decode", "internal: bad run"))?;
        self.write_owned(run.guest, data)
    }

    /// The stream ended after `clusters` clusters: everything still expected must have been past its end.
    ///
    /// # Errors
    /// `Corrupt` when a table was never seen; data clusters past the end read as zeros, as in QEMU, and
    /// compressed clusters running past it are decompressed from what there is.
    pub fn end(&mut self) -> Result<()> {
        if !self.l1_done {
            return Err(Error::corrupt("the stream ends before the L1 table", self.l1_offset));
        }
        if let Some(&cluster) = self.l2_at.keys().min() {
            return Err(Error::corrupt("the stream ends before an L2 table", cluster * self.cs));
        }
        self.uses.clear();
        let mut ids: Vec<u64> = self.assemblies.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            self.finish(id)?;
        }
        Ok(())
    }
}
