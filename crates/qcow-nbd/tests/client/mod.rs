//! A small NBD client for tests, written byte by byte from the specification so that it can ask what real
//! clients ask (several metadata contexts, `NBD_CMD_FLAG_REQ_ONE`) and show every reply exactly as it came:
//! option replies with their types and payloads, structured chunks with their flags. It talks over a Unix socket
//! or TCP to our server and to qemu-nbd alike, so a test can ask both the same and compare.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const REP_ACK: u32 = 1;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;

pub const CMD_READ: u16 = 0;
pub const CMD_BLOCK_STATUS: u16 = 7;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const REPLY_FLAG_DONE: u16 = 1;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

/// One option reply: its type and payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionReply {
    pub kind: u32,
    pub data: Vec<u8>,
}

/// One structured reply chunk, as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub payload: Vec<u8>,
}

impl Chunk {
    /// A block status chunk's context id and (length, flags) descriptors.
    pub fn block_status(&self) -> (u32, Vec<(u32, u32)>) {
        assert_eq!(self.kind, REPLY_TYPE_BLOCK_STATUS, "{self:?}");
        let id = u32::from_be_bytes(self.payload[..4].try_into().unwrap());
        assert_eq!((self.payload.len() - 4) % 8, 0, "{self:?}");
        let descriptors = self.payload[4..]
            .chunks(8)
            .map(|d| (u32::from_be_bytes(d[..4].try_into().unwrap()), u32::from_be_bytes(d[4..].try_into().unwrap())))
            .collect();
        (id, descriptors)
    }

    /// An error chunk's error value.
    pub fn error(&self) -> u32 {
        assert_eq!(self.kind, REPLY_TYPE_ERROR, "{self:?}");
        u32::from_be_bytes(self.payload[..4].try_into().unwrap())
    }
}

/// A socket of either kind.
pub trait Socket: Read + Write + Send {}
impl<T: Read + Write + Send> Socket for T {}

/// A connection in the handshake or the transmission phase.
pub struct Client {
    s: Box<dyn Socket>,
}

/// A 32-bit length followed by the bytes.
pub fn string(bytes: &[u8]) -> Vec<u8> {
    let mut out = (bytes.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(bytes);
    out
}

/// LIST/SET option data: export name, number of queries, queries.
pub fn meta_data(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut out = string(export.as_bytes());
    out.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        out.extend_from_slice(&string(q.as_bytes()));
    }
    out
}

