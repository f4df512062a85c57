//! Replies: encoding simple replies and structured reply chunks, and the one writer per connection that
//! serialises them onto the socket, whole, in whatever order requests finish.

use std::io::{self, IoSlice, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};

use crate::buffers::BufferPool;
use crate::proto::*;
use crate::status::StatusChunk;
use crate::stream::Stream;

/// Bytes before the data of a simple read reply: magic, error, cookie.
const SIMPLE_HEADER: usize = 16;
/// Bytes before the data of a structured `NBD_REPLY_TYPE_OFFSET_DATA` chunk: chunk header and offset.
const OFFSET_DATA_HEADER: usize = 28;

/// A read reply being filled: the data goes straight into the buffer that is sent, behind room for the header.
pub struct ReadBuffer {
    bytes: Vec<u8>,
    header: usize,
}

impl ReadBuffer {
    /// The data part, to read into.
    pub fn data_mut(&mut self) -> &mut [u8] {
        self.bytes.get_mut(self.header..).unwrap_or_default()
    }
}

/// The sending side of one connection. Workers queue replies whole; the connection's writer thread
/// ([`Replies::run_writer`]) sends everything queued with one vectored write, so replies never interleave, a
/// burst of small replies costs one system call, and no worker waits on a slow client's socket. Once a write
/// fails the connection is shut down and later replies are dropped.
pub struct Replies {
    stream: Stream,
    pool: BufferPool,
    queue: Mutex<Queue>,
    /// Signalled when a reply is queued or the connection is closing.
    ready: Condvar,
    /// Signalled when replies have been sent, making room for more requests.
    room: Condvar,
    structured: bool,
    broken: AtomicBool,
}

/// Replies waiting for the writer.
#[derive(Default)]
struct Queue {
    pending: Vec<Vec<u8>>,
    /// No more replies will be queued: the writer exits once the queue is empty.
    closing: bool,
    /// Requests admitted whose replies have not been sent yet, and the bytes they move.
    in_flight: usize,
    in_flight_bytes: u64,
    /// The bytes admitted for the replies in `pending`.
    pending_bytes: u64,
}

/// Requests admitted per connection before the reader waits for replies to go out.
const MAX_IN_FLIGHT: usize = 256;
/// Data bytes (read replies and write payloads) admitted per connection before the reader waits; one request
/// is always admitted, whatever its size.
const MAX_IN_FLIGHT_BYTES: u64 = 128 << 20;

/// At most this many replies go into one vectored write (Linux's IOV_MAX is 1024).
const MAX_BATCH: usize = 512;

impl Replies {
    /// Replies on `stream`, structured if the session negotiated it.
    pub fn new(stream: Stream, structured: bool) -> Self {
        Replies {
            stream,
            pool: BufferPool::default(),
            queue: Mutex::new(Queue::default()),
            ready: Condvar::new(),
            room: Condvar::new(),
            structured,
            broken: AtomicBool::new(false),
        }
    }

    /// Sends queued replies until [`close`](Self::close) is called and the queue is empty. Run it on the
    /// connection's writer thread.
    pub fn run_writer(&self) {
        let mut batch: Vec<Vec<u8>> = Vec::new();
        let mut admitted: u64;
        loop {
            {
                let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
                while queue.pending.is_empty() && !queue.closing {
                    queue = self.ready.wait(queue).unwrap_or_else(|e| e.into_inner());
                }
                if queue.pending.is_empty() {
                    return;
                }
                std::mem::swap(&mut batch, &mut queue.pending);
                admitted = std::mem::take(&mut queue.pending_bytes);
            }
            if !self.is_broken() {
                for chunk in batch.chunks(MAX_BATCH) {
                    if let Err(e) = write_all_vectored(&self.stream, chunk) {
                        self.fail(&e);
                        break;
                    }
                }
            }
            let sent = batch.len();
            for buf in batch.drain(..) {
                self.pool.give(buf);
            }
            let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            queue.in_flight = queue.in_flight.saturating_sub(sent);
            queue.in_flight_bytes = queue.in_flight_bytes.saturating_sub(admitted);
            self.room.notify_all();
        }
    }

