//! Transmission requests: reading one off the socket, and deciding whether it can be served or which error the
//! specification gives it.

use std::io::{self, Read};

use crate::buffers::BufferPool;
use crate::error::{Error, Result};
use crate::handshake::{Session, MAX_PAYLOAD, MIN_BLOCK_SIZE};
use crate::proto::errno::{EINVAL, ENOSPC, EPERM};
use crate::proto::*;

/// A request header, as sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// `NBD_CMD_FLAG_*` bits.
    pub flags: u16,
    /// `NBD_CMD_*`.
    pub kind: u16,
    /// The client's handle, echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub length: u32,
}

/// A request checked against the export and ready to run.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    /// `NBD_CMD_READ`.
    Read {
        /// Byte offset.
        offset: u64,
        /// Byte length (at most [`MAX_PAYLOAD`]).
        len: u32,
    },
    /// `NBD_CMD_WRITE`.
    Write {
        /// Byte offset.
        offset: u64,
        /// The payload.
        data: Vec<u8>,
        /// `NBD_CMD_FLAG_FUA`.
        fua: bool,
    },
    /// `NBD_CMD_FLUSH`.
    Flush,
    /// `NBD_CMD_TRIM`, already shrunk to whole sectors.
    Trim {
        /// Byte offset (sector aligned).
        offset: u64,
        /// Byte length (sector multiple; may be 0 after shrinking).
        len: u64,
        /// `NBD_CMD_FLAG_FUA`.
        fua: bool,
    },
    /// `NBD_CMD_WRITE_ZEROES`.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
        /// `NBD_CMD_FLAG_NO_HOLE`: the range must stay allocated.
        no_hole: bool,
        /// `NBD_CMD_FLAG_FUA`.
        fua: bool,
    },
    /// `NBD_CMD_BLOCK_STATUS`, answered for every selected metadata context.
    BlockStatus {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
        /// `NBD_CMD_FLAG_REQ_ONE`.
        req_one: bool,
    },
    /// `NBD_CMD_DISC`.
    Disconnect,
}

/// What the export looks like to request checking.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Size in bytes.
    pub size: u64,
    /// Writes are refused with EPERM.
    pub read_only: bool,
}

/// Reads the next request header. `Ok(None)` when the client closed the connection between requests.
///
/// # Errors
/// Socket failures, a connection closed inside a header, and a wrong magic.
pub fn read_header(reader: &mut impl Read) -> Result<Option<Header>> {
    let mut b = [0u8; 28];
    let mut got = 0;
    while got < b.len() {
        let rest = b.get_mut(got..).unwrap_or_default();
        match reader.read(rest) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(Error::protocol(format!("connection closed {got} bytes into a request header"))),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let be32 = |at: usize| b.get(at..at + 4).and_then(|s| s.try_into().ok()).map_or(0, u32::from_be_bytes);
    let be16 = |at: usize| b.get(at..at + 2).and_then(|s| s.try_into().ok()).map_or(0, u16::from_be_bytes);
    let be64 = |at: usize| b.get(at..at + 8).and_then(|s| s.try_into().ok()).map_or(0, u64::from_be_bytes);
    let magic = be32(0);
    if magic != NBD_REQUEST_MAGIC {
        return Err(Error::protocol(format!("request magic {magic:#x} is not NBD_REQUEST_MAGIC")));
    }
    Ok(Some(Header { flags: be16(4), kind: be16(6), cookie: be64(8), offset: be64(16), length: be32(24) }))
}

/// Reads the payload that follows a write header, so the stream stays in step whether or not the write is then
/// refused.
///
/// # Errors
/// A payload over [`MAX_PAYLOAD`] (the connection is dropped rather than reading up to 4 GiB), socket failures.
pub fn read_payload(reader: &mut impl Read, header: &Header, pool: &BufferPool) -> Result<Vec<u8>> {
    if header.kind != NBD_CMD_WRITE {
        return Ok(Vec::new());
    }
    if header.length > MAX_PAYLOAD {
        return Err(Error::protocol(format!(
            "write of {} bytes exceeds the maximum payload of {MAX_PAYLOAD}",
            header.length
        )));
    }
    let mut data = pool.take(header.length as usize);
    reader.read_exact(&mut data).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            Error::protocol("connection closed inside a write payload")
        } else {
            e.into()
        }
    })?;
    Ok(data)
}

