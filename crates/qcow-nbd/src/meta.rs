//! Metadata contexts: which ones an export offers, how the queries of `NBD_OPT_LIST_META_CONTEXT` and
//! `NBD_OPT_SET_META_CONTEXT` select among them, and the ids block status replies carry.
//!
//! Offered: `base:allocation`, `qemu:allocation-depth`, and `qemu:dirty-bitmap:NAME` for each bitmap the server
//! was told to export. The query rules are QEMU's, since qemu-nbd is the server backup tools are written
//! against: a query names one context exactly; when listing, an empty query list, a bare namespace (`base:`,
//! `qemu:`) or `qemu:dirty-bitmap:` stands for every context under it; anything else selects nothing and is no
//! error. The ids are QEMU's too: 0 for `base:allocation`, 1 for the allocation depth, 2 + i for the i-th
//! bitmap; list replies carry id 0, as the specification asks. Nothing here touches a socket.

use crate::proto::{BASE_ALLOCATION, NBD_MAX_STRING_SIZE, QEMU_ALLOCATION_DEPTH, QEMU_DIRTY_BITMAP};
use crate::wire::Cursor;

/// A metadata context of this server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaContext {
    /// `base:allocation`: holes and zeros.
    BaseAllocation,
    /// `qemu:allocation-depth`: the layer of the backing chain that allocates each extent.
    AllocationDepth,
    /// `qemu:dirty-bitmap:NAME`: the dirty extents of a persistent bitmap.
    DirtyBitmap {
        /// Position among the exported bitmaps, which fixes the id.
        index: u32,
        /// The bitmap's name.
        name: String,
    },
}

impl MetaContext {
    /// The id block status chunks of this context carry.
    pub fn id(&self) -> u32 {
        match self {
            MetaContext::BaseAllocation => 0,
            MetaContext::AllocationDepth => 1,
            MetaContext::DirtyBitmap { index, .. } => index.saturating_add(2),
        }
    }

    /// The context's name on the wire.
    pub fn name(&self) -> String {
        match self {
            MetaContext::BaseAllocation => BASE_ALLOCATION.to_string(),
            MetaContext::AllocationDepth => QEMU_ALLOCATION_DEPTH.to_string(),
            MetaContext::DirtyBitmap { name, .. } => format!("{QEMU_DIRTY_BITMAP}{name}"),
        }
    }
}

/// The data of a LIST or SET option: an export name and the queries.
#[derive(Debug, PartialEq, Eq)]
pub struct MetaRequest<'a> {
    /// The export the contexts are for.
    pub export: &'a [u8],
    /// The queries, as sent.
    pub queries: Vec<&'a [u8]>,
}

/// Parses LIST/SET option data: export name, number of queries, the queries. `None` when it is malformed
/// (short, or with bytes left over).
pub fn parse(data: &[u8]) -> Option<MetaRequest<'_>> {
    let mut cur = Cursor::new(data);
    let export = cur.string()?;
    let count = cur.u32()?;
    // Every query takes at least its 4-byte length, so a count beyond that is malformed, whatever its size.
    if u64::from(count) > (cur.remaining() / 4) as u64 {
        return None;
    }
    let queries = (0..count).map(|_| cur.string()).collect::<Option<Vec<_>>>()?;
    cur.is_empty().then_some(MetaRequest { export, queries })
}

