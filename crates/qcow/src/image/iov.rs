//! The caller's buffers of one vectored guest request, cut along the extents the request maps to.
//!
//! A request is mapped once over its whole byte range; each extent then moves its bytes into or out of whichever
//! buffers it covers. An extent may cover several buffers and a buffer may span several extents, so both types
//! hand out a byte range of the request as the list of buffer pieces it falls in.

use std::io::{IoSlice, IoSliceMut};

/// The buffers of a vectored read, handed out front to back as consecutive byte runs.
pub(super) struct Scatter<'a> {
    /// What is still to be filled, in reverse order: the next byte is the first of the last slice.
    rest: Vec<&'a mut [u8]>,
    len: u64,
}

impl<'a> Scatter<'a> {
    /// The buffers of a vectored request.
    pub(super) fn new(bufs: &'a mut [IoSliceMut<'_>]) -> Self {
        let mut rest: Vec<&'a mut [u8]> = bufs.iter_mut().map(|b| &mut **b).filter(|b| !b.is_empty()).collect();
        rest.reverse();
        let len = rest.iter().map(|b| b.len() as u64).sum();
        Scatter { rest, len }
    }

    /// A request of one buffer.
    pub(super) fn one(buf: &'a mut [u8]) -> Self {
        let len = buf.len() as u64;
        Scatter { rest: if buf.is_empty() { Vec::new() } else { vec![buf] }, len }
    }

    /// Bytes not yet handed out.
    pub(super) fn len(&self) -> u64 {
        self.len
    }

    /// The length of the first buffer that is not a multiple of `unit`, if any.
    pub(super) fn misfit(&self, unit: usize) -> Option<usize> {
        self.rest.iter().map(|b| b.len()).find(|len| len % unit.max(1) != 0)
    }

    /// The pieces of the next `len` bytes, in order; fewer bytes when fewer are left.
    pub(super) fn take(&mut self, len: u64) -> Vec<&'a mut [u8]> {
        let mut want = usize::try_from(len).unwrap_or(usize::MAX);
        let mut out = Vec::new();
        while want > 0 {
            let Some(buf) = self.rest.pop() else { break };
            if buf.len() <= want {
                want -= buf.len();
                self.len = self.len.saturating_sub(buf.len() as u64);
                out.push(buf);
            } else {
                let (head, tail) = buf.split_at_mut(want);
                self.len = self.len.saturating_sub(want as u64);
                want = 0;
                out.push(head);
                self.rest.push(tail);
            }
        }
        out
    }
}

/// Copies `src` into `pieces`, front to back, until either runs out.
pub(super) fn scatter_from(pieces: &mut [&mut [u8]], mut src: &[u8]) {
    for piece in pieces.iter_mut() {
        let n = piece.len().min(src.len());
        let (now, later) = src.split_at(n);
        if let Some(dst) = piece.get_mut(..n) {
            dst.copy_from_slice(now);
        }
        src = later;
    }
}

/// The buffers of a vectored write, any byte range of which can be looked at.
pub(super) struct Gather<'a> {
    bufs: Vec<&'a [u8]>,
    /// Where each buffer starts in the request.
    starts: Vec<u64>,
    len: u64,
}

impl<'a> Gather<'a> {
    /// The buffers of a vectored request.
    pub(super) fn new(bufs: &'a [IoSlice<'_>]) -> Self {
        Self::from_slices(bufs.iter().map(|b| &**b))
    }

    /// A request of one buffer.
    pub(super) fn one(buf: &'a [u8]) -> Self {
        Self::from_slices(std::iter::once(buf))
    }

    fn from_slices(slices: impl Iterator<Item = &'a [u8]>) -> Self {
        let bufs: Vec<&'a [u8]> = slices.filter(|b| !b.is_empty()).collect();
        let mut starts = Vec::with_capacity(bufs.len());
        let mut len = 0u64;
        for buf in &bufs {
            starts.push(len);
            len = len.saturating_add(buf.len() as u64);
        }
        Gather { bufs, starts, len }
    }

    /// Bytes in the request.
    pub(super) fn len(&self) -> u64 {
        self.len
    }

    /// The length of the first buffer that is not a multiple of `unit`, if any.
    pub(super) fn misfit(&self, unit: usize) -> Option<usize> {
        self.bufs.iter().map(|b| b.len()).find(|len| len % unit.max(1) != 0)
    }

    /// The pieces holding bytes `lo..hi` of the request, in order (clipped to the request).
    pub(super) fn range(&self, lo: u64, hi: u64) -> Vec<&'a [u8]> {
        let hi = hi.min(self.len);
        let mut out = Vec::new();
        if lo >= hi {
            return out;
        }
        // The buffer holding `lo`: the last one starting at or before it.
        let first = self.starts.partition_point(|&s| s <= lo).saturating_sub(1);
        for (buf, &start) in self.bufs.iter().zip(&self.starts).skip(first) {
            if start >= hi {
                break;
            }
            let from = usize::try_from(lo.saturating_sub(start)).unwrap_or(usize::MAX);
            let to = usize::try_from(hi - start).unwrap_or(usize::MAX).min(buf.len());
            if let Some(piece) = buf.get(from..to) {
                if !piece.is_empty() {
                    out.push(piece);
                }
            }
        }
        out
    }

    /// Copies bytes `lo..lo + dst.len()` of the request into `dst`.
    pub(super) fn copy_to(&self, lo: u64, mut dst: &mut [u8]) {
        for piece in self.range(lo, lo.saturating_add(dst.len() as u64)) {
            let n = piece.len().min(dst.len());
            let (now, later) = std::mem::take(&mut dst).split_at_mut(n);
            if let Some(src) = piece.get(..now.len()) {
                now.copy_from_slice(src);
            }
            dst = later;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn scatter_hands_out_runs_across_buffers() {
        let (mut a, mut b, mut c) = ([0u8; 3], [0u8; 0], [0u8; 5]);
        let mut bufs = [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b), IoSliceMut::new(&mut c)];
        let mut s = Scatter::new(&mut bufs);
        assert_eq!(s.len(), 8);
        assert_eq!(s.misfit(1), None);
        let mut first = s.take(4);
        assert_eq!(first.iter().map(|p| p.len()).collect::<Vec<_>>(), vec![3, 1]);
        scatter_from(&mut first, &[1, 2, 3, 4]);
        let mut second = s.take(10);
        assert_eq!(second.iter().map(|p| p.len()).collect::<Vec<_>>(), vec![4]);
        scatter_from(&mut second, &[5, 6, 7, 8]);
        assert_eq!(s.len(), 0);
        assert!(s.take(1).is_empty());
        assert_eq!(a, [1, 2, 3]);
        assert_eq!(c, [4, 5, 6, 7, 8]);
    }

    #[test]
    fn gather_finds_any_range() {
        let bufs = [IoSlice::new(&[1, 2]), IoSlice::new(&[]), IoSlice::new(&[3, 4, 5]), IoSlice::new(&[6])];
        let g = Gather::new(&bufs);
        assert_eq!(g.len(), 6);
        assert_eq!(g.misfit(2), Some(3));
        assert_eq!(g.range(1, 5), vec![&[2][..], &[3, 4, 5][..]]);
        assert_eq!(g.range(2, 3), vec![&[3][..]]);
        assert_eq!(g.range(5, 99), vec![&[6][..]]);
        assert!(g.range(3, 3).is_empty());
        let mut out = [0u8; 4];
        g.copy_to(1, &mut out);
        assert_eq!(out, [2, 3, 4, 5]);
    }
}
