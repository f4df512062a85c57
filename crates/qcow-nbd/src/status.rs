//! Block status: what each selected metadata context says about a range, as the descriptors of one
//! `NBD_REPLY_TYPE_BLOCK_STATUS` chunk per context.
//!
//! The export answers in runs of any length; here they become descriptors as QEMU shapes them: empty runs
//! dropped, neighbours with the same flags merged, the total cut at the request's length, and with
//! `NBD_CMD_FLAG_REQ_ONE` exactly one descriptor per context (the first run, whole up to the request's end).

use crate::export::Export;
use crate::meta::MetaContext;
use crate::proto::NBD_STATE_DIRTY;

/// At most this many descriptors go into one chunk; the client asks again for the rest.
pub const MAX_DESCRIPTORS: usize = 1 << 16;

/// The block status of one context: its id and its (length, flags) descriptors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusChunk {
    /// The context id, as `NBD_OPT_SET_META_CONTEXT` announced it.
    pub context: u32,
    /// (length, flags) descriptors covering the range from its start.
    pub descriptors: Vec<(u32, u32)>,
}

/// The status of `offset..offset + len` in every context of `contexts`, in their order.
///
/// # Errors
/// Whatever the export fails with; `InvalidArgument` when a context has nothing to say about the range (an
/// export that answered with no extent, a bitmap that is gone).
pub fn block_status<E: Export + ?Sized>(
    export: &E,
    contexts: &[MetaContext],
    offset: u64,
    len: u64,
    req_one: bool,
) -> qcow::Result<Vec<StatusChunk>> {
    let mut chunks = Vec::with_capacity(contexts.len());
    for context in contexts {
        let runs: Vec<(u64, u32)> = match context {
            MetaContext::BaseAllocation => export.allocation(offset, len)?.iter().map(|r| (r.len, r.flags)).collect(),
            MetaContext::AllocationDepth => {
                export.allocation_depth(offset, len)?.iter().map(|r| (r.len, r.depth)).collect()
            }
            MetaContext::DirtyBitmap { name, .. } => match export.dirty_bitmap(name, offset, len)? {
                Some(runs) => runs.iter().map(|&(n, dirty)| (n, if dirty { NBD_STATE_DIRTY } else { 0 })).collect(),
                None => {
                    return Err(qcow::Error::invalid("block status", format!("dirty bitmap {name:?} is gone")));
                }
            },
        };
        let descriptors = descriptors(runs, len, req_one);
        if descriptors.is_empty() {
            return Err(qcow::Error::invalid(
                "block status",
                format!("no extents at {offset:#x} in {}", context.name()),
            ));
        }
        chunks.push(StatusChunk { context: context.id(), descriptors });
    }
    Ok(chunks)
}

/// (length, flags) runs as descriptors of a request of `len` bytes (see the module docs).
pub fn descriptors(runs: impl IntoIterator<Item = (u64, u32)>, len: u64, req_one: bool) -> Vec<(u32, u32)> {
    let limit = if req_one { 1 } else { MAX_DESCRIPTORS };
    let mut out: Vec<(u64, u32)> = Vec::new();
    let mut left = len;
    for (run, flags) in runs {
        let run = run.min(left);
        if run == 0 {
            if left == 0 {
                break;
            }
            continue;
        }
        let full = out.len() >= limit;
        match out.last_mut() {
            Some(last) if last.1 == flags => last.0 += run,
            _ if full => break,
            _ => out.push((run, flags)),
        }
        left -= run;
    }
    // Each descriptor lies inside the request, whose length fits 32 bits.
    out.into_iter().map(|(n, flags)| (u32::try_from(n).unwrap_or(u32::MAX), flags)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_merge_drop_empties_and_stop_at_the_request_end() {
        let runs = [(0, 3), (100, 0), (50, 0), (0, 1), (200, 3), (1000, 1)];
        assert_eq!(descriptors(runs, 1000, false), vec![(150, 0), (200, 3), (650, 1)]);
        assert_eq!(descriptors(runs, 120, false), vec![(120, 0)]);
        assert_eq!(descriptors(runs, 150, false), vec![(150, 0)]);
        assert_eq!(descriptors([], 512, false), vec![]);
    }

    #[test]
    fn req_one_keeps_the_first_run_whole_up_to_the_request_end() {
        let runs = [(100, 1), (50, 1), (200, 0)];
        assert_eq!(descriptors(runs, 1000, true), vec![(150, 1)]);
        assert_eq!(descriptors(runs, 120, true), vec![(120, 1)]);
        assert_eq!(descriptors([(0, 2), (64, 2)], 512, true), vec![(64, 2)]);
    }

    #[test]
    fn at_most_the_maximum_number_of_descriptors_go_into_a_chunk() {
        let runs = (0..MAX_DESCRIPTORS as u64 + 10).map(|i| (1, (i % 2) as u32));
        let out = descriptors(runs, u64::from(u32::MAX), false);
        assert_eq!(out.len(), MAX_DESCRIPTORS);
        assert!(out.iter().all(|&(n, _)| n == 1));
    }
}
