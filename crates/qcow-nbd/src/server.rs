//! The listening side: accepting clients (TCP or Unix socket) up to a limit, a thread per client, and a clean
//! stop that lets in-flight requests finish and flushes the export.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use crate::connection::{self, ConnectionConfig};
use crate::export::Export;
use crate::handshake::ExportDesc;
use crate::proto::*;
use crate::stream::Stream;

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bind {
    /// A TCP address; port 0 picks a free port (see [`Server::local_addr`]).
    Tcp(SocketAddr),
    /// A Unix-domain socket path; the file must not exist yet, and is removed when the server stops.
    Unix(PathBuf),
}

impl std::fmt::Display for Bind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Bind::Tcp(addr) => write!(f, "{addr}"),
            Bind::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// How the server behaves.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The export's name (the empty name selects it too).
    pub export_name: String,
    /// Refuse writes, trims and write-zeroes with EPERM, and advertise `NBD_FLAG_READ_ONLY`.
    pub read_only: bool,
    /// Clients served at once; further clients wait in the listen queue until one leaves.
    pub max_connections: usize,
    /// Requests of one connection that run concurrently.
    pub workers: usize,
    /// Dirty bitmaps offered as `qemu:dirty-bitmap:NAME` contexts (qemu-nbd's `-B`), in this order; each must be
    /// one the export has ([`Export::has_bitmap`]). A name given twice is offered once.
    pub bitmaps: Vec<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            export_name: String::new(),
            read_only: false,
            max_connections: 1,
            workers: 4,
            bitmaps: Vec::new(),
        }
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

/// State shared by the accept loop, the connection threads and [`Handle`]s.
struct Shared {
    stopping: AtomicBool,
    /// Open connections, so a stop can end their reading.
    conns: Mutex<HashMap<u64, Stream>>,
    /// Signalled when a connection ends or the server stops.
    changed: Condvar,
    /// Where to connect to wake a blocked accept.
    wake: Bind,
}

/// An NBD server for one export.
pub struct Server<E: Export> {
    export: Arc<E>,
    listener: Listener,
    config: ServerConfig,
    shared: Arc<Shared>,
}

/// Stops a running server from another thread (a signal handler thread, a test).
#[derive(Clone)]
pub struct Handle {
    shared: Arc<Shared>,
}

impl Handle {
    /// Stops accepting, stops reading requests from every client, and lets [`Server::run`] return once the
    /// requests in flight are answered and the export is flushed.
    pub fn shutdown(&self) {
        self.shared.stopping.store(true, Ordering::Release);
        for stream in self.shared.conns.lock().unwrap_or_else(|e| e.into_inner()).values() {
            stream.shutdown_read();
        }
        self.shared.changed.notify_all();
        // Wakes the accept loop; if the connection fails, the listener is already gone.
        let _ = match &self.shared.wake {
            Bind::Tcp(addr) => TcpStream::connect(addr).map(drop),
            Bind::Unix(path) => UnixStream::connect(path).map(drop),
        };
    }
}

impl<E: Export> Server<E> {
    /// Binds the listening socket. The export is shared by every connection, which is what makes
    /// `NBD_FLAG_CAN_MULTI_CONN` true: a flush on one connection flushes what all of them wrote.
    ///
    /// # Errors
    /// `NotFound` for a bitmap of the config the export does not have, in qemu-nbd's words ("Bitmap 'NAME' is not
    /// found"), `InvalidInput` for one whose context name would be longer than the protocol allows; the address
    /// cannot be bound (in use, no permission), or the socket path exists.
    pub fn bind(export: Arc<E>, bind: &Bind, mut config: ServerConfig) -> io::Result<Self> {
        config.bitmaps = offered_bitmaps(&*export, &config.bitmaps)?;
        let (listener, wake) = match bind {
            Bind::Tcp(addr) => {
                let l = TcpListener::bind(addr)?;
                let mut local = l.local_addr()?;
                if local.ip().is_unspecified() {
                    local.set_ip(if local.is_ipv4() { Ipv4Addr::LOCALHOST.into() } else { Ipv6Addr::LOCALHOST.into() });
                }
                (Listener::Tcp(l), Bind::Tcp(local))
            }
            Bind::Unix(path) => (Listener::Unix(UnixListener::bind(path)?, path.clone()), Bind::Unix(path.clone())),
        };
        let shared = Arc::new(Shared {
            stopping: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
            changed: Condvar::new(),
            wake,
        });
        Ok(Server { export, listener, config, shared })
    }

    /// Where the server actually listens (with the port filled in when port 0 was asked for).
    pub fn local_addr(&self) -> io::Result<Bind> {
        match &self.listener {
            Listener::Tcp(l) => l.local_addr().map(Bind::Tcp),
            Listener::Unix(_, path) => Ok(Bind::Unix(path.clone())),
        }
    }

    /// A handle that stops the server.
    pub fn handle(&self) -> Handle {
        Handle { shared: Arc::clone(&self.shared) }
    }

