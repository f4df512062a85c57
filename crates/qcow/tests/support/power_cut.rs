//! A device that loses power in the middle of an operation, for the power-loss tests of every feature: a
//! `FaultyDevice` over memory that, once armed, loses power at the write (and, where asked, the flush) after the
//! next `n`, keeping the unflushed writes a test's choice picks, and fails that request with `Disconnected`.
//! Included by the test files that need it with `#[path]`.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::sync::{Arc, Mutex};

use qcow::block::{BlockDevice, FaultyDevice, Info, MemoryDevice};

/// Which unflushed writes survive: `keep(i, len)` for entry `i` of a journal of `len` entries.
pub type Keep = Arc<dyn Fn(usize, usize) -> bool + Send + Sync>;

/// See the module docs.
pub struct PowerCut {
    /// The device underneath, for its counters and for power losses a test causes itself.
    pub faulty: FaultyDevice<MemoryDevice>,
    cut: Mutex<Option<(u64, Keep)>>,
    at_flushes: bool,
}

impl PowerCut {
    /// A device holding `bytes`, not armed, that counts only writes as boundaries.
    pub fn new(bytes: Vec<u8>) -> Self {
        PowerCut {
            faulty: FaultyDevice::new(MemoryDevice::from_bytes(bytes)),
            cut: Mutex::new(None),
            at_flushes: false,
        }
    }

    /// Counts flushes as boundaries too, so that the power also goes between a write and the flush after it.
    pub fn cutting_at_flushes(mut self) -> Self {
        self.at_flushes = true;
        self
    }

    /// Loses power at the boundary after the next `after` ones, keeping what `keep` picks.
    pub fn arm(&self, after: u64, keep: impl Fn(usize, usize) -> bool + Send + Sync + 'static) {
        *self.cut.lock().unwrap() = Some((after, Arc::new(keep)));
    }

    /// Whether it is armed still (the power has not gone yet).
    pub fn armed(&self) -> bool {
        self.cut.lock().unwrap().is_some()
    }

    /// What the inner device holds: the durable state, after a power loss what survived it.
    pub fn survivor(&self) -> Vec<u8> {
        self.faulty.inner().snapshot()
    }

    /// Loses power here when the armed count has run out.
    fn maybe_cut(&self) -> qcow::Result<()> {
        let mut cut = self.cut.lock().unwrap();
        let Some((left, keep)) = cut.take() else { return Ok(()) };
        if left > 0 {
            *cut = Some((left - 1, keep));
            return Ok(());
        }
        drop(cut);
        let len = self.faulty.pending_writes();
        self.faulty.power_loss(&|i| keep(i, len))?;
        Err(qcow::Error::Disconnected)
    }
}

impl BlockDevice for PowerCut {
    fn info(&self) -> Info {
        self.faulty.info()
    }
    fn read(&self, sector: u64, bufs: &mut [std::io::IoSliceMut<'_>]) -> qcow::Result<()> {
        self.faulty.read(sector, bufs)
    }
    fn write(&self, sector: u64, bufs: &[std::io::IoSlice<'_>]) -> qcow::Result<()> {
        self.maybe_cut()?;
        self.faulty.write(sector, bufs)
    }
    fn flush(&self) -> qcow::Result<()> {
        if self.at_flushes {
            self.maybe_cut()?;
        }
        self.faulty.flush()
    }
    fn resize(&self, sectors: u64) -> qcow::Result<()> {
        self.faulty.resize(sectors)
    }
    fn discard(&self, sector: u64, count: u64) -> qcow::Result<()> {
        self.faulty.discard(sector, count)
    }
    fn disconnect(&self) {
        self.faulty.disconnect()
    }
}
