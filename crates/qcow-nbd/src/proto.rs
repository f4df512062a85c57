//! The protocol's numbers, named as the NBD specification (doc/proto.md of the NetworkBlockDevice project)
//! names them. Nothing here does anything; every other module speaks in these names.

/// `NBDMAGIC`: the first eight bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: sent by the server after [`NBDMAGIC`] (newstyle), and by the client before every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const NBD_OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const NBD_SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const NBD_STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag: the server speaks fixed newstyle.
pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can leave out the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: the client does not want the 124 zero bytes.
pub const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flag: always set.
pub const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export refuses writes.
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: `NBD_CMD_FLUSH` is supported.
pub const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: `NBD_CMD_FLAG_FUA` is supported.
pub const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: `NBD_CMD_TRIM` is supported.
pub const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: `NBD_CMD_WRITE_ZEROES` is supported.
pub const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: `NBD_CMD_FLAG_DF` is supported on reads.
pub const NBD_FLAG_SEND_DF: u16 = 1 << 7;
/// Transmission flag: flushes and FUA writes are visible on every connection to the export.
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Option: choose the export and enter transmission, with no way to report an error.
pub const NBD_OPT_EXPORT_NAME: u32 = 1;
/// Option: end the negotiation.
pub const NBD_OPT_ABORT: u32 = 2;
/// Option: list the exports.
pub const NBD_OPT_LIST: u32 = 3;
/// Option: upgrade to TLS (not offered).
pub const NBD_OPT_STARTTLS: u32 = 5;
/// Option: describe an export.
pub const NBD_OPT_INFO: u32 = 6;
/// Option: describe an export and enter transmission.
pub const NBD_OPT_GO: u32 = 7;
/// Option: use structured replies.
pub const NBD_OPT_STRUCTURED_REPLY: u32 = 8;
/// Option: list metadata contexts.
pub const NBD_OPT_LIST_META_CONTEXT: u32 = 9;
/// Option: select metadata contexts.
pub const NBD_OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply: accepted, or end of a list.
pub const NBD_REP_ACK: u32 = 1;
/// Option reply: one export of a list.
pub const NBD_REP_SERVER: u32 = 2;
/// Option reply: one piece of information about an export.
pub const NBD_REP_INFO: u32 = 3;
/// Option reply: one metadata context.
pub const NBD_REP_META_CONTEXT: u32 = 4;
/// Option error: unknown option.
pub const NBD_REP_ERR_UNSUP: u32 = (1 << 31) + 1;
/// Option error: known but syntactically invalid.
pub const NBD_REP_ERR_INVALID: u32 = (1 << 31) + 3;
/// Option error: the export does not exist.
pub const NBD_REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
/// Option error: the server is shutting down.
pub const NBD_REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;

/// Information type: size and transmission flags.
pub const NBD_INFO_EXPORT: u16 = 0;
/// Information type: the export's canonical name.
pub const NBD_INFO_NAME: u16 = 1;
/// Information type: a human-readable description.
pub const NBD_INFO_DESCRIPTION: u16 = 2;
/// Information type: minimum, preferred and maximum block sizes.
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;

/// Command: read.
pub const NBD_CMD_READ: u16 = 0;
/// Command: write (with a payload).
pub const NBD_CMD_WRITE: u16 = 1;
/// Command: soft disconnect.
pub const NBD_CMD_DISC: u16 = 2;
/// Command: make completed writes durable.
pub const NBD_CMD_FLUSH: u16 = 3;
/// Command: the range is no longer needed.
pub const NBD_CMD_TRIM: u16 = 4;
/// Command: make the range read as zeros.
pub const NBD_CMD_WRITE_ZEROES: u16 = 6;
/// Command: report the range's state in the selected metadata contexts.
pub const NBD_CMD_BLOCK_STATUS: u16 = 7;

/// Command flag: the write must be durable before the reply.
pub const NBD_CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag: write zeroes must allocate, not punch a hole.
pub const NBD_CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag: do not fragment the read reply.
pub const NBD_CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag: block status should return one extent only.
pub const NBD_CMD_FLAG_REQ_ONE: u16 = 1 << 3;

/// Structured reply flag: the last chunk of a reply.
pub const NBD_REPLY_FLAG_DONE: u16 = 1 << 0;
/// Structured reply type: no payload (the final chunk of a successful reply).
pub const NBD_REPLY_TYPE_NONE: u16 = 0;
/// Structured reply type: read data at an offset.
pub const NBD_REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Structured reply type: a run of zeros of a read, sent without the bytes.
pub const NBD_REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Structured reply type: block status descriptors for one metadata context.
pub const NBD_REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Structured reply type: an error with a message.
pub const NBD_REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

/// `base:allocation` state: the extent is not allocated.
pub const NBD_STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` state: the extent reads as zeros.
pub const NBD_STATE_ZERO: u32 = 1 << 1;

/// `qemu:dirty-bitmap:NAME` state: the extent is dirty in the bitmap.
pub const NBD_STATE_DIRTY: u32 = 1 << 0;

/// The allocation context the specification defines.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// QEMU's context for the layer of a backing chain that allocates each extent (0 none, 1 the export, 2 its
/// backing file, ...); the whole 32-bit flags field is the depth.
pub const QEMU_ALLOCATION_DEPTH: &str = "qemu:allocation-depth";
/// Prefix of QEMU's dirty bitmap contexts, `qemu:dirty-bitmap:NAME`.
pub const QEMU_DIRTY_BITMAP: &str = "qemu:dirty-bitmap:";
/// The longest string the specification allows (export names, context names, queries).
pub const NBD_MAX_STRING_SIZE: usize = 4096;

/// Error values on the wire (Linux errno numbers, as the specification fixes them).
pub mod errno {
    /// Operation not permitted (a write to a read-only export).
    pub const EPERM: u32 = 1;
    /// Input/output error.
    pub const EIO: u32 = 5;
    /// Cannot allocate memory.
    pub const ENOMEM: u32 = 12;
    /// Invalid argument.
    pub const EINVAL: u32 = 22;
    /// No space left (a write past the end).
    pub const ENOSPC: u32 = 28;
    /// Value too large.
    pub const EOVERFLOW: u32 = 75;
    /// Operation not supported.
    pub const ENOTSUP: u32 = 95;
    /// Server shutting down.
    pub const ESHUTDOWN: u32 = 108;
}
