//! The allocator's own state: where the file ends, where a free cluster may be, where the next compressed bytes
//! go, and which decrements wait for their references to be durably gone.
//!
//! It lives inside the metadata (allocation also reads and writes refcount blocks, so it runs under the same
//! exclusive lock), but its fields are its own: the rest of the engine asks and tells it through these methods,
//! so that, for example, the end of the file only ever moves through [`Allocator::reserve`] and
//! [`Allocator::cut`].

/// Where new clusters go.
#[derive(Debug, Default)]
pub struct Allocator {
    /// The lowest host cluster that may be free.
    free_hint: u64,
    /// One past the highest host cluster the image uses or has reserved.
    end_cluster: u64,
    /// Host clusters whose refcount drops once the references removed from them are durable.
    pending_frees: Vec<u64>,
    /// Where the next compressed cluster's bytes may go: inside the host cluster the previous one ended in (0:
    /// nowhere yet).
    compressed_tail: u64,
}

impl Allocator {
    /// An allocator for a file whose clusters below `end_cluster` are in use or may be.
    pub fn new(end_cluster: u64) -> Self {
        Allocator { end_cluster, ..Allocator::default() }
    }

    /// One past the highest host cluster the image uses or has reserved.
    pub fn end_cluster(&self) -> u64 {
        self.end_cluster
    }

    /// Raises the end to `end` when it lies below; answers whether it moved (the caller then grows the file).
    pub fn reserve(&mut self, end: u64) -> bool {
        if end > self.end_cluster {
            self.end_cluster = end;
            return true;
        }
        false
    }

    /// Lowers the end to `end` after the file was cut there.
    pub fn cut(&mut self, end: u64) {
        if end < self.end_cluster {
            self.end_cluster = end;
            self.free_hint = self.free_hint.min(end);
        }
    }

    /// The lowest host cluster that may be free.
    pub fn hint(&self) -> u64 {
        self.free_hint
    }

    /// Where the next search for a free cluster starts.
    pub fn set_hint(&mut self, cluster: u64) {
        self.free_hint = cluster;
    }

    /// A cluster's refcount fell to zero: searches start no later than it, and compressed data is not appended
    /// inside it any more.
    pub fn freed(&mut self, cluster: u64, cluster_bits: u32) {
        self.free_hint = self.free_hint.min(cluster);
        if self.compressed_tail >> cluster_bits == cluster {
            self.compressed_tail = 0;
        }
    }

    /// Where the next compressed cluster's bytes may go (0: at the start of a new cluster).
    pub fn compressed_tail(&self) -> u64 {
        self.compressed_tail
    }

    /// Records where the last compressed bytes ended.
    pub fn set_compressed_tail(&mut self, offset: u64) {
        self.compressed_tail = offset;
    }

    /// Queues a refcount decrement for after the reference's removal is durable.
    pub fn free_later(&mut self, cluster: u64) {
        self.pending_frees.push(cluster);
    }

    /// The decrements queued so far, oldest first.
    pub fn pending_frees(&self) -> &[u64] {
        &self.pending_frees
    }

    /// Takes every queued decrement, for a writeback to apply once the references are durably gone.
    pub fn take_frees(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.pending_frees)
    }

    /// Puts back decrements a failed writeback could not apply, ahead of those queued since.
    pub fn restore_frees(&mut self, mut frees: Vec<u64>) {
        frees.append(&mut self.pending_frees);
        self.pending_frees = frees;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_end_moves_only_up_by_reserving_and_down_by_cutting() {
        let mut a = Allocator::new(10);
        assert!(!a.reserve(8));
        assert!(a.reserve(12));
        a.set_hint(11);
        a.cut(9);
        assert_eq!((a.end_cluster(), a.hint()), (9, 9));
        a.cut(20);
        assert_eq!(a.end_cluster(), 9);
    }

    #[test]
    fn a_freed_cluster_lowers_the_hint_and_ends_compressed_appends_inside_it() {
        let mut a = Allocator::new(100);
        a.set_hint(50);
        a.set_compressed_tail((7 << 16) + 300);
        a.freed(8, 16);
        assert_eq!((a.hint(), a.compressed_tail()), (8, (7 << 16) + 300));
        a.freed(7, 16);
        assert_eq!((a.hint(), a.compressed_tail()), (7, 0));
    }

    #[test]
    fn decrements_a_writeback_could_not_apply_go_back_ahead_of_newer_ones() {
        let mut a = Allocator::new(1);
        a.free_later(3);
        let taken = a.take_frees();
        a.free_later(4);
        a.restore_frees(taken);
        assert_eq!(a.pending_frees(), &[3, 4]);
    }
}