impl Client {
    /// Connects to a Unix socket, reads the greeting and answers fixed newstyle without zeroes.
    pub fn connect(socket: &Path) -> Client {
        let s = UnixStream::connect(socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        Client::greeted(Box::new(s))
    }

    /// The same over TCP, to `addr` (`HOST:PORT`).
    pub fn connect_tcp(addr: &str) -> Client {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        Client::greeted(Box::new(s))
    }

    fn greeted(mut s: Box<dyn Socket>) -> Client {
        let mut greet = [0u8; 18];
        s.read_exact(&mut greet).unwrap();
        assert_eq!(&greet[..8], b"NBDMAGIC");
        assert_eq!(u64::from_be_bytes(greet[8..16].try_into().unwrap()), IHAVEOPT);
        s.write_all(&3u32.to_be_bytes()).unwrap();
        Client { s }
    }

    /// Sends an option and reads its replies up to the final one (an ACK or an error).
    pub fn option(&mut self, option: u32, data: &[u8]) -> Vec<OptionReply> {
        let mut out = IHAVEOPT.to_be_bytes().to_vec();
        out.extend_from_slice(&option.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
        self.s.write_all(&out).unwrap();
        let mut replies = Vec::new();
        loop {
            let mut head = [0u8; 20];
            self.s.read_exact(&mut head).unwrap();
            assert_eq!(u64::from_be_bytes(head[..8].try_into().unwrap()), OPTION_REPLY_MAGIC);
            assert_eq!(u32::from_be_bytes(head[8..12].try_into().unwrap()), option);
            let kind = u32::from_be_bytes(head[12..16].try_into().unwrap());
            let mut data = vec![0u8; u32::from_be_bytes(head[16..20].try_into().unwrap()) as usize];
            self.s.read_exact(&mut data).unwrap();
            replies.push(OptionReply { kind, data });
            if kind == REP_ACK || kind & (1 << 31) != 0 {
                return replies;
            }
        }
    }

    /// `NBD_OPT_STRUCTURED_REPLY`, which must be acknowledged.
    pub fn structured(&mut self) {
        let replies = self.option(OPT_STRUCTURED_REPLY, &[]);
        assert_eq!(replies, vec![OptionReply { kind: REP_ACK, data: vec![] }]);
    }

    /// A LIST or SET of meta contexts: the (id, name) of every context replied, or the error type.
    pub fn meta(&mut self, option: u32, export: &str, queries: &[&str]) -> Result<Vec<(u32, String)>, u32> {
        let replies = self.option(option, &meta_data(export, queries));
        let (last, contexts) = replies.split_last().unwrap();
        if last.kind != REP_ACK {
            assert!(contexts.is_empty(), "{replies:?}");
            return Err(last.kind);
        }
        Ok(contexts
            .iter()
            .map(|r| {
                assert_eq!(r.kind, REP_META_CONTEXT, "{replies:?}");
                let id = u32::from_be_bytes(r.data[..4].try_into().unwrap());
                (id, String::from_utf8(r.data[4..].to_vec()).unwrap())
            })
            .collect())
    }

    /// `NBD_OPT_GO` for `export` with no information requests; must succeed.
    pub fn go(&mut self, export: &str) {
        let mut data = string(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        let replies = self.option(OPT_GO, &data);
        assert_eq!(replies.last().unwrap().kind, REP_ACK, "{replies:?}");
    }

    /// Sends a request header.
    pub fn request(&mut self, kind: u16, flags: u16, cookie: u64, offset: u64, len: u32) {
        let mut out = 0x2560_9513u32.to_be_bytes().to_vec();
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&cookie.to_be_bytes());
        out.extend_from_slice(&offset.to_be_bytes());
        out.extend_from_slice(&len.to_be_bytes());
        self.s.write_all(&out).unwrap();
    }

    /// Reads one structured chunk.
    pub fn chunk(&mut self) -> Chunk {
        let mut head = [0u8; 20];
        self.s.read_exact(&mut head).unwrap();
        assert_eq!(u32::from_be_bytes(head[..4].try_into().unwrap()), STRUCTURED_REPLY_MAGIC, "{head:?}");
        let flags = u16::from_be_bytes(head[4..6].try_into().unwrap());
        let kind = u16::from_be_bytes(head[6..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(head[8..16].try_into().unwrap());
        let mut payload = vec![0u8; u32::from_be_bytes(head[16..20].try_into().unwrap()) as usize];
        self.s.read_exact(&mut payload).unwrap();
        Chunk { flags, kind, cookie, payload }
    }

    /// Reads the chunks of one reply, up to the one marked done.
    pub fn chunks(&mut self) -> Vec<Chunk> {
        let mut out = Vec::new();
        loop {
            let chunk = self.chunk();
            let done = chunk.flags & REPLY_FLAG_DONE != 0;
            out.push(chunk);
            if done {
                return out;
            }
        }
    }

    /// `NBD_CMD_BLOCK_STATUS` and its whole structured reply.
    pub fn block_status(&mut self, cookie: u64, offset: u64, len: u32, flags: u16) -> Vec<Chunk> {
        self.request(CMD_BLOCK_STATUS, flags, cookie, offset, len);
        let chunks = self.chunks();
        assert!(chunks.iter().all(|c| c.cookie == cookie), "{chunks:?}");
        chunks
    }
}
