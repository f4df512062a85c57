//! Writes to images with extended L2 entries: each cluster is split into 32 subclusters that are allocated,
//! zero or unallocated on their own.
//!
//! A write into a cluster the image may modify in place writes only the subclusters it touches, padding partial
//! ones with what they showed before, and marks them allocated. A cluster without a host cluster gets one, and
//! again only the touched subclusters are written and marked, so the others keep reading zeros or the backing
//! file. Shared and compressed clusters are copied whole into a new cluster, all of it allocated.

use super::io::Piece;
use super::iov::{Gather, Scatter};
use super::Image;
use crate::block::BlockDevice;
use crate::error::{Error, Result};
use crate::format::{GuestOffset, HostOffset, L2Entry, L2Kind, SubclusterBitmap};

/// What happens to one cluster.
struct SubclusterPlan {
    target: HostOffset,
    /// Byte range inside the cluster that is written (whole subclusters).
    span: (u64, u64),
    /// Allocation and zero bits after the write.
    bitmap: SubclusterBitmap,
    /// Host clusters to release once the new mapping is durable.
    release: Vec<u64>,
    /// Whether the L2 entry (not only its bitmap) changes.
    remap: bool,
}

impl<D: BlockDevice> Image<D> {
    /// The extended-L2 write path; the caller holds the resize lock and owns the clusters of the range.
    pub(super) fn write_subclusters(&self, offset: u64, buf: &Gather<'_>) -> Result<()> {
        let cs = self.geo.cluster_size();
        let sub = cs / 32;
        let end = offset + buf.len();
        let mut pos = offset;
        while pos < end {
            let cluster_start = pos - self.geo.offset_in_cluster(pos);
            let lo = pos - cluster_start;
            let hi = (end - cluster_start).min(cs);
            let first_sc = lo / sub;
            let last_sc = (hi - 1) / sub;
            let touched = SubclusterBitmap::span(first_sc, last_sc + 1);
            let plan = self.plan_subclusters(cluster_start, touched, first_sc * sub, (last_sc + 1) * sub)?;
            let (span_lo, span_hi) = plan.span;
            let pieces: Vec<Piece<'_>> = if span_lo == lo && span_hi == hi {
                buf.range(pos - offset, pos - offset + hi - lo).into_iter().map(Piece::Borrowed).collect()
            } else {
                // Pad the partial subclusters with what the guest sees there now.
                let mut whole = vec![0u8; (span_hi - span_lo) as usize];
                self.read_mapped(cluster_start + span_lo, Scatter::one(&mut whole))?;
                if let Some(dst) = whole.get_mut((lo - span_lo) as usize..(hi - span_lo) as usize) {
                    buf.copy_to(pos - offset, dst);
                }
                vec![Piece::Owned(whole)]
            };
            self.flush_pieces(plan.target.0 + span_lo, &pieces)?;
            let mut m = self.meta_for(super::lock_timing::LockUse::Allocation);
            let guest = GuestOffset(cluster_start);
            let l2 = m.l2_for_write(&self.dev, self.geo.l1_index(guest))?;
            let index = self.geo.l2_index(guest);
            if plan.remap {
                m.set_l2_entry(&self.dev, l2, index, L2Entry::normal(plan.target))?;
            }
            m.set_l2_bitmap(&self.dev, l2, index, plan.bitmap)?;
            for cluster in plan.release {
                m.free_later(cluster);
            }
            let over_budget = m.cache.over_budget();
            drop(m);
            if over_budget {
                self.write_back_unlocked(false)?;
            }
            pos = cluster_start + hi;
        }
        Ok(())
    }

    fn plan_subclusters(&self, cluster_start: u64, touched: u32, span_lo: u64, span_hi: u64) -> Result<SubclusterPlan> {
        let cs = self.geo.cluster_size();
        let mut m = self.meta_for(super::lock_timing::LockUse::Allocation);
        m.corruption.check()?;
        m.mark_dirty(&self.dev)?;
        let guest = GuestOffset(cluster_start);
        if m.reclaim.moving() {
            // A copy of this cluster in flight would miss what is written now.
            m.reclaim.cancel_move(cluster_start / cs);
        }
        let l2 = m.l2_for_write(&self.dev, self.geo.l1_index(guest))?;
        let index = self.geo.l2_index(guest);
        let at = l2.0 + index * self.geo.l2_entry_size();
        let entry = m.l2_entry(&self.dev, l2, index)?;
        let bitmap = m.l2_bitmap(&self.dev, l2, index)?;
        let partial = SubclusterPlan {
            target: HostOffset(0),
            span: (span_lo, span_hi),
            bitmap: bitmap.with_allocated(touched),
            release: Vec::new(),
            remap: false,
        };
        let whole = |release: Vec<u64>| SubclusterPlan {
            target: HostOffset(0),
            span: (0, cs),
            bitmap: SubclusterBitmap::ALL_ALLOCATED,
            release,
            remap: true,
        };
        let mut plan = match m.decode_l2(&self.dev, entry, at)? {
            L2Kind::Compressed { host, len } => whole((host.0 / cs..=(host.0 + len.max(1) - 1) / cs).collect()),
            L2Kind::Normal { host, copied: true } => SubclusterPlan { target: host, ..partial },
            L2Kind::Unallocated if m.data_file_size.is_some() && entry.is_copied() => {
                SubclusterPlan { target: HostOffset(0), ..partial }
            }
            L2Kind::Normal { host, copied: false } => whole(vec![host.0 / cs]),
            // Bit 0 is reserved in extended entries, so no other kind has a host cluster.
            L2Kind::Zero { .. } => return Err(Error::corrupt("reserved bit 0 set in extended L2 entry", at)),
            L2Kind::Unallocated => SubclusterPlan { remap: true, ..partial },
        };
        if plan.remap && m.data_file_size.is_some() {
            // In an external data file a cluster's place is fixed and not refcounted.
            plan.target = HostOffset(cluster_start);
            plan.release.clear();
        } else if plan.remap {
            plan.target = HostOffset(m.alloc_clusters(&self.dev, 1)? * cs);
        } else if m.data_file_size.is_none() {
            // Written in place at a cluster an L2 entry on disk names: it must not be metadata.
            m.check_data_write(&self.dev, plan.target.0)?;
        }
        Ok(plan)
    }
}
