//! Replies: encoding simple replies and structured reply chunks, and the one writer per connection that
//! serialises them onto the socket, whole, in whatever order requests finish.

use std::io::{self, IoSlice, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::buffers::BufferPool;
use crate::proto::*;
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

/// The sending side of one connection. Replies are queued whole; whichever worker finds no send in progress
/// becomes the sender and writes everything queued (its own reply and those that arrived meanwhile) with one
/// vectored write, so replies never interleave and a burst of small replies costs one system call, not one
/// each. Once a write fails the connection is shut down and later replies are dropped.
pub struct Replies {
    stream: Mutex<Stream>,
    pool: BufferPool,
    queue: Mutex<Queue>,
    structured: bool,
    broken: AtomicBool,
}

/// Replies waiting for the sender.
#[derive(Default)]
struct Queue {
    pending: Vec<Vec<u8>>,
    sending: bool,
}

/// At most this many replies go into one vectored write (Linux's IOV_MAX is 1024).
const MAX_BATCH: usize = 512;

impl Replies {
    /// Replies on `stream`, structured if the session negotiated it.
    pub fn new(stream: Stream, structured: bool) -> Self {
        Replies {
            stream: Mutex::new(stream),
            pool: BufferPool::default(),
            queue: Mutex::new(Queue::default()),
            structured,
            broken: AtomicBool::new(false),
        }
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
        self.send(buf.bytes);
    }

    /// Sends success for a request without reply data.
    pub fn done(&self, cookie: u64) {
        let mut out = Vec::with_capacity(20);
        if self.structured {
            chunk_header(&mut out, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, cookie, 0);
        } else {
            simple_header(&mut out, 0, cookie);
        }
        self.send(out);
    }

    /// Sends an error: an `NBD_REPLY_TYPE_ERROR` chunk with `message`, or a simple reply carrying `errno`.
    pub fn error(&self, cookie: u64, errno: u32, message: &str) {
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
        self.send(out);
    }

    /// Sends the block status of one context: (length, flags) descriptors, as one chunk marked done.
    pub fn block_status(&self, cookie: u64, context: u32, descriptors: &[(u32, u32)]) {
        let mut out = Vec::with_capacity(24 + 8 * descriptors.len());
        chunk_header(&mut out, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_BLOCK_STATUS, cookie, 4 + 8 * descriptors.len());
        out.extend_from_slice(&context.to_be_bytes());
        for (len, flags) in descriptors {
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&flags.to_be_bytes());
        }
        self.send(out);
    }

    fn send(&self, bytes: Vec<u8>) {
        if self.is_broken() {
            return;
        }
        let mut batch = {
            let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            queue.pending.push(bytes);
            if queue.sending {
                return;
            }
            queue.sending = true;
            std::mem::take(&mut queue.pending)
        };
        let stream = self.stream.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if !self.is_broken() {
                for chunk in batch.chunks(MAX_BATCH) {
                    if let Err(e) = write_all_vectored(&stream, chunk) {
                        self.fail(&stream, &e);
                        break;
                    }
                }
            }
            for buf in batch.drain(..) {
                self.pool.give(buf);
            }
            let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            if queue.pending.is_empty() {
                queue.sending = false;
                return;
            }
            // Reuse the emptied vector for the next round.
            std::mem::swap(&mut batch, &mut queue.pending);
        }
    }

    fn fail(&self, stream: &Stream, e: &io::Error) {
        if !self.broken.swap(true, Ordering::AcqRel) {
            tracing::debug!(error = %e, "sending a reply failed; closing the connection");
            stream.shutdown();
        }
    }
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
