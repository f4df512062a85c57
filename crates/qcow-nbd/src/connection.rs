//! One client connection: the handshake, then the transmission phase with many requests in flight.
//!
//! The connection's own thread reads requests (and write payloads) and queues them; a fixed set of worker
//! threads run them against the shared export and queue each reply as soon as it is ready, and a writer thread
//! sends them, so replies go out of order. The queue is bounded, which bounds the memory one client can pin and gives it back-pressure.

use std::io::BufReader;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Mutex;

use crate::error::Result;
use crate::execute::execute;
use crate::export::Export;
use crate::handshake::{negotiate, ExportDesc, Outcome, Session};
use crate::meta::MetaContext;
use crate::proto::errno::EINVAL;
use crate::proto::{NBD_CMD_READ, NBD_CMD_WRITE};
use crate::reply::Replies;
use crate::request::{check, read_header, read_payload, Command, Limits};
use crate::stream::Stream;

/// Requests read but not yet picked up by a worker.
const QUEUE_DEPTH: usize = 128;
/// Buffered bytes on the request side: several small requests arrive in one system call.
const READ_BUFFER: usize = 256 << 10;

/// How a connection is served.
#[derive(Debug, Clone)]
pub struct ConnectionConfig {
    /// What the handshake describes.
    pub desc: ExportDesc,
    /// Worker threads per connection: requests run concurrently up to this many.
    pub workers: usize,
}

/// Serves one client until it disconnects, breaks the protocol, or the server stops reading from it.
///
/// # Errors
/// Socket failures and protocol violations; either ends only this connection.
pub fn serve<E: Export + ?Sized>(
    export: &E,
    stream: Stream,
    config: &ConnectionConfig,
    stopping: &AtomicBool,
) -> Result<()> {
    stream.set_nodelay()?;
    let mut reader = BufReader::with_capacity(READ_BUFFER, stream.try_clone()?);
    let mut writer = stream.try_clone()?;
    let session = match negotiate(&mut reader, &mut writer, &config.desc, stopping)? {
        Outcome::Transmission(session) => session,
        Outcome::Closed => return Ok(()),
    };
    tracing::debug!(structured = session.structured, contexts = session.contexts.len(), "transmission");
    let replies = Replies::new(writer, session.structured);
    let limits =
        Limits { size: config.desc.size, read_only: config.desc.flags & crate::proto::NBD_FLAG_READ_ONLY != 0 };
    transmission(export, &mut reader, &replies, limits, &session, config.workers.max(1))
}

/// A request on its way to a worker.
struct Job {
    cookie: u64,
    command: Command,
}

fn transmission<E: Export + ?Sized>(
    export: &E,
    reader: &mut BufReader<Stream>,
    replies: &Replies,
    limits: Limits,
    session: &Session,
    workers: usize,
) -> Result<()> {
    let (tx, rx) = sync_channel::<Job>(QUEUE_DEPTH);
    let rx = Mutex::new(rx);
    std::thread::scope(|scope| {
        scope.spawn(|| replies.run_writer());
        let contexts = session.contexts.as_slice();
        let workers: Vec<_> = (0..workers).map(|_| scope.spawn(|| work(export, &rx, replies, contexts))).collect();
        let result = read_requests(reader, replies, limits, session, &tx);
        // The workers drain what is queued and stop once the sender is gone; then the writer sends the last
        // replies and stops.
        drop(tx);
        for worker in workers {
            if worker.join().is_err() {
                tracing::error!("a request worker panicked");
            }
        }
        replies.close();
        result
    })
}

/// Reads requests and queues them for the workers until the client disconnects or breaks the protocol.
fn read_requests(
    reader: &mut BufReader<Stream>,
    replies: &Replies,
    limits: Limits,
    session: &Session,
    tx: &SyncSender<Job>,
) -> Result<()> {
    while let Some(header) = read_header(reader)? {
        let data = read_payload(reader, &header, replies.pool())?;
        let moves = if matches!(header.kind, NBD_CMD_READ | NBD_CMD_WRITE) { u64::from(header.length) } else { 0 };
        match check(&header, data, limits, session) {
            Ok(Command::Disconnect) => return Ok(()),
            Ok(command) => {
                replies.admit(moves);
                if tx.send(Job { cookie: header.cookie, command }).is_err() || replies.is_broken() {
                    return Ok(());
                }
            }
            Err(errno) => {
                let message = format!(
                    "request type {} flags {:#x} offset {:#x} length {} refused",
                    header.kind, header.flags, header.offset, header.length
                );
                if errno == EINVAL {
                    tracing::debug!("{message}");
                }
                replies.admit(0);
                replies.error(header.cookie, errno, &message, 0);
            }
        }
    }
    Ok(())
}

fn work<E: Export + ?Sized>(export: &E, rx: &Mutex<Receiver<Job>>, replies: &Replies, contexts: &[MetaContext]) {
    loop {
        let job = {
            let rx = rx.lock().unwrap_or_else(|e| e.into_inner());
            rx.recv()
        };
        let Ok(job) = job else { return };
        execute(export, replies, job.cookie, job.command, contexts);
    }
}