    /// Admits a request that moves `bytes` of data, waiting while too many replies are outstanding: a client
    /// that sends requests but does not read replies stops being read, instead of making the server buffer
    /// without bound. Every admitted request must be answered exactly once.
    pub fn admit(&self, bytes: u64) {
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        while queue.in_flight > 0
            && (queue.in_flight >= MAX_IN_FLIGHT || queue.in_flight_bytes.saturating_add(bytes) > MAX_IN_FLIGHT_BYTES)
            && !self.is_broken()
        {
            queue = self.room.wait(queue).unwrap_or_else(|e| e.into_inner());
        }
        queue.in_flight += 1;
        queue.in_flight_bytes = queue.in_flight_bytes.saturating_add(bytes);
    }

    /// Tells the writer that every reply has been queued.
    pub fn close(&self) {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).closing = true;
        self.ready.notify_all();
    }

    /// Whether a reply failed to go out (the client is gone).
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    /// The connection's buffer pool (write payloads come from it too).
    pub fn pool(&self) -> &BufferPool {
        &self.pool
    }

    /// A buffer for a read of `len` bytes.
    pub fn read_buffer(&self, len: usize) -> ReadBuffer {
        let header = if self.structured { OFFSET_DATA_HEADER } else { SIMPLE_HEADER };
        ReadBuffer { bytes: self.pool.take(header + len), header }
    }

    /// Sends a successful read: one `NBD_REPLY_TYPE_OFFSET_DATA` chunk marked done (never fragmented, so
    /// `NBD_CMD_FLAG_DF` is always honoured), or a simple reply followed by the data.
    pub fn read_done(&self, cookie: u64, offset: u64, mut buf: ReadBuffer) {
        let data_len = buf.bytes.len().saturating_sub(buf.header);
        let mut head = Vec::with_capacity(OFFSET_DATA_HEADER);
        if self.structured {
            chunk_header(&mut head, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, cookie, 8 + data_len);
            head.extend_from_slice(&offset.to_be_bytes());
        } else {
            simple_header(&mut head, 0, cookie);
        }
        if let Some(room) = buf.bytes.get_mut(..head.len()) {
            room.copy_from_slice(&head);
        }
        self.send(buf.bytes, data_len as u64);
    }

    /// Sends success for a request without reply data; `admitted` is what [`admit`](Self::admit) was given.
    pub fn done(&self, cookie: u64, admitted: u64) {
        let mut out = Vec::with_capacity(20);
        if self.structured {
            chunk_header(&mut out, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, cookie, 0);
        } else {
            simple_header(&mut out, 0, cookie);
        }
        self.send(out, admitted);
    }

    /// Sends an error: an `NBD_REPLY_TYPE_ERROR` chunk with `message`, or a simple reply carrying `errno`;
    /// `admitted` is what [`admit`](Self::admit) was given.
    pub fn error(&self, cookie: u64, errno: u32, message: &str, admitted: u64) {
        let mut out = Vec::with_capacity(32 + message.len());
        if self.structured {
            // The message field is 16 bits long; a longer message is cut at a character boundary.
            let mut cut = message.len().min(u16::MAX as usize);
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            let text = message.get(..cut).unwrap_or_default();
            chunk_header(&mut out, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, cookie, 6 + text.len());
            out.extend_from_slice(&errno.to_be_bytes());
            out.extend_from_slice(&u16::try_from(text.len()).unwrap_or(0).to_be_bytes());
            out.extend_from_slice(text.as_bytes());
        } else {
            simple_header(&mut out, errno, cookie);
        }
        self.send(out, admitted);
    }

    /// Sends a block status reply: one `NBD_REPLY_TYPE_BLOCK_STATUS` chunk per context, the last marked done,
    /// queued as one buffer (one reply for the in-flight accounting, and never split by other replies).
    pub fn block_status(&self, cookie: u64, chunks: &[StatusChunk]) {
        self.send(encode_block_status(cookie, chunks), 0);
    }

    fn send(&self, bytes: Vec<u8>, admitted: u64) {
        // Queued even when the connection is broken: the writer drops it, and accounts for it.
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        queue.pending.push(bytes);
        queue.pending_bytes = queue.pending_bytes.saturating_add(admitted);
        // Only the first reply of a batch needs to wake the writer; later ones find it awake or about to be.
        if queue.pending.len() == 1 {
            self.ready.notify_one();
        }
    }

    fn fail(&self, e: &io::Error) {
        if !self.broken.swap(true, Ordering::AcqRel) {
            tracing::debug!(error = %e, "sending a reply failed; closing the connection");
            self.stream.shutdown();
            // A reader waiting for room must see the breakage.
            let _queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            self.room.notify_all();
        }
    }
}

