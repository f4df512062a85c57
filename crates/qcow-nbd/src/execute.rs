//! Running one checked request against the export and sending its reply.

use qcow::ErrorKind;

use crate::export::Export;
use crate::meta::MetaContext;
use crate::proto::errno::{EINVAL, EIO, ENOSPC, ENOTSUP, EPERM, ESHUTDOWN};
use crate::reply::Replies;
use crate::request::Command;
use crate::status::block_status;

/// Runs `command` and replies to `cookie`; block status answers for each of `contexts` (the session's).
pub fn execute<E: Export + ?Sized>(
    export: &E,
    replies: &Replies,
    cookie: u64,
    command: Command,
    contexts: &[MetaContext],
) {
    // What the reader admitted for this request (see `Replies::admit`).
    let admitted = match &command {
        Command::Read { len, .. } => u64::from(*len),
        Command::Write { data, .. } => data.len() as u64,
        _ => 0,
    };
    let result = match command {
        Command::Read { offset, len } => {
            let mut buf = replies.read_buffer(len as usize);
            match export.read_at(offset, buf.data_mut()) {
                Ok(()) => {
                    replies.read_done(cookie, offset, buf);
                    return;
                }
                Err(e) => Err(e),
            }
        }
        Command::Write { offset, data, fua } => {
            let written = export.write_at(offset, &data);
            replies.pool().give(data);
            written.and_then(|()| flush_if(export, fua))
        }
        Command::Flush => export.flush(),
        Command::Trim { offset, len, fua } => trim(export, offset, len).and_then(|()| flush_if(export, fua)),
        Command::WriteZeroes { offset, len, no_hole, fua } => {
            write_zeroes(export, offset, len, no_hole).and_then(|()| flush_if(export, fua))
        }
        // Every context is answered before anything is sent, so an error leaves no chunk behind it: the reply
        // is either one chunk per context or one error.
        Command::BlockStatus { offset, len, req_one } => match block_status(export, contexts, offset, len, req_one) {
            Ok(chunks) if !chunks.is_empty() => {
                replies.block_status(cookie, &chunks);
                return;
            }
            Ok(_) => Err(qcow::Error::invalid("block status", "no metadata context selected")),
            Err(e) => Err(e),
        },
        Command::Disconnect => Ok(()),
    };
    match result {
        Ok(()) => replies.done(cookie, admitted),
        Err(e) => {
            tracing::warn!(error = %e, "request failed");
            replies.error(cookie, errno_of(&e), &e.to_string(), admitted);
        }
    }
}

fn flush_if<E: Export + ?Sized>(export: &E, fua: bool) -> qcow::Result<()> {
    if fua {
        export.flush()
    } else {
        Ok(())
    }
}

/// Trim is a hint: a device that cannot discard leaves the data in place and still succeeds.
fn trim<E: Export + ?Sized>(export: &E, offset: u64, len: u64) -> qcow::Result<()> {
    if len == 0 {
        return Ok(());
    }
    match export.discard(offset / 512, len / 512) {
        Err(e) if e.kind() == ErrorKind::Unimplemented => Ok(()),
        other => other,
    }
}

/// Makes the range read as zeros: by discarding when holes are allowed and the device discards (discarded
/// sectors read as zeros), otherwise by writing zeros, which keeps the range allocated as `NO_HOLE` asks.
fn write_zeroes<E: Export + ?Sized>(export: &E, offset: u64, len: u64, no_hole: bool) -> qcow::Result<()> {
    if !no_hole && export.can_trim() {
        match export.discard(offset / 512, len / 512) {
            Err(e) if e.kind() == ErrorKind::Unimplemented => {}
            other => return other,
        }
    }
    qcow::block::write_zeros(export, offset, len)
}

/// The error value the protocol carries for an engine error.
fn errno_of(e: &qcow::Error) -> u32 {
    match e.kind() {
        ErrorKind::InvalidArgument => EINVAL,
        ErrorKind::ReadOnly => EPERM,
        ErrorKind::Unimplemented => ENOTSUP,
        ErrorKind::Disconnected => ESHUTDOWN,
        _ => {
            let os = std::error::Error::source(e)
                .and_then(|s| s.downcast_ref::<std::io::Error>())
                .and_then(std::io::Error::raw_os_error);
            match os {
                Some(28 | 122) => ENOSPC, // ENOSPC, EDQUOT
                _ => EIO,
            }
        }
    }
}
