//! The handshake: fixed newstyle greeting, then option haggling until the client picks the export
//! (`NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME`) or leaves.
//!
//! Option errors are answered and haggling goes on, as the specification asks; only things the client MUST NOT
//! do (bad magic, unknown client flags, an unknown export under `NBD_OPT_EXPORT_NAME`, oversized options) end
//! the connection.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Error, Result};
use crate::meta::{self, MetaContext};
use crate::proto::*;
use crate::wire::Cursor;

/// The smallest I/O the export accepts: the engine works in 512-byte sectors.
pub const MIN_BLOCK_SIZE: u32 = 512;
/// The I/O size clients should prefer.
pub const PREFERRED_BLOCK_SIZE: u32 = 4096;
/// The largest read or write payload accepted; larger writes close the connection.
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// The largest option payload read; a longer one is not a real client and closes the connection.
const MAX_OPTION_LEN: u32 = 64 << 10;

/// What the handshake tells clients about the export.
#[derive(Debug, Clone)]
pub struct ExportDesc {
    /// The export's name; the empty name also selects it.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags, without the ones that depend on the negotiation (`NBD_FLAG_SEND_DF`).
    pub flags: u16,
    /// The dirty bitmaps offered as `qemu:dirty-bitmap:NAME` contexts, in the order that fixes their ids.
    pub bitmaps: Vec<String>,
}

impl ExportDesc {
    fn matches(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.name.as_bytes()
    }

    /// The transmission flags for a session.
    pub fn flags_for(&self, structured: bool) -> u16 {
        if structured {
            self.flags | NBD_FLAG_SEND_DF
        } else {
            self.flags
        }
    }
}

/// What the client negotiated, for the transmission phase.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Session {
    /// Replies to reads (and errors) use structured reply chunks.
    pub structured: bool,
    /// The metadata contexts selected, in id order; `NBD_CMD_BLOCK_STATUS` is allowed when there are any, and
    /// answers one chunk for each.
    pub contexts: Vec<MetaContext>,
}

/// How a handshake ended.
#[derive(Debug)]
pub enum Outcome {
    /// The client entered transmission.
    Transmission(Session),
    /// The client aborted, or the server is shutting down.
    Closed,
}

/// Runs the handshake on a fresh connection.
///
/// # Errors
/// Socket failures, and protocol violations that end the connection.
pub fn negotiate(
    reader: &mut impl Read,
    writer: &mut impl Write,
    export: &ExportDesc,
    stopping: &AtomicBool,
) -> Result<Outcome> {
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&NBDMAGIC.to_be_bytes());
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES).to_be_bytes());
    writer.write_all(&greeting)?;
    writer.flush()?;

    let client_flags = read_u32(reader)?;
    if client_flags & !(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES) != 0 {
        return Err(Error::protocol(format!("unknown client flags {client_flags:#x}")));
    }
    let no_zeroes = client_flags & NBD_FLAG_C_NO_ZEROES != 0;
    let mut session = Session::default();

    loop {
        let magic = read_u64(reader)?;
        if magic != IHAVEOPT {
            return Err(Error::protocol(format!("option magic {magic:#x} is not IHAVEOPT")));
        }
        let option = read_u32(reader)?;
        let len = read_u32(reader)?;
        if len > MAX_OPTION_LEN {
            return Err(Error::protocol(format!("option {option} carries {len} bytes (at most {MAX_OPTION_LEN})")));
        }
        let mut data = vec![0u8; len as usize];
        reader.read_exact(&mut data)?;

        if stopping.load(Ordering::Acquire) && option != NBD_OPT_ABORT {
            if option == NBD_OPT_EXPORT_NAME {
                return Ok(Outcome::Closed);
            }
            reply(writer, option, NBD_REP_ERR_SHUTDOWN, b"server shutting down")?;
            continue;
        }

        match option {
            NBD_OPT_EXPORT_NAME => {
                if !export.matches(&data) {
                    return Err(Error::protocol(format!(
                        "NBD_OPT_EXPORT_NAME asked for unknown export {:?}",
                        String::from_utf8_lossy(&data)
                    )));
                }
                let mut out = Vec::with_capacity(134);
                out.extend_from_slice(&export.size.to_be_bytes());
                out.extend_from_slice(&export.flags_for(session.structured).to_be_bytes());
                if !no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                writer.write_all(&out)?;
                writer.flush()?;
                return Ok(Outcome::Transmission(session));
            }
            NBD_OPT_ABORT => {
                // The client may already have closed its end; the ACK is a courtesy.
                let _ = reply(writer, option, NBD_REP_ACK, &[]);
                return Ok(Outcome::Closed);
            }
            NBD_OPT_LIST => {
                if !data.is_empty() {
                    reply(writer, option, NBD_REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")?;
                    continue;
                }
                let mut server = Vec::with_capacity(4 + export.name.len());
                server.extend_from_slice(&len_u32(export.name.len()).to_be_bytes());
                server.extend_from_slice(export.name.as_bytes());
                reply(writer, option, NBD_REP_SERVER, &server)?;
                reply(writer, option, NBD_REP_ACK, &[])?;
            }
            NBD_OPT_INFO | NBD_OPT_GO => {
                if info(writer, option, &data, export, session.structured)? && option == NBD_OPT_GO {
                    return Ok(Outcome::Transmission(session));
                }
            }
            NBD_OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    reply(writer, option, NBD_REP_ERR_INVALID, b"NBD_OPT_STRUCTURED_REPLY takes no data")?;
                    continue;
                }
                session.structured = true;
                reply(writer, option, NBD_REP_ACK, &[])?;
            }
            NBD_OPT_LIST_META_CONTEXT | NBD_OPT_SET_META_CONTEXT => {
                meta_context(writer, option, &data, export, &mut session)?;
            }
            NBD_OPT_STARTTLS => reply(writer, option, NBD_REP_ERR_UNSUP, b"TLS is not offered")?,
            _ => reply(writer, option, NBD_REP_ERR_UNSUP, b"unknown option")?,
        }
    }
}

