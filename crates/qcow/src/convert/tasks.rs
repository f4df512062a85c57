//! The chunks a copy works through, in guest order: the source map's data ranges cut at chunk boundaries, and,
//! for a destination that does not read as zeros, the gaps between them to be zeroed.

use std::collections::VecDeque;

use super::map::AllocationMap;
use crate::block::SECTOR_SIZE;
use crate::error::Result;

/// How much of the source is mapped at once, so that the answer stays small and progress moves across large
/// holes. A multiple of every cluster size, so that a cluster never straddles two windows.
const MAP_WINDOW: u64 = 1 << 30;

/// One unit of work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// Read `len` bytes at `offset`, then store what is not zero.
    Copy {
        /// First byte, sector aligned.
        offset: u64,
        /// Bytes, a sector multiple.
        len: u64,
    },
    /// Make `len` bytes at `offset` read as zeros without reading the source.
    Zero {
        /// First byte, sector aligned.
        offset: u64,
        /// Bytes, a sector multiple.
        len: u64,
    },
}

/// Produces [`Task`]s in guest order.
pub struct Tasks<'a> {
    map: &'a dyn AllocationMap,
    size: u64,
    /// `size` rounded up to a sector: the end of every transfer.
    padded: u64,
    chunk: u64,
    /// Ranges are widened outwards to this (a sector, or a cluster when compressing).
    align: u64,
    zero_gaps: bool,
    /// The next window to map.
    window: u64,
    /// Data ranges of the current window not yet cut into tasks, sorted and disjoint.
    ranges: VecDeque<(u64, u64)>,
    /// Everything before this has been handed out.
    covered: u64,
    failed: bool,
}

impl<'a> Tasks<'a> {
    /// Tasks over `0..size` of a source whose data `map` reports. `chunk` and `align` are powers of two, `align`
    /// at most `chunk` and a sector multiple.
    pub fn new(map: &'a dyn AllocationMap, size: u64, padded: u64, chunk: u64, align: u64, zero_gaps: bool) -> Self {
        Tasks {
            map,
            size,
            padded,
            chunk,
            align: align.max(SECTOR_SIZE),
            zero_gaps,
            window: 0,
            ranges: VecDeque::new(),
            covered: 0,
            failed: false,
        }
    }

    /// The next task, `None` at the end (and after an error).
    ///
    /// # Errors
    /// Whatever the map reports.
    pub fn next_task(&mut self) -> Result<Option<Task>> {
        if self.failed {
            return Ok(None);
        }
        loop {
            if let Some(&(start, end)) = self.ranges.front() {
                if self.zero_gaps && self.covered < start {
                    let task = Task::Zero { offset: self.covered, len: start - self.covered };
                    self.covered = start;
                    return Ok(Some(task));
                }
                let stop = (start / self.chunk + 1).saturating_mul(self.chunk).min(end);
                if stop >= end {
                    self.ranges.pop_front();
                } else if let Some(front) = self.ranges.front_mut() {
                    front.0 = stop;
                }
                self.covered = stop;
                return Ok(Some(Task::Copy { offset: start, len: stop - start }));
            }
            if self.window >= self.size {
                if self.zero_gaps && self.covered < self.padded {
                    let task = Task::Zero { offset: self.covered, len: self.padded - self.covered };
                    self.covered = self.padded;
                    return Ok(Some(task));
                }
                return Ok(None);
            }
            let lo = self.window;
            let hi = lo.saturating_add(MAP_WINDOW).min(self.size);
            self.window = hi;
            let ranges = match self.map.data_ranges(lo, hi - lo) {
                Ok(r) => r,
                Err(e) => {
                    self.failed = true;
                    return Err(e);
                }
            };
            self.ranges = self.normalize(ranges, lo, hi);
        }
    }

    /// Clips `ranges` to `lo..hi`, widens them to `align` (never past `padded`, never before `covered`), sorts and
    /// merges them, as `(start, end)`.
    fn normalize(&self, mut ranges: Vec<(u64, u64)>, lo: u64, hi: u64) -> VecDeque<(u64, u64)> {
        ranges.sort_unstable();
        let mut out: VecDeque<(u64, u64)> = VecDeque::with_capacity(ranges.len());
        for (start, len) in ranges {
            let end = start.saturating_add(len).min(hi);
            let start = start.max(lo);
            if start >= end {
                continue;
            }
            let start = (start - start % self.align).max(self.covered);
            let end = end.saturating_add(self.align - 1) / self.align * self.align;
            let end = end.min(self.padded);
            if start >= end {
                continue;
            }
            match out.back_mut() {
                Some(last) if last.1 >= start => last.1 = last.1.max(end),
                _ => out.push_back((start, end)),
            }
        }
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    struct Fixed(Vec<(u64, u64)>);
    impl AllocationMap for Fixed {
        fn data_ranges(&self, _: u64, _: u64) -> Result<Vec<(u64, u64)>> {
            Ok(self.0.clone())
        }
    }

    fn all(tasks: &mut Tasks<'_>) -> Vec<Task> {
        let mut out = Vec::new();
        while let Some(t) = tasks.next_task().unwrap() {
            out.push(t);
        }
        out
    }

    #[test]
    fn ranges_are_cut_at_chunk_boundaries_and_gaps_zeroed_on_request() {
        let map = Fixed(vec![(5000, 10_000), (100, 10), (1 << 20, 3 << 20)]);
        let size = 8 << 20;
        let got = all(&mut Tasks::new(&map, size, size, 2 << 20, 512, false));
        assert_eq!(
            got,
            vec![
                Task::Copy { offset: 0, len: 512 },
                Task::Copy { offset: 4608, len: 15_360 - 4608 },
                Task::Copy { offset: 1 << 20, len: 1 << 20 },
                Task::Copy { offset: 2 << 20, len: 2 << 20 },
            ]
        );
        let got = all(&mut Tasks::new(&map, size, size, 2 << 20, 65536, true));
        assert_eq!(
            got,
            vec![
                Task::Copy { offset: 0, len: 65536 },
                Task::Zero { offset: 65536, len: (1 << 20) - 65536 },
                Task::Copy { offset: 1 << 20, len: 1 << 20 },
                Task::Copy { offset: 2 << 20, len: 2 << 20 },
                Task::Zero { offset: 4 << 20, len: 4 << 20 },
            ]
        );
    }

    #[test]
    fn widening_stops_at_the_padded_end() {
        let map = Fixed(vec![(1000, 10)]);
        let got = all(&mut Tasks::new(&map, 1001, 1024, 1 << 20, 65536, false));
        assert_eq!(got, vec![Task::Copy { offset: 0, len: 1024 }]);
    }
}