    /// What the handshake tells clients.
    fn desc(&self) -> ExportDesc {
        let info = self.export.info();
        let read_only = self.config.read_only || !info.read_write;
        let mut flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA;
        if read_only {
            flags |= NBD_FLAG_READ_ONLY;
        } else {
            flags |= NBD_FLAG_SEND_WRITE_ZEROES;
            if self.export.can_trim() {
                flags |= NBD_FLAG_SEND_TRIM;
            }
        }
        // Every connection works on the same export object, so flushes and FUA writes are seen by all.
        if self.config.max_connections > 1 {
            flags |= NBD_FLAG_CAN_MULTI_CONN;
        }
        ExportDesc {
            name: self.config.export_name.clone(),
            size: info.size_bytes(),
            flags,
            bitmaps: self.config.bitmaps.clone(),
        }
    }

    /// Accepts and serves clients until [`Handle::shutdown`]; then waits for every connection to finish and
    /// flushes the export.
    ///
    /// # Errors
    /// Accepting fails for a reason other than a transient one, or the final flush fails.
    pub fn run(self) -> io::Result<()> {
        let config = ConnectionConfig { desc: self.desc(), workers: self.config.workers };
        let next_id = AtomicU64::new(0);
        let result = std::thread::scope(|scope| -> io::Result<()> {
            loop {
                if !self.wait_for_slot() {
                    return Ok(());
                }
                let stream = match self.accept() {
                    Ok(stream) => stream,
                    Err(e) if transient(&e) => {
                        tracing::warn!(error = %e, "accept failed");
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                if self.shared.stopping.load(Ordering::Acquire) {
                    return Ok(());
                }
                let id = next_id.fetch_add(1, Ordering::Relaxed);
                let peer = stream.peer();
                let Ok(registered) = stream.try_clone() else {
                    tracing::warn!(peer, "could not duplicate the client socket; dropping the client");
                    continue;
                };
                self.shared.conns.lock().unwrap_or_else(|e| e.into_inner()).insert(id, registered);
                // A stop that began after the check above did not see this connection: end its reading here.
                if self.shared.stopping.load(Ordering::Acquire) {
                    stream.shutdown_read();
                }
                tracing::info!(peer, id, "client connected");
                let (export, config, shared) = (&*self.export, &config, &*self.shared);
                scope.spawn(move || {
                    match connection::serve(export, stream, config, &shared.stopping) {
                        Ok(()) => tracing::info!(peer, id, "client disconnected"),
                        Err(e) if e.is_disconnect() => tracing::info!(peer, id, "client went away"),
                        Err(e) => tracing::warn!(peer, id, error = %e, "client dropped"),
                    }
                    shared.conns.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
                    shared.changed.notify_all();
                });
            }
        });
        if let Listener::Unix(_, path) = &self.listener {
            remove_socket(path);
        }
        let flushed = self.export.flush().map_err(io::Error::other);
        tracing::info!("server stopped; export flushed");
        result.and(flushed)
    }

    /// Waits until fewer than the maximum number of clients are connected; false when the server is stopping.
    fn wait_for_slot(&self) -> bool {
        let mut conns = self.shared.conns.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if self.shared.stopping.load(Ordering::Acquire) {
                return false;
            }
            if conns.len() < self.config.max_connections.max(1) {
                return true;
            }
            conns = self.shared.changed.wait(conns).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn accept(&self) -> io::Result<Stream> {
        match &self.listener {
            Listener::Tcp(l) => l.accept().map(|(s, _)| Stream::Tcp(s)),
            Listener::Unix(l, _) => l.accept().map(|(s, _)| Stream::Unix(s)),
        }
    }
}

/// The bitmaps to offer: each of `names` once, in order, if the export has them all.
fn offered_bitmaps<E: Export + ?Sized>(export: &E, names: &[String]) -> io::Result<Vec<String>> {
    let mut out: Vec<String> = Vec::with_capacity(names.len());
    for name in names {
        if !export.has_bitmap(name) {
            return Err(io::Error::new(io::ErrorKind::NotFound, format!("Bitmap '{name}' is not found")));
        }
        if QEMU_DIRTY_BITMAP.len() + name.len() > NBD_MAX_STRING_SIZE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bitmap name of {} bytes is too long for an NBD context name", name.len()),
            ));
        }
        if !out.contains(name) {
            out.push(name.clone());
        }
    }
    Ok(out)
}

/// Errors after which accepting can go on: a client that reset before being accepted, or a momentary lack of
/// file descriptors or memory.
fn transient(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset | io::ErrorKind::Interrupted)
        || matches!(e.raw_os_error(), Some(23 | 24 | 12 | 105)) // ENFILE, EMFILE, ENOMEM, ENOBUFS
}

fn remove_socket(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        tracing::warn!(path = %path.display(), error = %e, "could not remove the socket file");
    }
}