/// Checks a request: the command's result, or the error value the reply must carry.
pub fn check(header: &Header, data: Vec<u8>, limits: Limits, session: &Session) -> std::result::Result<Command, u32> {
    let (offset, length) = (header.offset, u64::from(header.length));
    let allowed = match header.kind {
        NBD_CMD_READ => NBD_CMD_FLAG_DF,
        NBD_CMD_WRITE | NBD_CMD_TRIM => NBD_CMD_FLAG_FUA,
        NBD_CMD_WRITE_ZEROES => NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE,
        NBD_CMD_BLOCK_STATUS => NBD_CMD_FLAG_REQ_ONE,
        NBD_CMD_FLUSH | NBD_CMD_DISC => 0,
        _ => return Err(EINVAL),
    };
    if header.flags & !allowed != 0 {
        return Err(EINVAL);
    }
    let modifies = matches!(header.kind, NBD_CMD_WRITE | NBD_CMD_TRIM | NBD_CMD_WRITE_ZEROES);
    if modifies && limits.read_only {
        return Err(EPERM);
    }
    let in_range = offset.checked_add(length).is_some_and(|end| end <= limits.size);
    let aligned = offset % u64::from(MIN_BLOCK_SIZE) == 0 && length % u64::from(MIN_BLOCK_SIZE) == 0;
    let fua = header.flags & NBD_CMD_FLAG_FUA != 0;
    match header.kind {
        NBD_CMD_READ | NBD_CMD_WRITE | NBD_CMD_WRITE_ZEROES if !aligned => Err(EINVAL),
        NBD_CMD_WRITE | NBD_CMD_WRITE_ZEROES if !in_range => Err(ENOSPC),
        NBD_CMD_READ | NBD_CMD_TRIM | NBD_CMD_BLOCK_STATUS if !in_range => Err(EINVAL),
        NBD_CMD_READ if header.length > MAX_PAYLOAD => Err(EINVAL),
        NBD_CMD_READ => Ok(Command::Read { offset, len: header.length }),
        NBD_CMD_WRITE => Ok(Command::Write { offset, data, fua }),
        NBD_CMD_FLUSH => Ok(Command::Flush),
        NBD_CMD_TRIM => {
            // Trim is advisory: a partial sector at either end is left alone rather than refused.
            let sector = u64::from(MIN_BLOCK_SIZE);
            let start = offset.next_multiple_of(sector);
            let end = (offset + length) / sector * sector;
            Ok(Command::Trim { offset: start, len: end.saturating_sub(start), fua })
        }
        NBD_CMD_WRITE_ZEROES => {
            Ok(Command::WriteZeroes { offset, len: length, no_hole: header.flags & NBD_CMD_FLAG_NO_HOLE != 0, fua })
        }
        NBD_CMD_BLOCK_STATUS if session.contexts.is_empty() || length == 0 => Err(EINVAL),
        NBD_CMD_BLOCK_STATUS => {
            Ok(Command::BlockStatus { offset, len: length, req_one: header.flags & NBD_CMD_FLAG_REQ_ONE != 0 })
        }
        _ => Ok(Command::Disconnect),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::meta::MetaContext;

    fn header(kind: u16, flags: u16, offset: u64, length: u32) -> Header {
        Header { flags, kind, cookie: 7, offset, length }
    }

    const RW: Limits = Limits { size: 1 << 20, read_only: false };
    const RO: Limits = Limits { size: 1 << 20, read_only: true };

    fn sr() -> Session {
        Session { structured: true, contexts: vec![MetaContext::BaseAllocation] }
    }

    #[test]
    fn errors_follow_the_specification() {
        assert_eq!(check(&header(NBD_CMD_READ, 0, 1 << 20, 512), vec![], RW, &sr()), Err(EINVAL));
        assert_eq!(check(&header(NBD_CMD_WRITE, 0, 1 << 20, 512), vec![0; 512], RW, &sr()), Err(ENOSPC));
        assert_eq!(check(&header(NBD_CMD_WRITE, 0, 0, 512), vec![0; 512], RO, &sr()), Err(EPERM));
        assert_eq!(check(&header(NBD_CMD_TRIM, 0, 0, 512), vec![], RO, &sr()), Err(EPERM));
        assert_eq!(check(&header(NBD_CMD_READ, 0, 1, 512), vec![], RW, &sr()), Err(EINVAL));
        assert_eq!(check(&header(NBD_CMD_READ, NBD_CMD_FLAG_FUA, 0, 512), vec![], RW, &sr()), Err(EINVAL));
        assert_eq!(check(&header(99, 0, 0, 0), vec![], RW, &sr()), Err(EINVAL));
        let no_meta = Session { structured: true, contexts: Vec::new() };
        assert_eq!(check(&header(NBD_CMD_BLOCK_STATUS, 0, 0, 512), vec![], RW, &no_meta), Err(EINVAL));
        assert_eq!(check(&header(NBD_CMD_BLOCK_STATUS, 0, 0, 0), vec![], RW, &sr()), Err(EINVAL));
        assert_eq!(
            check(&header(NBD_CMD_BLOCK_STATUS, NBD_CMD_FLAG_REQ_ONE, 512, 100), vec![], RW, &sr()),
            Ok(Command::BlockStatus { offset: 512, len: 100, req_one: true })
        );
        assert_eq!(check(&header(u16::MAX, 0, u64::MAX, u32::MAX), vec![], RW, &sr()), Err(EINVAL));
    }

    #[test]
    fn trim_shrinks_to_whole_sectors() {
        assert_eq!(
            check(&header(NBD_CMD_TRIM, 0, 100, 1000), vec![], RW, &sr()),
            Ok(Command::Trim { offset: 512, len: 512, fua: false })
        );
        assert_eq!(
            check(&header(NBD_CMD_TRIM, 0, 100, 100), vec![], RW, &sr()),
            Ok(Command::Trim { offset: 512, len: 0, fua: false })
        );
    }
}