/// The contexts that `queries` select among those offered (`bitmaps` are the exported bitmaps, in order), in
/// id order, each once. `listing` is true for `NBD_OPT_LIST_META_CONTEXT`, where an empty query list and bare
/// namespaces stand for everything under them.
pub fn select(bitmaps: &[String], queries: &[&[u8]], listing: bool) -> Vec<MetaContext> {
    let mut base = false;
    let mut depth = false;
    let mut maps = vec![false; bitmaps.len()];
    if listing && queries.is_empty() {
        base = true;
        depth = true;
        maps.fill(true);
    }
    for query in queries {
        // Longer than any string may be: no context has such a name (QEMU skips it too).
        if query.len() > NBD_MAX_STRING_SIZE {
            continue;
        }
        if let Some(rest) = query.strip_prefix(b"base:") {
            base |= rest == b"allocation" || (listing && rest.is_empty());
        } else if let Some(rest) = query.strip_prefix(b"qemu:") {
            if rest.is_empty() {
                if listing {
                    depth = true;
                    maps.fill(true);
                }
            } else if rest == b"allocation-depth" {
                depth = true;
            } else if let Some(name) = rest.strip_prefix(b"dirty-bitmap:") {
                if name.is_empty() {
                    if listing {
                        maps.fill(true);
                    }
                } else if let Some(i) = bitmaps.iter().position(|b| b.as_bytes() == name) {
                    if let Some(m) = maps.get_mut(i) {
                        *m = true;
                    }
                }
            }
        }
    }
    let mut out = Vec::new();
    if base {
        out.push(MetaContext::BaseAllocation);
    }
    if depth {
        out.push(MetaContext::AllocationDepth);
    }
    for ((index, name), _) in bitmaps.iter().enumerate().zip(&maps).filter(|(_, &on)| on) {
        out.push(MetaContext::DirtyBitmap { index: u32::try_from(index).unwrap_or(u32::MAX), name: name.clone() });
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn names(contexts: &[MetaContext]) -> Vec<String> {
        contexts.iter().map(MetaContext::name).collect()
    }

    fn bitmaps() -> Vec<String> {
        vec!["b1".to_string(), "b2".to_string()]
    }

    #[test]
    fn option_data_parses_and_malformed_data_is_refused() {
        let mut data = vec![0, 0, 0, 1, b'x', 0, 0, 0, 2, 0, 0, 0, 5];
        data.extend_from_slice(b"base:");
        data.extend_from_slice(&[0, 0, 0, 0]);
        let request = parse(&data).unwrap();
        assert_eq!(request.export, b"x");
        assert_eq!(request.queries, vec![&b"base:"[..], &b""[..]]);
        assert_eq!(parse(&data[..data.len() - 1]), None, "short");
        let mut longer = data.clone();
        longer.push(0);
        assert_eq!(parse(&longer), None, "bytes left over");
        assert_eq!(parse(&[0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]), None, "a count no data could hold");
        assert_eq!(parse(&[0, 0, 0, 0, 0, 0, 0, 0]).unwrap().queries.len(), 0);
    }

    #[test]
    fn listing_everything_or_a_namespace_lists_what_is_offered_in_id_order() {
        let all = ["base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b1", "qemu:dirty-bitmap:b2"];
        assert_eq!(names(&select(&bitmaps(), &[], true)), all);
        assert_eq!(names(&select(&bitmaps(), &[b"qemu:"], true)), all[1..]);
        assert_eq!(names(&select(&bitmaps(), &[b"base:"], true)), all[..1]);
        assert_eq!(names(&select(&bitmaps(), &[b"qemu:dirty-bitmap:"], true)), all[2..]);
        // Asking twice, or in another order, still lists each once in id order.
        assert_eq!(names(&select(&bitmaps(), &[b"qemu:dirty-bitmap:b2", b"base:allocation", b"qemu:"], true)), all);
        let ids: Vec<u32> = select(&bitmaps(), &[], true).iter().map(MetaContext::id).collect();
        assert_eq!(ids, [0, 1, 2, 3]);
    }

    #[test]
    fn setting_needs_full_names_and_ignores_what_is_not_offered() {
        assert!(select(&bitmaps(), &[], false).is_empty());
        assert!(select(&bitmaps(), &[b"base:", b"qemu:", b"qemu:dirty-bitmap:"], false).is_empty());
        let chosen = select(
            &bitmaps(),
            &[b"qemu:dirty-bitmap:b2", b"nbd-server:x", b"qemu:dirty-bitmap:nope", b"qemu:allocation-depth"],
            false,
        );
        assert_eq!(names(&chosen), ["qemu:allocation-depth", "qemu:dirty-bitmap:b2"]);
        assert_eq!(chosen.iter().map(MetaContext::id).collect::<Vec<_>>(), [1, 3]);
        assert!(select(&[], &[b"qemu:dirty-bitmap:b1", b"base:allocationx", b"BASE:allocation"], false).is_empty());
        let long = vec![b'q'; NBD_MAX_STRING_SIZE + 1];
        assert!(select(&bitmaps(), &[&long], true).is_empty());
    }
}
