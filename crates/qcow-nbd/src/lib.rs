//! A Network Block Device server for qcow2 images and other block devices.
//!
//! It serves one [`Export`] (a qcow2 [`qcow::Image`] through the engine, with its backing chain and compressed
//! clusters; a raw [`qcow::block::FileDevice`]; or any [`qcow::block::BlockDevice`] wrapped in [`AllData`]) to
//! any client that speaks NBD: QEMU, the kernel's `nbd-client`, libnbd's tools, fio.
//!
//! The protocol is written here rather than taken from a crate because no permissively licensed Rust NBD server
//! with structured replies, metadata contexts and out-of-order replies exists; the protocol is small and its
//! specification (doc/proto.md of the NetworkBlockDevice project) precise, and the names in [`proto`] are its
//! names.
//!
//! What is spoken: fixed newstyle handshake with `NBD_OPT_GO`, `INFO`, `LIST`, `ABORT`, `EXPORT_NAME`,
//! `STRUCTURED_REPLY`, `LIST_META_CONTEXT` and `SET_META_CONTEXT` (several contexts at once: `base:allocation`,
//! QEMU's `qemu:allocation-depth` and `qemu:dirty-bitmap:NAME`, with QEMU's query rules, see [`meta`]); commands
//! `READ`, `WRITE` (with FUA), `FLUSH`, `TRIM`, `WRITE_ZEROES` (with `NO_HOLE`), `BLOCK_STATUS` (one chunk per
//! selected context, `REQ_ONE` honoured for each) and `DISC`. Not spoken: TLS, extended headers,
//! `NBD_CMD_CACHE`/`RESIZE`, I/O smaller than 512 bytes (the minimum block size advertised).
//!
//! Threads, not async: each connection reads requests on its own thread, runs them on a small pool of workers
//! (the engine's I/O is blocking positional I/O anyway), and a writer thread sends the replies as they finish,
//! batched into one vectored write per burst. Requests and bytes in flight are bounded per connection.
//!
//! Layout: [`proto`] (the specification's numbers), [`handshake`] (option haggling), [`meta`] (metadata contexts
//! and how queries select them), [`request`] (reading and checking requests), [`status`] (block status
//! descriptors per context), [`reply`] (encoding, queueing and sending replies), `execute` (running a request),
//! `connection` (one client's threads), `buffers` (reused big buffers), [`server`] (listening, limits,
//! stopping), [`export`] (what can be served), [`metrics`] (the Prometheus endpoint).
#![warn(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
#![forbid(unsafe_code)]

mod buffers;
mod connection;
pub mod error;
mod execute;
pub mod export;
pub mod handshake;
pub mod meta;
pub mod metrics;
pub mod proto;
pub mod reply;
pub mod request;
pub mod server;
pub mod status;
mod stream;
mod wire;

pub use error::{Error, Result};
pub use export::{AllData, Allocation, Export};
pub use meta::MetaContext;
pub use metrics::MetricsServer;
pub use server::{Bind, Handle, Server, ServerConfig};
pub use stream::Stream;
