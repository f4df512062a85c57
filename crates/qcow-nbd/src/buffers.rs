//! Reusing the big buffers of one connection: read replies and write payloads. A fresh multi-megabyte
//! allocation is mapped, faulted in and zeroed page by page on every request; a reused one is already there.

use std::sync::Mutex;

/// Buffers smaller than this come from the allocator's own free lists cheaply; only bigger ones are kept.
const MIN_POOLED: usize = 64 << 10;
/// The most bytes kept idle per connection.
const MAX_POOLED_BYTES: usize = 64 << 20;

/// Idle buffers of one connection.
#[derive(Default)]
pub struct BufferPool {
    idle: Mutex<Idle>,
}

#[derive(Default)]
struct Idle {
    buffers: Vec<Vec<u8>>,
    bytes: usize,
}

impl BufferPool {
    /// A buffer of exactly `len` bytes. Its contents are unspecified (earlier data or zeros): callers fill all
    /// of it before anyone reads it.
    pub fn take(&self, len: usize) -> Vec<u8> {
        if len >= MIN_POOLED {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            // The most recently returned buffer is the likeliest to be warm in cache.
            if let Some(mut buf) = idle.buffers.pop() {
                idle.bytes = idle.bytes.saturating_sub(buf.capacity());
                drop(idle);
                if buf.len() >= len {
                    buf.truncate(len);
                } else {
                    buf.resize(len, 0);
                }
                return buf;
            }
        }
        vec![0u8; len]
    }

    /// Returns a buffer for reuse (small ones, and any beyond the pool's budget, are freed).
    pub fn give(&self, mut buf: Vec<u8>) {
        if buf.capacity() < MIN_POOLED {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.bytes.saturating_add(buf.capacity()) <= MAX_POOLED_BYTES {
            idle.bytes += buf.capacity();
            // Keep the full length, so a later take of the same size needs no zeroing.
            let cap = buf.capacity();
            buf.resize(cap, 0);
            idle.buffers.push(buf);
        }
    }
}
