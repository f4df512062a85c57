//! Per-cluster values (reference counts, owners) for a whole image file, kept in pages of [`PAGE`] clusters that
//! are allocated when a cluster in them is first counted.
//!
//! Memory follows what the metadata references, not the file's length: a sparse file of terabytes (or, on file
//! systems that allow it, exbibytes) whose metadata references a few clusters costs a few pages, where one entry
//! per cluster of the file would exhaust memory. Every page is reserved with `try_reserve`, so that running out
//! of memory is an error naming the cluster being counted, not an abort.

use std::collections::BTreeMap;

use crate::error::{Error, Result};

/// Clusters per page: 4 KiB of 32-bit counts.
pub const PAGE: u64 = 1024;

/// One value per cluster of `0..len`, `T::default()` where none was set.
#[derive(Debug, Clone)]
pub struct Paged<T> {
    pages: BTreeMap<u64, Box<[T]>>,
    len: u64,
    /// The cluster whose page could not be allocated, if one could not.
    failed: Option<u64>,
}

impl<T: Copy + Default> Paged<T> {
    /// No value set, covering `len` clusters.
    pub fn new(len: u64) -> Self {
        Paged { pages: BTreeMap::new(), len, failed: None }
    }

    /// Clusters covered.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// The value of `cluster` (the default past the end, or where none was set).
    pub fn get(&self, cluster: u64) -> T {
        let (page, at) = (cluster / PAGE, (cluster % PAGE) as usize);
        self.pages.get(&page).and_then(|p| p.get(at)).copied().unwrap_or_default()
    }

    /// The value of `cluster` to change, covering it from now on (`len` grows to include it); `None` when its page
    /// could not be allocated, which [`Paged::allocated`] reports afterwards.
    pub fn slot(&mut self, cluster: u64) -> Option<&mut T> {
        let (page, at) = (cluster / PAGE, (cluster % PAGE) as usize);
        if !self.pages.contains_key(&page) {
            let mut values = Vec::new();
            if values.try_reserve_exact(PAGE as usize).is_err() {
                self.failed.get_or_insert(cluster);
                return None;
            }
            values.resize(PAGE as usize, T::default());
            self.pages.insert(page, values.into_boxed_slice());
        }
        self.len = self.len.max(cluster.saturating_add(1));
        self.pages.get_mut(&page).and_then(|p| p.get_mut(at))
    }

    /// The first cluster of every allocated page, in order: every cluster holding a value other than the default
    /// lies in one of the pages that start there.
    pub fn page_starts(&self) -> impl Iterator<Item = u64> + '_ {
        self.pages.keys().map(|page| page * PAGE)
    }

    /// Every cluster whose value is not the default, in order, with its value.
    pub fn iter(&self) -> impl Iterator<Item = (u64, T)> + '_
    where
        T: PartialEq,
    {
        self.pages.iter().flat_map(|(page, values)| {
            values
                .iter()
                .enumerate()
                .filter(|(_, v)| **v != T::default())
                .map(move |(i, v)| (page * PAGE + i as u64, *v))
        })
    }

    /// `Ok` when every page asked for was allocated.
    ///
    /// # Errors
    /// `Io` (out of memory) naming the byte offset of the first cluster whose page could not be allocated.
    pub fn allocated(&self, cluster_bits: u32, what: &'static str) -> Result<()> {
        match self.failed {
            None => Ok(()),
            Some(cluster) => Err(Error::io(
                what,
                cluster.checked_shl(cluster_bits).unwrap_or(u64::MAX),
                std::io::Error::new(std::io::ErrorKind::OutOfMemory, "no memory left for the per-cluster counts"),
            )),
        }
    }
}

/// Merges the ranges `[start, start + len)` (given in any order) into sorted, disjoint ranges clipped to
/// `0..limit`.
pub fn merged(mut ranges: Vec<(u64, u64)>, limit: u64) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (start, len) in ranges {
        let end = start.saturating_add(len).min(limit);
        if start >= end {
            continue;
        }
        match out.last_mut() {
            Some((_, last_end)) if start <= *last_end => *last_end = (*last_end).max(end),
            _ => out.push((start, end)),
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn values_live_in_pages_made_on_first_use_and_read_as_default_elsewhere() {
        let mut p: Paged<u32> = Paged::new(1 << 40);
        assert_eq!(p.get(5), 0);
        *p.slot(5).unwrap() += 2;
        *p.slot((1 << 39) + 7).unwrap() = 9;
        assert_eq!((p.get(5), p.get((1 << 39) + 7), p.get(6)), (2, 9, 0));
        assert_eq!(p.page_starts().collect::<Vec<_>>(), vec![0, 1 << 39]);
        assert_eq!(p.iter().collect::<Vec<_>>(), vec![(5, 2), ((1 << 39) + 7, 9)]);
        assert_eq!(p.len(), 1 << 40);
        *p.slot(1 << 40).unwrap() = 1;
        assert_eq!(p.len(), (1 << 40) + 1);
        assert!(p.allocated(16, "count").is_ok());
    }

    #[test]
    fn ranges_merge_sorted_and_clipped() {
        assert_eq!(merged(vec![(10, 5), (0, 3), (2, 4), (14, 10)], 20), vec![(0, 6), (10, 20)]);
        assert_eq!(merged(vec![(30, 5), (u64::MAX - 1, 10)], 20), vec![]);
    }
}
