//! The background worker: a thread that wakes every tick and does one reclaim pass: erase junk until
//! `keep_erased` clusters are ready, compact once `compact_after_unmaps` sectors have been discarded and the
//! discards have settled for a tick, give a free tail back, and flush a while after the first unflushed change
//! unless a flush came first. It holds only a weak reference to the image, so dropping the image ends it, and
//! disconnecting or closing the image stops and joins it.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use super::super::Image;
use super::OnlineCompaction;
use crate::block::BlockDevice;
use crate::error::{Error, Result};

/// How the background reclaimer paces itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReclaimerOptions {
    /// How often the worker wakes up to look for work.
    pub tick: Duration,
    /// How long after the first unflushed change the worker flushes, unless a flush came first.
    pub flush_delay: Duration,
    /// Clusters moved per round of online compaction.
    pub moves_per_round: u64,
    /// Junk clusters erased per pass, at most.
    pub erase_per_pass: u64,
}

impl Default for ReclaimerOptions {
    fn default() -> Self {
        ReclaimerOptions {
            tick: Duration::from_millis(200),
            flush_delay: Duration::from_secs(5),
            moves_per_round: 1024,
            erase_per_pass: 4096,
        }
    }
}

/// What one reclaim pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReclaimPass {
    /// Junk clusters erased.
    pub erased: u64,
    /// Whether the pass flushed the image.
    pub flushed: bool,
    /// What compaction did, when the pass compacted.
    pub compaction: Option<OnlineCompaction>,
}

/// What the reclaimer remembers between passes.
#[derive(Debug, Default)]
pub(crate) struct ReclaimMemo {
    /// Bytes discarded as of the previous pass: unchanged means the discards have settled.
    discarded_seen: u64,
    /// Bytes discarded as of the last compaction.
    compacted_at: u64,
}

#[derive(Default)]
struct Control {
    stop: Mutex<bool>,
    wake: Condvar,
}

impl Control {
    fn flag(&self) -> MutexGuard<'_, bool> {
        self.stop.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stopped(&self) -> bool {
        *self.flag()
    }
}

/// A running worker, kept by the image.
pub(crate) struct WorkerSlot {
    control: Arc<Control>,
    thread: Option<JoinHandle<()>>,
}

impl<D: BlockDevice> Image<D> {
    /// One pass of the reclaimer's work, as the background worker does it every tick; tests and embedders that
    /// want no thread may call it themselves. `stop` is polled between steps of a compaction.
    ///
    /// # Errors
    /// `ReadOnly`, `Disconnected`, `Untrusted` when the refcounts cannot be trusted to say what is free (nothing
    /// was changed), `Corrupt`, `Io`.
    pub fn reclaim_pass(&self, options: &ReclaimerOptions, stop: &dyn Fn() -> bool) -> Result<ReclaimPass> {
        self.observe(self.pass(options, stop))
    }

    fn pass(&self, options: &ReclaimerOptions, stop: &dyn Fn() -> bool) -> Result<ReclaimPass> {
        self.check_writable("reclaim")?;
        let trusted = self.trust_refcounts("reclaim")?;
        let mut pass = ReclaimPass::default();
        let (erasing, erased, available, _) = self.meta().reclaim.counts();
        let ready = erasing + erased + available;
        if self.config.keep_erased > ready {
            pass.erased = self.erase_junk((self.config.keep_erased - ready).min(options.erase_per_pass))?;
        }
        let discarded = self.counters.discarded_bytes.load(Ordering::Relaxed);
        let due = {
            let mut memo = self.reclaim_memo.lock().unwrap_or_else(|e| e.into_inner());
            let settled = discarded == memo.discarded_seen;
            memo.discarded_seen = discarded;
            let threshold = self.config.compact_after_unmaps.saturating_mul(512);
            threshold > 0 && settled && discarded.saturating_sub(memo.compacted_at) >= threshold
        };
        if due {
            let mut total = OnlineCompaction { old_size: self.dev.info().size_bytes(), ..Default::default() };
            while !stop() {
                let round = self.compact_online(options.moves_per_round, stop)?;
                total.moved += round.moved;
                total.cancelled += round.cancelled;
                total.new_size = round.new_size;
                if round.moved == 0 {
                    break;
                }
            }
            self.reclaim_memo.lock().unwrap_or_else(|e| e.into_inner()).compacted_at = discarded;
            pass.compaction = Some(total);
        } else {
            let _resize = self.resize.read().unwrap_or_else(|e| e.into_inner());
            let mut m = self.meta();
            let trusted = m.still_trusted(trusted)?;
            m.trim_file(&self.dev, trusted)?;
        }
        let since = self.unflushed_since.load(Ordering::Acquire);
        if since != 0 && self.clock_ms().saturating_sub(since) >= options.flush_delay.as_millis() as u64 {
            self.flush()?;
            pass.flushed = true;
        }
        Ok(pass)
    }