/// Answers `NBD_OPT_INFO`/`NBD_OPT_GO`; returns whether the export was described (and so GO may proceed).
fn info(writer: &mut impl Write, option: u32, data: &[u8], export: &ExportDesc, structured: bool) -> Result<bool> {
    let mut cur = Cursor::new(data);
    let name = cur.string();
    let requests: Option<Vec<u16>> = cur.u16().and_then(|n| (0..n).map(|_| cur.u16()).collect());
    let (Some(name), Some(requests), true) = (name, requests, cur.is_empty()) else {
        reply(writer, option, NBD_REP_ERR_INVALID, b"malformed NBD_OPT_INFO/NBD_OPT_GO data")?;
        return Ok(false);
    };
    if !export.matches(name) {
        reply(writer, option, NBD_REP_ERR_UNKNOWN, b"no such export")?;
        return Ok(false);
    }
    let mut info = Vec::with_capacity(12);
    info.extend_from_slice(&NBD_INFO_EXPORT.to_be_bytes());
    info.extend_from_slice(&export.size.to_be_bytes());
    info.extend_from_slice(&export.flags_for(structured).to_be_bytes());
    reply(writer, option, NBD_REP_INFO, &info)?;
    if requests.contains(&NBD_INFO_NAME) {
        let mut info = Vec::with_capacity(2 + export.name.len());
        info.extend_from_slice(&NBD_INFO_NAME.to_be_bytes());
        info.extend_from_slice(export.name.as_bytes());
        reply(writer, option, NBD_REP_INFO, &info)?;
    }
    // Sent whether asked or not: the engine cannot do I/O smaller than a sector, and clients that ignore it
    // get EINVAL for misaligned requests rather than a silent read-modify-write.
    let mut info = Vec::with_capacity(14);
    info.extend_from_slice(&NBD_INFO_BLOCK_SIZE.to_be_bytes());
    for size in [MIN_BLOCK_SIZE, PREFERRED_BLOCK_SIZE, MAX_PAYLOAD] {
        info.extend_from_slice(&size.to_be_bytes());
    }
    reply(writer, option, NBD_REP_INFO, &info)?;
    reply(writer, option, NBD_REP_ACK, &[])?;
    Ok(true)
}

/// Answers `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT` (see [`meta`] for what queries select).
///
/// A SET replaces the selection whatever its outcome, so one that fails leaves nothing selected (QEMU clears
/// first too), and needs structured replies. LIST does not change the session and, as in QEMU, works without
/// structured replies.
fn meta_context(
    writer: &mut impl Write,
    option: u32,
    data: &[u8],
    export: &ExportDesc,
    session: &mut Session,
) -> Result<()> {
    let listing = option == NBD_OPT_LIST_META_CONTEXT;
    if !listing {
        session.contexts.clear();
        if !session.structured {
            return reply(writer, option, NBD_REP_ERR_INVALID, b"negotiate structured replies first");
        }
    }
    let Some(request) = meta::parse(data) else {
        return reply(writer, option, NBD_REP_ERR_INVALID, b"malformed meta context data");
    };
    if !export.matches(request.export) {
        return reply(writer, option, NBD_REP_ERR_UNKNOWN, b"no such export");
    }
    let selected = meta::select(&export.bitmaps, &request.queries, listing);
    for context in &selected {
        // List replies carry id 0: the specification reserves the field there.
        let id = if listing { 0 } else { context.id() };
        let name = context.name();
        let mut payload = Vec::with_capacity(4 + name.len());
        payload.extend_from_slice(&id.to_be_bytes());
        payload.extend_from_slice(name.as_bytes());
        reply(writer, option, NBD_REP_META_CONTEXT, &payload)?;
    }
    if !listing {
        session.contexts = selected;
    }
    reply(writer, option, NBD_REP_ACK, &[])
}

/// Sends one option reply.
fn reply(writer: &mut impl Write, option: u32, kind: u32, data: &[u8]) -> Result<()> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&NBD_OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&len_u32(data.len()).to_be_bytes());
    out.extend_from_slice(data);
    writer.write_all(&out)?;
    writer.flush()?;
    Ok(())
}

/// A length we produced ourselves (names and small payloads), as the protocol's 32-bit field.
fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

fn read_u32(reader: &mut impl Read) -> Result<u32> {
    let mut b = [0u8; 4];
    reader.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(reader: &mut impl Read) -> Result<u64> {
    let mut b = [0u8; 8];
    reader.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}