/// The chunks of a block status reply: for each context its id and (length, flags) descriptors, in the order
/// given, `NBD_REPLY_FLAG_DONE` on the last only.
pub fn encode_block_status(cookie: u64, chunks: &[StatusChunk]) -> Vec<u8> {
    let size: usize = chunks.iter().map(|c| 24 + 8 * c.descriptors.len()).sum();
    let mut out = Vec::with_capacity(size);
    for (i, chunk) in chunks.iter().enumerate() {
        let flags = if i + 1 == chunks.len() { NBD_REPLY_FLAG_DONE } else { 0 };
        chunk_header(&mut out, flags, NBD_REPLY_TYPE_BLOCK_STATUS, cookie, 4 + 8 * chunk.descriptors.len());
        out.extend_from_slice(&chunk.context.to_be_bytes());
        for (len, flags) in &chunk.descriptors {
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&flags.to_be_bytes());
        }
    }
    out
}

fn simple_header(out: &mut Vec<u8>, errno: u32, cookie: u64) {
    out.extend_from_slice(&NBD_SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&errno.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

fn chunk_header(out: &mut Vec<u8>, flags: u16, kind: u16, cookie: u64, len: usize) {
    out.extend_from_slice(&NBD_STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    // Payloads are bounded by the maximum request size, far below 4 GiB.
    out.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
}

/// Writes every buffer of `bufs`, in order, with as few system calls as the socket allows.
fn write_all_vectored(mut stream: &Stream, bufs: &[Vec<u8>]) -> io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = bufs.iter().map(|b| IoSlice::new(b)).collect();
    let mut rest = slices.as_mut_slice();
    while !rest.is_empty() {
        match stream.write_vectored(rest) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "the client stopped accepting replies")),
            Ok(n) => IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_status_is_one_chunk_per_context_and_only_the_last_is_done() {
        let chunks = [
            StatusChunk { context: 0, descriptors: vec![(4096, 3), (512, 0)] },
            StatusChunk { context: 2, descriptors: vec![(4608, 1)] },
        ];
        let bytes = encode_block_status(0x0102_0304_0506_0708, &chunks);
        let mut expected = Vec::new();
        // Chunk 1: magic, flags 0, type 5, cookie, length 4 + 16, context 0, two descriptors.
        expected.extend_from_slice(&[0x66, 0x8e, 0x33, 0xef, 0, 0, 0, 5, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 20]);
        expected.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 3, 0, 0, 2, 0, 0, 0, 0, 0]);
        // Chunk 2: flags DONE, length 4 + 8, context 2, one descriptor.
        expected.extend_from_slice(&[0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 5, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 12]);
        expected.extend_from_slice(&[0, 0, 0, 2, 0, 0, 0x12, 0, 0, 0, 0, 1]);
        assert_eq!(bytes, expected);
    }
}