    /// Milliseconds since the image was opened, plus one (so that 0 can mean "never").
    pub(in crate::image) fn clock_ms(&self) -> u64 {
        self.opened.elapsed().as_millis() as u64 + 1
    }

    /// Something changed that a flush would make durable.
    pub(in crate::image) fn note_unflushed(&self) {
        if self.unflushed_since.load(Ordering::Relaxed) == 0 {
            let _ = self.unflushed_since.compare_exchange(0, self.clock_ms(), Ordering::AcqRel, Ordering::Relaxed);
        }
    }

    /// Stops the background worker without waiting for it, keeping `why` as the reason it stopped: its current
    /// step ends, and every step that would give space back refuses from now on anyway.
    pub(in crate::image) fn halt_reclaimer(&self, why: &Error) {
        let slot = self.reclaimer.lock().unwrap_or_else(|e| e.into_inner());
        let Some(worker) = slot.as_ref() else { return };
        let mut stop = worker.control.flag();
        if !*stop {
            let mut error = self.reclaimer_error.lock().unwrap_or_else(|e| e.into_inner());
            error.get_or_insert_with(|| why.to_string());
            *stop = true;
            worker.control.wake.notify_all();
        }
    }

    /// Why the background worker stopped on its own, if it did.
    pub fn reclaimer_error(&self) -> Option<String> {
        self.reclaimer_error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether a background worker is running.
    pub fn reclaimer_running(&self) -> bool {
        self.reclaimer.lock().unwrap_or_else(|e| e.into_inner()).as_ref().is_some_and(|w| !w.control.stopped())
    }

    /// Stops the background worker, if one runs, and waits for it to finish its pass. Disconnecting, closing
    /// and dropping the image do this too.
    pub fn stop_reclaimer(&self) {
        let slot = self.reclaimer.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(mut slot) = slot else { return };
        *slot.control.flag() = true;
        slot.control.wake.notify_all();
        if let Some(thread) = slot.thread.take() {
            // The worker itself may drop the last reference to the image; it then ends on its own.
            if thread.thread().id() != std::thread::current().id() {
                let _ = thread.join();
            }
        }
    }
}

impl<D: BlockDevice + 'static> Image<D> {
    /// Starts the background reclaimer. It runs until [`stop_reclaimer`](Self::stop_reclaimer), a disconnect,
    /// the image being dropped, or an error (see [`reclaimer_error`](Self::reclaimer_error)).
    ///
    /// The reclaimer gives space back by refcount, so unless something showed them trustworthy already this
    /// session, the refcounts are judged first (a check of the whole metadata, guest I/O waiting meanwhile), and
    /// an image whose refcounts cannot be trusted is refused before anything changes.
    ///
    /// # Errors
    /// `ReadOnly`, `Disconnected`, `Corrupt` (the image refuses writes), `Untrusted` (repair the image first),
    /// `InvalidArgument` when one already runs, `Io` when the thread cannot be started.
    pub fn start_reclaimer(self: &Arc<Self>, options: ReclaimerOptions) -> Result<()> {
        self.check_writable("reclaim")?;
        self.trust_refcounts("reclaim")?;
        let mut slot = self.reclaimer.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_some() {
            return Err(Error::invalid("reclaim", "the background reclaimer is already running"));
        }
        let control = Arc::new(Control::default());
        let weak = Arc::downgrade(self);
        let thread = std::thread::Builder::new()
            .name("qcow-reclaim".into())
            .spawn({
                let control = control.clone();
                move || run(weak, control, options)
            })
            .map_err(|e| Error::io("start the reclaimer thread", 0, e))?;
        *slot = Some(WorkerSlot { control, thread: Some(thread) });
        Ok(())
    }
}

fn run<D: BlockDevice>(weak: Weak<Image<D>>, control: Arc<Control>, options: ReclaimerOptions) {
    loop {
        {
            let stop = control.flag();
            if *stop {
                return;
            }
            let (stop, _) = control.wake.wait_timeout(stop, options.tick).unwrap_or_else(|e| e.into_inner());
            if *stop {
                return;
            }
        }
        let Some(image) = weak.upgrade() else { return };
        if let Err(e) = image.reclaim_pass(&options, &|| control.stopped()) {
            if !control.stopped() {
                *image.reclaimer_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
            }
            *control.flag() = true;
            return;
        }
    }
}
